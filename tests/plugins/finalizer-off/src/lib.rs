//! Test plugin `finalizer-off`: version 0.2.0 of `test-finalizer`
//! (tests/plugins/finalizer) that no longer asks for a finalizer (hole 10).
//!
//! Swapped in over version 0.1.0, it attacks the finalizer's lifetime: a
//! host that only ever adds `test.kuwa.dev/finalizer` and never removes it
//! once no version asks for it leaves parents undeletable (nobody calls
//! `finalize` any more, nobody removes the finalizer).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::CustomResource;
use kuwa_sdk::{Description, Desired, Error, Observed, Reconciler, child_meta};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Spec of the test kind (the same as tests/plugins/finalizer's).
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, JsonSchema)]
#[kube(
    group = "test.kuwa.dev",
    version = "v1",
    kind = "FinalizerTest",
    namespaced
)]
pub struct FinalizerTestSpec {
    /// Free text.
    #[serde(default)]
    pub note: String,
}

/// The version this plugin describes.
pub const VERSION: &str = "0.2.0";

/// The plugin.
pub struct Plugin;

impl Reconciler for Plugin {
    type Parent = FinalizerTest;
    type Status = ();

    fn describe() -> Description {
        Description::new::<FinalizerTest>("test-finalizer", VERSION).owns::<ConfigMap>()
    }

    fn reconcile(parent: &FinalizerTest, _observed: &Observed) -> Result<Desired<()>, Error> {
        let name = parent.metadata.name.clone().unwrap_or_default();
        Ok(Desired::new().child(ConfigMap {
            metadata: child_meta(parent, format!("{name}-held")),
            data: Some(BTreeMap::from([(
                "note".to_owned(),
                parent.spec.note.clone(),
            )])),
            ..ConfigMap::default()
        }))
    }
}

kuwa_sdk::export_plugin!(Plugin);

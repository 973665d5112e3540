//! Test plugin `finalizer`: asks the host for a finalizer on `FinalizerTest`
//! objects (`test.kuwa.dev/v1`) and holds deletion until the object carries
//! the annotation `test.kuwa.dev/release: "true"`, like an operator waiting
//! for an external resource to be cleaned up.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::CustomResource;
use kuwa_sdk::{Description, Desired, Error, Event, Finalized, Observed, Reconciler, child_meta};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Spec of the test kind.
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

/// The annotation that lets finalization finish.
pub const RELEASE: &str = "test.kuwa.dev/release";

/// The plugin.
pub struct Plugin;

impl Reconciler for Plugin {
    type Parent = FinalizerTest;
    type Status = ();

    fn describe() -> Description {
        Description::new::<FinalizerTest>("test-finalizer", "0.1.0")
            .owns::<ConfigMap>()
            .with_finalizer()
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

    fn finalize(parent: &FinalizerTest, _observed: &Observed) -> Result<Finalized, Error> {
        let released = parent
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(RELEASE))
            .map(String::as_str)
            == Some("true");
        if released {
            let mut done = Finalized::done();
            done.events
                .push(Event::normal("Released", "cleanup finished"));
            Ok(done)
        } else {
            Ok(Finalized::not_yet(Duration::from_millis(500)))
        }
    }
}

kuwa_sdk::export_plugin!(Plugin);

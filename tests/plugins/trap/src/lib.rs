//! Test plugin `trap`: panics in every reconcile.
//!
//! It reconciles `TrapTest` objects (`test.kuwa.dev/v1`) and declares a ConfigMap
//! child it never gets to return.

use k8s_openapi::api::core::v1::ConfigMap;
use kube::CustomResource;
use kuwa_sdk::{Description, Desired, Error, Observed, Reconciler};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Spec of the test kind.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, JsonSchema)]
#[kube(group = "test.kuwa.dev", version = "v1", kind = "TrapTest", namespaced)]
pub struct TrapTestSpec {
    /// Free text, to trigger reconciles by changing it.
    #[serde(default)]
    pub note: String,
}

/// The plugin.
pub struct Plugin;

impl Reconciler for Plugin {
    type Parent = TrapTest;
    type Status = ();

    fn describe() -> Description {
        Description::new::<TrapTest>("test-trap", "0.1.0").owns::<ConfigMap>()
    }

    fn reconcile(_parent: &TrapTest, _observed: &Observed) -> Result<Desired<()>, Error> {
        panic!("test-trap panics on purpose")
    }
}

kuwa_sdk::export_plugin!(Plugin);

//! Test plugin `spin`: loops forever in every reconcile.
//!
//! It reconciles `SpinTest` objects (`test.kuwa.dev/v1`) and declares a ConfigMap
//! child it never gets to return.

use k8s_openapi::api::core::v1::ConfigMap;
use kube::CustomResource;
use kuwa_sdk::{Description, Desired, Error, Observed, Reconciler};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Spec of the test kind.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, JsonSchema)]
#[kube(group = "test.kuwa.dev", version = "v1", kind = "SpinTest", namespaced)]
pub struct SpinTestSpec {
    /// Free text, to trigger reconciles by changing it.
    #[serde(default)]
    pub note: String,
}

/// The plugin.
pub struct Plugin;

impl Reconciler for Plugin {
    type Parent = SpinTest;
    type Status = ();

    fn describe() -> Description {
        Description::new::<SpinTest>("test-spin", "0.1.0").owns::<ConfigMap>()
    }

    fn reconcile(_parent: &SpinTest, _observed: &Observed) -> Result<Desired<()>, Error> {
        let mut n: u64 = 0;
        loop {
            n = std::hint::black_box(n.wrapping_add(1));
        }
    }
}

kuwa_sdk::export_plugin!(Plugin);

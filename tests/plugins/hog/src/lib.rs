//! Test plugin `hog`: allocates memory without bound in every reconcile.
//!
//! It reconciles `HogTest` objects (`test.kuwa.dev/v1`) and declares a ConfigMap
//! child it never gets to return.

use k8s_openapi::api::core::v1::ConfigMap;
use kube::CustomResource;
use kuwa_sdk::{Description, Desired, Error, Observed, Reconciler};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Spec of the test kind.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, JsonSchema)]
#[kube(group = "test.kuwa.dev", version = "v1", kind = "HogTest", namespaced)]
pub struct HogTestSpec {
    /// Free text, to trigger reconciles by changing it.
    #[serde(default)]
    pub note: String,
}

/// The plugin.
pub struct Plugin;

impl Reconciler for Plugin {
    type Parent = HogTest;
    type Status = ();

    fn describe() -> Description {
        Description::new::<HogTest>("test-hog", "0.1.0").owns::<ConfigMap>()
    }

    fn reconcile(_parent: &HogTest, _observed: &Observed) -> Result<Desired<()>, Error> {
        let mut hoard: Vec<Vec<u8>> = Vec::new();
        loop {
            hoard.push(vec![1u8; 1 << 20]);
            std::hint::black_box(&hoard);
        }
    }
}

kuwa_sdk::export_plugin!(Plugin);

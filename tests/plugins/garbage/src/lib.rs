//! Test plugin `garbage`: returns output that is not Kubernetes objects.
//!
//! It reconciles `GarbageTest` objects (`test.kuwa.dev/v1`) and declares a ConfigMap
//! child it never gets to return.

use k8s_openapi::api::core::v1::ConfigMap;
use kube::CustomResource;
use kuwa_sdk::{Description, Desired, Error, Observed, Reconciler};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Spec of the test kind.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, JsonSchema)]
#[kube(
    group = "test.kuwa.dev",
    version = "v1",
    kind = "GarbageTest",
    namespaced
)]
pub struct GarbageTestSpec {
    /// Free text, to trigger reconciles by changing it.
    #[serde(default)]
    pub note: String,
}

/// The plugin.
pub struct Plugin;

impl Reconciler for Plugin {
    type Parent = GarbageTest;
    type Status = ();

    fn describe() -> Description {
        Description::new::<GarbageTest>("test-garbage", "0.1.0").owns::<ConfigMap>()
    }

    fn reconcile(_parent: &GarbageTest, _observed: &Observed) -> Result<Desired<()>, Error> {
        unreachable!("the export below answers reconcile itself")
    }
}

// Answers `reconcile` with text that is not JSON objects, below the SDK's
// typed API, the way a buggy guest in any language could.
#[cfg(target_arch = "wasm32")]
const _: () = {
    use kuwa_sdk::wit::exports::kuwa::controller::plugin::Guest;
    use kuwa_sdk::wit::kuwa::controller::types as wit;

    struct Garbage;

    impl Guest for Garbage {
        fn describe() -> wit::Description {
            kuwa_sdk::glue::describe::<Plugin>()
        }
        fn reconcile(_: wit::Observed) -> Result<wit::Desired, wit::ReconcileError> {
            Ok(wit::Desired {
                children: vec!["{this is not json".into(), "[1, 2, 3]".into()],
                status: Some("\"not an object\"".into()),
                requeue_after_ms: None,
                events: Vec::new(),
            })
        }
        fn finalize(_: wit::Observed) -> Result<wit::Finalized, wit::ReconcileError> {
            Ok(wit::Finalized {
                done: true,
                requeue_after_ms: None,
                events: Vec::new(),
            })
        }
    }

    kuwa_sdk::wit::__export_reconciler!(Garbage with_types_in kuwa_sdk::wit);
};

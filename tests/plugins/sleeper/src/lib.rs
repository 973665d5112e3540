//! Test plugin `sleeper`: attacks the call deadline (hole 1) by blocking in a
//! host call instead of spinning in guest code.
//!
//! A `SleepTest` (`test.kuwa.dev/v1`) makes the plugin `std::thread::sleep`
//! for `spec.seconds` (a WASI clock poll, i.e. time spent in the host, where
//! epoch interruption alone does not reach it) and only then return a
//! ConfigMap `<name>-slept`. With a deadline shorter than the sleep the
//! ConfigMap must never appear.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::CustomResource;
use kuwa_sdk::{Description, Desired, Error, Observed, Reconciler, child_meta};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Spec of the test kind.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, JsonSchema)]
#[kube(
    group = "test.kuwa.dev",
    version = "v1",
    kind = "SleepTest",
    namespaced
)]
pub struct SleepTestSpec {
    /// How long each reconcile sleeps before answering.
    #[serde(default)]
    pub seconds: u64,
}

/// The plugin.
pub struct Plugin;

impl Reconciler for Plugin {
    type Parent = SleepTest;
    type Status = ();

    fn describe() -> Description {
        Description::new::<SleepTest>("test-sleeper", "0.1.0").owns::<ConfigMap>()
    }

    fn reconcile(parent: &SleepTest, _observed: &Observed) -> Result<Desired<()>, Error> {
        std::thread::sleep(Duration::from_secs(parent.spec.seconds));
        let name = parent.metadata.name.clone().unwrap_or_default();
        Ok(Desired::new().child(ConfigMap {
            metadata: child_meta(parent, format!("{name}-slept")),
            data: Some(BTreeMap::from([(
                "seconds".to_owned(),
                parent.spec.seconds.to_string(),
            )])),
            ..ConfigMap::default()
        }))
    }
}

kuwa_sdk::export_plugin!(Plugin);

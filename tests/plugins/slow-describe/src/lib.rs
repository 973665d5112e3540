//! Test plugin `slow-describe`: attacks loading (hole 1): its `describe`
//! sleeps for an hour before answering, so a host that calls it without a
//! deadline never finishes loading and never becomes ready.
//!
//! It would reconcile `SlowDescribeTest` objects (`test.kuwa.dev/v1`) into a
//! ConfigMap `<name>-ok`, if it were ever activated.

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
    kind = "SlowDescribeTest",
    namespaced
)]
pub struct SlowDescribeTestSpec {
    /// Free text.
    #[serde(default)]
    pub note: String,
}

/// How long `describe` sleeps.
pub const DESCRIBE_SLEEP: Duration = Duration::from_secs(3600);

/// The plugin.
pub struct Plugin;

impl Reconciler for Plugin {
    type Parent = SlowDescribeTest;
    type Status = ();

    fn describe() -> Description {
        std::thread::sleep(DESCRIBE_SLEEP);
        Description::new::<SlowDescribeTest>("test-slow-describe", "0.1.0").owns::<ConfigMap>()
    }

    fn reconcile(parent: &SlowDescribeTest, _observed: &Observed) -> Result<Desired<()>, Error> {
        let name = parent.metadata.name.clone().unwrap_or_default();
        Ok(Desired::new().child(ConfigMap {
            metadata: child_meta(parent, format!("{name}-ok")),
            data: Some(BTreeMap::from([("k".to_owned(), "v".to_owned())])),
            ..ConfigMap::default()
        }))
    }
}

kuwa_sdk::export_plugin!(Plugin);

//! Test plugin `fanout`: one ConfigMap per `FanoutTest` (`test.kuwa.dev/v1`),
//! for queue and write-budget tests with thousands of parents.

use std::collections::BTreeMap;

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
    kind = "FanoutTest",
    namespaced
)]
pub struct FanoutTestSpec {
    /// Copied into the ConfigMap.
    #[serde(default)]
    pub value: String,
}

/// The plugin.
pub struct Plugin;

impl Reconciler for Plugin {
    type Parent = FanoutTest;
    type Status = ();

    fn describe() -> Description {
        Description::new::<FanoutTest>("test-fanout", "0.1.0").owns::<ConfigMap>()
    }

    fn reconcile(parent: &FanoutTest, _observed: &Observed) -> Result<Desired<()>, Error> {
        let name = parent.metadata.name.clone().unwrap_or_default();
        Ok(Desired::new().child(ConfigMap {
            metadata: child_meta(parent, format!("{name}-out")),
            data: Some(BTreeMap::from([(
                "value".to_owned(),
                parent.spec.value.clone(),
            )])),
            ..ConfigMap::default()
        }))
    }
}

kuwa_sdk::export_plugin!(Plugin);

//! Test plugin `rogue`: returns output outside its grant when asked to.
//!
//! A `RogueTest` (`test.kuwa.dev/v1`) always yields a ConfigMap
//! `<name>-ok`; with `spec.mode`:
//! * `other-namespace`: also a ConfigMap `<name>-elsewhere` in `kube-system`,
//! * `ungranted-kind`: also a Secret `<name>-secret` (declared, but a
//!   manifest may not grant it),
//! * anything else: nothing more.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::CustomResource;
use kuwa_sdk::{Description, Desired, Error, Observed, Reconciler, child_meta};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Spec of the test kind.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, JsonSchema)]
#[kube(
    group = "test.kuwa.dev",
    version = "v1",
    kind = "RogueTest",
    namespaced
)]
pub struct RogueTestSpec {
    /// What to return beyond the one good ConfigMap.
    #[serde(default)]
    pub mode: String,
}

/// The plugin.
pub struct Plugin;

impl Reconciler for Plugin {
    type Parent = RogueTest;
    type Status = ();

    fn describe() -> Description {
        Description::new::<RogueTest>("test-rogue", "0.1.0")
            .owns::<ConfigMap>()
            .owns::<Secret>()
    }

    fn reconcile(parent: &RogueTest, _observed: &Observed) -> Result<Desired<()>, Error> {
        let name = parent.metadata.name.clone().unwrap_or_default();
        let ok = ConfigMap {
            metadata: child_meta(parent, format!("{name}-ok")),
            data: Some(BTreeMap::from([("k".to_owned(), "v".to_owned())])),
            ..ConfigMap::default()
        };
        let desired = Desired::new().child(ok);
        Ok(match parent.spec.mode.as_str() {
            "other-namespace" => {
                let mut meta = child_meta(parent, format!("{name}-elsewhere"));
                meta.namespace = Some("kube-system".to_owned());
                desired.child(ConfigMap {
                    metadata: meta,
                    ..ConfigMap::default()
                })
            }
            "ungranted-kind" => desired.child(Secret {
                metadata: child_meta(parent, format!("{name}-secret")),
                ..Secret::default()
            }),
            _ => desired,
        })
    }
}

kuwa_sdk::export_plugin!(Plugin);

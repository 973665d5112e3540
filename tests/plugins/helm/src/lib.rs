//! Test plugin `helm`: attacks field-manager identity (hole 3). It is named
//! `helm`, so a host that uses the bare plugin name as its server-side-apply
//! field manager writes as "helm" and can take over (or drop) fields another
//! tool manages under that name.
//!
//! A `HelmTest` (`test.kuwa.dev/v1`) yields a ConfigMap `<name>-chart` and
//! the status `{ok: true}`.

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
    kind = "HelmTest",
    namespaced,
    status = "HelmTestStatus"
)]
pub struct HelmTestSpec {
    /// Free text, copied into the chart ConfigMap.
    #[serde(default)]
    pub note: String,
}

/// Status of the test kind.
#[derive(Serialize, Deserialize, Clone, Debug, Default, JsonSchema)]
pub struct HelmTestStatus {
    /// Always true once reconciled.
    #[serde(default)]
    pub ok: bool,
}

/// The plugin.
pub struct Plugin;

impl Reconciler for Plugin {
    type Parent = HelmTest;
    type Status = HelmTestStatus;

    fn describe() -> Description {
        Description::new::<HelmTest>("helm", "0.1.0").owns::<ConfigMap>()
    }

    fn reconcile(
        parent: &HelmTest,
        _observed: &Observed,
    ) -> Result<Desired<HelmTestStatus>, Error> {
        let name = parent.metadata.name.clone().unwrap_or_default();
        Ok(Desired::new()
            .child(ConfigMap {
                metadata: child_meta(parent, format!("{name}-chart")),
                data: Some(BTreeMap::from([(
                    "note".to_owned(),
                    parent.spec.note.clone(),
                )])),
                ..ConfigMap::default()
            })
            .status(HelmTestStatus { ok: true }))
    }
}

kuwa_sdk::export_plugin!(Plugin);

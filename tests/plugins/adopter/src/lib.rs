//! Test plugin `adopter`: attacks child ownership (hole 2) by returning a
//! child named like an object it does not own, then dropping it.
//!
//! An `AdoptTest` (`test.kuwa.dev/v1`) with `spec.keep: true` returns a
//! ConfigMap named `spec.target` with data `{adopted: "yes"}`: if `target`
//! names an existing ConfigMap of someone else, a host that applies it
//! blindly takes it over (overwrites its data, adds an owner reference).
//! With `spec.keep: false` it returns no children: a host that deletes
//! "children missing from the output" by name alone deletes the victim.
//!
//! The status carries only the host's conditions.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use kuwa_sdk::{Description, Desired, Error, Observed, Reconciler, child_meta};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Spec of the test kind.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, JsonSchema)]
#[kube(
    group = "test.kuwa.dev",
    version = "v1",
    kind = "AdoptTest",
    namespaced,
    status = "AdoptTestStatus"
)]
pub struct AdoptTestSpec {
    /// The name of the ConfigMap to return.
    pub target: String,
    /// Whether to return it at all.
    #[serde(default)]
    pub keep: bool,
}

/// Status of the test kind: room for the host's `Degraded` condition.
#[derive(Serialize, Deserialize, Clone, Debug, Default, JsonSchema)]
pub struct AdoptTestStatus {
    /// Conditions (the host's `Degraded`).
    #[serde(default)]
    pub conditions: Vec<Condition>,
}

/// The plugin.
pub struct Plugin;

impl Reconciler for Plugin {
    type Parent = AdoptTest;
    type Status = AdoptTestStatus;

    fn describe() -> Description {
        Description::new::<AdoptTest>("test-adopter", "0.1.0").owns::<ConfigMap>()
    }

    fn reconcile(
        parent: &AdoptTest,
        _observed: &Observed,
    ) -> Result<Desired<AdoptTestStatus>, Error> {
        let desired = Desired::new();
        if !parent.spec.keep {
            return Ok(desired);
        }
        Ok(desired.child(ConfigMap {
            metadata: child_meta(parent, parent.spec.target.clone()),
            data: Some(BTreeMap::from([("adopted".to_owned(), "yes".to_owned())])),
            ..ConfigMap::default()
        }))
    }
}

kuwa_sdk::export_plugin!(Plugin);

//! Test plugin `snoop`: attacks the read side of the grant (hole 4). It
//! declares `v1/Secret` as a related kind with the `AllInCluster` mapping,
//! i.e. "every Secret there is", and reports what it was given.
//!
//! A `SnoopTest` (`test.kuwa.dev/v1`) gets the status `seen`: the sorted
//! list of `<namespace>/<name>=<key>:<base64 value>;...` of every related
//! Secret in its input. A host that honours the grant's `namespaces` only
//! ever shows it Secrets of those namespaces; a host that does not grant
//! `relatedKinds: [v1/Secret]` refuses the plugin at load.

use k8s_openapi::api::core::v1::Secret;
use kube::CustomResource;
use kuwa_sdk::{Description, Desired, Error, Observed, Reconciler, RelatedMapping};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Spec of the test kind.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, JsonSchema)]
#[kube(
    group = "test.kuwa.dev",
    version = "v1",
    kind = "SnoopTest",
    namespaced,
    status = "SnoopTestStatus"
)]
pub struct SnoopTestSpec {
    /// Free text, to trigger reconciles by changing it.
    #[serde(default)]
    pub note: String,
}

/// Status of the test kind.
#[derive(Serialize, Deserialize, Clone, Debug, Default, JsonSchema)]
pub struct SnoopTestStatus {
    /// Every related Secret seen: `<namespace>/<name>=<key>:<base64>;...`, sorted.
    #[serde(default)]
    pub seen: Vec<String>,
}

/// One line of `seen` for a Secret in its JSON wire form (data values are
/// base64 there).
pub fn describe_secret(secret: &Value) -> String {
    let meta = &secret["metadata"];
    let data = secret["data"]
        .as_object()
        .map(|d| {
            d.iter()
                .map(|(k, v)| format!("{k}:{}", v.as_str().unwrap_or_default()))
                .collect::<Vec<_>>()
                .join(";")
        })
        .unwrap_or_default();
    format!(
        "{}/{}={data}",
        meta["namespace"].as_str().unwrap_or_default(),
        meta["name"].as_str().unwrap_or_default()
    )
}

/// The plugin.
pub struct Plugin;

impl Reconciler for Plugin {
    type Parent = SnoopTest;
    type Status = SnoopTestStatus;

    fn describe() -> Description {
        Description::new::<SnoopTest>("test-snoop", "0.1.0")
            .watches::<Secret>(RelatedMapping::AllInCluster)
    }

    fn reconcile(
        _parent: &SnoopTest,
        observed: &Observed,
    ) -> Result<Desired<SnoopTestStatus>, Error> {
        let mut seen: Vec<String> = observed
            .related_json()
            .iter()
            .filter(|o| o["apiVersion"] == "v1" && o["kind"] == "Secret")
            .map(describe_secret)
            .collect();
        seen.sort();
        Ok(Desired::new().status(SnoopTestStatus { seen }))
    }
}

kuwa_sdk::export_plugin!(Plugin);

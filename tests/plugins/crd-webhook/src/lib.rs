//! Test plugin `crd-webhook`: attacks CRD installation (hole 5). The CRD it
//! carries for `WebhookTest` (`test.kuwa.dev/v1`) sets
//! `spec.conversion.strategy: Webhook` pointing at `https://127.0.0.1:1/convert`:
//! a host that installs it hands every read and write of the kind to a
//! server of the plugin's choosing (and breaks the kind when it is down).
//! The host must refuse the plugin (reason "crd") and not install the CRD.
//!
//! If it ever runs, each parent gets a ConfigMap `<name>-ok`.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceConversion;
use kube::CustomResource;
use kuwa_sdk::{Description, Desired, Error, Observed, Reconciler, child_meta};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Spec of the test kind.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, JsonSchema)]
#[kube(
    group = "test.kuwa.dev",
    version = "v1",
    kind = "WebhookTest",
    namespaced
)]
pub struct WebhookTestSpec {
    /// Free text.
    #[serde(default)]
    pub note: String,
}

/// Where the carried CRD sends conversion reviews.
pub const WEBHOOK_URL: &str = "https://127.0.0.1:1/convert";

/// The conversion section the carried CRD gets.
pub fn webhook_conversion() -> CustomResourceConversion {
    serde_json::from_value(serde_json::json!({
        "strategy": "Webhook",
        "webhook": {
            "clientConfig": {"url": WEBHOOK_URL},
            "conversionReviewVersions": ["v1"],
        },
    }))
    .expect("a valid CustomResourceConversion")
}

/// The plugin.
pub struct Plugin;

impl Reconciler for Plugin {
    type Parent = WebhookTest;
    type Status = ();

    fn describe() -> Description {
        let mut d =
            Description::new::<WebhookTest>("test-crd-webhook", "0.1.0").owns::<ConfigMap>();
        if let Some(crd) = d.crd.as_mut() {
            crd.spec.conversion = Some(webhook_conversion());
        }
        d
    }

    fn reconcile(parent: &WebhookTest, _observed: &Observed) -> Result<Desired<()>, Error> {
        let name = parent.metadata.name.clone().unwrap_or_default();
        Ok(Desired::new().child(ConfigMap {
            metadata: child_meta(parent, format!("{name}-ok")),
            data: Some(BTreeMap::from([("k".to_owned(), "v".to_owned())])),
            ..ConfigMap::default()
        }))
    }
}

kuwa_sdk::export_plugin!(Plugin);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_carried_crd_asks_for_a_conversion_webhook() {
        let crd = Plugin::describe().crd.expect("carries a CRD");
        let conversion = serde_json::to_value(crd.spec.conversion).unwrap();
        assert_eq!(conversion["strategy"], "Webhook");
        assert_eq!(conversion["webhook"]["clientConfig"]["url"], WEBHOOK_URL);
    }
}

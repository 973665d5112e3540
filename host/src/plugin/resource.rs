//! Plugins installed with `kubectl apply`: the `ClusterPlugin` (cluster
//! scoped, for platform admins) and `Plugin` (namespaced, self-service for
//! a team) custom resources of `kuwa.dev/v1alpha1`. Their CRDs are
//! generated from these types (`kuwa crds --host`, committed in
//! `deploy/crds/`, drift-checked).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::tenant::grant::{Manifest, ManifestLimits};

/// A plugin for the whole cluster, pulled from an OCI registry.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "kuwa.dev",
    version = "v1alpha1",
    kind = "ClusterPlugin",
    status = "PluginStatus",
    shortname = "cplugin",
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Version","type":"string","jsonPath":".status.version"}"#,
    printcolumn = r#"{"name":"Parents","type":"integer","jsonPath":".status.parents"}"#,
    printcolumn = r#"{"name":"Source","type":"string","jsonPath":".spec.source"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ClusterPluginSpec {
    /// Where the component is: `oci://REGISTRY/REPOSITORY:TAG` or
    /// `oci://REGISTRY/REPOSITORY@sha256:DIGEST`. Changing it is a hot swap.
    pub source: String,
    /// What the plugin may do: the fields of a plugin manifest (namespaces,
    /// parentKind, childKinds, relatedKinds, installCrd, limits, budget,
    /// quarantine, outbound). Absent: the tight defaults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grant: Option<Manifest>,
    /// The ServiceAccount whose identity the plugin's writes carry
    /// (impersonated); absent: the host's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account: Option<ServiceAccountRef>,
}

/// A ServiceAccount by namespace and name.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct ServiceAccountRef {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
}

/// A team's plugin, for its own namespace only: it cannot install CRDs
/// (the parent kind's CRD must exist) and its writes carry the identity of
/// a ServiceAccount of the namespace, so the team's own RBAC is the judge.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "kuwa.dev",
    version = "v1alpha1",
    kind = "Plugin",
    namespaced,
    status = "PluginStatus",
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Version","type":"string","jsonPath":".status.version"}"#,
    printcolumn = r#"{"name":"Parents","type":"integer","jsonPath":".status.parents"}"#,
    printcolumn = r#"{"name":"Source","type":"string","jsonPath":".spec.source"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct PluginSpec {
    /// Where the component is, as for a ClusterPlugin.
    pub source: String,
    /// The parent kind, `group/version/Kind` (default: the kind of the CRD
    /// the plugin carries, which must be installed already).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_kind: Option<String>,
    /// Child kinds it may write (default: those it declares).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub child_kinds: Option<Vec<String>>,
    /// Related kinds it may read, in this namespace only (default: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub related_kinds: Option<Vec<String>>,
    /// Sandbox and output limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<ManifestLimits>,
    /// The ServiceAccount of this namespace whose identity its writes carry
    /// (default: `default`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_name: Option<String>,
}

/// What the host says of a plugin object.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PluginStatus {
    /// `Ready` (the version in `version` serves) and `Degraded` (the last
    /// source could not be served; `lastError` says why).
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// The generation these conditions describe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `<plugin>@<version>` now serving.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// The manifest digest of the artifact now serving.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// Parents the plugin serves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parents: Option<i64>,
    /// Why the last source was refused, if it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<LastError>,
}

/// A refused source.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct LastError {
    /// One word: BadSource, PullFailed, NotAComponent, Refused, ...
    pub reason: String,
    /// What happened.
    pub message: String,
}

/// The CRDs of the host's own kinds, as JSON.
pub fn crds() -> Vec<serde_json::Value> {
    use kube::CustomResourceExt;
    [ClusterPlugin::crd(), Plugin::crd()]
        .into_iter()
        .map(|c| serde_json::to_value(c).unwrap_or_default())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_crds_are_structural_and_name_their_kinds() {
        let crds = crds();
        assert_eq!(crds[0]["metadata"]["name"], "clusterplugins.kuwa.dev");
        assert_eq!(crds[0]["spec"]["scope"], "Cluster");
        assert_eq!(crds[1]["metadata"]["name"], "plugins.kuwa.dev");
        assert_eq!(crds[1]["spec"]["scope"], "Namespaced");
        let spec =
            &crds[0]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
        assert_eq!(spec["required"], serde_json::json!(["source"]));
        assert!(spec["properties"]["grant"]["properties"]["childKinds"].is_object());
    }
}

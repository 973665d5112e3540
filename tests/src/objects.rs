//! Reading objects in end-to-end assertions.

use std::time::Duration;

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use kube::api::{Api, ApiResource, DynamicObject, ListParams, ObjectMeta, PostParams};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};

use crate::{E2E_LABEL, wait_for};

/// The status condition `type_` of a custom resource, if it has one.
pub fn condition(object: &DynamicObject, type_: &str) -> Option<Value> {
    object.data["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
        .cloned()
}

/// Whether `meta` has a controller owner reference to `uid`.
pub fn owned_by(meta: &ObjectMeta, uid: &str) -> bool {
    meta.owner_references
        .iter()
        .flatten()
        .any(|o| o.uid == uid && o.controller == Some(true))
}

/// `Kind/name` of every object of `kinds` in `ns` controlled by `uid`.
pub async fn controlled_by(
    client: &Client,
    ns: &str,
    uid: &str,
    kinds: &[ApiResource],
) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for kind in kinds {
        let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, kind);
        for o in api.list(&ListParams::default()).await?.items {
            if owned_by(&o.metadata, uid) {
                out.push(format!("{}/{}", kind.kind, o.name_any()));
            }
        }
    }
    Ok(out)
}

/// `Pod/name` of every Pod in `ns` labelled `app.kubernetes.io/instance=<instance>`.
pub async fn instance_pods(client: &Client, ns: &str, instance: &str) -> Result<Vec<String>> {
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(client.clone(), ns);
    let lp = ListParams::default().labels(&format!("app.kubernetes.io/instance={instance}"));
    Ok(pods
        .list(&lp)
        .await?
        .items
        .iter()
        .map(|p| format!("Pod/{}", p.name_any()))
        .collect())
}

/// The WebServer kind of the shipped plugin (`kuwa.dev/v1alpha1`).
pub fn webserver_resource() -> ApiResource {
    ApiResource {
        group: "kuwa.dev".into(),
        version: "v1alpha1".into(),
        api_version: "kuwa.dev/v1alpha1".into(),
        kind: "WebServer".into(),
        plural: "webservers".into(),
    }
}

/// The WebServers of namespace `ns`.
pub fn webservers(client: &Client, ns: &str) -> Api<DynamicObject> {
    Api::namespaced_with(client.clone(), ns, &webserver_resource())
}

/// A WebServer serving `content` with `replicas` nginx Pods.
pub fn webserver(name: &str, content: &str, replicas: i64) -> Value {
    serde_json::json!({
        "apiVersion": "kuwa.dev/v1alpha1", "kind": "WebServer", "metadata": {"name": name},
        "spec": {"content": content, "replicas": replicas, "software": {"name": "nginx", "version": "1.27"}},
    })
}

/// Sets WebServer `name`'s `spec.content` (a merge patch).
pub async fn set_content(client: &Client, ns: &str, name: &str, content: &str) -> Result<()> {
    use kube::api::{Patch, PatchParams};
    webservers(client, ns)
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"content": content}})),
        )
        .await?;
    Ok(())
}

/// What the ConfigMap `name` (a WebServer's `<name>-content`) serves as
/// `index.html`, if it exists.
pub async fn config_content(client: &Client, ns: &str, name: &str) -> Result<Option<String>> {
    let cms: Api<k8s_openapi::api::core::v1::ConfigMap> = Api::namespaced(client.clone(), ns);
    Ok(cms
        .get_opt(name)
        .await?
        .and_then(|c| c.data)
        .and_then(|d| d.get("index.html").cloned()))
}

/// Waits (at most `timeout`) until the ConfigMap `name` serves `want`.
pub async fn wait_content(
    client: &Client,
    ns: &str,
    name: &str,
    want: &str,
    timeout: std::time::Duration,
) -> Result<()> {
    crate::wait_for(
        &format!("ConfigMap {name} to hold {want:?}"),
        timeout,
        || async move {
            Ok((config_content(client, ns, name).await?.as_deref() == Some(want)).then_some(()))
        },
    )
    .await
}

/// The plugin version (`<plugin>@<version>`) that last reconciled a parent,
/// from the host's `Degraded` condition in `object`'s status (`reconciled by
/// webserver@0.2.0`); None when the host has not said.
pub fn reconciled_by(object: &serde_json::Value) -> Option<&str> {
    object["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == "Degraded" && c["status"] == "False")?["message"]
        .as_str()?
        .strip_prefix("reconciled by ")
}

/// A statically provisioned ReadWriteMany volume bound to claim `claim` in
/// `ns` (the local cluster has no dynamic provisioner). Returns the PV name
/// so the test can delete it (PVs are cluster-scoped).
pub async fn bound_claim(client: &Client, ns: &str, claim: &str) -> Result<String> {
    let pv_name = format!("{ns}-{claim}");
    let pv: PersistentVolume = serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {"name": pv_name, "labels": {E2E_LABEL: "true"}},
        "spec": {
            "capacity": {"storage": "1Gi"},
            "accessModes": ["ReadWriteMany"],
            "persistentVolumeReclaimPolicy": "Retain",
            "storageClassName": "",
            "hostPath": {"path": format!("/tmp/kuwa-e2e/{pv_name}")},
            "claimRef": {"namespace": ns, "name": claim},
        },
    }))?;
    let pvc: PersistentVolumeClaim = serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": claim},
        "spec": {
            "accessModes": ["ReadWriteMany"],
            "storageClassName": "",
            "volumeName": pv_name,
            "resources": {"requests": {"storage": "1Gi"}},
        },
    }))?;
    let pvs: Api<PersistentVolume> = Api::all(client.clone());
    pvs.create(&PostParams::default(), &pv).await?;
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), ns);
    pvcs.create(&PostParams::default(), &pvc).await?;
    wait_for(
        &format!("claim {ns}/{claim} to be Bound"),
        Duration::from_secs(120),
        || {
            let pvcs = pvcs.clone();
            async move {
                let pvc = pvcs.get(claim).await?;
                let phase = pvc.status.and_then(|s| s.phase);
                Ok((phase.as_deref() == Some("Bound")).then_some(()))
            }
        },
    )
    .await?;
    Ok(pv_name)
}

/// Applies a CRD (server-side apply, field manager `e2e`) and waits until
/// it is Established.
pub async fn apply_crd(client: &Client, crd: &Value) -> Result<()> {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    use kube::api::{Patch, PatchParams};
    let crd: CustomResourceDefinition = serde_json::from_value(crd.clone())?;
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let name = crd.metadata.name.clone().unwrap_or_default();
    api.patch(
        &name,
        &PatchParams::apply("e2e").force(),
        &Patch::Apply(&crd),
    )
    .await?;
    wait_for(
        &format!("CRD {name} Established"),
        Duration::from_secs(60),
        || {
            let api = api.clone();
            let name = name.clone();
            async move {
                let crd = api.get(&name).await?;
                let established = crd.status.and_then(|s| s.conditions).is_some_and(|cs| {
                    cs.iter()
                        .any(|c| c.type_ == "Established" && c.status == "True")
                });
                Ok(established.then_some(()))
            }
        },
    )
    .await
}

/// Creates a kwok-managed Node `name` with InternalIP `ip` that nothing is
/// scheduled on (unschedulable and tainted), for tests of node-address
/// logic. The API server keeps the status a Node is created with, and kwok
/// keeps the addresses it finds.
pub async fn create_node(client: &Client, name: &str, ip: &str) -> Result<()> {
    use k8s_openapi::api::core::v1::Node;
    let node: Node = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": {"kuwa.dev/e2e": "true", "type": "kwok"},
            "annotations": {"kwok.x-k8s.io/node": "fake"},
        },
        "spec": {
            "unschedulable": true,
            "taints": [{"key": "kuwa.dev/e2e", "value": "true", "effect": "NoSchedule"}],
        },
        "status": {
            "addresses": [
                {"type": "InternalIP", "address": ip},
                {"type": "Hostname", "address": name},
            ],
        },
    }))?;
    let nodes: Api<Node> = Api::all(client.clone());
    nodes
        .create(&kube::api::PostParams::default(), &node)
        .await
        .with_context(|| format!("creating Node {name}"))?;
    Ok(())
}

/// Deletes Node `name` (absent is fine).
pub async fn delete_node(client: &Client, name: &str) -> Result<()> {
    use k8s_openapi::api::core::v1::Node;
    let nodes: Api<Node> = Api::all(client.clone());
    match nodes
        .delete(name, &kube::api::DeleteParams::default())
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e).with_context(|| format!("deleting Node {name}")),
    }
}

/// The InternalIPs of every Node, as `/32` (or `/128`) CIDRs.
pub async fn node_cidrs(client: &Client) -> Result<Vec<String>> {
    use k8s_openapi::api::core::v1::Node;
    let nodes: Api<Node> = Api::all(client.clone());
    let mut out = Vec::new();
    for node in nodes.list(&Default::default()).await?.items {
        for a in node.status.and_then(|s| s.addresses).unwrap_or_default() {
            if a.type_ == "InternalIP"
                && let Ok(ip) = a.address.parse::<std::net::IpAddr>()
            {
                out.push(format!("{ip}/{}", if ip.is_ipv4() { 32 } else { 128 }));
            }
        }
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// The SecurityPolicy API of namespace `ns`.
pub fn security_policies(client: &Client, ns: &str) -> Api<DynamicObject> {
    let resource = ApiResource {
        group: "kuwa.dev".into(),
        version: "v1alpha1".into(),
        api_version: "kuwa.dev/v1alpha1".into(),
        kind: "SecurityPolicy".into(),
        plural: "securitypolicies".into(),
    };
    Api::namespaced_with(client.clone(), ns, &resource)
}

/// A SecurityPolicy `name` admitting port 443 from the Nodes and `extra`,
/// pushing its allow-list to the firewall at `endpoint`.
pub fn firewall_policy(name: &str, endpoint: &str, extra: &str) -> Value {
    serde_json::json!({
        "apiVersion": "kuwa.dev/v1alpha1", "kind": "SecurityPolicy",
        "metadata": {"name": name},
        "spec": {"ports": [{"port": 443}], "extraCidrs": [extra],
                 "firewall": {"endpoint": endpoint}}
    })
}

//! End-to-end: the `kuwa` host with the Memcached plugin against the real
//! local control plane (issue 4). Each test runs its own host scoped to its
//! own namespace.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service};
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, ListParams, Patch, PatchParams};
use kube::{Client, ResourceExt};
use kuwa_e2e::host::{KuwaHost, apply_json, plugin, yaml_file};
use kuwa_e2e::objects::{condition, controlled_by, instance_pods, owned_by};
use kuwa_e2e::{TestNamespace, client, wait_for};
use serde_json::{Value, json};

const CONVERGE: Duration = Duration::from_secs(120);
/// The garbage collector learns a new CRD's kind only at its periodic
/// discovery refresh (~20–30 s), so cascades of a fresh CRD take that long.
const GARBAGE_COLLECT: Duration = Duration::from_secs(150);
const CONFIG_HASH: &str = "kuwa.dev/config-hash";
const SAMPLE: &str = "memcached-sample";

fn memcached_resource() -> ApiResource {
    ApiResource {
        group: "kuwa.dev".into(),
        version: "v1alpha1".into(),
        api_version: "kuwa.dev/v1alpha1".into(),
        kind: "Memcached".into(),
        plural: "memcacheds".into(),
    }
}

fn memcacheds(client: &Client, ns: &str) -> Api<DynamicObject> {
    Api::namespaced_with(client.clone(), ns, &memcached_resource())
}

fn memcached(name: &str, replicas: i64, topology: &str) -> Value {
    json!({
        "apiVersion": "kuwa.dev/v1alpha1",
        "kind": "Memcached",
        "metadata": {"name": name},
        "spec": {"replicas": replicas, "memoryMB": 16, "topology": topology, "proxy": {"replicas": 1}},
    })
}

fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn pod_ip(pod: &Pod) -> Option<String> {
    pod.status
        .as_ref()?
        .pod_ip
        .clone()
        .filter(|ip| !ip.is_empty())
}

/// The backend Pods of Memcached `name` that exist right now (not being
/// deleted), by ordinal.
async fn backend_pods(client: &Client, ns: &str, name: &str) -> Result<Vec<(u32, Pod)>> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let list = pods
        .list(&ListParams::default().labels(&format!(
            "app.kubernetes.io/instance={name},app.kubernetes.io/component=backend"
        )))
        .await?;
    let mut out: Vec<(u32, Pod)> = list
        .items
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter_map(|p| {
            let ordinal = p
                .name_any()
                .strip_prefix(&format!("{name}-"))?
                .parse()
                .ok()?;
            Some((ordinal, p))
        })
        .collect();
    out.sort_by_key(|(o, _)| *o);
    Ok(out)
}

/// `ip:11211` of every ready backend Pod with an IP, in ordinal order: what
/// the proxy configuration should list.
async fn ready_endpoints(client: &Client, ns: &str, name: &str) -> Result<Vec<String>> {
    Ok(backend_pods(client, ns, name)
        .await?
        .iter()
        .filter(|(_, p)| is_ready(p))
        .filter_map(|(_, p)| pod_ip(p))
        .map(|ip| format!("{ip}:11211"))
        .collect())
}

/// The proxy ConfigMap's `config.json`, parsed.
async fn proxy_config(client: &Client, ns: &str, name: &str) -> Result<Value> {
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    let cm = cms.get(&format!("{name}-proxy")).await?;
    let text = cm
        .data
        .unwrap_or_default()
        .remove("config.json")
        .context("the proxy ConfigMap has no config.json")?;
    Ok(serde_json::from_str(&text)?)
}

fn servers(config: &Value) -> Vec<String> {
    serde_json::from_value(config["pools"]["backends"]["servers"].clone()).unwrap_or_default()
}

/// Waits until the proxy configuration lists exactly the `count` ready
/// backend Pods (compared with the Pods' own IPs) and the Memcached's status
/// reports the same endpoints; returns the configuration.
async fn wait_config_matches_pods(
    client: &Client,
    ns: &str,
    name: &str,
    count: usize,
) -> Result<Value> {
    let api = memcacheds(client, ns);
    wait_for(
        &format!("the proxy config of {ns}/{name} to list the {count} ready backend Pods"),
        CONVERGE,
        || {
            let api = api.clone();
            async move {
                let endpoints = ready_endpoints(client, ns, name).await?;
                let config = proxy_config(client, ns, name).await?;
                let mc = api.get(name).await?;
                let status_endpoints: Vec<String> =
                    serde_json::from_value(mc.data["status"]["endpoints"].clone())
                        .unwrap_or_default();
                let ok = endpoints.len() == count
                    && servers(&config) == endpoints
                    && status_endpoints == endpoints
                    && mc.data["status"]["readyBackends"] == count;
                Ok(ok.then_some(config))
            }
        },
    )
    .await
}

/// Waits until the Memcached is current, `Available=True` and
/// `Progressing=False` (backends ready, proxy rolled out).
async fn wait_converged(client: &Client, ns: &str, name: &str) -> Result<DynamicObject> {
    let api = memcacheds(client, ns);
    wait_for(
        &format!("Memcached {ns}/{name} to converge"),
        CONVERGE,
        || {
            let api = api.clone();
            async move {
                let mc = api.get(name).await?;
                let current =
                    mc.data["status"]["observedGeneration"].as_i64() == mc.metadata.generation;
                let available = condition(&mc, "Available").is_some_and(|c| c["status"] == "True");
                let done = condition(&mc, "Progressing").is_some_and(|c| c["status"] == "False");
                Ok((current && available && done).then_some(mc))
            }
        },
    )
    .await
}

fn template_hash(d: &Deployment) -> Option<String> {
    d.spec
        .as_ref()?
        .template
        .metadata
        .as_ref()?
        .annotations
        .as_ref()?
        .get(CONFIG_HASH)
        .cloned()
}

async fn replicaset_names(client: &Client, ns: &str) -> Result<BTreeSet<String>> {
    let replicasets: Api<ReplicaSet> = Api::namespaced(client.clone(), ns);
    Ok(replicasets
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .map(|r| r.name_any())
        .collect())
}

/// Waits until the proxy Deployment's config hash differs from `old_hash`
/// and a ReplicaSet not in `old_rs` exists (the proxy rolls); returns the
/// new hash.
async fn wait_proxy_rolled(
    client: &Client,
    ns: &str,
    name: &str,
    old_hash: &str,
    old_rs: &BTreeSet<String>,
) -> Result<String> {
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), ns);
    wait_for(
        &format!("the proxy of {ns}/{name} to roll with a new config hash"),
        CONVERGE,
        || {
            let deployments = deployments.clone();
            async move {
                let d = deployments.get(&format!("{name}-proxy")).await?;
                let hash = template_hash(&d).context("the proxy template has no config hash")?;
                let rs = replicaset_names(client, ns).await?;
                Ok((hash != old_hash && !rs.is_subset(old_rs)).then_some(hash))
            }
        },
    )
    .await
}

async fn proxy_hash(client: &Client, ns: &str, name: &str) -> Result<String> {
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), ns);
    template_hash(&deployments.get(&format!("{name}-proxy")).await?)
        .context("the proxy template has no config hash")
}

/// Sets the Ready condition of a Pod through its status subresource (what
/// the kubelet would do; kwok only readies Pending Pods, so it stays).
async fn set_pod_ready(client: &Client, ns: &str, pod: &str, ready: bool) -> Result<()> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let status = if ready { "True" } else { "False" };
    pods.patch_status(
        pod,
        &PatchParams::default(),
        &Patch::Strategic(json!({"status": {"conditions": [
            {"type": "Ready", "status": status},
            {"type": "ContainersReady", "status": status},
        ]}})),
    )
    .await?;
    Ok(())
}

/// Done-when 1: the sample's proxy config lists exactly the ready backends;
/// scaling rewrites it and rolls the proxy; an unready backend leaves the
/// config until it is ready again; a deleted one is replaced by its successor.
#[tokio::test(flavor = "multi_thread")]
async fn proxy_config_follows_the_ready_backends() -> Result<()> {
    let client = client().await?;
    let ns = TestNamespace::new(&client, "mc-sample").await?;
    let host = KuwaHost::start(&ns.name, &[plugin("memcached")?], &[]).await?;
    let n = ns.name.as_str();
    apply_json(
        &client,
        n,
        &yaml_file("deploy/samples/kuwa.dev_v1alpha1_memcached.yaml")?,
    )
    .await?;

    // Three ready backends, exactly those in the config.
    let config = wait_config_matches_pods(&client, n, SAMPLE, 3).await?;
    assert_eq!(
        config["route"], "PoolRoute|backends",
        "the sample is sharded"
    );
    let mc = wait_converged(&client, n, SAMPLE).await?;
    let uid = mc.uid().context("uid")?;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), n);
    assert!(owned_by(
        &cms.get(&format!("{SAMPLE}-proxy")).await?.metadata,
        &uid
    ));
    let ips: BTreeSet<String> = backend_pods(&client, n, SAMPLE)
        .await?
        .iter()
        .filter_map(|(_, p)| pod_ip(p))
        .collect();
    assert_eq!(ips.len(), 3, "3 backend Pods with distinct IPs: {ips:?}");

    // Scale to 5: the config lists 5 and the proxy rolls.
    let hash_3 = proxy_hash(&client, n, SAMPLE).await?;
    let rs_3 = replicaset_names(&client, n).await?;
    memcacheds(&client, n)
        .patch(
            SAMPLE,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 5}})),
        )
        .await?;
    let config = wait_config_matches_pods(&client, n, SAMPLE, 5).await?;
    wait_proxy_rolled(&client, n, SAMPLE, &hash_3, &rs_3).await?;
    assert_eq!(servers(&config).len(), 5);
    // Rolled out: the proxy runs the hash of the 5-backend config (read only
    // now, so an intermediate 4-backend config cannot be mistaken for it).
    wait_converged(&client, n, SAMPLE).await?;
    let hash_5 = proxy_hash(&client, n, SAMPLE).await?;

    // Backend 2 turns unready: it leaves the config and the proxy rolls.
    let pods = backend_pods(&client, n, SAMPLE).await?;
    let (_, victim) = pods
        .iter()
        .find(|(o, _)| *o == 2)
        .context("backend 2 exists")?;
    let victim_name = victim.name_any();
    let victim_endpoint = format!("{}:11211", pod_ip(victim).context("backend 2 has an IP")?);
    let rs_5 = replicaset_names(&client, n).await?;
    set_pod_ready(&client, n, &victim_name, false).await?;
    let config = wait_config_matches_pods(&client, n, SAMPLE, 4).await?;
    assert!(
        !servers(&config).contains(&victim_endpoint),
        "{victim_endpoint} left the config: {config}"
    );
    let pods_api: Api<Pod> = Api::namespaced(client.clone(), n);
    assert!(
        !is_ready(&pods_api.get(&victim_name).await?),
        "kwok must not flip the Pod back to ready by itself"
    );
    let hash_4 = wait_proxy_rolled(&client, n, SAMPLE, &hash_5, &rs_5).await?;
    let mc = memcacheds(&client, n).get(SAMPLE).await?;
    assert_eq!(mc.data["status"]["readyBackends"], 4);

    // Ready again: back in the config, and the same backends give the same hash.
    let rs_4 = replicaset_names(&client, n).await?;
    set_pod_ready(&client, n, &victim_name, true).await?;
    let config = wait_config_matches_pods(&client, n, SAMPLE, 5).await?;
    assert!(servers(&config).contains(&victim_endpoint));
    let hash_back = wait_for("the proxy hash to change back", CONVERGE, || {
        let client = client.clone();
        let hash_4 = hash_4.clone();
        async move {
            let h = proxy_hash(&client, n, SAMPLE).await?;
            Ok((h != hash_4).then_some(h))
        }
    })
    .await?;
    assert_eq!(
        hash_back, hash_5,
        "the same 5 backends give the same config"
    );
    assert!(replicaset_names(&client, n).await?.is_superset(&rs_4));

    // A deleted backend Pod: the config ends up listing its replacement.
    let old_uid = victim.uid().context("uid")?;
    pods_api
        .delete(&victim_name, &DeleteParams::default())
        .await?;
    wait_for("backend 2 to be replaced", CONVERGE, || {
        let pods_api = pods_api.clone();
        let (victim_name, old_uid) = (victim_name.clone(), old_uid.clone());
        async move {
            Ok(pods_api
                .get_opt(&victim_name)
                .await?
                .filter(|p| p.uid().as_deref() != Some(old_uid.as_str()) && is_ready(p))
                .map(|_| ()))
        }
    })
    .await?;
    wait_config_matches_pods(&client, n, SAMPLE, 5).await?;
    wait_converged(&client, n, SAMPLE).await?;
    assert_no_errors(&host).await?;
    drop(host);
    ns.cleanup().await;
    Ok(())
}

/// Done-when 2: switching the topology rewrites the route (and rolls the
/// proxy); switching back gives the original config again.
#[tokio::test(flavor = "multi_thread")]
async fn switching_topology_rewrites_the_route() -> Result<()> {
    let client = client().await?;
    let ns = TestNamespace::new(&client, "mc-topology").await?;
    let host = KuwaHost::start(&ns.name, &[plugin("memcached")?], &[]).await?;
    let n = ns.name.as_str();
    apply_json(&client, n, &memcached("cache", 2, "sharded")).await?;
    let sharded = wait_config_matches_pods(&client, n, "cache", 2).await?;
    assert_eq!(
        sharded,
        json!({
            "pools": {"backends": {"servers": servers(&sharded)}},
            "route": "PoolRoute|backends",
        })
    );
    wait_converged(&client, n, "cache").await?;
    let sharded_hash = proxy_hash(&client, n, "cache").await?;
    let rs = replicaset_names(&client, n).await?;

    memcacheds(&client, n)
        .patch(
            "cache",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"topology": "replicated"}})),
        )
        .await?;
    let replicated = wait_for("the config to be replicated", CONVERGE, || {
        let client = client.clone();
        async move {
            let config = proxy_config(&client, n, "cache").await?;
            Ok(config["route"].is_object().then_some(config))
        }
    })
    .await?;
    let all = "AllSyncRoute|Pool|backends";
    assert_eq!(
        replicated["route"],
        json!({
            "type": "OperationSelectorRoute",
            "default_policy": all,
            "operation_policies": {
                "add": all, "delete": all, "set": all,
                "get": "LatestRoute|Pool|backends",
            },
        })
    );
    assert_eq!(
        servers(&replicated),
        servers(&sharded),
        "same backends, new route"
    );
    wait_config_matches_pods(&client, n, "cache", 2).await?;
    let replicated_hash = wait_proxy_rolled(&client, n, "cache", &sharded_hash, &rs).await?;
    wait_converged(&client, n, "cache").await?;

    memcacheds(&client, n)
        .patch(
            "cache",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"topology": "sharded"}})),
        )
        .await?;
    wait_for("the config to be sharded again", CONVERGE, || {
        let client = client.clone();
        async move {
            let config = proxy_config(&client, n, "cache").await?;
            Ok((config["route"] == "PoolRoute|backends").then_some(()))
        }
    })
    .await?;
    let back = wait_for("the proxy hash to change back", CONVERGE, || {
        let client = client.clone();
        let replicated_hash = replicated_hash.clone();
        async move {
            let h = proxy_hash(&client, n, "cache").await?;
            Ok((h != replicated_hash).then_some(h))
        }
    })
    .await?;
    assert_eq!(back, sharded_hash, "same backends and route, same config");
    wait_converged(&client, n, "cache").await?;
    assert_no_errors(&host).await?;
    drop(host);
    ns.cleanup().await;
    Ok(())
}

/// Done-when 3: with nothing changing, a forced resync of 20 converged
/// Memcacheds reconciles all of them and writes nothing.
#[tokio::test(flavor = "multi_thread")]
async fn steady_state_resync_writes_nothing() -> Result<()> {
    const COUNT: usize = 20;
    let client = client().await?;
    let ns = TestNamespace::new(&client, "mc-steady").await?;
    let host = KuwaHost::start(
        &ns.name,
        &[plugin("memcached")?],
        &["--plugin-concurrency", "8"],
    )
    .await?;
    let n = ns.name.as_str();
    for i in 0..COUNT {
        apply_json(&client, n, &memcached(&format!("mc-{i}"), 1, "sharded")).await?;
    }
    for i in 0..COUNT {
        let name = format!("mc-{i}");
        wait_config_matches_pods(&client, n, &name, 1).await?;
        wait_converged(&client, n, &name).await?;
    }
    let writes = host.forced_resync_writes("memcached", COUNT, 1).await?;
    assert_eq!(
        writes,
        0.0,
        "a steady-state resync must not write; metrics:\n{}",
        host.write_metrics().await?
    );
    assert_no_errors(&host).await?;
    drop(host);
    ns.cleanup().await;
    Ok(())
}

/// Done-when 6 (Memcached): deleting the parent removes all its children and
/// their Pods.
#[tokio::test(flavor = "multi_thread")]
async fn deleting_a_memcached_removes_its_children() -> Result<()> {
    let client = client().await?;
    let ns = TestNamespace::new(&client, "mc-delete").await?;
    let host = KuwaHost::start(&ns.name, &[plugin("memcached")?], &[]).await?;
    let n = ns.name.as_str();
    apply_json(&client, n, &memcached("gone", 2, "replicated")).await?;
    wait_config_matches_pods(&client, n, "gone", 2).await?;
    let mc = wait_converged(&client, n, "gone").await?;
    let uid = mc.uid().context("uid")?;

    let before = remaining_children(&client, n, &uid, "gone").await?;
    let kinds: BTreeSet<&str> = before
        .iter()
        .map(String::as_str)
        .filter(|c| !c.starts_with("Pod/"))
        .collect();
    assert_eq!(
        kinds,
        BTreeSet::from([
            "ConfigMap/gone-proxy",
            "Deployment/gone-proxy",
            "Service/gone",
            "Service/gone-backends",
            "StatefulSet/gone",
        ])
    );
    assert!(before.iter().filter(|c| c.starts_with("Pod/")).count() >= 3);

    memcacheds(&client, n)
        .delete("gone", &DeleteParams::default())
        .await?;
    let gone = wait_for(
        "every child and Pod of the deleted Memcached to be gone",
        GARBAGE_COLLECT,
        || {
            let (client, uid) = (client.clone(), uid.clone());
            async move {
                let left = remaining_children(&client, n, &uid, "gone").await?;
                Ok(left.is_empty().then_some(()))
            }
        },
    )
    .await;
    if let Err(e) = gone {
        bail!(
            "{e:#}; still there: {:?}",
            remaining_children(&client, n, &uid, "gone").await?
        );
    }
    assert_no_errors(&host).await?;
    drop(host);
    ns.cleanup().await;
    Ok(())
}

/// What of the parent `uid` (named `name`) is still there: its controlled
/// children, and the Pods labelled as its instance.
async fn remaining_children(
    client: &Client,
    ns: &str,
    uid: &str,
    name: &str,
) -> Result<Vec<String>> {
    let mut out = controlled_by(
        client,
        ns,
        uid,
        &[
            ApiResource::erase::<StatefulSet>(&()),
            ApiResource::erase::<Service>(&()),
            ApiResource::erase::<ConfigMap>(&()),
            ApiResource::erase::<Deployment>(&()),
        ],
    )
    .await?;
    out.extend(instance_pods(client, ns, name).await?);
    Ok(out)
}

/// Fails when the host counted any failed reconcile of the plugin (with the
/// log tail, to see why).
async fn assert_no_errors(host: &KuwaHost) -> Result<()> {
    let errors = host
        .metric("kuwa_reconcile_errors_total", &[("plugin", "memcached")])
        .await?;
    if errors != 0.0 {
        bail!(
            "{errors} failed reconciles; kuwa log:\n{}",
            host.log_tail(60)
        );
    }
    Ok(())
}

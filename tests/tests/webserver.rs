//! End-to-end: the `kuwa` host with the WebServer plugin against the real
//! local control plane (issue 3). Each test runs its own host scoped to its
//! own namespace.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service};
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, ListParams, Patch, PatchParams};
use kube::{Client, ResourceExt};
use kuwa_e2e::host::{KuwaHost, apply_json, plugin, test_plugin, yaml_file};
use kuwa_e2e::objects::{condition, controlled_by, owned_by, webserver, webservers};
use kuwa_e2e::{TestNamespace, client, wait_for};
use serde_json::{Value, json};

const CONVERGE: Duration = Duration::from_secs(120);
/// The garbage collector learns a new CRD's kind only at its periodic
/// discovery refresh (~20–30 s), so cascades of a fresh CRD take that long.
const GARBAGE_COLLECT: Duration = Duration::from_secs(150);

/// Waits until the WebServer reports `ready` ready replicas, `Available=True`
/// and the current generation.
async fn wait_available(
    client: &Client,
    ns: &str,
    name: &str,
    ready: i64,
) -> Result<DynamicObject> {
    let api = webservers(client, ns);
    wait_for(
        &format!("WebServer {ns}/{name} Available with {ready} ready"),
        CONVERGE,
        || {
            let api = api.clone();
            async move {
                let ws = api.get(name).await?;
                let status = &ws.data["status"];
                let current = status["observedGeneration"].as_i64() == ws.metadata.generation;
                let available = condition(&ws, "Available").is_some_and(|c| c["status"] == "True");
                Ok((current && available && status["readyReplicas"] == ready).then_some(ws))
            }
        },
    )
    .await
}

async fn running_pods(client: &Client, ns: &str, instance: &str) -> Result<Vec<Pod>> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let list = pods
        .list(&ListParams::default().labels(&format!("app.kubernetes.io/instance={instance}")))
        .await?;
    Ok(list
        .items
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
        .collect())
}

async fn warning_events(client: &Client, ns: &str, name: &str, reason: &str) -> Result<usize> {
    let events: Api<Event> = Api::namespaced(client.clone(), ns);
    Ok(events
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
        .filter(|e| e.reason.as_deref() == Some(reason) && e.type_.as_deref() == Some("Warning"))
        .count())
}

/// Done-when 1 and 2: the sample converges; content and replica changes roll out.
#[tokio::test(flavor = "multi_thread")]
async fn sample_converges_and_changes_roll_out() -> Result<()> {
    let client = client().await?;
    let ns = TestNamespace::new(&client, "ws-sample").await?;
    let host = KuwaHost::start(&ns.name, &[plugin("webserver")?], &[]).await?;
    let sample = yaml_file("deploy/samples/kuwa.dev_v1alpha1_webserver.yaml")?;
    apply_json(&client, &ns.name, &sample).await?;

    let ws = wait_available(&client, &ns.name, "webserver-sample", 3).await?;
    let uid = ws.uid().context("uid")?;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns.name);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    let services: Api<Service> = Api::namespaced(client.clone(), &ns.name);
    let cm = cms.get("webserver-sample-content").await?;
    assert!(owned_by(&cm.metadata, &uid));
    assert_eq!(cm.data.as_ref().unwrap()["index.html"], "hello, ossummit!");
    let deployment = deployments.get("webserver-sample").await?;
    assert!(owned_by(&deployment.metadata, &uid));
    assert_eq!(
        deployment.status.as_ref().and_then(|s| s.ready_replicas),
        Some(3)
    );
    assert!(owned_by(
        &services.get("webserver-sample").await?.metadata,
        &uid
    ));
    let pods = running_pods(&client, &ns.name, "webserver-sample").await?;
    assert_eq!(pods.len(), 3, "3 Pods Running on kwok nodes");
    assert!(pods.iter().all(|p| {
        p.spec
            .as_ref()
            .and_then(|s| s.node_name.as_deref())
            .is_some_and(|n| n.starts_with("kwok-"))
    }));
    assert_eq!(
        ws.data["status"]["observedGeneration"].as_i64(),
        ws.metadata.generation
    );

    // A content change rewrites the ConfigMap and rolls the Pods.
    let template_hash = |d: &Deployment| {
        d.spec
            .as_ref()
            .unwrap()
            .template
            .metadata
            .as_ref()
            .unwrap()
            .annotations
            .as_ref()
            .unwrap()["kuwa.dev/content-hash"]
            .clone()
    };
    let old_hash = template_hash(&deployment);
    let replicasets: Api<ReplicaSet> = Api::namespaced(client.clone(), &ns.name);
    let rs_names = |list: Vec<ReplicaSet>| {
        list.into_iter()
            .map(|r| r.name_any())
            .collect::<BTreeSet<_>>()
    };
    let old_rs = rs_names(replicasets.list(&ListParams::default()).await?.items);
    let api = webservers(&client, &ns.name);
    api.patch(
        "webserver-sample",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"content": "hello again"}})),
    )
    .await?;
    wait_for("the ConfigMap to carry the new content", CONVERGE, || {
        let cms = cms.clone();
        async move {
            Ok((cms
                .get("webserver-sample-content")
                .await?
                .data
                .unwrap_or_default()["index.html"]
                == "hello again")
                .then_some(()))
        }
    })
    .await?;
    let rolled = wait_for("a new ReplicaSet for the new content", CONVERGE, || {
        let (deployments, replicasets, old_rs, old_hash) = (
            deployments.clone(),
            replicasets.clone(),
            old_rs.clone(),
            old_hash.clone(),
        );
        async move {
            let d = deployments.get("webserver-sample").await?;
            let new_rs = rs_names(replicasets.list(&ListParams::default()).await?.items);
            Ok((template_hash(&d) != old_hash && !new_rs.is_subset(&old_rs)).then_some(d))
        }
    })
    .await?;
    assert_ne!(template_hash(&rolled), old_hash);
    wait_available(&client, &ns.name, "webserver-sample", 3).await?;

    // Scaling to 5 gives 5 ready.
    api.patch(
        "webserver-sample",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"replicas": 5}})),
    )
    .await?;
    wait_available(&client, &ns.name, "webserver-sample", 5).await?;
    assert_eq!(
        running_pods(&client, &ns.name, "webserver-sample")
            .await?
            .len(),
        5
    );
    drop(host);
    ns.cleanup().await;
    Ok(())
}

/// Done-when 3: a child deleted by hand comes back; deleting the WebServer
/// removes every child.
#[tokio::test(flavor = "multi_thread")]
async fn children_are_recreated_and_garbage_collected() -> Result<()> {
    let client = client().await?;
    let ns = TestNamespace::new(&client, "ws-children").await?;
    let host = KuwaHost::start(&ns.name, &[plugin("webserver")?], &[]).await?;
    apply_json(&client, &ns.name, &webserver("site", "<h1>hi</h1>", 2)).await?;
    let ws = wait_available(&client, &ns.name, "site", 2).await?;
    let uid = ws.uid().context("uid")?;

    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns.name);
    let services: Api<Service> = Api::namespaced(client.clone(), &ns.name);
    let old_cm = cms.get("site-content").await?.uid();
    let old_svc = services.get("site").await?.uid();
    cms.delete("site-content", &DeleteParams::default()).await?;
    services.delete("site", &DeleteParams::default()).await?;
    wait_for("the deleted children to be recreated", CONVERGE, || {
        let (cms, services, old_cm, old_svc) = (
            cms.clone(),
            services.clone(),
            old_cm.clone(),
            old_svc.clone(),
        );
        async move {
            let cm = cms.get_opt("site-content").await?;
            let svc = services.get_opt("site").await?;
            Ok(match (cm, svc) {
                (Some(cm), Some(svc)) if cm.uid() != old_cm && svc.uid() != old_svc => Some(()),
                _ => None,
            })
        }
    })
    .await?;

    webservers(&client, &ns.name)
        .delete("site", &DeleteParams::default())
        .await?;
    let kinds = [
        ApiResource::erase::<ConfigMap>(&()),
        ApiResource::erase::<Service>(&()),
        ApiResource::erase::<Deployment>(&()),
    ];
    wait_for(
        "every child of the deleted WebServer to be gone",
        GARBAGE_COLLECT,
        || {
            let (client, ns, uid, kinds) =
                (client.clone(), ns.name.clone(), uid.clone(), kinds.clone());
            async move {
                Ok(controlled_by(&client, &ns, &uid, &kinds)
                    .await?
                    .is_empty()
                    .then_some(()))
            }
        },
    )
    .await?;
    wait_for("the WebServer's Pods to be gone", GARBAGE_COLLECT, || {
        let client = client.clone();
        let ns = ns.name.clone();
        async move {
            Ok(running_pods(&client, &ns, "site")
                .await?
                .is_empty()
                .then_some(()))
        }
    })
    .await?;
    drop(host);
    ns.cleanup().await;
    Ok(())
}

/// Done-when 4: with the world unchanged, 3 forced resyncs of 50 converged
/// WebServers make zero API writes (the host's own counter).
#[tokio::test(flavor = "multi_thread")]
async fn steady_state_resyncs_write_nothing() -> Result<()> {
    const COUNT: usize = 50;
    let client = client().await?;
    let ns = TestNamespace::new(&client, "ws-steady").await?;
    let host = KuwaHost::start(
        &ns.name,
        &[plugin("webserver")?],
        &["--plugin-concurrency", "8"],
    )
    .await?;
    for i in 0..COUNT {
        apply_json(
            &client,
            &ns.name,
            &webserver(&format!("ws-{i}"), &format!("page {i}"), 1),
        )
        .await?;
    }
    for i in 0..COUNT {
        wait_available(&client, &ns.name, &format!("ws-{i}"), 1).await?;
    }
    let writes = host.forced_resync_writes("webserver", COUNT, 3).await?;
    let resyncs = host
        .metric("kuwa_resyncs_total", &[("plugin", "webserver")])
        .await?;
    assert!(resyncs >= 3.0, "3 forced resyncs counted, got {resyncs}");
    assert_eq!(
        writes,
        0.0,
        "steady-state resyncs must not write; metrics:\n{}",
        host.write_metrics().await?
    );
    drop(host);
    ns.cleanup().await;
    Ok(())
}

/// Done-when 5: an invalid spec gives `Degraded=True` with a reason, nothing
/// is applied, the host keeps running; fixing the spec recovers.
#[tokio::test(flavor = "multi_thread")]
async fn invalid_spec_degrades_and_applies_nothing() -> Result<()> {
    let client = client().await?;
    let ns = TestNamespace::new(&client, "ws-invalid").await?;
    let mut host = KuwaHost::start(&ns.name, &[plugin("webserver")?], &[]).await?;
    let api = webservers(&client, &ns.name);
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns.name);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);

    // Content over the ConfigMap limit: never applicable.
    let too_big = "x".repeat(1024 * 1024 + 10);
    apply_json(&client, &ns.name, &webserver("huge", &too_big, 1)).await?;
    let degraded = wait_for("huge to be Degraded", CONVERGE, || {
        let api = api.clone();
        async move {
            let ws = api.get("huge").await?;
            Ok(condition(&ws, "Degraded").filter(|c| c["status"] == "True"))
        }
    })
    .await?;
    assert_eq!(degraded["reason"], "InvalidSpec");
    assert!(
        degraded["message"]
            .as_str()
            .unwrap_or_default()
            .contains("ConfigMap"),
        "{degraded}"
    );
    assert!(
        cms.get_opt("huge-content").await?.is_none(),
        "no ConfigMap half-applied"
    );
    assert!(
        deployments.get_opt("huge").await?.is_none(),
        "no Deployment half-applied"
    );
    assert_eq!(
        warning_events(&client, &ns.name, "huge", "InvalidSpec").await?,
        1
    );

    // A working WebServer whose spec turns invalid keeps its children as they were.
    apply_json(&client, &ns.name, &webserver("site", "v1", 1)).await?;
    wait_available(&client, &ns.name, "site", 1).await?;
    api.patch(
        "site",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"content": too_big}})),
    )
    .await?;
    wait_for("site to be Degraded", CONVERGE, || {
        let api = api.clone();
        async move {
            let ws = api.get("site").await?;
            Ok(condition(&ws, "Degraded")
                .filter(|c| c["status"] == "True" && c["reason"] == "InvalidSpec")
                .map(|_| ()))
        }
    })
    .await?;
    assert_eq!(
        cms.get("site-content").await?.data.unwrap_or_default()["index.html"],
        "v1",
        "old content kept"
    );
    assert!(deployments.get_opt("site").await?.is_some());

    // Fixing the spec recovers.
    api.patch(
        "site",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"content": "v2"}})),
    )
    .await?;
    let ws = wait_available(&client, &ns.name, "site", 1).await?;
    assert_eq!(condition(&ws, "Degraded").unwrap()["status"], "False");
    assert_eq!(
        cms.get("site-content").await?.data.unwrap_or_default()["index.html"],
        "v2"
    );
    assert!(host.is_running(), "the host keeps running");
    drop(host);
    ns.cleanup().await;
    Ok(())
}

fn test_object(kind: &str, name: &str) -> Value {
    json!({"apiVersion": "test.kuwa.dev/v1", "kind": kind, "metadata": {"name": name}, "spec": {"note": "x"}})
}

/// Done-when 6: plugins that trap, loop forever, exhaust memory or return
/// garbage fail only their own keys; WebServers keep converging meanwhile.
#[tokio::test(flavor = "multi_thread")]
async fn misbehaving_plugins_fail_only_their_keys() -> Result<()> {
    let client = client().await?;
    let ns = TestNamespace::new(&client, "ws-faults").await?;
    let plugins = [
        plugin("webserver")?,
        test_plugin("trap")?,
        test_plugin("spin")?,
        test_plugin("garbage")?,
        test_plugin("hog")?,
    ];
    let mut host = KuwaHost::start(&ns.name, &plugins, &["--call-deadline", "300ms"]).await?;
    for (kind, name) in [
        ("TrapTest", "t"),
        ("SpinTest", "s"),
        ("GarbageTest", "g"),
        ("HogTest", "h"),
    ] {
        apply_json(&client, &ns.name, &test_object(kind, name)).await?;
    }
    apply_json(&client, &ns.name, &webserver("site", "first", 2)).await?;

    // Every bad plugin fails, for the right reason, and keeps being retried.
    for (plugin, reason) in [
        ("test-trap", "trap"),
        ("test-spin", "timeout"),
        ("test-garbage", "invalid_output"),
        ("test-hog", "memory"),
    ] {
        wait_for(
            &format!("{plugin} to fail twice with {reason}"),
            CONVERGE,
            || {
                let host = &host;
                async move {
                    let n = host
                        .metric(
                            "kuwa_reconcile_errors_total",
                            &[("plugin", plugin), ("reason", reason)],
                        )
                        .await?;
                    Ok((n >= 2.0).then_some(()))
                }
            },
        )
        .await?;
    }
    // Meanwhile WebServers converge and follow changes.
    wait_available(&client, &ns.name, "site", 2).await?;
    webservers(&client, &ns.name)
        .patch(
            "site",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"content": "second", "replicas": 3}})),
        )
        .await?;
    wait_available(&client, &ns.name, "site", 3).await?;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns.name);
    assert_eq!(
        cms.get("site-content").await?.data.unwrap_or_default()["index.html"],
        "second"
    );
    assert_eq!(
        host.metric("kuwa_reconcile_errors_total", &[("plugin", "webserver")])
            .await?,
        0.0
    );

    // The failures are visible where a user looks: Events on the objects.
    wait_for(
        "a PluginFailed event on the trapping object",
        CONVERGE,
        || {
            let client = client.clone();
            let ns = ns.name.clone();
            async move {
                Ok((warning_events(&client, &ns, "t", "PluginFailed").await? > 0).then_some(()))
            }
        },
    )
    .await?;
    wait_for(
        "an InvalidOutput event on the garbage object",
        CONVERGE,
        || {
            let client = client.clone();
            let ns = ns.name.clone();
            async move {
                Ok((warning_events(&client, &ns, "g", "InvalidOutput").await? > 0).then_some(()))
            }
        },
    )
    .await?;
    // Nothing of the garbage was applied.
    let cm_names: Vec<String> = cms
        .list(&ListParams::default())
        .await?
        .items
        .iter()
        .map(|c| c.name_any())
        .collect();
    assert_eq!(
        cm_names
            .iter()
            .filter(|n| n.as_str() != "kube-root-ca.crt" && n.as_str() != "site-content")
            .count(),
        0,
        "{cm_names:?}"
    );
    assert!(host.is_running(), "the host survives every fault");
    let log = host.log();
    if log.contains("panicked at") && !log.contains("test-trap panics on purpose") {
        bail!("the host itself panicked:\n{}", host.log_tail(40));
    }
    drop(host);
    ns.cleanup().await;
    Ok(())
}

//! End-to-end checks of the local control plane itself (issue 2's "done when"
//! 1-6): nodes, Deployments, garbage collection, CRDs with SSA and /status,
//! GPU scheduling, and `cargo xtask cluster down` leaving nothing behind.
//!
//! They use the local cluster (started if needed) or `$KUWA_KUBECONFIG`.
//! Every wait is bounded; no timing is asserted.

use anyhow::{Context, Result, bail, ensure};
use futures::StreamExt;
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch,
    PatchParams, PostParams, WatchEvent, WatchParams,
};
use kuwa_e2e::{TestNamespace, client, kubeconfig_path, wait_for, workspace_root};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// What the watch reports for each event: (type, status.phase, spec.size).
type Seen = (String, Option<String>, Option<i64>);

const SHORT: Duration = Duration::from_secs(60);
/// The garbage collector learns a new CRD's kind only at its periodic
/// discovery refresh (about 20-25 s after the CRD appears).
const GC_DISCOVERY: Duration = Duration::from_secs(120);

fn gpu_capacity(node: &Node) -> Option<String> {
    node.status
        .as_ref()?
        .capacity
        .as_ref()?
        .get("nvidia.com/gpu")
        .map(|q| q.0.clone())
}

fn node_ready(node: &Node) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn pod_running_ready(pod: &Pod) -> bool {
    let Some(status) = &pod.status else {
        return false;
    };
    status.phase.as_deref() == Some("Running")
        && status
            .conditions
            .as_ref()
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// `kubectl` on PATH, if there is one.
fn kubectl_on_path() -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join("kubectl"))
        .find(|p| {
            p.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// The kubectls to check with: the one on PATH when there is one, and always
/// the project's own (`cargo xtask cluster kubectl`, which runs
/// `kuwa-localcluster kubectl`). Each is (label, program, leading args).
fn kubectls() -> Vec<(String, PathBuf, Vec<String>)> {
    let mut all = Vec::new();
    if let Some(path) = kubectl_on_path() {
        all.push((path.display().to_string(), path, Vec::new()));
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let xtask = ["xtask", "cluster", "kubectl", "--"].map(String::from);
    all.push((
        "cargo xtask cluster kubectl".into(),
        cargo.into(),
        xtask.to_vec(),
    ));
    all
}

/// Done-when 1: 5 Ready nodes, 2 of them with `nvidia.com/gpu`, seen through
/// the kube client and through `kubectl --kubeconfig <path> get nodes`, with
/// the kubectl on PATH (if any) and with the project's own.
#[tokio::test]
async fn nodes_are_ready_and_two_have_gpus() -> Result<()> {
    let client = client().await?;
    let nodes: Api<Node> = Api::all(client);
    let list = wait_for("5 Ready nodes", SHORT, || {
        let nodes = nodes.clone();
        async move {
            let list = nodes.list(&ListParams::default()).await?.items;
            let ready = list.iter().filter(|n| node_ready(n)).count();
            Ok((list.len() == 5 && ready == 5).then_some(list))
        }
    })
    .await?;
    let gpu: Vec<&Node> = list.iter().filter(|n| gpu_capacity(n).is_some()).collect();
    ensure!(gpu.len() == 2, "expected 2 GPU nodes, got {}", gpu.len());
    for n in &gpu {
        ensure!(
            gpu_capacity(n).as_deref() == Some("4"),
            "GPU node without 4 GPUs: {:?}",
            n.metadata.name
        );
        let labels = n.metadata.labels.clone().unwrap_or_default();
        ensure!(
            labels.get("kuwa.dev/gpu").map(String::as_str) == Some("true"),
            "GPU node not labelled: {labels:?}"
        );
    }

    let path = kubeconfig_path()?;
    for (label, program, lead) in kubectls() {
        let kubectl = |args: &[&str]| -> Result<String> {
            let out = std::process::Command::new(&program)
                .args(&lead)
                .arg("--kubeconfig")
                .arg(&path)
                .args(args)
                .current_dir(workspace_root())
                .stdin(std::process::Stdio::null())
                .output()
                .with_context(|| format!("running {label}"))?;
            ensure!(
                out.status.success(),
                "{label} {args:?} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        };
        let table = kubectl(&["get", "nodes", "--no-headers"])?;
        let rows: Vec<&str> = table.lines().filter(|l| !l.trim().is_empty()).collect();
        ensure!(
            rows.len() == 5,
            "{label} get nodes listed {} nodes:\n{table}",
            rows.len()
        );
        ensure!(
            rows.iter()
                .all(|r| r.split_whitespace().nth(1) == Some("Ready")),
            "not all nodes Ready in {label} get nodes:\n{table}"
        );
        let gpus = kubectl(&[
            "get",
            "nodes",
            "-o",
            r#"jsonpath={range .items[*]}{.metadata.name}={.status.capacity.nvidia\.com/gpu}{"\n"}{end}"#,
        ])?;
        let with_gpu = gpus.lines().filter(|l| l.ends_with("=4")).count();
        ensure!(
            with_gpu == 2,
            "{label} shows {with_gpu} nodes with nvidia.com/gpu=4:\n{gpus}"
        );
    }
    Ok(())
}

fn deployment(name: &str, replicas: i32) -> Result<Deployment> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"containers": [{"name": "app", "image": "registry.invalid/kuwa/app:1"}]}
            }
        }
    }))?)
}

/// Done-when 2: a 3-replica Deployment gets 3 Running Pods and readyReplicas 3.
#[tokio::test]
async fn deployment_gets_three_running_pods() -> Result<()> {
    let client = client().await?;
    let ns = TestNamespace::new(&client, "deploy").await?;
    let result = async {
        let deploys: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
        let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
        deploys
            .create(&PostParams::default(), &deployment("web", 3)?)
            .await?;
        wait_for("3 Running and Ready pods", SHORT, || {
            let pods = pods.clone();
            async move {
                let list = pods
                    .list(&ListParams::default().labels("app=web"))
                    .await?
                    .items;
                let running = list.iter().filter(|p| pod_running_ready(p)).count();
                Ok((list.len() == 3 && running == 3).then_some(()))
            }
        })
        .await?;
        wait_for("Deployment status.readyReplicas == 3", SHORT, || {
            let deploys = deploys.clone();
            async move {
                let d = deploys.get("web").await?;
                Ok((d.status.and_then(|s| s.ready_replicas) == Some(3)).then_some(()))
            }
        })
        .await
    }
    .await;
    ns.cleanup().await;
    result
}

fn config_map(name: &str, owner: Option<(&ConfigMap, bool)>) -> Result<ConfigMap> {
    let mut meta = json!({"name": name});
    if let Some((o, block)) = owner {
        meta["ownerReferences"] = json!([{
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "name": o.metadata.name,
            "uid": o.metadata.uid,
            "blockOwnerDeletion": block,
        }]);
    }
    Ok(serde_json::from_value(
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": {"k": "v"}}),
    )?)
}

/// Done-when 3: deleting an owner garbage-collects what it owns: a
/// Deployment's ReplicaSet and Pods, and ConfigMaps owned by a ConfigMap
/// (background and foreground propagation).
#[tokio::test]
async fn deleting_an_owner_collects_its_children() -> Result<()> {
    let client = client().await?;
    let ns = TestNamespace::new(&client, "gc").await?;
    let result = async {
        let deploys: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
        let rss: Api<ReplicaSet> = Api::namespaced(client.clone(), &ns.name);
        let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
        let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns.name);

        // Deployment -> ReplicaSet -> Pods.
        deploys
            .create(&PostParams::default(), &deployment("owner", 2)?)
            .await?;
        wait_for("the Deployment's ReplicaSet and 2 pods", SHORT, || {
            let (rss, pods) = (rss.clone(), pods.clone());
            async move {
                let rs = rss.list(&ListParams::default()).await?.items.len();
                let p = pods.list(&ListParams::default()).await?.items.len();
                Ok((rs == 1 && p == 2).then_some(()))
            }
        })
        .await?;
        deploys.delete("owner", &DeleteParams::background()).await?;
        wait_for("ReplicaSet and Pods garbage-collected", SHORT, || {
            let (rss, pods) = (rss.clone(), pods.clone());
            async move {
                let rs = rss.list(&ListParams::default()).await?.items.len();
                let p = pods.list(&ListParams::default()).await?.items.len();
                Ok((rs == 0 && p == 0).then_some(()))
            }
        })
        .await?;

        // ConfigMap owner, background propagation.
        let owner = cms
            .create(&PostParams::default(), &config_map("parent", None)?)
            .await?;
        for i in 0..3 {
            cms.create(
                &PostParams::default(),
                &config_map(&format!("child-{i}"), Some((&owner, false)))?,
            )
            .await?;
        }
        cms.delete("parent", &DeleteParams::background()).await?;
        wait_for("owned ConfigMaps garbage-collected", SHORT, || {
            let cms = cms.clone();
            async move {
                let left = cms.list(&ListParams::default()).await?.items;
                Ok((!left.iter().any(|c| {
                    c.metadata
                        .name
                        .as_deref()
                        .is_some_and(|n| n.starts_with("child-"))
                }))
                .then_some(()))
            }
        })
        .await?;

        // Foreground propagation: the owner goes only after its blocking child.
        let owner = cms
            .create(&PostParams::default(), &config_map("fg-parent", None)?)
            .await?;
        cms.create(
            &PostParams::default(),
            &config_map("fg-child", Some((&owner, true)))?,
        )
        .await?;
        cms.delete("fg-parent", &DeleteParams::foreground()).await?;
        wait_for("foreground deletion of owner and child", SHORT, || {
            let cms = cms.clone();
            async move {
                let parent = cms.get_opt("fg-parent").await?;
                let child = cms.get_opt("fg-child").await?;
                if parent.is_some() && child.is_none() {
                    return Ok(None);
                }
                ensure!(
                    !(parent.is_none() && child.is_some()),
                    "owner deleted before its blocking child"
                );
                Ok((parent.is_none() && child.is_none()).then_some(()))
            }
        })
        .await
    }
    .await;
    ns.cleanup().await;
    result
}

fn crd(group: &str) -> Result<CustomResourceDefinition> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": format!("widgets.{group}")},
        "spec": {
            "group": group,
            "scope": "Namespaced",
            "names": {"plural": "widgets", "singular": "widget", "kind": "Widget", "listKind": "WidgetList"},
            "versions": [{
                "name": "v1",
                "served": true,
                "storage": true,
                "subresources": {"status": {}},
                "schema": {"openAPIV3Schema": {
                    "type": "object",
                    "properties": {
                        "spec": {"type": "object", "properties": {
                            "size": {"type": "integer"},
                            "color": {"type": "string"}
                        }},
                        "status": {"type": "object", "properties": {
                            "phase": {"type": "string"},
                            "observedSize": {"type": "integer"}
                        }}
                    }
                }}
            }]
        }
    }))?)
}

/// Done-when 4: a CRD becomes Established; a custom resource is created,
/// watched, server-side-applied (spec and /status) and deleted; a ConfigMap it
/// owns is garbage-collected once the GC has discovered the new kind.
#[tokio::test]
async fn crd_lifecycle_with_ssa_status_and_watch() -> Result<()> {
    let client = client().await?;
    let ns = TestNamespace::new(&client, "crd").await?;
    // CRDs are cluster-wide: a group of its own per run.
    let group = format!("{}.e2e.kuwa.dev", ns.name);
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let crd_name = format!("widgets.{group}");
    let result = async {
        crds.create(&PostParams::default(), &crd(&group)?).await?;
        wait_for("CRD Established", SHORT, || {
            let crds = crds.clone();
            let crd_name = crd_name.clone();
            async move {
                let c = crds.get(&crd_name).await?;
                let established = c.status.and_then(|s| s.conditions).is_some_and(|cs| {
                    cs.iter()
                        .any(|c| c.type_ == "Established" && c.status == "True")
                });
                Ok(established.then_some(()))
            }
        })
        .await?;

        let gvk = GroupVersionKind::gvk(&group, "v1", "Widget");
        let ar = ApiResource::from_gvk_with_plural(&gvk, "widgets");
        let widgets: Api<DynamicObject> = Api::namespaced_with(client.clone(), &ns.name, &ar);
        // The resource can take a moment to be served after Established.
        let rv = wait_for("widgets served", SHORT, || {
            let widgets = widgets.clone();
            async move {
                Ok(Some(
                    widgets
                        .list(&ListParams::default())
                        .await?
                        .metadata
                        .resource_version
                        .unwrap_or_default(),
                ))
            }
        })
        .await?;

        // Watch from before the first write; forward (event, phase, size).
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Seen>();
        let watch_api = widgets.clone();
        let watcher = tokio::spawn(async move {
            let stream = watch_api
                .watch(&WatchParams::default().timeout(120), &rv)
                .await?;
            futures::pin_mut!(stream);
            while let Some(ev) = stream.next().await {
                let (kind, obj) = match ev? {
                    WatchEvent::Added(o) => ("Added", o),
                    WatchEvent::Modified(o) => ("Modified", o),
                    WatchEvent::Deleted(o) => ("Deleted", o),
                    WatchEvent::Bookmark(_) => continue,
                    WatchEvent::Error(e) => bail!("watch error: {e}"),
                };
                let phase = obj.data["status"]["phase"].as_str().map(String::from);
                let size = obj.data["spec"]["size"].as_i64();
                if tx.send((kind.to_string(), phase, size)).is_err() {
                    break;
                }
            }
            Ok::<(), anyhow::Error>(())
        });
        let mut seen: Vec<Seen> = Vec::new();
        let mut expect = async |what: &str, pred: &dyn Fn(&Seen) -> bool| -> Result<()> {
            if seen.iter().any(pred) {
                return Ok(());
            }
            tokio::time::timeout(SHORT, async {
                while let Some(ev) = rx.recv().await {
                    let hit = pred(&ev);
                    seen.push(ev);
                    if hit {
                        return Ok(());
                    }
                }
                bail!("watch ended before {what}; saw {seen:?}")
            })
            .await
            .with_context(|| format!("timed out watching for {what}"))?
        };

        // Create with server-side apply.
        let manager = PatchParams::apply("kuwa-e2e").force();
        let apply = json!({
            "apiVersion": format!("{group}/v1"),
            "kind": "Widget",
            "metadata": {"name": "w1"},
            "spec": {"size": 1, "color": "blue"}
        });
        let created = widgets.patch("w1", &manager, &Patch::Apply(&apply)).await?;
        expect("Added", &|e| e.0 == "Added").await?;

        // Apply a spec change.
        let mut apply2 = apply.clone();
        apply2["spec"]["size"] = json!(3);
        let updated = widgets
            .patch("w1", &manager, &Patch::Apply(&apply2))
            .await?;
        ensure!(
            updated.data["spec"]["size"] == 3,
            "spec not applied: {:?}",
            updated.data
        );
        let managers: Vec<String> = updated
            .metadata
            .managed_fields
            .unwrap_or_default()
            .iter()
            .filter_map(|m| m.manager.clone())
            .collect();
        ensure!(
            managers.iter().any(|m| m == "kuwa-e2e"),
            "field manager missing: {managers:?}"
        );
        expect("Modified size 3", &|e| e.0 == "Modified" && e.2 == Some(3)).await?;

        // /status via server-side apply, with a manager of its own.
        let status = json!({
            "apiVersion": format!("{group}/v1"),
            "kind": "Widget",
            "metadata": {"name": "w1"},
            "status": {"phase": "Ready", "observedSize": 3}
        });
        let with_status = widgets
            .patch_status(
                "w1",
                &PatchParams::apply("kuwa-e2e-status").force(),
                &Patch::Apply(&status),
            )
            .await?;
        ensure!(
            with_status.data["status"]["phase"] == "Ready",
            "status not applied: {:?}",
            with_status.data
        );
        ensure!(
            with_status.data["spec"]["size"] == 3,
            "status apply changed spec: {:?}",
            with_status.data
        );
        expect("Modified phase Ready", &|e| {
            e.0 == "Modified" && e.1.as_deref() == Some("Ready")
        })
        .await?;

        // The main resource ignores status (the subresource owns it).
        let mut sneaky = apply2.clone();
        sneaky["status"] = json!({"phase": "Hacked"});
        let after = widgets
            .patch("w1", &manager, &Patch::Apply(&sneaky))
            .await?;
        ensure!(
            after.data["status"]["phase"] == "Ready",
            "main resource wrote status: {:?}",
            after.data
        );

        // A ConfigMap owned by the widget, for the garbage collector.
        let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns.name);
        let child: ConfigMap = serde_json::from_value(json!({
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "owned-by-w1", "ownerReferences": [{
                "apiVersion": format!("{group}/v1"),
                "kind": "Widget",
                "name": "w1",
                "uid": created.metadata.uid,
            }]},
        }))?;
        cms.create(&PostParams::default(), &child).await?;

        widgets.delete("w1", &DeleteParams::background()).await?;
        expect("Deleted", &|e| e.0 == "Deleted").await?;
        wait_for("widget gone", SHORT, || {
            let widgets = widgets.clone();
            async move { Ok(widgets.get_opt("w1").await?.is_none().then_some(())) }
        })
        .await?;
        wait_for(
            "ConfigMap owned by the widget garbage-collected (GC discovery refresh)",
            GC_DISCOVERY,
            || {
                let cms = cms.clone();
                async move { Ok(cms.get_opt("owned-by-w1").await?.is_none().then_some(())) }
            },
        )
        .await?;
        watcher.abort();
        Ok(())
    }
    .await;
    let _ = crds.delete(&crd_name, &DeleteParams::background()).await;
    ns.cleanup().await;
    result
}

fn gpu_pod(name: &str, gpus: u32) -> Result<Pod> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {"containers": [{
            "name": "cuda",
            "image": "registry.invalid/kuwa/cuda:1",
            "resources": {"limits": {"nvidia.com/gpu": gpus.to_string()}}
        }]}
    }))?)
}

/// Done-when 5: a Pod asking for 2 GPUs runs on a GPU node; one asking for 64
/// stays Pending with an Unschedulable reason.
#[tokio::test]
async fn gpu_pods_are_scheduled_by_capacity() -> Result<()> {
    let client = client().await?;
    let ns = TestNamespace::new(&client, "gpu").await?;
    let result = async {
        let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
        let nodes: Api<Node> = Api::all(client.clone());
        pods.create(&PostParams::default(), &gpu_pod("two-gpus", 2)?)
            .await?;
        pods.create(&PostParams::default(), &gpu_pod("sixty-four-gpus", 64)?)
            .await?;

        let pod = wait_for("the 2-GPU pod Running", SHORT, || {
            let pods = pods.clone();
            async move {
                let p = pods.get("two-gpus").await?;
                Ok(pod_running_ready(&p).then_some(p))
            }
        })
        .await?;
        let node_name = pod
            .spec
            .and_then(|s| s.node_name)
            .context("running pod without a node")?;
        let node = nodes.get(&node_name).await?;
        ensure!(
            gpu_capacity(&node).is_some(),
            "2-GPU pod landed on {node_name}, which has no GPUs"
        );

        let (reason, message) = wait_for("the 64-GPU pod marked Unschedulable", SHORT, || {
            let pods = pods.clone();
            async move {
                let p = pods.get("sixty-four-gpus").await?;
                let status = p.status.unwrap_or_default();
                let cond = status
                    .conditions
                    .unwrap_or_default()
                    .into_iter()
                    .find(|c| c.type_ == "PodScheduled" && c.status == "False");
                Ok(cond.map(|c| (c.reason.unwrap_or_default(), c.message.unwrap_or_default())))
            }
        })
        .await?;
        ensure!(reason == "Unschedulable", "reason {reason:?} ({message})");
        ensure!(
            message.contains("nvidia.com/gpu"),
            "message does not name the GPU shortage: {message}"
        );
        let p = pods.get("sixty-four-gpus").await?;
        ensure!(
            p.spec.and_then(|s| s.node_name).is_none(),
            "64-GPU pod was bound to a node"
        );
        ensure!(
            p.status.and_then(|s| s.phase).as_deref() == Some("Pending"),
            "64-GPU pod is not Pending"
        );
        Ok(())
    }
    .await;
    ns.cleanup().await;
    result
}

fn pid_alive(pid: u64) -> bool {
    // A zombie has already exited (and closed its sockets).
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

fn connect_refused(port: u16) -> bool {
    match std::net::TcpStream::connect_timeout(
        &([127, 0, 0, 1], port).into(),
        Duration::from_secs(1),
    ) {
        Ok(_) => false,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionRefused,
    }
}

fn temp_cluster_dir() -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    std::env::temp_dir().join(format!("kuwa-e2e-down-{}-{nanos}", std::process::id()))
}

fn xtask_in(dir: &Path, args: &[&str]) -> Result<String> {
    kuwa_e2e::xtask(args, &[("KUWA_CLUSTER_DIR", dir)])
}

/// Done-when 6: a second, independent cluster (its own state dir) comes up,
/// `up` again is a no-op, and `down` stops every recorded process and closes
/// every recorded port; `down` twice is fine.
#[test]
fn down_leaves_no_process_and_no_port() -> Result<()> {
    let dir = temp_cluster_dir();
    assert!(!dir.starts_with(workspace_root()));
    let result = (|| -> Result<()> {
        let kubeconfig = kuwa_e2e::cluster_up(
            &[("KUWA_CLUSTER_DIR", &dir)],
            &["--cpu-nodes", "1", "--gpu-nodes", "1"],
        )?;
        ensure!(
            kubeconfig.starts_with(&dir),
            "kubeconfig {} outside {}",
            kubeconfig.display(),
            dir.display()
        );
        let again = kuwa_e2e::cluster_up(
            &[("KUWA_CLUSTER_DIR", &dir)],
            &["--cpu-nodes", "1", "--gpu-nodes", "1"],
        )?;
        ensure!(
            again == kubeconfig,
            "second up printed {} instead of {}",
            again.display(),
            kubeconfig.display()
        );
        let status = xtask_in(&dir, &["cluster", "status"])?;
        ensure!(
            status.contains("cluster: up") && status.contains("nodes: 2 (2 Ready"),
            "status:\n{status}"
        );
        // `up` wrote <state dir>/bin/kubectl, and status names it.
        let wrapper = dir.join("bin").join("kubectl");
        ensure!(
            status.contains(&format!("kubectl: {}", wrapper.display())),
            "status does not mention {}:\n{status}",
            wrapper.display()
        );
        let out = std::process::Command::new(&wrapper)
            .args(["get", "nodes", "--no-headers"])
            .output()
            .with_context(|| format!("running {}", wrapper.display()))?;
        let table = String::from_utf8_lossy(&out.stdout);
        ensure!(
            out.status.success() && table.lines().count() == 2,
            "{} get nodes ({}):\n{table}{}",
            wrapper.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        // `cargo xtask cluster kubectl` finds this cluster by its state dir.
        let names = xtask_in(
            &dir,
            &["cluster", "kubectl", "--", "get", "nodes", "-o", "name"],
        )?;
        ensure!(
            names.lines().filter(|l| l.starts_with("node/")).count() == 2,
            "cargo xtask cluster kubectl get nodes:\n{names}"
        );

        let state: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("state.json"))?)?;
        let comps = state["components"]
            .as_array()
            .context("state.json without components")?;
        let pids: Vec<u64> = comps.iter().filter_map(|c| c["pid"].as_u64()).collect();
        let ports: Vec<u16> = comps
            .iter()
            .flat_map(|c| c["ports"].as_array().cloned().unwrap_or_default())
            .filter_map(|p| p.as_u64().and_then(|p| u16::try_from(p).ok()))
            .collect();
        ensure!(
            pids.len() == 5,
            "expected 5 recorded processes, got {pids:?}"
        );
        ensure!(
            ports.len() >= 4,
            "expected the recorded ports, got {ports:?}"
        );
        ensure!(
            pids.iter().all(|p| pid_alive(*p)),
            "not every recorded process runs: {pids:?}"
        );
        ensure!(
            ports.iter().all(|p| !connect_refused(*p)),
            "not every recorded port listens: {ports:?}"
        );

        xtask_in(&dir, &["cluster", "down"])?;
        let alive: Vec<u64> = pids.iter().copied().filter(|p| pid_alive(*p)).collect();
        ensure!(
            alive.is_empty(),
            "processes still alive after down: {alive:?}"
        );
        let open: Vec<u16> = ports
            .iter()
            .copied()
            .filter(|p| !connect_refused(*p))
            .collect();
        ensure!(
            open.is_empty(),
            "ports still accepting connections after down: {open:?}"
        );
        ensure!(!dir.exists(), "state dir {} still exists", dir.display());

        xtask_in(&dir, &["cluster", "down"]).context("second down")?;
        ensure!(
            xtask_in(&dir, &["cluster", "kubectl", "--", "get", "nodes"]).is_err(),
            "cargo xtask cluster kubectl succeeded with the cluster down"
        );
        let status = xtask_in(&dir, &["cluster", "status"])?;
        ensure!(
            status.contains("cluster: down"),
            "status after down:\n{status}"
        );
        Ok(())
    })();
    if result.is_err() && dir.exists() {
        let _ = xtask_in(&dir, &["cluster", "down"]);
    }
    result
}

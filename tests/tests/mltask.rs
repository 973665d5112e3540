//! End-to-end: the `kuwa` host with the MLTask plugin against the real local
//! control plane and its kwok GPU nodes (issue 4). Each test runs its own
//! host scoped to its own namespace.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{Container, EnvVar, PersistentVolume, Pod, Service};
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, ListParams};
use kube::{Client, ResourceExt};
use kuwa_e2e::host::{KuwaHost, apply_json, plugin, yaml_file};
use kuwa_e2e::objects::{bound_claim, condition, controlled_by, instance_pods, owned_by};
use kuwa_e2e::{TestNamespace, client, wait_for};
use serde_json::{Value, json};

const CONVERGE: Duration = Duration::from_secs(120);
/// The garbage collector learns a new CRD's kind only at its periodic
/// discovery refresh (~20–30 s), so cascades of a fresh CRD take that long.
const GARBAGE_COLLECT: Duration = Duration::from_secs(150);
const SAMPLE: &str = "mltask-sample";
const POD_INDEX_LABEL: &str = "apps.kubernetes.io/pod-index";

fn mltask_resource() -> ApiResource {
    ApiResource {
        group: "kuwa.dev".into(),
        version: "v1alpha1".into(),
        api_version: "kuwa.dev/v1alpha1".into(),
        kind: "MLTask".into(),
        plural: "mltasks".into(),
    }
}

fn mltasks(client: &Client, ns: &str) -> Api<DynamicObject> {
    Api::namespaced_with(client.clone(), ns, &mltask_resource())
}

fn mltask(name: &str, parallelism: i64, gpus_per_worker: i64) -> Value {
    json!({
        "apiVersion": "kuwa.dev/v1alpha1",
        "kind": "MLTask",
        "metadata": {"name": name},
        "spec": {
            "image": "pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime",
            "trainingData": "s3://datasets/mnist",
            "modelOutput": "s3://models/mnist",
            "parallelism": parallelism,
            "gpusPerWorker": gpus_per_worker,
        },
    })
}

/// The worker Pods of task `name` (not being deleted).
async fn worker_pods(client: &Client, ns: &str, name: &str) -> Result<Vec<Pod>> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    Ok(pods
        .list(&ListParams::default().labels(&format!("app.kubernetes.io/instance={name}")))
        .await?
        .items
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .collect())
}

/// Waits until the task reports `phase` for its current generation.
async fn wait_phase(client: &Client, ns: &str, name: &str, phase: &str) -> Result<DynamicObject> {
    let api = mltasks(client, ns);
    wait_for(
        &format!("MLTask {ns}/{name} to be {phase}"),
        CONVERGE,
        || {
            let api = api.clone();
            async move {
                let task = api.get(name).await?;
                let status = &task.data["status"];
                let current = status["observedGeneration"].as_i64() == task.metadata.generation;
                Ok((current && status["phase"] == phase).then_some(task))
            }
        },
    )
    .await
}

fn env<'a>(container: &'a Container, name: &str) -> Option<&'a EnvVar> {
    container.env.iter().flatten().find(|e| e.name == name)
}

/// Done-when 4: the sample (2 workers × 2 GPUs) becomes a StatefulSet whose
/// 2 Pods run on the GPU nodes with the right rank wiring; the task is
/// `Running`.
#[tokio::test(flavor = "multi_thread")]
async fn sample_runs_two_workers_on_gpu_nodes() -> Result<()> {
    let client = client().await?;
    let ns = TestNamespace::new(&client, "mlt-sample").await?;
    let n = ns.name.as_str();
    // The sample writes its model to the claim mnist-model.
    let pv = bound_claim(&client, n, "mnist-model").await?;
    let host = KuwaHost::start(n, &[plugin("mltask")?], &[]).await?;
    apply_json(
        &client,
        n,
        &yaml_file("deploy/samples/kuwa.dev_v1alpha1_mltask.yaml")?,
    )
    .await?;

    let task = wait_phase(&client, n, SAMPLE, "Running").await?;
    let uid = task.uid().context("uid")?;
    assert_eq!(task.data["status"]["readyWorkers"], 2);
    for (type_, status) in [("Schedulable", "True"), ("Available", "True")] {
        let c = condition(&task, type_).with_context(|| format!("condition {type_}"))?;
        assert_eq!(c["status"], status, "{type_}: {c}");
    }

    let statefulsets: Api<StatefulSet> = Api::namespaced(client.clone(), n);
    let sts = statefulsets.get(SAMPLE).await?;
    assert!(owned_by(&sts.metadata, &uid));
    assert_eq!(sts.spec.as_ref().and_then(|s| s.replicas), Some(2));
    let services: Api<Service> = Api::namespaced(client.clone(), n);
    let svc = services.get(&format!("{SAMPLE}-workers")).await?;
    assert!(owned_by(&svc.metadata, &uid));
    assert_eq!(
        svc.spec.as_ref().and_then(|s| s.cluster_ip.as_deref()),
        Some("None"),
        "the worker Service is headless"
    );

    let pods = worker_pods(&client, n, SAMPLE).await?;
    assert_eq!(
        pods.len(),
        2,
        "{:?}",
        pods.iter().map(|p| p.name_any()).collect::<Vec<_>>()
    );
    let mut ranks = BTreeSet::new();
    for pod in &pods {
        let name = pod.name_any();
        let status = pod.status.as_ref().context("pod status")?;
        assert_eq!(status.phase.as_deref(), Some("Running"), "{name}");
        let spec = pod.spec.as_ref().context("pod spec")?;
        let node = spec.node_name.as_deref().unwrap_or_default();
        assert!(node.starts_with("kwok-gpu-"), "{name} runs on {node:?}");
        assert!(
            pod.owner_references()
                .iter()
                .any(|o| o.kind == "StatefulSet" && o.name == SAMPLE),
            "{name} belongs to the StatefulSet"
        );
        // RANK comes from the pod-index label, which the StatefulSet
        // controller sets to the Pod's ordinal.
        let index = pod
            .labels()
            .get(POD_INDEX_LABEL)
            .with_context(|| format!("{name} has no {POD_INDEX_LABEL} label"))?
            .clone();
        assert_eq!(
            name,
            format!("{SAMPLE}-{index}"),
            "the index is the ordinal"
        );
        ranks.insert(index);
        let worker = spec
            .containers
            .iter()
            .find(|c| c.name == "worker")
            .context("worker container")?;
        let rank = env(worker, "RANK").context("RANK")?;
        assert_eq!(rank.value, None);
        assert_eq!(
            rank.value_from
                .as_ref()
                .and_then(|v| v.field_ref.as_ref())
                .map(|f| f.field_path.as_str()),
            Some("metadata.labels['apps.kubernetes.io/pod-index']"),
            "{name}: RANK through the downward API"
        );
        let value = |var: &str| env(worker, var).and_then(|e| e.value.clone());
        assert_eq!(value("WORLD_SIZE").as_deref(), Some("2"), "{name}");
        assert_eq!(
            value("MASTER_ADDR"),
            Some(format!("{SAMPLE}-0.{SAMPLE}-workers.{n}.svc")),
            "{name}"
        );
        assert_eq!(value("MASTER_PORT").as_deref(), Some("29500"), "{name}");
        assert_eq!(value("MODEL_OUTPUT").as_deref(), Some("/output"), "{name}");
        let resources = worker.resources.as_ref().context("resources")?;
        for list in [&resources.requests, &resources.limits] {
            let gpus = list.as_ref().and_then(|l| l.get("nvidia.com/gpu"));
            assert_eq!(gpus.map(|q| q.0.as_str()), Some("2"), "{name}: 2 GPUs");
        }
    }
    assert_eq!(
        ranks,
        BTreeSet::from(["0".to_owned(), "1".to_owned()]),
        "ranks 0 and 1"
    );

    assert_no_errors(&host).await?;
    drop(host);
    ns.cleanup().await;
    let pvs: Api<PersistentVolume> = Api::all(client.clone());
    pvs.delete(&pv, &DeleteParams::default()).await?;
    Ok(())
}

/// Done-when 5: 1 worker × 8 GPUs on 4-GPU nodes is `Schedulable=False`
/// with a message naming the largest node (4); nothing is created.
#[tokio::test(flavor = "multi_thread")]
async fn too_many_gpus_per_worker_is_unschedulable() -> Result<()> {
    let client = client().await?;
    let ns = TestNamespace::new(&client, "mlt-unschedulable").await?;
    let n = ns.name.as_str();
    let host = KuwaHost::start(n, &[plugin("mltask")?], &[]).await?;
    apply_json(&client, n, &mltask("huge", 1, 8)).await?;

    let api = mltasks(&client, n);
    let (task, schedulable) = wait_for("huge to be Schedulable=False", CONVERGE, || {
        let api = api.clone();
        async move {
            let task = api.get("huge").await?;
            let current =
                task.data["status"]["observedGeneration"].as_i64() == task.metadata.generation;
            Ok(condition(&task, "Schedulable")
                .filter(|c| current && c["status"] == "False")
                .map(|c| (task, c)))
        }
    })
    .await?;
    assert_eq!(schedulable["reason"], "WorkerTooLarge", "{schedulable}");
    let message = schedulable["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("8 GPUs per worker") && message.contains("the largest GPU node has 4"),
        "{message}"
    );
    assert_eq!(task.data["status"]["phase"], "Pending");
    assert_eq!(task.data["status"]["readyWorkers"], 0);
    assert_eq!(
        condition(&task, "Available").context("Available")?["reason"],
        "Unschedulable"
    );

    // Settled, and still nothing was created.
    host.wait_idle(Duration::from_secs(3), CONVERGE).await?;
    let statefulsets: Api<StatefulSet> = Api::namespaced(client.clone(), n);
    let services: Api<Service> = Api::namespaced(client.clone(), n);
    let lp = ListParams::default();
    assert!(
        statefulsets.list(&lp).await?.items.is_empty(),
        "no StatefulSet"
    );
    assert!(services.list(&lp).await?.items.is_empty(), "no Service");
    assert!(
        worker_pods(&client, n, "huge").await?.is_empty(),
        "no worker"
    );
    let events: Api<Event> = Api::namespaced(client.clone(), n);
    let unschedulable = events
        .list(&lp)
        .await?
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("huge"))
        .filter(|e| e.reason.as_deref() == Some("Unschedulable"))
        .count();
    assert!(unschedulable >= 1, "an Unschedulable warning event");
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
        ],
    )
    .await?;
    out.extend(instance_pods(client, ns, name).await?);
    Ok(out)
}

/// Done-when 6 (MLTask): deleting the task removes its StatefulSet, Service
/// and worker Pods.
#[tokio::test(flavor = "multi_thread")]
async fn deleting_an_mltask_removes_its_children() -> Result<()> {
    let client = client().await?;
    let ns = TestNamespace::new(&client, "mlt-delete").await?;
    let n = ns.name.as_str();
    let host = KuwaHost::start(n, &[plugin("mltask")?], &[]).await?;
    apply_json(&client, n, &mltask("gone", 1, 1)).await?;
    let task = wait_phase(&client, n, "gone", "Running").await?;
    let uid = task.uid().context("uid")?;
    let before = remaining_children(&client, n, &uid, "gone").await?;
    assert_eq!(
        before.iter().map(String::as_str).collect::<BTreeSet<_>>(),
        BTreeSet::from(["StatefulSet/gone", "Service/gone-workers", "Pod/gone-0"])
    );

    mltasks(&client, n)
        .delete("gone", &DeleteParams::default())
        .await?;
    let gone = wait_for(
        "every child and worker of the deleted MLTask to be gone",
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

/// Fails when the host counted any failed reconcile of the plugin (with the
/// log tail, to see why).
async fn assert_no_errors(host: &KuwaHost) -> Result<()> {
    let errors = host
        .metric("kuwa_reconcile_errors_total", &[("plugin", "mltask")])
        .await?;
    if errors != 0.0 {
        bail!(
            "{errors} failed reconciles; kuwa log:\n{}",
            host.log_tail(60)
        );
    }
    Ok(())
}

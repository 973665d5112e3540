//! Fixture tests: the real reconcile, natively, through the SDK's JSON path.

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{Container, PodSpec, Service};
use kuwa_sdk::testing::Fixture;
use kuwa_sdk::{Error, EventType};
use serde_json::{Value, json};

use super::*;

const SAMPLE: &str = include_str!("../../../deploy/samples/kuwa.dev_v1alpha1_mltask.yaml");
const NAME: &str = "mltask-sample";

/// A Node with `gpus` allocatable GPUs, labelled as a GPU node.
fn gpu_node(name: &str, gpus: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": {"kuwa.dev/gpu": "true", "kubernetes.io/hostname": name}},
        "spec": {},
        "status": {
            "capacity": {"cpu": "32", "memory": "256Gi", "nvidia.com/gpu": gpus, "pods": "110"},
            "allocatable": {"cpu": "32", "memory": "256Gi", "nvidia.com/gpu": gpus, "pods": "110"}
        }
    })
}

/// Worker Pod `mltask-sample-<ordinal>` in `phase`, ready or not.
fn worker_pod(ordinal: u32, phase: &str, ready: bool) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": format!("{NAME}-{ordinal}"), "namespace": "default",
            "labels": {POD_INDEX_LABEL: ordinal.to_string()},
            "ownerReferences": [{
                "apiVersion": "apps/v1", "kind": "StatefulSet", "name": NAME,
                "uid": "00000000-0000-0000-0000-0000000000bb", "controller": true
            }]
        },
        "spec": {"containers": [{"name": "worker"}]},
        "status": {
            "phase": phase,
            "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]
        }
    })
}

/// The sample on a cluster of two 4-GPU nodes.
fn on_two_gpu_nodes() -> Fixture {
    Fixture::parent_yaml(SAMPLE)
        .related(gpu_node("gpu-0", "4"))
        .related(gpu_node("gpu-1", "4"))
}

fn status_of(out: &Desired<MLTaskStatus>) -> MLTaskStatus {
    serde_json::from_value(out.status_json().unwrap().clone()).unwrap()
}

fn condition<'a>(s: &'a MLTaskStatus, t: &str) -> &'a Condition {
    s.conditions
        .iter()
        .find(|c| c.type_ == t)
        .unwrap_or_else(|| panic!("no {t} condition"))
}

fn pod_spec(out: &Desired<MLTaskStatus>) -> PodSpec {
    let sts: StatefulSet = out.child_named(NAME).unwrap();
    sts.spec.unwrap().template.spec.unwrap()
}

fn worker(out: &Desired<MLTaskStatus>) -> Container {
    pod_spec(out).containers.remove(0)
}

fn env_value(c: &Container, name: &str) -> Option<String> {
    c.env
        .as_ref()?
        .iter()
        .find(|e| e.name == name)?
        .value
        .clone()
}

#[test]
fn sample_yields_gpu_workers_and_a_headless_service() {
    let out = on_two_gpu_nodes().reconcile::<MLTaskPlugin>().unwrap();
    assert_eq!(out.children().len(), 2);

    let sts: StatefulSet = out.child_named(NAME).unwrap();
    let spec = sts.spec.unwrap();
    assert_eq!(spec.replicas, Some(2));
    assert_eq!(spec.pod_management_policy.as_deref(), Some("Parallel"));
    assert_eq!(spec.service_name.as_deref(), Some("mltask-sample-workers"));
    let pod = spec.template.spec.unwrap();
    assert_eq!(pod.node_selector.unwrap()["kuwa.dev/gpu"], "true");
    assert_eq!(
        pod.tolerations.unwrap()[0].key.as_deref(),
        Some("nvidia.com/gpu")
    );

    let c = &pod.containers[0];
    assert_eq!(
        c.image.as_deref(),
        Some("pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime")
    );
    assert_eq!(
        c.command.as_deref().unwrap(),
        ["python", "/workspace/train.py"]
    );
    assert_eq!(c.args.as_deref().unwrap(), ["--epochs=10"]);
    let res = c.resources.as_ref().unwrap();
    assert_eq!(res.requests.as_ref().unwrap()["nvidia.com/gpu"].0, "2");
    assert_eq!(res.limits.as_ref().unwrap()["nvidia.com/gpu"].0, "2");

    let rank = c
        .env
        .as_ref()
        .unwrap()
        .iter()
        .find(|e| e.name == "RANK")
        .unwrap();
    assert_eq!(
        rank.value_from
            .as_ref()
            .unwrap()
            .field_ref
            .as_ref()
            .unwrap()
            .field_path,
        "metadata.labels['apps.kubernetes.io/pod-index']"
    );
    assert_eq!(env_value(c, "WORLD_SIZE").as_deref(), Some("2"));
    assert_eq!(
        env_value(c, "MASTER_ADDR").as_deref(),
        Some("mltask-sample-0.mltask-sample-workers.default.svc")
    );
    assert_eq!(env_value(c, "MASTER_PORT").as_deref(), Some("29500"));

    let svc: Service = out.child_named("mltask-sample-workers").unwrap();
    let ss = svc.spec.unwrap();
    assert_eq!(ss.cluster_ip.as_deref(), Some("None"));
    assert_eq!(ss.publish_not_ready_addresses, Some(true));
    assert_eq!(ss.selector, spec.selector.match_labels);

    let status = status_of(&out);
    assert_eq!(status.phase, Phase::Pending);
    assert_eq!(status.ready_workers, 0);
    assert_eq!(condition(&status, "Schedulable").status, "True");
    assert_eq!(condition(&status, "Progressing").status, "True");
    assert!(out.events().is_empty());
}

#[test]
fn uri_data_is_passed_as_env_and_a_claim_output_is_mounted() {
    let out = on_two_gpu_nodes().reconcile::<MLTaskPlugin>().unwrap();
    let c = worker(&out);
    assert_eq!(
        env_value(&c, "TRAINING_DATA").as_deref(),
        Some("s3://datasets/mnist")
    );
    assert_eq!(env_value(&c, "MODEL_OUTPUT").as_deref(), Some("/output"));
    let mounts = c.volume_mounts.unwrap();
    let output = mounts.iter().find(|m| m.mount_path == "/output").unwrap();
    assert_eq!(output.read_only, None);
    assert!(
        mounts.iter().all(|m| m.mount_path != "/data"),
        "a URI is not mounted"
    );
    let volumes = pod_spec(&out).volumes.unwrap();
    let claim = volumes
        .iter()
        .find(|v| v.name == output.name)
        .unwrap()
        .persistent_volume_claim
        .clone()
        .unwrap();
    assert_eq!(claim.claim_name, "mnist-model");
    assert_eq!(claim.read_only, None);
}

#[test]
fn claim_data_is_mounted_read_only_and_a_uri_output_is_passed_as_env() {
    let out = on_two_gpu_nodes()
        .with_parent(|p| {
            p["spec"]["trainingData"] = json!("pvc://mnist-data");
            p["spec"]["modelOutput"] = json!("gs://models/mnist");
        })
        .reconcile::<MLTaskPlugin>()
        .unwrap();
    let c = worker(&out);
    assert_eq!(env_value(&c, "TRAINING_DATA").as_deref(), Some("/data"));
    assert_eq!(
        env_value(&c, "MODEL_OUTPUT").as_deref(),
        Some("gs://models/mnist")
    );
    let mounts = c.volume_mounts.unwrap();
    let data = mounts.iter().find(|m| m.mount_path == "/data").unwrap();
    assert_eq!(data.read_only, Some(true));
    assert!(mounts.iter().all(|m| m.mount_path != "/output"));
    let volumes = pod_spec(&out).volumes.unwrap();
    let claim = volumes
        .iter()
        .find(|v| v.name == data.name)
        .unwrap()
        .persistent_volume_claim
        .clone()
        .unwrap();
    assert_eq!(claim.claim_name, "mnist-data");
    assert_eq!(claim.read_only, Some(true));
}

#[test]
fn scratch_is_a_sized_empty_dir_in_canonical_form() {
    let out = on_two_gpu_nodes().reconcile::<MLTaskPlugin>().unwrap();
    let scratch = pod_spec(&out)
        .volumes
        .unwrap()
        .into_iter()
        .find(|v| v.name == "scratch")
        .unwrap();
    assert_eq!(scratch.empty_dir.unwrap().size_limit.unwrap().0, "10Gi");
    let c = worker(&out);
    assert!(
        c.volume_mounts
            .as_ref()
            .unwrap()
            .iter()
            .any(|m| m.name == "scratch" && m.mount_path == "/scratch")
    );
    assert_eq!(env_value(&c, "SCRATCH_DIR").as_deref(), Some("/scratch"));

    let odd = on_two_gpu_nodes().with_parent(|p| p["spec"]["scratch"] = json!("10240Mi"));
    let out = odd.reconcile::<MLTaskPlugin>().unwrap();
    let scratch = pod_spec(&out)
        .volumes
        .unwrap()
        .into_iter()
        .find(|v| v.name == "scratch")
        .unwrap();
    assert_eq!(
        scratch.empty_dir.unwrap().size_limit.unwrap().0,
        "10Gi",
        "as the API server stores it"
    );

    let none = on_two_gpu_nodes()
        .with_parent(|p| {
            p["spec"].as_object_mut().unwrap().remove("scratch");
            p["spec"]["modelOutput"] = json!("s3://models/mnist");
        })
        .reconcile::<MLTaskPlugin>()
        .unwrap();
    assert_eq!(pod_spec(&none).volumes, None);
    assert_eq!(env_value(&worker(&none), "SCRATCH_DIR"), None);
}

fn unschedulable(fixture: Fixture) -> (Desired<MLTaskStatus>, MLTaskStatus) {
    let out = fixture
        .reconcile::<MLTaskPlugin>()
        .expect("unschedulable is not an error");
    let status = status_of(&out);
    assert!(
        out.children().is_empty(),
        "no workers when they cannot be scheduled"
    );
    assert_eq!(status.phase, Phase::Pending);
    assert_eq!(condition(&status, "Schedulable").status, "False");
    assert_eq!(condition(&status, "Available").reason, "Unschedulable");
    (out, status)
}

#[test]
fn a_worker_larger_than_any_node_is_unschedulable() {
    let fixture = on_two_gpu_nodes().with_parent(|p| {
        p["spec"]["parallelism"] = json!(1);
        p["spec"]["gpusPerWorker"] = json!(8);
    });
    let (out, status) = unschedulable(fixture);
    let schedulable = condition(&status, "Schedulable");
    assert_eq!(
        schedulable.message,
        "no node can fit 8 GPUs per worker: the largest GPU node has 4"
    );
    assert_eq!(schedulable.reason, "WorkerTooLarge");
    assert_eq!(out.events().len(), 1);
    assert_eq!(out.events()[0].event_type, EventType::Warning);
    assert_eq!(out.events()[0].message, schedulable.message);
}

#[test]
fn too_few_gpus_in_total_is_unschedulable() {
    let fixture = on_two_gpu_nodes().with_parent(|p| {
        p["spec"]["parallelism"] = json!(3);
        p["spec"]["gpusPerWorker"] = json!(4);
    });
    let (_, status) = unschedulable(fixture);
    assert_eq!(
        condition(&status, "Schedulable").message,
        "the cluster has 8 allocatable GPUs on schedulable GPU nodes, but 3 workers × 4 GPUs need 12"
    );
}

#[test]
fn workers_that_do_not_pack_onto_nodes_are_unschedulable() {
    // 6 GPUs in all, enough for 3 × 2, but a 3-GPU node holds one 2-GPU worker.
    let fixture = Fixture::parent_yaml(SAMPLE)
        .related(gpu_node("gpu-0", "3"))
        .related(gpu_node("gpu-1", "3"))
        .with_parent(|p| p["spec"]["parallelism"] = json!(3));
    let (_, status) = unschedulable(fixture);
    assert!(
        condition(&status, "Schedulable")
            .message
            .starts_with("only 2 of 3 workers fit"),
        "{status:?}"
    );
}

#[test]
fn cordoned_unlabelled_and_gpu_less_nodes_do_not_count() {
    let mut cordoned = gpu_node("big-cordoned", "8");
    cordoned["spec"]["unschedulable"] = json!(true);
    let mut unlabelled = gpu_node("big-unlabelled", "8");
    unlabelled["metadata"]["labels"]
        .as_object_mut()
        .unwrap()
        .remove("kuwa.dev/gpu");
    let mut cpu_only = gpu_node("cpu", "0");
    cpu_only["status"]["allocatable"]
        .as_object_mut()
        .unwrap()
        .remove("nvidia.com/gpu");
    let fixture = Fixture::parent_yaml(SAMPLE)
        .related(cordoned)
        .related(unlabelled)
        .related(cpu_only)
        .related(gpu_node("small", "4"))
        .with_parent(|p| {
            p["spec"]["parallelism"] = json!(1);
            p["spec"]["gpusPerWorker"] = json!(8);
        });
    let (_, status) = unschedulable(fixture);
    assert_eq!(
        condition(&status, "Schedulable").message,
        "no node can fit 8 GPUs per worker: the largest GPU node has 4"
    );
}

#[test]
fn no_gpu_nodes_at_all_is_unschedulable() {
    let (_, status) = unschedulable(Fixture::parent_yaml(SAMPLE));
    let schedulable = condition(&status, "Schedulable");
    assert_eq!(schedulable.reason, "NoGPUNodes");
    assert!(
        schedulable
            .message
            .starts_with("no node can fit 2 GPUs per worker"),
        "{}",
        schedulable.message
    );
}

#[test]
fn existing_workers_are_dropped_when_capacity_goes_and_return_with_it() {
    let running = on_two_gpu_nodes()
        .related(worker_pod(0, "Running", true))
        .related(worker_pod(1, "Running", true))
        .reconcile::<MLTaskPlugin>()
        .unwrap();
    let status = running.status_json().unwrap().clone();
    // Both GPU nodes cordoned for maintenance.
    let cordoned = |fixture: Fixture| {
        ["gpu-0", "gpu-1"].into_iter().fold(fixture, |f, name| {
            let mut node = gpu_node(name, "4");
            node["spec"]["unschedulable"] = json!(true);
            f.related(node)
        })
    };
    let shrunk =
        cordoned(Fixture::parent_yaml(SAMPLE).with_parent(|p| p["status"] = status.clone()))
            .related(worker_pod(0, "Running", true))
            .related(worker_pod(1, "Running", true));
    let (out, shrunk_status) = unschedulable(shrunk);
    assert_eq!(
        out.events().len(),
        1,
        "the transition to unschedulable is announced once"
    );

    let again = cordoned(
        Fixture::parent_yaml(SAMPLE)
            .with_parent(|p| p["status"] = serde_json::to_value(&shrunk_status).unwrap()),
    )
    .reconcile::<MLTaskPlugin>()
    .unwrap();
    assert!(
        again.events().is_empty(),
        "no repeated event while it stays unschedulable"
    );
    assert!(again.children().is_empty());

    let back = on_two_gpu_nodes()
        .with_parent(|p| p["status"] = serde_json::to_value(&shrunk_status).unwrap())
        .reconcile::<MLTaskPlugin>()
        .unwrap();
    assert_eq!(back.children().len(), 2);
}

#[test]
fn phase_is_running_when_all_workers_are_ready() {
    let out = on_two_gpu_nodes()
        .related(worker_pod(1, "Running", true))
        .related(worker_pod(0, "Running", true))
        .reconcile::<MLTaskPlugin>()
        .unwrap();
    let status = status_of(&out);
    assert_eq!(status.phase, Phase::Running);
    assert_eq!(status.ready_workers, 2);
    assert_eq!(condition(&status, "Available").status, "True");
    assert_eq!(condition(&status, "Progressing").status, "False");
    assert_eq!(condition(&status, "Degraded").status, "False");
    assert_eq!(out.children().len(), 2);

    let partial = on_two_gpu_nodes()
        .related(worker_pod(0, "Running", true))
        .related(worker_pod(1, "Pending", false))
        .reconcile::<MLTaskPlugin>()
        .unwrap();
    let status = status_of(&partial);
    assert_eq!(status.phase, Phase::Pending);
    assert_eq!(status.ready_workers, 1);
    assert_eq!(
        condition(&status, "Progressing").message,
        "1/2 workers ready"
    );

    // A rank that finished early does not make a running task pending.
    let finishing = on_two_gpu_nodes()
        .related(worker_pod(0, "Running", true))
        .related(worker_pod(1, "Succeeded", false))
        .reconcile::<MLTaskPlugin>()
        .unwrap();
    assert_eq!(status_of(&finishing).phase, Phase::Running);
}

#[test]
fn success_removes_the_workers_and_sticks_until_the_spec_changes() {
    let done = on_two_gpu_nodes()
        .related(worker_pod(0, "Succeeded", false))
        .related(worker_pod(1, "Succeeded", false))
        .reconcile::<MLTaskPlugin>()
        .unwrap();
    let status = status_of(&done);
    assert_eq!(status.phase, Phase::Succeeded);
    assert!(
        done.children().is_empty(),
        "finished workers are removed, not restarted"
    );
    assert_eq!(done.events()[0].reason, "Succeeded");

    // Later, the Pods gone: still Succeeded, same status, no new event.
    let status_json = done.status_json().unwrap().clone();
    let later = on_two_gpu_nodes()
        .with_parent(|p| p["status"] = status_json.clone())
        .at("2026-01-01T02:00:00Z")
        .reconcile::<MLTaskPlugin>()
        .unwrap();
    assert_eq!(later.status_json().unwrap(), &status_json);
    assert!(later.children().is_empty());
    assert!(later.events().is_empty());

    // A new generation runs the task again.
    let rerun = on_two_gpu_nodes()
        .with_parent(|p| {
            p["status"] = status_json.clone();
            p["metadata"]["generation"] = json!(2);
        })
        .reconcile::<MLTaskPlugin>()
        .unwrap();
    assert_eq!(status_of(&rerun).phase, Phase::Pending);
    assert_eq!(rerun.children().len(), 2);
}

#[test]
fn a_failed_worker_fails_the_task() {
    let mut evicted = worker_pod(1, "Failed", false);
    evicted["status"]["reason"] = json!("Evicted");
    evicted["status"]["message"] = json!("The node was low on resource: memory.");
    let out = on_two_gpu_nodes()
        .related(worker_pod(0, "Running", true))
        .related(evicted)
        .reconcile::<MLTaskPlugin>()
        .unwrap();
    let status = status_of(&out);
    assert_eq!(status.phase, Phase::Failed);
    assert_eq!(condition(&status, "Degraded").status, "True");
    assert_eq!(condition(&status, "Available").status, "False");
    assert!(out.children().is_empty());
    let event = &out.events()[0];
    assert_eq!(event.event_type, EventType::Warning);
    assert!(
        event.message.contains("mltask-sample-1") && event.message.contains("Evicted"),
        "{}",
        event.message
    );
}

#[test]
fn unchanged_world_gives_identical_status() {
    let world = || {
        on_two_gpu_nodes()
            .related(worker_pod(0, "Running", true))
            .related(worker_pod(1, "Running", false))
    };
    let first = world().reconcile::<MLTaskPlugin>().unwrap();
    let status = first.status_json().unwrap().clone();
    let again = world()
        .with_parent(|p| p["status"] = status.clone())
        .at("2026-01-01T01:00:00Z")
        .reconcile::<MLTaskPlugin>()
        .unwrap();
    assert_eq!(again.status_json().unwrap(), &status);
    assert_eq!(again.children(), first.children());
    assert!(again.events().is_empty());
}

fn invalid(edit: impl FnOnce(&mut Value)) -> String {
    match on_two_gpu_nodes()
        .with_parent(edit)
        .reconcile::<MLTaskPlugin>()
    {
        Err(Error::InvalidSpec(m)) => m,
        other => panic!("expected an invalid spec, got {other:?}"),
    }
}

#[test]
fn specs_that_can_never_work_are_invalid() {
    assert!(invalid(|p| p["spec"]["parallelism"] = json!(0)).contains("spec.parallelism"));
    assert!(invalid(|p| p["spec"]["gpusPerWorker"] = json!(0)).contains("spec.gpusPerWorker"));
    assert!(invalid(|p| p["spec"]["image"] = json!("")).contains("spec.image"));
    assert!(
        invalid(|p| p["spec"]["trainingData"] = json!("ftp://data/mnist"))
            .contains("spec.trainingData")
    );
    assert!(
        invalid(|p| p["spec"]["modelOutput"] = json!("pvc://Not_A_Claim"))
            .contains("spec.modelOutput")
    );
    assert!(invalid(|p| p["spec"]["scratch"] = json!("ten gigs")).contains("spec.scratch"));
    assert!(invalid(|p| p["spec"]["scratch"] = json!("0")).contains("spec.scratch"));
    assert!(invalid(|p| p["spec"]["scratch"] = json!("1500m")).contains("spec.scratch"));
    assert!(invalid(|p| p["metadata"]["name"] = json!("a".repeat(53))).contains("at most 52"));
    assert!(invalid(|p| p["spec"]["parallelism"] = json!("two")).contains("schema"));
}

#[test]
fn an_integer_scratch_size_is_accepted() {
    let out = on_two_gpu_nodes()
        .with_parent(|p| p["spec"]["scratch"] = json!(1073741824))
        .reconcile::<MLTaskPlugin>()
        .unwrap();
    let scratch = pod_spec(&out)
        .volumes
        .unwrap()
        .into_iter()
        .find(|v| v.name == "scratch")
        .unwrap();
    assert_eq!(
        scratch.empty_dir.unwrap().size_limit.unwrap().0,
        "1073741824",
        "decimal input stays decimal"
    );
}

#[test]
fn describe_declares_children_related_kinds_and_the_crd() {
    let d = MLTaskPlugin::describe();
    assert_eq!(d.name, "mltask");
    assert_eq!(d.parent.kind, "MLTask");
    assert_eq!(d.parent.api_version(), "kuwa.dev/v1alpha1");
    let kinds: Vec<_> = d.children.iter().map(|g| g.kind.as_str()).collect();
    assert_eq!(kinds, ["StatefulSet", "Service"]);
    let related: Vec<_> = d
        .related
        .iter()
        .map(|(g, m)| (g.kind.as_str(), m.clone()))
        .collect();
    assert_eq!(
        related,
        [
            ("Node", RelatedMapping::AllInCluster),
            ("Pod", RelatedMapping::OwnedByChild)
        ]
    );

    let crd = d.crd.unwrap();
    assert_eq!(crd.metadata.name.as_deref(), Some("mltasks.kuwa.dev"));
    let version = &crd.spec.versions[0];
    let schema = serde_json::to_value(&version.schema).unwrap();
    let spec = &schema["openAPIV3Schema"]["properties"]["spec"];
    let props = &spec["properties"];
    assert_eq!(props["parallelism"]["minimum"].as_f64(), Some(1.0));
    assert_eq!(props["gpusPerWorker"]["minimum"].as_f64(), Some(1.0));
    assert_eq!(props["trainingData"]["pattern"], location::PATTERN);
    assert_eq!(props["scratch"]["x-kubernetes-int-or-string"], true);
    let mut required: Vec<_> = spec["required"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    required.sort_unstable();
    assert_eq!(
        required,
        [
            "gpusPerWorker",
            "image",
            "modelOutput",
            "parallelism",
            "trainingData"
        ]
    );
    let columns: Vec<_> = version
        .additional_printer_columns
        .iter()
        .flatten()
        .map(|c| c.name.as_str())
        .collect();
    assert!(
        columns.contains(&"Phase") && columns.contains(&"Schedulable"),
        "{columns:?}"
    );
}

//! # MLTask plugin
//!
//! GPU-as-a-service from the CyberAgent talks: ML engineers say which image
//! to run, where the training data is, where the model goes, how much
//! scratch space, how many workers and how many GPUs each, and an `MLTask`
//! (`kuwa.dev/v1alpha1`) becomes
//!
//! * a StatefulSet `<name>` of `spec.parallelism` workers started together
//!   (`podManagementPolicy: Parallel`), each requesting and limited to
//!   `spec.gpusPerWorker` `nvidia.com/gpu`, on Nodes labelled
//!   `kuwa.dev/gpu=true`, with `RANK` (the Pod's ordinal, from the
//!   `apps.kubernetes.io/pod-index` label), `WORLD_SIZE`, `MASTER_ADDR`
//!   (rank 0 through the headless Service) and `MASTER_PORT` — PyTorch's
//!   `env://` rendezvous;
//! * a headless Service `<name>-workers` giving each worker a DNS name.
//!
//! Data locations are URIs handed to the workload (`TRAINING_DATA`,
//! `MODEL_OUTPUT`) or `pvc://<claim>`, mounted at `/data` (read-only) and
//! `/output`. `spec.scratch` adds an `emptyDir` of that size at `/scratch`
//! in every worker (each worker has its own; it is not shared between
//! them).
//!
//! ## Schedulability
//!
//! Nodes are related objects, so the plugin sees GPU capacity come and go.
//! When no Node can hold one worker's GPUs, or all of them together cannot
//! hold the workers, the result is not an error but an Ok status with
//! `Schedulable=False` and a message giving the numbers, and **no
//! children**: the host then deletes any workers created earlier (a task
//! that no longer fits, e.g. after its GPU nodes were cordoned, is stopped
//! rather than left half-scheduled) and creates them again when capacity
//! returns. See [`gpus`] for what counts as capacity.
//!
//! ## Phase
//!
//! `Pending`, `Running`, `Succeeded` or `Failed`, read from the worker Pods
//! (see [`workers::observe`]). `Succeeded` and `Failed` are final for a
//! spec generation: the workers are removed (a StatefulSet would otherwise
//! restart finished Pods and train again) and the phase stays until the
//! spec changes, which runs the task again.

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{Node, Pod, Service};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use kuwa_sdk::{
    Conditions, Description, Desired, Error, Event, Observed, Reconciler, RelatedMapping,
};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

mod children;
pub mod gpus;
pub mod location;
pub mod quantity;
pub mod workers;

pub use children::{DATA_DIR, OUTPUT_DIR, POD_INDEX_LABEL, SCRATCH_DIR};
pub use location::Location;
pub use workers::Phase;

/// The rendezvous port on rank 0 (`MASTER_PORT`), PyTorch's default.
pub const MASTER_PORT: u16 = 29500;

/// The longest task name whose children are all valid: the StatefulSet
/// controller labels Pods `controller-revision-hash=<name>-<10 chars>`,
/// and label values hold at most 63 characters.
pub const MAX_NAME_LEN: usize = 52;

/// A training task on GPUs.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, JsonSchema)]
#[kube(
    group = "kuwa.dev",
    version = "v1alpha1",
    kind = "MLTask",
    plural = "mltasks",
    shortname = "mlt",
    namespaced,
    status = "MLTaskStatus",
    doc = "A machine-learning task: parallel GPU workers wired for distributed training.",
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Workers","type":"integer","jsonPath":".spec.parallelism"}"#,
    printcolumn = r#"{"name":"Ready","type":"integer","jsonPath":".status.readyWorkers"}"#,
    printcolumn = r#"{"name":"GPUs","type":"integer","jsonPath":".spec.gpusPerWorker","description":"GPUs per worker"}"#,
    printcolumn = r#"{"name":"Schedulable","type":"string","jsonPath":".status.conditions[?(@.type==\"Schedulable\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct MLTaskSpec {
    /// The container image of the workers.
    #[schemars(length(min = 1))]
    pub image: String,
    /// The command (entrypoint) to run; the image's when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    /// Arguments to the command.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub args: Option<Vec<String>>,
    /// Where the training data is: `s3://…`, `gs://…` or `https://…` (passed
    /// as `TRAINING_DATA`), or `pvc://<claim>` (mounted read-only at `/data`,
    /// `TRAINING_DATA=/data`).
    #[schemars(pattern(location::PATTERN))]
    pub training_data: String,
    /// Where the model goes: a URI (passed as `MODEL_OUTPUT`) or
    /// `pvc://<claim>` (mounted at `/output`, `MODEL_OUTPUT=/output`; with
    /// several workers the claim must allow ReadWriteMany).
    #[schemars(pattern(location::PATTERN))]
    pub model_output: String,
    /// Scratch space per worker (a size such as `10Gi`), an emptyDir at
    /// `/scratch`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "size_schema")]
    pub scratch: Option<Quantity>,
    /// How many workers run in parallel (`WORLD_SIZE`).
    #[schemars(range(min = 1))]
    pub parallelism: i32,
    /// GPUs (`nvidia.com/gpu`) each worker requests; all on one node.
    #[schemars(range(min = 1))]
    pub gpus_per_worker: i32,
}

/// A quantity field: an integer or a string such as `10Gi` (the schema
/// `k8s-openapi` gives `Quantity`, without its page-long description).
fn size_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({ "x-kubernetes-int-or-string": true })
}

/// What the plugin observed of the task.
#[derive(Serialize, Deserialize, Clone, Debug, Default, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MLTaskStatus {
    /// `Pending`, `Running`, `Succeeded` or `Failed`.
    #[serde(default)]
    pub phase: Phase,
    /// Workers whose Pods are ready.
    #[serde(default)]
    pub ready_workers: i32,
    /// The generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Schedulable`, `Available`, `Progressing` and `Degraded`.
    #[serde(default)]
    pub conditions: Vec<Condition>,
}

/// The validated spec, ready to build children from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Where the training data is.
    pub training_data: Location,
    /// Where the model goes.
    pub model_output: Location,
    /// The scratch size in canonical form, if any.
    pub scratch: Option<String>,
}

/// The plugin.
pub struct MLTaskPlugin;

fn parent_name(parent: &MLTask) -> &str {
    parent.metadata.name.as_deref().unwrap_or_default()
}

/// True for a DNS-1035 label (what Service names must be).
fn is_dns_label(name: &str) -> bool {
    name.starts_with(|c: char| c.is_ascii_lowercase())
        && !name.ends_with('-')
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

fn validate(parent: &MLTask) -> Result<Plan, Error> {
    let name = parent_name(parent);
    if !is_dns_label(name) || name.len() > MAX_NAME_LEN {
        return Err(Error::invalid_spec(format!(
            "name {name:?} cannot name the worker Service and StatefulSet: use at most \
             {MAX_NAME_LEN} lowercase letters, digits and '-', starting with a letter"
        )));
    }
    let spec = &parent.spec;
    if spec.image.is_empty() || spec.image.contains(char::is_whitespace) {
        return Err(Error::invalid_spec(format!(
            "spec.image {:?} is not an image reference",
            spec.image
        )));
    }
    if spec.parallelism < 1 {
        return Err(Error::invalid_spec(format!(
            "spec.parallelism must be 1 or more, got {}",
            spec.parallelism
        )));
    }
    if spec.gpus_per_worker < 1 {
        return Err(Error::invalid_spec(format!(
            "spec.gpusPerWorker must be 1 or more, got {}",
            spec.gpus_per_worker
        )));
    }
    let scratch = spec
        .scratch
        .as_ref()
        .map(|q| match quantity::parse(&q.0).and_then(|p| p.canonical_whole()) {
            Some(size) if size != "0" => Ok(size),
            _ => Err(Error::invalid_spec(format!(
                "spec.scratch {:?} is not a size: use a positive whole number of bytes such as 10Gi",
                q.0
            ))),
        })
        .transpose()?;
    Ok(Plan {
        training_data: location::parse("trainingData", &spec.training_data)?,
        model_output: location::parse("modelOutput", &spec.model_output)?,
        scratch,
    })
}

/// Conditions for `phase`, given the GPU verdict.
fn conditions(
    parent: &MLTask,
    observed: &Observed,
    phase: Phase,
    ready: i32,
    verdict: &gpus::Verdict,
) -> Vec<Condition> {
    let want = parent.spec.parallelism;
    let previous = parent
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default();
    let c = Conditions::new(previous, observed.now(), parent.metadata.generation).set(
        "Schedulable",
        verdict.schedulable,
        verdict.reason,
        verdict.message.clone(),
    );
    let workers = format!("{ready}/{want} workers ready");
    let c = match phase {
        Phase::Running => c
            .set(
                "Available",
                true,
                "Running",
                format!("all {want} workers running"),
            )
            .set(
                "Progressing",
                false,
                "Running",
                format!("all {want} workers running"),
            ),
        Phase::Pending if !verdict.schedulable => c
            .set(
                "Available",
                false,
                "Unschedulable",
                "no workers: the GPU request does not fit the cluster",
            )
            .set(
                "Progressing",
                false,
                "Unschedulable",
                "waiting for GPU capacity (see Schedulable)",
            ),
        Phase::Pending => c
            .set("Available", false, "WorkersNotReady", workers.clone())
            .set("Progressing", true, "StartingWorkers", workers),
        Phase::Succeeded => c
            .set("Available", false, "Succeeded", "the task succeeded")
            .set(
                "Progressing",
                false,
                "Finished",
                "the task finished; change the spec to run it again",
            ),
        Phase::Failed => c.set("Available", false, "Failed", "the task failed").set(
            "Progressing",
            false,
            "Finished",
            "the task finished; change the spec to run it again",
        ),
    };
    let c = if phase == Phase::Failed {
        c.set(
            "Degraded",
            true,
            "WorkerFailed",
            "a worker failed; change the spec to run the task again",
        )
    } else {
        c.set("Degraded", false, "AsExpected", "the spec is valid")
    };
    c.build()
}

impl Reconciler for MLTaskPlugin {
    type Parent = MLTask;
    type Status = MLTaskStatus;

    fn describe() -> Description {
        Description::new::<MLTask>("mltask", env!("CARGO_PKG_VERSION"))
            .owns::<StatefulSet>()
            .owns::<Service>()
            .watches::<Node>(RelatedMapping::AllInCluster)
            .watches::<Pod>(RelatedMapping::OwnedByChild)
    }

    fn reconcile(parent: &MLTask, observed: &Observed) -> Result<Desired<MLTaskStatus>, Error> {
        let plan = validate(parent)?;
        let spec = &parent.spec;
        let generation = parent.metadata.generation;
        let verdict = gpus::check(
            &observed.related::<Node>()?,
            u64::try_from(spec.parallelism).unwrap_or_default(),
            u64::try_from(spec.gpus_per_worker).unwrap_or_default(),
        );
        let workers = workers::observe(
            parent_name(parent),
            spec.parallelism,
            &observed.related::<Pod>()?,
        );

        let previous = parent.status.as_ref();
        let previous_phase = previous.map(|s| s.phase);
        // A finished task stays finished until its spec changes.
        let finished = previous
            .filter(|s| {
                s.phase.is_terminal() && generation.is_some() && s.observed_generation == generation
            })
            .map(|s| s.phase);
        let phase = finished.unwrap_or(if workers.phase.is_terminal() || verdict.schedulable {
            workers.phase
        } else {
            Phase::Pending
        });

        let mut desired = Desired::new();
        if !phase.is_terminal() && verdict.schedulable {
            desired = desired
                .child(children::workers_statefulset(parent, &plan))
                .child(children::workers_service(parent));
        }
        let was_schedulable = previous
            .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Schedulable"))
            .is_none_or(|c| c.status == "True");
        if was_schedulable && !verdict.schedulable {
            desired = desired.event(Event::warning("Unschedulable", verdict.message.clone()));
        }
        if previous_phase != Some(phase) {
            match phase {
                Phase::Succeeded => {
                    desired = desired.event(Event::normal(
                        "Succeeded",
                        "all workers succeeded; removing them",
                    ));
                }
                Phase::Failed => {
                    let why = workers
                        .failure
                        .clone()
                        .unwrap_or_else(|| "a worker failed".to_owned());
                    desired = desired.event(Event::warning(
                        "WorkerFailed",
                        format!("{why}; removing the workers"),
                    ));
                }
                Phase::Pending | Phase::Running => {}
            }
        }
        let status = MLTaskStatus {
            phase,
            ready_workers: workers.ready,
            observed_generation: generation,
            conditions: conditions(parent, observed, phase, workers.ready, &verdict),
        };
        Ok(desired.status(status))
    }
}

kuwa_sdk::export_plugin!(MLTaskPlugin);

#[cfg(test)]
mod tests;

//! What the worker Pods say about the task: how many are ready, and whether
//! the task runs, finished or failed.

use k8s_openapi::api::core::v1::Pod;
use kuwa_sdk::pods::{is_ready, statefulset_ordinal};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The lifecycle phase of a task.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, JsonSchema, PartialEq, Eq)]
pub enum Phase {
    /// Workers are not all up yet (or cannot be scheduled).
    #[default]
    Pending,
    /// Every worker is ready (or already finished its part).
    Running,
    /// Every worker Pod reported phase `Succeeded`.
    Succeeded,
    /// A worker Pod reported phase `Failed`.
    Failed,
}

impl Phase {
    /// Succeeded and Failed are final for a spec generation.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed)
    }
}

/// The workers as observed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workers {
    /// Workers with condition `Ready=True`.
    pub ready: i32,
    /// The phase the Pods add up to.
    pub phase: Phase,
    /// For a failed task, which worker failed and why (for an event).
    pub failure: Option<String>,
}

fn pod_phase(pod: &Pod) -> &str {
    pod.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("Pending")
}

/// Reads the worker Pods of StatefulSet `statefulset` (ordinals below
/// `parallelism`):
///
/// * **Failed** when any worker Pod is `Failed`;
/// * **Succeeded** when all `parallelism` workers exist and are `Succeeded`;
/// * **Running** when all exist and each is ready or `Succeeded` (ranks may
///   finish at different times);
/// * **Pending** otherwise.
pub fn observe(statefulset: &str, parallelism: i32, pods: &[Pod]) -> Workers {
    let mut workers: Vec<(u32, &Pod)> = pods
        .iter()
        .filter_map(|p| statefulset_ordinal(p, statefulset).map(|o| (o, p)))
        .filter(|(o, _)| i64::from(*o) < i64::from(parallelism))
        .collect();
    workers.sort_by_key(|(o, _)| *o);
    workers.dedup_by_key(|(o, _)| *o);

    let ready =
        i32::try_from(workers.iter().filter(|(_, p)| is_ready(p)).count()).unwrap_or(i32::MAX);
    let all_present = i64::try_from(workers.len()).unwrap_or(i64::MAX) == i64::from(parallelism);
    let failed = workers.iter().find(|(_, p)| pod_phase(p) == "Failed");
    let succeeded = workers
        .iter()
        .filter(|(_, p)| pod_phase(p) == "Succeeded")
        .count();

    let (phase, failure) = if let Some((_, pod)) = failed {
        let name = pod.metadata.name.as_deref().unwrap_or_default();
        let status = pod.status.as_ref();
        let why = [
            status.and_then(|s| s.reason.as_deref()),
            status.and_then(|s| s.message.as_deref()),
        ]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join(": ");
        let failure = if why.is_empty() {
            format!("worker {name} failed")
        } else {
            format!("worker {name} failed ({why})")
        };
        (Phase::Failed, Some(failure))
    } else if all_present && succeeded == workers.len() {
        (Phase::Succeeded, None)
    } else if all_present
        && workers
            .iter()
            .all(|(_, p)| is_ready(p) || pod_phase(p) == "Succeeded")
    {
        (Phase::Running, None)
    } else {
        (Phase::Pending, None)
    };
    Workers {
        ready,
        phase,
        failure,
    }
}

//! Can the cluster run the workers at all? Compares the GPU request with
//! the allocatable `nvidia.com/gpu` of the Nodes the workers may land on.
//!
//! A Node counts when it carries the workers' node selector
//! ([`GPU_NODE_LABEL`]`=true`) and is not cordoned (`spec.unschedulable`).
//! This is about capacity, not current use: GPUs held by other Pods are not
//! subtracted, so `Schedulable=True` means "could run on an empty cluster";
//! a busy cluster shows up as Pending workers instead. Taints other than
//! `nvidia.com/gpu` (which the workers tolerate) are not considered.

use k8s_openapi::api::core::v1::Node;

use crate::quantity;

/// The extended resource name of NVIDIA GPUs.
pub const GPU_RESOURCE: &str = "nvidia.com/gpu";

/// The Node label the workers select (value `"true"`).
pub const GPU_NODE_LABEL: &str = "kuwa.dev/gpu";

/// The verdict on a GPU request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// Whether every worker fits somewhere.
    pub schedulable: bool,
    /// The condition reason.
    pub reason: &'static str,
    /// The condition message.
    pub message: String,
}

/// Allocatable GPUs of each Node the workers may use.
fn gpu_capacities(nodes: &[Node]) -> Vec<u64> {
    nodes
        .iter()
        .filter(|n| {
            n.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(GPU_NODE_LABEL))
                .map(String::as_str)
                == Some("true")
        })
        .filter(|n| n.spec.as_ref().and_then(|s| s.unschedulable) != Some(true))
        .filter_map(|n| n.status.as_ref()?.allocatable.as_ref()?.get(GPU_RESOURCE))
        .filter_map(|q| quantity::parse(&q.0))
        .map(|q| u64::try_from(q.floor()).unwrap_or(u64::MAX))
        .filter(|&gpus| gpus > 0)
        .collect()
}

/// Whether `parallelism` workers of `gpus_per_worker` GPUs each fit on
/// `nodes`, with a message saying why not.
pub fn check(nodes: &[Node], parallelism: u64, gpus_per_worker: u64) -> Verdict {
    let capacities = gpu_capacities(nodes);
    let request = format!("{parallelism} workers × {gpus_per_worker} GPUs");
    let Some(&largest) = capacities.iter().max() else {
        return Verdict {
            schedulable: false,
            reason: "NoGPUNodes",
            message: format!(
                "no node can fit {gpus_per_worker} GPUs per worker: no schedulable node labelled \
                 {GPU_NODE_LABEL}=true has allocatable {GPU_RESOURCE}"
            ),
        };
    };
    if largest < gpus_per_worker {
        return Verdict {
            schedulable: false,
            reason: "WorkerTooLarge",
            message: format!(
                "no node can fit {gpus_per_worker} GPUs per worker: the largest GPU node has {largest}"
            ),
        };
    }
    let total: u64 = capacities.iter().fold(0, |sum, &c| sum.saturating_add(c));
    let needed = parallelism.saturating_mul(gpus_per_worker);
    if total < needed {
        return Verdict {
            schedulable: false,
            reason: "InsufficientGPUs",
            message: format!(
                "the cluster has {total} allocatable GPUs on schedulable GPU nodes, but {request} need {needed}"
            ),
        };
    }
    // A worker cannot span Nodes: count how many fit whole.
    let fitting: u64 = capacities
        .iter()
        .fold(0, |sum, &c| sum.saturating_add(c / gpus_per_worker));
    if fitting < parallelism {
        return Verdict {
            schedulable: false,
            reason: "InsufficientGPUs",
            message: format!(
                "only {fitting} of {parallelism} workers fit: each needs {gpus_per_worker} GPUs on one node, \
                 and the {} schedulable GPU nodes have {total} GPUs in all",
                capacities.len()
            ),
        };
    }
    Verdict {
        schedulable: true,
        reason: "GPUsAvailable",
        message: format!("{request} fit on the schedulable GPU nodes"),
    }
}

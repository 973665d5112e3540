//! Which memcached backends the proxy may use: the ready Pods of the
//! backend StatefulSet, as `ip:port` endpoints in ordinal order.

use k8s_openapi::api::core::v1::Pod;
use kuwa_sdk::pods::{is_ready, statefulset_ordinal};

/// One backend Pod the proxy may route to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    /// The Pod's StatefulSet ordinal (`<statefulset>-<ordinal>`).
    pub ordinal: u32,
    /// `ip:port`, IPv6 addresses in brackets as mcrouter wants them.
    pub endpoint: String,
}

fn endpoint(ip: &str, port: u16) -> String {
    if ip.contains(':') {
        format!("[{ip}]:{port}")
    } else {
        format!("{ip}:{port}")
    }
}

/// The backends of StatefulSet `statefulset` that can serve: Pods with an
/// ordinal below `replicas` (Pods above it are being scaled away), not being
/// deleted, with condition `Ready=True` and a Pod IP. Sorted by ordinal so
/// the same Pods always give the same list.
pub fn ready(statefulset: &str, replicas: i32, port: u16, pods: &[Pod]) -> Vec<Backend> {
    let mut backends: Vec<Backend> = pods
        .iter()
        .filter(|pod| pod.metadata.deletion_timestamp.is_none() && is_ready(pod))
        .filter_map(|pod| {
            let ordinal = statefulset_ordinal(pod, statefulset)?;
            let ip = pod
                .status
                .as_ref()?
                .pod_ip
                .as_deref()
                .filter(|ip| !ip.is_empty())?;
            (i64::from(ordinal) < i64::from(replicas)).then(|| Backend {
                ordinal,
                endpoint: endpoint(ip, port),
            })
        })
        .collect();
    backends.sort_by_key(|b| b.ordinal);
    backends.dedup_by_key(|b| b.ordinal);
    backends
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn pod(name: &str, owner: &str, ip: &str, ready: &str) -> Pod {
        serde_json::from_value(json!({
            "metadata": {
                "name": name,
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "StatefulSet", "name": owner, "uid": "u", "controller": true}]
            },
            "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": ready}]}
        }))
        .unwrap()
    }

    #[test]
    fn only_ready_pods_of_the_statefulset_in_ordinal_order() {
        let pods = [
            pod("mc-10", "mc", "10.0.0.10", "True"),
            pod("mc-2", "mc", "10.0.0.2", "True"),
            pod("mc-1", "mc", "10.0.0.1", "False"),
            pod("mc-0", "mc", "fd00::1", "True"),
            pod("mc-extra-0", "mc-extra", "10.0.0.9", "True"),
            pod("mc-01", "mc", "10.0.0.8", "True"),
            pod("mc-3", "other", "10.0.0.3", "True"),
            pod("mc-4", "mc", "", "True"),
        ];
        let got: Vec<_> = ready("mc", 11, 11211, &pods)
            .into_iter()
            .map(|b| b.endpoint)
            .collect();
        assert_eq!(
            got,
            ["[fd00::1]:11211", "10.0.0.2:11211", "10.0.0.10:11211"]
        );
    }

    #[test]
    fn pods_above_the_replica_count_are_left_out() {
        let pods = [
            pod("mc-0", "mc", "10.0.0.1", "True"),
            pod("mc-1", "mc", "10.0.0.2", "True"),
        ];
        assert_eq!(ready("mc", 1, 11211, &pods).len(), 1);
    }
}

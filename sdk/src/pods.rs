//! Reading Pods a plugin observes as related objects (e.g. the Pods of a
//! StatefulSet it owns, declared with `RelatedMapping::OwnedByChild`).

use k8s_openapi::api::core::v1::Pod;

/// The ordinal of `pod` when it is a Pod of StatefulSet `statefulset`: it is
/// owned by it and named `<statefulset>-<ordinal>` in canonical decimal (the
/// StatefulSet controller never writes `+1` or `01`, so neither counts).
pub fn statefulset_ordinal(pod: &Pod, statefulset: &str) -> Option<u32> {
    let owned = pod
        .metadata
        .owner_references
        .iter()
        .flatten()
        .any(|o| o.kind == "StatefulSet" && o.name == statefulset);
    if !owned {
        return None;
    }
    let suffix = pod
        .metadata
        .name
        .as_deref()?
        .strip_prefix(statefulset)?
        .strip_prefix('-')?;
    let canonical = !suffix.is_empty()
        && suffix.bytes().all(|b| b.is_ascii_digit())
        && (suffix.len() == 1 || !suffix.starts_with('0'));
    if canonical { suffix.parse().ok() } else { None }
}

/// Whether `pod` has condition `Ready=True`.
pub fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn pod(name: &str, owner: &str, ready: bool) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": name, "ownerReferences": [
                {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": owner, "uid": "u"}]},
            "status": {"conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]},
        }))
        .unwrap()
    }

    #[test]
    fn ordinals_of_statefulset_pods() {
        assert_eq!(statefulset_ordinal(&pod("db-0", "db", true), "db"), Some(0));
        assert_eq!(
            statefulset_ordinal(&pod("db-12", "db", true), "db"),
            Some(12)
        );
        assert_eq!(statefulset_ordinal(&pod("db-01", "db", true), "db"), None);
        assert_eq!(statefulset_ordinal(&pod("db-+1", "db", true), "db"), None);
        assert_eq!(
            statefulset_ordinal(&pod("db-backup-0", "db", true), "db"),
            None
        );
        assert_eq!(statefulset_ordinal(&pod("db-0", "other", true), "db"), None);
    }

    #[test]
    fn readiness() {
        assert!(is_ready(&pod("a", "b", true)));
        assert!(!is_ready(&pod("a", "b", false)));
        assert!(!is_ready(&Pod::default()));
    }
}

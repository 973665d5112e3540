//! Related objects (DESIGN §1): the objects of kinds a plugin reads without
//! owning them, mapped to its parents in both directions —
//! [`parents_of`] (a related object changed: which parents look again) and
//! [`objects_of`] (a parent is reconciled: which related objects it sees).
//!
//! Reads are granted like writes: a related object of a namespaced kind
//! reaches a plugin only from a namespace its grant allows, whatever the
//! mapping says (an `all-in-cluster` Secret watch sees only the granted
//! namespaces' Secrets).

use std::sync::Arc;

use kube::ResourceExt;
use kube::api::DynamicObject;
use serde_json::Value;

use crate::active::ActivePlugin;
use crate::cache::{CachedObject, KindCache, ObjKey};
use crate::plan::object_json;
use crate::plugin::info::RelatedMapping;
use crate::queue::QueueKey;

/// Whether the label map at `pointer` in `parent` selects `labels`. An
/// absent or empty selector selects nothing (never "everything").
pub fn selector_matches(
    parent: &Value,
    pointer: &str,
    labels: &std::collections::BTreeMap<String, String>,
) -> bool {
    match parent.pointer(pointer).and_then(Value::as_object) {
        Some(selector) if !selector.is_empty() => selector.iter().all(|(k, v)| {
            v.as_str()
                .is_some_and(|v| labels.get(k).map(String::as_str) == Some(v))
        }),
        _ => false,
    }
}

/// Whether `plugin` may read `object` from `cache`: cluster-scoped kinds as
/// granted, namespaced ones only from granted namespaces.
fn readable(plugin: &ActivePlugin, cache: &KindCache, object: &CachedObject) -> bool {
    !cache.namespaced
        || plugin
            .loaded
            .grant
            .allows_namespace(object.namespace().as_deref())
}

/// The parents a change of a related `object` (seen in `cache`, mapped by
/// `mapping`) concerns.
pub fn parents_of(
    plugin: &ActivePlugin,
    cache: &KindCache,
    mapping: &RelatedMapping,
    object: &CachedObject,
) -> Vec<QueueKey> {
    if !readable(plugin, cache, object) {
        return Vec::new();
    }
    match mapping {
        RelatedMapping::OwnedByChild => object
            .owner_references()
            .iter()
            .flat_map(|owner| {
                let key = ObjKey {
                    namespace: object.namespace(),
                    name: owner.name.clone(),
                };
                plugin
                    .children
                    .iter()
                    .filter(|c| {
                        c.gvk.kind == owner.kind && c.gvk.api_version() == owner.api_version
                    })
                    .filter_map(move |c| c.get(&key))
                    .filter(|child| child.uid().as_deref() == Some(owner.uid.as_str()))
                    .filter_map(|child| plugin.parent_of(&child))
                    .collect::<Vec<_>>()
            })
            .collect(),
        RelatedMapping::LabelSelectorFromParent(pointer) => {
            let labels = object.labels();
            let parents = match object.namespace() {
                Some(ns) => plugin.parent.in_namespace(&ns),
                None => plugin.parent.list(),
            };
            parents
                .iter()
                .filter(|p| selector_matches(&p.value(), pointer, labels))
                .map(|p| plugin.key(p.namespace(), p.name_any()))
                .collect()
        }
        RelatedMapping::AllInNamespace => plugin.parents_in(object.namespace().as_deref()),
        RelatedMapping::AllInCluster => plugin.parents_in(None),
    }
}

/// The related objects `parent` sees, per the plugin's mappings and grant.
pub fn objects_of(
    plugin: &ActivePlugin,
    parent: &DynamicObject,
    children: &[Arc<CachedObject>],
) -> Vec<Arc<CachedObject>> {
    let mut out = Vec::new();
    let namespace = parent.namespace();
    for (cache, mapping) in &plugin.related {
        let found: Vec<Arc<CachedObject>> = match mapping {
            RelatedMapping::OwnedByChild => children
                .iter()
                .flat_map(|child| cache.owned_by(&child.uid().unwrap_or_default()))
                .collect(),
            RelatedMapping::LabelSelectorFromParent(pointer) => {
                let parent_json = object_json(parent);
                let candidates = match &namespace {
                    Some(ns) => cache.in_namespace(ns),
                    None => cache.list(),
                };
                candidates
                    .into_iter()
                    .filter(|o| selector_matches(&parent_json, pointer, o.labels()))
                    .collect()
            }
            RelatedMapping::AllInNamespace => match &namespace {
                Some(ns) => cache.in_namespace(ns),
                None => cache.list(),
            },
            RelatedMapping::AllInCluster => cache.list(),
        };
        out.extend(found.into_iter().filter(|o| readable(plugin, cache, o)));
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use serde_json::json;

    use super::*;

    #[test]
    fn selectors_match_only_when_every_label_matches() {
        let parent = json!({"spec": {"selector": {"app": "db", "tier": "cache"}}});
        let mut labels = BTreeMap::from([("app".to_owned(), "db".to_owned())]);
        assert!(!selector_matches(&parent, "/spec/selector", &labels));
        labels.insert("tier".into(), "cache".into());
        assert!(selector_matches(&parent, "/spec/selector", &labels));
        assert!(!selector_matches(
            &json!({"spec": {"selector": {}}}),
            "/spec/selector",
            &labels
        ));
        assert!(!selector_matches(&json!({}), "/spec/selector", &labels));
    }
}

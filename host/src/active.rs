//! Active plugins: a loaded plugin version bound to the caches of every kind
//! it uses, its writer and its failure streak, and the registry of them.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use kube::ResourceExt;

use crate::apply::PluginWriter;
use crate::cache::{CachedObject, KindCache, ObjKey};
use crate::gvk::Gvk;
use crate::plugin::info::{PluginInfo, RelatedMapping};
use crate::plugin::runtime::LoadedPlugin;
use crate::queue::QueueKey;
use crate::tenant::quarantine::Quarantine;

/// A plugin serving its parents.
pub struct ActivePlugin {
    /// The compiled plugin.
    pub loaded: Arc<LoadedPlugin>,
    /// Cache of the parent kind.
    pub parent: Arc<KindCache>,
    /// Caches of the child kinds (children view), in declaration order.
    pub children: Vec<Arc<KindCache>>,
    /// Caches of the related kinds with their mappings.
    pub related: Vec<(Arc<KindCache>, RelatedMapping)>,
    /// The only way this plugin's writes reach the API server.
    pub writer: PluginWriter,
    /// Consecutive failures and quarantine.
    pub quarantine: Quarantine,
    /// The inputs of parents this version left settled (see [`Settled`]).
    pub settled: Settled,
}

/// Parents whose last reconcile by this version needed no write and asked
/// for no requeue, with a fingerprint of what the plugin was shown (the
/// parent's, children's and related objects' uids and resourceVersions). A
/// reconcile shown exactly the same again has a known outcome (plugins are
/// deterministic: frozen clocks, seeded randomness; time-driven work asks
/// for a requeue), so the host does not call the plugin: a resync of an
/// unchanged world costs a fingerprint, not a call.
#[derive(Debug, Default)]
pub struct Settled(std::sync::Mutex<HashMap<ObjKey, u64>>);

impl Settled {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ObjKey, u64>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether `key` was left settled with exactly these inputs.
    pub fn is(&self, key: &ObjKey, fingerprint: u64) -> bool {
        self.lock().get(key) == Some(&fingerprint)
    }

    /// Records that `key` is settled with these inputs.
    pub fn set(&self, key: ObjKey, fingerprint: u64) {
        self.lock().insert(key, fingerprint);
    }

    /// Forgets `key` (it needed writes, failed, or is gone).
    pub fn forget(&self, key: &ObjKey) {
        self.lock().remove(key);
    }
}

/// The fingerprint of a reconcile's inputs: each object's uid and
/// resourceVersion, in order (children and related objects sorted).
pub fn fingerprint<'a>(
    parent: &kube::api::DynamicObject,
    others: impl Iterator<Item = &'a CachedObject>,
) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut ids: Vec<(&str, &str)> = others
        .map(|o| {
            (
                o.metadata.uid.as_deref().unwrap_or_default(),
                o.metadata.resource_version.as_deref().unwrap_or_default(),
            )
        })
        .collect();
    ids.sort_unstable();
    let mut h = std::collections::hash_map::DefaultHasher::new();
    parent.metadata.uid.hash(&mut h);
    parent.metadata.resource_version.hash(&mut h);
    ids.hash(&mut h);
    h.finish()
}

impl ActivePlugin {
    /// What the plugin declared.
    pub fn info(&self) -> &PluginInfo {
        &self.loaded.info
    }

    /// Every cache the plugin holds.
    pub fn caches(&self) -> impl Iterator<Item = &Arc<KindCache>> {
        std::iter::once(&self.parent)
            .chain(&self.children)
            .chain(self.related.iter().map(|(c, _)| c))
    }

    /// Waits until every cache the plugin reads has listed once, so a
    /// reconcile never mistakes "not listed yet" for "missing".
    pub async fn wait_synced(&self) {
        for c in self.caches() {
            c.wait_synced().await;
        }
    }

    /// Whether every cache the plugin reads has listed once.
    pub fn is_synced(&self) -> bool {
        self.caches().all(|c| c.is_synced())
    }

    /// The kinds of the caches that have not listed yet.
    pub fn unsynced(&self) -> Vec<Gvk> {
        self.caches()
            .filter(|c| !c.is_synced())
            .map(|c| c.gvk.clone())
            .collect()
    }

    /// The queue key of a parent.
    pub fn key(&self, namespace: Option<String>, name: String) -> QueueKey {
        QueueKey {
            plugin: self.info().name.clone(),
            namespace,
            name,
        }
    }

    /// The parent at `key`, from the cache.
    pub fn parent_at(&self, key: &QueueKey) -> Option<Arc<CachedObject>> {
        self.parent.get(&ObjKey {
            namespace: key.namespace.clone(),
            name: key.name.clone(),
        })
    }

    /// The controlling owner reference of `object` if it points at this
    /// plugin's parent kind.
    pub fn parent_of(&self, object: &CachedObject) -> Option<QueueKey> {
        let parent = &self.info().parent;
        let owner = object.owner_references().iter().find(|o| {
            o.controller == Some(true)
                && o.kind == parent.kind
                && o.api_version == parent.api_version()
        })?;
        let namespace = if self.info().parent_namespaced {
            object.namespace()
        } else {
            None
        };
        Some(self.key(namespace, owner.name.clone()))
    }

    /// The keys of every parent (in `namespace`, if given and parents are
    /// namespaced).
    pub fn parents_in(&self, namespace: Option<&str>) -> Vec<QueueKey> {
        let parents = match namespace {
            Some(ns) if self.info().parent_namespaced => self.parent.in_namespace(ns),
            _ => self.parent.list(),
        };
        parents
            .iter()
            .map(|p| self.key(p.namespace(), p.name_any()))
            .collect()
    }

    /// Whether `cache` is one of this plugin's child caches.
    pub fn is_child_cache(&self, gvk: &Gvk, view: crate::cache::View) -> bool {
        self.children
            .iter()
            .any(|c| &c.gvk == gvk && c.view == view)
    }
}

/// The active plugins, by name.
#[derive(Default)]
pub struct Plugins {
    by_name: RwLock<HashMap<Arc<str>, Arc<ActivePlugin>>>,
}

impl Plugins {
    /// The active plugin called `name`.
    pub fn get(&self, name: &str) -> Option<Arc<ActivePlugin>> {
        self.by_name
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
    }

    /// Every active plugin.
    pub fn all(&self) -> Vec<Arc<ActivePlugin>> {
        self.by_name
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Serves `plugin` under its name; returns the version it replaces.
    pub fn insert(&self, plugin: Arc<ActivePlugin>) -> Option<Arc<ActivePlugin>> {
        self.by_name
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(plugin.info().name.clone(), plugin)
    }

    /// Stops serving `name`; returns what was served.
    pub fn remove(&self, name: &str) -> Option<Arc<ActivePlugin>> {
        self.by_name
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn object(uid: &str, rv: &str) -> CachedObject {
        CachedObject::new(
            serde_json::from_value(json!({
                "apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": uid, "namespace": "ns", "uid": uid, "resourceVersion": rv},
            }))
            .unwrap(),
        )
    }

    #[test]
    fn the_fingerprint_changes_with_any_input_and_not_with_order() {
        let parent: kube::api::DynamicObject = serde_json::from_value(json!({
            "apiVersion": "kuwa.dev/v1alpha1", "kind": "WebServer",
            "metadata": {"name": "p", "namespace": "ns", "uid": "p", "resourceVersion": "1"},
        }))
        .unwrap();
        let (a, b) = (object("a", "1"), object("b", "1"));
        let base = fingerprint(&parent, [&a, &b].into_iter());
        assert_eq!(base, fingerprint(&parent, [&b, &a].into_iter()));
        assert_ne!(base, fingerprint(&parent, [&a].into_iter()), "a child gone");
        let b2 = object("b", "2");
        assert_ne!(
            base,
            fingerprint(&parent, [&a, &b2].into_iter()),
            "a child changed"
        );
        let mut edited = parent.clone();
        edited.metadata.resource_version = Some("2".into());
        assert_ne!(
            base,
            fingerprint(&edited, [&a, &b].into_iter()),
            "the parent changed"
        );
        let settled = Settled::default();
        let key = ObjKey::of(&parent);
        assert!(!settled.is(&key, base));
        settled.set(key.clone(), base);
        assert!(settled.is(&key, base));
        settled.forget(&key);
        assert!(!settled.is(&key, base));
    }
}

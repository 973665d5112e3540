//! Active plugins: a loaded plugin version bound to the caches of every kind
//! it uses, its writer and its failure streak, and the registry of them.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use kube::ResourceExt;
use kube::api::DynamicObject;

use crate::apply::PluginWriter;
use crate::cache::{KindCache, ObjKey};
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
    pub fn parent_at(&self, key: &QueueKey) -> Option<Arc<DynamicObject>> {
        self.parent.get(&ObjKey {
            namespace: key.namespace.clone(),
            name: key.name.clone(),
        })
    }

    /// The controlling owner reference of `object` if it points at this
    /// plugin's parent kind.
    pub fn parent_of(&self, object: &DynamicObject) -> Option<QueueKey> {
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

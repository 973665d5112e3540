//! Shared watches and caches: one watch and one in-memory store per kind and
//! [`View`], however many plugins use it, reference-counted (DESIGN §2).
//!
//! Child kinds are watched as [`View::Children`]: only objects carrying the
//! host's `kuwa.dev/plugin` label, so a cluster's thousands of unrelated
//! ConfigMaps or Pods are never cached. Related kinds are watched whole
//! ([`View::All`]), as granted. Objects are stored without the field sets of
//! `managedFields` (only who manages them is kept) and without the kubectl
//! last-applied annotation, and indexed by the uid of each owner reference,
//! so a parent's children (and their children) are found without scanning.
//! Each object is held as a [`CachedObject`]: its (stripped) metadata, which
//! the host indexes, routes and decides by, and the whole object as compact
//! JSON text, which is what a plugin is handed anyway, instead of a tree of
//! `serde_json::Value`s (several times the size of the text).
//! Every change is forwarded to the event router as a [`Change`], through a
//! bounded channel: a router that falls behind slows the watches down
//! instead of growing a backlog without limit.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};

use futures::StreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, ApiResource, DynamicObject, TypeMeta};
use kube::discovery::{self, Scope};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Client, ResourceExt};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::gvk::Gvk;
use crate::metrics::Metrics;
use crate::outage::Failure;

/// Label on each child: the plugin that manages it. Child kinds are watched
/// with a selector on it.
pub const PLUGIN_LABEL: &str = "kuwa.dev/plugin";

/// How many changes may wait for the router before watches pause.
pub const CHANGE_BUFFER: usize = 4096;

/// Which objects of a kind a cache holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum View {
    /// Only objects labelled [`PLUGIN_LABEL`]: the children of some plugin.
    Children,
    /// Every object of the kind (in the watched namespace, if any).
    All,
}

impl View {
    /// `children` or `all`, for metrics and logs.
    pub fn label(self) -> &'static str {
        match self {
            Self::Children => "children",
            Self::All => "all",
        }
    }
}

/// The key of an object in a kind's cache.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjKey {
    /// Namespace (None for cluster-scoped objects).
    pub namespace: Option<String>,
    /// Name.
    pub name: String,
}

impl ObjKey {
    /// The key of `object`.
    pub fn of<K: kube::Resource>(object: &K) -> Self {
        Self {
            namespace: object.meta().namespace.clone(),
            name: object.name_any(),
        }
    }
}

/// One cached object: its metadata (what the host indexes, routes and
/// decides by) and the whole object as compact JSON text (what a plugin is
/// handed). `kube::ResourceExt` works on it for the metadata; the rest is
/// parsed when needed ([`CachedObject::to_dynamic`], [`CachedObject::value`]).
#[derive(Debug, Clone)]
pub struct CachedObject {
    /// Its `apiVersion` and `kind`.
    pub types: Option<TypeMeta>,
    /// Its metadata.
    pub metadata: ObjectMeta,
    json: Box<str>,
}

impl CachedObject {
    /// Holds `object` (callers strip it first). Who manages its fields
    /// (`managedFields`) stays in the metadata only: plugins are not shown it.
    pub fn new(mut object: DynamicObject) -> Self {
        let managed = object.metadata.managed_fields.take();
        let json = serde_json::to_string(&object)
            .unwrap_or_else(|_| "{}".into())
            .into_boxed_str();
        object.metadata.managed_fields = managed;
        Self {
            types: object.types,
            metadata: object.metadata,
            json,
        }
    }

    /// The whole object as JSON text.
    pub fn json(&self) -> &str {
        &self.json
    }

    /// The whole object as a JSON value.
    pub fn value(&self) -> serde_json::Value {
        serde_json::from_str(&self.json).unwrap_or(serde_json::Value::Null)
    }

    /// The whole object as a `DynamicObject`.
    pub fn to_dynamic(&self) -> DynamicObject {
        serde_json::from_str(&self.json).unwrap_or_else(|_| DynamicObject {
            types: self.types.clone(),
            metadata: self.metadata.clone(),
            data: serde_json::Value::Null,
        })
    }
}

impl kube::Resource for CachedObject {
    type DynamicType = ApiResource;
    type Scope = kube::core::DynamicResourceScope;

    fn kind(dt: &ApiResource) -> std::borrow::Cow<'_, str> {
        dt.kind.as_str().into()
    }

    fn group(dt: &ApiResource) -> std::borrow::Cow<'_, str> {
        dt.group.as_str().into()
    }

    fn version(dt: &ApiResource) -> std::borrow::Cow<'_, str> {
        dt.version.as_str().into()
    }

    fn api_version(dt: &ApiResource) -> std::borrow::Cow<'_, str> {
        dt.api_version.as_str().into()
    }

    fn plural(dt: &ApiResource) -> std::borrow::Cow<'_, str> {
        dt.plural.as_str().into()
    }

    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// A change seen by a watch, sent to the event router.
#[derive(Debug, Clone)]
pub struct Change {
    /// The kind of the object.
    pub gvk: Gvk,
    /// The view of the cache that saw it.
    pub view: View,
    /// The object (its last known state when deleted).
    pub object: Arc<CachedObject>,
    /// Whether it was deleted.
    pub deleted: bool,
    /// Its previous state, when it was updated: the router also requeues
    /// the parents the object no longer maps to (an owner or label change).
    pub previous: Option<Arc<CachedObject>>,
}

/// Why a kind could not be cached.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// API discovery does not know the kind (e.g. its CRD is not installed
    /// yet). Retryable.
    #[error("the API server does not serve {gvk}: {source}")]
    Discovery {
        /// The kind.
        gvk: Gvk,
        /// The discovery error.
        #[source]
        source: kube::Error,
    },
}

#[derive(Default)]
struct Store {
    objects: HashMap<ObjKey, Arc<CachedObject>>,
    by_owner: HashMap<String, HashSet<ObjKey>>,
    /// Objects of a list in progress (between `Init` and `InitDone`).
    relist: Option<HashMap<ObjKey, Arc<CachedObject>>>,
}

impl Store {
    fn index(&mut self, key: &ObjKey, object: &CachedObject) {
        for owner in object.owner_references() {
            self.by_owner
                .entry(owner.uid.clone())
                .or_default()
                .insert(key.clone());
        }
    }

    fn unindex(&mut self, key: &ObjKey, object: &CachedObject) {
        for owner in object.owner_references() {
            if let Some(keys) = self.by_owner.get_mut(&owner.uid) {
                keys.remove(key);
                if keys.is_empty() {
                    self.by_owner.remove(&owner.uid);
                }
            }
        }
    }

    /// Stores `object`. Returns `None` when nothing changed, else the
    /// previous state (`Some(None)` for a new object).
    #[allow(clippy::option_option)]
    fn upsert(&mut self, object: Arc<CachedObject>) -> Option<Option<Arc<CachedObject>>> {
        let key = ObjKey::of(&*object);
        let changed = self.objects.get(&key).is_none_or(|old| {
            old.resource_version() != object.resource_version() || old.uid() != object.uid()
        });
        let previous = self.objects.insert(key.clone(), object.clone());
        if let Some(old) = &previous {
            self.unindex(&key, old);
        }
        self.index(&key, &object);
        changed.then_some(previous)
    }

    fn remove(&mut self, key: &ObjKey) -> Option<Arc<CachedObject>> {
        let old = self.objects.remove(key)?;
        self.unindex(key, &old);
        Some(old)
    }
}

/// Drops what the host never reads, to keep the cache small, and fills in
/// `apiVersion`/`kind` (list items arrive without them; plugins need them).
/// Of `managedFields` only manager, operation and subresource stay: the host
/// deletes only children its own field manager applied.
fn strip(mut object: DynamicObject, resource: &ApiResource) -> CachedObject {
    if object.types.is_none() {
        object.types = Some(kube::api::TypeMeta {
            api_version: resource.api_version.clone(),
            kind: resource.kind.clone(),
        });
    }
    if let Some(managed) = object.metadata.managed_fields.as_mut() {
        for entry in managed.iter_mut() {
            entry.fields_v1 = None;
            entry.fields_type = None;
            entry.time = None;
            entry.api_version = None;
        }
    }
    if let Some(annotations) = object.metadata.annotations.as_mut() {
        annotations.remove("kubectl.kubernetes.io/last-applied-configuration");
    }
    CachedObject::new(object)
}

/// The cache of one kind.
pub struct KindCache {
    /// The kind.
    pub gvk: Gvk,
    /// Which of its objects this cache holds.
    pub view: View,
    /// How to reach it in the API.
    pub resource: ApiResource,
    /// Whether objects of the kind are namespaced.
    pub namespaced: bool,
    store: RwLock<Store>,
    synced: watch::Sender<bool>,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl KindCache {
    /// The cached object at `key`.
    pub fn get(&self, key: &ObjKey) -> Option<Arc<CachedObject>> {
        self.read().objects.get(key).cloned()
    }

    /// Every cached object.
    pub fn list(&self) -> Vec<Arc<CachedObject>> {
        self.read().objects.values().cloned().collect()
    }

    /// Objects with an owner reference to `uid`.
    pub fn owned_by(&self, uid: &str) -> Vec<Arc<CachedObject>> {
        let store = self.read();
        store
            .by_owner
            .get(uid)
            .map(|keys| {
                keys.iter()
                    .filter_map(|k| store.objects.get(k).cloned())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Objects in `namespace`.
    pub fn in_namespace(&self, namespace: &str) -> Vec<Arc<CachedObject>> {
        self.read()
            .objects
            .iter()
            .filter(|(k, _)| k.namespace.as_deref() == Some(namespace))
            .map(|(_, o)| o.clone())
            .collect()
    }

    /// Number of cached objects.
    pub fn len(&self) -> usize {
        self.read().objects.len()
    }

    /// Whether the cache is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the initial list has completed.
    pub fn is_synced(&self) -> bool {
        *self.synced.borrow()
    }

    /// Waits until the initial list has completed.
    pub async fn wait_synced(&self) {
        let mut rx = self.synced.subscribe();
        // The sender lives as long as `self`, so this only ends when synced.
        let _ = rx.wait_for(|synced| *synced).await;
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Store> {
        self.store.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Store> {
        self.store.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Applies one watch event to the store and returns what changed.
    fn apply_event(&self, event: Event<DynamicObject>, metrics: &Metrics) -> Vec<Change> {
        let kind = self.gvk.to_string();
        let mut out = Vec::new();
        let mut send =
            |object: Arc<CachedObject>, deleted: bool, previous: Option<Arc<CachedObject>>| {
                out.push(Change {
                    gvk: self.gvk.clone(),
                    view: self.view,
                    object,
                    deleted,
                    previous,
                });
            };
        match event {
            Event::Apply(object) => {
                metrics.watch_event(&kind);
                let object = Arc::new(strip(object, &self.resource));
                if let Some(previous) = self.write().upsert(object.clone()) {
                    send(object, false, previous);
                }
            }
            Event::Delete(object) => {
                metrics.watch_event(&kind);
                let key = ObjKey::of(&object);
                let old = self.write().remove(&key);
                send(
                    old.unwrap_or_else(|| Arc::new(strip(object, &self.resource))),
                    true,
                    None,
                );
            }
            Event::Init => {
                metrics.watch_list(&kind);
                self.write().relist = Some(HashMap::new());
            }
            Event::InitApply(object) => {
                let object = Arc::new(strip(object, &self.resource));
                if let Some(relist) = self.write().relist.as_mut() {
                    relist.insert(ObjKey::of(&*object), object);
                }
            }
            Event::InitDone => {
                let mut store = self.write();
                let fresh = store.relist.take().unwrap_or_default();
                let gone: Vec<ObjKey> = store
                    .objects
                    .keys()
                    .filter(|k| !fresh.contains_key(*k))
                    .cloned()
                    .collect();
                let mut deleted = Vec::new();
                for key in gone {
                    if let Some(old) = store.remove(&key) {
                        deleted.push(old);
                    }
                }
                let mut changed = Vec::new();
                for object in fresh.into_values() {
                    if let Some(previous) = store.upsert(object.clone()) {
                        changed.push((object, previous));
                    }
                }
                drop(store);
                for object in deleted {
                    send(object, true, None);
                }
                for (object, previous) in changed {
                    send(object, false, previous);
                }
                self.synced.send_replace(true);
            }
        }
        metrics.set_cache_objects(&kind, self.view.label(), self.len());
        out
    }
}

impl Drop for KindCache {
    fn drop(&mut self) {
        if let Some(task) = self.task.lock().unwrap_or_else(|e| e.into_inner()).take() {
            task.abort();
        }
    }
}

struct Entry {
    cache: Arc<KindCache>,
    users: usize,
}

/// Creates the change channel between the caches and the router.
pub fn change_channel() -> (mpsc::Sender<Change>, mpsc::Receiver<Change>) {
    mpsc::channel(CHANGE_BUFFER)
}

/// The registry of shared caches.
pub struct Caches {
    client: Client,
    namespace: Option<String>,
    kinds: tokio::sync::Mutex<HashMap<(Gvk, View), Entry>>,
    changes: mpsc::Sender<Change>,
    metrics: Arc<Metrics>,
}

impl Caches {
    /// A registry whose watches report to `changes`. With a `namespace`,
    /// namespaced kinds are watched in that namespace only.
    pub fn new(
        client: Client,
        namespace: Option<String>,
        changes: mpsc::Sender<Change>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            client,
            namespace,
            kinds: tokio::sync::Mutex::new(HashMap::new()),
            changes,
            metrics,
        }
    }

    /// Takes a reference on the cache of `gvk` seen as `view`, starting its
    /// watch if this is the first user.
    pub async fn acquire(&self, gvk: &Gvk, view: View) -> Result<Arc<KindCache>, CacheError> {
        let mut kinds = self.kinds.lock().await;
        if let Some(entry) = kinds.get_mut(&(gvk.clone(), view)) {
            entry.users += 1;
            return Ok(entry.cache.clone());
        }
        let (resource, caps) = discovery::pinned_kind(&self.client, &gvk.to_kube())
            .await
            .map_err(|source| CacheError::Discovery {
                gvk: gvk.clone(),
                source,
            })?;
        let cache = Arc::new(KindCache {
            gvk: gvk.clone(),
            view,
            namespaced: matches!(caps.scope, Scope::Namespaced),
            resource: resource.clone(),
            store: RwLock::new(Store::default()),
            synced: watch::channel(false).0,
            task: Mutex::new(None),
        });
        let api: Api<DynamicObject> = match (&self.namespace, cache.namespaced) {
            (Some(ns), true) => Api::namespaced_with(self.client.clone(), ns, &resource),
            _ => Api::all_with(self.client.clone(), &resource),
        };
        let weak = Arc::downgrade(&cache);
        let changes = self.changes.clone();
        let metrics = self.metrics.clone();
        let task = tokio::spawn(async move {
            let config = match view {
                View::Children => watcher::Config::default().labels(PLUGIN_LABEL),
                View::All => watcher::Config::default(),
            };
            let mut stream = watcher::watcher(api, config).default_backoff().boxed();
            while let Some(item) = stream.next().await {
                let Some(cache) = weak.upgrade() else { return };
                match item {
                    Ok(event) => {
                        metrics.api_health.reached();
                        let out = cache.apply_event(event, &metrics);
                        drop(cache);
                        for change in out {
                            // The router outlives the caches; a closed
                            // channel means shutdown.
                            if changes.send(change).await.is_err() {
                                return;
                            }
                        }
                    }
                    Err(e) => {
                        let kind = cache.gvk.to_string();
                        metrics.watch_error(&kind, &e);
                        // An outage is logged once by `api_health`; an
                        // expired resource version is routine (it relists).
                        match Failure::of_watch(&e) {
                            f if f.is_outage() => {
                                tracing::debug!(%kind, error = %e, "watch error; retrying with backoff")
                            }
                            Failure::Gone => {
                                tracing::info!(%kind, error = %e, "watch expired; relisting")
                            }
                            _ => {
                                tracing::warn!(%kind, error = %e, "watch error; retrying with backoff")
                            }
                        }
                    }
                }
            }
        });
        *cache.task.lock().unwrap_or_else(|e| e.into_inner()) = Some(task);
        tracing::info!(kind = %gvk, view = view.label(), "watching");
        kinds.insert(
            (gvk.clone(), view),
            Entry {
                cache: cache.clone(),
                users: 1,
            },
        );
        Ok(cache)
    }

    /// Drops a reference on the cache of `gvk` seen as `view`; the last user
    /// stops the watch.
    pub async fn release(&self, gvk: &Gvk, view: View) {
        let mut kinds = self.kinds.lock().await;
        let key = (gvk.clone(), view);
        if let Some(entry) = kinds.get_mut(&key) {
            entry.users -= 1;
            if entry.users == 0 {
                kinds.remove(&key);
                self.metrics
                    .set_cache_objects(&gvk.to_string(), view.label(), 0);
                tracing::info!(kind = %gvk, view = view.label(), "stopped watching: no plugin uses it");
            }
        }
    }

    /// Whether every cache has completed its initial list.
    pub async fn all_synced(&self) -> bool {
        self.kinds
            .lock()
            .await
            .values()
            .all(|e| e.cache.is_synced())
    }
}

#[cfg(test)]
mod tests {
    use kube::api::ObjectMeta;
    use serde_json::json;

    use super::*;

    fn cache() -> KindCache {
        KindCache {
            gvk: Gvk::new("", "v1", "ConfigMap"),
            view: View::Children,
            resource: ApiResource::erase::<k8s_openapi::api::core::v1::ConfigMap>(&()),
            namespaced: true,
            store: RwLock::new(Store::default()),
            synced: watch::channel(false).0,
            task: Mutex::new(None),
        }
    }

    fn cm(name: &str, rv: &str, owner: Option<&str>) -> DynamicObject {
        let mut meta = ObjectMeta {
            name: Some(name.into()),
            namespace: Some("ns".into()),
            resource_version: Some(rv.into()),
            uid: Some(format!("uid-{name}")),
            ..ObjectMeta::default()
        };
        meta.owner_references = owner.map(|o| {
            vec![
                k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
                    api_version: "kuwa.dev/v1alpha1".into(),
                    kind: "WebServer".into(),
                    name: "web".into(),
                    uid: o.into(),
                    controller: Some(true),
                    ..Default::default()
                },
            ]
        });
        meta.managed_fields = Some(vec![
            k8s_openapi::apimachinery::pkg::apis::meta::v1::ManagedFieldsEntry {
                manager: Some("kuwa/p".into()),
                operation: Some("Apply".into()),
                fields_type: Some("FieldsV1".into()),
                fields_v1: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::FieldsV1(
                    json!({"f:data": {"f:k": {}}}),
                )),
                ..Default::default()
            },
        ]);
        DynamicObject {
            types: None,
            metadata: meta,
            data: json!({"data": {"k": "v"}}),
        }
    }

    #[test]
    fn relist_reports_only_real_changes_and_deletions() {
        let c = cache();
        let metrics = Metrics::new();
        assert!(c.apply_event(Event::Init, &metrics).is_empty());
        c.apply_event(Event::InitApply(cm("a", "1", Some("p"))), &metrics);
        c.apply_event(Event::InitApply(cm("b", "1", None)), &metrics);
        assert!(!c.is_synced());
        let changes = c.apply_event(Event::InitDone, &metrics);
        assert!(c.is_synced());
        assert_eq!(changes.len(), 2);
        assert!(
            c.get(&ObjKey {
                namespace: Some("ns".into()),
                name: "a".into()
            })
            .unwrap()
            .metadata
            .managed_fields
            .as_ref()
            .is_some_and(|m| m[0].manager.as_deref() == Some("kuwa/p") && m[0].fields_v1.is_none())
        );
        assert_eq!(c.owned_by("p").len(), 1);

        // A relist where `a` is unchanged, `b` is gone and `c` is new.
        c.apply_event(Event::Init, &metrics);
        c.apply_event(Event::InitApply(cm("a", "1", Some("p"))), &metrics);
        c.apply_event(Event::InitApply(cm("c", "5", None)), &metrics);
        let changes = c.apply_event(Event::InitDone, &metrics);
        let summary: Vec<_> = changes
            .iter()
            .map(|c| (c.object.name_any(), c.deleted))
            .collect();
        assert_eq!(summary, [("b".to_owned(), true), ("c".to_owned(), false)]);
        assert_eq!(c.len(), 2);
    }

    #[test]
    fn owner_index_follows_updates_and_deletes() {
        let c = cache();
        let metrics = Metrics::new();
        c.apply_event(Event::Apply(cm("a", "1", Some("p1"))), &metrics);
        assert_eq!(c.owned_by("p1").len(), 1);
        c.apply_event(Event::Apply(cm("a", "2", Some("p2"))), &metrics);
        assert!(c.owned_by("p1").is_empty());
        assert_eq!(c.owned_by("p2").len(), 1);
        c.apply_event(Event::Delete(cm("a", "3", Some("p2"))), &metrics);
        assert!(c.owned_by("p2").is_empty());
        assert!(c.is_empty());
    }
}

//! One watch per kind, reflected into a kube-rs [`Store`], plus (for child
//! kinds) an index from a controller owner's uid to the names of the objects
//! it controls, so a parent's children are found without scanning the store.
//! The same watch stream then triggers the controller.

use std::collections::{HashMap, HashSet};
use std::fmt::Debug;
use std::sync::{Arc, RwLock};

use futures::{Stream, StreamExt};
use k8s_openapi::NamespaceResourceScope;
use kube::api::Api;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::watcher::{self, Event};
use kube::runtime::{WatchStreamExt, watcher::Config};
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::watch;

/// A namespaced, typed kind the peer watches and writes.
pub trait Kind:
    Resource<DynamicType = (), Scope = NamespaceResourceScope>
    + Clone
    + Serialize
    + DeserializeOwned
    + Debug
    + Send
    + Sync
    + 'static
{
}

impl<K> Kind for K where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
        + Clone
        + Serialize
        + DeserializeOwned
        + Debug
        + Send
        + Sync
        + 'static
{
}

/// Drops what the peer never reads, to keep the caches small.
fn strip<K: Resource>(object: &mut K) {
    let meta = object.meta_mut();
    meta.managed_fields = None;
    if let Some(annotations) = meta.annotations.as_mut() {
        annotations.remove("kubectl.kubernetes.io/last-applied-configuration");
    }
}

/// The uid of `object`'s controller owner, if it has one.
pub fn controller_uid<K: Resource>(object: &K) -> Option<&str> {
    object
        .meta()
        .owner_references
        .as_deref()?
        .iter()
        .find(|o| o.controller == Some(true))
        .map(|o| o.uid.as_str())
}

/// Whether a watch has listed once. Unlike [`Store::wait_until_ready`]
/// (a oneshot that wakes only its latest waiter), any number of tasks may
/// wait on it at once.
#[derive(Clone)]
pub struct Synced(Arc<watch::Sender<bool>>);

impl Synced {
    fn new() -> Self {
        Self(Arc::new(watch::Sender::new(false)))
    }

    fn mark(&self) {
        self.0.send_if_modified(|s| !std::mem::replace(s, true));
    }

    /// Waits until the first list is complete.
    pub async fn wait(&self) {
        let mut rx = self.0.subscribe();
        // The sender lives as long as `self`: this cannot fail.
        let _ = rx.wait_for(|s| *s).await;
    }
}

/// Owner uid → names of the objects it controls, and back.
#[derive(Default)]
struct Index {
    owned: HashMap<String, HashSet<String>>,
    owner: HashMap<String, String>,
}

impl Index {
    fn remove(&mut self, name: &str) {
        if let Some(uid) = self.owner.remove(name)
            && let Some(names) = self.owned.get_mut(&uid)
        {
            names.remove(name);
            if names.is_empty() {
                self.owned.remove(&uid);
            }
        }
    }

    fn set<K: Resource>(&mut self, object: &K) {
        let name = object.name_any();
        self.remove(&name);
        if let Some(uid) = controller_uid(object) {
            self.owner.insert(name.clone(), uid.to_owned());
            self.owned.entry(uid.to_owned()).or_default().insert(name);
        }
    }
}

/// The index as a watch fills it: a relist builds a fresh one, swapped in
/// when the list is complete (as the reflector does with its store).
#[derive(Default)]
struct IndexState {
    live: Index,
    relisting: Option<Index>,
}

impl IndexState {
    fn apply<K: Resource>(&mut self, event: &Event<K>) {
        match event {
            Event::Apply(o) => self.live.set(o),
            Event::Delete(o) => self.live.remove(&o.name_any()),
            Event::Init => self.relisting = Some(Index::default()),
            Event::InitApply(o) => self.relisting.get_or_insert_default().set(o),
            Event::InitDone => self.live = self.relisting.take().unwrap_or_default(),
        }
    }
}

/// The cache of one kind in the watched namespace.
pub struct Cache<K: Kind> {
    store: Store<K>,
    synced: Synced,
    index: Arc<RwLock<IndexState>>,
    namespace: String,
}

impl<K: Kind> Cache<K> {
    /// Watches `K` in `namespace`. Returns the cache and the stream of
    /// touched objects that drives it (and, handed to the controller,
    /// triggers reconciles).
    pub fn watch(
        client: Client,
        namespace: &str,
    ) -> (
        Self,
        impl Stream<Item = Result<K, watcher::Error>> + Send + 'static,
    ) {
        let api: Api<K> = Api::namespaced(client, namespace);
        let (store, writer) = reflector::store();
        let index = Arc::new(RwLock::new(IndexState::default()));
        let indexer = Arc::clone(&index);
        let synced = Synced::new();
        let marker = synced.clone();
        let stream = watcher(api)
            .default_backoff()
            .modify(strip::<K>)
            .reflect(writer)
            .inspect(move |event| {
                if let Ok(e) = event {
                    indexer.write().unwrap_or_else(|p| p.into_inner()).apply(e);
                    if matches!(e, Event::InitDone) {
                        marker.mark();
                    }
                }
            })
            .touched_objects();
        let cache = Self {
            store,
            synced,
            index,
            namespace: namespace.to_owned(),
        };
        (cache, stream)
    }

    /// Whether the watch has listed once.
    pub fn synced(&self) -> &Synced {
        &self.synced
    }

    /// The cached object named `name`.
    pub fn get(&self, name: &str) -> Option<Arc<K>> {
        self.store
            .get(&ObjectRef::new(name).within(&self.namespace))
    }

    /// The cached objects controlled by the owner with uid `uid`.
    pub fn controlled_by(&self, uid: &str) -> Vec<Arc<K>> {
        let names: Vec<String> = {
            let index = self.index.read().unwrap_or_else(|p| p.into_inner());
            match index.live.owned.get(uid) {
                Some(names) => names.iter().cloned().collect(),
                None => return Vec::new(),
            }
        };
        names
            .iter()
            .filter_map(|n| self.get(n))
            .filter(|o| controller_uid(&**o) == Some(uid))
            .collect()
    }
}

fn watcher<K>(api: Api<K>) -> impl Stream<Item = watcher::Result<Event<K>>> + Send
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
{
    watcher::watcher(api, Config::default())
}

/// Watches the parent kind: its store, whether it listed, and the stream of
/// applied objects that triggers the controller.
pub fn watch_parents<K: Kind>(
    client: Client,
    namespace: &str,
) -> (
    Store<K>,
    Synced,
    impl Stream<Item = Result<K, watcher::Error>> + Send + 'static,
) {
    let api: Api<K> = Api::namespaced(client, namespace);
    let (store, writer) = reflector::store();
    let synced = Synced::new();
    let marker = synced.clone();
    let stream = watcher(api)
        .default_backoff()
        .modify(strip::<K>)
        .reflect(writer)
        .inspect(move |event| {
            if matches!(event, Ok(Event::InitDone)) {
                marker.mark();
            }
        })
        .applied_objects();
    (store, synced, stream)
}

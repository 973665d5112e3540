//! The host assembled: active plugins, the event router that turns cache
//! changes into queue keys, the worker pool, and periodic resyncs.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use kube::api::DynamicObject;
use kube::{Client, ResourceExt};
use serde_json::Value;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinHandle;

use crate::apply::Writer;
use crate::cache::{CacheError, Caches, Change, KindCache, ObjKey};
use crate::grant::TokenBucket;
use crate::metrics::Metrics;
use crate::plugin::{Gvk, PluginInfo, RelatedMapping};
use crate::queue::{QueueKey, WorkQueue};
use crate::runtime::LoadedPlugin;

/// Default reconciles of one plugin at once.
pub const DEFAULT_PLUGIN_CONCURRENCY: usize = 4;

/// Settings of a running host.
#[derive(Debug, Clone)]
pub struct HostConfig {
    /// Reconcile every parent at least this often (a plugin may ask for its own period).
    pub resync_period: Duration,
    /// Reconciles in flight at once, across all plugins.
    pub max_concurrent_reconciles: usize,
    /// Reconciles in flight at once for one plugin.
    pub plugin_concurrency: usize,
    /// Watch namespaced kinds in this namespace only (None: all namespaces).
    pub namespace: Option<String>,
}

/// A plugin serving its parents: the compiled component and the caches of
/// every kind it uses.
pub struct ActivePlugin {
    /// The compiled plugin.
    pub loaded: Arc<LoadedPlugin>,
    /// Cache of the parent kind.
    pub parent: Arc<KindCache>,
    /// Caches of the child kinds, in declaration order.
    pub children: Vec<Arc<KindCache>>,
    /// Caches of the related kinds with their mappings.
    pub related: Vec<(Arc<KindCache>, RelatedMapping)>,
    /// The plugin's API write budget.
    pub budget: TokenBucket,
    /// Consecutive failed reconciles across the plugin's keys.
    consecutive_failures: AtomicU32,
    /// Whether the plugin is quarantined.
    quarantined: AtomicBool,
}

impl ActivePlugin {
    /// Waits for a token of the plugin's write budget before an API write.
    pub async fn write_permit(&self, metrics: &Metrics) {
        if self.budget.take().await {
            metrics.write_budget_wait(&self.info().name);
        }
    }

    /// Records a successful reconcile: resets the failure streak and lifts a
    /// quarantine.
    pub fn record_success(&self, metrics: &Metrics) {
        self.consecutive_failures.store(0, Ordering::Relaxed);
        if self.quarantined.swap(false, Ordering::Relaxed) {
            metrics.set_quarantined(&self.info().name, false);
            tracing::info!(plugin = %self.info().name, "quarantine lifted: a reconcile succeeded");
        }
    }

    /// Records a reconcile the plugin is to blame for. Returns whether the
    /// plugin is (now) quarantined.
    pub fn record_failure(&self, metrics: &Metrics) -> bool {
        let streak = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        let limit = self.loaded.grant.quarantine_after;
        if streak >= limit && !self.quarantined.swap(true, Ordering::Relaxed) {
            metrics.set_quarantined(&self.info().name, true);
            tracing::error!(
                plugin = %self.info().name,
                version = %self.info().version,
                failures = streak,
                backoff = ?crate::grant::QUARANTINE_BACKOFF,
                "plugin quarantined after consecutive failures; its keys back off until a new version is loaded"
            );
        }
        self.quarantined.load(Ordering::Relaxed)
    }

    /// Whether the plugin is quarantined.
    pub fn is_quarantined(&self) -> bool {
        self.quarantined.load(Ordering::Relaxed)
    }

    /// What the plugin declared.
    pub fn info(&self) -> &PluginInfo {
        &self.loaded.info
    }

    /// Every kind the plugin uses.
    pub fn kinds(&self) -> Vec<Gvk> {
        let info = self.info();
        std::iter::once(info.parent.clone())
            .chain(info.children.iter().cloned())
            .chain(info.related.iter().map(|(g, _)| g.clone()))
            .collect()
    }

    /// Waits until every cache the plugin reads has listed once, so a
    /// reconcile never mistakes "not listed yet" for "missing".
    pub async fn wait_synced(&self) {
        self.parent.wait_synced().await;
        for c in &self.children {
            c.wait_synced().await;
        }
        for (c, _) in &self.related {
            c.wait_synced().await;
        }
    }

    fn is_synced(&self) -> bool {
        self.parent.is_synced()
            && self.children.iter().all(|c| c.is_synced())
            && self.related.iter().all(|(c, _)| c.is_synced())
    }

    fn key(&self, namespace: Option<String>, name: String) -> QueueKey {
        QueueKey {
            plugin: self.info().name.clone(),
            namespace,
            name,
        }
    }

    /// The controlling owner reference of `object` if it points at this
    /// plugin's parent kind.
    fn parent_of(&self, object: &DynamicObject) -> Option<QueueKey> {
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

    fn parents_in(&self, namespace: Option<&str>) -> Vec<QueueKey> {
        let parents = match namespace {
            Some(ns) if self.info().parent_namespaced => self.parent.in_namespace(ns),
            _ => self.parent.list(),
        };
        parents
            .iter()
            .map(|p| self.key(p.namespace(), p.name_any()))
            .collect()
    }

    /// The parents a change of a related object concerns.
    fn parents_of_related(
        &self,
        mapping: &RelatedMapping,
        object: &DynamicObject,
    ) -> Vec<QueueKey> {
        match mapping {
            RelatedMapping::OwnedByChild => object
                .owner_references()
                .iter()
                .flat_map(|owner| {
                    let key = ObjKey {
                        namespace: object.namespace(),
                        name: owner.name.clone(),
                    };
                    self.children
                        .iter()
                        .filter(|c| {
                            c.gvk.kind == owner.kind && c.gvk.api_version() == owner.api_version
                        })
                        .filter_map(move |c| c.get(&key))
                        .filter(|child| child.uid().as_deref() == Some(owner.uid.as_str()))
                        .filter_map(|child| self.parent_of(&child))
                        .collect::<Vec<_>>()
                })
                .collect(),
            RelatedMapping::LabelSelectorFromParent(pointer) => {
                let labels = object.labels();
                let parents = match object.namespace() {
                    Some(ns) => self.parent.in_namespace(&ns),
                    None => self.parent.list(),
                };
                parents
                    .iter()
                    .filter(|p| selector_matches(&crate::apply::object_json(p), pointer, labels))
                    .map(|p| self.key(p.namespace(), p.name_any()))
                    .collect()
            }
            RelatedMapping::AllInNamespace => self.parents_in(object.namespace().as_deref()),
            RelatedMapping::AllInCluster => self.parents_in(None),
        }
    }
}

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

/// Why a plugin could not be activated.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// A kind it uses is not served (yet).
    #[error(transparent)]
    Cache(#[from] CacheError),
    /// Another plugin already reconciles the same parent kind.
    #[error("plugin {other} already reconciles {gvk}")]
    ParentTaken {
        /// The kind.
        gvk: Gvk,
        /// The plugin that has it.
        other: String,
    },
}

/// The running host.
pub struct Host {
    /// API client.
    pub client: Client,
    /// Shared caches.
    pub caches: Caches,
    /// The work queue.
    pub queue: WorkQueue,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// API writes.
    pub writer: Writer,
    plugins: RwLock<HashMap<Arc<str>, Arc<ActivePlugin>>>,
    config: HostConfig,
    started: AtomicBool,
}

impl Host {
    /// A host with no plugins yet; feed the returned receiver to
    /// [`Host::spawn`].
    pub fn new(
        client: Client,
        config: HostConfig,
        metrics: Arc<Metrics>,
    ) -> (Arc<Self>, mpsc::UnboundedReceiver<Change>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let host = Arc::new(Self {
            caches: Caches::new(
                client.clone(),
                config.namespace.clone(),
                tx,
                metrics.clone(),
            ),
            writer: Writer::new(client.clone(), metrics.clone()),
            client,
            queue: WorkQueue::new(),
            metrics,
            plugins: RwLock::new(HashMap::new()),
            config,
            started: AtomicBool::new(false),
        });
        (host, rx)
    }

    /// The active plugin called `name`.
    pub fn plugin(&self, name: &str) -> Option<Arc<ActivePlugin>> {
        self.plugins
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
    }

    fn active(&self) -> Vec<Arc<ActivePlugin>> {
        self.plugins
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Starts serving a plugin: takes references on the caches of every kind
    /// it uses (starting watches as needed) and queues its existing parents.
    pub async fn activate(&self, loaded: Arc<LoadedPlugin>) -> Result<(), ActivateError> {
        let info = loaded.info.clone();
        if let Some(other) = self
            .active()
            .into_iter()
            .find(|p| p.info().parent == info.parent && p.info().name != info.name)
        {
            return Err(ActivateError::ParentTaken {
                gvk: info.parent.clone(),
                other: other.info().name.to_string(),
            });
        }
        let mut acquired = Vec::new();
        let result = async {
            let parent = self.caches.acquire(&info.parent).await?;
            acquired.push(info.parent.clone());
            let mut children = Vec::new();
            for g in &info.children {
                children.push(self.caches.acquire(g).await?);
                acquired.push(g.clone());
            }
            let mut related = Vec::new();
            for (g, m) in &info.related {
                related.push((self.caches.acquire(g).await?, m.clone()));
                acquired.push(g.clone());
            }
            let grant = &loaded.grant;
            let budget = TokenBucket::new(grant.writes_per_second, grant.write_burst);
            Ok::<_, CacheError>(ActivePlugin {
                loaded,
                parent,
                children,
                related,
                budget,
                consecutive_failures: AtomicU32::new(0),
                quarantined: AtomicBool::new(false),
            })
        }
        .await;
        let active = match result {
            Ok(a) => Arc::new(a),
            Err(e) => {
                for g in &acquired {
                    self.caches.release(g).await;
                }
                return Err(e.into());
            }
        };
        self.metrics
            .plugin_loaded(&info.name, &info.version, &active.loaded.sha256);
        let concurrency = active
            .loaded
            .grant
            .concurrency
            .unwrap_or(self.config.plugin_concurrency);
        self.queue
            .with(|q| q.set_plugin(info.name.clone(), concurrency));
        self.metrics.set_quarantined(&info.name, false);
        let previous = self
            .plugins
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(info.name.clone(), active.clone());
        if let Some(previous) = previous {
            for g in previous.kinds() {
                self.caches.release(&g).await;
            }
        }
        for key in active.parents_in(None) {
            self.queue.add(key, "plugin loaded");
        }
        tracing::info!(plugin = %info.name, version = %info.version, parent = %info.parent, "plugin active");
        Ok(())
    }

    /// Stops serving a plugin and releases the watches no other plugin uses.
    pub async fn deactivate(&self, name: &str) {
        let removed = self
            .plugins
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name);
        if let Some(p) = removed {
            self.queue.with(|q| q.remove_plugin(name));
            for g in p.kinds() {
                self.caches.release(&g).await;
            }
            self.metrics.plugin_unloaded(name);
            tracing::info!(plugin = name, "plugin unloaded");
        }
    }

    /// Queues every parent of every plugin now.
    pub fn resync_all(&self) {
        for p in self.active() {
            self.metrics.resync(&p.info().name);
            for key in p.parents_in(None) {
                self.queue.add(key, "resync");
            }
        }
    }

    /// Whether every active plugin's caches have listed once.
    pub fn is_ready(&self) -> bool {
        self.started.load(Ordering::Relaxed) && self.active().iter().all(|p| p.is_synced())
    }

    /// Marks start-up complete (all plugins in the directory were tried).
    pub fn mark_started(&self) {
        self.started.store(true, Ordering::Relaxed);
    }

    fn route(&self, change: &Change) {
        for p in self.active() {
            let info = p.info();
            if info.parent == change.gvk {
                if !change.deleted {
                    self.queue.add(
                        p.key(change.object.namespace(), change.object.name_any()),
                        "parent changed",
                    );
                }
                continue;
            }
            // Route by the object's current and previous state, so a parent
            // that an object stops belonging to is looked at again too.
            let states = std::iter::once(&change.object).chain(change.previous.as_ref());
            for object in states {
                if info.owns(&change.gvk)
                    && let Some(key) = p.parent_of(object)
                {
                    let trigger = if change.deleted {
                        "child deleted"
                    } else {
                        "child changed"
                    };
                    self.queue.add(key, trigger);
                }
                for (cache, mapping) in &p.related {
                    if cache.gvk == change.gvk {
                        for key in p.parents_of_related(mapping, object) {
                            self.queue.add(key, "related changed");
                        }
                    }
                }
            }
        }
    }

    /// Starts the router, the workers and the resync ticker.
    pub fn spawn(
        self: &Arc<Self>,
        mut changes: mpsc::UnboundedReceiver<Change>,
    ) -> Vec<JoinHandle<()>> {
        let router = {
            let host = self.clone();
            tokio::spawn(async move {
                while let Some(change) = changes.recv().await {
                    host.route(&change);
                }
            })
        };
        let workers = {
            let host = self.clone();
            tokio::spawn(async move {
                let slots = Arc::new(Semaphore::new(host.config.max_concurrent_reconciles.max(1)));
                loop {
                    let (key, trigger) = host.queue.next().await;
                    let Ok(slot) = slots.clone().acquire_owned().await else {
                        return;
                    };
                    let host = host.clone();
                    tokio::spawn(async move {
                        let outcome = crate::reconcile::run(&host, &key, trigger).await;
                        host.queue.done(&key, outcome);
                        drop(slot);
                    });
                }
            })
        };
        let ticker = {
            let host = self.clone();
            tokio::spawn(async move {
                let mut next_resync: HashMap<Arc<str>, Instant> = HashMap::new();
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                loop {
                    tick.tick().await;
                    let now = Instant::now();
                    for p in host.active() {
                        let period = p.info().resync.unwrap_or(host.config.resync_period);
                        let due = next_resync
                            .entry(p.info().name.clone())
                            .or_insert(now + period);
                        if now >= *due {
                            *due = now + period;
                            host.metrics.resync(&p.info().name);
                            for key in p.parents_in(None) {
                                host.queue.add(key, "resync");
                            }
                        }
                    }
                    for (plugin, depth) in host.queue.with(|q| q.depth()) {
                        host.metrics.set_queue_depth(&plugin, depth);
                    }
                }
            })
        };
        vec![router, workers, ticker]
    }
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

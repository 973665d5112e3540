//! The host assembled (DESIGN §2): the shared caches, the router that turns
//! cache changes into queue keys, the work queue, the workers, the periodic
//! resync, and the health of those core tasks.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use kube::{Client, ResourceExt};
use tokio::sync::mpsc;
use tokio::task::{AbortHandle, JoinHandle};

use crate::active::{ActivePlugin, Plugins};
use crate::apply::{ApiWriter, ChildResource, CrdError, PluginWriter};
use crate::cache::{CacheError, CachedObject, Caches, Change, KindCache, View, change_channel};
use crate::gvk::Gvk;
use crate::leader::{Leadership, Role};
use crate::metrics::Metrics;
use crate::plan;
use crate::plugin::runtime::LoadedPlugin;
use crate::queue::{QueueKey, WorkQueue};
use crate::reconcile::{self, Context};
use crate::tenant::budget::WriteBudget;
use crate::tenant::quarantine::Quarantine;

/// How long unloading a plugin waits for its reconciles still running.
pub const UNLOAD_DRAIN: Duration = Duration::from_secs(30);

/// Parents released at once when a plugin is unloaded (each may run the old
/// `finalize` and makes one write).
pub const RELEASE_CONCURRENCY: usize = 8;

/// Settings of a running host.
#[derive(Debug, Clone)]
pub struct HostConfig {
    /// Reconcile every parent at least this often (a plugin may ask for its own period).
    pub resync_period: Duration,
    /// Reconciles in flight at once, across all plugins.
    pub max_concurrent_reconciles: usize,
    /// Reconciles in flight at once for one plugin, unless its grant says
    /// (None: work-conserving, see [`crate::queue`]).
    pub plugin_concurrency: Option<usize>,
    /// Watch namespaced kinds in this namespace only (None: all namespaces).
    pub namespace: Option<String>,
    /// How long a reconcile waits for its plugin's caches to sync.
    pub sync_timeout: Duration,
    /// Whether this host may take keys and write now (leader election;
    /// [`Leadership::always`] without it).
    pub leadership: Arc<Leadership>,
    /// The host's client configuration, for clients that impersonate a
    /// plugin's ServiceAccount (None: plugins cannot have an identity).
    pub kube_config: Option<kube::Config>,
}

/// Why a plugin could not be activated.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// A kind it uses is not served (yet).
    #[error(transparent)]
    Cache(#[from] CacheError),
    /// The plugin's identity cannot be impersonated.
    #[error("{0}")]
    Identity(String),
    /// Another plugin already reconciles the same parent kind.
    #[error("plugin {other} already reconciles {gvk}")]
    ParentTaken {
        /// The kind.
        gvk: Gvk,
        /// The plugin that has it.
        other: String,
    },
}

/// The core tasks of a host and whether they still run: `/healthz` fails
/// as soon as one has ended (a panic in the router, say), so a supervisor
/// restarts the process instead of leaving it up but deaf.
#[derive(Default)]
pub struct Health {
    tasks: Mutex<Vec<(&'static str, AbortHandle)>>,
}

impl Health {
    /// Watches a core task.
    pub fn watch(&self, name: &'static str, task: &JoinHandle<()>) {
        self.tasks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((name, task.abort_handle()));
    }

    /// The names of the core tasks that have ended.
    pub fn dead(&self) -> Vec<&'static str> {
        self.tasks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(_, t)| t.is_finished())
            .map(|(n, _)| *n)
            .collect()
    }
}

/// The running host.
pub struct Host {
    /// Shared caches.
    pub caches: Caches,
    /// The work queue.
    pub queue: Arc<WorkQueue>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// The active plugins.
    pub plugins: Arc<Plugins>,
    /// The health of the core tasks.
    pub health: Health,
    api: Arc<ApiWriter>,
    budgets: Mutex<HashMap<Arc<str>, Arc<WriteBudget>>>,
    config: HostConfig,
    context: Arc<Context>,
    started: AtomicBool,
}

impl Host {
    /// A host with no plugins yet; feed the returned receiver to
    /// [`Host::spawn`].
    pub fn new(
        client: Client,
        config: HostConfig,
        metrics: Arc<Metrics>,
    ) -> (Arc<Self>, mpsc::Receiver<Change>) {
        let (tx, rx) = change_channel();
        let queue = Arc::new(WorkQueue::new());
        queue.with(|q| q.set_capacity(config.max_concurrent_reconciles));
        let host = Arc::new(Self {
            caches: Caches::new(
                client.clone(),
                config.namespace.clone(),
                tx,
                metrics.clone(),
            ),
            api: Arc::new({
                let api = ApiWriter::new(client, metrics.clone(), config.leadership.clone());
                match &config.kube_config {
                    Some(c) => api.with_base_config(c.clone()),
                    None => api,
                }
            }),
            budgets: Mutex::default(),
            queue,
            context: Arc::new(Context {
                metrics: metrics.clone(),
                sync_timeout: config.sync_timeout,
            }),
            metrics,
            plugins: Arc::default(),
            health: Health::default(),
            config,
            started: AtomicBool::new(false),
        });
        (host, rx)
    }

    /// The active plugin called `name`.
    pub fn plugin(&self, name: &str) -> Option<Arc<ActivePlugin>> {
        self.plugins.get(name)
    }

    /// The write budget of the plugin `loaded` is a version of, if its grant
    /// caps its writes: one per plugin name, kept across versions with the
    /// same grant (reloading a plugin does not refill its burst) and made
    /// anew when the grant's rate or burst changes. None: no cap of its own
    /// (work-conserving; its share of the host's reconcile slots bounds it).
    fn budget(&self, loaded: &LoadedPlugin) -> Option<Arc<WriteBudget>> {
        let grant = &loaded.grant;
        let mut budgets = self.budgets.lock().unwrap_or_else(|e| e.into_inner());
        let Some(rate) = grant.writes_per_second else {
            budgets.remove(&loaded.info.name);
            return None;
        };
        let budget = budgets
            .entry(loaded.info.name.clone())
            .or_insert_with(|| Arc::new(WriteBudget::new(rate, grant.write_burst)));
        if !budget.is(rate, grant.write_burst) {
            *budget = Arc::new(WriteBudget::new(rate, grant.write_burst));
        }
        Some(budget.clone())
    }

    /// Installs the CRD `loaded` carries, if its grant allows it; the write
    /// is counted and takes from the plugin's budget like any other.
    pub async fn install_crd(&self, loaded: &LoadedPlugin) -> Result<Option<String>, CrdError> {
        self.api
            .install_crd(loaded, self.budget(loaded).as_deref())
            .await
    }

    async fn acquire(&self, loaded: Arc<LoadedPlugin>) -> Result<ActivePlugin, ActivateError> {
        let client = self
            .api
            .client_for(loaded.identity.as_deref())
            .map_err(|e| ActivateError::Identity(e.to_string()))?;
        let info = &loaded.info;
        let mut acquired: Vec<(Gvk, View)> = Vec::new();
        let result = async {
            let parent = self.caches.acquire(&info.parent, View::All).await?;
            acquired.push((info.parent.clone(), View::All));
            let mut children = Vec::new();
            for g in &info.children {
                children.push(self.caches.acquire(g, View::Children).await?);
                acquired.push((g.clone(), View::Children));
            }
            let mut related = Vec::new();
            for (g, m) in &info.related {
                related.push((self.caches.acquire(g, View::All).await?, m.clone()));
                acquired.push((g.clone(), View::All));
            }
            Ok::<_, CacheError>((parent, children, related))
        }
        .await;
        let (parent, children, related) = match result {
            Ok(caches) => caches,
            Err(e) => {
                for (g, v) in &acquired {
                    self.caches.release(g, *v).await;
                }
                return Err(e.into());
            }
        };
        let resources: HashMap<Gvk, ChildResource> = children
            .iter()
            .map(|c: &Arc<KindCache>| {
                (
                    c.gvk.clone(),
                    ChildResource {
                        resource: c.resource.clone(),
                        namespaced: c.namespaced,
                    },
                )
            })
            .collect();
        Ok(ActivePlugin {
            writer: PluginWriter::new(
                self.api.clone(),
                client,
                loaded.clone(),
                self.budget(&loaded),
                parent.resource.clone(),
                resources,
            ),
            quarantine: Quarantine::new(loaded.grant.quarantine_after),
            settled: Default::default(),
            loaded,
            parent,
            children,
            related,
        })
    }

    async fn release(&self, plugin: &ActivePlugin) {
        let info = plugin.info();
        self.caches.release(&info.parent, View::All).await;
        for g in &info.children {
            self.caches.release(g, View::Children).await;
        }
        for (g, _) in &info.related {
            self.caches.release(g, View::All).await;
        }
    }

    /// Starts serving a plugin: takes references on the caches of every kind
    /// it uses (starting watches as needed) and queues its existing parents.
    /// A new version of a served plugin replaces it: in-flight reconciles
    /// finish on the old version, its quarantine and backoffs are lifted.
    pub async fn activate(&self, loaded: Arc<LoadedPlugin>) -> Result<(), ActivateError> {
        let info = loaded.info.clone();
        if let Some(other) = self
            .plugins
            .all()
            .into_iter()
            .find(|p| p.info().parent.same_kind(&info.parent) && p.info().name != info.name)
        {
            return Err(ActivateError::ParentTaken {
                gvk: info.parent.clone(),
                other: other.info().name.to_string(),
            });
        }
        let active = Arc::new(self.acquire(loaded).await?);
        self.metrics
            .plugin_loaded(&info.name, &info.version, &active.loaded.sha256);
        let grant = &active.loaded.grant;
        let concurrency = grant.concurrency.or(self.config.plugin_concurrency);
        let interval = grant.quarantine_interval;
        self.queue.with(|q| {
            q.set_plugin(info.name.clone(), concurrency, interval);
            q.reset_plugin(&info.name);
        });
        self.metrics.set_quarantined(&info.name, false);
        if let Some(previous) = self.plugins.insert(active.clone()) {
            self.release(&previous).await;
        }
        for key in active.parents_in(None) {
            self.queue.add(key, "plugin loaded");
        }
        tracing::info!(plugin = %info.name, version = %info.version, parent = %info.parent, "plugin active");
        Ok(())
    }

    /// Stops serving a plugin (its file was removed). Parents holding the
    /// host's finalizer are released first — those being deleted after the
    /// old version's `finalize` ran once — so none is stranded. Then the
    /// watches no other plugin uses stop.
    pub async fn deactivate(&self, name: &str) {
        let Some(p) = self.plugins.remove(name) else {
            return;
        };
        self.queue.with(|q| q.remove_plugin(name));
        // Reconciles already running may still add the finalizer: let them
        // finish first (each is bounded by the plugin's deadline and its
        // writes).
        let waiting = tokio::time::Instant::now() + UNLOAD_DRAIN;
        while self.queue.with(|q| q.in_flight_of(name)) > 0 && tokio::time::Instant::now() < waiting
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let held: Vec<_> = if self.config.leadership.may_write() {
            p.parents_in(None)
                .iter()
                .filter_map(|key| p.parent_at(key))
                .filter(|parent| plan::has_finalizer(p.info(), &**parent))
                .map(|parent| parent.to_dynamic())
                .collect()
        } else {
            // A standby writes nothing: the leading replica releases them.
            Vec::new()
        };
        let released = held.len();
        futures::stream::iter(held)
            .for_each_concurrent(RELEASE_CONCURRENCY, |parent| {
                let p = p.clone();
                async move { reconcile::release(&p, &parent).await }
            })
            .await;
        self.release(&p).await;
        self.budgets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name);
        self.metrics.plugin_unloaded(name);
        tracing::info!(plugin = %name, released_finalizers = released, "plugin unloaded");
    }

    /// Queues every parent of every plugin now (`POST /resync`), calling
    /// each plugin even where nothing changed since it left a parent
    /// settled: an operator asking for a resync wants the plugins to look.
    pub fn resync_all(&self) {
        for p in self.plugins.all() {
            self.metrics.resync(&p.info().name);
            for key in p.parents_in(None) {
                self.queue.add(key, crate::reconcile::FORCED_RESYNC);
            }
        }
    }

    /// Stops taking keys and waits (at most `timeout`) until the reconciles
    /// in flight have finished; their writes may still go out. Returns how
    /// many were still running when it gave up (0: drained).
    pub async fn drain(&self, timeout: Duration) -> usize {
        self.config.leadership.stop();
        let until = tokio::time::Instant::now() + timeout;
        loop {
            let running = self.queue.with(|q| q.in_flight());
            if running == 0 || tokio::time::Instant::now() >= until {
                return running;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The leadership this host follows.
    pub fn leadership(&self) -> &Arc<Leadership> {
        &self.config.leadership
    }

    /// Whether every active plugin's caches have listed once.
    pub fn is_ready(&self) -> bool {
        self.started.load(Ordering::Relaxed) && self.plugins.all().iter().all(|p| p.is_synced())
    }

    /// Marks start-up complete (all plugins in the directory were tried).
    pub fn mark_started(&self) {
        self.started.store(true, Ordering::Relaxed);
    }

    fn route(&self, change: &Change) {
        for p in self.plugins.all() {
            let info = p.info();
            if info.parent == change.gvk && change.view == View::All {
                if change.deleted {
                    p.writer.forget(&*change.object);
                    p.settled.forget(&crate::cache::ObjKey::of(&*change.object));
                } else if p.writer.is_own_echo(&*change.object) {
                    self.metrics.echo_skipped(&info.name);
                } else {
                    // While the parent's reconcile runs, the change may be
                    // the echo of a write whose answer is still on its way:
                    // held, and judged when the reconcile ends.
                    let key = p.key(change.object.namespace(), change.object.name_any());
                    self.queue.with(|q| {
                        if !p.writer.hold(&*change.object) {
                            q.add(key, "parent changed");
                        }
                    });
                }
                continue;
            }
            // Route by the object's current and previous state, so a parent
            // that an object stops belonging to is looked at again too.
            let states: [Option<&Arc<CachedObject>>; 2] =
                [Some(&change.object), change.previous.as_ref()];
            for object in states.into_iter().flatten() {
                if p.is_child_cache(&change.gvk, change.view)
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
                    if cache.gvk == change.gvk && cache.view == change.view {
                        for key in crate::related::parents_of(&p, cache, mapping, object) {
                            self.queue.add(key, "related changed");
                        }
                    }
                }
            }
        }
    }

    /// Starts the router, the workers and the resync ticker, and watches
    /// them for `/healthz`.
    pub fn spawn(self: &Arc<Self>, mut changes: mpsc::Receiver<Change>) -> Vec<JoinHandle<()>> {
        let router = {
            let host = self.clone();
            tokio::spawn(async move {
                while let Some(change) = changes.recv().await {
                    host.route(&change);
                }
            })
        };
        let workers = {
            let plugins = self.plugins.clone();
            let context = self.context.clone();
            let queue = self.queue.clone();
            let metrics = self.metrics.clone();
            tokio::spawn(crate::worker::serve(
                self.queue.clone(),
                self.metrics.clone(),
                self.config.leadership.subscribe(),
                self.config.max_concurrent_reconciles,
                move |key, trigger| {
                    let plugins = plugins.clone();
                    let context = context.clone();
                    let queue = queue.clone();
                    let metrics = metrics.clone();
                    async move {
                        let Some(p) = plugins.get(&key.plugin) else {
                            return crate::queue::Outcome::Success {
                                requeue_after: None,
                            };
                        };
                        let parent = crate::cache::ObjKey {
                            namespace: key.namespace.clone(),
                            name: key.name.clone(),
                        };
                        queue.locked(|_| p.writer.begin_hold(parent.clone()));
                        // Ends the hold however the reconcile ends (even by
                        // a panic, which the worker catches).
                        let _hold = HoldGuard {
                            queue: &queue,
                            metrics: &metrics,
                            plugin: &p,
                            key: &key,
                            parent,
                        };
                        reconcile::run(&p, &context, &key, trigger).await
                    }
                },
            ))
        };
        let ticker = {
            let host = self.clone();
            tokio::spawn(async move {
                let mut next_resync: HashMap<Arc<str>, Instant> = HashMap::new();
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                loop {
                    tick.tick().await;
                    let now = Instant::now();
                    for p in host.plugins.all() {
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
        // On taking the lead, every parent is looked at: the caches are
        // warm (no relist), and what changed while another replica led (or
        // none did) is found by the plugins.
        let takeover = {
            let host = self.clone();
            let mut role = self.config.leadership.subscribe();
            tokio::spawn(async move {
                let mut leading = false;
                loop {
                    let now = *role.borrow_and_update();
                    host.metrics.set_leader(now != Role::Standby);
                    if now == Role::Leader && !leading {
                        for p in host.plugins.all() {
                            for key in p.parents_in(None) {
                                host.queue.add(key, "leader elected");
                            }
                        }
                    }
                    leading = now != Role::Standby;
                    if role.changed().await.is_err() {
                        return;
                    }
                }
            })
        };
        self.health.watch("router", &router);
        self.health.watch("workers", &workers);
        self.health.watch("resync ticker", &ticker);
        self.health.watch("leadership", &takeover);
        vec![router, workers, ticker, takeover]
    }
}

/// The end of a reconcile's hold on its parent's changes
/// ([`crate::apply::PluginWriter::begin_hold`]): the held changes that were
/// echoes of its writes are counted, any other queues the parent again.
struct HoldGuard<'a> {
    queue: &'a WorkQueue,
    metrics: &'a Metrics,
    plugin: &'a ActivePlugin,
    key: &'a QueueKey,
    parent: crate::cache::ObjKey,
}

impl Drop for HoldGuard<'_> {
    fn drop(&mut self) {
        // The key is still in flight: an add only marks it dirty, and the
        // worker's `done` that follows wakes whoever it concerns.
        self.queue.locked(|q| {
            let (echoes, other) = self.plugin.writer.end_hold(&self.parent);
            for _ in 0..echoes {
                self.metrics.echo_skipped(&self.key.plugin);
            }
            if other {
                q.add(self.key.clone(), "parent changed");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn health_names_the_core_tasks_that_ended() {
        let health = Health::default();
        let alive = tokio::spawn(std::future::pending::<()>());
        let dying = tokio::spawn(async { panic!("router bug") });
        health.watch("workers", &alive);
        health.watch("router", &dying);
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            while health.dead().is_empty() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
        assert_eq!(health.dead(), ["router"]);
        alive.abort();
    }
}

//! Prometheus metrics of the host (DESIGN §5), exposed on `/metrics`.

use std::sync::Mutex;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::outage::{ApiHealth, Failure};

type Labels = Vec<(&'static str, String)>;
type HistogramFamily = Family<Labels, Histogram, fn() -> Histogram>;

fn reconcile_buckets() -> Histogram {
    // 100 µs .. ~13 s: covers a no-op reconcile from cache up to one that
    // waits on a slow API server.
    Histogram::new(exponential_buckets(0.0001, 2.0, 18))
}

/// Every metric the host exports.
pub struct Metrics {
    registry: Mutex<Registry>,
    reconciles: Family<Labels, Counter>,
    reconcile_errors: Family<Labels, Counter>,
    reconcile_duration: HistogramFamily,
    queue_depth: Family<Labels, Gauge>,
    cache_objects: Family<Labels, Gauge>,
    api_writes: Family<Labels, Counter>,
    watch_events: Family<Labels, Counter>,
    watch_lists: Family<Labels, Counter>,
    wasm_traps: Family<Labels, Counter>,
    plugin_info: Family<Labels, Gauge>,
    resyncs: Family<Labels, Counter>,
    plugin_load_errors: Family<Labels, Counter>,
    plugin_swaps: Family<Labels, Counter>,
    plugin_quarantined: Family<Labels, Gauge>,
    plugin_load_seconds: Family<Labels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    write_budget_waits: Family<Labels, Counter>,
    plugin_log_dropped: Family<Labels, Counter>,
    cache_sync_timeouts: Family<Labels, Counter>,
    reconcile_panics: Family<Labels, Counter>,
    own_write_echoes: Family<Labels, Counter>,
    stage_seconds: Family<Labels, Counter<f64, std::sync::atomic::AtomicU64>>,
    leader: Gauge,
    leader_transitions: Counter,
    oci_pulls: Family<Labels, Counter>,
    outbound_requests: Family<Labels, Counter>,
    outbound_duration: HistogramFamily,
    watch_errors: Family<Labels, Counter>,
    api_errors: Family<Labels, Counter>,
    drift_repairs: Family<Labels, Counter>,
    /// Whether the API server answers the host's calls (see [`crate::outage`]).
    pub api_health: ApiHealth,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let m = Self {
            registry: Mutex::new(Registry::default()),
            reconciles: Family::default(),
            reconcile_errors: Family::default(),
            reconcile_duration: Family::new_with_constructor(reconcile_buckets),
            queue_depth: Family::default(),
            cache_objects: Family::default(),
            api_writes: Family::default(),
            watch_events: Family::default(),
            watch_lists: Family::default(),
            wasm_traps: Family::default(),
            plugin_info: Family::default(),
            resyncs: Family::default(),
            plugin_load_errors: Family::default(),
            plugin_swaps: Family::default(),
            plugin_quarantined: Family::default(),
            plugin_load_seconds: Family::default(),
            write_budget_waits: Family::default(),
            plugin_log_dropped: Family::default(),
            cache_sync_timeouts: Family::default(),
            reconcile_panics: Family::default(),
            own_write_echoes: Family::default(),
            stage_seconds: Family::default(),
            leader: Gauge::default(),
            leader_transitions: Counter::default(),
            oci_pulls: Family::default(),
            outbound_requests: Family::default(),
            outbound_duration: Family::new_with_constructor(reconcile_buckets),
            watch_errors: Family::default(),
            api_errors: Family::default(),
            drift_repairs: Family::default(),
            api_health: ApiHealth::default(),
        };
        registry.register(
            "kuwa_reconciles",
            "Reconciles finished, by plugin and result",
            m.reconciles.clone(),
        );
        registry.register(
            "kuwa_reconcile_errors",
            "Failed reconciles, by plugin and reason (trap, timeout, memory, plugin, invalid_output, api)",
            m.reconcile_errors.clone(),
        );
        registry.register(
            "kuwa_reconcile_duration_seconds",
            "Wall time of one reconcile: snapshot, plugin call, validation and apply",
            m.reconcile_duration.clone(),
        );
        registry.register(
            "kuwa_queue_depth",
            "Keys waiting in the work queue, by plugin",
            m.queue_depth.clone(),
        );
        registry.register(
            "kuwa_cache_objects",
            "Objects in the shared caches, by kind and view (children: only objects labelled kuwa.dev/plugin; all)",
            m.cache_objects.clone(),
        );
        registry.register(
            "kuwa_api_writes",
            "API writes the host made, by plugin, verb (apply, delete, status, event, finalizer, annotate, crd) and kind",
            m.api_writes.clone(),
        );
        registry.register(
            "kuwa_watch_events",
            "Watch events received, by kind",
            m.watch_events.clone(),
        );
        registry.register(
            "kuwa_watch_lists",
            "Full lists (initial list or relist) made by the shared watches, by kind",
            m.watch_lists.clone(),
        );
        registry.register(
            "kuwa_wasm_traps",
            "Plugin calls that ended in a trap, by plugin and reason (trap, timeout, memory)",
            m.wasm_traps.clone(),
        );
        registry.register(
            "kuwa_plugin_info",
            "Loaded plugins: 1 per plugin, version and sha256",
            m.plugin_info.clone(),
        );
        registry.register(
            "kuwa_resyncs",
            "Full resyncs of a plugin's parents",
            m.resyncs.clone(),
        );
        registry.register(
            "kuwa_plugin_load_errors",
            "Plugin files not loaded (the version already served keeps serving), by file and reason (read, manifest, grant, compile, link, describe, crd, incompatible)",
            m.plugin_load_errors.clone(),
        );
        registry.register(
            "kuwa_plugin_swaps",
            "Hot swaps of a plugin to a new version",
            m.plugin_swaps.clone(),
        );
        registry.register(
            "kuwa_plugin_load_seconds",
            "How long loading the plugin's current version took (compile or compile-cache read, link, describe), by plugin and cache (hit, miss)",
            m.plugin_load_seconds.clone(),
        );
        registry.register(
            "kuwa_plugin_quarantined",
            "1 while a plugin is quarantined after consecutive failures",
            m.plugin_quarantined.clone(),
        );
        registry.register(
            "kuwa_write_budget_waits",
            "API writes that waited for the plugin's write budget",
            m.write_budget_waits.clone(),
        );
        registry.register(
            "kuwa_plugin_log_dropped",
            "Log lines a plugin wrote past its per-call limit (maxLogLines), dropped",
            m.plugin_log_dropped.clone(),
        );
        registry.register(
            "kuwa_cache_sync_timeouts",
            "Reconciles that gave up waiting for the plugin's caches to list, by plugin",
            m.cache_sync_timeouts.clone(),
        );
        registry.register(
            "kuwa_reconcile_panics",
            "Reconciles that panicked in the host (a bug); the key backed off, by plugin",
            m.reconcile_panics.clone(),
        );
        registry.register(
            "kuwa_own_write_echoes",
            "Parent changes that were the echo of the host's own write (its status or finalizer) and queued nothing, by plugin",
            m.own_write_echoes.clone(),
        );
        registry.register(
            "kuwa_reconcile_stage_seconds",
            "Time spent in each stage of reconciles (snapshot, instantiate, guest, validate, plan, preflight, apply), by plugin; divide by kuwa_reconciles_total for the cost of one",
            m.stage_seconds.clone(),
        );
        registry.register(
            "kuwa_leader",
            "1 while this host leads (takes keys and writes), 0 while it stands by; 1 without --leader-elect",
            m.leader.clone(),
        );
        registry.register(
            "kuwa_leader_transitions",
            "Times this host started leading",
            m.leader_transitions.clone(),
        );
        registry.register(
            "kuwa_plugin_pulls",
            "Components pulled from an OCI registry (not found in the digest store), by plugin object",
            m.oci_pulls.clone(),
        );
        registry.register(
            "kuwa_outbound_requests",
            "HTTP requests plugins made through the host, by plugin, origin (- when refused before a granted origin was known) and result (2xx..5xx, not_allowed, invalid, too_many_calls, timeout, too_large, failed)",
            m.outbound_requests.clone(),
        );
        registry.register(
            "kuwa_outbound_request_duration_seconds",
            "Time of one outbound HTTP request, by plugin and origin",
            m.outbound_duration.clone(),
        );
        registry.register(
            "kuwa_watch_errors",
            "Errors of the shared watches (each is retried with backoff), by kind and reason (unreachable, unavailable, gone, forbidden, throttled, rejected, other); gone means the resource version expired and the watch relists",
            m.watch_errors.clone(),
        );
        registry.register(
            "kuwa_api_errors",
            "API calls made for a plugin that failed, by plugin, verb (apply, delete, status, finalizer, event, get) and reason (as for kuwa_watch_errors, plus conflict)",
            m.api_errors.clone(),
        );
        registry.register(
            "kuwa_drift_repairs",
            "Children applied again because someone else changed a field the plugin sets, by plugin and kind",
            m.drift_repairs.clone(),
        );
        registry.register(
            "kuwa_api_reachable",
            "1 while the API server answers the host's calls, 0 during an outage (calls refused, reset or answered 5xx)",
            m.api_health.reachable_gauge(),
        );
        registry.register(
            "kuwa_api_outages",
            "API server outages the host saw (each logged at warn when it starts and when it ends)",
            m.api_health.outages_counter(),
        );
        *m.registry.lock().unwrap_or_else(|e| e.into_inner()) = registry;
        m
    }

    /// Counts a finished reconcile.
    pub fn reconciled(&self, plugin: &str, result: &str, seconds: f64) {
        self.reconciles
            .get_or_create(&vec![("plugin", plugin.into()), ("result", result.into())])
            .inc();
        self.reconcile_duration
            .get_or_create(&vec![("plugin", plugin.into())])
            .observe(seconds);
    }

    /// Counts a failed reconcile.
    pub fn reconcile_error(&self, plugin: &str, reason: &str) {
        self.reconcile_errors
            .get_or_create(&vec![("plugin", plugin.into()), ("reason", reason.into())])
            .inc();
    }

    /// Counts a trap in a plugin call.
    pub fn wasm_trap(&self, plugin: &str, reason: &str) {
        self.wasm_traps
            .get_or_create(&vec![("plugin", plugin.into()), ("reason", reason.into())])
            .inc();
    }

    /// Sets a plugin's queue depth.
    pub fn set_queue_depth(&self, plugin: &str, depth: usize) {
        self.queue_depth
            .get_or_create(&vec![("plugin", plugin.into())])
            .set(depth as i64);
    }

    /// Sets the number of cached objects of a kind in one view.
    pub fn set_cache_objects(&self, kind: &str, view: &'static str, count: usize) {
        self.cache_objects
            .get_or_create(&vec![("kind", kind.into()), ("view", view.into())])
            .set(count as i64);
    }

    /// Counts log lines a plugin wrote past its limit.
    pub fn plugin_log_dropped(&self, plugin: &str, lines: u64) {
        self.plugin_log_dropped
            .get_or_create(&vec![("plugin", plugin.into())])
            .inc_by(lines);
    }

    /// Counts a reconcile that gave up waiting for caches to sync.
    pub fn cache_sync_timeout(&self, plugin: &str) {
        self.cache_sync_timeouts
            .get_or_create(&vec![("plugin", plugin.into())])
            .inc();
    }

    /// Counts a reconcile that panicked in the host.
    pub fn reconcile_panic(&self, plugin: &str) {
        self.reconcile_panics
            .get_or_create(&vec![("plugin", plugin.into())])
            .inc();
    }

    /// Counts one API write.
    pub fn api_write(&self, plugin: &str, verb: &'static str, kind: &str) {
        self.api_writes
            .get_or_create(&vec![
                ("plugin", plugin.into()),
                ("verb", verb.into()),
                ("kind", kind.into()),
            ])
            .inc();
    }

    /// Counts one watch event.
    pub fn watch_event(&self, kind: &str) {
        self.watch_events
            .get_or_create(&vec![("kind", kind.into())])
            .inc();
    }

    /// Counts a watch error of `kind` and reports it to [`Metrics::api_health`].
    pub fn watch_error(&self, kind: &str, error: &kube::runtime::watcher::Error) {
        let failure = Failure::of_watch(error);
        self.watch_errors
            .get_or_create(&vec![
                ("kind", kind.into()),
                ("reason", failure.label().into()),
            ])
            .inc();
        self.api_health
            .failed(failure, &format!("watch {kind}"), error);
    }

    /// Counts a failed API call made for `plugin` and reports it to
    /// [`Metrics::api_health`].
    pub fn api_error(&self, plugin: &str, verb: &'static str, error: &kube::Error) {
        let failure = Failure::of(error);
        self.api_errors
            .get_or_create(&vec![
                ("plugin", plugin.into()),
                ("verb", verb.into()),
                ("reason", failure.label().into()),
            ])
            .inc();
        self.api_health.failed(failure, verb, error);
    }

    /// Counts a child applied again over someone else's change.
    pub fn drift_repaired(&self, plugin: &str, kind: &str) {
        self.drift_repairs
            .get_or_create(&vec![("plugin", plugin.into()), ("kind", kind.into())])
            .inc();
    }

    /// Counts one full list.
    pub fn watch_list(&self, kind: &str) {
        self.watch_lists
            .get_or_create(&vec![("kind", kind.into())])
            .inc();
    }

    /// Records a loaded plugin version (and clears older ones of the plugin).
    pub fn plugin_loaded(&self, plugin: &str, version: &str, sha256: &str) {
        self.plugin_unloaded(plugin);
        self.plugin_info
            .get_or_create(&vec![
                ("plugin", plugin.into()),
                ("version", version.into()),
                ("sha256", sha256.into()),
            ])
            .set(1);
    }

    /// Forgets a plugin's version series.
    pub fn plugin_unloaded(&self, plugin: &str) {
        // prometheus-client cannot enumerate a family's label sets, so set
        // gauges of other versions are removed by recreating the series map.
        let stale: Vec<Labels> = {
            let text = self.render();
            text.lines()
                .filter(|l| {
                    l.starts_with("kuwa_plugin_info{")
                        && l.contains(&format!("plugin=\"{plugin}\""))
                })
                .filter_map(parse_labels)
                .collect()
        };
        for labels in stale {
            self.plugin_info.remove(&labels);
        }
    }

    /// Counts a full resync of a plugin.
    pub fn resync(&self, plugin: &str) {
        self.resyncs
            .get_or_create(&vec![("plugin", plugin.into())])
            .inc();
    }

    /// Counts a plugin file that failed to load; `reason` is one word
    /// (`read`, `compile`, `link`, `describe`, `incompatible`, `manifest`).
    pub fn plugin_load_error(&self, file: &str, reason: &str) {
        self.plugin_load_errors
            .get_or_create(&vec![("file", file.into()), ("reason", reason.into())])
            .inc();
    }

    /// Counts a hot swap of a plugin.
    pub fn plugin_swapped(&self, plugin: &str) {
        self.plugin_swaps
            .get_or_create(&vec![("plugin", plugin.into())])
            .inc();
    }

    /// Sets whether a plugin is quarantined.
    pub fn set_quarantined(&self, plugin: &str, quarantined: bool) {
        self.plugin_quarantined
            .get_or_create(&vec![("plugin", plugin.into())])
            .set(i64::from(quarantined));
    }

    /// Records how long loading a plugin took.
    pub fn plugin_load_time(&self, plugin: &str, cache: &str, seconds: f64) {
        self.plugin_load_seconds
            .get_or_create(&vec![("plugin", plugin.into()), ("cache", cache.into())])
            .set(seconds);
    }

    /// Counts a write that had to wait for the write budget.
    pub fn write_budget_wait(&self, plugin: &str) {
        self.write_budget_waits
            .get_or_create(&vec![("plugin", plugin.into())])
            .inc();
    }

    /// Counts a parent change that was the echo of the host's own write.
    pub fn echo_skipped(&self, plugin: &str) {
        self.own_write_echoes
            .get_or_create(&vec![("plugin", plugin.into())])
            .inc();
    }

    /// Adds time spent in one stage of a reconcile.
    pub fn stage(&self, plugin: &str, stage: &'static str, seconds: f64) {
        self.stage_seconds
            .get_or_create(&vec![("plugin", plugin.into()), ("stage", stage.into())])
            .inc_by(seconds);
    }

    /// Sets whether this host leads; counts the transitions to leading.
    pub fn set_leader(&self, leading: bool) {
        if leading && self.leader.get() == 0 {
            self.leader_transitions.inc();
        }
        self.leader.set(i64::from(leading));
    }

    /// Counts a component pulled over the network for plugin object `object`.
    pub fn oci_pull(&self, object: &str) {
        self.oci_pulls
            .get_or_create(&vec![("object", object.into())])
            .inc();
    }

    /// Counts one outbound request of `plugin` to `host` and its time.
    pub fn outbound_request(&self, plugin: &str, host: &str, result: &str, seconds: f64) {
        self.outbound_requests
            .get_or_create(&vec![
                ("plugin", plugin.into()),
                ("host", host.into()),
                ("result", result.into()),
            ])
            .inc();
        self.outbound_duration
            .get_or_create(&vec![("plugin", plugin.into()), ("host", host.into())])
            .observe(seconds);
    }

    /// The metrics in Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let registry = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &registry);
        out
    }
}

/// Parses the labels of one `kuwa_plugin_info{...} 1` line.
fn parse_labels(line: &str) -> Option<Labels> {
    let inner = line.split_once('{')?.1.split_once('}')?.0;
    let mut labels = Labels::new();
    for pair in inner.split(',') {
        let (k, v) = pair.split_once('=')?;
        let key = match k {
            "plugin" => "plugin",
            "version" => "version",
            "sha256" => "sha256",
            _ => return None,
        };
        labels.push((key, v.trim_matches('"').to_owned()));
    }
    Some(labels)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_api_writes_with_labels() {
        let m = Metrics::new();
        m.api_write("webserver", "apply", "apps/v1/Deployment");
        m.api_write("webserver", "apply", "apps/v1/Deployment");
        let text = m.render();
        assert!(
            text.contains(r#"kuwa_api_writes_total{plugin="webserver",verb="apply",kind="apps/v1/Deployment"} 2"#),
            "{text}"
        );
    }

    #[test]
    fn hot_swap_metrics_are_exported() {
        let m = Metrics::new();
        m.plugin_load_error("webserver.wasm", "compile");
        m.plugin_swapped("webserver");
        let text = m.render();
        assert!(
            text.contains(
                r#"kuwa_plugin_load_errors_total{file="webserver.wasm",reason="compile"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains(r#"kuwa_plugin_swaps_total{plugin="webserver"} 1"#),
            "{text}"
        );
    }

    #[test]
    fn every_metric_is_registered() {
        let m = Metrics::new();
        m.plugin_load_error("a.wasm", "compile");
        m.plugin_swapped("p");
        m.set_quarantined("p", true);
        m.plugin_load_time("p", "hit", 0.01);
        m.write_budget_wait("p");
        m.plugin_log_dropped("p", 3);
        m.cache_sync_timeout("p");
        m.reconcile_panic("p");
        m.echo_skipped("p");
        m.stage("p", "guest", 0.001);
        let text = m.render();
        for name in [
            "kuwa_plugin_load_errors_total",
            "kuwa_plugin_swaps_total",
            "kuwa_plugin_quarantined",
            "kuwa_plugin_load_seconds",
            "kuwa_write_budget_waits_total",
            "kuwa_plugin_log_dropped_total",
            "kuwa_cache_sync_timeouts_total",
            "kuwa_reconcile_panics_total",
            "kuwa_own_write_echoes_total",
            "kuwa_reconcile_stage_seconds_total",
        ] {
            assert!(
                text.lines().any(|l| l.starts_with(name)),
                "{name} missing:\n{text}"
            );
        }
    }

    #[test]
    fn plugin_info_keeps_only_the_current_version() {
        let m = Metrics::new();
        m.plugin_loaded("webserver", "0.1.0", "aaa");
        m.plugin_loaded("webserver", "0.2.0", "bbb");
        let text = m.render();
        assert!(
            text.contains(r#"kuwa_plugin_info{plugin="webserver",version="0.2.0",sha256="bbb"} 1"#),
            "{text}"
        );
        assert!(!text.contains("0.1.0"), "{text}");
    }
}

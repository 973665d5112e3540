//! The reconcile stage: snapshot one parent from the caches, call its plugin
//! in a fresh sandbox, validate the output, plan the writes and hand them to
//! the plugin's writer.
//!
//! Every failure is confined to its key: it is logged, counted, recorded as
//! an Event on the parent and retried with backoff; an invalid spec, a
//! rejected output or a conflicting child marks the parent `Degraded`
//! instead (and an invalid spec waits for the user).

use std::sync::Arc;
use std::time::{Duration, Instant};

use kube::api::DynamicObject;
use kube::{Resource, ResourceExt};
use tracing::Instrument;

use crate::active::ActivePlugin;
use crate::apply::WriteError;
use crate::cache::{CachedObject, ObjKey};
use crate::gvk::Gvk;
use crate::metrics::Metrics;
use crate::plan::{self, ApplyReason, FINALIZE_POLL, Observed, Plan, PlanError, Write};
use crate::plugin::runtime::{CallError, wit};
use crate::queue::{Outcome, QueueKey};
use crate::tenant::limits::MAX_EVENT_MESSAGE_BYTES;
use crate::tenant::quarantine::Transition;
use crate::validate::{ParentRef, ValidationError, validate_events, validate_output};

/// What a reconcile needs besides the plugin.
pub struct Context {
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// How long to wait for the caches the plugin reads to list once: a
    /// cache that cannot list (the kind is forbidden, the server refuses it)
    /// must not hang every key of the plugin for ever.
    pub sync_timeout: Duration,
}

/// Why one reconcile failed.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    /// The plugin trapped, timed out or hit its memory cap.
    #[error("plugin call failed: {0}")]
    Call(#[from] CallError),
    /// The plugin returned a transient or bad-input error.
    #[error("plugin returned an error: {0}")]
    Plugin(String),
    /// The plugin says the spec can never work.
    #[error("invalid spec: {0}")]
    InvalidSpec(String),
    /// The plugin's output broke the contract; nothing of it was applied.
    #[error("output rejected, nothing applied: {0}")]
    InvalidOutput(String),
    /// A desired child exists but this parent does not control it.
    #[error("{0}")]
    Conflict(String),
    /// The caches the plugin reads have not listed.
    #[error("the caches of {0} have not synced")]
    NotSynced(String),
    /// An API write failed.
    #[error("API write failed: {0}")]
    Write(#[from] WriteError),
}

impl From<ValidationError> for Failure {
    fn from(e: ValidationError) -> Self {
        Self::InvalidOutput(bounded(e.to_string()))
    }
}

impl From<PlanError> for Failure {
    fn from(e: PlanError) -> Self {
        match e {
            PlanError::Conflict { .. } => Self::Conflict(e.to_string()),
            PlanError::ClusterScopedChild { .. } => Self::InvalidOutput(e.to_string()),
        }
    }
}

impl From<kube::Error> for Failure {
    fn from(e: kube::Error) -> Self {
        Self::Write(WriteError::Api(e))
    }
}

impl Failure {
    fn reason(&self) -> &'static str {
        match self {
            Self::Call(CallError::Timeout(_)) => "timeout",
            Self::Call(CallError::MemoryLimit(_)) => "memory",
            Self::Call(CallError::OutOfFuel(_)) => "fuel",
            Self::Call(CallError::Instantiate(_)) => "instantiate",
            Self::Call(_) => "trap",
            Self::Plugin(_) => "plugin",
            Self::InvalidSpec(_) => "invalid_spec",
            Self::InvalidOutput(_) => "invalid_output",
            Self::Conflict(_) => "conflict",
            Self::NotSynced(_) => "not_synced",
            Self::Write(WriteError::NotLeader) => "not_leader",
            Self::Write(w) if w.is_forbidden() => "forbidden",
            Self::Write(_) => "api",
        }
    }

    /// Whether the plugin itself is to blame (counts towards quarantine),
    /// as opposed to the host (no instance slot), the cluster (API errors,
    /// conflicts, caches) or the user (spec).
    fn is_plugin_fault(&self) -> bool {
        match self {
            Self::Call(e) => e.is_plugin_fault(),
            Self::Plugin(_) | Self::InvalidOutput(_) => true,
            _ => false,
        }
    }

    /// The `Degraded` reason this failure sets on the parent, if it is one
    /// the user must see in the status.
    fn degraded_reason(&self) -> Option<&'static str> {
        match self {
            Self::InvalidSpec(_) => Some("InvalidSpec"),
            Self::InvalidOutput(_) => Some("InvalidOutput"),
            Self::Conflict(_) => Some("ChildConflict"),
            Self::NotSynced(_) => Some("CacheNotSynced"),
            Self::Write(w) if w.is_forbidden() => Some("Forbidden"),
            _ => None,
        }
    }

    fn event_reason(&self) -> &'static str {
        match self {
            Self::Call(_) => "PluginFailed",
            Self::Plugin(_) => "ReconcileFailed",
            Self::InvalidSpec(_) => "InvalidSpec",
            Self::InvalidOutput(_) => "InvalidOutput",
            Self::Conflict(_) => "ChildConflict",
            Self::NotSynced(_) => "CacheNotSynced",
            Self::Write(_) => "ApplyFailed",
        }
    }

    fn message(&self) -> String {
        match self {
            Self::InvalidOutput(e) => format!("plugin output rejected, nothing applied: {e}"),
            Self::InvalidSpec(m) | Self::Conflict(m) => m.clone(),
            other => other.to_string(),
        }
    }
}

/// The trigger of `POST /resync`: the plugin is called even for a parent it
/// left settled with the same inputs.
pub const FORCED_RESYNC: &str = "forced resync";

/// The current time as the plugins see it: RFC 3339, whole seconds (the
/// precision the API server keeps for timestamps).
pub fn now_rfc3339() -> String {
    jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

/// Reconciles one key of `plugin` and reports how it went.
pub async fn run(
    plugin: &ActivePlugin,
    ctx: &Context,
    key: &QueueKey,
    trigger: &'static str,
) -> Outcome {
    let name = &*key.plugin;
    if tokio::time::timeout(ctx.sync_timeout, plugin.wait_synced())
        .await
        .is_err()
    {
        let kinds: Vec<String> = plugin.unsynced().iter().map(Gvk::to_string).collect();
        let failure = Failure::NotSynced(kinds.join(", "));
        ctx.metrics.cache_sync_timeout(name);
        tracing::warn!(plugin = %name, object = %key, kinds = ?kinds, timeout = ?ctx.sync_timeout, "caches did not sync in time; the key backs off");
        if plugin.parent.is_synced()
            && let Some(parent) = plugin.parent_at(key)
        {
            report(plugin, &parent.to_dynamic(), &failure).await;
        }
        return Outcome::Failure;
    }
    let Some(cached) = plugin.parent_at(key) else {
        // Deleted: the garbage collector removes its children.
        return Outcome::Skipped;
    };
    let parent = cached.to_dynamic();
    if !plugin
        .loaded
        .grant
        .allows_namespace(parent.metadata.namespace.as_deref())
    {
        // Outside the plugin's grant: the plugin may not act here at all,
        // but a finalizer the host put there before the grant was narrowed
        // must not strand the parent.
        tracing::debug!(plugin = %name, object = %key, "parent outside the plugin's granted namespaces");
        ctx.metrics.reconciled(name, "outside_grant", 0.0);
        if plan::has_finalizer(plugin.info(), &parent)
            && let Err(e) = plugin.writer.release_finalizer(&parent).await
        {
            tracing::warn!(plugin = %name, object = %key, error = %e, "could not release the host's finalizer outside the grant");
        }
        return Outcome::Skipped;
    }
    let span = tracing::info_span!(
        "reconcile",
        plugin = %name,
        version = %plugin.info().version,
        object = %key,
        trigger,
    );
    let started = Instant::now();
    let result = reconcile_parent(plugin, &ctx.metrics, &parent, cached.json(), trigger)
        .instrument(span.clone())
        .await;
    let seconds = started.elapsed().as_secs_f64();
    let dropped = plugin.loaded.take_dropped_log_lines();
    if dropped > 0 {
        ctx.metrics.plugin_log_dropped(name, dropped);
    }
    for call in plugin.loaded.take_outbound_calls() {
        ctx.metrics
            .outbound_request(name, &call.host, call.result, call.seconds);
    }
    match result {
        Ok(Reconciled {
            unchanged: true, ..
        }) => {
            ctx.metrics.reconciled(name, "unchanged", seconds);
            Outcome::Skipped
        }
        Ok(Reconciled { called: false, .. }) => Outcome::Skipped,
        Ok(Reconciled { requeue_after, .. }) => {
            if plugin.quarantine.success() == Transition::Lifted {
                ctx.metrics.set_quarantined(name, false);
                tracing::info!(parent: &span, "quarantine lifted: a reconcile succeeded");
            }
            ctx.metrics.reconciled(name, "success", seconds);
            tracing::debug!(parent: &span, seconds, "reconciled");
            Outcome::Success { requeue_after }
        }
        Err(failure) => {
            ctx.metrics.reconciled(name, "error", seconds);
            ctx.metrics.reconcile_error(name, failure.reason());
            if failure.is_plugin_fault() && plugin.quarantine.failure() == Transition::Quarantined {
                ctx.metrics.set_quarantined(name, true);
                tracing::error!(
                    parent: &span,
                    failures = plugin.quarantine.streak(),
                    interval = ?plugin.loaded.grant.quarantine_interval,
                    "plugin quarantined after consecutive failures; it is called once per interval until a call succeeds or a new version is loaded"
                );
            }
            if let Failure::Call(e) = &failure {
                ctx.metrics.wasm_trap(name, failure.reason());
                tracing::warn!(parent: &span, error = %e, seconds, "plugin call failed");
            } else {
                tracing::warn!(parent: &span, error = %failure, "reconcile failed");
            }
            report(plugin, &parent, &failure).await;
            match failure {
                // The plugin answered (the user must change the spec): a
                // call that went through. The next resync looks again.
                Failure::InvalidSpec(_) => {
                    if plugin.quarantine.success() == Transition::Lifted {
                        ctx.metrics.set_quarantined(name, false);
                    }
                    Outcome::Success {
                        requeue_after: None,
                    }
                }
                _ if failure.is_plugin_fault() && plugin.quarantine.is_quarantined() => {
                    Outcome::Quarantined
                }
                _ => Outcome::Failure,
            }
        }
    }
}

/// Tells the user about a failure on the parent: `Degraded=True` (once per
/// change, with one Warning event) for the failures a user must act on or
/// see, a Warning event for the others.
async fn report(plugin: &ActivePlugin, parent: &DynamicObject, failure: &Failure) {
    if matches!(failure, Failure::Write(WriteError::NotLeader)) {
        // Standing by now: the leader reports.
        return;
    }
    let plan = match failure.degraded_reason() {
        Some(reason) => plan::degraded(parent, reason, &failure.message(), &now_rfc3339()),
        None => Plan {
            writes: vec![Write::Event(crate::validate::EventOut::warning(
                failure.event_reason(),
                &failure.message(),
            ))],
            requeue_after: None,
        },
    };
    // Each on its own: a parent kind without a status subresource still
    // gets the event.
    for write in &plan.writes {
        if let Err(e) = plugin.writer.write(parent, write).await {
            tracing::warn!(plugin = %plugin.info().name, error = %e, "could not report the failure on the parent");
        }
    }
}

/// The children `parent` controls, across the plugin's child kinds.
pub fn observed_children(plugin: &ActivePlugin, parent: &DynamicObject) -> Vec<Arc<CachedObject>> {
    let uid = parent.uid().unwrap_or_default();
    plugin
        .children
        .iter()
        .flat_map(|cache| cache.owned_by(&uid))
        .filter(|child| plan::controlled_by(&**child, &uid))
        .collect()
}

/// What the plugin is shown for `parent` (whose cached JSON is
/// `parent_json`): its children and related objects from the caches, as the
/// JSON text the caches hold, and the call's context. Returns the children
/// too.
fn snapshot(
    plugin: &ActivePlugin,
    parent: &DynamicObject,
    parent_json: &str,
    trigger: &str,
) -> (
    Vec<Arc<CachedObject>>,
    Vec<Arc<CachedObject>>,
    wit::Observed,
) {
    let children = observed_children(plugin, parent);
    let related = crate::related::objects_of(plugin, parent, &children);
    let input = wit::Observed {
        parent: parent_json.to_owned(),
        children: children.iter().map(|c| c.json().to_owned()).collect(),
        related: related.iter().map(|c| c.json().to_owned()).collect(),
        context: wit::Context {
            now: now_rfc3339(),
            trigger: trigger.to_owned(),
        },
    };
    (children, related, input)
}

/// `text` cut to [`MAX_EVENT_MESSAGE_BYTES`]: whatever a plugin says ends
/// up in logs, events and conditions, so it is bounded where it comes in.
fn bounded(mut text: String) -> String {
    crate::plugin::runtime::truncate(&mut text, MAX_EVENT_MESSAGE_BYTES);
    text
}

fn plugin_error(e: wit::ReconcileError) -> Failure {
    match e {
        wit::ReconcileError::InvalidSpec(m) => Failure::InvalidSpec(bounded(m)),
        wit::ReconcileError::Transient(m) => Failure::Plugin(format!("transient: {}", bounded(m))),
        wit::ReconcileError::BadInput(m) => Failure::Plugin(format!("bad input: {}", bounded(m))),
    }
}

/// How a reconcile that did not fail went.
struct Reconciled {
    /// Look again after this long.
    requeue_after: Option<Duration>,
    /// Whether the plugin was called (only then does it count as a success
    /// of the plugin).
    called: bool,
    /// Whether the plugin was not called because its inputs are those of a
    /// reconcile that left the parent settled.
    unchanged: bool,
}

impl Reconciled {
    fn called(requeue_after: Option<Duration>) -> Self {
        Self {
            requeue_after,
            called: true,
            unchanged: false,
        }
    }
}

/// Adds the time since `since` to `stage` and restarts the clock.
fn lap(metrics: &Metrics, plugin: &str, stage: &'static str, since: &mut Instant) {
    metrics.stage(plugin, stage, since.elapsed().as_secs_f64());
    *since = Instant::now();
}

/// Adds the instantiate and guest time of the plugin's calls.
fn call_stages(metrics: &Metrics, plugin: &ActivePlugin) {
    let (instantiate, guest) = plugin.loaded.take_call_seconds();
    let name = &plugin.info().name;
    metrics.stage(name, "instantiate", instantiate);
    metrics.stage(name, "guest", guest);
}

async fn reconcile_parent(
    plugin: &ActivePlugin,
    metrics: &Metrics,
    parent: &DynamicObject,
    parent_json: &str,
    trigger: &'static str,
) -> Result<Reconciled, Failure> {
    let info = plugin.info();
    let mut clock = Instant::now();
    let grant = &plugin.loaded.grant;
    let writer = &plugin.writer;
    let has_finalizer = plan::has_finalizer(info, parent);
    let deleting = parent.meta().deletion_timestamp.is_some();
    let skipped = Reconciled {
        requeue_after: None,
        called: false,
        unchanged: false,
    };
    if deleting && !has_finalizer {
        return Ok(skipped);
    }
    if deleting && !info.finalizer {
        // An earlier version held the finalizer; this one has nothing to
        // clean up, so the parent may go.
        writer.set_finalizer(parent, false).await?;
        return Ok(skipped);
    }
    let (children, related, input) = snapshot(plugin, parent, parent_json, trigger);
    let key = ObjKey::of(parent);
    let seen = crate::active::fingerprint(parent, children.iter().chain(&related).map(|o| &**o));
    lap(metrics, &info.name, "snapshot", &mut clock);
    if !deleting && trigger != FORCED_RESYNC && plugin.settled.is(&key, seen) {
        return Ok(Reconciled {
            unchanged: true,
            ..skipped
        });
    }
    plugin.settled.forget(&key);

    if deleting {
        let finalized = plugin
            .loaded
            .finalize(&input)
            .await?
            .map_err(plugin_error)?;
        for e in validate_events(grant, finalized.events)? {
            writer.event(parent, &e).await;
        }
        if finalized.done {
            writer.set_finalizer(parent, false).await?;
            return Ok(Reconciled::called(None));
        }
        return Ok(Reconciled::called(Some(
            finalized
                .requeue_after_ms
                .map_or(FINALIZE_POLL, crate::validate::requeue_after),
        )));
    }

    let desired = plugin.loaded.reconcile(&input).await;
    call_stages(metrics, plugin);
    clock = Instant::now();
    let desired = desired?.map_err(plugin_error)?;
    let namespace = parent.namespace();
    let parent_ref = ParentRef {
        namespace: namespace.as_deref(),
        name: parent.metadata.name.as_deref().unwrap_or_default(),
    };
    let output = validate_output(info, grant, &parent_ref, desired)?;
    lap(metrics, &info.name, "validate", &mut clock);
    let cached = |gvk: &Gvk, ns: Option<&str>, name: &str| {
        plugin
            .children
            .iter()
            .find(|c| &c.gvk == gvk)
            .and_then(|c| {
                c.get(&ObjKey {
                    namespace: ns.map(str::to_owned),
                    name: name.to_owned(),
                })
            })
    };
    let namespaced = |gvk: &Gvk| {
        plugin
            .children
            .iter()
            .any(|c| &c.gvk == gvk && c.namespaced)
    };
    let now = now_rfc3339();
    let mut plan = {
        let seen = Observed {
            info,
            grant,
            parent,
            children: &children,
            cached: &cached,
            namespaced: &namespaced,
            now: &now,
        };
        plan::reconcile(&seen, output)?
    };
    lap(metrics, &info.name, "plan", &mut clock);
    preflight(plugin, parent, &mut plan).await?;
    lap(metrics, &info.name, "preflight", &mut clock);
    writer.execute(parent, &plan).await?;
    lap(metrics, &info.name, "apply", &mut clock);
    if plan.writes.is_empty() && plan.requeue_after.is_none() {
        plugin.settled.set(key, seen);
    }
    tracing::trace!(writes = plan.writes.len(), "applied");
    Ok(Reconciled::called(plan.requeue_after))
}

/// Before anything is written: a child the caches do not hold may still
/// exist (the children caches hold only objects labelled for a plugin), so
/// each one about to be created is read from the API server (all of them at
/// once). One that this parent does not control is a conflict (the host
/// never adopts); one it does control (a cache behind) is compared as usual.
async fn preflight(
    plugin: &ActivePlugin,
    parent: &DynamicObject,
    plan: &mut Plan,
) -> Result<(), Failure> {
    let uid = parent.uid().unwrap_or_default();
    let missing = |w: &Write| {
        matches!(
            w,
            Write::Apply {
                reason: ApplyReason::Missing,
                ..
            }
        )
    };
    if !plan.writes.iter().any(missing) {
        return Ok(());
    }
    let reads = plan.writes.iter().map(|write| async move {
        match write {
            Write::Apply {
                gvk,
                namespace,
                name,
                reason: ApplyReason::Missing,
                ..
            } => {
                plugin
                    .writer
                    .get_child(gvk, namespace.as_deref(), name)
                    .await
            }
            _ => Ok(None),
        }
    });
    let found = futures::future::join_all(reads).await;
    let mut keep = Vec::with_capacity(plan.writes.len());
    for (write, existing) in plan.writes.drain(..).zip(found) {
        if let (
            Write::Apply {
                gvk, name, body, ..
            },
            Some(existing),
        ) = (&write, existing?)
        {
            if !plan::controlled_by(&existing, &uid) {
                return Err(PlanError::Conflict {
                    gvk: gvk.clone(),
                    name: name.clone(),
                    owner: existing
                        .owner_references()
                        .iter()
                        .find(|o| o.controller == Some(true))
                        .map(|o| format!(", but by {} {:?}", o.kind, o.name))
                        .unwrap_or_default(),
                }
                .into());
            }
            if plan::needs_apply(body, Some(&CachedObject::new(existing))).is_none() {
                continue;
            }
        }
        keep.push(write);
    }
    plan.writes = keep;
    Ok(())
}

/// Lets go of a parent of a plugin that is being unloaded: a parent being
/// deleted gets the plugin's `finalize` once (its answer cannot hold the
/// parent any more: nothing would ever call it again), then the host's
/// finalizer is removed so the parent can go.
pub async fn release(plugin: &ActivePlugin, parent: &DynamicObject) {
    let info = plugin.info();
    let granted = plugin
        .loaded
        .grant
        .allows_namespace(parent.metadata.namespace.as_deref());
    if parent.meta().deletion_timestamp.is_some() && info.finalizer && granted {
        let json = serde_json::to_string(parent).unwrap_or_else(|_| "{}".into());
        let (_, _, input) = snapshot(plugin, parent, &json, "plugin unloaded");
        match plugin.loaded.finalize(&input).await {
            Ok(Ok(f)) if f.done => {}
            Ok(Ok(_)) => {
                tracing::warn!(plugin = %info.name, object = %parent.name_any(), "finalize was not done, but the plugin is unloaded: releasing the parent")
            }
            Ok(Err(e)) => {
                tracing::warn!(plugin = %info.name, object = %parent.name_any(), error = ?e, "finalize failed, but the plugin is unloaded: releasing the parent")
            }
            Err(e) => {
                tracing::warn!(plugin = %info.name, object = %parent.name_any(), error = %e, "finalize call failed, but the plugin is unloaded: releasing the parent")
            }
        }
    }
    if let Err(e) = plugin.writer.release_finalizer(parent).await {
        tracing::warn!(plugin = %info.name, object = %parent.name_any(), error = %e, "could not release the host's finalizer");
    }
}

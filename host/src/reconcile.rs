//! The reconcile stage: snapshot one parent from the caches, call its plugin in
//! a fresh sandbox, validate the output, and apply only what changed.
//!
//! Every failure is confined to its key: it is logged, counted, recorded as an
//! Event on the parent and retried with backoff; an invalid spec marks the
//! parent `Degraded` instead and waits for the user.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kube::api::DynamicObject;
use kube::{Resource, ResourceExt};
use serde_json::Value;
use tracing::Instrument;

use crate::apply::{
    PLUGIN_VERSION_ANNOTATION, Target, is_subset, needs_apply, owner_reference, prepare_child,
    upsert_condition,
};
use crate::cache::ObjKey;
use crate::controller::{ActivePlugin, Host, selector_matches};
use crate::plugin::{Gvk, RelatedMapping};
use crate::queue::{Outcome, QueueKey};
use crate::runtime::{CallError, wit};
use crate::validate::{ParentRef, ValidationError, validate_output};

/// How long to wait before asking `finalize` again when it says "not yet"
/// without a time of its own.
pub const FINALIZE_POLL: Duration = Duration::from_secs(5);

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
    InvalidOutput(#[from] ValidationError),
    /// A desired child exists but is controlled by another owner.
    #[error("{0}")]
    Conflict(String),
    /// An API write failed.
    #[error("API write failed: {0}")]
    Api(#[from] kube::Error),
}

impl Failure {
    fn reason(&self) -> &'static str {
        match self {
            Self::Call(CallError::Timeout(_)) => "timeout",
            Self::Call(CallError::MemoryLimit(_)) => "memory",
            Self::Call(CallError::OutOfFuel(_)) => "fuel",
            Self::Call(_) => "trap",
            Self::Plugin(_) => "plugin",
            Self::InvalidSpec(_) => "invalid_spec",
            Self::InvalidOutput(_) => "invalid_output",
            Self::Conflict(_) => "conflict",
            Self::Api(_) => "api",
        }
    }

    /// Whether the plugin itself is to blame (counts towards quarantine),
    /// as opposed to the cluster (API errors, conflicts) or the user (spec).
    fn is_plugin_fault(&self) -> bool {
        matches!(
            self,
            Self::Call(_) | Self::Plugin(_) | Self::InvalidOutput(_)
        )
    }

    fn event_reason(&self) -> &'static str {
        match self {
            Self::Call(_) => "PluginFailed",
            Self::Plugin(_) => "ReconcileFailed",
            Self::InvalidSpec(_) => "InvalidSpec",
            Self::InvalidOutput(_) => "InvalidOutput",
            Self::Conflict(_) => "ChildConflict",
            Self::Api(_) => "ApplyFailed",
        }
    }
}

/// The current time as the plugins see it: RFC 3339, whole seconds (the
/// precision the API server keeps for timestamps).
pub fn now_rfc3339() -> String {
    jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

/// Reconciles one key and reports how it went.
pub async fn run(host: &Arc<Host>, key: &QueueKey, trigger: &'static str) -> Outcome {
    let Some(plugin) = host.plugin(&key.plugin) else {
        return Outcome::Success {
            requeue_after: None,
        };
    };
    plugin.wait_synced().await;
    let object_key = ObjKey {
        namespace: key.namespace.clone(),
        name: key.name.clone(),
    };
    let Some(parent) = plugin.parent.get(&object_key) else {
        // Deleted: the garbage collector removes its children.
        return Outcome::Success {
            requeue_after: None,
        };
    };
    if !plugin
        .loaded
        .grant
        .allows_namespace(parent.metadata.namespace.as_deref())
    {
        // Outside the plugin's grant: the plugin may not act here at all.
        tracing::debug!(plugin = %key.plugin, object = %key, "parent outside the plugin's granted namespaces");
        host.metrics.reconciled(&key.plugin, "outside_grant", 0.0);
        return Outcome::Success {
            requeue_after: None,
        };
    }
    let span = tracing::info_span!(
        "reconcile",
        plugin = %key.plugin,
        version = %plugin.info().version,
        object = %key,
        trigger,
    );
    let started = Instant::now();
    let result = reconcile_parent(host, &plugin, &parent, trigger)
        .instrument(span.clone())
        .await;
    let seconds = started.elapsed().as_secs_f64();
    let name = &*key.plugin;
    match result {
        Ok(requeue_after) => {
            plugin.record_success(&host.metrics);
            host.metrics.reconciled(name, "success", seconds);
            tracing::debug!(parent: &span, seconds, "reconciled");
            Outcome::Success { requeue_after }
        }
        Err(failure) => {
            host.metrics.reconciled(name, "error", seconds);
            host.metrics.reconcile_error(name, failure.reason());
            let quarantined = failure.is_plugin_fault() && plugin.record_failure(&host.metrics);
            if let Failure::Call(e) = &failure {
                host.metrics.wasm_trap(name, failure.reason());
                tracing::warn!(parent: &span, error = %e, seconds, "plugin call failed");
            } else {
                tracing::warn!(parent: &span, error = %failure, "reconcile failed");
            }
            let now = now_rfc3339();
            let degraded = match &failure {
                Failure::InvalidSpec(m) => Some(("InvalidSpec", m.clone())),
                Failure::InvalidOutput(e) => Some((
                    "InvalidOutput",
                    format!("plugin output rejected, nothing applied: {e}"),
                )),
                _ => None,
            };
            let mut record_event = true;
            if let Some((reason, message)) = degraded {
                match mark_degraded(host, &plugin, &parent, reason, &message, &now).await {
                    // Unchanged Degraded condition: already reported.
                    Ok(false) => record_event = false,
                    Ok(true) => {}
                    Err(e) => {
                        tracing::warn!(parent: &span, error = %e, "could not mark the parent Degraded")
                    }
                }
            }
            if record_event {
                plugin.write_permit(&host.metrics).await;
                host.writer
                    .event(
                        name,
                        &parent,
                        &plugin.parent.resource,
                        true,
                        failure.event_reason(),
                        &failure.to_string(),
                    )
                    .await;
            }
            match failure {
                // The user must change the spec; the next resync looks again.
                Failure::InvalidSpec(_) => Outcome::Success {
                    requeue_after: None,
                },
                _ if quarantined => Outcome::Quarantined,
                _ => Outcome::Failure,
            }
        }
    }
}

/// Writes `Degraded=True` with `reason` into the parent's status. Returns
/// whether anything was written.
async fn mark_degraded(
    host: &Host,
    plugin: &ActivePlugin,
    parent: &DynamicObject,
    reason: &str,
    message: &str,
    now: &str,
) -> Result<bool, kube::Error> {
    let current = parent.data.get("status").cloned().unwrap_or(Value::Null);
    let mut status = current.clone();
    upsert_condition(
        &mut status,
        "Degraded",
        true,
        reason,
        message,
        parent.meta().generation,
        now,
    );
    if is_subset(&status, &current) {
        return Ok(false);
    }
    let target = parent_target(plugin, parent);
    plugin.write_permit(&host.metrics).await;
    host.writer
        .apply_status(plugin.info(), &target, &status)
        .await?;
    Ok(true)
}

fn parent_target<'a>(plugin: &'a ActivePlugin, parent: &'a DynamicObject) -> Target<'a> {
    Target {
        resource: &plugin.parent.resource,
        gvk: &plugin.info().parent,
        namespace: parent.metadata.namespace.as_deref(),
        name: parent.metadata.name.as_deref().unwrap_or_default(),
    }
}

/// The children `parent` controls, across the plugin's child kinds.
pub fn observed_children(plugin: &ActivePlugin, parent: &DynamicObject) -> Vec<Arc<DynamicObject>> {
    let uid = parent.uid().unwrap_or_default();
    plugin
        .children
        .iter()
        .flat_map(|cache| cache.owned_by(&uid))
        .filter(|child| {
            child
                .owner_references()
                .iter()
                .any(|o| o.uid == uid && o.controller == Some(true))
        })
        .collect()
}

/// The related objects of `parent`, per the plugin's declared mappings.
pub fn observed_related(
    plugin: &ActivePlugin,
    parent: &DynamicObject,
    children: &[Arc<DynamicObject>],
) -> Vec<Arc<DynamicObject>> {
    let mut out = Vec::new();
    let namespace = parent.namespace();
    for (cache, mapping) in &plugin.related {
        match mapping {
            RelatedMapping::OwnedByChild => {
                for child in children {
                    out.extend(cache.owned_by(&child.uid().unwrap_or_default()));
                }
            }
            RelatedMapping::LabelSelectorFromParent(pointer) => {
                let parent_json = crate::apply::object_json(parent);
                let candidates = match &namespace {
                    Some(ns) => cache.in_namespace(ns),
                    None => cache.list(),
                };
                out.extend(
                    candidates
                        .into_iter()
                        .filter(|o| selector_matches(&parent_json, pointer, o.labels())),
                );
            }
            RelatedMapping::AllInNamespace => match &namespace {
                Some(ns) => out.extend(cache.in_namespace(ns)),
                None => out.extend(cache.list()),
            },
            RelatedMapping::AllInCluster => out.extend(cache.list()),
        }
    }
    out
}

fn to_json(object: &DynamicObject) -> String {
    serde_json::to_string(object).unwrap_or_else(|_| "{}".into())
}

async fn reconcile_parent(
    host: &Host,
    plugin: &ActivePlugin,
    parent: &DynamicObject,
    trigger: &'static str,
) -> Result<Option<Duration>, Failure> {
    let info = plugin.info();
    let target = parent_target(plugin, parent);
    let finalizer = info.finalizer_name();
    let has_finalizer = parent.finalizers().contains(&finalizer);
    let deleting = parent.meta().deletion_timestamp.is_some();
    if deleting && !(info.finalizer && has_finalizer) {
        return Ok(None);
    }
    let children = observed_children(plugin, parent);
    let related = observed_related(plugin, parent, &children);
    let input = wit::Observed {
        parent: to_json(parent),
        children: children.iter().map(|c| to_json(c)).collect(),
        related: related.iter().map(|c| to_json(c)).collect(),
        context: wit::Context {
            now: now_rfc3339(),
            trigger: trigger.to_owned(),
        },
    };
    let loaded = plugin.loaded.clone();

    if deleting {
        let finalized = tokio::task::spawn_blocking(move || loaded.finalize(&input))
            .await
            .map_err(|e| CallError::Trap(format!("plugin worker panicked: {e}")))??
            .map_err(plugin_error)?;
        for e in &finalized.events {
            record(host, plugin, parent, e).await;
        }
        if finalized.done {
            plugin.write_permit(&host.metrics).await;
            host.writer.set_finalizer(info, &target, false).await?;
            return Ok(None);
        }
        return Ok(Some(
            finalized
                .requeue_after_ms
                .map_or(FINALIZE_POLL, Duration::from_millis),
        ));
    }

    if info.finalizer && !has_finalizer {
        plugin.write_permit(&host.metrics).await;
        host.writer.set_finalizer(info, &target, true).await?;
    }

    let desired = tokio::task::spawn_blocking(move || loaded.reconcile(&input))
        .await
        .map_err(|e| CallError::Trap(format!("plugin worker panicked: {e}")))??
        .map_err(plugin_error)?;

    let namespace = parent.namespace();
    let parent_ref = ParentRef {
        namespace: namespace.as_deref(),
        name: target.name,
    };
    let namespaced = |g: &Gvk| plugin.children.iter().any(|c| &c.gvk == g && c.namespaced);
    let (wanted, status) = validate_output(
        info,
        &plugin.loaded.grant,
        &parent_ref,
        &desired.children,
        desired.status.as_deref(),
    )?;
    if let Some(child) = wanted
        .iter()
        .find(|c| namespace.is_some() && !namespaced(&c.gvk))
    {
        return Err(ValidationError::ClusterScopedChild {
            gvk: child.gvk.clone(),
            name: child.name.clone(),
        }
        .into());
    }

    // Check every child before writing any, so a conflict applies nothing.
    let owner = owner_reference(&info.parent, parent);
    let parent_uid = parent.uid().unwrap_or_default();
    let mut plan = Vec::with_capacity(wanted.len());
    for child in wanted {
        let cache = plugin
            .children
            .iter()
            .find(|c| c.gvk == child.gvk)
            .expect("validated kinds are declared");
        let child_ns = if cache.namespaced {
            namespace.clone()
        } else {
            None
        };
        let cached = cache.get(&ObjKey {
            namespace: child_ns.clone(),
            name: child.name.clone(),
        });
        if let Some(existing) = &cached
            && let Some(other) = existing
                .owner_references()
                .iter()
                .find(|o| o.controller == Some(true) && o.uid != parent_uid)
        {
            return Err(Failure::Conflict(format!(
                "{} {:?} already exists, controlled by {} {:?}",
                child.gvk, child.name, other.kind, other.name
            )));
        }
        let body = prepare_child(child.object, child_ns.as_deref(), &owner, info);
        plan.push((cache, child.gvk, child.name, child_ns, body, cached));
    }

    let mut keep = HashSet::new();
    for (cache, gvk, name, child_ns, body, cached) in &plan {
        keep.insert((gvk.clone(), name.clone()));
        if needs_apply(body, cached.as_deref()) {
            let t = Target {
                resource: &cache.resource,
                gvk,
                namespace: child_ns.as_deref(),
                name,
            };
            plugin.write_permit(&host.metrics).await;
            host.writer.apply(info, &t, body).await?;
        }
    }
    for child in &children {
        let Some(gvk) = Gvk::of_object(&crate::apply::object_json(child)) else {
            continue;
        };
        if keep.contains(&(gvk.clone(), child.name_any())) {
            continue;
        }
        let Some(cache) = plugin.children.iter().find(|c| c.gvk == gvk) else {
            continue;
        };
        let child_ns = child.namespace();
        let name = child.name_any();
        let t = Target {
            resource: &cache.resource,
            gvk: &gvk,
            namespace: child_ns.as_deref(),
            name: &name,
        };
        plugin.write_permit(&host.metrics).await;
        host.writer
            .delete(info, &t, &child.uid().unwrap_or_default())
            .await?;
    }
    if let Some(status) = status {
        let current = parent.data.get("status").cloned().unwrap_or(Value::Null);
        if !is_subset(&status, &current) {
            plugin.write_permit(&host.metrics).await;
            host.writer.apply_status(info, &target, &status).await?;
        }
    }
    for e in &desired.events {
        record(host, plugin, parent, e).await;
    }
    let version = format!("{}@{}", info.name, info.version);
    if parent.annotations().get(PLUGIN_VERSION_ANNOTATION) != Some(&version) {
        plugin.write_permit(&host.metrics).await;
        host.writer
            .set_version_annotation(info, &target, &version)
            .await?;
    }
    Ok(desired.requeue_after_ms.map(Duration::from_millis))
}

fn plugin_error(e: wit::ReconcileError) -> Failure {
    match e {
        wit::ReconcileError::InvalidSpec(m) => Failure::InvalidSpec(m),
        wit::ReconcileError::Transient(m) => Failure::Plugin(format!("transient: {m}")),
        wit::ReconcileError::BadInput(m) => Failure::Plugin(format!("bad input: {m}")),
    }
}

async fn record(host: &Host, plugin: &ActivePlugin, parent: &DynamicObject, e: &wit::Event) {
    let warning = matches!(e.event_type, wit::EventType::Warning);
    plugin.write_permit(&host.metrics).await;
    host.writer
        .event(
            &plugin.info().name,
            parent,
            &plugin.parent.resource,
            warning,
            &e.reason,
            &e.message,
        )
        .await;
}

//! The plan step: pure decisions, no I/O. From what the host observed and
//! what a plugin returned (already validated), decide the writes to make,
//! each with its reason (DESIGN §2, "apply"). The host's reconcile and
//! `kuwa plugin test` run this same code.
//!
//! * A child is applied when it is missing, when the plugin's desired object
//!   changed since the host last applied it (a hash annotation, which also
//!   catches fields the plugin stopped setting), or when someone else
//!   changed a field the plugin sets (drift: the desired object is no longer
//!   a subset of the cached one; quantities compare by value, so `1000m`
//!   equals `1`). Steady state costs zero writes.
//! * The host never adopts: a desired child that exists but is not
//!   controlled by this parent is a conflict, and nothing is written.
//! * Only children that this parent controls, of the granted kinds, in the
//!   parent's namespace, labelled for this plugin and last applied by its
//!   field manager are ever deleted.
//! * `Degraded` is the host's condition: the host sets it on failures and
//!   clears what it set; a plugin's own `Degraded` is replaced.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use kube::ResourceExt;
use kube::api::DynamicObject;
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use crate::cache::{CachedObject, PLUGIN_LABEL};
use crate::gvk::Gvk;
use crate::plugin::info::{FieldManager, PluginInfo};
use crate::tenant::grant::Grant;
use crate::validate::{EventOut, Output};

/// Annotation on each child: hash of the object the plugin last asked for.
pub const DESIRED_HASH_ANNOTATION: &str = "kuwa.dev/desired-hash";

/// The condition the host owns on every parent.
pub const DEGRADED: &str = "Degraded";

/// How long to wait before asking `finalize` again when it says "not yet"
/// without a time of its own.
pub const FINALIZE_POLL: Duration = Duration::from_secs(5);

/// Parses a Kubernetes quantity (`1`, `1000m`, `1.5Gi`, `2e3`) to its value.
fn quantity(text: &str) -> Option<f64> {
    const SUFFIXES: [(&str, f64); 15] = [
        ("Ki", 1024.0),
        ("Mi", 1_048_576.0),
        ("Gi", 1_073_741_824.0),
        ("Ti", 1_099_511_627_776.0),
        ("Pi", 1_125_899_906_842_624.0),
        ("Ei", 1_152_921_504_606_846_976.0),
        ("n", 1e-9),
        ("u", 1e-6),
        ("m", 1e-3),
        ("k", 1e3),
        ("M", 1e6),
        ("G", 1e9),
        ("T", 1e12),
        ("P", 1e15),
        ("E", 1e18),
    ];
    let (number, scale) = SUFFIXES
        .iter()
        .find_map(|(s, f)| text.strip_suffix(s).map(|n| (n, *f)))
        .unwrap_or((text, 1.0));
    let body = number.strip_prefix(['+', '-']).unwrap_or(number);
    let mantissa = body.split(['e', 'E']).next().unwrap_or_default();
    let well_formed = !mantissa.is_empty()
        && mantissa.chars().all(|c| c.is_ascii_digit() || c == '.')
        && mantissa.chars().filter(|c| *c == '.').count() <= 1
        && mantissa.chars().any(|c| c.is_ascii_digit());
    if !well_formed {
        return None;
    }
    number.parse::<f64>().ok().map(|v| v * scale)
}

/// Whether two strings are the same Kubernetes quantity written two ways.
fn same_quantity(a: &str, b: &str) -> bool {
    match (quantity(a), quantity(b)) {
        (Some(x), Some(y)) => x == y || (x - y).abs() <= 1e-12 * x.abs().max(y.abs()),
        _ => false,
    }
}

/// True when every field set in `desired` has the same value in `actual`.
/// Objects may have extra keys in `actual` (defaults, status, fields of other
/// managers); lists must have the same length with each element a subset;
/// numbers compare by value and strings that are quantities by value.
pub fn is_subset(desired: &Value, actual: &Value) -> bool {
    match (desired, actual) {
        (Value::Object(d), Value::Object(a)) => d.iter().all(|(k, dv)| match a.get(k) {
            Some(av) => is_subset(dv, av),
            None => dv.is_null(),
        }),
        (Value::Array(d), Value::Array(a)) => {
            d.len() == a.len() && d.iter().zip(a).all(|(dv, av)| is_subset(dv, av))
        }
        (Value::Number(d), Value::Number(a)) => d == a || d.as_f64() == a.as_f64(),
        (Value::String(d), Value::String(a)) => d == a || same_quantity(d, a),
        _ => desired == actual,
    }
}

fn canonical(value: &Value) -> Value {
    match value {
        Value::Object(map) => {
            let mut keys: Vec<_> = map.keys().collect();
            keys.sort();
            let mut out = Map::new();
            for k in keys {
                out.insert(k.clone(), canonical(&map[k]));
            }
            Value::Object(out)
        }
        Value::Array(items) => Value::Array(items.iter().map(canonical).collect()),
        other => other.clone(),
    }
}

/// A stable hash of a JSON value, independent of key order.
pub fn hash_value(value: &Value) -> String {
    let text = canonical(value).to_string();
    hex::encode(&Sha256::digest(text.as_bytes())[..12])
}

/// The owner reference the host sets on every child of `parent`.
pub fn owner_reference(parent_gvk: &Gvk, parent: &DynamicObject) -> Value {
    json!({
        "apiVersion": parent_gvk.api_version(),
        "kind": parent_gvk.kind,
        "name": parent.name_any(),
        "uid": parent.uid().unwrap_or_default(),
        "controller": true,
        "blockOwnerDeletion": true,
    })
}

/// Turns a validated child into the object the host applies: the parent's
/// namespace, the owner reference, the plugin label and the desired hash.
pub fn prepare_child(
    mut object: Value,
    namespace: Option<&str>,
    owner: &Value,
    plugin: &PluginInfo,
) -> Value {
    let meta = object
        .as_object_mut()
        .expect("validated children are objects")
        .entry("metadata")
        .or_insert_with(|| json!({}));
    if let Some(ns) = namespace {
        meta["namespace"] = json!(ns);
    }
    meta["ownerReferences"] = json!([owner]);
    if !meta["labels"].is_object() {
        meta["labels"] = json!({});
    }
    meta["labels"][PLUGIN_LABEL] = json!(&*plugin.name);
    let hash = hash_value(&object);
    let meta = &mut object["metadata"];
    if !meta["annotations"].is_object() {
        meta["annotations"] = json!({});
    }
    meta["annotations"][DESIRED_HASH_ANNOTATION] = json!(hash);
    object
}

/// The cached object as JSON, with its `apiVersion` and `kind`.
pub fn object_json(object: &DynamicObject) -> Value {
    serde_json::to_value(object).unwrap_or(Value::Null)
}

/// Why a child is applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApplyReason {
    /// It does not exist yet.
    Missing,
    /// The plugin asks for something else than last time.
    Changed,
    /// Someone else changed a field the plugin sets.
    Drift,
}

impl ApplyReason {
    /// A word for logs and `kuwa plugin test`.
    pub fn label(self) -> &'static str {
        match self {
            Self::Missing => "missing",
            Self::Changed => "changed",
            Self::Drift => "drift",
        }
    }
}

/// Whether `desired` (from [`prepare_child`]) must be applied over `cached`,
/// and why.
pub fn needs_apply(desired: &Value, cached: Option<&CachedObject>) -> Option<ApplyReason> {
    let Some(cached) = cached else {
        return Some(ApplyReason::Missing);
    };
    let want = desired["metadata"]["annotations"][DESIRED_HASH_ANNOTATION].as_str();
    let have = cached
        .annotations()
        .get(DESIRED_HASH_ANNOTATION)
        .map(String::as_str);
    if want != have {
        return Some(ApplyReason::Changed);
    }
    let mut cached = cached.value();
    // A relisted object may come without its type; compare what matters.
    let mut desired = desired.clone();
    for key in ["apiVersion", "kind"] {
        desired.as_object_mut().map(|o| o.remove(key));
        cached.as_object_mut().map(|o| o.remove(key));
    }
    (!is_subset(&desired, &cached)).then_some(ApplyReason::Drift)
}

/// Sets condition `type_` in a status's `conditions`, keeping its
/// `lastTransitionTime` when its status does not flip. Only the condition
/// is touched (it carries `observedGeneration` itself): the status's own
/// `observedGeneration` says what the plugin acted on, which is not the
/// host's to claim, and a schema may not even declare it.
pub fn upsert_condition(
    status: &mut Value,
    type_: &str,
    value: bool,
    reason: &str,
    message: &str,
    generation: Option<i64>,
    now: &str,
) {
    if !status.is_object() {
        *status = json!({});
    }
    if !status["conditions"].is_array() {
        status["conditions"] = json!([]);
    }
    let text = if value { "True" } else { "False" };
    let conditions = status["conditions"]
        .as_array_mut()
        .expect("just made an array");
    let previous = conditions.iter().position(|c| c["type"] == type_);
    let since = previous
        .and_then(|i| {
            (conditions[i]["status"] == text).then(|| conditions[i]["lastTransitionTime"].clone())
        })
        .filter(|t| t.is_string())
        .unwrap_or_else(|| json!(now));
    let mut condition = json!({
        "type": type_,
        "status": text,
        "reason": reason,
        "message": message,
        "lastTransitionTime": since,
    });
    if let Some(g) = generation {
        condition["observedGeneration"] = json!(g);
    }
    match previous {
        Some(i) => conditions[i] = condition,
        None => conditions.push(condition),
    }
}

fn condition<'a>(status: &'a Value, type_: &str) -> Option<&'a Value> {
    status["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
}

/// Whether a status carries a `conditions` list.
fn has_conditions(status: &Value) -> bool {
    status.get("conditions").is_some_and(Value::is_array)
}

/// Same JSON, up to the value-equality of numbers and quantities.
fn same(a: &Value, b: &Value) -> bool {
    is_subset(a, b) && is_subset(b, a)
}

/// What the host says in the parent's `Degraded` condition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    /// The reconcile went through, by this plugin version
    /// (`<plugin>@<version>`, said in the condition's message).
    Reconciled(String),
    /// It failed with this reason (`InvalidSpec`, `InvalidOutput`,
    /// `ChildConflict`, `CacheNotSynced`) and message.
    Degraded(&'static str, String),
}

/// The status to write on `parent`: the plugin's `desired` status (or the
/// current one when the plugin leaves it alone) with the host's `Degraded`
/// condition, whose message after a successful reconcile names the plugin
/// version that made it (`reconciled by webserver@0.2.0`): the version
/// rides in the status write the host makes anyway, not in a write of its
/// own. `None` when nothing needs writing: the status on the server already
/// says exactly this, or there is nothing to say (the plugin writes no
/// status and the host never marked the parent). A status without
/// `conditions` gets none added on success (its schema may not have them),
/// so the version is said only where conditions are.
pub fn status_write(
    parent: &DynamicObject,
    desired: Option<&Value>,
    health: &Health,
    now: &str,
) -> Option<Value> {
    let current = parent.data.get("status").cloned().unwrap_or(Value::Null);
    let current_degraded = condition(&current, DEGRADED).cloned();
    let mut status = desired.cloned().unwrap_or_else(|| current.clone());
    // The host's condition replaces whatever the plugin said about it,
    // keeping the time it last flipped.
    // (`get_mut`, not indexing: indexing would add `conditions: null` to a
    // status that has none, which the API server refuses.)
    if let Some(conditions) = status.get_mut("conditions").and_then(Value::as_array_mut) {
        conditions.retain(|c| c["type"] != DEGRADED);
        if let Some(c) = &current_degraded {
            conditions.push(c.clone());
        }
    } else if let Some(c) = &current_degraded
        && status.is_object()
    {
        status["conditions"] = json!([c]);
    }
    let generation = parent.metadata.generation;
    match health {
        Health::Degraded(reason, message) => {
            upsert_condition(
                &mut status,
                DEGRADED,
                true,
                reason,
                message,
                generation,
                now,
            );
        }
        // Only a status that has conditions gets the host's: a schema
        // without them would refuse the write.
        Health::Reconciled(_)
            if current_degraded.is_none() && !desired.is_some_and(has_conditions) =>
        {
            desired?;
        }
        Health::Reconciled(by) => {
            upsert_condition(
                &mut status,
                DEGRADED,
                false,
                "AsExpected",
                &format!("reconciled by {by}"),
                generation,
                now,
            );
        }
    }
    (!same(&status, &current)).then_some(status)
}

/// One write the host is to make, with why.
#[derive(Debug, Clone, PartialEq)]
pub enum Write {
    /// Add (`true`) or remove the host's finalizer on the parent.
    Finalizer(bool),
    /// Server-side apply a child.
    Apply {
        /// Its kind.
        gvk: Gvk,
        /// Its namespace (None for cluster-scoped kinds).
        namespace: Option<String>,
        /// Its name.
        name: String,
        /// The body to apply (from [`prepare_child`]).
        body: Value,
        /// Why.
        reason: ApplyReason,
    },
    /// Delete a child the plugin no longer wants.
    Delete {
        /// Its kind.
        gvk: Gvk,
        /// Its namespace.
        namespace: Option<String>,
        /// Its name.
        name: String,
        /// The uid observed (a precondition: a recreated namesake is safe).
        uid: String,
    },
    /// Apply the parent's status.
    Status(Value),
    /// Record an event on the parent.
    Event(EventOut),
}

impl Write {
    /// The verb it is counted under (`kuwa_api_writes_total`,
    /// `kuwa_api_errors_total`).
    pub fn verb(&self) -> &'static str {
        match self {
            Self::Finalizer(_) => "finalizer",
            Self::Apply { .. } => "apply",
            Self::Delete { .. } => "delete",
            Self::Status(_) => "status",
            Self::Event(_) => "event",
        }
    }

    /// A one-line description: verb, object and reason.
    pub fn describe(&self) -> String {
        match self {
            Self::Finalizer(true) => "add finalizer".into(),
            Self::Finalizer(false) => "remove finalizer".into(),
            Self::Apply {
                gvk, name, reason, ..
            } => format!("apply {gvk} {name} ({})", reason.label()),
            Self::Delete { gvk, name, .. } => format!("delete {gvk} {name} (no longer desired)"),
            Self::Status(_) => "apply status (changed)".into(),
            Self::Event(e) => format!("event {} {}", e.kind(), e.reason),
        }
    }
}

/// The writes of one reconcile, in order, and when to look again.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Plan {
    /// Writes, in the order to make them.
    pub writes: Vec<Write>,
    /// Reconcile again after this long.
    pub requeue_after: Option<Duration>,
}

/// Why the output cannot be planned. Nothing of it is written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    /// A desired child exists and this parent does not control it: the host
    /// never adopts.
    #[error(
        "{gvk} {name:?} already exists and is not controlled by this parent{owner}; the host never adopts objects"
    )]
    Conflict {
        /// The child's kind.
        gvk: Gvk,
        /// Its name.
        name: String,
        /// `, but by <kind> <name>` when another object controls it.
        owner: String,
    },
    /// A namespaced parent returned a child of a cluster-scoped kind.
    #[error("child {gvk} {name:?} is cluster-scoped; a namespaced parent cannot own it")]
    ClusterScopedChild {
        /// The child's kind.
        gvk: Gvk,
        /// Its name.
        name: String,
    },
}

/// Looks up the cached object of a kind, namespace and name.
pub type CacheLookup<'a> = dyn Fn(&Gvk, Option<&str>, &str) -> Option<Arc<CachedObject>> + 'a;

/// What the plan step looks at.
pub struct Observed<'a> {
    /// The plugin.
    pub info: &'a PluginInfo,
    /// Its grant.
    pub grant: &'a Grant,
    /// The parent.
    pub parent: &'a DynamicObject,
    /// The children the parent controls.
    pub children: &'a [Arc<CachedObject>],
    /// The cached object of a kind, namespace and name, if any.
    pub cached: &'a CacheLookup<'a>,
    /// Whether a kind is namespaced.
    pub namespaced: &'a dyn Fn(&Gvk) -> bool,
    /// The time, for condition timestamps.
    pub now: &'a str,
}

/// Whether `object` is controlled by the object with `uid`.
pub fn controlled_by<K: kube::Resource>(object: &K, uid: &str) -> bool {
    object
        .owner_references()
        .iter()
        .any(|o| o.controller == Some(true) && o.uid == uid)
}

/// Whether the host may delete `child` for `parent`: controlled by it, of a
/// granted child kind, in its namespace, labelled for this plugin and last
/// applied by this plugin's field manager.
pub fn may_delete(
    info: &PluginInfo,
    grant: &Grant,
    parent: &DynamicObject,
    gvk: &Gvk,
    child: &CachedObject,
) -> bool {
    let manager = info.field_manager(FieldManager::Children);
    let applied_by_us = child.metadata.managed_fields.as_ref().is_some_and(|m| {
        m.iter().any(|e| {
            e.manager.as_deref() == Some(manager.as_str())
                && e.operation.as_deref() == Some("Apply")
        })
    });
    controlled_by(child, &parent.uid().unwrap_or_default())
        && info.owns(gvk)
        && grant.allows_kind(gvk)
        && child.namespace() == parent.namespace()
        && child.labels().get(PLUGIN_LABEL).map(String::as_str) == Some(&*info.name)
        && applied_by_us
}

/// Whether the parent carries the host's finalizer.
pub fn has_finalizer<K: kube::Resource>(info: &PluginInfo, parent: &K) -> bool {
    parent.finalizers().contains(&info.finalizer_name())
}

/// The writes that bring the world in line with `output` for `seen`.
pub fn reconcile(seen: &Observed<'_>, output: Output) -> Result<Plan, PlanError> {
    let info = seen.info;
    let parent = seen.parent;
    let namespace = parent.namespace();
    let parent_uid = parent.uid().unwrap_or_default();
    let owner = owner_reference(&info.parent, parent);
    let mut writes = Vec::new();
    if info.finalizer && !has_finalizer(info, parent) {
        writes.push(Write::Finalizer(true));
    } else if !info.finalizer && has_finalizer(info, parent) {
        // This version no longer wants a finalizer: release the one an
        // earlier version put there, or the parent could never be deleted.
        writes.push(Write::Finalizer(false));
    }

    // Check every child before writing any, so a conflict applies nothing.
    let mut keep = HashSet::new();
    for child in output.children {
        let child_ns = if (seen.namespaced)(&child.gvk) {
            namespace.clone()
        } else if namespace.is_some() {
            return Err(PlanError::ClusterScopedChild {
                gvk: child.gvk,
                name: child.name,
            });
        } else {
            None
        };
        let cached = (seen.cached)(&child.gvk, child_ns.as_deref(), &child.name);
        if let Some(existing) = &cached
            && !controlled_by(&**existing, &parent_uid)
        {
            let owner = existing
                .owner_references()
                .iter()
                .find(|o| o.controller == Some(true))
                .map(|o| format!(", but by {} {:?}", o.kind, o.name))
                .unwrap_or_default();
            return Err(PlanError::Conflict {
                gvk: child.gvk,
                name: child.name,
                owner,
            });
        }
        keep.insert((child.gvk.clone(), child.name.clone()));
        let body = prepare_child(child.object, child_ns.as_deref(), &owner, info);
        if let Some(reason) = needs_apply(&body, cached.as_deref()) {
            writes.push(Write::Apply {
                gvk: child.gvk,
                namespace: child_ns,
                name: child.name,
                body,
                reason,
            });
        }
    }
    for child in seen.children {
        let Some(gvk) = Gvk::of_cached(child) else {
            continue;
        };
        if keep.contains(&(gvk.clone(), child.name_any()))
            || !may_delete(info, seen.grant, parent, &gvk, child)
        {
            continue;
        }
        writes.push(Write::Delete {
            gvk,
            namespace: child.namespace(),
            name: child.name_any(),
            uid: child.uid().unwrap_or_default(),
        });
    }
    let by = format!("{}@{}", info.name, info.version);
    if let Some(status) = status_write(
        parent,
        output.status.as_ref(),
        &Health::Reconciled(by),
        seen.now,
    ) {
        writes.push(Write::Status(status));
    }
    writes.extend(output.events.into_iter().map(Write::Event));
    Ok(Plan {
        writes,
        requeue_after: output.requeue_after,
    })
}

/// The writes that report a failed reconcile on the parent: `Degraded=True`
/// with `reason` (if not already said) and one Warning event per change of
/// the condition. Nothing else is written.
pub fn degraded(parent: &DynamicObject, reason: &'static str, message: &str, now: &str) -> Plan {
    let mut writes = Vec::new();
    if let Some(status) = status_write(
        parent,
        None,
        &Health::Degraded(reason, message.to_owned()),
        now,
    ) {
        writes.push(Write::Status(status));
        writes.push(Write::Event(EventOut::warning(reason, message)));
    }
    Plan {
        writes,
        requeue_after: None,
    }
}

#[cfg(test)]
mod tests;

//! Conversions between the WIT types and the SDK's typed API. Used by
//! [`crate::export_plugin!`] and by the native test harness, so fixture tests
//! exercise the same JSON path as the component.

use serde_json::Value;

use crate::wit::kuwa::controller::types as wit;
use crate::{
    Description, Desired, Error, EventType, Finalized, Observed, Reconciler, RelatedMapping, Scope,
};

fn gvk(g: &crate::Gvk) -> wit::Gvk {
    wit::Gvk {
        group: g.group.clone(),
        version: g.version.clone(),
        kind: g.kind.clone(),
    }
}

/// `describe`, converted to WIT.
pub fn describe<R: Reconciler>() -> wit::Description {
    description_to_wit(&R::describe())
}

fn description_to_wit(d: &Description) -> wit::Description {
    wit::Description {
        name: d.name.clone(),
        version: d.version.clone(),
        parent: gvk(&d.parent),
        parent_scope: match d.parent_scope {
            Scope::Namespaced => wit::Scope::Namespaced,
            Scope::Cluster => wit::Scope::Cluster,
        },
        children: d.children.iter().map(gvk).collect(),
        related: d
            .related
            .iter()
            .map(|(g, m)| wit::RelatedKind {
                gvk: gvk(g),
                mapping: match m {
                    RelatedMapping::OwnedByChild => wit::RelatedMapping::OwnedByChild,
                    RelatedMapping::LabelSelectorFromParent(p) => {
                        wit::RelatedMapping::LabelSelectorFromParent(p.clone())
                    }
                    RelatedMapping::AllInNamespace => wit::RelatedMapping::AllInNamespace,
                    RelatedMapping::AllInCluster => wit::RelatedMapping::AllInCluster,
                },
            })
            .collect(),
        finalizer: d.finalizer,
        resync_seconds: d
            .resync
            .map(|r| r.as_secs().clamp(1, u64::from(u32::MAX)) as u32),
        crd: d
            .crd
            .as_ref()
            .map(|c| serde_json::to_string(c).expect("a CRD always serializes")),
    }
}

fn error_to_wit(e: Error) -> wit::ReconcileError {
    match e {
        Error::InvalidSpec(m) => wit::ReconcileError::InvalidSpec(m),
        Error::Transient(m) => wit::ReconcileError::Transient(m),
        Error::BadInput(m) => wit::ReconcileError::BadInput(m),
    }
}

fn events_to_wit(events: &[crate::Event]) -> Vec<wit::Event> {
    events
        .iter()
        .map(|e| wit::Event {
            event_type: match e.event_type {
                EventType::Normal => wit::EventType::Normal,
                EventType::Warning => wit::EventType::Warning,
            },
            reason: e.reason.clone(),
            message: e.message.clone(),
        })
        .collect()
}

fn millis(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Parses the host's input into the typed parent and [`Observed`].
pub fn parse_input<R: Reconciler>(
    parent: &str,
    children: &[String],
    related: &[String],
    now: &str,
    trigger: &str,
) -> Result<(R::Parent, Observed), Error> {
    let parent_value: Value = serde_json::from_str(parent)
        .map_err(|e| Error::BadInput(format!("parent is not JSON: {e}")))?;
    // A parent that does not fit the plugin's type is a spec problem the
    // user must fix, not something a retry would cure.
    let parent: R::Parent = serde_json::from_value(parent_value).map_err(|e| {
        Error::InvalidSpec(format!(
            "the object does not match this plugin's schema: {e}"
        ))
    })?;
    let parse_all = |items: &[String], what: &str| -> Result<Vec<Value>, Error> {
        items
            .iter()
            .map(|s| {
                serde_json::from_str(s)
                    .map_err(|e| Error::BadInput(format!("{what} is not JSON: {e}")))
            })
            .collect()
    };
    let observed = Observed::new(
        parse_all(children, "a child")?,
        parse_all(related, "a related object")?,
        Observed::parse_now(now)?,
        trigger,
    );
    Ok((parent, observed))
}

/// Runs `R::reconcile` from raw JSON input (shared by the export and the
/// test harness).
pub fn run_reconcile<R: Reconciler>(
    parent: &str,
    children: &[String],
    related: &[String],
    now: &str,
    trigger: &str,
) -> Result<Desired<R::Status>, Error> {
    let (parent, observed) = parse_input::<R>(parent, children, related, now, trigger)?;
    let mut desired = R::reconcile(&parent, &observed)?;
    match desired.error.take() {
        Some(e) => Err(e),
        None => Ok(desired),
    }
}

/// Runs `R::finalize` from raw JSON input.
pub fn run_finalize<R: Reconciler>(
    parent: &str,
    children: &[String],
    related: &[String],
    now: &str,
    trigger: &str,
) -> Result<Finalized, Error> {
    let (parent, observed) = parse_input::<R>(parent, children, related, now, trigger)?;
    R::finalize(&parent, &observed)
}

/// `reconcile`, converted to and from WIT.
pub fn reconcile<R: Reconciler>(o: wit::Observed) -> Result<wit::Desired, wit::ReconcileError> {
    let desired = run_reconcile::<R>(
        &o.parent,
        &o.children,
        &o.related,
        &o.context.now,
        &o.context.trigger,
    )
    .map_err(error_to_wit)?;
    Ok(wit::Desired {
        children: desired.children.iter().map(Value::to_string).collect(),
        status: desired.status.as_ref().map(Value::to_string),
        requeue_after_ms: desired.requeue_after.map(millis),
        events: events_to_wit(&desired.events),
    })
}

/// `finalize`, converted to and from WIT.
pub fn finalize<R: Reconciler>(o: wit::Observed) -> Result<wit::Finalized, wit::ReconcileError> {
    let f = run_finalize::<R>(
        &o.parent,
        &o.children,
        &o.related,
        &o.context.now,
        &o.context.trigger,
    )
    .map_err(error_to_wit)?;
    Ok(wit::Finalized {
        done: f.done,
        requeue_after_ms: f.requeue_after.map(millis),
        events: events_to_wit(&f.events),
    })
}

use std::marker::PhantomData;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::Error;

/// Severity of an [`Event`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    /// Expected.
    Normal,
    /// Worth a look.
    Warning,
}

/// An event the host records on the parent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Severity.
    pub event_type: EventType,
    /// UpperCamelCase reason.
    pub reason: String,
    /// Human-readable message.
    pub message: String,
}

impl Event {
    /// A `Normal` event.
    pub fn normal(reason: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            event_type: EventType::Normal,
            reason: reason.into(),
            message: message.into(),
        }
    }

    /// A `Warning` event.
    pub fn warning(reason: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            event_type: EventType::Warning,
            reason: reason.into(),
            message: message.into(),
        }
    }
}

/// The outcome of a reconcile: every child that should exist, the parent's
/// status, events and an optional requeue. Children missing from it that the
/// parent owns are deleted by the host.
#[derive(Debug, Clone)]
pub struct Desired<S> {
    pub(crate) children: Vec<Value>,
    pub(crate) status: Option<Value>,
    pub(crate) requeue_after: Option<Duration>,
    pub(crate) events: Vec<Event>,
    pub(crate) error: Option<Error>,
    status_type: PhantomData<fn(S)>,
}

impl<S: Serialize> Default for Desired<S> {
    fn default() -> Self {
        Self::new()
    }
}

impl<S: Serialize> Desired<S> {
    /// Nothing desired yet.
    pub fn new() -> Self {
        Self {
            children: Vec::new(),
            status: None,
            requeue_after: None,
            events: Vec::new(),
            error: None,
            status_type: PhantomData,
        }
    }

    /// Adds a child. `k8s-openapi` types carry their `apiVersion` and `kind`;
    /// the host sets the namespace and owner reference.
    pub fn child<K: Serialize + k8s_openapi::Resource>(mut self, object: K) -> Self {
        match serde_json::to_value(&object) {
            Ok(value) => self.children.push(value),
            Err(e) => {
                self.error.get_or_insert(Error::BadInput(format!(
                    "cannot serialize {} child: {e}",
                    K::KIND
                )));
            }
        }
        self
    }

    /// Sets the parent's status.
    pub fn status(mut self, status: S) -> Self {
        match serde_json::to_value(&status) {
            Ok(value) => self.status = Some(value),
            Err(e) => {
                self.error
                    .get_or_insert(Error::BadInput(format!("cannot serialize status: {e}")));
            }
        }
        self
    }

    /// Reconcile again after `after` even when nothing changes. Anything
    /// that depends on time needs this: the host does not call the plugin
    /// again for a parent whose inputs did not change.
    pub fn requeue_after(mut self, after: Duration) -> Self {
        self.requeue_after = Some(after);
        self
    }

    /// Records an event on the parent.
    pub fn event(mut self, event: Event) -> Self {
        self.events.push(event);
        self
    }

    /// The desired children as JSON.
    pub fn children(&self) -> &[Value] {
        &self.children
    }

    /// The desired children as JSON, to change them after they were added
    /// (e.g. a plugin wrapping another one adds a label to each).
    pub fn children_mut(&mut self) -> &mut Vec<Value> {
        &mut self.children
    }

    /// The desired child of type `K` named `name`, if any (for tests).
    pub fn child_named<K>(&self, name: &str) -> Option<K>
    where
        K: DeserializeOwned + k8s_openapi::Resource,
    {
        self.children
            .iter()
            .find(|c| crate::observed::is_kind::<K>(c) && c["metadata"]["name"] == name)
            .and_then(|c| serde_json::from_value(c.clone()).ok())
    }

    /// The desired status as JSON.
    pub fn status_json(&self) -> Option<&Value> {
        self.status.as_ref()
    }

    /// The requested requeue.
    pub fn requeue(&self) -> Option<Duration> {
        self.requeue_after
    }

    /// The events to record.
    pub fn events(&self) -> &[Event] {
        &self.events
    }
}

/// The outcome of `finalize`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finalized {
    /// True when the host may remove its finalizer.
    pub done: bool,
    /// When not done, ask again after this long.
    pub requeue_after: Option<Duration>,
    /// Events to record on the parent.
    pub events: Vec<Event>,
}

impl Finalized {
    /// Cleanup is complete.
    pub fn done() -> Self {
        Self {
            done: true,
            requeue_after: None,
            events: Vec::new(),
        }
    }

    /// Cleanup is still running; ask again after `after`.
    pub fn not_yet(after: Duration) -> Self {
        Self {
            done: false,
            requeue_after: Some(after),
            events: Vec::new(),
        }
    }
}

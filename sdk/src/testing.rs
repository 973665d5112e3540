//! Native fixture harness: run a plugin's reconcile against YAML fixtures with
//! no host and no cluster, through the same JSON conversion as the component.

use std::cell::RefCell;
use std::rc::Rc;

use serde_json::Value;

use crate::outbound::{Request, Response};
use crate::{Desired, Error, Finalized, Reconciler, glue};

type SharedResponder = Rc<RefCell<dyn FnMut(&Request) -> Result<Response, crate::outbound::Error>>>;

/// The fixture's stand-in for outbound calls.
#[derive(Clone, Default)]
struct Outbound(Option<SharedResponder>);

impl std::fmt::Debug for Outbound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "responder"
        } else {
            "none"
        })
    }
}

/// The time fixtures run at unless told otherwise.
pub const FIXTURE_NOW: &str = "2026-01-01T00:00:00Z";

/// A parent with observed children and related objects, loaded from YAML.
#[derive(Debug, Clone)]
pub struct Fixture {
    parent: Value,
    children: Vec<Value>,
    related: Vec<Value>,
    now: String,
    outbound: Outbound,
}

fn from_yaml(yaml: &str) -> Value {
    serde_saphyr::from_str(yaml).unwrap_or_else(|e| panic!("fixture is not valid YAML: {e}"))
}

impl Fixture {
    /// A fixture whose parent is `yaml` (e.g. a sample from `deploy/samples/`).
    /// A missing namespace defaults to `default`, a missing generation to 1,
    /// a missing uid to a fixed one, as the API server would fill them.
    pub fn parent_yaml(yaml: &str) -> Self {
        let mut parent = from_yaml(yaml);
        let meta = &mut parent["metadata"];
        if meta.get("namespace").is_none() {
            meta["namespace"] = "default".into();
        }
        if meta.get("generation").is_none() {
            meta["generation"] = 1.into();
        }
        if meta.get("uid").is_none() {
            meta["uid"] = "00000000-0000-0000-0000-000000000001".into();
        }
        Self {
            parent,
            children: Vec::new(),
            related: Vec::new(),
            now: FIXTURE_NOW.to_owned(),
            outbound: Outbound::default(),
        }
    }

    /// Mutates the parent (e.g. to set a field a test varies).
    pub fn with_parent(mut self, edit: impl FnOnce(&mut Value)) -> Self {
        edit(&mut self.parent);
        self
    }

    /// Adds an observed child, as JSON.
    pub fn child(mut self, child: Value) -> Self {
        self.children.push(child);
        self
    }

    /// Adds an observed child from YAML.
    pub fn child_yaml(self, yaml: &str) -> Self {
        self.child(from_yaml(yaml))
    }

    /// Adds a related object, as JSON.
    pub fn related(mut self, object: Value) -> Self {
        self.related.push(object);
        self
    }

    /// Sets the call's `now`.
    pub fn at(mut self, now: &str) -> Self {
        self.now = now.to_owned();
        self
    }

    /// Answers the plugin's outbound calls (see [`crate::outbound`]) with
    /// `respond` during this fixture's reconcile and finalize. Without it
    /// every call fails with `NotAllowed`.
    pub fn outbound(
        mut self,
        respond: impl FnMut(&Request) -> Result<Response, crate::outbound::Error> + 'static,
    ) -> Self {
        self.outbound = Outbound(Some(Rc::new(RefCell::new(respond))));
        self
    }

    fn with_outbound<T>(&self, f: impl FnOnce() -> T) -> T {
        match &self.outbound.0 {
            Some(shared) => {
                let shared = shared.clone();
                crate::outbound::with_responder(
                    Box::new(move |r: &Request| (shared.borrow_mut())(r)),
                    f,
                )
            }
            None => f(),
        }
    }

    fn strings(values: &[Value]) -> Vec<String> {
        values.iter().map(Value::to_string).collect()
    }

    /// Runs `R::reconcile` on this fixture.
    pub fn reconcile<R: Reconciler>(&self) -> Result<Desired<R::Status>, Error> {
        self.with_outbound(|| {
            glue::run_reconcile::<R>(
                &self.parent.to_string(),
                &Self::strings(&self.children),
                &Self::strings(&self.related),
                &self.now,
                "fixture",
            )
        })
    }

    /// Runs `R::finalize` on this fixture.
    pub fn finalize<R: Reconciler>(&self) -> Result<Finalized, Error> {
        self.with_outbound(|| {
            glue::run_finalize::<R>(
                &self.parent.to_string(),
                &Self::strings(&self.children),
                &Self::strings(&self.related),
                &self.now,
                "fixture",
            )
        })
    }
}

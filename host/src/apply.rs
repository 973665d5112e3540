//! The apply stage: one [`PluginWriter`] per active plugin makes every API
//! write the host does for that plugin (DESIGN §2, §4).
//!
//! The writer is the only way to write, so the rules it enforces cannot be
//! forgotten at a call site: each write takes a token of the plugin's
//! budget, is counted in `kuwa_api_writes_total{plugin,verb,kind}`, goes out
//! under a field manager of the host's (`kuwa/<plugin>[/<part>]`, never one
//! the plugin picks), and is checked against the plugin's grant (its parent
//! kind, its child kinds, its namespaces, whether it may install a CRD).
//! What to write is decided by the pure [`crate::plan`] step; the writer
//! only carries it out.

use std::collections::HashMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, Patch, PatchParams, Preconditions,
    PropagationPolicy,
};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Client, Resource, ResourceExt};
use serde_json::{Value, json};

use crate::cache::{ObjKey, PLUGIN_LABEL};
use crate::gvk::Gvk;
use crate::leader::Leadership;
use crate::metrics::Metrics;
use crate::plan::{ApplyReason, Plan, Write, owner_reference};
use crate::plugin::info::{FieldManager, PluginInfo};
use crate::plugin::runtime::LoadedPlugin;
use crate::tenant::budget::WriteBudget;
use crate::validate::EventOut;

/// Why a write was not made.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The write is outside the plugin's grant. The plan step should never
    /// produce one; this is the last line of defence.
    #[error("refused by the plugin's grant: {0}")]
    Denied(String),
    /// The API server refused it or could not be reached. Retryable.
    #[error(transparent)]
    Api(#[from] kube::Error),
    /// This host does not lead (leader election): another replica writes.
    #[error("this host stands by (another replica holds the leader lease); nothing is written")]
    NotLeader,
}

impl WriteError {
    /// Whether the API server refused the write as not authorized (403):
    /// the plugin's identity lacks the RBAC, its error, not the host's.
    pub fn is_forbidden(&self) -> bool {
        matches!(self, Self::Api(kube::Error::Api(e)) if e.code == 403)
    }
}

/// The API client and event recorder every plugin writer shares.
pub struct ApiWriter {
    client: Client,
    metrics: Arc<Metrics>,
    recorder: Recorder,
    leadership: Arc<Leadership>,
    /// The host's own client configuration, from which clients that
    /// impersonate a plugin's ServiceAccount are made (None: no
    /// impersonation possible, e.g. in unit tests).
    base: Option<kube::Config>,
    impersonating: std::sync::Mutex<HashMap<String, Client>>,
}

impl ApiWriter {
    /// Refuses the write unless this host leads, then takes a cell of
    /// `plugin`'s `budget`, if it has one (waiting for one if need be), and
    /// counts the write: every write of the host goes through here. The
    /// leadership is checked again after a wait for the budget: a lease
    /// lost meanwhile stops the write.
    async fn permit(
        &self,
        budget: Option<&WriteBudget>,
        plugin: &str,
        verb: &'static str,
        kind: &str,
    ) -> Result<(), WriteError> {
        if !self.leadership.may_write() {
            return Err(WriteError::NotLeader);
        }
        if let Some(budget) = budget
            && budget.take().await
        {
            self.metrics.write_budget_wait(plugin);
            if !self.leadership.may_write() {
                return Err(WriteError::NotLeader);
            }
        }
        self.metrics.api_write(plugin, verb, kind);
        Ok(())
    }

    /// A writer reporting events as `kuwa`, writing only while
    /// `leadership` allows.
    pub fn new(client: Client, metrics: Arc<Metrics>, leadership: Arc<Leadership>) -> Self {
        let reporter = Reporter {
            controller: "kuwa".into(),
            instance: std::env::var("POD_NAME")
                .or_else(|_| std::env::var("HOSTNAME"))
                .ok(),
        };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            metrics,
            leadership,
            base: None,
            impersonating: std::sync::Mutex::default(),
        }
    }

    /// Lets the writer make clients that impersonate ServiceAccounts, from
    /// the host's own `config`.
    #[must_use]
    pub fn with_base_config(mut self, config: kube::Config) -> Self {
        self.base = Some(config);
        self
    }

    /// The client a plugin's writes use: the host's, or one carrying the
    /// impersonation headers of `identity` (`system:serviceaccount:NS:NAME`).
    pub fn client_for(&self, identity: Option<&str>) -> Result<Client, WriteError> {
        let Some(user) = identity else {
            return Ok(self.client.clone());
        };
        let mut clients = self.impersonating.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = clients.get(user) {
            return Ok(c.clone());
        }
        let mut config = self.base.clone().ok_or_else(|| {
            WriteError::Denied(format!(
                "the host cannot impersonate {user} (no client configuration)"
            ))
        })?;
        config.auth_info.impersonate = Some(user.to_owned());
        config.auth_info.impersonate_groups = None;
        let client = Client::try_from(config).map_err(WriteError::Api)?;
        clients.insert(user.to_owned(), client.clone());
        Ok(client)
    }
}

/// A kind the writer may touch and how to reach it.
#[derive(Debug, Clone)]
pub struct ChildResource {
    /// The API resource.
    pub resource: ApiResource,
    /// Whether it is namespaced.
    pub namespaced: bool,
}

/// Where a write goes.
struct Target<'a> {
    resource: &'a ApiResource,
    gvk: &'a Gvk,
    namespace: Option<&'a str>,
    name: &'a str,
}

impl Target<'_> {
    /// A server-side-apply body for the target: its identity plus the given
    /// `metadata` fields (name and namespace are filled in).
    fn apply_body(&self, mut metadata: Value) -> Value {
        metadata["name"] = json!(self.name);
        if let Some(ns) = self.namespace {
            metadata["namespace"] = json!(ns);
        }
        json!({"apiVersion": self.gvk.api_version(), "kind": self.gvk.kind, "metadata": metadata})
    }

    fn api(&self, client: &Client) -> Api<DynamicObject> {
        match self.namespace {
            Some(ns) => Api::namespaced_with(client.clone(), ns, self.resource),
            None => Api::all_with(client.clone(), self.resource),
        }
    }
}

/// Makes every API write of one plugin.
pub struct PluginWriter {
    api: Arc<ApiWriter>,
    /// The host's client, or one impersonating the plugin's identity.
    client: Client,
    plugin: Arc<LoadedPlugin>,
    budget: Option<Arc<WriteBudget>>,
    parent: ApiResource,
    children: HashMap<Gvk, ChildResource>,
    echoes: Echoes,
}

/// The resourceVersions the host's own writes gave each parent, so the
/// watch event each write causes (its echo) does not queue the parent again:
/// the reconcile that wrote it already knows the outcome.
///
/// A write's echo can arrive before the write's answer (and so before its
/// resourceVersion is known here): while a parent's reconcile runs, changes
/// of it that are not known echoes are held, and at the end of the
/// reconcile each held one is either recognised as an echo or queues the
/// parent again.
#[derive(Default)]
struct Echoes {
    written: std::sync::Mutex<HashMap<ObjKey, Vec<String>>>,
    held: std::sync::Mutex<HashMap<ObjKey, Vec<String>>>,
}

/// At most this many writes of one parent are remembered (a reconcile makes
/// at most two: the finalizer and the status).
const ECHOES_PER_PARENT: usize = 4;

impl Echoes {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ObjKey, Vec<String>>> {
        self.written.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn held(&self) -> std::sync::MutexGuard<'_, HashMap<ObjKey, Vec<String>>> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn take_rv(&self, key: &ObjKey, rv: &str) -> bool {
        let mut echoes = self.lock();
        let Some(seen) = echoes.get_mut(key) else {
            return false;
        };
        let Some(i) = seen.iter().position(|s| s == rv) else {
            return false;
        };
        // Versions before this one can no longer arrive.
        seen.drain(..=i);
        if seen.is_empty() {
            echoes.remove(key);
        }
        true
    }

    fn record(&self, object: &DynamicObject) {
        let Some(rv) = object.metadata.resource_version.clone() else {
            return;
        };
        let mut echoes = self.lock();
        let seen = echoes.entry(ObjKey::of(object)).or_default();
        if seen.len() >= ECHOES_PER_PARENT {
            seen.remove(0);
        }
        seen.push(rv);
    }

    fn take<K: Resource>(&self, object: &K) -> bool {
        let object = object.meta();
        let Some(rv) = object.resource_version.as_deref() else {
            return false;
        };
        let key = ObjKey {
            namespace: object.namespace.clone(),
            name: object.name.clone().unwrap_or_default(),
        };
        self.take_rv(&key, rv)
    }

    fn begin_hold(&self, key: ObjKey) {
        self.held().insert(key, Vec::new());
    }

    fn hold<K: Resource>(&self, parent: &K) -> bool {
        let mut held = self.held();
        match held.get_mut(&ObjKey::of(parent)) {
            Some(versions) => {
                if let Some(rv) = &parent.meta().resource_version {
                    versions.push(rv.clone());
                }
                true
            }
            None => false,
        }
    }

    fn end_hold(&self, key: &ObjKey) -> (usize, bool) {
        let held = self.held().remove(key).unwrap_or_default();
        let mut echoes = 0;
        let mut other = false;
        for rv in held {
            if self.take_rv(key, &rv) {
                echoes += 1;
            } else {
                other = true;
            }
        }
        (echoes, other)
    }

    fn forget<K: Resource>(&self, object: &K) {
        let key = ObjKey::of(object);
        self.lock().remove(&key);
        self.held().remove(&key);
    }
}

impl PluginWriter {
    /// The writer of `plugin` with `client` (the host's, or one
    /// impersonating the plugin: [`ApiWriter::client_for`]) within `budget`
    /// (the plugin's, which outlives one version), for its parent kind at
    /// `parent` and its child kinds at `children`.
    pub fn new(
        api: Arc<ApiWriter>,
        client: Client,
        plugin: Arc<LoadedPlugin>,
        budget: Option<Arc<WriteBudget>>,
        parent: ApiResource,
        children: HashMap<Gvk, ChildResource>,
    ) -> Self {
        Self {
            api,
            client,
            plugin,
            budget,
            parent,
            children,
            echoes: Echoes::default(),
        }
    }

    /// Whether this change of a parent is the echo of one of the host's own
    /// writes for this plugin (its resourceVersion is one a write returned):
    /// nothing changed that the reconcile which wrote it did not know, so
    /// the parent need not be queued again. Each echo is recognised once.
    pub fn is_own_echo<K: Resource>(&self, parent: &K) -> bool {
        self.echoes.take(parent)
    }

    /// Starts holding the changes of parent `key` that are not known echoes
    /// (its reconcile is starting). Call under the work queue's lock.
    pub fn begin_hold(&self, key: ObjKey) {
        self.echoes.begin_hold(key);
    }

    /// Holds this change of a parent whose reconcile is running; false when
    /// none is (the caller queues the parent). Call under the work queue's
    /// lock.
    pub fn hold<K: Resource>(&self, parent: &K) -> bool {
        self.echoes.hold(parent)
    }

    /// Ends the hold of `key` (its reconcile is over, every write answered):
    /// returns how many held changes were echoes of the host's writes and
    /// whether one was not (the parent must be reconciled again). Call under
    /// the work queue's lock.
    pub fn end_hold(&self, key: &ObjKey) -> (usize, bool) {
        self.echoes.end_hold(key)
    }

    /// Forgets the writes remembered for a parent that is gone.
    pub fn forget<K: Resource>(&self, parent: &K) {
        self.echoes.forget(parent);
    }

    fn info(&self) -> &PluginInfo {
        &self.plugin.info
    }

    async fn permit(&self, verb: &'static str, gvk: &Gvk) -> Result<(), WriteError> {
        self.api
            .permit(
                self.budget.as_deref(),
                &self.info().name,
                verb,
                &gvk.to_string(),
            )
            .await
    }

    fn params(&self, part: FieldManager) -> PatchParams {
        PatchParams::apply(&self.info().field_manager(part)).force()
    }

    /// Checks that a write to `parent` is this plugin's to make.
    fn check_parent(&self, parent: &DynamicObject) -> Result<(), WriteError> {
        let info = self.info();
        let kind = parent.types.as_ref().map(|t| t.kind.as_str());
        if kind.is_some_and(|k| k != info.parent.kind) {
            return Err(WriteError::Denied(format!(
                "{} is not the plugin's parent kind {}",
                kind.unwrap_or_default(),
                info.parent
            )));
        }
        if !self
            .plugin
            .grant
            .allows_namespace(parent.namespace().as_deref())
        {
            return Err(WriteError::Denied(format!(
                "namespace {:?} is not granted",
                parent.namespace()
            )));
        }
        Ok(())
    }

    fn parent_target<'a>(&'a self, parent: &'a DynamicObject) -> Target<'a> {
        Target {
            resource: &self.parent,
            gvk: &self.info().parent,
            namespace: parent.metadata.namespace.as_deref(),
            name: parent.metadata.name.as_deref().unwrap_or_default(),
        }
    }

    fn child(&self, gvk: &Gvk) -> Result<&ChildResource, WriteError> {
        if !self.info().owns(gvk) || !self.plugin.grant.allows_kind(gvk) {
            return Err(WriteError::Denied(format!(
                "{gvk} is not a granted child kind"
            )));
        }
        self.children
            .get(gvk)
            .ok_or_else(|| WriteError::Denied(format!("{gvk} is not watched as a child kind")))
    }

    /// Reads a child by name straight from the API server (not the cache):
    /// a child the caches do not hold (not labelled for any plugin) may
    /// still exist, and must not be adopted.
    pub async fn get_child(
        &self,
        gvk: &Gvk,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<Option<DynamicObject>, WriteError> {
        let r = self.child(gvk)?;
        let t = Target {
            resource: &r.resource,
            gvk,
            namespace,
            name,
        };
        match t.api(&self.client).get_opt(name).await {
            Ok(found) => {
                self.api.metrics.api_health.reached();
                Ok(found)
            }
            Err(e) => {
                self.api.metrics.api_error(&self.info().name, "get", &e);
                Err(e.into())
            }
        }
    }

    /// Carries out `plan` for `parent`: finalizer changes first, then every
    /// child apply and delete at once (they are independent of each other),
    /// then, if all of them went through, the status and the events. Returns
    /// the first error.
    pub async fn execute(&self, parent: &DynamicObject, plan: &Plan) -> Result<(), WriteError> {
        let (children, rest): (Vec<&Write>, Vec<&Write>) = plan
            .writes
            .iter()
            .partition(|w| matches!(w, Write::Apply { .. } | Write::Delete { .. }));
        let (first, last): (Vec<&Write>, Vec<&Write>) = rest
            .into_iter()
            .partition(|w| matches!(w, Write::Finalizer(_)));
        for write in first {
            self.write(parent, write).await?;
        }
        let results =
            futures::future::join_all(children.iter().map(|w| self.write(parent, w))).await;
        results.into_iter().collect::<Result<Vec<()>, _>>()?;
        for write in last {
            self.write(parent, write).await?;
        }
        Ok(())
    }

    /// Makes one write of a plan; its failure is counted in
    /// `kuwa_api_errors_total`, a drift repair in `kuwa_drift_repairs_total`.
    pub async fn write(&self, parent: &DynamicObject, write: &Write) -> Result<(), WriteError> {
        let result = self.write_once(parent, write).await;
        match (&result, write) {
            (Err(WriteError::Api(e)), _) => {
                self.api
                    .metrics
                    .api_error(&self.info().name, write.verb(), e);
            }
            (Ok(()), Write::Event(_)) => {}
            (Ok(()), _) => {
                self.api.metrics.api_health.reached();
                if let Write::Apply {
                    gvk,
                    reason: ApplyReason::Drift,
                    ..
                } = write
                {
                    self.api
                        .metrics
                        .drift_repaired(&self.info().name, &gvk.to_string());
                }
            }
            (Err(_), _) => {}
        }
        result
    }

    async fn write_once(&self, parent: &DynamicObject, write: &Write) -> Result<(), WriteError> {
        self.check_parent(parent)?;
        match write {
            Write::Finalizer(present) => self.set_finalizer(parent, *present).await,
            Write::Apply {
                gvk,
                namespace,
                name,
                body,
                ..
            } => {
                self.apply_child(parent, gvk, namespace.as_deref(), name, body)
                    .await
            }
            Write::Delete {
                gvk,
                namespace,
                name,
                uid,
            } => {
                self.delete_child(parent, gvk, namespace.as_deref(), name, uid)
                    .await
            }
            Write::Status(status) => self.apply_status(parent, status).await,
            Write::Event(e) => {
                self.event(parent, e).await;
                Ok(())
            }
        }
    }

    async fn apply_child(
        &self,
        parent: &DynamicObject,
        gvk: &Gvk,
        namespace: Option<&str>,
        name: &str,
        body: &Value,
    ) -> Result<(), WriteError> {
        let r = self.child(gvk)?;
        if namespace != parent.namespace().as_deref() && (r.namespaced || namespace.is_some()) {
            return Err(WriteError::Denied(format!(
                "{gvk} {name:?} is not in the parent's namespace"
            )));
        }
        let meta = &body["metadata"];
        if meta["labels"][PLUGIN_LABEL].as_str() != Some(&*self.info().name)
            || meta["ownerReferences"] != json!([owner_reference(&self.info().parent, parent)])
        {
            return Err(WriteError::Denied(format!(
                "{gvk} {name:?} lacks the host's label or owner reference"
            )));
        }
        self.permit("apply", gvk).await?;
        let t = Target {
            resource: &r.resource,
            gvk,
            namespace,
            name,
        };
        t.api(&self.client)
            .patch(
                name,
                &self.params(FieldManager::Children),
                &Patch::Apply(body),
            )
            .await?;
        Ok(())
    }

    /// Deletes a child the plugin no longer wants (only the exact object
    /// observed: a uid precondition protects a recreated namesake).
    async fn delete_child(
        &self,
        parent: &DynamicObject,
        gvk: &Gvk,
        namespace: Option<&str>,
        name: &str,
        uid: &str,
    ) -> Result<(), WriteError> {
        let r = self.child(gvk)?;
        if namespace != parent.namespace().as_deref() {
            return Err(WriteError::Denied(format!(
                "{gvk} {name:?} is not in the parent's namespace"
            )));
        }
        self.permit("delete", gvk).await?;
        let params = DeleteParams {
            preconditions: Some(Preconditions {
                uid: Some(uid.to_owned()),
                resource_version: None,
            }),
            propagation_policy: Some(PropagationPolicy::Background),
            ..DeleteParams::default()
        };
        let t = Target {
            resource: &r.resource,
            gvk,
            namespace,
            name,
        };
        match t.api(&self.client).delete(name, &params).await {
            Ok(_) => Ok(()),
            // Already gone, or replaced by a namesake we must not touch.
            Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    async fn apply_status(&self, parent: &DynamicObject, status: &Value) -> Result<(), WriteError> {
        let t = self.parent_target(parent);
        self.permit("status", t.gvk).await?;
        let mut body = t.apply_body(json!({}));
        body["status"] = status.clone();
        let written = t
            .api(&self.client)
            .patch_status(
                t.name,
                &self.params(FieldManager::Status),
                &Patch::Apply(&body),
            )
            .await?;
        self.echoes.record(&written);
        Ok(())
    }

    /// Adds or removes the host's finalizer on a parent. A field manager of
    /// its own means applying an empty list removes only the host's entry.
    pub async fn set_finalizer(
        &self,
        parent: &DynamicObject,
        present: bool,
    ) -> Result<(), WriteError> {
        self.check_parent(parent)?;
        self.write_finalizer(parent, present).await
    }

    /// Removes the host's finalizer from a parent wherever it is, even
    /// outside the plugin's granted namespaces (a grant narrowed after the
    /// finalizer was added): taking the host's own finalizer away only lets
    /// the parent go, it gives the plugin nothing.
    pub async fn release_finalizer(&self, parent: &DynamicObject) -> Result<(), WriteError> {
        self.write_finalizer(parent, false).await
    }

    async fn write_finalizer(
        &self,
        parent: &DynamicObject,
        present: bool,
    ) -> Result<(), WriteError> {
        let t = self.parent_target(parent);
        self.permit("finalizer", t.gvk).await?;
        let finalizers: Vec<String> = if present {
            vec![self.info().finalizer_name()]
        } else {
            Vec::new()
        };
        let body = t.apply_body(json!({"finalizers": finalizers}));
        match t
            .api(&self.client)
            .patch(
                t.name,
                &self.params(FieldManager::Finalizer),
                &Patch::Apply(&body),
            )
            .await
        {
            Ok(written) => {
                self.echoes.record(&written);
                Ok(())
            }
            Err(kube::Error::Api(e)) if e.code == 404 && !present => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Records an event on `parent`. Failures are logged, never fatal.
    pub async fn event(&self, parent: &DynamicObject, e: &EventOut) {
        let events = Gvk::new("events.k8s.io", "v1", "Event");
        if let Err(err) = self.permit("event", &events).await {
            tracing::debug!(plugin = %self.info().name, reason = %e.reason, error = %err, "event not recorded");
            return;
        }
        let reference: ObjectReference = parent.object_ref(&self.parent);
        let event = Event {
            type_: if e.warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: e.reason.clone(),
            note: Some(e.message.clone()),
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(err) = self.api.recorder.publish(&event, &reference).await {
            self.api.metrics.api_error(&self.info().name, "event", &err);
            tracing::warn!(plugin = %self.info().name, reason = %e.reason, error = %err, "could not record event");
        }
    }
}

/// Why a plugin's CRD was not installed.
#[derive(Debug, thiserror::Error)]
pub enum CrdError {
    /// The grant does not allow the plugin to install its CRD.
    #[error("the plugin's grant does not allow it to install its CRD (installCrd: true)")]
    NotGranted,
    /// The carried CRD does not parse as a CustomResourceDefinition.
    #[error("the carried CRD is malformed: {0}")]
    Malformed(serde_json::Error),
    /// The CRD is not exactly the plugin's parent kind.
    #[error("the carried CRD {found} does not define only the plugin's parent kind {parent}")]
    WrongKind {
        /// What the CRD defines.
        found: String,
        /// The plugin's parent kind.
        parent: Gvk,
    },
    /// The CRD asks for a conversion webhook: the API server would call out
    /// to an address the plugin chose.
    #[error("the carried CRD uses conversion strategy {0:?}; only None is allowed")]
    Conversion(String),
    /// The API server refused it.
    #[error("applying CRD {name}: {source}")]
    Apply {
        /// CRD name.
        name: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// This host stands by; the leader installs CRDs.
    #[error("this host stands by; the leading replica installs CRDs")]
    NotLeader,
    /// It did not become Established in time.
    #[error("CRD {0} was not Established within {1:?}")]
    NotEstablished(String, std::time::Duration),
}

/// Checks that `crd` is one the plugin may install: exactly its parent kind
/// (group, kind, a served version, named `<plural>.<group>`), no conversion
/// webhook.
pub fn check_crd(info: &PluginInfo, crd: &Value) -> Result<CustomResourceDefinition, CrdError> {
    let parsed: CustomResourceDefinition =
        serde_json::from_value(crd.clone()).map_err(CrdError::Malformed)?;
    let spec = &parsed.spec;
    let name = parsed.metadata.name.clone().unwrap_or_default();
    let found = format!("{name} ({}/{})", spec.group, spec.names.kind);
    if spec.group != info.parent.group
        || spec.names.kind != info.parent.kind
        || name != format!("{}.{}", spec.names.plural, spec.group)
        || !spec.versions.iter().any(|v| v.name == info.parent.version)
    {
        return Err(CrdError::WrongKind {
            found,
            parent: info.parent.clone(),
        });
    }
    if let Some(conversion) = &spec.conversion
        && conversion.strategy != "None"
    {
        return Err(CrdError::Conversion(conversion.strategy.clone()));
    }
    Ok(parsed)
}

/// How long installing a CRD waits for it to be Established.
pub const CRD_ESTABLISH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

impl ApiWriter {
    /// Installs the CRD `plugin` carries, if its grant allows it (field
    /// manager `kuwa/<plugin>/crd`, counted and budgeted like every write),
    /// and waits until it is Established. Returns the CRD's name.
    pub async fn install_crd(
        &self,
        plugin: &LoadedPlugin,
        budget: Option<&WriteBudget>,
    ) -> Result<Option<String>, CrdError> {
        let info = &plugin.info;
        let Some(crd) = &info.crd else {
            return Ok(None);
        };
        if !plugin.grant.install_crd {
            return Err(CrdError::NotGranted);
        }
        let parsed = check_crd(info, crd)?;
        let name = parsed.metadata.name.clone().unwrap_or_default();
        let api: Api<CustomResourceDefinition> = Api::all(self.client.clone());
        self.permit(
            budget,
            &info.name,
            "crd",
            "apiextensions.k8s.io/v1/CustomResourceDefinition",
        )
        .await
        .map_err(|_| CrdError::NotLeader)?;
        api.patch(
            &name,
            &PatchParams::apply(&info.field_manager(FieldManager::Crd)).force(),
            &Patch::Apply(&parsed),
        )
        .await
        .map_err(|source| CrdError::Apply {
            name: name.clone(),
            source,
        })?;
        let deadline = tokio::time::Instant::now() + CRD_ESTABLISH_TIMEOUT;
        loop {
            if let Ok(current) = api.get(&name).await {
                let established = current.status.and_then(|s| s.conditions).is_some_and(|cs| {
                    cs.iter()
                        .any(|c| c.type_ == "Established" && c.status == "True")
                });
                if established {
                    return Ok(Some(name));
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(CrdError::NotEstablished(name, CRD_ESTABLISH_TIMEOUT));
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> PluginInfo {
        let mut i = PluginInfo::placeholder();
        i.name = Arc::from("web");
        i.parent = Gvk::new("kuwa.dev", "v1alpha1", "WebServer");
        i
    }

    fn crd() -> Value {
        json!({
            "apiVersion": "apiextensions.k8s.io/v1",
            "kind": "CustomResourceDefinition",
            "metadata": {"name": "webservers.kuwa.dev"},
            "spec": {
                "group": "kuwa.dev",
                "names": {"kind": "WebServer", "plural": "webservers"},
                "scope": "Namespaced",
                "versions": [{"name": "v1alpha1", "served": true, "storage": true}],
            }
        })
    }

    fn parent_at(rv: &str) -> DynamicObject {
        serde_json::from_value(json!({
            "apiVersion": "kuwa.dev/v1alpha1", "kind": "WebServer",
            "metadata": {"name": "a", "namespace": "ns", "resourceVersion": rv},
        }))
        .unwrap()
    }

    /// An echo that arrives before its write's answer (while the reconcile
    /// runs) is recognised when the reconcile ends; a change nobody wrote
    /// queues the parent again.
    #[test]
    fn an_early_echo_is_held_and_recognised() {
        let echoes = Echoes::default();
        let key = ObjKey::of(&parent_at("1"));
        // No reconcile running: nothing is held, the caller queues.
        assert!(!echoes.hold(&parent_at("5")));
        echoes.begin_hold(key.clone());
        // The watch event of the status write, before its answer...
        assert!(!echoes.take(&parent_at("5")));
        assert!(echoes.hold(&parent_at("5")));
        // ...which then comes.
        echoes.record(&parent_at("5"));
        assert_eq!(echoes.end_hold(&key), (1, false), "an echo: nothing to do");
        // A change the host did not make, held the same way, is not one.
        echoes.begin_hold(key.clone());
        assert!(echoes.hold(&parent_at("7")));
        echoes.record(&parent_at("8"));
        assert_eq!(echoes.end_hold(&key), (0, true), "someone else's change");
        // After the hold, changes are routed as usual again.
        assert!(!echoes.hold(&parent_at("9")));
        assert!(echoes.take(&parent_at("8")), "a late echo is still known");
    }

    #[test]
    fn a_crd_must_define_exactly_the_parent_kind_without_webhooks() {
        assert!(check_crd(&info(), &crd()).is_ok());
        let mut other = crd();
        other["spec"]["names"]["kind"] = json!("Pod");
        assert!(matches!(
            check_crd(&info(), &other),
            Err(CrdError::WrongKind { .. })
        ));
        let mut renamed = crd();
        renamed["metadata"]["name"] = json!("pods.kuwa.dev");
        assert!(matches!(
            check_crd(&info(), &renamed),
            Err(CrdError::WrongKind { .. })
        ));
        let mut webhook = crd();
        webhook["spec"]["conversion"] = json!({
            "strategy": "Webhook",
            "webhook": {"clientConfig": {"url": "https://evil.example/convert"}, "conversionReviewVersions": ["v1"]},
        });
        let err = check_crd(&info(), &webhook).unwrap_err();
        assert!(
            matches!(err, CrdError::Conversion(ref s) if s == "Webhook"),
            "{err}"
        );
        let mut none = crd();
        none["spec"]["conversion"] = json!({"strategy": "None"});
        assert!(check_crd(&info(), &none).is_ok());
    }
}

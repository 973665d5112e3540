//! Serving `ClusterPlugin` and `Plugin` objects (`kuwa run
//! --plugin-resources`): each object's source is fetched
//! ([`crate::plugin::oci`]), loaded with the grant the object gives, and
//! activated like a plugin file. Changing `spec.source` is a hot swap with
//! the file swap's guarantees (no relist; a refused version leaves the old
//! one serving); deleting the object unloads the plugin. The host reports
//! on the object: `Ready`, `Degraded`, `observedGeneration`, the version and
//! digest serving, the parents served, the last error, and a Warning Event
//! for each refused source.
//!
//! A `Plugin` (namespaced) is a team's: its grant is its own namespace
//! only, it cannot install CRDs, and its writes impersonate a ServiceAccount
//! of that namespace.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use serde_json::json;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::host::Host;
use crate::plugin::oci::{Source, SourceError, Store};
use crate::plugin::resource::{ClusterPlugin, LastError, Plugin, PluginStatus};
use crate::plugin::runtime::{LoadedPlugin, Runtime};
use crate::tenant::grant::{Manifest, from_manifest};
use crate::tenant::limits::Limits;

/// The field manager of the host's status writes on plugin objects.
pub const FIELD_MANAGER: &str = "kuwa/plugin-objects";

/// How often the parents count in a status is refreshed.
const STATUS_REFRESH: Duration = Duration::from_secs(10);

/// Which object: `ClusterPlugin/<name>` or `Plugin/<ns>/<name>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ObjectKey {
    /// Its namespace (None for a ClusterPlugin).
    pub namespace: Option<String>,
    /// Its name.
    pub name: String,
}

impl std::fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.namespace {
            Some(ns) => write!(f, "Plugin {ns}/{}", self.name),
            None => write!(f, "ClusterPlugin {}", self.name),
        }
    }
}

/// What an object asks for, reduced to what loading depends on.
#[derive(Debug, Clone, PartialEq)]
struct Wanted {
    source: String,
    grant: Manifest,
    identity: Option<String>,
    generation: Option<i64>,
    reference: k8s_openapi::api::core::v1::ObjectReference,
}

fn wanted_cluster(p: &ClusterPlugin) -> Wanted {
    Wanted {
        source: p.spec.source.clone(),
        grant: p.spec.grant.clone().unwrap_or_default(),
        identity: p
            .spec
            .service_account
            .as_ref()
            .map(|sa| format!("system:serviceaccount:{}:{}", sa.namespace, sa.name)),
        generation: p.metadata.generation,
        reference: reference(p.object_ref(&())),
    }
}

/// The object's reference for events, without its resourceVersion: a
/// status write changes that, and must not look like a new spec.
fn reference(
    mut r: k8s_openapi::api::core::v1::ObjectReference,
) -> k8s_openapi::api::core::v1::ObjectReference {
    r.resource_version = None;
    r
}

fn wanted_namespaced(p: &Plugin) -> Wanted {
    let ns = p.namespace().unwrap_or_default();
    let spec = &p.spec;
    Wanted {
        source: spec.source.clone(),
        grant: Manifest {
            namespaces: Some(vec![ns.clone()]),
            parent_kind: spec.parent_kind.clone(),
            child_kinds: spec.child_kinds.clone(),
            related_kinds: spec.related_kinds.clone(),
            install_crd: Some(false),
            limits: spec.limits.clone(),
            ..Manifest::default()
        },
        identity: Some(format!(
            "system:serviceaccount:{ns}:{}",
            spec.service_account_name.as_deref().unwrap_or("default")
        )),
        generation: p.metadata.generation,
        reference: reference(p.object_ref(&())),
    }
}

/// Serves the plugin objects of the cluster.
pub struct PluginObjects {
    host: Arc<Host>,
    runtime: Runtime,
    store: Store,
    defaults: Limits,
    install_crds: bool,
    client: Client,
    recorder: Recorder,
    /// Plugin name → the object serving it.
    names: Arc<Mutex<HashMap<Arc<str>, ObjectKey>>>,
}

impl PluginObjects {
    /// Plugin objects served by `host`, fetched into `store`.
    pub fn new(
        host: Arc<Host>,
        client: Client,
        runtime: Runtime,
        store: Store,
        defaults: Limits,
        install_crds: bool,
    ) -> Arc<Self> {
        let reporter = Reporter {
            controller: "kuwa".into(),
            instance: std::env::var("POD_NAME").ok(),
        };
        Arc::new(Self {
            host,
            runtime,
            store,
            defaults,
            install_crds,
            recorder: Recorder::new(client.clone(), reporter),
            client,
            names: Arc::default(),
        })
    }

    /// Watches both kinds and serves every object (in `namespace`, for
    /// `Plugin`s, and matching the label `selector` if given), until
    /// aborted.
    pub fn spawn(
        self: &Arc<Self>,
        namespace: Option<&str>,
        selector: Option<&str>,
    ) -> JoinHandle<()> {
        let cluster: Api<ClusterPlugin> = Api::all(self.client.clone());
        let namespaced: Api<Plugin> = match namespace {
            Some(ns) => Api::namespaced(self.client.clone(), ns),
            None => Api::all(self.client.clone()),
        };
        let this = self.clone();
        let config = match selector {
            Some(s) => watcher::Config::default().labels(s),
            None => watcher::Config::default(),
        };
        tokio::spawn(async move {
            let a = this.clone().follow(cluster, config.clone(), wanted_cluster);
            let b = this.follow(namespaced, config, wanted_namespaced);
            futures::join!(a, b);
        })
    }

    async fn follow<K>(
        self: Arc<Self>,
        api: Api<K>,
        config: watcher::Config,
        wanted: fn(&K) -> Wanted,
    ) where
        K: Resource<DynamicType = ()>
            + Clone
            + std::fmt::Debug
            + serde::de::DeserializeOwned
            + Send
            + Sync
            + 'static,
    {
        let mut served: HashMap<ObjectKey, watch::Sender<Option<Wanted>>> = HashMap::new();
        let mut seen_in_list: Vec<ObjectKey> = Vec::new();
        let mut events = watcher(api, config).default_backoff().boxed();
        while let Some(event) = events.next().await {
            let event = match event {
                Ok(e) => e,
                Err(e) => {
                    tracing::warn!(error = %e, "watching plugin objects (is the CRD installed? deploy/crds/)");
                    continue;
                }
            };
            let key_of = |o: &K| ObjectKey {
                namespace: o.meta().namespace.clone(),
                name: o.meta().name.clone().unwrap_or_default(),
            };
            match event {
                watcher::Event::Init => seen_in_list.clear(),
                watcher::Event::InitApply(o) | watcher::Event::Apply(o) => {
                    let key = key_of(&o);
                    seen_in_list.push(key.clone());
                    let w = wanted(&o);
                    match served.get(&key) {
                        Some(tx) => {
                            tx.send_if_modified(|cur| {
                                let changed = cur.as_ref() != Some(&w);
                                *cur = Some(w);
                                changed
                            });
                        }
                        None => {
                            let (tx, rx) = watch::channel(Some(w));
                            tokio::spawn(self.clone().serve(key.clone(), rx));
                            served.insert(key, tx);
                        }
                    }
                }
                watcher::Event::Delete(o) => {
                    if let Some(tx) = served.remove(&key_of(&o)) {
                        let _ = tx.send(None);
                    }
                }
                watcher::Event::InitDone => {
                    // Objects gone while the watch was down.
                    served.retain(|k, tx| {
                        let keep = seen_in_list.contains(k);
                        if !keep {
                            let _ = tx.send(None);
                        }
                        keep
                    });
                }
            }
        }
    }

    /// Serves one object until it is deleted.
    async fn serve(self: Arc<Self>, key: ObjectKey, mut wanted: watch::Receiver<Option<Wanted>>) {
        let mut serving: Option<(Arc<LoadedPlugin>, String)> = None;
        let mut status: PluginStatus;
        let mut written: bool;
        'wanted: loop {
            let Some(w) = wanted.borrow_and_update().clone() else {
                break;
            };
            let mut delay = Duration::from_secs(1);
            loop {
                match self.load(&key, &w, serving.as_ref().map(|(p, _)| p)).await {
                    Ok((plugin, digest)) => {
                        let name = plugin.info.name.clone();
                        if let Some((old, _)) = &serving
                            && old.info.name != name
                        {
                            self.unserve(&key, &old.info.name).await;
                        }
                        tracing::info!(object = %key, plugin = %name, version = %plugin.info.version, %digest, "plugin object serving");
                        serving = Some((plugin, digest));
                        status = self.status_ok(&w, serving.as_ref());
                        written = self.write_status(&key, &w, &status).await;
                        break;
                    }
                    Err(Refusal::Retry(why)) => {
                        tracing::warn!(object = %key, error = %why, retry_in = ?delay, "plugin object not served yet");
                        status = self.status_err(&w, serving.as_ref(), "NotServed", &why);
                        self.write_status(&key, &w, &status).await;
                    }
                    Err(Refusal::Final(reason, why)) => {
                        tracing::warn!(object = %key, reason, error = %why, "plugin object source refused; the version serving (if any) keeps serving");
                        status = self.status_err(&w, serving.as_ref(), reason, &why);
                        self.write_status(&key, &w, &status).await;
                        self.event(&w, reason, &why).await;
                        // Wait for a new spec.
                        if wanted.changed().await.is_err() {
                            break 'wanted;
                        }
                        continue 'wanted;
                    }
                }
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    changed = wanted.changed() => match changed {
                        Ok(()) => continue 'wanted,
                        Err(_) => break 'wanted,
                    },
                }
                delay = (delay * 2).min(Duration::from_secs(30));
            }
            // Serving: refresh the parents count until the spec changes, and
            // write a status a standby could not (it may lead by now).
            loop {
                tokio::select! {
                    () = tokio::time::sleep(STATUS_REFRESH) => {
                        let parents = self.parents(serving.as_ref());
                        if parents != status.parents || !written {
                            status.parents = parents;
                            written = self.write_status(&key, &w, &status).await;
                        }
                    }
                    changed = wanted.changed() => match changed {
                        Ok(()) => continue 'wanted,
                        Err(_) => break 'wanted,
                    },
                }
            }
        }
        if let Some((plugin, _)) = serving {
            self.unserve(&key, &plugin.info.name).await;
        }
        tracing::info!(object = %key, "plugin object gone: plugin unloaded");
    }

    async fn unserve(&self, key: &ObjectKey, name: &str) {
        let owned = {
            let mut names = self.names.lock().unwrap_or_else(|e| e.into_inner());
            let owned = names.get(name) == Some(key);
            if owned {
                names.remove(name);
            }
            owned
        };
        if owned {
            self.host.deactivate(name).await;
        }
    }

    /// Fetches, loads, checks and activates what `w` names.
    async fn load(
        &self,
        key: &ObjectKey,
        w: &Wanted,
        serving: Option<&Arc<LoadedPlugin>>,
    ) -> Result<(Arc<LoadedPlugin>, String), Refusal> {
        let source = Source::parse(&w.source).map_err(Refusal::source)?;
        let fetched = self.store.fetch(&source).await.map_err(Refusal::source)?;
        if fetched.pulled {
            self.host.metrics.oci_pull(&key.to_string());
        }
        let label = std::path::PathBuf::from(key.to_string());
        let (grant, limits) = from_manifest(&label, w.grant.clone(), self.defaults)
            .map_err(|e| Refusal::Final("InvalidGrant", e.to_string()))?;
        let mut plugin = self
            .runtime
            .load(fetched.bytes, limits)
            .await
            .map_err(|e| Refusal::Final("NotAComponent", e.to_string()))?;
        let related: Vec<_> = plugin.info.related.iter().map(|(g, _)| g.clone()).collect();
        grant
            .check(&plugin.info.parent, plugin.info.crd.is_some(), &related)
            .map_err(|e| Refusal::Final("InvalidGrant", e.to_string()))?;
        plugin.grant = grant;
        plugin.identity = w.identity.clone();
        let name = plugin.info.name.clone();
        self.host.metrics.plugin_load_time(
            &name,
            plugin.cache.label(),
            plugin.load_time.as_secs_f64(),
        );
        {
            let mut names = self.names.lock().unwrap_or_else(|e| e.into_inner());
            match names.get(&name) {
                Some(other) if other != key => {
                    return Err(Refusal::Final(
                        "NameTaken",
                        format!("plugin {name} is already served by {other}"),
                    ));
                }
                Some(_) => {}
                None => {
                    if self.host.plugin(&name).is_some() {
                        return Err(Refusal::Final(
                            "NameTaken",
                            format!("plugin {name} is already served from the plugins directory"),
                        ));
                    }
                    names.insert(name.clone(), key.clone());
                }
            }
        }
        let plugin = Arc::new(plugin);
        if self.install_crds
            && key.namespace.is_none()
            && plugin.info.crd.is_some()
            && plugin.grant.install_crd
            && self.host.leadership().may_write()
            && let Err(e) = self.host.install_crd(&plugin).await
        {
            tracing::warn!(object = %key, error = %e, "CRD not installed");
        }
        match self.host.activate(plugin.clone()).await {
            Ok(()) => Ok((plugin, fetched.digest)),
            Err(e) => {
                if serving.is_none() {
                    self.names
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&name);
                }
                match e {
                    crate::host::ActivateError::Cache(e) => Err(Refusal::Retry(e.to_string())),
                    other => Err(Refusal::Final("Refused", other.to_string())),
                }
            }
        }
    }

    fn parents(&self, serving: Option<&(Arc<LoadedPlugin>, String)>) -> Option<i64> {
        let (plugin, _) = serving?;
        let active = self.host.plugin(&plugin.info.name)?;
        let grant = &active.loaded.grant;
        let served = active
            .parents_in(None)
            .iter()
            .filter(|k| grant.allows_namespace(k.namespace.as_deref()))
            .count();
        Some(i64::try_from(served).unwrap_or(i64::MAX))
    }

    fn status_ok(&self, w: &Wanted, serving: Option<&(Arc<LoadedPlugin>, String)>) -> PluginStatus {
        let (plugin, digest) = serving.expect("serving");
        PluginStatus {
            conditions: vec![
                condition(
                    "Ready",
                    true,
                    "Serving",
                    &format!(
                        "{}@{} serves {}",
                        plugin.info.name, plugin.info.version, w.source
                    ),
                    w.generation,
                ),
                condition(
                    "Degraded",
                    false,
                    "AsExpected",
                    "the source is served",
                    w.generation,
                ),
            ],
            observed_generation: w.generation,
            version: Some(format!("{}@{}", plugin.info.name, plugin.info.version)),
            digest: Some(digest.clone()),
            parents: self.parents(serving),
            last_error: None,
        }
    }

    fn status_err(
        &self,
        w: &Wanted,
        serving: Option<&(Arc<LoadedPlugin>, String)>,
        reason: &str,
        message: &str,
    ) -> PluginStatus {
        let ready = match serving {
            Some((p, _)) => condition(
                "Ready",
                true,
                "Serving",
                &format!(
                    "{}@{} keeps serving; the new source was refused",
                    p.info.name, p.info.version
                ),
                w.generation,
            ),
            None => condition("Ready", false, reason, message, w.generation),
        };
        PluginStatus {
            conditions: vec![
                ready,
                condition("Degraded", true, reason, message, w.generation),
            ],
            observed_generation: w.generation,
            version: serving.map(|(p, _)| format!("{}@{}", p.info.name, p.info.version)),
            digest: serving.map(|(_, d)| d.clone()),
            parents: self.parents(serving),
            last_error: Some(LastError {
                reason: reason.to_owned(),
                message: message.to_owned(),
            }),
        }
    }

    /// Writes `status` if this host leads; whether it was written.
    async fn write_status(&self, key: &ObjectKey, w: &Wanted, status: &PluginStatus) -> bool {
        if !self.host.leadership().may_write() {
            return false;
        }
        let mut status = status.clone();
        // Keep a condition's transition time while its status holds.
        let current = self.current_conditions(key).await;
        for c in &mut status.conditions {
            if let Some(old) = current
                .iter()
                .find(|o| o.type_ == c.type_ && o.status == c.status)
            {
                c.last_transition_time = old.last_transition_time.clone();
            }
        }
        let body = json!({
            "apiVersion": "kuwa.dev/v1alpha1",
            "kind": w.reference.kind,
            "metadata": {"name": key.name},
            "status": status,
        });
        let params = PatchParams::apply(FIELD_MANAGER).force();
        let result = match &key.namespace {
            Some(ns) => Api::<Plugin>::namespaced(self.client.clone(), ns)
                .patch_status(&key.name, &params, &Patch::Apply(&body))
                .await
                .map(|_| ()),
            None => Api::<ClusterPlugin>::all(self.client.clone())
                .patch_status(&key.name, &params, &Patch::Apply(&body))
                .await
                .map(|_| ()),
        };
        match result {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(object = %key, error = %e, "could not write the plugin object's status");
                false
            }
        }
    }

    async fn current_conditions(&self, key: &ObjectKey) -> Vec<Condition> {
        let status = match &key.namespace {
            Some(ns) => Api::<Plugin>::namespaced(self.client.clone(), ns)
                .get_opt(&key.name)
                .await
                .ok()
                .flatten()
                .and_then(|p| p.status),
            None => Api::<ClusterPlugin>::all(self.client.clone())
                .get_opt(&key.name)
                .await
                .ok()
                .flatten()
                .and_then(|p| p.status),
        };
        status.map(|s| s.conditions).unwrap_or_default()
    }

    async fn event(&self, w: &Wanted, reason: &str, message: &str) {
        if !self.host.leadership().may_write() {
            return;
        }
        let mut note = message.to_owned();
        crate::plugin::runtime::truncate(&mut note, 1024);
        let event = Event {
            type_: EventType::Warning,
            reason: reason.to_owned(),
            note: Some(note),
            action: "Load".into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&event, &w.reference).await {
            tracing::warn!(error = %e, "could not record the plugin object's event");
        }
    }
}

/// Why an object's source is not served.
enum Refusal {
    /// Worth retrying as is (a kind not served yet, a registry away).
    Retry(String),
    /// Only a new spec can help.
    Final(&'static str, String),
}

impl Refusal {
    fn source(e: SourceError) -> Self {
        match e {
            SourceError::Registry(_) | SourceError::Store(..) => Self::Retry(e.to_string()),
            SourceError::BadSource(_) | SourceError::NotAComponent(_) => {
                Self::Final(e.reason(), e.to_string())
            }
        }
    }
}

fn condition(
    type_: &str,
    status: bool,
    reason: &str,
    message: &str,
    generation: Option<i64>,
) -> Condition {
    let mut message = message.to_owned();
    crate::plugin::runtime::truncate(&mut message, 1024);
    Condition {
        type_: type_.to_owned(),
        status: if status { "True" } else { "False" }.to_owned(),
        reason: reason.to_owned(),
        message,
        observed_generation: generation,
        last_transition_time: Time(k8s_openapi::jiff::Timestamp::now()),
    }
}

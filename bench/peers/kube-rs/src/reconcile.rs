//! The reconciler: the WebServer plugin's own `reconcile`, called natively
//! through the SDK's JSON path, then the writes a careful controller makes
//! (apply what changed or drifted, delete what is no longer wanted, write the
//! status when it differs).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use kube::api::{Api, DeleteParams, Patch, PatchParams, Preconditions};
use kube::runtime::controller::Action;
use kube::{Client, Resource, ResourceExt};
use kuwa_plugin_webserver::{WebServer, WebServerPlugin};
use serde::Serialize;
use serde_json::{Value, json};

use crate::cache::{Cache, Kind};
use crate::metrics::Metrics;
use crate::plan;

/// The field manager of every write.
pub const FIELD_MANAGER: &str = "peer-kube-rs";

/// The first retry delay after a failure; doubled per consecutive failure.
const BASE_BACKOFF: Duration = Duration::from_millis(200);
/// The longest retry delay.
const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// Why a reconcile failed (it is retried with backoff).
#[derive(Debug)]
pub enum Error {
    /// An API request failed.
    Api(kube::Error),
    /// The plugin failed (other than an invalid spec), or its output or the
    /// parent cannot be used.
    Logic(String),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Api(e) => write!(f, "API request failed: {e}"),
            Self::Logic(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for Error {}

impl From<kube::Error> for Error {
    fn from(e: kube::Error) -> Self {
        Self::Api(e)
    }
}

/// What every reconcile shares.
pub struct Context {
    /// The API client.
    pub client: Client,
    /// The watched namespace.
    pub namespace: String,
    /// Reconcile again this long after a success.
    pub resync: Duration,
    /// The counters.
    pub metrics: Arc<Metrics>,
    /// The ConfigMap cache.
    pub config_maps: Cache<ConfigMap>,
    /// The Deployment cache.
    pub deployments: Cache<Deployment>,
    /// The Service cache.
    pub services: Cache<Service>,
    /// Consecutive failures per parent uid, for the retry backoff.
    pub failures: Mutex<HashMap<String, u32>>,
}

impl Context {
    /// Waits until every child cache has listed once.
    pub async fn children_ready(&self) {
        self.config_maps.synced().wait().await;
        self.deployments.synced().wait().await;
        self.services.synced().wait().await;
    }
}

fn now_rfc3339() -> String {
    k8s_openapi::jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

fn to_json<T: Serialize>(value: &T) -> Result<Value, Error> {
    serde_json::to_value(value).map_err(|e| Error::Logic(format!("cannot serialize: {e}")))
}

/// Reconciles one WebServer.
pub async fn reconcile(parent: Arc<WebServer>, ctx: Arc<Context>) -> Result<Action, Error> {
    ctx.metrics.reconciles.inc();
    ctx.children_ready().await;
    if parent.meta().deletion_timestamp.is_some() {
        // No finalizer: the garbage collector deletes the children.
        return Ok(Action::await_change());
    }
    let uid = parent
        .uid()
        .ok_or_else(|| Error::Logic("the parent has no uid".into()))?;
    let name = parent.name_any();
    tracing::debug!(%name, "reconcile");

    let mut observed = Vec::new();
    for json in [
        children_json(&ctx.config_maps, &uid)?,
        children_json(&ctx.deployments, &uid)?,
        children_json(&ctx.services, &uid)?,
    ] {
        observed.extend(json);
    }
    let parent_json = serde_json::to_string(&*parent)
        .map_err(|e| Error::Logic(format!("cannot serialize the parent: {e}")))?;
    let now = now_rfc3339();
    let desired = match kuwa_sdk::glue::run_reconcile::<WebServerPlugin>(
        &parent_json,
        &observed,
        &[],
        &now,
        "event",
    ) {
        Ok(desired) => desired,
        Err(kuwa_sdk::Error::InvalidSpec(message)) => {
            // Waits for the user to fix the spec; nothing else is written.
            degraded(&ctx, &parent, &message, &now).await?;
            ctx.succeeded(&uid);
            return Ok(Action::await_change());
        }
        Err(e) => return Err(Error::Logic(format!("the plugin failed: {e}"))),
    };

    let mut owner = to_json(
        &parent
            .controller_owner_ref(&())
            .ok_or_else(|| Error::Logic("the parent has no name or uid".into()))?,
    )?;
    owner["blockOwnerDeletion"] = json!(true);
    let (mut config_maps, mut deployments, mut services) = (Vec::new(), Vec::new(), Vec::new());
    for child in desired.children() {
        let prepared = plan::prepare_child(child.clone(), &ctx.namespace, &owner)
            .ok_or_else(|| Error::Logic("a desired child is not an object".into()))?;
        let kind = (child["apiVersion"].as_str(), child["kind"].as_str());
        match kind {
            (Some("v1"), Some("ConfigMap")) => config_maps.push(prepared),
            (Some("apps/v1"), Some("Deployment")) => deployments.push(prepared),
            (Some("v1"), Some("Service")) => services.push(prepared),
            _ => return Err(Error::Logic(format!("unexpected child kind {kind:?}"))),
        }
    }
    sync(&ctx, &ctx.config_maps, &uid, config_maps).await?;
    sync(&ctx, &ctx.deployments, &uid, deployments).await?;
    sync(&ctx, &ctx.services, &uid, services).await?;

    if let Some(status) = desired.status_json() {
        let current = to_json(&parent.status)?;
        if !plan::same(status, &current) {
            write_status(&ctx, &name, status.clone()).await?;
        }
    }
    ctx.succeeded(&uid);
    Ok(Action::requeue(desired.requeue().unwrap_or(ctx.resync)))
}

/// What to do after a failed reconcile: retry with exponential backoff.
pub fn error_policy(parent: Arc<WebServer>, error: &Error, ctx: Arc<Context>) -> Action {
    tracing::warn!(name = %parent.name_any(), %error, "reconcile failed");
    let failures = {
        let mut failures = ctx.failures.lock().unwrap_or_else(|p| p.into_inner());
        let n = failures
            .entry(parent.uid().unwrap_or_default())
            .or_default();
        *n = n.saturating_add(1);
        *n
    };
    let delay = BASE_BACKOFF.saturating_mul(1 << failures.saturating_sub(1).min(20));
    Action::requeue(delay.min(MAX_BACKOFF))
}

impl Context {
    fn succeeded(&self, uid: &str) {
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        if !failures.is_empty() {
            failures.remove(uid);
        }
    }
}

/// The cached children of kind `K` that the parent with `uid` controls, as
/// JSON text (with `apiVersion` and `kind`, which typed objects carry).
fn children_json<K: Kind>(cache: &Cache<K>, uid: &str) -> Result<Vec<String>, Error> {
    cache
        .controlled_by(uid)
        .iter()
        .map(|c| {
            serde_json::to_string(&**c)
                .map_err(|e| Error::Logic(format!("cannot serialize a child: {e}")))
        })
        .collect()
}

/// Applies each desired child of kind `K` that is missing, changed or
/// drifted, and deletes the children of that kind the parent controls and no
/// longer wants.
async fn sync<K: Kind>(
    ctx: &Context,
    cache: &Cache<K>,
    uid: &str,
    desired: Vec<Value>,
) -> Result<(), Error> {
    let api: Api<K> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
    let mut wanted = HashSet::new();
    for object in desired {
        let name = object["metadata"]["name"]
            .as_str()
            .ok_or_else(|| Error::Logic(format!("a desired {} has no name", K::kind(&()))))?
            .to_owned();
        let cached = cache.get(&name);
        if let Some(c) = &cached
            && crate::cache::controller_uid(&**c) != Some(uid)
        {
            // Never adopt: someone else's object is left alone.
            return Err(Error::Logic(format!(
                "{} {name} exists and is not controlled by this WebServer",
                K::kind(&())
            )));
        }
        let cached = cached.as_deref().map(to_json).transpose()?;
        if plan::needs_apply(&object, cached.as_ref()) {
            tracing::debug!(kind = %K::kind(&()), %name, "apply");
            ctx.metrics.writes.inc();
            api.patch(
                &name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&object),
            )
            .await?;
        }
        wanted.insert(name);
    }
    for child in cache.controlled_by(uid) {
        let name = child.name_any();
        if wanted.contains(&name) {
            continue;
        }
        tracing::debug!(kind = %K::kind(&()), %name, "delete");
        ctx.metrics.writes.inc();
        let params = DeleteParams {
            preconditions: Some(Preconditions {
                uid: child.uid(),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        match api.delete(&name, &params).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Server-side applies the parent's status.
async fn write_status(ctx: &Context, name: &str, status: Value) -> Result<(), Error> {
    tracing::debug!(%name, "status");
    let api: Api<WebServer> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
    let body = json!({
        "apiVersion": WebServer::api_version(&()),
        "kind": WebServer::kind(&()),
        "status": status,
    });
    ctx.metrics.writes.inc();
    api.patch_status(
        name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&body),
    )
    .await?;
    Ok(())
}

/// An invalid spec: `Degraded=True` on the current status, as the kuwa host
/// does; the plugin's children are left as they are.
async fn degraded(
    ctx: &Context,
    parent: &WebServer,
    message: &str,
    now: &str,
) -> Result<(), Error> {
    let current = to_json(&parent.status)?;
    let mut status = current.clone();
    plan::upsert_condition(
        &mut status,
        "Degraded",
        true,
        "InvalidSpec",
        message,
        parent.meta().generation,
        now,
    );
    if !plan::same(&status, &current) {
        write_status(ctx, &parent.name_any(), status).await?;
    }
    Ok(())
}

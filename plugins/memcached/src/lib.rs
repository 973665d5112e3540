//! # Memcached plugin
//!
//! The memcached-operator from the "Extending Kubernetes" talk as a kuwa
//! plugin. Memcached needs client-side load balancing; rather than teach
//! every application, a `Memcached` (`kuwa.dev/v1alpha1`) runs an mcrouter
//! proxy in front of the backends and keeps its configuration in step with
//! the backends that are actually ready. It becomes
//!
//! * a StatefulSet `<name>` of `spec.replicas` memcached Pods (`-m
//!   spec.memoryMB`, the same amount plus [`MEMORY_OVERHEAD_MB`] as memory
//!   request and limit) and a headless Service `<name>-backends`,
//! * a ConfigMap `<name>-proxy` whose `config.json` lists the **ready**
//!   backend endpoints (see [`mcrouter`] for the routes of each topology),
//! * an mcrouter Deployment `<name>-proxy` mounting it, with a
//!   [`CONFIG_HASH_ANNOTATION`] Pod annotation so a new config rolls the
//!   proxy,
//! * a Service `<name>` on port 11211 for clients.
//!
//! The backends' Pods are related objects (owned by the StatefulSet child),
//! so the host reconciles again whenever one becomes ready or goes away; the
//! config then changes and the proxy rolls. When nothing changed the output
//! is byte-identical, so the host writes nothing.
//!
//! Status carries `readyBackends`, the `endpoints` in use,
//! `observedGeneration` and the conditions `Available` (at least one ready
//! backend and a ready proxy), `Progressing` and `Degraded`.

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use kuwa_sdk::{
    Conditions, Description, Desired, Error, Observed, Reconciler, RelatedMapping, content_hash,
};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub mod backends;
mod children;
pub mod mcrouter;

pub use children::{CONFIG_HASH_ANNOTATION, CONFIG_KEY};

/// The memcached port, on the backends and on the client Service.
pub const MEMCACHED_PORT: u16 = 11211;

/// The port mcrouter listens on inside the proxy Pods.
pub const PROXY_PORT: u16 = 5000;

/// The smallest `memoryMB` accepted: memcached's slab allocator hands out
/// 1 MB pages per slab class, so below this a backend can hardly cache
/// anything.
pub const MIN_MEMORY_MB: i32 = 16;

/// The largest `memoryMB` accepted (1 TiB), so the container's memory
/// quantity can never overflow.
pub const MAX_MEMORY_MB: i32 = 1024 * 1024;

/// Memory each backend gets on top of `memoryMB` (its item cache): room for
/// the hash table, connection buffers and the process itself, so a full
/// cache is not OOM-killed.
pub const MEMORY_OVERHEAD_MB: i32 = 16;

/// The longest parent name whose children are all valid: the StatefulSet
/// controller labels Pods `controller-revision-hash=<name>-<10 chars>`,
/// and label values hold at most 63 characters.
pub const MAX_NAME_LEN: usize = 52;

/// The default proxy image.
pub const DEFAULT_PROXY_IMAGE: &str = "mcrouter/mcrouter:latest";

/// A memcached cache behind an mcrouter proxy.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, JsonSchema)]
#[kube(
    group = "kuwa.dev",
    version = "v1alpha1",
    kind = "Memcached",
    plural = "memcacheds",
    shortname = "mc",
    namespaced,
    status = "MemcachedStatus",
    doc = "A memcached cache: memcached backends behind an mcrouter proxy that routes to the ready ones.",
    printcolumn = r#"{"name":"Replicas","type":"integer","jsonPath":".spec.replicas"}"#,
    printcolumn = r#"{"name":"Ready","type":"integer","jsonPath":".status.readyBackends"}"#,
    printcolumn = r#"{"name":"Topology","type":"string","jsonPath":".spec.topology"}"#,
    printcolumn = r#"{"name":"Memory","type":"integer","jsonPath":".spec.memoryMB","description":"megabytes per backend"}"#,
    printcolumn = r#"{"name":"Available","type":"string","jsonPath":".status.conditions[?(@.type==\"Available\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct MemcachedSpec {
    /// How many memcached backends to run.
    #[schemars(range(min = 1))]
    pub replicas: i32,
    /// Item memory per backend in megabytes (memcached's `-m`). The
    /// container's memory request and limit add 16 MB of overhead.
    #[serde(rename = "memoryMB")]
    #[schemars(range(min = MIN_MEMORY_MB, max = MAX_MEMORY_MB))]
    pub memory_mb: i32,
    /// How keys spread over the backends: `sharded` hashes each key to one
    /// backend; `replicated` writes every key to all backends and reads from
    /// one.
    #[serde(default)]
    pub topology: Topology,
    /// The mcrouter proxy clients connect to.
    #[serde(default)]
    pub proxy: ProxySpec,
}

/// How keys spread over the backends.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Topology {
    /// Every key is written to all backends; reads go to one.
    Replicated,
    /// Keys are hashed across the backends.
    #[default]
    Sharded,
}

/// The proxy Deployment.
#[derive(Serialize, Deserialize, Clone, Debug, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ProxySpec {
    /// How many mcrouter Pods to run.
    #[serde(default = "default_proxy_replicas")]
    #[schemars(range(min = 1))]
    pub replicas: i32,
    /// The mcrouter image.
    #[serde(default = "default_proxy_image")]
    #[schemars(length(min = 1))]
    pub image: String,
}

fn default_proxy_replicas() -> i32 {
    1
}

fn default_proxy_image() -> String {
    DEFAULT_PROXY_IMAGE.to_owned()
}

impl Default for ProxySpec {
    fn default() -> Self {
        Self {
            replicas: default_proxy_replicas(),
            image: default_proxy_image(),
        }
    }
}

/// What the plugin observed of the cache.
#[derive(Serialize, Deserialize, Clone, Debug, Default, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MemcachedStatus {
    /// Backends that are ready and listed in the proxy configuration.
    #[serde(default)]
    pub ready_backends: i32,
    /// The backend endpoints (`ip:port`) the proxy routes to, in ordinal order.
    #[serde(default)]
    pub endpoints: Vec<String>,
    /// The generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Available`, `Progressing` and `Degraded`.
    #[serde(default)]
    pub conditions: Vec<Condition>,
}

/// The plugin.
pub struct MemcachedPlugin;

fn parent_name(parent: &Memcached) -> &str {
    parent.metadata.name.as_deref().unwrap_or_default()
}

/// True for a DNS-1035 label (what Service names must be).
fn is_dns_label(name: &str) -> bool {
    name.starts_with(|c: char| c.is_ascii_lowercase())
        && !name.ends_with('-')
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

fn validate(parent: &Memcached) -> Result<(), Error> {
    let name = parent_name(parent);
    if !is_dns_label(name) || name.len() > MAX_NAME_LEN {
        return Err(Error::invalid_spec(format!(
            "name {name:?} cannot name the backend Service and StatefulSet: use at most \
             {MAX_NAME_LEN} lowercase letters, digits and '-', starting with a letter"
        )));
    }
    let spec = &parent.spec;
    if spec.replicas < 1 {
        return Err(Error::invalid_spec(format!(
            "spec.replicas must be 1 or more, got {}",
            spec.replicas
        )));
    }
    if !(MIN_MEMORY_MB..=MAX_MEMORY_MB).contains(&spec.memory_mb) {
        return Err(Error::invalid_spec(format!(
            "spec.memoryMB must be between {MIN_MEMORY_MB} and {MAX_MEMORY_MB}, got {}",
            spec.memory_mb
        )));
    }
    if spec.proxy.replicas < 1 {
        return Err(Error::invalid_spec(format!(
            "spec.proxy.replicas must be 1 or more, got {}",
            spec.proxy.replicas
        )));
    }
    if spec.proxy.image.is_empty() || spec.proxy.image.contains(char::is_whitespace) {
        return Err(Error::invalid_spec(format!(
            "spec.proxy.image {:?} is not an image reference",
            spec.proxy.image
        )));
    }
    Ok(())
}

/// Whether the observed proxy Deployment serves, and whether it runs the
/// desired spec (replicas and config hash) everywhere.
fn proxy_state(
    parent: &Memcached,
    observed: &Observed,
    config_hash: &str,
) -> Result<(bool, bool), Error> {
    let Some(d) = observed.child::<Deployment>(&children::proxy_name(parent))? else {
        return Ok((false, false));
    };
    let want = parent.spec.proxy.replicas;
    let st = d.status.clone().unwrap_or_default();
    let ready = st.ready_replicas.unwrap_or(0);
    let spec = d.spec.as_ref();
    let hash = spec
        .and_then(|s| s.template.metadata.as_ref())
        .and_then(|m| m.annotations.as_ref())
        .and_then(|a| a.get(CONFIG_HASH_ANNOTATION));
    let current =
        st.observed_generation.is_some() && st.observed_generation >= d.metadata.generation;
    let rolled_out = current
        && hash.map(String::as_str) == Some(config_hash)
        && spec.and_then(|s| s.replicas) == Some(want)
        && st.updated_replicas.unwrap_or(0) == want
        && st.replicas.unwrap_or(0) == want
        && ready == want;
    Ok((ready >= 1, rolled_out))
}

fn status(
    parent: &Memcached,
    observed: &Observed,
    endpoints: Vec<String>,
    config_hash: &str,
) -> Result<MemcachedStatus, Error> {
    let generation = parent.metadata.generation;
    let previous = parent
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default();
    let want = parent.spec.replicas;
    let ready = i32::try_from(endpoints.len()).unwrap_or(i32::MAX);
    let (proxy_ready, proxy_rolled_out) = proxy_state(parent, observed, config_hash)?;
    let backends = format!("{ready}/{want} backends ready");

    let conditions = Conditions::new(previous, observed.now(), generation);
    let conditions = match (ready >= 1, proxy_ready) {
        (true, true) => conditions.set(
            "Available",
            true,
            "Serving",
            format!("{backends}; the proxy is ready"),
        ),
        (false, _) => conditions.set("Available", false, "NoReadyBackends", backends.clone()),
        (true, false) => conditions.set(
            "Available",
            false,
            "ProxyNotReady",
            format!("{backends}; no proxy Pod is ready"),
        ),
    };
    let conditions = if ready < want {
        conditions.set("Progressing", true, "BackendsNotReady", backends)
    } else if !proxy_rolled_out {
        conditions.set(
            "Progressing",
            true,
            "ProxyRollingOut",
            format!("{backends}; waiting for the proxy to roll out"),
        )
    } else {
        conditions.set(
            "Progressing",
            false,
            "Complete",
            format!("{backends}; the proxy is rolled out"),
        )
    };
    Ok(MemcachedStatus {
        ready_backends: ready,
        endpoints,
        observed_generation: generation,
        conditions: conditions
            .set("Degraded", false, "AsExpected", "the spec is valid")
            .build(),
    })
}

impl Reconciler for MemcachedPlugin {
    type Parent = Memcached;
    type Status = MemcachedStatus;

    fn describe() -> Description {
        Description::new::<Memcached>("memcached", env!("CARGO_PKG_VERSION"))
            .owns::<StatefulSet>()
            .owns::<Service>()
            .owns::<ConfigMap>()
            .owns::<Deployment>()
            .watches::<Pod>(RelatedMapping::OwnedByChild)
    }

    fn reconcile(
        parent: &Memcached,
        observed: &Observed,
    ) -> Result<Desired<MemcachedStatus>, Error> {
        validate(parent)?;
        let pods = observed.related::<Pod>()?;
        let endpoints: Vec<String> = backends::ready(
            parent_name(parent),
            parent.spec.replicas,
            MEMCACHED_PORT,
            &pods,
        )
        .into_iter()
        .map(|b| b.endpoint)
        .collect();
        let config = mcrouter::render(parent.spec.topology, &endpoints);
        let config_hash = content_hash(config.as_bytes());
        let status = status(parent, observed, endpoints, &config_hash)?;
        Ok(Desired::new()
            .child(children::backend_statefulset(parent))
            .child(children::backend_service(parent))
            .child(children::proxy_config_map(parent, config))
            .child(children::proxy_deployment(parent, &config_hash))
            .child(children::client_service(parent))
            .status(status))
    }
}

kuwa_sdk::export_plugin!(MemcachedPlugin);

#[cfg(test)]
mod tests;

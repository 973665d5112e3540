//! From an Ingress and the Services and EndpointSlices it routes to, to an
//! nginx configuration.
//!
//! Each backend (Service, port) becomes one `upstream` with the ready
//! endpoint addresses of the Service's EndpointSlices on the matching port,
//! sorted; a backend with no ready endpoint (or no Service) gets a single
//! `down` server, so nginx answers 502 instead of failing to load. Each host
//! of the rules becomes a `server` with one `location` per path (`Exact`
//! paths as `location =`); TLS hosts also listen on 443 with the
//! certificate of their secret, mounted by name under [`TLS_DIR`].

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::{Ingress, IngressServiceBackend, ServiceBackendPort};
use kuwa_sdk::Error;

/// Where TLS secrets are mounted in the proxy (`<TLS_DIR>/<secret>/tls.crt`).
pub const TLS_DIR: &str = "/etc/nginx/tls";

/// The label an EndpointSlice carries with its Service's name.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// One upstream: a backend Service port and its ready endpoints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    /// The upstream's name, `<service>-<port>`.
    pub name: String,
    /// `address:port` of each ready endpoint, sorted.
    pub servers: Vec<String>,
}

/// One path of a host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// The path.
    pub path: String,
    /// Whether it matches exactly.
    pub exact: bool,
    /// The upstream it proxies to.
    pub upstream: String,
}

/// One virtual server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Server {
    /// The host name (`_` for any).
    pub host: String,
    /// The TLS secret, when the host is in `spec.tls`.
    pub tls_secret: Option<String>,
    /// Its routes, longest path first.
    pub routes: Vec<Route>,
}

/// What the configuration is made of.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    /// Upstreams by name.
    pub upstreams: BTreeMap<String, Upstream>,
    /// Servers by host.
    pub servers: Vec<Server>,
    /// The TLS secrets referenced, sorted.
    pub tls_secrets: Vec<String>,
}

fn port_label(port: &ServiceBackendPort) -> Result<String, Error> {
    match (&port.name, port.number) {
        (Some(name), _) if !name.is_empty() => Ok(name.clone()),
        (_, Some(n)) if n > 0 => Ok(n.to_string()),
        _ => Err(Error::invalid_spec(
            "a backend service port needs a name or a number",
        )),
    }
}

/// The ready endpoints of `backend`, as `address:port`.
fn endpoints(
    backend: &IngressServiceBackend,
    namespace: Option<&str>,
    services: &[Service],
    slices: &[EndpointSlice],
) -> Vec<String> {
    let Some(service) = services.iter().find(|s| {
        s.metadata.name.as_deref() == Some(backend.name.as_str())
            && s.metadata.namespace.as_deref() == namespace
    }) else {
        return Vec::new();
    };
    let wanted = backend.port.clone().unwrap_or_default();
    let ports = service
        .spec
        .as_ref()
        .and_then(|s| s.ports.clone())
        .unwrap_or_default();
    // The Service port the backend names; its name is the EndpointSlice
    // port's name.
    let Some(port) = ports.iter().find(|p| match (&wanted.name, wanted.number) {
        (Some(name), _) if !name.is_empty() => p.name.as_deref() == Some(name.as_str()),
        (_, Some(n)) => p.port == n,
        _ => false,
    }) else {
        return Vec::new();
    };
    let port_name = port.name.clone().unwrap_or_default();
    let mut out = BTreeSet::new();
    for slice in slices.iter().filter(|s| {
        s.metadata.namespace.as_deref() == namespace
            && s.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(SERVICE_NAME_LABEL))
                .map(String::as_str)
                == Some(backend.name.as_str())
    }) {
        let Some(number) = slice
            .ports
            .as_ref()
            .and_then(|ps| {
                ps.iter()
                    .find(|p| p.name.clone().unwrap_or_default() == port_name)
            })
            .and_then(|p| p.port)
        else {
            continue;
        };
        for endpoint in slice.endpoints.iter().flatten() {
            let ready = endpoint
                .conditions
                .as_ref()
                .and_then(|c| c.ready)
                .unwrap_or(true);
            if !ready {
                continue;
            }
            for address in &endpoint.addresses {
                let host = if address.contains(':') {
                    format!("[{address}]")
                } else {
                    address.clone()
                };
                out.insert(format!("{host}:{number}"));
            }
        }
    }
    // Address order, not text order (10.0.0.10 after 10.0.0.9).
    let mut out: Vec<String> = out.into_iter().collect();
    out.sort_by_key(|s| {
        s.rsplit_once(':')
            .and_then(|(a, _)| a.trim_matches(['[', ']']).parse::<std::net::IpAddr>().ok())
    });
    out
}

/// Checks a host name from the spec (it goes into the configuration).
fn checked_host(host: &str) -> Result<String, Error> {
    let ok = !host.is_empty()
        && host.len() <= 253
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '*');
    if ok {
        Ok(host.to_ascii_lowercase())
    } else {
        Err(Error::invalid_spec(format!(
            "{host:?} is not a valid host name"
        )))
    }
}

/// Checks a path from the spec.
fn checked_path(path: &str) -> Result<String, Error> {
    if path.starts_with('/')
        && path
            .chars()
            .all(|c| c.is_ascii_graphic() && !"{};\"'\\#".contains(c))
    {
        Ok(path.to_owned())
    } else {
        Err(Error::invalid_spec(format!(
            "path {path:?} must start with / and hold no spaces, quotes, braces, ';' or '#'"
        )))
    }
}

fn checked_secret(name: &str) -> Result<String, Error> {
    let ok = (1..=253).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.');
    if ok {
        Ok(name.to_owned())
    } else {
        Err(Error::invalid_spec(format!(
            "TLS secret name {name:?} is not a valid object name"
        )))
    }
}

/// Works out upstreams, servers and TLS secrets; rejects what nginx could not
/// be given safely (the spec's strings go into its configuration).
pub fn plan(
    ingress: &Ingress,
    services: &[Service],
    slices: &[EndpointSlice],
) -> Result<Plan, Error> {
    let namespace = ingress.metadata.namespace.as_deref();
    let spec = ingress.spec.clone().unwrap_or_default();
    let mut plan = Plan::default();
    let mut upstream_for = |backend: &IngressServiceBackend| -> Result<String, Error> {
        if !is_object_name(&backend.name) {
            return Err(Error::invalid_spec(format!(
                "backend service name {:?} is not a valid Service name",
                backend.name
            )));
        }
        let port = port_label(&backend.port.clone().unwrap_or_default())?;
        let name = format!("{}-{port}", backend.name);
        if !plan.upstreams.contains_key(&name) {
            plan.upstreams.insert(
                name.clone(),
                Upstream {
                    name: name.clone(),
                    servers: endpoints(backend, namespace, services, slices),
                },
            );
        }
        Ok(name)
    };
    let mut tls_of: BTreeMap<String, String> = BTreeMap::new();
    let mut secrets = BTreeSet::new();
    for tls in spec.tls.clone().unwrap_or_default() {
        let Some(secret) = tls.secret_name.as_deref().filter(|s| !s.is_empty()) else {
            continue;
        };
        let secret = checked_secret(secret)?;
        secrets.insert(secret.clone());
        for host in tls.hosts.unwrap_or_default() {
            tls_of.insert(checked_host(&host)?, secret.clone());
        }
    }
    let mut servers: BTreeMap<String, Vec<Route>> = BTreeMap::new();
    if let Some(backend) = &spec.default_backend {
        let service = backend.service.as_ref().ok_or_else(|| {
            Error::invalid_spec("spec.defaultBackend must be a service backend (resource backends are not supported)")
        })?;
        let upstream = upstream_for(service)?;
        servers.entry("_".to_owned()).or_default().push(Route {
            path: "/".to_owned(),
            exact: false,
            upstream,
        });
    }
    for (i, rule) in spec
        .rules
        .clone()
        .unwrap_or_default()
        .into_iter()
        .enumerate()
    {
        let host = match rule.host.as_deref() {
            Some(h) if !h.is_empty() => checked_host(h)?,
            _ => "_".to_owned(),
        };
        let Some(http) = rule.http else { continue };
        for (j, path) in http.paths.into_iter().enumerate() {
            let service = path.backend.service.as_ref().ok_or_else(|| {
                Error::invalid_spec(format!(
                    "spec.rules[{i}].http.paths[{j}].backend must be a service backend (resource backends are not supported)"
                ))
            })?;
            let upstream = upstream_for(service)?;
            let routes = servers.entry(host.clone()).or_default();
            let p = checked_path(path.path.as_deref().unwrap_or("/"))?;
            let exact = path.path_type == "Exact";
            if !routes.iter().any(|r| r.path == p && r.exact == exact) {
                routes.push(Route {
                    path: p,
                    exact,
                    upstream,
                });
            }
        }
    }
    plan.servers = servers
        .into_iter()
        .map(|(host, mut routes)| {
            routes.sort_by(|a, b| b.path.len().cmp(&a.path.len()).then(a.path.cmp(&b.path)));
            Server {
                tls_secret: tls_of.get(&host).cloned(),
                host,
                routes,
            }
        })
        .collect();
    plan.tls_secrets = secrets.into_iter().collect();
    Ok(plan)
}

fn is_object_name(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

/// The nginx configuration of `plan`.
pub fn nginx(ingress: &Ingress, plan: &Plan) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# Rendered by kuwa's ingress plugin for Ingress {}/{}; do not edit.",
        ingress.metadata.namespace.as_deref().unwrap_or_default(),
        ingress.metadata.name.as_deref().unwrap_or_default()
    );
    for upstream in plan.upstreams.values() {
        let _ = writeln!(out, "\nupstream {} {{", upstream.name);
        if upstream.servers.is_empty() {
            let _ = writeln!(out, "    # no ready endpoints");
            let _ = writeln!(out, "    server 127.0.0.1:9 down;");
        }
        for server in &upstream.servers {
            let _ = writeln!(out, "    server {server};");
        }
        let _ = writeln!(out, "}}");
    }
    for server in &plan.servers {
        let _ = writeln!(out, "\nserver {{");
        let _ = writeln!(out, "    listen 80;");
        if let Some(secret) = &server.tls_secret {
            let _ = writeln!(out, "    listen 443 ssl;");
            let _ = writeln!(out, "    ssl_certificate {TLS_DIR}/{secret}/tls.crt;");
            let _ = writeln!(out, "    ssl_certificate_key {TLS_DIR}/{secret}/tls.key;");
        }
        let _ = writeln!(out, "    server_name {};", server.host);
        for route in &server.routes {
            let op = if route.exact { "= " } else { "" };
            let _ = writeln!(out, "    location {op}{} {{", route.path);
            let _ = writeln!(out, "        proxy_pass http://{};", route.upstream);
            let _ = writeln!(out, "    }}");
        }
        let _ = writeln!(out, "}}");
    }
    out
}

//! End-to-end: the Ingress plugin (issue 14) against the real local control
//! plane. Its parent is the built-in Ingress: two Ingresses of class `kuwa`
//! over two backend Services get configurations with their upstreams and
//! ready endpoints; scaling a backend changes the configuration and rolls
//! the proxy; removing a rule removes its upstream; an Ingress of another
//! class is never touched.

use std::time::Duration;

use anyhow::{Context, Result};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::Ingress;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::{Client, ResourceExt};
use kuwa_e2e::host::{KuwaHost, apply_json, plugin, yaml_file};
use kuwa_e2e::{TestNamespace, client, wait_for};
use serde_json::{Value, json};

const CONVERGE: Duration = Duration::from_secs(90);

fn backend(name: &str, replicas: i64) -> Value {
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"containers": [{"name": "app", "image": "registry.invalid/app:1",
                                         "ports": [{"name": "web", "containerPort": 8080}]}]}
            }
        }
    })
}

fn service(name: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
        "spec": {"selector": {"app": name},
                 "ports": [{"name": "web", "port": 80, "targetPort": "web"}]}
    })
}

fn rule(host: &str, path: &str, service: &str) -> Value {
    json!({"host": host, "http": {"paths": [{"path": path, "pathType": "Prefix",
        "backend": {"service": {"name": service, "port": {"name": "web"}}}}]}})
}

fn ingress(name: &str, class: &str, rules: &[Value]) -> Value {
    json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "Ingress", "metadata": {"name": name},
        "spec": {"ingressClassName": class, "rules": rules}
    })
}

/// The ready endpoints of `service`, as nginx `server` lines, in address
/// order.
async fn ready_servers(client: &Client, ns: &str, service: &str) -> Result<Vec<String>> {
    let api: Api<EndpointSlice> = Api::namespaced(client.clone(), ns);
    let mut out = Vec::new();
    let slices = api
        .list(&ListParams::default().labels(&format!("kubernetes.io/service-name={service}")))
        .await?;
    for s in slices.items {
        let port = s
            .ports
            .unwrap_or_default()
            .into_iter()
            .find(|p| p.name.as_deref() == Some("web"))
            .and_then(|p| p.port);
        let Some(port) = port else { continue };
        for e in s.endpoints.unwrap_or_default() {
            if e.conditions.and_then(|c| c.ready) != Some(false) {
                out.extend(e.addresses.into_iter().map(|a| (a, port)));
            }
        }
    }
    out.sort_by_key(|(a, _)| a.parse::<std::net::IpAddr>().ok());
    out.dedup();
    Ok(out
        .into_iter()
        .map(|(a, p)| format!("    server {a}:{p};"))
        .collect())
}

async fn config(client: &Client, ns: &str, ingress: &str) -> Result<Option<String>> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    Ok(api
        .get_opt(&format!("{ingress}-proxy"))
        .await?
        .and_then(|cm| cm.data)
        .and_then(|d| d.get("default.conf").cloned()))
}

/// The `upstream NAME { ... }` block of `config`, its server lines.
fn upstream(config: &str, name: &str) -> Option<Vec<String>> {
    let start = config.find(&format!("upstream {name} {{\n"))?;
    let body = &config[start..];
    let end = body.find("\n}")?;
    Some(
        body[..end]
            .lines()
            .skip(1)
            .filter(|l| l.trim_start().starts_with("server "))
            .map(str::to_owned)
            .collect(),
    )
}

/// Waits until Ingress `name`'s configuration has, for each `(upstream,
/// service)`, the Service's ready endpoints (at least `min` of them), and
/// no other upstream.
async fn wait_upstreams(
    client: &Client,
    ns: &str,
    name: &str,
    wanted: &[(&str, &str, usize)],
) -> Result<String> {
    wait_for(
        &format!("the configuration of {name}"),
        CONVERGE,
        || async move {
            let Some(conf) = config(client, ns, name).await? else {
                return Ok(None);
            };
            let upstreams = conf.matches("\nupstream ").count();
            if upstreams != wanted.len() {
                return Ok(None);
            }
            for (up, svc, min) in wanted {
                let want = ready_servers(client, ns, svc).await?;
                if want.len() < *min || upstream(&conf, up).as_ref() != Some(&want) {
                    return Ok(None);
                }
            }
            Ok(Some(conf))
        },
    )
    .await
}

async fn config_hash(client: &Client, ns: &str, ingress: &str) -> Result<Option<String>> {
    let api: Api<Deployment> = Api::namespaced(client.clone(), ns);
    Ok(api
        .get_opt(&format!("{ingress}-proxy"))
        .await?
        .and_then(|d| {
            d.spec?
                .template
                .metadata?
                .annotations?
                .get("ingress.kuwa.dev/config-hash")
                .cloned()
        }))
}

#[tokio::test(flavor = "multi_thread")]
async fn ingresses_of_class_kuwa_route_to_ready_endpoints() -> Result<()> {
    let client = client().await?;
    let ns = TestNamespace::new(&client, "ingress").await?;
    // The class (cluster-wide; the sample's, applied idempotently).
    let class = yaml_file("deploy/samples/networking.k8s.io_v1_ingressclass.yaml")?;
    let classes: Api<k8s_openapi::api::networking::v1::IngressClass> = Api::all(client.clone());
    classes
        .patch(
            "kuwa",
            &PatchParams::apply("e2e").force(),
            &Patch::Apply(&class),
        )
        .await?;
    let host = KuwaHost::start(&ns.name, &[plugin("ingress")?], &[]).await?;
    for (name, replicas) in [("svc-a", 2), ("svc-b", 1)] {
        apply_json(&client, &ns.name, &backend(name, replicas)).await?;
        apply_json(&client, &ns.name, &service(name)).await?;
    }
    // Another controller's Ingress, created first: it must stay untouched.
    apply_json(
        &client,
        &ns.name,
        &ingress("theirs", "other", &[rule("x.example.com", "/", "svc-a")]),
    )
    .await?;
    apply_json(
        &client,
        &ns.name,
        &ingress(
            "one",
            "kuwa",
            &[
                rule("a.example.com", "/", "svc-a"),
                rule("b.example.com", "/", "svc-b"),
            ],
        ),
    )
    .await?;
    apply_json(
        &client,
        &ns.name,
        &ingress("two", "kuwa", &[rule("b.example.com", "/api", "svc-b")]),
    )
    .await?;

    let conf = wait_upstreams(
        &client,
        &ns.name,
        "one",
        &[("svc-a-web", "svc-a", 2), ("svc-b-web", "svc-b", 1)],
    )
    .await?;
    println!("configuration of Ingress one:\n{conf}");
    assert!(
        conf.contains("server_name a.example.com;") && conf.contains("server_name b.example.com;")
    );
    wait_upstreams(&client, &ns.name, "two", &[("svc-b-web", "svc-b", 1)]).await?;
    let ingresses: Api<Ingress> = Api::namespaced(client.clone(), &ns.name);
    let published = wait_for("status.loadBalancer of one", CONVERGE, || {
        let ingresses = ingresses.clone();
        async move {
            let i = ingresses.get("one").await?;
            Ok(i.status
                .and_then(|s| s.load_balancer)
                .and_then(|l| l.ingress)
                .and_then(|l| l.into_iter().next())
                .and_then(|e| e.ip))
        }
    })
    .await?;
    assert_eq!(published, "192.0.2.10");

    // Scaling a backend: the new endpoint in both configurations, and the
    // proxy rolls (a new Pod template hash).
    let before = config_hash(&client, &ns.name, "one")
        .await?
        .context("hash")?;
    apply_json(&client, &ns.name, &backend("svc-b", 2)).await?;
    let scaled = wait_upstreams(
        &client,
        &ns.name,
        "one",
        &[("svc-a-web", "svc-a", 2), ("svc-b-web", "svc-b", 2)],
    )
    .await?;
    assert_eq!(upstream(&scaled, "svc-b-web").map(|s| s.len()), Some(2));
    wait_upstreams(&client, &ns.name, "two", &[("svc-b-web", "svc-b", 2)]).await?;
    let after = config_hash(&client, &ns.name, "one")
        .await?
        .context("hash")?;
    assert_ne!(before, after, "a new configuration rolls the proxy");
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    wait_for("the proxy of one rolled out", CONVERGE, || {
        let deployments = deployments.clone();
        async move {
            let d = deployments.get("one-proxy").await?;
            let st = d.status.unwrap_or_default();
            Ok((st.observed_generation >= d.metadata.generation
                && st.updated_replicas == Some(1)
                && st.ready_replicas == Some(1))
            .then_some(()))
        }
    })
    .await?;

    // Removing a rule removes its upstream.
    apply_json(
        &client,
        &ns.name,
        &ingress("one", "kuwa", &[rule("a.example.com", "/", "svc-a")]),
    )
    .await?;
    let fewer = wait_upstreams(&client, &ns.name, "one", &[("svc-a-web", "svc-a", 2)]).await?;
    assert!(!fewer.contains("svc-b"), "{fewer}");

    // The other class: no children, no status write, not a field of it ours.
    host.wait_idle(Duration::from_secs(2), CONVERGE).await?;
    let theirs = ingresses.get("theirs").await?;
    let managers: Vec<String> = theirs
        .managed_fields()
        .iter()
        .filter_map(|m| m.manager.clone())
        .collect();
    assert_eq!(managers, ["e2e"], "only the test wrote it");
    assert!(
        theirs
            .status
            .and_then(|s| s.load_balancer)
            .and_then(|l| l.ingress)
            .is_none()
    );
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns.name);
    assert!(cms.get_opt("theirs-proxy").await?.is_none());
    assert!(deployments.get_opt("theirs-proxy").await?.is_none());
    let uid = theirs.metadata.uid.clone().unwrap_or_default();
    let owned = cms
        .list(&ListParams::default())
        .await?
        .items
        .iter()
        .filter(|c| c.owner_references().iter().any(|o| o.uid == uid))
        .count();
    assert_eq!(owned, 0);

    let writes = host.forced_resync_writes("ingress", 3, 2).await?;
    println!("steady state: {writes} writes over 2 forced resyncs of 3 Ingresses");
    assert_eq!(writes, 0.0, "{}", host.write_metrics().await?);
    ns.cleanup().await;
    Ok(())
}

//! Fixture tests: the real reconcile, natively, through the SDK's JSON path.

use kuwa_sdk::testing::Fixture;
use serde_json::{Value, json};

use super::*;

const SAMPLE: &str = include_str!("../../../deploy/samples/networking.k8s.io_v1_ingress.yaml");
const BACKENDS: &str = include_str!("../fixtures/backends.yaml");

fn backends() -> Vec<Value> {
    serde_saphyr::from_multiple(BACKENDS).unwrap()
}

fn service(name: &str, port: i32) -> Value {
    json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "default"},
           "spec": {"ports": [{"name": "web", "port": port}]}})
}

fn slice(service: &str, port: i32, ready: &[&str]) -> Value {
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
           "metadata": {"name": format!("{service}-x"), "namespace": "default",
                        "labels": {"kubernetes.io/service-name": service}},
           "addressType": "IPv4", "ports": [{"name": "web", "port": port}],
           "endpoints": ready.iter().map(|a| json!({"addresses": [a], "conditions": {"ready": true}})).collect::<Vec<_>>()})
}

fn with_related(mut f: Fixture, objects: Vec<Value>) -> Fixture {
    for o in objects {
        f = f.related(o);
    }
    f
}

fn config(out: &Desired<IngressStatus>) -> String {
    let cm: ConfigMap = out.child_named("ingress-sample-proxy").unwrap();
    cm.data.unwrap()["default.conf"].clone()
}

fn pod_hash(out: &Desired<IngressStatus>) -> String {
    let d: Deployment = out.child_named("ingress-sample-proxy").unwrap();
    d.spec
        .unwrap()
        .template
        .metadata
        .unwrap()
        .annotations
        .unwrap()[CONFIG_HASH_ANNOTATION]
        .clone()
}

#[test]
fn the_sample_routes_to_the_ready_endpoints() {
    let out = with_related(Fixture::parent_yaml(SAMPLE), backends())
        .reconcile::<IngressPlugin>()
        .unwrap();
    assert_eq!(out.children().len(), 2);
    let conf = config(&out);
    assert!(
        conf.contains("upstream webserver-sample-http {\n    server 10.128.0.9:80;\n    server 10.128.0.12:80;\n}"),
        "{conf}"
    );
    assert!(
        !conf.contains("10.128.0.30"),
        "a Pod not ready is no upstream server"
    );
    assert!(conf.contains("server_name web.example.com;"), "{conf}");
    assert!(
        conf.contains("location / {\n        proxy_pass http://webserver-sample-http;"),
        "{conf}"
    );
    assert_eq!(pod_hash(&out), content_hash(conf.as_bytes()));
    assert_eq!(
        out.status_json().unwrap(),
        &json!({"loadBalancer": {"ingress": [{"ip": "192.0.2.10"}]}})
    );
}

#[test]
fn two_backends_two_upstreams_and_scaling_rolls_the_proxy() {
    let two = |ready_b: &[&str]| {
        with_related(
            Fixture::parent_yaml(SAMPLE).with_parent(|p| {
                p["spec"]["rules"] = json!([
                    {"host": "a.example.com", "http": {"paths": [{"path": "/", "pathType": "Prefix",
                        "backend": {"service": {"name": "svc-a", "port": {"number": 8080}}}}]}},
                    {"host": "b.example.com", "http": {"paths": [
                        {"path": "/api", "pathType": "Exact", "backend": {"service": {"name": "svc-b", "port": {"name": "web"}}}},
                        {"path": "/", "pathType": "Prefix", "backend": {"service": {"name": "svc-a", "port": {"number": 8080}}}}]}}
                ]);
            }),
            vec![
                service("svc-a", 8080),
                slice("svc-a", 8080, &["10.0.0.1"]),
                service("svc-b", 80),
                slice("svc-b", 9090, ready_b),
            ],
        )
        .reconcile::<IngressPlugin>()
        .unwrap()
    };
    let one = two(&["10.0.1.1"]);
    let conf = config(&one);
    assert!(
        conf.contains("upstream svc-a-8080 {\n    server 10.0.0.1:8080;"),
        "{conf}"
    );
    assert!(
        conf.contains("upstream svc-b-web {\n    server 10.0.1.1:9090;\n}"),
        "{conf}"
    );
    assert!(
        conf.contains("location = /api {\n        proxy_pass http://svc-b-web;"),
        "{conf}"
    );
    // The longer path first.
    let b = conf.find("server_name b.example.com").unwrap();
    assert!(conf[b..].find("location = /api").unwrap() < conf[b..].find("location / ").unwrap());
    let scaled = two(&["10.0.1.1", "10.0.1.2"]);
    assert!(config(&scaled).contains("    server 10.0.1.1:9090;\n    server 10.0.1.2:9090;\n"));
    assert_ne!(
        pod_hash(&one),
        pod_hash(&scaled),
        "a new endpoint rolls the proxy"
    );
    let none = two(&[]);
    assert!(
        config(&none).contains(
            "upstream svc-b-web {\n    # no ready endpoints\n    server 127.0.0.1:9 down;"
        )
    );
}

#[test]
fn another_class_gets_nothing() {
    for class in [json!("nginx"), Value::Null] {
        let out = with_related(
            Fixture::parent_yaml(SAMPLE)
                .with_parent(|p| p["spec"]["ingressClassName"] = class.clone()),
            backends(),
        )
        .reconcile::<IngressPlugin>()
        .unwrap();
        assert!(out.children().is_empty(), "{class}: no children");
        assert!(out.status_json().is_none(), "{class}: no status write");
    }
}

#[test]
fn tls_hosts_listen_on_443_with_their_secret() {
    let out = with_related(
        Fixture::parent_yaml(SAMPLE).with_parent(|p| {
            p["spec"]["tls"] = json!([{"hosts": ["web.example.com"], "secretName": "web-tls"}])
        }),
        backends(),
    )
    .reconcile::<IngressPlugin>()
    .unwrap();
    let conf = config(&out);
    assert!(
        conf.contains("listen 443 ssl;\n    ssl_certificate /etc/nginx/tls/web-tls/tls.crt;"),
        "{conf}"
    );
    let d: Deployment = out.child_named("ingress-sample-proxy").unwrap();
    let pod = d.spec.unwrap().template.spec.unwrap();
    let secret = pod.volumes.unwrap()[1].secret.clone().unwrap();
    assert_eq!(secret.secret_name.as_deref(), Some("web-tls"));
}

#[test]
fn what_would_break_the_configuration_is_an_invalid_spec() {
    let invalid = |edit: &dyn Fn(&mut Value)| match with_related(
        Fixture::parent_yaml(SAMPLE).with_parent(|p| edit(p)),
        backends(),
    )
    .reconcile::<IngressPlugin>()
    {
        Err(Error::InvalidSpec(m)) => m,
        other => panic!("expected InvalidSpec, got {other:?}"),
    };
    assert!(
        invalid(&|p| p["spec"]["rules"][0]["host"] = json!("a.com; evil")).contains("host name")
    );
    assert!(
        invalid(&|p| p["spec"]["rules"][0]["http"]["paths"][0]["path"] = json!("/x { }"))
            .contains("path")
    );
    assert!(invalid(&|p| p["spec"]["tls"] = json!([{"secretName": "A;b"}])).contains("TLS secret"));
    assert!(
        invalid(&|p| p["spec"]["rules"][0]["http"]["paths"][0]["backend"] =
            json!({"resource": {"kind": "Bucket", "name": "b"}}))
        .contains("service backend")
    );
}

#[test]
fn without_an_address_the_published_one_is_withdrawn() {
    let mut objects = backends();
    objects.remove(0);
    let out = with_related(Fixture::parent_yaml(SAMPLE), objects)
        .reconcile::<IngressPlugin>()
        .unwrap();
    assert_eq!(out.status_json().unwrap(), &json!({"loadBalancer": {}}));
}

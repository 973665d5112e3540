//! Fixture tests: the real reconcile, natively, through the SDK's JSON path.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use kuwa_sdk::Error;
use kuwa_sdk::testing::Fixture;
use serde_json::json;

use super::*;

const SAMPLE: &str = include_str!("../../../deploy/samples/kuwa.dev_v1alpha1_webserver.yaml");

fn pod_hash(d: &Deployment) -> String {
    d.spec
        .as_ref()
        .unwrap()
        .template
        .metadata
        .as_ref()
        .unwrap()
        .annotations
        .as_ref()
        .unwrap()[CONTENT_HASH_ANNOTATION]
        .clone()
}

#[test]
fn sample_yields_config_map_deployment_and_service() {
    let out = Fixture::parent_yaml(SAMPLE)
        .reconcile::<WebServerPlugin>()
        .unwrap();
    assert_eq!(out.children().len(), 3);
    let cm: ConfigMap = out.child_named("webserver-sample-content").unwrap();
    assert_eq!(cm.data.unwrap()["index.html"], "hello, ossummit!");
    assert_eq!(cm.metadata.namespace.as_deref(), Some("default"));
    let d: Deployment = out.child_named("webserver-sample").unwrap();
    let spec = d.spec.as_ref().unwrap();
    assert_eq!(spec.replicas, Some(3));
    let pod = spec.template.spec.as_ref().unwrap();
    assert_eq!(pod.containers[0].image.as_deref(), Some("nginx:1.27"));
    assert_eq!(
        pod.volumes.as_ref().unwrap()[0]
            .config_map
            .as_ref()
            .unwrap()
            .name,
        "webserver-sample-content"
    );
    assert_eq!(pod_hash(&d), kuwa_sdk::content_hash(b"hello, ossummit!"));
    let svc: Service = out.child_named("webserver-sample").unwrap();
    assert_eq!(svc.spec.unwrap().ports.unwrap()[0].port, 80);
}

#[test]
fn content_change_changes_config_map_and_pod_hash() {
    let a = Fixture::parent_yaml(SAMPLE)
        .reconcile::<WebServerPlugin>()
        .unwrap();
    let b = Fixture::parent_yaml(SAMPLE)
        .with_parent(|p| p["spec"]["content"] = json!("goodbye"))
        .reconcile::<WebServerPlugin>()
        .unwrap();
    let (da, db): (Deployment, Deployment) = (
        a.child_named("webserver-sample").unwrap(),
        b.child_named("webserver-sample").unwrap(),
    );
    assert_ne!(pod_hash(&da), pod_hash(&db));
    let cm: ConfigMap = b.child_named("webserver-sample-content").unwrap();
    assert_eq!(cm.data.unwrap()["index.html"], "goodbye");
}

#[test]
fn negative_replicas_is_an_invalid_spec() {
    let err = Fixture::parent_yaml(SAMPLE)
        .with_parent(|p| p["spec"]["replicas"] = json!(-1))
        .reconcile::<WebServerPlugin>()
        .unwrap_err();
    assert!(
        matches!(&err, Error::InvalidSpec(m) if m.contains("replicas")),
        "{err}"
    );
}

#[test]
fn content_over_the_config_map_limit_is_an_invalid_spec() {
    let big = "x".repeat(CONFIG_MAP_MAX_BYTES);
    let err = Fixture::parent_yaml(SAMPLE)
        .with_parent(|p| p["spec"]["content"] = json!(big))
        .reconcile::<WebServerPlugin>()
        .unwrap_err();
    assert!(
        matches!(&err, Error::InvalidSpec(m) if m.contains("ConfigMap")),
        "{err}"
    );
}

#[test]
fn a_spec_of_the_wrong_shape_is_an_invalid_spec() {
    let err = Fixture::parent_yaml(SAMPLE)
        .with_parent(|p| p["spec"]["software"]["name"] = json!("apache"))
        .reconcile::<WebServerPlugin>()
        .unwrap_err();
    assert!(matches!(err, Error::InvalidSpec(_)), "{err}");
}

fn ready_deployment(ready: i32) -> serde_json::Value {
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "webserver-sample", "namespace": "default", "generation": 2},
        "spec": {"replicas": 3, "selector": {}, "template": {}},
        "status": {"observedGeneration": 2, "replicas": 3, "updatedReplicas": 3, "readyReplicas": ready}
    })
}

fn condition<'a>(s: &'a WebServerStatus, t: &str) -> &'a Condition {
    s.conditions.iter().find(|c| c.type_ == t).unwrap()
}

#[test]
fn status_reports_available_when_all_replicas_are_ready() {
    let out = Fixture::parent_yaml(SAMPLE)
        .child(ready_deployment(3))
        .reconcile::<WebServerPlugin>()
        .unwrap();
    let status: WebServerStatus =
        serde_json::from_value(out.status_json().unwrap().clone()).unwrap();
    assert_eq!(status.ready_replicas, 3);
    assert_eq!(status.observed_generation, Some(1));
    assert_eq!(condition(&status, "Available").status, "True");
    assert_eq!(condition(&status, "Progressing").status, "False");
    assert_eq!(condition(&status, "Degraded").status, "False");

    let partial = Fixture::parent_yaml(SAMPLE)
        .child(ready_deployment(1))
        .reconcile::<WebServerPlugin>()
        .unwrap();
    let status: WebServerStatus =
        serde_json::from_value(partial.status_json().unwrap().clone()).unwrap();
    assert_eq!(status.ready_replicas, 1);
    assert_eq!(condition(&status, "Available").status, "False");
}

#[test]
fn unchanged_world_gives_identical_status() {
    let first = Fixture::parent_yaml(SAMPLE)
        .child(ready_deployment(3))
        .reconcile::<WebServerPlugin>()
        .unwrap();
    let status = first.status_json().unwrap().clone();
    // Later, with the status written back, the same world must give the same
    // status: no new transition times, so the host writes nothing.
    let again = Fixture::parent_yaml(SAMPLE)
        .with_parent(|p| p["status"] = status.clone())
        .child(ready_deployment(3))
        .at("2026-01-01T01:00:00Z")
        .reconcile::<WebServerPlugin>()
        .unwrap();
    assert_eq!(again.status_json().unwrap(), &status);
}

#[test]
fn describe_declares_children_and_carries_the_crd() {
    let d = WebServerPlugin::describe();
    assert_eq!(d.name, "webserver");
    assert_eq!(d.parent.kind, "WebServer");
    let kinds: Vec<_> = d.children.iter().map(|g| g.kind.as_str()).collect();
    assert_eq!(kinds, ["ConfigMap", "Deployment", "Service"]);
    let crd = d.crd.unwrap();
    assert_eq!(crd.metadata.name.as_deref(), Some("webservers.kuwa.dev"));
    let schema = serde_json::to_value(&crd.spec.versions[0].schema).unwrap();
    let minimum =
        &schema["openAPIV3Schema"]["properties"]["spec"]["properties"]["replicas"]["minimum"];
    assert_eq!(minimum.as_f64(), Some(0.0), "{minimum}");
}

//! Fixture tests: the real reconcile, natively, through the SDK's JSON path.

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use kuwa_sdk::Error;
use kuwa_sdk::testing::Fixture;
use serde_json::{Value, json};

use super::*;

const SAMPLE: &str = include_str!("../../../deploy/samples/kuwa.dev_v1alpha1_memcached.yaml");
const NAME: &str = "memcached-sample";

/// Backend Pod `memcached-sample-<ordinal>` as the API server would show it.
fn backend_pod(ordinal: u32, ready: bool) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": format!("{NAME}-{ordinal}"), "namespace": "default",
            "labels": {"apps.kubernetes.io/pod-index": ordinal.to_string()},
            "ownerReferences": [{
                "apiVersion": "apps/v1", "kind": "StatefulSet", "name": NAME,
                "uid": "00000000-0000-0000-0000-0000000000aa", "controller": true
            }]
        },
        "spec": {"containers": [{"name": "memcached"}]},
        "status": {
            "phase": "Running",
            "podIP": format!("10.244.0.{}", 10 + ordinal),
            "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]
        }
    })
}

/// The sample with backend Pods `0..n`, `unready` among them not ready.
/// Pods are added in reverse order to prove the output is sorted.
fn fixture_with_pods(n: u32, unready: &[u32]) -> Fixture {
    (0..n).rev().fold(Fixture::parent_yaml(SAMPLE), |f, i| {
        f.related(backend_pod(i, !unready.contains(&i)))
    })
}

fn servers(out: &Desired<MemcachedStatus>) -> Vec<String> {
    let cm: ConfigMap = out.child_named(&format!("{NAME}-proxy")).unwrap();
    let config: Value = serde_json::from_str(&cm.data.unwrap()[CONFIG_KEY]).unwrap();
    serde_json::from_value(config["pools"]["backends"]["servers"].clone()).unwrap()
}

fn config(out: &Desired<MemcachedStatus>) -> Value {
    let cm: ConfigMap = out.child_named(&format!("{NAME}-proxy")).unwrap();
    serde_json::from_str(&cm.data.unwrap()[CONFIG_KEY]).unwrap()
}

fn config_text(out: &Desired<MemcachedStatus>) -> String {
    let cm: ConfigMap = out.child_named(&format!("{NAME}-proxy")).unwrap();
    cm.data.unwrap()[CONFIG_KEY].clone()
}

fn pod_hash(out: &Desired<MemcachedStatus>) -> String {
    let d: Deployment = out.child_named(&format!("{NAME}-proxy")).unwrap();
    d.spec
        .unwrap()
        .template
        .metadata
        .unwrap()
        .annotations
        .unwrap()[CONFIG_HASH_ANNOTATION]
        .clone()
}

fn status_of(out: &Desired<MemcachedStatus>) -> MemcachedStatus {
    serde_json::from_value(out.status_json().unwrap().clone()).unwrap()
}

fn condition<'a>(s: &'a MemcachedStatus, t: &str) -> &'a Condition {
    s.conditions.iter().find(|c| c.type_ == t).unwrap()
}

fn ready_proxy(out: &Desired<MemcachedStatus>) -> Value {
    let hash = pod_hash(out);
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": format!("{NAME}-proxy"), "namespace": "default", "generation": 1},
        "spec": {
            "replicas": 1, "selector": {},
            "template": {"metadata": {"annotations": {CONFIG_HASH_ANNOTATION: hash}}}
        },
        "status": {"observedGeneration": 1, "replicas": 1, "updatedReplicas": 1, "readyReplicas": 1}
    })
}

#[test]
fn sample_yields_backends_config_proxy_and_services() {
    let out = Fixture::parent_yaml(SAMPLE)
        .reconcile::<MemcachedPlugin>()
        .unwrap();
    assert_eq!(out.children().len(), 5);

    let sts: StatefulSet = out.child_named(NAME).unwrap();
    let spec = sts.spec.unwrap();
    assert_eq!(spec.replicas, Some(3));
    assert_eq!(
        spec.service_name.as_deref(),
        Some("memcached-sample-backends")
    );
    let pod = spec.template.spec.unwrap();
    let c = &pod.containers[0];
    assert_eq!(c.image.as_deref(), Some("memcached:1.6"));
    assert_eq!(c.args.as_deref().unwrap(), ["-m", "64", "-p", "11211"]);
    assert_eq!(c.ports.as_ref().unwrap()[0].container_port, 11211);
    let res = c.resources.as_ref().unwrap();
    assert_eq!(res.requests.as_ref().unwrap()["memory"].0, "80Mi");
    assert_eq!(res.limits.as_ref().unwrap()["memory"].0, "80Mi");

    let headless: Service = out.child_named("memcached-sample-backends").unwrap();
    let hs = headless.spec.unwrap();
    assert_eq!(hs.cluster_ip.as_deref(), Some("None"));
    assert_eq!(hs.publish_not_ready_addresses, Some(true));
    assert_eq!(hs.selector.as_ref(), spec.selector.match_labels.as_ref());

    let proxy: Deployment = out.child_named("memcached-sample-proxy").unwrap();
    let ps = proxy.spec.unwrap();
    assert_eq!(ps.replicas, Some(1));
    let pp = ps.template.spec.unwrap();
    assert_eq!(
        pp.containers[0].ports.as_ref().unwrap()[0].container_port,
        5000
    );
    assert_eq!(
        pp.volumes.unwrap()[0].config_map.as_ref().unwrap().name,
        "memcached-sample-proxy"
    );

    let client: Service = out.child_named(NAME).unwrap();
    let cs = client.spec.unwrap();
    assert_eq!(cs.ports.as_ref().unwrap()[0].port, 11211);
    assert_eq!(cs.selector, ps.selector.match_labels);
    assert_ne!(
        cs.selector, spec.selector.match_labels,
        "clients reach the proxy, not the backends"
    );

    // No Pods yet: the config lists zero servers, and the hash is of that config.
    assert!(servers(&out).is_empty());
    assert_eq!(config(&out)["route"], "PoolRoute|backends");
    assert_eq!(
        pod_hash(&out),
        kuwa_sdk::content_hash(config_text(&out).as_bytes())
    );
}

#[test]
fn config_lists_exactly_the_ready_pods_in_ordinal_order() {
    let all = fixture_with_pods(3, &[])
        .reconcile::<MemcachedPlugin>()
        .unwrap();
    assert_eq!(
        servers(&all),
        [
            "10.244.0.10:11211",
            "10.244.0.11:11211",
            "10.244.0.12:11211"
        ]
    );
    let status = status_of(&all);
    assert_eq!(status.ready_backends, 3);
    assert_eq!(status.endpoints, servers(&all));

    let two = fixture_with_pods(3, &[1])
        .reconcile::<MemcachedPlugin>()
        .unwrap();
    assert_eq!(servers(&two), ["10.244.0.10:11211", "10.244.0.12:11211"]);
    assert_eq!(status_of(&two).ready_backends, 2);
}

#[test]
fn config_hash_changes_iff_the_config_changes() {
    let a = fixture_with_pods(3, &[])
        .reconcile::<MemcachedPlugin>()
        .unwrap();
    let same = fixture_with_pods(3, &[])
        .at("2026-01-02T00:00:00Z")
        .reconcile::<MemcachedPlugin>()
        .unwrap();
    assert_eq!(config_text(&a), config_text(&same));
    assert_eq!(pod_hash(&a), pod_hash(&same));
    assert_eq!(
        a.children(),
        same.children(),
        "an unchanged world gives byte-identical children"
    );

    let unready = fixture_with_pods(3, &[2])
        .reconcile::<MemcachedPlugin>()
        .unwrap();
    assert_ne!(config_text(&a), config_text(&unready));
    assert_ne!(pod_hash(&a), pod_hash(&unready));

    // A spec change that does not touch the config (proxy replicas) keeps the hash.
    let more_proxies = fixture_with_pods(3, &[])
        .with_parent(|p| p["spec"]["proxy"]["replicas"] = json!(2))
        .reconcile::<MemcachedPlugin>()
        .unwrap();
    assert_eq!(pod_hash(&a), pod_hash(&more_proxies));
}

#[test]
fn scaling_down_drops_the_backends_above_the_new_count() {
    let out = fixture_with_pods(3, &[])
        .with_parent(|p| p["spec"]["replicas"] = json!(2))
        .reconcile::<MemcachedPlugin>()
        .unwrap();
    assert_eq!(servers(&out), ["10.244.0.10:11211", "10.244.0.11:11211"]);
    let sts: StatefulSet = out.child_named(NAME).unwrap();
    assert_eq!(sts.spec.unwrap().replicas, Some(2));
}

#[test]
fn topology_switch_changes_the_route_and_rolls_the_proxy() {
    let sharded = fixture_with_pods(3, &[])
        .reconcile::<MemcachedPlugin>()
        .unwrap();
    let replicated = fixture_with_pods(3, &[])
        .with_parent(|p| p["spec"]["topology"] = json!("replicated"))
        .reconcile::<MemcachedPlugin>()
        .unwrap();
    assert_eq!(servers(&sharded), servers(&replicated));
    let route = &config(&replicated)["route"];
    assert_eq!(route["type"], "OperationSelectorRoute");
    assert_eq!(
        route["operation_policies"]["set"],
        "AllSyncRoute|Pool|backends"
    );
    assert_eq!(
        route["operation_policies"]["get"],
        "LatestRoute|Pool|backends"
    );
    assert_ne!(pod_hash(&sharded), pod_hash(&replicated));
}

#[test]
fn pods_of_other_owners_and_terminating_pods_are_ignored() {
    let mut terminating = backend_pod(0, true);
    terminating["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
    let mut stranger = backend_pod(1, true);
    stranger["metadata"]["ownerReferences"][0]["name"] = json!("someone-else");
    let out = Fixture::parent_yaml(SAMPLE)
        .related(terminating)
        .related(stranger)
        .related(backend_pod(2, true))
        .reconcile::<MemcachedPlugin>()
        .unwrap();
    assert_eq!(servers(&out), ["10.244.0.12:11211"]);
}

#[test]
fn status_is_available_with_ready_backends_and_proxy() {
    let first = fixture_with_pods(3, &[])
        .reconcile::<MemcachedPlugin>()
        .unwrap();
    let status = status_of(&first);
    assert_eq!(condition(&status, "Available").status, "False");
    assert_eq!(condition(&status, "Available").reason, "ProxyNotReady");

    let out = fixture_with_pods(3, &[])
        .child(ready_proxy(&first))
        .reconcile::<MemcachedPlugin>()
        .unwrap();
    let status = status_of(&out);
    assert_eq!(status.observed_generation, Some(1));
    assert_eq!(condition(&status, "Available").status, "True");
    assert_eq!(condition(&status, "Progressing").status, "False");
    assert_eq!(condition(&status, "Degraded").status, "False");

    // One backend lost: still available, progressing, and the proxy must roll.
    let degraded = fixture_with_pods(3, &[0])
        .child(ready_proxy(&first))
        .reconcile::<MemcachedPlugin>()
        .unwrap();
    let status = status_of(&degraded);
    assert_eq!(status.ready_backends, 2);
    assert_eq!(condition(&status, "Available").status, "True");
    assert_eq!(condition(&status, "Progressing").status, "True");
    assert_eq!(
        condition(&status, "Progressing").message,
        "2/3 backends ready"
    );

    // No backend ready: not available, and the config lists zero servers.
    let none = fixture_with_pods(3, &[0, 1, 2])
        .child(ready_proxy(&first))
        .reconcile::<MemcachedPlugin>()
        .unwrap();
    let status = status_of(&none);
    assert_eq!(condition(&status, "Available").reason, "NoReadyBackends");
    assert!(servers(&none).is_empty());
}

#[test]
fn proxy_running_an_old_config_is_still_progressing() {
    let first = fixture_with_pods(3, &[])
        .reconcile::<MemcachedPlugin>()
        .unwrap();
    let mut old = ready_proxy(&first);
    old["spec"]["template"]["metadata"]["annotations"][CONFIG_HASH_ANNOTATION] =
        json!("0000000000000000");
    let out = fixture_with_pods(3, &[])
        .child(old)
        .reconcile::<MemcachedPlugin>()
        .unwrap();
    let status = status_of(&out);
    assert_eq!(condition(&status, "Available").status, "True");
    assert_eq!(condition(&status, "Progressing").reason, "ProxyRollingOut");
}

#[test]
fn unchanged_world_gives_identical_status() {
    let first = fixture_with_pods(3, &[1])
        .reconcile::<MemcachedPlugin>()
        .unwrap();
    let proxy = ready_proxy(&first);
    let first = fixture_with_pods(3, &[1])
        .child(proxy.clone())
        .reconcile::<MemcachedPlugin>()
        .unwrap();
    let status = first.status_json().unwrap().clone();
    let again = fixture_with_pods(3, &[1])
        .with_parent(|p| p["status"] = status.clone())
        .child(proxy)
        .at("2026-01-01T01:00:00Z")
        .reconcile::<MemcachedPlugin>()
        .unwrap();
    assert_eq!(again.status_json().unwrap(), &status);
    assert_eq!(again.children(), first.children());
}

#[test]
fn condition_times_move_only_on_transitions() {
    let first = fixture_with_pods(3, &[0, 1, 2])
        .reconcile::<MemcachedPlugin>()
        .unwrap();
    let status = first.status_json().unwrap().clone();
    let later = "2026-01-01T01:00:00Z";
    let out = fixture_with_pods(3, &[])
        .with_parent(|p| p["status"] = status.clone())
        .child(ready_proxy(&first))
        .at(later)
        .reconcile::<MemcachedPlugin>()
        .unwrap();
    let new = status_of(&out);
    let available = condition(&new, "Available");
    assert_eq!(available.status, "True");
    assert_eq!(available.last_transition_time.0.to_string(), later);
    let degraded = condition(&new, "Degraded");
    assert_eq!(
        degraded.last_transition_time.0.to_string(),
        kuwa_sdk::testing::FIXTURE_NOW
    );
}

fn invalid(edit: impl FnOnce(&mut Value)) -> String {
    match Fixture::parent_yaml(SAMPLE)
        .with_parent(edit)
        .reconcile::<MemcachedPlugin>()
    {
        Err(Error::InvalidSpec(m)) => m,
        other => panic!("expected an invalid spec, got {other:?}"),
    }
}

#[test]
fn specs_that_can_never_work_are_invalid() {
    assert!(invalid(|p| p["spec"]["replicas"] = json!(0)).contains("spec.replicas"));
    assert!(invalid(|p| p["spec"]["memoryMB"] = json!(8)).contains("spec.memoryMB"));
    assert!(invalid(|p| p["spec"]["memoryMB"] = json!(2_000_000)).contains("spec.memoryMB"));
    assert!(invalid(|p| p["spec"]["proxy"]["replicas"] = json!(0)).contains("spec.proxy.replicas"));
    assert!(invalid(|p| p["spec"]["proxy"]["image"] = json!("")).contains("spec.proxy.image"));
    assert!(invalid(|p| p["spec"]["topology"] = json!("mirrored")).contains("schema"));
    assert!(invalid(|p| p["metadata"]["name"] = json!("x".repeat(53))).contains("at most 52"));
    assert!(invalid(|p| p["metadata"]["name"] = json!("my.cache")).contains("my.cache"));
}

#[test]
fn defaults_fill_proxy_and_topology() {
    let out = Fixture::parent_yaml(SAMPLE)
        .with_parent(|p| {
            let spec = p["spec"].as_object_mut().unwrap();
            spec.remove("proxy");
            spec.remove("topology");
        })
        .reconcile::<MemcachedPlugin>()
        .unwrap();
    let proxy: Deployment = out.child_named("memcached-sample-proxy").unwrap();
    let spec = proxy.spec.unwrap();
    assert_eq!(spec.replicas, Some(1));
    assert_eq!(
        spec.template.spec.unwrap().containers[0].image.as_deref(),
        Some(DEFAULT_PROXY_IMAGE)
    );
    assert_eq!(config(&out)["route"], "PoolRoute|backends");
}

#[test]
fn describe_declares_children_pods_and_the_crd() {
    let d = MemcachedPlugin::describe();
    assert_eq!(d.name, "memcached");
    assert_eq!(d.parent.kind, "Memcached");
    assert_eq!(d.parent.api_version(), "kuwa.dev/v1alpha1");
    let kinds: Vec<_> = d.children.iter().map(|g| g.kind.as_str()).collect();
    assert_eq!(kinds, ["StatefulSet", "Service", "ConfigMap", "Deployment"]);
    assert_eq!(d.related.len(), 1);
    assert_eq!(d.related[0].0.kind, "Pod");
    assert_eq!(d.related[0].1, RelatedMapping::OwnedByChild);

    let crd = d.crd.unwrap();
    assert_eq!(crd.metadata.name.as_deref(), Some("memcacheds.kuwa.dev"));
    let version = &crd.spec.versions[0];
    let schema = serde_json::to_value(&version.schema).unwrap();
    let spec = &schema["openAPIV3Schema"]["properties"]["spec"]["properties"];
    assert_eq!(spec["replicas"]["minimum"].as_f64(), Some(1.0));
    assert_eq!(spec["memoryMB"]["minimum"].as_f64(), Some(16.0));
    assert_eq!(spec["topology"]["enum"], json!(["replicated", "sharded"]));
    assert_eq!(
        spec["proxy"]["properties"]["replicas"]["minimum"].as_f64(),
        Some(1.0)
    );
    let columns: Vec<_> = version
        .additional_printer_columns
        .iter()
        .flatten()
        .map(|c| c.name.as_str())
        .collect();
    assert!(
        columns.contains(&"Ready") && columns.contains(&"Topology"),
        "{columns:?}"
    );
}

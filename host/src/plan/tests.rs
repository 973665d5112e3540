//! Unit tests of the plan step: no cluster, just observed state in and
//! writes out.

use serde_json::json;

use super::*;
use crate::validate::Child;

const UID: &str = "parent-uid";

fn info() -> PluginInfo {
    let mut i = PluginInfo::placeholder();
    i.name = Arc::from("web");
    i.version = "1.0.0".into();
    i.parent = Gvk::new("kuwa.dev", "v1alpha1", "WebServer");
    i.children = vec![Gvk::new("", "v1", "ConfigMap")];
    i
}

fn parent(status: Value) -> DynamicObject {
    serde_json::from_value(json!({
        "apiVersion": "kuwa.dev/v1alpha1", "kind": "WebServer",
        "metadata": {"name": "site", "namespace": "ns", "uid": UID, "generation": 2},
        "spec": {},
        "status": status,
    }))
    .unwrap()
}

fn cm(name: &str, data: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": data})
}

/// What the host would have cached after applying `desired` for the parent.
fn applied(desired: &Value, info: &PluginInfo, parent: &DynamicObject) -> Arc<DynamicObject> {
    let mut body = prepare_child(
        desired.clone(),
        Some("ns"),
        &owner_reference(&info.parent, parent),
        info,
    );
    body["metadata"]["uid"] = json!(format!("uid-{}", desired["metadata"]["name"]));
    body["metadata"]["managedFields"] = json!([{"manager": "kuwa/web", "operation": "Apply"}]);
    Arc::new(serde_json::from_value(body).unwrap())
}

fn output(children: &[Value], status: Option<Value>) -> Output {
    Output {
        children: children
            .iter()
            .map(|c| Child {
                gvk: Gvk::of_object(c).unwrap(),
                name: c["metadata"]["name"].as_str().unwrap().into(),
                object: c.clone(),
            })
            .collect(),
        status,
        events: Vec::new(),
        requeue_after: None,
    }
}

fn plan_with(
    info: &PluginInfo,
    parent: &DynamicObject,
    children: &[Arc<DynamicObject>],
    cached: &[Arc<DynamicObject>],
    out: Output,
) -> Result<Plan, PlanError> {
    // As the caches hold them.
    let hold = |objects: &[Arc<DynamicObject>]| -> Vec<Arc<CachedObject>> {
        objects
            .iter()
            .map(|o| Arc::new(CachedObject::new((**o).clone())))
            .collect()
    };
    let (children, cached) = (hold(children), hold(cached));
    let children = &children[..];
    let lookup = |gvk: &Gvk, ns: Option<&str>, name: &str| {
        cached
            .iter()
            .find(|c| {
                Gvk::of_object(&c.value()).as_ref() == Some(gvk)
                    && c.namespace().as_deref() == ns
                    && c.name_any() == name
            })
            .cloned()
    };
    let grant = Grant::default();
    let seen = Observed {
        info,
        grant: &grant,
        parent,
        children,
        cached: &lookup,
        namespaced: &|_| true,
        now: "2026-12-01T00:00:00Z",
    };
    reconcile(&seen, out)
}

#[test]
fn quantities_compare_by_value() {
    assert!(is_subset(&json!("1000m"), &json!("1")));
    assert!(is_subset(&json!("1Gi"), &json!("1024Mi")));
    assert!(is_subset(&json!("0.5"), &json!("500m")));
    assert!(is_subset(&json!("2e3"), &json!("2k")));
    assert!(!is_subset(&json!("1"), &json!("2")));
    assert!(!is_subset(&json!("1Gi"), &json!("1G")));
    // Strings that are not quantities still compare as text.
    assert!(!is_subset(&json!("nginx:1.27"), &json!("nginx:1.28")));
    assert!(!is_subset(&json!("m"), &json!("")));
    assert!(!is_subset(&json!("1.2.3"), &json!("1.2")));
}

#[test]
fn a_converged_world_costs_no_writes() {
    let info = info();
    // The status as the host wrote it last time (with its condition).
    let written = status_write(
        &parent(Value::Null),
        Some(&json!({"ready": true, "conditions": []})),
        &reconciled(),
        "t0",
    )
    .unwrap();
    let parent = parent(written);
    let want = cm("site-content", json!({"k": "v"}));
    let child = applied(&want, &info, &parent);
    let plan = plan_with(
        &info,
        &parent,
        std::slice::from_ref(&child),
        std::slice::from_ref(&child),
        output(&[want], Some(json!({"ready": true, "conditions": []}))),
    )
    .unwrap();
    assert_eq!(plan.writes, [], "{:?}", plan.writes);
}

#[test]
fn missing_changed_and_drifted_children_are_applied_with_their_reason() {
    let info = info();
    let parent = parent(json!({}));
    let want = cm("a", json!({"k": "v"}));
    let plan = plan_with(
        &info,
        &parent,
        &[],
        &[],
        output(std::slice::from_ref(&want), None),
    )
    .unwrap();
    assert!(matches!(
        &plan.writes[..],
        [Write::Apply {
            reason: ApplyReason::Missing,
            ..
        }]
    ));
    let old = applied(&cm("a", json!({"k": "old"})), &info, &parent);
    let plan = plan_with(
        &info,
        &parent,
        std::slice::from_ref(&old),
        std::slice::from_ref(&old),
        output(std::slice::from_ref(&want), None),
    )
    .unwrap();
    assert!(matches!(
        &plan.writes[..],
        [Write::Apply {
            reason: ApplyReason::Changed,
            ..
        }]
    ));
    let mut drifted = (*applied(&want, &info, &parent)).clone();
    drifted.data["data"]["k"] = json!("edited by hand");
    let drifted = Arc::new(drifted);
    let plan = plan_with(
        &info,
        &parent,
        std::slice::from_ref(&drifted),
        std::slice::from_ref(&drifted),
        output(&[want], None),
    )
    .unwrap();
    assert!(matches!(
        &plan.writes[..],
        [Write::Apply {
            reason: ApplyReason::Drift,
            ..
        }]
    ));
}

#[test]
fn an_existing_object_not_controlled_by_the_parent_is_never_adopted() {
    let info = info();
    let parent = parent(json!({}));
    // Someone else's ConfigMap, no owner at all.
    let victim: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "victim", "namespace": "ns", "uid": "v"}, "data": {"owner": "someone"}
    }))
    .unwrap();
    let err = plan_with(
        &info,
        &parent,
        &[],
        &[Arc::new(victim.clone())],
        output(&[cm("victim", json!({})), cm("mine", json!({}))], None),
    )
    .unwrap_err();
    assert!(
        matches!(err, PlanError::Conflict { ref name, .. } if name == "victim"),
        "{err}"
    );
    // Controlled by another parent: a conflict naming it.
    let mut other = victim;
    other.metadata.owner_references = Some(vec![
        k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
            api_version: "kuwa.dev/v1alpha1".into(),
            kind: "WebServer".into(),
            name: "other".into(),
            uid: "other-uid".into(),
            controller: Some(true),
            ..Default::default()
        },
    ]);
    let err = plan_with(
        &info,
        &parent,
        &[],
        &[Arc::new(other)],
        output(&[cm("victim", json!({}))], None),
    )
    .unwrap_err();
    assert!(err.to_string().contains("WebServer \"other\""), "{err}");
}

#[test]
fn only_children_the_plugin_applied_for_this_parent_are_deleted() {
    let info = info();
    let parent = parent(json!({}));
    let ours = applied(&cm("old", json!({})), &info, &parent);
    let plan = plan_with(
        &info,
        &parent,
        std::slice::from_ref(&ours),
        &[],
        output(&[], None),
    )
    .unwrap();
    assert!(
        matches!(&plan.writes[..], [Write::Delete { name, .. }] if name == "old"),
        "{:?}",
        plan.writes
    );
    // The same object, but last applied by someone else's field manager,
    // without the plugin's label, or in another namespace: left alone.
    let mut by_other = (*ours).clone();
    by_other.metadata.managed_fields = Some(vec![
        k8s_openapi::apimachinery::pkg::apis::meta::v1::ManagedFieldsEntry {
            manager: Some("kubectl".into()),
            operation: Some("Apply".into()),
            ..Default::default()
        },
    ]);
    let mut unlabelled = (*ours).clone();
    unlabelled.labels_mut().remove(PLUGIN_LABEL);
    let mut elsewhere = (*ours).clone();
    elsewhere.metadata.namespace = Some("kube-system".into());
    for child in [by_other, unlabelled, elsewhere] {
        let plan = plan_with(&info, &parent, &[Arc::new(child)], &[], output(&[], None)).unwrap();
        assert_eq!(plan.writes, [], "{:?}", plan.writes);
    }
}

#[test]
fn a_version_without_a_finalizer_releases_the_hosts() {
    let mut info = info();
    let mut held = parent(json!({}));
    held.metadata.finalizers = Some(vec![info.finalizer_name()]);
    let plan = plan_with(&info, &held, &[], &[], output(&[], None)).unwrap();
    assert_eq!(plan.writes, [Write::Finalizer(false)]);
    info.finalizer = true;
    let plan = plan_with(&info, &held, &[], &[], output(&[], None)).unwrap();
    assert_eq!(plan.writes, []);
    let plan = plan_with(&info, &parent(json!({})), &[], &[], output(&[], None)).unwrap();
    assert_eq!(plan.writes, [Write::Finalizer(true)]);
}

fn reconciled() -> Health {
    Health::Reconciled("web@1.0.0".into())
}

#[test]
fn status_fields_the_plugin_stops_setting_are_removed() {
    let p = parent(json!({"ready": 1, "legacy": "x"}));
    let status = status_write(&p, Some(&json!({"ready": 1})), &reconciled(), "t").unwrap();
    assert_eq!(status["ready"], 1);
    assert!(status.get("legacy").is_none(), "{status}");
    // Once written, the same desired status writes nothing.
    let p = parent(status.clone());
    assert_eq!(
        status_write(&p, Some(&json!({"ready": 1})), &reconciled(), "t2"),
        None
    );
    // No status from the plugin, and the host's condition already says it.
    assert_eq!(status_write(&p, None, &reconciled(), "t"), None);
    // No status from the plugin and nothing marked: nothing to say.
    assert_eq!(
        status_write(&parent(Value::Null), None, &reconciled(), "t"),
        None
    );
}

#[test]
fn the_plugin_version_rides_in_the_hosts_condition() {
    let fresh = parent(Value::Null);
    // A status without conditions gets none (its schema may lack them).
    let plain = status_write(&fresh, Some(&json!({"seen": []})), &reconciled(), "t").unwrap();
    assert_eq!(plain, json!({"seen": []}));
    let status = status_write(
        &fresh,
        Some(&json!({"seen": [], "conditions": []})),
        &reconciled(),
        "t",
    )
    .unwrap();
    let c = condition(&status, DEGRADED).unwrap();
    assert_eq!(
        (
            &c["status"],
            &c["reason"],
            &c["message"],
            &c["observedGeneration"]
        ),
        (
            &json!("False"),
            &json!("AsExpected"),
            &json!("reconciled by web@1.0.0"),
            &json!(2)
        )
    );
    // A new version with the same desired status: the one status write says
    // so (there is no write of its own for the version).
    let p = parent(status.clone());
    let v2 = status_write(
        &p,
        Some(&json!({"seen": [], "conditions": []})),
        &Health::Reconciled("web@2.0.0".into()),
        "t2",
    )
    .unwrap();
    let c = condition(&v2, DEGRADED).unwrap();
    assert_eq!(c["message"], "reconciled by web@2.0.0");
    assert_eq!(c["lastTransitionTime"], "t", "no flip: the time is kept");
}

#[test]
fn degraded_is_the_hosts_and_the_host_clears_it() {
    let p = parent(json!({"ready": 0}));
    let plan = degraded(&p, "InvalidOutput", "bad child", "t1");
    let Write::Status(status) = &plan.writes[0] else {
        panic!("{:?}", plan.writes)
    };
    assert!(matches!(&plan.writes[1], Write::Event(e) if e.reason == "InvalidOutput" && e.warning));
    let c = condition(status, DEGRADED).unwrap();
    assert_eq!(
        (&c["status"], &c["reason"], &c["lastTransitionTime"]),
        (&json!("True"), &json!("InvalidOutput"), &json!("t1"))
    );
    assert_eq!(status["ready"], 0, "the rest of the status is kept");
    // Said once: the same failure again writes nothing (and records no event).
    let p2 = parent(status.clone());
    assert_eq!(degraded(&p2, "InvalidOutput", "bad child", "t2").writes, []);
    // A successful reconcile clears it, even when the plugin never mentions
    // Degraded; a Degraded the plugin sets itself is replaced by the host's.
    let own = json!({"ready": 1, "conditions": [{"type": "Degraded", "status": "True", "reason": "Mine", "message": "", "lastTransitionTime": "t0"}]});
    for desired in [json!({"ready": 1}), own] {
        let status = status_write(&p2, Some(&desired), &reconciled(), "t3").unwrap();
        let c = condition(&status, DEGRADED).unwrap();
        assert_eq!(
            (&c["status"], &c["reason"]),
            (&json!("False"), &json!("AsExpected"))
        );
        assert_eq!(c["lastTransitionTime"], "t3");
        assert_eq!(
            status["conditions"].as_array().unwrap().len(),
            1,
            "{status}"
        );
    }
}

#[test]
fn hash_ignores_key_order() {
    let a: Value = serde_json::from_str(r#"{"a":1,"b":{"c":2,"d":3}}"#).unwrap();
    let b: Value = serde_json::from_str(r#"{"b":{"d":3,"c":2},"a":1}"#).unwrap();
    assert_eq!(hash_value(&a), hash_value(&b));
    assert_ne!(hash_value(&a), hash_value(&json!({"a": 2})));
}

#[test]
fn conditions_keep_their_transition_time_until_they_flip() {
    let mut status = json!({"readyReplicas": 1});
    upsert_condition(
        &mut status,
        "Degraded",
        true,
        "InvalidSpec",
        "bad",
        Some(2),
        "t1",
    );
    assert_eq!(status["conditions"][0]["lastTransitionTime"], "t1");
    assert_eq!(status["conditions"][0]["observedGeneration"], 2);
    assert!(
        status.get("observedGeneration").is_none(),
        "the status's own observedGeneration is the plugin's"
    );
    upsert_condition(
        &mut status,
        "Degraded",
        true,
        "InvalidSpec",
        "still bad",
        Some(3),
        "t2",
    );
    assert_eq!(status["conditions"][0]["lastTransitionTime"], "t1");
    assert_eq!(status["conditions"][0]["message"], "still bad");
    upsert_condition(
        &mut status,
        "Degraded",
        false,
        "AsExpected",
        "",
        Some(3),
        "t3",
    );
    assert_eq!(status["conditions"][0]["lastTransitionTime"], "t3");
    assert_eq!(status["conditions"].as_array().unwrap().len(), 1);
    assert_eq!(status["readyReplicas"], 1);
}

//! Fixture tests: the real reconcile, natively, through the SDK's JSON path.

use std::cell::RefCell;
use std::rc::Rc;

use kuwa_sdk::outbound::{Request, Response};
use kuwa_sdk::testing::Fixture;
use serde_json::{Value, json};

use super::*;

const SAMPLE: &str = include_str!("../../../deploy/samples/kuwa.dev_v1alpha1_securitypolicy.yaml");
const FIREWALL_SAMPLE: &str = include_str!("../fixtures/firewall-policy.yaml");

fn node(name: &str, ip: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Node", "metadata": {"name": name},
        "status": {"addresses": [{"type": "InternalIP", "address": ip}, {"type": "Hostname", "address": name}]}
    })
}

fn cidrs(out: &Desired<SecurityPolicyStatus>) -> Vec<String> {
    let np: NetworkPolicy = out.child_named("securitypolicy-sample").unwrap();
    np.spec.unwrap().ingress.unwrap()[0]
        .from
        .clone()
        .unwrap()
        .into_iter()
        .map(|p| p.ip_block.unwrap().cidr)
        .collect()
}

fn status(out: &Desired<SecurityPolicyStatus>) -> SecurityPolicyStatus {
    serde_json::from_value(out.status_json().unwrap().clone()).unwrap()
}

fn condition<'a>(s: &'a SecurityPolicyStatus, type_: &str) -> &'a Condition {
    s.conditions.iter().find(|c| c.type_ == type_).unwrap()
}

#[test]
fn the_allow_list_is_every_node_ip_sorted_and_deduplicated() {
    let out = Fixture::parent_yaml(SAMPLE)
        .related(node("b", "10.126.0.2"))
        .related(node("a", "10.126.0.10"))
        .related(node("c", "10.126.0.2"))
        .related(node("v6", "fd00::1"))
        .related(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "new"}}))
        .reconcile::<SecurityPolicyPlugin>()
        .unwrap();
    assert_eq!(
        cidrs(&out),
        [
            "10.20.0.0/16",
            "10.126.0.2/32",
            "10.126.0.10/32",
            "fd00::1/128"
        ]
    );
    let np: NetworkPolicy = out.child_named("securitypolicy-sample").unwrap();
    let spec = np.spec.unwrap();
    let ports: Vec<_> = spec.ingress.unwrap()[0]
        .ports
        .clone()
        .unwrap()
        .into_iter()
        .map(|p| (p.port.unwrap(), p.protocol.unwrap()))
        .collect();
    assert_eq!(
        ports,
        [
            (IntOrString::Int(443), "TCP".to_owned()),
            (IntOrString::Int(8080), "TCP".to_owned())
        ]
    );
    assert_eq!(
        spec.pod_selector.unwrap().match_labels.unwrap()["app.kubernetes.io/instance"],
        "webserver-sample"
    );
    assert_eq!(spec.policy_types.unwrap(), ["Ingress"]);
    let s = status(&out);
    assert_eq!((s.nodes, s.sources), (4, 4));
    assert!(s.firewall.is_none());
    // Not ready until the NetworkPolicy is observed.
    assert_eq!(condition(&s, "Ready").status, "False");
}

#[test]
fn a_node_leaving_leaves_the_list_and_an_unchanged_world_gives_the_same_status() {
    let base = Fixture::parent_yaml(SAMPLE)
        .related(node("a", "10.126.0.1"))
        .related(node("b", "10.126.0.2"));
    let first = base.reconcile::<SecurityPolicyPlugin>().unwrap();
    let np = first.children()[0].clone();
    // The NetworkPolicy exists and the status was written: ready, and the
    // next reconcile asks for nothing new.
    let applied = base
        .clone()
        .child(np.clone())
        .with_parent(|p| p["status"] = first.status_json().unwrap().clone());
    let second = applied.reconcile::<SecurityPolicyPlugin>().unwrap();
    let s2 = status(&second);
    assert_eq!(condition(&s2, "Ready").status, "True");
    let settled = applied
        .clone()
        .with_parent(|p| p["status"] = second.status_json().unwrap().clone())
        .at("2026-01-01T01:00:00Z")
        .reconcile::<SecurityPolicyPlugin>()
        .unwrap();
    assert_eq!(settled.status_json(), second.status_json());
    assert_eq!(settled.children(), second.children());
    let fewer = Fixture::parent_yaml(SAMPLE)
        .related(node("a", "10.126.0.1"))
        .reconcile::<SecurityPolicyPlugin>()
        .unwrap();
    assert_eq!(cidrs(&fewer), ["10.20.0.0/16", "10.126.0.1/32"]);
}

#[test]
fn malformed_ports_and_cidrs_are_invalid_specs() {
    let invalid = |edit: &dyn Fn(&mut Value)| match Fixture::parent_yaml(SAMPLE)
        .with_parent(|p| edit(p))
        .reconcile::<SecurityPolicyPlugin>()
    {
        Err(Error::InvalidSpec(m)) => m,
        other => panic!("expected InvalidSpec, got {other:?}"),
    };
    assert!(
        invalid(&|p| p["spec"]["extraCidrs"] = json!(["10.0.0.0/33"])).contains("extraCidrs[0]")
    );
    assert!(invalid(&|p| p["spec"]["extraCidrs"] = json!(["10.0.0.300/8"])).contains("not an IP"));
    assert!(invalid(&|p| p["spec"]["extraCidrs"] = json!(["10.0.0.0"])).contains("not a CIDR"));
    assert!(invalid(&|p| p["spec"]["ports"] = json!([{"port": 0}])).contains("spec.ports[0].port"));
    assert!(invalid(&|p| p["spec"]["ports"] = json!([{"port": 70000}])).contains("1-65535"));
    assert!(
        invalid(&|p| p["spec"]["ports"] = json!([{"port": 1, "protocol": "ICMP"}]))
            .contains("protocol")
    );
    assert!(invalid(&|p| p["spec"]["ports"] = json!([])).contains("at least one"));
    assert!(
        invalid(&|p| p["spec"]["firewall"] = json!({"endpoint": "ftp://x"})).contains("endpoint")
    );
    assert!(
        invalid(&|p| p["spec"]["firewall"] = json!({"endpoint": "https://x", "ruleName": "A_b"}))
            .contains("ruleName")
    );
}

#[test]
fn cidrs_are_canonical() {
    assert_eq!(canonical_cidr("10.1.2.3/16").unwrap(), "10.1.0.0/16");
    assert_eq!(canonical_cidr("0.0.0.0/0").unwrap(), "0.0.0.0/0");
    assert_eq!(canonical_cidr("fd00::1:2/64").unwrap(), "fd00::/64");
    assert_eq!(canonical_cidr("10.1.2.3/32").unwrap(), "10.1.2.3/32");
}

type Calls = Rc<RefCell<Vec<Request>>>;

fn answering(
    status: u16,
    body: &str,
) -> (
    Calls,
    impl FnMut(&Request) -> Result<Response, kuwa_sdk::outbound::Error>,
) {
    let calls: Calls = Rc::default();
    let seen = calls.clone();
    let body = body.to_owned();
    (calls, move |r: &Request| {
        seen.borrow_mut().push(r.clone());
        Ok(Response {
            status,
            headers: Vec::new(),
            body: body.clone(),
        })
    })
}

#[test]
fn the_firewall_gets_the_same_list_once() {
    let (calls, respond) = answering(200, r#"{"id":"fw-1"}"#);
    let base = Fixture::parent_yaml(FIREWALL_SAMPLE)
        .related(node("a", "10.126.0.1"))
        .outbound(respond);
    let out = base.reconcile::<SecurityPolicyPlugin>().unwrap();
    let s = status(&out);
    let fw = s.firewall.clone().unwrap();
    assert_eq!(fw.rule_id.as_deref(), Some("fw-1"));
    assert_eq!(fw.rule_name, "default-securitypolicy-sample");
    assert_eq!(condition(&s, "FirewallSynced").status, "True");
    {
        let calls = calls.borrow();
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].method, "PUT");
        assert_eq!(
            calls[0].url,
            "https://firewall.example.com/v1/rules/default-securitypolicy-sample"
        );
        let body: firewall::Rule = serde_json::from_str(calls[0].body.as_deref().unwrap()).unwrap();
        assert_eq!(body.source_ranges, cidrs(&out));
        assert_eq!(body.allowed, ["tcp:443"]);
    }
    // The same list again: no call.
    let again = base
        .clone()
        .with_parent(|p| p["status"] = out.status_json().unwrap().clone())
        .reconcile::<SecurityPolicyPlugin>()
        .unwrap();
    assert_eq!(
        calls.borrow().len(),
        1,
        "an unchanged allow-list is not pushed again"
    );
    assert_eq!(status(&again).firewall, Some(fw.clone()));
    // A new node: pushed again.
    base.clone()
        .related(node("b", "10.126.0.2"))
        .with_parent(|p| p["status"] = out.status_json().unwrap().clone())
        .reconcile::<SecurityPolicyPlugin>()
        .unwrap();
    assert_eq!(calls.borrow().len(), 2);
}

#[test]
fn a_failing_firewall_is_shown_and_retried_with_backoff() {
    let (calls, respond) = answering(503, "maintenance");
    let base = Fixture::parent_yaml(FIREWALL_SAMPLE)
        .related(node("a", "10.126.0.1"))
        .outbound(respond);
    let first = base.reconcile::<SecurityPolicyPlugin>().unwrap();
    let s = status(&first);
    let c = condition(&s, "FirewallSynced");
    assert_eq!(
        (c.status.as_str(), c.reason.as_str()),
        ("False", "FirewallError")
    );
    assert!(c.message.contains("HTTP 503: maintenance"), "{}", c.message);
    assert_eq!(condition(&s, "Ready").status, "False");
    assert_eq!(first.requeue(), Some(std::time::Duration::from_secs(1)));
    // The NetworkPolicy is applied whatever the firewall does.
    assert_eq!(first.children().len(), 1);
    // Within the backoff (a Node changed, say): no push, the same status,
    // the rest of the wait.
    let early = base
        .clone()
        .with_parent(|p| p["status"] = first.status_json().unwrap().clone())
        .at("2026-01-01T00:00:00.400Z")
        .reconcile::<SecurityPolicyPlugin>()
        .unwrap();
    assert_eq!(
        calls.borrow().len(),
        1,
        "no push before the backoff has passed"
    );
    assert_eq!(early.status_json(), first.status_json());
    assert_eq!(early.requeue(), Some(std::time::Duration::from_millis(600)));
    let second = base
        .clone()
        .with_parent(|p| p["status"] = first.status_json().unwrap().clone())
        .at("2026-01-01T00:00:01Z")
        .reconcile::<SecurityPolicyPlugin>()
        .unwrap();
    assert_eq!(calls.borrow().len(), 2);
    assert_eq!(second.requeue(), Some(std::time::Duration::from_secs(2)));
    assert_eq!(status(&second).firewall.unwrap().failures, 2);
    assert_eq!(firewall::backoff(30), firewall::MAX_BACKOFF);
}

#[test]
fn an_outbound_refusal_is_a_condition_not_a_crash() {
    let base = Fixture::parent_yaml(FIREWALL_SAMPLE).related(node("a", "10.126.0.1"));
    // No responder: what a plugin without the grant gets.
    let out = base.reconcile::<SecurityPolicyPlugin>().unwrap();
    let s = status(&out);
    let c = condition(&s, "FirewallSynced");
    assert_eq!(
        (c.status.as_str(), c.reason.as_str()),
        ("False", "NotAllowed")
    );
}

#[test]
fn finalize_removes_the_rule() {
    let (calls, respond) = answering(404, "");
    let f = Fixture::parent_yaml(FIREWALL_SAMPLE)
        .outbound(respond)
        .finalize::<SecurityPolicyPlugin>()
        .unwrap();
    assert!(f.done, "a rule already gone is removed");
    assert_eq!(calls.borrow()[0].method, "DELETE");
    let (_, respond) = answering(500, "");
    let f = Fixture::parent_yaml(FIREWALL_SAMPLE)
        .outbound(respond)
        .finalize::<SecurityPolicyPlugin>()
        .unwrap();
    assert!(!f.done && f.requeue_after == Some(firewall::REMOVE_RETRY));
    let f = Fixture::parent_yaml(SAMPLE)
        .finalize::<SecurityPolicyPlugin>()
        .unwrap();
    assert!(f.done, "no firewall, nothing to remove");
}

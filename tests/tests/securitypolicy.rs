//! End-to-end: the SecurityPolicy plugin (issue 14) against the real local
//! control plane: the NetworkPolicy follows the Nodes, the allow-list
//! reaches a firewall API on loopback through the host's outbound calls,
//! a failing firewall is shown and retried with backoff, and an origin the
//! grant does not list is never called.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams};
use kube::{Client, ResourceExt};
use kuwa_e2e::firewall::Firewall;
use kuwa_e2e::host::{KuwaHost, apply_json, metric_sample, plugin, yaml_file};
use kuwa_e2e::objects::{self, condition, create_node, delete_node, node_cidrs, security_policies};
use kuwa_e2e::{TestNamespace, client, wait_for};
use serde_json::{Value, json};

const CONVERGE: Duration = Duration::from_secs(60);

/// Both tests add Nodes, which every SecurityPolicy sees: one at a time, so
/// one's Node is not the other's unexpected change.
static NODES: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
const SAMPLE: &str = "securitypolicy-sample";
const EXTRA: &str = "10.20.0.0/16";

fn policies(client: &Client, ns: &str) -> Api<DynamicObject> {
    security_policies(client, ns)
}

/// Waits until SecurityPolicy `name` has a condition `type_` for which
/// `wanted` holds; returns it.
async fn wait_condition(
    api: &Api<DynamicObject>,
    name: &str,
    type_: &str,
    wanted: impl Fn(&Value) -> bool,
) -> Result<Value> {
    let wanted = &wanted;
    wait_for(
        &format!("{name}'s {type_} condition"),
        CONVERGE,
        || async move {
            let p = api.get(name).await?;
            Ok(condition(&p, type_).filter(|c| wanted(c)))
        },
    )
    .await
}

/// Replaces the sample's spec (server-side apply as `e2e`).
async fn set_spec(api: &Api<DynamicObject>, spec: Value) -> Result<()> {
    api.patch(
        SAMPLE,
        &PatchParams::apply("e2e").force(),
        &Patch::Apply(json!({
            "apiVersion": "kuwa.dev/v1alpha1", "kind": "SecurityPolicy",
            "metadata": {"name": SAMPLE},
            "spec": spec,
        })),
    )
    .await?;
    Ok(())
}

/// Deletes SecurityPolicy `name` and waits until it is gone (its finalizer
/// released).
async fn delete_and_wait(api: &Api<DynamicObject>, name: &str) -> Result<()> {
    api.delete(name, &DeleteParams::default()).await?;
    wait_for(&format!("{name} gone"), CONVERGE, || async move {
        Ok(api.get_opt(name).await?.is_none().then_some(()))
    })
    .await
}

/// The source CIDRs of NetworkPolicy `name`, in its order.
async fn sources(client: &Client, ns: &str, name: &str) -> Result<Option<Vec<String>>> {
    let api: Api<NetworkPolicy> = Api::namespaced(client.clone(), ns);
    let Some(np) = api.get_opt(name).await? else {
        return Ok(None);
    };
    Ok(Some(
        np.spec
            .and_then(|s| s.ingress)
            .unwrap_or_default()
            .into_iter()
            .flat_map(|r| r.from.unwrap_or_default())
            .filter_map(|p| p.ip_block.map(|b| b.cidr))
            .collect(),
    ))
}

/// What the allow-list must be now: every Node's InternalIP and `extra`, in
/// address order.
async fn expected(client: &Client, extra: &str) -> Result<Vec<String>> {
    let mut all = node_cidrs(client).await?;
    all.push(extra.to_owned());
    all.sort_by_key(|c| {
        c.split_once('/')
            .and_then(|(a, _)| a.parse::<std::net::IpAddr>().ok())
    });
    Ok(all)
}

/// Waits until NetworkPolicy `name` admits exactly the Nodes of now.
async fn wait_allow_list(client: &Client, ns: &str, name: &str, what: &str) -> Result<Vec<String>> {
    wait_for(what, CONVERGE, || async move {
        let want = expected(client, EXTRA).await?;
        Ok(sources(client, ns, name).await?.filter(|s| *s == want))
    })
    .await
}

/// A Node name and an InternalIP no other test uses.
fn test_node(tag: &str) -> (String, String) {
    let pid = std::process::id();
    let ip = match tag {
        "a" => 1,
        "b" => 2,
        _ => 3,
    };
    (
        format!("secpol-{tag}-{pid:x}"),
        format!("10.125.{}.{ip}", pid % 250),
    )
}

/// Done-when 1: the NetworkPolicy lists every Node IP, follows a Node coming
/// and going within seconds, writes nothing in the steady state, and an
/// invalid spec is Degraded/InvalidSpec with nothing applied.
#[tokio::test(flavor = "multi_thread")]
async fn the_allow_list_follows_the_nodes() -> Result<()> {
    let _nodes = NODES.lock().await;
    let client = client().await?;
    let ns = TestNamespace::new(&client, "secpol-nodes").await?;
    let host = KuwaHost::start(&ns.name, &[plugin("securitypolicy")?], &[]).await?;
    apply_json(
        &client,
        &ns.name,
        &yaml_file("deploy/samples/kuwa.dev_v1alpha1_securitypolicy.yaml")?,
    )
    .await?;
    let first = wait_allow_list(&client, &ns.name, SAMPLE, "the sample's allow-list").await?;
    assert!(
        first.len() >= 6,
        "5 kwok nodes with distinct addresses and the extra CIDR: {first:?}"
    );
    let api = policies(&client, &ns.name);
    wait_condition(&api, SAMPLE, "Ready", |c| c["status"] == "True").await?;

    let (node, ip) = test_node("a");
    let added = Instant::now();
    create_node(&client, &node, &ip).await?;
    let result = async {
        let with = wait_allow_list(&client, &ns.name, SAMPLE, "the new Node's IP").await?;
        assert!(with.contains(&format!("{ip}/32")), "{with:?}");
        let in_secs = added.elapsed().as_secs_f64();
        let removed = Instant::now();
        delete_node(&client, &node).await?;
        let without = wait_allow_list(&client, &ns.name, SAMPLE, "the deleted Node gone").await?;
        assert!(!without.contains(&format!("{ip}/32")), "{without:?}");
        println!(
            "node added -> in the NetworkPolicy: {in_secs:.2} s; node deleted -> out: {:.2} s",
            removed.elapsed().as_secs_f64()
        );
        anyhow::Ok(())
    }
    .await;
    delete_node(&client, &node).await?;
    result?;

    let writes = host.forced_resync_writes("securitypolicy", 1, 3).await?;
    println!("steady state: {writes} writes over 3 forced resyncs");
    assert_eq!(writes, 0.0, "{}", host.write_metrics().await?);

    // A malformed CIDR: Degraded/InvalidSpec, the NetworkPolicy untouched.
    let np_api: Api<NetworkPolicy> = Api::namespaced(client.clone(), &ns.name);
    let before = np_api.get(SAMPLE).await?.resource_version();
    set_spec(
        &api,
        json!({"ports": [{"port": 443}], "extraCidrs": ["10.20.0.0/33"]}),
    )
    .await?;
    let degraded = wait_condition(&api, SAMPLE, "Degraded", |c| c["status"] == "True").await?;
    assert_eq!(degraded["reason"], "InvalidSpec", "{degraded}");
    assert!(
        degraded["message"]
            .as_str()
            .unwrap_or_default()
            .contains("extraCidrs[0]"),
        "{degraded}"
    );
    host.wait_idle(Duration::from_secs(2), CONVERGE).await?;
    assert_eq!(
        np_api.get(SAMPLE).await?.resource_version(),
        before,
        "nothing is applied for an invalid spec"
    );
    // A malformed port likewise.
    set_spec(
        &api,
        json!({"ports": [{"port": 70000}], "extraCidrs": [EXTRA]}),
    )
    .await?;
    wait_condition(&api, SAMPLE, "Degraded", |c| {
        c["message"]
            .as_str()
            .unwrap_or_default()
            .contains("spec.ports[0].port")
    })
    .await?;
    host.wait_idle(Duration::from_secs(2), CONVERGE).await?;
    assert_eq!(np_api.get(SAMPLE).await?.resource_version(), before);
    ns.cleanup().await;
    Ok(())
}

fn firewall_policy(name: &str, endpoint: &str) -> Value {
    objects::firewall_policy(name, endpoint, EXTRA)
}

async fn wait_synced(api: &Api<DynamicObject>, name: &str, status: &str) -> Result<Value> {
    wait_condition(api, name, "FirewallSynced", |c| c["status"] == status).await
}

/// Done-when 2: the firewall holds the same allow-list; when it fails the
/// parent says so and the push is retried with backoff; an origin the grant
/// does not list gets a clear error and sees no request.
#[tokio::test(flavor = "multi_thread")]
async fn the_firewall_holds_the_same_list() -> Result<()> {
    let _nodes = NODES.lock().await;
    let client = client().await?;
    let ns = TestNamespace::new(&client, "secpol-fw").await?;
    let granted = Firewall::start().await?;
    let other = Firewall::start().await?;
    let manifest = format!(
        "installCrd: true\nchildKinds: [networking.k8s.io/v1/NetworkPolicy]\nrelatedKinds: [v1/Node]\n\
         outbound:\n  hosts: [{}]\n  timeout: 500ms\n",
        granted.origin()
    );
    let host = KuwaHost::start_with(
        &ns.name,
        &[plugin("securitypolicy")?],
        &[("securitypolicy", &manifest)],
        &[],
    )
    .await?;
    let api = policies(&client, &ns.name);
    apply_json(
        &client,
        &ns.name,
        &firewall_policy("fw", &granted.endpoint()),
    )
    .await?;
    let synced = wait_synced(&api, "fw", "True").await?;
    let rule_name = format!("{}-fw", ns.name);
    let list = wait_allow_list(&client, &ns.name, "fw", "the NetworkPolicy of fw").await?;
    let rule = granted
        .rule(&rule_name)
        .context("the rule on the firewall")?;
    assert_eq!(rule["sourceRanges"], json!(list), "the same allow-list");
    assert_eq!(rule["allowed"], json!(["tcp:443"]));
    let p = api.get("fw").await?;
    assert_eq!(
        p.data["status"]["firewall"]["ruleId"],
        format!("fw-{rule_name}")
    );
    println!("synced: {}", synced["message"]);

    // Steady state: no second push.
    host.wait_idle(Duration::from_secs(2), CONVERGE).await?;
    let puts = |fw: &Firewall| fw.seen().iter().filter(|s| s.method == "PUT").count();
    let pushed = puts(&granted);
    host.forced_resync_writes("securitypolicy", 1, 2).await?;
    assert_eq!(
        puts(&granted),
        pushed,
        "an unchanged allow-list is not pushed again"
    );

    // The firewall fails while a Node arrives.
    granted.set_failing(true);
    let (node, ip) = test_node("b");
    create_node(&client, &node, &ip).await?;
    let result = async {
        let failed = wait_synced(&api, "fw", "False").await?;
        assert_eq!(failed["reason"], "FirewallError", "{failed}");
        assert!(
            failed["message"]
                .as_str()
                .unwrap_or_default()
                .contains("HTTP 503"),
            "{failed}"
        );
        // Retried with backoff (1 s, 2 s, 4 s), however often the new Node
        // changes meanwhile.
        let retries = wait_for("four failed pushes", CONVERGE, || async {
            let at: Vec<Instant> = granted
                .seen()
                .iter()
                .filter(|s| s.method == "PUT")
                .skip(pushed)
                .map(|s| s.at)
                .collect();
            Ok((at.len() >= 4).then_some(at))
        })
        .await?;
        let gaps: Vec<f64> = retries
            .windows(2)
            .map(|w| (w[1] - w[0]).as_secs_f64())
            .collect();
        println!("gaps between failed pushes: {gaps:.2?} s");
        assert!(
            gaps[0] >= 0.9 && gaps[1] > gaps[0] * 1.5 && gaps[2] > gaps[1] * 1.5,
            "exponential backoff: {gaps:?}"
        );
        let p = api.get("fw").await?;
        assert!(p.data["status"]["firewall"]["failures"].as_u64() >= Some(2));
        assert_eq!(
            condition(&p, "Ready").map(|c| c["status"].clone()),
            Some(json!("False"))
        );
        // It recovers: the new Node's IP reaches the firewall.
        granted.set_failing(false);
        wait_synced(&api, "fw", "True").await?;
        let rule = granted.rule(&rule_name).context("the rule")?;
        assert!(
            rule["sourceRanges"]
                .as_array()
                .is_some_and(|r| r.contains(&json!(format!("{ip}/32")))),
            "{rule}"
        );
        anyhow::Ok(())
    }
    .await;
    granted.set_failing(false);
    delete_node(&client, &node).await?;
    result?;

    // An origin the grant does not list: refused, nothing sent.
    apply_json(
        &client,
        &ns.name,
        &firewall_policy("rogue", &other.endpoint()),
    )
    .await?;
    let refused = wait_synced(&api, "rogue", "False").await?;
    assert_eq!(refused["reason"], "NotAllowed", "{refused}");
    let message = refused["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("not in this plugin's grant") && message.contains("nothing was sent"),
        "{message}"
    );
    assert!(
        other.seen().is_empty(),
        "the unlisted server saw {:?}",
        other.seen()
    );
    let text = host.metrics().await?;
    let denied = metric_sample(
        &text,
        "kuwa_outbound_requests_total",
        &[
            ("plugin", "securitypolicy"),
            ("host", "-"),
            ("result", "not_allowed"),
        ],
    );
    assert!(denied >= Some(1.0), "refusals are counted: {denied:?}");
    let ok = metric_sample(
        &text,
        "kuwa_outbound_requests_total",
        &[
            ("plugin", "securitypolicy"),
            ("host", &granted.origin()),
            ("result", "2xx"),
        ],
    );
    assert!(ok >= Some(2.0), "pushes are counted by origin: {ok:?}");
    println!("outbound: {ok:?} pushes answered 2xx, {denied:?} refused");

    // Deleting the SecurityPolicy removes its rule first (the finalizer).
    delete_and_wait(&api, "fw").await?;
    assert!(granted.rule(&rule_name).is_none(), "the rule was removed");
    // Its rule could never be written: the finalizer lets it go.
    delete_and_wait(&api, "rogue").await?;
    assert!(other.seen().is_empty());
    drop(host);
    ns.cleanup().await;
    Ok(())
}

//! End-to-end: sandbox limits, quarantine, tenant grants and fairness across
//! plugins (issue 5), with the real host against the local control plane.

use std::time::Duration;

use anyhow::Result;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::{Client, ResourceExt};
use kuwa_e2e::host::{KuwaHost, apply_json, plugin, test_plugin};
use kuwa_e2e::objects::{wait_content, webserver, webservers};
use kuwa_e2e::{TestNamespace, client, wait_for};
use serde_json::{Value, json};

const CONVERGE: Duration = Duration::from_secs(120);

fn test_object(kind: &str, name: &str, spec: Value) -> Value {
    json!({"apiVersion": "test.kuwa.dev/v1", "kind": kind, "metadata": {"name": name}, "spec": spec})
}

async fn events_with_reason(
    client: &Client,
    ns: &str,
    object: &str,
    reason: &str,
) -> Result<Vec<Event>> {
    let events: Api<Event> = Api::namespaced(client.clone(), ns);
    Ok(events
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(object))
        .filter(|e| e.reason.as_deref() == Some(reason))
        .collect())
}

/// The `seconds=` of every "plugin call failed" log line of `plugin`.
fn failed_call_seconds(log: &str, plugin: &str) -> Vec<f64> {
    log.lines()
        .filter(|l| l.contains("plugin call failed") && l.contains(&format!("plugin={plugin}")))
        .filter_map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("seconds="))
                .and_then(|v| v.parse().ok())
        })
        .collect()
}

/// Done-when 3: a looping plugin is interrupted at its deadline, a memory hog
/// at its cap, neither disturbs the WebServer plugin, and the looping plugin
/// ends up quarantined.
#[tokio::test(flavor = "multi_thread")]
async fn runaway_plugins_are_stopped_and_quarantined() -> Result<()> {
    const DEADLINE_MS: f64 = 200.0;
    let client = client().await?;
    let ns = TestNamespace::new(&client, "sandbox").await?;
    let plugins = [
        plugin("webserver")?,
        test_plugin("spin")?,
        test_plugin("hog")?,
    ];
    let manifests = [
        (
            "spin",
            "installCrd: true\nquarantineAfter: 3\nlimits: {deadline: 200ms}\n",
        ),
        (
            "hog",
            "installCrd: true\nquarantineAfter: 3\nlimits: {memoryMiB: 16}\n",
        ),
    ];
    let mut host = KuwaHost::start_with(&ns.name, &plugins, &manifests, &[]).await?;
    apply_json(&client, &ns.name, &webserver("site", "before", 1)).await?;
    wait_content(&client, &ns.name, "site-content", "before", CONVERGE).await?;
    apply_json(
        &client,
        &ns.name,
        &test_object("SpinTest", "loop", json!({})),
    )
    .await?;
    apply_json(&client, &ns.name, &test_object("HogTest", "hog", json!({}))).await?;

    // While the runaways fail, a WebServer change is reconciled.
    webservers_patch(
        &client,
        &ns.name,
        "site",
        json!({"spec": {"content": "during"}}),
    )
    .await?;
    wait_content(&client, &ns.name, "site-content", "during", CONVERGE).await?;

    for (plugin, reason) in [("test-spin", "timeout"), ("test-hog", "memory")] {
        wait_for(&format!("{plugin} to be quarantined"), CONVERGE, || {
            let host = &host;
            async move {
                let quarantined = host
                    .metric("kuwa_plugin_quarantined", &[("plugin", plugin)])
                    .await?;
                Ok((quarantined == 1.0).then_some(()))
            }
        })
        .await?;
        let failures = host
            .metric(
                "kuwa_reconcile_errors_total",
                &[("plugin", plugin), ("reason", reason)],
            )
            .await?;
        assert!(
            failures >= 3.0,
            "{plugin}: {failures} {reason} failures before quarantine"
        );
    }
    // The loop was interrupted at its deadline, every time (the margin is
    // one epoch tick plus scheduling; the bound only proves "not forever").
    let seconds = failed_call_seconds(&host.log(), "test-spin");
    assert!(seconds.len() >= 3, "log:\n{}", host.log_tail(30));
    let worst = seconds.iter().copied().fold(0.0, f64::max);
    println!(
        "spin plugin: deadline {DEADLINE_MS} ms, interrupted after {seconds:?} s (worst overrun {:.0} ms)",
        worst * 1000.0 - DEADLINE_MS
    );
    // Deadlines count 10 ms epoch ticks from the call's start, so a call may
    // end up to one tick before the nominal deadline.
    assert!(
        seconds.iter().all(|s| *s >= (DEADLINE_MS - 20.0) / 1000.0),
        "interrupted before its deadline? {seconds:?}"
    );
    assert!(
        worst < DEADLINE_MS / 1000.0 + 1.0,
        "interrupted long after its deadline: {seconds:?}"
    );
    assert!(
        host.log()
            .contains("stopped at its memory cap of 16777216 bytes"),
        "{}",
        host.log_tail(30)
    );

    // Quarantined plugins stay out of the way; the WebServer plugin goes on.
    webservers_patch(
        &client,
        &ns.name,
        "site",
        json!({"spec": {"content": "after"}}),
    )
    .await?;
    wait_content(&client, &ns.name, "site-content", "after", CONVERGE).await?;
    assert_eq!(
        host.metric("kuwa_plugin_quarantined", &[("plugin", "webserver")])
            .await?,
        0.0
    );
    assert_eq!(
        host.metric("kuwa_reconcile_errors_total", &[("plugin", "webserver")])
            .await?,
        0.0
    );
    assert!(host.is_running());
    drop(host);
    ns.cleanup().await;
    Ok(())
}

async fn webservers_patch(client: &Client, ns: &str, name: &str, patch: Value) -> Result<()> {
    webservers(client, ns)
        .patch(name, &PatchParams::default(), &Patch::Merge(patch))
        .await?;
    Ok(())
}

/// Done-when 4: output in another namespace, or of a kind outside the grant,
/// rejects the whole reconcile with a clear Event; nothing of it is applied.
#[tokio::test(flavor = "multi_thread")]
async fn output_outside_the_grant_is_rejected_whole() -> Result<()> {
    let client = client().await?;
    let ns = TestNamespace::new(&client, "grant").await?;
    let manifest = format!(
        "installCrd: true\nnamespaces: [{}]\nchildKinds: [v1/ConfigMap]\n",
        ns.name
    );
    let host = KuwaHost::start_with(
        &ns.name,
        &[test_plugin("rogue")?],
        &[("rogue", &manifest)],
        &[],
    )
    .await?;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns.name);

    // A well-behaved object is served, proving the plugin works here.
    apply_json(
        &client,
        &ns.name,
        &test_object("RogueTest", "good", json!({"mode": "ok"})),
    )
    .await?;
    wait_for("good-ok", CONVERGE, || {
        let cms = cms.clone();
        async move { Ok(cms.get_opt("good-ok").await?.map(|_| ())) }
    })
    .await?;

    apply_json(
        &client,
        &ns.name,
        &test_object("RogueTest", "elsewhere", json!({"mode": "other-namespace"})),
    )
    .await?;
    apply_json(
        &client,
        &ns.name,
        &test_object("RogueTest", "secret", json!({"mode": "ungranted-kind"})),
    )
    .await?;
    for (object, expect) in [
        ("elsewhere", "kube-system"),
        ("secret", "grant does not allow"),
    ] {
        let events = wait_for(
            &format!("an InvalidOutput event on {object}"),
            CONVERGE,
            || {
                let client = client.clone();
                let ns = ns.name.clone();
                async move {
                    let events = events_with_reason(&client, &ns, object, "InvalidOutput").await?;
                    Ok((!events.is_empty()).then_some(events))
                }
            },
        )
        .await?;
        let note = events[0].note.clone().unwrap_or_default();
        assert!(
            note.contains(expect) && note.contains("nothing applied"),
            "{object}: {note}"
        );
        assert_eq!(events[0].type_.as_deref(), Some("Warning"));
    }
    // Nothing of the rejected outputs exists: not even their valid ConfigMap.
    assert!(
        cms.get_opt("elsewhere-ok").await?.is_none(),
        "half-applied output"
    );
    assert!(
        cms.get_opt("secret-ok").await?.is_none(),
        "half-applied output"
    );
    let kube_system: Api<ConfigMap> = Api::namespaced(client.clone(), "kube-system");
    assert!(kube_system.get_opt("elsewhere-elsewhere").await?.is_none());
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns.name);
    assert!(secrets.get_opt("secret-secret").await?.is_none());
    let rejected = host
        .metric(
            "kuwa_reconcile_errors_total",
            &[("plugin", "test-rogue"), ("reason", "invalid_output")],
        )
        .await?;
    assert!(rejected >= 2.0, "{rejected}");
    drop(host);
    ns.cleanup().await;
    Ok(())
}

/// Done-when 5: plugin A with 2,000 dirty keys and a tight write budget,
/// plugin B with 5: B's 5 converge while A's backlog is still draining.
#[tokio::test(flavor = "multi_thread")]
async fn a_noisy_plugin_does_not_starve_a_quiet_one() -> Result<()> {
    const NOISY: usize = 2000;
    let client = client().await?;
    let ns = TestNamespace::new(&client, "fairness").await?;
    let host = KuwaHost::start_with(
        &ns.name,
        &[test_plugin("fanout")?, test_plugin("rogue")?],
        &[(
            "fanout",
            "installCrd: true\nwritesPerSecond: 20\nwriteBurst: 1\n",
        )],
        &[],
    )
    .await?;
    // A's 2,000 parents, all dirty at once, then B's 5.
    futures::stream::iter(0..NOISY)
        .map(|i| {
            let client = client.clone();
            let ns = ns.name.clone();
            async move {
                apply_json(
                    &client,
                    &ns,
                    &test_object("FanoutTest", &format!("a-{i}"), json!({"value": "x"})),
                )
                .await
            }
        })
        .buffer_unordered(32)
        .try_collect::<Vec<()>>()
        .await?;
    for i in 0..5 {
        apply_json(
            &client,
            &ns.name,
            &test_object("RogueTest", &format!("b-{i}"), json!({"mode": "ok"})),
        )
        .await?;
    }
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns.name);
    let noisy_done_when_quiet_done = wait_for("B's 5 children", CONVERGE, || {
        let cms = cms.clone();
        async move {
            let names: Vec<String> = cms
                .list(&ListParams::default())
                .await?
                .items
                .iter()
                .map(|c| c.name_any())
                .collect();
            let quiet = names
                .iter()
                .filter(|n| n.starts_with("b-") && n.ends_with("-ok"))
                .count();
            let noisy = names
                .iter()
                .filter(|n| n.starts_with("a-") && n.ends_with("-out"))
                .count();
            Ok((quiet == 5).then_some(noisy))
        }
    })
    .await?;
    println!("when B's 5 converged, A had {noisy_done_when_quiet_done} of {NOISY} children");
    assert!(
        noisy_done_when_quiet_done < NOISY,
        "A's backlog had already drained: nothing was shown"
    );
    let depth = host
        .metric("kuwa_queue_depth", &[("plugin", "test-fanout")])
        .await?;
    let waits = host
        .metric(
            "kuwa_write_budget_waits_total",
            &[("plugin", "test-fanout")],
        )
        .await?;
    println!("A's queue depth then: {depth}; writes that waited for A's budget: {waits}");
    assert!(waits > 0.0, "A's tight budget was never hit");
    assert_eq!(
        host.metric("kuwa_write_budget_waits_total", &[("plugin", "test-rogue")])
            .await?,
        0.0
    );
    drop(host);
    ns.cleanup().await;
    Ok(())
}

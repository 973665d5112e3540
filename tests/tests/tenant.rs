//! End-to-end: the tenant boundary (issue 8; the rules are in docs/security-model.md).
//! One test per hole, each with a hostile plugin from tests/plugins/ and the
//! shipped WebServer plugin alongside, showing the others are unaffected
//! while the hostile one misbehaves.
//!
//! Every wait is bounded; a metric is trusted at 0 only when its series is
//! present in `/metrics` (see `kuwa_e2e::host::metric_sample`).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams,
};
use kube::{Client, ResourceExt};
use kuwa_e2e::host::{KuwaHost, apply_json, http, metric_sample, plugin, test_plugin};
use kuwa_e2e::objects::{condition, owned_by, set_content, wait_content, webserver};
use kuwa_e2e::{TestNamespace, client, kubeconfig_path, wait_for, workspace_root};
use serde_json::{Value, json};

/// How long a reconcile may take to show in the cluster.
const CONVERGE: Duration = Duration::from_secs(120);
/// How long a plugin file may take to be loaded (or refused) and reported.
const LOAD: Duration = Duration::from_secs(60);
/// The WebServer plugin's grant in every test: only its CRD.
const WEBSERVER_MANIFEST: &str = "installCrd: true\n";

// ---------------------------------------------------------------- helpers

/// The `manifest.yaml` of the test plugin crate `tests/plugins/<dir>`.
fn own_manifest(dir: &str) -> Result<String> {
    let path = workspace_root()
        .join("tests/plugins")
        .join(dir)
        .join("manifest.yaml");
    std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
}

fn test_object(kind: &str, name: &str, spec: Value) -> Value {
    json!({"apiVersion": "test.kuwa.dev/v1", "kind": kind, "metadata": {"name": name}, "spec": spec})
}

/// The objects of the test kind `kind` (`test.kuwa.dev/v1`) in `ns`.
fn test_api(client: &Client, ns: &str, kind: &str) -> Api<DynamicObject> {
    let resource = ApiResource {
        group: "test.kuwa.dev".into(),
        version: "v1".into(),
        api_version: "test.kuwa.dev/v1".into(),
        kind: kind.into(),
        plural: format!("{}s", kind.to_ascii_lowercase()),
    };
    Api::namespaced_with(client.clone(), ns, &resource)
}

/// Changes WebServer `name`'s content and waits until its ConfigMap serves
/// it; returns how long that took.
async fn change_content(client: &Client, ns: &str, name: &str, content: &str) -> Result<Duration> {
    let started = Instant::now();
    set_content(client, ns, name, content).await?;
    wait_content(client, ns, &format!("{name}-content"), content, CONVERGE).await?;
    Ok(started.elapsed())
}

/// Starts WebServer `name` with `content` and waits until it is served.
async fn start_webserver(client: &Client, ns: &str, name: &str, content: &str) -> Result<()> {
    apply_json(client, ns, &webserver(name, content, 0)).await?;
    wait_content(client, ns, &format!("{name}-content"), content, CONVERGE).await
}

async fn wait_config_map(client: &Client, ns: &str, name: &str) -> Result<ConfigMap> {
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    wait_for(&format!("ConfigMap {name}"), CONVERGE, || {
        let cms = cms.clone();
        async move { Ok(cms.get_opt(name).await?) }
    })
    .await
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

async fn wait_event(client: &Client, ns: &str, object: &str, reason: &str) -> Result<Vec<Event>> {
    wait_for(
        &format!("a {reason} event on {object}"),
        CONVERGE,
        || async move {
            let events = events_with_reason(client, ns, object, reason).await?;
            Ok((!events.is_empty()).then_some(events))
        },
    )
    .await
}

/// Waits until `object`'s `Degraded` condition has `status` and `reason`.
async fn wait_degraded(
    api: &Api<DynamicObject>,
    object: &str,
    status: &str,
    reason: &str,
) -> Result<Value> {
    wait_for(
        &format!("{object}: Degraded={status} reason {reason}"),
        CONVERGE,
        || async move {
            let o = api.get(object).await?;
            Ok(
                condition(&o, "Degraded")
                    .filter(|c| c["status"] == status && c["reason"] == reason),
            )
        },
    )
    .await
}

/// Like [`metric_sample`], failing (with the metric's lines) when the series is missing.
fn present(text: &str, name: &str, labels: &[(&str, &str)]) -> Result<f64> {
    metric_sample(text, name, labels).with_context(|| {
        format!(
            "no series {name}{labels:?} in /metrics; {name} lines:\n{}",
            text.lines()
                .filter(|l| l.starts_with(name))
                .collect::<Vec<_>>()
                .join("\n")
        )
    })
}

/// Waits until the series `name{labels}` exists and its value satisfies `ok`.
async fn wait_metric(
    host: &KuwaHost,
    name: &str,
    labels: &[(&str, &str)],
    what: &str,
    ok: impl Fn(f64) -> bool,
) -> Result<f64> {
    let ok = &ok;
    wait_for(
        &format!("{name}{labels:?} {what}"),
        CONVERGE,
        || async move {
            let text = host.metrics().await?;
            Ok(metric_sample(&text, name, labels).filter(|v| ok(*v)))
        },
    )
    .await
}

/// `kuwa_plugin_load_errors_total` of the plugin file `<stem>.*` (the
/// `file` label is the file's name; a path is accepted too) with `reason`.
fn load_errors(text: &str, stem: &str, reason: &str) -> f64 {
    text.lines()
        .filter_map(|l| l.strip_prefix("kuwa_plugin_load_errors_total{"))
        .filter(|l| l.contains(&format!("reason=\"{reason}\"")))
        .filter(|l| {
            l.split_once("file=\"")
                .and_then(|(_, rest)| rest.split_once('"'))
                .map(|(file, _)| file.rsplit('/').next().unwrap_or(file))
                .is_some_and(|file| file.starts_with(&format!("{stem}.")))
        })
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// Waits until loading `<stem>.*` failed at least once with `reason`.
async fn wait_load_error(host: &KuwaHost, stem: &str, reason: &str) -> Result<f64> {
    let found = wait_for(
        &format!("a load error of {stem} with reason {reason:?}"),
        LOAD,
        || async move {
            let n = load_errors(&host.metrics().await?, stem, reason);
            Ok((n >= 1.0).then_some(n))
        },
    )
    .await;
    match found {
        Ok(n) => Ok(n),
        Err(e) => {
            let text = host.metrics().await.unwrap_or_default();
            let series: Vec<&str> = text
                .lines()
                .filter(|l| l.starts_with("kuwa_plugin_load_errors"))
                .collect();
            Err(e.context(format!(
                "load error series:\n{}\nkuwa log:\n{}",
                series.join("\n"),
                host.log_tail(40)
            )))
        }
    }
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

/// Replaces `dir/name` atomically, as `cargo xtask plugins` does.
fn replace_file(dir: &Path, name: &str, bytes: &[u8]) -> Result<()> {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, dir.join(name)).with_context(|| format!("renaming onto {name}"))?;
    Ok(())
}

fn managers(meta: &ObjectMeta) -> Vec<String> {
    meta.managed_fields
        .iter()
        .flatten()
        .filter_map(|m| m.manager.clone())
        .collect()
}

fn finalizers(o: &DynamicObject) -> Vec<String> {
    o.metadata.finalizers.clone().unwrap_or_default()
}

/// Resident memory of process `pid` in KiB (Linux), for printing.
fn rss_kib(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

// ------------------------------------------------------- hole 1: time

/// Hole 1: a guest sleeping in a host call (a WASI clock poll) is stopped at
/// its deadline + one tick, not after its 20 s sleep; the WebServer plugin
/// keeps converging meanwhile.
#[tokio::test(flavor = "multi_thread")]
async fn a_sleeping_plugin_is_stopped_at_its_deadline() -> Result<()> {
    const DEADLINE: f64 = 0.5;
    const SLEEPERS: usize = 10;
    let client = client().await?;
    let ns = TestNamespace::new(&client, "tenant-sleep").await?;
    let sleeper = own_manifest("sleeper")?;
    ensure!(
        sleeper.contains("deadline: 500ms") && sleeper.contains("concurrency: 16"),
        "tests/plugins/sleeper/manifest.yaml no longer grants what this test measures:\n{sleeper}"
    );
    let host = KuwaHost::start_with(
        &ns.name,
        &[plugin("webserver")?, test_plugin("sleeper")?],
        &[("webserver", WEBSERVER_MANIFEST), ("sleeper", &sleeper)],
        &[],
    )
    .await?;
    start_webserver(&client, &ns.name, "site", "before").await?;

    for i in 0..SLEEPERS {
        apply_json(
            &client,
            &ns.name,
            &test_object("SleepTest", &format!("nap-{i}"), json!({"seconds": 20})),
        )
        .await?;
    }
    // While the ten sleep (concurrency 16: all at once), a content change
    // is reconciled.
    let during = change_content(&client, &ns.name, "site", "during").await?;

    let timeouts = wait_metric(
        &host,
        "kuwa_reconcile_errors_total",
        &[("plugin", "test-sleeper"), ("reason", "timeout")],
        &format!(">= {SLEEPERS}"),
        |n| n >= SLEEPERS as f64,
    )
    .await?;
    let seconds = wait_for("the failed calls in the log", CONVERGE, || {
        let host = &host;
        async move {
            let s = failed_call_seconds(&host.log(), "test-sleeper");
            Ok((s.len() >= SLEEPERS).then_some(s))
        }
    })
    .await
    .with_context(|| host.log_tail(40))?;
    let worst = seconds.iter().copied().fold(0.0, f64::max);
    let best = seconds.iter().copied().fold(f64::INFINITY, f64::min);
    println!(
        "sleeper: deadline {DEADLINE} s, {} failed calls ({timeouts} timeouts), stopped after {best:.3}..{worst:.3} s (a call sleeps 20 s); \
         WebServer change converged in {during:?} meanwhile",
        seconds.len()
    );
    assert!(
        seconds.iter().all(|s| *s < DEADLINE + 0.01 + 0.5),
        "a sleeping call ran long past its deadline: {seconds:?}"
    );
    assert!(
        seconds.iter().all(|s| *s >= DEADLINE - 0.02),
        "a call was stopped before its deadline: {seconds:?}"
    );
    // No sleep ever finished: nothing a sleeping call returns is applied.
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns.name);
    for i in 0..SLEEPERS {
        let name = format!("nap-{i}-slept");
        assert!(cms.get_opt(&name).await?.is_none(), "{name} exists");
    }
    let after = change_content(&client, &ns.name, "site", "after").await?;
    println!("WebServer change after the timeouts converged in {after:?}");
    drop(host);
    ns.cleanup().await;
    Ok(())
}

/// Hole 1: `describe` has a deadline too. A plugin whose describe sleeps an
/// hour is refused ("describe") and the host becomes ready and serves the
/// WebServer plugin.
#[tokio::test(flavor = "multi_thread")]
async fn a_sleeping_describe_does_not_hold_up_the_host() -> Result<()> {
    let client = client().await?;
    let ns = TestNamespace::new(&client, "tenant-describe").await?;
    let started = Instant::now();
    // start_with fails unless /readyz answers 200 within its 120 s.
    let mut host = KuwaHost::start_with(
        &ns.name,
        &[plugin("webserver")?, test_plugin("slow-describe")?],
        &[
            ("webserver", WEBSERVER_MANIFEST),
            ("slow-describe", &own_manifest("slow-describe")?),
        ],
        &[],
    )
    .await?;
    let ready_after = started.elapsed();
    let refused = wait_load_error(&host, "slow-describe", "describe").await?;
    println!(
        "host with a describe sleeping 3600 s ready after {ready_after:?}; describe load errors: {refused}"
    );
    start_webserver(&client, &ns.name, "site", "before").await?;
    let change = change_content(&client, &ns.name, "site", "after").await?;
    println!("WebServer change converged in {change:?}");
    assert!(host.is_running());
    drop(host);
    ns.cleanup().await;
    Ok(())
}

// --------------------------------------------------- hole 2: adoption

/// Hole 2: a desired child named like someone else's object is a
/// ChildConflict: the object is not touched, and dropping it from the output
/// does not delete it. The plugin's own children are still created and
/// deleted (so "not deleted" means something).
#[tokio::test(flavor = "multi_thread")]
async fn a_child_named_like_someone_elses_object_is_neither_adopted_nor_deleted() -> Result<()> {
    let client = client().await?;
    let ns = TestNamespace::new(&client, "tenant-adopt").await?;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns.name);
    apply_json(
        &client,
        &ns.name,
        &json!({
            "apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "victim"},
            "data": {"owner": "someone-else"},
        }),
    )
    .await?;
    let original = cms.get("victim").await?;
    let host = KuwaHost::start_with(
        &ns.name,
        &[plugin("webserver")?, test_plugin("adopter")?],
        &[
            ("webserver", WEBSERVER_MANIFEST),
            ("adopter", &own_manifest("adopter")?),
        ],
        &[],
    )
    .await?;
    start_webserver(&client, &ns.name, "site", "before").await?;
    let adopts = test_api(&client, &ns.name, "AdoptTest");

    // The plugin works here: a free name becomes its child.
    apply_json(
        &client,
        &ns.name,
        &test_object(
            "AdoptTest",
            "claim-fresh",
            json!({"target": "fresh", "keep": true}),
        ),
    )
    .await?;
    let fresh = wait_config_map(&client, &ns.name, "fresh").await?;
    let claim_uid = adopts.get("claim-fresh").await?.uid().context("uid")?;
    assert!(
        owned_by(&fresh.metadata, &claim_uid),
        "{:?}",
        fresh.metadata
    );
    assert_eq!(
        fresh.labels().get("kuwa.dev/plugin").map(String::as_str),
        Some("test-adopter"),
        "the host's label on its child"
    );

    // Someone else's name: a conflict, nothing written.
    apply_json(
        &client,
        &ns.name,
        &test_object(
            "AdoptTest",
            "thief",
            json!({"target": "victim", "keep": true}),
        ),
    )
    .await?;
    let events = wait_event(&client, &ns.name, "thief", "ChildConflict").await?;
    assert_eq!(events[0].type_.as_deref(), Some("Warning"));
    println!("ChildConflict: {:?}", events[0].note);
    let degraded = wait_degraded(&adopts, "thief", "True", "ChildConflict").await?;
    println!("thief Degraded: {degraded}");
    let during = change_content(&client, &ns.name, "site", "during").await?;
    println!("WebServer change during the conflict converged in {during:?}");

    let untouched = |victim: &ConfigMap, when: &str| {
        assert_eq!(victim.uid(), original.uid(), "{when}: victim was replaced");
        assert_eq!(
            victim.resource_version(),
            original.resource_version(),
            "{when}: victim was written to: {:?}",
            victim.metadata
        );
        assert_eq!(victim.data, original.data, "{when}: data changed");
        assert!(
            victim.metadata.owner_references.is_none(),
            "{when}: owner references added: {:?}",
            victim.metadata.owner_references
        );
        let kuwa_labels: Vec<&String> = victim
            .labels()
            .keys()
            .filter(|k| k.starts_with("kuwa.dev/") || k.contains(".kuwa.dev/"))
            .collect();
        assert!(kuwa_labels.is_empty(), "{when}: labelled {kuwa_labels:?}");
        assert_eq!(
            managers(&victim.metadata),
            ["e2e"],
            "{when}: other field managers"
        );
    };
    untouched(&cms.get("victim").await?, "after the conflict");

    // Dropping it from the output deletes the plugin's own child only.
    let reconciles = present(
        &host.metrics().await?,
        "kuwa_reconciles_total",
        &[("plugin", "test-adopter")],
    )?;
    for (name, target) in [("thief", "victim"), ("claim-fresh", "fresh")] {
        apply_json(
            &client,
            &ns.name,
            &test_object("AdoptTest", name, json!({"target": target, "keep": false})),
        )
        .await?;
    }
    wait_for("fresh to be deleted by its parent", CONVERGE, || {
        let cms = cms.clone();
        async move { Ok(cms.get_opt("fresh").await?.is_none().then_some(())) }
    })
    .await?;
    wait_metric(
        &host,
        "kuwa_reconciles_total",
        &[("plugin", "test-adopter")],
        &format!("above {reconciles}"),
        |n| n > reconciles,
    )
    .await?;
    wait_degraded(&adopts, "thief", "False", "AsExpected").await?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let victim = cms.get_opt("victim").await?.context("victim was deleted")?;
    untouched(&victim, "after keep=false");
    println!(
        "victim {} untouched (resourceVersion {:?})",
        victim.uid().unwrap_or_default(),
        victim.resource_version()
    );
    drop(host);
    ns.cleanup().await;
    Ok(())
}

// ------------------------------------------------ hole 3: field managers

/// Hole 3: a plugin named `helm` writes as `kuwa/helm` (children) and
/// `kuwa/helm/status` (status), never as the bare `helm`.
#[tokio::test(flavor = "multi_thread")]
async fn a_plugin_named_like_another_tool_writes_under_its_own_field_managers() -> Result<()> {
    let client = client().await?;
    let ns = TestNamespace::new(&client, "tenant-helm").await?;
    let host = KuwaHost::start_with(
        &ns.name,
        &[plugin("webserver")?, test_plugin("helm")?],
        &[
            ("webserver", WEBSERVER_MANIFEST),
            ("helm", &own_manifest("helm")?),
        ],
        &[],
    )
    .await?;
    start_webserver(&client, &ns.name, "site", "before").await?;
    apply_json(
        &client,
        &ns.name,
        &test_object("HelmTest", "release", json!({"note": "x"})),
    )
    .await?;
    let chart = wait_config_map(&client, &ns.name, "release-chart").await?;
    let chart_managers = managers(&chart.metadata);
    let helms = test_api(&client, &ns.name, "HelmTest");
    let parent = wait_for(
        "release's status written by kuwa/helm/status",
        CONVERGE,
        || {
            let helms = helms.clone();
            async move {
                let o = helms.get("release").await?;
                let by_host = o.metadata.managed_fields.iter().flatten().any(|m| {
                    m.subresource.as_deref() == Some("status")
                        && m.manager.as_deref() == Some("kuwa/helm/status")
                });
                Ok((by_host && o.data["status"]["ok"] == true).then_some(o))
            }
        },
    )
    .await?;
    let parent_managers: Vec<(String, String)> = parent
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .map(|m| {
            (
                m.manager.clone().unwrap_or_default(),
                m.subresource.clone().unwrap_or_default(),
            )
        })
        .collect();
    println!("release-chart managers: {chart_managers:?}; release managers: {parent_managers:?}");
    assert!(
        chart_managers.iter().any(|m| m == "kuwa/helm"),
        "{chart_managers:?}"
    );
    assert!(
        !chart_managers.iter().any(|m| m == "helm"),
        "{chart_managers:?}"
    );
    assert!(
        parent_managers
            .iter()
            .all(|(m, _)| m == "e2e" || m.starts_with("kuwa/helm/")),
        "a parent write under a manager outside kuwa/helm/*: {parent_managers:?}"
    );
    // The other plugin too.
    let content = wait_config_map(&client, &ns.name, "site-content").await?;
    let content_managers = managers(&content.metadata);
    println!("site-content managers: {content_managers:?}");
    assert!(
        content_managers.iter().any(|m| m == "kuwa/webserver"),
        "{content_managers:?}"
    );
    assert!(
        !content_managers.iter().any(|m| m == "webserver"),
        "{content_managers:?}"
    );
    // Plugin names are unique per host: a second file describing `helm`
    // is refused, and the first keeps serving.
    replace_file(
        &host.plugins_dir,
        "helm-again.wasm",
        &std::fs::read(test_plugin("helm")?)?,
    )?;
    wait_load_error(&host, "helm-again", "incompatible").await?;
    assert!(
        host.log()
            .lines()
            .any(|l| l.contains("helm-again.wasm") && l.contains("plugin helm is already served")),
        "{}",
        host.log_tail(20)
    );
    change_content(&client, &ns.name, "site", "after").await?;
    drop(host);
    ns.cleanup().await;
    Ok(())
}

// ---------------------------------------------------- hole 4: reading

/// The base64 form of `bytes`, as Secret data appears in JSON.
fn base64(bytes: &[u8]) -> Result<String> {
    Ok(serde_json::to_value(ByteString(bytes.to_vec()))?
        .as_str()
        .context("ByteString serializes to a string")?
        .to_owned())
}

async fn create_secret(client: &Client, ns: &str, name: &str, token: &str) -> Result<()> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            ..ObjectMeta::default()
        },
        data: Some(
            [("token".to_owned(), ByteString(token.as_bytes().to_vec()))]
                .into_iter()
                .collect(),
        ),
        ..Secret::default()
    };
    secrets.create(&PostParams::default(), &secret).await?;
    Ok(())
}

/// `status.seen` of SnoopTest `name`, once it has one.
async fn seen(api: &Api<DynamicObject>, name: &str) -> Result<Option<Vec<String>>> {
    let o = api.get(name).await?;
    Ok(o.data["status"]["seen"].as_array().map(|a| {
        a.iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect()
    }))
}

/// Waits until SnoopTest `name` has seen `want`; returns everything it saw.
async fn wait_seen(api: &Api<DynamicObject>, name: &str, want: &str) -> Result<Vec<String>> {
    wait_for(
        &format!("{name} to see {want:?}"),
        CONVERGE,
        || async move {
            Ok(seen(api, name)
                .await?
                .filter(|s| s.iter().any(|e| e == want)))
        },
    )
    .await
}

/// Hole 4: related objects reach a plugin only from its granted namespaces,
/// whatever mapping it declares (`AllInCluster` on Secrets here), with the
/// host scoped by `--namespace` as [`KuwaHost`] always is.
#[tokio::test(flavor = "multi_thread")]
async fn related_secrets_come_only_from_granted_namespaces() -> Result<()> {
    let client = client().await?;
    let mine = TestNamespace::new(&client, "tenant-snoop").await?;
    let theirs = TestNamespace::new(&client, "tenant-snoop-other").await?;
    create_secret(&client, &mine.name, "mine", "my-token").await?;
    create_secret(&client, &theirs.name, "theirs", "their-token").await?;
    let manifest = format!(
        "installCrd: true\nrelatedKinds: [v1/Secret]\nnamespaces: [{}]\n",
        mine.name
    );
    let host = KuwaHost::start_with(
        &mine.name,
        &[plugin("webserver")?, test_plugin("snoop")?],
        &[("webserver", WEBSERVER_MANIFEST), ("snoop", &manifest)],
        &[],
    )
    .await?;
    start_webserver(&client, &mine.name, "site", "before").await?;
    let snoops = test_api(&client, &mine.name, "SnoopTest");
    apply_json(
        &client,
        &mine.name,
        &test_object("SnoopTest", "spy", json!({})),
    )
    .await?;
    let want = format!("{}/mine=token:{}", mine.name, base64(b"my-token")?);
    wait_seen(&snoops, "spy", &want).await?;

    // Later Secrets: the granted one reaches it, the other does not.
    create_secret(&client, &theirs.name, "theirs-later", "x").await?;
    create_secret(&client, &mine.name, "mine-later", "y").await?;
    let want = format!("{}/mine-later=token:{}", mine.name, base64(b"y")?);
    let seen = wait_seen(&snoops, "spy", &want).await?;
    println!("spy saw {seen:?}");
    assert!(
        seen.iter()
            .all(|s| s.starts_with(&format!("{}/", mine.name))),
        "a Secret from outside the granted namespace reached the plugin: {seen:?}"
    );
    change_content(&client, &mine.name, "site", "after").await?;
    drop(host);
    mine.cleanup().await;
    theirs.cleanup().await;
    Ok(())
}

/// Hole 4, the stronger form: a host watching the whole cluster still shows
/// a plugin granted `namespaces: [A]` only A's Secrets, and does not
/// reconcile its parents elsewhere.
#[tokio::test(flavor = "multi_thread")]
async fn a_cluster_wide_host_shows_related_secrets_only_from_granted_namespaces() -> Result<()> {
    let client = client().await?;
    let mine = TestNamespace::new(&client, "tenant-snoop-all").await?;
    let theirs = TestNamespace::new(&client, "tenant-snoop-all-other").await?;
    create_secret(&client, &mine.name, "mine", "my-token").await?;
    create_secret(&client, &theirs.name, "theirs", "their-token").await?;
    let manifest = format!(
        "installCrd: true\nrelatedKinds: [v1/Secret]\nnamespaces: [{}]\n",
        mine.name
    );
    let kubeconfig = tokio::task::spawn_blocking(kubeconfig_path).await??;
    let host = KuwaHost::start_as(
        &kubeconfig,
        None,
        &[test_plugin("snoop")?],
        &[("snoop", &manifest)],
        &[],
    )
    .await?;
    let my_snoops = test_api(&client, &mine.name, "SnoopTest");
    let their_snoops = test_api(&client, &theirs.name, "SnoopTest");
    apply_json(
        &client,
        &mine.name,
        &test_object("SnoopTest", "spy", json!({})),
    )
    .await?;
    apply_json(
        &client,
        &theirs.name,
        &test_object("SnoopTest", "spy", json!({})),
    )
    .await?;
    let want = format!("{}/mine=token:{}", mine.name, base64(b"my-token")?);
    wait_seen(&my_snoops, "spy", &want)
        .await
        .with_context(|| host.log())?;
    create_secret(&client, &theirs.name, "theirs-later", "x").await?;
    create_secret(&client, &mine.name, "mine-later", "y").await?;
    let want = format!("{}/mine-later=token:{}", mine.name, base64(b"y")?);
    let seen_mine = wait_seen(&my_snoops, "spy", &want).await?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let seen_theirs = seen(&their_snoops, "spy").await?;
    println!(
        "cluster-wide host: spy in {} saw {seen_mine:?}; spy in {} saw {seen_theirs:?}",
        mine.name, theirs.name
    );
    assert!(
        seen_mine
            .iter()
            .all(|s| s.starts_with(&format!("{}/", mine.name))),
        "a Secret from outside the granted namespace reached the plugin: {seen_mine:?}"
    );
    assert_eq!(
        seen_theirs, None,
        "a parent outside the granted namespaces was reconciled"
    );
    drop(host);
    mine.cleanup().await;
    theirs.cleanup().await;
    Ok(())
}

/// Hole 4: a plugin reconciling Pods without `parentKind: v1/Pod`, and one
/// declaring a related kind its manifest does not list, are refused at load
/// (reason "grant"); the WebServer plugin loads and works.
#[tokio::test(flavor = "multi_thread")]
async fn ungranted_parent_and_related_kinds_are_refused_at_load() -> Result<()> {
    let client = client().await?;
    let ns = TestNamespace::new(&client, "tenant-grant").await?;
    // A Pod the Pod plugin would reconcile; gated, so it is never scheduled.
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    pods.create(
        &PostParams::default(),
        &serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "bystander"},
            "spec": {
                "schedulingGates": [{"name": "kuwa.dev/e2e-never"}],
                "containers": [{"name": "c", "image": "registry.k8s.io/pause:3.10"}],
            },
        }))?,
    )
    .await?;
    let host = KuwaHost::start_with(
        &ns.name,
        &[
            plugin("webserver")?,
            test_plugin("pod-parent")?,
            test_plugin("snoop")?,
        ],
        &[
            ("webserver", WEBSERVER_MANIFEST),
            ("pod-parent", &own_manifest("pod-parent")?),
            // No relatedKinds: the declared v1/Secret is not granted.
            ("snoop", "installCrd: true\n"),
        ],
        &[],
    )
    .await?;
    let pod_parent = wait_load_error(&host, "pod-parent", "grant").await?;
    let snoop = wait_load_error(&host, "snoop", "grant").await?;
    println!("grant load errors: pod-parent {pod_parent}, snoop {snoop}");
    let log = host.log();
    let refusal: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("pod-parent"))
        .filter(|l| {
            let l = l.to_ascii_lowercase();
            l.contains("refus") || l.contains("grant")
        })
        .collect();
    assert!(
        !refusal.is_empty(),
        "no log line refusing pod-parent:\n{}",
        host.log_tail(40)
    );
    println!("logged: {}", refusal[0]);

    start_webserver(&client, &ns.name, "site", "before").await?;
    change_content(&client, &ns.name, "site", "after").await?;
    // The refused Pod plugin never touched the Pod.
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns.name);
    assert!(cms.get_opt("bystander-seen").await?.is_none());
    let pod = pods.get("bystander").await?;
    let pod_managers = managers(&pod.metadata);
    assert!(
        pod.finalizers().is_empty()
            && !pod_managers
                .iter()
                .any(|m| m == "test-pod-parent" || m.starts_with("kuwa/")),
        "the Pod was written to: {:?}",
        pod.metadata
    );
    drop(host);
    ns.cleanup().await;
    Ok(())
}

// ------------------------------------------------------- hole 5: CRDs

/// Hole 5: a carried CRD with a conversion webhook is refused (reason
/// "crd") and never installed; the WebServer plugin's CRD is.
#[tokio::test(flavor = "multi_thread")]
async fn a_crd_with_a_conversion_webhook_is_not_installed() -> Result<()> {
    const CRD: &str = "webhooktests.test.kuwa.dev";
    let client = client().await?;
    let ns = TestNamespace::new(&client, "tenant-crd").await?;
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    // A leftover from an older host would make the check below meaningless.
    if crds.get_opt(CRD).await?.is_some() {
        crds.delete(CRD, &DeleteParams::default()).await?;
        wait_for(&format!("leftover {CRD} to be deleted"), CONVERGE, || {
            let crds = crds.clone();
            async move { Ok(crds.get_opt(CRD).await?.is_none().then_some(())) }
        })
        .await?;
    }
    let host = KuwaHost::start_with(
        &ns.name,
        &[plugin("webserver")?, test_plugin("crd-webhook")?],
        &[
            ("webserver", WEBSERVER_MANIFEST),
            ("crd-webhook", &own_manifest("crd-webhook")?),
        ],
        &[],
    )
    .await?;
    let refused = wait_load_error(&host, "crd-webhook", "crd").await?;
    start_webserver(&client, &ns.name, "site", "before").await?;
    let crd_writes: Vec<String> = host
        .metrics()
        .await?
        .lines()
        .filter(|l| l.starts_with("kuwa_api_writes_total") && l.contains("verb=\"crd\""))
        .map(str::to_owned)
        .collect();
    println!("crd load errors: {refused}; CRD writes: {crd_writes:?}");
    assert!(
        crds.get_opt(CRD).await?.is_none(),
        "{CRD} was installed with its conversion webhook"
    );
    assert!(
        !crd_writes
            .iter()
            .any(|l| l.contains("plugin=\"test-crd-webhook\"")),
        "{crd_writes:?}"
    );
    assert!(crds.get_opt("webservers.kuwa.dev").await?.is_some());
    change_content(&client, &ns.name, "site", "after").await?;
    drop(host);
    ns.cleanup().await;
    Ok(())
}

// -------------------------------------------------- hole 6: quarantine

/// Hole 6: a quarantined plugin is called at most once per
/// quarantineInterval, however many keys, resyncs (every 1 s) and
/// `POST /resync` calls (every 500 ms) there are.
#[tokio::test(flavor = "multi_thread")]
async fn a_quarantined_plugin_is_probed_once_per_interval() -> Result<()> {
    const INTERVAL_S: f64 = 5.0;
    const WINDOW: Duration = Duration::from_secs(20);
    let client = client().await?;
    let ns = TestNamespace::new(&client, "tenant-quarantine").await?;
    let host = KuwaHost::start_with(
        &ns.name,
        &[plugin("webserver")?, test_plugin("trap")?],
        &[
            ("webserver", WEBSERVER_MANIFEST),
            (
                "trap",
                "installCrd: true\nquarantineAfter: 2\nquarantineInterval: 5s\n",
            ),
        ],
        &["--resync-period", "1s"],
    )
    .await?;
    start_webserver(&client, &ns.name, "site", "before").await?;
    for i in 0..5 {
        apply_json(
            &client,
            &ns.name,
            &test_object("TrapTest", &format!("trap-{i}"), json!({})),
        )
        .await?;
    }
    wait_metric(
        &host,
        "kuwa_plugin_quarantined",
        &[("plugin", "test-trap")],
        "== 1",
        |v| v == 1.0,
    )
    .await?;
    // Calls already running when the quarantine began are not probes.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let labels = [("plugin", "test-trap")];
    let before = present(&host.metrics().await?, "kuwa_reconciles_total", &labels)?;
    let resyncs = async {
        let started = Instant::now();
        let mut n = 0u32;
        while started.elapsed() < WINDOW {
            host.resync().await?;
            n += 1;
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        anyhow::Ok(n)
    };
    let web = change_content(&client, &ns.name, "site", "during");
    let (resyncs, web) = tokio::join!(resyncs, web);
    let (resyncs, web) = (resyncs?, web?);
    let text = host.metrics().await?;
    let calls = present(&text, "kuwa_reconciles_total", &labels)? - before;
    let bound = WINDOW.as_secs_f64() / INTERVAL_S + 1.0;
    println!(
        "quarantined trap: {calls} calls in {WINDOW:?} with 5 keys, resync every 1 s and {resyncs} POST /resync (bound {bound}); \
         WebServer change converged in {web:?} meanwhile"
    );
    assert!(
        calls <= bound,
        "{calls} calls in {WINDOW:?}, at most {bound} allowed"
    );
    assert!(
        calls >= 1.0,
        "no probe at all in {WINDOW:?}: the counter is not moving"
    );
    assert_eq!(
        present(&text, "kuwa_plugin_quarantined", &labels)?,
        1.0,
        "a failing probe lifted the quarantine"
    );
    change_content(&client, &ns.name, "site", "after").await?;
    drop(host);
    ns.cleanup().await;
    Ok(())
}

// ------------------------------------------------ hole 7: bad manifests

/// Hole 7: out-of-range manifest values are load errors (reason "manifest")
/// and the host keeps running and serving the other plugins.
#[tokio::test(flavor = "multi_thread")]
async fn bad_manifest_values_are_refused_and_the_host_keeps_running() -> Result<()> {
    // Each bad value on a different plugin (names differ, so a refusal
    // cannot be mistaken for a duplicate-name refusal).
    let bad = [
        ("fanout", "installCrd: true\nwritesPerSecond: 1e-300\n"),
        ("rogue", "installCrd: true\nwritesPerSecond: .inf\n"),
        ("spin", "installCrd: true\nwriteBurst: 0\n"),
        ("hog", "installCrd: true\nconcurrency: 513\n"),
        ("trap", "installCrd: true\nquarantineAfter: 0\n"),
        ("garbage", "installCrd: true\nnoSuchField: 1\n"),
    ];
    let client = client().await?;
    let ns = TestNamespace::new(&client, "tenant-manifest").await?;
    let mut plugins = vec![plugin("webserver")?];
    let mut manifests = vec![("webserver", WEBSERVER_MANIFEST)];
    for (stem, yaml) in bad {
        plugins.push(test_plugin(stem)?);
        manifests.push((stem, yaml));
    }
    let mut host = KuwaHost::start_with(&ns.name, &plugins, &manifests, &[]).await?;
    for (stem, yaml) in bad {
        let n = wait_load_error(&host, stem, "manifest").await?;
        println!("{stem}: {:?} -> {n} manifest load error(s)", yaml.trim());
    }
    assert!(host.is_running());
    let (code, body) = http(host.addr, "GET", "/healthz").await?;
    assert_eq!(code, 200, "/healthz: {body}");
    start_webserver(&client, &ns.name, "site", "before").await?;
    change_content(&client, &ns.name, "site", "after").await?;
    assert!(host.is_running());
    drop(host);
    ns.cleanup().await;
    Ok(())
}

// --------------------------------------------- hole 8: output validation

/// The start of every line the noisy plugin logs (tests/plugins/noisy).
const NOISY_MARKER: &str = "noisy-log-line";

/// Removes the finalizers of ConfigMap `name` if it exists (a host that let
/// the `finalizer` mode through would otherwise block the namespace's
/// deletion). Returns whether it existed.
async fn strip_finalizers(client: &Client, ns: &str, name: &str) -> bool {
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    match cms.get_opt(name).await {
        Ok(Some(_)) => {
            let _ = cms
                .patch(
                    name,
                    &PatchParams::default(),
                    &Patch::Merge(json!({"metadata": {"finalizers": null}})),
                )
                .await;
            true
        }
        _ => false,
    }
}

/// Hole 8: an event flood, a bad event reason, a child with finalizers and a
/// child wearing the host's own label each reject the whole output; a log
/// flood is capped per call and counted; the WebServer plugin goes on.
#[tokio::test(flavor = "multi_thread")]
async fn output_past_the_limits_is_rejected_whole_and_logs_are_capped() -> Result<()> {
    let client = client().await?;
    let ns = TestNamespace::new(&client, "tenant-noisy").await?;
    let result = noisy(&client, &ns.name).await;
    if strip_finalizers(&client, &ns.name, "finalizer-ok").await && result.is_ok() {
        bail!("finalizer-ok exists (its finalizers were removed for cleanup)");
    }
    ns.cleanup().await;
    result
}

async fn noisy(client: &Client, ns: &str) -> Result<()> {
    const MAX_LOG_LINES: f64 = 100.0;
    let host = KuwaHost::start_with(
        ns,
        &[plugin("webserver")?, test_plugin("noisy")?],
        &[
            ("webserver", WEBSERVER_MANIFEST),
            ("noisy", &own_manifest("noisy")?),
        ],
        &[],
    )
    .await?;
    start_webserver(client, ns, "site", "before").await?;
    let noisies = test_api(client, ns, "NoisyTest");
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), ns);

    // The log flood first, alone, so every call of the plugin is one of its.
    apply_json(
        client,
        ns,
        &test_object("NoisyTest", "log", json!({"mode": "log"})),
    )
    .await?;
    wait_config_map(client, ns, "log-ok").await?;
    host.wait_idle(Duration::from_secs(3), CONVERGE).await?;
    let log = host.log();
    let lines: Vec<&str> = log.lines().filter(|l| l.contains(NOISY_MARKER)).collect();
    let text = host.metrics().await?;
    let calls = present(&text, "kuwa_reconciles_total", &[("plugin", "test-noisy")])?;
    let dropped = present(
        &text,
        "kuwa_plugin_log_dropped_total",
        &[("plugin", "test-noisy")],
    )?;
    let longest = lines.iter().map(|l| l.len()).max().unwrap_or(0);
    println!(
        "log flood: {calls} call(s) of 5000 lines x 8 KiB; {} lines reached the log (longest {longest} bytes), {dropped} dropped",
        lines.len()
    );
    assert!(calls >= 1.0);
    assert!(!lines.is_empty(), "no line of the plugin reached the log");
    assert!(
        lines.len() as f64 <= (MAX_LOG_LINES + 5.0) * calls,
        "{} lines from {calls} call(s)",
        lines.len()
    );
    assert!(
        dropped >= 5000.0 - MAX_LOG_LINES,
        "{dropped} lines counted as dropped"
    );
    // Lines are cut at 4096 bytes (the rest of a log line is the host's
    // timestamp, level and fields).
    assert!(longest < 4096 + 1024, "a {longest}-byte log line");

    // A plain one works; each bad one is rejected whole.
    apply_json(
        client,
        ns,
        &test_object("NoisyTest", "plain", json!({"mode": "plain"})),
    )
    .await?;
    let modes = ["events", "reason", "finalizer", "label"];
    for mode in modes {
        apply_json(
            client,
            ns,
            &test_object("NoisyTest", mode, json!({"mode": mode})),
        )
        .await?;
    }
    wait_config_map(client, ns, "plain-ok").await?;
    let during = change_content(client, ns, "site", "during").await?;
    println!("WebServer change converged in {during:?} while the noisy outputs were rejected");
    for mode in modes {
        let events = wait_event(client, ns, mode, "InvalidOutput").await?;
        assert_eq!(events[0].type_.as_deref(), Some("Warning"));
        println!("{mode}: {:?}", events[0].note);
        wait_degraded(&noisies, mode, "True", "InvalidOutput").await?;
    }
    let spam = events_with_reason(client, ns, "events", "Spam").await?;
    assert!(spam.is_empty(), "{} Spam events recorded", spam.len());
    for mode in modes {
        let name = format!("{mode}-ok");
        assert!(
            cms.get_opt(&name).await?.is_none(),
            "{name} exists: the output was half applied"
        );
    }
    change_content(client, ns, "site", "after").await?;
    Ok(())
}

// -------------------------------------------------- hole 10: finalizers

const FINALIZER: &str = "test.kuwa.dev/finalizer";

async fn wait_finalizer(api: &Api<DynamicObject>, name: &str, want: bool) -> Result<()> {
    let what = if want { "to carry" } else { "to lose" };
    wait_for(
        &format!("{name} {what} {FINALIZER}"),
        CONVERGE,
        || async move {
            let o = api.get(name).await?;
            Ok((finalizers(&o).iter().any(|f| f == FINALIZER) == want).then_some(()))
        },
    )
    .await
}

async fn wait_gone(api: &Api<DynamicObject>, name: &str) -> Result<Duration> {
    let started = Instant::now();
    wait_for(&format!("{name} to be gone"), CONVERGE, || async move {
        Ok(api.get_opt(name).await?.is_none().then_some(()))
    })
    .await?;
    Ok(started.elapsed())
}

/// Hole 10: a new version that no longer asks for a finalizer releases the
/// parents (the host removes its finalizer), so they can be deleted.
#[tokio::test(flavor = "multi_thread")]
async fn a_version_dropping_the_finalizer_releases_parents() -> Result<()> {
    let client = client().await?;
    let ns = TestNamespace::new(&client, "tenant-finalizer-off").await?;
    let host = KuwaHost::start_with(
        &ns.name,
        &[plugin("webserver")?, test_plugin("finalizer")?],
        &[
            ("webserver", WEBSERVER_MANIFEST),
            ("finalizer", "installCrd: true\n"),
        ],
        &[],
    )
    .await?;
    start_webserver(&client, &ns.name, "site", "before").await?;
    let api = test_api(&client, &ns.name, "FinalizerTest");
    apply_json(
        &client,
        &ns.name,
        &test_object("FinalizerTest", "swapped", json!({"note": "x"})),
    )
    .await?;
    wait_finalizer(&api, "swapped", true).await?;

    let swap = Instant::now();
    replace_file(
        &host.plugins_dir,
        "finalizer.wasm",
        &std::fs::read(test_plugin("finalizer-off")?)?,
    )?;
    wait_finalizer(&api, "swapped", false)
        .await
        .with_context(|| host.log_tail(40))?;
    let released = swap.elapsed();
    api.delete("swapped", &DeleteParams::default()).await?;
    let gone = wait_gone(&api, "swapped").await?;
    println!("finalizer removed {released:?} after the swap; parent gone {gone:?} after delete");
    change_content(&client, &ns.name, "site", "after").await?;
    drop(host);
    ns.cleanup().await;
    Ok(())
}

/// Hole 10: narrowing a plugin's grant away from a namespace releases the
/// host's finalizer there (the one write the host still makes outside the
/// grant), so the parent can be deleted; nothing else is written there.
#[tokio::test(flavor = "multi_thread")]
async fn narrowing_a_grant_releases_the_finalizers_it_no_longer_covers() -> Result<()> {
    let client = client().await?;
    let ns = TestNamespace::new(&client, "tenant-finalizer-narrow").await?;
    let grant = format!("installCrd: true\nnamespaces: [{}]\n", ns.name);
    let host = KuwaHost::start_with(
        &ns.name,
        &[plugin("webserver")?, test_plugin("finalizer")?],
        &[("webserver", WEBSERVER_MANIFEST), ("finalizer", &grant)],
        &[],
    )
    .await?;
    start_webserver(&client, &ns.name, "site", "before").await?;
    let api = test_api(&client, &ns.name, "FinalizerTest");
    apply_json(
        &client,
        &ns.name,
        &test_object("FinalizerTest", "kept", json!({"note": "x"})),
    )
    .await?;
    wait_finalizer(&api, "kept", true).await?;
    let narrowed = Instant::now();
    replace_file(
        &host.plugins_dir,
        "finalizer.yaml",
        b"installCrd: true\nnamespaces: [somewhere-else]\n",
    )?;
    wait_finalizer(&api, "kept", false)
        .await
        .with_context(|| host.log_tail(30))?;
    println!(
        "grant narrowed: finalizer released {:?} later",
        narrowed.elapsed()
    );
    api.delete("kept", &DeleteParams::default()).await?;
    let gone = wait_gone(&api, "kept").await?;
    println!("parent gone {gone:?} after delete");
    change_content(&client, &ns.name, "site", "after").await?;
    drop(host);
    ns.cleanup().await;
    Ok(())
}

/// Hole 10: removing a plugin file releases its parents: one held in
/// deletion goes away, an idle one loses the host's finalizer.
#[tokio::test(flavor = "multi_thread")]
async fn removing_a_plugin_releases_its_parents() -> Result<()> {
    let client = client().await?;
    let ns = TestNamespace::new(&client, "tenant-finalizer-rm").await?;
    let host = KuwaHost::start_with(
        &ns.name,
        &[plugin("webserver")?, test_plugin("finalizer")?],
        &[
            ("webserver", WEBSERVER_MANIFEST),
            ("finalizer", "installCrd: true\n"),
        ],
        &[],
    )
    .await?;
    start_webserver(&client, &ns.name, "site", "before").await?;
    let api = test_api(&client, &ns.name, "FinalizerTest");
    for name in ["held", "idle"] {
        apply_json(
            &client,
            &ns.name,
            &test_object("FinalizerTest", name, json!({"note": "x"})),
        )
        .await?;
    }
    for name in ["held", "idle"] {
        wait_finalizer(&api, name, true).await?;
    }
    // The finalizer is the first write of a reconcile, so it shows before
    // the reconcile is counted: wait for both parents' counts, then idle.
    wait_metric(
        &host,
        "kuwa_reconciles_total",
        &[("plugin", "test-finalizer")],
        "to count both parents' first reconciles",
        |n| n >= 2.0,
    )
    .await?;
    host.wait_idle(Duration::from_secs(2), CONVERGE).await?;
    // Deleted without the release annotation: finalize says "not yet".
    let calls = present(
        &host.metrics().await?,
        "kuwa_reconciles_total",
        &[("plugin", "test-finalizer")],
    )?;
    api.delete("held", &DeleteParams::default()).await?;
    wait_metric(
        &host,
        "kuwa_reconciles_total",
        &[("plugin", "test-finalizer")],
        "to count finalize calls while held",
        |n| n >= calls + 2.0,
    )
    .await?;
    let held = api.get("held").await?;
    assert!(held.metadata.deletion_timestamp.is_some());
    assert!(finalizers(&held).iter().any(|f| f == FINALIZER), "not held");

    let removed = Instant::now();
    std::fs::remove_file(host.plugins_dir.join("finalizer.wasm"))?;
    let gone = wait_gone(&api, "held")
        .await
        .with_context(|| host.log_tail(40))?;
    wait_finalizer(&api, "idle", false).await?;
    println!(
        "plugin removed: held parent gone after {gone:?}, idle parent released after {:?}",
        removed.elapsed()
    );
    change_content(&client, &ns.name, "site", "after").await?;
    drop(host);
    ns.cleanup().await;
    Ok(())
}

// ------------------------------------------------------ hole 11: memory

/// Hole 11: child kinds are watched by the host's label only: 2,000
/// unlabelled ConfigMaps do not enter the cache (kuwa_cache_objects).
#[tokio::test(flavor = "multi_thread")]
async fn unlabelled_objects_of_a_child_kind_are_not_cached() -> Result<()> {
    const FILLER: usize = 2000;
    let client = client().await?;
    let ns = TestNamespace::new(&client, "tenant-cache").await?;
    let host = KuwaHost::start_with(
        &ns.name,
        &[plugin("webserver")?],
        &[("webserver", WEBSERVER_MANIFEST)],
        &[],
    )
    .await?;
    start_webserver(&client, &ns.name, "site", "before").await?;
    let labels = [("kind", "v1/ConfigMap")];
    let before = wait_metric(&host, "kuwa_cache_objects", &labels, ">= 1", |n| n >= 1.0).await?;
    let rss_before = rss_kib(host.pid());

    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns.name);
    let started = Instant::now();
    futures::stream::iter(0..FILLER)
        .map(|i| {
            let cms = cms.clone();
            async move {
                let cm = ConfigMap {
                    metadata: ObjectMeta {
                        name: Some(format!("filler-{i}")),
                        ..ObjectMeta::default()
                    },
                    data: Some([("v".to_owned(), "x".repeat(512))].into_iter().collect()),
                    ..ConfigMap::default()
                };
                cms.create(&PostParams::default(), &cm).await.map(|_| ())
            }
        })
        .buffer_unordered(32)
        .try_collect::<Vec<()>>()
        .await?;
    let created = started.elapsed();
    tokio::time::sleep(Duration::from_secs(5)).await;
    host.wait_idle(Duration::from_secs(3), CONVERGE).await?;
    let after = present(&host.metrics().await?, "kuwa_cache_objects", &labels)?;
    let rss_after = rss_kib(host.pid());
    println!(
        "cached ConfigMaps: {before} before, {after} after {FILLER} unlabelled ones (created in {created:?}); \
         host RSS {rss_before:?} -> {rss_after:?} KiB"
    );
    assert_eq!(after, before, "unlabelled ConfigMaps entered the cache");

    // The gauge is live: the next WebServer's ConfigMap is counted.
    start_webserver(&client, &ns.name, "site2", "two").await?;
    let more = wait_metric(
        &host,
        "kuwa_cache_objects",
        &labels,
        &format!("> {before}"),
        |n| n > before,
    )
    .await?;
    println!("after a second WebServer: {more}");
    drop(host);
    ns.cleanup().await;
    Ok(())
}

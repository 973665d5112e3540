//! End-to-end: one test per fault (issue 13), each ending with the whole
//! namespace matching the reference model (`kuwa_e2e::reference`): every
//! child the plugins want, with their fields, no orphan, no duplicate, every
//! status at the plugin's fixed point. Each prints its figures: time to
//! converge after the fault, relists, writes.
//!
//! The API server faults use a second kube-apiserver on the cluster's etcd
//! (`kuwa_e2e::faults::SpareApiServer`) that only the host under test talks
//! to, so stopping it disturbs nothing else while the test keeps changing
//! objects through the cluster's own API server.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use kube::Client;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kuwa_e2e::faults::{LocalCluster, SpareApiServer, compact_etcd};
use kuwa_e2e::firewall::Firewall;
use kuwa_e2e::host::{KuwaHost, apply_json, http, metric_sample, plugin, sum_metric};
use kuwa_e2e::objects::{firewall_policy, security_policies, webserver, webservers};
use kuwa_e2e::reference::{Model, wait_clean};
use kuwa_e2e::{TestNamespace, client, wait_for};
use serde_json::json;

const CONVERGE: Duration = Duration::from_secs(240);
/// How long the API server stays away in the outage tests.
const OUTAGE: Duration = Duration::from_secs(15);
const WEBSERVER_KIND: &str = "kuwa.dev/v1alpha1/WebServer";

/// One fault at a time: each stops servers or kills hosts and loads the
/// two cores, and their figures mean more alone.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn create_webservers(
    client: &Client,
    ns: &str,
    names: &[String],
    content: &str,
) -> Result<()> {
    for chunk in names.chunks(20) {
        futures::future::try_join_all(
            chunk
                .iter()
                .map(|n| async move { apply_json(client, ns, &webserver(n, content, 1)).await }),
        )
        .await?;
    }
    Ok(())
}

fn names(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i}")).collect()
}

/// The figures of a metric text that the tests print: relists, writes,
/// reconciles, watch errors by reason.
#[derive(Debug, Clone, Copy, Default)]
struct Figures {
    lists: f64,
    writes: f64,
    reconciles: f64,
    gone: f64,
    unreachable: f64,
}

impl Figures {
    fn of(text: &str) -> Self {
        Self {
            lists: sum_metric(text, "kuwa_watch_lists_total", &[]),
            writes: sum_metric(text, "kuwa_api_writes_total", &[]),
            reconciles: sum_metric(text, "kuwa_reconciles_total", &[]),
            gone: sum_metric(text, "kuwa_watch_errors_total", &[("reason", "gone")]),
            unreachable: sum_metric(
                text,
                "kuwa_watch_errors_total",
                &[("reason", "unreachable")],
            ) + sum_metric(
                text,
                "kuwa_watch_errors_total",
                &[("reason", "unavailable")],
            ),
        }
    }

    fn since(self, before: Self) -> Self {
        Self {
            lists: self.lists - before.lists,
            writes: self.writes - before.writes,
            reconciles: self.reconciles - before.reconciles,
            gone: self.gone - before.gone,
            unreachable: self.unreachable - before.unreachable,
        }
    }
}

async fn readyz(host: &KuwaHost) -> Result<u16> {
    Ok(http(host.addr, "GET", "/readyz").await?.0)
}

/// The lines of the host's log at warn that say an outage began or ended.
fn outage_lines(host: &KuwaHost) -> (usize, usize) {
    let log = host.log();
    let lost = log
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("lost the API server"))
        .count();
    let back = log
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("the API server answers again"))
        .count();
    (lost, back)
}

/// API server restart: the outage is visible (a warn line when it starts
/// and one when it ends, `kuwa_api_reachable` 0, `/readyz` 503), changes
/// made meanwhile are picked up, and the namespace converges with no
/// duplicate child.
#[tokio::test(flavor = "multi_thread")]
async fn an_api_server_restart_is_visible_and_converges_without_duplicates() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let client = client().await?;
    let ns = TestNamespace::new(&client, "fault-restart").await?;
    let mut spare = SpareApiServer::start().await?;
    let host = KuwaHost::start_as(
        spare.kubeconfig(),
        Some(&ns.name),
        &[plugin("webserver")?],
        &[],
        &[],
    )
    .await?;
    let models = [Model::webserver()];
    let first = names("site", 20);
    create_webservers(&client, &ns.name, &first, "v1").await?;
    wait_clean(&client, &ns.name, &models, 20, CONVERGE).await?;
    let before_text = host.metrics().await?;
    let before = Figures::of(&before_text);
    let outages_before = metric_sample(&before_text, "kuwa_api_outages_total", &[])
        .context("kuwa_api_outages_total is exported")?;

    let stopped = spare.stop().await?;
    let down = Instant::now();
    let noticed = wait_for("/readyz to report the lost API server", OUTAGE, || async {
        Ok((readyz(&host).await? == 503).then_some(down.elapsed()))
    })
    .await?;
    // Meanwhile, through the cluster's own API server: 5 changed, 5 new,
    // 3 deleted.
    let api = webservers(&client, &ns.name);
    for n in &first[..5] {
        apply_json(&client, &ns.name, &webserver(n, "v2", 1)).await?;
    }
    create_webservers(&client, &ns.name, &names("late", 5), "v1").await?;
    for n in &first[17..] {
        api.delete(n, &DeleteParams::background()).await?;
    }
    tokio::time::sleep(OUTAGE.saturating_sub(down.elapsed())).await;
    let during = host.metrics().await?;
    assert_eq!(
        metric_sample(&during, "kuwa_api_reachable", &[]),
        Some(0.0),
        "the outage shows in kuwa_api_reachable"
    );
    let restarted = spare.resume().await?;
    let back = Instant::now();
    let (report, took) = wait_clean(&client, &ns.name, &models, 22, CONVERGE).await?;
    wait_for("/readyz ok again", Duration::from_secs(30), || async {
        Ok((readyz(&host).await? == 200).then_some(()))
    })
    .await?;
    let after_text = host.metrics().await?;
    let delta = Figures::of(&after_text).since(before);
    let outages =
        metric_sample(&after_text, "kuwa_api_outages_total", &[]).unwrap_or(0.0) - outages_before;
    assert_eq!(
        metric_sample(&after_text, "kuwa_api_reachable", &[]),
        Some(1.0)
    );
    assert_eq!(outages, 1.0, "one outage counted");
    assert_eq!(
        outage_lines(&host),
        (1, 1),
        "one warn line when the outage began and one when it ended:\n{}",
        host.log_tail(40)
    );
    assert!(
        delta.unreachable > 0.0,
        "the failed watches are counted: {delta:?}"
    );
    assert!(report.duplicates.is_empty() && report.orphans.is_empty());
    println!(
        "api server restart: stopped in {stopped:.1?}, /readyz 503 after {noticed:.1?}, down {:.1?}, \
         restarted in {restarted:.1?}; converged {took:.1?} after it answered ({} parents, {} children, \
         0 duplicates, 0 orphans); relists {}, writes {}, reconciles {}, watch errors (unreachable) {}, \
         410s {}",
        back.duration_since(down),
        report.parent_count(),
        report.children,
        delta.lists,
        delta.writes,
        delta.reconciles,
        delta.unreachable,
        delta.gone
    );
    drop(host);
    ns.cleanup().await;
    Ok(())
}

/// Watch expiry: while the host's API server is away, parents are deleted
/// (two of them with a finalizer that must call a firewall) and etcd is
/// compacted, so every watch resumes with 410 Gone and relists. No delete
/// is lost: the finalizers run, the deleted WebServers leave the host's
/// cache, and a resync afterwards writes nothing.
#[tokio::test(flavor = "multi_thread")]
async fn a_watch_that_expires_relists_and_loses_no_delete() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let client = client().await?;
    let ns = TestNamespace::new(&client, "fault-expiry").await?;
    let cluster = tokio::task::spawn_blocking(LocalCluster::load).await??;
    let firewall = Firewall::start().await?;
    let manifest = format!(
        "installCrd: true\nchildKinds: [networking.k8s.io/v1/NetworkPolicy]\nrelatedKinds: [v1/Node]\n\
         outbound:\n  hosts: [{}]\n",
        firewall.origin()
    );
    let mut spare = SpareApiServer::start().await?;
    let host = KuwaHost::start_as(
        spare.kubeconfig(),
        Some(&ns.name),
        &[plugin("webserver")?, plugin("securitypolicy")?],
        &[("securitypolicy", &manifest)],
        &[],
    )
    .await?;
    let models = [Model::webserver(), Model::securitypolicy()];
    let sites = names("site", 10);
    create_webservers(&client, &ns.name, &sites, "v1").await?;
    for p in ["fw-0", "fw-1", "fw-2"] {
        apply_json(
            &client,
            &ns.name,
            &firewall_policy(p, &firewall.endpoint(), "10.20.0.0/16"),
        )
        .await?;
    }
    wait_clean(&client, &ns.name, &models, 13, CONVERGE).await?;
    let rule = |p: &str| format!("{}-{p}", ns.name);
    for p in ["fw-0", "fw-1", "fw-2"] {
        ensure!(
            firewall.rule(&rule(p)).is_some(),
            "rule {p} on the firewall"
        );
    }
    let before = Figures::of(&host.metrics().await?);

    spare.stop().await?;
    let down = Instant::now();
    let api = webservers(&client, &ns.name);
    for n in &sites[..4] {
        api.delete(n, &DeleteParams::background()).await?;
    }
    let sp = security_policies(&client, &ns.name);
    for p in ["fw-0", "fw-1"] {
        sp.delete(p, &DeleteParams::default()).await?;
    }
    create_webservers(&client, &ns.name, &names("late", 2), "v1").await?;
    let revision = compact_etcd(&cluster).await?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    spare.resume().await?;
    let back = Instant::now();

    // The deleted SecurityPolicies are finalized: their rules are gone
    // from the firewall and the objects with them.
    for p in ["fw-0", "fw-1"] {
        let sp = &sp;
        wait_for(&format!("{p} finalized"), CONVERGE, || async move {
            Ok(sp.get_opt(p).await?.is_none().then_some(()))
        })
        .await?;
        ensure!(
            firewall.rule(&rule(p)).is_none(),
            "the finalizer removed the rule of {p}"
        );
    }
    ensure!(
        firewall.rule(&rule("fw-2")).is_some(),
        "fw-2 keeps its rule"
    );
    let (report, took) = wait_clean(&client, &ns.name, &models, 9, CONVERGE).await?;
    let text = host.metrics().await?;
    let cached = metric_sample(
        &text,
        "kuwa_cache_objects",
        &[("kind", WEBSERVER_KIND), ("view", "all")],
    );
    assert_eq!(
        cached,
        Some(8.0),
        "the host's cache holds exactly the 8 WebServers left"
    );
    let delta = Figures::of(&text).since(before);
    assert!(
        delta.gone > 0.0,
        "the watches resumed with 410 Gone: {delta:?}"
    );
    assert!(delta.lists > 0.0, "the expired watches relisted: {delta:?}");
    // Nothing the relist left behind is reconciled again: no phantom
    // parent's children re-created, nothing written.
    let resync_writes = host.forced_resync_writes("webserver", 8, 1).await?;
    assert_eq!(resync_writes, 0.0, "{}", host.write_metrics().await?);
    println!(
        "watch expiry: etcd compacted at revision {revision}, API server away {:.1?}; converged {took:.1?} \
         after it answered ({} parents, {} children, 0 orphans); relists {}, 410s {}, writes {}, \
         reconciles {}; 2 finalizers ran after the relist; resync afterwards wrote {resync_writes}",
        back.duration_since(down),
        report.parent_count(),
        report.children,
        delta.lists,
        delta.gone,
        delta.writes,
        delta.reconciles
    );
    drop(host);
    ns.cleanup().await;
    Ok(())
}

/// Waits until at least `n` ConfigMaps of the namespace hold `content`.
async fn wait_contents(client: &Client, ns: &str, content: &str, n: usize) -> Result<usize> {
    let api: Api<k8s_openapi::api::core::v1::ConfigMap> = Api::namespaced(client.clone(), ns);
    wait_for(
        &format!("{n} ConfigMaps holding {content:?}"),
        CONVERGE,
        || {
            let api = api.clone();
            async move {
                let have = api
                    .list(&Default::default())
                    .await?
                    .items
                    .iter()
                    .filter(|c| {
                        c.data
                            .as_ref()
                            .and_then(|d| d.get("index.html"))
                            .is_some_and(|v| v == content)
                    })
                    .count();
                Ok((have >= n).then_some(have))
            }
        },
    )
    .await
}

/// `kill -9` of the host while 200 parents are being created, and again
/// while they roll out a new content: the restarted host converges them
/// all with no duplicate child and no orphan.
#[tokio::test(flavor = "multi_thread")]
async fn a_host_killed_mid_rollout_restarts_into_convergence() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let client = client().await?;
    let ns = TestNamespace::new(&client, "fault-kill").await?;
    let models = [Model::webserver()];
    let sites = names("site", 200);
    let mut host = KuwaHost::start(&ns.name, &[plugin("webserver")?], &[]).await?;
    create_webservers(&client, &ns.name, &sites, "v1").await?;
    for (phase, content) in [("create", "v1"), ("rollout", "v2")] {
        if phase == "rollout" {
            create_webservers(&client, &ns.name, &sites, content).await?;
        }
        // Kill once a quarter of the ConfigMaps hold the content, while
        // the host's writes for the rest are in flight.
        let seen = wait_contents(&client, &ns.name, content, 50).await?;
        host.signal(rustix::process::Signal::KILL)?;
        host.wait_exit(Duration::from_secs(10)).await?;
        let killed = Instant::now();
        if seen >= 200 {
            bail!(
                "the {phase} was over before the kill ({seen} ConfigMaps): the test proves nothing"
            );
        }
        host = KuwaHost::start(&ns.name, &[plugin("webserver")?], &[]).await?;
        let (report, took) = wait_clean(&client, &ns.name, &models, 200, CONVERGE).await?;
        let text = host.metrics().await?;
        let f = Figures::of(&text);
        assert!(report.duplicates.is_empty() && report.orphans.is_empty());
        let contents = wait_contents(&client, &ns.name, content, 200).await?;
        assert_eq!(contents, 200);
        println!(
            "kill -9 during the {phase}: {seen}/200 ConfigMaps held {content:?} at the kill; the restarted \
             host converged all 200 in {:.1?} ({took:.1?} of it checking after its start; {} children, \
             0 duplicates, 0 orphans) with {} writes and {} reconciles",
            killed.elapsed(),
            report.children,
            f.writes,
            f.reconciles
        );
    }
    drop(host);
    ns.cleanup().await;
    Ok(())
}

/// A second writer changes fields the plugin owns and deletes children:
/// every drift is repaired and counted, every deleted child re-created.
#[tokio::test(flavor = "multi_thread")]
async fn a_conflicting_writer_is_repaired_and_counted() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let client = client().await?;
    let ns = TestNamespace::new(&client, "fault-drift").await?;
    let host = KuwaHost::start(&ns.name, &[plugin("webserver")?], &[]).await?;
    let models = [Model::webserver()];
    let sites = names("site", 10);
    create_webservers(&client, &ns.name, &sites, "v1").await?;
    wait_clean(&client, &ns.name, &models, 10, CONVERGE).await?;
    let text = host.metrics().await?;
    let repairs = |text: &str, kind: &str| {
        sum_metric(
            text,
            "kuwa_drift_repairs_total",
            &[("plugin", "webserver"), ("kind", kind)],
        )
    };
    let (deploys_before, maps_before) = (
        repairs(&text, "apps/v1/Deployment"),
        repairs(&text, "v1/ConfigMap"),
    );
    let before = Figures::of(&text);

    let intruder = PatchParams::default();
    let deployments: Api<k8s_openapi::api::apps::v1::Deployment> =
        Api::namespaced(client.clone(), &ns.name);
    let maps: Api<k8s_openapi::api::core::v1::ConfigMap> =
        Api::namespaced(client.clone(), &ns.name);
    let services: Api<k8s_openapi::api::core::v1::Service> =
        Api::namespaced(client.clone(), &ns.name);
    let started = Instant::now();
    for n in &sites[..5] {
        deployments
            .patch(
                n,
                &intruder,
                &Patch::Merge(json!({"spec": {"replicas": 3}})),
            )
            .await?;
    }
    for n in &sites[5..8] {
        maps.patch(
            &format!("{n}-content"),
            &intruder,
            &Patch::Merge(json!({"data": {"index.html": "tampered"}})),
        )
        .await?;
    }
    for n in &sites[8..] {
        services.delete(n, &DeleteParams::background()).await?;
    }
    let (report, took) = wait_clean(&client, &ns.name, &models, 10, CONVERGE).await?;
    let text = host.metrics().await?;
    let delta = Figures::of(&text).since(before);
    let deploys = repairs(&text, "apps/v1/Deployment") - deploys_before;
    let configmaps = repairs(&text, "v1/ConfigMap") - maps_before;
    assert!(
        deploys >= 5.0 && configmaps >= 3.0,
        "every drift is counted: {deploys} Deployments, {configmaps} ConfigMaps\n{}",
        text.lines()
            .filter(|l| l.starts_with("kuwa_drift"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    println!(
        "conflicting writer: 5 Deployments and 3 ConfigMaps changed, 2 Services deleted; repaired in \
         {:.1?} ({took:.1?} checking; {} children); drift repairs counted: {deploys} Deployments, \
         {configmaps} ConfigMaps; writes {}, reconciles {}",
        started.elapsed(),
        report.children,
        delta.writes,
        delta.reconciles
    );
    drop(host);
    ns.cleanup().await;
    Ok(())
}

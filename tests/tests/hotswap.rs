//! End-to-end: hot swap of plugins (issue 5) against the real local control
//! plane. Each test runs its own host scoped to its own namespace and changes
//! files in the host's live plugins directory the way a user or `cargo xtask
//! plugins` does: write a temporary dotfile, then rename it over the plugin.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use kube::api::{Api, DynamicObject, ListParams, Patch, PatchParams};
use kube::{Client, Resource};
use kuwa_e2e::host::{KuwaHost, plugin, sum_metric, test_plugin};
use kuwa_e2e::objects::{webserver, webservers};
use kuwa_e2e::{TestNamespace, client, wait_for};

const CONVERGE: Duration = Duration::from_secs(300);
/// How long a file change may take to be loaded (or refused) and reported.
const SWAP: Duration = Duration::from_secs(60);
/// Every child the plugin writes carries this label.
const MANAGED: &str = "app.kubernetes.io/managed-by=kuwa";
/// The label only version 2 of the WebServer plugin puts on its children.
const V2: &str = "test.kuwa.dev/v2=true";

/// Replaces `dir/name` atomically, as `cargo xtask plugins` does: the
/// watcher never sees a half-written plugin file, only a rename.
fn replace_file(dir: &Path, name: &str, bytes: &[u8]) -> Result<()> {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, dir.join(name)).with_context(|| format!("renaming onto {name}"))?;
    Ok(())
}

/// The plugin version that reconciled a parent last, as the host's
/// `Degraded` condition says it (`reconciled by <plugin>@<version>`).
fn reconciled_by(ws: &DynamicObject) -> Option<&str> {
    kuwa_e2e::objects::reconciled_by(&ws.data)
}

/// Waits until all `count` WebServers in `api` were last reconciled by
/// `version` (`name@version`).
async fn wait_reconciled_by(api: &Api<DynamicObject>, count: usize, version: &str) -> Result<()> {
    wait_for(
        &format!("all {count} WebServers reconciled by {version}"),
        CONVERGE,
        || async move {
            let list = api.list(&ListParams::default()).await?.items;
            Ok(
                (list.len() == count && list.iter().all(|ws| reconciled_by(ws) == Some(version)))
                    .then_some(()),
            )
        },
    )
    .await
}

/// Whether the WebServer has converged: `Available=True` for its current
/// generation.
fn converged(ws: &DynamicObject) -> bool {
    let status = &ws.data["status"];
    status["observedGeneration"].as_i64() == ws.meta().generation
        && status["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["type"] == "Available" && c["status"] == "True")
}

/// How many ConfigMaps, Deployments and Services in `ns` match `selector`.
async fn children(client: &Client, ns: &str, selector: &str) -> Result<[usize; 3]> {
    let lp = ListParams::default().labels(selector);
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), ns);
    let services: Api<Service> = Api::namespaced(client.clone(), ns);
    Ok([
        cms.list(&lp).await?.items.len(),
        deployments.list(&lp).await?.items.len(),
        services.list(&lp).await?.items.len(),
    ])
}

/// `kuwa_watch_lists_total` per kind.
fn watch_lists(metrics: &str) -> BTreeMap<String, f64> {
    metrics
        .lines()
        .filter_map(|l| l.strip_prefix("kuwa_watch_lists_total{kind=\""))
        .filter_map(|l| {
            let (kind, rest) = l.split_once('"')?;
            let value = rest.rsplit_once(' ')?.1.parse().ok()?;
            Some((kind.to_owned(), value))
        })
        .collect()
}

async fn wait_metric_above(
    host: &KuwaHost,
    name: &str,
    labels: &[(&str, &str)],
    above: f64,
) -> Result<f64> {
    wait_for(
        &format!("{name}{labels:?} above {above}"),
        SWAP,
        || async move {
            let n = host.metric(name, labels).await?;
            Ok((n > above).then_some(n))
        },
    )
    .await
}

/// Done-when 1: with 200 WebServers converged, replacing the plugin file with
/// version 2 re-reconciles all of them (every child gets v2's label) on the
/// same caches and watches — no list or relist — and the host never restarts.
#[tokio::test(flavor = "multi_thread")]
async fn swapping_in_a_new_version_updates_every_child_without_a_relist() -> Result<()> {
    const COUNT: usize = 200;
    const CHANGED: usize = 50;
    let client = client().await?;
    let ns = TestNamespace::new(&client, "hotswap-200").await?;
    let mut host = KuwaHost::start(
        &ns.name,
        &[plugin("webserver")?],
        &["--plugin-concurrency", "8"],
    )
    .await?;
    let pid = host.pid();
    let api = webservers(&client, &ns.name);
    for i in 0..COUNT {
        let name = format!("ws-{i}");
        api.patch(
            &name,
            &PatchParams::apply("e2e").force(),
            &Patch::Apply(webserver(&name, &format!("page {i}"), 0)),
        )
        .await
        .with_context(|| format!("creating WebServer {name}"))?;
    }
    wait_for(
        &format!("all {COUNT} WebServers to converge"),
        CONVERGE,
        || {
            let api = api.clone();
            async move {
                let list = api.list(&ListParams::default()).await?.items;
                Ok((list.len() == COUNT && list.iter().all(converged)).then_some(()))
            }
        },
    )
    .await?;
    assert_eq!(
        children(&client, &ns.name, MANAGED).await?,
        [COUNT; 3],
        "a ConfigMap, a Deployment and a Service per WebServer"
    );
    assert_eq!(children(&client, &ns.name, V2).await?, [0; 3]);
    wait_reconciled_by(&api, COUNT, "webserver@0.1.0").await?;
    host.wait_idle(Duration::from_secs(3), CONVERGE).await?;
    let before = host.metrics().await?;
    let lists_before = watch_lists(&before);
    assert!(
        lists_before.contains_key("kuwa.dev/v1alpha1/WebServer"),
        "{lists_before:?}"
    );
    let successes_before = sum_metric(
        &before,
        "kuwa_reconciles_total",
        &[("plugin", "webserver"), ("result", "success")],
    );

    // Changes made around the swap are reconciled too: half of them before
    // the file lands, half while it is loaded and swapped in.
    let changed = |i: usize| format!("page {i}, changed around the swap");
    let change = |i: usize| {
        let (api, content) = (api.clone(), changed(i));
        async move {
            let name = format!("ws-{i}");
            api.patch(
                &name,
                &PatchParams::apply("e2e").force(),
                &Patch::Apply(webserver(&name, &content, 0)),
            )
            .await
            .with_context(|| format!("changing WebServer {name}"))
        }
    };
    for i in 0..CHANGED / 2 {
        change(i).await?;
    }
    replace_file(
        &host.plugins_dir,
        "webserver.wasm",
        &std::fs::read(test_plugin("webserver-v2")?)?,
    )?;
    for i in CHANGED / 2..CHANGED {
        change(i).await?;
    }
    wait_for("every child to carry the v2 label", CONVERGE, || {
        let (client, ns) = (client.clone(), ns.name.clone());
        async move { Ok((children(&client, &ns, V2).await? == [COUNT; 3]).then_some(())) }
    })
    .await
    .with_context(|| format!("kuwa log:\n{}", host.log_tail(40)))?;
    wait_reconciled_by(&api, COUNT, "webserver@0.2.0-test").await?;
    host.wait_idle(Duration::from_secs(3), CONVERGE).await?;

    let after = host.metrics().await?;
    assert_eq!(
        watch_lists(&after),
        lists_before,
        "no kind was listed again across the swap"
    );
    assert_eq!(
        sum_metric(
            &after,
            "kuwa_plugin_swaps_total",
            &[("plugin", "webserver")]
        ),
        1.0
    );
    assert_eq!(
        sum_metric(
            &after,
            "kuwa_plugin_info",
            &[("plugin", "webserver"), ("version", "0.2.0-test")]
        ),
        1.0,
        "the new version is the one reported"
    );
    assert_eq!(
        sum_metric(&after, "kuwa_plugin_info", &[("plugin", "webserver")]),
        1.0,
        "only the new version is reported"
    );
    let successes = sum_metric(
        &after,
        "kuwa_reconciles_total",
        &[("plugin", "webserver"), ("result", "success")],
    );
    assert!(
        successes - successes_before >= COUNT as f64,
        "every parent reconciled again: {successes_before} -> {successes}"
    );
    assert_eq!(
        children(&client, &ns.name, MANAGED).await?,
        [COUNT; 3],
        "no child lost or duplicated"
    );
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns.name);
    for i in 0..CHANGED {
        let data = cms.get(&format!("ws-{i}-content")).await?.data;
        assert_eq!(
            data.unwrap_or_default().get("index.html"),
            Some(&changed(i)),
            "the change of ws-{i} made around the swap was reconciled"
        );
    }
    assert!(host.is_running(), "the host keeps running");
    assert_eq!(host.pid(), pid, "the same process");
    let log = host.log();
    assert!(
        log.lines()
            .any(|l| l.contains("plugin swapped") && l.contains("webserver@0.2.0-test")),
        "the swap is logged with the versions:\n{}",
        host.log_tail(40)
    );
    if log.contains("panicked at") {
        bail!("the host panicked:\n{}", host.log_tail(40));
    }
    drop(host);
    ns.cleanup().await;
    Ok(())
}

/// Done-when 2: a corrupt file, a core wasm module, a component of the wrong
/// WIT version and a different plugin are each refused, logged and counted
/// with their reason, while the old version keeps reconciling changes; then
/// removing the file unloads the plugin.
#[tokio::test(flavor = "multi_thread")]
async fn bad_files_keep_the_old_version_serving_and_removal_unloads() -> Result<()> {
    let client = client().await?;
    let ns = TestNamespace::new(&client, "hotswap-bad").await?;
    let mut host = KuwaHost::start(&ns.name, &[plugin("webserver")?], &[]).await?;
    let api = webservers(&client, &ns.name);
    api.patch(
        "site",
        &PatchParams::apply("e2e").force(),
        &Patch::Apply(webserver("site", "v1", 0)),
    )
    .await?;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns.name);
    let content_is = |want: String| {
        let cms = cms.clone();
        async move {
            let cm = cms.get_opt("site-content").await?;
            Ok(cm
                .and_then(|c| c.data)
                .is_some_and(|d| d.get("index.html") == Some(&want))
                .then_some(()))
        }
    };
    wait_for("site's ConfigMap", CONVERGE, || content_is("v1".into())).await?;

    let bad_files: [(&str, Vec<u8>, &str); 4] = [
        (
            "corrupt bytes",
            b"this is not wasm at all".to_vec(),
            "compile",
        ),
        ("a core wasm module", b"\0asm\x01\0\0\0".to_vec(), "compile"),
        (
            "a component of the wrong WIT version",
            std::fs::read(test_plugin("wrong-wit")?)?,
            "link",
        ),
        (
            "another plugin (another name and parent kind)",
            std::fs::read(test_plugin("trap")?)?,
            "incompatible",
        ),
    ];
    for (round, (what, bytes, reason)) in bad_files.iter().enumerate() {
        let labels = [("file", "webserver.wasm"), ("reason", *reason)];
        let errors = host
            .metric("kuwa_plugin_load_errors_total", &labels)
            .await?;
        replace_file(&host.plugins_dir, "webserver.wasm", bytes)?;
        wait_metric_above(&host, "kuwa_plugin_load_errors_total", &labels, errors)
            .await
            .with_context(|| format!("{what} counted; kuwa log:\n{}", host.log_tail(30)))?;
        let log = host.log();
        assert!(
            log.lines().any(|l| l.contains("plugin file not loaded")
                && l.contains("file=webserver.wasm")
                && l.contains(&format!("reason={reason}"))
                && l.contains("webserver@0.1.0")),
            "{what}: the refusal is logged with its reason and the version kept:\n{}",
            host.log_tail(30)
        );
        // The old version still reconciles a change.
        let content = format!("after {what}");
        api.patch(
            "site",
            &PatchParams::apply("e2e").force(),
            &Patch::Apply(webserver("site", &content, 0)),
        )
        .await?;
        wait_for(
            &format!("round {round}: the old version to reconcile a change after {what}"),
            CONVERGE,
            || content_is(content.clone()),
        )
        .await?;
        assert_eq!(
            host.metric(
                "kuwa_plugin_info",
                &[("plugin", "webserver"), ("version", "0.1.0")]
            )
            .await?,
            1.0,
            "{what}: version 0.1.0 still served"
        );
        assert_eq!(
            reconciled_by(&api.get("site").await?),
            Some("webserver@0.1.0"),
            "{what}: the parent names the version that reconciled it"
        );
    }
    assert_eq!(host.metric("kuwa_plugin_swaps_total", &[]).await?, 0.0);

    // Removing the file unloads the plugin and stops its watches.
    std::fs::remove_file(host.plugins_dir.join("webserver.wasm"))?;
    wait_for("the webserver plugin to be unloaded", SWAP, || {
        let host = &host;
        async move {
            let loaded = host
                .metric("kuwa_plugin_info", &[("plugin", "webserver")])
                .await?;
            Ok((loaded == 0.0).then_some(()))
        }
    })
    .await?;
    wait_for("the WebServer watch to stop", SWAP, || {
        let host = &host;
        async move {
            Ok(host
                .log()
                .lines()
                .any(|l| l.contains("stopped watching") && l.contains("WebServer"))
                .then_some(()))
        }
    })
    .await?;
    assert!(host.is_running(), "the host keeps running");
    if host.log().contains("panicked at") {
        bail!("the host panicked:\n{}", host.log_tail(40));
    }
    drop(host);
    ns.cleanup().await;
    Ok(())
}

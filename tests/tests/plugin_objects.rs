//! End-to-end: plugins as custom resources pulled from a real OCI registry
//! on loopback (issue 12), against the real local control plane.
//!
//! `kuwa plugin push` publishes the components; `ClusterPlugin` objects
//! name them; the host (`--plugin-resources`) pulls, serves and reports.
//! Swapping the source is a hot swap without relist, a source that is not a
//! component is refused while the old version serves, a restart pulls
//! nothing. A team's namespaced `Plugin` acts in its namespace only, under
//! the RBAC of its own ServiceAccount.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::core::v1::{ConfigMap, Service, ServiceAccount};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::Client;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams,
};
use kuwa_e2e::host::{
    KuwaHost, apply_json, kuwa_bin, metric_sample, plugin, sum_metric, test_plugin, yaml_file,
};
use kuwa_e2e::objects::{apply_crd, condition, webserver, webservers};
use kuwa_e2e::registry::Registry;
use kuwa_e2e::{TestNamespace, client, kubeconfig_path, wait_for};
use serde_json::{Value, json};

const CONVERGE: Duration = Duration::from_secs(120);

fn resource(kind: &str, plural: &str, group: &str) -> ApiResource {
    ApiResource {
        group: group.into(),
        version: "v1alpha1".into(),
        api_version: format!("{group}/v1alpha1"),
        kind: kind.into(),
        plural: plural.into(),
    }
}

fn cluster_plugins(client: &Client) -> Api<DynamicObject> {
    Api::all_with(
        client.clone(),
        &resource("ClusterPlugin", "clusterplugins", "kuwa.dev"),
    )
}

fn ns_plugins(client: &Client, ns: &str) -> Api<DynamicObject> {
    Api::namespaced_with(
        client.clone(),
        ns,
        &resource("Plugin", "plugins", "kuwa.dev"),
    )
}

/// `kuwa plugin push FILE REF [extra]`: the manifest digest it prints.
fn push(file: &Path, reference: &str, extra: &[&str]) -> Result<String> {
    let out = Command::new(kuwa_bin())
        .args(["plugin", "push"])
        .arg(file)
        .arg(reference)
        .args(extra)
        .env("KUWA_LOG", "warn")
        .output()?;
    ensure!(
        out.status.success(),
        "kuwa plugin push {reference}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let digest = String::from_utf8(out.stdout)?.trim().to_owned();
    ensure!(
        digest.starts_with("sha256:") && digest.len() == 71,
        "digest {digest:?}"
    );
    Ok(digest)
}

/// The grant of a shipped plugin (its manifest beside the component),
/// limited to `ns`.
fn grant_of(name: &str, ns: &str) -> Result<Value> {
    let path = plugin(name)?.with_extension("yaml");
    let mut grant: Value = serde_saphyr::from_str(&std::fs::read_to_string(&path)?)?;
    if grant.is_null() {
        grant = json!({});
    }
    grant["namespaces"] = json!([ns]);
    Ok(grant)
}

async fn wait_object<F>(
    api: &Api<DynamicObject>,
    name: &str,
    what: &str,
    f: F,
) -> Result<DynamicObject>
where
    F: Fn(&DynamicObject) -> bool,
{
    wait_for(&format!("{name}: {what}"), CONVERGE, || async {
        let o = api.get(name).await?;
        Ok(f(&o).then_some(o))
    })
    .await
}

fn status_is(o: &DynamicObject, type_: &str, status: &str) -> bool {
    condition(o, type_).is_some_and(|c| c["status"] == status)
}

fn current(o: &DynamicObject) -> bool {
    o.data["status"]["observedGeneration"].as_i64() == o.metadata.generation
}

async fn set_source(api: &Api<DynamicObject>, name: &str, source: &str) -> Result<()> {
    api.patch(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"source": source}})),
    )
    .await?;
    Ok(())
}

async fn v2_label(client: &Client, ns: &str) -> Result<Option<String>> {
    let cm = Api::<ConfigMap>::namespaced(client.clone(), ns)
        .get("webserver-sample-content")
        .await?;
    Ok(cm
        .metadata
        .labels
        .and_then(|l| l.get("test.kuwa.dev/v2").cloned()))
}

struct Dirs {
    _root: tempfile::TempDir,
    store: PathBuf,
    compiled: PathBuf,
}

fn dirs() -> Result<Dirs> {
    let root = tempfile::tempdir()?;
    Ok(Dirs {
        store: root.path().join("oci"),
        compiled: root.path().join("compiled"),
        _root: root,
    })
}

/// The label that ties a test's plugin objects to its own host.
const HOST_LABEL: &str = "test.kuwa.dev/host";

async fn host(dirs: &Dirs, id: &str) -> Result<KuwaHost> {
    host_with(dirs, id, &[]).await
}

async fn host_with(dirs: &Dirs, id: &str, extra: &[&str]) -> Result<KuwaHost> {
    let selector = format!("{HOST_LABEL}={id}");
    let kubeconfig = tokio::task::spawn_blocking(kubeconfig_path).await??;
    let store = dirs.store.to_str().context("path")?;
    let compiled = dirs.compiled.to_str().context("path")?;
    KuwaHost::start_as(
        &kubeconfig,
        None,
        &[],
        &[],
        &[
            &[
                "--plugin-resources",
                "--plugin-selector",
                &selector,
                "--oci-store",
                store,
                "--compile-cache",
                compiled,
            ][..],
            extra,
        ]
        .concat(),
    )
    .await
}

async fn install_host_crds(client: &Client) -> Result<()> {
    for name in ["clusterplugins.kuwa.dev", "plugins.kuwa.dev"] {
        apply_crd(client, &yaml_file(&format!("deploy/crds/{name}.yaml"))?).await?;
    }
    Ok(())
}

/// Done-when 1, 2 and 4.
#[tokio::test(flavor = "multi_thread")]
async fn cluster_plugins_from_a_registry_swap_refuse_roll_back_and_restart_without_pulling()
-> Result<()> {
    let client = client().await?;
    install_host_crds(&client).await?;
    let registry = Registry::start().await?;
    let ns = TestNamespace::new(&client, "oci").await?;
    let n = ns.name.as_str();

    let v1 = push(
        &plugin("webserver")?,
        &registry.reference("plugins/webserver:v1"),
        &[],
    )?;
    let v2 = push(
        &test_plugin("webserver-v2")?,
        &registry.reference("plugins/webserver:v2"),
        &[],
    )?;
    // A core module, not a component: pushed unchecked, refused by the host.
    let junk_file = tempfile::NamedTempFile::new()?;
    std::fs::write(junk_file.path(), b"\0asm\x01\0\0\0")?;
    let junk = push(
        junk_file.path(),
        &registry.reference("plugins/webserver:junk"),
        &["--no-verify"],
    )?;
    for name in ["memcached", "mltask"] {
        push(
            &plugin(name)?,
            &registry.reference(&format!("plugins/{name}:v1")),
            &[],
        )?;
    }
    println!("pushed webserver v1 {v1}, v2 {v2}, junk {junk}");

    let dirs = dirs()?;
    let h1 = host(&dirs, n).await?;
    let cps = cluster_plugins(&client);
    let names: Vec<String> = ["webserver", "memcached", "mltask"]
        .iter()
        .map(|p| format!("{n}-{p}"))
        .collect();
    for (p, name) in ["webserver", "memcached", "mltask"].iter().zip(&names) {
        let cp = json!({
            "apiVersion": "kuwa.dev/v1alpha1", "kind": "ClusterPlugin",
            "metadata": {"name": name, "labels": {HOST_LABEL: n}},
            "spec": {"source": registry.reference(&format!("plugins/{p}:v1")), "grant": grant_of(p, n)?},
        });
        cps.create(&PostParams::default(), &serde_json::from_value(cp)?)
            .await?;
    }
    let web = &names[0];
    let started = std::time::Instant::now();
    for name in &names {
        let o = wait_object(&cps, name, "Ready", |o| {
            current(o) && status_is(o, "Ready", "True")
        })
        .await
        .with_context(|| format!("kuwa log:\n{}", h1.log_tail(30)))?;
        println!(
            "{name}: Ready, {} {}",
            o.data["status"]["version"], o.data["status"]["digest"]
        );
    }
    println!(
        "3 ClusterPlugins Ready {:.1?} after they were applied",
        started.elapsed()
    );
    let o = cps.get(web).await?;
    assert_eq!(o.data["status"]["version"], "webserver@0.1.0");
    assert_eq!(o.data["status"]["digest"], v1.as_str());

    apply_json(
        &client,
        n,
        &yaml_file("deploy/samples/kuwa.dev_v1alpha1_webserver.yaml")?,
    )
    .await?;
    let ws = webservers(&client, n);
    wait_object(&ws, "webserver-sample", "Available", |o| {
        current(o) && status_is(o, "Available", "True")
    })
    .await?;
    wait_object(&cps, web, "1 parent served", |o| {
        o.data["status"]["parents"] == 1
    })
    .await?;

    // Swap to v2 by digest: no relist, every child moves.
    let lists = sum_metric(&h1.metrics().await?, "kuwa_watch_lists_total", &[]);
    let pinned_v2 = registry.reference(&format!("plugins/webserver@{v2}"));
    set_source(&cps, web, &pinned_v2).await?;
    wait_object(&cps, web, "serving v2", |o| {
        current(o) && o.data["status"]["digest"] == v2.as_str()
    })
    .await?;
    wait_for("children labelled by v2", CONVERGE, || async {
        Ok((v2_label(&client, n).await?.as_deref() == Some("true")).then_some(()))
    })
    .await?;
    let lists_after = sum_metric(&h1.metrics().await?, "kuwa_watch_lists_total", &[]);
    ensure!(
        lists_after == lists,
        "the swap relisted: {lists} → {lists_after}"
    );
    println!("swap to v2 by digest: children updated, 0 relists");

    // A digest whose blob is not a component: refused, v2 keeps serving.
    set_source(
        &cps,
        web,
        &registry.reference(&format!("plugins/webserver@{junk}")),
    )
    .await?;
    let o = wait_object(&cps, web, "Degraded NotAComponent", |o| {
        current(o)
            && condition(o, "Degraded")
                .is_some_and(|c| c["status"] == "True" && c["reason"] == "NotAComponent")
    })
    .await?;
    assert!(
        status_is(&o, "Ready", "True"),
        "the old version keeps serving: {:#}",
        o.data["status"]
    );
    assert_eq!(o.data["status"]["digest"], v2.as_str());
    assert_eq!(o.data["status"]["lastError"]["reason"], "NotAComponent");
    println!(
        "junk digest refused: {}",
        o.data["status"]["lastError"]["message"]
    );
    let events: Api<Event> = Api::namespaced(client.clone(), "default");
    wait_for("a Warning Event on the ClusterPlugin", CONVERGE, || async {
        let list = events.list(&ListParams::default()).await?;
        Ok(list
            .items
            .iter()
            .any(|e| {
                e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(web.as_str())
                    && e.reason.as_deref() == Some("NotAComponent")
            })
            .then_some(()))
    })
    .await?;
    // The parents kept their v2 children meanwhile.
    ensure!(v2_label(&client, n).await?.as_deref() == Some("true"));

    // Roll back in one apply: the v1 tag.
    set_source(&cps, web, &registry.reference("plugins/webserver:v1")).await?;
    wait_object(&cps, web, "back on v1", |o| {
        current(o) && o.data["status"]["digest"] == v1.as_str() && status_is(o, "Degraded", "False")
    })
    .await?;
    wait_for("children without the v2 label", CONVERGE, || async {
        Ok(v2_label(&client, n).await?.is_none().then_some(()))
    })
    .await?;
    println!("rolled back to v1 with one patch");

    // Restart: nothing pulled again, every plugin from the compile cache.
    let m1 = h1.metrics().await?;
    let pulled = sum_metric(&m1, "kuwa_plugin_pulls_total", &[]);
    ensure!(
        pulled >= 3.0,
        "the first host pulled the components ({pulled})"
    );
    drop(h1);
    let h2 = host(&dirs, n).await?;
    wait_for("3 plugins serving after the restart", CONVERGE, || async {
        let m = h2.metrics().await?;
        let loaded = m
            .lines()
            .filter(|l| l.starts_with("kuwa_plugin_info{"))
            .count();
        Ok((loaded == 3).then_some(m))
    })
    .await?;
    let m2 = h2.metrics().await?;
    ensure!(
        metric_sample(&m2, "kuwa_plugin_pulls_total", &[]).is_none(),
        "the restarted host pulled:\n{m2}"
    );
    for p in ["webserver", "memcached", "mltask"] {
        ensure!(
            metric_sample(
                &m2,
                "kuwa_plugin_load_seconds",
                &[("plugin", p), ("cache", "hit")]
            )
            .is_some(),
            "{p} was compiled again:\n{m2}"
        );
    }
    println!("restart: 0 pulls (the first host pulled {pulled}), 3 plugins from the compile cache");

    // Deleting the object unloads the plugin.
    cps.delete(web, &DeleteParams::default()).await?;
    wait_for("webserver unloaded", CONVERGE, || async {
        let m = h2.metrics().await?;
        Ok((!m
            .lines()
            .any(|l| l.starts_with("kuwa_plugin_info{") && l.contains("plugin=\"webserver\"")))
        .then_some(()))
    })
    .await?;

    drop(h2);
    for name in &names {
        let _ = cps.delete(name, &DeleteParams::default()).await;
    }
    ns.cleanup().await;
    Ok(())
}

/// Done-when 3: a team's `Plugin` reconciles its namespace only, its
/// output naming another namespace is rejected, and its ServiceAccount's
/// RBAC judges its writes (no `create services`: Forbidden on the parent,
/// counted), while another plugin keeps converging.
#[tokio::test(flavor = "multi_thread")]
async fn a_team_plugin_acts_in_its_namespace_under_its_own_rbac() -> Result<()> {
    let client = client().await?;
    install_host_crds(&client).await?;
    let registry = Registry::start().await?;
    let team_a = TestNamespace::new(&client, "team-a").await?;
    let team_b = TestNamespace::new(&client, "team-b").await?;
    let (a, b) = (team_a.name.as_str(), team_b.name.as_str());

    // The rogue test kind's CRD (a team's Plugin cannot install one).
    let rogue_dir = tempfile::tempdir()?;
    std::fs::copy(test_plugin("rogue")?, rogue_dir.path().join("rogue.wasm"))?;
    let out = Command::new(kuwa_bin())
        .args(["crds", "--plugins"])
        .arg(rogue_dir.path())
        .output()?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    apply_crd(
        &client,
        &serde_saphyr::from_str(&String::from_utf8(out.stdout)?)?,
    )
    .await?;
    // The WebServer CRD exists (deploy/crds).
    apply_crd(&client, &yaml_file("deploy/crds/webservers.kuwa.dev.yaml")?).await?;
    apply_crd(&client, &yaml_file("deploy/crds/memcacheds.kuwa.dev.yaml")?).await?;

    // team-a's identity: everything the WebServer plugin needs but Services.
    let sa: ServiceAccount = serde_json::from_value(json!({"metadata": {"name": "team-bot"}}))?;
    Api::<ServiceAccount>::namespaced(client.clone(), a)
        .create(&PostParams::default(), &sa)
        .await?;
    let rw = [
        "get", "list", "watch", "create", "patch", "update", "delete",
    ];
    let role: Role = serde_json::from_value(json!({
        "metadata": {"name": "team-bot"},
        "rules": [
            {"apiGroups": ["kuwa.dev", "test.kuwa.dev"], "resources": ["webservers/status", "roguetests/status", "webservers/finalizers", "roguetests/finalizers"], "verbs": ["patch", "update"]},
            {"apiGroups": [""], "resources": ["configmaps"], "verbs": rw},
            {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": rw},
            {"apiGroups": [""], "resources": ["services"], "verbs": ["get", "list", "watch"]},
        ],
    }))?;
    Api::<Role>::namespaced(client.clone(), a)
        .create(&PostParams::default(), &role)
        .await?;
    let binding: RoleBinding = serde_json::from_value(json!({
        "metadata": {"name": "team-bot"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "team-bot"},
        "subjects": [{"kind": "ServiceAccount", "name": "team-bot", "namespace": a}],
    }))?;
    Api::<RoleBinding>::namespaced(client.clone(), a)
        .create(&PostParams::default(), &binding)
        .await?;

    push(
        &plugin("webserver")?,
        &registry.reference("team-a/webserver:v1"),
        &[],
    )?;
    push(
        &test_plugin("rogue")?,
        &registry.reference("team-a/rogue:v1"),
        &[],
    )?;
    push(
        &plugin("memcached")?,
        &registry.reference("platform/memcached:v1"),
        &[],
    )?;

    let dirs = dirs()?;
    let h = host(&dirs, a).await?;
    let plugins = ns_plugins(&client, a);
    for (name, source) in [("web", "team-a/webserver:v1"), ("rogue", "team-a/rogue:v1")] {
        let p = json!({
            "apiVersion": "kuwa.dev/v1alpha1", "kind": "Plugin",
            "metadata": {"name": name, "labels": {HOST_LABEL: a}},
            "spec": {"source": registry.reference(source), "serviceAccountName": "team-bot"},
        });
        plugins
            .create(&PostParams::default(), &serde_json::from_value(p)?)
            .await?;
    }
    // Another plugin, the platform's, in team-b.
    let cps = cluster_plugins(&client);
    let platform = format!("{b}-memcached");
    let cp = json!({
        "apiVersion": "kuwa.dev/v1alpha1", "kind": "ClusterPlugin",
        "metadata": {"name": platform, "labels": {HOST_LABEL: a}},
        "spec": {"source": registry.reference("platform/memcached:v1"), "grant": grant_of("memcached", b)?},
    });
    cps.create(&PostParams::default(), &serde_json::from_value(cp)?)
        .await?;
    for name in ["web", "rogue"] {
        wait_object(&plugins, name, "Ready", |o| {
            current(o) && status_is(o, "Ready", "True")
        })
        .await
        .with_context(|| format!("kuwa log:\n{}", h.log_tail(30)))?;
    }
    wait_object(&cps, &platform, "Ready", |o| {
        current(o) && status_is(o, "Ready", "True")
    })
    .await?;

    // A WebServer in team-a: its Service write is Forbidden.
    webservers(&client, a)
        .create(
            &PostParams::default(),
            &serde_json::from_value(webserver("site", "hello", 1))?,
        )
        .await?;
    let ws = wait_object(&webservers(&client, a), "site", "Degraded Forbidden", |o| {
        condition(o, "Degraded")
            .is_some_and(|c| c["status"] == "True" && c["reason"] == "Forbidden")
    })
    .await
    .with_context(|| format!("kuwa log:\n{}", h.log_tail(30)))?;
    println!(
        "team-a WebServer: {}",
        condition(&ws, "Degraded").unwrap()["message"]
    );
    ensure!(
        Api::<ConfigMap>::namespaced(client.clone(), a)
            .get_opt("site-content")
            .await?
            .is_some(),
        "the ConfigMap (allowed) was written"
    );
    ensure!(
        Api::<Service>::namespaced(client.clone(), a)
            .get_opt("site")
            .await?
            .is_none(),
        "no Service was written"
    );
    let forbidden = sum_metric(
        &h.metrics().await?,
        "kuwa_reconcile_errors_total",
        &[("plugin", "webserver"), ("reason", "forbidden")],
    );
    ensure!(forbidden > 0.0, "Forbidden writes are counted");

    // The rogue plugin names another namespace: the whole output is refused.
    let rogue = Api::<DynamicObject>::namespaced_with(
        client.clone(),
        a,
        &ApiResource {
            group: "test.kuwa.dev".into(),
            version: "v1".into(),
            api_version: "test.kuwa.dev/v1".into(),
            kind: "RogueTest".into(),
            plural: "roguetests".into(),
        },
    );
    let r = json!({"apiVersion": "test.kuwa.dev/v1", "kind": "RogueTest", "metadata": {"name": "r"}, "spec": {"mode": "other-namespace"}});
    rogue
        .create(&PostParams::default(), &serde_json::from_value(r)?)
        .await?;
    // Its kind has no status subresource: the refusal shows as a Warning
    // Event and a counted error.
    let events: Api<Event> = Api::namespaced(client.clone(), a);
    wait_for("a Warning InvalidOutput Event on r", CONVERGE, || async {
        let list = events.list(&ListParams::default()).await?;
        Ok(list
            .items
            .iter()
            .find(|e| {
                e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("r")
                    && e.reason.as_deref() == Some("InvalidOutput")
            })
            .map(|e| e.note.clone().unwrap_or_default()))
    })
    .await
    .map(|note| println!("rogue output refused: {note}"))
    .with_context(|| format!("kuwa log:\n{}", h.log_tail(40)))?;
    let refused = sum_metric(
        &h.metrics().await?,
        "kuwa_reconcile_errors_total",
        &[("plugin", "test-rogue"), ("reason", "invalid_output")],
    );
    ensure!(refused > 0.0, "the refusal is counted");
    ensure!(
        Api::<ConfigMap>::namespaced(client.clone(), a)
            .get_opt("r-ok")
            .await?
            .is_none(),
        "nothing of the refused output was applied"
    );

    // A WebServer in team-b is not team-a's: nobody touches it. The
    // platform's Memcached in team-b converges meanwhile.
    webservers(&client, b)
        .create(
            &PostParams::default(),
            &serde_json::from_value(webserver("theirs", "x", 1))?,
        )
        .await?;
    apply_json(
        &client,
        b,
        &yaml_file("deploy/samples/kuwa.dev_v1alpha1_memcached.yaml")?,
    )
    .await?;
    let memcacheds = Api::<DynamicObject>::namespaced_with(
        client.clone(),
        b,
        &resource("Memcached", "memcacheds", "kuwa.dev"),
    );
    wait_object(&memcacheds, "memcached-sample", "Available", |o| {
        current(o) && status_is(o, "Available", "True")
    })
    .await?;
    let theirs = webservers(&client, b).get("theirs").await?;
    ensure!(
        theirs.data["status"].is_null(),
        "team-a's plugin reconciled team-b: {:#}",
        theirs.data["status"]
    );
    ensure!(
        Api::<ConfigMap>::namespaced(client.clone(), b)
            .get_opt("theirs-content")
            .await?
            .is_none()
    );
    println!("team-b untouched by team-a's plugin; the platform's Memcached in team-b converged");

    drop(h);
    let _ = cps.delete(&platform, &DeleteParams::default()).await;
    team_a.cleanup().await;
    team_b.cleanup().await;
    Ok(())
}

/// A source changed while no replica leads: the standby loads it at once
/// (warm) but may not write; once it leads, the object's status says what
/// it serves.
#[tokio::test(flavor = "multi_thread")]
async fn a_new_leader_reports_what_it_loaded_while_standing_by() -> Result<()> {
    let client = client().await?;
    install_host_crds(&client).await?;
    let registry = Registry::start().await?;
    let ns = TestNamespace::new(&client, "oci-ha").await?;
    let n = ns.name.as_str();
    let v1 = push(
        &plugin("webserver")?,
        &registry.reference("ha/webserver:v1"),
        &[],
    )?;
    let v2 = push(
        &test_plugin("webserver-v2")?,
        &registry.reference("ha/webserver:v2"),
        &[],
    )?;
    let election = |id: &'static str| {
        [
            "--leader-elect",
            "--leader-election-namespace",
            n,
            "--leader-election-id",
            "kuwa-oci-ha",
            "--leader-identity",
            id,
            "--leader-lease-duration",
            "4s",
            "--leader-renew-deadline",
            "3s",
            "--leader-retry-period",
            "1s",
        ]
        .map(str::to_owned)
    };
    let (dirs_a, dirs_b) = (dirs()?, dirs()?);
    let args_a = election("a");
    let args_b = election("b");
    let mut a = host_with(
        &dirs_a,
        n,
        &args_a.iter().map(String::as_str).collect::<Vec<_>>(),
    )
    .await?;
    wait_for("host a leads", CONVERGE, || async {
        Ok((metric_sample(&a.metrics().await?, "kuwa_leader", &[]) == Some(1.0)).then_some(()))
    })
    .await?;
    let b = host_with(
        &dirs_b,
        n,
        &args_b.iter().map(String::as_str).collect::<Vec<_>>(),
    )
    .await?;
    let cps = cluster_plugins(&client);
    let name = format!("{n}-webserver");
    let cp = json!({
        "apiVersion": "kuwa.dev/v1alpha1", "kind": "ClusterPlugin",
        "metadata": {"name": name, "labels": {HOST_LABEL: n}},
        "spec": {"source": registry.reference("ha/webserver:v1"), "grant": grant_of("webserver", n)?},
    });
    cps.create(&PostParams::default(), &serde_json::from_value(cp)?)
        .await?;
    wait_object(&cps, &name, "Ready on v1", |o| {
        current(o) && o.data["status"]["digest"] == v1.as_str()
    })
    .await?;
    ensure!(
        metric_sample(&b.metrics().await?, "kuwa_leader", &[]) == Some(0.0),
        "b stands by"
    );

    // The leader dies; the source changes before anyone leads again.
    a.signal(rustix::process::Signal::KILL)?;
    a.wait_exit(Duration::from_secs(5)).await?;
    set_source(&cps, &name, &registry.reference("ha/webserver:v2")).await?;
    let o = wait_object(&cps, &name, "the new leader reporting v2", |o| {
        current(o) && o.data["status"]["digest"] == v2.as_str()
    })
    .await
    .with_context(|| format!("kuwa log (b):\n{}", b.log_tail(30)))?;
    ensure!(
        metric_sample(&b.metrics().await?, "kuwa_leader", &[]) == Some(1.0),
        "b leads"
    );
    println!(
        "after the leader's kill -9 the standby reported {}",
        o.data["status"]["version"]
    );
    drop(b);
    let _ = cps.delete(&name, &DeleteParams::default()).await;
    ns.cleanup().await;
    Ok(())
}

//! End-to-end: kuwa in a cluster (issue 11) against the real local control
//! plane. `deploy/` applies as a kustomize base (server-side dry run first)
//! and its Pods become Ready under kwok; the host runs with a token of the
//! deploy/ ServiceAccount (TokenRequest API) under exactly the committed
//! RBAC, converges the three samples, and with that identity can read no
//! Secret nor write a kind no plugin declares. Leader election: only the
//! leader writes, `kill -9` of the leader hands over within the lease
//! duration without a relist, SIGTERM hands over at once, and a leader that
//! loses its Lease stops writing.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{
    ConfigMap, Namespace, Node, PersistentVolume, Secret, ServiceAccount,
};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams,
};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, ResourceExt};
use kuwa_e2e::host::{KuwaHost, apply_json, plugin, yaml_file};
use kuwa_e2e::objects::{bound_claim, condition, set_content, wait_content, webserver, webservers};
use kuwa_e2e::{TestNamespace, client, kubeconfig_path, wait_for, workspace_root, xtask};
use serde_json::json;

const CONVERGE: Duration = Duration::from_secs(120);
const SYSTEM: &str = "kuwa-system";

fn kuwa_resource(kind: &str, plural: &str) -> ApiResource {
    ApiResource {
        group: "kuwa.dev".into(),
        version: "v1alpha1".into(),
        api_version: "kuwa.dev/v1alpha1".into(),
        kind: kind.into(),
        plural: plural.into(),
    }
}

/// `kubectl` of the project (`cargo xtask cluster kubectl`), with `args`.
fn kubectl(args: &[&str]) -> Result<String> {
    let mut all = vec!["cluster", "kubectl", "--"];
    all.extend_from_slice(args);
    xtask(&all, &[])
}

/// A kubeconfig for `sa` in `ns` with a token from the TokenRequest API:
/// the admin kubeconfig's server and CA, nothing of its credentials.
async fn service_account_kubeconfig(
    client: &Client,
    ns: &str,
    sa: &str,
    dir: &Path,
) -> Result<PathBuf> {
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), ns);
    let request = TokenRequest {
        spec: Some(TokenRequestSpec {
            expiration_seconds: Some(3600),
            ..TokenRequestSpec::default()
        }),
        ..TokenRequest::default()
    };
    let token = sas
        .create_token_request(sa, &PostParams::default(), &request)
        .await
        .context("TokenRequest")?
        .status
        .context("TokenRequest has no status")?
        .token;
    let admin = Kubeconfig::read_from(kubeconfig_path()?)?;
    let cluster = admin
        .clusters
        .first()
        .and_then(|c| c.cluster.clone())
        .context("the admin kubeconfig has no cluster")?;
    let kubeconfig = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "local", "cluster": {
            "server": cluster.server,
            "certificate-authority-data": cluster.certificate_authority_data,
        }}],
        "users": [{"name": sa, "user": {"token": token}}],
        "contexts": [{"name": sa, "context": {"cluster": "local", "user": sa, "namespace": ns}}],
        "current-context": sa,
    });
    let path = dir.join(format!("{sa}.kubeconfig"));
    std::fs::write(&path, serde_json::to_vec(&kubeconfig)?)?;
    Ok(path)
}

async fn client_from(path: &Path) -> Result<Client> {
    let kc = Kubeconfig::read_from(path)?;
    let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?;
    Ok(Client::try_from(config)?)
}

/// Fails unless `result` is the API server's 403.
fn forbidden<T>(what: &str, result: Result<T, kube::Error>) -> Result<()> {
    match result {
        Err(kube::Error::Api(e)) if e.code == 403 => {
            println!("  {what}: 403 Forbidden");
            Ok(())
        }
        Err(e) => bail!("{what}: expected 403 Forbidden, got {e}"),
        Ok(_) => bail!("{what}: expected 403 Forbidden, but it was allowed"),
    }
}

/// Waits until the parent `name` is `Available=True` for its current
/// generation.
async fn wait_available(
    client: &Client,
    ns: &str,
    resource: &ApiResource,
    name: &str,
) -> Result<()> {
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, resource);
    wait_for(
        &format!("{} {ns}/{name} Available", resource.kind),
        CONVERGE,
        || {
            let api = api.clone();
            async move {
                let o = api.get(name).await?;
                let current =
                    o.data["status"]["observedGeneration"].as_i64() == o.metadata.generation;
                let available = condition(&o, "Available").is_some_and(|c| c["status"] == "True");
                Ok((current && available).then_some(()))
            }
        },
    )
    .await
}

/// Done-when 1 and 3: `kubectl apply -k deploy/` (after a server-side dry
/// run) succeeds and its Pods turn Ready; a host running as the deploy/
/// ServiceAccount under the committed RBAC converges the three samples, and
/// that identity reads no Secret and writes no kind no plugin declares.
#[tokio::test(flavor = "multi_thread")]
async fn deploy_base_applies_and_its_identity_is_least_privilege() -> Result<()> {
    let admin = client().await?;
    let base = workspace_root().join("deploy");
    let base = base.to_str().context("path")?;
    // A server-side dry run of namespaced objects needs their namespace.
    let namespace = workspace_root().join("deploy/namespace.yaml");
    kubectl(&["apply", "-f", namespace.to_str().context("path")?])?;
    let dry = kubectl(&["apply", "-k", base, "--dry-run=server"])?;
    println!("server-side dry run:\n{dry}");
    ensure!(
        dry.contains("deployment.apps/kuwa") && dry.contains("(server dry run)"),
        "{dry}"
    );
    let applied = kubectl(&["apply", "-k", base])?;
    println!("applied:\n{applied}");

    let deployments: Api<Deployment> = Api::namespaced(admin.clone(), SYSTEM);
    let started = Instant::now();
    wait_for("the kuwa Deployment's 2 Pods Ready", CONVERGE, || {
        let deployments = deployments.clone();
        async move {
            let d = deployments.get("kuwa").await?;
            let ready = d.status.and_then(|s| s.ready_replicas).unwrap_or(0);
            Ok((ready == 2).then_some(()))
        }
    })
    .await?;
    println!(
        "deploy/: 2 of 2 host Pods Ready after {:.1?}",
        started.elapsed()
    );

    let dir = tempfile::tempdir()?;
    let sa_config = service_account_kubeconfig(&admin, SYSTEM, "kuwa", dir.path()).await?;
    let ns = TestNamespace::new(&admin, "deploy-sa").await?;
    let n = ns.name.as_str();
    let pv = bound_claim(&admin, n, "mnist-model").await?;
    let plugins = [
        plugin("webserver")?,
        plugin("memcached")?,
        plugin("mltask")?,
    ];
    let host = KuwaHost::start_without_crds(&sa_config, Some(n), &plugins, &[]).await?;
    for sample in [
        "deploy/samples/kuwa.dev_v1alpha1_webserver.yaml",
        "deploy/samples/kuwa.dev_v1alpha1_memcached.yaml",
        "deploy/samples/kuwa.dev_v1alpha1_mltask.yaml",
    ] {
        apply_json(&admin, n, &yaml_file(sample)?).await?;
    }
    for (kind, plural, name) in [
        ("WebServer", "webservers", "webserver-sample"),
        ("Memcached", "memcacheds", "memcached-sample"),
        ("MLTask", "mltasks", "mltask-sample"),
    ] {
        wait_available(&admin, n, &kuwa_resource(kind, plural), name)
            .await
            .with_context(|| format!("kuwa log:\n{}", host.log_tail(40)))?;
        println!("{kind} sample Available under the ServiceAccount's identity");
    }
    let metrics = host.metrics().await?;
    let writes = kuwa_e2e::host::metric_sample(&metrics, "kuwa_api_writes_total", &[]);
    ensure!(
        writes.is_some_and(|w| w > 0.0),
        "the host wrote as the ServiceAccount"
    );
    let api_errors = kuwa_e2e::host::sum_metric(
        &metrics,
        "kuwa_reconcile_errors_total",
        &[("reason", "api")],
    );
    ensure!(
        api_errors == 0.0,
        "{api_errors} reconciles failed on an API error:\n{}",
        host.log_tail(40)
    );
    ensure!(
        !host.log().contains("forbidden"),
        "a write was forbidden:\n{}",
        host.log_tail(40)
    );

    // The same identity, used directly: nothing beyond the plugins' needs.
    let sa = client_from(&sa_config).await?;
    let secrets: Api<Secret> = Api::namespaced(sa.clone(), n);
    forbidden("list Secrets", secrets.list(&ListParams::default()).await)?;
    forbidden("get a Secret", secrets.get("anything").await)?;
    let secret: Secret =
        serde_json::from_value(json!({"metadata": {"name": "stolen"}, "stringData": {"k": "v"}}))?;
    forbidden(
        "create a Secret",
        secrets.create(&PostParams::default(), &secret).await,
    )?;
    let daemonsets: Api<DaemonSet> = Api::namespaced(sa.clone(), n);
    let ds: DaemonSet = serde_json::from_value(json!({
        "metadata": {"name": "x"},
        "spec": {"selector": {"matchLabels": {"a": "b"}}, "template": {"metadata": {"labels": {"a": "b"}}, "spec": {"containers": [{"name": "c", "image": "busybox"}]}}},
    }))?;
    forbidden(
        "create a DaemonSet",
        daemonsets.create(&PostParams::default(), &ds).await,
    )?;
    let nodes: Api<Node> = Api::all(sa.clone());
    let node = nodes
        .list(&ListParams::default().limit(1))
        .await?
        .items
        .into_iter()
        .next()
        .context("a node")?;
    forbidden(
        "label a Node (a related kind: read only)",
        nodes
            .patch(
                &node.name_any(),
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"labels": {"stolen": "yes"}}})),
            )
            .await,
    )?;
    let roles: Api<ClusterRole> = Api::all(sa.clone());
    forbidden(
        "read ClusterRoles",
        roles.list(&ListParams::default()).await,
    )?;
    let namespaces: Api<Namespace> = Api::all(sa.clone());
    forbidden(
        "delete a Namespace",
        namespaces.delete(n, &DeleteParams::default()).await,
    )?;
    // The kinds it does write are allowed (the check can tell both apart).
    let configmaps: Api<ConfigMap> = Api::namespaced(sa.clone(), n);
    configmaps
        .list(&ListParams::default())
        .await
        .context("listing ConfigMaps (a child kind) as the ServiceAccount")?;

    drop(host);
    ns.cleanup().await;
    let _ = Api::<PersistentVolume>::all(admin.clone())
        .delete(&pv, &DeleteParams::default())
        .await;
    // deploy/ leaves the CRDs: other tests' parents live in them.
    let _ = Api::<Namespace>::all(admin.clone())
        .delete(SYSTEM, &DeleteParams::background())
        .await;
    let _ = Api::<ClusterRoleBinding>::all(admin.clone())
        .delete("kuwa", &DeleteParams::default())
        .await;
    let _ = Api::<ClusterRole>::all(admin.clone())
        .delete("kuwa", &DeleteParams::default())
        .await;
    Ok(())
}

const LEASE: &str = "kuwa-e2e-leader";
const LEASE_DURATION: Duration = Duration::from_secs(5);
const RETRY: Duration = Duration::from_secs(1);

async fn elected_host(ns: &str, identity: &str) -> Result<KuwaHost> {
    KuwaHost::start(
        ns,
        &[plugin("webserver")?],
        &[
            "--leader-elect",
            "--leader-election-namespace",
            ns,
            "--leader-election-id",
            LEASE,
            "--leader-identity",
            identity,
            "--leader-lease-duration",
            "5s",
            "--leader-renew-deadline",
            "3s",
            "--leader-retry-period",
            "1s",
        ],
    )
    .await
}

async fn gauge(host: &KuwaHost, name: &str) -> Result<f64> {
    kuwa_e2e::host::metric_sample(&host.metrics().await?, name, &[])
        .with_context(|| format!("{name} is not exposed"))
}

async fn wait_leader(host: &KuwaHost, leading: bool, timeout: Duration) -> Result<Duration> {
    let started = Instant::now();
    let want = if leading { 1.0 } else { 0.0 };
    loop {
        if gauge(host, "kuwa_leader").await? == want {
            return Ok(started.elapsed());
        }
        if started.elapsed() >= timeout {
            bail!(
                "kuwa_leader did not become {want} within {timeout:?}:\n{}",
                host.log_tail(30)
            );
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Waits until the host serves its plugin (its CRD may be installed only
/// once a host leads).
async fn wait_serving(host: &KuwaHost) -> Result<()> {
    wait_for("the webserver plugin active", CONVERGE, || async {
        let m = host.metrics().await?;
        Ok(m.lines()
            .any(|l| l.starts_with("kuwa_plugin_info{"))
            .then_some(()))
    })
    .await
}

async fn writes(host: &KuwaHost) -> Result<f64> {
    Ok(kuwa_e2e::host::sum_metric(
        &host.metrics().await?,
        "kuwa_api_writes_total",
        &[],
    ))
}

/// Done-when 2: only the leader writes; `kill -9` of the leader → the
/// standby leads within the lease duration, converges a change made in the
/// gap, without a relist; SIGTERM → handover in under 2 s; a leader whose
/// Lease is taken stops writing at once.
#[tokio::test(flavor = "multi_thread")]
async fn leader_election_one_writer_and_fast_handover() -> Result<()> {
    let client = client().await?;
    let ns = TestNamespace::new(&client, "leader").await?;
    let n = ns.name.as_str();

    let a = elected_host(n, "host-a").await?;
    wait_leader(&a, true, Duration::from_secs(20)).await?;
    wait_serving(&a).await?;
    let b = elected_host(n, "host-b").await?;
    wait_serving(&b).await?;
    ensure!(
        gauge(&b, "kuwa_leader").await? == 0.0,
        "the second host stands by"
    );

    webservers(&client, n)
        .create(
            &PostParams::default(),
            &serde_json::from_value(webserver("site", "one", 1))?,
        )
        .await?;
    wait_content(&client, n, "site-content", "one", CONVERGE).await?;
    let a_writes = writes(&a).await?;
    ensure!(a_writes > 0.0, "the leader wrote");
    // The standby is warm (its caches listed: it was ready) and idle.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let b_metrics = b.metrics().await?;
    ensure!(
        kuwa_e2e::host::metric_sample(&b_metrics, "kuwa_api_writes_total", &[]).is_none(),
        "the standby wrote:\n{b_metrics}"
    );
    ensure!(
        kuwa_e2e::host::sum_metric(&b_metrics, "kuwa_reconciles_total", &[]) == 0.0,
        "the standby reconciled"
    );
    let b_lists = kuwa_e2e::host::sum_metric(&b_metrics, "kuwa_watch_lists_total", &[]);
    ensure!(b_lists > 0.0, "the standby's caches listed");
    println!("leader wrote {a_writes}, standby 0 (its caches listed {b_lists} times)");

    // kill -9 of the leader, then a change while nobody leads.
    let mut a = a;
    a.signal(rustix::process::Signal::KILL)?;
    let killed = Instant::now();
    a.wait_exit(Duration::from_secs(5)).await?;
    set_content(&client, n, "site", "two").await?;
    wait_leader(&b, true, LEASE_DURATION + 4 * RETRY).await?;
    let takeover = killed.elapsed();
    wait_content(&client, n, "site-content", "two", CONVERGE).await?;
    let converged = killed.elapsed();
    let lists_after =
        kuwa_e2e::host::sum_metric(&b.metrics().await?, "kuwa_watch_lists_total", &[]);
    ensure!(
        lists_after == b_lists,
        "the new leader relisted ({b_lists} → {lists_after} lists)"
    );
    ensure!(
        writes(&b).await? > 0.0,
        "the new leader's writes are counted"
    );
    ensure!(
        takeover <= LEASE_DURATION + 2 * RETRY,
        "takeover took {takeover:?}, more than the lease duration {LEASE_DURATION:?} plus two retry periods"
    );
    println!(
        "kill -9: the standby led after {:.2} s (lease duration {} s), the change made in the gap converged {:.2} s after the kill ({:.2} s after takeover), 0 relists",
        takeover.as_secs_f64(),
        LEASE_DURATION.as_secs(),
        converged.as_secs_f64(),
        (converged - takeover).as_secs_f64()
    );

    // SIGTERM of the leader: it finishes, releases the Lease, the standby
    // takes it at once.
    let c = elected_host(n, "host-c").await?;
    wait_serving(&c).await?;
    ensure!(
        gauge(&c, "kuwa_leader").await? == 0.0,
        "the third host stands by"
    );
    let mut b = b;
    b.signal(rustix::process::Signal::TERM)?;
    let termed = Instant::now();
    wait_leader(&c, true, Duration::from_secs(10)).await?;
    let handover = termed.elapsed();
    let status = b.wait_exit(Duration::from_secs(30)).await?;
    ensure!(
        status.success(),
        "SIGTERM: the leader exited with {status}:\n{}",
        b.log_tail(20)
    );
    ensure!(
        b.log().contains("leader lease released"),
        "{}",
        b.log_tail(20)
    );
    ensure!(
        handover < Duration::from_secs(2),
        "SIGTERM handover took {handover:?}"
    );
    println!(
        "SIGTERM: handover to the standby in {:.3} s",
        handover.as_secs_f64()
    );
    set_content(&client, n, "site", "three").await?;
    wait_content(&client, n, "site-content", "three", CONVERGE).await?;

    // The Lease taken from under the leader: it stops writing at once.
    let leases: Api<Lease> = Api::namespaced(client.clone(), n);
    let mut lease = leases.get(LEASE).await?;
    let spec = lease.spec.as_mut().context("lease spec")?;
    ensure!(
        spec.holder_identity.as_deref() == Some("host-c"),
        "{spec:?}"
    );
    spec.holder_identity = Some("intruder".into());
    spec.renew_time = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(
        k8s_openapi::jiff::Timestamp::now(),
    ));
    leases
        .replace(LEASE, &PostParams::default(), &lease)
        .await?;
    let stolen = Instant::now();
    wait_leader(&c, false, 3 * RETRY).await?;
    println!(
        "lease taken: the leader stood by after {:.2} s",
        stolen.elapsed().as_secs_f64()
    );
    let before = writes(&c).await?;
    set_content(&client, n, "site", "four").await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    ensure!(
        stolen.elapsed() < LEASE_DURATION,
        "the check window ran past the lease duration"
    );
    ensure!(
        writes(&c).await? == before,
        "a host without the lease wrote"
    );
    let cm: Api<ConfigMap> = Api::namespaced(client.clone(), n);
    let content = cm
        .get("site-content")
        .await?
        .data
        .and_then(|d| d.get("index.html").cloned());
    ensure!(
        content.as_deref() == Some("three"),
        "content changed without a leader: {content:?}"
    );
    // The intruder never renews: the host takes the Lease back after the
    // lease duration and converges.
    wait_leader(&c, true, LEASE_DURATION + 4 * RETRY).await?;
    wait_content(&client, n, "site-content", "four", CONVERGE).await?;
    println!("the intruder's lease expired: the host led again and converged");

    drop(c);
    ns.cleanup().await;
    Ok(())
}

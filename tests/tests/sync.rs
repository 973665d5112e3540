//! End-to-end: a cache that can never list does not hang a plugin's keys
//! for ever (issue 8, hole 7). The host runs as a user whose RBAC lacks
//! Nodes; the MLTask plugin, which reads Nodes, is added while the host
//! runs: its parent is marked `Degraded=CacheNotSynced` within the bound,
//! the timeout is counted, and the WebServer plugin keeps converging.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use kube::discovery::ApiResource;
use kuwa_e2e::host::{KuwaHost, apply_json, plugin, yaml_file};
use kuwa_e2e::objects::{condition, wait_content, webserver, webservers};
use kuwa_e2e::{TestNamespace, client, kubeconfig_path, wait_for};
use serde_json::{Value, json};

const CONVERGE: Duration = Duration::from_secs(120);

/// Everything the host needs for WebServer and MLTask in one namespace,
/// and CRDs, but not Nodes.
fn limited_role(name: &str) -> Result<ClusterRole> {
    let all = json!(["*"]);
    Ok(serde_json::from_value(json!({
        "metadata": {"name": name},
        "rules": [
            {"apiGroups": [""], "resources": ["configmaps", "services", "pods", "events", "namespaces"], "verbs": all},
            {"apiGroups": ["apps", "kuwa.dev", "events.k8s.io"], "resources": ["*", "*/*"], "verbs": all},
            {"apiGroups": ["apiextensions.k8s.io"], "resources": ["customresourcedefinitions"], "verbs": all},
        ],
    }))?)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cache_that_cannot_list_fails_its_keys_within_the_bound() -> Result<()> {
    let client = client().await?;
    let ns = TestNamespace::new(&client, "sync").await?;
    let user = format!("kuwa-e2e-limited-{}", ns.name);
    let roles: Api<ClusterRole> = Api::all(client.clone());
    let bindings: Api<ClusterRoleBinding> = Api::all(client.clone());
    roles
        .create(&PostParams::default(), &limited_role(&user)?)
        .await?;
    let binding: ClusterRoleBinding = serde_json::from_value(json!({
        "metadata": {"name": user},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": user},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}],
    }))?;
    bindings.create(&PostParams::default(), &binding).await?;

    // The admin kubeconfig, impersonating the limited user.
    let admin = tokio::task::spawn_blocking(kubeconfig_path).await??;
    let mut kubeconfig: Value = serde_saphyr::from_str(&std::fs::read_to_string(&admin)?)?;
    for u in kubeconfig["users"]
        .as_array_mut()
        .context("kubeconfig users")?
    {
        u["user"]["as"] = json!(user);
    }
    let dir = tempfile::tempdir()?;
    let limited = dir.path().join("limited.kubeconfig");
    std::fs::write(&limited, serde_json::to_string(&kubeconfig)?)?;

    let host = KuwaHost::start_as(
        &limited,
        Some(&ns.name),
        &[plugin("webserver")?],
        &[],
        &["--cache-sync-timeout", "3s"],
    )
    .await?;
    apply_json(&client, &ns.name, &webserver("site", "before", 1)).await?;
    wait_content(&client, &ns.name, "site-content", "before", CONVERGE).await?;

    // Add MLTask while the host runs: it reads Nodes, which this user may
    // not list, so its Node cache never syncs.
    for ext in ["wasm", "yaml"] {
        let from = plugin("mltask")?.with_extension(ext);
        let tmp = host.plugins_dir.join(format!(".mltask.{ext}.tmp"));
        std::fs::copy(&from, &tmp)?;
        std::fs::rename(&tmp, host.plugins_dir.join(format!("mltask.{ext}")))?;
    }
    let sample = yaml_file("deploy/samples/kuwa.dev_v1alpha1_mltask.yaml")?;
    let name = sample["metadata"]["name"]
        .as_str()
        .context("sample name")?
        .to_owned();
    let resource = ApiResource {
        group: "kuwa.dev".into(),
        version: "v1alpha1".into(),
        api_version: "kuwa.dev/v1alpha1".into(),
        kind: "MLTask".into(),
        plural: "mltasks".into(),
    };
    let mltasks: Api<DynamicObject> = Api::namespaced_with(client.clone(), &ns.name, &resource);
    let created = wait_for("the MLTask CRD to be served", CONVERGE, || {
        let client = client.clone();
        let ns = ns.name.clone();
        let sample = sample.clone();
        async move {
            Ok(apply_json(&client, &ns, &sample)
                .await
                .ok()
                .map(|()| Instant::now()))
        }
    })
    .await?;
    let degraded = wait_for("the MLTask to be Degraded=CacheNotSynced", CONVERGE, || {
        let mltasks = mltasks.clone();
        let name = name.clone();
        async move {
            let task = mltasks.get(&name).await?;
            Ok(condition(&task, "Degraded")
                .filter(|c| c["status"] == "True" && c["reason"] == "CacheNotSynced"))
        }
    })
    .await?;
    println!(
        "MLTask Degraded=CacheNotSynced {:.1} s after it was created (sync timeout 3 s): {}",
        created.elapsed().as_secs_f64(),
        degraded["message"]
    );
    assert!(
        degraded["message"]
            .as_str()
            .is_some_and(|m| m.contains("v1/Node")),
        "{degraded}"
    );
    let text = host.metrics().await?;
    assert!(
        text.contains("kuwa_cache_sync_timeouts_total{plugin=\"mltask\"}"),
        "no sync-timeout series for mltask"
    );
    assert!(
        kuwa_e2e::host::sum_metric(
            &text,
            "kuwa_cache_sync_timeouts_total",
            &[("plugin", "mltask")]
        ) >= 1.0
    );

    // The other plugin is unaffected.
    webservers(&client, &ns.name)
        .patch(
            "site",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"content": "after"}})),
        )
        .await?;
    wait_content(&client, &ns.name, "site-content", "after", CONVERGE).await?;
    assert!(host.log().contains("caches did not sync in time"));

    drop(host);
    let _ = bindings.delete(&user, &DeleteParams::default()).await;
    let _ = roles.delete(&user, &DeleteParams::default()).await;
    ns.cleanup().await;
    Ok(())
}

//! End-to-end: the host's finalizer protocol (issue 3): it adds
//! `<group>/finalizer` to parents of a plugin that asks for one, calls
//! `finalize` while the parent is being deleted, and removes the finalizer
//! only when the plugin says it is done.

use std::time::Duration;

use anyhow::Result;
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, Patch, PatchParams};
use kuwa_e2e::host::{KuwaHost, apply_json, test_plugin};
use kuwa_e2e::{TestNamespace, client, wait_for};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(120);
const FINALIZER: &str = "test.kuwa.dev/finalizer";

#[tokio::test(flavor = "multi_thread")]
async fn deletion_waits_for_finalize_to_finish() -> Result<()> {
    let client = client().await?;
    let ns = TestNamespace::new(&client, "finalizer").await?;
    let host = KuwaHost::start(&ns.name, &[test_plugin("finalizer")?], &[]).await?;
    let resource = ApiResource {
        group: "test.kuwa.dev".into(),
        version: "v1".into(),
        api_version: "test.kuwa.dev/v1".into(),
        kind: "FinalizerTest".into(),
        plural: "finalizertests".into(),
    };
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &ns.name, &resource);
    apply_json(
        &client,
        &ns.name,
        &json!({
            "apiVersion": "test.kuwa.dev/v1", "kind": "FinalizerTest",
            "metadata": {"name": "held"}, "spec": {"note": "x"},
        }),
    )
    .await?;
    wait_for("the host's finalizer on the parent", WAIT, || {
        let api = api.clone();
        async move {
            let o = api.get("held").await?;
            Ok(o.metadata
                .finalizers
                .unwrap_or_default()
                .contains(&FINALIZER.to_owned())
                .then_some(()))
        }
    })
    .await?;

    api.delete("held", &DeleteParams::default()).await?;
    // finalize says "not yet": the object stays, marked for deletion, and is
    // asked again (requeue) without error.
    let finalize_calls_before = host
        .metric("kuwa_reconciles_total", &[("plugin", "test-finalizer")])
        .await?;
    wait_for("finalize to be asked again while held", WAIT, || {
        let host = &host;
        async move {
            let n = host
                .metric("kuwa_reconciles_total", &[("plugin", "test-finalizer")])
                .await?;
            Ok((n >= finalize_calls_before + 2.0).then_some(()))
        }
    })
    .await?;
    let held = api.get("held").await?;
    assert!(
        held.metadata.deletion_timestamp.is_some(),
        "marked for deletion"
    );
    assert!(
        held.metadata
            .finalizers
            .unwrap_or_default()
            .contains(&FINALIZER.to_owned()),
        "still held"
    );

    // Done: the host removes its finalizer and the object goes away.
    api.patch(
        "held",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"annotations": {"test.kuwa.dev/release": "true"}}})),
    )
    .await?;
    wait_for("the parent to be gone", WAIT, || {
        let api = api.clone();
        async move { Ok(api.get_opt("held").await?.is_none().then_some(())) }
    })
    .await?;
    assert_eq!(
        host.metric(
            "kuwa_reconcile_errors_total",
            &[("plugin", "test-finalizer")]
        )
        .await?,
        0.0
    );
    drop(host);
    ns.cleanup().await;
    Ok(())
}

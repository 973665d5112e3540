//! End-to-end: `cargo xtask bench --quick` runs in CI so the bench cannot
//! rot (issue 9). It measures kuwa and both peers at 100 WebServers against
//! the shared local control plane. Timings are printed, never judged; what
//! is checked are the properties every system must have: each converged,
//! none writes in steady state, and the hot swap moved every child without a
//! relist.

use anyhow::{Context, Result};
use kuwa_e2e::{kubeconfig_path, xtask};
use serde_json::Value;

fn number(report: &Value, system: &str, key: &str) -> Result<f64> {
    report["systems"][system][key]
        .as_f64()
        .with_context(|| format!("{system}.{key} is missing from the report: {report:#}"))
}

#[test]
fn the_quick_bench_runs_end_to_end() -> Result<()> {
    let kubeconfig = kubeconfig_path()?;
    let dir = tempfile::tempdir()?;
    let json = dir.path().join("report.json");
    let started = std::time::Instant::now();
    let table = xtask(
        &[
            "bench",
            "--quick",
            "--keep-cluster",
            "--json",
            json.to_str().context("temp path is UTF-8")?,
        ],
        &[("KUBECONFIG", &kubeconfig)],
    )?;
    println!("{table}");
    println!("quick bench took {:?}", started.elapsed());
    let report: Value = serde_json::from_str(&std::fs::read_to_string(&json)?)?;
    assert_eq!(report["parents"], 100, "{report:#}");
    for system in ["kuwa", "kube-rs", "controller-runtime"] {
        // Converged: all children and all parents ready were reached (the
        // bench fails outright otherwise; these are the recorded times).
        number(&report, system, "all_children_s")?;
        number(&report, system, "all_ready_s")?;
        number(&report, system, "parent_ready_p99_s")?;
        assert!(
            number(&report, system, "writes_per_parent")? >= 3.0,
            "{system} cannot have created 3 children per parent with fewer writes"
        );
        assert!(number(&report, system, "reconciles_per_parent")? >= 1.0);
        assert_eq!(
            number(&report, system, "steady_writes")?,
            0.0,
            "{system} writes in steady state"
        );
    }
    // Resyncs of a settled world skip the plugin (the series must exist).
    assert!(number(&report, "kuwa", "settled_skips_total")? > 0.0);
    // Every child moved to the new version (the time is recorded only then).
    number(&report, "kuwa", "hot_swap_all_s")?;
    assert_eq!(number(&report, "kuwa", "hot_swap_relists")?, 0.0);
    let stages = report["systems"]["kuwa"]["stage_ms_per_reconcile"]
        .as_object()
        .context("no stage breakdown")?;
    for stage in ["snapshot", "instantiate", "guest", "plan", "apply"] {
        assert!(
            stages
                .get(stage)
                .and_then(Value::as_f64)
                .is_some_and(|ms| ms > 0.0),
            "stage {stage} missing or zero: {stages:?}"
        );
    }
    Ok(())
}

//! End-to-end: `cargo xtask soak --duration 2m` runs in CI (issue 13): two
//! minutes of churn of all three parent kinds with every kind of fault
//! injected, and the reference check at each checkpoint and at the end.
//! The soak itself fails on a checkpoint that does not converge, an orphan,
//! a duplicate or a host panic; this test checks that the report says each
//! fault was injected, that work was done, and prints the table.

use anyhow::{Context, Result};
use kuwa_e2e::{kubeconfig_path, xtask};
use serde_json::Value;

#[test]
fn a_two_minute_soak_converges_through_every_fault() -> Result<()> {
    let kubeconfig = kubeconfig_path()?;
    let dir = tempfile::tempdir()?;
    let json = dir.path().join("soak.json");
    let started = std::time::Instant::now();
    let table = xtask(
        &[
            "soak",
            "--duration",
            "2m",
            "--fault-every",
            "10s",
            "--check-every",
            "40s",
            "--keep-cluster",
            "--json",
            json.to_str().context("temp path is UTF-8")?,
        ],
        &[("KUBECONFIG", &kubeconfig)],
    )?;
    println!("{table}");
    println!("the soak took {:?}", started.elapsed());
    let report: Value = serde_json::from_str(&std::fs::read_to_string(&json)?)?;
    for fault in [
        "api_restart",
        "watch_expiry",
        "host_kill",
        "plugin_swap",
        "corrupt_swap",
        "drift",
    ] {
        assert!(
            report["faults"][fault].as_u64().unwrap_or(0) >= 1,
            "{fault} was never injected: {report:#}"
        );
    }
    assert!(
        report["checks"].as_u64().unwrap_or(0) >= 3,
        "at least two checkpoints and the final check: {report:#}"
    );
    assert!(report["operations"]["create"].as_u64().unwrap_or(0) > 0);
    assert!(report["reconciles"].as_f64().unwrap_or(0.0) > 0.0);
    assert_eq!(report["orphans"], 0);
    assert_eq!(report["duplicates"], 0);
    assert_eq!(report["host_panics"], 0);
    Ok(())
}

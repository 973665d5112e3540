//! `cargo xtask soak --duration 10m`: builds kuwa, the plugins and the test
//! plugins (debug builds, shared with the tests), brings up the local control
//! plane, and runs `kuwa-soak` (the churning and checking half,
//! `tests/src/soak.rs`), which prints a summary table and writes JSON. See
//! docs/reliability.md.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result, bail};
use clap::Args as ClapArgs;

use crate::{bench, cluster, demo, plugins};

/// Arguments of `cargo xtask soak`.
#[derive(ClapArgs)]
pub struct Args {
    /// How long to churn and inject faults (e.g. 2m, 30m, 1h); the final
    /// reference check comes after.
    #[arg(long, default_value = "10m")]
    duration: String,
    /// Parent operations (create, update, delete) per second.
    #[arg(long, default_value_t = 2.0)]
    rate: f64,
    /// Mean time between two faults.
    #[arg(long, default_value = "20s")]
    fault_every: String,
    /// Time between two reference checks.
    #[arg(long, default_value = "60s")]
    check_every: String,
    /// Seed of the random plan (the same seed gives the same operations and faults).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Write the JSON report here (default: target/soak/report.json).
    #[arg(long, value_name = "PATH")]
    json: Option<PathBuf>,
    /// Leave the cluster running afterwards (it is stopped only if this run started it).
    #[arg(long)]
    keep_cluster: bool,
    /// Cluster options, as for `cargo xtask cluster up`.
    #[command(flatten)]
    cluster: cluster::UpArgs,
}

/// Runs the soak.
pub fn run(args: &Args) -> Result<()> {
    for (flag, value) in [
        ("--duration", &args.duration),
        ("--fault-every", &args.fault_every),
        ("--check-every", &args.check_every),
    ] {
        humantime::parse_duration(value)
            .with_context(|| format!("{flag} {value:?} is not a duration (e.g. 90s, 10m, 1h)"))?;
    }
    if !(args.rate > 0.0 && args.rate.is_finite()) {
        bail!("--rate must be a number above 0, got {}", args.rate);
    }
    eprintln!("==> building the plugins and test plugins");
    plugins::run(&plugins::Args {
        with_test_plugins: true,
    })?;
    eprintln!("==> building kuwa and kuwa-soak (debug)");
    let kuwa = demo::build_host()?;
    bench::cargo_build(false, &[("kuwa-e2e", "kuwa-soak")])?;
    let was_running = cluster::is_running();
    eprintln!("==> starting the local control plane");
    let kubeconfig = cluster::up(&args.cluster)?;
    let json = args
        .json
        .clone()
        .unwrap_or_else(|| plugins::target_dir().join("soak").join("report.json"));
    if let Some(parent) = json.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let status = Command::new(plugins::target_dir().join("debug").join("kuwa-soak"))
        .args(["--duration", &args.duration])
        .args(["--rate", &args.rate.to_string()])
        .args(["--fault-every", &args.fault_every])
        .args(["--check-every", &args.check_every])
        .args(["--seed", &args.seed.to_string()])
        .arg("--json")
        .arg(&json)
        .env("KUWA_KUBECONFIG", &kubeconfig)
        .env("KUWA_BIN", &kuwa)
        .env("KUWA_PLUGINS_DIR", plugins::plugins_dir())
        .env("KUWA_TEST_PLUGINS_DIR", plugins::test_plugins_dir())
        .status()
        .context("running kuwa-soak")?;
    if !was_running && !args.keep_cluster {
        eprintln!("==> stopping the local control plane");
        if let Err(e) = cluster::down() {
            eprintln!("warning: stopping the cluster failed: {e:#}");
        }
    }
    if !status.success() {
        bail!(
            "the soak failed (see above; the report, if any, is in {})",
            json.display()
        );
    }
    Ok(())
}

//! `kuwa-soak`: the churning and checking half of `cargo xtask soak` (which
//! builds the binaries, starts the local control plane and runs this with
//! `KUWA_KUBECONFIG`, `KUWA_BIN` and the plugin directories set). See
//! `kuwa_e2e::soak` for what it does and docs/reliability.md for results.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use kuwa_e2e::soak::{self, Options};

/// Churns WebServer, Memcached and MLTask parents while injecting faults,
/// and checks the whole namespace against the reference model.
#[derive(Parser)]
#[command(name = "kuwa-soak")]
struct Args {
    /// How long to churn and inject faults.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Parent operations per second.
    #[arg(long, default_value_t = 2.0)]
    rate: f64,
    /// Mean time between two faults.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    fault_every: Duration,
    /// Time between two reference checks.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    check_every: Duration,
    /// Longest one checkpoint may take to match the model.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    converge_timeout: Duration,
    /// Seed of the random plan.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Write the report as JSON here too.
    #[arg(long, value_name = "PATH")]
    json: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        args.rate > 0.0 && args.rate.is_finite(),
        "--rate must be above 0"
    );
    let client = kuwa_e2e::client().await?;
    let opts = Options {
        duration: args.duration,
        rate: args.rate,
        fault_every: args.fault_every,
        check_every: args.check_every,
        converge_timeout: args.converge_timeout,
        seed: args.seed,
    };
    let report = soak::run(&opts, &client).await?;
    println!("{}", soak::table(&report));
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("report written to {}", path.display());
    }
    Ok(())
}

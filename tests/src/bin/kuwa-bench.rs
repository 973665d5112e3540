//! `kuwa-bench`: the measuring half of `cargo xtask bench` (which builds the
//! binaries, starts the local control plane and runs this). See
//! `kuwa_e2e::bench` for the method and docs/benchmarks.md for results.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kuwa_e2e::bench::{self, Binaries, Options, System};

/// Measures kuwa against a native kube-rs controller and a Go
/// controller-runtime operator with the same WebServer logic.
#[derive(Parser)]
#[command(name = "kuwa-bench")]
struct Args {
    /// Admin kubeconfig of the cluster to measure on.
    #[arg(long, value_name = "PATH")]
    kubeconfig: PathBuf,
    /// The `kuwa` binary.
    #[arg(long, value_name = "PATH")]
    kuwa: PathBuf,
    /// Directory holding webserver.wasm and its manifest.
    #[arg(long, value_name = "DIR")]
    plugins: PathBuf,
    /// The WebServer version the hot swap moves to (webserver-v2.wasm).
    #[arg(long, value_name = "PATH")]
    webserver_v2: PathBuf,
    /// The native kube-rs peer binary (omit to skip it).
    #[arg(long, value_name = "PATH")]
    peer_kube_rs: Option<PathBuf>,
    /// The Go controller-runtime peer binary (omit to skip it).
    #[arg(long, value_name = "PATH")]
    peer_controller_runtime: Option<PathBuf>,
    /// WebServers per convergence run.
    #[arg(long, default_value_t = 1000)]
    parents: usize,
    /// Runs per system (medians are reported).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Resync period of every system (kuwa's floor is 10s).
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    resync: Duration,
    /// Longest one convergence may take.
    #[arg(long, default_value = "15m", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// Write the report as JSON here too.
    #[arg(long, value_name = "PATH")]
    json: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    anyhow::ensure!(args.parents > 0, "--parents must be at least 1");
    anyhow::ensure!(args.runs > 0, "--runs must be at least 1");
    let kubeconfig = Kubeconfig::read_from(&args.kubeconfig)
        .with_context(|| format!("reading {}", args.kubeconfig.display()))?;
    let config =
        kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
    let client = kube::Client::try_from(config)?;
    let mut systems = vec![System::Kuwa];
    if args.peer_kube_rs.is_some() {
        systems.push(System::KubeRs);
    }
    if args.peer_controller_runtime.is_some() {
        systems.push(System::ControllerRuntime);
    }
    let opts = Options {
        kubeconfig: args.kubeconfig,
        binaries: Binaries {
            kuwa: args.kuwa,
            plugins: args.plugins,
            webserver_v2: args.webserver_v2,
            kube_rs: args.peer_kube_rs,
            controller_runtime: args.peer_controller_runtime,
        },
        parents: args.parents,
        runs: args.runs,
        resync: args.resync,
        timeout: args.timeout,
        systems,
    };
    let report = bench::run(&opts, &client).await?;
    println!("{}", bench::table(&report));
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("bench: report written to {}", path.display());
    }
    Ok(())
}

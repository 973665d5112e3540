//! `cargo xtask demo`: the main job. Builds the plugins, brings up the local
//! control plane, and runs the host in the foreground with `--install-crds`,
//! ready for the samples in `deploy/samples/`.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result, bail};
use clap::Args as ClapArgs;

use crate::{cluster, plugins, workspace_root};

/// Arguments of `cargo xtask demo`.
#[derive(ClapArgs)]
pub struct Args {
    /// Where the host serves /metrics, /healthz and /readyz.
    #[arg(long, default_value = "127.0.0.1:9464")]
    metrics_addr: String,
    /// Cluster options, as for `cargo xtask cluster up`.
    #[command(flatten)]
    cluster: cluster::UpArgs,
}

/// Builds the `kuwa` binary (debug profile, shared with the tests) and
/// returns its path.
pub fn build_host() -> Result<PathBuf> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .current_dir(workspace_root())
        .args(["build", "-p", "kuwa-host", "--bin", "kuwa"])
        .status()
        .context("running cargo build")?;
    if !status.success() {
        bail!("building the host failed");
    }
    Ok(plugins::target_dir().join("debug").join("kuwa"))
}

/// Runs the demo.
pub fn run(args: &Args) -> Result<()> {
    eprintln!("==> building the plugins");
    let built = plugins::run(&plugins::Args::default())?;
    eprintln!("==> building the host");
    let kuwa = build_host()?;
    eprintln!(
        "==> starting the local control plane (the first run builds it: ~7-9 min on 2 cores)"
    );
    let kubeconfig = cluster::up(&args.cluster)?;
    let samples = workspace_root().join("deploy/samples");
    eprintln!();
    eprintln!(
        "kuwa is starting with {} plugins; in another shell:",
        built.len()
    );
    eprintln!("  export KUBECONFIG={}", kubeconfig.display());
    eprintln!("  kubectl apply -f {}", samples.display());
    eprintln!(
        "  kubectl get webservers,memcacheds,mltasks,securitypolicies,ingresses,networkpolicies,deploy,sts,pods"
    );
    eprintln!(
        "  curl -s http://{}/metrics | grep kuwa_",
        args.metrics_addr
    );
    eprintln!("Stop with Ctrl-C; `cargo xtask cluster down` stops the cluster.");
    eprintln!();
    let status = Command::new(&kuwa)
        .arg("run")
        .arg("--plugins")
        .arg(plugins::plugins_dir())
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .args(["--install-crds", "--metrics-addr", &args.metrics_addr])
        .status()
        .with_context(|| format!("running {}", kuwa.display()))?;
    if !status.success() && status.code().is_some() {
        bail!("kuwa exited with {status}");
    }
    Ok(())
}

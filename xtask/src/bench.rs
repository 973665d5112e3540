//! `cargo xtask bench`: builds kuwa, the WebServer plugin and its hot-swap
//! version, the native kube-rs peer and the Go controller-runtime peer,
//! brings up the local control plane, and runs `kuwa-bench` (the measuring
//! half, `tests/src/bench/`), which prints a table and writes JSON.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use clap::Args as ClapArgs;

use crate::{cluster, plugins, workspace_root};

/// Arguments of `cargo xtask bench`.
#[derive(ClapArgs)]
pub struct Args {
    /// WebServers per convergence run (the documented runs use 1000 and 3000).
    #[arg(long, default_value_t = 1000)]
    parents: usize,
    /// Runs per system; the table shows medians.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Resync period of every system (kuwa's floor is 10s).
    #[arg(long, default_value = "20s")]
    resync: String,
    /// The small, quick run CI makes so the bench cannot rot: 100
    /// WebServers, one run, resync 10s, debug builds shared with the tests.
    #[arg(long)]
    quick: bool,
    /// Use debug builds (shared with the tests) instead of release builds.
    /// Timings of debug builds are not comparable with the documented ones.
    #[arg(long)]
    dev: bool,
    /// Write the JSON report here (default: target/bench/report.json).
    #[arg(long, value_name = "PATH")]
    json: Option<PathBuf>,
    /// Leave out the peers (measure kuwa alone).
    #[arg(long)]
    no_peers: bool,
    /// Leave the cluster running afterwards (it is stopped only if this run started it).
    #[arg(long)]
    keep_cluster: bool,
    /// Cluster options, as for `cargo xtask cluster up`.
    #[command(flatten)]
    cluster: cluster::UpArgs,
}

/// `cargo build` (release or debug) of the given `(package, bin)` pairs.
pub fn cargo_build(release: bool, packages: &[(&str, &str)]) -> Result<()> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace_root()).arg("build");
    if release {
        cmd.arg("--release");
    }
    for (package, bin) in packages {
        cmd.args(["-p", package, "--bin", bin]);
    }
    let status = cmd.status().context("running cargo build")?;
    if !status.success() {
        bail!("cargo build failed");
    }
    Ok(())
}

/// Hash of the peer's go.mod, go.sum and Go files, the Go version and the
/// build flags.
fn go_source_hash(dir: &Path) -> Result<String> {
    let go = Command::new("go")
        .arg("version")
        .output()
        .context("running `go version` (Go 1.26 must be on PATH)")?;
    let mut recipe = go.stdout;
    recipe.extend_from_slice(b"\0-trimpath -ldflags=-s -w\0");
    cluster::gobuild::go_sources_hash(dir, &recipe)
}

/// Builds the Go controller-runtime peer (cached by a hash of its sources
/// under ~/.cache/kuwa/bench/) and returns the binary.
pub fn build_go_peer() -> Result<PathBuf> {
    let src = workspace_root().join("bench/peers/controller-runtime");
    let hash = go_source_hash(&src)?;
    let dir = cluster::state::cache_root()?.join("bench");
    std::fs::create_dir_all(&dir)?;
    let bin = dir.join(format!("peer-controller-runtime-{hash}"));
    if bin.is_file() {
        return Ok(bin);
    }
    eprintln!("==> building the controller-runtime peer (Go, modules from the proxy)");
    let tmp = dir.join(format!(".peer-controller-runtime-{hash}.tmp"));
    let mut cmd = Command::new("go");
    cluster::gobuild::go_env(&mut cmd);
    let status = cmd
        .current_dir(&src)
        .args(["build", "-trimpath", "-ldflags=-s -w", "-o"])
        .arg(&tmp)
        .arg(".")
        .status()
        .context("running go build")?;
    if !status.success() {
        bail!("building the controller-runtime peer failed");
    }
    std::fs::rename(&tmp, &bin)?;
    Ok(bin)
}

/// Runs the bench.
pub fn run(args: &Args) -> Result<()> {
    let release = !(args.dev || args.quick);
    let (parents, runs, resync) = if args.quick {
        (100, 1, "10s".to_owned())
    } else {
        (args.parents, args.runs, args.resync.clone())
    };
    eprintln!("==> building the plugins and test plugins");
    plugins::run(&plugins::Args {
        with_test_plugins: true,
    })?;
    eprintln!(
        "==> building kuwa, the kube-rs peer and the bench ({})",
        if release { "release" } else { "debug" }
    );
    let mut packages = vec![("kuwa-host", "kuwa"), ("kuwa-e2e", "kuwa-bench")];
    if !args.no_peers {
        packages.push(("kuwa-peer-kube-rs", "peer-kube-rs"));
    }
    cargo_build(release, &packages)?;
    let out = plugins::target_dir().join(if release { "release" } else { "debug" });
    let go_peer = if args.no_peers {
        None
    } else {
        Some(build_go_peer()?)
    };
    let was_running = cluster::is_running();
    eprintln!("==> starting the local control plane");
    let kubeconfig = cluster::up(&args.cluster)?;
    let json = args
        .json
        .clone()
        .unwrap_or_else(|| plugins::target_dir().join("bench").join("report.json"));
    if let Some(parent) = json.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let mut cmd = Command::new(out.join("kuwa-bench"));
    cmd.arg("--kubeconfig")
        .arg(&kubeconfig)
        .arg("--kuwa")
        .arg(out.join("kuwa"))
        .arg("--plugins")
        .arg(plugins::plugins_dir())
        .arg("--webserver-v2")
        .arg(plugins::test_plugins_dir().join("webserver-v2.wasm"))
        .args(["--parents", &parents.to_string()])
        .args(["--runs", &runs.to_string()])
        .args(["--resync", &resync])
        .arg("--json")
        .arg(&json);
    if !args.no_peers {
        cmd.arg("--peer-kube-rs").arg(out.join("peer-kube-rs"));
        if let Some(go) = &go_peer {
            cmd.arg("--peer-controller-runtime").arg(go);
        }
    }
    let status = cmd.status().context("running kuwa-bench")?;
    if !was_running && !args.keep_cluster {
        eprintln!("==> stopping the local control plane");
        if let Err(e) = cluster::down() {
            eprintln!("warning: stopping the cluster failed: {e:#}");
        }
    }
    if !status.success() {
        bail!("the bench failed");
    }
    Ok(())
}

//! `cargo xtask test`: the full test suite through cargo's test runner.
//!
//! Builds the plugins (and the misbehaving test plugins) for wasm, builds the
//! `kuwa` binary and the image (`cargo xtask image`), brings up the local control plane, runs `cargo test
//! --workspace` with `KUWA_KUBECONFIG`, `KUWA_BIN`, the plugin directories
//! and the image layout (`KUWA_IMAGE_DIR`, `KUWA_IMAGE_TAG`) in the environment, and stops the cluster again if it started it.

use std::process::Command;

use anyhow::{Context, Result, bail};
use clap::Args as ClapArgs;

use crate::{cluster, demo, image, plugins, workspace_root};

/// Arguments of `cargo xtask test`.
#[derive(ClapArgs)]
pub struct Args {
    /// Leave the cluster running afterwards (it is stopped only if this run started it).
    #[arg(long)]
    keep_cluster: bool,
    /// Cluster options, as for `cargo xtask cluster up`.
    #[command(flatten)]
    cluster: cluster::UpArgs,
    /// Extra arguments for `cargo test` (after `--`), e.g. a test name filter.
    #[arg(last = true)]
    cargo_test_args: Vec<String>,
}

/// Runs the suite.
pub fn run(args: &Args) -> Result<()> {
    eprintln!(
        "==> building the plugins and test plugins ({})",
        plugins::TARGET
    );
    plugins::run(&plugins::Args {
        with_test_plugins: true,
    })?;
    eprintln!("==> building the host");
    let kuwa = demo::build_host()?;
    eprintln!("==> building the image (static kuwa, OCI layout) and skopeo to inspect it");
    let image = image::build(&image::Args {
        out: None,
        tag: None,
        inspect: false,
    })?;
    image::inspect(&image)?;
    image::ensure_debian_package(
        "/usr/bin/docker-registry",
        "docker-registry",
        "the plugin-object tests pull from a registry on loopback",
    )?;
    let was_running = cluster::is_running();
    eprintln!(
        "==> starting the local control plane (the first run builds it: ~7-9 min on 2 cores)"
    );
    let kubeconfig = cluster::up(&args.cluster)?;
    eprintln!("==> cargo test --workspace");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    // Passing tests' figures (deadlines met, calls per quarantine interval,
    // ...) are part of the output: `--show-output` prints what they printed.
    let mut test_args = args.cargo_test_args.clone();
    if !test_args.iter().any(|a| a == "--") {
        test_args.push("--".into());
    }
    test_args.push("--show-output".into());
    let status = Command::new(cargo)
        .current_dir(workspace_root())
        .args(["test", "--workspace", "--no-fail-fast"])
        .args(&test_args)
        .env("KUWA_KUBECONFIG", &kubeconfig)
        .env("KUWA_BIN", &kuwa)
        .env("KUWA_PLUGINS_DIR", plugins::plugins_dir())
        .env("KUWA_TEST_PLUGINS_DIR", plugins::test_plugins_dir())
        .env("KUWA_IMAGE_DIR", &image.dir)
        .env("KUWA_IMAGE_TAG", &image.tag)
        .status()
        .context("running cargo test")?;
    if !was_running && !args.keep_cluster {
        eprintln!("==> stopping the local control plane");
        if let Err(e) = cluster::down() {
            eprintln!("warning: stopping the cluster failed: {e:#}");
        }
    }
    if !status.success() {
        bail!("tests failed");
    }
    Ok(())
}

//! `cargo xtask`: the project's build glue.
//!
//! * `cargo xtask plugins` builds every plugin for `wasm32-wasip2` and copies
//!   the components to `target/plugins/<name>.wasm`.
//! * `cargo xtask cluster up|down|status` manages the local control plane.
//! * `cargo xtask demo` runs the main job: plugins, cluster, CRDs, host.
//! * `cargo xtask test` runs the whole test suite through cargo's test runner.
//! * `cargo xtask bench` measures kuwa against its peers (docs/benchmarks.md).
//! * `cargo xtask soak` churns parents under injected faults and checks the
//!   cluster against the reference model (docs/reliability.md).
//! * `cargo xtask image` builds a static `kuwa` and an OCI image layout.

mod bench;
mod cluster;
mod demo;
mod image;
mod plugins;
mod soak;
mod testsuite;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    about = "kuwa build glue",
    bin_name = "cargo xtask"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build every plugin for wasm32-wasip2 (release) into target/plugins/.
    Plugins(plugins::Args),
    /// Manage the local Kubernetes control plane (apiserver, etcd, controllers, kwok).
    Cluster(cluster::Args),
    /// The main job: build plugins, start the cluster, install CRDs, run the host.
    Demo(demo::Args),
    /// Run the full test suite (unit, plugin and end-to-end) with cargo's test runner.
    Test(testsuite::Args),
    /// Measure kuwa against a native kube-rs and a Go controller-runtime peer
    /// (convergence, latency, CPU, memory, steady state, hot swap).
    Bench(bench::Args),
    /// Churn parents of all three kinds while injecting faults (API server
    /// restarts, watch expiry, kill -9, plugin swaps, drift) and check the
    /// whole cluster against the reference model.
    Soak(soak::Args),
    /// Build a static kuwa (musl) and an OCI image layout with it and the shipped
    /// plugins, without Docker (target/image/kuwa).
    Image(image::Args),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Plugins(args) => plugins::run(&args).map(|_| ()),
        Command::Cluster(args) => cluster::run(&args),
        Command::Demo(args) => demo::run(&args),
        Command::Test(args) => testsuite::run(&args),
        Command::Bench(args) => bench::run(&args),
        Command::Soak(args) => soak::run(&args),
        Command::Image(args) => image::run(&args),
    };
    if let Err(err) = result {
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}

/// The workspace root (the parent of `xtask/`).
pub fn workspace_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the workspace root")
        .to_path_buf()
}

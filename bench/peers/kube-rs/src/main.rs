//! # peer-kube-rs
//!
//! A benchmark peer for kuwa: the WebServer plugin's reconcile logic, linked
//! natively into a plain `kube::runtime::Controller`. Each kind (WebServer,
//! ConfigMap, Deployment, Service) is watched once in one namespace and
//! cached in a reflector store; the child caches are indexed by controller
//! owner uid. Every reconcile calls the plugin's `reconcile` through the
//! SDK's JSON path, server-side applies the children that are missing,
//! changed (a `kuwa.dev/desired-hash` annotation) or drifted, deletes the
//! ones no longer wanted and writes the status only when it changed.

mod cache;
mod metrics;
mod plan;
mod reconcile;

use std::collections::HashMap;
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::Parser;
use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use kube::Client;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::controller::{self, Controller};
use kuwa_plugin_webserver::WebServer;
use tokio::signal::unix::{SignalKind, signal};

use crate::cache::Cache;
use crate::metrics::Metrics;
use crate::reconcile::Context;

/// The command line.
#[derive(Debug, Parser)]
#[command(
    name = "peer-kube-rs",
    about = "The WebServer plugin's logic as a native kube-rs controller (a kuwa benchmark peer)"
)]
struct Args {
    /// Kubeconfig file; without it, $KUBECONFIG, ~/.kube/config or the
    /// in-cluster configuration.
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// The only namespace watched and written.
    #[arg(long)]
    namespace: String,
    /// Reconciles running at once.
    #[arg(long, default_value_t = 16)]
    concurrency: u16,
    /// Reconcile each WebServer again this long after a success.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    resync: Duration,
    /// Where to serve `/metrics` and `/readyz`.
    #[arg(long, default_value = "127.0.0.1:9501")]
    metrics_addr: SocketAddr,
}

async fn client(args: &Args) -> anyhow::Result<Client> {
    let config = match &args.kubeconfig {
        Some(path) => {
            let kubeconfig = Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .with_context(|| format!("loading kubeconfig {}", path.display()))?
        }
        None => kube::Config::infer()
            .await
            .context("finding a Kubernetes configuration")?,
    };
    Client::try_from(config).context("building the Kubernetes client")
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() -> anyhow::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    if args.concurrency == 0 {
        bail!("--concurrency must be at least 1");
    }
    if args.resync.is_zero() {
        bail!("--resync must be positive");
    }
    // Listen for signals from the start, so an early SIGTERM is not lost.
    let shutdown = shutdown_signal();
    let client = client(&args).await?;
    let metrics = Arc::new(Metrics::new());
    metrics::serve(args.metrics_addr, Arc::clone(&metrics))
        .await
        .with_context(|| format!("listening on {}", args.metrics_addr))?;

    let ns = args.namespace.as_str();
    let (parents, parents_synced, parent_events) =
        cache::watch_parents::<WebServer>(client.clone(), ns);
    let (config_maps, config_map_events) = Cache::<ConfigMap>::watch(client.clone(), ns);
    let (deployments, deployment_events) = Cache::<Deployment>::watch(client.clone(), ns);
    let (services, service_events) = Cache::<Service>::watch(client.clone(), ns);
    let synced = [
        parents_synced,
        config_maps.synced().clone(),
        deployments.synced().clone(),
        services.synced().clone(),
    ];
    let ready = Arc::clone(&metrics);
    tokio::spawn(async move {
        for s in &synced {
            s.wait().await;
        }
        ready.ready.store(true, Ordering::Release);
        tracing::info!("caches synced");
    });

    let ctx = Arc::new(Context {
        client,
        namespace: args.namespace.clone(),
        resync: args.resync,
        metrics,
        config_maps,
        deployments,
        services,
        failures: Mutex::new(HashMap::new()),
    });
    let controller = Controller::for_stream(parent_events, parents)
        .owns_stream(config_map_events)
        .owns_stream(deployment_events)
        .owns_stream(service_events)
        .with_config(controller::Config::default().concurrency(args.concurrency))
        .run(reconcile::reconcile, reconcile::error_policy, ctx)
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::debug!(error = %e, "controller");
            }
        });
    tracing::info!(namespace = %args.namespace, "peer-kube-rs started");
    tokio::select! {
        () = controller => bail!("the controller stopped"),
        r = shutdown => r?,
    }
    tracing::info!("shutting down");
    Ok(())
}

//! The `kuwa` command line: `run`, `plugin check`, `plugin test`, `crds`, `rbac`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use serde_json::{Value, json};

use crate::cache::PLUGIN_LABEL;
use crate::gvk::Gvk;
use crate::host::{Host, HostConfig};
use crate::leader::{Elector, Leadership, LeaseConfig};
use crate::metrics::Metrics;
use crate::plan::{self, owner_reference, prepare_child};
use crate::plugin::hotswap::PluginDir;
use crate::plugin::info::{FieldManager, PluginInfo};
use crate::plugin::loader::load_dir;
use crate::plugin::runtime::{LoadedPlugin, Runtime, wit};
use crate::reconcile::now_rfc3339;
use crate::tenant::limits::{DEFAULT_MEMORY_CAP, Limits, MAX_DEADLINE};
use crate::validate::{ParentRef, is_dns_subdomain, validate_output};

/// kuwa: a Kubernetes controller host whose reconcile logic runs as
/// WebAssembly components.
#[derive(Parser, Debug)]
#[command(name = "kuwa", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the host: load every plugin in a directory and reconcile their objects.
    Run(Box<RunArgs>),
    /// Work with one plugin file, without a cluster.
    #[command(subcommand)]
    Plugin(PluginCommand),
    /// Print the CustomResourceDefinitions the plugins in a directory carry, as YAML.
    Crds {
        /// Directory of plugin components (*.wasm).
        #[arg(long, value_name = "DIR", required_unless_present = "host")]
        plugins: Option<PathBuf>,
        /// Print the host's own CRDs (ClusterPlugin, Plugin) instead.
        #[arg(long, conflicts_with = "plugins")]
        host: bool,
        /// Write one `<crd name>.yaml` per CRD into this directory instead of printing.
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
    },
    /// Print the least-privilege RBAC the plugins in a directory need (a ClusterRole,
    /// Roles for namespace-limited grants and the leader Lease, and their bindings to the
    /// host's ServiceAccount), as YAML.
    Rbac(RbacArgs),
}

#[derive(clap::Args, Debug)]
struct RbacArgs {
    /// Directory of plugin components (*.wasm) with their grants.
    #[arg(long, value_name = "DIR")]
    plugins: PathBuf,
    /// Name of the ClusterRole, Roles and bindings.
    #[arg(long, value_name = "NAME", default_value = "kuwa")]
    name: String,
    /// The host's ServiceAccount.
    #[arg(long, value_name = "NAME", default_value = "kuwa")]
    service_account: String,
    /// The ServiceAccount's namespace.
    #[arg(long, value_name = "NAMESPACE", default_value = "kuwa-system")]
    service_account_namespace: String,
    /// The host watches this namespace only (as `kuwa run --namespace`): reads of
    /// namespaced kinds go into a Role there.
    #[arg(long, value_name = "NAMESPACE")]
    namespace: Option<String>,
    /// The host runs with --install-crds: plugins whose grant says `installCrd: true`
    /// may create and patch their own CRD (by name).
    #[arg(long)]
    install_crds: bool,
    /// The host runs with --plugin-resources: read ClusterPlugin and Plugin objects,
    /// write their status, and impersonate the ServiceAccounts they name.
    #[arg(long)]
    plugin_resources: bool,
    /// The host runs without --leader-elect: no Lease rules.
    #[arg(long)]
    no_leader_election: bool,
    /// The Lease's name (as `kuwa run --leader-election-id`).
    #[arg(long, value_name = "NAME", default_value = "kuwa")]
    leader_election_id: String,
    /// The Lease's namespace (default: the ServiceAccount's).
    #[arg(long, value_name = "NAMESPACE")]
    leader_election_namespace: Option<String>,
}

#[derive(Subcommand, Debug)]
enum PluginCommand {
    /// Load a plugin, validate it against the WIT contract and print what it describes.
    Check {
        /// The plugin component.
        file: PathBuf,
    },
    /// Publish a plugin component to an OCI registry as a wasm artifact (config
    /// application/vnd.wasm.config.v0+json, one application/wasm layer); prints the
    /// manifest digest.
    Push {
        /// The plugin component.
        file: PathBuf,
        /// Where: oci://REGISTRY/REPOSITORY:TAG (loopback registries over plain HTTP).
        reference: String,
        /// Publish without loading it first (to test how hosts refuse a file that is
        /// not a working component).
        #[arg(long)]
        no_verify: bool,
    },
    /// Run a plugin's reconcile on fixture YAML and print the desired objects, the status
    /// and the writes the host would make (the host's own plan code, no cluster).
    Test(TestArgs),
}

#[derive(clap::Args, Debug)]
struct TestArgs {
    /// The plugin component.
    file: PathBuf,
    /// The parent object (YAML). Missing namespace, uid and generation are filled in.
    #[arg(long, value_name = "FILE")]
    parent: PathBuf,
    /// Observed children (YAML, several documents allowed); repeatable. They are taken as
    /// the parent's children: owner reference, plugin label and field manager are filled in
    /// when missing.
    #[arg(long, value_name = "FILE")]
    children: Vec<PathBuf>,
    /// Related objects (YAML, several documents allowed); repeatable.
    #[arg(long, value_name = "FILE")]
    related: Vec<PathBuf>,
    /// Answers to the plugin's outbound HTTP calls (YAML: a list of `request: {method,
    /// url, body?}` with its `response: {status, headers?, body}`, the format of the
    /// `outbound` list this command prints). Without it (or --live) every call fails
    /// with "no fixture answers"; the grant's outbound.hosts still applies.
    #[arg(long, value_name = "FILE", conflicts_with = "live")]
    outbound: Option<PathBuf>,
    /// Send the plugin's outbound calls for real (to the origins its grant lists) and
    /// print them, to save as an --outbound fixture.
    #[arg(long)]
    live: bool,
    /// Test under this grant instead of the manifest beside the component (e.g. the one
    /// it will be deployed with, listing outbound.hosts).
    #[arg(long, value_name = "FILE")]
    manifest: Option<PathBuf>,
    /// The time the plugin is told it is (RFC 3339), so the output can be compared with
    /// a saved copy; default: now.
    #[arg(long, value_name = "TIME")]
    now: Option<String>,
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// Directory of plugin components (*.wasm), watched for hot swaps.
    #[arg(long, value_name = "DIR", required_unless_present = "plugin_resources")]
    plugins: Option<PathBuf>,
    /// Also serve ClusterPlugin and Plugin objects (kuwa.dev/v1alpha1): plugins
    /// pulled from OCI registries, installed with kubectl apply.
    #[arg(long)]
    plugin_resources: bool,
    /// Serve only the ClusterPlugin and Plugin objects matching this label selector
    /// (several hosts in one cluster, each with its own set).
    #[arg(long, value_name = "SELECTOR", requires = "plugin_resources")]
    plugin_selector: Option<String>,
    /// Where components pulled from registries are kept by digest (default:
    /// ~/.cache/kuwa/oci).
    #[arg(long, value_name = "DIR", env = "KUWA_OCI_STORE")]
    oci_store: Option<PathBuf>,
    /// Kubeconfig to use; default: $KUBECONFIG, ~/.kube/config or in-cluster.
    #[arg(long, value_name = "PATH")]
    kubeconfig: Option<PathBuf>,
    /// Where to serve /metrics, /healthz and /readyz (loopback by default).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9464")]
    metrics_addr: SocketAddr,
    /// Reconcile every parent at least this often (e.g. 30s, 5m).
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = humantime::parse_duration)]
    resync_period: Duration,
    /// Watch and reconcile namespaced objects in this namespace only.
    #[arg(long, value_name = "NAMESPACE")]
    namespace: Option<String>,
    /// Apply the CRDs the plugins carry before serving them.
    #[arg(long)]
    install_crds: bool,
    /// Reconciles in flight at once across all plugins (1-512; each holds one of the 64
    /// instance slots only while its plugin runs).
    #[arg(long, value_name = "N", default_value_t = crate::tenant::limits::DEFAULT_CONCURRENT_RECONCILES)]
    max_concurrent_reconciles: usize,
    /// Caps the reconciles of each plugin at once (a grant's `concurrency` overrides it).
    /// Default: none: a plugin alone may use every slot of --max-concurrent-reconciles,
    /// and plugins with work share the slots fairly.
    #[arg(long, value_name = "N")]
    plugin_concurrency: Option<usize>,
    /// Wall-clock deadline of one plugin call, host calls included (at most 60s).
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = humantime::parse_duration)]
    call_deadline: Duration,
    /// How long a reconcile waits for its plugin's caches to list before it gives up
    /// (the key backs off and the parent is marked Degraded=CacheNotSynced).
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = humantime::parse_duration)]
    cache_sync_timeout: Duration,
    /// Memory cap of one plugin call, in MiB.
    #[arg(long, value_name = "MIB", default_value_t = DEFAULT_MEMORY_CAP >> 20)]
    memory_cap_mib: usize,
    /// Where to keep compiled plugins (default: ~/.cache/kuwa/compiled).
    #[arg(long, value_name = "DIR", env = "KUWA_COMPILE_CACHE")]
    compile_cache: Option<PathBuf>,
    /// Compile every plugin at start instead of reading the compile cache.
    #[arg(long)]
    no_compile_cache: bool,
    /// On SIGTERM or Ctrl-C, how long reconciles in flight may take to finish
    /// before the host exits (and, with --leader-elect, releases the lease).
    #[arg(long, value_name = "DURATION", default_value = "20s", value_parser = humantime::parse_duration)]
    shutdown_timeout: Duration,
    #[command(flatten)]
    leader: LeaderArgs,
}

#[derive(clap::Args, Debug)]
#[command(next_help_heading = "Leader election (several replicas, one writer)")]
struct LeaderArgs {
    /// Compete for a coordination.k8s.io Lease and reconcile only while holding
    /// it; stand by with warm caches otherwise. Off by default (one host from a
    /// shell); on in deploy/.
    #[arg(long)]
    leader_elect: bool,
    /// The Lease's name.
    #[arg(long, value_name = "NAME", default_value = "kuwa")]
    leader_election_id: String,
    /// The Lease's namespace (default: the service account's namespace in a
    /// Pod, else the kubeconfig context's, else `default`).
    #[arg(long, value_name = "NAMESPACE")]
    leader_election_namespace: Option<String>,
    /// This replica's identity in the Lease (default: $POD_NAME, else the
    /// hostname with the process id).
    #[arg(long, value_name = "ID")]
    leader_identity: Option<String>,
    /// How long standbys wait after the last renewal they saw before taking
    /// the Lease (whole seconds).
    #[arg(long, value_name = "DURATION", default_value = "15s", value_parser = humantime::parse_duration)]
    leader_lease_duration: Duration,
    /// How long a leader keeps writing without a successful renewal; it
    /// stops writing once this has passed (shorter than the lease duration).
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = humantime::parse_duration)]
    leader_renew_deadline: Duration,
    /// How often the leader renews and standbys retry (a released Lease is
    /// taken at once: standbys watch it).
    #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = humantime::parse_duration)]
    leader_retry_period: Duration,
}

impl LeaderArgs {
    /// The Lease settings; `default_namespace` when no namespace is given.
    fn config(&self, default_namespace: &str) -> LeaseConfig {
        LeaseConfig {
            name: self.leader_election_id.clone(),
            namespace: self
                .leader_election_namespace
                .clone()
                .unwrap_or_else(|| default_namespace.to_owned()),
            identity: self
                .leader_identity
                .clone()
                .unwrap_or_else(crate::leader::default_identity),
            lease_duration: self.leader_lease_duration,
            renew_deadline: self.leader_renew_deadline,
            retry_period: self.leader_retry_period,
        }
    }
}

/// The default compile-cache directory: `$XDG_CACHE_HOME/kuwa/compiled` or
/// `~/.cache/kuwa/compiled`.
pub fn default_compile_cache() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("kuwa").join("compiled"))
}

/// Parses the command line and runs it; errors print their whole chain.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // The OCI client's TLS (rustls) uses the process-wide provider: ring,
    // as kube's own client does.
    let _ = rustls::crypto::ring::default_provider().install_default();
    init_tracing();
    let result = match cli.command {
        Command::Run(args) => tokio_main(run(*args)),
        Command::Plugin(PluginCommand::Check { file }) => tokio_main(check(&file)),
        Command::Plugin(PluginCommand::Push {
            file,
            reference,
            no_verify,
        }) => tokio_main(push(&file, &reference, no_verify)),
        Command::Plugin(PluginCommand::Test(args)) => tokio_main(test(&args)),
        Command::Crds { plugins, host, out } => {
            tokio_main(crds(plugins.as_deref(), host, out.as_deref()))
        }
        Command::Rbac(args) => tokio_main(rbac(&args)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("KUWA_LOG").unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("info,kube_runtime=warn,kube_client=warn")
    });
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

fn tokio_main(f: impl std::future::Future<Output = anyhow::Result<()>>) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(f)
}

async fn client(kubeconfig: Option<&Path>) -> anyhow::Result<(kube::Client, kube::Config)> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .with_context(|| format!("using kubeconfig {}", path.display()))?
        }
        None => kube::Config::infer()
            .await
            .context("no kubeconfig found (pass --kubeconfig)")?,
    };
    let client = kube::Client::try_from(config.clone()).context("building the API client")?;
    Ok((client, config))
}

/// Checks the `run` arguments that clap cannot.
fn check_run_args(args: &RunArgs) -> anyhow::Result<()> {
    if let Some(dir) = &args.plugins
        && !dir.is_dir()
    {
        bail!("--plugins {} is not a directory", dir.display());
    }
    let pool = crate::tenant::limits::MAX_CONCURRENT_RECONCILES;
    if args.max_concurrent_reconciles == 0 || args.max_concurrent_reconciles > pool {
        bail!(
            "--max-concurrent-reconciles must be between 1 and {pool}, got {}",
            args.max_concurrent_reconciles
        );
    }
    if let Some(n) = args.plugin_concurrency
        && (n == 0 || n > pool)
    {
        bail!("--plugin-concurrency must be between 1 and {pool}, got {n}");
    }
    if args.call_deadline.is_zero() || args.call_deadline > MAX_DEADLINE {
        bail!(
            "--call-deadline must be between 1ms and {}, got {}",
            humantime::format_duration(MAX_DEADLINE),
            humantime::format_duration(args.call_deadline)
        );
    }
    if args.memory_cap_mib == 0 || args.memory_cap_mib > crate::tenant::limits::MAX_MEMORY_CAP >> 20
    {
        bail!(
            "--memory-cap-mib must be between 1 and {}, got {}",
            crate::tenant::limits::MAX_MEMORY_CAP >> 20,
            args.memory_cap_mib
        );
    }
    if args.resync_period.is_zero() {
        bail!("--resync-period must be positive");
    }
    if args.shutdown_timeout > Duration::from_secs(3600) {
        bail!("--shutdown-timeout must be at most 1h");
    }
    if args.leader.leader_elect {
        // The durations and names, before connecting (the namespace default
        // comes from the client).
        let config = args.leader.config("default");
        config.check()?;
        if let Some(ns) = &args.leader.leader_election_namespace
            && !is_dns_subdomain(ns)
        {
            bail!("--leader-election-namespace {ns:?} is not a valid namespace");
        }
    }
    Ok(())
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    check_run_args(&args)?;
    let (client, kube_config) = client(args.kubeconfig.as_deref()).await?;
    let version = client
        .apiserver_version()
        .await
        .context("cannot reach the API server")?;
    tracing::info!(server = %version.git_version, "connected");
    let cache = if args.no_compile_cache {
        None
    } else {
        args.compile_cache.clone().or_else(default_compile_cache)
    };
    let runtime = Runtime::new(cache.as_deref())
        .map_err(|e| anyhow::anyhow!("{e:#}"))
        .context("starting the wasm runtime")?;
    let metrics = Arc::new(Metrics::new());
    let election = if args.leader.leader_elect {
        let config = args.leader.config(client.default_namespace());
        config.check()?;
        tracing::info!(lease = %format!("{}/{}", config.namespace, config.name), identity = %config.identity, "leader election on: standing by until the lease is held");
        let leadership = Leadership::standby();
        Some(Elector::new(
            client.clone(),
            config,
            leadership,
            metrics.clone(),
        ))
    } else {
        None
    };
    let leadership = election
        .as_ref()
        .map_or_else(Leadership::always, Elector::leadership);
    let config = HostConfig {
        resync_period: args.resync_period,
        max_concurrent_reconciles: args.max_concurrent_reconciles,
        plugin_concurrency: args.plugin_concurrency,
        namespace: args.namespace.clone(),
        sync_timeout: args.cache_sync_timeout,
        leadership,
        kube_config: Some(kube_config),
    };
    let (host, changes) = Host::new(client.clone(), config, metrics);
    let endpoint = crate::endpoints::serve(args.metrics_addr, host.clone())
        .await
        .with_context(|| {
            format!(
                "cannot serve metrics on {} (is the port taken? pass --metrics-addr)",
                args.metrics_addr
            )
        })?;
    let mut tasks = host.spawn(changes);
    tasks.push(endpoint);

    let limits = Limits {
        deadline: args.call_deadline,
        memory_bytes: args.memory_cap_mib << 20,
        ..Limits::default()
    };
    if args.plugin_resources {
        let dir = args
            .oci_store
            .clone()
            .or_else(|| default_compile_cache().map(|c| c.with_file_name("oci")))
            .context("no directory for pulled components (pass --oci-store)")?;
        let store = crate::plugin::oci::Store::new(&dir)?;
        let objects = crate::plugin::objects::PluginObjects::new(
            host.clone(),
            client.clone(),
            runtime.clone(),
            store,
            limits,
            args.install_crds,
        );
        tasks.push(objects.spawn(args.namespace.as_deref(), args.plugin_selector.as_deref()));
        tracing::info!(store = %dir.display(), "serving ClusterPlugin and Plugin objects");
    }
    if let Some(dir) = &args.plugins {
        let plugins = PluginDir::new(host.clone(), runtime, dir, limits, args.install_crds)?;
        tasks.push(plugins.serve().await?);
    }
    host.mark_started();
    let election_task = election.as_ref().map(Elector::spawn);

    shutdown_signal().await;
    tracing::info!(timeout = ?args.shutdown_timeout, "shutting down: no new reconciles, waiting for those in flight");
    let left = host.drain(args.shutdown_timeout).await;
    if left > 0 {
        tracing::warn!(
            running = left,
            "reconciles still running at the shutdown timeout are cut short; their keys are reconciled again by the next leader"
        );
    }
    if let (Some(elector), Some(task)) = (&election, election_task) {
        task.abort();
        match elector.release().await {
            Ok(true) => tracing::info!("leader lease released"),
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(error = %e, "could not release the leader lease; a standby takes it when it expires")
            }
        }
    }
    for t in tasks {
        t.abort();
    }
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

async fn load_one(file: &Path) -> anyhow::Result<LoadedPlugin> {
    load_with(
        file,
        None,
        crate::plugin::outbound::Transport::Fixtures(Arc::default()),
    )
    .await
}

async fn load_with(
    file: &Path,
    manifest: Option<&Path>,
    transport: crate::plugin::outbound::Transport,
) -> anyhow::Result<LoadedPlugin> {
    let runtime = Runtime::new(None)
        .map_err(|e| anyhow::anyhow!("{e:#}"))
        .context("starting the wasm runtime")?
        .with_outbound(transport, true);
    Ok(
        crate::plugin::loader::load_file_granted(&runtime, file, manifest, Limits::default())
            .await?,
    )
}

/// The `--outbound` fixtures of `plugin test`.
fn read_exchanges(path: &Path) -> anyhow::Result<Vec<crate::plugin::outbound::Exchange>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_saphyr::from_str(&text).with_context(|| {
        format!(
            "{} is not a list of outbound exchanges (request: {{method, url, body?}}, response: {{status, headers?, body}})",
            path.display()
        )
    })
}

/// What `plugin check` prints for a plugin.
pub fn describe_json(info: &PluginInfo, sha256: &str) -> Value {
    let gvk = |g: &Gvk| json!({"group": g.group, "version": g.version, "kind": g.kind});
    json!({
        "name": &*info.name,
        "version": info.version,
        "sha256": sha256,
        "parent": gvk(&info.parent),
        "parentScope": if info.parent_namespaced { "Namespaced" } else { "Cluster" },
        "children": info.children.iter().map(gvk).collect::<Vec<_>>(),
        "related": info.related.iter().map(|(g, m)| json!({"kind": gvk(g), "mapping": format!("{m:?}")})).collect::<Vec<_>>(),
        "finalizer": if info.finalizer { Value::from(info.finalizer_name()) } else { Value::Null },
        "resyncSeconds": info.resync.map(|d| d.as_secs()),
        "crd": info.crd.as_ref().map(|c| c["metadata"]["name"].clone()),
        "fieldManager": info.field_manager(FieldManager::Children),
    })
}

fn to_yaml(value: &Value) -> anyhow::Result<String> {
    serde_saphyr::to_string(value).context("printing YAML")
}

async fn check(file: &Path) -> anyhow::Result<()> {
    let plugin = load_one(file).await?;
    print!("{}", to_yaml(&describe_json(&plugin.info, &plugin.sha256))?);
    Ok(())
}

fn read_yaml_docs(path: &Path) -> anyhow::Result<Vec<Value>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let docs: Vec<Value> = serde_saphyr::from_multiple(&text)
        .with_context(|| format!("{} is not valid YAML", path.display()))?;
    Ok(docs.into_iter().filter(|v| !v.is_null()).collect())
}

/// Fills what the API server would have set on a fixture parent.
fn fixture_parent(mut parent: Value, now: &str) -> anyhow::Result<Value> {
    if !parent["metadata"]["name"].is_string() {
        bail!("the parent needs metadata.name");
    }
    let meta = &mut parent["metadata"];
    for (key, default) in [
        ("namespace", json!("default")),
        ("uid", json!("00000000-0000-0000-0000-000000000001")),
        ("generation", json!(1)),
        ("creationTimestamp", json!(now)),
    ] {
        if meta.get(key).is_none() {
            meta[key] = default;
        }
    }
    Ok(parent)
}

/// Makes a fixture child one of `parent`'s, as the host would have applied
/// it: owner reference, plugin label and field manager, where missing.
fn fixture_child(
    mut child: Value,
    parent: &kube::api::DynamicObject,
    info: &PluginInfo,
) -> anyhow::Result<kube::api::DynamicObject> {
    if !child["metadata"]["name"].is_string() {
        bail!("every observed child needs metadata.name");
    }
    let meta = &mut child["metadata"];
    if meta.get("namespace").is_none()
        && let Some(ns) = &parent.metadata.namespace
    {
        meta["namespace"] = json!(ns);
    }
    if meta.get("ownerReferences").is_none() {
        meta["ownerReferences"] = json!([owner_reference(&info.parent, parent)]);
    }
    if !meta["labels"].is_object() {
        meta["labels"] = json!({});
    }
    if meta["labels"].get(PLUGIN_LABEL).is_none() {
        meta["labels"][PLUGIN_LABEL] = json!(&*info.name);
    }
    if meta.get("managedFields").is_none() {
        meta["managedFields"] = json!([{
            "manager": info.field_manager(FieldManager::Children),
            "operation": "Apply",
        }]);
    }
    Ok(serde_json::from_value(child)?)
}

async fn test(args: &TestArgs) -> anyhow::Result<()> {
    use crate::plugin::outbound::Transport;
    let transport = match (&args.outbound, args.live) {
        (Some(path), _) => Transport::Fixtures(Arc::new(read_exchanges(path)?)),
        (None, true) => Transport::default(),
        (None, false) => Transport::Fixtures(Arc::default()),
    };
    let now = match &args.now {
        Some(t) => {
            let parsed: jiff::Timestamp = t
                .parse()
                .with_context(|| format!("--now {t:?} is not an RFC 3339 time"))?;
            parsed.to_string()
        }
        None => now_rfc3339(),
    };
    let plugin = load_with(&args.file, args.manifest.as_deref(), transport).await?;
    let info = &plugin.info;
    let parent = read_yaml_docs(&args.parent)?
        .into_iter()
        .next()
        .with_context(|| format!("{} holds no object", args.parent.display()))?;
    let parent = fixture_parent(parent, &now)?;
    let parent_object: kube::api::DynamicObject = serde_json::from_value(parent.clone())?;
    let mut children = Vec::new();
    for path in &args.children {
        for doc in read_yaml_docs(path)? {
            children.push(Arc::new(crate::cache::CachedObject::new(fixture_child(
                doc,
                &parent_object,
                info,
            )?)));
        }
    }
    let mut related = Vec::new();
    for path in &args.related {
        related.extend(read_yaml_docs(path)?);
    }
    let input = wit::Observed {
        parent: parent.to_string(),
        children: children.iter().map(|c| c.json().to_owned()).collect(),
        related: related.iter().map(Value::to_string).collect(),
        context: wit::Context {
            now: now.clone(),
            trigger: "plugin test".into(),
        },
    };
    let reconciled = plugin.reconcile(&input).await?;
    let outbound: Vec<Value> = plugin
        .take_outbound_calls()
        .into_iter()
        .filter_map(|c| c.exchange)
        .map(|x| serde_json::to_value(x).expect("an exchange serializes"))
        .collect();
    // On failure the calls made are printed before the error.
    if !outbound.is_empty() && reconciled.is_err() {
        eprint!("{}", to_yaml(&json!({"outbound": &outbound}))?);
    }
    let desired = match reconciled {
        Ok(d) => d,
        Err(wit::ReconcileError::InvalidSpec(m)) => bail!("invalid spec: {m}"),
        Err(wit::ReconcileError::Transient(m)) => bail!("transient error: {m}"),
        Err(wit::ReconcileError::BadInput(m)) => bail!("bad input: {m}"),
    };
    let namespace = parent_object.metadata.namespace.clone();
    let name = parent_object.metadata.name.clone().unwrap_or_default();
    let output = validate_output(
        info,
        &plugin.grant,
        &ParentRef {
            namespace: namespace.as_deref(),
            name: &name,
        },
        desired,
    )
    .context("the host would reject this output")?;
    let owner = owner_reference(&info.parent, &parent_object);
    let objects: Vec<Value> = output
        .children
        .iter()
        .map(|c| prepare_child(c.object.clone(), namespace.as_deref(), &owner, info))
        .collect();
    let status = output.status.clone();
    let requeue = output.requeue_after;
    let events: Vec<Value> = output
        .events
        .iter()
        .map(|e| json!({"type": e.kind(), "reason": e.reason, "message": e.message}))
        .collect();
    // The same plan step as the host's, with the fixtures as the cache.
    let cached = |gvk: &Gvk, ns: Option<&str>, name: &str| {
        children
            .iter()
            .find(|c| {
                Gvk::of_cached(c).as_ref() == Some(gvk)
                    && c.metadata.name.as_deref() == Some(name)
                    && c.metadata.namespace.as_deref() == ns
            })
            .cloned()
    };
    let namespaced = |_: &Gvk| namespace.is_some();
    let seen = plan::Observed {
        info,
        grant: &plugin.grant,
        parent: &parent_object,
        children: &children,
        cached: &cached,
        namespaced: &namespaced,
        now: &now,
    };
    let plan = plan::reconcile(&seen, output).context("the host would refuse this output")?;
    let out = json!({
        "children": objects,
        "status": status,
        "requeueAfterMs": requeue.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        "events": events,
        "plan": plan.writes.iter().map(plan::Write::describe).collect::<Vec<_>>(),
        "outbound": outbound,
    });
    print!("{}", to_yaml(&out)?);
    Ok(())
}

/// The file `kuwa crds --out` writes a CRD to: `<name>.yaml`, or none when
/// the name (which the plugin chose) is not a DNS subdomain and so could
/// name a path outside the directory.
fn crd_file_name(crd: &Value) -> Option<String> {
    let name = crd["metadata"]["name"].as_str()?;
    is_dns_subdomain(name).then(|| format!("{name}.yaml"))
}

async fn push(file: &Path, reference: &str, no_verify: bool) -> anyhow::Result<()> {
    let source = crate::plugin::oci::Source::parse(reference)?;
    // Load it first: only a working component is published.
    let what = if no_verify {
        file.display().to_string()
    } else {
        let plugin = load_one(file).await?;
        format!("{}@{}", plugin.info.name, plugin.info.version)
    };
    let bytes = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    let digest = crate::plugin::oci::push(&source, bytes).await?;
    eprintln!("pushed {what} to {}", source.whole());
    println!("{digest}");
    Ok(())
}

async fn crds(dir: Option<&Path>, host: bool, out: Option<&Path>) -> anyhow::Result<()> {
    let runtime = Runtime::new(None)
        .map_err(|e| anyhow::anyhow!("{e:#}"))
        .context("starting the wasm runtime")?;
    let limits = Limits::default();
    let mut failed = 0;
    let mut first = true;
    let results = match dir {
        Some(dir) => load_dir(&runtime, dir, limits).await?,
        None => Vec::new(),
    };
    let carried: Vec<(String, Option<Value>)> = if host {
        crate::plugin::resource::crds()
            .into_iter()
            .map(|c| ("the host's own kinds".to_owned(), Some(c)))
            .collect()
    } else {
        let mut v = Vec::new();
        for result in results {
            match result {
                Ok(plugin) => v.push((
                    format!("plugin {}", plugin.info.name),
                    plugin.info.crd.clone(),
                )),
                Err(e) => {
                    eprintln!("error: {e}");
                    failed += 1;
                }
            }
        }
        v
    };
    for (name, crd) in carried {
        {
            match &crd {
                Some(crd) => {
                    let yaml = to_yaml(crd)?;
                    match out {
                        Some(out) => {
                            let Some(file) = crd_file_name(crd) else {
                                eprintln!(
                                    "error: {} carries a CRD named {:?}, which is not a DNS subdomain; not written",
                                    name, crd["metadata"]["name"]
                                );
                                failed += 1;
                                continue;
                            };
                            let path = out.join(file);
                            let command = if host { "--host" } else { "--plugins DIR" };
                            let text = format!(
                                "# Generated by `kuwa crds {command} --out deploy/crds` from {name}. Do not edit.\n{yaml}"
                            );
                            std::fs::write(&path, text)
                                .with_context(|| format!("writing {}", path.display()))?;
                            eprintln!("wrote {}", path.display());
                        }
                        None => {
                            if !first {
                                println!("---");
                            }
                            first = false;
                            print!("{yaml}");
                        }
                    }
                }
                None => eprintln!("note: {name} carries no CRD"),
            }
        }
    }
    if failed > 0 {
        bail!("{failed} plugin(s) could not be loaded");
    }
    Ok(())
}

async fn rbac(args: &RbacArgs) -> anyhow::Result<()> {
    if !args.plugins.is_dir() {
        bail!("--plugins {} is not a directory", args.plugins.display());
    }
    for (flag, value) in [
        ("--name", Some(&args.name)),
        ("--service-account", Some(&args.service_account)),
        (
            "--service-account-namespace",
            Some(&args.service_account_namespace),
        ),
        ("--namespace", args.namespace.as_ref()),
        ("--leader-election-id", Some(&args.leader_election_id)),
        (
            "--leader-election-namespace",
            args.leader_election_namespace.as_ref(),
        ),
    ] {
        if let Some(v) = value
            && !is_dns_subdomain(v)
        {
            bail!("{flag} {v:?} is not a valid object name");
        }
    }
    let runtime = Runtime::new(None)
        .map_err(|e| anyhow::anyhow!("{e:#}"))
        .context("starting the wasm runtime")?;
    let mut needs = Vec::new();
    let mut failed = 0;
    for result in load_dir(&runtime, &args.plugins, Limits::default()).await? {
        match result {
            Ok(plugin) => needs.push(crate::rbac::PluginNeeds::of(&plugin, args.install_crds)),
            Err(e) => {
                eprintln!("error: {e}");
                failed += 1;
            }
        }
    }
    if failed > 0 {
        bail!("{failed} plugin(s) could not be loaded; no RBAC printed");
    }
    if needs.is_empty() {
        bail!("no plugins (*.wasm) in {}", args.plugins.display());
    }
    needs.sort_by(|a, b| a.name.cmp(&b.name));
    let options = crate::rbac::Options {
        name: args.name.clone(),
        service_account: args.service_account.clone(),
        service_account_namespace: args.service_account_namespace.clone(),
        watch_namespace: args.namespace.clone(),
        plugin_resources: args.plugin_resources,
        lease: (!args.no_leader_election).then(|| {
            (
                args.leader_election_namespace
                    .clone()
                    .unwrap_or_else(|| args.service_account_namespace.clone()),
                args.leader_election_id.clone(),
            )
        }),
    };
    let names: Vec<&str> = needs.iter().map(|n| n.name.as_str()).collect();
    println!(
        "# Generated by `kuwa rbac --plugins DIR` for plugins {}. Do not edit.",
        names.join(", ")
    );
    for (i, object) in crate::rbac::objects(&needs, &options).iter().enumerate() {
        if i > 0 {
            println!("---");
        }
        print!("{}", to_yaml(object)?);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crd_file_names_stay_in_the_directory() {
        let crd = |name: &str| json!({"metadata": {"name": name}});
        assert_eq!(
            crd_file_name(&crd("webservers.kuwa.dev")).as_deref(),
            Some("webservers.kuwa.dev.yaml")
        );
        for bad in ["../../etc/cron.d/x", "/etc/passwd", "a/b", "..", ""] {
            assert_eq!(crd_file_name(&crd(bad)), None, "{bad:?}");
        }
        assert_eq!(crd_file_name(&json!({"metadata": {}})), None);
    }
}

//! The chaos soak (issue 13): `cargo xtask soak --duration 10m`.
//!
//! One host runs the WebServer, Memcached and MLTask plugins in a namespace
//! of its own, talking to a [`SpareApiServer`] on the cluster's etcd. For
//! the whole duration the soak creates, updates and deletes parents of all
//! three kinds at a steady rate through the cluster's own API server, and
//! at random intervals injects one fault:
//!
//! * `api_restart`: the host's API server stops for 5-15 s and starts again;
//! * `watch_expiry`: the same, with etcd compacted while it is away, so
//!   every watch resumes with 410 Gone and relists;
//! * `host_kill`: `kill -9` of the host, and a new one started;
//! * `plugin_swap`: the WebServer component replaced, in turn, by its other
//!   good version (`webserver-v2`, which labels every child) and by a
//!   corrupt file (refused; the version serving keeps serving);
//! * `drift`: a second writer changes a field a plugin owns, or deletes a
//!   child.
//!
//! Every `check_every` (and at the end) churn and faults pause and the
//! whole namespace is compared with the reference model
//! ([`crate::reference`]) until it matches: how long that takes is the
//! convergence lag. A checkpoint that does not converge within
//! `converge_timeout` fails the soak, as does any orphan, duplicate, host
//! panic or host exit the soak did not cause.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use kube::Client;
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, Patch, PatchParams};
use serde_json::{Value, json};

use crate::TestNamespace;
use crate::faults::{LocalCluster, SpareApiServer, compact_etcd};
use crate::host::{KuwaHost, apply_json, metric_sample, plugin, sum_metric, test_plugin};
use crate::reference::{Model, Report, wait_clean};

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    /// How long to churn and inject faults (the final check comes after).
    pub duration: Duration,
    /// Parent operations per second.
    pub rate: f64,
    /// Mean time between faults.
    pub fault_every: Duration,
    /// Time between reference checks.
    pub check_every: Duration,
    /// Longest a checkpoint may take to match the model.
    pub converge_timeout: Duration,
    /// Seed of the pseudo-random choices (the same seed, the same plan).
    pub seed: u64,
}

/// A small deterministic PRNG (xorshift64*): the soak's plan is a function
/// of its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> Option<&'a T> {
        (!items.is_empty()).then(|| &items[self.below(items.len() as u64) as usize])
    }
}

/// The three parent kinds the soak churns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    WebServer,
    Memcached,
    MLTask,
}

impl Kind {
    const ALL: [Kind; 3] = [Kind::WebServer, Kind::Memcached, Kind::MLTask];

    fn name(self) -> &'static str {
        match self {
            Kind::WebServer => "WebServer",
            Kind::Memcached => "Memcached",
            Kind::MLTask => "MLTask",
        }
    }

    fn plural(self) -> &'static str {
        match self {
            Kind::WebServer => "webservers",
            Kind::Memcached => "memcacheds",
            Kind::MLTask => "mltasks",
        }
    }

    /// Most parents of the kind alive at once (MLTasks compete for 8 GPUs).
    fn cap(self) -> usize {
        match self {
            Kind::WebServer => 30,
            Kind::Memcached => 8,
            Kind::MLTask => 6,
        }
    }

    fn api(self, client: &Client, ns: &str) -> Api<DynamicObject> {
        let r = ApiResource {
            group: "kuwa.dev".into(),
            version: "v1alpha1".into(),
            api_version: "kuwa.dev/v1alpha1".into(),
            kind: self.name().into(),
            plural: self.plural().into(),
        };
        Api::namespaced_with(client.clone(), ns, &r)
    }

    /// A valid spec, varied by `n`.
    fn object(self, name: &str, n: u64) -> Value {
        let spec = match self {
            Kind::WebServer => json!({
                "replicas": 1 + (n % 2),
                "content": format!("<h1>{name} #{n}</h1>"),
                "software": {"name": "nginx", "version": "1.27"},
            }),
            Kind::Memcached => json!({
                "replicas": 1 + (n % 3),
                "memoryMB": 64,
                "topology": if n.is_multiple_of(2) { "sharded" } else { "replicated" },
                "proxy": {"replicas": 1},
            }),
            Kind::MLTask => json!({
                "image": "pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime",
                "command": ["python", "/workspace/train.py"],
                "args": [format!("--epochs={}", 1 + n % 10)],
                "trainingData": "s3://datasets/mnist",
                "modelOutput": format!("s3://models/{name}"),
                "parallelism": 1 + (n % 2),
                "gpusPerWorker": 1,
            }),
        };
        json!({
            "apiVersion": "kuwa.dev/v1alpha1",
            "kind": self.name(),
            "metadata": {"name": name},
            "spec": spec,
        })
    }
}

/// The faults the soak injects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    ApiRestart,
    WatchExpiry,
    HostKill,
    PluginSwap,
    CorruptSwap,
    Drift,
}

impl Fault {
    const ALL: [Fault; 6] = [
        Fault::ApiRestart,
        Fault::WatchExpiry,
        Fault::HostKill,
        Fault::PluginSwap,
        Fault::CorruptSwap,
        Fault::Drift,
    ];

    fn label(self) -> &'static str {
        match self {
            Fault::ApiRestart => "api_restart",
            Fault::WatchExpiry => "watch_expiry",
            Fault::HostKill => "host_kill",
            Fault::PluginSwap => "plugin_swap",
            Fault::CorruptSwap => "corrupt_swap",
            Fault::Drift => "drift",
        }
    }
}

/// Which WebServer component the host's plugin directory holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Version {
    V1,
    V2,
}

/// Counters one host process exported before it was killed or stopped.
#[derive(Debug, Default, Clone, Copy)]
struct HostTotals {
    reconciles: f64,
    writes: f64,
    relists: f64,
    panics: f64,
    drift_repairs: f64,
    outages: f64,
}

impl HostTotals {
    fn add(&mut self, text: &str) {
        self.reconciles += sum_metric(text, "kuwa_reconciles_total", &[]);
        self.writes += sum_metric(text, "kuwa_api_writes_total", &[]);
        self.relists += sum_metric(text, "kuwa_watch_lists_total", &[]);
        self.panics += sum_metric(text, "kuwa_reconcile_panics_total", &[]);
        self.drift_repairs += sum_metric(text, "kuwa_drift_repairs_total", &[]);
        self.outages += sum_metric(text, "kuwa_api_outages_total", &[]);
    }
}

struct Soak {
    opts: Options,
    client: Client,
    ns: String,
    cluster: LocalCluster,
    spare: SpareApiServer,
    host: KuwaHost,
    rng: Rng,
    /// Live parents per kind, by name, with their spec counter.
    live: BTreeMap<Kind, BTreeMap<String, u64>>,
    next_name: u64,
    ops: BTreeMap<&'static str, u64>,
    faults: BTreeMap<&'static str, u64>,
    totals: HostTotals,
    version: Version,
    /// When the API server comes back, if it is away.
    resume_at: Option<Instant>,
    checks: Vec<Value>,
    host_logs_panics: usize,
    /// A corrupt WebServer file is on disk (the host serves the last good).
    corrupt_on_disk: bool,
}

fn plugins() -> Result<Vec<std::path::PathBuf>> {
    Ok(vec![
        plugin("webserver")?,
        plugin("memcached")?,
        plugin("mltask")?,
    ])
}

fn count_panics(log: &str) -> usize {
    log.lines().filter(|l| l.contains("panicked")).count()
}

impl Soak {
    async fn start_host(spare: &SpareApiServer, ns: &str) -> Result<KuwaHost> {
        KuwaHost::start_as(spare.kubeconfig(), Some(ns), &plugins()?, &[], &[]).await
    }

    fn models(&self) -> Vec<Model> {
        vec![
            match self.version {
                Version::V1 => Model::webserver(),
                Version::V2 => Model::webserver_v2(),
            },
            Model::memcached(),
            Model::mltask(),
        ]
    }

    fn parents(&self) -> usize {
        self.live.values().map(BTreeMap::len).sum()
    }

    async fn operate(&mut self) -> Result<()> {
        let kind = *self.rng.pick(&Kind::ALL).expect("three kinds");
        let live: Vec<String> = self.live[&kind].keys().cloned().collect();
        let roll = self.rng.unit();
        let api = kind.api(&self.client, &self.ns);
        if live.len() < kind.cap() && (live.is_empty() || roll < 0.4) {
            self.next_name += 1;
            let name = format!("{}-{}", kind.name().to_ascii_lowercase(), self.next_name);
            let n = self.rng.next() % 1000;
            apply_json(&self.client, &self.ns, &kind.object(&name, n)).await?;
            self.live.get_mut(&kind).expect("kind").insert(name, n);
            *self.ops.entry("create").or_default() += 1;
        } else if roll < 0.8 {
            let name = self.rng.pick(&live).expect("not empty").clone();
            let n = self.rng.next() % 1000;
            apply_json(&self.client, &self.ns, &kind.object(&name, n)).await?;
            self.live.get_mut(&kind).expect("kind").insert(name, n);
            *self.ops.entry("update").or_default() += 1;
        } else {
            let name = self.rng.pick(&live).expect("not empty").clone();
            api.delete(&name, &DeleteParams::background()).await?;
            self.live.get_mut(&kind).expect("kind").remove(&name);
            *self.ops.entry("delete").or_default() += 1;
        }
        Ok(())
    }

    /// Brings back whatever a fault left away: the API server, a good
    /// WebServer component.
    async fn heal(&mut self) -> Result<()> {
        if self.resume_at.take().is_some() {
            self.spare.resume().await?;
        }
        Ok(())
    }

    async fn swap_to(&mut self, version: Version) -> Result<()> {
        let from = match version {
            Version::V1 => plugin("webserver")?,
            Version::V2 => test_plugin("webserver-v2")?,
        };
        let tmp = self.host.plugins_dir.join(".webserver.wasm.tmp");
        std::fs::copy(&from, &tmp)?;
        std::fs::rename(&tmp, self.host.plugins_dir.join("webserver.wasm"))?;
        self.version = version;
        Ok(())
    }

    async fn restart_host(&mut self) -> Result<()> {
        if let Ok(text) = self.host.metrics().await {
            self.totals.add(&text);
        }
        self.host
            .signal(rustix::process::Signal::KILL)
            .context("kill -9 of the host")?;
        self.host.wait_exit(Duration::from_secs(10)).await?;
        self.host_logs_panics += count_panics(&self.host.log());
        // A new host starts with the shipped components (the first
        // version), against whatever API server is there: if it is away,
        // bring it back first (the host needs it to start).
        self.heal().await?;
        self.host = Self::start_host(&self.spare, &self.ns).await?;
        self.version = Version::V1;
        Ok(())
    }

    async fn drift(&mut self) -> Result<()> {
        let live: Vec<String> = self.live[&Kind::WebServer].keys().cloned().collect();
        let Some(name) = self.rng.pick(&live).cloned() else {
            return Ok(());
        };
        let params = PatchParams::default();
        match self.rng.below(3) {
            0 => {
                let api: Api<k8s_openapi::api::apps::v1::Deployment> =
                    Api::namespaced(self.client.clone(), &self.ns);
                ignore_missing(
                    api.patch(
                        &name,
                        &params,
                        &Patch::Merge(json!({"spec": {"replicas": 4}})),
                    )
                    .await,
                )?;
            }
            1 => {
                let api: Api<k8s_openapi::api::core::v1::ConfigMap> =
                    Api::namespaced(self.client.clone(), &self.ns);
                ignore_missing(
                    api.patch(
                        &format!("{name}-content"),
                        &params,
                        &Patch::Merge(json!({"data": {"index.html": "tampered"}})),
                    )
                    .await,
                )?;
            }
            _ => {
                let api: Api<k8s_openapi::api::core::v1::Service> =
                    Api::namespaced(self.client.clone(), &self.ns);
                ignore_missing(api.delete(&name, &DeleteParams::background()).await)?;
            }
        }
        Ok(())
    }

    async fn inject(&mut self, fault: Fault) -> Result<()> {
        match fault {
            Fault::ApiRestart | Fault::WatchExpiry => {
                if self.resume_at.is_some() {
                    return Ok(());
                }
                self.spare.stop().await?;
                if fault == Fault::WatchExpiry {
                    compact_etcd(&self.cluster).await?;
                }
                let away = Duration::from_secs(5 + self.rng.below(11));
                self.resume_at = Some(Instant::now() + away);
            }
            Fault::HostKill => self.restart_host().await?,
            Fault::PluginSwap => {
                let to = match self.version {
                    Version::V1 => Version::V2,
                    Version::V2 => Version::V1,
                };
                self.swap_to(to).await?;
            }
            Fault::CorruptSwap => {
                let tmp = self.host.plugins_dir.join(".webserver.wasm.tmp");
                std::fs::write(&tmp, b"\0asm\x0d\0\x01\0 this is not a component")?;
                std::fs::rename(&tmp, self.host.plugins_dir.join("webserver.wasm"))?;
                // The version serving keeps serving; the file on disk is
                // corrupt until the next swap (a checkpoint puts it back).
                self.corrupt_on_disk = true;
            }
            Fault::Drift => self.drift().await?,
        }
        *self.faults.entry(fault.label()).or_default() += 1;
        Ok(())
    }

    /// Pauses churn and faults and waits until the namespace matches the
    /// model; records the lag.
    async fn checkpoint(&mut self, started: Instant) -> Result<Report> {
        self.heal().await?;
        if self.corrupt_on_disk {
            let version = self.version;
            self.swap_to(version).await?;
            self.corrupt_on_disk = false;
        }
        if !self.host.is_running() {
            bail!(
                "the host exited without being killed:\n{}",
                self.host.log_tail(40)
            );
        }
        let paused = Instant::now();
        let models = self.models();
        let (report, lag) = wait_clean(
            &self.client,
            &self.ns,
            &models,
            self.parents(),
            self.opts.converge_timeout,
        )
        .await
        .with_context(|| format!("checkpoint {} of the soak", self.checks.len() + 1))?;
        self.checks.push(json!({
            "at_s": round(paused.duration_since(started).as_secs_f64()),
            "parents": report.parent_count(),
            "children": report.children,
            "lag_s": round(lag.as_secs_f64()),
            "webserver_version": format!("{:?}", self.version),
        }));
        eprintln!(
            "soak: checkpoint at {:.0?}: {} parents, {} children match the model after {:.1?}",
            paused.duration_since(started),
            report.parent_count(),
            report.children,
            lag
        );
        Ok(report)
    }
}

fn ignore_missing<T>(r: std::result::Result<T, kube::Error>) -> Result<()> {
    match r {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

fn round(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

/// Runs the soak and returns its report (also see [`table`]).
pub async fn run(opts: &Options, client: &Client) -> Result<Value> {
    anyhow::ensure!(opts.rate > 0.0, "the rate must be above 0");
    let ns = TestNamespace::new(client, "soak").await?;
    let result = run_in(opts, client, &ns.name).await;
    ns.cleanup().await;
    result
}

async fn run_in(opts: &Options, client: &Client, ns: &str) -> Result<Value> {
    let cluster = tokio::task::spawn_blocking(LocalCluster::load).await??;
    let spare = SpareApiServer::start().await?;
    let host = Soak::start_host(&spare, ns).await?;
    let mut soak = Soak {
        opts: opts.clone(),
        client: client.clone(),
        ns: ns.to_owned(),
        cluster,
        spare,
        host,
        rng: Rng(opts.seed.max(1)),
        live: Kind::ALL.iter().map(|k| (*k, BTreeMap::new())).collect(),
        next_name: 0,
        ops: BTreeMap::new(),
        faults: Fault::ALL.iter().map(|f| (f.label(), 0)).collect(),
        totals: HostTotals::default(),
        version: Version::V1,
        resume_at: None,
        checks: Vec::new(),
        host_logs_panics: 0,
        corrupt_on_disk: false,
    };
    let started = Instant::now();
    let end = started + opts.duration;
    let op_gap = Duration::from_secs_f64(1.0 / opts.rate);
    let mut next_fault = started + soak.fault_gap();
    let mut next_check = started + opts.check_every;
    let mut op_errors = 0u64;
    while Instant::now() < end {
        if let Some(at) = soak.resume_at
            && Instant::now() >= at
        {
            soak.heal().await?;
        }
        if Instant::now() >= next_fault {
            // Faults in turn, from a random start, so a short soak still
            // sees each kind.
            let fault = Fault::ALL[(soak.faults.values().sum::<u64>() as usize
                + (opts.seed as usize % Fault::ALL.len()))
                % Fault::ALL.len()];
            eprintln!("soak: {:.0?}: {}", started.elapsed(), fault.label());
            soak.inject(fault).await?;
            next_fault = Instant::now() + soak.fault_gap();
        }
        if Instant::now() >= next_check {
            soak.checkpoint(started).await?;
            next_check = Instant::now() + opts.check_every;
        }
        let tick = Instant::now();
        if let Err(e) = soak.operate().await {
            // The soak's own specs are valid: a refusal of one is its bug.
            if let Some(kube::Error::Api(s)) = e.downcast_ref::<kube::Error>()
                && (s.code == 400 || s.code == 422)
            {
                bail!("the API server refused a spec the soak made: {e:#}");
            }
            // The cluster's own API server is never the one stopped; an
            // operation failing is a conflict or a slow answer: counted.
            op_errors += 1;
            eprintln!("soak: operation failed: {e:#}");
        }
        tokio::time::sleep(op_gap.saturating_sub(tick.elapsed())).await;
    }
    let report = soak.checkpoint(started).await?;
    let text = soak.host.metrics().await?;
    soak.totals.add(&text);
    soak.host_logs_panics += count_panics(&soak.host.log());
    let max_lag = soak
        .checks
        .iter()
        .filter_map(|c| c["lag_s"].as_f64())
        .fold(0.0, f64::max);
    let per_kind: BTreeMap<&str, usize> =
        soak.live.iter().map(|(k, v)| (k.name(), v.len())).collect();
    let out = json!({
        "duration_s": round(opts.duration.as_secs_f64()),
        "seed": opts.seed,
        "rate_per_s": opts.rate,
        "parents_at_end": per_kind,
        "children_at_end": report.children,
        "operations": soak.ops,
        "operation_errors": op_errors,
        "faults": soak.faults,
        "checks": soak.checks.len(),
        "max_convergence_lag_s": max_lag,
        "reconciles": soak.totals.reconciles,
        "writes": soak.totals.writes,
        "relists": soak.totals.relists,
        "drift_repairs": soak.totals.drift_repairs,
        "outages_seen": soak.totals.outages,
        "orphans": report.orphans.len(),
        "duplicates": report.duplicates.len(),
        "host_panics": soak.totals.panics as usize + soak.host_logs_panics,
        "checkpoints": soak.checks,
        "live_plugin_info": metric_sample(&text, "kuwa_plugin_info", &[("plugin", "webserver")]),
    });
    if out["host_panics"].as_u64() != Some(0) {
        bail!("the host panicked during the soak: {out:#}");
    }
    Ok(out)
}

impl Soak {
    fn fault_gap(&mut self) -> Duration {
        // Uniform in [0.5, 1.5] × the mean.
        self.opts.fault_every.mul_f64(0.5 + self.rng.unit())
    }
}

/// The report as a table.
pub fn table(r: &Value) -> String {
    let mut rows: Vec<(String, String)> = vec![
        (
            "duration".into(),
            format!("{} s (seed {})", r["duration_s"], r["seed"]),
        ),
        ("parents at end".into(), r["parents_at_end"].to_string()),
        ("children at end".into(), r["children_at_end"].to_string()),
        ("operations".into(), r["operations"].to_string()),
        ("operation errors".into(), r["operation_errors"].to_string()),
        ("faults injected".into(), r["faults"].to_string()),
        ("reference checks".into(), r["checks"].to_string()),
        (
            "max convergence lag".into(),
            format!("{} s", r["max_convergence_lag_s"]),
        ),
        ("reconciles".into(), r["reconciles"].to_string()),
        ("writes".into(), r["writes"].to_string()),
        ("relists".into(), r["relists"].to_string()),
        ("drift repairs".into(), r["drift_repairs"].to_string()),
        (
            "API outages the host saw".into(),
            r["outages_seen"].to_string(),
        ),
        ("orphans".into(), r["orphans"].to_string()),
        ("duplicates".into(), r["duplicates"].to_string()),
        ("host panics".into(), r["host_panics"].to_string()),
    ];
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    let mut out = String::from("| what | value |\n|---|---|\n");
    for (k, v) in rows.drain(..) {
        out.push_str(&format!("| {k:width$} | {v} |\n"));
    }
    out
}

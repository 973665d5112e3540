//! `cargo xtask bench`: kuwa against two peers with the same WebServer logic
//! (a native kube-rs controller and a Go controller-runtime operator) on the
//! local control plane, in one run (DESIGN §7, docs/benchmarks.md).
//!
//! Per run and system, in a fresh namespace: start the controller, sample its
//! CPU and RSS idle, create N WebServers (32 creates in flight), and watch
//! until every child exists and every parent is ready; then count the writes
//! of a steady-state window (at least two resyncs) and, for kuwa, swap the
//! plugin file to a version that labels every child and time until all
//! children carry the label. Systems alternate within a run, so drift of the
//! machine spreads over all of them; results are medians over runs.
//!
//! Timings are reported, never judged: the only hard failures are the
//! correctness ones (a system that does not converge, or a missing counter).

mod observe;
mod procs;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::Client;
use kube::api::{Api, DeleteParams, DynamicObject, PostParams};
use serde_json::{Value, json};

pub use observe::{is_ready, median, quantile};
pub use procs::{Binaries, Controller, System};

use crate::host::metric_sample;
use crate::objects::{webserver, webserver_resource};
use observe::{Observer, Seen, num};

/// The label the hot swap's version puts on every child.
pub const V2_LABEL: &str = "test.kuwa.dev/v2=true";

/// How the bench runs.
#[derive(Debug, Clone)]
pub struct Options {
    /// The admin kubeconfig of the cluster.
    pub kubeconfig: PathBuf,
    /// The binaries and plugins.
    pub binaries: Binaries,
    /// WebServers per convergence run.
    pub parents: usize,
    /// Runs per system.
    pub runs: usize,
    /// Resync period given to every system.
    pub resync: Duration,
    /// How long one convergence may take before the run fails.
    pub timeout: Duration,
    /// Systems to run.
    pub systems: Vec<System>,
}

/// What one run of one system measured.
#[derive(Debug, Clone, Default)]
struct RunResult {
    children_s: f64,
    ready_s: f64,
    latency_p50_s: f64,
    latency_p99_s: f64,
    writes: f64,
    reconciles: f64,
    cpu_s: f64,
    rss_idle_mib: f64,
    rss_converged_mib: f64,
    steady_writes: f64,
    steady_window_s: f64,
    steady_cpu_s: f64,
    steady_unchanged: Option<f64>,
    swap_first_s: Option<f64>,
    swap_all_s: Option<f64>,
    swap_relists: Option<f64>,
    stages_ms: BTreeMap<String, f64>,
    /// Cores each control-plane component used during convergence.
    cluster_cores: BTreeMap<String, f64>,
    /// The controller's own cores during convergence.
    controller_cores: f64,
    swap_writes_per_s: Option<f64>,
}

fn cluster_cpu() -> BTreeMap<String, f64> {
    procs::cluster_processes()
        .into_iter()
        .filter_map(|(component, pid)| Some((component, procs::sample(pid).ok()?.cpu)))
        .collect()
}

fn progress(text: &str) {
    eprintln!("bench: {text}");
}

async fn create_namespace(client: &Client, name: &str) -> Result<()> {
    let ns: Namespace = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": name, "labels": {"kuwa.dev/bench": "true"}},
    }))?;
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .with_context(|| format!("creating namespace {name}"))?;
    Ok(())
}

/// Deletes a namespace and waits (bounded) until it is gone, so the next
/// run does not share the cluster with its garbage collection.
async fn delete_namespace(client: &Client, name: &str) -> Result<()> {
    let api: Api<Namespace> = Api::all(client.clone());
    match api.delete(name, &DeleteParams::background()).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 404 => return Ok(()),
        Err(e) => return Err(e.into()),
    }
    crate::wait_for(
        &format!("namespace {name} to be gone"),
        Duration::from_secs(600),
        || {
            let api = api.clone();
            async move { Ok(api.get_opt(name).await?.is_none().then_some(())) }
        },
    )
    .await
}

/// Creates `count` objects with `make(i)` through `create`, 32 in flight.
async fn create_all<F, Fut>(count: usize, create: F) -> Result<()>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    let results: Vec<Result<()>> = futures::stream::iter(0..count)
        .map(create)
        .buffer_unordered(32)
        .collect()
        .await;
    results.into_iter().collect()
}

/// The raw API create rate: ConfigMaps, 32 in flight, for `seconds`.
async fn raw_create_rate(client: &Client, seconds: f64) -> Result<f64> {
    let ns = format!("bench-raw-{}", std::process::id());
    create_namespace(client, &ns).await?;
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let made = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(seconds);
    let workers = (0..32).map(|w| {
        let api = api.clone();
        let made = made.clone();
        async move {
            let mut i = 0;
            while Instant::now() < deadline {
                let cm: ConfigMap = serde_json::from_value(json!({
                    "metadata": {"name": format!("raw-{w}-{i}")},
                    "data": {"k": "v"},
                }))?;
                api.create(&PostParams::default(), &cm).await?;
                made.fetch_add(1, Ordering::Relaxed);
                i += 1;
            }
            Ok::<_, anyhow::Error>(())
        }
    });
    let results = futures::future::join_all(workers).await;
    let elapsed = started.elapsed().as_secs_f64();
    delete_namespace(client, &ns).await?;
    results.into_iter().collect::<Result<Vec<()>>>()?;
    Ok(made.load(Ordering::Relaxed) as f64 / elapsed)
}

/// Polls `done` every 100 ms until it answers, for at most `timeout`.
async fn until<T>(what: &str, timeout: Duration, mut done: impl FnMut() -> Option<T>) -> Result<T> {
    let started = Instant::now();
    loop {
        if let Some(v) = done() {
            return Ok(v);
        }
        if started.elapsed() > timeout {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn stage_seconds(text: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for stage in [
        "snapshot",
        "instantiate",
        "guest",
        "validate",
        "plan",
        "preflight",
        "apply",
    ] {
        if let Some(v) = metric_sample(
            text,
            "kuwa_reconcile_stage_seconds_total",
            &[("plugin", "webserver"), ("stage", stage)],
        ) {
            out.insert(stage.to_owned(), v);
        }
    }
    out
}

/// One convergence run of `system` in a fresh namespace.
async fn run_one(opts: &Options, client: &Client, system: System, run: usize) -> Result<RunResult> {
    let n = opts.parents;
    let ns = format!("bench-{}-{}-{run}", system.label(), std::process::id());
    create_namespace(client, &ns).await?;
    let result = async {
        let controller =
            Controller::start(system, &opts.binaries, &opts.kubeconfig, &ns, opts.resync).await?;
        // Let start-up work (lists, compiling) settle before the idle sample.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let idle = controller.sample()?;
        let before = controller.baseline().await?;
        let stages_before = match system {
            System::Kuwa => stage_seconds(&controller.metrics().await?),
            _ => BTreeMap::new(),
        };
        let cluster_before = cluster_cpu();
        let start = Instant::now();
        let observer = Observer::start(client, &ns, start, Some(V2_LABEL));
        let api: Api<DynamicObject> =
            Api::namespaced_with(client.clone(), &ns, &webserver_resource());
        let names: Vec<String> = (0..n).map(|i| format!("ws-{i:05}")).collect();
        create_all(n, |i| {
            let api = api.clone();
            let name = names[i].clone();
            let observer = &observer;
            async move {
                let body: DynamicObject =
                    serde_json::from_value(webserver(&name, &format!("page {name}"), 1))?;
                api.create(&PostParams::default(), &body)
                    .await
                    .with_context(|| format!("creating WebServer {name}"))?;
                observer.created(&name);
                Ok(())
            }
        })
        .await?;
        let child_names = Seen::child_names(&names);
        let expected_children = 3 * n;
        let children = until(
            &format!("{} children ({})", expected_children, system.label()),
            opts.timeout,
            || observer.lock().last_child(&child_names, expected_children),
        )
        .await?;
        let ready = until(
            &format!("{n} WebServers ready ({})", system.label()),
            opts.timeout,
            || {
                let s = observer.lock();
                (s.ready.len() >= n).then(|| s.ready.values().max().copied())?
            },
        )
        .await?;
        let converged = controller.sample()?;
        let after = controller.counters().await?;
        let elapsed = start.elapsed().as_secs_f64();
        let cluster_cores = cluster_cpu()
            .into_iter()
            .filter_map(|(c, cpu)| {
                let before = cluster_before.get(&c)?;
                Some((c, (cpu - before) / elapsed))
            })
            .collect();
        let latencies: Vec<f64> = {
            let s = observer.lock();
            names
                .iter()
                .filter_map(|name| {
                    let created = s.created.get(name)?;
                    let ready = s.ready.get(name)?;
                    Some(ready.saturating_sub(*created).as_secs_f64())
                })
                .collect()
        };
        let stages_ms = match system {
            System::Kuwa => {
                let now = stage_seconds(&controller.metrics().await?);
                let reconciles = (after.reconciles - before.reconciles).max(1.0);
                now.iter()
                    .map(|(k, v)| {
                        let was = stages_before.get(k).copied().unwrap_or(0.0);
                        (k.clone(), (v - was) * 1000.0 / reconciles)
                    })
                    .collect()
            }
            _ => BTreeMap::new(),
        };
        progress(&format!(
            "{} run {run}: children {:.1}s, ready {:.1}s, writes {}, reconciles {}",
            system.label(),
            children.as_secs_f64(),
            ready.as_secs_f64(),
            after.writes - before.writes,
            after.reconciles - before.reconciles
        ));
        // Steady state: two and a half resync periods after a quiet second.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let window = opts.resync.mul_f64(2.5);
        let steady_from = controller.counters().await?;
        let steady_cpu_from = controller.sample()?;
        tokio::time::sleep(window).await;
        let steady_to = controller.counters().await?;
        let steady_cpu_to = controller.sample()?;
        // kuwa: how many of the window's reconciles found their parent
        // settled and skipped the plugin (None when the series is absent).
        let steady_unchanged = match system {
            System::Kuwa => metric_sample(
                &controller.metrics().await?,
                "kuwa_reconciles_total",
                &[("plugin", "webserver"), ("result", "unchanged")],
            ),
            _ => None,
        };
        let mut result = RunResult {
            children_s: children.as_secs_f64(),
            ready_s: ready.as_secs_f64(),
            latency_p50_s: quantile(&latencies, 0.5).unwrap_or(f64::NAN),
            latency_p99_s: quantile(&latencies, 0.99).unwrap_or(f64::NAN),
            writes: after.writes - before.writes,
            reconciles: after.reconciles - before.reconciles,
            cpu_s: converged.cpu - idle.cpu,
            rss_idle_mib: idle.rss_mib,
            rss_converged_mib: converged.rss_mib,
            steady_writes: steady_to.writes - steady_from.writes,
            steady_window_s: window.as_secs_f64(),
            steady_cpu_s: steady_cpu_to.cpu - steady_cpu_from.cpu,
            steady_unchanged,
            stages_ms,
            cluster_cores,
            controller_cores: (converged.cpu - idle.cpu) / elapsed,
            ..RunResult::default()
        };
        if system == System::Kuwa {
            let writes_before = controller.counters().await?.writes;
            let (first, all, relists) =
                hot_swap(opts, &controller, &observer, &child_names).await?;
            let swap_writes = controller.counters().await?.writes - writes_before;
            progress(&format!(
                "kuwa run {run}: hot swap first {first:.2}s, all {all:.2}s, relists {relists}, writes {swap_writes}"
            ));
            result.swap_writes_per_s = Some(swap_writes / all.max(0.001));
            result.swap_first_s = Some(first);
            result.swap_all_s = Some(all);
            result.swap_relists = Some(relists);
        }
        drop(observer);
        drop(controller);
        Ok::<_, anyhow::Error>(result)
    }
    .await;
    delete_namespace(client, &ns).await?;
    result
}

/// Moves kuwa's plugin file to the version that labels every child; returns
/// seconds until the first and the last child carried the label, and the
/// relists meanwhile.
async fn hot_swap(
    opts: &Options,
    controller: &Controller,
    observer: &Observer,
    child_names: &std::collections::HashSet<String>,
) -> Result<(f64, f64, f64)> {
    let dir = controller
        .plugins_dir
        .as_ref()
        .context("kuwa has a plugins directory")?;
    let lists = |text: &str| metric_sample(text, "kuwa_watch_lists_total", &[]);
    let lists_before = lists(&controller.metrics().await?).context("no kuwa_watch_lists_total")?;
    let bytes = std::fs::read(&opts.binaries.webserver_v2)
        .with_context(|| format!("reading {}", opts.binaries.webserver_v2.display()))?;
    let tmp = dir.join(".webserver.wasm.tmp");
    std::fs::write(&tmp, bytes)?;
    let swapped = observer.now();
    std::fs::rename(&tmp, dir.join("webserver.wasm"))?;
    let expected = child_names.len() * 3 / 2;
    let all = until("every child on the new version", opts.timeout, || {
        observer.lock().last_labelled(child_names, expected)
    })
    .await?;
    let first = {
        let s = observer.lock();
        s.labelled
            .values()
            .flat_map(|m| m.values())
            .min()
            .copied()
            .unwrap_or(all)
    };
    let lists_after = lists(&controller.metrics().await?).context("no kuwa_watch_lists_total")?;
    Ok((
        first.saturating_sub(swapped).as_secs_f64(),
        all.saturating_sub(swapped).as_secs_f64(),
        lists_after - lists_before,
    ))
}

/// Applies the WebServer CRD (the peers do not install it) and waits until
/// it is Established.
async fn install_crd(client: &Client) -> Result<()> {
    let crd = crate::host::yaml_file("deploy/crds/webservers.kuwa.dev.yaml")?;
    crate::objects::apply_crd(client, &crd).await
}

/// Fails early when the nodes cannot hold a Pod per parent.
async fn check_capacity(client: &Client, parents: usize) -> Result<()> {
    use k8s_openapi::api::core::v1::Node;
    let nodes = Api::<Node>::all(client.clone())
        .list(&Default::default())
        .await?;
    let pods: i64 = nodes
        .items
        .iter()
        .filter_map(|n| n.status.as_ref()?.allocatable.as_ref()?.get("pods"))
        .filter_map(|q| q.0.parse::<i64>().ok())
        .sum();
    let needed = i64::try_from(parents)
        .unwrap_or(i64::MAX)
        .saturating_add(100);
    if pods < needed {
        bail!(
            "the cluster's nodes hold {pods} Pods, {parents} WebServers need about {needed}: \
             restart it with more room, e.g. `cargo xtask cluster down && cargo xtask cluster up --cpu-nodes 8 --node-pods 500`"
        );
    }
    Ok(())
}

/// Runs the whole bench and returns its report as JSON.
pub async fn run(opts: &Options, client: &Client) -> Result<Value> {
    check_capacity(client, opts.parents).await?;
    install_crd(client).await?;
    progress("raw API create rate (ConfigMaps, 32 in flight, 3 s)");
    let mut raw = Vec::new();
    for _ in 0..opts.runs.max(1) {
        raw.push(raw_create_rate(client, 3.0).await?);
    }
    progress(&format!(
        "raw create rate: {:.0}/s",
        median(&raw).unwrap_or(0.0)
    ));
    let mut results: BTreeMap<System, Vec<RunResult>> = BTreeMap::new();
    for run in 0..opts.runs {
        for &system in &opts.systems {
            progress(&format!(
                "run {}/{}: {} with {} WebServers",
                run + 1,
                opts.runs,
                system.label(),
                opts.parents
            ));
            let r = run_one(opts, client, system, run).await?;
            results.entry(system).or_default().push(r);
        }
    }
    Ok(report(opts, &raw, &results))
}

fn summarize(runs: &[RunResult], parents: usize) -> Value {
    let m = |f: &dyn Fn(&RunResult) -> f64| -> Value {
        num(median(&runs.iter().map(f).collect::<Vec<_>>()))
    };
    let each = |f: &dyn Fn(&RunResult) -> f64| -> Value {
        json!(runs.iter().map(|r| num(Some(f(r)))).collect::<Vec<_>>())
    };
    let n = parents as f64;
    let objects = (4 * parents) as f64;
    let mut stages = serde_json::Map::new();
    if let Some(first) = runs.first() {
        for stage in first.stages_ms.keys() {
            stages.insert(
                stage.clone(),
                m(&|r| r.stages_ms.get(stage).copied().unwrap_or(f64::NAN)),
            );
        }
    }
    let mut cores = serde_json::Map::new();
    if let Some(first) = runs.first() {
        for c in first.cluster_cores.keys() {
            cores.insert(
                c.clone(),
                m(&|r| r.cluster_cores.get(c).copied().unwrap_or(f64::NAN)),
            );
        }
    }
    let swap = |f: &dyn Fn(&RunResult) -> Option<f64>| -> Value {
        let v: Vec<f64> = runs.iter().filter_map(f).collect();
        num(median(&v))
    };
    json!({
        "runs": runs.len(),
        "all_children_s": m(&|r| r.children_s),
        "all_children_s_each": each(&|r| r.children_s),
        "all_ready_s": m(&|r| r.ready_s),
        "all_ready_s_each": each(&|r| r.ready_s),
        "parent_ready_p50_s": m(&|r| r.latency_p50_s),
        "parent_ready_p99_s": m(&|r| r.latency_p99_s),
        "writes": m(&|r| r.writes),
        "writes_per_parent": m(&|r| r.writes / n),
        "reconciles_per_parent": m(&|r| r.reconciles / n),
        "cpu_ms_per_parent": m(&|r| r.cpu_s * 1000.0 / n),
        "rss_idle_mib": m(&|r| r.rss_idle_mib),
        "rss_converged_mib": m(&|r| r.rss_converged_mib),
        "kib_per_cached_object": m(&|r| (r.rss_converged_mib - r.rss_idle_mib) * 1024.0 / objects),
        "steady_writes": m(&|r| r.steady_writes),
        "steady_writes_per_s": m(&|r| r.steady_writes / r.steady_window_s),
        "steady_cpu_ms_per_s": m(&|r| r.steady_cpu_s * 1000.0 / r.steady_window_s),
        "settled_skips_total": swap(&|r| r.steady_unchanged),
        "hot_swap_first_s": swap(&|r| r.swap_first_s),
        "hot_swap_all_s": swap(&|r| r.swap_all_s),
        "hot_swap_relists": swap(&|r| r.swap_relists),
        "hot_swap_writes_per_s": swap(&|r| r.swap_writes_per_s),
        "controller_cores": m(&|r| r.controller_cores),
        "cluster_cores": cores,
        "stage_ms_per_reconcile": stages,
    })
}

fn report(opts: &Options, raw: &[f64], results: &BTreeMap<System, Vec<RunResult>>) -> Value {
    let systems: serde_json::Map<String, Value> = results
        .iter()
        .map(|(s, runs)| (s.label().to_owned(), summarize(runs, opts.parents)))
        .collect();
    json!({
        "parents": opts.parents,
        "runs": opts.runs,
        "resync_s": opts.resync.as_secs(),
        "raw_create_per_s": num(median(raw)),
        "raw_create_per_s_each": raw.iter().map(|r| num(Some(*r))).collect::<Vec<_>>(),
        "systems": systems,
    })
}

/// The report as a Markdown table: one row per measure, one column per
/// system, and the ratio of kuwa to each peer.
pub fn table(report: &Value) -> String {
    let systems: Vec<&str> = ["kuwa", "kube-rs", "controller-runtime"]
        .into_iter()
        .filter(|s| report["systems"].get(*s).is_some())
        .collect();
    let rows = [
        ("all children created (s)", "all_children_s"),
        ("all ready (s)", "all_ready_s"),
        ("per-parent create→ready p50 (s)", "parent_ready_p50_s"),
        ("per-parent create→ready p99 (s)", "parent_ready_p99_s"),
        ("writes to converge", "writes"),
        ("reconciles per parent", "reconciles_per_parent"),
        ("CPU per converged parent (ms)", "cpu_ms_per_parent"),
        ("RSS idle (MiB)", "rss_idle_mib"),
        ("RSS converged (MiB)", "rss_converged_mib"),
        ("memory per cached object (KiB)", "kib_per_cached_object"),
        ("steady-state writes/s", "steady_writes_per_s"),
        ("steady-state CPU (ms/s)", "steady_cpu_ms_per_s"),
        ("hot swap: first child (s)", "hot_swap_first_s"),
        ("hot swap: all children (s)", "hot_swap_all_s"),
        ("hot swap: relists", "hot_swap_relists"),
        ("hot swap: writes/s", "hot_swap_writes_per_s"),
        ("controller cores during convergence", "controller_cores"),
    ];
    let fmt = |v: &Value| match v.as_f64() {
        Some(x) if x.abs() >= 100.0 => format!("{x:.0}"),
        Some(x) => format!("{x:.2}"),
        None => "–".into(),
    };
    let mut out = format!(
        "{} WebServers, median of {} run(s); raw API creates {}/s\n\n| |",
        report["parents"],
        report["runs"],
        fmt(&report["raw_create_per_s"])
    );
    for s in &systems {
        out += &format!(" {s} |");
    }
    let peers: Vec<&str> = systems.iter().copied().filter(|s| *s != "kuwa").collect();
    let with_kuwa = systems.contains(&"kuwa");
    if with_kuwa {
        for p in &peers {
            out += &format!(" kuwa / {p} |");
        }
    }
    out += "\n|---|";
    for _ in 0..systems.len() + if with_kuwa { peers.len() } else { 0 } {
        out += "---|";
    }
    out += "\n";
    for (label, key) in rows {
        let values: Vec<&Value> = systems
            .iter()
            .map(|s| &report["systems"][*s][key])
            .collect();
        if values.iter().all(|v| v.is_null()) {
            continue;
        }
        out += &format!("| {label} |");
        for v in &values {
            out += &format!(" {} |", fmt(v));
        }
        if with_kuwa {
            let k = report["systems"]["kuwa"][key].as_f64();
            for p in &peers {
                let ratio = match (k, report["systems"][*p][key].as_f64()) {
                    (Some(a), Some(b)) if b != 0.0 => format!("{:.2}", a / b),
                    _ => "–".into(),
                };
                out += &format!(" {ratio} |");
            }
        }
        out += "\n";
    }
    for s in &systems {
        if let Some(cores) = report["systems"][*s]["cluster_cores"].as_object()
            && !cores.is_empty()
        {
            out += &format!("\ncontrol plane cores while {s} converged:");
            for (k, v) in cores {
                out += &format!(" {k} {}", fmt(v));
            }
        }
    }
    out += "\n";
    if let Some(stages) = report["systems"]["kuwa"]["stage_ms_per_reconcile"].as_object()
        && !stages.is_empty()
    {
        out += "\nkuwa, one reconcile by stage (ms, mean during convergence):";
        for (k, v) in stages {
            out += &format!(" {k} {}", fmt(v));
        }
        out += "\n";
    }
    out
}

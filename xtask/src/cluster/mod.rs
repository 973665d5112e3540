//! `cargo xtask cluster up|down|status|kubectl`: a local Kubernetes control plane on
//! loopback, built from the upstream Go modules (see docs/local-cluster.md).
//!
//! `up` builds (or reuses) the multicall binary `kuwa-localcluster`, starts
//! etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kwok as
//! detached processes, creates the fake nodes, waits until the cluster is
//! usable and prints the admin kubeconfig path as the last line of stdout.
//! PIDs and ports go to `<state dir>/state.json`; `down` stops exactly those
//! processes and removes the state dir. The binary also contains kubectl:
//! `cargo xtask cluster kubectl -- <args>` or `<state dir>/bin/kubectl`.

pub mod gobuild;
mod proc;
pub mod state;

use anyhow::{Context, Result, bail};
use clap::{Args as ClapArgs, Subcommand};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use state::{Component, Nodes, State};

/// Arguments of `cargo xtask cluster`.
#[derive(ClapArgs)]
pub struct Args {
    /// What to do.
    #[command(subcommand)]
    pub action: Action,
}

/// `cargo xtask cluster` subcommands.
#[derive(Subcommand)]
pub enum Action {
    /// Build if needed, start the cluster (or find it running) and print the kubeconfig path last.
    Up(UpArgs),
    /// Stop the processes `up` started and remove the state dir. Safe to run twice.
    Down,
    /// Print whether the cluster is up, its endpoints and node count.
    Status,
    /// Run kubectl (built into kuwa-localcluster) with the running cluster's kubeconfig.
    Kubectl(KubectlArgs),
}

/// Arguments of `cargo xtask cluster kubectl`.
#[derive(ClapArgs)]
pub struct KubectlArgs {
    /// kubectl's arguments (after `--`). With `--kubeconfig` among them, that
    /// cluster is used and the local one need not run.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub args: Vec<String>,
}

/// Options of `cargo xtask cluster up`.
#[derive(ClapArgs, Clone)]
pub struct UpArgs {
    /// CPU-only fake nodes (kwok-cpu-N).
    #[arg(long, default_value_t = 3)]
    pub cpu_nodes: u32,
    /// GPU fake nodes (kwok-gpu-N), labelled kuwa.dev/gpu=true.
    #[arg(long, default_value_t = 2)]
    pub gpu_nodes: u32,
    /// nvidia.com/gpu capacity of each GPU node.
    #[arg(long, default_value_t = 4)]
    pub gpus_per_node: u32,
    /// CPU capacity of each node.
    #[arg(long, default_value = "32")]
    pub node_cpu: String,
    /// Memory capacity of each node.
    #[arg(long, default_value = "128Gi")]
    pub node_memory: String,
    /// Pod capacity of each node.
    #[arg(long, default_value_t = 250)]
    pub node_pods: u32,
    /// kube-apiserver port on 127.0.0.1 (default: a free port).
    #[arg(long)]
    pub apiserver_port: Option<u16>,
    /// Seconds to wait for the cluster to become ready (after any build).
    #[arg(long, default_value_t = 180)]
    pub timeout: u64,
}

/// Runs the cluster subcommand.
pub fn run(args: &Args) -> Result<()> {
    match &args.action {
        Action::Up(up_args) => {
            let kubeconfig = up(up_args)?;
            println!("{}", kubeconfig.display());
            Ok(())
        }
        Action::Down => down(),
        Action::Status => status(),
        Action::Kubectl(k) => kubectl(&k.args),
    }
}

/// Where `up` writes the kubectl wrapper script.
fn kubectl_wrapper(dir: &Path) -> PathBuf {
    dir.join("bin").join("kubectl")
}

/// `'...'` for sh.
fn sh_quote(p: &Path) -> String {
    format!("'{}'", p.to_string_lossy().replace('\'', r"'\''"))
}

/// Writes `<dir>/bin/kubectl`: runs `binary kubectl` with the cluster's admin
/// kubeconfig.
fn write_kubectl_wrapper(dir: &Path, binary: &Path, kubeconfig: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let path = kubectl_wrapper(dir);
    let bin_dir = dir.join("bin");
    std::fs::create_dir_all(&bin_dir).with_context(|| format!("creating {}", bin_dir.display()))?;
    let script = format!(
        "#!/bin/sh\n# kubectl for the local cluster in {}; written by `cargo xtask cluster up`.\nexec {} kubectl --kubeconfig {} \"$@\"\n",
        dir.display(),
        sh_quote(binary),
        sh_quote(kubeconfig)
    );
    let tmp = bin_dir.join(".kubectl.tmp");
    std::fs::write(&tmp, script)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))
}

/// Whether `<dir>/bin/kubectl` exists and the binary it runs is still there.
fn kubectl_wrapper_ok(dir: &Path) -> bool {
    let Ok(script) = std::fs::read_to_string(kubectl_wrapper(dir)) else {
        return false;
    };
    // The `exec '<binary>' kubectl ...` line written above.
    script
        .lines()
        .find_map(|l| {
            l.strip_prefix("exec '")?
                .split_once("' kubectl ")
                .map(|(b, _)| b.replace(r"'\''", "'"))
        })
        .is_some_and(|b| Path::new(&b).is_file())
}

/// `cargo xtask cluster kubectl -- <args>`: replaces this process with the
/// current sources' `kuwa-localcluster kubectl`, given the running cluster's
/// kubeconfig unless `args` name one.
fn kubectl(args: &[String]) -> Result<()> {
    use std::os::unix::process::CommandExt;
    let own_kubeconfig = args
        .iter()
        .take_while(|a| *a != "--")
        .any(|a| a == "--kubeconfig" || a.starts_with("--kubeconfig="));
    let mut cmd;
    if own_kubeconfig {
        cmd = Command::new(gobuild::ensure_binary()?);
        cmd.arg("kubectl");
    } else {
        let dir = state::state_dir()?;
        let state = match inspect(&dir) {
            Found::Running(state) => state,
            Found::Nothing => bail!(
                "the local cluster is not running (no {}): start it with `cargo xtask cluster up`, or pass --kubeconfig",
                dir.display()
            ),
            Found::Stale(_, why) => bail!(
                "the local cluster is not running (stale state from {why} in {}): start it with `cargo xtask cluster up`, or pass --kubeconfig",
                dir.display()
            ),
        };
        cmd = Command::new(gobuild::ensure_binary()?);
        cmd.arg("kubectl")
            .arg("--kubeconfig")
            .arg(&state.kubeconfig);
    }
    let err = cmd.args(args).exec();
    Err(err).context("running kuwa-localcluster kubectl")
}

/// Holds an exclusive lock on the state dir's lock file while alive.
struct DirLock(#[allow(dead_code)] File);

fn lock(dir: &Path) -> Result<DirLock> {
    let path = state::lock_path(dir);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    if file.try_lock().is_err() {
        eprintln!(
            "waiting for another `cargo xtask cluster` on {} to finish...",
            dir.display()
        );
        file.lock()
            .with_context(|| format!("locking {}", path.display()))?;
    }
    Ok(DirLock(file))
}

/// What a state dir holds right now.
enum Found {
    Nothing,
    Running(State),
    Stale(Option<State>, String),
}

/// Whether a cluster is running in the state dir now.
pub fn is_running() -> bool {
    state::state_dir().is_ok_and(|dir| matches!(inspect(&dir), Found::Running(_)))
}

fn inspect(dir: &Path) -> Found {
    if !dir.exists() {
        return Found::Nothing;
    }
    let state = match State::load(dir) {
        Ok(Some(s)) => s,
        Ok(None) => return Found::Stale(None, "a state dir without state.json".into()),
        Err(e) => return Found::Stale(None, format!("an unreadable state file ({e:#})")),
    };
    let dead: Vec<&str> = state
        .components
        .iter()
        .filter(|c| !proc::is_ours(c.pid, &c.name))
        .map(|c| c.name.as_str())
        .collect();
    if state.components.len() < 5 || !dead.is_empty() {
        let why = if dead.is_empty() {
            "an unfinished start".to_string()
        } else {
            format!("a stopped or killed run ({} not running)", dead.join(", "))
        };
        return Found::Stale(Some(state), why);
    }
    Found::Running(state)
}

/// Stops whatever a stale state recorded and removes the dir.
fn clean_stale(dir: &Path, state: Option<&State>) -> Result<()> {
    if let Some(state) = state {
        let comps: Vec<&Component> = state.components.iter().rev().collect();
        let left = proc::stop(&comps, Duration::from_secs(10));
        if !left.is_empty() {
            bail!(
                "could not stop {} from {}; kill them by hand",
                left.join(", "),
                dir.display()
            );
        }
    }
    std::fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))
}

fn probe(state: &State) -> Result<serde_json::Value> {
    let out = Command::new(&state.binary)
        .args(["probe", "--kubeconfig"])
        .arg(&state.kubeconfig)
        .output()
        .with_context(|| format!("running {} probe", state.binary.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let value: serde_json::Value =
        serde_json::from_str(text.trim()).with_context(|| format!("probe printed {text:?}"))?;
    Ok(value)
}

/// Starts the cluster (or finds it running) and returns the kubeconfig path.
pub fn up(args: &UpArgs) -> Result<PathBuf> {
    if args.cpu_nodes + args.gpu_nodes == 0 {
        bail!("--cpu-nodes and --gpu-nodes are both 0: the cluster needs at least one node");
    }
    let dir = state::state_dir()?;
    let _lock = lock(&dir)?;
    match inspect(&dir) {
        Found::Running(state) => {
            // A busy apiserver (say, under a load test) may answer slowly:
            // give it a while before deciding it is broken.
            let deadline = Instant::now() + Duration::from_secs(30);
            let p = loop {
                let p = probe(&state);
                let ready = p.as_ref().map(|v| v["ready"] == true).unwrap_or(false);
                if ready {
                    eprintln!(
                        "cluster already up ({}, state in {})",
                        state.apiserver_url,
                        dir.display()
                    );
                    if !kubectl_wrapper_ok(&dir) {
                        // Started by an older xtask (or its binary was
                        // pruned): point the wrapper at the current build.
                        if let Err(e) = gobuild::ensure_binary()
                            .and_then(|b| write_kubectl_wrapper(&dir, &b, &state.kubeconfig))
                        {
                            eprintln!(
                                "note: could not write {}: {e:#}",
                                kubectl_wrapper(&dir).display()
                            );
                        }
                    }
                    let n = &state.nodes;
                    if (n.cpu, n.gpu, n.gpus_per_node)
                        != (args.cpu_nodes, args.gpu_nodes, args.gpus_per_node)
                    {
                        eprintln!(
                            "note: it runs {} CPU and {} GPU node(s) with {} GPUs each; `cargo xtask cluster down` first to change that",
                            n.cpu, n.gpu, n.gpus_per_node
                        );
                    }
                    return Ok(state.kubeconfig);
                }
                if Instant::now() >= deadline || !state.binary.is_file() {
                    break p;
                }
                std::thread::sleep(Duration::from_secs(1));
            };
            eprintln!(
                "found the cluster's processes in {} but the apiserver is not ready ({}); restarting it",
                dir.display(),
                p.map(|v| v["error"].to_string())
                    .unwrap_or_else(|e| format!("{e:#}"))
            );
            clean_stale(&dir, Some(&state))?;
        }
        Found::Stale(state, why) => {
            eprintln!(
                "found stale state from {why} in {}; cleaning it up",
                dir.display()
            );
            clean_stale(&dir, state.as_ref())?;
        }
        Found::Nothing => {}
    }
    if let Some(port) = args.apiserver_port
        && !proc::port_free(port)
    {
        bail!(
            "port {port} on 127.0.0.1 is already in use (see `ss -ltnp 'sport = :{port}'`): stop what listens there, \
             or drop --apiserver-port to use a free port"
        );
    }

    let binary = gobuild::ensure_binary()?;
    let started = Instant::now();
    eprintln!("starting the local cluster in {}", dir.display());
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    match start(&dir, &binary, args) {
        Ok(state) => {
            let s = started.elapsed();
            eprintln!(
                "cluster up in {:.1}s: {} ({} node(s)); `cargo xtask cluster down` stops it",
                s.as_secs_f64(),
                state.apiserver_url,
                args.cpu_nodes + args.gpu_nodes
            );
            Ok(state.kubeconfig)
        }
        Err(e) => {
            // Stop whatever started; keep the logs for diagnosis (the next
            // `up` or `down` removes them).
            if let Ok(Some(state)) = State::load(&dir) {
                let comps: Vec<&Component> = state.components.iter().rev().collect();
                proc::stop(&comps, Duration::from_secs(10));
            }
            Err(e.context(format!(
                "the local cluster did not start; logs are in {} (`cargo xtask cluster down` removes them)",
                dir.display()
            )))
        }
    }
}

/// A started process together with its `Child` handle (to notice an early exit).
struct Running {
    child: Child,
    name: String,
    log: PathBuf,
}

/// Errors out (with the tail of its log) if any started process has exited.
fn check_alive(running: &mut [Running]) -> Result<()> {
    for r in running.iter_mut() {
        if let Some(status) = r.child.try_wait()? {
            bail!(
                "{} exited during startup ({status}); last lines of {}:\n{}",
                r.name,
                r.log.display(),
                proc::log_tail(&r.log, 15)
            );
        }
    }
    Ok(())
}

/// Runs `binary <args>` (a waiting helper) to completion, failing early if a
/// started component exits meanwhile.
fn run_watched(binary: &Path, args: &[String], running: &mut [Running]) -> Result<()> {
    let mut helper = Command::new(binary)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .with_context(|| format!("running {} {}", binary.display(), args[0]))?;
    loop {
        if let Some(status) = helper.try_wait()? {
            if !status.success() {
                check_alive(running)?;
                bail!("`{}` failed ({status}); see the messages above", args[0]);
            }
            return Ok(());
        }
        if let Err(e) = check_alive(running) {
            let _ = helper.kill();
            let _ = helper.wait();
            return Err(e);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn start(dir: &Path, binary: &Path, args: &UpArgs) -> Result<State> {
    let etcd_port = proc::free_port()?;
    let peer_port = proc::free_port()?;
    let api_port = match args.apiserver_port {
        Some(p) => p,
        None => proc::free_port()?,
    };
    let kcm_port = proc::free_port()?;
    let sched_port = proc::free_port()?;
    let apiserver_url = format!("https://127.0.0.1:{api_port}");
    let etcd_url = format!("http://127.0.0.1:{etcd_port}");
    let d = |name: &str| dir.join(name).to_string_lossy().into_owned();
    let pki = |name: &str| dir.join("pki").join(name).to_string_lossy().into_owned();

    let out = Command::new(binary)
        .args(["init", "--dir", &d(""), "--server", &apiserver_url])
        .output()
        .with_context(|| format!("running {} init", binary.display()))?;
    if !out.status.success() {
        bail!(
            "generating certificates failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }

    let mut state = State {
        version: 1,
        binary: binary.to_path_buf(),
        dir: dir.to_path_buf(),
        kubeconfig: dir.join("kubeconfig"),
        apiserver_url: apiserver_url.clone(),
        etcd_url: etcd_url.clone(),
        nodes: Nodes {
            cpu: args.cpu_nodes,
            gpu: args.gpu_nodes,
            gpus_per_node: args.gpus_per_node,
        },
        started_unix: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        components: Vec::new(),
    };
    state.save()?;
    write_kubectl_wrapper(dir, binary, &state.kubeconfig)?;
    let mut running: Vec<Running> = Vec::new();
    let launch = |state: &mut State,
                  running: &mut Vec<Running>,
                  name: &str,
                  ports: Vec<u16>,
                  cargs: Vec<String>,
                  envs: &[(&str, String)]|
     -> Result<()> {
        let log = dir.join(format!("{name}.log"));
        let child = proc::spawn_detached(binary, name, &cargs, &log, envs)?;
        state.components.push(Component {
            name: name.into(),
            pid: child.id(),
            ports,
            log: log.clone(),
            args: cargs.clone(),
        });
        state.save()?;
        running.push(Running {
            child,
            name: name.into(),
            log,
        });
        Ok(())
    };
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();

    eprintln!("  etcd on {etcd_url}");
    launch(
        &mut state,
        &mut running,
        "etcd",
        vec![etcd_port, peer_port],
        vec![
            format!("--data-dir={}", d("etcd")),
            format!("--listen-client-url={etcd_url}"),
            format!("--listen-peer-url=http://127.0.0.1:{peer_port}"),
        ],
        &[],
    )?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !proc::port_open(etcd_port) {
        check_alive(&mut running)?;
        if Instant::now() > deadline {
            bail!("etcd did not listen on {etcd_url} within 60s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }

    eprintln!("  kube-apiserver on {apiserver_url}");
    let mut api_args = s(&[
        "--bind-address=127.0.0.1",
        "--advertise-address=127.0.0.1",
        "--authorization-mode=RBAC",
        "--endpoint-reconciler-type=none",
        "--service-cluster-ip-range=10.96.0.0/16",
        "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
        "--allow-privileged=true",
        "--profiling=false",
        "--max-requests-inflight=1000",
        "--max-mutating-requests-inflight=500",
    ]);
    api_args.extend([
        format!("--secure-port={api_port}"),
        format!("--etcd-servers={etcd_url}"),
        format!("--cert-dir={}", d("apiserver")),
        format!("--tls-cert-file={}", pki("apiserver.crt")),
        format!("--tls-private-key-file={}", pki("apiserver.key")),
        format!("--client-ca-file={}", pki("ca.crt")),
        format!("--service-account-key-file={}", pki("sa.pub")),
        format!("--service-account-signing-key-file={}", pki("sa.key")),
    ]);
    launch(
        &mut state,
        &mut running,
        "kube-apiserver",
        vec![api_port],
        api_args,
        &[],
    )?;
    // The controllers need RBAC's bootstrap policy, so they start once
    // /readyz is ok.
    eprintln!("  waiting for kube-apiserver /readyz");
    let kubeconfig_arg = format!("--kubeconfig={}", state.kubeconfig.display());
    let timeout_arg = format!("--timeout={}s", args.timeout);
    run_watched(
        binary,
        &[
            "wait-apiserver".into(),
            kubeconfig_arg.clone(),
            timeout_arg.clone(),
        ],
        &mut running,
    )?;

    let kcm_kc = d("controller-manager.kubeconfig");
    let mut kcm_args = s(&[
        "--bind-address=127.0.0.1",
        "--controllers=*",
        "--use-service-account-credentials=true",
        "--leader-elect=false",
        "--kube-api-qps=200",
        "--kube-api-burst=400",
        "--cluster-name=kuwa-local",
        "--profiling=false",
    ]);
    kcm_args.extend([
        format!("--secure-port={kcm_port}"),
        format!("--kubeconfig={kcm_kc}"),
        format!("--authentication-kubeconfig={kcm_kc}"),
        format!("--authorization-kubeconfig={kcm_kc}"),
        format!("--cert-dir={}", d("controller-manager")),
        format!("--service-account-private-key-file={}", pki("sa.key")),
        format!("--root-ca-file={}", pki("ca.crt")),
        format!("--cluster-signing-cert-file={}", pki("ca.crt")),
        format!("--cluster-signing-key-file={}", pki("ca.key")),
    ]);
    eprintln!("  kube-controller-manager, kube-scheduler, kwok");
    launch(
        &mut state,
        &mut running,
        "kube-controller-manager",
        vec![kcm_port],
        kcm_args,
        &[],
    )?;

    let sched_kc = d("scheduler.kubeconfig");
    let mut sched_args = s(&[
        "--bind-address=127.0.0.1",
        "--leader-elect=false",
        "--kube-api-qps=200",
        "--kube-api-burst=400",
        "--profiling=false",
    ]);
    sched_args.extend([
        format!("--secure-port={sched_port}"),
        format!("--kubeconfig={sched_kc}"),
        format!("--authentication-kubeconfig={sched_kc}"),
        format!("--authorization-kubeconfig={sched_kc}"),
        format!("--cert-dir={}", d("scheduler")),
    ]);
    launch(
        &mut state,
        &mut running,
        "kube-scheduler",
        vec![sched_port],
        sched_args,
        &[],
    )?;

    let kwok_home = dir.join("kwok-home");
    std::fs::create_dir_all(&kwok_home)?;
    let kwok_args = vec![
        format!("--kubeconfig={}", d("kwok.kubeconfig")),
        format!("--config={}", d("kwok-stages.yaml")),
        "--manage-all-nodes=false".into(),
        "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake".into(),
        "--node-ip=127.0.0.1".into(),
        "--node-lease-duration-seconds=40".into(),
        "--cidr=10.127.0.0/16".into(),
    ];
    // kwok also reads ~/.kwok/kwok.yaml when present: give it a HOME of its own.
    launch(
        &mut state,
        &mut running,
        "kwok",
        vec![],
        kwok_args,
        &[("HOME", kwok_home.to_string_lossy().into_owned())],
    )?;

    let boot_args = vec![
        "bootstrap".to_string(),
        kubeconfig_arg,
        timeout_arg,
        format!("--cpu-nodes={}", args.cpu_nodes),
        format!("--gpu-nodes={}", args.gpu_nodes),
        format!("--gpus-per-node={}", args.gpus_per_node),
        format!("--node-cpu={}", args.node_cpu),
        format!("--node-memory={}", args.node_memory),
        format!("--node-pods={}", args.node_pods),
    ];
    run_watched(binary, &boot_args, &mut running)?;
    Ok(state)
}

/// Stops the cluster `up` started and removes its state dir.
pub fn down() -> Result<()> {
    let dir = state::state_dir()?;
    let _lock = lock(&dir)?;
    if !dir.exists() {
        eprintln!("cluster is not running (no {})", dir.display());
        return Ok(());
    }
    let state = State::load(&dir).unwrap_or_else(|e| {
        eprintln!("warning: {e:#}; removing the state dir without stopping anything");
        None
    });
    if let Some(state) = &state {
        let ours: Vec<&Component> = state.components.iter().rev().collect();
        // Clients first, then the apiserver, etcd last.
        let (etcd, rest): (Vec<&Component>, Vec<&Component>) =
            ours.into_iter().partition(|c| c.name == "etcd");
        let mut left = proc::stop(&rest, Duration::from_secs(15));
        left.extend(proc::stop(&etcd, Duration::from_secs(10)));
        if !left.is_empty() {
            bail!(
                "could not stop {} (recorded in {})",
                left.join(", "),
                dir.join(state::STATE_FILE).display()
            );
        }
    }
    std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    eprintln!("cluster stopped; removed {}", dir.display());
    Ok(())
}

fn status() -> Result<()> {
    let dir = state::state_dir()?;
    match inspect(&dir) {
        Found::Nothing => {
            println!("cluster: down");
            println!("state dir: {} (absent)", dir.display());
        }
        Found::Stale(_, why) => {
            println!(
                "cluster: down (stale state from {why}; `cargo xtask cluster up` cleans it up)"
            );
            println!("state dir: {}", dir.display());
        }
        Found::Running(state) => {
            let p = probe(&state)
                .unwrap_or_else(|e| serde_json::json!({"ready": false, "error": format!("{e:#}")}));
            if p["ready"] == true {
                println!("cluster: up");
            } else {
                println!(
                    "cluster: not ready ({})",
                    p["error"].as_str().unwrap_or("unknown")
                );
            }
            println!("state dir: {}", dir.display());
            println!("kubeconfig: {}", state.kubeconfig.display());
            let wrapper = kubectl_wrapper(&dir);
            if wrapper.is_file() {
                println!(
                    "kubectl: {} (or `cargo xtask cluster kubectl -- <args>`)",
                    wrapper.display()
                );
            } else {
                println!(
                    "kubectl: `cargo xtask cluster kubectl -- <args>` (`up` writes {})",
                    wrapper.display()
                );
            }
            println!(
                "apiserver: {} ({})",
                state.apiserver_url,
                p["version"].as_str().unwrap_or("?")
            );
            println!("etcd: {}", state.etcd_url);
            for c in &state.components {
                let ports: Vec<String> = c.ports.iter().map(|p| p.to_string()).collect();
                println!(
                    "  {:<24} pid {:<8} ports [{}]  log {}",
                    c.name,
                    c.pid,
                    ports.join(", "),
                    c.log.display()
                );
            }
            println!(
                "nodes: {} ({} Ready, {} with nvidia.com/gpu)",
                p["nodes"].as_u64().unwrap_or(0),
                p["ready_nodes"].as_u64().unwrap_or(0),
                p["gpu_nodes"].as_u64().unwrap_or(0)
            );
        }
    }
    Ok(())
}

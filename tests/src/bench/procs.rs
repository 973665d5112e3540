//! The controllers under test as processes: kuwa and the two peers, each
//! started on a free loopback port, sampled through `/proc` and stopped by
//! PID.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::host::{free_port, http, metric_sample, wait_ready};

/// One of the systems the bench compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum System {
    /// kuwa with its defaults and the shipped WebServer plugin.
    Kuwa,
    /// The native kube-rs peer (`bench/peers/kube-rs`).
    KubeRs,
    /// The Go controller-runtime peer (`bench/peers/controller-runtime`).
    ControllerRuntime,
}

impl System {
    /// Its name in tables and JSON.
    pub fn label(self) -> &'static str {
        match self {
            Self::Kuwa => "kuwa",
            Self::KubeRs => "kube-rs",
            Self::ControllerRuntime => "controller-runtime",
        }
    }
}

/// Where the binaries and plugins are.
#[derive(Debug, Clone)]
pub struct Binaries {
    /// The `kuwa` binary.
    pub kuwa: PathBuf,
    /// Directory holding `webserver.wasm` (and its manifest).
    pub plugins: PathBuf,
    /// `webserver-v2.wasm`, the version the hot swap moves to.
    pub webserver_v2: PathBuf,
    /// The kube-rs peer, if it is to run.
    pub kube_rs: Option<PathBuf>,
    /// The controller-runtime peer, if it is to run.
    pub controller_runtime: Option<PathBuf>,
}

/// CPU and memory of a process at one moment.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sample {
    /// utime + stime, seconds.
    pub cpu: f64,
    /// Resident set, MiB.
    pub rss_mib: f64,
}

/// The counters a controller exposes, read the same way for all three.
#[derive(Debug, Clone, Copy, Default)]
pub struct Counters {
    /// API write requests sent.
    pub writes: f64,
    /// Reconciles run.
    pub reconciles: f64,
}

/// A running controller, stopped (SIGTERM, then SIGKILL) on drop.
pub struct Controller {
    /// Which one.
    pub system: System,
    child: Child,
    /// Its metrics address.
    pub addr: SocketAddr,
    /// Its plugins directory (kuwa only).
    pub plugins_dir: Option<PathBuf>,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

/// Clock ticks per second of `/proc/<pid>/stat` times (asked once).
fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// The local control plane's processes (`kuwa-localcluster <component>`),
/// by component, found in `/proc`.
pub fn cluster_processes() -> Vec<(String, u32)> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if args
            .first()
            .is_some_and(|a| a.ends_with("kuwa-localcluster"))
            && let Some(component) = args.get(1)
        {
            out.push((component.clone(), pid));
        }
    }
    out.sort();
    out
}

/// CPU and RSS of `pid` from `/proc`.
pub fn sample(pid: u32) -> Result<Sample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // The fields after the command name (which may hold spaces) start at
    // field 3 (state); utime and stime are fields 14 and 15.
    let after = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .context("malformed /proc stat")?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| -> Result<f64> {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .context("malformed /proc stat times")
    };
    let cpu = (ticks(11)? + ticks(12)?) / clock_ticks();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .context("no VmRSS in /proc status")?;
    Ok(Sample {
        cpu,
        rss_mib: rss_kib / 1024.0,
    })
}

impl Controller {
    /// Starts `system` watching `namespace` with resync `resync`, and waits
    /// until it reports ready.
    pub async fn start(
        system: System,
        bins: &Binaries,
        kubeconfig: &Path,
        namespace: &str,
        resync: Duration,
    ) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
        let resync_arg = format!("{}s", resync.as_secs());
        let (mut cmd, plugins_dir) = match system {
            System::Kuwa => {
                let plugins = dir.path().join("plugins");
                std::fs::create_dir_all(&plugins)?;
                for file in ["webserver.wasm", "webserver.yaml"] {
                    let from = bins.plugins.join(file);
                    if from.is_file() {
                        std::fs::copy(&from, plugins.join(file))
                            .with_context(|| format!("copying {}", from.display()))?;
                    }
                }
                let mut cmd = Command::new(&bins.kuwa);
                cmd.arg("run")
                    .arg("--plugins")
                    .arg(&plugins)
                    .args(["--resync-period", &resync_arg])
                    .env("KUWA_LOG", "warn");
                (cmd, Some(plugins))
            }
            System::KubeRs | System::ControllerRuntime => {
                let bin = match system {
                    System::KubeRs => bins.kube_rs.as_ref(),
                    _ => bins.controller_runtime.as_ref(),
                }
                .with_context(|| format!("no binary for {}", system.label()))?;
                let mut cmd = Command::new(bin);
                cmd.args(["--resync", &resync_arg, "--concurrency", "16"])
                    .env("RUST_LOG", "warn");
                (cmd, None)
            }
        };
        let log = dir.path().join("controller.log");
        let log_file = std::fs::File::create(&log)?;
        cmd.arg("--kubeconfig")
            .arg(kubeconfig)
            .args(["--namespace", namespace])
            .args(["--metrics-addr", &addr.to_string()])
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", system.label()))?;
        let mut controller = Self {
            system,
            child,
            addr,
            plugins_dir,
            log,
            _dir: dir,
        };
        let ready = wait_ready(&mut controller.child, controller.addr, system.label()).await;
        if let Err(e) = ready {
            return Err(e.context(format!(
                "{} log:\n{}",
                system.label(),
                controller.log_tail()
            )));
        }
        Ok(controller)
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// CPU and RSS now.
    pub fn sample(&self) -> Result<Sample> {
        sample(self.pid())
    }

    /// The end of its log.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// `/metrics` as text.
    pub async fn metrics(&self) -> Result<String> {
        let (code, body) = http(self.addr, "GET", "/metrics").await?;
        if code != 200 {
            bail!("{} /metrics answered {code}", self.system.label());
        }
        Ok(body)
    }

    /// Writes and reconciles so far. A counter missing from `/metrics` is
    /// an error, never a 0.
    pub async fn counters(&self) -> Result<Counters> {
        self.read_counters(false).await
    }

    /// Writes and reconciles before any parent exists: a counter kuwa has
    /// not exposed yet (it creates a series at its first increment) is 0
    /// here, and only here; every later reading must find it.
    pub async fn baseline(&self) -> Result<Counters> {
        self.read_counters(true).await
    }

    async fn read_counters(&self, missing_is_zero: bool) -> Result<Counters> {
        let text = self.metrics().await?;
        let read = |name: &str, labels: &[(&str, &str)]| match metric_sample(&text, name, labels) {
            Some(v) => Ok(v),
            None if missing_is_zero => Ok(0.0),
            None => Err(anyhow::anyhow!("{} exposes no {name}", self.system.label())),
        };
        Ok(match self.system {
            System::Kuwa => Counters {
                writes: read("kuwa_api_writes_total", &[("plugin", "webserver")])?,
                reconciles: read("kuwa_reconciles_total", &[("plugin", "webserver")])?,
            },
            _ => Counters {
                writes: read("peer_writes_total", &[])?,
                reconciles: read("peer_reconciles_total", &[])?,
            },
        })
    }

    /// Stops the process: SIGTERM, then SIGKILL after 10 s.
    pub fn stop(&mut self) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        for _ in 0..100 {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        self.stop();
    }
}

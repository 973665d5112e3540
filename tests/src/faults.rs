//! Fault injectors for the reliability tests and the soak (issue 13). Each
//! acts on a process it started, by PID, on loopback only.
//!
//! * [`SpareApiServer`]: a second kube-apiserver on the local cluster's etcd
//!   (the same data, certificates and flags as the first, another port). A
//!   host pointed at it sees a real API server stop and start, while the
//!   test, the controllers and every other test keep the first one: objects
//!   can be changed and deleted "during the outage", as in a real cluster
//!   whose one control-plane endpoint the host used went away.
//! * [`compact_etcd`]: compacts etcd at its current revision, so every watch
//!   that resumes from an older resource version gets 410 Gone and relists.
//! * `kill -9` of the host is [`crate::host::KuwaHost::signal`].

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::host::free_port;
use crate::kubeconfig_path;

/// What `cargo xtask cluster up` recorded about the local cluster
/// (`<state dir>/state.json`, the directory of the admin kubeconfig).
#[derive(Debug, Clone)]
pub struct LocalCluster {
    /// The multicall binary every component runs from.
    pub binary: PathBuf,
    /// The admin kubeconfig.
    pub kubeconfig: PathBuf,
    /// `https://127.0.0.1:<port>` of the cluster's own API server.
    pub apiserver_url: String,
    /// `http://127.0.0.1:<port>`.
    pub etcd_url: String,
    /// The arguments the API server was started with.
    pub apiserver_args: Vec<String>,
}

impl LocalCluster {
    /// Reads the state of the cluster under test. Fails when the cluster is
    /// not a local one started by this repository's xtask.
    pub fn load() -> Result<Self> {
        let kubeconfig = kubeconfig_path()?;
        let dir = kubeconfig
            .parent()
            .context("the kubeconfig has no directory")?;
        let path = dir.join("state.json");
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "reading {} (the fault tests need the local cluster of `cargo xtask cluster up`)",
                path.display()
            )
        })?;
        let state: Value = serde_json::from_str(&text)?;
        let apiserver = state["components"]
            .as_array()
            .and_then(|cs| cs.iter().find(|c| c["name"] == "kube-apiserver"))
            .context("state.json lists no kube-apiserver")?;
        let apiserver_args: Vec<String> = apiserver["args"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        if apiserver_args.is_empty() {
            bail!(
                "{} does not record the API server's arguments: the cluster was started by an older xtask; \
                 restart it (`cargo xtask cluster down && cargo xtask cluster up`)",
                path.display()
            );
        }
        let s = |k: &str| -> Result<String> {
            state[k]
                .as_str()
                .map(str::to_owned)
                .with_context(|| format!("state.json has no {k}"))
        };
        Ok(Self {
            binary: PathBuf::from(s("binary")?),
            kubeconfig,
            apiserver_url: s("apiserver_url")?,
            etcd_url: s("etcd_url")?,
            apiserver_args,
        })
    }
}

/// A second kube-apiserver on the local cluster's etcd, stopped (SIGTERM,
/// then SIGKILL) when dropped.
pub struct SpareApiServer {
    cluster: LocalCluster,
    port: u16,
    child: Option<Child>,
    kubeconfig: PathBuf,
    log: PathBuf,
    dir: tempfile::TempDir,
}

/// How long a (re)start may take before the test fails: the API server
/// builds its watch caches from etcd first, slow on a loaded 2-core machine.
const START_TIMEOUT: Duration = Duration::from_secs(120);

impl SpareApiServer {
    /// Starts it on a free loopback port and waits until it is ready.
    pub async fn start() -> Result<Self> {
        let cluster = tokio::task::spawn_blocking(LocalCluster::load).await??;
        let dir = tempfile::tempdir()?;
        let port = free_port()?;
        let kubeconfig = dir.path().join("kubeconfig");
        let admin = std::fs::read_to_string(&cluster.kubeconfig)?;
        let url = format!("https://127.0.0.1:{port}");
        if !admin.contains(&cluster.apiserver_url) {
            bail!(
                "{} does not name {}",
                cluster.kubeconfig.display(),
                cluster.apiserver_url
            );
        }
        std::fs::write(&kubeconfig, admin.replace(&cluster.apiserver_url, &url))?;
        let log = dir.path().join("kube-apiserver.log");
        let mut spare = Self {
            cluster,
            port,
            child: None,
            kubeconfig,
            log,
            dir,
        };
        spare.resume().await?;
        Ok(spare)
    }

    /// Its admin kubeconfig (the cluster's, pointing at this server).
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// `https://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// Its process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn args(&self) -> Vec<String> {
        let cert_dir = self.dir.path().join("certs");
        self.cluster
            .apiserver_args
            .iter()
            .map(|a| {
                if a.starts_with("--secure-port=") {
                    format!("--secure-port={}", self.port)
                } else if a.starts_with("--cert-dir=") {
                    format!("--cert-dir={}", cert_dir.display())
                } else {
                    a.clone()
                }
            })
            .collect()
    }

    /// Starts it (again) and waits until `/readyz` is ok; the time that took.
    pub async fn resume(&mut self) -> Result<Duration> {
        if self.child.is_some() {
            bail!("the spare API server is already running");
        }
        let started = Instant::now();
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let child = {
            use std::os::unix::process::CommandExt;
            Command::new(&self.cluster.binary)
                .arg("kube-apiserver")
                .args(self.args())
                .stdin(Stdio::null())
                .stdout(out.try_clone()?)
                .stderr(out)
                .process_group(0)
                .spawn()
                .with_context(|| format!("starting {}", self.cluster.binary.display()))?
        };
        self.child = Some(child);
        let binary = self.cluster.binary.clone();
        let kubeconfig = self.kubeconfig.clone();
        let waited = tokio::task::spawn_blocking(move || {
            Command::new(binary)
                .arg("wait-apiserver")
                .arg(format!("--kubeconfig={}", kubeconfig.display()))
                .arg(format!("--timeout={}s", START_TIMEOUT.as_secs()))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .output()
        })
        .await??;
        if !waited.status.success() {
            let tail = self.log_tail(30);
            self.kill();
            bail!(
                "the spare API server did not become ready: {}\nits log:\n{tail}",
                String::from_utf8_lossy(&waited.stderr).trim()
            );
        }
        Ok(started.elapsed())
    }

    /// Stops it: SIGTERM, then SIGKILL after 5 s (its graceful shutdown
    /// waits for open watches far longer). Returns once it has
    /// exited (its port is closed).
    pub async fn stop(&mut self) -> Result<Duration> {
        let started = Instant::now();
        let Some(mut child) = self.child.take() else {
            bail!("the spare API server is not running");
        };
        signal(child.id(), rustix::process::Signal::TERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if child.try_wait()?.is_some() {
                return Ok(started.elapsed());
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                child.wait()?;
                return Ok(started.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The last `lines` lines of its log.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for SpareApiServer {
    fn drop(&mut self) {
        if let Some(child) = &self.child {
            signal(child.id(), rustix::process::Signal::TERM);
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if self
                    .child
                    .as_mut()
                    .is_some_and(|c| matches!(c.try_wait(), Ok(Some(_))))
                {
                    self.child = None;
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        self.kill();
    }
}

fn signal(pid: u32, sig: rustix::process::Signal) {
    if let Some(pid) = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    {
        let _ = rustix::process::kill_process(pid, sig);
    }
}

/// One JSON POST to etcd's HTTP gateway on loopback.
async fn etcd_post(etcd_url: &str, path: &str, body: &Value) -> Result<Value> {
    let addr = etcd_url
        .strip_prefix("http://")
        .with_context(|| format!("etcd URL {etcd_url} is not http://"))?;
    if !addr.starts_with("127.0.0.1:") {
        bail!("etcd at {addr} is not on loopback");
    }
    let body = body.to_string();
    let mut stream =
        tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr))
            .await
            .map_err(|_| anyhow!("connecting to etcd at {addr} timed out"))??;
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut response))
        .await
        .map_err(|_| anyhow!("etcd {path} timed out"))??;
    let text = String::from_utf8_lossy(&response);
    let (head, rest) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    if !head.starts_with("HTTP/1.1 200") {
        bail!("etcd {path} answered {head:?}: {rest}");
    }
    // The body may be chunked: take the JSON object inside.
    let json = match (rest.find('{'), rest.rfind('}')) {
        (Some(a), Some(b)) if a < b => &rest[a..=b],
        _ => bail!("etcd {path} answered no JSON: {rest:?}"),
    };
    Ok(serde_json::from_str(json)?)
}

/// Compacts the local cluster's etcd at its current revision (physically),
/// so that no watch can resume from an older resource version: the next
/// watch from one gets 410 Gone and relists. Returns the revision.
pub async fn compact_etcd(cluster: &LocalCluster) -> Result<i64> {
    // A range read answers with the current revision in its header.
    let read = etcd_post(
        &cluster.etcd_url,
        "/v3/kv/range",
        &serde_json::json!({"key": "AA==", "limit": 1}),
    )
    .await?;
    let revision: i64 = read["header"]["revision"]
        .as_str()
        .and_then(|r| r.parse().ok())
        .with_context(|| format!("etcd range answered no revision: {read}"))?;
    etcd_post(
        &cluster.etcd_url,
        "/v3/kv/compaction",
        &serde_json::json!({"revision": revision.to_string(), "physical": true}),
    )
    .await?;
    Ok(revision)
}

//! Running the real `kuwa` binary against the cluster under test.
//!
//! [`KuwaHost::start`] copies the chosen plugin components into a fresh
//! directory, starts `kuwa run` on a free loopback port scoped to one
//! namespace, and waits for `/readyz`. The process is killed by PID when the
//! handle drops. [`KuwaHost::metrics`] and friends read its `/metrics`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{kubeconfig_path, wait_for, workspace_root};

/// The `kuwa` binary: `$KUWA_BIN`, or `target/debug/kuwa`.
pub fn kuwa_bin() -> PathBuf {
    std::env::var_os("KUWA_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target/debug/kuwa"))
}

fn component(dir_var: &str, default_dir: &str, name: &str) -> Result<PathBuf> {
    let dir = std::env::var_os(dir_var)
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join(default_dir));
    let path = dir.join(format!("{name}.wasm"));
    if !path.is_file() {
        bail!(
            "{} is missing: build the plugins with `cargo xtask plugins --with-test-plugins` (or run `cargo xtask test`)",
            path.display()
        );
    }
    Ok(path)
}

/// A shipped plugin component (`target/plugins/<name>.wasm`).
pub fn plugin(name: &str) -> Result<PathBuf> {
    component("KUWA_PLUGINS_DIR", "target/plugins", name)
}

/// A test plugin component (`target/test-plugins/<name>.wasm`).
pub fn test_plugin(name: &str) -> Result<PathBuf> {
    component("KUWA_TEST_PLUGINS_DIR", "target/test-plugins", name)
}

/// A free TCP port on loopback.
pub fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// A running `kuwa run` process, killed on drop.
pub struct KuwaHost {
    child: Child,
    /// Where it serves `/metrics`.
    pub addr: SocketAddr,
    /// Its plugins directory.
    pub plugins_dir: PathBuf,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl KuwaHost {
    /// Starts the host with copies of `plugins`, watching `namespace` only,
    /// with `--install-crds` and any `extra` arguments; waits for `/readyz`.
    pub async fn start(namespace: &str, plugins: &[PathBuf], extra: &[&str]) -> Result<Self> {
        Self::start_with(namespace, plugins, &[], extra).await
    }

    /// Like [`KuwaHost::start`], also writing plugin manifests: each
    /// `(stem, yaml)` becomes `<stem>.yaml` next to `<stem>.wasm`, in place
    /// of the plugin's own manifest (copied from beside its component
    /// otherwise), so it must grant `installCrd: true` itself when the
    /// plugin's CRD is to be installed.
    pub async fn start_with(
        namespace: &str,
        plugins: &[PathBuf],
        manifests: &[(&str, &str)],
        extra: &[&str],
    ) -> Result<Self> {
        let kubeconfig = tokio::task::spawn_blocking(kubeconfig_path).await??;
        Self::start_as(&kubeconfig, Some(namespace), plugins, manifests, extra).await
    }

    /// Like [`KuwaHost::start_with`], with the credentials of `kubeconfig`
    /// (e.g. one that impersonates a user with less RBAC than the admin),
    /// watching `namespace` only, or the whole cluster with `None` (only for
    /// plugins whose grant names their namespaces).
    pub async fn start_as(
        kubeconfig: &Path,
        namespace: Option<&str>,
        plugins: &[PathBuf],
        manifests: &[(&str, &str)],
        extra: &[&str],
    ) -> Result<Self> {
        Self::launch(
            &kuwa_bin(),
            kubeconfig,
            namespace,
            plugins,
            manifests,
            extra,
            true,
        )
        .await
    }

    /// Like [`KuwaHost::start_as`] without `--install-crds`: for an identity
    /// that may not write CRDs (they must exist already).
    pub async fn start_without_crds(
        kubeconfig: &Path,
        namespace: Option<&str>,
        plugins: &[PathBuf],
        extra: &[&str],
    ) -> Result<Self> {
        Self::launch(
            &kuwa_bin(),
            kubeconfig,
            namespace,
            plugins,
            &[],
            extra,
            false,
        )
        .await
    }

    /// Starts another `kuwa` binary (the one of the image, say) with
    /// `plugins`, watching `namespace`, without `--install-crds`.
    pub async fn start_binary(
        binary: &Path,
        kubeconfig: &Path,
        namespace: &str,
        plugins: &[PathBuf],
    ) -> Result<Self> {
        Self::launch(
            binary,
            kubeconfig,
            Some(namespace),
            plugins,
            &[],
            &[],
            false,
        )
        .await
    }

    async fn launch(
        binary: &Path,
        kubeconfig: &Path,
        namespace: Option<&str>,
        plugins: &[PathBuf],
        manifests: &[(&str, &str)],
        extra: &[&str],
        install_crds: bool,
    ) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let plugins_dir = dir.path().join("plugins");
        std::fs::create_dir_all(&plugins_dir)?;
        for p in plugins {
            std::fs::copy(
                p,
                plugins_dir.join(p.file_name().context("plugin path has no file name")?),
            )?;
            // The plugin's own grant (`<stem>.yaml` beside it), unless the
            // test gives one of its own.
            let stem = p.file_stem().and_then(|s| s.to_str()).unwrap_or_default();
            let grant = p.with_extension("yaml");
            if grant.is_file() && !manifests.iter().any(|(s, _)| *s == stem) {
                std::fs::copy(&grant, plugins_dir.join(format!("{stem}.yaml")))?;
            }
        }
        for (stem, yaml) in manifests {
            std::fs::write(plugins_dir.join(format!("{stem}.yaml")), yaml)?;
        }
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
        let log = dir.path().join("kuwa.log");
        let log_file = std::fs::File::create(&log)?;
        let child = Command::new(binary)
            .arg("run")
            .arg("--plugins")
            .arg(&plugins_dir)
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .args(
                namespace
                    .map(|ns| ["--namespace", ns])
                    .into_iter()
                    .flatten(),
            )
            .args(install_crds.then_some("--install-crds"))
            .args(["--metrics-addr", &addr.to_string()])
            .args(extra)
            .env(
                "KUWA_LOG",
                "info,kuwa_host=debug,kube_runtime=warn,kube_client=warn",
            )
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .spawn()
            .with_context(|| {
                format!(
                    "starting {} (build it with `cargo build -p kuwa-host`)",
                    binary.display()
                )
            })?;
        let mut host = Self {
            child,
            addr,
            plugins_dir,
            log,
            _dir: dir,
        };
        let ready = wait_ready(&mut host.child, host.addr, "kuwa").await;
        if let Err(e) = ready {
            return Err(e.context(format!("kuwa log:\n{}", host.log_tail(60))));
        }
        Ok(host)
    }

    /// The last `lines` lines of the host's log.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// The host's whole log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` to the process (by its PID).
    pub fn signal(&self, signal: rustix::process::Signal) -> Result<()> {
        let pid = rustix::process::Pid::from_raw(i32::try_from(self.child.id())?)
            .context("the host has no PID")?;
        rustix::process::kill_process(pid, signal).context("signalling the host")?;
        Ok(())
    }

    /// Waits (at most `timeout`) for the process to exit; its exit status.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        let until = std::time::Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if std::time::Instant::now() >= until {
                bail!(
                    "the host (pid {}) did not exit within {timeout:?}",
                    self.child.id()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `/metrics` as text.
    pub async fn metrics(&self) -> Result<String> {
        let (code, body) = http(self.addr, "GET", "/metrics").await?;
        if code != 200 {
            bail!("/metrics answered {code}");
        }
        Ok(body)
    }

    /// Sum of the samples of metric `name` whose labels include every pair of
    /// `labels` (0 when there is none).
    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> Result<f64> {
        Ok(sum_metric(&self.metrics().await?, name, labels))
    }

    /// Asks the host to queue every parent now (`POST /resync`).
    pub async fn resync(&self) -> Result<()> {
        let (code, _) = http(self.addr, "POST", "/resync").await?;
        if code != 202 {
            bail!("/resync answered {code}");
        }
        Ok(())
    }

    /// Forces `rounds` full resyncs of a converged world and returns how many
    /// API writes they caused. Waits for the host to go idle first, and for
    /// each round to reconcile at least `parents` of `plugin`'s parents, so a
    /// 0 means "reconciled everything and wrote nothing", not "did nothing".
    pub async fn forced_resync_writes(
        &self,
        plugin: &str,
        parents: usize,
        rounds: usize,
    ) -> Result<f64> {
        let timeout = Duration::from_secs(120);
        self.wait_idle(Duration::from_secs(3), timeout).await?;
        let writes_before = self.metric("kuwa_api_writes_total", &[]).await?;
        let mut reconciles = self
            .metric("kuwa_reconciles_total", &[("plugin", plugin)])
            .await?;
        for round in 1..=rounds {
            self.resync().await?;
            let target = reconciles + parents as f64;
            reconciles = wait_for(
                &format!("resync round {round} to reconcile {parents} parents"),
                timeout,
                || async move {
                    let n = self
                        .metric("kuwa_reconciles_total", &[("plugin", plugin)])
                        .await?;
                    Ok((n >= target).then_some(n))
                },
            )
            .await?;
            self.wait_idle(Duration::from_secs(2), timeout).await?;
        }
        Ok(self.metric("kuwa_api_writes_total", &[]).await? - writes_before)
    }

    /// The `kuwa_api_writes_total` series, for assertion messages.
    pub async fn write_metrics(&self) -> Result<String> {
        Ok(self
            .metrics()
            .await?
            .lines()
            .filter(|l| l.starts_with("kuwa_api_writes"))
            .collect::<Vec<_>>()
            .join("\n"))
    }

    /// Waits until the host has no queued or delayed keys and its reconcile
    /// count has not moved for `quiet` (bounded by `timeout`).
    pub async fn wait_idle(&self, quiet: Duration, timeout: Duration) -> Result<()> {
        let deadline = std::time::Instant::now() + timeout;
        let mut last = -1.0;
        let mut since = std::time::Instant::now();
        loop {
            let text = self.metrics().await?;
            let reconciles = sum_metric(&text, "kuwa_reconciles_total", &[]);
            let depth = sum_metric(&text, "kuwa_queue_depth", &[]);
            if reconciles != last || depth > 0.0 {
                last = reconciles;
                since = std::time::Instant::now();
            } else if since.elapsed() >= quiet {
                return Ok(());
            }
            if std::time::Instant::now() >= deadline {
                bail!("the host did not go idle within {timeout:?} (queue depth {depth})");
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

impl Drop for KuwaHost {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The sum of the samples of `name` (exact metric name, before `{`) whose
/// labels include every pair in `labels`, or `None` when no such series is
/// exposed at all: a missing series is not a 0.
pub fn metric_sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let values: Vec<f64> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (metric, label_text) = match series.split_once('{') {
                Some((m, rest)) => (m, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            if metric != name {
                return None;
            }
            let ok = labels.iter().all(|(k, v)| {
                label_text
                    .split(',')
                    .any(|pair| pair == format!("{k}=\"{v}\""))
            });
            ok.then(|| value.parse::<f64>().ok()).flatten()
        })
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}

/// Like [`metric_sample`], with 0 for a missing series: only for counters a
/// test has already seen exposed, or whose absence means the same as 0.
pub fn sum_metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    metric_sample(text, name, labels).unwrap_or(0.0)
}

/// Waits (at most 120 s) until the process `child`, called `what`, answers
/// 200 on `/readyz` at `addr`; fails as soon as it exits.
pub async fn wait_ready(child: &mut Child, addr: SocketAddr, what: &str) -> Result<()> {
    wait_for(&format!("{what} /readyz"), Duration::from_secs(120), || {
        let exited = child.try_wait().ok().flatten();
        async move {
            if let Some(status) = exited {
                bail!("{what} exited early with {status}");
            }
            Ok(http(addr, "GET", "/readyz")
                .await
                .ok()
                .filter(|(code, _)| *code == 200)
                .map(|_| ()))
        }
    })
    .await
}

/// A minimal HTTP/1.0 request on loopback; returns status code and body.
pub async fn http(addr: SocketAddr, method: &str, path: &str) -> Result<(u16, String)> {
    let mut stream =
        tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr))
            .await
            .map_err(|_| anyhow!("connecting to {addr} timed out"))??;
    let request = format!("{method} {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Length: 0\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut response))
        .await
        .map_err(|_| anyhow!("reading {path} from {addr} timed out"))??;
    let text = String::from_utf8_lossy(&response).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow!("no HTTP status from {addr}{path}"))?;
    Ok((code, body.to_owned()))
}

/// Applies `object` (JSON) with server-side apply as field manager `e2e`.
pub async fn apply_json(
    client: &kube::Client,
    namespace: &str,
    object: &serde_json::Value,
) -> Result<()> {
    use kube::api::{Api, DynamicObject, Patch, PatchParams};
    use kube::discovery;
    let gvk = {
        let api_version = object["apiVersion"].as_str().context("apiVersion")?;
        let kind = object["kind"].as_str().context("kind")?;
        let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
        kube::api::GroupVersionKind::gvk(group, version, kind)
    };
    let (resource, _) = discovery::pinned_kind(client, &gvk).await?;
    let name = object["metadata"]["name"]
        .as_str()
        .context("metadata.name")?;
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), namespace, &resource);
    api.patch(
        name,
        &PatchParams::apply("e2e").force(),
        &Patch::Apply(object),
    )
    .await?;
    Ok(())
}

/// Reads a YAML file of the workspace as JSON.
pub fn yaml_file(relative: &str) -> Result<serde_json::Value> {
    let path: &Path = &workspace_root().join(relative);
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(serde_saphyr::from_str(&text)?)
}

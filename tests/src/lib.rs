//! Test support for kuwa's end-to-end tests against the local control plane
//! (`cargo xtask cluster up`, see docs/local-cluster.md).
//!
//! * [`client`] / [`kubeconfig_path`]: the cluster behind `$KUWA_KUBECONFIG`,
//!   or the local one, started (once per test process) if it is not up.
//! * [`TestNamespace`]: a fresh namespace per test.
//! * [`wait_for`]: the one bounded polling loop every wait should use.
//! * [`firewall`]: a firewall API on loopback (SecurityPolicy tests).
//! * [`reference`]: the reference model of every shipped plugin and the
//!   checker that compares the whole cluster with it; [`faults`]: the fault
//!   injectors of the reliability tests and the soak.

pub mod bench;
pub mod faults;
pub mod firewall;
pub mod host;
pub mod objects;
pub mod reference;
pub mod registry;
pub mod soak;

use anyhow::{Context, Result, anyhow, bail};
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use kube::api::{Api, DeleteParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Label put on every namespace made by [`TestNamespace::new`].
pub const E2E_LABEL: &str = "kuwa.dev/e2e";

/// The workspace root (the parent of `tests/`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives one level below the workspace root")
        .to_path_buf()
}

/// Runs `cargo xtask <args>` in the workspace root with extra environment,
/// stderr passed through (build progress stays visible), and returns stdout.
/// Fails with the exit status when xtask fails.
pub fn xtask(args: &[&str], envs: &[(&str, &Path)]) -> Result<String> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.arg("xtask")
        .args(args)
        .current_dir(workspace_root())
        .stdin(Stdio::null())
        .stderr(Stdio::inherit());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let out = cmd
        .output()
        .with_context(|| format!("running cargo xtask {}", args.join(" ")))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "`cargo xtask {}` failed ({}); stdout:\n{stdout}",
            args.join(" "),
            out.status
        );
    }
    Ok(stdout)
}

/// Runs `cargo xtask cluster up` (with extra environment) and returns the
/// kubeconfig path it prints as its last line.
pub fn cluster_up(envs: &[(&str, &Path)], extra_args: &[&str]) -> Result<PathBuf> {
    let mut args = vec!["cluster", "up"];
    args.extend_from_slice(extra_args);
    let stdout = xtask(&args, envs)?;
    let last = stdout
        .lines()
        .map(str::trim)
        .rfind(|l| !l.is_empty())
        .ok_or_else(|| anyhow!("`cargo xtask cluster up` printed nothing on stdout"))?;
    let path = PathBuf::from(last);
    if !path.is_file() {
        bail!("`cargo xtask cluster up` printed {last:?}, which is not a file");
    }
    Ok(path)
}

fn resolve_kubeconfig() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("KUWA_KUBECONFIG").filter(|p| !p.is_empty()) {
        let path = PathBuf::from(path);
        if !path.is_file() {
            bail!("KUWA_KUBECONFIG={} is not a file", path.display());
        }
        return Ok(path);
    }
    cluster_up(&[], &[])
}

/// The admin kubeconfig of the cluster under test: `$KUWA_KUBECONFIG` if set,
/// otherwise the local cluster's (running `cargo xtask cluster up` once per
/// process; blocking).
pub fn kubeconfig_path() -> Result<PathBuf> {
    static PATH: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    PATH.get_or_init(|| resolve_kubeconfig().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(|e| anyhow!("no cluster for the end-to-end tests: {e}"))
}

/// A client for the cluster under test (see [`kubeconfig_path`]).
pub async fn client() -> Result<kube::Client> {
    let path = tokio::task::spawn_blocking(kubeconfig_path)
        .await
        .context("kubeconfig lookup panicked")??;
    let kubeconfig =
        Kubeconfig::read_from(&path).with_context(|| format!("reading {}", path.display()))?;
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .with_context(|| format!("loading {}", path.display()))?;
    kube::Client::try_from(config).context("building a kube client")
}

/// Polls `f` every 250 ms until it returns `Ok(Some(value))`, for at most
/// `timeout`. `Ok(None)` means "not yet"; an `Err` is remembered and polling
/// goes on. On timeout the error names `what` and the last error seen.
pub async fn wait_for<F, Fut, T>(what: &str, timeout: Duration, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    let started = Instant::now();
    let mut last_err: Option<anyhow::Error> = None;
    loop {
        match tokio::time::timeout(timeout, f()).await {
            Ok(Ok(Some(value))) => return Ok(value),
            Ok(Ok(None)) => {}
            Ok(Err(e)) => last_err = Some(e),
            Err(_) => last_err = Some(anyhow!("a single check took longer than {timeout:?}")),
        }
        if started.elapsed() >= timeout {
            return Err(match last_err {
                Some(e) => e.context(format!("timed out after {timeout:?} waiting for {what}")),
                None => anyhow!("timed out after {timeout:?} waiting for {what}"),
            });
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A namespace of its own for one test. Call [`TestNamespace::cleanup`] at
/// the end (deletion is async, so there is no `Drop`).
pub struct TestNamespace {
    /// The namespace's name.
    pub name: String,
    client: kube::Client,
}

/// `prefix` reduced to a DNS-1123 label fragment.
fn sanitize(prefix: &str) -> String {
    let mut s: String = prefix
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    s.truncate(40);
    let s = s.trim_matches('-').to_string();
    if s.is_empty() { "e2e".into() } else { s }
}

impl TestNamespace {
    /// Creates `<prefix>-<unique suffix>` labelled `kuwa.dev/e2e=true` and waits
    /// until its `default` ServiceAccount exists (so Pods can be created).
    pub async fn new(client: &kube::Client, prefix: &str) -> Result<TestNamespace> {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!(
            "{}-{:x}{:05x}{}",
            sanitize(prefix),
            std::process::id() & 0xffff,
            nanos >> 12,
            n
        );
        let ns: Namespace = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": name, "labels": {E2E_LABEL: "true"}},
        }))?;
        let namespaces: Api<Namespace> = Api::all(client.clone());
        namespaces
            .create(&PostParams::default(), &ns)
            .await
            .with_context(|| format!("creating namespace {name}"))?;
        let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), &name);
        wait_for(
            &format!("ServiceAccount {name}/default"),
            Duration::from_secs(60),
            || {
                let sas = sas.clone();
                async move { Ok(sas.get_opt("default").await?.map(|_| ())) }
            },
        )
        .await?;
        Ok(TestNamespace {
            name,
            client: client.clone(),
        })
    }

    /// Deletes the namespace (without waiting for it to be gone).
    pub async fn cleanup(self) {
        let namespaces: Api<Namespace> = Api::all(self.client.clone());
        match namespaces
            .delete(&self.name, &DeleteParams::background())
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => eprintln!("warning: deleting namespace {}: {e}", self.name),
        }
    }
}

//! Where the local cluster keeps its files, and the state file that records
//! what `up` started (PIDs, ports) so that `down` stops exactly that.

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Name of the state file inside the state directory.
pub const STATE_FILE: &str = "state.json";

/// `${XDG_CACHE_HOME:-~/.cache}/kuwa`: the per-user cache root.
pub fn cache_root() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir).join("kuwa"));
    }
    let home = std::env::var_os("HOME").filter(|h| !h.is_empty()).context(
        "neither XDG_CACHE_HOME nor HOME is set: set one so the local cluster has a cache dir",
    )?;
    Ok(PathBuf::from(home).join(".cache").join("kuwa"))
}

/// The state directory: `$KUWA_CLUSTER_DIR`, or `<cache root>/cluster/default`.
/// Never inside the repository.
pub fn state_dir() -> Result<PathBuf> {
    let dir = match std::env::var_os("KUWA_CLUSTER_DIR").filter(|d| !d.is_empty()) {
        Some(dir) => {
            let dir = PathBuf::from(dir);
            if dir.is_absolute() {
                dir
            } else {
                std::env::current_dir()?.join(dir)
            }
        }
        None => cache_root()?.join("cluster").join("default"),
    };
    let root = crate::workspace_root();
    if dir.starts_with(&root) {
        bail!(
            "KUWA_CLUSTER_DIR={} is inside the repository; point it outside (e.g. under /tmp or ~/.cache)",
            dir.display()
        );
    }
    Ok(dir)
}

/// The lock file guarding one state directory: a sibling `.<name>.lock`, so
/// that it survives `down` removing the directory.
pub fn lock_path(dir: &Path) -> PathBuf {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "cluster".into());
    dir.with_file_name(format!(".{name}.lock"))
}

/// One process that `up` started.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Component {
    /// Component name; also the multicall binary's first argument.
    pub name: String,
    /// Process id.
    pub pid: u32,
    /// Loopback TCP ports the process listens on.
    pub ports: Vec<u16>,
    /// Its log file.
    pub log: PathBuf,
    /// The arguments it was started with (after the component name), so a
    /// fault test can start a second API server like the first.
    #[serde(default)]
    pub args: Vec<String>,
}

/// Node counts and sizes the cluster was created with.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Nodes {
    /// CPU-only nodes.
    pub cpu: u32,
    /// GPU nodes.
    pub gpu: u32,
    /// `nvidia.com/gpu` per GPU node.
    pub gpus_per_node: u32,
}

/// The JSON state file (`<state dir>/state.json`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct State {
    /// Schema version.
    pub version: u32,
    /// The multicall binary every component runs from.
    pub binary: PathBuf,
    /// The state directory.
    pub dir: PathBuf,
    /// Admin kubeconfig.
    pub kubeconfig: PathBuf,
    /// `https://127.0.0.1:<port>`.
    pub apiserver_url: String,
    /// `http://127.0.0.1:<port>`.
    pub etcd_url: String,
    /// Nodes requested.
    pub nodes: Nodes,
    /// Unix time `up` started.
    pub started_unix: u64,
    /// Started processes, in start order.
    pub components: Vec<Component>,
}

impl State {
    /// Reads `<dir>/state.json`; `Ok(None)` when there is none.
    pub fn load(dir: &Path) -> Result<Option<State>> {
        let path = dir.join(STATE_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let state =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        Ok(Some(state))
    }

    /// Writes the state file atomically.
    pub fn save(&self) -> Result<()> {
        let path = self.dir.join(STATE_FILE);
        let tmp = self.dir.join(format!("{STATE_FILE}.tmp"));
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?)?;
        std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
        Ok(())
    }
}

//! Tenant grants (DESIGN §4): what a plugin may do, read from an optional
//! manifest `<plugin file stem>.yaml` next to its `.wasm`, and the mechanisms
//! that enforce it at run time — the API write budget (a token bucket) and
//! quarantine after repeated failures.
//!
//! ```yaml
//! # plugins/webserver.yaml
//! namespaces: [team-a, team-b]      # parents elsewhere are not reconciled
//! childKinds: [v1/ConfigMap, apps/v1/Deployment, v1/Service]
//! writesPerSecond: 20               # API write budget (token bucket)
//! writeBurst: 40
//! concurrency: 4                    # reconciles of this plugin at once
//! quarantineAfter: 10               # consecutive failures before quarantine
//! limits:
//!   deadline: 500ms                 # wall clock per call
//!   memoryMiB: 32                   # linear memory cap per call
//!   fuel: 1000000000                # optional instruction budget per call
//!   maxChildren: 50
//!   maxOutputBytes: 1048576
//! ```
//!
//! Every field is optional; without a manifest a plugin may act in every
//! namespace (that the host watches) on the child kinds it declares, within
//! the host-wide defaults.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use serde::Deserialize;

use crate::plugin::Gvk;
use crate::runtime::Limits;
use crate::validate::{MAX_CHILDREN, MAX_OUTPUT_BYTES};

/// Default API write budget of a plugin, per second. High enough that a
/// plugin converging a few hundred parents is not slowed noticeably, low
/// enough that one runaway plugin cannot take the API server's whole write
/// capacity (~1,300 writes/s on the reference machine).
pub const DEFAULT_WRITES_PER_SECOND: f64 = 100.0;

/// Default burst of the write budget.
pub const DEFAULT_WRITE_BURST: u32 = 200;

/// Consecutive failed reconciles (across all of a plugin's keys) after which
/// the plugin is quarantined.
pub const DEFAULT_QUARANTINE_AFTER: u32 = 10;

/// How long each key of a quarantined plugin waits between attempts. A new
/// version of the plugin lifts the quarantine at once.
pub const QUARANTINE_BACKOFF: Duration = Duration::from_secs(300);

/// The manifest file as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Manifest {
    /// Namespaces the plugin may act in; absent means all.
    pub namespaces: Option<Vec<String>>,
    /// Child kinds it may create, as `group/version/Kind` (`v1/ConfigMap`
    /// for the core group); absent means every declared child kind.
    pub child_kinds: Option<Vec<String>>,
    /// API write budget per second.
    pub writes_per_second: Option<f64>,
    /// Burst of the write budget.
    pub write_burst: Option<u32>,
    /// Reconciles in flight at once.
    pub concurrency: Option<usize>,
    /// Consecutive failures before quarantine.
    pub quarantine_after: Option<u32>,
    /// Sandbox limits.
    pub limits: Option<ManifestLimits>,
}

/// The `limits` section of a manifest.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ManifestLimits {
    /// Wall-clock deadline per call, e.g. `500ms`.
    pub deadline: Option<String>,
    /// Memory cap per call in MiB.
    #[serde(rename = "memoryMiB")]
    pub memory_mib: Option<usize>,
    /// Fuel (instruction budget) per call.
    pub fuel: Option<u64>,
    /// Most children one reconcile may return.
    pub max_children: Option<usize>,
    /// Most bytes one reconcile may return.
    pub max_output_bytes: Option<usize>,
}

/// Why a manifest is unusable.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// It could not be read.
    #[error("cannot read {0}: {1}")]
    Read(PathBuf, std::io::Error),
    /// It is not valid YAML of the manifest's shape.
    #[error("{0} is not a valid plugin manifest: {1}")]
    Parse(PathBuf, serde_yaml::Error),
    /// A value is out of range.
    #[error("{0}: {1}")]
    Invalid(PathBuf, String),
}

/// A plugin's effective grant.
#[derive(Debug, Clone, PartialEq)]
pub struct Grant {
    /// Namespaces it may act in (None: all).
    pub namespaces: Option<BTreeSet<String>>,
    /// Child kinds it may create (None: all declared).
    pub child_kinds: Option<BTreeSet<Gvk>>,
    /// Write budget per second.
    pub writes_per_second: f64,
    /// Write burst.
    pub write_burst: u32,
    /// Concurrency cap (None: the host's default).
    pub concurrency: Option<usize>,
    /// Consecutive failures before quarantine.
    pub quarantine_after: u32,
    /// Most children per reconcile.
    pub max_children: usize,
    /// Most output bytes per reconcile.
    pub max_output_bytes: usize,
}

impl Default for Grant {
    fn default() -> Self {
        Self {
            namespaces: None,
            child_kinds: None,
            writes_per_second: DEFAULT_WRITES_PER_SECOND,
            write_burst: DEFAULT_WRITE_BURST,
            concurrency: None,
            quarantine_after: DEFAULT_QUARANTINE_AFTER,
            max_children: MAX_CHILDREN,
            max_output_bytes: MAX_OUTPUT_BYTES,
        }
    }
}

impl Grant {
    /// Whether the plugin may act in `namespace` (cluster-scoped parents,
    /// `None`, are allowed only to a plugin granted every namespace).
    pub fn allows_namespace(&self, namespace: Option<&str>) -> bool {
        match (&self.namespaces, namespace) {
            (None, _) => true,
            (Some(allowed), Some(ns)) => allowed.contains(ns),
            (Some(_), None) => false,
        }
    }

    /// Whether the plugin may create children of `gvk`.
    pub fn allows_kind(&self, gvk: &Gvk) -> bool {
        self.child_kinds
            .as_ref()
            .is_none_or(|kinds| kinds.contains(gvk))
    }
}

/// The manifest path of a plugin file: same stem, `.yaml`.
pub fn manifest_path(wasm: &Path) -> PathBuf {
    wasm.with_extension("yaml")
}

fn parse_kind(text: &str) -> Option<Gvk> {
    let (api_version, kind) = text.rsplit_once('/')?;
    let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
    (!version.is_empty() && !kind.is_empty()).then(|| Gvk::new(group, version, kind))
}

/// Reads the manifest next to `wasm` (if any) into a grant and the per-call
/// limits, starting from `defaults`.
pub fn load(wasm: &Path, defaults: Limits) -> Result<(Grant, Limits), ManifestError> {
    let path = manifest_path(wasm);
    if !path.exists() {
        return Ok((Grant::default(), defaults));
    }
    let text = std::fs::read_to_string(&path).map_err(|e| ManifestError::Read(path.clone(), e))?;
    let manifest: Manifest =
        serde_yaml::from_str(&text).map_err(|e| ManifestError::Parse(path.clone(), e))?;
    from_manifest(&path, manifest, defaults)
}

/// Turns a parsed manifest into a grant and limits.
pub fn from_manifest(
    path: &Path,
    m: Manifest,
    defaults: Limits,
) -> Result<(Grant, Limits), ManifestError> {
    let invalid = |msg: String| ManifestError::Invalid(path.to_owned(), msg);
    let child_kinds = m
        .child_kinds
        .map(|kinds| {
            kinds
                .iter()
                .map(|k| {
                    parse_kind(k).ok_or_else(|| {
                        invalid(format!("childKinds: {k:?} is not group/version/Kind"))
                    })
                })
                .collect::<Result<BTreeSet<_>, _>>()
        })
        .transpose()?;
    let writes_per_second = m.writes_per_second.unwrap_or(DEFAULT_WRITES_PER_SECOND);
    if !(writes_per_second > 0.0 && writes_per_second.is_finite()) {
        return Err(invalid(format!(
            "writesPerSecond must be positive, got {writes_per_second}"
        )));
    }
    if m.concurrency == Some(0) {
        return Err(invalid("concurrency must be at least 1".into()));
    }
    let l = m.limits.unwrap_or_default();
    let deadline = match &l.deadline {
        Some(text) => humantime::parse_duration(text)
            .map_err(|e| invalid(format!("limits.deadline {text:?}: {e}")))?,
        None => defaults.deadline,
    };
    if deadline.is_zero() {
        return Err(invalid("limits.deadline must be positive".into()));
    }
    let memory_bytes = l.memory_mib.map_or(defaults.memory_bytes, |mib| mib << 20);
    if memory_bytes == 0 || memory_bytes > crate::runtime::MAX_MEMORY_CAP {
        return Err(invalid(format!(
            "limits.memoryMiB must be between 1 and {}",
            crate::runtime::MAX_MEMORY_CAP >> 20
        )));
    }
    let grant = Grant {
        namespaces: m.namespaces.map(|ns| ns.into_iter().collect()),
        child_kinds,
        writes_per_second,
        write_burst: m.write_burst.unwrap_or(DEFAULT_WRITE_BURST).max(1),
        concurrency: m.concurrency,
        quarantine_after: m
            .quarantine_after
            .unwrap_or(DEFAULT_QUARANTINE_AFTER)
            .max(1),
        max_children: l.max_children.unwrap_or(MAX_CHILDREN),
        max_output_bytes: l.max_output_bytes.unwrap_or(MAX_OUTPUT_BYTES),
    };
    let limits = Limits {
        deadline,
        memory_bytes,
        fuel: l.fuel.or(defaults.fuel),
    };
    Ok((grant, limits))
}

/// A token bucket: `rate` tokens per second up to `burst`. Each API write
/// takes one; a write with no token waits for one.
#[derive(Debug)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    state: Mutex<(f64, tokio::time::Instant)>,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(rate: f64, burst: u32) -> Self {
        let burst = f64::from(burst.max(1));
        Self {
            rate,
            burst,
            state: Mutex::new((burst, tokio::time::Instant::now())),
        }
    }

    /// Takes a token now, or says how long until one is available.
    fn try_take(&self) -> Result<(), Duration> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let now = tokio::time::Instant::now();
        let elapsed = now.saturating_duration_since(state.1).as_secs_f64();
        state.0 = (state.0 + elapsed * self.rate).min(self.burst);
        state.1 = now;
        if state.0 >= 1.0 {
            state.0 -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - state.0) / self.rate))
        }
    }

    /// Waits for a token. Returns whether it had to wait.
    pub async fn take(&self) -> bool {
        let mut waited = false;
        while let Err(wait) = self.try_take() {
            waited = true;
            tokio::time::sleep(wait).await;
        }
        waited
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Result<(Grant, Limits), ManifestError> {
        let m: Manifest =
            serde_yaml::from_str(yaml).map_err(|e| ManifestError::Parse("m.yaml".into(), e))?;
        from_manifest(Path::new("m.yaml"), m, Limits::default())
    }

    #[test]
    fn a_full_manifest() {
        let (g, l) = parse(
            "namespaces: [a, b]\nchildKinds: [v1/ConfigMap, apps/v1/Deployment]\nwritesPerSecond: 5\n\
             writeBurst: 7\nconcurrency: 2\nquarantineAfter: 3\n\
             limits: {deadline: 250ms, memoryMiB: 16, fuel: 1000, maxChildren: 4, maxOutputBytes: 9000}\n",
        )
        .unwrap();
        assert!(
            g.allows_namespace(Some("a"))
                && !g.allows_namespace(Some("c"))
                && !g.allows_namespace(None)
        );
        assert!(g.allows_kind(&Gvk::new("apps", "v1", "Deployment")));
        assert!(!g.allows_kind(&Gvk::new("", "v1", "Secret")));
        assert_eq!(
            (
                g.writes_per_second,
                g.write_burst,
                g.concurrency,
                g.quarantine_after
            ),
            (5.0, 7, Some(2), 3)
        );
        assert_eq!((g.max_children, g.max_output_bytes), (4, 9000));
        assert_eq!(
            l,
            Limits {
                deadline: Duration::from_millis(250),
                memory_bytes: 16 << 20,
                fuel: Some(1000)
            }
        );
    }

    #[test]
    fn no_manifest_means_defaults() {
        let (g, l) = load(Path::new("/nonexistent/plugin.wasm"), Limits::default()).unwrap();
        assert_eq!(g, Grant::default());
        assert_eq!(l, Limits::default());
        assert!(g.allows_namespace(None) && g.allows_kind(&Gvk::new("", "v1", "Secret")));
    }

    #[test]
    fn bad_manifests_say_what_is_wrong() {
        let err = |y: &str| parse(y).unwrap_err().to_string();
        assert!(err("childKinds: [ConfigMap]").contains("group/version/Kind"));
        assert!(err("writesPerSecond: 0").contains("writesPerSecond"));
        assert!(err("limits: {deadline: soon}").contains("limits.deadline"));
        assert!(err("limits: {memoryMiB: 100000}").contains("memoryMiB"));
        assert!(err("concurrency: 0").contains("concurrency"));
        assert!(err("nameSpaces: [a]").contains("unknown field"));
    }

    #[tokio::test(start_paused = true)]
    async fn the_bucket_allows_a_burst_then_the_rate() {
        let bucket = TokenBucket::new(10.0, 3);
        let start = tokio::time::Instant::now();
        for _ in 0..3 {
            assert!(!bucket.take().await, "the burst needs no wait");
        }
        assert!(bucket.take().await, "the 4th write waits");
        // 7 more at 10/s: about 0.7 s of (virtual) time after the burst.
        for _ in 0..6 {
            bucket.take().await;
        }
        let elapsed = start.elapsed();
        assert!(
            elapsed >= Duration::from_millis(690) && elapsed <= Duration::from_millis(710),
            "{elapsed:?}"
        );
    }
}

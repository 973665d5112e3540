//! Tenant grants (DESIGN §4): what a plugin may read and write, read from an
//! optional manifest `<plugin file stem>.yaml` next to its `.wasm`.
//!
//! ```yaml
//! # plugins/webserver.yaml
//! namespaces: [team-a, team-b]      # parents elsewhere are not reconciled
//! parentKind: kuwa.dev/v1alpha1/WebServer   # default: the kind of the CRD the plugin carries
//! childKinds: [v1/ConfigMap, apps/v1/Deployment, v1/Service]
//! relatedKinds: [v1/Pod]            # default: none; every related kind must be granted
//! installCrd: true                  # default false: may the host install the plugin's CRD
//! childFinalizers: false            # default false: may children carry finalizers
//! writesPerSecond: 20               # a hard API write cap (governor rate limiter); default none
//! writeBurst: 40                    # its burst (default 200)
//! concurrency: 4                    # a hard cap on reconciles at once; default none
//! quarantineAfter: 10               # consecutive failures before quarantine
//! quarantineInterval: 5m            # a quarantined plugin is called once per interval
//! limits:
//!   deadline: 500ms                 # wall clock per call, host calls included
//!   memoryMiB: 32                   # linear memory cap per call
//!   fuel: 1000000000                # optional instruction budget per call
//!   maxLogLines: 100                # log lines per call; the rest are dropped
//!   maxChildren: 50
//!   maxOutputBytes: 1048576         # children, status and events together
//!   maxEvents: 16
//! outbound:                         # default: no outbound calls at all
//!   hosts: [https://firewall.example.com]   # origins it may call over HTTP
//!   timeout: 2s                     # per request, inside limits.deadline
//!   maxResponseBytes: 1048576
//!   maxCallsPerReconcile: 8
//! ```
//!
//! Every field is optional and the defaults are tight: without a manifest a
//! plugin may reconcile only the kind of the CRD it carries, in every
//! namespace the host watches, create the child kinds it declares, read no
//! related kind, and not install its CRD.
//!
//! Speed is work-conserving by default: without `writesPerSecond` or
//! `concurrency` a plugin alone may use the host's whole reconcile capacity
//! (and so its whole write rate), and plugins with work share it fairly
//! (see [`crate::queue`]). Either field makes a hard cap that holds even
//! when the host is idle.

// Load errors are the cold path and name what they refuse (paths, kinds);
// boxing them would only add noise.
#![allow(clippy::result_large_err)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::gvk::Gvk;
use crate::tenant::limits::{
    Limits, MAX_CONCURRENT_RECONCILES, MAX_DEADLINE, MAX_MEMORY_CAP, OutputLimits,
};
use crate::tenant::outbound::{ManifestOutbound, OutboundGrant};

/// Slowest write budget a manifest may set: one write every 1,000 s. Below
/// that a plugin could never converge anything, and the token arithmetic
/// would leave the range of a timer.
pub const MIN_WRITES_PER_SECOND: f64 = 0.001;

/// Fastest write budget a manifest may set (far above any API server's
/// capacity: effectively "no budget").
pub const MAX_WRITES_PER_SECOND: f64 = 1_000_000.0;

/// Default burst of the write budget.
pub const DEFAULT_WRITE_BURST: u32 = 200;

/// Consecutive failed reconciles (across all of a plugin's keys) after which
/// the plugin is quarantined.
pub const DEFAULT_QUARANTINE_AFTER: u32 = 10;

/// How often a quarantined plugin is tried again (one key per interval, a
/// probe). A success or a new version lifts the quarantine at once.
pub const DEFAULT_QUARANTINE_INTERVAL: Duration = Duration::from_secs(300);

/// The manifest file as written (also the `grant` of a `ClusterPlugin`).
#[derive(Debug, Default, Clone, PartialEq, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Manifest {
    /// Namespaces the plugin may act in; absent means all.
    pub namespaces: Option<Vec<String>>,
    /// The parent kind, `group/version/Kind`; absent means the kind of the
    /// CRD the plugin carries.
    pub parent_kind: Option<String>,
    /// Child kinds it may create, as `group/version/Kind` (`v1/ConfigMap`
    /// for the core group); absent means every declared child kind.
    pub child_kinds: Option<Vec<String>>,
    /// Related kinds it may read; absent means none.
    pub related_kinds: Option<Vec<String>>,
    /// Whether the host may install the plugin's CRD.
    pub install_crd: Option<bool>,
    /// Whether children may carry finalizers.
    pub child_finalizers: Option<bool>,
    /// API write budget per second.
    pub writes_per_second: Option<f64>,
    /// Burst of the write budget.
    pub write_burst: Option<u32>,
    /// Reconciles in flight at once.
    pub concurrency: Option<usize>,
    /// Consecutive failures before quarantine.
    pub quarantine_after: Option<u32>,
    /// How often a quarantined plugin is tried, e.g. `5m`.
    pub quarantine_interval: Option<String>,
    /// Sandbox and output limits.
    pub limits: Option<ManifestLimits>,
    /// HTTP calls through the host (none without it).
    pub outbound: Option<ManifestOutbound>,
}

/// The `limits` section of a manifest.
#[derive(Debug, Default, Clone, PartialEq, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ManifestLimits {
    /// Wall-clock deadline per call, e.g. `500ms`.
    pub deadline: Option<String>,
    /// Memory cap per call in MiB.
    #[serde(rename = "memoryMiB")]
    pub memory_mib: Option<usize>,
    /// Fuel (instruction budget) per call.
    pub fuel: Option<u64>,
    /// Log lines per call.
    pub max_log_lines: Option<u32>,
    /// Most children one reconcile may return.
    pub max_children: Option<usize>,
    /// Most bytes one reconcile may return.
    pub max_output_bytes: Option<usize>,
    /// Most events one reconcile may ask for.
    pub max_events: Option<usize>,
}

/// Why a manifest is unusable.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// It could not be read.
    #[error("cannot read {0}: {1}")]
    Read(PathBuf, std::io::Error),
    /// It is not valid YAML of the manifest's shape.
    #[error("{0} is not a valid plugin manifest: {1}")]
    Parse(PathBuf, String),
    /// A value is out of range.
    #[error("{0}: {1}")]
    Invalid(PathBuf, String),
}

/// Why a described plugin does not fit its grant.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GrantError {
    /// It reconciles another kind than the granted parent kind.
    #[error("the plugin reconciles {described}, but its grant names parentKind {granted}")]
    ParentKind {
        /// What `describe` said.
        described: Gvk,
        /// What the manifest grants.
        granted: Gvk,
    },
    /// It carries no CRD and the manifest names no parent kind.
    #[error(
        "the plugin reconciles {0} but carries no CRD for it; a plugin may reconcile another kind only when its manifest grants it (parentKind: {0})"
    )]
    ParentNotGranted(Gvk),
    /// It wants to read a kind its grant does not name.
    #[error(
        "the plugin asks to read {0}, which its grant does not allow (add it to relatedKinds in the manifest)"
    )]
    RelatedNotGranted(Gvk),
}

/// A plugin's effective grant.
#[derive(Debug, Clone, PartialEq)]
pub struct Grant {
    /// Namespaces it may act in and read from (None: all).
    pub namespaces: Option<BTreeSet<String>>,
    /// The parent kind granted (None: the kind of the CRD it carries).
    pub parent_kind: Option<Gvk>,
    /// Child kinds it may create (None: all declared).
    pub child_kinds: Option<BTreeSet<Gvk>>,
    /// Related kinds it may read.
    pub related_kinds: BTreeSet<Gvk>,
    /// Whether the host may install its CRD.
    pub install_crd: bool,
    /// Whether its children may carry finalizers.
    pub child_finalizers: bool,
    /// A hard write cap per second (None: work-conserving).
    pub writes_per_second: Option<f64>,
    /// Write burst.
    pub write_burst: u32,
    /// Concurrency cap (None: the host's default).
    pub concurrency: Option<usize>,
    /// Consecutive failures before quarantine.
    pub quarantine_after: u32,
    /// How often a quarantined plugin is tried.
    pub quarantine_interval: Duration,
    /// Limits on one reconcile's output.
    pub output: OutputLimits,
    /// What it may call over HTTP (None: nothing).
    pub outbound: Option<std::sync::Arc<OutboundGrant>>,
}

impl Default for Grant {
    fn default() -> Self {
        Self {
            namespaces: None,
            parent_kind: None,
            child_kinds: None,
            related_kinds: BTreeSet::new(),
            install_crd: false,
            child_finalizers: false,
            writes_per_second: None,
            write_burst: DEFAULT_WRITE_BURST,
            concurrency: None,
            quarantine_after: DEFAULT_QUARANTINE_AFTER,
            quarantine_interval: DEFAULT_QUARANTINE_INTERVAL,
            output: OutputLimits::default(),
            outbound: None,
        }
    }
}

impl Grant {
    /// Whether the plugin may act in (and read from) `namespace`
    /// (cluster-scoped objects, `None`, are allowed only to a plugin granted
    /// every namespace).
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

    /// Checks what a plugin described against the grant: its parent kind
    /// (`carries_crd`: it carries the CRD of that kind) and the kinds it
    /// wants to read.
    pub fn check(
        &self,
        parent: &Gvk,
        carries_crd: bool,
        related: &[Gvk],
    ) -> Result<(), GrantError> {
        match &self.parent_kind {
            Some(granted) if granted != parent => {
                return Err(GrantError::ParentKind {
                    described: parent.clone(),
                    granted: granted.clone(),
                });
            }
            // The CRD a plugin carries stands for a grant of its kind only
            // when that kind is a custom one: a CRD claiming `v1/Secret`
            // or `apps/v1/Deployment` grants nothing.
            None if !carries_crd || !is_custom_group(&parent.group) => {
                return Err(GrantError::ParentNotGranted(parent.clone()));
            }
            _ => {}
        }
        if let Some(kind) = related.iter().find(|g| !self.related_kinds.contains(g)) {
            return Err(GrantError::RelatedNotGranted(kind.clone()));
        }
        Ok(())
    }
}

/// Whether `group` can only belong to a custom resource: it has a dot (the
/// API server requires one of CRD groups; the built-in groups without one —
/// core, `apps`, `batch`, `policy`, ... — are excluded) and is not one of
/// Kubernetes' own domains (`*.k8s.io`, `*.kubernetes.io`).
pub fn is_custom_group(group: &str) -> bool {
    let reserved = ["k8s.io", "kubernetes.io"];
    group.contains('.')
        && !reserved
            .iter()
            .any(|r| group == *r || group.ends_with(&format!(".{r}")))
}

/// The manifest path of a plugin file: same stem, `.yaml`.
pub fn manifest_path(wasm: &Path) -> PathBuf {
    wasm.with_extension("yaml")
}

/// Reads the manifest next to `wasm` (if any) into a grant and the per-call
/// limits, starting from `defaults`.
pub fn load(wasm: &Path, defaults: Limits) -> Result<(Grant, Limits), ManifestError> {
    let path = manifest_path(wasm);
    if !path.exists() {
        return Ok((Grant::default(), defaults));
    }
    let text = std::fs::read_to_string(&path).map_err(|e| ManifestError::Read(path.clone(), e))?;
    parse(&path, &text, defaults)
}

/// Parses manifest text (from `path`, for messages) into a grant and limits.
pub fn parse(path: &Path, text: &str, defaults: Limits) -> Result<(Grant, Limits), ManifestError> {
    let manifest: Manifest = if text.trim().is_empty() {
        Manifest::default()
    } else {
        serde_saphyr::from_str(text)
            .map_err(|e| ManifestError::Parse(path.to_owned(), e.to_string()))?
    };
    from_manifest(path, manifest, defaults)
}

fn kinds(
    field: &str,
    kinds: Option<Vec<String>>,
    invalid: &impl Fn(String) -> ManifestError,
) -> Result<Option<BTreeSet<Gvk>>, ManifestError> {
    kinds
        .map(|kinds| {
            kinds
                .iter()
                .map(|k| {
                    Gvk::parse(k)
                        .ok_or_else(|| invalid(format!("{field}: {k:?} is not group/version/Kind")))
                })
                .collect()
        })
        .transpose()
}

fn in_range<T: PartialOrd + std::fmt::Display + Copy>(
    field: &str,
    value: T,
    min: T,
    max: T,
    invalid: &impl Fn(String) -> ManifestError,
) -> Result<T, ManifestError> {
    if value >= min && value <= max {
        Ok(value)
    } else {
        Err(invalid(format!(
            "{field} must be between {min} and {max}, got {value}"
        )))
    }
}

fn duration(
    field: &str,
    text: &str,
    min: Duration,
    max: Duration,
    invalid: &impl Fn(String) -> ManifestError,
) -> Result<Duration, ManifestError> {
    let d =
        humantime::parse_duration(text).map_err(|e| invalid(format!("{field} {text:?}: {e}")))?;
    if d < min || d > max {
        return Err(invalid(format!(
            "{field} must be between {} and {}, got {text}",
            humantime::format_duration(min),
            humantime::format_duration(max)
        )));
    }
    Ok(d)
}

/// Turns a parsed manifest into a grant and limits. Every value is checked:
/// anything out of range is an error naming the field, never a panic later.
pub fn from_manifest(
    path: &Path,
    m: Manifest,
    defaults: Limits,
) -> Result<(Grant, Limits), ManifestError> {
    let invalid = |msg: String| ManifestError::Invalid(path.to_owned(), msg);
    let parent_kind = m
        .parent_kind
        .map(|k| {
            Gvk::parse(&k)
                .ok_or_else(|| invalid(format!("parentKind: {k:?} is not group/version/Kind")))
        })
        .transpose()?;
    let child_kinds = kinds("childKinds", m.child_kinds, &invalid)?;
    let related_kinds = kinds("relatedKinds", m.related_kinds, &invalid)?.unwrap_or_default();
    if m.write_burst.is_some() && m.writes_per_second.is_none() {
        return Err(invalid(
            "writeBurst is the burst of writesPerSecond, which is not set (without it writes are not capped)".into(),
        ));
    }
    let writes_per_second = m
        .writes_per_second
        .map(|rate| {
            if !rate.is_finite() {
                return Err(invalid(format!(
                    "writesPerSecond must be a finite number, got {rate}"
                )));
            }
            in_range(
                "writesPerSecond",
                rate,
                MIN_WRITES_PER_SECOND,
                MAX_WRITES_PER_SECOND,
                &invalid,
            )
        })
        .transpose()?;
    let write_burst = in_range(
        "writeBurst",
        m.write_burst.unwrap_or(DEFAULT_WRITE_BURST),
        1,
        1_000_000,
        &invalid,
    )?;
    let concurrency = m
        .concurrency
        .map(|c| in_range("concurrency", c, 1, MAX_CONCURRENT_RECONCILES, &invalid))
        .transpose()?;
    let quarantine_after = in_range(
        "quarantineAfter",
        m.quarantine_after.unwrap_or(DEFAULT_QUARANTINE_AFTER),
        1,
        1_000_000,
        &invalid,
    )?;
    let quarantine_interval = match &m.quarantine_interval {
        Some(text) => duration(
            "quarantineInterval",
            text,
            Duration::from_secs(1),
            Duration::from_secs(24 * 3600),
            &invalid,
        )?,
        None => DEFAULT_QUARANTINE_INTERVAL,
    };
    let l = m.limits.unwrap_or_default();
    let deadline = match &l.deadline {
        Some(text) => duration(
            "limits.deadline",
            text,
            Duration::from_millis(1),
            MAX_DEADLINE,
            &invalid,
        )?,
        None => defaults.deadline,
    };
    let memory_bytes = match l.memory_mib {
        Some(mib) => in_range("limits.memoryMiB", mib, 1, MAX_MEMORY_CAP >> 20, &invalid)? << 20,
        None => defaults.memory_bytes,
    };
    let fuel = l
        .fuel
        .map(|f| in_range("limits.fuel", f, 1, u64::MAX, &invalid))
        .transpose()?
        .or(defaults.fuel);
    let max_log_lines = in_range(
        "limits.maxLogLines",
        l.max_log_lines.unwrap_or(defaults.max_log_lines),
        0,
        100_000,
        &invalid,
    )?;
    let out = OutputLimits::default();
    let output = OutputLimits {
        max_children: in_range(
            "limits.maxChildren",
            l.max_children.unwrap_or(out.max_children),
            0,
            10_000,
            &invalid,
        )?,
        max_output_bytes: in_range(
            "limits.maxOutputBytes",
            l.max_output_bytes.unwrap_or(out.max_output_bytes),
            1,
            64 << 20,
            &invalid,
        )?,
        max_events: in_range(
            "limits.maxEvents",
            l.max_events.unwrap_or(out.max_events),
            0,
            1_000,
            &invalid,
        )?,
    };
    let outbound = m
        .outbound
        .map(|o| OutboundGrant::from_manifest(o, &invalid).map(std::sync::Arc::new))
        .transpose()?;
    let grant = Grant {
        namespaces: m.namespaces.map(|ns| ns.into_iter().collect()),
        parent_kind,
        child_kinds,
        related_kinds,
        install_crd: m.install_crd.unwrap_or(false),
        child_finalizers: m.child_finalizers.unwrap_or(false),
        writes_per_second,
        write_burst,
        concurrency,
        quarantine_after,
        quarantine_interval,
        output,
        outbound,
    };
    let limits = Limits {
        deadline,
        memory_bytes,
        fuel,
        max_log_lines,
    };
    Ok((grant, limits))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(yaml: &str) -> Result<(Grant, Limits), ManifestError> {
        parse(Path::new("m.yaml"), yaml, Limits::default())
    }

    #[test]
    fn a_full_manifest() {
        let (g, l) = parse_str(
            "namespaces: [a, b]\nparentKind: x.dev/v1/Foo\nchildKinds: [v1/ConfigMap, apps/v1/Deployment]\n\
             relatedKinds: [v1/Secret]\ninstallCrd: true\nchildFinalizers: true\nwritesPerSecond: 5\n\
             writeBurst: 7\nconcurrency: 2\nquarantineAfter: 3\nquarantineInterval: 5s\n\
             limits: {deadline: 250ms, memoryMiB: 16, fuel: 1000, maxChildren: 4, maxOutputBytes: 9000, maxEvents: 2, maxLogLines: 7}\n",
        )
        .unwrap();
        assert!(
            g.allows_namespace(Some("a"))
                && !g.allows_namespace(Some("c"))
                && !g.allows_namespace(None)
        );
        assert!(g.allows_kind(&Gvk::new("apps", "v1", "Deployment")));
        assert!(!g.allows_kind(&Gvk::new("", "v1", "Secret")));
        assert_eq!(g.parent_kind, Some(Gvk::new("x.dev", "v1", "Foo")));
        assert!(g.outbound.is_none(), "no outbound section: no calls");
        assert!(g.related_kinds.contains(&Gvk::new("", "v1", "Secret")));
        assert!(g.install_crd && g.child_finalizers);
        assert_eq!(
            (
                g.writes_per_second,
                g.write_burst,
                g.concurrency,
                g.quarantine_after,
                g.quarantine_interval
            ),
            (Some(5.0), 7, Some(2), 3, Duration::from_secs(5))
        );
        assert_eq!(
            g.output,
            OutputLimits {
                max_children: 4,
                max_output_bytes: 9000,
                max_events: 2
            }
        );
        assert_eq!(
            l,
            Limits {
                deadline: Duration::from_millis(250),
                memory_bytes: 16 << 20,
                fuel: Some(1000),
                max_log_lines: 7,
            }
        );
    }

    #[test]
    fn no_manifest_means_tight_defaults() {
        let (g, l) = load(Path::new("/nonexistent/plugin.wasm"), Limits::default()).unwrap();
        assert_eq!(g, Grant::default());
        assert_eq!(l, Limits::default());
        assert!(!g.install_crd && !g.child_finalizers && g.related_kinds.is_empty());
        let foo = Gvk::new("x.dev", "v1", "Foo");
        assert_eq!(g.check(&foo, true, &[]), Ok(()));
        // No CRD of its own: the parent kind must be granted by name.
        let pod = Gvk::new("", "v1", "Pod");
        assert_eq!(
            g.check(&pod, false, &[]),
            Err(GrantError::ParentNotGranted(pod.clone()))
        );
        // A CRD for a built-in kind grants nothing: the kind must be named.
        for builtin in [
            Gvk::new("", "v1", "Secret"),
            Gvk::new("apps", "v1", "Deployment"),
            Gvk::new("networking.k8s.io", "v1", "Ingress"),
        ] {
            assert_eq!(
                g.check(&builtin, true, &[]),
                Err(GrantError::ParentNotGranted(builtin.clone()))
            );
        }
        // Reading anything must be granted; Secrets are no exception.
        let secret = Gvk::new("", "v1", "Secret");
        assert_eq!(
            g.check(&foo, true, std::slice::from_ref(&secret)),
            Err(GrantError::RelatedNotGranted(secret))
        );
    }

    #[test]
    fn the_granted_parent_kind_is_the_only_one() {
        let (g, _) = parse_str("parentKind: v1/Pod\n").unwrap();
        let pod = Gvk::new("", "v1", "Pod");
        assert_eq!(g.check(&pod, false, &[]), Ok(()));
        let ns = Gvk::new("", "v1", "Namespace");
        assert!(matches!(
            g.check(&ns, true, &[]),
            Err(GrantError::ParentKind { .. })
        ));
    }

    #[test]
    fn bad_manifests_say_what_is_wrong() {
        let err = |y: &str| parse_str(y).unwrap_err().to_string();
        assert!(err("childKinds: [ConfigMap]").contains("group/version/Kind"));
        assert!(err("relatedKinds: [Secret]").contains("relatedKinds"));
        assert!(err("parentKind: Pod").contains("parentKind"));
        assert!(err("writesPerSecond: 0").contains("writesPerSecond"));
        assert!(err("writesPerSecond: 1e-300").contains("writesPerSecond"));
        assert!(err("writesPerSecond: .inf").contains("writesPerSecond"));
        assert!(err("writeBurst: 5").contains("writeBurst"));
        assert!(err("writeBurst: 0").contains("writeBurst"));
        assert!(err("limits: {deadline: soon}").contains("limits.deadline"));
        assert!(err("limits: {deadline: 2h}").contains("limits.deadline"));
        assert!(err("limits: {memoryMiB: 100000}").contains("memoryMiB"));
        assert!(err("limits: {fuel: 0}").contains("limits.fuel"));
        assert!(err("concurrency: 0").contains("concurrency"));
        assert!(err("concurrency: 1000").contains("concurrency"));
        assert!(err("quarantineAfter: 0").contains("quarantineAfter"));
        assert!(err("quarantineInterval: 1ms").contains("quarantineInterval"));
        assert!(err("nameSpaces: [a]").contains("nameSpaces"));
        assert!(err("namespaces: 3").contains("m.yaml"));
        assert!(err("outbound: {hosts: [example.com]}").contains("outbound.hosts"));
        assert!(err("outbound: {hosts: [], timeout: 5m}").contains("outbound.timeout"));
    }

    #[test]
    fn an_outbound_section_is_a_grant_of_origins() {
        let (g, _) = parse_str(
            "outbound: {hosts: [https://fw.example.com, http://127.0.0.1:9], timeout: 300ms, maxResponseBytes: 10, maxCallsPerReconcile: 2}\n",
        )
        .unwrap();
        let o = g.outbound.expect("an outbound grant");
        let names: Vec<String> = o.origins.iter().map(ToString::to_string).collect();
        assert_eq!(names, ["http://127.0.0.1:9", "https://fw.example.com:443"]);
        assert_eq!(
            (o.timeout, o.max_response_bytes, o.max_calls),
            (Duration::from_millis(300), 10, 2)
        );
    }

    #[test]
    fn an_empty_manifest_is_the_defaults() {
        let (g, l) = parse_str("\n").unwrap();
        assert_eq!((g, l), (Grant::default(), Limits::default()));
    }
}

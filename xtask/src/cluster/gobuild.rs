//! Building the multicall Go binary `kuwa-localcluster` from
//! `xtask/localcluster/`, cached by a hash of its sources and the Go version.

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Kubernetes release the binary is built from (must match go.mod).
pub const KUBE_VERSION: &str = "v1.36.3";
/// The Go minor release known to build a working apiserver.
const GO_MINOR: &str = "go1.26";

/// `-ldflags`: strip symbols (faster link) and stamp the Kubernetes version so
/// clients do not see `v0.0.0-master`.
fn ldflags() -> String {
    let (major, minor) = {
        let mut parts = KUBE_VERSION.trim_start_matches('v').split('.');
        (
            parts.next().unwrap_or("1").to_string(),
            parts.next().unwrap_or("0").to_string(),
        )
    };
    let pkg = "k8s.io/component-base/version";
    format!(
        "-s -w -X {pkg}.gitVersion={KUBE_VERSION} -X {pkg}.gitMajor={major} -X {pkg}.gitMinor={minor} -X {pkg}.gitTreeState=clean"
    )
}

/// Environment for every `go` invocation: the local toolchain only (no
/// auto-download), pure Go, go.sum as committed.
pub fn go_env(cmd: &mut Command) {
    cmd.env("GOTOOLCHAIN", "local")
        .env("CGO_ENABLED", "0")
        .env("GOFLAGS", "-mod=readonly -buildvcs=false");
}

/// The Go source directory.
pub fn source_dir() -> PathBuf {
    crate::workspace_root().join("xtask").join("localcluster")
}

/// Hash of go.mod, go.sum, every *.go file and the build recipe.
fn source_hash(dir: &Path) -> Result<String> {
    let mut recipe = ldflags().into_bytes();
    recipe.extend_from_slice(b"\0CGO_ENABLED=0 -trimpath\0");
    go_sources_hash(dir, &recipe)
}

/// Hash of `recipe` (how the module is built) followed by the name and
/// content of go.mod, go.sum and every *.go file in `dir`: the cache key of
/// a Go build.
pub fn go_sources_hash(dir: &Path, recipe: &[u8]) -> Result<String> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            p.is_file() && (name == "go.mod" || name == "go.sum" || name.ends_with(".go"))
        })
        .collect();
    files.sort();
    let mut h = Sha256::new();
    h.update(recipe);
    for f in &files {
        h.update(
            f.file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .as_bytes(),
        );
        h.update(b"\0");
        h.update(std::fs::read(f).with_context(|| format!("reading {}", f.display()))?);
        h.update(b"\0");
    }
    Ok(hex::encode(&h.finalize()[..8]))
}

/// The `go` to use: `$KUWA_GO`, else `go` on PATH. Returns it and its version
/// word (e.g. `go1.26.8`), or `None` when there is no Go toolchain.
fn find_go() -> Result<Option<(PathBuf, String)>> {
    let go = std::env::var_os("KUWA_GO")
        .filter(|g| !g.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| "go".into());
    let mut cmd = Command::new(&go);
    cmd.arg("version");
    go_env(&mut cmd);
    let out = match cmd.output() {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("running {} version", go.display())),
    };
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "`{} version` failed: {}{}",
            go.display(),
            text.trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    // "go version go1.26.8 linux/amd64"
    let version = text
        .split_whitespace()
        .nth(2)
        .unwrap_or_default()
        .to_string();
    Ok(Some((go, version)))
}

/// Returns the path of an up-to-date `kuwa-localcluster`, building it first
/// when the cache has none for the current sources and Go version.
pub fn ensure_binary() -> Result<PathBuf> {
    let src = source_dir();
    let hash = source_hash(&src)?;
    let cache = super::state::cache_root()?.join("localcluster");
    let go = find_go()?;
    let Some((go, version)) = go else {
        // No Go toolchain: a binary built earlier from the same sources (by
        // any Go version) still does.
        if let Some(bin) = cached_any_go(&cache, &hash) {
            eprintln!(
                "note: no Go toolchain found; using the cached {}",
                bin.display()
            );
            return Ok(bin);
        }
        bail!(
            "no Go toolchain found (`go` is not on PATH): install Go 1.26.x and put it on PATH, or set KUWA_GO=/path/to/go; \
             it is needed once to build the local cluster (~7-9 min), then the binary is cached under {}",
            cache.display()
        );
    };
    if !(version == GO_MINOR || version.starts_with(&format!("{GO_MINOR}."))) {
        bail!(
            "{} is {version}, but the local cluster needs Go 1.26.x (Go 1.27 builds an apiserver whose OpenAPI is broken): \
             set KUWA_GO=/path/to/go1.26/bin/go",
            go.display()
        );
    }
    let dir = cache.join(format!("{hash}-{version}"));
    let bin = dir.join("kuwa-localcluster");
    if bin.is_file() {
        return Ok(bin);
    }
    build(&go, &version, &src, &dir, &bin)?;
    Ok(bin)
}

fn cached_any_go(cache: &Path, hash: &str) -> Option<PathBuf> {
    let prefix = format!("{hash}-");
    std::fs::read_dir(cache)
        .ok()?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .map(|e| e.path().join("kuwa-localcluster"))
        .find(|p| p.is_file())
}

fn build(go: &Path, version: &str, src: &Path, dir: &Path, bin: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    eprintln!(
        "building kuwa-localcluster (kube-apiserver, kube-controller-manager, kube-scheduler, kubectl {KUBE_VERSION}, etcd 3.6, kwok) with {version}."
    );
    eprintln!(
        "  The first build compiles Kubernetes from source: ~7-9 min on 2 cores, ~2 GB RAM. Later runs reuse\n  {} (and Go's build cache), so they start in seconds.",
        bin.display()
    );
    let started = Instant::now();
    let done = Arc::new(AtomicBool::new(false));
    let ticker = {
        let done = done.clone();
        std::thread::spawn(move || {
            let mut last = Instant::now();
            while !done.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(250));
                if last.elapsed() >= Duration::from_secs(30) {
                    last = Instant::now();
                    let s = started.elapsed().as_secs();
                    eprintln!(
                        "  still building kuwa-localcluster... {}m{:02}s",
                        s / 60,
                        s % 60
                    );
                }
            }
        })
    };
    let tmp = dir.join(format!("kuwa-localcluster.tmp.{}", std::process::id()));
    let mut cmd = Command::new(go);
    cmd.current_dir(src)
        .args(["build", "-p", "2", "-trimpath", "-ldflags"])
        .arg(ldflags())
        .arg("-o")
        .arg(&tmp)
        .arg(".");
    go_env(&mut cmd);
    // Go's own output (module downloads, errors) goes straight to our stderr.
    let status = cmd
        .stdout(std::process::Stdio::inherit())
        .stderr(std::process::Stdio::inherit())
        .status();
    done.store(true, Ordering::Relaxed);
    let _ = ticker.join();
    let status = status.with_context(|| format!("running {} build", go.display()))?;
    if !status.success() {
        let _ = std::fs::remove_file(&tmp);
        bail!(
            "go build of {} failed ({status}); see the output above",
            src.display()
        );
    }
    std::fs::rename(&tmp, bin).with_context(|| format!("installing {}", bin.display()))?;
    let s = started.elapsed().as_secs();
    eprintln!("built {} in {}m{:02}s", bin.display(), s / 60, s % 60);
    if let Some(cache) = dir.parent() {
        prune(cache, 2);
    }
    Ok(())
}

/// Keeps the `keep` most recently built binaries in the cache (each is
/// ~140 MB); older ones are removed, except those a running process (say, a
/// cluster started before the sources changed) still executes: `up` probes a
/// running cluster with its own binary and would restart it if that were gone.
fn prune(cache: &Path, keep: usize) {
    let Ok(entries) = std::fs::read_dir(cache) else {
        return;
    };
    let in_use = super::proc::executables_in_use();
    let mut dirs: Vec<(std::time::SystemTime, PathBuf)> = entries
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("kuwa-localcluster").is_file())
        .filter_map(|e| {
            Some((
                e.path()
                    .join("kuwa-localcluster")
                    .metadata()
                    .ok()?
                    .modified()
                    .ok()?,
                e.path(),
            ))
        })
        .collect();
    dirs.sort_by_key(|d| std::cmp::Reverse(d.0));
    for (_, old) in dirs.into_iter().skip(keep) {
        let bin = old.join("kuwa-localcluster");
        if in_use.contains(&std::fs::canonicalize(&bin).unwrap_or(bin)) {
            continue;
        }
        let _ = std::fs::remove_dir_all(&old);
    }
}

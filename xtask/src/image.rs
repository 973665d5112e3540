//! `cargo xtask image`: a static `kuwa` (musl) and the shipped plugins in an
//! OCI image layout, written directly (no Docker, no daemon): one gzip layer
//! holding `/kuwa`, `/plugins/*.wasm` with their grants, and the mount point
//! of the compile cache; a config running `kuwa run --plugins /plugins` as
//! user 65532. The layer is reproducible (sorted entries, fixed mtime and
//! owners), so the same sources give the same digest.
//!
//! `--inspect` then reads the layout back with `skopeo inspect` (installed
//! with apt-get when missing), the check CI runs.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use clap::Args as ClapArgs;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::{plugins, workspace_root};

/// The static target.
pub const MUSL: &str = "x86_64-unknown-linux-musl";

/// The user the image runs as (non-root, like distroless' `nonroot`).
pub const USER: u32 = 65532;

/// Arguments of `cargo xtask image`.
#[derive(ClapArgs)]
pub struct Args {
    /// Where to write the OCI image layout (default: target/image/kuwa).
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// The image's tag in the layout (default: the crate version).
    #[arg(long, value_name = "TAG")]
    pub tag: Option<String>,
    /// Read the layout back with `skopeo inspect` (installs skopeo with apt-get
    /// if it is missing) and print what it says.
    #[arg(long)]
    pub inspect: bool,
}

/// What was built.
pub struct Image {
    /// The layout directory.
    pub dir: PathBuf,
    /// The tag.
    pub tag: String,
    /// The manifest's digest.
    pub digest: String,
}

/// Builds the image.
pub fn run(args: &Args) -> Result<()> {
    let image = build(args)?;
    println!(
        "image layout: {} (tag {}, manifest {})",
        image.dir.display(),
        image.tag,
        image.digest
    );
    println!(
        "push it with: skopeo copy oci:{}:{} docker://REGISTRY/kuwa:{}",
        image.dir.display(),
        image.tag,
        image.tag
    );
    if args.inspect {
        let out = inspect(&image)?;
        println!("{out}");
    }
    Ok(())
}

fn version() -> String {
    env!("CARGO_PKG_VERSION").to_owned()
}

/// Builds the static binary, the plugins and the layout.
pub fn build(args: &Args) -> Result<Image> {
    let tag = args.tag.clone().unwrap_or_else(version);
    if tag.is_empty()
        || tag.len() > 128
        || !tag
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
    {
        bail!("--tag {tag:?} is not a valid image tag ([A-Za-z0-9_.-], at most 128)");
    }
    let dir = args
        .out
        .clone()
        .unwrap_or_else(|| plugins::target_dir().join("image").join("kuwa"));
    eprintln!("==> building a static kuwa ({MUSL}, release)");
    let binary = build_static()?;
    check_static(&binary)?;
    eprintln!("==> building the plugins");
    let components = plugins::run(&plugins::Args::default())?;
    eprintln!("==> writing the OCI image layout to {}", dir.display());
    let mut files: Vec<(String, PathBuf, u32)> = vec![("kuwa".into(), binary.clone(), 0o755)];
    for wasm in &components {
        let name = wasm.file_name().unwrap().to_string_lossy().into_owned();
        files.push((format!("plugins/{name}"), wasm.clone(), 0o644));
        let grant = wasm.with_extension("yaml");
        if grant.is_file() {
            let name = grant.file_name().unwrap().to_string_lossy().into_owned();
            files.push((format!("plugins/{name}"), grant, 0o644));
        }
    }
    let digest = write_layout(&dir, &tag, &files)?;
    let size = std::fs::metadata(&binary)?.len();
    eprintln!(
        "    /kuwa {:.1} MiB (static), {} plugins",
        size as f64 / (1 << 20) as f64,
        components.len()
    );
    Ok(Image { dir, tag, digest })
}

/// A C compiler for the musl target's C dependencies (ring): the musl
/// wrapper when installed, else the system gcc (ring's C needs no libc
/// headers beyond the compiler's own).
fn musl_cc() -> Option<String> {
    let var = format!("CC_{}", MUSL.replace('-', "_"));
    if std::env::var_os(&var).is_some() {
        return None;
    }
    let on_path = |tool: &str| {
        Command::new(tool)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    ["x86_64-linux-musl-gcc", "musl-gcc", "gcc"]
        .into_iter()
        .find(|t| on_path(t))
        .map(str::to_owned)
}

fn build_static() -> Result<PathBuf> {
    plugins::ensure_target(MUSL)?;
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace_root()).args([
        "build",
        "--release",
        "--target",
        MUSL,
        "-p",
        "kuwa-host",
        "--bin",
        "kuwa",
    ]);
    if let Some(cc) = musl_cc() {
        cmd.env(format!("CC_{}", MUSL.replace('-', "_")), cc);
    }
    let status = cmd.status().context("running cargo build")?;
    if !status.success() {
        bail!("building the static kuwa failed");
    }
    Ok(plugins::target_dir()
        .join(MUSL)
        .join("release")
        .join("kuwa"))
}

/// Fails unless `path` is an x86-64 ELF executable with no program
/// interpreter and no shared-library dependencies: nothing to load at run
/// time, so it runs on an empty root filesystem.
pub fn check_static(path: &Path) -> Result<()> {
    let elf = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    match elf_dependencies(&elf) {
        Ok(deps) if deps.is_empty() => Ok(()),
        Ok(deps) => bail!(
            "{} is not statically linked: it needs {}",
            path.display(),
            deps.join(", ")
        ),
        Err(e) => bail!("{}: {e}", path.display()),
    }
}

/// What an ELF64 little-endian file needs at run time: its interpreter
/// (`PT_INTERP`) and its `DT_NEEDED` libraries, by offset into the string
/// table (names are not needed to fail).
pub fn elf_dependencies(elf: &[u8]) -> Result<Vec<String>, String> {
    let u16_at = |o: usize| elf.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u32_at = |o: usize| {
        elf.get(o..o + 4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
    };
    let u64_at = |o: usize| {
        elf.get(o..o + 8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap()))
    };
    if elf.get(..4) != Some(b"\x7fELF") || elf.get(4) != Some(&2) || elf.get(5) != Some(&1) {
        return Err("not a 64-bit little-endian ELF file".into());
    }
    let bad = || "truncated ELF header".to_owned();
    let phoff = u64_at(0x20).ok_or_else(bad)? as usize;
    let phentsize = u16_at(0x36).ok_or_else(bad)? as usize;
    let phnum = u16_at(0x38).ok_or_else(bad)? as usize;
    let mut deps = Vec::new();
    for i in 0..phnum {
        let ph = phoff + i * phentsize;
        let kind = u32_at(ph).ok_or_else(bad)?;
        let offset = u64_at(ph + 8).ok_or_else(bad)? as usize;
        let size = u64_at(ph + 32).ok_or_else(bad)? as usize;
        match kind {
            // PT_INTERP: the dynamic loader's path.
            3 => {
                let path = elf.get(offset..offset + size).ok_or_else(bad)?;
                deps.push(
                    String::from_utf8_lossy(path)
                        .trim_end_matches('\0')
                        .to_owned(),
                );
            }
            // PT_DYNAMIC: DT_NEEDED entries (tag 1), 16 bytes each, ended by DT_NULL.
            2 => {
                for entry in (offset..offset + size).step_by(16) {
                    match u64_at(entry).ok_or_else(bad)? {
                        0 => break,
                        1 => deps.push(format!(
                            "a shared library (DT_NEEDED at string {})",
                            u64_at(entry + 8).ok_or_else(bad)?
                        )),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Ok(deps)
}

fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// The layer: a reproducible tar of `files` (path in the image, source,
/// mode) plus the directories the image needs.
fn layer(files: &[(String, PathBuf, u32)], mtime: u64) -> Result<Vec<u8>> {
    let mut tar = tar::Builder::new(Vec::new());
    let header = |kind: tar::EntryType, mode: u32, size: u64, uid: u32| {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(size);
        h.set_mtime(mtime);
        h.set_uid(u64::from(uid));
        h.set_gid(u64::from(uid));
        h
    };
    let dirs = [
        ("plugins/", 0o755, 0),
        ("tmp/", 0o1777, 0),
        ("var/", 0o755, 0),
        ("var/cache/", 0o755, 0),
        ("var/cache/kuwa/", 0o700, USER),
    ];
    for (path, mode, uid) in dirs {
        let mut h = header(tar::EntryType::Directory, mode, 0, uid);
        tar.append_data(&mut h, path, std::io::empty())?;
    }
    let mut files = files.to_vec();
    files.sort();
    for (path, source, mode) in &files {
        let bytes =
            std::fs::read(source).with_context(|| format!("reading {}", source.display()))?;
        let mut h = header(tar::EntryType::Regular, *mode, bytes.len() as u64, 0);
        tar.append_data(&mut h, path, bytes.as_slice())?;
    }
    Ok(tar.into_inner()?)
}

fn write_blob(dir: &Path, bytes: &[u8]) -> Result<(String, u64)> {
    let digest = sha256(bytes);
    let path = dir
        .join("blobs/sha256")
        .join(digest.trim_start_matches("sha256:"));
    std::fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))?;
    Ok((digest, bytes.len() as u64))
}

/// Writes the layout; returns the manifest's digest. An existing directory
/// is replaced only if it is an image layout (or empty).
fn write_layout(dir: &Path, tag: &str, files: &[(String, PathBuf, u32)]) -> Result<String> {
    if dir.exists() {
        let empty = std::fs::read_dir(dir)?.next().is_none();
        if !empty && !dir.join("oci-layout").is_file() {
            bail!(
                "{} exists and is not an OCI image layout; not overwriting it",
                dir.display()
            );
        }
        std::fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    std::fs::create_dir_all(dir.join("blobs/sha256"))
        .with_context(|| format!("creating {}", dir.display()))?;
    // SOURCE_DATE_EPOCH, when set, dates the entries (reproducible builds).
    let mtime = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let tar = layer(files, mtime)?;
    let diff_id = sha256(&tar);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&tar)?;
    let (layer_digest, layer_size) = write_blob(dir, &gz.finish()?)?;
    let version = version();
    let config = json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "User": format!("{USER}:{USER}"),
            "Entrypoint": ["/kuwa"],
            "Cmd": ["run", "--plugins", "/plugins"],
            "Env": ["KUWA_COMPILE_CACHE=/var/cache/kuwa/compiled"],
            "ExposedPorts": {"9464/tcp": {}},
            "WorkingDir": "/",
            "Labels": labels(&version),
        },
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created_by": "cargo xtask image"}],
    });
    let (config_digest, config_size) = write_blob(dir, &serde_json::to_vec(&config)?)?;
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest,
            "size": config_size,
        },
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": layer_digest,
            "size": layer_size,
        }],
        "annotations": labels(&version),
    });
    let (manifest_digest, manifest_size) = write_blob(dir, &serde_json::to_vec(&manifest)?)?;
    let index = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest,
            "size": manifest_size,
            "platform": {"architecture": "amd64", "os": "linux"},
            "annotations": {"org.opencontainers.image.ref.name": tag},
        }],
    });
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&index)?)?;
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    Ok(manifest_digest)
}

fn labels(version: &str) -> Value {
    json!({
        "org.opencontainers.image.title": "kuwa",
        "org.opencontainers.image.description": "A Kubernetes controller host whose reconcile logic runs as WebAssembly components",
        "org.opencontainers.image.version": version,
        "org.opencontainers.image.licenses": env!("CARGO_PKG_LICENSE"),
    })
}

/// Installs Debian's `package` with apt-get unless `binary` runs (`binary
/// --version`, or the file exists when `probe` is false).
pub fn ensure_debian_package(binary: &str, package: &str, why: &str) -> Result<()> {
    let present = Path::new(binary).is_file()
        || Command::new(binary)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
    if present {
        return Ok(());
    }
    eprintln!("==> installing {package} (Debian package) with apt-get: {why}");
    for args in [
        &["update"][..],
        &["install", "-y", "--no-install-recommends", package],
    ] {
        let status = Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(std::process::Stdio::null())
            .status()
            .with_context(|| format!("running apt-get ({why})"))?;
        if !status.success() {
            bail!(
                "`apt-get {}` failed; install {package} by hand",
                args.join(" ")
            );
        }
    }
    Ok(())
}

/// `skopeo inspect` of the layout: the image as a registry client sees it.
pub fn inspect(image: &Image) -> Result<String> {
    ensure_debian_package("skopeo", "skopeo", "skopeo inspects the image")?;
    let reference = format!("oci:{}:{}", image.dir.display(), image.tag);
    let out = Command::new("skopeo")
        .args(["inspect", &reference])
        .output()
        .context("running skopeo")?;
    if !out.status.success() {
        bail!(
            "skopeo inspect {reference} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dynamic_executable_is_not_static() {
        // The running test binary is linked against the system's libc.
        let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        let deps = elf_dependencies(&me).unwrap();
        assert!(!deps.is_empty(), "the test binary is dynamic");
        assert!(elf_dependencies(b"#!/bin/sh\n").is_err());
    }

    #[test]
    fn the_layer_is_reproducible() {
        let dir = std::env::temp_dir().join(format!("kuwa-layer-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("a.wasm");
        std::fs::write(&f, b"\0asm").unwrap();
        let files = vec![("plugins/a.wasm".to_owned(), f, 0o644)];
        let one = layer(&files, 0).unwrap();
        let two = layer(&files, 0).unwrap();
        assert_eq!(sha256(&one), sha256(&two));
        let mut entries = tar::Archive::new(one.as_slice());
        let paths: Vec<String> = entries
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().to_string_lossy().into_owned())
            .collect();
        assert!(paths.contains(&"plugins/a.wasm".to_owned()), "{paths:?}");
        assert!(paths.contains(&"var/cache/kuwa/".to_owned()), "{paths:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

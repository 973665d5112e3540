//! `cargo xtask plugins`: builds every plugin crate for `wasm32-wasip2` in
//! release mode and copies the components to `target/plugins/<name>.wasm`
//! (and the misbehaving test plugins of `tests/plugins/` to
//! `target/test-plugins/`), each with its grant: the crate's
//! `manifest.yaml` becomes `<name>.yaml` beside the component.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use clap::Args as ClapArgs;

use crate::workspace_root;

/// The component target.
pub const TARGET: &str = "wasm32-wasip2";

/// Arguments of `cargo xtask plugins`.
#[derive(ClapArgs, Default)]
pub struct Args {
    /// Also build the test plugins in tests/plugins/ (into target/test-plugins/).
    #[arg(long)]
    pub with_test_plugins: bool,
}

/// The cargo target dir (honours `CARGO_TARGET_DIR`).
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| workspace_root().join("target"), PathBuf::from)
}

/// Where the shipped plugins land.
pub fn plugins_dir() -> PathBuf {
    target_dir().join("plugins")
}

/// Where the test plugins land.
pub fn test_plugins_dir() -> PathBuf {
    target_dir().join("test-plugins")
}

/// Adds the Rust `target` with rustup unless it is installed.
pub fn ensure_target(target: &str) -> Result<()> {
    let installed = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .context("running rustup (is rustup installed?)")?;
    if String::from_utf8_lossy(&installed.stdout)
        .lines()
        .any(|l| l.trim() == target)
    {
        return Ok(());
    }
    eprintln!("adding the {target} target with rustup...");
    let status = Command::new("rustup")
        .args(["target", "add", target])
        .status()
        .context("running rustup")?;
    if !status.success() {
        bail!("`rustup target add {target}` failed");
    }
    Ok(())
}

/// A plugin crate: its folder name (the component's name), its folder
/// relative to the workspace root, and its package name.
struct Crate {
    name: String,
    dir: PathBuf,
    package: String,
}

fn crates_in(dir: &Path) -> Result<Vec<Crate>> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(out);
    };
    for entry in entries.filter_map(Result::ok) {
        let manifest = entry.path().join("Cargo.toml");
        let Ok(text) = std::fs::read_to_string(&manifest) else {
            continue;
        };
        let package = text
            .lines()
            .find_map(|l| {
                l.trim()
                    .strip_prefix("name = ")
                    .map(|v| v.trim_matches('"').to_owned())
            })
            .with_context(|| format!("{} has no package name", manifest.display()))?;
        out.push(Crate {
            name: entry.file_name().to_string_lossy().into_owned(),
            dir: entry.path(),
            package,
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

fn build(crates: &[Crate], out_dir: &Path) -> Result<Vec<PathBuf>> {
    if crates.is_empty() {
        return Ok(Vec::new());
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace_root())
        .args(["build", "--release", "--target", TARGET]);
    for c in crates {
        cmd.args(["-p", &c.package]);
    }
    let status = cmd.status().context("running cargo build")?;
    if !status.success() {
        bail!("building the plugins failed");
    }
    std::fs::create_dir_all(out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let built = target_dir().join(TARGET).join("release");
    let mut out = Vec::new();
    for c in crates {
        let from = built.join(format!("{}.wasm", c.package.replace('-', "_")));
        let to = out_dir.join(format!("{}.wasm", c.name));
        // Write then rename, so a host watching the directory never sees a
        // half-written component.
        let tmp = out_dir.join(format!(".{}.wasm.tmp", c.name));
        std::fs::copy(&from, &tmp).with_context(|| format!("copying {}", from.display()))?;
        std::fs::rename(&tmp, &to).with_context(|| format!("writing {}", to.display()))?;
        let size = std::fs::metadata(&to).map(|m| m.len()).unwrap_or(0);
        eprintln!("  {} ({} KiB)", to.display(), size / 1024);
        // The plugin's grant travels with it: `<crate>/manifest.yaml`
        // becomes `<name>.yaml` beside the component (or none is left).
        let manifest = workspace_root().join(&c.dir).join("manifest.yaml");
        let grant = out_dir.join(format!("{}.yaml", c.name));
        if manifest.is_file() {
            std::fs::copy(&manifest, &grant)
                .with_context(|| format!("copying {}", manifest.display()))?;
        } else if grant.exists() {
            std::fs::remove_file(&grant)
                .with_context(|| format!("removing {}", grant.display()))?;
        }
        out.push(to);
    }
    Ok(out)
}

/// Builds the plugins; returns the component paths.
pub fn run(args: &Args) -> Result<Vec<PathBuf>> {
    ensure_target(TARGET)?;
    let root = workspace_root();
    let mut built = build(&crates_in(&root.join("plugins"))?, &plugins_dir())?;
    if args.with_test_plugins {
        built.extend(build(
            &crates_in(&root.join("tests/plugins"))?,
            &test_plugins_dir(),
        )?);
    }
    Ok(built)
}

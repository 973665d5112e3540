//! The precompiled-component cache on a real plugin: compiled once per
//! process and once per cache directory; a damaged entry is recompiled.
//!
//! Needs `target/plugins/webserver.wasm` (`cargo xtask plugins`).

use std::path::{Path, PathBuf};

use kuwa_host::plugin::loader::load_file;
use kuwa_host::plugin::runtime::{CacheOutcome, LoadedPlugin, Runtime};
use kuwa_host::tenant::limits::Limits;

fn webserver() -> PathBuf {
    let dir = std::env::var_os("KUWA_PLUGINS_DIR").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/plugins"),
        PathBuf::from,
    );
    let path = dir.join("webserver.wasm");
    assert!(
        path.is_file(),
        "{} is missing: run `cargo xtask plugins` first",
        path.display()
    );
    path
}

fn cache_entries(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for engine_dir in std::fs::read_dir(root).unwrap().flatten() {
        for entry in std::fs::read_dir(engine_dir.path()).unwrap().flatten() {
            out.push(entry.path());
        }
    }
    out
}

/// Loads `path` in a new runtime (as a new host process would) using the
/// compile cache in `cache`.
async fn load_in_fresh_process(cache: &Path, path: &Path) -> LoadedPlugin {
    load_file(&Runtime::new(Some(cache)).unwrap(), path, Limits::default())
        .await
        .unwrap()
}

#[tokio::test]
async fn components_are_compiled_once_and_reused_from_disk() {
    let cache = tempfile::tempdir().unwrap();
    let path = webserver();

    let runtime = Runtime::new(Some(cache.path())).unwrap();
    let first = load_file(&runtime, &path, Limits::default()).await.unwrap();
    assert_eq!(first.cache, CacheOutcome::Compiled);
    // The same file again in the same process: not even read from disk.
    let again = load_file(&runtime, &path, Limits::default()).await.unwrap();
    assert_eq!(again.cache, CacheOutcome::Memory);
    assert_eq!(again.sha256, first.sha256);
    assert_eq!(runtime.compiled_components(), 1);
    // Once no loaded version uses the component, it leaves memory.
    drop((first, again));
    assert_eq!(runtime.compiled_components(), 0);
    let first = load_file(&runtime, &path, Limits::default()).await.unwrap();
    assert_eq!(
        first.cache,
        CacheOutcome::Disk,
        "evicted, so read back from disk"
    );

    // A new process (runtime) with the same cache directory reads the artifact.
    let entries = cache_entries(cache.path());
    assert_eq!(entries.len(), 1, "{entries:?}");
    assert!(
        entries[0]
            .to_string_lossy()
            .ends_with(&format!("{}.cwasm", first.sha256))
    );
    let warm = load_in_fresh_process(cache.path(), &path).await;
    assert_eq!(warm.cache, CacheOutcome::Disk);
    assert_eq!(warm.info.name, first.info.name);
}

#[tokio::test]
async fn a_damaged_cache_entry_is_recompiled() {
    let cache = tempfile::tempdir().unwrap();
    let path = webserver();
    load_in_fresh_process(cache.path(), &path).await;
    let entry = cache_entries(cache.path()).pop().unwrap();
    std::fs::write(&entry, b"not a compiled component").unwrap();

    let reloaded = load_in_fresh_process(cache.path(), &path).await;
    assert_eq!(
        reloaded.cache,
        CacheOutcome::Compiled,
        "a bad entry must not be trusted"
    );
    // ...and the entry was rewritten with a good artifact.
    let warm = load_in_fresh_process(cache.path(), &path).await;
    assert_eq!(warm.cache, CacheOutcome::Disk);
}

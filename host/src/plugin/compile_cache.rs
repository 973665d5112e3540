//! The on-disk cache of precompiled components (DESIGN §3, "Compile once").
//!
//! One file per component, named by the component's SHA-256, in a directory
//! named by the engine's compatibility hash, so an engine upgrade or other
//! settings never read another engine's artifacts. Reading an artifact runs
//! native code from it, so the cache is used only when its directories belong
//! to the user running the host and nobody else can write to them; otherwise
//! the host compiles every start (and says why).

use std::path::{Path, PathBuf};

use wasmtime::Engine;
use wasmtime::component::Component;

/// Why the compile cache cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CacheDirError {
    /// The directory could not be created or inspected.
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
    /// The directory belongs to another user: its artifacts are not ours.
    #[error("{path} belongs to uid {owner}, not to this host's uid {me}")]
    NotOurs {
        /// The directory.
        path: PathBuf,
        /// Its owner.
        owner: u32,
        /// The host's effective uid.
        me: u32,
    },
    /// Others (group or world) may write into the directory, so an artifact
    /// could be planted there.
    #[error("{path} is writable by group or others (mode {mode:o}); run `chmod go-w` on it")]
    Writable {
        /// The directory.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
}

/// The on-disk cache of precompiled components.
pub struct CompileCache {
    dir: PathBuf,
}

/// Checks that `dir` is the host user's and not writable by anyone else.
fn check_private(dir: &Path) -> Result<(), CacheDirError> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(dir).map_err(|e| CacheDirError::Io(dir.to_owned(), e))?;
    let me = rustix::process::geteuid().as_raw();
    if meta.uid() != me {
        return Err(CacheDirError::NotOurs {
            path: dir.to_owned(),
            owner: meta.uid(),
            me,
        });
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(CacheDirError::Writable {
            path: dir.to_owned(),
            mode,
        });
    }
    Ok(())
}

fn create_private(dir: &Path) -> Result<(), CacheDirError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| CacheDirError::Io(dir.to_owned(), e))
}

impl CompileCache {
    /// A cache under `root` for `engine`. Refused when `root` or the engine's
    /// directory below it belongs to someone else or is writable by others.
    pub fn new(root: &Path, engine: &Engine) -> Result<Self, CacheDirError> {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        let dir = root.join(format!("engine-{:016x}", hasher.finish()));
        create_private(&dir)?;
        check_private(root)?;
        check_private(&dir)?;
        Ok(Self { dir })
    }

    fn path(&self, sha256: &str) -> PathBuf {
        self.dir.join(format!("{sha256}.cwasm"))
    }

    /// Reads a precompiled component, if this cache has one for `sha256`.
    #[allow(unsafe_code)]
    pub fn read(&self, engine: &Engine, sha256: &str) -> Option<Component> {
        let path = self.path(sha256);
        if !path.is_file() {
            return None;
        }
        // SAFETY: `Component::deserialize_file` trusts its input to be an
        // artifact this engine produced. These bytes are: `CompileCache::new`
        // refused the directory unless it belongs to the host's own user and
        // nobody else can write to it, so only this host writes into it; each
        // file is written by `Component::serialize` of this very engine
        // configuration (the directory is keyed by the engine's
        // precompile-compatibility hash) and named by the SHA-256 of the
        // component it came from, and it is written to a temporary name and
        // renamed, so a partial write is never read. Wasmtime additionally
        // checks the artifact header against the engine and refuses a
        // mismatch.
        match unsafe { Component::deserialize_file(engine, &path) } {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "unusable compile-cache entry; recompiling");
                let _ = std::fs::remove_file(&path);
                None
            }
        }
    }

    /// Stores the compiled form of the component `sha256`.
    pub fn write(&self, sha256: &str, component: &Component) {
        let path = self.path(sha256);
        let tmp = self
            .dir
            .join(format!(".{sha256}.{}.tmp", std::process::id()));
        let result = component
            .serialize()
            .map_err(|e| std::io::Error::other(format!("{e:#}")))
            .and_then(|bytes| std::fs::write(&tmp, bytes))
            .and_then(|()| std::fs::rename(&tmp, &path));
        if let Err(e) = result {
            let _ = std::fs::remove_file(&tmp);
            tracing::warn!(path = %path.display(), error = %e, "could not write the compile cache");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn a_directory_others_can_write_is_refused() {
        let root = tempfile::tempdir().unwrap();
        let engine = Engine::default();
        assert!(CompileCache::new(root.path(), &engine).is_ok());
        std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = CompileCache::new(root.path(), &engine)
            .err()
            .expect("a world-writable cache root must be refused");
        assert!(matches!(err, CacheDirError::Writable { .. }), "{err}");
        assert!(err.to_string().contains("chmod go-w"), "{err}");
        std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(CompileCache::new(root.path(), &engine).is_ok());
    }
}

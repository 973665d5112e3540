//! Loading plugins from a directory: a plugin file with its manifest
//! becomes a [`LoadedPlugin`] whose `describe` fits its grant.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::plugin::runtime::{LoadError, LoadedPlugin, Runtime};
use crate::tenant::grant::GrantError;
use crate::tenant::limits::Limits;

/// Why a plugins directory could not be read.
#[derive(Debug, thiserror::Error)]
pub enum DirError {
    /// The directory is missing or unreadable.
    #[error("cannot read plugins directory {path}: {source}")]
    Read {
        /// The directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

/// The `.wasm` files in `dir`, sorted by name.
pub fn wasm_files(dir: &Path) -> Result<Vec<PathBuf>, DirError> {
    let read = std::fs::read_dir(dir).map_err(|source| DirError::Read {
        path: dir.to_owned(),
        source,
    })?;
    let mut files: Vec<PathBuf> = read
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "wasm") && p.is_file())
        .collect();
    files.sort();
    Ok(files)
}

/// Why one plugin file could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// The file could not be read.
    #[error("cannot read {0}: {1}")]
    Read(PathBuf, std::io::Error),
    /// It is not a usable plugin.
    #[error("{0}: {1}")]
    Load(PathBuf, LoadError),
    /// Its manifest is unusable.
    #[error(transparent)]
    Manifest(#[from] crate::tenant::grant::ManifestError),
    /// What it describes does not fit its grant.
    #[error("{0}: {1}")]
    Grant(PathBuf, GrantError),
}

impl FileError {
    /// One word for metrics: read, manifest, grant, compile, link or
    /// describe.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Read(..) => "read",
            Self::Manifest(_) => "manifest",
            Self::Grant(..) => "grant",
            Self::Load(_, LoadError::Compile(_)) => "compile",
            Self::Load(_, LoadError::Link(_)) => "link",
            Self::Load(_, LoadError::Describe(_) | LoadError::Call(_)) => "describe",
        }
    }
}

/// Compiles and describes one plugin file, with the grant and limits of its
/// manifest (`<stem>.yaml`, optional) over the host-wide `defaults`, and
/// checks what it describes against the grant (parent kind, related kinds).
pub async fn load_file(
    runtime: &Runtime,
    path: &Path,
    defaults: Limits,
) -> Result<LoadedPlugin, FileError> {
    load_file_granted(runtime, path, None, defaults).await
}

/// Like [`load_file`], with the grant of `manifest` instead of the one
/// beside the component, when given (`kuwa plugin test --manifest`).
pub async fn load_file_granted(
    runtime: &Runtime,
    path: &Path,
    manifest: Option<&Path>,
    defaults: Limits,
) -> Result<LoadedPlugin, FileError> {
    let (grant, limits) = match manifest {
        None => crate::tenant::grant::load(path, defaults)?,
        Some(m) => {
            let text = std::fs::read_to_string(m)
                .map_err(|e| crate::tenant::grant::ManifestError::Read(m.to_owned(), e))?;
            crate::tenant::grant::parse(m, &text, defaults)?
        }
    };
    let bytes = std::fs::read(path).map_err(|e| FileError::Read(path.to_owned(), e))?;
    let mut plugin = runtime
        .load(bytes, limits)
        .await
        .map_err(|e| FileError::Load(path.to_owned(), e))?;
    let info = &plugin.info;
    let related: Vec<_> = info.related.iter().map(|(g, _)| g.clone()).collect();
    grant
        .check(&info.parent, info.crd.is_some(), &related)
        .map_err(|e| FileError::Grant(path.to_owned(), e))?;
    plugin.grant = grant;
    Ok(plugin)
}

/// Loads every plugin in `dir`. A file that fails is reported, never fatal
/// to the others.
pub async fn load_dir(
    runtime: &Runtime,
    dir: &Path,
    limits: Limits,
) -> Result<Vec<Result<Arc<LoadedPlugin>, FileError>>, DirError> {
    let mut out = Vec::new();
    for path in wasm_files(dir)? {
        out.push(load_file(runtime, &path, limits).await.map(Arc::new));
    }
    Ok(out)
}

//! Loading plugins from a directory and installing the CRDs they carry.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Client;
use kube::api::{Api, Patch, PatchParams};
use serde_json::Value;

use crate::runtime::{Limits, LoadError, LoadedPlugin, Runtime};

/// How long `--install-crds` waits for a CRD to be Established.
pub const CRD_ESTABLISH_TIMEOUT: Duration = Duration::from_secs(60);

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
    Manifest(#[from] crate::grant::ManifestError),
}

impl FileError {
    /// One word for metrics: read, manifest, compile, link or describe.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Read(..) => "read",
            Self::Manifest(_) => "manifest",
            Self::Load(_, LoadError::Compile(_)) => "compile",
            Self::Load(_, LoadError::Link(_)) => "link",
            Self::Load(_, LoadError::Describe(_) | LoadError::Call(_)) => "describe",
        }
    }
}

/// Compiles and describes one plugin file (blocking: compiling takes time),
/// with the grant and limits of its manifest (`<stem>.yaml`, optional) over
/// the host-wide `defaults`.
pub fn load_file(
    runtime: &Runtime,
    path: &Path,
    defaults: Limits,
) -> Result<LoadedPlugin, FileError> {
    let (grant, limits) = crate::grant::load(path, defaults)?;
    let bytes = std::fs::read(path).map_err(|e| FileError::Read(path.to_owned(), e))?;
    let mut plugin = runtime
        .load(&bytes, limits)
        .map_err(|e| FileError::Load(path.to_owned(), e))?;
    plugin.grant = grant;
    Ok(plugin)
}

/// Compiles every plugin in `dir` off the async executor. A file that fails
/// is reported, never fatal to the others.
pub async fn load_dir(
    runtime: &Runtime,
    dir: &Path,
    limits: Limits,
) -> Result<Vec<Result<Arc<LoadedPlugin>, FileError>>, DirError> {
    let mut out = Vec::new();
    for path in wasm_files(dir)? {
        let runtime = runtime.clone();
        let result =
            tokio::task::spawn_blocking(move || load_file(&runtime, &path, limits).map(Arc::new))
                .await
                .unwrap_or_else(|e| panic!("plugin loader thread panicked: {e}"));
        out.push(result);
    }
    Ok(out)
}

/// Why a CRD could not be installed.
#[derive(Debug, thiserror::Error)]
pub enum CrdError {
    /// The carried CRD does not parse as a CustomResourceDefinition.
    #[error("the carried CRD is malformed: {0}")]
    Malformed(serde_json::Error),
    /// The API server refused it.
    #[error("applying CRD {name}: {source}")]
    Apply {
        /// CRD name.
        name: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// It did not become Established in time.
    #[error("CRD {0} was not Established within {CRD_ESTABLISH_TIMEOUT:?}")]
    NotEstablished(String),
}

/// Applies a plugin's CRD (field manager `kuwa`) and waits until it is
/// Established.
pub async fn install_crd(client: &Client, crd: &Value) -> Result<String, CrdError> {
    let parsed: CustomResourceDefinition =
        serde_json::from_value(crd.clone()).map_err(CrdError::Malformed)?;
    let name = parsed.metadata.name.clone().unwrap_or_default();
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    api.patch(
        &name,
        &PatchParams::apply("kuwa").force(),
        &Patch::Apply(&parsed),
    )
    .await
    .map_err(|source| CrdError::Apply {
        name: name.clone(),
        source,
    })?;
    let deadline = tokio::time::Instant::now() + CRD_ESTABLISH_TIMEOUT;
    loop {
        if let Ok(current) = api.get(&name).await {
            let established = current.status.and_then(|s| s.conditions).is_some_and(|cs| {
                cs.iter()
                    .any(|c| c.type_ == "Established" && c.status == "True")
            });
            if established {
                return Ok(name);
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(CrdError::NotEstablished(name));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

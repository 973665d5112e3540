//! Plugins as OCI artifacts: the CNCF wasm artifact layout (config
//! `application/vnd.wasm.config.v0+json`, one `application/wasm` layer),
//! pulled and pushed with `oci-client`, stored by digest.
//!
//! A source is `oci://REGISTRY/REPOSITORY:TAG` or
//! `oci://REGISTRY/REPOSITORY@sha256:DIGEST`. A pulled component is kept as
//! `<store>/sha256/<manifest digest>.wasm` (the layer's bytes, checked against
//! the layer digest its manifest names), so a restart pulls nothing: a
//! digest source is read from the store without a request, a tag source
//! costs one `HEAD` of its manifest to learn which digest the tag names now.
//! Registries on loopback are spoken to over plain HTTP; every other over
//! HTTPS.

use std::path::{Path, PathBuf};

use oci_client::client::{ClientConfig, ClientProtocol, Config, ImageLayer};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use sha2::{Digest, Sha256};

/// The artifact's config media type (CNCF wasm OCI artifact layout).
pub const CONFIG_MEDIA_TYPE: &str = "application/vnd.wasm.config.v0+json";
/// The component layer's media type.
pub const LAYER_MEDIA_TYPE: &str = "application/wasm";
/// Layer media types accepted on pull (the older wasm-to-oci one too).
pub const ACCEPTED_LAYERS: &[&str] = &[
    LAYER_MEDIA_TYPE,
    oci_client::manifest::WASM_LAYER_MEDIA_TYPE,
];
/// The largest component pulled (the host refuses bigger ones).
pub const MAX_COMPONENT_BYTES: usize = 64 << 20;

/// Why a source could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The source is not `oci://...` with a tag or digest.
    #[error(
        "source {0:?} is not oci://REGISTRY/REPOSITORY:TAG or oci://REGISTRY/REPOSITORY@sha256:DIGEST"
    )]
    BadSource(String),
    /// The registry could not be reached or refused.
    #[error("registry: {0}")]
    Registry(String),
    /// The artifact is not one component.
    #[error("{0}")]
    NotAComponent(String),
    /// The store could not be read or written.
    #[error("digest store {0}: {1}")]
    Store(PathBuf, std::io::Error),
}

impl SourceError {
    /// One word for status and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::BadSource(_) => "BadSource",
            Self::Registry(_) => "PullFailed",
            Self::NotAComponent(_) => "NotAComponent",
            Self::Store(..) => "StoreFailed",
        }
    }
}

/// A parsed `oci://` source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    reference: Reference,
}

impl Source {
    /// Parses `oci://...`; a reference needs an explicit registry and a tag
    /// or digest (no implicit `latest`).
    pub fn parse(text: &str) -> Result<Self, SourceError> {
        let bad = || SourceError::BadSource(text.to_owned());
        let rest = text.strip_prefix("oci://").ok_or_else(bad)?;
        let first = rest.split('/').next().unwrap_or_default();
        if !rest.contains('/')
            || !(first.contains('.') || first.contains(':') || first == "localhost")
        {
            return Err(bad());
        }
        let last = rest.rsplit('/').next().unwrap_or_default();
        if !last.contains(':') && !last.contains('@') {
            return Err(bad());
        }
        let reference: Reference = rest.parse().map_err(|_| bad())?;
        if let Some(d) = reference.digest()
            && !is_sha256(d)
        {
            return Err(bad());
        }
        Ok(Self { reference })
    }

    /// The digest the source names, if it names one.
    pub fn digest(&self) -> Option<&str> {
        self.reference.digest()
    }

    /// `registry/repository[:tag][@digest]`.
    pub fn whole(&self) -> String {
        self.reference.whole()
    }

    fn client(&self) -> Client {
        let registry = self.reference.resolve_registry().to_owned();
        let host = registry
            .rsplit_once(':')
            .map_or(registry.as_str(), |(h, _)| h);
        let loopback = matches!(host, "localhost" | "127.0.0.1" | "[::1]");
        Client::new(ClientConfig {
            protocol: if loopback {
                ClientProtocol::HttpsExcept(vec![registry])
            } else {
                ClientProtocol::Https
            },
            ..ClientConfig::default()
        })
    }
}

fn is_sha256(digest: &str) -> bool {
    digest.strip_prefix("sha256:").is_some_and(|h| {
        h.len() == 64
            && h.bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    })
}

/// Components stored by manifest digest.
#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
}

/// A component read from a source.
#[derive(Debug)]
pub struct Fetched {
    /// The manifest's digest.
    pub digest: String,
    /// The component.
    pub bytes: Vec<u8>,
    /// Whether it came over the network (false: from the store).
    pub pulled: bool,
}

impl Store {
    /// A store in `dir` (created, mode 0700).
    pub fn new(dir: &Path) -> Result<Self, SourceError> {
        use std::os::unix::fs::DirBuilderExt;
        let dir = dir.join("sha256");
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|e| SourceError::Store(dir.clone(), e))?;
        Ok(Self { dir })
    }

    fn path(&self, digest: &str) -> PathBuf {
        self.dir
            .join(format!("{}.wasm", digest.trim_start_matches("sha256:")))
    }

    fn read(&self, digest: &str) -> Option<Vec<u8>> {
        if !is_sha256(digest) {
            return None;
        }
        std::fs::read(self.path(digest)).ok()
    }

    fn write(&self, digest: &str, bytes: &[u8]) -> Result<(), SourceError> {
        let path = self.path(digest);
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, bytes)
            .and_then(|()| std::fs::rename(&tmp, &path))
            .map_err(|e| SourceError::Store(path, e))
    }

    /// The component `source` names: from the store when its digest is
    /// there, else pulled (manifest, then the one layer, its digest checked)
    /// and stored.
    pub async fn fetch(&self, source: &Source) -> Result<Fetched, SourceError> {
        let client = source.client();
        let auth = RegistryAuth::Anonymous;
        let digest = match source.digest() {
            Some(d) => d.to_owned(),
            None => client
                .fetch_manifest_digest(&source.reference, &auth)
                .await
                .map_err(|e| SourceError::Registry(format!("{}: {e}", source.whole())))?,
        };
        if let Some(bytes) = self.read(&digest) {
            return Ok(Fetched {
                digest,
                bytes,
                pulled: false,
            });
        }
        let pinned: Reference = format!(
            "{}/{}@{digest}",
            source.reference.registry(),
            source.reference.repository()
        )
        .parse()
        .map_err(|_| SourceError::BadSource(source.whole()))?;
        let (manifest, got) = client
            .pull_image_manifest(&pinned, &auth)
            .await
            .map_err(|e| SourceError::Registry(format!("{}: {e}", source.whole())))?;
        if got != digest {
            return Err(SourceError::Registry(format!(
                "{} answered manifest {got} for {digest}",
                source.whole()
            )));
        }
        let [layer] = manifest.layers.as_slice() else {
            return Err(SourceError::NotAComponent(format!(
                "{} has {} layers; a plugin artifact has exactly one ({LAYER_MEDIA_TYPE})",
                source.whole(),
                manifest.layers.len()
            )));
        };
        if !ACCEPTED_LAYERS.contains(&layer.media_type.as_str()) {
            return Err(SourceError::NotAComponent(format!(
                "{}: layer media type {:?} is not {LAYER_MEDIA_TYPE}",
                source.whole(),
                layer.media_type
            )));
        }
        if usize::try_from(layer.size).unwrap_or(usize::MAX) > MAX_COMPONENT_BYTES {
            return Err(SourceError::NotAComponent(format!(
                "{}: the component is {} bytes, more than {MAX_COMPONENT_BYTES}",
                source.whole(),
                layer.size
            )));
        }
        let mut bytes = Vec::new();
        client
            .pull_blob(&pinned, layer, &mut bytes)
            .await
            .map_err(|e| SourceError::Registry(format!("{}: {e}", source.whole())))?;
        let actual = format!("sha256:{}", hex::encode(Sha256::digest(&bytes)));
        if actual != layer.digest {
            return Err(SourceError::Registry(format!(
                "{}: layer digest {actual} is not the manifest's {}",
                source.whole(),
                layer.digest
            )));
        }
        if !bytes.starts_with(b"\0asm") {
            return Err(SourceError::NotAComponent(format!(
                "{}: the layer is not WebAssembly",
                source.whole()
            )));
        }
        self.write(&digest, &bytes)?;
        Ok(Fetched {
            digest,
            bytes,
            pulled: true,
        })
    }
}

/// Publishes `component` to `source` as a wasm artifact; returns the
/// manifest digest.
pub async fn push(source: &Source, component: Vec<u8>) -> Result<String, SourceError> {
    if !component.starts_with(b"\0asm") {
        return Err(SourceError::NotAComponent(
            "the file is not WebAssembly".into(),
        ));
    }
    let layer_digest = format!("sha256:{}", hex::encode(Sha256::digest(&component)));
    let config = serde_json::json!({
        "architecture": "wasm",
        "os": "wasip2",
        "layerDigests": [layer_digest],
    });
    let layers = [ImageLayer::new(component, LAYER_MEDIA_TYPE.into(), None)];
    let config = Config::new(
        serde_json::to_vec(&config).unwrap_or_default(),
        CONFIG_MEDIA_TYPE.into(),
        None,
    );
    let client = source.client();
    let response = client
        .push(
            &source.reference,
            &layers,
            config,
            &RegistryAuth::Anonymous,
            None,
        )
        .await
        .map_err(|e| SourceError::Registry(format!("{}: {e}", source.whole())))?;
    client
        .fetch_manifest_digest(&source.reference, &RegistryAuth::Anonymous)
        .await
        .map_err(|e| {
            SourceError::Registry(format!(
                "{} (pushed to {}): {e}",
                source.whole(),
                response.manifest_url
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_name_a_registry_and_a_tag_or_digest() {
        let d = format!("sha256:{}", "a".repeat(64));
        for ok in [
            "oci://127.0.0.1:5000/plugins/webserver:v1".to_owned(),
            "oci://ghcr.io/acme/webserver:0.1.0".to_owned(),
            format!("oci://localhost:5000/webserver@{d}"),
        ] {
            assert!(Source::parse(&ok).is_ok(), "{ok}");
        }
        for bad in [
            "webserver.wasm",
            "oci://webserver:v1",
            "oci://ghcr.io/acme/webserver",
            "oci://ghcr.io/acme/webserver@sha256:short",
            "https://ghcr.io/acme/webserver:v1",
        ] {
            assert!(
                matches!(Source::parse(bad), Err(SourceError::BadSource(_))),
                "{bad}"
            );
        }
        assert_eq!(
            Source::parse(&format!("oci://localhost:5000/w@{d}"))
                .unwrap()
                .digest(),
            Some(d.as_str())
        );
    }

    #[test]
    fn the_store_holds_components_by_digest_only() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path()).unwrap();
        let d = format!("sha256:{}", "b".repeat(64));
        assert!(store.read(&d).is_none());
        store.write(&d, b"\0asm").unwrap();
        assert_eq!(store.read(&d).as_deref(), Some(&b"\0asm"[..]));
        assert!(store.read("sha256:../../etc/passwd").is_none());
    }
}

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use sha2::{Digest, Sha256};

/// Metadata for a child of `parent`: its name, the parent's namespace and
/// the standard `app.kubernetes.io` labels. The host adds the owner
/// reference itself.
pub fn child_meta<P: kube::Resource>(parent: &P, name: impl Into<String>) -> ObjectMeta {
    let instance = parent.meta().name.clone().unwrap_or_default();
    let labels = BTreeMap::from([
        ("app.kubernetes.io/instance".to_owned(), instance),
        ("app.kubernetes.io/managed-by".to_owned(), "kuwa".to_owned()),
    ]);
    ObjectMeta {
        name: Some(name.into()),
        namespace: parent.meta().namespace.clone(),
        labels: Some(labels),
        ..ObjectMeta::default()
    }
}

/// A short, stable hash of `bytes` (first 16 hex digits of SHA-256), for
/// "config hash" annotations that roll Pods when their configuration changes.
pub fn content_hash(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    hex::encode(&digest[..8])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_hash_is_stable_and_short() {
        assert_eq!(content_hash(b"hello"), "2cf24dba5fb0a30e");
        assert_ne!(content_hash(b"hello"), content_hash(b"hello!"));
    }
}

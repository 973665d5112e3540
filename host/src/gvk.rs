//! Kubernetes kinds: the group/version/kind triple every other module names
//! objects by.

use std::fmt;

use kube::api::GroupVersionKind;
use serde_json::Value;

/// An API group, version and kind.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Gvk {
    /// API group; empty for the core group.
    pub group: String,
    /// Version.
    pub version: String,
    /// Kind.
    pub kind: String,
}

impl Gvk {
    /// Builds a kind from its parts.
    pub fn new(group: &str, version: &str, kind: &str) -> Self {
        Self {
            group: group.to_owned(),
            version: version.to_owned(),
            kind: kind.to_owned(),
        }
    }

    /// `apiVersion` as written in objects.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// The kind of a JSON object from its `apiVersion` and `kind`.
    pub fn of_object(object: &Value) -> Option<Self> {
        let api_version = object.get("apiVersion")?.as_str()?;
        let kind = object.get("kind")?.as_str()?;
        let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
        Some(Self::new(group, version, kind))
    }

    /// The kind of a cached object, from its type meta (the caches fill it
    /// in), without serializing the object.
    pub fn of_dynamic(object: &kube::api::DynamicObject) -> Option<Self> {
        Self::of_types(object.types.as_ref())
    }

    /// The kind of a cached object, from its type meta.
    pub fn of_cached(object: &crate::cache::CachedObject) -> Option<Self> {
        Self::of_types(object.types.as_ref())
    }

    fn of_types(types: Option<&kube::api::TypeMeta>) -> Option<Self> {
        let types = types?;
        let (group, version) = types
            .api_version
            .rsplit_once('/')
            .unwrap_or(("", &types.api_version));
        (!version.is_empty() && !types.kind.is_empty())
            .then(|| Self::new(group, version, &types.kind))
    }

    /// Parses `group/version/Kind` (`version/Kind` for the core group), the
    /// form manifests and messages use.
    pub fn parse(text: &str) -> Option<Self> {
        let (api_version, kind) = text.rsplit_once('/')?;
        let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
        (!version.is_empty() && !kind.is_empty() && !group.contains('/'))
            .then(|| Self::new(group, version, kind))
    }

    /// Whether `other` is the same kind, in any version: objects of one kind
    /// are the same objects whichever version they are read through.
    pub fn same_kind(&self, other: &Gvk) -> bool {
        self.group == other.group && self.kind == other.kind
    }

    /// The kube-rs form.
    pub fn to_kube(&self) -> GroupVersionKind {
        GroupVersionKind::gvk(&self.group, &self.version, &self.kind)
    }
}

impl fmt::Display for Gvk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.api_version(), self.kind)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_from_objects_and_text() {
        let g = Gvk::of_object(&serde_json::json!({"apiVersion": "apps/v1", "kind": "Deployment"}))
            .unwrap();
        assert_eq!(g, Gvk::new("apps", "v1", "Deployment"));
        let g = Gvk::of_object(&serde_json::json!({"apiVersion": "v1", "kind": "Pod"})).unwrap();
        assert_eq!(g.api_version(), "v1");
        assert!(Gvk::of_object(&serde_json::json!({"kind": "Pod"})).is_none());
        assert_eq!(Gvk::parse("v1/Secret"), Some(Gvk::new("", "v1", "Secret")));
        assert_eq!(
            Gvk::parse("kuwa.dev/v1alpha1/WebServer"),
            Some(Gvk::new("kuwa.dev", "v1alpha1", "WebServer"))
        );
        for bad in ["Secret", "v1/", "/Secret", "a/b/c/D"] {
            assert_eq!(Gvk::parse(bad), None, "{bad}");
        }
        assert_eq!(Gvk::parse(&g.to_string()), Some(g));
        let cached: kube::api::DynamicObject = serde_json::from_value(
            serde_json::json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"}}),
        )
        .unwrap();
        assert_eq!(
            Gvk::of_dynamic(&cached),
            Some(Gvk::new("apps", "v1", "Deployment"))
        );
        let untyped = kube::api::DynamicObject {
            types: None,
            ..cached
        };
        assert_eq!(Gvk::of_dynamic(&untyped), None);
    }
}

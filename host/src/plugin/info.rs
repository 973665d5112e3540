//! What a plugin declares about itself (`describe`), checked and in host types.

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use crate::gvk::Gvk;
use crate::plugin::runtime::wit;
use crate::tenant::limits::MIN_RESYNC;

fn gvk_from_wit(g: wit::Gvk) -> Result<Gvk, DescribeError> {
    if g.version.is_empty() || g.kind.is_empty() {
        return Err(DescribeError::BadKind(format!(
            "{}/{}/{}",
            g.group, g.version, g.kind
        )));
    }
    Ok(Gvk {
        group: g.group,
        version: g.version,
        kind: g.kind,
    })
}

/// How related objects map to parents (see the WIT `related-mapping`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RelatedMapping {
    /// Owned by one of the parent's children.
    OwnedByChild,
    /// Labels match the map at this JSON pointer in the parent.
    LabelSelectorFromParent(String),
    /// Every object in the parent's namespace.
    AllInNamespace,
    /// Every object of a cluster-scoped kind.
    AllInCluster,
}

/// What a write of the host is for, which picks its field manager
/// ([`PluginInfo::field_manager`]). Separate managers mean each part is owned
/// on its own: applying an empty finalizer list removes only the host's
/// finalizer, a status apply never disturbs children's fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldManager {
    /// Children (`kuwa/<plugin>`).
    Children,
    /// The parent's status (`kuwa/<plugin>/status`).
    Status,
    /// The host's finalizer on the parent (`kuwa/<plugin>/finalizer`).
    Finalizer,
    /// The plugin's CRD (`kuwa/<plugin>/crd`).
    Crd,
}

impl FieldManager {
    fn suffix(self) -> Option<&'static str> {
        match self {
            Self::Children => None,
            Self::Status => Some("status"),
            Self::Finalizer => Some("finalizer"),
            Self::Crd => Some("crd"),
        }
    }
}

/// A plugin's `describe`, validated.
#[derive(Debug, Clone)]
pub struct PluginInfo {
    /// Plugin name (DNS-1123 label), unique per host; its field managers
    /// are `kuwa/<name>[/<part>]` ([`PluginInfo::field_manager`]).
    pub name: Arc<str>,
    /// Plugin version.
    pub version: String,
    /// Parent kind.
    pub parent: Gvk,
    /// Whether parents are namespaced.
    pub parent_namespaced: bool,
    /// Declared child kinds.
    pub children: Vec<Gvk>,
    /// Declared related kinds.
    pub related: Vec<(Gvk, RelatedMapping)>,
    /// Whether the host holds a finalizer on parents.
    pub finalizer: bool,
    /// The plugin's own resync period.
    pub resync: Option<Duration>,
    /// The parent's CustomResourceDefinition, if the plugin carries one.
    pub crd: Option<Value>,
}

/// Why a `describe` answer is unusable.
#[derive(Debug, thiserror::Error)]
pub enum DescribeError {
    /// The plugin name is not a DNS-1123 label.
    #[error(
        "plugin name {0:?} is not a DNS-1123 label (lowercase letters, digits and '-', at most 63)"
    )]
    BadName(String),
    /// A kind has an empty version or kind.
    #[error("kind {0:?} needs a version and a kind")]
    BadKind(String),
    /// The carried CRD is not JSON.
    #[error("the carried CRD is not JSON: {0}")]
    CrdNotJson(String),
    /// The carried CRD is for another kind than the parent.
    #[error("the carried CRD defines {found}, but the parent kind is {parent}")]
    CrdMismatch {
        /// What the CRD defines.
        found: String,
        /// The declared parent.
        parent: Gvk,
    },
    /// A kind is declared twice (as child and related, or twice as child).
    #[error("kind {0} is declared more than once")]
    Duplicate(Gvk),
}

/// True for a DNS-1123 label: `[a-z0-9]([-a-z0-9]*[a-z0-9])?`, at most 63.
pub fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

impl PluginInfo {
    pub(crate) fn placeholder() -> Self {
        Self {
            name: Arc::from("(loading)"),
            version: String::new(),
            parent: Gvk::new("", "", ""),
            parent_namespaced: true,
            children: Vec::new(),
            related: Vec::new(),
            finalizer: false,
            resync: None,
            crd: None,
        }
    }

    /// Checks and converts a `describe` answer.
    pub fn from_wit(d: wit::Description) -> Result<Self, DescribeError> {
        if !is_dns_label(&d.name) {
            return Err(DescribeError::BadName(d.name));
        }
        let parent = gvk_from_wit(d.parent)?;
        let children = d
            .children
            .into_iter()
            .map(gvk_from_wit)
            .collect::<Result<Vec<_>, _>>()?;
        let related = d
            .related
            .into_iter()
            .map(|r| {
                let mapping = match r.mapping {
                    wit::RelatedMapping::OwnedByChild => RelatedMapping::OwnedByChild,
                    wit::RelatedMapping::LabelSelectorFromParent(p) => {
                        RelatedMapping::LabelSelectorFromParent(p)
                    }
                    wit::RelatedMapping::AllInNamespace => RelatedMapping::AllInNamespace,
                    wit::RelatedMapping::AllInCluster => RelatedMapping::AllInCluster,
                };
                Ok((gvk_from_wit(r.gvk)?, mapping))
            })
            .collect::<Result<Vec<_>, DescribeError>>()?;
        let mut seen = std::collections::HashSet::new();
        for g in children.iter().chain(related.iter().map(|(g, _)| g)) {
            if !seen.insert(g) {
                return Err(DescribeError::Duplicate(g.clone()));
            }
        }
        let crd = d
            .crd
            .map(|c| {
                serde_json::from_str::<Value>(&c)
                    .map_err(|e| DescribeError::CrdNotJson(e.to_string()))
            })
            .transpose()?;
        if let Some(crd) = &crd {
            let group = crd["spec"]["group"].as_str().unwrap_or_default();
            let kind = crd["spec"]["names"]["kind"].as_str().unwrap_or_default();
            let has_version = crd["spec"]["versions"]
                .as_array()
                .is_some_and(|vs| vs.iter().any(|v| v["name"] == parent.version.as_str()));
            if group != parent.group || kind != parent.kind || !has_version {
                return Err(DescribeError::CrdMismatch {
                    found: format!("{group}/{kind}"),
                    parent,
                });
            }
        }
        Ok(Self {
            name: Arc::from(d.name),
            version: d.version,
            parent,
            parent_namespaced: matches!(d.parent_scope, wit::Scope::Namespaced),
            children,
            related,
            finalizer: d.finalizer,
            resync: d
                .resync_seconds
                .map(|s| Duration::from_secs(u64::from(s)).max(MIN_RESYNC)),
            crd,
        })
    }

    /// The finalizer the host holds on parents: `<group>/finalizer`.
    pub fn finalizer_name(&self) -> String {
        let group = if self.parent.group.is_empty() {
            "kuwa.dev"
        } else {
            &self.parent.group
        };
        format!("{group}/finalizer")
    }

    /// The field manager of the plugin's writes of `part`: `kuwa/<plugin>`
    /// for children, `kuwa/<plugin>/<part>` for the others. Field managers
    /// are the host's: a plugin cannot pick one (its name is only ever a
    /// suffix), so it can never write as another client.
    pub fn field_manager(&self, part: FieldManager) -> String {
        match part.suffix() {
            None => format!("kuwa/{}", self.name),
            Some(suffix) => format!("kuwa/{}/{suffix}", self.name),
        }
    }

    /// Whether `gvk` is one of the declared child kinds.
    pub fn owns(&self, gvk: &Gvk) -> bool {
        self.children.contains(gvk)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_managers_are_the_hosts() {
        let mut info = PluginInfo::placeholder();
        info.name = Arc::from("helm");
        assert_eq!(info.field_manager(FieldManager::Children), "kuwa/helm");
        assert_eq!(info.field_manager(FieldManager::Status), "kuwa/helm/status");
        assert_eq!(
            info.field_manager(FieldManager::Finalizer),
            "kuwa/helm/finalizer"
        );
    }

    #[test]
    fn dns_labels() {
        assert!(is_dns_label("webserver"));
        assert!(is_dns_label("a-1"));
        assert!(!is_dns_label("Web"));
        assert!(!is_dns_label("-a"));
        assert!(!is_dns_label("a_b"));
        assert!(!is_dns_label(&"a".repeat(64)));
    }
}

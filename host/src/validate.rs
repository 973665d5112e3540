//! Checks a plugin's output before anything of it is applied. One bad object
//! rejects the whole output: nothing is half-applied.

// A rejection is the cold path and its error names the offending object; boxing
// it would only add noise.
#![allow(clippy::result_large_err)]

use std::collections::HashSet;

use serde_json::Value;

use crate::grant::Grant;
use crate::plugin::{Gvk, PluginInfo};

/// Most children one reconcile may return.
pub const MAX_CHILDREN: usize = 256;

/// Most bytes of JSON one reconcile may return (children and status). The API
/// server refuses objects over ~1.5 MiB; a few MiB in total leaves room for
/// several large children while stopping a runaway plugin early.
pub const MAX_OUTPUT_BYTES: usize = 4 << 20;

/// The parent a reconcile was for.
#[derive(Debug, Clone)]
pub struct ParentRef<'a> {
    /// Parent namespace (None when cluster-scoped).
    pub namespace: Option<&'a str>,
    /// Parent name.
    pub name: &'a str,
}

/// Why an output was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValidationError {
    /// A child is not valid JSON, or not an object.
    #[error("child #{index} is not a JSON object: {detail}")]
    NotAnObject {
        /// Position in the output.
        index: usize,
        /// Parser message.
        detail: String,
    },
    /// A child lacks `apiVersion`, `kind` or `metadata.name`.
    #[error("child #{index} needs apiVersion, kind and metadata.name")]
    MissingIdentity {
        /// Position in the output.
        index: usize,
    },
    /// A child is of a kind the plugin did not declare.
    #[error("child {name:?} is a {gvk}, which the plugin did not declare as a child kind")]
    UndeclaredKind {
        /// The child's kind.
        gvk: Gvk,
        /// The child's name.
        name: String,
    },
    /// A child is of a declared kind that the plugin's grant does not allow.
    #[error("child {name:?} is a {gvk}, which the plugin's grant does not allow it to create")]
    KindNotGranted {
        /// The child's kind.
        gvk: Gvk,
        /// The child's name.
        name: String,
    },
    /// A child names another namespace than the parent's.
    #[error("child {gvk} {name:?} is in namespace {namespace:?}, not the parent's {parent:?}")]
    WrongNamespace {
        /// The child's kind.
        gvk: Gvk,
        /// The child's name.
        name: String,
        /// Its namespace.
        namespace: String,
        /// The parent's namespace.
        parent: String,
    },
    /// A child's name is not a valid object name.
    #[error("child {gvk} name {name:?} is not a DNS-1123 subdomain")]
    InvalidName {
        /// The child's kind.
        gvk: Gvk,
        /// The name.
        name: String,
    },
    /// Two children share kind and name.
    #[error("child {gvk} {name:?} is returned twice")]
    Duplicate {
        /// The child's kind.
        gvk: Gvk,
        /// The name.
        name: String,
    },
    /// Too many children.
    #[error("{count} children returned; at most {limit} allowed")]
    TooManyChildren {
        /// How many.
        count: usize,
        /// The limit.
        limit: usize,
    },
    /// The output is too large.
    #[error("output is {bytes} bytes; at most {limit} allowed")]
    TooLarge {
        /// Size.
        bytes: usize,
        /// The limit.
        limit: usize,
    },
    /// A namespaced parent returned a child of a cluster-scoped kind, which
    /// it cannot own.
    #[error("child {gvk} {name:?} is cluster-scoped; a namespaced parent cannot own it")]
    ClusterScopedChild {
        /// The child's kind.
        gvk: Gvk,
        /// The name.
        name: String,
    },
    /// The status is not a JSON object.
    #[error("status is not a JSON object")]
    StatusNotAnObject,
}

/// True for a DNS-1123 subdomain: lowercase alphanumerics, '-' and '.',
/// starting and ending alphanumeric, at most 253 characters.
pub fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|part| {
            !part.is_empty()
                && part
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !part.starts_with('-')
                && !part.ends_with('-')
        })
}

/// A checked child: its kind, name and JSON.
#[derive(Debug, Clone)]
pub struct Child {
    /// Kind.
    pub gvk: Gvk,
    /// Name.
    pub name: String,
    /// The object as the plugin returned it.
    pub object: Value,
}

/// Parses and checks the children and status a plugin returned for `parent`.
pub fn validate_output(
    info: &PluginInfo,
    grant: &Grant,
    parent: &ParentRef<'_>,
    children: &[String],
    status: Option<&str>,
) -> Result<(Vec<Child>, Option<Value>), ValidationError> {
    let bytes = children.iter().map(String::len).sum::<usize>() + status.map_or(0, str::len);
    if bytes > grant.max_output_bytes {
        return Err(ValidationError::TooLarge {
            bytes,
            limit: grant.max_output_bytes,
        });
    }
    if children.len() > grant.max_children {
        return Err(ValidationError::TooManyChildren {
            count: children.len(),
            limit: grant.max_children,
        });
    }
    let mut seen = HashSet::new();
    let mut out = Vec::with_capacity(children.len());
    for (index, text) in children.iter().enumerate() {
        let object: Value =
            serde_json::from_str(text).map_err(|e| ValidationError::NotAnObject {
                index,
                detail: e.to_string(),
            })?;
        if !object.is_object() {
            return Err(ValidationError::NotAnObject {
                index,
                detail: "not an object".into(),
            });
        }
        let gvk = Gvk::of_object(&object).ok_or(ValidationError::MissingIdentity { index })?;
        let name = object["metadata"]["name"]
            .as_str()
            .ok_or(ValidationError::MissingIdentity { index })?
            .to_owned();
        if !info.owns(&gvk) {
            return Err(ValidationError::UndeclaredKind { gvk, name });
        }
        if !grant.allows_kind(&gvk) {
            return Err(ValidationError::KindNotGranted { gvk, name });
        }
        if !is_dns_subdomain(&name) {
            return Err(ValidationError::InvalidName { gvk, name });
        }
        if let Some(ns) = object["metadata"].get("namespace").and_then(Value::as_str)
            && Some(ns) != parent.namespace
        {
            return Err(ValidationError::WrongNamespace {
                gvk,
                name,
                namespace: ns.to_owned(),
                parent: parent.namespace.unwrap_or_default().to_owned(),
            });
        }
        if !seen.insert((gvk.clone(), name.clone())) {
            return Err(ValidationError::Duplicate { gvk, name });
        }
        out.push(Child { gvk, name, object });
    }
    let status = status
        .map(|s| match serde_json::from_str::<Value>(s) {
            Ok(v @ Value::Object(_)) => Ok(v),
            _ => Err(ValidationError::StatusNotAnObject),
        })
        .transpose()?;
    Ok((out, status))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::plugin::{Gvk, PluginInfo};

    fn info() -> PluginInfo {
        let mut i = PluginInfo::placeholder();
        i.children = vec![
            Gvk::new("", "v1", "ConfigMap"),
            Gvk::new("apps", "v1", "Deployment"),
        ];
        i
    }

    const PARENT: ParentRef<'static> = ParentRef {
        namespace: Some("team-a"),
        name: "web",
    };

    fn check(children: &[Value]) -> Result<Vec<Child>, ValidationError> {
        let texts: Vec<String> = children.iter().map(Value::to_string).collect();
        validate_output(&info(), &Grant::default(), &PARENT, &texts, None).map(|(c, _)| c)
    }

    fn cm(name: &str) -> Value {
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}})
    }

    #[test]
    fn accepts_declared_children() {
        let mut d =
            json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"}});
        d["metadata"]["namespace"] = json!("team-a");
        let out = check(&[cm("web-content"), d]).unwrap();
        assert_eq!(out.len(), 2);
        assert_eq!(out[1].gvk, Gvk::new("apps", "v1", "Deployment"));
    }

    #[test]
    fn rejects_kinds_outside_the_grant() {
        let grant = Grant {
            child_kinds: Some([Gvk::new("", "v1", "ConfigMap")].into_iter().collect()),
            ..Grant::default()
        };
        let d = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"}})
            .to_string();
        let err =
            validate_output(&info(), &grant, &PARENT, &[cm("a").to_string(), d], None).unwrap_err();
        assert!(
            matches!(err, ValidationError::KindNotGranted { .. }),
            "{err}"
        );
        let tight = Grant {
            max_children: 1,
            ..Grant::default()
        };
        let err = validate_output(
            &info(),
            &tight,
            &PARENT,
            &[cm("a").to_string(), cm("b").to_string()],
            None,
        );
        assert!(matches!(
            err,
            Err(ValidationError::TooManyChildren { count: 2, limit: 1 })
        ));
    }

    #[test]
    fn rejects_undeclared_kinds() {
        let secret = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"}});
        assert!(matches!(
            check(&[cm("a"), secret]),
            Err(ValidationError::UndeclaredKind { .. })
        ));
    }

    #[test]
    fn rejects_other_namespaces() {
        let mut c = cm("a");
        c["metadata"]["namespace"] = json!("kube-system");
        let err = check(&[c]).unwrap_err();
        assert!(
            matches!(err, ValidationError::WrongNamespace { ref namespace, .. } if namespace == "kube-system")
        );
        assert!(err.to_string().contains("team-a"));
    }

    #[test]
    fn rejects_bad_names_duplicates_and_missing_identity() {
        assert!(matches!(
            check(&[cm("Not_Valid")]),
            Err(ValidationError::InvalidName { .. })
        ));
        assert!(matches!(
            check(&[cm("a"), cm("a")]),
            Err(ValidationError::Duplicate { .. })
        ));
        assert!(matches!(
            check(&[json!({"kind": "ConfigMap", "metadata": {"name": "a"}})]),
            Err(ValidationError::MissingIdentity { index: 0 })
        ));
        assert!(matches!(
            check(&[json!([1, 2])]),
            Err(ValidationError::NotAnObject { .. })
        ));
    }

    #[test]
    fn rejects_garbage_text() {
        let err = validate_output(
            &info(),
            &Grant::default(),
            &PARENT,
            &["{not json".to_owned()],
            None,
        )
        .unwrap_err();
        assert!(matches!(err, ValidationError::NotAnObject { index: 0, .. }));
        let err =
            validate_output(&info(), &Grant::default(), &PARENT, &[], Some("[]")).unwrap_err();
        assert_eq!(err, ValidationError::StatusNotAnObject);
    }

    #[test]
    fn enforces_count_and_size_limits() {
        let many: Vec<Value> = (0..=MAX_CHILDREN).map(|n| cm(&format!("c{n}"))).collect();
        assert!(matches!(
            check(&many),
            Err(ValidationError::TooManyChildren { .. })
        ));
        let mut big = cm("big");
        big["data"] = json!({"k": "x".repeat(MAX_OUTPUT_BYTES)});
        assert!(matches!(
            check(&[big]),
            Err(ValidationError::TooLarge { .. })
        ));
    }

    #[test]
    fn dns_subdomains() {
        assert!(is_dns_subdomain("web-content"));
        assert!(is_dns_subdomain("a.b-c.d"));
        assert!(!is_dns_subdomain("a..b"));
        assert!(!is_dns_subdomain("-a"));
        assert!(!is_dns_subdomain("A"));
        assert!(!is_dns_subdomain(&"a".repeat(254)));
    }
}

//! Checks a plugin's output before anything of it is applied. One bad object
//! rejects the whole output: nothing is half-applied.
//!
//! Besides shape, names and namespaces, the checks close side channels: the
//! number and size of events count against the output limits and their
//! reasons must be UpperCamelCase; children may not carry finalizers unless
//! granted; labels and annotations under `kuwa.dev/` are the host's.

// A rejection is the cold path and its error names the offending object; boxing
// it would only add noise.
#![allow(clippy::result_large_err)]

use std::collections::HashSet;
use std::time::Duration;

use serde_json::Value;

use crate::gvk::Gvk;
use crate::plugin::info::PluginInfo;
use crate::plugin::runtime::{truncate, wit};
use crate::tenant::grant::Grant;
use crate::tenant::limits::{MAX_EVENT_MESSAGE_BYTES, MIN_REQUEUE_AFTER};

/// Longest event reason (the API server's limit for `reason` is 128).
pub const MAX_EVENT_REASON: usize = 128;

/// An event to record on the parent, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventOut {
    /// Warning (true) or Normal.
    pub warning: bool,
    /// UpperCamelCase reason.
    pub reason: String,
    /// Message, at most [`MAX_EVENT_MESSAGE_BYTES`].
    pub message: String,
}

impl EventOut {
    /// A Warning event from the host.
    pub fn warning(reason: &str, message: &str) -> Self {
        let mut message = message.to_owned();
        truncate(&mut message, MAX_EVENT_MESSAGE_BYTES);
        Self {
            warning: true,
            reason: reason.to_owned(),
            message,
        }
    }

    /// `Warning` or `Normal`.
    pub fn kind(&self) -> &'static str {
        if self.warning { "Warning" } else { "Normal" }
    }
}

/// A plugin's output that passed every check.
#[derive(Debug, Clone)]
pub struct Output {
    /// The children, in order.
    pub children: Vec<Child>,
    /// The status, if the plugin set one.
    pub status: Option<Value>,
    /// Events to record.
    pub events: Vec<EventOut>,
    /// Look again after this long.
    pub requeue_after: Option<Duration>,
}

/// The requeue-after a plugin asked for, at least [`MIN_REQUEUE_AFTER`].
pub fn requeue_after(ms: u64) -> Duration {
    Duration::from_millis(ms).max(MIN_REQUEUE_AFTER)
}

/// Whether `reason` is an UpperCamelCase machine-readable reason.
pub fn is_event_reason(reason: &str) -> bool {
    reason.len() <= MAX_EVENT_REASON
        && reason.starts_with(|c: char| c.is_ascii_uppercase())
        && reason.chars().all(|c| c.is_ascii_alphanumeric())
}

/// Whether a label or annotation key is in the host's own prefix,
/// `kuwa.dev/` (the plugin label, the desired-hash annotation, ...).
pub fn is_host_key(key: &str) -> bool {
    key.split_once('/')
        .is_some_and(|(prefix, _)| prefix == "kuwa.dev")
}

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
    /// The status is not a JSON object.
    #[error("status is not a JSON object")]
    StatusNotAnObject,
    /// Too many events.
    #[error("{count} events returned; at most {limit} allowed")]
    TooManyEvents {
        /// How many.
        count: usize,
        /// The limit.
        limit: usize,
    },
    /// An event reason is not UpperCamelCase alphanumerics.
    #[error("event reason {0:?} is not UpperCamelCase letters and digits (at most 128)")]
    BadEventReason(String),
    /// A child carries finalizers, which the grant does not allow.
    #[error(
        "child {gvk} {name:?} carries finalizers, which the plugin's grant does not allow (childFinalizers)"
    )]
    ChildFinalizers {
        /// The child's kind.
        gvk: Gvk,
        /// The name.
        name: String,
    },
    /// A child sets a label or annotation in the host's `kuwa.dev` prefix.
    #[error(
        "child {gvk} {name:?} sets {key:?}: labels and annotations under kuwa.dev/ are the host's"
    )]
    HostKey {
        /// The child's kind.
        gvk: Gvk,
        /// The name.
        name: String,
        /// The key.
        key: String,
    },
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

/// Checks the events a plugin asked for: how many, and their reasons.
/// Messages over [`MAX_EVENT_MESSAGE_BYTES`] are cut.
pub fn validate_events(
    grant: &Grant,
    events: Vec<wit::Event>,
) -> Result<Vec<EventOut>, ValidationError> {
    if events.len() > grant.output.max_events {
        return Err(ValidationError::TooManyEvents {
            count: events.len(),
            limit: grant.output.max_events,
        });
    }
    events
        .into_iter()
        .map(|e| {
            if !is_event_reason(&e.reason) {
                return Err(ValidationError::BadEventReason(e.reason));
            }
            let mut message = e.message;
            truncate(&mut message, MAX_EVENT_MESSAGE_BYTES);
            Ok(EventOut {
                warning: matches!(e.event_type, wit::EventType::Warning),
                reason: e.reason,
                message,
            })
        })
        .collect()
}

/// Parses and checks everything a plugin returned for `parent`.
pub fn validate_output(
    info: &PluginInfo,
    grant: &Grant,
    parent: &ParentRef<'_>,
    desired: wit::Desired,
) -> Result<Output, ValidationError> {
    let limits = &grant.output;
    let event_bytes: usize = desired
        .events
        .iter()
        .map(|e| e.reason.len() + e.message.len())
        .sum();
    let bytes = desired.children.iter().map(String::len).sum::<usize>()
        + desired.status.as_deref().map_or(0, str::len)
        + event_bytes;
    if bytes > limits.max_output_bytes {
        return Err(ValidationError::TooLarge {
            bytes,
            limit: limits.max_output_bytes,
        });
    }
    if desired.children.len() > limits.max_children {
        return Err(ValidationError::TooManyChildren {
            count: desired.children.len(),
            limit: limits.max_children,
        });
    }
    let mut seen = HashSet::new();
    let mut children = Vec::with_capacity(desired.children.len());
    for (index, text) in desired.children.iter().enumerate() {
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
        let meta = &object["metadata"];
        if let Some(ns) = meta.get("namespace").and_then(Value::as_str)
            && Some(ns) != parent.namespace
        {
            return Err(ValidationError::WrongNamespace {
                gvk,
                name,
                namespace: ns.to_owned(),
                parent: parent.namespace.unwrap_or_default().to_owned(),
            });
        }
        let finalizers = meta
            .get("finalizers")
            .and_then(Value::as_array)
            .is_some_and(|f| !f.is_empty());
        if finalizers && !grant.child_finalizers {
            return Err(ValidationError::ChildFinalizers { gvk, name });
        }
        for field in ["labels", "annotations"] {
            if let Some(key) = meta
                .get(field)
                .and_then(Value::as_object)
                .and_then(|m| m.keys().find(|k| is_host_key(k)))
            {
                return Err(ValidationError::HostKey {
                    gvk,
                    name,
                    key: key.clone(),
                });
            }
        }
        if !seen.insert((gvk.clone(), name.clone())) {
            return Err(ValidationError::Duplicate { gvk, name });
        }
        children.push(Child { gvk, name, object });
    }
    let status = desired
        .status
        .as_deref()
        .map(|s| match serde_json::from_str::<Value>(s) {
            Ok(v @ Value::Object(_)) => Ok(v),
            _ => Err(ValidationError::StatusNotAnObject),
        })
        .transpose()?;
    let events = validate_events(grant, desired.events)?;
    Ok(Output {
        children,
        status,
        events,
        requeue_after: desired.requeue_after_ms.map(requeue_after),
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::tenant::limits::{DEFAULT_MAX_CHILDREN, DEFAULT_MAX_OUTPUT_BYTES};

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

    fn desired(children: &[Value]) -> wit::Desired {
        wit::Desired {
            children: children.iter().map(Value::to_string).collect(),
            status: None,
            requeue_after_ms: None,
            events: Vec::new(),
        }
    }

    fn run(grant: &Grant, d: wit::Desired) -> Result<Output, ValidationError> {
        validate_output(&info(), grant, &PARENT, d)
    }

    fn check(children: &[Value]) -> Result<Vec<Child>, ValidationError> {
        run(&Grant::default(), desired(children)).map(|o| o.children)
    }

    fn cm(name: &str) -> Value {
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}})
    }

    fn event(reason: &str, message: &str) -> wit::Event {
        wit::Event {
            event_type: wit::EventType::Normal,
            reason: reason.into(),
            message: message.into(),
        }
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
        let d = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"}});
        let err = run(&grant, desired(&[cm("a"), d])).unwrap_err();
        assert!(
            matches!(err, ValidationError::KindNotGranted { .. }),
            "{err}"
        );
        let mut tight = Grant::default();
        tight.output.max_children = 1;
        let err = run(&tight, desired(&[cm("a"), cm("b")]));
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
        let mut d = desired(&[]);
        d.children = vec!["{not json".to_owned()];
        let err = run(&Grant::default(), d).unwrap_err();
        assert!(matches!(err, ValidationError::NotAnObject { index: 0, .. }));
        let mut d = desired(&[]);
        d.status = Some("[]".into());
        let err = run(&Grant::default(), d).unwrap_err();
        assert_eq!(err, ValidationError::StatusNotAnObject);
    }

    #[test]
    fn enforces_count_and_size_limits() {
        let many: Vec<Value> = (0..=DEFAULT_MAX_CHILDREN)
            .map(|n| cm(&format!("c{n}")))
            .collect();
        assert!(matches!(
            check(&many),
            Err(ValidationError::TooManyChildren { .. })
        ));
        let mut big = cm("big");
        big["data"] = json!({"k": "x".repeat(DEFAULT_MAX_OUTPUT_BYTES)});
        assert!(matches!(
            check(&[big]),
            Err(ValidationError::TooLarge { .. })
        ));
    }

    #[test]
    fn events_are_limited_in_number_size_and_form() {
        let mut d = desired(&[cm("a")]);
        d.events = (0..17).map(|_| event("Spam", "x")).collect();
        assert!(matches!(
            run(&Grant::default(), d),
            Err(ValidationError::TooManyEvents {
                count: 17,
                limit: 16
            })
        ));
        for bad in ["not a reason!!", "lowercase", "", "Has-Dash"] {
            let mut d = desired(&[]);
            d.events = vec![event(bad, "m")];
            assert_eq!(
                run(&Grant::default(), d).unwrap_err(),
                ValidationError::BadEventReason(bad.into()),
                "{bad:?}"
            );
        }
        // Event text counts towards the output size.
        let mut tight = Grant::default();
        tight.output.max_output_bytes = 100;
        let mut d = desired(&[]);
        d.events = vec![event("Big", &"x".repeat(200))];
        assert!(matches!(
            run(&tight, d),
            Err(ValidationError::TooLarge { .. })
        ));
        // Long messages are cut, not rejected.
        let mut d = desired(&[]);
        d.events = vec![event("Long", &"y".repeat(5000))];
        let out = run(&Grant::default(), d).unwrap();
        assert_eq!(out.events[0].message.len(), MAX_EVENT_MESSAGE_BYTES);
    }

    #[test]
    fn children_may_not_carry_finalizers_or_host_keys() {
        let mut c = cm("a");
        c["metadata"]["finalizers"] = json!(["example.com/block"]);
        assert!(matches!(
            check(std::slice::from_ref(&c)),
            Err(ValidationError::ChildFinalizers { .. })
        ));
        let granted = Grant {
            child_finalizers: true,
            ..Grant::default()
        };
        assert!(run(&granted, desired(&[c])).is_ok());
        for (field, key) in [
            ("labels", "kuwa.dev/plugin"),
            ("annotations", "kuwa.dev/desired-hash"),
        ] {
            let mut c = cm("a");
            c["metadata"][field] = json!({key: "webserver"});
            assert!(
                matches!(check(&[c]), Err(ValidationError::HostKey { .. })),
                "{key}"
            );
        }
        let mut c = cm("a");
        c["metadata"]["labels"] =
            json!({"notkuwa.dev/x": "1", "test.kuwa.dev/x": "1", "app": "web"});
        assert!(check(&[c]).is_ok());
    }

    #[test]
    fn requeues_have_a_floor() {
        let mut d = desired(&[]);
        d.requeue_after_ms = Some(0);
        let out = run(&Grant::default(), d).unwrap();
        assert_eq!(out.requeue_after, Some(MIN_REQUEUE_AFTER));
        assert_eq!(requeue_after(30_000), Duration::from_secs(30));
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

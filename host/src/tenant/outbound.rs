//! The outbound part of a grant (DESIGN §1): which origins a plugin may call
//! over HTTP through the host, and how much each reconcile may do.
//!
//! ```yaml
//! outbound:
//!   hosts: [https://firewall.example.com, http://127.0.0.1:8080]
//!   timeout: 2s                 # per request, inside the call deadline
//!   maxResponseBytes: 1048576   # a larger body is refused, not truncated
//!   maxCallsPerReconcile: 8
//! ```
//!
//! Without `outbound` a plugin may call nothing. An entry is an origin:
//! scheme (`http` or `https`), host and port (the scheme's default when
//! left out); nothing else matches it, not another port, not a subdomain.

use std::collections::BTreeSet;
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Default timeout of one request.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);

/// Default cap on a response body.
pub const DEFAULT_MAX_RESPONSE_BYTES: usize = 1 << 20;

/// Largest response body a grant may allow.
pub const MAX_RESPONSE_BYTES: usize = 16 << 20;

/// Largest request body a plugin may send.
pub const MAX_REQUEST_BYTES: usize = 1 << 20;

/// Default cap on calls in one reconcile (or finalize).
pub const DEFAULT_MAX_CALLS: u32 = 8;

/// Most origins one grant may list.
pub const MAX_HOSTS: usize = 64;

/// The `outbound` section of a manifest, as written.
#[derive(Debug, Default, Clone, PartialEq, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ManifestOutbound {
    /// Origins the plugin may call: `https://host[:port]` or
    /// `http://host[:port]`.
    pub hosts: Vec<String>,
    /// Timeout of one request, e.g. `2s` (never past the call deadline).
    pub timeout: Option<String>,
    /// Largest response body accepted, in bytes.
    pub max_response_bytes: Option<usize>,
    /// Most requests one reconcile or finalize may make.
    pub max_calls_per_reconcile: Option<u32>,
}

/// An origin: scheme, lower-case host and port.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Origin {
    /// `http` or `https`.
    pub scheme: String,
    /// The host, lower case (IPv6 in brackets).
    pub host: String,
    /// The port (the scheme's default when the URL names none).
    pub port: u16,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}:{}", self.scheme, self.host, self.port)
    }
}

impl Origin {
    /// The origin of an absolute `http`/`https` URL.
    pub fn of(url: &url::Url) -> Result<Self, String> {
        let scheme = url.scheme();
        if scheme != "http" && scheme != "https" {
            return Err(format!(
                "only http and https URLs can be called, not {scheme}:"
            ));
        }
        let host = match url.host() {
            Some(url::Host::Domain(d)) => d.to_ascii_lowercase(),
            Some(url::Host::Ipv4(ip)) => ip.to_string(),
            Some(url::Host::Ipv6(ip)) => format!("[{ip}]"),
            None => return Err("the URL has no host".into()),
        };
        let port = url
            .port_or_known_default()
            .ok_or_else(|| "the URL has no port".to_owned())?;
        Ok(Self {
            scheme: scheme.to_owned(),
            host,
            port,
        })
    }

    /// Parses a grant entry: an origin, with no path, query, fragment or
    /// credentials.
    pub fn parse_entry(entry: &str) -> Result<Self, String> {
        let url = url::Url::parse(entry)
            .map_err(|e| format!("{entry:?} is not an origin like https://host[:port] ({e})"))?;
        if !url.username().is_empty()
            || url.password().is_some()
            || url.path() != "/"
            || url.query().is_some()
            || url.fragment().is_some()
        {
            return Err(format!(
                "{entry:?} must be an origin only (scheme://host[:port]), without path, query or credentials"
            ));
        }
        Self::of(&url).map_err(|e| format!("{entry:?}: {e}"))
    }
}

/// What a plugin may call, as granted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboundGrant {
    /// The origins it may reach.
    pub origins: BTreeSet<Origin>,
    /// Timeout of one request.
    pub timeout: Duration,
    /// Largest response body accepted.
    pub max_response_bytes: usize,
    /// Most requests per reconcile or finalize.
    pub max_calls: u32,
}

impl OutboundGrant {
    /// The grant of a plugin whose manifest has no `outbound`: no origin.
    pub fn none() -> std::sync::Arc<Self> {
        static NONE: std::sync::OnceLock<std::sync::Arc<OutboundGrant>> =
            std::sync::OnceLock::new();
        NONE.get_or_init(|| {
            std::sync::Arc::new(Self {
                origins: BTreeSet::new(),
                timeout: DEFAULT_TIMEOUT,
                max_response_bytes: DEFAULT_MAX_RESPONSE_BYTES,
                max_calls: DEFAULT_MAX_CALLS,
            })
        })
        .clone()
    }

    /// Whether `origin` is granted.
    pub fn allows(&self, origin: &Origin) -> bool {
        self.origins.contains(origin)
    }

    /// Checks a manifest section; `invalid` builds the error naming the
    /// field.
    pub fn from_manifest<E>(
        m: ManifestOutbound,
        invalid: &impl Fn(String) -> E,
    ) -> Result<Self, E> {
        if m.hosts.len() > MAX_HOSTS {
            return Err(invalid(format!(
                "outbound.hosts lists {} origins, at most {MAX_HOSTS} are allowed",
                m.hosts.len()
            )));
        }
        let origins = m
            .hosts
            .iter()
            .map(|h| Origin::parse_entry(h).map_err(|e| invalid(format!("outbound.hosts: {e}"))))
            .collect::<Result<BTreeSet<_>, E>>()?;
        let timeout = match &m.timeout {
            Some(text) => {
                let d = humantime::parse_duration(text)
                    .map_err(|e| invalid(format!("outbound.timeout {text:?}: {e}")))?;
                if d < Duration::from_millis(1) || d > crate::tenant::limits::MAX_DEADLINE {
                    return Err(invalid(format!(
                        "outbound.timeout must be between 1ms and {}, got {text}",
                        humantime::format_duration(crate::tenant::limits::MAX_DEADLINE)
                    )));
                }
                d
            }
            None => DEFAULT_TIMEOUT,
        };
        let max_response_bytes = m.max_response_bytes.unwrap_or(DEFAULT_MAX_RESPONSE_BYTES);
        if !(1..=MAX_RESPONSE_BYTES).contains(&max_response_bytes) {
            return Err(invalid(format!(
                "outbound.maxResponseBytes must be between 1 and {MAX_RESPONSE_BYTES}, got {max_response_bytes}"
            )));
        }
        let max_calls = m.max_calls_per_reconcile.unwrap_or(DEFAULT_MAX_CALLS);
        if !(1..=1_000).contains(&max_calls) {
            return Err(invalid(format!(
                "outbound.maxCallsPerReconcile must be between 1 and 1000, got {max_calls}"
            )));
        }
        Ok(Self {
            origins,
            timeout,
            max_response_bytes,
            max_calls,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(hosts: &[&str]) -> Result<OutboundGrant, String> {
        OutboundGrant::from_manifest(
            ManifestOutbound {
                hosts: hosts.iter().map(|h| (*h).to_owned()).collect(),
                ..ManifestOutbound::default()
            },
            &|m| m,
        )
    }

    fn origin(url: &str) -> Origin {
        Origin::of(&url::Url::parse(url).unwrap()).unwrap()
    }

    #[test]
    fn an_origin_matches_only_itself() {
        let g = grant(&["https://FW.example.com", "http://127.0.0.1:8080"]).unwrap();
        assert!(g.allows(&origin("https://fw.example.com/rules/a?x=1")));
        assert!(g.allows(&origin("https://fw.example.com:443/")));
        assert!(g.allows(&origin("http://127.0.0.1:8080/v1")));
        for other in [
            "http://fw.example.com/",
            "https://fw.example.com:8443/",
            "https://api.fw.example.com/",
            "https://fw.example.com.evil.test/",
            "http://127.0.0.1:8081/",
            "http://localhost:8080/",
            "http://[::1]:8080/",
        ] {
            assert!(!g.allows(&origin(other)), "{other} must not match");
        }
    }

    #[test]
    fn entries_must_be_origins() {
        for bad in [
            "fw.example.com",
            "https://fw.example.com/path",
            "https://user:pw@fw.example.com",
            "https://fw.example.com/?q",
            "ftp://fw.example.com",
            "file:///etc/passwd",
        ] {
            let e = grant(&[bad]).unwrap_err();
            assert!(e.contains("outbound.hosts"), "{bad}: {e}");
        }
        assert!(Origin::of(&url::Url::parse("unix:/run/x").unwrap()).is_err());
    }

    #[test]
    fn limits_are_checked() {
        let with = |m: ManifestOutbound| OutboundGrant::from_manifest(m, &|m| m);
        let e = with(ManifestOutbound {
            timeout: Some("2h".into()),
            ..Default::default()
        })
        .unwrap_err();
        assert!(e.contains("outbound.timeout"), "{e}");
        let e = with(ManifestOutbound {
            max_response_bytes: Some(0),
            ..Default::default()
        })
        .unwrap_err();
        assert!(e.contains("maxResponseBytes"), "{e}");
        let e = with(ManifestOutbound {
            max_calls_per_reconcile: Some(0),
            ..Default::default()
        })
        .unwrap_err();
        assert!(e.contains("maxCallsPerReconcile"), "{e}");
        let ok = with(ManifestOutbound::default()).unwrap();
        assert_eq!(
            (ok.timeout, ok.max_response_bytes, ok.max_calls),
            (
                DEFAULT_TIMEOUT,
                DEFAULT_MAX_RESPONSE_BYTES,
                DEFAULT_MAX_CALLS
            )
        );
        assert!(ok.origins.is_empty());
    }
}

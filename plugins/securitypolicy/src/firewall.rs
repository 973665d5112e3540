//! The allow-list on an external firewall, through the host's outbound
//! calls.
//!
//! The API (the shape of a cloud firewall's, reduced to what the plugin
//! needs):
//!
//! * `PUT {endpoint}/rules/{name}` with `{"name", "sourceRanges",
//!   "allowed": ["tcp:443", ...]}` creates or replaces the rule and answers
//!   `{"id": ...}`;
//! * `DELETE {endpoint}/rules/{name}` removes it (404 if it is gone).
//!
//! Both are idempotent, so a reconcile that runs twice does no harm. A push
//! is made only when the allow-list differs from the last one pushed
//! (`status.firewall.syncedHash`): the steady state calls nothing. A failed
//! push is retried with exponential backoff (1 s, 2 s, ... up to 5 min,
//! counted from `status.firewall.lastFailure`, so Nodes changing meanwhile
//! do not hurry it) and shown as `FirewallSynced=False`; the NetworkPolicy
//! is applied whatever the firewall does.

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kuwa_sdk::outbound::{self, Request};
use kuwa_sdk::{Error, Event, Finalized, content_hash};
use serde::{Deserialize, Serialize};

use crate::{AllowList, FirewallSpec, FirewallStatus, SecurityPolicy};

/// Longest retry interval.
pub const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// How often a finalizer that could not delete the rule tries again.
pub const REMOVE_RETRY: Duration = Duration::from_secs(10);

/// The rule as the firewall stores it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Rule {
    /// The rule's name.
    pub name: String,
    /// Admitted source ranges.
    pub source_ranges: Vec<String>,
    /// Admitted `protocol:port`s, lower-case protocol.
    pub allowed: Vec<String>,
}

#[derive(Deserialize)]
struct Reply {
    id: String,
}

/// Checks `spec.firewall`.
pub fn validate(fw: &FirewallSpec) -> Result<(), Error> {
    let endpoint = fw.endpoint.as_str();
    let rest = endpoint
        .strip_prefix("https://")
        .or_else(|| endpoint.strip_prefix("http://"));
    if rest.is_none_or(|r| r.is_empty() || r.starts_with('/')) {
        return Err(Error::invalid_spec(format!(
            "spec.firewall.endpoint {endpoint:?} must be an http:// or https:// URL"
        )));
    }
    if endpoint.contains(['?', '#']) {
        return Err(Error::invalid_spec(format!(
            "spec.firewall.endpoint {endpoint:?} must not have a query or fragment"
        )));
    }
    if let Some(name) = &fw.rule_name
        && !is_rule_name(name)
    {
        return Err(Error::invalid_spec(format!(
            "spec.firewall.ruleName {name:?} must be 1-63 lower-case letters, digits or '-'"
        )));
    }
    Ok(())
}

fn is_rule_name(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

/// The rule's name: `spec.firewall.ruleName`, or `<namespace>-<name>`.
pub fn rule_name(parent: &SecurityPolicy, spec: &FirewallSpec) -> String {
    spec.rule_name.clone().unwrap_or_else(|| {
        format!(
            "{}-{}",
            parent.metadata.namespace.as_deref().unwrap_or_default(),
            parent.metadata.name.as_deref().unwrap_or_default()
        )
    })
}

/// The rule for `list`.
pub fn rule(name: &str, list: &AllowList) -> Rule {
    Rule {
        name: name.to_owned(),
        source_ranges: list.sources.clone(),
        allowed: list
            .ports
            .iter()
            .map(|(port, protocol)| format!("{}:{port}", protocol.to_ascii_lowercase()))
            .collect(),
    }
}

fn rule_url(spec: &FirewallSpec, name: &str) -> String {
    format!("{}/rules/{name}", spec.endpoint.trim_end_matches('/'))
}

/// What one sync came to.
#[derive(Debug, Clone, PartialEq)]
pub struct Push {
    /// Whether the firewall holds the allow-list.
    pub synced: bool,
    /// The `FirewallSynced` reason.
    pub reason: String,
    /// The `FirewallSynced` message.
    pub message: String,
    /// The new `status.firewall`.
    pub status: FirewallStatus,
    /// When to try again (after a failure).
    pub retry_after: Option<Duration>,
    /// An event to record.
    pub event: Option<Event>,
}

/// The backoff after `failures` failed pushes in a row.
pub fn backoff(failures: u32) -> Duration {
    let secs = 1u64
        .checked_shl(failures.saturating_sub(1))
        .unwrap_or(u64::MAX);
    Duration::from_secs(secs).min(MAX_BACKOFF)
}

fn shorten(text: &str) -> String {
    let mut out: String = text.chars().take(200).collect();
    if out.len() < text.len() {
        out.push('…');
    }
    out
}

/// Pushes `list` to the firewall unless it holds it already, or unless the
/// last push failed less than its backoff ago (then the condition `shown`
/// stays and the push waits for the rest of the backoff).
pub fn sync(
    parent: &SecurityPolicy,
    spec: &FirewallSpec,
    list: &AllowList,
    previous: Option<&FirewallStatus>,
    shown: Option<&Condition>,
    now: &Time,
) -> Push {
    let name = rule_name(parent, spec);
    let rule = rule(&name, list);
    let body = serde_json::to_string(&rule).expect("a rule serializes");
    let hash = content_hash(format!("{}\n{body}", spec.endpoint).as_bytes());
    let previous = previous.cloned().unwrap_or_default();
    if previous.synced_hash.as_deref() == Some(hash.as_str())
        && previous.rule_name == name
        && let Some(id) = &previous.rule_id
    {
        return Push {
            synced: true,
            reason: "Synced".into(),
            message: format!("rule {name} (id {id}) holds the allow-list"),
            status: FirewallStatus {
                failures: 0,
                last_failure: None,
                ..previous.clone()
            },
            retry_after: None,
            event: None,
        };
    }
    if previous.failures > 0
        && let (Some(last), Some(shown)) = (&previous.last_failure, shown)
    {
        let since = now.0.duration_since(last.0).as_secs_f64().max(0.0);
        let wait = backoff(previous.failures).as_secs_f64();
        if since < wait {
            return Push {
                synced: false,
                reason: shown.reason.clone(),
                message: shown.message.clone(),
                status: previous.clone(),
                retry_after: Some(Duration::from_secs_f64(wait - since)),
                event: None,
            };
        }
    }
    let failed = |reason: &str, why: String| {
        let failures = previous.failures.saturating_add(1);
        let retry = backoff(failures);
        let message = format!(
            "{why} (attempt {failures}; retrying in {}s)",
            retry.as_secs()
        );
        Push {
            synced: false,
            reason: reason.to_owned(),
            message: message.clone(),
            status: FirewallStatus {
                rule_name: name.clone(),
                failures,
                last_failure: Some(now.clone()),
                ..previous.clone()
            },
            retry_after: Some(retry),
            event: Some(Event::warning("FirewallSyncFailed", message)),
        }
    };
    let request = Request::put(rule_url(spec, &name)).json(&rule);
    match outbound::send(&request) {
        Ok(response) if response.is_success() => match response.json::<Reply>() {
            Ok(reply) => Push {
                synced: true,
                reason: "Synced".into(),
                message: format!("rule {name} (id {}) holds the allow-list", reply.id),
                status: FirewallStatus {
                    rule_id: Some(reply.id),
                    rule_name: name.clone(),
                    synced_hash: Some(hash),
                    failures: 0,
                    last_failure: None,
                },
                retry_after: None,
                event: Some(Event::normal(
                    "FirewallSynced",
                    format!(
                        "rule {name}: {} sources on {} ports pushed",
                        rule.source_ranges.len(),
                        rule.allowed.len()
                    ),
                )),
            },
            Err(e) => failed("FirewallError", e.to_string()),
        },
        Ok(response) => failed(
            "FirewallError",
            format!(
                "the firewall answered HTTP {}: {}",
                response.status,
                shorten(response.body.trim())
            ),
        ),
        Err(e) => failed(e.reason(), e.to_string()),
    }
}

/// Removes the rule before the SecurityPolicy goes (the finalizer).
pub fn remove(parent: &SecurityPolicy) -> Finalized {
    let Some(spec) = &parent.spec.firewall else {
        return Finalized::done();
    };
    let name = rule_name(parent, spec);
    match outbound::send(&Request::delete(rule_url(spec, &name))) {
        Ok(r) if r.is_success() || r.status == 404 => {
            let mut done = Finalized::done();
            done.events.push(Event::normal(
                "FirewallRuleRemoved",
                format!("rule {name} removed"),
            ));
            done
        }
        // Never allowed (no grant, or the endpoint is not granted): waiting
        // would hold the SecurityPolicy forever for a rule that could never
        // have been written.
        Err(e @ outbound::Error::NotAllowed(_)) => {
            let mut done = Finalized::done();
            done.events.push(Event::warning(
                "FirewallRuleNotRemoved",
                format!("rule {name} left in place: {e}"),
            ));
            done
        }
        Ok(r) => {
            let mut later = Finalized::not_yet(REMOVE_RETRY);
            later.events.push(Event::warning(
                "FirewallRuleNotRemoved",
                format!(
                    "removing rule {name}: the firewall answered HTTP {}",
                    r.status
                ),
            ));
            later
        }
        Err(e) => {
            let mut later = Finalized::not_yet(REMOVE_RETRY);
            later.events.push(Event::warning(
                "FirewallRuleNotRemoved",
                format!("removing rule {name}: {e}"),
            ));
            later
        }
    }
}

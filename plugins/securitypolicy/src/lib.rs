//! # SecurityPolicy plugin
//!
//! The node allow-list operator of the talks (seed 003) as a kuwa plugin: a
//! `SecurityPolicy` (`kuwa.dev/v1alpha1`) lists ports to open and extra
//! source CIDRs; the plugin watches every Node and keeps
//!
//! * a NetworkPolicy `<name>` admitting, on those ports, the InternalIP of
//!   every Node (`/32`, or `/128` for IPv6; sorted, deduplicated) and the
//!   extra CIDRs, for the Pods `spec.podSelector` picks (all by default);
//! * optionally (`spec.firewall.endpoint`), the same allow-list on an
//!   external firewall, through the host's outbound calls ([`firewall`]):
//!   the rule's id and sync state are in `status.firewall`.
//!
//! Nodes coming and going change the allow-list within one reconcile. A
//! malformed port or CIDR is `InvalidSpec`: nothing is applied.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use k8s_openapi::api::core::v1::Node;
use k8s_openapi::api::networking::v1::{
    IPBlock, NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort,
    NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::CustomResource;
use kuwa_sdk::{
    Conditions, Description, Desired, Error, Finalized, Observed, Reconciler, child_meta,
};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub mod firewall;

/// A node allow-list: the cluster's Node IPs (and extra CIDRs) admitted on
/// some ports.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, JsonSchema)]
#[kube(
    group = "kuwa.dev",
    version = "v1alpha1",
    kind = "SecurityPolicy",
    plural = "securitypolicies",
    shortname = "secpol",
    namespaced,
    status = "SecurityPolicyStatus",
    printcolumn = r#"{"name":"Sources","type":"integer","jsonPath":".status.sources"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct SecurityPolicySpec {
    /// The ports to open (at least one).
    pub ports: Vec<PolicyPort>,
    /// Source ranges admitted besides the Node IPs, e.g. `10.20.0.0/16`.
    #[serde(default)]
    pub extra_cidrs: Vec<String>,
    /// Labels of the Pods the policy applies to; empty: every Pod of the
    /// namespace.
    #[serde(default)]
    pub pod_selector: BTreeMap<String, String>,
    /// Push the allow-list to an external firewall as well.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firewall: Option<FirewallSpec>,
}

/// One port to open.
#[derive(Serialize, Deserialize, Clone, Debug, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PolicyPort {
    /// The port number (1-65535).
    pub port: i32,
    /// `TCP` (default), `UDP` or `SCTP`.
    #[serde(default = "tcp")]
    pub protocol: String,
}

fn tcp() -> String {
    "TCP".to_owned()
}

/// Where the firewall's API is.
#[derive(Serialize, Deserialize, Clone, Debug, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct FirewallSpec {
    /// Base URL of the firewall API, e.g. `https://firewall.example.com/v1`
    /// (its origin must be in the plugin's grant, `outbound.hosts`).
    pub endpoint: String,
    /// The rule's name there; default `<namespace>-<name>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule_name: Option<String>,
}

/// What the plugin last did.
#[derive(Serialize, Deserialize, Clone, Debug, Default, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SecurityPolicyStatus {
    /// The generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Nodes whose InternalIP is in the allow-list.
    #[serde(default)]
    pub nodes: i32,
    /// Source ranges in the allow-list (Node IPs and extra CIDRs).
    #[serde(default)]
    pub sources: i32,
    /// The firewall rule, when `spec.firewall` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firewall: Option<FirewallStatus>,
    /// `Ready`, `FirewallSynced` (with a firewall) and `Degraded`.
    #[serde(default)]
    pub conditions: Vec<Condition>,
}

/// The state of the firewall rule.
#[derive(Serialize, Deserialize, Clone, Debug, Default, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct FirewallStatus {
    /// The rule's id, as the firewall returned it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule_id: Option<String>,
    /// The rule's name.
    #[serde(default)]
    pub rule_name: String,
    /// Hash of the allow-list last pushed successfully.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub synced_hash: Option<String>,
    /// Failed pushes since the last success (sets the retry backoff).
    #[serde(default)]
    pub failures: u32,
    /// When the last failed push was made: no push before its backoff
    /// has passed, however often the Nodes change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failure: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
}

/// The plugin.
pub struct SecurityPolicyPlugin;

/// A validated allow-list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowList {
    /// Source ranges, sorted and deduplicated.
    pub sources: Vec<String>,
    /// `(port, protocol)`, sorted and deduplicated.
    pub ports: Vec<(i32, String)>,
    /// How many Nodes contributed an address.
    pub nodes: usize,
}

/// Parses `text` as a CIDR and returns it in canonical form (host bits
/// cleared).
pub fn canonical_cidr(text: &str) -> Result<String, String> {
    let (addr, prefix) = text
        .split_once('/')
        .ok_or_else(|| format!("{text:?} is not a CIDR (address/prefix)"))?;
    let addr: IpAddr = addr
        .parse()
        .map_err(|_| format!("{text:?} is not a CIDR: {addr:?} is not an IP address"))?;
    let bits = if addr.is_ipv4() { 32 } else { 128 };
    let prefix: u32 = prefix
        .parse()
        .ok()
        .filter(|p| *p <= bits)
        .ok_or_else(|| format!("{text:?} is not a CIDR: the prefix must be 0-{bits}"))?;
    let network = match addr {
        IpAddr::V4(a) => {
            let mask = u32::MAX.checked_shl(32 - prefix).unwrap_or(0);
            IpAddr::from(std::net::Ipv4Addr::from(u32::from(a) & mask))
        }
        IpAddr::V6(a) => {
            let mask = u128::MAX.checked_shl(128 - prefix).unwrap_or(0);
            IpAddr::from(std::net::Ipv6Addr::from(u128::from(a) & mask))
        }
    };
    Ok(format!("{network}/{prefix}"))
}

fn validate_ports(ports: &[PolicyPort]) -> Result<Vec<(i32, String)>, Error> {
    if ports.is_empty() {
        return Err(Error::invalid_spec(
            "spec.ports must list at least one port",
        ));
    }
    let mut out = BTreeSet::new();
    for (i, p) in ports.iter().enumerate() {
        if !(1..=65535).contains(&p.port) {
            return Err(Error::invalid_spec(format!(
                "spec.ports[{i}].port must be 1-65535, got {}",
                p.port
            )));
        }
        let protocol = p.protocol.to_ascii_uppercase();
        if !["TCP", "UDP", "SCTP"].contains(&protocol.as_str()) {
            return Err(Error::invalid_spec(format!(
                "spec.ports[{i}].protocol must be TCP, UDP or SCTP, got {:?}",
                p.protocol
            )));
        }
        out.insert((p.port, protocol));
    }
    Ok(out.into_iter().collect())
}

/// The InternalIPs of `nodes`, as host CIDRs.
fn node_sources(nodes: &[Node]) -> (BTreeSet<String>, usize) {
    let mut sources = BTreeSet::new();
    let mut counted = 0;
    for node in nodes {
        let mut any = false;
        let addresses = node
            .status
            .as_ref()
            .and_then(|s| s.addresses.as_ref())
            .map(Vec::as_slice)
            .unwrap_or_default();
        for a in addresses.iter().filter(|a| a.type_ == "InternalIP") {
            if let Ok(ip) = a.address.parse::<IpAddr>() {
                let bits = if ip.is_ipv4() { 32 } else { 128 };
                sources.insert(format!("{ip}/{bits}"));
                any = true;
            }
        }
        counted += usize::from(any);
    }
    (sources, counted)
}

/// Checks the spec and computes the allow-list from the observed Nodes.
pub fn allow_list(spec: &SecurityPolicySpec, nodes: &[Node]) -> Result<AllowList, Error> {
    let ports = validate_ports(&spec.ports)?;
    let (mut sources, counted) = node_sources(nodes);
    for (i, c) in spec.extra_cidrs.iter().enumerate() {
        let cidr = canonical_cidr(c.trim())
            .map_err(|e| Error::invalid_spec(format!("spec.extraCidrs[{i}]: {e}")))?;
        sources.insert(cidr);
    }
    if let Some(fw) = &spec.firewall {
        firewall::validate(fw)?;
    }
    // IPv4 first, then IPv6, each in address order.
    let mut sources: Vec<String> = sources.into_iter().collect();
    sources.sort_by_key(|s| {
        let (addr, prefix) = s.split_once('/').unwrap_or((s, "0"));
        (
            addr.parse::<IpAddr>().ok(),
            prefix.parse::<u32>().unwrap_or(0),
        )
    });
    Ok(AllowList {
        sources,
        ports,
        nodes: counted,
    })
}

fn network_policy(parent: &SecurityPolicy, list: &AllowList) -> NetworkPolicy {
    let name = parent.metadata.name.clone().unwrap_or_default();
    let selector = &parent.spec.pod_selector;
    NetworkPolicy {
        metadata: child_meta(parent, name),
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(LabelSelector {
                match_labels: (!selector.is_empty()).then(|| selector.clone()),
                ..LabelSelector::default()
            }),
            policy_types: Some(vec!["Ingress".to_owned()]),
            ingress: Some(vec![NetworkPolicyIngressRule {
                from: Some(
                    list.sources
                        .iter()
                        .map(|cidr| NetworkPolicyPeer {
                            ip_block: Some(IPBlock {
                                cidr: cidr.clone(),
                                except: None,
                            }),
                            ..NetworkPolicyPeer::default()
                        })
                        .collect(),
                ),
                ports: Some(
                    list.ports
                        .iter()
                        .map(|(port, protocol)| NetworkPolicyPort {
                            port: Some(IntOrString::Int(*port)),
                            protocol: Some(protocol.clone()),
                            ..NetworkPolicyPort::default()
                        })
                        .collect(),
                ),
            }]),
            ..NetworkPolicySpec::default()
        }),
    }
}

impl Reconciler for SecurityPolicyPlugin {
    type Parent = SecurityPolicy;
    type Status = SecurityPolicyStatus;

    fn describe() -> Description {
        Description::new::<SecurityPolicy>("securitypolicy", env!("CARGO_PKG_VERSION"))
            .owns::<NetworkPolicy>()
            .watches::<Node>(kuwa_sdk::RelatedMapping::AllInCluster)
            // The firewall rule lives outside the cluster: removed before
            // the SecurityPolicy is.
            .with_finalizer()
    }

    fn reconcile(
        parent: &SecurityPolicy,
        observed: &Observed,
    ) -> Result<Desired<SecurityPolicyStatus>, Error> {
        let nodes: Vec<Node> = observed.related()?;
        let list = allow_list(&parent.spec, &nodes)?;
        let name = parent.metadata.name.as_deref().unwrap_or_default();
        let applied = observed.child::<NetworkPolicy>(name)?.is_some();
        let previous = parent.status.clone().unwrap_or_default();
        let generation = parent.metadata.generation;
        let conditions = Conditions::new(&previous.conditions, observed.now(), generation);
        let mut desired = Desired::new().child(network_policy(parent, &list));
        let (conditions, firewall, synced) = match &parent.spec.firewall {
            None => (conditions, None, true),
            Some(spec) => {
                let shown = previous
                    .conditions
                    .iter()
                    .find(|c| c.type_ == "FirewallSynced");
                let push = firewall::sync(
                    parent,
                    spec,
                    &list,
                    previous.firewall.as_ref(),
                    shown,
                    observed.now(),
                );
                if let Some(after) = push.retry_after {
                    desired = desired.requeue_after(after);
                }
                if let Some(event) = push.event {
                    desired = desired.event(event);
                }
                (
                    conditions.set("FirewallSynced", push.synced, &push.reason, push.message),
                    Some(push.status),
                    push.synced,
                )
            }
        };
        let sources = list.sources.len();
        let ready_message = if applied {
            format!(
                "{sources} sources ({} nodes) admitted on {} ports",
                list.nodes,
                list.ports.len()
            )
        } else {
            "waiting for the NetworkPolicy to be created".to_owned()
        };
        let conditions = conditions
            .set(
                "Ready",
                applied && synced,
                if !applied {
                    "Applying"
                } else if synced {
                    "AllowListApplied"
                } else {
                    "FirewallNotSynced"
                },
                ready_message,
            )
            .set("Degraded", false, "AsExpected", "the spec is valid");
        Ok(desired.status(SecurityPolicyStatus {
            observed_generation: generation,
            nodes: i32::try_from(list.nodes).unwrap_or(i32::MAX),
            sources: i32::try_from(sources).unwrap_or(i32::MAX),
            firewall,
            conditions: conditions.build(),
        }))
    }

    fn finalize(parent: &SecurityPolicy, _observed: &Observed) -> Result<Finalized, Error> {
        Ok(firewall::remove(parent))
    }
}

#[cfg(feature = "component")]
kuwa_sdk::export_plugin!(SecurityPolicyPlugin);

#[cfg(test)]
mod tests;

//! The reference model and the checker (issue 13).
//!
//! For each shipped plugin, the model is the plugin's own crate run natively
//! (the SDK's fixture harness, no wasm, no host) on what the cluster holds:
//! the parent, its children and the related objects the plugin reads. A host
//! that has converged has reached the plugin's fixed point, so for every
//! parent:
//!
//! * each child the plugin wants exists, is controlled by the parent, and
//!   holds every field the plugin sets (defaults the API server adds are
//!   allowed; quantities compare by value);
//! * no other child is controlled by it (a second object of a kind it
//!   already has is a *duplicate*, any other an *unexpected* child);
//! * its status holds what the plugin computes from the same observation
//!   (`lastTransitionTime` aside), and the host's `Degraded` condition is
//!   `False` (or `True`/`InvalidSpec` when the plugin rejects the spec).
//!
//! Across parents, every child labelled for the plugin whose controller is
//! not a live parent is an *orphan*. [`check`] lists the whole namespace
//! (not a sample) and reports every difference.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;

use anyhow::{Context, Result};
use kube::Client;
use kube::api::{Api, ApiResource, DynamicObject, ListParams};
use kuwa_sdk::testing::Fixture;
use kuwa_sdk::{Description, Reconciler, RelatedMapping};
use serde_json::Value;

/// The label the host puts on every child (`kuwa.dev/plugin=<name>`).
pub const PLUGIN_LABEL: &str = "kuwa.dev/plugin";

type Outcome = std::result::Result<(Vec<Value>, Option<Value>), kuwa_sdk::Error>;

/// One plugin's model: its description and its reconcile, run natively.
pub struct Model {
    /// What the plugin declares (`describe()`): parent, children, related.
    pub description: Description,
    reconcile: fn(&Fixture) -> Outcome,
    settled: fn(&Value) -> bool,
}

fn run<R: Reconciler>(fixture: &Fixture) -> Outcome {
    fixture
        .reconcile::<R>()
        .map(|d| (d.children().to_vec(), d.status_json().cloned()))
}

fn condition_true(parent: &Value, type_: &str) -> bool {
    parent["status"]["conditions"].as_array().is_some_and(|cs| {
        cs.iter()
            .any(|c| c["type"] == type_ && c["status"] == "True")
    })
}

fn always(_: &Value) -> bool {
    true
}

impl Model {
    fn of<R: Reconciler>(settled: fn(&Value) -> bool) -> Self {
        Self {
            description: R::describe(),
            reconcile: run::<R>,
            settled,
        }
    }

    /// WebServer: settled once `Available=True` (its Pods are ready).
    pub fn webserver() -> Self {
        Self::of::<kuwa_plugin_webserver::WebServerPlugin>(|p| condition_true(p, "Available"))
    }

    /// The second WebServer version of the hot-swap tests
    /// (`tests/plugins/webserver-v2`: every child labelled).
    pub fn webserver_v2() -> Self {
        Self::of::<kuwa_testplugin_webserver_v2::Plugin>(|p| condition_true(p, "Available"))
    }

    /// Memcached (its status follows the backends' Pods).
    pub fn memcached() -> Self {
        Self::of::<kuwa_plugin_memcached::MemcachedPlugin>(always)
    }

    /// MLTask (its status follows scheduling and the workers' Pods).
    pub fn mltask() -> Self {
        Self::of::<kuwa_plugin_mltask::MLTaskPlugin>(always)
    }

    /// SecurityPolicy.
    pub fn securitypolicy() -> Self {
        Self::of::<kuwa_plugin_securitypolicy::SecurityPolicyPlugin>(always)
    }

    /// The plugin's name (its label value on children).
    pub fn plugin(&self) -> &str {
        &self.description.name
    }

    /// The parent kind, `group/version/Kind`.
    pub fn parent_kind(&self) -> String {
        gvk_text(&self.description.parent)
    }
}

fn gvk_text(g: &kuwa_sdk::Gvk) -> String {
    format!("{}/{}", g.api_version(), g.kind)
}

fn kube_gvk(g: &kuwa_sdk::Gvk) -> kube::api::GroupVersionKind {
    kube::api::GroupVersionKind::gvk(&g.group, &g.version, &g.kind)
}

/// What [`check`] found: every difference, by parent and child.
#[derive(Debug, Default, Clone)]
pub struct Report {
    /// Parents checked, by plugin.
    pub parents: BTreeMap<String, usize>,
    /// Children seen (labelled for a checked plugin).
    pub children: usize,
    /// Parents that differ from the model (missing or wrong children, wrong
    /// status), one line each per difference.
    pub differs: Vec<String>,
    /// Children whose controller is not a live parent.
    pub orphans: Vec<String>,
    /// A second child of a kind the parent already has the wanted one of.
    pub duplicates: Vec<String>,
    /// Other children the model does not expect.
    pub unexpected: Vec<String>,
    /// Parents the model agrees with that have not reached their settled
    /// state yet (e.g. a WebServer whose Pods are not ready).
    pub unsettled: Vec<String>,
    /// Parents being deleted (a finalizer not released yet).
    pub terminating: Vec<String>,
}

impl Report {
    /// No difference, orphan, duplicate or unexpected child, nothing left
    /// unsettled or terminating.
    pub fn is_clean(&self) -> bool {
        self.differs.is_empty()
            && self.orphans.is_empty()
            && self.duplicates.is_empty()
            && self.unexpected.is_empty()
            && self.unsettled.is_empty()
            && self.terminating.is_empty()
    }

    /// Total parents checked.
    pub fn parent_count(&self) -> usize {
        self.parents.values().sum()
    }

    /// A summary line and the first few findings of each sort.
    pub fn summary(&self) -> String {
        let mut out = format!(
            "{} parents ({:?}), {} children: {} differ, {} orphans, {} duplicates, {} unexpected, {} unsettled, {} terminating",
            self.parent_count(),
            self.parents,
            self.children,
            self.differs.len(),
            self.orphans.len(),
            self.duplicates.len(),
            self.unexpected.len(),
            self.unsettled.len(),
            self.terminating.len()
        );
        for (what, list) in [
            ("differs", &self.differs),
            ("orphan", &self.orphans),
            ("duplicate", &self.duplicates),
            ("unexpected", &self.unexpected),
            ("unsettled", &self.unsettled),
            ("terminating", &self.terminating),
        ] {
            for line in list.iter().take(5) {
                let _ = write!(out, "\n  {what}: {line}");
            }
            if list.len() > 5 {
                let _ = write!(out, "\n  ... {} more {what}", list.len() - 5);
            }
        }
        out
    }
}

async fn resource(client: &Client, gvk: &kuwa_sdk::Gvk) -> Result<(ApiResource, bool)> {
    let (r, caps) = kube::discovery::pinned_kind(client, &kube_gvk(gvk))
        .await
        .with_context(|| format!("discovering {}", gvk_text(gvk)))?;
    Ok((r, matches!(caps.scope, kube::discovery::Scope::Namespaced)))
}

async fn list(
    client: &Client,
    gvk: &kuwa_sdk::Gvk,
    namespace: &str,
    labels: Option<&str>,
) -> Result<Vec<Value>> {
    let (r, namespaced) = resource(client, gvk).await?;
    let api: Api<DynamicObject> = if namespaced {
        Api::namespaced_with(client.clone(), namespace, &r)
    } else {
        Api::all_with(client.clone(), &r)
    };
    let mut params = ListParams::default();
    if let Some(l) = labels {
        params = params.labels(l);
    }
    let items = api
        .list(&params)
        .await
        .with_context(|| format!("listing {}", gvk_text(gvk)))?;
    items
        .items
        .into_iter()
        .map(|mut o| {
            // Lists carry the type once, not per item.
            o.types = Some(kube::api::TypeMeta {
                api_version: gvk.api_version(),
                kind: gvk.kind.clone(),
            });
            Ok(serde_json::to_value(o)?)
        })
        .collect()
}

fn uid(o: &Value) -> &str {
    o["metadata"]["uid"].as_str().unwrap_or_default()
}

fn name(o: &Value) -> &str {
    o["metadata"]["name"].as_str().unwrap_or_default()
}

fn controller(o: &Value) -> Option<&str> {
    o["metadata"]["ownerReferences"]
        .as_array()?
        .iter()
        .find(|r| r["controller"] == true)?["uid"]
        .as_str()
}

fn owned_by(o: &Value, owner: &str) -> bool {
    o["metadata"]["ownerReferences"]
        .as_array()
        .is_some_and(|rs| rs.iter().any(|r| r["uid"] == owner))
}

fn kind_of(o: &Value) -> String {
    format!(
        "{}/{}",
        o["apiVersion"].as_str().unwrap_or_default(),
        o["kind"].as_str().unwrap_or_default()
    )
}

/// A Kubernetes quantity as a number, for comparing `1000m` with `1`.
fn quantity(text: &str) -> Option<f64> {
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '-' || c == '+'))
        .unwrap_or(text.len());
    let (num, suffix) = text.split_at(split);
    let n: f64 = num.parse().ok()?;
    let scale = match suffix {
        "" => 1.0,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "Ki" => 1024.0,
        "Mi" => 1024.0 * 1024.0,
        "Gi" => 1024.0 * 1024.0 * 1024.0,
        "Ti" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        _ => return None,
    };
    Some(n * scale)
}

/// The first path at which `want` is not contained in `have` (objects: every
/// key of `want`; lists: the same length, element-wise), with both values.
pub fn first_difference(want: &Value, have: &Value, path: &str) -> Option<String> {
    match (want, have) {
        (Value::Object(w), Value::Object(h)) => w.iter().find_map(|(k, wv)| {
            if k == "lastTransitionTime" {
                return None;
            }
            let p = format!("{path}.{k}");
            match h.get(k) {
                Some(hv) => first_difference(wv, hv, &p),
                // An absent empty value is the API server dropping it.
                None if is_empty(wv) => None,
                None => Some(format!("{p}: want {wv}, missing")),
            }
        }),
        (Value::Array(w), Value::Array(h)) if w.len() == h.len() => w
            .iter()
            .zip(h)
            .enumerate()
            .find_map(|(i, (wv, hv))| first_difference(wv, hv, &format!("{path}[{i}]"))),
        (Value::String(w), Value::String(h)) if w != h => match (quantity(w), quantity(h)) {
            (Some(a), Some(b)) if (a - b).abs() <= f64::EPSILON * a.abs().max(1.0) => None,
            _ => Some(format!("{path}: want {want}, have {have}")),
        },
        (Value::Number(w), Value::Number(h)) if w.as_f64() == h.as_f64() => None,
        (w, h) if w == h => None,
        _ => Some(format!("{path}: want {want}, have {have}")),
    }
}

/// Labels are the plugin's and the host's alone (no server default adds
/// one): a label left over from another version is a difference.
fn label_difference(want: &Value, have: &Value, plugin: &str) -> Option<String> {
    let mut wanted = want["metadata"]["labels"]
        .as_object()
        .cloned()
        .unwrap_or_default();
    wanted.insert(PLUGIN_LABEL.to_owned(), Value::from(plugin));
    let have = have["metadata"]["labels"]
        .as_object()
        .cloned()
        .unwrap_or_default();
    (wanted != have).then(|| {
        format!(
            ".metadata.labels: want {}, have {}",
            Value::Object(wanted),
            Value::Object(have)
        )
    })
}

fn is_empty(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Object(o) => o.is_empty(),
        Value::Array(a) => a.is_empty(),
        _ => false,
    }
}

/// The status without the host's `Degraded` condition (the host replaces
/// the plugin's) and without times.
fn comparable_status(status: &Value) -> Value {
    let mut s = status.clone();
    if let Some(cs) = s["conditions"].as_array_mut() {
        cs.retain(|c| c["type"] != "Degraded");
    }
    s
}

fn host_condition(parent: &Value) -> Option<&Value> {
    parent["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == "Degraded")
}

fn now_rfc3339() -> String {
    k8s_openapi::jiff::Timestamp::now()
        .round(k8s_openapi::jiff::Unit::Second)
        .map(|t| t.to_string())
        .unwrap_or_else(|_| "2026-01-01T00:00:00Z".into())
}

/// Related objects the plugin would be shown for `parent`.
fn related_for<'a>(
    mapping: &RelatedMapping,
    objects: &'a [Value],
    parent: &Value,
    children: &[&Value],
) -> Vec<&'a Value> {
    let namespace = parent["metadata"]["namespace"].as_str();
    match mapping {
        RelatedMapping::AllInCluster => objects.iter().collect(),
        RelatedMapping::AllInNamespace => objects
            .iter()
            .filter(|o| o["metadata"]["namespace"].as_str() == namespace)
            .collect(),
        RelatedMapping::OwnedByChild => objects
            .iter()
            .filter(|o| children.iter().any(|c| owned_by(o, uid(c))))
            .collect(),
        RelatedMapping::LabelSelectorFromParent(path) => {
            let mut selector = parent;
            for part in path.split('.') {
                selector = &selector[part];
            }
            let want = selector
                .get("matchLabels")
                .unwrap_or(selector)
                .as_object()
                .cloned()
                .unwrap_or_default();
            objects
                .iter()
                .filter(|o| o["metadata"]["namespace"].as_str() == namespace)
                .filter(|o| {
                    want.iter()
                        .all(|(k, v)| o["metadata"]["labels"][k.as_str()] == *v)
                })
                .collect()
        }
    }
}

/// Checks every parent of every model in `namespace` against its model, and
/// every child labelled for one of them.
pub async fn check(client: &Client, namespace: &str, models: &[Model]) -> Result<Report> {
    let mut report = Report::default();
    let now = now_rfc3339();
    for model in models {
        let d = &model.description;
        let plugin = d.name.as_str();
        let parents = list(client, &d.parent, namespace, None).await?;
        let label = format!("{PLUGIN_LABEL}={plugin}");
        let mut children = Vec::new();
        for kind in &d.children {
            children.extend(list(client, kind, namespace, Some(&label)).await?);
        }
        let mut related: Vec<(&RelatedMapping, Vec<Value>)> = Vec::new();
        for (kind, mapping) in &d.related {
            related.push((mapping, list(client, kind, namespace, None).await?));
        }
        report.parents.insert(plugin.to_owned(), parents.len());
        report.children += children.len();
        let live: HashSet<&str> = parents.iter().map(uid).collect();
        for child in &children {
            if !controller(child).is_some_and(|u| live.contains(u)) {
                report
                    .orphans
                    .push(format!("{} {} ({plugin})", kind_of(child), name(child)));
            }
        }
        let mut by_owner: HashMap<&str, Vec<&Value>> = HashMap::new();
        for child in &children {
            if let Some(owner) = controller(child) {
                by_owner.entry(owner).or_default().push(child);
            }
        }
        for parent in &parents {
            let who = format!("{} {}", d.parent.kind, name(parent));
            if !parent["metadata"]["deletionTimestamp"].is_null() {
                report.terminating.push(who);
                continue;
            }
            let mine = by_owner.remove(uid(parent)).unwrap_or_default();
            let mut fixture = Fixture::parent_yaml(&parent.to_string()).at(&now);
            for child in &mine {
                fixture = fixture.child((*child).clone());
            }
            for (mapping, objects) in &related {
                for o in related_for(mapping, objects, parent, &mine) {
                    fixture = fixture.related(o.clone());
                }
            }
            let degraded = host_condition(parent);
            let (wanted, status) = match (model.reconcile)(&fixture) {
                Ok(out) => out,
                Err(kuwa_sdk::Error::InvalidSpec(message)) => {
                    let marked = degraded
                        .is_some_and(|c| c["status"] == "True" && c["reason"] == "InvalidSpec");
                    if !marked {
                        report.differs.push(format!(
                            "{who}: the plugin rejects its spec ({message}) but the host's Degraded is {}",
                            degraded.map(Value::to_string).unwrap_or_else(|| "absent".into())
                        ));
                    }
                    continue;
                }
                Err(e) => {
                    report
                        .differs
                        .push(format!("{who}: the model's reconcile failed: {e}"));
                    continue;
                }
            };
            let mut wanted_keys = HashSet::new();
            for want in &wanted {
                let key = (kind_of(want), name(want).to_owned());
                wanted_keys.insert(key.clone());
                match mine
                    .iter()
                    .find(|c| kind_of(c) == key.0 && name(c) == key.1)
                {
                    None => report
                        .differs
                        .push(format!("{who}: {} {} is missing", key.0, key.1)),
                    Some(have) => {
                        let mut want = want.clone();
                        for k in ["apiVersion", "kind"] {
                            want.as_object_mut().map(|o| o.remove(k));
                        }
                        if let Some(diff) = first_difference(&want, have, "")
                            .or_else(|| label_difference(&want, have, plugin))
                        {
                            report
                                .differs
                                .push(format!("{who}: {} {}: {diff}", key.0, key.1));
                        }
                    }
                }
            }
            for child in &mine {
                let key = (kind_of(child), name(child).to_owned());
                if wanted_keys.contains(&key) {
                    continue;
                }
                let line = format!("{who}: {} {}", key.0, key.1);
                if wanted_keys.iter().any(|(k, _)| *k == key.0) {
                    report.duplicates.push(line);
                } else {
                    report.unexpected.push(line);
                }
            }
            if let Some(want) = status {
                let have = comparable_status(&parent["status"]);
                if let Some(diff) = first_difference(&comparable_status(&want), &have, ".status") {
                    report.differs.push(format!("{who}: {diff}"));
                }
            }
            let healthy = degraded.is_some_and(|c| c["status"] == "False");
            if !healthy {
                report.differs.push(format!(
                    "{who}: the host's Degraded is {}",
                    degraded
                        .map(Value::to_string)
                        .unwrap_or_else(|| "absent".into())
                ));
            } else if !(model.settled)(parent) {
                report.unsettled.push(who);
            }
        }
    }
    Ok(report)
}

/// Checks until the report is clean and holds `parents` parents (so an
/// empty namespace is not "clean"), for at most `timeout`; returns the
/// clean report and how long it took. On timeout the error carries the last
/// report's findings.
pub async fn wait_clean(
    client: &Client,
    namespace: &str,
    models: &[Model],
    parents: usize,
    timeout: std::time::Duration,
) -> Result<(Report, std::time::Duration)> {
    let started = std::time::Instant::now();
    let mut last: Option<Report> = None;
    let mut last_err: Option<anyhow::Error> = None;
    loop {
        match check(client, namespace, models).await {
            Ok(r) if r.is_clean() && r.parent_count() == parents => {
                return Ok((r, started.elapsed()));
            }
            Ok(r) => last = Some(r),
            Err(e) => last_err = Some(e),
        }
        if started.elapsed() >= timeout {
            let found = match (&last, last_err) {
                (Some(r), _) => r.summary(),
                (None, Some(e)) => format!("the check failed: {e:#}"),
                (None, None) => "no check ran".into(),
            };
            anyhow::bail!(
                "{namespace} did not match the reference model with {parents} parents within {timeout:?}: {found}"
            );
        }
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn containment_allows_defaults_and_equal_quantities() {
        let want = json!({"spec": {"replicas": 1, "cpu": "1", "ports": [{"port": 80}]}});
        let have = json!({"spec": {"replicas": 1, "cpu": "1000m", "ports": [{"port": 80, "protocol": "TCP"}], "extra": true}});
        assert_eq!(first_difference(&want, &have, ""), None);
    }

    #[test]
    fn containment_reports_the_first_differing_path() {
        let want = json!({"spec": {"replicas": 2, "ports": [{"port": 80}]}});
        let have = json!({"spec": {"replicas": 1, "ports": [{"port": 80}]}});
        assert_eq!(
            first_difference(&want, &have, "").as_deref(),
            Some(".spec.replicas: want 2, have 1")
        );
        let fewer = json!({"spec": {"replicas": 2, "ports": []}});
        assert!(first_difference(&want, &fewer, "").is_some());
        let missing = json!({"spec": {"ports": [{"port": 80}]}});
        assert!(
            first_difference(&want, &missing, "")
                .unwrap()
                .contains("missing")
        );
        assert!(first_difference(&json!({"q": "2"}), &json!({"q": "1"}), "").is_some());
    }

    #[test]
    fn the_models_are_the_shipped_plugins() {
        let names: Vec<String> = [
            Model::webserver(),
            Model::memcached(),
            Model::mltask(),
            Model::securitypolicy(),
        ]
        .iter()
        .map(|m| m.plugin().to_owned())
        .collect();
        assert_eq!(
            names,
            ["webserver", "memcached", "mltask", "securitypolicy"]
        );
    }
}

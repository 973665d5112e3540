//! The least-privilege RBAC the loaded plugins need (`kuwa rbac`), derived
//! from what each plugin declares and its grant, the way controller-gen
//! derives RBAC from markers.
//!
//! What the host does for a plugin, and the verbs that takes:
//!
//! | what | verbs |
//! |---|---|
//! | the parent kind (shared watch) | get, list, watch |
//! | the parent's status (server-side apply) | patch |
//! | the parent's finalizer, if the plugin has one | patch |
//! | `<parent>/finalizers` (children carry `blockOwnerDeletion`) | update |
//! | child kinds (watch, preflight read, apply, delete) | get, list, watch, create, patch, delete |
//! | related kinds | get, list, watch |
//! | `events.k8s.io` Events on parents | create, patch |
//! | the plugin's CRD, only with `--install-crds` and `installCrd: true` | create; get, patch by name |
//! | the leader Lease | create; get, update, list, watch by name |
//!
//! Reads are cluster-wide (the host's watches are shared by every plugin)
//! unless the host watches one namespace. Writes follow the grant: a plugin
//! granted `namespaces: [a, b]` gets its writes in Roles of `a` and `b`
//! only.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Value, json};

use crate::gvk::Gvk;
use crate::plugin::runtime::LoadedPlugin;

/// Built-in kinds that are cluster-scoped (by `group/kind`). A kind not
/// listed is taken as namespaced; that matters only for `--namespace`,
/// where a cluster-scoped kind's reads must stay in the ClusterRole.
const CLUSTER_SCOPED: &[&str] = &[
    "/Node",
    "/Namespace",
    "/PersistentVolume",
    "storage.k8s.io/StorageClass",
    "storage.k8s.io/CSIDriver",
    "storage.k8s.io/CSINode",
    "scheduling.k8s.io/PriorityClass",
    "networking.k8s.io/IngressClass",
    "rbac.authorization.k8s.io/ClusterRole",
    "rbac.authorization.k8s.io/ClusterRoleBinding",
    "apiextensions.k8s.io/CustomResourceDefinition",
    "admissionregistration.k8s.io/ValidatingWebhookConfiguration",
    "admissionregistration.k8s.io/MutatingWebhookConfiguration",
    "node.k8s.io/RuntimeClass",
];

/// A kind and how it is reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kind {
    /// Its group, version and kind.
    pub gvk: Gvk,
    /// Its resource (plural).
    pub plural: String,
    /// Whether it is namespaced.
    pub namespaced: bool,
}

impl Kind {
    /// A built-in or otherwise known kind: the plural guessed the way kube
    /// does, the scope from [`CLUSTER_SCOPED`].
    pub fn guess(gvk: &Gvk) -> Self {
        let plural = kube::api::ApiResource::from_gvk(&gvk.to_kube()).plural;
        let key = format!("{}/{}", gvk.group, gvk.kind);
        Self {
            gvk: gvk.clone(),
            plural,
            namespaced: !CLUSTER_SCOPED.contains(&key.as_str()),
        }
    }
}

/// What one plugin needs from the API.
#[derive(Debug, Clone)]
pub struct PluginNeeds {
    /// The plugin's name.
    pub name: String,
    /// Its parent kind.
    pub parent: Kind,
    /// Whether it puts the host's finalizer on parents.
    pub finalizer: bool,
    /// The child kinds it may write.
    pub children: Vec<Kind>,
    /// The related kinds it reads.
    pub related: Vec<Kind>,
    /// The CRD the host installs for it, if it does.
    pub crd: Option<String>,
    /// The namespaces its grant limits it to (None: all).
    pub namespaces: Option<BTreeSet<String>>,
}

impl PluginNeeds {
    /// The needs of a loaded plugin; `install_crds`: whether the host runs
    /// with `--install-crds`.
    pub fn of(plugin: &LoadedPlugin, install_crds: bool) -> Self {
        let info = &plugin.info;
        let mut parent = Kind::guess(&info.parent);
        parent.namespaced = info.parent_namespaced;
        let crd_plural = info
            .crd
            .as_ref()
            .and_then(|c| c["spec"]["names"]["plural"].as_str());
        if let Some(plural) = crd_plural {
            parent.plural = plural.to_owned();
        }
        let crd = info
            .crd
            .as_ref()
            .filter(|_| install_crds && plugin.grant.install_crd)
            .and_then(|c| c["metadata"]["name"].as_str().map(str::to_owned));
        Self {
            name: info.name.to_string(),
            parent,
            finalizer: info.finalizer,
            children: info.children.iter().map(Kind::guess).collect(),
            related: info.related.iter().map(|(g, _)| Kind::guess(g)).collect(),
            crd,
            namespaces: plugin.grant.namespaces.clone(),
        }
    }
}

/// Who gets the rules and where the host runs.
#[derive(Debug, Clone)]
pub struct Options {
    /// Name of the ClusterRole, Roles and bindings.
    pub name: String,
    /// The host's ServiceAccount.
    pub service_account: String,
    /// Its namespace.
    pub service_account_namespace: String,
    /// The one namespace the host watches (`kuwa run --namespace`), if any.
    pub watch_namespace: Option<String>,
    /// Whether the host serves ClusterPlugin and Plugin objects.
    pub plugin_resources: bool,
    /// The leader Lease (namespace, name), if leader election is on.
    pub lease: Option<(String, String)>,
}

/// Where a rule applies.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Scope {
    Cluster,
    Namespace(String),
}

/// One rule's key: scope, API group, resource, resource names.
type RuleKey = (Scope, String, String, Vec<String>);

/// Resources sharing a rule: API group, resource names, verbs.
type SharedRule = (String, Vec<String>, Vec<&'static str>);

#[derive(Default)]
struct Rules(BTreeMap<RuleKey, BTreeSet<&'static str>>);

impl Rules {
    fn add(
        &mut self,
        scope: &Scope,
        group: &str,
        resource: &str,
        names: &[String],
        verbs: &[&'static str],
    ) {
        self.0
            .entry((
                scope.clone(),
                group.to_owned(),
                resource.to_owned(),
                names.to_vec(),
            ))
            .or_default()
            .extend(verbs.iter().copied());
    }

    fn add_kind(
        &mut self,
        scopes: &[Scope],
        kind: &Kind,
        subresource: &str,
        verbs: &[&'static str],
    ) {
        let resource = if subresource.is_empty() {
            kind.plural.clone()
        } else {
            format!("{}/{subresource}", kind.plural)
        };
        // A cluster-scoped kind is reached through the ClusterRole whatever
        // the namespaces.
        let cluster = [Scope::Cluster];
        let scopes = if kind.namespaced { scopes } else { &cluster };
        for scope in scopes {
            self.add(scope, &kind.gvk.group, &resource, &[], verbs);
        }
    }

    /// The rules of one scope, merged: resources of one group with the same
    /// verbs and names share a rule.
    fn of(&self, scope: &Scope) -> Vec<Value> {
        let mut merged: BTreeMap<SharedRule, Vec<String>> = BTreeMap::new();
        for ((s, group, resource, names), verbs) in &self.0 {
            if s == scope {
                let mut verbs: Vec<_> = verbs.iter().copied().collect();
                verbs.sort_by_key(|v| VERB_ORDER.iter().position(|o| o == v));
                merged
                    .entry((group.clone(), names.clone(), verbs))
                    .or_default()
                    .push(resource.clone());
            }
        }
        merged
            .into_iter()
            .map(|((group, names, verbs), resources)| {
                let mut rule =
                    json!({"apiGroups": [group], "resources": resources, "verbs": verbs});
                if !names.is_empty() {
                    rule["resourceNames"] = json!(names);
                }
                rule
            })
            .collect()
    }

    fn scopes(&self) -> BTreeSet<Scope> {
        self.0.keys().map(|(s, ..)| s.clone()).collect()
    }
}

const VERB_ORDER: &[&str] = &[
    "get", "list", "watch", "create", "update", "patch", "delete",
];

/// The RBAC objects (ClusterRole and ClusterRoleBinding, Roles and
/// RoleBindings) that `plugins` need, in a stable order.
pub fn objects(plugins: &[PluginNeeds], opts: &Options) -> Vec<Value> {
    let mut rules = Rules::default();
    let read_scope = match &opts.watch_namespace {
        Some(ns) => vec![Scope::Namespace(ns.clone())],
        None => vec![Scope::Cluster],
    };
    let read = ["get", "list", "watch"];
    for p in plugins {
        let write_scope: Vec<Scope> = match &p.namespaces {
            Some(set) => set.iter().map(|ns| Scope::Namespace(ns.clone())).collect(),
            None => read_scope.clone(),
        };
        rules.add_kind(&read_scope, &p.parent, "", &read);
        rules.add_kind(&write_scope, &p.parent, "status", &["patch"]);
        if p.finalizer {
            rules.add_kind(&write_scope, &p.parent, "", &["patch"]);
        }
        if !p.children.is_empty() {
            rules.add_kind(&write_scope, &p.parent, "finalizers", &["update"]);
        }
        for c in &p.children {
            rules.add_kind(&read_scope, c, "", &read);
            rules.add_kind(&write_scope, c, "", &["create", "patch", "delete"]);
        }
        for r in &p.related {
            rules.add_kind(&read_scope, r, "", &read);
        }
        // Events go to the parent's namespace; for a cluster-scoped parent,
        // to `default`.
        let event_scope = if p.parent.namespaced {
            write_scope.clone()
        } else {
            vec![Scope::Namespace("default".into())]
        };
        for scope in &event_scope {
            rules.add(scope, "events.k8s.io", "events", &[], &["create", "patch"]);
        }
        if let Some(crd) = &p.crd {
            let crds = "customresourcedefinitions";
            rules.add(
                &Scope::Cluster,
                "apiextensions.k8s.io",
                crds,
                &[],
                &["create"],
            );
            rules.add(
                &Scope::Cluster,
                "apiextensions.k8s.io",
                crds,
                std::slice::from_ref(crd),
                &["get", "patch"],
            );
        }
    }
    if opts.plugin_resources {
        let scope = read_scope.first().cloned().unwrap_or(Scope::Cluster);
        rules.add(&Scope::Cluster, "kuwa.dev", "clusterplugins", &[], &read);
        rules.add(
            &Scope::Cluster,
            "kuwa.dev",
            "clusterplugins/status",
            &[],
            &["get", "patch"],
        );
        rules.add(&scope, "kuwa.dev", "plugins", &[], &read);
        rules.add(&scope, "kuwa.dev", "plugins/status", &[], &["get", "patch"]);
        rules.add(&scope, "events.k8s.io", "events", &[], &["create", "patch"]);
        // A plugin's writes carry the identity of the ServiceAccount its
        // object names: the host must be allowed to impersonate it.
        rules.add(
            &Scope::Cluster,
            "",
            "serviceaccounts",
            &[],
            &["impersonate"],
        );
    }
    let mut out = Vec::new();
    let subject = json!([{
        "kind": "ServiceAccount",
        "name": opts.service_account,
        "namespace": opts.service_account_namespace,
    }]);
    let labels = json!({"app.kubernetes.io/name": "kuwa", "app.kubernetes.io/component": "rbac"});
    for scope in rules.scopes() {
        let body = rules.of(&scope);
        match &scope {
            Scope::Cluster => {
                out.push(json!({
                    "apiVersion": "rbac.authorization.k8s.io/v1",
                    "kind": "ClusterRole",
                    "metadata": {"name": opts.name, "labels": labels},
                    "rules": body,
                }));
                out.push(json!({
                    "apiVersion": "rbac.authorization.k8s.io/v1",
                    "kind": "ClusterRoleBinding",
                    "metadata": {"name": opts.name, "labels": labels},
                    "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": opts.name},
                    "subjects": subject,
                }));
            }
            Scope::Namespace(ns) => out.extend(role(&opts.name, ns, body, &labels, &subject)),
        }
    }
    if let Some((ns, lease)) = &opts.lease {
        let scope = Scope::Namespace(ns.clone());
        let mut leases = Rules::default();
        leases.add(&scope, "coordination.k8s.io", "leases", &[], &["create"]);
        leases.add(
            &scope,
            "coordination.k8s.io",
            "leases",
            std::slice::from_ref(lease),
            &["get", "list", "watch", "update"],
        );
        let name = format!("{}-leader-election", opts.name);
        let body = leases.of(&scope);
        out.extend(role(&name, ns, body, &labels, &subject));
    }
    out
}

fn role(name: &str, ns: &str, rules: Vec<Value>, labels: &Value, subject: &Value) -> [Value; 2] {
    [
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": {"name": name, "namespace": ns, "labels": labels},
            "rules": rules,
        }),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": name, "namespace": ns, "labels": labels},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
            "subjects": subject,
        }),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn web() -> PluginNeeds {
        PluginNeeds {
            name: "webserver".into(),
            parent: Kind {
                gvk: Gvk::new("kuwa.dev", "v1alpha1", "WebServer"),
                plural: "webservers".into(),
                namespaced: true,
            },
            finalizer: false,
            children: vec![
                Kind::guess(&Gvk::new("apps", "v1", "Deployment")),
                Kind::guess(&Gvk::new("", "v1", "Service")),
            ],
            related: vec![Kind::guess(&Gvk::new("", "v1", "Node"))],
            crd: None,
            namespaces: None,
        }
    }

    fn opts() -> Options {
        Options {
            name: "kuwa".into(),
            service_account: "kuwa".into(),
            service_account_namespace: "kuwa-system".into(),
            watch_namespace: None,
            plugin_resources: false,
            lease: Some(("kuwa-system".into(), "kuwa".into())),
        }
    }

    fn rules_of<'a>(objects: &'a [Value], kind: &str, ns: Option<&str>) -> &'a Vec<Value> {
        objects
            .iter()
            .find(|o| o["kind"] == kind && o["metadata"]["namespace"].as_str() == ns)
            .and_then(|o| o["rules"].as_array())
            .unwrap_or_else(|| panic!("no {kind} in {ns:?}: {objects:#?}"))
    }

    fn verbs(rules: &[Value], group: &str, resource: &str) -> Vec<String> {
        rules
            .iter()
            .filter(|r| {
                r["apiGroups"][0] == group
                    && r["resources"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .any(|x| x == resource)
            })
            .flat_map(|r| {
                r["verbs"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_str().unwrap().to_owned())
            })
            .collect()
    }

    #[test]
    fn each_kind_gets_exactly_the_verbs_the_host_uses() {
        let objects = objects(&[web()], &opts());
        let cluster = rules_of(&objects, "ClusterRole", None);
        assert_eq!(
            verbs(cluster, "kuwa.dev", "webservers"),
            ["get", "list", "watch"]
        );
        assert_eq!(verbs(cluster, "kuwa.dev", "webservers/status"), ["patch"]);
        assert_eq!(
            verbs(cluster, "kuwa.dev", "webservers/finalizers"),
            ["update"]
        );
        assert_eq!(
            verbs(cluster, "apps", "deployments"),
            ["get", "list", "watch", "create", "patch", "delete"]
        );
        assert_eq!(verbs(cluster, "", "nodes"), ["get", "list", "watch"]);
        assert_eq!(
            verbs(cluster, "events.k8s.io", "events"),
            ["create", "patch"]
        );
        assert!(verbs(cluster, "", "secrets").is_empty());
        assert!(verbs(cluster, "apiextensions.k8s.io", "customresourcedefinitions").is_empty());
        let lease = rules_of(&objects, "Role", Some("kuwa-system"));
        assert_eq!(lease.len(), 2, "{lease:#?}");
        assert!(objects.iter().any(|o| o["kind"] == "ClusterRoleBinding"
            && o["subjects"][0]["name"] == "kuwa"
            && o["subjects"][0]["namespace"] == "kuwa-system"));
    }

    #[test]
    fn a_finalizer_and_an_installed_crd_add_their_verbs() {
        let mut p = web();
        p.finalizer = true;
        p.crd = Some("webservers.kuwa.dev".into());
        let objects = objects(&[p], &opts());
        let cluster = rules_of(&objects, "ClusterRole", None);
        assert_eq!(
            verbs(cluster, "kuwa.dev", "webservers"),
            ["get", "list", "watch", "patch"]
        );
        let crd_rules: Vec<_> = cluster
            .iter()
            .filter(|r| r["apiGroups"][0] == "apiextensions.k8s.io")
            .collect();
        assert_eq!(crd_rules.len(), 2, "{crd_rules:#?}");
        assert!(
            crd_rules
                .iter()
                .any(|r| r["resourceNames"] == json!(["webservers.kuwa.dev"])
                    && r["verbs"] == json!(["get", "patch"]))
        );
    }

    #[test]
    fn a_plugin_granted_namespaces_writes_only_there() {
        let mut p = web();
        p.namespaces = Some(["team-a".to_owned(), "team-b".to_owned()].into());
        let objects = objects(&[p], &opts());
        let cluster = rules_of(&objects, "ClusterRole", None);
        assert_eq!(
            verbs(cluster, "apps", "deployments"),
            ["get", "list", "watch"]
        );
        for ns in ["team-a", "team-b"] {
            let role = rules_of(&objects, "Role", Some(ns));
            assert_eq!(
                verbs(role, "apps", "deployments"),
                ["create", "patch", "delete"]
            );
            assert_eq!(verbs(role, "kuwa.dev", "webservers/status"), ["patch"]);
        }
    }

    #[test]
    fn one_watched_namespace_keeps_only_cluster_scoped_reads_cluster_wide() {
        let mut o = opts();
        o.watch_namespace = Some("apps".into());
        let objects = objects(&[web()], &o);
        let cluster = rules_of(&objects, "ClusterRole", None);
        assert_eq!(verbs(cluster, "", "nodes"), ["get", "list", "watch"]);
        assert!(verbs(cluster, "apps", "deployments").is_empty());
        let role = rules_of(&objects, "Role", Some("apps"));
        assert_eq!(
            verbs(role, "apps", "deployments"),
            ["get", "list", "watch", "create", "patch", "delete"]
        );
    }

    #[test]
    fn plurals_follow_kube() {
        assert_eq!(
            Kind::guess(&Gvk::new("networking.k8s.io", "v1", "Ingress")).plural,
            "ingresses"
        );
        assert_eq!(
            Kind::guess(&Gvk::new("networking.k8s.io", "v1", "NetworkPolicy")).plural,
            "networkpolicies"
        );
        assert!(!Kind::guess(&Gvk::new("", "v1", "Node")).namespaced);
        assert!(Kind::guess(&Gvk::new("", "v1", "Pod")).namespaced);
    }
}

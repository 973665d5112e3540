use std::time::Duration;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;

/// An API group, version and kind.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Gvk {
    /// API group; empty for the core group.
    pub group: String,
    /// Version inside the group.
    pub version: String,
    /// Kind.
    pub kind: String,
}

impl Gvk {
    /// The kind of a built-in `k8s-openapi` type, e.g. `Gvk::of::<Deployment>()`.
    pub fn of<K: k8s_openapi::Resource>() -> Self {
        Self {
            group: K::GROUP.to_owned(),
            version: K::VERSION.to_owned(),
            kind: K::KIND.to_owned(),
        }
    }

    /// The kind of a `kube::CustomResource` type.
    pub fn of_custom<K: kube::Resource<DynamicType = ()>>() -> Self {
        Self {
            group: K::group(&()).into_owned(),
            version: K::version(&()).into_owned(),
            kind: K::kind(&()).into_owned(),
        }
    }

    /// `apiVersion` as written in objects: `group/version`, or `version` for
    /// the core group.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }
}

/// Whether the parent kind is namespaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Namespaced objects.
    Namespaced,
    /// Cluster-wide objects.
    Cluster,
}

/// How the host maps objects of a related kind to parents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RelatedMapping {
    /// Objects owned by one of the parent's observed children (Pods of a
    /// StatefulSet the parent owns, say).
    OwnedByChild,
    /// Objects in the parent's namespace matching the label map found at this
    /// JSON pointer in the parent (e.g. `/spec/selector`).
    LabelSelectorFromParent(String),
    /// All objects of the kind in the parent's namespace.
    AllInNamespace,
    /// All objects of a cluster-scoped kind (Nodes, say).
    AllInCluster,
}

/// What a plugin is and what it manages: the typed form of the WIT
/// `description`.
#[derive(Debug, Clone)]
pub struct Description {
    /// Plugin name (a DNS-1123 label); also the API field manager.
    pub name: String,
    /// Plugin version.
    pub version: String,
    /// The parent kind.
    pub parent: Gvk,
    /// Whether parents are namespaced.
    pub parent_scope: Scope,
    /// Child kinds the plugin may return.
    pub children: Vec<Gvk>,
    /// Related kinds the plugin needs to see.
    pub related: Vec<(Gvk, RelatedMapping)>,
    /// Whether the host should hold a finalizer and call `finalize`.
    pub finalizer: bool,
    /// Resync period; `None` means the host's default.
    pub resync: Option<Duration>,
    /// The parent's CustomResourceDefinition.
    pub crd: Option<CustomResourceDefinition>,
}

impl Description {
    /// Describes a plugin reconciling the custom resource `P`, carrying `P`'s
    /// generated CustomResourceDefinition.
    pub fn new<P>(name: impl Into<String>, version: impl Into<String>) -> Self
    where
        P: kube::Resource<DynamicType = ()> + kube::CustomResourceExt,
    {
        let crd = P::crd();
        let parent_scope = if crd.spec.scope == "Cluster" {
            Scope::Cluster
        } else {
            Scope::Namespaced
        };
        Self {
            name: name.into(),
            version: version.into(),
            parent: Gvk::of_custom::<P>(),
            parent_scope,
            children: Vec::new(),
            related: Vec::new(),
            finalizer: false,
            resync: None,
            crd: Some(crd),
        }
    }

    /// Describes a plugin reconciling the built-in kind `K` (e.g.
    /// `networking.k8s.io/v1` Ingress): it carries no CRD, so its grant must
    /// name the kind (`parentKind` in the manifest).
    pub fn for_kind<K>(name: impl Into<String>, version: impl Into<String>) -> Self
    where
        K: k8s_openapi::Resource,
        K::Scope: 'static,
    {
        let cluster = std::any::TypeId::of::<K::Scope>()
            == std::any::TypeId::of::<k8s_openapi::ClusterResourceScope>();
        Self {
            name: name.into(),
            version: version.into(),
            parent: Gvk::of::<K>(),
            parent_scope: if cluster {
                Scope::Cluster
            } else {
                Scope::Namespaced
            },
            children: Vec::new(),
            related: Vec::new(),
            finalizer: false,
            resync: None,
            crd: None,
        }
    }

    /// Declares a child kind the plugin creates and owns.
    pub fn owns<K: k8s_openapi::Resource>(mut self) -> Self {
        self.children.push(Gvk::of::<K>());
        self
    }

    /// Declares a kind the plugin needs to see without owning it.
    pub fn watches<K: k8s_openapi::Resource>(mut self, mapping: RelatedMapping) -> Self {
        self.related.push((Gvk::of::<K>(), mapping));
        self
    }

    /// Asks the host to hold `<group>/finalizer` on parents and call
    /// `finalize` before they are deleted.
    pub fn with_finalizer(mut self) -> Self {
        self.finalizer = true;
        self
    }

    /// Reconciles every parent at least this often.
    pub fn resync_every(mut self, period: Duration) -> Self {
        self.resync = Some(period);
        self
    }
}

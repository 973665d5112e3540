//! Test plugin `pod-parent`: attacks the parent-kind grant (hole 4). It
//! carries no CRD and names core `v1/Pod` as its parent kind, so a host that
//! activates it watches (and writes the status, finalizers and annotations
//! of) every Pod in reach. A manifest without `parentKind: v1/Pod` must get
//! it refused at load with reason "grant".
//!
//! If it ever runs, each Pod gets a ConfigMap `<pod>-seen`.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kuwa_sdk::{Description, Desired, Error, Gvk, Observed, Reconciler, Scope, child_meta};

/// The plugin.
pub struct Plugin;

impl Reconciler for Plugin {
    type Parent = Pod;
    type Status = ();

    fn describe() -> Description {
        Description {
            name: "test-pod-parent".to_owned(),
            version: "0.1.0".to_owned(),
            parent: Gvk::of::<Pod>(),
            parent_scope: Scope::Namespaced,
            children: vec![Gvk::of::<ConfigMap>()],
            related: Vec::new(),
            finalizer: false,
            resync: None,
            crd: None,
        }
    }

    fn reconcile(parent: &Pod, _observed: &Observed) -> Result<Desired<()>, Error> {
        let name = parent.metadata.name.clone().unwrap_or_default();
        Ok(Desired::new().child(ConfigMap {
            metadata: child_meta(parent, format!("{name}-seen")),
            data: Some(BTreeMap::from([("pod".to_owned(), name)])),
            ..ConfigMap::default()
        }))
    }
}

kuwa_sdk::export_plugin!(Plugin);

//! Test plugin `wrong-wit`: a well-formed component for the wrong version of
//! the contract, `kuwa:controller@0.2.0` (its own copy of the WIT in `wit/`).
//!
//! It describes itself as the WebServer plugin, so the only thing wrong with
//! it is the interface version: the host must refuse to link it and keep
//! serving the version it has. It uses `wit-bindgen` directly, as a plugin
//! built against a future SDK would.

/// The bindings of `wit/controller.wit` at version 0.2.0.
#[allow(missing_docs, unsafe_code, clippy::all)]
mod bindings {
    wit_bindgen::generate!({
        path: "wit",
        world: "reconciler",
    });
}

use bindings::exports::kuwa::controller::plugin::Guest;
use bindings::kuwa::controller::types::{
    Description, Desired, Finalized, Gvk, Observed, ReconcileError, Scope,
};

/// The plugin.
pub struct Plugin;

impl Guest for Plugin {
    fn describe() -> Description {
        Description {
            name: "webserver".into(),
            version: "0.3.0-wrong-wit".into(),
            parent: Gvk {
                group: "kuwa.dev".into(),
                version: "v1alpha1".into(),
                kind: "WebServer".into(),
            },
            parent_scope: Scope::Namespaced,
            children: Vec::new(),
            related: Vec::new(),
            finalizer: false,
            resync_seconds: None,
            crd: None,
        }
    }

    fn reconcile(_observed: Observed) -> Result<Desired, ReconcileError> {
        Err(ReconcileError::Transient(
            "wrong-wit must never be called".into(),
        ))
    }

    fn finalize(_observed: Observed) -> Result<Finalized, ReconcileError> {
        Err(ReconcileError::Transient(
            "wrong-wit must never be called".into(),
        ))
    }
}

// Natively (workspace builds and tests) there is no component to export.
// The generated export glue is `unsafe` FFI by nature.
#[cfg(target_arch = "wasm32")]
#[allow(unsafe_code)]
const _: () = {
    bindings::export!(Plugin with_types_in bindings);
};

//! # kuwa-sdk: reconcile plugins for kuwa, in Rust
//!
//! A kuwa plugin is a pure function: given a parent object and what the host
//! observed (its children, related objects, the time), it returns the children
//! that should exist, the parent's status, events and when to look again. The
//! host does every watch, cache and API write; the plugin does no I/O.
//!
//! With this crate a plugin is a type implementing [`Reconciler`] over
//! `k8s-openapi` types and a `kube::CustomResource` spec, exported with
//! [`export_plugin!`]:
//!
//! ```text
//! struct Plugin;
//! impl kuwa_sdk::Reconciler for Plugin {
//!     type Parent = WebServer;
//!     type Status = WebServerStatus;
//!     fn describe() -> Description {
//!         Description::new::<WebServer>("webserver", env!("CARGO_PKG_VERSION")).owns::<ConfigMap>()
//!     }
//!     fn reconcile(parent: &WebServer, observed: &Observed) -> Result<Desired<WebServerStatus>, Error> {
//!         Ok(Desired::new().child(config_map(parent)))
//!     }
//! }
//! kuwa_sdk::export_plugin!(Plugin);
//! ```
//!
//! A plugin whose grant allows it may call systems outside the cluster
//! through the host with [`outbound::send`].
//!
//! The generated WIT bindings stay hidden in [`wit`]; with the `testing`
//! feature, [`testing::Fixture`] runs a reconcile natively against YAML
//! fixtures through the same JSON conversion the component uses.

mod conditions;
mod describe;
mod desired;
mod error;
#[doc(hidden)]
pub mod glue;
pub mod log;
mod meta;
mod observed;
pub mod outbound;
pub mod pods;
#[cfg(feature = "testing")]
pub mod testing;

pub use conditions::Conditions;
pub use describe::{Description, Gvk, RelatedMapping, Scope};
pub use desired::{Desired, Event, EventType, Finalized};
pub use error::Error;
pub use meta::{child_meta, content_hash};
pub use observed::Observed;

pub use k8s_openapi;
pub use serde_json;

/// The generated bindings of `wit/controller.wit`. Not part of the SDK's API:
/// use the types at the crate root instead.
#[doc(hidden)]
#[allow(missing_docs, unsafe_code, clippy::all)]
pub mod wit {
    wit_bindgen::generate!({
        path: "../wit",
        world: "reconciler",
        pub_export_macro: true,
        export_macro_name: "__export_reconciler",
        default_bindings_module: "kuwa_sdk::wit",
    });
}

/// A reconcile plugin. Implement it on a unit struct and export the struct
/// with [`export_plugin!`].
pub trait Reconciler {
    /// The kind this plugin reconciles: a `kube::CustomResource`, or a
    /// built-in `k8s-openapi` type (see [`Description::for_kind`]).
    type Parent: kube::Resource<DynamicType = ()> + serde::de::DeserializeOwned;
    /// The parent's status type.
    type Status: serde::Serialize;

    /// What the plugin is and what it manages. Called on load; must be pure.
    fn describe() -> Description;

    /// Computes the desired children and status of `parent` from what the
    /// host observed. Return [`Error::InvalidSpec`] when the spec can never
    /// work as written: the host then applies nothing and marks the parent
    /// `Degraded`.
    fn reconcile(
        parent: &Self::Parent,
        observed: &Observed,
    ) -> Result<Desired<Self::Status>, Error>;

    /// Cleans up before `parent` is deleted (only called when
    /// [`Description::finalizer`] was set). The default has nothing to clean.
    fn finalize(_parent: &Self::Parent, _observed: &Observed) -> Result<Finalized, Error> {
        Ok(Finalized::done())
    }
}

/// Exports a [`Reconciler`] as the component's `kuwa:controller/plugin`
/// interface. Use it once per plugin crate.
#[macro_export]
macro_rules! export_plugin {
    ($plugin:ty) => {
        // Natively (fixture tests) there is no component to export, and the
        // component export names are not valid native symbol names.
        #[cfg(target_arch = "wasm32")]
        const _: () = {
            struct KuwaExport;
            impl $crate::wit::exports::kuwa::controller::plugin::Guest for KuwaExport {
                fn describe() -> $crate::wit::kuwa::controller::types::Description {
                    $crate::glue::describe::<$plugin>()
                }
                fn reconcile(
                    observed: $crate::wit::kuwa::controller::types::Observed,
                ) -> ::core::result::Result<
                    $crate::wit::kuwa::controller::types::Desired,
                    $crate::wit::kuwa::controller::types::ReconcileError,
                > {
                    $crate::glue::reconcile::<$plugin>(observed)
                }
                fn finalize(
                    observed: $crate::wit::kuwa::controller::types::Observed,
                ) -> ::core::result::Result<
                    $crate::wit::kuwa::controller::types::Finalized,
                    $crate::wit::kuwa::controller::types::ReconcileError,
                > {
                    $crate::glue::finalize::<$plugin>(observed)
                }
            }
    $crate::wit::__export_reconciler!(KuwaExport with_types_in $crate::wit);
        };
    };
}

//! # kuwa-host
//!
//! A Kubernetes controller host whose reconcile logic runs as WebAssembly
//! components. The host owns every watch, cache, queue and API write; plugins
//! are pure reconcile functions behind the `kuwa:controller` WIT interface.
//!
//! Modules follow the data flow (DESIGN §2): [`cache`] (shared watches) →
//! [`queue`] → [`reconcile`] (snapshot, call, [`validate`]) → [`apply`], with
//! the plugin [`runtime`] and [`loader`], [`hotswap`] (the watched plugins
//! directory), the [`controller`] that wires them,
//! [`metrics`] and [`endpoints`], and the [`cli`].

pub mod apply;
pub mod cache;
pub mod cli;
pub mod controller;
pub mod endpoints;
pub mod grant;
pub mod hotswap;
pub mod loader;
pub mod metrics;
pub mod plugin;
pub mod queue;
pub mod reconcile;
pub mod runtime;
pub mod validate;

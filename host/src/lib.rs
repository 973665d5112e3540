//! # kuwa-host
//!
//! A Kubernetes controller host whose reconcile logic runs as WebAssembly
//! components. The host owns every watch, cache, queue and API write; plugins
//! are pure reconcile functions behind the `kuwa:controller` WIT interface.
//!
//! Modules follow the data flow (DESIGN §2), one direction:
//! [`cache`] (shared watches) → [`host`] (the router; assembles the rest) →
//! [`queue`] → [`worker`] → [`reconcile`] (snapshot with [`related`], call,
//! [`validate`]) → [`plan`] (pure: what to write and why) → [`apply`] (the
//! per-plugin writer, the only way to write). Plugins are loaded, run and
//! swapped by [`plugin`]; what each may do is the [`tenant`] boundary;
//! [`active`] binds a loaded plugin to its caches and writer. Around them:
//! [`metrics`] (with [`outage`]: whether the API server answers), [`endpoints`], [`leader`] (who may take keys and write) and
//! the [`cli`].

pub mod active;
pub mod apply;
pub mod cache;
pub mod cli;
pub mod endpoints;
pub mod gvk;
pub mod host;
pub mod leader;
pub mod metrics;
pub mod outage;
pub mod plan;
pub mod plugin;
pub mod queue;
pub mod rbac;
pub mod reconcile;
pub mod related;
pub mod tenant;
pub mod validate;
pub mod worker;

//! The tenant boundary (DESIGN §4): what each plugin may do and the
//! mechanisms that hold it to that.
//!
//! * [`grant`]: the manifest and the grant it yields (namespaces, parent,
//!   child and related kinds, CRD install, child finalizers, budgets);
//! * [`limits`]: per-call sandbox limits and output limits, with the
//!   host-wide defaults and ceilings;
//! * [`outbound`]: the origins a plugin may call over HTTP, and how much;
//! * [`budget`]: the API write budget (a `governor` rate limiter) every write takes from;
//! * [`quarantine`]: the failure streak that sets a plugin aside.

pub mod budget;
pub mod grant;
pub mod limits;
pub mod outbound;
pub mod quarantine;

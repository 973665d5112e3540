//! Plugins (DESIGN §3): what a plugin says about itself ([`info`]), the
//! sandboxed runtime that calls it ([`runtime`]) with its on-disk
//! [`compile_cache`], loading a plugin file with its manifest ([`loader`]),
//! and the watched plugins directory that swaps versions live ([`hotswap`]);
//! plugins as custom resources ([`resource`]) pulled from OCI registries
//! ([`oci`]) and served by [`objects`]; the HTTP calls a plugin may make
//! through the host ([`outbound`]).

pub mod compile_cache;
pub mod hotswap;
pub mod info;
pub mod loader;
pub mod objects;
pub mod oci;
pub mod outbound;
pub mod resource;
pub mod runtime;

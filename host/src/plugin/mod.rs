//! Plugins (DESIGN §3): what a plugin says about itself ([`info`]), the
//! sandboxed runtime that calls it ([`runtime`]) with its on-disk
//! [`compile_cache`], loading a plugin file with its manifest ([`loader`]),
//! and the watched plugins directory that swaps versions live ([`hotswap`]).

pub mod compile_cache;
pub mod hotswap;
pub mod info;
pub mod loader;
pub mod runtime;

//! Plugin runtime: compiles WebAssembly components once and runs each call in
//! a fresh, limited `Store` (DESIGN §3).
//!
//! This is the only module that generates bindings for `wit/`; everyone else
//! uses the types re-exported as [`wit`].

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use wasmtime::component::{Component, HasSelf, Linker, ResourceTable};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store, Trap};
use wasmtime_wasi::{
    HostMonotonicClock, HostWallClock, WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView,
};

use crate::plugin::{DescribeError, PluginInfo};

/// Bindings generated from `wit/controller.wit`.
#[allow(missing_docs)]
mod bindings {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "reconciler",
    });
}

/// The WIT types (`observed`, `desired`, `description`, ...).
pub use bindings::kuwa::controller::types as wit;
use bindings::{Reconciler, ReconcilerPre, kuwa};

/// How often the epoch ticker advances. Deadlines are rounded up to it, so a
/// looping plugin is stopped at most one tick after its deadline.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);

/// Default wall-clock budget of one call. Reconciles are pure JSON
/// transformations that take microseconds to a few milliseconds; a second is
/// far beyond any honest plugin and short enough not to stall its queue.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(1);

/// Default linear-memory cap of one call. A reconcile holds one parent, its
/// children and related objects as JSON twice over (text and parsed); 64 MiB
/// fits thousands of objects. Past the cap the guest's allocation fails and the
/// call ends in a trap reported as [`CallError::MemoryLimit`].
pub const DEFAULT_MEMORY_CAP: usize = 64 << 20;

/// Largest linear memory any plugin may be allowed (the pooling allocator
/// reserves this much address space per slot, never physical memory).
pub const MAX_MEMORY_CAP: usize = 1 << 30;

/// Calls that may run at once across all plugins; the pooling allocator keeps
/// this many instance slots warm.
pub const MAX_CONCURRENT_CALLS: u32 = 64;

/// Per-call limits of a plugin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Wall-clock budget of one call (epoch interruption).
    pub deadline: Duration,
    /// Cap on the guest's linear memory, in bytes.
    pub memory_bytes: usize,
    /// Optional instruction budget per call (wasmtime fuel units); None
    /// means unmetered (the deadline still applies).
    pub fuel: Option<u64>,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            deadline: DEFAULT_DEADLINE,
            memory_bytes: DEFAULT_MEMORY_CAP,
            fuel: None,
        }
    }
}

/// Why a plugin could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The bytes are not a component this engine can compile (corrupt file,
    /// a core module, or a component for another WIT version). Not retryable
    /// until the file changes.
    #[error("not a loadable component: {0}")]
    Compile(String),
    /// The component compiled but does not fit the `reconciler` world (missing
    /// exports or unknown imports). Not retryable until the file changes.
    #[error("component does not implement kuwa:controller/reconciler@0.1.0: {0}")]
    Link(String),
    /// `describe` trapped, timed out or returned something unusable.
    #[error("describe failed: {0}")]
    Describe(#[from] DescribeError),
    /// Calling `describe` failed inside the sandbox.
    #[error("describe call failed: {0}")]
    Call(#[from] CallError),
}

/// Why one call into a plugin failed. Every case fails only the key being
/// reconciled; the host retries it with backoff.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The call ran past its wall-clock deadline and was interrupted.
    #[error("interrupted after exceeding its {0:?} deadline")]
    Timeout(Duration),
    /// The call used up its fuel (instruction budget).
    #[error("ran out of its fuel budget of {0} units")]
    OutOfFuel(u64),
    /// The guest tried to grow its memory past the cap.
    #[error("stopped at its memory cap of {0} bytes")]
    MemoryLimit(usize),
    /// The guest trapped (panic, unreachable, out-of-bounds, ...).
    #[error("trapped: {0}")]
    Trap(String),
    /// No instance could be created (e.g. the instance pool is exhausted).
    #[error("could not instantiate: {0}")]
    Instantiate(String),
}

/// A wall clock frozen at the Unix epoch: plugins get time only through the
/// WIT `context.now`, so their output depends on their input alone.
struct FrozenClock;

impl HostWallClock for FrozenClock {
    fn resolution(&self) -> Duration {
        Duration::from_secs(1)
    }
    fn now(&self) -> Duration {
        Duration::ZERO
    }
}

impl HostMonotonicClock for FrozenClock {
    fn resolution(&self) -> u64 {
        1_000_000_000
    }
    fn now(&self) -> u64 {
        0
    }
}

/// The state of one call's `Store`.
pub struct CallState {
    wasi: WasiCtx,
    table: ResourceTable,
    memory_cap: usize,
    memory_exceeded: bool,
    plugin: Arc<str>,
}

impl CallState {
    fn new(plugin: Arc<str>, memory_cap: usize) -> Self {
        // No preopened directories, environment, arguments, stdio or network:
        // a plugin computes, it does not do I/O.
        let wasi = WasiCtxBuilder::new()
            .wall_clock(FrozenClock)
            .monotonic_clock(FrozenClock)
            .allow_ip_name_lookup(false)
            .allow_tcp(false)
            .allow_udp(false)
            .build();
        Self {
            wasi,
            table: ResourceTable::new(),
            memory_cap,
            memory_exceeded: false,
            plugin,
        }
    }
}

impl WasiView for CallState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl wasmtime::ResourceLimiter for CallState {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.memory_cap {
            self.memory_exceeded = true;
            return Ok(false);
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 100_000)
    }
}

impl kuwa::controller::log::Host for CallState {
    fn log(&mut self, level: kuwa::controller::log::Level, message: String) {
        use kuwa::controller::log::Level;
        let plugin = &*self.plugin;
        match level {
            Level::Trace => tracing::trace!(plugin, "{message}"),
            Level::Debug => tracing::debug!(plugin, "{message}"),
            Level::Info => tracing::info!(plugin, "{message}"),
            Level::Warn => tracing::warn!(plugin, "{message}"),
            Level::Error => tracing::error!(plugin, "{message}"),
        }
    }
}

impl kuwa::controller::types::Host for CallState {}

/// The compiler and instance pool shared by every plugin.
#[derive(Clone)]
pub struct Runtime {
    engine: Engine,
    linker: Arc<Linker<CallState>>,
    cache: Option<Arc<CompileCache>>,
    /// Components compiled in this process, by sha256: identical files are
    /// compiled (or read from disk) once.
    compiled: Arc<std::sync::Mutex<std::collections::HashMap<String, Component>>>,
}

/// Where a component came from when loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheOutcome {
    /// Compiled now (and written to the cache if there is one).
    Compiled,
    /// Read from the on-disk cache.
    Disk,
    /// Already compiled in this process.
    Memory,
}

impl CacheOutcome {
    /// `hit` or `miss`, for metrics and logs.
    pub fn label(self) -> &'static str {
        match self {
            Self::Compiled => "miss",
            Self::Disk | Self::Memory => "hit",
        }
    }
}

/// The on-disk cache of precompiled components: one file per component,
/// named by the component's SHA-256, in a directory named by the engine's
/// compatibility hash (so an engine upgrade or different settings never
/// read another engine's artifacts).
pub struct CompileCache {
    dir: PathBuf,
}

impl CompileCache {
    /// A cache under `root` for `engine`.
    pub fn new(root: &Path, engine: &Engine) -> std::io::Result<Self> {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        let dir = root.join(format!("engine-{:016x}", hasher.finish()));
        std::fs::create_dir_all(&dir)?;
        Ok(Self { dir })
    }

    fn path(&self, sha256: &str) -> PathBuf {
        self.dir.join(format!("{sha256}.cwasm"))
    }

    /// Reads a precompiled component, if this cache has one for `sha256`.
    #[allow(unsafe_code)]
    fn read(&self, engine: &Engine, sha256: &str) -> Option<Component> {
        let path = self.path(sha256);
        if !path.is_file() {
            return None;
        }
        // SAFETY: `Component::deserialize_file` trusts its input to be an
        // artifact this engine produced. These bytes are: only this host
        // writes into the cache directory (it is the user's own cache dir),
        // each file is written by `Component::serialize` of this very engine
        // configuration (the directory is keyed by the engine's
        // precompile-compatibility hash) and named by the SHA-256 of the
        // component it came from, and it is written to a temporary name and
        // renamed, so a partial write is never read. Wasmtime additionally
        // checks the artifact header against the engine and refuses a
        // mismatch.
        match unsafe { Component::deserialize_file(engine, &path) } {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "unusable compile-cache entry; recompiling");
                let _ = std::fs::remove_file(&path);
                None
            }
        }
    }

    fn write(&self, sha256: &str, component: &Component) {
        let path = self.path(sha256);
        let tmp = self
            .dir
            .join(format!(".{sha256}.{}.tmp", std::process::id()));
        let result = component
            .serialize()
            .map_err(|e| std::io::Error::other(format!("{e:#}")))
            .and_then(|bytes| std::fs::write(&tmp, bytes))
            .and_then(|()| std::fs::rename(&tmp, &path));
        if let Err(e) = result {
            let _ = std::fs::remove_file(&tmp);
            tracing::warn!(path = %path.display(), error = %e, "could not write the compile cache");
        }
    }
}

impl Runtime {
    /// Builds the engine (pooling allocator, epoch interruption, fuel
    /// metering) and starts the epoch ticker thread. With `cache_root`,
    /// compiled components are kept on disk there.
    pub fn new(cache_root: Option<&Path>) -> Result<Self, wasmtime::Error> {
        let mut pool = PoolingAllocationConfig::default();
        pool.total_component_instances(MAX_CONCURRENT_CALLS)
            .total_core_instances(MAX_CONCURRENT_CALLS * 8)
            .total_memories(MAX_CONCURRENT_CALLS * 2)
            .total_tables(MAX_CONCURRENT_CALLS * 8)
            .max_memories_per_component(4)
            .max_memory_size(MAX_MEMORY_CAP);
        let mut config = Config::new();
        config
            .wasm_component_model(true)
            .epoch_interruption(true)
            .consume_fuel(true)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine = Engine::new(&config)?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker)?;
        Reconciler::add_to_linker::<_, HasSelf<_>>(&mut linker, |s| s)?;

        // The ticker holds the engine weakly: it ends once the runtime and
        // every plugin compiled by it are gone, releasing the instance pool.
        let weak = engine.weak();
        std::thread::Builder::new()
            .name("kuwa-epoch".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(EPOCH_TICK);
                    match weak.upgrade() {
                        Some(engine) => engine.increment_epoch(),
                        None => return,
                    }
                }
            })
            .map_err(wasmtime::Error::from)?;
        let cache = match cache_root {
            Some(root) => match CompileCache::new(root, &engine) {
                Ok(c) => Some(Arc::new(c)),
                Err(e) => {
                    tracing::warn!(dir = %root.display(), error = %e, "compile cache unavailable; compiling every start");
                    None
                }
            },
            None => None,
        };
        Ok(Self {
            engine,
            linker: Arc::new(linker),
            cache,
            compiled: Arc::default(),
        })
    }

    /// The component for `bytes`: from this process, the disk cache, or
    /// compiled now.
    fn component(
        &self,
        bytes: &[u8],
        sha256: &str,
    ) -> Result<(Component, CacheOutcome), LoadError> {
        if let Some(c) = self
            .compiled
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(sha256)
        {
            return Ok((c.clone(), CacheOutcome::Memory));
        }
        let (component, outcome) = match self
            .cache
            .as_ref()
            .and_then(|c| c.read(&self.engine, sha256))
        {
            Some(c) => (c, CacheOutcome::Disk),
            None => {
                let c = Component::new(&self.engine, bytes)
                    .map_err(|e| LoadError::Compile(format!("{e:#}")))?;
                if let Some(cache) = &self.cache {
                    cache.write(sha256, &c);
                }
                (c, CacheOutcome::Compiled)
            }
        };
        self.compiled
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(sha256.to_owned(), component.clone());
        Ok((component, outcome))
    }

    /// Compiles `bytes`, links it against the `reconciler` world and calls
    /// `describe`.
    pub fn load(&self, bytes: &[u8], limits: Limits) -> Result<LoadedPlugin, LoadError> {
        let sha256 = hex::encode(Sha256::digest(bytes));
        let started = Instant::now();
        let (component, cache) = self.component(bytes, &sha256)?;
        let mut plugin = self.link(component, sha256, limits)?;
        plugin.load_time = started.elapsed();
        plugin.cache = cache;
        Ok(plugin)
    }

    fn link(
        &self,
        component: Component,
        sha256: String,
        limits: Limits,
    ) -> Result<LoadedPlugin, LoadError> {
        let pre = self
            .linker
            .instantiate_pre(&component)
            .map_err(|e| LoadError::Link(format!("{e:#}")))?;
        let pre = ReconcilerPre::new(pre).map_err(|e| LoadError::Link(format!("{e:#}")))?;
        let mut plugin = LoadedPlugin {
            engine: self.engine.clone(),
            pre,
            info: PluginInfo::placeholder(),
            sha256,
            limits: Limits {
                memory_bytes: limits.memory_bytes.min(MAX_MEMORY_CAP),
                ..limits
            },
            load_time: Duration::ZERO,
            cache: CacheOutcome::Compiled,
            grant: crate::grant::Grant::default(),
        };
        let described = plugin.call("(loading)".into(), |bindings, store| {
            bindings.kuwa_controller_plugin().call_describe(store)
        })?;
        plugin.info = PluginInfo::from_wit(described)?;
        Ok(plugin)
    }
}

/// A compiled, described plugin ready to be instantiated per call.
pub struct LoadedPlugin {
    engine: Engine,
    pre: ReconcilerPre<CallState>,
    /// What `describe` said.
    pub info: PluginInfo,
    /// SHA-256 of the component bytes (hex).
    pub sha256: String,
    /// Per-call limits.
    pub limits: Limits,
    /// How long loading took (compile or cache read, link, describe).
    pub load_time: Duration,
    /// Where the compiled code came from.
    pub cache: CacheOutcome,
    /// What the plugin may do (from its manifest; set by the loader).
    pub grant: crate::grant::Grant,
}

impl LoadedPlugin {
    /// Runs `reconcile` in a fresh instance.
    pub fn reconcile(
        &self,
        input: &wit::Observed,
    ) -> Result<Result<wit::Desired, wit::ReconcileError>, CallError> {
        self.call(self.info.name.clone(), |b, s| {
            b.kuwa_controller_plugin().call_reconcile(s, input)
        })
    }

    /// Runs `finalize` in a fresh instance.
    pub fn finalize(
        &self,
        input: &wit::Observed,
    ) -> Result<Result<wit::Finalized, wit::ReconcileError>, CallError> {
        self.call(self.info.name.clone(), |b, s| {
            b.kuwa_controller_plugin().call_finalize(s, input)
        })
    }

    /// Instantiates the component in a fresh `Store` with this plugin's
    /// limits and runs `f`. Blocking: call it off the async executor.
    fn call<R>(
        &self,
        plugin: Arc<str>,
        f: impl FnOnce(&Reconciler, &mut Store<CallState>) -> wasmtime::Result<R>,
    ) -> Result<R, CallError> {
        let mut store = Store::new(
            &self.engine,
            CallState::new(plugin, self.limits.memory_bytes),
        );
        store.limiter(|state| state);
        store
            .set_fuel(self.limits.fuel.unwrap_or(u64::MAX))
            .map_err(|e| CallError::Instantiate(format!("{e:#}")))?;
        let ticks = self
            .limits
            .deadline
            .as_nanos()
            .div_ceil(EPOCH_TICK.as_nanos())
            .max(1);
        store.set_epoch_deadline(u64::try_from(ticks).unwrap_or(u64::MAX));
        store.epoch_deadline_trap();
        let bindings = self.pre.instantiate(&mut store).map_err(|e| {
            if store.data().memory_exceeded {
                CallError::MemoryLimit(self.limits.memory_bytes)
            } else {
                CallError::Instantiate(format!("{e:#}"))
            }
        })?;
        f(&bindings, &mut store).map_err(|e| {
            if store.data().memory_exceeded {
                CallError::MemoryLimit(self.limits.memory_bytes)
            } else if matches!(e.downcast_ref::<Trap>(), Some(Trap::Interrupt)) {
                CallError::Timeout(self.limits.deadline)
            } else if matches!(e.downcast_ref::<Trap>(), Some(Trap::OutOfFuel)) {
                CallError::OutOfFuel(self.limits.fuel.unwrap_or(u64::MAX))
            } else {
                CallError::Trap(format!("{e:#}"))
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each runtime reserves address space for its instance pool; a dropped
    /// runtime must give it back (its epoch ticker must not keep the engine
    /// alive), or a process that builds runtimes repeatedly runs out.
    #[test]
    fn dropped_runtimes_release_their_engine() {
        for _ in 0..40 {
            let runtime = Runtime::new(None).expect("a runtime");
            let weak = runtime.engine.weak();
            drop(runtime);
            let mut gone = false;
            for _ in 0..100 {
                std::thread::sleep(EPOCH_TICK);
                if weak.upgrade().is_none() {
                    gone = true;
                    break;
                }
            }
            assert!(gone, "the engine outlived its runtime");
        }
    }
}

//! Plugin runtime: compiles WebAssembly components once and runs each call in
//! a fresh, limited `Store` (DESIGN §3).
//!
//! This is the only module that generates bindings for `wit/`; everyone else
//! uses the types re-exported as [`wit`].

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
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
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            deadline: DEFAULT_DEADLINE,
            memory_bytes: DEFAULT_MEMORY_CAP,
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
    stop_ticker: Arc<AtomicBool>,
}

impl Runtime {
    /// Builds the engine (pooling allocator, epoch interruption) and starts
    /// the epoch ticker thread.
    pub fn new() -> Result<Self, wasmtime::Error> {
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
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine = Engine::new(&config)?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker)?;
        Reconciler::add_to_linker::<_, HasSelf<_>>(&mut linker, |s| s)?;

        let stop_ticker = Arc::new(AtomicBool::new(false));
        let ticker_engine = engine.clone();
        let stop = stop_ticker.clone();
        std::thread::Builder::new()
            .name("kuwa-epoch".into())
            .spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(EPOCH_TICK);
                    ticker_engine.increment_epoch();
                }
            })
            .map_err(wasmtime::Error::from)?;
        Ok(Self {
            engine,
            linker: Arc::new(linker),
            stop_ticker,
        })
    }

    /// Compiles `bytes`, links it against the `reconciler` world and calls
    /// `describe`.
    pub fn load(&self, bytes: &[u8], limits: Limits) -> Result<LoadedPlugin, LoadError> {
        let sha256 = hex::encode(Sha256::digest(bytes));
        let started = Instant::now();
        let component = Component::new(&self.engine, bytes)
            .map_err(|e| LoadError::Compile(format!("{e:#}")))?;
        let compile_time = started.elapsed();
        self.link(component, sha256, limits, compile_time)
    }

    fn link(
        &self,
        component: Component,
        sha256: String,
        limits: Limits,
        compile_time: Duration,
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
            compile_time,
        };
        let described = plugin.call("(loading)".into(), |bindings, store| {
            bindings.kuwa_controller_plugin().call_describe(store)
        })?;
        plugin.info = PluginInfo::from_wit(described)?;
        Ok(plugin)
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        if Arc::strong_count(&self.stop_ticker) == 1 {
            self.stop_ticker.store(true, Ordering::Relaxed);
        }
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
    /// How long compiling took.
    pub compile_time: Duration,
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
            } else {
                CallError::Trap(format!("{e:#}"))
            }
        })
    }
}

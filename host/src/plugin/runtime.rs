//! Plugin runtime: compiles WebAssembly components once and runs each call in
//! a fresh, limited `Store` (DESIGN §3).
//!
//! This is the only module that generates bindings for `wit/`; everyone else
//! uses the types re-exported as [`wit`].
//!
//! Every call is async and runs under one wall-clock deadline that covers the
//! whole call, host calls included: a guest spinning in wasm is interrupted
//! at the next epoch tick past its deadline, and a guest blocked in a WASI
//! call (a sleep on `wasi:clocks`, a poll) is cancelled by the deadline's
//! timer, since every WASI host call is an `await` point. Nothing a guest can
//! call keeps a thread, a pool slot or a concurrency slot past its deadline.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;
use wasmtime::component::{Component, HasSelf, Linker, ResourceTable};
use wasmtime::{
    Config, Engine, InstanceAllocationStrategy, PoolConcurrencyLimitError, PoolingAllocationConfig,
    Store, Trap, UpdateDeadline,
};
use wasmtime_wasi::{
    Deterministic, HostMonotonicClock, HostWallClock, WasiCtx, WasiCtxBuilder, WasiCtxView,
    WasiView,
};

use crate::plugin::compile_cache::CompileCache;
use crate::plugin::info::{DescribeError, PluginInfo};
use crate::plugin::outbound::{OutboundCall, OutboundLog, Transport};
use crate::tenant::limits::{Limits, MAX_LOG_LINE_BYTES, MAX_MEMORY_CAP};

/// Bindings generated from `wit/controller.wit`.
#[allow(missing_docs)]
mod bindings {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "reconciler",
        imports: { default: async },
        exports: { default: async },
    });
}

/// The WIT types of the `outbound` interface.
pub use bindings::kuwa::controller::outbound as wit_outbound;
/// The WIT types (`observed`, `desired`, `description`, ...).
pub use bindings::kuwa::controller::types as wit;
use bindings::{Reconciler, ReconcilerPre, kuwa};

/// How often the epoch ticker advances. A guest running wasm past its
/// deadline is stopped at most one tick late; between ticks it yields to the
/// async executor, so a spinning guest never holds a worker thread.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);

pub use crate::tenant::limits::MAX_CONCURRENT_CALLS;

/// Core instances one component may have. A Rust guest has a handful (its
/// module and the WASI shims); components built by other toolchains a dozen
/// or so. More is refused at load, so no component can exhaust the pool.
pub const MAX_CORE_INSTANCES_PER_COMPONENT: u32 = 32;

/// Linear memories one component may have (the memory cap applies to their
/// sum).
pub const MAX_MEMORIES_PER_COMPONENT: u32 = 4;

/// Tables one component may have.
pub const MAX_TABLES_PER_COMPONENT: u32 = 32;

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
    #[error("component does not implement kuwa:controller/reconciler@0.1 (0.1.0 or 0.1.1): {0}")]
    Link(String),
    /// `describe` returned something unusable.
    #[error("describe failed: {0}")]
    Describe(#[from] DescribeError),
    /// Calling `describe` failed inside the sandbox (trap, deadline, memory).
    #[error("describe call failed: {0}")]
    Call(#[from] CallError),
}

/// Why one call into a plugin failed. Every case fails only the key being
/// reconciled; the host retries it with backoff.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The call ran past its wall-clock deadline (in wasm or in a host call)
    /// and was stopped.
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
    /// The host could not create an instance (not the plugin's fault).
    #[error("could not instantiate: {0}")]
    Instantiate(String),
}

impl CallError {
    /// Whether the plugin is to blame (as opposed to the host).
    pub fn is_plugin_fault(&self) -> bool {
        !matches!(self, Self::Instantiate(_))
    }
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

/// The bytes `wasi:random` hands a call: derived from the call's input alone,
/// so the same input gives the same "random" bytes and a plugin's output
/// depends on its input alone (a guest's hash maps are seeded from it, for
/// instance). Plugins get no real entropy: they have no use for secrets.
fn random_bytes(seed: &[u8]) -> Vec<u8> {
    // Hash the (kilobytes of) input once; expand from its digest.
    let digest = Sha256::digest(seed);
    (0u8..8)
        .flat_map(|i| {
            let mut h = Sha256::new();
            h.update([i]);
            h.update(digest);
            h.finalize()
        })
        .collect()
}

/// The state of one call's `Store`.
pub struct CallState {
    wasi: WasiCtx,
    table: ResourceTable,
    memory_cap: usize,
    memory_used: usize,
    memory_exceeded: bool,
    plugin: Arc<str>,
    log_lines_left: u32,
    log_dropped: Arc<AtomicU64>,
    outbound: Option<OutboundCall>,
}

impl CallState {
    fn new(
        plugin: Arc<str>,
        limits: &Limits,
        seed: &[u8],
        log_dropped: Arc<AtomicU64>,
        outbound: Option<OutboundCall>,
    ) -> Self {
        // No preopened directories, environment, arguments, stdio or network:
        // a plugin computes, it does not do I/O.
        let random = random_bytes(seed);
        let insecure_seed = u128::from_le_bytes(random[..16].try_into().expect("256 bytes"));
        let wasi = WasiCtxBuilder::new()
            .wall_clock(FrozenClock)
            .monotonic_clock(FrozenClock)
            .secure_random(Deterministic::new(random.clone()))
            .insecure_random(Deterministic::new(random))
            .insecure_random_seed(insecure_seed)
            .allow_ip_name_lookup(false)
            .allow_tcp(false)
            .allow_udp(false)
            .build();
        Self {
            wasi,
            table: ResourceTable::new(),
            memory_cap: limits.memory_bytes,
            memory_used: 0,
            memory_exceeded: false,
            plugin,
            log_lines_left: limits.max_log_lines,
            log_dropped,
            outbound,
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
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        // The cap is for the call, across all of the component's memories.
        let total = self.memory_used.saturating_sub(current) + desired;
        if total > self.memory_cap {
            self.memory_exceeded = true;
            return Ok(false);
        }
        self.memory_used = total;
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

/// A plugin-supplied string cut short for an error message.
pub fn shortened(text: &str) -> String {
    let mut s = text.to_owned();
    truncate(&mut s, 200);
    s
}

/// Cuts `message` to at most `max` bytes on a character boundary.
pub fn truncate(message: &mut String, max: usize) {
    if message.len() > max {
        let mut cut = max;
        while !message.is_char_boundary(cut) {
            cut -= 1;
        }
        message.truncate(cut);
    }
}

impl kuwa::controller::log::Host for CallState {
    async fn log(&mut self, level: kuwa::controller::log::Level, mut message: String) {
        use kuwa::controller::log::Level;
        if self.log_lines_left == 0 {
            self.log_dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.log_lines_left -= 1;
        truncate(&mut message, MAX_LOG_LINE_BYTES);
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

impl kuwa::controller::outbound::Host for CallState {
    async fn send(
        &mut self,
        request: wit_outbound::Request,
    ) -> Result<wit_outbound::Response, wit_outbound::Error> {
        match &mut self.outbound {
            Some(outbound) => outbound.send(request).await,
            None => Err(wit_outbound::Error::NotAllowed(
                "describe may make no outbound call; nothing was sent".into(),
            )),
        }
    }
}

/// Components compiled in this process, by sha256, with how many loaded
/// plugins use each: identical files are compiled (or read from disk) once,
/// and a component no loaded version uses any more is dropped.
#[derive(Default)]
struct Compiled {
    components: HashMap<String, (Component, usize)>,
}

/// A loaded plugin's hold on its compiled component; dropping the last one
/// evicts the component from the runtime.
struct CompiledRef {
    compiled: Arc<Mutex<Compiled>>,
    sha256: String,
}

impl Drop for CompiledRef {
    fn drop(&mut self) {
        let mut compiled = self.compiled.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, users)) = compiled.components.get_mut(&self.sha256) {
            *users -= 1;
            if *users == 0 {
                compiled.components.remove(&self.sha256);
            }
        }
    }
}

/// The compiler and instance pool shared by every plugin.
#[derive(Clone)]
pub struct Runtime {
    engine: Engine,
    linker: Arc<Linker<CallState>>,
    cache: Option<Arc<CompileCache>>,
    compiled: Arc<Mutex<Compiled>>,
    slots: Arc<Semaphore>,
    transport: Transport,
    record_outbound: bool,
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

impl Runtime {
    /// Builds the engine (pooling allocator, epoch interruption, fuel
    /// metering) and starts the epoch ticker thread. With `cache_root`,
    /// compiled components are kept on disk there (if that directory is the
    /// host user's own; otherwise every start compiles, with a warning).
    pub fn new(cache_root: Option<&Path>) -> Result<Self, wasmtime::Error> {
        // Every per-component maximum times the slots fits the totals, so no
        // component (however many core instances, memories or tables it
        // has) can use up what other plugins' calls need: one that needs
        // more is refused when it is loaded.
        let mut pool = PoolingAllocationConfig::default();
        pool.total_component_instances(MAX_CONCURRENT_CALLS)
            .max_core_instances_per_component(MAX_CORE_INSTANCES_PER_COMPONENT)
            .total_core_instances(MAX_CONCURRENT_CALLS * MAX_CORE_INSTANCES_PER_COMPONENT)
            .max_memories_per_component(MAX_MEMORIES_PER_COMPONENT)
            .total_memories(MAX_CONCURRENT_CALLS * MAX_MEMORIES_PER_COMPONENT)
            .max_tables_per_component(MAX_TABLES_PER_COMPONENT)
            .total_tables(MAX_CONCURRENT_CALLS * MAX_TABLES_PER_COMPONENT)
            .total_stacks(MAX_CONCURRENT_CALLS)
            .max_memory_size(MAX_MEMORY_CAP);
        let mut config = Config::new();
        config
            .wasm_component_model(true)
            .epoch_interruption(true)
            .consume_fuel(true)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine = Engine::new(&config)?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
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
            slots: Arc::new(Semaphore::new(MAX_CONCURRENT_CALLS as usize)),
            transport: Transport::default(),
            record_outbound: false,
        })
    }

    /// Answers the outbound calls of the plugins loaded from now on through
    /// `transport`, recording each exchange when `record` (`kuwa plugin
    /// test`).
    pub fn with_outbound(mut self, transport: Transport, record: bool) -> Self {
        self.transport = transport;
        self.record_outbound = record;
        self
    }

    /// Number of distinct components held in memory (for tests and metrics).
    pub fn compiled_components(&self) -> usize {
        self.compiled
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .components
            .len()
    }

    /// The component for `bytes` and a hold on it: from this process, the
    /// disk cache, or compiled now. Blocking (compiling takes a while).
    fn component(
        &self,
        bytes: &[u8],
        sha256: &str,
    ) -> Result<(Component, CompiledRef, CacheOutcome), LoadError> {
        let hold = |component: &Component, compiled: &mut Compiled| {
            let entry = compiled
                .components
                .entry(sha256.to_owned())
                .or_insert_with(|| (component.clone(), 0));
            entry.1 += 1;
            (
                entry.0.clone(),
                CompiledRef {
                    compiled: self.compiled.clone(),
                    sha256: sha256.to_owned(),
                },
            )
        };
        {
            let mut compiled = self.compiled.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((c, _)) = compiled.components.get(sha256) {
                let c = c.clone();
                let (c, r) = hold(&c, &mut compiled);
                return Ok((c, r, CacheOutcome::Memory));
            }
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
        let mut compiled = self.compiled.lock().unwrap_or_else(|e| e.into_inner());
        let (c, r) = hold(&component, &mut compiled);
        Ok((c, r, outcome))
    }

    /// Compiles `bytes` (off the async executor), links it against the
    /// `reconciler` world and calls `describe` under the describe deadline.
    pub async fn load(&self, bytes: Vec<u8>, limits: Limits) -> Result<LoadedPlugin, LoadError> {
        let sha256 = hex::encode(Sha256::digest(&bytes));
        let started = Instant::now();
        let runtime = self.clone();
        let digest = sha256.clone();
        let (component, hold, cache) =
            tokio::task::spawn_blocking(move || runtime.component(&bytes, &digest))
                .await
                .map_err(|e| LoadError::Compile(format!("the compiler thread failed: {e}")))??;
        let pre = self
            .linker
            .instantiate_pre(&component)
            .map_err(|e| LoadError::Link(format!("{e:#}")))?;
        let pre = ReconcilerPre::new(pre).map_err(|e| LoadError::Link(format!("{e:#}")))?;
        let mut plugin = LoadedPlugin {
            engine: self.engine.clone(),
            slots: self.slots.clone(),
            pre,
            info: PluginInfo::placeholder(),
            sha256,
            limits: Limits {
                memory_bytes: limits.memory_bytes.min(MAX_MEMORY_CAP),
                ..limits
            },
            load_time: Duration::ZERO,
            cache,
            grant: crate::tenant::grant::Grant::default(),
            identity: None,
            log_dropped: Arc::default(),
            transport: self.transport.clone(),
            outbound_log: Arc::new(if self.record_outbound {
                OutboundLog::recording()
            } else {
                OutboundLog::default()
            }),
            call_nanos: Default::default(),
            _compiled: hold,
        };
        let described = match plugin
            .call(Call::Describe, plugin.limits.describe_deadline())
            .await?
        {
            Answer::Description(d) => d,
            _ => unreachable!("describe answers with a description"),
        };
        plugin.info = PluginInfo::from_wit(described)?;
        plugin.load_time = started.elapsed();
        Ok(plugin)
    }
}

/// A compiled, described plugin ready to be instantiated per call.
pub struct LoadedPlugin {
    engine: Engine,
    slots: Arc<Semaphore>,
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
    pub grant: crate::tenant::grant::Grant,
    /// The user its writes impersonate (`system:serviceaccount:NS:NAME`),
    /// if any (set by the loader of plugin objects).
    pub identity: Option<String>,
    log_dropped: Arc<AtomicU64>,
    transport: Transport,
    outbound_log: Arc<OutboundLog>,
    /// Nanoseconds spent instantiating and in the guest, summed over calls
    /// since [`LoadedPlugin::take_call_nanos`] last asked.
    call_nanos: [AtomicU64; 2],
    _compiled: CompiledRef,
}

/// One call into a plugin.
enum Call<'a> {
    Describe,
    Reconcile(&'a wit::Observed),
    Finalize(&'a wit::Observed),
}

/// What a call returned.
enum Answer {
    Description(wit::Description),
    Desired(Result<wit::Desired, wit::ReconcileError>),
    Finalized(Result<wit::Finalized, wit::ReconcileError>),
}

impl LoadedPlugin {
    /// Runs `reconcile` in a fresh instance under the plugin's deadline.
    pub async fn reconcile(
        &self,
        input: &wit::Observed,
    ) -> Result<Result<wit::Desired, wit::ReconcileError>, CallError> {
        match self
            .call(Call::Reconcile(input), self.limits.deadline)
            .await?
        {
            Answer::Desired(d) => Ok(d),
            _ => unreachable!("reconcile answers with desired state"),
        }
    }

    /// Runs `finalize` in a fresh instance under the plugin's deadline.
    pub async fn finalize(
        &self,
        input: &wit::Observed,
    ) -> Result<Result<wit::Finalized, wit::ReconcileError>, CallError> {
        match self
            .call(Call::Finalize(input), self.limits.deadline)
            .await?
        {
            Answer::Finalized(f) => Ok(f),
            _ => unreachable!("finalize answers with finalized"),
        }
    }

    /// Log lines the plugin wrote past its per-call limit since the last
    /// time this was asked (they were dropped).
    pub fn take_dropped_log_lines(&self) -> u64 {
        self.log_dropped.swap(0, Ordering::Relaxed)
    }

    /// The outbound calls made since the last time this was asked.
    pub fn take_outbound_calls(&self) -> Vec<crate::plugin::outbound::Logged> {
        self.outbound_log.take()
    }

    /// Time spent instantiating and in the guest (host calls included) since
    /// the last time this was asked, in seconds.
    pub fn take_call_seconds(&self) -> (f64, f64) {
        let take = |a: &AtomicU64| a.swap(0, Ordering::Relaxed) as f64 / 1e9;
        (take(&self.call_nanos[0]), take(&self.call_nanos[1]))
    }

    fn add_call_nanos(&self, stage: usize, since: Instant) {
        let nanos = u64::try_from(since.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.call_nanos[stage].fetch_add(nanos, Ordering::Relaxed);
    }

    /// Waits for an instance slot, instantiates the component in a fresh
    /// `Store` with this plugin's limits and makes `call`, all within
    /// `deadline` (waiting for a slot does not count against it).
    async fn call(&self, call: Call<'_>, deadline: Duration) -> Result<Answer, CallError> {
        let _slot = self
            .slots
            .acquire()
            .await
            .map_err(|e| CallError::Instantiate(format!("no instance slot: {e}")))?;
        let seed = match &call {
            Call::Describe => self.sha256.as_bytes(),
            Call::Reconcile(o) | Call::Finalize(o) => o.parent.as_bytes(),
        };
        let ends = Instant::now() + deadline;
        // Describe must be pure: it gets no outbound calls, whatever the
        // grant.
        // A plugin without an outbound grant gets one with no origin: its
        // calls are refused, and counted like any other refusal.
        let outbound = match &call {
            Call::Reconcile(_) | Call::Finalize(_) => Some(OutboundCall::new(
                self.grant
                    .outbound
                    .clone()
                    .unwrap_or_else(crate::tenant::outbound::OutboundGrant::none),
                self.transport.clone(),
                self.outbound_log.clone(),
                ends,
            )),
            Call::Describe => None,
        };
        let mut store = Store::new(
            &self.engine,
            CallState::new(
                self.info.name.clone(),
                &self.limits,
                seed,
                self.log_dropped.clone(),
                outbound,
            ),
        );
        store.limiter(|state| state);
        store
            .set_fuel(self.limits.fuel.unwrap_or(u64::MAX))
            .map_err(|e| CallError::Instantiate(format!("{e:#}")))?;
        store.set_epoch_deadline(1);
        store.epoch_deadline_callback(move |_| {
            Ok(if Instant::now() >= ends {
                UpdateDeadline::Interrupt
            } else {
                UpdateDeadline::Yield(1)
            })
        });
        let run = async {
            let instantiating = Instant::now();
            let bindings = self.pre.instantiate_async(&mut store).await.map_err(|e| {
                if store.data().memory_exceeded {
                    CallError::MemoryLimit(self.limits.memory_bytes)
                } else if e.downcast_ref::<PoolConcurrencyLimitError>().is_some() {
                    // The host's pool, not the plugin (the slot semaphore
                    // should make this unreachable).
                    CallError::Instantiate(format!("{e:#}"))
                } else {
                    CallError::Trap(format!("instantiating: {e:#}"))
                }
            })?;
            self.add_call_nanos(0, instantiating);
            let calling = Instant::now();
            let plugin = bindings.kuwa_controller_plugin();
            let answer = match call {
                Call::Describe => plugin
                    .call_describe(&mut store)
                    .await
                    .map(Answer::Description),
                Call::Reconcile(o) => plugin
                    .call_reconcile(&mut store, o)
                    .await
                    .map(Answer::Desired),
                Call::Finalize(o) => plugin
                    .call_finalize(&mut store, o)
                    .await
                    .map(Answer::Finalized),
            };
            self.add_call_nanos(1, calling);
            answer.map_err(|e| {
                if store.data().memory_exceeded {
                    CallError::MemoryLimit(self.limits.memory_bytes)
                } else if matches!(e.downcast_ref::<Trap>(), Some(Trap::Interrupt)) {
                    CallError::Timeout(deadline)
                } else if matches!(e.downcast_ref::<Trap>(), Some(Trap::OutOfFuel)) {
                    CallError::OutOfFuel(self.limits.fuel.unwrap_or(u64::MAX))
                } else {
                    CallError::Trap(format!("{e:#}"))
                }
            })
        };
        // The timer covers host calls, where epoch interruption cannot reach:
        // dropping the future cancels the guest wherever it is.
        match tokio::time::timeout(deadline, run).await {
            Ok(result) => result,
            Err(_) => Err(CallError::Timeout(deadline)),
        }
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

    #[test]
    fn random_bytes_depend_on_the_input_alone() {
        assert_eq!(random_bytes(b"parent a"), random_bytes(b"parent a"));
        assert_ne!(random_bytes(b"parent a"), random_bytes(b"parent b"));
        assert_eq!(random_bytes(b"x").len(), 256);
    }

    #[test]
    fn truncation_keeps_characters_whole() {
        let mut s = "ab\u{e9}cd".to_owned();
        truncate(&mut s, 3);
        assert_eq!(s, "ab");
        let mut s = "short".to_owned();
        truncate(&mut s, 100);
        assert_eq!(s, "short");
    }
}

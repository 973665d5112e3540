//! The limits of one plugin call (the sandbox) and of one reconcile's output,
//! with the host-wide defaults and the hard ceilings a manifest cannot lift.

use std::time::Duration;

/// Default wall-clock budget of one call. Reconciles are pure JSON
/// transformations that take microseconds to a few milliseconds; a second is
/// far beyond any honest plugin and short enough not to stall its queue.
/// The budget covers everything the call does, host calls included: a guest
/// blocked in a WASI call (a sleep) is stopped at the deadline too.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(1);

/// Longest deadline a manifest may grant. A reconcile that needs more than
/// this is doing I/O it is not allowed to do, or is broken.
pub const MAX_DEADLINE: Duration = Duration::from_secs(60);

/// Longest time `describe` may take at load and on every new version, even
/// for a plugin granted a longer reconcile deadline: a plugin that cannot
/// describe itself quickly must not hold up start-up or a hot swap.
pub const MAX_DESCRIBE_DEADLINE: Duration = Duration::from_secs(5);

/// Calls that may run at once across all plugins. The pooling allocator has
/// this many instance slots, and a call waits for a free slot before it
/// instantiates, so the pool is never exhausted (and waiting for a slot is
/// never blamed on a plugin).
pub const MAX_CONCURRENT_CALLS: u32 = 64;

/// Reconciles that may be in flight at once (`--max-concurrent-reconciles`,
/// a grant's `concurrency`). A reconcile holds an instance slot only while
/// its plugin runs (a fraction of a millisecond); the rest is waiting for
/// API round trips, so many more reconciles than slots may be in flight.
pub const MAX_CONCURRENT_RECONCILES: usize = 512;

/// Default of `--max-concurrent-reconciles`: enough round trips in flight
/// that one plugin alone is bounded by the API server, not by the host.
pub const DEFAULT_CONCURRENT_RECONCILES: usize = 64;

/// Default linear-memory cap of one call. A reconcile holds one parent, its
/// children and related objects as JSON twice over (text and parsed); 64 MiB
/// fits thousands of objects. Past the cap the guest's allocation fails and the
/// call ends in a trap reported as a memory-limit error.
pub const DEFAULT_MEMORY_CAP: usize = 64 << 20;

/// Largest linear memory any plugin may be allowed (the pooling allocator
/// reserves this much address space per slot, never physical memory).
pub const MAX_MEMORY_CAP: usize = 1 << 30;

/// Default number of log lines one call may send to the host's log; the rest
/// are dropped and counted (`kuwa_plugin_log_dropped_total`). A reconcile
/// that needs more lines than this to explain itself is flooding the log.
pub const DEFAULT_MAX_LOG_LINES: u32 = 100;

/// Longest log line a plugin may write; longer lines are cut here.
pub const MAX_LOG_LINE_BYTES: usize = 4096;

/// Default most children one reconcile may return.
pub const DEFAULT_MAX_CHILDREN: usize = 256;

/// Default most bytes of JSON one reconcile may return (children, status and
/// events). The API server refuses objects over ~1.5 MiB; a few MiB in total
/// leaves room for several large children while stopping a runaway plugin
/// early.
pub const DEFAULT_MAX_OUTPUT_BYTES: usize = 4 << 20;

/// Default most events one reconcile may ask for. Events are API writes;
/// a handful per reconcile tells a user what happened, more is a flood.
pub const DEFAULT_MAX_EVENTS: usize = 16;

/// Longest event message the host records; longer ones are cut (the API
/// server's own limit for `note` is 1 KiB).
pub const MAX_EVENT_MESSAGE_BYTES: usize = 1024;

/// Shortest requeue-after a plugin may ask for (shorter ones are raised to
/// it): a plugin answering "look again in 0 ms" would otherwise keep its
/// concurrency slots busy for ever without failing, so without backoff.
pub const MIN_REQUEUE_AFTER: Duration = Duration::from_secs(1);

/// Shortest resync period a plugin may ask for (shorter ones are raised to
/// it): a resync queues every parent of the plugin.
pub const MIN_RESYNC: Duration = Duration::from_secs(10);

/// Per-call limits of a plugin (the sandbox).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Wall-clock budget of one call, host calls included.
    pub deadline: Duration,
    /// Cap on the guest's linear memory, in bytes.
    pub memory_bytes: usize,
    /// Optional instruction budget per call (wasmtime fuel units); None
    /// means unmetered (the deadline still applies).
    pub fuel: Option<u64>,
    /// Log lines one call may write.
    pub max_log_lines: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            deadline: DEFAULT_DEADLINE,
            memory_bytes: DEFAULT_MEMORY_CAP,
            fuel: None,
            max_log_lines: DEFAULT_MAX_LOG_LINES,
        }
    }
}

impl Limits {
    /// The deadline of a `describe` call.
    pub fn describe_deadline(&self) -> Duration {
        self.deadline.min(MAX_DESCRIBE_DEADLINE)
    }
}

/// Limits on what one reconcile may return.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutputLimits {
    /// Most children.
    pub max_children: usize,
    /// Most bytes of children, status and events.
    pub max_output_bytes: usize,
    /// Most events.
    pub max_events: usize,
}

impl Default for OutputLimits {
    fn default() -> Self {
        Self {
            max_children: DEFAULT_MAX_CHILDREN,
            max_output_bytes: DEFAULT_MAX_OUTPUT_BYTES,
            max_events: DEFAULT_MAX_EVENTS,
        }
    }
}

//! The work queue, keyed by (plugin, parent).
//!
//! * **dedup**: a key waiting in the queue is queued once, however many events
//!   name it;
//! * **per-key serialization**: a key handed to a worker is never handed out
//!   again until the worker reports [`Outcome`]; events arriving meanwhile
//!   mark it dirty and it is queued again on completion;
//! * **backoff**: a key whose reconcile failed waits `BASE_BACKOFF * 2^(n-1)`
//!   (capped at `MAX_BACKOFF`) after its n-th consecutive failure, and stays
//!   in backoff: events, resyncs and `/resync` coalesce into the pending
//!   retry instead of running it early. Only a new version of the plugin
//!   ([`QueueCore::reset_plugin`]) ends a backoff early;
//! * **quarantine**: a quarantined plugin gets at most one key (a probe) per
//!   quarantine interval, however many keys it has; a successful probe or a
//!   new version lifts it;
//! * **delays**: requeue-after from the plugin, resyncs;
//! * **fairness, work-conserving**: keys are handed out round-robin across
//!   plugins. A plugin without a concurrency cap of its own may use every
//!   reconcile slot of the host while it is alone; as soon as other plugins
//!   have work, each gets its fair share (`capacity / busy plugins`) first,
//!   so one plugin's backlog cannot starve another's few keys. A grant's
//!   explicit cap stays a hard cap;
//! * **follow-ups first**: within a plugin, a key queued because its
//!   children or related objects changed (the world answering an earlier
//!   reconcile) goes before a parent not yet looked at, which goes before
//!   bulk work (resyncs, a plugin load, requeues, retries). So a parent
//!   turns ready when its own children do, not after a whole pass over every
//!   other parent. No class starves: one pop in four prefers parent events
//!   and one in eight bulk work.
//!
//! [`QueueCore`] holds the logic with time passed in, so it is unit-tested
//! without sleeping; [`WorkQueue`] wraps it for async workers.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// First retry delay after a failure.
pub const BASE_BACKOFF: Duration = Duration::from_millis(200);
/// Longest retry delay: a broken key is still retried every few minutes.
pub const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// Which object of which plugin.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct QueueKey {
    /// Plugin name.
    pub plugin: Arc<str>,
    /// Parent namespace (None for cluster-scoped parents).
    pub namespace: Option<String>,
    /// Parent name.
    pub name: String,
}

impl std::fmt::Display for QueueKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.namespace {
            Some(ns) => write!(f, "{}:{}/{}", self.plugin, ns, self.name),
            None => write!(f, "{}:{}", self.plugin, self.name),
        }
    }
}

/// How a reconcile ended, reported with [`QueueCore::done`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Success; optionally look again after a delay.
    Success {
        /// Requeue after this long.
        requeue_after: Option<Duration>,
    },
    /// Failure: retry with exponential backoff.
    Failure,
    /// Failure of a quarantined plugin: the key backs off, and the plugin
    /// gets one probe key per quarantine interval until one succeeds.
    Quarantined,
    /// Nothing to do and the plugin was not called (the parent is gone,
    /// outside the grant, or deleted without the host's finalizer): no
    /// requeue, and a quarantine stays as it is.
    Skipped,
}

/// The exponential backoff after `failures` consecutive failures.
pub fn backoff(failures: u32) -> Duration {
    let exp = failures.saturating_sub(1).min(20);
    BASE_BACKOFF.saturating_mul(1u32 << exp).min(MAX_BACKOFF)
}

/// How urgent a queued key is (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Class {
    /// Its children or related objects changed.
    FollowUp = 0,
    /// The parent itself changed (or appeared).
    Parent = 1,
    /// Resyncs, plugin loads, requeues and retries.
    Bulk = 2,
}

impl Class {
    fn of(trigger: &str) -> Self {
        match trigger {
            "child changed" | "child deleted" | "related changed" => Self::FollowUp,
            "parent changed" => Self::Parent,
            _ => Self::Bulk,
        }
    }
}

#[derive(Debug, Default)]
struct PluginLane {
    /// Ready keys by [`Class`]. A key moved to a more urgent class leaves a
    /// stale entry behind, skipped when it comes up.
    ready: [VecDeque<QueueKey>; 3],
    /// Keys of this lane in `queued`.
    queued: usize,
    /// Pops so far (for the class schedule).
    pops: u64,
    in_flight: usize,
    /// A hard cap from the grant; None: work-conserving (up to the host's
    /// capacity, a fair share under contention).
    max_in_flight: Option<usize>,
    quarantine_interval: Duration,
    /// While quarantined: when the next probe key may be handed out.
    next_probe: Option<Instant>,
}

/// Why a key waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wait {
    /// Requeue-after or a scheduled look: an event may run it earlier.
    Delay,
    /// A retry after failures: events coalesce into it.
    Backoff,
}

/// The queue's logic, with time passed in by the caller.
#[derive(Debug, Default)]
pub struct QueueCore {
    lanes: HashMap<Arc<str>, PluginLane>,
    /// Round-robin order of plugins.
    order: Vec<Arc<str>>,
    next_lane: usize,
    /// Reconcile slots of the host (for fair shares).
    capacity: usize,
    queued: HashMap<QueueKey, (&'static str, Class)>,
    in_flight: HashSet<QueueKey>,
    dirty: HashMap<QueueKey, &'static str>,
    delayed: BTreeSet<(Instant, u64, QueueKey)>,
    delayed_at: HashMap<QueueKey, (Instant, u64, &'static str, Wait)>,
    seq: u64,
    failures: HashMap<QueueKey, u32>,
}

impl QueueCore {
    /// An empty queue.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets how many reconciles the host runs at once, across plugins: the
    /// most a plugin without a cap of its own may have in flight, and what
    /// fair shares divide.
    pub fn set_capacity(&mut self, capacity: usize) {
        self.capacity = capacity.max(1);
    }

    fn capacity(&self) -> usize {
        if self.capacity == 0 {
            usize::MAX
        } else {
            self.capacity
        }
    }

    /// Registers a plugin with its concurrency cap (None: work-conserving)
    /// and quarantine interval (or updates them).
    pub fn set_plugin(
        &mut self,
        plugin: Arc<str>,
        max_in_flight: Option<usize>,
        quarantine: Duration,
    ) {
        let lane = self.lanes.entry(plugin.clone()).or_default();
        lane.max_in_flight = max_in_flight.map(|m| m.max(1));
        lane.quarantine_interval = quarantine;
        if !self.order.contains(&plugin) {
            self.order.push(plugin);
        }
    }

    /// A new version of `plugin` is serving: its quarantine is lifted, and
    /// every key in backoff is ready now.
    pub fn reset_plugin(&mut self, plugin: &str) {
        if let Some(lane) = self.lanes.get_mut(plugin) {
            lane.next_probe = None;
        }
        self.failures.retain(|k, _| &*k.plugin != plugin);
        let backing_off: Vec<(QueueKey, &'static str)> = self
            .delayed_at
            .iter()
            .filter(|(k, (_, _, _, wait))| &*k.plugin == plugin && *wait == Wait::Backoff)
            .map(|(k, (_, _, trigger, _))| (k.clone(), *trigger))
            .collect();
        for (key, trigger) in backing_off {
            self.undelay(&key);
            self.add(key, trigger);
        }
    }

    /// Whether `plugin`'s lane is quarantined.
    pub fn is_quarantined(&self, plugin: &str) -> bool {
        self.lanes
            .get(plugin)
            .is_some_and(|l| l.next_probe.is_some())
    }

    /// Forgets a plugin and every key of it (keys in flight finish but are
    /// not requeued).
    pub fn remove_plugin(&mut self, plugin: &str) {
        self.lanes.remove(plugin);
        self.order.retain(|p| &**p != plugin);
        self.queued.retain(|k, _| &*k.plugin != plugin);
        self.dirty.retain(|k, _| &*k.plugin != plugin);
        self.failures.retain(|k, _| &*k.plugin != plugin);
        self.delayed.retain(|(_, _, k)| &*k.plugin != plugin);
        self.delayed_at.retain(|k, _| &*k.plugin != plugin);
    }

    fn undelay(&mut self, key: &QueueKey) -> Option<(Instant, &'static str, Wait)> {
        let (at, seq, trigger, wait) = self.delayed_at.remove(key)?;
        self.delayed.remove(&(at, seq, key.clone()));
        Some((at, trigger, wait))
    }

    /// Queues `key` now, with why (for logs and its class). Keys of unknown
    /// plugins are dropped; a key in backoff stays there (the event is folded
    /// into the pending retry); a queued key moves up to the more urgent
    /// class of a new trigger.
    pub fn add(&mut self, key: QueueKey, trigger: &'static str) {
        let class = Class::of(trigger);
        if !self.lanes.contains_key(&key.plugin) {
            return;
        }
        if self.in_flight.contains(&key) {
            let dirty = self.dirty.entry(key).or_insert(trigger);
            if class < Class::of(dirty) {
                *dirty = trigger;
            }
            return;
        }
        if let Some(queued) = self.queued.get_mut(&key) {
            if class < queued.1 {
                *queued = (trigger, class);
                if let Some(lane) = self.lanes.get_mut(&key.plugin) {
                    lane.ready[class as usize].push_back(key);
                }
            }
            return;
        }
        if let Some(&(_, _, _, wait)) = self.delayed_at.get(&key) {
            if wait == Wait::Backoff {
                return;
            }
            self.undelay(&key);
        }
        if let Some(lane) = self.lanes.get_mut(&key.plugin) {
            lane.ready[class as usize].push_back(key.clone());
            lane.queued += 1;
            self.queued.insert(key, (trigger, class));
        }
    }

    fn delay(&mut self, key: QueueKey, at: Instant, trigger: &'static str, wait: Wait) {
        self.seq += 1;
        self.delayed.insert((at, self.seq, key.clone()));
        self.delayed_at.insert(key, (at, self.seq, trigger, wait));
    }

    /// Queues `key` at `at` (keeping an earlier pending time if there is one,
    /// and never shortening a backoff).
    pub fn add_at(&mut self, key: QueueKey, at: Instant, trigger: &'static str) {
        if !self.lanes.contains_key(&key.plugin) || self.queued.contains_key(&key) {
            return;
        }
        if let Some(&(existing, _, _, wait)) = self.delayed_at.get(&key) {
            if existing <= at || wait == Wait::Backoff {
                return;
            }
            self.undelay(&key);
        }
        self.delay(key, at, trigger, Wait::Delay);
    }

    /// Moves every delayed key that is due at `now` into the ready lanes.
    pub fn promote_due(&mut self, now: Instant) {
        while let Some((at, _, _)) = self.delayed.first() {
            if *at > now {
                break;
            }
            let Some((_, _, key)) = self.delayed.pop_first() else {
                break;
            };
            let trigger = self
                .delayed_at
                .remove(&key)
                .map_or("requeue", |(_, _, t, _)| t);
            self.add(key, trigger);
        }
    }

    /// Time until the next delayed key or quarantine probe is due, if any.
    pub fn next_due(&self, now: Instant) -> Option<Duration> {
        let delayed = self.delayed.first().map(|(at, _, _)| *at);
        let probes = self
            .lanes
            .values()
            .filter(|l| l.queued > 0)
            .filter_map(|l| l.next_probe);
        delayed
            .into_iter()
            .chain(probes)
            .min()
            .map(|at| at.saturating_duration_since(now))
    }

    /// Hands out the next key, round-robin across plugins that have a ready
    /// key and room: first among plugins below their fair share of the
    /// host's capacity, then among any below their cap (a quarantined
    /// plugin: only when its next probe is due). The key is in flight until
    /// [`QueueCore::done`].
    pub fn pop(&mut self, now: Instant) -> Option<(QueueKey, &'static str)> {
        let capacity = self.capacity();
        let busy = self
            .lanes
            .values()
            .filter(|l| l.queued > 0 || l.in_flight > 0)
            .count()
            .max(1);
        let share = (capacity / busy).max(1);
        for fair in [true, false] {
            if let Some(next) = self.pop_from_lanes(now, capacity, fair.then_some(share)) {
                return Some(next);
            }
        }
        None
    }

    fn pop_from_lanes(
        &mut self,
        now: Instant,
        capacity: usize,
        share: Option<usize>,
    ) -> Option<(QueueKey, &'static str)> {
        let n = self.order.len();
        for i in 0..n {
            let idx = (self.next_lane + i) % n;
            let plugin = self.order[idx].clone();
            let Some(lane) = self.lanes.get_mut(&plugin) else {
                continue;
            };
            let cap = lane.max_in_flight.unwrap_or(capacity);
            let room = share.map_or(cap, |s| s.min(cap));
            if lane.queued == 0 || lane.in_flight >= room {
                continue;
            }
            if let Some(probe) = lane.next_probe
                && (probe > now || lane.in_flight > 0)
            {
                continue;
            }
            if let Some(key) = next_of_lane(lane, &self.queued) {
                lane.in_flight += 1;
                lane.queued -= 1;
                if lane.next_probe.is_some() {
                    lane.next_probe = Some(now + lane.quarantine_interval);
                }
                self.next_lane = (idx + 1) % n;
                let trigger = self.queued.remove(&key).map_or("event", |(t, _)| t);
                self.in_flight.insert(key.clone());
                return Some((key, trigger));
            }
        }
        None
    }

    /// Reports that the worker holding `key` finished.
    pub fn done(&mut self, key: &QueueKey, outcome: Outcome, now: Instant) {
        if !self.in_flight.remove(key) {
            return;
        }
        if let Some(lane) = self.lanes.get_mut(&key.plugin) {
            lane.in_flight = lane.in_flight.saturating_sub(1);
            match outcome {
                // Only a call that went through lifts a quarantine.
                Outcome::Success { .. } => lane.next_probe = None,
                Outcome::Quarantined if lane.next_probe.is_none() => {
                    lane.next_probe = Some(now + lane.quarantine_interval);
                }
                _ => {}
            }
        }
        match outcome {
            Outcome::Success { requeue_after } => {
                self.failures.remove(key);
                if let Some(after) = requeue_after {
                    self.add_at(key.clone(), now + after, "requeue");
                }
            }
            Outcome::Skipped => {
                self.failures.remove(key);
            }
            Outcome::Failure | Outcome::Quarantined => {
                let failures = self.failures.entry(key.clone()).or_insert(0);
                *failures += 1;
                let delay = backoff(*failures);
                self.undelay(key);
                self.delay(key.clone(), now + delay, "retry", Wait::Backoff);
            }
        }
        if let Some(trigger) = self.dirty.remove(key) {
            // Something changed while the key was being reconciled: look again
            // now. A failing key is in backoff, which the event joins.
            self.add(key.clone(), trigger);
        }
    }

    /// Consecutive failures of `key`.
    pub fn failures(&self, key: &QueueKey) -> u32 {
        self.failures.get(key).copied().unwrap_or(0)
    }

    /// Keys waiting (ready or delayed) per plugin, for the queue-depth gauge.
    pub fn depth(&self) -> HashMap<Arc<str>, usize> {
        let mut depth: HashMap<Arc<str>, usize> =
            self.order.iter().map(|p| (p.clone(), 0)).collect();
        for key in self.queued.keys().chain(self.delayed_at.keys()) {
            *depth.entry(key.plugin.clone()).or_default() += 1;
        }
        depth
    }

    /// Keys being reconciled now, of every plugin.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Keys of `plugin` being reconciled now (they finish even after the
    /// plugin is removed).
    pub fn in_flight_of(&self, plugin: &str) -> usize {
        self.in_flight
            .iter()
            .filter(|k| &*k.plugin == plugin)
            .count()
    }

    /// Keys ready now or in flight (not counting delayed ones).
    pub fn busy(&self) -> usize {
        self.queued.len() + self.in_flight.len()
    }
}

/// The next key of `lane` by the class schedule: follow-ups first, but one
/// pop in four prefers parent events and one in eight bulk work, so no
/// class starves. Stale entries (keys moved to a more urgent class, or
/// handed out already) are dropped on the way.
fn next_of_lane(
    lane: &mut PluginLane,
    queued: &HashMap<QueueKey, (&'static str, Class)>,
) -> Option<QueueKey> {
    lane.pops += 1;
    let preferred = if lane.pops.is_multiple_of(8) {
        [Class::Bulk, Class::FollowUp, Class::Parent]
    } else if lane.pops.is_multiple_of(4) {
        [Class::Parent, Class::FollowUp, Class::Bulk]
    } else {
        [Class::FollowUp, Class::Parent, Class::Bulk]
    };
    for class in preferred {
        let ready = &mut lane.ready[class as usize];
        while let Some(key) = ready.pop_front() {
            if queued.get(&key).is_some_and(|(_, c)| *c == class) {
                return Some(key);
            }
        }
    }
    None
}

/// The async work queue shared by the event router and the workers.
#[derive(Debug, Default)]
pub struct WorkQueue {
    core: Mutex<QueueCore>,
    wake: Notify,
}

impl WorkQueue {
    /// An empty queue.
    pub fn new() -> Self {
        Self::default()
    }

    /// Runs `f` on the core under the lock, then wakes a waiting worker.
    pub fn with<R>(&self, f: impl FnOnce(&mut QueueCore) -> R) -> R {
        let r = f(&mut self.core.lock().unwrap_or_else(|e| e.into_inner()));
        self.wake.notify_waiters();
        self.wake.notify_one();
        r
    }

    /// Runs `f` on the core under the lock without waking a worker: for
    /// bookkeeping that makes no key ready (a key in flight marked dirty is
    /// made ready by its `done`, which wakes).
    pub fn locked<R>(&self, f: impl FnOnce(&mut QueueCore) -> R) -> R {
        f(&mut self.core.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Queues `key` now.
    pub fn add(&self, key: QueueKey, trigger: &'static str) {
        self.with(|q| q.add(key, trigger));
    }

    /// Queues `key` after `delay`.
    pub fn add_after(&self, key: QueueKey, delay: Duration, trigger: &'static str) {
        self.with(|q| q.add_at(key, Instant::now() + delay, trigger));
    }

    /// Reports the end of a reconcile.
    pub fn done(&self, key: &QueueKey, outcome: Outcome) {
        self.with(|q| q.done(key, outcome, Instant::now()));
    }

    /// Waits for the next key to reconcile.
    pub async fn next(&self) -> (QueueKey, &'static str) {
        loop {
            let notified = self.wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let wait = {
                let mut q = self.core.lock().unwrap_or_else(|e| e.into_inner());
                let now = Instant::now();
                q.promote_due(now);
                if let Some(next) = q.pop(now) {
                    return next;
                }
                q.next_due(Instant::now())
            };
            match wait {
                Some(delay) => {
                    tokio::select! {
                        () = &mut notified => {}
                        () = tokio::time::sleep(delay) => {}
                    }
                }
                None => notified.await,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const QUARANTINE: Duration = Duration::from_secs(60);

    fn key(plugin: &str, name: &str) -> QueueKey {
        QueueKey {
            plugin: Arc::from(plugin),
            namespace: Some("ns".into()),
            name: name.into(),
        }
    }

    fn core(plugins: &[(&str, usize)]) -> QueueCore {
        let mut q = QueueCore::new();
        for (p, c) in plugins {
            q.set_plugin(Arc::from(*p), Some(*c), QUARANTINE);
        }
        q
    }

    #[test]
    fn dedups_queued_keys() {
        let mut q = core(&[("a", 4)]);
        q.add(key("a", "x"), "event");
        q.add(key("a", "x"), "event");
        q.add(key("a", "y"), "event");
        assert_eq!(q.pop(Instant::now()).unwrap().0, key("a", "x"));
        assert_eq!(q.pop(Instant::now()).unwrap().0, key("a", "y"));
        assert!(q.pop(Instant::now()).is_none());
    }

    #[test]
    fn never_hands_out_a_key_twice_at_once() {
        let now = Instant::now();
        let mut q = core(&[("a", 4)]);
        q.add(key("a", "x"), "event");
        let (k, _) = q.pop(Instant::now()).unwrap();
        // Events while in flight mark it dirty instead of queueing it.
        q.add(key("a", "x"), "child changed");
        q.add(key("a", "x"), "child changed");
        assert!(
            q.pop(Instant::now()).is_none(),
            "an in-flight key must not be handed out again"
        );
        q.done(
            &k,
            Outcome::Success {
                requeue_after: None,
            },
            now,
        );
        // ...and it comes back exactly once afterwards, with its trigger.
        assert_eq!(
            q.pop(Instant::now()),
            Some((key("a", "x"), "child changed"))
        );
        assert!(q.pop(Instant::now()).is_none());
    }

    #[test]
    fn failures_back_off_exponentially_and_success_resets() {
        let t0 = Instant::now();
        let mut q = core(&[("a", 1)]);
        let k = key("a", "x");
        q.add(k.clone(), "event");
        let mut now = t0;
        for n in 1..=4u32 {
            let (got, _) = q.pop(Instant::now()).unwrap();
            q.done(&got, Outcome::Failure, now);
            assert_eq!(q.failures(&k), n);
            let wait = q.next_due(now).unwrap();
            assert_eq!(wait, BASE_BACKOFF * 2u32.pow(n - 1));
            // Not due a moment before the backoff...
            q.promote_due(now + wait - Duration::from_millis(1));
            assert!(q.pop(Instant::now()).is_none());
            // ...due at it.
            now += wait;
            q.promote_due(now);
        }
        let (got, trigger) = q.pop(Instant::now()).unwrap();
        assert_eq!(trigger, "retry");
        q.done(
            &got,
            Outcome::Success {
                requeue_after: None,
            },
            now,
        );
        assert_eq!(q.failures(&k), 0);
        assert!(q.next_due(now).is_none());
    }

    #[test]
    fn backoff_is_capped() {
        assert_eq!(backoff(1), BASE_BACKOFF);
        assert_eq!(backoff(2), BASE_BACKOFF * 2);
        assert_eq!(backoff(100), MAX_BACKOFF);
    }

    #[test]
    fn an_event_during_a_failed_reconcile_does_not_skip_the_backoff() {
        let now = Instant::now();
        let mut q = core(&[("a", 1)]);
        q.add(key("a", "x"), "event");
        let (k, _) = q.pop(now).unwrap();
        q.add(key("a", "x"), "event");
        q.done(&k, Outcome::Failure, now);
        assert!(q.pop(now).is_none());
        q.promote_due(now + BASE_BACKOFF);
        assert!(q.pop(now).is_some());
    }

    #[test]
    fn events_and_resyncs_coalesce_into_a_backoff() {
        let now = Instant::now();
        let mut q = core(&[("a", 1)]);
        let k = key("a", "x");
        q.add(k.clone(), "event");
        for n in 1..=5 {
            let (got, _) = q.pop(now).unwrap();
            q.done(&got, Outcome::Failure, now);
            if n < 5 {
                q.promote_due(now + backoff(n));
            }
        }
        let wait = q.next_due(now).unwrap();
        assert_eq!(wait, backoff(5));
        // Events, resyncs and a /resync all fold into the pending retry...
        q.add(k.clone(), "related changed");
        q.add(k.clone(), "resync");
        q.add_at(k.clone(), now + Duration::from_millis(1), "requeue");
        assert!(q.pop(now).is_none(), "a backoff must not be cut short");
        assert_eq!(q.next_due(now), Some(wait));
        // ...and it runs when the backoff is over.
        q.promote_due(now + wait);
        assert!(q.pop(now + wait).is_some());
    }

    #[test]
    fn a_quarantined_plugin_gets_one_probe_per_interval() {
        let t0 = Instant::now();
        let mut q = core(&[("a", 8)]);
        for n in 0..20 {
            q.add(key("a", &n.to_string()), "event");
        }
        let (k, _) = q.pop(t0).unwrap();
        q.done(&k, Outcome::Quarantined, t0);
        assert!(q.is_quarantined("a"));
        // However often keys are added, nothing runs before the interval.
        let mut calls = 0;
        let mut now = t0;
        while now < t0 + QUARANTINE * 3 {
            for n in 0..20 {
                q.add(key("a", &n.to_string()), "resync");
            }
            q.promote_due(now);
            while let Some((k, _)) = q.pop(now) {
                calls += 1;
                q.done(&k, Outcome::Quarantined, now);
            }
            now += Duration::from_secs(1);
        }
        // Probes at t0 + 60 s and t0 + 120 s (the window ends before 180 s).
        assert_eq!(calls, 2, "one probe per quarantine interval");
        // A successful probe lifts the quarantine: the backlog flows again.
        let probe_at = t0 + QUARANTINE * 3;
        let (k, _) = q.pop(probe_at).unwrap();
        q.done(
            &k,
            Outcome::Success {
                requeue_after: None,
            },
            probe_at,
        );
        assert!(!q.is_quarantined("a"));
        assert!(q.pop(probe_at).is_some() && q.pop(probe_at).is_some());
    }

    #[test]
    fn only_a_call_that_went_through_lifts_a_quarantine() {
        let now = Instant::now();
        let mut q = core(&[("a", 4)]);
        q.add(key("a", "x"), "event");
        q.add(key("a", "gone"), "event");
        let (k, _) = q.pop(now).unwrap();
        q.done(&k, Outcome::Quarantined, now);
        let later = now + QUARANTINE;
        let (k, _) = q.pop(later).unwrap();
        q.done(&k, Outcome::Skipped, later);
        assert!(q.is_quarantined("a"), "a skipped key proves nothing");
        assert!(q.pop(later).is_none());
    }

    #[test]
    fn a_new_version_lifts_quarantine_and_backoff() {
        let now = Instant::now();
        let mut q = core(&[("a", 4)]);
        q.add(key("a", "x"), "event");
        q.add(key("a", "y"), "event");
        let (k, _) = q.pop(now).unwrap();
        q.done(&k, Outcome::Quarantined, now);
        assert!(q.pop(now).is_none());
        q.reset_plugin("a");
        assert!(!q.is_quarantined("a"));
        let got: HashSet<_> = [q.pop(now).unwrap().0, q.pop(now).unwrap().0]
            .into_iter()
            .collect();
        assert_eq!(got, HashSet::from([key("a", "x"), key("a", "y")]));
    }

    #[test]
    fn requeue_after_and_earliest_time_wins() {
        let now = Instant::now();
        let mut q = core(&[("a", 1)]);
        let k = key("a", "x");
        q.add_at(k.clone(), now + Duration::from_secs(10), "resync");
        q.add_at(k.clone(), now + Duration::from_secs(2), "requeue");
        q.add_at(k.clone(), now + Duration::from_secs(5), "requeue");
        assert_eq!(q.next_due(now), Some(Duration::from_secs(2)));
        q.promote_due(now + Duration::from_secs(2));
        assert_eq!(q.pop(Instant::now()), Some((k.clone(), "requeue")));
        // An immediate add replaces a pending delayed entry.
        q.done(
            &k,
            Outcome::Success {
                requeue_after: Some(Duration::from_secs(30)),
            },
            now,
        );
        q.add(k.clone(), "event");
        assert!(q.next_due(now).is_none());
        assert_eq!(q.pop(Instant::now()), Some((k, "event")));
    }

    #[test]
    fn concurrency_cap_per_plugin() {
        let mut q = core(&[("a", 2)]);
        for n in 0..5 {
            q.add(key("a", &n.to_string()), "event");
        }
        assert!(q.pop(Instant::now()).is_some());
        assert!(q.pop(Instant::now()).is_some());
        assert!(q.pop(Instant::now()).is_none(), "cap of 2 reached");
        q.done(
            &key("a", "0"),
            Outcome::Success {
                requeue_after: None,
            },
            Instant::now(),
        );
        assert!(q.pop(Instant::now()).is_some());
    }

    #[test]
    fn round_robin_across_plugins() {
        let mut q = core(&[("big", 100), ("small", 100)]);
        for n in 0..1000 {
            q.add(key("big", &n.to_string()), "event");
        }
        for n in 0..3 {
            q.add(key("small", &n.to_string()), "event");
        }
        let first: Vec<_> = (0..6)
            .map(|_| q.pop(Instant::now()).unwrap().0.plugin.to_string())
            .collect();
        assert_eq!(
            first.iter().filter(|p| *p == "small").count(),
            3,
            "{first:?}"
        );
    }

    #[test]
    fn follow_ups_go_before_parents_not_yet_seen() {
        let now = Instant::now();
        let mut q = core(&[("a", 100)]);
        for n in 0..50 {
            q.add(key("a", &format!("new-{n}")), "parent changed");
        }
        // Two parents already reconciled hear from their children.
        q.add(key("a", "started-1"), "child changed");
        q.add(key("a", "started-2"), "related changed");
        let first: Vec<String> = (0..3).map(|_| q.pop(now).unwrap().0.name).collect();
        assert_eq!(first, ["started-1", "started-2", "new-0"]);
    }

    #[test]
    fn a_queued_key_moves_up_to_a_more_urgent_trigger_once() {
        let now = Instant::now();
        let mut q = core(&[("a", 100)]);
        q.add(key("a", "x"), "resync");
        q.add(key("a", "y"), "parent changed");
        q.add(key("a", "x"), "child changed");
        // A less urgent trigger does not move it back down.
        q.add(key("a", "x"), "resync");
        assert_eq!(q.pop(now), Some((key("a", "x"), "child changed")));
        assert_eq!(q.pop(now), Some((key("a", "y"), "parent changed")));
        // The stale bulk entry of x is not handed out again.
        assert_eq!(q.pop(now), None);
    }

    #[test]
    fn no_class_starves_under_a_stream_of_follow_ups() {
        let now = Instant::now();
        let mut q = core(&[("a", 1)]);
        q.add(key("a", "edited"), "parent changed");
        q.add(key("a", "resynced"), "resync");
        let mut served = Vec::new();
        for n in 0..16 {
            q.add(key("a", &format!("busy-{n}")), "child changed");
            let (k, _) = q.pop(now).unwrap();
            served.push(k.name.clone());
            q.done(
                &k,
                Outcome::Success {
                    requeue_after: None,
                },
                now,
            );
        }
        let at = |name: &str| served.iter().position(|s| s == name);
        assert!(at("edited").is_some_and(|i| i < 4), "{served:?}");
        assert!(at("resynced").is_some_and(|i| i < 8), "{served:?}");
    }

    #[test]
    fn a_plugin_alone_gets_the_whole_capacity_and_a_fair_share_under_contention() {
        let now = Instant::now();
        let mut q = QueueCore::new();
        q.set_capacity(8);
        q.set_plugin(Arc::from("big"), None, QUARANTINE);
        q.set_plugin(Arc::from("small"), None, QUARANTINE);
        q.set_plugin(Arc::from("capped"), Some(2), QUARANTINE);
        for n in 0..100 {
            q.add(key("big", &n.to_string()), "resync");
        }
        // Alone, it may fill every slot of the host.
        let mut big = Vec::new();
        while let Some((k, _)) = q.pop(now) {
            big.push(k);
        }
        assert_eq!(big.len(), 8, "work-conserving: all of the capacity");
        // Another plugin's keys arrive: the slots that free up go to it
        // first, until it has its fair share (8 / 2 busy plugins = 4).
        for n in 0..10 {
            q.add(key("small", &n.to_string()), "parent changed");
        }
        for k in big.drain(..4) {
            q.done(
                &k,
                Outcome::Success {
                    requeue_after: None,
                },
                now,
            );
        }
        let got: Vec<String> = (0..4)
            .map(|_| q.pop(now).unwrap().0.plugin.to_string())
            .collect();
        assert_eq!(got, ["small"; 4], "round-robin alone would give 2 and 2");
        // A grant's cap is hard, even with slots to spare.
        let mut q = QueueCore::new();
        q.set_capacity(8);
        q.set_plugin(Arc::from("capped"), Some(2), QUARANTINE);
        for n in 0..10 {
            q.add(key("capped", &n.to_string()), "resync");
        }
        assert!(q.pop(now).is_some() && q.pop(now).is_some());
        assert!(q.pop(now).is_none(), "a hard cap of 2");
    }

    #[test]
    fn removed_plugins_lose_their_keys() {
        let mut q = core(&[("a", 1), ("b", 1)]);
        q.add(key("a", "x"), "event");
        q.add(key("b", "y"), "event");
        q.remove_plugin("a");
        assert_eq!(q.pop(Instant::now()).unwrap().0, key("b", "y"));
        assert!(q.pop(Instant::now()).is_none());
        q.add(key("a", "x"), "event");
        assert!(
            q.pop(Instant::now()).is_none(),
            "unknown plugins' keys are dropped"
        );
    }

    #[test]
    fn depth_counts_ready_and_delayed() {
        let now = Instant::now();
        let mut q = core(&[("a", 1)]);
        q.add(key("a", "x"), "event");
        q.add_at(key("a", "y"), now + Duration::from_secs(1), "requeue");
        assert_eq!(q.depth()[&Arc::<str>::from("a")], 2);
    }

    #[tokio::test]
    async fn async_next_waits_for_delayed_keys() {
        let q = WorkQueue::new();
        q.with(|c| c.set_plugin(Arc::from("a"), Some(1), QUARANTINE));
        q.add_after(key("a", "x"), Duration::from_millis(30), "requeue");
        let got = tokio::time::timeout(Duration::from_secs(5), q.next())
            .await
            .unwrap();
        assert_eq!(got, (key("a", "x"), "requeue"));
    }
}

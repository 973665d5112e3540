//! Quarantine: a plugin whose reconciles keep failing through its own fault
//! (traps, deadlines, memory, fuel, plugin errors, rejected output — not API
//! errors, conflicts or a full instance pool) is set aside. The work queue
//! then calls it at most once per quarantine interval (one probe key); a
//! success or a new version lifts it.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

/// The failure streak of one plugin version.
#[derive(Debug)]
pub struct Quarantine {
    after: u32,
    consecutive_failures: AtomicU32,
    quarantined: AtomicBool,
}

/// What a recorded outcome changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// Nothing changed.
    None,
    /// The plugin has just been quarantined.
    Quarantined,
    /// The quarantine has just been lifted.
    Lifted,
}

impl Quarantine {
    /// A streak that quarantines after `after` consecutive failures.
    pub fn new(after: u32) -> Self {
        Self {
            after: after.max(1),
            consecutive_failures: AtomicU32::new(0),
            quarantined: AtomicBool::new(false),
        }
    }

    /// Records a success: resets the streak and lifts a quarantine.
    pub fn success(&self) -> Transition {
        self.consecutive_failures.store(0, Ordering::Relaxed);
        if self.quarantined.swap(false, Ordering::Relaxed) {
            Transition::Lifted
        } else {
            Transition::None
        }
    }

    /// Records a failure the plugin is to blame for.
    pub fn failure(&self) -> Transition {
        let streak = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if streak >= self.after && !self.quarantined.swap(true, Ordering::Relaxed) {
            Transition::Quarantined
        } else {
            Transition::None
        }
    }

    /// Consecutive failures so far.
    pub fn streak(&self) -> u32 {
        self.consecutive_failures.load(Ordering::Relaxed)
    }

    /// Whether the plugin is quarantined.
    pub fn is_quarantined(&self) -> bool {
        self.quarantined.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quarantines_after_the_streak_and_lifts_on_success() {
        let q = Quarantine::new(3);
        assert_eq!(q.failure(), Transition::None);
        assert_eq!(q.failure(), Transition::None);
        assert_eq!(q.failure(), Transition::Quarantined);
        assert_eq!(q.failure(), Transition::None, "reported once");
        assert!(q.is_quarantined());
        assert_eq!(q.success(), Transition::Lifted);
        assert!(!q.is_quarantined());
        assert_eq!(q.streak(), 0);
        assert_eq!(q.failure(), Transition::None, "a new streak starts");
    }
}

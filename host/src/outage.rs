//! Whether the API server answers, as the host's own calls see it: every
//! watch, list and write reports its outcome here. An outage (calls that do
//! not reach the server, or that it answers with 5xx) is logged once at warn
//! when it starts and once when it ends, exported as `kuwa_api_reachable`
//! and counted in `kuwa_api_outages_total`; `/readyz` fails while it lasts.
//!
//! Errors are also sorted by [`Failure`] so that each call site can count
//! them with a label that says what went wrong (`kuwa_watch_errors_total`,
//! `kuwa_api_errors_total`).

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;

/// What kind of failure a kube call ended in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The request did not reach the server, or the connection broke
    /// (refused, reset, TLS, timeout). Part of an outage.
    Unreachable,
    /// The server answered 5xx (starting up, etcd unavailable). Part of an
    /// outage.
    Unavailable,
    /// 410 Gone: the resource version is too old; the watch relists.
    Gone,
    /// 401 or 403.
    Forbidden,
    /// 409 Conflict.
    Conflict,
    /// 429: the server throttles this client.
    Throttled,
    /// Any other answer (400, 404, 422, ...): the server is up.
    Rejected,
    /// Not a transport or HTTP failure (decoding, a bad request built).
    Other,
}

impl Failure {
    /// Sorts a kube client error.
    pub fn of(error: &kube::Error) -> Self {
        match error {
            kube::Error::Api(status) => match status.code {
                410 => Self::Gone,
                401 | 403 => Self::Forbidden,
                409 => Self::Conflict,
                429 => Self::Throttled,
                c if c >= 500 => Self::Unavailable,
                _ => Self::Rejected,
            },
            kube::Error::HyperError(_) | kube::Error::Service(_) | kube::Error::ReadEvents(_) => {
                Self::Unreachable
            }
            _ => Self::Other,
        }
    }

    /// Sorts a watcher error (the watch's own 410 is [`Failure::Gone`]).
    pub fn of_watch(error: &kube::runtime::watcher::Error) -> Self {
        use kube::runtime::watcher::Error as W;
        match error {
            W::InitialListFailed(e) | W::WatchStartFailed(e) | W::WatchFailed(e) => Self::of(e),
            W::WatchError(status) => Self::of(&kube::Error::Api(status.clone())),
            W::NoResourceVersion => Self::Other,
        }
    }

    /// Whether this failure means the server is not there (an outage).
    pub fn is_outage(self) -> bool {
        matches!(self, Self::Unreachable | Self::Unavailable)
    }

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Unreachable => "unreachable",
            Self::Unavailable => "unavailable",
            Self::Gone => "gone",
            Self::Forbidden => "forbidden",
            Self::Conflict => "conflict",
            Self::Throttled => "throttled",
            Self::Rejected => "rejected",
            Self::Other => "other",
        }
    }
}

/// A failure that comes this soon after a call that reached the server
/// does not start an outage by itself: when the server returns, watches
/// whose retry was already under way can still fail once, and an outage
/// that ends and restarts within a second would log twice for nothing.
const SETTLE: Duration = Duration::from_secs(1);

#[derive(Debug)]
struct State {
    /// When the current outage started (the first failing call), if any.
    down_since: Option<Instant>,
    /// Failed calls in the current outage.
    failures: u64,
    /// The last call that reached the server.
    last_ok: Option<Instant>,
}

/// The API server's reachability as the host's calls see it.
#[derive(Debug)]
pub struct ApiHealth {
    /// Fast path for [`ApiHealth::reached`], called on every watch event.
    down: AtomicBool,
    state: Mutex<State>,
    reachable: Gauge,
    outages: Counter,
}

impl Default for ApiHealth {
    fn default() -> Self {
        let reachable = Gauge::default();
        reachable.set(1);
        Self {
            down: AtomicBool::new(false),
            state: Mutex::new(State {
                down_since: None,
                failures: 0,
                last_ok: None,
            }),
            reachable,
            outages: Counter::default(),
        }
    }
}

impl ApiHealth {
    /// The `kuwa_api_reachable` gauge.
    pub fn reachable_gauge(&self) -> Gauge {
        self.reachable.clone()
    }

    /// The `kuwa_api_outages` counter.
    pub fn outages_counter(&self) -> Counter {
        self.outages.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A call reached the server (any answer that is not a 5xx counts).
    pub fn reached(&self) {
        if !self.down.load(Ordering::Relaxed) {
            // Recording `last_ok` on every event would lock on the hot
            // path; it only matters right after an outage, recorded below.
            return;
        }
        let mut state = self.lock();
        let now = Instant::now();
        state.last_ok = Some(now);
        if let Some(since) = state.down_since.take() {
            self.down.store(false, Ordering::Relaxed);
            self.reachable.set(1);
            tracing::warn!(
                outage_seconds = format!("{:.1}", now.duration_since(since).as_secs_f64()),
                failed_calls = state.failures,
                "the API server answers again; watches resume (relisting where their resource version expired)"
            );
            state.failures = 0;
        }
    }

    /// A call failed with `failure`; `what` names it for the log
    /// (`watch apps/v1/Deployment`, `apply` ...).
    pub fn failed(&self, failure: Failure, what: &str, error: &dyn std::fmt::Display) {
        if !failure.is_outage() {
            self.reached();
            return;
        }
        let mut state = self.lock();
        let now = Instant::now();
        if state.down_since.is_some() {
            state.failures += 1;
            tracing::debug!(%what, %error, "API server still unreachable");
            return;
        }
        if state
            .last_ok
            .is_some_and(|ok| now.duration_since(ok) < SETTLE)
        {
            tracing::debug!(%what, %error, "API call failed right after the server answered");
            return;
        }
        state.down_since = Some(now);
        state.failures = 1;
        self.down.store(true, Ordering::Relaxed);
        self.reachable.set(0);
        self.outages.inc();
        tracing::warn!(
            %what,
            %error,
            "lost the API server: watches retry with backoff and writes fail until it answers; /readyz reports not ready"
        );
    }

    /// Whether no outage is in progress.
    pub fn is_reachable(&self) -> bool {
        !self.down.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(code: u16) -> kube::Error {
        kube::Error::Api(Box::new(kube::core::Status {
            code,
            ..kube::core::Status::default()
        }))
    }

    #[test]
    fn failures_are_sorted_by_what_the_server_said() {
        assert_eq!(Failure::of(&status(410)), Failure::Gone);
        assert_eq!(Failure::of(&status(503)), Failure::Unavailable);
        assert_eq!(Failure::of(&status(403)), Failure::Forbidden);
        assert_eq!(Failure::of(&status(409)), Failure::Conflict);
        assert_eq!(Failure::of(&status(422)), Failure::Rejected);
        let io = kube::Error::ReadEvents(std::io::Error::other("connection reset"));
        assert_eq!(Failure::of(&io), Failure::Unreachable);
        assert!(Failure::Unreachable.is_outage() && Failure::Unavailable.is_outage());
        assert!(!Failure::Gone.is_outage() && !Failure::Rejected.is_outage());
    }

    #[test]
    fn an_outage_starts_once_and_ends_on_the_next_answer() {
        let h = ApiHealth::default();
        assert!(h.is_reachable());
        h.failed(Failure::Gone, "watch", &"410");
        assert!(h.is_reachable(), "a 410 is an answer");
        h.failed(Failure::Unreachable, "watch a", &"refused");
        h.failed(Failure::Unreachable, "watch b", &"refused");
        h.failed(Failure::Unavailable, "apply", &"503");
        assert!(!h.is_reachable());
        assert_eq!(h.reachable.get(), 0);
        assert_eq!(h.outages.get(), 1, "one outage, however many calls failed");
        assert_eq!(h.lock().failures, 3);
        h.reached();
        assert!(h.is_reachable());
        assert_eq!(h.reachable.get(), 1);
        // A straggler failing right after the server answered again does
        // not open a second outage.
        h.failed(Failure::Unreachable, "watch c", &"refused");
        assert!(h.is_reachable());
        assert_eq!(h.outages.get(), 1);
    }

    #[test]
    fn a_failure_long_after_the_last_answer_starts_an_outage() {
        let h = ApiHealth::default();
        h.lock().last_ok = Some(Instant::now() - SETTLE - Duration::from_millis(10));
        h.failed(Failure::Unreachable, "watch", &"refused");
        assert!(!h.is_reachable());
    }
}

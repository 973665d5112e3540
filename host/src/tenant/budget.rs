//! The API write budget of one plugin: `rate` writes per second with bursts
//! of up to `burst`, through `governor`'s GCRA rate limiter (a token bucket
//! without the bookkeeping). Every write the plugin's writer makes takes a
//! cell; a write with none waits for one.

use std::num::NonZeroU32;
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

/// Longest interval between two writes a budget may have. Rates are bounded
/// below by the manifest check (one write per 1,000 s); this only keeps the
/// arithmetic of an absurd rate in range.
const MAX_PERIOD: Duration = Duration::from_secs(3600);

/// A plugin's write budget.
pub struct WriteBudget {
    limiter: DefaultDirectRateLimiter,
    rate: f64,
    burst: u32,
}

impl std::fmt::Debug for WriteBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriteBudget").finish_non_exhaustive()
    }
}

impl WriteBudget {
    /// A full budget of `rate` writes per second and bursts of `burst`.
    /// `rate` must be positive and finite (the manifest check guarantees
    /// it); anything else is treated as the slowest allowed rate.
    pub fn new(rate: f64, burst: u32) -> Self {
        let rate = if rate.is_finite() && rate > 0.0 {
            rate
        } else {
            crate::tenant::grant::MIN_WRITES_PER_SECOND
        };
        let period = Duration::try_from_secs_f64(1.0 / rate)
            .unwrap_or(MAX_PERIOD)
            .clamp(Duration::from_nanos(1), MAX_PERIOD);
        let quota = Quota::with_period(period)
            .expect("the period is at least 1 ns")
            .allow_burst(NonZeroU32::new(burst.max(1)).expect("at least 1"));
        Self {
            limiter: RateLimiter::direct(quota),
            rate,
            burst,
        }
    }

    /// Whether this budget is the one a grant of `rate` and `burst` asks
    /// for (a new version with the same grant keeps the budget it has).
    pub fn is(&self, rate: f64, burst: u32) -> bool {
        self.rate == rate && self.burst == burst
    }

    /// Takes a cell now if there is one.
    fn try_take(&self) -> bool {
        self.limiter.check().is_ok()
    }

    /// Waits for a cell. Returns whether it had to wait.
    pub async fn take(&self) -> bool {
        if self.try_take() {
            return false;
        }
        self.limiter.until_ready().await;
        true
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    #[tokio::test]
    async fn the_budget_allows_a_burst_then_the_rate() {
        let budget = WriteBudget::new(50.0, 3);
        let start = Instant::now();
        for _ in 0..3 {
            assert!(!budget.take().await, "the burst needs no wait");
        }
        assert!(budget.take().await, "the 4th write waits");
        // 5 more at 50/s: about 100 ms after the burst (plus the 4th's 20).
        for _ in 0..5 {
            budget.take().await;
        }
        let elapsed = start.elapsed();
        assert!(
            elapsed >= Duration::from_millis(110) && elapsed <= Duration::from_secs(2),
            "{elapsed:?}"
        );
    }

    #[test]
    fn a_budget_knows_its_grant() {
        let budget = WriteBudget::new(20.0, 40);
        assert!(budget.is(20.0, 40));
        assert!(!budget.is(20.0, 41) && !budget.is(21.0, 40));
    }

    #[test]
    fn absurd_rates_never_panic() {
        for rate in [1e-300, 0.0, -1.0, f64::NAN, f64::INFINITY, 1e300] {
            let budget = WriteBudget::new(rate, 1);
            assert!(budget.try_take(), "{rate}: the first write is free");
            if rate < 1e6 {
                assert!(!budget.try_take(), "{rate}: the second must wait");
            }
        }
    }
}

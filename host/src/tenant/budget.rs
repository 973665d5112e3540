//! The API write budget of one plugin: a token bucket of `rate` writes per
//! second up to `burst`. Every write the plugin's writer makes takes a token;
//! a write with no token waits for one.

use std::sync::Mutex;
use std::time::Duration;

/// Longest single wait for a token. Rates are bounded below by the manifest
/// check, so this only guards the timer arithmetic.
const MAX_WAIT: Duration = Duration::from_secs(3600);

/// A token bucket: `rate` tokens per second up to `burst`.
#[derive(Debug)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    state: Mutex<(f64, tokio::time::Instant)>,
}

impl TokenBucket {
    /// A full bucket. `rate` must be positive and finite (the manifest check
    /// guarantees it); anything else is treated as the slowest allowed rate.
    pub fn new(rate: f64, burst: u32) -> Self {
        let burst = f64::from(burst.max(1));
        let rate = if rate.is_finite() && rate > 0.0 {
            rate
        } else {
            crate::tenant::grant::MIN_WRITES_PER_SECOND
        };
        Self {
            rate,
            burst,
            state: Mutex::new((burst, tokio::time::Instant::now())),
        }
    }

    /// Takes a token now, or says how long until one is available.
    fn try_take(&self) -> Result<(), Duration> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let now = tokio::time::Instant::now();
        let elapsed = now.saturating_duration_since(state.1).as_secs_f64();
        state.0 = (state.0 + elapsed * self.rate).min(self.burst);
        state.1 = now;
        if state.0 >= 1.0 {
            state.0 -= 1.0;
            Ok(())
        } else {
            let wait = Duration::try_from_secs_f64((1.0 - state.0) / self.rate).unwrap_or(MAX_WAIT);
            Err(wait.min(MAX_WAIT))
        }
    }

    /// Waits for a token. Returns whether it had to wait.
    pub async fn take(&self) -> bool {
        let mut waited = false;
        while let Err(wait) = self.try_take() {
            waited = true;
            tokio::time::sleep(wait).await;
        }
        waited
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_bucket_allows_a_burst_then_the_rate() {
        let bucket = TokenBucket::new(10.0, 3);
        let start = tokio::time::Instant::now();
        for _ in 0..3 {
            assert!(!bucket.take().await, "the burst needs no wait");
        }
        assert!(bucket.take().await, "the 4th write waits");
        // 7 more at 10/s: about 0.7 s of (virtual) time after the burst.
        for _ in 0..6 {
            bucket.take().await;
        }
        let elapsed = start.elapsed();
        assert!(
            elapsed >= Duration::from_millis(690) && elapsed <= Duration::from_millis(710),
            "{elapsed:?}"
        );
    }

    #[test]
    fn absurd_rates_never_panic() {
        for rate in [1e-300, 0.0, -1.0, f64::NAN, f64::INFINITY] {
            let bucket = TokenBucket::new(rate, 1);
            assert!(bucket.try_take().is_ok());
            let wait = bucket.try_take().unwrap_err();
            assert!(wait <= MAX_WAIT, "{rate}: {wait:?}");
        }
    }
}

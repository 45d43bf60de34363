//! A shareable token-bucket byte-rate limiter.
//!
//! Design: a "deficit" token bucket. `acquire(n)` takes `n` tokens at once,
//! letting the balance go negative, and then sleeps until the balance would
//! be back at zero. Consequences:
//! - requests larger than the burst size work (they just wait longer),
//! - concurrent callers are served roughly in arrival order, because each
//!   one's deficit adds to the wait of the next,
//! - the long-run rate is exact; only the initial burst (one tenth of a
//!   second of traffic) can exceed it.
//!
//! Time comes from `tokio::time`, so tests can use paused virtual time.
//! One limiter is meant to be wrapped in an `Arc` and shared: e.g. one per
//! replication relationship plus one per host, both applied to a writer
//! (see [`RateLimiter::acquire_all`]).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

#[derive(Debug)]
struct State {
    /// Bytes per second; 0 = unlimited.
    rate: u64,
    /// Current balance in bytes; negative = debt.
    tokens: f64,
    last: Instant,
}

impl State {
    fn burst(&self) -> f64 {
        (self.rate as f64 / 10.0).max(1.0)
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + dt * self.rate as f64).min(self.burst());
        self.last = now;
    }
}

/// Token-bucket limiter on bytes per second. `0` means unlimited.
#[derive(Debug)]
pub struct RateLimiter {
    state: Mutex<State>,
}

impl RateLimiter {
    /// A limiter of `bytes_per_sec` (0 = unlimited), starting with a full
    /// burst allowance of a tenth of a second.
    pub fn new(bytes_per_sec: u64) -> Self {
        let mut state = State {
            rate: bytes_per_sec,
            tokens: 0.0,
            last: Instant::now(),
        };
        state.tokens = state.burst();
        RateLimiter {
            state: Mutex::new(state),
        }
    }

    /// An unlimited limiter.
    pub fn unlimited() -> Self {
        Self::new(0)
    }

    /// `Some(Arc<limiter>)` for a configured limit, `None` for `None` or 0,
    /// matching optional settings.
    pub fn shared(bytes_per_sec: Option<u64>) -> Option<Arc<Self>> {
        match bytes_per_sec {
            Some(r) if r > 0 => Some(Arc::new(Self::new(r))),
            _ => None,
        }
    }

    /// Current limit; `None` if unlimited.
    pub fn rate(&self) -> Option<u64> {
        let r = self.lock().rate;
        (r > 0).then_some(r)
    }

    /// Change the limit at run time (0 = unlimited). Existing debt is kept
    /// and paid back at the new rate; credit is capped to the new burst.
    pub fn set_rate(&self, bytes_per_sec: u64) {
        let mut s = self.lock();
        let now = Instant::now();
        s.refill(now);
        s.rate = bytes_per_sec;
        if bytes_per_sec == 0 {
            s.tokens = 0.0;
        } else {
            s.tokens = s.tokens.min(s.burst());
        }
    }

    /// Wait until `n` bytes may be sent. Returns immediately when unlimited.
    pub async fn acquire(&self, n: u64) {
        if let Some(wait) = self.reserve(n) {
            tokio::time::sleep(wait).await;
        }
    }

    /// Take `n` tokens now and return how long the caller must wait before
    /// using them (`None`: no wait).
    pub fn reserve(&self, n: u64) -> Option<Duration> {
        let mut s = self.lock();
        if s.rate == 0 || n == 0 {
            return None;
        }
        s.refill(Instant::now());
        s.tokens -= n as f64;
        if s.tokens >= 0.0 {
            None
        } else {
            // Saturate instead of panicking on absurd requests at tiny rates.
            Some(Duration::try_from_secs_f64(-s.tokens / s.rate as f64).unwrap_or(Duration::MAX))
        }
    }

    /// Acquire `n` bytes from every limiter at once and wait for the
    /// longest of their waits, so the slowest limit governs (waiting on them
    /// in turn would add the waits up).
    pub async fn acquire_all(limiters: &[Arc<RateLimiter>], n: u64) {
        let wait = limiters.iter().filter_map(|l| l.reserve(n)).max();
        if let Some(wait) = wait {
            tokio::time::sleep(wait).await;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // The state is always consistent between statements; recover from
        // poisoning instead of propagating a panic.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

//! Counting failed attempts — wrong passwords, unknown emails, wrong pairing codes — for the
//! throttles that stop guessing. With one replica the counts can live in memory. With several
//! behind a load balancer they must be shared, or every replica would grant the full budget and
//! N replicas N times as many guesses; `nexus-bus-redis` keeps them in Redis.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use nexus_auth::throttle::SlidingWindowLimiter;
use nexus_domain::time::Millis;

/// Failed attempts of one kind within a sliding window.
#[async_trait]
pub trait AttemptCounter: Send + Sync + 'static {
    /// How many attempts were recorded under `key` within the window, and when the latest was.
    async fn recent(&self, key: &str, now: Millis) -> (u32, Option<Millis>);
    /// Records an attempt under `key`.
    async fn record(&self, key: &str, now: Millis);
}

/// Makes one counter per kind of attempt (`name`), each with its window.
pub trait AttemptCounters: Send + Sync + 'static {
    fn counter(&self, name: &'static str, window: Duration) -> Arc<dyn AttemptCounter>;
}

/// Most keys one in-memory counter remembers (the oldest are forgotten first).
const LOCAL_MAX_KEYS: usize = 100_000;

/// Counts in this process only: right for a single replica, and the fallback of shared counters
/// while their store is unreachable.
#[derive(Debug, Clone, Copy, Default)]
pub struct LocalAttempts;

impl AttemptCounters for LocalAttempts {
    fn counter(&self, _name: &'static str, window: Duration) -> Arc<dyn AttemptCounter> {
        Arc::new(LocalCounter::new(window))
    }
}

/// An in-memory sliding window (see [`SlidingWindowLimiter`]).
pub struct LocalCounter {
    window: SlidingWindowLimiter,
}

impl LocalCounter {
    pub fn new(window: Duration) -> Self {
        Self {
            // No limit of its own: callers compare the count with theirs.
            window: SlidingWindowLimiter::new(u32::MAX, window, LOCAL_MAX_KEYS),
        }
    }
}

#[async_trait]
impl AttemptCounter for LocalCounter {
    async fn recent(&self, key: &str, now: Millis) -> (u32, Option<Millis>) {
        let count = self.window.count(key, now);
        (count, (count > 0).then(|| self.window.last(key)).flatten())
    }

    async fn record(&self, key: &str, now: Millis) {
        self.window.hit(key, now);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test]
    async fn local_counts_slide_with_the_window() {
        let counter = LocalAttempts.counter("test", Duration::from_secs(10));
        assert_eq!(counter.recent("k", 1_000).await, (0, None));
        counter.record("k", 1_000).await;
        counter.record("k", 5_000).await;
        counter.record("other", 5_000).await;
        assert_eq!(counter.recent("k", 6_000).await, (2, Some(5_000)));
        assert_eq!(counter.recent("k", 11_000).await, (1, Some(5_000)));
        assert_eq!(counter.recent("k", 15_001).await, (0, None));
    }
}

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
    /// Atomically takes one of `limit` slots of `key` in the window: `Some` when taken (it counts
    /// as an attempt until [`AttemptCounter::release`]d), `None` when all are used. Checking and
    /// counting in one step is what concurrent guesses, on one replica or several, cannot get
    /// past.
    async fn reserve(&self, key: &str, limit: u32, now: Millis) -> Option<Slot>;
    /// Gives a reserved slot back: the attempt turned out not to be a failure.
    async fn release(&self, key: &str, slot: Slot);
}

/// A reserved attempt (see [`AttemptCounter::reserve`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slot {
    /// When it was taken.
    pub at: Millis,
    /// Names it in a shared store (empty for in-memory counters).
    pub id: String,
}

/// Makes one counter per kind of attempt (`name`), each with its window.
#[async_trait]
pub trait AttemptCounters: Send + Sync + 'static {
    fn counter(&self, name: &'static str, window: Duration) -> Arc<dyn AttemptCounter>;

    /// Makes the guesses for `key` (say, one account's sign-ins) run one at a time across every
    /// replica: waits until no other replica holds `key`, then holds it until the guard is
    /// dropped. Throttles that read a count, check a guess and then record it need this, or
    /// replicas racing each other all read the same count. `None` when there is nothing to
    /// share (a single replica, whose own lock suffices) or the shared store is unreachable.
    async fn exclusive(&self, _name: &'static str, _key: &str) -> Option<SharedGuard> {
        None
    }
}

/// Held while a guess is checked (see [`AttemptCounters::exclusive`]); releases on drop.
pub struct SharedGuard {
    release: Option<Box<dyn FnOnce() + Send>>,
}

impl SharedGuard {
    pub fn new(release: impl FnOnce() + Send + 'static) -> Self {
        Self {
            release: Some(Box::new(release)),
        }
    }
}

impl Drop for SharedGuard {
    fn drop(&mut self) {
        if let Some(release) = self.release.take() {
            release();
        }
    }
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

    async fn reserve(&self, key: &str, limit: u32, now: Millis) -> Option<Slot> {
        self.window.hit_up_to(key, limit, now).then(|| Slot {
            at: now,
            id: String::new(),
        })
    }

    async fn release(&self, key: &str, slot: Slot) {
        self.window.unhit(key, slot.at);
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

    #[tokio::test]
    async fn reservations_stop_at_the_limit_and_can_be_given_back() {
        let counter = LocalAttempts.counter("test", Duration::from_secs(10));
        let first = counter.reserve("k", 2, 1_000).await.unwrap();
        counter.reserve("k", 2, 2_000).await.unwrap();
        assert_eq!(counter.reserve("k", 2, 3_000).await, None);
        counter.release("k", first).await;
        assert_eq!(counter.recent("k", 3_000).await.0, 1);
        assert!(counter.reserve("k", 2, 3_000).await.is_some());
        assert_eq!(counter.reserve("k", 2, 3_000).await, None);
    }
}

//! Throttling of guesses (passwords, TOTP codes, pairing codes). `Backoff` is pure policy over a
//! failure count the caller stores (per account, in the database, so it survives restarts and is
//! shared by replicas); `SlidingWindowLimiter` is a small in-memory counter for per-IP and per-user
//! limits where losing state on restart is acceptable.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

/// Delays after repeated failures: the first `free_failures` cost nothing, each further failure
/// doubles the wait from `base_delay` up to `max_delay`, and `lockout_after` consecutive failures
/// (0 = never) lock for `lockout_for`. The caller resets the count on success.
///
/// A lockout keyed by account alone lets anyone lock a victim out by guessing badly; callers may
/// prefer to key the count by account and client network (see `ip::truncate_ip`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub free_failures: u32,
    pub base_delay: Duration,
    pub max_delay: Duration,
    pub lockout_after: u32,
    pub lockout_for: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self::login()
    }
}

impl Backoff {
    /// For password logins: 5 free failures, then 1 s, 2 s, 4 s, 8 s (doubling, at most 60 s),
    /// and a 15-minute lockout from the 10th consecutive failure.
    pub const fn login() -> Self {
        Self {
            free_failures: 5,
            base_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(60),
            lockout_after: 10,
            lockout_for: Duration::from_secs(15 * 60),
        }
    }

    /// Whether `failures` consecutive failures mean a lockout.
    pub fn is_locked_out(&self, failures: u32) -> bool {
        self.lockout_after > 0 && failures >= self.lockout_after
    }

    /// How long after the latest failure the next attempt must wait, given `failures` consecutive
    /// failures so far (including that one).
    pub fn delay_after(&self, failures: u32) -> Duration {
        if self.is_locked_out(failures) {
            return self.lockout_for;
        }
        if failures <= self.free_failures {
            return Duration::ZERO;
        }
        let doublings = failures - self.free_failures - 1;
        let factor = 1u32.checked_shl(doublings).unwrap_or(u32::MAX);
        self.base_delay.saturating_mul(factor).min(self.max_delay)
    }

    /// The unix time (ms) from which the next attempt is allowed, or `None` if no wait applies.
    pub fn allowed_at(&self, failures: u32, last_failure_at_ms: i64) -> Option<i64> {
        let delay = self.delay_after(failures);
        if delay.is_zero() {
            return None;
        }
        let delay_ms = i64::try_from(delay.as_millis()).unwrap_or(i64::MAX);
        Some(last_failure_at_ms.saturating_add(delay_ms))
    }

    /// Milliseconds still to wait at `now_ms` (for `Retry-After`), or `None` if an attempt is
    /// allowed now.
    pub fn next_allowed(&self, failures: u32, last_failure_at_ms: i64, now_ms: i64) -> Option<i64> {
        self.allowed_at(failures, last_failure_at_ms)
            .filter(|&allowed| allowed > now_ms)
            .map(|allowed| allowed - now_ms)
    }
}

/// "At most `limit` events per key per `window`", in memory, for many keys (IPs, user ids).
/// Bounded: beyond `max_keys` keys the least recently hit key is forgotten, so a flood of new
/// keys costs memory proportional to `max_keys` only — size it well above the number of keys
/// active within one window. At most `MAX_EVENTS_PER_KEY` events are kept per key, so with a
/// larger `limit` (a plain counter, e.g. `u32::MAX`) counts saturate there and never refuse.
/// Thread-safe with a `std` mutex held for O(limit + log keys) work.
#[derive(Debug)]
pub struct SlidingWindowLimiter {
    limit: u32,
    window_ms: i64,
    max_keys: usize,
    state: Mutex<State>,
}

/// Events remembered per key; bounds memory at `max_keys` × this × 8 bytes.
pub const MAX_EVENTS_PER_KEY: usize = 1024;

#[derive(Debug, Default)]
struct State {
    entries: HashMap<String, Entry>,
    /// (last hit ms, sequence) → key: the eviction order.
    by_age: BTreeMap<(i64, u64), String>,
    seq: u64,
}

#[derive(Debug)]
struct Entry {
    /// Times (ms) of the counted events inside the window, oldest first; at most `limit`.
    events: VecDeque<i64>,
    age: (i64, u64),
}

impl State {
    fn touch(&mut self, key: &str, now_ms: i64) {
        self.seq += 1;
        let age = (now_ms, self.seq);
        if let Some(entry) = self.entries.get_mut(key) {
            self.by_age.remove(&entry.age);
            entry.age = age;
        }
        self.by_age.insert(age, key.to_owned());
    }
}

impl SlidingWindowLimiter {
    pub fn new(limit: u32, window: Duration, max_keys: usize) -> Self {
        Self {
            limit,
            window_ms: i64::try_from(window.as_millis()).unwrap_or(i64::MAX),
            max_keys: max_keys.max(1),
            state: Mutex::new(State::default()),
        }
    }

    pub fn limit(&self) -> u32 {
        self.limit
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent even if a holder panicked: every update is a few lines.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn prune(&self, events: &mut VecDeque<i64>, now_ms: i64) {
        let cutoff = now_ms.saturating_sub(self.window_ms);
        while events.front().is_some_and(|&t| t <= cutoff) {
            events.pop_front();
        }
    }

    /// Records an event for `key` if it is within the limit and returns true; returns false
    /// (recording nothing, so refused attempts do not extend the block) when the key already had
    /// `limit` events in the window.
    pub fn hit(&self, key: &str, now_ms: i64) -> bool {
        self.hit_up_to(key, self.limit, now_ms)
    }

    /// [`SlidingWindowLimiter::hit`] with a limit of `limit` (at most the limiter's own), for
    /// counters whose callers hold the limit.
    pub fn hit_up_to(&self, key: &str, limit: u32, now_ms: i64) -> bool {
        let limit = limit.min(self.limit);
        let mut state = self.lock();
        if let Some(entry) = state.entries.get_mut(key) {
            self.prune(&mut entry.events, now_ms);
            if entry.events.len() >= limit as usize {
                return false;
            }
            if entry.events.len() >= MAX_EVENTS_PER_KEY {
                entry.events.pop_front();
            }
            entry.events.push_back(now_ms);
            state.touch(key, now_ms);
            return true;
        }
        if limit == 0 {
            return false;
        }
        while state.entries.len() >= self.max_keys {
            let Some((_, oldest)) = state.by_age.pop_first() else {
                break;
            };
            state.entries.remove(&oldest);
        }
        state.entries.insert(
            key.to_owned(),
            Entry {
                events: VecDeque::from([now_ms]),
                age: (0, 0),
            },
        );
        state.touch(key, now_ms);
        true
    }

    /// Events counted for `key` in the window ending at `now_ms`.
    pub fn count(&self, key: &str, now_ms: i64) -> u32 {
        let mut state = self.lock();
        match state.entries.get_mut(key) {
            Some(entry) => {
                self.prune(&mut entry.events, now_ms);
                u32::try_from(entry.events.len()).unwrap_or(u32::MAX)
            }
            None => 0,
        }
    }

    /// Whether another event for `key` would be within the limit (checks without recording).
    pub fn allows(&self, key: &str, now_ms: i64) -> bool {
        self.count(key, now_ms) < self.limit
    }

    /// Milliseconds until `key` is allowed again, or `None` if it is allowed now.
    pub fn retry_after_ms(&self, key: &str, now_ms: i64) -> Option<i64> {
        let mut state = self.lock();
        let entry = state.entries.get_mut(key)?;
        self.prune(&mut entry.events, now_ms);
        if entry.events.len() < self.limit as usize {
            return None;
        }
        // The oldest counted event leaves the window first.
        let oldest = *entry.events.front()?;
        Some(oldest.saturating_add(self.window_ms) - now_ms)
    }

    /// The time (ms) of the latest event recorded for `key`, if it is still remembered.
    pub fn last(&self, key: &str) -> Option<i64> {
        self.lock()
            .entries
            .get(key)
            .and_then(|entry| entry.events.back().copied())
    }

    /// Takes back one event recorded for `key` at `at_ms` (it turned out not to count); false if
    /// there is none.
    pub fn unhit(&self, key: &str, at_ms: i64) -> bool {
        let mut state = self.lock();
        let Some(entry) = state.entries.get_mut(key) else {
            return false;
        };
        match entry.events.iter().rposition(|&t| t == at_ms) {
            Some(i) => {
                entry.events.remove(i);
                true
            }
            None => false,
        }
    }

    /// Forgets `key` (e.g. after a successful login from that IP).
    pub fn clear(&self, key: &str) {
        let mut state = self.lock();
        if let Some(entry) = state.entries.remove(key) {
            state.by_age.remove(&entry.age);
        }
    }

    /// How many keys are tracked.
    pub fn tracked_keys(&self) -> usize {
        self.lock().entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: i64 = 1000;

    #[test]
    fn login_backoff_math() {
        let b = Backoff::login();
        assert_eq!(b, Backoff::default());
        for n in 0..=5 {
            assert_eq!(b.delay_after(n), Duration::ZERO, "{n}");
            assert_eq!(b.allowed_at(n, 1_000), None);
        }
        assert_eq!(b.delay_after(6), Duration::from_secs(1));
        assert_eq!(b.delay_after(7), Duration::from_secs(2));
        assert_eq!(b.delay_after(8), Duration::from_secs(4));
        assert_eq!(b.delay_after(9), Duration::from_secs(8));
        assert!(!b.is_locked_out(9));
        assert!(b.is_locked_out(10));
        assert_eq!(b.delay_after(10), Duration::from_secs(900));
        assert_eq!(b.delay_after(u32::MAX), Duration::from_secs(900));
        assert_eq!(b.allowed_at(7, 10_000), Some(12_000));
        assert_eq!(b.next_allowed(7, 10_000, 10_500), Some(1_500));
        assert_eq!(b.next_allowed(7, 10_000, 12_000), None);
        assert_eq!(b.next_allowed(3, 10_000, 10_000), None);
        assert_eq!(b.next_allowed(10, 0, 60_000), Some(840_000));
    }

    #[test]
    fn backoff_caps_and_never_overflows() {
        let b = Backoff {
            lockout_after: 0,
            ..Backoff::login()
        };
        assert!(!b.is_locked_out(u32::MAX));
        assert_eq!(b.delay_after(12), Duration::from_secs(60)); // 64 s capped
        assert_eq!(b.delay_after(11), Duration::from_secs(32));
        assert_eq!(b.delay_after(100), Duration::from_secs(60));
        assert_eq!(b.delay_after(u32::MAX), Duration::from_secs(60));
        assert_eq!(b.allowed_at(100, i64::MAX), Some(i64::MAX));
    }

    #[test]
    fn window_limits_and_expires() {
        let l = SlidingWindowLimiter::new(5, Duration::from_secs(600), 100);
        let t0 = 1_000_000;
        for i in 0..5 {
            assert!(l.allows("ip", t0 + i));
            assert!(l.hit("ip", t0 + i));
        }
        assert_eq!(l.count("ip", t0 + 10), 5);
        assert!(!l.allows("ip", t0 + 10));
        assert!(!l.hit("ip", t0 + 10));
        assert_eq!(l.count("ip", t0 + 10), 5, "refused hits are not counted");
        assert_eq!(l.retry_after_ms("ip", t0 + 10), Some(600 * SEC - 10));
        // Other keys are independent.
        assert!(l.hit("other", t0));
        // The first event leaves the window exactly `window` later.
        assert!(!l.allows("ip", t0 + 600 * SEC - 1));
        assert_eq!(l.count("ip", t0 + 600 * SEC), 4);
        assert_eq!(l.retry_after_ms("ip", t0 + 600 * SEC), None);
        assert!(l.hit("ip", t0 + 600 * SEC));
        assert!(!l.hit("ip", t0 + 600 * SEC));
        assert_eq!(l.count("ip", t0 + 2000 * SEC), 0);
        l.clear("ip");
        assert_eq!(l.count("ip", t0 + 600 * SEC), 0);
        assert_eq!(l.tracked_keys(), 1);
    }

    #[test]
    fn bounded_keys_evict_least_recently_hit() {
        let l = SlidingWindowLimiter::new(3, Duration::from_secs(60), 3);
        assert!(l.hit("a", 1));
        assert!(l.hit("b", 2));
        assert!(l.hit("c", 3));
        assert!(l.hit("a", 4)); // "a" is now the most recent, "b" the oldest
        assert!(l.hit("d", 5));
        assert_eq!(l.tracked_keys(), 3);
        assert_eq!(l.count("b", 6), 0, "b was evicted");
        assert_eq!(l.count("a", 6), 2);
        assert_eq!(l.count("c", 6), 1);
        assert_eq!(l.count("d", 6), 1);
        for i in 0..1000 {
            l.hit(&format!("flood-{i}"), 10 + i);
        }
        assert_eq!(l.tracked_keys(), 3);
        let state = l.lock();
        assert_eq!(state.by_age.len(), state.entries.len());
    }

    #[test]
    fn unlimited_counter_saturates() {
        let l = SlidingWindowLimiter::new(u32::MAX, Duration::from_secs(60), 10);
        assert_eq!(l.last("k"), None);
        for i in 0..2000 {
            assert!(l.hit("k", i));
        }
        assert_eq!(l.count("k", 2000), MAX_EVENTS_PER_KEY as u32);
        assert_eq!(l.last("k"), Some(1999));
        assert!(l.allows("k", 2000));
        assert_eq!(l.count("k", 1999 + 60 * SEC), 0);
    }

    #[test]
    fn zero_limit_refuses_everything() {
        let l = SlidingWindowLimiter::new(0, Duration::from_secs(60), 10);
        assert!(!l.allows("k", 0));
        assert!(!l.hit("k", 0));
        assert_eq!(l.tracked_keys(), 0);
    }

    #[test]
    fn concurrent_hits_respect_the_limit() {
        let l = std::sync::Arc::new(SlidingWindowLimiter::new(50, Duration::from_secs(60), 10));
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let l = l.clone();
                std::thread::spawn(move || (0..100).filter(|_| l.hit("k", 1)).count())
            })
            .collect();
        let allowed: usize = handles.into_iter().map(|h| h.join().unwrap()).sum();
        assert_eq!(allowed, 50);
    }
}

//! Serializing guess-checking per key. Throttles that read a failure count, then check a guess,
//! then record the failure are check-then-act: concurrent guesses would all read the same count
//! and all pass. Holding one of these locks across the three steps makes the count exact on this
//! replica; across replicas `AttemptCounters::exclusive` (a lock in Redis) does the same.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;

/// A fixed set of async locks, one picked per key by a per-process random hash (so nobody can
/// aim many keys at one lock on purpose). Different keys may share a lock; that only serializes
/// a few unrelated attempts, each of which is short.
pub struct StripedLocks {
    hasher: RandomState,
    locks: Vec<tokio::sync::Mutex<()>>,
}

impl StripedLocks {
    pub fn new(stripes: usize) -> Self {
        Self {
            hasher: RandomState::new(),
            locks: (0..stripes.max(1))
                .map(|_| tokio::sync::Mutex::new(()))
                .collect(),
        }
    }

    /// Waits for the lock of `key`; attempts for the same key run one at a time while held.
    pub async fn lock(&self, key: &str) -> tokio::sync::MutexGuard<'_, ()> {
        let stripes = u64::try_from(self.locks.len()).unwrap_or(1);
        let index = usize::try_from(self.hasher.hash_one(key) % stripes).unwrap_or(0);
        self.locks[index].lock().await
    }
}

impl std::fmt::Debug for StripedLocks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StripedLocks")
            .field("stripes", &self.locks.len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn one_key_runs_one_at_a_time() {
        let locks = Arc::new(StripedLocks::new(8));
        let inside = Arc::new(AtomicU32::new(0));
        let most = Arc::new(AtomicU32::new(0));
        let tasks: Vec<_> = (0..16)
            .map(|_| {
                let (locks, inside, most) = (locks.clone(), inside.clone(), most.clone());
                tokio::spawn(async move {
                    let _guard = locks.lock("ann@example.com").await;
                    let now = inside.fetch_add(1, Ordering::SeqCst) + 1;
                    most.fetch_max(now, Ordering::SeqCst);
                    tokio::time::sleep(std::time::Duration::from_millis(2)).await;
                    inside.fetch_sub(1, Ordering::SeqCst);
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        assert_eq!(most.load(Ordering::SeqCst), 1);
    }
}

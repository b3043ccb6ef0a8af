//! Failed-attempt counters shared by every replica (see `nexus_core::attempts`): one sorted set
//! per key, scored by time, trimmed to the window on every read. Keys are hashed, so Redis never
//! holds an email address or a client address. When Redis cannot be reached the counters fall
//! back to this replica's own memory (which is always kept up to date too): throttling gets
//! looser by the number of replicas for the length of the outage, never switched off.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use nexus_core::attempts::{AttemptCounter, AttemptCounters, LocalCounter, SharedGuard, Slot};
use nexus_domain::time::Millis;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use sha2::{Digest, Sha256};
use tokio::sync::Mutex;

/// A sign-in waits at most this long for Redis before using the local count.
const TIMEOUT: Duration = Duration::from_millis(500);
/// After a failed connection attempt, the next one waits this long (meanwhile: local counts).
const RECONNECT_AFTER: Duration = Duration::from_secs(1);
/// Most attempts remembered per key (enough for any limit we enforce).
const MAX_PER_KEY: isize = 1024;

/// Check-and-take in one step (Redis runs a script atomically): trim the window, refuse when
/// `limit` attempts remain, else add this one. KEYS[1] the set; ARGV: window start, limit, now,
/// member, window length (ms).
const RESERVE: &str = r"
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return 1
";

#[derive(Clone)]
pub struct RedisAttempts {
    shared: Arc<Shared>,
}

struct Shared {
    client: redis::Client,
    connection: Mutex<Connection>,
}

#[derive(Default)]
struct Connection {
    manager: Option<ConnectionManager>,
    failed_at: Option<Instant>,
}

impl RedisAttempts {
    pub fn new(url: &str) -> anyhow::Result<Self> {
        let client =
            redis::Client::open(url).map_err(|e| anyhow::anyhow!("invalid Redis URL: {e}"))?;
        Ok(Self {
            shared: Arc::new(Shared {
                client,
                connection: Mutex::new(Connection::default()),
            }),
        })
    }
}

impl Shared {
    async fn manager(&self) -> Option<ConnectionManager> {
        let mut connection = self.connection.lock().await;
        if let Some(manager) = &connection.manager {
            return Some(manager.clone());
        }
        if connection
            .failed_at
            .is_some_and(|at| at.elapsed() < RECONNECT_AFTER)
        {
            return None;
        }
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(TIMEOUT))
            .set_response_timeout(Some(TIMEOUT))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(1));
        match ConnectionManager::new_with_config(self.client.clone(), config).await {
            Ok(manager) => {
                connection.manager = Some(manager.clone());
                connection.failed_at = None;
                Some(manager)
            }
            Err(e) => {
                tracing::warn!(error = %e, "Redis unreachable; throttling counts this replica's attempts only");
                connection.failed_at = Some(Instant::now());
                None
            }
        }
    }
}

/// How long a guess may hold its key's lock (a replica that dies holding it blocks the key no
/// longer than this).
const LOCK_TTL_MS: u64 = 10_000;
/// How long a guess waits for its key's lock before going ahead without it (the counts still
/// apply; only the strict one-at-a-time order is given up).
const LOCK_WAIT: Duration = Duration::from_secs(5);
/// Deletes the lock only if it is still ours (it may have expired and been taken since).
const UNLOCK: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
";

/// `prefix` + a hash of `key`: Redis never sees the email or address itself.
fn hashed_key(prefix: &str, key: &str) -> String {
    let digest = Sha256::digest(key.as_bytes());
    let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!("{prefix}{hex}")
}

#[async_trait]
impl AttemptCounters for RedisAttempts {
    async fn exclusive(&self, name: &'static str, key: &str) -> Option<SharedGuard> {
        let mut manager = self.shared.manager().await?;
        let lock_key = hashed_key(&format!("nexus:lock:{name}:"), key);
        let token = ulid::Ulid::new().to_string();
        let deadline = Instant::now() + LOCK_WAIT;
        loop {
            let taken: redis::RedisResult<Option<String>> = redis::cmd("SET")
                .arg(&lock_key)
                .arg(&token)
                .arg("NX")
                .arg("PX")
                .arg(LOCK_TTL_MS)
                .query_async(&mut manager)
                .await;
            match taken {
                Ok(Some(_)) => break,
                Ok(None) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Ok(None) => {
                    tracing::warn!(
                        lock = name,
                        "waited too long for a shared attempt lock; going ahead without it"
                    );
                    return None;
                }
                Err(e) => {
                    tracing::warn!(error = %e, lock = name, "Redis lock failed; this replica's lock only");
                    return None;
                }
            }
        }
        Some(SharedGuard::new(move || {
            // Dropped inside a request, so a runtime is there; without one, the lock expires.
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(async move {
                    let released: redis::RedisResult<i64> = redis::cmd("EVAL")
                        .arg(UNLOCK)
                        .arg(1)
                        .arg(&lock_key)
                        .arg(&token)
                        .query_async(&mut manager)
                        .await;
                    if let Err(e) = released {
                        tracing::warn!(error = %e, "releasing a shared attempt lock failed; it expires by itself");
                    }
                });
            }
        }))
    }

    fn counter(&self, name: &'static str, window: Duration) -> Arc<dyn AttemptCounter> {
        Arc::new(RedisCounter {
            shared: self.shared.clone(),
            name,
            window_ms: i64::try_from(window.as_millis()).unwrap_or(i64::MAX),
            local: LocalCounter::new(window),
        })
    }
}

struct RedisCounter {
    shared: Arc<Shared>,
    name: &'static str,
    window_ms: i64,
    local: LocalCounter,
}

impl RedisCounter {
    fn redis_key(&self, key: &str) -> String {
        hashed_key(&format!("nexus:attempts:{}:", self.name), key)
    }

    async fn shared_recent(&self, key: &str, now: Millis) -> Option<(u32, Option<Millis>)> {
        let mut manager = self.shared.manager().await?;
        let redis_key = self.redis_key(key);
        let result: redis::RedisResult<(u32, Vec<(String, f64)>)> = redis::pipe()
            .atomic()
            .cmd("ZREMRANGEBYSCORE")
            .arg(&redis_key)
            .arg("-inf")
            .arg(now.saturating_sub(self.window_ms))
            .ignore()
            .cmd("ZCARD")
            .arg(&redis_key)
            .cmd("ZRANGE")
            .arg(&redis_key)
            .arg(-1)
            .arg(-1)
            .arg("WITHSCORES")
            .query_async(&mut manager)
            .await;
        match result {
            Ok((count, last)) => {
                // Scores are whole milliseconds, exact in an f64 for the next 280,000 years.
                #[allow(clippy::cast_possible_truncation)]
                let last = last.first().map(|(_, score)| *score as Millis);
                Some((count, last))
            }
            Err(e) => {
                tracing::warn!(error = %e, counter = self.name, "Redis read failed; using this replica's attempt count");
                None
            }
        }
    }
}

#[async_trait]
impl AttemptCounter for RedisCounter {
    async fn recent(&self, key: &str, now: Millis) -> (u32, Option<Millis>) {
        match self.shared_recent(key, now).await {
            Some(shared) => shared,
            None => self.local.recent(key, now).await,
        }
    }

    async fn record(&self, key: &str, now: Millis) {
        self.local.record(key, now).await;
        let Some(mut manager) = self.shared.manager().await else {
            return;
        };
        let redis_key = self.redis_key(key);
        // Members must be unique even for attempts in the same millisecond.
        let member = format!("{now}-{}", ulid::Ulid::new());
        let result: redis::RedisResult<()> = redis::pipe()
            .atomic()
            .cmd("ZADD")
            .arg(&redis_key)
            .arg(now)
            .arg(member)
            .ignore()
            .cmd("ZREMRANGEBYRANK")
            .arg(&redis_key)
            .arg(0)
            .arg(-(MAX_PER_KEY + 1))
            .ignore()
            .cmd("PEXPIRE")
            .arg(&redis_key)
            .arg(self.window_ms)
            .ignore()
            .query_async(&mut manager)
            .await;
        if let Err(e) = result {
            tracing::warn!(error = %e, counter = self.name, "Redis write failed; the attempt is counted on this replica only");
        }
    }

    async fn reserve(&self, key: &str, limit: u32, now: Millis) -> Option<Slot> {
        let Some(mut manager) = self.shared.manager().await else {
            return self.local.reserve(key, limit, now).await;
        };
        let id = format!("{now}-{}", ulid::Ulid::new());
        let taken: redis::RedisResult<i64> = redis::cmd("EVAL")
            .arg(RESERVE)
            .arg(1)
            .arg(self.redis_key(key))
            .arg(now.saturating_sub(self.window_ms))
            .arg(limit)
            .arg(now)
            .arg(&id)
            .arg(self.window_ms)
            .query_async(&mut manager)
            .await;
        match taken {
            Ok(1) => {
                // Kept locally too, for the fallback.
                self.local.record(key, now).await;
                Some(Slot { at: now, id })
            }
            Ok(_) => None,
            Err(e) => {
                tracing::warn!(error = %e, counter = self.name, "Redis reservation failed; using this replica's attempt count");
                self.local.reserve(key, limit, now).await
            }
        }
    }

    async fn release(&self, key: &str, slot: Slot) {
        let id = slot.id.clone();
        self.local.release(key, slot).await;
        if id.is_empty() {
            return;
        }
        let Some(mut manager) = self.shared.manager().await else {
            return;
        };
        let result: redis::RedisResult<()> = redis::cmd("ZREM")
            .arg(self.redis_key(key))
            .arg(id)
            .query_async(&mut manager)
            .await;
        if let Err(e) = result {
            tracing::warn!(error = %e, counter = self.name, "Redis release failed; the attempt keeps counting until the window passes");
        }
    }
}

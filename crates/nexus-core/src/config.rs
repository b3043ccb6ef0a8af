//! Tunables of the services, with the defaults DESIGN.md and the issues ask for.

use std::time::Duration;

#[derive(Debug, Clone)]
pub struct CoreConfig {
    /// How often devices are expected to heartbeat.
    pub heartbeat_interval: Duration,
    /// A device is offline after this many missed heartbeats.
    pub missed_heartbeats_offline: u32,
    /// How many events behind the live position a resume may be before it gets a snapshot instead.
    pub replay_buffer: u64,
    /// Per-session live queue; a subscriber further behind than this is disconnected (it resumes).
    pub subscriber_queue: usize,
    /// How long the hub waits for an out-of-order event before reading the gap from the store.
    pub gap_fill_after: Duration,
    /// How long a pairing code stays valid.
    pub pairing_ttl: Duration,
    /// How long a validated device token is trusted without asking the store again.
    pub credential_cache_ttl: Duration,
    /// Lifetime of a device's access token and of its refresh token.
    pub device_token_ttl: Duration,
    pub device_refresh_ttl: Duration,
    /// How long after a device refresh token was spent it may be presented again, as a retry
    /// of a refresh whose answer was lost, while the pair it was traded for is unused.
    /// Zero: every second presentation counts as theft and revokes the device.
    pub device_refresh_retry_grace: Duration,
    /// While long-polling, the store is also re-read this often, so a command queued on another
    /// replica is delivered even when the bus message that should wake the poll is lost.
    pub long_poll_recheck: Duration,
    /// How long ended pairings, tokens and sign-in sessions are kept before housekeeping deletes
    /// them (until then they still answer "expired" / "session ended" precisely).
    pub ended_retention: Duration,
    /// Sign-in, sessions and password rules.
    pub auth: crate::auth::AuthConfig,
}

impl Default for CoreConfig {
    fn default() -> Self {
        Self {
            heartbeat_interval: Duration::from_secs(30),
            pairing_ttl: Duration::from_millis(
                u64::try_from(nexus_domain::pairing::PAIRING_TTL_MILLIS).unwrap_or(300_000),
            ),
            missed_heartbeats_offline: 3,
            replay_buffer: 1000,
            subscriber_queue: 1024,
            gap_fill_after: Duration::from_millis(50),
            credential_cache_ttl: Duration::from_secs(10),
            device_token_ttl: Duration::from_secs(7 * 24 * 3600),
            device_refresh_ttl: Duration::from_secs(30 * 24 * 3600),
            device_refresh_retry_grace: Duration::from_secs(120),
            ended_retention: Duration::from_secs(7 * 24 * 3600),
            long_poll_recheck: Duration::from_millis(500),
            auth: crate::auth::AuthConfig::default(),
        }
    }
}

impl CoreConfig {
    pub fn offline_after_millis(&self) -> i64 {
        let ms = self.heartbeat_interval.as_millis() * u128::from(self.missed_heartbeats_offline);
        i64::try_from(ms).unwrap_or(i64::MAX)
    }
}

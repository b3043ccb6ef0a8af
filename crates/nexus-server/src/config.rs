//! Server configuration: every flag has a `NEXUS_*` environment twin, documented by
//! `nexus server --help`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

fn duration(raw: &str) -> Result<Duration, String> {
    humantime::parse_duration(raw).map_err(|e| format!("{e} (examples: 500ms, 30s, 5m)"))
}

#[derive(Debug, Clone, Args)]
pub struct ServerConfig {
    /// Address to listen on.
    #[arg(long, env = "NEXUS_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// Directory for the embedded database and other state.
    #[arg(long, env = "NEXUS_DATA_DIR", default_value = "./nexus-data")]
    pub data_dir: PathBuf,

    /// PostgreSQL for state shared by several replicas (postgres://nexus_app:...@host/db). The role
    /// must not bypass row-level security; run `nexus migrate` as the schema owner first. Unset:
    /// the embedded SQLite store in --data-dir.
    #[arg(long, env = "NEXUS_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,

    /// Most PostgreSQL connections this server opens.
    #[arg(long, env = "NEXUS_DB_MAX_CONNECTIONS", default_value_t = 16)]
    pub db_max_connections: u32,

    /// How long a request waits for a PostgreSQL connection before failing with 503.
    #[arg(long, env = "NEXUS_DB_ACQUIRE_TIMEOUT", default_value = "2s", value_parser = duration)]
    pub db_acquire_timeout: Duration,

    /// Redis for live fan-out between replicas (redis://host:6379). Without it, this server
    /// fans out in-process only.
    #[arg(long, env = "NEXUS_REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<String>,

    /// Enable the /devtools endpoints (never in production).
    #[arg(long, env = "NEXUS_DEV", default_value_t = false)]
    pub dev: bool,

    /// PEM certificate chain; with --tls-key, serve HTTPS (TLS 1.2/1.3, h2 and http/1.1).
    #[arg(long, env = "NEXUS_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key for --tls-cert.
    #[arg(long, env = "NEXUS_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// Comma-separated origins allowed by CORS (e.g. https://console.example.com). Empty: none.
    #[arg(long, env = "NEXUS_CORS_ORIGINS", value_delimiter = ',', num_args = 0..)]
    pub cors_origins: Vec<String>,

    /// Log filter (tracing EnvFilter syntax), e.g. info or nexus=debug.
    #[arg(long, env = "NEXUS_LOG", default_value = "info")]
    pub log: String,

    /// Expected interval between device heartbeats.
    #[arg(long, env = "NEXUS_HEARTBEAT_INTERVAL", default_value = "30s", value_parser = duration)]
    pub heartbeat_interval: Duration,

    /// Missed heartbeats after which a device counts as offline.
    #[arg(long, env = "NEXUS_OFFLINE_AFTER_MISSED", default_value_t = 3)]
    pub offline_after_missed: u32,

    /// How long a pairing code stays valid.
    #[arg(long, env = "NEXUS_PAIRING_TTL", default_value = "5m", value_parser = duration)]
    pub pairing_ttl: Duration,

    /// Interval of SSE `ping` events.
    #[arg(long, env = "NEXUS_SSE_PING_INTERVAL", default_value = "30s", value_parser = duration)]
    pub sse_ping_interval: Duration,

    /// Close an SSE connection that carried only pings for this long (the client resumes).
    #[arg(long, env = "NEXUS_SSE_IDLE_TIMEOUT", default_value = "5m", value_parser = duration)]
    pub sse_idle_timeout: Duration,

    /// How often an open stream re-checks that its viewer is still signed in and still a member
    /// allowed to read it (logout, removal or a role change end the stream within this time).
    #[arg(long, env = "NEXUS_SSE_REAUTHORIZE_INTERVAL", default_value = "60s", value_parser = duration)]
    pub sse_reauthorize_interval: Duration,

    /// Reconnect delay suggested to SSE clients (`retry:`).
    #[arg(long, env = "NEXUS_SSE_RETRY", default_value = "1s", value_parser = duration)]
    pub sse_retry: Duration,

    /// Events per session a resuming client may be behind before it gets a snapshot instead.
    #[arg(long, env = "NEXUS_SSE_REPLAY_BUFFER", default_value_t = 1000)]
    pub sse_replay_buffer: u64,

    /// Live events a subscriber may fall behind before it is disconnected (it resumes).
    /// At least 100 (one push request's worth).
    #[arg(long, env = "NEXUS_SSE_QUEUE", default_value_t = 1024)]
    pub sse_queue: usize,

    /// On SIGTERM/SIGINT, keep serving (with /health/ready at 503) this long so load balancers
    /// notice, before refusing new connections.
    #[arg(long, env = "NEXUS_SHUTDOWN_DELAY", default_value = "0s", value_parser = duration)]
    pub shutdown_delay: Duration,

    /// Longest wait for in-flight requests to finish during shutdown.
    #[arg(long, env = "NEXUS_DRAIN_TIMEOUT", default_value = "30s", value_parser = duration)]
    pub drain_timeout: Duration,

    /// How long a validated device token is trusted without asking the database. A deleted
    /// device is refused at once on the replica that deleted it; other replicas hear of it over
    /// Redis within milliseconds, and at the latest after this TTL. Default: 10s on a single
    /// server, 0 (always ask the database, so revocation is exact everywhere) with --redis-url.
    #[arg(long, env = "NEXUS_CREDENTIAL_CACHE_TTL", value_parser = duration)]
    pub credential_cache_ttl: Option<Duration>,

    /// With Redis: how often live sessions are checked against the store for events whose bus
    /// message was lost.
    #[arg(long, env = "NEXUS_RESYNC_INTERVAL", default_value = "2s", value_parser = duration)]
    pub resync_interval: Duration,

    /// SQLite connections used for reads.
    #[arg(long, env = "NEXUS_DB_READ_CONNECTIONS", default_value_t = 4)]
    pub db_read_connections: u32,

    /// Directory of the Ed25519 keys that sign access tokens and approvals (PKCS#8 PEM, one per
    /// file; the newest signs, all verify) and of `data.key`, which seals TOTP secrets at rest.
    /// Created with one key of each if empty. Replicas must share it (mount the same secret).
    /// Default: <data-dir>/keys. Rotate signing keys with `nexus admin keys rotate`; servers pick
    /// up new key files within `--keys-reload-interval`.
    #[arg(long, env = "NEXUS_JWT_KEYS_DIR")]
    pub jwt_keys_dir: Option<PathBuf>,

    /// How often the key directory is read again for rotated keys.
    #[arg(long, env = "NEXUS_KEYS_RELOAD_INTERVAL", default_value = "30s", value_parser = duration)]
    pub keys_reload_interval: Duration,

    /// Lifetime of web access tokens.
    #[arg(long, env = "NEXUS_ACCESS_TOKEN_TTL", default_value = "15m", value_parser = duration)]
    pub access_token_ttl: Duration,

    /// Lifetime of web refresh tokens (each refresh starts a new one).
    #[arg(long, env = "NEXUS_REFRESH_TOKEN_TTL", default_value = "7d", value_parser = duration)]
    pub refresh_token_ttl: Duration,

    /// Lifetime of device access tokens.
    #[arg(long, env = "NEXUS_DEVICE_TOKEN_TTL", default_value = "7d", value_parser = duration)]
    pub device_token_ttl: Duration,

    /// Lifetime of device refresh tokens.
    #[arg(long, env = "NEXUS_DEVICE_REFRESH_TTL", default_value = "30d", value_parser = duration)]
    pub device_refresh_ttl: Duration,

    /// How long a spent device refresh token may be presented again as a retry of a refresh
    /// whose answer was lost (only while the pair it was traded for is unused). 0 turns retries
    /// off: any second presentation revokes the device.
    #[arg(long, env = "NEXUS_DEVICE_REFRESH_RETRY_GRACE", default_value = "2m", value_parser = duration)]
    pub device_refresh_retry_grace: Duration,

    /// How often a waiting command long-poll also re-reads the store. Commands queued on another
    /// replica wake it at once through Redis; this is the fallback when such a message is lost.
    #[arg(long, env = "NEXUS_LONG_POLL_RECHECK", default_value = "500ms", value_parser = duration)]
    pub long_poll_recheck: Duration,

    /// How long ended pairings, device tokens, stream tickets and sign-in sessions are kept
    /// before housekeeping deletes them.
    #[arg(long, env = "NEXUS_ENDED_RETENTION", default_value = "7d", value_parser = duration)]
    pub ended_retention: Duration,

    /// How often housekeeping runs.
    #[arg(long, env = "NEXUS_HOUSEKEEPING_INTERVAL", default_value = "10m", value_parser = duration)]
    pub housekeeping_interval: Duration,

    /// Password rules: `default` (at least 8 characters with a special character, not a common
    /// password, not containing the email) or `nist` (NIST SP 800-63B rev 4: at least 15
    /// characters, no composition rules, blocklist).
    #[arg(long, env = "NEXUS_PASSWORD_POLICY", default_value = "default", value_parser = ["default", "nist"])]
    pub password_policy: String,

    /// Email of the admin created on first start (empty store). Default: admin@localhost.
    #[arg(long, env = "NEXUS_BOOTSTRAP_ADMIN_EMAIL")]
    pub bootstrap_admin_email: Option<String>,

    /// Password of that admin. Unset: a random one is printed once and written to
    /// <data-dir>/initial-admin-password (mode 0600).
    #[arg(long, env = "NEXUS_BOOTSTRAP_ADMIN_PASSWORD", hide_env_values = true)]
    pub bootstrap_admin_password: Option<String>,
}

impl ServerConfig {
    pub fn core(&self) -> nexus_core::CoreConfig {
        nexus_core::CoreConfig {
            heartbeat_interval: self.heartbeat_interval,
            missed_heartbeats_offline: self.offline_after_missed,
            replay_buffer: self.sse_replay_buffer,
            subscriber_queue: self.sse_queue,
            pairing_ttl: self.pairing_ttl,
            credential_cache_ttl: self.credential_cache_ttl.unwrap_or(
                if self.redis_url.is_some() {
                    Duration::ZERO
                } else {
                    Duration::from_secs(10)
                },
            ),
            device_token_ttl: self.device_token_ttl,
            device_refresh_ttl: self.device_refresh_ttl,
            device_refresh_retry_grace: self.device_refresh_retry_grace,
            ended_retention: self.ended_retention,
            long_poll_recheck: self.long_poll_recheck,
            auth: nexus_core::auth::AuthConfig {
                access_ttl: self.access_token_ttl,
                refresh_ttl: self.refresh_token_ttl,
                password_policy: nexus_auth::password::PasswordPolicy::from_name(
                    &self.password_policy,
                )
                .unwrap_or_default(),
                ..nexus_core::auth::AuthConfig::default()
            },
            ..nexus_core::CoreConfig::default()
        }
    }

    pub fn keys_dir(&self) -> PathBuf {
        self.jwt_keys_dir
            .clone()
            .unwrap_or_else(|| self.data_dir.join("keys"))
    }

    pub fn tls_enabled(&self) -> bool {
        self.tls_cert.is_some()
    }
}

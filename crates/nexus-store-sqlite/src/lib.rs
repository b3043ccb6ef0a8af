//! The embedded SQLite backend: zero setup, one file in the data directory, WAL mode.
//!
//! SQLite allows one writer at a time, so all writes go through a single writer task that
//! commits whatever has queued up in one transaction ("group commit"): one fsync serves many
//! requests, which is what makes durable per-request ingest fast. Each request's work runs in
//! its own SAVEPOINT, so one failing request never takes the others in its batch down, and a
//! caller is answered only after the COMMIT that made its data durable. Reads use a separate
//! pool and never wait for the writer (WAL readers see the last committed state).

mod rows;
mod writer;

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use anyhow::Context;
use async_trait::async_trait;
use futures_util::FutureExt;
use nexus_domain::command::NewCommand;
use nexus_domain::report::ValidatedReport;
use nexus_domain::secret::SecretHash;
use nexus_domain::time::Millis;
use nexus_domain::{
    CommandId, Device, DeviceId, EventId, Pairing, PairingCode, PairingId, SessionId, TenantId,
};
use nexus_store::{
    AppendedEvent, DeviceCredential, Heartbeat, NewDevice, QueuedCommand, Store, StoreError,
    StoreResult, StoredEvent,
};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{ConnectOptions, Row, SqlitePool};

use crate::rows::{
    device_from_row, event_from_row, pairing_from_row, queued_command_from_row, unexpected,
};
use crate::writer::Writer;

/// The migrations this build understands (applied at start-up).
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// The SQLite store. Cheap to share behind an `Arc`.
pub struct SqliteStore {
    read: SqlitePool,
    writer: Writer,
    checkpointer: tokio::task::JoinHandle<()>,
}

/// How often the WAL is copied back into the database file.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(500);

/// PASSIVE checkpoints never block the writer or readers; the WAL is reused from its start once a
/// checkpoint has caught up, which keeps it small and its fsyncs cheap (overwrites, not growth).
async fn checkpoint_loop(pool: SqlitePool) {
    let mut tick = tokio::time::interval(CHECKPOINT_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if pool.is_closed() {
            return;
        }
        if let Err(e) = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
            .execute(&pool)
            .await
        {
            tracing::debug!(error = %e, "background WAL checkpoint failed");
        }
    }
}

#[derive(Debug, Clone)]
pub struct SqliteConfig {
    /// Connections used for reads (the writer has its own).
    pub read_connections: u32,
    /// How many queued write requests one transaction may carry.
    pub max_batch: usize,
}

impl Default for SqliteConfig {
    fn default() -> Self {
        Self {
            read_connections: 4,
            max_batch: 512,
        }
    }
}

impl SqliteStore {
    /// Opens (creating if needed) the database file and applies pending migrations.
    pub async fn open(path: &Path, config: SqliteConfig) -> anyhow::Result<Self> {
        let options = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))
            .context("building SQLite options")?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // FULL: a committed transaction survives power loss, not only a crash ("2xx means durable").
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(5))
            // Statement journals of multi-row inserts stay in memory instead of temp files.
            .pragma("temp_store", "MEMORY")
            .disable_statement_logging();

        // The writer never checkpoints: copying WAL pages into the database would stall every
        // request waiting on the next commit. A background task checkpoints on another connection
        // (and so on the other core) instead.
        let mut write_conn = options
            .clone()
            .pragma("wal_autocheckpoint", "0")
            .connect()
            .await
            .with_context(|| format!("opening {}", path.display()))?;
        MIGRATOR
            .run_direct(&mut write_conn)
            .await
            .context("applying SQLite migrations (is this data directory from a newer NEXUS?)")?;
        let read = SqlitePoolOptions::new()
            .max_connections(config.read_connections.max(1))
            .acquire_timeout(Duration::from_secs(5))
            .connect_with(options)
            .await
            .context("opening SQLite read pool")?;
        let checkpointer = tokio::spawn(checkpoint_loop(read.clone()));
        Ok(Self {
            read,
            writer: Writer::spawn(write_conn, config.max_batch),
            checkpointer,
        })
    }
}

fn tenant_key(tenant: &TenantId) -> String {
    tenant.to_string()
}

#[async_trait]
impl Store for SqliteStore {
    async fn ping(&self) -> StoreResult<()> {
        sqlx::query("SELECT 1")
            .execute(&self.read)
            .await
            .map_err(unexpected)?;
        self.writer.ensure_running()
    }

    async fn close(&self) {
        self.checkpointer.abort();
        self.writer.shutdown().await;
        self.read.close().await;
    }

    async fn create_pairing(&self, pairing: &Pairing, now: Millis) -> StoreResult<()> {
        let p = pairing.clone();
        self.writer
            .write(move |conn| {
                async move {
                    // An expired or finished pairing releases its code for reuse.
                    let code = p.code.as_ref().map(PairingCode::as_str);
                    sqlx::query("UPDATE pairings SET code = NULL WHERE code = ? AND (expires_at <= ? OR state = 'completed')")
                        .bind(code)
                        .bind(now)
                        .execute(&mut *conn)
                        .await
                        .map_err(unexpected)?;
                    let Some(code) = p.code.as_ref() else {
                        return Err(StoreError::Unexpected(anyhow::anyhow!("a new pairing needs a code")));
                    };
                    let caps = serde_json::to_string(&p.capabilities).map_err(|e| StoreError::Unexpected(e.into()))?;
                    let inserted = sqlx::query(
                        "INSERT INTO pairings (id, code, tenant, device_name, device_type, capabilities, nonce_hash, state, device_id, created_at, expires_at)
                         VALUES (?, ?, ?, ?, ?, ?, ?, ?, NULL, ?, ?)",
                    )
                    .bind(p.id.as_str())
                    .bind(code.as_str())
                    .bind(p.tenant.as_ref().map(tenant_key))
                    .bind(&p.device_name)
                    .bind(&p.device_type)
                    .bind(caps)
                    .bind(p.nonce_hash.as_str())
                    .bind(p.state.as_str())
                    .bind(p.created_at)
                    .bind(p.expires_at)
                    .execute(&mut *conn)
                    .await;
                    match inserted {
                        Ok(_) => Ok(()),
                        Err(sqlx::Error::Database(db)) if db.is_unique_violation() => {
                            Err(StoreError::Conflict("pairing code in use".into()))
                        }
                        Err(e) => Err(unexpected(e)),
                    }
                }
                .boxed()
            })
            .await
    }

    async fn pairing(&self, id: &PairingId) -> StoreResult<Option<Pairing>> {
        let row = sqlx::query("SELECT * FROM pairings WHERE id = ?")
            .bind(id.as_str())
            .fetch_optional(&self.read)
            .await
            .map_err(unexpected)?;
        row.map(|r| pairing_from_row(&r)).transpose()
    }

    async fn pairing_by_code(&self, code: &PairingCode) -> StoreResult<Option<Pairing>> {
        let row = sqlx::query("SELECT * FROM pairings WHERE code = ?")
            .bind(code.as_str())
            .fetch_optional(&self.read)
            .await
            .map_err(unexpected)?;
        row.map(|r| pairing_from_row(&r)).transpose()
    }

    async fn confirm_pairing(
        &self,
        id: &PairingId,
        tenant: &TenantId,
        device_id: &DeviceId,
    ) -> StoreResult<bool> {
        let (id, tenant, device_id) = (id.clone(), tenant_key(tenant), device_id.clone());
        self.writer
            .write(move |conn| {
                async move {
                    let done = sqlx::query(
                        "UPDATE pairings SET state = 'confirmed', tenant = ?, device_id = ? WHERE id = ? AND state = 'pending'",
                    )
                    .bind(tenant)
                    .bind(device_id.as_str())
                    .bind(id.as_str())
                    .execute(&mut *conn)
                    .await
                    .map_err(unexpected)?;
                    Ok(done.rows_affected() == 1)
                }
                .boxed()
            })
            .await
    }

    async fn complete_pairing(&self, id: &PairingId, device: &NewDevice) -> StoreResult<bool> {
        let (id, d) = (id.clone(), device.clone());
        self.writer
            .write(move |conn| {
                async move {
                    let claimed = sqlx::query(
                        "UPDATE pairings SET state = 'completed', code = NULL WHERE id = ? AND state = 'confirmed'",
                    )
                    .bind(id.as_str())
                    .execute(&mut *conn)
                    .await
                    .map_err(unexpected)?;
                    if claimed.rows_affected() != 1 {
                        return Ok(false);
                    }
                    let caps = serde_json::to_string(&d.capabilities).map_err(|e| StoreError::Unexpected(e.into()))?;
                    sqlx::query(
                        "INSERT INTO devices (tenant, id, name, device_type, capabilities, paired_at) VALUES (?, ?, ?, ?, ?, ?)",
                    )
                    .bind(tenant_key(&d.tenant))
                    .bind(d.id.as_str())
                    .bind(&d.name)
                    .bind(&d.device_type)
                    .bind(caps)
                    .bind(d.paired_at)
                    .execute(&mut *conn)
                    .await
                    .map_err(unexpected)?;
                    sqlx::query("INSERT INTO device_tokens (token_hash, tenant, device_id, created_at) VALUES (?, ?, ?, ?)")
                        .bind(d.token_hash.as_str())
                        .bind(tenant_key(&d.tenant))
                        .bind(d.id.as_str())
                        .bind(d.paired_at)
                        .execute(&mut *conn)
                        .await
                        .map_err(unexpected)?;
                    Ok(true)
                }
                .boxed()
            })
            .await
    }

    async fn device_credential(
        &self,
        token_hash: &SecretHash,
    ) -> StoreResult<Option<DeviceCredential>> {
        let row = sqlx::query(
            "SELECT token_hash, tenant, device_id FROM device_tokens WHERE token_hash = ?",
        )
        .bind(token_hash.as_str())
        .fetch_optional(&self.read)
        .await
        .map_err(unexpected)?;
        row.map(|r| -> StoreResult<DeviceCredential> {
            let tenant: String = r.try_get("tenant").map_err(unexpected)?;
            Ok(DeviceCredential {
                device_id: DeviceId::from_trusted(r.try_get("device_id").map_err(unexpected)?),
                tenant: TenantId::parse_joined(&tenant)
                    .map_err(|e| StoreError::Unexpected(e.into()))?,
                token_hash: SecretHash::from_stored(r.try_get("token_hash").map_err(unexpected)?),
            })
        })
        .transpose()
    }

    async fn device(&self, tenant: &TenantId, id: &DeviceId) -> StoreResult<Option<Device>> {
        let row = sqlx::query("SELECT * FROM devices WHERE tenant = ? AND id = ?")
            .bind(tenant_key(tenant))
            .bind(id.as_str())
            .fetch_optional(&self.read)
            .await
            .map_err(unexpected)?;
        row.map(|r| device_from_row(&r)).transpose()
    }

    async fn list_devices(&self, tenant: &TenantId) -> StoreResult<Vec<Device>> {
        let rows = sqlx::query("SELECT * FROM devices WHERE tenant = ? ORDER BY paired_at, id")
            .bind(tenant_key(tenant))
            .fetch_all(&self.read)
            .await
            .map_err(unexpected)?;
        rows.iter().map(device_from_row).collect()
    }

    async fn record_heartbeat(
        &self,
        tenant: &TenantId,
        id: &DeviceId,
        hb: &Heartbeat,
    ) -> StoreResult<bool> {
        let (tenant, id, hb) = (tenant_key(tenant), id.clone(), hb.clone());
        self.writer
            .write(move |conn| {
                async move {
                    let done = sqlx::query(
                        "UPDATE devices SET last_heartbeat_at = ?, reported_status = ?, agent_version = COALESCE(?, agent_version), metrics = ?
                         WHERE tenant = ? AND id = ?",
                    )
                    .bind(hb.at)
                    .bind(&hb.status)
                    .bind(&hb.agent_version)
                    .bind(hb.metrics.to_string())
                    .bind(tenant)
                    .bind(id.as_str())
                    .execute(&mut *conn)
                    .await
                    .map_err(unexpected)?;
                    Ok(done.rows_affected() == 1)
                }
                .boxed()
            })
            .await
    }

    async fn delete_device(&self, tenant: &TenantId, id: &DeviceId) -> StoreResult<bool> {
        let (tenant, id) = (tenant_key(tenant), id.clone());
        self.writer
            .write(move |conn| {
                async move {
                    for sql in [
                        "DELETE FROM device_tokens WHERE tenant = ? AND device_id = ?",
                        "DELETE FROM commands WHERE tenant = ? AND device_id = ?",
                        "DELETE FROM session_devices WHERE tenant = ? AND device_id = ?",
                    ] {
                        sqlx::query(sql)
                            .bind(&tenant)
                            .bind(id.as_str())
                            .execute(&mut *conn)
                            .await
                            .map_err(unexpected)?;
                    }
                    let done = sqlx::query("DELETE FROM devices WHERE tenant = ? AND id = ?")
                        .bind(&tenant)
                        .bind(id.as_str())
                        .execute(&mut *conn)
                        .await
                        .map_err(unexpected)?;
                    Ok(done.rows_affected() == 1)
                }
                .boxed()
            })
            .await
    }

    async fn enqueue_command(
        &self,
        command: &NewCommand,
        now: Millis,
    ) -> StoreResult<QueuedCommand> {
        let c = command.clone();
        self.writer
            .write(move |conn| {
                async move {
                    let body = serde_json::to_string(&c.command).map_err(|e| StoreError::Unexpected(e.into()))?;
                    let row = sqlx::query(
                        "INSERT INTO commands (tenant, device_id, id, body, created_at) VALUES (?, ?, ?, ?, ?) RETURNING seq",
                    )
                    .bind(tenant_key(&c.tenant))
                    .bind(c.device_id.as_str())
                    .bind(c.id.as_str())
                    .bind(body)
                    .bind(now)
                    .fetch_one(&mut *conn)
                    .await
                    .map_err(unexpected)?;
                    Ok(QueuedCommand {
                        seq: row.try_get("seq").map_err(unexpected)?,
                        command: c.command,
                    })
                }
                .boxed()
            })
            .await
    }

    async fn pending_commands(
        &self,
        tenant: &TenantId,
        device: &DeviceId,
        after: i64,
        limit: u32,
    ) -> StoreResult<Vec<QueuedCommand>> {
        let rows = sqlx::query(
            "SELECT seq, body FROM commands WHERE tenant = ? AND device_id = ? AND seq > ? AND acked_at IS NULL ORDER BY seq LIMIT ?",
        )
        .bind(tenant_key(tenant))
        .bind(device.as_str())
        .bind(after)
        .bind(i64::from(limit))
        .fetch_all(&self.read)
        .await
        .map_err(unexpected)?;
        rows.iter().map(queued_command_from_row).collect()
    }

    async fn ack_command(
        &self,
        tenant: &TenantId,
        device: &DeviceId,
        command: &CommandId,
        at: Millis,
    ) -> StoreResult<bool> {
        let (tenant, device, command) = (tenant_key(tenant), device.clone(), command.clone());
        self.writer
            .write(move |conn| {
                async move {
                    let done = sqlx::query(
                        "UPDATE commands SET acked_at = COALESCE(acked_at, ?) WHERE tenant = ? AND device_id = ? AND id = ?",
                    )
                    .bind(at)
                    .bind(tenant)
                    .bind(device.as_str())
                    .bind(command.as_str())
                    .execute(&mut *conn)
                    .await
                    .map_err(unexpected)?;
                    Ok(done.rows_affected() == 1)
                }
                .boxed()
            })
            .await
    }

    async fn append_reports(
        &self,
        tenant: &TenantId,
        device: Option<&DeviceId>,
        reports: &[ValidatedReport],
        now: Millis,
    ) -> StoreResult<Vec<AppendedEvent>> {
        self.writer
            .append(tenant.clone(), device.cloned(), reports.to_vec(), now)
            .await
    }

    async fn events_after(
        &self,
        tenant: &TenantId,
        session: &SessionId,
        after: EventId,
        limit: u32,
    ) -> StoreResult<Vec<StoredEvent>> {
        let rows = sqlx::query(
            "SELECT session_id, event_id, data FROM events WHERE tenant = ? AND session_id = ? AND event_id > ? ORDER BY event_id LIMIT ?",
        )
        .bind(tenant_key(tenant))
        .bind(session.as_str())
        .bind(to_sql_id(after))
        .bind(i64::from(limit))
        .fetch_all(&self.read)
        .await
        .map_err(unexpected)?;
        rows.iter().map(event_from_row).collect()
    }

    async fn latest_event(
        &self,
        tenant: &TenantId,
        session: &SessionId,
        at_or_before: EventId,
    ) -> StoreResult<Option<StoredEvent>> {
        let row = sqlx::query(
            "SELECT session_id, event_id, data FROM events WHERE tenant = ? AND session_id = ? AND event_id <= ? ORDER BY event_id DESC LIMIT 1",
        )
        .bind(tenant_key(tenant))
        .bind(session.as_str())
        .bind(to_sql_id(at_or_before))
        .fetch_optional(&self.read)
        .await
        .map_err(unexpected)?;
        row.map(|r| event_from_row(&r)).transpose()
    }

    async fn last_event_id(&self, tenant: &TenantId, session: &SessionId) -> StoreResult<EventId> {
        let row = sqlx::query("SELECT COALESCE(MAX(event_id), 0) AS last FROM events WHERE tenant = ? AND session_id = ?")
            .bind(tenant_key(tenant))
            .bind(session.as_str())
            .fetch_one(&self.read)
            .await
            .map_err(unexpected)?;
        let last: i64 = row.try_get("last").map_err(unexpected)?;
        Ok(u64::try_from(last).unwrap_or(0))
    }

    async fn session_devices(
        &self,
        tenant: &TenantId,
        session: &SessionId,
    ) -> StoreResult<Vec<Device>> {
        let rows = sqlx::query(
            "SELECT d.* FROM session_devices s JOIN devices d ON d.id = s.device_id AND d.tenant = s.tenant
             WHERE s.tenant = ? AND s.session_id = ? ORDER BY s.last_seen_at DESC LIMIT 100",
        )
        .bind(tenant_key(tenant))
        .bind(session.as_str())
        .fetch_all(&self.read)
        .await
        .map_err(unexpected)?;
        rows.iter().map(device_from_row).collect()
    }
}

/// Event ids are u64 on the wire and i64 in SQL; ids beyond i64 cannot exist in the store.
fn to_sql_id(id: EventId) -> i64 {
    i64::try_from(id).unwrap_or(i64::MAX)
}

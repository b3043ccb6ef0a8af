//! The embedded SQLite backend: zero setup, one file in the data directory, WAL mode.
//!
//! SQLite allows one writer at a time, so all writes go through a single writer task that
//! commits whatever has queued up in one transaction ("group commit"): one fsync serves many
//! requests, which is what makes durable per-request ingest fast. Each request's work runs in
//! its own SAVEPOINT, so one failing request never takes the others in its batch down, and a
//! caller is answered only after the COMMIT that made its data durable. Reads use a separate
//! pool and never wait for the writer (WAL readers see the last committed state).

mod audit;
mod commands;
mod identity;
mod rows;
mod writer;

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use anyhow::Context;
use async_trait::async_trait;
use futures_util::FutureExt;
use nexus_domain::approval::{
    Approval, ApprovalId, ApprovalStatus, CommandPolicySettings, CommandRecord, CommandStatus,
};
use nexus_domain::audit::{AuditEntry, AuditRecord, AuditScope};
use nexus_domain::command::DeviceCommand;
use nexus_domain::identity::{AuthSession, AuthSessionId, StreamTicket, TotpState};
use nexus_domain::report::ValidatedReport;
use nexus_domain::secret::SecretHash;
use nexus_domain::time::Millis;
use nexus_domain::{
    CommandId, Device, DeviceId, Email, EventId, Membership, Org, OrgId, Pairing, PairingCode,
    PairingId, Project, Role, SessionId, TenantId, User, UserId,
};
use nexus_store::{
    AckOutcome, AppendedEvent, AuditPage, AuditQuery, CommandChange, CommandQuery, Created,
    Delivery, DeviceCredential, DeviceTokenHashes, Heartbeat, NewDevice, RefreshOutcome, Store,
    StoreError, StoreResult, StoredEvent,
};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{ConnectOptions, Row, SqlitePool};

use crate::audit::write_audit;
use crate::rows::{
    credential_from_row, device_from_row, event_from_row, pairing_from_row, unexpected,
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

    async fn prune_ended(&self, before: Millis) -> StoreResult<u64> {
        self.writer
            .write(move |conn| {
                async move {
                    let mut pruned = 0;
                    for sql in [
                        "DELETE FROM pairings WHERE expires_at <= ?",
                        "DELETE FROM device_tokens WHERE expires_at <= ?",
                        "DELETE FROM stream_tickets WHERE expires_at <= ?",
                        "DELETE FROM refresh_tokens WHERE session_id IN (SELECT id FROM auth_sessions
                           WHERE expires_at <= ?1 OR revoked_at <= ?1)",
                        "DELETE FROM auth_sessions WHERE expires_at <= ?1 OR revoked_at <= ?1",
                    ] {
                        pruned += sqlx::query(sql)
                            .bind(before)
                            .execute(&mut *conn)
                            .await
                            .map_err(unexpected)?
                            .rows_affected();
                    }
                    Ok(pruned)
                }
                .boxed()
            })
            .await
    }

    async fn close(&self) {
        self.checkpointer.abort();
        self.writer.shutdown().await;
        self.read.close().await;
    }

    async fn create_pairing(
        &self,
        pairing: &Pairing,
        now: Millis,
        audit: &[AuditRecord],
    ) -> StoreResult<()> {
        let (p, audit) = (pairing.clone(), audit.to_vec());
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
                        "INSERT INTO pairings (id, code, tenant, device_name, device_type, capabilities, nonce_hash, state, device_id, created_at, expires_at, client_ip, agent_version)
                         VALUES (?, ?, ?, ?, ?, ?, ?, ?, NULL, ?, ?, ?, ?)",
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
                    .bind(&p.client_ip)
                    .bind(&p.agent_version)
                    .execute(&mut *conn)
                    .await;
                    match inserted {
                        Ok(_) => write_audit(conn, &audit).await,
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
        audit: &[AuditRecord],
    ) -> StoreResult<bool> {
        let (id, tenant, device_id) = (id.clone(), tenant_key(tenant), device_id.clone());
        let audit = audit.to_vec();
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
                    if done.rows_affected() != 1 {
                        return Ok(false);
                    }
                    write_audit(conn, &audit).await?;
                    Ok(true)
                }
                .boxed()
            })
            .await
    }

    async fn complete_pairing(
        &self,
        id: &PairingId,
        device: &NewDevice,
        audit: &[AuditRecord],
    ) -> StoreResult<bool> {
        let (id, d, audit) = (id.clone(), device.clone(), audit.to_vec());
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
                    insert_device_tokens(conn, &tenant_key(&d.tenant), &d.id, &d.tokens, None, d.paired_at)
                        .await?;
                    write_audit(conn, &audit).await?;
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
        // Expiry is the caller's to check: the credential comes back with its `expires_at`.
        let row = sqlx::query(
            "SELECT token_hash, tenant, device_id, expires_at FROM device_tokens
             WHERE token_hash = ? AND kind = 'access'",
        )
        .bind(token_hash.as_str())
        .fetch_optional(&self.read)
        .await
        .map_err(unexpected)?;
        row.map(|r| credential_from_row(&r)).transpose()
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

    async fn delete_device(
        &self,
        tenant: &TenantId,
        id: &DeviceId,
        audit: &[AuditRecord],
    ) -> StoreResult<bool> {
        let (tenant, id, audit) = (tenant_key(tenant), id.clone(), audit.to_vec());
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
                    if done.rows_affected() != 1 {
                        // Nothing was deleted: the other statements matched nothing either (they
                        // are keyed by tenant too), and nothing is audited.
                        return Ok(false);
                    }
                    write_audit(conn, &audit).await?;
                    Ok(true)
                }
                .boxed()
            })
            .await
    }

    async fn rename_device(
        &self,
        tenant: &TenantId,
        id: &DeviceId,
        name: &str,
        audit: &[AuditRecord],
    ) -> StoreResult<bool> {
        let (tenant, id, name, audit) = (
            tenant_key(tenant),
            id.clone(),
            name.to_owned(),
            audit.to_vec(),
        );
        self.writer
            .write(move |conn| {
                async move {
                    let done =
                        sqlx::query("UPDATE devices SET name = ? WHERE tenant = ? AND id = ?")
                            .bind(&name)
                            .bind(&tenant)
                            .bind(id.as_str())
                            .execute(&mut *conn)
                            .await
                            .map_err(unexpected)?;
                    if done.rows_affected() != 1 {
                        return Ok(false);
                    }
                    write_audit(conn, &audit).await?;
                    Ok(true)
                }
                .boxed()
            })
            .await
    }

    async fn rotate_device_tokens(
        &self,
        device: &DeviceId,
        presented_refresh: &SecretHash,
        new: &DeviceTokenHashes,
        now: Millis,
        retry_grace: Millis,
    ) -> StoreResult<RefreshOutcome<DeviceCredential>> {
        let (device, presented, new) = (device.clone(), presented_refresh.clone(), new.clone());
        self.writer
            .write(move |conn| {
                async move {
                    rotate_device_tokens(conn, &device, &presented, &new, now, retry_grace).await
                }
                .boxed()
            })
            .await
    }

    async fn revoke_device_tokens(
        &self,
        tenant: &TenantId,
        id: &DeviceId,
        audit: &[AuditRecord],
    ) -> StoreResult<bool> {
        let (tenant, id, audit) = (tenant_key(tenant), id.clone(), audit.to_vec());
        self.writer
            .write(move |conn| {
                async move {
                    let exists = sqlx::query("SELECT 1 FROM devices WHERE tenant = ? AND id = ?")
                        .bind(&tenant)
                        .bind(id.as_str())
                        .fetch_optional(&mut *conn)
                        .await
                        .map_err(unexpected)?;
                    if exists.is_none() {
                        return Ok(false);
                    }
                    // Spent refresh tokens go too: with no current pair left there is nothing a
                    // reuse could be reported against, and the device has to pair again.
                    sqlx::query("DELETE FROM device_tokens WHERE tenant = ? AND device_id = ?")
                        .bind(&tenant)
                        .bind(id.as_str())
                        .execute(&mut *conn)
                        .await
                        .map_err(unexpected)?;
                    write_audit(conn, &audit).await?;
                    Ok(true)
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

    // --- organizations, projects, members ------------------------------------------------
    async fn create_org(&self, org: &Org, audit: &[AuditRecord]) -> StoreResult<()> {
        identity::create_org(self, org, audit).await
    }

    async fn org(&self, id: &OrgId) -> StoreResult<Option<Org>> {
        identity::org(self, id).await
    }

    async fn create_project(&self, project: &Project, audit: &[AuditRecord]) -> StoreResult<()> {
        identity::create_project(self, project, audit).await
    }

    async fn project(&self, tenant: &TenantId) -> StoreResult<Option<Project>> {
        identity::project(self, tenant).await
    }

    async fn list_projects(&self, org: &OrgId) -> StoreResult<Vec<Project>> {
        identity::list_projects(self, org).await
    }

    async fn put_member(
        &self,
        org: &OrgId,
        user: &UserId,
        role: Role,
        now: Millis,
        audit: &[AuditRecord],
    ) -> StoreResult<()> {
        identity::put_member(self, org, user, role, now, audit).await
    }

    async fn remove_member(
        &self,
        org: &OrgId,
        user: &UserId,
        audit: &[AuditRecord],
    ) -> StoreResult<bool> {
        identity::remove_member(self, org, user, audit).await
    }

    async fn member_role(&self, org: &OrgId, user: &UserId) -> StoreResult<Option<Role>> {
        identity::member_role(self, org, user).await
    }

    async fn list_members(&self, org: &OrgId) -> StoreResult<Vec<Membership>> {
        identity::list_members(self, org).await
    }

    async fn user_orgs(&self, user: &UserId) -> StoreResult<Vec<(OrgId, Role)>> {
        identity::user_orgs(self, user).await
    }

    // --- users -----------------------------------------------------------------------------
    async fn create_user(&self, user: &User, audit: &[AuditRecord]) -> StoreResult<()> {
        identity::create_user(self, user, audit).await
    }

    async fn user(&self, id: &UserId) -> StoreResult<Option<User>> {
        identity::user(self, id).await
    }

    async fn user_by_email(&self, email: &Email) -> StoreResult<Option<User>> {
        identity::user_by_email(self, email).await
    }

    async fn list_users(&self) -> StoreResult<Vec<User>> {
        identity::list_users(self).await
    }

    async fn count_users(&self) -> StoreResult<u64> {
        identity::count_users(self).await
    }

    async fn set_password(
        &self,
        user: &UserId,
        password_hash: &str,
        at: Millis,
        audit: &[AuditRecord],
    ) -> StoreResult<bool> {
        identity::set_password(self, user, password_hash, at, audit).await
    }

    async fn record_login_failure(&self, user: &UserId, at: Millis) -> StoreResult<u32> {
        identity::record_login_failure(self, user, at).await
    }

    async fn clear_login_failures(&self, user: &UserId) -> StoreResult<()> {
        identity::clear_login_failures(self, user).await
    }

    async fn set_totp(
        &self,
        user: &UserId,
        totp: &TotpState,
        recovery_hashes: &[SecretHash],
        audit: &[AuditRecord],
    ) -> StoreResult<bool> {
        identity::set_totp(self, user, totp, recovery_hashes, audit).await
    }

    async fn use_totp_step(&self, user: &UserId, step: u64) -> StoreResult<bool> {
        identity::use_totp_step(self, user, step).await
    }

    async fn use_recovery_code(&self, user: &UserId, code_hash: &SecretHash) -> StoreResult<bool> {
        identity::use_recovery_code(self, user, code_hash).await
    }

    async fn recovery_codes_left(&self, user: &UserId) -> StoreResult<u32> {
        identity::recovery_codes_left(self, user).await
    }

    // --- login sessions --------------------------------------------------------------------
    async fn create_auth_session(
        &self,
        session: &AuthSession,
        refresh_hash: &SecretHash,
        audit: &[AuditRecord],
    ) -> StoreResult<()> {
        identity::create_auth_session(self, session, refresh_hash, audit).await
    }

    async fn auth_session(&self, id: &AuthSessionId) -> StoreResult<Option<AuthSession>> {
        identity::auth_session(self, id).await
    }

    async fn session_access(
        &self,
        id: &AuthSessionId,
        tenant: &TenantId,
    ) -> StoreResult<Option<(AuthSession, Option<Role>)>> {
        identity::session_access(self, id, tenant).await
    }

    async fn list_auth_sessions(
        &self,
        user: &UserId,
        now: Millis,
    ) -> StoreResult<Vec<AuthSession>> {
        identity::list_auth_sessions(self, user, now).await
    }

    async fn rotate_refresh_token(
        &self,
        presented: &SecretHash,
        new_refresh: &SecretHash,
        new_expires_at: Millis,
        now: Millis,
    ) -> StoreResult<RefreshOutcome<AuthSession>> {
        identity::rotate_refresh_token(self, presented, new_refresh, new_expires_at, now).await
    }

    async fn revoke_auth_session(
        &self,
        id: &AuthSessionId,
        now: Millis,
        audit: &[AuditRecord],
    ) -> StoreResult<bool> {
        identity::revoke_auth_session(self, id, now, audit).await
    }

    async fn revoke_user_sessions(
        &self,
        user: &UserId,
        keep: Option<&AuthSessionId>,
        now: Millis,
        audit: &[AuditRecord],
    ) -> StoreResult<Vec<AuthSessionId>> {
        identity::revoke_user_sessions(self, user, keep, now, audit).await
    }

    // --- stream tickets --------------------------------------------------------------------
    async fn create_stream_ticket(
        &self,
        ticket_hash: &SecretHash,
        ticket: &StreamTicket,
    ) -> StoreResult<()> {
        identity::create_stream_ticket(self, ticket_hash, ticket).await
    }

    async fn take_stream_ticket(
        &self,
        ticket_hash: &SecretHash,
        now: Millis,
    ) -> StoreResult<Option<StreamTicket>> {
        identity::take_stream_ticket(self, ticket_hash, now).await
    }

    // --- commands and approvals ----------------------------------------------------------------
    async fn create_command(
        &self,
        record: &CommandRecord,
        approval: Option<&Approval>,
        queue: Option<&DeviceCommand>,
        audit: &[AuditRecord],
    ) -> StoreResult<Created<CommandRecord>> {
        commands::create_command(self, record, approval, queue, audit).await
    }

    async fn command(
        &self,
        tenant: &TenantId,
        id: &CommandId,
    ) -> StoreResult<Option<CommandRecord>> {
        commands::command(self, tenant, id).await
    }

    async fn list_commands(
        &self,
        tenant: &TenantId,
        query: &CommandQuery,
    ) -> StoreResult<(Vec<CommandRecord>, Option<i64>)> {
        commands::list_commands(self, tenant, query).await
    }

    async fn approval(&self, tenant: &TenantId, id: &ApprovalId) -> StoreResult<Option<Approval>> {
        commands::approval(self, tenant, id).await
    }

    async fn list_approvals(
        &self,
        tenant: &TenantId,
        status: Option<ApprovalStatus>,
        limit: u32,
    ) -> StoreResult<Vec<Approval>> {
        commands::list_approvals(self, tenant, status, limit).await
    }

    async fn decide_approval(
        &self,
        tenant: &TenantId,
        id: &ApprovalId,
        decision: ApprovalStatus,
        by: &UserId,
        at: Millis,
        reason: Option<&str>,
        queue: Option<&DeviceCommand>,
        deadline: Option<Millis>,
        audit: &[AuditRecord],
    ) -> StoreResult<Option<(Approval, CommandRecord)>> {
        let decision = commands::Decision {
            tenant: tenant.clone(),
            id: id.clone(),
            decision,
            by: by.clone(),
            at,
            reason: reason.map(str::to_owned),
            queue: queue.cloned(),
            deadline,
            audit: audit.to_vec(),
        };
        commands::decide_approval(self, decision).await
    }

    async fn due_approvals(
        &self,
        now: Millis,
        limit: u32,
    ) -> StoreResult<Vec<(TenantId, ApprovalId)>> {
        commands::due_approvals(self, now, limit).await
    }

    async fn expire_approval(
        &self,
        tenant: &TenantId,
        id: &ApprovalId,
        now: Millis,
        audit: &[AuditRecord],
    ) -> StoreResult<Option<(Approval, CommandRecord)>> {
        commands::expire_approval(self, tenant, id, now, audit).await
    }

    async fn transition_command(
        &self,
        tenant: &TenantId,
        id: &CommandId,
        from: &[CommandStatus],
        to: CommandStatus,
        at: Millis,
        change: &CommandChange,
        audit: &[AuditRecord],
    ) -> StoreResult<Option<CommandRecord>> {
        let transition = commands::Transition {
            tenant: tenant.clone(),
            id: id.clone(),
            from: from.to_vec(),
            to,
            at,
            change: change.clone(),
            audit: audit.to_vec(),
        };
        commands::transition_command(self, transition).await
    }

    async fn due_commands(
        &self,
        now: Millis,
        limit: u32,
    ) -> StoreResult<Vec<(TenantId, CommandId, CommandStatus)>> {
        commands::due_commands(self, now, limit).await
    }

    async fn deliver_commands(
        &self,
        tenant: &TenantId,
        device: &DeviceId,
        after: i64,
        limit: u32,
        now: Millis,
        execution_deadline: Millis,
    ) -> StoreResult<Vec<Delivery>> {
        commands::deliver_commands(self, tenant, device, after, limit, now, execution_deadline)
            .await
    }

    async fn ack_delivery(
        &self,
        tenant: &TenantId,
        device: &DeviceId,
        command: &CommandId,
        attempt: u32,
        at: Millis,
        audit: &[AuditRecord],
    ) -> StoreResult<AckOutcome> {
        commands::ack_delivery(self, tenant, device, command, attempt, at, audit).await
    }

    async fn command_policy(
        &self,
        tenant: &TenantId,
    ) -> StoreResult<Option<CommandPolicySettings>> {
        commands::command_policy(self, tenant).await
    }

    async fn put_command_policy(
        &self,
        tenant: &TenantId,
        policy: &CommandPolicySettings,
        at: Millis,
        audit: &[AuditRecord],
    ) -> StoreResult<()> {
        commands::put_command_policy(self, tenant, policy, at, audit).await
    }

    // --- audit -----------------------------------------------------------------------------
    async fn append_audit(&self, records: &[AuditRecord]) -> StoreResult<()> {
        if records.is_empty() {
            return Ok(());
        }
        let records = records.to_vec();
        self.writer
            .write(move |conn| async move { write_audit(conn, &records).await }.boxed())
            .await
    }

    async fn audit_entries(&self, query: &AuditQuery) -> StoreResult<AuditPage> {
        audit::entries(&self.read, query).await
    }

    async fn audit_chain(
        &self,
        scope: &AuditScope,
        after_seq: u64,
        limit: u32,
    ) -> StoreResult<Vec<AuditEntry>> {
        audit::chain(&self.read, scope, after_seq, limit).await
    }

    async fn audit_scopes(&self) -> StoreResult<Vec<AuditScope>> {
        audit::scopes(&self.read).await
    }
}

/// Event ids are u64 on the wire and i64 in SQL; ids beyond i64 cannot exist in the store.
fn to_sql_id(id: EventId) -> i64 {
    i64::try_from(id).unwrap_or(i64::MAX)
}

/// Stores a device's current token pair (access + refresh).
async fn insert_device_tokens(
    conn: &mut sqlx::SqliteConnection,
    tenant: &str,
    device: &DeviceId,
    tokens: &DeviceTokenHashes,
    replaces: Option<&SecretHash>,
    now: Millis,
) -> StoreResult<()> {
    sqlx::query(
        "INSERT INTO device_tokens (token_hash, tenant, device_id, created_at, kind, expires_at, replaces)
         VALUES (?, ?, ?, ?, 'access', ?, NULL), (?, ?, ?, ?, 'refresh', ?, ?)",
    )
    .bind(tokens.access_hash.as_str())
    .bind(tenant)
    .bind(device.as_str())
    .bind(now)
    .bind(tokens.access_expires_at)
    .bind(tokens.refresh_hash.as_str())
    .bind(tenant)
    .bind(device.as_str())
    .bind(now)
    .bind(tokens.refresh_expires_at)
    .bind(replaces.map(SecretHash::as_str))
    .execute(&mut *conn)
    .await
    .map_err(|e| rows::write_error("device token", e))?;
    Ok(())
}

/// The device's current access credential, if it has one.
async fn current_credential(
    conn: &mut sqlx::SqliteConnection,
    device: &DeviceId,
) -> StoreResult<Option<DeviceCredential>> {
    let row = sqlx::query(
        "SELECT token_hash, tenant, device_id, expires_at FROM device_tokens
         WHERE device_id = ? AND kind = 'access'",
    )
    .bind(device.as_str())
    .fetch_optional(&mut *conn)
    .await
    .map_err(unexpected)?;
    row.map(|r| credential_from_row(&r)).transpose()
}

/// See `Store::rotate_device_tokens`. Runs in the writer, which serialises it with every other
/// rotation, so "spend the current refresh token" needs no further locking.
async fn rotate_device_tokens(
    conn: &mut sqlx::SqliteConnection,
    device: &DeviceId,
    presented: &SecretHash,
    new: &DeviceTokenHashes,
    now: Millis,
    retry_grace: Millis,
) -> StoreResult<RefreshOutcome<DeviceCredential>> {
    let row = sqlx::query(
        "SELECT tenant, expires_at, used_at FROM device_tokens
         WHERE token_hash = ? AND device_id = ? AND kind = 'refresh'",
    )
    .bind(presented.as_str())
    .bind(device.as_str())
    .fetch_optional(&mut *conn)
    .await
    .map_err(unexpected)?;
    let Some(row) = row else {
        return Ok(RefreshOutcome::Invalid);
    };
    let tenant: String = row.try_get("tenant").map_err(unexpected)?;
    let expires_at: Millis = row.try_get("expires_at").map_err(unexpected)?;
    let used_at: Option<Millis> = row.try_get("used_at").map_err(unexpected)?;
    if now >= expires_at {
        return Ok(RefreshOutcome::Invalid);
    }
    let retried = match used_at {
        None => {
            sqlx::query("UPDATE device_tokens SET used_at = ? WHERE token_hash = ?")
                .bind(now)
                .bind(presented.as_str())
                .execute(&mut *conn)
                .await
                .map_err(unexpected)?;
            false
        }
        Some(spent_at) => {
            // A retry only while the trade's result is untouched: its refresh token unused.
            let successor_spent =
                retry_grace > 0 && now.saturating_sub(spent_at) <= retry_grace && {
                    sqlx::query(
                        "UPDATE device_tokens SET used_at = ?
                     WHERE device_id = ? AND kind = 'refresh' AND used_at IS NULL
                       AND replaces = ? AND expires_at > ?",
                    )
                    .bind(now)
                    .bind(device.as_str())
                    .bind(presented.as_str())
                    .bind(now)
                    .execute(&mut *conn)
                    .await
                    .map_err(unexpected)?
                    .rows_affected()
                        == 1
                };
            if !successor_spent {
                return Ok(match current_credential(conn, device).await? {
                    Some(current) => RefreshOutcome::Reused(current),
                    None => RefreshOutcome::Invalid,
                });
            }
            true
        }
    };
    // The old access token goes; spent refresh tokens stay (reuse detection) until they expire.
    sqlx::query(
        "DELETE FROM device_tokens WHERE device_id = ?
           AND (kind = 'access' OR (used_at IS NOT NULL AND expires_at <= ?))",
    )
    .bind(device.as_str())
    .bind(now)
    .execute(&mut *conn)
    .await
    .map_err(unexpected)?;
    insert_device_tokens(conn, &tenant, device, new, Some(presented), now).await?;
    let credential = DeviceCredential {
        device_id: device.clone(),
        tenant: TenantId::parse_joined(&tenant).map_err(|e| StoreError::Unexpected(e.into()))?,
        token_hash: new.access_hash.clone(),
        expires_at: new.access_expires_at,
    };
    Ok(if retried {
        RefreshOutcome::Retried(credential)
    } else {
        RefreshOutcome::Rotated(credential)
    })
}

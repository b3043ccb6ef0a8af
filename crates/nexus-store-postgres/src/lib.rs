//! The PostgreSQL backend: shared state for any number of stateless `nexus server` replicas.
//!
//! Tenant isolation is enforced by the database, not only by our `WHERE` clauses: every tenant table
//! has row-level security keyed on the `nexus.tenant` setting, and every tenant-scoped method runs in
//! a transaction opened by [`PostgresStore::tenant_tx`], which sets it with SET LOCAL semantics. The
//! few lookups that happen before a tenant is known go through narrow SECURITY DEFINER functions
//! (see `migrations/0001_core.sql` for why), and so do the command sweeper's cross-tenant reads of
//! due approvals and commands, which answer keys only (`migrations/0003_commands.sql`). The audit trail is under row-level security by scope
//! (tenant, organization or system), and the application may only read and append to it; identity
//! tables (users, orgs, login sessions) are control-plane data without row-level security (see
//! `migrations/0002_identity.sql`). The application connects as a role that cannot bypass
//! RLS; [`PostgresStore::migrate`] runs as the schema owner and grants that role what it needs.
//!
//! Ids that clients use as cursors (event ids per session, command seqs per device) come from
//! counter rows updated inside the writing transaction, so they are gapless and commit-ordered
//! across processes (see `append.rs`).
//!
//! Where this store is stricter than the SQLite one (the conformance suite holds both to the same
//! behaviour otherwise): a new pairing must be pending; a pairing that named its tenant at start can
//! only be confirmed into that tenant, and only that tenant can complete it; command seqs count per
//! device queue (1, 2, 3, ...) instead of across all devices.
//!
//! The pool is bounded and fails fast: when the database is unreachable a call fails with
//! `StoreError::Unavailable` after `acquire_timeout` (2 s by default) instead of queueing forever,
//! every call is bounded by `operation_timeout`, and connections are tested before use, so the pool
//! heals by itself when the database comes back.

mod append;
mod audit;
mod batch;
mod commands;
mod identity;
mod rows;
mod schema;

use std::future::Future;
use std::str::FromStr;
use std::time::Duration;

use anyhow::Context;
use async_trait::async_trait;
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
    PairingId, PairingState, Project, Role, SessionId, TenantId, User, UserId,
};
use nexus_store::{
    AckOutcome, AppendedEvent, AuditPage, AuditQuery, CommandChange, CommandQuery, Created,
    Delivery, DeviceCredential, DeviceTokenHashes, Heartbeat, NewDevice, RefreshOutcome, Store,
    StoreError, StoreResult, StoredEvent,
};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection as _, PgPool, Postgres, Row, Transaction};

use crate::audit::write_audit;
use crate::rows::{
    credential_from_row, device_from_row, event_from_row, pairing_from_row, unexpected, write_error,
};
pub use crate::schema::{APPEND_ONLY_TABLES, DEFAULT_APP_ROLE, MigrateOptions, SchemaError};

/// The migrations this build understands. `migrate` applies them; `connect` refuses a database
/// that lacks one of them or has one this build does not know.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Connection pool settings for [`PostgresStore::connect`].
#[derive(Debug, Clone)]
pub struct PostgresConfig {
    /// Upper bound on open connections from this process (replicas × this must fit the server).
    pub max_connections: u32,
    /// Connections kept open while idle.
    pub min_connections: u32,
    /// How long a call waits for a connection (including connecting) before failing with
    /// `Unavailable`. Short, so a database outage turns into fast errors, not piled-up requests.
    pub acquire_timeout: Duration,
    /// Server-side `statement_timeout` for every statement (`None`: the server's default).
    pub statement_timeout: Option<Duration>,
    /// Server-side `idle_in_transaction_session_timeout`: a process that stalls or vanishes in the
    /// middle of a transaction (a frozen replica, a network partition) loses it after this long, so
    /// the row locks it holds (a session's event counter, say) cannot block the other replicas for
    /// longer. Our transactions never wait on the client between statements for long.
    pub idle_in_transaction_timeout: Option<Duration>,
    /// Client-side bound on one whole store call; covers a network that silently drops packets.
    pub operation_timeout: Duration,
    /// Idle connections are closed after this long.
    pub idle_timeout: Option<Duration>,
    /// Connections are recycled after this long (lets a failover or config change take effect).
    pub max_lifetime: Option<Duration>,
    /// Accept a role that bypasses row-level security (superuser, BYPASSRLS, or the tables' owner).
    /// Off by default: tenant isolation would then silently depend on our `WHERE` clauses alone.
    pub allow_privileged_role: bool,
    /// Shown in `pg_stat_activity`.
    pub application_name: String,
}

impl Default for PostgresConfig {
    fn default() -> Self {
        Self {
            max_connections: 16,
            min_connections: 0,
            acquire_timeout: Duration::from_secs(2),
            statement_timeout: Some(Duration::from_secs(15)),
            idle_in_transaction_timeout: Some(Duration::from_secs(10)),
            operation_timeout: Duration::from_secs(20),
            idle_timeout: Some(Duration::from_secs(600)),
            max_lifetime: Some(Duration::from_secs(1800)),
            allow_privileged_role: false,
            application_name: "nexus".to_owned(),
        }
    }
}

/// The PostgreSQL store. Cheap to share behind an `Arc`.
#[derive(Clone)]
pub struct PostgresStore {
    pool: PgPool,
    operation_timeout: Duration,
    /// Group commit for report appends; `None` inside the batcher's own handle.
    batcher: Option<batch::AppendBatcher>,
}

impl PostgresStore {
    /// Applies pending migrations as the schema owner (`owner_url`) and grants the application role
    /// (`nexus_app`) what it needs. Idempotent; safe to run from several processes at once.
    pub async fn migrate(owner_url: &str) -> anyhow::Result<()> {
        schema::migrate(owner_url, &MigrateOptions::default()).await
    }

    /// [`PostgresStore::migrate`] with a different application role.
    pub async fn migrate_with(owner_url: &str, options: &MigrateOptions) -> anyhow::Result<()> {
        schema::migrate(owner_url, options).await
    }

    /// Connects as the application role. Fails, with a message saying what to do, when the database
    /// is unreachable, when its schema is older or newer than this build, or when the role bypasses
    /// row-level security (unless `config.allow_privileged_role`).
    pub async fn connect(app_url: &str, config: PostgresConfig) -> anyhow::Result<Self> {
        let options = PgConnectOptions::from_str(app_url)
            .context("parsing the PostgreSQL URL (postgres://user:password@host:port/database)")?;
        Self::connect_with(options, config).await
    }

    /// [`PostgresStore::connect`] with options built in code.
    pub async fn connect_with(
        options: PgConnectOptions,
        config: PostgresConfig,
    ) -> anyhow::Result<Self> {
        let mut server_settings = vec![("search_path".to_owned(), "public".to_owned())];
        if let Some(timeout) = config.statement_timeout {
            server_settings.push((
                "statement_timeout".to_owned(),
                timeout.as_millis().to_string(),
            ));
        }
        if let Some(timeout) = config.idle_in_transaction_timeout {
            server_settings.push((
                "idle_in_transaction_session_timeout".to_owned(),
                timeout.as_millis().to_string(),
            ));
        }
        let options = options
            .application_name(&config.application_name)
            .options(server_settings)
            .disable_statement_logging();
        let target = format!(
            "{}@{}:{}/{}",
            options.get_username(),
            options.get_host(),
            options.get_port(),
            options.get_database().unwrap_or("")
        );
        let pool = PgPoolOptions::new()
            .max_connections(config.max_connections.max(1))
            .min_connections(config.min_connections)
            .acquire_timeout(config.acquire_timeout)
            .idle_timeout(config.idle_timeout)
            .max_lifetime(config.max_lifetime)
            // sqlx already pings every connection when it goes back to the pool, so a connection
            // that was busy a moment ago is known to be good; pinging it again on acquire would
            // add a round trip to every request. Only a connection that sat idle (where a
            // database restart or failover may have broken it since) is tested before use.
            .test_before_acquire(false)
            .before_acquire(|conn, meta| {
                Box::pin(async move {
                    if meta.idle_for >= IDLE_BEFORE_PING {
                        conn.ping().await?;
                    }
                    Ok(true)
                })
            })
            .connect_with(options)
            .await
            .with_context(|| format!("connecting to PostgreSQL at {target}"))?;
        schema::check(&pool, config.allow_privileged_role).await?;
        let mut store = Self {
            pool,
            operation_timeout: config.operation_timeout,
            batcher: None,
        };
        store.batcher = Some(batch::AppendBatcher::start(store.clone()));
        Ok(store)
    }

    /// Opens a transaction scoped to `tenant`: together with `BEGIN` it sets `nexus.tenant` for this
    /// transaction only (`SET LOCAL`), which the row-level-security policies
    /// compare every row with. Every tenant-scoped method starts here; the setting ends with the
    /// transaction, so a pooled connection never carries one tenant into the next caller's work.
    pub(crate) async fn tenant_tx(
        &self,
        tenant: &TenantId,
    ) -> StoreResult<Transaction<'static, Postgres>> {
        self.scoped_tx(&tenant_key(tenant)).await
    }

    /// [`PostgresStore::tenant_tx`] for any row-level-security key: a tenant (`org:project`) or an
    /// audit scope (`org:*`, `*`; see `migrations/0002_identity.sql`).
    pub(crate) async fn scoped_tx(&self, key: &str) -> StoreResult<Transaction<'static, Postgres>> {
        // `BEGIN` and the setting travel in one round trip (a simple-protocol query, which takes no
        // bind parameters). That is safe only because a key can hold nothing but `[A-Za-z0-9._-]`,
        // `:` and `*` (TenantId::parse, AuditScope::key); checked again here, never trusted.
        let key = audit::checked_key(key)?;
        self.pool
            .begin_with(format!("BEGIN; SET LOCAL nexus.tenant = '{key}'"))
            .await
            .map_err(unexpected)
    }

    /// Bounds one store call, so a database that stops answering (not even refusing) cannot hang
    /// a request. A transaction cut off here is rolled back by the pool.
    pub(crate) async fn bounded<T>(
        &self,
        work: impl Future<Output = StoreResult<T>>,
    ) -> StoreResult<T> {
        if self.pool.is_closed() {
            return Err(StoreError::Unavailable(anyhow::anyhow!(
                "the store is closed"
            )));
        }
        match tokio::time::timeout(self.operation_timeout, work).await {
            Ok(result) => result,
            Err(_) => Err(StoreError::Unavailable(anyhow::anyhow!(
                "the database did not answer within {:?}",
                self.operation_timeout
            ))),
        }
    }
}

/// How long a pooled connection may sit unused before it is tested again before use.
const IDLE_BEFORE_PING: Duration = Duration::from_secs(1);

pub(crate) fn tenant_key(tenant: &TenantId) -> String {
    tenant.to_string()
}

fn json_text(value: &impl serde::Serialize) -> StoreResult<String> {
    serde_json::to_string(value).map_err(|e| StoreError::Unexpected(e.into()))
}

#[async_trait]
impl Store for PostgresStore {
    async fn ping(&self) -> StoreResult<()> {
        self.bounded(async {
            sqlx::query("SELECT 1")
                .execute(&self.pool)
                .await
                .map_err(unexpected)?;
            Ok(())
        })
        .await
    }

    async fn prune_ended(&self, before: Millis) -> StoreResult<u64> {
        self.bounded(async {
            // Pairings and device tokens span tenants (and pending pairings have none yet): a
            // housekeeping function (see the 0005 migration).
            let pruned: i64 = sqlx::query_scalar("SELECT nexus_prune_ended($1)")
                .bind(before)
                .fetch_one(&self.pool)
                .await
                .map_err(unexpected)?;
            Ok(u64::try_from(pruned).unwrap_or(0))
        })
        .await
    }

    async fn close(&self) {
        self.pool.close().await;
    }

    async fn create_pairing(
        &self,
        pairing: &Pairing,
        now: Millis,
        audit: &[AuditRecord],
    ) -> StoreResult<()> {
        self.bounded(async {
            let p = pairing;
            // The lookup function only ever creates pending pairings (see the migration).
            if p.state != PairingState::Pending || p.device_id.is_some() {
                return Err(StoreError::Unexpected(anyhow::anyhow!(
                    "a new pairing must be pending and have no device yet"
                )));
            }
            let Some(code) = p.code.as_ref() else {
                return Err(StoreError::Unexpected(anyhow::anyhow!(
                    "a new pairing needs a code"
                )));
            };
            let mut tx = self.pool.begin().await.map_err(unexpected)?;
            let created = sqlx::query(
                "SELECT nexus_pairing_create($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
            )
            .bind(p.id.as_str())
            .bind(code.as_str())
            .bind(p.tenant.as_ref().map(tenant_key))
            .bind(&p.device_name)
            .bind(&p.device_type)
            .bind(json_text(&p.capabilities)?)
            .bind(p.nonce_hash.as_str())
            .bind(p.created_at)
            .bind(p.expires_at)
            .bind(now)
            .bind(&p.client_ip)
            .bind(&p.agent_version)
            .execute(&mut *tx)
            .await;
            match created {
                Ok(_) => {}
                Err(sqlx::Error::Database(db)) if db.is_unique_violation() => {
                    return Err(StoreError::Conflict("pairing code in use".into()));
                }
                Err(e) => return Err(unexpected(e)),
            }
            write_audit(&mut tx, audit).await?;
            tx.commit().await.map_err(unexpected)
        })
        .await
    }

    async fn pairing(&self, id: &PairingId) -> StoreResult<Option<Pairing>> {
        self.bounded(async {
            let row = sqlx::query("SELECT * FROM nexus_pairing_by_id($1)")
                .bind(id.as_str())
                .fetch_optional(&self.pool)
                .await
                .map_err(unexpected)?;
            row.map(|r| pairing_from_row(&r)).transpose()
        })
        .await
    }

    async fn pairing_by_code(&self, code: &PairingCode) -> StoreResult<Option<Pairing>> {
        self.bounded(async {
            let row = sqlx::query("SELECT * FROM nexus_pairing_by_code($1)")
                .bind(code.as_str())
                .fetch_optional(&self.pool)
                .await
                .map_err(unexpected)?;
            row.map(|r| pairing_from_row(&r)).transpose()
        })
        .await
    }

    async fn confirm_pairing(
        &self,
        id: &PairingId,
        tenant: &TenantId,
        device_id: &DeviceId,
        audit: &[AuditRecord],
    ) -> StoreResult<bool> {
        self.bounded(async {
            let mut tx = self.pool.begin().await.map_err(unexpected)?;
            let row = sqlx::query("SELECT nexus_pairing_confirm($1, $2, $3) AS confirmed")
                .bind(id.as_str())
                .bind(tenant_key(tenant))
                .bind(device_id.as_str())
                .fetch_one(&mut *tx)
                .await
                .map_err(unexpected)?;
            let confirmed: bool = row.try_get("confirmed").map_err(unexpected)?;
            if !confirmed {
                return Ok(false);
            }
            write_audit(&mut tx, audit).await?;
            tx.commit().await.map_err(unexpected)?;
            Ok(true)
        })
        .await
    }

    async fn complete_pairing(
        &self,
        id: &PairingId,
        device: &NewDevice,
        audit: &[AuditRecord],
    ) -> StoreResult<bool> {
        self.bounded(async {
            let d = device;
            // A confirmed pairing belongs to its tenant, so claiming it is ordinary tenant-scoped
            // work: RLS hides it unless `device.tenant` is the tenant that confirmed it.
            let mut tx = self.tenant_tx(&d.tenant).await?;
            let claimed = sqlx::query(
                "UPDATE pairings SET state = 'completed', code = NULL
                 WHERE tenant = $1 AND id = $2 AND state = 'confirmed'",
            )
            .bind(tenant_key(&d.tenant))
            .bind(id.as_str())
            .execute(&mut *tx)
            .await
            .map_err(unexpected)?;
            if claimed.rows_affected() != 1 {
                return Ok(false);
            }
            sqlx::query(
                "INSERT INTO devices (tenant, id, name, device_type, capabilities, paired_at)
                 VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(tenant_key(&d.tenant))
            .bind(d.id.as_str())
            .bind(&d.name)
            .bind(&d.device_type)
            .bind(json_text(&d.capabilities)?)
            .bind(d.paired_at)
            .execute(&mut *tx)
            .await
            .map_err(unexpected)?;
            insert_device_tokens(&mut tx, &d.tenant, &d.id, &d.tokens, d.paired_at).await?;
            write_audit(&mut tx, audit).await?;
            tx.commit().await.map_err(unexpected)?;
            Ok(true)
        })
        .await
    }

    async fn device_credential(
        &self,
        token_hash: &SecretHash,
    ) -> StoreResult<Option<DeviceCredential>> {
        self.bounded(async {
            // Expiry is the caller's to check: the credential comes back with its `expires_at`.
            let row = sqlx::query(
                "SELECT token_hash, tenant, device_id, expires_at FROM nexus_device_credential($1)",
            )
            .bind(token_hash.as_str())
            .fetch_optional(&self.pool)
            .await
            .map_err(unexpected)?;
            row.map(|r| credential_from_row(&r)).transpose()
        })
        .await
    }

    async fn device(&self, tenant: &TenantId, id: &DeviceId) -> StoreResult<Option<Device>> {
        self.bounded(async {
            let mut tx = self.tenant_tx(tenant).await?;
            let row = sqlx::query("SELECT * FROM devices WHERE tenant = $1 AND id = $2")
                .bind(tenant_key(tenant))
                .bind(id.as_str())
                .fetch_optional(&mut *tx)
                .await
                .map_err(unexpected)?;
            tx.commit().await.map_err(unexpected)?;
            row.map(|r| device_from_row(&r)).transpose()
        })
        .await
    }

    async fn list_devices(&self, tenant: &TenantId) -> StoreResult<Vec<Device>> {
        self.bounded(async {
            let mut tx = self.tenant_tx(tenant).await?;
            let rows =
                sqlx::query("SELECT * FROM devices WHERE tenant = $1 ORDER BY paired_at, id")
                    .bind(tenant_key(tenant))
                    .fetch_all(&mut *tx)
                    .await
                    .map_err(unexpected)?;
            tx.commit().await.map_err(unexpected)?;
            rows.iter().map(device_from_row).collect()
        })
        .await
    }

    async fn record_heartbeat(
        &self,
        tenant: &TenantId,
        id: &DeviceId,
        hb: &Heartbeat,
    ) -> StoreResult<bool> {
        self.bounded(async {
            let mut tx = self.tenant_tx(tenant).await?;
            let done = sqlx::query(
                "UPDATE devices SET last_heartbeat_at = $1, reported_status = $2,
                        agent_version = COALESCE($3, agent_version), metrics = $4
                 WHERE tenant = $5 AND id = $6",
            )
            .bind(hb.at)
            .bind(&hb.status)
            .bind(&hb.agent_version)
            .bind(hb.metrics.to_string())
            .bind(tenant_key(tenant))
            .bind(id.as_str())
            .execute(&mut *tx)
            .await
            .map_err(unexpected)?;
            tx.commit().await.map_err(unexpected)?;
            Ok(done.rows_affected() == 1)
        })
        .await
    }

    async fn delete_device(
        &self,
        tenant: &TenantId,
        id: &DeviceId,
        audit: &[AuditRecord],
    ) -> StoreResult<bool> {
        self.bounded(async {
            let mut tx = self.tenant_tx(tenant).await?;
            for sql in [
                "DELETE FROM device_tokens WHERE tenant = $1 AND device_id = $2",
                "DELETE FROM commands WHERE tenant = $1 AND device_id = $2",
                "DELETE FROM command_queues WHERE tenant = $1 AND device_id = $2",
                "DELETE FROM session_devices WHERE tenant = $1 AND device_id = $2",
            ] {
                sqlx::query(sql)
                    .bind(tenant_key(tenant))
                    .bind(id.as_str())
                    .execute(&mut *tx)
                    .await
                    .map_err(unexpected)?;
            }
            let done = sqlx::query("DELETE FROM devices WHERE tenant = $1 AND id = $2")
                .bind(tenant_key(tenant))
                .bind(id.as_str())
                .execute(&mut *tx)
                .await
                .map_err(unexpected)?;
            if done.rows_affected() != 1 {
                // No such device in this tenant: nothing to audit.
                tx.commit().await.map_err(unexpected)?;
                return Ok(false);
            }
            write_audit(&mut tx, audit).await?;
            tx.commit().await.map_err(unexpected)?;
            Ok(true)
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
        self.bounded(async {
            let mut tx = self.tenant_tx(tenant).await?;
            let done = sqlx::query("UPDATE devices SET name = $1 WHERE tenant = $2 AND id = $3")
                .bind(name)
                .bind(tenant_key(tenant))
                .bind(id.as_str())
                .execute(&mut *tx)
                .await
                .map_err(unexpected)?;
            if done.rows_affected() != 1 {
                return Ok(false);
            }
            write_audit(&mut tx, audit).await?;
            tx.commit().await.map_err(unexpected)?;
            Ok(true)
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
        self.bounded(async {
            // The refresh call names no tenant: a pre-tenant function (see the 0004 migration).
            let row = sqlx::query(
                "SELECT outcome, tenant, token_hash, expires_at
                 FROM nexus_device_rotate($1, $2, $3, $4, $5, $6, $7, $8)",
            )
            .bind(device.as_str())
            .bind(presented_refresh.as_str())
            .bind(new.access_hash.as_str())
            .bind(new.access_expires_at)
            .bind(new.refresh_hash.as_str())
            .bind(new.refresh_expires_at)
            .bind(now)
            .bind(retry_grace)
            .fetch_one(&self.pool)
            .await
            .map_err(|e| write_error("device token", e))?;
            let outcome: String = row.try_get("outcome").map_err(unexpected)?;
            let credential = || -> StoreResult<DeviceCredential> {
                let tenant: String = row.try_get("tenant").map_err(unexpected)?;
                Ok(DeviceCredential {
                    device_id: device.clone(),
                    tenant: TenantId::parse_joined(&tenant)
                        .map_err(|e| StoreError::Unexpected(e.into()))?,
                    token_hash: SecretHash::from_stored(
                        row.try_get("token_hash").map_err(unexpected)?,
                    ),
                    expires_at: row.try_get("expires_at").map_err(unexpected)?,
                })
            };
            match outcome.as_str() {
                "rotated" => Ok(RefreshOutcome::Rotated(credential()?)),
                "retried" => Ok(RefreshOutcome::Retried(credential()?)),
                "reused" => Ok(RefreshOutcome::Reused(credential()?)),
                "invalid" => Ok(RefreshOutcome::Invalid),
                other => Err(StoreError::Unexpected(anyhow::anyhow!(
                    "unknown device rotation outcome {other:?}"
                ))),
            }
        })
        .await
    }

    async fn revoke_device_tokens(
        &self,
        tenant: &TenantId,
        id: &DeviceId,
        audit: &[AuditRecord],
    ) -> StoreResult<bool> {
        self.bounded(async {
            let mut tx = self.tenant_tx(tenant).await?;
            // Locks the device row, so a concurrent delete or revoke of it waits for this one.
            let exists =
                sqlx::query("SELECT 1 FROM devices WHERE tenant = $1 AND id = $2 FOR UPDATE")
                    .bind(tenant_key(tenant))
                    .bind(id.as_str())
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(unexpected)?;
            if exists.is_none() {
                return Ok(false);
            }
            // Spent refresh tokens go too: with no current pair left there is nothing a reuse
            // could be reported against, and the device has to pair again.
            sqlx::query("DELETE FROM device_tokens WHERE tenant = $1 AND device_id = $2")
                .bind(tenant_key(tenant))
                .bind(id.as_str())
                .execute(&mut *tx)
                .await
                .map_err(unexpected)?;
            write_audit(&mut tx, audit).await?;
            tx.commit().await.map_err(unexpected)?;
            Ok(true)
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
        match &self.batcher {
            Some(batcher) => {
                self.bounded(batcher.append(tenant, device, reports, now))
                    .await
            }
            None => {
                self.bounded(append::append_reports(self, tenant, device, reports, now))
                    .await
            }
        }
    }

    async fn events_after(
        &self,
        tenant: &TenantId,
        session: &SessionId,
        after: EventId,
        limit: u32,
    ) -> StoreResult<Vec<StoredEvent>> {
        self.bounded(async {
            let mut tx = self.tenant_tx(tenant).await?;
            let rows = sqlx::query(
                "SELECT session_id, event_id, data FROM events
                 WHERE tenant = $1 AND session_id = $2 AND event_id > $3
                 ORDER BY event_id LIMIT $4",
            )
            .bind(tenant_key(tenant))
            .bind(session.as_str())
            .bind(to_sql_id(after))
            .bind(i64::from(limit))
            .fetch_all(&mut *tx)
            .await
            .map_err(unexpected)?;
            tx.commit().await.map_err(unexpected)?;
            rows.iter().map(event_from_row).collect()
        })
        .await
    }

    async fn latest_event(
        &self,
        tenant: &TenantId,
        session: &SessionId,
        at_or_before: EventId,
    ) -> StoreResult<Option<StoredEvent>> {
        self.bounded(async {
            let mut tx = self.tenant_tx(tenant).await?;
            let row = sqlx::query(
                "SELECT session_id, event_id, data FROM events
                 WHERE tenant = $1 AND session_id = $2 AND event_id <= $3
                 ORDER BY event_id DESC LIMIT 1",
            )
            .bind(tenant_key(tenant))
            .bind(session.as_str())
            .bind(to_sql_id(at_or_before))
            .fetch_optional(&mut *tx)
            .await
            .map_err(unexpected)?;
            tx.commit().await.map_err(unexpected)?;
            row.map(|r| event_from_row(&r)).transpose()
        })
        .await
    }

    async fn last_event_id(&self, tenant: &TenantId, session: &SessionId) -> StoreResult<EventId> {
        self.bounded(async {
            let mut tx = self.tenant_tx(tenant).await?;
            // The session's counter row is committed together with its newest event, so it is the
            // newest committed id without scanning events.
            let row = sqlx::query(
                "SELECT last_event_id FROM sessions WHERE tenant = $1 AND session_id = $2",
            )
            .bind(tenant_key(tenant))
            .bind(session.as_str())
            .fetch_optional(&mut *tx)
            .await
            .map_err(unexpected)?;
            tx.commit().await.map_err(unexpected)?;
            let last: i64 = match row {
                Some(r) => r.try_get("last_event_id").map_err(unexpected)?,
                None => 0,
            };
            Ok(u64::try_from(last).unwrap_or(0))
        })
        .await
    }

    async fn session_devices(
        &self,
        tenant: &TenantId,
        session: &SessionId,
    ) -> StoreResult<Vec<Device>> {
        self.bounded(async {
            let mut tx = self.tenant_tx(tenant).await?;
            let rows = sqlx::query(
                "SELECT d.* FROM session_devices s
                 JOIN devices d ON d.id = s.device_id AND d.tenant = s.tenant
                 WHERE s.tenant = $1 AND s.session_id = $2
                 ORDER BY s.last_seen_at DESC LIMIT 100",
            )
            .bind(tenant_key(tenant))
            .bind(session.as_str())
            .fetch_all(&mut *tx)
            .await
            .map_err(unexpected)?;
            tx.commit().await.map_err(unexpected)?;
            rows.iter().map(device_from_row).collect()
        })
        .await
    }

    // --- organizations, projects, members ------------------------------------------------
    async fn create_org(&self, org: &Org, audit: &[AuditRecord]) -> StoreResult<()> {
        self.bounded(identity::create_org(self, org, audit)).await
    }

    async fn org(&self, id: &OrgId) -> StoreResult<Option<Org>> {
        self.bounded(identity::org(self, id)).await
    }

    async fn create_project(&self, project: &Project, audit: &[AuditRecord]) -> StoreResult<()> {
        self.bounded(identity::create_project(self, project, audit))
            .await
    }

    async fn project(&self, tenant: &TenantId) -> StoreResult<Option<Project>> {
        self.bounded(identity::project(self, tenant)).await
    }

    async fn list_projects(&self, org: &OrgId) -> StoreResult<Vec<Project>> {
        self.bounded(identity::list_projects(self, org)).await
    }

    async fn put_member(
        &self,
        org: &OrgId,
        user: &UserId,
        role: Role,
        now: Millis,
        audit: &[AuditRecord],
    ) -> StoreResult<()> {
        self.bounded(identity::put_member(self, org, user, role, now, audit))
            .await
    }

    async fn remove_member(
        &self,
        org: &OrgId,
        user: &UserId,
        audit: &[AuditRecord],
    ) -> StoreResult<bool> {
        self.bounded(identity::remove_member(self, org, user, audit))
            .await
    }

    async fn member_role(&self, org: &OrgId, user: &UserId) -> StoreResult<Option<Role>> {
        self.bounded(identity::member_role(self, org, user)).await
    }

    async fn list_members(&self, org: &OrgId) -> StoreResult<Vec<Membership>> {
        self.bounded(identity::list_members(self, org)).await
    }

    async fn user_orgs(&self, user: &UserId) -> StoreResult<Vec<(OrgId, Role)>> {
        self.bounded(identity::user_orgs(self, user)).await
    }

    // --- users -----------------------------------------------------------------------------
    async fn create_user(&self, user: &User, audit: &[AuditRecord]) -> StoreResult<()> {
        self.bounded(identity::create_user(self, user, audit)).await
    }

    async fn user(&self, id: &UserId) -> StoreResult<Option<User>> {
        self.bounded(identity::user(self, id)).await
    }

    async fn user_by_email(&self, email: &Email) -> StoreResult<Option<User>> {
        self.bounded(identity::user_by_email(self, email)).await
    }

    async fn list_users(&self) -> StoreResult<Vec<User>> {
        self.bounded(identity::list_users(self)).await
    }

    async fn count_users(&self) -> StoreResult<u64> {
        self.bounded(identity::count_users(self)).await
    }

    async fn set_password(
        &self,
        user: &UserId,
        password_hash: &str,
        at: Millis,
        audit: &[AuditRecord],
    ) -> StoreResult<bool> {
        self.bounded(identity::set_password(self, user, password_hash, at, audit))
            .await
    }

    async fn record_login_failure(&self, user: &UserId, at: Millis) -> StoreResult<u32> {
        self.bounded(identity::record_login_failure(self, user, at))
            .await
    }

    async fn clear_login_failures(&self, user: &UserId) -> StoreResult<()> {
        self.bounded(identity::clear_login_failures(self, user))
            .await
    }

    async fn set_totp(
        &self,
        user: &UserId,
        totp: &TotpState,
        recovery_hashes: &[SecretHash],
        audit: &[AuditRecord],
    ) -> StoreResult<bool> {
        self.bounded(identity::set_totp(self, user, totp, recovery_hashes, audit))
            .await
    }

    async fn use_totp_step(&self, user: &UserId, step: u64) -> StoreResult<bool> {
        self.bounded(identity::use_totp_step(self, user, step))
            .await
    }

    async fn use_recovery_code(&self, user: &UserId, code_hash: &SecretHash) -> StoreResult<bool> {
        self.bounded(identity::use_recovery_code(self, user, code_hash))
            .await
    }

    async fn recovery_codes_left(&self, user: &UserId) -> StoreResult<u32> {
        self.bounded(identity::recovery_codes_left(self, user))
            .await
    }

    // --- login sessions --------------------------------------------------------------------
    async fn create_auth_session(
        &self,
        session: &AuthSession,
        refresh_hash: &SecretHash,
        audit: &[AuditRecord],
    ) -> StoreResult<()> {
        self.bounded(identity::create_auth_session(
            self,
            session,
            refresh_hash,
            audit,
        ))
        .await
    }

    async fn auth_session(&self, id: &AuthSessionId) -> StoreResult<Option<AuthSession>> {
        self.bounded(identity::auth_session(self, id)).await
    }

    async fn session_access(
        &self,
        id: &AuthSessionId,
        tenant: &TenantId,
    ) -> StoreResult<Option<(AuthSession, Option<Role>)>> {
        self.bounded(identity::session_access(self, id, tenant))
            .await
    }

    async fn list_auth_sessions(
        &self,
        user: &UserId,
        now: Millis,
    ) -> StoreResult<Vec<AuthSession>> {
        self.bounded(identity::list_auth_sessions(self, user, now))
            .await
    }

    async fn rotate_refresh_token(
        &self,
        presented: &SecretHash,
        new_refresh: &SecretHash,
        new_expires_at: Millis,
        now: Millis,
    ) -> StoreResult<RefreshOutcome<AuthSession>> {
        self.bounded(identity::rotate_refresh_token(
            self,
            presented,
            new_refresh,
            new_expires_at,
            now,
        ))
        .await
    }

    async fn revoke_auth_session(
        &self,
        id: &AuthSessionId,
        now: Millis,
        audit: &[AuditRecord],
    ) -> StoreResult<bool> {
        self.bounded(identity::revoke_auth_session(self, id, now, audit))
            .await
    }

    async fn revoke_user_sessions(
        &self,
        user: &UserId,
        keep: Option<&AuthSessionId>,
        now: Millis,
        audit: &[AuditRecord],
    ) -> StoreResult<Vec<AuthSessionId>> {
        self.bounded(identity::revoke_user_sessions(self, user, keep, now, audit))
            .await
    }

    // --- stream tickets --------------------------------------------------------------------
    async fn create_stream_ticket(
        &self,
        ticket_hash: &SecretHash,
        ticket: &StreamTicket,
    ) -> StoreResult<()> {
        self.bounded(identity::create_stream_ticket(self, ticket_hash, ticket))
            .await
    }

    async fn take_stream_ticket(
        &self,
        ticket_hash: &SecretHash,
        now: Millis,
    ) -> StoreResult<Option<StreamTicket>> {
        self.bounded(identity::take_stream_ticket(self, ticket_hash, now))
            .await
    }

    // --- commands and approvals ----------------------------------------------------------------
    async fn create_command(
        &self,
        record: &CommandRecord,
        approval: Option<&Approval>,
        queue: Option<&DeviceCommand>,
        audit: &[AuditRecord],
    ) -> StoreResult<Created<CommandRecord>> {
        self.bounded(commands::create_command(
            self, record, approval, queue, audit,
        ))
        .await
    }

    async fn command(
        &self,
        tenant: &TenantId,
        id: &CommandId,
    ) -> StoreResult<Option<CommandRecord>> {
        self.bounded(commands::command(self, tenant, id)).await
    }

    async fn list_commands(
        &self,
        tenant: &TenantId,
        query: &CommandQuery,
    ) -> StoreResult<(Vec<CommandRecord>, Option<i64>)> {
        self.bounded(commands::list_commands(self, tenant, query))
            .await
    }

    async fn approval(&self, tenant: &TenantId, id: &ApprovalId) -> StoreResult<Option<Approval>> {
        self.bounded(commands::approval(self, tenant, id)).await
    }

    async fn list_approvals(
        &self,
        tenant: &TenantId,
        status: Option<ApprovalStatus>,
        limit: u32,
    ) -> StoreResult<Vec<Approval>> {
        self.bounded(commands::list_approvals(self, tenant, status, limit))
            .await
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
            tenant,
            id,
            decision,
            by,
            at,
            reason,
            queue,
            deadline,
            audit,
        };
        self.bounded(commands::decide_approval(self, decision))
            .await
    }

    async fn due_approvals(
        &self,
        now: Millis,
        limit: u32,
    ) -> StoreResult<Vec<(TenantId, ApprovalId)>> {
        self.bounded(commands::due_approvals(self, now, limit))
            .await
    }

    async fn expire_approval(
        &self,
        tenant: &TenantId,
        id: &ApprovalId,
        now: Millis,
        audit: &[AuditRecord],
    ) -> StoreResult<Option<(Approval, CommandRecord)>> {
        self.bounded(commands::expire_approval(self, tenant, id, now, audit))
            .await
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
            tenant,
            id,
            from,
            to,
            at,
            change,
            audit,
        };
        self.bounded(commands::transition_command(self, transition))
            .await
    }

    async fn due_commands(
        &self,
        now: Millis,
        limit: u32,
    ) -> StoreResult<Vec<(TenantId, CommandId, CommandStatus)>> {
        self.bounded(commands::due_commands(self, now, limit)).await
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
        self.bounded(commands::deliver_commands(
            self,
            tenant,
            device,
            after,
            limit,
            now,
            execution_deadline,
        ))
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
        self.bounded(commands::ack_delivery(
            self, tenant, device, command, attempt, at, audit,
        ))
        .await
    }

    async fn command_policy(
        &self,
        tenant: &TenantId,
    ) -> StoreResult<Option<CommandPolicySettings>> {
        self.bounded(commands::command_policy(self, tenant)).await
    }

    async fn put_command_policy(
        &self,
        tenant: &TenantId,
        policy: &CommandPolicySettings,
        at: Millis,
        audit: &[AuditRecord],
    ) -> StoreResult<()> {
        self.bounded(commands::put_command_policy(
            self, tenant, policy, at, audit,
        ))
        .await
    }

    // --- audit -----------------------------------------------------------------------------
    async fn append_audit(&self, records: &[AuditRecord]) -> StoreResult<()> {
        self.bounded(audit::append(self, records)).await
    }

    async fn audit_entries(&self, query: &AuditQuery) -> StoreResult<AuditPage> {
        self.bounded(audit::entries(self, query)).await
    }

    async fn audit_chain(
        &self,
        scope: &AuditScope,
        after_seq: u64,
        limit: u32,
    ) -> StoreResult<Vec<AuditEntry>> {
        self.bounded(audit::chain(self, scope, after_seq, limit))
            .await
    }

    async fn audit_scopes(&self) -> StoreResult<Vec<AuditScope>> {
        self.bounded(audit::scopes(self)).await
    }
}

/// Event ids are u64 on the wire and BIGINT in SQL; ids beyond i64 cannot exist in the store.
pub(crate) fn to_sql_id(id: EventId) -> i64 {
    i64::try_from(id).unwrap_or(i64::MAX)
}

/// Stores a device's current token pair (access + refresh) in the caller's tenant transaction.
async fn insert_device_tokens(
    conn: &mut sqlx::PgConnection,
    tenant: &TenantId,
    device: &DeviceId,
    tokens: &DeviceTokenHashes,
    now: Millis,
) -> StoreResult<()> {
    sqlx::query(
        "INSERT INTO device_tokens (token_hash, tenant, device_id, created_at, kind, expires_at)
         VALUES ($1, $3, $4, $5, 'access', $2), ($6, $3, $4, $5, 'refresh', $7)",
    )
    .bind(tokens.access_hash.as_str())
    .bind(tokens.access_expires_at)
    .bind(tenant_key(tenant))
    .bind(device.as_str())
    .bind(now)
    .bind(tokens.refresh_hash.as_str())
    .bind(tokens.refresh_expires_at)
    .execute(&mut *conn)
    .await
    .map_err(|e| write_error("device token", e))?;
    Ok(())
}

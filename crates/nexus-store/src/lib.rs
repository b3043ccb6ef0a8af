//! The storage interface of NEXUS. Services depend on this trait only; each backend crate
//! (SQLite, PostgreSQL) implements it, and `nexus-store-tests` holds every backend to
//! the same behaviour. No SQL and no driver types appear here.

use std::sync::Arc;

use async_trait::async_trait;
use nexus_domain::approval::{
    Approval, ApprovalId, ApprovalStatus, CommandPolicySettings, CommandRecord, CommandStatus,
};
use nexus_domain::audit::{AuditEntry, AuditRecord, AuditScope};
use nexus_domain::command::DeviceCommand;
use nexus_domain::identity::{AuthSession, AuthSessionId, StreamTicket};
use nexus_domain::report::ValidatedReport;
use nexus_domain::secret::SecretHash;
use nexus_domain::time::Millis;
use nexus_domain::{
    CommandId, Device, DeviceId, Email, EventId, Membership, Org, OrgId, Pairing, PairingCode,
    PairingId, Project, Role, SessionId, TenantId, User, UserId,
};

/// Errors a store can produce. Callers map them to HTTP once, at the edge.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached or is overloaded; the request may be retried.
    #[error("store unavailable: {0:#}")]
    Unavailable(anyhow::Error),
    /// A uniqueness rule was violated (e.g. a live pairing code already exists).
    #[error("conflict: {0}")]
    Conflict(String),
    #[error("store error: {0:#}")]
    Unexpected(#[from] anyhow::Error),
}

pub type StoreResult<T> = Result<T, StoreError>;

/// What a device was authenticated as, looked up by the hash of its token.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceCredential {
    pub device_id: DeviceId,
    pub tenant: TenantId,
    pub token_hash: SecretHash,
    /// The access token stops working at this time; the device refreshes it before.
    pub expires_at: Millis,
}

/// A device's token pair: the access token it sends on every call and the refresh token it
/// trades for a new pair. Only hashes are stored.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceTokenHashes {
    pub access_hash: SecretHash,
    pub access_expires_at: Millis,
    pub refresh_hash: SecretHash,
    pub refresh_expires_at: Millis,
}

/// What presenting a refresh token led to.
#[derive(Debug, Clone, PartialEq)]
pub enum RefreshOutcome<T> {
    /// The token was current: it is now spent and the new one is stored.
    Rotated(T),
    /// The token was spent moments ago and what it was traded for has never been used: the answer
    /// to that trade was most likely lost on the way. That unused successor is now spent too and
    /// the new one is stored (device tokens only; see `Store::rotate_device_tokens`).
    Retried(T),
    /// The token was already spent: somebody kept a copy. Nothing was rotated; the caller
    /// revokes the whole family (and audits it).
    Reused(T),
    /// Unknown, expired, or its family is revoked.
    Invalid,
}

/// Whether a create found the object already there (idempotent creates).
#[derive(Debug, Clone, PartialEq)]
pub enum Created<T> {
    New(T),
    /// An object with this id existed; nothing was written.
    Existing(T),
}

/// Filters for listing commands, newest first.
#[derive(Debug, Clone, Default)]
pub struct CommandQuery {
    pub status: Option<CommandStatus>,
    pub device_id: Option<DeviceId>,
    /// Only commands older than this cursor (from a previous page).
    pub before: Option<i64>,
    pub limit: u32,
}

/// Changes that come with a command's status transition.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CommandChange {
    /// The device's outcome (from its report), kept on the record.
    pub result: Option<serde_json::Value>,
    /// Replaces the deadline (`Some(None)` clears it).
    pub deadline: Option<Option<Millis>>,
}

/// A command handed to its device by [`Store::deliver_commands`].
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery {
    /// Position in the device's queue (the pull cursor).
    pub seq: i64,
    /// The queued body as it was stored when the command was queued.
    pub command: DeviceCommand,
    /// The record after this delivery (status `delivered`, `attempt` counted up).
    pub record: CommandRecord,
}

#[derive(Debug, Clone, PartialEq)]
pub enum AckOutcome {
    /// delivered → acked.
    Acked(CommandRecord),
    /// Already acked (or further) with this attempt: nothing changes (idempotent).
    AlreadyAcked(CommandRecord),
    /// The ack names an older delivery than the current one, or the delivery it names ended
    /// without an ack (execution timed out): either way the device must not run the command.
    StaleAttempt(CommandRecord),
    /// No such command for this device, not delivered yet, or an attempt that has not happened.
    NotFound,
}

/// Filters for reading the audit trail, newest first.
#[derive(Debug, Clone, Default)]
pub struct AuditQuery {
    /// Entries of any of these scopes (at least one).
    pub scopes: Vec<AuditScope>,
    pub since: Option<Millis>,
    pub until: Option<Millis>,
    pub action: Option<String>,
    pub actor_id: Option<String>,
    /// Only entries older than this cursor (a value returned with a previous page).
    pub before: Option<i64>,
    /// Page size (0 is taken as 1).
    pub limit: u32,
}

/// One page of audit entries with the cursor for the next page, if there is one.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditPage {
    pub entries: Vec<AuditEntry>,
    pub next_cursor: Option<i64>,
}

/// A device that is created when a confirmed pairing is completed.
#[derive(Debug, Clone)]
pub struct NewDevice {
    pub id: DeviceId,
    pub tenant: TenantId,
    pub name: String,
    pub device_type: String,
    pub capabilities: Vec<String>,
    pub tokens: DeviceTokenHashes,
    pub paired_at: Millis,
}

#[derive(Debug, Clone)]
pub struct Heartbeat {
    pub status: String,
    pub metrics: serde_json::Value,
    pub agent_version: Option<String>,
    pub at: Millis,
}

/// A stored event: its id in the (tenant, session) stream and the JSON delivered to clients.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredEvent {
    pub session_id: SessionId,
    pub event_id: EventId,
    pub data: Arc<str>,
}

/// The outcome of appending one report.
#[derive(Debug, Clone, PartialEq)]
pub struct AppendedEvent {
    pub event: StoredEvent,
    /// The report id was already stored in this session: no new event was created.
    pub duplicate: bool,
}

/// The whole storage interface. Every method is scoped by tenant where the data is tenant data,
/// so a caller cannot forget the scope.
///
/// Audit: a method that takes `audit: &[AuditRecord]` appends those records (chained per scope, as
/// `append_audit` does) in the same transaction as its change, and only if it changed something:
/// when it answers `false`, an empty list or an error, nothing is recorded. Methods answering `()`
/// record whenever they succeed (`put_member` too when the role was already the one given).
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Cheap round trip used by `/health/ready`.
    async fn ping(&self) -> StoreResult<()>;
    /// Housekeeping: deletes what ended at or before `before` and can never be used again —
    /// pairings past their expiry (pending or done), device tokens past their expiry (spent
    /// refresh tokens included: reuse detection needs them only until then), stream tickets, and
    /// sign-in sessions that expired or were revoked, with their refresh tokens. The caller
    /// passes `now` minus a retention period, so recently ended things still answer precisely
    /// ("expired", "session ended"). Returns how many rows went. Never touches devices, commands,
    /// events or the audit log.
    async fn prune_ended(&self, before: Millis) -> StoreResult<u64>;
    /// Flushes pending writes and releases the database. Further calls fail.
    async fn close(&self);

    // --- pairing -------------------------------------------------------------------------
    /// Stores a new pending pairing. `Conflict` if its code is held by another live pairing
    /// (expired pairings release their codes).
    async fn create_pairing(
        &self,
        pairing: &Pairing,
        now: Millis,
        audit: &[AuditRecord],
    ) -> StoreResult<()>;
    async fn pairing(&self, id: &PairingId) -> StoreResult<Option<Pairing>>;
    /// The pairing that currently holds `code`, if any, expired or not.
    async fn pairing_by_code(&self, code: &PairingCode) -> StoreResult<Option<Pairing>>;
    /// pending → confirmed, fixing tenant and device id. False if it was no longer pending.
    async fn confirm_pairing(
        &self,
        id: &PairingId,
        tenant: &TenantId,
        device_id: &DeviceId,
        audit: &[AuditRecord],
    ) -> StoreResult<bool>;
    /// confirmed → completed and the device with its token created, atomically.
    /// False if the pairing was no longer confirmed (someone claimed it already).
    async fn complete_pairing(
        &self,
        id: &PairingId,
        device: &NewDevice,
        audit: &[AuditRecord],
    ) -> StoreResult<bool>;

    // --- devices -------------------------------------------------------------------------
    /// The device an access token hash belongs to, expired or not (the caller checks
    /// `expires_at`). None once the device's tokens are revoked or rotated away.
    async fn device_credential(
        &self,
        token_hash: &SecretHash,
    ) -> StoreResult<Option<DeviceCredential>>;
    async fn device(&self, tenant: &TenantId, id: &DeviceId) -> StoreResult<Option<Device>>;
    async fn list_devices(&self, tenant: &TenantId) -> StoreResult<Vec<Device>>;
    /// False if the device does not exist in this tenant.
    async fn record_heartbeat(
        &self,
        tenant: &TenantId,
        id: &DeviceId,
        heartbeat: &Heartbeat,
    ) -> StoreResult<bool>;

    /// Deletes the device with its tokens, queued commands and session links. False if the
    /// tenant has no such device. Its token stops working with the next lookup.
    async fn delete_device(
        &self,
        tenant: &TenantId,
        id: &DeviceId,
        audit: &[AuditRecord],
    ) -> StoreResult<bool>;

    /// False if the tenant has no such device.
    async fn rename_device(
        &self,
        tenant: &TenantId,
        id: &DeviceId,
        name: &str,
        audit: &[AuditRecord],
    ) -> StoreResult<bool>;

    /// Trades the device's current refresh token (by hash) for `new` tokens. A spent refresh
    /// token of this device answers `Reused` (nothing changes; the caller revokes). The device
    /// is looked up by id alone (the refresh call carries no tenant); the outcome says which.
    /// `Rotated` carries the new access credential, `Reused` the current one. An expired refresh
    /// token (spent or not), another device's, or any token of a revoked device is `Invalid`.
    ///
    /// Lost answers: a spent refresh token presented again at most `retry_grace` after it was
    /// spent, while the refresh token it was traded for is still unused, is a retry rather than
    /// theft (the device never received its new pair). That successor is spent (so whoever holds
    /// it trips reuse detection later) and `new` replaces it: `Retried` with the new credential.
    /// The window counts from the first spend, so retries cannot stretch it. A `retry_grace` of 0
    /// turns this off.
    async fn rotate_device_tokens(
        &self,
        device: &DeviceId,
        presented_refresh: &SecretHash,
        new: &DeviceTokenHashes,
        now: Millis,
        retry_grace: Millis,
    ) -> StoreResult<RefreshOutcome<DeviceCredential>>;

    /// Invalidates every token of the device (access and refresh) without deleting it; it has
    /// to pair again. False if the tenant has no such device.
    async fn revoke_device_tokens(
        &self,
        tenant: &TenantId,
        id: &DeviceId,
        audit: &[AuditRecord],
    ) -> StoreResult<bool>;

    // --- reports and events ---------------------------------------------------------------
    /// Appends reports as events, all or nothing. Event ids are assigned per (tenant, session)
    /// as 1, 2, 3, … without gaps, in commit order. A report id already stored in its session
    /// yields the existing event, flagged `duplicate`. Returns when the data is durable.
    async fn append_reports(
        &self,
        tenant: &TenantId,
        device: Option<&DeviceId>,
        reports: &[ValidatedReport],
        now: Millis,
    ) -> StoreResult<Vec<AppendedEvent>>;
    /// Events with `event_id > after`, ascending, at most `limit`.
    async fn events_after(
        &self,
        tenant: &TenantId,
        session: &SessionId,
        after: EventId,
        limit: u32,
    ) -> StoreResult<Vec<StoredEvent>>;
    /// The newest event with `event_id <= at_or_before`.
    async fn latest_event(
        &self,
        tenant: &TenantId,
        session: &SessionId,
        at_or_before: EventId,
    ) -> StoreResult<Option<StoredEvent>>;
    /// The id of the session's newest event (0 if none).
    async fn last_event_id(&self, tenant: &TenantId, session: &SessionId) -> StoreResult<EventId>;
    /// Devices that have reported into the session, most recent first.
    async fn session_devices(
        &self,
        tenant: &TenantId,
        session: &SessionId,
    ) -> StoreResult<Vec<Device>>;

    // --- organizations, projects, members ------------------------------------------------
    // Identity tables are control-plane data, not tenant data: they are read before a tenant
    // is established (sign-in, membership checks), so they carry no tenant column.
    /// `Conflict` if the org id is taken.
    async fn create_org(&self, org: &Org, audit: &[AuditRecord]) -> StoreResult<()>;
    async fn org(&self, id: &OrgId) -> StoreResult<Option<Org>>;
    /// `Conflict` if the project id is taken in its org; the org must exist (`Conflict` too).
    async fn create_project(&self, project: &Project, audit: &[AuditRecord]) -> StoreResult<()>;
    async fn project(&self, tenant: &TenantId) -> StoreResult<Option<Project>>;
    async fn list_projects(&self, org: &OrgId) -> StoreResult<Vec<Project>>;
    /// Adds the member or changes their role.
    async fn put_member(
        &self,
        org: &OrgId,
        user: &UserId,
        role: Role,
        now: Millis,
        audit: &[AuditRecord],
    ) -> StoreResult<()>;
    /// False if the user was not a member.
    async fn remove_member(
        &self,
        org: &OrgId,
        user: &UserId,
        audit: &[AuditRecord],
    ) -> StoreResult<bool>;
    async fn member_role(&self, org: &OrgId, user: &UserId) -> StoreResult<Option<Role>>;
    /// Members with their emails, sorted by email.
    async fn list_members(&self, org: &OrgId) -> StoreResult<Vec<Membership>>;
    /// The organizations a user belongs to, with the role in each.
    async fn user_orgs(&self, user: &UserId) -> StoreResult<Vec<(OrgId, Role)>>;

    // --- users -----------------------------------------------------------------------------
    /// `Conflict` if the email is taken.
    async fn create_user(&self, user: &User, audit: &[AuditRecord]) -> StoreResult<()>;
    async fn user(&self, id: &UserId) -> StoreResult<Option<User>>;
    async fn user_by_email(&self, email: &Email) -> StoreResult<Option<User>>;
    async fn list_users(&self) -> StoreResult<Vec<User>>;
    async fn count_users(&self) -> StoreResult<u64>;
    /// Replaces the password hash and sets `password_changed_at`. False if no such user.
    async fn set_password(
        &self,
        user: &UserId,
        password_hash: &str,
        at: Millis,
        audit: &[AuditRecord],
    ) -> StoreResult<bool>;
    /// Counts a failed sign-in; returns the new number of consecutive failures.
    async fn record_login_failure(&self, user: &UserId, at: Millis) -> StoreResult<u32>;
    /// A successful sign-in resets the count.
    async fn clear_login_failures(&self, user: &UserId) -> StoreResult<()>;
    /// Stores the TOTP state (setup, enable, disable) and replaces the recovery codes with
    /// `recovery_hashes` (empty removes them).
    async fn set_totp(
        &self,
        user: &UserId,
        totp: &nexus_domain::identity::TotpState,
        recovery_hashes: &[SecretHash],
        audit: &[AuditRecord],
    ) -> StoreResult<bool>;
    /// Accepts a TOTP time step once: true and remembered if it is later than the last accepted
    /// step, false for a replay (same or earlier step). Atomic across replicas.
    async fn use_totp_step(&self, user: &UserId, step: u64) -> StoreResult<bool>;
    /// Spends a recovery code: true the first time, false if unknown or already used.
    async fn use_recovery_code(&self, user: &UserId, code_hash: &SecretHash) -> StoreResult<bool>;
    async fn recovery_codes_left(&self, user: &UserId) -> StoreResult<u32>;

    // --- login sessions --------------------------------------------------------------------
    async fn create_auth_session(
        &self,
        session: &AuthSession,
        refresh_hash: &SecretHash,
        audit: &[AuditRecord],
    ) -> StoreResult<()>;
    async fn auth_session(&self, id: &AuthSessionId) -> StoreResult<Option<AuthSession>>;
    /// A session together with its user's role in `tenant`: `None` for the role when the user is
    /// not a member of the tenant's org or the project does not exist. What every tenant-scoped
    /// request needs (`auth_session` + `member_role` + `project`), in one round trip.
    async fn session_access(
        &self,
        id: &AuthSessionId,
        tenant: &TenantId,
    ) -> StoreResult<Option<(AuthSession, Option<Role>)>>;
    /// The user's sessions that are neither revoked nor expired, newest first.
    async fn list_auth_sessions(&self, user: &UserId, now: Millis)
    -> StoreResult<Vec<AuthSession>>;
    /// Spends the presented refresh token and stores `new_refresh` in its family, moving the
    /// session's `expires_at` to `new_expires_at` and `last_seen_at` to `now`. Unknown tokens and
    /// tokens of a revoked or expired session are `Invalid` (checked before reuse); a spent token
    /// is `Reused` (nothing changes). Of two concurrent rotations of one token, one is `Rotated`
    /// and the other `Reused`.
    async fn rotate_refresh_token(
        &self,
        presented: &SecretHash,
        new_refresh: &SecretHash,
        new_expires_at: Millis,
        now: Millis,
    ) -> StoreResult<RefreshOutcome<AuthSession>>;
    /// Ends a session (logout, reuse detected, removed by its user). False if it was not active.
    async fn revoke_auth_session(
        &self,
        id: &AuthSessionId,
        now: Millis,
        audit: &[AuditRecord],
    ) -> StoreResult<bool>;
    /// Ends every active session of the user except `keep`; returns the ids ended.
    async fn revoke_user_sessions(
        &self,
        user: &UserId,
        keep: Option<&AuthSessionId>,
        now: Millis,
        audit: &[AuditRecord],
    ) -> StoreResult<Vec<AuthSessionId>>;

    // --- stream tickets --------------------------------------------------------------------
    async fn create_stream_ticket(
        &self,
        ticket_hash: &SecretHash,
        ticket: &StreamTicket,
    ) -> StoreResult<()>;
    /// Returns the ticket and deletes it (one use), if it exists and has not expired.
    async fn take_stream_ticket(
        &self,
        ticket_hash: &SecretHash,
        now: Millis,
    ) -> StoreResult<Option<StreamTicket>>;

    // --- commands and approvals (issue 5) ----------------------------------------------------
    /// Stores a proposed command, atomically with its approval (RED, or YELLOW when approval is
    /// required) or its queue entry (`queue`, when it runs without approval) and `audit`.
    /// Idempotent on (tenant, command id): if the id exists, nothing is written and the existing
    /// record is returned as `Existing` (the caller compares `request_hash`). Command ids are
    /// unique per tenant, not across tenants. `queue` is only for a `queued` record (and must name
    /// it), `approval` only for a `pending_approval` one (pending); anything else is `Unexpected`.
    async fn create_command(
        &self,
        record: &CommandRecord,
        approval: Option<&Approval>,
        queue: Option<&DeviceCommand>,
        audit: &[AuditRecord],
    ) -> StoreResult<Created<CommandRecord>>;
    async fn command(
        &self,
        tenant: &TenantId,
        id: &CommandId,
    ) -> StoreResult<Option<CommandRecord>>;
    /// Newest first; the cursor is an opaque position.
    async fn list_commands(
        &self,
        tenant: &TenantId,
        query: &CommandQuery,
    ) -> StoreResult<(Vec<CommandRecord>, Option<i64>)>;
    async fn approval(&self, tenant: &TenantId, id: &ApprovalId) -> StoreResult<Option<Approval>>;
    /// Newest first, at most `limit`.
    async fn list_approvals(
        &self,
        tenant: &TenantId,
        status: Option<ApprovalStatus>,
        limit: u32,
    ) -> StoreResult<Vec<Approval>>;
    /// `pending` → `decision` (approved or denied) if the approval is still pending and
    /// `at < expires_at`, moving its command from `pending_approval` to `queued` (inserting
    /// `queue` into the device's queue, with `deadline`) or to `denied`, and writing `audit`, all
    /// in one transaction. Exactly one of any number of concurrent callers gets `Some`; the
    /// others get `None` (and write nothing). Also `None` if the command is no longer
    /// `pending_approval`. `decision` must be `Approved` or `Denied`; `queue` and `deadline` are
    /// ignored for a denial.
    #[allow(clippy::too_many_arguments)]
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
    ) -> StoreResult<Option<(Approval, CommandRecord)>>;
    /// Pending approvals with `expires_at <= now`, of every tenant (for the sweeper).
    async fn due_approvals(
        &self,
        now: Millis,
        limit: u32,
    ) -> StoreResult<Vec<(TenantId, ApprovalId)>>;
    /// `pending` → `expired` with its command → `expired`, if still pending and due at `now`
    /// (`decided_at` becomes `now`). Conditional like a decision: of an expiry and a decision
    /// racing for one approval exactly one wins. (A command that already left
    /// `pending_approval` another way is returned as it is.)
    async fn expire_approval(
        &self,
        tenant: &TenantId,
        id: &ApprovalId,
        now: Millis,
        audit: &[AuditRecord],
    ) -> StoreResult<Option<(Approval, CommandRecord)>>;
    /// Compare-and-set of a command's status: from any of `from` to `to`, applying `change`
    /// and writing `audit`. A command that leaves the runnable states (cancelled, timed out,
    /// finished) is taken out of its device's queue so it is never delivered again. `None` if its
    /// status was not one of `from` (nothing written). A move to `delivery_timed_out` or
    /// `execution_timed_out` also needs the command's deadline to be `<= at`, so a sweeper that
    /// read a deadline before the device pulled again cannot time out the new delivery. A move
    /// that [`CommandStatus::can_become`] forbids from any of `from` is `Unexpected`.
    #[allow(clippy::too_many_arguments)]
    async fn transition_command(
        &self,
        tenant: &TenantId,
        id: &CommandId,
        from: &[CommandStatus],
        to: CommandStatus,
        at: Millis,
        change: &CommandChange,
        audit: &[AuditRecord],
    ) -> StoreResult<Option<CommandRecord>>;
    /// Commands whose deadline has passed (queued: not delivered in time; delivered or acked:
    /// not finished in time), of every tenant (for the sweeper).
    async fn due_commands(
        &self,
        now: Millis,
        limit: u32,
    ) -> StoreResult<Vec<(TenantId, CommandId, CommandStatus)>>;
    /// What a device pull returns: its queued commands and its delivered-but-unacknowledged ones
    /// with queue position `> after`, oldest first, at most `limit`. In the same transaction each
    /// becomes `delivered`, its `attempt` counts up and its deadline becomes
    /// `execution_deadline`. Queue entries without a command record (none are written any more)
    /// are skipped. A cancel or ack racing a delivery either happens before it (and the command
    /// is not delivered) or finds the command delivered.
    async fn deliver_commands(
        &self,
        tenant: &TenantId,
        device: &DeviceId,
        after: i64,
        limit: u32,
        now: Millis,
        execution_deadline: Millis,
    ) -> StoreResult<Vec<Delivery>>;
    /// The device acknowledges delivery `attempt` of a command.
    async fn ack_delivery(
        &self,
        tenant: &TenantId,
        device: &DeviceId,
        command: &CommandId,
        attempt: u32,
        at: Millis,
        audit: &[AuditRecord],
    ) -> StoreResult<AckOutcome>;
    /// The tenant's command policy, if one was saved (callers fall back to the default).
    async fn command_policy(&self, tenant: &TenantId)
    -> StoreResult<Option<CommandPolicySettings>>;
    async fn put_command_policy(
        &self,
        tenant: &TenantId,
        policy: &CommandPolicySettings,
        at: Millis,
        audit: &[AuditRecord],
    ) -> StoreResult<()>;

    // --- audit -----------------------------------------------------------------------------
    /// Appends records on their own (sign-in attempts and other events that change nothing
    /// else). Entries are chained per scope (`AuditEntry::chain`); concurrent writers of a scope
    /// are serialized so the chain never forks.
    async fn append_audit(&self, records: &[AuditRecord]) -> StoreResult<()>;
    async fn audit_entries(&self, query: &AuditQuery) -> StoreResult<AuditPage>;
    /// One scope's entries with `seq > after_seq`, ascending, at most `limit` (for verifying).
    async fn audit_chain(
        &self,
        scope: &AuditScope,
        after_seq: u64,
        limit: u32,
    ) -> StoreResult<Vec<AuditEntry>>;
    /// Every scope that has entries (for verifying everything).
    async fn audit_scopes(&self) -> StoreResult<Vec<AuditScope>>;
}

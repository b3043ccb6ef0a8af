//! The storage interface of NEXUS. Services depend on this trait only; each backend crate
//! (SQLite, PostgreSQL) implements it, and `nexus-store-tests` holds every backend to
//! the same behaviour. No SQL and no driver types appear here.

use std::sync::Arc;

use async_trait::async_trait;
use nexus_domain::command::{DeviceCommand, NewCommand};
use nexus_domain::report::ValidatedReport;
use nexus_domain::secret::SecretHash;
use nexus_domain::time::Millis;
use nexus_domain::{
    CommandId, Device, DeviceId, EventId, Pairing, PairingCode, PairingId, SessionId, TenantId,
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
}

/// A device that is created when a confirmed pairing is completed.
#[derive(Debug, Clone)]
pub struct NewDevice {
    pub id: DeviceId,
    pub tenant: TenantId,
    pub name: String,
    pub device_type: String,
    pub capabilities: Vec<String>,
    pub token_hash: SecretHash,
    pub paired_at: Millis,
}

#[derive(Debug, Clone)]
pub struct Heartbeat {
    pub status: String,
    pub metrics: serde_json::Value,
    pub agent_version: Option<String>,
    pub at: Millis,
}

/// A queued command with its position in the device's queue.
#[derive(Debug, Clone, PartialEq)]
pub struct QueuedCommand {
    pub seq: i64,
    pub command: DeviceCommand,
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
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Cheap round trip used by `/health/ready`.
    async fn ping(&self) -> StoreResult<()>;
    /// Flushes pending writes and releases the database. Further calls fail.
    async fn close(&self);

    // --- pairing -------------------------------------------------------------------------
    /// Stores a new pending pairing. `Conflict` if its code is held by another live pairing
    /// (expired pairings release their codes).
    async fn create_pairing(&self, pairing: &Pairing, now: Millis) -> StoreResult<()>;
    async fn pairing(&self, id: &PairingId) -> StoreResult<Option<Pairing>>;
    /// The pairing that currently holds `code`, if any, expired or not.
    async fn pairing_by_code(&self, code: &PairingCode) -> StoreResult<Option<Pairing>>;
    /// pending → confirmed, fixing tenant and device id. False if it was no longer pending.
    async fn confirm_pairing(
        &self,
        id: &PairingId,
        tenant: &TenantId,
        device_id: &DeviceId,
    ) -> StoreResult<bool>;
    /// confirmed → completed and the device with its token created, atomically.
    /// False if the pairing was no longer confirmed (someone claimed it already).
    async fn complete_pairing(&self, id: &PairingId, device: &NewDevice) -> StoreResult<bool>;

    // --- devices -------------------------------------------------------------------------
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
    async fn delete_device(&self, tenant: &TenantId, id: &DeviceId) -> StoreResult<bool>;

    // --- commands ------------------------------------------------------------------------
    async fn enqueue_command(
        &self,
        command: &NewCommand,
        now: Millis,
    ) -> StoreResult<QueuedCommand>;
    /// Unacknowledged commands with `seq > after`, oldest first, at most `limit`.
    async fn pending_commands(
        &self,
        tenant: &TenantId,
        device: &DeviceId,
        after: i64,
        limit: u32,
    ) -> StoreResult<Vec<QueuedCommand>>;
    /// Marks a command received. False if the device has no such command. Idempotent.
    async fn ack_command(
        &self,
        tenant: &TenantId,
        device: &DeviceId,
        command: &CommandId,
        at: Millis,
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
}

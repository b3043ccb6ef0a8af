//! Mapping PostgreSQL rows to domain types. Values come from our own writes, so parse failures are
//! store corruption (Unexpected), not client errors.

use std::sync::Arc;

use nexus_domain::secret::SecretHash;
use nexus_domain::{
    Device, DeviceId, Pairing, PairingCode, PairingId, PairingState, SessionId, TenantId,
};
use nexus_store::{QueuedCommand, StoreError, StoredEvent};
use sqlx::Row;
use sqlx::postgres::PgRow;

/// Maps a driver error to the store's error. `Unavailable` means "the database cannot serve this
/// right now, retry": it cannot be reached, it is shutting down or overloaded, or the transaction
/// lost a serialization race (SQLSTATE classes 08, 53, 57P and 40).
pub(crate) fn unexpected(e: sqlx::Error) -> StoreError {
    if is_unavailable(&e) {
        StoreError::Unavailable(e.into())
    } else {
        StoreError::Unexpected(e.into())
    }
}

fn is_unavailable(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            let code = code.as_ref();
            code.starts_with("08") // connection exception
                || code.starts_with("53") // insufficient resources (e.g. too many connections)
                || code.starts_with("57P") // admin/crash shutdown, cannot connect now
                || code == "57014" // query canceled (statement_timeout)
                || code.starts_with("40") // serialization failure, deadlock detected
                || code == "55P03" // lock not available
        }),
        _ => false,
    }
}

fn corrupt(what: &str, detail: impl std::fmt::Display) -> StoreError {
    StoreError::Unexpected(anyhow::anyhow!("stored {what} is invalid: {detail}"))
}

fn tenant(raw: &str) -> Result<TenantId, StoreError> {
    TenantId::parse_joined(raw).map_err(|e| corrupt("tenant", e))
}

pub(crate) fn pairing_from_row(r: &PgRow) -> Result<Pairing, StoreError> {
    let code: Option<String> = r.try_get("code").map_err(unexpected)?;
    let tenant_raw: Option<String> = r.try_get("tenant").map_err(unexpected)?;
    let state: String = r.try_get("state").map_err(unexpected)?;
    let caps: String = r.try_get("capabilities").map_err(unexpected)?;
    let device_id: Option<String> = r.try_get("device_id").map_err(unexpected)?;
    Ok(Pairing {
        id: PairingId::from_trusted(r.try_get("id").map_err(unexpected)?),
        code: code
            .as_deref()
            .map(PairingCode::parse)
            .transpose()
            .map_err(|e| corrupt("pairing code", e))?,
        tenant: tenant_raw.as_deref().map(tenant).transpose()?,
        device_name: r.try_get("device_name").map_err(unexpected)?,
        device_type: r.try_get("device_type").map_err(unexpected)?,
        capabilities: serde_json::from_str(&caps).map_err(|e| corrupt("capabilities", e))?,
        nonce_hash: SecretHash::from_stored(r.try_get("nonce_hash").map_err(unexpected)?),
        state: PairingState::parse(&state).ok_or_else(|| corrupt("pairing state", &state))?,
        device_id: device_id.map(DeviceId::from_trusted),
        created_at: r.try_get("created_at").map_err(unexpected)?,
        expires_at: r.try_get("expires_at").map_err(unexpected)?,
    })
}

pub(crate) fn device_from_row(r: &PgRow) -> Result<Device, StoreError> {
    let tenant_raw: String = r.try_get("tenant").map_err(unexpected)?;
    let caps: String = r.try_get("capabilities").map_err(unexpected)?;
    let metrics: String = r.try_get("metrics").map_err(unexpected)?;
    Ok(Device {
        id: DeviceId::from_trusted(r.try_get("id").map_err(unexpected)?),
        tenant: tenant(&tenant_raw)?,
        name: r.try_get("name").map_err(unexpected)?,
        device_type: r.try_get("device_type").map_err(unexpected)?,
        capabilities: serde_json::from_str(&caps).map_err(|e| corrupt("capabilities", e))?,
        paired_at: r.try_get("paired_at").map_err(unexpected)?,
        last_heartbeat_at: r.try_get("last_heartbeat_at").map_err(unexpected)?,
        reported_status: r.try_get("reported_status").map_err(unexpected)?,
        agent_version: r.try_get("agent_version").map_err(unexpected)?,
        metrics: serde_json::from_str(&metrics).map_err(|e| corrupt("metrics", e))?,
    })
}

pub(crate) fn event_from_row(r: &PgRow) -> Result<StoredEvent, StoreError> {
    let id: i64 = r.try_get("event_id").map_err(unexpected)?;
    let data: String = r.try_get("data").map_err(unexpected)?;
    Ok(StoredEvent {
        session_id: SessionId::from_trusted(r.try_get("session_id").map_err(unexpected)?),
        event_id: u64::try_from(id).map_err(|e| corrupt("event id", e))?,
        data: Arc::from(data),
    })
}

pub(crate) fn queued_command_from_row(r: &PgRow) -> Result<QueuedCommand, StoreError> {
    let body: String = r.try_get("body").map_err(unexpected)?;
    Ok(QueuedCommand {
        seq: r.try_get("seq").map_err(unexpected)?,
        command: serde_json::from_str(&body).map_err(|e| corrupt("command", e))?,
    })
}

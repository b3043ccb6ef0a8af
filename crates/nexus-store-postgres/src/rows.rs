//! Mapping PostgreSQL rows to domain types. Values come from our own writes, so parse failures are
//! store corruption (Unexpected), not client errors.

use std::sync::Arc;

use nexus_domain::CommandId;
use nexus_domain::approval::{Approval, ApprovalId, ApprovalStatus, CommandRecord, CommandStatus};
use nexus_domain::audit::{
    Actor, ActorType, AuditEntry, AuditRecord, AuditResult, AuditScope, AuditTarget,
};
use nexus_domain::command::{DeviceCommand, Risk};
use nexus_domain::identity::{StreamTicket, TotpState};
use nexus_domain::secret::SecretHash;
use nexus_domain::time::Millis;
use nexus_domain::{
    AuthSession, AuthSessionId, Device, DeviceId, Email, Membership, Org, OrgId, Pairing,
    PairingCode, PairingId, PairingState, Project, ProjectId, Role, SessionId, TenantId, User,
    UserId,
};
use nexus_store::{DeviceCredential, StoreError, StoredEvent};
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

pub(crate) fn tenant(raw: &str) -> Result<TenantId, StoreError> {
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
        client_ip: r.try_get("client_ip").map_err(unexpected)?,
        agent_version: r.try_get("agent_version").map_err(unexpected)?,
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

pub(crate) fn risk_str(risk: Risk) -> &'static str {
    match risk {
        Risk::Green => "GREEN",
        Risk::Yellow => "YELLOW",
        Risk::Red => "RED",
    }
}

fn risk(raw: &str) -> Result<Risk, StoreError> {
    match raw {
        "GREEN" => Ok(Risk::Green),
        "YELLOW" => Ok(Risk::Yellow),
        "RED" => Ok(Risk::Red),
        other => Err(corrupt("risk", other)),
    }
}

fn json_column(r: &PgRow, column: &str) -> Result<Option<serde_json::Value>, StoreError> {
    let raw: Option<String> = r.try_get(column).map_err(unexpected)?;
    raw.map(|text| serde_json::from_str(&text).map_err(|e| corrupt(column, e)))
        .transpose()
}

pub(crate) fn command_status(raw: &str) -> Result<CommandStatus, StoreError> {
    CommandStatus::parse(raw).ok_or_else(|| corrupt("command status", raw))
}

pub(crate) fn command_record_from_row(r: &PgRow) -> Result<CommandRecord, StoreError> {
    let tenant_raw: String = r.try_get("tenant").map_err(unexpected)?;
    let risk_raw: String = r.try_get("risk").map_err(unexpected)?;
    let status_raw: String = r.try_get("status").map_err(unexpected)?;
    let approval_id: Option<String> = r.try_get("approval_id").map_err(unexpected)?;
    let replaces: Option<String> = r.try_get("replaces").map_err(unexpected)?;
    let attempt: i32 = r.try_get("attempt").map_err(unexpected)?;
    let deadline: Option<Millis> = r.try_get("deadline").map_err(unexpected)?;
    Ok(CommandRecord {
        id: CommandId::from_trusted(r.try_get("id").map_err(unexpected)?),
        tenant: tenant(&tenant_raw)?,
        device_id: DeviceId::from_trusted(r.try_get("device_id").map_err(unexpected)?),
        command_type: r.try_get("type").map_err(unexpected)?,
        params: json_column(r, "params")?.unwrap_or(serde_json::Value::Null),
        risk: risk(&risk_raw)?,
        status: command_status(&status_raw)?,
        session_id: SessionId::from_trusted(r.try_get("session_id").map_err(unexpected)?),
        correlation_id: r.try_get("correlation_id").map_err(unexpected)?,
        requested_by: UserId::from_trusted(r.try_get("requested_by").map_err(unexpected)?),
        requested_at: r.try_get("requested_at").map_err(unexpected)?,
        request_hash: r.try_get("request_hash").map_err(unexpected)?,
        approval_id: approval_id.map(ApprovalId::from_trusted),
        replaces: replaces.map(CommandId::from_trusted),
        attempt: u32::try_from(attempt).map_err(|e| corrupt("attempt", e))?,
        updated_at: r.try_get("updated_at").map_err(unexpected)?,
        deadline,
        result: json_column(r, "result")?,
    })
}

pub(crate) fn approval_from_row(r: &PgRow) -> Result<Approval, StoreError> {
    let tenant_raw: String = r.try_get("tenant").map_err(unexpected)?;
    let risk_raw: String = r.try_get("risk").map_err(unexpected)?;
    let status_raw: String = r.try_get("status").map_err(unexpected)?;
    let decided_by: Option<String> = r.try_get("decided_by").map_err(unexpected)?;
    Ok(Approval {
        id: ApprovalId::from_trusted(r.try_get("id").map_err(unexpected)?),
        tenant: tenant(&tenant_raw)?,
        command_id: CommandId::from_trusted(r.try_get("command_id").map_err(unexpected)?),
        device_id: DeviceId::from_trusted(r.try_get("device_id").map_err(unexpected)?),
        command_type: r.try_get("type").map_err(unexpected)?,
        risk: risk(&risk_raw)?,
        summary: r.try_get("summary").map_err(unexpected)?,
        requested_by: UserId::from_trusted(r.try_get("requested_by").map_err(unexpected)?),
        requested_at: r.try_get("requested_at").map_err(unexpected)?,
        expires_at: r.try_get("expires_at").map_err(unexpected)?,
        status: ApprovalStatus::parse(&status_raw)
            .ok_or_else(|| corrupt("approval status", &status_raw))?,
        decided_by: decided_by.map(UserId::from_trusted),
        decided_at: r.try_get("decided_at").map_err(unexpected)?,
        reason: r.try_get("reason").map_err(unexpected)?,
    })
}

/// A queued body as the device receives it.
pub(crate) fn queued_body(raw: &str) -> Result<DeviceCommand, StoreError> {
    serde_json::from_str(raw).map_err(|e| corrupt("queued command", e))
}

/// Maps a failed write: uniqueness and foreign-key violations are the caller's `Conflict`.
pub(crate) fn write_error(what: &str, e: sqlx::Error) -> StoreError {
    match &e {
        sqlx::Error::Database(db) if db.is_unique_violation() => {
            StoreError::Conflict(format!("{what} already exists"))
        }
        sqlx::Error::Database(db) if db.is_foreign_key_violation() => {
            StoreError::Conflict(format!("{what} refers to something that does not exist"))
        }
        _ => unexpected(e),
    }
}

fn non_negative(what: &str, v: i64) -> Result<u64, StoreError> {
    u64::try_from(v).map_err(|e| corrupt(what, e))
}

pub(crate) fn credential_from_row(r: &PgRow) -> Result<DeviceCredential, StoreError> {
    let tenant_raw: String = r.try_get("tenant").map_err(unexpected)?;
    Ok(DeviceCredential {
        device_id: DeviceId::from_trusted(r.try_get("device_id").map_err(unexpected)?),
        tenant: tenant(&tenant_raw)?,
        token_hash: SecretHash::from_stored(r.try_get("token_hash").map_err(unexpected)?),
        expires_at: r.try_get("expires_at").map_err(unexpected)?,
    })
}

pub(crate) fn org_from_row(r: &PgRow) -> Result<Org, StoreError> {
    Ok(Org {
        id: OrgId::from_trusted(r.try_get("id").map_err(unexpected)?),
        name: r.try_get("name").map_err(unexpected)?,
        created_at: r.try_get("created_at").map_err(unexpected)?,
    })
}

pub(crate) fn project_from_row(r: &PgRow) -> Result<Project, StoreError> {
    Ok(Project {
        org: OrgId::from_trusted(r.try_get("org").map_err(unexpected)?),
        id: ProjectId::from_trusted(r.try_get("id").map_err(unexpected)?),
        name: r.try_get("name").map_err(unexpected)?,
        created_at: r.try_get("created_at").map_err(unexpected)?,
    })
}

pub(crate) fn role(raw: &str) -> Result<Role, StoreError> {
    Role::parse(raw).ok_or_else(|| corrupt("role", raw))
}

pub(crate) fn membership_from_row(r: &PgRow) -> Result<Membership, StoreError> {
    let role_raw: String = r.try_get("role").map_err(unexpected)?;
    Ok(Membership {
        org: OrgId::from_trusted(r.try_get("org").map_err(unexpected)?),
        user_id: UserId::from_trusted(r.try_get("user_id").map_err(unexpected)?),
        email: Email::from_trusted(r.try_get("email").map_err(unexpected)?),
        display_name: r.try_get("display_name").map_err(unexpected)?,
        role: role(&role_raw)?,
        created_at: r.try_get("created_at").map_err(unexpected)?,
    })
}

pub(crate) fn user_from_row(r: &PgRow) -> Result<User, StoreError> {
    let last_step: Option<i64> = r.try_get("totp_last_step").map_err(unexpected)?;
    let failed: i32 = r.try_get("failed_logins").map_err(unexpected)?;
    Ok(User {
        id: UserId::from_trusted(r.try_get("id").map_err(unexpected)?),
        email: Email::from_trusted(r.try_get("email").map_err(unexpected)?),
        display_name: r.try_get("display_name").map_err(unexpected)?,
        password_hash: r.try_get("password_hash").map_err(unexpected)?,
        password_changed_at: r.try_get("password_changed_at").map_err(unexpected)?,
        created_at: r.try_get("created_at").map_err(unexpected)?,
        totp: TotpState {
            secret: r.try_get("totp_secret").map_err(unexpected)?,
            enabled: r.try_get("totp_enabled").map_err(unexpected)?,
            last_step: last_step
                .map(|s| non_negative("TOTP step", s))
                .transpose()?,
        },
        failed_logins: u32::try_from(failed).map_err(|e| corrupt("failed logins", e))?,
        last_failed_login_at: r.try_get("last_failed_login_at").map_err(unexpected)?,
        disabled: r.try_get("disabled").map_err(unexpected)?,
    })
}

pub(crate) fn auth_session_from_row(r: &PgRow) -> Result<AuthSession, StoreError> {
    Ok(AuthSession {
        id: AuthSessionId::from_trusted(r.try_get("id").map_err(unexpected)?),
        user_id: UserId::from_trusted(r.try_get("user_id").map_err(unexpected)?),
        created_at: r.try_get("created_at").map_err(unexpected)?,
        last_seen_at: r.try_get("last_seen_at").map_err(unexpected)?,
        expires_at: r.try_get("expires_at").map_err(unexpected)?,
        revoked_at: r.try_get("revoked_at").map_err(unexpected)?,
        ip: r.try_get("ip").map_err(unexpected)?,
        user_agent: r.try_get("user_agent").map_err(unexpected)?,
        mfa: r.try_get("mfa").map_err(unexpected)?,
    })
}

pub(crate) fn stream_ticket_from_row(r: &PgRow) -> Result<StreamTicket, StoreError> {
    let tenant_raw: String = r.try_get("tenant").map_err(unexpected)?;
    Ok(StreamTicket {
        user_id: UserId::from_trusted(r.try_get("user_id").map_err(unexpected)?),
        auth_session: AuthSessionId::from_trusted(r.try_get("auth_session").map_err(unexpected)?),
        tenant: tenant(&tenant_raw)?,
        session_id: SessionId::from_trusted(r.try_get("session_id").map_err(unexpected)?),
        expires_at: r.try_get("expires_at").map_err(unexpected)?,
    })
}

pub(crate) fn audit_entry_from_row(r: &PgRow) -> Result<AuditEntry, StoreError> {
    let scope_raw: String = r.try_get("scope").map_err(unexpected)?;
    let actor_type: String = r.try_get("actor_type").map_err(unexpected)?;
    let result: String = r.try_get("result").map_err(unexpected)?;
    let target_type: Option<String> = r.try_get("target_type").map_err(unexpected)?;
    let target_id: Option<String> = r.try_get("target_id").map_err(unexpected)?;
    let details: String = r.try_get("details").map_err(unexpected)?;
    let seq: i64 = r.try_get("seq").map_err(unexpected)?;
    Ok(AuditEntry {
        id: r.try_get("id").map_err(unexpected)?,
        seq: non_negative("audit seq", seq)?,
        record: AuditRecord {
            scope: AuditScope::parse_key(&scope_raw)
                .ok_or_else(|| corrupt("audit scope", &scope_raw))?,
            ts: r.try_get("ts").map_err(unexpected)?,
            actor: Actor {
                kind: ActorType::parse(&actor_type)
                    .ok_or_else(|| corrupt("actor type", &actor_type))?,
                id: r.try_get("actor_id").map_err(unexpected)?,
            },
            action: r.try_get("action").map_err(unexpected)?,
            target: match (target_type, target_id) {
                (Some(kind), Some(id)) => Some(AuditTarget { kind, id }),
                _ => None,
            },
            result: AuditResult::parse(&result).ok_or_else(|| corrupt("audit result", &result))?,
            ip: r.try_get("ip").map_err(unexpected)?,
            user_agent: r.try_get("user_agent").map_err(unexpected)?,
            correlation_id: r.try_get("correlation_id").map_err(unexpected)?,
            details: serde_json::from_str(&details).map_err(|e| corrupt("audit details", e))?,
        },
        prev_hash: r.try_get("prev_hash").map_err(unexpected)?,
        hash: r.try_get("hash").map_err(unexpected)?,
    })
}

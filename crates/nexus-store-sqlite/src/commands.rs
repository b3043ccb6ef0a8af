//! Commands, approvals and command policies on SQLite (see `migrations/0003_commands.sql`).
//!
//! Every state change is one conditional UPDATE (`WHERE status = ...`) run by the single writer
//! task, so the "exactly one wins" rules (one decision per approval, one ack per delivery, a
//! cancel that loses to a delivery) follow from the writer's serialisation. Reads use the read
//! pool; so does the "anything to deliver?" check in front of a pull, which keeps empty long-poll
//! rounds off the writer.

use futures_util::FutureExt;
use nexus_domain::approval::{
    Approval, ApprovalId, ApprovalStatus, CommandPolicySettings, CommandRecord, CommandStatus,
};
use nexus_domain::audit::AuditRecord;
use nexus_domain::command::DeviceCommand;
use nexus_domain::time::Millis;
use nexus_domain::{CommandId, DeviceId, TenantId, UserId};
use nexus_store::{
    AckOutcome, CommandChange, CommandQuery, Created, Delivery, StoreError, StoreResult,
};
use sqlx::{QueryBuilder, Row, Sqlite, SqliteConnection};

use crate::audit::write_audit;
use crate::rows::{approval_from_row, command_record_from_row, risk_str, unexpected, write_error};
use crate::{SqliteStore, tenant_key};

fn body_text(command: &DeviceCommand) -> StoreResult<String> {
    serde_json::to_string(command).map_err(|e| StoreError::Unexpected(e.into()))
}

fn invalid(what: &str) -> StoreError {
    StoreError::Unexpected(anyhow::anyhow!("{what}"))
}

/// A proposal must be internally consistent: a queue entry only for a runnable (queued) command and
/// for that command, an approval only for one waiting for it.
fn check_new_command(
    record: &CommandRecord,
    approval: Option<&Approval>,
    queue: Option<&DeviceCommand>,
) -> StoreResult<()> {
    if let Some(q) = queue
        && (record.status != CommandStatus::Queued || q.command_id != record.id)
    {
        return Err(invalid(
            "a queue entry is written only for a queued command, with its own id",
        ));
    }
    if let Some(a) = approval
        && (record.status != CommandStatus::PendingApproval
            || a.command_id != record.id
            || a.tenant != record.tenant
            || a.status != ApprovalStatus::Pending)
    {
        return Err(invalid(
            "an approval is written only for a command pending approval, as pending",
        ));
    }
    Ok(())
}

/// Puts a runnable command into its device's queue. `seq` comes from AUTOINCREMENT in the single
/// writer, so it grows in commit order.
async fn enqueue(
    conn: &mut SqliteConnection,
    tenant: &str,
    device: &DeviceId,
    command: &DeviceCommand,
    now: Millis,
) -> StoreResult<()> {
    sqlx::query(
        "INSERT INTO commands (tenant, device_id, id, body, created_at) VALUES (?, ?, ?, ?, ?)",
    )
    .bind(tenant)
    .bind(device.as_str())
    .bind(command.command_id.as_str())
    .bind(body_text(command)?)
    .bind(now)
    .execute(&mut *conn)
    .await
    .map_err(|e| write_error("queued command", e))?;
    Ok(())
}

async fn record_in(
    conn: &mut SqliteConnection,
    tenant: &str,
    id: &CommandId,
) -> StoreResult<Option<CommandRecord>> {
    let row = sqlx::query("SELECT * FROM command_records WHERE tenant = ? AND id = ?")
        .bind(tenant)
        .bind(id.as_str())
        .fetch_optional(&mut *conn)
        .await
        .map_err(unexpected)?;
    row.map(|r| command_record_from_row(&r)).transpose()
}

/// Takes a command out of its device's queue: it is never pulled again.
async fn dequeue(
    conn: &mut SqliteConnection,
    tenant: &str,
    id: &CommandId,
    at: Millis,
) -> StoreResult<()> {
    sqlx::query("UPDATE commands SET acked_at = COALESCE(acked_at, ?) WHERE tenant = ? AND id = ?")
        .bind(at)
        .bind(tenant)
        .bind(id.as_str())
        .execute(&mut *conn)
        .await
        .map_err(unexpected)?;
    Ok(())
}

pub(crate) async fn create_command(
    store: &SqliteStore,
    record: &CommandRecord,
    approval: Option<&Approval>,
    queue: Option<&DeviceCommand>,
    audit: &[AuditRecord],
) -> StoreResult<Created<CommandRecord>> {
    check_new_command(record, approval, queue)?;
    let (r, approval, queue, audit) = (
        record.clone(),
        approval.cloned(),
        queue.cloned(),
        audit.to_vec(),
    );
    store
        .writer
        .write(move |conn| {
            async move {
                let tenant = tenant_key(&r.tenant);
                let inserted = sqlx::query(
                    "INSERT INTO command_records (tenant, id, device_id, type, params, risk, status,
                         session_id, correlation_id, requested_by, requested_at, request_hash,
                         approval_id, replaces, attempt, updated_at, deadline, result)
                     VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
                     ON CONFLICT (tenant, id) DO NOTHING",
                )
                .bind(&tenant)
                .bind(r.id.as_str())
                .bind(r.device_id.as_str())
                .bind(&r.command_type)
                .bind(r.params.to_string())
                .bind(risk_str(r.risk))
                .bind(r.status.as_str())
                .bind(r.session_id.as_str())
                .bind(&r.correlation_id)
                .bind(r.requested_by.as_str())
                .bind(r.requested_at)
                .bind(&r.request_hash)
                .bind(r.approval_id.as_ref().map(ApprovalId::as_str))
                .bind(r.replaces.as_ref().map(CommandId::as_str))
                .bind(i64::from(r.attempt))
                .bind(r.updated_at)
                .bind(r.deadline)
                .bind(r.result.as_ref().map(ToString::to_string))
                .execute(&mut *conn)
                .await
                .map_err(|e| write_error("command", e))?;
                if inserted.rows_affected() == 0 {
                    // The id is taken: answer what is stored and write nothing else.
                    let existing = record_in(conn, &tenant, &r.id)
                        .await?
                        .ok_or_else(|| invalid("a command id conflicted but was not found"))?;
                    return Ok(Created::Existing(existing));
                }
                if let Some(a) = &approval {
                    sqlx::query(
                        "INSERT INTO approvals (tenant, id, command_id, device_id, type, risk,
                             summary, requested_by, requested_at, expires_at, status, decided_by,
                             decided_at, reason)
                         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    )
                    .bind(&tenant)
                    .bind(a.id.as_str())
                    .bind(a.command_id.as_str())
                    .bind(a.device_id.as_str())
                    .bind(&a.command_type)
                    .bind(risk_str(a.risk))
                    .bind(&a.summary)
                    .bind(a.requested_by.as_str())
                    .bind(a.requested_at)
                    .bind(a.expires_at)
                    .bind(a.status.as_str())
                    .bind(a.decided_by.as_ref().map(UserId::as_str))
                    .bind(a.decided_at)
                    .bind(&a.reason)
                    .execute(&mut *conn)
                    .await
                    .map_err(|e| write_error("approval", e))?;
                }
                if let Some(q) = &queue {
                    enqueue(conn, &tenant, &r.device_id, q, r.updated_at).await?;
                }
                write_audit(conn, &audit).await?;
                Ok(Created::New(r))
            }
            .boxed()
        })
        .await
}

pub(crate) async fn command(
    store: &SqliteStore,
    tenant: &TenantId,
    id: &CommandId,
) -> StoreResult<Option<CommandRecord>> {
    let row = sqlx::query("SELECT * FROM command_records WHERE tenant = ? AND id = ?")
        .bind(tenant_key(tenant))
        .bind(id.as_str())
        .fetch_optional(&store.read)
        .await
        .map_err(unexpected)?;
    row.map(|r| command_record_from_row(&r)).transpose()
}

pub(crate) async fn list_commands(
    store: &SqliteStore,
    tenant: &TenantId,
    query: &CommandQuery,
) -> StoreResult<(Vec<CommandRecord>, Option<i64>)> {
    let limit = query.limit.max(1);
    let mut sql = QueryBuilder::<Sqlite>::new("SELECT * FROM command_records WHERE tenant = ");
    sql.push_bind(tenant_key(tenant));
    if let Some(status) = query.status {
        sql.push(" AND status = ").push_bind(status.as_str());
    }
    if let Some(device) = &query.device_id {
        sql.push(" AND device_id = ")
            .push_bind(device.as_str().to_owned());
    }
    if let Some(before) = query.before {
        sql.push(" AND position < ").push_bind(before);
    }
    sql.push(" ORDER BY position DESC LIMIT ")
        .push_bind(i64::from(limit) + 1);
    let rows = sql
        .build()
        .fetch_all(&store.read)
        .await
        .map_err(unexpected)?;
    let more = rows.len() > limit as usize;
    let mut records = Vec::with_capacity(rows.len().min(limit as usize));
    let mut last = None;
    for row in rows.iter().take(limit as usize) {
        records.push(command_record_from_row(row)?);
        last = Some(row.try_get::<i64, _>("position").map_err(unexpected)?);
    }
    Ok((records, if more { last } else { None }))
}

pub(crate) async fn approval(
    store: &SqliteStore,
    tenant: &TenantId,
    id: &ApprovalId,
) -> StoreResult<Option<Approval>> {
    let row = sqlx::query("SELECT * FROM approvals WHERE tenant = ? AND id = ?")
        .bind(tenant_key(tenant))
        .bind(id.as_str())
        .fetch_optional(&store.read)
        .await
        .map_err(unexpected)?;
    row.map(|r| approval_from_row(&r)).transpose()
}

pub(crate) async fn list_approvals(
    store: &SqliteStore,
    tenant: &TenantId,
    status: Option<ApprovalStatus>,
    limit: u32,
) -> StoreResult<Vec<Approval>> {
    let mut sql = QueryBuilder::<Sqlite>::new("SELECT * FROM approvals WHERE tenant = ");
    sql.push_bind(tenant_key(tenant));
    if let Some(status) = status {
        sql.push(" AND status = ").push_bind(status.as_str());
    }
    sql.push(" ORDER BY requested_at DESC, id DESC LIMIT ")
        .push_bind(i64::from(limit.max(1)));
    let rows = sql
        .build()
        .fetch_all(&store.read)
        .await
        .map_err(unexpected)?;
    rows.iter().map(approval_from_row).collect()
}

/// What deciding an approval does (see `Store::decide_approval`).
pub(crate) struct Decision {
    pub(crate) tenant: TenantId,
    pub(crate) id: ApprovalId,
    pub(crate) decision: ApprovalStatus,
    pub(crate) by: UserId,
    pub(crate) at: Millis,
    pub(crate) reason: Option<String>,
    pub(crate) queue: Option<DeviceCommand>,
    pub(crate) deadline: Option<Millis>,
    pub(crate) audit: Vec<AuditRecord>,
}

pub(crate) async fn decide_approval(
    store: &SqliteStore,
    d: Decision,
) -> StoreResult<Option<(Approval, CommandRecord)>> {
    let command_status = match d.decision {
        ApprovalStatus::Approved => CommandStatus::Queued,
        ApprovalStatus::Denied => CommandStatus::Denied,
        other => {
            return Err(invalid(&format!(
                "an approval is decided as approved or denied, not {}",
                other.as_str()
            )));
        }
    };
    store
        .writer
        .write(move |conn| {
            async move {
                let tenant = tenant_key(&d.tenant);
                // The one conditional UPDATE that decides the winner: still pending, not expired,
                // and its command still waiting for it (the writer serialises all of them).
                let row = sqlx::query(
                    "UPDATE approvals SET status = ?, decided_by = ?, decided_at = ?, reason = ?
                     WHERE tenant = ? AND id = ? AND status = 'pending' AND expires_at > ?
                       AND EXISTS (SELECT 1 FROM command_records c
                                   WHERE c.tenant = approvals.tenant AND c.id = approvals.command_id
                                     AND c.status = 'pending_approval')
                     RETURNING *",
                )
                .bind(d.decision.as_str())
                .bind(d.by.as_str())
                .bind(d.at)
                .bind(&d.reason)
                .bind(&tenant)
                .bind(d.id.as_str())
                .bind(d.at)
                .fetch_optional(&mut *conn)
                .await
                .map_err(unexpected)?;
                let Some(row) = row else {
                    return Ok(None);
                };
                let approval = approval_from_row(&row)?;
                let approved = command_status == CommandStatus::Queued;
                let row = sqlx::query(
                    "UPDATE command_records SET status = ?, deadline = ?, updated_at = ?
                     WHERE tenant = ? AND id = ? AND status = 'pending_approval'
                     RETURNING *",
                )
                .bind(command_status.as_str())
                .bind(if approved { d.deadline } else { None })
                .bind(d.at)
                .bind(&tenant)
                .bind(approval.command_id.as_str())
                .fetch_one(&mut *conn)
                .await
                .map_err(unexpected)?;
                let record = command_record_from_row(&row)?;
                if approved && let Some(q) = &d.queue {
                    if q.command_id != record.id {
                        return Err(invalid("the queued body names another command"));
                    }
                    enqueue(conn, &tenant, &record.device_id, q, d.at).await?;
                }
                write_audit(conn, &d.audit).await?;
                Ok(Some((approval, record)))
            }
            .boxed()
        })
        .await
}

pub(crate) async fn due_approvals(
    store: &SqliteStore,
    now: Millis,
    limit: u32,
) -> StoreResult<Vec<(TenantId, ApprovalId)>> {
    let rows = sqlx::query(
        "SELECT tenant, id FROM approvals WHERE status = 'pending' AND expires_at <= ?
         ORDER BY expires_at LIMIT ?",
    )
    .bind(now)
    .bind(i64::from(limit))
    .fetch_all(&store.read)
    .await
    .map_err(unexpected)?;
    rows.iter()
        .map(|r| {
            let tenant: String = r.try_get("tenant").map_err(unexpected)?;
            Ok((
                TenantId::parse_joined(&tenant).map_err(|e| StoreError::Unexpected(e.into()))?,
                ApprovalId::from_trusted(r.try_get("id").map_err(unexpected)?),
            ))
        })
        .collect()
}

pub(crate) async fn expire_approval(
    store: &SqliteStore,
    tenant: &TenantId,
    id: &ApprovalId,
    now: Millis,
    audit: &[AuditRecord],
) -> StoreResult<Option<(Approval, CommandRecord)>> {
    let (tenant, id, audit) = (tenant_key(tenant), id.clone(), audit.to_vec());
    store
        .writer
        .write(move |conn| {
            async move {
                let row = sqlx::query(
                    "UPDATE approvals SET status = 'expired', decided_at = ?
                     WHERE tenant = ? AND id = ? AND status = 'pending' AND expires_at <= ?
                     RETURNING *",
                )
                .bind(now)
                .bind(&tenant)
                .bind(id.as_str())
                .bind(now)
                .fetch_optional(&mut *conn)
                .await
                .map_err(unexpected)?;
                let Some(row) = row else {
                    return Ok(None);
                };
                let approval = approval_from_row(&row)?;
                // Its command can never run now. (If it already left `pending_approval` some other
                // way, it stays as it is and is answered as it is.)
                sqlx::query(
                    "UPDATE command_records SET status = 'expired', deadline = NULL, updated_at = ?
                     WHERE tenant = ? AND id = ? AND status = 'pending_approval'",
                )
                .bind(now)
                .bind(&tenant)
                .bind(approval.command_id.as_str())
                .execute(&mut *conn)
                .await
                .map_err(unexpected)?;
                let record = record_in(conn, &tenant, &approval.command_id)
                    .await?
                    .ok_or_else(|| invalid("an approval's command is missing"))?;
                write_audit(conn, &audit).await?;
                Ok(Some((approval, record)))
            }
            .boxed()
        })
        .await
}

/// A transition the state machine does not allow is a bug in the caller, not a lost race.
fn check_transition(from: &[CommandStatus], to: CommandStatus) -> StoreResult<()> {
    match from.iter().find(|f| !f.can_become(to)) {
        Some(f) => Err(invalid(&format!("a command cannot go from {f} to {to}"))),
        None => Ok(()),
    }
}

/// Timeouts additionally need the deadline to have passed at the time of the change, so a
/// sweeper that read a deadline before the device pulled again cannot time out the new delivery.
fn is_timeout(to: CommandStatus) -> bool {
    matches!(
        to,
        CommandStatus::DeliveryTimedOut | CommandStatus::ExecutionTimedOut
    )
}

pub(crate) struct Transition {
    pub(crate) tenant: TenantId,
    pub(crate) id: CommandId,
    pub(crate) from: Vec<CommandStatus>,
    pub(crate) to: CommandStatus,
    pub(crate) at: Millis,
    pub(crate) change: CommandChange,
    pub(crate) audit: Vec<AuditRecord>,
}

pub(crate) async fn transition_command(
    store: &SqliteStore,
    t: Transition,
) -> StoreResult<Option<CommandRecord>> {
    check_transition(&t.from, t.to)?;
    if t.from.is_empty() {
        return Ok(None);
    }
    store
        .writer
        .write(move |conn| {
            async move {
                let tenant = tenant_key(&t.tenant);
                let mut sql = QueryBuilder::<Sqlite>::new("UPDATE command_records SET status = ");
                sql.push_bind(t.to.as_str())
                    .push(", updated_at = ")
                    .push_bind(t.at);
                if let Some(result) = &t.change.result {
                    sql.push(", result = ").push_bind(result.to_string());
                }
                if let Some(deadline) = t.change.deadline {
                    sql.push(", deadline = ").push_bind(deadline);
                }
                sql.push(" WHERE tenant = ")
                    .push_bind(tenant.clone())
                    .push(" AND id = ")
                    .push_bind(t.id.as_str().to_owned())
                    .push(" AND status IN (");
                let mut statuses = sql.separated(", ");
                for status in &t.from {
                    statuses.push_bind(status.as_str());
                }
                sql.push(")");
                if is_timeout(t.to) {
                    sql.push(" AND deadline IS NOT NULL AND deadline <= ")
                        .push_bind(t.at);
                }
                sql.push(" RETURNING *");
                let row = sql
                    .build()
                    .fetch_optional(&mut *conn)
                    .await
                    .map_err(unexpected)?;
                let Some(row) = row else {
                    return Ok(None);
                };
                let record = command_record_from_row(&row)?;
                if t.to.is_terminal() {
                    dequeue(conn, &tenant, &t.id, t.at).await?;
                }
                write_audit(conn, &t.audit).await?;
                Ok(Some(record))
            }
            .boxed()
        })
        .await
}

pub(crate) async fn due_commands(
    store: &SqliteStore,
    now: Millis,
    limit: u32,
) -> StoreResult<Vec<(TenantId, CommandId, CommandStatus)>> {
    let rows = sqlx::query(
        "SELECT tenant, id, status FROM command_records
         WHERE status IN ('queued', 'delivered', 'acked') AND deadline IS NOT NULL AND deadline <= ?
         ORDER BY deadline LIMIT ?",
    )
    .bind(now)
    .bind(i64::from(limit))
    .fetch_all(&store.read)
    .await
    .map_err(unexpected)?;
    rows.iter()
        .map(|r| {
            let tenant: String = r.try_get("tenant").map_err(unexpected)?;
            let status: String = r.try_get("status").map_err(unexpected)?;
            Ok((
                TenantId::parse_joined(&tenant).map_err(|e| StoreError::Unexpected(e.into()))?,
                CommandId::from_trusted(r.try_get("id").map_err(unexpected)?),
                CommandStatus::parse(&status).ok_or_else(|| {
                    invalid(&format!("stored command status is invalid: {status}"))
                })?,
            ))
        })
        .collect()
}

/// The device's deliverable queue entries: not taken out of the queue, after the cursor, and their
/// command still runnable. Entries without a record never match the join.
const DELIVERABLE: &str = "FROM commands q
     JOIN command_records r ON r.tenant = q.tenant AND r.id = q.id AND r.device_id = q.device_id
     WHERE q.tenant = ? AND q.device_id = ? AND q.seq > ? AND q.acked_at IS NULL
       AND r.status IN ('queued', 'delivered')";

pub(crate) async fn deliver_commands(
    store: &SqliteStore,
    tenant: &TenantId,
    device: &DeviceId,
    after: i64,
    limit: u32,
    now: Millis,
    execution_deadline: Millis,
) -> StoreResult<Vec<Delivery>> {
    let (tenant, device) = (tenant_key(tenant), device.clone());
    // Long-polls ask often and usually find nothing: answer those from the read pool. Anything
    // committed before this read is seen; anything committed after it wakes the poller again.
    let any = sqlx::query(&format!("SELECT 1 {DELIVERABLE} LIMIT 1"))
        .bind(&tenant)
        .bind(device.as_str())
        .bind(after)
        .fetch_optional(&store.read)
        .await
        .map_err(unexpected)?;
    if any.is_none() || limit == 0 {
        return Ok(Vec::new());
    }
    store
        .writer
        .write(move |conn| {
            async move {
                let due = sqlx::query(&format!(
                    "SELECT q.seq, q.body, q.id {DELIVERABLE} ORDER BY q.seq LIMIT ?"
                ))
                .bind(&tenant)
                .bind(device.as_str())
                .bind(after)
                .bind(i64::from(limit))
                .fetch_all(&mut *conn)
                .await
                .map_err(unexpected)?;
                let mut deliveries = Vec::with_capacity(due.len());
                for q in due {
                    let body: String = q.try_get("body").map_err(unexpected)?;
                    let id: String = q.try_get("id").map_err(unexpected)?;
                    let row = sqlx::query(
                        "UPDATE command_records
                         SET status = 'delivered', attempt = attempt + 1, deadline = ?, updated_at = ?
                         WHERE tenant = ? AND id = ? RETURNING *",
                    )
                    .bind(execution_deadline)
                    .bind(now)
                    .bind(&tenant)
                    .bind(&id)
                    .fetch_one(&mut *conn)
                    .await
                    .map_err(unexpected)?;
                    deliveries.push(Delivery {
                        seq: q.try_get("seq").map_err(unexpected)?,
                        command: serde_json::from_str(&body)
                            .map_err(|e| invalid(&format!("stored command is invalid: {e}")))?,
                        record: command_record_from_row(&row)?,
                    });
                }
                Ok(deliveries)
            }
            .boxed()
        })
        .await
}

pub(crate) async fn ack_delivery(
    store: &SqliteStore,
    tenant: &TenantId,
    device: &DeviceId,
    command: &CommandId,
    attempt: u32,
    at: Millis,
    audit: &[AuditRecord],
) -> StoreResult<AckOutcome> {
    let (tenant, device, command, audit) = (
        tenant_key(tenant),
        device.clone(),
        command.clone(),
        audit.to_vec(),
    );
    store
        .writer
        .write(move |conn| {
            async move {
                let current = record_in(conn, &tenant, &command).await?;
                let Some(current) = current.filter(|r| r.device_id == device) else {
                    return Ok(AckOutcome::NotFound);
                };
                if let Some(outcome) = ack_check(&current, attempt) {
                    return Ok(outcome);
                }
                let row = sqlx::query(
                    "UPDATE command_records SET status = 'acked', updated_at = ?
                     WHERE tenant = ? AND id = ? AND status = 'delivered' AND attempt = ?
                     RETURNING *",
                )
                .bind(at)
                .bind(&tenant)
                .bind(command.as_str())
                .bind(i64::from(attempt))
                .fetch_one(&mut *conn)
                .await
                .map_err(unexpected)?;
                let record = command_record_from_row(&row)?;
                dequeue(conn, &tenant, &command, at).await?;
                write_audit(conn, &audit).await?;
                Ok(AckOutcome::Acked(record))
            }
            .boxed()
        })
        .await
}

/// What an ack of delivery `attempt` means for a command of this device in its current state:
/// `None` if it moves the command from delivered to acked, otherwise the answer (nothing changes).
fn ack_check(current: &CommandRecord, attempt: u32) -> Option<AckOutcome> {
    if current.attempt == 0 || attempt == 0 || attempt > current.attempt {
        // Never delivered, or a delivery that has not happened.
        return Some(AckOutcome::NotFound);
    }
    if attempt < current.attempt {
        return Some(AckOutcome::StaleAttempt(current.clone()));
    }
    match current.status {
        CommandStatus::Delivered => None,
        CommandStatus::Acked | CommandStatus::Succeeded | CommandStatus::Failed => {
            Some(AckOutcome::AlreadyAcked(current.clone()))
        }
        // The delivery ended without an ack (execution timed out): the device must not run it.
        _ => Some(AckOutcome::StaleAttempt(current.clone())),
    }
}

pub(crate) async fn command_policy(
    store: &SqliteStore,
    tenant: &TenantId,
) -> StoreResult<Option<CommandPolicySettings>> {
    let policy: Option<String> =
        sqlx::query_scalar("SELECT policy FROM command_policies WHERE tenant = ?")
            .bind(tenant_key(tenant))
            .fetch_optional(&store.read)
            .await
            .map_err(unexpected)?;
    policy
        .map(|text| {
            serde_json::from_str(&text)
                .map_err(|e| invalid(&format!("stored command policy is invalid: {e}")))
        })
        .transpose()
}

pub(crate) async fn put_command_policy(
    store: &SqliteStore,
    tenant: &TenantId,
    policy: &CommandPolicySettings,
    at: Millis,
    audit: &[AuditRecord],
) -> StoreResult<()> {
    let policy = serde_json::to_string(policy).map_err(|e| StoreError::Unexpected(e.into()))?;
    let (tenant, audit) = (tenant_key(tenant), audit.to_vec());
    store
        .writer
        .write(move |conn| {
            async move {
                sqlx::query(
                    "INSERT INTO command_policies (tenant, policy, updated_at) VALUES (?, ?, ?)
                     ON CONFLICT (tenant) DO UPDATE SET policy = excluded.policy, updated_at = excluded.updated_at",
                )
                .bind(&tenant)
                .bind(&policy)
                .bind(at)
                .execute(&mut *conn)
                .await
                .map_err(unexpected)?;
                write_audit(conn, &audit).await
            }
            .boxed()
        })
        .await
}

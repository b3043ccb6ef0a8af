//! Commands, approvals and command policies on PostgreSQL (see `migrations/0003_commands.sql` for
//! the concurrency and access design).
//!
//! Every method runs in a tenant-scoped transaction (row-level security), except the two sweeper
//! reads, which go through narrow SECURITY DEFINER functions. Every state change is one conditional
//! UPDATE, so "exactly one wins" holds across replicas: READ COMMITTED makes a second writer of a
//! row wait for the first and re-evaluate its condition against the committed row. Audit records
//! are appended last, in the same transaction, and only when something changed.

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
use sqlx::{PgConnection, Postgres, QueryBuilder, Row};

use crate::audit::write_audit;
use crate::rows::{
    approval_from_row, command_record_from_row, command_status, queued_body, risk_str, unexpected,
    write_error,
};
use crate::{PostgresStore, json_text, tenant_key};

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

/// Puts a runnable command into its device's queue. The queue's counter row is locked until
/// COMMIT, so one device's commands commit in seq order and a puller's cursor never skips one
/// (see `command_queues` in the 0001 migration).
async fn enqueue(
    conn: &mut PgConnection,
    tenant: &str,
    device: &DeviceId,
    command: &DeviceCommand,
    now: Millis,
) -> StoreResult<()> {
    let row = sqlx::query(
        "INSERT INTO command_queues (tenant, device_id, last_seq) VALUES ($1, $2, 1)
         ON CONFLICT (tenant, device_id) DO UPDATE SET last_seq = command_queues.last_seq + 1
         RETURNING last_seq",
    )
    .bind(tenant)
    .bind(device.as_str())
    .fetch_one(&mut *conn)
    .await
    .map_err(unexpected)?;
    let seq: i64 = row.try_get("last_seq").map_err(unexpected)?;
    sqlx::query(
        "INSERT INTO commands (tenant, device_id, seq, id, body, created_at)
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(tenant)
    .bind(device.as_str())
    .bind(seq)
    .bind(command.command_id.as_str())
    .bind(json_text(command)?)
    .bind(now)
    .execute(&mut *conn)
    .await
    .map_err(|e| write_error("queued command", e))?;
    Ok(())
}

/// Takes a command out of its device's queue: it is never pulled again.
async fn dequeue(
    conn: &mut PgConnection,
    tenant: &str,
    id: &CommandId,
    at: Millis,
) -> StoreResult<()> {
    sqlx::query(
        "UPDATE commands SET acked_at = COALESCE(acked_at, $1) WHERE tenant = $2 AND id = $3",
    )
    .bind(at)
    .bind(tenant)
    .bind(id.as_str())
    .execute(&mut *conn)
    .await
    .map_err(unexpected)?;
    Ok(())
}

async fn record_in(
    conn: &mut PgConnection,
    tenant: &str,
    id: &CommandId,
    lock: bool,
) -> StoreResult<Option<CommandRecord>> {
    let sql = if lock {
        "SELECT * FROM command_records WHERE tenant = $1 AND id = $2 FOR UPDATE"
    } else {
        "SELECT * FROM command_records WHERE tenant = $1 AND id = $2"
    };
    let row = sqlx::query(sql)
        .bind(tenant)
        .bind(id.as_str())
        .fetch_optional(&mut *conn)
        .await
        .map_err(unexpected)?;
    row.map(|r| command_record_from_row(&r)).transpose()
}

pub(crate) async fn create_command(
    store: &PostgresStore,
    r: &CommandRecord,
    approval: Option<&Approval>,
    queue: Option<&DeviceCommand>,
    audit: &[AuditRecord],
) -> StoreResult<Created<CommandRecord>> {
    check_new_command(r, approval, queue)?;
    let tenant = tenant_key(&r.tenant);
    let mut tx = store.tenant_tx(&r.tenant).await?;
    // A concurrent insert of the same id makes this wait for that transaction; once it commits,
    // this one does nothing and reads what it wrote.
    let inserted = sqlx::query(
        "INSERT INTO command_records (tenant, id, device_id, type, params, risk, status,
             session_id, correlation_id, requested_by, requested_at, request_hash, approval_id,
             replaces, attempt, updated_at, deadline, result)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18)
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
    .execute(&mut *tx)
    .await
    .map_err(|e| write_error("command", e))?;
    if inserted.rows_affected() == 0 {
        // The id is taken: answer what is stored and write nothing else.
        let existing = record_in(&mut tx, &tenant, &r.id, false)
            .await?
            .ok_or_else(|| invalid("a command id conflicted but was not found"))?;
        tx.commit().await.map_err(unexpected)?;
        return Ok(Created::Existing(existing));
    }
    if let Some(a) = approval {
        sqlx::query(
            "INSERT INTO approvals (tenant, id, command_id, device_id, type, risk, summary,
                 requested_by, requested_at, expires_at, status, decided_by, decided_at, reason)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)",
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
        .execute(&mut *tx)
        .await
        .map_err(|e| write_error("approval", e))?;
    }
    if let Some(q) = queue {
        enqueue(&mut tx, &tenant, &r.device_id, q, r.updated_at).await?;
    }
    write_audit(&mut tx, audit).await?;
    tx.commit().await.map_err(unexpected)?;
    Ok(Created::New(r.clone()))
}

pub(crate) async fn command(
    store: &PostgresStore,
    tenant: &TenantId,
    id: &CommandId,
) -> StoreResult<Option<CommandRecord>> {
    let mut tx = store.tenant_tx(tenant).await?;
    let record = record_in(&mut tx, &tenant_key(tenant), id, false).await?;
    tx.commit().await.map_err(unexpected)?;
    Ok(record)
}

pub(crate) async fn list_commands(
    store: &PostgresStore,
    tenant: &TenantId,
    query: &CommandQuery,
) -> StoreResult<(Vec<CommandRecord>, Option<i64>)> {
    let limit = query.limit.max(1);
    let mut sql = QueryBuilder::<Postgres>::new("SELECT * FROM command_records WHERE tenant = ");
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
    let mut tx = store.tenant_tx(tenant).await?;
    let rows = sql.build().fetch_all(&mut *tx).await.map_err(unexpected)?;
    tx.commit().await.map_err(unexpected)?;
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
    store: &PostgresStore,
    tenant: &TenantId,
    id: &ApprovalId,
) -> StoreResult<Option<Approval>> {
    let mut tx = store.tenant_tx(tenant).await?;
    let row = sqlx::query("SELECT * FROM approvals WHERE tenant = $1 AND id = $2")
        .bind(tenant_key(tenant))
        .bind(id.as_str())
        .fetch_optional(&mut *tx)
        .await
        .map_err(unexpected)?;
    tx.commit().await.map_err(unexpected)?;
    row.map(|r| approval_from_row(&r)).transpose()
}

pub(crate) async fn list_approvals(
    store: &PostgresStore,
    tenant: &TenantId,
    status: Option<ApprovalStatus>,
    limit: u32,
) -> StoreResult<Vec<Approval>> {
    let mut sql = QueryBuilder::<Postgres>::new("SELECT * FROM approvals WHERE tenant = ");
    sql.push_bind(tenant_key(tenant));
    if let Some(status) = status {
        sql.push(" AND status = ").push_bind(status.as_str());
    }
    sql.push(" ORDER BY requested_at DESC, id DESC LIMIT ")
        .push_bind(i64::from(limit.max(1)));
    let mut tx = store.tenant_tx(tenant).await?;
    let rows = sql.build().fetch_all(&mut *tx).await.map_err(unexpected)?;
    tx.commit().await.map_err(unexpected)?;
    rows.iter().map(approval_from_row).collect()
}

/// What deciding an approval does (see `Store::decide_approval`).
pub(crate) struct Decision<'a> {
    pub(crate) tenant: &'a TenantId,
    pub(crate) id: &'a ApprovalId,
    pub(crate) decision: ApprovalStatus,
    pub(crate) by: &'a UserId,
    pub(crate) at: Millis,
    pub(crate) reason: Option<&'a str>,
    pub(crate) queue: Option<&'a DeviceCommand>,
    pub(crate) deadline: Option<Millis>,
    pub(crate) audit: &'a [AuditRecord],
}

pub(crate) async fn decide_approval(
    store: &PostgresStore,
    d: Decision<'_>,
) -> StoreResult<Option<(Approval, CommandRecord)>> {
    let approved = match d.decision {
        ApprovalStatus::Approved => true,
        ApprovalStatus::Denied => false,
        other => {
            return Err(invalid(&format!(
                "an approval is decided as approved or denied, not {}",
                other.as_str()
            )));
        }
    };
    let tenant = tenant_key(d.tenant);
    let mut tx = store.tenant_tx(d.tenant).await?;
    // The one conditional UPDATE that decides the winner: concurrent deciders wait for its row
    // lock and then find the approval no longer pending.
    let row = sqlx::query(
        "UPDATE approvals SET status = $1, decided_by = $2, decided_at = $3, reason = $4
         WHERE tenant = $5 AND id = $6 AND status = 'pending' AND expires_at > $3
           AND EXISTS (SELECT 1 FROM command_records c
                       WHERE c.tenant = approvals.tenant AND c.id = approvals.command_id
                         AND c.status = 'pending_approval')
         RETURNING *",
    )
    .bind(d.decision.as_str())
    .bind(d.by.as_str())
    .bind(d.at)
    .bind(d.reason)
    .bind(&tenant)
    .bind(d.id.as_str())
    .fetch_optional(&mut *tx)
    .await
    .map_err(unexpected)?;
    let Some(row) = row else {
        return Ok(None);
    };
    let approval = approval_from_row(&row)?;
    let row = sqlx::query(
        "UPDATE command_records SET status = $1, deadline = $2, updated_at = $3
         WHERE tenant = $4 AND id = $5 AND status = 'pending_approval'
         RETURNING *",
    )
    .bind(if approved {
        CommandStatus::Queued.as_str()
    } else {
        CommandStatus::Denied.as_str()
    })
    .bind(if approved { d.deadline } else { None })
    .bind(d.at)
    .bind(&tenant)
    .bind(approval.command_id.as_str())
    .fetch_optional(&mut *tx)
    .await
    .map_err(unexpected)?;
    let Some(row) = row else {
        // The command left `pending_approval` meanwhile (cancelled): nothing is decided (the
        // transaction rolls back).
        return Ok(None);
    };
    let record = command_record_from_row(&row)?;
    if approved && let Some(q) = d.queue {
        if q.command_id != record.id {
            return Err(invalid("the queued body names another command"));
        }
        enqueue(&mut tx, &tenant, &record.device_id, q, d.at).await?;
    }
    write_audit(&mut tx, d.audit).await?;
    tx.commit().await.map_err(unexpected)?;
    Ok(Some((approval, record)))
}

fn sql_limit(limit: u32) -> i32 {
    i32::try_from(limit).unwrap_or(i32::MAX)
}

pub(crate) async fn due_approvals(
    store: &PostgresStore,
    now: Millis,
    limit: u32,
) -> StoreResult<Vec<(TenantId, ApprovalId)>> {
    // Across tenants: a SECURITY DEFINER function answering keys only (see the 0003 migration).
    let rows = sqlx::query("SELECT tenant, id FROM nexus_due_approvals($1, $2)")
        .bind(now)
        .bind(sql_limit(limit))
        .fetch_all(&store.pool)
        .await
        .map_err(unexpected)?;
    rows.iter()
        .map(|r| {
            let tenant: String = r.try_get("tenant").map_err(unexpected)?;
            Ok((
                crate::rows::tenant(&tenant)?,
                ApprovalId::from_trusted(r.try_get("id").map_err(unexpected)?),
            ))
        })
        .collect()
}

pub(crate) async fn expire_approval(
    store: &PostgresStore,
    tenant: &TenantId,
    id: &ApprovalId,
    now: Millis,
    audit: &[AuditRecord],
) -> StoreResult<Option<(Approval, CommandRecord)>> {
    let key = tenant_key(tenant);
    let mut tx = store.tenant_tx(tenant).await?;
    // Conditional like a decision, so an expiry and a decision racing for one approval cannot
    // both win.
    let row = sqlx::query(
        "UPDATE approvals SET status = 'expired', decided_at = $1
         WHERE tenant = $2 AND id = $3 AND status = 'pending' AND expires_at <= $1
         RETURNING *",
    )
    .bind(now)
    .bind(&key)
    .bind(id.as_str())
    .fetch_optional(&mut *tx)
    .await
    .map_err(unexpected)?;
    let Some(row) = row else {
        return Ok(None);
    };
    let approval = approval_from_row(&row)?;
    // Its command can never run now. (If it already left `pending_approval` some other way, it
    // stays as it is and is answered as it is.)
    let row = sqlx::query(
        "UPDATE command_records SET status = 'expired', deadline = NULL, updated_at = $1
         WHERE tenant = $2 AND id = $3 AND status = 'pending_approval'
         RETURNING *",
    )
    .bind(now)
    .bind(&key)
    .bind(approval.command_id.as_str())
    .fetch_optional(&mut *tx)
    .await
    .map_err(unexpected)?;
    let record = match row {
        Some(row) => command_record_from_row(&row)?,
        None => record_in(&mut tx, &key, &approval.command_id, false)
            .await?
            .ok_or_else(|| invalid("an approval's command is missing"))?,
    };
    write_audit(&mut tx, audit).await?;
    tx.commit().await.map_err(unexpected)?;
    Ok(Some((approval, record)))
}

/// A transition the state machine does not allow is a bug in the caller, not a lost race.
fn check_transition(from: &[CommandStatus], to: CommandStatus) -> StoreResult<()> {
    match from.iter().find(|f| !f.can_become(to)) {
        Some(f) => Err(invalid(&format!("a command cannot go from {f} to {to}"))),
        None => Ok(()),
    }
}

/// What `Store::transition_command` is asked to do.
pub(crate) struct Transition<'a> {
    pub(crate) tenant: &'a TenantId,
    pub(crate) id: &'a CommandId,
    pub(crate) from: &'a [CommandStatus],
    pub(crate) to: CommandStatus,
    pub(crate) at: Millis,
    pub(crate) change: &'a CommandChange,
    pub(crate) audit: &'a [AuditRecord],
}

pub(crate) async fn transition_command(
    store: &PostgresStore,
    t: Transition<'_>,
) -> StoreResult<Option<CommandRecord>> {
    check_transition(t.from, t.to)?;
    if t.from.is_empty() {
        return Ok(None);
    }
    let key = tenant_key(t.tenant);
    let mut sql = QueryBuilder::<Postgres>::new("UPDATE command_records SET status = ");
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
        .push_bind(key.clone())
        .push(" AND id = ")
        .push_bind(t.id.as_str().to_owned())
        .push(" AND status = ANY(")
        .push_bind(
            t.from
                .iter()
                .map(|s| s.as_str().to_owned())
                .collect::<Vec<_>>(),
        )
        .push(")");
    if matches!(
        t.to,
        CommandStatus::DeliveryTimedOut | CommandStatus::ExecutionTimedOut
    ) {
        // A sweeper that read the deadline before the device pulled again (which set a new one)
        // must not time out the new delivery.
        sql.push(" AND deadline IS NOT NULL AND deadline <= ")
            .push_bind(t.at);
    }
    sql.push(" RETURNING *");
    let mut tx = store.tenant_tx(t.tenant).await?;
    let row = sql
        .build()
        .fetch_optional(&mut *tx)
        .await
        .map_err(unexpected)?;
    let Some(row) = row else {
        return Ok(None);
    };
    let record = command_record_from_row(&row)?;
    if t.to.is_terminal() {
        dequeue(&mut tx, &key, t.id, t.at).await?;
    }
    write_audit(&mut tx, t.audit).await?;
    tx.commit().await.map_err(unexpected)?;
    Ok(Some(record))
}

pub(crate) async fn due_commands(
    store: &PostgresStore,
    now: Millis,
    limit: u32,
) -> StoreResult<Vec<(TenantId, CommandId, CommandStatus)>> {
    // Across tenants: a SECURITY DEFINER function answering keys only (see the 0003 migration).
    let rows = sqlx::query("SELECT tenant, id, status FROM nexus_due_commands($1, $2)")
        .bind(now)
        .bind(sql_limit(limit))
        .fetch_all(&store.pool)
        .await
        .map_err(unexpected)?;
    rows.iter()
        .map(|r| {
            let tenant: String = r.try_get("tenant").map_err(unexpected)?;
            let status: String = r.try_get("status").map_err(unexpected)?;
            Ok((
                crate::rows::tenant(&tenant)?,
                CommandId::from_trusted(r.try_get("id").map_err(unexpected)?),
                command_status(&status)?,
            ))
        })
        .collect()
}

pub(crate) async fn deliver_commands(
    store: &PostgresStore,
    tenant: &TenantId,
    device: &DeviceId,
    after: i64,
    limit: u32,
    now: Millis,
    execution_deadline: Millis,
) -> StoreResult<Vec<Delivery>> {
    if limit == 0 {
        return Ok(Vec::new());
    }
    let mut tx = store.tenant_tx(tenant).await?;
    // The queue entries after the cursor whose command is still runnable, their records locked
    // (a cancel or ack racing this waits, and a record changed meanwhile is re-checked and
    // skipped), then all of them delivered in the same statement. Entries without a record never
    // match the join.
    let rows = sqlx::query(
        "WITH due AS (
             SELECT q.seq, q.body, r.id
               FROM commands q
               JOIN command_records r
                 ON r.tenant = q.tenant AND r.id = q.id AND r.device_id = q.device_id
              WHERE q.tenant = $1 AND q.device_id = $2 AND q.seq > $3 AND q.acked_at IS NULL
                AND r.status IN ('queued', 'delivered')
              ORDER BY q.seq
              LIMIT $4
                FOR UPDATE OF r
         )
         UPDATE command_records r
            SET status = 'delivered', attempt = r.attempt + 1, deadline = $5, updated_at = $6
           FROM due
          WHERE r.tenant = $1 AND r.id = due.id
         RETURNING r.*, due.seq AS queue_seq, due.body AS queue_body",
    )
    .bind(tenant_key(tenant))
    .bind(device.as_str())
    .bind(after)
    .bind(i64::from(limit))
    .bind(execution_deadline)
    .bind(now)
    .fetch_all(&mut *tx)
    .await
    .map_err(unexpected)?;
    tx.commit().await.map_err(unexpected)?;
    let mut deliveries = Vec::with_capacity(rows.len());
    for row in &rows {
        let body: String = row.try_get("queue_body").map_err(unexpected)?;
        deliveries.push(Delivery {
            seq: row.try_get("queue_seq").map_err(unexpected)?,
            command: queued_body(&body)?,
            record: command_record_from_row(row)?,
        });
    }
    deliveries.sort_by_key(|d| d.seq);
    Ok(deliveries)
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

pub(crate) async fn ack_delivery(
    store: &PostgresStore,
    tenant: &TenantId,
    device: &DeviceId,
    command: &CommandId,
    attempt: u32,
    at: Millis,
    audit: &[AuditRecord],
) -> StoreResult<AckOutcome> {
    let key = tenant_key(tenant);
    let mut tx = store.tenant_tx(tenant).await?;
    // Locked, so a redelivery or another ack of this command waits until this one is decided.
    let current = record_in(&mut tx, &key, command, true).await?;
    let Some(current) = current.filter(|r| &r.device_id == device) else {
        return Ok(AckOutcome::NotFound);
    };
    if let Some(outcome) = ack_check(&current, attempt) {
        tx.commit().await.map_err(unexpected)?;
        return Ok(outcome);
    }
    let row = sqlx::query(
        "UPDATE command_records SET status = 'acked', updated_at = $1
         WHERE tenant = $2 AND id = $3 AND status = 'delivered' AND attempt = $4
         RETURNING *",
    )
    .bind(at)
    .bind(&key)
    .bind(command.as_str())
    .bind(i64::from(attempt))
    .fetch_one(&mut *tx)
    .await
    .map_err(unexpected)?;
    let record = command_record_from_row(&row)?;
    dequeue(&mut tx, &key, command, at).await?;
    write_audit(&mut tx, audit).await?;
    tx.commit().await.map_err(unexpected)?;
    Ok(AckOutcome::Acked(record))
}

pub(crate) async fn command_policy(
    store: &PostgresStore,
    tenant: &TenantId,
) -> StoreResult<Option<CommandPolicySettings>> {
    let mut tx = store.tenant_tx(tenant).await?;
    let policy: Option<String> =
        sqlx::query_scalar("SELECT policy FROM command_policies WHERE tenant = $1")
            .bind(tenant_key(tenant))
            .fetch_optional(&mut *tx)
            .await
            .map_err(unexpected)?;
    tx.commit().await.map_err(unexpected)?;
    policy
        .map(|text| {
            serde_json::from_str(&text)
                .map_err(|e| invalid(&format!("stored command policy is invalid: {e}")))
        })
        .transpose()
}

pub(crate) async fn put_command_policy(
    store: &PostgresStore,
    tenant: &TenantId,
    policy: &CommandPolicySettings,
    at: Millis,
    audit: &[AuditRecord],
) -> StoreResult<()> {
    let mut tx = store.tenant_tx(tenant).await?;
    sqlx::query(
        "INSERT INTO command_policies (tenant, policy, updated_at) VALUES ($1, $2, $3)
         ON CONFLICT (tenant) DO UPDATE SET policy = excluded.policy, updated_at = excluded.updated_at",
    )
    .bind(tenant_key(tenant))
    .bind(json_text(policy)?)
    .bind(at)
    .execute(&mut *tx)
    .await
    .map_err(unexpected)?;
    write_audit(&mut tx, audit).await?;
    tx.commit().await.map_err(unexpected)
}

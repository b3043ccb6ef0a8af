//! The audit trail on SQLite. Appends run on the writer connection inside the job that made the
//! change they describe (so they commit or roll back with it); the single writer task serialises
//! them, which is what keeps each scope's chain from forking. Reads use the read pool.

use nexus_domain::audit::{AuditEntry, AuditRecord, AuditScope, GENESIS_HASH};
use nexus_store::{AuditPage, AuditQuery, StoreError, StoreResult};
use sqlx::{QueryBuilder, Row, Sqlite, SqliteConnection, SqlitePool};

use crate::rows::{audit_entry_from_row, unexpected};

/// Appends `records`, chained per scope after the scope's current head. Must run on the writer
/// connection, in the transaction of the change being recorded.
pub(crate) async fn write_audit(
    conn: &mut SqliteConnection,
    records: &[AuditRecord],
) -> StoreResult<()> {
    for record in records {
        let key = record.scope.key();
        let head = sqlx::query("SELECT last_seq, last_hash FROM audit_heads WHERE scope = ?")
            .bind(&key)
            .fetch_optional(&mut *conn)
            .await
            .map_err(unexpected)?;
        let (last_seq, last_hash) = match head {
            Some(row) => (
                row.try_get::<i64, _>("last_seq").map_err(unexpected)?,
                row.try_get::<String, _>("last_hash").map_err(unexpected)?,
            ),
            None => (0, GENESIS_HASH.to_owned()),
        };
        let seq = u64::try_from(last_seq)
            .map_err(|e| StoreError::Unexpected(anyhow::anyhow!("stored audit head: {e}")))?
            + 1;
        let entry = AuditEntry::chain(record.clone(), seq, &last_hash);
        insert_entry(conn, &key, &entry).await?;
        sqlx::query(
            "INSERT INTO audit_heads (scope, last_seq, last_hash) VALUES (?, ?, ?)
             ON CONFLICT (scope) DO UPDATE SET last_seq = excluded.last_seq, last_hash = excluded.last_hash",
        )
        .bind(&key)
        .bind(last_seq + 1)
        .bind(&entry.hash)
        .execute(&mut *conn)
        .await
        .map_err(unexpected)?;
    }
    Ok(())
}

async fn insert_entry(
    conn: &mut SqliteConnection,
    scope: &str,
    entry: &AuditEntry,
) -> StoreResult<()> {
    let r = &entry.record;
    let details =
        serde_json::to_string(&r.details).map_err(|e| StoreError::Unexpected(e.into()))?;
    sqlx::query(
        "INSERT INTO audit_log (scope, seq, id, ts, actor_type, actor_id, action, target_type,
                                target_id, result, ip, user_agent, correlation_id, details,
                                prev_hash, hash)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(scope)
    .bind(i64::try_from(entry.seq).unwrap_or(i64::MAX))
    .bind(&entry.id)
    .bind(r.ts)
    .bind(r.actor.kind.as_str())
    .bind(&r.actor.id)
    .bind(&r.action)
    .bind(r.target.as_ref().map(|t| t.kind.as_str()))
    .bind(r.target.as_ref().map(|t| t.id.as_str()))
    .bind(r.result.as_str())
    .bind(&r.ip)
    .bind(&r.user_agent)
    .bind(&r.correlation_id)
    .bind(details)
    .bind(&entry.prev_hash)
    .bind(&entry.hash)
    .execute(&mut *conn)
    .await
    .map_err(unexpected)?;
    Ok(())
}

/// Newest first, paged by `position`.
pub(crate) async fn entries(pool: &SqlitePool, query: &AuditQuery) -> StoreResult<AuditPage> {
    if query.scopes.is_empty() {
        return Ok(AuditPage {
            entries: Vec::new(),
            next_cursor: None,
        });
    }
    let limit = query.limit.max(1);
    let mut sql = QueryBuilder::<Sqlite>::new("SELECT * FROM audit_log WHERE scope IN (");
    let mut scopes = sql.separated(", ");
    for scope in &query.scopes {
        scopes.push_bind(scope.key());
    }
    sql.push(")");
    if let Some(before) = query.before {
        sql.push(" AND position < ").push_bind(before);
    }
    if let Some(since) = query.since {
        sql.push(" AND ts >= ").push_bind(since);
    }
    if let Some(until) = query.until {
        sql.push(" AND ts <= ").push_bind(until);
    }
    if let Some(action) = &query.action {
        sql.push(" AND action = ").push_bind(action.clone());
    }
    if let Some(actor) = &query.actor_id {
        sql.push(" AND actor_id = ").push_bind(actor.clone());
    }
    sql.push(" ORDER BY position DESC LIMIT ")
        .push_bind(i64::from(limit) + 1);
    let rows = sql.build().fetch_all(pool).await.map_err(unexpected)?;
    let more = rows.len() > limit as usize;
    let mut entries = Vec::with_capacity(rows.len().min(limit as usize));
    let mut last_position = None;
    for row in rows.iter().take(limit as usize) {
        entries.push(audit_entry_from_row(row)?);
        last_position = Some(row.try_get::<i64, _>("position").map_err(unexpected)?);
    }
    Ok(AuditPage {
        entries,
        next_cursor: if more { last_position } else { None },
    })
}

pub(crate) async fn chain(
    pool: &SqlitePool,
    scope: &AuditScope,
    after_seq: u64,
    limit: u32,
) -> StoreResult<Vec<AuditEntry>> {
    let rows =
        sqlx::query("SELECT * FROM audit_log WHERE scope = ? AND seq > ? ORDER BY seq LIMIT ?")
            .bind(scope.key())
            .bind(i64::try_from(after_seq).unwrap_or(i64::MAX))
            .bind(i64::from(limit))
            .fetch_all(pool)
            .await
            .map_err(unexpected)?;
    rows.iter().map(audit_entry_from_row).collect()
}

pub(crate) async fn scopes(pool: &SqlitePool) -> StoreResult<Vec<AuditScope>> {
    let keys: Vec<String> = sqlx::query_scalar("SELECT scope FROM audit_heads ORDER BY scope")
        .fetch_all(pool)
        .await
        .map_err(unexpected)?;
    keys.iter()
        .map(|k| {
            AuditScope::parse_key(k).ok_or_else(|| {
                StoreError::Unexpected(anyhow::anyhow!("stored audit scope is invalid: {k}"))
            })
        })
        .collect()
}

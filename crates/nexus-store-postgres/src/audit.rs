//! The audit trail on PostgreSQL (see `migrations/0002_identity.sql` for the access design).
//!
//! Appends run inside the transaction of the change they record. For each scope involved, the
//! transaction sets `nexus.tenant` to the scope key (row-level security admits only that scope's
//! rows), locks the scope's head row, chains the records after it with `AuditEntry::chain`, inserts
//! them and moves the head. The head lock is held until COMMIT, so concurrent writers of a scope,
//! on any replica, take turns and the chain never forks; scopes are locked in key order, so two
//! transactions appending to the same scopes cannot deadlock. An append must be the last thing a
//! transaction does: it leaves `nexus.tenant` set to the last scope it wrote.

use std::collections::BTreeMap;

use nexus_domain::audit::{AuditEntry, AuditRecord, AuditScope, GENESIS_HASH};
use nexus_store::{AuditPage, AuditQuery, StoreError, StoreResult};
use sqlx::{PgConnection, Postgres, QueryBuilder, Row};

use crate::PostgresStore;
use crate::rows::{audit_entry_from_row, unexpected};

/// Scope keys are sent as a literal in `BEGIN; SET LOCAL ...` (see `scoped_tx`), so only the
/// characters a key can hold are accepted: a tenant's `[A-Za-z0-9._-]`, `:` and `*`.
pub(crate) fn checked_key(key: &str) -> StoreResult<&str> {
    if !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b':' | b'*'))
    {
        Ok(key)
    } else {
        Err(StoreError::Unexpected(anyhow::anyhow!(
            "a scope key with unexpected characters"
        )))
    }
}

/// Points row-level security at `key` for the rest of the transaction.
async fn set_scope(conn: &mut PgConnection, key: &str) -> StoreResult<()> {
    sqlx::query("SELECT set_config('nexus.tenant', $1, true)")
        .bind(checked_key(key)?)
        .execute(&mut *conn)
        .await
        .map_err(unexpected)?;
    Ok(())
}

/// Appends `records` in the caller's transaction (see the module docs). Call it last.
pub(crate) async fn write_audit(
    conn: &mut PgConnection,
    records: &[AuditRecord],
) -> StoreResult<()> {
    // Key order for locking; within a scope, the caller's order.
    let mut by_scope: BTreeMap<String, Vec<&AuditRecord>> = BTreeMap::new();
    for record in records {
        by_scope.entry(record.scope.key()).or_default().push(record);
    }
    for (key, records) in by_scope {
        set_scope(conn, &key).await?;
        // Creates the head if needed and locks it either way; RETURNING gives the newest
        // committed values (READ COMMITTED re-reads a row it had to wait for).
        let head = sqlx::query(
            "INSERT INTO audit_heads (scope, last_seq, last_hash) VALUES ($1, 0, $2)
             ON CONFLICT (scope) DO UPDATE SET last_seq = audit_heads.last_seq
             RETURNING last_seq, last_hash",
        )
        .bind(&key)
        .bind(GENESIS_HASH)
        .fetch_one(&mut *conn)
        .await
        .map_err(unexpected)?;
        let last_seq: i64 = head.try_get("last_seq").map_err(unexpected)?;
        let mut prev: String = head.try_get("last_hash").map_err(unexpected)?;
        let mut seq = u64::try_from(last_seq)
            .map_err(|e| StoreError::Unexpected(anyhow::anyhow!("stored audit head: {e}")))?;
        let mut entries = Vec::with_capacity(records.len());
        for record in records {
            seq += 1;
            let entry = AuditEntry::chain(record.clone(), seq, &prev);
            prev.clone_from(&entry.hash);
            entries.push(entry);
        }
        let mut details = Vec::with_capacity(entries.len());
        for entry in &entries {
            details.push(
                serde_json::to_string(&entry.record.details)
                    .map_err(|e| StoreError::Unexpected(e.into()))?,
            );
        }
        // The entries and the new head in one statement.
        let mut sql =
            QueryBuilder::<Postgres>::new("WITH head AS (UPDATE audit_heads SET last_seq = ");
        sql.push_bind(i64::try_from(seq).unwrap_or(i64::MAX))
            .push(", last_hash = ")
            .push_bind(prev.clone())
            .push(" WHERE scope = ")
            .push_bind(key.clone())
            .push(
                ") INSERT INTO audit_log (scope, seq, id, ts, actor_type, actor_id, action, \
                 target_type, target_id, result, ip, user_agent, correlation_id, details, \
                 prev_hash, hash) ",
            );
        sql.push_values(entries.iter().zip(details), |mut row, (entry, details)| {
            let r = &entry.record;
            row.push_bind(key.clone())
                .push_bind(i64::try_from(entry.seq).unwrap_or(i64::MAX))
                .push_bind(entry.id.clone())
                .push_bind(r.ts)
                .push_bind(r.actor.kind.as_str())
                .push_bind(r.actor.id.clone())
                .push_bind(r.action.clone())
                .push_bind(r.target.as_ref().map(|t| t.kind.clone()))
                .push_bind(r.target.as_ref().map(|t| t.id.clone()))
                .push_bind(r.result.as_str())
                .push_bind(r.ip.clone())
                .push_bind(r.user_agent.clone())
                .push_bind(r.correlation_id.clone())
                .push_bind(details)
                .push_bind(entry.prev_hash.clone())
                .push_bind(entry.hash.clone());
        });
        sql.build().execute(&mut *conn).await.map_err(unexpected)?;
    }
    Ok(())
}

/// Appends records that change nothing else, in a transaction of their own.
pub(crate) async fn append(store: &PostgresStore, records: &[AuditRecord]) -> StoreResult<()> {
    if records.is_empty() {
        return Ok(());
    }
    let mut tx = store.pool.begin().await.map_err(unexpected)?;
    write_audit(&mut tx, records).await?;
    tx.commit().await.map_err(unexpected)
}

/// Newest first across the requested scopes. Row-level security admits one scope per statement,
/// so each scope is read on its own (at most `limit + 1` rows each) and the results are merged by
/// position, which is the global order.
pub(crate) async fn entries(store: &PostgresStore, query: &AuditQuery) -> StoreResult<AuditPage> {
    let mut keys: Vec<String> = query.scopes.iter().map(AuditScope::key).collect();
    keys.sort();
    keys.dedup();
    let Some(first) = keys.first() else {
        return Ok(AuditPage {
            entries: Vec::new(),
            next_cursor: None,
        });
    };
    let limit = query.limit.max(1);
    let mut tx = store.scoped_tx(first).await?;
    let mut found: Vec<(i64, AuditEntry)> = Vec::new();
    for (i, key) in keys.iter().enumerate() {
        if i > 0 {
            set_scope(&mut tx, key).await?;
        }
        let mut sql = QueryBuilder::<Postgres>::new("SELECT * FROM audit_log WHERE scope = ");
        sql.push_bind(key.clone());
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
        for row in sql.build().fetch_all(&mut *tx).await.map_err(unexpected)? {
            let position: i64 = row.try_get("position").map_err(unexpected)?;
            found.push((position, audit_entry_from_row(&row)?));
        }
    }
    tx.commit().await.map_err(unexpected)?;
    found.sort_by_key(|(position, _)| std::cmp::Reverse(*position));
    let more = found.len() > limit as usize;
    found.truncate(limit as usize);
    let next_cursor = if more {
        found.last().map(|(position, _)| *position)
    } else {
        None
    };
    Ok(AuditPage {
        entries: found.into_iter().map(|(_, entry)| entry).collect(),
        next_cursor,
    })
}

pub(crate) async fn chain(
    store: &PostgresStore,
    scope: &AuditScope,
    after_seq: u64,
    limit: u32,
) -> StoreResult<Vec<AuditEntry>> {
    let key = scope.key();
    let mut tx = store.scoped_tx(&key).await?;
    let rows =
        sqlx::query("SELECT * FROM audit_log WHERE scope = $1 AND seq > $2 ORDER BY seq LIMIT $3")
            .bind(&key)
            .bind(i64::try_from(after_seq).unwrap_or(i64::MAX))
            .bind(i64::from(limit))
            .fetch_all(&mut *tx)
            .await
            .map_err(unexpected)?;
    tx.commit().await.map_err(unexpected)?;
    rows.iter().map(audit_entry_from_row).collect()
}

pub(crate) async fn scopes(store: &PostgresStore) -> StoreResult<Vec<AuditScope>> {
    let keys: Vec<String> = sqlx::query_scalar("SELECT s FROM nexus_audit_scopes() AS s")
        .fetch_all(&store.pool)
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

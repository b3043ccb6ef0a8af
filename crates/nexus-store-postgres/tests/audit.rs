//! The audit trail under row-level security: one scope's rows are invisible (and unwritable) under
//! another scope's setting, and the application role cannot change or delete entries at all.
#![allow(clippy::unwrap_used)]

mod common;

use common::TestDb;
use nexus_domain::audit::{
    Actor, AuditRecord, AuditResult, AuditScope, GENESIS_HASH, verify_chain,
};
use nexus_domain::{OrgId, TenantId};
use nexus_store::{AuditQuery, Store};
use nexus_store_postgres::PostgresConfig;
use sqlx::{Connection, PgConnection};

fn record(scope: &AuditScope, action: &str) -> AuditRecord {
    AuditRecord {
        scope: scope.clone(),
        ts: 1_700_000_000_000,
        actor: Actor::system(),
        action: action.into(),
        target: None,
        result: AuditResult::Success,
        ip: None,
        user_agent: None,
        correlation_id: None,
        details: serde_json::json!({"k": "v"}),
    }
}

/// Counts rows of `table` in a transaction whose `nexus.tenant` is `key` (none if `None`).
/// Deliberately no scope filter: only row-level security decides.
async fn count_as(conn: &mut PgConnection, table: &str, key: Option<&str>) -> i64 {
    let mut tx = conn.begin().await.unwrap();
    if let Some(key) = key {
        sqlx::query("SELECT set_config('nexus.tenant', $1, true)")
            .bind(key)
            .execute(&mut *tx)
            .await
            .unwrap();
    }
    let n = sqlx::query_scalar(&format!("SELECT count(*) FROM {table}"))
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    n
}

fn sqlstate(result: Result<sqlx::postgres::PgQueryResult, sqlx::Error>) -> String {
    match result {
        Ok(done) => panic!("expected an error, {} rows changed", done.rows_affected()),
        Err(sqlx::Error::Database(db)) => db.code().unwrap_or_default().into_owned(),
        Err(other) => panic!("unexpected error {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_rows_are_visible_only_under_their_own_scope() {
    let Some(db) = TestDb::migrated().await else {
        return;
    };
    let store = db.store(PostgresConfig::default()).await;
    let a = AuditScope::Tenant(TenantId::parse("alpha", "web").unwrap());
    let b = AuditScope::Tenant(TenantId::parse("beta", "web").unwrap());
    let org = AuditScope::Org(OrgId::parse("org", "alpha").unwrap());
    store
        .append_audit(&[record(&a, "a.1"), record(&a, "a.2"), record(&b, "b.1")])
        .await
        .unwrap();
    store.append_audit(&[record(&org, "org.1")]).await.unwrap();
    store
        .append_audit(&[record(&AuditScope::System, "sys.1")])
        .await
        .unwrap();

    let mut app = PgConnection::connect(&db.app_url()).await.unwrap();
    for (key, log, heads) in [
        (Some("alpha:web"), 2, 1),
        (Some("beta:web"), 1, 1),
        (Some("alpha:*"), 1, 1),
        (Some("*"), 1, 1),
        (Some("gamma:web"), 0, 0),
        (None, 0, 0),
    ] {
        assert_eq!(count_as(&mut app, "audit_log", key).await, log, "{key:?}");
        assert_eq!(
            count_as(&mut app, "audit_heads", key).await,
            heads,
            "{key:?}"
        );
    }
    // A brand-new connection outside any transaction sees nothing either.
    let mut fresh = PgConnection::connect(&db.app_url()).await.unwrap();
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM audit_log")
        .fetch_one(&mut fresh)
        .await
        .unwrap();
    assert_eq!(n, 0);

    // Writing an entry into another scope is refused, not just filtered.
    let mut tx = app.begin().await.unwrap();
    sqlx::query("SELECT set_config('nexus.tenant', 'alpha:web', true)")
        .execute(&mut *tx)
        .await
        .unwrap();
    let smuggled = sqlx::query(
        "INSERT INTO audit_log (scope, seq, id, ts, actor_type, actor_id, action, result, details,
                                prev_hash, hash)
         VALUES ('beta:web', 2, 'aud_x', 0, 'system', 'nexus', 'forged', 'success', '{}', $1, $1)",
    )
    .bind(GENESIS_HASH)
    .execute(&mut *tx)
    .await;
    assert!(
        smuggled.is_err(),
        "an entry of another scope must not be written"
    );
    drop(tx);

    // Through the store, a tenant's reader gets exactly the scopes it asks for.
    let page = store
        .audit_entries(&AuditQuery {
            scopes: vec![a.clone(), org.clone()],
            limit: 10,
            ..AuditQuery::default()
        })
        .await
        .unwrap();
    let actions: Vec<&str> = page
        .entries
        .iter()
        .map(|e| e.record.action.as_str())
        .collect();
    assert_eq!(actions, vec!["org.1", "a.2", "a.1"]);
    let mut scopes = store.audit_scopes().await.unwrap();
    scopes.sort_by_key(AuditScope::key);
    assert_eq!(scopes, vec![AuditScope::System, org, a, b]);
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_application_role_cannot_change_or_delete_audit_entries() {
    let Some(db) = TestDb::migrated().await else {
        return;
    };
    let store = db.store(PostgresConfig::default()).await;
    let scope = AuditScope::Tenant(TenantId::parse("alpha", "web").unwrap());
    store
        .append_audit(&[record(&scope, "one"), record(&scope, "two")])
        .await
        .unwrap();

    let mut app = PgConnection::connect(&db.app_url()).await.unwrap();
    for statement in [
        "UPDATE audit_log SET action = 'rewritten'",
        "DELETE FROM audit_log",
        "TRUNCATE audit_log",
    ] {
        let mut tx = app.begin().await.unwrap();
        sqlx::query("SELECT set_config('nexus.tenant', 'alpha:web', true)")
            .execute(&mut *tx)
            .await
            .unwrap();
        let result = sqlx::query(statement).execute(&mut *tx).await;
        assert_eq!(sqlstate(result), "42501", "{statement}: permission denied");
        drop(tx);
    }
    // Running `migrate` again (it re-applies grants) does not give the rights back.
    nexus_store_postgres::PostgresStore::migrate(&db.owner_url())
        .await
        .unwrap();
    let result = sqlx::query("DELETE FROM audit_log").execute(&mut app).await;
    assert_eq!(sqlstate(result), "42501");

    let entries = store.audit_chain(&scope, 0, 100).await.unwrap();
    assert_eq!(entries.len(), 2);
    verify_chain(&entries, (0, GENESIS_HASH.into())).unwrap();

    // The schema owner can still edit rows, and the chain then names the edited entry.
    let mut owner = PgConnection::connect(&db.owner_url()).await.unwrap();
    let mut tx = owner.begin().await.unwrap();
    sqlx::query("SELECT set_config('nexus.tenant', 'alpha:web', true)")
        .execute(&mut *tx)
        .await
        .unwrap();
    let edited = sqlx::query("UPDATE audit_log SET action = 'rewritten' WHERE seq = 2")
        .execute(&mut *tx)
        .await
        .unwrap();
    assert_eq!(edited.rows_affected(), 1);
    tx.commit().await.unwrap();
    let entries = store.audit_chain(&scope, 0, 100).await.unwrap();
    let broken = verify_chain(&entries, (0, GENESIS_HASH.into())).unwrap_err();
    assert_eq!((broken.seq, broken.reason.as_str()), (2, "hash_mismatch"));
    store.close().await;
}

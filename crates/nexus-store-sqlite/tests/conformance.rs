//! Runs the shared conformance suite against SQLite, plus what only a file-backed store can show.

use std::sync::Arc;

use nexus_store::Store;
use nexus_store_sqlite::{SqliteConfig, SqliteStore};
use nexus_store_tests::DynStore;

async fn fresh_store() -> (DynStore, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = SqliteStore::open(&dir.path().join("nexus.db"), SqliteConfig::default())
        .await
        .expect("open");
    (Arc::new(store), dir)
}

nexus_store_tests::conformance_tests!(fresh_store);

#[tokio::test]
async fn data_survives_close_and_reopen() {
    use nexus_domain::report::ValidatedReport;
    use nexus_domain::{SessionId, TenantId};
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("nexus.db");
    let t = TenantId::parse("o", "p").expect("tenant");
    let report = ValidatedReport::parse(
        &serde_json::json!({"meta": {"report_id": "r1", "created_at": "t", "session_id": "s"}}),
    )
    .expect("report");
    let store = SqliteStore::open(&path, SqliteConfig::default())
        .await
        .expect("open");
    store
        .append_reports(&t, None, &[report], 1)
        .await
        .expect("append");
    store.close().await;
    assert!(
        store.append_reports(&t, None, &[], 1).await.is_err(),
        "a closed store refuses writes"
    );

    let reopened = SqliteStore::open(&path, SqliteConfig::default())
        .await
        .expect("reopen");
    let events = reopened
        .events_after(&t, &SessionId::parse("s", "s").expect("s"), 0, 10)
        .await
        .expect("read");
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].event_id, 1);
    reopened.close().await;
}

#[tokio::test]
async fn audit_entries_cannot_be_changed_or_deleted() {
    use nexus_domain::audit::{Actor, AuditRecord, AuditResult, AuditScope};
    use sqlx::Connection;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("nexus.db");
    let store = SqliteStore::open(&path, SqliteConfig::default())
        .await
        .expect("open");
    let record = AuditRecord {
        scope: AuditScope::System,
        ts: 1,
        actor: Actor::system(),
        action: "cli.verify".into(),
        target: None,
        result: AuditResult::Success,
        ip: None,
        user_agent: None,
        correlation_id: None,
        details: serde_json::json!({}),
    };
    store.append_audit(&[record]).await.expect("append");
    let mut conn = sqlx::SqliteConnection::connect(&format!("sqlite://{}", path.display()))
        .await
        .expect("connect");
    for statement in [
        "UPDATE audit_log SET action = 'rewritten'",
        "DELETE FROM audit_log",
    ] {
        let err = sqlx::query(statement)
            .execute(&mut conn)
            .await
            .expect_err(statement);
        assert!(
            err.to_string().contains("append-only"),
            "{statement}: {err}"
        );
    }
    conn.close().await.expect("close");
    assert_eq!(
        store
            .audit_chain(&AuditScope::System, 0, 10)
            .await
            .expect("chain")
            .len(),
        1
    );
    store.close().await;
}

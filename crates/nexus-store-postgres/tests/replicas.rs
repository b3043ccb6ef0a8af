//! Several server processes share one database (DESIGN.md §5): stores with separate pools stand in
//! for replicas. Writers on every replica append to one session while readers on every replica
//! follow it with "everything after my cursor"; a reader must never see an id before all lower ids
//! are visible, or it would move its cursor past an event and never deliver it.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use common::TestDb;
use nexus_domain::report::ValidatedReport;
use nexus_domain::time::now_millis;
use nexus_domain::{SessionId, TenantId};
use nexus_store::Store;
use nexus_store_postgres::PostgresConfig;

const REPLICAS: usize = 3;
const WRITERS_PER_REPLICA: usize = 3;
const PUSHES_PER_WRITER: usize = 20;

fn report(id: &str) -> ValidatedReport {
    ValidatedReport::parse(
        &serde_json::json!({"meta": {"report_id": id, "created_at": "t", "session_id": "live"}}),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_commit_event_ids_in_order() {
    let Some(db) = TestDb::migrated().await else {
        return;
    };
    let mut replicas = Vec::new();
    for _ in 0..REPLICAS {
        replicas.push(Arc::new(db.store(PostgresConfig::default()).await));
    }
    let tenant = TenantId::parse("o", "p").unwrap();
    let session = SessionId::parse("s", "live").unwrap();
    // Each push carries one or two new reports and, every third time, a retry of an earlier one.
    let total = (REPLICAS * WRITERS_PER_REPLICA * PUSHES_PER_WRITER * 3 / 2) as u64;
    let done = Arc::new(AtomicBool::new(false));

    let mut readers = Vec::new();
    for replica in &replicas {
        let (store, tenant, session, done) = (
            replica.clone(),
            tenant.clone(),
            session.clone(),
            done.clone(),
        );
        readers.push(tokio::spawn(async move {
            let mut cursor = 0;
            loop {
                let finished = done.load(Ordering::SeqCst);
                for event in store
                    .events_after(&tenant, &session, cursor, 1000)
                    .await
                    .unwrap()
                {
                    assert_eq!(event.event_id, cursor + 1, "a reader skipped past an event");
                    cursor = event.event_id;
                }
                if finished {
                    return cursor;
                }
            }
        }));
    }

    let mut writers = Vec::new();
    for (r, replica) in replicas.iter().enumerate() {
        for w in 0..WRITERS_PER_REPLICA {
            let (store, tenant) = (replica.clone(), tenant.clone());
            writers.push(tokio::spawn(async move {
                let mut created = Vec::new();
                for i in 0..PUSHES_PER_WRITER {
                    let mut batch = vec![report(&format!("{r}-{w}-{i}"))];
                    if i % 2 == 0 {
                        batch.push(report(&format!("{r}-{w}-{i}b")));
                    }
                    if i % 3 == 2 {
                        batch.push(report(&format!("{r}-{w}-{}", i - 1)));
                    }
                    for appended in store
                        .append_reports(&tenant, None, &batch, now_millis())
                        .await
                        .unwrap()
                    {
                        if !appended.duplicate {
                            created.push(appended.event.event_id);
                        }
                    }
                }
                created
            }));
        }
    }
    let mut created = Vec::new();
    for writer in futures::future::join_all(writers).await {
        created.extend(writer.unwrap());
    }
    done.store(true, Ordering::SeqCst);
    for reader in futures::future::join_all(readers).await {
        assert_eq!(reader.unwrap(), total, "every reader saw every event");
    }
    created.sort_unstable();
    assert_eq!(
        created,
        (1..=total).collect::<Vec<_>>(),
        "ids are gapless and unique"
    );
    assert_eq!(
        replicas[0].last_event_id(&tenant, &session).await.unwrap(),
        total
    );
    for replica in replicas {
        replica.close().await;
    }
}

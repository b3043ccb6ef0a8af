//! The hub's ordering guarantees, against a real (SQLite) store: out-of-order publishes are
//! delivered in order, gaps are filled from the store, late subscribers get no duplicates, slow
//! subscribers are cut off, and idle channels are removed.

#![allow(clippy::unwrap_used)] // test helpers panic on setup failure by design

use std::sync::Arc;
use std::time::Duration;

use nexus_core::CoreConfig;
use nexus_core::hub::Hub;
use nexus_core::stream::{StreamEnd, StreamItem, StreamService};
use nexus_domain::report::ValidatedReport;
use nexus_domain::{SessionId, TenantId};
use nexus_store::{Store, StoredEvent};
use nexus_store_sqlite::{SqliteConfig, SqliteStore};

async fn store() -> (Arc<dyn Store>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("t.db"), SqliteConfig::default())
        .await
        .unwrap();
    (Arc::new(store), dir)
}

fn tenant() -> TenantId {
    TenantId::parse("o", "p").unwrap()
}

fn session() -> SessionId {
    SessionId::parse("s", "s").unwrap()
}

async fn append(store: &Arc<dyn Store>, ids: std::ops::Range<u32>) -> Vec<StoredEvent> {
    let reports: Vec<_> = ids
        .map(|i| ValidatedReport::parse(&serde_json::json!({"meta": {"report_id": format!("r{i}"), "created_at": "t", "session_id": "s"}})).unwrap())
        .collect();
    store
        .append_reports(&tenant(), None, &reports, 0)
        .await
        .unwrap()
        .into_iter()
        .map(|a| a.event)
        .collect()
}

fn config() -> Arc<CoreConfig> {
    Arc::new(CoreConfig {
        gap_fill_after: Duration::from_millis(20),
        subscriber_queue: 100,
        ..CoreConfig::default()
    })
}

#[tokio::test]
async fn out_of_order_publishes_are_delivered_in_order() {
    let (store, _dir) = store().await;
    let hub = Hub::new(store.clone(), config());
    let mut sub = hub.subscribe(&tenant(), &session()).await.unwrap();
    assert_eq!(sub.position, 0);
    let events = append(&store, 0..3).await;
    hub.publish(&tenant(), events[2].clone());
    hub.publish(&tenant(), events[0].clone());
    hub.publish(&tenant(), events[1].clone());
    hub.publish(&tenant(), events[1].clone());
    for expected in 1..=3 {
        let got = tokio::time::timeout(Duration::from_secs(2), sub.receiver.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got.event_id, expected);
    }
    assert!(
        sub.receiver.try_recv().is_err(),
        "a duplicate publish is not delivered twice"
    );
}

#[tokio::test]
async fn a_missing_event_is_read_from_the_store() {
    let (store, _dir) = store().await;
    let hub = Hub::new(store.clone(), config());
    let mut sub = hub.subscribe(&tenant(), &session()).await.unwrap();
    let events = append(&store, 0..3).await;
    // Events 1 and 2 were committed but their publishers never published (e.g. cancelled).
    hub.publish(&tenant(), events[2].clone());
    for expected in 1..=3 {
        let got = tokio::time::timeout(Duration::from_secs(2), sub.receiver.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got.event_id, expected);
    }
}

#[tokio::test]
async fn a_late_subscriber_starts_exactly_at_its_position() {
    let (store, _dir) = store().await;
    let hub = Hub::new(store.clone(), config());
    let _early = hub.subscribe(&tenant(), &session()).await.unwrap();
    for e in append(&store, 0..5).await {
        hub.publish(&tenant(), e);
    }
    let mut late = hub.subscribe(&tenant(), &session()).await.unwrap();
    assert_eq!(late.position, 5);
    let more = append(&store, 5..6).await;
    hub.publish(&tenant(), more[0].clone());
    assert_eq!(late.receiver.recv().await.unwrap().event_id, 6);
}

#[tokio::test]
async fn channels_disappear_with_their_last_subscriber() {
    let (store, _dir) = store().await;
    let hub = Hub::new(store.clone(), config());
    let a = hub.subscribe(&tenant(), &session()).await.unwrap();
    let b = hub.subscribe(&tenant(), &session()).await.unwrap();
    assert_eq!(hub.active_sessions(), 1);
    drop(a);
    assert_eq!(hub.active_sessions(), 1);
    drop(b);
    assert_eq!(hub.active_sessions(), 0);
}

#[tokio::test]
async fn a_subscriber_that_falls_behind_its_queue_is_ended() {
    let (store, _dir) = store().await;
    let config = config();
    let hub = Hub::new(store.clone(), config.clone());
    let streams = StreamService::new(store.clone(), hub.clone(), config);
    let mut stream = streams.open(&tenant(), &session(), None).await.unwrap();
    assert!(matches!(
        stream.next().await,
        Ok(StreamItem::Snapshot { id: 0, .. })
    ));
    for chunk in 0..3 {
        for e in append(&store, chunk * 100..(chunk + 1) * 100).await {
            hub.publish(&tenant(), e);
        }
    }
    assert_eq!(stream.next().await.unwrap_err(), StreamEnd::Lagged);
}

#[tokio::test]
async fn replay_then_live_has_no_gap_and_no_duplicate() {
    let (store, _dir) = store().await;
    let config = config();
    let hub = Hub::new(store.clone(), config.clone());
    let streams = StreamService::new(store.clone(), hub.clone(), config);
    append(&store, 0..4).await;
    let mut stream = streams.open(&tenant(), &session(), Some(1)).await.unwrap();
    let live = append(&store, 4..6).await;
    for e in live {
        hub.publish(&tenant(), e);
    }
    let mut ids = Vec::new();
    while ids.len() < 5 {
        match stream.next().await.unwrap() {
            StreamItem::Event(e) => ids.push(e.event_id),
            StreamItem::Snapshot { .. } => panic!("a cursor within the buffer replays"),
        }
    }
    assert_eq!(ids, vec![2, 3, 4, 5, 6]);
}

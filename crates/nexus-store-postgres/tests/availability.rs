//! When the database goes away, calls fail fast with `Unavailable` instead of hanging, and the pool
//! recovers by itself when it returns. A small TCP proxy in front of the test cluster plays the
//! outage: refusing connections, or swallowing traffic without answering.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use common::TestDb;
use nexus_domain::{SessionId, TenantId};
use nexus_store::{Store, StoreError};
use nexus_store_postgres::{PostgresConfig, PostgresStore};
use sqlx::ConnectOptions;
use sqlx::postgres::PgConnectOptions;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;
use tokio::task::JoinHandle;

const UP: u8 = 0;
/// Accepts connections and closes them at once (like a server that is restarting).
const REFUSING: u8 = 1;
/// Accepts connections and never answers (like a network that drops packets).
const SILENT: u8 = 2;

struct Proxy {
    port: u16,
    mode: Arc<AtomicU8>,
    links: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accept: JoinHandle<()>,
}

impl Proxy {
    async fn start(upstream: String) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let mode = Arc::new(AtomicU8::new(UP));
        let links: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let (mode2, links2) = (mode.clone(), links.clone());
        let accept = tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    return;
                };
                match mode2.load(Ordering::SeqCst) {
                    UP => {
                        let upstream = upstream.clone();
                        links2.lock().await.push(tokio::spawn(async move {
                            if let Ok(mut server) = TcpStream::connect(upstream).await {
                                let _ =
                                    tokio::io::copy_bidirectional(&mut client, &mut server).await;
                            }
                        }));
                    }
                    REFUSING => drop(client),
                    _ => links2.lock().await.push(tokio::spawn(async move {
                        let _held = client;
                        std::future::pending::<()>().await;
                    })),
                }
            }
        });
        Self {
            port,
            mode,
            links,
            accept,
        }
    }

    /// Switches mode and cuts every open connection, as an outage would.
    async fn set(&self, mode: u8) {
        self.mode.store(mode, Ordering::SeqCst);
        for link in self.links.lock().await.drain(..) {
            link.abort();
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

async fn expect_unavailable_fast(store: &PostgresStore, tenant: &TenantId, limit: Duration) {
    let session = SessionId::parse("s", "s").unwrap();
    let started = Instant::now();
    let result = store.last_event_id(tenant, &session).await;
    let took = started.elapsed();
    assert!(
        matches!(result, Err(StoreError::Unavailable(_))),
        "expected Unavailable, got {result:?}"
    );
    assert!(took < limit, "failing took {took:?}, more than {limit:?}");
    let started = Instant::now();
    assert!(matches!(
        store.ping().await,
        Err(StoreError::Unavailable(_))
    ));
    assert!(started.elapsed() < limit);
}

async fn expect_recovery(store: &PostgresStore, tenant: &TenantId) {
    let session = SessionId::parse("s", "s").unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match store.last_event_id(tenant, &session).await {
            Ok(_) => return,
            Err(e) if Instant::now() < deadline => {
                eprintln!("not yet recovered: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("the store did not recover: {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outages_fail_fast_and_the_pool_recovers() {
    let Some(db) = TestDb::migrated().await else {
        return;
    };
    let app: PgConnectOptions = db.app_url().parse().unwrap();
    let proxy = Proxy::start(format!("{}:{}", app.get_host(), app.get_port())).await;
    let config = PostgresConfig {
        max_connections: 4,
        acquire_timeout: Duration::from_millis(1000),
        operation_timeout: Duration::from_secs(3),
        ..PostgresConfig::default()
    };
    let via_proxy = app.clone().host("127.0.0.1").port(proxy.port);
    let store = PostgresStore::connect(via_proxy.to_url_lossy().as_ref(), config)
        .await
        .unwrap();
    let tenant = TenantId::parse("o", "p").unwrap();
    expect_recovery(&store, &tenant).await;

    // The limit allows the acquire timeout plus generous scheduling slack, far below "hanging".
    let limit = Duration::from_millis(2500);
    proxy.set(REFUSING).await;
    expect_unavailable_fast(&store, &tenant, limit).await;
    proxy.set(UP).await;
    expect_recovery(&store, &tenant).await;

    proxy.set(SILENT).await;
    expect_unavailable_fast(&store, &tenant, limit).await;
    proxy.set(UP).await;
    expect_recovery(&store, &tenant).await;
    store.close().await;
}

#[tokio::test]
async fn connecting_to_a_database_that_is_down_fails_fast() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    // A port nothing listens on: the pool retries until its acquire timeout, then gives up.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    let app: PgConnectOptions = db.app_url().parse().unwrap();
    let url = app.port(port).to_url_lossy().to_string();
    let started = Instant::now();
    let result = PostgresStore::connect(&url, PostgresConfig::default()).await;
    assert!(result.is_err());
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
}

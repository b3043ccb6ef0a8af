//! Test databases: each test gets its own freshly created and migrated database on the cluster named
//! by `NEXUS_TEST_DATABASE_URL` (a superuser URL, e.g. from `scripts/postgres.sh start`). The schema is
//! owned by a plain role and the store connects as the application role, exactly as in production,
//! so row-level security is really in force. Without the variable the tests fail, unless
//! `NEXUS_SKIP_POSTGRES=1` says that skipping them is intended.
#![allow(clippy::unwrap_used, dead_code)]

use std::str::FromStr;
use std::sync::Arc;

use nexus_store_postgres::{PostgresConfig, PostgresStore};
use nexus_store_tests::DynStore;
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection, PgConnection};

pub const URL_VAR: &str = "NEXUS_TEST_DATABASE_URL";
pub const SKIP_VAR: &str = "NEXUS_SKIP_POSTGRES";
/// Owns the schema in test databases: a plain role (no superuser, no BYPASSRLS), as in production.
pub const OWNER_ROLE: &str = "nexus_test_owner";
/// The application role: the store's default.
pub const APP_ROLE: &str = nexus_store_postgres::DEFAULT_APP_ROLE;
const ROLE_PASSWORD: &str = "nexus-test";

/// The superuser URL, `None` when skipping was requested; panics when neither is set.
pub fn admin_url() -> Option<String> {
    match std::env::var(URL_VAR) {
        Ok(url) if !url.is_empty() => Some(url),
        _ if std::env::var(SKIP_VAR).is_ok_and(|v| v == "1") => {
            eprintln!("{SKIP_VAR}=1: skipping a PostgreSQL test");
            None
        }
        _ => panic!(
            "{URL_VAR} is not set, so the PostgreSQL store cannot be tested. Start a throwaway \
             cluster and point the tests at it:\n    export {URL_VAR}=$(scripts/postgres.sh start)\n\
             or set {SKIP_VAR}=1 to skip the PostgreSQL tests on purpose."
        ),
    }
}

/// A database that exists for one test and is dropped afterwards.
pub struct TestDb {
    pub name: String,
    admin: PgConnectOptions,
}

impl TestDb {
    /// Creates an empty database owned by [`OWNER_ROLE`] (not migrated). `None` when skipping.
    pub async fn create() -> Option<Self> {
        let admin = PgConnectOptions::from_str(&admin_url()?)
            .expect("NEXUS_TEST_DATABASE_URL is a PostgreSQL URL")
            .disable_statement_logging();
        let mut conn = admin
            .connect()
            .await
            .unwrap_or_else(|e| panic!("cannot connect to {URL_VAR}: {e}"));
        ensure_roles(&mut conn).await;
        let name = format!("nexus_t_{}", ulid::Ulid::new().to_string().to_lowercase());
        sqlx::query(&format!("CREATE DATABASE {name} OWNER {OWNER_ROLE}"))
            .execute(&mut conn)
            .await
            .expect("create database");
        conn.close().await.ok();
        Some(Self { name, admin })
    }

    /// Creates a database, migrates it as the owner and returns it. `None` when skipping.
    pub async fn migrated() -> Option<Self> {
        let db = Self::create().await?;
        PostgresStore::migrate(&db.owner_url())
            .await
            .expect("migrate");
        Some(db)
    }

    fn url_as(&self, role: &str) -> String {
        self.admin
            .clone()
            .username(role)
            .password(ROLE_PASSWORD)
            .database(&self.name)
            .to_url_lossy()
            .to_string()
    }

    pub fn owner_url(&self) -> String {
        self.url_as(OWNER_ROLE)
    }

    pub fn app_url(&self) -> String {
        self.url_as(APP_ROLE)
    }

    /// This database, as the superuser.
    pub fn admin_url(&self) -> String {
        self.admin
            .clone()
            .database(&self.name)
            .to_url_lossy()
            .to_string()
    }

    pub async fn store(&self, config: PostgresConfig) -> PostgresStore {
        PostgresStore::connect(&self.app_url(), config)
            .await
            .expect("connect as the application role")
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        // Drop runs outside async code; a short-lived runtime on its own thread does the cleanup.
        let (admin, name) = (self.admin.clone(), self.name.clone());
        let cleanup = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                if let Ok(mut conn) = admin.connect().await {
                    let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .execute(&mut conn)
                        .await;
                    let _ = conn.close().await;
                }
            });
        });
        let _ = cleanup.join();
    }
}

/// Creates the owner and application roles once per cluster (roles are cluster-wide; the advisory
/// lock keeps concurrent tests from racing to create them).
async fn ensure_roles(conn: &mut PgConnection) {
    let mut tx = conn.begin().await.unwrap();
    sqlx::query("SELECT pg_advisory_xact_lock(7261837)")
        .execute(&mut *tx)
        .await
        .unwrap();
    for role in [OWNER_ROLE, APP_ROLE] {
        let exists: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1)")
                .bind(role)
                .fetch_one(&mut *tx)
                .await
                .unwrap();
        if !exists {
            sqlx::query(&format!(
                "CREATE ROLE {role} LOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE PASSWORD '{ROLE_PASSWORD}'"
            ))
            .execute(&mut *tx)
            .await
            .unwrap();
        }
    }
    tx.commit().await.unwrap();
}

/// The conformance suite's factory: a migrated database and a store connected as the app role.
pub async fn fresh_store() -> Option<(DynStore, TestDb)> {
    let db = TestDb::migrated().await?;
    let store = db.store(PostgresConfig::default()).await;
    Some((Arc::new(store), db))
}

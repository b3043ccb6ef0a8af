//! A data directory written by the previous release (migration 0001 only) opens with this one, and
//! what it held keeps working.

use std::str::FromStr;

use nexus_domain::secret::SecretHash;
use nexus_domain::{DeviceId, TenantId};
use nexus_store::Store;
use nexus_store_sqlite::{SqliteConfig, SqliteStore};
use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{ConnectOptions, Connection};

#[tokio::test]
async fn devices_paired_before_0002_keep_working_after_the_upgrade() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("nexus.db");
    // The schema as the previous release left it: migration 0001 only (the same file, so the same
    // checksum the full migrator expects).
    let old = tempfile::tempdir().expect("tempdir");
    std::fs::copy(
        concat!(env!("CARGO_MANIFEST_DIR"), "/migrations/0001_core.sql"),
        old.path().join("0001_core.sql"),
    )
    .expect("copy 0001");
    let mut conn = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))
        .expect("options")
        .create_if_missing(true)
        .foreign_keys(true)
        .connect()
        .await
        .expect("connect");
    sqlx::migrate::Migrator::new(old.path())
        .await
        .expect("old migrator")
        .run(&mut conn)
        .await
        .expect("0001");
    sqlx::query(
        "INSERT INTO devices (tenant, id, name, device_type, capabilities, paired_at)
         VALUES ('alpha:web', 'dev_legacy', 'pc', 'windows_companion', '[]', 1)",
    )
    .execute(&mut conn)
    .await
    .expect("device");
    sqlx::query(
        "INSERT INTO device_tokens (token_hash, tenant, device_id, created_at)
         VALUES (?, 'alpha:web', 'dev_legacy', 1)",
    )
    .bind(SecretHash::of("nxd_legacy").as_str())
    .execute(&mut conn)
    .await
    .expect("token");
    conn.close().await.expect("close");

    let store = SqliteStore::open(&path, SqliteConfig::default())
        .await
        .expect("open applies 0002");
    let credential = store
        .device_credential(&SecretHash::of("nxd_legacy"))
        .await
        .expect("read")
        .expect("the legacy token still authenticates");
    assert_eq!(
        credential.device_id,
        DeviceId::from_trusted("dev_legacy".into())
    );
    assert_eq!(
        credential.tenant,
        TenantId::parse("alpha", "web").expect("tenant")
    );
    assert_eq!(credential.expires_at, 253_402_300_799_999, "9999-12-31");
    store.close().await;
}

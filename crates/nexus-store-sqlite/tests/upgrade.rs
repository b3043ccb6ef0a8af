//! Data directories written by earlier releases (migration 0001 only; 0001 and 0002) open with this
//! one, and what they held keeps working.

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

/// 0003 rebuilds the device queue (command ids become unique per tenant): queued rows keep their
/// seqs, the AUTOINCREMENT counter carries over (a seq a device has seen, even of a deleted row, is
/// never handed out again), and rows queued by the old API, which have no command record, are kept
/// but never delivered.
#[tokio::test]
async fn the_command_queue_keeps_its_rows_and_seqs_across_0003() {
    use nexus_domain::approval::{CommandRecord, CommandStatus};
    use nexus_domain::command::{ClientContext, CommandPolicy, DeviceCommand, Risk};
    use nexus_domain::{CommandId, SessionId, UserId};
    use nexus_store::Created;

    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("nexus.db");
    let old = tempfile::tempdir().expect("tempdir");
    for file in ["0001_core.sql", "0002_identity.sql"] {
        std::fs::copy(
            format!("{}/migrations/{file}", env!("CARGO_MANIFEST_DIR")),
            old.path().join(file),
        )
        .expect("copy migration");
    }
    let mut conn = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))
        .expect("options")
        .create_if_missing(true)
        .connect()
        .await
        .expect("connect");
    sqlx::migrate::Migrator::new(old.path())
        .await
        .expect("old migrator")
        .run(&mut conn)
        .await
        .expect("0001 and 0002");
    for seq in [41, 57] {
        sqlx::query(
            "INSERT INTO commands (seq, tenant, device_id, id, body, created_at)
             VALUES (?, 'alpha:web', 'dev_a', ?, '{}', 1)",
        )
        .bind(seq)
        .bind(format!("cmd_legacy{seq}"))
        .execute(&mut conn)
        .await
        .expect("legacy row");
    }
    // The newest row was deleted (its device was), but its seq was handed out.
    sqlx::query("DELETE FROM commands WHERE seq = 57")
        .execute(&mut conn)
        .await
        .expect("delete");
    conn.close().await.expect("close");

    let store = SqliteStore::open(&path, SqliteConfig::default())
        .await
        .expect("open applies 0003");
    let (tenant, device) = (
        TenantId::parse("alpha", "web").expect("tenant"),
        DeviceId::from_trusted("dev_a".into()),
    );
    let mut queued_ids = Vec::new();
    // The legacy id again in another tenant: ids are per tenant now.
    for (t, id) in [
        (tenant.clone(), CommandId::generate()),
        (
            TenantId::parse("beta", "web").expect("tenant"),
            CommandId::from_trusted("cmd_legacy41".into()),
        ),
    ] {
        let record = CommandRecord {
            id: id.clone(),
            tenant: t.clone(),
            device_id: device.clone(),
            command_type: "fs.read".into(),
            params: serde_json::json!({}),
            risk: Risk::Green,
            status: CommandStatus::Queued,
            session_id: SessionId::from_trusted("device:dev_a".into()),
            correlation_id: "c".into(),
            requested_by: UserId::from_trusted("usr_a".into()),
            requested_at: 2,
            request_hash: "h".into(),
            approval_id: None,
            replaces: None,
            attempt: 0,
            updated_at: 2,
            deadline: Some(60_000),
            result: None,
        };
        let body = DeviceCommand {
            command_id: id.clone(),
            command_type: "fs.read".into(),
            params: serde_json::json!({}),
            context: serde_json::Value::Null,
            client_context: ClientContext::default(),
            policy: CommandPolicy {
                risk: Risk::Green,
                approval_id: None,
            },
            created_at: "2026-01-01T00:00:00.000Z".into(),
            attempt: 0,
            run_before: None,
            approval: None,
        };
        let created = store
            .create_command(&record, None, Some(&body), &[])
            .await
            .expect("create");
        assert!(matches!(created, Created::New(_)));
        queued_ids.push((t, id));
    }
    let delivered = store
        .deliver_commands(&tenant, &device, 0, 100, 3, 60_000)
        .await
        .expect("deliver");
    assert_eq!(delivered.len(), 1, "the legacy rows have no record");
    assert_eq!(delivered[0].record.id, queued_ids[0].1);
    assert_eq!(delivered[0].seq, 58, "after every seq handed out before");
    store.close().await;

    let mut conn = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))
        .expect("options")
        .connect()
        .await
        .expect("connect");
    let seqs: Vec<i64> = sqlx::query_scalar("SELECT seq FROM commands ORDER BY seq")
        .fetch_all(&mut conn)
        .await
        .expect("seqs");
    assert_eq!(seqs, vec![41, 58, 59]);
    conn.close().await.expect("close");
}

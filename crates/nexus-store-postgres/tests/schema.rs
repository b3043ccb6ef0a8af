//! Start-up checks: a server refuses a database whose schema is not exactly the one it was built for.

mod common;

use common::TestDb;
use nexus_store::Store;
use nexus_store_postgres::{MIGRATOR, PostgresConfig, PostgresStore, SchemaError};
use sqlx::{Connection, PgConnection};

fn schema_error(result: anyhow::Result<PostgresStore>) -> SchemaError {
    match result {
        Ok(_) => panic!("expected a schema error"),
        Err(e) => match e.downcast::<SchemaError>() {
            Ok(schema) => schema,
            Err(other) => panic!("expected a schema error, got {other:#}"),
        },
    }
}

#[tokio::test]
async fn connect_refuses_a_database_that_was_never_migrated() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    let err = schema_error(PostgresStore::connect(&db.app_url(), PostgresConfig::default()).await);
    assert!(matches!(err, SchemaError::NotMigrated), "{err}");
    assert!(err.to_string().contains("nexus migrate"));
}

#[tokio::test]
async fn migrate_is_idempotent_and_connect_accepts_the_result() {
    let Some(db) = TestDb::migrated().await else {
        return;
    };
    PostgresStore::migrate(&db.owner_url()).await.unwrap();
    let store = db.store(PostgresConfig::default()).await;
    store.close().await;
}

#[tokio::test]
async fn connect_and_migrate_refuse_a_newer_schema() {
    let Some(db) = TestDb::migrated().await else {
        return;
    };
    let newest = MIGRATOR.iter().map(|m| m.version).max().unwrap();
    let mut owner = PgConnection::connect(&db.owner_url()).await.unwrap();
    sqlx::query(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time)
         VALUES ($1, 'from the future', true, '\\x00', 0)",
    )
    .bind(newest + 1)
    .execute(&mut owner)
    .await
    .unwrap();

    let err = schema_error(PostgresStore::connect(&db.app_url(), PostgresConfig::default()).await);
    match &err {
        SchemaError::Newer { applied, known } => {
            assert_eq!((*applied, *known), (newest + 1, newest));
        }
        other => panic!("expected Newer, got {other}"),
    }
    assert!(err.to_string().contains("newer than this build"), "{err}");

    let migrated = PostgresStore::migrate(&db.owner_url()).await;
    let err = migrated.expect_err("migrate must not run on a newer schema");
    assert!(
        matches!(
            err.downcast_ref::<SchemaError>(),
            Some(SchemaError::Newer { .. })
        ),
        "{err:#}"
    );
}

#[tokio::test]
async fn connect_refuses_a_database_with_missing_migrations() {
    let Some(db) = TestDb::migrated().await else {
        return;
    };
    let mut owner = PgConnection::connect(&db.owner_url()).await.unwrap();
    sqlx::query("DELETE FROM _sqlx_migrations WHERE version = 1")
        .execute(&mut owner)
        .await
        .unwrap();
    let err = schema_error(PostgresStore::connect(&db.app_url(), PostgresConfig::default()).await);
    assert!(
        matches!(&err, SchemaError::Missing { missing } if missing == &vec![1]),
        "{err}"
    );
}

#[tokio::test]
async fn migrate_refuses_an_application_role_that_does_not_exist() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    let options = nexus_store_postgres::MigrateOptions {
        app_role: "nexus_no_such_role".into(),
    };
    let err = PostgresStore::migrate_with(&db.owner_url(), &options)
        .await
        .expect_err("unknown role");
    assert!(err.to_string().contains("does not exist"), "{err:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_superuser_may_own_the_schema() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    PostgresStore::migrate(&db.admin_url()).await.unwrap();
    let store = std::sync::Arc::new(db.store(PostgresConfig::default()).await);
    nexus_store_tests::pairing_lifecycle(store.clone()).await;
    nexus_store_tests::event_ids_are_gapless_per_session(store.clone()).await;
    store.close().await;
}

/// The token a device got before device tokens had expiries and refresh tokens.
const LEGACY_TOKEN: &str = "nxd_legacy";
/// What migration 0002 gives such tokens: 9999-12-31T23:59:59.999Z.
const LEGACY_EXPIRY: i64 = 253_402_300_799_999;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_paired_before_0002_keep_working_after_the_upgrade() {
    use nexus_domain::secret::SecretHash;
    use nexus_domain::{DeviceId, TenantId};

    let Some(db) = TestDb::create().await else {
        return;
    };
    // The schema as the previous release left it: migration 0001 only (the same file, so the same
    // checksum the full migrator expects).
    let old = tempfile::tempdir().unwrap();
    std::fs::copy(
        concat!(env!("CARGO_MANIFEST_DIR"), "/migrations/0001_core.sql"),
        old.path().join("0001_core.sql"),
    )
    .unwrap();
    let mut owner = PgConnection::connect(&db.owner_url()).await.unwrap();
    sqlx::migrate::Migrator::new(old.path())
        .await
        .unwrap()
        .run(&mut owner)
        .await
        .unwrap();
    let mut tx = owner.begin().await.unwrap();
    sqlx::query("SELECT set_config('nexus.tenant', 'alpha:web', true)")
        .execute(&mut *tx)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO devices (tenant, id, name, device_type, capabilities, paired_at)
         VALUES ('alpha:web', 'dev_legacy', 'pc', 'windows_companion', '[]', 1)",
    )
    .execute(&mut *tx)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO device_tokens (token_hash, tenant, device_id, created_at)
         VALUES ($1, 'alpha:web', 'dev_legacy', 1)",
    )
    .bind(SecretHash::of(LEGACY_TOKEN).as_str())
    .execute(&mut *tx)
    .await
    .unwrap();
    tx.commit().await.unwrap();
    owner.close().await.unwrap();

    PostgresStore::migrate(&db.owner_url()).await.unwrap();
    let store = db.store(PostgresConfig::default()).await;
    let credential = store
        .device_credential(&SecretHash::of(LEGACY_TOKEN))
        .await
        .unwrap()
        .expect("the legacy token still authenticates");
    assert_eq!(
        credential.device_id,
        DeviceId::from_trusted("dev_legacy".into())
    );
    assert_eq!(credential.tenant, TenantId::parse("alpha", "web").unwrap());
    assert_eq!(credential.expires_at, LEGACY_EXPIRY);
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_command_queue_keeps_its_rows_and_seqs_across_0003() {
    use nexus_domain::approval::{CommandRecord, CommandStatus};
    use nexus_domain::command::{ClientContext, CommandPolicy, DeviceCommand, Risk};
    use nexus_domain::{CommandId, DeviceId, SessionId, TenantId, UserId};
    use nexus_store::Created;

    let Some(db) = TestDb::create().await else {
        return;
    };
    // The schema as the previous release left it (0001 and 0002), with a command queued by the
    // old API: it has no command record.
    let old = tempfile::tempdir().unwrap();
    for file in ["0001_core.sql", "0002_identity.sql"] {
        std::fs::copy(
            format!("{}/migrations/{file}", env!("CARGO_MANIFEST_DIR")),
            old.path().join(file),
        )
        .unwrap();
    }
    let mut owner = PgConnection::connect(&db.owner_url()).await.unwrap();
    sqlx::migrate::Migrator::new(old.path())
        .await
        .unwrap()
        .run(&mut owner)
        .await
        .unwrap();
    let mut tx = owner.begin().await.unwrap();
    sqlx::query("SELECT set_config('nexus.tenant', 'alpha:web', true)")
        .execute(&mut *tx)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO command_queues (tenant, device_id, last_seq) VALUES ('alpha:web', 'dev_a', 3)",
    )
    .execute(&mut *tx)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO commands (tenant, device_id, seq, id, body, created_at)
         VALUES ('alpha:web', 'dev_a', 3, 'cmd_legacy', '{}', 1)",
    )
    .execute(&mut *tx)
    .await
    .unwrap();
    tx.commit().await.unwrap();
    owner.close().await.unwrap();

    PostgresStore::migrate(&db.owner_url()).await.unwrap();
    let store = db.store(PostgresConfig::default()).await;
    let device = DeviceId::from_trusted("dev_a".into());
    // A new command in the same queue, and the legacy id in another tenant (ids are per tenant).
    for (tenant, id) in [
        (
            TenantId::parse("alpha", "web").unwrap(),
            CommandId::generate(),
        ),
        (
            TenantId::parse("beta", "web").unwrap(),
            CommandId::from_trusted("cmd_legacy".into()),
        ),
    ] {
        let record = CommandRecord {
            id: id.clone(),
            tenant,
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
            command_id: id,
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
            .unwrap();
        assert!(matches!(created, Created::New(_)));
    }
    let alpha = TenantId::parse("alpha", "web").unwrap();
    let delivered = store
        .deliver_commands(&alpha, &device, 0, 100, 3, 60_000)
        .await
        .unwrap();
    assert_eq!(delivered.len(), 1, "the legacy row has no record");
    assert_eq!(delivered[0].seq, 4, "the queue's seqs continue");
    store.close().await;
}

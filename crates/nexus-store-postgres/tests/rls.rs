//! Row-level security: the database itself keeps tenants apart, even for a query that forgets its
//! tenant filter, and the application role cannot step around it.
#![allow(clippy::unwrap_used)]

mod common;

use common::TestDb;
use nexus_domain::approval::{
    Approval, ApprovalId, ApprovalStatus, CommandPolicySettings, CommandRecord, CommandStatus,
};
use nexus_domain::command::{ClientContext, CommandPolicy, DeviceCommand, Risk};
use nexus_domain::report::ValidatedReport;
use nexus_domain::secret::SecretHash;
use nexus_domain::time::now_millis;
use nexus_domain::{
    CommandId, DeviceId, Pairing, PairingCode, PairingId, PairingState, SessionId, TenantId, UserId,
};
use nexus_store::{Created, DeviceTokenHashes, NewDevice, Store};
use nexus_store_postgres::{PostgresConfig, PostgresStore};
use sqlx::{Connection, PgConnection};

/// Every table the application can reach that holds tenant data.
const TENANT_TABLES: [&str; 11] = [
    "pairings",
    "devices",
    "device_tokens",
    "command_queues",
    "commands",
    "sessions",
    "events",
    "session_devices",
    "command_records",
    "approvals",
    "command_policies",
];

/// The audit trail: keyed by scope (`org:project`, `org:*`, `*`) instead of tenant, under forced
/// row-level security on that key (see `migrations/0002_identity.sql`).
const SCOPE_TABLES: [&str; 2] = ["audit_heads", "audit_log"];

/// Control-plane data, read before a tenant is known (sign-in, membership checks): deliberately
/// without row-level security and without a tenant column (see `migrations/0002_identity.sql`).
const CONTROL_PLANE_TABLES: [&str; 8] = [
    "auth_sessions",
    "org_members",
    "orgs",
    "projects",
    "refresh_tokens",
    "stream_tickets",
    "user_recovery_codes",
    "users",
];

fn pending_pairing() -> Pairing {
    Pairing {
        id: PairingId::generate(),
        code: Some(PairingCode::generate()),
        tenant: None,
        device_name: "pc".into(),
        device_type: "windows_companion".into(),
        capabilities: vec![],
        nonce_hash: SecretHash::of("nonce"),
        state: PairingState::Pending,
        device_id: None,
        created_at: now_millis(),
        expires_at: now_millis() + 60_000,
        client_ip: None,
        agent_version: None,
    }
}

/// Pairs a device into `tenant`, queues `commands` commands for it and pushes `events` reports.
async fn populate(
    store: &PostgresStore,
    tenant: &TenantId,
    token: &str,
    commands: usize,
    events: usize,
) {
    let pairing = pending_pairing();
    store
        .create_pairing(&pairing, now_millis(), &[])
        .await
        .unwrap();
    let device = DeviceId::generate();
    assert!(
        store
            .confirm_pairing(&pairing.id, tenant, &device, &[])
            .await
            .unwrap()
    );
    let new_device = NewDevice {
        id: device.clone(),
        tenant: tenant.clone(),
        name: "pc".into(),
        device_type: "windows_companion".into(),
        capabilities: vec![],
        tokens: DeviceTokenHashes {
            access_hash: SecretHash::of(token),
            access_expires_at: now_millis() + 60_000,
            refresh_hash: SecretHash::of(&format!("{token}-refresh")),
            refresh_expires_at: now_millis() + 60_000,
        },
        paired_at: now_millis(),
    };
    assert!(
        store
            .complete_pairing(&pairing.id, &new_device, &[])
            .await
            .unwrap()
    );
    // `commands` runnable commands (queued) and one waiting for approval (already due to expire).
    for i in 0..=commands {
        let needs_approval = i == commands;
        let now = now_millis();
        let record = CommandRecord {
            id: CommandId::generate(),
            tenant: tenant.clone(),
            device_id: device.clone(),
            command_type: if needs_approval {
                "shell.exec"
            } else {
                "fs.read"
            }
            .into(),
            params: serde_json::json!({}),
            risk: if needs_approval {
                Risk::Red
            } else {
                Risk::Green
            },
            status: if needs_approval {
                CommandStatus::PendingApproval
            } else {
                CommandStatus::Queued
            },
            session_id: SessionId::from_trusted(format!("device:{device}")),
            correlation_id: "c".into(),
            requested_by: UserId::from_trusted("usr_a".into()),
            requested_at: now,
            request_hash: "h".into(),
            approval_id: needs_approval.then(ApprovalId::generate),
            replaces: None,
            attempt: 0,
            updated_at: now,
            deadline: (!needs_approval).then_some(now + 60_000),
            result: None,
        };
        let approval = record.approval_id.clone().map(|id| Approval {
            id,
            tenant: tenant.clone(),
            command_id: record.id.clone(),
            device_id: device.clone(),
            command_type: record.command_type.clone(),
            risk: record.risk,
            summary: "shell.exec".into(),
            requested_by: record.requested_by.clone(),
            requested_at: now,
            expires_at: now - 1,
            status: ApprovalStatus::Pending,
            decided_by: None,
            decided_at: None,
            reason: None,
        });
        let queue = (!needs_approval).then(|| DeviceCommand {
            command_id: record.id.clone(),
            command_type: record.command_type.clone(),
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
        });
        let created = store
            .create_command(&record, approval.as_ref(), queue.as_ref(), &[])
            .await
            .unwrap();
        assert!(matches!(created, Created::New(_)));
    }
    store
        .put_command_policy(tenant, &CommandPolicySettings::default(), now_millis(), &[])
        .await
        .unwrap();
    let reports: Vec<_> = (0..events)
        .map(|i| {
            ValidatedReport::parse(&serde_json::json!({"meta": {
                "report_id": format!("r{i}"), "created_at": "t", "session_id": "s1"}}))
            .unwrap()
        })
        .collect();
    store
        .append_reports(tenant, Some(&device), &reports, now_millis())
        .await
        .unwrap();
}

async fn count(conn: &mut PgConnection, table: &str) -> i64 {
    // Deliberately no tenant filter: only row-level security stands between tenants here.
    sqlx::query_scalar(&format!("SELECT count(*) FROM {table}"))
        .fetch_one(&mut *conn)
        .await
        .unwrap()
}

async fn counts_as(conn: &mut PgConnection, tenant: Option<&TenantId>) -> Vec<(String, i64)> {
    let mut tx = conn.begin().await.unwrap();
    if let Some(tenant) = tenant {
        sqlx::query("SELECT set_config('nexus.tenant', $1, true)")
            .bind(tenant.to_string())
            .execute(&mut *tx)
            .await
            .unwrap();
    }
    let mut out = Vec::new();
    for table in TENANT_TABLES {
        out.push((table.to_owned(), count(&mut tx, table).await));
    }
    tx.commit().await.unwrap();
    out
}

fn expect(pairs: [(&str, i64); 11]) -> Vec<(String, i64)> {
    pairs.iter().map(|(t, n)| ((*t).to_owned(), *n)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_without_tenant_filter_sees_only_the_current_tenant() {
    let Some(db) = TestDb::migrated().await else {
        return;
    };
    let store = db.store(PostgresConfig::default()).await;
    let (a, b) = (
        TenantId::parse("alpha", "p").unwrap(),
        TenantId::parse("beta", "p").unwrap(),
    );
    populate(&store, &a, "token-a", 2, 3).await;
    populate(&store, &b, "token-b", 5, 7).await;
    // A pending pairing belongs to no tenant yet.
    let pending = pending_pairing();
    store
        .create_pairing(&pending, now_millis(), &[])
        .await
        .unwrap();

    let mut app = PgConnection::connect(&db.app_url()).await.unwrap();
    assert_eq!(
        counts_as(&mut app, Some(&a)).await,
        expect([
            ("pairings", 1),
            ("devices", 1),
            ("device_tokens", 2),
            ("command_queues", 1),
            ("commands", 2),
            ("sessions", 1),
            ("events", 3),
            ("session_devices", 1),
            ("command_records", 3),
            ("approvals", 1),
            ("command_policies", 1),
        ])
    );
    assert_eq!(
        counts_as(&mut app, Some(&b)).await,
        expect([
            ("pairings", 1),
            ("devices", 1),
            ("device_tokens", 2),
            ("command_queues", 1),
            ("commands", 5),
            ("sessions", 1),
            ("events", 7),
            ("session_devices", 1),
            ("command_records", 6),
            ("approvals", 1),
            ("command_policies", 1),
        ])
    );
    let nothing = expect(TENANT_TABLES.map(|t| (t, 0)));
    // No tenant set, on a connection that had one set a moment ago (SET LOCAL ended with the
    // transaction) ...
    assert_eq!(counts_as(&mut app, None).await, nothing);
    // ... and outside any explicit transaction, on a brand-new connection.
    let mut fresh = PgConnection::connect(&db.app_url()).await.unwrap();
    for table in TENANT_TABLES {
        assert_eq!(
            count(&mut fresh, table).await,
            0,
            "{table} without a tenant"
        );
    }

    // Writing into another tenant is refused, not just filtered.
    let mut tx = app.begin().await.unwrap();
    sqlx::query("SELECT set_config('nexus.tenant', $1, true)")
        .bind(a.to_string())
        .execute(&mut *tx)
        .await
        .unwrap();
    let smuggled = sqlx::query(
        "INSERT INTO events (tenant, session_id, event_id, report_id, data, created_at)
         VALUES ($1, 's1', 99, 'x', '{}', 0)",
    )
    .bind(b.to_string())
    .execute(&mut *tx)
    .await;
    assert!(
        smuggled.is_err(),
        "inserting a row of another tenant must fail"
    );
    drop(tx);
    let mut tx = app.begin().await.unwrap();
    sqlx::query("SELECT set_config('nexus.tenant', $1, true)")
        .bind(a.to_string())
        .execute(&mut *tx)
        .await
        .unwrap();
    let moved = sqlx::query("UPDATE events SET tenant = $1")
        .bind(b.to_string())
        .execute(&mut *tx)
        .await;
    assert!(moved.is_err(), "moving rows to another tenant must fail");
    drop(tx);

    // The pre-tenant lookups work, but only by their exact key.
    let found: Option<String> =
        sqlx::query_scalar("SELECT tenant FROM nexus_device_credential($1)")
            .bind(SecretHash::of("token-b").as_str())
            .fetch_optional(&mut app)
            .await
            .unwrap();
    assert_eq!(found, Some(b.to_string()));
    let by_code: Option<String> = sqlx::query_scalar("SELECT id FROM nexus_pairing_by_code($1)")
        .bind(pending.code.as_ref().unwrap().as_str())
        .fetch_optional(&mut app)
        .await
        .unwrap();
    assert_eq!(by_code.as_deref(), Some(pending.id.as_str()));
    // The sweeper's cross-tenant reads answer keys of due items only, of every tenant.
    let mut due: Vec<String> =
        sqlx::query_scalar("SELECT tenant FROM nexus_due_approvals($1, 100)")
            .bind(now_millis())
            .fetch_all(&mut app)
            .await
            .unwrap();
    due.sort();
    assert_eq!(due, vec![a.to_string(), b.to_string()]);
    let columns: i64 =
        sqlx::query_scalar("SELECT count(*) FROM (SELECT * FROM nexus_due_commands($1, 100)) d")
            .bind(now_millis() + 120_000)
            .fetch_one(&mut app)
            .await
            .unwrap();
    assert_eq!(
        columns, 7,
        "every queued command is past its deadline by then"
    );
    let not_yet: i64 =
        sqlx::query_scalar("SELECT count(*) FROM (SELECT * FROM nexus_due_commands($1, 100)) d")
            .bind(0_i64)
            .fetch_one(&mut app)
            .await
            .unwrap();
    assert_eq!(not_yet, 0);

    // TRUNCATE ignores row-level security, so the application role must not have it.
    let truncated = sqlx::query("TRUNCATE events").execute(&mut app).await;
    assert!(truncated.is_err(), "the application role cannot TRUNCATE");
    store.close().await;
}

#[tokio::test]
async fn the_application_role_cannot_bypass_row_level_security() {
    let Some(db) = TestDb::migrated().await else {
        return;
    };
    let mut app = PgConnection::connect(&db.app_url()).await.unwrap();
    let (superuser, bypass): (bool, bool) =
        sqlx::query_as("SELECT rolsuper, rolbypassrls FROM pg_roles WHERE rolname = current_user")
            .fetch_one(&mut app)
            .await
            .unwrap();
    assert!(!superuser, "the application role is not a superuser");
    assert!(!bypass, "the application role has no BYPASSRLS");

    // Every table in the schema (but the migration history) is classified: tenant data and the
    // audit trail are under forced RLS, control-plane tables are not; none is owned by the
    // application role. A table added later without a classification fails here.
    let tables: Vec<(String, bool, bool, bool, bool, bool)> = sqlx::query_as(
        "SELECT c.relname::text, c.relrowsecurity, c.relforcerowsecurity,
                pg_has_role(current_user, c.relowner, 'MEMBER'),
                EXISTS (SELECT 1 FROM pg_attribute a
                        WHERE a.attrelid = c.oid AND a.attname = 'tenant' AND NOT a.attisdropped),
                EXISTS (SELECT 1 FROM pg_attribute a
                        WHERE a.attrelid = c.oid AND a.attname = 'scope' AND NOT a.attisdropped)
         FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p') AND c.relname <> '_sqlx_migrations'
         ORDER BY 1",
    )
    .fetch_all(&mut app)
    .await
    .unwrap();
    let mut names: Vec<&str> = tables.iter().map(|t| t.0.as_str()).collect();
    let mut expected: Vec<&str> = TENANT_TABLES
        .iter()
        .chain(&SCOPE_TABLES)
        .chain(&CONTROL_PLANE_TABLES)
        .copied()
        .collect();
    names.sort_unstable();
    expected.sort_unstable();
    assert_eq!(names, expected);
    for (table, rls, forced, owns, has_tenant, has_scope) in &tables {
        assert!(!*owns, "{table}: not owned by the application role");
        if TENANT_TABLES.contains(&table.as_str()) {
            assert!(
                *rls && *forced,
                "{table}: row-level security enabled and forced"
            );
            assert!(*has_tenant, "{table}: has a tenant column");
        } else if SCOPE_TABLES.contains(&table.as_str()) {
            assert!(
                *rls && *forced,
                "{table}: row-level security enabled and forced"
            );
            assert!(*has_scope, "{table}: has a scope column");
        } else {
            assert!(
                !*rls,
                "{table}: control-plane data is read before any tenant"
            );
        }
    }
    for (policy, count) in [
        ("tenant_isolation", TENANT_TABLES.len()),
        ("scope_isolation", SCOPE_TABLES.len()),
    ] {
        let policies: i64 = sqlx::query_scalar(
            "SELECT count(DISTINCT tablename) FROM pg_policies
             WHERE schemaname = 'public' AND policyname = $1
               AND qual LIKE '%current_setting(''nexus.tenant''::text, true)%'",
        )
        .bind(policy)
        .fetch_one(&mut app)
        .await
        .unwrap();
        assert_eq!(policies, count as i64, "{policy}");
    }
}

#[tokio::test]
async fn connect_refuses_a_role_that_bypasses_row_level_security() {
    let Some(db) = TestDb::migrated().await else {
        return;
    };
    for url in [db.owner_url(), db.admin_url()] {
        let err = match PostgresStore::connect(&url, PostgresConfig::default()).await {
            Ok(_) => panic!("connecting as a privileged role must be refused"),
            Err(e) => e,
        };
        assert!(
            matches!(
                err.downcast_ref::<nexus_store_postgres::SchemaError>(),
                Some(nexus_store_postgres::SchemaError::PrivilegedRole { .. })
            ),
            "{err:#}"
        );
    }
    let allowed = PostgresConfig {
        allow_privileged_role: true,
        ..PostgresConfig::default()
    };
    let store = PostgresStore::connect(&db.owner_url(), allowed)
        .await
        .unwrap();
    store.close().await;
}

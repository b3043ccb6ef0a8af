//! The storage conformance suite: every case is written once against `dyn Store` and run for
//! every backend through [`conformance_tests!`], so the backends cannot drift apart.

use std::collections::HashSet;
use std::sync::Arc;

use nexus_domain::audit::{
    Actor, ActorType, AuditEntry, AuditRecord, AuditResult, AuditScope, AuditTarget, GENESIS_HASH,
    verify_chain,
};
use nexus_domain::command::{ClientContext, CommandPolicy, DeviceCommand, NewCommand, Risk};
use nexus_domain::identity::{AuthSession, AuthSessionId, StreamTicket, TotpState};
use nexus_domain::report::ValidatedReport;
use nexus_domain::secret::SecretHash;
use nexus_domain::time::{Millis, now_millis};
use nexus_domain::{
    CommandId, DeviceId, Email, Org, OrgId, Pairing, PairingCode, PairingId, PairingState, Project,
    ProjectId, Role, SessionId, TenantId, User, UserId,
};
use nexus_store::{
    AuditQuery, DeviceCredential, DeviceTokenHashes, Heartbeat, NewDevice, RefreshOutcome, Store,
    StoreError,
};
use serde_json::json;

pub type DynStore = Arc<dyn Store>;

/// Generates one `#[tokio::test]` per conformance case, each with a fresh store from `$factory`
/// (an async fn returning `(DynStore, guard)`; the guard keeps temporary resources alive).
///
/// `conformance_tests!(optional $factory)` is for backends that need an external server: the
/// factory returns `Option<(DynStore, guard)>`, and `None` (which it may only answer when the
/// operator explicitly asked to skip that backend) ends the case without running it.
#[macro_export]
macro_rules! conformance_tests {
    (@list $mode:ident $factory:path) => {
        $crate::conformance_tests!(@cases $mode $factory;
            pairing_lifecycle, live_codes_are_unique_and_released_on_expiry, heartbeat_is_tenant_scoped,
            command_queue_cursor_and_ack, event_ids_are_gapless_per_session, duplicate_report_ids_are_idempotent,
            concurrent_appends_never_share_or_skip_ids, event_reads_are_tenant_scoped, session_devices_are_tracked,
            one_request_spans_sessions, concurrent_duplicates_are_stored_once, concurrent_enqueues_keep_seqs_distinct_and_ordered, deleting_a_device_revokes_it,
            pairing_stores_client_details, renaming_a_device, device_tokens_rotate_detect_reuse_and_revoke,
            concurrent_device_token_rotations_rotate_once, audit_is_written_with_the_change_and_not_for_a_no_op,
            failed_changes_write_no_audit, concurrent_audit_appends_never_fork_a_chain, audit_queries_filter_and_page_newest_first,
            orgs_projects_and_members, users_create_lookup_and_password, login_failures_are_counted_and_cleared,
            totp_steps_are_accepted_once, concurrent_totp_step_is_accepted_once, recovery_codes_are_single_use,
            refresh_tokens_rotate_and_detect_reuse, concurrent_refresh_rotations_rotate_once, refresh_fails_for_revoked_or_expired_sessions,
            revoking_all_sessions_keeps_the_current_one, stream_tickets_are_single_use_and_expire);
    };
    (@cases required $factory:path; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let (store, _guard) = $factory().await;
                $crate::$case(store.clone()).await;
                store.close().await;
            }
        )*
    };
    (@cases optional $factory:path; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let Some((store, _guard)) = $factory().await else {
                    return;
                };
                $crate::$case(store.clone()).await;
                store.close().await;
            }
        )*
    };
    (optional $factory:path) => {
        $crate::conformance_tests!(@list optional $factory);
    };
    ($factory:path) => {
        $crate::conformance_tests!(@list required $factory);
    };
}

fn tenant(name: &str) -> TenantId {
    TenantId::parse(name, "proj").expect("valid tenant")
}

fn unique(prefix: &str) -> String {
    format!(
        "{prefix}{}",
        DeviceId::generate().as_str().trim_start_matches("dev_")
    )
}

fn pairing(code: &str, expires_at: i64) -> Pairing {
    Pairing {
        id: PairingId::generate(),
        code: Some(PairingCode::parse(code).expect("valid code")),
        tenant: None,
        device_name: "pc".into(),
        device_type: "windows_companion".into(),
        capabilities: vec!["fs.read".into()],
        nonce_hash: SecretHash::of("nonce"),
        state: PairingState::Pending,
        device_id: None,
        created_at: now_millis(),
        expires_at,
        client_ip: None,
        agent_version: None,
    }
}

fn report(session: &str, report_id: &str) -> ValidatedReport {
    ValidatedReport::parse(&json!({"meta": {"report_id": report_id, "created_at": "2026-02-03T10:00:00+0900", "session_id": session}}))
        .expect("valid report")
}

/// A fresh token pair (hashes) whose tokens expire at the given times.
fn token_pair(access_expires_at: Millis, refresh_expires_at: Millis) -> DeviceTokenHashes {
    DeviceTokenHashes {
        access_hash: SecretHash::of(&unique("nxd_")),
        access_expires_at,
        refresh_hash: SecretHash::of(&unique("nxr_")),
        refresh_expires_at,
    }
}

/// Pairs a device directly through the store; returns it with its token pair.
async fn paired_device_with_tokens(
    store: &DynStore,
    tenant: &TenantId,
) -> (DeviceId, DeviceTokenHashes) {
    let tokens = token_pair(now_millis() + 3_600_000, now_millis() + 86_400_000);
    let p = pairing(PairingCode::generate().as_str(), now_millis() + 60_000);
    store
        .create_pairing(&p, now_millis(), &[])
        .await
        .expect("create");
    let device_id = DeviceId::generate();
    assert!(
        store
            .confirm_pairing(&p.id, tenant, &device_id, &[])
            .await
            .expect("confirm")
    );
    let device = NewDevice {
        id: device_id.clone(),
        tenant: tenant.clone(),
        name: "pc".into(),
        device_type: "windows_companion".into(),
        capabilities: vec![],
        tokens: tokens.clone(),
        paired_at: now_millis(),
    };
    assert!(
        store
            .complete_pairing(&p.id, &device, &[])
            .await
            .expect("complete")
    );
    (device_id, tokens)
}

async fn paired_device(store: &DynStore, tenant: &TenantId) -> DeviceId {
    paired_device_with_tokens(store, tenant).await.0
}

pub async fn pairing_lifecycle(store: DynStore) {
    let t = tenant(&unique("org"));
    let p = pairing("111-222", now_millis() + 60_000);
    store
        .create_pairing(&p, now_millis(), &[])
        .await
        .expect("create");
    let by_code = store
        .pairing_by_code(p.code.as_ref().expect("code"))
        .await
        .expect("read")
        .expect("found");
    assert_eq!(by_code.id, p.id);
    assert_eq!(by_code.state, PairingState::Pending);
    assert_eq!(by_code.capabilities, vec!["fs.read".to_string()]);

    let device_id = DeviceId::generate();
    assert!(
        store
            .confirm_pairing(&p.id, &t, &device_id, &[])
            .await
            .expect("confirm")
    );
    assert!(
        !store
            .confirm_pairing(&p.id, &t, &DeviceId::generate(), &[])
            .await
            .expect("second confirm")
    );
    let confirmed = store.pairing(&p.id).await.expect("read").expect("found");
    assert_eq!(confirmed.state, PairingState::Confirmed);
    assert_eq!(confirmed.tenant.as_ref(), Some(&t));
    assert_eq!(confirmed.device_id.as_ref(), Some(&device_id));

    let tokens = token_pair(now_millis() + 3_600_000, now_millis() + 86_400_000);
    let token_hash = tokens.access_hash.clone();
    let device = NewDevice {
        id: device_id.clone(),
        tenant: t.clone(),
        name: "pc".into(),
        device_type: "windows_companion".into(),
        capabilities: vec!["fs.read".into()],
        tokens: tokens.clone(),
        paired_at: now_millis(),
    };
    assert!(
        store
            .complete_pairing(&p.id, &device, &[])
            .await
            .expect("complete")
    );
    assert!(
        !store
            .complete_pairing(&p.id, &device, &[])
            .await
            .expect("second complete"),
        "credentials are claimed once"
    );
    let completed = store.pairing(&p.id).await.expect("read").expect("found");
    assert_eq!(completed.state, PairingState::Completed);
    assert_eq!(
        completed.code, None,
        "a completed pairing releases its code"
    );

    let cred = store
        .device_credential(&token_hash)
        .await
        .expect("read")
        .expect("credential");
    assert_eq!(cred.device_id, device_id);
    assert_eq!(cred.tenant, t);
    assert_eq!(cred.expires_at, tokens.access_expires_at);
    assert!(
        store
            .device_credential(&SecretHash::of("other"))
            .await
            .expect("read")
            .is_none()
    );
    assert!(
        store
            .device_credential(&tokens.refresh_hash)
            .await
            .expect("read")
            .is_none(),
        "a refresh token is not an access token"
    );
    let stored = store
        .device(&t, &device_id)
        .await
        .expect("read")
        .expect("device");
    assert_eq!(stored.name, "pc");
    assert_eq!(store.list_devices(&t).await.expect("list").len(), 1);
}

pub async fn live_codes_are_unique_and_released_on_expiry(store: DynStore) {
    let now = now_millis();
    let live = pairing("333-444", now + 60_000);
    store.create_pairing(&live, now, &[]).await.expect("create");
    let clash = pairing("333-444", now + 60_000);
    assert!(matches!(
        store.create_pairing(&clash, now, &[]).await,
        Err(StoreError::Conflict(_))
    ));

    let expired = pairing("555-666", now - 1);
    store
        .create_pairing(&expired, now - 10, &[])
        .await
        .expect("create expired");
    let reuse = pairing("555-666", now + 60_000);
    store
        .create_pairing(&reuse, now, &[])
        .await
        .expect("an expired code is free again");
    let holder = store
        .pairing_by_code(&PairingCode::parse("555-666").expect("code"))
        .await
        .expect("read")
        .expect("found");
    assert_eq!(holder.id, reuse.id);
    assert_eq!(
        store
            .pairing(&expired.id)
            .await
            .expect("read")
            .expect("kept")
            .code,
        None
    );
}

pub async fn heartbeat_is_tenant_scoped(store: DynStore) {
    let t = tenant(&unique("org"));
    let device = paired_device(&store, &t).await;
    let hb = Heartbeat {
        status: "online".into(),
        metrics: json!({"cpu": 0.5}),
        agent_version: Some("2.1.0".into()),
        at: now_millis(),
    };
    assert!(store.record_heartbeat(&t, &device, &hb).await.expect("hb"));
    assert!(
        !store
            .record_heartbeat(&tenant(&unique("other")), &device, &hb)
            .await
            .expect("hb")
    );
    assert!(
        !store
            .record_heartbeat(&t, &DeviceId::generate(), &hb)
            .await
            .expect("hb")
    );
    let d = store
        .device(&t, &device)
        .await
        .expect("read")
        .expect("device");
    assert_eq!(d.last_heartbeat_at, Some(hb.at));
    assert_eq!(d.reported_status.as_deref(), Some("online"));
    assert_eq!(d.agent_version.as_deref(), Some("2.1.0"));
    assert_eq!(d.metrics, json!({"cpu": 0.5}));
    assert!(
        store
            .device(&tenant(&unique("other")), &device)
            .await
            .expect("read")
            .is_none()
    );
}

fn command(t: &TenantId, device: &DeviceId, kind: &str) -> NewCommand {
    let id = CommandId::generate();
    NewCommand {
        id: id.clone(),
        tenant: t.clone(),
        device_id: device.clone(),
        command: DeviceCommand {
            command_id: id,
            command_type: kind.into(),
            params: json!({"path": "/tmp"}),
            context: serde_json::Value::Null,
            client_context: ClientContext::default(),
            policy: CommandPolicy {
                risk: Risk::Green,
                approval_id: None,
            },
            created_at: "2026-01-01T00:00:00.000Z".into(),
        },
    }
}

pub async fn command_queue_cursor_and_ack(store: DynStore) {
    let t = tenant(&unique("org"));
    let device = paired_device(&store, &t).await;
    let mut queued = Vec::new();
    for kind in ["fs.read", "fs.list", "shell.exec"] {
        queued.push(
            store
                .enqueue_command(&command(&t, &device, kind), now_millis())
                .await
                .expect("enqueue"),
        );
    }
    assert!(queued.windows(2).all(|w| w[0].seq < w[1].seq));
    let all = store
        .pending_commands(&t, &device, 0, 100)
        .await
        .expect("pending");
    assert_eq!(all, queued);
    let after_first = store
        .pending_commands(&t, &device, queued[0].seq, 100)
        .await
        .expect("pending");
    assert_eq!(after_first.len(), 2);
    assert_eq!(
        store
            .pending_commands(&t, &device, 0, 1)
            .await
            .expect("pending")
            .len(),
        1
    );

    let first = &queued[0].command.command_id;
    assert!(
        store
            .ack_command(&t, &device, first, now_millis())
            .await
            .expect("ack")
    );
    assert!(
        store
            .ack_command(&t, &device, first, now_millis())
            .await
            .expect("ack is idempotent")
    );
    assert!(
        !store
            .ack_command(&t, &device, &CommandId::generate(), now_millis())
            .await
            .expect("ack unknown")
    );
    assert!(
        !store
            .ack_command(&tenant(&unique("x")), &device, first, now_millis())
            .await
            .expect("ack cross-tenant")
    );
    let pending = store
        .pending_commands(&t, &device, 0, 100)
        .await
        .expect("pending");
    assert_eq!(pending.len(), 2);
    assert!(pending.iter().all(|c| &c.command.command_id != first));
    assert!(
        store
            .pending_commands(&tenant(&unique("x")), &device, 0, 100)
            .await
            .expect("pending")
            .is_empty()
    );
}

pub async fn event_ids_are_gapless_per_session(store: DynStore) {
    let t = tenant(&unique("org"));
    let batch: Vec<_> = (0..5).map(|i| report("a", &format!("r{i}"))).collect();
    let out = store
        .append_reports(&t, None, &batch, now_millis())
        .await
        .expect("append");
    assert_eq!(
        out.iter().map(|e| e.event.event_id).collect::<Vec<_>>(),
        vec![1, 2, 3, 4, 5]
    );
    let other = store
        .append_reports(&t, None, &[report("b", "r0")], now_millis())
        .await
        .expect("append");
    assert_eq!(other[0].event.event_id, 1, "sessions count independently");
    let more = store
        .append_reports(&t, None, &[report("a", "r9")], now_millis())
        .await
        .expect("append");
    assert_eq!(more[0].event.event_id, 6);
    let data: serde_json::Value = serde_json::from_str(&more[0].event.data).expect("json");
    assert_eq!(data["meta"]["event_id"], 6);
    assert_eq!(data["meta"]["tenant"], t.to_string());
    assert_eq!(
        store
            .last_event_id(&t, &SessionId::parse("s", "a").expect("s"))
            .await
            .expect("last"),
        6
    );
}

pub async fn duplicate_report_ids_are_idempotent(store: DynStore) {
    let t = tenant(&unique("org"));
    let first = store
        .append_reports(&t, None, &[report("s", "same")], now_millis())
        .await
        .expect("append");
    let again = store
        .append_reports(
            &t,
            None,
            &[report("s", "same"), report("s", "new"), report("s", "new")],
            now_millis(),
        )
        .await
        .expect("append");
    assert!(!first[0].duplicate);
    assert!(again[0].duplicate);
    assert_eq!(again[0].event.event_id, first[0].event.event_id);
    assert!(!again[1].duplicate);
    assert_eq!(again[1].event.event_id, 2);
    assert!(
        again[2].duplicate,
        "a repeat inside one request is deduplicated too"
    );
    assert_eq!(again[2].event.event_id, 2);
    let session = SessionId::parse("s", "s").expect("s");
    assert_eq!(
        store
            .events_after(&t, &session, 0, 100)
            .await
            .expect("read")
            .len(),
        2
    );
}

pub async fn concurrent_appends_never_share_or_skip_ids(store: DynStore) {
    let t = tenant(&unique("org"));
    let mut tasks = Vec::new();
    for publisher in 0..8 {
        let (store, t) = (store.clone(), t.clone());
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for i in 0..25 {
                let out = store
                    .append_reports(
                        &t,
                        None,
                        &[report("c", &format!("p{publisher}-{i}"))],
                        now_millis(),
                    )
                    .await
                    .expect("append");
                ids.push(out[0].event.event_id);
            }
            ids
        }));
    }
    let mut all = HashSet::new();
    for task in futures::future::join_all(tasks).await {
        let ids = task.expect("task");
        assert!(
            ids.windows(2).all(|w| w[0] < w[1]),
            "a publisher's own ids increase"
        );
        all.extend(ids);
    }
    assert_eq!(all, (1..=200).collect::<HashSet<u64>>());
}

pub async fn event_reads_are_tenant_scoped(store: DynStore) {
    let (t1, t2) = (tenant(&unique("one")), tenant(&unique("two")));
    let session = SessionId::parse("s", "shared-name").expect("s");
    for i in 0..4 {
        store
            .append_reports(
                &t1,
                None,
                &[report("shared-name", &format!("r{i}"))],
                now_millis(),
            )
            .await
            .expect("append");
    }
    assert_eq!(
        store
            .events_after(&t1, &session, 0, 100)
            .await
            .expect("read")
            .len(),
        4
    );
    assert_eq!(
        store
            .events_after(&t1, &session, 2, 100)
            .await
            .expect("read")
            .iter()
            .map(|e| e.event_id)
            .collect::<Vec<_>>(),
        vec![3, 4]
    );
    assert_eq!(
        store
            .events_after(&t1, &session, 0, 3)
            .await
            .expect("read")
            .len(),
        3
    );
    assert!(
        store
            .events_after(&t2, &session, 0, 100)
            .await
            .expect("read")
            .is_empty()
    );
    assert_eq!(store.last_event_id(&t2, &session).await.expect("last"), 0);
    assert!(
        store
            .latest_event(&t2, &session, u64::MAX)
            .await
            .expect("latest")
            .is_none()
    );
    assert_eq!(
        store
            .latest_event(&t1, &session, 3)
            .await
            .expect("latest")
            .expect("found")
            .event_id,
        3
    );
    assert_eq!(
        store
            .latest_event(&t1, &session, u64::MAX)
            .await
            .expect("latest")
            .expect("found")
            .event_id,
        4
    );
}

pub async fn session_devices_are_tracked(store: DynStore) {
    let t = tenant(&unique("org"));
    let (d1, d2) = (
        paired_device(&store, &t).await,
        paired_device(&store, &t).await,
    );
    store
        .append_reports(&t, Some(&d1), &[report("sd", "a")], now_millis())
        .await
        .expect("append");
    store
        .append_reports(&t, Some(&d2), &[report("sd", "b")], now_millis() + 5)
        .await
        .expect("append");
    store
        .append_reports(&t, Some(&d2), &[report("elsewhere", "c")], now_millis())
        .await
        .expect("append");
    let session = SessionId::parse("s", "sd").expect("s");
    let devices = store.session_devices(&t, &session).await.expect("read");
    assert_eq!(
        devices.iter().map(|d| d.id.clone()).collect::<Vec<_>>(),
        vec![d2, d1]
    );
    assert!(
        store
            .session_devices(&tenant(&unique("x")), &session)
            .await
            .expect("read")
            .is_empty()
    );
}

pub async fn one_request_spans_sessions(store: DynStore) {
    let t = tenant(&unique("org"));
    store
        .append_reports(&t, None, &[report("y", "r0")], now_millis())
        .await
        .expect("append");
    let out = store
        .append_reports(
            &t,
            None,
            &[
                report("x", "r1"),
                report("y", "r1"),
                report("x", "r2"),
                report("y", "r0"),
                report("x", "r1"),
            ],
            now_millis(),
        )
        .await
        .expect("append");
    let got: Vec<(String, u64, bool)> = out
        .iter()
        .map(|e| {
            (
                e.event.session_id.as_str().to_owned(),
                e.event.event_id,
                e.duplicate,
            )
        })
        .collect();
    let want: Vec<(String, u64, bool)> = vec![
        ("x".into(), 1, false),
        ("y".into(), 2, false),
        ("x".into(), 2, false),
        ("y".into(), 1, true),
        ("x".into(), 1, true),
    ];
    assert_eq!(got, want);
    for (session, last) in [("x", 2), ("y", 2)] {
        let session = SessionId::parse("s", session).expect("s");
        assert_eq!(store.last_event_id(&t, &session).await.expect("last"), last);
        let ids: Vec<u64> = store
            .events_after(&t, &session, 0, 100)
            .await
            .expect("read")
            .iter()
            .map(|e| e.event_id)
            .collect();
        assert_eq!(ids, (1..=last).collect::<Vec<u64>>());
    }
}

/// Clients retry pushes they did not see answered, so the same report ids can arrive concurrently.
pub async fn concurrent_duplicates_are_stored_once(store: DynStore) {
    let t = tenant(&unique("org"));
    let mut tasks = Vec::new();
    for _ in 0..6 {
        let (store, t) = (store.clone(), t.clone());
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            for i in 0..10 {
                let batch = [
                    report("dup", &format!("r{i}")),
                    report("dup", &format!("r{}", i + 1)),
                ];
                out.extend(
                    store
                        .append_reports(&t, None, &batch, now_millis())
                        .await
                        .expect("append"),
                );
            }
            out
        }));
    }
    let mut created = Vec::new();
    let mut by_report = std::collections::HashMap::new();
    for task in futures::future::join_all(tasks).await {
        for appended in task.expect("task") {
            let data: serde_json::Value = serde_json::from_str(&appended.event.data).expect("json");
            let report_id = data["meta"]["report_id"].as_str().expect("id").to_owned();
            let id = *by_report
                .entry(report_id)
                .or_insert(appended.event.event_id);
            assert_eq!(id, appended.event.event_id, "one report id, one event id");
            if !appended.duplicate {
                created.push(appended.event.event_id);
            }
        }
    }
    created.sort_unstable();
    assert_eq!(
        created,
        (1..=11).collect::<Vec<u64>>(),
        "each report stored once, no gaps"
    );
    let session = SessionId::parse("s", "dup").expect("s");
    assert_eq!(
        store
            .events_after(&t, &session, 0, 100)
            .await
            .expect("read")
            .len(),
        11
    );
}

pub async fn concurrent_enqueues_keep_seqs_distinct_and_ordered(store: DynStore) {
    let t = tenant(&unique("org"));
    let device = paired_device(&store, &t).await;
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let (store, t, device) = (store.clone(), t.clone(), device.clone());
        tasks.push(tokio::spawn(async move {
            let mut seqs = Vec::new();
            for _ in 0..10 {
                seqs.push(
                    store
                        .enqueue_command(&command(&t, &device, "fs.read"), now_millis())
                        .await
                        .expect("enqueue")
                        .seq,
                );
            }
            seqs
        }));
    }
    let mut all = Vec::new();
    for task in futures::future::join_all(tasks).await {
        let seqs = task.expect("task");
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "one writer's seqs increase"
        );
        all.extend(seqs);
    }
    all.sort_unstable();
    all.dedup();
    assert_eq!(all.len(), 40, "seqs are distinct");
    let pending = store
        .pending_commands(&t, &device, 0, 100)
        .await
        .expect("pending");
    assert_eq!(pending.iter().map(|c| c.seq).collect::<Vec<_>>(), all);
}

pub async fn deleting_a_device_revokes_it(store: DynStore) {
    let t = tenant(&unique("org"));
    let (device_id, tokens) = paired_device_with_tokens(&store, &t).await;
    let token_hash = tokens.access_hash.clone();
    store
        .enqueue_command(&command(&t, &device_id, "fs.read"), now_millis())
        .await
        .expect("enqueue");
    store
        .append_reports(&t, Some(&device_id), &[report("del", "r1")], now_millis())
        .await
        .expect("append");

    assert!(
        !store
            .delete_device(&tenant(&unique("other")), &device_id, &[])
            .await
            .expect("delete"),
        "other tenants cannot delete it"
    );
    assert!(
        store
            .device_credential(&token_hash)
            .await
            .expect("read")
            .is_some()
    );
    assert!(
        store
            .delete_device(&t, &device_id, &[])
            .await
            .expect("delete")
    );
    assert!(
        store
            .device_credential(&token_hash)
            .await
            .expect("read")
            .is_none(),
        "the token is revoked"
    );
    assert_eq!(
        store
            .rotate_device_tokens(
                &device_id,
                &tokens.refresh_hash,
                &token_pair(now_millis() + 60_000, now_millis() + 60_000),
                now_millis()
            )
            .await
            .expect("rotate"),
        RefreshOutcome::Invalid,
        "the refresh token is revoked too"
    );
    assert!(store.device(&t, &device_id).await.expect("read").is_none());
    assert!(
        store
            .pending_commands(&t, &device_id, 0, 10)
            .await
            .expect("pending")
            .is_empty()
    );
    let session = SessionId::parse("s", "del").expect("s");
    assert!(
        store
            .session_devices(&t, &session)
            .await
            .expect("read")
            .is_empty()
    );
    assert_eq!(
        store
            .events_after(&t, &session, 0, 10)
            .await
            .expect("read")
            .len(),
        1,
        "reports stay"
    );
    assert!(
        !store
            .delete_device(&t, &device_id, &[])
            .await
            .expect("delete again")
    );
}

// --- identity, device tokens and audit --------------------------------------------------------

fn org_scope(t: &TenantId) -> AuditScope {
    AuditScope::Org(OrgId::parse("org", t.org()).expect("org"))
}

fn record(scope: &AuditScope, action: &str, actor: &str, ts: Millis) -> AuditRecord {
    AuditRecord {
        scope: scope.clone(),
        ts,
        actor: Actor {
            kind: ActorType::User,
            id: actor.into(),
        },
        action: action.into(),
        target: Some(AuditTarget::new("device", "dev_x")),
        result: AuditResult::Success,
        ip: Some("203.0.113.0/24".into()),
        user_agent: Some("conformance".into()),
        correlation_id: Some(unique("c")),
        details: json!({"b": 1, "a": [1, {"z": true, "y": null}], "n": 1.5, "s": "é\"\\"}),
    }
}

/// The whole chain of a scope, checked to verify from the genesis hash.
async fn verified_chain(store: &DynStore, scope: &AuditScope) -> Vec<AuditEntry> {
    let entries = store
        .audit_chain(scope, 0, 100_000)
        .await
        .expect("audit chain");
    verify_chain(&entries, (0, GENESIS_HASH.into())).expect("the chain verifies");
    entries
}

fn actions(entries: &[AuditEntry]) -> Vec<&str> {
    entries.iter().map(|e| e.record.action.as_str()).collect()
}

fn new_user(email: &str) -> User {
    let now = now_millis();
    User {
        id: UserId::generate(),
        email: Email::parse(email).expect("email"),
        display_name: Some(format!("Name of {email}")),
        password_hash: "$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA".into(),
        password_changed_at: now,
        created_at: now,
        totp: TotpState::default(),
        failed_logins: 0,
        last_failed_login_at: None,
        disabled: false,
    }
}

async fn created_user(store: &DynStore) -> User {
    let user = new_user(&format!("{}@example.org", unique("u")));
    store.create_user(&user, &[]).await.expect("create user");
    user
}

fn login_session(user: &UserId, now: Millis, expires_at: Millis) -> AuthSession {
    AuthSession {
        id: AuthSessionId::generate(),
        user_id: user.clone(),
        created_at: now,
        last_seen_at: now,
        expires_at,
        revoked_at: None,
        ip: Some("198.51.100.0/24".into()),
        user_agent: Some("browser".into()),
        mfa: true,
    }
}

pub async fn pairing_stores_client_details(store: DynStore) {
    let mut p = pairing(PairingCode::generate().as_str(), now_millis() + 60_000);
    p.client_ip = Some("192.0.2.0/24".into());
    p.agent_version = Some("3.4.5".into());
    store
        .create_pairing(&p, now_millis(), &[])
        .await
        .expect("create");
    let by_id = store.pairing(&p.id).await.expect("read").expect("found");
    assert_eq!(by_id, p);
    let by_code = store
        .pairing_by_code(p.code.as_ref().expect("code"))
        .await
        .expect("read")
        .expect("found");
    assert_eq!(by_code.client_ip.as_deref(), Some("192.0.2.0/24"));
    assert_eq!(by_code.agent_version.as_deref(), Some("3.4.5"));
}

pub async fn renaming_a_device(store: DynStore) {
    let t = tenant(&unique("org"));
    let device = paired_device(&store, &t).await;
    assert!(
        store
            .rename_device(&t, &device, "kitchen pc", &[])
            .await
            .expect("rename")
    );
    assert_eq!(
        store
            .device(&t, &device)
            .await
            .expect("read")
            .expect("device")
            .name,
        "kitchen pc"
    );
    assert!(
        !store
            .rename_device(&tenant(&unique("other")), &device, "x", &[])
            .await
            .expect("rename"),
        "other tenants cannot rename it"
    );
    assert!(
        !store
            .rename_device(&t, &DeviceId::generate(), "x", &[])
            .await
            .expect("rename")
    );
    assert_eq!(
        store
            .device(&t, &device)
            .await
            .expect("read")
            .expect("device")
            .name,
        "kitchen pc"
    );
}

pub async fn device_tokens_rotate_detect_reuse_and_revoke(store: DynStore) {
    let t = tenant(&unique("org"));
    let (device, first) = paired_device_with_tokens(&store, &t).await;
    let now = now_millis();
    let second = token_pair(now + 3_600_000, now + 86_400_000);

    // Unknown token, another device's id, an access token presented as refresh: Invalid.
    for (id, presented) in [
        (device.clone(), SecretHash::of("unknown")),
        (DeviceId::generate(), first.refresh_hash.clone()),
        (device.clone(), first.access_hash.clone()),
    ] {
        assert_eq!(
            store
                .rotate_device_tokens(&id, &presented, &second, now)
                .await
                .expect("rotate"),
            RefreshOutcome::Invalid
        );
    }
    assert!(
        store
            .device_credential(&first.access_hash)
            .await
            .expect("read")
            .is_some(),
        "failed rotations change nothing"
    );

    let rotated = store
        .rotate_device_tokens(&device, &first.refresh_hash, &second, now)
        .await
        .expect("rotate");
    let want = DeviceCredential {
        device_id: device.clone(),
        tenant: t.clone(),
        token_hash: second.access_hash.clone(),
        expires_at: second.access_expires_at,
    };
    assert_eq!(rotated, RefreshOutcome::Rotated(want.clone()));
    assert!(
        store
            .device_credential(&first.access_hash)
            .await
            .expect("read")
            .is_none(),
        "the old access token stops working"
    );
    assert_eq!(
        store
            .device_credential(&second.access_hash)
            .await
            .expect("read"),
        Some(want.clone())
    );

    // The spent refresh token again: reuse, and nothing changes.
    let third = token_pair(now + 3_600_000, now + 86_400_000);
    assert_eq!(
        store
            .rotate_device_tokens(&device, &first.refresh_hash, &third, now + 1)
            .await
            .expect("rotate"),
        RefreshOutcome::Reused(want.clone())
    );
    assert!(
        store
            .device_credential(&third.access_hash)
            .await
            .expect("read")
            .is_none()
    );
    assert_eq!(
        store
            .device_credential(&second.access_hash)
            .await
            .expect("read"),
        Some(want.clone())
    );

    // An expired refresh token is invalid.
    assert_eq!(
        store
            .rotate_device_tokens(
                &device,
                &second.refresh_hash,
                &third,
                second.refresh_expires_at
            )
            .await
            .expect("rotate"),
        RefreshOutcome::Invalid
    );

    // Revoking ends every token of the device but keeps the device.
    assert!(
        !store
            .revoke_device_tokens(&tenant(&unique("other")), &device, &[])
            .await
            .expect("revoke"),
        "other tenants cannot revoke it"
    );
    assert!(
        !store
            .revoke_device_tokens(&t, &DeviceId::generate(), &[])
            .await
            .expect("revoke")
    );
    assert!(
        store
            .revoke_device_tokens(&t, &device, &[])
            .await
            .expect("revoke")
    );
    assert!(
        store
            .device_credential(&second.access_hash)
            .await
            .expect("read")
            .is_none(),
        "the access token is gone"
    );
    for presented in [&second.refresh_hash, &first.refresh_hash] {
        assert_eq!(
            store
                .rotate_device_tokens(&device, presented, &third, now + 2)
                .await
                .expect("rotate"),
            RefreshOutcome::Invalid,
            "no token of a revoked device refreshes"
        );
    }
    assert!(store.device(&t, &device).await.expect("read").is_some());
}

pub async fn concurrent_device_token_rotations_rotate_once(store: DynStore) {
    let t = tenant(&unique("org"));
    let (device, first) = paired_device_with_tokens(&store, &t).await;
    let now = now_millis();
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (store, device, presented) =
            (store.clone(), device.clone(), first.refresh_hash.clone());
        tasks.push(tokio::spawn(async move {
            let new = token_pair(now + 3_600_000, now + 86_400_000);
            let outcome = store
                .rotate_device_tokens(&device, &presented, &new, now)
                .await
                .expect("rotate");
            (outcome, new)
        }));
    }
    let mut rotated = Vec::new();
    let mut reused = 0;
    for task in futures::future::join_all(tasks).await {
        match task.expect("task") {
            (RefreshOutcome::Rotated(cred), new) => {
                assert_eq!(cred.token_hash, new.access_hash);
                rotated.push(cred);
            }
            (RefreshOutcome::Reused(_), _) => reused += 1,
            (RefreshOutcome::Invalid, _) => panic!("a concurrent rotation answered Invalid"),
        }
    }
    assert_eq!(rotated.len(), 1, "exactly one rotation wins");
    assert_eq!(reused, 7);
    let winner = &rotated[0];
    assert_eq!(
        store
            .device_credential(&winner.token_hash)
            .await
            .expect("read")
            .as_ref(),
        Some(winner)
    );
}

pub async fn audit_is_written_with_the_change_and_not_for_a_no_op(store: DynStore) {
    let t = tenant(&unique("org"));
    let scope = AuditScope::Tenant(t.clone());
    let now = now_millis();
    let device = paired_device(&store, &t).await;
    let other = tenant(&unique("other"));

    let rename = record(&scope, "device.rename", "usr_a", now);
    assert!(
        store
            .rename_device(&t, &device, "renamed", std::slice::from_ref(&rename))
            .await
            .expect("rename")
    );
    // No-ops: nothing changed, so nothing is recorded.
    assert!(
        !store
            .rename_device(
                &t,
                &DeviceId::generate(),
                "x",
                &[record(&scope, "noop.rename", "usr_a", now)]
            )
            .await
            .expect("rename")
    );
    assert!(
        !store
            .delete_device(
                &other,
                &device,
                &[record(&scope, "noop.delete", "usr_a", now)]
            )
            .await
            .expect("delete")
    );
    assert!(
        !store
            .revoke_device_tokens(
                &other,
                &device,
                &[record(&scope, "noop.revoke", "usr_a", now)]
            )
            .await
            .expect("revoke")
    );
    // A pairing that is no longer pending is not confirmed again.
    let p = pairing(PairingCode::generate().as_str(), now + 60_000);
    store
        .create_pairing(&p, now, &[record(&scope, "pairing.start", "dev", now)])
        .await
        .expect("create");
    let new_device = DeviceId::generate();
    assert!(
        store
            .confirm_pairing(
                &p.id,
                &t,
                &new_device,
                &[record(&scope, "pairing.confirm", "usr_a", now)]
            )
            .await
            .expect("confirm")
    );
    assert!(
        !store
            .confirm_pairing(
                &p.id,
                &t,
                &new_device,
                &[record(&scope, "noop.confirm", "usr_a", now)]
            )
            .await
            .expect("confirm")
    );
    let claim = NewDevice {
        id: new_device.clone(),
        tenant: t.clone(),
        name: "pc".into(),
        device_type: "windows_companion".into(),
        capabilities: vec![],
        tokens: token_pair(now + 60_000, now + 60_000),
        paired_at: now,
    };
    assert!(
        store
            .complete_pairing(
                &p.id,
                &claim,
                &[record(&scope, "pairing.complete", "dev", now)]
            )
            .await
            .expect("complete")
    );
    assert!(
        !store
            .complete_pairing(
                &p.id,
                &claim,
                &[record(&scope, "noop.complete", "dev", now)]
            )
            .await
            .expect("complete")
    );
    assert!(
        store
            .revoke_device_tokens(
                &t,
                &new_device,
                &[record(&scope, "device.revoke", "u", now)]
            )
            .await
            .expect("revoke")
    );
    // One change may record several entries, in several scopes.
    let org = org_scope(&t);
    assert!(
        store
            .delete_device(
                &t,
                &device,
                &[
                    record(&scope, "device.delete", "usr_a", now),
                    record(&org, "org.device_delete", "usr_a", now),
                ]
            )
            .await
            .expect("delete")
    );
    assert!(
        !store
            .delete_device(&t, &device, &[record(&scope, "noop.delete", "usr_a", now)])
            .await
            .expect("delete again")
    );

    let entries = verified_chain(&store, &scope).await;
    assert_eq!(
        actions(&entries),
        vec![
            "device.rename",
            "pairing.start",
            "pairing.confirm",
            "pairing.complete",
            "device.revoke",
            "device.delete"
        ]
    );
    assert_eq!(
        entries.iter().map(|e| e.seq).collect::<Vec<_>>(),
        (1..=6).collect::<Vec<u64>>()
    );
    assert_eq!(
        entries[0].record, rename,
        "the record reads back as written"
    );
    assert_eq!(entries[0].prev_hash, GENESIS_HASH);
    assert_eq!(
        actions(&verified_chain(&store, &org).await),
        vec!["org.device_delete"]
    );
    assert!(
        verified_chain(&store, &AuditScope::Tenant(other))
            .await
            .is_empty()
    );
    let scopes = store.audit_scopes().await.expect("scopes");
    assert!(scopes.contains(&scope) && scopes.contains(&org));
}

/// A change that fails (here: a uniqueness conflict) takes its audit records down with it.
pub async fn failed_changes_write_no_audit(store: DynStore) {
    let org_id = OrgId::parse("org", &unique("o")).expect("org");
    let scope = AuditScope::Org(org_id.clone());
    let now = now_millis();
    let org = Org {
        id: org_id.clone(),
        name: "Acme".into(),
        created_at: now,
    };
    store
        .create_org(&org, &[record(&scope, "org.create", "usr_a", now)])
        .await
        .expect("create org");
    assert!(matches!(
        store
            .create_org(&org, &[record(&scope, "noop.org", "usr_a", now)])
            .await,
        Err(StoreError::Conflict(_))
    ));
    let missing = Project {
        org: OrgId::parse("org", &unique("missing")).expect("org"),
        id: ProjectId::parse("p", "web").expect("project"),
        name: "Web".into(),
        created_at: now,
    };
    assert!(matches!(
        store
            .create_project(&missing, &[record(&scope, "noop.project", "usr_a", now)])
            .await,
        Err(StoreError::Conflict(_))
    ));
    let user = new_user(&format!("{}@example.org", unique("dup")));
    store
        .create_user(&user, &[record(&scope, "user.create", "usr_a", now)])
        .await
        .expect("create user");
    let mut twin = new_user(user.email.as_str());
    twin.id = UserId::generate();
    assert!(matches!(
        store
            .create_user(&twin, &[record(&scope, "noop.user", "usr_a", now)])
            .await,
        Err(StoreError::Conflict(_))
    ));
    let entries = verified_chain(&store, &scope).await;
    assert_eq!(actions(&entries), vec!["org.create", "user.create"]);
}

pub async fn concurrent_audit_appends_never_fork_a_chain(store: DynStore) {
    let t = tenant(&unique("org"));
    let scope = AuditScope::Tenant(t.clone());
    let mut tasks = Vec::new();
    for writer in 0..8 {
        let (store, scope) = (store.clone(), scope.clone());
        tasks.push(tokio::spawn(async move {
            for i in 0..10 {
                store
                    .append_audit(&[record(
                        &scope,
                        &format!("w{writer}.{i}"),
                        "usr_a",
                        now_millis(),
                    )])
                    .await
                    .expect("append");
            }
        }));
    }
    for task in futures::future::join_all(tasks).await {
        task.expect("task");
    }
    let entries = verified_chain(&store, &scope).await;
    assert_eq!(
        entries.iter().map(|e| e.seq).collect::<Vec<_>>(),
        (1..=80).collect::<Vec<u64>>(),
        "no fork, no gap"
    );
    let distinct: HashSet<&str> = actions(&entries).into_iter().collect();
    assert_eq!(distinct.len(), 80);

    // Verifying page by page gives the same end as verifying at once.
    let mut at = (0, GENESIS_HASH.to_owned());
    loop {
        let page = store
            .audit_chain(&scope, at.0, 7)
            .await
            .expect("chain page");
        if page.is_empty() {
            break;
        }
        at = verify_chain(&page, at).expect("page verifies");
    }
    assert_eq!(at, (80, entries[79].hash.clone()));
}

pub async fn audit_queries_filter_and_page_newest_first(store: DynStore) {
    let t = tenant(&unique("org"));
    let (tenant_scope, org) = (AuditScope::Tenant(t.clone()), org_scope(&t));
    let elsewhere = AuditScope::Tenant(tenant(&unique("other")));
    let base = 1_700_000_000_000;
    // 12 entries alternating between the tenant and its org, one per second, and noise elsewhere.
    for i in 0..12 {
        let scope = if i % 2 == 0 { &tenant_scope } else { &org };
        let action = if i % 3 == 0 {
            "auth.login"
        } else {
            "device.rename"
        };
        let actor = if i < 6 { "usr_a" } else { "usr_b" };
        store
            .append_audit(&[
                record(scope, action, actor, base + i * 1000),
                record(&elsewhere, action, actor, base + i * 1000),
            ])
            .await
            .expect("append");
    }
    let query = |limit: u32| AuditQuery {
        scopes: vec![tenant_scope.clone(), org.clone()],
        limit,
        ..AuditQuery::default()
    };

    // Pages of 5, newest first, no overlap, nothing of the other tenant.
    let mut seen = Vec::new();
    let mut q = query(5);
    let mut pages = 0;
    loop {
        let page = store.audit_entries(&q).await.expect("page");
        pages += 1;
        assert!(page.entries.len() <= 5);
        seen.extend(page.entries.iter().map(|e| e.record.ts));
        match page.next_cursor {
            Some(cursor) => q.before = Some(cursor),
            None => break,
        }
        assert!(pages < 10, "paging terminates");
    }
    assert_eq!(
        seen,
        (0..12).rev().map(|i| base + i * 1000).collect::<Vec<_>>()
    );
    assert_eq!(pages, 3);
    let exact = store.audit_entries(&query(12)).await.expect("page");
    assert_eq!(exact.entries.len(), 12);
    assert_eq!(exact.next_cursor, None, "no cursor when nothing is left");

    // One scope only.
    let only_org = store
        .audit_entries(&AuditQuery {
            scopes: vec![org.clone()],
            limit: 100,
            ..AuditQuery::default()
        })
        .await
        .expect("org");
    assert_eq!(only_org.entries.len(), 6);
    assert!(only_org.entries.iter().all(|e| e.record.scope == org));

    // Filters.
    let filtered = |f: fn(&mut AuditQuery)| {
        let mut q = query(100);
        f(&mut q);
        let store = store.clone();
        async move {
            store
                .audit_entries(&q)
                .await
                .expect("filtered")
                .entries
                .iter()
                .map(|e| e.record.ts - base)
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(
        filtered(|q| q.since = Some(1_700_000_000_000 + 9_000)).await,
        vec![11_000, 10_000, 9_000]
    );
    assert_eq!(
        filtered(|q| q.until = Some(1_700_000_000_000 + 1_000)).await,
        vec![1_000, 0]
    );
    assert_eq!(
        filtered(|q| {
            q.since = Some(1_700_000_000_000 + 2_000);
            q.until = Some(1_700_000_000_000 + 4_000);
        })
        .await,
        vec![4_000, 3_000, 2_000]
    );
    assert_eq!(
        filtered(|q| q.action = Some("auth.login".into())).await,
        vec![9_000, 6_000, 3_000, 0]
    );
    assert_eq!(
        filtered(|q| {
            q.action = Some("auth.login".into());
            q.actor_id = Some("usr_b".into());
        })
        .await,
        vec![9_000, 6_000]
    );
    assert!(
        filtered(|q| q.actor_id = Some("usr_c".into()))
            .await
            .is_empty()
    );
}

pub async fn orgs_projects_and_members(store: DynStore) {
    let now = now_millis();
    let org_id = OrgId::parse("org", &unique("acme")).expect("org");
    let org = Org {
        id: org_id.clone(),
        name: "Acme".into(),
        created_at: now,
    };
    store.create_org(&org, &[]).await.expect("create org");
    assert!(matches!(
        store.create_org(&org, &[]).await,
        Err(StoreError::Conflict(_))
    ));
    assert_eq!(store.org(&org_id).await.expect("read"), Some(org.clone()));
    assert!(
        store
            .org(&OrgId::parse("org", &unique("none")).expect("org"))
            .await
            .expect("read")
            .is_none()
    );

    let project = |id: &str| Project {
        org: org_id.clone(),
        id: ProjectId::parse("p", id).expect("project"),
        name: format!("Project {id}"),
        created_at: now,
    };
    store
        .create_project(&project("web"), &[])
        .await
        .expect("create");
    store
        .create_project(&project("api"), &[])
        .await
        .expect("create");
    assert!(matches!(
        store.create_project(&project("web"), &[]).await,
        Err(StoreError::Conflict(_))
    ));
    let mut elsewhere = project("web");
    elsewhere.org = OrgId::parse("org", &unique("missing")).expect("org");
    assert!(matches!(
        store.create_project(&elsewhere, &[]).await,
        Err(StoreError::Conflict(_))
    ));
    assert_eq!(
        store.project(&project("web").tenant()).await.expect("read"),
        Some(project("web"))
    );
    assert!(
        store
            .project(&elsewhere.tenant())
            .await
            .expect("read")
            .is_none()
    );
    assert_eq!(
        store.list_projects(&org_id).await.expect("list"),
        vec![project("api"), project("web")]
    );

    let ann = new_user(&format!("ann-{}@example.org", unique("")));
    let bob = new_user(&format!("bob-{}@example.org", unique("")));
    store.create_user(&bob, &[]).await.expect("bob");
    store.create_user(&ann, &[]).await.expect("ann");
    store
        .put_member(&org_id, &bob.id, Role::Viewer, now, &[])
        .await
        .expect("put");
    store
        .put_member(&org_id, &ann.id, Role::Operator, now, &[])
        .await
        .expect("put");
    store
        .put_member(&org_id, &ann.id, Role::Admin, now + 5, &[])
        .await
        .expect("change role");
    assert_eq!(
        store.member_role(&org_id, &ann.id).await.expect("role"),
        Some(Role::Admin)
    );
    let members = store.list_members(&org_id).await.expect("members");
    assert_eq!(
        members
            .iter()
            .map(|m| (m.email.clone(), m.role, m.display_name.clone()))
            .collect::<Vec<_>>(),
        vec![
            (ann.email.clone(), Role::Admin, ann.display_name.clone()),
            (bob.email.clone(), Role::Viewer, bob.display_name.clone()),
        ],
        "sorted by email, with emails and names"
    );
    assert!(members.iter().all(|m| m.org == org_id));
    assert_eq!(members[0].user_id, ann.id);

    let second = Org {
        id: OrgId::parse("org", &unique("beta")).expect("org"),
        name: "Beta".into(),
        created_at: now,
    };
    store.create_org(&second, &[]).await.expect("create org");
    store
        .put_member(&second.id, &ann.id, Role::Viewer, now, &[])
        .await
        .expect("put");
    let mut want = vec![
        (org_id.clone(), Role::Admin),
        (second.id.clone(), Role::Viewer),
    ];
    want.sort();
    let mut got = store.user_orgs(&ann.id).await.expect("orgs");
    got.sort();
    assert_eq!(got, want);

    assert!(
        store
            .remove_member(&org_id, &bob.id, &[])
            .await
            .expect("remove")
    );
    assert!(
        !store
            .remove_member(&org_id, &bob.id, &[])
            .await
            .expect("remove again")
    );
    assert_eq!(
        store.member_role(&org_id, &bob.id).await.expect("role"),
        None
    );
    assert!(store.user_orgs(&bob.id).await.expect("orgs").is_empty());
    assert_eq!(store.list_members(&org_id).await.expect("members").len(), 1);
}

pub async fn users_create_lookup_and_password(store: DynStore) {
    assert_eq!(store.count_users().await.expect("count"), 0);
    let ann = new_user(&format!("Ann-{}@Example.ORG", unique("")));
    store.create_user(&ann, &[]).await.expect("create");
    let mut twin = new_user(ann.email.as_str());
    twin.id = UserId::generate();
    assert!(matches!(
        store.create_user(&twin, &[]).await,
        Err(StoreError::Conflict(_))
    ));
    let mut same_id = new_user(&format!("{}@example.org", unique("x")));
    same_id.id = ann.id.clone();
    assert!(matches!(
        store.create_user(&same_id, &[]).await,
        Err(StoreError::Conflict(_))
    ));
    assert_eq!(store.user(&ann.id).await.expect("read"), Some(ann.clone()));
    assert_eq!(
        store.user_by_email(&ann.email).await.expect("read"),
        Some(ann.clone())
    );
    assert!(
        store
            .user_by_email(&Email::parse("nobody@example.org").expect("email"))
            .await
            .expect("read")
            .is_none()
    );
    let mut with_totp = new_user(&format!("{}@example.org", unique("t")));
    with_totp.totp = TotpState {
        secret: Some("JBSWY3DPEHPK3PXP".into()),
        enabled: true,
        last_step: Some(123),
    };
    with_totp.disabled = true;
    with_totp.display_name = None;
    store.create_user(&with_totp, &[]).await.expect("create");
    assert_eq!(
        store.user(&with_totp.id).await.expect("read"),
        Some(with_totp.clone())
    );
    assert_eq!(store.count_users().await.expect("count"), 2);
    let mut want = vec![ann.clone(), with_totp.clone()];
    want.sort_by(|a, b| a.email.cmp(&b.email));
    assert_eq!(store.list_users().await.expect("list"), want);

    let at = now_millis() + 10;
    assert!(
        store
            .set_password(&ann.id, "$argon2id$new", at, &[])
            .await
            .expect("set")
    );
    let changed = store.user(&ann.id).await.expect("read").expect("user");
    assert_eq!(changed.password_hash, "$argon2id$new");
    assert_eq!(changed.password_changed_at, at);
    assert!(
        !store
            .set_password(&UserId::generate(), "$argon2id$x", at, &[])
            .await
            .expect("set")
    );
}

pub async fn login_failures_are_counted_and_cleared(store: DynStore) {
    let user = created_user(&store).await;
    let at = now_millis();
    for n in 1..=3 {
        assert_eq!(
            store
                .record_login_failure(&user.id, at + i64::from(n))
                .await
                .expect("count"),
            n
        );
    }
    let read = store.user(&user.id).await.expect("read").expect("user");
    assert_eq!(read.failed_logins, 3);
    assert_eq!(read.last_failed_login_at, Some(at + 3));
    store.clear_login_failures(&user.id).await.expect("clear");
    let read = store.user(&user.id).await.expect("read").expect("user");
    assert_eq!(read.failed_logins, 0);
    assert_eq!(
        store
            .record_login_failure(&user.id, at + 10)
            .await
            .expect("count"),
        1,
        "counting starts over after a success"
    );
    assert_eq!(
        store
            .record_login_failure(&UserId::generate(), at)
            .await
            .expect("unknown user"),
        0
    );
}

pub async fn totp_steps_are_accepted_once(store: DynStore) {
    let user = created_user(&store).await;
    let totp = TotpState {
        secret: Some("JBSWY3DPEHPK3PXP".into()),
        enabled: true,
        last_step: None,
    };
    assert!(
        store
            .set_totp(&user.id, &totp, &[], &[])
            .await
            .expect("set")
    );
    assert!(
        !store
            .set_totp(&UserId::generate(), &totp, &[], &[])
            .await
            .expect("set unknown")
    );
    let stored = store.user(&user.id).await.expect("read").expect("user");
    assert_eq!(stored.totp, totp);

    assert!(store.use_totp_step(&user.id, 100).await.expect("use"));
    assert!(
        !store.use_totp_step(&user.id, 100).await.expect("replay"),
        "the same step is a replay"
    );
    assert!(
        !store.use_totp_step(&user.id, 99).await.expect("earlier"),
        "an earlier step is a replay"
    );
    assert!(store.use_totp_step(&user.id, 101).await.expect("later"));
    assert_eq!(
        store
            .user(&user.id)
            .await
            .expect("read")
            .expect("user")
            .totp
            .last_step,
        Some(101)
    );
    assert!(
        !store
            .use_totp_step(&UserId::generate(), 5)
            .await
            .expect("unknown user")
    );
}

pub async fn concurrent_totp_step_is_accepted_once(store: DynStore) {
    let user = created_user(&store).await;
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (store, id) = (store.clone(), user.id.clone());
        tasks.push(tokio::spawn(async move {
            store.use_totp_step(&id, 5_000).await.expect("use")
        }));
    }
    let accepted = futures::future::join_all(tasks)
        .await
        .into_iter()
        .filter(|r| *r.as_ref().expect("task"))
        .count();
    assert_eq!(accepted, 1, "one code, one acceptance");
}

pub async fn recovery_codes_are_single_use(store: DynStore) {
    let (user, other) = (created_user(&store).await, created_user(&store).await);
    let codes: Vec<SecretHash> = (0..3).map(|i| SecretHash::of(&format!("rc{i}"))).collect();
    let totp = TotpState {
        secret: Some("JBSWY3DPEHPK3PXP".into()),
        enabled: true,
        last_step: None,
    };
    assert!(
        store
            .set_totp(&user.id, &totp, &codes, &[])
            .await
            .expect("set")
    );
    assert_eq!(store.recovery_codes_left(&user.id).await.expect("left"), 3);
    assert!(
        !store
            .use_recovery_code(&other.id, &codes[0])
            .await
            .expect("use"),
        "another user's code"
    );
    assert!(
        store
            .use_recovery_code(&user.id, &codes[0])
            .await
            .expect("use")
    );
    assert!(
        !store
            .use_recovery_code(&user.id, &codes[0])
            .await
            .expect("again"),
        "a code works once"
    );
    assert!(
        !store
            .use_recovery_code(&user.id, &SecretHash::of("nope"))
            .await
            .expect("unknown")
    );
    assert_eq!(store.recovery_codes_left(&user.id).await.expect("left"), 2);
    // New codes replace the old ones; none removes them.
    let fresh = vec![SecretHash::of("new")];
    assert!(
        store
            .set_totp(&user.id, &totp, &fresh, &[])
            .await
            .expect("set")
    );
    assert!(
        !store
            .use_recovery_code(&user.id, &codes[1])
            .await
            .expect("old code")
    );
    assert_eq!(store.recovery_codes_left(&user.id).await.expect("left"), 1);
    assert!(
        store
            .set_totp(&user.id, &TotpState::default(), &[], &[])
            .await
            .expect("disable")
    );
    assert_eq!(store.recovery_codes_left(&user.id).await.expect("left"), 0);
}

pub async fn refresh_tokens_rotate_and_detect_reuse(store: DynStore) {
    let user = created_user(&store).await;
    let now = now_millis();
    let session = login_session(&user.id, now, now + 60_000);
    let r1 = SecretHash::of(&unique("r1"));
    store
        .create_auth_session(&session, &r1, &[])
        .await
        .expect("create");
    assert_eq!(
        store.auth_session(&session.id).await.expect("read"),
        Some(session.clone())
    );
    assert_eq!(
        store
            .rotate_refresh_token(&SecretHash::of("unknown"), &SecretHash::of("x"), now, now)
            .await
            .expect("rotate"),
        RefreshOutcome::Invalid
    );

    let r2 = SecretHash::of(&unique("r2"));
    let rotated = store
        .rotate_refresh_token(&r1, &r2, now + 120_000, now + 10)
        .await
        .expect("rotate");
    let mut want = session.clone();
    want.expires_at = now + 120_000;
    want.last_seen_at = now + 10;
    assert_eq!(rotated, RefreshOutcome::Rotated(want.clone()));
    assert_eq!(
        store.auth_session(&session.id).await.expect("read"),
        Some(want.clone())
    );

    // r1 again: reuse detected, nothing rotated (r2 stays current, no new token stored).
    let r3 = SecretHash::of(&unique("r3"));
    assert_eq!(
        store
            .rotate_refresh_token(&r1, &r3, now + 999_999, now + 20)
            .await
            .expect("rotate"),
        RefreshOutcome::Reused(want.clone())
    );
    assert_eq!(
        store
            .rotate_refresh_token(&r3, &SecretHash::of("r4"), now + 999_999, now + 20)
            .await
            .expect("rotate"),
        RefreshOutcome::Invalid,
        "the token offered with a reused one was not stored"
    );
    assert!(matches!(
        store
            .rotate_refresh_token(&r2, &r3, now + 180_000, now + 30)
            .await
            .expect("rotate"),
        RefreshOutcome::Rotated(s) if s.expires_at == now + 180_000
    ));
    assert_eq!(
        store
            .list_auth_sessions(&user.id, now + 40)
            .await
            .expect("list")
            .len(),
        1
    );
}

pub async fn concurrent_refresh_rotations_rotate_once(store: DynStore) {
    let user = created_user(&store).await;
    let now = now_millis();
    let session = login_session(&user.id, now, now + 60_000);
    let r1 = SecretHash::of(&unique("r1"));
    store
        .create_auth_session(&session, &r1, &[])
        .await
        .expect("create");
    let mut tasks = Vec::new();
    for i in 0..8 {
        let (store, r1) = (store.clone(), r1.clone());
        tasks.push(tokio::spawn(async move {
            let new = SecretHash::of(&format!("{}-{i}", unique("n")));
            let out = store
                .rotate_refresh_token(&r1, &new, now + 120_000, now + 1)
                .await
                .expect("rotate");
            (out, new)
        }));
    }
    let mut winners = Vec::new();
    let mut reused = 0;
    for task in futures::future::join_all(tasks).await {
        match task.expect("task") {
            (RefreshOutcome::Rotated(_), new) => winners.push(new),
            (RefreshOutcome::Reused(s), _) => {
                assert_eq!(s.id, session.id);
                reused += 1;
            }
            (RefreshOutcome::Invalid, _) => panic!("a concurrent rotation answered Invalid"),
        }
    }
    assert_eq!(winners.len(), 1, "exactly one rotation wins");
    assert_eq!(reused, 7);
    assert!(matches!(
        store
            .rotate_refresh_token(&winners[0], &SecretHash::of(&unique("z")), now + 1, now + 2)
            .await
            .expect("rotate"),
        RefreshOutcome::Rotated(_)
    ));
}

pub async fn refresh_fails_for_revoked_or_expired_sessions(store: DynStore) {
    let user = created_user(&store).await;
    let now = now_millis();
    let revoked = login_session(&user.id, now, now + 60_000);
    let r1 = SecretHash::of(&unique("r1"));
    store
        .create_auth_session(&revoked, &r1, &[])
        .await
        .expect("create");
    assert!(
        store
            .revoke_auth_session(&revoked.id, now + 1, &[])
            .await
            .expect("revoke")
    );
    assert!(
        !store
            .revoke_auth_session(&revoked.id, now + 2, &[])
            .await
            .expect("revoke again"),
        "no longer active"
    );
    assert_eq!(
        store
            .auth_session(&revoked.id)
            .await
            .expect("read")
            .expect("session")
            .revoked_at,
        Some(now + 1)
    );
    assert_eq!(
        store
            .rotate_refresh_token(&r1, &SecretHash::of(&unique("n")), now + 120_000, now + 3)
            .await
            .expect("rotate"),
        RefreshOutcome::Invalid
    );

    let expiring = login_session(&user.id, now, now + 1_000);
    let r2 = SecretHash::of(&unique("r2"));
    store
        .create_auth_session(&expiring, &r2, &[])
        .await
        .expect("create");
    assert_eq!(
        store
            .rotate_refresh_token(
                &r2,
                &SecretHash::of(&unique("n")),
                now + 120_000,
                now + 1_000
            )
            .await
            .expect("rotate"),
        RefreshOutcome::Invalid,
        "expired"
    );
    assert!(
        !store
            .revoke_auth_session(&expiring.id, now + 1_000, &[])
            .await
            .expect("revoke expired")
    );
    assert!(
        store
            .list_auth_sessions(&user.id, now + 1_000)
            .await
            .expect("list")
            .is_empty()
    );
}

pub async fn revoking_all_sessions_keeps_the_current_one(store: DynStore) {
    let (user, other) = (created_user(&store).await, created_user(&store).await);
    let now = now_millis();
    let scope = AuditScope::System;
    let mut sessions = Vec::new();
    for i in 0..3 {
        let s = login_session(&user.id, now + i, now + 60_000);
        store
            .create_auth_session(&s, &SecretHash::of(&unique("r")), &[])
            .await
            .expect("create");
        sessions.push(s);
    }
    let expired = login_session(&user.id, now - 10_000, now - 1);
    store
        .create_auth_session(&expired, &SecretHash::of(&unique("r")), &[])
        .await
        .expect("create");
    let bystander = login_session(&other.id, now, now + 60_000);
    store
        .create_auth_session(&bystander, &SecretHash::of(&unique("r")), &[])
        .await
        .expect("create");

    let listed = store
        .list_auth_sessions(&user.id, now + 10)
        .await
        .expect("list");
    assert_eq!(
        listed.iter().map(|s| s.id.clone()).collect::<Vec<_>>(),
        vec![
            sessions[2].id.clone(),
            sessions[1].id.clone(),
            sessions[0].id.clone()
        ],
        "active sessions, newest first"
    );

    let marker = unique("logout-others-");
    let mut ended = store
        .revoke_user_sessions(
            &user.id,
            Some(&sessions[0].id),
            now + 20,
            &[record(&scope, &marker, user.id.as_str(), now)],
        )
        .await
        .expect("revoke");
    ended.sort();
    let mut want = vec![sessions[1].id.clone(), sessions[2].id.clone()];
    want.sort();
    assert_eq!(ended, want);
    assert_eq!(
        store
            .list_auth_sessions(&user.id, now + 30)
            .await
            .expect("list")
            .iter()
            .map(|s| s.id.clone())
            .collect::<Vec<_>>(),
        vec![sessions[0].id.clone()]
    );
    // Nothing left to end: nothing ended, nothing recorded.
    let none = store
        .revoke_user_sessions(
            &user.id,
            Some(&sessions[0].id),
            now + 40,
            &[record(
                &scope,
                &format!("{marker}-noop"),
                user.id.as_str(),
                now,
            )],
        )
        .await
        .expect("revoke");
    assert!(none.is_empty());
    let recorded = store
        .audit_entries(&AuditQuery {
            scopes: vec![scope],
            action: Some(marker.clone()),
            limit: 10,
            ..AuditQuery::default()
        })
        .await
        .expect("audit");
    assert_eq!(recorded.entries.len(), 1);
    let noop = store
        .audit_entries(&AuditQuery {
            scopes: vec![AuditScope::System],
            action: Some(format!("{marker}-noop")),
            limit: 10,
            ..AuditQuery::default()
        })
        .await
        .expect("audit");
    assert!(noop.entries.is_empty());

    assert_eq!(
        store
            .revoke_user_sessions(&user.id, None, now + 50, &[])
            .await
            .expect("revoke all"),
        vec![sessions[0].id.clone()]
    );
    assert!(
        store
            .auth_session(&bystander.id)
            .await
            .expect("read")
            .expect("session")
            .revoked_at
            .is_none(),
        "other users' sessions are untouched"
    );
}

pub async fn stream_tickets_are_single_use_and_expire(store: DynStore) {
    let user = created_user(&store).await;
    let now = now_millis();
    let ticket = StreamTicket {
        user_id: user.id.clone(),
        auth_session: AuthSessionId::generate(),
        tenant: tenant(&unique("org")),
        session_id: SessionId::parse("s", "live-1").expect("session"),
        expires_at: now + 60_000,
    };
    let hash = SecretHash::of(&unique("nxt_"));
    store
        .create_stream_ticket(&hash, &ticket)
        .await
        .expect("create");
    assert_eq!(
        store
            .take_stream_ticket(&SecretHash::of("other"), now)
            .await
            .expect("take"),
        None
    );
    assert_eq!(
        store.take_stream_ticket(&hash, now).await.expect("take"),
        Some(ticket.clone())
    );
    assert_eq!(
        store.take_stream_ticket(&hash, now).await.expect("again"),
        None,
        "a ticket opens one stream"
    );

    let late = SecretHash::of(&unique("nxt_"));
    store
        .create_stream_ticket(&late, &ticket)
        .await
        .expect("create");
    assert_eq!(
        store
            .take_stream_ticket(&late, ticket.expires_at)
            .await
            .expect("take"),
        None,
        "expired"
    );
    assert_eq!(
        store.take_stream_ticket(&late, now).await.expect("take"),
        None,
        "an expired ticket is gone, not kept for later"
    );
}

//! The storage conformance suite: every case is written once against `dyn Store` and run for
//! every backend through [`conformance_tests!`], so the backends cannot drift apart.

use std::collections::HashSet;
use std::sync::Arc;

use nexus_domain::approval::{
    Approval, ApprovalId, ApprovalStatus, CommandPolicySettings, CommandRecord, CommandStatus,
    RiskRule,
};
use nexus_domain::audit::{
    Actor, ActorType, AuditEntry, AuditRecord, AuditResult, AuditScope, AuditTarget, GENESIS_HASH,
    verify_chain,
};
use nexus_domain::command::{ClientContext, CommandPolicy, DeviceCommand, Risk};
use nexus_domain::identity::{AuthSession, AuthSessionId, StreamTicket, TotpState};
use nexus_domain::report::ValidatedReport;
use nexus_domain::secret::SecretHash;
use nexus_domain::time::{Millis, now_millis};
use nexus_domain::{
    CommandId, DeviceId, Email, Org, OrgId, Pairing, PairingCode, PairingId, PairingState, Project,
    ProjectId, Role, SessionId, TenantId, User, UserId,
};
use nexus_store::{
    AckOutcome, AuditQuery, CommandChange, CommandQuery, Created, DeviceCredential,
    DeviceTokenHashes, Heartbeat, NewDevice, RefreshOutcome, Store, StoreError,
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
            concurrent_device_token_rotations_rotate_once, device_refresh_retry_after_lost_answer, audit_is_written_with_the_change_and_not_for_a_no_op,
            failed_changes_write_no_audit, concurrent_audit_appends_never_fork_a_chain, audit_queries_filter_and_page_newest_first,
            orgs_projects_and_members, users_create_lookup_and_password, login_failures_are_counted_and_cleared,
            totp_steps_are_accepted_once, concurrent_totp_step_is_accepted_once, recovery_codes_are_single_use,
            refresh_tokens_rotate_and_detect_reuse, session_access_joins_session_membership_and_project, concurrent_refresh_rotations_rotate_once, refresh_fails_for_revoked_or_expired_sessions,
            revoking_all_sessions_keeps_the_current_one, stream_tickets_are_single_use_and_expire, prune_ended_deletes_only_what_ended_before_the_cutoff,
            idempotent_create_writes_once, approval_required_commands_are_not_queued,
            concurrent_decisions_have_one_winner, denied_approval_never_runs,
            expired_approvals_cannot_be_decided_and_are_swept, concurrent_expiry_and_decision_have_one_winner,
            transitions_are_compare_and_set, due_commands_follow_deadlines,
            list_commands_filters_and_pages_newest_first, list_approvals_by_status,
            command_policy_roundtrip, commands_are_tenant_scoped, cancel_races_delivery,
            concurrent_acks_count_once);
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

pub async fn command_queue_cursor_and_ack(store: DynStore) {
    let t = tenant(&unique("org"));
    let device = paired_device(&store, &t).await;
    let base = now_millis();
    let mut queued = Vec::new();
    for kind in ["fs.read", "fs.list", "system.info"] {
        queued.push(propose(&store, &t, &device, kind, Risk::Green, base).await);
    }
    // Deliveries follow the queue: oldest first, `after` is the cursor, `limit` bounds a pull.
    let first = store
        .deliver_commands(&t, &device, 0, 1, base + 1, base + 600_000)
        .await
        .expect("deliver");
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].record.id, queued[0].id);
    assert_eq!(first[0].command, body_of(&queued[0]), "the stored body");
    assert_eq!(first[0].record.status, CommandStatus::Delivered);
    assert_eq!(first[0].record.attempt, 1);
    assert_eq!(first[0].record.deadline, Some(base + 600_000));
    assert_eq!(first[0].record.updated_at, base + 1);
    let rest = store
        .deliver_commands(&t, &device, first[0].seq, 100, base + 2, base + 600_000)
        .await
        .expect("deliver");
    assert_eq!(
        rest.iter().map(|d| d.record.id.clone()).collect::<Vec<_>>(),
        vec![queued[1].id.clone(), queued[2].id.clone()]
    );
    assert!(rest.windows(2).all(|w| w[0].seq < w[1].seq));
    assert!(rest[0].seq > first[0].seq);
    assert!(
        store
            .deliver_commands(&t, &device, rest[1].seq, 100, base + 3, base + 600_000)
            .await
            .expect("deliver")
            .is_empty()
    );
    // Pulling again from the start before acking hands out the same commands as a new attempt.
    let again = store
        .deliver_commands(&t, &device, 0, 100, base + 4, base + 700_000)
        .await
        .expect("deliver");
    assert_eq!(again.len(), 3);
    assert!(again.iter().all(|d| d.record.attempt == 2));
    assert!(
        again
            .iter()
            .all(|d| d.record.deadline == Some(base + 700_000))
    );
    assert_eq!(again[0].seq, first[0].seq);

    // Acks name the delivery.
    let never = propose(&store, &t, &device, "fs.read", Risk::Green, base).await;
    let scope = AuditScope::Tenant(t.clone());
    let before = verified_chain(&store, &scope).await.len();
    let ack = |id: &CommandId, attempt: u32| {
        let (store, t, device, id, scope) = (
            store.clone(),
            t.clone(),
            device.clone(),
            id.clone(),
            scope.clone(),
        );
        async move {
            store
                .ack_delivery(
                    &t,
                    &device,
                    &id,
                    attempt,
                    base + 5,
                    &[record(&scope, "command.ack", "dev", base + 5)],
                )
                .await
                .expect("ack")
        }
    };
    match ack(&queued[0].id, 2).await {
        AckOutcome::Acked(r) => {
            assert_eq!(r.status, CommandStatus::Acked);
            assert_eq!((r.attempt, r.updated_at), (2, base + 5));
        }
        other => panic!("expected Acked, got {other:?}"),
    }
    assert!(matches!(
        ack(&queued[0].id, 2).await,
        AckOutcome::AlreadyAcked(r) if r.status == CommandStatus::Acked
    ));
    assert!(matches!(
        ack(&queued[1].id, 1).await,
        AckOutcome::StaleAttempt(r) if r.attempt == 2 && r.status == CommandStatus::Delivered
    ));
    assert_eq!(
        ack(&queued[1].id, 3).await,
        AckOutcome::NotFound,
        "not delivered yet"
    );
    assert_eq!(ack(&CommandId::generate(), 1).await, AckOutcome::NotFound);
    let other_device = paired_device(&store, &t).await;
    assert_eq!(
        store
            .ack_delivery(&t, &other_device, &queued[1].id, 2, base + 5, &[])
            .await
            .expect("ack"),
        AckOutcome::NotFound,
        "another device's command"
    );
    let other = tenant(&unique("x"));
    assert_eq!(
        store
            .ack_delivery(&other, &device, &queued[1].id, 2, base + 5, &[])
            .await
            .expect("ack"),
        AckOutcome::NotFound,
        "another tenant's command"
    );
    assert_eq!(
        ack(&never.id, 1).await,
        AckOutcome::NotFound,
        "queued, never delivered"
    );
    assert_eq!(
        verified_chain(&store, &scope).await.len(),
        before + 1,
        "only the ack that changed something is audited"
    );

    // An acked command is out of the queue; the others come again (next attempt).
    let pending = store
        .deliver_commands(&t, &device, 0, 100, base + 6, base + 800_000)
        .await
        .expect("deliver");
    assert_eq!(
        pending
            .iter()
            .map(|d| d.record.id.clone())
            .collect::<Vec<_>>(),
        vec![queued[1].id.clone(), queued[2].id.clone(), never.id.clone()]
    );
    assert_eq!(
        pending.iter().map(|d| d.record.attempt).collect::<Vec<_>>(),
        vec![3, 3, 1]
    );
    assert!(
        store
            .deliver_commands(&other, &device, 0, 100, base + 7, base + 800_000)
            .await
            .expect("deliver")
            .is_empty(),
        "another tenant's queue"
    );
    assert!(
        store
            .deliver_commands(&t, &other_device, 0, 100, base + 7, base + 800_000)
            .await
            .expect("deliver")
            .is_empty(),
        "another device's queue"
    );
    let stored = store
        .command(&t, &queued[0].id)
        .await
        .expect("read")
        .expect("found");
    assert_eq!(stored.status, CommandStatus::Acked);
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
            let mut ids = Vec::new();
            for _ in 0..10 {
                ids.push(
                    propose(&store, &t, &device, "fs.read", Risk::Green, now_millis())
                        .await
                        .id,
                );
            }
            ids
        }));
    }
    let mut writers = Vec::new();
    for task in futures::future::join_all(tasks).await {
        writers.push(task.expect("task"));
    }
    let delivered = store
        .deliver_commands(&t, &device, 0, 100, now_millis(), now_millis() + 60_000)
        .await
        .expect("deliver");
    assert_eq!(delivered.len(), 40, "every command is queued once");
    let seqs: Vec<i64> = delivered.iter().map(|d| d.seq).collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "distinct, oldest first"
    );
    let seq_of = |id: &CommandId| {
        delivered
            .iter()
            .find(|d| &d.record.id == id)
            .map(|d| d.seq)
            .expect("delivered")
    };
    for ids in &writers {
        let order: Vec<i64> = ids.iter().map(seq_of).collect();
        assert!(
            order.windows(2).all(|w| w[0] < w[1]),
            "one writer's commands are queued in order"
        );
    }
}

pub async fn deleting_a_device_revokes_it(store: DynStore) {
    let t = tenant(&unique("org"));
    let (device_id, tokens) = paired_device_with_tokens(&store, &t).await;
    let token_hash = tokens.access_hash.clone();
    propose(&store, &t, &device_id, "fs.read", Risk::Green, now_millis()).await;
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
                now_millis(),
                0
            )
            .await
            .expect("rotate"),
        RefreshOutcome::Invalid,
        "the refresh token is revoked too"
    );
    assert!(store.device(&t, &device_id).await.expect("read").is_none());
    assert!(
        store
            .deliver_commands(&t, &device_id, 0, 10, now_millis(), now_millis() + 60_000)
            .await
            .expect("deliver")
            .is_empty(),
        "its queue is gone"
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
                .rotate_device_tokens(&id, &presented, &second, now, 0)
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
        .rotate_device_tokens(&device, &first.refresh_hash, &second, now, 0)
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
            .rotate_device_tokens(&device, &first.refresh_hash, &third, now + 1, 0)
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
                second.refresh_expires_at,
                0
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
                .rotate_device_tokens(&device, presented, &third, now + 2, 0)
                .await
                .expect("rotate"),
            RefreshOutcome::Invalid,
            "no token of a revoked device refreshes"
        );
    }
    assert!(store.device(&t, &device).await.expect("read").is_some());
}

/// A refresh whose answer was lost is retried with the same, now spent, token: within the grace
/// period and while its successor is unused that is no theft; afterwards it is.
pub async fn device_refresh_retry_after_lost_answer(store: DynStore) {
    let t = tenant(&unique("org"));
    let (device, first) = paired_device_with_tokens(&store, &t).await;
    let now = now_millis();
    let grace = 60_000;
    let credential = |pair: &DeviceTokenHashes| DeviceCredential {
        device_id: device.clone(),
        tenant: t.clone(),
        token_hash: pair.access_hash.clone(),
        expires_at: pair.access_expires_at,
    };
    let lost = token_pair(now + 3_600_000, now + 86_400_000);
    assert_eq!(
        store
            .rotate_device_tokens(&device, &first.refresh_hash, &lost, now, grace)
            .await
            .expect("rotate"),
        RefreshOutcome::Rotated(credential(&lost))
    );

    // The answer never arrived; the device tries again with what it has.
    let retried = token_pair(now + 3_600_000, now + 86_400_000);
    assert_eq!(
        store
            .rotate_device_tokens(&device, &first.refresh_hash, &retried, now + 5_000, grace)
            .await
            .expect("retry"),
        RefreshOutcome::Retried(credential(&retried))
    );
    for (hash, live, why) in [
        (
            &lost.access_hash,
            false,
            "the lost pair's access token is gone",
        ),
        (&retried.access_hash, true, "the retried pair works"),
    ] {
        assert_eq!(
            store.device_credential(hash).await.expect("read").is_some(),
            live,
            "{why}"
        );
    }

    // Lost again: still a retry, as long as the window (from the first spend) is open.
    let again = token_pair(now + 3_600_000, now + 86_400_000);
    assert_eq!(
        store
            .rotate_device_tokens(&device, &first.refresh_hash, &again, now + grace, grace)
            .await
            .expect("retry"),
        RefreshOutcome::Retried(credential(&again))
    );
    assert!(
        store
            .device_credential(&retried.access_hash)
            .await
            .expect("read")
            .is_none()
    );

    // Past the window the same presentation is reuse, and nothing changes.
    let late = token_pair(now + 3_600_000, now + 86_400_000);
    assert_eq!(
        store
            .rotate_device_tokens(&device, &first.refresh_hash, &late, now + grace + 1, grace)
            .await
            .expect("rotate"),
        RefreshOutcome::Reused(credential(&again))
    );
    assert!(
        store
            .device_credential(&late.access_hash)
            .await
            .expect("read")
            .is_none()
    );

    // A superseded pair's refresh token was never delivered: whoever presents it holds a copy.
    let copy = token_pair(now + 3_600_000, now + 86_400_000);
    assert_eq!(
        store
            .rotate_device_tokens(&device, &lost.refresh_hash, &copy, now + 10, grace)
            .await
            .expect("rotate"),
        RefreshOutcome::Reused(credential(&again))
    );

    // Once the successor has been used, the predecessor is reuse even inside the window.
    let next = token_pair(now + 3_600_000, now + 86_400_000);
    assert_eq!(
        store
            .rotate_device_tokens(&device, &again.refresh_hash, &next, now + 20, grace)
            .await
            .expect("rotate"),
        RefreshOutcome::Rotated(credential(&next))
    );
    let stale = token_pair(now + 3_600_000, now + 86_400_000);
    assert_eq!(
        store
            .rotate_device_tokens(&device, &first.refresh_hash, &stale, now + 30, grace)
            .await
            .expect("rotate"),
        RefreshOutcome::Reused(credential(&next))
    );
    assert_eq!(
        store
            .device_credential(&next.access_hash)
            .await
            .expect("read"),
        Some(credential(&next))
    );
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
                .rotate_device_tokens(&device, &presented, &new, now, 0)
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
            (RefreshOutcome::Retried(_), _) => panic!("no retries without a grace period"),
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

/// One round trip for the session and the role in a tenant, with the same answers as
/// `auth_session` + `member_role` + `project`.
pub async fn session_access_joins_session_membership_and_project(store: DynStore) {
    let now = now_millis();
    let org_id = OrgId::parse("org", &unique("acme")).expect("org");
    store
        .create_org(
            &Org {
                id: org_id.clone(),
                name: "Acme".into(),
                created_at: now,
            },
            &[],
        )
        .await
        .expect("org");
    let web = Project {
        org: org_id.clone(),
        id: ProjectId::parse("p", "web").expect("project"),
        name: "Web".into(),
        created_at: now,
    };
    store.create_project(&web, &[]).await.expect("project");
    let member = created_user(&store).await;
    let outsider = created_user(&store).await;
    store
        .put_member(&org_id, &member.id, Role::Operator, now, &[])
        .await
        .expect("member");
    let session_of = |user: &User| login_session(&user.id, now, now + 60_000);
    let (mine, theirs) = (session_of(&member), session_of(&outsider));
    for session in [&mine, &theirs] {
        store
            .create_auth_session(session, &SecretHash::of(&unique("r")), &[])
            .await
            .expect("session");
    }
    let in_web = web.tenant();
    let in_missing_project = TenantId::parse(org_id.as_str(), "nope").expect("tenant");
    let in_other_org = tenant(&unique("other"));

    let access = |id: AuthSessionId, t: TenantId| {
        let store = store.clone();
        async move { store.session_access(&id, &t).await.expect("read") }
    };
    assert_eq!(
        access(mine.id.clone(), in_web.clone()).await,
        Some((mine.clone(), Some(Role::Operator)))
    );
    assert_eq!(
        access(mine.id.clone(), in_missing_project).await,
        Some((mine.clone(), None)),
        "a member, but no such project"
    );
    assert_eq!(
        access(mine.id.clone(), in_other_org).await,
        Some((mine.clone(), None))
    );
    assert_eq!(
        access(theirs.id.clone(), in_web.clone()).await,
        Some((theirs.clone(), None)),
        "not a member"
    );
    assert_eq!(
        access(AuthSessionId::generate(), in_web.clone()).await,
        None
    );

    // A role change shows at once; a revoked session comes back revoked (the caller decides).
    store
        .put_member(&org_id, &member.id, Role::Viewer, now, &[])
        .await
        .expect("role");
    assert!(
        store
            .revoke_auth_session(&mine.id, now + 1, &[])
            .await
            .expect("revoke")
    );
    let (session, role) = access(mine.id.clone(), in_web).await.expect("session");
    assert_eq!(role, Some(Role::Viewer));
    assert_eq!(session.revoked_at, Some(now + 1));
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
            (RefreshOutcome::Retried(_), _) => panic!("sign-in sessions have no retries"),
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

/// Housekeeping deletes only what ended before the cut-off. The ended things here lie in 1970, so
/// this test cannot disturb tests running beside it on the same database.
pub async fn prune_ended_deletes_only_what_ended_before_the_cutoff(store: DynStore) {
    const CUTOFF: Millis = 10_000;
    let now = now_millis();
    let t = tenant(&unique("org"));

    let ancient = pairing(PairingCode::generate().as_str(), 1_000);
    let live = pairing(PairingCode::generate().as_str(), now + 60_000);
    for p in [&ancient, &live] {
        store
            .create_pairing(p, p.created_at.min(p.expires_at - 1), &[])
            .await
            .expect("pairing");
    }

    // A device whose current access token expired long ago (its refresh token has not).
    let (device, first) = paired_device_with_tokens(&store, &t).await;
    let stale = token_pair(2_000, now + 86_400_000);
    assert!(matches!(
        store
            .rotate_device_tokens(&device, &first.refresh_hash, &stale, now, 0)
            .await
            .expect("rotate"),
        RefreshOutcome::Rotated(_)
    ));

    let user = created_user(&store).await;
    let session = |expires_at: Millis| login_session(&user.id, 500, expires_at);
    let expired = session(3_000);
    let revoked_long_ago = session(now + 60_000);
    let revoked_now = session(now + 60_000);
    let active = session(now + 60_000);
    let mut refresh = Vec::new();
    for s in [&expired, &revoked_long_ago, &revoked_now, &active] {
        let r = SecretHash::of(&unique("r"));
        store
            .create_auth_session(s, &r, &[])
            .await
            .expect("session");
        refresh.push(r);
    }
    assert!(
        store
            .revoke_auth_session(&revoked_long_ago.id, 4_000, &[])
            .await
            .expect("revoke")
    );
    assert!(
        store
            .revoke_auth_session(&revoked_now.id, now, &[])
            .await
            .expect("revoke")
    );
    let ticket_hash = SecretHash::of(&unique("nxt_"));
    store
        .create_stream_ticket(
            &ticket_hash,
            &StreamTicket {
                user_id: user.id.clone(),
                auth_session: active.id.clone(),
                tenant: t.clone(),
                session_id: SessionId::parse("s", "live-1").expect("session"),
                expires_at: 5_000,
            },
        )
        .await
        .expect("ticket");

    let pruned = store.prune_ended(CUTOFF).await.expect("prune");
    // Pairing, access token, ticket, two sessions and their two refresh tokens (at least: a
    // concurrent test may have ended something in 1970 too).
    assert!(pruned >= 7, "pruned {pruned}");

    assert!(store.pairing(&ancient.id).await.expect("read").is_none());
    assert!(store.pairing(&live.id).await.expect("read").is_some());
    assert!(
        store
            .device_credential(&stale.access_hash)
            .await
            .expect("read")
            .is_none()
    );
    assert!(
        store.device(&t, &device).await.expect("read").is_some(),
        "devices stay"
    );
    for (s, gone) in [
        (&expired, true),
        (&revoked_long_ago, true),
        (&revoked_now, false),
        (&active, false),
    ] {
        assert_eq!(
            store.auth_session(&s.id).await.expect("read").is_none(),
            gone,
            "{s:?}"
        );
    }
    // What is left still works: the device's refresh token, the active session's refresh token.
    assert!(matches!(
        store
            .rotate_device_tokens(
                &device,
                &stale.refresh_hash,
                &token_pair(now + 60_000, now + 86_400_000),
                now,
                0
            )
            .await
            .expect("rotate"),
        RefreshOutcome::Rotated(_)
    ));
    assert!(matches!(
        store
            .rotate_refresh_token(
                &refresh[3],
                &SecretHash::of(&unique("r")),
                now + 60_000,
                now
            )
            .await
            .expect("rotate"),
        RefreshOutcome::Rotated(_)
    ));
    assert_eq!(
        store.prune_ended(CUTOFF).await.expect("again"),
        0,
        "idempotent"
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

// --- commands and approvals (issue 5) ---------------------------------------------------------

const REQUESTER: &str = "usr_requester";

/// A proposal as the service builds it: GREEN/YELLOW runnable at once (queued, with a delivery
/// deadline), RED waiting for approval (no deadline).
fn proposal(t: &TenantId, device: &DeviceId, kind: &str, risk: Risk, at: Millis) -> CommandRecord {
    let needs_approval = risk == Risk::Red;
    CommandRecord {
        id: CommandId::generate(),
        tenant: t.clone(),
        device_id: device.clone(),
        command_type: kind.into(),
        params: json!({"path": "/tmp/é", "n": 1, "nested": {"b": [1, 2], "a": null}}),
        risk,
        status: if needs_approval {
            CommandStatus::PendingApproval
        } else {
            CommandStatus::Queued
        },
        session_id: SessionId::from_trusted(format!("device:{device}")),
        correlation_id: unique("corr"),
        requested_by: UserId::from_trusted(REQUESTER.into()),
        requested_at: at,
        request_hash: unique("hash"),
        approval_id: needs_approval.then(ApprovalId::generate),
        replaces: None,
        attempt: 0,
        updated_at: at,
        deadline: (!needs_approval).then_some(at + 3_600_000),
        result: None,
    }
}

/// What the device receives for a record.
fn body_of(r: &CommandRecord) -> DeviceCommand {
    DeviceCommand {
        command_id: r.id.clone(),
        command_type: r.command_type.clone(),
        params: r.params.clone(),
        context: serde_json::Value::Null,
        client_context: ClientContext {
            surface: Some("sidecar".into()),
            correlation_id: Some(r.correlation_id.clone()),
            session_id: Some(r.session_id.to_string()),
        },
        policy: CommandPolicy {
            risk: r.risk,
            approval_id: r.approval_id.as_ref().map(ToString::to_string),
        },
        created_at: "2026-01-01T00:00:00.000Z".into(),
        attempt: 0,
        run_before: None,
        approval: None,
    }
}

/// The approval of a record that waits for one.
fn approval_of(r: &CommandRecord, expires_at: Millis) -> Approval {
    Approval {
        id: r
            .approval_id
            .clone()
            .expect("a record waiting for approval"),
        tenant: r.tenant.clone(),
        command_id: r.id.clone(),
        device_id: r.device_id.clone(),
        command_type: r.command_type.clone(),
        risk: r.risk,
        summary: format!("{} on {}", r.command_type, r.device_id),
        requested_by: r.requested_by.clone(),
        requested_at: r.requested_at,
        expires_at,
        status: ApprovalStatus::Pending,
        decided_by: None,
        decided_at: None,
        reason: None,
    }
}

/// Stores `r` as the service would: with its approval (expiring at `expires_at`) if it waits for
/// one, in its device's queue otherwise; audited as `command.propose`.
async fn create(store: &DynStore, r: &CommandRecord, expires_at: Millis) -> Option<Approval> {
    let approval = r.approval_id.is_some().then(|| approval_of(r, expires_at));
    let queue = (r.status == CommandStatus::Queued).then(|| body_of(r));
    let audit = record(
        &AuditScope::Tenant(r.tenant.clone()),
        "command.propose",
        REQUESTER,
        r.requested_at,
    );
    let created = store
        .create_command(r, approval.as_ref(), queue.as_ref(), &[audit])
        .await
        .expect("create command");
    assert_eq!(created, Created::New(r.clone()));
    approval
}

async fn propose(
    store: &DynStore,
    t: &TenantId,
    device: &DeviceId,
    kind: &str,
    risk: Risk,
    at: Millis,
) -> CommandRecord {
    let r = proposal(t, device, kind, risk, at);
    create(store, &r, at + 300_000).await;
    r
}

async fn propose_red(
    store: &DynStore,
    t: &TenantId,
    device: &DeviceId,
    at: Millis,
    expires_at: Millis,
) -> (CommandRecord, Approval) {
    let r = proposal(t, device, "shell.exec", Risk::Red, at);
    let approval = create(store, &r, expires_at).await.expect("approval");
    (r, approval)
}

#[allow(clippy::too_many_arguments)]
async fn decide(
    store: &DynStore,
    a: &Approval,
    decision: ApprovalStatus,
    by: &str,
    at: Millis,
    queue: Option<&DeviceCommand>,
    deadline: Option<Millis>,
) -> Option<(Approval, CommandRecord)> {
    let action = format!("approval.{}", decision.as_str());
    let scope = AuditScope::Tenant(a.tenant.clone());
    store
        .decide_approval(
            &a.tenant,
            &a.id,
            decision,
            &UserId::from_trusted(by.into()),
            at,
            Some("because"),
            queue,
            deadline,
            &[record(&scope, &action, by, at)],
        )
        .await
        .expect("decide")
}

async fn deliver_all(
    store: &DynStore,
    t: &TenantId,
    device: &DeviceId,
    at: Millis,
) -> Vec<CommandId> {
    store
        .deliver_commands(t, device, 0, 100, at, at + 600_000)
        .await
        .expect("deliver")
        .into_iter()
        .map(|d| d.record.id)
        .collect()
}

async fn tenant_actions(store: &DynStore, t: &TenantId) -> Vec<String> {
    actions(&verified_chain(store, &AuditScope::Tenant(t.clone())).await)
        .into_iter()
        .map(str::to_owned)
        .collect()
}

async fn transition(
    store: &DynStore,
    r: &CommandRecord,
    from: &[CommandStatus],
    to: CommandStatus,
    at: Millis,
    change: &CommandChange,
) -> Option<CommandRecord> {
    let scope = AuditScope::Tenant(r.tenant.clone());
    store
        .transition_command(
            &r.tenant,
            &r.id,
            from,
            to,
            at,
            change,
            &[record(
                &scope,
                &format!("command.{}", to.as_str()),
                "usr_x",
                at,
            )],
        )
        .await
        .expect("transition")
}

pub async fn idempotent_create_writes_once(store: DynStore) {
    let t = tenant(&unique("org"));
    let device = paired_device(&store, &t).await;
    let base = now_millis();
    let original = propose(&store, &t, &device, "fs.read", Risk::Green, base).await;

    // The same id again, with another body, an approval and a queue entry: nothing is written.
    let mut again = original.clone();
    again.params = json!({"other": true});
    again.request_hash = unique("hash");
    again.requested_at = base + 5;
    let scope = AuditScope::Tenant(t.clone());
    let audit = [record(&scope, "command.propose", REQUESTER, base + 5)];
    assert_eq!(
        store
            .create_command(&again, None, Some(&body_of(&again)), &audit)
            .await
            .expect("create again"),
        Created::Existing(original.clone())
    );
    let mut red = original.clone();
    red.risk = Risk::Red;
    red.status = CommandStatus::PendingApproval;
    red.approval_id = Some(ApprovalId::generate());
    red.deadline = None;
    let approval = approval_of(&red, base + 300_000);
    assert_eq!(
        store
            .create_command(&red, Some(&approval), None, &audit)
            .await
            .expect("create again"),
        Created::Existing(original.clone())
    );
    assert!(
        store
            .approval(&t, &approval.id)
            .await
            .expect("read")
            .is_none(),
        "no approval was written"
    );
    assert!(
        store
            .list_approvals(&t, None, 10)
            .await
            .expect("list")
            .is_empty()
    );
    assert_eq!(
        store.command(&t, &original.id).await.expect("read"),
        Some(original.clone())
    );
    assert_eq!(
        deliver_all(&store, &t, &device, base + 10).await,
        vec![original.id.clone()],
        "queued once"
    );
    assert_eq!(tenant_actions(&store, &t).await, vec!["command.propose"]);

    // Command ids are the client's: the same id in another tenant is another command.
    let other = tenant(&unique("other"));
    let other_device = paired_device(&store, &other).await;
    let mut theirs = proposal(&other, &other_device, "fs.list", Risk::Green, base);
    theirs.id = original.id.clone();
    create(&store, &theirs, base + 300_000).await;
    assert_eq!(
        deliver_all(&store, &other, &other_device, base + 10).await,
        vec![original.id.clone()]
    );
    assert_eq!(
        store
            .command(&t, &original.id)
            .await
            .expect("read")
            .expect("found")
            .command_type,
        "fs.read"
    );
}

pub async fn approval_required_commands_are_not_queued(store: DynStore) {
    let t = tenant(&unique("org"));
    let device = paired_device(&store, &t).await;
    let base = now_millis();
    let (r, a) = propose_red(&store, &t, &device, base, base + 300_000).await;
    assert_eq!(
        store.command(&t, &r.id).await.expect("read"),
        Some(r.clone())
    );
    assert_eq!(
        store.approval(&t, &a.id).await.expect("read"),
        Some(a.clone())
    );
    assert!(
        deliver_all(&store, &t, &device, base + 1).await.is_empty(),
        "a command waiting for approval is never delivered"
    );
    assert_eq!(
        store
            .list_approvals(&t, Some(ApprovalStatus::Pending), 10)
            .await
            .expect("list"),
        vec![a]
    );
    let (pending, _) = store
        .list_commands(
            &t,
            &CommandQuery {
                status: Some(CommandStatus::PendingApproval),
                limit: 10,
                ..CommandQuery::default()
            },
        )
        .await
        .expect("list");
    assert_eq!(pending, vec![r]);
}

pub async fn concurrent_decisions_have_one_winner(store: DynStore) {
    let t = tenant(&unique("org"));
    let device = paired_device(&store, &t).await;
    let base = now_millis();
    let (r, a) = propose_red(&store, &t, &device, base, base + 300_000).await;
    let mut tasks = Vec::new();
    for i in 0..20 {
        let (store, a, body) = (store.clone(), a.clone(), body_of(&r));
        tasks.push(tokio::spawn(async move {
            let by = format!("usr_approver{i}");
            let decided = decide(
                &store,
                &a,
                ApprovalStatus::Approved,
                &by,
                base + 10,
                Some(&body),
                Some(base + 3_600_000),
            )
            .await;
            (by, decided)
        }));
    }
    let mut winners = Vec::new();
    for task in futures::future::join_all(tasks).await {
        let (by, decided) = task.expect("task");
        if let Some(decided) = decided {
            winners.push((by, decided));
        }
    }
    assert_eq!(winners.len(), 1, "exactly one decision wins");
    let (by, (approval, record)) = winners.remove(0);
    assert_eq!(approval.status, ApprovalStatus::Approved);
    assert_eq!(approval.decided_by, Some(UserId::from_trusted(by)));
    assert_eq!(approval.decided_at, Some(base + 10));
    assert_eq!(approval.reason.as_deref(), Some("because"));
    assert_eq!(record.status, CommandStatus::Queued);
    assert_eq!(record.deadline, Some(base + 3_600_000));
    assert_eq!(record.updated_at, base + 10);
    assert_eq!(
        store.approval(&t, &a.id).await.expect("read"),
        Some(approval)
    );
    assert_eq!(store.command(&t, &r.id).await.expect("read"), Some(record));

    let delivered = store
        .deliver_commands(&t, &device, 0, 100, base + 20, base + 600_000)
        .await
        .expect("deliver");
    assert_eq!(delivered.len(), 1, "queued once");
    assert_eq!(delivered[0].command, body_of(&r));
    assert!(
        store
            .deliver_commands(
                &t,
                &device,
                delivered[0].seq,
                100,
                base + 21,
                base + 600_000
            )
            .await
            .expect("deliver")
            .is_empty()
    );
    assert!(
        decide(
            &store,
            &a,
            ApprovalStatus::Denied,
            "usr_late",
            base + 30,
            None,
            None
        )
        .await
        .is_none(),
        "a decided approval stays decided"
    );
    let approvals = tenant_actions(&store, &t)
        .await
        .into_iter()
        .filter(|a| a.starts_with("approval."))
        .count();
    assert_eq!(approvals, 1, "only the winner is audited");
}

pub async fn denied_approval_never_runs(store: DynStore) {
    let t = tenant(&unique("org"));
    let device = paired_device(&store, &t).await;
    let base = now_millis();
    let (r, a) = propose_red(&store, &t, &device, base, base + 300_000).await;
    // A queue entry offered with a denial is ignored.
    let (approval, record) = decide(
        &store,
        &a,
        ApprovalStatus::Denied,
        "usr_boss",
        base + 10,
        Some(&body_of(&r)),
        Some(base + 3_600_000),
    )
    .await
    .expect("denied");
    assert_eq!(approval.status, ApprovalStatus::Denied);
    assert_eq!(
        approval.decided_by,
        Some(UserId::from_trusted("usr_boss".into()))
    );
    assert_eq!(record.status, CommandStatus::Denied);
    assert_eq!(record.deadline, None);
    assert!(deliver_all(&store, &t, &device, base + 20).await.is_empty());
    assert!(
        decide(
            &store,
            &a,
            ApprovalStatus::Approved,
            "usr_x",
            base + 30,
            Some(&body_of(&r)),
            None
        )
        .await
        .is_none()
    );
    assert!(
        store
            .expire_approval(&t, &a.id, base + 10_000_000, &[])
            .await
            .expect("expire")
            .is_none()
    );
    assert!(deliver_all(&store, &t, &device, base + 40).await.is_empty());
    assert_eq!(
        tenant_actions(&store, &t).await,
        vec!["command.propose", "approval.denied"]
    );
}

pub async fn expired_approvals_cannot_be_decided_and_are_swept(store: DynStore) {
    let t = tenant(&unique("org"));
    let device = paired_device(&store, &t).await;
    let base = now_millis();
    let (r1, a1) = propose_red(&store, &t, &device, base, base + 1_000).await;
    let (_, a2) = propose_red(&store, &t, &device, base, base + 5_000).await;
    let body = body_of(&r1);
    assert!(
        decide(
            &store,
            &a1,
            ApprovalStatus::Approved,
            "usr_x",
            base + 1_000,
            Some(&body),
            None
        )
        .await
        .is_none(),
        "at expires_at it is too late"
    );
    let due = |now: Millis| {
        let store = store.clone();
        async move { store.due_approvals(now, 1_000).await.expect("due") }
    };
    assert!(!due(base + 999).await.contains(&(t.clone(), a1.id.clone())));
    let due_now = due(base + 1_000).await;
    assert!(due_now.contains(&(t.clone(), a1.id.clone())));
    assert!(!due_now.contains(&(t.clone(), a2.id.clone())));
    assert!(
        store
            .due_approvals(base + 1_000_000, 1)
            .await
            .expect("due")
            .len()
            <= 1
    );

    let scope = AuditScope::Tenant(t.clone());
    let audit = [record(&scope, "approval.expire", "system", base + 1_000)];
    assert!(
        store
            .expire_approval(&t, &a1.id, base + 999, &audit)
            .await
            .expect("expire")
            .is_none(),
        "not due yet"
    );
    assert!(
        store
            .expire_approval(&tenant(&unique("other")), &a1.id, base + 1_000, &audit)
            .await
            .expect("expire")
            .is_none()
    );
    let (approval, record) = store
        .expire_approval(&t, &a1.id, base + 1_000, &audit)
        .await
        .expect("expire")
        .expect("expired");
    assert_eq!(approval.status, ApprovalStatus::Expired);
    assert_eq!(approval.decided_by, None);
    assert_eq!(approval.decided_at, Some(base + 1_000));
    assert_eq!(record.id, r1.id);
    assert_eq!(record.status, CommandStatus::Expired);
    assert_eq!(record.deadline, None);
    assert!(
        store
            .expire_approval(&t, &a1.id, base + 2_000, &audit)
            .await
            .expect("expire")
            .is_none()
    );
    assert!(
        decide(
            &store,
            &a1,
            ApprovalStatus::Approved,
            "usr_x",
            base + 500,
            Some(&body),
            None
        )
        .await
        .is_none(),
        "an expired approval cannot be decided, whatever the caller's clock says"
    );
    assert!(
        !due(base + 2_000)
            .await
            .contains(&(t.clone(), a1.id.clone()))
    );
    assert!(
        deliver_all(&store, &t, &device, base + 2_000)
            .await
            .is_empty()
    );
    assert_eq!(
        tenant_actions(&store, &t)
            .await
            .iter()
            .filter(|a| a.starts_with("approval."))
            .collect::<Vec<_>>(),
        vec!["approval.expire"]
    );
}

pub async fn concurrent_expiry_and_decision_have_one_winner(store: DynStore) {
    let t = tenant(&unique("org"));
    let device = paired_device(&store, &t).await;
    let base = now_millis();
    for _ in 0..10 {
        let (r, a) = propose_red(&store, &t, &device, base, base + 1_000).await;
        // A replica whose clock is just before the expiry decides while another one's sweeper
        // expires it.
        let decider = {
            let (store, a, body) = (store.clone(), a.clone(), body_of(&r));
            tokio::spawn(async move {
                decide(
                    &store,
                    &a,
                    ApprovalStatus::Approved,
                    "usr_x",
                    base + 999,
                    Some(&body),
                    Some(base + 60_000),
                )
                .await
            })
        };
        let sweeper = {
            let (store, t, id) = (store.clone(), t.clone(), a.id.clone());
            tokio::spawn(async move {
                store
                    .expire_approval(&t, &id, base + 1_000, &[])
                    .await
                    .expect("expire")
            })
        };
        let (decided, expired) = (decider.await.expect("task"), sweeper.await.expect("task"));
        assert!(
            decided.is_some() != expired.is_some(),
            "exactly one of decide and expire wins"
        );
        let approval = store
            .approval(&t, &a.id)
            .await
            .expect("read")
            .expect("found");
        let command = store
            .command(&t, &r.id)
            .await
            .expect("read")
            .expect("found");
        match approval.status {
            ApprovalStatus::Approved => assert_eq!(command.status, CommandStatus::Queued),
            ApprovalStatus::Expired => assert_eq!(command.status, CommandStatus::Expired),
            other => panic!("unexpected approval status {other:?}"),
        }
    }
}

pub async fn transitions_are_compare_and_set(store: DynStore) {
    let t = tenant(&unique("org"));
    let device = paired_device(&store, &t).await;
    let base = now_millis();
    let none = CommandChange::default();
    let c = propose(&store, &t, &device, "fs.read", Risk::Green, base).await;
    assert!(
        transition(
            &store,
            &c,
            &[CommandStatus::Delivered],
            CommandStatus::Succeeded,
            base + 1,
            &none
        )
        .await
        .is_none(),
        "wrong from: nothing changes"
    );
    let clear = CommandChange {
        deadline: Some(None),
        ..CommandChange::default()
    };
    let cancelled = transition(
        &store,
        &c,
        &[CommandStatus::Queued],
        CommandStatus::Cancelled,
        base + 5,
        &clear,
    )
    .await
    .expect("cancelled");
    assert_eq!(cancelled.status, CommandStatus::Cancelled);
    assert_eq!(cancelled.deadline, None);
    assert_eq!(cancelled.updated_at, base + 5);
    assert!(
        transition(
            &store,
            &c,
            &[CommandStatus::Queued],
            CommandStatus::Cancelled,
            base + 6,
            &clear
        )
        .await
        .is_none()
    );
    assert!(
        deliver_all(&store, &t, &device, base + 7).await.is_empty(),
        "a cancelled command leaves the queue"
    );

    // A result is kept; a finished command is not delivered again.
    let d = propose(&store, &t, &device, "fs.list", Risk::Green, base).await;
    assert_eq!(
        deliver_all(&store, &t, &device, base + 8).await,
        vec![d.id.clone()]
    );
    let result = json!({"report_id": "r1", "event_id": 7, "session_id": "s"});
    let done = transition(
        &store,
        &d,
        &[CommandStatus::Delivered, CommandStatus::Acked],
        CommandStatus::Succeeded,
        base + 9,
        &CommandChange {
            result: Some(result.clone()),
            deadline: Some(None),
        },
    )
    .await
    .expect("succeeded");
    assert_eq!(done.status, CommandStatus::Succeeded);
    assert_eq!(done.result, Some(result));
    assert_eq!(done.deadline, None);
    assert_eq!(done.attempt, 1);
    assert!(deliver_all(&store, &t, &device, base + 10).await.is_empty());
    assert!(
        transition(
            &store,
            &d,
            &[CommandStatus::Delivered],
            CommandStatus::Failed,
            base + 11,
            &none
        )
        .await
        .is_none()
    );
    // The state machine only goes forward: anything else is refused as a bug.
    assert!(
        store
            .transition_command(
                &t,
                &d.id,
                &[CommandStatus::Succeeded],
                CommandStatus::Queued,
                base + 12,
                &none,
                &[]
            )
            .await
            .is_err()
    );
    // Setting a deadline.
    let e = propose(&store, &t, &device, "fs.read", Risk::Green, base).await;
    assert_eq!(
        deliver_all(&store, &t, &device, base + 13).await,
        vec![e.id.clone()]
    );
    let acked_deadline = CommandChange {
        deadline: Some(Some(base + 99)),
        ..CommandChange::default()
    };
    let acked = transition(
        &store,
        &e,
        &[CommandStatus::Delivered],
        CommandStatus::Acked,
        base + 14,
        &acked_deadline,
    )
    .await
    .expect("acked");
    assert_eq!(
        (acked.status, acked.deadline),
        (CommandStatus::Acked, Some(base + 99))
    );

    // A timeout needs its deadline to have passed at the time of the change.
    let f = propose(&store, &t, &device, "fs.read", Risk::Green, base).await;
    let deadline = f.deadline.expect("delivery deadline");
    assert!(
        transition(
            &store,
            &f,
            &[CommandStatus::Queued],
            CommandStatus::DeliveryTimedOut,
            deadline - 1,
            &clear
        )
        .await
        .is_none()
    );
    let timed_out = transition(
        &store,
        &f,
        &[CommandStatus::Queued],
        CommandStatus::DeliveryTimedOut,
        deadline,
        &clear,
    )
    .await
    .expect("timed out");
    assert_eq!(timed_out.status, CommandStatus::DeliveryTimedOut);
    assert!(deliver_all(&store, &t, &device, base + 15).await.is_empty());
    assert_eq!(
        tenant_actions(&store, &t)
            .await
            .iter()
            .filter(|a| !a.starts_with("command.propose"))
            .collect::<Vec<_>>(),
        vec![
            "command.cancelled",
            "command.succeeded",
            "command.acked",
            "command.delivery_timed_out"
        ],
        "only the transitions that happened are audited"
    );
}

pub async fn due_commands_follow_deadlines(store: DynStore) {
    let t = tenant(&unique("org"));
    let device = paired_device(&store, &t).await;
    let base = now_millis();
    let mut c1 = proposal(&t, &device, "fs.read", Risk::Green, base);
    c1.deadline = Some(base + 100);
    create(&store, &c1, base + 300_000).await;
    let mut c2 = proposal(&t, &device, "fs.read", Risk::Green, base);
    c2.deadline = Some(base + 10_000);
    create(&store, &c2, base + 300_000).await;
    let (red, _) = propose_red(&store, &t, &device, base, base + 300_000).await;
    let due = |now: Millis| {
        let store = store.clone();
        async move { store.due_commands(now, 1_000).await.expect("due") }
    };
    let ours = |all: Vec<(TenantId, CommandId, CommandStatus)>| {
        let mut ours: Vec<(CommandId, CommandStatus)> = all
            .into_iter()
            .filter(|(tenant, _, _)| tenant == &t)
            .map(|(_, id, status)| (id, status))
            .collect();
        ours.sort_by(|a, b| a.0.cmp(&b.0));
        ours
    };
    let sorted = |mut v: Vec<(CommandId, CommandStatus)>| {
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    };
    assert!(ours(due(base + 99).await).is_empty());
    assert_eq!(
        ours(due(base + 100).await),
        vec![(c1.id.clone(), CommandStatus::Queued)],
        "queued past its delivery deadline"
    );
    // Delivered: the execution deadline applies.
    let delivered = store
        .deliver_commands(&t, &device, 0, 100, base + 150, base + 200)
        .await
        .expect("deliver");
    assert_eq!(delivered.len(), 2);
    assert!(ours(due(base + 199).await).is_empty());
    assert_eq!(
        ours(due(base + 200).await),
        sorted(vec![
            (c1.id.clone(), CommandStatus::Delivered),
            (c2.id.clone(), CommandStatus::Delivered)
        ])
    );
    assert!(matches!(
        store
            .ack_delivery(&t, &device, &c1.id, 1, base + 160, &[])
            .await
            .expect("ack"),
        AckOutcome::Acked(_)
    ));
    transition(
        &store,
        &c2,
        &[CommandStatus::Delivered],
        CommandStatus::Succeeded,
        base + 170,
        &CommandChange {
            deadline: Some(None),
            ..CommandChange::default()
        },
    )
    .await
    .expect("succeeded");
    assert_eq!(
        ours(due(base + 200).await),
        vec![(c1.id.clone(), CommandStatus::Acked)],
        "acked but not finished in time"
    );
    assert!(
        !ours(due(base + 100_000_000).await)
            .iter()
            .any(|(id, _)| id == &red.id),
        "a command waiting for approval has no deadline"
    );
    assert!(store.due_commands(base + 200, 1).await.expect("due").len() <= 1);
    // An execution timeout ends the delivery: a late ack is refused.
    transition(
        &store,
        &c1,
        &[CommandStatus::Acked],
        CommandStatus::ExecutionTimedOut,
        base + 200,
        &CommandChange::default(),
    )
    .await
    .expect("timed out");
    assert!(
        ours(due(base + 100_000_000).await)
            .iter()
            .all(|(id, _)| id != &c1.id)
    );
}

pub async fn list_commands_filters_and_pages_newest_first(store: DynStore) {
    let t = tenant(&unique("org"));
    let (d1, d2) = (
        paired_device(&store, &t).await,
        paired_device(&store, &t).await,
    );
    let base = now_millis();
    let mut made = Vec::new();
    for (i, (device, risk)) in [
        (&d1, Risk::Green),
        (&d1, Risk::Red),
        (&d2, Risk::Green),
        (&d2, Risk::Red),
        (&d1, Risk::Green),
        (&d2, Risk::Yellow),
        (&d1, Risk::Red),
    ]
    .into_iter()
    .enumerate()
    {
        made.push(propose(&store, &t, device, "fs.read", risk, base + i as i64).await);
    }
    let ids = |records: &[CommandRecord]| records.iter().map(|r| r.id.clone()).collect::<Vec<_>>();
    let newest_first: Vec<CommandId> = made.iter().rev().map(|r| r.id.clone()).collect();
    let list = |query: CommandQuery| {
        let (store, t) = (store.clone(), t.clone());
        async move { store.list_commands(&t, &query).await.expect("list") }
    };

    let mut pages = Vec::new();
    let mut before = None;
    loop {
        let (page, next) = list(CommandQuery {
            before,
            limit: 3,
            ..CommandQuery::default()
        })
        .await;
        assert!(page.len() <= 3);
        pages.extend(ids(&page));
        match next {
            Some(cursor) => before = Some(cursor),
            None => break,
        }
    }
    assert_eq!(pages, newest_first, "every command once, newest first");
    let (page, next) = list(CommandQuery {
        limit: 7,
        ..CommandQuery::default()
    })
    .await;
    assert_eq!(
        (page.len(), next),
        (7, None),
        "no cursor after the last page"
    );
    assert_eq!(page[0], made[6], "records read back as stored");

    let (pending, _) = list(CommandQuery {
        status: Some(CommandStatus::PendingApproval),
        limit: 10,
        ..CommandQuery::default()
    })
    .await;
    assert_eq!(
        ids(&pending),
        vec![made[6].id.clone(), made[3].id.clone(), made[1].id.clone()]
    );
    let (on_d2, _) = list(CommandQuery {
        device_id: Some(d2.clone()),
        limit: 10,
        ..CommandQuery::default()
    })
    .await;
    assert_eq!(
        ids(&on_d2),
        vec![made[5].id.clone(), made[3].id.clone(), made[2].id.clone()]
    );
    let (queued_d1, next) = list(CommandQuery {
        status: Some(CommandStatus::Queued),
        device_id: Some(d1.clone()),
        limit: 1,
        ..CommandQuery::default()
    })
    .await;
    assert_eq!(ids(&queued_d1), vec![made[4].id.clone()]);
    let (rest, next) = list(CommandQuery {
        status: Some(CommandStatus::Queued),
        device_id: Some(d1.clone()),
        before: next,
        limit: 1,
    })
    .await;
    assert_eq!((ids(&rest), next), (vec![made[0].id.clone()], None));
    let (theirs, next) = store
        .list_commands(
            &tenant(&unique("other")),
            &CommandQuery {
                limit: 10,
                ..CommandQuery::default()
            },
        )
        .await
        .expect("list");
    assert!(theirs.is_empty() && next.is_none());
}

pub async fn list_approvals_by_status(store: DynStore) {
    let t = tenant(&unique("org"));
    let device = paired_device(&store, &t).await;
    let base = now_millis();
    let mut approvals = Vec::new();
    let mut records = Vec::new();
    for i in 0..3 {
        let (r, a) = propose_red(&store, &t, &device, base + i, base + 300_000).await;
        records.push(r);
        approvals.push(a);
    }
    decide(
        &store,
        &approvals[0],
        ApprovalStatus::Approved,
        "usr_x",
        base + 10,
        Some(&body_of(&records[0])),
        None,
    )
    .await
    .expect("approved");
    decide(
        &store,
        &approvals[1],
        ApprovalStatus::Denied,
        "usr_x",
        base + 10,
        None,
        None,
    )
    .await
    .expect("denied");
    let list = |status: Option<ApprovalStatus>, limit: u32| {
        let (store, t) = (store.clone(), t.clone());
        async move {
            store
                .list_approvals(&t, status, limit)
                .await
                .expect("list")
                .into_iter()
                .map(|a| (a.id, a.status))
                .collect::<Vec<_>>()
        }
    };
    let ids = |which: &[usize]| {
        which
            .iter()
            .map(|i| approvals[*i].id.clone())
            .collect::<Vec<_>>()
    };
    let only_ids =
        |v: Vec<(ApprovalId, ApprovalStatus)>| v.into_iter().map(|(id, _)| id).collect::<Vec<_>>();
    assert_eq!(
        only_ids(list(None, 10).await),
        ids(&[2, 1, 0]),
        "newest first"
    );
    assert_eq!(only_ids(list(None, 2).await), ids(&[2, 1]));
    assert_eq!(
        list(Some(ApprovalStatus::Pending), 10).await,
        vec![(approvals[2].id.clone(), ApprovalStatus::Pending)]
    );
    assert_eq!(
        list(Some(ApprovalStatus::Approved), 10).await,
        vec![(approvals[0].id.clone(), ApprovalStatus::Approved)]
    );
    assert_eq!(
        list(Some(ApprovalStatus::Denied), 10).await,
        vec![(approvals[1].id.clone(), ApprovalStatus::Denied)]
    );
    assert!(list(Some(ApprovalStatus::Expired), 10).await.is_empty());
    assert!(
        store
            .list_approvals(&tenant(&unique("other")), None, 10)
            .await
            .expect("list")
            .is_empty()
    );
}

pub async fn command_policy_roundtrip(store: DynStore) {
    let t = tenant(&unique("org"));
    let base = now_millis();
    assert_eq!(store.command_policy(&t).await.expect("read"), None);
    let scope = AuditScope::Tenant(t.clone());
    let default = CommandPolicySettings::default();
    store
        .put_command_policy(
            &t,
            &default,
            base,
            &[record(&scope, "policy.update", "usr_a", base)],
        )
        .await
        .expect("put");
    assert_eq!(
        store.command_policy(&t).await.expect("read"),
        Some(default.clone())
    );
    let mut changed = default.clone();
    changed.rules.push(RiskRule {
        pattern: "media.*".into(),
        risk: Risk::Yellow,
    });
    changed.yellow_requires_approval = true;
    changed.require_distinct_approver = true;
    changed.approval_ttl_secs = 60;
    changed.delivery_ttl_secs = 120;
    changed.execution_timeout_secs = 30;
    store
        .put_command_policy(
            &t,
            &changed,
            base + 1,
            &[record(&scope, "policy.update", "usr_a", base + 1)],
        )
        .await
        .expect("put");
    assert_eq!(store.command_policy(&t).await.expect("read"), Some(changed));
    assert_eq!(
        store
            .command_policy(&tenant(&unique("other")))
            .await
            .expect("read"),
        None
    );
    assert_eq!(
        tenant_actions(&store, &t).await,
        vec!["policy.update", "policy.update"]
    );
}

pub async fn commands_are_tenant_scoped(store: DynStore) {
    let t = tenant(&unique("org"));
    let other = tenant(&unique("other"));
    let device = paired_device(&store, &t).await;
    let base = now_millis();
    let (r, a) = propose_red(&store, &t, &device, base, base + 1_000).await;
    let g = propose(&store, &t, &device, "fs.read", Risk::Green, base).await;
    store
        .put_command_policy(&t, &CommandPolicySettings::default(), base, &[])
        .await
        .expect("put");

    assert!(store.command(&other, &r.id).await.expect("read").is_none());
    assert!(store.approval(&other, &a.id).await.expect("read").is_none());
    assert!(store.command_policy(&other).await.expect("read").is_none());
    let mut foreign = a.clone();
    foreign.tenant = other.clone();
    assert!(
        decide(
            &store,
            &foreign,
            ApprovalStatus::Approved,
            "usr_x",
            base + 1,
            Some(&body_of(&r)),
            None
        )
        .await
        .is_none()
    );
    assert!(
        store
            .expire_approval(&other, &a.id, base + 5_000, &[])
            .await
            .expect("expire")
            .is_none()
    );
    assert!(
        store
            .transition_command(
                &other,
                &g.id,
                &[CommandStatus::Queued],
                CommandStatus::Cancelled,
                base + 1,
                &CommandChange::default(),
                &[]
            )
            .await
            .expect("transition")
            .is_none()
    );
    assert!(
        deliver_all(&store, &other, &device, base + 2)
            .await
            .is_empty()
    );
    assert_eq!(
        store
            .approval(&t, &a.id)
            .await
            .expect("read")
            .expect("found")
            .status,
        ApprovalStatus::Pending,
        "untouched"
    );
    assert_eq!(
        store
            .command(&t, &g.id)
            .await
            .expect("read")
            .expect("found")
            .status,
        CommandStatus::Queued,
        "untouched"
    );
    assert!(
        verified_chain(&store, &AuditScope::Tenant(other.clone()))
            .await
            .is_empty()
    );
    // The sweeper reads across tenants, but names each item's own tenant.
    assert!(
        store
            .due_approvals(base + 1_000, 1_000)
            .await
            .expect("due")
            .contains(&(t.clone(), a.id.clone()))
    );
    assert!(
        store
            .due_commands(g.deadline.expect("deadline"), 1_000)
            .await
            .expect("due")
            .contains(&(t.clone(), g.id.clone(), CommandStatus::Queued))
    );
    assert_eq!(
        deliver_all(&store, &t, &device, base + 3).await,
        vec![g.id.clone()]
    );
}

pub async fn cancel_races_delivery(store: DynStore) {
    let t = tenant(&unique("org"));
    let device = paired_device(&store, &t).await;
    let base = now_millis();
    let mut commands = Vec::new();
    for _ in 0..10 {
        commands.push(propose(&store, &t, &device, "fs.read", Risk::Green, base).await);
    }
    let puller = {
        let (store, t, device) = (store.clone(), t.clone(), device.clone());
        tokio::spawn(async move { deliver_all(&store, &t, &device, base + 1).await })
    };
    let mut cancels = Vec::new();
    for c in commands.iter().rev() {
        let (store, c) = (store.clone(), c.clone());
        cancels.push(tokio::spawn(async move {
            let cancelled = transition(
                &store,
                &c,
                &[CommandStatus::Queued],
                CommandStatus::Cancelled,
                base + 1,
                &CommandChange::default(),
            )
            .await;
            (c.id, cancelled.is_some())
        }));
    }
    let delivered = puller.await.expect("task");
    for task in futures::future::join_all(cancels).await {
        let (id, cancelled) = task.expect("task");
        assert!(
            cancelled != delivered.contains(&id),
            "a command is either cancelled or delivered, never both"
        );
        let status = store
            .command(&t, &id)
            .await
            .expect("read")
            .expect("found")
            .status;
        assert_eq!(
            status,
            if cancelled {
                CommandStatus::Cancelled
            } else {
                CommandStatus::Delivered
            }
        );
    }
    assert!(
        deliver_all(&store, &t, &device, base + 2)
            .await
            .iter()
            .all(|id| delivered.contains(id)),
        "cancelled commands are never delivered later"
    );
}

pub async fn concurrent_acks_count_once(store: DynStore) {
    let t = tenant(&unique("org"));
    let device = paired_device(&store, &t).await;
    let base = now_millis();
    let c = propose(&store, &t, &device, "fs.read", Risk::Green, base).await;
    assert_eq!(
        deliver_all(&store, &t, &device, base + 1).await,
        vec![c.id.clone()]
    );
    let scope = AuditScope::Tenant(t.clone());
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let (store, t, device, id, scope) = (
            store.clone(),
            t.clone(),
            device.clone(),
            c.id.clone(),
            scope.clone(),
        );
        tasks.push(tokio::spawn(async move {
            store
                .ack_delivery(
                    &t,
                    &device,
                    &id,
                    1,
                    base + 2,
                    &[record(&scope, "command.ack", "dev", base + 2)],
                )
                .await
                .expect("ack")
        }));
    }
    let mut acked = 0;
    for task in futures::future::join_all(tasks).await {
        match task.expect("task") {
            AckOutcome::Acked(_) => acked += 1,
            AckOutcome::AlreadyAcked(r) => assert_eq!(r.status, CommandStatus::Acked),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(acked, 1);
    assert_eq!(
        tenant_actions(&store, &t).await,
        vec!["command.propose", "command.ack"]
    );
    // A report that finished the command before the ack arrived: the ack is a no-op.
    let d = propose(&store, &t, &device, "fs.read", Risk::Green, base).await;
    assert_eq!(
        deliver_all(&store, &t, &device, base + 3).await,
        vec![d.id.clone()]
    );
    transition(
        &store,
        &d,
        &[CommandStatus::Delivered],
        CommandStatus::Succeeded,
        base + 4,
        &CommandChange::default(),
    )
    .await
    .expect("succeeded");
    assert!(matches!(
        store.ack_delivery(&t, &device, &d.id, 1, base + 5, &[]).await.expect("ack"),
        AckOutcome::AlreadyAcked(r) if r.status == CommandStatus::Succeeded
    ));
    // A delivery that timed out is not acked any more: the device must not run it.
    let e = propose(&store, &t, &device, "fs.read", Risk::Green, base).await;
    let delivered = store
        .deliver_commands(&t, &device, 0, 100, base + 6, base + 7)
        .await
        .expect("deliver");
    assert_eq!(delivered.len(), 1);
    transition(
        &store,
        &e,
        &[CommandStatus::Delivered],
        CommandStatus::ExecutionTimedOut,
        base + 7,
        &CommandChange::default(),
    )
    .await
    .expect("timed out");
    assert!(matches!(
        store.ack_delivery(&t, &device, &e.id, 1, base + 8, &[]).await.expect("ack"),
        AckOutcome::StaleAttempt(r) if r.status == CommandStatus::ExecutionTimedOut
    ));
    assert!(deliver_all(&store, &t, &device, base + 9).await.is_empty());
}

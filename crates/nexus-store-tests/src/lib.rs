//! The storage conformance suite: every case is written once against `dyn Store` and run for
//! every backend through [`conformance_tests!`], so the backends cannot drift apart.

use std::collections::HashSet;
use std::sync::Arc;

use nexus_domain::command::{ClientContext, CommandPolicy, DeviceCommand, NewCommand, Risk};
use nexus_domain::report::ValidatedReport;
use nexus_domain::secret::SecretHash;
use nexus_domain::time::now_millis;
use nexus_domain::{
    CommandId, DeviceId, Pairing, PairingCode, PairingId, PairingState, SessionId, TenantId,
};
use nexus_store::{Heartbeat, NewDevice, Store, StoreError};
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
            one_request_spans_sessions, concurrent_duplicates_are_stored_once, concurrent_enqueues_keep_seqs_distinct_and_ordered, deleting_a_device_revokes_it);
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
    }
}

fn report(session: &str, report_id: &str) -> ValidatedReport {
    ValidatedReport::parse(&json!({"meta": {"report_id": report_id, "created_at": "2026-02-03T10:00:00+0900", "session_id": session}}))
        .expect("valid report")
}

/// Pairs a device directly through the store; returns it with the hash of its token.
async fn paired_device_with_token(store: &DynStore, tenant: &TenantId) -> (DeviceId, SecretHash) {
    let token_hash = SecretHash::of(&unique("tok"));
    let p = pairing(PairingCode::generate().as_str(), now_millis() + 60_000);
    store
        .create_pairing(&p, now_millis())
        .await
        .expect("create");
    let device_id = DeviceId::generate();
    assert!(
        store
            .confirm_pairing(&p.id, tenant, &device_id)
            .await
            .expect("confirm")
    );
    let device = NewDevice {
        id: device_id.clone(),
        tenant: tenant.clone(),
        name: "pc".into(),
        device_type: "windows_companion".into(),
        capabilities: vec![],
        token_hash: token_hash.clone(),
        paired_at: now_millis(),
    };
    assert!(
        store
            .complete_pairing(&p.id, &device)
            .await
            .expect("complete")
    );
    (device_id, token_hash)
}

async fn paired_device(store: &DynStore, tenant: &TenantId) -> DeviceId {
    paired_device_with_token(store, tenant).await.0
}

pub async fn pairing_lifecycle(store: DynStore) {
    let t = tenant(&unique("org"));
    let p = pairing("111-222", now_millis() + 60_000);
    store
        .create_pairing(&p, now_millis())
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
            .confirm_pairing(&p.id, &t, &device_id)
            .await
            .expect("confirm")
    );
    assert!(
        !store
            .confirm_pairing(&p.id, &t, &DeviceId::generate())
            .await
            .expect("second confirm")
    );
    let confirmed = store.pairing(&p.id).await.expect("read").expect("found");
    assert_eq!(confirmed.state, PairingState::Confirmed);
    assert_eq!(confirmed.tenant.as_ref(), Some(&t));
    assert_eq!(confirmed.device_id.as_ref(), Some(&device_id));

    let token_hash = SecretHash::of("nxd_secret");
    let device = NewDevice {
        id: device_id.clone(),
        tenant: t.clone(),
        name: "pc".into(),
        device_type: "windows_companion".into(),
        capabilities: vec!["fs.read".into()],
        token_hash: token_hash.clone(),
        paired_at: now_millis(),
    };
    assert!(
        store
            .complete_pairing(&p.id, &device)
            .await
            .expect("complete")
    );
    assert!(
        !store
            .complete_pairing(&p.id, &device)
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
    assert!(
        store
            .device_credential(&SecretHash::of("other"))
            .await
            .expect("read")
            .is_none()
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
    store.create_pairing(&live, now).await.expect("create");
    let clash = pairing("333-444", now + 60_000);
    assert!(matches!(
        store.create_pairing(&clash, now).await,
        Err(StoreError::Conflict(_))
    ));

    let expired = pairing("555-666", now - 1);
    store
        .create_pairing(&expired, now - 10)
        .await
        .expect("create expired");
    let reuse = pairing("555-666", now + 60_000);
    store
        .create_pairing(&reuse, now)
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
    let (device_id, token_hash) = paired_device_with_token(&store, &t).await;
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
            .delete_device(&tenant(&unique("other")), &device_id)
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
    assert!(store.delete_device(&t, &device_id).await.expect("delete"));
    assert!(
        store
            .device_credential(&token_hash)
            .await
            .expect("read")
            .is_none(),
        "the token is revoked"
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
            .delete_device(&t, &device_id)
            .await
            .expect("delete again")
    );
}

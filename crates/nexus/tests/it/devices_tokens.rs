//! Devices from the user's side and the device token lifecycle: the pairing preview against code
//! phishing, guessing codes throttled, token pairs that rotate and expire, reuse detection that
//! revokes the device, rename and delete.

use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};

use crate::support::*;

fn seconds_from_now(rfc3339: &Value) -> i64 {
    chrono::DateTime::parse_from_rfc3339(rfc3339.as_str().expect("time"))
        .expect("rfc3339")
        .signed_duration_since(chrono::Utc::now())
        .num_seconds()
}

async fn start_pairing(server: &TestServer, body: Value) -> Value {
    let (s, started) = status_json(
        server
            .http
            .post(server.url("/devices/pairing/start"))
            .json(&body)
            .send()
            .await
            .expect("start"),
    )
    .await;
    assert_eq!(s, 200, "{started}");
    started
}

async fn complete(server: &TestServer, started: &Value) -> (u16, Value) {
    status_json(
        server
            .http
            .post(server.url("/devices/pairing/complete"))
            .json(&json!({"pairing_id": started["pairing_id"], "device_nonce": started["device_nonce"]}))
            .send()
            .await
            .expect("complete"),
    )
    .await
}

async fn refresh_device(server: &TestServer, device_id: &str, refresh_token: &str) -> (u16, Value) {
    status_json(
        server
            .http
            .post(server.url("/devices/token/refresh"))
            .json(&json!({"device_id": device_id, "refresh_token": refresh_token}))
            .send()
            .await
            .expect("refresh"),
    )
    .await
}

async fn heartbeat(server: &TestServer, device_id: &str, token: &str) -> (u16, Value) {
    status_json(
        server
            .http
            .post(server.url(&format!("/devices/{device_id}/heartbeat")))
            .bearer_auth(token)
            .json(&json!({"status": "online"}))
            .send()
            .await
            .expect("heartbeat"),
    )
    .await
}

fn str_of<'a>(body: &'a Value, field: &str) -> &'a str {
    body[field]
        .as_str()
        .unwrap_or_else(|| panic!("{field} in {body}"))
}

#[tokio::test]
async fn the_preview_shows_what_the_device_said_and_code_guessing_is_throttled() {
    let server = TestServer::start().await;
    let started = start_pairing(
        &server,
        json!({"device_name": "Ann's laptop", "device_type": "laptop", "capabilities": ["fs.read", "shell.exec"], "agent_version": "2.3.1"}),
    )
    .await;
    let fingerprint = str_of(&started, "fingerprint");
    assert!(
        fingerprint.len() == 9 && fingerprint.as_bytes()[4] == b'-',
        "{fingerprint}"
    );
    let code = str_of(&started, "pairing_code").to_owned();

    let (s, preview) = server
        .post_json("/devices/pairing/preview", &json!({"pairing_code": code}))
        .await;
    assert_eq!(s, 200, "{preview}");
    assert_eq!(preview["pairing_id"], started["pairing_id"]);
    assert_eq!(preview["device_name"], "Ann's laptop");
    assert_eq!(preview["device_type"], "laptop");
    assert_eq!(preview["capabilities"], json!(["fs.read", "shell.exec"]));
    assert_eq!(preview["agent_version"], "2.3.1");
    assert_eq!(
        preview["client_ip"], "127.0.0.1",
        "the address the device called from"
    );
    assert_eq!(preview["fingerprint"], fingerprint, "what the device shows");
    assert_eq!(preview["state"], "pending");
    assert_eq!(preview["expires_at"], started["expires_at"]);
    assert!(seconds_from_now(&preview["requested_at"]).abs() < 60);
    assert!(
        preview.get("device_nonce").is_none()
            && !preview
                .to_string()
                .contains(str_of(&started, "device_nonce")),
        "the preview never reveals the nonce"
    );
    // Looking is not confirming.
    let (s, b) = complete(&server, &started).await;
    assert_problem(s, &b, 409, "pairing_not_confirmed");

    // Guessing: five wrong codes (preview or confirm), then even the right code is refused.
    let wrong_codes: Vec<String> = (0..5)
        .map(|i| {
            let candidate = format!("{:03}-{:03}", 100 + i, 200 + i);
            assert_ne!(candidate, code);
            candidate
        })
        .collect();
    for (i, wrong) in wrong_codes.iter().enumerate() {
        let path = if i % 2 == 0 {
            "/devices/pairing/preview"
        } else {
            "/devices/pairing/confirm_by_code"
        };
        let (s, b) = server
            .post_json(path, &json!({"pairing_code": wrong}))
            .await;
        assert_problem(s, &b, 404, "pairing_not_found");
    }
    for path in [
        "/devices/pairing/preview",
        "/devices/pairing/confirm_by_code",
    ] {
        let r = server
            .web(Method::POST, path)
            .json(&json!({"pairing_code": code}))
            .send()
            .await
            .expect("send");
        let retry_after: u64 = r.headers()["retry-after"]
            .to_str()
            .expect("ascii")
            .parse()
            .expect("seconds");
        assert!(retry_after > 0);
        let (s, b) = status_json(r).await;
        assert_problem(s, &b, 429, "too_many_wrong_codes");
    }
    // Per address too: another user calling from the same address is refused as well.
    let operator = server.new_member(ORG, "otto@nexus.test", "operator").await;
    let (s, b) = status_json(
        server
            .as_user(
                &operator.token,
                Method::POST,
                "/devices/pairing/confirm_by_code",
            )
            .json(&json!({"pairing_code": code}))
            .send()
            .await
            .expect("send"),
    )
    .await;
    assert_problem(s, &b, 429, "too_many_wrong_codes");
    let (s, b) = complete(&server, &started).await;
    assert_problem(s, &b, 409, "pairing_not_confirmed");
}

#[tokio::test]
async fn concurrent_code_guesses_cannot_slip_past_the_limit_together() {
    let server = TestServer::start().await;
    let started = start_pairing(&server, json!({"device_name": "target"})).await;
    let code = str_of(&started, "pairing_code").to_owned();
    let guesses: Vec<String> = (0..20u32)
        .map(|i| format!("{:03}-{:03}", 100 + i, 300 + i))
        .filter(|g| *g != code)
        .take(19)
        .collect();
    let attempts: Vec<_> = guesses
        .iter()
        .map(|guess| {
            let request = server
                .web(Method::POST, "/devices/pairing/preview")
                .json(&json!({"pairing_code": guess}));
            tokio::spawn(async move { request.send().await.expect("send").status().as_u16() })
        })
        .collect();
    let mut statuses = Vec::new();
    for attempt in attempts {
        statuses.push(attempt.await.expect("join"));
    }
    let checked = statuses.iter().filter(|s| **s == 404).count();
    let refused = statuses.iter().filter(|s| **s == 429).count();
    assert_eq!((checked, refused), (5, 14), "{statuses:?}");
}

#[tokio::test]
async fn device_tokens_rotate_and_a_reused_refresh_token_revokes_the_device() {
    let server = TestServer::start().await;
    let started = start_pairing(&server, json!({"device_name": "pc"})).await;
    let (s, confirmed) = server
        .post_json(
            "/devices/pairing/confirm_by_code",
            &json!({"pairing_code": started["pairing_code"]}),
        )
        .await;
    assert_eq!(s, 200, "{confirmed}");
    let (s, done) = complete(&server, &started).await;
    assert_eq!(s, 200, "{done}");
    let device_id = str_of(&done, "device_id").to_owned();
    assert_eq!(done["token_type"], "Bearer");
    let week = seconds_from_now(&done["expires_at"]);
    assert!((7 * 86_400 - 60..=7 * 86_400).contains(&week), "{week}");
    let month = seconds_from_now(&done["refresh_expires_at"]);
    assert!((30 * 86_400 - 60..=30 * 86_400).contains(&month), "{month}");
    let (t0, r0) = (
        str_of(&done, "device_token").to_owned(),
        str_of(&done, "refresh_token").to_owned(),
    );
    assert!(r0.starts_with("nxr_") && r0 != t0, "{r0}");
    assert_eq!(heartbeat(&server, &device_id, &t0).await.0, 200);
    // The refresh token is not an access token.
    let (s, b) = heartbeat(&server, &device_id, &r0).await;
    assert_problem(s, &b, 401, "invalid_token");

    let (s, first) = refresh_device(&server, &device_id, &r0).await;
    assert_eq!(s, 200, "{first}");
    assert_eq!(first["device_id"], device_id.as_str());
    assert_eq!(first["token_type"], "Bearer");
    let (t1, r1) = (
        str_of(&first, "device_token").to_owned(),
        str_of(&first, "refresh_token").to_owned(),
    );
    assert!(t1 != t0 && r1 != r0);
    assert!(seconds_from_now(&first["expires_at"]) > 7 * 86_400 - 60);
    assert!(seconds_from_now(&first["refresh_expires_at"]) > 30 * 86_400 - 60);
    let (s, b) = heartbeat(&server, &device_id, &t0).await;
    assert_problem(s, &b, 401, "invalid_token");
    assert_eq!(heartbeat(&server, &device_id, &t1).await.0, 200);

    let (s, second) = refresh_device(&server, &device_id, &r1).await;
    assert_eq!(s, 200, "{second}");
    let (t2, r2) = (
        str_of(&second, "device_token").to_owned(),
        str_of(&second, "refresh_token").to_owned(),
    );
    assert_eq!(heartbeat(&server, &device_id, &t2).await.0, 200);

    // Another device's refresh token, a user's refresh token, garbage: refused, nothing rotates.
    let other = server.pair_device("other").await;
    let user = server.new_member(ORG, "uma@nexus.test", "viewer").await;
    for (id, token) in [
        (device_id.as_str(), other.refresh_token.as_str()),
        (other.id.as_str(), r2.as_str()),
        (device_id.as_str(), user.refresh_token.as_str()),
        (device_id.as_str(), "nxr_short"),
        (device_id.as_str(), t2.as_str()),
    ] {
        let (s, b) = refresh_device(&server, id, token).await;
        assert_problem(s, &b, 401, "invalid_refresh_token");
    }
    assert_eq!(heartbeat(&server, &device_id, &t2).await.0, 200);
    assert_eq!(heartbeat(&server, &other.id, &other.token).await.0, 200);
    let (s, rotated) = refresh_device(&server, &other.id, &other.refresh_token).await;
    assert_eq!(
        s, 200,
        "the other device's refresh token still works: {rotated}"
    );

    // A copy of a spent refresh token shows up: every token of the device is revoked.
    let (s, b) = refresh_device(&server, &device_id, &r0).await;
    assert_problem(s, &b, 401, "refresh_token_reused");
    assert!(b.get("device_token").is_none());
    let (s, b) = heartbeat(&server, &device_id, &t2).await;
    assert_problem(s, &b, 401, "invalid_token");
    let (s, _) = refresh_device(&server, &device_id, &r2).await;
    assert_eq!(s, 401, "the newest refresh token is revoked too");
    // Other devices are not affected.
    assert_eq!(
        heartbeat(&server, &other.id, str_of(&rotated, "device_token"))
            .await
            .0,
        200
    );

    let entries = server.audit_entries().await;
    let logs = Value::Array(entries.clone());
    let of = |action: &str| {
        entries
            .iter()
            .filter(|e| e["action"] == action && e["target"]["id"] == device_id.as_str())
            .cloned()
            .collect::<Vec<_>>()
    };
    assert_eq!(of("device.token_refresh").len(), 2);
    let reuse = of("device.refresh_reuse");
    assert_eq!(reuse.len(), 1, "{logs}");
    assert_eq!(reuse[0]["result"], "denied");
    assert_eq!(
        reuse[0]["actor"],
        json!({"type": "device", "id": device_id})
    );
    let secrets = [&t0[4..], &t1[4..], &t2[4..], &r0[4..], &r1[4..], &r2[4..]];
    assert_no_secrets(&logs.to_string(), &secrets, "audit entries");
    assert_no_secrets(&server.log_text(), &secrets, "logs");
}

#[tokio::test]
async fn device_tokens_expire_and_refresh_tokens_expire_too() {
    let server = TestServer::start_with(&["--device-token-ttl", "1s"]).await;
    let device = server.pair_device("pc").await;
    assert_eq!(heartbeat(&server, &device.id, &device.token).await.0, 200);
    let stale_refresh =
        TestServer::start_with(&["--device-refresh-ttl", "1s", "--device-token-ttl", "1s"]).await;
    let short_lived = stale_refresh.pair_device("pc").await;
    tokio::time::sleep(Duration::from_millis(1100)).await;

    let (s, b) = heartbeat(&server, &device.id, &device.token).await;
    assert_problem(s, &b, 401, "token_expired");
    for (method, path) in [(Method::GET, "/commands"), (Method::POST, "/reports")] {
        let (s, b) = status_json(
            server
                .device(method, &device, path)
                .json(&json!({"reports": [report("s", "r1")]}))
                .send()
                .await
                .expect("send"),
        )
        .await;
        assert_problem(s, &b, 401, "token_expired");
    }
    let (s, fresh) = refresh_device(&server, &device.id, &device.refresh_token).await;
    assert_eq!(s, 200, "{fresh}");
    assert_eq!(
        heartbeat(&server, &device.id, str_of(&fresh, "device_token"))
            .await
            .0,
        200
    );

    let (s, b) = refresh_device(&stale_refresh, &short_lived.id, &short_lived.refresh_token).await;
    assert_problem(s, &b, 401, "invalid_refresh_token");
}

/// Housekeeping: an expired token answers `token_expired` for the retention period, then it is
/// deleted from the store (and answers like any unknown token); the device's refresh token, which
/// has not expired, still works.
#[tokio::test]
async fn expired_device_tokens_are_deleted_after_the_retention_period() {
    let server = TestServer::start_with(&[
        "--device-token-ttl",
        "1s",
        "--ended-retention",
        "3s",
        "--housekeeping-interval",
        "200ms",
    ])
    .await;
    let device = server.pair_device("pc").await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (s, b) = heartbeat(&server, &device.id, &device.token).await;
    assert_problem(s, &b, 401, "token_expired");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (s, b) = heartbeat(&server, &device.id, &device.token).await;
        if b["code"] == "invalid_token" {
            break;
        }
        assert_problem(s, &b, 401, "token_expired");
        assert!(std::time::Instant::now() < deadline, "never pruned");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        server.log_text().contains("housekeeping: deleted"),
        "{}",
        server.log_text()
    );
    let (s, fresh) = refresh_device(&server, &device.id, &device.refresh_token).await;
    assert_eq!(s, 200, "{fresh}");
    assert_eq!(
        heartbeat(&server, &device.id, str_of(&fresh, "device_token"))
            .await
            .0,
        200
    );
}

#[tokio::test]
async fn devices_are_listed_renamed_and_deleted_with_immediate_revocation() {
    let server = TestServer::start().await;
    let device = server.pair_device("pc").await;
    let keep = server.pair_device("keep").await;
    let path = format!("/devices/{}", device.id);

    let (s, listed) = status_json(
        server
            .web(Method::GET, "/devices")
            .send()
            .await
            .expect("list"),
    )
    .await;
    assert_eq!(s, 200, "{listed}");
    assert_eq!(listed["tenant"], "acme:web");
    let names: Vec<&str> = listed["devices"]
        .as_array()
        .expect("devices")
        .iter()
        .map(|d| d["device_name"].as_str().expect("name"))
        .collect();
    assert_eq!(names.len(), 2);
    assert!(names.contains(&"pc") && names.contains(&"keep"));
    let (s, one) = status_json(server.web(Method::GET, &path).send().await.expect("get")).await;
    assert_eq!(s, 200);
    assert_eq!(one["device_id"], device.id.as_str());
    assert_eq!(one["capabilities"], json!(["fs.read"]));
    assert!(one.get("token").is_none() && !one.to_string().contains(&device.token));

    let (s, renamed) = status_json(
        server
            .web(Method::PATCH, &path)
            .json(&json!({"name": "  Kitchen PC  "}))
            .send()
            .await
            .expect("rename"),
    )
    .await;
    assert_eq!(s, 200, "{renamed}");
    assert_eq!(renamed["device_name"], "Kitchen PC");
    let (_, one) = status_json(server.web(Method::GET, &path).send().await.expect("get")).await;
    assert_eq!(one["device_name"], "Kitchen PC");
    for body in [
        json!({"name": ""}),
        json!({"name": "x".repeat(129)}),
        json!({"name": "a\u{7}b"}),
        json!({}),
    ] {
        let (s, b) = status_json(
            server
                .web(Method::PATCH, &path)
                .json(&body)
                .send()
                .await
                .expect("rename"),
        )
        .await;
        assert_problem(s, &b, 422, "validation_failed");
        assert_eq!(b["errors"][0]["field"], "name", "{b}");
    }
    for missing in [
        "/devices/dev_01hzzzzzzzzzzzzzzzzzzzzzzz",
        "/devices/not-a-device",
    ] {
        for method in [Method::GET, Method::DELETE] {
            let (s, b) = status_json(server.web(method, missing).send().await.expect("send")).await;
            assert_problem(s, &b, 404, "device_not_found");
        }
    }

    let r = server
        .web(Method::DELETE, &path)
        .send()
        .await
        .expect("delete");
    assert_eq!(r.status(), 204);
    let (s, b) = heartbeat(&server, &device.id, &device.token).await;
    assert_problem(s, &b, 401, "invalid_token");
    let (s, _) = refresh_device(&server, &device.id, &device.refresh_token).await;
    assert_eq!(s, 401, "a deleted device cannot refresh its way back");
    let (s, b) = status_json(server.web(Method::GET, &path).send().await.expect("get")).await;
    assert_problem(s, &b, 404, "device_not_found");
    let (s, b) = status_json(
        server
            .web(Method::PATCH, &path)
            .json(&json!({"name": "back"}))
            .send()
            .await
            .expect("rename"),
    )
    .await;
    assert_problem(s, &b, 404, "device_not_found");
    assert_eq!(heartbeat(&server, &keep.id, &keep.token).await.0, 200);

    let (_, logs) = status_json(
        server
            .web(Method::GET, "/audit/logs?limit=500")
            .send()
            .await
            .expect("audit"),
    )
    .await;
    let admin_id = jwt_parts(&server.admin_token).1["sub"].clone();
    for action in ["device.rename", "device.delete"] {
        let entry = logs["entries"]
            .as_array()
            .expect("entries")
            .iter()
            .find(|e| e["action"] == action)
            .unwrap_or_else(|| panic!("{action} in {logs}"))
            .clone();
        assert_eq!(entry["actor"], json!({"type": "user", "id": admin_id}));
        assert_eq!(entry["target"], json!({"type": "device", "id": device.id}));
        assert_eq!(entry["tenant_id"], "acme:web");
        assert_eq!(entry["result"], "success");
    }
}

#[tokio::test]
async fn a_device_refresh_token_cannot_be_spent_twice_by_racing() {
    // Strict mode: with a retry window, racing presentations become a chain of retries instead
    // (covered by the test below); without one, exactly one may win.
    let server = TestServer::start_with(&["--device-refresh-retry-grace", "0s"]).await;
    let device = server.pair_device("pc").await;
    let tasks: Vec<_> = (0..10)
        .map(|_| {
            let request = server
                .http
                .post(server.url("/devices/token/refresh"))
                .json(&json!({"device_id": device.id, "refresh_token": device.refresh_token}));
            tokio::spawn(async move {
                let (s, body) = status_json(request.send().await.expect("send")).await;
                (s, body["device_token"].as_str().map(str::to_owned))
            })
        })
        .collect();
    let mut issued = Vec::new();
    let mut statuses = Vec::new();
    for task in tasks {
        let (s, token) = task.await.expect("join");
        statuses.push(s);
        issued.extend(token);
    }
    assert!(issued.len() <= 1, "{statuses:?}");
    assert!(
        statuses.iter().all(|s| *s == 200 || *s == 401),
        "{statuses:?}"
    );
    // Whatever won, at most one access token of the device works now.
    let mut working = 0;
    for token in issued.iter().chain(std::iter::once(&device.token)) {
        if heartbeat(&server, &device.id, token).await.0 == 200 {
            working += 1;
        }
    }
    assert!(working <= 1, "{working} tokens work");
}

#[tokio::test]
async fn a_refresh_whose_answer_was_lost_can_be_retried_but_a_superseded_pair_cannot() {
    let server = TestServer::start().await;
    let device = server.pair_device("pc").await;
    // The server rotates, but the answer never reaches the device.
    let (s, lost) = refresh_device(&server, &device.id, &device.refresh_token).await;
    assert_eq!(s, 200, "{lost}");
    // The device still has only its old pair and retries with it: a fresh pair, not a revocation.
    let (s, retried) = refresh_device(&server, &device.id, &device.refresh_token).await;
    assert_eq!(s, 200, "{retried}");
    let (t_lost, r_lost) = (
        str_of(&lost, "device_token"),
        str_of(&lost, "refresh_token"),
    );
    let (t_new, r_new) = (
        str_of(&retried, "device_token"),
        str_of(&retried, "refresh_token"),
    );
    assert!(t_new != t_lost && r_new != r_lost);
    assert_eq!(heartbeat(&server, &device.id, t_new).await.0, 200);
    let (s, b) = heartbeat(&server, &device.id, t_lost).await;
    assert_problem(s, &b, 401, "invalid_token");

    // The pair that never arrived is dead for good: presenting it means somebody holds a copy.
    let (s, b) = refresh_device(&server, &device.id, r_lost).await;
    assert_problem(s, &b, 401, "refresh_token_reused");
    let (s, b) = heartbeat(&server, &device.id, t_new).await;
    assert_problem(s, &b, 401, "invalid_token");

    let entries = server.audit_entries().await;
    let logs = Value::Array(entries.clone());
    let refreshes: Vec<&Value> = entries
        .iter()
        .filter(|e| {
            e["action"] == "device.token_refresh" && e["target"]["id"] == device.id.as_str()
        })
        .collect();
    assert_eq!(refreshes.len(), 2, "{logs}");
    // Newest first: the retry is marked as one.
    assert_eq!(
        refreshes[0]["details"]["retry_of_lost_answer"], true,
        "{logs}"
    );
    assert!(
        refreshes[1]["details"]
            .get("retry_of_lost_answer")
            .is_none(),
        "{logs}"
    );
}

#[tokio::test]
async fn a_refresh_retried_after_its_successor_was_used_is_reuse() {
    let server = TestServer::start().await;
    let device = server.pair_device("pc").await;
    let (s, first) = refresh_device(&server, &device.id, &device.refresh_token).await;
    assert_eq!(s, 200, "{first}");
    let (s, second) = refresh_device(&server, &device.id, str_of(&first, "refresh_token")).await;
    assert_eq!(s, 200, "{second}");
    // Within the retry window, but the pair it was traded for has been used: a copy.
    let (s, b) = refresh_device(&server, &device.id, &device.refresh_token).await;
    assert_problem(s, &b, 401, "refresh_token_reused");
    let (s, b) = heartbeat(&server, &device.id, str_of(&second, "device_token")).await;
    assert_problem(s, &b, 401, "invalid_token");
}

#[tokio::test]
async fn a_device_unpairs_itself_and_only_itself() {
    let server = TestServer::start().await;
    let device = server.pair_device("pc").await;
    let other = server.pair_device("other").await;

    // Another device's token cannot remove this device; no token at all is 401.
    let r = server
        .http
        .post(server.url(&format!("/devices/{}/unpair", device.id)))
        .bearer_auth(&other.token)
        .send()
        .await
        .expect("unpair");
    let (s, b) = status_json(r).await;
    assert_problem(s, &b, 404, "device_not_found");
    let r = server
        .http
        .post(server.url(&format!("/devices/{}/unpair", device.id)))
        .send()
        .await
        .expect("unpair");
    let (s, b) = status_json(r).await;
    assert_problem(s, &b, 401, "invalid_token");

    let r = server
        .device(Method::POST, &device, "/unpair")
        .send()
        .await
        .expect("unpair");
    assert_eq!(r.status(), 204);
    let (s, b) = heartbeat(&server, &device.id, &device.token).await;
    assert_problem(s, &b, 401, "invalid_token");
    let (s, _) = refresh_device(&server, &device.id, &device.refresh_token).await;
    assert_eq!(s, 401, "an unpaired device cannot refresh its way back");
    let (s, b) = status_json(
        server
            .web(Method::GET, &format!("/devices/{}", device.id))
            .send()
            .await
            .expect("get"),
    )
    .await;
    assert_problem(s, &b, 404, "device_not_found");
    // Unpairing twice: the token is gone, so the second call is 401.
    let (s, b) = status_json(
        server
            .device(Method::POST, &device, "/unpair")
            .send()
            .await
            .expect("unpair"),
    )
    .await;
    assert_problem(s, &b, 401, "invalid_token");
    assert_eq!(heartbeat(&server, &other.id, &other.token).await.0, 200);

    let (_, logs) = status_json(
        server
            .web(Method::GET, "/audit/logs?limit=500")
            .send()
            .await
            .expect("audit"),
    )
    .await;
    let entry = logs["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .find(|e| e["action"] == "device.delete")
        .unwrap_or_else(|| panic!("device.delete in {logs}"))
        .clone();
    assert_eq!(entry["actor"], json!({"type": "device", "id": device.id}));
    assert_eq!(entry["target"], json!({"type": "device", "id": device.id}));
    assert_eq!(entry["result"], "success");
}

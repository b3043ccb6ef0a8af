//! The pairing flow and each of its failures.

use std::time::Duration;

use serde_json::json;

use crate::support::*;

async fn start(server: &TestServer, tenant: Option<(&str, &str)>) -> serde_json::Value {
    let mut request = server
        .http
        .post(server.url("/devices/pairing/start"))
        .json(&json!({"device_name": "laptop", "capabilities": ["fs.read", "shell.exec"]}));
    if let Some((org, project)) = tenant {
        request = request
            .header("x-org-id", org)
            .header("x-project-id", project);
    }
    let (status, body) = status_json(request.send().await.expect("start")).await;
    assert_eq!(status, 200, "{body}");
    body
}

async fn complete(
    server: &TestServer,
    start: &serde_json::Value,
    nonce: &str,
) -> (u16, serde_json::Value) {
    status_json(
        server
            .http
            .post(server.url("/devices/pairing/complete"))
            .json(&json!({"pairing_id": start["pairing_id"], "device_nonce": nonce}))
            .send()
            .await
            .expect("complete"),
    )
    .await
}

#[tokio::test]
async fn full_pairing_flow_issues_a_working_token_exactly_once() {
    let server = TestServer::start().await;
    let started = start(&server, None).await;
    let code = started["pairing_code"].as_str().expect("code");
    assert!(
        code.len() == 7
            && code.as_bytes()[3] == b'-'
            && code.replace('-', "").bytes().all(|b| b.is_ascii_digit()),
        "{code}"
    );
    assert!(
        started["pairing_id"]
            .as_str()
            .expect("id")
            .starts_with("pair_")
    );
    let expires =
        chrono::DateTime::parse_from_rfc3339(started["expires_at"].as_str().expect("expires"))
            .expect("rfc3339");
    let ttl = expires
        .signed_duration_since(chrono::Utc::now())
        .num_seconds();
    assert!((290..=300).contains(&ttl), "valid 5 minutes, got {ttl}s");
    let nonce = started["device_nonce"].as_str().expect("nonce");

    // Not confirmed yet: the device keeps polling.
    let (s, b) = complete(&server, &started, nonce).await;
    assert_problem(s, &b, 409, "pairing_not_confirmed");

    let (s, confirmed) = server
        .post_json(
            "/devices/pairing/confirm_by_code",
            &json!({"pairing_code": code}),
        )
        .await;
    assert_eq!(s, 200, "{confirmed}");
    let device_id = confirmed["device_id"].as_str().expect("device id");
    assert!(device_id.starts_with("dev_"));
    assert!(
        confirmed.get("device_token").is_none(),
        "confirm never hands out the token"
    );

    let (s, again) = server
        .post_json(
            "/devices/pairing/confirm_by_code",
            &json!({"pairing_code": code}),
        )
        .await;
    assert_problem(s, &again, 409, "pairing_already_confirmed");

    let (s, done) = complete(&server, &started, nonce).await;
    assert_eq!(s, 200, "{done}");
    assert_eq!(done["device_id"], device_id);
    assert_eq!(done["tenant"], "acme:web");
    let token = done["device_token"].as_str().expect("token");
    assert!(token.starts_with("nxd_") && token.len() == 47, "{token}");

    let (s, second) = complete(&server, &started, nonce).await;
    assert_problem(s, &second, 409, "pairing_already_completed");
    assert!(
        !second.to_string().contains(token),
        "the token is never handed out twice"
    );

    // The code is released once claimed.
    let (s, b) = server
        .post_json(
            "/devices/pairing/confirm_by_code",
            &json!({"pairing_code": code}),
        )
        .await;
    assert_problem(s, &b, 404, "pairing_not_found");

    let device = PairedDevice {
        id: device_id.to_owned(),
        token: token.to_owned(),
        refresh_token: done["refresh_token"].as_str().expect("refresh").to_owned(),
        server_keys: done["server_keys"].clone(),
    };
    let r = server
        .device(reqwest::Method::POST, &device, "/heartbeat")
        .json(&json!({"status": "online"}))
        .send()
        .await
        .expect("hb");
    assert_eq!(r.status(), 200);
    let (_, devices) = status_json(
        server
            .web(reqwest::Method::GET, "/devices")
            .send()
            .await
            .expect("devices"),
    )
    .await;
    assert_eq!(devices["devices"][0]["device_name"], "laptop");
    assert_eq!(
        devices["devices"][0]["capabilities"],
        json!(["fs.read", "shell.exec"])
    );
    assert!(
        !server.log_text().contains(&token[4..]),
        "the token never reaches the logs"
    );
    assert!(
        !server.log_text().contains(nonce),
        "the nonce never reaches the logs"
    );
}

#[tokio::test]
async fn pairing_failures_are_clear_problems() {
    let server = TestServer::start().await;
    let started = start(&server, None).await;

    let (s, b) = complete(&server, &started, "wrong-nonce").await;
    assert_problem(s, &b, 403, "pairing_nonce_mismatch");

    let (s, b) = status_json(
        server
            .http
            .post(server.url("/devices/pairing/complete"))
            .json(&json!({"pairing_id": "pair_01unknown", "device_nonce": "x"}))
            .send()
            .await
            .expect("send"),
    )
    .await;
    assert_problem(s, &b, 404, "pairing_not_found");

    let (s, b) = server
        .post_json(
            "/devices/pairing/confirm_by_code",
            &json!({"pairing_code": "12-34"}),
        )
        .await;
    assert_problem(s, &b, 422, "validation_failed");
    assert_eq!(b["errors"][0]["field"], "pairing_code");

    // The live code is unique: guessing a code that nobody holds finds nothing.
    let live = started["pairing_code"].as_str().expect("code");
    let other = if live == "000-000" {
        "000-001"
    } else {
        "000-000"
    };
    let (s, b) = server
        .post_json(
            "/devices/pairing/confirm_by_code",
            &json!({"pairing_code": other}),
        )
        .await;
    assert_problem(s, &b, 404, "pairing_not_found");

    let (s, b) = status_json(
        server
            .http
            .post(server.url("/devices/pairing/confirm_by_code"))
            .bearer_auth(&server.admin_token)
            .json(&json!({"pairing_code": live}))
            .send()
            .await
            .expect("send"),
    )
    .await;
    assert_problem(s, &b, 400, "tenant_required");
    // Without a signed-in user nobody can confirm, whatever the headers say.
    let (s, b) = status_json(
        server
            .http
            .post(server.url("/devices/pairing/confirm_by_code"))
            .header("x-org-id", ORG)
            .header("x-project-id", PROJECT)
            .json(&json!({"pairing_code": live}))
            .send()
            .await
            .expect("send"),
    )
    .await;
    assert_problem(s, &b, 401, "authentication_required");

    let (s, b) = status_json(
        server
            .http
            .post(server.url("/devices/pairing/start"))
            .json(&json!({"device_name": ""}))
            .send()
            .await
            .expect("send"),
    )
    .await;
    assert_problem(s, &b, 422, "validation_failed");
    assert_eq!(b["errors"][0]["field"], "device_name");

    let (s, b) = status_json(
        server
            .http
            .post(server.url("/devices/pairing/start"))
            .json(&json!({"device_name": "x", "capabilities": "all"}))
            .send()
            .await
            .expect("send"),
    )
    .await;
    assert_problem(s, &b, 422, "validation_failed");
    assert_eq!(b["errors"][0]["field"], "capabilities");
}

#[tokio::test]
async fn a_pairing_that_named_its_tenant_is_invisible_to_other_tenants() {
    let server = TestServer::start().await;
    let started = start(&server, Some(("other-org", "p"))).await;
    let (s, b) = server
        .post_json(
            "/devices/pairing/confirm_by_code",
            &json!({"pairing_code": started["pairing_code"]}),
        )
        .await;
    assert_problem(s, &b, 404, "pairing_not_found");
    server.ensure_tenant("other-org", "p").await;
    let (s, b) = status_json(
        server
            .web_in(
                reqwest::Method::POST,
                "/devices/pairing/confirm_by_code",
                "other-org",
                "p",
            )
            .json(&json!({"pairing_code": started["pairing_code"]}))
            .send()
            .await
            .expect("send"),
    )
    .await;
    assert_eq!(s, 200, "{b}");
}

#[tokio::test]
async fn expired_codes_cannot_be_confirmed_or_claimed() {
    let server = TestServer::start_with(&["--pairing-ttl", "1s"]).await;
    let unconfirmed = start(&server, None).await;
    let confirmed = start(&server, None).await;
    let (s, _) = server
        .post_json(
            "/devices/pairing/confirm_by_code",
            &json!({"pairing_code": confirmed["pairing_code"]}),
        )
        .await;
    assert_eq!(s, 200);
    tokio::time::sleep(Duration::from_millis(1300)).await;

    let (s, b) = server
        .post_json(
            "/devices/pairing/confirm_by_code",
            &json!({"pairing_code": unconfirmed["pairing_code"]}),
        )
        .await;
    assert_problem(s, &b, 410, "pairing_expired");
    let (s, b) = complete(
        &server,
        &confirmed,
        confirmed["device_nonce"].as_str().expect("nonce"),
    )
    .await;
    assert_problem(s, &b, 410, "pairing_expired");
}

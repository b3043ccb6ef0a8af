//! Wire conventions: problem+json everywhere, correlation ids, security headers, CORS, logs,
//! the OpenAPI document, and the dev tools.

use std::time::Duration;

use serde_json::{Value, json};

use crate::support::*;

#[tokio::test]
async fn every_error_is_problem_json() {
    let server = TestServer::start().await;
    let r = server
        .http
        .get(server.url("/no/such/route"))
        .send()
        .await
        .expect("send");
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    let (s, b) = status_json(r).await;
    assert_problem(s, &b, 404, "not_found");

    let (s, b) = status_json(
        server
            .http
            .get(server.url("/devices/pairing/start"))
            .send()
            .await
            .expect("send"),
    )
    .await;
    assert_problem(s, &b, 405, "method_not_allowed");

    let start = server.url("/devices/pairing/start");
    let (s, b) = status_json(
        server
            .http
            .post(&start)
            .header("content-type", "application/json")
            .body("{not json")
            .send()
            .await
            .expect("send"),
    )
    .await;
    assert_problem(s, &b, 400, "malformed_json");
    let (s, b) = status_json(
        server
            .http
            .post(&start)
            .header("content-type", "text/plain")
            .body("{}")
            .send()
            .await
            .expect("send"),
    )
    .await;
    assert_problem(s, &b, 415, "unsupported_media_type");
    let (s, b) = status_json(
        server
            .http
            .post(&start)
            .json(&json!({"device_name": 42}))
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
            .post(&start)
            .json(&json!({"device_name": "x".repeat(70_000)}))
            .send()
            .await
            .expect("send"),
    )
    .await;
    assert_problem(s, &b, 413, "payload_too_large");

    let (s, b) = status_json(
        server
            .http
            .get(server.url("/devtools/devices"))
            .header("x-org-id", "acme")
            .send()
            .await
            .expect("send"),
    )
    .await;
    assert_problem(s, &b, 400, "tenant_required");
    let (s, b) = status_json(
        server
            .http
            .get(server.url("/devtools/devices"))
            .header("x-org-id", "a:b")
            .header("x-project-id", "p")
            .send()
            .await
            .expect("send"),
    )
    .await;
    assert_problem(s, &b, 400, "invalid_tenant");
}

#[tokio::test]
async fn correlation_ids_are_echoed_and_logged_without_secrets() {
    let server = TestServer::start().await;
    let device = server.pair_device("pc").await;
    let r = server
        .device(reqwest::Method::POST, &device, "/heartbeat")
        .header("x-correlation-id", "trace-abc-123")
        .json(&json!({"status": "bogus"}))
        .send()
        .await
        .expect("send");
    assert_eq!(r.headers()["x-correlation-id"], "trace-abc-123");
    let (_, body) = status_json(r).await;
    assert_eq!(body["correlation_id"], "trace-abc-123");

    let generated = server
        .http
        .get(server.url("/health/live"))
        .send()
        .await
        .expect("send");
    let id = generated.headers()["x-correlation-id"]
        .to_str()
        .expect("ascii")
        .to_owned();
    assert!(id.len() >= 20, "{id}");
    let unsafe_id = server
        .http
        .get(server.url("/health/live"))
        .header("x-correlation-id", "bad id\twith spaces")
        .send()
        .await
        .expect("send");
    assert_ne!(
        unsafe_id.headers()["x-correlation-id"],
        "bad id\twith spaces"
    );

    server.push(&device, vec![report("s-log", "r1")]).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let logs = server.log_text();
    assert!(
        !logs.contains(&device.token),
        "device tokens never reach the logs"
    );
    let lines: Vec<Value> = logs
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert!(!lines.is_empty());
    for line in &lines {
        for field in ["timestamp", "level", "message"] {
            assert!(line.get(field).is_some(), "{field} missing in {line}");
        }
    }
    let traced = lines
        .iter()
        .find(|l| l["correlation_id"] == "trace-abc-123")
        .expect("a log line of the traced request");
    assert_eq!(traced["device_id"], device.id.as_str());
    assert_eq!(traced["tenant_id"], "acme:web");
}

#[tokio::test]
async fn security_headers_and_no_hsts_on_plain_http() {
    let server = TestServer::start().await;
    let r = server
        .http
        .get(server.url("/health"))
        .send()
        .await
        .expect("send");
    assert_eq!(r.headers()["x-content-type-options"], "nosniff");
    assert_eq!(r.headers()["referrer-policy"], "no-referrer");
    assert!(
        r.headers()["content-security-policy"]
            .to_str()
            .expect("csp")
            .contains("default-src 'none'")
    );
    assert!(r.headers().get("strict-transport-security").is_none());
    assert!(r.headers().get("access-control-allow-origin").is_none());
}

#[tokio::test]
async fn cors_only_for_configured_origins() {
    let server = TestServer::start_with(&["--cors-origins", "https://console.example.com"]).await;
    let preflight = |origin: &str| {
        server
            .http
            .request(
                reqwest::Method::OPTIONS,
                server.url("/agent/reports/stream"),
            )
            .header("origin", origin)
            .header("access-control-request-method", "GET")
            .header("access-control-request-headers", "x-org-id,x-project-id")
            .send()
    };
    let allowed = preflight("https://console.example.com")
        .await
        .expect("send");
    assert_eq!(
        allowed.headers()["access-control-allow-origin"],
        "https://console.example.com"
    );
    let denied = preflight("https://evil.example.com").await.expect("send");
    assert!(
        denied
            .headers()
            .get("access-control-allow-origin")
            .is_none()
    );
}

#[tokio::test]
async fn openapi_document_lists_every_endpoint() {
    let server = TestServer::start().await;
    let (s, doc) = status_json(
        server
            .http
            .get(server.url("/openapi.json"))
            .send()
            .await
            .expect("send"),
    )
    .await;
    assert_eq!(s, 200);
    assert!(doc["openapi"].as_str().expect("version").starts_with("3.1"));
    for path in [
        "/devices/pairing/start",
        "/devices/pairing/confirm_by_code",
        "/devices/pairing/complete",
        "/devices/{id}/heartbeat",
        "/devices/{id}",
        "/devices/{id}/commands",
        "/devices/{id}/commands/{cid}/ack",
        "/devices/{id}/reports",
        "/agent/reports/stream",
        "/health",
        "/health/live",
        "/health/ready",
        "/devtools/emit_report",
        "/devtools/devices",
        "/devices/{id}/unpair",
        "/sidecar/command",
        "/commands",
        "/commands/{id}",
        "/commands/{id}/cancel",
        "/commands/{id}/repropose",
        "/approvals",
        "/approvals/{id}",
        "/approvals/{id}/decide",
        "/policy",
        "/devices",
        "/devices/pairing/preview",
        "/devices/token/refresh",
        "/auth/login",
        "/auth/refresh",
        "/auth/logout",
        "/auth/me",
        "/auth/sessions",
        "/auth/sessions/{id}",
        "/auth/password",
        "/auth/mfa/totp/setup",
        "/auth/mfa/totp/enable",
        "/auth/mfa/totp/disable",
        "/auth/stream-ticket",
        "/.well-known/jwks.json",
        "/.well-known/nexus-server-keys.json",
        "/orgs",
        "/orgs/{org}/projects",
        "/orgs/{org}/members",
        "/orgs/{org}/members/{user_id}",
        "/audit/logs",
        "/audit/verify",
    ] {
        assert!(
            doc["paths"].get(path).is_some(),
            "{path} missing from the OpenAPI document"
        );
    }
    assert!(doc["components"]["schemas"].get("AgentReport").is_some());
    assert!(
        doc["paths"].get("/devtools/enqueue_command").is_none(),
        "commands are proposed through /sidecar/command only"
    );
    // Query strings are documented as optional query parameters, not as required path segments.
    for (path, names) in [
        ("/commands", &["status", "device_id", "limit", "cursor"][..]),
        ("/approvals", &["status", "limit"][..]),
        ("/devices/{id}/commands", &["cursor", "wait"][..]),
        (
            "/audit/logs",
            &["since", "until", "action", "actor_id", "limit", "cursor"][..],
        ),
        ("/agent/reports/stream", &["last_event_id", "ticket"][..]),
    ] {
        let params = doc["paths"][path]["get"]["parameters"]
            .as_array()
            .unwrap_or_else(|| panic!("{path} has parameters"));
        for name in names {
            let p = params
                .iter()
                .find(|p| p["name"] == *name)
                .unwrap_or_else(|| panic!("{path} documents {name}"));
            assert_eq!(p["in"], "query", "{path} {name}: {p}");
            assert_eq!(p["required"], false, "{path} {name}: {p}");
        }
    }
}

#[tokio::test]
async fn devtools_emit_reports_only_in_dev_mode() {
    let server = TestServer::start().await;
    let mut stream = server.subscribe("s-dev", None).await;
    stream
        .next_data(Duration::from_secs(10))
        .await
        .expect("snapshot");
    let (s, b) = server
        .post_json(
            "/devtools/emit_report",
            &json!({"session_id": "s-dev", "approval_level": "red", "text": "needs approval"}),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b, json!({"accepted": true, "event_id": 1}));
    let event = stream.reports(1, Duration::from_secs(10)).await.remove(0);
    let report = event.json();
    assert_eq!(report["meta"]["approval_level"], "red");
    assert_eq!(report["rationale"], "needs approval");
    let (s, b) = server
        .post_json(
            "/devtools/emit_report",
            &json!({"session_id": "s-dev", "approval_level": "crimson", "text": "x"}),
        )
        .await;
    assert_problem(s, &b, 422, "validation_failed");
    assert_eq!(b["errors"][0]["field"], "approval_level");

    let production = TestServer::start_with(&["--no-dev"]).await;
    let (s, b) = production
        .post_json(
            "/devtools/emit_report",
            &json!({"session_id": "s", "text": "x"}),
        )
        .await;
    assert_problem(s, &b, 404, "not_found");
    let (s, _) = status_json(
        production
            .web(reqwest::Method::GET, "/devtools/devices")
            .send()
            .await
            .expect("send"),
    )
    .await;
    assert_eq!(s, 404);
}

#[test]
fn committed_api_docs_match_the_code() {
    let docs = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs");
    let run = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_nexus"))
            .args(args)
            .output()
            .expect("run");
        assert!(out.status.success());
        String::from_utf8(out.stdout).expect("utf8")
    };
    let hint = "regenerate with: cargo run -- openapi > docs/openapi.json && cargo run -- openapi --markdown > docs/API.md";
    assert_eq!(
        std::fs::read_to_string(docs.join("openapi.json")).expect("docs/openapi.json"),
        run(&["openapi"]),
        "{hint}"
    );
    let markdown = run(&["openapi", "--markdown"]);
    assert_eq!(
        std::fs::read_to_string(docs.join("API.md")).expect("docs/API.md"),
        markdown,
        "{hint}"
    );
    // Each operation names the credential it takes: web endpoints a user's access token,
    // device endpoints the device token.
    let section = |heading: &str| {
        let start = markdown
            .find(&format!("## `{heading}`\n"))
            .unwrap_or_else(|| panic!("{heading} in API.md"));
        let rest = &markdown[start + 4..];
        rest[..rest.find("\n## ").unwrap_or(rest.len())].to_owned()
    };
    for web in [
        "GET /commands",
        "POST /approvals/{id}/decide",
        "GET /devices",
        "PUT /policy",
    ] {
        assert!(
            section(web).contains("user access token"),
            "{web}: {}",
            section(web)
        );
    }
    for device in ["GET /devices/{id}/commands", "POST /devices/{id}/reports"] {
        assert!(
            section(device).contains("device token"),
            "{device}: {}",
            section(device)
        );
        assert!(!section(device).contains("user access token"), "{device}");
    }
}

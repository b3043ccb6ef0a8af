//! The audit trail: what gets recorded and how it reads (newest first, filters, cursor pages,
//! time windows), that it holds no secrets and only truncated addresses, and that editing or
//! deleting a stored row is caught by both `GET /audit/verify` and `nexus audit verify`.

use std::collections::HashSet;

use reqwest::Method;
use serde_json::{Value, json};

use crate::support::*;

async fn audit(server: &TestServer, query: &str) -> (u16, Value) {
    status_json(
        server
            .web(Method::GET, &format!("/audit/logs{query}"))
            .send()
            .await
            .expect("audit"),
    )
    .await
}

fn entries(page: &Value) -> Vec<Value> {
    page["entries"].as_array().expect("entries").clone()
}

fn ids(entries: &[Value]) -> Vec<String> {
    entries
        .iter()
        .map(|e| e["id"].as_str().expect("id").to_owned())
        .collect()
}

fn rfc3339(secs_from_now: i64) -> String {
    (chrono::Utc::now() + chrono::Duration::seconds(secs_from_now))
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

#[tokio::test]
async fn actions_are_recorded_newest_first_paginated_and_without_secrets() {
    let since = rfc3339(-1);
    let server = TestServer::start().await;
    let user = server.new_member(ORG, "audra@nexus.test", "operator").await;
    let (s, _) = server
        .login_response(&user.email, "Wrong-password-1!", None)
        .await;
    assert_eq!(s, 401);
    let (s, started) = status_json(
        server
            .http
            .post(server.url("/devices/pairing/start"))
            .header("x-org-id", ORG)
            .header("x-project-id", PROJECT)
            .json(&json!({"device_name": "audited-pc"}))
            .send()
            .await
            .expect("start"),
    )
    .await;
    assert_eq!(s, 200);
    let (s, _) = status_json(
        server
            .as_user(
                &user.token,
                Method::POST,
                "/devices/pairing/confirm_by_code",
            )
            .json(&json!({"pairing_code": started["pairing_code"]}))
            .send()
            .await
            .expect("confirm"),
    )
    .await;
    assert_eq!(s, 200);
    let (s, done) = status_json(
        server
            .http
            .post(server.url("/devices/pairing/complete"))
            .json(&json!({"pairing_id": started["pairing_id"], "device_nonce": started["device_nonce"]}))
            .send()
            .await
            .expect("complete"),
    )
    .await;
    assert_eq!(s, 200, "{done}");
    let device_id = done["device_id"].as_str().expect("id").to_owned();
    let r = server
        .web(Method::PATCH, &format!("/devices/{device_id}"))
        .header("x-correlation-id", "audit-trace-42")
        .json(&json!({"name": "renamed-pc"}))
        .send()
        .await
        .expect("rename");
    assert_eq!(r.status(), 200);
    let (s, refreshed) = status_json(
        server
            .http
            .post(server.url("/devices/token/refresh"))
            .json(&json!({"device_id": device_id, "refresh_token": done["refresh_token"]}))
            .send()
            .await
            .expect("refresh"),
    )
    .await;
    assert_eq!(s, 200);
    let r = server
        .as_user(&user.token, Method::POST, "/auth/logout")
        .send()
        .await
        .expect("logout");
    assert_eq!(r.status(), 204);
    let r = server
        .web(Method::DELETE, &format!("/devices/{device_id}"))
        .send()
        .await
        .expect("delete");
    assert_eq!(r.status(), 204);

    let (s, page) = audit(&server, "?limit=500").await;
    assert_eq!(s, 200, "{page}");
    assert!(page["next_cursor"].is_null(), "{page}");
    let all = entries(&page);
    let actions: Vec<&str> = all
        .iter()
        .map(|e| e["action"].as_str().expect("action"))
        .collect();
    for expected in [
        "member.add",
        "auth.login",
        "pairing.start",
        "pairing.confirm",
        "pairing.complete",
        "device.rename",
        "device.token_refresh",
        "auth.logout",
        "device.delete",
    ] {
        assert!(
            actions.contains(&expected),
            "{expected} missing from {actions:?}"
        );
    }
    assert_eq!(actions[0], "device.delete", "newest first: {actions:?}");
    let times: Vec<i64> = all
        .iter()
        .map(|e| {
            chrono::DateTime::parse_from_rfc3339(e["ts"].as_str().expect("ts"))
                .expect("rfc3339")
                .timestamp_millis()
        })
        .collect();
    assert!(
        times.windows(2).all(|w| w[0] >= w[1]),
        "newest first: {times:?}"
    );
    let failure = all
        .iter()
        .find(|e| e["action"] == "auth.login" && e["result"] == "failure")
        .expect("the failed sign-in is recorded");
    assert_eq!(failure["actor"], json!({"type": "user", "id": user.id}));
    assert_eq!(failure["target"], json!({"type": "user", "id": user.id}));
    assert_eq!(failure["tenant_id"], "acme:*");
    let confirm = all
        .iter()
        .find(|e| e["action"] == "pairing.confirm")
        .expect("confirm");
    assert_eq!(confirm["actor"], json!({"type": "user", "id": user.id}));
    assert_eq!(confirm["tenant_id"], "acme:web");
    let rename = all
        .iter()
        .find(|e| e["action"] == "device.rename")
        .expect("rename");
    assert_eq!(rename["correlation_id"], "audit-trace-42");
    for entry in &all {
        let tenant = entry["tenant_id"].as_str().expect("tenant");
        assert!(tenant == "acme:web" || tenant == "acme:*", "{entry}");
        assert!(entry["id"].as_str().expect("id").starts_with("aud_"));
        assert!(entry["seq"].as_u64().expect("seq") >= 1);
        for field in ["hash", "prev_hash"] {
            let hash = entry[field].as_str().expect("hash");
            assert!(
                hash.len() == 64 && hash.bytes().all(|b| b.is_ascii_hexdigit()),
                "{entry}"
            );
        }
        assert!(
            ["success", "failure", "denied"].contains(&entry["result"].as_str().expect("result"))
        );
        if !entry["ip"].is_null() {
            assert_eq!(
                entry["ip"], "127.0.0.0/24",
                "addresses are truncated: {entry}"
            );
        }
    }
    assert!(
        all.iter().filter(|e| !e["ip"].is_null()).count() >= 5,
        "addresses are recorded"
    );

    // Nothing secret: passwords, tokens, the pairing nonce, raw emails.
    let text = page.to_string();
    let secrets: [&str; 13] = [
        ADMIN_PASSWORD,
        user.password.as_str(),
        "Wrong-password-1!",
        &server.admin_token,
        &user.token,
        &user.refresh_token[4..],
        started["device_nonce"].as_str().expect("nonce"),
        &done["device_token"].as_str().expect("token")[4..],
        &done["refresh_token"].as_str().expect("refresh")[4..],
        &refreshed["device_token"].as_str().expect("token")[4..],
        &refreshed["refresh_token"].as_str().expect("refresh")[4..],
        "audra@nexus.test",
        ADMIN_EMAIL,
    ];
    assert_no_secrets(&text, &secrets, "audit entries");
    assert_no_secrets(&server.log_text(), &secrets[..11], "logs");

    // Filters.
    let (s, renames) = audit(&server, "?action=device.rename").await;
    assert_eq!(s, 200);
    assert_eq!(ids(&entries(&renames)), ids(std::slice::from_ref(rename)));
    let (_, by_actor) = audit(&server, &format!("?actor_id={}", user.id)).await;
    let by_actor = entries(&by_actor);
    assert!(by_actor.len() >= 3, "{by_actor:?}");
    assert!(
        by_actor
            .iter()
            .all(|e| e["actor"]["id"] == user.id.as_str())
    );
    let (_, none) = audit(&server, "?action=no.such.action").await;
    assert_eq!(none["entries"], json!([]));

    // Cursor pages of 3 cover everything exactly once, in the same order.
    let mut paged = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..100 {
        let query = match &cursor {
            Some(c) => format!("?limit=3&cursor={c}"),
            None => "?limit=3".to_owned(),
        };
        let (s, page) = audit(&server, &query).await;
        assert_eq!(s, 200, "{page}");
        let got = entries(&page);
        assert!(got.len() <= 3);
        paged.extend(got);
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    assert_eq!(ids(&paged), ids(&all));
    assert_eq!(ids(&paged).iter().collect::<HashSet<_>>().len(), all.len());

    // Time windows.
    let (_, window) = audit(&server, &format!("?since={since}&until={}", rfc3339(60))).await;
    assert_eq!(ids(&entries(&window)), ids(&all));
    let (_, future) = audit(&server, &format!("?since={}", rfc3339(3600))).await;
    assert_eq!(future["entries"], json!([]));
    let (_, past) = audit(&server, "?until=2000-01-01T00:00:00Z").await;
    assert_eq!(past["entries"], json!([]));
    let middle = &all[all.len() / 2];
    let middle_ts = middle["ts"].as_str().expect("ts").replace('+', "%2B");
    let (_, newer) = audit(&server, &format!("?since={middle_ts}")).await;
    let newer = entries(&newer);
    assert!(newer.iter().any(|e| e["id"] == middle["id"]));
    assert!(newer.len() < all.len());
    let (_, older) = audit(&server, &format!("?until={middle_ts}")).await;
    assert!(entries(&older).iter().any(|e| e["id"] == middle["id"]));

    for (query, field) in [
        ("?limit=0", "limit"),
        ("?limit=501", "limit"),
        ("?cursor=abc", "cursor"),
        ("?since=yesterday", "since"),
        ("?until=2026-13-01", "until"),
    ] {
        let (s, b) = audit(&server, query).await;
        assert_problem(s, &b, 422, "validation_failed");
        assert_eq!(b["errors"][0]["field"], field, "{query}: {b}");
    }
}

async fn verify(server: &TestServer) -> Value {
    let (s, body) = status_json(
        server
            .web(Method::GET, "/audit/verify")
            .send()
            .await
            .expect("verify"),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    body
}

fn chain<'a>(report: &'a Value, tenant: &str) -> &'a Value {
    report["chains"]
        .as_array()
        .expect("chains")
        .iter()
        .find(|c| c["tenant_id"] == tenant)
        .unwrap_or_else(|| panic!("no chain {tenant} in {report}"))
}

#[tokio::test]
async fn an_edited_or_deleted_row_breaks_the_chain_and_both_verifiers_name_it() {
    let mut server = TestServer::start().await;
    let device = server.pair_device("pc").await;
    for name in ["one", "two", "three"] {
        let r = server
            .web(Method::PATCH, &format!("/devices/{}", device.id))
            .json(&json!({"name": name}))
            .send()
            .await
            .expect("rename");
        assert_eq!(r.status(), 200);
    }
    for email in ["m1@nexus.test", "m2@nexus.test", "m3@nexus.test"] {
        server.new_member(ORG, email, "viewer").await;
    }
    let report = verify(&server).await;
    assert_eq!(report["ok"], true, "{report}");
    for tenant in ["acme:web", "acme:*"] {
        let c = chain(&report, tenant);
        assert_eq!(c["ok"], true);
        assert!(c["broken"].is_null());
        assert!(c["entries"].as_u64().expect("entries") >= 3, "{c}");
    }
    let (_, renames) = audit(&server, "?action=device.rename").await;
    let edited = entries(&renames)[1].clone(); // "two"
    assert_eq!(edited["details"]["name"], "two");
    let (_, added) = audit(&server, "?action=member.add").await;
    let deleted = entries(&added)[1].clone(); // m2
    let (edited_id, edited_seq) = (
        edited["id"].as_str().expect("id").to_owned(),
        edited["seq"].as_u64().expect("seq"),
    );
    let (deleted_id, deleted_seq) = (
        deleted["id"].as_str().expect("id").to_owned(),
        deleted["seq"].as_u64().expect("seq"),
    );

    let status = server.stop().await;
    assert!(status.success());
    let out = server.cli(&["audit", "verify"], None);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("chain(s) verified") && !stdout.contains("BROKEN"),
        "{stdout}"
    );

    // Someone with database access rewrites history: one row edited, another removed.
    let unprotect = if server.database_url().is_some() {
        "" // the superuser is not bound by the application role's missing UPDATE/DELETE grants
    } else {
        "DROP TRIGGER audit_log_no_update; DROP TRIGGER audit_log_no_delete; "
    };
    server.raw_sql(&format!(
        "{unprotect}UPDATE audit_log SET details = '{{\"name\":\"innocent\"}}' WHERE id = '{edited_id}'; \
         DELETE FROM audit_log WHERE id = '{deleted_id}';"
    ));

    let out = server.cli(&["audit", "verify"], None);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(
        out.status.code(),
        Some(1),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(&format!(
            "BROKEN  acme:web\tat seq {edited_seq} (entry {edited_id}): hash_mismatch"
        )),
        "{stdout}"
    );
    let next_after_deleted = deleted_seq + 1;
    assert!(
        stdout.contains(&format!("BROKEN  acme:*\tat seq {next_after_deleted} ")),
        "the entry after the removed one is where the chain breaks: {stdout}"
    );

    let server = server.restart().await;
    let report = verify(&server).await;
    assert_eq!(report["ok"], false, "{report}");
    let tenant_chain = chain(&report, "acme:web");
    assert_eq!(tenant_chain["ok"], false);
    assert_eq!(
        tenant_chain["broken"],
        json!({"seq": edited_seq, "entry_id": edited_id, "reason": "hash_mismatch"})
    );
    assert_eq!(
        tenant_chain["entries"],
        edited_seq - 1,
        "entries verified before the break"
    );
    let org_chain = chain(&report, "acme:*");
    assert_eq!(org_chain["ok"], false);
    assert_eq!(org_chain["broken"]["seq"], next_after_deleted);
    assert_eq!(org_chain["broken"]["reason"], "seq_gap");
    // Another tenant's chain is not affected (and not shown here).
    server.ensure_tenant("other", "proj").await;
    let (s, theirs) = status_json(
        server
            .web_in(Method::GET, "/audit/verify", "other", "proj")
            .send()
            .await
            .expect("verify"),
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(theirs["ok"], true, "{theirs}");
    assert!(!theirs.to_string().contains("acme:"));
}

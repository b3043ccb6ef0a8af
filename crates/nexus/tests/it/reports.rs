//! Report ingest: validation (all or nothing), limits, idempotency, device auth, heartbeat and commands.

use std::time::Duration;

use serde_json::json;

use crate::support::*;

#[tokio::test]
async fn reports_are_stored_stamped_and_idempotent() {
    let server = TestServer::start().await;
    let device = server.pair_device("pc").await;
    let mut r1 = report("s-ingest", "r1");
    r1["meta"]["tenant"] = json!("evil:tenant");
    r1["meta"]["event_id"] = json!(999);
    r1["x_extension"] = json!({"kept": true});
    let ids = server
        .push(&device, vec![r1, report("s-ingest", "r2")])
        .await;
    assert_eq!(ids, vec![1, 2]);
    let ids = server
        .push(
            &device,
            vec![report("s-ingest", "r2"), report("s-ingest", "r3")],
        )
        .await;
    assert_eq!(
        ids,
        vec![2, 3],
        "a repeated report id answers its existing event"
    );

    let mut stream = server.subscribe("s-ingest", Some(0)).await;
    let events = stream.reports(3, Duration::from_secs(10)).await;
    let first = events[0].json();
    assert_eq!(
        first["meta"]["tenant"], "acme:web",
        "tenant comes from the device token"
    );
    assert_eq!(first["meta"]["event_id"], 1);
    assert_eq!(first["x_extension"], json!({"kept": true}));
    assert_eq!(first["meta"]["approval_level"], "green");
    assert_eq!(
        events.iter().map(|e| e.id_u64()).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
}

#[tokio::test]
async fn one_invalid_report_rejects_the_whole_request() {
    let server = TestServer::start().await;
    let device = server.pair_device("pc").await;
    let mut bad = report("s-bad", "r2");
    bad["meta"]["approval_level"] = json!("purple");
    let r = server
        .device(reqwest::Method::POST, &device, "/reports")
        .json(&json!({"reports": [report("s-bad", "r1"), bad]}))
        .send()
        .await
        .expect("send");
    let (s, b) = status_json(r).await;
    assert_problem(s, &b, 422, "validation_failed");
    assert_eq!(b["errors"][0]["field"], "reports[1].meta.approval_level");

    let cases = [
        (
            json!({"meta": {"created_at": "t", "session_id": "s-bad"}}),
            "reports[0].meta.report_id",
        ),
        (
            json!({"meta": {"report_id": "x", "session_id": "s-bad"}}),
            "reports[0].meta.created_at",
        ),
        (
            json!({"meta": {"report_id": "x", "created_at": "t", "confidence": "high"}}),
            "reports[0].meta.confidence",
        ),
        (
            json!({"meta": {"report_id": "x", "created_at": "t"}, "risk": [{"level": "extreme"}]}),
            "reports[0].risk[0].level",
        ),
        (
            json!({"meta": {"report_id": "x", "created_at": "t"}, "ask": [{"type": "maybe"}]}),
            "reports[0].ask[0].type",
        ),
        (
            json!({"meta": {"report_id": "x", "created_at": "t"}, "ui_hint": {"surface": "tv"}}),
            "reports[0].ui_hint.surface",
        ),
        (
            json!({"meta": {"report_id": "x", "created_at": "t"}, "done": [{"title": 5}]}),
            "reports[0].done[0].title",
        ),
        (json!("not an object"), "reports[0]"),
    ];
    for (report, field) in cases {
        let r = server
            .device(reqwest::Method::POST, &device, "/reports")
            .json(&json!({"reports": [report]}))
            .send()
            .await
            .expect("send");
        let (s, b) = status_json(r).await;
        assert_problem(s, &b, 422, "validation_failed");
        assert_eq!(b["errors"][0]["field"], field, "{b}");
    }

    // Nothing from the rejected requests was stored.
    let ids = server.push(&device, vec![report("s-bad", "r1")]).await;
    assert_eq!(ids, vec![1]);
}

#[tokio::test]
async fn request_limits_answer_413() {
    let server = TestServer::start().await;
    let device = server.pair_device("pc").await;
    let many: Vec<_> = (0..101)
        .map(|i| report("s-limit", &format!("r{i}")))
        .collect();
    let r = server
        .device(reqwest::Method::POST, &device, "/reports")
        .json(&json!({"reports": many}))
        .send()
        .await
        .expect("send");
    let (s, b) = status_json(r).await;
    assert_problem(s, &b, 413, "too_many_reports");

    let mut big = report("s-limit", "big");
    big["rationale"] = json!("x".repeat(60_000));
    let huge: Vec<_> = (0..20)
        .map(|i| {
            let mut r = big.clone();
            r["meta"]["report_id"] = json!(format!("b{i}"));
            r
        })
        .collect();
    let r = server
        .device(reqwest::Method::POST, &device, "/reports")
        .json(&json!({"reports": huge}))
        .send()
        .await
        .expect("send");
    let (s, b) = status_json(r).await;
    assert_problem(s, &b, 413, "payload_too_large");

    let exactly_100: Vec<_> = (0..100)
        .map(|i| report("s-limit", &format!("ok{i}")))
        .collect();
    assert_eq!(server.push(&device, exactly_100).await.len(), 100);
}

#[tokio::test]
async fn device_endpoints_require_the_devices_own_token() {
    let server = TestServer::start().await;
    let device = server.pair_device("pc").await;
    let other = server.pair_device("other").await;
    let body = json!({"reports": [report("s-auth", "r1")]});
    let url = server.url(&format!("/devices/{}/reports", device.id));

    let (s, b) = status_json(
        server
            .http
            .post(&url)
            .json(&body)
            .send()
            .await
            .expect("send"),
    )
    .await;
    assert_problem(s, &b, 401, "invalid_token");
    let r = server
        .http
        .post(&url)
        .bearer_auth("nxd_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA")
        .json(&body)
        .send()
        .await
        .expect("send");
    assert_eq!(
        r.headers()
            .get("www-authenticate")
            .map(|v| v.to_str().expect("ascii")),
        Some("Bearer")
    );
    let (s, b) = status_json(r).await;
    assert_problem(s, &b, 401, "invalid_token");
    let (s, b) = status_json(
        server
            .http
            .post(&url)
            .bearer_auth("garbage")
            .json(&body)
            .send()
            .await
            .expect("send"),
    )
    .await;
    assert_problem(s, &b, 401, "invalid_token");
    // A valid token of another device cannot act for this one.
    let (s, b) = status_json(
        server
            .http
            .post(&url)
            .bearer_auth(&other.token)
            .json(&body)
            .send()
            .await
            .expect("send"),
    )
    .await;
    assert_problem(s, &b, 404, "device_not_found");
}

#[tokio::test]
async fn heartbeats_mark_devices_online_until_three_are_missed() {
    let server = TestServer::start_with(&["--heartbeat-interval", "300ms"]).await;
    let device = server.pair_device("pc").await;
    let status = || async {
        let (_, body) = status_json(
            server
                .web(reqwest::Method::GET, "/devices")
                .send()
                .await
                .expect("list"),
        )
        .await;
        body["devices"][0].clone()
    };
    assert_eq!(status().await["status"], "offline", "never heartbeated");
    let r = server
        .device(reqwest::Method::POST, &device, "/heartbeat")
        .json(&json!({"status": "online", "metrics": {"cpu": 0.25}, "agent_version": "2.3.1"}))
        .send()
        .await
        .expect("hb");
    let (s, b) = status_json(r).await;
    assert_eq!(s, 200);
    assert_eq!(b["ok"], true);
    let online = status().await;
    assert_eq!(online["status"], "online");
    assert_eq!(online["agent_version"], "2.3.1");
    assert_eq!(online["metrics"]["cpu"], 0.25);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(
        status().await["status"],
        "offline",
        "three missed intervals"
    );

    let r = server
        .device(reqwest::Method::POST, &device, "/heartbeat")
        .json(&json!({"status": "sleeping"}))
        .send()
        .await
        .expect("hb");
    let (s, b) = status_json(r).await;
    assert_problem(s, &b, 422, "validation_failed");
    assert_eq!(b["errors"][0]["field"], "status");
}

#[tokio::test]
async fn command_queue_pull_cursor_and_ack() {
    let server = TestServer::start().await;
    let device = server.pair_device("pc").await;
    // GREEN and YELLOW proposals are queued at once; RED ones (and unknown types) wait for an
    // approval and are not in the queue.
    let mut ids = Vec::new();
    for (i, (kind, risk)) in [
        ("fs.read", "green"),
        ("fs.write", "yellow"),
        ("shell.exec", "red"),
        ("fs.list", "green"),
        ("x.y", "red"),
    ]
    .into_iter()
    .enumerate()
    {
        let command_id = format!("cmd-{i}");
        let (s, cmd) = server
            .post_json(
                "/sidecar/command",
                &json!({"command_id": command_id, "device_id": device.id, "type": kind,
                        "params": {"path": "/tmp"}, "session_id": "s1"}),
            )
            .await;
        assert_eq!(s, 202, "{cmd}");
        assert_eq!(cmd["command_id"], command_id.as_str());
        assert_eq!(cmd["risk"], risk, "{kind}: unclassified commands are RED");
        if risk != "red" {
            assert_eq!(cmd["status"], "queued");
            ids.push(command_id);
        } else {
            assert_eq!(cmd["status"], "pending_approval");
        }
    }

    let pull = |cursor: Option<String>| {
        let path = match cursor {
            Some(c) => format!("/commands?cursor={c}"),
            None => "/commands".to_owned(),
        };
        let request = server.device(reqwest::Method::GET, &device, &path);
        async move { status_json(request.send().await.expect("pull")).await }
    };
    let (s, first) = pull(None).await;
    assert_eq!(s, 200);
    let got: Vec<_> = first["commands"]
        .as_array()
        .expect("list")
        .iter()
        .map(|c| c["command_id"].as_str().expect("id").to_owned())
        .collect();
    assert_eq!(got, ids);
    let c0 = &first["commands"][0];
    assert_eq!(c0["type"], "fs.read");
    assert_eq!(c0["params"], json!({"path": "/tmp"}));
    assert_eq!(c0["client_context"]["session_id"], "s1");
    assert!(c0.get("context").is_some() && c0["policy"]["approval_id"].is_null());
    let cursor = first["next_cursor"].as_str().expect("cursor").to_owned();
    let (_, empty) = pull(Some(cursor.clone())).await;
    assert_eq!(empty["commands"], json!([]));
    assert_eq!(empty["next_cursor"], cursor.as_str());

    let ack = server
        .device(
            reqwest::Method::POST,
            &device,
            &format!("/commands/{}/ack", ids[0]),
        )
        .json(&json!({"received_at": "2026-02-03T10:00:00Z", "attempt": 1}))
        .send()
        .await
        .expect("ack");
    assert_eq!(status_json(ack).await, (200, json!({"ok": true})));
    let (_, after_ack) = pull(None).await;
    let again: Vec<_> = after_ack["commands"]
        .as_array()
        .expect("list")
        .iter()
        .map(|c| (c["command_id"].as_str().expect("id"), c["attempt"].clone()))
        .collect();
    assert_eq!(
        again,
        [(ids[1].as_str(), json!(2)), (ids[2].as_str(), json!(2))],
        "acknowledged commands are not delivered again; the others are, as a new attempt"
    );

    let r = server
        .device(reqwest::Method::POST, &device, "/commands/cmd_unknown/ack")
        .json(&json!({}))
        .send()
        .await
        .expect("ack");
    let (s, b) = status_json(r).await;
    assert_problem(s, &b, 404, "command_not_found");
    let (s, b) = pull(Some("not-a-cursor".into())).await;
    assert_problem(s, &b, 400, "invalid_cursor");

    // Another device never sees these commands.
    let other = server.pair_device("other").await;
    let (_, theirs) = status_json(
        server
            .device(reqwest::Method::GET, &other, "/commands")
            .send()
            .await
            .expect("pull"),
    )
    .await;
    assert_eq!(theirs["commands"], json!([]));
}

#[tokio::test]
async fn deleting_a_device_revokes_its_token_at_once() {
    let server = TestServer::start().await;
    let device = server.pair_device("pc").await;
    let hb = || {
        server
            .device(reqwest::Method::POST, &device, "/heartbeat")
            .json(&json!({"status": "online"}))
            .send()
    };
    assert_eq!(
        hb().await.expect("hb").status(),
        200,
        "the token is cached now"
    );

    // Another tenant of the same admin: the device does not exist there.
    server.ensure_tenant("other", "p").await;
    let (s, b) = status_json(
        server
            .web_in(
                reqwest::Method::DELETE,
                &format!("/devices/{}", device.id),
                "other",
                "p",
            )
            .send()
            .await
            .expect("delete"),
    )
    .await;
    assert_problem(s, &b, 404, "device_not_found");
    let (s, b) = status_json(
        server
            .http
            .delete(server.url(&format!("/devices/{}", device.id)))
            .bearer_auth(&server.admin_token)
            .send()
            .await
            .expect("delete"),
    )
    .await;
    assert_problem(s, &b, 400, "tenant_required");
    let (s, b) = status_json(
        server
            .http
            .delete(server.url(&format!("/devices/{}", device.id)))
            .header("x-org-id", ORG)
            .header("x-project-id", PROJECT)
            .send()
            .await
            .expect("delete"),
    )
    .await;
    assert_problem(s, &b, 401, "authentication_required");
    assert_eq!(
        hb().await.expect("hb").status(),
        200,
        "refused deletes left the device alone"
    );

    let r = server
        .web(reqwest::Method::DELETE, &format!("/devices/{}", device.id))
        .send()
        .await
        .expect("delete");
    assert_eq!(r.status(), 204);
    let (s, b) = status_json(hb().await.expect("hb")).await;
    assert_problem(s, &b, 401, "invalid_token");
    let (s, b) = status_json(
        server
            .web(reqwest::Method::DELETE, &format!("/devices/{}", device.id))
            .send()
            .await
            .expect("delete"),
    )
    .await;
    assert_problem(s, &b, 404, "device_not_found");
    let (_, devices) = status_json(
        server
            .web(reqwest::Method::GET, "/devices")
            .send()
            .await
            .expect("list"),
    )
    .await;
    assert_eq!(devices["devices"], json!([]));
}

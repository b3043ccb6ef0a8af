//! The live stream (DESIGN.md §5): fan-out, ordering under concurrency, resume, snapshot fallback,
//! pings and idle close, slow subscribers, tenant isolation.

use std::collections::HashSet;
use std::time::Duration;

use serde_json::json;

use crate::support::*;

const WAIT: Duration = Duration::from_secs(20);

#[tokio::test]
async fn every_subscriber_gets_every_report_after_a_snapshot() {
    let server = TestServer::start().await;
    let device = server.pair_device("pc").await;
    server.push(&device, vec![report("s-fan", "before")]).await;

    let mut subscribers = Vec::new();
    for _ in 0..3 {
        let mut sub = server.subscribe("s-fan", None).await;
        assert_eq!(sub.status, 200);
        assert!(
            sub.headers["content-type"]
                .to_str()
                .expect("ct")
                .starts_with("text/event-stream")
        );
        let retry = sub.next_event(WAIT).await.expect("retry");
        assert_eq!(retry.retry, Some(1000));
        let snapshot = sub.next_data(WAIT).await.expect("snapshot");
        assert_eq!(snapshot.event, "snapshot");
        assert_eq!(snapshot.id_u64(), 1);
        let state = snapshot.json();
        assert_eq!(
            state["meta"]["report_id"], "before",
            "the snapshot carries the latest report"
        );
        assert_eq!(state["snapshot"]["last_event_id"], 1);
        assert_eq!(
            state["snapshot"]["devices"][0]["device_id"],
            device.id.as_str()
        );
        subscribers.push(sub);
    }
    let ids = server
        .push(
            &device,
            (0..5)
                .map(|i| report("s-fan", &format!("live{i}")))
                .collect(),
        )
        .await;
    assert_eq!(ids, vec![2, 3, 4, 5, 6]);
    for sub in &mut subscribers {
        let got = sub.reports(5, WAIT).await;
        assert_eq!(got.iter().map(|e| e.id_u64()).collect::<Vec<_>>(), ids);
        assert_eq!(got[4].json()["meta"]["report_id"], "live4");
    }
}

#[tokio::test]
async fn concurrent_publishers_are_seen_by_all_in_strictly_increasing_order() {
    let server = TestServer::start().await;
    let mut subscribers = Vec::new();
    for _ in 0..3 {
        let mut sub = server.subscribe("s-conc", None).await;
        assert_eq!(
            sub.next_data(WAIT).await.expect("snapshot").event,
            "snapshot"
        );
        subscribers.push(sub);
    }
    let mut devices = Vec::new();
    for i in 0..8 {
        devices.push(server.pair_device(&format!("pub{i}")).await);
    }
    let mut publishers = Vec::new();
    for (p, device) in devices.into_iter().enumerate() {
        let (http, url, token) = (
            server.http.clone(),
            server.url(&format!("/devices/{}/reports", device.id)),
            device.token.clone(),
        );
        publishers.push(tokio::spawn(async move {
            for i in 0..200 {
                let body = json!({"reports": [report("s-conc", &format!("p{p}-{i}"))]});
                let r = http
                    .post(&url)
                    .bearer_auth(&token)
                    .json(&body)
                    .send()
                    .await
                    .expect("push");
                assert_eq!(r.status(), 200);
            }
        }));
    }
    let readers: Vec<_> = subscribers
        .into_iter()
        .map(|mut sub| {
            tokio::spawn(async move { sub.reports(1600, Duration::from_secs(60)).await })
        })
        .collect();
    for p in publishers {
        p.await.expect("publisher");
    }
    for reader in readers {
        let events = reader.await.expect("reader");
        let ids: Vec<u64> = events.iter().map(SseEvent::id_u64).collect();
        assert!(
            ids.windows(2).all(|w| w[1] == w[0] + 1),
            "strictly increasing without gaps"
        );
        assert_eq!(ids.first(), Some(&1));
        assert_eq!(ids.last(), Some(&1600));
        let report_ids: HashSet<String> = events
            .iter()
            .map(|e| {
                e.json()["meta"]["report_id"]
                    .as_str()
                    .expect("rid")
                    .to_owned()
            })
            .collect();
        assert_eq!(report_ids.len(), 1600, "every report exactly once");
    }
}

#[tokio::test]
async fn resume_after_disconnect_delivers_exactly_the_missed_events() {
    let server = TestServer::start().await;
    let device = server.pair_device("pc").await;
    let mut sub = server.subscribe("s-resume", None).await;
    sub.next_data(WAIT).await.expect("snapshot");
    server
        .push(
            &device,
            (0..3)
                .map(|i| report("s-resume", &format!("a{i}")))
                .collect(),
        )
        .await;
    let seen = sub.reports(3, WAIT).await;
    let last = seen.last().expect("last").id_u64();
    drop(sub);

    server
        .push(
            &device,
            (0..4)
                .map(|i| report("s-resume", &format!("b{i}")))
                .collect(),
        )
        .await;
    let mut resumed = server.subscribe("s-resume", Some(last)).await;
    let replayed = resumed.reports(4, WAIT).await;
    assert_eq!(
        replayed.iter().map(SseEvent::id_u64).collect::<Vec<_>>(),
        vec![4, 5, 6, 7]
    );
    assert_eq!(replayed[0].json()["meta"]["report_id"], "b0");
    server.push(&device, vec![report("s-resume", "c0")]).await;
    let live = resumed.reports(1, WAIT).await;
    assert_eq!(
        live[0].id_u64(),
        8,
        "replay continues into live without gap or duplicate"
    );

    // The query parameter works for clients that cannot set headers.
    let mut by_query = SseClient::open(server.web(
        reqwest::Method::GET,
        "/agent/reports/stream?session_id=s-resume&last_event_id=6",
    ))
    .await;
    let got = by_query.reports(2, WAIT).await;
    assert_eq!(
        got.iter().map(SseEvent::id_u64).collect::<Vec<_>>(),
        vec![7, 8]
    );

    let bad = SseClient::open(
        server
            .web(
                reqwest::Method::GET,
                "/agent/reports/stream?session_id=s-resume",
            )
            .header("last-event-id", "abc"),
    )
    .await;
    assert_eq!(bad.status, 400);
}

#[tokio::test]
async fn a_cursor_older_than_the_buffer_gets_a_fresh_snapshot() {
    let server = TestServer::start().await;
    let device = server.pair_device("pc").await;
    for batch in 0..11 {
        server
            .push(
                &device,
                (0..100)
                    .map(|i| report("s-old", &format!("r{batch}-{i}")))
                    .collect(),
            )
            .await;
    }
    // 1100 events: a cursor at 50 is 1050 behind, past the 1000-event buffer.
    let mut sub = server.subscribe("s-old", Some(50)).await;
    let first = sub.next_data(WAIT).await.expect("first");
    assert_eq!(first.event, "snapshot");
    assert_eq!(first.id_u64(), 1100);
    assert_eq!(first.json()["meta"]["report_id"], "r10-99");
    server.push(&device, vec![report("s-old", "after")]).await;
    assert_eq!(sub.reports(1, WAIT).await[0].id_u64(), 1101);

    // Within the buffer: a plain replay.
    let mut near = server.subscribe("s-old", Some(101)).await;
    let replay = near.reports(1000, WAIT).await;
    assert_eq!(replay[0].id_u64(), 102);
    assert_eq!(replay[999].id_u64(), 1101);

    // A cursor from the future (e.g. another database) is not trusted either.
    let mut future = server.subscribe("s-old", Some(99_999)).await;
    assert_eq!(
        future.next_data(WAIT).await.expect("snapshot").event,
        "snapshot"
    );
}

#[tokio::test]
async fn pings_flow_and_an_idle_stream_is_closed() {
    let server =
        TestServer::start_with(&["--sse-ping-interval", "200ms", "--sse-idle-timeout", "1s"]).await;
    let mut sub = server.subscribe("s-idle", None).await;
    sub.next_data(WAIT).await.expect("snapshot");
    let started = std::time::Instant::now();
    let mut pings = 0;
    while let Some(event) = sub.next_event(Duration::from_secs(5)).await {
        assert_eq!(event.event, "ping");
        assert!(event.id.is_none(), "pings carry no id");
        assert!(event.json()["ts"].as_i64().expect("ts") > 1_700_000_000_000);
        pings += 1;
    }
    let lasted = started.elapsed();
    assert!(pings >= 3, "{pings} pings");
    assert!(
        lasted >= Duration::from_millis(900) && lasted < Duration::from_secs(4),
        "closed after {lasted:?}"
    );
}

#[tokio::test]
async fn a_slow_subscriber_is_cut_off_without_slowing_anyone_else() {
    let server = TestServer::start_with(&["--sse-queue", "128"]).await;
    let device = server.pair_device("pc").await;
    let mut slow = server.subscribe("s-slow", None).await;
    slow.next_data(WAIT).await.expect("snapshot");
    let mut fast = server.subscribe("s-slow", None).await;
    fast.next_data(WAIT).await.expect("snapshot");
    let fast_reader =
        tokio::spawn(async move { fast.reports(4000, Duration::from_secs(60)).await });

    let mut big = report("s-slow", "x");
    big["rationale"] = json!("y".repeat(4000));
    for batch in 0..160 {
        let reports = (0..25)
            .map(|i| {
                let mut r = big.clone();
                r["meta"]["report_id"] = json!(format!("r{batch}-{i}"));
                r
            })
            .collect();
        server.push(&device, reports).await;
    }
    let fast_events = fast_reader.await.expect("fast");
    assert_eq!(fast_events.last().expect("last").id_u64(), 4000);

    // The slow one was disconnected: it sees a prefix, then the end of the stream.
    let mut seen = 0u64;
    while let Some(event) = slow.next_data(Duration::from_secs(20)).await {
        seen = event.id_u64();
    }
    assert!(
        seen < 4000,
        "the slow subscriber was cut off (saw up to {seen})"
    );
    // It resumes from where it was (a snapshot, as it is now far behind).
    let mut resumed = server.subscribe("s-slow", Some(seen)).await;
    let first = resumed.next_data(WAIT).await.expect("resume");
    assert!(first.id_u64() > seen);
}

#[tokio::test]
async fn streams_are_isolated_by_tenant() {
    let server = TestServer::start().await;
    let mine = server.pair_device("mine").await;
    server.ensure_tenant("other", "proj").await;
    let mut theirs_stream = SseClient::open(server.web_in(
        reqwest::Method::GET,
        "/agent/reports/stream?session_id=shared",
        "other",
        "proj",
    ))
    .await;
    let snapshot = theirs_stream.next_data(WAIT).await.expect("snapshot");
    assert_eq!(
        snapshot.id_u64(),
        0,
        "the other tenant's session of the same name is empty"
    );
    server.push(&mine, vec![report("shared", "secret")]).await;
    let theirs_device = server.pair_device_in("theirs", "other", "proj").await;
    server
        .push(&theirs_device, vec![report("shared", "theirs-1")])
        .await;
    let next = theirs_stream.reports(1, WAIT).await;
    assert_eq!(next[0].json()["meta"]["report_id"], "theirs-1");
    assert_eq!(next[0].id_u64(), 1);
    assert_eq!(next[0].json()["meta"]["tenant"], "other:proj");

    let missing = SseClient::open(
        server
            .http
            .get(server.url("/agent/reports/stream?session_id=shared"))
            .bearer_auth(&server.admin_token),
    )
    .await;
    assert_eq!(missing.status, 400);
    let anonymous = SseClient::open(
        server
            .http
            .get(server.url("/agent/reports/stream?session_id=shared"))
            .header("x-org-id", ORG)
            .header("x-project-id", PROJECT),
    )
    .await;
    assert_eq!(anonymous.status, 401);
    let no_session =
        SseClient::open(server.web(reqwest::Method::GET, "/agent/reports/stream")).await;
    assert_eq!(no_session.status, 422);
}

//! Scale-out: several server processes on one PostgreSQL and one Redis. Publishing on one replica
//! is seen live on the others with the same ids; Redis outages lose and duplicate nothing;
//! a PostgreSQL outage turns readiness off and requests fail fast, then everything recovers.

use std::collections::HashSet;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::json;

use crate::support::*;

const WAIT: Duration = Duration::from_secs(30);

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// A private Redis for one test, so it can be restarted without disturbing other tests.
struct Redis {
    port: u16,
    child: Option<Child>,
}

impl Redis {
    fn start() -> Self {
        let mut redis = Self {
            port: free_port(),
            child: None,
        };
        redis.spawn();
        redis
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server (scripts/redis.sh installs it)");
        self.child = Some(child);
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("redis did not start");
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Replicas share the database, Redis and the directory of token signing keys (as a mounted
/// secret would be in production), so a user's access token works on every replica.
async fn replica(db: &TestDatabase, redis: &Redis, keys: &std::path::Path) -> TestServer {
    replica_with(db, redis, keys, &["--resync-interval", "300ms"]).await
}

async fn replica_with(
    db: &TestDatabase,
    redis: &Redis,
    keys: &std::path::Path,
    extra: &[&str],
) -> TestServer {
    let temp = tempfile::tempdir().expect("tempdir");
    let mut args = vec![
        "--database-url".to_owned(),
        db.app_url.clone(),
        "--redis-url".to_owned(),
        redis.url(),
        "--jwt-keys-dir".to_owned(),
        keys.display().to_string(),
    ];
    args.extend(extra.iter().map(|a| (*a).to_owned()));
    TestServer::spawn(temp.path().join("data"), Some(temp), args, "http").await
}

struct Cluster {
    a: TestServer,
    b: TestServer,
    db: TestDatabase,
    redis: Redis,
    keys: tempfile::TempDir,
}

async fn replicas() -> Option<Cluster> {
    postgres_superuser_url()?;
    let db = TestDatabase::create().await;
    let redis = Redis::start();
    let keys = tempfile::tempdir().expect("tempdir");
    let a = replica(&db, &redis, keys.path()).await;
    let b = replica(&db, &redis, keys.path()).await;
    Some(Cluster {
        a,
        b,
        db,
        redis,
        keys,
    })
}

/// Pairs across replicas: started on A, confirmed on B, completed on A.
async fn pair_across(a: &TestServer, b: &TestServer, name: &str) -> PairedDevice {
    let (_, start) = status_json(
        a.http
            .post(a.url("/devices/pairing/start"))
            .json(&json!({"device_name": name}))
            .send()
            .await
            .expect("start"),
    )
    .await;
    let (s, _) = b
        .post_json(
            "/devices/pairing/confirm_by_code",
            &json!({"pairing_code": start["pairing_code"]}),
        )
        .await;
    assert_eq!(s, 200);
    let (s, done) = status_json(
        a.http
            .post(a.url("/devices/pairing/complete"))
            .json(
                &json!({"pairing_id": start["pairing_id"], "device_nonce": start["device_nonce"]}),
            )
            .send()
            .await
            .expect("complete"),
    )
    .await;
    assert_eq!(s, 200, "{done}");
    PairedDevice {
        id: done["device_id"].as_str().expect("id").to_owned(),
        token: done["device_token"].as_str().expect("token").to_owned(),
        refresh_token: done["refresh_token"].as_str().expect("refresh").to_owned(),
        server_keys: done["server_keys"].clone(),
    }
}

fn assert_complete_in_order(events: &[SseEvent], n: u64) {
    let ids: Vec<u64> = events.iter().map(SseEvent::id_u64).collect();
    assert_eq!(
        ids,
        (1..=n).collect::<Vec<_>>(),
        "every event once, in order"
    );
    let reports: HashSet<String> = events
        .iter()
        .map(|e| {
            e.json()["meta"]["report_id"]
                .as_str()
                .expect("rid")
                .to_owned()
        })
        .collect();
    assert_eq!(reports.len() as u64, n);
}

#[tokio::test]
async fn a_report_pushed_to_one_replica_is_live_on_the_other() {
    let Some(Cluster {
        a,
        b,
        db: _db,
        redis: _redis,
        keys: _keys,
    }) = replicas().await
    else {
        return;
    };
    let device = pair_across(&a, &b, "pc").await;
    let mut on_b = b.subscribe("s-x", None).await;
    assert_eq!(
        on_b.next_data(WAIT).await.expect("snapshot").event,
        "snapshot"
    );
    let mut on_a = a.subscribe("s-x", None).await;
    on_a.next_data(WAIT).await.expect("snapshot");
    let ids = a
        .push(
            &device,
            (0..20).map(|i| report("s-x", &format!("r{i}"))).collect(),
        )
        .await;
    assert_eq!(ids, (1..=20).collect::<Vec<u64>>());
    let seen_b = on_b.reports(20, WAIT).await;
    let seen_a = on_a.reports(20, WAIT).await;
    assert_complete_in_order(&seen_b, 20);
    assert_eq!(
        seen_a.iter().map(|e| e.data.clone()).collect::<Vec<_>>(),
        seen_b.iter().map(|e| e.data.clone()).collect::<Vec<_>>()
    );
    // The device is known on both; its token works against either.
    let hb = b
        .device(reqwest::Method::POST, &device, "/heartbeat")
        .json(&json!({"status": "online"}))
        .send()
        .await
        .expect("hb");
    assert_eq!(hb.status(), 200);
    // Replay on B of what A stored.
    let mut replay = b.subscribe("s-x", Some(15)).await;
    assert_eq!(
        replay
            .reports(5, WAIT)
            .await
            .iter()
            .map(SseEvent::id_u64)
            .collect::<Vec<_>>(),
        vec![16, 17, 18, 19, 20]
    );
}

#[tokio::test]
async fn concurrent_publishers_on_both_replicas_are_seen_in_one_order_everywhere() {
    let Some(Cluster {
        a,
        b,
        db: _db,
        redis: _redis,
        keys: _keys,
    }) = replicas().await
    else {
        return;
    };
    let mut subscribers = Vec::new();
    for server in [&a, &b, &a, &b] {
        let mut sub = server.subscribe("s-both", None).await;
        sub.next_data(WAIT).await.expect("snapshot");
        subscribers.push(sub);
    }
    let mut publishers = Vec::new();
    for i in 0..6 {
        let server = if i % 2 == 0 { &a } else { &b };
        let device = pair_across(&a, &b, &format!("pub{i}")).await;
        let (http, url, token) = (
            server.http.clone(),
            server.url(&format!("/devices/{}/reports", device.id)),
            device.token.clone(),
        );
        publishers.push(tokio::spawn(async move {
            for j in 0..100 {
                let r = http
                    .post(&url)
                    .bearer_auth(&token)
                    .json(&json!({"reports": [report("s-both", &format!("p{i}-{j}"))]}))
                    .send()
                    .await
                    .expect("push");
                assert_eq!(r.status(), 200);
            }
        }));
    }
    let readers: Vec<_> = subscribers
        .into_iter()
        .map(|mut s| tokio::spawn(async move { s.reports(600, Duration::from_secs(60)).await }))
        .collect();
    for p in publishers {
        p.await.expect("publisher");
    }
    for reader in readers {
        assert_complete_in_order(&reader.await.expect("reader"), 600);
    }
}

#[tokio::test]
async fn a_redis_restart_mid_stream_loses_and_duplicates_nothing() {
    let Some(Cluster {
        a,
        b,
        db: _db,
        mut redis,
        keys: _keys,
    }) = replicas().await
    else {
        return;
    };
    let device = pair_across(&a, &b, "pc").await;
    let mut subscribers = Vec::new();
    for _ in 0..3 {
        let mut sub = b.subscribe("s-redis", None).await;
        sub.next_data(WAIT).await.expect("snapshot");
        subscribers.push(sub);
    }
    let readers: Vec<_> = subscribers
        .into_iter()
        .map(|mut s| tokio::spawn(async move { s.reports(300, Duration::from_secs(60)).await }))
        .collect();
    for i in 0..300 {
        if i == 100 {
            redis.stop();
        }
        if i == 200 {
            redis.spawn();
        }
        a.push(&device, vec![report("s-redis", &format!("r{i}"))])
            .await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for reader in readers {
        assert_complete_in_order(&reader.await.expect("reader"), 300);
    }
}

#[tokio::test]
async fn a_postgres_outage_fails_fast_and_recovers_without_losing_acknowledged_data() {
    if postgres_superuser_url().is_none() {
        return;
    }
    // A private cluster, so stopping it does not disturb other tests.
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .expect("chmod");
    let port = free_port();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/postgres.sh");
    let pg = |action: &str| {
        let out = Command::new("bash")
            .args([script, action])
            .env("NEXUS_PG_DIR", dir.path().join("pg"))
            .env("NEXUS_PG_PORT", port.to_string())
            .output()
            .expect("postgres.sh");
        assert!(
            out.status.success(),
            "postgres.sh {action}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    let superuser = pg("start");
    let db = TestDatabase::create_on(&superuser).await;
    let temp = tempfile::tempdir().expect("tempdir");
    let server = TestServer::spawn(
        temp.path().join("data"),
        Some(temp),
        vec!["--database-url".into(), db.app_url.clone()],
        "http",
    )
    .await;
    let device = server.pair_device("pc").await;
    let mut acknowledged = server.push(&device, vec![report("s-pg", "before")]).await;

    pg("stop");
    let started = std::time::Instant::now();
    let ready = server
        .http
        .get(server.url("/health/ready"))
        .send()
        .await
        .expect("ready");
    assert_eq!(ready.status(), 503);
    let r = server
        .device(reqwest::Method::POST, &device, "/reports")
        .json(&json!({"reports": [report("s-pg", "during")]}))
        .send()
        .await
        .expect("push");
    let (s, body) = status_json(r).await;
    assert_problem(s, &body, 503, "service_unavailable");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "fails fast, took {:?}",
        started.elapsed()
    );

    pg("start");
    let mut recovered = false;
    for _ in 0..100 {
        if server
            .http
            .get(server.url("/health/ready"))
            .send()
            .await
            .expect("ready")
            .status()
            == 200
        {
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(recovered, "ready again once PostgreSQL is back");
    acknowledged.extend(server.push(&device, vec![report("s-pg", "after")]).await);
    let mut stream = server.subscribe("s-pg", Some(0)).await;
    let events = stream.reports(acknowledged.len(), WAIT).await;
    assert_eq!(
        events.iter().map(SseEvent::id_u64).collect::<Vec<_>>(),
        acknowledged
    );
    drop(server);
    pg("stop");
}

#[tokio::test]
async fn deleting_a_device_on_one_replica_revokes_it_on_the_other_at_once() {
    let Some(Cluster {
        a,
        b,
        db,
        redis,
        keys,
    }) = replicas().await
    else {
        return;
    };
    let device = pair_across(&a, &b, "pc").await;
    let hb = |server: &TestServer, device: &PairedDevice| {
        server
            .device(reqwest::Method::POST, device, "/heartbeat")
            .json(&json!({"status": "online"}))
            .send()
    };
    assert_eq!(hb(&b, &device).await.expect("hb").status(), 200);
    let r = a
        .web(reqwest::Method::DELETE, &format!("/devices/{}", device.id))
        .send()
        .await
        .expect("delete");
    assert_eq!(r.status(), 204);
    assert_eq!(
        hb(&b, &device).await.expect("hb").status(),
        401,
        "refused on the other replica with no delay"
    );

    // Operators who let replicas cache credentials still get revocation within milliseconds,
    // carried by Redis.
    let caching = || replica_with(&db, &redis, keys.path(), &["--credential-cache-ttl", "1h"]);
    let (c, d) = (caching().await, caching().await);
    let device = pair_across(&c, &d, "pc2").await;
    assert_eq!(
        hb(&d, &device).await.expect("hb").status(),
        200,
        "now cached on d for an hour"
    );
    tokio::time::sleep(Duration::from_millis(300)).await; // both replicas are subscribed to Redis
    let r = c
        .web(reqwest::Method::DELETE, &format!("/devices/{}", device.id))
        .send()
        .await
        .expect("delete");
    assert_eq!(r.status(), 204);
    let mut refused = false;
    for _ in 0..50 {
        if hb(&d, &device).await.expect("hb").status() == 401 {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        refused,
        "the revocation reached the caching replica over Redis"
    );
}

#[tokio::test]
async fn sessions_and_tokens_are_honoured_and_revoked_on_every_replica() {
    let Some(Cluster {
        a,
        b,
        db: _db,
        redis: _redis,
        keys: _keys,
    }) = replicas().await
    else {
        return;
    };
    // One key directory: both replicas publish the same keys and accept each other's tokens.
    let jwks = |server: &TestServer| {
        let request = server.http.get(server.url("/.well-known/jwks.json")).send();
        async move { status_json(request.await.expect("jwks")).await.1 }
    };
    assert_eq!(jwks(&a).await, jwks(&b).await);
    let (s, login) = status_json(
        a.http
            .post(a.url("/auth/login"))
            .json(&json!({"email": ADMIN_EMAIL, "password": ADMIN_PASSWORD}))
            .send()
            .await
            .expect("login"),
    )
    .await;
    assert_eq!(s, 200, "{login}");
    let token = login["access_token"].as_str().expect("token");
    let devices = |server: &TestServer| {
        server
            .http
            .get(server.url("/devices"))
            .bearer_auth(token)
            .header("x-org-id", ORG)
            .header("x-project-id", PROJECT)
            .send()
    };
    assert_eq!(devices(&a).await.expect("a").status(), 200);
    assert_eq!(
        devices(&b).await.expect("b").status(),
        200,
        "a token signed on A works on B"
    );
    // Refreshing on B (the session lives in the shared store) rotates for both.
    let (s, refreshed) = status_json(
        b.http
            .post(b.url("/auth/refresh"))
            .json(&json!({"refresh_token": login["refresh_token"]}))
            .send()
            .await
            .expect("refresh"),
    )
    .await;
    assert_eq!(s, 200, "{refreshed}");
    let (s, reused) = status_json(
        a.http
            .post(a.url("/auth/refresh"))
            .json(&json!({"refresh_token": login["refresh_token"]}))
            .send()
            .await
            .expect("refresh"),
    )
    .await;
    assert_problem(s, &reused, 401, "refresh_token_reused");
    assert_eq!(
        devices(&b).await.expect("b").status(),
        401,
        "reuse detected on A ended the session on B at once"
    );

    // Logout on one replica ends the session on the other at once.
    let second = a.login(ADMIN_EMAIL, ADMIN_PASSWORD).await;
    let on_b = |t: &str| {
        b.http
            .get(b.url("/auth/me"))
            .bearer_auth(t.to_owned())
            .send()
    };
    assert_eq!(on_b(&second).await.expect("me").status(), 200);
    let r = a
        .http
        .post(a.url("/auth/logout"))
        .bearer_auth(&second)
        .send()
        .await
        .expect("logout");
    assert_eq!(r.status(), 204);
    assert_eq!(on_b(&second).await.expect("me").status(), 401);

    // A device's refresh on A retires its old access token on B at once.
    let device = pair_across(&a, &b, "pc").await;
    let hb = |server: &TestServer, token: &str| {
        server
            .http
            .post(server.url(&format!("/devices/{}/heartbeat", device.id)))
            .bearer_auth(token.to_owned())
            .json(&json!({"status": "online"}))
            .send()
    };
    assert_eq!(hb(&b, &device.token).await.expect("hb").status(), 200);
    let (s, rotated) = status_json(
        a.http
            .post(a.url("/devices/token/refresh"))
            .json(&json!({"device_id": device.id, "refresh_token": device.refresh_token}))
            .send()
            .await
            .expect("refresh"),
    )
    .await;
    assert_eq!(s, 200, "{rotated}");
    assert_eq!(hb(&b, &device.token).await.expect("hb").status(), 401);
    let new_token = rotated["device_token"].as_str().expect("token");
    assert_eq!(hb(&b, new_token).await.expect("hb").status(), 200);
}

/// Guessing budgets are per user, address or email, not per replica: with Redis the replicas
/// share the counts, so spreading guesses over two replicas does not double the budget.
#[tokio::test]
async fn guessing_budgets_are_shared_by_the_replicas() {
    let Some(Cluster {
        a,
        b,
        redis: _redis,
        db: _db,
        ..
    }) = replicas().await
    else {
        return;
    };
    // Wrong pairing codes: 5 per user and address per 10 minutes, 3 tried on A and 2 on B.
    for i in 0..5 {
        let server = if i % 2 == 0 { &a } else { &b };
        let (s, body) = server
            .post_json(
                "/devices/pairing/preview",
                &json!({"pairing_code": format!("{:03}-{:03}", 100 + i, 200 + i)}),
            )
            .await;
        assert_problem(s, &body, 404, "pairing_not_found");
    }
    for server in [&a, &b] {
        let (s, body) = server
            .post_json(
                "/devices/pairing/preview",
                &json!({"pairing_code": "999-999"}),
            )
            .await;
        assert_problem(s, &body, 429, "too_many_wrong_codes");
    }

    // Sign-in with an email that has no account: after 6 failures (5 free, then 1 s, 2 s, …)
    // the next try waits, exactly like an account; 3 failures were on A and 3 on B.
    for i in 0..6 {
        let server = if i % 2 == 0 { &a } else { &b };
        let (s, body) = server
            .login_response("nobody@nexus.test", "Wrong-password-1!", None)
            .await;
        assert_problem(s, &body, 401, "invalid_credentials");
    }
    for server in [&a, &b] {
        let (s, body) = server
            .login_response("nobody@nexus.test", "Wrong-password-1!", None)
            .await;
        assert_eq!(s, 429, "{body}");
    }
}

/// Checking and counting a guess is one atomic step in Redis: twenty wrong codes sent at once,
/// half to each replica, get exactly five answers and fifteen refusals.
#[tokio::test]
async fn concurrent_guesses_on_two_replicas_cannot_slip_past_the_limit() {
    let Some(Cluster {
        a,
        b,
        redis: _redis,
        db: _db,
        ..
    }) = replicas().await
    else {
        return;
    };
    let guesses = (0..20).map(|i| {
        let server = if i % 2 == 0 { &a } else { &b };
        let request = server
            .web(reqwest::Method::POST, "/devices/pairing/preview")
            .json(&json!({"pairing_code": format!("{:03}-{:03}", 500 + i, 600 + i)}));
        async move { status_json(request.send().await.expect("guess")).await }
    });
    let answers = futures::future::join_all(guesses).await;
    let checked = answers.iter().filter(|(s, _)| *s == 404).count();
    let refused = answers.iter().filter(|(s, _)| *s == 429).count();
    assert_eq!((checked, refused), (5, 15), "{answers:?}");
}

/// Wrong passwords for one account sent at once to both replicas are checked one at a time
/// across them (a lock in Redis), so exactly as many are checked as one after the other would be:
/// five free failures and the sixth; the rest meet the backoff.
#[tokio::test]
async fn concurrent_sign_in_guesses_on_two_replicas_meet_the_backoff() {
    let Some(Cluster {
        a,
        b,
        redis: _redis,
        db: _db,
        ..
    }) = replicas().await
    else {
        return;
    };
    let user = a.new_member(ORG, "race@nexus.test", "viewer").await;
    let attempts = (0..24).map(|i| {
        let server = if i % 2 == 0 { &a } else { &b };
        let request = server
            .http
            .post(server.url("/auth/login"))
            .json(&json!({"email": user.email, "password": "Wrong-password-1!"}));
        async move { request.send().await.expect("login").status().as_u16() }
    });
    let statuses = futures::future::join_all(attempts).await;
    let checked = statuses.iter().filter(|s| **s == 401).count();
    let throttled = statuses.iter().filter(|s| **s == 429).count();
    assert_eq!((checked, throttled), (6, 18), "{statuses:?}");
}

/// Without Redis the budgets fall back to each replica's own count: looser, never switched off.
#[tokio::test]
async fn guessing_is_still_throttled_while_redis_is_down() {
    let Some(Cluster {
        a,
        mut redis,
        db: _db,
        ..
    }) = replicas().await
    else {
        return;
    };
    redis.stop();
    for i in 0..5 {
        let (s, body) = a
            .post_json(
                "/devices/pairing/preview",
                &json!({"pairing_code": format!("{:03}-{:03}", 300 + i, 400 + i)}),
            )
            .await;
        assert_problem(s, &body, 404, "pairing_not_found");
    }
    let (s, body) = a
        .post_json(
            "/devices/pairing/preview",
            &json!({"pairing_code": "999-999"}),
        )
        .await;
    assert_problem(s, &body, 429, "too_many_wrong_codes");
    assert!(
        a.log_text().contains("this replica"),
        "the fallback is logged: {}",
        a.log_text()
    );
}

/// The wake-up crosses replicas through Redis: with the store re-read only once a minute, a
/// device long-polling A still gets a command proposed on B right away, not when its wait runs out.
#[tokio::test]
async fn a_command_queued_on_one_replica_wakes_a_long_poll_on_the_other() {
    let Some(_) = postgres_superuser_url() else {
        return;
    };
    let db = TestDatabase::create().await;
    let redis = Redis::start();
    let keys = tempfile::tempdir().expect("tempdir");
    let slow_recheck = ["--resync-interval", "300ms", "--long-poll-recheck", "60s"];
    let a = replica_with(&db, &redis, keys.path(), &slow_recheck).await;
    let b = replica_with(&db, &redis, keys.path(), &slow_recheck).await;
    let device = pair_across(&a, &b, "pc").await;
    for (i, (poll_on, propose_on)) in [(&a, &b), (&b, &a)].into_iter().enumerate() {
        let request = poll_on.device(
            reqwest::Method::GET,
            &device,
            &format!("/commands?cursor={}&wait=20", i),
        );
        let poll =
            tokio::spawn(async move { status_json(request.send().await.expect("poll")).await });
        // Give the poll time to start waiting (it reads the store once first).
        tokio::time::sleep(Duration::from_millis(500)).await;
        let id = format!("wake-{i}");
        let proposed_at = std::time::Instant::now();
        let (s, body) = propose_on
            .post_json(
                "/sidecar/command",
                &json!({"command_id": id, "type": "fs.read", "device_id": device.id, "session_id": "s-wake"}),
            )
            .await;
        assert_eq!(s, 202, "{body}");
        let (s, got) = poll.await.expect("join");
        // Not a speed target: a poll that was not woken answers only when its 20 s wait ends
        // (it reads the store one last time then), so anything well below that means woken.
        let waited = proposed_at.elapsed();
        assert_eq!(s, 200, "{got}");
        assert_eq!(got["commands"][0]["command_id"], id.as_str(), "{got}");
        assert!(
            waited < Duration::from_secs(10),
            "the long-poll was not woken; it answered after {waited:?}"
        );
    }
}

/// Commands across replicas: a device long-polling one replica gets what was proposed or approved
/// on the other at once (woken through Redis; the poll also re-reads the store twice a second in
/// case that message is lost); decisions racing on both replicas have one winner; both replicas sweep, yet an expiry
/// happens once; a grant made by either replica verifies with the keys the device got at pairing.
#[tokio::test]
async fn commands_flow_across_replicas() {
    let Some(Cluster {
        a,
        b,
        redis: _redis,
        db: _db,
        ..
    }) = replicas().await
    else {
        return;
    };
    let device = pair_across(&a, &b, "pc").await;
    let mut stream = a.subscribe("s-rep", None).await;
    stream.next_data(WAIT).await.expect("snapshot");
    let long_poll = |server: &TestServer, cursor: &str| {
        let request = server.device(
            reqwest::Method::GET,
            &device,
            &format!("/commands?cursor={cursor}&wait=10"),
        );
        tokio::spawn(async move {
            let answer = status_json(request.send().await.expect("long-poll")).await;
            (answer, std::time::Instant::now())
        })
    };

    // GREEN proposed on B, delivered to a device waiting on A.
    let poll = long_poll(&a, "0");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let proposed_at = std::time::Instant::now();
    let (s, green) = b
        .post_json(
            "/sidecar/command",
            &json!({"command_id": "rep-green", "type": "fs.read", "device_id": device.id, "session_id": "s-rep"}),
        )
        .await;
    assert_eq!(s, 202, "{green}");
    let ((s, got), at) = poll.await.expect("join");
    assert_eq!(s, 200, "{got}");
    assert_eq!(got["commands"][0]["command_id"], "rep-green", "{got}");
    assert!(
        at.duration_since(proposed_at) < Duration::from_secs(3),
        "propose on B → device on A took {:?}",
        at.duration_since(proposed_at)
    );
    let cursor = got["next_cursor"].as_str().expect("cursor").to_owned();

    // RED proposed on A; ten approvals and ten denials race on both replicas.
    let (s, red) = a
        .post_json(
            "/sidecar/command",
            &json!({"command_id": "rep-red", "type": "shell.exec", "params": {"cmd": "deploy"},
                    "device_id": device.id, "session_id": "s-rep"}),
        )
        .await;
    assert_eq!(s, 202, "{red}");
    let approval_id = red["approval_id"].as_str().expect("approval").to_owned();
    let poll = long_poll(&a, &cursor);
    let decisions = (0..20).map(|i| {
        let server = if i % 2 == 0 { &a } else { &b };
        let decision = if i % 4 < 2 { "approve" } else { "deny" };
        let request = server
            .web(
                reqwest::Method::POST,
                &format!("/approvals/{approval_id}/decide"),
            )
            .json(&json!({"decision": decision}));
        async move {
            (
                decision,
                status_json(request.send().await.expect("decide")).await,
            )
        }
    });
    let results = futures::future::join_all(decisions).await;
    let winners: Vec<_> = results.iter().filter(|(_, (s, _))| *s == 202).collect();
    assert_eq!(winners.len(), 1, "{results:?}");
    for (_, (s, b)) in results.iter().filter(|(_, (s, _))| *s != 202) {
        assert_problem(*s, b, 409, "approval_already_decided");
    }
    let ((s, got), _) = poll.await.expect("join");
    assert_eq!(s, 200);
    if winners[0].0 == "approve" {
        let commands = got["commands"].as_array().expect("commands");
        assert_eq!(commands.len(), 1, "delivered once: {got}");
        assert_eq!(commands[0]["attempt"], 1);
        assert!(
            grant_verifies(&device.server_keys, &device.id, &commands[0]),
            "{got}"
        );
    } else {
        assert_eq!(got["commands"], json!([]), "{got}");
    }

    // Both replicas sweep; the expiry happens once.
    let (s, mut policy) = status_json(
        b.web(reqwest::Method::GET, "/policy")
            .send()
            .await
            .expect("policy"),
    )
    .await;
    assert_eq!(s, 200);
    policy["approval_ttl_secs"] = json!(1);
    let (s, saved) = status_json(
        b.web(reqwest::Method::PUT, "/policy")
            .json(&policy)
            .send()
            .await
            .expect("put"),
    )
    .await;
    assert_eq!(s, 200, "{saved}");
    let (s, late) = a
        .post_json(
            "/sidecar/command",
            &json!({"command_id": "rep-late", "type": "shell.exec", "device_id": device.id, "session_id": "s-rep"}),
        )
        .await;
    assert_eq!(s, 202, "{late}");
    let mut seen = Vec::new();
    while !seen.contains(&"rep-late:expired".to_owned()) {
        let event = stream.next_data(WAIT).await.expect("stream");
        let r = event.json();
        if event.event == "report" && r["command"].is_object() {
            seen.push(format!(
                "{}:{}",
                r["command"]["command_id"].as_str().expect("id"),
                r["command"]["status"].as_str().expect("status")
            ));
        }
    }
    tokio::time::sleep(Duration::from_millis(2500)).await; // both replicas swept again meanwhile
    let (_, audit) = status_json(
        a.web(reqwest::Method::GET, "/audit/logs?action=approval.expire")
            .send()
            .await
            .expect("audit"),
    )
    .await;
    let expiries = audit["entries"].as_array().expect("entries");
    assert_eq!(expiries.len(), 1, "{audit}");
    assert_eq!(expiries[0]["target"]["id"], "rep-late");
    let (_, events) = status_json(
        b.web(reqwest::Method::GET, "/audit/logs?action=command.propose")
            .send()
            .await
            .expect("audit"),
    )
    .await;
    assert_eq!(events["entries"].as_array().expect("entries").len(), 3);
    assert_eq!(
        seen.iter().filter(|s| s.starts_with("rep-late:")).count(),
        2,
        "pending_approval then expired, once each: {seen:?}"
    );
}

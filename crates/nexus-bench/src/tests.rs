//! End-to-end self-tests of the harness against the in-process mock server.

use std::sync::Arc;
use std::time::Duration;

use crate::common::{BaseUrl, ProcWatch, Target};
use crate::target::{Ctx, header_lines};
use crate::webauth::{Credentials, sign_in};
use crate::{authcost, cmdlatency, fanout, idle, ingest, mock};

async fn start_mock() -> (String, tokio::task::JoinHandle<anyhow::Result<()>>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    (url, tokio::spawn(mock::serve(l)))
}

fn creds() -> Credentials {
    Credentials {
        email: "bench@nexus.bench".into(),
        password: "Load-Test-Pass-2026!".into(),
    }
}

/// A context without the bearer (what `--no-login` gives).
fn ctx_anonymous(url: &str) -> Ctx {
    let web_headers = vec![
        ("x-org-id".to_string(), "o".to_string()),
        ("x-project-id".to_string(), "p".to_string()),
    ];
    Ctx {
        base: BaseUrl::parse(url).unwrap(),
        target: Target::Nexus,
        sse_header_lines: header_lines(&web_headers),
        web_headers,
        nchan_pub_path: "/pub/".into(),
        nchan_sub_path: "/sub/".into(),
        run: crate::common::run_id(),
        // Our own process hosts the mock, so sampling it is meaningful.
        proc: Some(ProcWatch {
            pid: std::process::id(),
        }),
        timeout: Duration::from_secs(5),
    }
}

/// Signed in as the bench does it before a run: bearer in web headers and SSE.
async fn ctx(url: &str) -> Arc<Ctx> {
    let mut c = ctx_anonymous(url);
    let s = sign_in(&c.base, c.timeout, &creds(), "o", "p")
        .await
        .unwrap();
    c.web_headers.push(s.header());
    c.sse_header_lines = header_lines(&c.web_headers);
    Arc::new(c)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_against_mock() {
    let (url, h) = start_mock().await;
    let v = ingest::run(
        ctx(&url).await,
        ingest::IngestArgs {
            connections: 8,
            devices: 3,
            sessions: 5,
            duration: 1.0,
            warmup: 0.0,
            requests: Some(400),
            batch: 2,
            pair_concurrency: 2,
        },
    )
    .await
    .unwrap();
    h.abort();
    assert_eq!(v["ok_requests"], 400, "{v}");
    assert_eq!(v["reports_ok"], 800, "{v}");
    assert_eq!(v["non_2xx"], 0);
    assert_eq!(v["errors"], 0);
    assert_eq!(v["tcp_connects"], 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_against_mock() {
    let (url, h) = start_mock().await;
    let v = fanout::run(
        ctx(&url).await,
        fanout::FanoutArgs {
            sessions: 7,
            subscribers: 60,
            rate: 200.0,
            duration: 1.0,
            publish_connections: 3,
            connect_concurrency: 16,
            establish_timeout: 5.0,
            drain_timeout: 3.0,
            settle: 0.0,
            subscribe_url: None,
        },
    )
    .await
    .unwrap();
    h.abort();
    assert_eq!(v["subscribers_established"], 60, "{v}");
    assert_eq!(v["published_ok"], 200, "{v}");
    // 200 reports over 7 sessions; sessions 0..3 have 9 subs, 4..6 have 8.
    // reports per session: 29,29,29,29,28,28,28 -> expected = sum(reports*subs)
    let expected: u64 = (0..7u64)
        .map(|s| {
            let reports = 200 / 7 + u64::from(s < 200 % 7);
            let subs = 60 / 7 + u64::from(s < 60 % 7);
            reports * subs
        })
        .sum();
    assert_eq!(v["expected"], expected, "{v}");
    assert_eq!(v["delivered"], expected, "{v}");
    assert_eq!(v["duplicates"], 0);
    assert_eq!(v["out_of_order"], 0);
    assert_eq!(v["missing"], 0);
    assert_eq!(v["latency"]["count"], expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_against_mock() {
    let (url, h) = start_mock().await;
    let v = idle::run(
        ctx(&url).await,
        idle::IdleArgs {
            connections: 300,
            sessions: 10,
            connect_concurrency: 50,
            establish_timeout: 5.0,
            settle: 0.1,
            hold: 0.1,
            after_close: 0.1,
        },
    )
    .await
    .unwrap();
    h.abort();
    assert_eq!(v["established"], 300, "{v}");
    assert_eq!(v["failed"], 0);
    assert_eq!(v["closed_early"], 0);
    assert!(v["time_to_establish_all_s"].as_f64().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriber_reports_http_errors() {
    let (url, h) = start_mock().await;
    // No tenant headers -> mock answers 401; every subscriber must fail cleanly.
    let mut c = Arc::try_unwrap(ctx(&url).await).ok().unwrap();
    c.sse_header_lines = String::new();
    let v = idle::run(
        Arc::new(c),
        idle::IdleArgs {
            connections: 5,
            sessions: 1,
            connect_concurrency: 5,
            establish_timeout: 2.0,
            settle: 0.0,
            hold: 0.0,
            after_close: 0.0,
        },
    )
    .await
    .unwrap();
    h.abort();
    assert_eq!(v["established"], 0, "{v}");
    assert_eq!(v["failed"], 5);
    let s = v["failure_samples"][0].as_str().unwrap();
    assert!(s.contains("401"), "{s}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_subscribers_follow_subscribe_url() {
    // Two independent mocks share nothing, so subscribers on B see none of the
    // reports published on A: proof that they connected to --subscribe-url.
    let (url_a, ha) = start_mock().await;
    let (url_b, hb) = start_mock().await;
    let v = fanout::run(
        ctx(&url_a).await,
        fanout::FanoutArgs {
            sessions: 2,
            subscribers: 4,
            rate: 100.0,
            duration: 0.2,
            publish_connections: 1,
            connect_concurrency: 4,
            establish_timeout: 5.0,
            drain_timeout: 0.3,
            settle: 0.0,
            subscribe_url: Some(url_b.clone()),
        },
    )
    .await
    .unwrap();
    ha.abort();
    hb.abort();
    assert_eq!(v["url"], url_a, "{v}");
    assert_eq!(v["subscribe_url"], url_b, "{v}");
    assert_eq!(v["subscribers_established"], 4, "{v}");
    assert_eq!(v["published_ok"], 20, "{v}");
    assert_eq!(v["delivered"], 0, "{v}");
    assert_eq!(v["missing"], v["expected"], "{v}");
}

#[test]
fn fanout_subscribe_url_arg() {
    use clap::Parser;
    let parse = |extra: &[&str]| {
        let mut argv = vec!["nexus-bench", "fanout", "--url", "http://127.0.0.1:1"];
        argv.extend_from_slice(extra);
        match crate::Cli::try_parse_from(argv).unwrap().cmd {
            crate::Cmd::Fanout { args, .. } => args.subscribe_url,
            other => panic!("parsed as {other:?}"),
        }
    };
    assert_eq!(parse(&[]), None);
    assert_eq!(
        parse(&["--subscribe-url", "http://127.0.0.1:2"]).as_deref(),
        Some("http://127.0.0.1:2")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sign_in_creates_org_and_project_once() {
    let (url, h) = start_mock().await;
    let base = BaseUrl::parse(&url).unwrap();
    let t = Duration::from_secs(5);
    let first = sign_in(&base, t, &creds(), "o", "p").await.unwrap();
    assert_eq!((first.org, first.project), ("created", "created"));
    assert_eq!(first.expires_in, Some(900));
    let again = sign_in(&base, t, &creds(), "o", "p").await.unwrap();
    assert_eq!((again.org, again.project), ("existed", "existed"));
    let bad = Credentials {
        email: "bench@nexus.bench".into(),
        password: String::new(),
    };
    let e = sign_in(&base, t, &bad, "o", "p").await.unwrap_err();
    assert!(format!("{e:#}").contains("401"), "{e:#}");
    h.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pairing_needs_the_bearer() {
    let (url, h) = start_mock().await;
    let c = Arc::new(ctx_anonymous(&url));
    let e = crate::target::pair_devices(&c, 1, 1).await.unwrap_err();
    assert!(
        format!("{e:#}").contains("confirm_by_code: HTTP 401"),
        "{e:#}"
    );
    let c = ctx(&url).await;
    assert_eq!(
        crate::target::pair_devices(&c, 2, 1).await.unwrap().len(),
        2
    );
    h.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authcost_against_mock() {
    let (url, h) = start_mock().await;
    let v = authcost::run(
        ctx(&url).await,
        authcost::AuthCostArgs {
            connections: 4,
            devices: 3,
            duration: 0.3,
            warmup: 0.1,
            rounds: 2,
            pause: 0.0,
            auth_path: "/devices".into(),
            open_path: "/devtools/devices".into(),
            pair_concurrency: 2,
        },
    )
    .await
    .unwrap();
    h.abort();
    assert_eq!(v["bench"], "authcost");
    assert_eq!(v["devices_listed"], 3, "{v}");
    assert_eq!(v["auth_path_without_bearer_status"], 401, "{v}");
    assert_eq!(v["phases"].as_array().unwrap().len(), 4, "{v}");
    // ABBA: round 2 starts with the unauthenticated variant.
    assert_eq!(v["phases"][0]["variant"], "authenticated", "{v}");
    assert_eq!(v["phases"][2]["variant"], "unauthenticated", "{v}");
    for k in ["authenticated", "unauthenticated"] {
        assert!(v[k]["ok_requests"].as_u64().unwrap() > 0, "{v}");
        assert_eq!(v[k]["non_2xx"], 0, "{v}");
        assert_eq!(v[k]["errors"], 0, "{v}");
        assert!(v[k]["server_cpu_us_per_request"].as_f64().is_some(), "{v}");
    }
    assert!(
        v["auth_cost_us"]["wall_per_request"].as_f64().is_some(),
        "{v}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authcost_refuses_without_login() {
    let (url, h) = start_mock().await;
    let e = authcost::run(
        Arc::new(ctx_anonymous(&url)),
        authcost::AuthCostArgs {
            connections: 1,
            devices: 0,
            duration: 0.1,
            warmup: 0.0,
            rounds: 1,
            pause: 0.0,
            auth_path: "/devices".into(),
            open_path: "/devtools/devices".into(),
            pair_concurrency: 1,
        },
    )
    .await
    .unwrap_err();
    h.abort();
    assert!(format!("{e:#}").contains("--no-login"), "{e:#}");
}

#[test]
fn credentials_args() {
    use clap::Parser;
    let common = |argv: &[&str]| {
        let mut all = vec!["nexus-bench", "authcost", "--url", "http://127.0.0.1:1"];
        all.extend_from_slice(argv);
        match crate::Cli::try_parse_from(all).unwrap().cmd {
            crate::Cmd::Authcost { common, args } => (common, args),
            other => panic!("parsed as {other:?}"),
        }
    };
    let (c, a) = common(&[]);
    assert_eq!(c.email, "bench@nexus.bench");
    assert!(!c.no_login);
    assert_eq!(a.connections, 32);
    assert_eq!(a.auth_path, "/devices");
    assert_eq!(a.open_path, "/devtools/devices");
    let (c, _) = common(&["--email", "a@b.c", "--password", "x", "--no-login"]);
    assert_eq!((c.email.as_str(), c.password.as_str()), ("a@b.c", "x"));
    assert!(c.no_login);
    assert!(crate::bootstrap_env(&c).is_empty());
    let (c, _) = common(&[]);
    let env = crate::bootstrap_env(&c);
    assert_eq!(env[0].0, "NEXUS_BOOTSTRAP_ADMIN_EMAIL");
    assert_eq!(
        env[1],
        ("NEXUS_BOOTSTRAP_ADMIN_PASSWORD".into(), c.password.clone())
    );
}

fn cmd_args() -> cmdlatency::CmdLatencyArgs {
    cmdlatency::CmdLatencyArgs {
        devices: 3,
        rate: 40.0,
        duration: 0.5,
        warmup: 0.1,
        wait: 2,
        propose_connections: 2,
        green_type: "fs.read".into(),
        red_type: "shell.exec".into(),
        drain_timeout: 3.0,
        linger: 0.1,
        pause: 0.0,
        skip_red: false,
        pair_concurrency: 2,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cmdlatency_against_mock() {
    let (url, h) = start_mock().await;
    let v = cmdlatency::run(ctx(&url).await, cmd_args()).await.unwrap();
    h.abort();
    assert_eq!(v["bench"], "cmdlatency");
    assert_eq!(v["problems"], 0, "{v}");
    for (phase, n) in [
        ("green", 20),
        ("red", 20),
        ("green_warmup", 4),
        ("red_warmup", 4),
    ] {
        let p = &v["phases"][phase];
        assert_eq!(p["proposed"], n, "{phase}: {v}");
        assert_eq!(p["delivered"], n, "{phase}: {v}");
        assert_eq!(p["missing"], 0, "{phase}: {v}");
        assert_eq!(p["duplicates"], 0, "{phase}: {v}");
    }
    let red = &v["phases"]["red"];
    assert_eq!(red["decide_ok"], 20, "{v}");
    assert_eq!(red["without_approval"], 0, "{v}");
    assert_eq!(red["received_before_approval_sent"], 0, "{v}");
    assert_eq!(red["delivery_latency"]["count"], 20, "{v}");
    assert_eq!(v["phases"]["green"]["delivery_latency"]["count"], 20, "{v}");
    assert_eq!(v["devices_stats"]["acks_ok"], 48, "{v}");
    assert_eq!(v["devices_stats"]["redelivered"], 0, "{v}");
    for s in ["queued", "delivered", "pending_approval"] {
        assert_eq!(v["server_unfinished"][s], 0, "{s}: {v}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cmdlatency_counts_a_command_that_needs_approval_as_missing() {
    // The "GREEN" type is RED in the (mock) policy: nothing may reach a device, and the
    // bench must say so instead of reporting latencies.
    let (url, h) = start_mock().await;
    let mut a = cmd_args();
    a.green_type = "fs.delete".into();
    a.skip_red = true;
    a.drain_timeout = 0.2;
    let v = cmdlatency::run(ctx(&url).await, a).await.unwrap();
    h.abort();
    let g = &v["phases"]["green"];
    assert_eq!(g["status_unexpected"], 20, "{v}");
    assert_eq!(g["delivered"], 0, "{v}");
    assert_eq!(g["delivery_latency"]["count"], 0, "{v}");
    assert_eq!(v["server_unfinished"]["pending_approval"], 24, "{v}");
    assert!(v["problems"].as_u64().unwrap() > 0, "{v}");
    assert!(v["phases"].get("red").is_none(), "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cmdlatency_refuses_without_login() {
    let (url, h) = start_mock().await;
    let e = cmdlatency::run(Arc::new(ctx_anonymous(&url)), cmd_args())
        .await
        .unwrap_err();
    h.abort();
    assert!(format!("{e:#}").contains("--no-login"), "{e:#}");
}

#[test]
fn cmdlatency_args() {
    use clap::Parser;
    let argv = ["nexus-bench", "cmdlatency", "--url", "http://127.0.0.1:1"];
    match crate::Cli::try_parse_from(argv).unwrap().cmd {
        crate::Cmd::Cmdlatency { args, .. } => {
            assert_eq!(args.devices, 8);
            assert_eq!(args.rate, 20.0);
            assert_eq!(args.wait, 25);
            assert_eq!(args.green_type, "fs.read");
            assert_eq!(args.red_type, "shell.exec");
            assert!(!args.skip_red);
        }
        other => panic!("parsed as {other:?}"),
    }
}

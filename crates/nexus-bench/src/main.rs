//! nexus-bench: load generator / benchmark harness for the NEXUS control-plane
//! server, with an nginx+nchan mode for side-by-side comparison.

#![forbid(unsafe_code)]

mod authcost;
mod cmdlatency;
mod common;
mod fanout;
mod http;
mod idle;
mod ingest;
mod mock;
mod report;
mod server;
mod sse;
mod sub;
mod target;
#[cfg(test)]
mod tests;
mod webauth;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use clap::{Parser, Subcommand};
use serde_json::Value;

use crate::common::{BaseUrl, ProcWatch, Target, raise_nofile, run_id};
use crate::server::SpawnedServer;
use crate::target::{Ctx, header_lines};

const ABOUT: &str = "Load generator / benchmark harness for the NEXUS control-plane server \
(and nginx+nchan for comparison).";

const LONG_ABOUT: &str = "Load generator / benchmark harness for the NEXUS control-plane server \
(and nginx+nchan for comparison).

Every subcommand either targets a running server (--url http://127.0.0.1:PORT, optionally \
--server-pid PID to sample its RSS/CPU) or starts one itself (--spawn-server PATH_TO_NEXUS: \
free port, temporary data dir, --dev; stopped at the end). Human-readable results go to stdout, \
followed by ONE machine-readable JSON summary line (also appended to --json-out FILE).

Authentication (--target nexus): before the run the bench signs in once with --email/--password \
(POST /auth/login), creates --org and --org/--project if they do not exist (POST /orgs, \
POST /orgs/{org}/projects; 201 or 409 both fine) and sends `Authorization: Bearer <access token>` \
with every web request and SSE subscription (device calls keep their device tokens). A server \
started with --spawn-server gets the same credentials as its bootstrap admin \
(NEXUS_BOOTSTRAP_ADMIN_EMAIL/PASSWORD). Against a server started by hand, pass the credentials of \
one of its users (e.g. its bootstrap admin). --no-login skips all this (servers without \
authentication).

Load may only target loopback addresses; anything else is refused. RLIMIT_NOFILE is raised \
to 65536 (or the hard limit) at start-up, and inherited by a spawned server.

Examples:
  nexus-bench ingest --spawn-server target/release/nexus --duration 10
  nexus-bench fanout --url http://127.0.0.1:8080 --server-pid 1234 --subscribers 10000
  nexus-bench idle   --url http://127.0.0.1:18080 --target nchan --server-pid $(cat nginx.pid)
  nexus-bench authcost --spawn-server target/release/nexus --connections 32 --duration 10
  nexus-bench cmdlatency --spawn-server target/release/nexus --devices 8 --rate 20 --duration 15";

#[derive(Parser, Debug)]
#[command(name = "nexus-bench", version, about = ABOUT, long_about = LONG_ABOUT)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Push throughput: one report per request over N keep-alive HTTP/1.1
    /// connections; reports/s (2xx only), non-2xx/errors, latency p50/p99.
    #[command(long_about = "Push throughput.

Pairs --devices devices (NEXUS), then runs --connections keep-alive HTTP/1.1 connections, each \
with exactly one request in flight (closed loop), each request carrying --batch reports \
(default 1) for sessions chosen round-robin. Runs --warmup s unmeasured, then --duration s \
measured (or exactly --requests requests). Counts only 2xx as accepted; non-2xx responses and \
transport errors are counted separately. Prints reports/s, request latency p50/p90/p99/p99.9/max, \
server CPU and RSS (with --server-pid / --spawn-server) and the bench's own CPU.

--target nchan: one POST <nchan-pub-path><channel> per message, same connection model.

Target: >= 20,000 reports/s on a 2-core box, generator and server on the same host.")]
    Ingest {
        #[command(flatten)]
        common: CommonArgs,
        #[command(flatten)]
        args: ingest::IngestArgs,
    },
    /// Fan-out latency: S sessions, K subscribers spread evenly, publishing at a
    /// fixed total rate; delivery latency p50/p99/max, delivered vs expected,
    /// duplicates, out-of-order.
    #[command(long_about = "Fan-out latency and completeness.

Opens --subscribers raw-socket SSE subscribers (subscriber i follows session i % --sessions) and \
waits until each has its `snapshot` event (nchan: its 200 response head). Then publishes \
--rate reports/s in total for --duration s on an open-loop schedule (publish n is due at \
start + n/rate, round-robin over sessions, on --publish-connections keep-alive connections). \
Each report embeds `bench_sent_unix_ns` and a per-session `bench_seq`; every subscriber records \
receive time - send time for each first delivery.

Reports: delivered / expected (expected = 2xx publishes x established subscribers of that \
session), missing, duplicates, out-of-order (per-session bench_seq going backwards, or numeric \
SSE ids not strictly increasing), streams closed early, delivery latency p50/p90/p99/p99.9/max, \
publish latency, server CPU/RSS.

Targets: 1,000 subscribers -> 100% delivered, no duplicates, p99 <= 1 ms;
         10,000 subscribers -> 100% delivered, p99 <= 5 ms.")]
    Fanout {
        #[command(flatten)]
        common: CommonArgs,
        #[command(flatten)]
        args: fanout::FanoutArgs,
    },
    /// Idle connections: open C idle SSE streams as fast as possible; time until
    /// all are established and server memory per connection.
    #[command(long_about = "Idle connection cost.

Reads the server's RSS (VmRSS of --server-pid and its direct children, e.g. nginx workers), then \
opens --connections SSE streams with at most --connect-concurrency in their set-up phase at once. \
A stream counts as established when its `snapshot` event arrived (nchan: its 200 response head). \
Reports the time until the last one was established, the connect->established latency \
distribution, and (RSS after - RSS before) / established as memory per idle connection, plus RSS \
after --hold s and after closing everything (leak check).

Targets: 10,000 established in <= 1 s; <= 10 KB of server memory per idle connection.")]
    Idle {
        #[command(flatten)]
        common: CommonArgs,
        #[command(flatten)]
        args: idle::IdleArgs,
    },
    /// Cost of authentication: closed-loop GET /devices (bearer + tenant
    /// headers) vs GET /devtools/devices (tenant headers only, same work) on
    /// the same server; requests/s, latency, server CPU per request, difference.
    #[command(long_about = "Cost of authentication per web request.

Pairs --devices devices, then runs the same closed loop twice on the same server: --connections \
keep-alive HTTP/1.1 connections, one request in flight each, --warmup s unmeasured then \
--duration s measured, first against GET /devices (Authorization: Bearer + x-org-id/x-project-id: \
access-token verification, session lookup, membership and project lookups, then the device list), \
then against GET /devtools/devices (tenant headers only: the same device list without the auth \
layer; the server must run with --dev). With --rounds N the pair is repeated, every second round \
in the opposite order (ABBA), and the totals are over all rounds.

Before measuring, one request of each kind checks that both answer 200 with the same devices and \
that GET /devices without the bearer is refused.

Reports per variant: requests/s (2xx), latency p50/p90/p99/p99.9/max, server CPU (percent of one \
core and microseconds per request), bench CPU; and the difference authenticated - unauthenticated: \
server CPU us per request, wall us per request (1/throughput), latency p50 and p99.")]
    Authcost {
        #[command(flatten)]
        common: CommonArgs,
        #[command(flatten)]
        args: authcost::AuthCostArgs,
    },
    /// Command delivery latency: D devices long-polling for commands; GREEN
    /// commands proposed at a fixed rate (propose -> device), then RED ones
    /// proposed and approved (approve -> device); exactly-once checks.
    #[command(
        long_about = "Command delivery latency (propose -> device, approve -> device).

Pairs --devices devices; each runs the agent's pull loop: GET /devices/{id}/commands?cursor=&wait=W \
(long-poll, device bearer; a first pull with wait=0 fetches the cursor), following next_cursor, and \
acks every command on a second connection with POST /devices/{id}/commands/{cid}/ack \
{attempt}. Then, as the signed-in user (bearer + tenant headers), it proposes commands with \
POST /sidecar/command on an open-loop schedule: command n is due at start + n/--rate, for \
device n % D, on proposer connection n % --propose-connections.

Phase GREEN (--green-type, default fs.read, queued at once): latency = propose request sent -> \
the device's long-poll response with the command received. Phase RED (--red-type, default \
shell.exec, pending_approval): right after the 202 the proposer approves with \
POST /approvals/{id}/decide {decision: approve} as the same user (the tenant's four-eyes \
rule must be off); latency = approve request sent -> device received (also reported: propose \
-> device, and the decide request). Each phase runs --warmup s unmeasured first, then \
--duration s measured, then waits up to --drain-timeout for missing deliveries.

Checks, per command: received exactly once (missing, duplicates), by the device it was \
proposed for, 202 status queued (GREEN) / pending_approval (RED); RED commands only after \
their approval was sent, with an `approval` object naming the right approval id and a \
non-empty signature. Afterwards GET /commands?status=queued|delivered|pending_approval \
must list none of the run's commands (every delivery acked). Also reports the proposal \
request latency, ack latency, polls, and server/bench/other CPU per phase.

The in-process mock (mock-server) implements this contract too (GREEN: fs.read, fs.list, \
system.say, system.info; everything else needs approval), for the harness self-test only."
    )]
    Cmdlatency {
        #[command(flatten)]
        common: CommonArgs,
        #[command(flatten)]
        args: cmdlatency::CmdLatencyArgs,
    },
    /// Print a side-by-side Markdown table (NEXUS vs nchan, with ratios) from
    /// JSON summary files written with --json-out.
    Report {
        #[command(flatten)]
        args: report::ReportArgs,
    },
    /// Run a tiny in-memory mock of the NEXUS HTTP contract (harness self-test only).
    #[command(
        long_about = "Run a tiny in-memory mock of the NEXUS HTTP contract used by the bench \
(sign-in, pairing, report push, SSE stream, device lists, commands with approvals and the \
device long-poll, /health/ready). It exists to self-test the harness without a \
real server; it is not durable and its numbers mean nothing about NEXUS."
    )]
    MockServer {
        /// Address to listen on (loopback only).
        #[arg(long, default_value = "127.0.0.1:18090")]
        listen: String,
        /// Exit after this many seconds.
        #[arg(long, default_value_t = 3600)]
        max_seconds: u64,
        /// Tokio worker threads (default: number of CPUs).
        #[arg(long)]
        threads: Option<usize>,
    },
}

#[derive(clap::Args, Debug, Clone)]
struct CommonArgs {
    /// Base URL of the server under test (loopback only), e.g. http://127.0.0.1:8080.
    #[arg(
        long,
        env = "NEXUS_BENCH_URL",
        required_unless_present = "spawn_server"
    )]
    url: Option<String>,
    /// What is being measured: nexus or nginx+nchan.
    #[arg(long, value_enum, default_value_t = Target::Nexus, env = "NEXUS_BENCH_TARGET")]
    target: Target,
    /// Start `PATH server --listen 127.0.0.1:<free port> --data-dir <tmp> --dev` and
    /// benchmark it (its PID is used for memory/CPU sampling). Overrides --url.
    #[arg(long, env = "NEXUS_BENCH_SPAWN_SERVER", value_name = "PATH_TO_NEXUS")]
    spawn_server: Option<PathBuf>,
    /// Extra argument for the spawned server (repeatable).
    #[arg(long = "server-arg", value_name = "ARG", allow_hyphen_values = true)]
    server_args: Vec<String>,
    /// Keep the spawned server's data dir and log instead of deleting them.
    #[arg(long)]
    keep_data: bool,
    /// PID of the server under test, for RSS/CPU sampling (nginx: the master pid;
    /// its worker children are included).
    #[arg(long, env = "NEXUS_BENCH_SERVER_PID")]
    server_pid: Option<u32>,
    /// Email of the web user the bench signs in as (target nexus). A spawned
    /// server gets it as NEXUS_BOOTSTRAP_ADMIN_EMAIL.
    #[arg(long, default_value = "bench@nexus.bench", env = "NEXUS_BENCH_EMAIL")]
    email: String,
    /// Password of that user. A spawned server gets it as
    /// NEXUS_BOOTSTRAP_ADMIN_PASSWORD (it must satisfy the server's password
    /// policy; the default does under both `default` and `nist`).
    #[arg(
        long,
        default_value = "Load-Test-Pass-2026!",
        env = "NEXUS_BENCH_PASSWORD",
        hide_env_values = true,
        hide_default_value = true
    )]
    password: String,
    /// Do not sign in (servers without authentication): no Authorization header,
    /// no org/project set-up.
    #[arg(long)]
    no_login: bool,
    /// Tenant org sent as x-org-id.
    #[arg(long, default_value = "bench-org", env = "NEXUS_BENCH_ORG")]
    org: String,
    /// Tenant project sent as x-project-id.
    #[arg(long, default_value = "bench-proj", env = "NEXUS_BENCH_PROJECT")]
    project: String,
    /// Extra header for web requests and SSE subscriptions, "Name: value" (repeatable).
    #[arg(long = "header", value_name = "NAME: VALUE")]
    headers: Vec<String>,
    /// nchan publisher location prefix (channel id appended).
    #[arg(long, default_value = "/pub/")]
    nchan_pub_path: String,
    /// nchan EventSource subscriber location prefix (channel id appended).
    #[arg(long, default_value = "/sub/")]
    nchan_sub_path: String,
    /// Tokio worker threads for the load generator (default: number of CPUs).
    #[arg(long, env = "NEXUS_BENCH_THREADS")]
    threads: Option<usize>,
    /// Per-request timeout in seconds.
    #[arg(long, default_value_t = 10.0)]
    timeout: f64,
    /// Also append the JSON summary line to this file.
    #[arg(long, value_name = "FILE")]
    json_out: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let nofile = raise_nofile(65_536);
    let threads = match &cli.cmd {
        Cmd::Ingest { common, .. }
        | Cmd::Fanout { common, .. }
        | Cmd::Idle { common, .. }
        | Cmd::Authcost { common, .. }
        | Cmd::Cmdlatency { common, .. } => common.threads,
        Cmd::MockServer { threads, .. } => *threads,
        Cmd::Report { args } => {
            return match report::run(args.clone()) {
                Ok(t) => {
                    println!("{t}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            };
        }
    };
    let mut b = tokio::runtime::Builder::new_multi_thread();
    b.enable_all();
    if let Some(t) = threads {
        b.worker_threads(t.max(1));
    }
    let rt = match b.build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot build tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(real_main(cli, nofile)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

enum Work {
    Ingest(ingest::IngestArgs),
    Fanout(fanout::FanoutArgs),
    Idle(idle::IdleArgs),
    AuthCost(authcost::AuthCostArgs),
    CmdLatency(cmdlatency::CmdLatencyArgs),
}

async fn real_main(cli: Cli, nofile: u64) -> Result<()> {
    let (common, work) = match cli.cmd {
        Cmd::MockServer {
            listen,
            max_seconds,
            ..
        } => {
            let base = BaseUrl::parse(&format!("http://{listen}"))?;
            // An explicit backlog: tokio's TcpListener::bind() listens with 128.
            let sock = if base.addr.is_ipv4() {
                tokio::net::TcpSocket::new_v4()?
            } else {
                tokio::net::TcpSocket::new_v6()?
            };
            sock.set_reuseaddr(true)?;
            sock.bind(base.addr)
                .with_context(|| format!("binding {listen}"))?;
            let l = sock.listen(4096)?;
            eprintln!("mock NEXUS listening on http://{}", l.local_addr()?);
            return match tokio::time::timeout(Duration::from_secs(max_seconds), mock::serve(l))
                .await
            {
                Ok(r) => r,
                Err(_) => Ok(()),
            };
        }
        Cmd::Report { .. } => return Ok(()),
        Cmd::Ingest { common, args } => (common, Work::Ingest(args)),
        Cmd::Fanout { common, args } => (common, Work::Fanout(args)),
        Cmd::Idle { common, args } => (common, Work::Idle(args)),
        Cmd::Authcost { common, args } => (common, Work::AuthCost(args)),
        Cmd::Cmdlatency { common, args } => (common, Work::CmdLatency(args)),
    };

    let mut spawned = None;
    let (url, pid) = match &common.spawn_server {
        Some(bin) => {
            if common.target != Target::Nexus {
                bail!("--spawn-server only starts NEXUS; start nginx yourself for --target nchan");
            }
            let env = bootstrap_env(&common);
            let mut s = SpawnedServer::start(bin, &common.server_args, &env, common.keep_data)?;
            let ready = s.wait_ready(Duration::from_secs(60)).await;
            let v = (s.url.clone(), Some(s.pid));
            spawned = Some(s);
            ready?;
            v
        }
        None => (
            common
                .url
                .clone()
                .ok_or_else(|| anyhow!("--url or --spawn-server is required"))?,
            common.server_pid,
        ),
    };

    let mut ctx = build_ctx(&common, &url, pid)?;
    let mut login = None;
    if common.target == Target::Nexus && !common.no_login {
        let creds = webauth::Credentials {
            email: common.email.clone(),
            password: common.password.clone(),
        };
        match webauth::sign_in(&ctx.base, ctx.timeout, &creds, &common.org, &common.project).await {
            Ok(s) => {
                ctx.web_headers.push(s.header());
                ctx.sse_header_lines = header_lines(&ctx.web_headers);
                login = Some(s);
            }
            Err(e) => {
                if let Some(s) = &spawned {
                    eprintln!("server log tail:\n{}", s.log_tail());
                }
                return Err(e);
            }
        }
    }
    let ctx = Arc::new(ctx);
    eprintln!(
        "nexus-bench: RLIMIT_NOFILE={nofile}, run id {}, server pid {}",
        ctx.run,
        pid.map_or("unknown".into(), |p| p.to_string())
    );
    let result = match work {
        Work::Ingest(a) => ingest::run(ctx.clone(), a).await,
        Work::Fanout(a) => fanout::run(ctx.clone(), a).await,
        Work::Idle(a) => idle::run(ctx.clone(), a).await,
        Work::AuthCost(a) => authcost::run(ctx.clone(), a).await,
        Work::CmdLatency(a) => cmdlatency::run(ctx.clone(), a).await,
    };
    if let (Some(s), Err(_)) = (&spawned, &result) {
        eprintln!("server log tail:\n{}", s.log_tail());
    }
    if let Some(mut s) = spawned.take() {
        s.stop();
    }
    let mut summary = result?;
    if let Value::Object(m) = &mut summary {
        m.insert("run_id".into(), Value::from(ctx.run.clone()));
        m.insert(
            "spawned_server".into(),
            Value::from(common.spawn_server.is_some()),
        );
        m.insert(
            "login".into(),
            match &login {
                Some(l) => serde_json::json!({
                    "email": common.email,
                    "org": l.org,
                    "project": l.project,
                    "access_token_ttl_s": l.expires_in,
                }),
                None => Value::Null,
            },
        );
        m.insert(
            "unix_time".into(),
            Value::from(common::unix_ns() / 1_000_000_000),
        );
    }
    let line = summary.to_string();
    println!("{line}");
    if let Some(p) = &common.json_out {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .with_context(|| format!("opening {}", p.display()))?;
        writeln!(f, "{line}")?;
    }
    Ok(())
}

/// Environment for a spawned server: the bench user becomes its bootstrap admin.
fn bootstrap_env(common: &CommonArgs) -> Vec<(String, String)> {
    if common.no_login {
        return Vec::new();
    }
    vec![
        (
            "NEXUS_BOOTSTRAP_ADMIN_EMAIL".to_string(),
            common.email.clone(),
        ),
        (
            "NEXUS_BOOTSTRAP_ADMIN_PASSWORD".to_string(),
            common.password.clone(),
        ),
    ]
}

fn build_ctx(common: &CommonArgs, url: &str, pid: Option<u32>) -> Result<Ctx> {
    let base = BaseUrl::parse(url)?;
    let mut web_headers = vec![
        ("x-org-id".to_string(), common.org.clone()),
        ("x-project-id".to_string(), common.project.clone()),
    ];
    for h in &common.headers {
        let (k, v) = h
            .split_once(':')
            .ok_or_else(|| anyhow!("--header {h:?} is not \"Name: value\""))?;
        web_headers.push((k.trim().to_string(), v.trim().to_string()));
    }
    if common.target == Target::Nchan {
        web_headers.retain(|(k, _)| k != "x-org-id" && k != "x-project-id");
    }
    let proc = pid.map(|pid| ProcWatch { pid });
    if let Some(p) = &proc
        && !p.alive()
    {
        bail!("server pid {} does not exist", p.pid);
    }
    Ok(Ctx {
        sse_header_lines: header_lines(&web_headers),
        web_headers,
        base,
        target: common.target,
        nchan_pub_path: common.nchan_pub_path.clone(),
        nchan_sub_path: common.nchan_sub_path.clone(),
        run: run_id(),
        proc,
        timeout: Duration::from_secs_f64(common.timeout.max(0.1)),
    })
}

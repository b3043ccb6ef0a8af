//! `authcost`: what authentication costs per web request. The same closed-loop
//! load (N keep-alive connections, one GET in flight each) against
//! `GET /devices` (Authorization: Bearer + tenant headers: JWT verification,
//! session lookup, membership and project lookups, then the device list) and
//! against `GET /devtools/devices` (tenant headers only, the same device list
//! without the auth layer; dev mode only), on the same server, one after the
//! other; optionally several rounds in ABBA order to cancel drift.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use hdrhistogram::Histogram;
use serde_json::{Value, json};

use crate::common::{
    CpuWindow, Target, context_switches, hist_json, hist_line, new_hist, record, secs,
    self_cpu_ticks, sleep_until, warn_if_busy,
};
use crate::http::{Headers, HttpConn};
use crate::target::{Ctx, pair_devices};

#[derive(clap::Args, Debug, Clone)]
pub struct AuthCostArgs {
    /// Keep-alive HTTP/1.1 connections, each with one request in flight.
    #[arg(long, default_value_t = 32, env = "NEXUS_BENCH_CONNECTIONS")]
    pub connections: usize,
    /// Devices to pair first, so both endpoints list the same few devices.
    #[arg(long, default_value_t = 4)]
    pub devices: usize,
    /// Measured seconds per variant per round.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Unmeasured warm-up before each measured phase, in seconds.
    #[arg(long, default_value_t = 1.0)]
    pub warmup: f64,
    /// Rounds; each measures both variants. Round 1 runs authenticated first,
    /// round 2 unauthenticated first, and so on (ABBA), to cancel drift.
    #[arg(long, default_value_t = 1)]
    pub rounds: usize,
    /// Pause between phases, in seconds.
    #[arg(long, default_value_t = 1.0)]
    pub pause: f64,
    /// Authenticated endpoint (bearer + tenant headers).
    #[arg(long, default_value = "/devices")]
    pub auth_path: String,
    /// Unauthenticated endpoint doing the same work (tenant headers only).
    #[arg(long, default_value = "/devtools/devices")]
    pub open_path: String,
    /// Concurrent pairing flows while setting up devices.
    #[arg(long, default_value_t = 4)]
    pub pair_concurrency: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Variant {
    Auth,
    Open,
}

impl Variant {
    fn name(self) -> &'static str {
        match self {
            Variant::Auth => "authenticated",
            Variant::Open => "unauthenticated",
        }
    }
}

#[derive(Default)]
struct ConnStats {
    ok: u64,
    non_2xx: u64,
    errors: u64,
    hist: Option<Histogram<u64>>,
    samples: Vec<String>,
    connects: u64,
}

/// One measured phase (one variant, one round).
struct Phase {
    variant: Variant,
    round: usize,
    ok: u64,
    non_2xx: u64,
    errors: u64,
    connects: u64,
    window: Duration,
    hist: Histogram<u64>,
    /// CPU seconds used in the window (None: server pid unknown).
    server_cpu_s: Option<f64>,
    bench_cpu_s: f64,
    other_cpu_pct: f64,
    /// Context switches of the server's threads in the window.
    server_cs: Option<u64>,
    samples: Vec<String>,
}

impl Phase {
    fn rps(&self) -> f64 {
        self.ok as f64 / self.window.as_secs_f64().max(1e-9)
    }
}

async fn run_phase(
    ctx: &Arc<Ctx>,
    a: &AuthCostArgs,
    variant: Variant,
    round: usize,
    path: &str,
    headers: &Arc<Headers>,
) -> Result<Phase> {
    let now = tokio::time::Instant::now();
    let warm_end = now + Duration::from_secs_f64(a.warmup.max(0.0));
    let end = warm_end + Duration::from_secs_f64(a.duration.max(0.1));
    let mut tasks = Vec::with_capacity(a.connections);
    for _ in 0..a.connections {
        let ctx = ctx.clone();
        let headers = headers.clone();
        let path = path.to_string();
        tasks.push(tokio::spawn(async move {
            let mut conn = HttpConn::new(ctx.base.clone(), ctx.timeout);
            let mut st = ConnStats {
                hist: Some(new_hist()),
                ..Default::default()
            };
            let mut consecutive_errors = 0u32;
            loop {
                let t = tokio::time::Instant::now();
                if t >= end {
                    break;
                }
                let measured = t >= warm_end;
                let started = Instant::now();
                let r = conn.get(&path, &headers).await;
                let el = started.elapsed();
                match r {
                    Ok(resp) => {
                        consecutive_errors = 0;
                        if !measured {
                            continue;
                        }
                        if resp.ok() {
                            st.ok += 1;
                            if let Some(h) = st.hist.as_mut() {
                                record(h, el.as_nanos() as u64);
                            }
                        } else {
                            st.non_2xx += 1;
                            if st.samples.len() < 3 {
                                st.samples.push(resp.describe());
                            }
                        }
                    }
                    Err(e) => {
                        if measured {
                            st.errors += 1;
                            if st.samples.len() < 3 {
                                st.samples.push(format!("{e:#}"));
                            }
                        }
                        consecutive_errors += 1;
                        if consecutive_errors > 3 {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    }
                }
            }
            st.connects = conn.connects;
            st
        }));
    }

    sleep_until(warm_end).await;
    let measure_start = Instant::now();
    let srv0 = ctx.proc.as_ref().map(|p| p.sample().cpu_ticks);
    let cs0 = ctx.proc.as_ref().and_then(|p| context_switches(p.pid));
    let me0 = self_cpu_ticks();
    let cpuw = CpuWindow::start(ctx.proc.as_ref());
    let mut all = Vec::with_capacity(tasks.len());
    for t in tasks {
        all.push(t.await?);
    }
    let window = measure_start.elapsed();
    let srv1 = ctx.proc.as_ref().map(|p| p.sample().cpu_ticks);
    let cs1 = ctx.proc.as_ref().and_then(|p| context_switches(p.pid));
    let me1 = self_cpu_ticks();
    let (_, _, other_cpu_pct) = cpuw.finish(ctx.proc.as_ref());

    let mut p = Phase {
        variant,
        round,
        ok: 0,
        non_2xx: 0,
        errors: 0,
        connects: 0,
        window,
        hist: new_hist(),
        server_cpu_s: match (srv0, srv1) {
            (Some(a), Some(b)) => Some(b.saturating_sub(a) as f64 / 100.0),
            _ => None,
        },
        bench_cpu_s: me1.saturating_sub(me0) as f64 / 100.0,
        other_cpu_pct,
        server_cs: match (cs0, cs1) {
            (Some(a), Some(b)) => Some(b.saturating_sub(a)),
            _ => None,
        },
        samples: Vec::new(),
    };
    for s in &mut all {
        p.ok += s.ok;
        p.non_2xx += s.non_2xx;
        p.errors += s.errors;
        p.connects += s.connects;
        if let Some(h) = &s.hist {
            let _ = p.hist.add(h);
        }
        for x in s.samples.drain(..) {
            if p.samples.len() < 5 {
                p.samples.push(x);
            }
        }
    }
    let w = window.as_secs_f64().max(1e-9);
    println!(
        "  round {round} {:<15} {:>8.0} req/s  p50 {:.3} ms  p99 {:.3} ms  server cpu {}  bench cpu {:.0}%  other {:.0}%  (non-2xx {}, errors {})",
        variant.name(),
        p.rps(),
        p.hist.value_at_quantile(0.5) as f64 / 1e6,
        p.hist.value_at_quantile(0.99) as f64 / 1e6,
        p.server_cpu_s
            .map_or("?".into(), |s| format!("{:.0}%", s / w * 100.0)),
        p.bench_cpu_s / w * 100.0,
        p.other_cpu_pct,
        p.non_2xx,
        p.errors,
    );
    Ok(p)
}

/// Per-variant totals over all rounds.
struct Totals {
    ok: u64,
    non_2xx: u64,
    errors: u64,
    window_s: f64,
    hist: Histogram<u64>,
    server_cpu_s: Option<f64>,
    server_cs: Option<u64>,
    bench_cpu_s: f64,
    other_cpu_pct_max: f64,
}

impl Totals {
    fn of(phases: &[Phase], v: Variant) -> Totals {
        let mut t = Totals {
            ok: 0,
            non_2xx: 0,
            errors: 0,
            window_s: 0.0,
            hist: new_hist(),
            server_cpu_s: Some(0.0),
            server_cs: Some(0),
            bench_cpu_s: 0.0,
            other_cpu_pct_max: 0.0,
        };
        for p in phases.iter().filter(|p| p.variant == v) {
            t.ok += p.ok;
            t.non_2xx += p.non_2xx;
            t.errors += p.errors;
            t.window_s += p.window.as_secs_f64();
            let _ = t.hist.add(&p.hist);
            t.server_cpu_s = match (t.server_cpu_s, p.server_cpu_s) {
                (Some(a), Some(b)) => Some(a + b),
                _ => None,
            };
            t.server_cs = match (t.server_cs, p.server_cs) {
                (Some(a), Some(b)) => Some(a + b),
                _ => None,
            };
            t.bench_cpu_s += p.bench_cpu_s;
            t.other_cpu_pct_max = t.other_cpu_pct_max.max(p.other_cpu_pct);
        }
        t
    }

    fn rps(&self) -> f64 {
        self.ok as f64 / self.window_s.max(1e-9)
    }

    /// Server CPU microseconds per successful request.
    fn server_us_per_req(&self) -> Option<f64> {
        self.server_cpu_s
            .filter(|_| self.ok > 0)
            .map(|s| s * 1e6 / self.ok as f64)
    }

    /// Server context switches per successful request.
    fn server_cs_per_req(&self) -> Option<f64> {
        self.server_cs
            .filter(|_| self.ok > 0)
            .map(|c| c as f64 / self.ok as f64)
    }

    fn bench_us_per_req(&self) -> Option<f64> {
        (self.ok > 0).then(|| self.bench_cpu_s * 1e6 / self.ok as f64)
    }

    fn q_us(&self, q: f64) -> Option<f64> {
        (!self.hist.is_empty()).then(|| self.hist.value_at_quantile(q) as f64 / 1e3)
    }

    fn json(&self) -> Value {
        let w = self.window_s.max(1e-9);
        json!({
            "ok_requests": self.ok,
            "non_2xx": self.non_2xx,
            "errors": self.errors,
            "window_s": (self.window_s * 1000.0).round() / 1000.0,
            "requests_per_s": self.rps().round(),
            "latency": hist_json(&self.hist),
            "server_cpu_pct": self.server_cpu_s.map(|s| (s / w * 100.0).round()),
            "server_cpu_us_per_request": self.server_us_per_req().map(round1),
            "server_context_switches_per_request": self.server_cs_per_req().map(|x| (x * 100.0).round() / 100.0),
            "bench_cpu_pct": (self.bench_cpu_s / w * 100.0).round(),
            "bench_cpu_us_per_request": self.bench_us_per_req().map(round1),
            "wall_us_per_request": (self.ok > 0).then(|| round1(1e6 / self.rps())),
            "other_cpu_pct_max": self.other_cpu_pct_max.round(),
        })
    }
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

fn diff(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    Some(round1(a? - b?))
}

/// One request of each kind before measuring: both must answer 200 with the
/// same devices, and the authenticated one must refuse a request without the
/// bearer (proof that the auth layer really is in its path).
async fn preflight(
    ctx: &Ctx,
    a: &AuthCostArgs,
    auth: &Headers,
    open: &Headers,
) -> Result<(usize, u16)> {
    let mut c = HttpConn::new(ctx.base.clone(), ctx.timeout);
    let ra = c.get(&a.auth_path, auth).await?;
    if !ra.ok() {
        bail!("GET {} with bearer: {}", a.auth_path, ra.describe());
    }
    let ro = c.get(&a.open_path, open).await?;
    if !ro.ok() {
        let hint = if ro.status.as_u16() == 404 {
            " (devtools routes exist only on a server started with --dev)"
        } else {
            ""
        };
        bail!(
            "GET {} without bearer: {}{hint}",
            a.open_path,
            ro.describe()
        );
    }
    let ids = |v: Value| -> Vec<String> {
        let mut ids: Vec<String> = v
            .get("devices")
            .and_then(Value::as_array)
            .map(|d| {
                d.iter()
                    .filter_map(|x| x.get("device_id").and_then(Value::as_str))
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default();
        ids.sort();
        ids
    };
    let (ia, io) = (ids(ra.json()?), ids(ro.json()?));
    if ia != io {
        bail!(
            "{} and {} list different devices ({} vs {}); they would not do the same work",
            a.auth_path,
            a.open_path,
            ia.len(),
            io.len()
        );
    }
    let refused = c.get(&a.auth_path, open).await?.status.as_u16();
    if refused == 200 {
        bail!(
            "GET {} without a bearer answered 200: nothing to compare (no auth layer)",
            a.auth_path
        );
    }
    Ok((ia.len(), refused))
}

pub async fn run(ctx: Arc<Ctx>, a: AuthCostArgs) -> Result<Value> {
    if ctx.target != Target::Nexus {
        bail!("authcost measures NEXUS only (--target nexus)");
    }
    if a.connections == 0 || a.rounds == 0 {
        bail!("--connections and --rounds must be > 0");
    }
    let auth: Headers = ctx.web_headers.clone();
    if !auth
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("authorization"))
    {
        bail!("authcost needs a signed-in bench user (do not pass --no-login)");
    }
    let open: Headers = auth
        .iter()
        .filter(|(k, _)| !k.eq_ignore_ascii_case("authorization"))
        .cloned()
        .collect();
    let devices = pair_devices(&ctx, a.devices, a.pair_concurrency).await?;
    let (listed, refused_status) = preflight(&ctx, &a, &auth, &open).await?;
    eprintln!(
        "authcost: url={} connections={} devices listed={listed} rounds={} warmup={}s duration={}s per phase; GET {} vs {} (without bearer {} answers {refused_status})",
        ctx.base.url,
        a.connections,
        a.rounds,
        a.warmup,
        a.duration,
        a.auth_path,
        a.open_path,
        a.auth_path,
    );
    let auth = Arc::new(auth);
    let open = Arc::new(open);
    println!(
        "authcost [nexus]: {} connections, closed loop",
        a.connections
    );
    let mut phases = Vec::with_capacity(2 * a.rounds);
    for round in 1..=a.rounds {
        let order = if round % 2 == 1 {
            [Variant::Auth, Variant::Open]
        } else {
            [Variant::Open, Variant::Auth]
        };
        for v in order {
            if !phases.is_empty() && a.pause > 0.0 {
                tokio::time::sleep(Duration::from_secs_f64(a.pause)).await;
            }
            let (path, headers) = match v {
                Variant::Auth => (&a.auth_path, &auth),
                Variant::Open => (&a.open_path, &open),
            };
            phases.push(run_phase(&ctx, &a, v, round, path, headers).await?);
        }
    }

    let ta = Totals::of(&phases, Variant::Auth);
    let to = Totals::of(&phases, Variant::Open);
    for (name, path, t) in [
        ("authenticated  ", &a.auth_path, &ta),
        ("unauthenticated", &a.open_path, &to),
    ] {
        println!(
            "{name} {path}: {:.0} req/s; latency {}",
            t.rps(),
            hist_line(&t.hist)
        );
        println!(
            "                server cpu {} us/request ({} context switches/request), bench cpu {} us/request; non-2xx {}, errors {}",
            t.server_us_per_req()
                .map_or("?".into(), |x| format!("{x:.1}")),
            t.server_cs_per_req()
                .map_or("?".into(), |x| format!("{x:.2}")),
            t.bench_us_per_req()
                .map_or("?".into(), |x| format!("{x:.1}")),
            t.non_2xx,
            t.errors
        );
    }
    let wall = |t: &Totals| (t.ok > 0).then(|| 1e6 / t.rps());
    let cost_cpu = diff(ta.server_us_per_req(), to.server_us_per_req());
    let cost_wall = diff(wall(&ta), wall(&to));
    let cost_p50 = diff(ta.q_us(0.5), to.q_us(0.5));
    let cost_p99 = diff(ta.q_us(0.99), to.q_us(0.99));
    let fmt = |x: Option<f64>| x.map_or("?".into(), |x| format!("{x:+.1}"));
    println!(
        "cost of auth per request: server cpu {} us, wall (1/throughput) {} us, latency p50 {} us, p99 {} us; throughput {:.1}% of unauthenticated",
        fmt(cost_cpu),
        fmt(cost_wall),
        fmt(cost_p50),
        fmt(cost_p99),
        ta.rps() / to.rps().max(1e-9) * 100.0
    );
    let other_max = ta.other_cpu_pct_max.max(to.other_cpu_pct_max);
    println!("other processes: up to {other_max:.0}% of a core in a phase");
    warn_if_busy(other_max);
    let mut samples: Vec<String> = Vec::new();
    for p in &phases {
        for s in &p.samples {
            if samples.len() < 5 {
                samples.push(format!("{}: {s}", p.variant.name()));
            }
        }
    }
    for s in &samples {
        println!("  sample failure: {s}");
    }
    let phase_json: Vec<Value> = phases
        .iter()
        .map(|p| {
            let w = p.window.as_secs_f64().max(1e-9);
            json!({
                "round": p.round,
                "variant": p.variant.name(),
                "requests_per_s": p.rps().round(),
                "window_s": secs(p.window),
                "ok_requests": p.ok,
                "non_2xx": p.non_2xx,
                "errors": p.errors,
                "tcp_connects": p.connects,
                "p50_ms": hist_json(&p.hist)["p50_ms"].clone(),
                "p99_ms": hist_json(&p.hist)["p99_ms"].clone(),
                "server_cpu_pct": p.server_cpu_s.map(|s| (s / w * 100.0).round()),
                "server_context_switches": p.server_cs,
                "bench_cpu_pct": (p.bench_cpu_s / w * 100.0).round(),
                "other_pct": p.other_cpu_pct.round(),
            })
        })
        .collect();
    Ok(json!({
        "bench": "authcost",
        "target": "nexus",
        "url": ctx.base.url,
        "connections": a.connections,
        "devices_paired": devices.len(),
        "devices_listed": listed,
        "rounds": a.rounds,
        "warmup_s": a.warmup,
        "duration_s": a.duration,
        "auth_path": a.auth_path,
        "open_path": a.open_path,
        "auth_path_without_bearer_status": refused_status,
        "authenticated": ta.json(),
        "unauthenticated": to.json(),
        "auth_cost_us": {
            "server_cpu_per_request": cost_cpu,
            "wall_per_request": cost_wall,
            "latency_p50": cost_p50,
            "latency_p99": cost_p99,
            "server_context_switches_per_request": diff(ta.server_cs_per_req(), to.server_cs_per_req()),
        },
        "throughput_ratio": ((ta.rps() / to.rps().max(1e-9)) * 1000.0).round() / 1000.0,
        "phases": phase_json,
        "other_cpu_pct": other_max.round(),
        "failure_samples": samples,
    }))
}

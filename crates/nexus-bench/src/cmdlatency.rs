//! `cmdlatency`: how long a command takes from the person who proposes it to
//! the device that runs it (issue 5).
//!
//! D paired devices each run the agent's pull loop: `GET /devices/{id}/commands
//! ?cursor=&wait=W` (long-poll, device bearer), then for every command an ack
//! naming its delivery `attempt` (on a second connection, so acking never delays
//! the next poll). A proposer sends commands on an open-loop schedule
//! (command n is due at start + n/rate, for device n % D, on proposer
//! connection n % P) with the signed-in user's bearer and tenant headers.
//!
//! Phases: GREEN (`fs.read`, queued at once; latency = propose request sent ->
//! device received) and RED (`shell.exec`, `pending_approval`; the proposer
//! approves it right after the 202 with `POST /approvals/{id}/decide` as the
//! same user; latency = approve request sent -> device received). Each phase
//! is preceded by an unmeasured warm-up at the same rate.
//!
//! Sender and receivers are in this process, so every time is read from one
//! monotonic clock. Every command is checked: received exactly once, by the
//! device it was proposed for, RED ones only after their approval was sent and
//! with an `approval` grant for the right approval id; at the end the server's
//! `GET /commands?status=` must show none of them still queued, delivered
//! (un-acked) or pending approval.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};

use crate::common::{
    CpuWindow, Target, hist_json, hist_line, new_hist, record, secs, sleep_until, warn_if_busy,
};
use crate::http::{Headers, HttpConn};
use crate::target::{Ctx, Device, pair_devices};

#[derive(clap::Args, Debug, Clone)]
pub struct CmdLatencyArgs {
    /// Devices to pair; each runs one long-poll loop (plus one connection for acks).
    #[arg(long, default_value_t = 8)]
    pub devices: usize,
    /// Commands proposed per second in each phase (open loop, round-robin over devices).
    #[arg(long, default_value_t = 20.0)]
    pub rate: f64,
    /// Measured seconds per phase (GREEN, then RED).
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Unmeasured seconds at the same rate before each phase (those commands are still
    /// checked for exactly-once delivery).
    #[arg(long, default_value_t = 1.0)]
    pub warmup: f64,
    /// Long-poll wait the devices ask for, in seconds (the server caps it at 30).
    #[arg(long, default_value_t = 25)]
    pub wait: u64,
    /// Keep-alive connections of the proposer (command n goes out on connection n % P; a RED
    /// command's approval follows its proposal on the same connection).
    #[arg(long, default_value_t = 4)]
    pub propose_connections: usize,
    /// Command type of the GREEN phase (must be GREEN in the tenant's policy).
    #[arg(long, default_value = "fs.read")]
    pub green_type: String,
    /// Command type of the RED phase (must need approval in the tenant's policy).
    #[arg(long, default_value = "shell.exec")]
    pub red_type: String,
    /// After a phase's last proposal, wait at most this long for missing deliveries.
    #[arg(long, default_value_t = 5.0)]
    pub drain_timeout: f64,
    /// After the last phase drained, keep the devices polling this long to catch late
    /// duplicates.
    #[arg(long, default_value_t = 1.0)]
    pub linger: f64,
    /// Pause between phases, in seconds.
    #[arg(long, default_value_t = 1.0)]
    pub pause: f64,
    /// Only the GREEN phase.
    #[arg(long)]
    pub skip_red: bool,
    /// Concurrent pairing flows while setting up devices.
    #[arg(long, default_value_t = 4)]
    pub pair_concurrency: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Risk {
    Green,
    Red,
}

impl Risk {
    fn name(self) -> &'static str {
        match self {
            Risk::Green => "green",
            Risk::Red => "red",
        }
    }
}

#[derive(Clone, Copy, Debug)]
pub struct PhaseSpec {
    /// Short tag inside command ids ("gw", "g", "rw", "r").
    pub tag: &'static str,
    pub risk: Risk,
    pub measured: bool,
    pub total: u64,
}

/// What the proposer did for one command. Times are ns since the run's base instant.
#[derive(Clone, Debug, Default)]
pub struct Sent {
    pub n: u64,
    pub device: usize,
    pub late_ns: u64,
    pub propose_sent: u64,
    pub propose_done: u64,
    pub propose_ok: bool,
    /// `status` of the 202 (queued / pending_approval).
    pub status: Option<String>,
    pub approval_id: Option<String>,
    pub decide_sent: Option<u64>,
    pub decide_done: Option<u64>,
    pub decide_ok: bool,
}

impl Sent {
    /// Whether the device must receive this command.
    fn expected(&self, risk: Risk) -> bool {
        match risk {
            Risk::Green => self.propose_ok && self.status.as_deref() == Some("queued"),
            Risk::Red => self.decide_ok,
        }
    }
}

/// One command as a device received it.
#[derive(Clone, Debug)]
pub struct Receipt {
    pub phase: usize,
    pub n: u64,
    pub device: usize,
    pub at: u64,
    pub attempt: u64,
    pub approval_id: Option<String>,
    pub signed: bool,
}

struct Shared {
    base: Instant,
    /// `cl-<run>-`: every command id of this run starts with it.
    prefix: String,
    tags: Vec<&'static str>,
    /// Per phase, per command number: how many times a device received it.
    counts: Vec<Vec<AtomicU32>>,
    /// Per phase: commands received at least once.
    unique: Vec<AtomicU64>,
    receipts: Mutex<Vec<Receipt>>,
    /// Commands with an id this run did not propose.
    foreign: AtomicU64,
    ready: AtomicUsize,
}

impl Shared {
    fn ns(&self) -> u64 {
        self.base.elapsed().as_nanos() as u64
    }

    fn id(&self, phase: usize, n: u64) -> String {
        format!("{}{}-{n}", self.prefix, self.tags[phase])
    }

    /// (phase, n) of one of our command ids.
    fn parse(&self, id: &str) -> Option<(usize, u64)> {
        let (tag, n) = id.strip_prefix(&self.prefix)?.split_once('-')?;
        let phase = self.tags.iter().position(|t| *t == tag)?;
        let n: u64 = n.parse().ok()?;
        (n < self.counts[phase].len() as u64).then_some((phase, n))
    }

    fn received(&self, r: Receipt) {
        let c = &self.counts[r.phase][r.n as usize];
        if c.fetch_add(1, Ordering::AcqRel) == 0 {
            self.unique[r.phase].fetch_add(1, Ordering::AcqRel);
        }
        if let Ok(mut v) = self.receipts.lock() {
            v.push(r);
        }
    }
}

#[derive(Default)]
struct AckStats {
    ok: u64,
    non_2xx: u64,
    errors: u64,
    hist: Option<Histogram<u64>>,
    samples: Vec<String>,
}

#[derive(Default)]
struct DevStats {
    polls: u64,
    empty_polls: u64,
    poll_non_2xx: u64,
    poll_errors: u64,
    received: u64,
    /// Commands delivered with attempt > 1 (a redelivery).
    redelivered: u64,
    connects: u64,
    samples: Vec<String>,
    ack: AckStats,
}

fn push_sample(v: &mut Vec<String>, s: String) {
    if v.len() < 3 {
        v.push(s);
    }
}

/// Acks on their own connection, in the order the device received the commands.
async fn ack_loop(
    ctx: Arc<Ctx>,
    dev: Device,
    mut rx: mpsc::UnboundedReceiver<(String, u64)>,
) -> AckStats {
    let headers: Headers = vec![("authorization".into(), format!("Bearer {}", dev.token))];
    let mut conn = HttpConn::new(ctx.base.clone(), ctx.timeout);
    let mut st = AckStats {
        hist: Some(new_hist()),
        ..Default::default()
    };
    while let Some((cid, attempt)) = rx.recv().await {
        let path = format!("/devices/{}/commands/{cid}/ack", dev.id);
        let body = json!({ "attempt": attempt }).to_string();
        let t = Instant::now();
        match conn.post_json(&path, &headers, body).await {
            Ok(r) if r.ok() => {
                st.ok += 1;
                if let Some(h) = st.hist.as_mut() {
                    record(h, t.elapsed().as_nanos() as u64);
                }
            }
            Ok(r) => {
                st.non_2xx += 1;
                push_sample(&mut st.samples, format!("ack {cid}: {}", r.describe()));
            }
            Err(e) => {
                st.errors += 1;
                push_sample(&mut st.samples, format!("ack {cid}: {e:#}"));
            }
        }
    }
    st
}

/// The agent's pull loop: long-poll, record every command, hand it to the acker, follow
/// `next_cursor`.
async fn device_loop(
    ctx: Arc<Ctx>,
    shared: Arc<Shared>,
    idx: usize,
    dev: Device,
    wait: u64,
    mut stop: watch::Receiver<bool>,
) -> DevStats {
    let headers: Headers = vec![("authorization".into(), format!("Bearer {}", dev.token))];
    // The server holds a long-poll up to `wait` s: the client timeout must be longer.
    let mut conn = HttpConn::new(ctx.base.clone(), Duration::from_secs(wait + 10));
    let (ack_tx, ack_rx) = mpsc::unbounded_channel();
    let acker = tokio::spawn(ack_loop(ctx.clone(), dev.clone(), ack_rx));
    let mut st = DevStats::default();
    let mut cursor = String::new();
    let mut first = true;
    let mut consecutive_failures = 0u32;
    loop {
        if *stop.borrow() {
            break;
        }
        // The first pull does not wait: it only fetches the cursor, then the device counts
        // as ready and parks in long-polls from then on.
        let w = if first { 0 } else { wait };
        let mut path = format!("/devices/{}/commands?wait={w}", dev.id);
        if !cursor.is_empty() {
            path.push_str("&cursor=");
            path.push_str(&cursor);
        }
        let r = tokio::select! {
            biased;
            _ = stop.changed() => break,
            r = conn.get(&path, &headers) => r,
        };
        let at = shared.ns();
        st.polls += 1;
        let resp = match r {
            Ok(resp) if resp.ok() => resp,
            Ok(resp) => {
                st.poll_non_2xx += 1;
                push_sample(&mut st.samples, format!("poll: {}", resp.describe()));
                consecutive_failures += 1;
                tokio::time::sleep(Duration::from_millis(
                    50 * u64::from(consecutive_failures.min(10)),
                ))
                .await;
                continue;
            }
            Err(e) => {
                st.poll_errors += 1;
                push_sample(&mut st.samples, format!("poll: {e:#}"));
                consecutive_failures += 1;
                tokio::time::sleep(Duration::from_millis(
                    50 * u64::from(consecutive_failures.min(10)),
                ))
                .await;
                continue;
            }
        };
        consecutive_failures = 0;
        let v = match resp.json() {
            Ok(v) => v,
            Err(e) => {
                st.poll_errors += 1;
                push_sample(&mut st.samples, format!("poll: {e:#}"));
                continue;
            }
        };
        let commands = v
            .get("commands")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        if commands.is_empty() {
            st.empty_polls += 1;
        }
        for c in &commands {
            let Some(cid) = c.get("command_id").and_then(Value::as_str) else {
                shared.foreign.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            let attempt = c.get("attempt").and_then(Value::as_u64).unwrap_or(1);
            st.received += 1;
            if attempt > 1 {
                st.redelivered += 1;
            }
            // Ack every delivery, ours or not, so nothing stays delivered.
            let _ = ack_tx.send((cid.to_string(), attempt));
            let Some((phase, n)) = shared.parse(cid) else {
                shared.foreign.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            let approval = c.get("approval").filter(|a| a.is_object());
            shared.received(Receipt {
                phase,
                n,
                device: idx,
                at,
                attempt,
                approval_id: approval
                    .and_then(|a| a.get("approval_id"))
                    .and_then(Value::as_str)
                    .map(str::to_string),
                signed: approval
                    .and_then(|a| a.get("signature"))
                    .and_then(Value::as_str)
                    .is_some_and(|s| !s.is_empty()),
            });
        }
        if let Some(next) = v.get("next_cursor") {
            match next {
                Value::String(s) => cursor = s.clone(),
                Value::Number(x) => cursor = x.to_string(),
                _ => {}
            }
        }
        if first {
            first = false;
            shared.ready.fetch_add(1, Ordering::AcqRel);
        }
    }
    drop(ack_tx);
    st.connects = conn.connects;
    st.ack = acker.await.unwrap_or_default();
    st
}

/// Proposer output of one phase.
struct PhaseRun {
    sent: Vec<Sent>,
    window: Duration,
    drain: Duration,
    server_cpu_pct: Option<f64>,
    bench_cpu_pct: f64,
    other_cpu_pct: f64,
    samples: Vec<String>,
}

fn field(v: &Value, k: &str) -> Option<String> {
    v.get(k).and_then(Value::as_str).map(str::to_string)
}

async fn run_phase(
    ctx: &Arc<Ctx>,
    shared: &Arc<Shared>,
    a: &CmdLatencyArgs,
    devices: &Arc<Vec<Device>>,
    phase: usize,
    spec: PhaseSpec,
) -> Result<PhaseRun> {
    let pc = a.propose_connections.max(1) as u64;
    let start = tokio::time::Instant::now() + Duration::from_millis(20);
    let cpu = CpuWindow::start(ctx.proc.as_ref());
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..pc {
        let ctx = ctx.clone();
        let shared = shared.clone();
        let devices = devices.clone();
        let (rate, total) = (a.rate, spec.total);
        let cmd_type = match spec.risk {
            Risk::Green => a.green_type.clone(),
            Risk::Red => a.red_type.clone(),
        };
        tasks.push(tokio::spawn(async move {
            let mut conn = HttpConn::new(ctx.base.clone(), ctx.timeout);
            let mut out = Vec::new();
            let mut samples = Vec::new();
            let mut n = c;
            while n < total {
                let due = start + Duration::from_secs_f64(n as f64 / rate);
                sleep_until(due).await;
                let device = (n % devices.len() as u64) as usize;
                let cid = shared.id(phase, n);
                let body = json!({
                    "command_id": cid,
                    "type": cmd_type,
                    "params": {"path": format!("/tmp/nexus-bench/{n}"), "bench_n": n},
                    "device_id": devices[device].id,
                    "client_context": {"correlation_id": cid},
                })
                .to_string();
                let mut s = Sent {
                    n,
                    device,
                    late_ns: tokio::time::Instant::now()
                        .saturating_duration_since(due)
                        .as_nanos() as u64,
                    propose_sent: shared.ns(),
                    ..Default::default()
                };
                let r = conn
                    .post_json("/sidecar/command", &ctx.web_headers, body)
                    .await;
                s.propose_done = shared.ns();
                match r {
                    Ok(r) if r.ok() => match r.json() {
                        Ok(v) => {
                            s.propose_ok = true;
                            s.status = field(&v, "status");
                            s.approval_id = field(&v, "approval_id");
                        }
                        Err(e) => push_sample(&mut samples, format!("propose: {e:#}")),
                    },
                    Ok(r) => push_sample(&mut samples, format!("propose: {}", r.describe())),
                    Err(e) => push_sample(&mut samples, format!("propose: {e:#}")),
                }
                if spec.risk == Risk::Red
                    && let Some(aid) = s.approval_id.clone()
                {
                    let path = format!("/approvals/{aid}/decide");
                    s.decide_sent = Some(shared.ns());
                    let r = conn
                        .post_json(
                            &path,
                            &ctx.web_headers,
                            json!({"decision": "approve", "reason": "nexus-bench"}).to_string(),
                        )
                        .await;
                    s.decide_done = Some(shared.ns());
                    match r {
                        Ok(r) if r.ok() => s.decide_ok = true,
                        Ok(r) => push_sample(&mut samples, format!("decide: {}", r.describe())),
                        Err(e) => push_sample(&mut samples, format!("decide: {e:#}")),
                    }
                }
                out.push(s);
                n += pc;
            }
            (out, samples)
        }));
    }
    let mut sent = Vec::with_capacity(spec.total as usize);
    let mut samples = Vec::new();
    for t in tasks {
        let (o, s) = t.await?;
        sent.extend(o);
        for x in s {
            push_sample(&mut samples, x);
        }
    }
    sent.sort_by_key(|s| s.n);
    let window = t0.elapsed();
    // Drain: wait for every command the device must get.
    let target = sent.iter().filter(|s| s.expected(spec.risk)).count() as u64;
    let done = Instant::now();
    let deadline = done + Duration::from_secs_f64(a.drain_timeout.max(0.0));
    while shared.unique[phase].load(Ordering::Acquire) < target && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let drain = done.elapsed();
    let (server_cpu_pct, bench_cpu_pct, other_cpu_pct) = cpu.finish(ctx.proc.as_ref());
    Ok(PhaseRun {
        sent,
        window,
        drain,
        server_cpu_pct,
        bench_cpu_pct,
        other_cpu_pct,
        samples,
    })
}

/// Checks and latencies of one phase, from what was sent and what the devices received.
#[derive(Debug)]
pub struct Analysis {
    pub proposed: u64,
    pub propose_ok: u64,
    /// 202 with another status than expected (GREEN: queued, RED: pending_approval).
    pub status_unexpected: u64,
    pub decide_ok: u64,
    pub expected: u64,
    pub delivered: u64,
    pub missing: u64,
    pub duplicates: u64,
    /// Received although the device should not have got it (e.g. RED without approval).
    pub unexpected: u64,
    pub wrong_device: u64,
    /// RED: received without an `approval` object / with another approval id / unsigned.
    pub without_approval: u64,
    pub approval_mismatch: u64,
    pub unsigned: u64,
    /// RED: received before its approval was even sent.
    pub before_approval: u64,
    /// GREEN: carried an approval grant.
    pub green_with_approval: u64,
    /// Received before the proposer had the 202.
    pub before_propose_response: u64,
    /// Any receipt with delivery attempt > 1 (a redelivery; the ack names it).
    pub redelivered: u64,
    pub late: u64,
    pub max_late_ns: u64,
    /// GREEN: propose sent -> received; RED: approve sent -> received.
    pub delivery: Histogram<u64>,
    /// Propose sent -> received (RED: includes the approval round trip).
    pub propose_to_device: Histogram<u64>,
    /// The 202 of the proposal (GREEN) / decision (RED) received -> the device received the
    /// command (0 when the device was first): the delivery side's share.
    pub response_to_device: Histogram<u64>,
    pub propose_latency: Histogram<u64>,
    pub decide_latency: Histogram<u64>,
}

pub fn analyze(spec: &PhaseSpec, sent: &[Sent], receipts: &[&Receipt]) -> Analysis {
    let mut first: HashMap<u64, &Receipt> = HashMap::new();
    let mut a_redelivered = 0;
    let mut count: HashMap<u64, u64> = HashMap::new();
    for r in receipts {
        *count.entry(r.n).or_default() += 1;
        if r.attempt > 1 {
            a_redelivered += 1;
        }
        let e = first.entry(r.n).or_insert(r);
        if r.at < e.at {
            *e = r;
        }
    }
    let mut a = Analysis {
        proposed: sent.len() as u64,
        propose_ok: 0,
        status_unexpected: 0,
        decide_ok: 0,
        expected: 0,
        delivered: 0,
        missing: 0,
        duplicates: 0,
        unexpected: 0,
        wrong_device: 0,
        without_approval: 0,
        approval_mismatch: 0,
        unsigned: 0,
        before_approval: 0,
        green_with_approval: 0,
        before_propose_response: 0,
        redelivered: a_redelivered,
        late: 0,
        max_late_ns: 0,
        delivery: new_hist(),
        propose_to_device: new_hist(),
        response_to_device: new_hist(),
        propose_latency: new_hist(),
        decide_latency: new_hist(),
    };
    let want_status = match spec.risk {
        Risk::Green => "queued",
        Risk::Red => "pending_approval",
    };
    for s in sent {
        if s.late_ns > 5_000_000 {
            a.late += 1;
        }
        a.max_late_ns = a.max_late_ns.max(s.late_ns);
        if s.propose_ok {
            a.propose_ok += 1;
            record(&mut a.propose_latency, s.propose_done - s.propose_sent);
            if s.status.as_deref() != Some(want_status) {
                a.status_unexpected += 1;
            }
        }
        if s.decide_ok {
            a.decide_ok += 1;
        }
        if let (Some(d0), Some(d1), true) = (s.decide_sent, s.decide_done, s.decide_ok) {
            record(&mut a.decide_latency, d1.saturating_sub(d0));
        }
        let expected = s.expected(spec.risk);
        let c = count.get(&s.n).copied().unwrap_or(0);
        a.duplicates += c.saturating_sub(1);
        if expected {
            a.expected += 1;
            if c == 0 {
                a.missing += 1;
            }
        } else if c > 0 {
            a.unexpected += 1;
        }
        let Some(r) = first.get(&s.n) else {
            continue;
        };
        a.delivered += 1;
        if r.device != s.device {
            a.wrong_device += 1;
        }
        if r.at < s.propose_done {
            a.before_propose_response += 1;
        }
        record(
            &mut a.propose_to_device,
            r.at.saturating_sub(s.propose_sent),
        );
        match spec.risk {
            Risk::Green => {
                if r.approval_id.is_some() {
                    a.green_with_approval += 1;
                }
                record(&mut a.delivery, r.at.saturating_sub(s.propose_sent));
                record(
                    &mut a.response_to_device,
                    r.at.saturating_sub(s.propose_done),
                );
            }
            Risk::Red => {
                match (&r.approval_id, &s.approval_id) {
                    (None, _) => a.without_approval += 1,
                    (Some(got), Some(want)) if got != want => a.approval_mismatch += 1,
                    _ => {}
                }
                if r.approval_id.is_some() && !r.signed {
                    a.unsigned += 1;
                }
                match s.decide_sent {
                    Some(d) if r.at >= d => record(&mut a.delivery, r.at - d),
                    _ => a.before_approval += 1,
                }
                if let Some(d) = s.decide_done {
                    record(&mut a.response_to_device, r.at.saturating_sub(d));
                }
            }
        }
    }
    a
}

impl Analysis {
    /// Correctness problems (0 = every check passed).
    pub fn problems(&self) -> u64 {
        self.missing
            + self.duplicates
            + self.unexpected
            + self.wrong_device
            + self.without_approval
            + self.approval_mismatch
            + self.unsigned
            + self.before_approval
            + self.green_with_approval
            + self.status_unexpected
    }

    fn json(&self) -> Value {
        json!({
            "proposed": self.proposed,
            "propose_ok": self.propose_ok,
            "propose_failed": self.proposed - self.propose_ok,
            "status_unexpected": self.status_unexpected,
            "decide_ok": self.decide_ok,
            "expected": self.expected,
            "delivered": self.delivered,
            "missing": self.missing,
            "duplicates": self.duplicates,
            "unexpected": self.unexpected,
            "wrong_device": self.wrong_device,
            "without_approval": self.without_approval,
            "approval_mismatch": self.approval_mismatch,
            "unsigned": self.unsigned,
            "received_before_approval_sent": self.before_approval,
            "green_with_approval": self.green_with_approval,
            "received_before_propose_response": self.before_propose_response,
            "redelivered": self.redelivered,
            "proposals_late_5ms": self.late,
            "max_late_ms": (self.max_late_ns as f64 / 1e3).round() / 1e3,
            "delivery_latency": hist_json(&self.delivery),
            "propose_to_device_latency": hist_json(&self.propose_to_device),
            "response_to_device_latency": hist_json(&self.response_to_device),
            "propose_latency": hist_json(&self.propose_latency),
            "decide_latency": hist_json(&self.decide_latency),
            "problems": self.problems(),
        })
    }
}

/// How many of this run's commands the server still lists with `status`
/// (None: the listing failed). Reads up to 5 pages of 200.
async fn server_count(ctx: &Ctx, prefix: &str, status: &str) -> Option<u64> {
    let mut conn = HttpConn::new(ctx.base.clone(), ctx.timeout);
    let mut n = 0;
    let mut cursor: Option<String> = None;
    for _ in 0..5 {
        let mut path = format!("/commands?status={status}&limit=200");
        if let Some(c) = &cursor {
            path.push_str("&cursor=");
            path.push_str(c);
        }
        let r = conn.get(&path, &ctx.web_headers).await.ok()?;
        if !r.ok() {
            eprintln!("GET {path}: {}", r.describe());
            return None;
        }
        let v = r.json().ok()?;
        n += v
            .get("commands")?
            .as_array()?
            .iter()
            .filter(|c| {
                c.get("command_id")
                    .and_then(Value::as_str)
                    .is_some_and(|id| id.starts_with(prefix))
            })
            .count() as u64;
        match v.get("next_cursor").and_then(Value::as_str) {
            Some(c) if !c.is_empty() => cursor = Some(c.to_string()),
            _ => break,
        }
    }
    Some(n)
}

fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

pub async fn run(ctx: Arc<Ctx>, a: CmdLatencyArgs) -> Result<Value> {
    if ctx.target != Target::Nexus {
        bail!("cmdlatency measures NEXUS only (--target nexus)");
    }
    if a.devices == 0 || a.rate <= 0.0 || a.duration <= 0.0 || a.propose_connections == 0 {
        bail!("--devices, --rate, --duration and --propose-connections must be > 0");
    }
    if !ctx
        .web_headers
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("authorization"))
    {
        bail!("cmdlatency proposes and approves as the signed-in user (do not pass --no-login)");
    }
    let measured = (a.rate * a.duration).round().max(1.0) as u64;
    let warm = (a.rate * a.warmup.max(0.0)).round() as u64;
    let mut specs = vec![
        PhaseSpec {
            tag: "gw",
            risk: Risk::Green,
            measured: false,
            total: warm,
        },
        PhaseSpec {
            tag: "g",
            risk: Risk::Green,
            measured: true,
            total: measured,
        },
    ];
    if !a.skip_red {
        specs.push(PhaseSpec {
            tag: "rw",
            risk: Risk::Red,
            measured: false,
            total: warm,
        });
        specs.push(PhaseSpec {
            tag: "r",
            risk: Risk::Red,
            measured: true,
            total: measured,
        });
    }
    let devices = Arc::new(pair_devices(&ctx, a.devices, a.pair_concurrency).await?);
    let prefix = format!("cl-{}-", ctx.run);
    let shared = Arc::new(Shared {
        base: Instant::now(),
        prefix: prefix.clone(),
        tags: specs.iter().map(|s| s.tag).collect(),
        counts: specs
            .iter()
            .map(|s| (0..s.total).map(|_| AtomicU32::new(0)).collect())
            .collect(),
        unique: specs.iter().map(|_| AtomicU64::new(0)).collect(),
        receipts: Mutex::new(Vec::new()),
        foreign: AtomicU64::new(0),
        ready: AtomicUsize::new(0),
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut dev_tasks = Vec::new();
    for (i, d) in devices.iter().enumerate() {
        dev_tasks.push(tokio::spawn(device_loop(
            ctx.clone(),
            shared.clone(),
            i,
            d.clone(),
            a.wait,
            stop_rx.clone(),
        )));
    }
    let ready_deadline = Instant::now() + Duration::from_secs(10);
    while shared.ready.load(Ordering::Acquire) < devices.len() && Instant::now() < ready_deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let ready = shared.ready.load(Ordering::Acquire);
    if ready < devices.len() {
        let _ = stop_tx.send(true);
        let mut samples = Vec::new();
        for t in dev_tasks {
            if let Ok(s) = t.await {
                samples.extend(s.samples);
            }
        }
        bail!(
            "only {ready}/{} devices could pull commands: {}",
            devices.len(),
            samples.join("; ")
        );
    }
    // Let every device park in its long-poll.
    tokio::time::sleep(Duration::from_millis(200)).await;
    eprintln!(
        "cmdlatency: url={} devices={} rate={}/s warmup={}s duration={}s per phase wait={}s; GREEN {}{}",
        ctx.base.url,
        devices.len(),
        a.rate,
        a.warmup,
        a.duration,
        a.wait,
        a.green_type,
        if a.skip_red {
            String::new()
        } else {
            format!(", RED {} approved by the proposer", a.red_type)
        }
    );

    let mut runs = Vec::with_capacity(specs.len());
    for (i, spec) in specs.iter().enumerate() {
        if i > 0 && spec.tag.ends_with('w') && a.pause > 0.0 {
            tokio::time::sleep(Duration::from_secs_f64(a.pause)).await;
        }
        if spec.total == 0 {
            runs.push(None);
            continue;
        }
        let r = run_phase(&ctx, &shared, &a, &devices, i, *spec).await?;
        runs.push(Some(r));
    }
    tokio::time::sleep(Duration::from_secs_f64(a.linger.max(0.0))).await;
    let _ = stop_tx.send(true);
    let mut dev = DevStats::default();
    let mut ack_hist = new_hist();
    for t in dev_tasks {
        let s = t.await?;
        dev.polls += s.polls;
        dev.empty_polls += s.empty_polls;
        dev.poll_non_2xx += s.poll_non_2xx;
        dev.poll_errors += s.poll_errors;
        dev.received += s.received;
        dev.redelivered += s.redelivered;
        dev.connects += s.connects;
        dev.ack.ok += s.ack.ok;
        dev.ack.non_2xx += s.ack.non_2xx;
        dev.ack.errors += s.ack.errors;
        if let Some(h) = &s.ack.hist {
            let _ = ack_hist.add(h);
        }
        for x in s.samples.into_iter().chain(s.ack.samples) {
            push_sample(&mut dev.samples, x);
        }
    }
    // Acks are in flight until the ack loops end (above); now the server must show
    // none of our commands unfinished.
    let mut unfinished = serde_json::Map::new();
    for status in ["queued", "delivered", "pending_approval"] {
        unfinished.insert(
            status.into(),
            server_count(&ctx, &prefix, status)
                .await
                .map_or(Value::Null, Value::from),
        );
    }
    let unfinished_total: u64 = unfinished.values().filter_map(Value::as_u64).sum();

    let receipts = shared
        .receipts
        .lock()
        .map(|v| v.clone())
        .unwrap_or_default();
    let mut phases_json = serde_json::Map::new();
    let mut problems = 0u64;
    let mut other_max: f64 = 0.0;
    let mut samples: Vec<String> = dev.samples.clone();
    println!(
        "cmdlatency [nexus]: {} devices long-polling (wait={}s), {} commands/s open loop",
        devices.len(),
        a.wait,
        a.rate
    );
    for (i, (spec, run)) in specs.iter().zip(&runs).enumerate() {
        let Some(run) = run else { continue };
        let mine: Vec<&Receipt> = receipts.iter().filter(|r| r.phase == i).collect();
        let an = analyze(spec, &run.sent, &mine);
        problems += an.problems();
        let w = run.window.as_secs_f64();
        let name = format!(
            "{}{}",
            spec.risk.name(),
            if spec.measured { "" } else { "_warmup" }
        );
        if spec.measured {
            other_max = other_max.max(run.other_cpu_pct);
            let what = match spec.risk {
                Risk::Green => "propose -> device",
                Risk::Red => "approve -> device",
            };
            println!(
                "  {}: {} proposed ({} ok) in {w:.2}s, delivered {}/{}, missing {}, duplicates {}, unexpected {}, wrong device {}, status unexpected {}",
                spec.risk.name().to_uppercase(),
                an.proposed,
                an.propose_ok,
                an.delivered,
                an.expected,
                an.missing,
                an.duplicates,
                an.unexpected,
                an.wrong_device,
                an.status_unexpected,
            );
            println!("    {what:<18} {}", hist_line(&an.delivery));
            println!(
                "    {:<18} {}",
                "202 -> device",
                hist_line(&an.response_to_device)
            );
            if spec.risk == Risk::Red {
                println!(
                    "    {:<18} {}",
                    "propose -> device",
                    hist_line(&an.propose_to_device)
                );
                println!(
                    "    {:<18} {}",
                    "decide request",
                    hist_line(&an.decide_latency)
                );
                println!(
                    "    approvals: decided ok {}, without approval {}, approval id mismatch {}, unsigned {}, received before approve sent {}",
                    an.decide_ok,
                    an.without_approval,
                    an.approval_mismatch,
                    an.unsigned,
                    an.before_approval
                );
            } else {
                println!(
                    "    received before the 202 came back: {} of {}",
                    an.before_propose_response, an.delivered
                );
            }
            println!(
                "    {:<18} {}",
                "propose request",
                hist_line(&an.propose_latency)
            );
            println!(
                "    drain {:.3}s; server cpu {}, bench cpu {:.0}%, other {:.0}% of one core",
                run.drain.as_secs_f64(),
                run.server_cpu_pct
                    .map_or("?".into(), |c| format!("{c:.0}%")),
                run.bench_cpu_pct,
                run.other_cpu_pct
            );
            if an.late > 0 {
                println!(
                    "    note: {} proposals started >5 ms late (max {:.1} ms): proposer fell behind schedule",
                    an.late,
                    ms(an.max_late_ns)
                );
            }
        } else {
            println!(
                "  {} warm-up: {} proposed, delivered {}/{}, problems {}",
                spec.risk.name().to_uppercase(),
                an.proposed,
                an.delivered,
                an.expected,
                an.problems()
            );
        }
        for s in &run.samples {
            push_sample(&mut samples, s.clone());
        }
        let mut j = an.json();
        if let Value::Object(m) = &mut j {
            m.insert("window_s".into(), Value::from(secs(run.window)));
            m.insert("drain_s".into(), Value::from(secs(run.drain)));
            m.insert(
                "server_cpu_pct".into(),
                run.server_cpu_pct
                    .map_or(Value::Null, |c| Value::from(c.round())),
            );
            m.insert(
                "bench_cpu_pct".into(),
                Value::from(run.bench_cpu_pct.round()),
            );
            m.insert(
                "other_cpu_pct".into(),
                Value::from(run.other_cpu_pct.round()),
            );
        }
        phases_json.insert(name, j);
    }
    let foreign = shared.foreign.load(Ordering::Acquire);
    problems += foreign + unfinished_total + dev.ack.non_2xx + dev.ack.errors;
    println!(
        "  devices: {} polls ({} empty), {} commands received ({} redelivered), poll non-2xx {}, poll errors {}, foreign {foreign}; acks ok {}, non-2xx {}, errors {}",
        dev.polls,
        dev.empty_polls,
        dev.received,
        dev.redelivered,
        dev.poll_non_2xx,
        dev.poll_errors,
        dev.ack.ok,
        dev.ack.non_2xx,
        dev.ack.errors
    );
    println!("    ack request        {}", hist_line(&ack_hist));
    println!(
        "  server afterwards: queued {}, delivered (un-acked) {}, pending_approval {}",
        unfinished["queued"], unfinished["delivered"], unfinished["pending_approval"]
    );
    if problems == 0 {
        println!(
            "  checks: every command received exactly once by its device, RED ones signed and after approval: OK"
        );
    } else {
        println!("  CHECKS FAILED: {problems} problem(s), see above");
    }
    warn_if_busy(other_max);
    for s in &samples {
        println!("  sample failure: {s}");
    }
    Ok(json!({
        "bench": "cmdlatency",
        "target": "nexus",
        "url": ctx.base.url,
        "devices": devices.len(),
        "rate": a.rate,
        "duration_s": a.duration,
        "warmup_s": a.warmup,
        "wait_s": a.wait,
        "propose_connections": a.propose_connections,
        "green_type": a.green_type,
        "red_type": if a.skip_red { Value::Null } else { Value::from(a.red_type.clone()) },
        "phases": phases_json,
        "devices_stats": {
            "polls": dev.polls,
            "empty_polls": dev.empty_polls,
            "poll_non_2xx": dev.poll_non_2xx,
            "poll_errors": dev.poll_errors,
            "received": dev.received,
            "redelivered": dev.redelivered,
            "tcp_connects": dev.connects,
            "acks_ok": dev.ack.ok,
            "ack_non_2xx": dev.ack.non_2xx,
            "ack_errors": dev.ack.errors,
            "ack_latency": hist_json(&ack_hist),
        },
        "foreign_commands": foreign,
        "server_unfinished": unfinished,
        "problems": problems,
        "other_cpu_pct": other_max.round(),
        "failure_samples": samples,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sent(n: u64, device: usize, red: bool) -> Sent {
        Sent {
            n,
            device,
            propose_sent: 1_000 * n,
            propose_done: 1_000 * n + 500,
            propose_ok: true,
            status: Some(if red { "pending_approval" } else { "queued" }.into()),
            approval_id: red.then(|| format!("ap{n}")),
            decide_sent: red.then_some(1_000 * n + 600),
            decide_done: red.then_some(1_000 * n + 700),
            decide_ok: red,
            ..Default::default()
        }
    }

    fn got(n: u64, device: usize, at: u64, approval: Option<&str>) -> Receipt {
        Receipt {
            phase: 0,
            n,
            device,
            at,
            attempt: 1,
            approval_id: approval.map(str::to_string),
            signed: approval.is_some(),
        }
    }

    #[test]
    fn counts_missing_duplicates_and_wrong_devices() {
        let spec = PhaseSpec {
            tag: "g",
            risk: Risk::Green,
            measured: true,
            total: 4,
        };
        let s: Vec<Sent> = (0..4).map(|n| sent(n, n as usize % 2, false)).collect();
        let r = [
            got(0, 0, 300, None),
            got(1, 1, 1_900, None),
            got(1, 1, 1_950, None),
            got(3, 0, 4_000, None),
        ];
        let rr: Vec<&Receipt> = r.iter().collect();
        let a = analyze(&spec, &s, &rr);
        assert_eq!(a.expected, 4);
        assert_eq!(a.delivered, 3);
        assert_eq!(a.missing, 1);
        assert_eq!(a.duplicates, 1);
        assert_eq!(a.wrong_device, 1);
        assert_eq!(a.before_propose_response, 1);
        assert_eq!(a.delivery.len(), 3);
        assert_eq!(a.response_to_device.len(), 3);
        assert_eq!(a.problems(), 3);
    }

    #[test]
    fn checks_red_approvals() {
        let spec = PhaseSpec {
            tag: "r",
            risk: Risk::Red,
            measured: true,
            total: 4,
        };
        let mut s: Vec<Sent> = (0..4).map(|n| sent(n, 0, true)).collect();
        // Command 3's approval failed: the device must never get it.
        s[3].decide_ok = false;
        let r = [
            got(0, 0, 800, Some("ap0")),
            got(1, 0, 1_650, None),
            got(2, 0, 2_550, Some("ap1")),
            got(3, 0, 3_900, Some("ap3")),
        ];
        let rr: Vec<&Receipt> = r.iter().collect();
        let a = analyze(&spec, &s, &rr);
        assert_eq!(a.expected, 3);
        assert_eq!(a.decide_ok, 3);
        assert_eq!(a.without_approval, 1);
        assert_eq!(a.approval_mismatch, 1);
        // Command 2 arrived before its approval was sent (2_600).
        assert_eq!(a.before_approval, 1);
        assert_eq!(a.unexpected, 1);
        assert_eq!(a.missing, 0);
        assert_eq!(a.delivery.len(), 3);
        assert_eq!(a.delivery.min(), 50);
    }
}

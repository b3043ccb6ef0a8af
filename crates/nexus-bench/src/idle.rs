//! `idle`: open C idle SSE connections as fast as possible, time how long it
//! takes until every one has its snapshot, and measure server RSS per connection.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use serde_json::{Value, json};
use tokio::sync::{Semaphore, watch};

use crate::common::{ProcSample, current_nofile, hist_json, hist_line, secs};
use crate::sub::{self, Shared, SubParams};
use crate::target::Ctx;

#[derive(clap::Args, Debug, Clone)]
pub struct IdleArgs {
    /// Idle SSE connections to open.
    #[arg(long, default_value_t = 10_000)]
    pub connections: usize,
    /// Sessions (nchan: channels) the connections are spread over.
    #[arg(long, default_value_t = 100)]
    pub sessions: usize,
    /// Connections being set up concurrently (connect .. snapshot).
    #[arg(long, default_value_t = 1000)]
    pub connect_concurrency: usize,
    /// Give up on connections not established within this many seconds.
    #[arg(long, default_value_t = 30.0)]
    pub establish_timeout: f64,
    /// Wait this long after the last connection is established before reading RSS.
    #[arg(long, default_value_t = 1.0)]
    pub settle: f64,
    /// Keep the connections open this much longer (seconds), re-reading RSS at the end.
    #[arg(long, default_value_t = 2.0)]
    pub hold: f64,
    /// After closing everything, wait this long and read RSS again (leak check).
    #[arg(long, default_value_t = 2.0)]
    pub after_close: f64,
}

fn rss(s: &Option<ProcSample>) -> Option<u64> {
    s.as_ref().map(|s| s.rss_kb)
}

pub async fn run(ctx: Arc<Ctx>, a: IdleArgs) -> Result<Value> {
    if a.connections == 0 || a.sessions == 0 {
        bail!("--connections and --sessions must be > 0");
    }
    let nofile = current_nofile();
    if (nofile as usize) < a.connections + 64 {
        bail!(
            "RLIMIT_NOFILE is {nofile}, too low for {} connections; raise the hard limit",
            a.connections
        );
    }
    if ctx.proc.is_none() {
        eprintln!("idle: no --server-pid / --spawn-server: memory per connection not measured");
    }
    let names: Vec<String> = (0..a.sessions).map(|i| ctx.session(i)).collect();
    // Let the server settle before the baseline reading.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = ctx.proc.as_ref().map(|p| p.sample());
    eprintln!(
        "idle: target={} url={} connections={} sessions={} concurrency={}",
        ctx.target.as_str(),
        ctx.base.url,
        a.connections,
        a.sessions,
        a.connect_concurrency
    );

    let shared = Shared::new(a.sessions);
    let (stop_tx, stop_rx) = watch::channel(false);
    let permits = Arc::new(Semaphore::new(a.connect_concurrency.max(1)));
    let est_timeout = Duration::from_secs_f64(a.establish_timeout.max(0.1));
    let t0 = Instant::now();
    let cpuw = crate::common::CpuWindow::start(ctx.proc.as_ref());
    let mut subs = Vec::with_capacity(a.connections);
    for i in 0..a.connections {
        let s = i % a.sessions;
        subs.push(tokio::spawn(sub::run(
            ctx.clone(),
            SubParams {
                idx: i,
                session: s,
                session_name: names[s].clone(),
                establish_timeout: est_timeout,
            },
            permits.clone(),
            shared.clone(),
            stop_rx.clone(),
        )));
    }
    let deadline = tokio::time::Instant::now() + est_timeout + Duration::from_secs(5);
    loop {
        let notified = shared.progress.notified();
        let done =
            shared.established.load(Ordering::Acquire) + shared.failed.load(Ordering::Acquire);
        if done >= a.connections || tokio::time::Instant::now() >= deadline {
            break;
        }
        let _ = tokio::time::timeout(Duration::from_millis(20), notified).await;
    }
    let (srv_cpu, bench_cpu, other_cpu) = cpuw.finish(ctx.proc.as_ref());
    let established = shared.established.load(Ordering::Acquire);
    let failed = shared.failed.load(Ordering::Acquire);
    let all_time = shared
        .last_established
        .lock()
        .ok()
        .and_then(|l| *l)
        .map(|t| t.duration_since(t0));
    let rate = all_time
        .map(|d| established as f64 / d.as_secs_f64().max(1e-9))
        .unwrap_or(0.0);

    tokio::time::sleep(Duration::from_secs_f64(a.settle.max(0.0))).await;
    let after = ctx.proc.as_ref().map(|p| p.sample());
    tokio::time::sleep(Duration::from_secs_f64(a.hold.max(0.0))).await;
    let held = ctx.proc.as_ref().map(|p| p.sample());
    let _ = stop_tx.send(true);
    let mut closed_early = 0u64;
    let mut pings = 0u64;
    for h in subs {
        let o = h.await?;
        closed_early += (o.established && o.closed_early) as u64;
        pings += o.pings;
    }
    tokio::time::sleep(Duration::from_secs_f64(a.after_close.max(0.0))).await;
    let closed = ctx.proc.as_ref().map(|p| p.sample());

    let conn_hist = Shared::merged(&shared.connect);
    let per_conn = match (rss(&before), rss(&after)) {
        (Some(b), Some(a2)) if established > 0 => {
            Some(a2.saturating_sub(b) as f64 * 1024.0 / established as f64)
        }
        _ => None,
    };
    println!(
        "idle [{}]: {established}/{} connections established ({failed} failed) in {}",
        ctx.target.as_str(),
        a.connections,
        match all_time {
            Some(d) => format!("{:.3}s ({rate:.0} conn/s)", d.as_secs_f64()),
            None => "n/a".into(),
        }
    );
    println!("  connect->established: {}", hist_line(&conn_hist));
    println!(
        "  cpu while connecting: server {}, bench {bench_cpu:.0}%, other processes {other_cpu:.0}% (of one core)",
        srv_cpu.map_or("n/a".into(), |c| format!("{c:.0}%"))
    );
    crate::common::warn_if_busy(other_cpu);
    if let (Some(b), Some(a2), Some(h), Some(c)) =
        (rss(&before), rss(&after), rss(&held), rss(&closed))
    {
        println!(
            "  server rss: {b} KiB before, {a2} KiB with connections (+{:.0}s: {h} KiB), {c} KiB after closing",
            a.hold
        );
    }
    if let Some(p) = per_conn {
        println!(
            "  server memory per idle connection: {:.0} bytes ({:.2} KiB)",
            p,
            p / 1024.0
        );
    }
    if closed_early > 0 {
        println!("  {closed_early} streams were closed by the server while idle");
    }
    for e in shared.error_samples().iter().take(5) {
        println!("  sample failure: {e}");
    }
    Ok(json!({
        "bench": "idle",
        "target": ctx.target.as_str(),
        "url": ctx.base.url,
        "connections": a.connections,
        "sessions": a.sessions,
        "connect_concurrency": a.connect_concurrency,
        "established": established,
        "failed": failed,
        "time_to_establish_all_s": all_time.map(secs),
        "connections_per_s": rate.round(),
        "connect_latency": hist_json(&conn_hist),
        "server_rss_kb_before": rss(&before),
        "server_rss_kb_after": rss(&after),
        "server_rss_kb_held": rss(&held),
        "server_rss_kb_after_close": rss(&closed),
        "bytes_per_connection": per_conn.map(|p| p.round()),
        "closed_early": closed_early,
        "server_cpu_pct_connecting": srv_cpu.map(f64::round),
        "bench_cpu_pct_connecting": bench_cpu.round(),
        "other_cpu_pct": other_cpu.round(),
        "pings": pings,
        "failure_samples": shared.error_samples(),
    }))
}

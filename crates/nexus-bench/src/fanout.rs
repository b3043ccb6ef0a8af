//! `fanout`: S sessions, K subscribers spread evenly, open-loop publishing at
//! a fixed total rate, per-delivery latency measured from an embedded send
//! timestamp.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use serde_json::{Value, json};
use tokio::sync::{Semaphore, watch};

use crate::common::{
    BaseUrl, cpu_pct, current_nofile, hist_json, hist_line, new_hist, record, secs, self_cpu_ticks,
    sleep_until,
};
use crate::http::HttpConn;
use crate::sub::{self, Shared, SubParams};
use crate::target::{Ctx, Device, pair_devices};

#[derive(clap::Args, Debug, Clone)]
pub struct FanoutArgs {
    /// Number of sessions (nchan: channels).
    #[arg(long, default_value_t = 100)]
    pub sessions: usize,
    /// Total subscribers, spread evenly over the sessions (subscriber i -> session i % S).
    #[arg(long, default_value_t = 1000)]
    pub subscribers: usize,
    /// Total publish rate in reports per second (round-robin over sessions).
    #[arg(long, default_value_t = 200.0)]
    pub rate: f64,
    /// Publishing duration in seconds.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Keep-alive publisher connections (the schedule is open-loop: publish n
    /// is due at start + n/rate and goes out on connection n % P).
    #[arg(long, default_value_t = 8)]
    pub publish_connections: usize,
    /// Subscriber connections being set up concurrently.
    #[arg(long, default_value_t = 1000)]
    pub connect_concurrency: usize,
    /// Give up on subscribers not established within this many seconds.
    #[arg(long, default_value_t = 30.0)]
    pub establish_timeout: f64,
    /// After the last publish, wait at most this long for missing deliveries.
    #[arg(long, default_value_t = 5.0)]
    pub drain_timeout: f64,
    /// Pause between "all subscribers established" and the first publish.
    #[arg(long, default_value_t = 0.5)]
    pub settle: f64,
    /// Base URL the subscribers connect to (loopback only), e.g. a second
    /// replica; device pairing and publishing use --url. Default: --url.
    #[arg(long, value_name = "URL")]
    pub subscribe_url: Option<String>,
}

struct PubOut {
    /// (session index, seq, 2xx?)
    results: Vec<(u32, u64, bool)>,
    hist: hdrhistogram::Histogram<u64>,
    late: u64,
    max_late: Duration,
    samples: Vec<String>,
}

pub async fn run(ctx: Arc<Ctx>, a: FanoutArgs) -> Result<Value> {
    if a.sessions == 0 || a.subscribers == 0 || a.rate <= 0.0 || a.publish_connections == 0 {
        bail!("--sessions, --subscribers, --rate and --publish-connections must be > 0");
    }
    let nofile = current_nofile();
    if (nofile as usize) < a.subscribers + a.publish_connections + 64 {
        bail!(
            "RLIMIT_NOFILE is {nofile}, too low for {} subscribers; raise the hard limit (ulimit -Hn)",
            a.subscribers
        );
    }
    let devices: Arc<Vec<Device>> = Arc::new(pair_devices(&ctx, a.publish_connections, 4).await?);
    let session_names: Vec<String> = (0..a.sessions).map(|i| ctx.session(i)).collect();
    let mem0 = ctx.proc.as_ref().map(|p| p.sample());
    // Subscribers may follow another server than the publishers (cross-replica
    // delivery); everything else about them is the same.
    let sub_ctx = match &a.subscribe_url {
        Some(u) => {
            let mut c = (*ctx).clone();
            c.base = BaseUrl::parse(u)?;
            Arc::new(c)
        }
        None => ctx.clone(),
    };

    // --- subscribers -------------------------------------------------------
    eprintln!(
        "fanout: target={} url={} subscribe-url={} sessions={} subscribers={} rate={}/s duration={}s",
        ctx.target.as_str(),
        ctx.base.url,
        sub_ctx.base.url,
        a.sessions,
        a.subscribers,
        a.rate,
        a.duration
    );
    let shared = Shared::new(a.sessions);
    let (stop_tx, stop_rx) = watch::channel(false);
    let permits = Arc::new(Semaphore::new(a.connect_concurrency.max(1)));
    let est_timeout = Duration::from_secs_f64(a.establish_timeout.max(0.1));
    let t_sub = Instant::now();
    let mut subs = Vec::with_capacity(a.subscribers);
    for i in 0..a.subscribers {
        let s = i % a.sessions;
        subs.push(tokio::spawn(sub::run(
            sub_ctx.clone(),
            SubParams {
                idx: i,
                session: s,
                session_name: session_names[s].clone(),
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
        if done >= a.subscribers || tokio::time::Instant::now() >= deadline {
            break;
        }
        let _ = tokio::time::timeout(Duration::from_millis(50), notified).await;
    }
    let established = shared.established.load(Ordering::Acquire);
    let setup = t_sub.elapsed();
    eprintln!(
        "fanout: {established}/{} subscribers established in {:.2}s ({} failed)",
        a.subscribers,
        setup.as_secs_f64(),
        shared.failed.load(Ordering::Acquire)
    );
    if established == 0 {
        let _ = stop_tx.send(true);
        bail!(
            "no subscriber could be established: {:?}",
            shared.error_samples()
        );
    }
    tokio::time::sleep(Duration::from_secs_f64(a.settle.max(0.0))).await;
    let mem1 = ctx.proc.as_ref().map(|p| p.sample());

    // --- publishers --------------------------------------------------------
    let total = (a.rate * a.duration).floor().max(1.0) as u64;
    let p_count = a.publish_connections as u64;
    let start = tokio::time::Instant::now() + Duration::from_millis(20);
    let me0 = self_cpu_ticks();
    let cpu_t0 = Instant::now();
    let cpuw = crate::common::CpuWindow::start(ctx.proc.as_ref());
    let mut pubs = Vec::new();
    for p in 0..p_count {
        let ctx = ctx.clone();
        let devices = devices.clone();
        let names = session_names.clone();
        let rate = a.rate;
        pubs.push(tokio::spawn(async move {
            let device = devices.get(p as usize % devices.len().max(1)).cloned();
            let headers = ctx.publish_headers(device.as_ref());
            let mut conn = HttpConn::new(ctx.base.clone(), ctx.timeout);
            let mut out = PubOut {
                results: Vec::new(),
                hist: new_hist(),
                late: 0,
                max_late: Duration::ZERO,
                samples: Vec::new(),
            };
            let mut n = p;
            while n < total {
                let due = start + Duration::from_secs_f64(n as f64 / rate);
                sleep_until(due).await;
                let late = tokio::time::Instant::now().saturating_duration_since(due);
                if late > Duration::from_millis(5) {
                    out.late += 1;
                }
                out.max_late = out.max_late.max(late);
                let s = (n % names.len() as u64) as usize;
                let seq = n / names.len() as u64;
                let body = ctx.publish_body(&names[s], &ctx.run, &[seq]);
                let path = ctx.publish_path(device.as_ref(), &names[s]);
                let t = Instant::now();
                let ok = match conn.post_json(&path, &headers, body).await {
                    Ok(r) if r.ok() => true,
                    Ok(r) => {
                        if out.samples.len() < 3 {
                            out.samples.push(r.describe());
                        }
                        false
                    }
                    Err(e) => {
                        if out.samples.len() < 3 {
                            out.samples.push(format!("{e:#}"));
                        }
                        false
                    }
                };
                if ok {
                    record(&mut out.hist, t.elapsed().as_nanos() as u64);
                }
                out.results.push((s as u32, seq, ok));
                n += p_count;
            }
            out
        }));
    }
    let srv0 = ctx.proc.as_ref().map(|p| p.sample());
    let mut results = Vec::with_capacity(total as usize);
    let mut pub_hist = new_hist();
    let (mut late, mut max_late) = (0u64, Duration::ZERO);
    let mut samples = Vec::new();
    for t in pubs {
        let o = t.await?;
        results.extend(o.results);
        let _ = pub_hist.add(&o.hist);
        late += o.late;
        max_late = max_late.max(o.max_late);
        samples.extend(o.samples);
    }
    let publish_time = start.elapsed();
    let publish_done = Instant::now();

    // Per-session published seqs (2xx only) and expected delivery count.
    let mut ok_by_session: Vec<Vec<u64>> = vec![Vec::new(); a.sessions];
    let mut failed_by_session: Vec<Vec<u64>> = vec![Vec::new(); a.sessions];
    for (s, seq, ok) in &results {
        if *ok {
            ok_by_session[*s as usize].push(*seq);
        } else {
            failed_by_session[*s as usize].push(*seq);
        }
    }
    let published_ok: u64 = ok_by_session.iter().map(|v| v.len() as u64).sum();
    let publish_failed = results.len() as u64 - published_ok;

    // --- drain -------------------------------------------------------------
    // Expected counts only subscribers that were established before publishing;
    // a subscriber that dies later still counts (its losses show as missing).
    let drain_target: u64 = ok_by_session
        .iter()
        .zip(&shared.per_session)
        .map(|(v, n)| v.len() as u64 * n.load(Ordering::Acquire) as u64)
        .sum();
    let drain_deadline = publish_done + Duration::from_secs_f64(a.drain_timeout.max(0.0));
    while shared.delivered.load(Ordering::Acquire) < drain_target && Instant::now() < drain_deadline
    {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let drain = publish_done.elapsed();
    let srv1 = ctx.proc.as_ref().map(|p| p.sample());
    let me1 = self_cpu_ticks();
    let (_, _, other_cpu) = cpuw.finish(ctx.proc.as_ref());
    let _ = stop_tx.send(true);

    // --- tally -------------------------------------------------------------
    let (mut expected, mut delivered, mut missing, mut unexpected) = (0u64, 0u64, 0u64, 0u64);
    let (mut dups, mut inversions, mut id_regr, mut closed_early, mut pings, mut foreign) =
        (0u64, 0u64, 0u64, 0u64, 0u64, 0u64);
    let mut subs_established = 0u64;
    for h in subs {
        let o = h.await?;
        if !o.established {
            continue;
        }
        subs_established += 1;
        let oks = &ok_by_session[o.session];
        expected += oks.len() as u64;
        let got = oks.iter().filter(|&&q| o.has(q)).count() as u64;
        delivered += got;
        missing += oks.len() as u64 - got;
        unexpected += failed_by_session[o.session]
            .iter()
            .filter(|&&q| o.has(q))
            .count() as u64;
        dups += o.dups;
        inversions += o.seq_inversions;
        id_regr += o.id_regressions;
        closed_early += o.closed_early as u64;
        pings += o.pings;
        foreign += o.foreign;
    }
    let lat = Shared::merged(&shared.latency);
    let conn_hist = Shared::merged(&shared.connect);
    let pct = if expected > 0 {
        delivered as f64 * 100.0 / expected as f64
    } else {
        0.0
    };
    let out_of_order = inversions + id_regr;
    println!(
        "fanout [{}]: {} sessions, {subs_established}/{} subscribers, {published_ok} reports published ok ({publish_failed} failed) in {:.2}s",
        ctx.target.as_str(),
        a.sessions,
        a.subscribers,
        publish_time.as_secs_f64()
    );
    println!(
        "  delivered {delivered}/{expected} ({pct:.3}%), missing {missing}, duplicates {dups}, out-of-order {out_of_order} (seq inversions {inversions}, id regressions {id_regr}), unexpected {unexpected}, streams closed early {closed_early}"
    );
    println!("  delivery latency: {}", hist_line(&lat));
    println!(
        "  drain: {:.3}s from last publish response to all deliveries (or timeout)",
        drain.as_secs_f64()
    );
    println!("  publish latency:  {}", hist_line(&pub_hist));
    println!(
        "  subscriber setup: {:.2}s for {subs_established}; connect->established {}",
        setup.as_secs_f64(),
        hist_line(&conn_hist)
    );
    if late > 0 {
        println!(
            "  note: {late} publishes started >5 ms late (max {:.1} ms): publisher fell behind schedule",
            max_late.as_secs_f64() * 1e3
        );
    }
    let bench_cpu =
        me1.saturating_sub(me0) as f64 / 100.0 / cpu_t0.elapsed().as_secs_f64().max(1e-3) * 100.0;
    let server = match (&mem0, &mem1, &srv0, &srv1) {
        (Some(m0), Some(m1), Some(s0), Some(s1)) => {
            let c = cpu_pct(s0, s1);
            println!(
                "  server: cpu {c:.0}% of one core while publishing; rss {} KiB before subscribers, {} KiB with subscribers, {} KiB at end",
                m0.rss_kb, m1.rss_kb, s1.rss_kb
            );
            json!({"cpu_pct": c.round(), "rss_kb_before": m0.rss_kb, "rss_kb_subscribed": m1.rss_kb, "rss_kb_end": s1.rss_kb})
        }
        _ => Value::Null,
    };
    println!("  bench process cpu: {bench_cpu:.0}% of one core; other processes: {other_cpu:.0}%");
    crate::common::warn_if_busy(other_cpu);
    let errs = shared.error_samples();
    for e in errs.iter().chain(samples.iter()).take(8) {
        println!("  sample failure: {e}");
    }
    if pings > 0 || foreign > 0 {
        println!("  (pings {pings}, report events without bench fields {foreign})");
    }
    Ok(json!({
        "bench": "fanout",
        "target": ctx.target.as_str(),
        "url": ctx.base.url,
        "subscribe_url": sub_ctx.base.url,
        "sessions": a.sessions,
        "subscribers": a.subscribers,
        "subscribers_established": subs_established,
        "subscriber_setup_s": secs(setup),
        "rate": a.rate,
        "duration_s": a.duration,
        "published_ok": published_ok,
        "publish_failed": publish_failed,
        "publish_late": late,
        "expected": expected,
        "delivered": delivered,
        "delivered_pct": (pct * 1000.0).round() / 1000.0,
        "missing": missing,
        "duplicates": dups,
        "out_of_order": out_of_order,
        "seq_inversions": inversions,
        "id_regressions": id_regr,
        "unexpected": unexpected,
        "closed_early": closed_early,
        "latency": hist_json(&lat),
        "drain_s": secs(drain),
        "publish_latency": hist_json(&pub_hist),
        "connect_latency": hist_json(&conn_hist),
        "server": server,
        "bench_cpu_pct": bench_cpu.round(),
        "other_cpu_pct": other_cpu.round(),
        "failure_samples": errs.iter().chain(samples.iter()).take(8).collect::<Vec<_>>(),
    }))
}

//! `ingest`: closed-loop report publishing over N keep-alive connections.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use serde_json::{Value, json};

use crate::common::{
    cpu_pct, hist_json, hist_line, new_hist, record, secs, self_cpu_ticks, sleep_until,
};
use crate::http::HttpConn;
use crate::target::{Ctx, Device, pair_devices};

#[derive(clap::Args, Debug, Clone)]
pub struct IngestArgs {
    /// Keep-alive HTTP/1.1 connections, each with one request in flight.
    #[arg(long, default_value_t = 64, env = "NEXUS_BENCH_CONNECTIONS")]
    pub connections: usize,
    /// Devices to pair (NEXUS); connection i publishes as device i % devices.
    #[arg(long, default_value_t = 64)]
    pub devices: usize,
    /// Sessions (nchan: channels) the reports are spread over, round-robin.
    #[arg(long, default_value_t = 100)]
    pub sessions: usize,
    /// Measured duration in seconds (ignored when --requests is given).
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Unmeasured warm-up before the measured window, in seconds (duration mode only).
    #[arg(long, default_value_t = 1.0)]
    pub warmup: f64,
    /// Send exactly this many requests instead of running for --duration.
    #[arg(long)]
    pub requests: Option<u64>,
    /// Reports per request (NEXUS accepts up to 100; nchan always 1).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=100))]
    pub batch: u64,
    /// Concurrent pairing flows while setting up devices.
    #[arg(long, default_value_t = 4)]
    pub pair_concurrency: usize,
}

#[derive(Default)]
struct ConnStats {
    ok_requests: u64,
    ok_reports: u64,
    non_2xx: u64,
    errors: u64,
    hist: Option<hdrhistogram::Histogram<u64>>,
    samples: Vec<String>,
    connects: u64,
}

pub async fn run(ctx: Arc<Ctx>, a: IngestArgs) -> Result<Value> {
    if a.connections == 0 || a.sessions == 0 {
        bail!("--connections and --sessions must be > 0");
    }
    let batch = match ctx.target {
        crate::common::Target::Nexus => a.batch,
        crate::common::Target::Nchan => 1,
    };
    let devices: Arc<Vec<Device>> =
        Arc::new(pair_devices(&ctx, a.devices.max(1), a.pair_concurrency).await?);
    let sessions: Arc<Vec<String>> = Arc::new((0..a.sessions).map(|i| ctx.session(i)).collect());

    let now = tokio::time::Instant::now();
    let (warm_end, end) = match a.requests {
        Some(_) => (now, now + Duration::from_secs(24 * 3600)),
        None => {
            let w = now + Duration::from_secs_f64(a.warmup.max(0.0));
            (w, w + Duration::from_secs_f64(a.duration.max(0.1)))
        }
    };
    let budget = Arc::new(AtomicU64::new(a.requests.unwrap_or(u64::MAX)));
    eprintln!(
        "ingest: target={} url={} connections={} devices={} sessions={} batch={} {}",
        ctx.target.as_str(),
        ctx.base.url,
        a.connections,
        devices.len(),
        a.sessions,
        batch,
        match a.requests {
            Some(n) => format!("requests={n}"),
            None => format!("warmup={}s duration={}s", a.warmup, a.duration),
        }
    );

    let mut tasks = Vec::with_capacity(a.connections);
    for c in 0..a.connections {
        let ctx = ctx.clone();
        let devices = devices.clone();
        let sessions = sessions.clone();
        let budget = budget.clone();
        tasks.push(tokio::spawn(async move {
            let device = devices.get(c % devices.len().max(1)).cloned();
            let path_nexus = ctx.publish_path(device.as_ref(), "");
            let headers = ctx.publish_headers(device.as_ref());
            let id_prefix = format!("{}_{c}", ctx.run);
            let mut conn = HttpConn::new(ctx.base.clone(), ctx.timeout);
            let mut st = ConnStats {
                hist: Some(new_hist()),
                ..Default::default()
            };
            let mut seq: u64 = 0;
            let mut i: usize = 0;
            let mut consecutive_errors = 0u32;
            loop {
                let t = tokio::time::Instant::now();
                if t >= end {
                    break;
                }
                if budget
                    .fetch_update(Ordering::AcqRel, Ordering::Acquire, |b| b.checked_sub(1))
                    .is_err()
                {
                    break;
                }
                let session = &sessions[(c + i * a.connections) % sessions.len()];
                i += 1;
                let seqs: Vec<u64> = (seq..seq + batch).collect();
                seq += batch;
                let body = ctx.publish_body(session, &id_prefix, &seqs);
                let path = match ctx.target {
                    crate::common::Target::Nexus => path_nexus.clone(),
                    crate::common::Target::Nchan => ctx.publish_path(None, session),
                };
                let measured = t >= warm_end;
                let started = Instant::now();
                let r = conn.post_json(&path, &headers, body).await;
                let el = started.elapsed();
                match r {
                    Ok(resp) => {
                        consecutive_errors = 0;
                        if !measured {
                            continue;
                        }
                        if resp.ok() {
                            st.ok_requests += 1;
                            st.ok_reports += batch;
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

    // Sample the server (and ourselves) at the boundaries of the measured window.
    sleep_until(warm_end).await;
    let measure_start = Instant::now();
    let srv0 = ctx.proc.as_ref().map(|p| p.sample());
    let me0 = self_cpu_ticks();
    let cpuw = crate::common::CpuWindow::start(ctx.proc.as_ref());
    let mut all = Vec::with_capacity(tasks.len());
    for t in tasks {
        all.push(t.await?);
    }
    let window = measure_start.elapsed();
    let srv1 = ctx.proc.as_ref().map(|p| p.sample());
    let me1 = self_cpu_ticks();
    let (_, _, other_cpu) = cpuw.finish(ctx.proc.as_ref());

    let mut hist = new_hist();
    let (mut ok_req, mut ok_rep, mut non2xx, mut errors, mut connects) = (0, 0, 0, 0, 0);
    let mut samples = Vec::new();
    for s in &mut all {
        ok_req += s.ok_requests;
        ok_rep += s.ok_reports;
        non2xx += s.non_2xx;
        errors += s.errors;
        connects += s.connects;
        if let Some(h) = &s.hist {
            let _ = hist.add(h);
        }
        for x in s.samples.drain(..) {
            if samples.len() < 5 {
                samples.push(x);
            }
        }
    }
    let w = window.as_secs_f64().max(1e-9);
    let rps = ok_rep as f64 / w;
    println!(
        "ingest [{}]: {ok_rep} reports in {ok_req} ok requests over {:.2}s = {:.0} reports/s ({:.0} req/s); non-2xx {non2xx}, errors {errors}, tcp connects {connects}",
        ctx.target.as_str(),
        w,
        rps,
        ok_req as f64 / w
    );
    println!("  request latency: {}", hist_line(&hist));
    let server = match (&srv0, &srv1) {
        (Some(a0), Some(a1)) => {
            println!(
                "  server: cpu {:.0}% of one core, rss {} -> {} KiB",
                cpu_pct(a0, a1),
                a0.rss_kb,
                a1.rss_kb
            );
            json!({"cpu_pct": (cpu_pct(a0, a1)).round(), "rss_kb_before": a0.rss_kb, "rss_kb_after": a1.rss_kb})
        }
        _ => Value::Null,
    };
    let bench_cpu = (me1.saturating_sub(me0)) as f64 / 100.0 / w * 100.0;
    println!("  bench process cpu: {bench_cpu:.0}% of one core; other processes: {other_cpu:.0}%");
    crate::common::warn_if_busy(other_cpu);
    for s in &samples {
        println!("  sample failure: {s}");
    }
    Ok(json!({
        "bench": "ingest",
        "target": ctx.target.as_str(),
        "url": ctx.base.url,
        "connections": a.connections,
        "devices": devices.len(),
        "sessions": a.sessions,
        "batch": batch,
        "window_s": secs(window),
        "ok_requests": ok_req,
        "reports_ok": ok_rep,
        "reports_per_s": rps.round(),
        "requests_per_s": (ok_req as f64 / w).round(),
        "non_2xx": non2xx,
        "errors": errors,
        "tcp_connects": connects,
        "latency": hist_json(&hist),
        "server": server,
        "bench_cpu_pct": bench_cpu.round(),
        "other_cpu_pct": other_cpu.round(),
        "failure_samples": samples,
    }))
}

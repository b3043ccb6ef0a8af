//! One SSE subscriber task, shared by `fanout` and `idle`.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tokio::io::AsyncReadExt;
use tokio::sync::{Notify, Semaphore, watch};

use crate::common::{Target, new_hist, record, unix_ns};
use crate::sse::{self, Event, json_u64};
use crate::target::Ctx;

const SHARDS: usize = 16;

/// State shared by all subscribers of one run.
pub struct Shared {
    pub established: AtomicUsize,
    /// Established subscribers per session index.
    pub per_session: Vec<AtomicUsize>,
    pub failed: AtomicUsize,
    /// Unique report deliveries (first sighting of a (subscriber, seq)).
    pub delivered: AtomicU64,
    /// Notified whenever `established` or `failed` changes.
    pub progress: Notify,
    /// Delivery latency (ns), sharded to avoid lock contention.
    pub latency: Vec<Mutex<Histogram<u64>>>,
    /// Connect -> established (ns).
    pub connect: Vec<Mutex<Histogram<u64>>>,
    /// When the last subscriber became established.
    pub last_established: Mutex<Option<Instant>>,
    /// First few error messages, for diagnostics.
    pub errors: Mutex<Vec<String>>,
}

impl Shared {
    pub fn new(sessions: usize) -> Arc<Self> {
        Arc::new(Shared {
            established: AtomicUsize::new(0),
            per_session: (0..sessions).map(|_| AtomicUsize::new(0)).collect(),
            failed: AtomicUsize::new(0),
            delivered: AtomicU64::new(0),
            progress: Notify::new(),
            latency: (0..SHARDS).map(|_| Mutex::new(new_hist())).collect(),
            connect: (0..SHARDS).map(|_| Mutex::new(new_hist())).collect(),
            last_established: Mutex::new(None),
            errors: Mutex::new(Vec::new()),
        })
    }

    fn note_error(&self, msg: String) {
        if let Ok(mut e) = self.errors.lock()
            && e.len() < 10
        {
            e.push(msg);
        }
    }

    pub fn merged(shards: &[Mutex<Histogram<u64>>]) -> Histogram<u64> {
        let mut h = new_hist();
        for s in shards {
            if let Ok(s) = s.lock() {
                let _ = h.add(&*s);
            }
        }
        h
    }

    pub fn error_samples(&self) -> Vec<String> {
        self.errors.lock().map(|e| e.clone()).unwrap_or_default()
    }
}

/// What one subscriber saw.
#[derive(Default, Debug)]
pub struct SubOut {
    pub session: usize,
    pub established: bool,
    /// Bitset of bench_seq values received.
    pub seen: Vec<u64>,
    pub unique: u64,
    pub dups: u64,
    /// bench_seq lower than one already received.
    pub seq_inversions: u64,
    /// Numeric SSE id not strictly greater than the previous one.
    pub id_regressions: u64,
    pub reports: u64,
    pub pings: u64,
    pub other_events: u64,
    /// Report events without bench fields.
    pub foreign: u64,
    /// The stream ended (or failed) before we asked it to stop.
    pub closed_early: bool,
    pub error: Option<String>,
}

impl SubOut {
    pub fn has(&self, seq: u64) -> bool {
        let (w, b) = ((seq / 64) as usize, seq % 64);
        self.seen.get(w).is_some_and(|x| x & (1 << b) != 0)
    }

    /// Sets the bit; returns false if it was already set.
    fn insert(&mut self, seq: u64) -> bool {
        let (w, b) = ((seq / 64) as usize, seq % 64);
        if w >= self.seen.len() {
            // Bound the bitset: seqs come from our own publisher, but guard anyway.
            if w > 1 << 20 {
                return true;
            }
            self.seen.resize(w + 1, 0);
        }
        let was = self.seen[w] & (1 << b) != 0;
        self.seen[w] |= 1 << b;
        !was
    }
}

struct Tracker<'a> {
    out: &'a mut SubOut,
    shared: &'a Shared,
    shard: usize,
    last_id: Option<u64>,
    max_seq: Option<u64>,
    snapshot: bool,
}

impl Tracker<'_> {
    fn on_event(&mut self, ev: Event) {
        if let Some(id) = ev.id.as_deref().and_then(|s| s.trim().parse::<u64>().ok()) {
            if let Some(last) = self.last_id
                && id <= last
            {
                self.out.id_regressions += 1;
            }
            self.last_id = Some(id);
        }
        match ev.event.as_str() {
            "snapshot" => self.snapshot = true,
            "ping" => self.out.pings += 1,
            "report" | "message" => {
                self.out.reports += 1;
                let (Some(seq), Some(sent)) = (
                    json_u64(&ev.data, "bench_seq"),
                    json_u64(&ev.data, "bench_sent_unix_ns"),
                ) else {
                    self.out.foreign += 1;
                    return;
                };
                let now = unix_ns();
                if self.out.insert(seq) {
                    self.out.unique += 1;
                    self.shared.delivered.fetch_add(1, Ordering::Relaxed);
                    if let Ok(mut h) = self.shared.latency[self.shard].lock() {
                        record(&mut h, now.saturating_sub(sent));
                    }
                } else {
                    self.out.dups += 1;
                }
                if let Some(m) = self.max_seq
                    && seq < m
                {
                    self.out.seq_inversions += 1;
                }
                self.max_seq = Some(self.max_seq.map_or(seq, |m| m.max(seq)));
            }
            _ => self.out.other_events += 1,
        }
    }
}

pub struct SubParams {
    pub idx: usize,
    pub session: usize,
    pub session_name: String,
    pub establish_timeout: Duration,
}

/// Connect (holding a `connect_permits` permit until established), then read
/// events until `stop` becomes true or the stream ends.
pub async fn run(
    ctx: Arc<Ctx>,
    p: SubParams,
    connect_permits: Arc<Semaphore>,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) -> SubOut {
    let mut out = SubOut {
        session: p.session,
        ..Default::default()
    };
    let shard = p.idx % SHARDS;
    let mut tracker_state = (None::<u64>, None::<u64>);
    let path = ctx.subscribe_path(&p.session_name);

    // Phase 1: connect + wait for the snapshot (nexus) / response head (nchan).
    let permit = connect_permits.acquire_owned().await.ok();
    let t0 = Instant::now();
    let established = tokio::time::timeout(p.establish_timeout, async {
        let mut s = sse::open(&ctx.base, &path, &ctx.sse_header_lines).await?;
        let mut snapshot = ctx.target == Target::Nchan;
        let mut buf = vec![0u8; 4096];
        let mut pending = std::mem::take(&mut s.leftover);
        loop {
            if !pending.is_empty() {
                let mut tr = Tracker {
                    out: &mut out,
                    shared: &shared,
                    shard,
                    last_id: tracker_state.0,
                    max_seq: tracker_state.1,
                    snapshot,
                };
                let ended = sse::decode(&mut s.framing, &mut s.parser, &pending, &mut |e| {
                    tr.on_event(e)
                })?;
                tracker_state = (tr.last_id, tr.max_seq);
                snapshot = tr.snapshot;
                pending.clear();
                if ended {
                    anyhow::bail!("stream ended before snapshot");
                }
            }
            if snapshot {
                return Ok::<_, anyhow::Error>((s, buf));
            }
            let n = s.stream.read(&mut buf).await?;
            if n == 0 {
                anyhow::bail!("stream closed before snapshot");
            }
            pending.extend_from_slice(&buf[..n]);
        }
    })
    .await;
    drop(permit);
    let (mut s, mut buf) = match established {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => {
            let msg = format!("subscriber {}: {e:#}", p.idx);
            shared.note_error(msg.clone());
            out.error = Some(msg);
            shared.failed.fetch_add(1, Ordering::Relaxed);
            shared.progress.notify_waiters();
            return out;
        }
        Err(_) => {
            let msg = format!(
                "subscriber {}: not established within {:?}",
                p.idx, p.establish_timeout
            );
            shared.note_error(msg.clone());
            out.error = Some(msg);
            shared.failed.fetch_add(1, Ordering::Relaxed);
            shared.progress.notify_waiters();
            return out;
        }
    };
    out.established = true;
    if let Ok(mut h) = shared.connect[shard].lock() {
        record(&mut h, t0.elapsed().as_nanos() as u64);
    }
    if let Some(c) = shared.per_session.get(p.session) {
        c.fetch_add(1, Ordering::AcqRel);
    }
    shared.established.fetch_add(1, Ordering::AcqRel);
    if let Ok(mut l) = shared.last_established.lock() {
        *l = Some(Instant::now());
    }
    shared.progress.notify_waiters();

    // Phase 2: read until told to stop.
    let mut tr = Tracker {
        out: &mut out,
        shared: &shared,
        shard,
        last_id: tracker_state.0,
        max_seq: tracker_state.1,
        snapshot: true,
    };
    let mut err = None;
    let mut closed = false;
    loop {
        let r = tokio::select! {
            biased;
            _ = stop.wait_for(|v| *v) => break,
            r = s.stream.read(&mut buf) => r,
        };
        match r {
            Ok(0) => {
                closed = true;
                break;
            }
            Ok(n) => {
                match sse::decode(&mut s.framing, &mut s.parser, &buf[..n], &mut |e| {
                    tr.on_event(e)
                }) {
                    Ok(false) => {}
                    Ok(true) => {
                        closed = true;
                        break;
                    }
                    Err(e) => {
                        err = Some(format!("subscriber {}: decode: {e:#}", p.idx));
                        break;
                    }
                }
            }
            Err(e) => {
                err = Some(format!("subscriber {}: read: {e}", p.idx));
                break;
            }
        }
    }
    if closed || err.is_some() {
        out.closed_early = true;
        if let Some(e) = &err {
            shared.note_error(e.clone());
        } else {
            shared.note_error(format!("subscriber {}: server closed the stream", p.idx));
        }
        out.error = err;
    }
    out
}

//! What a "publish" and a "subscribe" mean for each target, plus NEXUS device
//! pairing.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use bytes::Bytes;
use serde_json::json;

use crate::common::{BaseUrl, ProcWatch, Target, format_created_at, unix_ns};
use crate::http::{Headers, HttpConn};

/// A paired NEXUS device.
#[derive(Clone, Debug)]
pub struct Device {
    pub id: String,
    pub token: String,
}

/// Everything a workload needs to talk to the target.
#[derive(Clone)]
pub struct Ctx {
    pub base: BaseUrl,
    pub target: Target,
    /// Tenant headers + user-supplied extra headers + (NEXUS, signed in)
    /// `authorization: Bearer <access token>`, for web requests and SSE.
    pub web_headers: Headers,
    /// The same, pre-rendered as raw header lines for the SSE subscribers.
    pub sse_header_lines: String,
    pub nchan_pub_path: String,
    pub nchan_sub_path: String,
    /// Unique per run; prefixes sessions/channels and report ids.
    pub run: String,
    pub proc: Option<ProcWatch>,
    pub timeout: Duration,
}

impl Ctx {
    pub fn session(&self, i: usize) -> String {
        format!("bench-{}-{i}", self.run)
    }

    pub fn subscribe_path(&self, session: &str) -> String {
        match self.target {
            Target::Nexus => format!("/agent/reports/stream?session_id={session}"),
            Target::Nchan => format!("{}{session}", self.nchan_sub_path),
        }
    }

    pub fn publish_path(&self, device: Option<&Device>, session: &str) -> String {
        match (self.target, device) {
            (Target::Nexus, Some(d)) => format!("/devices/{}/reports", d.id),
            (Target::Nexus, None) => "/devices/unknown/reports".to_string(),
            (Target::Nchan, _) => format!("{}{session}", self.nchan_pub_path),
        }
    }

    pub fn publish_headers(&self, device: Option<&Device>) -> Headers {
        match (self.target, device) {
            (Target::Nexus, Some(d)) => {
                vec![("authorization".into(), format!("Bearer {}", d.token))]
            }
            _ => Vec::new(),
        }
    }

    /// Request body publishing `seqs` (report ids derived from `id_prefix`).
    /// NEXUS: `{"reports":[...]}`; nchan: the bare report (one per request).
    pub fn publish_body(&self, session: &str, id_prefix: &str, seqs: &[u64]) -> Bytes {
        let created = format_created_at(unix_ns() / 1_000_000_000);
        let sent = unix_ns();
        let one = |seq: u64| {
            format!(
                concat!(
                    r#"{{"meta":{{"report_id":"r_{}_{}","created_at":"{}","session_id":"{}","approval_level":"green"}},"#,
                    r#""rationale":"nexus-bench load","bench_sent_unix_ns":{},"bench_seq":{}}}"#
                ),
                id_prefix, seq, created, session, sent, seq
            )
        };
        match self.target {
            Target::Nexus => {
                let mut s = String::with_capacity(256 * seqs.len() + 16);
                s.push_str(r#"{"reports":["#);
                for (i, &q) in seqs.iter().enumerate() {
                    if i > 0 {
                        s.push(',');
                    }
                    s.push_str(&one(q));
                }
                s.push_str("]}");
                Bytes::from(s)
            }
            Target::Nchan => Bytes::from(one(seqs.first().copied().unwrap_or(0))),
        }
    }
}

/// Render header pairs as raw `Name: value\r\n` lines.
pub fn header_lines(h: &Headers) -> String {
    h.iter().map(|(k, v)| format!("{k}: {v}\r\n")).collect()
}

fn str_field(v: &serde_json::Value, key: &str) -> Result<String> {
    match v.get(key) {
        Some(serde_json::Value::String(s)) => Ok(s.clone()),
        Some(serde_json::Value::Number(n)) => Ok(n.to_string()),
        _ => Err(anyhow!("response has no string field {key:?}: {v}")),
    }
}

/// Pair one device through start -> confirm_by_code -> complete.
pub async fn pair_device(ctx: &Ctx, conn: &mut HttpConn, name: &str) -> Result<Device> {
    let start = json!({
        "device_name": name,
        "device_type": "windows_companion",
        "capabilities": [],
    });
    // The device side: tenant headers (optional pre-selection), never the user's token.
    let device_headers: Headers = ctx
        .web_headers
        .iter()
        .filter(|(k, _)| !k.eq_ignore_ascii_case("authorization"))
        .cloned()
        .collect();
    let r = conn
        .post_json("/devices/pairing/start", &device_headers, start.to_string())
        .await
        .context("pairing/start")?;
    if !r.ok() {
        bail!("pairing/start: {}", r.describe());
    }
    let v = r.json()?;
    let pairing_id = str_field(&v, "pairing_id")?;
    let code = str_field(&v, "pairing_code")?;
    let nonce = str_field(&v, "device_nonce")?;

    let r = conn
        .post_json(
            "/devices/pairing/confirm_by_code",
            &ctx.web_headers,
            json!({ "pairing_code": code }).to_string(),
        )
        .await
        .context("pairing/confirm_by_code")?;
    if !r.ok() {
        bail!("pairing/confirm_by_code: {}", r.describe());
    }

    let body = json!({ "pairing_id": pairing_id, "device_nonce": nonce }).to_string();
    let mut last = String::new();
    for attempt in 0..10u64 {
        let r = conn
            .post_json("/devices/pairing/complete", &[], body.clone())
            .await
            .context("pairing/complete")?;
        if r.ok() {
            let v = r.json()?;
            return Ok(Device {
                id: str_field(&v, "device_id")?,
                token: str_field(&v, "device_token")?,
            });
        }
        last = r.describe();
        if r.status.is_client_error() && r.status.as_u16() != 409 && r.status.as_u16() != 425 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50 * (attempt + 1))).await;
    }
    bail!("pairing/complete: {last}")
}

/// Pair `n` devices with bounded concurrency. nchan needs none (returns empty).
pub async fn pair_devices(ctx: &Arc<Ctx>, n: usize, concurrency: usize) -> Result<Vec<Device>> {
    if ctx.target != Target::Nexus || n == 0 {
        return Ok(Vec::new());
    }
    let t0 = std::time::Instant::now();
    let workers = concurrency.clamp(1, n);
    let mut tasks = Vec::new();
    for w in 0..workers {
        let ctx = ctx.clone();
        tasks.push(tokio::spawn(async move {
            let mut conn = HttpConn::new(ctx.base.clone(), ctx.timeout);
            let mut out = Vec::new();
            let mut i = w;
            while i < n {
                let d = pair_device(&ctx, &mut conn, &format!("bench-{}-{i}", ctx.run)).await?;
                out.push((i, d));
                i += workers;
            }
            Ok::<_, anyhow::Error>(out)
        }));
    }
    let mut all = Vec::with_capacity(n);
    for t in tasks {
        all.extend(t.await.context("pairing task panicked")??);
    }
    all.sort_by_key(|(i, _)| *i);
    eprintln!("paired {n} devices in {:.2}s", t0.elapsed().as_secs_f64());
    Ok(all.into_iter().map(|(_, d)| d).collect())
}

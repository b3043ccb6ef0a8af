//! Shared helpers: target URL handling, clocks, resource limits, /proc sampling,
//! histogram summaries.

use std::net::{SocketAddr, ToSocketAddrs};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail};
use hdrhistogram::Histogram;
use serde_json::{Value, json};

/// Which server implementation is being measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Target {
    /// The NEXUS control-plane server (pairing + /devices/{id}/reports + SSE stream).
    Nexus,
    /// nginx + nchan (POST <pub-path><channel>, EventSource GET <sub-path><channel>).
    Nchan,
}

impl Target {
    pub fn as_str(self) -> &'static str {
        match self {
            Target::Nexus => "nexus",
            Target::Nchan => "nchan",
        }
    }
}

/// A parsed `http://host:port` base URL that is guaranteed to point at loopback.
#[derive(Clone, Debug)]
pub struct BaseUrl {
    pub addr: SocketAddr,
    /// Value for the `Host` header.
    pub host_header: String,
    /// Path prefix (without trailing slash), usually empty.
    pub prefix: String,
    /// The original URL, normalised (no trailing slash).
    pub url: String,
}

impl BaseUrl {
    pub fn parse(url: &str) -> Result<Self> {
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| anyhow!("only plain http:// URLs are supported, got {url:?}"))?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if authority.is_empty() {
            bail!("URL {url:?} has no host");
        }
        let with_port = if authority.starts_with('[') {
            if authority.contains("]:") {
                authority.to_string()
            } else {
                format!("{authority}:80")
            }
        } else if authority.contains(':') {
            authority.to_string()
        } else {
            format!("{authority}:80")
        };
        let addr = with_port
            .to_socket_addrs()
            .with_context(|| format!("resolving {authority}"))?
            .next()
            .ok_or_else(|| anyhow!("{authority} resolved to nothing"))?;
        if !addr.ip().is_loopback() {
            bail!(
                "refusing to generate load against non-loopback address {addr}: \
                 nexus-bench only targets 127.0.0.0/8 or [::1]"
            );
        }
        let prefix = path.trim_end_matches('/').to_string();
        Ok(BaseUrl {
            addr,
            host_header: authority.to_string(),
            url: format!("http://{authority}{prefix}"),
            prefix,
        })
    }

    /// Full request path (prefix + path).
    pub fn path(&self, p: &str) -> String {
        format!("{}{}", self.prefix, p)
    }
}

/// Wall-clock time in nanoseconds since the Unix epoch (used for cross-process
/// latency: sender and receiver are on the same host and share the clock).
pub fn unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// `YYYY-MM-DDTHH:MM:SS+0000` for the given unix seconds (UTC).
pub fn format_created_at(unix_secs: u64) -> String {
    let days = (unix_secs / 86_400) as i64;
    let secs_of_day = unix_secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}+0000",
        secs_of_day / 3600,
        (secs_of_day / 60) % 60,
        secs_of_day % 60
    )
}

/// Howard Hinnant's days-to-civil algorithm.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Short random id used to make sessions / report ids unique per run.
pub fn run_id() -> String {
    format!("{:012x}", rand::random::<u64>() & 0xffff_ffff_ffff)
}

/// Raise RLIMIT_NOFILE as far as possible (soft up to hard; as root also try to
/// lift the hard limit to `want`). Children spawned afterwards inherit it.
/// Returns the resulting soft limit.
pub fn raise_nofile(want: u64) -> u64 {
    use rlimit::Resource;
    let Ok((soft, hard)) = Resource::NOFILE.get() else {
        return 0;
    };
    if hard < want && Resource::NOFILE.set(want, want).is_ok() {
        return want;
    }
    if soft < hard && Resource::NOFILE.set(hard, hard).is_ok() {
        return hard;
    }
    soft
}

pub fn current_nofile() -> u64 {
    rlimit::Resource::NOFILE.get().map(|(s, _)| s).unwrap_or(0)
}

/// Parse one `Key: value` line out of /proc/<pid>/status.
fn proc_status_kb(pid: u32, key: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines().find_map(|l| {
        let v = l.strip_prefix(key)?.strip_prefix(':')?;
        v.split_whitespace().next()?.parse().ok()
    })
}

/// Direct children of `pid` (scans /proc/*/stat).
pub fn children_of(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in rd.flatten() {
        let Some(child) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        if let Some((ppid, _)) = stat_fields(child)
            && ppid == pid
        {
            out.push(child);
        }
    }
    out
}

/// (ppid, utime+stime ticks) from /proc/<pid>/stat.
fn stat_fields(pid: u32) -> Option<(u32, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain spaces.
    let after = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    // after ")": state(0) ppid(1) ... utime(11) stime(12)
    let ppid = f.get(1)?.parse().ok()?;
    let ut: u64 = f.get(11)?.parse().ok()?;
    let st: u64 = f.get(12)?.parse().ok()?;
    Some((ppid, ut + st))
}

/// A server process (plus, for nginx, its worker children) whose RSS / CPU we sample.
#[derive(Clone, Debug)]
pub struct ProcWatch {
    pub pid: u32,
}

#[derive(Clone, Copy, Debug, Default)]
pub struct ProcSample {
    pub rss_kb: u64,
    pub cpu_ticks: u64,
    pub at: Option<std::time::Instant>,
}

impl ProcWatch {
    /// The pid plus its direct children (nginx master + workers).
    pub fn pids(&self) -> Vec<u32> {
        let mut v = vec![self.pid];
        v.extend(children_of(self.pid));
        v
    }

    pub fn sample(&self) -> ProcSample {
        let mut s = ProcSample {
            at: Some(std::time::Instant::now()),
            ..Default::default()
        };
        for p in self.pids() {
            s.rss_kb += proc_status_kb(p, "VmRSS").unwrap_or(0);
            s.cpu_ticks += stat_fields(p).map(|(_, t)| t).unwrap_or(0);
        }
        s
    }

    pub fn alive(&self) -> bool {
        std::path::Path::new(&format!("/proc/{}", self.pid)).exists()
    }
}

/// Context switches (voluntary + involuntary) of all threads of `pid` so far,
/// from /proc/<pid>/task/*/status. Threads that exited are not counted.
pub fn context_switches(pid: u32) -> Option<u64> {
    let rd = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let mut total = 0;
    for e in rd.flatten() {
        total += task_switches(&e.path().join("status")).unwrap_or(0);
    }
    Some(total)
}

/// Context switches of one thread, from its `/proc/<pid>/task/<tid>/status`.
fn task_switches(status: &std::path::Path) -> Option<u64> {
    let s = std::fs::read_to_string(status).ok()?;
    let mut total = 0;
    for l in s.lines() {
        if let Some(v) = l
            .strip_prefix("voluntary_ctxt_switches:")
            .or_else(|| l.strip_prefix("nonvoluntary_ctxt_switches:"))
        {
            total += v.trim().parse::<u64>().unwrap_or(0);
        }
    }
    Some(total)
}

/// Server CPU usage between two samples, in percent of one core
/// (assumes USER_HZ = 100, which is the case on Linux/x86_64).
pub fn cpu_pct(a: &ProcSample, b: &ProcSample) -> f64 {
    let (Some(ta), Some(tb)) = (a.at, b.at) else {
        return 0.0;
    };
    let wall = tb.duration_since(ta).as_secs_f64();
    if wall <= 0.0 {
        return 0.0;
    }
    let ticks = b.cpu_ticks.saturating_sub(a.cpu_ticks) as f64;
    ticks / 100.0 / wall * 100.0
}

/// Busy ticks (all CPUs: user+nice+system+steal) from /proc/stat.
pub fn system_busy_ticks() -> u64 {
    let Ok(s) = std::fs::read_to_string("/proc/stat") else {
        return 0;
    };
    let Some(line) = s.lines().find(|l| l.starts_with("cpu ")) else {
        return 0;
    };
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal [guest guest_nice: included in user].
    // irq/softirq are left out: loopback packet processing lands there and is not
    // charged to either process, so it would look like "other" load.
    let f = |i: usize| v.get(i).copied().unwrap_or(0);
    f(0) + f(1) + f(2) + f(7)
}

/// CPU accounting of a measurement window: server, this bench, and everything
/// else on the box (a build running next to the benchmark shows up as "other").
#[derive(Clone, Copy, Debug)]
pub struct CpuWindow {
    at: std::time::Instant,
    sys: u64,
    me: u64,
    server: Option<u64>,
}

impl CpuWindow {
    pub fn start(proc: Option<&ProcWatch>) -> Self {
        CpuWindow {
            at: std::time::Instant::now(),
            sys: system_busy_ticks(),
            me: self_cpu_ticks(),
            server: proc.map(|p| p.sample().cpu_ticks),
        }
    }

    /// (server %, bench %, other %) of one core since `start`.
    pub fn finish(&self, proc: Option<&ProcWatch>) -> (Option<f64>, f64, f64) {
        let wall = self.at.elapsed().as_secs_f64().max(1e-3);
        let pct = |t: u64| t as f64 / 100.0 / wall * 100.0;
        let sys = system_busy_ticks().saturating_sub(self.sys);
        let me = self_cpu_ticks().saturating_sub(self.me);
        let server = match (proc, self.server) {
            (Some(p), Some(s0)) => Some(p.sample().cpu_ticks.saturating_sub(s0)),
            _ => None,
        };
        let other = sys.saturating_sub(me + server.unwrap_or(0));
        (server.map(pct), pct(me), pct(other))
    }
}

/// Warn when the box is busy with something else (a compile, another benchmark).
pub fn warn_if_busy(other_pct: f64) {
    if other_pct > 15.0 {
        eprintln!(
            "WARNING: {other_pct:.0}% of a core was used by other processes during the measurement; \
             figures are not trustworthy (check `top` for builds or other load)"
        );
    }
}

/// CPU used by this process so far (utime+stime ticks).
pub fn self_cpu_ticks() -> u64 {
    stat_fields(std::process::id()).map(|(_, t)| t).unwrap_or(0)
}

/// A latency histogram in nanoseconds (1 ns .. 1 h, 3 significant digits).
pub fn new_hist() -> Histogram<u64> {
    // The bounds are constants that are known to be valid.
    Histogram::new_with_bounds(1, 3_600_000_000_000, 3).unwrap_or_else(|_| {
        Histogram::new(3).unwrap_or_else(|_| unreachable!("3 sigfig histogram is valid"))
    })
}

/// p50/p90/p99/p99.9/max in milliseconds as JSON.
pub fn hist_json(h: &Histogram<u64>) -> Value {
    let ms = |ns: u64| (ns as f64 / 1e6 * 1000.0).round() / 1000.0;
    if h.is_empty() {
        return json!({"count": 0});
    }
    json!({
        "count": h.len(),
        "p50_ms": ms(h.value_at_quantile(0.50)),
        "p90_ms": ms(h.value_at_quantile(0.90)),
        "p99_ms": ms(h.value_at_quantile(0.99)),
        "p999_ms": ms(h.value_at_quantile(0.999)),
        "max_ms": ms(h.max()),
        "mean_ms": (h.mean() / 1e6 * 1000.0).round() / 1000.0,
    })
}

pub fn hist_line(h: &Histogram<u64>) -> String {
    if h.is_empty() {
        return "no samples".into();
    }
    let ms = |ns: u64| ns as f64 / 1e6;
    format!(
        "p50 {:.3} ms  p90 {:.3} ms  p99 {:.3} ms  p99.9 {:.3} ms  max {:.3} ms  (n={})",
        ms(h.value_at_quantile(0.5)),
        ms(h.value_at_quantile(0.9)),
        ms(h.value_at_quantile(0.99)),
        ms(h.value_at_quantile(0.999)),
        ms(h.max()),
        h.len()
    )
}

/// Record a nanosecond value, clamping into the histogram's range.
pub fn record(h: &mut Histogram<u64>, ns: u64) {
    let v = ns.clamp(1, 3_600_000_000_000);
    let _ = h.record(v);
}

/// Sleep helper that never sleeps for a negative duration.
pub async fn sleep_until(deadline: tokio::time::Instant) {
    if deadline > tokio::time::Instant::now() {
        tokio::time::sleep_until(deadline).await;
    }
}

pub fn secs(d: Duration) -> f64 {
    (d.as_secs_f64() * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_loopback_urls() {
        let u = BaseUrl::parse("http://127.0.0.1:8080").unwrap();
        assert_eq!(u.addr.port(), 8080);
        assert_eq!(u.host_header, "127.0.0.1:8080");
        assert_eq!(u.path("/x"), "/x");
        let u = BaseUrl::parse("http://localhost:9/api/").unwrap();
        assert!(u.addr.ip().is_loopback());
        assert_eq!(u.path("/x"), "/api/x");
        let u = BaseUrl::parse("http://[::1]:81").unwrap();
        assert_eq!(u.addr.port(), 81);
    }

    #[test]
    fn rejects_non_loopback_and_https() {
        assert!(BaseUrl::parse("http://10.0.0.1:80").is_err());
        assert!(BaseUrl::parse("https://127.0.0.1:80").is_err());
        assert!(BaseUrl::parse("http://1.2.3.4").is_err());
    }

    #[test]
    fn formats_created_at() {
        assert_eq!(format_created_at(0), "1970-01-01T00:00:00+0000");
        // 2026-02-03T01:00:00Z
        assert_eq!(format_created_at(1_770_080_400), "2026-02-03T01:00:00+0000");
        assert_eq!(format_created_at(951_782_400), "2000-02-29T00:00:00+0000");
    }

    #[test]
    fn counts_own_context_switches() {
        // The process total can go down while other tests' threads exit (exited threads
        // are not counted), so check this thread, and that the total includes it.
        let me = std::path::Path::new("/proc/thread-self/status");
        let a = task_switches(me).unwrap();
        std::thread::sleep(Duration::from_millis(2));
        let b = task_switches(me).unwrap();
        assert!(b > a, "{a} -> {b}");
        let total = context_switches(std::process::id()).unwrap();
        let again = task_switches(me).unwrap();
        assert!(
            total >= b,
            "process total {total} < this thread's {b} ({again} now)"
        );
    }

    #[test]
    fn samples_own_process() {
        let w = ProcWatch {
            pid: std::process::id(),
        };
        let s = w.sample();
        assert!(s.rss_kb > 0);
    }
}

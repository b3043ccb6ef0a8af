//! `report`: turn the JSON summary lines of several runs into a side-by-side
//! Markdown table (NEXUS vs nchan, with ratios). Repeated runs of the same
//! benchmark/target are reduced to the median of each metric.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{Context, Result};
use serde_json::Value;

#[derive(clap::Args, Debug, Clone)]
pub struct ReportArgs {
    /// JSON-lines files written with --json-out (or captured summary lines).
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
    /// Leave out runs during which other processes used more than this much CPU
    /// (percent of one core, the summaries' `other_cpu_pct`): a compile next to
    /// the benchmark makes its figures meaningless.
    #[arg(long, default_value_t = 25.0)]
    pub max_other_cpu: f64,
}

/// (label, JSON pointer, lower is better)
type Metric = (&'static str, &'static str, bool);

const INGEST: &[Metric] = &[
    ("reports/s (2xx)", "/reports_per_s", false),
    ("request p50 ms", "/latency/p50_ms", true),
    ("request p99 ms", "/latency/p99_ms", true),
    ("non-2xx", "/non_2xx", true),
    ("errors", "/errors", true),
    ("server CPU % (of 1 core)", "/server/cpu_pct", true),
    ("server RSS after KiB", "/server/rss_kb_after", true),
    ("bench CPU %", "/bench_cpu_pct", true),
];

const FANOUT: &[Metric] = &[
    ("subscribers established", "/subscribers_established", false),
    ("published ok", "/published_ok", false),
    ("delivered %", "/delivered_pct", false),
    ("missing", "/missing", true),
    ("duplicates", "/duplicates", true),
    ("out-of-order", "/out_of_order", true),
    ("delivery p50 ms", "/latency/p50_ms", true),
    ("delivery p99 ms", "/latency/p99_ms", true),
    ("delivery p99.9 ms", "/latency/p999_ms", true),
    ("delivery max ms", "/latency/max_ms", true),
    ("publish p99 ms", "/publish_latency/p99_ms", true),
    ("subscriber set-up s", "/subscriber_setup_s", true),
    ("server CPU % while publishing", "/server/cpu_pct", true),
    (
        "server RSS with subscribers KiB",
        "/server/rss_kb_subscribed",
        true,
    ),
];

const IDLE: &[Metric] = &[
    ("established", "/established", false),
    ("failed", "/failed", true),
    ("time to establish all s", "/time_to_establish_all_s", true),
    ("connections/s", "/connections_per_s", false),
    (
        "connect->established p99 ms",
        "/connect_latency/p99_ms",
        true,
    ),
    (
        "server bytes per idle connection",
        "/bytes_per_connection",
        true,
    ),
    ("server RSS before KiB", "/server_rss_kb_before", true),
    (
        "server RSS with connections KiB",
        "/server_rss_kb_after",
        true,
    ),
    (
        "server RSS after close KiB",
        "/server_rss_kb_after_close",
        true,
    ),
];

const AUTHCOST: &[Metric] = &[
    (
        "authenticated req/s",
        "/authenticated/requests_per_s",
        false,
    ),
    (
        "unauthenticated req/s",
        "/unauthenticated/requests_per_s",
        false,
    ),
    (
        "authenticated p50 ms",
        "/authenticated/latency/p50_ms",
        true,
    ),
    (
        "unauthenticated p50 ms",
        "/unauthenticated/latency/p50_ms",
        true,
    ),
    (
        "authenticated p99 ms",
        "/authenticated/latency/p99_ms",
        true,
    ),
    (
        "unauthenticated p99 ms",
        "/unauthenticated/latency/p99_ms",
        true,
    ),
    (
        "auth cost: server CPU us/request",
        "/auth_cost_us/server_cpu_per_request",
        true,
    ),
    (
        "auth cost: wall us/request (1/throughput)",
        "/auth_cost_us/wall_per_request",
        true,
    ),
];

const CMDLATENCY: &[Metric] = &[
    (
        "GREEN propose->device p50 ms",
        "/phases/green/delivery_latency/p50_ms",
        true,
    ),
    (
        "GREEN propose->device p90 ms",
        "/phases/green/delivery_latency/p90_ms",
        true,
    ),
    (
        "GREEN propose->device p99 ms",
        "/phases/green/delivery_latency/p99_ms",
        true,
    ),
    (
        "GREEN propose->device max ms",
        "/phases/green/delivery_latency/max_ms",
        true,
    ),
    (
        "GREEN propose request p50 ms",
        "/phases/green/propose_latency/p50_ms",
        true,
    ),
    (
        "GREEN propose request p99 ms",
        "/phases/green/propose_latency/p99_ms",
        true,
    ),
    (
        "RED approve->device p50 ms",
        "/phases/red/delivery_latency/p50_ms",
        true,
    ),
    (
        "RED approve->device p99 ms",
        "/phases/red/delivery_latency/p99_ms",
        true,
    ),
    (
        "RED decide request p99 ms",
        "/phases/red/decide_latency/p99_ms",
        true,
    ),
    ("problems (missing, dups, ...)", "/problems", true),
];

/// Metrics of a benchmark kind, and its runs by target name.
type Group = (&'static [Metric], BTreeMap<String, Vec<Value>>);

fn key(v: &Value) -> Option<(String, &'static [Metric])> {
    let bench = v.get("bench")?.as_str()?;
    Some(match bench {
        "ingest" => (
            format!(
                "ingest: {} connections, batch {}",
                v.get("connections")?,
                v.get("batch")?
            ),
            INGEST,
        ),
        "fanout" => (
            format!(
                "fanout: {} subscribers / {} sessions @ {} reports/s",
                v.get("subscribers")?,
                v.get("sessions")?,
                v.get("rate")?
            ),
            FANOUT,
        ),
        "idle" => (
            format!(
                "idle: {} connections / {} sessions",
                v.get("connections")?,
                v.get("sessions")?
            ),
            IDLE,
        ),
        "authcost" => (
            format!(
                "authcost: {} connections, {} vs {}",
                v.get("connections")?,
                v.get("auth_path")?.as_str()?,
                v.get("open_path")?.as_str()?
            ),
            AUTHCOST,
        ),
        "cmdlatency" => (
            format!(
                "cmdlatency: {} devices @ {} commands/s",
                v.get("devices")?,
                v.get("rate")?
            ),
            CMDLATENCY,
        ),
        _ => return None,
    })
}

fn median(mut xs: Vec<f64>) -> Option<f64> {
    if xs.is_empty() {
        return None;
    }
    xs.sort_by(|a, b| a.total_cmp(b));
    let n = xs.len();
    Some(if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    })
}

fn fmt(x: Option<f64>) -> String {
    match x {
        None => "–".into(),
        Some(x) if x.abs() >= 100.0 || x.fract() == 0.0 => format!("{x:.0}"),
        Some(x) => format!("{x:.3}"),
    }
}

pub fn run(a: ReportArgs) -> Result<String> {
    // key -> target -> runs
    let mut groups: BTreeMap<String, Group> = BTreeMap::new();
    let mut excluded = 0usize;
    for f in &a.files {
        let text =
            std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
        for line in text.lines() {
            let Ok(v) = serde_json::from_str::<Value>(line.trim()) else {
                continue;
            };
            let Some((k, metrics)) = key(&v) else {
                continue;
            };
            if v.get("other_cpu_pct")
                .and_then(Value::as_f64)
                .is_some_and(|o| o > a.max_other_cpu)
            {
                excluded += 1;
                continue;
            }
            let target = v
                .get("target")
                .and_then(Value::as_str)
                .unwrap_or("?")
                .to_string();
            groups
                .entry(k)
                .or_insert_with(|| (metrics, BTreeMap::new()))
                .1
                .entry(target)
                .or_default()
                .push(v);
        }
    }
    let mut out = String::new();
    for (k, (metrics, targets)) in &groups {
        let runs = |t: &str| targets.get(t).map_or(0, Vec::len);
        out.push_str(&format!(
            "\n### {k}\n\n| metric | NEXUS ({} run{}) | nchan ({} run{}) | NEXUS / nchan |\n|---|---:|---:|---:|\n",
            runs("nexus"),
            if runs("nexus") == 1 { "" } else { "s" },
            runs("nchan"),
            if runs("nchan") == 1 { "" } else { "s" },
        ));
        for (label, ptr, _lower_better) in metrics.iter() {
            let med = |t: &str| {
                targets.get(t).and_then(|vs| {
                    median(
                        vs.iter()
                            .filter_map(|v| v.pointer(ptr).and_then(Value::as_f64))
                            .collect(),
                    )
                })
            };
            let (n, c) = (med("nexus"), med("nchan"));
            let ratio = match (n, c) {
                (Some(n), Some(c)) if c != 0.0 => format!("{:.2}×", n / c),
                _ => "–".into(),
            };
            out.push_str(&format!(
                "| {label} | {} | {} | {ratio} |\n",
                fmt(n),
                fmt(c)
            ));
        }
    }
    if excluded > 0 {
        out.push_str(&format!(
            "\n({excluded} run(s) left out: other processes used > {}% of a core during them)\n",
            a.max_other_cpu
        ));
    }
    if groups.is_empty() {
        out.push_str("no benchmark summaries found\n");
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_side_by_side_table() {
        let dir = std::env::temp_dir().join(format!("nb-report-{}", crate::common::run_id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("r.jsonl");
        std::fs::write(
            &f,
            concat!(
                r#"{"bench":"ingest","target":"nexus","connections":64,"batch":1,"reports_per_s":20000,"latency":{"p50_ms":1.0,"p99_ms":4.0}}"#,
                "\n",
                r#"{"bench":"ingest","target":"nexus","connections":64,"batch":1,"reports_per_s":30000,"latency":{"p50_ms":2.0,"p99_ms":6.0}}"#,
                "\n",
                r#"{"bench":"ingest","target":"nchan","connections":64,"batch":1,"reports_per_s":50000,"latency":{"p50_ms":1.0,"p99_ms":2.0}}"#,
                "\n",
                r#"{"bench":"ingest","target":"nchan","connections":64,"batch":1,"reports_per_s":1,"other_cpu_pct":90,"latency":{"p50_ms":1.0,"p99_ms":2.0}}"#,
                "\n",
                r#"{"bench":"authcost","target":"nexus","connections":32,"auth_path":"/devices","open_path":"/devtools/devices","authenticated":{"requests_per_s":3000},"unauthenticated":{"requests_per_s":6000},"auth_cost_us":{"server_cpu_per_request":250.5}}"#,
                "\nnot json\n"
            ),
        )
        .unwrap();
        let t = run(ReportArgs {
            files: vec![f],
            max_other_cpu: 25.0,
        })
        .unwrap();
        std::fs::remove_dir_all(&dir).ok();
        assert!(t.contains("NEXUS (2 runs)"), "{t}");
        assert!(
            t.contains("| reports/s (2xx) | 25000 | 50000 | 0.50× |"),
            "{t}"
        );
        assert!(t.contains("| request p99 ms | 5 | 2 | 2.50× |"), "{t}");
        assert!(t.contains("1 run(s) left out"), "{t}");
        assert!(
            t.contains("### authcost: 32 connections, /devices vs /devtools/devices"),
            "{t}"
        );
        assert!(
            t.contains("| auth cost: server CPU us/request | 250 | – | – |"),
            "{t}"
        );
    }
}

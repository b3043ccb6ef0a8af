//! The on-disk outbox: reports waiting to reach the server.
//!
//! One file per report in `<state>/outbox/`, named `<seq>.json` with a zero-padded sequence
//! number, so the directory listing is the delivery order and a crash can at worst lose the one
//! report being written (files are written atomically: temporary file, fsync, rename). A report
//! stays until the server accepted it, then its file is removed; so reports survive restarts and
//! server outages and are delivered in the order they were queued.
//!
//! Idempotent by `meta.report_id`: queueing a report whose id is already waiting does nothing,
//! and the server stores a repeated report id once, so a retry after a lost answer never
//! duplicates. Bounded: past `max` reports the oldest are dropped, with a warning.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::Value;

/// The outbox directory inside the agent's state directory.
pub const DIR_NAME: &str = "outbox";

#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error("outbox {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("a report needs meta.report_id (a non-empty string)")]
    NoReportId,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> OutboxError + '_ {
    move |source| OutboxError::Io {
        path: path.to_owned(),
        source,
    }
}

/// A report waiting in the outbox.
#[derive(Debug, Clone, PartialEq)]
pub struct Pending {
    pub seq: u64,
    pub report_id: String,
    pub report: Value,
    /// Size of the stored JSON, for batching under the server's request limit.
    pub bytes: usize,
}

/// What [`Outbox::enqueue`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Enqueued {
    /// Stored; `dropped` older reports were discarded to stay within the bound.
    Stored { seq: u64, dropped: usize },
    /// A report with this id is already waiting; nothing changed.
    AlreadyQueued,
}

#[derive(Debug)]
pub struct Outbox {
    dir: PathBuf,
    max: usize,
    next_seq: u64,
    /// seq → report id, in delivery order.
    order: BTreeMap<u64, String>,
    /// report id → seq.
    ids: HashMap<String, u64>,
}

fn report_id_of(report: &Value) -> Option<&str> {
    report
        .get("meta")
        .and_then(|m| m.get("report_id"))
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
}

fn file_name(seq: u64) -> String {
    format!("{seq:020}.json")
}

impl Outbox {
    /// Opens (creating) the outbox in `dir`, keeping at most `max` reports (at least 1).
    /// Unreadable or corrupt files (a crash mid-write of an older version, a disk error) are
    /// moved aside as `*.bad` with a warning rather than blocking the queue.
    pub fn open(dir: &Path, max: usize) -> Result<Self, OutboxError> {
        crate::credentials::create_private_dir(dir).map_err(io(dir))?;
        let mut order = BTreeMap::new();
        let mut ids = HashMap::new();
        let mut next_seq = 1;
        for entry in std::fs::read_dir(dir).map_err(io(dir))? {
            let entry = entry.map_err(io(dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') && name.contains(".tmp-") {
                // An interrupted write: never renamed into place, so never queued.
                let _ = std::fs::remove_file(entry.path());
                continue;
            }
            let Some(seq) = name
                .strip_suffix(".json")
                .and_then(|s| s.parse::<u64>().ok())
            else {
                continue;
            };
            next_seq = next_seq.max(seq.saturating_add(1));
            let path = entry.path();
            let parsed = std::fs::read(&path)
                .ok()
                .and_then(|bytes| serde_json::from_slice::<Value>(&bytes).ok());
            let Some(id) = parsed.as_ref().and_then(report_id_of).map(str::to_owned) else {
                tracing::warn!(file = %path.display(), "outbox: unreadable report set aside");
                let _ = std::fs::rename(&path, path.with_extension("bad"));
                continue;
            };
            if ids.contains_key(&id) {
                // A duplicate can only come from an older agent; the first copy is kept.
                let _ = std::fs::remove_file(&path);
                continue;
            }
            ids.insert(id.clone(), seq);
            order.insert(seq, id);
        }
        let mut outbox = Self {
            dir: dir.to_owned(),
            max: max.max(1),
            next_seq,
            order,
            ids,
        };
        let dropped = outbox.enforce_bound()?;
        if dropped > 0 {
            tracing::warn!(
                dropped,
                max = outbox.max,
                "outbox: over its bound at start; dropped the oldest reports"
            );
        }
        Ok(outbox)
    }

    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    pub fn contains(&self, report_id: &str) -> bool {
        self.ids.contains_key(report_id)
    }

    /// Queues a report durably (it is on disk when this returns).
    pub fn enqueue(&mut self, report: &Value) -> Result<Enqueued, OutboxError> {
        let id = report_id_of(report).ok_or(OutboxError::NoReportId)?;
        if self.ids.contains_key(id) {
            return Ok(Enqueued::AlreadyQueued);
        }
        let seq = self.next_seq;
        let path = self.dir.join(file_name(seq));
        let bytes = serde_json::to_vec(report).map_err(|e| OutboxError::Io {
            path: path.clone(),
            source: std::io::Error::other(e),
        })?;
        write_atomic(&self.dir, &path, &bytes).map_err(io(&path))?;
        self.next_seq += 1;
        self.ids.insert(id.to_owned(), seq);
        self.order.insert(seq, id.to_owned());
        let dropped = self.enforce_bound()?;
        if dropped > 0 {
            tracing::warn!(
                dropped,
                max = self.max,
                "outbox full: dropped the oldest undelivered report(s)"
            );
        }
        Ok(Enqueued::Stored { seq, dropped })
    }

    /// The oldest waiting reports, in order: at most `max_count` of them and, beyond the first,
    /// at most `max_bytes` of JSON together. Reports whose file vanished or became unreadable
    /// are skipped (and forgotten).
    pub fn peek(&mut self, max_count: usize, max_bytes: usize) -> Vec<Pending> {
        let mut out = Vec::new();
        let mut total = 0usize;
        let mut lost = Vec::new();
        for (&seq, id) in &self.order {
            if out.len() >= max_count {
                break;
            }
            let path = self.dir.join(file_name(seq));
            let Some((report, bytes)) = std::fs::read(&path).ok().and_then(|b| {
                let len = b.len();
                serde_json::from_slice::<Value>(&b).ok().map(|v| (v, len))
            }) else {
                tracing::warn!(file = %path.display(), "outbox: report unreadable; skipped");
                lost.push(seq);
                continue;
            };
            if !out.is_empty() && total.saturating_add(bytes) > max_bytes {
                break;
            }
            total = total.saturating_add(bytes);
            out.push(Pending {
                seq,
                report_id: id.clone(),
                report,
                bytes,
            });
        }
        for seq in lost {
            if let Some(id) = self.order.remove(&seq) {
                self.ids.remove(&id);
            }
            let path = self.dir.join(file_name(seq));
            let _ = std::fs::rename(&path, path.with_extension("bad"));
        }
        out
    }

    /// Forgets reports the server accepted (or that can never be accepted).
    pub fn remove(&mut self, seqs: &[u64]) -> Result<(), OutboxError> {
        for &seq in seqs {
            let path = self.dir.join(file_name(seq));
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => return Err(OutboxError::Io { path, source }),
            }
            if let Some(id) = self.order.remove(&seq) {
                self.ids.remove(&id);
            }
        }
        Ok(())
    }

    fn enforce_bound(&mut self) -> Result<usize, OutboxError> {
        let excess = self.order.len().saturating_sub(self.max);
        if excess == 0 {
            return Ok(0);
        }
        let oldest: Vec<u64> = self.order.keys().take(excess).copied().collect();
        for seq in &oldest {
            if let Some(id) = self.order.get(seq) {
                tracing::warn!(report_id = %id, "outbox: dropping undelivered report");
            }
        }
        self.remove(&oldest)?;
        Ok(excess)
    }
}

fn write_atomic(dir: &Path, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name().unwrap_or_default().to_string_lossy(),
        std::process::id()
    ));
    let result = (|| {
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let mut file = options.open(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        drop(file);
        std::fs::rename(&tmp, path)?;
        crate::credentials::sync_dir(dir);
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn report(id: &str) -> Value {
        json!({"meta": {"report_id": id, "created_at": "2026-01-01T00:00:00Z"}, "done": [{"title": id}]})
    }

    fn ids(pending: &[Pending]) -> Vec<&str> {
        pending.iter().map(|p| p.report_id.as_str()).collect()
    }

    #[test]
    fn delivers_in_order_and_forgets_what_was_sent() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut outbox = Outbox::open(dir.path(), 100).expect("open");
        for id in ["r1", "r2", "r3", "r4"] {
            outbox.enqueue(&report(id)).expect("enqueue");
        }
        let batch = outbox.peek(3, usize::MAX);
        assert_eq!(ids(&batch), ["r1", "r2", "r3"]);
        assert_eq!(batch[0].report, report("r1"));
        outbox
            .remove(&batch.iter().take(2).map(|p| p.seq).collect::<Vec<_>>())
            .expect("remove");
        assert_eq!(ids(&outbox.peek(10, usize::MAX)), ["r3", "r4"]);
        assert_eq!(outbox.len(), 2);
        assert!(!outbox.contains("r1") && outbox.contains("r3"));
    }

    #[test]
    fn survives_a_restart_in_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let mut outbox = Outbox::open(dir.path(), 100).expect("open");
            for i in 0..12 {
                outbox.enqueue(&report(&format!("r{i}"))).expect("enqueue");
            }
            let first = outbox.peek(1, usize::MAX);
            outbox.remove(&[first[0].seq]).expect("remove");
        }
        // A crash mid-write leaves a temporary file: it is not a report.
        std::fs::write(dir.path().join(".00000000000000000099.json.tmp-1"), "{").expect("write");
        let mut outbox = Outbox::open(dir.path(), 100).expect("reopen");
        let expected: Vec<String> = (1..12).map(|i| format!("r{i}")).collect();
        assert_eq!(ids(&outbox.peek(100, usize::MAX)), expected);
        // New reports go after the old ones.
        outbox.enqueue(&report("new")).expect("enqueue");
        let all = outbox.peek(100, usize::MAX);
        assert_eq!(all.last().map(|p| p.report_id.as_str()), Some("new"));
        assert!(std::fs::read_dir(dir.path()).expect("list").all(|e| {
            !e.expect("entry")
                .file_name()
                .to_string_lossy()
                .contains(".tmp-")
        }));
    }

    #[test]
    fn drops_the_oldest_past_the_bound() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut outbox = Outbox::open(dir.path(), 3).expect("open");
        for id in ["a", "b", "c"] {
            assert!(matches!(
                outbox.enqueue(&report(id)).expect("enqueue"),
                Enqueued::Stored { dropped: 0, .. }
            ));
        }
        assert!(matches!(
            outbox.enqueue(&report("d")).expect("enqueue"),
            Enqueued::Stored { dropped: 1, .. }
        ));
        assert_eq!(ids(&outbox.peek(10, usize::MAX)), ["b", "c", "d"]);
        // A smaller bound after a restart trims too.
        drop(outbox);
        let mut outbox = Outbox::open(dir.path(), 2).expect("reopen");
        assert_eq!(ids(&outbox.peek(10, usize::MAX)), ["c", "d"]);
        let files = std::fs::read_dir(dir.path()).expect("list").count();
        assert_eq!(files, 2, "dropped reports leave no files");
    }

    #[test]
    fn the_same_report_id_is_queued_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut outbox = Outbox::open(dir.path(), 10).expect("open");
        outbox.enqueue(&report("r1")).expect("enqueue");
        assert_eq!(
            outbox.enqueue(&report("r1")).expect("again"),
            Enqueued::AlreadyQueued
        );
        drop(outbox);
        let mut outbox = Outbox::open(dir.path(), 10).expect("reopen");
        assert_eq!(
            outbox.enqueue(&report("r1")).expect("after restart"),
            Enqueued::AlreadyQueued
        );
        assert_eq!(outbox.len(), 1);
        assert!(matches!(
            outbox.enqueue(&json!({"meta": {}})),
            Err(OutboxError::NoReportId)
        ));
    }

    #[test]
    fn batches_respect_the_byte_budget_but_always_make_progress() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut outbox = Outbox::open(dir.path(), 10).expect("open");
        for id in ["r1", "r2", "r3"] {
            outbox.enqueue(&report(id)).expect("enqueue");
        }
        let one = outbox.peek(10, 1);
        assert_eq!(
            ids(&one),
            ["r1"],
            "a report bigger than the budget still goes alone"
        );
        let size = one[0].bytes;
        assert_eq!(ids(&outbox.peek(10, size * 2)), ["r1", "r2"]);
    }

    #[test]
    fn corrupt_files_are_set_aside() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut outbox = Outbox::open(dir.path(), 10).expect("open");
        outbox.enqueue(&report("r1")).expect("enqueue");
        outbox.enqueue(&report("r2")).expect("enqueue");
        drop(outbox);
        std::fs::write(dir.path().join(file_name(1)), "{not json").expect("corrupt");
        let mut outbox = Outbox::open(dir.path(), 10).expect("reopen");
        assert_eq!(ids(&outbox.peek(10, usize::MAX)), ["r2"]);
        assert!(dir.path().join(format!("{:020}.bad", 1)).exists());
    }
}

//! The command journal: what this agent did with each command, so nothing runs twice.
//!
//! An append-only file of JSON lines (`<state>/journal.jsonl`), each line fsynced before the
//! step it records goes ahead:
//!
//! - `started` (command id, attempt, and what a report needs) before the command runs;
//! - `done` (its report id) once the report is safely in the outbox;
//! - `acked` once the server took the ack.
//!
//! On restart a command found `started` but not `done` may or may not have run: it is **not**
//! run again; the runner reports it as blocked (“interrupted; not re-run”). A command that is
//! `done` but not `acked` is only acked (again). So a command is executed at most once, even if
//! the agent dies between executing and acknowledging it.
//!
//! The file is compacted when it grows: the latest state of every command that is not yet acked,
//! plus the most recent [`KEEP_ACKED`] acked ones (enough to recognise a late redelivery), are
//! rewritten atomically.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The journal file inside the agent's state directory.
pub const FILE_NAME: &str = "journal.jsonl";
/// Acked commands remembered after a compaction.
pub const KEEP_ACKED: usize = 2000;
/// Lines appended before the journal is compacted.
const COMPACT_AFTER: usize = 4 * KEEP_ACKED;

/// What a report about the command needs even if the command itself is long gone.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandInfo {
    #[serde(rename = "type", default)]
    pub command_type: String,
    #[serde(default)]
    pub correlation_id: Option<String>,
    #[serde(default)]
    pub session_id: Option<String>,
    #[serde(default)]
    pub risk: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
enum Line {
    Started {
        command_id: String,
        attempt: u32,
        #[serde(default)]
        info: CommandInfo,
        at: String,
    },
    Done {
        command_id: String,
        attempt: u32,
        report_id: String,
        at: String,
    },
    Acked {
        command_id: String,
        attempt: u32,
        at: String,
    },
}

/// Where a command stands in this agent's history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    /// It was about to run (delivery `attempt`) and nothing after that was recorded.
    Started { attempt: u32, info: CommandInfo },
    /// Its report is in the outbox; the ack for `attempt` is still to be sent.
    Done {
        attempt: u32,
        report_id: String,
        info: CommandInfo,
    },
    /// The server has the ack.
    Acked { attempt: u32, report_id: String },
}

#[derive(Debug, thiserror::Error)]
#[error("journal {}: {source}", path.display())]
pub struct JournalError {
    path: PathBuf,
    source: std::io::Error,
}

#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    file: std::fs::File,
    states: HashMap<String, (u64, State)>,
    /// Order of last change, for compaction.
    clock: u64,
    lines: usize,
}

fn now() -> String {
    nexus_domain::time::rfc3339(nexus_domain::time::now_millis())
}

impl Journal {
    /// Opens (creating) the journal at `path` and replays it. A torn last line (a crash in the
    /// middle of an append) is ignored: the step it would have recorded did not go ahead.
    pub fn open(path: &Path) -> Result<Self, JournalError> {
        let err = |source| JournalError {
            path: path.to_owned(),
            source,
        };
        if let Some(dir) = path.parent() {
            crate::credentials::create_private_dir(dir).map_err(err)?;
        }
        let mut journal = Self {
            path: path.to_owned(),
            file: open_append(path).map_err(err)?,
            states: HashMap::new(),
            clock: 0,
            lines: 0,
        };
        let bytes = std::fs::read(path).map_err(err)?;
        if bytes.last().is_some_and(|b| *b != b'\n') {
            // Finish a torn line so the next append starts on a line of its own.
            journal.file.write_all(b"\n").map_err(err)?;
            journal.file.sync_data().map_err(err)?;
        }
        for line in bytes.split(|b| *b == b'\n') {
            let line = String::from_utf8_lossy(line);
            if line.trim().is_empty() {
                continue;
            }
            match serde_json::from_str::<Line>(&line) {
                Ok(entry) => journal.apply(entry),
                Err(e) => tracing::warn!(error = %e, "journal: unreadable line skipped"),
            }
            journal.lines += 1;
        }
        if journal.lines > COMPACT_AFTER {
            journal.compact()?;
        }
        Ok(journal)
    }

    fn apply(&mut self, line: Line) {
        self.clock += 1;
        let (id, state) = match line {
            Line::Started {
                command_id,
                attempt,
                info,
                ..
            } => (command_id, State::Started { attempt, info }),
            Line::Done {
                command_id,
                attempt,
                report_id,
                ..
            } => {
                let info = match self.states.get(&command_id) {
                    Some((_, State::Started { info, .. } | State::Done { info, .. })) => {
                        info.clone()
                    }
                    _ => CommandInfo::default(),
                };
                (
                    command_id,
                    State::Done {
                        attempt,
                        report_id,
                        info,
                    },
                )
            }
            Line::Acked {
                command_id,
                attempt,
                ..
            } => {
                let report_id = match self.states.get(&command_id) {
                    Some((_, State::Done { report_id, .. } | State::Acked { report_id, .. })) => {
                        report_id.clone()
                    }
                    _ => String::new(),
                };
                (command_id, State::Acked { attempt, report_id })
            }
        };
        self.states.insert(id, (self.clock, state));
    }

    fn append(&mut self, line: Line) -> Result<(), JournalError> {
        let err = |source| JournalError {
            path: self.path.clone(),
            source,
        };
        let mut text = serde_json::to_string(&line).map_err(|e| err(std::io::Error::other(e)))?;
        text.push('\n');
        self.file.write_all(text.as_bytes()).map_err(err)?;
        self.file.sync_data().map_err(err)?;
        self.apply(line);
        self.lines += 1;
        if self.lines > COMPACT_AFTER {
            self.compact()?;
        }
        Ok(())
    }

    pub fn state(&self, command_id: &str) -> Option<&State> {
        self.states.get(command_id).map(|(_, s)| s)
    }

    /// Records that the command is about to run. Call before running it.
    pub fn started(
        &mut self,
        command_id: &str,
        attempt: u32,
        info: CommandInfo,
    ) -> Result<(), JournalError> {
        self.append(Line::Started {
            command_id: command_id.to_owned(),
            attempt,
            info,
            at: now(),
        })
    }

    /// Records that its report (`report_id`) is queued; `attempt` is the delivery to ack.
    pub fn done(
        &mut self,
        command_id: &str,
        attempt: u32,
        report_id: &str,
    ) -> Result<(), JournalError> {
        self.append(Line::Done {
            command_id: command_id.to_owned(),
            attempt,
            report_id: report_id.to_owned(),
            at: now(),
        })
    }

    /// Records that the server took the ack (or that no ack will ever be taken).
    pub fn acked(&mut self, command_id: &str, attempt: u32) -> Result<(), JournalError> {
        self.append(Line::Acked {
            command_id: command_id.to_owned(),
            attempt,
            at: now(),
        })
    }

    /// Commands that were started and never finished (oldest first): their fate is unknown.
    pub fn interrupted(&self) -> Vec<(String, u32, CommandInfo)> {
        let mut out: Vec<_> = self
            .states
            .iter()
            .filter_map(|(id, (at, s))| match s {
                State::Started { attempt, info } => Some((*at, id.clone(), *attempt, info.clone())),
                _ => None,
            })
            .collect();
        out.sort_by_key(|(at, ..)| *at);
        out.into_iter().map(|(_, id, a, i)| (id, a, i)).collect()
    }

    /// Commands whose report is queued but whose ack is not confirmed (oldest first).
    pub fn pending_acks(&self) -> Vec<(String, u32)> {
        let mut out: Vec<_> = self
            .states
            .iter()
            .filter_map(|(id, (at, s))| match s {
                State::Done { attempt, .. } => Some((*at, id.clone(), *attempt)),
                _ => None,
            })
            .collect();
        out.sort_by_key(|(at, ..)| *at);
        out.into_iter().map(|(_, id, a)| (id, a)).collect()
    }

    /// Rewrites the journal with only what is still needed.
    pub fn compact(&mut self) -> Result<(), JournalError> {
        let err = |source| JournalError {
            path: self.path.clone(),
            source,
        };
        let mut entries: Vec<(u64, String, State)> = self
            .states
            .iter()
            .map(|(id, (at, s))| (*at, id.clone(), s.clone()))
            .collect();
        entries.sort_by_key(|(at, ..)| *at);
        let acked = entries
            .iter()
            .filter(|(_, _, s)| matches!(s, State::Acked { .. }))
            .count();
        let mut skip_acked = acked.saturating_sub(KEEP_ACKED);
        let mut text = String::new();
        let mut kept = HashMap::new();
        let at = now();
        for (clock, id, state) in entries {
            if matches!(state, State::Acked { .. }) && skip_acked > 0 {
                skip_acked -= 1;
                continue;
            }
            let lines = match &state {
                State::Started { attempt, info } => vec![Line::Started {
                    command_id: id.clone(),
                    attempt: *attempt,
                    info: info.clone(),
                    at: at.clone(),
                }],
                State::Done {
                    attempt,
                    report_id,
                    info,
                } => vec![
                    Line::Started {
                        command_id: id.clone(),
                        attempt: *attempt,
                        info: info.clone(),
                        at: at.clone(),
                    },
                    Line::Done {
                        command_id: id.clone(),
                        attempt: *attempt,
                        report_id: report_id.clone(),
                        at: at.clone(),
                    },
                ],
                State::Acked { attempt, report_id } => vec![
                    Line::Done {
                        command_id: id.clone(),
                        attempt: *attempt,
                        report_id: report_id.clone(),
                        at: at.clone(),
                    },
                    Line::Acked {
                        command_id: id.clone(),
                        attempt: *attempt,
                        at: at.clone(),
                    },
                ],
            };
            for line in lines {
                text.push_str(
                    &serde_json::to_string(&line).map_err(|e| err(std::io::Error::other(e)))?,
                );
                text.push('\n');
            }
            kept.insert(id, (clock, state));
        }
        crate::credentials::write_private_atomic(&self.path, text.as_bytes()).map_err(err)?;
        self.file = open_append(&self.path).map_err(err)?;
        self.lines = text.lines().count();
        self.states = kept;
        Ok(())
    }
}

fn open_append(path: &Path) -> std::io::Result<std::fs::File> {
    let mut options = std::fs::OpenOptions::new();
    options.create(true).append(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    options.open(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> CommandInfo {
        CommandInfo {
            command_type: "fs.write".into(),
            correlation_id: Some("corr-1".into()),
            session_id: Some("device:dev_1".into()),
            risk: Some("green".into()),
        }
    }

    #[test]
    fn a_crash_between_executing_and_acking_does_not_run_it_again() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(FILE_NAME);
        {
            let mut j = Journal::open(&path).expect("open");
            assert_eq!(j.state("cmd_a"), None, "new commands run");
            j.started("cmd_a", 1, info()).expect("started");
            // … the command runs; the agent dies before its report is queued.
        }
        {
            let mut j = Journal::open(&path).expect("reopen");
            assert!(matches!(
                j.state("cmd_a"),
                Some(State::Started { attempt: 1, .. })
            ));
            assert_eq!(j.interrupted(), vec![("cmd_a".to_owned(), 1, info())]);
            // The runner reports it as interrupted instead of running it, then acks.
            j.done("cmd_a", 1, "r_cmd_a").expect("done");
            assert!(j.interrupted().is_empty());
            // The agent dies again before the ack.
        }
        {
            let mut j = Journal::open(&path).expect("reopen");
            assert_eq!(j.pending_acks(), vec![("cmd_a".to_owned(), 1)]);
            match j.state("cmd_a") {
                Some(State::Done { info: i, .. }) => assert_eq!(i, &info()),
                other => panic!("{other:?}"),
            }
            j.acked("cmd_a", 1).expect("acked");
        }
        let j = Journal::open(&path).expect("reopen");
        assert!(j.pending_acks().is_empty() && j.interrupted().is_empty());
        assert_eq!(
            j.state("cmd_a"),
            Some(&State::Acked {
                attempt: 1,
                report_id: "r_cmd_a".into()
            }),
            "a redelivery is recognised and not run"
        );
    }

    #[test]
    fn a_torn_last_line_is_ignored() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(FILE_NAME);
        {
            let mut j = Journal::open(&path).expect("open");
            j.started("cmd_a", 2, info()).expect("started");
        }
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .expect("open");
        f.write_all(br#"{"event":"done","command_id":"cmd_a","att"#)
            .expect("write");
        drop(f);
        let mut j = Journal::open(&path).expect("reopen");
        assert!(matches!(
            j.state("cmd_a"),
            Some(State::Started { attempt: 2, .. })
        ));
        // Appending after a torn line still yields readable lines.
        j.done("cmd_a", 2, "r").expect("done");
        drop(j);
        let j = Journal::open(&path).expect("reopen");
        assert!(matches!(j.state("cmd_a"), Some(State::Done { .. })));
    }

    #[test]
    fn compaction_keeps_what_matters() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(FILE_NAME);
        let mut j = Journal::open(&path).expect("open");
        j.started("open", 1, info()).expect("started");
        j.started("queued", 3, info()).expect("started");
        j.done("queued", 3, "r_queued").expect("done");
        for i in 0..(KEEP_ACKED + 5) {
            let id = format!("c{i}");
            j.started(&id, 1, CommandInfo::default()).expect("started");
            j.done(&id, 1, &format!("r{i}")).expect("done");
            j.acked(&id, 1).expect("acked");
        }
        j.compact().expect("compact");
        drop(j);
        let j = Journal::open(&path).expect("reopen");
        assert!(matches!(j.state("open"), Some(State::Started { .. })));
        assert!(matches!(
            j.state("queued"),
            Some(State::Done { attempt: 3, .. })
        ));
        assert_eq!(j.state("c0"), None, "the oldest acked are forgotten");
        assert!(matches!(
            j.state(&format!("c{}", KEEP_ACKED + 4)),
            Some(State::Acked { .. })
        ));
        let acked = (0..KEEP_ACKED + 5)
            .filter(|i| j.state(&format!("c{i}")).is_some())
            .count();
        assert_eq!(acked, KEEP_ACKED);
    }
}

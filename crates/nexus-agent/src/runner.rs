//! `nexus agent run`: the loop that keeps a paired device working.
//!
//! Three tasks share one [`Agent`]:
//!
//! - **commands**: long-polls `GET /devices/{id}/commands?wait=25`; for each command: journal
//!   `started` → [`authorize::check`] → [`executors::execute`] → a report (`causality.command_id`,
//!   `correlation_id`, `type: device.exec`; `done` on success, `blocked` on refusal or failure,
//!   output in `ui_hint.cards`) into the outbox → journal `done` → ack with the delivery's attempt
//!   → journal `acked`. Commands the journal shows as already handled are not run again.
//! - **reports**: delivers the outbox in order, in batches, whenever it has something.
//! - **heartbeat**: every `heartbeat_interval_secs`; also refreshes the token pair before it
//!   expires.
//!
//! Network failures back off (1 s → 60 s with jitter). A 401 triggers one token refresh; if the
//! server refuses the refresh token the device was removed: everything stops and [`run`] returns
//! [`RunError::Revoked`]. Cancelling the token given to [`run`] (SIGINT/SIGTERM) stops cleanly: a
//! running command finishes and is recorded, the outbox gets a last chance, the server hears an
//! `offline` heartbeat.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use nexus_api::HeartbeatRequest;
use nexus_domain::{DeviceCommand, DeviceId};
use serde_json::{Value, json};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::authorize::{self, Refusal, ServerKeys};
use crate::client::{ApiError, Backoff, Client, LONG_POLL_WAIT_SECS};
use crate::config::AgentConfig;
use crate::credentials::{self, Credentials};
use crate::executors::{self, ExecOutcome};
use crate::journal::{self, CommandInfo, Journal, State};
use crate::outbox::{self, Outbox};

/// Reports per push (the server takes at most 100).
const BATCH_REPORTS: usize = 50;
/// JSON bytes per push, beyond the first report (the server takes at most 1 MiB).
const BATCH_BYTES: usize = 512 * 1024;
/// Longest card body; longer output is cut with a note.
const MAX_CARD_BYTES: usize = 256 * 1024;
/// How often the last contact time is written to disk while running.
const CONTACT_PERSIST_EVERY: Duration = Duration::from_secs(60);
/// At shutdown, how long the outbox and the offline heartbeat may take.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// The flusher looks at the outbox at least this often even without a wake-up.
const FLUSH_IDLE: Duration = Duration::from_secs(30);

pub const REVOKED_MESSAGE: &str = "this device was removed from NEXUS (the server refused its credentials); pair again with `nexus agent pair --server URL`";

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("{REVOKED_MESSAGE}")]
    Revoked,
    #[error(
        "another `nexus agent run` is using {} (one agent per credentials file)",
        .0.display()
    )]
    AlreadyRunning(PathBuf),
    #[error(transparent)]
    Setup(#[from] anyhow::Error),
}

/// Knobs that are not policy: for tests and unusual deployments.
#[derive(Debug, Clone)]
pub struct Tuning {
    /// Cap of the retry backoff after network failures (default 60 s; the first retry waits 1 s).
    pub max_backoff: Duration,
}

impl Default for Tuning {
    fn default() -> Self {
        Self {
            max_backoff: Duration::from_secs(60),
        }
    }
}

impl Tuning {
    fn backoff(&self) -> Backoff {
        Backoff::new(Duration::from_secs(1), self.max_backoff)
    }
}

/// Where the agent keeps its files.
#[derive(Debug, Clone)]
pub struct Paths {
    pub credentials: PathBuf,
    pub state_dir: PathBuf,
}

impl Paths {
    pub fn for_credentials(credentials: &Path) -> Self {
        Self {
            credentials: credentials.to_owned(),
            state_dir: credentials::state_dir(credentials),
        }
    }

    pub fn outbox(&self) -> PathBuf {
        self.state_dir.join(outbox::DIR_NAME)
    }

    pub fn journal(&self) -> PathBuf {
        self.state_dir.join(journal::FILE_NAME)
    }

    pub fn lock(&self) -> PathBuf {
        self.state_dir.join("agent.lock")
    }
}

/// Holds the single-instance lock while alive.
#[derive(Debug)]
pub struct InstanceLock {
    _file: std::fs::File,
}

/// Takes the lock that keeps two agents off one credentials file (released when dropped,
/// also when the process dies).
pub fn lock_instance(paths: &Paths) -> Result<InstanceLock, RunError> {
    credentials::create_private_dir(&paths.state_dir)
        .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", paths.state_dir.display()))?;
    let path = paths.lock();
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| anyhow::anyhow!("cannot open {}: {e}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(InstanceLock { _file: file }),
        Err(std::fs::TryLockError::WouldBlock) => {
            Err(RunError::AlreadyRunning(paths.credentials.clone()))
        }
        Err(std::fs::TryLockError::Error(e)) => {
            Err(anyhow::anyhow!("cannot lock {}: {e}", path.display()).into())
        }
    }
}

/// Whether the token pair should be refreshed now. The access token is refreshed when less
/// than `max(lifetime/10, min(1 day, lifetime/2))` of it is left (for the default 7-day token:
/// one day before expiry; for a 1-minute test token: after 30 s); the same rule applies to the
/// refresh token, measured from the same issue time.
pub fn needs_refresh(creds: &Credentials, now: DateTime<Utc>) -> bool {
    let due = |expires: DateTime<Utc>| {
        let lifetime = (expires - creds.access_issued_at).max(chrono::TimeDelta::zero());
        let threshold = (lifetime / 10).max((lifetime / 2).min(chrono::TimeDelta::days(1)));
        expires - now < threshold
    };
    due(creds.access_expires_at) || due(creds.refresh_expires_at)
}

/// The report id of a command's result: one per command, so every retry, replay or restart
/// names the same report and the server stores it once.
pub fn report_id_for(command_id: &str) -> String {
    format!("r_{command_id}")
}

/// What the report about a command says happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Exec(ExecOutcome),
    /// The agent stopped while the command was running; it is not run again.
    Interrupted,
}

fn cut(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!(
        "{}\n[… {} more bytes not shown]",
        &text[..end],
        text.len() - end
    )
}

fn needs_for(code: &str) -> &'static str {
    match code {
        "unsigned_red" | "bad_signature" | "unknown_key" => {
            "an approval for this command from a NEXUS user, signed by the server this device paired with"
        }
        "approval_expired" => "a fresh approval (propose the command again)",
        "deadline_passed" => "propose the command again",
        "not_allowlisted" | "disabled" => {
            "a change to this device's local agent configuration, if the command should be allowed"
        }
        "path_escape" | "special_file" => {
            "a path inside the roots this device's configuration allows"
        }
        "too_large" => "a smaller request, or a larger limit in this device's configuration",
        "bad_params" => "corrected parameters",
        "not_found" => "a path that exists",
        "exists" => "another path, or mode overwrite",
        _ => "a look at this device's agent configuration",
    }
}

/// The AgentReport (DESIGN.md §4) for a command's outcome.
pub fn command_report(
    command_id: &str,
    device_id: &str,
    info: &CommandInfo,
    outcome: &Outcome,
    now: DateTime<Utc>,
) -> Value {
    let kind = if info.command_type.is_empty() {
        "command"
    } else {
        info.command_type.as_str()
    };
    let mut done = Vec::new();
    let mut blocked = Vec::new();
    let mut cards = Vec::new();
    let (result, code) = match outcome {
        Outcome::Exec(ExecOutcome::Done {
            title,
            detail,
            output,
        }) => {
            done.push(json!({"title": title, "detail": detail}));
            if let Some(output) = output {
                cards.push(
                    json!({"type": "output", "title": title, "body": cut(output, MAX_CARD_BYTES)}),
                );
            }
            ("done", None)
        }
        Outcome::Exec(ExecOutcome::Refused(Refusal { code, reason })) => {
            blocked.push(json!({
                "title": format!("Refused {kind}"),
                "why": format!("{code}: {reason}"),
                "needs": needs_for(code),
            }));
            ("refused", Some(*code))
        }
        Outcome::Exec(ExecOutcome::Failed { reason }) => {
            blocked.push(json!({
                "title": format!("{kind} failed"),
                "why": reason,
                "needs": "a look at the device, then propose the command again if it is still needed",
            }));
            ("failed", None)
        }
        Outcome::Interrupted => {
            blocked.push(json!({
                "title": format!("{kind} was interrupted"),
                "why": "interrupted; not re-run: the agent stopped while this command was running, so whether it took effect is unknown",
                "needs": "a look at the device, then propose the command again if it is still needed",
            }));
            ("interrupted", None)
        }
    };
    let level = match info.risk.as_deref() {
        Some("red") => "red",
        Some("yellow") => "yellow",
        _ => "green",
    };
    let session = info
        .session_id
        .clone()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| format!("device:{device_id}"));
    json!({
        "meta": {
            "mode": "focused",
            "approval_level": level,
            "confidence": 1.0,
            "report_id": report_id_for(command_id),
            "created_at": now.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            "session_id": session,
            "user_id": device_id,
            "causality": {
                "correlation_id": info.correlation_id.clone().unwrap_or_default(),
                "command_id": command_id,
                "ask_id": null,
                "type": "device.exec",
            },
        },
        "done": done,
        "blocked": blocked,
        "ui_hint": {"surface": "sidecar", "cards": cards, "actions": []},
        // Extension (kept by the server): the machine-readable outcome.
        "exec": {"command_id": command_id, "type": kind, "result": result, "code": code},
    })
}

fn command_info(cmd: &DeviceCommand) -> CommandInfo {
    CommandInfo {
        command_type: cmd.command_type.clone(),
        correlation_id: cmd.client_context.correlation_id.clone(),
        session_id: cmd.client_context.session_id.clone(),
        risk: Some(cmd.policy.risk.lowercase().to_owned()),
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Everything the tasks share.
pub struct Agent {
    client: Client,
    paths: Paths,
    device_id: String,
    device: DeviceId,
    /// Pinned at pairing; grows only by endorsements from keys already here (`learn_keys`).
    keys: Mutex<ServerKeys>,
    config: AgentConfig,
    tuning: Tuning,
    creds: Mutex<Credentials>,
    outbox: Mutex<Outbox>,
    journal: Mutex<Journal>,
    refresh_lock: tokio::sync::Mutex<()>,
    outbox_wake: Notify,
    stop: CancellationToken,
    revoked: AtomicBool,
    online: AtomicBool,
    contact_saved: Mutex<Instant>,
}

impl Agent {
    /// Loads everything `run` needs; fails with a clear message when something is off.
    pub fn open(
        paths: Paths,
        config: AgentConfig,
        tuning: Tuning,
        stop: CancellationToken,
    ) -> Result<Arc<Self>, RunError> {
        let creds = Credentials::load(&paths.credentials).map_err(anyhow::Error::from)?;
        if creds.revoked_at.is_some() {
            return Err(RunError::Revoked);
        }
        let keys = ServerKeys::from_jwks(&creds.server_keys).map_err(|e| {
            anyhow::anyhow!(
                "the server keys stored at pairing are unusable ({e}); pair this device again"
            )
        })?;
        let device = DeviceId::parse("device_id", &creds.device_id)
            .map_err(|e| anyhow::anyhow!("the stored device id is invalid: {e}"))?;
        let client = Client::new(&creds.server_url, creds.ca_cert.as_deref())
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let outbox =
            Outbox::open(&paths.outbox(), config.outbox_max).map_err(|e| anyhow::anyhow!("{e}"))?;
        let journal = Journal::open(&paths.journal()).map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(Arc::new(Self {
            client,
            device_id: creds.device_id.clone(),
            device,
            keys: Mutex::new(keys),
            config,
            tuning,
            creds: Mutex::new(creds),
            outbox: Mutex::new(outbox),
            journal: Mutex::new(journal),
            refresh_lock: tokio::sync::Mutex::new(()),
            outbox_wake: Notify::new(),
            stop,
            revoked: AtomicBool::new(false),
            online: AtomicBool::new(true),
            contact_saved: Mutex::new(Instant::now()),
            paths,
        }))
    }

    fn token(&self) -> String {
        lock(&self.creds).access_token.clone()
    }

    fn is_revoked(&self) -> bool {
        self.revoked.load(Ordering::SeqCst)
    }

    pub fn queued_reports(&self) -> usize {
        lock(&self.outbox).len()
    }

    /// The server answered: remember when (written to disk now and then).
    fn contact(&self) {
        if !self.online.swap(true, Ordering::SeqCst) {
            tracing::info!(server = %self.client.base_url(), "in contact with the server again");
        }
        let mut creds = lock(&self.creds);
        creds.last_contact_at = Some(Utc::now());
        let mut saved = lock(&self.contact_saved);
        if saved.elapsed() >= CONTACT_PERSIST_EVERY {
            *saved = Instant::now();
            if let Err(e) = creds.save_if_present(&self.paths.credentials) {
                tracing::warn!(error = %e, "cannot save the agent state");
            }
        }
    }

    fn lost_contact(&self, what: &str, error: &ApiError) {
        if self.online.swap(false, Ordering::SeqCst) {
            tracing::warn!(server = %self.client.base_url(), error = %error,
                "lost contact with the server ({what}); retrying with backoff, reports are kept on disk");
        } else {
            tracing::debug!(error = %error, what, "server still unreachable");
        }
    }

    fn save_creds(&self) {
        let creds = lock(&self.creds).clone();
        match creds.save_if_present(&self.paths.credentials) {
            Ok(true) => {}
            Ok(false) => tracing::warn!(
                file = %self.paths.credentials.display(),
                "the credentials file is gone (unpaired?); not writing it back"
            ),
            Err(e) => tracing::error!(error = %e, "cannot save the credentials"),
        }
    }

    fn mark_revoked(&self, error: &ApiError) {
        if !self.revoked.swap(true, Ordering::SeqCst) {
            tracing::error!(error = %error, "{REVOKED_MESSAGE}");
            lock(&self.creds).revoked_at = Some(Utc::now());
            self.save_creds();
        }
        self.stop.cancel();
    }

    /// Trades the refresh token for a new pair. With `failed_token`, only if that is still the
    /// current access token (another task may have refreshed already): two refreshes with one
    /// refresh token would make the server revoke the device.
    async fn refresh(&self, failed_token: Option<&str>) -> Result<(), ApiError> {
        let _guard = self.refresh_lock.lock().await;
        let (device_id, refresh_token, current) = {
            let c = lock(&self.creds);
            (
                c.device_id.clone(),
                c.refresh_token.clone(),
                c.access_token.clone(),
            )
        };
        if failed_token.is_some_and(|failed| failed != current) {
            return Ok(());
        }
        match self.client.refresh(&device_id, &refresh_token).await {
            Ok(r) => {
                let parse = |s: &str| {
                    DateTime::parse_from_rfc3339(s)
                        .map(|t| t.with_timezone(&Utc))
                        .map_err(|e| ApiError::Decode(format!("bad expiry {s:?}: {e}")))
                };
                let expires = parse(&r.expires_at);
                let refresh_expires = parse(&r.refresh_expires_at);
                {
                    let mut c = lock(&self.creds);
                    c.access_token = r.device_token;
                    c.refresh_token = r.refresh_token;
                    c.access_issued_at = Utc::now();
                    // Keep going on a malformed expiry: the new tokens are what counts.
                    c.access_expires_at =
                        expires.unwrap_or_else(|_| Utc::now() + chrono::TimeDelta::hours(1));
                    c.refresh_expires_at = refresh_expires
                        .unwrap_or_else(|_| Utc::now() + chrono::TimeDelta::hours(1));
                }
                self.save_creds();
                self.contact();
                tracing::info!("device tokens refreshed");
                Ok(())
            }
            Err(e) if e.status() == Some(401) => {
                self.mark_revoked(&e);
                Err(e)
            }
            Err(e) => Err(e),
        }
    }

    /// Runs a device call; on 401 refreshes the tokens once and tries again.
    async fn authed<T, F, Fut>(&self, call: F) -> Result<T, ApiError>
    where
        F: Fn(String) -> Fut,
        Fut: std::future::Future<Output = Result<T, ApiError>>,
    {
        let token = self.token();
        match call(token.clone()).await {
            Err(e) if e.is_unauthorized() => {
                tracing::info!(
                    code = e.code().unwrap_or(""),
                    "device token refused; refreshing"
                );
                self.refresh(Some(&token)).await?;
                call(self.token()).await
            }
            other => other,
        }
    }

    // --- commands --------------------------------------------------------------------------

    /// Settles what an earlier run left: interrupted commands are reported (not re-run).
    pub fn recover(&self) {
        let interrupted = lock(&self.journal).interrupted();
        for (command_id, attempt, info) in interrupted {
            tracing::warn!(command_id = %command_id, "command was interrupted by a stop; not running it again");
            self.finish(&command_id, attempt, &info, &Outcome::Interrupted);
        }
        self.outbox_wake.notify_one();
    }

    /// Queues the report of a command durably and records it as done. The report is pushed
    /// after the ack (see [`Agent::handle`]), so watchers see delivered → acked → result.
    fn finish(&self, command_id: &str, attempt: u32, info: &CommandInfo, outcome: &Outcome) {
        let report = command_report(command_id, &self.device_id, info, outcome, Utc::now());
        let report_id = report_id_for(command_id);
        match lock(&self.outbox).enqueue(&report) {
            Ok(_) => {}
            Err(e) => {
                tracing::error!(command_id, error = %e, "cannot queue the command's report");
                return;
            }
        }
        if let Err(e) = lock(&self.journal).done(command_id, attempt, &report_id) {
            tracing::error!(command_id, error = %e, "cannot record the command as done");
        }
    }

    async fn handle(&self, cmd: DeviceCommand) {
        let command_id = cmd.command_id.as_str().to_owned();
        let attempt = cmd.attempt.max(1);
        let info = command_info(&cmd);
        let prior = lock(&self.journal).state(&command_id).cloned();
        match prior {
            Some(State::Done { .. } | State::Acked { .. }) => {
                tracing::info!(command_id = %command_id, attempt, "command delivered again; already handled, not running it again");
                self.ack(&command_id, attempt).await;
                return;
            }
            Some(State::Started { .. }) => {
                tracing::warn!(command_id = %command_id, "command was interrupted earlier; not running it again");
                self.finish(&command_id, attempt, &info, &Outcome::Interrupted);
                self.ack(&command_id, attempt).await;
                self.outbox_wake.notify_one();
                return;
            }
            None => {}
        }
        // A grant by a key we do not know yet: the server may have rotated its keys since
        // pairing. Learn endorsed keys first (before the journal says "started").
        let unknown_key = cmd
            .approval
            .as_ref()
            .is_some_and(|grant| !lock(&self.keys).knows(&grant.kid));
        if unknown_key {
            self.learn_keys().await;
        }
        if let Err(e) = lock(&self.journal).started(&command_id, attempt, info.clone()) {
            // Without a record we could run it twice; better not at all (the server times it out).
            tracing::error!(command_id = %command_id, error = %e, "cannot record the command; not running it");
            return;
        }
        let now_ms = Utc::now().timestamp_millis();
        let verdict = authorize::check(&cmd, &self.device, &lock(&self.keys), &self.config, now_ms);
        let outcome = match verdict {
            Err(refusal) => ExecOutcome::Refused(refusal),
            Ok(()) => executors::execute(&cmd, &self.config).await,
        };
        match &outcome {
            ExecOutcome::Done { title, .. } => {
                tracing::info!(command_id = %command_id, command_type = %cmd.command_type, title = %title, "command done");
            }
            ExecOutcome::Refused(r) => {
                tracing::warn!(command_id = %command_id, command_type = %cmd.command_type, code = r.code, reason = %r.reason, "command refused");
            }
            ExecOutcome::Failed { reason } => {
                tracing::warn!(command_id = %command_id, command_type = %cmd.command_type, reason = %reason, "command failed");
            }
        }
        self.finish(&command_id, attempt, &info, &Outcome::Exec(outcome));
        self.ack(&command_id, attempt).await;
        self.outbox_wake.notify_one();
    }

    /// Fetches the server's keys and adopts those endorsed by a pinned key (see
    /// `ServerKeys::adopt_endorsed`), saving them with the credentials. Best effort: without the
    /// server, the keys we have are all we trust anyway.
    async fn learn_keys(&self) {
        let offered = match self.client.server_keys().await {
            Ok(offered) => offered,
            Err(e) => {
                tracing::debug!(error = %e, "cannot fetch the server keys");
                return;
            }
        };
        let (adopted, jwks) = {
            let mut keys = lock(&self.keys);
            let adopted = keys.adopt_endorsed(&offered.keys, &offered.endorsements);
            (adopted, keys.to_jwks())
        };
        if adopted.is_empty() {
            return;
        }
        tracing::info!(kids = %adopted.join(", "), "adopted server keys endorsed by a pinned key");
        lock(&self.creds).server_keys = jwks;
        self.save_creds();
    }

    /// Sends the ack for a handled command (once: a confirmed ack is journaled). Returns false
    /// when it should be tried again later.
    async fn ack(&self, command_id: &str, attempt: u32) -> bool {
        let result = self
            .authed(|token| async move {
                self.client
                    .ack(&self.device_id, &token, command_id, attempt)
                    .await
            })
            .await;
        let settled = match result {
            Ok(()) => {
                self.contact();
                tracing::debug!(command_id, attempt, "acked");
                true
            }
            // The command ended, was delivered again, or is gone: no ack will ever be taken.
            Err(e) if matches!(e.status(), Some(400 | 404 | 409 | 422)) => {
                self.contact();
                tracing::info!(command_id, attempt, answer = %e, "ack not taken; nothing more to do");
                true
            }
            Err(e) => {
                if e.is_transient() {
                    self.lost_contact("ack", &e);
                } else {
                    tracing::warn!(command_id, error = %e, "ack failed; will retry");
                }
                false
            }
        };
        if settled && let Err(e) = lock(&self.journal).acked(command_id, attempt) {
            tracing::error!(command_id, error = %e, "cannot record the ack");
        }
        settled
    }

    async fn retry_pending_acks(&self) {
        let pending = lock(&self.journal).pending_acks();
        for (command_id, attempt) in pending {
            if self.stop.is_cancelled() || !self.ack(&command_id, attempt).await {
                return;
            }
        }
    }

    async fn command_loop(&self) {
        let mut backoff = self.tuning.backoff();
        let mut cursor = lock(&self.creds).cursor.clone();
        while !self.stop.is_cancelled() {
            self.retry_pending_acks().await;
            let pulled = tokio::select! {
                () = self.stop.cancelled() => break,
                r = self.authed(|token| {
                    let cursor = cursor.clone();
                    async move {
                        self.client
                            .commands(&self.device_id, &token, cursor.as_deref(), LONG_POLL_WAIT_SECS)
                            .await
                    }
                }) => r,
            };
            match pulled {
                Ok(page) => {
                    backoff.reset();
                    self.contact();
                    if !page.commands.is_empty() {
                        tracing::info!(count = page.commands.len(), "commands received");
                    }
                    for cmd in page.commands {
                        // A command that started runs to its end, even during shutdown.
                        self.handle(cmd).await;
                    }
                    if cursor.as_deref() != Some(page.next_cursor.as_str()) {
                        cursor = Some(page.next_cursor);
                        lock(&self.creds).cursor = cursor.clone();
                        self.save_creds();
                    }
                }
                Err(_) if self.is_revoked() => break,
                Err(e) => {
                    if e.is_transient() {
                        self.lost_contact("commands", &e);
                    } else {
                        tracing::warn!(error = %e, "pulling commands failed");
                    }
                    self.pause(backoff.next_delay()).await;
                }
            }
        }
    }

    /// Sleeps, or returns early on stop.
    async fn pause(&self, delay: Duration) {
        tokio::select! {
            () = self.stop.cancelled() => {}
            () = tokio::time::sleep(delay) => {}
        }
    }

    // --- reports ---------------------------------------------------------------------------

    /// Pushes the oldest waiting reports once. `Ok(true)` when something was delivered (or
    /// dropped as undeliverable), `Ok(false)` when the outbox is empty.
    async fn flush_once(&self, batch_limit: &mut usize) -> Result<bool, ApiError> {
        let batch = lock(&self.outbox).peek(*batch_limit, BATCH_BYTES);
        if batch.is_empty() {
            return Ok(false);
        }
        let reports: Vec<Value> = batch.iter().map(|p| p.report.clone()).collect();
        let seqs: Vec<u64> = batch.iter().map(|p| p.seq).collect();
        let result = self
            .authed(|token| {
                let reports = reports.clone();
                async move {
                    self.client
                        .push_reports(&self.device_id, &token, reports)
                        .await
                }
            })
            .await;
        match result {
            Ok(answer) => {
                self.contact();
                *batch_limit = BATCH_REPORTS;
                if let Err(e) = lock(&self.outbox).remove(&seqs) {
                    tracing::error!(error = %e, "cannot remove delivered reports from the outbox");
                }
                tracing::debug!(count = answer.count, "reports delivered");
                Ok(true)
            }
            Err(e) if matches!(e.status(), Some(400 | 413 | 422)) => {
                if batch.len() > 1 {
                    // Find the one the server will not take: send them one by one.
                    *batch_limit = 1;
                } else {
                    tracing::error!(report_id = %batch[0].report_id, error = %e,
                        "the server will never accept this report; dropped");
                    if let Err(e) = lock(&self.outbox).remove(&seqs) {
                        tracing::error!(error = %e, "cannot remove a report from the outbox");
                    }
                }
                Ok(true)
            }
            Err(e) => Err(e),
        }
    }

    async fn report_loop(&self) {
        let mut backoff = self.tuning.backoff();
        let mut batch_limit = BATCH_REPORTS;
        while !self.stop.is_cancelled() {
            match self.flush_once(&mut batch_limit).await {
                Ok(true) => backoff.reset(),
                Ok(false) => {
                    tokio::select! {
                        () = self.stop.cancelled() => break,
                        () = self.outbox_wake.notified() => {}
                        () = tokio::time::sleep(FLUSH_IDLE) => {}
                    }
                }
                Err(_) if self.is_revoked() => break,
                Err(e) => {
                    if e.is_transient() {
                        self.lost_contact("reports", &e);
                    } else {
                        tracing::warn!(error = %e, "delivering reports failed");
                    }
                    self.pause(backoff.next_delay()).await;
                }
            }
        }
    }

    // --- heartbeat -------------------------------------------------------------------------

    fn heartbeat_body(&self, status: &str) -> HeartbeatRequest {
        HeartbeatRequest {
            status: status.to_owned(),
            metrics: json!({"queued_reports": self.queued_reports()}),
            agent_version: Some(env!("CARGO_PKG_VERSION").to_owned()),
        }
    }

    async fn heartbeat_loop(&self) {
        let interval = Duration::from_secs(self.config.heartbeat_interval_secs.max(1));
        let mut refresh_backoff = self.tuning.backoff();
        let mut refresh_not_before = Instant::now();
        while !self.stop.is_cancelled() {
            let due = needs_refresh(&lock(&self.creds), Utc::now());
            if due && Instant::now() >= refresh_not_before {
                match self.refresh(None).await {
                    Ok(()) => refresh_backoff.reset(),
                    Err(_) if self.is_revoked() => break,
                    Err(e) => {
                        if e.is_transient() {
                            self.lost_contact("token refresh", &e);
                        } else {
                            tracing::warn!(error = %e, "token refresh failed; will retry");
                        }
                        refresh_not_before = Instant::now() + refresh_backoff.next_delay();
                    }
                }
            }
            let body = self.heartbeat_body("online");
            let sent = self
                .authed(|token| {
                    let body = body.clone();
                    async move { self.client.heartbeat(&self.device_id, &token, &body).await }
                })
                .await;
            match sent {
                Ok(_) => self.contact(),
                Err(_) if self.is_revoked() => break,
                Err(e) if e.is_transient() => self.lost_contact("heartbeat", &e),
                Err(e) => tracing::warn!(error = %e, "heartbeat refused"),
            }
            self.pause(interval).await;
        }
    }

    /// After a stop: one last chance for the outbox, an `offline` heartbeat, state on disk.
    async fn shutdown(&self) {
        if !self.is_revoked() {
            let drain = async {
                let mut limit = BATCH_REPORTS;
                while let Ok(true) = self.flush_once(&mut limit).await {}
                let body = self.heartbeat_body("offline");
                let token = self.token();
                let _ = self.client.heartbeat(&self.device_id, &token, &body).await;
            };
            if tokio::time::timeout(SHUTDOWN_GRACE, drain).await.is_err() {
                tracing::info!("server not reachable during shutdown");
            }
            self.save_creds();
        }
        let queued = self.queued_reports();
        if queued > 0 {
            tracing::info!(
                queued,
                "reports kept in the outbox; they are delivered at the next start"
            );
        }
    }
}

/// Runs the agent until `stop` is cancelled (Ok) or the device is found revoked.
pub async fn run(
    paths: Paths,
    config: AgentConfig,
    tuning: Tuning,
    stop: CancellationToken,
) -> Result<(), RunError> {
    let _lock = lock_instance(&paths)?;
    let agent = Agent::open(paths.clone(), config, tuning, stop.clone())?;
    {
        let c = lock(&agent.creds);
        tracing::info!(server = %c.server_url, device_id = %c.device_id, tenant = %c.tenant,
            queued_reports = agent.queued_reports(), "nexus agent running");
    }
    agent.recover();
    // Catch up with key rotations made while this device was away (off the start-up path: the
    // server may be unreachable right now).
    let learner = agent.clone();
    tokio::spawn(async move { learner.learn_keys().await });
    let (a, b, c) = (agent.clone(), agent.clone(), agent.clone());
    let tasks = [
        tokio::spawn(async move { a.command_loop().await }),
        tokio::spawn(async move { b.report_loop().await }),
        tokio::spawn(async move { c.heartbeat_loop().await }),
    ];
    for task in tasks {
        if let Err(e) = task.await {
            tracing::error!(error = %e, "an agent task ended abnormally");
            stop.cancel();
        }
    }
    agent.shutdown().await;
    if agent.is_revoked() {
        if !paths.credentials.exists() {
            // `nexus agent unpair` ran while we were running: clear what it could not.
            let _ = std::fs::remove_dir_all(paths.outbox());
            let _ = std::fs::remove_file(paths.journal());
        }
        return Err(RunError::Revoked);
    }
    tracing::info!("nexus agent stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeDelta;

    fn creds(issued: DateTime<Utc>, access: TimeDelta, refresh: TimeDelta) -> Credentials {
        Credentials {
            server_url: "http://x".into(),
            device_id: "dev_1".into(),
            device_name: "pc".into(),
            tenant: "a:b".into(),
            org_id: "a".into(),
            project_id: "b".into(),
            access_token: "nxd_x".into(),
            access_issued_at: issued,
            access_expires_at: issued + access,
            refresh_token: "nxr_x".into(),
            refresh_expires_at: issued + refresh,
            server_keys: json!({"keys": []}),
            ca_cert: None,
            cursor: None,
            paired_at: issued,
            last_contact_at: None,
            revoked_at: None,
        }
    }

    #[test]
    fn refresh_is_due_a_day_before_a_week_long_token_expires() {
        let t0 = Utc::now();
        let c = creds(t0, TimeDelta::days(7), TimeDelta::days(30));
        assert!(!needs_refresh(&c, t0));
        assert!(!needs_refresh(&c, t0 + TimeDelta::days(5)));
        assert!(needs_refresh(
            &c,
            t0 + TimeDelta::days(6) + TimeDelta::hours(1)
        ));
        assert!(needs_refresh(&c, t0 + TimeDelta::days(8)), "expired");
    }

    #[test]
    fn refresh_of_short_tokens_waits_half_their_life() {
        let t0 = Utc::now();
        let c = creds(t0, TimeDelta::seconds(60), TimeDelta::days(30));
        assert!(!needs_refresh(&c, t0 + TimeDelta::seconds(20)));
        assert!(needs_refresh(&c, t0 + TimeDelta::seconds(31)));
        // A refresh token about to expire triggers it too.
        let c = creds(
            t0,
            TimeDelta::days(7),
            TimeDelta::days(7) + TimeDelta::hours(2),
        );
        assert!(needs_refresh(
            &c,
            t0 + TimeDelta::days(6) + TimeDelta::hours(12)
        ));
    }

    fn info() -> CommandInfo {
        CommandInfo {
            command_type: "fs.read".into(),
            correlation_id: Some("corr-9".into()),
            session_id: Some("device:dev_1".into()),
            risk: Some("green".into()),
        }
    }

    fn validate(report: &Value) {
        nexus_domain::report::ValidatedReport::parse(report)
            .unwrap_or_else(|e| panic!("{e:?}: {report}"));
    }

    #[test]
    fn reports_follow_the_contract() {
        let now = Utc::now();
        let done = command_report(
            "cmd_1",
            "dev_1",
            &info(),
            &Outcome::Exec(ExecOutcome::Done {
                title: "Read a.txt".into(),
                detail: "5 bytes".into(),
                output: Some("hello".into()),
            }),
            now,
        );
        validate(&done);
        assert_eq!(done["meta"]["report_id"], "r_cmd_1");
        assert_eq!(done["meta"]["session_id"], "device:dev_1");
        assert_eq!(
            done["meta"]["causality"],
            json!({"correlation_id": "corr-9", "command_id": "cmd_1", "ask_id": null, "type": "device.exec"})
        );
        assert_eq!(done["done"][0]["title"], "Read a.txt");
        assert_eq!(done["blocked"], json!([]));
        assert_eq!(done["ui_hint"]["cards"][0]["body"], "hello");

        let refused = command_report(
            "cmd_2",
            "dev_1",
            &info(),
            &Outcome::Exec(ExecOutcome::Refused(Refusal::new(
                "path_escape",
                "../etc is outside",
            ))),
            now,
        );
        validate(&refused);
        assert_eq!(refused["done"], json!([]));
        assert!(
            refused["blocked"][0]["why"]
                .as_str()
                .is_some_and(|w| w.starts_with("path_escape: "))
        );
        assert_eq!(refused["exec"]["code"], "path_escape");

        let interrupted = command_report(
            "cmd_3",
            "dev_1",
            &CommandInfo::default(),
            &Outcome::Interrupted,
            now,
        );
        validate(&interrupted);
        assert_eq!(interrupted["meta"]["session_id"], "device:dev_1");
        assert!(
            interrupted["blocked"][0]["why"]
                .as_str()
                .is_some_and(|w| w.starts_with("interrupted; not re-run"))
        );
    }

    #[test]
    fn long_output_is_cut_on_a_char_boundary() {
        let text = "é".repeat(10);
        let short = cut(&text, 5);
        assert!(short.starts_with("éé") && short.contains("more bytes not shown"));
        assert_eq!(cut("abc", 5), "abc");
    }

    #[test]
    fn one_agent_per_credentials_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let paths = Paths::for_credentials(&dir.path().join("agent.json"));
        let first = lock_instance(&paths).expect("first");
        assert!(matches!(
            lock_instance(&paths),
            Err(RunError::AlreadyRunning(_))
        ));
        drop(first);
        lock_instance(&paths).expect("after release");
    }
}

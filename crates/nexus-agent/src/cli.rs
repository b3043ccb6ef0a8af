//! `nexus agent …`: pair, run, status, unpair.
//!
//! Files: the credentials (`--config`, env `NEXUS_AGENT_CONFIG`, default
//! `~/.config/nexus/agent.json` or the platform equivalent), the local policy next to it
//! (`--policy`, env `NEXUS_AGENT_POLICY`, default `<dir>/<stem>-config.json`, e.g.
//! `agent-config.json`; see [`crate::config`]) and the state directory `<dir>/<stem>.state/`
//! (outbox, journal, lock).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use chrono::{DateTime, Utc};
use clap::{Args, Subcommand, ValueEnum};
use nexus_api::{CompletePairingRequest, CompletePairingResponse, StartPairingRequest};
use tokio_util::sync::CancellationToken;

use crate::client::{ApiError, Backoff, Client};
use crate::config::AgentConfig;
use crate::credentials::{self, Credentials};
use crate::runner::{self, Paths, RunError};

/// How often `pair` asks whether the code was confirmed.
const PAIR_POLL: Duration = Duration::from_secs(2);

#[derive(Debug, Args)]
#[command(about = "The device agent: pair this computer with a NEXUS server and run its commands")]
pub struct AgentArgs {
    /// Credentials file (default: the OS config directory, e.g. ~/.config/nexus/agent.json).
    #[arg(long, global = true, env = "NEXUS_AGENT_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Local policy file: what this device allows (default: <config dir>/<name>-config.json,
    /// e.g. agent-config.json next to agent.json; missing means the safe defaults).
    #[arg(long, global = true, env = "NEXUS_AGENT_POLICY", value_name = "FILE")]
    pub policy: Option<PathBuf>,
    #[command(subcommand)]
    pub command: AgentCommand,
}

#[derive(Debug, Subcommand)]
pub enum AgentCommand {
    /// Pair this device: show a code, wait until a user confirms it, save the credentials.
    Pair(PairArgs),
    /// Run: heartbeat, receive commands, execute what the local policy allows, report.
    Run(RunArgs),
    /// Show the pairing and the agent's state.
    Status(StatusArgs),
    /// Remove this device from the server (best effort) and delete the local credentials.
    Unpair,
}

#[derive(Debug, Args)]
pub struct PairArgs {
    /// Server URL, e.g. https://nexus.example.com (default: `server` in the policy file).
    #[arg(long, env = "NEXUS_SERVER_URL")]
    pub server: Option<String>,
    /// Device name shown to the confirming user (default: the host name).
    #[arg(long)]
    pub name: Option<String>,
    /// Device type reported to the server (default: <os>_companion).
    #[arg(long)]
    pub device_type: Option<String>,
    /// Pre-select the organization (with --project); the confirming user must belong to it.
    #[arg(long, requires = "project")]
    pub org: Option<String>,
    /// Pre-select the project (with --org).
    #[arg(long, requires = "org")]
    pub project: Option<String>,
    /// PEM file of an extra CA to trust for the server (self-signed deployments); remembered.
    #[arg(long, env = "NEXUS_AGENT_CA_CERT", value_name = "FILE")]
    pub ca_cert: Option<PathBuf>,
    /// Replace existing credentials (the old device stays on the server until removed there).
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Log format on stderr.
    #[arg(
        long,
        value_enum,
        default_value = "text",
        env = "NEXUS_AGENT_LOG_FORMAT"
    )]
    pub log_format: LogFormat,
    /// Log filter (tracing EnvFilter syntax), e.g. info or nexus_agent=debug.
    #[arg(long, env = "NEXUS_AGENT_LOG", default_value = "info")]
    pub log: String,
    /// Cap of the retry backoff in seconds (tests shorten it; the first retry waits 1 s).
    #[arg(long, env = "NEXUS_AGENT_MAX_BACKOFF_SECS", default_value_t = 60, hide = true,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub max_backoff_secs: u64,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// The files one agent uses.
#[derive(Debug, Clone)]
pub struct Files {
    pub credentials: PathBuf,
    pub policy: PathBuf,
}

impl Files {
    pub fn resolve(args: &AgentArgs) -> anyhow::Result<Self> {
        let credentials = match &args.config {
            Some(path) => path.clone(),
            None => credentials::default_path().ok_or_else(|| {
                anyhow!(
                    "cannot find the OS config directory (HOME/APPDATA unset); pass --config FILE"
                )
            })?,
        };
        let policy = args
            .policy
            .clone()
            .unwrap_or_else(|| default_policy_path(&credentials));
        Ok(Self {
            credentials,
            policy,
        })
    }

    pub fn paths(&self) -> Paths {
        Paths::for_credentials(&self.credentials)
    }
}

/// `<dir>/<stem>-config.json` for credentials at `<dir>/<stem>.json`.
pub fn default_policy_path(credentials: &Path) -> PathBuf {
    let stem = credentials
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "agent".to_owned());
    credentials.with_file_name(format!("{stem}-config.json"))
}

/// Entry point of `nexus agent`.
pub fn main(args: AgentArgs) -> anyhow::Result<()> {
    let files = Files::resolve(&args)?;
    match args.command {
        AgentCommand::Run(run) => {
            init_logging(run.log_format, &run.log);
            let tuning = runner::Tuning {
                max_backoff: Duration::from_secs(run.max_backoff_secs),
            };
            runtime()?.block_on(run_agent(&files, tuning))
        }
        AgentCommand::Pair(pair) => {
            init_logging(LogFormat::Text, "warn");
            runtime()?.block_on(pair_device(&files, pair))
        }
        AgentCommand::Status(status) => show_status(&files, &status),
        AgentCommand::Unpair => {
            init_logging(LogFormat::Text, "warn");
            runtime()?.block_on(unpair(&files))
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// Logs go to stderr: human-readable by default, one JSON object per line with `json`.
pub fn init_logging(format: LogFormat, filter: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => {
            use std::io::IsTerminal;
            builder
                .with_target(false)
                .with_ansi(std::io::stderr().is_terminal())
                .try_init()
        }
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
    };
}

fn load_policy(files: &Files) -> anyhow::Result<AgentConfig> {
    AgentConfig::load(&files.policy).map_err(|e| anyhow!("{e}"))
}

/// Cancelled on SIGINT (Ctrl-C) or SIGTERM.
fn stop_on_signals() -> CancellationToken {
    let stop = CancellationToken::new();
    let token = stop.clone();
    tokio::spawn(async move {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            match signal(SignalKind::terminate()) {
                Ok(mut term) => {
                    tokio::select! {
                        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: stopping"),
                        _ = term.recv() => tracing::info!("SIGTERM: stopping"),
                    }
                }
                Err(_) => {
                    let _ = tokio::signal::ctrl_c().await;
                    tracing::info!("SIGINT: stopping");
                }
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
            tracing::info!("Ctrl-C: stopping");
        }
        token.cancel();
    });
    stop
}

async fn run_agent(files: &Files, tuning: runner::Tuning) -> anyhow::Result<()> {
    let config = load_policy(files)?;
    let stop = stop_on_signals();
    match runner::run(files.paths(), config, tuning, stop).await {
        Ok(()) => Ok(()),
        Err(RunError::Setup(e)) => Err(e),
        Err(e) => Err(anyhow!(e)),
    }
}

// --- pair ------------------------------------------------------------------------------------

fn host_name() -> String {
    let from_env = ["HOSTNAME", "COMPUTERNAME"]
        .iter()
        .find_map(|v| std::env::var(v).ok())
        .filter(|s| !s.trim().is_empty());
    let from_file = || {
        ["/proc/sys/kernel/hostname", "/etc/hostname"]
            .iter()
            .find_map(|p| std::fs::read_to_string(p).ok())
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
    };
    let from_command = || {
        std::process::Command::new("hostname")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
    };
    from_env
        .or_else(from_file)
        .or_else(from_command)
        .unwrap_or_else(|| "nexus-device".to_owned())
}

const DIGITS: [[&str; 5]; 11] = [
    [" ### ", "#   #", "#   #", "#   #", " ### "],
    ["  #  ", " ##  ", "  #  ", "  #  ", " ### "],
    [" ### ", "#   #", "  ## ", " #   ", "#####"],
    ["#### ", "    #", " ### ", "    #", "#### "],
    ["#   #", "#   #", "#####", "    #", "    #"],
    ["#####", "#    ", "#### ", "    #", "#### "],
    [" ### ", "#    ", "#### ", "#   #", " ### "],
    ["#####", "    #", "   # ", "  #  ", "  #  "],
    [" ### ", "#   #", " ### ", "#   #", " ### "],
    [" ### ", "#   #", " ####", "    #", " ### "],
    ["     ", "     ", " ### ", "     ", "     "],
];

/// The code in big ASCII digits (five lines), for reading across a room.
pub fn banner(code: &str) -> String {
    let glyphs: Vec<&[&str; 5]> = code
        .chars()
        .filter_map(|c| match c {
            '0'..='9' => c.to_digit(10).and_then(|d| DIGITS.get(d as usize)),
            '-' => DIGITS.get(10),
            _ => None,
        })
        .collect();
    let mut out = String::new();
    for row in 0..5 {
        let line: Vec<&str> = glyphs.iter().map(|g| g[row]).collect();
        out.push_str("    ");
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

fn parse_time(raw: &str) -> anyhow::Result<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(raw)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| anyhow!("the server sent an invalid time {raw:?}: {e}"))
}

fn credentials_from(
    server_url: &str,
    name: &str,
    ca_cert: Option<PathBuf>,
    done: CompletePairingResponse,
) -> anyhow::Result<Credentials> {
    let now = Utc::now();
    Ok(Credentials {
        server_url: server_url.to_owned(),
        device_id: done.device_id,
        device_name: name.to_owned(),
        tenant: done.tenant,
        org_id: done.org_id,
        project_id: done.project_id,
        access_token: done.device_token,
        access_issued_at: now,
        access_expires_at: parse_time(&done.expires_at)?,
        refresh_token: done.refresh_token,
        refresh_expires_at: parse_time(&done.refresh_expires_at)?,
        server_keys: done.server_keys,
        ca_cert,
        cursor: None,
        paired_at: now,
        last_contact_at: Some(now),
        revoked_at: None,
    })
}

async fn pair_device(files: &Files, args: PairArgs) -> anyhow::Result<()> {
    match Credentials::load(&files.credentials) {
        Ok(existing) if existing.revoked_at.is_none() && !args.force => bail!(
            "this agent is already paired as {} with {} ({}); run `nexus agent unpair` first, or pass --force",
            existing.device_id,
            existing.server_url,
            files.credentials.display()
        ),
        Ok(_) | Err(credentials::CredentialsError::NotPaired(_)) => {}
        Err(e) if args.force => eprintln!("replacing unreadable credentials: {e}"),
        Err(e) => bail!("{e} (pass --force to replace it)"),
    }
    let policy = load_policy(files)?;
    let server = args
        .server
        .clone()
        .or_else(|| policy.server.clone())
        .ok_or_else(|| anyhow!("which server? pass --server https://nexus.example.com"))?;
    let server_url = crate::client::normalize_server_url(&server).map_err(|e| anyhow!(e))?;
    let ca_cert = match &args.ca_cert {
        Some(p) => {
            Some(std::path::absolute(p).with_context(|| format!("resolving {}", p.display()))?)
        }
        None => None,
    };
    let client = Client::new(&server_url, ca_cert.as_deref()).map_err(|e| anyhow!("{e}"))?;
    let name = args.name.clone().unwrap_or_else(host_name);
    let request = StartPairingRequest {
        device_name: name.clone(),
        device_type: args
            .device_type
            .clone()
            .unwrap_or_else(|| format!("{}_companion", std::env::consts::OS)),
        capabilities: crate::executors::EXECUTOR_TYPES
            .iter()
            .filter(|t| !policy.is_disabled(t))
            .map(|t| (*t).to_owned())
            .collect(),
        agent_version: Some(env!("CARGO_PKG_VERSION").to_owned()),
    };
    let tenant = args.org.as_deref().zip(args.project.as_deref());
    let started = client
        .start_pairing(&request, tenant)
        .await
        .map_err(|e| anyhow!("cannot start pairing with {server_url}: {e}"))?;
    let expires = parse_time(&started.expires_at)?;
    let minutes = ((expires - Utc::now()).num_seconds().max(0) + 59) / 60;
    println!();
    println!("To pair this device, sign in to NEXUS at {server_url} and enter this code:");
    println!();
    print!("{}", banner(&started.pairing_code));
    println!();
    println!("pairing code: {}", started.pairing_code);
    println!(
        "fingerprint:  {}   (check that NEXUS shows the same before confirming)",
        started.fingerprint
    );
    println!(
        "expires:      {} (in about {minutes} min)",
        expires.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    );
    println!();
    println!("Waiting for confirmation… (Ctrl-C to cancel)");

    let complete = CompletePairingRequest {
        pairing_id: started.pairing_id.clone(),
        device_nonce: started.device_nonce.clone(),
    };
    let stop = stop_on_signals();
    let mut backoff = Backoff::default();
    let done = loop {
        let mut delay = PAIR_POLL;
        match client.complete_pairing(&complete).await {
            Ok(done) => break done,
            Err(e) if e.code() == Some("pairing_not_confirmed") => backoff.reset(),
            Err(e) if e.code() == Some("pairing_expired") => {
                bail!(
                    "the pairing code expired before anyone confirmed it; run `nexus agent pair` again"
                )
            }
            Err(e @ ApiError::Network(_)) => {
                delay = backoff.next_delay().max(PAIR_POLL);
                eprintln!(
                    "cannot reach the server ({e}); retrying in {}s",
                    delay.as_secs()
                );
            }
            Err(e) if e.is_transient() => delay = backoff.next_delay().max(PAIR_POLL),
            Err(e) => bail!("pairing failed: {e}"),
        }
        if Utc::now() > expires + chrono::TimeDelta::seconds(30) {
            bail!(
                "the pairing code expired before anyone confirmed it; run `nexus agent pair` again"
            );
        }
        tokio::select! {
            () = stop.cancelled() => bail!("pairing cancelled"),
            () = tokio::time::sleep(delay) => {}
        }
    };
    let creds = credentials_from(&server_url, &name, ca_cert, done)?;
    // A new pairing starts with a clean slate: nothing queued for the old device is sent.
    let paths = files.paths();
    if paths.state_dir.exists() {
        let _lock = runner::lock_instance(&paths).map_err(|e| anyhow!("{e}"))?;
        let _ = std::fs::remove_dir_all(paths.outbox());
        let _ = std::fs::remove_file(paths.journal());
    }
    creds.save(&files.credentials)?;
    if !files.policy.exists() {
        let defaults = AgentConfig {
            server: Some(server_url.clone()),
            ..AgentConfig::default()
        };
        if let Err(e) = defaults.save(&files.policy) {
            eprintln!("note: could not write the default policy file: {e}");
        }
    }
    println!();
    println!(
        "Paired: device {} in {} ({}).",
        creds.device_id, creds.tenant, creds.device_name
    );
    println!(
        "Credentials saved to {} (readable only by you).",
        files.credentials.display()
    );
    println!(
        "Local policy: {} (edit it to allow file roots, shell binaries, apps).",
        files.policy.display()
    );
    println!("Start the agent with: nexus agent run");
    Ok(())
}

// --- status ----------------------------------------------------------------------------------

fn ago(t: DateTime<Utc>, now: DateTime<Utc>) -> String {
    let d = now - t;
    let (future, d) = if d < chrono::TimeDelta::zero() {
        (true, -d)
    } else {
        (false, d)
    };
    let s = d.num_seconds();
    let text = if s < 120 {
        format!("{s}s")
    } else if s < 7200 {
        format!("{}m", s / 60)
    } else if s < 172_800 {
        format!("{}h", s / 3600)
    } else {
        format!("{}d", s / 86_400)
    };
    if future {
        format!("in {text}")
    } else {
        format!("{text} ago")
    }
}

/// Reports waiting in the outbox, counted without touching it (a running agent owns it).
fn count_queued(paths: &Paths) -> usize {
    std::fs::read_dir(paths.outbox())
        .map(|dir| {
            dir.filter_map(Result::ok)
                .filter(|e| {
                    let name = e.file_name().to_string_lossy().into_owned();
                    !name.starts_with('.') && name.ends_with(".json")
                })
                .count()
        })
        .unwrap_or(0)
}

fn show_status(files: &Files, args: &StatusArgs) -> anyhow::Result<()> {
    let creds = Credentials::load(&files.credentials)?;
    let paths = files.paths();
    let queued = count_queued(&paths);
    // Probing the lock must not create the state directory of an agent that never ran.
    let running = paths.state_dir.exists()
        && matches!(
            runner::lock_instance(&paths),
            Err(RunError::AlreadyRunning(_))
        );
    let now = Utc::now();
    let t = |d: DateTime<Utc>| d.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    if args.json {
        let out = serde_json::json!({
            "server": creds.server_url,
            "device_id": creds.device_id,
            "device_name": creds.device_name,
            "tenant": creds.tenant,
            "paired_at": t(creds.paired_at),
            "token_expires_at": t(creds.access_expires_at),
            "refresh_expires_at": t(creds.refresh_expires_at),
            "last_contact_at": creds.last_contact_at.map(t),
            "queued_reports": queued,
            "running": running,
            "revoked_at": creds.revoked_at.map(t),
            "credentials": files.credentials,
            "policy": files.policy,
            "state_dir": paths.state_dir,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!("server:          {}", creds.server_url);
    println!(
        "device:          {} ({})",
        creds.device_id, creds.device_name
    );
    println!("tenant:          {}", creds.tenant);
    println!(
        "paired:          {} ({})",
        t(creds.paired_at),
        ago(creds.paired_at, now)
    );
    println!(
        "token expires:   {} ({}); refresh token {}",
        t(creds.access_expires_at),
        ago(creds.access_expires_at, now),
        t(creds.refresh_expires_at)
    );
    match creds.last_contact_at {
        Some(at) => println!("last contact:    {} ({})", t(at), ago(at, now)),
        None => println!("last contact:    never"),
    }
    println!("queued reports:  {queued}");
    println!(
        "agent:           {}",
        if running { "running" } else { "not running" }
    );
    if let Some(at) = creds.revoked_at {
        println!(
            "REVOKED:         {} — this device was removed from NEXUS; pair again",
            t(at)
        );
    }
    println!("credentials:     {}", files.credentials.display());
    println!("policy:          {}", files.policy.display());
    println!("state:           {}", paths.state_dir.display());
    Ok(())
}

// --- unpair ----------------------------------------------------------------------------------

async fn unpair(files: &Files) -> anyhow::Result<()> {
    let mut creds = Credentials::load(&files.credentials)?;
    let server_note = if creds.revoked_at.is_some() {
        "the server had already removed it".to_owned()
    } else {
        match remove_on_server(&mut creds).await {
            Ok(()) => format!("removed from {}", creds.server_url),
            Err(e) if e.status() == Some(401) || e.status() == Some(404) => {
                "the server had already removed it".to_owned()
            }
            Err(e) => format!(
                "could not remove it on the server ({e}); a NEXUS admin can delete device {} there",
                creds.device_id
            ),
        }
    };
    Credentials::remove(&files.credentials)?;
    let paths = files.paths();
    let running = matches!(
        runner::lock_instance(&paths),
        Err(RunError::AlreadyRunning(_))
    );
    if !running {
        let _ = std::fs::remove_dir_all(&paths.state_dir);
    }
    println!("Unpaired device {}: {server_note}.", creds.device_id);
    println!(
        "Local credentials deleted ({}).",
        files.credentials.display()
    );
    if running {
        println!("The running agent stops on its own once the server refuses it.");
    }
    Ok(())
}

/// `POST /devices/{id}/unpair`, refreshing an expired token first if needed.
async fn remove_on_server(creds: &mut Credentials) -> Result<(), ApiError> {
    let client = Client::new(&creds.server_url, creds.ca_cert.as_deref())?;
    match client.unpair(&creds.device_id, &creds.access_token).await {
        Err(e) if e.code() == Some("token_expired") => {
            let fresh = client
                .refresh(&creds.device_id, &creds.refresh_token)
                .await?;
            creds.access_token = fresh.device_token;
            client.unpair(&creds.device_id, &creds.access_token).await
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_banner_draws_every_digit() {
        let art = banner("123-456");
        assert_eq!(art.lines().count(), 5);
        assert!(art.lines().all(|l| l.len() <= 4 + 7 * 5 + 6 * 2));
        let all = banner("0123456789");
        assert_eq!(all.lines().count(), 5);
        assert!(all.contains('#'));
    }

    #[test]
    fn files_resolve_next_to_the_credentials() {
        assert_eq!(
            default_policy_path(Path::new("/x/agent.json")),
            PathBuf::from("/x/agent-config.json")
        );
        assert_eq!(
            default_policy_path(Path::new("/x/laptop.json")),
            PathBuf::from("/x/laptop-config.json")
        );
    }

    #[test]
    fn times_read_well() {
        let now = Utc::now();
        assert_eq!(ago(now - chrono::TimeDelta::seconds(5), now), "5s ago");
        assert_eq!(ago(now + chrono::TimeDelta::days(6), now), "in 6d");
    }
}

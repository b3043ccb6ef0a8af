//! `nexus`: one binary for the control plane (`nexus server`), the device agent (`nexus agent`)
//! and the admin commands. `main` stays thin: parse the command line, set up logging, pick the backend, run.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use nexus_bus_redis::{RedisAttempts, RedisBus};
use nexus_core::attempts::{AttemptCounters, LocalAttempts};
use nexus_core::bus::EventBus;
use nexus_server::ServerConfig;
use nexus_store::Store;
use nexus_store_postgres::{PostgresConfig, PostgresStore};
use nexus_store_sqlite::{SqliteConfig, SqliteStore};

mod admin;

#[derive(Debug, Parser)]
#[command(
    name = "nexus",
    version,
    about = "NEXUS: the control plane for AI agents on people's own computers"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the control plane (HTTP API + live streams). Zero configuration: data goes to
    /// ./nexus-data in an embedded SQLite database.
    Server(Box<ServerConfig>),
    /// Apply database migrations. For PostgreSQL run it as the schema owner; it grants the
    /// application role what the servers need. The embedded SQLite store migrates itself.
    Migrate(MigrateArgs),
    /// Administer accounts, organizations, projects and signing keys on the configured store
    /// (stop a server that uses the same SQLite data directory first, or use PostgreSQL).
    #[command(subcommand)]
    Admin(admin::AdminCommand),
    /// The audit trail.
    #[command(subcommand)]
    Audit(admin::AuditCommand),
    /// The device agent: `nexus agent pair --server URL`, then `nexus agent run`.
    Agent(nexus_agent::cli::AgentArgs),
    /// Print the OpenAPI 3.1 document of the HTTP API (or, with --markdown, the API reference).
    Openapi {
        /// Render the Markdown reference (docs/API.md) instead of JSON.
        #[arg(long)]
        markdown: bool,
    },
}

#[derive(Debug, clap::Args)]
struct MigrateArgs {
    /// PostgreSQL URL of the schema owner; unset: migrate the SQLite store in --data-dir.
    #[arg(long, env = "NEXUS_DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// The role the servers connect as (must exist; no BYPASSRLS, not the owner).
    #[arg(long, env = "NEXUS_APP_ROLE", default_value = nexus_store_postgres::DEFAULT_APP_ROLE)]
    app_role: String,
    /// Data directory of the embedded store.
    #[arg(long, env = "NEXUS_DATA_DIR", default_value = "./nexus-data")]
    data_dir: std::path::PathBuf,
}

pub(crate) fn is_postgres(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://")
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

async fn migrate(args: MigrateArgs) -> anyhow::Result<()> {
    match args.database_url.as_deref() {
        Some(url) if is_postgres(url) => {
            let options = nexus_store_postgres::MigrateOptions {
                app_role: args.app_role,
            };
            nexus_store_postgres::PostgresStore::migrate_with(url, &options).await?;
        }
        Some(_) => anyhow::bail!(
            "--database-url must be a postgres:// URL (leave it unset for the embedded store)"
        ),
        None => {
            std::fs::create_dir_all(&args.data_dir)?;
            let _lock = lock_data_dir(&args.data_dir)?;
            SqliteStore::open(&args.data_dir.join("nexus.db"), SqliteConfig::default())
                .await?
                .close()
                .await;
        }
    }
    println!("migrations applied");
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Openapi { markdown } => {
            let document = serde_json::to_value(nexus_server::routes::openapi())?;
            if markdown {
                print!("{}", nexus_server::apidoc::markdown(&document));
            } else {
                println!("{}", serde_json::to_string_pretty(&document)?);
            }
            Ok(())
        }
        Command::Migrate(args) => {
            nexus_server::telemetry::init("warn");
            runtime()?.block_on(migrate(args))
        }
        Command::Admin(command) => {
            nexus_server::telemetry::init("warn");
            runtime()?.block_on(admin::run(command))
        }
        Command::Audit(command) => {
            nexus_server::telemetry::init("warn");
            runtime()?.block_on(admin::audit(command))
        }
        Command::Agent(args) => nexus_agent::cli::main(args),
        Command::Server(config) => {
            nexus_server::telemetry::init(&config.log);
            raise_open_file_limit();
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?
                .block_on(run_server(*config))
        }
    }
}

async fn run_server(config: ServerConfig) -> anyhow::Result<()> {
    let mut _lock = None;
    let store: Arc<dyn Store> = match config.database_url.as_deref() {
        Some(url) if is_postgres(url) => {
            let pool = PostgresConfig {
                max_connections: config.db_max_connections,
                acquire_timeout: config.db_acquire_timeout,
                ..PostgresConfig::default()
            };
            Arc::new(PostgresStore::connect(url, pool).await?)
        }
        Some(_) => anyhow::bail!(
            "--database-url must be a postgres:// URL (leave it unset for the embedded store)"
        ),
        None => {
            std::fs::create_dir_all(&config.data_dir).with_context(|| {
                format!("creating the data directory {}", config.data_dir.display())
            })?;
            _lock = Some(lock_data_dir(&config.data_dir)?);
            Arc::new(
                SqliteStore::open(
                    &config.data_dir.join("nexus.db"),
                    SqliteConfig {
                        read_connections: config.db_read_connections,
                        ..SqliteConfig::default()
                    },
                )
                .await?,
            )
        }
    };
    let (bus, attempts): (Option<Arc<dyn EventBus>>, Arc<dyn AttemptCounters>) =
        match &config.redis_url {
            Some(url) => (
                Some(Arc::new(RedisBus::new(url)?)),
                Arc::new(RedisAttempts::new(url)?),
            ),
            None => (None, Arc::new(LocalAttempts)),
        };
    let listener =
        listen(config.listen).with_context(|| format!("listening on {}", config.listen))?;
    nexus_server::launch(config, store, bus, attempts, listener, shutdown_signal()).await
}

/// Binds with a deep accept queue: thousands of SSE clients reconnect at once after a restart,
/// and the default backlog (128) drops their SYNs, which costs each a 1 s retransmit.
fn listen(address: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    const BACKLOG: u32 = 4096;
    let socket = if address.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(address)?;
    socket.listen(BACKLOG)
}

/// Two servers on one embedded database would corrupt each other's view; refuse the second.
pub(crate) fn lock_data_dir(dir: &Path) -> anyhow::Result<std::fs::File> {
    let path = dir.join("nexus.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    file.try_lock().map_err(|_| {
        anyhow::anyhow!(
            "another NEXUS server is using the data directory {}",
            dir.display()
        )
    })?;
    Ok(file)
}

/// Every SSE subscriber holds a socket; the default soft limit (often 1024) is far too low.
fn raise_open_file_limit() {
    if let Ok((soft, hard)) = rlimit::Resource::NOFILE.get()
        && soft < hard
        && let Err(e) = rlimit::Resource::NOFILE.set(hard, hard)
    {
        tracing::warn!(error = %e, "could not raise the open file limit");
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for SIGINT");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
}

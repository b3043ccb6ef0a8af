//! The NEXUS HTTP server: axum routes over the services of `nexus-core`, problem+json errors,
//! SSE, TLS and graceful shutdown. It receives its store from the caller, so it never names a
//! concrete backend.

pub mod apidoc;
pub mod config;
pub mod error;
pub mod extract;
pub mod middleware;
pub mod routes;
pub mod serve;
pub mod state;
pub mod telemetry;
pub mod tls;

use std::future::Future;
use std::sync::Arc;

use axum::http::{HeaderName, HeaderValue, Method, header};
use nexus_core::Services;
use nexus_core::bus::{EventBus, LocalOnly};
use nexus_store::Store;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::set_header::SetResponseHeaderLayer;

pub use config::ServerConfig;
use state::{AppState, Lifecycle};

/// The HTTP application with all its layers.
pub fn app(state: AppState) -> axum::Router {
    let config = state.config.clone();
    let mut router = routes::router(config.dev)
        .with_state(state)
        .layer(SetResponseHeaderLayer::if_not_present(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ))
        .layer(SetResponseHeaderLayer::if_not_present(
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        ))
        .layer(SetResponseHeaderLayer::if_not_present(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(
                "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
            ),
        ));
    if config.tls_enabled() {
        // HSTS only means something over TLS; sent over plain HTTP it would be ignored or misleading.
        router = router.layer(SetResponseHeaderLayer::if_not_present(
            header::STRICT_TRANSPORT_SECURITY,
            HeaderValue::from_static("max-age=63072000; includeSubDomains"),
        ));
    }
    let origins: Vec<HeaderValue> = config
        .cors_origins
        .iter()
        .filter_map(|o| HeaderValue::from_str(o.trim()).ok())
        .collect();
    if !origins.is_empty() {
        router = router.layer(
            CorsLayer::new()
                .allow_origin(AllowOrigin::list(origins))
                .allow_methods([Method::GET, Method::POST, Method::PATCH, Method::DELETE])
                .allow_headers([
                    header::CONTENT_TYPE,
                    header::AUTHORIZATION,
                    HeaderName::from_static("x-org-id"),
                    HeaderName::from_static("x-project-id"),
                    HeaderName::from_static("x-correlation-id"),
                    HeaderName::from_static("last-event-id"),
                ])
                .expose_headers([HeaderName::from_static("x-correlation-id")]),
        );
    }
    router.layer(axum::middleware::from_fn(middleware::request_context))
}

/// Runs the server on `listener` until `shutdown` resolves, then shuts down gracefully:
/// readiness turns 503, (after `shutdown_delay`) new connections are refused, SSE streams end,
/// in-flight requests finish within `drain_timeout`, and the store is flushed and closed.
pub async fn launch(
    config: ServerConfig,
    store: Arc<dyn Store>,
    bus: Option<Arc<dyn EventBus>>,
    attempts: Arc<dyn nexus_core::attempts::AttemptCounters>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let tls = match (&config.tls_cert, &config.tls_key) {
        (Some(cert), Some(key)) => Some(tls::acceptor(cert, key)?),
        _ => None,
    };
    let keys_dir = config.keys_dir();
    let keys = load_keys(keys_dir.clone()).await?;
    let secrets = load_data_key(keys_dir.clone()).await?;
    let config = Arc::new(config);
    let lifecycle = Lifecycle::default();
    let replicated = bus.is_some();
    let services = Services::new(
        store.clone(),
        config.core(),
        bus.unwrap_or_else(|| Arc::new(LocalOnly)),
        keys,
        secrets,
        attempts,
    );
    bootstrap(&services, &config).await?;
    let stop = lifecycle.streams_closing.clone();
    let zero = std::time::Duration::ZERO;
    // Rotated key files (`nexus admin keys rotate`) are picked up without a restart.
    let (auth, period) = (services.auth.clone(), config.keys_reload_interval);
    spawn_every(period, period, stop.clone(), move || {
        reload_keys(auth.clone(), keys_dir.clone())
    });
    // Expires approvals nobody decided (auto-deny) and times out commands within a second of
    // their deadline, whether or not anyone asks. Every replica sweeps; each change is a
    // compare-and-set, so they never double up.
    let commands = services.commands.clone();
    spawn_every(
        zero,
        nexus_core::commands::SWEEP_EVERY,
        stop.clone(),
        move || {
            let commands = commands.clone();
            async move {
                if let Err(e) = commands.sweep(nexus_domain::time::now_millis()).await {
                    tracing::warn!(error = %e, "command sweeper failed; retrying");
                }
            }
        },
    );
    // Deletes ended pairings, tokens and sessions (`nexus_core::housekeeping`).
    let housekeeping = services.housekeeping.clone();
    spawn_every(
        zero,
        config.housekeeping_interval,
        stop.clone(),
        move || {
            let housekeeping = housekeeping.clone();
            async move {
                if let Err(e) = housekeeping.prune(nexus_domain::time::now_millis()).await {
                    tracing::warn!(error = %e, "housekeeping failed; trying again later");
                }
            }
        },
    );
    if replicated {
        // A lost bus message is only noticed when a later event of its session arrives; this
        // bounds how long a quiet session can miss one.
        let hub = services.hub.clone();
        spawn_every(zero, config.resync_interval, stop, move || {
            let hub = hub.clone();
            async move { hub.resync_all().await }
        });
    }
    let state = AppState {
        services,
        config: config.clone(),
        lifecycle: lifecycle.clone(),
    };
    let address = listener.local_addr()?;
    tracing::info!(%address, tls = tls.is_some(), dev = config.dev, "NEXUS is listening");

    let stop_accepting = {
        let lifecycle = lifecycle.clone();
        let delay = config.shutdown_delay;
        async move {
            shutdown.await;
            tracing::info!("shutdown requested: draining");
            lifecycle.start_draining();
            tokio::time::sleep(delay).await;
        }
    };
    let graceful = serve::accept_until(listener, app(state), tls, stop_accepting).await;
    lifecycle.streams_closing.cancel();
    if tokio::time::timeout(config.drain_timeout, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(timeout = ?config.drain_timeout, "drain timeout reached; closing remaining connections");
    }
    store.close().await;
    tracing::info!("NEXUS stopped");
    Ok(())
}

async fn load_keys(dir: std::path::PathBuf) -> anyhow::Result<nexus_auth::jwt::KeyRing> {
    tokio::task::spawn_blocking(move || {
        nexus_auth::jwt::KeyRing::load_or_create(&dir).map_err(|e| {
            anyhow::anyhow!("loading the token signing keys from {}: {e}", dir.display())
        })
    })
    .await?
}

async fn load_data_key(dir: std::path::PathBuf) -> anyhow::Result<nexus_auth::sealed::SecretBox> {
    tokio::task::spawn_blocking(move || {
        nexus_auth::sealed::SecretBox::load_or_create(&dir).map_err(|e| {
            anyhow::anyhow!(
                "loading the data encryption key from {}: {e}",
                dir.display()
            )
        })
    })
    .await?
}

/// First start on an empty store: org `default`, project `default` and an admin.
/// Runs `task` every `period` until `stop`, the first time after `first`. A run that outlasts
/// the period delays the next one instead of letting runs pile up.
fn spawn_every<F, Fut>(
    first: std::time::Duration,
    period: std::time::Duration,
    stop: CancellationToken,
    mut task: F,
) where
    F: FnMut() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    tokio::spawn(async move {
        let period = period.max(std::time::Duration::from_millis(100));
        let mut every = tokio::time::interval_at(tokio::time::Instant::now() + first, period);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = every.tick() => task().await,
            }
        }
    });
}

/// Picks up rotated key files (`nexus admin keys rotate`, or a re-mounted secret) without a
/// restart; tokens signed by keys still in the directory stay valid.
async fn reload_keys(auth: nexus_core::auth::AuthService, dir: std::path::PathBuf) {
    let reloaded = tokio::task::spawn_blocking(move || nexus_auth::jwt::KeyRing::load(&dir)).await;
    match reloaded {
        Ok(Ok(Some(ring))) => auth.replace_keys(ring),
        Ok(Ok(None)) => {
            tracing::warn!("the signing key directory is empty; keeping the current keys")
        }
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "reloading signing keys failed; keeping the current ones")
        }
        Err(e) => {
            tracing::warn!(error = %e, "reloading signing keys failed; keeping the current ones")
        }
    }
}

async fn bootstrap(services: &Services, config: &ServerConfig) -> anyhow::Result<()> {
    let created = services
        .accounts
        .bootstrap(
            config.bootstrap_admin_email.as_deref(),
            config.bootstrap_admin_password.as_deref(),
            nexus_domain::time::now_millis(),
        )
        .await
        .map_err(|e| anyhow::anyhow!("creating the first admin: {e}"))?;
    let Some(created) = created else {
        return Ok(());
    };
    match created.generated_password {
        Some(password) => {
            let file = config.data_dir.join("initial-admin-password");
            write_secret_file(&file, &password)?;
            // Printed once on purpose (not logged): the operator needs it to sign in.
            eprintln!(
                "\nNEXUS created the first admin account:\n  email:    {}\n  password: {}\n  (also in {}; change it after signing in)\n",
                created.email.as_str(),
                password,
                file.display()
            );
        }
        None => {
            tracing::info!(email = %created.email.masked(), "created the first admin account");
        }
    }
    Ok(())
}

fn write_secret_file(path: &std::path::Path, contents: &str) -> anyhow::Result<()> {
    use std::io::Write;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options
        .open(path)
        .map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))?;
    file.write_all(contents.as_bytes())?;
    file.write_all(b"\n")?;
    Ok(())
}

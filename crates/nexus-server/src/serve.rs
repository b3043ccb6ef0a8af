//! The accept loop. Written on hyper-util directly (rather than `axum::serve`) because we need
//! TLS and plain HTTP behind one graceful-shutdown mechanism, and per-connection client addresses.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
const HTTP2_KEEP_ALIVE: Duration = Duration::from_secs(60);

/// Serves until `stop_accepting` resolves, then closes the listener (new connections are refused)
/// and returns a handle that waits for open connections to finish.
pub async fn accept_until(
    listener: TcpListener,
    app: Router,
    tls: Option<TlsAcceptor>,
    stop_accepting: impl Future<Output = ()>,
) -> GracefulShutdown {
    let graceful = GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    if tls.is_none() {
        // Without TLS there is no ALPN to offer h2, and the version-sniffing auto connection
        // costs several KiB per connection more than plain HTTP/1.1 (thousands of idle SSE
        // streams add up). Behind a TLS-terminating proxy, connections are HTTP/1.1 anyway.
        builder = builder.http1_only();
    }
    // A client that trickles its headers (slowloris) must not hold a connection forever.
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(HTTP2_KEEP_ALIVE);
    let builder = Arc::new(builder);
    tokio::pin!(stop_accepting);
    loop {
        let (tcp, remote) = tokio::select! {
            biased;
            () = &mut stop_accepting => break,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Typically EMFILE under a connection flood: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let service =
            app.clone()
                .map_request(move |mut request: hyper::Request<hyper::body::Incoming>| {
                    request
                        .extensions_mut()
                        .insert(ConnectInfo::<SocketAddr>(remote));
                    request.map(axum::body::Body::new)
                });
        let service = TowerToHyperService::new(service);
        let watcher = graceful.watcher();
        let builder = builder.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let result = match tls {
                None => {
                    watcher
                        .watch(
                            builder
                                .serve_connection_with_upgrades(TokioIo::new(tcp), service)
                                .into_owned(),
                        )
                        .await
                }
                Some(acceptor) => {
                    match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => {
                            watcher
                                .watch(
                                    builder
                                        .serve_connection_with_upgrades(
                                            TokioIo::new(stream),
                                            service,
                                        )
                                        .into_owned(),
                                )
                                .await
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(%remote, error = %e, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(%remote, "TLS handshake timed out");
                            return;
                        }
                    }
                }
            };
            if let Err(e) = result {
                tracing::debug!(%remote, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful
}

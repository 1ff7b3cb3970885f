//! The public listener's connection loop: HTTP/1 and HTTP/2 on one port, a deadline on
//! slow clients, and the graceful shutdown.
//!
//! Slow clients: a connection must deliver a request's headers within the client
//! timeout or it is closed (hyper's header read timeout, which also bounds an idle
//! keep-alive connection), and then its body within the same time or it is answered
//! 408. So a slow-loris client holds a connection for seconds, not forever.
//!
//! Shutdown, on SIGTERM or SIGINT: `/health` turns to 503 `draining` and the listener
//! closes at once, so no new connection is accepted; every open connection finishes the
//! request it is serving (streams run to their end) and closes. Requests still running
//! when the grace period ends are ended by the scheduler with an error event. Then
//! `serve` returns and the process exits 0.

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tower_http::timeout::RequestBodyTimeoutLayer;

use super::AppState;

/// Time left, after the grace period's cancellations, for the ended streams to be
/// written out before the process exits anyway.
const FLUSH_AFTER_CANCEL: Duration = Duration::from_secs(5);

/// Serves `router` on `listener` until `shutdown` resolves, then drains for up to
/// `grace` (see the module documentation). Client deadlines are `state.limits`'.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    state: Arc<AppState>,
    grace: Duration,
    shutdown: impl Future<Output = ()>,
) {
    let client_timeout = state.limits.client_timeout;
    let router = router.layer(RequestBodyTimeoutLayer::new(client_timeout));
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(client_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(client_timeout);
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // Out of file descriptors and the like: back off, keep serving.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let service = TowerToHyperService::new(router.clone());
        let connection = builder
            .serve_connection(TokioIo::new(stream), service)
            .into_owned();
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    // Closed before `draining` shows, so whoever sees `draining` knows no connection
    // can be accepted any more.
    drop(listener);
    state.draining.store(true, Ordering::Release);
    tracing::info!(
        connections = graceful.count(),
        grace_s = grace.as_secs_f64(),
        "shutting down: listener closed, draining in-flight requests"
    );
    let drained = graceful.shutdown();
    tokio::pin!(drained);
    tokio::select! {
        () = &mut drained => tracing::info!("drained: every connection closed"),
        () = tokio::time::sleep(grace) => {
            tracing::warn!("grace period over: ending the requests still running");
            state.batcher.cancel_all();
            if tokio::time::timeout(FLUSH_AFTER_CANCEL, drained).await.is_err() {
                tracing::warn!("connections still open after the cancellations; exiting anyway");
            }
        }
    }
}

/// Resolves on SIGTERM or SIGINT (Ctrl-C).
pub async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
        () = terminate => tracing::info!("SIGTERM received"),
    }
}

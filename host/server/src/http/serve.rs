//! The public listener's connection loop: HTTP/1 and HTTP/2 on one port, at most
//! `--max-connections` connections at once (past it, new ones wait in the listen
//! backlog), each living by the deadlines of [`super::conn`], and the graceful shutdown.
//!
//! Shutdown, on SIGTERM or SIGINT: the listener closes at once, so no new connection is
//! accepted, then `/health` turns to 503 `draining`; every open connection finishes the
//! requests it is serving (streams run to their end) and closes. Requests still running
//! when the grace period ends are ended by the scheduler with an error event. Then
//! `serve` returns and the process exits 0.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

use super::conn::{serve_connection, ConnLimits};
use super::AppState;

/// Time left, after the grace period's cancellations, for the ended streams to be
/// written out before the process exits anyway.
const FLUSH_AFTER_CANCEL: Duration = Duration::from_secs(5);

/// The HTTP/1 + HTTP/2 connection builder with the limits of `state`.
fn builder(state: &AppState) -> auto::Builder<TokioExecutor> {
    let limits = &state.limits;
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.client_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.http2_max_streams)
        .keep_alive_interval(limits.client_timeout)
        .keep_alive_timeout(limits.client_timeout);
    builder
}

/// Serves `router` on `listener` until `shutdown` resolves, then drains for up to
/// `grace` (see the module documentation). Client limits are `state.limits`'.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    state: Arc<AppState>,
    grace: Duration,
    shutdown: impl Future<Output = ()>,
) {
    let builder = Arc::new(builder(&state));
    let limits = conn_limits(&state);
    let max = state.limits.max_connections;
    let slots = Arc::new(Semaphore::new(max));
    let (closing, closing_rx) = watch::channel(false);
    tokio::pin!(shutdown);
    while let Some((slot, stream, peer)) = next_connection(&listener, &slots, &mut shutdown).await {
        let connection = serve_connection(
            builder.clone(),
            stream,
            router.clone(),
            limits,
            closing_rx.clone(),
        );
        spawn_connection(slot, peer, connection);
    }
    // Closed before `draining` shows, so whoever sees `draining` knows no connection
    // can be accepted any more.
    drop(listener);
    state.draining.store(true, Ordering::Release);
    let _ = closing.send(true);
    tracing::info!(
        connections = max - slots.available_permits(),
        grace_s = grace.as_secs_f64(),
        "shutting down: listener closed, draining in-flight requests"
    );
    // Every connection holds a slot until it has closed.
    let all = u32::try_from(max).unwrap_or(u32::MAX);
    let drained = slots.acquire_many(all);
    tokio::pin!(drained);
    tokio::select! {
        _ = &mut drained => tracing::info!("drained: every connection closed"),
        () = tokio::time::sleep(grace) => {
            tracing::warn!("grace period over: ending the requests still running");
            state.backend.cancel_all();
            if tokio::time::timeout(FLUSH_AFTER_CANCEL, drained).await.is_err() {
                tracing::warn!("connections still open after the cancellations; exiting anyway");
            }
        }
    }
}

/// Serves the admin listener: the public listener's per-connection deadlines (headers,
/// body, keep-alive) and at most `max_connections` connections, each request told its
/// peer ([`super::admin::Peer`]) for the audit log. It runs for the life of the process.
pub async fn serve_admin(
    listener: TcpListener,
    router: Router,
    state: Arc<AppState>,
    max_connections: usize,
) {
    let builder = Arc::new(builder(&state));
    let limits = conn_limits(&state);
    let slots = Arc::new(Semaphore::new(max_connections.max(1)));
    // The admin listener never drains: its connections end with the process.
    let (_never, open) = watch::channel(false);
    let forever = std::future::pending::<()>();
    tokio::pin!(forever);
    while let Some((slot, stream, peer)) = next_connection(&listener, &slots, &mut forever).await {
        let router = router
            .clone()
            .layer(axum::Extension(super::admin::Peer(peer)));
        let connection = serve_connection(builder.clone(), stream, router, limits, open.clone());
        spawn_connection(slot, peer, connection);
    }
}

/// The deadlines of one connection, from the server's limits.
fn conn_limits(state: &AppState) -> ConnLimits {
    ConnLimits {
        client_timeout: state.limits.client_timeout,
        keep_alive_timeout: state.limits.keep_alive_timeout,
        instances_per_connection: state.limits.instances_per_connection,
        write_timeout: state.limits.write_timeout,
    }
}

/// The next connection, once one of `slots` is free (its permit travels with the
/// connection); `None` once `shutdown` resolves. A failed accept (out of file
/// descriptors and the like) backs off and keeps serving.
async fn next_connection(
    listener: &TcpListener,
    slots: &Arc<Semaphore>,
    shutdown: &mut Pin<&mut impl Future<Output = ()>>,
) -> Option<(OwnedSemaphorePermit, TcpStream, SocketAddr)> {
    let slot = tokio::select! {
        slot = slots.clone().acquire_owned() => slot.ok()?,
        () = shutdown.as_mut() => return None,
    };
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => return Some((slot, stream, peer)),
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            () = shutdown.as_mut() => return None,
        }
    }
}

/// Runs one connection on its own task, holding its slot until it has closed.
fn spawn_connection(
    slot: OwnedSemaphorePermit,
    peer: SocketAddr,
    connection: impl Future<Output = Result<(), String>> + Send + 'static,
) {
    tokio::spawn(async move {
        let _slot = slot;
        if let Err(e) = connection.await {
            tracing::debug!(%peer, error = %e, "connection ended with an error");
        }
    });
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

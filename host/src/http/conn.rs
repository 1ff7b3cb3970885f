//! One client connection's life on the public listener, with its deadlines:
//! - its first request (HTTP/2 preface, settings and headers included) must arrive
//!   within the client timeout, or the connection is dropped;
//! - a request's whole body must arrive within the client timeout of its headers, not
//!   per frame, or it is answered 408 ([`BodyDeadline`]);
//! - a connection with no request in flight for the keep-alive timeout is closed
//!   gracefully (HTTP/1 keep-alive and HTTP/2 alike);
//! - on shutdown it finishes the requests in flight and closes.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpStream;
use tokio::sync::{watch, Notify};
use tokio::time::{sleep_until, Instant};
use tower::ServiceExt;

use super::body::{BodyDeadline, Guarded};

/// The deadlines one connection lives by.
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    /// For the first request's headers, and for each request's whole body.
    pub client_timeout: Duration,
    /// With no request in flight.
    pub keep_alive_timeout: Duration,
}

/// What the connection task needs to know of its requests.
struct Activity {
    in_flight: AtomicUsize,
    seen_request: AtomicBool,
    idle_since: Mutex<Instant>,
    changed: Notify,
}

impl Activity {
    fn begin(self: &Arc<Self>) -> InFlight {
        self.seen_request.store(true, Ordering::Release);
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.changed.notify_one();
        InFlight(self.clone())
    }

    fn idle_since(&self) -> Instant {
        self.idle_since
            .lock()
            .map_or_else(|_| Instant::now(), |t| *t)
    }
}

/// A request in flight, until its response body has ended or was dropped.
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Ok(mut t) = self.0.idle_since.lock() {
            *t = Instant::now();
        }
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.0.changed.notify_one();
    }
}

/// Serves one connection until it ends, a deadline cuts it, or `shutdown` turns true
/// and its requests in flight are done.
pub async fn serve_connection(
    builder: Arc<auto::Builder<TokioExecutor>>,
    stream: TcpStream,
    router: Router,
    limits: ConnLimits,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), String> {
    let opened = Instant::now();
    let activity = Arc::new(Activity {
        in_flight: AtomicUsize::new(0),
        seen_request: AtomicBool::new(false),
        idle_since: Mutex::new(opened),
        changed: Notify::new(),
    });
    let seen = activity.clone();
    let client_timeout = limits.client_timeout;
    let service = tower::service_fn(move |req: hyper::Request<Incoming>| {
        let in_flight = seen.begin();
        let body_deadline = Instant::now() + client_timeout;
        let router = router.clone();
        async move {
            let req = req.map(|body| Body::new(BodyDeadline::new(body, body_deadline)));
            let response = router.oneshot(req).await?;
            Ok::<_, std::convert::Infallible>(
                response.map(|body| Body::new(Guarded::new(body, in_flight))),
            )
        }
    });
    let connection = builder
        .serve_connection(TokioIo::new(stream), TowerToHyperService::new(service))
        .into_owned();
    tokio::pin!(connection);
    let mut closing = *shutdown.borrow();
    if closing {
        connection.as_mut().graceful_shutdown();
    }
    loop {
        let wake = if closing {
            None
        } else if !activity.seen_request.load(Ordering::Acquire) {
            Some(opened + limits.client_timeout)
        } else if activity.in_flight.load(Ordering::Acquire) == 0 {
            Some(activity.idle_since() + limits.keep_alive_timeout)
        } else {
            None
        };
        let timer = async {
            match wake {
                Some(at) => sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            done = connection.as_mut() => return done.map_err(|e| e.to_string()),
            () = timer => {
                if !activity.seen_request.load(Ordering::Acquire) {
                    return Err(format!("no request within {client_timeout:?}; closed"));
                }
                if activity.in_flight.load(Ordering::Acquire) == 0
                    && activity.idle_since().elapsed() >= limits.keep_alive_timeout
                {
                    closing = true;
                    connection.as_mut().graceful_shutdown();
                }
            }
            () = activity.changed.notified() => {}
            changed = shutdown.changed(), if !closing => {
                if changed.is_err() || *shutdown.borrow() {
                    closing = true;
                    connection.as_mut().graceful_shutdown();
                }
            }
        }
    }
}

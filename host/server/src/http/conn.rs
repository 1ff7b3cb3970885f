//! One client connection's life on the public listener, with its deadlines:
//! - its first request (HTTP/2 preface, settings and headers included) must arrive
//!   within the client timeout, or the connection is dropped;
//! - a request's whole body must arrive within the client timeout of its headers, not
//!   per frame, or it is answered 408 ([`BodyDeadline`]);
//! - a connection with no request in flight for the keep-alive timeout is closed
//!   gracefully (HTTP/1 keep-alive and HTTP/2 alike);
//! - on shutdown it finishes the requests in flight and closes;
//! - a response whose bytes its client does not take for the write timeout cuts it
//!   ([`Watched`]): everything on it is dropped at once (an HTTP/2 client with a zero
//!   window would never let hyper poll the body to its end);
//! - it may hold at most `instances_per_connection` plugin instances at once
//!   ([`Connection::instances`]), however many streams it opens.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpStream;
use tokio::sync::{watch, Notify, OwnedSemaphorePermit, Semaphore};
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
    /// Plugin instances the connection's requests may hold together.
    pub instances_per_connection: u32,
    /// How long a response may have bytes ready that the client does not take.
    pub write_timeout: Duration,
}

/// A request's handle on the connection it came on (a request extension).
#[derive(Clone)]
pub struct Connection {
    instances: Arc<Semaphore>,
    cap: u32,
}

impl Connection {
    /// `n` of the connection's plugin instances, or `Err(cap)` when its requests hold
    /// too many already.
    pub fn instances(&self, n: u32) -> Result<OwnedSemaphorePermit, u32> {
        self.instances
            .clone()
            .try_acquire_many_owned(n)
            .map_err(|_| self.cap)
    }
}

/// What the connection task needs to know of its requests.
struct Activity {
    in_flight: AtomicUsize,
    seen_request: AtomicBool,
    idle_since: Mutex<Instant>,
    changed: Notify,
    /// Responses whose bytes are ready and not taken, by response, since when.
    stalled: Mutex<HashMap<u64, Instant>>,
    next_response: AtomicU64,
}

impl Activity {
    fn begin(self: &Arc<Self>) -> InFlight {
        self.seen_request.store(true, Ordering::Release);
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.changed.notify_one();
        InFlight(self.clone())
    }

    /// Since when the longest-stalled response's ready bytes wait for the client.
    fn oldest_stall(&self) -> Option<Instant> {
        self.stalled.lock().ok()?.values().min().copied()
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
        stalled: Mutex::default(),
        next_response: AtomicU64::new(0),
    });
    let handle = Connection {
        instances: Arc::new(Semaphore::new(limits.instances_per_connection as usize)),
        cap: limits.instances_per_connection,
    };
    let seen = activity.clone();
    let client_timeout = limits.client_timeout;
    let service = tower::service_fn(move |req: hyper::Request<Incoming>| {
        let in_flight = seen.begin();
        let body_deadline = Instant::now() + client_timeout;
        let router = router.clone();
        let handle = handle.clone();
        async move {
            let mut req = req.map(|body| Body::new(BodyDeadline::new(body, body_deadline)));
            req.extensions_mut().insert(handle);
            let response = router.oneshot(req).await?;
            let watched = Watched::new(in_flight.0.clone());
            Ok::<_, std::convert::Infallible>(response.map(|body| {
                Body::new(Guarded::new(
                    Body::new(Watching {
                        inner: body,
                        watched,
                    }),
                    in_flight,
                ))
            }))
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
        let stalled_since = activity.oldest_stall();
        if stalled_since.is_some_and(|t| t.elapsed() >= limits.write_timeout) {
            tracing::warn!(
                timeout_s = limits.write_timeout.as_secs_f64(),
                "a client took none of a response for the write timeout; connection cut"
            );
            return Err("cut: write timeout, the client stopped reading".into());
        }
        let stall_wake = stalled_since.map(|t| t + limits.write_timeout);
        let wake = if closing {
            stall_wake
        } else if !activity.seen_request.load(Ordering::Acquire) {
            Some(opened + limits.client_timeout)
        } else if activity.in_flight.load(Ordering::Acquire) == 0 {
            Some(activity.idle_since() + limits.keep_alive_timeout)
        } else {
            None
        };
        let wake = match (wake, stall_wake) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
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
                if activity.oldest_stall().is_some_and(|t| t.elapsed() >= limits.write_timeout) {
                    continue;
                }
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

/// One response's standing with its client: stalled while bytes of it are ready (or it
/// was just made) and the connection has not come back for more. hyper polls a body
/// only when it can send: an HTTP/2 stream whose window stays 0, or an HTTP/1 socket
/// the client stopped reading, never polls it again, and the connection's timer cuts
/// it at the write timeout. A body that answered `Pending` is waiting for its own data
/// (a stream's next token), never stalled.
struct Watched {
    activity: Arc<Activity>,
    id: u64,
}

impl Watched {
    fn new(activity: Arc<Activity>) -> Self {
        let id = activity.next_response.fetch_add(1, Ordering::Relaxed);
        let watched = Self { activity, id };
        watched.stall();
        watched
    }

    /// Stalled from now. The connection's timer needs waking only when nothing was
    /// stalled: any stall already there is older, so its timer fires first.
    fn stall(&self) {
        let first = match self.activity.stalled.lock() {
            Ok(mut s) => {
                let first = s.is_empty();
                s.insert(self.id, Instant::now());
                first
            }
            Err(_) => return,
        };
        if first {
            self.activity.changed.notify_one();
        }
    }

    fn unstall(&self) {
        if let Ok(mut s) = self.activity.stalled.lock() {
            s.remove(&self.id);
        }
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        self.unstall();
    }
}

pin_project_lite::pin_project! {
    struct Watching {
        #[pin]
        inner: Body,
        watched: Watched,
    }
}

impl http_body::Body for Watching {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, axum::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        match &polled {
            // The connection took this frame; until it comes back, the rest waits on it.
            Poll::Ready(Some(Ok(_))) => this.watched.stall(),
            Poll::Ready(_) | Poll::Pending => this.watched.unstall(),
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

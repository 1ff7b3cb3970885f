//! Body wrappers of the HTTP layer: a response body that holds a guard until it has
//! ended (or was dropped), which is how a request is timed and counted in flight to its
//! last byte; and a request body that must arrive whole by one deadline.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use axum::body::Body;
use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::{sleep_until, Instant};

pin_project_lite::pin_project! {
    /// A response body holding `guard` until its last frame (or an error) has been
    /// polled, or it is dropped: whatever `guard` does on drop happens then.
    pub struct Guarded<G> {
        #[pin]
        inner: Body,
        guard: Option<G>,
    }
}

impl<G> Guarded<G> {
    pub fn new(inner: Body, guard: G) -> Self {
        Self {
            inner,
            guard: Some(guard),
        }
    }
}

impl<G> HttpBody for Guarded<G> {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        if matches!(polled, Poll::Ready(None) | Poll::Ready(Some(Err(_)))) {
            this.guard.take();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The request body did not arrive whole in time.
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive within its deadline")]
pub struct BodyDeadlineElapsed;

pin_project_lite::pin_project! {
    /// A request body that must end by one deadline, however its frames trickle in.
    pub struct BodyDeadline {
        #[pin]
        inner: Incoming,
        #[pin]
        deadline: tokio::time::Sleep,
    }
}

impl BodyDeadline {
    pub fn new(inner: Incoming, at: Instant) -> Self {
        Self {
            inner,
            deadline: sleep_until(at),
        }
    }
}

impl HttpBody for BodyDeadline {
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::BoxError>>> {
        let this = self.project();
        if let Poll::Ready(frame) = this.inner.poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        match this.deadline.poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(BodyDeadlineElapsed.into()))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

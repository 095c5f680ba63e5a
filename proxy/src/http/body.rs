//! Body types: what goes upstream and what goes back downstream. Bodies
//! stream frame by frame; only a request that may be retried keeps a copy,
//! and only up to the route's limit.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use super::conn::ActivityGuard;
use crate::cluster::{EndpointGuard, PooledConnection, RequestGuard};
use crate::telemetry::CallRecord;

/// Errors a body can yield.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The request body grew past `max_request_body_bytes`.
#[derive(Debug, thiserror::Error)]
#[error("request body larger than {limit} bytes")]
pub struct BodyTooLarge {
    /// The limit.
    pub limit: u64,
}

/// A request body on its way upstream.
#[derive(Debug)]
pub enum RequestBody {
    /// No body.
    Empty,
    /// A buffered copy, replayable for retries.
    Replay {
        /// Data, taken on the first poll.
        data: Option<Bytes>,
        /// Trailers, sent after the data.
        trailers: Option<HeaderMap>,
    },
    /// The downstream body, streamed, with an optional size limit.
    Streaming {
        /// The downstream body.
        inner: Incoming,
        /// Bytes still allowed; `None` for no limit.
        remaining: Option<u64>,
        /// The configured limit, for the error.
        limit: u64,
        /// Counts the bytes that passed, for telemetry.
        counter: Option<Arc<AtomicU64>>,
    },
}

impl RequestBody {
    /// A replayable copy of buffered data.
    pub fn replay(data: &Bytes, trailers: &Option<HeaderMap>) -> Self {
        if data.is_empty() && trailers.is_none() {
            return RequestBody::Empty;
        }
        RequestBody::Replay {
            data: (!data.is_empty()).then(|| data.clone()),
            trailers: trailers.clone(),
        }
    }

    /// The downstream body back, when it was never polled (a send that did not happen).
    pub fn into_incoming(self) -> Option<Incoming> {
        match self {
            RequestBody::Streaming { inner, .. } => Some(inner),
            _ => None,
        }
    }

    /// Streams `inner`, failing once more than `limit` bytes have passed.
    pub fn streaming(inner: Incoming, limit: Option<u64>) -> Self {
        if inner.is_end_stream() {
            return RequestBody::Empty;
        }
        RequestBody::Streaming {
            inner,
            remaining: limit,
            limit: limit.unwrap_or(u64::MAX),
            counter: None,
        }
    }

    /// Counts the bytes that pass in `counter`.
    pub fn counted(mut self, counter: Arc<AtomicU64>) -> Self {
        if let RequestBody::Streaming { counter: slot, .. } = &mut self {
            *slot = Some(counter);
        }
        self
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            RequestBody::Empty => Poll::Ready(None),
            RequestBody::Replay { data, trailers } => {
                if let Some(data) = data.take() {
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Poll::Ready(trailers.take().map(|t| Ok(Frame::trailers(t))))
            }
            RequestBody::Streaming {
                inner,
                remaining,
                limit,
                counter,
            } => match Pin::new(inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    if let (Some(counter), Some(data)) = (counter.as_ref(), frame.data_ref()) {
                        counter.fetch_add(data.len() as u64, Ordering::Relaxed);
                    }
                    if let (Some(left), Some(data)) = (remaining.as_mut(), frame.data_ref()) {
                        let len = data.len() as u64;
                        if len > *left {
                            return Poll::Ready(Some(Err(Box::new(BodyTooLarge {
                                limit: *limit,
                            }))));
                        }
                        *left -= len;
                    }
                    Poll::Ready(Some(Ok(frame)))
                }
                Poll::Ready(Some(Err(err))) => Poll::Ready(Some(Err(Box::new(err)))),
                Poll::Ready(None) => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Empty => true,
            RequestBody::Replay { data, trailers } => data.is_none() && trailers.is_none(),
            RequestBody::Streaming { inner, .. } => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Empty => SizeHint::with_exact(0),
            RequestBody::Replay { data, .. } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            RequestBody::Streaming { inner, .. } => inner.size_hint(),
        }
    }
}

/// What an upstream response body holds until it ends: the connection to
/// give back, the circuit-breaker and LB counts, and the call's record.
#[derive(Debug)]
pub struct UpstreamResponse {
    /// The upstream body.
    pub inner: Incoming,
    /// HTTP/1.1 connection to return to its pool at the end of the body.
    pub pooled: Option<PooledConnection>,
    /// Held until the end of the body.
    pub request_guard: Option<RequestGuard>,
    /// Held until the end of the body.
    pub endpoint_guard: Option<EndpointGuard>,
}

/// A response body on its way downstream.
#[derive(Debug)]
pub struct ResponseBody {
    kind: ResponseKind,
    /// Recorded when the body ends or is dropped. Boxed, as the request
    /// path holds it: inline it would grow every move of the response.
    record: Option<Box<CallRecord>>,
    /// Keeps the connection busy (not idle) until the body ends.
    activity: Option<ActivityGuard>,
}

#[derive(Debug)]
enum ResponseKind {
    Full(Option<Bytes>),
    Upstream(Box<UpstreamResponse>),
}

impl ResponseBody {
    /// A body made by the proxy.
    pub fn full(data: impl Into<Bytes>) -> Self {
        let data = data.into();
        ResponseBody {
            kind: ResponseKind::Full((!data.is_empty()).then_some(data)),
            record: None,
            activity: None,
        }
    }

    /// An empty body.
    pub fn empty() -> Self {
        ResponseBody::full(Bytes::new())
    }

    /// A streamed upstream body.
    pub fn upstream(upstream: UpstreamResponse) -> Self {
        ResponseBody {
            kind: ResponseKind::Upstream(Box::new(upstream)),
            record: None,
            activity: None,
        }
    }

    /// Attaches the call record, written when the body ends.
    pub fn with_record(mut self, record: Box<CallRecord>) -> Self {
        self.record = Some(record);
        self
    }

    /// Keeps the connection from counting as idle until the body ends.
    pub fn with_activity(mut self, guard: ActivityGuard) -> Self {
        self.activity = Some(guard);
        self
    }

    fn finish(&mut self, complete: bool) {
        self.activity.take();
        if let ResponseKind::Upstream(up) = &mut self.kind {
            if complete {
                if let Some(pooled) = up.pooled.take() {
                    pooled.release();
                }
            }
            up.request_guard.take();
            up.endpoint_guard.take();
        }
        if let Some(mut record) = self.record.take() {
            if !complete {
                record.downstream_incomplete();
            }
            record.finish();
        }
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        // hyper may never poll a body that is empty from the start (204, HEAD).
        let complete = self.is_end_stream();
        self.finish(complete);
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let polled = match &mut this.kind {
            ResponseKind::Full(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            ResponseKind::Upstream(up) => match Pin::new(&mut up.inner).poll_frame(cx) {
                Poll::Ready(Some(Err(err))) => {
                    if let Some(record) = this.record.as_mut() {
                        record.upstream_reset();
                    }
                    Poll::Ready(Some(Err(Box::new(err) as BoxError)))
                }
                other => other.map(|o| o.map(|r| r.map_err(|e| Box::new(e) as BoxError))),
            },
        };
        if let (Poll::Ready(Some(Ok(frame))), Some(record)) = (&polled, this.record.as_mut()) {
            if let Some(data) = frame.data_ref() {
                record.add_sent(data.len());
            } else if let Some(trailers) = frame.trailers_ref() {
                record.set_grpc_status(trailers);
            }
        }
        if let Poll::Ready(None) = polled {
            this.finish(true);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            ResponseKind::Full(data) => data.is_none(),
            ResponseKind::Upstream(up) => up.inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            ResponseKind::Full(data) => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            ResponseKind::Upstream(up) => up.inner.size_hint(),
        }
    }
}

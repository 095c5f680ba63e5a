//! hyper glue for downstream connections: HTTP/1.1 and HTTP/2 (prior
//! knowledge) on one port, limits, idle timeout and graceful drain.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt as _;

use super::body::ResponseBody;
use super::conn::{ConnActivity, ConnState, CountingStream, Detachable};
use super::headers::{self as hdr, DownstreamPeer, RejectedHead};
use super::proxy::HttpProxy;
use crate::config::file::ListenerLimitsFile;
use crate::listener::{signalled, Shutdown};
use crate::telemetry::metrics as names;
use crate::tls::DownstreamIo;
use http::Request;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;

/// Longest wait to write a 408 to a client whose request head was too slow.
const SLOW_HEAD_ANSWER_WAIT: std::time::Duration = std::time::Duration::from_millis(100);

/// Smallest read buffer hyper accepts.
const MIN_BUF: usize = 8192;

/// Builds the connection builder for a listener's limits.
pub fn builder(limits: &ListenerLimitsFile) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        // Kept in `serve_connection` instead: hyper's also runs between requests.
        .header_read_timeout(None)
        // The read buffer bounds the request head: past it hyper answers 431.
        .max_buf_size(limits.max_request_headers_bytes.max(MIN_BUF))
        .max_headers(limits.max_request_headers)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.max_concurrent_streams)
        .max_header_list_size(u32::try_from(limits.max_request_headers_bytes).unwrap_or(u32::MAX))
        // Rapid-reset defence: streams the client resets count against this.
        .max_pending_accept_reset_streams(Some(200))
        .keep_alive_interval(Some(Duration::from_secs(60)))
        .keep_alive_timeout(Duration::from_secs(20));
    builder
}

/// Serves one downstream connection until it closes, idles out or is drained.
pub async fn serve_connection(
    stream: DownstreamIo,
    peer: Arc<DownstreamPeer>,
    proxy: Arc<HttpProxy>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    shutdown: Shutdown,
) {
    let _ = stream.tcp().set_nodelay(true);
    let plaintext = stream.is_plaintext();
    // Taking the stream back from hyper lets us answer 408 and close when
    // a request head is too slow, whatever state hyper is in.
    let (stream, detach) = Detachable::new(stream);
    let activity = ConnActivity::new();
    let limits = &proxy.listener.limits;
    let (idle_timeout, head_timeout) = (limits.idle_timeout, limits.header_read_timeout);
    let service = {
        let activity = activity.clone();
        let proxy = proxy.clone();
        service_fn(move |mut request: Request<Incoming>| {
            let proxy = proxy.clone();
            let guard = activity.begin();
            let peer = peer.clone();
            async move {
                if let Err(rejected) = screen_request(&mut request, &proxy) {
                    return Ok::<_, Infallible>(reject_head(&request, rejected, &proxy));
                }
                let response = proxy.handle(peer, request).await;
                let (parts, body) = response.into_parts();
                Ok::<_, Infallible>(http::Response::from_parts(parts, body.with_activity(guard)))
            }
        })
    };
    let io = TokioIo::new(CountingStream::new(stream, activity.clone()));
    let conn = builder.serve_connection_with_upgrades(io, service);
    tokio::pin!(conn);
    let tick = (idle_timeout.min(head_timeout) / 4).max(Duration::from_millis(10));
    let mut timers = tokio::time::interval(tick);
    timers.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    timers.tick().await;
    let mut head_started: Option<Instant> = None;
    // Bytes moved at the last tick with a request in flight, and since when
    // that count has not changed.
    let mut stalled: Option<(u64, Instant)> = None;
    let mut idle_closing = false;
    let mut draining = false;
    // A drain that found the connection before its first byte: it waits
    // for one tick of the timers (see below).
    let mut drain_deferred = false;
    // Pinned once: rebuilding these futures on every wake-up of a busy
    // connection costs more than the request itself.
    let drain = signalled(shutdown.drain.clone());
    let force = signalled(shutdown.force.clone());
    tokio::pin!(drain, force);
    let result = loop {
        tokio::select! {
            biased;
            result = conn.as_mut() => break result,
            _ = &mut force => return,
            _ = &mut drain, if !draining && !drain_deferred => {
                // A connection accepted just as its listener was replaced
                // (or the drain began) has had no chance to send its
                // request: shutting it down now would close it unanswered,
                // so its request gets until the next tick to start.
                if activity.bytes_moved() == 0 {
                    drain_deferred = true;
                } else {
                    draining = true;
                    conn.as_mut().graceful_shutdown();
                }
            }
            _ = timers.tick() => {
                if drain_deferred && !draining {
                    draining = true;
                    conn.as_mut().graceful_shutdown();
                }
                let state = activity.state();
                // A client that stops reading (or opens no flow-control
                // window) holds its requests, their upstream connections
                // and hyper's unflushed buffers forever unless something
                // counts it idle: requests in flight, or an idle close still
                // flushing, with no byte moving either way.
                if state == ConnState::Busy || idle_closing {
                    let moved = activity.bytes_moved();
                    match stalled {
                        Some((before, since)) if before == moved => {
                            if since.elapsed() >= idle_timeout {
                                count_limit(&shutdown.listener, "idle_timeout");
                                return;
                            }
                        }
                        _ => stalled = Some((moved, Instant::now())),
                    }
                } else {
                    stalled = None;
                }
                match state {
                    ConnState::Busy => head_started = None,
                    ConnState::ReadingHead => {
                        let since = *head_started.get_or_insert_with(Instant::now);
                        if since.elapsed() >= head_timeout {
                            reject_slow_head(detach.take(), plaintext, &shutdown.listener).await;
                            return;
                        }
                    }
                    ConnState::Idle(idle) => {
                        head_started = None;
                        if idle >= idle_timeout && !draining {
                            draining = true;
                            idle_closing = true;
                            conn.as_mut().graceful_shutdown();
                        }
                    }
                }
            }
        }
    };
    if let Err(err) = result {
        on_connection_error(&*err, &shutdown.listener);
    }
}

/// Checks what hyper let through before anything routes on it, and strips
/// what only Postern may say. Public, with [`reject_head`], so the fuzz
/// targets drive the exact front end a listener runs.
///
/// # Errors
///
/// The answer to give instead of routing the request.
pub fn screen_request<B>(request: &mut Request<B>, proxy: &HttpProxy) -> Result<(), RejectedHead> {
    hdr::check_request_head(
        request.method(),
        request.uri(),
        request.version(),
        request.headers(),
    )?;
    hdr::sanitize_inbound(
        request.headers_mut(),
        proxy.listener.limits.headers_with_underscores,
    )
}

/// The answer to a refused request head. On HTTP/1 the connection closes
/// after it: what follows a malformed head cannot be trusted to be framed
/// as the client meant.
pub fn reject_head<B>(
    request: &Request<B>,
    rejected: RejectedHead,
    proxy: &HttpProxy,
) -> http::Response<ResponseBody> {
    tracing::debug!(
        method = %request.method(),
        reason = rejected.reason,
        "request head refused"
    );
    count_limit(&proxy.listener.name, "malformed_request");
    let mut response = http::Response::new(ResponseBody::full(rejected.reason));
    *response.status_mut() = rejected.status;
    let headers = response.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain"),
    );
    if request.version() < http::Version::HTTP_2 {
        headers.insert(
            http::header::CONNECTION,
            http::HeaderValue::from_static("close"),
        );
    }
    response
}

/// Answers 408 on a connection whose request head is too slow, and closes
/// it. Under TLS the answer would need the session, so it just closes.
async fn reject_slow_head(stream: Option<DownstreamIo>, plaintext: bool, listener: &Arc<str>) {
    count_limit(listener, "header_read_timeout");
    let Some(mut stream) = stream else { return };
    if plaintext {
        // The answer fits any socket buffer; a peer that filled it by not
        // reading gets no wait.
        let _ = tokio::time::timeout(
            SLOW_HEAD_ANSWER_WAIT,
            stream.write_all(
                b"HTTP/1.1 408 Request Timeout\r\nconnection: close\r\ncontent-length: 0\r\n\r\n",
            ),
        )
        .await;
    }
    let _ = socket2::SockRef::from(stream.tcp()).shutdown(std::net::Shutdown::Both);
}

fn count_limit(listener: &Arc<str>, limit: &'static str) {
    metrics::counter!(
        names::DOWNSTREAM_LIMIT_REJECTIONS_TOTAL,
        "listener" => listener.clone(),
        "limit" => limit,
    )
    .increment(1);
}

fn on_connection_error(err: &(dyn std::error::Error + Send + Sync + 'static), listener: &Arc<str>) {
    match find_hyper_error(err) {
        Some(hyper_err) if hyper_err.is_parse_too_large() => {
            // hyper has already answered 431.
            metrics::counter!(
                names::DOWNSTREAM_LIMIT_REJECTIONS_TOTAL,
                "listener" => listener.clone(),
                "limit" => "request_headers",
            )
            .increment(1);
        }
        _ => {}
    }
    tracing::debug!(error = %err, "downstream connection error");
}

fn find_hyper_error<'a>(err: &'a (dyn std::error::Error + 'static)) -> Option<&'a hyper::Error> {
    let mut current = Some(err);
    while let Some(e) = current {
        if let Some(h) = e.downcast_ref::<hyper::Error>() {
            return Some(h);
        }
        current = e.source();
    }
    None
}

//! hyper glue for downstream connections: HTTP/1.1 and HTTP/2 (prior
//! knowledge) on one port, limits, idle timeout and graceful drain.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

use super::body::ResponseBody;
use super::conn::{ConnActivity, ConnState, CountingStream, DetachHandle, Detachable};
use super::headers::{self as hdr, DownstreamPeer, RejectedHead};
use super::proxy::HttpProxy;
use crate::config::file::ListenerLimitsFile;
// A client that opens with the HTTP/2 preface speaks HTTP/2 with prior
// knowledge; any other is HTTP/1.
use crate::listener::detect::{Rewind, H2_PREFACE};
use crate::listener::{signalled, Shutdown};
use crate::telemetry::metrics as names;
use crate::tls::DownstreamIo;
use http::Request;
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

/// Longest wait to write a 408 to a client whose request head was too slow.
const SLOW_HEAD_ANSWER_WAIT: std::time::Duration = std::time::Duration::from_millis(100);

/// Smallest read buffer hyper accepts.
const MIN_BUF: usize = 8192;

/// How long a kept-alive HTTP/1 connection waits for its next request before
/// hyper's buffers for it (16 KiB) are let go. Until bytes arrive again it
/// costs only its socket and task: idle keep-alive connections are most of
/// the connections an edge or a sidecar holds.
const PARK_IDLE_AFTER: Duration = Duration::from_secs(1);

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// hyper's HTTP/1.1 and HTTP/2 settings for one listener's connections.
#[derive(Clone, Debug)]
pub struct ServerBuilder {
    http1: http1::Builder,
    http2: http2::Builder<TokioExecutor>,
}

/// Builds the connection builder for a listener's limits.
pub fn builder(limits: &ListenerLimitsFile) -> ServerBuilder {
    let mut http1 = http1::Builder::new();
    http1
        .timer(TokioTimer::new())
        // Kept in `serve_connection` instead: hyper's also runs between requests.
        .header_read_timeout(None)
        // The read buffer bounds the request head: past it hyper answers 431.
        .max_buf_size(limits.max_request_headers_bytes.max(MIN_BUF))
        .max_headers(limits.max_request_headers)
        .writev(false)
        .keep_alive(true);
    let mut http2 = http2::Builder::new(TokioExecutor::new());
    http2
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.max_concurrent_streams)
        .max_header_list_size(u32::try_from(limits.max_request_headers_bytes).unwrap_or(u32::MAX))
        // Rapid-reset defence: streams the client resets count against this.
        .max_pending_accept_reset_streams(Some(200))
        // RFC 8441: WebSocket over HTTP/2, which is how an upgrade crosses
        // the mesh hop between sidecars.
        .enable_connect_protocol()
        .keep_alive_interval(Some(Duration::from_secs(60)))
        .keep_alive_timeout(Duration::from_secs(20));
    ServerBuilder { http1, http2 }
}

impl ServerBuilder {
    /// Serves one connection, HTTP/1.1 (with upgrades) or HTTP/2 by its
    /// preface, until it ends: the listener's front end without its timers,
    /// as the fuzz targets drive it.
    ///
    /// # Errors
    ///
    /// What ended the connection, when it did not end cleanly.
    pub async fn serve<I, S, B>(&self, mut io: I, service: S) -> Result<(), BoxError>
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        S: hyper::service::Service<Request<Incoming>, Response = http::Response<B>>
            + Clone
            + Send
            + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
        B: hyper::body::Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<BoxError>,
    {
        let mut preface = BytesMut::with_capacity(H2_PREFACE.len());
        let Some(http2) = read_preface(&mut io, &mut preface).await? else {
            return Ok(());
        };
        let io = TokioIo::new(Rewind::new(preface.freeze(), io));
        if http2 {
            self.http2.serve_connection(io, service).await?;
        } else {
            self.http1
                .serve_connection(io, service)
                .with_upgrades()
                .await?;
        }
        Ok(())
    }
}

/// Reads until the bytes either are the HTTP/2 preface or cannot be: `None`
/// when the client closed first. What was read stays in `preface`.
async fn read_preface<I: AsyncRead + Unpin>(
    io: &mut I,
    preface: &mut BytesMut,
) -> std::io::Result<Option<bool>> {
    while preface.len() < H2_PREFACE.len() {
        let before = preface.len();
        let mut limited = (&mut *io).take((H2_PREFACE.len() - before) as u64);
        if limited.read_buf(preface).await? == 0 {
            return Ok(None);
        }
        if preface[before..] != H2_PREFACE[before..preface.len()] {
            return Ok(Some(false));
        }
    }
    Ok(Some(true))
}

/// How a connection's watch ended a stage of it.
enum Verdict<T> {
    /// The stage ran to its end.
    Done(T),
    /// The connection is over (drain forced, timed out, refused); the
    /// watch already did what closing needed.
    Close,
}

/// The timers hyper cannot run for a connection (idle, slow head, stalled
/// transfers), and the drain, kept across the stages of one connection.
struct Watch<'a, D, F> {
    activity: Arc<ConnActivity>,
    detach: &'a DetachHandle<DownstreamIo>,
    listener: &'a Arc<str>,
    plaintext: bool,
    idle_timeout: Duration,
    head_timeout: Duration,
    timers: tokio::time::Interval,
    head_started: Option<Instant>,
    // Bytes moved at the last tick with a request in flight, and since when
    // that count has not changed.
    stalled: Option<(u64, Instant)>,
    idle_closing: bool,
    draining: bool,
    // A drain that found the connection before its first byte waits one
    // tick of the timers: a connection accepted just as its listener was
    // replaced (or the drain began) has had no chance to send its request,
    // and closing it now would leave that request unanswered.
    drain_deferred: bool,
    drain: Pin<&'a mut D>,
    force: Pin<&'a mut F>,
}

/// What a stage of a connection is polled for.
#[derive(Clone, Copy)]
enum Stage {
    /// Reading the first bytes, or waiting for a parked connection's next
    /// request: a drain ends it at once.
    Waiting,
    /// hyper serves the connection.
    Serving,
    /// hyper serves HTTP/1 and may be let go once idle, if it served a
    /// request since the given count (before its first, hyper cannot close
    /// an idle connection without refusing keep-alive to the next request).
    Parkable { requests_before: u64 },
}

impl<D: Future<Output = ()>, F: Future<Output = ()>> Watch<'_, D, F> {
    /// Polls `stage` under the connection's timers. `graceful` asks it to
    /// finish what is in flight and end; after a park request the stage
    /// ends with the socket left open, and `parked` says so.
    async fn drive<C: Future>(
        &mut self,
        mut conn: Pin<&mut C>,
        mut graceful: impl FnMut(Pin<&mut C>),
        stage: Stage,
        parked: &mut Option<u64>,
    ) -> Verdict<C::Output> {
        loop {
            tokio::select! {
                biased;
                result = conn.as_mut() => return Verdict::Done(result),
                () = self.force.as_mut() => return Verdict::Close,
                () = self.drain.as_mut(), if !self.draining && !self.drain_deferred => {
                    if self.activity.bytes_moved() == 0 {
                        self.drain_deferred = true;
                        continue;
                    }
                    self.draining = true;
                    if matches!(stage, Stage::Waiting) {
                        return Verdict::Close;
                    }
                    graceful(conn.as_mut());
                }
                _ = self.timers.tick() => {
                    if self.drain_deferred && !self.draining {
                        self.draining = true;
                        if matches!(stage, Stage::Waiting) {
                            return Verdict::Close;
                        }
                        graceful(conn.as_mut());
                    }
                    let state = self.activity.state();
                    // A client that stops reading (or opens no flow-control
                    // window) holds its requests, their upstream connections
                    // and hyper's unflushed buffers forever unless something
                    // counts it idle: requests in flight, or an idle close
                    // still flushing, with no byte moving either way.
                    if state == ConnState::Busy || self.idle_closing {
                        let moved = self.activity.bytes_moved();
                        match self.stalled {
                            Some((before, since)) if before == moved => {
                                if since.elapsed() >= self.idle_timeout {
                                    count_limit(self.listener, "idle_timeout");
                                    return Verdict::Close;
                                }
                            }
                            _ => self.stalled = Some((moved, Instant::now())),
                        }
                    } else {
                        self.stalled = None;
                    }
                    match state {
                        ConnState::Busy => self.head_started = None,
                        ConnState::ReadingHead => {
                            let since = *self.head_started.get_or_insert_with(Instant::now);
                            if since.elapsed() >= self.head_timeout {
                                reject_slow_head(self.detach.take(), self.plaintext, self.listener)
                                    .await;
                                return Verdict::Close;
                            }
                        }
                        // Already closing or letting go: nothing more to start.
                        ConnState::Idle(_)
                            if self.draining || self.idle_closing || parked.is_some() =>
                        {
                            self.head_started = None;
                        }
                        ConnState::Idle(idle) => {
                            self.head_started = None;
                            if idle >= self.idle_timeout {
                                if matches!(stage, Stage::Waiting) {
                                    return Verdict::Close;
                                }
                                self.draining = true;
                                self.idle_closing = true;
                                graceful(conn.as_mut());
                            } else if let Stage::Parkable { requests_before } = stage {
                                if idle >= PARK_IDLE_AFTER
                                    && self.activity.requests() > requests_before
                                {
                                    // hyper is between requests with nothing
                                    // read: closing lets it go at once, and
                                    // the shutdown leaves the socket open.
                                    self.activity.set_parking(true);
                                    *parked = Some(self.activity.bytes_read());
                                    graceful(conn.as_mut());
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Serves one downstream connection until it closes, idles out or is drained.
pub async fn serve_connection(
    stream: DownstreamIo,
    peer: Arc<DownstreamPeer>,
    proxy: Arc<HttpProxy>,
    builder: Arc<ServerBuilder>,
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
                // Before screening, which strips every `x-postern-*`.
                super::protocol::settle(&mut request, &peer);
                if let Err(rejected) = screen_request(&mut request, &proxy) {
                    return Ok::<_, Infallible>(reject_head(&request, rejected, &proxy));
                }
                let response = proxy.handle(peer, request).await;
                let (parts, body) = response.into_parts();
                Ok::<_, Infallible>(http::Response::from_parts(parts, body.with_activity(guard)))
            }
        })
    };
    let tick = (idle_timeout.min(head_timeout) / 4).max(Duration::from_millis(10));
    let mut timers = tokio::time::interval(tick);
    timers.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    timers.tick().await;
    // Pinned once: rebuilding these futures on every wake-up of a busy
    // connection costs more than the request itself.
    let drain = signalled(shutdown.drain.clone());
    let force = signalled(shutdown.force.clone());
    tokio::pin!(drain, force);
    let mut watch = Watch {
        activity: activity.clone(),
        detach: &detach,
        listener: &shutdown.listener,
        plaintext,
        idle_timeout,
        head_timeout,
        timers,
        head_started: None,
        stalled: None,
        idle_closing: false,
        draining: false,
        drain_deferred: false,
        drain,
        force,
    };
    let mut io = CountingStream::new(stream, activity.clone());
    let mut preface = BytesMut::with_capacity(H2_PREFACE.len());
    let mut no_park = None;
    let http2 = {
        let sniff = read_preface(&mut io, &mut preface);
        tokio::pin!(sniff);
        match watch
            .drive(sniff, |_| {}, Stage::Waiting, &mut no_park)
            .await
        {
            Verdict::Done(Ok(Some(http2))) => http2,
            Verdict::Done(_) | Verdict::Close => return,
        }
    };
    let mut prefix = preface.freeze();
    // hyper's connections are boxed: held inline they would size this
    // future, and so the task of every connection, parked and silent ones
    // included, for the largest of them.
    if http2 {
        let mut conn = Box::pin(
            builder
                .http2
                .serve_connection(TokioIo::new(Rewind::new(prefix, io)), service),
        );
        if let Verdict::Done(Err(err)) = watch
            .drive(
                conn.as_mut(),
                |c| c.graceful_shutdown(),
                Stage::Serving,
                &mut no_park,
            )
            .await
        {
            on_connection_error(&err, &shutdown.listener);
        }
        return;
    }
    loop {
        let mut parked = None;
        let stage = Stage::Parkable {
            requests_before: activity.requests(),
        };
        // hyper's connection lives only in this block, so that its box is
        // let go before the park below, not after it.
        let parts = {
            let mut conn = Box::new(
                builder
                    .http1
                    .serve_connection(TokioIo::new(Rewind::new(prefix, io)), service.clone())
                    .with_upgrades(),
            );
            let result = watch
                .drive(
                    Pin::new(&mut *conn),
                    |c| c.graceful_shutdown(),
                    stage,
                    &mut parked,
                )
                .await;
            let result = match result {
                Verdict::Done(result) => result,
                Verdict::Close => return,
            };
            match (parked, result) {
                (Some(read_before), Ok(())) if activity.bytes_read() == read_before => {
                    (*conn).into_parts()
                }
                (Some(_), Ok(())) => None,
                (_, Err(err)) => {
                    on_connection_error(&err, &shutdown.listener);
                    None
                }
                (None, Ok(())) => return,
            }
        };
        activity.set_parking(false);
        // hyper read more after being asked to let go, so it was not between
        // requests: whatever it left unread cannot be trusted to start one.
        let Some(parts) = parts else {
            if let Some(stream) = detach.take() {
                let _ = socket2::SockRef::from(stream.tcp()).shutdown(std::net::Shutdown::Both);
            }
            return;
        };
        metrics::counter!(
            names::DOWNSTREAM_CONNECTIONS_PARKED_TOTAL,
            "listener" => shutdown.listener.clone(),
        )
        .increment(1);
        (prefix, io) = let_go(parts);
        if prefix.is_empty() && !wait_readable(&mut watch).await {
            return;
        }
    }
}

/// What a parked HTTP/1 connection keeps of hyper's: the bytes read but not
/// used yet, and the stream. The rest (its read buffer, the service) is
/// dropped here, before the park rather than after it.
fn let_go<I, S>(parts: http1::Parts<TokioIo<Rewind<I>>, S>) -> (Bytes, I) {
    let (unread, io) = parts.io.into_inner().into_parts();
    let prefix = match (parts.read_buf.is_empty(), unread.is_empty()) {
        // hyper's read buffer, even emptied, holds the whole allocation it
        // reads into (16 KiB after a request): kept while parked, it was
        // most of what a parked connection cost.
        (true, true) => Bytes::new(),
        (false, true) => Bytes::copy_from_slice(&parts.read_buf),
        (true, false) => unread,
        (false, false) => [parts.read_buf, unread].concat().into(),
    };
    (prefix, io)
}

/// Waits, with hyper let go, until the client sends again: false when the
/// connection ends first (idle timeout, drain).
async fn wait_readable<D, F>(watch: &mut Watch<'_, D, F>) -> bool
where
    D: Future<Output = ()>,
    F: Future<Output = ()>,
{
    let Some(stream) = watch.detach.take() else {
        return false;
    };
    let mut no_park = None;
    let readable = if stream.has_buffered_input() {
        true
    } else {
        let ready = stream.tcp().readable();
        tokio::pin!(ready);
        matches!(
            watch
                .drive(ready, |_| {}, Stage::Waiting, &mut no_park)
                .await,
            Verdict::Done(Ok(()))
        )
    };
    watch.detach.restore(stream);
    readable
}

/// Checks what hyper let through before anything routes on it, and strips
/// what only Postern may say. Public, with [`reject_head`], so the fuzz
/// targets drive the exact front end a listener runs.
///
/// # Errors
///
/// The answer to give instead of routing the request.
pub fn screen_request<B>(request: &mut Request<B>, proxy: &HttpProxy) -> Result<(), RejectedHead> {
    // An extended CONNECT is screened (and routed) as the upgrade it is.
    super::protocol::normalize_extended_connect(request);
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

//! Upstream connection pools: one per endpoint, with a cluster-wide limit on
//! open connections and on requests waiting for one (the `max_connections`
//! and `max_pending_requests` circuit breakers).
//!
//! HTTP/1.1 connections are checked out for one request at a time and come
//! back when the response body ends; HTTP/2 has one shared connection per
//! endpoint that all requests multiplex on.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio::sync::Notify;

use crate::config::file::UpstreamProtocol;
use crate::http::body::RequestBody;
use crate::tls::{io_failure_reason, UpstreamIo, UpstreamTls};

/// Why an upstream request could not get an answer.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// A circuit breaker refused the request.
    #[error("cluster overloaded: {0} limit reached")]
    Overloaded(&'static str),
    /// No endpoint is healthy.
    #[error("no healthy endpoint")]
    NoHealthyEndpoint,
    /// The TCP connect did not finish in time.
    #[error("upstream connect to {0} timed out")]
    ConnectTimeout(SocketAddr),
    /// The TCP connect failed.
    #[error("upstream connect to {addr} failed")]
    Connect {
        /// Endpoint address.
        addr: SocketAddr,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The TLS handshake failed (untrusted peer, wrong identity, refused
    /// by the peer).
    #[error("upstream TLS handshake with {addr} failed ({reason})")]
    Tls {
        /// Endpoint address.
        addr: SocketAddr,
        /// Bounded reason, as in `postern_upstream_tls_failures_total`.
        reason: &'static str,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The HTTP handshake (HTTP/2 preface, settings) failed.
    #[error("upstream handshake with {addr} failed")]
    Handshake {
        /// Endpoint address.
        addr: SocketAddr,
        /// Cause.
        #[source]
        source: hyper::Error,
    },
    /// The connection failed or was reset while the request was in flight.
    #[error("upstream {addr} reset the request")]
    Reset {
        /// Endpoint address.
        addr: SocketAddr,
        /// Cause.
        #[source]
        source: hyper::Error,
    },
    /// The endpoint provably did not process the request: it reset the
    /// stream with `REFUSED_STREAM` (RFC 9113 §8.7), so sending it again
    /// anywhere is safe.
    #[error("upstream {addr} refused the request unprocessed")]
    Refused {
        /// Endpoint address.
        addr: SocketAddr,
        /// Cause.
        #[source]
        source: hyper::Error,
    },
    /// The request body from downstream failed (client went away or sent too much).
    #[error("request body failed")]
    RequestBody(#[source] hyper::Error),
}

impl UpstreamError {
    /// The error with its causes, `: `-separated, for logs.
    pub fn chain(&self) -> ErrorChain<'_> {
        ErrorChain(self)
    }

    /// Whether the failure happened before a connection to the endpoint existed.
    pub fn is_connect_failure(&self) -> bool {
        matches!(
            self,
            UpstreamError::ConnectTimeout(_)
                | UpstreamError::Connect { .. }
                | UpstreamError::Tls { .. }
                | UpstreamError::Handshake { .. }
        )
    }
}

/// How many times one request is sent again on its own after the endpoint
/// refused it unprocessed. Once: a peer that refuses again is likely
/// overloaded or going away, and the route's retry policy (with its budget
/// and another endpoint) is the place to try harder; otherwise a 502.
const MAX_UNPROCESSED_RESENDS: u32 = 1;

/// The peer's own HTTP/2 error in `error`'s causes, if any.
fn remote_h2_error(error: &hyper::Error) -> Option<&h2::Error> {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = current {
        if let Some(h2) = e.downcast_ref::<h2::Error>() {
            return h2.is_remote().then_some(h2);
        }
        current = e.source();
    }
    None
}

/// Whether the peer reset the stream with `REFUSED_STREAM`, which RFC 9113
/// §8.7 guarantees it did not process.
///
/// A graceful GOAWAY is not counted: hyper reports the same error for a
/// stream the GOAWAY left out and for one whose HEADERS had already gone
/// (its dispatch fails a request whose stream it opened when the GOAWAY
/// lands between two polls), and sending that one again was seen to run
/// it twice (`push_races.rs`).
fn refused_unprocessed(error: &hyper::Error) -> bool {
    remote_h2_error(error)
        .is_some_and(|e| e.is_reset() && e.reason() == Some(h2::Reason::REFUSED_STREAM))
}

/// Whether the peer went away gracefully (GOAWAY `NO_ERROR`).
fn gone_away(error: &hyper::Error) -> bool {
    remote_h2_error(error)
        .is_some_and(|e| e.is_go_away() && e.reason() == Some(h2::Reason::NO_ERROR))
}

/// A copy of `request` to send again if the first send is refused
/// unprocessed; only for bodies that can be replayed whole (a streamed
/// body is consumed by the first send).
fn resendable_copy(request: &Request<RequestBody>) -> Option<Request<RequestBody>> {
    let body = match request.body() {
        RequestBody::Empty => RequestBody::Empty,
        RequestBody::Replay { data, trailers } => RequestBody::Replay {
            data: data.clone(),
            trailers: trailers.clone(),
        },
        RequestBody::Streaming { .. } => return None,
    };
    let mut copy = Request::new(body);
    *copy.method_mut() = request.method().clone();
    *copy.uri_mut() = request.uri().clone();
    *copy.version_mut() = request.version();
    *copy.headers_mut() = request.headers().clone();
    *copy.extensions_mut() = request.extensions().clone();
    Some(copy)
}

/// An error and its causes, displayed `: `-separated.
#[derive(Debug)]
pub struct ErrorChain<'a>(&'a UpstreamError);

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = std::error::Error::source(self.0);
        while let Some(e) = source {
            write!(f, ": {e}")?;
            source = e.source();
        }
        Ok(())
    }
}

/// A failed send, with the request when it never left.
#[derive(Debug)]
pub struct SendError {
    /// What went wrong.
    pub error: UpstreamError,
    /// The request, when nothing of it was sent.
    pub unsent: Option<Request<RequestBody>>,
}

/// Cluster-wide connection accounting shared by all endpoint pools.
#[derive(Debug)]
pub struct ConnectionLimits {
    open: AtomicUsize,
    pending: AtomicUsize,
    max_connections: usize,
    max_pending: usize,
    changed: Notify,
    open_gauge: metrics::Gauge,
}

impl ConnectionLimits {
    /// Limits from the circuit breaker settings; `open_gauge` follows the open count.
    pub fn new(
        max_connections: usize,
        max_pending: usize,
        open_gauge: metrics::Gauge,
    ) -> Arc<Self> {
        Arc::new(ConnectionLimits {
            open: AtomicUsize::new(0),
            pending: AtomicUsize::new(0),
            max_connections,
            max_pending,
            changed: Notify::new(),
            open_gauge,
        })
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Counts a new connection, unless `max_connections` are open.
    pub fn try_open(self: &Arc<Self>) -> Option<ConnectionPermit> {
        let mut current = self.open.load(Ordering::Relaxed);
        loop {
            if current >= self.max_connections {
                return None;
            }
            match self.open.compare_exchange_weak(
                current,
                current + 1,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => {
                    self.open_gauge.increment(1.0);
                    return Some(ConnectionPermit(self.clone()));
                }
                Err(actual) => current = actual,
            }
        }
    }

    fn try_pend(self: &Arc<Self>) -> Option<PendingGuard> {
        let previous = self.pending.fetch_add(1, Ordering::AcqRel);
        if previous >= self.max_pending {
            self.pending.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(PendingGuard(self.clone()))
    }
}

/// Held by a connection's driver task for as long as the connection is open.
#[derive(Debug)]
pub struct ConnectionPermit(Arc<ConnectionLimits>);

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
        self.0.open_gauge.decrement(1.0);
        self.0.changed.notify_waiters();
    }
}

#[derive(Debug)]
struct PendingGuard(Arc<ConnectionLimits>);

impl Drop for PendingGuard {
    fn drop(&mut self) {
        self.0.pending.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Settings every endpoint pool of a cluster shares.
#[derive(Debug, Clone)]
pub struct PoolSettings {
    /// Protocol to speak.
    pub protocol: UpstreamProtocol,
    /// TLS to the endpoint, if any.
    pub tls: Option<Arc<UpstreamTls>>,
    /// TCP connect timeout.
    pub connect_timeout: Duration,
    /// Idle HTTP/1.1 connections kept per endpoint.
    pub max_idle: usize,
    /// How long an idle connection is kept.
    pub idle_timeout: Duration,
}

struct IdleConn {
    sender: http1::SendRequest<RequestBody>,
    since: Instant,
}

/// The connections to one endpoint.
pub struct EndpointPool {
    address: SocketAddr,
    settings: Arc<PoolSettings>,
    limits: Arc<ConnectionLimits>,
    idle: Mutex<Vec<IdleConn>>,
    shared_h2: Mutex<Option<SharedH2>>,
    /// Numbers each shared HTTP/2 connection, so a request failed on an old
    /// one cannot drop the one that replaced it.
    h2_generations: std::sync::atomic::AtomicU64,
    h2_connecting: tokio::sync::Mutex<()>,
    /// The SPIFFE ID the endpoint proved at its last mesh handshake.
    peer_principal: arc_swap::ArcSwapOption<PeerPrincipal>,
    /// The workload metadata the endpoint's sidecar last sent.
    peer_meta: arc_swap::ArcSwapOption<http::HeaderValue>,
}

/// A verified upstream SPIFFE ID, shared by the calls that reach it.
#[derive(Debug)]
struct PeerPrincipal(Arc<str>);

impl std::fmt::Debug for EndpointPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EndpointPool")
            .field("address", &self.address)
            .finish()
    }
}

/// An HTTP/1.1 connection lent to one request; give it back with [`PooledConnection::release`].
pub struct PooledConnection {
    sender: Option<http1::SendRequest<RequestBody>>,
    pool: Arc<EndpointPool>,
}

impl PooledConnection {
    /// Returns the connection to its pool for the next request.
    pub fn release(mut self) {
        if let Some(sender) = self.sender.take() {
            self.pool.put_idle(sender);
        }
    }
}

impl std::fmt::Debug for PooledConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PooledConnection")
            .field("address", &self.pool.address)
            .finish()
    }
}

/// The HTTP/2 connection requests to an endpoint share, and its number.
struct SharedH2 {
    generation: u64,
    sender: http2::SendRequest<RequestBody>,
}

enum Checkout {
    Http1 {
        sender: http1::SendRequest<RequestBody>,
        reused: bool,
    },
    Http2 {
        sender: http2::SendRequest<RequestBody>,
        generation: u64,
    },
}

impl EndpointPool {
    /// A pool for one endpoint.
    pub fn new(
        address: SocketAddr,
        settings: Arc<PoolSettings>,
        limits: Arc<ConnectionLimits>,
    ) -> Arc<Self> {
        Arc::new(EndpointPool {
            address,
            settings,
            limits,
            idle: Mutex::new(Vec::new()),
            shared_h2: Mutex::new(None),
            h2_generations: std::sync::atomic::AtomicU64::new(0),
            h2_connecting: tokio::sync::Mutex::new(()),
            peer_principal: arc_swap::ArcSwapOption::empty(),
            peer_meta: arc_swap::ArcSwapOption::empty(),
        })
    }

    /// The workload metadata the endpoint's sidecar last sent.
    pub fn peer_meta(&self) -> Option<http::HeaderValue> {
        self.peer_meta.load().as_deref().cloned()
    }

    /// Keeps the metadata a response carried, for calls that get no response.
    pub fn note_peer_meta(&self, meta: &http::HeaderValue) {
        if self.peer_meta.load().as_deref() != Some(meta) {
            self.peer_meta.store(Some(Arc::new(meta.clone())));
        }
    }

    /// The endpoint's address.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// The SPIFFE ID the endpoint proved at its last mesh handshake.
    pub fn peer_principal(&self) -> Option<Arc<str>> {
        self.peer_principal.load().as_ref().map(|p| p.0.clone())
    }

    /// Sends a request on a pooled or new connection. For HTTP/1.1 the
    /// connection comes back with the response, to be released when its body ends.
    ///
    /// When the request never left (no connection could be had), it comes
    /// back with the error so that it can be sent elsewhere.
    pub async fn send(
        self: &Arc<Self>,
        mut request: Request<RequestBody>,
    ) -> Result<(Response<Incoming>, Option<PooledConnection>), SendError> {
        let mut resends = 0;
        loop {
            let checkout = match self.checkout().await {
                Ok(checkout) => checkout,
                Err(error) => {
                    return Err(SendError {
                        error,
                        unsent: Some(request),
                    })
                }
            };
            match checkout {
                Checkout::Http2 {
                    mut sender,
                    generation,
                } => {
                    let copy = (resends < MAX_UNPROCESSED_RESENDS)
                        .then(|| resendable_copy(&request))
                        .flatten();
                    let sent = sender.try_send_request(request);
                    // A request queued just as the connection's dispatch task
                    // ends is only handed back (canceled, unsent) once every
                    // handle to the connection is gone; holding this one
                    // while waiting would wait forever, until the route
                    // deadline answers 504 (`push_races.rs`).
                    drop(sender);
                    let mut err = match sent.await {
                        Ok(response) => return Ok((response, None)),
                        Err(err) => err,
                    };
                    match err.take_message() {
                        // The connection closed before the request went out: take a new one.
                        Some(unsent) if err.error().is_canceled() || err.error().is_closed() => {
                            self.forget_closed_h2();
                            request = unsent;
                            continue;
                        }
                        _ => {}
                    }
                    let source = err.into_error();
                    if gone_away(&source) {
                        // hyper marks the connection closed only once its
                        // dispatch task sees the GOAWAY, which may be after
                        // this request does: the next checkout must not get it.
                        self.drop_shared_h2(generation);
                    }
                    if !refused_unprocessed(&source) {
                        return Err(SendError {
                            error: self.request_error(source),
                            unsent: None,
                        });
                    }
                    tracing::debug!(
                        upstream = %self.address,
                        resent = copy.is_some(),
                        "upstream refused a stream unprocessed"
                    );
                    match copy {
                        Some(copy) => {
                            resends += 1;
                            request = copy;
                            continue;
                        }
                        None => {
                            return Err(SendError {
                                error: UpstreamError::Refused {
                                    addr: self.address,
                                    source,
                                },
                                unsent: None,
                            })
                        }
                    }
                }
                Checkout::Http1 { mut sender, reused } => {
                    if let Err(source) = sender.ready().await {
                        if reused {
                            continue;
                        }
                        return Err(SendError {
                            error: self.request_error(source),
                            unsent: Some(request),
                        });
                    }
                    match sender.try_send_request(request).await {
                        Ok(response) => {
                            let pooled = PooledConnection {
                                sender: Some(sender),
                                pool: self.clone(),
                            };
                            return Ok((response, Some(pooled)));
                        }
                        Err(mut err) => match err.take_message() {
                            // A kept-alive connection the server had already closed: the
                            // request never left, so sending it on a new one is safe.
                            Some(unsent) if reused => {
                                request = unsent;
                                continue;
                            }
                            _ => {
                                return Err(SendError {
                                    error: self.request_error(err.into_error()),
                                    unsent: None,
                                })
                            }
                        },
                    }
                }
            }
        }
    }

    fn request_error(&self, source: hyper::Error) -> UpstreamError {
        if source.is_user() {
            // hyper reports a failing request body as a user error.
            return UpstreamError::RequestBody(source);
        }
        UpstreamError::Reset {
            addr: self.address,
            source,
        }
    }

    async fn checkout(self: &Arc<Self>) -> Result<Checkout, UpstreamError> {
        let mut pending: Option<PendingGuard> = None;
        loop {
            let changed = self.limits.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();

            match self.settings.protocol {
                UpstreamProtocol::Http1 => {
                    if let Some(sender) = self.take_idle() {
                        return Ok(Checkout::Http1 {
                            sender,
                            reused: true,
                        });
                    }
                    if let Some(permit) = self.limits.try_open() {
                        // Boxed: connecting is rare, and inlined its state would
                        // grow every request's future (and the copies of it).
                        let sender = Box::pin(self.connect_h1(permit)).await?;
                        return Ok(Checkout::Http1 {
                            sender,
                            reused: false,
                        });
                    }
                }
                UpstreamProtocol::Http2 => {
                    if let Some(checkout) = self.live_h2() {
                        return Ok(checkout);
                    }
                    let _connecting = self.h2_connecting.lock().await;
                    if let Some(checkout) = self.live_h2() {
                        return Ok(checkout);
                    }
                    if let Some(permit) = self.limits.try_open() {
                        let generation = self
                            .h2_generations
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let sender = Box::pin(self.connect_h2(permit, generation)).await?;
                        if let Ok(mut shared) = self.shared_h2.lock() {
                            *shared = Some(SharedH2 {
                                generation,
                                sender: sender.clone(),
                            });
                        }
                        return Ok(Checkout::Http2 { sender, generation });
                    }
                }
            }
            if pending.is_none() {
                pending = Some(
                    self.limits
                        .try_pend()
                        .ok_or(UpstreamError::Overloaded("pending requests"))?,
                );
            }
            changed.await;
        }
    }

    fn take_idle(&self) -> Option<http1::SendRequest<RequestBody>> {
        let mut idle = self.idle.lock().ok()?;
        while let Some(conn) = idle.pop() {
            if conn.since.elapsed() < self.settings.idle_timeout && !conn.sender.is_closed() {
                return Some(conn.sender);
            }
        }
        None
    }

    fn put_idle(&self, sender: http1::SendRequest<RequestBody>) {
        if sender.is_closed() {
            return;
        }
        if let Ok(mut idle) = self.idle.lock() {
            if idle.len() < self.settings.max_idle {
                idle.push(IdleConn {
                    sender,
                    since: Instant::now(),
                });
            }
        }
        self.limits.changed.notify_waiters();
    }

    /// Closes idle connections past the idle timeout.
    pub fn reap_idle(&self) {
        if let Ok(mut idle) = self.idle.lock() {
            let timeout = self.settings.idle_timeout;
            idle.retain(|c| c.since.elapsed() < timeout && !c.sender.is_closed());
        }
    }

    fn live_h2(&self) -> Option<Checkout> {
        let shared = self.shared_h2.lock().ok()?;
        shared
            .as_ref()
            .filter(|s| !s.sender.is_closed())
            .map(|s| Checkout::Http2 {
                sender: s.sender.clone(),
                generation: s.generation,
            })
    }

    fn forget_closed_h2(&self) {
        if let Ok(mut shared) = self.shared_h2.lock() {
            if shared.as_ref().is_some_and(|s| s.sender.is_closed()) {
                *shared = None;
            }
        }
    }

    /// Stops handing out connection `generation`, unless another has
    /// already replaced it: one GOAWAY fails many requests, and the last of
    /// them to wake must not drop the fresh connection the first one made.
    fn drop_shared_h2(&self, generation: u64) {
        if let Ok(mut shared) = self.shared_h2.lock() {
            if shared.as_ref().is_some_and(|s| s.generation == generation) {
                *shared = None;
            }
        }
    }

    async fn connect_tcp(&self) -> Result<TokioIo<UpstreamIo>, UpstreamError> {
        let addr = self.address;
        // The connect timeout covers the TLS handshake too: a peer that
        // accepts and then stalls is as dead as one that never answers.
        let connect = async {
            let stream = TcpStream::connect(addr)
                .await
                .map_err(|source| UpstreamError::Connect { addr, source })?;
            // Small request and response heads must not wait for Nagle.
            let _ = stream.set_nodelay(true);
            match &self.settings.tls {
                None => Ok(UpstreamIo::Plain(stream)),
                Some(tls) => match tls.connect(stream).await {
                    Ok(stream) => {
                        if tls.force_http2 {
                            self.note_principal(&stream);
                        }
                        Ok(UpstreamIo::Tls(Box::new(stream)))
                    }
                    Err(source) => Err(UpstreamError::Tls {
                        addr,
                        reason: io_failure_reason(&source),
                        source,
                    }),
                },
            }
        };
        let io = tokio::time::timeout(self.settings.connect_timeout, connect)
            .await
            .map_err(|_| UpstreamError::ConnectTimeout(addr))??;
        Ok(TokioIo::new(io))
    }

    fn note_principal(&self, stream: &tokio_rustls::client::TlsStream<TcpStream>) {
        let id = stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(postern_certs::peer_spiffe_id);
        let same = match (&id, &*self.peer_principal.load()) {
            (Some(id), Some(known)) => id.as_str() == &*known.0,
            _ => false,
        };
        if !same {
            self.peer_principal
                .store(id.map(|id| Arc::new(PeerPrincipal(Arc::from(id.as_str())))));
        }
    }

    fn handshake_failed(&self, source: hyper::Error) -> UpstreamError {
        UpstreamError::Handshake {
            addr: self.address,
            source,
        }
    }

    async fn connect_h1(
        &self,
        permit: ConnectionPermit,
    ) -> Result<http1::SendRequest<RequestBody>, UpstreamError> {
        let io = self.connect_tcp().await?;
        let (sender, conn) = http1::Builder::new()
            .writev(false)
            .handshake(io)
            .await
            .map_err(|e| self.handshake_failed(e))?;
        drive_connection(permit, conn.with_upgrades(), "http/1.1");
        Ok(sender)
    }

    async fn connect_h2(
        self: &Arc<Self>,
        permit: ConnectionPermit,
        generation: u64,
    ) -> Result<http2::SendRequest<RequestBody>, UpstreamError> {
        let io = self.connect_tcp().await?;
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10))
            .handshake(io)
            .await
            .map_err(|e| self.handshake_failed(e))?;
        let pool = Arc::downgrade(self);
        let conn = async move {
            let ended = conn.await;
            // hyper hands a request queued as the connection ended back only
            // once no handle to it is left: the pool's must go with it, or
            // a lone request waits for its route deadline.
            if let Some(pool) = pool.upgrade() {
                pool.drop_shared_h2(generation);
            }
            ended
        };
        drive_connection(permit, conn, "http/2");
        Ok(sender)
    }
}

/// Runs an upstream connection in its own task; the permit counts it as open
/// until it ends.
fn drive_connection<F>(permit: ConnectionPermit, conn: F, protocol: &'static str)
where
    F: std::future::Future<Output = hyper::Result<()>> + Send + 'static,
{
    tokio::spawn(async move {
        let _permit = permit;
        if let Err(err) = conn.await {
            tracing::debug!(error = %err, protocol, "upstream connection ended with an error");
        }
    });
}

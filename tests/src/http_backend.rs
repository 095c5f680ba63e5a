//! An HTTP echo backend (HTTP/1.1 and h2c on one port) that records every
//! request and answers as the test tells it.
//!
//! Control, per request, by header:
//!
//! | header | effect |
//! |---|---|
//! | `x-test-status: N` | answer status `N` (default 200) |
//! | `x-test-delay-ms: N` | wait `N` ms before the response head |
//! | `x-test-body-bytes: N` | answer a generated body of `N` bytes, streamed in 64 KiB chunks |
//! | `x-test-discard-body: true` | count the request body but do not keep or echo it |
//! | `x-test-reset: true` | drop the connection (HTTP/1) or reset the stream (HTTP/2) instead of answering |
//!
//! Otherwise the request body is echoed back. Every response carries
//! `x-backend: <name>` and `x-received-bytes: <request body length>`.
//!
//! Control, per backend: [`HttpBackend::script`] queues [`Reply`]s that the
//! next requests get (before any header control), and
//! [`HttpBackend::set_default`] sets one that every request gets while the
//! queue is empty.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::{BodyExt as _, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};

use crate::client::{full, Body, BoxError};

/// One request as the backend saw it.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    /// Method.
    pub method: Method,
    /// URI as received (origin form for HTTP/1.1, absolute for HTTP/2).
    pub uri: Uri,
    /// HTTP version the request came in on.
    pub version: Version,
    /// Request headers.
    pub headers: HeaderMap,
    /// Request body length in bytes.
    pub body_len: u64,
    /// The peer: the proxy's side of the upstream connection.
    pub peer: SocketAddr,
}

impl RecordedRequest {
    /// The value of header `name`, if present and valid UTF-8.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The host the request was for: `:authority` or `Host`.
    pub fn host(&self) -> Option<String> {
        self.uri
            .authority()
            .map(|a| a.as_str().to_owned())
            .or_else(|| self.header("host").map(str::to_owned))
    }

    /// Path and query, e.g. `/a/b?c=d`.
    pub fn path_and_query(&self) -> String {
        self.uri
            .path_and_query()
            .map_or_else(|| "/".to_owned(), |p| p.as_str().to_owned())
    }
}

/// A scripted answer for the next request (see [`HttpBackend::script`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reply {
    /// Status to answer; the header control or 200 when `None`.
    pub status: Option<u16>,
    /// Wait before the response head.
    pub delay: Option<Duration>,
    /// Drop the connection / reset the stream instead of answering.
    pub reset: bool,
}

impl Reply {
    /// Answer with `status`.
    pub fn status(status: u16) -> Self {
        Self {
            status: Some(status),
            ..Self::default()
        }
    }

    /// Answer 200 after `delay`.
    pub fn delay(delay: Duration) -> Self {
        Self {
            delay: Some(delay),
            ..Self::default()
        }
    }

    /// Drop the connection without answering.
    pub fn reset() -> Self {
        Self {
            reset: true,
            ..Self::default()
        }
    }
}

#[derive(Debug, Default)]
struct State {
    name: String,
    log: Mutex<Vec<RecordedRequest>>,
    started: AtomicUsize,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    connections: AtomicUsize,
    bytes_received: AtomicU64,
    bytes_sent: AtomicU64,
    script: Mutex<VecDeque<Reply>>,
    default: Mutex<Option<Reply>>,
    /// Speaks only HTTP/2 with prior knowledge: an HTTP/1.1 client fails.
    h2c_only: bool,
}

impl State {
    fn next_reply(&self) -> Option<Reply> {
        let scripted = self
            .script
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop_front();
        scripted.or_else(|| *self.default.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

/// A running HTTP echo backend; it stops when dropped.
#[derive(Debug)]
pub struct HttpBackend {
    addr: SocketAddr,
    state: Arc<State>,
    task: JoinHandle<()>,
}

impl HttpBackend {
    /// Starts a backend on `127.0.0.1:0` that names itself `name` in
    /// `x-backend`.
    ///
    /// # Panics
    ///
    /// If it cannot bind.
    pub async fn start(name: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind backend");
        let addr = listener.local_addr().expect("backend addr");
        let state = Arc::new(State {
            name: name.to_owned(),
            ..State::default()
        });
        let task = tokio::spawn(accept_loop(listener, Arc::clone(&state)));
        Self { addr, state, task }
    }

    /// Like [`HttpBackend::start`], but the backend speaks only h2c, as an
    /// app that never learnt HTTP/1.1 would.
    ///
    /// # Panics
    ///
    /// If it cannot bind.
    pub async fn start_h2c_only(name: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind backend");
        let addr = listener.local_addr().expect("backend addr");
        let state = Arc::new(State {
            name: name.to_owned(),
            h2c_only: true,
            ..State::default()
        });
        let task = tokio::spawn(accept_loop(listener, Arc::clone(&state)));
        Self { addr, state, task }
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its name, as sent in `x-backend`.
    pub fn name(&self) -> &str {
        &self.state.name
    }

    /// Every request whose body has been read, in order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.state
            .log
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The last request whose body has been read.
    ///
    /// # Panics
    ///
    /// If there was none.
    pub fn last_request(&self) -> RecordedRequest {
        self.requests()
            .pop()
            .unwrap_or_else(|| panic!("backend {} got no request", self.name()))
    }

    /// Requests whose head has arrived (counted before the body is read).
    pub fn started(&self) -> usize {
        self.state.started.load(Ordering::SeqCst)
    }

    /// Requests being handled right now.
    pub fn in_flight(&self) -> usize {
        self.state.in_flight.load(Ordering::SeqCst)
    }

    /// The most requests that were in flight at once.
    pub fn max_in_flight(&self) -> usize {
        self.state.max_in_flight.load(Ordering::SeqCst)
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.state.connections.load(Ordering::SeqCst)
    }

    /// Request body bytes received so far, over all requests, counted as
    /// they arrive.
    pub fn bytes_received(&self) -> u64 {
        self.state.bytes_received.load(Ordering::SeqCst)
    }

    /// Generated response body bytes (`x-test-body-bytes`) handed to the
    /// connection so far.
    pub fn bytes_sent(&self) -> u64 {
        self.state.bytes_sent.load(Ordering::SeqCst)
    }

    /// Queues `replies` for the next requests, one each.
    pub fn script(&self, replies: impl IntoIterator<Item = Reply>) {
        self.state
            .script
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend(replies);
    }

    /// Sets the reply every request gets while the script is empty
    /// (`None`: obey the control headers).
    pub fn set_default(&self, reply: Option<Reply>) {
        *self
            .state
            .default
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = reply;
    }
}

impl Drop for HttpBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn accept_loop(listener: TcpListener, state: Arc<State>) {
    // Connections live in the set so that aborting this task closes them all.
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, peer)) = accepted else { continue };
                state.connections.fetch_add(1, Ordering::SeqCst);
                let state = Arc::clone(&state);
                connections.spawn(async move {
                    let h2c_only = state.h2c_only;
                    let service = service_fn(move |req| handle(Arc::clone(&state), peer, req));
                    let mut builder = auto::Builder::new(TokioExecutor::new());
                    if h2c_only {
                        builder = builder.http2_only();
                    }
                    let _ = builder
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

struct InFlight(Arc<State>);

impl InFlight {
    fn new(state: Arc<State>) -> Self {
        let now = state.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        state.max_in_flight.fetch_max(now, Ordering::SeqCst);
        Self(state)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

fn header_value<T: std::str::FromStr>(headers: &HeaderMap, name: &str) -> Option<T> {
    headers.get(name)?.to_str().ok()?.trim().parse().ok()
}

async fn handle(
    state: Arc<State>,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> Result<Response<Body>, BoxError> {
    state.started.fetch_add(1, Ordering::SeqCst);
    let _in_flight = InFlight::new(Arc::clone(&state));
    let scripted = state.next_reply().unwrap_or_default();
    let (parts, mut body) = req.into_parts();
    let headers = &parts.headers;
    let status = scripted
        .status
        .or_else(|| header_value(headers, "x-test-status"))
        .unwrap_or(200);
    let delay = scripted
        .delay
        .or_else(|| header_value::<u64>(headers, "x-test-delay-ms").map(Duration::from_millis));
    let reset = scripted.reset
        || header_value::<String>(headers, "x-test-reset").is_some_and(|v| v == "true");
    let discard =
        header_value::<String>(headers, "x-test-discard-body").is_some_and(|v| v == "true");
    let generate: Option<u64> = header_value(headers, "x-test-body-bytes");

    let mut kept = Vec::new();
    let mut body_len = 0u64;
    while let Some(frame) = body.frame().await {
        let frame = frame?;
        if let Ok(data) = frame.into_data() {
            body_len += data.len() as u64;
            state
                .bytes_received
                .fetch_add(data.len() as u64, Ordering::SeqCst);
            if !discard {
                kept.extend_from_slice(&data);
            }
        }
    }
    state
        .log
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push(RecordedRequest {
            method: parts.method.clone(),
            uri: parts.uri.clone(),
            version: parts.version,
            headers: parts.headers.clone(),
            body_len,
            peer,
        });

    if let Some(delay) = delay {
        tokio::time::sleep(delay).await;
    }
    if reset {
        return Err("reset requested by the test".into());
    }
    let body = match generate {
        Some(len) => generated_body(len, Arc::clone(&state)),
        None => full(kept),
    };
    let mut response = Response::new(body);
    *response.status_mut() = StatusCode::from_u16(status)?;
    let h = response.headers_mut();
    h.insert("x-backend", state.name.parse()?);
    h.insert("x-received-bytes", body_len.into());
    Ok(response)
}

const CHUNK_LEN: usize = 64 * 1024;
static CHUNK: [u8; CHUNK_LEN] = [b'x'; CHUNK_LEN];

/// A body of `len` bytes made lazily, so a huge response costs no memory.
fn generated_body(len: u64, state: Arc<State>) -> Body {
    let chunks = futures_util::stream::unfold(len, move |left| {
        let state = Arc::clone(&state);
        async move {
            if left == 0 {
                return None;
            }
            let n = usize::try_from(left).map_or(CHUNK_LEN, |l| l.min(CHUNK_LEN));
            state.bytes_sent.fetch_add(n as u64, Ordering::SeqCst);
            let frame = Frame::data(Bytes::from_static(&CHUNK[..n]));
            Some((Ok::<_, Infallible>(frame), left - n as u64))
        }
    });
    StreamBody::new(chunks)
        .map_err(|never| match never {})
        .boxed()
}

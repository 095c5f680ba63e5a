//! The clients of the mixed load: HTTP/1.1 (sized and chunked bodies),
//! HTTP/2 (with trailers both ways), gRPC bidirectional streams and raw TCP,
//! each request with its own id, each outcome noted for the final check.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use futures_util::StreamExt as _;
use http::{HeaderName, Request};
use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

use super::body::{self, GenBody, Hasher};
use super::upstream::{
    ID, RECEIVED_SHA, REPLY_BYTES, REPLY_SHA, REPLY_SIZED, REPLY_TRAILER, REQUEST_SHA, UPSTREAM,
};
use crate::grpc::pb::echo_client::EchoClient;
use crate::grpc::pb::EchoRequest;
use crate::Body;

/// The protocol a request used between the client and the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proto {
    /// HTTP/1.1, body framed by `content-length`.
    Http1Sized,
    /// HTTP/1.1, chunked body.
    Http1Chunked,
    /// HTTP/2 (prior knowledge), trailers both ways.
    Http2,
    /// One message of a gRPC bidirectional stream.
    Grpc,
    /// One raw TCP connection.
    Tcp,
}

/// What the client saw of one request.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The request id.
    pub id: String,
    /// How it went to the proxy.
    pub proto: Proto,
    /// When it started, from the start of the run.
    pub started: Duration,
    /// From the first byte sent to the last received.
    pub latency: Duration,
    /// Length and SHA-256 of the body sent, and whether a trailer carried it.
    pub sent: (u64, String),
    /// Whether the request ended with a trailer holding its hash.
    pub trailer: bool,
    /// The reply: length and SHA-256 as received; or why there was none.
    pub reply: Result<(u64, String), String>,
}

/// Where outcomes go, shared by every client task.
#[derive(Debug)]
pub struct Journal {
    start: Instant,
    outcomes: Mutex<Vec<Outcome>>,
    /// Requests begun and not yet noted, with their protocol and start.
    in_flight: Mutex<std::collections::HashMap<String, (Proto, Duration)>>,
}

impl Journal {
    /// An empty journal whose clock starts now.
    pub fn new() -> Arc<Journal> {
        Arc::new(Journal {
            start: Instant::now(),
            outcomes: Mutex::new(Vec::new()),
            in_flight: Mutex::default(),
        })
    }

    /// Requests begun and not yet answered, oldest first, each as
    /// `id (proto, for N s)`: what a stuck run was waiting for.
    pub fn in_flight(&self) -> Vec<String> {
        let now = self.elapsed();
        let mut open: Vec<(Duration, String)> = self
            .in_flight
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(id, (proto, started))| {
                let age = now.saturating_sub(*started);
                (
                    *started,
                    format!("{id} ({proto:?}, for {:.1} s)", age.as_secs_f64()),
                )
            })
            .collect();
        open.sort();
        open.into_iter().map(|(_, line)| line).collect()
    }

    fn begin(&self, id: &str, proto: Proto) {
        self.in_flight
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id.to_owned(), (proto, self.elapsed()));
    }

    /// Every outcome so far.
    pub fn outcomes(&self) -> Vec<Outcome> {
        self.outcomes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Time since the journal was made.
    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }

    fn push(&self, outcome: Outcome) {
        self.in_flight
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&outcome.id);
        self.outcomes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(outcome);
    }
}

/// Body sizes the clients cycle through, request and reply offset so every
/// pairing comes up.
const SIZES: [u64; 9] = [
    0, 1, 1_000, 4_096, 16_389, 65_536, 100_000, 262_144, 1_048_579,
];

/// Request and reply size of the `n`th request of a client.
pub fn sizes(n: u64) -> (u64, u64) {
    let len = SIZES.len() as u64;
    (
        SIZES[(n % len) as usize],
        SIZES[((n / len + n * 4) % len) as usize],
    )
}

/// One HTTP request to send.
#[derive(Debug, Clone)]
pub struct HttpCall {
    /// Request id.
    pub id: String,
    /// Protocol, which decides framing and trailers.
    pub proto: Proto,
    /// Request body length.
    pub len: u64,
    /// Reply body length.
    pub reply_len: u64,
    /// Whether the reply is framed by its length.
    pub reply_sized: bool,
    /// Hold the body after half of it until this fires.
    pub gate: Option<Arc<Mutex<Option<tokio::sync::oneshot::Receiver<()>>>>>,
}

impl HttpCall {
    fn request(&self) -> (Request<Body>, body::Sent) {
        let h2 = self.proto == Proto::Http2;
        let sized = self.proto != Proto::Http1Chunked;
        let trailer = h2.then(|| HeaderName::from_static(REQUEST_SHA));
        let gen = GenBody::new(body::seed(&self.id), self.len, sized, trailer);
        let sent = gen.sent();
        let prefix = if h2 { "h2" } else { "h1" };
        let uri = if h2 {
            format!("http://load.test/{prefix}/{}", self.id)
        } else {
            format!("/{prefix}/{}", self.id)
        };
        let mut builder = Request::post(uri)
            .header(ID, &self.id)
            .header(REPLY_BYTES, self.reply_len)
            .header(REPLY_SIZED, if self.reply_sized { "1" } else { "0" })
            .header(REPLY_TRAILER, if h2 { "1" } else { "0" });
        if !h2 {
            builder = builder.header(http::header::HOST, "load.test");
        }
        let gate = self
            .gate
            .as_ref()
            .and_then(|g| g.lock().unwrap_or_else(PoisonError::into_inner).take());
        let body = match gate {
            Some(gate) => body::Gated::new(gen, self.len / 2, gate)
                .map_err(|never| match never {})
                .boxed(),
            None => gen.map_err(|never| match never {}).boxed(),
        };
        let request = builder.body(body).expect("request");
        (request, sent)
    }
}

/// Reads a reply whole, checking its head against `call`; returns length
/// and SHA-256 of its body.
async fn read_reply(
    call: &HttpCall,
    response: http::Response<Incoming>,
    sent: &body::Sent,
) -> anyhow::Result<(u64, String)> {
    let head = response.headers().clone();
    let status = response.status();
    let mut incoming = response.into_body();
    let mut hasher = Hasher::default();
    let mut trailer = None;
    while let Some(frame) = incoming.frame().await {
        let frame = frame.context("reply body")?;
        match frame.into_data() {
            Ok(data) => hasher.update(&data),
            Err(frame) => {
                if let Some(t) = frame.trailers_ref() {
                    trailer = t
                        .get(REPLY_SHA)
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned);
                }
            }
        }
    }
    let got = |name: &str| head.get(name).and_then(|v| v.to_str().ok()).unwrap_or("");
    if status != 200 {
        bail!("status {status} from {}", got("server"));
    }
    if got(ID) != call.id {
        bail!("reply for {:?} (from {})", got(ID), got(UPSTREAM));
    }
    if let Some((_, sha)) = sent.get() {
        if got(RECEIVED_SHA) != sha {
            bail!(
                "upstream {} received a body with another hash",
                got(UPSTREAM)
            );
        }
    }
    let (len, sha) = (hasher.len(), hasher.finish());
    if call.proto == Proto::Http2 && trailer.as_deref() != Some(sha.as_str()) {
        bail!("reply trailer {trailer:?}, body hash {sha}");
    }
    Ok((len, sha))
}

/// A connection to the proxy that HTTP requests go on.
pub enum Sender {
    /// HTTP/1.1, one request at a time.
    H1(hyper::client::conn::http1::SendRequest<Body>),
    /// HTTP/2, cloned per concurrent stream.
    H2(hyper::client::conn::http2::SendRequest<Body>),
}

impl Sender {
    /// Opens a connection to `addr` speaking `proto`'s HTTP version.
    ///
    /// # Errors
    ///
    /// When the connection or handshake fails.
    pub async fn connect(addr: SocketAddr, proto: Proto) -> anyhow::Result<Sender> {
        let tcp = TcpStream::connect(addr).await.context("connect")?;
        tcp.set_nodelay(true)?;
        let io = TokioIo::new(tcp);
        if proto == Proto::Http2 {
            let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
                .initial_stream_window_size(1 << 20)
                .initial_connection_window_size(4 << 20)
                .handshake(io)
                .await?;
            tokio::spawn(conn);
            Ok(Sender::H2(sender))
        } else {
            let (sender, conn) = hyper::client::conn::http1::handshake(io).await?;
            tokio::spawn(conn);
            Ok(Sender::H1(sender))
        }
    }

    /// Whether the connection can take no more requests.
    pub fn is_closed(&self) -> bool {
        match self {
            Sender::H1(s) => s.is_closed(),
            Sender::H2(s) => s.is_closed(),
        }
    }

    fn h2_clone(&self) -> Option<Sender> {
        match self {
            Sender::H2(s) => Some(Sender::H2(s.clone())),
            Sender::H1(_) => None,
        }
    }

    async fn send(&mut self, req: Request<Body>) -> hyper::Result<http::Response<Incoming>> {
        match self {
            Sender::H1(s) => {
                s.ready().await?;
                s.send_request(req).await
            }
            Sender::H2(s) => {
                s.ready().await?;
                s.send_request(req).await
            }
        }
    }
}

/// Sends `call` on `sender`, notes the outcome and returns whether it went
/// well (if not, the connection is best dropped).
pub async fn call_http(journal: &Journal, sender: &mut Sender, call: HttpCall) -> bool {
    journal.begin(&call.id, call.proto);
    let started = journal.elapsed();
    let t0 = Instant::now();
    let (request, sent) = call.request();
    let reply = match sender.send(request).await {
        Ok(response) => read_reply(&call, response, &sent)
            .await
            .map_err(|e| format!("{e:#}")),
        Err(e) => Err(format!("send: {e}")),
    };
    let ok = reply.is_ok();
    journal.push(Outcome {
        sent: sent
            .get()
            .unwrap_or((call.len, "<body not sent whole>".into())),
        id: call.id,
        proto: call.proto,
        started,
        latency: t0.elapsed(),
        trailer: call.proto == Proto::Http2,
        reply,
    });
    ok
}

/// Notes a request that could not even be sent.
pub fn failed(journal: &Journal, id: String, proto: Proto, why: String) {
    journal.push(Outcome {
        id,
        proto,
        started: journal.elapsed(),
        latency: Duration::ZERO,
        sent: (0, String::new()),
        trailer: false,
        reply: Err(why),
    });
}

/// Sends `call` on a connection of its own.
pub async fn http_once(addr: SocketAddr, journal: &Journal, call: HttpCall) -> bool {
    match Sender::connect(addr, call.proto).await {
        Ok(mut sender) => call_http(journal, &mut sender, call).await,
        Err(e) => {
            failed(journal, call.id, call.proto, format!("{e:#}"));
            false
        }
    }
}

/// HTTP/1.1 keep-alive requests until `stop`, alternating sized and
/// chunked bodies; ids `{name}-{n}`.
pub async fn http1_worker(
    addr: SocketAddr,
    journal: Arc<Journal>,
    stop: Arc<AtomicBool>,
    name: String,
) {
    let mut sender: Option<Sender> = None;
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let (len, reply_len) = sizes(n);
        let proto = if n.is_multiple_of(2) {
            Proto::Http1Sized
        } else {
            Proto::Http1Chunked
        };
        let call = HttpCall {
            id: format!("{name}-{n}"),
            proto,
            len,
            reply_len,
            reply_sized: !n.is_multiple_of(3),
            gate: None,
        };
        if sender.as_ref().is_none_or(Sender::is_closed) {
            match Sender::connect(addr, proto).await {
                Ok(s) => sender = Some(s),
                Err(e) => {
                    failed(&journal, call.id, proto, format!("{e:#}"));
                    continue;
                }
            }
        }
        let Some(conn) = sender.as_mut() else {
            continue;
        };
        if !call_http(&journal, conn, call).await {
            sender = None;
        }
    }
}

/// `streams` concurrent HTTP/2 streams on one connection until `stop`;
/// ids `{name}-{stream}-{n}`.
pub async fn http2_worker(
    addr: SocketAddr,
    journal: Arc<Journal>,
    stop: Arc<AtomicBool>,
    name: String,
    streams: usize,
) {
    let shared: Arc<tokio::sync::Mutex<Option<Sender>>> = Arc::default();
    let mut tasks = tokio::task::JoinSet::new();
    for stream in 0..streams {
        let (journal, stop, shared, name) =
            (journal.clone(), stop.clone(), shared.clone(), name.clone());
        tasks.spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let (len, reply_len) = sizes(n + stream as u64);
                let call = HttpCall {
                    id: format!("{name}-{stream}-{n}"),
                    proto: Proto::Http2,
                    len,
                    reply_len,
                    reply_sized: n.is_multiple_of(2),
                    gate: None,
                };
                let sender = {
                    let mut guard = shared.lock().await;
                    if guard.as_ref().is_none_or(Sender::is_closed) {
                        match Sender::connect(addr, Proto::Http2).await {
                            Ok(s) => *guard = Some(s),
                            Err(e) => {
                                failed(&journal, call.id, Proto::Http2, format!("{e:#}"));
                                continue;
                            }
                        }
                    }
                    guard.as_ref().and_then(Sender::h2_clone)
                };
                let Some(mut sender) = sender else { continue };
                if !call_http(&journal, &mut sender, call).await {
                    *shared.lock().await = None;
                }
            }
        });
    }
    while tasks.join_next().await.is_some() {}
}

/// One TCP connection: a line `id len reply_len`, the body; then reads the
/// upstream's hash line and the reply to EOF.
pub async fn tcp_call(
    addr: SocketAddr,
    journal: &Journal,
    id: String,
    len: u64,
    reply_len: u64,
) -> bool {
    journal.begin(&id, Proto::Tcp);
    let started = journal.elapsed();
    let t0 = Instant::now();
    let result = tcp_exchange(addr, &id, len, reply_len).await;
    let (sent, reply) = match result {
        Ok((sent, reply)) => (sent, Ok(reply)),
        Err(e) => ((len, String::new()), Err(format!("{e:#}"))),
    };
    let ok = reply.is_ok();
    journal.push(Outcome {
        id,
        proto: Proto::Tcp,
        started,
        latency: t0.elapsed(),
        sent,
        trailer: false,
        reply,
    });
    ok
}

type Digest = (u64, String);

async fn tcp_exchange(
    addr: SocketAddr,
    id: &str,
    len: u64,
    reply_len: u64,
) -> anyhow::Result<(Digest, Digest)> {
    let stream = TcpStream::connect(addr).await.context("connect")?;
    stream.set_nodelay(true)?;
    let (read, mut write) = stream.into_split();
    let writer = async {
        write
            .write_all(format!("{id} {len} {reply_len}\n").as_bytes())
            .await?;
        let seed = body::seed(id);
        let mut hasher = Hasher::default();
        while hasher.len() < len {
            let n = usize::try_from(len - hasher.len())
                .map_or(body::FRAME_LEN, |l| l.min(body::FRAME_LEN));
            let data = body::frame(seed, hasher.len(), n);
            write.write_all(&data).await?;
            hasher.update(&data);
        }
        anyhow::Ok((hasher.len(), hasher.finish()))
    };
    let reader = async {
        let mut read = tokio::io::BufReader::new(read);
        let mut line = String::new();
        read.read_line(&mut line).await.context("hash line")?;
        let mut hasher = Hasher::default();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = read.read(&mut buf).await.context("reply")?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
        anyhow::Ok((line.trim().to_owned(), hasher))
    };
    let (sent, (line, hasher)) = tokio::try_join!(writer, reader)?;
    drop(write);
    if line.is_empty() {
        bail!("closed before the upstream answered");
    }
    if line != sent.1 {
        bail!("the upstream received a body with hash {line}");
    }
    let reply = (hasher.len(), hasher.finish());
    if reply.0 != reply_len {
        bail!("reply of {} bytes, {reply_len} asked", reply.0);
    }
    Ok((sent, reply))
}

/// TCP requests, one connection each, until `stop`; ids `{name}-{n}`.
pub async fn tcp_worker(
    addr: SocketAddr,
    journal: Arc<Journal>,
    stop: Arc<AtomicBool>,
    name: String,
) {
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let (len, reply_len) = sizes(n);
        tcp_call(addr, &journal, format!("{name}-{n}"), len, reply_len).await;
    }
}

/// A gRPC client for the proxy at `addr`, allowing messages of 16 MiB.
///
/// # Errors
///
/// When the connection cannot be made.
pub async fn grpc_client(
    addr: SocketAddr,
) -> anyhow::Result<EchoClient<tonic::transport::Channel>> {
    Ok(EchoClient::connect(format!("http://{addr}"))
        .await?
        .max_decoding_message_size(16 << 20)
        .max_encoding_message_size(16 << 20))
}

/// One bidirectional chat whose messages are `(id, payload length)`: each
/// reply must be its message, in order.
pub async fn grpc_chat(
    client: &mut EchoClient<tonic::transport::Channel>,
    journal: &Journal,
    messages: Vec<(String, usize)>,
) -> bool {
    for (id, _) in &messages {
        journal.begin(id, Proto::Grpc);
    }
    let started = journal.elapsed();
    let t0 = Instant::now();
    let sent: Arc<Mutex<Vec<Digest>>> = Arc::default();
    let outbound = {
        let sent = sent.clone();
        futures_util::stream::iter(messages.clone()).map(move |(id, len)| {
            let message = format!("{id}|{}", body::text(body::seed(&id), len));
            sent.lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push((message.len() as u64, body::sha256_hex(message.as_bytes())));
            EchoRequest { message, repeat: 0 }
        })
    };
    let mut replies: Vec<Result<Digest, String>> = Vec::with_capacity(messages.len());
    match client.chat(outbound).await {
        Ok(response) => {
            let mut inbound = response.into_inner();
            loop {
                match inbound.message().await {
                    Ok(Some(reply)) => replies.push(Ok((
                        reply.message.len() as u64,
                        body::sha256_hex(reply.message.as_bytes()),
                    ))),
                    Ok(None) => break,
                    Err(status) => {
                        replies.push(Err(format!("stream ended with {status}")));
                        break;
                    }
                }
            }
        }
        Err(status) => replies.push(Err(format!("chat refused: {status}"))),
    }
    let latency = t0.elapsed();
    let sent = sent.lock().unwrap_or_else(PoisonError::into_inner).clone();
    let mut ok = true;
    for (i, (id, len)) in messages.into_iter().enumerate() {
        let digest = sent.get(i).cloned();
        let reply = match (replies.get(i), &digest) {
            (Some(Ok(got)), Some(want)) if got == want => Ok(got.clone()),
            (Some(Ok(got)), _) => Err(format!(
                "reply {got:?} is not the message sent ({digest:?})"
            )),
            (Some(Err(e)), _) => Err(e.clone()),
            (None, _) => Err(replies
                .last()
                .and_then(|r| r.clone().err())
                .unwrap_or_else(|| "no reply".into())),
        };
        ok &= reply.is_ok();
        journal.push(Outcome {
            id,
            proto: Proto::Grpc,
            started,
            latency,
            sent: digest.unwrap_or((len as u64, String::new())),
            trailer: false,
            reply,
        });
    }
    ok
}

/// gRPC chats of `per_chat` messages on one channel until `stop`; message
/// ids `{name}-{chat}-{i}`.
pub async fn grpc_worker(
    addr: SocketAddr,
    journal: Arc<Journal>,
    stop: Arc<AtomicBool>,
    name: String,
    per_chat: usize,
) {
    let mut client = None;
    let mut chat = 0u64;
    while !stop.load(Ordering::Relaxed) {
        chat += 1;
        let messages: Vec<(String, usize)> = (0..per_chat)
            .map(|i| {
                let len = sizes(chat * per_chat as u64 + i as u64).0.min(256 * 1024);
                (format!("{name}-{chat}-{i}"), len as usize)
            })
            .collect();
        if client.is_none() {
            match grpc_client(addr).await {
                Ok(c) => client = Some(c),
                Err(e) => {
                    for (id, _) in messages {
                        failed(&journal, id, Proto::Grpc, format!("{e:#}"));
                    }
                    continue;
                }
            }
        }
        let Some(c) = client.as_mut() else { continue };
        if !grpc_chat(c, &journal, messages).await {
            client = None;
        }
    }
}

//! The upstreams behind the proxy under load, and their ledger: every
//! request id that reached one, how often, with the length and SHA-256 of
//! the body as received and of the reply as sent.
//!
//! Each upstream listens three times: HTTP (HTTP/1.1 or HTTP/2, gRPC
//! included) behind mesh mTLS, plain HTTP, and raw TCP behind mesh mTLS.
//! Its mTLS identity comes from the CA and rotates like the proxy's, and it
//! notes every client certificate it is shown, so a run can tell how many
//! of the proxy's certificates were used.

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use futures_util::{Stream, StreamExt as _};
use http::{HeaderName, Request, Response, StatusCode};
use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use postern_certs::{AllowedPeers, IdentityHandle, SpiffeId};
use tokio::io::{
    AsyncBufReadExt as _, AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _,
};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tonic::{Status, Streaming};

use super::body::{self, GenBody, Hasher, Sent};
use crate::grpc::pb::echo_server::{Echo, EchoServer};
use crate::grpc::pb::{EchoReply, EchoRequest};
use crate::BoxError;

/// Header carrying the load generator's request id.
pub const ID: &str = "x-load-id";
/// Request header: length of the reply body to send.
pub const REPLY_BYTES: &str = "x-load-reply-bytes";
/// Request header: `1` to frame the reply by its length.
pub const REPLY_SIZED: &str = "x-load-reply-sized";
/// Request header: `1` to end the reply with a [`REPLY_SHA`] trailer.
pub const REPLY_TRAILER: &str = "x-load-reply-trailer";
/// Trailer of a request body: its SHA-256.
pub const REQUEST_SHA: &str = "x-load-sha256";
/// Trailer of a reply body: its SHA-256.
pub const REPLY_SHA: &str = "x-load-reply-sha256";
/// Response header: which upstream listener answered.
pub const UPSTREAM: &str = "x-load-upstream";
/// Response header: SHA-256 of the request body as received.
pub const RECEIVED_SHA: &str = "x-load-received-sha256";

/// One arrival of a request id at an upstream.
#[derive(Debug, Clone, Default)]
pub struct Arrival {
    /// Upstream and listener, e.g. `a/tls`.
    pub upstream: String,
    /// Length and SHA-256 of the request body; `None` while (or if never)
    /// it was read whole.
    pub body: Option<(u64, String)>,
    /// The request body's trailer [`REQUEST_SHA`], if it came.
    pub trailer: Option<String>,
    /// Why the body could not be read, if it could not.
    pub error: Option<String>,
    /// Length and SHA-256 of the reply, once sent whole.
    pub reply: Sent,
}

/// Every arrival at every upstream of a run.
#[derive(Debug, Default)]
pub struct Ledger {
    arrivals: Mutex<HashMap<String, Vec<Arc<Mutex<Arrival>>>>>,
    client_certs: Mutex<HashSet<String>>,
    handshakes: AtomicU64,
    resumed: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Ledger {
    fn arrive(&self, id: &str, upstream: &str) -> Arc<Mutex<Arrival>> {
        let arrival = Arc::new(Mutex::new(Arrival {
            upstream: upstream.to_owned(),
            ..Arrival::default()
        }));
        lock(&self.arrivals)
            .entry(id.to_owned())
            .or_default()
            .push(arrival.clone());
        arrival
    }

    /// Every arrival of every id so far.
    pub fn arrivals(&self) -> HashMap<String, Vec<Arrival>> {
        lock(&self.arrivals)
            .iter()
            .map(|(id, all)| (id.clone(), all.iter().map(|a| lock(a).clone()).collect()))
            .collect()
    }

    /// How many distinct client certificates the proxy presented.
    pub fn client_certificates(&self) -> usize {
        lock(&self.client_certs).len()
    }

    /// How many mTLS handshakes the upstreams completed.
    pub fn handshakes(&self) -> u64 {
        self.handshakes.load(Ordering::Relaxed)
    }

    /// How many of those handshakes resumed an earlier session (TLS 1.3
    /// PSK): the client presented no certificate, and the one the session
    /// began with stands for it.
    pub fn resumed(&self) -> u64 {
        self.resumed.load(Ordering::Relaxed)
    }

    fn note_handshake(&self, tls: &rustls::ServerConnection) {
        self.handshakes.fetch_add(1, Ordering::Relaxed);
        if tls.handshake_kind() == Some(rustls::HandshakeKind::Resumed) {
            self.resumed.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if let Some(leaf) = tls.peer_certificates().and_then(|c| c.first()) {
            lock(&self.client_certs).insert(body::sha256_hex(leaf.as_ref()));
        }
    }
}

/// One upstream's three listeners.
pub struct Upstream {
    /// HTTP behind mesh mTLS (the proxy speaks HTTP/2 to it).
    pub tls: SocketAddr,
    /// Plain HTTP.
    pub plain: SocketAddr,
    /// Raw TCP behind mesh mTLS.
    pub tcp: SocketAddr,
    _tasks: JoinSet<()>,
}

struct Shared {
    name: String,
    ledger: Arc<Ledger>,
}

impl Upstream {
    /// Starts upstream `name`, recording into `ledger`, presenting the
    /// identity in `identity` and admitting only `client` over mTLS.
    ///
    /// # Panics
    ///
    /// If it cannot bind or build its TLS settings.
    pub async fn start(
        name: &str,
        ledger: Arc<Ledger>,
        identity: Arc<IdentityHandle>,
        client: &str,
    ) -> Upstream {
        let allowed = AllowedPeers::Only(vec![SpiffeId::parse(client).expect("spiffe id")].into());
        let config = postern_certs::tls::mesh_server_config(
            identity,
            allowed,
            vec![b"h2".to_vec(), b"http/1.1".to_vec()],
        )
        .expect("mesh server config");
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let bind = || async {
            TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind upstream")
        };
        let (tls, plain, tcp) = (bind().await, bind().await, bind().await);
        let addrs = (
            tls.local_addr().expect("addr"),
            plain.local_addr().expect("addr"),
            tcp.local_addr().expect("addr"),
        );
        let shared = |kind: &str| {
            Arc::new(Shared {
                name: format!("{name}/{kind}"),
                ledger: ledger.clone(),
            })
        };
        let mut tasks = JoinSet::new();
        tasks.spawn(accept_http(tls, Some(acceptor.clone()), shared("tls")));
        tasks.spawn(accept_http(plain, None, shared("plain")));
        tasks.spawn(accept_tcp(tcp, acceptor, shared("tcp")));
        Upstream {
            tls: addrs.0,
            plain: addrs.1,
            tcp: addrs.2,
            _tasks: tasks,
        }
    }
}

async fn accept_http(listener: TcpListener, tls: Option<TlsAcceptor>, shared: Arc<Shared>) {
    let grpc = EchoServer::new(LedgerEcho {
        shared: shared.clone(),
    })
    .max_decoding_message_size(16 << 20)
    .max_encoding_message_size(16 << 20);
    let mut conns = JoinSet::new();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let (tls, shared, grpc) = (tls.clone(), shared.clone(), grpc.clone());
        conns.spawn(async move {
            let ledger = shared.ledger.clone();
            let service = hyper::service::service_fn(move |req| {
                handle_http(req, shared.clone(), grpc.clone())
            });
            let builder = auto::Builder::new(TokioExecutor::new());
            match tls {
                Some(acceptor) => {
                    let Ok(stream) = acceptor.accept(stream).await else {
                        return;
                    };
                    ledger.note_handshake(stream.get_ref().1);
                    let _ = builder
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                }
                None => {
                    let _ = builder
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                }
            }
        });
        // Reap finished connections so the set does not grow with the run.
        while conns.try_join_next().is_some() {}
    }
}

fn header<'a>(req: &'a Request<Incoming>, name: &str) -> Option<&'a str> {
    req.headers().get(name).and_then(|v| v.to_str().ok())
}

/// Reply bodies: tonic's are not `Sync`.
type ReplyBody = http_body_util::combinators::UnsyncBoxBody<bytes::Bytes, BoxError>;

fn status(code: StatusCode, text: &str) -> Response<ReplyBody> {
    let mut response = Response::new(
        http_body_util::Full::new(bytes::Bytes::from(text.to_owned()))
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *response.status_mut() = code;
    response
}

async fn handle_http(
    req: Request<Incoming>,
    shared: Arc<Shared>,
    mut grpc: EchoServer<LedgerEcho>,
) -> Result<Response<ReplyBody>, Infallible> {
    if header(&req, "content-type").is_some_and(|t| t.starts_with("application/grpc")) {
        use tonic::codegen::Service as _;
        let response = match grpc.call(req).await {
            Ok(response) => response,
            Err(never) => match never {},
        };
        return Ok(response.map(|b| b.map_err(BoxError::from).boxed_unsync()));
    }
    let Some(id) = header(&req, ID).map(str::to_owned) else {
        return Ok(status(StatusCode::BAD_REQUEST, "no x-load-id"));
    };
    let reply_len: u64 = header(&req, REPLY_BYTES)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let sized = header(&req, REPLY_SIZED) == Some("1");
    let trailer =
        (header(&req, REPLY_TRAILER) == Some("1")).then(|| HeaderName::from_static(REPLY_SHA));
    let arrival = shared.ledger.arrive(&id, &shared.name);
    let mut incoming = req.into_body();
    let mut hasher = Hasher::default();
    let mut request_trailer = None;
    while let Some(frame) = incoming.frame().await {
        match frame {
            Ok(frame) => match frame.into_data() {
                Ok(data) => hasher.update(&data),
                Err(frame) => {
                    if let Some(trailers) = frame.trailers_ref() {
                        request_trailer = trailers
                            .get(REQUEST_SHA)
                            .and_then(|v| v.to_str().ok())
                            .map(str::to_owned);
                    }
                }
            },
            Err(e) => {
                lock(&arrival).error = Some(format!("request body: {e}"));
                return Ok(status(StatusCode::BAD_REQUEST, "body failed"));
            }
        }
    }
    let (len, sha) = (hasher.len(), hasher.finish());
    let reply = GenBody::new(
        body::seed(&format!("{id}/reply")),
        reply_len,
        sized,
        trailer,
    );
    {
        let mut arrival = lock(&arrival);
        arrival.body = Some((len, sha.clone()));
        arrival.trailer = request_trailer;
        arrival.reply = reply.sent();
    }
    let mut response = Response::new(reply.map_err(|never| match never {}).boxed_unsync());
    let headers = response.headers_mut();
    for (name, value) in [
        (ID, id.as_str()),
        (UPSTREAM, shared.name.as_str()),
        (RECEIVED_SHA, sha.as_str()),
    ] {
        if let Ok(value) = value.parse() {
            headers.insert(name, value);
        }
    }
    Ok(response)
}

/// The echo service, each message of a chat being one request: its id is
/// the message up to the first `|`.
#[derive(Clone)]
struct LedgerEcho {
    shared: Arc<Shared>,
}

type ReplyStream = Pin<Box<dyn Stream<Item = Result<EchoReply, Status>> + Send>>;

impl LedgerEcho {
    fn record(&self, message: &str) -> Result<(), Status> {
        let id = message
            .split_once('|')
            .map(|(id, _)| id)
            .ok_or_else(|| Status::invalid_argument("no id in message"))?;
        let arrival = self.shared.ledger.arrive(id, &self.shared.name);
        let mut arrival = lock(&arrival);
        arrival.body = Some((message.len() as u64, body::sha256_hex(message.as_bytes())));
        Ok(())
    }

    fn reply(&self, message: String, index: u32) -> EchoReply {
        EchoReply {
            message,
            index,
            backend: self.shared.name.clone(),
        }
    }
}

#[tonic::async_trait]
impl Echo for LedgerEcho {
    async fn say(
        &self,
        request: tonic::Request<EchoRequest>,
    ) -> Result<tonic::Response<EchoReply>, Status> {
        let message = request.into_inner().message;
        self.record(&message)?;
        Ok(tonic::Response::new(self.reply(message, 0)))
    }

    type RepeatStream = ReplyStream;

    async fn repeat(
        &self,
        _request: tonic::Request<EchoRequest>,
    ) -> Result<tonic::Response<ReplyStream>, Status> {
        Err(Status::unimplemented(
            "the load generator does not use repeat",
        ))
    }

    async fn collect(
        &self,
        _request: tonic::Request<Streaming<EchoRequest>>,
    ) -> Result<tonic::Response<EchoReply>, Status> {
        Err(Status::unimplemented(
            "the load generator does not use collect",
        ))
    }

    type ChatStream = ReplyStream;

    async fn chat(
        &self,
        request: tonic::Request<Streaming<EchoRequest>>,
    ) -> Result<tonic::Response<ReplyStream>, Status> {
        let this = self.clone();
        let replies = request.into_inner().enumerate().map(move |(index, item)| {
            let message = item?.message;
            this.record(&message)?;
            let reply_sent = this.reply(message, u32::try_from(index).unwrap_or(u32::MAX));
            Ok(reply_sent)
        });
        Ok(tonic::Response::new(Box::pin(replies)))
    }
}

async fn accept_tcp(listener: TcpListener, acceptor: TlsAcceptor, shared: Arc<Shared>) {
    let mut conns = JoinSet::new();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let (acceptor, shared) = (acceptor.clone(), shared.clone());
        conns.spawn(async move {
            let Ok(stream) = acceptor.accept(stream).await else {
                return;
            };
            shared.ledger.note_handshake(stream.get_ref().1);
            let _ = serve_tcp(stream, &shared).await;
        });
        while conns.try_join_next().is_some() {}
    }
}

/// One TCP request: a line `id length reply_length`, then the body; the
/// answer is a line with the body's SHA-256, then the reply, then EOF.
async fn serve_tcp(
    stream: impl AsyncRead + AsyncWrite + Unpin,
    shared: &Shared,
) -> std::io::Result<()> {
    let mut stream = tokio::io::BufReader::new(stream);
    let mut line = String::new();
    (&mut stream).take(256).read_line(&mut line).await?;
    let mut parts = line.split_whitespace();
    let (Some(id), Some(len), Some(reply_len)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(std::io::Error::other(format!("bad request line {line:?}")));
    };
    let (Ok(len), Ok(reply_len)) = (len.parse::<u64>(), reply_len.parse::<u64>()) else {
        return Err(std::io::Error::other(format!("bad lengths in {line:?}")));
    };
    let arrival = shared.ledger.arrive(id, &shared.name);
    let mut hasher = Hasher::default();
    let mut buf = vec![0u8; 64 * 1024];
    while hasher.len() < len {
        let want = usize::try_from(len - hasher.len()).map_or(buf.len(), |l| l.min(buf.len()));
        let n = stream.read(&mut buf[..want]).await?;
        if n == 0 {
            lock(&arrival).error = Some(format!("eof after {} of {len} bytes", hasher.len()));
            return Ok(());
        }
        hasher.update(&buf[..n]);
    }
    let (len, sha) = (hasher.len(), hasher.finish());
    let reply = GenBody::new(body::seed(&format!("{id}/reply")), reply_len, true, None);
    {
        let mut arrival = lock(&arrival);
        arrival.body = Some((len, sha.clone()));
        arrival.reply = reply.sent();
    }
    stream.write_all(format!("{sha}\n").as_bytes()).await?;
    let mut reply = std::pin::pin!(reply);
    while let Some(frame) = reply.frame().await {
        let frame = match frame {
            Ok(frame) => frame,
            Err(never) => match never {},
        };
        if let Ok(data) = frame.into_data() {
            stream.write_all(&data).await?;
        }
    }
    stream.flush().await?;
    stream.shutdown().await
}

//! HTTP/1.1 and HTTP/2 (prior knowledge) clients with full control of the
//! connection, plus a raw-socket helper for malformed or slow requests.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode, Version};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt as _, Empty, Full};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

/// The error type of test bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body type every test client and backend uses.
pub type Body = BoxBody<Bytes, BoxError>;

/// An empty body.
pub fn empty() -> Body {
    Empty::<Bytes>::new()
        .map_err(|never| match never {})
        .boxed()
}

/// A body holding `data`.
pub fn full(data: impl Into<Bytes>) -> Body {
    Full::new(data.into())
        .map_err(|never| match never {})
        .boxed()
}

/// A request builder for `method` on `path` with the `Host` header set.
///
/// The URI is in origin form (`/path?query`), as HTTP/1.1 sends it; for
/// HTTP/2 [`H2Conn::send`] moves the host into `:authority`.
pub fn request(method: &str, host: &str, path: &str) -> http::request::Builder {
    Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, host)
}

/// A whole response: head, collected body and trailers.
#[derive(Debug)]
pub struct TestResponse {
    /// Status code.
    pub status: StatusCode,
    /// HTTP version of the response.
    pub version: Version,
    /// Response headers.
    pub headers: HeaderMap,
    /// The whole body.
    pub body: Bytes,
    /// Trailers, if any were sent.
    pub trailers: Option<HeaderMap>,
}

impl TestResponse {
    /// Reads a whole response.
    ///
    /// # Errors
    ///
    /// When the body fails to arrive.
    pub async fn read(response: Response<Incoming>) -> anyhow::Result<Self> {
        let (parts, body) = response.into_parts();
        let collected = body.collect().await.context("read response body")?;
        let trailers = collected.trailers().cloned();
        Ok(Self {
            status: parts.status,
            version: parts.version,
            headers: parts.headers,
            body: collected.to_bytes(),
            trailers,
        })
    }

    /// The value of header `name`, if present and valid UTF-8.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The `x-backend` header: which test backend answered.
    pub fn backend(&self) -> Option<&str> {
        self.header("x-backend")
    }

    /// The body as (lossy) UTF-8.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// One HTTP/1.1 client connection; requests go one after another on it.
#[derive(Debug)]
pub struct H1Conn {
    sender: http1::SendRequest<Body>,
    conn: tokio::task::JoinHandle<()>,
}

impl H1Conn {
    /// Connects to `addr` and does the (trivial) HTTP/1.1 handshake.
    ///
    /// # Errors
    ///
    /// When the TCP connect fails.
    pub async fn connect(addr: SocketAddr) -> anyhow::Result<Self> {
        let stream = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connect to {addr}"))?;
        let (sender, conn) = http1::handshake(TokioIo::new(stream))
            .await
            .context("http/1.1 handshake")?;
        let conn = tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Self { sender, conn })
    }

    /// Sends `req` and returns the response head; the body streams.
    ///
    /// # Errors
    ///
    /// When the connection is closed or fails before the response head.
    pub async fn send_streaming(
        &mut self,
        req: Request<Body>,
    ) -> anyhow::Result<Response<Incoming>> {
        self.sender.ready().await.context("connection not ready")?;
        self.sender
            .send_request(req)
            .await
            .context("send http/1.1 request")
    }

    /// Sends `req` and reads the whole response.
    ///
    /// # Errors
    ///
    /// When the connection fails before the whole response arrived.
    pub async fn send(&mut self, req: Request<Body>) -> anyhow::Result<TestResponse> {
        let response = self.send_streaming(req).await?;
        TestResponse::read(response).await
    }

    /// Whether the server has closed the connection (or it failed).
    pub fn is_closed(&self) -> bool {
        self.sender.is_closed() || self.conn.is_finished()
    }

    /// Waits until the connection task ends, i.e. the server closed it.
    pub async fn closed(&mut self) {
        let _ = (&mut self.conn).await;
    }
}

impl Drop for H1Conn {
    fn drop(&mut self) {
        self.conn.abort();
    }
}

/// One HTTP/2 client connection with prior knowledge (h2c). Clones share the
/// connection, so requests on clones are multiplexed.
#[derive(Debug, Clone)]
pub struct H2Conn {
    sender: http2::SendRequest<Body>,
}

impl H2Conn {
    /// Connects to `addr` and does the HTTP/2 handshake.
    ///
    /// # Errors
    ///
    /// When the TCP connect or the handshake fails.
    pub async fn connect(addr: SocketAddr) -> anyhow::Result<Self> {
        let stream = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connect to {addr}"))?;
        let (sender, conn) = http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .context("http/2 handshake")?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Self { sender })
    }

    /// Sends `req` and returns the response head; the body streams.
    ///
    /// A request built by [`request`] (origin-form URI plus `Host`) is turned
    /// into HTTP/2 form: `http://host/path` so the host becomes `:authority`.
    ///
    /// # Errors
    ///
    /// When the stream is refused or reset before the response head.
    pub async fn send_streaming(
        &mut self,
        mut req: Request<Body>,
    ) -> anyhow::Result<Response<Incoming>> {
        if req.uri().authority().is_none() {
            let host = req
                .headers_mut()
                .remove(http::header::HOST)
                .context("an HTTP/2 request needs a Host header or an absolute URI")?;
            let path = req
                .uri()
                .path_and_query()
                .map_or("/", |p| p.as_str())
                .to_owned();
            let uri = format!(
                "http://{}{path}",
                host.to_str().context("host is not ASCII")?
            );
            *req.uri_mut() = uri.parse().context("build absolute URI")?;
        }
        *req.version_mut() = Version::HTTP_2;
        self.sender.ready().await.context("connection not ready")?;
        self.sender
            .send_request(req)
            .await
            .context("send http/2 request")
    }

    /// Sends `req` (see [`H2Conn::send_streaming`]) and reads the whole
    /// response.
    ///
    /// # Errors
    ///
    /// When the stream fails before the whole response arrived.
    pub async fn send(&mut self, req: Request<Body>) -> anyhow::Result<TestResponse> {
        let response = self.send_streaming(req).await?;
        TestResponse::read(response).await
    }
}

/// What [`raw_exchange`] read.
#[derive(Debug)]
pub struct RawReply {
    /// Every byte read.
    pub bytes: Vec<u8>,
    /// Whether the server closed the connection (EOF or reset) within the
    /// limit.
    pub closed: bool,
}

impl RawReply {
    /// The bytes as (lossy) UTF-8.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes).into_owned()
    }
}

/// Writes `bytes` on a new connection to `addr` and reads until the server
/// closes it or `limit` passes.
///
/// # Errors
///
/// When the connect or the write fails. A read error (e.g. a reset) counts as
/// a close.
pub async fn raw_exchange(
    addr: SocketAddr,
    bytes: &[u8],
    limit: Duration,
) -> anyhow::Result<RawReply> {
    let mut stream = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connect to {addr}"))?;
    stream.write_all(bytes).await.context("write request")?;
    Ok(read_until_close(&mut stream, limit).await)
}

/// Reads from `stream` until EOF, a read error, or `limit`.
pub async fn read_until_close(stream: &mut TcpStream, limit: Duration) -> RawReply {
    let mut bytes = Vec::new();
    let closed = tokio::time::timeout(limit, async {
        let mut buf = [0u8; 8192];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => bytes.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .is_ok();
    RawReply { bytes, closed }
}

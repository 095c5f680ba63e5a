//! A capture upstream: a raw HTTP/1.1 backend that keeps every byte each
//! connection sent and checks them against a strict reading of RFC 9112.
//!
//! It exists to prove what did, or did not, get past the proxy. It does not
//! use hyper (whose client the proxy uses to talk upstream), so a framing
//! mistake on the proxy's side cannot be hidden by a parser that shares its
//! leniencies. Each well-formed request gets `200` with a body naming its
//! connection and sequence number (or, with `x-capture-body-bytes: N` or a
//! target of `/bytes/N`, a body of `N` bytes written as fast as the proxy
//! takes them); anything
//! else is recorded as a violation and the connection is closed.
//!
//! "Well-formed" here is what a careful proxy emits, not what a server must
//! tolerate: CRLF line ends only, token header names, no whitespace before
//! the colon, no obs-fold, no control bytes in values, exactly one `Host`,
//! origin-form or `*` targets, HTTP/1.1, and exactly one of a single
//! numeric `Content-Length` or `Transfer-Encoding: chunked` (or neither).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

/// One request as it arrived, byte for byte, and as the strict parser read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CapturedRequest {
    /// Request method.
    pub method: String,
    /// Request target, exactly as sent.
    pub target: String,
    /// Header lines in order, names as sent (not lowercased).
    pub headers: Vec<(String, String)>,
    /// The decoded body (chunks joined).
    pub body: Vec<u8>,
    /// Whether the body came chunked.
    pub chunked: bool,
    /// Trailer lines of a chunked body.
    pub trailers: Vec<(String, String)>,
    /// The raw bytes of the whole message.
    pub raw: Vec<u8>,
}

impl CapturedRequest {
    /// Values of header `name` (case-insensitive), in order.
    pub fn header_all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// The single value of header `name`; `None` when absent.
    ///
    /// # Panics
    ///
    /// When the header came more than once.
    pub fn header(&self, name: &str) -> Option<&str> {
        let all = self.header_all(name);
        assert!(all.len() <= 1, "{name} came {} times: {all:?}", all.len());
        all.first().copied()
    }

    /// The `x-request-id` the proxy set.
    pub fn request_id(&self) -> Option<&str> {
        self.header("x-request-id")
    }
}

/// Everything one upstream connection carried.
#[derive(Debug, Clone, Default)]
pub struct CapturedConn {
    /// Every byte received, in order.
    pub raw: Vec<u8>,
    /// The complete requests parsed from `raw`.
    pub requests: Vec<CapturedRequest>,
    /// Why the bytes after the last complete request are not well-formed
    /// HTTP/1.1; the connection was closed there.
    pub violation: Option<String>,
    /// Bytes of a request that had started but not finished when the peer
    /// closed (a request cut off mid-way, e.g. a body that failed).
    pub incomplete: Vec<u8>,
    /// The peer closed the connection (seen on a read, or a failed write).
    pub closed: bool,
}

#[derive(Debug, Default)]
struct State {
    conns: Mutex<Vec<Arc<Mutex<CapturedConn>>>>,
}

/// A running capture upstream; it stops when dropped.
#[derive(Debug)]
pub struct CaptureBackend {
    addr: SocketAddr,
    state: Arc<State>,
    task: JoinHandle<()>,
}

impl CaptureBackend {
    /// Starts a capture upstream on `127.0.0.1:0`.
    ///
    /// # Panics
    ///
    /// If it cannot bind.
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind capture backend");
        let addr = listener.local_addr().expect("capture backend addr");
        let state = Arc::new(State::default());
        let task = tokio::spawn(accept_loop(listener, Arc::clone(&state)));
        Self { addr, state, task }
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A snapshot of every connection so far, in accept order.
    pub fn connections(&self) -> Vec<CapturedConn> {
        self.state
            .conns
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|c| c.lock().unwrap_or_else(PoisonError::into_inner).clone())
            .collect()
    }

    /// Every complete request so far, connection by connection.
    pub fn requests(&self) -> Vec<CapturedRequest> {
        self.connections()
            .into_iter()
            .flat_map(|c| c.requests)
            .collect()
    }

    /// The `x-request-id` of every complete request so far.
    pub fn request_ids(&self) -> Vec<String> {
        self.requests()
            .iter()
            .filter_map(|r| r.request_id().map(str::to_owned))
            .collect()
    }

    /// Every violation of well-formedness seen, with the offending bytes.
    pub fn violations(&self) -> Vec<String> {
        self.connections()
            .into_iter()
            .filter_map(|c| {
                let why = c.violation?;
                Some(format!("{why} in {:?}", String::from_utf8_lossy(&c.raw)))
            })
            .collect()
    }
}

impl Drop for CaptureBackend {
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
                let Ok((stream, _)) = accepted else { continue };
                let conn = Arc::new(Mutex::new(CapturedConn::default()));
                let index = {
                    let mut conns = state.conns.lock().unwrap_or_else(PoisonError::into_inner);
                    conns.push(Arc::clone(&conn));
                    conns.len() - 1
                };
                connections.spawn(serve(stream, conn, index));
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

async fn serve(mut stream: TcpStream, conn: Arc<Mutex<CapturedConn>>, index: usize) {
    let mut pending: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    let mut seq = 0usize;
    loop {
        let n = match stream.read(&mut buf).await {
            Ok(0) | Err(_) => {
                let mut c = conn.lock().unwrap_or_else(PoisonError::into_inner);
                c.closed = true;
                c.incomplete = pending;
                return;
            }
            Ok(n) => n,
        };
        pending.extend_from_slice(&buf[..n]);
        conn.lock()
            .unwrap_or_else(PoisonError::into_inner)
            .raw
            .extend_from_slice(&buf[..n]);
        loop {
            match parse_request(&pending) {
                Parsed::Partial => break,
                Parsed::Invalid(why) => {
                    conn.lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .violation = Some(why);
                    let _ = stream
                        .write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                        .await;
                    return;
                }
                Parsed::Complete(request, used) => {
                    pending.drain(..used);
                    let body = format!("capture conn={index} seq={seq}");
                    seq += 1;
                    let head_only = request.method == "HEAD";
                    let big: Option<u64> = request
                        .header_all("x-capture-body-bytes")
                        .first()
                        .copied()
                        .or_else(|| request.target.strip_prefix("/bytes/"))
                        .and_then(|v| v.parse().ok());
                    conn.lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .requests
                        .push(request);
                    let mut response = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nx-capture: {index}.{}\r\n\r\n",
                        body.len(),
                        seq - 1
                    )
                    .into_bytes();
                    if !head_only {
                        response.extend_from_slice(body.as_bytes());
                    }
                    if let Some(len) = big {
                        response = format!("HTTP/1.1 200 OK\r\ncontent-length: {len}\r\n\r\n")
                            .into_bytes();
                    }
                    let mut written = stream.write_all(&response).await;
                    let chunk = vec![b'x'; 64 * 1024];
                    let mut left = big.unwrap_or(0);
                    while left > 0 && written.is_ok() {
                        let n = left.min(chunk.len() as u64) as usize;
                        written = stream.write_all(&chunk[..n]).await;
                        left -= n as u64;
                    }
                    if written.is_err() {
                        conn.lock().unwrap_or_else(PoisonError::into_inner).closed = true;
                        return;
                    }
                }
            }
        }
    }
}

/// The outcome of reading one request from the front of a buffer.
#[derive(Debug)]
enum Parsed {
    /// More bytes are needed.
    Partial,
    /// A whole request, and how many bytes it took.
    Complete(CapturedRequest, usize),
    /// The bytes are not well-formed HTTP/1.1.
    Invalid(String),
}

/// Finds the next CRLF-terminated line at `at`; a bare CR or LF is an error.
fn line(buf: &[u8], at: usize) -> Result<Option<(&[u8], usize)>, String> {
    let rest = &buf[at..];
    for (i, &b) in rest.iter().enumerate() {
        match b {
            b'\r' => {
                return match rest.get(i + 1) {
                    None => Ok(None),
                    Some(b'\n') => Ok(Some((&rest[..i], at + i + 2))),
                    Some(_) => Err(format!("bare CR at byte {}", at + i)),
                };
            }
            b'\n' => return Err(format!("bare LF at byte {}", at + i)),
            _ => {}
        }
    }
    Ok(None)
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// A header field line: `token ":" OWS value OWS`, value of VCHAR, SP, HTAB
/// or obs-text, not starting or ending with whitespace.
fn field(line: &[u8]) -> Result<(String, String), String> {
    let text = String::from_utf8_lossy(line).into_owned();
    let colon = line
        .iter()
        .position(|&b| b == b':')
        .ok_or_else(|| format!("header line without a colon: {text:?}"))?;
    let (name, value) = (&line[..colon], &line[colon + 1..]);
    if name.is_empty() || !name.iter().all(|&b| is_tchar(b)) {
        return Err(format!("invalid header name: {text:?}"));
    }
    let value = value.trim_ascii();
    if !value
        .iter()
        .all(|&b| b == b'\t' || b == b' ' || (0x21..=0x7e).contains(&b) || b >= 0x80)
    {
        return Err(format!("invalid byte in header value: {text:?}"));
    }
    Ok((
        String::from_utf8_lossy(name).into_owned(),
        String::from_utf8_lossy(value).into_owned(),
    ))
}

/// Header lines in order, and where the bytes after the empty line start.
type Fields = (Vec<(String, String)>, usize);

/// Reads header lines from `at` up to and including the empty line.
fn fields(buf: &[u8], mut at: usize) -> Result<Option<Fields>, String> {
    let mut out = Vec::new();
    loop {
        let Some((l, next)) = line(buf, at)? else {
            return Ok(None);
        };
        if l.is_empty() {
            return Ok(Some((out, next)));
        }
        if l[0] == b' ' || l[0] == b'\t' {
            return Err(format!(
                "obs-fold line: {:?}",
                String::from_utf8_lossy(l).into_owned()
            ));
        }
        out.push(field(l)?);
        at = next;
    }
}

fn parse_request(buf: &[u8]) -> Parsed {
    match try_parse_request(buf) {
        Ok(Some((request, used))) => Parsed::Complete(request, used),
        Ok(None) => Parsed::Partial,
        Err(why) => Parsed::Invalid(why),
    }
}

fn try_parse_request(buf: &[u8]) -> Result<Option<(CapturedRequest, usize)>, String> {
    if buf.is_empty() {
        return Ok(None);
    }
    let Some((request_line, at)) = line(buf, 0)? else {
        return Ok(None);
    };
    let text = String::from_utf8_lossy(request_line).into_owned();
    let parts: Vec<&[u8]> = request_line.split(|&b| b == b' ').collect();
    let [method, target, version] = parts[..] else {
        return Err(format!("request line is not three fields: {text:?}"));
    };
    if method.is_empty() || !method.iter().all(|&b| is_tchar(b)) {
        return Err(format!("invalid method: {text:?}"));
    }
    if version != b"HTTP/1.1" {
        return Err(format!("not HTTP/1.1: {text:?}"));
    }
    let origin_form = target.first() == Some(&b'/');
    let asterisk = target == b"*" && method == b"OPTIONS";
    if !(origin_form || asterisk) || !target.iter().all(|&b| (0x21..=0x7e).contains(&b)) {
        return Err(format!("target is not origin-form: {text:?}"));
    }
    let Some((headers, body_at)) = fields(buf, at)? else {
        return Ok(None);
    };
    let count = |name: &str| {
        headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .count()
    };
    if count("host") != 1 {
        return Err(format!("{} Host headers in {text:?}", count("host")));
    }
    let lengths: Vec<&str> = headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("content-length"))
        .map(|(_, v)| v.as_str())
        .collect();
    let codings: Vec<&str> = headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("transfer-encoding"))
        .map(|(_, v)| v.as_str())
        .collect();
    let mut request = CapturedRequest {
        method: String::from_utf8_lossy(method).into_owned(),
        target: String::from_utf8_lossy(target).into_owned(),
        headers: headers.clone(),
        body: Vec::new(),
        chunked: false,
        trailers: Vec::new(),
        raw: Vec::new(),
    };
    let end = match (&lengths[..], &codings[..]) {
        ([], []) => body_at,
        ([length], []) => {
            if length.is_empty() || !length.bytes().all(|b| b.is_ascii_digit()) {
                return Err(format!("invalid content-length {length:?}"));
            }
            let length: usize = length
                .parse()
                .map_err(|_| format!("content-length {length:?} overflows"))?;
            if buf.len() < body_at + length {
                return Ok(None);
            }
            request.body = buf[body_at..body_at + length].to_vec();
            body_at + length
        }
        ([], [coding]) if coding.eq_ignore_ascii_case("chunked") => {
            request.chunked = true;
            let Some((body, trailers, end)) = chunked(buf, body_at)? else {
                return Ok(None);
            };
            request.body = body;
            request.trailers = trailers;
            end
        }
        _ => {
            return Err(format!(
                "ambiguous framing: content-length {lengths:?}, transfer-encoding {codings:?}"
            ))
        }
    };
    request.raw = buf[..end].to_vec();
    Ok(Some((request, end)))
}

type ChunkedBody = (Vec<u8>, Vec<(String, String)>, usize);

fn chunked(buf: &[u8], mut at: usize) -> Result<Option<ChunkedBody>, String> {
    let mut body = Vec::new();
    loop {
        let Some((size_line, data_at)) = line(buf, at)? else {
            return Ok(None);
        };
        if size_line.is_empty()
            || size_line.len() > 16
            || !size_line.iter().all(u8::is_ascii_hexdigit)
        {
            return Err(format!(
                "invalid chunk size line {:?}",
                String::from_utf8_lossy(size_line).into_owned()
            ));
        }
        let size = usize::from_str_radix(&String::from_utf8_lossy(size_line), 16)
            .map_err(|e| format!("chunk size: {e}"))?;
        if size == 0 {
            let Some((trailers, end)) = fields(buf, data_at)? else {
                return Ok(None);
            };
            return Ok(Some((body, trailers, end)));
        }
        if buf.len() < data_at + size + 2 {
            return Ok(None);
        }
        body.extend_from_slice(&buf[data_at..data_at + size]);
        if &buf[data_at + size..data_at + size + 2] != b"\r\n" {
            return Err("chunk data not followed by CRLF".to_owned());
        }
        at = data_at + size + 2;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn complete(raw: &[u8]) -> CapturedRequest {
        match parse_request(raw) {
            Parsed::Complete(r, used) => {
                assert_eq!(used, raw.len());
                r
            }
            other => panic!("{other:?}"),
        }
    }

    fn invalid(raw: &[u8]) -> String {
        match parse_request(raw) {
            Parsed::Invalid(why) => why,
            other => panic!("accepted {:?}: {other:?}", String::from_utf8_lossy(raw)),
        }
    }

    #[test]
    fn reads_length_and_chunked_bodies() {
        let r = complete(b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc");
        assert_eq!(r.body, b"abc");
        let r = complete(
            b"POST /a HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n1\r\nd\r\n0\r\nx-t: 1\r\n\r\n",
        );
        assert_eq!(r.body, b"abcd");
        assert_eq!(r.trailers, [("x-t".to_owned(), "1".to_owned())]);
        assert!(matches!(
            parse_request(b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nab"),
            Parsed::Partial
        ));
    }

    #[test]
    fn refuses_what_a_proxy_must_not_send() {
        invalid(b"GET / HTTP/1.1\nHost: x\r\n\r\n");
        invalid(b"GET / HTTP/1.1\r\nHost: x\rX: y\r\n\r\n");
        invalid(b"GET / HTTP/1.1\r\nHost: x\r\nX : y\r\n\r\n");
        invalid(b"GET / HTTP/1.1\r\nHost: x\r\nX: y\r\n z\r\n\r\n");
        invalid(b"GET / HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n");
        invalid(b"GET http://x/ HTTP/1.1\r\nHost: x\r\n\r\n");
        invalid(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n");
        invalid(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\na");
        invalid(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n");
        invalid(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5;x\r\n");
        invalid(b"GET / HTTP/1.1\r\nHost: x\r\nX: a\x00b\r\n\r\n");
    }
}

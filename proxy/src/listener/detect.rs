//! Protocol detection on captured connections: a pure classifier over the
//! first bytes a client sent (TLS ClientHello with SNI and ALPN, the HTTP/2
//! preface, an HTTP/1.x request line, or anything else), the bounded read
//! that feeds it, and `Rewind`, which hands the bytes read back to whoever
//! serves the connection.
//!
//! The classifier never waits: given a prefix it either decides or asks for
//! more. Waiting, and giving up on silent (server-first) clients, is the
//! caller's business (`sniff`), so the rules here are tested without I/O.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// The most bytes read before deciding: one full TLS record (16 KiB of
/// payload plus its header). A longer HTTP request line is taken as opaque.
pub const MAX_PREFIX: usize = 16 * 1024 + 5;

/// The HTTP/2 connection preface (RFC 9113 §3.4).
pub(crate) const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Longest method token accepted; real ones are a few letters.
const MAX_METHOD: usize = 32;

/// What a ClientHello says about where the client is going.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientHelloInfo {
    /// The server name (SNI), if sent.
    pub sni: Option<String>,
    /// ALPN protocols offered, in the client's order.
    pub alpn: Vec<Vec<u8>>,
}

/// The protocol of a connection, as far as its first bytes tell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Protocol {
    /// An HTTP/1.0 or HTTP/1.1 request line.
    Http1,
    /// The HTTP/2 prior-knowledge preface.
    Http2,
    /// A TLS ClientHello; its SNI and ALPN when they could be read.
    Tls(ClientHelloInfo),
    /// Anything else.
    Opaque,
}

/// The classifier's answer for one prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Detection {
    /// The prefix fits more than one protocol: read more.
    NeedMore,
    /// Decided.
    Done(Protocol),
}

/// Classifies the first bytes of a client's stream. Decides at the latest
/// once `prefix` holds `MAX_PREFIX` bytes.
pub fn detect(prefix: &[u8]) -> Detection {
    let Some(&first) = prefix.first() else {
        return Detection::NeedMore;
    };
    let detection = if first == 0x16 {
        detect_tls(prefix)
    } else if H2_PREFACE.starts_with(&prefix[..prefix.len().min(H2_PREFACE.len())]) {
        if prefix.len() >= H2_PREFACE.len() {
            Detection::Done(Protocol::Http2)
        } else {
            Detection::NeedMore
        }
    } else {
        detect_http1(prefix)
    };
    match detection {
        Detection::NeedMore if prefix.len() >= MAX_PREFIX => Detection::Done(Protocol::Opaque),
        other => other,
    }
}

/// `token` characters of RFC 9110 §5.6.2.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// A request line: `METHOD SP target SP HTTP/1.x CRLF`.
fn detect_http1(prefix: &[u8]) -> Detection {
    let opaque = Detection::Done(Protocol::Opaque);
    let method_len = prefix.iter().take_while(|b| is_tchar(**b)).count();
    if method_len > MAX_METHOD {
        return opaque;
    }
    let Some(&after_method) = prefix.get(method_len) else {
        return Detection::NeedMore;
    };
    if method_len == 0 || after_method != b' ' {
        return opaque;
    }
    let target = &prefix[method_len + 1..];
    // Visible bytes, and UTF-8 that some clients send unescaped.
    let target_len = target
        .iter()
        .take_while(|b| **b > b' ' && **b != 0x7f)
        .count();
    let Some(&after_target) = target.get(target_len) else {
        return Detection::NeedMore;
    };
    if target_len == 0 || after_target != b' ' {
        return opaque;
    }
    let version = &target[target_len + 1..];
    let expected_crlf: &[&[u8]] = &[b"HTTP/1.0\r\n", b"HTTP/1.1\r\n"];
    let expected_lf: &[&[u8]] = &[b"HTTP/1.0\n", b"HTTP/1.1\n"];
    for line_end in expected_crlf.iter().chain(expected_lf) {
        if version.starts_with(line_end) {
            return Detection::Done(Protocol::Http1);
        }
    }
    let could_be = expected_crlf
        .iter()
        .any(|end| version.len() < end.len() && end.starts_with(version));
    if could_be {
        Detection::NeedMore
    } else {
        opaque
    }
}

/// A TLS handshake record carrying a ClientHello, possibly fragmented over
/// several records.
fn detect_tls(prefix: &[u8]) -> Detection {
    let opaque = Detection::Done(Protocol::Opaque);
    match prefix.get(1..3) {
        None if prefix.get(1).is_some_and(|major| *major != 3) => return opaque,
        None => return Detection::NeedMore,
        // SSL 3.0 to TLS 1.3 record versions.
        Some([3, minor]) if *minor <= 4 => {}
        Some(_) => return opaque,
    }
    let mut handshake = Vec::new();
    let mut offset = 0;
    loop {
        let Some(header) = prefix.get(offset..offset + 5) else {
            return Detection::NeedMore;
        };
        if header[0] != 0x16 {
            // A ClientHello cut short by another record type: still TLS, but
            // nothing more to read from it.
            return Detection::Done(Protocol::Tls(ClientHelloInfo::default()));
        }
        let length = usize::from(u16::from_be_bytes([header[3], header[4]]));
        // The record limit plus the expansion TLS allows (RFC 8446 §5.2).
        if length == 0 || length > 16 * 1024 + 2048 {
            return opaque;
        }
        let start = offset + 5;
        let available = &prefix[start..prefix.len().min(start + length)];
        handshake.extend_from_slice(available);
        if handshake.len() >= 4 {
            if handshake[0] != 1 {
                // The first handshake message from a client is a ClientHello.
                return opaque;
            }
            let body = usize::from(handshake[1]) << 16
                | usize::from(handshake[2]) << 8
                | usize::from(handshake[3]);
            if handshake.len() >= 4 + body {
                let info = parse_client_hello(&handshake[4..4 + body]).unwrap_or_default();
                return Detection::Done(Protocol::Tls(info));
            }
            if 4 + body + 5 > MAX_PREFIX {
                // Too big to buffer here; the record header says enough.
                return Detection::Done(Protocol::Tls(ClientHelloInfo::default()));
            }
        }
        if available.len() < length {
            return Detection::NeedMore;
        }
        offset = start + length;
    }
}

/// Reads through a byte slice, failing on truncation.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    fn u8(&mut self) -> Option<usize> {
        self.take(1).map(|b| usize::from(b[0]))
    }

    fn u16(&mut self) -> Option<usize> {
        self.take(2)
            .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
    }

    fn vec8(&mut self) -> Option<&'a [u8]> {
        let n = self.u8()?;
        self.take(n)
    }

    fn vec16(&mut self) -> Option<&'a [u8]> {
        let n = self.u16()?;
        self.take(n)
    }
}

/// SNI and ALPN from a ClientHello body (RFC 8446 §4.1.2); `None` when it
/// is malformed.
fn parse_client_hello(body: &[u8]) -> Option<ClientHelloInfo> {
    let mut r = Reader(body);
    r.take(2 + 32)?; // legacy_version, random
    r.vec8()?; // legacy_session_id
    r.vec16()?; // cipher_suites
    r.vec8()?; // legacy_compression_methods
    let mut info = ClientHelloInfo::default();
    if r.0.is_empty() {
        return Some(info);
    }
    let mut extensions = Reader(r.vec16()?);
    while !extensions.0.is_empty() {
        let kind = extensions.u16()?;
        let mut data = Reader(extensions.vec16()?);
        match kind {
            0 => {
                let mut names = Reader(data.vec16()?);
                while !names.0.is_empty() {
                    let name_type = names.u8()?;
                    if name_type != 0 {
                        // Only host_name has a defined format (RFC 6066
                        // §3), so nothing after another type can be read;
                        // rustls, which serves the handshake, stops there
                        // too. Refusing the whole hello instead would pick
                        // a filter chain for no SNI while TLS sees one.
                        break;
                    }
                    let name = names.vec16()?;
                    if info.sni.is_none() {
                        // rustls, which picks the certificate, drops one
                        // trailing dot (an absolute name); the filter chain
                        // must be picked for the same name.
                        info.sni = std::str::from_utf8(name)
                            .ok()
                            .map(|name| name.strip_suffix('.').unwrap_or(name))
                            .map(str::to_ascii_lowercase);
                    }
                }
            }
            16 => {
                let mut protocols = Reader(data.vec16()?);
                while !protocols.0.is_empty() {
                    info.alpn.push(protocols.vec8()?.to_vec());
                }
            }
            _ => {}
        }
    }
    Some(info)
}

/// How a bounded read for detection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sniffed {
    /// The classifier decided.
    Detected(Protocol),
    /// The client sent nothing decisive before the timeout (a server-first
    /// protocol, or a slow client): proxy it as opaque bytes.
    TimedOut,
    /// The client closed (or failed) before anything decided; what it sent,
    /// if anything, is in the buffer.
    Closed,
}

/// Reads from `stream` until `detect` decides, the stream ends, or
/// `timeout` passes. Returns the outcome and every byte read, which the
/// caller must replay (see `Rewind`).
pub async fn sniff<S>(stream: &mut S, timeout: Duration) -> (Sniffed, Bytes)
where
    S: AsyncRead + Unpin,
{
    let mut buf = BytesMut::with_capacity(1024);
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if buf.capacity() == buf.len() {
            buf.reserve((MAX_PREFIX - buf.len()).min(4096));
        }
        match tokio::time::timeout_at(deadline, stream.read_buf(&mut buf)).await {
            Err(_) => return (Sniffed::TimedOut, buf.freeze()),
            Ok(Ok(0)) | Ok(Err(_)) => return (Sniffed::Closed, buf.freeze()),
            Ok(Ok(_)) => {}
        }
        if let Detection::Done(protocol) = detect(&buf) {
            return (Sniffed::Detected(protocol), buf.freeze());
        }
    }
}

/// A stream that yields `prefix` before reading from `inner` again: the
/// bytes detection took, given back.
#[derive(Debug)]
pub struct Rewind<S> {
    prefix: Bytes,
    inner: S,
}

impl<S> Rewind<S> {
    /// `inner`, with `prefix` read first.
    pub fn new(prefix: Bytes, inner: S) -> Self {
        Rewind { prefix, inner }
    }

    /// The wrapped stream.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Whether some of the given-back bytes are still unread.
    pub fn has_unread_prefix(&self) -> bool {
        !self.prefix.is_empty()
    }

    /// The given-back bytes not read yet, and the wrapped stream.
    pub fn into_parts(self) -> (Bytes, S) {
        (self.prefix, self.inner)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix.advance(n);
            if this.prefix.is_empty() {
                // An emptied `Bytes` still holds the whole buffer it was cut
                // from (after a park, hyper's 16 KiB read buffer)
                // for as long as the stream lives.
                this.prefix = Bytes::new();
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests;

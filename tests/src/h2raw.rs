//! A raw HTTP/2 client that writes frames by hand, for what the `h2` crate
//! will not send: malformed header blocks, CRLF in values, uppercase names,
//! bad pseudo-headers, and floods of resets, CONTINUATION, PING, SETTINGS
//! or empty DATA frames.
//!
//! Header blocks are encoded here as HPACK literals without indexing and
//! without Huffman coding, so any byte can be put in a name or value. The
//! server's header blocks are decoded with the `hpack` crate. A background
//! task reads frames, answers the server's SETTINGS and PINGs as a live
//! client would, and reports everything else as [`Event`]s.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Mutex};
use tokio::task::JoinHandle;

/// The client connection preface (RFC 9113 §3.4).
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Frame types (RFC 9113 §6).
pub mod kind {
    /// DATA.
    pub const DATA: u8 = 0x0;
    /// HEADERS.
    pub const HEADERS: u8 = 0x1;
    /// RST_STREAM.
    pub const RST_STREAM: u8 = 0x3;
    /// SETTINGS.
    pub const SETTINGS: u8 = 0x4;
    /// PING.
    pub const PING: u8 = 0x6;
    /// GOAWAY.
    pub const GOAWAY: u8 = 0x7;
    /// WINDOW_UPDATE.
    pub const WINDOW_UPDATE: u8 = 0x8;
    /// CONTINUATION.
    pub const CONTINUATION: u8 = 0x9;
}

/// Frame flags.
pub mod flag {
    /// END_STREAM on DATA and HEADERS.
    pub const END_STREAM: u8 = 0x1;
    /// ACK on SETTINGS and PING.
    pub const ACK: u8 = 0x1;
    /// END_HEADERS on HEADERS and CONTINUATION.
    pub const END_HEADERS: u8 = 0x4;
}

/// SETTINGS_INITIAL_WINDOW_SIZE.
pub const SETTINGS_INITIAL_WINDOW_SIZE: u16 = 0x4;

/// Error code CANCEL.
pub const CANCEL: u32 = 0x8;

/// What the server sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A whole header block (HEADERS and its CONTINUATIONs), decoded.
    Headers {
        /// Stream id.
        stream: u32,
        /// Fields in order.
        fields: Vec<(Vec<u8>, Vec<u8>)>,
        /// END_STREAM was set.
        end_stream: bool,
    },
    /// A DATA frame.
    Data {
        /// Stream id.
        stream: u32,
        /// Payload length.
        len: usize,
        /// END_STREAM was set.
        end_stream: bool,
    },
    /// RST_STREAM.
    Reset {
        /// Stream id.
        stream: u32,
        /// Error code.
        code: u32,
    },
    /// GOAWAY.
    GoAway {
        /// Last stream id the server processed.
        last_stream: u32,
        /// Error code.
        code: u32,
    },
    /// A PING acknowledgement.
    PingAck,
    /// A SETTINGS acknowledgement.
    SettingsAck,
    /// The server closed the connection (or it failed).
    Closed,
}

impl Event {
    /// The `:status` of a header block, if this is one.
    pub fn status(&self) -> Option<u16> {
        let Event::Headers { fields, .. } = self else {
            return None;
        };
        fields
            .iter()
            .find(|(n, _)| n == b":status")
            .and_then(|(_, v)| std::str::from_utf8(v).ok()?.parse().ok())
    }
}

/// Builds one frame: the 9-byte header and the payload.
pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len();
    assert!(len < 1 << 24, "frame payload too long");
    let mut out = Vec::with_capacity(9 + len);
    out.extend_from_slice(&(len as u32).to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// HPACK integer with an `n`-bit prefix, OR-ed into `first`.
fn hpack_int(out: &mut Vec<u8>, first: u8, n: u32, mut value: usize) {
    let max = (1usize << n) - 1;
    if value < max {
        out.push(first | value as u8);
        return;
    }
    out.push(first | max as u8);
    value -= max;
    while value >= 128 {
        out.push((value % 128) as u8 | 0x80);
        value /= 128;
    }
    out.push(value as u8);
}

/// Encodes fields as HPACK literals without indexing (no Huffman), bytes
/// as given: nothing is checked or lowercased.
pub fn encode_fields(fields: &[(&[u8], &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in fields {
        out.push(0x00);
        hpack_int(&mut out, 0, 7, name.len());
        out.extend_from_slice(name);
        hpack_int(&mut out, 0, 7, value.len());
        out.extend_from_slice(value);
    }
    out
}

/// The four pseudo-headers of a GET to `authority` and `path`, then `extra`.
pub fn get_fields<'a>(
    authority: &'a [u8],
    path: &'a [u8],
    extra: &[(&'a [u8], &'a [u8])],
) -> Vec<(&'a [u8], &'a [u8])> {
    let mut fields: Vec<(&[u8], &[u8])> = vec![
        (b":method", b"GET"),
        (b":scheme", b"http"),
        (b":authority", authority),
        (b":path", path),
    ];
    fields.extend_from_slice(extra);
    fields
}

/// A SETTINGS frame with `params`.
pub fn settings(params: &[(u16, u32)]) -> Vec<u8> {
    let mut payload = Vec::new();
    for (id, value) in params {
        payload.extend_from_slice(&id.to_be_bytes());
        payload.extend_from_slice(&value.to_be_bytes());
    }
    frame(kind::SETTINGS, 0, 0, &payload)
}

/// One raw HTTP/2 connection.
#[derive(Debug)]
pub struct RawH2 {
    writer: Arc<Mutex<OwnedWriteHalf>>,
    events: mpsc::UnboundedReceiver<Event>,
    reader: JoinHandle<()>,
}

impl RawH2 {
    /// Connects, sends the preface and a SETTINGS frame with `params`.
    ///
    /// # Errors
    ///
    /// When the connect or the write fails.
    pub async fn connect(addr: SocketAddr, params: &[(u16, u32)]) -> anyhow::Result<Self> {
        let stream = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connect to {addr}"))?;
        stream.set_nodelay(true)?;
        let (read, mut write) = stream.into_split();
        let mut hello = PREFACE.to_vec();
        hello.extend_from_slice(&settings(params));
        write.write_all(&hello).await.context("write preface")?;
        let writer = Arc::new(Mutex::new(write));
        let (tx, events) = mpsc::unbounded_channel();
        let reader = tokio::spawn(read_loop(read, Arc::clone(&writer), tx));
        Ok(Self {
            writer,
            events,
            reader,
        })
    }

    /// Writes `bytes` (whole frames, usually several).
    ///
    /// # Errors
    ///
    /// When the write fails, e.g. because the server closed.
    pub async fn write(&self, bytes: &[u8]) -> std::io::Result<()> {
        self.writer.lock().await.write_all(bytes).await
    }

    /// Sends one HEADERS frame holding the whole block for `fields`.
    ///
    /// # Errors
    ///
    /// When the write fails.
    pub async fn headers(
        &self,
        stream: u32,
        fields: &[(&[u8], &[u8])],
        end_stream: bool,
    ) -> std::io::Result<()> {
        let flags = flag::END_HEADERS | if end_stream { flag::END_STREAM } else { 0 };
        self.write(&frame(kind::HEADERS, flags, stream, &encode_fields(fields)))
            .await
    }

    /// The next event, or `None` when `limit` passes first.
    pub async fn next_event(&mut self, limit: Duration) -> Option<Event> {
        match tokio::time::timeout(limit, self.events.recv()).await {
            Ok(Some(event)) => Some(event),
            Ok(None) => Some(Event::Closed),
            Err(_) => None,
        }
    }

    /// Reads events until `wanted` picks one (returned), the connection
    /// closes (`Event::Closed` is offered to `wanted` first), or `limit`
    /// passes (`None`).
    pub async fn wait_for<T>(
        &mut self,
        limit: Duration,
        mut wanted: impl FnMut(&Event) -> Option<T>,
    ) -> Option<T> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let event = self.next_event(left).await?;
            if let Some(found) = wanted(&event) {
                return Some(found);
            }
            if event == Event::Closed {
                return None;
            }
        }
    }

    /// Every event received so far, without waiting.
    pub fn drain(&mut self) -> Vec<Event> {
        let mut out = Vec::new();
        while let Ok(event) = self.events.try_recv() {
            out.push(event);
        }
        out
    }
}

impl Drop for RawH2 {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

async fn read_loop(
    mut read: OwnedReadHalf,
    writer: Arc<Mutex<OwnedWriteHalf>>,
    events: mpsc::UnboundedSender<Event>,
) {
    let mut decoder = hpack::Decoder::new();
    // A header block in progress: stream, bytes so far, END_STREAM.
    let mut block: Option<(u32, Vec<u8>, bool)> = None;
    loop {
        let mut head = [0u8; 9];
        if read.read_exact(&mut head).await.is_err() {
            let _ = events.send(Event::Closed);
            return;
        }
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let (kind, flags) = (head[3], head[4]);
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        let mut payload = vec![0u8; len];
        if read.read_exact(&mut payload).await.is_err() {
            let _ = events.send(Event::Closed);
            return;
        }
        let word = |at: usize| {
            payload
                .get(at..at + 4)
                .map_or(0, |b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
        };
        let event = match kind {
            kind::DATA => Some(Event::Data {
                stream,
                len,
                end_stream: flags & flag::END_STREAM != 0,
            }),
            kind::HEADERS | kind::CONTINUATION => {
                let fragment = if kind == kind::HEADERS {
                    // The proxy sends neither padding nor priority, but skip
                    // them if a future version does.
                    let pad = if flags & 0x8 != 0 {
                        usize::from(payload[0])
                    } else {
                        0
                    };
                    let start =
                        usize::from(flags & 0x8 != 0) + if flags & 0x20 != 0 { 5 } else { 0 };
                    block = Some((stream, Vec::new(), flags & flag::END_STREAM != 0));
                    payload[start..payload.len() - pad].to_vec()
                } else {
                    payload.clone()
                };
                if let Some((_, bytes, _)) = block.as_mut() {
                    bytes.extend_from_slice(&fragment);
                }
                if flags & flag::END_HEADERS != 0 {
                    block
                        .take()
                        .map(|(stream, bytes, end_stream)| Event::Headers {
                            stream,
                            fields: decoder.decode(&bytes).unwrap_or_default(),
                            end_stream,
                        })
                } else {
                    None
                }
            }
            kind::RST_STREAM => Some(Event::Reset {
                stream,
                code: word(0),
            }),
            kind::SETTINGS if flags & flag::ACK != 0 => Some(Event::SettingsAck),
            kind::SETTINGS => {
                let ack = frame(kind::SETTINGS, flag::ACK, 0, &[]);
                let _ = writer.lock().await.write_all(&ack).await;
                None
            }
            kind::PING if flags & flag::ACK != 0 => Some(Event::PingAck),
            kind::PING => {
                let pong = frame(kind::PING, flag::ACK, 0, &payload);
                let _ = writer.lock().await.write_all(&pong).await;
                None
            }
            kind::GOAWAY => Some(Event::GoAway {
                last_stream: word(0) & 0x7fff_ffff,
                code: word(4),
            }),
            _ => None,
        };
        if let Some(event) = event {
            if events.send(event).is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn literals_round_trip_through_a_real_decoder() {
        let long = vec![b'v'; 300];
        let block = encode_fields(&[(b":path", b"/a"), (b"x-long", &long)]);
        let fields = hpack::Decoder::new().decode(&block).unwrap();
        assert_eq!(fields[0], (b":path".to_vec(), b"/a".to_vec()));
        assert_eq!(fields[1].1, long);
    }

    #[test]
    fn frame_header_layout() {
        let f = frame(kind::PING, flag::ACK, 0, &[0; 8]);
        assert_eq!(&f[..9], &[0, 0, 8, 6, 1, 0, 0, 0, 0]);
    }
}

//! Bodies the load generator sends and checks: content derived from a seed
//! (so both ends can tell a misplaced or repeated chunk from the right one),
//! streamed lazily up to any size, hashed with SHA-256 as they pass.

use std::future::Future as _;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue};
use hyper::body::{Body, Frame, SizeHint};
use ring::digest;

/// Length of one generated data frame.
pub const FRAME_LEN: usize = 64 * 1024;

/// A prime just under [`FRAME_LEN`]: frame offsets taken modulo it repeat
/// only after 65 521 frames, so two frames of one body rarely look alike.
const ROTATION_MODULUS: u64 = 65_521;

/// Twice a frame of pseudo-random bytes, so any rotation of it is one slice.
fn pattern() -> &'static [u8] {
    static PATTERN: OnceLock<Vec<u8>> = OnceLock::new();
    PATTERN.get_or_init(|| {
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut block = Vec::with_capacity(FRAME_LEN * 2);
        while block.len() < FRAME_LEN {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            block.extend_from_slice(&state.to_le_bytes());
        }
        block.truncate(FRAME_LEN);
        block.extend_from_within(..);
        block
    })
}

/// A seed for the content of the body called `name` (a request id, with a
/// suffix for the reply).
pub fn seed(name: &str) -> u64 {
    let hash = digest::digest(&digest::SHA256, name.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&hash.as_ref()[..8]);
    u64::from_le_bytes(first)
}

/// Bytes `offset..offset + len` of the content for `seed`; `len` at most
/// [`FRAME_LEN`] and `offset` a multiple of it.
pub fn frame(seed: u64, offset: u64, len: usize) -> Bytes {
    let index = offset / FRAME_LEN as u64;
    let start = (seed.wrapping_add(index.wrapping_mul(7919)) % ROTATION_MODULUS) as usize;
    let mut out = BytesMut::with_capacity(len);
    out.extend_from_slice(&pattern()[start..start + len]);
    // The frame's index is written into it: a frame repeated or moved
    // changes the hash even where the rotation happens to repeat.
    let stamp = index.to_le_bytes();
    let n = stamp.len().min(len);
    out[..n].copy_from_slice(&stamp[..n]);
    out.freeze()
}

/// Text content (for gRPC's string fields): the same bytes mapped to letters.
pub fn text(seed: u64, len: usize) -> String {
    let mut out = String::with_capacity(len);
    let mut offset = 0u64;
    while out.len() < len {
        let n = (len - out.len()).min(FRAME_LEN);
        out.extend(
            frame(seed, offset, n)
                .iter()
                .map(|b| char::from(b'a' + b % 26)),
        );
        offset += n as u64;
    }
    out
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// SHA-256 of `bytes`, hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(digest::digest(&digest::SHA256, bytes).as_ref())
}

/// SHA-256 over data that arrives in pieces, with its length.
pub struct Hasher {
    context: digest::Context,
    len: u64,
}

impl Default for Hasher {
    fn default() -> Self {
        Hasher {
            context: digest::Context::new(&digest::SHA256),
            len: 0,
        }
    }
}

impl Hasher {
    /// Adds `data`.
    pub fn update(&mut self, data: &[u8]) {
        self.context.update(data);
        self.len += data.len() as u64;
    }

    /// Bytes seen so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether no byte was seen.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The hex digest.
    pub fn finish(self) -> String {
        hex(self.context.finish().as_ref())
    }
}

/// What a [`GenBody`] sent, once it has sent all of it.
#[derive(Debug, Clone, Default)]
pub struct Sent(Arc<Mutex<Option<(u64, String)>>>);

impl Sent {
    /// Length and SHA-256 of the whole body; `None` until its last frame.
    pub fn get(&self) -> Option<(u64, String)> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn set(&self, len: u64, sha: String) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = Some((len, sha));
    }
}

/// A generated body of `len` bytes: with a known size (so HTTP/1 frames it
/// by `content-length`) or without (chunked), and optionally ending with a
/// trailer that carries its SHA-256.
pub struct GenBody {
    seed: u64,
    len: u64,
    offset: u64,
    sized: bool,
    trailer: Option<HeaderName>,
    hasher: Option<Hasher>,
    sent: Sent,
    done: bool,
}

impl GenBody {
    /// `len` bytes of the content of `seed`.
    pub fn new(seed: u64, len: u64, sized: bool, trailer: Option<HeaderName>) -> Self {
        let mut body = GenBody {
            seed,
            len,
            offset: 0,
            sized,
            trailer,
            hasher: Some(Hasher::default()),
            sent: Sent::default(),
            done: false,
        };
        // An empty body without trailers may never be polled (hyper sends
        // `content-length: 0` or an empty DATA frame with END_STREAM).
        if len == 0 {
            body.finish();
        }
        body
    }

    /// Where the length and hash go once the body is all sent.
    pub fn sent(&self) -> Sent {
        self.sent.clone()
    }
}

impl GenBody {
    fn finish(&mut self) {
        if let Some(hasher) = self.hasher.take() {
            self.sent.set(self.len, hasher.finish());
            if self.trailer.is_none() {
                self.done = true;
            }
        }
    }
}

impl Body for GenBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        if this.offset < this.len {
            let n = usize::try_from(this.len - this.offset).map_or(FRAME_LEN, |l| l.min(FRAME_LEN));
            let data = frame(this.seed, this.offset, n);
            this.offset += n as u64;
            if let Some(hasher) = this.hasher.as_mut() {
                hasher.update(&data);
            }
            // Settled with the last byte: a sized body is not polled again
            // once its size hint reaches zero.
            if this.offset == this.len {
                this.finish();
            }
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        this.finish();
        match this.trailer.take() {
            Some(name) => {
                this.done = true;
                let mut trailers = HeaderMap::new();
                if let Some((_, sha)) = this.sent.get() {
                    if let Ok(value) = HeaderValue::from_str(&sha) {
                        trailers.insert(name, value);
                    }
                }
                Poll::Ready(Some(Ok(Frame::trailers(trailers))))
            }
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }

    fn size_hint(&self) -> SizeHint {
        if self.sized {
            SizeHint::with_exact(self.len - self.offset)
        } else {
            SizeHint::default()
        }
    }
}

/// A body that stops after `after` bytes until `gate` fires (or is
/// dropped): a request held in flight for as long as a test needs.
pub struct Gated<B> {
    inner: Pin<Box<B>>,
    passed: u64,
    after: u64,
    gate: Option<tokio::sync::oneshot::Receiver<()>>,
}

impl<B> Gated<B> {
    /// `inner`, held after `after` bytes until `gate`.
    pub fn new(inner: B, after: u64, gate: tokio::sync::oneshot::Receiver<()>) -> Self {
        Gated {
            inner: Box::pin(inner),
            passed: 0,
            after,
            gate: Some(gate),
        }
    }
}

impl<B: Body<Data = Bytes>> Body for Gated<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        if this.passed >= this.after {
            if let Some(gate) = this.gate.as_mut() {
                if Pin::new(gate).poll(cx).is_pending() {
                    return Poll::Pending;
                }
                this.gate = None;
            }
        }
        let polled = this.inner.as_mut().poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(data) = frame.data_ref() {
                this.passed += data.len() as u64;
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

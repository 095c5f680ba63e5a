//! Per-connection bookkeeping for downstream HTTP connections: requests in
//! flight, bytes read, and the timers that hyper cannot run for us.
//!
//! hyper's own HTTP/1 header timeout also runs while a kept-alive connection
//! waits for its next request, which would close idle connections after a
//! few seconds and answer 408 to clients that sent nothing. So the idle
//! timeout and the header-read timeout are both kept here, told apart by
//! whether any byte arrived since the last request ended. A connection with
//! requests in flight but no byte moving either way (a client that stopped
//! reading, or a zero flow-control window) counts as idle too.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Activity of one downstream connection.
#[derive(Debug)]
pub struct ConnActivity {
    in_flight: AtomicUsize,
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
    bytes_read_when_done: AtomicU64,
    last_done: Mutex<Instant>,
    /// HTTP/2: bytes between requests are control frames, not a slow head.
    http2: AtomicBool,
    /// Requests begun so far.
    requests: AtomicU64,
    /// hyper is letting an idle connection go to release its buffers: its
    /// shutdown must leave the socket open.
    parking: AtomicBool,
}

/// What the connection is doing, as its timers see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnState {
    /// A request is in flight.
    Busy,
    /// Bytes of a request head arrived; the head is not complete yet.
    ReadingHead,
    /// Nothing in flight and nothing received, for this long.
    Idle(Duration),
}

impl ConnActivity {
    /// A new connection: nothing in flight, nothing read.
    pub fn new() -> Arc<Self> {
        Arc::new(ConnActivity {
            in_flight: AtomicUsize::new(0),
            bytes_read: AtomicU64::new(0),
            bytes_written: AtomicU64::new(0),
            bytes_read_when_done: AtomicU64::new(0),
            last_done: Mutex::new(Instant::now()),
            http2: AtomicBool::new(false),
            requests: AtomicU64::new(0),
            parking: AtomicBool::new(false),
        })
    }

    /// Marks a request in flight until the guard drops.
    pub fn begin(self: &Arc<Self>) -> ActivityGuard {
        self.requests.fetch_add(1, Ordering::AcqRel);
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        ActivityGuard(self.clone())
    }

    /// Requests begun on the connection so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Acquire)
    }

    /// Bytes read from the client so far.
    pub fn bytes_read(&self) -> u64 {
        self.bytes_read.load(Ordering::Acquire)
    }

    /// While set, shutting the stream down leaves the socket open.
    pub fn set_parking(&self, parking: bool) {
        self.parking.store(parking, Ordering::Release);
    }

    /// Bytes read and written so far: while it stays the same, nothing moves.
    pub fn bytes_moved(&self) -> u64 {
        self.bytes_read.load(Ordering::Acquire) + self.bytes_written.load(Ordering::Acquire)
    }

    /// The connection's state now.
    pub fn state(&self) -> ConnState {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return ConnState::Busy;
        }
        let unanswered = self.bytes_read.load(Ordering::Acquire)
            > self.bytes_read_when_done.load(Ordering::Acquire);
        if unanswered && !self.http2.load(Ordering::Acquire) {
            return ConnState::ReadingHead;
        }
        let since = self
            .last_done
            .lock()
            .map(|t| t.elapsed())
            .unwrap_or_default();
        ConnState::Idle(since)
    }
}

/// One request in flight on a connection.
#[derive(Debug)]
pub struct ActivityGuard(Arc<ConnActivity>);

impl Drop for ActivityGuard {
    fn drop(&mut self) {
        if let Ok(mut t) = self.0.last_done.lock() {
            *t = Instant::now();
        }
        let read = self.0.bytes_read.load(Ordering::Acquire);
        self.0.bytes_read_when_done.store(read, Ordering::Release);
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A stream that counts the bytes read from it.
#[derive(Debug)]
pub struct CountingStream<S> {
    inner: S,
    activity: Arc<ConnActivity>,
}

impl<S> CountingStream<S> {
    /// Wraps a stream; reads are counted into `activity`.
    pub fn new(inner: S, activity: Arc<ConnActivity>) -> Self {
        CountingStream { inner, activity }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for CountingStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        let read = buf.filled().len() - before;
        if read > 0 {
            let previous = this
                .activity
                .bytes_read
                .fetch_add(read as u64, Ordering::AcqRel);
            if previous == 0 && buf.filled()[before..].starts_with(b"PRI ") {
                this.activity.http2.store(true, Ordering::Release);
            }
        }
        polled
    }
}

impl<S> CountingStream<S> {
    fn count_written(&self, polled: &Poll<io::Result<usize>>) {
        if let Poll::Ready(Ok(n)) = polled {
            self.activity
                .bytes_written
                .fetch_add(*n as u64, Ordering::AcqRel);
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for CountingStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.count_written(&polled);
        polled
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.activity.parking.load(Ordering::Acquire) {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.count_written(&polled);
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// A stream that can be taken back from whoever polls it (hyper), so that
/// the connection's timers can answer and close it whatever state hyper is
/// in. Once taken, reads see end of stream and writes fail.
///
/// It replaces a duplicated descriptor per connection: only one task ever
/// polls the stream and takes it, so the lock is never contended.
#[derive(Debug)]
pub struct Detachable<S>(Arc<Mutex<Option<S>>>);

/// Takes the stream of a [`Detachable`] back.
#[derive(Debug)]
pub struct DetachHandle<S>(Arc<Mutex<Option<S>>>);

impl<S> Detachable<S> {
    /// Wraps `inner`; the handle takes it back.
    pub fn new(inner: S) -> (Self, DetachHandle<S>) {
        let shared = Arc::new(Mutex::new(Some(inner)));
        (Detachable(shared.clone()), DetachHandle(shared))
    }

    fn with<T>(
        &self,
        gone: impl FnOnce() -> Poll<io::Result<T>>,
        f: impl FnOnce(Pin<&mut S>) -> Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>>
    where
        S: Unpin,
    {
        let Ok(mut guard) = self.0.lock() else {
            return Poll::Ready(Err(io::Error::other("connection state poisoned")));
        };
        match guard.as_mut() {
            Some(inner) => f(Pin::new(inner)),
            None => gone(),
        }
    }
}

impl<S> DetachHandle<S> {
    /// The stream, unless it was taken already.
    pub fn take(&self) -> Option<S> {
        self.0.lock().ok()?.take()
    }

    /// Puts a taken stream back, for whoever polls the [`Detachable`].
    pub fn restore(&self, inner: S) {
        if let Ok(mut slot) = self.0.lock() {
            *slot = Some(inner);
        }
    }
}

fn detached<T>() -> Poll<io::Result<T>> {
    Poll::Ready(Err(io::ErrorKind::NotConnected.into()))
}

impl<S: AsyncRead + Unpin> AsyncRead for Detachable<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.with(|| Poll::Ready(Ok(())), |inner| inner.poll_read(cx, buf))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Detachable<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.with(detached, |inner| inner.poll_write(cx, buf))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.with(detached, |inner| inner.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.with(|| Poll::Ready(Ok(())), |inner| inner.poll_shutdown(cx))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.with(detached, |inner| inner.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        self.0
            .lock()
            .ok()
            .and_then(|g| g.as_ref().map(AsyncWrite::is_write_vectored))
            .unwrap_or(false)
    }
}

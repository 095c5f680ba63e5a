//! Upstream faults the echo backend cannot stage.
//!
//! [`FaultProxy`] is a TCP relay in front of a backend whose behaviour a
//! test switches at run time: pass bytes both ways, accept and stay silent,
//! accept and close (FIN) or reset (RST), or stop accepting so that
//! connects time out (a blackhole: the listen queue is full, so the kernel
//! drops new SYNs, all on 127.0.0.1).
//!
//! [`DyingUpstream`] answers every request with a 200 head and part of the
//! body, then waits for the test to [`kill`](DyingUpstream::kill) it: FIN or
//! RST mid-body (HTTP/1, with a `content-length` or a chunked body), or
//! RST_STREAM or GOAWAY mid-body (HTTP/2, raw frames). Dying on the test's
//! signal rather than at once makes sure the proxy has already sent the
//! answer's head downstream, so what is checked is what a client sees of a
//! response cut in the middle.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use socket2::{Domain, SockRef, Socket, Type};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

use crate::h2raw::{flag, frame, kind, settings, PREFACE};

/// What a [`FaultProxy`] does with connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Relay both ways to the backend.
    Pass,
    /// Accept, read and discard, never answer; relays already open stop
    /// moving bytes.
    Silent,
    /// Accept and close at once (FIN); relays already open close too.
    Close,
    /// Accept and reset at once (RST); relays already open reset too.
    Reset,
    /// Accept nothing, so connects time out; relays already open stop
    /// moving bytes.
    Blackhole,
}

/// A TCP relay on 127.0.0.1 in front of a backend; it stops when dropped.
#[derive(Debug)]
pub struct FaultProxy {
    addr: SocketAddr,
    mode: watch::Sender<Fault>,
    /// The mode the accept loop has taken up (for a blackhole: it stopped
    /// accepting).
    seen: watch::Receiver<Fault>,
    accepted: Arc<AtomicUsize>,
    /// Connections that fill the listen queue during a blackhole.
    fillers: Mutex<Vec<TcpStream>>,
    task: JoinHandle<()>,
}

impl FaultProxy {
    /// Starts relaying to `target`.
    ///
    /// # Panics
    ///
    /// If it cannot bind.
    pub async fn start(target: SocketAddr) -> FaultProxy {
        let socket = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
        socket
            .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
            .expect("bind fault proxy");
        // A short listen queue: a blackhole fills it with a few connections.
        socket.listen(1).expect("listen");
        socket.set_nonblocking(true).expect("nonblocking");
        let listener = TcpListener::from_std(socket.into()).expect("tokio listener");
        let addr = listener.local_addr().expect("fault proxy addr");
        let (mode, mode_rx) = watch::channel(Fault::Pass);
        let (seen_tx, seen) = watch::channel(Fault::Pass);
        let accepted = Arc::new(AtomicUsize::new(0));
        let task = tokio::spawn(accept_loop(
            listener,
            target,
            mode_rx,
            seen_tx,
            Arc::clone(&accepted),
        ));
        FaultProxy {
            addr,
            mode,
            seen,
            accepted,
            fillers: Mutex::new(Vec::new()),
            task,
        }
    }

    /// The address to send to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections accepted so far (a blackhole's fillers included, once
    /// it heals).
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Switches to `fault`; returns once new connections get it.
    ///
    /// # Panics
    ///
    /// If the accept loop is gone, or a blackhole's listen queue never
    /// fills.
    pub async fn set(&self, fault: Fault) {
        if fault != Fault::Blackhole {
            // Queued fillers would be relayed as empty connections; closing
            // them first makes that immediate.
            self.fillers
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clear();
        }
        self.mode.send_replace(fault);
        let mut seen = self.seen.clone();
        seen.wait_for(|s| *s == fault)
            .await
            .expect("fault proxy accept loop");
        if fault == Fault::Blackhole {
            self.fill_listen_queue().await;
        }
    }

    /// Connects until a connect does not complete: the listen queue is
    /// full and the kernel drops SYNs from then on.
    async fn fill_listen_queue(&self) {
        let mut fillers = Vec::new();
        loop {
            assert!(fillers.len() < 16, "the listen queue never filled");
            match tokio::time::timeout(Duration::from_millis(100), TcpStream::connect(self.addr))
                .await
            {
                Ok(Ok(stream)) => fillers.push(stream),
                Ok(Err(err)) => panic!("filler connect failed: {err}"),
                Err(_) => break,
            }
        }
        *self.fillers.lock().unwrap_or_else(PoisonError::into_inner) = fillers;
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn accept_loop(
    listener: TcpListener,
    target: SocketAddr,
    mut mode: watch::Receiver<Fault>,
    seen: watch::Sender<Fault>,
    accepted: Arc<AtomicUsize>,
) {
    // Connections live in the set so that aborting this task closes them all.
    let mut relays = JoinSet::new();
    loop {
        let current = *mode.borrow_and_update();
        seen.send_replace(current);
        if current == Fault::Blackhole {
            if mode.changed().await.is_err() {
                return;
            }
            continue;
        }
        tokio::select! {
            conn = listener.accept() => {
                let Ok((stream, _)) = conn else { continue };
                accepted.fetch_add(1, Ordering::SeqCst);
                match current {
                    Fault::Pass => {
                        relays.spawn(relay(stream, target, mode.clone()));
                    }
                    Fault::Silent => {
                        relays.spawn(discard(stream));
                    }
                    Fault::Close => drop(stream),
                    Fault::Reset => reset(stream),
                    Fault::Blackhole => {}
                }
            }
            changed = mode.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            Some(_) = relays.join_next(), if !relays.is_empty() => {}
        }
    }
}

/// Drops `stream` with an RST instead of a FIN.
fn reset(stream: TcpStream) {
    let _ = SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    drop(stream);
}

async fn discard(mut stream: TcpStream) {
    let mut buf = vec![0u8; 16 * 1024];
    while matches!(stream.read(&mut buf).await, Ok(n) if n > 0) {}
}

async fn relay(mut downstream: TcpStream, target: SocketAddr, mut mode: watch::Receiver<Fault>) {
    let Ok(mut upstream) = TcpStream::connect(target).await else {
        return;
    };
    let changed = tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut downstream, &mut upstream) => return,
        changed = mode.wait_for(|m| *m != Fault::Pass) => changed.map(|m| *m),
    };
    match changed {
        Ok(Fault::Reset) => {
            reset(downstream);
            reset(upstream);
        }
        Ok(Fault::Silent | Fault::Blackhole) => {
            // Holds both sockets without moving a byte, as a partition
            // would, until the fault heals.
            let _ = mode.wait_for(|m| *m == Fault::Pass).await;
        }
        Ok(Fault::Close | Fault::Pass) | Err(_) => {}
    }
}

/// How a [`DyingUpstream`] ends an answer once killed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Death {
    /// HTTP/1.1, `content-length` body; FIN mid-body.
    H1Fin,
    /// HTTP/1.1, `content-length` body; RST mid-body.
    H1Reset,
    /// HTTP/1.1, chunked body; FIN mid-body (no last chunk).
    H1ChunkedFin,
    /// HTTP/2: RST_STREAM `INTERNAL_ERROR` mid-body; the connection stays.
    H2RstStream,
    /// HTTP/2: GOAWAY `INTERNAL_ERROR` naming the stream, then close.
    H2GoAway,
    /// HTTP/2: GOAWAY `NO_ERROR` naming the stream, then the rest of the
    /// body with END_STREAM: a clean end, the control case.
    H2GracefulGoAway,
}

impl Death {
    /// Whether it speaks HTTP/2 (prior knowledge).
    pub fn is_http2(self) -> bool {
        matches!(
            self,
            Death::H2RstStream | Death::H2GoAway | Death::H2GracefulGoAway
        )
    }
}

/// Body bytes a [`DyingUpstream`] sends before it is killed (and, for
/// [`Death::H2GracefulGoAway`], after).
pub const PARTIAL_BODY: usize = 1000;

/// The `content-length` a [`DyingUpstream`] announces over HTTP/1.
pub const ANNOUNCED_BODY: usize = 100_000;

/// An upstream that dies in the middle of every answer; it stops when
/// dropped.
#[derive(Debug)]
pub struct DyingUpstream {
    addr: SocketAddr,
    requests: Arc<AtomicUsize>,
    /// How many times the test has killed; an answer dies once this
    /// passes what it was when the answer started.
    kills: watch::Sender<u64>,
    task: JoinHandle<()>,
}

impl DyingUpstream {
    /// Starts one that ends its answers by `death`.
    ///
    /// # Panics
    ///
    /// If it cannot bind.
    pub async fn start(death: Death) -> DyingUpstream {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind dying upstream");
        let addr = listener.local_addr().expect("dying upstream addr");
        let requests = Arc::new(AtomicUsize::new(0));
        let (kills, killed) = watch::channel(0u64);
        let counter = Arc::clone(&requests);
        let task = tokio::spawn(async move {
            let mut connections = JoinSet::new();
            loop {
                tokio::select! {
                    conn = listener.accept() => {
                        let Ok((stream, _)) = conn else { continue };
                        let (counter, killed) = (Arc::clone(&counter), killed.clone());
                        connections.spawn(async move {
                            let _ = if death.is_http2() {
                                serve_h2(stream, death, counter, killed).await
                            } else {
                                serve_h1(stream, death, counter, killed).await
                            };
                        });
                    }
                    Some(_) = connections.join_next(), if !connections.is_empty() => {}
                }
            }
        });
        DyingUpstream {
            addr,
            requests,
            kills,
            task,
        }
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Requests whose head has arrived.
    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }

    /// Ends every answer started so far; later ones wait for the next kill.
    pub fn kill(&self) {
        self.kills.send_modify(|kills| *kills += 1);
    }
}

impl Drop for DyingUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve_h1(
    mut stream: TcpStream,
    death: Death,
    requests: Arc<AtomicUsize>,
    mut killed: watch::Receiver<u64>,
) -> std::io::Result<()> {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    }
    requests.fetch_add(1, Ordering::SeqCst);
    let started = *killed.borrow_and_update();
    let body = vec![b'x'; PARTIAL_BODY];
    let mut answer = Vec::new();
    if death == Death::H1ChunkedFin {
        answer.extend_from_slice(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n");
        answer.extend_from_slice(format!("{PARTIAL_BODY:x}\r\n").as_bytes());
        answer.extend_from_slice(&body);
        answer.extend_from_slice(b"\r\n");
    } else {
        answer.extend_from_slice(
            format!("HTTP/1.1 200 OK\r\ncontent-length: {ANNOUNCED_BODY}\r\n\r\n").as_bytes(),
        );
        answer.extend_from_slice(&body);
    }
    stream.write_all(&answer).await?;
    stream.flush().await?;
    let _ = killed.wait_for(|kills| *kills > started).await;
    if death == Death::H1Reset {
        reset(stream);
    } else {
        stream.shutdown().await?;
    }
    Ok(())
}

/// HTTP/2 error codes (RFC 9113 §7).
const NO_ERROR: u32 = 0x0;
const INTERNAL_ERROR: u32 = 0x2;

async fn serve_h2(
    stream: TcpStream,
    death: Death,
    requests: Arc<AtomicUsize>,
    killed: watch::Receiver<u64>,
) -> std::io::Result<()> {
    let (mut read, write) = stream.into_split();
    let mut preface = [0u8; PREFACE.len()];
    read.read_exact(&mut preface).await?;
    let write = Arc::new(tokio::sync::Mutex::new(write));
    write.lock().await.write_all(&settings(&[])).await?;
    // The reader acknowledges SETTINGS and starts an answer per HEADERS;
    // it keeps reading (acknowledgements, window updates, request bodies)
    // so nothing backs up while answers wait to be killed.
    let mut answers = JoinSet::new();
    loop {
        tokio::select! {
            read_frame = read_frame(&mut read) => {
                let (kind, flags, id, _) = read_frame?;
                match kind {
                    kind::SETTINGS if flags & flag::ACK == 0 => {
                        write
                            .lock()
                            .await
                            .write_all(&frame(kind::SETTINGS, flag::ACK, 0, &[]))
                            .await?;
                    }
                    kind::HEADERS => {
                        requests.fetch_add(1, Ordering::SeqCst);
                        let started = *killed.borrow();
                        answers.spawn(answer_h2(
                            Arc::clone(&write),
                            id,
                            death,
                            started,
                            killed.clone(),
                        ));
                    }
                    _ => {}
                }
            }
            Some(_) = answers.join_next(), if !answers.is_empty() => {}
        }
    }
}

async fn answer_h2(
    write: Arc<tokio::sync::Mutex<tokio::net::tcp::OwnedWriteHalf>>,
    stream_id: u32,
    death: Death,
    started: u64,
    mut killed: watch::Receiver<u64>,
) -> std::io::Result<()> {
    let body = vec![b'x'; PARTIAL_BODY];
    {
        let mut write = write.lock().await;
        // 0x88: `:status: 200` from the HPACK static table.
        write
            .write_all(&frame(kind::HEADERS, flag::END_HEADERS, stream_id, &[0x88]))
            .await?;
        write
            .write_all(&frame(kind::DATA, 0, stream_id, &body))
            .await?;
    }
    let _ = killed.wait_for(|kills| *kills > started).await;
    let goaway = |code: u32| {
        let mut payload = stream_id.to_be_bytes().to_vec();
        payload.extend_from_slice(&code.to_be_bytes());
        frame(kind::GOAWAY, 0, 0, &payload)
    };
    let mut write = write.lock().await;
    match death {
        Death::H2RstStream => {
            // Only the stream dies; the connection stays up.
            write
                .write_all(&frame(
                    kind::RST_STREAM,
                    0,
                    stream_id,
                    &INTERNAL_ERROR.to_be_bytes(),
                ))
                .await?;
        }
        Death::H2GoAway => {
            write.write_all(&goaway(INTERNAL_ERROR)).await?;
            write.shutdown().await?;
        }
        Death::H2GracefulGoAway => {
            write.write_all(&goaway(NO_ERROR)).await?;
            write
                .write_all(&frame(kind::DATA, flag::END_STREAM, stream_id, &body))
                .await?;
            write.shutdown().await?;
        }
        Death::H1Fin | Death::H1Reset | Death::H1ChunkedFin => {}
    }
    Ok(())
}

/// One frame: type, flags, stream id and payload.
async fn read_frame(
    read: &mut tokio::net::tcp::OwnedReadHalf,
) -> std::io::Result<(u8, u8, u32, Vec<u8>)> {
    let mut header = [0u8; 9];
    read.read_exact(&mut header).await?;
    let len = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
    let id = u32::from_be_bytes([header[5], header[6], header[7], header[8]]) & 0x7fff_ffff;
    let mut payload = vec![0u8; len];
    read.read_exact(&mut payload).await?;
    Ok((header[3], header[4], id, payload))
}

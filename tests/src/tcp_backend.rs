//! Raw TCP test backends: an echo server that half-closes after the client
//! does, and a banner server that closes its write side first.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

#[derive(Debug, Default)]
struct State {
    connections: AtomicUsize,
    /// Bytes received on each finished connection (up to the client's EOF).
    received: Mutex<Vec<Vec<u8>>>,
}

/// A running TCP backend; it stops when dropped.
#[derive(Debug)]
pub struct TcpBackend {
    addr: SocketAddr,
    state: Arc<State>,
    task: JoinHandle<()>,
}

#[derive(Debug, Clone)]
enum Mode {
    Echo,
    Banner(Vec<u8>),
}

impl TcpBackend {
    /// An echo server: it writes back everything it reads and, once the
    /// client has shut down its write side, shuts down its own.
    pub async fn echo() -> Self {
        Self::start(Mode::Echo).await
    }

    /// A banner server: it writes `banner`, shuts down its write side at
    /// once, then reads until the client's EOF and records what came.
    pub async fn banner(banner: &[u8]) -> Self {
        Self::start(Mode::Banner(banner.to_vec())).await
    }

    async fn start(mode: Mode) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind tcp backend");
        let addr = listener.local_addr().expect("tcp backend addr");
        let state = Arc::new(State::default());
        let task = tokio::spawn(accept_loop(listener, mode, Arc::clone(&state)));
        Self { addr, state, task }
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.state.connections.load(Ordering::SeqCst)
    }

    /// What each connection that reached the client's EOF sent, in order of
    /// completion.
    pub fn received(&self) -> Vec<Vec<u8>> {
        self.state
            .received
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl Drop for TcpBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn accept_loop(listener: TcpListener, mode: Mode, state: Arc<State>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                state.connections.fetch_add(1, Ordering::SeqCst);
                let state = Arc::clone(&state);
                let mode = mode.clone();
                connections.spawn(async move {
                    let _ = serve(stream, mode, state).await;
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

async fn serve(mut stream: TcpStream, mode: Mode, state: Arc<State>) -> std::io::Result<()> {
    let echo = match mode {
        Mode::Echo => true,
        Mode::Banner(banner) => {
            stream.write_all(&banner).await?;
            stream.shutdown().await?;
            false
        }
    };
    let mut received = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        received.extend_from_slice(&buf[..n]);
        if echo {
            stream.write_all(&buf[..n]).await?;
        }
    }
    state
        .received
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push(received);
    if echo {
        stream.shutdown().await?;
    }
    Ok(())
}

//! A WebSocket echo backend: text and binary messages come back as sent.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

use futures_util::{SinkExt as _, StreamExt as _};
use http::HeaderMap;
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};

/// A running WebSocket echo backend; it stops when dropped.
#[derive(Debug)]
pub struct WsBackend {
    addr: SocketAddr,
    handshakes: Arc<Mutex<Vec<(String, HeaderMap)>>>,
    task: JoinHandle<()>,
}

impl WsBackend {
    /// Starts the backend on `127.0.0.1:0`.
    ///
    /// # Panics
    ///
    /// If it cannot bind.
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind ws backend");
        let addr = listener.local_addr().expect("ws backend addr");
        let handshakes = Arc::new(Mutex::new(Vec::new()));
        let task = tokio::spawn(accept_loop(listener, Arc::clone(&handshakes)));
        Self {
            addr,
            handshakes,
            task,
        }
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Path and headers of every upgrade request accepted so far.
    pub fn handshakes(&self) -> Vec<(String, HeaderMap)> {
        self.handshakes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl Drop for WsBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn accept_loop(listener: TcpListener, handshakes: Arc<Mutex<Vec<(String, HeaderMap)>>>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let handshakes = Arc::clone(&handshakes);
                connections.spawn(async move {
                    // The callback's signature is tungstenite's, large error and all.
                    #[allow(clippy::result_large_err)]
                    let record = |req: &Request, resp: Response| {
                        handshakes
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .push((req.uri().path().to_owned(), req.headers().clone()));
                        Ok(resp)
                    };
                    let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(stream, record).await else {
                        return;
                    };
                    while let Some(Ok(message)) = ws.next().await {
                        if message.is_close() {
                            break;
                        }
                        let echo = message.is_text() || message.is_binary();
                        if echo && ws.send(message).await.is_err() {
                            return;
                        }
                    }
                    let _ = ws.close(None).await;
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

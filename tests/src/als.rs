//! An access-log collector (the reference control plane's ALS server) run
//! in the test process on 127.0.0.1, stoppable and restartable on the same
//! address, and finished-call records to feed an `AlsSink` with.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::{HeaderValue, Method};
use postern::telemetry::log::{CallKind, CallLog, TrafficDirection};
use postern::telemetry::{ResponseFlag, ResponseFlags};
use postern_control::als::{AlsEvent, AlsServer};
use tokio::net::TcpListener;
use tokio::sync::{broadcast, oneshot};
use tokio::task::JoinHandle;

/// An ALS server on 127.0.0.1.
pub struct Collector {
    /// The server: its events and summary. A restart replaces it.
    pub server: AlsServer,
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Collector {
    /// Starts on a free port.
    pub async fn start() -> Collector {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind als");
        Collector::serve(listener)
    }

    /// Starts serving on `listener`, which may already hold connections
    /// waiting to be accepted.
    pub fn serve(listener: TcpListener) -> Collector {
        let addr = listener.local_addr().expect("addr");
        let server = AlsServer::new();
        let (stop, stopped) = oneshot::channel::<()>();
        let service = server.clone().into_service();
        let closer = server.clone();
        let task = tokio::spawn(async move {
            let incoming = tonic::transport::server::TcpIncoming::from(listener);
            let _ = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = stopped.await;
                    closer.close_streams();
                })
                .await;
        });
        Collector {
            server,
            addr,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// `http://127.0.0.1:port`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops serving and ends every stream with `UNAVAILABLE`.
    pub async fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }

    /// Starts a fresh server (empty summary, new event channel) on the
    /// same address.
    pub async fn restart(&mut self) {
        self.stop().await;
        let listener = TcpListener::bind(self.addr).await.expect("rebind als");
        *self = Collector::serve(listener);
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Receives batches until they hold at least `count` entries in all, and
/// returns them.
///
/// # Panics
///
/// After 10 s without enough, or if the event stream lags or closes.
pub async fn wait_entries(
    events: &mut broadcast::Receiver<AlsEvent>,
    count: usize,
) -> Vec<AlsEvent> {
    crate::within(crate::EVENTUALLY_TIMEOUT, "access-log entries", async {
        let mut received = Vec::new();
        let mut entries = 0;
        while entries < count {
            let event = events.recv().await.expect("als event");
            entries += event.http().len() + event.tcp().len();
            received.push(event);
        }
        received
    })
    .await
}

/// A finished HTTP call: `GET shop.local/cart` on route `route` to cluster
/// `cart`, answered `status` after 3ms, from an mTLS peer.
pub fn http_call(route: &str, status: u16) -> CallLog {
    CallLog {
        kind: CallKind::Http,
        direction: TrafficDirection::Inbound,
        start_time: SystemTime::now(),
        duration: Duration::from_millis(3),
        listener: Arc::from("inbound"),
        protocol: "HTTP/1.1",
        method: Some(Method::GET),
        authority: Some(HeaderValue::from_static("shop.local")),
        path: Some(http::uri::PathAndQuery::from_static("/cart")),
        user_agent: Some(HeaderValue::from_static("postern-tests")),
        request_id: Some(HeaderValue::from_static("req-1")),
        trace_id: None,
        status,
        grpc_status: None,
        flags: ResponseFlags::default(),
        bytes_received: 11,
        bytes_sent: 22,
        upstream_ttfb: Some(Duration::from_millis(2)),
        upstream_host: Some(SocketAddr::from(([127, 0, 0, 1], 8080))),
        cluster: Some(Arc::from("cart")),
        route: Some(Arc::from(route)),
        downstream_addr: SocketAddr::from(([127, 0, 0, 1], 40000)),
        downstream_principal: Some(Arc::from("spiffe://cluster.local/ns/shop/sa/web")),
        upstream_principal: None,
        mtls: true,
        request_headers: Vec::new(),
    }
}

/// `http_call` with a response flag.
pub fn flagged_http_call(route: &str, status: u16, flag: ResponseFlag) -> CallLog {
    let mut call = http_call(route, status);
    call.flags.insert(flag);
    call
}

/// A finished TCP connection to cluster `db`.
pub fn tcp_call() -> CallLog {
    CallLog {
        kind: CallKind::Tcp,
        protocol: "TCP",
        method: None,
        authority: None,
        path: None,
        user_agent: None,
        request_id: None,
        status: 0,
        upstream_ttfb: None,
        route: None,
        cluster: Some(Arc::from("db")),
        downstream_principal: None,
        mtls: false,
        bytes_received: 300,
        bytes_sent: 400,
        ..http_call("-", 0)
    }
}

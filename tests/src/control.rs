//! The reference control plane's ADS server, run in the test process on
//! 127.0.0.1, stoppable and restartable on the same address.

use std::net::SocketAddr;

use postern_control::ads::{AdsEvent, AdsEventKind, AdsServer, Snapshot};
use tokio::net::TcpListener;
use tokio::sync::{broadcast, oneshot};
use tokio::task::JoinHandle;

/// An ADS server on 127.0.0.1.
pub struct ControlPlane {
    /// The server: set snapshots, watch ACKs and NACKs.
    pub server: AdsServer,
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl ControlPlane {
    /// Starts on a free port, serving `snapshot`.
    pub async fn start(snapshot: Snapshot) -> ControlPlane {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind ads");
        ControlPlane::serve(listener, AdsServer::new(), snapshot)
    }

    fn serve(listener: TcpListener, server: AdsServer, snapshot: Snapshot) -> ControlPlane {
        let addr = listener.local_addr().expect("addr");
        server.set_snapshot(snapshot);
        let (stop, stopped) = oneshot::channel::<()>();
        let service = server.clone().into_service();
        let task = tokio::spawn(async move {
            let incoming = tonic::transport::server::TcpIncoming::from(listener);
            let _ = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = stopped.await;
                })
                .await;
        });
        ControlPlane {
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

    /// Stops serving and closes every stream, as a crashed control plane would.
    pub async fn stop(&mut self) {
        self.server.close_streams();
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }

    /// Starts a fresh server on the same address with `snapshot`.
    pub async fn restart(&mut self, snapshot: Snapshot) {
        self.restart_with(AdsServer::new(), snapshot).await;
    }

    /// Like [`ControlPlane::restart`] with a server made by the caller, who
    /// can then watch its events from the first connection on.
    pub async fn restart_with(&mut self, server: AdsServer, snapshot: Snapshot) {
        self.stop().await;
        let listener = TcpListener::bind(self.addr).await.expect("rebind ads");
        *self = ControlPlane::serve(listener, server, snapshot);
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Waits for the first event that `want` accepts.
///
/// # Panics
///
/// After 10 s without one.
pub async fn wait_event(
    events: &mut broadcast::Receiver<AdsEvent>,
    what: &str,
    want: impl Fn(&AdsEvent) -> bool,
) -> AdsEvent {
    crate::within(crate::EVENTUALLY_TIMEOUT, what, async {
        loop {
            match events.recv().await {
                Ok(event) if want(&event) => return event,
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => panic!("event stream closed"),
            }
        }
    })
    .await
}

/// Waits until each `(type_url, version)` of `acks` has been ACKed, in
/// whatever order the proxy applies them: a listener can be in before the
/// clusters it sends to.
pub async fn wait_acks(events: &mut broadcast::Receiver<AdsEvent>, acks: &[(&str, &str)]) {
    let mut missing = acks.to_vec();
    crate::within(crate::EVENTUALLY_TIMEOUT, "ACKs", async {
        while !missing.is_empty() {
            match events.recv().await {
                Ok(event) => {
                    missing.retain(|(type_url, version)| !is_ack(&event, type_url, version))
                }
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => panic!("event stream closed"),
            }
        }
    })
    .await;
}

/// Whether `event` is a NACK of `type_url`.
pub fn is_nack(event: &AdsEvent, type_url: &str) -> bool {
    event.type_url == type_url && matches!(event.kind, AdsEventKind::Nack { .. })
}

/// Whether `event` is an ACK of `version` for `type_url`.
pub fn is_ack(event: &AdsEvent, type_url: &str, version: &str) -> bool {
    event.type_url == type_url
        && matches!(&event.kind, AdsEventKind::Ack { version: v } if v == version)
}

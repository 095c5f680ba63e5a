//! A fake ADS control plane for tests, driven through channels: each stream
//! the client opens shows up as a [`FakeStream`] whose requests the test
//! reads and to which it sends responses.

#![allow(dead_code, unreachable_pub)]

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::stream::{self, Stream};
use postern_proto::envoy::config::cluster::v3::Cluster;
use postern_proto::envoy::config::endpoint::v3::ClusterLoadAssignment;
use postern_proto::envoy::config::listener::v3::Listener;
use postern_proto::envoy::config::route::v3::RouteConfiguration;
use postern_proto::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use postern_proto::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
    Resource as DeltaResource,
};
use postern_proto::google::protobuf::Any;
use postern_xds::{
    ClientConfig, Handler, Node, Protocol, ResourceError, Subscriptions, Update, XdsClient,
};
use prost::{Message, Name};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Server, ServerTlsConfig};
use tonic::{Request, Response, Status, Streaming};

/// Bound on every wait for the client; generous, since it only matters when
/// a test is failing.
const WAIT: Duration = Duration::from_secs(10);

/// Awaits `future`, failing the test if it takes longer than [`WAIT`].
pub async fn within<F: Future>(future: F) -> F::Output {
    tokio::time::timeout(WAIT, future)
        .await
        .expect("timed out waiting for the xDS client")
}

pub type SotwStream = FakeStream<DiscoveryRequest, DiscoveryResponse>;
pub type DeltaStream = FakeStream<DeltaDiscoveryRequest, DeltaDiscoveryResponse>;

/// One ADS stream as the server sees it.
pub struct FakeStream<Req, Resp> {
    requests: mpsc::UnboundedReceiver<Req>,
    responses: mpsc::UnboundedSender<Resp>,
}

impl<Req, Resp> FakeStream<Req, Resp> {
    /// The next request the client sent on this stream.
    pub async fn next_request(&mut self) -> Req {
        within(self.requests.recv())
            .await
            .expect("the client closed the stream")
    }

    /// Sends a response to the client.
    pub fn respond(&self, response: Resp) {
        self.responses.send(response).expect("the stream is closed");
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

struct FakeAds {
    sotw: mpsc::UnboundedSender<SotwStream>,
    delta: mpsc::UnboundedSender<DeltaStream>,
    kill: watch::Receiver<bool>,
}

/// Hands the stream's two halves to the test: requests through one channel,
/// responses from another until the server is stopped.
fn open<Req, Resp>(
    mut inbound: Streaming<Req>,
    kill: watch::Receiver<bool>,
) -> (FakeStream<Req, Resp>, BoxStream<Resp>)
where
    Req: Send + 'static,
    Resp: Send + 'static,
{
    let (req_tx, req_rx) = mpsc::unbounded_channel();
    let (resp_tx, resp_rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(Some(request)) = inbound.message().await {
            if req_tx.send(request).is_err() {
                break;
            }
        }
    });
    let outbound = stream::unfold((resp_rx, kill), |(mut rx, mut kill)| async move {
        let response = tokio::select! {
            response = rx.recv() => response,
            // Ends the stream, as a control plane going away does.
            _ = kill.wait_for(|killed| *killed) => None,
        };
        response.map(|r| (Ok(r), (rx, kill)))
    });
    (
        FakeStream {
            requests: req_rx,
            responses: resp_tx,
        },
        Box::pin(outbound),
    )
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for FakeAds {
    type StreamAggregatedResourcesStream = BoxStream<DiscoveryResponse>;
    type DeltaAggregatedResourcesStream = BoxStream<DeltaDiscoveryResponse>;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        let (fake, outbound) = open(request.into_inner(), self.kill.clone());
        self.sotw
            .send(fake)
            .map_err(|_| Status::unavailable("test over"))?;
        Ok(Response::new(outbound))
    }

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        let (fake, outbound) = open(request.into_inner(), self.kill.clone());
        self.delta
            .send(fake)
            .map_err(|_| Status::unavailable("test over"))?;
        Ok(Response::new(outbound))
    }
}

/// A running fake control plane.
pub struct FakeServer {
    pub addr: SocketAddr,
    sotw: mpsc::UnboundedReceiver<SotwStream>,
    delta: mpsc::UnboundedReceiver<DeltaStream>,
    shutdown: oneshot::Sender<()>,
    kill: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl FakeServer {
    /// Starts on a free port of 127.0.0.1.
    pub async fn start() -> FakeServer {
        FakeServer::start_on("127.0.0.1:0".parse().unwrap(), None).await
    }

    /// Starts on `addr` (an address a stopped server had), with TLS when
    /// given.
    pub async fn start_on(addr: SocketAddr, tls: Option<ServerTlsConfig>) -> FakeServer {
        let listener = TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (sotw_tx, sotw) = mpsc::unbounded_channel();
        let (delta_tx, delta) = mpsc::unbounded_channel();
        let (kill, kill_rx) = watch::channel(false);
        let (shutdown, shutdown_rx) = oneshot::channel::<()>();
        let service = AggregatedDiscoveryServiceServer::new(FakeAds {
            sotw: sotw_tx,
            delta: delta_tx,
            kill: kill_rx,
        });
        let mut builder = Server::builder();
        if let Some(tls) = tls {
            builder = builder.tls_config(tls).unwrap();
        }
        let router = builder.add_service(service);
        let task = tokio::spawn(async move {
            router
                .serve_with_incoming_shutdown(TcpIncoming::from(listener), async {
                    let _ = shutdown_rx.await;
                })
                .await
                .unwrap();
        });
        FakeServer {
            addr,
            sotw,
            delta,
            shutdown,
            kill,
            task,
        }
    }

    /// The next state-of-the-world stream the client opens.
    pub async fn next_sotw(&mut self) -> SotwStream {
        within(self.sotw.recv()).await.expect("server gone")
    }

    /// The next delta stream the client opens.
    pub async fn next_delta(&mut self) -> DeltaStream {
        within(self.delta.recv()).await.expect("server gone")
    }

    /// Stops accepting, ends every open stream, and waits until the port is
    /// free again; returns the address for a restart.
    pub async fn stop(self) -> SocketAddr {
        // The listener closes first, so no new stream can start on this
        // server while the old ones end.
        let _ = self.shutdown.send(());
        let _ = self.kill.send(true);
        within(self.task).await.unwrap();
        self.addr
    }
}

/// The client config the tests use: quick back-off so reconnects are fast.
pub fn config(addr: SocketAddr, protocol: Protocol) -> ClientConfig {
    let mut config = ClientConfig::new(format!("http://{addr}"), node());
    config.protocol = protocol;
    config.initial_backoff = Duration::from_millis(5);
    config.max_backoff = Duration::from_millis(50);
    config
}

pub fn node() -> Node {
    Node {
        id: "sidecar~10.0.0.1~web-1.shop~shop.svc.cluster.local".into(),
        cluster: "web".into(),
        ..Node::default()
    }
}

type Verdict = dyn Fn(&str, &Update) -> Result<(), Vec<ResourceError>> + Send + Sync;

/// A handler that reports every update and connection change through
/// channels, and accepts or rejects as its verdict says.
pub struct Recorder {
    updates: mpsc::UnboundedSender<(String, Update)>,
    connections: mpsc::UnboundedSender<bool>,
    verdict: Box<Verdict>,
}

impl Handler for Recorder {
    fn on_update(&self, type_url: &str, update: Update) -> Result<(), Vec<ResourceError>> {
        let verdict = (self.verdict)(type_url, &update);
        let _ = self.updates.send((type_url.to_owned(), update));
        verdict
    }

    fn on_connection(&self, connected: bool) {
        let _ = self.connections.send(connected);
    }
}

/// What the test sees of the handler.
pub struct Observed {
    pub updates: mpsc::UnboundedReceiver<(String, Update)>,
    pub connections: mpsc::UnboundedReceiver<bool>,
}

impl Observed {
    pub async fn next_update(&mut self) -> (String, Update) {
        within(self.updates.recv()).await.expect("handler gone")
    }

    pub async fn next_connection(&mut self) -> bool {
        within(self.connections.recv()).await.expect("handler gone")
    }
}

/// A handler with `verdict`, and the receiving ends of what it sees.
pub fn recorder(
    verdict: impl Fn(&str, &Update) -> Result<(), Vec<ResourceError>> + Send + Sync + 'static,
) -> (Arc<Recorder>, Observed) {
    let (updates_tx, updates) = mpsc::unbounded_channel();
    let (connections_tx, connections) = mpsc::unbounded_channel();
    (
        Arc::new(Recorder {
            updates: updates_tx,
            connections: connections_tx,
            verdict: Box::new(verdict),
        }),
        Observed {
            updates,
            connections,
        },
    )
}

pub fn accept_all(_: &str, _: &Update) -> Result<(), Vec<ResourceError>> {
    Ok(())
}

/// Starts `client` in the background and returns its subscriptions handle.
pub fn spawn(client: XdsClient) -> (Subscriptions, JoinHandle<()>) {
    let subscriptions = client.subscriptions();
    (subscriptions, tokio::spawn(client.run()))
}

fn any<M: Message + Name>(message: &M) -> Any {
    Any {
        type_url: M::type_url(),
        value: message.encode_to_vec(),
    }
}

pub fn cluster(name: &str) -> Any {
    any(&Cluster {
        name: name.into(),
        ..Cluster::default()
    })
}

pub fn listener(name: &str) -> Any {
    any(&Listener {
        name: name.into(),
        ..Listener::default()
    })
}

pub fn route(name: &str) -> Any {
    any(&RouteConfiguration {
        name: name.into(),
        ..RouteConfiguration::default()
    })
}

pub fn endpoints(cluster: &str) -> Any {
    any(&ClusterLoadAssignment {
        cluster_name: cluster.into(),
        ..ClusterLoadAssignment::default()
    })
}

pub fn sotw_response(
    type_url: &str,
    version: &str,
    nonce: &str,
    bodies: Vec<Any>,
) -> DiscoveryResponse {
    DiscoveryResponse {
        version_info: version.into(),
        resources: bodies,
        type_url: type_url.into(),
        nonce: nonce.into(),
        ..DiscoveryResponse::default()
    }
}

pub fn delta_resource(name: &str, version: &str, body: Any) -> DeltaResource {
    DeltaResource {
        name: name.into(),
        version: version.into(),
        resource: Some(body),
        ..DeltaResource::default()
    }
}

pub fn delta_response(
    type_url: &str,
    version: &str,
    nonce: &str,
    added: Vec<DeltaResource>,
    removed: &[&str],
) -> DeltaDiscoveryResponse {
    DeltaDiscoveryResponse {
        system_version_info: version.into(),
        resources: added,
        type_url: type_url.into(),
        removed_resources: removed.iter().map(|s| (*s).to_owned()).collect(),
        nonce: nonce.into(),
        ..DeltaDiscoveryResponse::default()
    }
}

/// Names of the resources of a state-of-the-world update.
pub fn state_names(update: &Update) -> Vec<String> {
    match update {
        Update::State { resources, .. } => resources.iter().map(|r| r.name.clone()).collect(),
        Update::Delta { .. } => panic!("expected a state-of-the-world update, got {update:?}"),
    }
}

/// Shared cell for a handler that needs the client's own handle.
pub type Cell<T> = Arc<Mutex<Option<T>>>;

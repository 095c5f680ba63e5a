use std::collections::HashMap;
use std::time::Duration;

use postern_proto::envoy::config::cluster::v3::Cluster;
use postern_proto::envoy::config::core::v3::Node;
use postern_proto::envoy::config::route::v3::RouteConfiguration;
use postern_proto::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use postern_proto::google::rpc;
use postern_proto::type_url::{CLUSTER, ENDPOINT, ROUTE};
use prost::Message;
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tonic::transport::Channel;

use super::*;

/// Bound on every wait for something the test expects to happen.
const WAIT: Duration = Duration::from_secs(10);

type Client = AggregatedDiscoveryServiceClient<Channel>;

async fn start(server: &AdsServer) -> Client {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let service = server.clone().into_service();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(TcpIncoming::from(listener)),
    );
    AggregatedDiscoveryServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap()
}

fn cluster(name: &str, connect_timeout_secs: i64) -> Cluster {
    Cluster {
        name: name.to_owned(),
        connect_timeout: Some(postern_proto::google::protobuf::Duration {
            seconds: connect_timeout_secs,
            nanos: 0,
        }),
        ..Default::default()
    }
}

fn route(name: &str) -> RouteConfiguration {
    RouteConfiguration {
        name: name.to_owned(),
        ..Default::default()
    }
}

fn snapshot(version: &str, clusters: &[&str]) -> Snapshot {
    let mut snapshot = Snapshot::new(version);
    for name in clusters {
        snapshot.add_message(name, &cluster(name, 1));
    }
    snapshot
}

fn names_of<M: Message + Default>(resources: &[Any], name: impl Fn(&M) -> String) -> Vec<String> {
    resources
        .iter()
        .map(|any| name(&M::decode(any.value.as_slice()).unwrap()))
        .collect()
}

fn cluster_names(resources: &[Any]) -> Vec<String> {
    for any in resources {
        assert_eq!(any.type_url, CLUSTER);
    }
    names_of::<Cluster>(resources, |c| c.name.clone())
}

fn node(id: &str) -> Option<Node> {
    Some(Node {
        id: id.to_owned(),
        ..Default::default()
    })
}

fn error(message: &str) -> Option<rpc::Status> {
    Some(rpc::Status {
        code: tonic::Code::InvalidArgument as i32,
        message: message.to_owned(),
        details: Vec::new(),
    })
}

async fn next_event(events: &mut broadcast::Receiver<AdsEvent>) -> AdsEvent {
    tokio::time::timeout(WAIT, events.recv())
        .await
        .expect("timed out waiting for an ads event")
        .unwrap()
}

fn event(node_id: &str, type_url: &str, kind: AdsEventKind) -> AdsEvent {
    AdsEvent {
        node_id: node_id.to_owned(),
        type_url: type_url.to_owned(),
        kind,
    }
}

fn ack(version: &str) -> AdsEventKind {
    AdsEventKind::Ack {
        version: version.to_owned(),
    }
}

/// The client side of one ADS stream: requests go in through a channel,
/// responses come out of the tonic stream.
struct Stream<Req, Resp> {
    tx: Option<mpsc::Sender<Req>>,
    rx: Streaming<Resp>,
}

fn request_stream<T: Send + 'static>(
    rx: mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> + Send + 'static {
    futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) })
}

impl<Req, Resp> Stream<Req, Resp> {
    async fn send(&self, request: Req) {
        self.tx.as_ref().unwrap().send(request).await.unwrap();
    }

    async fn recv(&mut self) -> Resp {
        tokio::time::timeout(WAIT, self.rx.message())
            .await
            .expect("timed out waiting for an ads response")
            .unwrap()
            .expect("stream ended")
    }

    /// Ends the request half, as a client going away does.
    fn close(&mut self) {
        self.tx = None;
    }
}

async fn sotw(client: &mut Client) -> Stream<DiscoveryRequest, DiscoveryResponse> {
    let (tx, rx) = mpsc::channel(16);
    let rx = client
        .stream_aggregated_resources(request_stream(rx))
        .await
        .unwrap()
        .into_inner();
    Stream { tx: Some(tx), rx }
}

async fn delta(client: &mut Client) -> Stream<DeltaDiscoveryRequest, DeltaDiscoveryResponse> {
    let (tx, rx) = mpsc::channel(16);
    let rx = client
        .delta_aggregated_resources(request_stream(rx))
        .await
        .unwrap()
        .into_inner();
    Stream { tx: Some(tx), rx }
}

fn sotw_request(type_url: &str, names: &[&str]) -> DiscoveryRequest {
    DiscoveryRequest {
        node: node("n1"),
        type_url: type_url.to_owned(),
        resource_names: names.iter().map(|n| (*n).to_owned()).collect(),
        ..Default::default()
    }
}

fn sotw_ack(type_url: &str, response: &DiscoveryResponse) -> DiscoveryRequest {
    DiscoveryRequest {
        version_info: response.version_info.clone(),
        type_url: type_url.to_owned(),
        response_nonce: response.nonce.clone(),
        ..Default::default()
    }
}

#[test]
fn snapshot_add_get_remove() {
    let mut snapshot = snapshot("v1", &["a", "b"]);
    assert_eq!(snapshot.get(CLUSTER, "a"), Some(&pack(&cluster("a", 1))));
    assert_eq!(
        snapshot
            .of_type(CLUSTER)
            .map(|(n, _)| n)
            .collect::<Vec<_>>(),
        ["a", "b"]
    );
    assert!(snapshot.remove(CLUSTER, "a").is_some());
    assert!(snapshot.remove(CLUSTER, "b").is_some());
    assert!(snapshot.remove(CLUSTER, "b").is_none());
    assert!(snapshot.resources.is_empty());
    assert_eq!(snapshot.of_type(ROUTE).count(), 0);
}

#[test]
fn resource_version_is_stable_and_content_based() {
    let a = pack(&cluster("a", 1));
    assert_eq!(resource_version(&a), resource_version(&a.clone()));
    assert_ne!(
        resource_version(&a),
        resource_version(&pack(&cluster("a", 2)))
    );
    // FNV-1a of the empty input is its offset basis; pins the algorithm so
    // versions survive toolchain upgrades.
    assert_eq!(Fnv1a::new().finish(), 0xcbf2_9ce4_8422_2325);
}

#[tokio::test]
async fn sotw_cds_wildcard_ack_nack_and_push() {
    let server = AdsServer::new();
    server.set_snapshot(snapshot("v1", &["a", "b"]));
    let mut events = server.events();
    let mut client = start(&server).await;
    let mut stream = sotw(&mut client).await;

    stream.send(sotw_request(CLUSTER, &[])).await;
    let first = stream.recv().await;
    assert_eq!(first.type_url, CLUSTER);
    assert_eq!(first.version_info, "v1");
    assert!(!first.nonce.is_empty());
    assert_eq!(cluster_names(&first.resources), ["a", "b"]);
    assert_eq!(
        next_event(&mut events).await,
        event("n1", "", AdsEventKind::Connected)
    );

    stream.send(sotw_ack(CLUSTER, &first)).await;
    assert_eq!(
        next_event(&mut events).await,
        event("n1", CLUSTER, ack("v1"))
    );

    // A new snapshot is pushed with a new version and nonce.
    server.set_snapshot(snapshot("v2", &["a", "b", "c"]));
    let second = stream.recv().await;
    assert_eq!(second.version_info, "v2");
    assert_ne!(second.nonce, first.nonce);
    assert_eq!(cluster_names(&second.resources), ["a", "b", "c"]);

    // The client rejects it: a NACK keeps its old version and says why.
    stream
        .send(DiscoveryRequest {
            error_detail: error("cluster c: bad connect_timeout"),
            ..sotw_ack(CLUSTER, &first)
        })
        .await;
    // (That request carried the first nonce, which is stale: ignored.)
    stream
        .send(DiscoveryRequest {
            version_info: "v1".to_owned(),
            error_detail: error("cluster c: bad connect_timeout"),
            ..sotw_ack(CLUSTER, &second)
        })
        .await;
    assert_eq!(
        next_event(&mut events).await,
        event(
            "n1",
            CLUSTER,
            AdsEventKind::Nack {
                version: "v2".to_owned(),
                error: "cluster c: bad connect_timeout".to_owned(),
            }
        )
    );

    // A snapshot that leaves the clusters as they are pushes nothing for
    // CDS: the next CDS response is the one after it.
    let mut same_clusters = snapshot("v3", &["a", "b", "c"]);
    same_clusters.add_message("r", &route("r"));
    server.set_snapshot(same_clusters);
    server.set_snapshot(snapshot("v4", &["a"]));
    let fourth = stream.recv().await;
    assert_eq!(fourth.version_info, "v4");
    assert_eq!(cluster_names(&fourth.resources), ["a"]);
    stream.send(sotw_ack(CLUSTER, &fourth)).await;
    assert_eq!(
        next_event(&mut events).await,
        event("n1", CLUSTER, ack("v4"))
    );

    stream.close();
    assert_eq!(
        next_event(&mut events).await,
        event("n1", "", AdsEventKind::Disconnected)
    );
}

#[tokio::test]
async fn sotw_rds_returns_only_subscribed_names() {
    let server = AdsServer::new();
    let mut snap = Snapshot::new("v1");
    for name in ["r1", "r2", "r3"] {
        snap.add_message(name, &route(name));
    }
    server.set_snapshot(snap.clone());
    let mut client = start(&server).await;
    let mut stream = sotw(&mut client).await;
    let route_names =
        |resources: &[Any]| names_of::<RouteConfiguration>(resources, |r| r.name.clone());

    // A name the snapshot lacks is simply absent.
    stream.send(sotw_request(ROUTE, &["r3", "r1", "r9"])).await;
    let first = stream.recv().await;
    assert_eq!(first.type_url, ROUTE);
    assert_eq!(route_names(&first.resources), ["r1", "r3"]);

    // Changing the subscription along with the ACK is answered at once.
    stream
        .send(DiscoveryRequest {
            resource_names: vec!["r2".to_owned()],
            ..sotw_ack(ROUTE, &first)
        })
        .await;
    let second = stream.recv().await;
    assert_eq!(route_names(&second.resources), ["r2"]);
    stream.send(sotw_ack(ROUTE, &second)).await;

    // A change to a route this client does not hold is not pushed to it.
    let mut changed = snap.clone();
    changed.version = "v2".to_owned();
    changed.add_message(
        "r1",
        &RouteConfiguration {
            name: "r1".to_owned(),
            ignore_port_in_host_matching: true,
            ..Default::default()
        },
    );
    server.set_snapshot(changed.clone());
    changed.version = "v3".to_owned();
    changed.remove(ROUTE, "r2");
    server.set_snapshot(changed);
    let third = stream.recv().await;
    assert_eq!(third.version_info, "v3");
    assert!(third.resources.is_empty());
}

#[tokio::test]
async fn sotw_initial_request_with_empty_snapshot_is_answered() {
    let server = AdsServer::new();
    let mut client = start(&server).await;
    let mut stream = sotw(&mut client).await;
    stream.send(sotw_request(ENDPOINT, &[])).await;
    let response = stream.recv().await;
    assert_eq!(response.version_info, "0");
    assert_eq!(response.type_url, ENDPOINT);
    assert!(response.resources.is_empty());
}

fn delta_subscribe(type_url: &str, names: &[&str]) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        node: node("n2"),
        type_url: type_url.to_owned(),
        resource_names_subscribe: names.iter().map(|n| (*n).to_owned()).collect(),
        ..Default::default()
    }
}

fn delta_ack(response: &DeltaDiscoveryResponse) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        type_url: response.type_url.clone(),
        response_nonce: response.nonce.clone(),
        ..Default::default()
    }
}

fn delta_names(response: &DeltaDiscoveryResponse) -> Vec<&str> {
    response.resources.iter().map(|r| r.name.as_str()).collect()
}

#[tokio::test]
async fn delta_adds_changes_and_removes() {
    let server = AdsServer::new();
    server.set_snapshot(snapshot("v1", &["a", "b"]));
    let mut events = server.events();
    let mut client = start(&server).await;
    let mut stream = delta(&mut client).await;

    stream.send(delta_subscribe(CLUSTER, &[])).await;
    let first = stream.recv().await;
    assert_eq!(first.type_url, CLUSTER);
    assert_eq!(first.system_version_info, "v1");
    assert_eq!(delta_names(&first), ["a", "b"]);
    assert!(first.removed_resources.is_empty());
    for resource in &first.resources {
        let body = resource.resource.as_ref().unwrap();
        assert_eq!(resource.version, resource_version(body));
        assert_eq!(
            Cluster::decode(body.value.as_slice()).unwrap().name,
            resource.name
        );
    }
    assert_eq!(
        next_event(&mut events).await,
        event("n2", "", AdsEventKind::Connected)
    );
    stream.send(delta_ack(&first)).await;
    assert_eq!(
        next_event(&mut events).await,
        event("n2", CLUSTER, ack("v1"))
    );

    // Removing a cluster sends only its name.
    server.set_snapshot(snapshot("v2", &["a"]));
    let second = stream.recv().await;
    assert!(second.resources.is_empty());
    assert_eq!(second.removed_resources, ["b"]);
    assert_eq!(second.system_version_info, "v2");

    // Changing one sends only that one, with a new version.
    let mut changed = Snapshot::new("v3");
    changed.add_message("a", &cluster("a", 9));
    server.set_snapshot(changed);
    let third = stream.recv().await;
    assert_eq!(delta_names(&third), ["a"]);
    assert_ne!(third.resources[0].version, first.resources[0].version);
    assert!(third.removed_resources.is_empty());

    stream
        .send(DeltaDiscoveryRequest {
            error_detail: error("cluster a: no"),
            ..delta_ack(&third)
        })
        .await;
    assert_eq!(
        next_event(&mut events).await,
        event(
            "n2",
            CLUSTER,
            AdsEventKind::Nack {
                version: "v3".to_owned(),
                error: "cluster a: no".to_owned()
            }
        )
    );
}

#[tokio::test]
async fn delta_reconnect_with_current_versions_resends_nothing() {
    let server = AdsServer::new();
    server.set_snapshot(snapshot("v1", &["a", "b"]));
    let mut client = start(&server).await;

    let mut stream = delta(&mut client).await;
    stream.send(delta_subscribe(CLUSTER, &["*"])).await;
    let first = stream.recv().await;
    let held: HashMap<String, String> = first
        .resources
        .iter()
        .map(|r| (r.name.clone(), r.version.clone()))
        .collect();
    assert_eq!(held.len(), 2);
    stream.close();
    drop(stream);

    let mut stream = delta(&mut client).await;
    stream
        .send(DeltaDiscoveryRequest {
            initial_resource_versions: held,
            ..delta_subscribe(CLUSTER, &[])
        })
        .await;
    // Nothing is due, so the first response is the next change, and it
    // carries only that change.
    server.set_snapshot(snapshot("v2", &["a", "b", "c"]));
    let next = stream.recv().await;
    assert_eq!(next.system_version_info, "v2");
    assert_eq!(delta_names(&next), ["c"]);
    assert!(next.removed_resources.is_empty());
}

#[tokio::test]
async fn delta_explicit_subscriptions() {
    let server = AdsServer::new();
    server.set_snapshot(snapshot("v1", &["a", "b", "c"]));
    let mut client = start(&server).await;
    let mut stream = delta(&mut client).await;

    // An explicit name the server lacks is reported as removed.
    stream.send(delta_subscribe(CLUSTER, &["b", "zz"])).await;
    let first = stream.recv().await;
    assert_eq!(delta_names(&first), ["b"]);
    assert_eq!(first.removed_resources, ["zz"]);

    // Subscribing to one more sends just that one; unsubscribing sends
    // nothing.
    stream
        .send(DeltaDiscoveryRequest {
            resource_names_subscribe: vec!["c".to_owned()],
            resource_names_unsubscribe: vec!["b".to_owned()],
            ..delta_ack(&first)
        })
        .await;
    let second = stream.recv().await;
    assert_eq!(delta_names(&second), ["c"]);
    assert!(second.removed_resources.is_empty());

    // Changes to unsubscribed resources are not pushed; a subscribed
    // resource that appears is.
    let mut next = snapshot("v2", &["c", "zz"]);
    next.add_message("a", &cluster("a", 7));
    server.set_snapshot(next);
    let third = stream.recv().await;
    assert_eq!(delta_names(&third), ["zz"]);
    assert!(third.removed_resources.is_empty());
}

#[test]
fn node_view_adds_the_nodes_own_resources_and_hides_shared_ones() {
    let mut snapshot = snapshot("v1", &["shared", "both"]);
    snapshot.add_for_node("n1", CLUSTER, "own", pack(&cluster("own", 1)));
    snapshot.add_for_node("n1", CLUSTER, "both", pack(&cluster("both", 7)));
    snapshot.add_for_node("n2", CLUSTER, "theirs", pack(&cluster("theirs", 1)));

    let view = snapshot.for_node("n1");
    assert_eq!(view.version, "v1");
    assert!(view.node_resources.is_empty());
    assert_eq!(
        view.of_type(CLUSTER).map(|(n, _)| n).collect::<Vec<_>>(),
        ["both", "own", "shared"]
    );
    assert_eq!(view.get(CLUSTER, "both"), Some(&pack(&cluster("both", 7))));
    // A node with nothing of its own sees the shared resources alone.
    assert_eq!(
        snapshot
            .for_node("n3")
            .of_type(CLUSTER)
            .map(|(n, _)| n)
            .collect::<Vec<_>>(),
        ["both", "shared"]
    );
}

#[tokio::test]
async fn each_stream_is_served_its_nodes_view() {
    let server = AdsServer::new();
    let mut first = snapshot("v1", &["shared"]);
    first.add_for_node("n1", CLUSTER, "n1-only", pack(&cluster("n1-only", 1)));
    first.add_for_node("n2", CLUSTER, "n2-only", pack(&cluster("n2-only", 1)));
    server.set_snapshot(first);
    let mut client = start(&server).await;

    // SotW stream of node n1.
    let mut n1 = sotw(&mut client).await;
    n1.send(sotw_request(CLUSTER, &[])).await;
    let response = n1.recv().await;
    assert_eq!(cluster_names(&response.resources), ["n1-only", "shared"]);
    n1.send(sotw_ack(CLUSTER, &response)).await;

    // Delta stream of node n2.
    let mut n2 = delta(&mut client).await;
    n2.send(delta_subscribe(CLUSTER, &[])).await;
    let response = n2.recv().await;
    assert_eq!(delta_names(&response), ["n2-only", "shared"]);
    n2.send(delta_ack(&response)).await;

    // A change to one node's resources reaches that node only; the other
    // hears nothing (its next message is the one after).
    let mut second = snapshot("v2", &["shared"]);
    second.add_for_node("n1", CLUSTER, "n1-only", pack(&cluster("n1-only", 2)));
    second.add_for_node("n2", CLUSTER, "n2-only", pack(&cluster("n2-only", 1)));
    server.set_snapshot(second);
    let pushed = n1.recv().await;
    assert_eq!(pushed.version_info, "v2");
    assert_eq!(cluster_names(&pushed.resources), ["n1-only", "shared"]);
    let mut third = snapshot("v3", &["shared", "new"]);
    third.add_for_node("n1", CLUSTER, "n1-only", pack(&cluster("n1-only", 2)));
    third.add_for_node("n2", CLUSTER, "n2-only", pack(&cluster("n2-only", 1)));
    server.set_snapshot(third);
    assert_eq!(delta_names(&n2.recv().await), ["new"]);
}

//! The ADS server: serves one [`Snapshot`] of Envoy v3 resources to every
//! node over the Aggregated Discovery Service, in both the state-of-the-world
//! (SotW) and the delta (incremental) protocol variants.
//!
//! [`AdsServer::set_snapshot`] replaces what is served and pushes the change
//! to every open stream. Each stream runs as its own task, tracking per type
//! what the client subscribed to and what it was sent, so a push carries only
//! the types (SotW) or resources (delta) that changed for that client. Every
//! ACK and NACK is logged (`info` / `warn`) and published as an [`AdsEvent`].
//!
//! A snapshot may also hold resources for some nodes only
//! ([`Snapshot::add_for_node`]): each stream serves its node's view
//! ([`Snapshot::for_node`]), chosen by the `node.id` of its first request.
//!
//! Boundaries: the node id is taken on trust (nodes are not authenticated),
//! and resources are opaque `Any`s here; building them from a mesh
//! description is [`crate::mesh`]'s job.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::Stream;
use postern_proto::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use postern_proto::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse, Resource,
};
use postern_proto::google::protobuf::Any;
use tokio::sync::{broadcast, mpsc, watch};
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

#[cfg(test)]
mod tests;

/// How many [`AdsEvent`]s a slow [`AdsServer::events`] receiver may fall
/// behind before it starts losing the oldest ones.
pub const EVENT_CAPACITY: usize = 1024;

/// Responses buffered per stream before the stream's task waits for the
/// client to read; a small buffer keeps a stalled client from pinning many
/// snapshots in memory.
const RESPONSE_BUFFER: usize = 8;

/// The resource name that asks for every resource of a type.
const WILDCARD: &str = "*";

/// Packs `message` into an `Any` with its full type URL
/// (`type.googleapis.com/<package>.<Message>`).
pub fn pack<M: prost::Name>(message: &M) -> Any {
    Any {
        type_url: M::type_url(),
        value: message.encode_to_vec(),
    }
}

/// A complete set of resources, by type URL and then by resource name, with
/// the version string the SotW protocol reports for it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    /// The version sent as `version_info` (SotW) and `system_version_info`
    /// (delta) with every response built from this snapshot.
    pub version: String,
    /// Resources by type URL (see `postern_proto::type_url`), then by name.
    pub resources: BTreeMap<String, BTreeMap<String, Any>>,
    /// Resources only some nodes get: by `node.id`, then as `resources`.
    pub node_resources: BTreeMap<String, BTreeMap<String, BTreeMap<String, Any>>>,
}

impl Snapshot {
    /// An empty snapshot with the given version.
    pub fn new(version: impl Into<String>) -> Snapshot {
        Snapshot {
            version: version.into(),
            resources: BTreeMap::new(),
            node_resources: BTreeMap::new(),
        }
    }

    /// Adds `body` as the resource `name` of `type_url` for the node
    /// `node_id` alone, replacing any such resource of that node. In the
    /// node's view it hides a shared resource of the same type and name.
    pub fn add_for_node(&mut self, node_id: &str, type_url: &str, name: &str, body: Any) {
        self.node_resources
            .entry(node_id.to_owned())
            .or_default()
            .entry(type_url.to_owned())
            .or_default()
            .insert(name.to_owned(), body);
    }

    /// What the node `node_id` is served: the shared resources and its
    /// own, with this snapshot's version and no node resources left.
    pub fn for_node(&self, node_id: &str) -> Snapshot {
        let mut view = Snapshot {
            version: self.version.clone(),
            resources: self.resources.clone(),
            node_resources: BTreeMap::new(),
        };
        for (type_url, of_type) in self.node_resources.get(node_id).into_iter().flatten() {
            for (name, body) in of_type {
                view.add(type_url, name, body.clone());
            }
        }
        view
    }

    /// Adds `body` as the resource `name` of `type_url`, replacing any
    /// resource of that type and name. `body.type_url` should equal
    /// `type_url`; clients reject a mismatch.
    pub fn add(&mut self, type_url: &str, name: &str, body: Any) {
        self.resources
            .entry(type_url.to_owned())
            .or_default()
            .insert(name.to_owned(), body);
    }

    /// Packs `message` with [`pack`] and adds it under its own type URL.
    pub fn add_message<M: prost::Name>(&mut self, name: &str, message: &M) {
        self.add(&M::type_url(), name, pack(message));
    }

    /// Removes the resource `name` of `type_url`, returning it if it was
    /// there.
    pub fn remove(&mut self, type_url: &str, name: &str) -> Option<Any> {
        let of_type = self.resources.get_mut(type_url)?;
        let removed = of_type.remove(name);
        if of_type.is_empty() {
            self.resources.remove(type_url);
        }
        removed
    }

    /// The resource `name` of `type_url`, if present.
    pub fn get(&self, type_url: &str, name: &str) -> Option<&Any> {
        self.resources.get(type_url)?.get(name)
    }

    /// Every resource of `type_url`, by name; empty if there are none.
    pub fn of_type(&self, type_url: &str) -> impl Iterator<Item = (&str, &Any)> {
        self.resources
            .get(type_url)
            .into_iter()
            .flatten()
            .map(|(name, body)| (name.as_str(), body))
    }
}

/// Something a client did on an ADS stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdsEvent {
    /// The `node.id` the client sent on the stream's first request (empty if
    /// it sent none).
    pub node_id: String,
    /// The type URL the event is about; empty for [`AdsEventKind::Connected`]
    /// and [`AdsEventKind::Disconnected`], which concern the whole stream.
    pub type_url: String,
    /// What happened.
    pub kind: AdsEventKind,
}

/// What an [`AdsEvent`] reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdsEventKind {
    /// The client applied a response. `version` is the version it now runs:
    /// the request's `version_info` (SotW) or the `system_version_info` of
    /// the acknowledged response (delta).
    Ack {
        /// The version the client applied.
        version: String,
    },
    /// The client rejected a response and keeps its previous config.
    Nack {
        /// The version of the rejected response.
        version: String,
        /// The client's reason, from `error_detail.message`.
        error: String,
    },
    /// A stream sent its first request.
    Connected,
    /// A stream that had sent a request ended.
    Disconnected,
}

/// The response half of an ADS stream: what the stream's task sends, in
/// order. Ends when the task ends.
#[derive(Debug)]
pub struct ResponseStream<T> {
    rx: mpsc::Receiver<Result<T, Status>>,
}

impl<T> Stream for ResponseStream<T> {
    type Item = Result<T, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx)
    }
}

/// An ADS server for one shared [`Snapshot`]. Cheap to clone: clones share
/// the snapshot, the event channel and the nonce counter.
///
/// It starts with an empty snapshot of version `"0"`, so clients that
/// connect before the first [`AdsServer::set_snapshot`] get empty responses
/// rather than waiting.
#[derive(Clone)]
pub struct AdsServer {
    shared: Arc<Shared>,
}

struct Shared {
    snapshot: watch::Sender<Arc<Snapshot>>,
    /// Set once by [`AdsServer::close_streams`].
    closing: watch::Sender<bool>,
    events: broadcast::Sender<AdsEvent>,
    next_nonce: AtomicU64,
}

impl fmt::Debug for AdsServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdsServer")
            .field("version", &self.shared.snapshot.borrow().version)
            .field("streams", &self.shared.snapshot.receiver_count())
            .finish_non_exhaustive()
    }
}

impl Default for AdsServer {
    fn default() -> AdsServer {
        AdsServer::new()
    }
}

impl AdsServer {
    /// A server holding an empty snapshot of version `"0"`.
    pub fn new() -> AdsServer {
        let (events, _) = broadcast::channel(EVENT_CAPACITY);
        AdsServer {
            shared: Arc::new(Shared {
                snapshot: watch::Sender::new(Arc::new(Snapshot::new("0"))),
                closing: watch::Sender::new(false),
                events,
                next_nonce: AtomicU64::new(1),
            }),
        }
    }

    /// Replaces the snapshot served to every node and pushes it to open
    /// streams: each SotW stream gets a response for every subscribed type
    /// whose resources changed for it, each delta stream the added, changed
    /// and removed resources it subscribed to.
    pub fn set_snapshot(&self, snapshot: Snapshot) {
        tracing::debug!(version = %snapshot.version, "ads snapshot replaced");
        self.shared.snapshot.send_replace(Arc::new(snapshot));
    }

    /// The snapshot being served.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.shared.snapshot.borrow().clone()
    }

    /// A receiver that sees every snapshot [`AdsServer::set_snapshot`]
    /// installs, from the current one on.
    pub fn watch_snapshot(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.shared.snapshot.subscribe()
    }

    /// Events for tests and the live log: every ACK and NACK, and streams
    /// connecting and disconnecting, from now on. A receiver that falls more
    /// than [`EVENT_CAPACITY`] events behind loses the oldest.
    pub fn events(&self) -> broadcast::Receiver<AdsEvent> {
        self.shared.events.subscribe()
    }

    /// Ends every open stream with `UNAVAILABLE` (so clients reconnect,
    /// possibly elsewhere), and every stream opened later at once. For
    /// shutdown: ADS streams never end on their own, so a graceful server
    /// shutdown would otherwise wait for them forever.
    pub fn close_streams(&self) {
        self.shared.closing.send_replace(true);
    }

    /// Wraps the server in the generated tonic service, ready for
    /// `tonic::transport::Server::add_service`.
    pub fn into_service(self) -> AggregatedDiscoveryServiceServer<AdsServer> {
        AggregatedDiscoveryServiceServer::new(self)
    }

    /// A nonce no other response of this server carries.
    fn nonce(&self) -> String {
        self.shared
            .next_nonce
            .fetch_add(1, Ordering::Relaxed)
            .to_string()
    }

    fn emit(&self, node_id: &str, type_url: &str, kind: AdsEventKind) {
        // No receivers is normal: events are for whoever listens.
        let _ = self.shared.events.send(AdsEvent {
            node_id: node_id.to_owned(),
            type_url: type_url.to_owned(),
            kind,
        });
    }
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for AdsServer {
    type StreamAggregatedResourcesStream = ResponseStream<DiscoveryResponse>;
    type DeltaAggregatedResourcesStream = ResponseStream<DeltaDiscoveryResponse>;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        let span = tracing::info_span!(
            "ads",
            mode = "sotw",
            peer = ?request.remote_addr(),
            node = tracing::field::Empty,
        );
        let (tx, rx) = mpsc::channel(RESPONSE_BUFFER);
        let stream = SotwStream {
            conn: Conn::new(self.clone(), tx),
            subs: BTreeMap::new(),
        };
        tokio::spawn(stream.run(request.into_inner()).instrument(span));
        Ok(Response::new(ResponseStream { rx }))
    }

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        let span = tracing::info_span!(
            "ads",
            mode = "delta",
            peer = ?request.remote_addr(),
            node = tracing::field::Empty,
        );
        let (tx, rx) = mpsc::channel(RESPONSE_BUFFER);
        let stream = DeltaStream {
            conn: Conn::new(self.clone(), tx),
            subs: BTreeMap::new(),
        };
        tokio::spawn(stream.run(request.into_inner()).instrument(span));
        Ok(Response::new(ResponseStream { rx }))
    }
}

/// The client stopped reading: the stream is over.
struct Closed;

/// What both protocol variants keep per stream.
struct Conn<T> {
    server: AdsServer,
    tx: mpsc::Sender<Result<T, Status>>,
    snapshots: watch::Receiver<Arc<Snapshot>>,
    /// The snapshot as installed, every node's resources included.
    installed: Arc<Snapshot>,
    /// What this stream serves: `installed` as its node sees it.
    snapshot: Arc<Snapshot>,
    closing: watch::Receiver<bool>,
    /// `None` until the first request.
    node_id: Option<String>,
}

impl<T> Conn<T> {
    fn new(server: AdsServer, tx: mpsc::Sender<Result<T, Status>>) -> Conn<T> {
        let mut snapshots = server.watch_snapshot();
        let installed = snapshots.borrow_and_update().clone();
        let closing = server.shared.closing.subscribe();
        Conn {
            server,
            tx,
            snapshots,
            snapshot: node_view(&installed, ""),
            installed,
            closing,
            node_id: None,
        }
    }

    /// Takes the newly installed snapshot.
    fn refresh(&mut self) {
        self.installed = self.snapshots.borrow_and_update().clone();
        self.snapshot = node_view(&self.installed, self.node_id());
    }

    fn node_id(&self) -> &str {
        self.node_id.as_deref().unwrap_or_default()
    }

    /// Records the node of the stream's first request and reports the
    /// stream as connected. Later requests may omit the node, so only the
    /// first counts.
    fn on_first_request(&mut self, node: Option<&postern_proto::envoy::config::core::v3::Node>) {
        if self.node_id.is_some() {
            return;
        }
        let node_id = node.map(|node| node.id.clone()).unwrap_or_default();
        tracing::Span::current().record("node", node_id.as_str());
        tracing::info!(node = %node_id, "ads stream connected");
        self.server.emit(&node_id, "", AdsEventKind::Connected);
        self.snapshot = node_view(&self.installed, &node_id);
        self.node_id = Some(node_id);
    }

    /// Tells the client the stream ends because the server shuts down.
    async fn send_shutdown(&self) {
        // The client may be gone already; nothing to tell then.
        let _ = self
            .tx
            .send(Err(Status::unavailable("control plane shutting down")))
            .await;
    }

    async fn send(&self, response: T) -> Result<(), Closed> {
        self.tx.send(Ok(response)).await.map_err(|_| Closed)
    }

    fn ack(&self, type_url: &str, version: &str) {
        tracing::info!(node = %self.node_id(), type_url, version, "ads ack");
        self.server.emit(
            self.node_id(),
            type_url,
            AdsEventKind::Ack {
                version: version.to_owned(),
            },
        );
    }

    fn nack(&self, type_url: &str, version: &str, error: &str) {
        tracing::warn!(node = %self.node_id(), type_url, version, error, "ads nack");
        self.server.emit(
            self.node_id(),
            type_url,
            AdsEventKind::Nack {
                version: version.to_owned(),
                error: error.to_owned(),
            },
        );
    }

    fn disconnected(&self, reason: &str) {
        if let Some(node_id) = &self.node_id {
            tracing::info!(node = %node_id, reason, "ads stream disconnected");
            self.server.emit(node_id, "", AdsEventKind::Disconnected);
        }
    }
}

/// `installed` as the node `node_id` sees it; the same `Arc` when no node
/// has resources of its own, so streams share one copy.
fn node_view(installed: &Arc<Snapshot>, node_id: &str) -> Arc<Snapshot> {
    if installed.node_resources.is_empty() {
        installed.clone()
    } else {
        Arc::new(installed.for_node(node_id))
    }
}

/// Completes once [`AdsServer::close_streams`] was called.
async fn closed_by_server(closing: &mut watch::Receiver<bool>) {
    // The sender lives as long as the server, which the stream holds, so
    // this returns only once closing is set.
    let _ = closing.wait_for(|closing| *closing).await;
}

/// A resource's delta version: a hash of its type URL and encoded bytes, so
/// equal content gets an equal version across streams and restarts.
fn resource_version(body: &Any) -> String {
    let mut hash = Fnv1a::new();
    hash.write(body.type_url.as_bytes());
    hash.write(&[0]);
    hash.write(&body.value);
    format!("{:016x}", hash.finish())
}

/// 64-bit FNV-1a: stable across Rust versions and processes, unlike
/// `DefaultHasher`, which versions must be since clients keep them across
/// reconnects. Not collision resistant, which versions need not be.
pub(crate) struct Fnv1a(u64);

impl Fnv1a {
    pub(crate) fn new() -> Fnv1a {
        Fnv1a(0xcbf2_9ce4_8422_2325)
    }

    pub(crate) fn write(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.0 ^= u64::from(*byte);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    pub(crate) fn finish(&self) -> u64 {
        self.0
    }
}

// ---------------------------------------------------------------------------
// State of the world

/// A SotW stream: per type URL, what the client asked for and was last sent.
struct SotwStream {
    conn: Conn<DiscoveryResponse>,
    subs: BTreeMap<String, SotwSub>,
}

#[derive(Default)]
struct SotwSub {
    /// Subscribed names; empty (or holding `*`) means every resource.
    names: BTreeSet<String>,
    /// The last response sent for this type; `None` until the first.
    sent: Option<SotwSent>,
}

struct SotwSent {
    version: String,
    nonce: String,
    resources: BTreeMap<String, Any>,
}

impl SotwSub {
    fn is_wildcard(&self) -> bool {
        self.names.is_empty() || self.names.contains(WILDCARD)
    }

    /// The resources of `snapshot` this subscription covers.
    fn select(&self, snapshot: &Snapshot, type_url: &str) -> BTreeMap<String, Any> {
        let Some(of_type) = snapshot.resources.get(type_url) else {
            return BTreeMap::new();
        };
        if self.is_wildcard() {
            return of_type.clone();
        }
        self.names
            .iter()
            .filter_map(|name| Some((name.clone(), of_type.get(name)?.clone())))
            .collect()
    }
}

impl SotwStream {
    async fn run(mut self, mut inbound: Streaming<DiscoveryRequest>) {
        let reason = loop {
            tokio::select! {
                message = inbound.message() => {
                    let request = match message {
                        Ok(Some(request)) => request,
                        Ok(None) => break "client closed the stream".to_owned(),
                        Err(status) => break format!("stream error: {}", status.message()),
                    };
                    if self.on_request(request).await.is_err() {
                        break "client stopped reading".to_owned();
                    }
                }
                () = closed_by_server(&mut self.conn.closing) => {
                    self.conn.send_shutdown().await;
                    break "server shutting down".to_owned();
                }
                changed = self.conn.snapshots.changed() => {
                    if changed.is_err() {
                        break "server dropped".to_owned();
                    }
                    self.conn.refresh();
                    if self.push_changed().await.is_err() {
                        break "client stopped reading".to_owned();
                    }
                }
            }
        };
        self.conn.disconnected(&reason);
    }

    async fn on_request(&mut self, request: DiscoveryRequest) -> Result<(), Closed> {
        self.conn.on_first_request(request.node.as_ref());
        let type_url = request.type_url;
        if type_url.is_empty() {
            tracing::warn!(node = %self.conn.node_id(), "ignoring ads request without a type_url");
            return Ok(());
        }
        let sub = self.subs.entry(type_url.clone()).or_default();

        // A nonce from before this stream's first response of this type (a
        // client resuming after a reconnect) acknowledges nothing we sent.
        let initial = request.response_nonce.is_empty() || sub.sent.is_none();
        if !initial {
            let Some(sent) = sub
                .sent
                .as_ref()
                .filter(|s| s.nonce == request.response_nonce)
            else {
                // The protocol says to ignore requests for superseded
                // responses: a newer one is already on its way.
                tracing::debug!(
                    node = %self.conn.node_id(),
                    type_url,
                    nonce = request.response_nonce,
                    "ignoring ads request with a stale nonce"
                );
                return Ok(());
            };
            match &request.error_detail {
                Some(error) => self.conn.nack(&type_url, &sent.version, &error.message),
                None => self.conn.ack(&type_url, &request.version_info),
            }
        }

        let names: BTreeSet<String> = request.resource_names.into_iter().collect();
        let names_changed = names != sub.names;
        sub.names = names;
        let resources = sub.select(&self.conn.snapshot, &type_url);
        // An ACK or NACK with the same subscription needs no answer; a new
        // or changed subscription is answered when it changes what the
        // client should hold, and an initial request always.
        let changed = sub.sent.as_ref().is_none_or(|s| s.resources != resources);
        if initial || (names_changed && changed) {
            self.respond(&type_url, resources).await?;
        }
        Ok(())
    }

    async fn push_changed(&mut self) -> Result<(), Closed> {
        let mut pushes = Vec::new();
        for (type_url, sub) in &self.subs {
            let resources = sub.select(&self.conn.snapshot, type_url);
            if sub.sent.as_ref().is_some_and(|s| s.resources != resources) {
                pushes.push((type_url.clone(), resources));
            }
        }
        for (type_url, resources) in pushes {
            self.respond(&type_url, resources).await?;
        }
        Ok(())
    }

    async fn respond(
        &mut self,
        type_url: &str,
        resources: BTreeMap<String, Any>,
    ) -> Result<(), Closed> {
        let nonce = self.conn.server.nonce();
        let version = self.conn.snapshot.version.clone();
        let response = DiscoveryResponse {
            version_info: version.clone(),
            resources: resources.values().cloned().collect(),
            type_url: type_url.to_owned(),
            nonce: nonce.clone(),
            ..Default::default()
        };
        tracing::debug!(
            node = %self.conn.node_id(),
            type_url,
            version,
            nonce,
            resources = resources.len(),
            "ads response"
        );
        if let Some(sub) = self.subs.get_mut(type_url) {
            sub.sent = Some(SotwSent {
                version,
                nonce,
                resources,
            });
        }
        self.conn.send(response).await
    }
}

// ---------------------------------------------------------------------------
// Delta

/// A delta stream: per type URL, the subscription and the resource versions
/// the client holds.
struct DeltaStream {
    conn: Conn<DeltaDiscoveryResponse>,
    subs: BTreeMap<String, DeltaSub>,
}

#[derive(Default)]
struct DeltaSub {
    wildcard: bool,
    /// Names subscribed explicitly, on top of the wildcard if it is set.
    names: BTreeSet<String>,
    /// Name to version of every resource the client holds, as far as we
    /// know: what it declared on (re)connecting, then what we sent.
    held: BTreeMap<String, String>,
    /// Nonce and `system_version_info` of the last response.
    sent: Option<(String, String)>,
    /// Recent responses, to undo one the client NACKs (it applied none of
    /// it) even when a later response has gone out already.
    recent: VecDeque<SentDelta>,
    /// Resources of a NACKed response, not to be sent again while the
    /// snapshot is the one they were rejected in (no resend loop); a new
    /// snapshot sends them again, since what they come with has changed.
    rejected: Option<(String, BTreeMap<String, String>)>,
}

/// What one delta response changed in the client's holdings.
struct SentDelta {
    nonce: String,
    snapshot_version: String,
    /// Name to the version held before (`None`: not held), for each
    /// resource added, changed or removed.
    before: Vec<(String, Option<String>)>,
    /// Name to version of each resource sent.
    sent: BTreeMap<String, String>,
}

/// How many responses per type can still be undone by a late NACK.
const RECENT_RESPONSES: usize = 16;

impl DeltaSub {
    fn covers(&self, name: &str) -> bool {
        self.wildcard || self.names.contains(name)
    }

    /// The client NACKed `nonce`: it holds what it held before that
    /// response, and the response is not resent for the same snapshot.
    fn undo(&mut self, nonce: &str) {
        let Some(index) = self.recent.iter().position(|s| s.nonce == nonce) else {
            return;
        };
        let Some(nacked) = self.recent.remove(index) else {
            return;
        };
        for (name, before) in nacked.before {
            match before {
                Some(version) => self.held.insert(name, version),
                None => self.held.remove(&name),
            };
        }
        self.rejected = Some((nacked.snapshot_version, nacked.sent));
    }

    fn is_rejected(&self, snapshot_version: &str, name: &str, version: &str) -> bool {
        self.rejected.as_ref().is_some_and(|(v, sent)| {
            v == snapshot_version && sent.get(name).is_some_and(|s| s == version)
        })
    }
}

impl DeltaStream {
    async fn run(mut self, mut inbound: Streaming<DeltaDiscoveryRequest>) {
        let reason = loop {
            tokio::select! {
                message = inbound.message() => {
                    let request = match message {
                        Ok(Some(request)) => request,
                        Ok(None) => break "client closed the stream".to_owned(),
                        Err(status) => break format!("stream error: {}", status.message()),
                    };
                    if self.on_request(request).await.is_err() {
                        break "client stopped reading".to_owned();
                    }
                }
                () = closed_by_server(&mut self.conn.closing) => {
                    self.conn.send_shutdown().await;
                    break "server shutting down".to_owned();
                }
                changed = self.conn.snapshots.changed() => {
                    if changed.is_err() {
                        break "server dropped".to_owned();
                    }
                    self.conn.refresh();
                    if self.push_changed().await.is_err() {
                        break "client stopped reading".to_owned();
                    }
                }
            }
        };
        self.conn.disconnected(&reason);
    }

    async fn on_request(&mut self, request: DeltaDiscoveryRequest) -> Result<(), Closed> {
        self.conn.on_first_request(request.node.as_ref());
        let type_url = request.type_url;
        if type_url.is_empty() {
            tracing::warn!(node = %self.conn.node_id(), "ignoring ads request without a type_url");
            return Ok(());
        }
        let first = !self.subs.contains_key(&type_url);
        let sub = self.subs.entry(type_url.clone()).or_default();

        if !request.response_nonce.is_empty() {
            match sub
                .sent
                .as_ref()
                .filter(|(nonce, _)| *nonce == request.response_nonce)
            {
                Some((_, version)) => match &request.error_detail {
                    Some(error) => self.conn.nack(&type_url, version, &error.message),
                    None => self.conn.ack(&type_url, version),
                },
                // Unlike SotW, a delta request also carries subscription
                // changes, so a stale one is still applied below.
                None => tracing::debug!(
                    node = %self.conn.node_id(),
                    type_url,
                    nonce = request.response_nonce,
                    "ads ack or nack for a superseded response"
                ),
            }
        }

        if request.error_detail.is_some() {
            sub.undo(&request.response_nonce);
        }

        let mut newly_subscribed = Vec::new();
        if first {
            sub.wildcard = request.resource_names_subscribe.is_empty()
                || request
                    .resource_names_subscribe
                    .iter()
                    .any(|n| n == WILDCARD);
            sub.held = request.initial_resource_versions.into_iter().collect();
        }
        for name in request.resource_names_subscribe {
            if name == WILDCARD {
                sub.wildcard = true;
            } else if sub.names.insert(name.clone()) {
                newly_subscribed.push(name);
            }
        }
        for name in request.resource_names_unsubscribe {
            if name == WILDCARD {
                sub.wildcard = false;
            } else {
                sub.names.remove(&name);
            }
        }
        // The client drops what it no longer subscribes to; forget it too,
        // so a later subscription sends it again.
        sub.held
            .retain(|name, _| sub.wildcard || sub.names.contains(name));

        // An explicitly subscribed name we do not have is reported as
        // removed, so the client need not wait for a timeout to learn it.
        let of_type = self.conn.snapshot.resources.get(&type_url);
        let missing: Vec<String> = newly_subscribed
            .into_iter()
            .filter(|name| {
                !sub.held.contains_key(name) && of_type.is_none_or(|r| !r.contains_key(name))
            })
            .collect();
        // A fresh subscription is always answered, even with nothing, so the
        // client can finish its initial fetch; one resuming with versions it
        // already holds only hears about differences.
        let must_answer = first && sub.held.is_empty();
        self.push(&type_url, missing, must_answer).await
    }

    async fn push_changed(&mut self) -> Result<(), Closed> {
        let type_urls: Vec<String> = self.subs.keys().cloned().collect();
        for type_url in type_urls {
            self.push(&type_url, Vec::new(), false).await?;
        }
        Ok(())
    }

    /// Sends what changed for `type_url` since the client's `held` versions,
    /// plus `removed` names, if there is anything or `always`.
    async fn push(
        &mut self,
        type_url: &str,
        mut removed: Vec<String>,
        always: bool,
    ) -> Result<(), Closed> {
        let Some(sub) = self.subs.get_mut(type_url) else {
            return Ok(());
        };
        let empty = BTreeMap::new();
        let of_type = self.conn.snapshot.resources.get(type_url).unwrap_or(&empty);

        let snapshot_version = self.conn.snapshot.version.clone();
        let mut before = Vec::new();
        let mut sent = BTreeMap::new();
        let mut resources = Vec::new();
        for (name, body) in of_type {
            if !sub.covers(name) {
                continue;
            }
            let version = resource_version(body);
            if sub.held.get(name) != Some(&version)
                && !sub.is_rejected(&snapshot_version, name, &version)
            {
                before.push((name.clone(), sub.held.get(name).cloned()));
                sent.insert(name.clone(), version.clone());
                sub.held.insert(name.clone(), version.clone());
                resources.push(Resource {
                    name: name.clone(),
                    version,
                    resource: Some(body.clone()),
                    ..Default::default()
                });
            }
        }
        sub.held.retain(|name, version| {
            let present = of_type.contains_key(name);
            if !present {
                before.push((name.clone(), Some(version.clone())));
                removed.push(name.clone());
            }
            present
        });
        if resources.is_empty() && removed.is_empty() && !always {
            return Ok(());
        }

        let nonce = self.conn.server.nonce();
        let version = self.conn.snapshot.version.clone();
        tracing::debug!(
            node = %self.conn.node_id(),
            type_url,
            version,
            nonce,
            added = resources.len(),
            removed = removed.len(),
            "ads delta response"
        );
        sub.sent = Some((nonce.clone(), version.clone()));
        if sub.recent.len() == RECENT_RESPONSES {
            sub.recent.pop_front();
        }
        sub.recent.push_back(SentDelta {
            nonce: nonce.clone(),
            snapshot_version,
            before,
            sent,
        });
        let response = DeltaDiscoveryResponse {
            system_version_info: version,
            resources,
            type_url: type_url.to_owned(),
            removed_resources: removed,
            nonce,
            ..Default::default()
        };
        self.conn.send(response).await
    }
}

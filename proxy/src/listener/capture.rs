//! Captured connections: what a `kind: capture` listener does with a
//! connection iptables redirected to it.
//!
//! It recovers the original destination (`SO_ORIGINAL_DST`), sniffs the
//! protocol (`detect`), then:
//!
//! - **outbound**: HTTP to a known service goes through that service's
//!   routes (so retries, timeouts and the cluster's mTLS apply); other
//!   traffic to a known service is TCP to its cluster; an unknown
//!   destination is passed through untouched or closed, as configured;
//! - **inbound**: after mTLS and connection-level RBAC, HTTP goes through
//!   the listener's HTTP settings to `127.0.0.1:<original port>`, anything
//!   else is TCP to the same address.
//!
//! The routing decisions are pure functions (`outbound_route`), tested
//! without sockets; the namespace tests in `proxy/tests/sidecar.rs` cover
//! the wiring.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, LazyLock, Mutex};

use arc_swap::ArcSwap;
use tokio::net::TcpStream;

use super::detect::{sniff, Protocol, Rewind, Sniffed};
use super::{ConnectionTracker, Shutdown};
use crate::cluster::ClusterManager;
use crate::config::capture::{CaptureListener, CaptureService, UnknownDestinations};
use crate::config::file::{ClusterFile, EndpointFile, UpstreamProtocol};
use crate::config::{Listener, ListenerProtocol};
use crate::http::headers::DownstreamPeer;
use crate::http::proxy::{HttpConfig, HttpProxy};
use crate::route::{
    Forward, HeaderMatch, RouteAction, RouteMatch, RouteTable, Targets, TcpRoute, ValueMatch,
    VirtualHost,
};
use crate::telemetry::log::TrafficDirection;
use crate::telemetry::metrics as names;
use crate::telemetry::{ListenerTelemetry, TelemetryHub};
use crate::tls::{DownstreamIo, DownstreamTls};
use postern_certs::SpiffeId;

/// Istio's name for traffic passed through to an unknown destination.
pub const PASSTHROUGH_CLUSTER: &str = "PassthroughCluster";
/// Istio's name for traffic to an unknown destination that was refused.
pub const BLACKHOLE_CLUSTER: &str = "BlackHoleCluster";

/// Most app ports whose HTTP front is kept; further ports get theirs per
/// connection (a scan of every port must not grow memory without bound).
const MAX_INBOUND_PORTS: usize = 256;

/// The original destination of a redirected connection: what the client
/// asked for before iptables sent it here. `None` when the socket was not
/// redirected (the kernel then has no NAT record for it).
pub fn original_destination(stream: &TcpStream) -> Option<SocketAddr> {
    let socket = socket2::SockRef::from(stream);
    let local = stream.local_addr().ok()?;
    let v4 = match local {
        SocketAddr::V4(_) => true,
        // A v4 client on a dual-stack socket: the v4 NAT table knows it.
        SocketAddr::V6(v6) => v6.ip().to_ipv4_mapped().is_some(),
    };
    let original = if v4 {
        socket.original_dst_v4()
    } else {
        socket.original_dst_v6()
    };
    let addr = original.ok()?.as_socket()?;
    Some(SocketAddr::new(addr.ip().to_canonical(), addr.port()))
}

/// Where an outbound captured connection goes.
#[derive(Debug)]
pub enum OutboundRoute<'a> {
    /// Through the service's HTTP routes.
    Http(&'a Arc<CaptureService>),
    /// TCP to this cluster.
    Tcp(&'a Arc<str>),
    /// Bytes straight to the original destination.
    Passthrough,
    /// Closed.
    Block,
}

/// Decides where an outbound connection to `destination` goes, given
/// whether it speaks HTTP.
pub fn outbound_route(
    capture: &CaptureListener,
    destination: SocketAddr,
    http: bool,
) -> OutboundRoute<'_> {
    let unknown = match capture.unknown_destinations {
        UnknownDestinations::Allow => OutboundRoute::Passthrough,
        UnknownDestinations::Block => OutboundRoute::Block,
    };
    let Some(service) = capture.service(destination) else {
        return unknown;
    };
    match (&service.routes, &service.cluster) {
        (Some(_), _) if http && !service.opaque => OutboundRoute::Http(service),
        (_, Some(cluster)) => OutboundRoute::Tcp(cluster),
        // An HTTP-only service reached by something else: the control
        // plane said nothing about it, so it is an unknown destination.
        (_, None) => unknown,
    }
}

/// The app's address for an inbound call to `destination`: the same port
/// on loopback. The pod's own IP would not do: the capture rules send
/// whatever the proxy sends there back to the inbound port.
pub fn app_address(destination: SocketAddr) -> SocketAddr {
    let loopback = match destination.ip() {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
    };
    SocketAddr::new(loopback, destination.port())
}

/// Whether a connection came to the listener directly rather than
/// redirected: its destination is the listener itself, and following it
/// would loop.
fn is_direct(destination: SocketAddr, local: SocketAddr) -> bool {
    destination.port() == local.port()
        && destination.ip().to_canonical() == local.ip().to_canonical()
}

/// The detection outcome as the `result` label.
fn result_label(sniffed: &Sniffed) -> &'static str {
    match sniffed {
        Sniffed::Detected(Protocol::Http1) => "http1",
        Sniffed::Detected(Protocol::Http2) => "http2",
        Sniffed::Detected(Protocol::Tls(_)) => "tls",
        Sniffed::Detected(Protocol::Opaque) | Sniffed::Closed => "opaque",
        Sniffed::TimedOut => "timeout",
    }
}

/// What a capture listener's connections share, fixed while it runs.
pub struct CaptureShared {
    /// Clusters to send to.
    pub clusters: Arc<ClusterManager>,
    /// Counts connections for the drain.
    pub tracker: Arc<ConnectionTracker>,
    /// The TLS front (inbound mTLS).
    pub tls: DownstreamTls,
    /// This proxy's SPIFFE ID.
    pub local_id: Option<Arc<SpiffeId>>,
    /// Telemetry sinks.
    pub hub: Arc<TelemetryHub>,
    /// Drain and force signals.
    pub shutdown: Shutdown,
    /// Where the app's addresses are noted, for the drain.
    pub app: Arc<super::drain::AppAddresses>,
    /// The process's overload state, for shedding HTTP requests.
    pub overload: Arc<crate::overload::Overload>,
}

/// A running capture listener: its shared parts and the config a change
/// swaps (`config`), with what was built from that config.
pub struct CaptureFront {
    shared: CaptureShared,
    config: Arc<ArcSwap<Listener>>,
    built: ArcSwap<CaptureRuntime>,
    builder: Arc<crate::http::server::ServerBuilder>,
    telemetry: Arc<ListenerTelemetry>,
    detections: DetectionCounters,
    passthrough: Arc<str>,
}

impl std::fmt::Debug for CaptureFront {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaptureFront")
            .field("listener", &self.config.load().name)
            .finish_non_exhaustive()
    }
}

/// Pre-registered `postern_protocol_detection_total` handles.
struct DetectionCounters(HashMap<&'static str, metrics::Counter>);

impl DetectionCounters {
    fn new(listener: &Arc<str>) -> Self {
        DetectionCounters(
            ["http1", "http2", "tls", "opaque", "timeout"]
                .into_iter()
                .map(|result| {
                    let counter = metrics::counter!(
                        names::PROTOCOL_DETECTION_TOTAL,
                        "listener" => listener.clone(),
                        "result" => result,
                    );
                    (result, counter)
                })
                .collect(),
        )
    }

    fn count(&self, result: &'static str) {
        if let Some(counter) = self.0.get(result) {
            counter.increment(1);
        }
    }
}

/// What one version of the listener's config turns into.
struct CaptureRuntime {
    listener: Arc<Listener>,
    /// HTTP fronts of the outbound services that take HTTP, by address.
    services: HashMap<SocketAddr, Arc<HttpProxy>>,
    /// HTTP fronts of the app ports seen so far (inbound).
    inbound: Mutex<HashMap<u16, Arc<HttpProxy>>>,
}

impl CaptureFront {
    /// A front for `config`, a capture listener; `config` is swapped by the
    /// listener manager when the listener's settings change.
    pub fn new(shared: CaptureShared, config: Arc<ArcSwap<Listener>>) -> Arc<CaptureFront> {
        let listener = config.load_full();
        let telemetry = ListenerTelemetry::new(shared.hub.clone(), &listener);
        Arc::new(CaptureFront {
            builder: Arc::new(crate::http::server::builder(&listener.limits)),
            detections: DetectionCounters::new(&listener.name),
            built: ArcSwap::from_pointee(build_runtime(&shared, &telemetry, listener)),
            passthrough: Arc::from(PASSTHROUGH_CLUSTER),
            shared,
            config,
            telemetry,
        })
    }

    /// What the current config built; rebuilt on first use after a change.
    fn runtime(&self) -> Arc<CaptureRuntime> {
        let built = self.built.load_full();
        let config = self.config.load_full();
        if Arc::ptr_eq(&built.listener, &config) {
            return built;
        }
        // Two connections racing here build twice; both results are equal.
        let fresh = Arc::new(build_runtime(&self.shared, &self.telemetry, config));
        keep_buckets(&fresh, &built);
        self.built.store(fresh.clone());
        fresh
    }

    /// Serves one accepted connection to its end.
    pub async fn serve(&self, stream: TcpStream, remote: SocketAddr) {
        let runtime = self.runtime();
        let ListenerProtocol::Capture(capture) = &runtime.listener.protocol else {
            return;
        };
        let Ok(local) = stream.local_addr() else {
            return;
        };
        let destination = original_destination(&stream).unwrap_or(local);
        if is_direct(destination, local) {
            tracing::debug!(
                listener = %runtime.listener.name,
                peer = %remote,
                "connection made to the capture port itself, not redirected; closed"
            );
            return;
        }
        match capture.direction {
            TrafficDirection::Outbound => {
                self.outbound(&runtime, capture, stream, remote, destination)
                    .await
            }
            TrafficDirection::Inbound => {
                self.inbound(&runtime, capture, stream, remote, destination)
                    .await
            }
        }
    }

    /// Sniffs `io` unless its port is opaque; counts the outcome. `None`
    /// when the client left without sending anything.
    async fn detect(
        &self,
        capture: &CaptureListener,
        mut io: DownstreamIo,
        opaque: bool,
    ) -> Option<(DownstreamIo, Protocol)> {
        if opaque {
            self.detections.count("opaque");
            return Some((io, Protocol::Opaque));
        }
        let (sniffed, prefix) = sniff(&mut io, capture.detection_timeout).await;
        if sniffed == Sniffed::Closed && prefix.is_empty() {
            return None;
        }
        self.detections.count(result_label(&sniffed));
        let protocol = match sniffed {
            Sniffed::Detected(protocol) => protocol,
            Sniffed::TimedOut | Sniffed::Closed => Protocol::Opaque,
        };
        if let Protocol::Tls(hello) = &protocol {
            tracing::debug!(sni = ?hello.sni, alpn = ?hello.alpn, "captured TLS; proxied as it is");
        }
        let io = if prefix.is_empty() {
            io
        } else {
            DownstreamIo::Sniffed(Box::new(Rewind::new(prefix, io)))
        };
        Some((io, protocol))
    }

    async fn outbound(
        &self,
        runtime: &CaptureRuntime,
        capture: &CaptureListener,
        stream: TcpStream,
        remote: SocketAddr,
        destination: SocketAddr,
    ) {
        let listener = &runtime.listener;
        let opaque = capture.opaque_ports.contains(destination.port())
            || capture.service(destination).is_some_and(|s| s.opaque);
        let Some((io, protocol)) = self
            .detect(capture, DownstreamIo::Plain(stream), opaque)
            .await
        else {
            return;
        };
        let http = matches!(protocol, Protocol::Http1 | Protocol::Http2);
        let peer = DownstreamPeer::new(
            remote,
            destination.port(),
            &Default::default(),
            self.shared.local_id.as_deref(),
        );
        let shutdown = self.shared.shutdown.clone();
        match outbound_route(capture, destination, http) {
            OutboundRoute::Http(service) => {
                let Some(proxy) = runtime.services.get(&service.address) else {
                    return;
                };
                crate::http::server::serve_connection(
                    io,
                    Arc::new(peer),
                    proxy.clone(),
                    self.builder.clone(),
                    shutdown,
                )
                .await;
            }
            OutboundRoute::Tcp(cluster) => {
                if self.shed_opaque(listener, remote, destination, cluster) {
                    return;
                }
                let route = TcpRoute {
                    cluster: cluster.clone(),
                    idle_timeout: capture.tcp_idle_timeout,
                    rbac: None,
                    rate_limit: None,
                };
                crate::tcp::serve_route(
                    io,
                    &peer,
                    &listener.name,
                    &route,
                    &self.shared.clusters,
                    &self.telemetry,
                    shutdown,
                    None,
                )
                .await;
            }
            OutboundRoute::Passthrough => {
                if self.shed_opaque(listener, remote, destination, &self.passthrough) {
                    return;
                }
                crate::tcp::serve_address(
                    io,
                    &peer,
                    &listener.name,
                    &self.passthrough,
                    destination,
                    capture.connect_timeout,
                    capture.tcp_idle_timeout,
                    &self.telemetry,
                    shutdown,
                )
                .await;
            }
            OutboundRoute::Block => {
                tracing::debug!(
                    listener = %listener.name,
                    %destination,
                    "outbound call to an unknown destination blocked"
                );
                metrics::counter!(
                    names::TCP_CONNECTIONS_TOTAL,
                    "listener" => listener.name.clone(),
                    "cluster" => BLACKHOLE_CLUSTER,
                    "result" => "blocked",
                )
                .increment(1);
            }
        }
    }

    async fn inbound(
        &self,
        runtime: &CaptureRuntime,
        capture: &CaptureListener,
        stream: TcpStream,
        remote: SocketAddr,
        destination: SocketAddr,
    ) {
        let listener = &runtime.listener;
        let Some(accepted) = self
            .shared
            .tls
            .accept_captured(stream, capture.detection_timeout)
            .await
        else {
            return;
        };
        // Policies see the port the caller asked for, not 15006.
        let peer = DownstreamPeer::new(
            remote,
            destination.port(),
            &accepted.peer,
            self.shared.local_id.as_deref(),
        );
        if let Some(rbac) = &capture.rbac {
            if !crate::tcp::authorize(rbac, &peer, &listener.name) {
                return;
            }
        }
        let (io, protocol) = if accepted.silent {
            // Detection's wait was spent on the TLS decision already.
            self.detections.count("timeout");
            (accepted.io, Protocol::Opaque)
        } else if accepted.peer.opaque && !capture.http.has_request_policy() {
            // The calling sidecar sniffed already and found no HTTP. With
            // request-level policy the hint is not trusted: a peer could
            // use it to carry HTTP past that policy.
            self.detections.count("opaque");
            (accepted.io, Protocol::Opaque)
        } else {
            let opaque = capture.opaque_ports.contains(destination.port());
            match self.detect(capture, accepted.io, opaque).await {
                Some(detected) => detected,
                None => return,
            }
        };
        let app = app_address(destination);
        self.shared.app.record(app);
        let shutdown = self.shared.shutdown.clone();
        if matches!(protocol, Protocol::Http1 | Protocol::Http2) {
            if let Some(proxy) = self.inbound_proxy(runtime, capture, app) {
                crate::http::server::serve_connection(
                    io,
                    Arc::new(peer),
                    proxy,
                    self.builder.clone(),
                    shutdown,
                )
                .await;
                return;
            }
        }
        let cluster = Arc::from(inbound_cluster_name(app.port(), false));
        if self.shed_opaque(listener, remote, destination, &cluster) {
            return;
        }
        crate::tcp::serve_address(
            io,
            &peer,
            &listener.name,
            &cluster,
            app,
            capture.connect_timeout,
            capture.tcp_idle_timeout,
            &self.telemetry,
            shutdown,
        )
        .await;
    }

    /// Whether a connection found opaque is closed here because the process
    /// is shedding: it is known to be TCP only after detection (and, inbound,
    /// the mTLS handshake), so this is its first point to be shed, as a
    /// TCP-proxy listener's connection is at accept. Counted and logged as
    /// that one is.
    fn shed_opaque(
        &self,
        listener: &Listener,
        remote: SocketAddr,
        destination: SocketAddr,
        cluster: &Arc<str>,
    ) -> bool {
        if !self.shared.overload.shedding_tcp() {
            return false;
        }
        crate::tcp::shed(
            remote,
            destination.port(),
            &listener.name,
            cluster,
            &self.telemetry,
        );
        true
    }

    /// The HTTP front for calls to the app on `app`; `None` when the
    /// clusters for it cannot be made (too many ports), and the call goes
    /// as TCP instead.
    fn inbound_proxy(
        &self,
        runtime: &CaptureRuntime,
        capture: &CaptureListener,
        app: SocketAddr,
    ) -> Option<Arc<HttpProxy>> {
        let port = app.port();
        if let Some(proxy) = runtime.inbound.lock().ok()?.get(&port) {
            return Some(proxy.clone());
        }
        for http2 in [false, true] {
            let name = inbound_cluster_name(port, http2);
            let made = self.shared.clusters.local(&name, || {
                app_cluster(&name, app, http2, capture.connect_timeout)
            });
            if made.is_none() {
                tracing::warn!(
                    listener = %runtime.listener.name,
                    port,
                    "too many app ports to keep a cluster for each; proxying as TCP"
                );
                return None;
            }
        }
        let proxy = http_proxy(
            &self.shared,
            &self.telemetry,
            &runtime.listener,
            capture,
            Arc::new(inbound_routes(port)),
        );
        let mut cache = runtime.inbound.lock().ok()?;
        if cache.len() < MAX_INBOUND_PORTS {
            cache.insert(port, proxy.clone());
        }
        Some(proxy)
    }
}

/// Hands the rebuilt fronts the local rate-limit buckets of the ones they
/// replace, so a config change refills no bucket.
fn keep_buckets(fresh: &CaptureRuntime, built: &CaptureRuntime) {
    if let (ListenerProtocol::Capture(next), ListenerProtocol::Capture(previous)) =
        (&fresh.listener.protocol, &built.listener.protocol)
    {
        if let (Some(limit), Some(old)) = (&next.http.rate_limit, &previous.http.rate_limit) {
            limit.adopt(old);
        }
    }
    for (address, proxy) in &fresh.services {
        if let Some(old) = built.services.get(address) {
            crate::http::proxy::adopt_local_limits(&proxy.config.load(), &old.config.load());
        }
    }
}

/// Builds what one version of a capture listener's config needs: the HTTP
/// fronts of its outbound services.
fn build_runtime(
    shared: &CaptureShared,
    telemetry: &Arc<ListenerTelemetry>,
    listener: Arc<Listener>,
) -> CaptureRuntime {
    let mut services = HashMap::new();
    if let ListenerProtocol::Capture(capture) = &listener.protocol {
        for (address, service) in &capture.services {
            if let Some(routes) = &service.routes {
                let proxy = http_proxy(shared, telemetry, &listener, capture, routes.clone());
                services.insert(*address, proxy);
            }
        }
    }
    CaptureRuntime {
        listener,
        services,
        inbound: Mutex::new(HashMap::new()),
    }
}

/// An HTTP front with the listener's HTTP settings around `routes`.
fn http_proxy(
    shared: &CaptureShared,
    telemetry: &Arc<ListenerTelemetry>,
    listener: &Arc<Listener>,
    capture: &CaptureListener,
    routes: Arc<RouteTable>,
) -> Arc<HttpProxy> {
    let http = &capture.http;
    Arc::new(HttpProxy {
        listener: listener.clone(),
        trust_downstream: http.trust_downstream,
        config: Arc::new(ArcSwap::from_pointee(HttpConfig {
            normalize: http.normalize,
            rbac: http.rbac.clone(),
            rate_limit: http.rate_limit.clone(),
            jwt: http.jwt.clone(),
            global_rate_limit: http.global_rate_limit.clone(),
            routes,
        })),
        clusters: shared.clusters.clone(),
        telemetry: telemetry.clone(),
        tracker: shared.tracker.clone(),
        shutdown: shared.shutdown.clone(),
        overload: shared.overload.clone(),
    })
}

/// The cluster an inbound capture listener uses for an app port (Istio's
/// `inbound|PORT||`); calls the app gets over HTTP/2 (h2c callers, gRPC)
/// have their own.
pub fn inbound_cluster_name(port: u16, http2: bool) -> String {
    if http2 {
        format!("inbound|{port}|h2")
    } else {
        format!("inbound|{port}")
    }
}

fn app_cluster(
    name: &str,
    app: SocketAddr,
    http2: bool,
    connect_timeout: std::time::Duration,
) -> ClusterFile {
    ClusterFile {
        name: name.to_string(),
        endpoints: vec![EndpointFile {
            address: app.into(),
            weight: 1,
            priority: 0,
        }],
        lb: Default::default(),
        // The hop from the calling sidecar is HTTP/2 whatever its app
        // spoke, so the routes pick between the two clusters by what the
        // app spoke (and gRPC, which needs HTTP/2).
        protocol: if http2 {
            UpstreamProtocol::Http2
        } else {
            UpstreamProtocol::Http1
        },
        connect_timeout,
        pool: Default::default(),
        circuit_breaker: Default::default(),
        retry_budget: Default::default(),
        outlier_detection: None,
        tls: None,
        dns_refresh_rate: crate::config::file::default_dns_refresh_rate(),
        dns_lookup_family: Default::default(),
        dns_type: Default::default(),
    }
}

/// `content-type: application/grpc…`, anchored as route regexes are.
static GRPC_CONTENT_TYPE: LazyLock<Option<regex::Regex>> =
    LazyLock::new(|| regex::Regex::new(r"^application/grpc([+;].*)?$").ok());

/// Routes for calls to one app port: gRPC, and calls whose caller spoke
/// HTTP/2 (`x-postern-original-protocol`, see `http::protocol`), to the
/// HTTP/2 cluster; the rest to the HTTP/1.1 one. No route timeout: the
/// caller's side keeps it.
fn inbound_routes(port: u16) -> RouteTable {
    let forward = |name: &str, http2: bool, matcher: RouteMatch| crate::route::Route {
        rate_limits: Vec::new(),
        rate_limit: None,
        jwt: None,
        rbac: None,
        access_log: None,
        name: Arc::from(name),
        matcher,
        action: RouteAction::Forward(Forward {
            targets: Targets::Single(Arc::from(inbound_cluster_name(port, http2))),
            timeout: None,
            retry: None,
            rewrite: Default::default(),
            target_headers: Vec::new(),
        }),
        headers: None,
    };
    let mut routes = Vec::new();
    // The regex is a literal that compiles; without it gRPC would only
    // lose its HTTP/2 upstream.
    if let Some(regex) = GRPC_CONTENT_TYPE.clone() {
        routes.push(forward(
            "inbound-grpc",
            true,
            RouteMatch {
                headers: vec![HeaderMatch {
                    name: http::header::CONTENT_TYPE,
                    value: ValueMatch::Regex(regex),
                    invert: false,
                }],
                ..Default::default()
            },
        ));
    }
    // The marker is settled before routing: from a mesh peer as it said,
    // from a plaintext caller its own version, never as a caller forged it.
    routes.push(forward(
        "inbound-h2",
        true,
        RouteMatch {
            headers: vec![HeaderMatch {
                name: crate::http::protocol::X_POSTERN_ORIGINAL_PROTOCOL.clone(),
                value: ValueMatch::Exact(
                    crate::http::protocol::OriginalProtocol::Http2
                        .as_str()
                        .to_string(),
                ),
                invert: false,
            }],
            ..Default::default()
        },
    ));
    routes.push(forward("inbound", false, RouteMatch::default()));
    let vhost = VirtualHost {
        name: Arc::from(format!("inbound|{port}").as_str()),
        routes,
        headers: None,
    };
    RouteTable::new(vec![vhost], &[vec!["*".to_string()]])
}

#[cfg(test)]
mod tests;

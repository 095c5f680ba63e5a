//! The accept side of a listener with several filter chains: reads what a
//! connection's first bytes say (TLS or not, SNI, ALPN) without taking
//! them, picks the chain by [`chain_match`](super::chain_match), and hands
//! the connection to that chain's TLS front and HTTP or TCP path. A
//! connection no chain takes, with no default chain, is closed and counted.
//!
//! Each chain keeps its own swap cells (HTTP routes and policies, TCP
//! policy and rate limit), so a config change to one chain reaches its new
//! connections and requests while the others' connections are untouched.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use postern_certs::SpiffeId;
use tokio::net::TcpStream;
use tokio::sync::watch;

use super::chain_match::ConnectionFacts;
use super::detect::{detect, Detection, Protocol, MAX_PREFIX};
use super::{ConnectionTracker, Shutdown};
use crate::cluster::ClusterManager;
use crate::config::{ChainsListener, Listener, ListenerProtocol};
use crate::http::headers::DownstreamPeer;
use crate::http::proxy::{HttpConfig, HttpProxy};
use crate::http::server::ServerBuilder;
use crate::telemetry::metrics as names;
use crate::telemetry::ListenerTelemetry;
use crate::tls::DownstreamTls;

/// The cells a config change swaps in one chain, held by the manager.
#[derive(Default)]
pub struct ChainCells {
    /// Routes and policies of an HTTP chain.
    pub http: Option<Arc<ArcSwap<HttpConfig>>>,
    /// Connection policy of a TCP chain.
    pub tcp_rbac: Option<watch::Sender<Option<Arc<crate::authz::Rbac>>>>,
    /// Connection rate limit of a TCP chain.
    pub tcp_limit: Option<Arc<crate::tcp::LimitCell>>,
}

/// What the accept loop needs to serve the chains: per chain, its TLS
/// front and the receiving ends of its cells.
#[derive(Debug)]
pub struct ChainsSetup {
    /// Per chain, its TLS front.
    pub tls: Vec<DownstreamTls>,
    /// Per chain, the HTTP cell.
    pub http: Vec<Option<Arc<ArcSwap<HttpConfig>>>>,
    /// Per chain, the TCP policy watch.
    pub tcp_rbac: Vec<Option<crate::tcp::PolicyWatch>>,
    /// Per chain, the TCP rate-limit cell.
    pub tcp_limit: Vec<Option<Arc<crate::tcp::LimitCell>>>,
}

/// The chains' cells, for the manager, and their setup, for the accept
/// loop.
pub fn cells(chains: &ChainsListener, tls: Vec<DownstreamTls>) -> (Vec<ChainCells>, ChainsSetup) {
    let mut all = Vec::new();
    let mut setup = ChainsSetup {
        tls,
        http: Vec::new(),
        tcp_rbac: Vec::new(),
        tcp_limit: Vec::new(),
    };
    for chain in &chains.chains {
        let mut cells = ChainCells::default();
        let mut rbac_rx = None;
        match &chain.protocol {
            ListenerProtocol::Http(http) => {
                cells.http = Some(Arc::new(ArcSwap::from_pointee(HttpConfig::of(http))));
            }
            ListenerProtocol::Tcp(tcp) => {
                let (tx, rx) = watch::channel(tcp.rbac.clone());
                cells.tcp_rbac = Some(tx);
                rbac_rx = Some(rx);
                cells.tcp_limit =
                    Some(Arc::new(crate::tcp::LimitCell::new(tcp.rate_limit.clone())));
            }
            // Refused when the config is built.
            ListenerProtocol::Capture(_) | ListenerProtocol::Chains(_) => {}
        }
        setup.http.push(cells.http.clone());
        setup.tcp_rbac.push(rbac_rx);
        setup.tcp_limit.push(cells.tcp_limit.clone());
        all.push(cells);
    }
    (all, setup)
}

/// Installs `next`'s routes and policies into the running chains' cells;
/// the chains are the same in number and kind (the listener's shape).
pub fn swap(cells: &[ChainCells], next: &ChainsListener) {
    for (cell, chain) in cells.iter().zip(&next.chains) {
        match &chain.protocol {
            ListenerProtocol::Http(http) => {
                if let Some(swap) = &cell.http {
                    let config = HttpConfig::of(http);
                    config.adopt(&swap.load());
                    swap.store(Arc::new(config));
                }
            }
            ListenerProtocol::Tcp(tcp) => {
                if let Some(policy) = &cell.tcp_rbac {
                    policy.send_replace(tcp.rbac.clone());
                }
                if let Some(limit) = &cell.tcp_limit {
                    super::manager::swap_tcp_limit(limit, tcp.rate_limit.clone());
                }
            }
            ListenerProtocol::Capture(_) | ListenerProtocol::Chains(_) => {}
        }
    }
}

/// What must stay the same for a listener's chains to be swapped in place.
pub fn shape(chains: &ChainsListener) -> String {
    let each: Vec<String> = chains
        .chains
        .iter()
        .zip(&chains.names)
        .zip(&chains.matches)
        .map(|((chain, name), m)| {
            let kind = match &chain.protocol {
                ListenerProtocol::Http(http) => format!("http trust={}", http.trust_downstream),
                ListenerProtocol::Tcp(tcp) => {
                    format!("tcp {} {:?}", tcp.cluster, tcp.idle_timeout)
                }
                ListenerProtocol::Capture(_) | ListenerProtocol::Chains(_) => String::new(),
            };
            format!(
                "[{name} {m:?} {kind} {:?} {:?} {:?} {}]",
                chain.tls,
                chain.als,
                chain.direction,
                serde_json::to_string(&chain.limits).unwrap_or_default(),
            )
        })
        .collect();
    format!("chains default={:?} {}", chains.default, each.join(" "))
}

enum Serve {
    Http {
        proxy: Arc<HttpProxy>,
        builder: Arc<ServerBuilder>,
    },
    Tcp {
        listener: Arc<Listener>,
        telemetry: Arc<ListenerTelemetry>,
        policy: Option<crate::tcp::PolicyWatch>,
        limit: Option<Arc<crate::tcp::LimitCell>>,
    },
}

struct Chain {
    tls: DownstreamTls,
    serve: Option<Serve>,
}

/// Serves the connections of a listener with several filter chains.
pub struct ChainsFront {
    outer: Arc<Listener>,
    chains: Vec<Chain>,
    clusters: Arc<ClusterManager>,
    local_id: Option<Arc<SpiffeId>>,
    shutdown: Shutdown,
    overload: Arc<crate::overload::Overload>,
}

/// What a chain's connections share with the rest of the process.
pub struct Shared {
    /// Clusters to send to.
    pub clusters: Arc<ClusterManager>,
    /// Counts connections for the drain.
    pub tracker: Arc<ConnectionTracker>,
    /// This proxy's SPIFFE ID.
    pub local_id: Option<Arc<SpiffeId>>,
    /// Telemetry sinks.
    pub hub: Arc<crate::telemetry::TelemetryHub>,
    /// The listener's drain signals.
    pub shutdown: Shutdown,
    /// The overload state.
    pub overload: Arc<crate::overload::Overload>,
}

impl ChainsFront {
    /// The front of `outer` (a `Chains` listener) with its chains' setup.
    pub fn new(outer: Arc<Listener>, setup: ChainsSetup, shared: Shared) -> Arc<ChainsFront> {
        let ChainsSetup {
            tls,
            http,
            tcp_rbac,
            tcp_limit,
        } = setup;
        let mut chains = Vec::new();
        if let ListenerProtocol::Chains(config) = &outer.protocol {
            let parts = config
                .chains
                .iter()
                .zip(tls)
                .zip(http)
                .zip(tcp_rbac)
                .zip(tcp_limit);
            for ((((chain, tls), http), policy), limit) in parts {
                let telemetry = ListenerTelemetry::new(shared.hub.clone(), chain);
                let serve = match (&chain.protocol, http) {
                    (ListenerProtocol::Http(settings), Some(config)) => Some(Serve::Http {
                        proxy: Arc::new(HttpProxy {
                            listener: chain.clone(),
                            trust_downstream: settings.trust_downstream,
                            config,
                            clusters: shared.clusters.clone(),
                            telemetry,
                            tracker: shared.tracker.clone(),
                            shutdown: shared.shutdown.clone(),
                            overload: shared.overload.clone(),
                        }),
                        builder: Arc::new(crate::http::server::builder(&chain.limits)),
                    }),
                    (ListenerProtocol::Tcp(_), _) => Some(Serve::Tcp {
                        listener: chain.clone(),
                        telemetry,
                        policy,
                        limit,
                    }),
                    _ => None,
                };
                chains.push(Chain { tls, serve });
            }
        }
        Arc::new(ChainsFront {
            outer,
            chains,
            clusters: shared.clusters,
            local_id: shared.local_id,
            shutdown: shared.shutdown,
            overload: shared.overload,
        })
    }

    /// Picks the connection's chain and serves it there; closes it when no
    /// chain takes it.
    pub async fn serve(&self, stream: TcpStream, peer: SocketAddr) {
        let Some(chain) = self.select(&stream).await else {
            return;
        };
        let Some(Chain {
            tls,
            serve: Some(serve),
        }) = self.chains.get(chain)
        else {
            return;
        };
        let local_port = stream.local_addr().map_or(0, |a| a.port());
        let local_id = self.local_id.as_deref();
        match serve {
            Serve::Http { proxy, builder } => {
                if let Some((io, peer_tls)) = tls.accept(stream).await {
                    let downstream =
                        Arc::new(DownstreamPeer::new(peer, local_port, &peer_tls, local_id));
                    crate::http::server::serve_connection(
                        io,
                        downstream,
                        proxy.clone(),
                        builder.clone(),
                        self.shutdown.clone(),
                    )
                    .await;
                }
            }
            Serve::Tcp {
                listener,
                telemetry,
                policy,
                limit,
            } => {
                let ListenerProtocol::Tcp(route) = &listener.protocol else {
                    return;
                };
                if self.overload.shedding_tcp() {
                    crate::tcp::shed(peer, local_port, &listener.name, &route.cluster, telemetry);
                    return;
                }
                if let Some(limit) = limit.as_ref().and_then(|cell| cell.load_full()) {
                    let admitted = crate::tcp::admit(
                        &limit,
                        peer,
                        local_port,
                        &listener.name,
                        &route.cluster,
                        telemetry,
                    );
                    if !admitted {
                        return;
                    }
                }
                if let Some((io, peer_tls)) = tls.accept(stream).await {
                    let downstream = DownstreamPeer::new(peer, local_port, &peer_tls, local_id);
                    crate::tcp::serve_connection(
                        io,
                        &downstream,
                        listener.clone(),
                        self.clusters.clone(),
                        telemetry,
                        self.shutdown.clone(),
                        policy.clone(),
                    )
                    .await;
                }
            }
        }
    }

    async fn select(&self, stream: &TcpStream) -> Option<usize> {
        let ListenerProtocol::Chains(config) = &self.outer.protocol else {
            return None;
        };
        let port = stream.local_addr().map_or(0, |a| a.port());
        let facts = if config.inspect {
            inspect(stream, port, self.outer.limits.header_read_timeout).await?
        } else {
            ConnectionFacts {
                destination_port: port,
                ..Default::default()
            }
        };
        let chosen = config.table.select(&facts).or(config.default);
        if chosen.is_none() {
            tracing::debug!(
                listener = %self.outer.name,
                sni = ?facts.server_name,
                tls = facts.tls,
                "no filter chain matches the connection; closed"
            );
            metrics::counter!(
                names::DOWNSTREAM_NO_FILTER_CHAIN_TOTAL,
                "listener" => self.outer.name.clone(),
            )
            .increment(1);
        }
        chosen
    }
}

/// The facts of a connection from the bytes it opened with, left unread
/// for whoever serves it. A client silent for `wait` is taken as plaintext
/// (a server-first protocol); `None` when it closed first.
pub async fn inspect(stream: &TcpStream, port: u16, wait: Duration) -> Option<ConnectionFacts> {
    let mut facts = ConnectionFacts {
        destination_port: port,
        ..Default::default()
    };
    let read = async {
        let mut buf = vec![0u8; MAX_PREFIX];
        let mut seen = 0;
        let mut pause = Duration::from_millis(1);
        loop {
            let n = stream.peek(&mut buf).await.ok()?;
            if n == 0 {
                return None;
            }
            if buf[0] != 0x16 {
                return Some(None);
            }
            match detect(&buf[..n]) {
                Detection::Done(Protocol::Tls(hello)) => return Some(Some(hello)),
                Detection::Done(_) => return Some(None),
                Detection::NeedMore => {}
            }
            // A peek returns at once while any byte is waiting, so the rest
            // of a ClientHello split over segments is waited for by pausing.
            if n == seen {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(50));
            }
            seen = n;
        }
    };
    match tokio::time::timeout(wait, read).await {
        Ok(None) => None,
        Ok(Some(Some(hello))) => {
            facts.tls = true;
            facts.server_name = hello.sni;
            facts.application_protocols = hello.alpn;
            Some(facts)
        }
        Ok(Some(None)) | Err(_) => Some(facts),
    }
}

#[cfg(test)]
mod tests;

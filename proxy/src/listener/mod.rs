//! Accept loops: bind, per-listener connection limits, hand-off to the HTTP,
//! TCP or capture path, and drain.

pub mod capture;
pub mod chain_match;
pub mod chains;
pub mod detect;
pub mod drain;
pub mod manager;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::{watch, Notify, Semaphore};

use crate::cluster::ClusterManager;
use crate::config::{Listener, ListenerProtocol};
use crate::http::headers::DownstreamPeer;
use crate::http::proxy::HttpProxy;
use crate::telemetry::metrics as names;
use crate::tls::DownstreamTls;
use postern_certs::SpiffeId;

/// What a connection task watches to know when to wind down.
#[derive(Debug, Clone)]
pub struct Shutdown {
    /// The listener's name, for metrics.
    pub listener: Arc<str>,
    /// Becomes true when draining starts: finish in-flight work, take no more.
    pub drain: watch::Receiver<bool>,
    /// Becomes true when the drain time is up: close now.
    pub force: watch::Receiver<bool>,
}

/// Resolves once the flag is true; never, if its sender is gone unset.
pub async fn signalled(mut flag: watch::Receiver<bool>) {
    while !*flag.borrow_and_update() {
        if flag.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// Counts live connections so that a drain knows when it is done.
#[derive(Debug, Default)]
pub struct ConnectionTracker {
    live: AtomicUsize,
    idle: Notify,
}

/// One live connection; the tracker counts it until dropped.
#[derive(Debug)]
pub struct TrackedConnection(Arc<ConnectionTracker>);

impl Drop for TrackedConnection {
    fn drop(&mut self) {
        if self.0.live.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

impl ConnectionTracker {
    /// Counts a new connection.
    pub fn track(self: &Arc<Self>) -> TrackedConnection {
        self.live.fetch_add(1, Ordering::AcqRel);
        TrackedConnection(self.clone())
    }

    /// Connections open now.
    pub fn live(&self) -> usize {
        self.live.load(Ordering::Acquire)
    }

    /// Resolves once no connection is open.
    pub async fn wait_idle(&self) {
        loop {
            let notified = self.idle.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.live() == 0 {
                return;
            }
            notified.await;
        }
    }
}

/// What an accept loop shares with its connections.
#[derive(Debug)]
pub struct ListenerContext {
    /// Clusters to send to.
    pub clusters: Arc<ClusterManager>,
    /// Counts connections for the drain.
    pub tracker: Arc<ConnectionTracker>,
    /// The TLS front.
    pub tls: DownstreamTls,
    /// This proxy's SPIFFE ID, for `x-forwarded-client-cert`.
    pub local_id: Option<Arc<SpiffeId>>,
    /// The routes-and-policies cell a config change swaps (HTTP listeners).
    pub http: Option<Arc<arc_swap::ArcSwap<crate::http::proxy::HttpConfig>>>,
    /// Process-wide telemetry settings and sinks.
    pub telemetry: Arc<crate::telemetry::TelemetryHub>,
    /// The settings cell a config change swaps (capture listeners).
    pub capture: Option<Arc<arc_swap::ArcSwap<Listener>>>,
    /// Where inbound capture notes the app's addresses, for the drain.
    pub app: Arc<drain::AppAddresses>,
    /// The global connection cap and overload state.
    pub overload: Arc<crate::overload::Overload>,
    /// The current connection policy of a TCP listener; open connections
    /// watch it and close when a new one no longer allows them.
    pub tcp_rbac: Option<crate::tcp::PolicyWatch>,
    /// The current connection rate limit of a TCP listener.
    pub tcp_limit: Option<Arc<crate::tcp::LimitCell>>,
    /// The chains of a listener with several filter chains.
    pub chains: Option<chains::ChainsSetup>,
}

/// Accepts connections on a bound listener until the drain starts. The
/// socket may be shared with the listener that replaces this one, which
/// keeps accepting on it after this loop stops.
pub async fn run_listener(
    socket: Arc<TcpListener>,
    listener: Arc<Listener>,
    context: ListenerContext,
    mut shutdown: Shutdown,
) {
    let ListenerContext {
        clusters,
        tracker,
        tls,
        local_id,
        http: http_cell,
        telemetry: hub,
        capture: capture_cell,
        app,
        overload,
        tcp_rbac,
        tcp_limit,
        chains: chains_setup,
    } = context;
    let limit = Arc::new(Semaphore::new(listener.limits.max_connections));
    // One per listener: HTTP and TCP paths share its handles and sinks.
    let tcp_telemetry = crate::telemetry::ListenerTelemetry::new(hub.clone(), &listener);
    let http = match &listener.protocol {
        ListenerProtocol::Http(http) => Some((
            Arc::new(HttpProxy {
                listener: listener.clone(),
                trust_downstream: http.trust_downstream,
                config: http_cell.unwrap_or_else(|| {
                    Arc::new(arc_swap::ArcSwap::from_pointee(
                        crate::http::proxy::HttpConfig::of(http),
                    ))
                }),
                clusters: clusters.clone(),
                telemetry: tcp_telemetry.clone(),
                tracker: tracker.clone(),
                shutdown: shutdown.clone(),
                overload: overload.clone(),
            }),
            Arc::new(crate::http::server::builder(&listener.limits)),
        )),
        ListenerProtocol::Tcp(_) | ListenerProtocol::Capture(_) | ListenerProtocol::Chains(_) => {
            None
        }
    };
    let chains_front = chains_setup.map(|setup| {
        chains::ChainsFront::new(
            listener.clone(),
            setup,
            chains::Shared {
                clusters: clusters.clone(),
                tracker: tracker.clone(),
                local_id: local_id.clone(),
                hub: hub.clone(),
                shutdown: shutdown.clone(),
                overload: overload.clone(),
            },
        )
    });
    let capture = match &listener.protocol {
        ListenerProtocol::Capture(_) => Some(capture::CaptureFront::new(
            capture::CaptureShared {
                clusters: clusters.clone(),
                tracker: tracker.clone(),
                tls: tls.clone(),
                local_id: local_id.clone(),
                hub: hub.clone(),
                shutdown: shutdown.clone(),
                app,
                overload: overload.clone(),
            },
            capture_cell.unwrap_or_else(|| Arc::new(arc_swap::ArcSwap::new(listener.clone()))),
        )),
        _ => None,
    };
    let name = listener.name.clone();
    let active = metrics::gauge!(names::DOWNSTREAM_CONNECTIONS_ACTIVE, "listener" => name.clone());
    let total = metrics::counter!(names::DOWNSTREAM_CONNECTIONS_TOTAL, "listener" => name.clone());
    loop {
        let accepted = tokio::select! {
            // Once the drain has begun, no connection is taken from a
            // socket a replacement listener may be accepting on too.
            biased;
            _ = shutdown.drain.changed() => break,
            // While the process is overloaded new connections wait in the
            // kernel's listen queue (and past it, SYNs are dropped and
            // retried by clients) instead of costing memory here.
            accepted = overload.accept(&socket) => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(pair) => pair,
            Err(err) => {
                // EMFILE and friends: back off briefly instead of spinning.
                tracing::warn!(listener = %name, error = %err, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(listener_permit) = limit.clone().try_acquire_owned() else {
            metrics::counter!(
                names::DOWNSTREAM_LIMIT_REJECTIONS_TOTAL,
                "listener" => name.clone(),
                "limit" => "connections",
            )
            .increment(1);
            drop(stream);
            continue;
        };
        let Some(global_permit) = overload.try_connection() else {
            metrics::counter!(
                names::DOWNSTREAM_LIMIT_REJECTIONS_TOTAL,
                "listener" => name.clone(),
                "limit" => "global_connections",
            )
            .increment(1);
            drop(stream);
            continue;
        };
        let permit = (listener_permit, global_permit);
        total.increment(1);
        active.increment(1.0);
        let tracked = tracker.track();
        let conn_shutdown = shutdown.clone();
        let active = active.clone();
        let tls = tls.clone();
        let local_id = local_id.clone();
        if let Some(front) = &chains_front {
            let front = front.clone();
            tokio::spawn(async move {
                front.serve(stream, peer).await;
                active.decrement(1.0);
                drop((permit, tracked));
            });
            continue;
        }
        if let Some(front) = &capture {
            let front = front.clone();
            tokio::spawn(async move {
                front.serve(stream, peer).await;
                active.decrement(1.0);
                drop((permit, tracked));
            });
            continue;
        }
        match &http {
            Some((proxy, builder)) => {
                let proxy = proxy.clone();
                let builder = builder.clone();
                tokio::spawn(async move {
                    // The handshake runs in the connection's task, so a slow
                    // one never holds up the accept loop.
                    let local_port = stream.local_addr().map_or(0, |a| a.port());
                    if let Some((io, peer_tls)) = tls.accept(stream).await {
                        let downstream = Arc::new(DownstreamPeer::new(
                            peer,
                            local_port,
                            &peer_tls,
                            local_id.as_deref(),
                        ));
                        crate::http::server::serve_connection(
                            io,
                            downstream,
                            proxy,
                            builder,
                            conn_shutdown,
                        )
                        .await;
                    }
                    active.decrement(1.0);
                    drop((permit, tracked));
                });
            }
            None => {
                let listener = listener.clone();
                let clusters = clusters.clone();
                let telemetry = tcp_telemetry.clone();
                let policy = tcp_rbac.clone();
                let rate_limit = tcp_limit.as_ref().and_then(|cell| cell.load_full());
                // Read at accept, as a request is shed at arrival: a TCP
                // connection has no later point to say "not now".
                let shed = overload.shedding_tcp();
                tokio::spawn(async move {
                    let local_port = stream.local_addr().map_or(0, |a| a.port());
                    let admitted = match (&rate_limit, &listener.protocol) {
                        (_, ListenerProtocol::Tcp(route)) if shed => {
                            crate::tcp::shed(
                                peer,
                                local_port,
                                &listener.name,
                                &route.cluster,
                                &telemetry,
                            );
                            false
                        }
                        (Some(limit), ListenerProtocol::Tcp(route)) => crate::tcp::admit(
                            limit,
                            peer,
                            local_port,
                            &listener.name,
                            &route.cluster,
                            &telemetry,
                        ),
                        _ => true,
                    };
                    if !admitted {
                        drop(stream);
                    } else if let Some((io, peer_tls)) = tls.accept(stream).await {
                        let downstream =
                            DownstreamPeer::new(peer, local_port, &peer_tls, local_id.as_deref());
                        crate::tcp::serve_connection(
                            io,
                            &downstream,
                            listener,
                            clusters,
                            &telemetry,
                            conn_shutdown,
                            policy,
                        )
                        .await;
                    }
                    active.decrement(1.0);
                    drop((permit, tracked));
                });
            }
        }
    }
    tracing::info!(listener = %name, "listener stopped accepting");
}

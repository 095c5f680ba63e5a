//! The set of running listeners, changed at run time: a new listener is
//! bound and starts accepting, a removed one stops accepting and drains its
//! connections, a kept one gets its new routes and policies without
//! touching a connection. A listener whose address, limits, protocol or TLS changed is
//! replaced (the old one drains). A replacement on the same address takes
//! over the old one's bound socket, so the port never refuses a connection
//! during the change.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use postern_certs::{IdentityHandle, SpiffeId};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::{run_listener, ConnectionTracker, ListenerContext, Shutdown};
use crate::cluster::ClusterManager;
use crate::config::{Listener, ListenerProtocol};
use crate::http::proxy::HttpConfig;
use crate::tls::DownstreamTls;

/// Listeners that could not be started: name and reason each.
#[derive(Debug, thiserror::Error)]
#[error("{}", .0.iter().map(|(name, reason)| format!("listener \"{name}\": {reason}")).collect::<Vec<_>>().join("; "))]
pub struct ListenerStartError(pub Vec<(Arc<str>, String)>);

struct Running {
    listener: Arc<Listener>,
    shape: String,
    addr: SocketAddr,
    /// The bound socket, owned by the accept loop: a replacement on the
    /// same address takes it over while the loop still runs; once the loop
    /// has stopped (a drain) the socket is closed.
    socket: Weak<TcpListener>,
    http: Option<Arc<ArcSwap<HttpConfig>>>,
    capture: Option<Arc<ArcSwap<Listener>>>,
    tcp_rbac: Option<watch::Sender<Option<Arc<crate::authz::Rbac>>>>,
    tcp_limit: Option<Arc<crate::tcp::LimitCell>>,
    chains: Vec<super::chains::ChainCells>,
    drain: watch::Sender<bool>,
    force: watch::Sender<bool>,
    accept: JoinHandle<()>,
}

/// Starts, updates and drains listeners.
pub struct ListenerManager {
    running: Mutex<HashMap<Arc<str>, Running>>,
    clusters: Arc<ClusterManager>,
    tracker: Arc<ConnectionTracker>,
    identity: Option<Arc<IdentityHandle>>,
    local_id: Option<Arc<SpiffeId>>,
    drain_timeout: Duration,
    draining: AtomicBool,
    telemetry: Arc<crate::telemetry::TelemetryHub>,
    app: Arc<super::drain::AppAddresses>,
    overload: Arc<crate::overload::Overload>,
}

impl std::fmt::Debug for ListenerManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ListenerManager").finish_non_exhaustive()
    }
}

/// What must match for a listener to be kept (only its routes updated).
fn shape(listener: &Listener) -> String {
    let protocol = match &listener.protocol {
        // Routes, path normalisation, RBAC and rate limits are swapped in
        // place (`HttpConfig`), so they are not part of the shape.
        ListenerProtocol::Http(http) => format!("http trust={}", http.trust_downstream),
        // The connection policy is swapped in place too: open connections
        // are checked again against it (`tcp::PolicyWatch`).
        ListenerProtocol::Tcp(tcp) => format!("tcp {} {:?}", tcp.cluster, tcp.idle_timeout),
        // Services, detection and policies are swapped in place; the
        // direction decides what the accept loop does.
        ListenerProtocol::Capture(capture) => format!("capture {:?}", capture.direction),
        // Each chain's routes and policies are swapped in place; its
        // criteria, kind and TLS are the shape.
        ListenerProtocol::Chains(chains) => super::chains::shape(chains),
    };
    format!(
        "{} {:?} {:?} {} {} {:?}",
        listener.address,
        listener.direction,
        listener.als,
        serde_json::to_string(&listener.limits).unwrap_or_default(),
        protocol,
        listener.tls
    )
}

/// Installs a TCP listener's new connection rate limit, with the buckets of
/// the one it replaces when the limit is unchanged.
pub(super) fn swap_tcp_limit(
    cell: &crate::tcp::LimitCell,
    next: Option<Arc<crate::ratelimit::LocalRateLimit>>,
) {
    if let (Some(limit), Some(old)) = (&next, cell.load_full()) {
        limit.adopt(&old);
    }
    cell.store(next);
}

/// The `listen(2)` backlog of `listener`; validation keeps it in range.
fn listen_backlog(listener: &Listener) -> i32 {
    i32::try_from(listener.limits.tcp_backlog_size).unwrap_or(i32::MAX)
}

/// Binds `address` and listens with `backlog`, as the standard library's
/// bind does (address reuse, so a restart binds while old connections sit
/// in TIME_WAIT) but with a backlog of our choosing instead of its 128.
fn bind(address: SocketAddr, backlog: i32) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(
        Domain::for_address(address),
        Type::STREAM,
        Some(Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    socket.bind(&address.into())?;
    socket.listen(backlog)?;
    socket.set_nonblocking(true)?;
    TcpListener::from_std(socket.into())
}

/// A listener bound and set up, not yet accepting.
struct Prepared {
    listener: Arc<Listener>,
    socket: Arc<TcpListener>,
    addr: SocketAddr,
    tls: DownstreamTls,
    chain_tls: Vec<DownstreamTls>,
}

/// The socket of a listener being replaced or removed that `listener` can
/// take over: the same configured address (for port 0, only under the same
/// name, since each such listener has a port of its own). Binding afresh
/// would fail while the old socket is open, and closing it first would
/// refuse connections in between.
fn inherit_socket(
    running: &HashMap<Arc<str>, Running>,
    stale: &[Arc<str>],
    listener: &Listener,
) -> Option<Arc<TcpListener>> {
    let same = |name: &Arc<str>, r: &Running| {
        r.listener.address == listener.address
            && (listener.address.port() != 0 || **name == *listener.name)
    };
    stale
        .iter()
        .filter_map(|name| running.get(name).map(|r| (name, r)))
        .find(|(name, r)| same(name, r))
        .and_then(|(_, r)| r.socket.upgrade())
}

impl ListenerManager {
    /// A manager with nothing running.
    pub fn new(
        clusters: Arc<ClusterManager>,
        tracker: Arc<ConnectionTracker>,
        identity: Option<Arc<IdentityHandle>>,
        local_id: Option<Arc<SpiffeId>>,
        drain_timeout: Duration,
        telemetry: Arc<crate::telemetry::TelemetryHub>,
        overload: Arc<crate::overload::Overload>,
    ) -> ListenerManager {
        ListenerManager {
            running: Mutex::new(HashMap::new()),
            clusters,
            tracker,
            identity,
            local_id,
            drain_timeout,
            draining: AtomicBool::new(false),
            telemetry,
            app: Default::default(),
            overload,
        }
    }

    /// Makes the running set match `listeners`. Listeners that cannot be
    /// bound are reported and nothing changes then: the running set stays
    /// as it was.
    pub fn apply(&self, listeners: &[Arc<Listener>]) -> Result<(), ListenerStartError> {
        let Ok(mut running) = self.running.lock() else {
            return Err(ListenerStartError(vec![(
                "(all)".into(),
                "listener table poisoned".into(),
            )]));
        };
        // Checked under the lock that drain_all takes to set it, so a drain
        // never misses a listener started alongside it.
        if self.draining.load(Ordering::Acquire) {
            return Ok(());
        }
        let wanted: HashMap<&str, &Arc<Listener>> =
            listeners.iter().map(|l| (&*l.name, l)).collect();
        let stale: Vec<Arc<str>> = running
            .iter()
            .filter(|(name, r)| wanted.get(&***name).is_none_or(|l| shape(l) != r.shape))
            .map(|(name, _)| name.clone())
            .collect();
        // Everything new or replaced is bound and set up before anything
        // stops, so a listener that cannot start leaves the running set as
        // it was (the caller keeps the old config too).
        let mut prepared = Vec::new();
        let mut failures = Vec::new();
        for listener in listeners {
            if running.contains_key(&listener.name) && !stale.contains(&listener.name) {
                continue;
            }
            let inherited = inherit_socket(&running, &stale, listener);
            match self.prepare(listener, inherited) {
                Ok(ready) => prepared.push(ready),
                Err(err) => {
                    tracing::error!(listener = %listener.name, error = %err, "cannot start listener");
                    failures.push((listener.name.clone(), format!("{err:#}")));
                }
            }
        }
        if !failures.is_empty() {
            return Err(ListenerStartError(failures));
        }
        for name in stale {
            if let Some(old) = running.remove(&name) {
                tracing::info!(listener = %name, addr = %old.addr, "listener removed or replaced; draining");
                self.retire(old);
            }
        }
        for ready in prepared {
            let name = ready.listener.name.clone();
            running.insert(name, self.start(ready));
        }
        for listener in listeners {
            let Some(current) = running.get_mut(&listener.name) else {
                continue;
            };
            if Arc::ptr_eq(&current.listener, listener) {
                continue;
            }
            if let (Some(swap), ListenerProtocol::Http(http)) = (&current.http, &listener.protocol)
            {
                let next = HttpConfig::of(http);
                next.adopt(&swap.load());
                swap.store(Arc::new(next));
            }
            if let Some(swap) = &current.capture {
                swap.store(listener.clone());
            }
            if let (Some(policy), ListenerProtocol::Tcp(tcp)) =
                (&current.tcp_rbac, &listener.protocol)
            {
                policy.send_replace(tcp.rbac.clone());
            }
            if let (Some(cell), ListenerProtocol::Tcp(tcp)) =
                (&current.tcp_limit, &listener.protocol)
            {
                swap_tcp_limit(cell, tcp.rate_limit.clone());
            }
            if let ListenerProtocol::Chains(chains) = &listener.protocol {
                super::chains::swap(&current.chains, chains);
            }
            current.listener = listener.clone();
        }
        Ok(())
    }

    /// Binds (or takes over) the socket and builds the TLS front: the steps
    /// that can fail, done before any running listener is touched.
    fn prepare(
        &self,
        listener: &Arc<Listener>,
        inherited: Option<Arc<TcpListener>>,
    ) -> anyhow::Result<Prepared> {
        use anyhow::Context as _;
        let backlog = listen_backlog(listener);
        let socket = match inherited {
            Some(socket) => {
                // Listening again on a listening socket only sets its
                // backlog (Linux), keeping the connections queued on it.
                socket2::SockRef::from(&*socket)
                    .listen(backlog)
                    .with_context(|| format!("cannot set the backlog of {}", listener.address))?;
                socket
            }
            None => Arc::new(
                bind(listener.address, backlog)
                    .with_context(|| format!("cannot bind {}", listener.address))?,
            ),
        };
        let addr = socket.local_addr()?;
        let tls = DownstreamTls::new(
            listener.name.clone(),
            &listener.tls,
            self.identity.as_ref(),
            listener.limits.header_read_timeout,
        )?;
        let mut chain_tls = Vec::new();
        if let ListenerProtocol::Chains(chains) = &listener.protocol {
            for chain in &chains.chains {
                chain_tls.push(DownstreamTls::new(
                    listener.name.clone(),
                    &chain.tls,
                    self.identity.as_ref(),
                    chain.limits.header_read_timeout,
                )?);
            }
        }
        Ok(Prepared {
            listener: listener.clone(),
            socket,
            addr,
            tls,
            chain_tls,
        })
    }

    fn start(&self, prepared: Prepared) -> Running {
        let Prepared {
            listener,
            socket,
            addr,
            tls,
            chain_tls,
        } = prepared;
        let listener = &listener;
        let http = match &listener.protocol {
            ListenerProtocol::Http(http) => {
                Some(Arc::new(ArcSwap::from_pointee(HttpConfig::of(http))))
            }
            ListenerProtocol::Tcp(_)
            | ListenerProtocol::Capture(_)
            | ListenerProtocol::Chains(_) => None,
        };
        let (chain_cells, chains) = match &listener.protocol {
            ListenerProtocol::Chains(chains) => {
                let (cells, setup) = super::chains::cells(chains, chain_tls);
                (cells, Some(setup))
            }
            _ => (Vec::new(), None),
        };
        let capture = match &listener.protocol {
            ListenerProtocol::Capture(_) => Some(Arc::new(ArcSwap::new(listener.clone()))),
            _ => None,
        };
        let (tcp_rbac, tcp_rbac_rx) = match &listener.protocol {
            ListenerProtocol::Tcp(tcp) => {
                let (tx, rx) = watch::channel(tcp.rbac.clone());
                (Some(tx), Some(rx))
            }
            _ => (None, None),
        };
        let tcp_limit = match &listener.protocol {
            ListenerProtocol::Tcp(tcp) => {
                Some(Arc::new(crate::tcp::LimitCell::new(tcp.rate_limit.clone())))
            }
            _ => None,
        };
        let (drain, drain_rx) = watch::channel(false);
        let (force, force_rx) = watch::channel(false);
        let shutdown = Shutdown {
            listener: listener.name.clone(),
            drain: drain_rx,
            force: force_rx,
        };
        tracing::info!(listener = %listener.name, %addr, "listening");
        let context = ListenerContext {
            clusters: self.clusters.clone(),
            tracker: self.tracker.clone(),
            tls,
            local_id: self.local_id.clone(),
            http: http.clone(),
            telemetry: self.telemetry.clone(),
            capture: capture.clone(),
            app: self.app.clone(),
            overload: self.overload.clone(),
            tcp_rbac: tcp_rbac_rx,
            tcp_limit: tcp_limit.clone(),
            chains,
        };
        let weak = Arc::downgrade(&socket);
        let accept = tokio::spawn(run_listener(socket, listener.clone(), context, shutdown));
        Running {
            listener: listener.clone(),
            shape: shape(listener),
            addr,
            socket: weak,
            http,
            capture,
            tcp_rbac,
            tcp_limit,
            chains: chain_cells,
            drain,
            force,
            accept,
        }
    }

    /// Stops accepting, lets connections finish, closes the rest after the
    /// drain timeout.
    fn retire(&self, old: Running) {
        old.drain.send_replace(true);
        let timeout = self.drain_timeout;
        tokio::spawn(async move {
            let _ = old.accept.await;
            tokio::time::sleep(timeout).await;
            old.force.send_replace(true);
        });
    }

    /// The bound address of a running listener.
    pub fn addr(&self, name: &str) -> Option<SocketAddr> {
        self.running.lock().ok()?.get(name).map(|r| r.addr)
    }

    /// Starts the drain of every listener; none is started afterwards.
    /// Resolves when every accept loop has stopped.
    pub async fn drain_all(&self) {
        self.drain_where(|_| true).await;
    }

    /// Starts the drain of the listeners `which` picks; no listener is
    /// started or changed afterwards. Resolves when their accept loops
    /// have stopped.
    pub async fn drain_where(&self, which: impl Fn(&Listener) -> bool) {
        let accepts: Vec<JoinHandle<()>> = match self.running.lock() {
            Ok(mut running) => {
                self.draining.store(true, Ordering::Release);
                running
                    .values_mut()
                    .filter(|r| which(&r.listener))
                    .map(|r| {
                        r.drain.send_replace(true);
                        std::mem::replace(&mut r.accept, tokio::spawn(async {}))
                    })
                    .collect()
            }
            Err(_) => Vec::new(),
        };
        for accept in accepts {
            let _ = accept.await;
        }
    }

    /// Whether a running listener matches `which`.
    pub fn any(&self, which: impl Fn(&Listener) -> bool) -> bool {
        self.running
            .lock()
            .is_ok_and(|running| running.values().any(|r| which(&r.listener)))
    }

    /// The app addresses inbound capture has forwarded to.
    pub fn app_addresses(&self) -> &super::drain::AppAddresses {
        &self.app
    }

    /// Tells every connection to close now.
    pub fn force_all(&self) {
        if let Ok(running) = self.running.lock() {
            for r in running.values() {
                r.force.send_replace(true);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Connects `attempts` times to `socket`, which nothing accepts on: the
    /// connections the kernel completes, which is its backlog plus one on
    /// Linux (SYNs past that are dropped, and retried by the client only a
    /// second later).
    async fn queue(socket: &TcpListener, attempts: usize) -> Vec<tokio::net::TcpStream> {
        let addr = socket.local_addr().unwrap();
        let connects = (0..attempts).map(|_| async move {
            tokio::time::timeout(
                Duration::from_millis(300),
                tokio::net::TcpStream::connect(addr),
            )
            .await
            .ok()
            .and_then(Result::ok)
        });
        futures_util::future::join_all(connects)
            .await
            .into_iter()
            .flatten()
            .collect()
    }

    #[tokio::test]
    async fn the_configured_backlog_is_the_listen_queue() {
        let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
        let small = bind(loopback, 16).unwrap();
        assert_eq!(queue(&small, 200).await.len(), 17);
        // The default holds a storm the standard library's 128 would not.
        let default = crate::config::file::DEFAULT_TCP_BACKLOG_SIZE as i32;
        let large = bind(loopback, default).unwrap();
        assert_eq!(queue(&large, 300).await.len(), 300);
    }

    #[tokio::test]
    async fn an_inherited_socket_takes_the_new_backlog() {
        let socket = bind(SocketAddr::from(([127, 0, 0, 1], 0)), 8).unwrap();
        let first = queue(&socket, 20).await;
        assert_eq!(first.len(), 9);
        // As `prepare` does for a replacement on the same address; the
        // connections queued already stay queued.
        socket2::SockRef::from(&socket).listen(32).unwrap();
        assert_eq!(queue(&socket, 40).await.len(), 33 - first.len());
    }
}

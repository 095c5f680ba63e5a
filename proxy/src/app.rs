//! Wiring: bind listeners and admin, start the accept loops, and run the
//! drain when asked (SIGTERM in the binary, `POST /drain`, or `Proxy::drain`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::admin::{self, AdminState};
use crate::cluster::ClusterManager;
use crate::config::Config;
use crate::config::IdentityConfig;
use crate::listener::{run_listener, ConnectionTracker, Shutdown};
use crate::tls::DownstreamTls;
use postern_certs::{
    CertSource, FileSource, IdentityHandle, IssueRequest, IstioCaSettings, IstioCaSource, Rotator,
    TrustBundle,
};

/// How often idle upstream connections are swept and metrics upkept.
const REAP_INTERVAL: Duration = Duration::from_secs(5);

/// A running proxy.
#[derive(Debug)]
pub struct Proxy {
    listener_addrs: HashMap<String, SocketAddr>,
    admin_addr: SocketAddr,
    drain: watch::Sender<bool>,
    supervisor: JoinHandle<()>,
    identity: Option<Arc<IdentityHandle>>,
}

impl Proxy {
    /// Binds every listener and the admin server, then serves in the background.
    /// Fails if any address cannot be bound; nothing is left running then.
    pub async fn start(config: Config) -> anyhow::Result<Proxy> {
        let mut sockets = Vec::new();
        for listener in &config.listeners {
            let socket = TcpListener::bind(listener.address).await.with_context(|| {
                format!(
                    "cannot bind listener \"{}\" to {}",
                    listener.name, listener.address
                )
            })?;
            sockets.push((listener.clone(), socket));
        }
        let admin_socket = TcpListener::bind(config.admin_address)
            .await
            .with_context(|| format!("cannot bind admin server to {}", config.admin_address))?;
        let admin_addr = admin_socket.local_addr()?;

        let (drain_tx, drain_rx) = watch::channel(false);
        let (force_tx, force_rx) = watch::channel(false);
        let (identity, rotator) = match &config.identity {
            Some(settings) => {
                let (handle, task) = start_identity(settings)?;
                (Some(handle), Some(task))
            }
            None => (None, None),
        };
        let clusters = Arc::new(ClusterManager::new(
            &config.clusters,
            &config.upstream_tls,
            identity.as_ref(),
        )?);
        let tracker = Arc::new(ConnectionTracker::default());
        let local_id = config.identity.as_ref().map(|i| Arc::new(i.id.clone()));

        let mut listener_addrs = HashMap::new();
        let mut accept_loops = Vec::new();
        for (listener, socket) in sockets {
            let addr = socket.local_addr()?;
            tracing::info!(listener = %listener.name, %addr, "listening");
            listener_addrs.insert(listener.name.to_string(), addr);
            let shutdown = Shutdown {
                listener: listener.name.clone(),
                drain: drain_rx.clone(),
                force: force_rx.clone(),
            };
            let tls = DownstreamTls::new(
                listener.name.clone(),
                &listener.tls,
                identity.as_ref(),
                listener.limits.header_read_timeout,
            )?;
            accept_loops.push(tokio::spawn(run_listener(
                socket,
                listener,
                clusters.clone(),
                tracker.clone(),
                tls,
                local_id.clone(),
                shutdown,
            )));
        }

        let state = Arc::new(AdminState {
            ready: Default::default(),
            drain: drain_tx.clone(),
            config: config.clone(),
            identity: identity.clone(),
        });
        let admin_task = tokio::spawn(admin::serve(admin_socket, state.clone()));
        tracing::info!(addr = %admin_addr, "admin server listening");
        let reaper = {
            let clusters = clusters.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(REAP_INTERVAL);
                loop {
                    tick.tick().await;
                    clusters.reap_idle();
                    // Histograms keep raw samples until upkeep folds them in;
                    // without it memory grows with traffic between scrapes.
                    if let Some(handle) = crate::telemetry::prometheus_handle() {
                        handle.run_upkeep();
                    }
                }
            })
        };
        // With an identity, the proxy is ready once it can present a
        // certificate: before that every mTLS handshake would fail.
        let readiness = {
            let state = state.clone();
            let identity = identity.clone();
            tokio::spawn(async move {
                if let Some(identity) = identity {
                    identity.loaded().await;
                }
                state.ready.store(true, Ordering::Release);
            })
        };

        let drain_timeout = config.drain_timeout;
        let supervisor = tokio::spawn(async move {
            let mut drain_rx = drain_rx;
            // Wait for the drain; a dropped sender cannot happen while `state` lives.
            while !*drain_rx.borrow_and_update() {
                if drain_rx.changed().await.is_err() {
                    break;
                }
            }
            tracing::info!(timeout = ?drain_timeout, "draining");
            for task in accept_loops {
                let _ = task.await;
            }
            if tokio::time::timeout(drain_timeout, tracker.wait_idle())
                .await
                .is_err()
            {
                tracing::warn!(
                    open = tracker.live(),
                    "drain timeout passed; closing open connections"
                );
                force_tx.send_replace(true);
                // Connection tasks end at their next poll; give them a moment to release sockets.
                let _ = tokio::time::timeout(Duration::from_secs(1), tracker.wait_idle()).await;
            }
            reaper.abort();
            readiness.abort();
            if let Some(rotator) = rotator {
                rotator.abort();
            }
            admin_task.abort();
            drop(state);
            tracing::info!("drained");
        });

        Ok(Proxy {
            listener_addrs,
            admin_addr,
            drain: drain_tx,
            supervisor,
            identity,
        })
    }

    /// The bound address of a listener.
    pub fn listener_addr(&self, name: &str) -> Option<SocketAddr> {
        self.listener_addrs.get(name).copied()
    }

    /// The workload identity cell, when one is configured.
    pub fn identity(&self) -> Option<&Arc<IdentityHandle>> {
        self.identity.as_ref()
    }

    /// Resolves once the proxy can serve: its identity (if any) is loaded.
    pub async fn ready(&self) {
        if let Some(identity) = &self.identity {
            identity.loaded().await;
        }
    }

    /// The bound address of the admin server.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// Starts a graceful drain: stop accepting, finish in-flight calls, stop.
    pub fn drain(&self) {
        self.drain.send_replace(true);
    }

    /// Resolves once a drain has been asked for, by any means.
    pub async fn drained_started(&self) {
        let mut rx = self.drain.subscribe();
        while !*rx.borrow_and_update() {
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    /// Resolves when a drain has finished and everything is stopped.
    pub async fn wait(self) -> anyhow::Result<()> {
        self.supervisor.await.context("proxy supervisor failed")
    }
}

/// Builds the certificate source and starts the rotation loop.
fn start_identity(
    settings: &IdentityConfig,
) -> anyhow::Result<(Arc<IdentityHandle>, JoinHandle<()>)> {
    use crate::config::IdentitySource;
    let source: Arc<dyn CertSource> = match &settings.source {
        IdentitySource::Files(files) => Arc::new(FileSource::new(
            files.cert.clone(),
            files.key.clone(),
            files.bundle.clone(),
            files.poll_interval,
        )),
        IdentitySource::IstioCa(ca) => {
            let ca_cert_pem = ca
                .ca_cert
                .as_ref()
                .map(|path| {
                    std::fs::read(path).with_context(|| format!("reading {}", path.display()))
                })
                .transpose()?;
            let trust_bundle = ca
                .trust_bundle
                .as_ref()
                .map(|path| {
                    let pem = std::fs::read(path)
                        .with_context(|| format!("reading {}", path.display()))?;
                    anyhow::Ok(Arc::new(TrustBundle::from_pem(&pem)?))
                })
                .transpose()?;
            Arc::new(IstioCaSource::new(IstioCaSettings {
                address: ca.address.clone(),
                ca_cert_pem,
                token_file: ca.token_file.clone(),
                trust_bundle,
                cluster_id: ca.cluster_id.clone(),
                timeout: ca.timeout,
            })?)
        }
    };
    let handle = IdentityHandle::new();
    let rotator = Rotator {
        source,
        request: IssueRequest {
            id: settings.id.clone(),
            key_algorithm: settings.key_algorithm,
            lifetime: settings.lifetime,
        },
        policy: settings.policy,
        handle: handle.clone(),
    };
    Ok((handle, tokio::spawn(rotator.run())))
}

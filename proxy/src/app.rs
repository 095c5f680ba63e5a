//! Wiring: bind listeners and admin, start the accept loops, and run the
//! drain when asked (SIGTERM in the binary, `POST /drain`, or `Proxy::drain`).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
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
use crate::listener::manager::ListenerManager;
use crate::listener::ConnectionTracker;
use postern_certs::{
    CertSource, FileSource, IdentityHandle, IssueRequest, IstioCaSettings, IstioCaSource, Rotator,
    SdsSource, TrustBundle,
};

/// How often idle upstream connections are swept.
const REAP_INTERVAL: Duration = Duration::from_secs(5);

/// A running proxy.
#[derive(Debug)]
pub struct Proxy {
    admin_addr: SocketAddr,
    drain: watch::Sender<bool>,
    supervisor: JoinHandle<()>,
    identity: Option<Arc<IdentityHandle>>,
    runtime: Arc<Runtime>,
}

/// The parts of a running proxy that a new config changes.
#[derive(Debug)]
pub struct Runtime {
    listeners: Arc<ListenerManager>,
    clusters: Arc<ClusterManager>,
    admin: Arc<AdminState>,
}

impl Runtime {
    /// Switches to `config`: clusters first (so new routes find them),
    /// then listeners. Requests in flight finish on what they started with.
    /// On an error nothing changes: the running config stays.
    pub fn apply(&self, config: Config) -> anyhow::Result<()> {
        self.clusters
            .update(&config.clusters, &config.upstream_tls)?;
        if let Err(err) = self.listeners.apply(&config.listeners) {
            // The listeners stayed as they were; their clusters go back
            // too, so the routes they serve still find what they name.
            let previous = self.admin.config.load_full();
            if let Err(undo) = self
                .clusters
                .update(&previous.clusters, &previous.upstream_tls)
            {
                tracing::error!(error = %undo, "cannot restore the previous clusters");
            }
            return Err(err.into());
        }
        self.admin.config.store(Arc::new(config));
        Ok(())
    }

    /// Sets what `/config_dump` shows about dynamic resources.
    pub fn set_dynamic_status(&self, status: serde_json::Value) {
        self.admin.dynamic.store(Arc::new(status));
    }

    /// Marks whether the first complete dynamic config has been applied.
    pub fn set_config_ready(&self, ready: bool) {
        self.admin.config_ready.store(ready, Ordering::Release);
    }

    /// Sets what `/ready` adds about where the config came from.
    pub fn set_config_note(&self, note: Option<String>) {
        self.admin.config_note.store(note.map(Arc::new));
    }
}

impl Proxy {
    /// Binds every listener and the admin server, then serves in the background.
    /// Fails if any address cannot be bound; nothing is left running then.
    pub async fn start(config: Config) -> anyhow::Result<Proxy> {
        let admin_socket = TcpListener::bind(config.admin_address)
            .await
            .with_context(|| format!("cannot bind admin server to {}", config.admin_address))?;
        let admin_addr = admin_socket.local_addr()?;

        let (drain_tx, drain_rx) = watch::channel(false);
        let (quit_tx, quit_rx) = watch::channel(false);
        // Secrets from SDS reach the rotation loop through this source.
        let sds_names = config.identity.as_ref().and_then(|i| match &i.source {
            crate::config::IdentitySource::Sds(names) => Some(names.clone()),
            _ => None,
        });
        let sds = sds_names.as_ref().map(|_| SdsSource::new());
        // TLS contexts from xDS name the identity's secrets. An identity
        // from files or a CA answers to Istio's names, as istio-agent's
        // local SDS server would for Envoy.
        let tls_names = config.identity.as_ref().map(|_| {
            sds_names
                .clone()
                .unwrap_or_else(crate::config::file::SdsSourceFile::istio)
        });
        let (identity, rotator) = match &config.identity {
            Some(settings) => {
                let (handle, task) = start_identity(settings, sds.as_ref())?;
                (Some(handle), Some(task))
            }
            None => (None, None),
        };
        let clusters = Arc::new(ClusterManager::new(
            &config.clusters,
            &config.upstream_tls,
            identity.as_ref(),
        )?);
        // Listeners start once DNS-named clusters have their first answers.
        clusters.dns_warmed().await;
        let tracker = Arc::new(ConnectionTracker::default());
        let local_id = config.identity.as_ref().map(|i| Arc::new(i.id.clone()));
        let telemetry = crate::telemetry::TelemetryHub::from_config(
            &config.source.telemetry,
            local_id.as_deref(),
            envoy_node(&config.source),
        )
        .context("cannot start telemetry")?;
        let overload = crate::overload::Overload::new(&config.source.overload);
        let listeners = Arc::new(ListenerManager::new(
            clusters.clone(),
            tracker.clone(),
            identity.clone(),
            local_id,
            config.drain_timeout,
            telemetry.clone(),
            overload.clone(),
        ));
        let hub = telemetry;
        if let Err(err) = listeners.apply(&config.listeners) {
            listeners.drain_all().await;
            listeners.force_all();
            if let Some(rotator) = rotator {
                rotator.abort();
            }
            return Err(err.into());
        }

        let state = Arc::new(AdminState {
            ready: Default::default(),
            drain: drain_tx.clone(),
            config: arc_swap::ArcSwap::from_pointee(config.clone()),
            identity: identity.clone(),
            dynamic: Default::default(),
            config_ready: AtomicBool::new(true),
            quit: quit_tx,
            config_note: Default::default(),
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

        let sampler = overload.start_sampler();
        let plan = crate::listener::drain::DrainPlan {
            timeout: config.drain_timeout,
            outbound_wait: config.source.outbound_drain_wait,
        };
        let supervisor = {
            let listeners = listeners.clone();
            let state = state.clone();
            tokio::spawn(async move {
                let mut drain_rx = drain_rx;
                // Wait for the drain; a dropped sender cannot happen while `state` lives.
                while !*drain_rx.borrow_and_update() {
                    if drain_rx.changed().await.is_err() {
                        break;
                    }
                }
                tracing::info!(timeout = ?plan.timeout, outbound_wait = ?plan.outbound_wait, "draining");
                tokio::select! {
                    _ = crate::listener::drain::run(&listeners, &tracker, plan) => {}
                    _ = crate::listener::signalled(quit_rx) => {
                        tracing::info!("quitting at once");
                        listeners.force_all();
                    }
                }
                reaper.abort();
                readiness.abort();
                if let Some(sampler) = sampler {
                    sampler.abort();
                }
                if let Some(rotator) = rotator {
                    rotator.abort();
                }
                admin_task.abort();
                drop(state);
                // The last calls' lines must not die with the process.
                if let Some(log) = &hub.access_log {
                    let log = log.clone();
                    let _ = tokio::task::spawn_blocking(move || log.flush()).await;
                }
                tracing::info!("drained");
            })
        };

        let runtime = Arc::new(Runtime {
            listeners,
            clusters,
            admin: state,
        });
        let xds_task = match &config.source.xds {
            Some(xds) => Some(start_xds(
                xds,
                &config.source,
                runtime.clone(),
                sds.zip(sds_names),
                tls_names,
            )?),
            None => {
                crate::xds::report_config_source(Some("static"));
                None
            }
        };
        let supervisor = tokio::spawn(async move {
            let _ = supervisor.await;
            if let Some(task) = xds_task {
                task.abort();
            }
        });
        Ok(Proxy {
            admin_addr,
            drain: drain_tx,
            supervisor,
            identity,
            runtime,
        })
    }

    /// The bound address of a listener.
    pub fn listener_addr(&self, name: &str) -> Option<SocketAddr> {
        self.runtime.listeners.addr(name)
    }

    /// What a config source (xDS) uses to change the running config.
    pub fn runtime(&self) -> Arc<Runtime> {
        self.runtime.clone()
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
    sds: Option<&Arc<SdsSource>>,
) -> anyhow::Result<(Arc<IdentityHandle>, JoinHandle<()>)> {
    use crate::config::IdentitySource;
    let source: Arc<dyn CertSource> = match &settings.source {
        IdentitySource::Sds(_) => match sds {
            Some(sds) => sds.clone(),
            None => anyhow::bail!("an SDS identity needs the xDS control plane"),
        },
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

/// The node this proxy reports as, to the control plane and the
/// access-log collector.
pub fn envoy_node(file: &crate::config::ConfigFile) -> postern_xds::Node {
    use postern_proto::google::protobuf::{value::Kind, Struct, Value};
    let node_file = file.node.clone().unwrap_or_default();
    let metadata = (!node_file.metadata.is_empty()).then(|| Struct {
        fields: node_file
            .metadata
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    Value {
                        kind: Some(Kind::StringValue(v.clone())),
                    },
                )
            })
            .collect(),
    });
    postern_xds::Node {
        id: node_file.id.clone(),
        cluster: node_file.cluster.clone(),
        metadata,
        user_agent_name: "postern".into(),
        ..Default::default()
    }
}

/// Starts the ADS client that feeds `runtime` from the control plane.
fn start_xds(
    xds: &crate::config::file::XdsFile,
    file: &crate::config::ConfigFile,
    runtime: Arc<Runtime>,
    sds: Option<(Arc<SdsSource>, crate::config::file::SdsSourceFile)>,
    tls_names: Option<crate::config::file::SdsSourceFile>,
) -> anyhow::Result<JoinHandle<()>> {
    let node = envoy_node(file);
    let mut client_config = postern_xds::ClientConfig::new(xds.address.clone(), node);
    client_config.protocol = match xds.protocol {
        crate::config::file::XdsProtocolFile::Sotw => postern_xds::Protocol::StateOfTheWorld,
        crate::config::file::XdsProtocolFile::Delta => postern_xds::Protocol::Delta,
    };
    client_config.initial_backoff = xds.initial_backoff;
    client_config.max_backoff = xds.max_backoff;
    let read = |path: &std::path::PathBuf| {
        std::fs::read(path).with_context(|| format!("reading {}", path.display()))
    };
    if let Some(ca) = &xds.ca_cert {
        let identity = match (&xds.client_cert, &xds.client_key) {
            (Some(cert), Some(key)) => Some((read(cert)?, read(key)?)),
            _ => None,
        };
        client_config.tls = Some(postern_xds::TlsSettings {
            ca_pem: read(ca)?,
            identity,
            domain: None,
        });
    }
    client_config.validate()?;
    // The handler merges dynamic resources into the static part of the
    // file (its xds and node sections stay, so the whole still validates).
    let base = file.clone();
    let handler = crate::xds::XdsHandler::new(base, runtime, sds, tls_names);
    let client = postern_xds::XdsClient::new(client_config, handler.clone());
    handler.attach(client.subscriptions(), client.status());
    handler.start_fallback(xds.initial_fetch_timeout);
    tracing::info!(address = %xds.address, "connecting to the xDS control plane");
    Ok(tokio::spawn(client.run()))
}

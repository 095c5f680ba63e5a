//! `postern demo`: a small mesh in one process, to try Postern with nothing
//! to install.
//!
//! [`Demo::start`] runs the reference control plane of `postern-control`
//! (ADS from a watched mesh file, its CA, its access-log collector), the
//! example apps `frontend`, `reviews-v1` and `reviews-v2` ([`apps`]), and a
//! sidecar for each app. A sidecar starts from a bootstrap file alone: its
//! node id, the control plane, and an identity the CA issues for a token.
//! Its listeners, routes, clusters, mTLS, RBAC and rate limit all come over
//! xDS from the mesh file ([`mesh`]).
//!
//! Boundaries: everything shares one process, and so one metrics registry
//! (every admin port's `/metrics` shows all three sidecars, told apart by
//! their `reporter` and workload labels) and one log. Real deployments run
//! one proxy per workload.

pub mod apps;
pub mod mesh;

use std::net::{SocketAddr, TcpListener as StdTcpListener};
use std::path::{Path, PathBuf};
use std::time::Duration;

use postern_certs::{SpiffeId, SpiffeIdError};
use postern_control::ads::AdsServer;
use postern_control::als::AlsServer;
use postern_control::app::serve;
use postern_control::ca::{Authenticator, Ca, CaError, CaService};
use postern_control::mesh::{load_mesh, watch_mesh, MeshError};
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use crate::app::Proxy;
use crate::config::{BootstrapOverrides, Config, ConfigError};
use crate::sidecar::wait_ready::{wait_ready, WaitReadyError};
use mesh::{Addresses, BootstrapPaths, Workload, FRONTEND, REVIEWS, TOP_LIMIT_SECONDS};

/// The demo's log filter when neither `--log-level` nor `RUST_LOG` gives
/// one: the help text is the demo's interface, and routine lines would bury
/// it. Warnings (RBAC denials among them) and mesh file changes still show.
pub const LOG_FILTER: &str = "warn,postern_control::mesh=info";

/// How long each sidecar may take to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How often the control plane prints its access-log summary (when calls
/// came in).
const ALS_SUMMARY_INTERVAL: Duration = Duration::from_secs(5);
/// How often the mesh file is checked for changes.
const MESH_POLL: Duration = Duration::from_secs(1);

/// Where the demo listens. Port 0 anywhere picks a free port.
#[derive(Debug, Clone, Copy)]
pub struct DemoOptions {
    /// The edge listener on the frontend's sidecar (default
    /// `127.0.0.1:10000`).
    pub listen: SocketAddr,
    /// The frontend sidecar's admin server (default `127.0.0.1:15000`); the
    /// reviews sidecars take the next two ports (free ones with port 0).
    pub admin: SocketAddr,
    /// The control plane: ADS, the CA and the access-log collector
    /// (default `127.0.0.1:15010`).
    pub control_plane: SocketAddr,
}

impl Default for DemoOptions {
    fn default() -> Self {
        let at = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
        DemoOptions {
            listen: at(10000),
            admin: at(15000),
            control_plane: at(15010),
        }
    }
}

/// Why the demo could not start or stop cleanly.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// The working directory (mesh, bootstraps, tokens) could not be made.
    #[error("cannot create the demo's working directory")]
    WorkDir(#[source] std::io::Error),
    /// A file in the working directory could not be written.
    #[error("cannot write {}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// An address is taken (often by another demo).
    #[error("cannot listen on {addr} for {what}{}", flag_hint(*flag))]
    Bind {
        /// What was to listen there.
        what: String,
        /// The address.
        addr: SocketAddr,
        /// The flag that sets it, if one does.
        flag: Option<&'static str>,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// An example app could not listen.
    #[error("cannot start the {app} app")]
    App {
        /// The app.
        app: &'static str,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The CA or its token table could not be made.
    #[error("cannot set up the mesh CA")]
    Ca(#[source] CaError),
    /// A workload's SPIFFE ID is invalid (a bug in the demo's constants).
    #[error("invalid SPIFFE ID for {node}")]
    Identity {
        /// The workload's node id.
        node: &'static str,
        /// Why the ID is invalid.
        #[source]
        source: SpiffeIdError,
    },
    /// The generated mesh file does not load.
    #[error("the demo mesh is invalid")]
    Mesh(#[source] MeshError),
    /// A generated bootstrap does not load.
    #[error("the {node} sidecar's bootstrap is invalid")]
    Bootstrap {
        /// The sidecar's node id.
        node: &'static str,
        /// What is wrong.
        #[source]
        source: ConfigError,
    },
    /// A sidecar failed to start or to stop.
    #[error("the {node} sidecar failed")]
    Sidecar {
        /// The sidecar's node id.
        node: &'static str,
        /// What failed.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A sidecar did not become ready in time.
    #[error("the {node} sidecar did not become ready")]
    NotReady {
        /// The sidecar's node id.
        node: &'static str,
        /// What its admin server last said.
        #[source]
        source: WaitReadyError,
    },
    /// The control plane's gRPC server failed.
    #[error("the control plane failed")]
    ControlPlane(#[source] tonic::transport::Error),
    /// The control plane's task panicked or was cancelled.
    #[error("the control plane stopped unexpectedly")]
    ControlPlaneTask(#[source] tokio::task::JoinError),
}

fn flag_hint(flag: Option<&str>) -> String {
    flag.map(|flag| format!("; choose another address with {flag}"))
        .unwrap_or_default()
}

/// A running demo: control plane, apps and sidecars.
#[derive(Debug)]
pub struct Demo {
    addresses: Addresses,
    help: String,
    sidecars: Vec<(&'static str, Proxy)>,
    control_plane: Option<ControlPlane>,
    apps: Tasks,
    drain: watch::Sender<bool>,
    /// Holds the mesh, bootstraps, tokens and root; removed on drop.
    dir: tempfile::TempDir,
}

#[derive(Debug)]
struct ControlPlane {
    stop: oneshot::Sender<()>,
    server: JoinHandle<Result<(), tonic::transport::Error>>,
    /// The mesh file watcher and the summary printer.
    helpers: Tasks,
}

/// Tasks that run until their owner is dropped.
#[derive(Debug, Default)]
struct Tasks(Vec<JoinHandle<()>>);

impl Drop for Tasks {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

impl Demo {
    /// Starts everything and returns once every sidecar is ready, so the
    /// help text's commands work at once. On failure nothing is left
    /// running.
    ///
    /// # Errors
    ///
    /// [`DemoError::Bind`] when an address is taken, naming the flag that
    /// changes it; the other variants when a part fails to start.
    pub async fn start(options: DemoOptions) -> Result<Demo, DemoError> {
        let dir = tempfile::Builder::new()
            .prefix("postern-demo-")
            .tempdir()
            .map_err(DemoError::WorkDir)?;

        // Every port first, so a taken one fails at once and says which
        // flag moves it.
        let control_plane_error = |source| DemoError::Bind {
            what: "the control plane".into(),
            addr: options.control_plane,
            flag: Some("--control-plane"),
            source,
        };
        let control_plane_listener = TcpListener::bind(options.control_plane)
            .await
            .map_err(control_plane_error)?;
        let control_plane = control_plane_listener
            .local_addr()
            .map_err(control_plane_error)?;
        let edge = reserve("the edge listener", options.listen, Some("--listen"))?;
        let frontend_admin = reserve(
            "the frontend sidecar's admin",
            options.admin,
            Some("--admin"),
        )?;
        let mut reviews_admin = [options.admin; 2];
        let mut reviews_inbound = [options.admin; 2];
        for (i, reviews) in REVIEWS.iter().enumerate() {
            let what = format!("the {} sidecar's admin", reviews.node);
            // Next to the frontend's, so they are easy to guess; free
            // ones when the frontend's is.
            let offset = u16::try_from(i + 1).unwrap_or(u16::MAX);
            let port = match options.admin.port() {
                0 => 0,
                port => port.checked_add(offset).unwrap_or(0),
            };
            reviews_admin[i] = reserve(
                &what,
                SocketAddr::new(options.admin.ip(), port),
                Some("--admin"),
            )?;
            // Inbound listeners are the mesh's business: any free port.
            let what = format!("the {} sidecar's inbound listener", reviews.node);
            reviews_inbound[i] = reserve(&what, SocketAddr::from(([127, 0, 0, 1], 0)), None)?;
        }

        let mut apps = Tasks::default();
        let frontend_app = start_app(&FRONTEND, &mut apps).await?;
        let mut reviews_apps = [frontend_app; 2];
        for (i, reviews) in REVIEWS.iter().enumerate() {
            reviews_apps[i] = start_app(reviews, &mut apps).await?;
        }
        let addresses = Addresses {
            control_plane,
            edge,
            frontend_app,
            frontend_admin,
            reviews_apps,
            reviews_inbound,
            reviews_admin,
        };

        let (drain, _) = watch::channel(false);
        let mut demo = Demo {
            addresses,
            help: String::new(),
            sidecars: Vec::new(),
            control_plane: None,
            apps,
            drain,
            dir,
        };
        match demo.start_mesh(control_plane_listener).await {
            Ok(()) => {
                demo.help = help(&demo.addresses, demo.dir.path());
                Ok(demo)
            }
            Err(err) => {
                // What did start must not outlive the failure; a second
                // error while stopping would only hide the first.
                let _ = demo.stop().await;
                Err(err)
            }
        }
    }

    /// The control plane, then the sidecars; returns once they are ready.
    async fn start_mesh(&mut self, listener: TcpListener) -> Result<(), DemoError> {
        let dir = self.dir.path().to_owned();
        let workloads = [
            (FRONTEND, self.addresses.frontend_admin),
            (REVIEWS[0], self.addresses.reviews_admin[0]),
            (REVIEWS[1], self.addresses.reviews_admin[1]),
        ];

        // The CA, its root for the sidecars' trust bundle, and one token
        // per sidecar: the CA issues a workload's identity to its token
        // alone.
        let ca = Ca::self_signed(mesh::TRUST_DOMAIN).map_err(DemoError::Ca)?;
        let root = dir.join("root.pem");
        write(&root, ca.root_pem())?;
        let mut tokens = Vec::new();
        for (workload, _) in &workloads {
            let token = format!("{:032x}", rand::random::<u128>());
            write(&dir.join(format!("{}.token", workload.node)), &token)?;
            let id =
                SpiffeId::parse(&workload.spiffe_id()).map_err(|source| DemoError::Identity {
                    node: workload.node,
                    source,
                })?;
            tokens.push((token, id));
        }
        let authenticator = Authenticator::new(tokens).map_err(DemoError::Ca)?;

        let mesh_path = dir.join("mesh.yaml");
        write(&mesh_path, &mesh::mesh_yaml(&self.addresses))?;
        let ads = AdsServer::new();
        ads.set_snapshot(load_mesh(&mesh_path).map_err(DemoError::Mesh)?);
        let als = AlsServer::new();
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(serve(
            listener,
            ads.clone(),
            Some(als.clone()),
            Some(CaService::new(ca, authenticator)),
            async {
                let _ = stopped.await;
            },
        ));
        self.control_plane = Some(ControlPlane {
            stop,
            server,
            helpers: Tasks(vec![
                tokio::spawn(watch_mesh(mesh_path, ads, MESH_POLL)),
                tokio::spawn(als.print_summaries(ALS_SUMMARY_INTERVAL)),
            ]),
        });

        let control_plane = self.addresses.control_plane;
        for (workload, admin) in &workloads {
            let node = workload.node;
            let bootstrap = dir.join(format!("{node}.yaml"));
            let token = dir.join(format!("{node}.token"));
            let paths = BootstrapPaths {
                token: &token,
                root: &root,
            };
            write(
                &bootstrap,
                &mesh::bootstrap_yaml(workload, *admin, control_plane, paths),
            )?;
            // What `postern run --config FILE` does.
            let config = Config::from_bootstrap(Some(&bootstrap), &BootstrapOverrides::default())
                .map_err(|source| DemoError::Bootstrap { node, source })?;
            let proxy = Proxy::start(config)
                .await
                .map_err(|source| DemoError::Sidecar {
                    node,
                    source: source.into(),
                })?;
            self.sidecars.push((node, proxy));
        }
        for (node, proxy) in &self.sidecars {
            wait_ready(proxy.admin_addr(), READY_TIMEOUT)
                .await
                .map_err(|source| DemoError::NotReady { node, source })?;
        }
        Ok(())
    }

    /// What to try, with the real addresses.
    pub fn help(&self) -> &str {
        &self.help
    }

    /// Where everything listens.
    pub fn addresses(&self) -> &Addresses {
        &self.addresses
    }

    /// Asks the demo to stop: [`Demo::wait`] then drains the sidecars and
    /// stops the control plane.
    pub fn drain(&self) {
        self.drain.send_replace(true);
    }

    /// Resolves once [`Demo::drain`] has been called.
    pub async fn drained_started(&self) {
        let mut drain = self.drain.subscribe();
        // The sender lives in `self`, so this ends only when drain is set.
        let _ = drain.wait_for(|draining| *draining).await;
    }

    /// Waits for [`Demo::drain`], then stops everything: the sidecars drain
    /// first, so calls in flight finish while the control plane and the
    /// apps still answer; then those stop and the working directory is
    /// removed.
    ///
    /// # Errors
    ///
    /// The first part that did not stop cleanly.
    pub async fn wait(mut self) -> Result<(), DemoError> {
        self.drained_started().await;
        self.stop().await
    }

    async fn stop(&mut self) -> Result<(), DemoError> {
        for (_, proxy) in &self.sidecars {
            proxy.drain();
        }
        let stopped = futures_util::future::join_all(
            std::mem::take(&mut self.sidecars)
                .into_iter()
                .map(|(node, proxy)| async move { (node, proxy.wait().await) }),
        )
        .await;
        let mut result = Ok(());
        for (node, outcome) in stopped {
            if let Err(source) = outcome {
                result = result.and(Err(DemoError::Sidecar {
                    node,
                    source: source.into(),
                }));
            }
        }
        if let Some(control_plane) = self.control_plane.take() {
            drop(control_plane.helpers);
            // The server may be gone already; then there is nothing to stop.
            let _ = control_plane.stop.send(());
            let served = match control_plane.server.await {
                Ok(served) => served.map_err(DemoError::ControlPlane),
                Err(err) => Err(DemoError::ControlPlaneTask(err)),
            };
            result = result.and(served);
        }
        // Dropping the old set aborts the apps.
        self.apps = Tasks::default();
        result
    }
}

/// Starts `workload`'s app on a free loopback port; `tasks` keeps it.
async fn start_app(workload: &Workload, tasks: &mut Tasks) -> Result<SocketAddr, DemoError> {
    let (listener, addr) = apps::bind().await.map_err(|source| DemoError::App {
        app: workload.node,
        source,
    })?;
    tasks.0.push(apps::spawn(workload.node, listener));
    Ok(addr)
}

/// Checks that `addr` is free (or picks a free port for port 0) and frees
/// it again for its owner, which binds it moments later: the window for a
/// clash is tiny, and a clash fails loudly.
fn reserve(
    what: &str,
    addr: SocketAddr,
    flag: Option<&'static str>,
) -> Result<SocketAddr, DemoError> {
    let bind_error = |source| DemoError::Bind {
        what: what.to_owned(),
        addr,
        flag,
        source,
    };
    StdTcpListener::bind(addr)
        .and_then(|listener| listener.local_addr())
        .map_err(bind_error)
}

fn write(path: &Path, contents: &str) -> Result<(), DemoError> {
    std::fs::write(path, contents).map_err(|source| DemoError::Write {
        path: path.to_owned(),
        source,
    })
}

/// The text `postern demo` prints once everything is ready.
fn help(at: &Addresses, dir: &Path) -> String {
    let edge = at.edge;
    let frontend_admin = at.frontend_admin;
    let [v1_admin, _] = at.reviews_admin;
    let mut text = format!(
        "Postern demo: a control plane, two services and their sidecars, all in this process.\n\
         \n\
         \x20 control plane  {cp}  ADS from the mesh file, a CA for spiffe://{td}, the access-log collector\n\
         \x20 {frontend:<13}  app {app}  sidecar admin {frontend_admin}  edge {edge}\n",
        cp = at.control_plane,
        td = mesh::TRUST_DOMAIN,
        frontend = FRONTEND.node,
        app = at.frontend_app,
    );
    for (i, reviews) in REVIEWS.iter().enumerate() {
        text.push_str(&format!(
            "  {node:<13}  app {app}  sidecar admin {admin}  inbound {inbound} (mTLS only)\n",
            node = reviews.node,
            app = at.reviews_apps[i],
            admin = at.reviews_admin[i],
            inbound = at.reviews_inbound[i],
        ));
    }
    text.push_str(&format!(
        "\n\
         \x20 Mesh: {mesh} (edit it: each save is pushed to the sidecars)\n\
         \x20 Sidecar bootstraps: {dir}/{{{f},{v1},{v2}}}.yaml\n\
         \n\
         Try:\n\
         \x20 curl -s http://{edge}/reviews/1                 # reviews-v1 or -v2 (80/20) over mTLS; the reply names the caller\n\
         \x20 for i in 1 2 3 4 5 6 7 8 9 10; do curl -s http://{edge}/reviews/1 | head -1; done   # the split\n\
         \x20 curl -s -H 'x-canary: 1' http://{edge}/reviews/1   # always reviews-v2\n\
         \x20 curl -si http://{edge}/reviews/admin            # 403: RBAC at the reviews sidecar\n\
         \x20 curl -si http://{edge}/reviews/top; curl -si http://{edge}/reviews/top   # 200, then 429: one call per {TOP_LIMIT_SECONDS}s\n\
         \x20 curl -s http://{v1_admin}/metrics | grep istio_requests_total   # calls with both sides' SPIFFE IDs\n\
         \x20 curl -s http://{frontend_admin}/config_dump      # what the control plane pushed\n\
         \x20 curl -s http://{frontend_admin}/certs            # the frontend's certificate from the CA\n\
         \x20 curl -sv http://{inbound}/reviews/1              # refused: plaintext never reaches reviews\n\
         \n\
         The control plane prints an access-log summary every {als}s while calls come in.\n\
         The sidecars share this process's metrics: reporter=\"source\" is the frontend's view, \"destination\" the reviews'.\n\
         Ctrl-C stops everything.\n",
        mesh = dir.join("mesh.yaml").display(),
        dir = dir.display(),
        f = FRONTEND.node,
        v1 = REVIEWS[0].node,
        v2 = REVIEWS[1].node,
        inbound = at.reviews_inbound[0],
        als = ALS_SUMMARY_INTERVAL.as_secs(),
    ));
    text
}

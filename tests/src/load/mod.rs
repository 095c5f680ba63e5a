//! A mixed load against the real `postern` binary while its config and
//! certificates change under it, and the ledger check that nothing was lost,
//! duplicated or corrupted on the way (issue #8, items 6 and 8).
//!
//! One run: a CA (short-lived certificates, renewed by the proxy and by the
//! upstreams), two equivalent upstreams ([`upstream`]), the reference
//! control plane pushing routes and endpoints every `push_every`, the
//! binary started from a bootstrap file, and clients ([`client`]) sending
//! HTTP/1.1, HTTP/2, gRPC and TCP requests, each with its own id. Large
//! bodies go once each at the start. At the end the binary is sent SIGTERM
//! with a request in flight and must drain and exit 0. [`Report::problems`]
//! then compares what the clients sent and got with what the upstreams saw.
//!
//! The CI suite (`tests/integrity.rs`) and the soak (`examples/soak.rs`,
//! `bench/soak.sh`) both call [`run`]; only the settings differ.

pub mod body;
pub mod client;
pub mod upstream;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use postern_certs::source::IssueRequest;
use postern_certs::{
    IdentityHandle, IstioCaSettings, IstioCaSource, RotationPolicy, Rotator, SpiffeId,
};
use postern_control::ads::{AdsEventKind, Snapshot};
use postern_control::mesh::parse_mesh;

use crate::control::ControlPlane;
use crate::mesh::CaServer;
use client::{HttpCall, Journal, Outcome, Proto};
use upstream::{Ledger, Upstream};

/// The proxy's SPIFFE ID.
pub const PROXY_ID: &str = "spiffe://cluster.local/ns/load/sa/postern";
/// The upstreams' SPIFFE ID.
pub const UPSTREAM_ID: &str = "spiffe://cluster.local/ns/load/sa/upstream";

/// What each push changes (both by default).
#[derive(Debug, Clone, Copy)]
pub struct Changes {
    /// Route order, weights and the version route (RDS).
    pub routes: bool,
    /// Every cluster's endpoint, moved to the other upstream (EDS).
    pub endpoints: bool,
}

/// What to run.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    /// What each push changes.
    pub changes: Changes,
    /// The `postern` binary.
    pub postern: PathBuf,
    /// How long the mixed load runs before the drain.
    pub duration: Duration,
    /// Size of each large body (sent once per protocol at the start).
    pub big_bytes: u64,
    /// Time between config pushes.
    pub push_every: Duration,
    /// Lifetime of every certificate the CA issues; both sides renew at half.
    pub cert_lifetime: Duration,
    /// HTTP/1.1 clients (one keep-alive connection each).
    pub http1_clients: usize,
    /// Concurrent streams of the HTTP/2 client.
    pub http2_streams: usize,
    /// gRPC clients (one chat at a time each).
    pub grpc_clients: usize,
    /// TCP clients (one connection per request).
    pub tcp_clients: usize,
    /// Time between RSS and FD samples of the proxy.
    pub sample_every: Duration,
    /// Body size of the request in flight when SIGTERM is sent.
    pub drain_probe_bytes: u64,
    /// Where the proxy's log goes (a temporary file when `None`).
    pub log_file: Option<PathBuf>,
    /// How long after the load starts the large transfers may still run;
    /// past it [`run`] fails, naming the requests still in flight. `None`
    /// waits as long as they take.
    pub give_up_after: Option<Duration>,
}

impl LoadConfig {
    /// Settings for a run of `duration` against the binary at `postern`.
    pub fn new(postern: PathBuf, duration: Duration) -> Self {
        LoadConfig {
            changes: Changes {
                routes: true,
                endpoints: true,
            },
            postern,
            duration,
            big_bytes: 64 << 20,
            push_every: Duration::from_millis(100),
            cert_lifetime: Duration::from_secs(4),
            http1_clients: 2,
            http2_streams: 4,
            grpc_clients: 1,
            tcp_clients: 2,
            sample_every: Duration::from_secs(1),
            drain_probe_bytes: 16 << 20,
            log_file: None,
            give_up_after: None,
        }
    }
}

/// The binary's path next to the running test or example (`target/<profile>/postern`),
/// unless `POSTERN_BIN` names one.
pub fn default_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("POSTERN_BIN") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test> or target/<profile>/examples/<example>.
    let profile_dir = exe
        .parent()
        .and_then(|p| p.parent())
        .expect("target profile directory");
    profile_dir.join("postern")
}

/// One sample of the proxy's resources.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    /// Seconds since the load started.
    pub at: f64,
    /// Resident set size, bytes.
    pub rss: u64,
    /// Open file descriptors.
    pub fds: u64,
}

/// A large transfer and how long it took.
#[derive(Debug, Clone)]
pub struct BigTransfer {
    /// Request id (names the protocol).
    pub id: String,
    /// Bytes sent plus bytes received.
    pub bytes: u64,
    /// Wall time.
    pub took: Duration,
}

/// Everything a run measured; [`Report::problems`] says what went wrong.
#[derive(Debug)]
pub struct Report {
    /// What the clients saw, one entry per request id.
    pub outcomes: Vec<Outcome>,
    /// What the upstreams saw, per request id.
    pub arrivals: std::collections::HashMap<String, Vec<upstream::Arrival>>,
    /// Config versions pushed, ACKed and NACKed (with the NACK messages).
    pub pushes: u64,
    /// ACKs of any type received by the control plane.
    pub acks: u64,
    /// NACK messages.
    pub nacks: Vec<String>,
    /// Distinct client certificates of the proxy the upstreams were shown.
    pub proxy_certificates: usize,
    /// mTLS handshakes the upstreams completed.
    pub handshakes: u64,
    /// Of those, resumed sessions (no certificate presented).
    pub resumed: u64,
    /// Certificates the upstreams installed (their own rotations).
    pub upstream_rotations: u64,
    /// Resource samples of the proxy.
    pub samples: Vec<Sample>,
    /// The large transfers.
    pub big: Vec<BigTransfer>,
    /// Whether the listener closed after SIGTERM while a request was held
    /// in flight, and that request then completed.
    pub drain_probe: Result<(), String>,
    /// Time from SIGTERM until the listener refused connections.
    pub listener_closed: Option<Duration>,
    /// The exit code after SIGTERM, and the time from SIGTERM to exit.
    pub exit: Result<(i32, Duration), String>,
    /// How long the load ran.
    pub elapsed: Duration,
    /// The proxy's log lines at warn or error level.
    pub warnings: Vec<String>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The addresses of one upstream.
#[derive(Debug, Clone, Copy)]
struct Ends {
    plain: SocketAddr,
    tls: SocketAddr,
    tcp: SocketAddr,
}

impl From<&Upstream> for Ends {
    fn from(u: &Upstream) -> Self {
        Ends {
            plain: u.plain,
            tls: u.tls,
            tcp: u.tcp,
        }
    }
}

/// The mesh of push `version`: odd and even versions are equivalent configs
/// with the routes in the other order, other weights and the endpoints of
/// every cluster on the other upstream. A route naming the version makes
/// each push a real change.
fn mesh_yaml(version: u64, a: Ends, b: Ends, changes: Changes) -> String {
    let odd = version % 2 == 1;
    let flip = odd && changes.routes;
    let (x, y) = if odd && changes.endpoints {
        (b, a)
    } else {
        (a, b)
    };
    let marker = if changes.routes { version } else { 0 };
    let (w1, w2, w3, w4) = if flip {
        (30, 70, 40, 60)
    } else {
        (50, 50, 70, 30)
    };
    let grpc = if flip { "mesh-alt" } else { "mesh" };
    // No route deadline (`timeout: 0s`, as Istio sets by default): the
    // default 15 s runs from the request's start, so a large upload on a
    // busy machine would end in a 504 that says nothing about integrity.
    let mut routes = [
        format!("{{ prefix: /h1/, timeout: 0s, weighted: [{{ cluster: plain, weight: {w1} }}, {{ cluster: mesh, weight: {w2} }}] }}"),
        format!("{{ prefix: /h2/, timeout: 0s, weighted: [{{ cluster: mesh, weight: {w3} }}, {{ cluster: mesh-alt, weight: {w4} }}] }}"),
        format!("{{ prefix: /postern.test.echo.Echo/, timeout: 0s, cluster: {grpc} }}"),
    ];
    if flip {
        routes.reverse();
    }
    let routes: String = routes
        .iter()
        .map(|r| format!("          - {r}\n"))
        .collect();
    format!(
        r#"
listeners:
  - name: load-http
    address: 127.0.0.1:0
    route: load-routes
  - name: load-tcp
    address: 127.0.0.1:0
    tcp: {{ cluster: tcp }}
routes:
  - name: load-routes
    virtual_hosts:
      - name: load
        domains: ["*"]
        routes:
          - {{ path: /push/{marker}, cluster: plain }}
{routes}services:
  - name: plain
    endpoints: [{{ address: "{}" }}]
  - name: mesh
    endpoints: [{{ address: "{}" }}]
    tls: {{ identities: [{UPSTREAM_ID}] }}
  - name: mesh-alt
    endpoints: [{{ address: "{}" }}]
    tls: {{ identities: [{UPSTREAM_ID}] }}
  - name: tcp
    endpoints: [{{ address: "{}" }}]
    tls: {{ identities: [{UPSTREAM_ID}] }}
"#,
        x.plain, x.tls, y.tls, x.tcp
    )
}

fn snapshot(version: u64, a: Ends, b: Ends, changes: Changes) -> Snapshot {
    parse_mesh(&mesh_yaml(version, a, b, changes), version.to_string()).expect("load mesh")
}

/// Keeps an identity for `id` from `ca` in a handle, renewed at half its
/// lifetime, for as long as the returned task runs.
async fn rotating_identity(
    ca: &CaServer,
    token: usize,
    id: &str,
    lifetime: Duration,
) -> anyhow::Result<(Arc<IdentityHandle>, tokio::task::JoinHandle<()>)> {
    let source = IstioCaSource::new(IstioCaSettings {
        address: ca.address.clone(),
        ca_cert_pem: None,
        token_file: Some(ca.token_files[token].clone()),
        trust_bundle: None,
        cluster_id: None,
        timeout: Duration::from_secs(5),
    })?;
    let handle = IdentityHandle::new();
    let rotator = Rotator {
        source: Arc::new(source),
        request: IssueRequest {
            id: SpiffeId::parse(id)?,
            key_algorithm: postern_certs::KeyAlgorithm::default(),
            lifetime,
        },
        policy: RotationPolicy {
            renew_at: 0.5,
            jitter: 0.05,
            min_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
        },
        handle: handle.clone(),
    };
    let task = tokio::spawn(rotator.run());
    tokio::time::timeout(Duration::from_secs(10), handle.loaded())
        .await
        .context("the upstream identity never arrived from the CA")?;
    Ok((handle, task))
}

/// The running binary; killed if dropped before it exits.
struct Postern {
    child: tokio::process::Child,
    log: PathBuf,
    _log_guard: Option<tempfile::TempPath>,
    _config: tempfile::NamedTempFile,
}

/// Addresses the binary reported in its log.
struct Bound {
    admin: SocketAddr,
    http: SocketAddr,
    tcp: SocketAddr,
}

impl Postern {
    fn start(config: &LoadConfig, bootstrap: &str) -> anyhow::Result<Postern> {
        use std::io::Write as _;
        let mut file = tempfile::NamedTempFile::new()?;
        file.write_all(bootstrap.as_bytes())?;
        let (log, guard) = match &config.log_file {
            Some(path) => (path.clone(), None),
            None => {
                let temp = tempfile::NamedTempFile::new()?.into_temp_path();
                (temp.to_path_buf(), Some(temp))
            }
        };
        let stderr = std::fs::File::create(&log)?;
        let child = tokio::process::Command::new(&config.postern)
            .args(["--log-format", "json", "run", "--config"])
            .arg(file.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("spawn {}", config.postern.display()))?;
        Ok(Postern {
            child,
            log,
            _log_guard: guard,
            _config: file,
        })
    }

    fn pid(&self) -> u32 {
        self.child.id().unwrap_or(0)
    }

    fn log_lines(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for the log lines naming the admin and listener addresses.
    async fn bound(&mut self) -> anyhow::Result<Bound> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("postern exited with {status}: {}", self.log_text());
            }
            let mut admin = None;
            let mut listeners = BTreeMap::new();
            for line in self.log_lines() {
                let text = |k: &str| line.get(k).and_then(|v| v.as_str()).map(str::to_owned);
                match text("message").as_deref() {
                    Some("admin server listening") => admin = text("addr"),
                    Some("listening") => {
                        if let (Some(name), Some(addr)) = (text("listener"), text("addr")) {
                            listeners.insert(name, addr);
                        }
                    }
                    _ => {}
                }
            }
            let parse = |s: Option<&String>| s.and_then(|s| s.parse::<SocketAddr>().ok());
            if let (Some(admin), Some(http), Some(tcp)) = (
                parse(admin.as_ref()),
                parse(listeners.get("load-http")),
                parse(listeners.get("load-tcp")),
            ) {
                return Ok(Bound { admin, http, tcp });
            }
            if Instant::now() > deadline {
                bail!("postern never reported its listeners: {}", self.log_text());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn warnings(&self) -> Vec<String> {
        self.log_lines()
            .into_iter()
            .filter(|l| {
                matches!(
                    l.get("level").and_then(|v| v.as_str()),
                    Some("WARN" | "ERROR")
                )
            })
            .map(|l| l.to_string())
            .collect()
    }
}

async fn http_ready(admin: SocketAddr) -> bool {
    let Ok(Ok(response)) = tokio::time::timeout(Duration::from_secs(2), async {
        let mut conn = crate::H1Conn::connect(admin).await?;
        conn.send(
            crate::request("GET", "localhost", "/ready")
                .body(crate::empty())
                .expect("request"),
        )
        .await
    })
    .await
    else {
        return false;
    };
    response.status == 200
}

/// Runs the load of `config` and reports what happened.
///
/// # Errors
///
/// When the setup fails (CA, upstreams, control plane, binary start);
/// what goes wrong under load is in [`Report::problems`].
pub async fn run(config: &LoadConfig) -> anyhow::Result<Report> {
    let ca = CaServer::start(
        "cluster.local",
        config.cert_lifetime,
        &[PROXY_ID, UPSTREAM_ID],
    )
    .await;
    let (upstream_identity, rotation) =
        rotating_identity(&ca, 1, UPSTREAM_ID, config.cert_lifetime).await?;
    let ledger = Arc::new(Ledger::default());
    let a = Upstream::start("a", ledger.clone(), upstream_identity.clone(), PROXY_ID).await;
    let b = Upstream::start("b", ledger.clone(), upstream_identity.clone(), PROXY_ID).await;

    let (ends_a, ends_b) = (Ends::from(&a), Ends::from(&b));
    let cp = ControlPlane::start(snapshot(1, ends_a, ends_b, config.changes)).await;
    let acks = Arc::new(AtomicU64::new(0));
    let nacks: Arc<Mutex<Vec<String>>> = Arc::default();
    let mut events = cp.server.events();
    let event_task = {
        let (acks, nacks) = (acks.clone(), nacks.clone());
        tokio::spawn(async move {
            use tokio::sync::broadcast::error::RecvError;
            loop {
                match events.recv().await {
                    Ok(event) => match event.kind {
                        AdsEventKind::Ack { .. } => {
                            acks.fetch_add(1, Ordering::Relaxed);
                        }
                        AdsEventKind::Nack { error, .. } => {
                            lock(&nacks).push(format!("{}: {error}", event.type_url));
                        }
                        _ => {}
                    },
                    Err(RecvError::Lagged(_)) => continue,
                    Err(RecvError::Closed) => return,
                }
            }
        })
    };

    let lifetime = humantime_secs(config.cert_lifetime);
    let bootstrap = format!(
        r#"
admin: {{ address: "127.0.0.1:0" }}
node: {{ id: "sidecar~127.0.0.1~load.default~default.svc.cluster.local", cluster: load }}
xds: {{ address: "{cp}", initial_backoff: 50ms, max_backoff: 500ms }}
drain_timeout: 60s
outbound_drain_wait: 1s
identity:
  spiffe_id: {PROXY_ID}
  lifetime: {lifetime}
  renew_at: 0.5
  source:
    istio_ca: {{ address: "{ca_addr}", token_file: "{token}", trust_bundle: "{root}" }}
"#,
        cp = cp.url(),
        ca_addr = ca.address,
        token = ca.token_files[0].display(),
        root = ca.root_file.display(),
    );
    let mut postern = Postern::start(config, &bootstrap)?;
    let bound = postern.bound().await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !http_ready(bound.admin).await {
        if Instant::now() > deadline {
            bail!("postern never became ready: {}", postern.log_text());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let journal = Journal::new();
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = tokio::task::JoinSet::new();
    for i in 0..config.http1_clients {
        workers.spawn(client::http1_worker(
            bound.http,
            journal.clone(),
            stop.clone(),
            format!("h1-{i}"),
        ));
    }
    if config.http2_streams > 0 {
        workers.spawn(client::http2_worker(
            bound.http,
            journal.clone(),
            stop.clone(),
            "h2".into(),
            config.http2_streams,
        ));
    }
    for i in 0..config.grpc_clients {
        workers.spawn(client::grpc_worker(
            bound.http,
            journal.clone(),
            stop.clone(),
            format!("grpc-{i}"),
            8,
        ));
    }
    for i in 0..config.tcp_clients {
        workers.spawn(client::tcp_worker(
            bound.tcp,
            journal.clone(),
            stop.clone(),
            format!("tcp-{i}"),
        ));
    }

    // Config pushes, alternating equivalent meshes.
    let pushes = Arc::new(AtomicU64::new(1));
    let push_stop = Arc::new(AtomicBool::new(false));
    let pusher = {
        let (pushes, push_stop, server, every, changes) = (
            pushes.clone(),
            push_stop.clone(),
            cp.server.clone(),
            config.push_every,
            config.changes,
        );
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            while !push_stop.load(Ordering::Relaxed) {
                tick.tick().await;
                let version = pushes.fetch_add(1, Ordering::Relaxed) + 1;
                server.set_snapshot(snapshot(version, ends_a, ends_b, changes));
            }
        })
    };

    // Resource samples.
    let samples: Arc<Mutex<Vec<Sample>>> = Arc::default();
    let sampler = {
        let (samples, every, journal) = (samples.clone(), config.sample_every, journal.clone());
        let pid = postern.pid();
        tokio::spawn(async move {
            let probe = ProcProbe(pid);
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                match probe.sample(journal.elapsed().as_secs_f64()) {
                    Some(sample) => lock(&samples).push(sample),
                    None => return,
                }
            }
        })
    };

    // The large bodies, once each, while the rest goes on.
    let big = {
        let (journal, big_bytes, http, tcp) =
            (journal.clone(), config.big_bytes, bound.http, bound.tcp);
        tokio::spawn(async move { big_transfers(http, tcp, &journal, big_bytes).await })
    };

    tokio::time::sleep(config.duration).await;
    let big = match config.give_up_after {
        Some(limit) => {
            let left = limit.saturating_sub(journal.elapsed());
            match tokio::time::timeout(left, big).await {
                Ok(joined) => joined.context("large transfers")?,
                Err(_) => bail!(
                    "the large transfers were still running {limit:?} after the load started; in flight: {}",
                    in_flight_list(&journal)
                ),
            }
        }
        None => big.await.context("large transfers")?,
    };

    // The drain: no new request starts; one request is held in flight, half
    // its body sent, when SIGTERM arrives, and must then complete.
    stop.store(true, Ordering::Relaxed);
    let (open_gate, gate) = tokio::sync::oneshot::channel();
    let probe_call = HttpCall {
        id: "drain-probe".into(),
        proto: Proto::Http1Sized,
        len: config.drain_probe_bytes,
        reply_len: 1024,
        reply_sized: true,
        gate: Some(Arc::new(Mutex::new(Some(gate)))),
    };
    let probe = {
        let (journal, http) = (journal.clone(), bound.http);
        tokio::spawn(async move { client::http_once(http, &journal, probe_call).await })
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ledger.arrivals().contains_key("drain-probe") {
        if Instant::now() > deadline || probe.is_finished() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed = journal.elapsed();
    let term_at = Instant::now();
    let kill = tokio::process::Command::new("kill")
        .args(["-TERM", &postern.pid().to_string()])
        .status()
        .await
        .context("run kill")?;
    if !kill.success() {
        bail!("kill -TERM failed: {kill}");
    }
    push_stop.store(true, Ordering::Relaxed);
    // The listener closes while the probe is still held.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut listener_closed = None;
    while Instant::now() < deadline {
        if tokio::net::TcpStream::connect(bound.http).await.is_err() {
            listener_closed = Some(term_at.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let held = !probe.is_finished();
    let _ = open_gate.send(());
    let probe_ok = tokio::time::timeout(Duration::from_secs(60), probe).await;
    let drain_probe = match (probe_ok, listener_closed, held) {
        (_, None, _) => Err("the listener still accepted 10 s after SIGTERM".to_string()),
        (_, _, false) => Err("the request held in flight ended before it was let go".to_string()),
        (Ok(Ok(true)), Some(_), true) => Ok(()),
        (Ok(Ok(false)), ..) => Err("the request in flight at SIGTERM failed".to_string()),
        (Ok(Err(e)), ..) => Err(format!("the drain probe task failed: {e}")),
        (Err(_), ..) => Err("the request in flight at SIGTERM never finished".to_string()),
    };
    let joined = tokio::time::timeout(Duration::from_secs(60), async {
        while workers.join_next().await.is_some() {}
    })
    .await;
    let exit = match tokio::time::timeout(Duration::from_secs(70), postern.child.wait()).await {
        Ok(Ok(status)) => Ok((status.code().unwrap_or(-1), term_at.elapsed())),
        Ok(Err(e)) => Err(format!("wait: {e}")),
        Err(_) => Err("postern did not exit within 70 s of SIGTERM".to_string()),
    };
    pusher.abort();
    sampler.abort();
    event_task.abort();
    rotation.abort();
    let mut nacks = lock(&nacks).clone();
    if joined.is_err() {
        nacks.push(format!(
            "clients still running 60 s after SIGTERM; in flight: {}",
            in_flight_list(&journal)
        ));
    }
    let report = Report {
        outcomes: journal.outcomes(),
        arrivals: ledger.arrivals(),
        pushes: pushes.load(Ordering::Relaxed),
        acks: acks.load(Ordering::Relaxed),
        nacks,
        proxy_certificates: ledger.client_certificates(),
        handshakes: ledger.handshakes(),
        resumed: ledger.resumed(),
        upstream_rotations: upstream_identity.generation(),
        samples: lock(&samples).clone(),
        big,
        drain_probe,
        listener_closed,
        exit,
        elapsed,
        warnings: postern.warnings(),
    };
    Ok(report)
}

struct ProcProbe(u32);

impl ProcProbe {
    fn sample(&self, at: f64) -> Option<Sample> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.0)).ok()?;
        let rss_kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()?;
        let fds = std::fs::read_dir(format!("/proc/{}/fd", self.0))
            .ok()?
            .count() as u64;
        Some(Sample {
            at,
            rss: rss_kib * 1024,
            fds,
        })
    }
}

/// The journal's requests in flight, the first twenty of them, on one line.
fn in_flight_list(journal: &Journal) -> String {
    const SHOWN: usize = 20;
    let open = journal.in_flight();
    let mut line = open
        .iter()
        .take(SHOWN)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if open.len() > SHOWN {
        line.push_str(&format!(" and {} more", open.len() - SHOWN));
    }
    if open.is_empty() {
        line.push_str("none");
    }
    line
}

fn humantime_secs(d: Duration) -> String {
    format!("{}ms", d.as_millis())
}

/// Each large case once, one after the other: HTTP/1.1 sized and chunked,
/// HTTP/2 with trailers, TCP, and a gRPC chat of 1 MiB messages.
async fn big_transfers(
    http: SocketAddr,
    tcp: SocketAddr,
    journal: &Journal,
    big: u64,
) -> Vec<BigTransfer> {
    let mut out = Vec::new();
    let cases = [
        (Proto::Http1Sized, "big-h1-sized", big, true),
        (Proto::Http1Chunked, "big-h1-chunked", big, false),
        (Proto::Http2, "big-h2-trailers", big, false),
    ];
    for (proto, id, reply_len, reply_sized) in cases {
        let t0 = Instant::now();
        let call = HttpCall {
            id: id.into(),
            proto,
            len: big,
            reply_len,
            reply_sized,
            gate: None,
        };
        client::http_once(http, journal, call).await;
        out.push(BigTransfer {
            id: id.into(),
            bytes: big + reply_len,
            took: t0.elapsed(),
        });
    }
    let t0 = Instant::now();
    client::tcp_call(tcp, journal, "big-tcp".into(), big, big).await;
    out.push(BigTransfer {
        id: "big-tcp".into(),
        bytes: 2 * big,
        took: t0.elapsed(),
    });
    let t0 = Instant::now();
    let message = 1usize << 20;
    let count = usize::try_from(big / message as u64).unwrap_or(1).max(1);
    let messages = (0..count)
        .map(|i| (format!("big-grpc-{i}"), message))
        .collect();
    match client::grpc_client(http).await {
        Ok(mut c) => {
            client::grpc_chat(&mut c, journal, messages).await;
        }
        Err(e) => {
            for (id, _) in messages {
                client::failed(journal, id, Proto::Grpc, format!("{e:#}"));
            }
        }
    }
    out.push(BigTransfer {
        id: "big-grpc".into(),
        bytes: 2 * (count * message) as u64,
        took: t0.elapsed(),
    });
    out
}

/// Slopes and latency drift over a long run, after its warm-up.
#[derive(Debug, Clone)]
pub struct Drift {
    /// Samples used (after the warm-up).
    pub samples: usize,
    /// RSS at the first and last sample used, bytes.
    pub rss_first_last: (u64, u64),
    /// Least-squares RSS growth, percent of the mean RSS per hour.
    pub rss_percent_per_hour: f64,
    /// Least-squares FD growth, descriptors per hour.
    pub fds_per_hour: f64,
    /// FD count range over the samples used.
    pub fds_min_max: (u64, u64),
    /// p50 and p99 latency of the first window after the warm-up, and of
    /// the last window, in milliseconds; with the request counts.
    pub first_window: (f64, f64, usize),
    /// Same for the last window.
    pub last_window: (f64, f64, usize),
}

/// Least-squares slope of `points` (x, y); zero with fewer than two.
pub fn slope(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    if points.len() < 2 {
        return 0.0;
    }
    let mean_x = points.iter().map(|p| p.0).sum::<f64>() / n;
    let mean_y = points.iter().map(|p| p.1).sum::<f64>() / n;
    let cov: f64 = points.iter().map(|p| (p.0 - mean_x) * (p.1 - mean_y)).sum();
    let var: f64 = points.iter().map(|p| (p.0 - mean_x).powi(2)).sum();
    if var == 0.0 {
        0.0
    } else {
        cov / var
    }
}

/// The `q` quantile (0..=1) of `values`, which it sorts; zero when empty.
pub fn quantile(values: &mut [f64], q: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    let rank = ((values.len() as f64 - 1.0) * q).round() as usize;
    values[rank.min(values.len() - 1)]
}

impl Report {
    /// Requests that got a good reply, per protocol.
    pub fn served(&self) -> BTreeMap<String, usize> {
        let mut out = BTreeMap::new();
        for o in self.outcomes.iter().filter(|o| o.reply.is_ok()) {
            *out.entry(format!("{:?}", o.proto)).or_default() += 1;
        }
        out
    }

    /// Everything that breaks the integrity contract: a failed request, an
    /// id lost, seen twice or never sent, a body or trailer whose hash
    /// differs between the ends, a NACK, a failed drain. Empty when all
    /// held.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let mut ids = std::collections::HashSet::new();
        for o in &self.outcomes {
            if !ids.insert(o.id.as_str()) {
                problems.push(format!("{}: sent twice by the clients", o.id));
            }
            if let Err(e) = &o.reply {
                problems.push(format!("{} ({:?}): {e}", o.id, o.proto));
                continue;
            }
            let arrivals = self.arrivals.get(&o.id).map(Vec::as_slice).unwrap_or(&[]);
            let [arrival] = arrivals else {
                problems.push(format!(
                    "{} ({:?}): reached the upstreams {} times",
                    o.id,
                    o.proto,
                    arrivals.len()
                ));
                continue;
            };
            if let Some(e) = &arrival.error {
                problems.push(format!("{} at {}: {e}", o.id, arrival.upstream));
            }
            if arrival.body.as_ref() != Some(&o.sent) {
                problems.push(format!(
                    "{} at {}: received {:?}, sent {:?}",
                    o.id, arrival.upstream, arrival.body, o.sent
                ));
            }
            if o.trailer && arrival.trailer.as_deref() != Some(o.sent.1.as_str()) {
                problems.push(format!(
                    "{} at {}: request trailer {:?}, body hash {}",
                    o.id, arrival.upstream, arrival.trailer, o.sent.1
                ));
            }
            if o.proto != Proto::Grpc {
                let sent = arrival.reply.get();
                if sent.as_ref() != o.reply.as_ref().ok() {
                    problems.push(format!(
                        "{} from {}: reply sent {:?}, received {:?}",
                        o.id, arrival.upstream, sent, o.reply
                    ));
                }
            }
        }
        let mut unexpected: Vec<&String> = self
            .arrivals
            .keys()
            .filter(|id| !ids.contains(id.as_str()))
            .collect();
        unexpected.sort();
        for id in unexpected {
            problems.push(format!("{id}: reached an upstream but no client sent it"));
        }
        for nack in &self.nacks {
            problems.push(format!("NACK: {nack}"));
        }
        if let Err(e) = &self.drain_probe {
            problems.push(format!("drain: {e}"));
        }
        match &self.exit {
            Ok((0, _)) => {}
            Ok((code, _)) => problems.push(format!("postern exited {code} after SIGTERM")),
            Err(e) => problems.push(e.clone()),
        }
        problems
    }

    /// RSS and FD slopes after `warmup` seconds, and p50/p99 latency of the
    /// first and last `window` seconds after it (large transfers excluded).
    pub fn drift(&self, warmup: f64, window: f64) -> Drift {
        let used: Vec<&Sample> = self.samples.iter().filter(|s| s.at >= warmup).collect();
        let rss: Vec<(f64, f64)> = used.iter().map(|s| (s.at, s.rss as f64)).collect();
        let fds: Vec<(f64, f64)> = used.iter().map(|s| (s.at, s.fds as f64)).collect();
        let mean_rss = rss.iter().map(|p| p.1).sum::<f64>() / rss.len().max(1) as f64;
        let end = self.elapsed.as_secs_f64();
        let window_stats = |from: f64, to: f64| {
            let mut ms: Vec<f64> = self
                .outcomes
                .iter()
                .filter(|o| !o.id.starts_with("big-") && o.id != "drain-probe" && o.reply.is_ok())
                .filter(|o| (from..to).contains(&o.started.as_secs_f64()))
                .map(|o| o.latency.as_secs_f64() * 1000.0)
                .collect();
            let n = ms.len();
            (quantile(&mut ms, 0.5), quantile(&mut ms, 0.99), n)
        };
        Drift {
            samples: used.len(),
            rss_first_last: (
                used.first().map_or(0, |s| s.rss),
                used.last().map_or(0, |s| s.rss),
            ),
            rss_percent_per_hour: if mean_rss > 0.0 {
                slope(&rss) * 3600.0 / mean_rss * 100.0
            } else {
                0.0
            },
            fds_per_hour: slope(&fds) * 3600.0,
            fds_min_max: (
                used.iter().map(|s| s.fds).min().unwrap_or(0),
                used.iter().map(|s| s.fds).max().unwrap_or(0),
            ),
            first_window: window_stats(warmup, warmup + window),
            last_window: window_stats((end - window).max(warmup), end),
        }
    }

    /// A human summary of the run's figures.
    pub fn summary(&self) -> String {
        use std::fmt::Write as _;
        let mut s = String::new();
        let total: u64 = self
            .outcomes
            .iter()
            .filter_map(|o| o.reply.as_ref().ok().map(|r| o.sent.0 + r.0))
            .sum();
        let _ = writeln!(s, "load ran {:.1} s", self.elapsed.as_secs_f64());
        let _ = writeln!(
            s,
            "requests served: {:?} ({} in all, {:.1} MiB of bodies both ways)",
            self.served(),
            self.outcomes.len(),
            total as f64 / f64::from(1u32 << 20)
        );
        let _ = writeln!(
            s,
            "config pushes: {}, ACKs: {}, NACKs: {}",
            self.pushes,
            self.acks,
            self.nacks.len()
        );
        let _ = writeln!(
            s,
            "certificates: {} distinct proxy client certificates over {} upstream handshakes ({} resumed); upstream identity installed {} times",
            self.proxy_certificates, self.handshakes, self.resumed, self.upstream_rotations
        );
        for b in &self.big {
            let _ = writeln!(
                s,
                "large: {} {:.0} MiB in {:.2} s ({:.0} MiB/s)",
                b.id,
                b.bytes as f64 / f64::from(1u32 << 20),
                b.took.as_secs_f64(),
                b.bytes as f64 / f64::from(1u32 << 20) / b.took.as_secs_f64().max(1e-9)
            );
        }
        if let (Some(first), Some(last)) = (self.samples.first(), self.samples.last()) {
            let max_rss = self.samples.iter().map(|x| x.rss).max().unwrap_or(0);
            let _ = writeln!(
                s,
                "proxy RSS {:.1} -> {:.1} MiB (peak {:.1}), FDs {} -> {}",
                first.rss as f64 / f64::from(1u32 << 20),
                last.rss as f64 / f64::from(1u32 << 20),
                max_rss as f64 / f64::from(1u32 << 20),
                first.fds,
                last.fds
            );
        }
        let mut ms: Vec<f64> = self
            .outcomes
            .iter()
            .filter(|o| !o.id.starts_with("big-") && o.reply.is_ok())
            .map(|o| o.latency.as_secs_f64() * 1000.0)
            .collect();
        let _ = writeln!(
            s,
            "latency (all but large): p50 {:.1} ms, p99 {:.1} ms",
            quantile(&mut ms, 0.5),
            quantile(&mut ms, 0.99)
        );
        match &self.exit {
            Ok((code, took)) => {
                let _ = writeln!(
                    s,
                    "SIGTERM: listener closed after {:.2} s, exit {code} after {:.2} s",
                    self.listener_closed.unwrap_or_default().as_secs_f64(),
                    took.as_secs_f64()
                );
            }
            Err(e) => {
                let _ = writeln!(s, "SIGTERM: {e}");
            }
        }
        let _ = writeln!(
            s,
            "proxy warnings and errors logged: {}",
            self.warnings.len()
        );
        s
    }
}

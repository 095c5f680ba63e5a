//! End-to-end tests of the `postern` binary: `validate` on good and bad
//! configs, graceful drain on SIGTERM, flat memory while 100 MiB bodies
//! stream through, and the demo mesh (stopped by SIGTERM or Ctrl-C).

use std::convert::Infallible;
use std::io::Write as _;
use std::net::{SocketAddr, TcpListener as StdTcpListener};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt as _, Empty, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Body = BoxBody<Bytes, BoxError>;

fn postern() -> Command {
    Command::new(env!("CARGO_BIN_EXE_postern"))
}

fn write_config(text: &str) -> tempfile::NamedTempFile {
    let mut file = tempfile::Builder::new()
        .suffix(".yaml")
        .tempfile()
        .expect("temp file");
    file.write_all(text.as_bytes()).expect("write config");
    file.flush().expect("flush config");
    file
}

fn validate(path: &Path) -> Output {
    postern()
        .args(["validate", "--config"])
        .arg(path)
        .output()
        .expect("run postern validate")
}

const VALID: &str = r#"
admin:
  address: 127.0.0.1:0
drain_timeout: 5s
listeners:
  - name: edge
    address: 127.0.0.1:0
    kind: http
    virtual_hosts:
      - name: all
        domains: ["*"]
        routes:
          - name: api
            match:
              path: { prefix: /api/ }
              headers:
                - name: x-env
                  regex: 'canary|prod'
            cluster: payments
            timeout: 2s
            retry:
              on: [5xx, connect-failure]
              max_attempts: 3
          - match: {}
            direct_response:
              status: 404
              body: nothing here
  - name: tcp
    address: 127.0.0.1:0
    kind: tcp
    tcp:
      cluster: payments
clusters:
  - name: payments
    endpoints:
      - address: 127.0.0.1:9
"#;

#[test]
fn validate_accepts_a_valid_config() {
    let file = write_config(VALID);
    let output = validate(file.path());
    assert!(
        output.status.success(),
        "exit {:?}\nstdout: {}\nstderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn validate_accepts_the_example_configs() {
    for name in ["gateway.yaml", "sidecar-mtls.yaml", "sidecar-capture.yaml"] {
        let example = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../deploy/examples")
            .join(name);
        let output = validate(&example);
        assert!(
            output.status.success(),
            "{name}: exit {:?}\nstderr: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

/// Asserts `validate` fails cleanly on `config`, with every one of `needles`
/// in stderr (case-insensitive).
fn assert_rejected(case: &str, config: &str, needles: &[&str]) {
    let file = write_config(config);
    let output = validate(file.path());
    assert_failed_cleanly(case, &output, needles);
}

fn assert_failed_cleanly(case: &str, output: &Output, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.code().is_some_and(|c| c != 0),
        "{case}: expected a non-zero exit code, got {:?}; stderr: {stderr}",
        output.status
    );
    assert!(!stderr.contains("panicked"), "{case}: panicked: {stderr}");
    let lower = stderr.to_lowercase();
    for needle in needles {
        assert!(
            lower.contains(&needle.to_lowercase()),
            "{case}: stderr lacks {needle:?}: {stderr}"
        );
    }
}

/// `VALID` with one substring replaced (which must be present).
fn valid_with(from: &str, to: &str) -> String {
    assert!(VALID.contains(from), "VALID lacks {from:?}");
    VALID.replacen(from, to, 1)
}

#[test]
fn validate_rejects_unknown_key() {
    assert_rejected(
        "typo",
        &valid_with(
            "            cluster: payments\n",
            "            clustr: payments\n",
        ),
        &["listeners[0].virtual_hosts[0].routes[0]", "clustr"],
    );
}

#[test]
fn validate_rejects_unknown_cluster_reference() {
    assert_rejected(
        "unknown cluster",
        &valid_with(
            "            cluster: payments\n",
            "            cluster: paymnts\n",
        ),
        &["listeners[0].virtual_hosts[0].routes[0].cluster", "paymnts"],
    );
    assert_rejected(
        "unknown tcp cluster",
        &valid_with(
            "    tcp:\n      cluster: payments\n",
            "    tcp:\n      cluster: nowhere\n",
        ),
        &["listeners[1].tcp.cluster", "nowhere"],
    );
}

#[test]
fn validate_rejects_bad_regex() {
    assert_rejected(
        "bad regex",
        &valid_with("regex: 'canary|prod'", "regex: 'canary|(prod'"),
        &[
            "listeners[0].virtual_hosts[0].routes[0].match.headers[0].regex",
            "regex",
        ],
    );
}

#[test]
fn validate_rejects_wrong_enum_value() {
    assert_rejected(
        "bad listener kind",
        &valid_with("    kind: tcp\n", "    kind: udp\n"),
        &["listeners[1].kind", "udp"],
    );
    assert_rejected(
        "bad retry condition",
        &valid_with("on: [5xx, connect-failure]", "on: [5xx, gateway-error]"),
        &[
            "listeners[0].virtual_hosts[0].routes[0].retry.on",
            "gateway-error",
        ],
    );
}

#[test]
fn validate_rejects_duplicate_names() {
    let config =
        format!("{VALID}  - name: payments\n    endpoints:\n      - address: 127.0.0.1:10\n");
    assert_rejected(
        "duplicate cluster",
        &config,
        &["clusters[1]", "payments", "duplicate"],
    );
    assert_rejected(
        "duplicate listener",
        &valid_with("  - name: tcp\n", "  - name: edge\n"),
        &["listeners[1]", "edge", "duplicate"],
    );
}

#[test]
fn validate_rejects_missing_required_field() {
    assert_rejected(
        "missing endpoints",
        &valid_with(
            "    endpoints:\n      - address: 127.0.0.1:9\n",
            "    lb: round_robin\n",
        ),
        &["clusters[0]", "endpoints"],
    );
}

#[test]
fn validate_rejects_route_with_two_actions() {
    assert_rejected(
        "two actions",
        &valid_with(
            "            cluster: payments\n",
            "            cluster: payments\n            direct_response: {status: 200}\n",
        ),
        &["listeners[0].virtual_hosts[0].routes[0]", "action"],
    );
}

#[test]
fn validate_rejects_bad_duration() {
    assert_rejected(
        "bad duration",
        &valid_with("timeout: 2s", "timeout: 2 parsecs"),
        &[
            "listeners[0].virtual_hosts[0].routes[0].timeout",
            "duration",
        ],
    );
}

#[test]
fn validate_rejects_tcp_listener_without_tcp_block() {
    assert_rejected(
        "tcp without tcp block",
        &valid_with("    tcp:\n      cluster: payments\n", ""),
        &["listeners[1]", "tcp"],
    );
}

#[test]
fn validate_rejects_bad_values() {
    assert_rejected(
        "redirect status",
        &valid_with(
            "            direct_response:\n              status: 404\n              body: nothing here\n",
            "            redirect:\n              status: 200\n",
        ),
        &["listeners[0].virtual_hosts[0].routes[1].redirect.status"],
    );
    assert_rejected(
        "zero attempts",
        &valid_with("max_attempts: 3", "max_attempts: 0"),
        &["listeners[0].virtual_hosts[0].routes[0].retry.max_attempts"],
    );
    assert_rejected(
        "bad address",
        // A DNS name is fine (`localhost:9`); this is neither name nor IP.
        &valid_with("address: 127.0.0.1:9", "address: \"local host:9\""),
        &["clusters[0].endpoints[0].address"],
    );
}

#[test]
fn validate_rejects_invalid_yaml() {
    // A flow sequence that never closes: a syntax error, located.
    assert_rejected("invalid yaml", "listeners: [\n", &["line 2"]);
    assert_rejected("not a mapping", "just a string\n", &["invalid type"]);
}

#[test]
fn validate_reports_missing_file() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-config.yaml");
    let output = validate(&missing);
    assert_failed_cleanly(
        "missing file",
        &output,
        &["no-such-config.yaml", "no such file"],
    );
}

// ---------------------------------------------------------------------------
// Running the binary.
// ---------------------------------------------------------------------------

/// Two distinct ports that were free a moment ago. The binary binds them
/// right after; the window for a clash is tiny and a clash fails loudly at
/// start-up.
fn free_ports() -> (u16, u16) {
    let a = StdTcpListener::bind("127.0.0.1:0").expect("free port");
    let b = StdTcpListener::bind("127.0.0.1:0").expect("free port");
    let port = |l: &StdTcpListener| l.local_addr().expect("local addr").port();
    (port(&a), port(&b))
}

/// The running binary; killed (SIGKILL) if the test ends before it exits.
struct Running {
    child: Child,
    stderr: tempfile::NamedTempFile,
}

impl Running {
    fn start(config: &str) -> (Self, tempfile::NamedTempFile) {
        let file = write_config(config);
        let stderr = tempfile::NamedTempFile::new().expect("stderr file");
        let child = postern()
            .args(["run", "--config"])
            .arg(file.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr.reopen().expect("reopen stderr file"))
            .spawn()
            .expect("spawn postern run");
        (Self { child, stderr }, file)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(self.stderr.path()).unwrap_or_default()
    }

    /// Waits up to `limit` for the process to exit.
    async fn exited(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until the admin server answers `/ready` with 200.
    async fn wait_ready(&mut self, admin: SocketAddr) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                panic!("postern exited early with {status}: {}", self.logs());
            }
            if http_status(admin, "/ready").await == Some(200) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "postern never became ready: {}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn empty() -> Body {
    Empty::<Bytes>::new()
        .map_err(|never| match never {})
        .boxed()
}

fn full(data: impl Into<Bytes>) -> Body {
    Full::new(data.into())
        .map_err(|never| match never {})
        .boxed()
}

const CHUNK_LEN: usize = 64 * 1024;
static CHUNK: [u8; CHUNK_LEN] = [b'x'; CHUNK_LEN];

/// A lazily generated body of `len` bytes.
fn generated(len: u64) -> Body {
    let frames = futures_util::stream::unfold(len, |left| async move {
        if left == 0 {
            return None;
        }
        let n = usize::try_from(left).map_or(CHUNK_LEN, |l| l.min(CHUNK_LEN));
        Some((
            Ok::<_, Infallible>(Frame::data(Bytes::from_static(&CHUNK[..n]))),
            left - n as u64,
        ))
    });
    StreamBody::new(frames)
        .map_err(|never| match never {})
        .boxed()
}

/// The status of `GET path` on a new connection, or `None` if it fails.
async fn http_status(addr: SocketAddr, path: &str) -> Option<u16> {
    let req = Request::get(path)
        .header("host", "localhost")
        .body(empty())
        .ok()?;
    let response = tokio::time::timeout(Duration::from_secs(5), send(addr, req))
        .await
        .ok()?
        .ok()?;
    Some(response.status().as_u16())
}

/// Sends `req` on a new HTTP/1.1 connection; the body streams.
async fn send(addr: SocketAddr, req: Request<Body>) -> Result<Response<Incoming>, BoxError> {
    let stream = TcpStream::connect(addr).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender.send_request(req).await?)
}

#[derive(Default)]
struct BackendState {
    in_flight: AtomicUsize,
    received: AtomicU64,
}

/// A test upstream: `/slow` answers after 2s, `/upload` counts the body,
/// `/download/N` streams N bytes.
async fn start_backend() -> (SocketAddr, Arc<BackendState>) {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind backend");
    let addr = listener.local_addr().expect("backend addr");
    let state = Arc::new(BackendState::default());
    let shared = Arc::clone(&state);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let state = Arc::clone(&shared);
            tokio::spawn(async move {
                let service = service_fn(move |req| backend_handle(Arc::clone(&state), req));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, state)
}

async fn backend_handle(
    state: Arc<BackendState>,
    req: Request<Incoming>,
) -> Result<Response<Body>, BoxError> {
    let path = req.uri().path().to_owned();
    if path == "/slow" {
        state.in_flight.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(2)).await;
        state.in_flight.fetch_sub(1, Ordering::SeqCst);
        return Ok(Response::new(full("slow done")));
    }
    if let Some(len) = path.strip_prefix("/download/") {
        return Ok(Response::new(generated(len.parse()?)));
    }
    let mut body = req.into_body();
    let mut total = 0u64;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            total += data.len() as u64;
            state
                .received
                .fetch_add(data.len() as u64, Ordering::SeqCst);
        }
    }
    Ok(Response::new(full(total.to_string())))
}

fn run_config(listen: u16, admin: u16, backend: SocketAddr) -> String {
    format!(
        r#"
admin:
  address: 127.0.0.1:{admin}
drain_timeout: 10s
listeners:
  - name: edge
    address: 127.0.0.1:{listen}
    kind: http
    virtual_hosts:
      - name: all
        domains: ["*"]
        routes:
          - match: {{}}
            cluster: backend
clusters:
  - name: backend
    endpoints:
      - address: "{backend}"
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_requests_then_exits_zero() {
    let (backend, state) = start_backend().await;
    let (listen, admin) = free_ports();
    let (mut proxy, _config) = Running::start(&run_config(listen, admin, backend));
    let listen: SocketAddr = ([127, 0, 0, 1], listen).into();
    let admin: SocketAddr = ([127, 0, 0, 1], admin).into();
    proxy.wait_ready(admin).await;

    let in_flight = tokio::spawn(async move {
        let req = Request::get("/slow")
            .header("host", "svc.local")
            .body(empty())
            .unwrap();
        let response = send(listen, req).await.expect("in-flight request");
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .expect("in-flight body")
            .to_bytes();
        (status, body)
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while state.in_flight.load(Ordering::SeqCst) == 0 {
        assert!(
            Instant::now() < deadline,
            "the slow request never reached the backend"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let kill = Command::new("kill")
        .args(["-TERM", &proxy.pid().to_string()])
        .status()
        .expect("run kill");
    assert!(kill.success());

    // Draining: new connections are refused while the in-flight request
    // (2s upstream) is still running.
    let deadline = Instant::now() + Duration::from_secs(5);
    while TcpStream::connect(listen).await.is_ok() {
        assert!(
            Instant::now() < deadline,
            "the listener still accepts 5s after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        !in_flight.is_finished(),
        "the listener closed only after the in-flight request finished"
    );

    let (status, body) = tokio::time::timeout(Duration::from_secs(10), in_flight)
        .await
        .expect("the in-flight request finishes")
        .unwrap();
    assert_eq!(status, 200, "logs: {}", proxy.logs());
    assert_eq!(body, "slow done");
    let exit = proxy.exited(Duration::from_secs(10)).await;
    let logs = proxy.logs();
    let exit = exit.unwrap_or_else(|| panic!("postern did not exit after draining: {logs}"));
    assert_eq!(exit.code(), Some(0), "exit {exit}: {logs}");
    assert!(!logs.contains("panicked"), "{logs}");
}

/// Peak resident memory of `pid` in bytes (VmHWM).
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc status");
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .expect("VmHWM line");
    let kib: u64 = line
        .trim_start_matches("VmHWM:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .expect("VmHWM value");
    kib * 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_mib_bodies_stream_with_flat_memory() {
    const BIG: u64 = 100 * 1024 * 1024;
    const LIMIT: u64 = 64 * 1024 * 1024;
    let (backend, state) = start_backend().await;
    let (listen, admin) = free_ports();
    let (mut proxy, _config) = Running::start(&run_config(listen, admin, backend));
    let listen: SocketAddr = ([127, 0, 0, 1], listen).into();
    proxy.wait_ready(([127, 0, 0, 1], admin).into()).await;

    // Upload.
    let req = Request::put("/upload")
        .header("host", "svc.local")
        .header("content-length", BIG)
        .body(generated(BIG))
        .unwrap();
    let response = tokio::time::timeout(Duration::from_secs(120), async {
        let response = send(listen, req).await.expect("upload");
        let status = response.status();
        (
            status,
            response
                .into_body()
                .collect()
                .await
                .expect("upload reply")
                .to_bytes(),
        )
    })
    .await
    .expect("upload within 120s");
    assert_eq!(response.0, 200);
    assert_eq!(response.1, BIG.to_string());
    assert_eq!(state.received.load(Ordering::SeqCst), BIG);

    // Download.
    let req = Request::get(format!("/download/{BIG}"))
        .header("host", "svc.local")
        .body(empty())
        .unwrap();
    let received = tokio::time::timeout(Duration::from_secs(120), async {
        let response = send(listen, req).await.expect("download");
        assert_eq!(response.status(), 200);
        let mut body = response.into_body();
        let mut received = 0u64;
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame.expect("download body").into_data() {
                received += data.len() as u64;
            }
        }
        received
    })
    .await
    .expect("download within 120s");
    assert_eq!(received, BIG);

    let peak = peak_rss(proxy.pid());
    assert!(
        peak < LIMIT,
        "postern peaked at {} MiB while streaming 100 MiB each way",
        peak / (1024 * 1024)
    );
}

/// The demo's addresses, as its help text names them.
struct DemoAddresses {
    edge: SocketAddr,
    frontend_admin: SocketAddr,
    reviews_v1_admin: SocketAddr,
}

/// Reads the demo's stdout until its help text ends.
fn demo_addresses(child: &mut Child) -> Option<DemoAddresses> {
    use std::io::BufRead as _;
    let stdout = child.stdout.take().expect("piped stdout");
    let mut lines = std::io::BufReader::new(stdout).lines();
    let (mut edge, mut frontend_admin, mut reviews_v1_admin) = (None, None, None);
    for line in lines.by_ref() {
        let line = line.expect("demo stdout");
        // `... admin 127.0.0.1:15000  edge 127.0.0.1:10000`
        let after = |word: &str| -> Option<SocketAddr> {
            let mut words = line.split_whitespace();
            words.find(|w| *w == word)?;
            words.next()?.parse().ok()
        };
        match line.split_whitespace().next() {
            Some("frontend") => {
                edge = after("edge");
                frontend_admin = after("admin");
            }
            Some("reviews-v1") => reviews_v1_admin = after("admin"),
            _ => {}
        }
        if line.contains("Ctrl-C") {
            break;
        }
    }
    // Keep draining (access-log summaries) so the demo never blocks on a
    // full pipe.
    std::thread::spawn(move || for _ in lines {});
    Some(DemoAddresses {
        edge: edge?,
        frontend_admin: frontend_admin?,
        reviews_v1_admin: reviews_v1_admin?,
    })
}

/// `GET path` with `headers` on a new connection: status, the app that
/// served it (`x-served-by`), and the body.
async fn demo_get(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, Option<String>, String) {
    let mut request = Request::get(path).header("host", "demo");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request.body(empty()).expect("request");
    let response = send(addr, request).await.expect("response");
    let status = response.status().as_u16();
    let served_by = response
        .headers()
        .get("x-served-by")
        .map(|v| v.to_str().expect("ascii x-served-by").to_owned());
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    (
        status,
        served_by,
        String::from_utf8_lossy(&body).into_owned(),
    )
}

/// `postern demo` on ports of its own choosing, once it has printed where
/// it listens.
fn start_demo() -> (Running, DemoAddresses) {
    let stderr = tempfile::NamedTempFile::new().expect("stderr file");
    let child = postern()
        .args(["demo", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
        .args(["--control-plane", "127.0.0.1:0"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr.reopen().expect("reopen stderr file"))
        .spawn()
        .expect("start postern demo");
    let mut demo = Running { child, stderr };
    // A demo that ends before naming its edge listener, its frontend admin
    // and reviews-v1's admin failed to start: its log says why.
    let Some(at) = demo_addresses(&mut demo.child) else {
        panic!("demo did not name its listeners: {}", demo.logs());
    };
    (demo, at)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_runs_a_mesh_with_mtls_routing_and_policies_and_stops_on_sigterm() {
    const FRONTEND_ID: &str = "spiffe://cluster.local/ns/demo/sa/frontend";
    let (mut demo, at) = start_demo();

    // The canary header pins v2; the reply says the call crossed mTLS
    // from the frontend's identity.
    let (status, served_by, body) = demo_get(at.edge, "/reviews/1", &[("x-canary", "1")]).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(served_by.as_deref(), Some("reviews-v2"));
    assert!(body.contains(&format!("called by {FRONTEND_ID}")), "{body}");

    // Without it the 80/20 split sends calls to both versions. The split is
    // random: 200 calls all missing one side has odds below 1e-19.
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..200 {
        let (status, served_by, body) = demo_get(at.edge, "/reviews/1", &[]).await;
        assert_eq!(status, 200, "{body}");
        seen.insert(served_by.expect("x-served-by"));
        if seen.len() == 2 {
            break;
        }
    }
    assert_eq!(
        seen.into_iter().collect::<Vec<_>>(),
        ["reviews-v1", "reviews-v2"]
    );

    // RBAC at the reviews sidecar refuses /reviews/admin.
    let (status, served_by, body) = demo_get(at.edge, "/reviews/admin", &[]).await;
    assert_eq!((status, served_by), (403, None), "{body}");

    // The rate-limited route takes one call, then answers 429.
    let (status, _, body) = demo_get(at.edge, "/reviews/top", &[]).await;
    assert_eq!(status, 200, "{body}");
    let (status, served_by, body) = demo_get(at.edge, "/reviews/top", &[]).await;
    assert_eq!((status, served_by), (429, None), "{body}");

    // reviews-v1's sidecar counted calls from the frontend's verified
    // identity over mutual TLS.
    let (status, _, metrics) = demo_get(at.reviews_v1_admin, "/metrics", &[]).await;
    assert_eq!(status, 200);
    let inbound = metrics.lines().find(|line| {
        line.starts_with("istio_requests_total{")
            && line.contains(r#"reporter="destination""#)
            && line.contains(r#"destination_workload="reviews-v1""#)
            && line.contains(r#"response_code="200""#)
    });
    let inbound = inbound.unwrap_or_else(|| panic!("no inbound series in:\n{metrics}"));
    assert!(
        inbound.contains(&format!(r#"source_principal="{FRONTEND_ID}""#)),
        "{inbound}"
    );
    assert!(
        inbound.contains(r#"connection_security_policy="mutual_tls""#),
        "{inbound}"
    );

    // The frontend's config came from the control plane.
    let (status, _, dump) = demo_get(at.frontend_admin, "/config_dump", &[]).await;
    assert_eq!(status, 200);
    let dump: serde_json::Value = serde_json::from_str(&dump).expect("config_dump json");
    let dynamic = &dump["dynamic"];
    assert!(dynamic["listeners"]["edge"].is_object(), "{dynamic}");
    assert!(dynamic["routes"]["edge"].is_object(), "{dynamic}");
    for cluster in ["reviews-v1", "reviews-v2", "frontend"] {
        assert!(dynamic["clusters"][cluster].is_object(), "{dynamic}");
    }
    let (status, _, _) = demo_get(at.frontend_admin, "/certs", &[]).await;
    assert_eq!(status, 200);

    let status = Command::new("kill")
        .args(["-TERM", &demo.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = demo.exited(Duration::from_secs(20)).await;
    assert!(
        exit.is_some_and(|s| s.success()),
        "demo exit: {exit:?}: {}",
        demo.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_stops_on_ctrl_c_and_exits_zero() {
    let (mut demo, at) = start_demo();
    // Serving first, so the signal meets a running mesh, not a starting one.
    let (status, _, body) = demo_get(at.edge, "/reviews/1", &[]).await;
    assert_eq!(status, 200, "{body}");

    // Ctrl-C in a terminal is SIGINT to the process.
    let status = Command::new("kill")
        .args(["-INT", &demo.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = demo.exited(Duration::from_secs(20)).await;
    assert!(
        exit.is_some_and(|s| s.success()),
        "demo exit after SIGINT: {exit:?}: {}",
        demo.logs()
    );
}

#[test]
fn validate_needs_a_file_or_a_control_plane() {
    let output = postern()
        .arg("validate")
        .env_remove("POSTERN_XDS_ADDRESS")
        .output()
        .expect("run postern validate");
    assert_failed_cleanly("no config", &output, &["--config", "--xds-address"]);
    let output = postern()
        .args(["validate", "--xds-address", "http://127.0.0.1:15010"])
        .env_remove("POSTERN_NODE_ID")
        .output()
        .expect("run postern validate");
    assert_failed_cleanly("no node id", &output, &["node.id"]);
    let output = postern()
        .args(["validate", "--xds-address", "http://127.0.0.1:15010"])
        .env("POSTERN_NODE_ID", "sidecar~127.0.0.1~web")
        .output()
        .expect("run postern validate");
    assert!(
        output.status.success(),
        "flags and env are a whole bootstrap: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_with_flags_only_waits_for_the_control_plane_and_drains_on_sigterm() {
    // The control plane's address is a port nothing listens on.
    let (admin_port, dead_port) = free_ports();
    let admin: SocketAddr = format!("127.0.0.1:{admin_port}").parse().unwrap();
    let stderr = tempfile::NamedTempFile::new().expect("stderr file");
    let child = postern()
        .args(["run", "--node-id", "sidecar~127.0.0.1~web"])
        .args(["--admin-address", &admin.to_string()])
        .env(
            "POSTERN_XDS_ADDRESS",
            format!("http://127.0.0.1:{dead_port}"),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr.reopen().expect("reopen stderr file"))
        .spawn()
        .expect("spawn postern run");
    let mut proxy = Running { child, stderr };
    let deadline = Instant::now() + Duration::from_secs(20);
    while http_status(admin, "/ready").await != Some(503) {
        assert!(
            proxy.child.try_wait().expect("try_wait").is_none(),
            "{}",
            proxy.logs()
        );
        assert!(
            Instant::now() < deadline,
            "admin never answered: {}",
            proxy.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(http_status(admin, "/healthz").await, Some(200));
    let status = std::process::Command::new("kill")
        .args(["-TERM", &proxy.pid().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let exit = proxy.exited(Duration::from_secs(20)).await;
    assert!(
        exit.is_some_and(|s| s.success()),
        "exit {exit:?}: {}",
        proxy.logs()
    );
    assert!(proxy.logs().contains("xDS"), "{}", proxy.logs());
}

//! Idle-connection memory (issue #8 item 7): the resident memory and file
//! descriptors one idle downstream connection costs a release Postern.
//!
//! Each phase starts a fresh Postern (`POSTERN_BIN`) with one listener that
//! answers from the proxy (`direct_response`, so no upstream connection is
//! counted), reads its VmRSS, opens the connections, waits until the proxy
//! counts them all open and its RSS has settled, and reads VmRSS again:
//!
//! - `http1`: HTTP/1.1, one request each, then kept alive and idle, all
//!   opened in one burst;
//! - `http1-arriving`: the same, opened 1,000 at a time, each wave idle
//!   (its hyper buffers let go) before the next opens;
//! - `http2`: HTTP/2 with prior knowledge, one request each, then idle;
//! - `http1-silent`: TCP connected, nothing sent yet;
//! - `mtls-h2`: what a sidecar's inbound side holds for a calling sidecar:
//!   strict mTLS with a client certificate, ALPN `h2`, one request, then
//!   idle (`H2_CONNS` of them);
//! - `mtls-h1`: the same over HTTP/1.1 (`H1_CONNS`).
//!
//! `bench/idle.sh` builds and runs it with a raised descriptor limit.
//! Environment: `POSTERN_BIN`, `H1_CONNS` (20000), `H2_CONNS` (5000),
//! `PHASES` (comma-separated, default all of them).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// Client source addresses, so that 25,000 connections to one listener do
/// not exhaust the ephemeral ports of a single source address.
const SOURCES: u8 = 8;
/// Connections opened at once: under the listen queue (128), so that no
/// handshake completes on the client side while the proxy cannot take it.
const WAVE: usize = 100;

use postern_tests::bench::{env_or, free_port};

struct Postern {
    child: Child,
    admin: SocketAddr,
    listener: SocketAddr,
}

/// The identities of an mTLS phase: Postern's, written for its config, and
/// a client that presents its own certificate.
struct Mesh {
    server: postern_tests::mesh::IdentityFiles,
    client: tokio_rustls::TlsConnector,
}

const SERVER_ID: &str = "spiffe://cluster.local/ns/idle/sa/server";

impl Mesh {
    fn new(dir: &Path, alpn: &[u8]) -> Mesh {
        let ca = postern_tests::mesh::TestCa::new("idle-ca");
        let client = ca.issue("spiffe://cluster.local/ns/idle/sa/client", -60, 3600);
        Mesh {
            server: ca.write_identity(dir, "server", SERVER_ID),
            client: postern_tests::mesh::probe_connector(Some(&client), &[alpn]),
        }
    }
}

impl Postern {
    async fn start(bin: &Path, dir: &Path, mesh: Option<&Mesh>) -> Postern {
        let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let listener = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let config = dir.join("idle.yaml");
        let (identity, mtls) = match mesh {
            Some(mesh) => (
                format!(
                    "identity:\n  spiffe_id: {SERVER_ID}\n  source:\n    files: {{ cert: {}, key: {}, bundle: {} }}\n",
                    mesh.server.cert.display(),
                    mesh.server.key.display(),
                    mesh.server.bundle.display(),
                ),
                "\n    mtls: { mode: strict }",
            ),
            None => (String::new(), ""),
        };
        std::fs::write(
            &config,
            format!(
                r#"admin: {{ address: "{admin}" }}
overload: {{ max_connections: 100000 }}
{identity}listeners:
  - name: idle
    address: {listener}
    kind: http{mtls}
    limits: {{ max_connections: 100000, idle_timeout: 3600s, header_read_timeout: 2s }}
    virtual_hosts:
      - name: all
        domains: ["*"]
        routes: [{{ match: {{}}, direct_response: {{ status: 200, body: ok }} }}]
"#
            ),
        )
        .expect("write config");
        let child = Command::new(bin)
            .args(["run", "--config"])
            .arg(&config)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .expect("start postern (POSTERN_BIN)");
        let postern = Postern {
            child,
            admin,
            listener,
        };
        for _ in 0..200 {
            if postern
                .admin_get("/ready")
                .await
                .is_some_and(|t| t.contains(" 200 "))
            {
                return postern;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("postern did not become ready");
    }

    async fn admin_get(&self, path: &str) -> Option<String> {
        let mut stream = TcpStream::connect(self.admin).await.ok()?;
        let request = format!("GET {path} HTTP/1.0\r\nhost: admin\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await.ok()?;
        Some(String::from_utf8_lossy(&raw).into_owned())
    }

    async fn open_connections(&self) -> u64 {
        self.metric_sum("postern_downstream_connections_active{")
            .await
    }

    /// Waits (a minute at most) until `count` connections have parked.
    async fn wait_parked(&self, count: u64) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self
            .metric_sum("postern_downstream_connections_parked_total{")
            .await
            < count
            && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn metric_sum(&self, series: &str) -> u64 {
        let text = self.admin_get("/metrics").await.unwrap_or_default();
        text.lines()
            .filter(|l| l.starts_with(series))
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum::<f64>() as u64
    }

    fn rss_kib(&self) -> u64 {
        postern_tests::bench::rss_kib(self.child.id())
    }

    fn fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.child.id()))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// RSS once it has stopped changing (allocator and kernel catch up
    /// after a burst of connections).
    async fn settled_rss_kib(&self) -> u64 {
        let mut last = self.rss_kib();
        for _ in 0..20 {
            tokio::time::sleep(Duration::from_millis(250)).await;
            let now = self.rss_kib();
            if now.abs_diff(last) < 64 {
                return now;
            }
            last = now;
        }
        last
    }
}

impl Drop for Postern {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn connect(addr: SocketAddr, i: usize) -> TcpStream {
    let source = Ipv4Addr::new(127, 0, 0, 1 + (i % usize::from(SOURCES)) as u8);
    let socket = TcpSocket::new_v4().expect("socket");
    socket
        .bind(SocketAddr::new(IpAddr::V4(source), 0))
        .expect("bind source");
    socket.connect(addr).await.expect("connect")
}

/// What a phase keeps open; held only to keep the connection up.
#[allow(dead_code)]
enum Held {
    Tcp(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    H2(hyper::client::conn::http2::SendRequest<Empty<Bytes>>),
}

/// One HTTP/1.1 request on `stream`, its answer read whole.
async fn get_h1<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(stream: &mut S) {
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: idle.local\r\n\r\n")
        .await
        .expect("write");
    // A TLS stream may hold the record until flushed.
    stream.flush().await.expect("flush");
    let mut got = Vec::new();
    let mut buf = [0u8; 512];
    while !got.ends_with(b"\r\n\r\nok") {
        let n = stream.read(&mut buf).await.expect("read");
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    assert!(got.starts_with(b"HTTP/1.1 200"));
}

/// An HTTP/2 connection over `io` after one request, its answer read whole.
async fn get_h2<IO>(io: IO) -> hyper::client::conn::http2::SendRequest<Empty<Bytes>>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io))
            .await
            .expect("h2 handshake");
    tokio::spawn(conn);
    let request = http::Request::builder()
        .uri("http://idle.local/")
        .body(Empty::<Bytes>::new())
        .expect("request");
    let response = sender.send_request(request).await.expect("h2 request");
    assert_eq!(response.status(), 200);
    use http_body_util::BodyExt as _;
    response.into_body().collect().await.expect("h2 body");
    sender
}

async fn open_one(addr: SocketAddr, i: usize, phase: &str, mesh: Option<&Mesh>) -> Held {
    let mut stream = connect(addr, i).await;
    match phase {
        "http1-silent" => Held::Tcp(stream),
        "http1" | "http1-arriving" => {
            get_h1(&mut stream).await;
            Held::Tcp(stream)
        }
        "mtls-h1" => {
            let mesh = mesh.expect("mesh identities");
            let name = rustls::pki_types::ServerName::try_from("idle.local").expect("name");
            let mut tls = mesh.client.connect(name, stream).await.expect("mTLS");
            get_h1(&mut tls).await;
            Held::Tls(Box::new(tls))
        }
        "http2" => Held::H2(get_h2(stream).await),
        "mtls-h2" => {
            let mesh = mesh.expect("mesh identities");
            let name = rustls::pki_types::ServerName::try_from("idle.local").expect("name");
            let tls = mesh.client.connect(name, stream).await.expect("mTLS");
            Held::H2(get_h2(tls).await)
        }
        other => panic!("unknown phase {other}"),
    }
}

async fn phase(bin: &Path, dir: &Path, name: &str, count: usize) -> String {
    let mesh = name.strip_prefix("mtls-").map(|protocol| {
        let alpn: &[u8] = if protocol == "h2" { b"h2" } else { b"http/1.1" };
        Mesh::new(dir, alpn)
    });
    let postern = Postern::start(bin, dir, mesh.as_ref()).await;
    // Warm up: the first requests allocate what every later one reuses.
    for i in 0..50 {
        drop(open_one(postern.listener, i, name, mesh.as_ref()).await);
    }
    while postern.open_connections().await > 0 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let rss_before = postern.settled_rss_kib().await;
    let fds_before = postern.fds();
    let started = Instant::now();
    let mut held = Vec::with_capacity(count);
    // `http1-arriving` opens its connections 1,000 at a time and lets each
    // wave go idle (and let its buffers go) before the next: connections
    // that arrive over time, rather than all in one burst.
    let wave_size = if name == "http1-arriving" { 1000 } else { WAVE };
    for wave in 0..count.div_ceil(wave_size) {
        let opens = (wave * wave_size..((wave + 1) * wave_size).min(count))
            .map(|i| open_one(postern.listener, i, name, mesh.as_ref()));
        held.extend(futures_util::future::join_all(opens).await);
        if name == "http1-arriving" {
            postern.wait_parked(held.len() as u64).await;
        }
    }
    let opened_in = started.elapsed();
    // Connections the kernel completed but whose ACK overflowed the accept
    // queue may never reach the proxy; count what it holds after a while.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut open = postern.open_connections().await;
    while open < count as u64 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        open = postern.open_connections().await;
    }
    if matches!(name, "http1" | "http1-arriving" | "mtls-h1") {
        // Kept-alive HTTP/1 connections let hyper's buffers go after a
        // second idle (at the connection's next timer tick): measure them
        // as they sit idle, not as they were just after their request.
        postern.wait_parked(open).await;
    }
    let rss_after = postern.settled_rss_kib().await;
    let fds_after = postern.fds();
    let open = postern.open_connections().await.max(1);
    let per_conn = (rss_after.saturating_sub(rss_before)) as f64 * 1024.0 / open as f64;
    let line = format!(
        "| {name} | {count} | {open} | {:.1} | {rss_before} | {rss_after} | {:.0} | {:.2} | {:.2} |",
        opened_in.as_secs_f64(),
        per_conn,
        per_conn / 1024.0,
        (fds_after - fds_before) as f64 / open as f64,
    );
    eprintln!("{line}");
    drop(held);
    line
}

#[tokio::main]
async fn main() {
    let bin = PathBuf::from(std::env::var("POSTERN_BIN").expect("set POSTERN_BIN"));
    let dir = tempfile::tempdir().expect("temp dir");
    let h1 = env_or("H1_CONNS", 20_000) as usize;
    let h2 = env_or("H2_CONNS", 5_000) as usize;
    let phases = std::env::var("PHASES")
        .unwrap_or_else(|_| "http1,http1-arriving,http2,http1-silent,mtls-h1,mtls-h2".into());
    let mut lines = vec![
        "| phase | connections opened | open in Postern | opened in (s) | RSS before (KiB) | RSS after (KiB) | bytes per connection | KiB per connection | descriptors per connection |".to_string(),
        "|---|---|---|---|---|---|---|---|---|".to_string(),
    ];
    for name in phases.split(',') {
        let count = if matches!(name, "http2" | "mtls-h2") {
            h2
        } else {
            h1
        };
        lines.push(phase(&bin, dir.path(), name, count).await);
    }
    println!("{}", lines.join("\n"));
}

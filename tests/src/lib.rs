//! End-to-end test harness for Postern.
//!
//! Everything here runs in the test process on `127.0.0.1:0`: test backends
//! (an HTTP echo server, a gRPC echo service, a WebSocket echo server, TCP
//! echo servers, an OTLP trace receiver, a JWT issuer with its key
//! server, upstreams that fail on cue), HTTP/1 and HTTP/2 clients, a helper that starts the proxy
//! in-process from YAML, bounded waits for eventual conditions, and the
//! mixed load with its integrity ledger that the integrity suite and the
//! soak run against the binary ([`load`]). The test
//! files under `tests/` hold the scenarios; this crate holds no assertions
//! about the proxy itself.

pub mod als;
pub mod bench;
pub mod capture;
pub mod client;
pub mod control;
pub mod envoy;
pub mod fault;
pub mod grpc;
pub mod h2raw;
pub mod http_backend;
pub mod jwt;
pub mod kube;
pub mod load;
pub mod mesh;
pub mod otlp;
pub mod prom;
pub mod tcp_backend;
pub mod tls_backend;
pub mod ws_backend;

use std::future::Future;
use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

pub use client::{empty, full, request, Body, BoxError, H1Conn, H2Conn, TestResponse};
pub use http_backend::{HttpBackend, RecordedRequest, Reply};
pub use postern::app::Proxy;
pub use postern::config::Config;

/// How long [`eventually`] and [`wait_until`] wait before failing the test.
pub const EVENTUALLY_TIMEOUT: Duration = Duration::from_secs(10);

/// Parses `yaml` with [`Config::from_yaml`] and starts the proxy in-process.
///
/// The YAML may be indented as a whole (common leading whitespace is
/// removed). Without an `admin:` section the admin server binds
/// `127.0.0.1:0`, so tests never collide on the default port.
///
/// # Panics
///
/// If the config is rejected or the proxy fails to start: the message holds
/// the error and the YAML.
pub async fn start_proxy(yaml: &str) -> Proxy {
    let config =
        parse_config(yaml).unwrap_or_else(|(e, yaml)| panic!("config rejected: {e}\n{yaml}"));
    Proxy::start(config)
        .await
        .unwrap_or_else(|e| panic!("proxy failed to start: {e:#}"))
}

/// Like [`start_proxy`] but returns the validation error instead of
/// panicking, for tests of config checks. The error is the `Display` text.
pub fn parse_config(yaml: &str) -> Result<Config, (String, String)> {
    let mut text = unindent(yaml);
    if !text.lines().any(|l| l.starts_with("admin:")) {
        text = format!("admin:\n  address: 127.0.0.1:0\n{text}");
    }
    Config::from_yaml(&text).map_err(|e| (e.to_string(), text))
}

/// Removes the whitespace common to the start of every non-blank line, so
/// YAML can be written indented inside Rust code.
pub fn unindent(text: &str) -> String {
    let indent = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.len() - l.trim_start().len())
        .min()
        .unwrap_or(0);
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        if line.trim().is_empty() {
            out.push('\n');
        } else {
            out.push_str(&line[indent..]);
            out.push('\n');
        }
    }
    out
}

/// The address of a listener of `proxy`.
///
/// # Panics
///
/// If the proxy has no listener called `name`.
pub fn listener(proxy: &Proxy, name: &str) -> SocketAddr {
    proxy
        .listener_addr(name)
        .unwrap_or_else(|| panic!("proxy has no listener {name:?}"))
}

/// An address on 127.0.0.1 where nothing listens: a port the kernel just
/// handed out and that was closed again. Connecting to it is refused.
pub fn dead_addr() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local addr")
}

/// Polls `probe` every 10ms until it returns `Some`, and returns the value.
///
/// # Panics
///
/// After [`EVENTUALLY_TIMEOUT`], naming `what` was being waited for.
pub async fn eventually<T, F, Fut>(what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + EVENTUALLY_TIMEOUT;
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {EVENTUALLY_TIMEOUT:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Polls `check` every 10ms until it returns `true`.
///
/// # Panics
///
/// After [`EVENTUALLY_TIMEOUT`], naming `what` was being waited for.
pub async fn wait_until<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    eventually(what, || {
        let fut = check();
        async move { fut.await.then_some(()) }
    })
    .await;
}

/// Awaits `fut`, failing the test if it takes longer than `limit`.
///
/// # Panics
///
/// When `limit` passes first, naming `what` was awaited.
pub async fn within<T>(limit: Duration, what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(limit, fut).await {
        Ok(value) => value,
        Err(_) => panic!("{what} did not finish within {limit:?}"),
    }
}

/// GETs `path` from `addr` with the given `Host`, on a new HTTP/1.1
/// connection.
///
/// # Panics
///
/// When the exchange fails at the transport level or takes over 10s.
pub async fn get(addr: SocketAddr, host: &str, path: &str) -> TestResponse {
    let req = request("GET", host, path).body(empty()).expect("request");
    send(addr, req).await
}

/// Sends `req` to `addr` on a new HTTP/1.1 connection and reads the whole
/// response.
///
/// # Panics
///
/// When the exchange fails at the transport level or takes over 10s.
pub async fn send(addr: SocketAddr, req: http::Request<Body>) -> TestResponse {
    within(Duration::from_secs(10), "http/1.1 exchange", async {
        let mut conn = H1Conn::connect(addr).await.expect("connect to proxy");
        conn.send(req).await.expect("http/1.1 exchange")
    })
    .await
}

//! The proxy's life cycle around its app: the drain order (callers' side
//! first, the app's outbound side once the app is gone or the wait is
//! over), `POST /quitquitquit`, and the last-known-good config that lets a
//! restarted proxy serve while the control plane is unreachable.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::Duration;

use postern_control::ads::Snapshot;
use postern_control::mesh::parse_mesh;
use postern_tests::control::ControlPlane;
use postern_tests::{
    empty, get, listener, request, send, start_proxy, wait_until, within, HttpBackend, Proxy,
};
use tokio::net::TcpStream;

/// An inbound and an outbound HTTP listener that both answer 200.
fn two_sides(outbound_wait: &str, drain_timeout: &str) -> String {
    let listener = |name: &str, direction: &str| {
        format!(
            r#"
  - name: {name}
    address: 127.0.0.1:0
    kind: http
    traffic_direction: {direction}
    virtual_hosts:
      - name: all
        domains: ["*"]
        routes: [{{ match: {{}}, direct_response: {{ status: 200, body: {name} }} }}]
"#
        )
    };
    format!(
        "drain_timeout: {drain_timeout}\noutbound_drain_wait: {outbound_wait}\nlisteners:{}{}",
        listener("in", "inbound"),
        listener("out", "outbound")
    )
}

async fn refuses(addr: SocketAddr) -> bool {
    TcpStream::connect(addr).await.is_err()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_stops_the_inbound_side_first_and_the_outbound_side_once_the_app_is_gone() {
    let proxy = start_proxy(&two_sides("30s", "30s")).await;
    let (inbound, outbound) = (listener(&proxy, "in"), listener(&proxy, "out"));
    // The app, still holding a connection through its outbound side.
    let app = TcpStream::connect(outbound).await.unwrap();

    proxy.drain();
    wait_until("the inbound side to stop accepting", || refuses(inbound)).await;
    // The app can still make new calls while it finishes.
    let response = get(outbound, "svc", "/").await;
    assert_eq!(
        (response.status.as_u16(), response.text()),
        (200, "out".into())
    );
    assert!(!refuses(outbound).await);

    // Once the app's last connection is gone, so is the outbound side,
    // long before outbound_drain_wait (30s).
    drop(app);
    within(Duration::from_secs(10), "the proxy to stop", proxy.wait())
        .await
        .unwrap();
    assert!(refuses(outbound).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_drain_wait_bounds_how_long_the_outbound_side_accepts() {
    let proxy = start_proxy(&two_sides("200ms", "30s")).await;
    let outbound = listener(&proxy, "out");
    let _app = TcpStream::connect(outbound).await.unwrap();
    proxy.drain();
    wait_until("the outbound side to stop accepting", || refuses(outbound)).await;
    // The held connection (idle HTTP/1) was closed by the drain, so the
    // proxy is done without waiting for drain_timeout.
    within(Duration::from_secs(10), "the proxy to stop", proxy.wait())
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quitquitquit_stops_at_once_without_draining() {
    let backend = HttpBackend::start("slow").await;
    let config = format!(
        r#"
drain_timeout: 60s
outbound_drain_wait: 60s
listeners:
  - name: out
    address: 127.0.0.1:0
    kind: tcp
    traffic_direction: outbound
    tcp: {{ cluster: backend }}
clusters:
  - name: backend
    endpoints: [{{ address: "{}" }}]
"#,
        backend.addr()
    );
    let proxy = start_proxy(&config).await;
    // An open TCP pair would hold a drain until drain_timeout.
    let _pair = TcpStream::connect(listener(&proxy, "out")).await.unwrap();
    let response = send(
        proxy.admin_addr(),
        request("POST", "localhost", "/quitquitquit")
            .body(empty())
            .unwrap(),
    )
    .await;
    assert_eq!(response.status, 200);
    within(Duration::from_secs(5), "the proxy to quit", proxy.wait())
        .await
        .unwrap();
}

// ---------------------------------------------------------------------------
// Last-known-good config.
// ---------------------------------------------------------------------------

fn mesh(version: &str, backend: SocketAddr) -> Snapshot {
    let yaml = format!(
        r#"
listeners:
  - name: xds-http
    address: 127.0.0.1:0
    route: main-routes
routes:
  - name: main-routes
    virtual_hosts:
      - name: all
        domains: ["*"]
        routes: [{{ prefix: /, cluster: svc }}]
services:
  - name: svc
    endpoints: [{{ address: "{backend}" }}]
"#
    );
    parse_mesh(&yaml, version).expect("mesh")
}

fn bootstrap(cp: &ControlPlane, state_dir: &std::path::Path) -> String {
    format!(
        r#"
node: {{ id: "sidecar~127.0.0.1~web.default~default.svc.cluster.local" }}
xds: {{ address: "{}", initial_backoff: 50ms, max_backoff: 200ms, initial_fetch_timeout: 300ms }}
state_dir: {}
drain_timeout: 2s
"#,
        cp.url(),
        state_dir.display()
    )
}

async fn ready_text(proxy: &Proxy) -> Option<String> {
    let response = get(proxy.admin_addr(), "localhost", "/ready").await;
    (response.status == 200).then(|| response.text())
}

async fn backend_of(proxy: &Proxy) -> Option<String> {
    let addr = proxy.listener_addr("xds-http")?;
    let response = get(addr, "svc", "/").await;
    (response.status == 200).then(|| response.backend().unwrap_or_default().to_string())
}

async fn config_source(proxy: &Proxy) -> String {
    let dump = get(proxy.admin_addr(), "localhost", "/config_dump").await;
    let dump: serde_json::Value = serde_json::from_slice(&dump.body).unwrap();
    dump["dynamic"]["source"].as_str().unwrap_or("").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_without_the_control_plane_serves_the_last_known_good_config() {
    let (a, b) = (HttpBackend::start("a").await, HttpBackend::start("b").await);
    let state = tempfile::tempdir().unwrap();
    let saved = state.path().join(postern::xds::last_known_good::FILE_NAME);
    let mut cp = ControlPlane::start(mesh("1", a.addr())).await;

    let first = start_proxy(&bootstrap(&cp, state.path())).await;
    wait_until("the live config", || async {
        backend_of(&first).await.as_deref() == Some("a")
    })
    .await;
    wait_until("the config to be saved", || async { saved.exists() }).await;
    // The config is saved while it is applied; the dump's status follows
    // once the update's NACKs are settled, a moment later.
    wait_until(
        "the dump to name the control plane as the source",
        || async { config_source(&first).await == "xds" },
    )
    .await;
    first.drain();
    first.wait().await.unwrap();

    // The control plane is down when the proxy comes back.
    cp.stop().await;
    let second = start_proxy(&bootstrap(&cp, state.path())).await;
    let text = postern_tests::eventually("ready on the saved config", || ready_text(&second)).await;
    assert!(text.contains("last-known-good"), "{text}");
    assert_eq!(backend_of(&second).await.as_deref(), Some("a"));
    wait_until(
        "the dump to name the saved config as the source",
        || async { config_source(&second).await == "last_known_good" },
    )
    .await;

    // When it is back, its config replaces the saved one.
    cp.restart(mesh("2", b.addr())).await;
    wait_until("the live config again", || async {
        backend_of(&second).await.as_deref() == Some("b")
    })
    .await;
    // Traffic follows the new config as it is applied; the readiness note
    // and the dump's source are updated right after.
    wait_until("ready without the last-known-good note", || async {
        ready_text(&second).await.as_deref() == Some("ready\n")
    })
    .await;
    wait_until("the dump to name the control plane again", || async {
        config_source(&second).await == "xds"
    })
    .await;
}

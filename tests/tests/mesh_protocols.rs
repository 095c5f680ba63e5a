//! The caller's protocol across two sidecars: between them every call is
//! HTTP/2 over mesh mTLS, yet HTTP/1.1 arrives as HTTP/1.1, h2c as h2c (at
//! an app that speaks nothing else), and a WebSocket upgrade crosses as an
//! RFC 8441 extended CONNECT and reaches the app as an HTTP/1.1 upgrade.
//! The marker that carries the protocol (`x-postern-original-protocol`)
//! counts only from a mesh peer and never reaches an app.
//!
//! Sidecar B here is a static listener whose routes pick the app's
//! protocol from the marker, as docs/config.md shows; the capture path,
//! which does so on its own, is covered in `proxy/tests/sidecar.rs`.

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt as _, StreamExt as _};
use http::Version;
use hyper_util::rt::{TokioExecutor, TokioIo};
use postern_tests::mesh::TestCa;
use postern_tests::ws_backend::WsBackend;
use postern_tests::{
    empty, listener, request, start_proxy, within, H1Conn, H2Conn, HttpBackend, Proxy,
};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;

const ID_A: &str = "spiffe://cluster.local/ns/shop/sa/web";
const ID_B: &str = "spiffe://cluster.local/ns/shop/sa/api";
const MARKER: &str = "x-postern-original-protocol";

fn identity(files: &postern_tests::mesh::IdentityFiles, id: &str) -> String {
    format!(
        "identity:\n  spiffe_id: {id}\n  source:\n    files: {{ cert: {}, key: {}, bundle: {} }}",
        files.cert.display(),
        files.key.display(),
        files.bundle.display()
    )
}

struct Mesh {
    a: SocketAddr,
    b: SocketAddr,
    app: HttpBackend,
    h2c_app: HttpBackend,
    ws: WsBackend,
    _proxies: (Proxy, Proxy),
    _dir: tempfile::TempDir,
}

/// App → A (plaintext outbound) → mesh mTLS, HTTP/2 → B (permissive
/// inbound) → apps: `app` (HTTP/1.1 and h2c), `h2c-app` (h2c only) and a
/// WebSocket echo under `/ws`.
async fn mesh() -> Mesh {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = TestCa::new("mesh-protocols");
    let a_files = ca.write_identity(dir.path(), "a", ID_A);
    let b_files = ca.write_identity(dir.path(), "b", ID_B);
    let app = HttpBackend::start("app").await;
    let h2c_app = HttpBackend::start_h2c_only("h2c-app").await;
    let ws = WsBackend::start().await;

    // What the calling app spoke picks the cluster: the marker is B's own
    // word for it by the time routes look.
    let b = start_proxy(&format!(
        r#"
{identity}
listeners:
  - name: b-in
    address: 127.0.0.1:0
    kind: http
    mtls: {{ mode: permissive, allowed_identities: ["{ID_A}"] }}
    virtual_hosts:
      - name: h2c-app
        domains: ["h2c-app.shop"]
        routes:
          - match: {{ headers: [{{ name: {MARKER}, exact: "HTTP/2" }}] }}
            cluster: h2c-app
      - name: app
        domains: ["*"]
        routes:
          - match: {{ path: {{ prefix: /ws }} }}
            cluster: ws
          - match: {{ headers: [{{ name: {MARKER}, exact: "HTTP/2" }}] }}
            cluster: app-h2
          - match: {{}}
            cluster: app
clusters:
  - name: app
    endpoints: [{{ address: "{app}" }}]
  - name: app-h2
    protocol: http2
    endpoints: [{{ address: "{app}" }}]
  - name: h2c-app
    protocol: http2
    endpoints: [{{ address: "{h2c_app}" }}]
  - name: ws
    endpoints: [{{ address: "{ws}" }}]
"#,
        identity = identity(&b_files, ID_B),
        app = app.addr(),
        h2c_app = h2c_app.addr(),
        ws = ws.addr(),
    ))
    .await;
    within(Duration::from_secs(15), "B ready", b.ready()).await;
    let b_addr = listener(&b, "b-in");
    let a = start_proxy(&format!(
        r#"
{identity}
listeners:
  - name: a-out
    address: 127.0.0.1:0
    kind: http
    virtual_hosts:
      - name: all
        domains: ["*"]
        routes:
          - match: {{}}
            cluster: b
clusters:
  - name: b
    endpoints: [{{ address: "{b_addr}" }}]
    tls: {{ mode: mesh, identities: ["{ID_B}"] }}
"#,
        identity = identity(&a_files, ID_A),
    ))
    .await;
    within(Duration::from_secs(15), "A ready", a.ready()).await;
    Mesh {
        a: listener(&a, "a-out"),
        b: b_addr,
        app,
        h2c_app,
        ws,
        _proxies: (a, b),
        _dir: dir,
    }
}

fn assert_no_marker(backend: &HttpBackend) {
    for seen in backend.requests() {
        assert!(
            seen.headers.get(MARKER).is_none(),
            "the marker reached an app: {:?}",
            seen.headers
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_arrives_as_http1_and_h2c_as_h2c_through_two_sidecars() {
    let mesh = mesh().await;

    let mut h1 = H1Conn::connect(mesh.a).await.unwrap();
    let response = h1
        .send(request("GET", "api.shop", "/one").body(empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(response.status, 200, "{}", response.text());
    let seen = mesh.app.last_request();
    assert_eq!(seen.uri.path(), "/one");
    assert_eq!(seen.version, Version::HTTP_11);

    let mut h2 = H2Conn::connect(mesh.a).await.unwrap();
    let response = h2
        .send(request("GET", "api.shop", "/two").body(empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(response.status, 200, "{}", response.text());
    let seen = mesh.app.last_request();
    assert_eq!(seen.uri.path(), "/two");
    assert_eq!(seen.version, Version::HTTP_2);

    // An app that speaks only h2c gets its h2c callers.
    let response = h2
        .send(
            request("POST", "h2c-app.shop", "/three")
                .body(postern_tests::full("payload"))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(response.text(), "payload");
    assert_eq!(response.backend(), Some("h2c-app"));
    assert_eq!(mesh.h2c_app.last_request().version, Version::HTTP_2);

    // The hop between the sidecars was mesh mTLS all along.
    for seen in mesh.app.requests() {
        assert_eq!(
            seen.header("x-forwarded-client-cert"),
            Some(format!("By={ID_B};URI={ID_A}").as_str())
        );
    }
    assert_no_marker(&mesh.app);
    assert_no_marker(&mesh.h2c_app);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_original_protocol_is_ignored() {
    let mesh = mesh().await;

    // The app claims HTTP/2 over HTTP/1.1: A says what it saw instead.
    let mut h1 = H1Conn::connect(mesh.a).await.unwrap();
    let response = h1
        .send(
            request("GET", "api.shop", "/forged-via-a")
                .header(MARKER, "HTTP/2")
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(mesh.app.last_request().version, Version::HTTP_11);

    // A caller without a mesh identity (plaintext, B is permissive)
    // claims either way: its own protocol counts.
    let mut h1 = H1Conn::connect(mesh.b).await.unwrap();
    let response = h1
        .send(
            request("GET", "api.shop", "/forged-h1")
                .header(MARKER, "HTTP/2")
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status, 200, "{}", response.text());
    let seen = mesh.app.last_request();
    assert_eq!(seen.uri.path(), "/forged-h1");
    assert_eq!(seen.version, Version::HTTP_11);

    let mut h2 = H2Conn::connect(mesh.b).await.unwrap();
    let response = h2
        .send(
            request("GET", "api.shop", "/forged-h2")
                .header(MARKER, "HTTP/1.1")
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status, 200, "{}", response.text());
    let seen = mesh.app.last_request();
    assert_eq!(seen.uri.path(), "/forged-h2");
    assert_eq!(seen.version, Version::HTTP_2);

    assert_no_marker(&mesh.app);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_echo_through_two_sidecars() {
    let mesh = mesh().await;

    let stream = TcpStream::connect(mesh.a).await.unwrap();
    let (mut ws, response) = within(
        Duration::from_secs(10),
        "websocket handshake through both sidecars",
        tokio_tungstenite::client_async("ws://chat.shop/ws/room", stream),
    )
    .await
    .unwrap();
    assert_eq!(response.status(), 101);

    ws.send(Message::text("hello")).await.unwrap();
    let echoed = within(Duration::from_secs(5), "text echo", ws.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(echoed, Message::text("hello"));
    let payload: Vec<u8> = (0..=255u8).cycle().take(200_000).collect();
    ws.send(Message::binary(payload.clone())).await.unwrap();
    let echoed = within(Duration::from_secs(5), "binary echo", ws.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(echoed, Message::binary(payload));
    ws.close(None).await.unwrap();

    // The app saw an HTTP/1.1 upgrade with the caller's own key (the
    // handshake above checked the accept value made from it).
    let handshakes = mesh.ws.handshakes();
    assert_eq!(handshakes.len(), 1);
    let (path, headers) = &handshakes[0];
    assert_eq!(path, "/ws/room");
    assert_eq!(
        headers.get("upgrade").and_then(|v| v.to_str().ok()),
        Some("websocket")
    );
    assert!(headers.get(MARKER).is_none(), "{headers:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2c_upgrade_request_goes_on_as_a_plain_request() {
    let mesh = mesh().await;

    // `curl --http2 http://…` asks its next hop to switch to HTTP/2; that
    // is A, which speaks HTTP/2 onward anyway, so nothing is tunnelled.
    let mut h1 = H1Conn::connect(mesh.a).await.unwrap();
    let response = h1
        .send(
            request("GET", "api.shop", "/h2c-upgrade")
                .header("connection", "Upgrade, HTTP2-Settings")
                .header("upgrade", "h2c")
                .header("http2-settings", "AAMAAABkAARAAAAAAAIAAAAA")
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status, 200, "{}", response.text());
    let seen = mesh.app.last_request();
    assert_eq!(seen.uri.path(), "/h2c-upgrade");
    assert_eq!(seen.version, Version::HTTP_11);
    assert!(seen.headers.get("upgrade").is_none(), "{:?}", seen.headers);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_websocket_client_reaches_an_http1_websocket_app() {
    let mesh = mesh().await;

    // RFC 8441 straight to B: an extended CONNECT with no
    // Sec-WebSocket-Key, which the HTTP/1.1 app requires; B makes one up.
    let stream = TcpStream::connect(mesh.b).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let mut connect = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri("http://chat.shop/ws/h2")
        .header("sec-websocket-version", "13")
        .body(empty())
        .unwrap();
    connect
        .extensions_mut()
        .insert(hyper::ext::Protocol::from_static("websocket"));
    let mut response = within(
        Duration::from_secs(10),
        "extended CONNECT answered",
        sender.send_request(connect),
    )
    .await
    .unwrap();
    assert_eq!(response.status(), 200);
    let upgraded = hyper::upgrade::on(&mut response).await.unwrap();
    let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
        TokioIo::new(upgraded),
        Role::Client,
        None,
    )
    .await;
    ws.send(Message::text("over h2")).await.unwrap();
    let echoed = within(Duration::from_secs(5), "echo over h2", ws.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(echoed, Message::text("over h2"));

    let handshakes = mesh.ws.handshakes();
    let (path, headers) = handshakes.last().unwrap();
    assert_eq!(path, "/ws/h2");
    assert!(headers.contains_key("sec-websocket-key"), "{headers:?}");
}

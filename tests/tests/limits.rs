//! Listener limits (431, 413, header read timeout) and the headers the
//! proxy adds, replaces and strips on the way upstream.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use postern_tests::client::raw_exchange;
use postern_tests::{
    empty, full, get, listener, request, send, start_proxy, within, H1Conn, H2Conn, HttpBackend,
};

fn config(limits: &str, http: &str, backend: SocketAddr) -> String {
    format!(
        r#"
        listeners:
          - name: edge
            address: 127.0.0.1:0
            kind: http
            limits: {{ {limits} }}
            http: {{ {http} }}
            virtual_hosts:
              - name: all
                domains: ["*"]
                routes:
                  - match: {{}}
                    cluster: c
        clusters:
          - name: c
            endpoints: [{{ address: "{backend}" }}]
        "#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_request_headers_is_431() {
    let backend = HttpBackend::start("b").await;
    let proxy = start_proxy(&config("max_request_headers: 10", "", backend.addr())).await;
    let edge = listener(&proxy, "edge");

    let mut req = request("GET", "svc.local", "/");
    for i in 0..20 {
        req = req.header(format!("x-extra-{i}"), "v");
    }
    let response = send(edge, req.body(empty()).unwrap()).await;
    assert_eq!(response.status, 431);
    assert_eq!(backend.started(), 0);

    let mut req = request("GET", "svc.local", "/");
    for i in 0..5 {
        req = req.header(format!("x-extra-{i}"), "v");
    }
    let response = send(edge, req.body(empty()).unwrap()).await;
    assert_eq!(response.status, 200, "a request under the limit passes");
}

/// Sends one request with an `x-big` header of `big` bytes over HTTP/1.1 and
/// HTTP/2 to a listener limited to `limit` header bytes, and one with a small
/// header; expects 431 for the big one.
async fn check_header_bytes_limit(limit: usize, big: usize) {
    let backend = HttpBackend::start("b").await;
    let proxy = start_proxy(&config(
        &format!("max_request_headers_bytes: {limit}"),
        "",
        backend.addr(),
    ))
    .await;
    let edge = listener(&proxy, "edge");
    let with_header = |len: usize| {
        request("GET", "svc.local", "/")
            .header("x-big", "a".repeat(len))
            .body(empty())
            .expect("request")
    };

    let response = send(edge, with_header(big)).await;
    assert_eq!(
        response.status, 431,
        "http/1.1, limit {limit}, header {big}"
    );
    let mut h2 = H2Conn::connect(edge).await.expect("h2 connect");
    let response = h2.send(with_header(big)).await.expect("h2 exchange");
    assert_eq!(response.status, 431, "http/2, limit {limit}, header {big}");
    assert_eq!(backend.started(), 0);

    assert_eq!(
        send(edge, with_header(512)).await.status,
        200,
        "a request under the limit passes"
    );
    let mut h2 = H2Conn::connect(edge).await.expect("h2 connect");
    assert_eq!(
        h2.send(with_header(512)).await.expect("h2 exchange").status,
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_large_request_headers_is_431() {
    check_header_bytes_limit(16 * 1024, 32 * 1024).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_request_header_limit_is_enforced() {
    // Below hyper's smallest HTTP/1 read buffer (8 KiB): the limit must
    // still hold, as the config accepts any value above zero.
    check_header_bytes_limit(2048, 4096).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_over_limit_is_413_before_reaching_upstream() {
    let backend = HttpBackend::start("b").await;
    let proxy = start_proxy(&config("max_request_body_bytes: 1024", "", backend.addr())).await;
    let edge = listener(&proxy, "edge");

    let req = request("POST", "svc.local", "/upload")
        .body(full(vec![b'x'; 4096]))
        .unwrap();
    let response = send(edge, req).await;
    assert_eq!(response.status, 413);
    assert_eq!(
        backend.started(),
        0,
        "a known-too-long body is refused up front"
    );

    let req = request("POST", "svc.local", "/upload")
        .body(full(vec![b'x'; 1000]))
        .unwrap();
    let response = send(edge, req).await;
    assert_eq!(response.status, 200);
    assert_eq!(response.body.len(), 1000);

    // Without a length up front (chunked), the limit cuts the stream off.
    let reply = raw_exchange(
        edge,
        format!(
            "POST /upload HTTP/1.1\r\nHost: svc.local\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n800\r\n{}\r\n0\r\n\r\n",
            "x".repeat(0x800)
        )
        .as_bytes(),
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    assert!(
        reply.text().starts_with("HTTP/1.1 413"),
        "{:?}",
        reply.text()
    );
    assert!(
        backend.requests().iter().all(|r| r.body_len <= 1024),
        "no request with more than the limit reached the backend"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_request_head_is_cut_off() {
    let backend = HttpBackend::start("b").await;
    let proxy = start_proxy(&config("header_read_timeout: 300ms", "", backend.addr())).await;
    let edge = listener(&proxy, "edge");

    let started = Instant::now();
    // A head that never ends (no blank line).
    let reply = raw_exchange(
        edge,
        b"GET / HTTP/1.1\r\nHost: svc.local\r\nX-Slow: ",
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    let elapsed = started.elapsed();
    assert!(
        reply.closed,
        "the connection is still open after 5s: {:?}",
        reply.text()
    );
    assert!(
        reply.text().starts_with("HTTP/1.1 408"),
        "expected 408, got {:?}",
        reply.text()
    );
    assert!(
        elapsed >= Duration::from_millis(250),
        "closed after {elapsed:?}, before the timeout"
    );
    assert_eq!(backend.started(), 0);

    // A whole head in time is served.
    assert_eq!(get(edge, "svc.local", "/").await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_headers_and_request_id_when_not_trusting_downstream() {
    let backend = HttpBackend::start("b").await;
    let proxy = start_proxy(&config("", "", backend.addr())).await;
    let edge = listener(&proxy, "edge");

    assert_eq!(get(edge, "svc.local", "/").await.status, 200);
    let first = backend.last_request();
    assert_eq!(first.header("x-forwarded-for"), Some("127.0.0.1"));
    assert_eq!(first.header("x-forwarded-proto"), Some("http"));
    let first_id = first
        .header("x-request-id")
        .expect("x-request-id is generated")
        .to_owned();
    assert!(!first_id.is_empty());

    let req = request("GET", "svc.local", "/")
        .header("x-forwarded-for", "203.0.113.7")
        .header("x-forwarded-proto", "https")
        .header("x-request-id", "client-chosen")
        .body(empty())
        .unwrap();
    assert_eq!(send(edge, req).await.status, 200);
    let second = backend.last_request();
    assert_eq!(
        second.header("x-forwarded-for"),
        Some("203.0.113.7, 127.0.0.1")
    );
    assert_eq!(
        second.header("x-forwarded-proto"),
        Some("http"),
        "an untrusted claim is overwritten"
    );
    let second_id = second.header("x-request-id").expect("x-request-id");
    assert_ne!(
        second_id, "client-chosen",
        "an untrusted request id is replaced"
    );
    assert!(!second_id.is_empty());
    assert_ne!(second_id, first_id, "request ids are unique");
    assert_eq!(second.headers.get_all("x-request-id").iter().count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_headers_and_request_id_when_trusting_downstream() {
    let backend = HttpBackend::start("b").await;
    let proxy = start_proxy(&config("", "trust_downstream: true", backend.addr())).await;
    let edge = listener(&proxy, "edge");

    let req = request("GET", "svc.local", "/")
        .header("x-forwarded-proto", "https")
        .header("x-request-id", "client-chosen")
        .body(empty())
        .unwrap();
    assert_eq!(send(edge, req).await.status, 200);
    let seen = backend.last_request();
    assert_eq!(seen.header("x-forwarded-proto"), Some("https"));
    assert_eq!(seen.header("x-request-id"), Some("client-chosen"));
    assert_eq!(seen.header("x-forwarded-for"), Some("127.0.0.1"));

    assert_eq!(get(edge, "svc.local", "/").await.status, 200);
    let seen = backend.last_request();
    assert_eq!(
        seen.header("x-forwarded-proto"),
        Some("http"),
        "set when absent"
    );
    assert!(
        seen.header("x-request-id").is_some_and(|v| !v.is_empty()),
        "generated when absent"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_headers_are_not_forwarded() {
    let backend = HttpBackend::start("b").await;
    let proxy = start_proxy(&config("", "", backend.addr())).await;
    let edge = listener(&proxy, "edge");

    let head = "GET /hop HTTP/1.1\r\n\
                Host: svc.local\r\n\
                Connection: close, X-Custom-Hop\r\n\
                X-Custom-Hop: 1\r\n\
                Keep-Alive: timeout=5\r\n\
                Proxy-Connection: keep-alive\r\n\
                TE: gzip\r\n\
                X-Keep-Me: yes\r\n\
                \r\n";
    let reply = raw_exchange(edge, head.as_bytes(), Duration::from_secs(5))
        .await
        .unwrap();
    assert!(
        reply.text().starts_with("HTTP/1.1 200"),
        "{:?}",
        reply.text()
    );
    assert!(reply.closed, "Connection: close is honoured");
    let seen = backend.last_request();
    for name in [
        "x-custom-hop",
        "keep-alive",
        "proxy-connection",
        "te",
        "upgrade",
    ] {
        assert!(
            seen.headers.get(name).is_none(),
            "{name} was forwarded: {:?}",
            seen.headers
        );
    }
    // The upstream connection may carry its own Connection header, but never
    // the client's tokens.
    let connection = seen
        .header("connection")
        .unwrap_or_default()
        .to_ascii_lowercase();
    assert!(
        !connection.contains("x-custom-hop"),
        "connection: {connection}"
    );
    assert_eq!(seen.header("x-keep-me"), Some("yes"));

    // `TE: trailers` is the one TE value that is kept.
    let head = "GET /te HTTP/1.1\r\nHost: svc.local\r\nConnection: close\r\nTE: trailers\r\n\r\n";
    let reply = raw_exchange(edge, head.as_bytes(), Duration::from_secs(5))
        .await
        .unwrap();
    assert!(
        reply.text().starts_with("HTTP/1.1 200"),
        "{:?}",
        reply.text()
    );
    assert_eq!(backend.last_request().header("te"), Some("trailers"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_header_without_websocket_is_not_forwarded() {
    let backend = HttpBackend::start("b").await;
    let proxy = start_proxy(&config("", "", backend.addr())).await;
    let edge = listener(&proxy, "edge");

    let head = "GET /up HTTP/1.1\r\nHost: svc.local\r\nConnection: close\r\nUpgrade: foo/1\r\n\r\n";
    let reply = raw_exchange(edge, head.as_bytes(), Duration::from_secs(5))
        .await
        .unwrap();
    assert!(
        reply.text().starts_with("HTTP/1.1 200"),
        "{:?}",
        reply.text()
    );
    let seen = backend.last_request();
    assert!(
        seen.headers.get("upgrade").is_none(),
        "upgrade was forwarded: {:?}",
        seen.headers
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keep_alive_outlives_header_timeout_and_closes_at_idle_timeout() {
    let backend = HttpBackend::start("b").await;
    let proxy = start_proxy(&config(
        "header_read_timeout: 200ms, idle_timeout: 1500ms",
        "",
        backend.addr(),
    ))
    .await;
    let edge = listener(&proxy, "edge");

    let mut conn = H1Conn::connect(edge).await.unwrap();
    let req = || request("GET", "svc.local", "/").body(empty()).unwrap();
    assert_eq!(conn.send(req()).await.unwrap().status, 200);
    // Waiting for the next request is not a slow request head: no time-based
    // condition can be polled here, the point is that time passes.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(
        !conn.is_closed(),
        "idle keep-alive closed by the header timeout"
    );
    assert_eq!(conn.send(req()).await.unwrap().status, 200);

    let idle_since = Instant::now();
    within(Duration::from_secs(5), "idle close", conn.closed()).await;
    assert!(
        idle_since.elapsed() >= Duration::from_millis(1200),
        "closed after {:?}, before the idle timeout",
        idle_since.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_are_answered_in_order() {
    let backend = HttpBackend::start("b").await;
    let proxy = start_proxy(&config("", "", backend.addr())).await;
    let edge = listener(&proxy, "edge");

    let pipelined = b"GET /first HTTP/1.1\r\nHost: svc.local\r\n\r\n\
        POST /second HTTP/1.1\r\nHost: svc.local\r\nContent-Length: 5\r\n\r\nhello\
        GET /third HTTP/1.1\r\nHost: svc.local\r\nConnection: close\r\n\r\n";
    let reply = raw_exchange(edge, pipelined, Duration::from_secs(5))
        .await
        .unwrap();
    assert!(reply.closed, "connection: close on the last request closes");
    let text = reply.text();
    assert_eq!(text.matches("HTTP/1.1 200").count(), 3, "{text}");
    let paths: Vec<String> = backend
        .requests()
        .iter()
        .map(|r| r.path_and_query())
        .collect();
    assert_eq!(paths, ["/first", "/second", "/third"]);
    assert_eq!(backend.requests()[1].body_len, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_max_are_closed_at_once() {
    let backend = HttpBackend::start("b").await;
    let proxy = start_proxy(&config("max_connections: 2", "", backend.addr())).await;
    let edge = listener(&proxy, "edge");

    let mut first = H1Conn::connect(edge).await.unwrap();
    let mut second = H1Conn::connect(edge).await.unwrap();
    let req = || request("GET", "svc.local", "/").body(empty()).unwrap();
    assert_eq!(first.send(req()).await.unwrap().status, 200);
    assert_eq!(second.send(req()).await.unwrap().status, 200);

    let reply = raw_exchange(
        edge,
        b"GET / HTTP/1.1\r\nHost: svc.local\r\n\r\n",
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    assert!(reply.closed && reply.bytes.is_empty(), "{:?}", reply.text());
    assert_eq!(backend.started(), 2);

    drop(first);
    postern_tests::eventually("a slot to free up", || async {
        let reply = raw_exchange(
            edge,
            b"GET / HTTP/1.1\r\nHost: svc.local\r\nConnection: close\r\n\r\n",
            Duration::from_secs(5),
        )
        .await
        .ok()?;
        reply.text().starts_with("HTTP/1.1 200").then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trickled_retry_body_is_cut_off_at_the_route_timeout() {
    let backend = HttpBackend::start("b").await;
    let yaml = config("", "", backend.addr()).replace(
        "                    cluster: c\n",
        "                    cluster: c\n                    timeout: 300ms\n                    retry: { on: [5xx], max_attempts: 2 }\n",
    );
    assert!(yaml.contains("timeout: 300ms"), "{yaml}");
    let proxy = start_proxy(&yaml).await;
    let edge = listener(&proxy, "edge");

    // PUT is idempotent, so its small body is kept for a retry: 3 of 10 bytes.
    let reply = raw_exchange(
        edge,
        b"PUT / HTTP/1.1\r\nHost: svc.local\r\nContent-Length: 10\r\n\r\nabc",
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    assert!(
        reply.text().starts_with("HTTP/1.1 408"),
        "{:?}",
        reply.text()
    );
    assert_eq!(backend.started(), 0, "nothing reaches the backend");
}

/// A listener of its own, so that parked-connection counts are this test's
/// alone (tests share one metrics registry).
fn parking_config(name: &str, backend: SocketAddr) -> String {
    config("header_read_timeout: 400ms, idle_timeout: 60s", "", backend)
        .replace("name: edge", &format!("name: {name}"))
}

async fn wait_parked(proxy: &postern_tests::Proxy, listener: &str, count: f64) {
    let _recorder = postern::telemetry::install_prometheus_recorder();
    let admin = proxy.admin_addr();
    within(
        Duration::from_secs(10),
        "the idle connection parked",
        async {
            while postern_tests::prom::scrape(
                admin,
                postern::telemetry::metrics::DOWNSTREAM_CONNECTIONS_PARKED_TOTAL,
                &[("listener", listener)],
            )
            .await
                < count
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_http1_connection_lets_go_of_its_buffers_and_serves_the_next_request() {
    let backend = HttpBackend::start("b").await;
    let proxy = start_proxy(&parking_config("parking", backend.addr())).await;
    let edge = listener(&proxy, "parking");

    let mut conn = H1Conn::connect(edge).await.unwrap();
    let req = |path: &str| request("GET", "svc.local", path).body(empty()).unwrap();
    assert_eq!(conn.send(req("/first")).await.unwrap().status, 200);
    wait_parked(&proxy, "parking", 1.0).await;
    assert!(!conn.is_closed(), "a parked connection stays open");
    // The same connection, served again after hyper was let go, and parked
    // again once idle.
    assert_eq!(conn.send(req("/second")).await.unwrap().status, 200);
    wait_parked(&proxy, "parking", 2.0).await;
    assert_eq!(conn.send(req("/third")).await.unwrap().status, 200);
    let paths: Vec<String> = backend
        .requests()
        .iter()
        .map(|r| r.path_and_query())
        .collect();
    assert_eq!(paths, ["/first", "/second", "/third"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_of_the_next_request_read_before_parking_are_kept() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let backend = HttpBackend::start("b").await;
    let proxy = start_proxy(&parking_config("parking-partial", backend.addr())).await;
    let edge = listener(&proxy, "parking-partial");

    let mut stream = tokio::net::TcpStream::connect(edge).await.unwrap();
    // The first request and the start of the second in one write: hyper
    // reads both, answers the first and holds the rest while idle.
    stream
        .write_all(b"GET /a HTTP/1.1\r\nHost: svc.local\r\n\r\nGET /b HTT")
        .await
        .unwrap();
    let mut reply = Vec::new();
    let mut buf = [0u8; 4096];
    // The answer has no body: its head's end is its end.
    while !String::from_utf8_lossy(&reply).contains("\r\n\r\n") {
        let n = stream.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed before the first answer");
        reply.extend_from_slice(&buf[..n]);
    }
    assert!(String::from_utf8_lossy(&reply).starts_with("HTTP/1.1 200"));
    wait_parked(&proxy, "parking-partial", 1.0).await;
    stream
        .write_all(b"P/1.1\r\nHost: svc.local\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let rest = postern_tests::client::read_until_close(&mut stream, Duration::from_secs(5)).await;
    assert!(rest.closed);
    assert!(rest.text().starts_with("HTTP/1.1 200"), "{}", rest.text());
    let paths: Vec<String> = backend
        .requests()
        .iter()
        .map(|r| r.path_and_query())
        .collect();
    assert_eq!(paths, ["/a", "/b"]);
}

//! Protocols: HTTP/1.1 keep-alive, h2c on both sides, gRPC (unary and all
//! streaming shapes), WebSocket upgrades, TCP proxying with half-close, and
//! 100 MiB bodies streamed both ways.

use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt as _, StreamExt as _};
use http::Version;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use postern_tests::grpc::{self, pb::EchoRequest, GrpcBackend};
use postern_tests::tcp_backend::TcpBackend;
use postern_tests::ws_backend::WsBackend;
use postern_tests::{
    empty, full, listener, request, start_proxy, wait_until, within, Body, BoxError, H1Conn,
    H2Conn, HttpBackend,
};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

fn http_config(cluster_protocol: &str, backend: std::net::SocketAddr) -> String {
    format!(
        r#"
        listeners:
          - name: edge
            address: 127.0.0.1:0
            kind: http
            virtual_hosts:
              - name: all
                domains: ["*"]
                routes:
                  - match: {{}}
                    cluster: c
        clusters:
          - name: c
            protocol: {cluster_protocol}
            endpoints: [{{ address: "{backend}" }}]
        "#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_keep_alive_downstream_and_pooled_upstream() {
    let backend = HttpBackend::start("b").await;
    let proxy = start_proxy(&http_config("http1", backend.addr())).await;
    let edge = listener(&proxy, "edge");

    let mut conn = H1Conn::connect(edge).await.unwrap();
    for i in 0..5 {
        let body = format!("request {i}");
        let req = request("POST", "svc.local", "/echo")
            .body(full(body.clone()))
            .unwrap();
        let response = conn.send(req).await.unwrap();
        assert_eq!(response.status, 200, "request {i}");
        assert_eq!(response.version, Version::HTTP_11);
        assert_eq!(response.text(), body, "request {i}: the body is echoed");
        assert!(
            !conn.is_closed(),
            "request {i}: the proxy closed a keep-alive connection"
        );
    }
    let seen = backend.requests();
    assert_eq!(seen.len(), 5);
    assert!(seen.iter().all(|r| r.version == Version::HTTP_11));
    // Sequential requests reuse one pooled upstream connection.
    assert_eq!(backend.connections(), 1);
    assert!(seen.iter().all(|r| r.peer == seen[0].peer));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_downstream_multiplexes_to_http1_upstream() {
    let backend = HttpBackend::start("b").await;
    let proxy = start_proxy(&http_config("http1", backend.addr())).await;
    let edge = listener(&proxy, "edge");

    let conn = H2Conn::connect(edge).await.unwrap();
    // Concurrent streams on one connection; each waits 200ms upstream, so
    // they overlap only if the proxy multiplexes.
    let mut tasks = Vec::new();
    for i in 0..8 {
        let mut conn = conn.clone();
        tasks.push(tokio::spawn(async move {
            let req = request("POST", "svc.local", &format!("/s/{i}"))
                .header("x-test-delay-ms", "200")
                .body(full(format!("stream {i}")))
                .unwrap();
            conn.send(req).await.unwrap()
        }));
    }
    for (i, task) in tasks.into_iter().enumerate() {
        let response = within(Duration::from_secs(10), "h2 stream", task)
            .await
            .unwrap();
        assert_eq!(response.status, 200);
        assert_eq!(response.version, Version::HTTP_2);
        assert_eq!(response.text(), format!("stream {i}"));
    }
    assert!(backend.max_in_flight() > 1, "the streams were serialised");
    let seen = backend.requests();
    assert_eq!(seen.len(), 8);
    assert!(
        seen.iter().all(|r| r.version == Version::HTTP_11),
        "cluster protocol is http1"
    );
    assert!(seen
        .iter()
        .all(|r| r.host().as_deref() == Some("svc.local")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_upstream_with_cluster_protocol_http2() {
    let backend = HttpBackend::start("b").await;
    let proxy = start_proxy(&http_config("http2", backend.addr())).await;
    let edge = listener(&proxy, "edge");

    let mut conn = H1Conn::connect(edge).await.unwrap();
    for i in 0..3 {
        let req = request("POST", "svc.local", "/h2")
            .body(full(format!("r{i}")))
            .unwrap();
        let response = conn.send(req).await.unwrap();
        assert_eq!(response.status, 200);
        assert_eq!(response.text(), format!("r{i}"));
    }
    let seen = backend.requests();
    assert!(
        seen.iter().all(|r| r.version == Version::HTTP_2),
        "{:?}",
        seen.iter().map(|r| r.version).collect::<Vec<_>>()
    );
    assert_eq!(seen[0].host().as_deref(), Some("svc.local"));
    assert_eq!(
        backend.connections(),
        1,
        "one multiplexed upstream connection"
    );
}

fn grpc_config(backend: std::net::SocketAddr) -> String {
    format!(
        r#"
        listeners:
          - name: edge
            address: 127.0.0.1:0
            kind: http
            virtual_hosts:
              - name: all
                domains: ["*"]
                routes:
                  - match:
                      path: {{ prefix: /postern.test.echo.Echo/ }}
                    cluster: grpc
        clusters:
          - name: grpc
            protocol: http2
            endpoints: [{{ address: "{backend}" }}]
        "#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_unary_and_one_way_streams_through_proxy() {
    let backend = GrpcBackend::start("grpc-a").await;
    let proxy = start_proxy(&grpc_config(backend.addr())).await;
    let edge = listener(&proxy, "edge");
    let mut client = grpc::client(edge).await.unwrap();

    let reply = client
        .say(EchoRequest {
            message: "hello".into(),
            repeat: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.message, "hello");
    assert_eq!(reply.backend, "grpc-a");

    let replies: Vec<_> = client
        .repeat(EchoRequest {
            message: "again".into(),
            repeat: 5,
        })
        .await
        .unwrap()
        .into_inner()
        .map(|r| r.unwrap().index)
        .collect()
        .await;
    assert_eq!(replies, [0, 1, 2, 3, 4]);

    let messages = ["a", "b", "c"].map(|m| EchoRequest {
        message: m.into(),
        repeat: 0,
    });
    let reply = client
        .collect(futures_util::stream::iter(messages))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.message, "a,b,c");
    assert_eq!(reply.index, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_bidi_streaming_is_interactive_through_proxy() {
    let backend = GrpcBackend::start("grpc-b").await;
    let proxy = start_proxy(&grpc_config(backend.addr())).await;
    let edge = listener(&proxy, "edge");
    let mut client = grpc::client(edge).await.unwrap();

    let (tx, rx) = tokio::sync::mpsc::channel::<EchoRequest>(1);
    let outbound =
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) });
    let mut inbound = client.chat(outbound).await.unwrap().into_inner();
    // Each reply must arrive before the next message is sent: a proxy that
    // buffered either direction would stall here.
    for i in 0..5u32 {
        tx.send(EchoRequest {
            message: format!("ping {i}"),
            repeat: 0,
        })
        .await
        .unwrap();
        let reply = within(Duration::from_secs(5), "bidi reply", inbound.message())
            .await
            .unwrap()
            .expect("a reply per message");
        assert_eq!(reply.message, format!("ping {i}"));
        assert_eq!(reply.index, i);
    }
    drop(tx);
    let end = within(
        Duration::from_secs(5),
        "end of bidi stream",
        inbound.message(),
    )
    .await
    .unwrap();
    assert!(end.is_none(), "the server ends its stream after ours");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrade_passes_through() {
    let backend = WsBackend::start().await;
    let addr = backend.addr();
    let proxy = start_proxy(&format!(
        r#"
        listeners:
          - name: edge
            address: 127.0.0.1:0
            kind: http
            virtual_hosts:
              - name: all
                domains: ["*"]
                routes:
                  - match:
                      path: {{ prefix: /ws }}
                    cluster: ws
        clusters:
          - name: ws
            endpoints: [{{ address: "{addr}" }}]
        "#
    ))
    .await;
    let edge = listener(&proxy, "edge");

    let stream = TcpStream::connect(edge).await.unwrap();
    let (mut ws, response) = within(
        Duration::from_secs(10),
        "websocket handshake",
        tokio_tungstenite::client_async("ws://chat.local/ws/room", stream),
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

    let handshakes = backend.handshakes();
    assert_eq!(handshakes.len(), 1);
    let (path, headers) = &handshakes[0];
    assert_eq!(path, "/ws/room");
    assert_eq!(
        headers
            .get("upgrade")
            .and_then(|v| v.to_str().ok())
            .map(str::to_ascii_lowercase)
            .as_deref(),
        Some("websocket")
    );
}

fn tcp_config(backend: std::net::SocketAddr) -> String {
    format!(
        r#"
        listeners:
          - name: tcp
            address: 127.0.0.1:0
            kind: tcp
            tcp:
              cluster: echo
        clusters:
          - name: echo
            endpoints: [{{ address: "{backend}" }}]
        "#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_echo_with_client_half_close() {
    let backend = TcpBackend::echo().await;
    let proxy = start_proxy(&tcp_config(backend.addr())).await;
    let addr = listener(&proxy, "tcp");

    let data: Vec<u8> = (0..=255u8).cycle().take(1 << 20).collect();
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut read, mut write) = stream.into_split();
    let sent = data.clone();
    let writer = tokio::spawn(async move {
        write.write_all(&sent).await.unwrap();
        // Half-close: no more data from us, but keep reading.
        write.shutdown().await.unwrap();
        write
    });
    let mut echoed = Vec::new();
    within(
        Duration::from_secs(20),
        "the whole echo and EOF",
        read.read_to_end(&mut echoed),
    )
    .await
    .unwrap();
    let _write = writer.await.unwrap();
    assert_eq!(echoed.len(), data.len());
    assert!(echoed == data, "the echo differs from what was sent");
    let b = &backend;
    wait_until("the backend to see our EOF", || async move {
        b.received().len() == 1
    })
    .await;
    assert_eq!(backend.received()[0].len(), data.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_backend_half_close_reaches_client_and_client_can_still_send() {
    let backend = TcpBackend::banner(b"welcome\n").await;
    let proxy = start_proxy(&tcp_config(backend.addr())).await;
    let addr = listener(&proxy, "tcp");

    let mut stream = TcpStream::connect(addr).await.unwrap();
    let mut banner = Vec::new();
    within(
        Duration::from_secs(10),
        "banner and EOF",
        stream.read_to_end(&mut banner),
    )
    .await
    .unwrap();
    assert_eq!(banner, b"welcome\n");
    // The backend closed only its write side: what we send still arrives.
    stream.write_all(b"after your eof").await.unwrap();
    stream.shutdown().await.unwrap();
    let b = &backend;
    wait_until("the backend to get our bytes and EOF", || async move {
        b.received().len() == 1
    })
    .await;
    assert_eq!(backend.received()[0], b"after your eof");
}

const BIG: u64 = 100 * 1024 * 1024;
const CHUNK: usize = 64 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn big_request_body_streams_through() {
    let backend = HttpBackend::start("sink").await;
    let proxy = start_proxy(&http_config("http1", backend.addr())).await;
    let edge = listener(&proxy, "edge");

    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(8);
    let frames = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|chunk| (Ok::<_, BoxError>(Frame::data(chunk)), rx))
    });
    let body: Body = BodyExt::boxed(StreamBody::new(frames));
    let req = request("PUT", "svc.local", "/upload")
        .header("content-length", BIG)
        .header("x-test-discard-body", "true")
        .body(body)
        .unwrap();
    let mut conn = H1Conn::connect(edge).await.unwrap();
    let exchange = tokio::spawn(async move { conn.send(req).await });

    let chunk = Bytes::from(vec![b'u'; CHUNK]);
    let chunks = usize::try_from(BIG).unwrap() / CHUNK;
    // Send the first 16 MiB and hold the rest back: a proxy that buffers
    // the body would forward nothing until the end.
    let held_at = 16 * 1024 * 1024 / CHUNK;
    for _ in 0..held_at {
        tx.send(chunk.clone()).await.unwrap();
    }
    let b = &backend;
    wait_until(
        "body bytes to reach the backend before the upload ends",
        || async move { b.bytes_received() >= 8 * 1024 * 1024 },
    )
    .await;
    assert!(!exchange.is_finished());
    for _ in held_at..chunks {
        tx.send(chunk.clone()).await.unwrap();
    }
    drop(tx);
    let response = within(Duration::from_secs(60), "100 MiB upload", exchange)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(response.status, 200);
    assert_eq!(
        response.header("x-received-bytes"),
        Some(BIG.to_string().as_str())
    );
    assert_eq!(backend.bytes_received(), BIG);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn big_response_body_streams_through() {
    let backend = HttpBackend::start("source").await;
    let proxy = start_proxy(&http_config("http1", backend.addr())).await;
    let edge = listener(&proxy, "edge");

    let mut conn = H1Conn::connect(edge).await.unwrap();
    let req = request("GET", "svc.local", "/download")
        .header("x-test-body-bytes", BIG)
        .body(empty())
        .unwrap();
    let response = conn.send_streaming(req).await.unwrap();
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let mut received = 0u64;
    let mut produced_at_first_byte = None;
    within(Duration::from_secs(60), "100 MiB download", async {
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame.unwrap().into_data() {
                if produced_at_first_byte.is_none() && !data.is_empty() {
                    produced_at_first_byte = Some(backend.bytes_sent());
                }
                received += data.len() as u64;
            }
        }
    })
    .await;
    assert_eq!(received, BIG);
    let produced = produced_at_first_byte.unwrap();
    // Streaming: the first bytes reach us long before the backend has made
    // them all (flow control holds the backend back).
    assert!(
        produced < BIG / 2,
        "the backend had produced {produced} bytes when the first arrived"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_idle_timeout_closes_a_silent_pair() {
    let backend = TcpBackend::echo().await;
    let yaml = tcp_config(backend.addr()).replace(
        "              cluster: echo\n",
        "              cluster: echo\n              idle_timeout: 300ms\n",
    );
    let proxy = start_proxy(&yaml).await;
    let addr = listener(&proxy, "tcp");

    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    stream.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping");
    let started = std::time::Instant::now();
    let mut rest = Vec::new();
    within(
        Duration::from_secs(5),
        "the idle pair to close",
        stream.read_to_end(&mut rest),
    )
    .await
    .unwrap();
    assert!(rest.is_empty());
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "closed after {:?}, before the idle timeout",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_connect_failure_moves_to_the_next_endpoint() {
    let backend = TcpBackend::echo().await;
    let dead = postern_tests::dead_addr();
    let yaml = tcp_config(backend.addr()).replace(
        &format!("endpoints: [{{ address: \"{}\" }}]", backend.addr()),
        &format!(
            "endpoints: [{{ address: \"{dead}\" }}, {{ address: \"{}\" }}]",
            backend.addr()
        ),
    );
    assert!(yaml.contains(&dead.to_string()));
    let proxy = start_proxy(&yaml).await;
    let addr = listener(&proxy, "tcp");
    for _ in 0..4 {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(b"hi").await.unwrap();
        stream.shutdown().await.unwrap();
        let mut echoed = Vec::new();
        within(
            Duration::from_secs(5),
            "echo",
            stream.read_to_end(&mut echoed),
        )
        .await
        .unwrap();
        assert_eq!(echoed, b"hi");
    }
}

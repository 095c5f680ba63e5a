#![allow(clippy::unwrap_used)]

use super::*;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// An HTTP/1.1 app on 127.0.0.1: `/healthy` answers 200, `/moved` 302,
/// `/headers` 200 only with the probe's Host and `x-probe: yes`, anything
/// else 500.
async fn http_app() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let service = service_fn(|request: Request<Incoming>| async move {
                    let headers = request.headers();
                    let status = match request.uri().path() {
                        "/healthy" => StatusCode::OK,
                        "/moved" => StatusCode::FOUND,
                        "/headers"
                            if headers[header::HOST] == "app.internal"
                                && headers["x-probe"] == "yes" =>
                        {
                            StatusCode::OK
                        }
                        _ => StatusCode::INTERNAL_SERVER_ERROR,
                    };
                    let mut response = Response::new(Empty::<Bytes>::new());
                    *response.status_mut() = status;
                    Ok::<_, Infallible>(response)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

/// A port on 127.0.0.1 that nothing listens on.
async fn closed_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap().port()
}

async fn status_server(json: &str) -> SocketAddr {
    let server = StatusServer::bind(
        "127.0.0.1:0".parse().unwrap(),
        AppProbes::from_json(json).unwrap(),
    )
    .await
    .unwrap();
    let addr = server.local_addr().unwrap();
    tokio::spawn(server.serve());
    addr
}

/// What a kubelet sees: the status code of a plaintext GET.
async fn probe(server: SocketAddr, path: &str) -> u16 {
    let mut stream = TcpStream::connect(server).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: {server}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    answer
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {answer:?}"))
}

#[tokio::test]
async fn http_probes_answer_200_for_a_healthy_app_and_503_otherwise() {
    let app = http_app().await.port();
    let down = closed_port().await;
    let json = serde_json::json!({
        "/app-health/web/readyz": {"httpGet": {"path": "/healthy", "port": app}, "timeoutSeconds": 2},
        "/app-health/web/livez": {"httpGet": {"path": "/sick", "port": app, "scheme": "HTTP"}},
        "/app-health/web/startupz": {"httpGet": {"path": "/moved", "port": app}},
        "/app-health/hdr/readyz": {"httpGet": {"path": "/headers", "port": app, "httpHeaders": [
            {"name": "Host", "value": "app.internal"}, {"name": "x-probe", "value": "yes"}]}},
        "/app-health/down/readyz": {"httpGet": {"path": "/healthy", "port": down}},
    })
    .to_string();
    let server = status_server(&json).await;
    assert_eq!(probe(server, "/app-health/web/readyz").await, 200);
    assert_eq!(probe(server, "/app-health/web/livez").await, 503);
    assert_eq!(
        probe(server, "/app-health/web/startupz").await,
        200,
        "3xx is a success"
    );
    assert_eq!(
        probe(server, "/app-health/hdr/readyz").await,
        200,
        "headers kept"
    );
    assert_eq!(
        probe(server, "/app-health/down/readyz").await,
        503,
        "app down"
    );
    assert_eq!(probe(server, "/app-health/other/readyz").await, 404);
    assert_eq!(probe(server, "/ready").await, 404, "no admin API here");
}

#[tokio::test]
async fn a_tcp_probe_is_a_connect() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = listener.local_addr().unwrap().port();
    let down = closed_port().await;
    let json = serde_json::json!({
        "/app-health/db/livez": {"tcpSocket": {"port": up}},
        "/app-health/db/readyz": {"tcpSocket": {"port": down}},
    })
    .to_string();
    let server = status_server(&json).await;
    assert_eq!(probe(server, "/app-health/db/livez").await, 200);
    assert_eq!(probe(server, "/app-health/db/readyz").await, 503);
}

#[tokio::test]
async fn an_https_probe_does_not_verify_the_app_certificate() {
    let cert = rcgen::generate_simple_self_signed(vec!["app.internal".into()]).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(postern_certs::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.cert.der().clone()],
            rustls_pki_types::PrivateKeyDer::Pkcs8(cert.signing_key.serialize_der().into()),
        )
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(stream).await else {
                    return;
                };
                let mut buf = [0; 1024];
                let _ = tls.read(&mut buf).await;
                let _ = tls
                    .write_all(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n")
                    .await;
                let _ = tls.shutdown().await;
            });
        }
    });
    let json = serde_json::json!({
        "/app-health/web/readyz": {"httpGet": {"path": "/", "port": port, "scheme": "HTTPS"}},
        "/app-health/web/livez": {"httpGet": {"path": "/", "port": port}},
    })
    .to_string();
    let server = status_server(&json).await;
    assert_eq!(probe(server, "/app-health/web/readyz").await, 200);
    assert_eq!(
        probe(server, "/app-health/web/livez").await,
        503,
        "plaintext to a TLS port fails"
    );
}

/// An h2c gRPC app whose health service answers `status` for `service`
/// and NOT_FOUND (grpc-status 5) for any other name.
async fn grpc_app(service: &'static str, status: u8) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let service = service_fn(move |request: Request<Incoming>| async move {
                    assert_eq!(request.uri().path(), "/grpc.health.v1.Health/Check");
                    let body = request.into_body().collect().await.unwrap().to_bytes();
                    let asked = &body[5..];
                    let expected = grpc_check_request(service);
                    let (body, code): (Vec<u8>, &str) = if asked == &expected[5..] {
                        (vec![0, 0, 0, 0, 2, 0x08, status], "0")
                    } else {
                        (Vec::new(), "5")
                    };
                    let frames = futures_util::stream::iter([
                        Ok::<_, Infallible>(http_body::Frame::data(Bytes::from(body))),
                        Ok(http_body::Frame::trailers({
                            let mut t = http::HeaderMap::new();
                            t.insert("grpc-status", code.parse().unwrap());
                            t
                        })),
                    ]);
                    let mut response = Response::new(http_body_util::StreamBody::new(frames));
                    response.headers_mut().insert(
                        header::CONTENT_TYPE,
                        header::HeaderValue::from_static("application/grpc"),
                    );
                    Ok::<_, Infallible>(response)
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    port
}

#[tokio::test]
async fn a_grpc_probe_asks_the_health_service() {
    let serving = grpc_app("shop.Cart", 1).await;
    let not_serving = grpc_app("", 2).await;
    let json = serde_json::json!({
        "/app-health/cart/readyz": {"grpc": {"port": serving, "service": "shop.Cart"}},
        "/app-health/cart/livez": {"grpc": {"port": serving, "service": "shop.Other"}},
        "/app-health/cart/startupz": {"grpc": {"port": not_serving}},
    })
    .to_string();
    let server = status_server(&json).await;
    assert_eq!(probe(server, "/app-health/cart/readyz").await, 200);
    assert_eq!(
        probe(server, "/app-health/cart/livez").await,
        503,
        "NOT_FOUND"
    );
    assert_eq!(
        probe(server, "/app-health/cart/startupz").await,
        503,
        "NOT_SERVING"
    );
}

#[tokio::test(start_paused = true)]
async fn a_probe_past_its_timeout_fails() {
    // Accepts and never answers.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let json = serde_json::json!({
        "/app-health/web/readyz": {"httpGet": {"path": "/", "port": port}, "timeoutSeconds": 1},
    })
    .to_string();
    let probes = AppProbes::from_json(&json).unwrap();
    let outcome = probes
        .run("/app-health/web/readyz", Ipv4Addr::LOCALHOST.into())
        .await
        .unwrap();
    assert_eq!(outcome, Err("no answer within 1s".to_owned()));
    drop(listener);
}

#[test]
fn bad_probe_json_is_refused_with_the_reason() {
    let err = |json: &str| AppProbes::from_json(json).unwrap_err().to_string();
    assert!(
        err("{not json").starts_with("POSTERN_APP_PROBES is not valid: "),
        "{}",
        err("{not json")
    );
    assert!(err(r#"{"/app-health/a/livez": {"exec": {}}}"#).contains("unknown field `exec`"));
    assert_eq!(
        err(r#"{"/healthz": {"tcpSocket": {"port": 1}}}"#),
        "POSTERN_APP_PROBES: probe \"/healthz\" is not under /app-health/"
    );
    assert_eq!(
        err(r#"{"/app-health/a/livez": {"tcpSocket": {"port": 1}, "grpc": {"port": 1}}}"#),
        "POSTERN_APP_PROBES: probe \"/app-health/a/livez\" needs exactly one of httpGet, tcpSocket and grpc"
    );
    assert_eq!(
        err(r#"{"/app-health/a/livez": {"httpGet": {"port": 1, "scheme": "FTP"}}}"#),
        "POSTERN_APP_PROBES: probe \"/app-health/a/livez\" has a scheme other than HTTP or HTTPS"
    );
    assert!(
        err(r#"{"/app-health/a/livez": {"tcpSocket": {"port": "http"}}}"#).contains("invalid type")
    );
    let probes =
        AppProbes::from_json(r#"{"/app-health/a/livez": {"tcpSocket": {"port": 8080}}}"#).unwrap();
    assert_eq!(probes.paths().collect::<Vec<_>>(), ["/app-health/a/livez"]);
}

#[test]
fn grpc_messages_are_encoded_and_read() {
    assert_eq!(grpc_check_request(""), [0, 0, 0, 0, 0]);
    assert_eq!(
        grpc_check_request("ab"),
        [0, 0, 0, 0, 4, 0x0a, 2, b'a', b'b']
    );
    assert_eq!(grpc_serving_status(&[0, 0, 0, 0, 2, 0x08, 1]), Some(1));
    assert_eq!(
        grpc_serving_status(&[0, 0, 0, 0, 0]),
        Some(0),
        "absent is UNKNOWN"
    );
    // An unknown string field before the status is skipped.
    assert_eq!(
        grpc_serving_status(&[0, 0, 0, 0, 5, 0x12, 1, b'x', 0x08, 1]),
        Some(1)
    );
    assert_eq!(grpc_serving_status(&[0, 0, 0]), None);
    assert_eq!(grpc_serving_status(&[1, 0, 0, 0, 0]), None, "compressed");
}

#[tokio::test]
async fn an_any_ipv6_status_address_takes_ipv4_probes() {
    let app = http_app().await.port();
    let json = serde_json::json!({
        "/app-health/web/readyz": {"httpGet": {"path": "/healthy", "port": app}},
    })
    .to_string();
    let server = StatusServer::bind(
        "[::]:0".parse().unwrap(),
        AppProbes::from_json(&json).unwrap(),
    )
    .await
    .unwrap();
    let port = server.local_addr().unwrap().port();
    tokio::spawn(server.serve());
    let v4 = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    assert_eq!(probe(v4, "/app-health/web/readyz").await, 200);
}

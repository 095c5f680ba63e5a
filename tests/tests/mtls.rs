//! Workload identity and mutual TLS end to end: two sidecars with
//! certificates from the reference CA over gRPC, rotation under load, every
//! kind of refused peer, permissive mode, and edge termination by SNI.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use postern_tests::mesh::{probe_connector, tls_connect, write_files, CaServer, TestCa};
use postern_tests::prom::scrape;
use postern_tests::{get, listener, start_proxy, wait_until, within, HttpBackend, Proxy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TD: &str = "cluster.local";
const ID_A: &str = "spiffe://cluster.local/ns/shop/sa/web";
const ID_B: &str = "spiffe://cluster.local/ns/shop/sa/api";
const ID_C: &str = "spiffe://cluster.local/ns/shop/sa/other";

fn routes_to(cluster: &str) -> String {
    format!(
        r#"
    virtual_hosts:
      - name: all
        domains: ["*"]
        routes:
          - match: {{}}
            cluster: {cluster}"#
    )
}

/// Sidecar B: a strict mTLS inbound listener in front of `app`.
fn sidecar_b(identity: &str, name: &str, mtls: &str, app: SocketAddr) -> String {
    format!(
        r#"
identity:
{identity}
listeners:
  - name: {name}
    address: 127.0.0.1:0
    kind: http
    mtls: {mtls}{routes}
clusters:
  - name: app
    endpoints: [{{ address: "{app}" }}]
"#,
        routes = routes_to("app"),
    )
}

/// Sidecar A: a plaintext outbound listener, mesh mTLS to `b`.
fn sidecar_a(identity: &str, name: &str, expect: &str, b: SocketAddr) -> String {
    format!(
        r#"
identity:
{identity}
listeners:
  - name: {name}
    address: 127.0.0.1:0
    kind: http{routes}
clusters:
  - name: b
    endpoints: [{{ address: "{b}" }}]
    tls: {{ mode: mesh, identities: ["{expect}"] }}
"#,
        routes = routes_to("b"),
    )
}

fn ca_identity(id: &str, ca: &CaServer, token: usize, lifetime: &str) -> String {
    format!(
        "  spiffe_id: {id}\n  lifetime: {lifetime}\n  source:\n    istio_ca:\n      address: {}\n      token_file: {}\n      trust_bundle: {}",
        ca.address,
        ca.token_files[token].display(),
        ca.root_file.display()
    )
}

fn file_identity(files: &postern_tests::mesh::IdentityFiles, id: &str) -> String {
    format!(
        "  spiffe_id: {id}\n  source:\n    files: {{ cert: {}, key: {}, bundle: {}, poll_interval: 100ms }}",
        files.cert.display(),
        files.key.display(),
        files.bundle.display()
    )
}

async fn start_ready(yaml: &str) -> Proxy {
    let proxy = start_proxy(yaml).await;
    within(Duration::from_secs(15), "identity loaded", proxy.ready()).await;
    proxy
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_sidecars_carry_http1_callers_over_one_mtls_http2_connection() {
    let _recorder = postern::telemetry::install_prometheus_recorder();
    let ca = CaServer::start(TD, Duration::from_secs(3600), &[ID_A, ID_B]).await;
    let app = HttpBackend::start("app").await;
    let b = start_ready(&sidecar_b(
        &ca_identity(ID_B, &ca, 1, "1h"),
        "e2e-b-in",
        &format!("{{ mode: strict, allowed_identities: [\"{ID_A}\"] }}"),
        app.addr(),
    ))
    .await;
    let a = start_ready(&sidecar_a(
        &ca_identity(ID_A, &ca, 0, "1h"),
        "e2e-a-out",
        ID_B,
        listener(&b, "e2e-b-in"),
    ))
    .await;
    let a_addr = listener(&a, "e2e-a-out");

    // Twenty HTTP/1.1 callers on their own connections, at once.
    let calls: Vec<_> = (0..20)
        .map(|i| tokio::spawn(async move { get(a_addr, "api.shop", &format!("/item/{i}")).await }))
        .collect();
    for call in calls {
        let response = call.await.unwrap();
        assert_eq!(response.status, 200, "{}", response.text());
    }
    let seen = app.requests();
    assert_eq!(seen.len(), 20);
    for request in &seen {
        // B saw A's identity from the handshake and says so upstream.
        assert_eq!(
            request.header("x-forwarded-client-cert"),
            Some(format!("By={ID_B};URI={ID_A}").as_str())
        );
        assert_eq!(request.header("x-forwarded-proto"), Some("https"));
        assert_eq!(request.version, http::Version::HTTP_11);
    }
    // All twenty rode one HTTP/2 connection between the sidecars.
    let b_conns = scrape(
        b.admin_addr(),
        "postern_downstream_connections_total",
        &[("listener", "e2e-b-in")],
    )
    .await;
    assert_eq!(b_conns, 1.0);

    // /certs shows the identity from the CA.
    let certs: serde_json::Value =
        serde_json::from_str(&get(a.admin_addr(), "localhost", "/certs").await.text()).unwrap();
    let cert = &certs["identity"]["certificate"];
    assert_eq!(cert["spiffe_id"], ID_A);
    assert_eq!(cert["source"], "istio_ca");
    assert!(cert["sans"][0].as_str().unwrap().contains(ID_A));
    assert!(cert["not_after"].as_u64().unwrap() > cert["not_before"].as_u64().unwrap());
    assert!(!cert["serial"].as_str().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotate_under_load_without_a_failed_request() {
    let _recorder = postern::telemetry::install_prometheus_recorder();
    // The CA grants 4 s; each sidecar renews at half-life, about every 2 s.
    let ca = CaServer::start(TD, Duration::from_secs(4), &[ID_A, ID_B]).await;
    let app = HttpBackend::start("app").await;
    let b = start_ready(&sidecar_b(
        &ca_identity(ID_B, &ca, 1, "4s"),
        "rot-b-in",
        "{ mode: strict }",
        app.addr(),
    ))
    .await;
    let b_addr = listener(&b, "rot-b-in");
    let a = start_ready(&sidecar_a(
        &ca_identity(ID_A, &ca, 0, "4s"),
        "rot-a-out",
        ID_B,
        b_addr,
    ))
    .await;
    let a_addr = listener(&a, "rot-a-out");

    let stop = Arc::new(tokio::sync::Notify::new());
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let workers: Vec<_> = (0..4)
        .map(|_| {
            let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
            tokio::spawn(async move {
                let stopped = stop.notified();
                tokio::pin!(stopped);
                loop {
                    tokio::select! {
                        _ = &mut stopped => break,
                        response = get(a_addr, "api", "/") => {
                            if response.status == 200 { &ok } else { &failed }
                                .fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            })
        })
        .collect();

    // Three rotations on each side (the first certificate is generation 1),
    // while every new B handshake must present the current certificate.
    let (a_id, b_id) = (a.identity().unwrap().clone(), b.identity().unwrap().clone());
    // A's pooled HTTP/2 connection to B outlives the certificates it was made
    // with; fresh handshakes with A's identity cell show that every rotated
    // pair of certificates also works for new connections.
    let fresh = postern_tests::mesh::mesh_connector(&a_id, ID_B);
    let (mut fresh_ok, mut fresh_failed) = (0u32, Vec::new());
    let mut pace = tokio::time::interval(Duration::from_millis(50));
    within(
        Duration::from_secs(60),
        "three rotations on both sidecars",
        async {
            while a_id.generation() < 4 || b_id.generation() < 4 {
                pace.tick().await;
                match tls_get(b_addr, &fresh).await {
                    Some(reply) if reply.starts_with("HTTP/1.1 200") => fresh_ok += 1,
                    other => fresh_failed.push((a_id.generation(), b_id.generation(), other)),
                }
            }
        },
    )
    .await;
    assert!(
        fresh_failed.is_empty(),
        "fresh handshakes failed: {fresh_failed:?}"
    );
    assert!(fresh_ok > 20, "fresh handshakes made: {fresh_ok}");
    stop.notify_waiters();
    for worker in workers {
        worker.await.unwrap();
    }
    assert!(
        presents_current_certificate(b_addr, &b_id).await,
        "a new handshake gets B's current certificate"
    );
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "failed requests during rotation"
    );
    assert!(ok.load(Ordering::Relaxed) > 50, "load ran: {ok:?}");
    let rotations = scrape(
        b.admin_addr(),
        "postern_cert_rotations_total",
        &[("source", "istio_ca")],
    )
    .await;
    assert!(rotations >= 4.0, "rotations counted: {rotations}");
}

/// Connects to B and checks that it presents the certificate its identity
/// cell holds now. Under TLS 1.3 the server's certificate arrives before it
/// judges ours, so no client certificate is needed to see it.
async fn presents_current_certificate(
    b: SocketAddr,
    b_id: &Arc<postern_certs::IdentityHandle>,
) -> bool {
    let expected = b_id.current().expect("identity").info.serial.clone();
    let tls = tls_connect(&probe_connector(None, &[b"h2"]), b, "api")
        .await
        .expect("handshake");
    let leaf = &tls.get_ref().1.peer_certificates().expect("server cert")[0];
    postern_certs::CertInfo::parse(leaf).expect("parse").serial == expected
}

/// Sends one HTTP/1.1 request over TLS and reads until close; `None` when
/// the handshake or the exchange was refused.
async fn tls_get(addr: SocketAddr, connector: &tokio_rustls::TlsConnector) -> Option<String> {
    let mut tls = tls_connect(connector, addr, "api").await.ok()?;
    tls.write_all(b"GET / HTTP/1.1\r\nhost: api\r\nconnection: close\r\n\r\n")
        .await
        .ok()?;
    let mut out = Vec::new();
    // TLS 1.3 reports a refused client certificate on the first read.
    within(
        Duration::from_secs(10),
        "tls read",
        tls.read_to_end(&mut out),
    )
    .await
    .ok()?;
    let text = String::from_utf8_lossy(&out).into_owned();
    text.starts_with("HTTP/1.1").then_some(text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_listener_refuses_bad_peers_with_a_counted_reason() {
    let _recorder = postern::telemetry::install_prometheus_recorder();
    let dir = tempfile::tempdir().unwrap();
    let mesh = TestCa::new("mesh root");
    let intruder = TestCa::new("intruder root");
    let app = HttpBackend::start("app").await;
    let b_files = mesh.write_identity(dir.path(), "b", ID_B);
    let b = start_ready(&sidecar_b(
        &file_identity(&b_files, ID_B),
        "strict-b-in",
        &format!("{{ mode: strict, allowed_identities: [\"{ID_A}\"] }}"),
        app.addr(),
    ))
    .await;
    let addr = listener(&b, "strict-b-in");

    let good = mesh.issue(ID_A, -60, 3600);
    let body = tls_get(addr, &probe_connector(Some(&good), &[b"http/1.1"])).await;
    assert!(
        body.is_some_and(|t| t.starts_with("HTTP/1.1 200")),
        "valid peer served"
    );

    let cases = [
        ("untrusted_ca", Some(intruder.issue(ID_A, -60, 3600))),
        ("expired", Some(mesh.issue(ID_A, -7200, -3600))),
        ("not_yet_valid", Some(mesh.issue(ID_A, 3600, 7200))),
        ("wrong_identity", Some(mesh.issue(ID_C, -60, 3600))),
        ("no_client_cert", None),
    ];
    for (reason, client) in cases {
        let before = refusals(&b, "strict-b-in", reason).await;
        let served = tls_get(addr, &probe_connector(client.as_ref(), &[b"http/1.1"])).await;
        assert!(served.is_none(), "{reason}: refused, got {served:?}");
        wait_until(&format!("{reason} counted"), || async {
            refusals(&b, "strict-b-in", reason).await > before
        })
        .await;
    }

    // Plaintext HTTP to a strict listener: closed without an answer, counted.
    let before = refusals(&b, "strict-b-in", "plaintext").await;
    let mut plain = tokio::net::TcpStream::connect(addr).await.unwrap();
    plain
        .write_all(b"GET / HTTP/1.1\r\nhost: api\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    let _ = within(
        Duration::from_secs(10),
        "plaintext closed",
        plain.read_to_end(&mut out),
    )
    .await;
    assert!(
        out.is_empty(),
        "no answer to plaintext: {:?}",
        String::from_utf8_lossy(&out)
    );
    wait_until("plaintext counted", || async {
        refusals(&b, "strict-b-in", "plaintext").await > before
    })
    .await;
    assert_eq!(
        app.requests().len(),
        1,
        "only the valid peer reached the app"
    );
}

async fn refusals(proxy: &Proxy, listener: &str, reason: &str) -> f64 {
    scrape(
        proxy.admin_addr(),
        "postern_downstream_tls_failures_total",
        &[("listener", listener), ("reason", reason)],
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permissive_listener_takes_mtls_and_plaintext() {
    let dir = tempfile::tempdir().unwrap();
    let mesh = TestCa::new("mesh root");
    let app = HttpBackend::start("app").await;
    let b_files = mesh.write_identity(dir.path(), "b", ID_B);
    let b = start_ready(&sidecar_b(
        &file_identity(&b_files, ID_B),
        "permissive-b-in",
        "{ mode: permissive }",
        app.addr(),
    ))
    .await;
    let addr = listener(&b, "permissive-b-in");

    let forged = http::Request::get("/plain")
        .header("host", "api")
        .header("x-forwarded-client-cert", format!("URI={ID_A}"))
        .body(postern_tests::empty())
        .unwrap();
    let plain = postern_tests::send(addr, forged).await;
    assert_eq!(plain.status, 200);
    assert_eq!(
        app.last_request().header("x-forwarded-client-cert"),
        None,
        "a plaintext caller cannot claim an identity"
    );

    // A TLS client with a bad certificate is refused, not downgraded.
    let intruder = TestCa::new("intruder").issue(ID_A, -60, 3600);
    let refused = tls_get(addr, &probe_connector(Some(&intruder), &[b"http/1.1"])).await;
    assert!(refused.is_none(), "bad certificate refused: {refused:?}");

    let peer = mesh.issue(ID_A, -60, 3600);
    let reply = tls_get(addr, &probe_connector(Some(&peer), &[b"http/1.1"])).await;
    assert!(reply.is_some_and(|t| t.starts_with("HTTP/1.1 200")));
    assert_eq!(
        app.last_request().header("x-forwarded-client-cert"),
        Some(format!("By={ID_B};URI={ID_A}").as_str())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_refuses_a_server_with_the_wrong_spiffe_id() {
    let _recorder = postern::telemetry::install_prometheus_recorder();
    let dir = tempfile::tempdir().unwrap();
    let mesh = TestCa::new("mesh root");
    let app = HttpBackend::start("app").await;
    let b = start_ready(&sidecar_b(
        &file_identity(&mesh.write_identity(dir.path(), "b", ID_C), ID_C),
        "wrongid-b-in",
        "{ mode: strict }",
        app.addr(),
    ))
    .await;
    let a = start_ready(&sidecar_a(
        &file_identity(&mesh.write_identity(dir.path(), "a", ID_A), ID_A),
        "wrongid-a-out",
        ID_B,
        listener(&b, "wrongid-b-in"),
    ))
    .await;
    let response = get(listener(&a, "wrongid-a-out"), "api", "/").await;
    // A failed handshake is a connect failure: 502 with flag UF.
    assert_eq!(response.status, 502, "{}", response.text());
    assert!(app.requests().is_empty());
    let failures = scrape(
        a.admin_addr(),
        "postern_upstream_tls_failures_total",
        &[("cluster", "b"), ("reason", "wrong_identity")],
    )
    .await;
    assert!(failures >= 1.0);

    // The right SPIFFE ID from a CA outside the bundle is refused too.
    let intruder = TestCa::new("intruder root");
    let forged_b = start_ready(&sidecar_b(
        &file_identity(&intruder.write_identity(dir.path(), "forged", ID_B), ID_B),
        "forged-b-in",
        "{ mode: permissive }",
        app.addr(),
    ))
    .await;
    let a2 = start_ready(&sidecar_a(
        &file_identity(&mesh.write_identity(dir.path(), "a2", ID_A), ID_A),
        "forged-a-out",
        ID_B,
        listener(&forged_b, "forged-b-in"),
    ))
    .await;
    let response = get(listener(&a2, "forged-a-out"), "api", "/").await;
    assert_eq!(response.status, 502, "{}", response.text());
    assert!(app.requests().is_empty());
    let untrusted = scrape(
        a2.admin_addr(),
        "postern_upstream_tls_failures_total",
        &[("cluster", "b"), ("reason", "untrusted_ca")],
    )
    .await;
    assert!(untrusted >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ca_refuses_a_csr_for_another_identity_and_the_sidecar_stays_unready() {
    let _recorder = postern::telemetry::install_prometheus_recorder();
    // The token entitles ID_A; the sidecar asks for ID_B.
    let ca = CaServer::start(TD, Duration::from_secs(3600), &[ID_A]).await;
    let app = HttpBackend::start("app").await;
    let b = start_proxy(&sidecar_b(
        &ca_identity(ID_B, &ca, 0, "1h"),
        "denied-b-in",
        "{ mode: strict }",
        app.addr(),
    ))
    .await;
    wait_until("rotation failure counted", || async {
        scrape(
            b.admin_addr(),
            "postern_cert_rotation_failures_total",
            &[("source", "istio_ca")],
        )
        .await
            >= 1.0
    })
    .await;
    assert_eq!(get(b.admin_addr(), "localhost", "/ready").await.status, 503);
    assert!(b.identity().unwrap().current().is_none());
    // It was the CA that said no, for this reason.
    let refused = scrape(
        b.admin_addr(),
        "postern_ca_requests_refused_total",
        &[("reason", "identity_not_entitled")],
    )
    .await;
    assert!(refused >= 1.0, "CA refusal counted: {refused}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_identity_reloads_when_the_files_change() {
    let dir = tempfile::tempdir().unwrap();
    let mesh = TestCa::new("mesh root");
    let app = HttpBackend::start("app").await;
    let files = mesh.write_identity(dir.path(), "b", ID_B);
    let b = start_ready(&sidecar_b(
        &file_identity(&files, ID_B),
        "reload-b-in",
        "{ mode: strict }",
        app.addr(),
    ))
    .await;
    let handle = b.identity().unwrap().clone();
    let first = handle.current().unwrap().info.serial.clone();
    // cert-manager style: replace the certificate and key.
    write_files(
        dir.path(),
        "b",
        &mesh.issue(ID_B, -60, 7200),
        mesh.root_pem(),
    );
    wait_until("new certificate installed", || async {
        handle.current().unwrap().info.serial != first
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edge_listener_picks_certificates_by_sni_and_speaks_h2_by_alpn() {
    let dir = tempfile::tempdir().unwrap();
    let edge_ca = TestCa::new("edge root");
    let shop = write_files(
        dir.path(),
        "shop",
        &edge_ca.issue_server(&["shop.example.com"]),
        "",
    );
    let api = write_files(
        dir.path(),
        "api",
        &edge_ca.issue_server(&["*.api.example.com"]),
        "",
    );
    let app = HttpBackend::start("app").await;
    let proxy = start_proxy(&format!(
        r#"
listeners:
  - name: sni-edge
    address: 127.0.0.1:0
    kind: http
    tls:
      certificates:
        - {{ cert: {}, key: {} }}
        - {{ cert: {}, key: {} }}{routes}
clusters:
  - name: app
    endpoints: [{{ address: "{}" }}]
"#,
        shop.cert.display(),
        shop.key.display(),
        api.cert.display(),
        api.key.display(),
        app.addr(),
        routes = routes_to("app"),
    ))
    .await;
    let addr = listener(&proxy, "sni-edge");
    let connector = probe_connector(None, &[b"h2", b"http/1.1"]);
    for (sni, expected) in [
        ("shop.example.com", "DNS:shop.example.com"),
        ("v1.api.example.com", "DNS:*.api.example.com"),
        ("unknown.example.org", "DNS:shop.example.com"),
    ] {
        let tls = tls_connect(&connector, addr, sni).await.unwrap();
        let (_, session) = tls.get_ref();
        let leaf = &session.peer_certificates().unwrap()[0];
        let info = postern_certs::CertInfo::parse(leaf).unwrap();
        assert_eq!(info.sans, [expected], "{sni}");
        assert_eq!(session.alpn_protocol(), Some(&b"h2"[..]));
    }
    let reply = tls_get(addr, &probe_connector(None, &[b"http/1.1"])).await;
    assert!(reply.is_some_and(|t| t.starts_with("HTTP/1.1 200")));
    assert_eq!(
        app.last_request().header("x-forwarded-proto"),
        Some("https")
    );
}

/// Reads one answer without a body (the app echoes an empty request body)
/// from a kept-alive stream.
async fn read_head(tls: &mut (impl AsyncReadExt + Unpin)) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while !out.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = within(Duration::from_secs(10), "tls read", tls.read(&mut buf))
            .await
            .expect("tls read");
        assert!(n > 0, "closed before the answer");
        out.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_tls_connection_lets_go_of_its_buffers_and_serves_the_next_request() {
    let _recorder = postern::telemetry::install_prometheus_recorder();
    let dir = tempfile::tempdir().unwrap();
    let edge_ca = TestCa::new("edge root");
    let shop = write_files(
        dir.path(),
        "shop",
        &edge_ca.issue_server(&["shop.example.com"]),
        "",
    );
    let app = HttpBackend::start("app").await;
    let proxy = start_proxy(&format!(
        r#"
listeners:
  - name: tls-parking
    address: 127.0.0.1:0
    kind: http
    limits: {{ header_read_timeout: 400ms, idle_timeout: 60s }}
    tls:
      certificates:
        - {{ cert: {}, key: {} }}{routes}
clusters:
  - name: app
    endpoints: [{{ address: "{}" }}]
"#,
        shop.cert.display(),
        shop.key.display(),
        app.addr(),
        routes = routes_to("app"),
    ))
    .await;
    let addr = listener(&proxy, "tls-parking");
    let connector = probe_connector(None, &[b"http/1.1"]);
    let mut tls = tls_connect(&connector, addr, "shop.example.com")
        .await
        .unwrap();
    let admin = proxy.admin_addr();
    let parked = || {
        scrape(
            admin,
            postern::telemetry::metrics::DOWNSTREAM_CONNECTIONS_PARKED_TOTAL,
            &[("listener", "tls-parking")],
        )
    };
    for round in 1..=2 {
        tls.write_all(b"GET / HTTP/1.1\r\nhost: shop.example.com\r\n\r\n")
            .await
            .unwrap();
        let head = read_head(&mut tls).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        wait_until("the idle connection parked", || async {
            parked().await >= f64::from(round)
        })
        .await;
    }
    tls.write_all(b"GET / HTTP/1.1\r\nhost: shop.example.com\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let head = read_head(&mut tls).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(app.requests().len(), 3);
}

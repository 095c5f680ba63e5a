//! Mesh mTLS configured entirely from xDS: listener and cluster TLS
//! contexts that reference SDS secrets, the workload certificate and trust
//! bundle delivered as Secrets, rotated by pushing new ones, and a bad
//! secret NACKed while the installed identity keeps serving; and the same
//! contexts served by an identity from a CA, under Istio's secret names.

use std::net::SocketAddr;

use postern_control::ads::{AdsEventKind, Snapshot};
use postern_proto::type_url;
use postern_tests::control::{is_nack, wait_event, ControlPlane};
use postern_tests::envoy::{
    certificate_secret, downstream_tls, http_listener, root_secret, static_cluster,
};
use postern_tests::mesh::{probe_connector, tls_connect, CaServer, TestCa};
use postern_tests::{eventually, get, start_proxy, wait_until, HttpBackend, Proxy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const ID_A: &str = "spiffe://cluster.local/ns/shop/sa/web";
const ID_B: &str = "spiffe://cluster.local/ns/shop/sa/api";

fn bootstrap(cp: &ControlPlane, node: &str, id: &str) -> String {
    format!(
        r#"
node: {{ id: "{node}" }}
xds: {{ address: "{}", initial_backoff: 50ms, max_backoff: 500ms }}
identity:
  spiffe_id: {id}
  source: {{ sds: {{}} }}
"#,
        cp.url()
    )
}

fn secrets(snapshot: &mut Snapshot, ca: &TestCa, id: &str) -> String {
    let issued = ca.issue(id, -60, 3600);
    snapshot.add_message(
        "default",
        &certificate_secret(&issued.cert_pem, &issued.key_pem),
    );
    snapshot.add_message("ROOTCA", &root_secret(ca.root_pem()));
    issued.cert_pem
}

async fn ready(proxy: &Proxy) {
    wait_until("ready", || async {
        get(proxy.admin_addr(), "localhost", "/ready").await.status == 200
    })
    .await;
}

fn any_port() -> SocketAddr {
    "127.0.0.1:0".parse().expect("addr")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_sidecars_get_mtls_and_certificates_from_xds() {
    let ca = TestCa::new("mesh root");
    let app = HttpBackend::start("app").await;

    // Sidecar B: inbound mTLS that admits only A, in front of the app.
    let mut b_snapshot = Snapshot::new("1");
    b_snapshot.add_message(
        "b-in",
        &http_listener("b-in", any_port(), "app", Some(&[ID_A])),
    );
    b_snapshot.add_message("app", &static_cluster("app", app.addr(), None));
    secrets(&mut b_snapshot, &ca, ID_B);
    let b_cp = ControlPlane::start(b_snapshot.clone()).await;
    let b = start_proxy(&bootstrap(&b_cp, "b", ID_B)).await;
    ready(&b).await;
    let b_addr = b.listener_addr("b-in").expect("b-in bound");

    // Sidecar A: plaintext outbound, mesh mTLS to B that requires B's ID.
    let mut a_snapshot = Snapshot::new("1");
    a_snapshot.add_message("a-out", &http_listener("a-out", any_port(), "b", None));
    a_snapshot.add_message("b", &static_cluster("b", b_addr, Some(&[ID_B])));
    secrets(&mut a_snapshot, &ca, ID_A);
    let a_cp = ControlPlane::start(a_snapshot).await;
    let a = start_proxy(&bootstrap(&a_cp, "a", ID_A)).await;
    ready(&a).await;
    let a_addr = a.listener_addr("a-out").expect("a-out bound");

    let response = get(a_addr, "api", "/items").await;
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(
        app.last_request().header("x-forwarded-client-cert"),
        Some(format!("By={ID_B};URI={ID_A}").as_str())
    );
    let certs: serde_json::Value =
        serde_json::from_str(&get(a.admin_addr(), "localhost", "/certs").await.text())
            .expect("certs json");
    assert_eq!(certs["identity"]["certificate"]["source"], "sds");

    // Rotation by SDS: B gets a new certificate; new handshakes use it and
    // traffic goes on.
    let b_id = b.identity().expect("identity").clone();
    let first = b_id.current().expect("installed").info.serial.clone();
    let mut rotated = b_snapshot;
    rotated.version = "2".into();
    secrets(&mut rotated, &ca, ID_B);
    b_cp.server.set_snapshot(rotated);
    wait_until("B's certificate rotated", || async {
        b_id.current().is_some_and(|c| c.info.serial != first)
    })
    .await;
    eventually("traffic after rotation", || async {
        (get(a_addr, "api", "/after").await.status == 200).then_some(())
    })
    .await;
    // /config_dump shows each secret's version, never its value.
    let dump = get(b.admin_addr(), "localhost", "/config_dump")
        .await
        .text();
    let parsed: serde_json::Value = serde_json::from_str(&dump).expect("config_dump is JSON");
    assert_eq!(
        parsed["dynamic"]["secrets"]["default"]["version"], "2",
        "{dump}"
    );
    assert!(parsed["dynamic"]["secrets"]["ROOTCA"]["last_update"].is_number());
    assert!(!dump.contains("PRIVATE KEY"), "a key in /config_dump");

    // A bad secret is NACKed and the installed identity stays.
    let serial = b_id.current().expect("installed").info.serial.clone();
    let mut events = b_cp.server.events();
    let mut bad = Snapshot::new("3");
    for (kind, name, body) in [type_url::LISTENER, type_url::CLUSTER]
        .into_iter()
        .flat_map(|t| {
            b_cp.server
                .snapshot()
                .of_type(t)
                .map(|(n, b)| (t, n.to_string(), b.clone()))
                .collect::<Vec<_>>()
        })
    {
        bad.add(kind, &name, body);
    }
    bad.add_message("default", &certificate_secret("not a pem", "nor this"));
    bad.add_message("ROOTCA", &root_secret(ca.root_pem()));
    b_cp.server.set_snapshot(bad);
    let nack = wait_event(&mut events, "secret NACK", |e| is_nack(e, type_url::SECRET)).await;
    let AdsEventKind::Nack { error, .. } = nack.kind else {
        unreachable!()
    };
    assert!(
        error.contains("default") && error.contains("certificate_chain"),
        "{error}"
    );
    assert_eq!(b_id.current().expect("installed").info.serial, serial);
    assert_eq!(get(a_addr, "api", "/still").await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_contexts_naming_other_secrets_are_nacked() {
    let ca = TestCa::new("mesh root");
    let app = HttpBackend::start("app").await;
    let mut snapshot = Snapshot::new("1");
    let mut cluster = static_cluster("app", app.addr(), Some(&[ID_B]));
    // Point the cluster's certificate at a secret that is not the identity.
    if let Some(socket) = cluster.transport_socket.as_mut() {
        if let Some(
            postern_proto::envoy::config::core::v3::transport_socket::ConfigType::TypedConfig(any),
        ) = socket.config_type.as_mut()
        {
            any.value = String::from_utf8_lossy(&any.value)
                .replace("default", "other")
                .into_bytes();
        }
    }
    snapshot.add_message("app", &cluster);
    secrets(&mut snapshot, &ca, ID_A);
    let cp = ControlPlane::start(snapshot).await;
    let mut events = cp.server.events();
    let _proxy = start_proxy(&bootstrap(&cp, "a", ID_A)).await;
    let nack = wait_event(&mut events, "cluster NACK", |e| {
        is_nack(e, type_url::CLUSTER)
    })
    .await;
    let AdsEventKind::Nack { error, .. } = nack.kind else {
        unreachable!()
    };
    assert!(
        error.contains("tls_certificate_sds_secret_configs"),
        "{error}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_contexts_use_a_ca_identity_under_istios_secret_names() {
    let ca = CaServer::start(
        "cluster.local",
        std::time::Duration::from_secs(3600),
        &[ID_A, ID_B],
    )
    .await;
    let bootstrap = |cp: &ControlPlane, node: &str, id: &str, token: usize| {
        format!(
            r#"
node: {{ id: "{node}" }}
xds: {{ address: "{}", initial_backoff: 50ms, max_backoff: 500ms }}
identity:
  spiffe_id: {id}
  source:
    istio_ca: {{ address: "{}", token_file: "{}", trust_bundle: "{}" }}
"#,
            cp.url(),
            ca.address,
            ca.token_files[token].display(),
            ca.root_file.display(),
        )
    };
    let app = HttpBackend::start("app").await;

    // The TLS contexts name `default` and `ROOTCA`, and no Secret is served.
    let mut b_snapshot = Snapshot::new("1");
    b_snapshot.add_message(
        "b-in",
        &http_listener("b-in", any_port(), "app", Some(&[ID_A])),
    );
    b_snapshot.add_message("app", &static_cluster("app", app.addr(), None));
    let b_cp = ControlPlane::start(b_snapshot).await;
    let b = start_proxy(&bootstrap(&b_cp, "b", ID_B, 1)).await;
    ready(&b).await;
    let b_addr = b.listener_addr("b-in").expect("b-in bound");

    let mut a_snapshot = Snapshot::new("1");
    a_snapshot.add_message("a-out", &http_listener("a-out", any_port(), "b", None));
    a_snapshot.add_message("b", &static_cluster("b", b_addr, Some(&[ID_B])));
    let a_cp = ControlPlane::start(a_snapshot).await;
    let a = start_proxy(&bootstrap(&a_cp, "a", ID_A, 0)).await;
    ready(&a).await;
    let a_addr = a.listener_addr("a-out").expect("a-out bound");

    let response = get(a_addr, "api", "/items").await;
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(
        app.last_request().header("x-forwarded-client-cert"),
        Some(format!("By={ID_B};URI={ID_A}").as_str())
    );
}

/// A verifying TLS client trusting `root_pem`, offering `alpn`; returns
/// the SANs of the certificate the server presented for `sni`.
async fn served_sans(addr: SocketAddr, root_pem: &str, sni: &str) -> std::io::Result<Vec<String>> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(root_pem.as_bytes()) {
        roots.add(cert.expect("root")).expect("add root");
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tls = tls_connect(&connector, addr, sni).await?;
    let leaf = &tls.get_ref().1.peer_certificates().expect("server cert")[0];
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    Ok(postern_certs::CertInfo::parse(leaf).expect("parse").sans)
}

/// Edge TLS and permissive mTLS, both from xDS filter chains: an edge
/// listener with one chain per SNI name (one certificate inline, one by SDS,
/// so the listener waits for that Secret), and Istio's permissive pattern
/// (a `tls` chain with the workload's context next to a `raw_buffer` one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edge_tls_by_sni_and_permissive_mtls_from_filter_chains() {
    use postern_proto::envoy::config::core::v3 as core;
    use postern_proto::envoy::config::listener::v3 as listener;
    use postern_proto::envoy::extensions::transport_sockets::tls::v3 as tls;
    let mesh = TestCa::new("mesh root");
    let edge_ca = TestCa::new("edge root");
    let app = HttpBackend::start("app").await;
    let shop = edge_ca.issue_server(&["shop.example.com"]);
    let api = edge_ca.issue_server(&["api.example.com"]);

    let edge_chain = |base: &listener::FilterChain, name: &str, common: tls::CommonTlsContext| {
        let mut chain = base.clone();
        chain.filter_chain_match = Some(listener::FilterChainMatch {
            server_names: vec![name.into()],
            ..Default::default()
        });
        chain.transport_socket = Some(downstream_tls(&tls::DownstreamTlsContext {
            common_tls_context: Some(tls::CommonTlsContext {
                alpn_protocols: vec!["h2".into(), "http/1.1".into()],
                ..common
            }),
            ..Default::default()
        }));
        chain
    };
    let inline = |text: &str| {
        Some(core::DataSource {
            specifier: Some(core::data_source::Specifier::InlineString(text.into())),
            ..Default::default()
        })
    };
    let mut edge = http_listener("edge", any_port(), "app", None);
    let base = edge.filter_chains[0].clone();
    edge.filter_chains = vec![
        edge_chain(
            &base,
            "shop.example.com",
            tls::CommonTlsContext {
                tls_certificates: vec![tls::TlsCertificate {
                    certificate_chain: inline(&shop.cert_pem),
                    private_key: inline(&shop.key_pem),
                    ..Default::default()
                }],
                ..Default::default()
            },
        ),
        edge_chain(
            &base,
            "api.example.com",
            tls::CommonTlsContext {
                tls_certificate_sds_secret_configs: vec![tls::SdsSecretConfig {
                    name: "api-cert".into(),
                    ..Default::default()
                }],
                ..Default::default()
            },
        ),
    ];

    let mut permissive = http_listener("perm", any_port(), "app", Some(&[ID_A]));
    let mut plaintext = permissive.filter_chains[0].clone();
    plaintext.transport_socket = None;
    plaintext.filter_chain_match = Some(listener::FilterChainMatch {
        transport_protocol: "raw_buffer".into(),
        ..Default::default()
    });
    permissive.filter_chains[0].filter_chain_match = Some(listener::FilterChainMatch {
        transport_protocol: "tls".into(),
        application_protocols: vec!["istio-peer-exchange".into(), "istio".into()],
        ..Default::default()
    });
    permissive.filter_chains.push(plaintext);

    // First without the edge listener's Secret: it warms, the rest serves.
    let mut snapshot = Snapshot::new("1");
    snapshot.add_message("edge", &edge);
    snapshot.add_message("perm", &permissive);
    snapshot.add_message("app", &static_cluster("app", app.addr(), None));
    secrets(&mut snapshot, &mesh, ID_B);
    let cp = ControlPlane::start(snapshot.clone()).await;
    let proxy = start_proxy(&bootstrap(&cp, "gw", ID_B)).await;
    wait_until("permissive listener bound", || async {
        proxy.listener_addr("perm").is_some()
    })
    .await;
    assert!(
        proxy.listener_addr("edge").is_none(),
        "edge listener served without its certificate"
    );
    assert_eq!(
        get(proxy.admin_addr(), "localhost", "/ready").await.status,
        503
    );

    // Permissive: plaintext and mTLS (the caller's identity reaches the app).
    let perm = proxy.listener_addr("perm").expect("perm bound");
    assert_eq!(get(perm, "svc", "/plain").await.status, 200);
    assert_eq!(app.last_request().header("x-forwarded-client-cert"), None);
    let caller = mesh.issue(ID_A, -60, 3600);
    let mut tls = tls_connect(&probe_connector(Some(&caller), &[b"http/1.1"]), perm, "svc")
        .await
        .expect("mTLS handshake");
    tls.write_all(b"GET /mtls HTTP/1.1\r\nhost: svc\r\nconnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut reply = Vec::new();
    tls.read_to_end(&mut reply).await.expect("read");
    assert!(String::from_utf8_lossy(&reply).starts_with("HTTP/1.1 200"));
    assert_eq!(
        app.last_request().header("x-forwarded-client-cert"),
        Some(format!("By={ID_B};URI={ID_A}").as_str())
    );

    // The Secret arrives: the edge listener serves each name its certificate.
    snapshot.version = "2".into();
    let api_secret = postern_proto::envoy::extensions::transport_sockets::tls::v3::Secret {
        name: "api-cert".into(),
        ..certificate_secret(&api.cert_pem, &api.key_pem)
    };
    snapshot.add_message("api-cert", &api_secret);
    cp.server.set_snapshot(snapshot);
    ready(&proxy).await;
    let edge_addr = proxy.listener_addr("edge").expect("edge bound");
    for (sni, expected) in [
        ("shop.example.com", "DNS:shop.example.com"),
        ("api.example.com", "DNS:api.example.com"),
    ] {
        let sans = served_sans(edge_addr, edge_ca.root_pem(), sni)
            .await
            .expect(sni);
        assert_eq!(sans, [expected], "{sni}");
    }
    // No chain takes other names, so neither does the listener.
    assert!(
        served_sans(edge_addr, edge_ca.root_pem(), "other.example.com")
            .await
            .is_err()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn updates_are_accepted_after_a_bootstrap_file_is_removed() {
    use postern_tests::control::is_ack;
    let ca = CaServer::start(
        "cluster.local",
        std::time::Duration::from_secs(3600),
        &[ID_A],
    )
    .await;
    let (a, b) = (HttpBackend::start("a").await, HttpBackend::start("b").await);
    let snapshot = |version: &str, backend: SocketAddr| {
        let mut snapshot = Snapshot::new(version);
        snapshot.add_message("out", &http_listener("out", any_port(), "app", None));
        snapshot.add_message("app", &static_cluster("app", backend, None));
        snapshot
    };
    let cp = ControlPlane::start(snapshot("1", a.addr())).await;
    let mut events = cp.server.events();
    let bootstrap = format!(
        r#"
node: {{ id: "a" }}
xds: {{ address: "{}", initial_backoff: 50ms, max_backoff: 500ms }}
identity:
  spiffe_id: {ID_A}
  source:
    istio_ca: {{ address: "{}", token_file: "{}", trust_bundle: "{}" }}
"#,
        cp.url(),
        ca.address,
        ca.token_files[0].display(),
        ca.root_file.display(),
    );
    let proxy = start_proxy(&bootstrap).await;
    ready(&proxy).await;
    let out = proxy.listener_addr("out").expect("out bound");
    assert_eq!(get(out, "app", "/").await.backend(), Some("a"));

    // The trust bundle the bootstrap names goes away; the proxy has it
    // loaded, and an unrelated update must not depend on reading it again.
    std::fs::remove_file(&ca.root_file).expect("remove the bundle");
    cp.server.set_snapshot(snapshot("2", b.addr()));
    wait_event(&mut events, "cluster ACK", |e| {
        is_ack(e, type_url::CLUSTER, "2")
    })
    .await;
    eventually("traffic follows to b", || async {
        (get(out, "app", "/").await.backend() == Some("b")).then_some(())
    })
    .await;
}

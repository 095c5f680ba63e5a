//! One listener, several filter chains from xDS, each with its own routes
//! or cluster and TLS, picked per connection by SNI, transport protocol
//! and ALPN as Envoy picks them; a default chain; a connection no chain
//! takes is closed; a push that changes one chain's routes leaves the
//! other chains' connections alone.

use std::net::SocketAddr;

use postern_control::ads::{pack, Snapshot};
use postern_proto::envoy::config::core::v3 as core;
use postern_proto::envoy::config::listener::v3 as listener;
use postern_proto::envoy::config::route::v3 as route;
use postern_proto::envoy::extensions::filters::http::router::v3::Router;
use postern_proto::envoy::extensions::filters::network::http_connection_manager::v3 as hcm;
use postern_proto::envoy::extensions::transport_sockets::tls::v3 as tls;
use postern_proto::type_url;
use postern_tests::control::{wait_acks, ControlPlane};
use postern_tests::envoy::{
    certificate_secret, downstream_tls, http_listener, static_cluster, tcp_listener,
};
use postern_tests::mesh::{probe_connector, tls_connect, Issued, TestCa};
use postern_tests::prom::scrape;
use postern_tests::tcp_backend::TcpBackend;
use postern_tests::{
    empty, eventually, get, request, start_proxy, wait_until, H1Conn, HttpBackend, Proxy,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn any_port() -> SocketAddr {
    "127.0.0.1:0".parse().expect("addr")
}

fn route_config(name: &str, cluster: &str) -> route::RouteConfiguration {
    route::RouteConfiguration {
        name: name.into(),
        virtual_hosts: vec![route::VirtualHost {
            name: "all".into(),
            domains: vec!["*".into()],
            routes: vec![route::Route {
                r#match: Some(route::RouteMatch {
                    path_specifier: Some(route::route_match::PathSpecifier::Prefix("/".into())),
                    ..Default::default()
                }),
                action: Some(route::route::Action::Route(route::RouteAction {
                    cluster_specifier: Some(route::route_action::ClusterSpecifier::Cluster(
                        cluster.into(),
                    )),
                    ..Default::default()
                })),
                ..Default::default()
            }],
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// An HTTP connection manager chain whose routes come by RDS.
fn rds_chain(routes: &str) -> listener::FilterChain {
    let manager = hcm::HttpConnectionManager {
        stat_prefix: routes.into(),
        route_specifier: Some(hcm::http_connection_manager::RouteSpecifier::Rds(
            hcm::Rds {
                route_config_name: routes.into(),
                config_source: Some(core::ConfigSource {
                    config_source_specifier: Some(core::config_source::ConfigSourceSpecifier::Ads(
                        Default::default(),
                    )),
                    resource_api_version: core::ApiVersion::V3 as i32,
                    ..Default::default()
                }),
            },
        )),
        http_filters: vec![hcm::HttpFilter {
            name: "envoy.filters.http.router".into(),
            config_type: Some(hcm::http_filter::ConfigType::TypedConfig(pack(
                &Router::default(),
            ))),
            ..Default::default()
        }],
        ..Default::default()
    };
    listener::FilterChain {
        filters: vec![listener::Filter {
            name: "envoy.filters.network.http_connection_manager".into(),
            config_type: Some(listener::filter::ConfigType::TypedConfig(pack(&manager))),
        }],
        ..Default::default()
    }
}

/// An HTTP connection manager chain with inline routes to `cluster`.
fn inline_chain(cluster: &str) -> listener::FilterChain {
    http_listener("x", any_port(), cluster, None).filter_chains[0].clone()
}

fn tcp_chain(cluster: &str) -> listener::FilterChain {
    tcp_listener("x", any_port(), cluster).filter_chains[0].clone()
}

fn inline_pem(text: &str) -> Option<core::DataSource> {
    Some(core::DataSource {
        specifier: Some(core::data_source::Specifier::InlineString(text.into())),
        ..Default::default()
    })
}

/// Edge TLS presenting `issued`.
fn edge_inline(issued: &Issued) -> Option<core::TransportSocket> {
    Some(downstream_tls(&tls::DownstreamTlsContext {
        common_tls_context: Some(tls::CommonTlsContext {
            tls_certificates: vec![tls::TlsCertificate {
                certificate_chain: inline_pem(&issued.cert_pem),
                private_key: inline_pem(&issued.key_pem),
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    }))
}

/// Edge TLS presenting the SDS Secret `name`.
fn edge_sds(name: &str) -> Option<core::TransportSocket> {
    Some(downstream_tls(&tls::DownstreamTlsContext {
        common_tls_context: Some(tls::CommonTlsContext {
            tls_certificate_sds_secret_configs: vec![tls::SdsSecretConfig {
                name: name.into(),
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    }))
}

fn matching(
    mut chain: listener::FilterChain,
    names: &[&str],
    transport: &str,
    alpn: &[&str],
    socket: Option<core::TransportSocket>,
) -> listener::FilterChain {
    chain.filter_chain_match = Some(listener::FilterChainMatch {
        server_names: names.iter().map(|n| n.to_string()).collect(),
        transport_protocol: transport.into(),
        application_protocols: alpn.iter().map(|a| a.to_string()).collect(),
        ..Default::default()
    });
    chain.transport_socket = socket;
    chain
}

fn der(pem: &str) -> CertificateDer<'static> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()
        .expect("a certificate")
        .expect("pem")
}

/// A GET over TLS with `sni`: the certificate served and the backend that
/// answered.
async fn https_get(
    addr: SocketAddr,
    sni: &str,
) -> std::io::Result<(CertificateDer<'static>, String)> {
    let mut tls = tls_connect(&probe_connector(None, &[b"http/1.1"]), addr, sni).await?;
    let served = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first().cloned())
        .ok_or_else(|| std::io::Error::other("no certificate"))?;
    tls.write_all(format!("GET / HTTP/1.1\r\nhost: {sni}\r\nconnection: close\r\n\r\n").as_bytes())
        .await?;
    let mut reply = Vec::new();
    tls.read_to_end(&mut reply).await?;
    let reply = String::from_utf8_lossy(&reply).to_lowercase();
    let backend = reply
        .lines()
        .find_map(|l| l.strip_prefix("x-backend: "))
        .unwrap_or("")
        .trim()
        .to_string();
    Ok((served, backend))
}

struct Setup {
    a: Issued,
    b: Issued,
    any: Issued,
    pass: Issued,
    pass_addr: SocketAddr,
    echo: TcpBackend,
    backends: Vec<HttpBackend>,
}

/// A TLS server of its own behind the gateway: it echoes what it reads, so
/// a client reaching it proves its TLS went through untouched.
async fn tls_echo_server(issued: &Issued) -> SocketAddr {
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(issued.cert_pem.as_bytes())
            .collect::<Result<_, _>>()
            .expect("chain");
    let key =
        rustls::pki_types::PrivateKeyDer::from_pem_slice(issued.key_pem.as_bytes()).expect("key");
    let config = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .expect("server config");
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    let socket = tokio::net::TcpListener::bind(any_port())
        .await
        .expect("bind");
    let addr = socket.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((tcp, _)) = socket.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if let Ok(mut tls) = acceptor.accept(tcp).await {
                    let mut buf = [0u8; 4];
                    if tls.read_exact(&mut buf).await.is_ok() {
                        let _ = tls.write_all(&buf).await;
                        let _ = tls.flush().await;
                    }
                }
            });
        }
    });
    addr
}

impl Setup {
    async fn new() -> Setup {
        let ca = TestCa::new("edge root");
        let a = ca.issue_server(&["a.example.com"]);
        let b = ca.issue_server(&["b.example.com"]);
        let any = ca.issue_server(&["any.example.com"]);
        let pass = ca.issue_server(&["pass.example.com"]);
        let pass_addr = tls_echo_server(&pass).await;
        let mut backends = Vec::new();
        for name in ["a", "b", "plain", "fallback"] {
            backends.push(HttpBackend::start(name).await);
        }
        Setup {
            a,
            b,
            any,
            pass,
            pass_addr,
            echo: TcpBackend::echo().await,
            backends,
        }
    }

    /// The gateway: a.example.com by RDS, b.example.com inline with an SDS
    /// certificate, plaintext, an ALPN-picked TCP chain and a default
    /// chain; and a listener without a default chain.
    fn snapshot(&self, version: &str, a_goes_to: &str, b_goes_to: &str) -> Snapshot {
        let mut gw = http_listener("gw", any_port(), "unused", None);
        gw.filter_chains = vec![
            matching(
                rds_chain("routes-a"),
                &["a.example.com"],
                "",
                &[],
                edge_inline(&self.a),
            ),
            matching(
                inline_chain(b_goes_to),
                &["b.example.com"],
                "",
                &[],
                edge_sds("b-cert"),
            ),
            matching(inline_chain("plain"), &[], "raw_buffer", &[], None),
            matching(
                tcp_chain("echo"),
                &["a.example.com"],
                "",
                &["echo-proto"],
                edge_inline(&self.a),
            ),
            // TLS passed through by SNI: no transport_socket, a tcp_proxy.
            matching(tcp_chain("pass"), &["pass.example.com"], "tls", &[], None),
        ];
        gw.default_filter_chain = Some(matching(
            inline_chain("fallback"),
            &[],
            "",
            &[],
            edge_inline(&self.any),
        ));
        gw.listener_filters = vec![listener::ListenerFilter {
            name: "envoy.filters.listener.tls_inspector".into(),
            ..Default::default()
        }];
        let mut strict = http_listener("strict", any_port(), "unused", None);
        strict.filter_chains = vec![
            matching(
                inline_chain("a"),
                &["a.example.com"],
                "",
                &[],
                edge_inline(&self.a),
            ),
            matching(tcp_chain("echo"), &[], "raw_buffer", &[], None),
        ];

        let mut snapshot = Snapshot::new(version);
        snapshot.add_message("gw", &gw);
        snapshot.add_message("strict", &strict);
        snapshot.add_message("routes-a", &route_config("routes-a", a_goes_to));
        snapshot.add_message(
            "b-cert",
            &tls::Secret {
                name: "b-cert".into(),
                ..certificate_secret(&self.b.cert_pem, &self.b.key_pem)
            },
        );
        for backend in &self.backends {
            snapshot.add_message(
                backend.name(),
                &static_cluster(backend.name(), backend.addr(), None),
            );
        }
        snapshot.add_message("echo", &static_cluster("echo", self.echo.addr(), None));
        snapshot.add_message("pass", &static_cluster("pass", self.pass_addr, None));
        snapshot
    }
}

fn bootstrap(cp: &ControlPlane) -> String {
    format!(
        r#"
node: {{ id: "gw" }}
xds: {{ address: "{}", initial_backoff: 50ms, max_backoff: 500ms }}
"#,
        cp.url()
    )
}

async fn ready(proxy: &Proxy) {
    wait_until("ready", || async {
        get(proxy.admin_addr(), "localhost", "/ready").await.status == 200
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filter_chains_pick_routes_certificates_and_clusters_per_connection() {
    let setup = Setup::new().await;
    let cp = ControlPlane::start(setup.snapshot("1", "a", "b")).await;
    let proxy = start_proxy(&bootstrap(&cp)).await;
    ready(&proxy).await;
    let gw = proxy.listener_addr("gw").expect("gw bound");

    // Two server names, two route configs, two certificates.
    let (served, backend) = https_get(gw, "a.example.com").await.expect("a");
    assert_eq!((served, backend.as_str()), (der(&setup.a.cert_pem), "a"));
    let (served, backend) = https_get(gw, "b.example.com").await.expect("b");
    assert_eq!((served, backend.as_str()), (der(&setup.b.cert_pem), "b"));

    // Plaintext on the same port takes the raw_buffer chain.
    assert_eq!(get(gw, "svc", "/").await.backend(), Some("plain"));

    // The client's ALPN picks the TCP chain under the same name.
    let mut tls = tls_connect(
        &probe_connector(None, &[b"echo-proto"]),
        gw,
        "a.example.com",
    )
    .await
    .expect("alpn chain");
    tls.write_all(b"ping").await.expect("write");
    let mut echoed = [0u8; 4];
    tls.read_exact(&mut echoed).await.expect("echo");
    assert_eq!(&echoed, b"ping");

    // pass.example.com's TLS goes through to a server of its own.
    let mut tls = tls_connect(&probe_connector(None, &[]), gw, "pass.example.com")
        .await
        .expect("passthrough");
    let served = tls.get_ref().1.peer_certificates().expect("certificate")[0].clone();
    assert_eq!(served, der(&setup.pass.cert_pem));
    tls.write_all(b"pass").await.expect("write");
    let mut echoed = [0u8; 4];
    tls.read_exact(&mut echoed).await.expect("echo");
    assert_eq!(&echoed, b"pass");

    // Any other name goes to the default chain.
    let (served, backend) = https_get(gw, "other.example.org").await.expect("default");
    assert_eq!(
        (served, backend.as_str()),
        (der(&setup.any.cert_pem), "fallback")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_no_chain_takes_is_closed_and_counted() {
    let _recorder = postern::telemetry::install_prometheus_recorder();
    let setup = Setup::new().await;
    let cp = ControlPlane::start(setup.snapshot("1", "a", "b")).await;
    let proxy = start_proxy(&bootstrap(&cp)).await;
    ready(&proxy).await;
    let strict = proxy.listener_addr("strict").expect("strict bound");

    let (served, backend) = https_get(strict, "a.example.com").await.expect("a");
    assert_eq!((served, backend.as_str()), (der(&setup.a.cert_pem), "a"));
    // Under the catch-all name only a raw_buffer chain exists: TLS to any
    // other name matches nothing.
    assert!(https_get(strict, "other.example.com").await.is_err());
    wait_until("no-match counted", || async {
        let counted = scrape(
            proxy.admin_addr(),
            "postern_downstream_no_filter_chain_total",
            &[("listener", "strict")],
        )
        .await;
        counted >= 1.0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_to_one_chain_leaves_the_other_chains_connections_alone() {
    let setup = Setup::new().await;
    let cp = ControlPlane::start(setup.snapshot("1", "a", "b")).await;
    let mut events = cp.server.events();
    let proxy = start_proxy(&bootstrap(&cp)).await;
    ready(&proxy).await;
    let gw = proxy.listener_addr("gw").expect("gw bound");

    let mut plain = H1Conn::connect(gw).await.expect("connect");
    let request = || request("GET", "svc", "/").body(empty()).expect("request");
    let first = plain.send(request()).await.expect("first");
    assert_eq!(first.backend(), Some("plain"));
    assert_eq!(https_get(gw, "a.example.com").await.expect("a").1, "a");

    // a.example.com's routes (RDS) now lead to b, and b.example.com's
    // (inline in the listener) to fallback.
    cp.server.set_snapshot(setup.snapshot("2", "b", "fallback"));
    wait_acks(&mut events, &[(type_url::ROUTE, "2")]).await;
    eventually("b.example.com follows its new routes", || async {
        let (_, backend) = https_get(gw, "b.example.com").await.ok()?;
        (backend == "fallback").then_some(())
    })
    .await;
    eventually("a.example.com follows its new routes", || async {
        let (_, backend) = https_get(gw, "a.example.com").await.ok()?;
        (backend == "b").then_some(())
    })
    .await;

    // The plaintext chain's connection goes on as it was.
    assert!(!plain.is_closed());
    let again = plain.send(request()).await.expect("same connection");
    assert_eq!(again.backend(), Some("plain"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_warms_until_every_chains_routes_and_secrets_arrive() {
    let setup = Setup::new().await;
    let mut partial = setup.snapshot("1", "a", "b");
    partial.remove(type_url::ROUTE, "routes-a");
    partial.remove(type_url::SECRET, "b-cert");
    let cp = ControlPlane::start(partial).await;
    let proxy = start_proxy(&bootstrap(&cp)).await;
    wait_until("the listener that needs nothing is bound", || async {
        proxy.listener_addr("strict").is_some()
    })
    .await;
    assert!(
        proxy.listener_addr("gw").is_none(),
        "gw served before its chains' routes and certificate"
    );

    // Only the routes: the SDS certificate of another chain still holds it.
    let mut routes_only = setup.snapshot("2", "a", "b");
    routes_only.remove(type_url::SECRET, "b-cert");
    let mut events = cp.server.events();
    cp.server.set_snapshot(routes_only);
    wait_acks(&mut events, &[(type_url::ROUTE, "2")]).await;
    assert!(proxy.listener_addr("gw").is_none());

    cp.server.set_snapshot(setup.snapshot("3", "a", "b"));
    ready(&proxy).await;
    let gw = proxy.listener_addr("gw").expect("gw bound");
    let (served, backend) = https_get(gw, "b.example.com").await.expect("b");
    assert_eq!((served, backend.as_str()), (der(&setup.b.cert_pem), "b"));
    assert_eq!(https_get(gw, "a.example.com").await.expect("a").1, "a");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_chain_is_nacked_by_name_and_the_last_good_listener_keeps_serving() {
    use postern_proto::envoy::config::cluster::v3 as cluster;
    use postern_tests::control::{is_nack, wait_event};
    let setup = Setup::new().await;
    let cp = ControlPlane::start(setup.snapshot("1", "a", "b")).await;
    let mut events = cp.server.events();
    let proxy = start_proxy(&bootstrap(&cp)).await;
    ready(&proxy).await;
    let gw = proxy.listener_addr("gw").expect("gw bound");

    // b.example.com's chain now sends to an ORIGINAL_DST cluster, which
    // only a capture listener can use.
    let mut bad = setup.snapshot("2", "a", "passthrough");
    bad.add_message(
        "passthrough",
        &cluster::Cluster {
            name: "passthrough".into(),
            cluster_discovery_type: Some(cluster::cluster::ClusterDiscoveryType::Type(
                cluster::cluster::DiscoveryType::OriginalDst as i32,
            )),
            lb_policy: cluster::cluster::LbPolicy::ClusterProvided as i32,
            ..Default::default()
        },
    );
    cp.server.set_snapshot(bad);
    let nack = wait_event(&mut events, "listener NACK", |e| {
        is_nack(e, type_url::LISTENER)
    })
    .await;
    let postern_control::ads::AdsEventKind::Nack { error, .. } = nack.kind else {
        unreachable!()
    };
    assert!(
        error.contains("listener gw: filter_chains[1].virtual_hosts[0]")
            && error.contains("\"passthrough\" is ORIGINAL_DST"),
        "{error}"
    );
    assert_eq!(https_get(gw, "b.example.com").await.expect("b").1, "b");
}

//! Clusters from xDS beyond the mesh: plain upstream TLS to an external
//! server (roots inline or by SDS, SNI and SAN checks, a client certificate
//! by SDS, warming until the Secrets arrive), and EDS priorities that fail
//! over to the next level and back.

use std::net::SocketAddr;

use postern_control::ads::Snapshot;
use postern_proto::envoy::config::cluster::v3 as cluster;
use postern_proto::envoy::config::core::v3 as core;
use postern_proto::envoy::config::endpoint::v3 as endpoint;
use postern_proto::envoy::extensions::transport_sockets::tls::v3 as tls;
use postern_proto::envoy::r#type::matcher::v3 as matcher;
use postern_proto::google::protobuf::UInt32Value;
use postern_proto::type_url;
use postern_tests::control::{is_ack, wait_event, ControlPlane};
use postern_tests::envoy::http_listener;
use postern_tests::http_backend::Reply;
use postern_tests::mesh::TestCa;
use postern_tests::prom::scrape;
use postern_tests::tls_backend::TlsFront;
use postern_tests::{eventually, get, start_proxy, wait_until, HttpBackend, Proxy};

fn bootstrap(cp: &ControlPlane) -> String {
    format!(
        r#"
node: {{ id: "upstream-test" }}
xds: {{ address: "{}", initial_backoff: 50ms, max_backoff: 500ms }}
"#,
        cp.url()
    )
}

fn any_port() -> SocketAddr {
    "127.0.0.1:0".parse().expect("addr")
}

fn address(addr: SocketAddr) -> Option<core::Address> {
    Some(core::Address {
        address: Some(core::address::Address::SocketAddress(core::SocketAddress {
            address: addr.ip().to_string(),
            port_specifier: Some(core::socket_address::PortSpecifier::PortValue(u32::from(
                addr.port(),
            ))),
            ..Default::default()
        })),
    })
}

fn lb_endpoint(addr: SocketAddr, health: core::HealthStatus) -> endpoint::LbEndpoint {
    endpoint::LbEndpoint {
        host_identifier: Some(endpoint::lb_endpoint::HostIdentifier::Endpoint(
            endpoint::Endpoint {
                address: address(addr),
                ..Default::default()
            },
        )),
        health_status: health as i32,
        ..Default::default()
    }
}

fn inline(pem: &str) -> Option<core::DataSource> {
    Some(core::DataSource {
        specifier: Some(core::data_source::Specifier::InlineString(pem.into())),
        ..Default::default()
    })
}

fn sds(name: &str) -> tls::SdsSecretConfig {
    tls::SdsSecretConfig {
        name: name.into(),
        sds_config: Some(core::ConfigSource {
            config_source_specifier: Some(core::config_source::ConfigSourceSpecifier::Ads(
                Default::default(),
            )),
            resource_api_version: core::ApiVersion::V3 as i32,
            ..Default::default()
        }),
    }
}

fn dns_san(name: &str) -> tls::SubjectAltNameMatcher {
    tls::SubjectAltNameMatcher {
        san_type: tls::subject_alt_name_matcher::SanType::Dns as i32,
        matcher: Some(matcher::StringMatcher {
            match_pattern: Some(matcher::string_matcher::MatchPattern::Exact(name.into())),
            ignore_case: false,
        }),
        ..Default::default()
    }
}

/// A STATIC cluster of one endpoint behind `context`.
fn tls_cluster(
    name: &str,
    addr: SocketAddr,
    context: &tls::UpstreamTlsContext,
) -> cluster::Cluster {
    cluster::Cluster {
        name: name.into(),
        cluster_discovery_type: Some(cluster::cluster::ClusterDiscoveryType::Type(
            cluster::cluster::DiscoveryType::Static as i32,
        )),
        load_assignment: Some(endpoint::ClusterLoadAssignment {
            cluster_name: name.into(),
            endpoints: vec![endpoint::LocalityLbEndpoints {
                lb_endpoints: vec![lb_endpoint(addr, core::HealthStatus::Unknown)],
                ..Default::default()
            }],
            ..Default::default()
        }),
        transport_socket: Some(core::TransportSocket {
            name: "envoy.transport_sockets.tls".into(),
            config_type: Some(core::transport_socket::ConfigType::TypedConfig(
                postern_control::ads::pack(context),
            )),
        }),
        ..Default::default()
    }
}

/// Plain TLS with inline roots, SNI `sni` and one DNS SAN that must match.
fn inline_context(root_pem: &str, sni: &str, san: &str) -> tls::UpstreamTlsContext {
    tls::UpstreamTlsContext {
        sni: sni.into(),
        common_tls_context: Some(tls::CommonTlsContext {
            validation_context_type: Some(
                tls::common_tls_context::ValidationContextType::ValidationContext(
                    tls::CertificateValidationContext {
                        trusted_ca: inline(root_pem),
                        match_typed_subject_alt_names: vec![dns_san(san)],
                        ..Default::default()
                    },
                ),
            ),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn roots_secret(name: &str, pem: &str) -> tls::Secret {
    tls::Secret {
        name: name.into(),
        r#type: Some(tls::secret::Type::ValidationContext(
            tls::CertificateValidationContext {
                trusted_ca: inline(pem),
                ..Default::default()
            },
        )),
    }
}

fn certificate_secret(name: &str, chain_pem: &str, key_pem: &str) -> tls::Secret {
    tls::Secret {
        name: name.into(),
        r#type: Some(tls::secret::Type::TlsCertificate(tls::TlsCertificate {
            certificate_chain: inline(chain_pem),
            private_key: inline(key_pem),
            ..Default::default()
        })),
    }
}

async fn ready(proxy: &Proxy) {
    wait_until("proxy ready", || async {
        get(proxy.admin_addr(), "localhost", "/ready").await.status == 200
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_upstream_tls_from_xds_sends_sni_and_checks_the_san() {
    let _recorder = postern::telemetry::install_prometheus_recorder();
    let ca = TestCa::new("external root");
    let app = HttpBackend::start("external").await;
    let front = TlsFront::start(app.addr(), &ca.issue_server(&["api.example.com"]), None).await;

    let snapshot = |version: &str, san: &str| {
        let mut s = Snapshot::new(version);
        s.add_message("out", &http_listener("out", any_port(), "ext", None));
        s.add_message(
            "ext",
            &tls_cluster(
                "ext",
                front.addr(),
                &inline_context(ca.root_pem(), "api.example.com", san),
            ),
        );
        s
    };
    let cp = ControlPlane::start(snapshot("1", "api.example.com")).await;
    let proxy = start_proxy(&bootstrap(&cp)).await;
    ready(&proxy).await;
    let out = proxy.listener_addr("out").expect("out bound");

    let response = get(out, "api", "/").await;
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(response.backend(), Some("external"));
    let first = front.handshakes()[0].clone();
    assert_eq!(first.sni.as_deref(), Some("api.example.com"));
    assert_eq!(first.alpn.as_deref(), Some(&b"http/1.1"[..]));
    assert!(!first.client_cert);

    // The same server, now expected to be someone else: refused, counted,
    // and the request never reaches the app. Calls made while the push is
    // on its way still go out on the old cluster, so the count is taken
    // once the new one refuses.
    cp.server.set_snapshot(snapshot("2", "billing.example.com"));
    eventually("the wrong SAN fails the handshake", || async {
        (get(out, "api", "/").await.status == 502).then_some(())
    })
    .await;
    let served = app.requests().len();
    assert_eq!(get(out, "api", "/").await.status, 502);
    assert_eq!(app.requests().len(), served);
    let failures = scrape(
        proxy.admin_addr(),
        "postern_upstream_tls_failures_total",
        &[("cluster", "ext"), ("reason", "bad_certificate")],
    )
    .await;
    assert!(failures >= 1.0, "{failures}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roots_and_client_certificate_by_sds_warm_the_cluster_until_they_arrive() {
    let server_ca = TestCa::new("external root");
    let client_ca = TestCa::new("client root");
    let app = HttpBackend::start("external").await;
    let front = TlsFront::start(
        app.addr(),
        &server_ca.issue_server(&["api.example.com"]),
        Some(client_ca.root_pem()),
    )
    .await;
    let context = tls::UpstreamTlsContext {
        sni: "api.example.com".into(),
        common_tls_context: Some(tls::CommonTlsContext {
            tls_certificate_sds_secret_configs: vec![sds("ext-client")],
            validation_context_type: Some(
                tls::common_tls_context::ValidationContextType::ValidationContextSdsSecretConfig(
                    sds("ext-ca"),
                ),
            ),
            ..Default::default()
        }),
        ..Default::default()
    };
    let mut snapshot = Snapshot::new("1");
    snapshot.add_message("out", &http_listener("out", any_port(), "ext", None));
    snapshot.add_message("ext", &tls_cluster("ext", front.addr(), &context));
    let cp = ControlPlane::start(snapshot.clone()).await;
    let mut events = cp.server.events();
    let proxy = start_proxy(&bootstrap(&cp)).await;

    // Accepted, but the cluster waits for its Secrets: nothing goes out and
    // the proxy is not ready.
    wait_event(&mut events, "cluster ACK", |e| {
        is_ack(e, type_url::CLUSTER, "1")
    })
    .await;
    let out = eventually("listener bound", || async { proxy.listener_addr("out") }).await;
    assert_ne!(get(out, "api", "/").await.status, 200);
    assert_eq!(
        get(proxy.admin_addr(), "localhost", "/ready").await.status,
        503
    );
    assert!(front.handshakes().is_empty());

    // Only the roots: still warming, as the client certificate is missing.
    snapshot.add_message("ext-ca", &roots_secret("ext-ca", server_ca.root_pem()));
    snapshot.version = "2".into();
    cp.server.set_snapshot(snapshot.clone());
    wait_event(&mut events, "secret ACK", |e| {
        is_ack(e, type_url::SECRET, "2")
    })
    .await;
    assert_ne!(get(out, "api", "/").await.status, 200);
    assert!(front.handshakes().is_empty());

    let client = client_ca.issue("spiffe://client.example/caller", -60, 3600);
    snapshot.add_message(
        "ext-client",
        &certificate_secret("ext-client", &client.cert_pem, &client.key_pem),
    );
    snapshot.version = "3".into();
    cp.server.set_snapshot(snapshot.clone());
    ready(&proxy).await;
    let response = get(out, "api", "/").await;
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(response.backend(), Some("external"));
    let handshake = front.handshakes()[0].clone();
    assert!(handshake.client_cert);
    assert_eq!(handshake.sni.as_deref(), Some("api.example.com"));

    // New roots by SDS replace the connector (and its pooled connections):
    // roots that did not sign the server refuse it from then on.
    let stranger = TestCa::new("stranger root");
    snapshot.add_message("ext-ca", &roots_secret("ext-ca", stranger.root_pem()));
    snapshot.version = "4".into();
    cp.server.set_snapshot(snapshot);
    eventually("the new roots are used", || async {
        (get(out, "api", "/").await.status == 502).then_some(())
    })
    .await;
}

/// An EDS cluster `svc` with outlier detection (2 consecutive 5xx, a
/// short ejection), and its endpoints: (backend, priority, health).
fn priorities(version: &str, endpoints: &[(SocketAddr, u32, core::HealthStatus)]) -> Snapshot {
    let mut s = Snapshot::new(version);
    s.add_message("out", &http_listener("out", any_port(), "svc", None));
    s.add_message(
        "svc",
        &cluster::Cluster {
            name: "svc".into(),
            cluster_discovery_type: Some(cluster::cluster::ClusterDiscoveryType::Type(
                cluster::cluster::DiscoveryType::Eds as i32,
            )),
            outlier_detection: Some(cluster::OutlierDetection {
                consecutive_5xx: Some(UInt32Value { value: 2 }),
                base_ejection_time: Some(postern_proto::google::protobuf::Duration {
                    seconds: 0,
                    nanos: 300_000_000,
                }),
                max_ejection_percent: Some(UInt32Value { value: 100 }),
                ..Default::default()
            }),
            ..Default::default()
        },
    );
    let mut levels: Vec<endpoint::LocalityLbEndpoints> = Vec::new();
    for &(addr, priority, health) in endpoints {
        match levels.iter_mut().find(|l| l.priority == priority) {
            Some(level) => level.lb_endpoints.push(lb_endpoint(addr, health)),
            None => levels.push(endpoint::LocalityLbEndpoints {
                priority,
                lb_endpoints: vec![lb_endpoint(addr, health)],
                ..Default::default()
            }),
        }
    }
    s.add_message(
        "svc",
        &endpoint::ClusterLoadAssignment {
            cluster_name: "svc".into(),
            endpoints: levels,
            ..Default::default()
        },
    );
    s
}

async fn backend_of(out: SocketAddr) -> Option<String> {
    let response = get(out, "svc", "/").await;
    (response.status == 200).then(|| response.backend().unwrap_or_default().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eds_priorities_fail_over_to_the_next_level_and_back() {
    use core::HealthStatus::{Healthy, Unhealthy};
    let primary = HttpBackend::start("primary").await;
    let standby = HttpBackend::start("standby").await;
    let (p, s) = (primary.addr(), standby.addr());
    let cp = ControlPlane::start(priorities("1", &[(p, 0, Healthy), (s, 1, Healthy)])).await;
    let proxy = start_proxy(&bootstrap(&cp)).await;
    ready(&proxy).await;
    let out = proxy.listener_addr("out").expect("out bound");
    for _ in 0..4 {
        assert_eq!(backend_of(out).await.as_deref(), Some("primary"));
    }
    assert!(standby.requests().is_empty());

    // EDS marks priority 0 unhealthy: priority 1 serves, then 0 again.
    cp.server
        .set_snapshot(priorities("2", &[(p, 0, Unhealthy), (s, 1, Healthy)]));
    eventually("standby takes over", || async {
        (backend_of(out).await.as_deref() == Some("standby")).then_some(())
    })
    .await;
    cp.server
        .set_snapshot(priorities("3", &[(p, 0, Healthy), (s, 1, Healthy)]));
    eventually("primary is back", || async {
        (backend_of(out).await.as_deref() == Some("primary")).then_some(())
    })
    .await;

    // Outlier detection ejects the failing primary: the standby serves
    // until the ejection ends and the primary answers again.
    primary.set_default(Some(Reply::status(503)));
    eventually("the primary is ejected", || async {
        (backend_of(out).await.as_deref() == Some("standby")).then_some(())
    })
    .await;
    primary.set_default(None);
    eventually("the recovered primary serves again", || async {
        (backend_of(out).await.as_deref() == Some("primary")).then_some(())
    })
    .await;
}

//! Istio's `virtualInbound` shape (listener filters with `original_dst`,
//! filter chains by `destination_port`) and `ORIGINAL_DST` clusters.

use postern_proto::envoy::extensions::transport_sockets::tls::v3 as tls;
use postern_proto::google::protobuf::{BoolValue, Duration as ProtoDuration};

use super::*;
use crate::config::capture::PortRange;
use crate::config::Config;

const CALLER: &str = "spiffe://cluster.local/ns/test/sa/client";
const PASSTHROUGH: &str = "InboundPassthroughClusterIpv4";

fn sds() -> SdsSourceFile {
    serde_yaml_ng::from_str("{}").unwrap()
}

fn listener_filter(name: &str, type_name: &str) -> listener::ListenerFilter {
    listener::ListenerFilter {
        name: format!("envoy.filters.listener.{name}"),
        config_type: Some(listener::listener_filter::ConfigType::TypedConfig(Any {
            type_url: format!(
                "type.googleapis.com/envoy.extensions.filters.listener.{name}.v3.{type_name}"
            ),
            value: Vec::new(),
        })),
        ..Default::default()
    }
}

fn mtls(allowed: &str) -> core::TransportSocket {
    use tls::common_tls_context::ValidationContextType;
    let secret = |name: &str| tls::SdsSecretConfig {
        name: name.into(),
        ..Default::default()
    };
    let context = tls::DownstreamTlsContext {
        require_client_certificate: Some(BoolValue { value: true }),
        common_tls_context: Some(tls::CommonTlsContext {
            tls_certificate_sds_secret_configs: vec![secret("default")],
            validation_context_type: Some(ValidationContextType::CombinedValidationContext(
                tls::common_tls_context::CombinedCertificateValidationContext {
                    default_validation_context: Some(tls::CertificateValidationContext {
                        match_typed_subject_alt_names: vec![tls::SubjectAltNameMatcher {
                            san_type: tls::subject_alt_name_matcher::SanType::Uri as i32,
                            matcher: Some(matcher::StringMatcher {
                                match_pattern: Some(matcher::string_matcher::MatchPattern::Exact(
                                    allowed.into(),
                                )),
                                ignore_case: false,
                            }),
                            ..Default::default()
                        }],
                        ..Default::default()
                    }),
                    validation_context_sds_secret_config: Some(secret("ROOTCA")),
                    ..Default::default()
                },
            )),
            ..Default::default()
        }),
        ..Default::default()
    };
    core::TransportSocket {
        name: "envoy.transport_sockets.tls".into(),
        config_type: Some(core::transport_socket::ConfigType::TypedConfig(any(
            &context,
        ))),
    }
}

/// A chain for `port` (every port when `None`) to `cluster`: an HTTP
/// connection manager with one route when `http`, else a TCP proxy.
fn chain(port: Option<u32>, http: bool, cluster: &str) -> listener::FilterChain {
    chain_of(port, http, cluster, |_| {})
}

/// An HTTP chain for `port` whose one route `change` edits.
fn chain_with_route(port: Option<u32>, change: fn(&mut route::Route)) -> listener::FilterChain {
    chain_of(port, true, "inbound|8080||", change)
}

fn chain_of(
    port: Option<u32>,
    http: bool,
    cluster: &str,
    change: impl Fn(&mut route::Route),
) -> listener::FilterChain {
    let mut route = route_to(cluster);
    change(&mut route);
    let filter = if http {
        let manager = hcm::HttpConnectionManager {
            stat_prefix: "inbound".into(),
            route_specifier: Some(hcm::http_connection_manager::RouteSpecifier::RouteConfig(
                route::RouteConfiguration {
                    name: "inbound".into(),
                    virtual_hosts: vec![route::VirtualHost {
                        name: "inbound|http".into(),
                        domains: vec!["*".into()],
                        routes: vec![route],
                        ..Default::default()
                    }],
                    ..Default::default()
                },
            )),
            ..Default::default()
        };
        listener::Filter {
            name: "envoy.filters.network.http_connection_manager".into(),
            config_type: Some(listener::filter::ConfigType::TypedConfig(any(&manager))),
        }
    } else {
        tcp_listener("inbound", None, cluster).filter_chains[0].filters[0].clone()
    };
    listener::FilterChain {
        filter_chain_match: Some(listener::FilterChainMatch {
            destination_port: port.map(|value| UInt32Value { value }),
            transport_protocol: "tls".into(),
            application_protocols: if http {
                vec!["istio-http/1.1".into(), "istio-h2".into()]
            } else {
                vec!["istio".into()]
            },
            ..Default::default()
        }),
        transport_socket: Some(mtls(CALLER)),
        filters: vec![filter],
        ..Default::default()
    }
}

/// Istio's shape, strict mTLS: port 8080 HTTP, port 3306 TCP, every other
/// port sniffed and passed through.
fn virtual_inbound() -> listener::Listener {
    listener::Listener {
        name: "virtualInbound".into(),
        address: socket("0.0.0.0", 15006),
        traffic_direction: 1,
        listener_filters: vec![
            listener_filter("original_dst", "OriginalDst"),
            listener_filter("tls_inspector", "TlsInspector"),
            listener_filter("http_inspector", "HttpInspector"),
        ],
        listener_filters_timeout: Some(ProtoDuration {
            seconds: 0,
            nanos: 250_000_000,
        }),
        continue_on_listener_filters_timeout: true,
        filter_chains: vec![
            chain(Some(8080), true, "inbound|8080||"),
            chain(Some(3306), false, "inbound|3306||"),
            chain(None, true, PASSTHROUGH),
            chain(None, false, PASSTHROUGH),
        ],
        ..Default::default()
    }
}

fn problems_of(l: &listener::Listener) -> Vec<String> {
    listener_parts(l, Some(&sds()), &|_| None).unwrap_err()
}

#[test]
fn virtual_inbound_becomes_an_inbound_capture_listener() {
    use crate::config::{ListenerProtocol, ListenerTls};
    let translated = listener_parts(&virtual_inbound(), Some(&sds()), &|_| None).unwrap();
    let file = &translated.file;
    assert_eq!(file.kind, ListenerKind::Capture);
    let capture = file.capture.as_ref().unwrap();
    assert_eq!(
        capture.direction,
        crate::telemetry::log::TrafficDirection::Inbound
    );
    assert_eq!(
        capture.detection_timeout,
        std::time::Duration::from_millis(250)
    );
    // Only the TCP-only port skips detection.
    assert_eq!(
        capture.opaque_ports,
        [PortRange {
            first: 3306,
            last: 3306
        }]
    );
    let mtls = file.mtls.as_ref().unwrap();
    assert_eq!(mtls.mode, MtlsMode::Strict);
    assert_eq!(mtls.allowed_identities, [CALLER]);
    let targets: Vec<(&str, Option<u16>)> = translated
        .app_targets
        .iter()
        .map(|t| (t.cluster.as_str(), t.port))
        .collect();
    assert_eq!(
        targets,
        [
            ("inbound|8080||", Some(8080)),
            ("inbound|3306||", Some(3306)),
            (PASSTHROUGH, None),
            (PASSTHROUGH, None),
        ]
    );
    assert_eq!(
        translated.app_targets[0].field,
        "filter_chains[0].filters[0].route_config.virtual_hosts[0].routes[0].route.cluster"
    );
    assert_eq!(translated.routes, RouteSource::None);

    // The result is a valid config: an inbound capture listener with mTLS.
    let mut config: ConfigFile =
        serde_yaml_ng::from_str("identity: { spiffe_id: \"spiffe://cluster.local/ns/test/sa/server\", source: { files: { cert: c.pem, key: k.pem, bundle: b.pem } } }").unwrap();
    config.listeners.push(translated.file);
    let config = Config::from_dynamic_model(config).unwrap();
    let ListenerProtocol::Capture(compiled) = &config.listeners[0].protocol else {
        panic!("not a capture listener");
    };
    assert!(compiled.opaque_ports.contains(3306) && !compiled.opaque_ports.contains(8080));
    assert!(matches!(
        &config.listeners[0].tls,
        ListenerTls::Mesh {
            permissive: false,
            ..
        }
    ));
}

#[test]
fn permissive_and_tcp_only_shapes_map_onto_mode_and_opaque_ports() {
    let mut l = virtual_inbound();
    // Plaintext twins of every chain: permissive.
    let plain: Vec<listener::FilterChain> = l
        .filter_chains
        .iter()
        .map(|c| {
            let mut c = c.clone();
            c.transport_socket = None;
            let m = c.filter_chain_match.as_mut().unwrap();
            m.transport_protocol = "raw_buffer".into();
            m.application_protocols.clear();
            c
        })
        .collect();
    l.filter_chains.extend(plain);
    let file = listener_parts(&l, Some(&sds()), &|_| None).unwrap().file;
    assert_eq!(file.mtls.unwrap().mode, MtlsMode::Permissive);

    // Every chain TCP: every port opaque; no TLS: no mTLS.
    let mut l = virtual_inbound();
    l.filter_chains = vec![chain(None, false, PASSTHROUGH)];
    l.filter_chains[0].transport_socket = None;
    l.filter_chains[0].filter_chain_match = None;
    let file = listener_parts(&l, None, &|_| None).unwrap().file;
    assert!(file.mtls.is_none());
    assert_eq!(
        file.capture.unwrap().opaque_ports,
        [PortRange {
            first: 1,
            last: 65535
        }]
    );
}

type Change = fn(&mut listener::Listener);

#[test]
fn unsupported_inbound_shapes_are_refused_naming_the_field() {
    let cases: [(Change, &str); 11] = [
        (
            |l| {
                l.listener_filters.remove(0);
            },
            "listener_filters: a listener with listener filters is an inbound capture listener",
        ),
        (
            |l| {
                l.listener_filters
                    .push(listener_filter("proxy_protocol", "ProxyProtocol"))
            },
            "listener_filters[3]: listener filter envoy.filters.listener.proxy_protocol",
        ),
        (
            |l| l.traffic_direction = 2,
            "traffic_direction: must be INBOUND",
        ),
        (
            |l| l.continue_on_listener_filters_timeout = false,
            "continue_on_listener_filters_timeout: must be true",
        ),
        (
            |l| {
                let m = l.filter_chains[0].filter_chain_match.as_mut().unwrap();
                m.server_names = vec!["web.test".into()];
            },
            "filter_chains[0].filter_chain_match.server_names: not supported",
        ),
        (
            |l| {
                l.filter_chains.truncate(2);
            },
            "filter_chains: needs a chain without destination_port",
        ),
        (
            |l| l.filter_chains[1].transport_socket = None,
            "filter_chains[1] (TLS passed through to the app",
        ),
        (
            |l| l.filter_chains[1].transport_socket = Some(mtls("spiffe://cluster.local/ns/x/sa/y")),
            "filter_chains[1].transport_socket: allows other SPIFFE IDs than filter_chains[0]",
        ),
        (
            |l| {
                l.filter_chains.remove(2);
            },
            "filter_chains: other ports TCP only while some port has HTTP",
        ),
        (
            |l| {
                let c = &mut l.filter_chains[1];
                c.transport_socket = None;
                let m = c.filter_chain_match.as_mut().unwrap();
                m.transport_protocol = "raw_buffer".into();
                m.application_protocols.clear();
            },
            "filter_chains: ports with different mTLS modes",
        ),
        (
            |l| {
                // A route that only takes part of the paths: Envoy would
                // answer 404 to the rest, Postern hands everything over.
                l.filter_chains[0] = chain_with_route(Some(8080), |r| {
                    r.r#match = Some(route::RouteMatch {
                        path_specifier: Some(route::route_match::PathSpecifier::Prefix(
                            "/api".into(),
                        )),
                        ..Default::default()
                    })
                });
            },
            "filter_chains[0].filters[0].route_config.virtual_hosts[0].routes[0] (an inbound route sends every request",
        ),
    ];
    for (i, (change, expected)) in cases.into_iter().enumerate() {
        let mut l = virtual_inbound();
        change(&mut l);
        let problems = problems_of(&l);
        assert!(
            problems.iter().any(|p| p.starts_with(expected)),
            "case {i}: {problems:?}"
        );
    }
}

#[test]
fn original_dst_clusters_pass_through_and_refuse_other_targets() {
    use cluster::cluster::{ClusterDiscoveryType, DiscoveryType, LbConfig, LbPolicy};
    let passthrough = cluster::Cluster {
        name: PASSTHROUGH.into(),
        cluster_discovery_type: Some(ClusterDiscoveryType::Type(
            DiscoveryType::OriginalDst as i32,
        )),
        lb_policy: LbPolicy::ClusterProvided as i32,
        // Istio's: the source address its own capture rules spare.
        upstream_bind_config: Some(core::BindConfig {
            source_address: Some(core::SocketAddress {
                address: "127.0.0.6".into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let (file, source) = super::super::xds::cluster(&passthrough, None).unwrap();
    assert_eq!(source, EndpointSource::OriginalDst);
    assert!(file.endpoints.is_empty());

    let mut round_robin = passthrough.clone();
    round_robin.lb_policy = LbPolicy::RoundRobin as i32;
    let mut by_header = passthrough.clone();
    by_header.lb_config = Some(LbConfig::OriginalDstLbConfig(
        cluster::cluster::OriginalDstLbConfig {
            use_http_header: true,
            ..Default::default()
        },
    ));
    let mut elsewhere = passthrough.clone();
    elsewhere
        .upstream_bind_config
        .as_mut()
        .unwrap()
        .source_address = Some(core::SocketAddress {
        address: "10.0.0.5".into(),
        ..Default::default()
    });
    for (c, field) in [
        (
            round_robin,
            "lb_policy: an ORIGINAL_DST cluster takes CLUSTER_PROVIDED",
        ),
        (
            by_header,
            "original_dst_lb_config.use_http_header: not supported",
        ),
        (
            elsewhere,
            "upstream_bind_config (only a loopback source_address)",
        ),
    ] {
        let problems = super::super::xds::cluster(&c, None).unwrap_err();
        assert!(problems[0].starts_with(field), "{problems:?}");
    }

    // Where a chain may send calls.
    let target = |port| AppTarget {
        field: "filter_chains[0].filters[0].cluster".into(),
        cluster: "inbound|8080||".into(),
        port,
    };
    let endpoint = |address: &str| EndpointFile {
        address: address.parse().unwrap(),
        weight: 1,
        priority: 0,
    };
    assert!(check_app_target(&target(None), true, &[]).is_ok());
    assert!(check_app_target(&target(Some(8080)), false, &[endpoint("127.0.0.1:8080")]).is_ok());
    assert!(check_app_target(&target(Some(8080)), false, &[endpoint("[::1]:8080")]).is_ok());
    for (port, endpoints) in [
        (Some(8080), vec![endpoint("10.1.0.7:8080")]),
        (Some(8080), vec![endpoint("127.0.0.1:9090")]),
        (Some(8080), vec![]),
        (None, vec![endpoint("127.0.0.1:8080")]),
    ] {
        let reason = check_app_target(&target(port), false, &endpoints).unwrap_err();
        assert!(
            reason.starts_with("filter_chains[0].filters[0].cluster: "),
            "{reason}"
        );
    }
}

#[test]
fn original_dst_clusters_are_refused_outside_capture_chains() {
    let original_dst = std::collections::BTreeSet::from([PASSTHROUGH]);
    let (tcp, _) = listener(
        &tcp_listener("db", socket("0.0.0.0", 5432), PASSTHROUGH),
        None,
    )
    .unwrap();
    let (mut http, _) = listener(&http_listener(Vec::new()), None).unwrap();
    http.virtual_hosts = route_configuration(&route::RouteConfiguration {
        name: "rc".into(),
        virtual_hosts: vec![route::VirtualHost {
            name: "all".into(),
            domains: vec!["*".into()],
            routes: vec![route_to("web"), route_to(PASSTHROUGH)],
            ..Default::default()
        }],
        ..Default::default()
    })
    .unwrap()
    .virtual_hosts;
    let inbound = listener_parts(&virtual_inbound(), Some(&sds()), &|_| None)
        .unwrap()
        .file;
    assert_eq!(
        original_dst_reference(std::slice::from_ref(&inbound), &original_dst),
        None
    );
    let reason = original_dst_reference(&[inbound.clone(), tcp], &original_dst).unwrap();
    assert!(
        reason.starts_with(
            "listener db: tcp.cluster: cluster \"InboundPassthroughClusterIpv4\" is ORIGINAL_DST"
        ),
        "{reason}"
    );
    let reason = original_dst_reference(&[inbound, http], &original_dst).unwrap();
    assert!(
        reason.starts_with("listener in: virtual_hosts[0].routes[1]: "),
        "{reason}"
    );
}

#[test]
fn an_rbac_override_on_an_inbound_route_is_refused_not_dropped() {
    let mut l = virtual_inbound();
    l.filter_chains[0] = chain_with_route(Some(8080), |r| {
        r.typed_per_filter_config.insert(
            "envoy.filters.http.rbac".into(),
            any(
                &postern_proto::envoy::extensions::filters::http::rbac::v3::RbacPerRoute {
                    rbac: None,
                },
            ),
        );
    });
    let problems = problems_of(&l);
    assert!(
        problems
            .iter()
            .any(|p| p.contains("routes[0] (an inbound route sends every request as it is")),
        "{problems:?}"
    );
}

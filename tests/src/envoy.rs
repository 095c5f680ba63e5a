//! Builders for Envoy v3 resources the mesh YAML does not express: static
//! clusters and inline-route listeners with TLS transport sockets that use
//! SDS secrets, and the secrets themselves.

use std::net::SocketAddr;

use postern_control::ads::pack;
use postern_proto::envoy::config::cluster::v3 as cluster;
use postern_proto::envoy::config::core::v3 as core;
use postern_proto::envoy::config::endpoint::v3 as endpoint;
use postern_proto::envoy::config::listener::v3 as listener;
use postern_proto::envoy::config::route::v3 as route;
use postern_proto::envoy::extensions::filters::http::router::v3::Router;
use postern_proto::envoy::extensions::filters::network::http_connection_manager::v3 as hcm;
use postern_proto::envoy::extensions::transport_sockets::tls::v3 as tls;
use postern_proto::envoy::r#type::matcher::v3 as matcher;
use postern_proto::google::protobuf::BoolValue;

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

/// A common TLS context with Istio's SDS names and, if given, the SPIFFE IDs
/// the peer may present.
fn common(peers: &[&str]) -> tls::CommonTlsContext {
    let default_validation_context = tls::CertificateValidationContext {
        match_typed_subject_alt_names: peers
            .iter()
            .map(|id| tls::SubjectAltNameMatcher {
                san_type: tls::subject_alt_name_matcher::SanType::Uri as i32,
                matcher: Some(matcher::StringMatcher {
                    match_pattern: Some(matcher::string_matcher::MatchPattern::Exact((*id).into())),
                    ignore_case: false,
                }),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    tls::CommonTlsContext {
        tls_certificate_sds_secret_configs: vec![sds("default")],
        validation_context_type: Some(
            tls::common_tls_context::ValidationContextType::CombinedValidationContext(
                tls::common_tls_context::CombinedCertificateValidationContext {
                    default_validation_context: Some(default_validation_context),
                    validation_context_sds_secret_config: Some(sds("ROOTCA")),
                    ..Default::default()
                },
            ),
        ),
        alpn_protocols: vec!["h2".into(), "http/1.1".into()],
        ..Default::default()
    }
}

fn transport_socket<M: prost::Name>(context: &M) -> Option<core::TransportSocket> {
    Some(core::TransportSocket {
        name: "envoy.transport_sockets.tls".into(),
        config_type: Some(core::transport_socket::ConfigType::TypedConfig(pack(
            context,
        ))),
    })
}

/// A listener transport socket with `context`.
pub fn downstream_tls(context: &tls::DownstreamTlsContext) -> core::TransportSocket {
    core::TransportSocket {
        name: "envoy.transport_sockets.tls".into(),
        config_type: Some(core::transport_socket::ConfigType::TypedConfig(pack(
            context,
        ))),
    }
}

/// An HTTP listener on `addr` whose every request goes to `cluster`; with
/// `peers`, it requires mTLS from one of those SPIFFE IDs.
pub fn http_listener(
    name: &str,
    addr: SocketAddr,
    cluster: &str,
    peers: Option<&[&str]>,
) -> listener::Listener {
    http_listener_with_filters(name, addr, cluster, peers, Vec::new())
}

/// Like [`http_listener`], with `filters` before the router.
pub fn http_listener_with_filters(
    name: &str,
    addr: SocketAddr,
    cluster: &str,
    peers: Option<&[&str]>,
    filters: Vec<hcm::HttpFilter>,
) -> listener::Listener {
    let routes = route::RouteConfiguration {
        name: format!("{name}-routes"),
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
    };
    let manager = hcm::HttpConnectionManager {
        stat_prefix: name.into(),
        route_specifier: Some(hcm::http_connection_manager::RouteSpecifier::RouteConfig(
            routes,
        )),
        http_filters: filters
            .into_iter()
            .chain([hcm::HttpFilter {
                name: "envoy.filters.http.router".into(),
                config_type: Some(hcm::http_filter::ConfigType::TypedConfig(pack(
                    &Router::default(),
                ))),
                ..Default::default()
            }])
            .collect(),
        ..Default::default()
    };
    let transport = peers.and_then(|peers| {
        transport_socket(&tls::DownstreamTlsContext {
            common_tls_context: Some(common(peers)),
            require_client_certificate: Some(BoolValue { value: true }),
            ..Default::default()
        })
    });
    listener::Listener {
        name: name.into(),
        address: address(addr),
        filter_chains: vec![listener::FilterChain {
            filters: vec![listener::Filter {
                name: "envoy.filters.network.http_connection_manager".into(),
                config_type: Some(listener::filter::ConfigType::TypedConfig(pack(&manager))),
            }],
            transport_socket: transport,
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// A listener on `addr` with one filter chain: a TCP proxy to `cluster`.
pub fn tcp_listener(name: &str, addr: SocketAddr, cluster: &str) -> listener::Listener {
    use postern_proto::envoy::extensions::filters::network::tcp_proxy::v3 as tcp_proxy;
    let proxy = tcp_proxy::TcpProxy {
        stat_prefix: name.into(),
        cluster_specifier: Some(tcp_proxy::tcp_proxy::ClusterSpecifier::Cluster(
            cluster.into(),
        )),
        ..Default::default()
    };
    listener::Listener {
        name: name.into(),
        address: address(addr),
        filter_chains: vec![listener::FilterChain {
            filters: vec![listener::Filter {
                name: "envoy.filters.network.tcp_proxy".into(),
                config_type: Some(listener::filter::ConfigType::TypedConfig(pack(&proxy))),
            }],
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// A STATIC cluster of one endpoint; with `peers`, mesh mTLS that requires
/// the server to be one of those SPIFFE IDs.
pub fn static_cluster(name: &str, addr: SocketAddr, peers: Option<&[&str]>) -> cluster::Cluster {
    cluster::Cluster {
        name: name.into(),
        cluster_discovery_type: Some(cluster::cluster::ClusterDiscoveryType::Type(
            cluster::cluster::DiscoveryType::Static as i32,
        )),
        load_assignment: Some(endpoint::ClusterLoadAssignment {
            cluster_name: name.into(),
            endpoints: vec![endpoint::LocalityLbEndpoints {
                lb_endpoints: vec![endpoint::LbEndpoint {
                    host_identifier: Some(endpoint::lb_endpoint::HostIdentifier::Endpoint(
                        endpoint::Endpoint {
                            address: address(addr),
                            ..Default::default()
                        },
                    )),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        }),
        transport_socket: peers.and_then(|peers| {
            transport_socket(&tls::UpstreamTlsContext {
                common_tls_context: Some(common(peers)),
                sni: "outbound.mesh".into(),
                ..Default::default()
            })
        }),
        ..Default::default()
    }
}

fn inline(pem: &str) -> Option<core::DataSource> {
    Some(core::DataSource {
        specifier: Some(core::data_source::Specifier::InlineString(pem.into())),
        ..Default::default()
    })
}

/// The workload certificate secret (Istio's name: `default`).
pub fn certificate_secret(chain_pem: &str, key_pem: &str) -> tls::Secret {
    tls::Secret {
        name: "default".into(),
        r#type: Some(tls::secret::Type::TlsCertificate(tls::TlsCertificate {
            certificate_chain: inline(chain_pem),
            private_key: inline(key_pem),
            ..Default::default()
        })),
    }
}

/// The trust bundle secret (Istio's name: `ROOTCA`).
pub fn root_secret(roots_pem: &str) -> tls::Secret {
    tls::Secret {
        name: "ROOTCA".into(),
        r#type: Some(tls::secret::Type::ValidationContext(
            tls::CertificateValidationContext {
                trusted_ca: inline(roots_pem),
                ..Default::default()
            },
        )),
    }
}

/// An `envoy.filters.http.rbac` filter with `rules`.
pub fn rbac_filter(rules: postern_proto::envoy::config::rbac::v3::Rbac) -> hcm::HttpFilter {
    let config = postern_proto::envoy::extensions::filters::http::rbac::v3::Rbac {
        rules: Some(rules),
        ..Default::default()
    };
    hcm::HttpFilter {
        name: "envoy.filters.http.rbac".into(),
        config_type: Some(hcm::http_filter::ConfigType::TypedConfig(pack(&config))),
        ..Default::default()
    }
}

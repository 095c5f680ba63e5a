//! Translation of Envoy resources: what maps to what, and what is refused
//! with the field named.

use postern_proto::envoy::config::cluster::v3 as cluster;
use postern_proto::envoy::config::core::v3 as core;
use postern_proto::envoy::config::endpoint::v3 as endpoint;
use postern_proto::envoy::config::listener::v3 as listener;
use postern_proto::envoy::config::route::v3 as route;
use postern_proto::envoy::extensions::filters::network::http_connection_manager::v3 as hcm;
use postern_proto::envoy::extensions::filters::network::tcp_proxy::v3 as tcp_proxy;
use postern_proto::envoy::r#type::matcher::v3 as matcher;
use postern_proto::google::protobuf::{Any, UInt32Value};
use prost::Message;

use super::xds::*;
use crate::config::file::*;

pub(super) fn any<M: Message + prost::Name>(message: &M) -> Any {
    Any {
        type_url: M::type_url(),
        value: message.encode_to_vec(),
    }
}

fn socket(address: &str, port: u32) -> Option<core::Address> {
    Some(core::Address {
        address: Some(core::address::Address::SocketAddress(core::SocketAddress {
            address: address.into(),
            port_specifier: Some(core::socket_address::PortSpecifier::PortValue(port)),
            ..Default::default()
        })),
    })
}

fn string_match(pattern: matcher::string_matcher::MatchPattern) -> route::HeaderMatcher {
    route::HeaderMatcher {
        name: "x-user".into(),
        header_match_specifier: Some(route::header_matcher::HeaderMatchSpecifier::StringMatch(
            matcher::StringMatcher {
                match_pattern: Some(pattern),
                ignore_case: false,
            },
        )),
        ..Default::default()
    }
}

pub(super) fn route_to(cluster: &str) -> route::Route {
    route::Route {
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
    }
}

pub(super) fn config_of(routes: Vec<route::Route>) -> route::RouteConfiguration {
    route::RouteConfiguration {
        name: "rc".into(),
        virtual_hosts: vec![route::VirtualHost {
            name: "vh".into(),
            domains: vec!["*".into()],
            routes,
            ..Default::default()
        }],
        ..Default::default()
    }
}

#[test]
fn routes_map_matchers_actions_and_retries() {
    let mut matched = route_to("api");
    if let Some(m) = matched.r#match.as_mut() {
        m.headers = vec![
            string_match(matcher::string_matcher::MatchPattern::Prefix("adm".into())),
            route::HeaderMatcher {
                name: ":method".into(),
                header_match_specifier: Some(
                    route::header_matcher::HeaderMatchSpecifier::StringMatch(
                        matcher::StringMatcher {
                            match_pattern: Some(matcher::string_matcher::MatchPattern::Exact(
                                "POST".into(),
                            )),
                            ignore_case: false,
                        },
                    ),
                ),
                ..Default::default()
            },
        ];
    }
    if let Some(route::route::Action::Route(action)) = matched.action.as_mut() {
        action.cluster_specifier = Some(route::route_action::ClusterSpecifier::WeightedClusters(
            route::WeightedCluster {
                clusters: vec![
                    route::weighted_cluster::ClusterWeight {
                        name: "v1".into(),
                        weight: Some(UInt32Value { value: 90 }),
                        ..Default::default()
                    },
                    route::weighted_cluster::ClusterWeight {
                        name: "v2".into(),
                        weight: Some(UInt32Value { value: 10 }),
                        ..Default::default()
                    },
                ],
                ..Default::default()
            },
        ));
        action.retry_policy = Some(route::RetryPolicy {
            retry_on: "gateway-error,connect-failure,unavailable".into(),
            num_retries: Some(UInt32Value { value: 3 }),
            ..Default::default()
        });
        action.prefix_rewrite = "/v2/".into();
    }
    let direct = route::Route {
        r#match: Some(route::RouteMatch {
            path_specifier: Some(route::route_match::PathSpecifier::Path("/ping".into())),
            ..Default::default()
        }),
        action: Some(route::route::Action::DirectResponse(
            route::DirectResponseAction {
                status: 200,
                body: Some(core::DataSource {
                    specifier: Some(core::data_source::Specifier::InlineString("pong".into())),
                    ..Default::default()
                }),
                ..Default::default()
            },
        )),
        ..Default::default()
    };
    let hosts = route_configuration(&config_of(vec![matched, direct])).unwrap();
    let routes = &hosts.virtual_hosts[0].routes;
    let m = &routes[0].matcher;
    assert_eq!(m.methods, ["POST"]);
    assert_eq!(m.headers[0].regex.as_deref(), Some("adm.*"));
    let weighted = routes[0].weighted_clusters.as_ref().unwrap();
    assert_eq!(
        (weighted[0].cluster.as_str(), weighted[0].weight),
        ("v1", 90)
    );
    let retry = routes[0].retry.as_ref().unwrap();
    assert_eq!(retry.max_attempts, 4);
    assert!(retry.on.contains(&RetryOn::ConnectFailure));
    assert_eq!(retry.retriable_status_codes, [502, 503, 504]);
    assert_eq!(
        routes[0].rewrite.as_ref().unwrap().prefix.as_deref(),
        Some("/v2/")
    );
    let direct = routes[1].direct_response.as_ref().unwrap();
    assert_eq!((direct.status, direct.body.as_str()), (200, "pong"));
}

#[test]
fn behaviour_changing_route_fields_are_refused_by_name() {
    let mut with_headers = route_to("api");
    with_headers.request_headers_to_add = vec![Default::default()];
    let mut config = config_of(vec![with_headers]);
    config.virtual_hosts[0].require_tls = 1;
    let problems = route_configuration(&config).unwrap_err();
    assert!(
        problems
            .iter()
            .any(|p| p.starts_with("virtual_hosts[0].require_tls")),
        "{problems:?}"
    );
    assert!(
        problems.iter().any(
            |p| p == "virtual_hosts[0].routes[0].request_headers_to_add[0].header: is required"
        ),
        "{problems:?}"
    );
}

// `http2_protocol_options` is deprecated but still sent by control planes.
#[allow(deprecated)]
#[test]
fn clusters_map_discovery_balancing_limits_and_http2() {
    let eds = cluster::Cluster {
        name: "api".into(),
        cluster_discovery_type: Some(cluster::cluster::ClusterDiscoveryType::Type(
            cluster::cluster::DiscoveryType::Eds as i32,
        )),
        eds_cluster_config: Some(cluster::cluster::EdsClusterConfig {
            service_name: "api.shop".into(),
            ..Default::default()
        }),
        lb_policy: cluster::cluster::LbPolicy::LeastRequest as i32,
        circuit_breakers: Some(cluster::CircuitBreakers {
            thresholds: vec![cluster::circuit_breakers::Thresholds {
                max_connections: Some(UInt32Value { value: 7 }),
                ..Default::default()
            }],
            ..Default::default()
        }),
        http2_protocol_options: Some(Default::default()),
        ..Default::default()
    };
    let (file, source) = super::xds::cluster(&eds, None).unwrap();
    assert_eq!(source, EndpointSource::Eds("api.shop".into()));
    assert_eq!(file.lb, LbPolicy::LeastRequest);
    assert_eq!(file.circuit_breaker.max_connections, 7);
    assert_eq!(file.protocol, UpstreamProtocol::Http2);

    let maglev = cluster::Cluster {
        lb_policy: cluster::cluster::LbPolicy::Maglev as i32,
        ..eds
    };
    let problems = super::xds::cluster(&maglev, None).unwrap_err();
    assert!(problems[0].starts_with("lb_policy"), "{problems:?}");
}

#[test]
fn load_assignments_keep_healthy_endpoints_with_their_priorities() {
    let lb = |port: u32, health: core::HealthStatus, weight: u32| endpoint::LbEndpoint {
        host_identifier: Some(endpoint::lb_endpoint::HostIdentifier::Endpoint(
            endpoint::Endpoint {
                address: socket("127.0.0.1", port),
                ..Default::default()
            },
        )),
        health_status: health as i32,
        load_balancing_weight: Some(UInt32Value { value: weight }),
        ..Default::default()
    };
    let cla = endpoint::ClusterLoadAssignment {
        cluster_name: "api".into(),
        endpoints: vec![
            endpoint::LocalityLbEndpoints {
                lb_endpoints: vec![
                    lb(9001, core::HealthStatus::Healthy, 3),
                    lb(9002, core::HealthStatus::Unhealthy, 1),
                    lb(9003, core::HealthStatus::Draining, 1),
                ],
                priority: 0,
                ..Default::default()
            },
            endpoint::LocalityLbEndpoints {
                lb_endpoints: vec![lb(9009, core::HealthStatus::Healthy, 1)],
                priority: 1,
                ..Default::default()
            },
        ],
        ..Default::default()
    };
    let endpoints = load_assignment(&cla).unwrap();
    let got: Vec<(u16, u32, u32)> = endpoints
        .iter()
        .map(|e| (e.address.port(), e.weight, e.priority))
        .collect();
    assert_eq!(got, [(9001, 3, 0), (9009, 1, 1)]);
}

pub(super) fn http_listener(filters: Vec<hcm::HttpFilter>) -> listener::Listener {
    let manager = hcm::HttpConnectionManager {
        stat_prefix: "in".into(),
        route_specifier: Some(hcm::http_connection_manager::RouteSpecifier::Rds(
            hcm::Rds {
                route_config_name: "rc".into(),
                ..Default::default()
            },
        )),
        http_filters: filters,
        ..Default::default()
    };
    listener::Listener {
        name: "in".into(),
        address: socket("127.0.0.1", 15006),
        filter_chains: vec![listener::FilterChain {
            filters: vec![listener::Filter {
                name: "envoy.filters.network.http_connection_manager".into(),
                config_type: Some(listener::filter::ConfigType::TypedConfig(any(&manager))),
            }],
            ..Default::default()
        }],
        ..Default::default()
    }
}

fn http_filter(name: &str, type_url: &str, optional: bool) -> hcm::HttpFilter {
    hcm::HttpFilter {
        name: name.into(),
        config_type: Some(hcm::http_filter::ConfigType::TypedConfig(Any {
            type_url: type_url.into(),
            value: Vec::new(),
        })),
        is_optional: optional,
        ..Default::default()
    }
}

#[test]
fn listeners_take_the_router_skip_optional_filters_and_refuse_the_rest() {
    let router = http_filter(
        "envoy.filters.http.router",
        "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router",
        false,
    );
    let optional = http_filter("x.optional", "type.googleapis.com/x.Optional", true);
    let (file, source) = listener(&http_listener(vec![optional, router.clone()]), None).unwrap();
    assert_eq!(file.kind, ListenerKind::Http);
    assert_eq!(file.address.port(), 15006);
    assert_eq!(source, RouteSource::Rds("rc".into()));

    let unknown = http_filter(
        "envoy.filters.http.fault",
        "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault",
        false,
    );
    let problems = listener(&http_listener(vec![unknown, router]), None).unwrap_err();
    assert!(
        problems[0].contains("http_filters[0]") && problems[0].contains("envoy.filters.http.fault"),
        "{problems:?}"
    );

    let mut named = http_listener(Vec::new());
    named.address = socket("db.internal", 5432);
    let problems = listener(&named, None).unwrap_err();
    assert!(problems[0].starts_with("address.address"), "{problems:?}");
}

#[test]
fn tcp_proxy_listeners_name_their_cluster() {
    let proxy = tcp_proxy::TcpProxy {
        stat_prefix: "db".into(),
        cluster_specifier: Some(tcp_proxy::tcp_proxy::ClusterSpecifier::Cluster("db".into())),
        ..Default::default()
    };
    let l = listener::Listener {
        name: "db".into(),
        address: socket("127.0.0.1", 15432),
        filter_chains: vec![listener::FilterChain {
            filters: vec![listener::Filter {
                name: "envoy.filters.network.tcp_proxy".into(),
                config_type: Some(listener::filter::ConfigType::TypedConfig(any(&proxy))),
            }],
            ..Default::default()
        }],
        ..Default::default()
    };
    let (file, source) = listener(&l, None).unwrap();
    assert_eq!(file.kind, ListenerKind::Tcp);
    assert_eq!(file.tcp.unwrap().cluster, "db");
    assert_eq!(source, RouteSource::None);

    let mut two = l;
    two.filter_chains.push(Default::default());
    let problems = listener(&two, None).unwrap_err();
    assert!(problems[0].starts_with("filter_chains"), "{problems:?}");
}

#[test]
fn local_rate_limit_filter_maps_enabled_enforced_and_bucket() {
    use postern_proto::envoy::extensions::filters::http::local_ratelimit::v3::LocalRateLimit;
    use postern_proto::envoy::r#type::v3::{FractionalPercent, TokenBucket};
    let percent = |n: u32| core::RuntimeFractionalPercent {
        default_value: Some(FractionalPercent {
            numerator: n,
            denominator: 0,
        }),
        ..Default::default()
    };
    let config = |enabled: Option<u32>, enforced: Option<u32>| LocalRateLimit {
        stat_prefix: "rl".into(),
        token_bucket: Some(TokenBucket {
            max_tokens: 7,
            tokens_per_fill: Some(UInt32Value { value: 2 }),
            fill_interval: Some(postern_proto::google::protobuf::Duration {
                seconds: 1,
                nanos: 0,
            }),
        }),
        filter_enabled: enabled.map(percent),
        filter_enforced: enforced.map(percent),
        ..Default::default()
    };
    let translate = |c: LocalRateLimit| {
        listener(
            &http_listener(vec![hcm::HttpFilter {
                name: "envoy.filters.http.local_ratelimit".into(),
                config_type: Some(hcm::http_filter::ConfigType::TypedConfig(any(&c))),
                ..Default::default()
            }]),
            None,
        )
    };
    let (file, _) = translate(config(Some(100), Some(100))).unwrap();
    let limit = file.http.local_rate_limit.unwrap();
    assert_eq!(
        (limit.max_tokens, limit.tokens_per_fill, limit.shadow),
        (7, Some(2), false)
    );
    let (file, _) = translate(config(Some(100), None)).unwrap();
    assert!(file.http.local_rate_limit.unwrap().shadow);
    let (file, _) = translate(config(None, None)).unwrap();
    assert!(
        file.http.local_rate_limit.is_none(),
        "not enabled: Envoy's default"
    );
    let problems = translate(config(Some(50), Some(100))).unwrap_err();
    assert!(problems[0].contains("filter_enabled"), "{problems:?}");
}

#[test]
fn per_route_local_rate_limit_config_limits_that_route() {
    use postern_proto::envoy::extensions::filters::http::local_ratelimit::v3::LocalRateLimit;
    use postern_proto::envoy::r#type::v3::{FractionalPercent, TokenBucket};
    let all = || core::RuntimeFractionalPercent {
        default_value: Some(FractionalPercent {
            numerator: 100,
            denominator: 0,
        }),
        ..Default::default()
    };
    let limit = LocalRateLimit {
        stat_prefix: "route".into(),
        token_bucket: Some(TokenBucket {
            max_tokens: 1,
            tokens_per_fill: None,
            fill_interval: Some(postern_proto::google::protobuf::Duration {
                seconds: 10,
                nanos: 0,
            }),
        }),
        filter_enabled: Some(all()),
        filter_enforced: Some(all()),
        ..Default::default()
    };
    let mut limited = route_to("api");
    limited
        .typed_per_filter_config
        .insert("envoy.filters.http.local_ratelimit".into(), any(&limit));
    let hosts = route_configuration(&config_of(vec![limited, route_to("api")])).unwrap();
    let routes = &hosts.virtual_hosts[0].routes;
    let bucket = routes[0].local_rate_limit.as_ref().expect("route limit");
    assert_eq!(
        (bucket.max_tokens, bucket.tokens_per_fill, bucket.shadow),
        (1, Some(1), false)
    );
    assert_eq!(bucket.fill_interval, std::time::Duration::from_secs(10));
    assert!(routes[1].local_rate_limit.is_none());

    // Any other per-route filter config is refused by name.
    let mut other = route_to("api");
    other.typed_per_filter_config.insert(
        "envoy.filters.http.cors".into(),
        Any {
            type_url: "type.googleapis.com/envoy.extensions.filters.http.cors.v3.CorsPolicy".into(),
            value: Vec::new(),
        },
    );
    let problems = route_configuration(&config_of(vec![other])).unwrap_err();
    assert!(
        problems[0].starts_with(
            "virtual_hosts[0].routes[0].typed_per_filter_config[envoy.filters.http.cors]"
        ),
        "{problems:?}"
    );
}

pub(super) fn tcp_listener(
    name: &str,
    address: Option<core::Address>,
    cluster: &str,
) -> listener::Listener {
    let proxy = tcp_proxy::TcpProxy {
        stat_prefix: name.into(),
        cluster_specifier: Some(tcp_proxy::tcp_proxy::ClusterSpecifier::Cluster(
            cluster.into(),
        )),
        ..Default::default()
    };
    listener::Listener {
        name: name.into(),
        address,
        filter_chains: vec![listener::FilterChain {
            filters: vec![listener::Filter {
                name: "envoy.filters.network.tcp_proxy".into(),
                config_type: Some(listener::filter::ConfigType::TypedConfig(any(&proxy))),
            }],
            ..Default::default()
        }],
        ..Default::default()
    }
}

#[test]
fn use_original_dst_listeners_become_outbound_capture_listeners() {
    use crate::config::capture::UnknownDestinations;
    use postern_proto::google::protobuf::BoolValue;
    let outbound = |cluster: &str| {
        let mut l = tcp_listener("virtualOutbound", socket("0.0.0.0", 15001), cluster);
        l.use_original_dst = Some(BoolValue { value: true });
        l.traffic_direction = 2;
        l
    };
    for (cluster, unknown) in [
        ("PassthroughCluster", UnknownDestinations::Allow),
        ("BlackHoleCluster", UnknownDestinations::Block),
    ] {
        let (file, source) = listener(&outbound(cluster), None).unwrap();
        assert_eq!(file.kind, ListenerKind::Capture);
        assert!(file.tcp.is_none());
        assert_eq!(file.capture.unwrap().unknown_destinations, unknown);
        assert_eq!(source, RouteSource::None);
    }
    let problems = listener(&outbound("reviews"), None).unwrap_err();
    assert!(
        problems[0].contains("PassthroughCluster or BlackHoleCluster"),
        "{problems:?}"
    );
    let mut inbound = outbound("PassthroughCluster");
    inbound.traffic_direction = 1;
    let problems = listener(&inbound, None).unwrap_err();
    assert!(problems[0].starts_with("use_original_dst"), "{problems:?}");
    let mut http = http_listener(Vec::new());
    http.use_original_dst = Some(BoolValue { value: true });
    http.traffic_direction = 2;
    let problems = listener(&http, None).unwrap_err();
    assert!(problems[0].contains("tcp_proxy"), "{problems:?}");
}

#[test]
fn listeners_that_bind_no_port_become_services_of_the_capture_listener() {
    use crate::config::capture::ServiceProtocol;
    use crate::config::{Config, ListenerProtocol};
    use postern_proto::google::protobuf::BoolValue;
    let mut capture = tcp_listener(
        "virtualOutbound",
        socket("0.0.0.0", 15001),
        "PassthroughCluster",
    );
    capture.use_original_dst = Some(BoolValue { value: true });
    capture.traffic_direction = 2;
    let mut db = tcp_listener("10.96.0.30_5432", socket("10.96.0.30", 5432), "db");
    db.bind_to_port = Some(BoolValue { value: false });
    let mut web = http_listener(Vec::new());
    web.address = socket("0.0.0.0", 9080);
    web.bind_to_port = Some(BoolValue { value: false });
    assert!(binds_to_port(&capture) && !binds_to_port(&db) && !binds_to_port(&web));

    let (mut capture, _) = listener(&capture, None).unwrap();
    let (db, _) = listener(&db, None).unwrap();
    let (mut web, source) = listener(&web, None).unwrap();
    assert_eq!(source, RouteSource::Rds("rc".into()));
    web.virtual_hosts = route_configuration(&route::RouteConfiguration {
        name: "rc".into(),
        virtual_hosts: vec![route::VirtualHost {
            name: "all".into(),
            domains: vec!["*".into()],
            routes: vec![route_to("reviews")],
            ..Default::default()
        }],
        ..Default::default()
    })
    .unwrap()
    .virtual_hosts;
    attach_virtual_listeners(std::slice::from_mut(&mut capture), &[db, web]);
    let services = &capture.capture.as_ref().unwrap().services;
    assert_eq!(services.len(), 2);
    assert_eq!(services[0].cluster.as_deref(), Some("db"));
    assert_eq!(services[0].protocol, ServiceProtocol::Opaque);
    assert_eq!(services[1].virtual_hosts.len(), 1);
    assert_eq!(services[1].protocol, ServiceProtocol::Auto);

    let mut file: ConfigFile = serde_yaml_ng::from_str("{}").unwrap();
    file.listeners.push(capture);
    let config = Config::from_dynamic_model(file).unwrap();
    let ListenerProtocol::Capture(compiled) = &config.listeners[0].protocol else {
        panic!("not a capture listener");
    };
    assert!(compiled
        .service("10.96.0.30:5432".parse().unwrap())
        .is_some());
    assert!(compiled
        .service("10.96.0.99:9080".parse().unwrap())
        .is_some());

    // A virtual listener's own mTLS or policies would be dropped: refused.
    let mut secured = http_listener(vec![http_filter(
        "envoy.filters.http.rbac",
        "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC",
        false,
    )]);
    secured.bind_to_port = Some(BoolValue { value: false });
    let problems = listener(&secured, None).unwrap_err();
    assert!(
        problems.iter().any(|p| p.contains("bind_to_port: false")),
        "{problems:?}"
    );
}

fn logged_listener(
    loggers: Vec<postern_proto::envoy::config::accesslog::v3::AccessLog>,
    sampling: Option<f64>,
) -> listener::Listener {
    let manager = hcm::HttpConnectionManager {
        stat_prefix: "in".into(),
        route_specifier: Some(hcm::http_connection_manager::RouteSpecifier::Rds(
            hcm::Rds {
                route_config_name: "rc".into(),
                ..Default::default()
            },
        )),
        access_log: loggers,
        tracing: sampling.map(|value| hcm::http_connection_manager::Tracing {
            random_sampling: Some(postern_proto::envoy::r#type::v3::Percent { value }),
            ..Default::default()
        }),
        ..Default::default()
    };
    listener::Listener {
        name: "in".into(),
        address: socket("127.0.0.1", 15006),
        traffic_direction: core::TrafficDirection::Inbound as i32,
        filter_chains: vec![listener::FilterChain {
            filters: vec![listener::Filter {
                name: "envoy.filters.network.http_connection_manager".into(),
                config_type: Some(listener::filter::ConfigType::TypedConfig(any(&manager))),
            }],
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// A gRPC service reached through `cluster`.
fn envoy_grpc(cluster: &str) -> core::GrpcService {
    core::GrpcService {
        target_specifier: Some(core::grpc_service::TargetSpecifier::EnvoyGrpc(
            core::grpc_service::EnvoyGrpc {
                cluster_name: cluster.into(),
                ..Default::default()
            },
        )),
        ..Default::default()
    }
}

fn grpc_logger(cluster: &str) -> postern_proto::envoy::config::accesslog::v3::AccessLog {
    use postern_proto::envoy::extensions::access_loggers::grpc::v3 as grpc;
    let config = grpc::HttpGrpcAccessLogConfig {
        common_config: Some(grpc::CommonGrpcAccessLogConfig {
            log_name: "mesh".into(),
            grpc_service: Some(envoy_grpc(cluster)),
            transport_api_version: core::ApiVersion::V3 as i32,
            ..Default::default()
        }),
        ..Default::default()
    };
    postern_proto::envoy::config::accesslog::v3::AccessLog {
        name: "envoy.access_loggers.http_grpc".into(),
        config_type: Some(
            postern_proto::envoy::config::accesslog::v3::access_log::ConfigType::TypedConfig(any(
                &config,
            )),
        ),
        ..Default::default()
    }
}

#[test]
fn grpc_access_logger_and_trace_sampling_map_onto_the_listener() {
    let resolve = |name: &str| (name == "als").then(|| "http://127.0.0.1:9901".to_string());
    let (file, _) = listener_with(
        &logged_listener(vec![grpc_logger("als")], Some(25.0)),
        None,
        &resolve,
    )
    .unwrap();
    let als = file.access_log_service.expect("access-log stream");
    assert_eq!(als.address, "http://127.0.0.1:9901");
    assert_eq!(als.log_name, "mesh");
    assert_eq!(file.tracing.map(|t| t.sampling), Some(0.25));
    assert_eq!(
        file.traffic_direction,
        Some(crate::telemetry::log::TrafficDirection::Inbound)
    );

    // A cluster the bootstrap does not know, and a filtered logger, are refused by name.
    let problems = listener_with(
        &logged_listener(vec![grpc_logger("nowhere")], None),
        None,
        &resolve,
    )
    .unwrap_err();
    assert!(
        problems.iter().any(|p| p.contains("access_log[0]")),
        "{problems:?}"
    );
    let mut filtered = grpc_logger("als");
    filtered.filter = Some(Default::default());
    let problems =
        listener_with(&logged_listener(vec![filtered], None), None, &resolve).unwrap_err();
    assert!(
        problems.iter().any(|p| p.contains("access_log[0].filter")),
        "{problems:?}"
    );
}

mod capacity;
mod edge;
mod ignored;
mod inbound;
mod jwt;
mod limits;
mod mutations;
mod per_chain;
mod policy;
mod upstream;

fn ratelimit_filter(
    config: &postern_proto::envoy::extensions::filters::http::ratelimit::v3::RateLimit,
) -> hcm::HttpFilter {
    hcm::HttpFilter {
        name: "envoy.filters.http.ratelimit".into(),
        config_type: Some(hcm::http_filter::ConfigType::TypedConfig(any(config))),
        ..Default::default()
    }
}

fn rls_config(
    cluster: &str,
) -> postern_proto::envoy::extensions::filters::http::ratelimit::v3::RateLimit {
    use postern_proto::envoy::config::ratelimit::v3::RateLimitServiceConfig;
    postern_proto::envoy::extensions::filters::http::ratelimit::v3::RateLimit {
        domain: "edge".into(),
        stage: 2,
        timeout: Some(postern_proto::google::protobuf::Duration {
            seconds: 0,
            nanos: 150_000_000,
        }),
        failure_mode_deny: true,
        enable_x_ratelimit_headers: 1,
        rate_limit_service: Some(RateLimitServiceConfig {
            grpc_service: Some(envoy_grpc(cluster)),
            transport_api_version: core::ApiVersion::V3 as i32,
        }),
        ..Default::default()
    }
}

#[test]
fn ratelimit_filter_maps_service_domain_and_failure_mode() {
    let (file, _) = listener(
        &http_listener(vec![ratelimit_filter(&rls_config("rls"))]),
        None,
    )
    .unwrap();
    let service = file.http.rate_limit_service.expect("filter mapped");
    assert_eq!(service.domain, "edge");
    assert_eq!(service.cluster.as_deref(), Some("rls"));
    assert_eq!(service.timeout, std::time::Duration::from_millis(150));
    assert_eq!(service.stage, 2);
    assert!(service.failure_mode_deny && service.enable_x_ratelimit_headers);

    // Fields that would change behaviour are refused by name.
    let mut bad = rls_config("rls");
    bad.request_type = "internal".into();
    bad.rate_limited_status = Some(postern_proto::envoy::r#type::v3::HttpStatus { code: 503 });
    bad.rate_limits = vec![route::RateLimit::default()];
    let problems = listener(&http_listener(vec![ratelimit_filter(&bad)]), None).unwrap_err();
    let text = problems.join("\n");
    for field in [
        "request_type",
        "rate_limited_status",
        "typed_config.rate_limits",
    ] {
        assert!(text.contains(field), "{field} in {text}");
    }
    let mut no_service = rls_config("rls");
    no_service.rate_limit_service = None;
    no_service.domain.clear();
    let problems = listener(&http_listener(vec![ratelimit_filter(&no_service)]), None).unwrap_err();
    let text = problems.join("\n");
    assert!(text.contains("typed_config.domain: is required"), "{text}");
    assert!(
        text.contains("typed_config.rate_limit_service: is required"),
        "{text}"
    );
}

#[test]
fn route_and_virtual_host_rate_limits_map_actions() {
    use route::rate_limit::action::{self, ActionSpecifier as A};
    use route::rate_limit::Action;
    let act = |a: A| Action {
        action_specifier: Some(a),
    };
    let limits = vec![route::RateLimit {
        stage: Some(UInt32Value { value: 1 }),
        actions: vec![
            act(A::RequestHeaders(action::RequestHeaders {
                header_name: "x-user".into(),
                descriptor_key: "user".into(),
                skip_if_absent: true,
            })),
            act(A::RemoteAddress(action::RemoteAddress {})),
            act(A::GenericKey(action::GenericKey {
                descriptor_value: "api".into(),
                ..Default::default()
            })),
            act(A::HeaderValueMatch(action::HeaderValueMatch {
                descriptor_value: "admin".into(),
                expect_match: Some(postern_proto::google::protobuf::BoolValue { value: false }),
                headers: vec![string_match(matcher::string_matcher::MatchPattern::Exact(
                    "root".into(),
                ))],
                ..Default::default()
            })),
            act(A::DestinationCluster(action::DestinationCluster {})),
            act(A::SourceCluster(action::SourceCluster {})),
        ],
        ..Default::default()
    }];
    let mut limited = route_to("api");
    if let Some(route::route::Action::Route(a)) = &mut limited.action {
        a.rate_limits = limits.clone();
        #[allow(deprecated)]
        {
            a.include_vh_rate_limits =
                Some(postern_proto::google::protobuf::BoolValue { value: true });
        }
    }
    let mut config = config_of(vec![limited]);
    config.virtual_hosts[0].rate_limits = vec![route::RateLimit {
        actions: vec![act(A::RemoteAddress(action::RemoteAddress {}))],
        ..Default::default()
    }];
    let hosts = route_configuration(&config).unwrap().virtual_hosts;
    assert_eq!(hosts[0].rate_limits.len(), 1);
    let route = &hosts[0].routes[0];
    assert!(route.include_vh_rate_limits);
    let policy = &route.rate_limits[0];
    assert_eq!(policy.stage, 1);
    let a = &policy.actions;
    let header = a[0].request_headers.as_ref().unwrap();
    assert_eq!(
        (
            header.header_name.as_str(),
            header.descriptor_key.as_str(),
            header.skip_if_absent
        ),
        ("x-user", "user", true)
    );
    assert!(a[1].remote_address.is_some());
    assert_eq!(a[2].generic_key.as_ref().unwrap().descriptor_key, None);
    let m = a[3].header_value_match.as_ref().unwrap();
    assert!(!m.expect_match);
    assert_eq!(m.headers[0].exact.as_deref(), Some("root"));
    assert!(a[4].destination_cluster.is_some() && a[5].source_cluster.is_some());

    // Unsupported actions and options are NACKed by name.
    let mut bad = route_to("api");
    if let Some(route::route::Action::Route(a)) = &mut bad.action {
        a.rate_limits = vec![route::RateLimit {
            disable_key: "off".into(),
            actions: vec![act(A::QueryParameters(action::QueryParameters::default()))],
            ..Default::default()
        }];
    }
    let problems = route_configuration(&config_of(vec![bad])).unwrap_err();
    let text = problems.join("\n");
    assert!(
        text.contains("routes[0].route.rate_limits[0].disable_key"),
        "{text}"
    );
    assert!(
        text.contains("routes[0].route.rate_limits[0].actions[0].query_parameters"),
        "{text}"
    );
}

#[test]
fn network_rbac_before_a_tcp_proxy_is_the_listeners_rbac() {
    use postern_proto::envoy::config::rbac::v3 as rbac;
    use postern_proto::envoy::extensions::filters::network::rbac::v3::Rbac as NetworkRbac;
    let rules = rbac::Rbac {
        action: rbac::rbac::Action::Deny as i32,
        policies: [(
            "no-one".to_string(),
            rbac::Policy {
                permissions: vec![rbac::Permission {
                    rule: Some(rbac::permission::Rule::Any(true)),
                }],
                principals: vec![rbac::Principal {
                    identifier: Some(rbac::principal::Identifier::Any(true)),
                }],
                ..Default::default()
            },
        )]
        .into_iter()
        .collect(),
        ..Default::default()
    };
    let filter = |config: &NetworkRbac| listener::Filter {
        name: "envoy.filters.network.rbac".into(),
        config_type: Some(listener::filter::ConfigType::TypedConfig(any(config))),
    };
    let config = NetworkRbac {
        stat_prefix: "db".into(),
        rules: Some(rules.clone()),
        ..Default::default()
    };
    let mut l = tcp_listener("db", socket("127.0.0.1", 0), "db");
    l.filter_chains[0].filters.insert(0, filter(&config));
    let (file, _) = listener(&l, None).unwrap();
    let tcp = file.tcp.expect("tcp listener");
    let mapped = tcp.rbac.expect("rbac mapped").rules.expect("rules");
    assert_eq!(mapped.policies.len(), 1);
    assert_eq!(mapped.policies[0].name, "no-one");

    // delay_deny would change behaviour; network RBAC before an HTTP
    // connection manager is not taken either.
    let mut delayed = config.clone();
    delayed.delay_deny = Some(postern_proto::google::protobuf::Duration {
        seconds: 1,
        nanos: 0,
    });
    let mut l = tcp_listener("db", socket("127.0.0.1", 0), "db");
    l.filter_chains[0].filters.insert(0, filter(&delayed));
    let problems = listener(&l, None).unwrap_err();
    assert!(
        problems[0].contains("filter_chains[0].filters[0].typed_config.delay_deny"),
        "{problems:?}"
    );
    let mut http = http_listener(Vec::new());
    http.filter_chains[0].filters.insert(0, filter(&config));
    let problems = listener(&http, None).unwrap_err();
    assert!(
        problems[0].contains("only before a tcp_proxy"),
        "{problems:?}"
    );
}

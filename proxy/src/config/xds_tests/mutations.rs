//! Header mutations at every route-table level, and DNS clusters.

use postern_proto::google::protobuf::{BoolValue, Duration as PbDuration};

use super::*;

fn option(key: &str, value: &str, action: i32) -> core::HeaderValueOption {
    core::HeaderValueOption {
        header: Some(core::HeaderValue {
            key: key.into(),
            value: value.into(),
            ..Default::default()
        }),
        append_action: action,
        ..Default::default()
    }
}

const OVERWRITE: i32 = core::header_value_option::HeaderAppendAction::OverwriteIfExistsOrAdd as i32;
const ADD_IF_ABSENT: i32 = core::header_value_option::HeaderAppendAction::AddIfAbsent as i32;

#[test]
fn header_mutations_translate_at_every_level() {
    let mut weighted = route_to("unused");
    if let Some(route::route::Action::Route(action)) = weighted.action.as_mut() {
        action.cluster_specifier = Some(route::route_action::ClusterSpecifier::WeightedClusters(
            route::WeightedCluster {
                clusters: vec![route::weighted_cluster::ClusterWeight {
                    name: "v1".into(),
                    weight: Some(UInt32Value { value: 1 }),
                    request_headers_to_add: vec![option("x-canary", "v1", OVERWRITE)],
                    response_headers_to_remove: vec!["x-internal".into()],
                    ..Default::default()
                }],
                ..Default::default()
            },
        ));
    }
    weighted.request_headers_to_add = vec![option("x-client", "%DOWNSTREAM_REMOTE_ADDRESS%", 0)];
    #[allow(deprecated)]
    let deprecated = core::HeaderValueOption {
        append: Some(BoolValue { value: false }),
        ..option("x-vhost", "on", 0)
    };
    let mut config = config_of(vec![weighted]);
    config.virtual_hosts[0].response_headers_to_add = vec![deprecated];
    config.virtual_hosts[0].request_headers_to_remove = vec!["x-debug".into()];
    config.response_headers_to_add = vec![option("x-served-by", "%HOSTNAME%", ADD_IF_ABSENT)];
    config.most_specific_header_mutations_wins = true;

    let rc = route_configuration(&config).unwrap();
    assert!(rc.most_specific_header_mutations_wins);
    let global = &rc.headers.response_headers_to_add[0];
    assert_eq!(
        (
            global.name.as_str(),
            global.value.as_str(),
            global.append_action
        ),
        ("x-served-by", "%HOSTNAME%", Some(AppendAction::AddIfAbsent))
    );
    let vhost = &rc.virtual_hosts[0];
    assert_eq!(vhost.headers.request_headers_to_remove, ["x-debug"]);
    let vh_add = &vhost.headers.response_headers_to_add[0];
    assert_eq!((vh_add.append, vh_add.append_action), (Some(false), None));
    let route = &vhost.routes[0];
    assert_eq!(
        route.headers.request_headers_to_add[0].append_action,
        Some(AppendAction::AppendIfExistsOrAdd)
    );
    let target = &route.weighted_clusters.as_ref().unwrap()[0];
    assert_eq!(target.headers.request_headers_to_add[0].value, "v1");
    assert_eq!(target.headers.response_headers_to_remove, ["x-internal"]);

    // The translated listener compiles: values parse, names pass.
    let mut listener: ListenerFile =
        serde_yaml_ng::from_str("{ name: l, address: \"127.0.0.1:0\", kind: http }").unwrap();
    rc.apply_to(&mut listener);
    assert!(listener.http.most_specific_header_mutations_wins);
    let file = ConfigFile {
        listeners: vec![listener],
        ..serde_yaml_ng::from_str("{}").unwrap()
    };
    crate::config::Config::from_dynamic_model(file).unwrap();
}

#[test]
fn bad_header_mutations_are_nacked_with_their_field() {
    let mut bad = route_to("api");
    bad.request_headers_to_add = vec![option("x-a", "%UPSTREAM_METADATA(a:b)%", 0)];
    bad.response_headers_to_remove = vec![":status".into()];
    let mut config = config_of(vec![bad]);
    config.request_headers_to_add = vec![option("host", "evil", OVERWRITE)];
    #[allow(deprecated)]
    let both = core::HeaderValueOption {
        append: Some(BoolValue { value: true }),
        ..option("x-b", "v", OVERWRITE)
    };
    config.virtual_hosts[0].response_headers_to_add = vec![both];
    let problems = route_configuration(&config).unwrap_err();
    let expect = [
        "request_headers_to_add[0].header.key: \"host\": pseudo-headers and host may not be modified",
        "virtual_hosts[0].response_headers_to_add[0].append: both append and append_action are set",
        "virtual_hosts[0].routes[0].request_headers_to_add[0].header.value: unknown command operator %UPSTREAM_METADATA(a:b)%",
        "virtual_hosts[0].routes[0].response_headers_to_remove[0]: \":status\": pseudo-headers",
    ];
    assert_eq!(problems.len(), expect.len(), "{problems:#?}");
    for (problem, expected) in problems.iter().zip(expect) {
        assert!(problem.starts_with(expected), "{problem} !~ {expected}");
    }
}

fn dns_cluster(kind: cluster::cluster::DiscoveryType, hosts: &[&str]) -> cluster::Cluster {
    #[allow(deprecated)]
    cluster::Cluster {
        name: "dns".into(),
        cluster_discovery_type: Some(cluster::cluster::ClusterDiscoveryType::Type(kind as i32)),
        dns_refresh_rate: Some(PbDuration {
            seconds: 0,
            nanos: 250_000_000,
        }),
        dns_lookup_family: cluster::cluster::DnsLookupFamily::V4Only as i32,
        load_assignment: Some(endpoint::ClusterLoadAssignment {
            cluster_name: "dns".into(),
            endpoints: vec![endpoint::LocalityLbEndpoints {
                lb_endpoints: hosts
                    .iter()
                    .map(|host| endpoint::LbEndpoint {
                        host_identifier: Some(endpoint::lb_endpoint::HostIdentifier::Endpoint(
                            endpoint::Endpoint {
                                address: socket(host, 8080),
                                ..Default::default()
                            },
                        )),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[test]
fn dns_clusters_keep_names_and_settings() {
    use cluster::cluster::DiscoveryType as T;
    let (file, source) = super::super::xds::cluster(
        &dns_cluster(T::StrictDns, &["LocalHost.", "127.0.0.1"]),
        None,
    )
    .unwrap();
    assert_eq!(source, EndpointSource::Inline);
    assert_eq!(
        file.endpoints[0].address,
        EndpointAddress::Name {
            host: "localhost".into(),
            port: 8080
        }
    );
    assert_eq!(file.endpoints[1].address.to_string(), "127.0.0.1:8080");
    assert_eq!(file.dns_refresh_rate, std::time::Duration::from_millis(250));
    assert_eq!(file.dns_lookup_family, DnsLookupFamily::V4Only);
    assert_eq!(file.dns_type, DnsType::Strict);

    let (logical, _) =
        super::super::xds::cluster(&dns_cluster(T::LogicalDns, &["localhost"]), None).unwrap();
    assert_eq!(logical.dns_type, DnsType::Logical);
    // Envoy's default family when the field is unset.
    let auto = cluster::Cluster {
        dns_lookup_family: 0,
        ..dns_cluster(T::StrictDns, &["localhost"])
    };
    assert_eq!(
        super::super::xds::cluster(&auto, None)
            .unwrap()
            .0
            .dns_lookup_family,
        DnsLookupFamily::Auto
    );
}

#[test]
fn dns_names_outside_dns_clusters_and_unsupported_dns_fields_are_nacked() {
    use cluster::cluster::DiscoveryType as T;
    let problems =
        super::super::xds::cluster(&dns_cluster(T::Static, &["localhost"]), None).unwrap_err();
    assert!(
        problems[0].starts_with("load_assignment[0].lb_endpoints[0].endpoint.address.address: \"localhost\" is not an IP address"),
        "{problems:?}"
    );
    let problems =
        super::super::xds::cluster(&dns_cluster(T::LogicalDns, &["a.test", "b.test"]), None)
            .unwrap_err();
    assert!(
        problems[0].contains("LOGICAL_DNS cluster takes exactly one endpoint"),
        "{problems:?}"
    );
    #[allow(deprecated)]
    let ttl = cluster::Cluster {
        respect_dns_ttl: true,
        ..dns_cluster(T::StrictDns, &["localhost"])
    };
    let problems = super::super::xds::cluster(&ttl, None).unwrap_err();
    assert_eq!(problems, ["respect_dns_ttl: not supported by Postern"]);
    let bad_name = dns_cluster(T::StrictDns, &["bad_name!"]);
    let problems = super::super::xds::cluster(&bad_name, None).unwrap_err();
    assert!(problems[0].contains("is not a DNS name"), "{problems:?}");
}

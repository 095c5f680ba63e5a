//! Behaviour-changing fields Postern does not implement are refused by
//! name; their defaults, and the zeros istiod writes, are accepted.

use postern_proto::google::protobuf::{BoolValue, Duration as PbDuration};

use super::*;

fn seconds(seconds: i64) -> Option<PbDuration> {
    Some(PbDuration { seconds, nanos: 0 })
}

fn action(route: &mut route::Route) -> &mut route::RouteAction {
    match &mut route.action {
        Some(route::route::Action::Route(action)) => action,
        _ => unreachable!("route_to builds a route action"),
    }
}

#[test]
fn route_and_virtual_host_policies_postern_lacks_are_refused_by_name() {
    let mut route = route_to("api");
    let a = action(&mut route);
    a.idle_timeout = seconds(30);
    a.max_stream_duration = Some(route::route_action::MaxStreamDuration {
        max_stream_duration: seconds(60),
        ..Default::default()
    });
    a.upgrade_configs = vec![route::route_action::UpgradeConfig {
        upgrade_type: "websocket".into(),
        enabled: Some(BoolValue { value: false }),
        ..Default::default()
    }];
    a.internal_redirect_policy = Some(Default::default());
    a.hedge_policy = Some(Default::default());
    let mut config = config_of(vec![route]);
    config.virtual_hosts[0].retry_policy = Some(Default::default());
    config.virtual_hosts[0].hedge_policy = Some(Default::default());
    let problems = route_configuration(&config).unwrap_err();
    for field in [
        "virtual_hosts[0].retry_policy",
        "virtual_hosts[0].hedge_policy",
        "virtual_hosts[0].routes[0].route.idle_timeout",
        "virtual_hosts[0].routes[0].route.max_stream_duration.max_stream_duration",
        "virtual_hosts[0].routes[0].route.upgrade_configs[0].enabled",
        "virtual_hosts[0].routes[0].route.internal_redirect_policy",
        "virtual_hosts[0].routes[0].route.hedge_policy",
    ] {
        assert!(
            problems.iter().any(|p| p.starts_with(field)),
            "{field} in {problems:?}"
        );
    }
}

#[test]
fn istio_route_defaults_are_accepted() {
    let mut route = route_to("api");
    let a = action(&mut route);
    // What istiod writes on every route.
    a.max_stream_duration = Some(route::route_action::MaxStreamDuration {
        max_stream_duration: seconds(0),
        grpc_timeout_header_max: seconds(0),
        ..Default::default()
    });
    a.idle_timeout = seconds(0);
    a.upgrade_configs = vec![route::route_action::UpgradeConfig {
        upgrade_type: "websocket".into(),
        ..Default::default()
    }];
    route_configuration(&config_of(vec![route])).unwrap();
}

fn eds_cluster() -> cluster::Cluster {
    cluster::Cluster {
        name: "api".into(),
        cluster_discovery_type: Some(cluster::cluster::ClusterDiscoveryType::Type(
            cluster::cluster::DiscoveryType::Eds as i32,
        )),
        ..Default::default()
    }
}

#[test]
fn cluster_balancing_and_ejection_postern_lacks_are_refused_by_name() {
    let c = cluster::Cluster {
        lb_subset_config: Some(cluster::cluster::LbSubsetConfig {
            subset_selectors: vec![Default::default()],
            ..Default::default()
        }),
        common_lb_config: Some(cluster::cluster::CommonLbConfig {
            healthy_panic_threshold: Some(postern_proto::envoy::r#type::v3::Percent {
                value: 50.0,
            }),
            locality_config_specifier: Some(
                cluster::cluster::common_lb_config::LocalityConfigSpecifier::LocalityWeightedLbConfig(
                    Default::default(),
                ),
            ),
            ..Default::default()
        }),
        outlier_detection: Some(cluster::OutlierDetection {
            enforcing_success_rate: Some(UInt32Value { value: 100 }),
            consecutive_gateway_failure: Some(UInt32Value { value: 3 }),
            enforcing_consecutive_gateway_failure: Some(UInt32Value { value: 100 }),
            enforcing_failure_percentage: Some(UInt32Value { value: 50 }),
            enforcing_consecutive_5xx: Some(UInt32Value { value: 50 }),
            ..Default::default()
        }),
        ..eds_cluster()
    };
    let problems = super::super::xds::cluster(&c, None).unwrap_err();
    for field in [
        "lb_subset_config",
        "common_lb_config.healthy_panic_threshold",
        "common_lb_config.locality_config_specifier",
        "outlier_detection: success-rate ejection",
        "outlier_detection.enforcing_consecutive_gateway_failure",
        "outlier_detection: failure-percentage ejection",
        "outlier_detection.enforcing_consecutive_5xx",
    ] {
        assert!(
            problems.iter().any(|p| p.starts_with(field)),
            "{field} in {problems:?}"
        );
    }
}

#[test]
fn istio_outlier_detection_and_lb_defaults_are_accepted() {
    // A DestinationRule with consecutive 5xx ejection, as istiod writes it.
    let c = cluster::Cluster {
        common_lb_config: Some(cluster::cluster::CommonLbConfig {
            healthy_panic_threshold: Some(Default::default()),
            ..Default::default()
        }),
        outlier_detection: Some(cluster::OutlierDetection {
            consecutive_5xx: Some(UInt32Value { value: 5 }),
            enforcing_consecutive_5xx: Some(UInt32Value { value: 100 }),
            interval: seconds(10),
            base_ejection_time: seconds(30),
            max_ejection_percent: Some(UInt32Value { value: 100 }),
            // Counted, never enforced: Envoy's default.
            consecutive_gateway_failure: Some(UInt32Value { value: 0 }),
            enforcing_consecutive_gateway_failure: Some(UInt32Value { value: 0 }),
            enforcing_success_rate: Some(UInt32Value { value: 0 }),
            ..Default::default()
        }),
        lb_subset_config: Some(Default::default()),
        ..eds_cluster()
    };
    let (file, _) = super::super::xds::cluster(&c, None).unwrap();
    assert_eq!(file.outlier_detection.map(|od| od.consecutive_5xx), Some(5));
    // consecutive_5xx switched off comes with enforcing 0.
    let off = cluster::Cluster {
        outlier_detection: Some(cluster::OutlierDetection {
            consecutive_5xx: Some(UInt32Value { value: 0 }),
            enforcing_consecutive_5xx: Some(UInt32Value { value: 0 }),
            ..Default::default()
        }),
        ..eds_cluster()
    };
    super::super::xds::cluster(&off, None).unwrap();
}

pub(super) fn with_manager(
    edit: impl FnOnce(&mut hcm::HttpConnectionManager),
) -> listener::Listener {
    let mut l = http_listener(Vec::new());
    let filter = &mut l.filter_chains[0].filters[0];
    let Some(listener::filter::ConfigType::TypedConfig(packed)) = &filter.config_type else {
        unreachable!("http_listener packs its connection manager")
    };
    let mut manager = hcm::HttpConnectionManager::decode(packed.value.as_slice()).unwrap();
    edit(&mut manager);
    filter.config_type = Some(listener::filter::ConfigType::TypedConfig(any(&manager)));
    l
}

#[test]
fn connection_manager_settings_postern_lacks_are_refused_by_name() {
    use hcm::http_connection_manager::{CodecType, ForwardClientCertDetails};
    let l = with_manager(|m| {
        m.codec_type = CodecType::Http1 as i32;
        m.forward_client_cert_details = ForwardClientCertDetails::ForwardOnly as i32;
        m.xff_num_trusted_hops = 1;
        m.request_timeout = seconds(10);
        m.stream_idle_timeout = seconds(60);
        m.common_http_protocol_options = Some(core::HttpProtocolOptions {
            idle_timeout: seconds(3600),
            ..Default::default()
        });
    });
    let problems = listener(&l, None).unwrap_err();
    for field in [
        "codec_type",
        "forward_client_cert_details",
        "xff_num_trusted_hops",
        "request_timeout",
        "stream_idle_timeout",
    ] {
        assert!(
            problems.iter().any(|p| p.contains(&format!(".{field}"))),
            "{field} in {problems:?}"
        );
    }
}

#[test]
fn istio_connection_manager_defaults_are_accepted_and_stream_idle_maps() {
    use hcm::http_connection_manager::ForwardClientCertDetails;
    // An inbound listener as istiod writes it.
    let l = with_manager(|m| {
        m.forward_client_cert_details = ForwardClientCertDetails::AppendForward as i32;
        m.stream_idle_timeout = seconds(0);
        m.upgrade_configs = vec![hcm::http_connection_manager::UpgradeConfig {
            upgrade_type: "websocket".into(),
            ..Default::default()
        }];
    });
    let (default_idle, _) = listener(&http_listener(Vec::new()), None).unwrap();
    let (file, _) = listener(&l, None).unwrap();
    assert_eq!(file.limits.idle_timeout, default_idle.limits.idle_timeout);

    let l = with_manager(|m| m.stream_idle_timeout = seconds(42));
    let (file, _) = listener(&l, None).unwrap();
    assert_eq!(file.limits.idle_timeout, std::time::Duration::from_secs(42));
}

//! Rate limits from xDS beyond the HTTP listener's filter: the network
//! local rate limit in front of a TCP proxy.

use postern_proto::envoy::extensions::filters::network::local_ratelimit::v3::LocalRateLimit as NetworkLimit;
use postern_proto::envoy::r#type::v3::TokenBucket;
use postern_proto::google::protobuf::{BoolValue, Duration as ProtoDuration};

use super::*;

fn bucket(max_tokens: u32) -> Option<TokenBucket> {
    Some(TokenBucket {
        max_tokens,
        tokens_per_fill: None,
        fill_interval: Some(ProtoDuration {
            seconds: 60,
            nanos: 0,
        }),
    })
}

fn network_limit(config: &NetworkLimit) -> listener::Filter {
    listener::Filter {
        name: "envoy.filters.network.local_ratelimit".into(),
        config_type: Some(listener::filter::ConfigType::TypedConfig(any(config))),
    }
}

fn limited_tcp(config: &NetworkLimit) -> listener::Listener {
    let mut l = tcp_listener("db", socket("127.0.0.1", 0), "db");
    l.filter_chains[0].filters.insert(0, network_limit(config));
    l
}

#[test]
fn a_network_local_rate_limit_before_a_tcp_proxy_limits_its_connections() {
    let config = NetworkLimit {
        stat_prefix: "db".into(),
        token_bucket: bucket(5),
        ..Default::default()
    };
    let (file, _) = listener(&limited_tcp(&config), None).unwrap();
    let tcp = file.tcp.expect("tcp listener");
    assert_eq!(tcp.cluster, "db");
    let limit = tcp.local_rate_limit.expect("limit mapped");
    assert_eq!(limit.max_tokens, 5);
    // Envoy's default refill is one token per interval.
    assert_eq!(limit.tokens_per_fill, Some(1));
    assert_eq!(limit.fill_interval, std::time::Duration::from_secs(60));
    assert!(limit.key.is_none() && !limit.shadow);

    // Turned off by its runtime flag's default: no limit, nothing refused.
    let off = NetworkLimit {
        runtime_enabled: Some(core::RuntimeFeatureFlag {
            default_value: Some(BoolValue { value: false }),
            runtime_key: "ratelimit.db".into(),
        }),
        ..config.clone()
    };
    let (file, _) = listener(&limited_tcp(&off), None).unwrap();
    assert!(file.tcp.expect("tcp").local_rate_limit.is_none());
    let on = NetworkLimit {
        runtime_enabled: Some(core::RuntimeFeatureFlag {
            default_value: Some(BoolValue { value: true }),
            runtime_key: String::new(),
        }),
        ..config
    };
    let (file, _) = listener(&limited_tcp(&on), None).unwrap();
    assert!(file.tcp.expect("tcp").local_rate_limit.is_some());
}

#[test]
fn network_local_rate_limits_postern_cannot_honour_are_nacked_by_field() {
    let good = NetworkLimit {
        token_bucket: bucket(5),
        ..Default::default()
    };
    let problems_of = |l: &listener::Listener| listener(l, None).unwrap_err().join("\n");

    let shared = NetworkLimit {
        share_key: "pool".into(),
        ..good.clone()
    };
    let problems = problems_of(&limited_tcp(&shared));
    assert!(
        problems.contains("filter_chains[0].filters[0].typed_config.share_key"),
        "{problems}"
    );

    let no_bucket = NetworkLimit::default();
    let problems = problems_of(&limited_tcp(&no_bucket));
    assert!(
        problems.contains("filters[0].typed_config.token_bucket: is required"),
        "{problems}"
    );

    // After the tcp_proxy (or any other filter) it would count something
    // else than Postern does: refused.
    let mut late = tcp_listener("db", socket("127.0.0.1", 0), "db");
    late.filter_chains[0].filters.push(network_limit(&good));
    let problems = problems_of(&late);
    assert!(
        problems.contains("filters[1] (a network local rate limit filter must come first"),
        "{problems}"
    );

    let mut twice = limited_tcp(&good);
    twice.filter_chains[0]
        .filters
        .insert(0, network_limit(&good));
    let problems = problems_of(&twice);
    assert!(
        problems.contains("a second network local rate limit"),
        "{problems}"
    );

    // In front of an HTTP connection manager: not taken.
    let mut http = http_listener(Vec::new());
    http.filter_chains[0]
        .filters
        .insert(0, network_limit(&good));
    let problems = problems_of(&http);
    assert!(problems.contains("only before a tcp_proxy"), "{problems}");
}

#[test]
fn a_static_tcp_limit_keys_on_the_remote_address_at_most() {
    let yaml = |key: &str| {
        format!(
            r#"
listeners:
  - name: db
    address: 127.0.0.1:0
    kind: tcp
    tcp:
      cluster: db
      local_rate_limit: {{ max_tokens: 2, fill_interval: 1s{key} }}
clusters:
  - name: db
    endpoints: [{{ address: 127.0.0.1:9 }}]
"#
        )
    };
    crate::config::Config::from_yaml(&yaml("")).unwrap();
    crate::config::Config::from_yaml(&yaml(", key: { remote_address: true }")).unwrap();
    let err = crate::config::Config::from_yaml(&yaml(", key: { header: x-user }"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("listeners[0].tcp.local_rate_limit.key: a TCP listener's limit can only key on remote_address"),
        "{err}"
    );
}

fn per_route_limit(
) -> postern_proto::envoy::extensions::filters::http::local_ratelimit::v3::LocalRateLimit {
    use postern_proto::envoy::r#type::v3::FractionalPercent;
    let all = || core::RuntimeFractionalPercent {
        default_value: Some(FractionalPercent {
            numerator: 100,
            denominator: 0,
        }),
        ..Default::default()
    };
    postern_proto::envoy::extensions::filters::http::local_ratelimit::v3::LocalRateLimit {
        stat_prefix: "route".into(),
        token_bucket: bucket(100),
        filter_enabled: Some(all()),
        filter_enforced: Some(all()),
        ..Default::default()
    }
}

fn descriptor(
    entries: &[(&str, &str)],
    max_tokens: u32,
) -> postern_proto::envoy::extensions::common::ratelimit::v3::LocalRateLimitDescriptor {
    use postern_proto::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry;
    postern_proto::envoy::extensions::common::ratelimit::v3::LocalRateLimitDescriptor {
        entries: entries
            .iter()
            .map(|(k, v)| Entry {
                key: (*k).into(),
                value: (*v).into(),
            })
            .collect(),
        token_bucket: bucket(max_tokens),
        shadow_mode: false,
    }
}

fn route_with_limit(
    limit: &postern_proto::envoy::extensions::filters::http::local_ratelimit::v3::LocalRateLimit,
) -> route::Route {
    let mut r = route_to("api");
    r.typed_per_filter_config
        .insert("envoy.filters.http.local_ratelimit".into(), any(limit));
    r
}

#[test]
fn descriptors_map_onto_keyed_buckets_with_the_route_actions() {
    use route::rate_limit::action::{ActionSpecifier, RequestHeaders};
    let mut limit = per_route_limit();
    limit.descriptors = vec![
        descriptor(&[("user", "")], 2),
        descriptor(&[("generic_key", "admin")], 1),
    ];
    limit.stage = 1;
    limit.always_consume_default_token_bucket = Some(BoolValue { value: false });
    limit.max_dynamic_descriptors =
        Some(postern_proto::google::protobuf::UInt32Value { value: 50 });
    let mut r = route_with_limit(&limit);
    if let Some(route::route::Action::Route(action)) = &mut r.action {
        action.rate_limits = vec![route::RateLimit {
            stage: Some(postern_proto::google::protobuf::UInt32Value { value: 1 }),
            actions: vec![route::rate_limit::Action {
                action_specifier: Some(ActionSpecifier::RequestHeaders(RequestHeaders {
                    header_name: "x-user".into(),
                    descriptor_key: "user".into(),
                    skip_if_absent: false,
                })),
            }],
            ..Default::default()
        }];
    }
    let hosts = route_configuration(&config_of(vec![r])).unwrap();
    let route = &hosts.virtual_hosts[0].routes[0];
    let mapped = route.local_rate_limit.as_ref().expect("route limit");
    assert_eq!(mapped.stage, 1);
    assert!(!mapped.always_consume_default);
    let [user, admin] = mapped.descriptors.as_slice() else {
        panic!("two descriptors: {mapped:?}")
    };
    assert_eq!(user.entries[0].key, "user");
    assert_eq!(
        user.entries[0].value, None,
        "an empty value takes any value"
    );
    assert_eq!((user.max_tokens, user.max_keys), (2, 50));
    assert_eq!(admin.entries[0].value.as_deref(), Some("admin"));
    assert_eq!(route.rate_limits.len(), 1, "the route's actions build them");
}

#[test]
fn descriptor_settings_without_an_equivalent_are_nacked_by_field() {
    use postern_proto::envoy::extensions::common::ratelimit::v3::VhRateLimitsOptions;
    let problems_of = |limit| {
        route_configuration(&config_of(vec![route_with_limit(&limit)]))
            .unwrap_err()
            .join("\n")
    };
    let field =
        "virtual_hosts[0].routes[0].typed_per_filter_config[envoy.filters.http.local_ratelimit]";

    let mut no_bucket = per_route_limit();
    let mut d = descriptor(&[("user", "")], 1);
    d.token_bucket = None;
    no_bucket.descriptors = vec![d];
    let problems = problems_of(no_bucket);
    assert!(
        problems.contains(&format!("{field}.descriptors[0].token_bucket: is required")),
        "{problems}"
    );

    let mut no_entries = per_route_limit();
    no_entries.descriptors = vec![descriptor(&[], 1)];
    let problems = problems_of(no_entries);
    assert!(problems.contains("descriptors[0].entries"), "{problems}");

    let mut include = per_route_limit();
    include.vh_rate_limits = VhRateLimitsOptions::Include as i32;
    let problems = problems_of(include);
    assert!(
        problems.contains(&format!("{field}.vh_rate_limits")),
        "{problems}"
    );

    let mut cluster_wide = per_route_limit();
    cluster_wide.local_cluster_rate_limit = Some(Default::default());
    let problems = problems_of(cluster_wide);
    assert!(
        problems.contains(&format!("{field}.local_cluster_rate_limit")),
        "{problems}"
    );
}

#[test]
fn a_listener_limit_takes_no_descriptors() {
    let mut limit = per_route_limit();
    limit.descriptors = vec![descriptor(&[("user", "")], 1)];
    let yaml_like = http_listener(vec![hcm::HttpFilter {
        name: "envoy.filters.http.local_ratelimit".into(),
        config_type: Some(hcm::http_filter::ConfigType::TypedConfig(any(&limit))),
        ..Default::default()
    }]);
    // Translation keeps them; validation of the whole config refuses them
    // with the listener's field.
    let (file, _) = listener(&yaml_like, None).unwrap();
    assert_eq!(
        file.http.local_rate_limit.expect("limit").descriptors.len(),
        1
    );
    let err = crate::config::Config::from_yaml(
        r#"
listeners:
  - name: web
    address: 127.0.0.1:0
    kind: http
    http:
      local_rate_limit:
        max_tokens: 1
        fill_interval: 1s
        descriptors: [{ entries: [{ key: user }], max_tokens: 1, fill_interval: 1s }]
    virtual_hosts:
      - name: all
        domains: ["*"]
        routes: [{ name: r, match: { path: { prefix: / } }, cluster: backend }]
clusters:
  - name: backend
    endpoints: [{ address: 127.0.0.1:9 }]
"#,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("listeners[0].http.local_rate_limit.descriptors: only a route's"),
        "{err}"
    );
}

fn per_route_global(
    config: &postern_proto::envoy::extensions::filters::http::ratelimit::v3::RateLimitPerRoute,
) -> Any {
    any(config)
}

#[test]
fn rate_limit_per_route_sets_vh_rate_limits_and_overrides_the_route_actions() {
    use postern_proto::envoy::extensions::filters::http::ratelimit::v3::rate_limit_per_route::VhRateLimitsOptions;
    use postern_proto::envoy::extensions::filters::http::ratelimit::v3::RateLimitPerRoute;
    use route::rate_limit::action::{ActionSpecifier, GenericKey, RemoteAddress};
    let generic = |value: &str| route::RateLimit {
        actions: vec![route::rate_limit::Action {
            action_specifier: Some(ActionSpecifier::GenericKey(GenericKey {
                descriptor_value: value.into(),
                ..Default::default()
            })),
        }],
        ..Default::default()
    };
    let key = "envoy.filters.http.ratelimit";
    let mut ignore = route_to("api");
    ignore.typed_per_filter_config.insert(
        key.into(),
        per_route_global(&RateLimitPerRoute {
            vh_rate_limits: VhRateLimitsOptions::Ignore as i32,
            ..Default::default()
        }),
    );
    let mut include = route_to("api");
    include.typed_per_filter_config.insert(
        key.into(),
        // Wrapped, as Envoy allows.
        any(&route::FilterConfig {
            config: Some(per_route_global(&RateLimitPerRoute {
                vh_rate_limits: VhRateLimitsOptions::Include as i32,
                ..Default::default()
            })),
            ..Default::default()
        }),
    );
    let mut replaced = route_to("api");
    if let Some(route::route::Action::Route(a)) = &mut replaced.action {
        a.rate_limits = vec![generic("route")];
    }
    replaced.typed_per_filter_config.insert(
        key.into(),
        per_route_global(&RateLimitPerRoute {
            vh_rate_limits: VhRateLimitsOptions::Include as i32,
            rate_limits: vec![generic("per-route")],
            ..Default::default()
        }),
    );
    let mut config = config_of(vec![ignore, include, replaced, route_to("api")]);
    config.virtual_hosts[0].rate_limits = vec![route::RateLimit {
        actions: vec![route::rate_limit::Action {
            action_specifier: Some(ActionSpecifier::RemoteAddress(RemoteAddress {})),
        }],
        ..Default::default()
    }];
    let hosts = route_configuration(&config).unwrap().virtual_hosts;
    let routes = &hosts[0].routes;
    assert_eq!(routes[0].vh_rate_limits, VhRateLimitsFile::Ignore);
    assert_eq!(routes[1].vh_rate_limits, VhRateLimitsFile::Include);
    assert_eq!(routes[2].vh_rate_limits, VhRateLimitsFile::Ignore);
    let value = routes[2].rate_limits[0].actions[0]
        .generic_key
        .as_ref()
        .map(|g| g.descriptor_value.as_str());
    assert_eq!(
        value,
        Some("per-route"),
        "the per-route list replaces the route's"
    );
    assert_eq!(routes[3].vh_rate_limits, VhRateLimitsFile::Override);
}

#[test]
fn rate_limit_per_route_fields_postern_lacks_are_nacked_by_name() {
    use postern_proto::envoy::extensions::filters::http::ratelimit::v3::rate_limit_per_route::OverrideOptions;
    use postern_proto::envoy::extensions::filters::http::ratelimit::v3::RateLimitPerRoute;
    let problems_of = |config: RateLimitPerRoute| {
        let mut r = route_to("api");
        r.typed_per_filter_config.insert(
            "envoy.filters.http.ratelimit".into(),
            per_route_global(&config),
        );
        route_configuration(&config_of(vec![r]))
            .unwrap_err()
            .join("\n")
    };
    let field = "virtual_hosts[0].routes[0].typed_per_filter_config[envoy.filters.http.ratelimit]";
    let problems = problems_of(RateLimitPerRoute {
        domain: "other".into(),
        ..Default::default()
    });
    assert!(problems.contains(&format!("{field}.domain")), "{problems}");
    let problems = problems_of(RateLimitPerRoute {
        override_option: OverrideOptions::IgnorePolicy as i32,
        ..Default::default()
    });
    assert!(
        problems.contains(&format!("{field}.override_option")),
        "{problems}"
    );
    let problems = problems_of(RateLimitPerRoute {
        vh_rate_limits: 7,
        ..Default::default()
    });
    assert!(
        problems.contains(&format!("{field}.vh_rate_limits")),
        "{problems}"
    );
}

#[test]
fn vh_rate_limits_ignore_keeps_the_host_descriptors_off_a_route_without_its_own() {
    use crate::config::ListenerProtocol;
    let config = crate::config::Config::from_yaml(
        r#"
listeners:
  - name: web
    address: 127.0.0.1:0
    kind: http
    http:
      rate_limit_service: { domain: edge, cluster: backend }
    virtual_hosts:
      - name: all
        domains: ["*"]
        rate_limits: [{ actions: [{ remote_address: {} }] }]
        routes:
          - { name: ignore, match: { path: { prefix: /i } }, cluster: backend, vh_rate_limits: ignore }
          - name: include
            match: { path: { prefix: /b } }
            cluster: backend
            vh_rate_limits: include
            rate_limits: [{ actions: [{ generic_key: { descriptor_value: b } }] }]
          - { name: default, match: { path: { prefix: / } }, cluster: backend }
clusters:
  - name: backend
    endpoints: [{ address: 127.0.0.1:9 }]
"#,
    )
    .unwrap();
    let ListenerProtocol::Http(http) = &config.listeners[0].protocol else {
        panic!("http listener");
    };
    let routes = &http.routes.virtual_hosts()[0].routes;
    let counts: Vec<usize> = routes.iter().map(|r| r.rate_limits.len()).collect();
    assert_eq!(counts, [0, 2, 1]);
}

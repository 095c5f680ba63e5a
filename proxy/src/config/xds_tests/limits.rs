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

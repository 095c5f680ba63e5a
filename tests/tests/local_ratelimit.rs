//! Local rate limits across config changes and over xDS: a drained bucket
//! stays drained through pushes that leave its limit alone (endpoints,
//! other routes), a changed bucket starts full, and the listener's
//! `envoy.filters.http.local_ratelimit` filter arrives by ADS or is NACKed
//! naming the bad field. Real sockets, the in-process control plane.

use std::net::SocketAddr;

use postern_control::ads::{pack, AdsEventKind, Snapshot};
use postern_control::mesh::parse_mesh;
use postern_proto::envoy::config::listener::v3 as listener;
use postern_proto::envoy::extensions::filters::http::local_ratelimit::v3::LocalRateLimit;
use postern_proto::envoy::extensions::filters::network::http_connection_manager::v3 as hcm;
use postern_proto::envoy::r#type::v3::TokenBucket;
use postern_proto::type_url;
use postern_tests::control::{wait_acks, wait_event, ControlPlane};
use postern_tests::{get, start_proxy, wait_until, HttpBackend, Proxy};

/// One listener (`lr`) whose routes send `/` to `svc`, whose endpoint is
/// `backend`. `limit` is the `/` route's local rate limit (YAML flow map);
/// `extra_route` adds a second route, to change the route configuration
/// without touching the limited one.
fn mesh(version: &str, backend: SocketAddr, limit: &str, extra_route: bool) -> Snapshot {
    let extra = if extra_route {
        "\n          - { name: other, prefix: /other, cluster: svc }"
    } else {
        ""
    };
    let yaml = format!(
        r#"
listeners:
  - name: lr
    address: 127.0.0.1:0
    route: lr-routes
routes:
  - name: lr-routes
    virtual_hosts:
      - name: all
        domains: ["*"]
        routes:{extra}
          - name: limited
            prefix: /
            cluster: svc
            rate_limit: {limit}
services:
  - name: svc
    endpoints: [{{ address: "{backend}" }}]
"#
    );
    parse_mesh(&yaml, version).expect("mesh")
}

async fn proxy_for(cp: &ControlPlane) -> Proxy {
    let proxy = start_proxy(&format!(
        r#"
node: {{ id: "sidecar~127.0.0.1~lr.default~default.svc.cluster.local", cluster: lr }}
xds: {{ address: "{}", initial_backoff: 50ms, max_backoff: 500ms }}
"#,
        cp.url()
    ))
    .await;
    wait_until("listener bound", || async {
        proxy.listener_addr("lr").is_some()
    })
    .await;
    proxy
}

async fn status(proxy: &Proxy, path: &str) -> u16 {
    let addr = proxy.listener_addr("lr").expect("listener");
    get(addr, "svc", path).await.status.as_u16()
}

/// An hour-long interval: no bucket refills during a test.
const HOURLY_TWO: &str = "{ max_tokens: 2, fill_interval: 3600s }";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_bucket_stays_drained_through_unrelated_pushes_and_a_new_spec_starts_full() {
    let (a, b) = (HttpBackend::start("a").await, HttpBackend::start("b").await);
    let cp = ControlPlane::start(mesh("1", a.addr(), HOURLY_TWO, false)).await;
    let mut events = cp.server.events();
    let proxy = proxy_for(&cp).await;
    assert_eq!(status(&proxy, "/").await, 200);
    assert_eq!(status(&proxy, "/").await, 200);
    assert_eq!(status(&proxy, "/").await, 429);

    // The cluster's endpoints move: every listener's config is rebuilt, the
    // limit is the same one.
    cp.server
        .set_snapshot(mesh("2", b.addr(), HOURLY_TWO, false));
    wait_acks(&mut events, &[(type_url::ENDPOINT, "2")]).await;
    assert_eq!(status(&proxy, "/").await, 429, "after an EDS push");

    // Another route joins the route configuration.
    cp.server
        .set_snapshot(mesh("3", b.addr(), HOURLY_TWO, true));
    wait_acks(&mut events, &[(type_url::ROUTE, "3")]).await;
    assert_eq!(status(&proxy, "/").await, 429, "after a route change");

    // A different bucket is a different limit: it starts full.
    cp.server.set_snapshot(mesh(
        "4",
        b.addr(),
        "{ max_tokens: 3, fill_interval: 3600s }",
        true,
    ));
    wait_acks(&mut events, &[(type_url::ROUTE, "4")]).await;
    assert_eq!(status(&proxy, "/").await, 200, "a new spec starts full");
    assert_eq!(
        b.requests().len(),
        1,
        "refused calls never reached a backend"
    );
}

/// `snapshot` with `filter` as the listener's local rate limit filter.
fn with_listener_filter(snapshot: &Snapshot, version: &str, filter: hcm::HttpFilter) -> Snapshot {
    let mut out = snapshot.clone();
    out.version = version.into();
    let any = snapshot.get(type_url::LISTENER, "lr").expect("listener");
    let mut l: listener::Listener = prost::Message::decode(any.value.as_slice()).expect("decode");
    let config = &mut l.filter_chains[0].filters[0].config_type;
    let Some(listener::filter::ConfigType::TypedConfig(any)) = config else {
        unreachable!("the mesh writes typed configs")
    };
    let mut manager: hcm::HttpConnectionManager =
        prost::Message::decode(any.value.as_slice()).expect("hcm decodes");
    // The mesh's own (bucketless, so off) local rate limit filter gives
    // way: a second one would be NACKed.
    match manager
        .http_filters
        .iter()
        .position(|f| f.name == filter.name)
    {
        Some(at) => manager.http_filters[at] = filter,
        None => manager.http_filters.insert(0, filter),
    }
    *config = Some(listener::filter::ConfigType::TypedConfig(pack(&manager)));
    out.add_message("lr", &l);
    out
}

fn local_ratelimit(bucket: TokenBucket) -> hcm::HttpFilter {
    use postern_proto::envoy::config::core::v3::RuntimeFractionalPercent;
    use postern_proto::envoy::r#type::v3::FractionalPercent;
    let all = || {
        Some(RuntimeFractionalPercent {
            default_value: Some(FractionalPercent {
                numerator: 100,
                denominator: 0,
            }),
            runtime_key: String::new(),
        })
    };
    let config = LocalRateLimit {
        stat_prefix: "listener".into(),
        token_bucket: Some(bucket),
        filter_enabled: all(),
        filter_enforced: all(),
        ..Default::default()
    };
    hcm::HttpFilter {
        name: "envoy.filters.http.local_ratelimit".into(),
        config_type: Some(hcm::http_filter::ConfigType::TypedConfig(pack(&config))),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_listener_filter_arrives_by_ads_and_an_invalid_one_is_nacked_by_field() {
    use postern_proto::google::protobuf::{Duration, UInt32Value};
    let backend = HttpBackend::start("a").await;
    // The route's own limit is generous; the listener's is what refuses.
    let base = mesh(
        "1",
        backend.addr(),
        "{ max_tokens: 100, fill_interval: 3600s }",
        false,
    );
    let cp = ControlPlane::start(base.clone()).await;
    let mut events = cp.server.events();
    let proxy = proxy_for(&cp).await;
    assert_eq!(status(&proxy, "/").await, 200);

    let hour = Some(Duration {
        seconds: 3600,
        nanos: 0,
    });
    cp.server.set_snapshot(with_listener_filter(
        &base,
        "2",
        local_ratelimit(TokenBucket {
            max_tokens: 1,
            tokens_per_fill: Some(UInt32Value { value: 1 }),
            fill_interval: hour,
        }),
    ));
    wait_acks(&mut events, &[(type_url::LISTENER, "2")]).await;
    assert_eq!(status(&proxy, "/").await, 200);
    assert_eq!(status(&proxy, "/").await, 429);

    // No fill interval: NACKed with the field's name, and the last good
    // limit keeps its spent bucket.
    cp.server.set_snapshot(with_listener_filter(
        &base,
        "3",
        local_ratelimit(TokenBucket {
            max_tokens: 1,
            tokens_per_fill: None,
            fill_interval: None,
        }),
    ));
    let nack = wait_event(&mut events, "listener NACK", |e| {
        e.type_url == type_url::LISTENER
            && matches!(&e.kind, AdsEventKind::Nack { version, .. } if version == "3")
    })
    .await;
    let AdsEventKind::Nack { error, .. } = nack.kind else {
        unreachable!()
    };
    assert!(error.contains("token_bucket.fill_interval"), "{error}");
    assert_eq!(status(&proxy, "/").await, 429);
}

// ------------------------------------------------------------------- TCP --

/// Sends a ping on a new connection to `addr`: whether it came back
/// (false: the proxy closed the connection).
async fn echoes(addr: SocketAddr) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut conn) = tokio::net::TcpStream::connect(addr).await else {
        return false;
    };
    if conn.write_all(b"ping").await.is_err() {
        return false;
    }
    let mut buf = [0u8; 4];
    let read = postern_tests::within(
        std::time::Duration::from_secs(10),
        "echo or close",
        conn.read_exact(&mut buf),
    )
    .await;
    read.is_ok() && &buf == b"ping"
}

/// A TCP listener `name`: a network local rate limit of `max_tokens` per
/// hour, then a tcp_proxy to the cluster `echo`.
fn limited_tcp_listener(name: &str, max_tokens: u32) -> listener::Listener {
    use postern_proto::envoy::extensions::filters::network::local_ratelimit::v3::LocalRateLimit as NetworkLimit;
    use postern_proto::google::protobuf::Duration;
    let mut l =
        postern_tests::envoy::tcp_listener(name, "127.0.0.1:0".parse().expect("addr"), "echo");
    let limit = NetworkLimit {
        stat_prefix: name.into(),
        token_bucket: Some(TokenBucket {
            max_tokens,
            tokens_per_fill: None,
            fill_interval: Some(Duration {
                seconds: 3600,
                nanos: 0,
            }),
        }),
        ..Default::default()
    };
    l.filter_chains[0].filters.insert(
        0,
        listener::Filter {
            name: "envoy.filters.network.local_ratelimit".into(),
            config_type: Some(listener::filter::ConfigType::TypedConfig(pack(&limit))),
        },
    );
    l
}

fn tcp_snapshot(version: &str, l: &listener::Listener, echo: SocketAddr) -> Snapshot {
    let mut s = Snapshot::new(version);
    s.add_message(&l.name, l);
    s.add_message(
        "echo",
        &postern_tests::envoy::static_cluster("echo", echo, None),
    );
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_network_limit_are_closed_counted_and_never_proxied() {
    use postern_tests::prom::scrape;
    let _recorder = postern::telemetry::install_prometheus_recorder();
    let echo = postern_tests::tcp_backend::TcpBackend::echo().await;
    let cp = ControlPlane::start(tcp_snapshot(
        "1",
        &limited_tcp_listener("tcp-rl", 2),
        echo.addr(),
    ))
    .await;
    let mut events = cp.server.events();
    let proxy = start_proxy(&format!(
        "node: {{ id: db-1, cluster: db }}\nxds: {{ address: \"{}\", initial_backoff: 50ms, max_backoff: 500ms }}\n",
        cp.url()
    ))
    .await;
    wait_acks(
        &mut events,
        &[(type_url::CLUSTER, "1"), (type_url::LISTENER, "1")],
    )
    .await;
    let addr = proxy.listener_addr("tcp-rl").expect("listener");
    assert!(echoes(addr).await);
    assert!(echoes(addr).await);
    assert!(!echoes(addr).await, "the third connection is refused");
    assert_eq!(
        echo.connections(),
        2,
        "a refused connection never reached the upstream"
    );
    let admin = proxy.admin_addr();
    let refused = [
        ("listener", "tcp-rl"),
        ("scope", "connection"),
        ("mode", "enforced"),
    ];
    assert_eq!(
        scrape(admin, "postern_ratelimit_limited_total", &refused).await,
        1.0
    );
    assert_eq!(
        scrape(
            admin,
            "postern_tcp_connections_total",
            &[("listener", "tcp-rl"), ("result", "rate_limited")]
        )
        .await,
        1.0
    );

    // The cluster changes under the listener: the limit is the same one and
    // keeps its spent bucket.
    let other_echo = postern_tests::tcp_backend::TcpBackend::echo().await;
    cp.server.set_snapshot(tcp_snapshot(
        "2",
        &limited_tcp_listener("tcp-rl", 2),
        other_echo.addr(),
    ));
    wait_acks(&mut events, &[(type_url::CLUSTER, "2")]).await;
    assert!(!echoes(addr).await, "still refused after a push");

    // A new bucket starts full.
    cp.server.set_snapshot(tcp_snapshot(
        "3",
        &limited_tcp_listener("tcp-rl", 3),
        other_echo.addr(),
    ));
    wait_acks(&mut events, &[(type_url::LISTENER, "3")]).await;
    assert_eq!(
        proxy.listener_addr("tcp-rl"),
        Some(addr),
        "the listener was kept"
    );
    assert!(echoes(addr).await, "a new bucket starts full");
    assert_eq!(other_echo.connections(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_static_tcp_limit_keys_on_the_remote_address_and_a_shadow_one_refuses_nothing() {
    use postern_tests::prom::scrape;
    let _recorder = postern::telemetry::install_prometheus_recorder();
    let echo = postern_tests::tcp_backend::TcpBackend::echo().await;
    let proxy = start_proxy(&format!(
        r#"
listeners:
  - name: tcp-keyed
    address: 127.0.0.1:0
    kind: tcp
    tcp:
      cluster: echo-static
      local_rate_limit: {{ max_tokens: 1, fill_interval: 3600s, key: {{ remote_address: true }} }}
  - name: tcp-shadow
    address: 127.0.0.1:0
    kind: tcp
    tcp:
      cluster: echo-static
      local_rate_limit: {{ max_tokens: 1, fill_interval: 3600s, shadow: true }}
clusters:
  - name: echo-static
    endpoints: [{{ address: "{}" }}]
"#,
        echo.addr()
    ))
    .await;
    let keyed = proxy.listener_addr("tcp-keyed").expect("listener");
    assert!(echoes(keyed).await);
    assert!(!echoes(keyed).await, "127.0.0.1 spent its token");
    let shadow = proxy.listener_addr("tcp-shadow").expect("listener");
    for _ in 0..3 {
        assert!(echoes(shadow).await, "shadow refuses nothing");
    }
    let admin = proxy.admin_addr();
    assert_eq!(
        scrape(
            admin,
            "postern_ratelimit_limited_total",
            &[("listener", "tcp-shadow"), ("mode", "shadow")]
        )
        .await,
        2.0
    );
    assert_eq!(echo.connections(), 4);
    // The refusal is a TCP call of its own, flagged as Envoy flags it.
    let text = get(admin, "localhost", "/metrics").await.text();
    let refused: f64 = postern_tests::prom::parse_metrics(&text)
        .iter()
        .filter(|s| s.name == "istio_tcp_connections_closed_total")
        .filter(|s| s.labels.get("response_flags").map(String::as_str) == Some("RL"))
        .filter(|s| s.labels.values().any(|v| v.contains("echo-static")))
        .map(|s| s.value)
        .sum();
    assert_eq!(refused, 1.0, "{text}");
}

// ----------------------------------------------------------- descriptors --

/// The mesh of [`mesh`] whose `limited` route has `limit` as its local
/// rate limit and `actions` as its `rate_limits`.
fn with_route_limit(
    base: &Snapshot,
    version: &str,
    limit: &LocalRateLimit,
    actions: Vec<postern_proto::envoy::config::route::v3::rate_limit::Action>,
) -> Snapshot {
    use postern_proto::envoy::config::route::v3 as route;
    let mut out = base.clone();
    out.version = version.into();
    let any = base.get(type_url::ROUTE, "lr-routes").expect("routes");
    let mut routes: route::RouteConfiguration =
        prost::Message::decode(any.value.as_slice()).expect("decode");
    let r = routes.virtual_hosts[0]
        .routes
        .iter_mut()
        .find(|r| r.name == "limited")
        .expect("limited route");
    r.typed_per_filter_config
        .insert("envoy.filters.http.local_ratelimit".into(), pack(limit));
    if let Some(route::route::Action::Route(action)) = &mut r.action {
        action.rate_limits = vec![route::RateLimit {
            actions,
            ..Default::default()
        }];
    }
    out.add_message("lr-routes", &routes);
    out
}

fn by_user(user: &str) -> http::Request<postern_tests::Body> {
    http::Request::builder()
        .uri("/")
        .header("host", "svc")
        .header("x-user", user)
        .body(postern_tests::empty())
        .expect("request")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn descriptor_buckets_from_xds_limit_each_header_value_apart() {
    use postern_proto::envoy::config::core::v3::RuntimeFractionalPercent;
    use postern_proto::envoy::config::route::v3::rate_limit::action::{
        ActionSpecifier, RequestHeaders,
    };
    use postern_proto::envoy::config::route::v3::rate_limit::Action;
    use postern_proto::envoy::extensions::common::ratelimit::v3::{
        rate_limit_descriptor::Entry, LocalRateLimitDescriptor,
    };
    use postern_proto::envoy::r#type::v3::FractionalPercent;
    use postern_proto::google::protobuf::Duration;
    use postern_tests::prom::scrape;
    let _recorder = postern::telemetry::install_prometheus_recorder();
    let backend = HttpBackend::start("a").await;
    let base = mesh("1", backend.addr(), HOURLY_TWO, false);
    let cp = ControlPlane::start(base.clone()).await;
    let mut events = cp.server.events();
    let proxy = proxy_for(&cp).await;

    let hour = || {
        Some(Duration {
            seconds: 3600,
            nanos: 0,
        })
    };
    let all = || {
        Some(RuntimeFractionalPercent {
            default_value: Some(FractionalPercent {
                numerator: 100,
                denominator: 0,
            }),
            runtime_key: String::new(),
        })
    };
    let limit = LocalRateLimit {
        stat_prefix: "per-user".into(),
        token_bucket: Some(TokenBucket {
            max_tokens: 100,
            tokens_per_fill: None,
            fill_interval: hour(),
        }),
        filter_enabled: all(),
        filter_enforced: all(),
        descriptors: vec![LocalRateLimitDescriptor {
            entries: vec![Entry {
                key: "user".into(),
                value: String::new(),
            }],
            token_bucket: Some(TokenBucket {
                max_tokens: 1,
                tokens_per_fill: None,
                fill_interval: hour(),
            }),
            shadow_mode: false,
        }],
        ..Default::default()
    };
    let actions = vec![Action {
        action_specifier: Some(ActionSpecifier::RequestHeaders(RequestHeaders {
            header_name: "x-user".into(),
            descriptor_key: "user".into(),
            skip_if_absent: false,
        })),
    }];
    cp.server
        .set_snapshot(with_route_limit(&base, "2", &limit, actions));
    wait_acks(&mut events, &[(type_url::ROUTE, "2")]).await;
    let addr = proxy.listener_addr("lr").expect("listener");
    let status_of = |user: &'static str| async move {
        postern_tests::send(addr, by_user(user))
            .await
            .status
            .as_u16()
    };
    assert_eq!(status_of("alice").await, 200);
    assert_eq!(status_of("alice").await, 429, "alice's own bucket is spent");
    assert_eq!(status_of("bob").await, 200, "bob has his own bucket");
    // No x-user: no descriptor, the route's default bucket alone.
    assert_eq!(status(&proxy, "/").await, 200);
    assert_eq!(
        scrape(
            proxy.admin_addr(),
            "postern_ratelimit_limited_total",
            &[("scope", "limited"), ("bucket", "descriptor:user")]
        )
        .await,
        1.0
    );
}

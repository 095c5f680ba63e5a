//! Global rate limits: the proxy asks the reference control plane's
//! rate-limit service (real tonic, real sockets) about each request's
//! descriptors and answers 429 with the service's headers when it says
//! over limit; with the service down or slow, it lets calls through or
//! refuses them as configured; and the whole setup arrives by xDS too.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, UNIX_EPOCH};

use postern_control::ads::{pack, AdsEventKind, Snapshot};
use postern_control::rls::{RateLimitServer, RateLimitsFile};
use postern_proto::envoy::config::cluster::v3 as cluster;
use postern_proto::envoy::config::core::v3 as core;
use postern_proto::envoy::config::listener::v3 as listener;
use postern_proto::envoy::config::ratelimit::v3::RateLimitServiceConfig;
use postern_proto::envoy::config::route::v3 as route;
use postern_proto::envoy::extensions::filters::http::ratelimit::v3::RateLimit as RateLimitFilter;
use postern_proto::envoy::extensions::filters::network::http_connection_manager::v3 as hcm;
use postern_proto::envoy::service::ratelimit::v3::rate_limit_service_server::{
    RateLimitService, RateLimitServiceServer,
};
use postern_proto::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use postern_proto::type_url;
use postern_tests::control::{is_nack, wait_acks, wait_event, ControlPlane};
use postern_tests::envoy::{http_listener_with_filters, static_cluster};
use postern_tests::prom::scrape;
use postern_tests::{
    dead_addr, empty, get, listener as listener_addr, request, send, start_proxy, wait_until,
    HttpBackend, Proxy, TestResponse,
};
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;

/// The reference service's windows are counted by a clock that stands
/// still, so no window ends mid-test.
const FROZEN_AT: u64 = 1_000_000;

/// Serves `routes` as plaintext gRPC on a free port.
async fn serve_grpc(routes: tonic::service::Routes) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind rls");
    let addr = listener.local_addr().expect("rls addr");
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_routes(routes)
            .serve_with_incoming(TcpIncoming::from(listener)),
    );
    addr
}

/// The control plane's rate-limit service with `limits`, on a free port.
async fn reference_rls(limits: &str) -> (SocketAddr, RateLimitServer) {
    let limits = RateLimitsFile::parse(limits).expect("limits parse");
    let server = RateLimitServer::with_clock(
        limits,
        Arc::new(|| UNIX_EPOCH + Duration::from_secs(FROZEN_AT)),
    );
    (
        serve_grpc(tonic::service::Routes::new(server.clone().into_service())).await,
        server,
    )
}

/// A rate-limit service that takes calls and never answers them.
#[derive(Clone, Copy)]
struct Stalled;

#[tonic::async_trait]
impl RateLimitService for Stalled {
    async fn should_rate_limit(
        &self,
        _: tonic::Request<RateLimitRequest>,
    ) -> Result<tonic::Response<RateLimitResponse>, tonic::Status> {
        std::future::pending().await
    }
}

const LIMITS: &str = r#"
domains:
  - domain: edge
    response_headers: [{ name: x-served-by, value: reference-rls }]
    request_headers: [{ name: x-rls-checked, value: "yes" }]
    descriptors:
      - key: user
        rate_limit: { unit: hour, requests_per_unit: 3 }
"#;

fn user_request(user: &str) -> http::Request<postern_tests::Body> {
    request("GET", "api", "/items")
        .header("x-user", user)
        .body(empty())
        .expect("request")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reference_service_limits_each_descriptor_exactly() {
    let _recorder = postern::telemetry::install_prometheus_recorder();
    let backend = HttpBackend::start("backend").await;
    let (rls_addr, rls) = reference_rls(LIMITS).await;
    let proxy = start_proxy(&format!(
        r#"
        node: {{ id: edge-1, cluster: edge }}
        listeners:
          - name: web
            address: 127.0.0.1:0
            kind: http
            http:
              rate_limit_service:
                domain: edge
                cluster: rls
                timeout: 2s
                enable_x_ratelimit_headers: true
            virtual_hosts:
              - name: all
                domains: ["*"]
                rate_limits:
                  - actions: [{{ request_headers: {{ header_name: x-user, descriptor_key: user }} }}]
                routes:
                  - name: api
                    match: {{ path: {{ prefix: / }} }}
                    cluster: backend
        clusters:
          - name: backend
            endpoints: [{{ address: "{}" }}]
          - name: rls
            protocol: http2
            endpoints: [{{ address: "{rls_addr}" }}]
        "#,
        backend.addr()
    ))
    .await;
    let addr = listener_addr(&proxy, "web");

    // Eight calls at once for one user against a limit of three.
    let calls: Vec<_> = (0..8)
        .map(|_| tokio::spawn(send(addr, user_request("alice"))))
        .collect();
    let mut responses: Vec<TestResponse> = Vec::new();
    for call in calls {
        responses.push(call.await.expect("call task"));
    }
    let (passed, refused): (Vec<_>, Vec<_>) = responses.iter().partition(|r| r.status == 200);
    assert_eq!(passed.len(), 3, "exactly the limit passes");
    assert_eq!(refused.len(), 5);
    for r in &refused {
        assert_eq!(r.status, 429, "{}", r.text());
        assert_eq!(r.header("x-envoy-ratelimited"), Some("true"));
        assert_eq!(r.header("x-served-by"), Some("reference-rls"));
        assert_eq!(r.header("x-ratelimit-limit"), Some("3, 3;w=3600"));
        assert_eq!(r.header("x-ratelimit-remaining"), Some("0"));
        // The frozen clock stands 800s before the end of its hour.
        assert_eq!(r.header("x-ratelimit-reset"), Some("800"));
    }
    let mut remaining: Vec<&str> = passed
        .iter()
        .map(|r| r.header("x-ratelimit-remaining").unwrap_or("-"))
        .collect();
    remaining.sort_unstable();
    assert_eq!(remaining, ["0", "1", "2"]);
    assert!(passed
        .iter()
        .all(|r| r.header("x-served-by") == Some("reference-rls")));
    // Calls that passed went upstream with the service's request header.
    let upstream = backend.requests();
    assert_eq!(upstream.len(), 3);
    assert!(upstream
        .iter()
        .all(|r| r.header("x-rls-checked") == Some("yes")));

    // Another user has a counter of its own.
    assert_eq!(send(addr, user_request("bob")).await.status, 200);

    // No x-user header: no descriptor, so the service is not asked.
    let asked = rls.calls();
    assert_eq!(get(addr, "api", "/items").await.status, 200);
    assert_eq!(rls.calls(), asked);

    // gRPC callers get UNAVAILABLE, as from Envoy.
    let grpc = request("POST", "api", "/pkg.Svc/Call")
        .header("x-user", "alice")
        .header("content-type", "application/grpc")
        .body(empty())
        .expect("request");
    let response = send(addr, grpc).await;
    assert_eq!(response.status, 200);
    assert_eq!(response.header("grpc-status"), Some("14"));

    // Every call that asked the service is counted by its answer.
    let admin = proxy.admin_addr();
    let count = |result: &'static str| async move {
        scrape(
            admin,
            "postern_ratelimit_global_total",
            &[("listener", "web"), ("result", result)],
        )
        .await
    };
    assert_eq!(count("ok").await, 4.0, "alice's three and bob's one");
    assert_eq!(
        count("over_limit").await,
        6.0,
        "alice's five and the gRPC call"
    );
}

fn failure_listeners(prefix: &str, service: &str, timeout: &str) -> String {
    let listener = |name: &str, deny: bool| {
        format!(
            r#"
  - name: {name}
    address: 127.0.0.1:0
    kind: http
    http:
      rate_limit_service: {{ domain: edge, address: "http://{service}", timeout: {timeout}, failure_mode_deny: {deny} }}
    virtual_hosts:
      - name: all
        domains: ["*"]
        routes:
          - name: api
            match: {{ path: {{ prefix: / }} }}
            cluster: backend
            rate_limits: [{{ actions: [{{ remote_address: {{}} }}] }}]"#
        )
    };
    format!(
        "listeners:{}{}\n",
        listener(&format!("{prefix}-open"), false),
        listener(&format!("{prefix}-closed"), true)
    )
}

async fn failure_proxy(prefix: &str, service: &str, timeout: &str) -> (Proxy, HttpBackend) {
    let backend = HttpBackend::start("backend").await;
    let yaml = format!(
        "{}clusters:\n  - name: backend\n    endpoints: [{{ address: \"{}\" }}]\n",
        failure_listeners(prefix, service, timeout),
        backend.addr()
    );
    (start_proxy(&yaml).await, backend)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_service_down_calls_pass_or_fail_as_configured() {
    let _recorder = postern::telemetry::install_prometheus_recorder();
    let (proxy, backend) = failure_proxy("down", &dead_addr().to_string(), "1s").await;
    let open = get(listener_addr(&proxy, "down-open"), "api", "/").await;
    assert_eq!(open.status, 200, "fail open: {}", open.text());
    assert_eq!(open.backend(), Some("backend"));
    let closed = get(listener_addr(&proxy, "down-closed"), "api", "/").await;
    assert_eq!(closed.status, 500);
    assert_eq!(closed.text(), "rate limit service error");
    assert_eq!(
        backend.requests().len(),
        1,
        "the refused call never went upstream"
    );
    let admin = proxy.admin_addr();
    for (listener, result) in [
        ("down-open", "failure_mode_allowed"),
        ("down-closed", "error"),
    ] {
        let counted = scrape(
            admin,
            "postern_ratelimit_global_total",
            &[("listener", listener), ("result", result)],
        )
        .await;
        assert_eq!(counted, 1.0, "{listener} {result}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_slower_than_the_timeout_counts_as_down() {
    let stalled = serve_grpc(tonic::service::Routes::new(RateLimitServiceServer::new(
        Stalled,
    )))
    .await;
    let (proxy, _backend) = failure_proxy("slow", &stalled.to_string(), "150ms").await;
    let started = Instant::now();
    let open = get(listener_addr(&proxy, "slow-open"), "api", "/").await;
    let waited = started.elapsed();
    assert_eq!(open.status, 200, "{}", open.text());
    assert!(
        waited >= Duration::from_millis(150) && waited < Duration::from_secs(3),
        "waited {waited:?}"
    );
    let closed = get(listener_addr(&proxy, "slow-closed"), "api", "/").await;
    assert_eq!(closed.status, 500);
}

// ------------------------------------------------------------------- xDS --

fn rls_cluster(addr: SocketAddr) -> cluster::Cluster {
    #[allow(deprecated)]
    cluster::Cluster {
        http2_protocol_options: Some(Default::default()),
        ..static_cluster("rls", addr, None)
    }
}

fn ratelimit_filter(request_type: &str) -> hcm::HttpFilter {
    let config = RateLimitFilter {
        domain: "mesh".into(),
        request_type: request_type.into(),
        timeout: Some(postern_proto::google::protobuf::Duration {
            seconds: 2,
            nanos: 0,
        }),
        rate_limit_service: Some(RateLimitServiceConfig {
            grpc_service: Some(core::GrpcService {
                target_specifier: Some(core::grpc_service::TargetSpecifier::EnvoyGrpc(
                    core::grpc_service::EnvoyGrpc {
                        cluster_name: "rls".into(),
                        ..Default::default()
                    },
                )),
                ..Default::default()
            }),
            transport_api_version: core::ApiVersion::V3 as i32,
        }),
        ..Default::default()
    };
    hcm::HttpFilter {
        name: "envoy.filters.http.ratelimit".into(),
        config_type: Some(hcm::http_filter::ConfigType::TypedConfig(pack(&config))),
        ..Default::default()
    }
}

/// The inline-route listener with `limits` on its virtual host.
fn limited_listener(request_type: &str, limits: Vec<route::RateLimit>) -> listener::Listener {
    let mut l = http_listener_with_filters(
        "rl",
        "127.0.0.1:0".parse().expect("addr"),
        "backend",
        None,
        vec![ratelimit_filter(request_type)],
    );
    let filter = &mut l.filter_chains[0].filters[0];
    let Some(listener::filter::ConfigType::TypedConfig(any)) = &filter.config_type else {
        unreachable!("the builder sets a typed config")
    };
    let mut manager: hcm::HttpConnectionManager =
        prost::Message::decode(any.value.as_slice()).expect("hcm decodes");
    if let Some(hcm::http_connection_manager::RouteSpecifier::RouteConfig(routes)) =
        &mut manager.route_specifier
    {
        routes.virtual_hosts[0].rate_limits = limits;
    }
    filter.config_type = Some(listener::filter::ConfigType::TypedConfig(pack(&manager)));
    l
}

fn generic_key(action: route::rate_limit::action::ActionSpecifier) -> Vec<route::RateLimit> {
    vec![route::RateLimit {
        actions: vec![route::rate_limit::Action {
            action_specifier: Some(action),
        }],
        ..Default::default()
    }]
}

fn snapshot(
    version: &str,
    l: &listener::Listener,
    backend: SocketAddr,
    rls: SocketAddr,
) -> Snapshot {
    let mut s = Snapshot::new(version);
    s.add_message("rl", l);
    s.add_message("backend", &static_cluster("backend", backend, None));
    s.add_message("rls", &rls_cluster(rls));
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_filter_and_route_actions_arrive_by_xds_and_bad_ones_are_nacked() {
    use route::rate_limit::action::{ActionSpecifier, GenericKey, QueryParameters};
    let backend = HttpBackend::start("backend").await;
    let (rls_addr, _rls) = reference_rls(
        r#"
domains:
  - domain: mesh
    descriptors:
      - key: generic_key
        value: xds
        rate_limit: { unit: hour, requests_per_unit: 2 }
"#,
    )
    .await;
    let good = limited_listener(
        "both",
        generic_key(ActionSpecifier::GenericKey(GenericKey {
            descriptor_value: "xds".into(),
            ..Default::default()
        })),
    );
    let cp = ControlPlane::start(snapshot("1", &good, backend.addr(), rls_addr)).await;
    let mut events = cp.server.events();
    let proxy = start_proxy(&format!(
        r#"
node: {{ id: "sidecar~127.0.0.1~rl.default~default.svc.cluster.local", cluster: rl }}
xds: {{ address: "{}", initial_backoff: 50ms, max_backoff: 500ms }}
"#,
        cp.url()
    ))
    .await;
    wait_acks(
        &mut events,
        &[(type_url::CLUSTER, "1"), (type_url::LISTENER, "1")],
    )
    .await;
    wait_until("listener bound", || async {
        proxy.listener_addr("rl").is_some()
    })
    .await;
    let addr = listener_addr(&proxy, "rl");
    let statuses = |n: usize| async move {
        let mut out = Vec::new();
        for _ in 0..n {
            out.push(get(addr, "svc", "/").await.status.as_u16());
        }
        out
    };
    assert_eq!(statuses(3).await, [200, 200, 429]);

    // A filter that would apply to internal requests only is refused by
    // name; the last good config keeps limiting.
    let bad_filter = limited_listener(
        "internal",
        generic_key(ActionSpecifier::GenericKey(GenericKey {
            descriptor_value: "xds".into(),
            ..Default::default()
        })),
    );
    cp.server
        .set_snapshot(snapshot("2", &bad_filter, backend.addr(), rls_addr));
    let nack = wait_event(&mut events, "listener NACK", |e| {
        is_nack(e, type_url::LISTENER)
    })
    .await;
    let AdsEventKind::Nack { error, .. } = nack.kind else {
        unreachable!()
    };
    assert!(error.contains("request_type"), "{error}");

    // So is an action Postern does not build.
    let bad_action = limited_listener(
        "both",
        generic_key(ActionSpecifier::QueryParameters(QueryParameters {
            query_parameter_name: "q".into(),
            descriptor_key: "q".into(),
            skip_if_absent: false,
        })),
    );
    cp.server
        .set_snapshot(snapshot("3", &bad_action, backend.addr(), rls_addr));
    let nack = wait_event(&mut events, "second listener NACK", |e| {
        matches!(&e.kind, AdsEventKind::Nack { version, .. } if version == "3")
            && e.type_url == type_url::LISTENER
    })
    .await;
    let AdsEventKind::Nack { error, .. } = nack.kind else {
        unreachable!()
    };
    assert!(
        error.contains("rate_limits[0].actions[0].query_parameters"),
        "{error}"
    );
    assert_eq!(
        statuses(1).await,
        [429],
        "the last good config still limits"
    );
}

/// `l` (from [`limited_listener`]) with `per_route` as its one route's
/// `RateLimitPerRoute`.
fn with_per_route(
    mut l: listener::Listener,
    per_route: &postern_proto::envoy::extensions::filters::http::ratelimit::v3::RateLimitPerRoute,
) -> listener::Listener {
    let filter = &mut l.filter_chains[0].filters[0];
    let Some(listener::filter::ConfigType::TypedConfig(any)) = &filter.config_type else {
        unreachable!("the builder sets a typed config")
    };
    let mut manager: hcm::HttpConnectionManager =
        prost::Message::decode(any.value.as_slice()).expect("hcm decodes");
    if let Some(hcm::http_connection_manager::RouteSpecifier::RouteConfig(routes)) =
        &mut manager.route_specifier
    {
        routes.virtual_hosts[0].routes[0]
            .typed_per_filter_config
            .insert("envoy.filters.http.ratelimit".into(), pack(per_route));
    }
    filter.config_type = Some(listener::filter::ConfigType::TypedConfig(pack(&manager)));
    l
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_per_route_replaces_or_ignores_the_virtual_host_descriptors() {
    use postern_proto::envoy::extensions::filters::http::ratelimit::v3::rate_limit_per_route::VhRateLimitsOptions;
    use postern_proto::envoy::extensions::filters::http::ratelimit::v3::RateLimitPerRoute;
    use route::rate_limit::action::{ActionSpecifier, GenericKey};
    let backend = HttpBackend::start("backend").await;
    // Only the per-route descriptor is limited; the virtual host's would
    // pass anyway, so a 429 proves the per-route one was sent.
    let (rls_addr, _rls) = reference_rls(
        r#"
domains:
  - domain: mesh
    descriptors:
      - key: generic_key
        value: per-route
        rate_limit: { unit: hour, requests_per_unit: 1 }
      - key: generic_key
        value: vhost
        rate_limit: { unit: hour, requests_per_unit: 1 }
"#,
    )
    .await;
    let generic = |value: &str| {
        generic_key(ActionSpecifier::GenericKey(GenericKey {
            descriptor_value: value.into(),
            ..Default::default()
        }))
    };
    let replaced = with_per_route(
        limited_listener("both", generic("vhost")),
        &RateLimitPerRoute {
            rate_limits: generic("per-route"),
            ..Default::default()
        },
    );
    let cp = ControlPlane::start(snapshot("1", &replaced, backend.addr(), rls_addr)).await;
    let mut events = cp.server.events();
    let proxy = start_proxy(&format!(
        r#"
node: {{ id: "sidecar~127.0.0.1~rl.default~default.svc.cluster.local", cluster: rl }}
xds: {{ address: "{}", initial_backoff: 50ms, max_backoff: 500ms }}
"#,
        cp.url()
    ))
    .await;
    wait_acks(
        &mut events,
        &[(type_url::CLUSTER, "1"), (type_url::LISTENER, "1")],
    )
    .await;
    let addr = listener_addr(&proxy, "rl");
    assert_eq!(get(addr, "svc", "/").await.status.as_u16(), 200);
    assert_eq!(get(addr, "svc", "/").await.status.as_u16(), 429);

    // IGNORE: the route has no descriptors of its own and the virtual
    // host's are not asked about, so nothing limits it.
    let ignored = with_per_route(
        limited_listener("both", generic("vhost")),
        &RateLimitPerRoute {
            vh_rate_limits: VhRateLimitsOptions::Ignore as i32,
            ..Default::default()
        },
    );
    cp.server
        .set_snapshot(snapshot("2", &ignored, backend.addr(), rls_addr));
    wait_acks(&mut events, &[(type_url::LISTENER, "2")]).await;
    for _ in 0..3 {
        assert_eq!(get(addr, "svc", "/").await.status.as_u16(), 200);
    }
}

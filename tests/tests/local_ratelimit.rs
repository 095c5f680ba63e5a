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

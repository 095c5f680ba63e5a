//! Dynamic config from an in-process control plane (the reference ADS
//! server): listeners, routes, clusters and endpoints pushed and followed,
//! NACKs that keep the last good config, warming, a control plane that goes
//! away and comes back, a large swap under load, and RBAC per route and
//! virtual host. State of the world and delta both.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use postern_control::ads::{AdsEventKind, Snapshot};
use postern_control::mesh::parse_mesh;
use postern_proto::envoy::config::cluster::v3 as cluster;
use postern_proto::type_url;
use postern_tests::control::{is_ack, is_nack, wait_event, ControlPlane};
use postern_tests::{eventually, get, start_proxy, wait_until, within, HttpBackend, Proxy};

/// A mesh with one HTTP listener whose routes send `/` to `cluster`, and the
/// given services (name, backend).
fn mesh(version: &str, cluster_name: &str, services: &[(&str, SocketAddr)]) -> Snapshot {
    let services: String = services
        .iter()
        .map(|(name, addr)| {
            format!("  - name: {name}\n    endpoints: [{{ address: \"{addr}\" }}]\n")
        })
        .collect();
    let yaml = format!(
        r#"
listeners:
  - name: xds-http
    address: 127.0.0.1:0
    route: main-routes
routes:
  - name: main-routes
    virtual_hosts:
      - name: all
        domains: ["*"]
        routes:
          - prefix: /
            cluster: {cluster_name}
services:
{services}"#
    );
    parse_mesh(&yaml, version).expect("mesh")
}

fn bootstrap(cp: &ControlPlane, protocol: &str) -> String {
    format!(
        r#"
node: {{ id: "sidecar~127.0.0.1~test.default~default.svc.cluster.local", cluster: test }}
xds: {{ address: "{}", protocol: {protocol}, initial_backoff: 50ms, max_backoff: 500ms }}
drain_timeout: 2s
"#,
        cp.url()
    )
}

async fn ready(proxy: &Proxy) {
    wait_until("proxy ready with the first complete config", || async {
        get(proxy.admin_addr(), "localhost", "/ready").await.status == 200
    })
    .await;
}

async fn backend_of(proxy: &Proxy) -> Option<String> {
    let addr = proxy.listener_addr("xds-http")?;
    let response = get(addr, "svc", "/").await;
    (response.status == 200).then(|| response.backend().unwrap_or_default().to_string())
}

async fn traffic_follows_pushes(protocol: &str) {
    let (a, b) = (HttpBackend::start("a").await, HttpBackend::start("b").await);
    let cp = ControlPlane::start(mesh("1", "svc-a", &[("svc-a", a.addr())])).await;
    let proxy = start_proxy(&bootstrap(&cp, protocol)).await;
    ready(&proxy).await;
    assert_eq!(backend_of(&proxy).await.as_deref(), Some("a"));

    // New cluster and a route to it.
    cp.server.set_snapshot(mesh(
        "2",
        "svc-b",
        &[("svc-a", a.addr()), ("svc-b", b.addr())],
    ));
    eventually("route follows to b", || async {
        (backend_of(&proxy).await.as_deref() == Some("b")).then_some(())
    })
    .await;

    // Endpoints change under the same cluster name.
    cp.server
        .set_snapshot(mesh("3", "svc-b", &[("svc-b", a.addr())]));
    eventually("endpoints follow to a", || async {
        (backend_of(&proxy).await.as_deref() == Some("a")).then_some(())
    })
    .await;

    // The listener goes away: it stops accepting.
    let addr = proxy.listener_addr("xds-http").expect("listener");
    let mut empty = Snapshot::new("4");
    for (name, body) in cp.server.snapshot().of_type(type_url::CLUSTER) {
        empty.add(type_url::CLUSTER, name, body.clone());
    }
    cp.server.set_snapshot(empty);
    wait_until("listener removed", || async {
        tokio::net::TcpStream::connect(addr).await.is_err()
    })
    .await;
    let dump: serde_json::Value = serde_json::from_str(
        &get(proxy.admin_addr(), "localhost", "/config_dump")
            .await
            .text(),
    )
    .expect("config_dump is JSON");
    assert!(
        dump["dynamic"]["clusters"]["svc-b"]["version"].is_string(),
        "{dump}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_follows_pushes_state_of_the_world() {
    traffic_follows_pushes("sotw").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_follows_pushes_delta() {
    traffic_follows_pushes("delta").await;
}

/// A snapshot with an extra cluster that Postern cannot take.
fn with_bad_cluster(mut snapshot: Snapshot) -> Snapshot {
    let bad = cluster::Cluster {
        name: "bad-lb".into(),
        lb_policy: cluster::cluster::LbPolicy::Maglev as i32,
        cluster_discovery_type: Some(cluster::cluster::ClusterDiscoveryType::Type(
            cluster::cluster::DiscoveryType::Eds as i32,
        )),
        ..Default::default()
    };
    snapshot.add_message("bad-lb", &bad);
    snapshot
}

async fn nack_keeps_last_good(protocol: &str) {
    let (a, b) = (HttpBackend::start("a").await, HttpBackend::start("b").await);
    let cp = ControlPlane::start(mesh("1", "svc-a", &[("svc-a", a.addr())])).await;
    let mut events = cp.server.events();
    let proxy = start_proxy(&bootstrap(&cp, protocol)).await;
    ready(&proxy).await;

    // A bad cluster next to a good one: the whole CDS update is refused,
    // so a new cluster that came with it is not there either.
    cp.server.set_snapshot(with_bad_cluster(mesh(
        "2",
        "svc-a",
        &[("svc-a", a.addr()), ("svc-b", b.addr())],
    )));
    let nack = wait_event(&mut events, "cluster NACK", |e| {
        is_nack(e, type_url::CLUSTER)
    })
    .await;
    let AdsEventKind::Nack { error, .. } = nack.kind else {
        unreachable!()
    };
    assert!(
        error.contains("bad-lb") && error.contains("lb_policy"),
        "NACK names the resource and field: {error}"
    );
    // Still on the last good config.
    for _ in 0..5 {
        assert_eq!(backend_of(&proxy).await.as_deref(), Some("a"));
    }
    let dump: serde_json::Value = serde_json::from_str(
        &get(proxy.admin_addr(), "localhost", "/config_dump")
            .await
            .text(),
    )
    .expect("config_dump is JSON");
    assert!(dump["dynamic"]["clusters"].get("svc-b").is_none(), "{dump}");
    let dump = get(proxy.admin_addr(), "localhost", "/config_dump")
        .await
        .text();
    assert!(
        dump.contains("lb_policy"),
        "last NACK in config_dump: {dump}"
    );

    // An invalid route (bad regex) is NACKed too.
    let mut bad_route = mesh("3", "svc-a", &[("svc-a", a.addr())]);
    let yaml_bad = r#"
routes:
  - name: main-routes
    virtual_hosts:
      - name: all
        domains: ["*"]
        routes:
          - regex: "(unclosed"
            cluster: svc-a
"#;
    if let Ok(bad) = parse_mesh(yaml_bad, "3") {
        for (name, body) in bad.of_type(type_url::ROUTE) {
            bad_route.add(type_url::ROUTE, name, body.clone());
        }
        cp.server.set_snapshot(bad_route);
        let nack = wait_event(&mut events, "route NACK", |e| is_nack(e, type_url::ROUTE)).await;
        assert!(matches!(nack.kind, AdsEventKind::Nack { .. }));
        assert_eq!(backend_of(&proxy).await.as_deref(), Some("a"));
    }

    // A good update after the NACKs applies.
    cp.server.set_snapshot(mesh(
        "4",
        "svc-b",
        &[("svc-a", a.addr()), ("svc-b", b.addr())],
    ));
    eventually("good update applies", || async {
        (backend_of(&proxy).await.as_deref() == Some("b")).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_resources_are_nacked_and_the_last_good_config_serves_sotw() {
    nack_keeps_last_good("sotw").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_resources_are_nacked_and_the_last_good_config_serves_delta() {
    nack_keeps_last_good("delta").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_traffic_to_a_cluster_before_its_endpoints() {
    let (a, b) = (HttpBackend::start("a").await, HttpBackend::start("b").await);
    let cp = ControlPlane::start(mesh("1", "svc-a", &[("svc-a", a.addr())])).await;
    let mut events = cp.server.events();
    let proxy = start_proxy(&bootstrap(&cp, "sotw")).await;
    ready(&proxy).await;

    // Route to svc-b, whose endpoints are held back.
    let mut held = mesh("2", "svc-b", &[("svc-a", a.addr()), ("svc-b", b.addr())]);
    let cla = held.remove(type_url::ENDPOINT, "svc-b").expect("cla");
    cp.server.set_snapshot(held.clone());
    wait_event(&mut events, "route ACK", |e| {
        is_ack(e, type_url::ROUTE, "2")
    })
    .await;
    let addr = proxy.listener_addr("xds-http").expect("listener");
    let response = get(addr, "svc", "/").await;
    assert_eq!(response.status, 503, "warming cluster gets no traffic");
    assert!(b.requests().is_empty());

    let mut complete = held;
    complete.version = "3".into();
    complete.add(type_url::ENDPOINT, "svc-b", cla);
    cp.server.set_snapshot(complete);
    eventually("svc-b warm", || async {
        (backend_of(&proxy).await.as_deref() == Some("b")).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plane_restart_keeps_traffic_and_resubscribes() {
    let (a, b) = (HttpBackend::start("a").await, HttpBackend::start("b").await);
    let mut cp = ControlPlane::start(mesh("1", "svc-a", &[("svc-a", a.addr())])).await;
    let proxy = start_proxy(&bootstrap(&cp, "sotw")).await;
    ready(&proxy).await;

    cp.stop().await;
    for _ in 0..20 {
        assert_eq!(
            backend_of(&proxy).await.as_deref(),
            Some("a"),
            "serving without a control plane"
        );
    }
    cp.restart(mesh(
        "2",
        "svc-b",
        &[("svc-a", a.addr()), ("svc-b", b.addr())],
    ))
    .await;
    eventually("resubscribed and following", || async {
        (backend_of(&proxy).await.as_deref() == Some("b")).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_routes_and_clusters_swap_under_load_without_a_lost_request() {
    const N: usize = 1000;
    let (a, b) = (HttpBackend::start("a").await, HttpBackend::start("b").await);
    let big = |version: &str, backend: SocketAddr| {
        let mut yaml = String::from(
            "listeners:\n  - name: xds-http\n    address: 127.0.0.1:0\n    route: main-routes\nroutes:\n  - name: main-routes\n    virtual_hosts:\n      - name: all\n        domains: [\"*\"]\n        routes:\n",
        );
        for i in 0..N {
            yaml.push_str(&format!(
                "          - prefix: /svc-{i}/\n            cluster: svc-{i}\n"
            ));
        }
        yaml.push_str("services:\n");
        for i in 0..N {
            yaml.push_str(&format!(
                "  - name: svc-{i}\n    endpoints: [{{ address: \"{backend}\" }}]\n"
            ));
        }
        parse_mesh(&yaml, version).expect("big mesh")
    };
    let cp = ControlPlane::start(big("1", a.addr())).await;
    let proxy = start_proxy(&bootstrap(&cp, "sotw")).await;
    ready(&proxy).await;
    let addr = proxy.listener_addr("xds-http").expect("listener");

    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let stop = Arc::new(tokio::sync::Notify::new());
    let workers: Vec<_> = (0..4)
        .map(|w| {
            let (ok, failed, stop) = (ok.clone(), failed.clone(), stop.clone());
            tokio::spawn(async move {
                let stopped = stop.notified();
                tokio::pin!(stopped);
                let mut i = w;
                loop {
                    let path = format!("/svc-{}/x", i % N);
                    tokio::select! {
                        _ = &mut stopped => break,
                        response = get(addr, "svc", &path) => {
                            if response.status == 200 { &ok } else { &failed }
                                .fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    i += 4;
                }
            })
        })
        .collect();
    // Swap every cluster's endpoints to b, then back to a, under load.
    cp.server.set_snapshot(big("2", b.addr()));
    eventually("all on b", || async {
        let r = get(addr, "svc", "/svc-999/x").await;
        (r.backend() == Some("b")).then_some(())
    })
    .await;
    cp.server.set_snapshot(big("3", a.addr()));
    eventually("all back on a", || async {
        let r = get(addr, "svc", "/svc-0/x").await;
        (r.backend() == Some("a")).then_some(())
    })
    .await;
    stop.notify_waiters();
    for worker in workers {
        worker.await.unwrap();
    }
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "requests lost during swaps"
    );
    assert!(ok.load(Ordering::Relaxed) > 100, "load ran: {ok:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_waits_for_the_first_complete_config() {
    let a = HttpBackend::start("a").await;
    // The control plane is down when the proxy starts.
    let mut cp = ControlPlane::start(Snapshot::new("0")).await;
    cp.stop().await;
    let proxy = start_proxy(&bootstrap(&cp, "sotw")).await;
    let not_ready = get(proxy.admin_addr(), "localhost", "/ready").await;
    assert_eq!(not_ready.status, 503);
    assert!(
        not_ready.text().contains("control plane"),
        "{}",
        not_ready.text()
    );

    cp.restart(mesh("1", "svc-a", &[("svc-a", a.addr())])).await;
    let mut events = cp.server.events();
    wait_event(&mut events, "listener ACK", |e| {
        is_ack(e, type_url::LISTENER, "1")
    })
    .await;
    ready(&proxy).await;
    assert_eq!(backend_of(&proxy).await.as_deref(), Some("a"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_listeners_and_endpoints_are_nacked_too() {
    use postern_proto::envoy::config::core::v3 as core;
    use postern_proto::envoy::config::endpoint::v3 as endpoint;
    use postern_proto::envoy::config::listener::v3 as listener;

    let a = HttpBackend::start("a").await;
    let good = mesh("1", "svc-a", &[("svc-a", a.addr())]);
    let cp = ControlPlane::start(good.clone()).await;
    let mut events = cp.server.events();
    let proxy = start_proxy(&bootstrap(&cp, "sotw")).await;
    ready(&proxy).await;

    // A listener with a network filter Postern does not know.
    let mut bad_listener = good.clone();
    bad_listener.version = "2".into();
    bad_listener.add_message(
        "mystery",
        &listener::Listener {
            name: "mystery".into(),
            address: Some(core::Address {
                address: Some(core::address::Address::SocketAddress(core::SocketAddress {
                    address: "127.0.0.1".into(),
                    port_specifier: Some(core::socket_address::PortSpecifier::PortValue(0)),
                    ..Default::default()
                })),
            }),
            filter_chains: vec![listener::FilterChain {
                filters: vec![listener::Filter {
                    name: "envoy.filters.network.mongo_proxy".into(),
                    config_type: Some(listener::filter::ConfigType::TypedConfig(
                        postern_proto::google::protobuf::Any {
                            type_url: "type.googleapis.com/envoy.extensions.filters.network.mongo_proxy.v3.MongoProxy".into(),
                            value: Vec::new(),
                        },
                    )),
                }],
                ..Default::default()
            }],
            ..Default::default()
        },
    );
    cp.server.set_snapshot(bad_listener);
    let nack = wait_event(&mut events, "listener NACK", |e| {
        is_nack(e, type_url::LISTENER)
    })
    .await;
    let AdsEventKind::Nack { error, .. } = nack.kind else {
        unreachable!()
    };
    assert!(
        error.contains("mystery") && error.contains("mongo_proxy"),
        "{error}"
    );
    assert_eq!(backend_of(&proxy).await.as_deref(), Some("a"));

    // Endpoints named by DNS, which Postern does not resolve (yet).
    let mut bad_endpoints = good;
    bad_endpoints.version = "3".into();
    bad_endpoints.add_message(
        "svc-a",
        &endpoint::ClusterLoadAssignment {
            cluster_name: "svc-a".into(),
            endpoints: vec![endpoint::LocalityLbEndpoints {
                lb_endpoints: vec![endpoint::LbEndpoint {
                    host_identifier: Some(endpoint::lb_endpoint::HostIdentifier::Endpoint(
                        endpoint::Endpoint {
                            address: Some(core::Address {
                                address: Some(core::address::Address::SocketAddress(
                                    core::SocketAddress {
                                        address: "svc-a.shop.svc.cluster.local".into(),
                                        port_specifier: Some(
                                            core::socket_address::PortSpecifier::PortValue(80),
                                        ),
                                        ..Default::default()
                                    },
                                )),
                            }),
                            ..Default::default()
                        },
                    )),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        },
    );
    cp.server.set_snapshot(bad_endpoints);
    let nack = wait_event(&mut events, "endpoint NACK", |e| {
        is_nack(e, type_url::ENDPOINT)
    })
    .await;
    let AdsEventKind::Nack { error, .. } = nack.kind else {
        unreachable!()
    };
    assert!(
        error.contains("svc-a") && error.contains("not an IP address"),
        "{error}"
    );
    assert_eq!(backend_of(&proxy).await.as_deref(), Some("a"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rbac_filter_from_xds_is_enforced_and_bad_ones_nacked() {
    use postern_proto::envoy::config::rbac::v3 as rbac;
    use postern_proto::envoy::r#type::matcher::v3 as matcher;
    use postern_tests::envoy::{http_listener_with_filters, rbac_filter, static_cluster};

    let a = HttpBackend::start("a").await;
    let deny_admin = |condition: bool| rbac::Rbac {
        action: rbac::rbac::Action::Deny as i32,
        policies: [(
            "no-admin".to_string(),
            rbac::Policy {
                permissions: vec![rbac::Permission {
                    rule: Some(rbac::permission::Rule::UrlPath(matcher::PathMatcher {
                        rule: Some(matcher::path_matcher::Rule::Path(matcher::StringMatcher {
                            match_pattern: Some(matcher::string_matcher::MatchPattern::Prefix(
                                "/admin/".into(),
                            )),
                            ignore_case: false,
                        })),
                    })),
                }],
                principals: vec![rbac::Principal {
                    identifier: Some(rbac::principal::Identifier::Any(true)),
                }],
                condition: condition.then(Default::default),
                ..Default::default()
            },
        )]
        .into_iter()
        .collect(),
        ..Default::default()
    };
    let snapshot = |version: &str, condition: bool| {
        let mut s = Snapshot::new(version);
        s.add_message(
            "xds-http",
            &http_listener_with_filters(
                "xds-http",
                "127.0.0.1:0".parse().unwrap(),
                "app",
                None,
                vec![rbac_filter(deny_admin(condition))],
            ),
        );
        s.add_message("app", &static_cluster("app", a.addr(), None));
        s
    };
    let cp = ControlPlane::start(snapshot("1", false)).await;
    let mut events = cp.server.events();
    let proxy = start_proxy(&bootstrap(&cp, "sotw")).await;
    ready(&proxy).await;
    let addr = proxy.listener_addr("xds-http").expect("listener");
    assert_eq!(get(addr, "svc", "/ok").await.status, 200);
    for path in ["/admin/x", "//admin/x", "/public/../admin/x", "/%61dmin/x"] {
        assert_eq!(get(addr, "svc", path).await.status, 403, "{path}");
    }
    assert_eq!(a.requests().len(), 1, "denied calls never reach the app");

    // A CEL condition is not supported: NACKed, the old rules stay.
    cp.server.set_snapshot(snapshot("2", true));
    let nack = wait_event(&mut events, "listener NACK", |e| {
        is_nack(e, type_url::LISTENER)
    })
    .await;
    let AdsEventKind::Nack { error, .. } = nack.kind else {
        unreachable!()
    };
    assert!(error.contains("condition"), "{error}");
    assert_eq!(get(addr, "svc", "/admin/x").await.status, 403);

    // A policy change applies in place: a connection opened before it is
    // kept and sees the new policy.
    let mut kept = postern_tests::H1Conn::connect(addr).await.expect("connect");
    let ask = |path: &str| {
        http::Request::get(path)
            .header("host", "svc")
            .body(postern_tests::empty())
            .unwrap()
    };
    assert_eq!(
        kept.send(ask("/admin/x")).await.expect("exchange").status,
        403
    );
    assert_eq!(
        kept.send(ask("/ok"))
            .await
            .expect("keep-alive after 403")
            .status,
        200
    );
    let mut open = Snapshot::new("3");
    open.add_message(
        "xds-http",
        &http_listener_with_filters(
            "xds-http",
            "127.0.0.1:0".parse().unwrap(),
            "app",
            None,
            Vec::new(),
        ),
    );
    open.add_message("app", &static_cluster("app", a.addr(), None));
    cp.server.set_snapshot(open);
    wait_event(&mut events, "listener ACK", |e| {
        is_ack(e, type_url::LISTENER, "3")
    })
    .await;
    assert_eq!(proxy.listener_addr("xds-http"), Some(addr), "not rebound");
    assert_eq!(
        kept.send(ask("/admin/x"))
            .await
            .expect("same connection")
            .status,
        200
    );
    assert_eq!(proxy.listener_addr("xds-http"), Some(addr), "not rebound");
}

/// An inbound capture listener (Istio's `virtualInbound` shape: the
/// `original_dst` listener filter, one TCP chain for every port) whose chain
/// names `cluster`.
fn virtual_inbound(cluster_name: &str) -> postern_proto::envoy::config::listener::v3::Listener {
    use postern_proto::envoy::config::core::v3 as core;
    use postern_proto::envoy::config::listener::v3 as listener;
    let mut inbound = postern_tests::envoy::tcp_listener(
        "virtualInbound",
        SocketAddr::from(([127, 0, 0, 1], 0)),
        cluster_name,
    );
    inbound.traffic_direction = core::TrafficDirection::Inbound as i32;
    inbound.listener_filters = vec![listener::ListenerFilter {
        name: "envoy.filters.listener.original_dst".into(),
        ..Default::default()
    }];
    inbound
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_capture_chains_must_lead_to_the_app() {
    let a = HttpBackend::start("a").await;
    let good = mesh("1", "svc-a", &[("svc-a", a.addr())]);
    let cp = ControlPlane::start(good.clone()).await;
    let mut events = cp.server.events();
    let proxy = start_proxy(&bootstrap(&cp, "sotw")).await;
    ready(&proxy).await;

    // A chain for every port that names an ordinary cluster (svc-a, on a
    // port of its own): calls would go somewhere other than where Postern's
    // inbound side sends them. NACKed, naming listener, field and cluster.
    let mut wrong = good.clone();
    wrong.version = "2".into();
    wrong.add_message("virtualInbound", &virtual_inbound("svc-a"));
    cp.server.set_snapshot(wrong);
    let nack = wait_event(&mut events, "listener NACK", |e| {
        is_nack(e, type_url::LISTENER)
    })
    .await;
    let AdsEventKind::Nack { error, .. } = nack.kind else {
        unreachable!()
    };
    assert!(
        error.contains(
            "virtualInbound: filter_chains[0].filters[0].cluster: \"svc-a\" is not an ORIGINAL_DST cluster"
        ),
        "{error}"
    );
    assert!(proxy.listener_addr("virtualInbound").is_none());

    // With an ORIGINAL_DST cluster it is accepted and bound.
    let mut passthrough = good.clone();
    passthrough.version = "3".into();
    passthrough.add_message(
        "virtualInbound",
        &virtual_inbound("InboundPassthroughClusterIpv4"),
    );
    passthrough.add_message(
        "InboundPassthroughClusterIpv4",
        &cluster::Cluster {
            name: "InboundPassthroughClusterIpv4".into(),
            cluster_discovery_type: Some(cluster::cluster::ClusterDiscoveryType::Type(
                cluster::cluster::DiscoveryType::OriginalDst as i32,
            )),
            lb_policy: cluster::cluster::LbPolicy::ClusterProvided as i32,
            ..Default::default()
        },
    );
    cp.server.set_snapshot(passthrough);
    wait_event(&mut events, "listener ACK", |e| {
        is_ack(e, type_url::LISTENER, "3")
    })
    .await;
    eventually("the inbound capture listener is bound", || async {
        proxy.listener_addr("virtualInbound").map(|_| ())
    })
    .await;
    assert_eq!(backend_of(&proxy).await.as_deref(), Some("a"));
}

/// A listener whose RBAC filter denies `/admin`, and whose one virtual host
/// overrides it per route: `vhost_rbac` for routes without their own,
/// RBAC off on `/admin/open`, and `team_config` on `/admin/team`; with
/// `filters_before_rbac`, those filters are listed ahead of the RBAC filter.
fn per_route_rbac_listener(
    team_config: postern_proto::google::protobuf::Any,
    filters_before_rbac: Vec<
        postern_proto::envoy::extensions::filters::network::http_connection_manager::v3::HttpFilter,
    >,
) -> postern_proto::envoy::config::listener::v3::Listener {
    use postern_control::ads::pack;
    use postern_proto::envoy::config::listener::v3 as listener;
    use postern_proto::envoy::config::rbac::v3 as rbac;
    use postern_proto::envoy::config::route::v3 as route;
    use postern_proto::envoy::extensions::filters::http::rbac::v3 as rbac_filter;
    use postern_proto::envoy::extensions::filters::http::router::v3::Router;
    use postern_proto::envoy::extensions::filters::network::http_connection_manager::v3 as hcm;
    use postern_proto::envoy::r#type::matcher::v3 as matcher;

    let exact = |value: &str| matcher::StringMatcher {
        match_pattern: Some(matcher::string_matcher::MatchPattern::Exact(value.into())),
        ignore_case: false,
    };
    let rules = |action: rbac::rbac::Action, name: &str, permission, principal| rbac::Rbac {
        action: action as i32,
        policies: [(
            name.to_string(),
            rbac::Policy {
                permissions: vec![rbac::Permission {
                    rule: Some(permission),
                }],
                principals: vec![rbac::Principal {
                    identifier: Some(principal),
                }],
                ..Default::default()
            },
        )]
        .into_iter()
        .collect(),
        ..Default::default()
    };
    let anyone = || rbac::principal::Identifier::Any(true);
    let no_admin = rules(
        rbac::rbac::Action::Deny,
        "no-admin",
        rbac::permission::Rule::UrlPath(matcher::PathMatcher {
            rule: Some(matcher::path_matcher::Rule::Path(matcher::StringMatcher {
                match_pattern: Some(matcher::string_matcher::MatchPattern::Prefix(
                    "/admin".into(),
                )),
                ignore_case: false,
            })),
        }),
        anyone(),
    );
    let vhost_no_post = rules(
        rbac::rbac::Action::Deny,
        "vh-no-post",
        rbac::permission::Rule::NotRule(Box::new(rbac::Permission {
            rule: Some(rbac::permission::Rule::Header(route::HeaderMatcher {
                name: ":method".into(),
                header_match_specifier: Some(
                    route::header_matcher::HeaderMatchSpecifier::StringMatch(exact("GET")),
                ),
                ..Default::default()
            })),
        })),
        anyone(),
    );
    let per_route = |rules: Option<rbac::Rbac>| {
        pack(&rbac_filter::RbacPerRoute {
            rbac: rules.map(|rules| rbac_filter::Rbac {
                rules: Some(rules),
                ..Default::default()
            }),
        })
    };
    let to_app =
        |prefix: &str, config: Option<postern_proto::google::protobuf::Any>| route::Route {
            r#match: Some(route::RouteMatch {
                path_specifier: Some(route::route_match::PathSpecifier::Prefix(prefix.into())),
                ..Default::default()
            }),
            action: Some(route::route::Action::Route(route::RouteAction {
                cluster_specifier: Some(route::route_action::ClusterSpecifier::Cluster(
                    "app".into(),
                )),
                ..Default::default()
            })),
            typed_per_filter_config: config
                .map(|c| ("envoy.filters.http.rbac".to_string(), c))
                .into_iter()
                .collect(),
            ..Default::default()
        };
    let routes = route::RouteConfiguration {
        name: "rbac-routes".into(),
        virtual_hosts: vec![route::VirtualHost {
            name: "all".into(),
            domains: vec!["*".into()],
            routes: vec![
                to_app("/admin/open", Some(per_route(None))),
                to_app("/admin/team", Some(team_config)),
                to_app("/", None),
            ],
            typed_per_filter_config: [(
                "envoy.filters.http.rbac".to_string(),
                per_route(Some(vhost_no_post)),
            )]
            .into_iter()
            .collect(),
            ..Default::default()
        }],
        ..Default::default()
    };
    let filter = |name: &str, config: postern_proto::google::protobuf::Any| hcm::HttpFilter {
        name: name.into(),
        config_type: Some(hcm::http_filter::ConfigType::TypedConfig(config)),
        ..Default::default()
    };
    let manager = hcm::HttpConnectionManager {
        stat_prefix: "rbac".into(),
        route_specifier: Some(hcm::http_connection_manager::RouteSpecifier::RouteConfig(
            routes,
        )),
        http_filters: filters_before_rbac
            .into_iter()
            .chain([
                filter(
                    "envoy.filters.http.rbac",
                    pack(&rbac_filter::Rbac {
                        rules: Some(no_admin),
                        ..Default::default()
                    }),
                ),
                filter("envoy.filters.http.router", pack(&Router::default())),
            ])
            .collect(),
        ..Default::default()
    };
    let mut out = postern_tests::envoy::http_listener(
        "rbac-routes",
        "127.0.0.1:0".parse().expect("address"),
        "app",
        None,
    );
    out.filter_chains = vec![listener::FilterChain {
        filters: vec![listener::Filter {
            name: "envoy.filters.network.http_connection_manager".into(),
            config_type: Some(listener::filter::ConfigType::TypedConfig(pack(&manager))),
        }],
        ..Default::default()
    }];
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rbac_per_route_from_xds_replaces_the_listeners_and_bad_overrides_are_nacked() {
    use postern_control::ads::pack;
    use postern_proto::envoy::config::rbac::v3 as rbac;
    use postern_proto::envoy::config::route::v3 as route;
    use postern_proto::envoy::extensions::filters::http::rbac::v3 as rbac_filter;
    use postern_proto::envoy::r#type::matcher::v3 as matcher;
    use postern_tests::envoy::static_cluster;

    let app = HttpBackend::start("app").await;
    let blue_team = pack(&rbac_filter::RbacPerRoute {
        rbac: Some(rbac_filter::Rbac {
            rules: Some(rbac::Rbac {
                action: rbac::rbac::Action::Allow as i32,
                policies: [(
                    "blue-team".to_string(),
                    rbac::Policy {
                        permissions: vec![rbac::Permission {
                            rule: Some(rbac::permission::Rule::Any(true)),
                        }],
                        principals: vec![rbac::Principal {
                            identifier: Some(rbac::principal::Identifier::Header(
                                route::HeaderMatcher {
                                    name: "x-team".into(),
                                    header_match_specifier: Some(
                                        route::header_matcher::HeaderMatchSpecifier::StringMatch(
                                            matcher::StringMatcher {
                                                match_pattern: Some(
                                                    matcher::string_matcher::MatchPattern::Exact(
                                                        "blue".into(),
                                                    ),
                                                ),
                                                ignore_case: false,
                                            },
                                        ),
                                    ),
                                    ..Default::default()
                                },
                            )),
                        }],
                        ..Default::default()
                    },
                )]
                .into_iter()
                .collect(),
                ..Default::default()
            }),
            ..Default::default()
        }),
    });
    let snapshot = |version: &str, team: postern_proto::google::protobuf::Any, before| {
        let mut s = Snapshot::new(version);
        s.add_message("rbac-routes", &per_route_rbac_listener(team, before));
        s.add_message("app", &static_cluster("app", app.addr(), None));
        s
    };
    let cp = ControlPlane::start(snapshot("1", blue_team.clone(), Vec::new())).await;
    let mut events = cp.server.events();
    let proxy = start_proxy(&bootstrap(&cp, "sotw")).await;
    ready(&proxy).await;
    let addr = proxy.listener_addr("rbac-routes").expect("listener");
    let call = |method: &str, path: &str, team: Option<&str>| {
        let mut builder = postern_tests::request(method, "svc", path);
        if let Some(team) = team {
            builder = builder.header("x-team", team);
        }
        let request = builder.body(postern_tests::empty()).unwrap();
        async move { postern_tests::send(addr, request).await.status }
    };
    let check = || async {
        // The virtual host's override replaces the listener's deny of
        // /admin, and refuses what the listener allowed.
        assert_eq!(call("GET", "/admin/x", None).await, 200);
        assert_eq!(call("POST", "/x", None).await, 403);
        // The route's own wins over the virtual host's.
        assert_eq!(call("GET", "/admin/team/x", None).await, 403);
        assert_eq!(call("POST", "/admin/team/x", Some("blue")).await, 200);
        // RBAC off on this route.
        assert_eq!(call("POST", "/admin/open/x", None).await, 200);
    };
    check().await;

    // Turning a filter on per route by name alone is refused by name; the
    // last good routes keep their policies.
    let re_enable = pack(&route::FilterConfig {
        config: None,
        is_optional: false,
        disabled: false,
    });
    cp.server.set_snapshot(snapshot("2", re_enable, Vec::new()));
    let nack = wait_event(&mut events, "listener NACK", |e| {
        is_nack(e, type_url::LISTENER)
    })
    .await;
    let AdsEventKind::Nack { error, .. } = nack.kind else {
        unreachable!()
    };
    assert!(
        error.contains("typed_per_filter_config[envoy.filters.http.rbac]: re-enabling a filter per route is not supported"),
        "{error}"
    );
    check().await;

    // So is a local rate limit listed before RBAC: Postern would run it after.
    let local = postern_proto::envoy::extensions::filters::network::http_connection_manager::v3::HttpFilter {
        name: "early-limit".into(),
        config_type: Some(
            postern_proto::envoy::extensions::filters::network::http_connection_manager::v3::http_filter::ConfigType::TypedConfig(
                pack(&postern_proto::envoy::extensions::filters::http::local_ratelimit::v3::LocalRateLimit {
                    stat_prefix: "early".into(),
                    ..Default::default()
                }),
            ),
        ),
        ..Default::default()
    };
    cp.server
        .set_snapshot(snapshot("3", blue_team.clone(), vec![local]));
    let nack = wait_event(&mut events, "second listener NACK", |e| {
        matches!(&e.kind, AdsEventKind::Nack { version, .. } if version == "3")
            && e.type_url == type_url::LISTENER
    })
    .await;
    let AdsEventKind::Nack { error, .. } = nack.kind else {
        unreachable!()
    };
    assert!(
        error.contains(
            "envoy.filters.http.rbac (rbac) is listed after early-limit (local_ratelimit)"
        ),
        "{error}"
    );
    check().await;
    assert_eq!(
        proxy.listener_addr("rbac-routes"),
        Some(addr),
        "not rebound"
    );
}

/// `snapshot` with its listener replaced by one on `addr` whose inline
/// routes send everything to `cluster`; `header_kb` sets the connection
/// manager's request-header limit and `backlog` the listen backlog, each of
/// which changes the listener's shape.
fn with_fixed_listener(
    mut snapshot: Snapshot,
    addr: SocketAddr,
    cluster_name: &str,
    header_kb: Option<u32>,
    backlog: Option<u32>,
) -> Snapshot {
    use postern_proto::envoy::config::listener::v3 as listener;
    use postern_proto::envoy::extensions::filters::network::http_connection_manager::v3 as hcm;
    let mut l = postern_tests::envoy::http_listener("xds-http", addr, cluster_name, None);
    l.tcp_backlog_size =
        backlog.map(|value| postern_proto::google::protobuf::UInt32Value { value });
    let filter = &mut l.filter_chains[0].filters[0];
    let Some(listener::filter::ConfigType::TypedConfig(any)) = &filter.config_type else {
        unreachable!("http_listener packs its connection manager")
    };
    let mut manager: hcm::HttpConnectionManager =
        prost::Message::decode(any.value.as_slice()).expect("connection manager");
    manager.max_request_headers_kb =
        header_kb.map(|value| postern_proto::google::protobuf::UInt32Value { value });
    filter.config_type = Some(listener::filter::ConfigType::TypedConfig(
        postern_control::ads::pack(&manager),
    ));
    snapshot.remove(type_url::LISTENER, "xds-http");
    snapshot.add_message("xds-http", &l);
    snapshot
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_replaced_on_its_fixed_port_never_refuses_a_connection() {
    use http_body_util::{BodyExt, StreamBody};
    use postern_tests::client::{request, BoxError, H1Conn};

    let (a, b) = (HttpBackend::start("a").await, HttpBackend::start("b").await);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port");
    let services = [("svc-a", a.addr()), ("svc-b", b.addr())];
    let cp = ControlPlane::start(with_fixed_listener(
        mesh("1", "svc-a", &services),
        port,
        "svc-a",
        None,
        None,
    ))
    .await;
    let mut events = cp.server.events();
    // Long enough that the drain never cuts the held request short.
    let yaml = bootstrap(&cp, "sotw").replace("drain_timeout: 2s", "drain_timeout: 60s");
    let proxy = start_proxy(&yaml).await;
    ready(&proxy).await;
    assert_eq!(proxy.listener_addr("xds-http"), Some(port));

    // A request in flight on the old config: its body is held back.
    let (tx, rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(1);
    let frames = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|chunk| (Ok::<_, BoxError>(hyper::body::Frame::data(chunk)), rx))
    });
    let held = request("POST", "svc", "/held")
        .body(BodyExt::boxed(StreamBody::new(frames)))
        .expect("request");
    let mut conn = H1Conn::connect(port).await.expect("connect");
    let in_flight = tokio::spawn(async move { conn.send(held).await });
    tx.send(bytes::Bytes::from_static(b"first"))
        .await
        .expect("body");
    wait_until("the held request reached a", || async {
        a.in_flight() == 1
    })
    .await;

    // New connections, one request each, all through the change: the
    // stream ends once the new config answers it (or fails).
    let stream = tokio::spawn({
        async move {
            let mut served = Vec::new();
            let mut failures = Vec::new();
            while served.last().is_none_or(|b| b != "b") && failures.is_empty() {
                let exchange = async {
                    let mut conn = H1Conn::connect(port).await?;
                    conn.send(request("GET", "svc", "/").body(postern_tests::client::empty())?)
                        .await
                };
                match exchange.await {
                    Ok(response) if response.status == 200 => {
                        served.push(response.backend().unwrap_or_default().to_string());
                    }
                    Ok(response) => failures.push(format!("status {}", response.status)),
                    Err(err) => failures.push(format!("{err:#}")),
                }
            }
            (served, failures)
        }
    });

    // The shape changes (header limit, and the backlog set again on the
    // inherited socket) along with the routes (to b).
    cp.server.set_snapshot(with_fixed_listener(
        mesh("2", "svc-a", &services),
        port,
        "svc-b",
        Some(1),
        Some(4096),
    ));
    wait_event(&mut events, "listener ACK", |e| {
        is_ack(e, type_url::LISTENER, "2")
    })
    .await;
    let (served, failures) = within(
        std::time::Duration::from_secs(30),
        "the connection stream reaching b",
        stream,
    )
    .await
    .expect("connection stream");
    assert!(
        failures.is_empty(),
        "every connection is served: {failures:?}"
    );
    assert!(served.iter().any(|b| b == "b"), "{served:?}");

    // The held request finishes on the old config.
    tx.send(bytes::Bytes::from_static(b" last"))
        .await
        .expect("body");
    drop(tx);
    let response = in_flight.await.expect("task").expect("held request");
    assert_eq!(response.status, 200);
    assert_eq!(response.backend(), Some("a"));

    // The new listener is the one serving: its header limit applies.
    let big = request("GET", "svc", "/")
        .header("x-big", "x".repeat(2048))
        .body(postern_tests::client::empty())
        .expect("request");
    assert_eq!(postern_tests::send(port, big).await.status, 431);
    assert_eq!(proxy.listener_addr("xds-http"), Some(port));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_that_cannot_bind_is_not_kept_for_the_next_update() {
    let (a, b) = (HttpBackend::start("a").await, HttpBackend::start("b").await);
    let cp = ControlPlane::start(mesh("1", "svc-a", &[("svc-a", a.addr())])).await;
    let mut events = cp.server.events();
    let proxy = start_proxy(&bootstrap(&cp, "sotw")).await;
    ready(&proxy).await;

    // Another process holds this port: the listener passes validation but
    // cannot start.
    let holder = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let taken = holder.local_addr().expect("addr");
    let with_taken = |mut snapshot: Snapshot| {
        snapshot.add_message(
            "taken",
            &postern_tests::envoy::http_listener("taken", taken, "svc-a", None),
        );
        snapshot
    };
    cp.server
        .set_snapshot(with_taken(mesh("2", "svc-a", &[("svc-a", a.addr())])));
    let nack = wait_event(&mut events, "listener NACK", |e| {
        is_nack(e, type_url::LISTENER)
    })
    .await;
    let AdsEventKind::Nack { error, .. } = nack.kind else {
        unreachable!()
    };
    assert!(error.contains("taken"), "{error}");

    // An update of another type is not refused for the listener's sake.
    cp.server.set_snapshot(with_taken(mesh(
        "3",
        "svc-b",
        &[("svc-a", a.addr()), ("svc-b", b.addr())],
    )));
    wait_event(&mut events, "cluster ACK", |e| {
        is_ack(e, type_url::CLUSTER, "3")
    })
    .await;
    eventually("route follows to b", || async {
        (backend_of(&proxy).await.as_deref() == Some("b")).then_some(())
    })
    .await;
    assert_eq!(proxy.listener_addr("taken"), None);
    drop(holder);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nack_found_checking_the_whole_config_names_the_bad_resource_only() {
    let (a, b) = (HttpBackend::start("a").await, HttpBackend::start("b").await);
    let services = [("svc-a", a.addr()), ("svc-b", b.addr())];
    let cp = ControlPlane::start(mesh("1", "svc-a", &services)).await;
    let mut events = cp.server.events();
    let proxy = start_proxy(&bootstrap(&cp, "sotw")).await;
    ready(&proxy).await;

    // Translates fine; only the check of the assembled config finds the
    // zero connection limit.
    let mut bad = postern_tests::envoy::static_cluster("zero-limit", b.addr(), None);
    bad.circuit_breakers = Some(cluster::CircuitBreakers {
        thresholds: vec![cluster::circuit_breakers::Thresholds {
            max_connections: Some(postern_proto::google::protobuf::UInt32Value { value: 0 }),
            ..Default::default()
        }],
        ..Default::default()
    });
    let mut with_bad = mesh("2", "svc-a", &services);
    with_bad.add_message("zero-limit", &bad);
    cp.server.set_snapshot(with_bad);
    let nack = wait_event(&mut events, "cluster NACK", |e| {
        is_nack(e, type_url::CLUSTER)
    })
    .await;
    let AdsEventKind::Nack { error, .. } = nack.kind else {
        unreachable!()
    };
    assert!(
        error.contains("zero-limit: circuit_breaker.max_connections"),
        "the NACK names the cluster and its field: {error}"
    );
    assert!(
        !error.contains("svc-a") && !error.contains("svc-b") && !error.contains("clusters["),
        "only the bad cluster is named: {error}"
    );
    let nacks = || async {
        let dump: serde_json::Value = serde_json::from_str(
            &get(proxy.admin_addr(), "localhost", "/config_dump")
                .await
                .text(),
        )
        .expect("config_dump is JSON");
        dump["dynamic"]["last_nack_by_resource"].clone()
    };
    let pending = nacks().await;
    let names: Vec<&String> = pending.as_object().expect("a map").keys().collect();
    assert_eq!(names, ["zero-limit"], "{pending}");

    // Fixed: the entry goes.
    cp.server.set_snapshot(mesh("3", "svc-a", &services));
    wait_event(&mut events, "cluster ACK", |e| {
        is_ack(e, type_url::CLUSTER, "3")
    })
    .await;
    wait_until("the NACK entry is cleared", || async {
        nacks().await.as_object().is_some_and(|m| m.is_empty())
    })
    .await;
}

/// A mesh whose listener takes its routes from `listener_routes`, with
/// `main-routes` (to `svc-a`) and, if `new_routes`, `new-routes` (to
/// `svc-b`).
fn mesh_with_rds(
    version: &str,
    listener_routes: &str,
    new_routes: bool,
    services: &[(&str, SocketAddr)],
) -> Snapshot {
    let services: String = services
        .iter()
        .map(|(name, addr)| {
            format!("  - name: {name}\n    endpoints: [{{ address: \"{addr}\" }}]\n")
        })
        .collect();
    // The mesh file insists that every named route exists: it is written
    // and then taken out of the snapshot.
    let extra = "  - name: new-routes\n    virtual_hosts:\n      - name: all\n        domains: [\"*\"]\n        routes:\n          - prefix: /\n            cluster: svc-b\n";
    let yaml = format!(
        r#"
listeners:
  - name: xds-http
    address: 127.0.0.1:0
    route: {listener_routes}
routes:
  - name: main-routes
    virtual_hosts:
      - name: all
        domains: ["*"]
        routes:
          - prefix: /
            cluster: svc-a
{extra}services:
{services}"#
    );
    let mut snapshot = parse_mesh(&yaml, version).expect("mesh");
    if !new_routes {
        snapshot.remove(type_url::ROUTE, "new-routes");
    }
    snapshot
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_keeps_its_old_routes_until_its_new_ones_arrive() {
    let (a, b) = (HttpBackend::start("a").await, HttpBackend::start("b").await);
    let services = [("svc-a", a.addr()), ("svc-b", b.addr())];
    let cp = ControlPlane::start(mesh_with_rds("1", "main-routes", false, &services)).await;
    let mut events = cp.server.events();
    let proxy = start_proxy(&bootstrap(&cp, "sotw")).await;
    ready(&proxy).await;
    let addr = proxy.listener_addr("xds-http").expect("listener");
    assert_eq!(backend_of(&proxy).await.as_deref(), Some("a"));

    // The listener now names routes the control plane has not sent.
    cp.server
        .set_snapshot(mesh_with_rds("2", "new-routes", false, &services));
    wait_event(&mut events, "listener ACK", |e| {
        is_ack(e, type_url::LISTENER, "2")
    })
    .await;
    for _ in 0..5 {
        let response = get(addr, "svc", "/").await;
        assert_eq!(response.backend(), Some("a"), "old routes keep serving");
    }
    assert_eq!(proxy.listener_addr("xds-http"), Some(addr));

    // They arrive: traffic follows.
    cp.server
        .set_snapshot(mesh_with_rds("3", "new-routes", true, &services));
    eventually("traffic follows the new routes", || async {
        (backend_of(&proxy).await.as_deref() == Some("b")).then_some(())
    })
    .await;
    assert_eq!(proxy.listener_addr("xds-http"), Some(addr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_keeps_its_old_endpoints_until_its_new_ones_arrive() {
    use postern_proto::envoy::config::endpoint::v3::ClusterLoadAssignment;
    let (a, b) = (HttpBackend::start("a").await, HttpBackend::start("b").await);
    let services = [("svc-a", a.addr()), ("svc-b", b.addr())];
    let cp = ControlPlane::start(mesh("1", "svc-a", &services)).await;
    let mut events = cp.server.events();
    let proxy = start_proxy(&bootstrap(&cp, "sotw")).await;
    ready(&proxy).await;
    assert_eq!(backend_of(&proxy).await.as_deref(), Some("a"));

    // `svc-a` now takes its endpoints from `svc-a-v2`, not sent yet.
    let renamed = |version: &str, with_endpoints: bool| {
        let mut snapshot = mesh(version, "svc-a", &services);
        let body = snapshot
            .remove(type_url::CLUSTER, "svc-a")
            .expect("svc-a cluster");
        let mut c: cluster::Cluster =
            prost::Message::decode(body.value.as_slice()).expect("cluster");
        c.eds_cluster_config = Some(cluster::cluster::EdsClusterConfig {
            service_name: "svc-a-v2".into(),
            ..c.eds_cluster_config.unwrap_or_default()
        });
        snapshot.add_message("svc-a", &c);
        if with_endpoints {
            let body = snapshot
                .of_type(type_url::ENDPOINT)
                .find(|(name, _)| *name == "svc-b")
                .map(|(_, body)| body.clone())
                .expect("svc-b endpoints");
            let mut cla: ClusterLoadAssignment =
                prost::Message::decode(body.value.as_slice()).expect("assignment");
            cla.cluster_name = "svc-a-v2".into();
            snapshot.add_message("svc-a-v2", &cla);
        }
        snapshot
    };
    cp.server.set_snapshot(renamed("2", false));
    wait_event(&mut events, "cluster ACK", |e| {
        is_ack(e, type_url::CLUSTER, "2")
    })
    .await;
    for _ in 0..5 {
        assert_eq!(
            backend_of(&proxy).await.as_deref(),
            Some("a"),
            "the old endpoints keep serving"
        );
    }

    // They arrive: traffic follows.
    cp.server.set_snapshot(renamed("3", true));
    eventually("traffic follows the new endpoints", || async {
        (backend_of(&proxy).await.as_deref() == Some("b")).then_some(())
    })
    .await;
}

//! Header mutations at every route-table level (Envoy's precedence, on
//! forwarded calls, direct responses and local replies), and clusters whose
//! endpoints are DNS names, from the static config and from xDS.

use std::net::SocketAddr;

use postern_control::ads::{pack, AdsEventKind, Snapshot};
use postern_proto::envoy::config::cluster::v3 as cluster;
use postern_proto::envoy::config::core::v3 as core;
use postern_proto::envoy::config::endpoint::v3 as endpoint;
use postern_proto::envoy::config::listener::v3 as listener;
use postern_proto::envoy::config::route::v3 as route;
use postern_proto::envoy::extensions::filters::network::http_connection_manager::v3 as hcm;
use postern_proto::google::protobuf::Duration as PbDuration;
use postern_proto::type_url;
use postern_tests::control::{is_ack, is_nack, wait_event, ControlPlane};
use postern_tests::envoy::http_listener;
use postern_tests::prom::scrape;
use postern_tests::{
    dead_addr, empty, get, listener as listener_addr, request, send, start_proxy, wait_until,
    HttpBackend, TestResponse,
};

fn values(response: &TestResponse, name: &str) -> Vec<String> {
    response
        .headers
        .get_all(name)
        .iter()
        .map(|v| v.to_str().unwrap_or("").to_string())
        .collect()
}

/// Two listeners with the same routes: `default` applies the least specific
/// level last (Envoy's default), `specific` sets
/// `most_specific_header_mutations_wins`.
fn levels_config(app: SocketAddr, dead: SocketAddr) -> String {
    let listener = |name: &str, specific: bool| {
        format!(
            r#"
  - name: {name}
    address: 127.0.0.1:0
    kind: http
    http:
      most_specific_header_mutations_wins: {specific}
      headers:
        request_headers_to_add:
          - {{ name: x-level, value: global, append_action: overwrite_if_exists_or_add }}
        request_headers_to_remove: [x-drop-me]
        response_headers_to_add:
          - {{ name: x-resp-level, value: global, append_action: overwrite_if_exists_or_add }}
    virtual_hosts:
      - name: all
        domains: ["*"]
        headers:
          request_headers_to_add:
            - {{ name: x-level, value: vhost, append_action: overwrite_if_exists_or_add }}
            - {{ name: x-vhost, value: "yes", append_action: overwrite_if_exists_or_add }}
          response_headers_to_add:
            - {{ name: x-resp-level, value: vhost, append_action: overwrite_if_exists_or_add }}
        routes:
          - name: direct
            match: {{ path: {{ exact: /direct }} }}
            direct_response: {{ status: 200, body: hi }}
            headers:
              response_headers_to_add:
                - {{ name: x-resp-level, value: route, append_action: overwrite_if_exists_or_add }}
                - {{ name: x-echo-user, value: "%REQ(x-user)%" }}
          - name: broken
            match: {{ path: {{ exact: /broken }} }}
            cluster: dead
            headers:
              response_headers_to_add:
                - {{ name: x-resp-level, value: route, append_action: overwrite_if_exists_or_add }}
          - name: app
            match: {{ path: {{ prefix: / }} }}
            weighted_clusters:
              - cluster: app
                weight: 1
                headers:
                  request_headers_to_add:
                    - {{ name: x-level, value: weighted, append_action: overwrite_if_exists_or_add }}
                    - {{ name: x-copied-user, value: "user=%REQ(x-user)%" }}
                  response_headers_to_add:
                    - {{ name: x-resp-level, value: weighted, append_action: overwrite_if_exists_or_add }}
            headers:
              request_headers_to_add:
                - {{ name: x-level, value: route, append_action: overwrite_if_exists_or_add }}
                - {{ name: x-append, value: proxy }}
                - {{ name: x-absent, value: proxy, append_action: add_if_absent }}
                - {{ name: x-only-if-present, value: proxy, append_action: overwrite_if_exists }}
                - {{ name: x-client, value: "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT% %PROTOCOL%" }}
              response_headers_to_add:
                - {{ name: x-resp-level, value: route, append_action: overwrite_if_exists_or_add }}
                - {{ name: x-upstream, value: "%UPSTREAM_REMOTE_ADDRESS%" }}
              response_headers_to_remove: [x-received-bytes]
"#
        )
    };
    format!(
        "listeners:{}{}clusters:\n  - name: app\n    endpoints: [{{ address: \"{app}\" }}]\n  - name: dead\n    endpoints: [{{ address: \"{dead}\" }}]\n",
        listener("default", false),
        listener("specific", true),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_mutations_apply_at_every_level_with_envoys_precedence() {
    let app = HttpBackend::start("app").await;
    let proxy = start_proxy(&levels_config(app.addr(), dead_addr())).await;

    for (name, request_winner, response_winner) in [
        ("default", "global", "global"),
        ("specific", "weighted", "weighted"),
    ] {
        let addr = listener_addr(&proxy, name);
        let response = send(
            addr,
            request("GET", "svc", "/items")
                .header("x-user", "alice")
                .header("x-drop-me", "1")
                .header("x-append", "client")
                .header("x-absent", "client")
                // A client naming a header in `Connection` cannot take away
                // what the route sets.
                .header("x-vhost", "client")
                .header("connection", "x-vhost")
                .body(empty())
                .unwrap(),
        )
        .await;
        assert_eq!(response.status, 200, "{name}");
        let seen = app.last_request();
        let all = |header: &str| -> Vec<&str> {
            seen.headers
                .get_all(header)
                .iter()
                .map(|v| v.to_str().unwrap())
                .collect()
        };
        assert_eq!(all("x-level"), [request_winner], "{name}");
        assert_eq!(all("x-vhost"), ["yes"], "{name}");
        assert!(seen.header("x-drop-me").is_none(), "{name}");
        assert_eq!(all("x-append"), ["client", "proxy"], "{name}");
        assert_eq!(all("x-absent"), ["client"], "{name}");
        assert!(seen.header("x-only-if-present").is_none(), "{name}");
        assert_eq!(all("x-copied-user"), ["user=alice"], "{name}");
        assert_eq!(all("x-client"), ["127.0.0.1 HTTP/1.1"], "{name}");

        assert_eq!(
            values(&response, "x-resp-level"),
            [response_winner],
            "{name}"
        );
        assert_eq!(
            values(&response, "x-upstream"),
            [app.addr().to_string()],
            "{name}"
        );
        assert!(response.header("x-received-bytes").is_none(), "{name}");
        assert_eq!(response.backend(), Some("app"), "{name}");

        // Direct responses get the response changes too, %REQ% included.
        let direct = send(
            addr,
            request("GET", "svc", "/direct")
                .header("x-user", "bob")
                .body(empty())
                .unwrap(),
        )
        .await;
        assert_eq!((direct.status.as_u16(), direct.text()), (200, "hi".into()));
        let winner = if name == "default" { "global" } else { "route" };
        assert_eq!(values(&direct, "x-resp-level"), [winner], "{name}");
        assert_eq!(values(&direct, "x-echo-user"), ["bob"], "{name}");

        // So do the proxy's own answers once a route is chosen.
        let broken = get(addr, "svc", "/broken").await;
        assert_eq!(broken.status, 502, "{name}");
        assert_eq!(values(&broken, "x-resp-level"), [winner], "{name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_named_endpoints_route_traffic_from_the_static_config() {
    let _recorder = postern::telemetry::install_prometheus_recorder();
    let app = HttpBackend::start("by-name").await;
    let port = app.addr().port();
    let proxy = start_proxy(&format!(
        r#"
        listeners:
          - name: edge
            address: 127.0.0.1:0
            kind: http
            virtual_hosts:
              - name: all
                domains: ["*"]
                routes:
                  - match: {{ path: {{ prefix: / }} }}
                    cluster: named
        clusters:
          - name: named
            endpoints: [{{ address: "localhost:{port}" }}]
            dns_refresh_rate: 100ms
            dns_lookup_family: v4_only
        "#
    ))
    .await;
    // The listener starts once the first lookups are done: no 503 first.
    let response = get(listener_addr(&proxy, "edge"), "svc", "/").await;
    assert_eq!(response.status, 200);
    assert_eq!(response.backend(), Some("by-name"));
    // Lookups go on at the refresh rate, and are counted.
    wait_until("a second round of lookups", || async {
        scrape(
            proxy.admin_addr(),
            "postern_dns_resolutions_total",
            &[("cluster", "named"), ("result", "success")],
        )
        .await
            >= 2.0
    })
    .await;
    // A refresh that finds the same address keeps the cluster serving.
    assert_eq!(
        get(listener_addr(&proxy, "edge"), "svc", "/").await.status,
        200
    );
}

/// The listener from `http_listener`, with `routes` as its inline route
/// configuration.
fn listener_with_routes(routes: route::RouteConfiguration) -> listener::Listener {
    let any_port = SocketAddr::from(([127, 0, 0, 1], 0));
    let mut l = http_listener("xds-http", any_port, "unused", None);
    let filter = &mut l.filter_chains[0].filters[0];
    let Some(listener::filter::ConfigType::TypedConfig(any)) = &filter.config_type else {
        unreachable!("http_listener packs its connection manager")
    };
    let mut manager: hcm::HttpConnectionManager =
        prost::Message::decode(any.value.as_slice()).expect("connection manager");
    manager.route_specifier = Some(hcm::http_connection_manager::RouteSpecifier::RouteConfig(
        routes,
    ));
    filter.config_type = Some(listener::filter::ConfigType::TypedConfig(pack(&manager)));
    l
}

fn header(key: &str, value: &str) -> core::HeaderValueOption {
    core::HeaderValueOption {
        header: Some(core::HeaderValue {
            key: key.into(),
            value: value.into(),
            ..Default::default()
        }),
        append_action: core::header_value_option::HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
        ..Default::default()
    }
}

fn xds_snapshot(version: &str, port: u16, route_value: &str) -> Snapshot {
    let routes = route::RouteConfiguration {
        name: "routes".into(),
        response_headers_to_add: vec![header("x-global", "yes")],
        virtual_hosts: vec![route::VirtualHost {
            name: "all".into(),
            domains: vec!["*".into()],
            request_headers_to_add: vec![header("x-vhost", "yes")],
            routes: vec![route::Route {
                r#match: Some(route::RouteMatch {
                    path_specifier: Some(route::route_match::PathSpecifier::Prefix("/".into())),
                    ..Default::default()
                }),
                action: Some(route::route::Action::Route(route::RouteAction {
                    cluster_specifier: Some(route::route_action::ClusterSpecifier::Cluster(
                        "named".into(),
                    )),
                    ..Default::default()
                })),
                request_headers_to_add: vec![header("x-route", route_value)],
                ..Default::default()
            }],
            ..Default::default()
        }],
        ..Default::default()
    };
    #[allow(deprecated)]
    let named = cluster::Cluster {
        name: "named".into(),
        cluster_discovery_type: Some(cluster::cluster::ClusterDiscoveryType::Type(
            cluster::cluster::DiscoveryType::StrictDns as i32,
        )),
        dns_refresh_rate: Some(PbDuration {
            seconds: 1,
            nanos: 0,
        }),
        dns_lookup_family: cluster::cluster::DnsLookupFamily::V4Only as i32,
        load_assignment: Some(endpoint::ClusterLoadAssignment {
            cluster_name: "named".into(),
            endpoints: vec![endpoint::LocalityLbEndpoints {
                lb_endpoints: vec![endpoint::LbEndpoint {
                    host_identifier: Some(endpoint::lb_endpoint::HostIdentifier::Endpoint(
                        endpoint::Endpoint {
                            address: Some(core::Address {
                                address: Some(core::address::Address::SocketAddress(
                                    core::SocketAddress {
                                        address: "localhost".into(),
                                        port_specifier: Some(
                                            core::socket_address::PortSpecifier::PortValue(
                                                u32::from(port),
                                            ),
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
        }),
        ..Default::default()
    };
    let mut s = Snapshot::new(version);
    s.add_message("xds-http", &listener_with_routes(routes));
    s.add_message("named", &named);
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_dns_cluster_and_header_mutations_from_xds() {
    let app = HttpBackend::start("xds-named").await;
    let cp = ControlPlane::start(xds_snapshot("1", app.addr().port(), "one")).await;
    let mut events = cp.server.events();
    let proxy = start_proxy(&format!(
        r#"
node: {{ id: "sidecar~127.0.0.1~test.default~default.svc.cluster.local", cluster: test }}
xds: {{ address: "{}", protocol: sotw, initial_backoff: 50ms, max_backoff: 500ms }}
drain_timeout: 2s
"#,
        cp.url()
    ))
    .await;
    // The cluster warms with its first lookups; then traffic flows.
    let response = postern_tests::eventually("traffic to the DNS cluster", || async {
        let addr = proxy.listener_addr("xds-http")?;
        let response = get(addr, "svc", "/").await;
        (response.status == 200).then_some(response)
    })
    .await;
    assert_eq!(response.backend(), Some("xds-named"));
    assert_eq!(values(&response, "x-global"), ["yes"]);
    let seen = app.last_request();
    assert_eq!(
        (seen.header("x-vhost"), seen.header("x-route")),
        (Some("yes"), Some("one"))
    );

    // An unknown command operator is NACKed naming the field; the last
    // good routes keep serving.
    cp.server
        .set_snapshot(xds_snapshot("2", app.addr().port(), "%NOT_AN_OPERATOR%"));
    let nack = wait_event(&mut events, "listener NACK", |e| {
        is_nack(e, type_url::LISTENER)
    })
    .await;
    let AdsEventKind::Nack { error, .. } = nack.kind else {
        unreachable!()
    };
    assert!(
        error.contains("routes[0].request_headers_to_add[0].header.value")
            && error.contains("unknown command operator %NOT_AN_OPERATOR%"),
        "{error}"
    );
    let addr = proxy.listener_addr("xds-http").expect("listener");
    assert_eq!(get(addr, "svc", "/").await.status, 200);
    assert_eq!(app.last_request().header("x-route"), Some("one"));

    cp.server
        .set_snapshot(xds_snapshot("3", app.addr().port(), "three"));
    wait_event(&mut events, "listener ACK", |e| {
        is_ack(e, type_url::LISTENER, "3")
    })
    .await;
    wait_until("the new route value", || async {
        get(addr, "svc", "/").await.status == 200
            && app.last_request().header("x-route") == Some("three")
    })
    .await;
}

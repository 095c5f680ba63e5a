#![allow(clippy::unwrap_used)]

use super::*;
use crate::config::Config;

fn capture(yaml_capture: &str) -> Arc<Listener> {
    let yaml = format!(
        r#"
clusters:
  - name: reviews
    endpoints: [{{ address: 10.0.0.7:9080 }}]
  - name: db
    endpoints: [{{ address: 10.0.0.8:5432 }}]
listeners:
  - name: outbound
    address: 0.0.0.0:15001
    kind: capture
    capture:
{yaml_capture}
"#
    );
    let config = Config::from_yaml(&yaml).unwrap();
    config.listeners[0].clone()
}

fn compiled(listener: &Listener) -> &CaptureListener {
    match &listener.protocol {
        ListenerProtocol::Capture(capture) => capture,
        other => panic!("{other:?}"),
    }
}

const SERVICES: &str = r#"
      direction: outbound
      services:
        - address: 10.96.0.20:9080
          cluster: reviews
        - address: 0.0.0.0:5432
          cluster: db
          protocol: opaque
        - address: 10.96.0.30:80
          virtual_hosts:
            - name: only-http
              domains: ["*"]
              routes: [{ match: {}, cluster: reviews }]
"#;

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

#[test]
fn outbound_routes_by_original_destination_and_protocol() {
    let listener = self::capture(SERVICES);
    let capture = compiled(&listener);
    let route = |dst: &str, http: bool| match outbound_route(capture, addr(dst), http) {
        OutboundRoute::Http(service) => format!("http {}", service.address),
        OutboundRoute::Tcp(cluster) => format!("tcp {cluster}"),
        OutboundRoute::Passthrough => "passthrough".into(),
        OutboundRoute::Block => "block".into(),
    };
    // A known service: HTTP by its routes, the rest by TCP to its cluster.
    assert_eq!(route("10.96.0.20:9080", true), "http 10.96.0.20:9080");
    assert_eq!(route("10.96.0.20:9080", false), "tcp reviews");
    // The wildcard IP matches any address on its port; opaque is never HTTP.
    assert_eq!(route("10.96.0.99:5432", true), "tcp db");
    // An HTTP-only service takes no other protocol.
    assert_eq!(route("10.96.0.30:80", true), "http 10.96.0.30:80");
    assert_eq!(route("10.96.0.30:80", false), "passthrough");
    // Unknown: another port, another IP.
    assert_eq!(route("10.96.0.20:9081", true), "passthrough");
    assert_eq!(route("192.0.2.1:443", false), "passthrough");

    let blocking = self::capture(&format!("{SERVICES}      unknown_destinations: block\n"));
    let blocking = compiled(&blocking);
    assert!(matches!(
        outbound_route(blocking, addr("192.0.2.1:443"), false),
        OutboundRoute::Block
    ));
    assert!(matches!(
        outbound_route(blocking, addr("10.96.0.20:9080"), false),
        OutboundRoute::Tcp(_)
    ));
}

#[test]
fn opaque_ports_join_the_global_list() {
    let yaml = r#"
opaque_ports: [3306, "9000-9100"]
listeners:
  - name: inbound
    address: 0.0.0.0:15006
    kind: capture
    capture: { direction: inbound, opaque_ports: [25] }
"#;
    let config = Config::from_yaml(yaml).unwrap();
    let capture = compiled(&config.listeners[0]);
    for (port, opaque) in [(25, true), (3306, true), (9050, true), (8080, false)] {
        assert_eq!(capture.opaque_ports.contains(port), opaque, "{port}");
    }
    assert_eq!(
        capture.detection_timeout,
        std::time::Duration::from_millis(100)
    );
    assert_eq!(config.listeners[0].direction, TrafficDirection::Inbound);
}

#[test]
fn capture_listeners_refuse_settings_of_the_other_direction() {
    let cases = [
        (
            "{ direction: inbound, services: [{ address: 10.0.0.1:80, cluster: reviews }] }",
            "capture.services",
        ),
        (
            "{ direction: inbound, unknown_destinations: block }",
            "capture.unknown_destinations",
        ),
        (
            "{ direction: outbound, rbac: { rules: { policies: [] } } }",
            "capture.rbac",
        ),
        (
            "{ direction: outbound, services: [{ address: 10.0.0.1:80 }] }",
            "capture.services[0]",
        ),
        (
            "{ direction: outbound, services: [{ address: 10.0.0.1:80, cluster: nope }] }",
            "capture.services[0].cluster",
        ),
        (
            "{ direction: outbound, detection_timeout: 0s }",
            "capture.detection_timeout",
        ),
    ];
    for (block, field) in cases {
        let yaml = format!(
            "clusters: [{{ name: reviews, endpoints: [{{ address: 10.0.0.7:80 }}] }}]\nlisteners:\n  - {{ name: c, address: 0.0.0.0:15001, kind: capture, capture: {block} }}\n"
        );
        let err = Config::from_yaml(&yaml).unwrap_err().to_string();
        assert!(
            err.contains(&format!("listeners[0].{field}")),
            "{block}: {err}"
        );
    }
    let err = Config::from_yaml("listeners: [{ name: c, address: 0.0.0.0:15001, kind: capture }]")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("listeners[0].capture: a capture listener needs"),
        "{err}"
    );
}

#[test]
fn inbound_calls_go_to_loopback_on_the_original_port() {
    assert_eq!(app_address(addr("10.1.2.3:8080")), addr("127.0.0.1:8080"));
    assert_eq!(app_address(addr("[fd00::5]:8080")), addr("[::1]:8080"));
    assert!(is_direct(addr("10.0.0.2:15001"), addr("10.0.0.2:15001")));
    assert!(is_direct(
        addr("10.0.0.2:15001"),
        addr("[::ffff:10.0.0.2]:15001")
    ));
    assert!(!is_direct(addr("10.0.0.9:80"), addr("10.0.0.2:15001")));
}

#[test]
fn inbound_routes_send_grpc_and_http2_callers_over_http2() {
    let table = inbound_routes(8080);
    let pick = |content_type: Option<&str>, original: Option<&str>| {
        let mut headers = http::HeaderMap::new();
        if let Some(value) = content_type {
            headers.insert(http::header::CONTENT_TYPE, value.parse().unwrap());
        }
        if let Some(value) = original {
            headers.insert(
                &crate::http::protocol::X_POSTERN_ORIGINAL_PROTOCOL,
                value.parse().unwrap(),
            );
        }
        let view = crate::route::RequestView {
            authority: "10.0.0.2:8080",
            path: "/",
            query: None,
            method: &http::Method::POST,
            headers: &headers,
        };
        let (_, route) = table.route(&view).unwrap();
        match &route.action {
            RouteAction::Forward(forward) => forward.targets.pick(0).to_string(),
            _ => unreachable!(),
        }
    };
    assert_eq!(pick(None, None), "inbound|8080");
    assert_eq!(pick(Some("application/json"), None), "inbound|8080");
    assert_eq!(pick(Some("application/grpc"), None), "inbound|8080|h2");
    assert_eq!(
        pick(Some("application/grpc+proto"), None),
        "inbound|8080|h2"
    );
    assert_eq!(pick(Some("application/grpcx"), None), "inbound|8080");
    // What the caller spoke decides the rest; gRPC needs HTTP/2 anyway.
    assert_eq!(pick(None, Some("HTTP/2")), "inbound|8080|h2");
    assert_eq!(pick(None, Some("HTTP/1.1")), "inbound|8080");
    assert_eq!(
        pick(Some("application/grpc"), Some("HTTP/1.1")),
        "inbound|8080|h2"
    );
}

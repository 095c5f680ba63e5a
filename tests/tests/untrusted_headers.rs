//! Headers a client must not be able to use against the proxy or the
//! backends behind it: forwarding claims (`x-forwarded-*`, `forwarded`,
//! `x-real-ip`), Postern's own `x-postern-*`, names with underscores (and
//! underscore spellings of the headers the proxy manages), and Host or
//! `:authority` variants that could route one way and be judged another.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::Duration;

use postern_tests::client::raw_exchange;
use postern_tests::{
    empty, get, listener, request, send, start_proxy, H2Conn, HttpBackend, RecordedRequest,
};

fn config(backend: SocketAddr, limits: &str, http: &str) -> String {
    format!(
        r#"
        listeners:
          - name: edge
            address: 127.0.0.1:0
            kind: http
            limits: {{ {limits} }}
            http: {{ {http} }}
            virtual_hosts:
              - name: all
                domains: ["*"]
                routes:
                  - match: {{}}
                    cluster: c
        clusters:
          - name: c
            endpoints: [{{ address: "{backend}" }}]
        "#
    )
}

/// Claims an outside client might make about the hops before it.
const CLAIMS: [(&str, &str); 10] = [
    ("x-forwarded-for", "203.0.113.7"),
    ("x-forwarded-proto", "https"),
    ("x-forwarded-host", "evil.example"),
    ("x-forwarded-port", "443"),
    ("x-forwarded-prefix", "/admin"),
    ("forwarded", "for=203.0.113.7;proto=https"),
    ("x-real-ip", "203.0.113.7"),
    ("x-request-id", "chosen-by-client"),
    ("x_forwarded_for", "198.51.100.1"),
    ("x_real_ip", "198.51.100.1"),
];

async fn send_claims(edge: SocketAddr, h2: bool) -> u16 {
    let mut req = request("GET", "svc.local", "/claims");
    for (name, value) in CLAIMS {
        req = req.header(name, value);
    }
    let req = req.body(empty()).unwrap();
    if h2 {
        let mut conn = H2Conn::connect(edge).await.unwrap();
        conn.send(req).await.unwrap().status.as_u16()
    } else {
        send(edge, req).await.status.as_u16()
    }
}

fn assert_untrusted(seen: &RecordedRequest, how: &str) {
    assert_eq!(
        seen.header("x-forwarded-for"),
        Some("203.0.113.7, 127.0.0.1"),
        "{how}: the peer is appended, the claim kept only as history"
    );
    assert_eq!(seen.header("x-forwarded-proto"), Some("http"), "{how}");
    for name in [
        "x-forwarded-host",
        "x-forwarded-port",
        "x-forwarded-prefix",
        "forwarded",
        "x-real-ip",
        "x_forwarded_for",
        "x_real_ip",
    ] {
        assert_eq!(seen.header(name), None, "{how}: {name} was forwarded");
    }
    assert_ne!(
        seen.header("x-request-id"),
        Some("chosen-by-client"),
        "{how}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_claims_from_outside_are_not_trusted() {
    let backend = HttpBackend::start("b").await;
    let proxy = start_proxy(&config(backend.addr(), "", "")).await;
    let edge = listener(&proxy, "edge");
    assert_eq!(send_claims(edge, false).await, 200);
    assert_untrusted(&backend.last_request(), "http/1.1");
    assert_eq!(send_claims(edge, true).await, 200);
    assert_untrusted(&backend.last_request(), "http/2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_claims_pass_only_when_the_downstream_is_trusted() {
    let backend = HttpBackend::start("b").await;
    let proxy = start_proxy(&config(backend.addr(), "", "trust_downstream: true")).await;
    let edge = listener(&proxy, "edge");
    assert_eq!(send_claims(edge, false).await, 200);
    let seen = backend.last_request();
    assert_eq!(seen.header("x-forwarded-proto"), Some("https"));
    assert_eq!(seen.header("x-forwarded-host"), Some("evil.example"));
    assert_eq!(
        seen.header("forwarded"),
        Some("for=203.0.113.7;proto=https")
    );
    assert_eq!(seen.header("x-request-id"), Some("chosen-by-client"));
    // Underscore spellings are never what a trusted proxy sends.
    assert_eq!(seen.header("x_forwarded_for"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postern_internal_headers_are_stripped_from_requests() {
    let backend = HttpBackend::start("b").await;
    let proxy = start_proxy(&config(backend.addr(), "", "")).await;
    let edge = listener(&proxy, "edge");
    let internal = [
        ("x-postern-overloaded", "true"),
        ("x-postern-peer", "forged-workload-metadata"),
        ("x-postern-anything", "1"),
        ("x_postern_peer", "forged"),
    ];
    for h2 in [false, true] {
        let mut req = request("GET", "svc.local", "/");
        for (name, value) in internal {
            req = req.header(name, value);
        }
        let req = req.body(empty()).unwrap();
        let status = if h2 {
            let mut conn = H2Conn::connect(edge).await.unwrap();
            conn.send(req).await.unwrap().status
        } else {
            send(edge, req).await.status
        };
        assert_eq!(status, 200);
        let seen = backend.last_request();
        for (name, _) in internal {
            assert_eq!(seen.header(name), None, "h2={h2}: {name} was forwarded");
        }
    }
}

async fn underscore_request(edge: SocketAddr) -> (u16, bool) {
    let reply = raw_exchange(
        edge,
        b"GET /u HTTP/1.1\r\nHost: svc.local\r\nX_Custom: 1\r\nX_Forwarded_Host: evil\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    let status = reply
        .text()
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, reply.closed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_with_underscores_follow_the_setting() {
    let backend = HttpBackend::start("b").await;

    // Default (allow): forwarded, except spellings of managed headers.
    let proxy = start_proxy(&config(backend.addr(), "", "")).await;
    let (status, _) = underscore_request(listener(&proxy, "edge")).await;
    assert_eq!(status, 200);
    let seen = backend.last_request();
    assert_eq!(seen.header("x_custom"), Some("1"));
    assert_eq!(seen.header("x_forwarded_host"), None);
    drop(proxy);

    let proxy = start_proxy(&config(
        backend.addr(),
        "headers_with_underscores: drop_header",
        "",
    ))
    .await;
    let (status, _) = underscore_request(listener(&proxy, "edge")).await;
    assert_eq!(status, 200);
    let seen = backend.last_request();
    assert_eq!(seen.header("x_custom"), None);
    assert_eq!(seen.path_and_query(), "/u");
    drop(proxy);

    let before = backend.requests().len();
    let proxy = start_proxy(&config(
        backend.addr(),
        "headers_with_underscores: reject_request",
        "",
    ))
    .await;
    let edge = listener(&proxy, "edge");
    let (status, closed) = underscore_request(edge).await;
    assert_eq!((status, closed), (400, true));
    let mut conn = H2Conn::connect(edge).await.unwrap();
    let req = request("GET", "svc.local", "/u")
        .header("x_custom", "1")
        .body(empty())
        .unwrap();
    assert_eq!(conn.send(req).await.unwrap().status, 400);
    assert_eq!(
        backend.requests().len(),
        before,
        "a refused request went upstream"
    );
    assert_eq!(get(edge, "svc.local", "/").await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_variants_route_and_authorize_alike() {
    let admin = HttpBackend::start("admin").await;
    let public = HttpBackend::start("public").await;
    let proxy = start_proxy(&format!(
        r#"
        listeners:
          - name: routed
            address: 127.0.0.1:0
            kind: http
            virtual_hosts: &hosts
              - name: admin
                domains: ["admin.shop"]
                routes: [{{ match: {{}}, cluster: admin }}]
              - name: rest
                domains: ["*"]
                routes: [{{ match: {{}}, cluster: public }}]
          - name: guarded
            address: 127.0.0.1:0
            kind: http
            http:
              rbac:
                rules:
                  action: deny
                  policies:
                    - name: no-admin
                      permissions: [{{ header: {{ name: ":authority", exact: admin.shop }} }}]
                      principals: [{{ any: true }}]
                    - name: no-admin-8443
                      permissions: [{{ header: {{ name: host, exact: "admin.shop:8443" }} }}]
                      principals: [{{ any: true }}]
            virtual_hosts: *hosts
        clusters:
          - name: admin
            endpoints: [{{ address: "{}" }}]
          - name: public
            endpoints: [{{ address: "{}" }}]
        "#,
        admin.addr(),
        public.addr()
    ))
    .await;
    let routed = listener(&proxy, "routed");
    let guarded = listener(&proxy, "guarded");

    let hosts = [
        "admin.shop",
        "ADMIN.shop",
        "admin.shop.",
        "admin.shop:80",
        "Admin.Shop.:8080",
        "admin.shop:8443",
    ];
    // HTTP/1.1 Host, HTTP/1.1 absolute-form (with a Host that lies), and
    // HTTP/2 :authority.
    for host in hosts {
        let head = format!("GET /x HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        let absolute = format!(
            "GET http://{host}/x HTTP/1.1\r\nHost: public.shop\r\nConnection: close\r\n\r\n"
        );
        for (form, raw) in [("host", &head), ("absolute-form", &absolute)] {
            let reply = raw_exchange(routed, raw.as_bytes(), Duration::from_secs(5))
                .await
                .unwrap();
            assert!(
                reply.text().starts_with("HTTP/1.1 200")
                    && reply.text().contains("x-backend: admin"),
                "{form} {host} routed elsewhere: {}",
                reply.text()
            );
            let reply = raw_exchange(guarded, raw.as_bytes(), Duration::from_secs(5))
                .await
                .unwrap();
            assert!(
                reply.text().starts_with("HTTP/1.1 403"),
                "{form} {host} was not denied: {}",
                reply.text()
            );
        }
        for (addr, want) in [(routed, 200), (guarded, 403)] {
            let mut conn = H2Conn::connect(addr).await.unwrap();
            let req = http::Request::get(format!("http://{host}/x"))
                .body(empty())
                .unwrap();
            let response = conn.send(req).await.unwrap();
            assert_eq!(response.status, want, "h2 :authority {host}");
        }
    }
    assert_eq!(
        admin.requests().len(),
        hosts.len() * 3,
        "only the routed listener reached admin"
    );
    assert!(public.requests().is_empty());
    // A host that only looks alike is neither routed nor judged as admin.
    let response = get(guarded, "admin.shop.evil", "/x").await;
    assert_eq!(
        (response.status.as_u16(), response.backend()),
        (200, Some("public"))
    );
}

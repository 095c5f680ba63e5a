//! Call policy end to end: path normalisation before routing and RBAC, and
//! RBAC by SPIFFE ID, path, method, header, port and TLS SNI over real
//! (m)TLS, with shadow rules that only count, and routes that replace or
//! turn off the listener's RBAC.

use postern_tests::client::raw_exchange;
use postern_tests::mesh::{probe_connector, tls_connect, TestCa};
use postern_tests::prom::scrape;
use postern_tests::{get, listener, start_proxy, wait_until, within, HttpBackend, Proxy};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
const OTHER: &str = "spiffe://cluster.local/ns/shop/sa/other";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_tricks_are_normalised_before_routing_or_refused() {
    let (public, admin) = (
        HttpBackend::start("public").await,
        HttpBackend::start("admin").await,
    );
    let proxy = start_proxy(&format!(
        r#"
listeners:
  - name: norm-edge
    address: 127.0.0.1:0
    kind: http
    virtual_hosts:
      - name: all
        domains: ["*"]
        routes:
          - match: {{ path: {{ prefix: /admin/ }} }}
            cluster: admin
          - match: {{}}
            cluster: public
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
    let addr = listener(&proxy, "norm-edge");
    for (raw, backend, seen) in [
        ("/public/../admin/x", "admin", "/admin/x"),
        ("//admin/x", "admin", "/admin/x"),
        ("/%61dmin/x?q=1", "admin", "/admin/x?q=1"),
        ("/admin/./y/../x", "admin", "/admin/x"),
        ("/adminx", "public", "/adminx"),
    ] {
        let response = get(addr, "shop", raw).await;
        assert_eq!(response.status, 200, "{raw}");
        assert_eq!(response.backend(), Some(backend), "{raw}");
        let last = if backend == "admin" {
            admin.last_request()
        } else {
            public.last_request()
        };
        assert_eq!(
            last.path_and_query(),
            seen,
            "{raw} reaches the backend normalised"
        );
    }
    let before = admin.requests().len() + public.requests().len();
    for raw in ["/admin%2fx", "/admin%5Cx", "/a%zz"] {
        let request = format!("GET {raw} HTTP/1.1\r\nhost: shop\r\nconnection: close\r\n\r\n");
        let reply = raw_exchange(addr, request.as_bytes(), Duration::from_secs(10))
            .await
            .expect("exchange");
        assert!(
            reply.text().starts_with("HTTP/1.1 400"),
            "{raw}: {}",
            reply.text()
        );
    }
    assert_eq!(
        admin.requests().len() + public.requests().len(),
        before,
        "nothing reached a backend"
    );
}

fn mtls_rbac_config(
    files: &postern_tests::mesh::IdentityFiles,
    app: std::net::SocketAddr,
) -> String {
    format!(
        r#"
identity:
  spiffe_id: spiffe://cluster.local/ns/shop/sa/api
  source:
    files: {{ cert: {}, key: {}, bundle: {} }}
listeners:
  - name: rbac-in
    address: 127.0.0.1:0
    kind: http
    mtls: {{ mode: strict }}
    http:
      rbac:
        rules:
          action: allow
          policies:
            - name: web-reads-items
              permissions:
                - and:
                    - method: GET
                    - path: {{ prefix: /items/ }}
              principals:
                - spiffe_id: {{ exact: "{WEB}" }}
            - name: anyone-health
              permissions: [{{ path: {{ exact: /healthz }} }}]
              principals: [{{ authenticated: true }}]
        shadow:
          action: deny
          policies:
            - name: would-block-debug
              permissions: [{{ header: {{ name: x-debug, present: true }} }}]
              principals: [{{ any: true }}]
    virtual_hosts:
      - name: all
        domains: ["*"]
        routes: [{{ match: {{}}, cluster: app }}]
clusters:
  - name: app
    endpoints: [{{ address: "{app}" }}]
"#,
        files.cert.display(),
        files.key.display(),
        files.bundle.display(),
    )
}

/// One request over mTLS with `client`'s certificate; the status code.
async fn status_as(proxy: &Proxy, client: &postern_tests::mesh::Issued, request: &str) -> u16 {
    let addr = listener(proxy, "rbac-in");
    let mut tls = tls_connect(&probe_connector(Some(client), &[b"http/1.1"]), addr, "api")
        .await
        .expect("handshake");
    tls.write_all(request.as_bytes()).await.expect("write");
    let mut out = Vec::new();
    within(Duration::from_secs(10), "reply", tls.read_to_end(&mut out))
        .await
        .expect("read");
    let text = String::from_utf8_lossy(&out);
    text.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0)
}

fn request(method: &str, path: &str, extra: &str) -> String {
    format!("{method} {path} HTTP/1.1\r\nhost: api\r\nconnection: close\r\n{extra}\r\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rbac_by_spiffe_id_path_and_method_over_mtls_with_shadow_rules() {
    let _recorder = postern::telemetry::install_prometheus_recorder();
    let dir = tempfile::tempdir().unwrap();
    let mesh = TestCa::new("mesh root");
    let files = mesh.write_identity(dir.path(), "api", "spiffe://cluster.local/ns/shop/sa/api");
    let app = HttpBackend::start("app").await;
    let proxy = start_proxy(&mtls_rbac_config(&files, app.addr())).await;
    within(Duration::from_secs(15), "identity", proxy.ready()).await;
    let (web, other) = (mesh.issue(WEB, -60, 3600), mesh.issue(OTHER, -60, 3600));

    assert_eq!(
        status_as(&proxy, &web, &request("GET", "/items/1", "")).await,
        200
    );
    assert_eq!(
        status_as(&proxy, &web, &request("POST", "/items/1", "")).await,
        403
    );
    assert_eq!(
        status_as(&proxy, &other, &request("GET", "/items/1", "")).await,
        403
    );
    assert_eq!(
        status_as(&proxy, &other, &request("GET", "/healthz", "")).await,
        200
    );
    // Normalised before the policy: these are /admin, not /items/.
    assert_eq!(
        status_as(&proxy, &web, &request("GET", "/items/../admin", "")).await,
        403
    );
    assert_eq!(
        status_as(&proxy, &web, &request("GET", "/items%2f..%2fadmin", "")).await,
        400
    );
    let reached: Vec<String> = app.requests().iter().map(|r| r.path_and_query()).collect();
    assert_eq!(
        reached,
        ["/items/1", "/healthz"],
        "denied calls never reach the app"
    );

    let denied = scrape(
        proxy.admin_addr(),
        "postern_rbac_denials_total",
        &[("listener", "rbac-in"), ("policy", "none")],
    )
    .await;
    assert_eq!(denied, 3.0);

    // Shadow rules count but do not block.
    assert_eq!(
        status_as(&proxy, &web, &request("GET", "/items/2", "x-debug: 1\r\n")).await,
        200
    );
    wait_until("shadow denial counted", || async {
        scrape(
            proxy.admin_addr(),
            "postern_rbac_shadow_denials_total",
            &[("policy", "would-block-debug")],
        )
        .await
            >= 1.0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rbac_config_errors_name_the_field() {
    let err = postern_tests::parse_config(
        r#"
listeners:
  - name: l
    address: 127.0.0.1:0
    kind: http
    http:
      rbac:
        rules:
          policies:
            - name: p
              permissions: [{ path: { exact: /a, prefix: /b } }]
              principals: [{ source_ip: "10.0.0.0/40" }]
    virtual_hosts: [{ name: all, domains: ["*"], routes: [{ match: {}, cluster: c }] }]
clusters:
  - name: c
    endpoints: [{ address: 127.0.0.1:9 }]
"#,
    )
    .unwrap_err()
    .0;
    assert!(
        err.contains("listeners[0].http.rbac.rules.policies[0].permissions[0].path: give exactly one of exact, prefix, regex"),
        "{err}"
    );
    assert!(
        err.contains("listeners[0].http.rbac.rules.policies[0].principals[0].source_ip"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_rate_limits_are_exact_keyed_and_shadowable() {
    let _recorder = postern::telemetry::install_prometheus_recorder();
    let app = HttpBackend::start("app").await;
    let proxy = start_proxy(&format!(
        r#"
listeners:
  - name: rl-edge
    address: 127.0.0.1:0
    kind: http
    http:
      local_rate_limit: {{ max_tokens: 1, fill_interval: 1h, shadow: true }}
    virtual_hosts:
      - name: all
        domains: ["*"]
        routes:
          - name: burst
            match: {{ path: {{ prefix: /burst }} }}
            cluster: app
            local_rate_limit: {{ max_tokens: 20, fill_interval: 1h }}
          - name: per-user
            match: {{ path: {{ prefix: /user }} }}
            cluster: app
            local_rate_limit: {{ max_tokens: 2, fill_interval: 1h, key: {{ header: x-user }} }}
clusters:
  - name: app
    endpoints: [{{ address: "{}" }}]
"#,
        app.addr()
    ))
    .await;
    let addr = listener(&proxy, "rl-edge");

    // 60 concurrent calls against a bucket of 20: exactly 20 pass.
    let calls: Vec<_> = (0..60)
        .map(|i| tokio::spawn(async move { get(addr, "shop", &format!("/burst/{i}")).await }))
        .collect();
    let mut statuses = Vec::new();
    for call in calls {
        let response = call.await.unwrap();
        if response.status == 429 {
            assert!(response
                .header("retry-after")
                .is_some_and(|s| s.parse::<u64>().unwrap() >= 1));
            assert_eq!(response.header("ratelimit-limit"), Some("20"));
            assert_eq!(response.header("ratelimit-remaining"), Some("0"));
        }
        statuses.push(response.status);
    }
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        20,
        "{statuses:?}"
    );
    assert_eq!(statuses.iter().filter(|s| **s == 429).count(), 40);
    assert_eq!(
        app.requests().len(),
        20,
        "limited calls never reach the app"
    );

    // Per key: each user has a bucket of 2.
    let as_user = |user: &'static str| {
        let request = http::Request::get("/user/x")
            .header("host", "shop")
            .header("x-user", user)
            .body(postern_tests::empty())
            .unwrap();
        postern_tests::send(addr, request)
    };
    for user in ["alice", "bob"] {
        assert_eq!(as_user(user).await.status, 200);
        assert_eq!(as_user(user).await.status, 200);
        assert_eq!(as_user(user).await.status, 429, "{user}");
    }

    // The listener-wide limit is shadow: it counted but refused nothing.
    let shadow = scrape(
        proxy.admin_addr(),
        "postern_ratelimit_limited_total",
        &[
            ("listener", "rl-edge"),
            ("scope", "listener"),
            ("mode", "shadow"),
        ],
    )
    .await;
    assert!(shadow >= 60.0, "shadow counted: {shadow}");
    let enforced = scrape(
        proxy.admin_addr(),
        "postern_ratelimit_limited_total",
        &[
            ("listener", "rl-edge"),
            ("scope", "burst"),
            ("mode", "enforced"),
        ],
    )
    .await;
    assert_eq!(enforced, 40.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_calls_refused_by_rbac_or_a_rate_limit_get_grpc_status_codes() {
    use postern_tests::grpc::{self, pb::EchoRequest, GrpcBackend};
    let backend = GrpcBackend::start("grpc").await;
    let proxy = start_proxy(&format!(
        r#"
listeners:
  - name: grpc-policy
    address: 127.0.0.1:0
    kind: http
    http:
      rbac:
        rules:
          action: deny
          policies:
            - name: no-repeat
              permissions: [{{ path: {{ exact: /postern.test.echo.Echo/Repeat }} }}]
              principals: [{{ any: true }}]
    virtual_hosts:
      - name: all
        domains: ["*"]
        routes:
          - match: {{}}
            cluster: grpc
            local_rate_limit: {{ max_tokens: 1, fill_interval: 1h }}
clusters:
  - name: grpc
    protocol: http2
    endpoints: [{{ address: "{}" }}]
"#,
        backend.addr()
    ))
    .await;
    let mut client = grpc::client(listener(&proxy, "grpc-policy")).await.unwrap();
    let request = || EchoRequest {
        message: "hi".into(),
        repeat: 2,
    };
    let denied = client.repeat(request()).await.unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied, "{denied}");
    client
        .say(request())
        .await
        .expect("first call within the bucket");
    let limited = client.say(request()).await.unwrap_err();
    assert_eq!(limited.code(), tonic::Code::ResourceExhausted, "{limited}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_rbac_closes_connections_from_callers_the_policy_refuses() {
    let _recorder = postern::telemetry::install_prometheus_recorder();
    let dir = tempfile::tempdir().unwrap();
    let mesh = TestCa::new("mesh root");
    let files = mesh.write_identity(dir.path(), "db", "spiffe://cluster.local/ns/shop/sa/db");
    let echo = postern_tests::tcp_backend::TcpBackend::echo().await;
    let proxy = start_proxy(&format!(
        r#"
identity:
  spiffe_id: spiffe://cluster.local/ns/shop/sa/db
  source:
    files: {{ cert: {}, key: {}, bundle: {} }}
listeners:
  - name: tcp-rbac
    address: 127.0.0.1:0
    kind: tcp
    mtls: {{ mode: strict }}
    tcp:
      cluster: echo
      rbac:
        rules:
          policies:
            - name: web-only
              permissions: [{{ any: true }}]
              principals: [{{ spiffe_id: {{ exact: "{WEB}" }} }}]
clusters:
  - name: echo
    endpoints: [{{ address: "{}" }}]
"#,
        files.cert.display(),
        files.key.display(),
        files.bundle.display(),
        echo.addr()
    ))
    .await;
    within(Duration::from_secs(15), "identity", proxy.ready()).await;
    let addr = listener(&proxy, "tcp-rbac");
    let exchange = |client: postern_tests::mesh::Issued| async move {
        let mut tls = tls_connect(&probe_connector(Some(&client), &[]), addr, "db")
            .await
            .expect("handshake");
        let _ = tls.write_all(b"ping").await;
        let mut buf = [0u8; 4];
        let read = within(Duration::from_secs(10), "echo or close", tls.read(&mut buf)).await;
        matches!(read, Ok(4)).then_some(buf)
    };
    assert_eq!(exchange(mesh.issue(WEB, -60, 3600)).await, Some(*b"ping"));
    assert_eq!(
        exchange(mesh.issue(OTHER, -60, 3600)).await,
        None,
        "refused caller closed"
    );
    assert_eq!(
        echo.connections(),
        1,
        "the refused caller never reached the backend"
    );
    let denied = scrape(
        proxy.admin_addr(),
        "postern_rbac_denials_total",
        &[("listener", "tcp-rbac"), ("policy", "none")],
    )
    .await;
    assert_eq!(denied, 1.0);
}

#[test]
fn tcp_rbac_refuses_request_level_conditions() {
    let err = postern_tests::parse_config(
        r#"
listeners:
  - name: t
    address: 127.0.0.1:0
    kind: tcp
    tcp:
      cluster: c
      rbac:
        rules:
          policies:
            - name: p
              permissions: [{ path: { prefix: / } }]
              principals: [{ any: true }]
clusters:
  - name: c
    endpoints: [{ address: 127.0.0.1:9 }]
"#,
    )
    .unwrap_err()
    .0;
    assert!(
        err.contains("listeners[0].tcp.rbac.rules.policies[0].permissions[0]: a TCP listener's RBAC can only use"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rbac_sees_the_routed_authority_and_sanitised_forwarding_headers() {
    let app = HttpBackend::start("app").await;
    let proxy = start_proxy(&format!(
        r#"
listeners:
  - name: host-rbac
    address: 127.0.0.1:0
    kind: http
    http:
      rbac:
        rules:
          action: deny
          policies:
            - name: no-admin-host
              permissions: [{{ header: {{ name: ":authority", exact: admin.shop }} }}]
              principals: [{{ any: true }}]
            - name: mesh-callers-only-on-internal
              permissions: [{{ path: {{ prefix: /internal/ }} }}]
              principals:
                - not: {{ header: {{ name: x-forwarded-client-cert, present: true }} }}
    virtual_hosts:
      - name: all
        domains: ["*"]
        routes: [{{ match: {{}}, cluster: app }}]
clusters:
  - name: app
    endpoints: [{{ address: "{}" }}]
"#,
        app.addr()
    ))
    .await;
    let addr = listener(&proxy, "host-rbac");
    assert_eq!(get(addr, "public.shop", "/x").await.status, 200);
    assert_eq!(get(addr, "admin.shop", "/x").await.status, 403);

    // HTTP/2: the host is :authority, with no Host header.
    let mut h2 = postern_tests::H2Conn::connect(addr).await.expect("h2c");
    let request = http::Request::get("http://admin.shop/x")
        .body(postern_tests::empty())
        .unwrap();
    assert_eq!(h2.send(request).await.expect("h2 exchange").status, 403);

    // Absolute-form: the target's authority wins over a Host header.
    let reply = raw_exchange(
        addr,
        b"GET http://admin.shop/x HTTP/1.1\r\nhost: public.shop\r\nconnection: close\r\n\r\n",
        Duration::from_secs(10),
    )
    .await
    .expect("exchange");
    assert!(reply.text().starts_with("HTTP/1.1 403"), "{}", reply.text());

    // A plaintext caller's own x-forwarded-client-cert is gone before RBAC.
    let forged = http::Request::get("/internal/x")
        .header("host", "public.shop")
        .header(
            "x-forwarded-client-cert",
            "URI=spiffe://cluster.local/ns/a/sa/b",
        )
        .body(postern_tests::empty())
        .unwrap();
    assert_eq!(postern_tests::send(addr, forged).await.status, 403);
    assert_eq!(
        app.requests().len(),
        1,
        "only the first call reached the app"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_rbac_replaces_or_disables_the_listeners_and_is_counted_by_policy() {
    let _recorder = postern::telemetry::install_prometheus_recorder();
    let app = HttpBackend::start("app").await;
    let proxy = start_proxy(&format!(
        r#"
listeners:
  - name: route-rbac
    address: 127.0.0.1:0
    kind: http
    http:
      rbac:
        rules:
          action: deny
          policies:
            - name: no-admin
              permissions: [{{ path: {{ prefix: /admin }} }}]
              principals: [{{ any: true }}]
    virtual_hosts:
      - name: all
        domains: ["*"]
        routes:
          - name: admin-open
            match: {{ path: {{ prefix: /admin/open }} }}
            cluster: app
            rbac: {{ disabled: true }}
          - name: admin-team
            match: {{ path: {{ prefix: /admin/team }} }}
            cluster: app
            rbac:
              rules:
                policies:
                  - name: blue-team
                    permissions: [{{ any: true }}]
                    principals: [{{ header: {{ name: x-team, exact: blue }} }}]
          - name: public
            match: {{ path: {{ prefix: /public }} }}
            cluster: app
            rbac:
              rules:
                action: deny
                policies:
                  - name: public-read-only
                    permissions: [{{ not: {{ method: GET }} }}]
                    principals: [{{ any: true }}]
              shadow:
                action: deny
                policies:
                  - name: public-would-deny-debug
                    permissions: [{{ header: {{ name: x-debug, present: true }} }}]
                    principals: [{{ any: true }}]
          - name: rest
            match: {{}}
            cluster: app
clusters:
  - name: app
    endpoints: [{{ address: "{}" }}]
"#,
        app.addr()
    ))
    .await;
    let addr = listener(&proxy, "route-rbac");
    let call = |method: &str, path: &str, header: Option<(&str, &str)>| {
        let mut builder = postern_tests::request(method, "shop", path);
        if let Some((name, value)) = header {
            builder = builder.header(name, value);
        }
        let request = builder.body(postern_tests::empty()).unwrap();
        async move { postern_tests::send(addr, request).await.status }
    };
    // The listener's rules where a route has none.
    assert_eq!(call("GET", "/admin/x", None).await, 403);
    assert_eq!(call("POST", "/other", None).await, 200);
    // Disabled on the route: what the listener denies passes.
    assert_eq!(call("GET", "/admin/open/x", None).await, 200);
    // Replaced: the route's allow rules decide, not the listener's deny.
    assert_eq!(call("GET", "/admin/team/x", None).await, 403);
    assert_eq!(
        call("GET", "/admin/team/x", Some(("x-team", "blue"))).await,
        200
    );
    // Replaced the other way: the route denies what the listener allows.
    assert_eq!(call("POST", "/public/x", None).await, 403);
    assert_eq!(
        call("GET", "/public/x", Some(("x-debug", "1"))).await,
        200,
        "shadow rules of an override only count"
    );
    let reached: Vec<String> = app.requests().iter().map(|r| r.path_and_query()).collect();
    assert_eq!(
        reached,
        ["/other", "/admin/open/x", "/admin/team/x", "/public/x"],
        "denied calls never reach the app"
    );

    for (policy, count) in [("no-admin", 1.0), ("none", 1.0), ("public-read-only", 1.0)] {
        let denied = scrape(
            proxy.admin_addr(),
            "postern_rbac_denials_total",
            &[("listener", "route-rbac"), ("policy", policy)],
        )
        .await;
        assert_eq!(denied, count, "{policy}");
    }
    wait_until("the override's shadow denial counted", || async {
        scrape(
            proxy.admin_addr(),
            "postern_rbac_shadow_denials_total",
            &[
                ("listener", "route-rbac"),
                ("policy", "public-would-deny-debug"),
            ],
        )
        .await
            >= 1.0
    })
    .await;
}

fn port_rbac_config(app: std::net::SocketAddr, closed_port: Option<u16>) -> String {
    let port_policy = closed_port.map_or(String::new(), |port| {
        format!(
            r#"
            - name: closed-port
              permissions: [{{ destination_port: {port} }}]
              principals: [{{ any: true }}]"#
        )
    });
    let listener = |name: &str| {
        format!(
            r#"
  - name: {name}
    address: 127.0.0.1:0
    kind: http
    http:
      rbac:
        rules:
          action: deny
          policies:
            - name: blocked-header
              permissions: [{{ header: {{ name: x-blocked, present: true }} }}]
              principals: [{{ any: true }}]{port_policy}
    virtual_hosts:
      - name: all
        domains: ["*"]
        routes: [{{ match: {{}}, cluster: app }}]"#
        )
    };
    format!(
        "listeners:{}{}\nclusters:\n  - name: app\n    endpoints: [{{ address: \"{app}\" }}]\n",
        listener("port-a"),
        listener("port-b")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rbac_deny_by_header_and_by_destination_port() {
    let app = HttpBackend::start("app").await;
    let proxy = start_proxy(&port_rbac_config(app.addr(), None)).await;
    let (a, b) = (listener(&proxy, "port-a"), listener(&proxy, "port-b"));
    let blocked = |addr| async move {
        let request = postern_tests::request("GET", "shop", "/x")
            .header("x-blocked", "yes")
            .body(postern_tests::empty())
            .unwrap();
        postern_tests::send(addr, request).await.status
    };
    assert_eq!(get(a, "shop", "/x").await.status, 200);
    assert_eq!(blocked(a).await, 403);

    // Only now is port-a's port known: deny it, in place (same listeners,
    // same sockets), and port-b, on another port, stays open.
    let next =
        postern_tests::parse_config(&port_rbac_config(app.addr(), Some(a.port()))).expect("config");
    proxy.runtime().apply(next).expect("apply");
    assert_eq!(listener(&proxy, "port-a"), a, "not rebound");
    assert_eq!(get(a, "shop", "/x").await.status, 403);
    assert_eq!(get(b, "shop", "/x").await.status, 200);
    assert_eq!(blocked(b).await, 403);
    assert_eq!(app.requests().len(), 2, "denied calls never reach the app");
}

fn sni_identity() -> (
    tempfile::TempDir,
    TestCa,
    postern_tests::mesh::IdentityFiles,
) {
    let dir = tempfile::tempdir().expect("temp dir");
    let mesh = TestCa::new("mesh root");
    let files = mesh.write_identity(dir.path(), "api", "spiffe://cluster.local/ns/shop/sa/api");
    (dir, mesh, files)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requested_server_name_is_the_tls_sni_for_http_and_never_plaintext() {
    let (_dir, mesh, files) = sni_identity();
    let app = HttpBackend::start("app").await;
    let proxy = start_proxy(&format!(
        r#"
identity:
  spiffe_id: spiffe://cluster.local/ns/shop/sa/api
  source:
    files: {{ cert: {}, key: {}, bundle: {} }}
listeners:
  - name: sni-in
    address: 127.0.0.1:0
    kind: http
    mtls: {{ mode: permissive }}
    http:
      rbac:
        rules:
          policies:
            - name: api-sni
              permissions: [{{ requested_server_name: {{ exact: api.shop }} }}]
              principals: [{{ any: true }}]
    virtual_hosts:
      - name: all
        domains: ["*"]
        routes: [{{ match: {{}}, cluster: app }}]
clusters:
  - name: app
    endpoints: [{{ address: "{}" }}]
"#,
        files.cert.display(),
        files.key.display(),
        files.bundle.display(),
        app.addr()
    ))
    .await;
    within(Duration::from_secs(15), "identity", proxy.ready()).await;
    let addr = listener(&proxy, "sni-in");
    let web = mesh.issue(WEB, -60, 3600);
    let status_with_sni = |sni: &'static str| {
        let connector = probe_connector(Some(&web), &[b"http/1.1"]);
        async move {
            let mut tls = tls_connect(&connector, addr, sni).await.expect("handshake");
            // The Host names the same service every time: only the SNI differs.
            tls.write_all(request("GET", "/x", "").as_bytes())
                .await
                .expect("write");
            let mut out = Vec::new();
            within(Duration::from_secs(10), "reply", tls.read_to_end(&mut out))
                .await
                .expect("read");
            let text = String::from_utf8_lossy(&out).into_owned();
            text.get(9..12)
                .and_then(|s| s.parse::<u16>().ok())
                .unwrap_or(0)
        }
    };
    assert_eq!(status_with_sni("api.shop").await, 200);
    assert_eq!(status_with_sni("other.shop").await, 403);
    // Plaintext carries no SNI, and a Host of api.shop is no stand-in.
    assert_eq!(get(addr, "api.shop", "/x").await.status, 403);
    assert_eq!(app.requests().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_rbac_matches_the_tls_sni() {
    let (_dir, mesh, files) = sni_identity();
    let echo = postern_tests::tcp_backend::TcpBackend::echo().await;
    let proxy = start_proxy(&format!(
        r#"
identity:
  spiffe_id: spiffe://cluster.local/ns/shop/sa/api
  source:
    files: {{ cert: {}, key: {}, bundle: {} }}
listeners:
  - name: tcp-sni
    address: 127.0.0.1:0
    kind: tcp
    mtls: {{ mode: strict }}
    tcp:
      cluster: echo
      rbac:
        rules:
          policies:
            - name: db-names
              permissions: [{{ requested_server_name: {{ prefix: db. }} }}]
              principals: [{{ any: true }}]
clusters:
  - name: echo
    endpoints: [{{ address: "{}" }}]
"#,
        files.cert.display(),
        files.key.display(),
        files.bundle.display(),
        echo.addr()
    ))
    .await;
    within(Duration::from_secs(15), "identity", proxy.ready()).await;
    let addr = listener(&proxy, "tcp-sni");
    let web = mesh.issue(WEB, -60, 3600);
    let exchange = |sni: &'static str| {
        let connector = probe_connector(Some(&web), &[]);
        async move {
            let mut tls = tls_connect(&connector, addr, sni).await.expect("handshake");
            let _ = tls.write_all(b"ping").await;
            let mut buf = [0u8; 4];
            let read = within(Duration::from_secs(10), "echo or close", tls.read(&mut buf)).await;
            matches!(read, Ok(4)).then_some(buf)
        }
    };
    assert_eq!(exchange("db.shop").await, Some(*b"ping"));
    assert_eq!(exchange("cache.shop").await, None, "refused SNI closed");
    assert_eq!(echo.connections(), 1);
}

//! JWT authentication end to end: tokens checked before RBAC, claims copied
//! to the backend, tokens stripped, 401s with RFC 6750 challenges, keys
//! fetched through a cluster with rotation and a bounded refetch, cached
//! keys that outlive their server, claims in RBAC and rate limits, and the
//! filter pushed over ADS (and NACKed when invalid).

use std::time::{SystemTime, UNIX_EPOCH};

use postern_tests::jwt::{jwks, JwksServer, TestKey};
use postern_tests::{get, listener, send, start_proxy, HttpBackend, TestResponse};
use serde_json::{json, Value};

const ISSUER: &str = "https://issuer.test";

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

fn claims(sub: &str, role: &str) -> Value {
    json!({"iss": ISSUER, "aud": "api", "sub": sub, "role": role,
           "iat": now(), "exp": now() + 600})
}

async fn get_with(
    addr: std::net::SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> TestResponse {
    let mut request = http::Request::get(path).header("host", "shop");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    send(addr, request.body(postern_tests::empty()).expect("request")).await
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_checked_claims_reach_the_backend_and_tokens_are_stripped() {
    let key = TestKey::new("k1");
    let app = HttpBackend::start("app").await;
    let proxy = start_proxy(&format!(
        r#"
listeners:
  - name: jwt-edge
    address: 127.0.0.1:0
    kind: http
    http:
      jwt:
        providers:
          bearer:
            issuer: {ISSUER}
            audiences: [api]
            jwks: {{ inline: '{jwks}' }}
            claim_to_headers: [{{ claim: sub, header: x-jwt-sub }}]
          api-token:
            issuer: {ISSUER}
            jwks: {{ inline: '{jwks}' }}
            from_headers: [{{ name: x-api-token }}]
            forward: true
        rules:
          - match: {{ path: {{ prefix: /public }} }}
          - match: {{ path: {{ prefix: / }} }}
            requires: {{ any: [{{ provider: bearer }}, {{ provider: api-token }}] }}
        requirement_map:
          optional: {{ any: [{{ provider: bearer }}, {{ allow_missing: true }}] }}
    virtual_hosts:
      - name: all
        domains: ["*"]
        routes:
          - match: {{ path: {{ prefix: /open }} }}
            cluster: app
            jwt: {{ disabled: true }}
          - match: {{ path: {{ prefix: /maybe }} }}
            cluster: app
            jwt: {{ requirement: optional }}
          - match: {{}}
            cluster: app
clusters:
  - name: app
    endpoints: [{{ address: "{app}" }}]
"#,
        jwks = jwks(&[&key]),
        app = app.addr(),
    ))
    .await;
    let addr = listener(&proxy, "jwt-edge");
    let token = key.token(&claims("alice", "admin"));

    let ok = get_with(addr, "/orders", &[("authorization", &bearer(&token))]).await;
    assert_eq!(ok.status, 200);
    let seen = app.last_request();
    assert_eq!(seen.header("x-jwt-sub"), Some("alice"));
    assert_eq!(
        seen.header("authorization"),
        None,
        "forward: false strips the token"
    );

    // A provider that forwards keeps its token; claims of another are not forged.
    let kept = get_with(
        addr,
        "/orders",
        &[("x-api-token", &token), ("x-jwt-sub", "mallory")],
    )
    .await;
    assert_eq!(kept.status, 200);
    let seen = app.last_request();
    assert_eq!(seen.header("x-api-token"), Some(token.as_str()));
    assert_eq!(
        seen.header("x-jwt-sub"),
        None,
        "a caller's own claim header is removed"
    );

    // Public paths need no token: by rule, or by the route's own setting.
    assert_eq!(get(addr, "shop", "/public/x").await.status, 200);
    assert_eq!(get(addr, "shop", "/open/x").await.status, 200);
    assert_eq!(get(addr, "shop", "/maybe/x").await.status, 200);
    let impostor = TestKey::new("k1").token(&claims("alice", "admin"));
    let bad = get_with(addr, "/maybe/x", &[("authorization", &bearer(&impostor))]).await;
    assert_eq!(bad.status, 401, "allow_missing still refuses a bad token");
    let reached = app.requests().len();

    // Missing: a challenge without an error code (RFC 6750 §3.1).
    let missing = get_with(addr, "/orders?page=2", &[("x-jwt-sub", "mallory")]).await;
    assert_eq!(missing.status, 401);
    assert_eq!(
        missing.header("www-authenticate"),
        Some(r#"Bearer realm="http://shop/orders""#)
    );
    assert_eq!(&missing.body[..], b"Jwt is missing");

    // Bad signature: same kid, another key.
    let forged = get_with(addr, "/orders", &[("authorization", &bearer(&impostor))]).await;
    assert_eq!(forged.status, 401);
    assert_eq!(
        forged.header("www-authenticate"),
        Some(r#"Bearer realm="http://shop/orders", error="invalid_token""#)
    );

    // Expired, past the default 60s skew; and an audience that is not ours.
    let expired =
        key.token(&json!({"iss": ISSUER, "aud": "api", "sub": "alice", "exp": now() - 120}));
    let other_aud =
        key.token(&json!({"iss": ISSUER, "aud": "web", "sub": "alice", "exp": now() + 600}));
    for token in [expired, other_aud] {
        let refused = get_with(addr, "/orders", &[("authorization", &bearer(&token))]).await;
        assert_eq!(refused.status, 401);
    }
    assert_eq!(
        app.requests().len(),
        reached,
        "refused calls never reach the app"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_calls_without_a_token_get_unauthenticated() {
    use postern_tests::grpc::{self, pb::EchoRequest, GrpcBackend};
    let key = TestKey::new("k1");
    let backend = GrpcBackend::start("grpc").await;
    let proxy = start_proxy(&format!(
        r#"
listeners:
  - name: grpc-jwt
    address: 127.0.0.1:0
    kind: http
    http:
      jwt:
        providers:
          idp: {{ issuer: "{ISSUER}", jwks: {{ inline: '{jwks}' }} }}
        rules: [{{ match: {{}}, requires: {{ provider: idp }} }}]
    virtual_hosts:
      - name: all
        domains: ["*"]
        routes: [{{ match: {{}}, cluster: grpc }}]
clusters:
  - name: grpc
    protocol: http2
    endpoints: [{{ address: "{addr}" }}]
"#,
        jwks = jwks(&[&key]),
        addr = backend.addr(),
    ))
    .await;
    let mut client = grpc::client(listener(&proxy, "grpc-jwt")).await.unwrap();
    let refused = client
        .say(EchoRequest {
            message: "hi".into(),
            repeat: 1,
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused}");

    let mut request = tonic::Request::new(EchoRequest {
        message: "hi".into(),
        repeat: 1,
    });
    let value = bearer(&key.token(&claims("alice", "admin")));
    request
        .metadata_mut()
        .insert("authorization", value.parse().unwrap());
    client
        .say(request)
        .await
        .expect("a call with a token passes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_keys_are_fetched_through_a_cluster_rotated_and_refetched_within_bounds() {
    let (k1, k2, k3) = (TestKey::new("k1"), TestKey::new("k2"), TestKey::new("k3"));
    let server = JwksServer::start(jwks(&[&k1])).await;
    let app = HttpBackend::start("app").await;
    let proxy = start_proxy(&format!(
        r#"
listeners:
  - name: remote-jwt
    address: 127.0.0.1:0
    kind: http
    http:
      jwt:
        providers:
          idp:
            issuer: {ISSUER}
            jwks:
              remote:
                uri: http://idp.test/.well-known/jwks.json
                cluster: idp
                cache_duration: 10m
                min_refetch_interval: 1h
        rules: [{{ match: {{}}, requires: {{ provider: idp }} }}]
    virtual_hosts:
      - name: all
        domains: ["*"]
        routes: [{{ match: {{}}, cluster: app }}]
clusters:
  - name: app
    endpoints: [{{ address: "{app}" }}]
  - name: idp
    endpoints: [{{ address: "{idp}" }}]
"#,
        app = app.addr(),
        idp = server.addr(),
    ))
    .await;
    let addr = listener(&proxy, "remote-jwt");
    let call = |key: &TestKey| {
        let header = bearer(&key.token(&claims("alice", "admin")));
        async move {
            get_with(addr, "/x", &[("authorization", &header)])
                .await
                .status
        }
    };

    assert_eq!(call(&k1).await, 200);
    assert_eq!(call(&k1).await, 200);
    let fetches = server.fetches();
    assert_eq!(fetches.len(), 1, "fetched once, then cached: {fetches:?}");
    assert_eq!(fetches[0].path, "/.well-known/jwks.json");
    assert_eq!(fetches[0].host.as_deref(), Some("idp.test"));

    // Rotation: a token with the new kid makes the proxy look again.
    server.publish(jwks(&[&k1, &k2]));
    assert_eq!(call(&k2).await, 200);
    assert_eq!(server.fetches().len(), 2);

    // Within min_refetch_interval, unknown kids cost no more fetches.
    server.publish(jwks(&[&k1, &k2, &k3]));
    for _ in 0..10 {
        assert_eq!(call(&k3).await, 401);
    }
    assert_eq!(call(&TestKey::new("forged")).await, 401);
    assert_eq!(server.fetches().len(), 2, "the refetch bound held");
    assert_eq!(call(&k1).await, 200, "known keys keep working");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rbac_and_rate_limits_see_verified_claims() {
    let key = TestKey::new("k1");
    let app = HttpBackend::start("app").await;
    let proxy = start_proxy(&format!(
        r#"
listeners:
  - name: claims-edge
    address: 127.0.0.1:0
    kind: http
    http:
      jwt:
        providers:
          idp: {{ issuer: "{ISSUER}", audiences: [api], jwks: {{ inline: '{jwks}' }} }}
        rules: [{{ match: {{}}, requires: {{ provider: idp }} }}]
      rbac:
        rules:
          policies:
            - name: admins
              permissions: [{{ any: true }}]
              principals: [{{ jwt_claim: {{ name: role, exact: admin }} }}]
    virtual_hosts:
      - name: all
        domains: ["*"]
        routes:
          - match: {{}}
            cluster: app
            local_rate_limit:
              max_tokens: 2
              fill_interval: 1h
              key: {{ jwt_claim: sub }}
clusters:
  - name: app
    endpoints: [{{ address: "{app}" }}]
"#,
        jwks = jwks(&[&key]),
        app = app.addr(),
    ))
    .await;
    let addr = listener(&proxy, "claims-edge");
    let as_user = |sub: &str, role: &str| {
        let header = bearer(&key.token(&claims(sub, role)));
        async move {
            get_with(addr, "/x", &[("authorization", &header)])
                .await
                .status
        }
    };

    // A valid token that RBAC refuses: 403, not 401.
    assert_eq!(as_user("carol", "reader").await, 403);
    assert_eq!(get(addr, "shop", "/x").await.status, 401);

    // Each subject has its own bucket of two.
    for sub in ["alice", "bob"] {
        assert_eq!(as_user(sub, "admin").await, 200, "{sub}");
        assert_eq!(as_user(sub, "admin").await, 200, "{sub}");
        assert_eq!(as_user(sub, "admin").await, 429, "{sub}");
    }
    assert_eq!(app.requests().len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_remote_keys_keep_working_when_the_key_server_goes_down() {
    let (k1, k2) = (TestKey::new("k1"), TestKey::new("k2"));
    let server = JwksServer::start(jwks(&[&k1])).await;
    let idp = server.addr();
    let app = HttpBackend::start("app").await;
    let proxy = start_proxy(&format!(
        r#"
listeners:
  - name: cached-jwt
    address: 127.0.0.1:0
    kind: http
    http:
      jwt:
        providers:
          idp:
            issuer: {ISSUER}
            jwks:
              remote:
                uri: http://idp.test/jwks.json
                cluster: idp
                cache_duration: 10m
        rules: [{{ match: {{}}, requires: {{ provider: idp }} }}]
    virtual_hosts:
      - name: all
        domains: ["*"]
        routes: [{{ match: {{}}, cluster: app }}]
clusters:
  - name: app
    endpoints: [{{ address: "{app}" }}]
  - name: idp
    endpoints: [{{ address: "{idp}" }}]
"#,
        app = app.addr(),
    ))
    .await;
    let addr = listener(&proxy, "cached-jwt");
    let call = |key: &TestKey| {
        let header = bearer(&key.token(&claims("alice", "admin")));
        async move {
            get_with(addr, "/x", &[("authorization", &header)])
                .await
                .status
        }
    };
    assert_eq!(call(&k1).await, 200);
    assert_eq!(server.fetches().len(), 1);

    drop(server);
    postern_tests::wait_until("the key server refuses connections", || async {
        tokio::net::TcpStream::connect(idp).await.is_err()
    })
    .await;
    for _ in 0..3 {
        assert_eq!(call(&k1).await, 200, "cached keys still verify");
    }
    // An unknown kid makes the proxy try the server, which fails: that
    // token is refused, and the cached keys are kept, not dropped.
    assert_eq!(call(&k2).await, 401);
    assert_eq!(call(&k1).await, 200, "cached keys survive a failed fetch");
    assert_eq!(app.requests().len(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_authn_arrives_by_ads_and_an_invalid_one_is_nacked() {
    use std::collections::HashMap;

    use postern_control::ads::{AdsEventKind, Snapshot};
    use postern_proto::envoy::config::core::v3 as core;
    use postern_proto::envoy::config::route::v3 as route;
    use postern_proto::envoy::extensions::filters::http::jwt_authn::v3 as jwt_authn;
    use postern_proto::envoy::extensions::filters::network::http_connection_manager::v3 as hcm;
    use postern_proto::type_url;
    use postern_tests::control::{is_nack, wait_acks, wait_event, ControlPlane};
    use postern_tests::envoy::{http_listener_with_filters, static_cluster};

    let key = TestKey::new("k1");
    let app = HttpBackend::start("app").await;
    let authentication = |provider: &str| jwt_authn::JwtAuthentication {
        providers: HashMap::from([(
            "idp".to_string(),
            jwt_authn::JwtProvider {
                issuer: ISSUER.into(),
                audiences: vec!["api".into()],
                jwks_source_specifier: Some(
                    jwt_authn::jwt_provider::JwksSourceSpecifier::LocalJwks(core::DataSource {
                        specifier: Some(core::data_source::Specifier::InlineString(jwks(&[&key]))),
                        ..Default::default()
                    }),
                ),
                ..Default::default()
            },
        )]),
        rules: vec![jwt_authn::RequirementRule {
            r#match: Some(route::RouteMatch {
                path_specifier: Some(route::route_match::PathSpecifier::Prefix("/".into())),
                ..Default::default()
            }),
            requirement_type: Some(jwt_authn::requirement_rule::RequirementType::Requires(
                jwt_authn::JwtRequirement {
                    requires_type: Some(jwt_authn::jwt_requirement::RequiresType::ProviderName(
                        provider.into(),
                    )),
                },
            )),
        }],
        ..Default::default()
    };
    let snapshot = |version: &str, provider: &str| {
        let filter = hcm::HttpFilter {
            name: "envoy.filters.http.jwt_authn".into(),
            config_type: Some(hcm::http_filter::ConfigType::TypedConfig(
                postern_control::ads::pack(&authentication(provider)),
            )),
            ..Default::default()
        };
        let mut s = Snapshot::new(version);
        s.add_message(
            "jwt-xds",
            &http_listener_with_filters(
                "jwt-xds",
                "127.0.0.1:0".parse().unwrap(),
                "app",
                None,
                vec![filter],
            ),
        );
        s.add_message("app", &static_cluster("app", app.addr(), None));
        s
    };
    let cp = ControlPlane::start(snapshot("1", "idp")).await;
    let mut events = cp.server.events();
    let proxy = start_proxy(&format!(
        r#"
node: {{ id: "sidecar~127.0.0.1~jwt.default~default.svc.cluster.local", cluster: jwt }}
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
    postern_tests::wait_until("listener bound", || async {
        proxy.listener_addr("jwt-xds").is_some()
    })
    .await;
    let addr = listener(&proxy, "jwt-xds");
    let token = bearer(&key.token(&claims("alice", "admin")));
    assert_eq!(get_with(addr, "/x", &[]).await.status, 401);
    assert_eq!(
        get_with(addr, "/x", &[("authorization", &token)])
            .await
            .status,
        200
    );

    // A requirement naming a provider that does not exist: NACKed, naming
    // it, and the last good filter keeps checking tokens.
    cp.server.set_snapshot(snapshot("2", "nobody"));
    let nack = wait_event(&mut events, "listener NACK", |e| {
        is_nack(e, type_url::LISTENER)
    })
    .await;
    let AdsEventKind::Nack { error, .. } = nack.kind else {
        unreachable!()
    };
    assert!(error.contains("unknown provider \"nobody\""), "{error}");
    assert_eq!(get_with(addr, "/x", &[]).await.status, 401);
    assert_eq!(
        get_with(addr, "/x", &[("authorization", &token)])
            .await
            .status,
        200
    );
    assert_eq!(app.requests().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disabled_jwt_filter_checks_nothing_and_a_route_turning_it_on_fails_closed() {
    use std::collections::HashMap;

    use postern_control::ads::{pack, Snapshot};
    use postern_proto::envoy::config::listener::v3 as listener_v3;
    use postern_proto::envoy::config::route::v3 as route;
    use postern_proto::envoy::extensions::filters::http::jwt_authn::v3 as jwt_authn;
    use postern_proto::envoy::extensions::filters::http::router::v3::Router;
    use postern_proto::envoy::extensions::filters::network::http_connection_manager::v3 as hcm;
    use postern_proto::type_url;
    use postern_tests::control::{wait_acks, ControlPlane};
    use postern_tests::envoy::{http_listener, static_cluster};

    let app = HttpBackend::start("app").await;
    let to_app =
        |prefix: &str, per_filter: HashMap<String, postern_proto::google::protobuf::Any>| {
            route::Route {
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
                typed_per_filter_config: per_filter,
                ..Default::default()
            }
        };
    // Envoy's way to turn a disabled filter on for one route: a FilterConfig
    // with disabled: false around its per-route config.
    let turned_on = pack(&route::FilterConfig {
        config: Some(pack(&jwt_authn::PerRouteConfig {
            requirement_specifier: Some(
                jwt_authn::per_route_config::RequirementSpecifier::RequirementName("strict".into()),
            ),
        })),
        is_optional: false,
        disabled: false,
    });
    let manager = hcm::HttpConnectionManager {
        stat_prefix: "jwt-off".into(),
        route_specifier: Some(hcm::http_connection_manager::RouteSpecifier::RouteConfig(
            route::RouteConfiguration {
                name: "jwt-off-routes".into(),
                virtual_hosts: vec![route::VirtualHost {
                    name: "all".into(),
                    domains: vec!["*".into()],
                    routes: vec![
                        to_app(
                            "/strict",
                            HashMap::from([("envoy.filters.http.jwt_authn".into(), turned_on)]),
                        ),
                        to_app("/", HashMap::new()),
                    ],
                    ..Default::default()
                }],
                ..Default::default()
            },
        )),
        http_filters: vec![
            hcm::HttpFilter {
                name: "envoy.filters.http.jwt_authn".into(),
                config_type: Some(hcm::http_filter::ConfigType::TypedConfig(pack(
                    &jwt_authn::JwtAuthentication::default(),
                ))),
                disabled: true,
                ..Default::default()
            },
            hcm::HttpFilter {
                name: "envoy.filters.http.router".into(),
                config_type: Some(hcm::http_filter::ConfigType::TypedConfig(pack(
                    &Router::default(),
                ))),
                ..Default::default()
            },
        ],
        ..Default::default()
    };
    let mut jwt_off = http_listener(
        "jwt-off",
        "127.0.0.1:0".parse().expect("address"),
        "app",
        None,
    );
    jwt_off.filter_chains = vec![listener_v3::FilterChain {
        filters: vec![listener_v3::Filter {
            name: "envoy.filters.network.http_connection_manager".into(),
            config_type: Some(listener_v3::filter::ConfigType::TypedConfig(pack(&manager))),
        }],
        ..Default::default()
    }];
    let mut snapshot = Snapshot::new("1");
    snapshot.add_message("jwt-off", &jwt_off);
    snapshot.add_message("app", &static_cluster("app", app.addr(), None));
    let cp = ControlPlane::start(snapshot).await;
    let mut events = cp.server.events();
    let proxy = start_proxy(&format!(
        r#"
node: {{ id: "sidecar~127.0.0.1~jwt-off.default~default.svc.cluster.local", cluster: jwt-off }}
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
    postern_tests::wait_until("listener bound", || async {
        proxy.listener_addr("jwt-off").is_some()
    })
    .await;
    let addr = listener(&proxy, "jwt-off");
    // Disabled: the filter runs on no route that leaves it off.
    assert_eq!(get_with(addr, "/open", &[]).await.status, 200);
    // Turned on for a route, without the providers Postern did not keep:
    // refused, never let through unchecked.
    let refused = get_with(addr, "/strict/x", &[]).await;
    assert_eq!(refused.status, 401);
    assert!(refused.header("www-authenticate").is_some());
    assert_eq!(app.requests().len(), 1);
}

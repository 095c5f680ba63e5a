//! Routing: virtual host selection, route matching, weighted splits,
//! rewrites, direct responses and redirects.

use postern_tests::{empty, get, listener, request, send, start_proxy, H2Conn, HttpBackend};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_matching_prefers_exact_then_longest_suffix_then_wildcard() {
    let exact = HttpBackend::start("exact").await;
    let suffix = HttpBackend::start("suffix").await;
    let deeper = HttpBackend::start("deeper").await;
    let any = HttpBackend::start("any").await;
    let (a, b, c, d) = (exact.addr(), suffix.addr(), deeper.addr(), any.addr());
    let proxy = start_proxy(&format!(
        r#"
        listeners:
          - name: edge
            address: 127.0.0.1:0
            kind: http
            virtual_hosts:
              - name: any
                domains: ["*"]
                routes:
                  - match: {{}}
                    cluster: any
              - name: suffix
                domains: ["*.example.com"]
                routes:
                  - match: {{}}
                    cluster: suffix
              - name: deeper
                domains: ["*.api.example.com"]
                routes:
                  - match: {{}}
                    cluster: deeper
              - name: exact
                domains: [api.example.com]
                routes:
                  - match: {{}}
                    cluster: exact
        clusters:
          - name: exact
            endpoints: [{{ address: "{a}" }}]
          - name: suffix
            endpoints: [{{ address: "{b}" }}]
          - name: deeper
            endpoints: [{{ address: "{c}" }}]
          - name: any
            endpoints: [{{ address: "{d}" }}]
        "#
    ))
    .await;
    let edge = listener(&proxy, "edge");

    for (host, want) in [
        ("api.example.com", "exact"),
        // Host matching ignores case, the port and a trailing dot.
        ("API.Example.COM", "exact"),
        ("api.example.com:8080", "exact"),
        ("api.example.com.", "exact"),
        ("www.example.com", "suffix"),
        ("a.b.example.com", "suffix"),
        ("v2.api.example.com", "deeper"),
        ("example.com", "any"),
        ("other.org", "any"),
    ] {
        let response = get(edge, host, "/").await;
        assert_eq!(response.status, 200, "host {host}");
        assert_eq!(response.backend(), Some(want), "host {host}");
    }

    // HTTP/2 routes by :authority.
    let mut h2 = H2Conn::connect(edge).await.unwrap();
    let response = h2
        .send(
            request("GET", "x.api.example.com", "/")
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status, 200);
    assert_eq!(response.backend(), Some("deeper"));
    let response = h2
        .send(
            request("GET", "api.example.com", "/")
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.backend(), Some("exact"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_host_without_wildcard_is_404() {
    let backend = HttpBackend::start("only").await;
    let addr = backend.addr();
    let proxy = start_proxy(&format!(
        r#"
        listeners:
          - name: edge
            address: 127.0.0.1:0
            kind: http
            virtual_hosts:
              - name: only
                domains: [only.example.com]
                routes:
                  - match: {{}}
                    cluster: only
        clusters:
          - name: only
            endpoints: [{{ address: "{addr}" }}]
        "#
    ))
    .await;
    let edge = listener(&proxy, "edge");
    assert_eq!(get(edge, "other.example.com", "/").await.status, 404);
    assert_eq!(get(edge, "only.example.com", "/").await.status, 200);
    assert_eq!(backend.started(), 1, "the 404 must not reach the backend");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_matching_exact_prefix_regex_first_match_wins() {
    let exact = HttpBackend::start("exact").await;
    let prefix = HttpBackend::start("prefix").await;
    let regex = HttpBackend::start("regex").await;
    let (a, b, c) = (exact.addr(), prefix.addr(), regex.addr());
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
                  - name: exact
                    match:
                      path: {{ exact: /api/status }}
                    cluster: exact
                  - name: regex
                    match:
                      path: {{ regex: '/users/[0-9]+' }}
                    cluster: regex
                  - name: prefix
                    match:
                      path: {{ prefix: /api/ }}
                    cluster: prefix
        clusters:
          - name: exact
            endpoints: [{{ address: "{a}" }}]
          - name: prefix
            endpoints: [{{ address: "{b}" }}]
          - name: regex
            endpoints: [{{ address: "{c}" }}]
        "#
    ))
    .await;
    let edge = listener(&proxy, "edge");

    for (path, want) in [
        ("/api/status", Some("exact")),
        // The query string is not part of the matched path.
        ("/api/status?verbose=1", Some("exact")),
        // Earlier routes win: /api/status/x is not exact, so prefix.
        ("/api/status/x", Some("prefix")),
        ("/api/", Some("prefix")),
        ("/api/orders/7", Some("prefix")),
        ("/users/42", Some("regex")),
        // Regexes are anchored to the whole path.
        ("/users/42/profile", None),
        ("/x/users/42", None),
        ("/api", None),
        ("/", None),
    ] {
        let response = get(edge, "svc.local", path).await;
        match want {
            Some(name) => {
                assert_eq!(response.status, 200, "path {path}");
                assert_eq!(response.backend(), Some(name), "path {path}");
            }
            None => {
                assert_eq!(response.status, 404, "path {path}");
                assert_eq!(response.backend(), None, "path {path}");
            }
        }
    }
    assert_eq!(
        exact.last_request().path_and_query(),
        "/api/status?verbose=1"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_matching_exact_present_regex_invert() {
    let backends = [
        HttpBackend::start("exact").await,
        HttpBackend::start("regex").await,
        HttpBackend::start("present").await,
        HttpBackend::start("inverted").await,
        HttpBackend::start("fallback").await,
    ];
    let [a, b, c, d, e] = backends.each_ref().map(HttpBackend::addr);
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
                  - match:
                      headers:
                        - name: X-Env
                          exact: canary
                    cluster: exact
                  - match:
                      headers:
                        - name: x-version
                          regex: 'v[0-9]+'
                    cluster: regex
                  - match:
                      headers:
                        - name: x-debug
                          present: true
                    cluster: present
                  - match:
                      headers:
                        - name: x-tier
                          exact: gold
                          invert: true
                        - name: x-tier
                    cluster: inverted
                  - match: {{}}
                    cluster: fallback
        clusters:
          - name: exact
            endpoints: [{{ address: "{a}" }}]
          - name: regex
            endpoints: [{{ address: "{b}" }}]
          - name: present
            endpoints: [{{ address: "{c}" }}]
          - name: inverted
            endpoints: [{{ address: "{d}" }}]
          - name: fallback
            endpoints: [{{ address: "{e}" }}]
        "#
    ))
    .await;
    let edge = listener(&proxy, "edge");

    let cases: &[(&[(&str, &str)], &str)] = &[
        (&[("x-env", "canary")], "exact"),
        (&[("x-env", "Canary")], "fallback"),
        (&[("x-env", "canary-2")], "fallback"),
        (&[("x-version", "v12")], "regex"),
        // Anchored: the whole value must match.
        (&[("x-version", "v12-beta")], "fallback"),
        (&[("x-version", "xv1")], "fallback"),
        (&[("x-debug", "")], "present"),
        (&[("x-debug", "1")], "present"),
        (&[("x-tier", "silver")], "inverted"),
        (&[("x-tier", "gold")], "fallback"),
        (&[], "fallback"),
    ];
    for (headers, want) in cases {
        let mut req = request("GET", "svc.local", "/");
        for (name, value) in *headers {
            req = req.header(*name, *value);
        }
        let response = send(edge, req.body(empty()).unwrap()).await;
        assert_eq!(response.status, 200, "headers {headers:?}");
        assert_eq!(response.backend(), Some(*want), "headers {headers:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_present_false_matches_absent_header() {
    let open = HttpBackend::start("open").await;
    let addr = open.addr();
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
                  - match:
                      headers:
                        - name: authorization
                          present: false
                    direct_response:
                      status: 401
                      body: "missing credentials"
                  - match: {{}}
                    cluster: open
        clusters:
          - name: open
            endpoints: [{{ address: "{addr}" }}]
        "#
    ))
    .await;
    let edge = listener(&proxy, "edge");
    let response = get(edge, "svc.local", "/").await;
    assert_eq!(response.status, 401);
    assert_eq!(response.text(), "missing credentials");
    let req = request("GET", "svc.local", "/")
        .header("authorization", "Bearer x")
        .body(empty())
        .unwrap();
    let response = send(edge, req).await;
    assert_eq!(response.status, 200);
    assert_eq!(response.backend(), Some("open"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn method_and_query_matching() {
    let writes = HttpBackend::start("writes").await;
    let exact = HttpBackend::start("query-exact").await;
    let regex = HttpBackend::start("query-regex").await;
    let present = HttpBackend::start("query-present").await;
    let (a, b, c, d) = (writes.addr(), exact.addr(), regex.addr(), present.addr());
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
                  - match:
                      methods: [POST, PUT]
                    cluster: writes
                  - match:
                      query:
                        - name: user
                          exact: "ann lee"
                    cluster: query-exact
                  - match:
                      query:
                        - name: page
                          regex: '[0-9]+'
                    cluster: query-regex
                  - match:
                      query:
                        - name: debug
                          present: true
                    cluster: query-present
        clusters:
          - name: writes
            endpoints: [{{ address: "{a}" }}]
          - name: query-exact
            endpoints: [{{ address: "{b}" }}]
          - name: query-regex
            endpoints: [{{ address: "{c}" }}]
          - name: query-present
            endpoints: [{{ address: "{d}" }}]
        "#
    ))
    .await;
    let edge = listener(&proxy, "edge");

    for (method, path, want) in [
        ("POST", "/", Some("writes")),
        ("PUT", "/x", Some("writes")),
        ("GET", "/", None),
        ("DELETE", "/", None),
        // Values are percent-decoded before matching.
        ("GET", "/?user=ann%20lee", Some("query-exact")),
        ("GET", "/?a=1&user=ann%20lee", Some("query-exact")),
        ("GET", "/?user=ann", None),
        ("GET", "/?page=12", Some("query-regex")),
        ("GET", "/?page=12a", None),
        ("GET", "/?debug", Some("query-present")),
        ("GET", "/?debug=0", Some("query-present")),
        // Parameter names are case-sensitive.
        ("GET", "/?DEBUG=1", None),
    ] {
        let response = send(
            edge,
            request(method, "svc.local", path).body(empty()).unwrap(),
        )
        .await;
        match want {
            Some(name) => {
                assert_eq!(response.status, 200, "{method} {path}");
                assert_eq!(response.backend(), Some(name), "{method} {path}");
            }
            None => assert_eq!(response.status, 404, "{method} {path}"),
        }
    }
    // The query string is forwarded untouched.
    assert_eq!(exact.requests()[0].path_and_query(), "/?user=ann%20lee");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_clusters_split_by_weight_and_zero_takes_nothing() {
    let light = HttpBackend::start("light").await;
    let heavy = HttpBackend::start("heavy").await;
    let never = HttpBackend::start("never").await;
    let (a, b, c) = (light.addr(), heavy.addr(), never.addr());
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
                  - match: {{}}
                    weighted_clusters:
                      - cluster: light
                        weight: 1
                      - cluster: heavy
                        weight: 3
                      - cluster: never
                        weight: 0
        clusters:
          - name: light
            endpoints: [{{ address: "{a}" }}]
          - name: heavy
            endpoints: [{{ address: "{b}" }}]
          - name: never
            endpoints: [{{ address: "{c}" }}]
        "#
    ))
    .await;
    let edge = listener(&proxy, "edge");
    let mut conn = postern_tests::H1Conn::connect(edge).await.unwrap();
    let total = 200;
    for _ in 0..total {
        let response = conn
            .send(request("GET", "svc.local", "/").body(empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(response.status, 200);
    }
    let (l, h) = (light.started(), heavy.started());
    assert_eq!(l + h, total);
    assert_eq!(never.started(), 0, "weight 0 must take no traffic");
    // Expected 50 / 150; the bounds are about 5 standard deviations wide.
    assert!(
        (20..=80).contains(&l),
        "light got {l} of {total}, heavy {h}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefix_regex_and_host_rewrites() {
    let backend = HttpBackend::start("b").await;
    let addr = backend.addr();
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
                  - name: prefix
                    match:
                      path: {{ prefix: /api/v1/ }}
                    cluster: b
                    rewrite:
                      prefix: /v2/
                  - name: regex
                    match:
                      path: {{ prefix: /users/ }}
                    cluster: b
                    rewrite:
                      regex:
                        pattern: '^/users/([0-9]+)/profile$'
                        substitution: '/profiles/$1'
                  - name: host
                    match:
                      path: {{ prefix: /host/ }}
                    cluster: b
                    rewrite:
                      host: internal.svc
        clusters:
          - name: b
            endpoints: [{{ address: "{addr}" }}]
        "#
    ))
    .await;
    let edge = listener(&proxy, "edge");

    let response = get(edge, "public.example.com", "/api/v1/orders/7?x=1").await;
    assert_eq!(response.status, 200);
    let seen = backend.last_request();
    assert_eq!(seen.path_and_query(), "/v2/orders/7?x=1");
    assert_eq!(
        seen.host().as_deref(),
        Some("public.example.com"),
        "host is kept without a host rewrite"
    );

    assert_eq!(
        get(edge, "public.example.com", "/users/42/profile")
            .await
            .status,
        200
    );
    assert_eq!(backend.last_request().path_and_query(), "/profiles/42");
    // The pattern does not match: the path goes up unchanged.
    assert_eq!(
        get(edge, "public.example.com", "/users/42/x").await.status,
        200
    );
    assert_eq!(backend.last_request().path_and_query(), "/users/42/x");

    assert_eq!(get(edge, "public.example.com", "/host/a").await.status, 200);
    let seen = backend.last_request();
    assert_eq!(seen.host().as_deref(), Some("internal.svc"));
    assert_eq!(seen.path_and_query(), "/host/a");

    // Over HTTP/2 the host rewrite lands in what the backend sees as the host
    // too (the upstream is HTTP/1.1 here, so it is the Host header).
    let mut h2 = H2Conn::connect(edge).await.unwrap();
    let response = h2
        .send(
            request("GET", "public.example.com", "/host/b")
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status, 200);
    assert_eq!(
        backend.last_request().host().as_deref(),
        Some("internal.svc")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_response_answers_without_upstream() {
    let proxy = start_proxy(
        r#"
        listeners:
          - name: edge
            address: 127.0.0.1:0
            kind: http
            virtual_hosts:
              - name: all
                domains: ["*"]
                routes:
                  - match:
                      path: { exact: /teapot }
                    direct_response:
                      status: 418
                      body: "short and stout"
                  - match:
                      path: { exact: /empty }
                    direct_response:
                      status: 204
        "#,
    )
    .await;
    let edge = listener(&proxy, "edge");
    let response = get(edge, "svc.local", "/teapot").await;
    assert_eq!(response.status, 418);
    assert_eq!(response.text(), "short and stout");
    assert!(
        response
            .header("content-type")
            .is_some_and(|v| v.starts_with("text/plain")),
        "content-type: {:?}",
        response.header("content-type")
    );
    let response = get(edge, "svc.local", "/empty").await;
    assert_eq!(response.status, 204);
    assert!(response.body.is_empty());
    assert_eq!(get(edge, "svc.local", "/other").await.status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects_build_location_from_request() {
    let proxy = start_proxy(
        r#"
        listeners:
          - name: edge
            address: 127.0.0.1:0
            kind: http
            virtual_hosts:
              - name: all
                domains: ["*"]
                routes:
                  - match:
                      path: { prefix: /old/ }
                    redirect:
                      prefix_rewrite: /new/
                  - match:
                      path: { exact: /secure }
                    redirect:
                      status: 308
                      scheme: https
                      host: secure.example.com
                      port: 8443
                  - match:
                      path: { exact: /moved }
                    redirect:
                      status: 302
                      path: /elsewhere
                      strip_query: true
        "#,
    )
    .await;
    let edge = listener(&proxy, "edge");

    let response = get(edge, "www.example.com", "/old/a/b?q=1").await;
    assert_eq!(response.status, 301, "default redirect status");
    assert_eq!(
        response.header("location"),
        Some("http://www.example.com/new/a/b?q=1")
    );

    let response = get(edge, "www.example.com", "/secure?x=y").await;
    assert_eq!(response.status, 308);
    assert_eq!(
        response.header("location"),
        Some("https://secure.example.com:8443/secure?x=y")
    );

    let response = get(edge, "www.example.com", "/moved?x=y").await;
    assert_eq!(response.status, 302);
    assert_eq!(
        response.header("location"),
        Some("http://www.example.com/elsewhere")
    );
}

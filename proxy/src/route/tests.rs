use super::*;
use crate::config::{Config, ListenerProtocol};

fn table(yaml_routes: &str) -> Arc<RouteTable> {
    let yaml = format!(
        r#"
listeners:
  - name: web
    address: 127.0.0.1:0
    kind: http
    virtual_hosts:
{yaml_routes}
clusters:
  - name: a
    endpoints: [{{ address: 127.0.0.1:9 }}]
  - name: b
    endpoints: [{{ address: 127.0.0.1:9 }}]
"#
    );
    let config = Config::from_yaml(&yaml).unwrap();
    match &config.listeners[0].protocol {
        ListenerProtocol::Http(http) => http.routes.clone(),
        _ => unreachable!(),
    }
}

fn route_name(
    table: &RouteTable,
    authority: &str,
    method: &Method,
    path_and_query: &str,
    headers: &[(&str, &str)],
) -> Option<String> {
    let (path, query) = match path_and_query.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (path_and_query, None),
    };
    let mut map = HeaderMap::new();
    for (k, v) in headers {
        map.append(
            HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    let view = RequestView {
        authority,
        path,
        query,
        method,
        headers: &map,
    };
    table
        .route(&view)
        .map(|(vh, r)| format!("{}/{}", vh.name, r.name))
}

const HOSTS: &str = r#"
      - name: exact
        domains: ["api.example.com"]
        routes: [{ name: r, match: {}, cluster: a }]
      - name: long-suffix
        domains: ["*.eu.example.com"]
        routes: [{ name: r, match: {}, cluster: a }]
      - name: suffix
        domains: ["*.example.com"]
        routes: [{ name: r, match: {}, cluster: a }]
      - name: any
        domains: ["*"]
        routes: [{ name: r, match: {}, cluster: a }]
"#;

#[test]
fn host_matching_order_and_normalisation() {
    let t = table(HOSTS);
    let get = Method::GET;
    assert_eq!(
        route_name(&t, "api.example.com", &get, "/", &[]).unwrap(),
        "exact/r"
    );
    assert_eq!(
        route_name(&t, "API.Example.com:8080", &get, "/", &[]).unwrap(),
        "exact/r"
    );
    assert_eq!(
        route_name(&t, "api.example.com.", &get, "/", &[]).unwrap(),
        "exact/r"
    );
    assert_eq!(
        route_name(&t, "x.eu.example.com", &get, "/", &[]).unwrap(),
        "long-suffix/r"
    );
    assert_eq!(
        route_name(&t, "www.example.com", &get, "/", &[]).unwrap(),
        "suffix/r"
    );
    // The bare domain is not covered by its wildcard.
    assert_eq!(
        route_name(&t, "example.com", &get, "/", &[]).unwrap(),
        "any/r"
    );
    assert_eq!(route_name(&t, "[::1]:80", &get, "/", &[]).unwrap(), "any/r");
}

const ROUTES: &str = r#"
      - name: v
        domains: ["*"]
        routes:
          - name: exact
            match: { path: { exact: /exact } }
            cluster: a
          - name: regex
            match: { path: { regex: "/items/[0-9]+" } }
            cluster: a
          - name: header-exact
            match: { path: { prefix: /h }, headers: [{ name: x-env, exact: canary }] }
            cluster: b
          - name: header-regex
            match: { path: { prefix: /h }, headers: [{ name: x-env, regex: "stag.*" }] }
            cluster: b
          - name: header-absent
            match: { path: { prefix: /h }, headers: [{ name: x-env, present: false }] }
            cluster: b
          - name: header-inverted
            match: { path: { prefix: /h }, headers: [{ name: x-env, exact: prod, invert: true }] }
            cluster: b
          - name: post-only
            match: { path: { prefix: /m }, methods: [POST, PUT] }
            cluster: a
          - name: query
            match: { path: { prefix: /q }, query: [{ name: v, exact: "a b" }, { name: debug, present: true }] }
            cluster: a
          - name: query-regex
            match: { path: { prefix: /q }, query: [{ name: v, regex: "[0-9]+" }] }
            cluster: a
          - name: prefix
            match: { path: { prefix: /p } }
            cluster: a
"#;

#[test]
fn path_header_method_query_matrix() {
    let t = table(ROUTES);
    let get = Method::GET;
    let post = Method::POST;
    type Case<'a> = (
        &'a Method,
        &'a str,
        &'a [(&'a str, &'a str)],
        Option<&'a str>,
    );
    let cases: &[Case<'_>] = &[
        (&get, "/exact", &[], Some("v/exact")),
        (&get, "/exact/more", &[], None),
        (&get, "/items/42", &[], Some("v/regex")),
        (&get, "/items/42x", &[], None),
        (&get, "/h", &[("x-env", "canary")], Some("v/header-exact")),
        (&get, "/h", &[("x-env", "staging")], Some("v/header-regex")),
        (&get, "/h", &[], Some("v/header-absent")),
        (&get, "/h", &[("x-env", "dev")], Some("v/header-inverted")),
        (&get, "/h", &[("x-env", "prod")], None),
        (&post, "/m", &[], Some("v/post-only")),
        (&get, "/m", &[], None),
        (&get, "/q?v=a+b&debug", &[], Some("v/query")),
        (&get, "/q?v=a%20b&debug=1", &[], Some("v/query")),
        (&get, "/q?v=a+b", &[], None),
        (&get, "/q?v=123", &[], Some("v/query-regex")),
        (&get, "/p/anything", &[], Some("v/prefix")),
        (&get, "/nothing", &[], None),
    ];
    for (method, path, headers, want) in cases {
        let got = route_name(&t, "host", method, path, headers);
        assert_eq!(got.as_deref(), *want, "{method} {path} {headers:?}");
    }
}

#[test]
fn multiple_header_values_are_joined() {
    let t = table(ROUTES);
    let got = route_name(
        &t,
        "h",
        &Method::GET,
        "/h",
        &[("x-env", "canary"), ("x-env", "x")],
    );
    // "canary,x" is neither exact canary nor staging, and not prod.
    assert_eq!(got.as_deref(), Some("v/header-inverted"));
}

#[test]
fn weighted_pick_follows_weights() {
    let targets = Targets::Weighted(vec![(Arc::from("a"), 90), (Arc::from("b"), 100)]);
    let picks_b = (0..1000u64)
        .filter(|roll| &**targets.pick(*roll) == "b")
        .count();
    assert_eq!(picks_b, 100);
    let zero_first = Targets::Weighted(vec![(Arc::from("a"), 0), (Arc::from("b"), 5)]);
    assert!((0..50u64).all(|roll| &**zero_first.pick(roll) == "b"));
}

#[test]
fn retry_backoff_grows_and_caps() {
    let mut p = RetryPolicy::new(&[RetryOn::FiveXx]);
    p.backoff_base = Duration::from_millis(10);
    p.backoff_max = Duration::from_millis(50);
    assert_eq!(p.backoff(1), Duration::from_millis(10));
    assert_eq!(p.backoff(2), Duration::from_millis(20));
    assert_eq!(p.backoff(3), Duration::from_millis(40));
    assert_eq!(p.backoff(4), Duration::from_millis(50));
    assert_eq!(p.backoff(60), Duration::from_millis(50));
    assert!(p.retries_status(503));
    assert!(!p.retries_status(404));
    assert!(p.allows_method(&Method::GET));
    assert!(!p.allows_method(&Method::POST));
}

#[test]
fn query_param_decoding() {
    assert_eq!(query_param("a=1&b=x%2Fy", "b").as_deref(), Some("x/y"));
    assert_eq!(query_param("flag&a=1", "flag").as_deref(), Some(""));
    assert_eq!(query_param("a=%zz", "a").as_deref(), Some("%zz"));
    assert_eq!(query_param("a=1", "b"), None);
}

mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Case, a port and a trailing dot never change which virtual host serves a name.
        #[test]
        fn host_variants_route_alike(
            label in "[a-z][a-z0-9-]{0,10}",
            upper in any::<bool>(),
            port in proptest::option::of(1u16..),
            dot in any::<bool>(),
        ) {
            let t = table(HOSTS);
            let plain = format!("{label}.example.com");
            let mut variant = if upper { plain.to_ascii_uppercase() } else { plain.clone() };
            if dot {
                variant.push('.');
            }
            if let Some(port) = port {
                variant.push_str(&format!(":{port}"));
            }
            let name = |host: &str| t.virtual_host(host).map(|v| v.name.to_string());
            let chosen = name(&plain);
            prop_assert_eq!(&chosen, &name(&variant));
            prop_assert_eq!(chosen.as_deref(), Some("suffix"));
        }

        /// A query parameter value survives percent-encoding of any byte.
        #[test]
        fn query_values_decode(value in "[ -~]{0,20}") {
            let encoded: String = value.bytes().map(|b| format!("%{b:02X}")).collect();
            let query = format!("a=1&key={encoded}&b=2");
            prop_assert_eq!(query_param(&query, "key"), Some(value));
        }
    }
}

//! Static JWT settings: what compiles, and what is refused with its field.

use super::*;

const JWKS: &str = r#"{"keys":[{"kty":"EC","crv":"P-256","kid":"k1","x":"f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU","y":"x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"}]}"#;

fn config(jwt: &str, route_extra: &str) -> String {
    format!(
        r#"
listeners:
  - name: web
    address: 127.0.0.1:0
    kind: http
    http:
      jwt:
{jwt}
      rbac:
        rules:
          policies:
            - name: admins
              permissions: [{{ any: true }}]
              principals: [{{ jwt_claim: {{ name: realm.roles, exact: admin }} }}]
      local_rate_limit:
        max_tokens: 5
        fill_interval: 1s
        key: {{ jwt_claim: sub }}
    virtual_hosts:
      - name: all
        domains: ["*"]
        routes:
          - match: {{ path: {{ prefix: / }} }}
            cluster: backend
{route_extra}
clusters:
  - name: backend
    endpoints: [{{ address: 127.0.0.1:9 }}]
  - name: keys
    endpoints: [{{ address: 127.0.0.1:10 }}]
"#
    )
}

fn indent(text: &str) -> String {
    text.lines()
        .map(|l| format!("        {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn good_jwt() -> String {
    indent(&format!(
        r#"providers:
  local:
    issuer: https://issuer.test
    audiences: [api]
    jwks: {{ inline: '{JWKS}' }}
    claim_to_headers: [{{ claim: sub, header: x-jwt-sub }}]
  remote:
    jwks: {{ remote: {{ uri: "https://idp.test/.well-known/jwks.json", cluster: keys, cache_duration: 5m }} }}
    from_headers: [{{ name: x-token }}]
    from_params: [token]
    forward: true
rules:
  - match: {{ path: {{ prefix: /health }} }}
  - match: {{ path: {{ prefix: / }} }}
    requires:
      any:
        - provider: local
        - {{ provider: remote, audiences: [other] }}
        - requirement: optional
requirement_map:
  optional: {{ any: [{{ provider: local }}, {{ allow_missing: true }}] }}
bypass_cors_preflight: true"#
    ))
}

fn errors_of(yaml: &str) -> Vec<String> {
    match Config::from_yaml(yaml) {
        Ok(_) => panic!("config should be rejected:\n{yaml}"),
        Err(err) => err.field_errors().iter().map(ToString::to_string).collect(),
    }
}

fn assert_error(yaml: &str, path: &str, reason_part: &str) {
    let errors = errors_of(yaml);
    assert!(
        errors
            .iter()
            .any(|e| e.starts_with(&format!("{path}: ")) && e.contains(reason_part)),
        "expected `{path}: ...{reason_part}...`, got {errors:#?}"
    );
}

#[test]
fn a_full_jwt_section_compiles() {
    let yaml = config(&good_jwt(), "            jwt: { requirement: optional }");
    let config = Config::from_yaml(&yaml).unwrap_or_else(|e| panic!("{e}\n{yaml}"));
    let ListenerProtocol::Http(http) = &config.listeners[0].protocol else {
        panic!("an http listener");
    };
    let jwt = http.jwt.as_ref().expect("jwt compiled");
    assert_eq!(jwt.providers().len(), 2);
    assert!(http.routes.has_jwt_overrides());
    let local = &jwt.providers()[0];
    assert_eq!(&*local.name, "local");
    assert_eq!(local.locations, crate::authn::TokenLocation::defaults());
    assert_eq!(local.clock_skew, 60);
    assert!(matches!(local.keys, crate::authn::KeySource::Static(_)));
    let remote = &jwt.providers()[1];
    assert!(matches!(remote.keys, crate::authn::KeySource::Remote(_)));
    assert_eq!(remote.locations.len(), 2);
    let route = &http.routes.virtual_hosts()[0].routes[0];
    assert_eq!(
        route.jwt,
        Some(crate::authn::RouteJwt::Requirement("optional".into()))
    );
}

#[test]
fn references_and_sources_are_checked() {
    let bad = good_jwt()
        .replace("- provider: local", "- provider: locl")
        .replace("- requirement: optional", "- requirement: optionl")
        .replace("cluster: keys", "cluster: kyes");
    let yaml = config(&bad, "            jwt: { requirement: nope }");
    let p = "listeners[0].http.jwt";
    assert_error(
        &yaml,
        &format!("{p}.rules[1].requires.any[0].provider"),
        "unknown provider \"locl\"",
    );
    assert_error(
        &yaml,
        &format!("{p}.rules[1].requires.any[2].requirement"),
        "unknown requirement \"optionl\"",
    );
    assert_error(
        &yaml,
        &format!("{p}.providers.remote.jwks.remote.cluster"),
        "unknown cluster \"kyes\"",
    );
    assert_error(
        &yaml,
        "listeners[0].virtual_hosts[0].routes[0].jwt.requirement",
        "unknown requirement \"nope\"",
    );

    let two_sources = good_jwt().replace(
        &format!("jwks: {{ inline: '{JWKS}' }}"),
        &format!("jwks: {{ inline: '{JWKS}', file: /nonexistent }}"),
    );
    assert_error(
        &config(&two_sources, ""),
        &format!("{p}.providers.local.jwks"),
        "exactly one of inline, file, remote",
    );
    let only_hmac = good_jwt().replace(JWKS, r#"{"keys":[{"kty":"oct","k":"c2VjcmV0"}]}"#);
    assert_error(
        &config(&only_hmac, ""),
        &format!("{p}.providers.local.jwks.inline"),
        "no usable signing key",
    );
    let no_file = good_jwt().replace(
        &format!("{{ inline: '{JWKS}' }}"),
        "{ file: /nonexistent/jwks.json }",
    );
    assert_error(
        &config(&no_file, ""),
        &format!("{p}.providers.local.jwks.file"),
        "cannot read /nonexistent/jwks.json",
    );
    let bad_uri = good_jwt().replace("https://idp.test/.well-known/jwks.json", "idp.test/jwks");
    assert_error(
        &config(&bad_uri, ""),
        &format!("{p}.providers.remote.jwks.remote.uri"),
        "not an http:// or https:// URI",
    );
    let nested_name = good_jwt().replace(
        "optional: { any: [{ provider: local }, { allow_missing: true }] }",
        "optional: { requirement: other }",
    );
    assert_error(
        &config(&nested_name, ""),
        &format!("{p}.requirement_map.optional.requirement"),
        "cannot refer to other entries",
    );
    let two = good_jwt().replace(
        "- provider: local",
        "- { provider: local, allow_missing: true }",
    );
    assert_error(
        &config(&two, ""),
        &format!("{p}.rules[1].requires.any[0]"),
        "exactly one of provider",
    );
    let bad_claim = good_jwt().replace(
        "claim: sub, header: x-jwt-sub",
        "claim: a..b, header: x-jwt-sub",
    );
    assert_error(
        &config(&bad_claim, ""),
        &format!("{p}.providers.local.claim_to_headers[0].claim"),
        "not a claim name",
    );
}

#[test]
fn claims_in_rbac_and_rate_limits_are_checked() {
    let yaml =
        config(&good_jwt(), "").replace("key: { jwt_claim: sub }", "key: { jwt_claim: \"sub.\" }");
    assert_error(
        &yaml,
        "listeners[0].http.local_rate_limit.key.jwt_claim",
        "not a claim name",
    );
    let yaml =
        config(&good_jwt(), "").replace("name: realm.roles, exact: admin", "name: realm.roles");
    assert_error(
        &yaml,
        "listeners[0].http.rbac.rules.policies[0].principals[0].jwt_claim",
        "exactly one of exact, prefix, regex",
    );
    let route_without_listener = BASE_NO_JWT.replace(
        "cluster: backend",
        "cluster: backend\n            jwt: { disabled: true }",
    );
    assert_error(
        &route_without_listener,
        "listeners[0].virtual_hosts[0].routes[0].jwt",
        "no http.jwt section",
    );
    let tcp = r#"
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
              permissions: [{ any: true }]
              principals: [{ jwt_claim: { name: sub, exact: alice } }]
clusters:
  - name: c
    endpoints: [{ address: 127.0.0.1:9 }]
"#;
    assert_error(
        tcp,
        "listeners[0].tcp.rbac.rules.policies[0].principals[0]",
        "cannot match JWT claims",
    );
}

const BASE_NO_JWT: &str = r#"
listeners:
  - name: web
    address: 127.0.0.1:0
    kind: http
    virtual_hosts:
      - name: all
        domains: ["*"]
        routes:
          - match: { path: { prefix: / } }
            cluster: backend
clusters:
  - name: backend
    endpoints: [{ address: 127.0.0.1:9 }]
"#;

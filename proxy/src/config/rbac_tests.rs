//! Static RBAC settings that the listener-level tests do not cover: route
//! overrides and the SNI permission.

use super::*;

const ROUTE_RBAC: &str = r#"
listeners:
  - name: web
    address: 127.0.0.1:0
    kind: http
    http:
      rbac:
        rules:
          action: deny
          policies:
            - name: no-admin
              permissions: [{ path: { prefix: /admin } }]
              principals: [{ any: true }]
    virtual_hosts:
      - name: all
        domains: ["*"]
        routes:
          - name: open
            match: { path: { prefix: /admin/open } }
            cluster: backend
            rbac: { disabled: true }
          - name: strict
            match: { path: { prefix: /strict } }
            cluster: backend
            rbac:
              rules:
                policies:
                  - name: api-sni
                    permissions: [{ requested_server_name: { exact: api.shop } }]
                    principals: [{ any: true }]
              shadow:
                action: deny
                policies:
                  - name: would-deny
                    permissions: [{ any: true }]
                    principals: [{ any: true }]
          - name: rest
            match: { path: { prefix: / } }
            cluster: backend
clusters:
  - name: backend
    endpoints: [{ address: 127.0.0.1:9 }]
"#;

fn errors_of(yaml: &str) -> Vec<String> {
    match Config::from_yaml(yaml) {
        Ok(_) => panic!("config should be rejected:\n{yaml}"),
        Err(err) => err.field_errors().iter().map(ToString::to_string).collect(),
    }
}

fn route_rbac<'a>(config: &'a Config, path: &'a str) -> Option<&'a crate::authz::Rbac> {
    let ListenerProtocol::Http(http) = &config.listeners[0].protocol else {
        panic!("an HTTP listener");
    };
    let (method, headers) = (http::Method::GET, http::HeaderMap::new());
    let view = crate::route::RequestView {
        authority: "any.host",
        path,
        query: None,
        method: &method,
        headers: &headers,
    };
    let (_, route) = http.routes.route(&view).expect("a route");
    route.rbac.as_deref()
}

#[test]
fn routes_carry_their_own_rbac_or_none_at_all() {
    let config = Config::from_yaml(ROUTE_RBAC).unwrap();
    let open = route_rbac(&config, "/admin/open").expect("disabling override");
    assert!(open.rules.is_none() && open.shadow.is_none());
    let strict = route_rbac(&config, "/strict").expect("own rules");
    assert_eq!(strict.rules.as_ref().unwrap().policies[0].name, "api-sni");
    assert!(strict.shadow.is_some());
    assert!(
        route_rbac(&config, "/other").is_none(),
        "the listener's applies"
    );
}

#[test]
fn a_disabled_route_rbac_takes_no_rules() {
    let yaml = ROUTE_RBAC.replace(
        "rbac: { disabled: true }",
        "rbac: { disabled: true, rules: { policies: [] } }",
    );
    let errors = errors_of(&yaml);
    assert!(
        errors.iter().any(|e| e.starts_with(
            "listeners[0].virtual_hosts[0].routes[0].rbac.disabled: a disabled route RBAC takes no rules"
        )),
        "{errors:#?}"
    );
    let yaml = ROUTE_RBAC.replace(
        "requested_server_name: { exact: api.shop }",
        "requested_server_name: {}",
    );
    let errors = errors_of(&yaml);
    assert!(
        errors.iter().any(|e| e.starts_with(
            "listeners[0].virtual_hosts[0].routes[1].rbac.rules.policies[0].permissions[0].requested_server_name: "
        )),
        "{errors:#?}"
    );
}

#[test]
fn tcp_rbac_may_match_the_sni() {
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
            - name: db-sni
              permissions: [{ requested_server_name: { prefix: db. } }]
              principals: [{ any: true }]
clusters:
  - name: c
    endpoints: [{ address: 127.0.0.1:9 }]
"#;
    Config::from_yaml(tcp).unwrap();
}

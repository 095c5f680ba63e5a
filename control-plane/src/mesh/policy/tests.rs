use postern_proto::envoy::config::cluster::v3::Cluster;
use postern_proto::envoy::config::listener::v3::{filter, Listener};
use postern_proto::envoy::config::route::v3::RouteConfiguration;
use postern_proto::envoy::extensions::filters::network::http_connection_manager::v3::HttpConnectionManager;
use postern_proto::type_url;
use prost::{Message, Name};

use super::*;
use crate::ads::Snapshot;
use crate::mesh::parse_mesh;

const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
const API: &str = "spiffe://cluster.local/ns/shop/sa/api";

fn mesh() -> String {
    format!(
        r#"
listeners:
  - name: api-in
    address: 127.0.0.1:15006
    route: api-in
    nodes: [api-1]
    mtls: {{ allow: ["{WEB}"] }}
    rbac:
      action: deny
      policies:
        - {{ name: no-admin, paths: [{{ prefix: /admin }}, {{ path: /debug }}], principals: ["{WEB}"] }}
        - {{ name: nobody, principals: [] }}
  # Another node may use the same address.
  - name: web-out
    address: 127.0.0.1:15006
    route: web-out
    nodes: [web-1]
routes:
  - name: api-in
    virtual_hosts: [{{ name: api, domains: ["*"], routes: [{{ prefix: /, cluster: api-app }}] }}]
  - name: web-out
    virtual_hosts:
      - name: api
        domains: ["*"]
        routes:
          - {{ name: export, prefix: /export, cluster: api, rate_limit: {{ max_tokens: 2, fill_interval: 10s }} }}
          - {{ prefix: /, cluster: api }}
services:
  - name: api-app
    endpoints: [{{ address: 127.0.0.1:9000 }}]
  - name: api
    endpoints: [{{ address: 127.0.0.1:15006 }}]
    tls: {{ identities: ["{API}"] }}
"#
    )
}

fn unpack<M: Message + Default + Name>(any: &Any) -> M {
    assert_eq!(any.type_url, M::type_url());
    M::decode(any.value.as_slice()).unwrap()
}

fn decode<M: Message + Default + Name>(snapshot: &Snapshot, type_url: &str, name: &str) -> M {
    unpack(
        snapshot
            .get(type_url, name)
            .unwrap_or_else(|| panic!("no {type_url} named {name}")),
    )
}

fn hcm(listener: &Listener) -> HttpConnectionManager {
    match &listener.filter_chains[0].filters[0].config_type {
        Some(filter::ConfigType::TypedConfig(any)) => unpack(any),
        other => panic!("expected a typed_config, got {other:?}"),
    }
}

fn typed(filter: &hcm_v3::HttpFilter) -> &Any {
    match &filter.config_type {
        Some(http_filter::ConfigType::TypedConfig(any)) => any,
        other => panic!("expected a typed_config, got {other:?}"),
    }
}

fn socket_config(socket: &Option<core_v3::TransportSocket>) -> &Any {
    let socket = socket.as_ref().expect("a transport socket");
    assert_eq!(socket.name, TLS);
    match &socket.config_type {
        Some(transport_socket::ConfigType::TypedConfig(any)) => any,
        None => panic!("no typed_config"),
    }
}

/// The SDS names and the exact URI SANs of a TLS context.
fn names_and_peers(common: &tls_v3::CommonTlsContext) -> (Vec<&str>, &str, Vec<String>) {
    let certificates = common
        .tls_certificate_sds_secret_configs
        .iter()
        .map(|s| s.name.as_str())
        .collect();
    let Some(common_tls_context::ValidationContextType::CombinedValidationContext(combined)) =
        &common.validation_context_type
    else {
        panic!("expected a combined validation context");
    };
    let validation = combined
        .validation_context_sds_secret_config
        .as_ref()
        .unwrap();
    let peers = combined
        .default_validation_context
        .as_ref()
        .unwrap()
        .match_typed_subject_alt_names
        .iter()
        .map(|m| {
            assert_eq!(m.san_type, subject_alt_name_matcher::SanType::Uri as i32);
            match &m.matcher.as_ref().unwrap().match_pattern {
                Some(string_matcher::MatchPattern::Exact(id)) => id.clone(),
                other => panic!("expected an exact SAN, got {other:?}"),
            }
        })
        .collect();
    (certificates, validation.name.as_str(), peers)
}

#[test]
fn listeners_go_to_their_nodes_with_mtls_rbac_and_rate_limits() {
    let snapshot = parse_mesh(&mesh(), "v1").unwrap();
    assert_eq!(snapshot.of_type(type_url::LISTENER).count(), 0);
    let api = snapshot.for_node("api-1");
    let names = |view: &Snapshot| {
        view.of_type(type_url::LISTENER)
            .map(|(n, _)| n.to_owned())
            .collect::<Vec<_>>()
    };
    assert_eq!(names(&api), ["api-in"]);
    assert_eq!(names(&snapshot.for_node("web-1")), ["web-out"]);
    assert!(names(&snapshot.for_node("other")).is_empty());

    // Inbound: strict mTLS for WEB, then RBAC, then the router.
    let inbound: Listener = decode(&api, type_url::LISTENER, "api-in");
    let downstream: tls_v3::DownstreamTlsContext =
        unpack(socket_config(&inbound.filter_chains[0].transport_socket));
    assert_eq!(
        downstream.require_client_certificate,
        Some(BoolValue { value: true })
    );
    let (certificates, validation, peers) =
        names_and_peers(downstream.common_tls_context.as_ref().unwrap());
    assert_eq!(certificates, [CERTIFICATE_SECRET]);
    assert_eq!(validation, VALIDATION_SECRET);
    assert_eq!(peers, [WEB]);
    let manager = hcm(&inbound);
    let filters: Vec<&str> = manager
        .http_filters
        .iter()
        .map(|f| f.name.as_str())
        .collect();
    assert_eq!(filters, [RBAC, super::super::ROUTER]);
    let rbac: RbacFilter = unpack(typed(&manager.http_filters[0]));
    let rules = rbac.rules.unwrap();
    assert_eq!(rules.action, rbac_v3::rbac::Action::Deny as i32);
    let no_admin = &rules.policies["no-admin"];
    let paths: Vec<_> = no_admin
        .permissions
        .iter()
        .map(|p| match &p.rule {
            Some(permission::Rule::UrlPath(PathMatcher {
                rule: Some(path_matcher::Rule::Path(m)),
            })) => m.match_pattern.clone().unwrap(),
            other => panic!("expected a url_path, got {other:?}"),
        })
        .collect();
    assert_eq!(
        paths,
        [
            string_matcher::MatchPattern::Prefix("/admin".into()),
            string_matcher::MatchPattern::Exact("/debug".into())
        ]
    );
    assert!(matches!(
        &no_admin.principals[0].identifier,
        Some(principal::Identifier::Authenticated(principal::Authenticated {
            principal_name: Some(m)
        })) if *m == exact(WEB)
    ));
    // Empty lists mean anything.
    let nobody = &rules.policies["nobody"];
    assert_eq!(
        nobody.permissions[0].rule,
        Some(permission::Rule::Any(true))
    );
    assert_eq!(
        nobody.principals[0].identifier,
        Some(principal::Identifier::Any(true))
    );

    // Outbound: plaintext; the rate limit filter (off by itself) comes
    // before the router because a route has a limit.
    let outbound: Listener = decode(&snapshot.for_node("web-1"), type_url::LISTENER, "web-out");
    assert!(outbound.filter_chains[0].transport_socket.is_none());
    let manager = hcm(&outbound);
    let filters: Vec<&str> = manager
        .http_filters
        .iter()
        .map(|f| f.name.as_str())
        .collect();
    assert_eq!(filters, [LOCAL_RATE_LIMIT, super::super::ROUTER]);
    let listener_limit: LocalRateLimit = unpack(typed(&manager.http_filters[0]));
    assert!(listener_limit.token_bucket.is_none());
    assert!(listener_limit.filter_enabled.is_none());

    let routes: RouteConfiguration = decode(&snapshot, type_url::ROUTE, "web-out");
    let export = &routes.virtual_hosts[0].routes[0];
    assert_eq!(export.name, "export");
    let limit: LocalRateLimit = unpack(&export.typed_per_filter_config[LOCAL_RATE_LIMIT]);
    let bucket = limit.token_bucket.unwrap();
    assert_eq!(bucket.max_tokens, 2);
    assert_eq!(bucket.tokens_per_fill, Some(UInt32Value { value: 2 }));
    assert_eq!(bucket.fill_interval.unwrap().seconds, 10);
    let hundred = Some(FractionalPercent {
        numerator: 100,
        denominator: fractional_percent::DenominatorType::Hundred as i32,
    });
    assert_eq!(limit.filter_enabled.unwrap().default_value, hundred);
    assert_eq!(limit.filter_enforced.unwrap().default_value, hundred);
    let other = &routes.virtual_hosts[0].routes[1];
    assert!(other.name.is_empty());
    assert!(other.typed_per_filter_config.is_empty());

    // The mesh cluster: mTLS to API.
    let cluster: Cluster = decode(&snapshot, type_url::CLUSTER, "api");
    let upstream: tls_v3::UpstreamTlsContext = unpack(socket_config(&cluster.transport_socket));
    let (certificates, validation, peers) =
        names_and_peers(upstream.common_tls_context.as_ref().unwrap());
    assert_eq!(certificates, [CERTIFICATE_SECRET]);
    assert_eq!(validation, VALIDATION_SECRET);
    assert_eq!(peers, [API]);
    let plain: Cluster = decode(&snapshot, type_url::CLUSTER, "api-app");
    assert!(plain.transport_socket.is_none());
}

#[test]
fn bad_policies_name_the_field_path() {
    let listener = "services: [{ name: c }]\nroutes: [{ name: r, virtual_hosts: [{ name: v, domains: ['*'], routes: [{ prefix: /, cluster: c }] }] }]\nlisteners:\n";
    let cases = [
        (
            format!("{listener}  - {{ name: l, address: 127.0.0.1:1, route: r, mtls: {{ allow: [web] }} }}"),
            "listeners[0].mtls.allow[0]",
        ),
        (
            format!("{listener}  - {{ name: l, address: 127.0.0.1:1, tcp: {{ cluster: c }}, rbac: {{ action: deny }} }}"),
            "listeners[0].rbac",
        ),
        (
            format!("{listener}  - {{ name: l, address: 127.0.0.1:1, route: r, rbac: {{ action: deny, policies: [{{ name: p, paths: [{{ prefix: admin }}] }}] }} }}"),
            "listeners[0].rbac.policies[0].paths[0]",
        ),
        (
            format!("{listener}  - {{ name: l, address: 127.0.0.1:1, route: r, rbac: {{ action: deny, policies: [{{ name: p }}, {{ name: p }}] }} }}"),
            "listeners[0].rbac.policies[1].name",
        ),
        (
            format!("{listener}  - {{ name: l, address: 127.0.0.1:1, route: r, nodes: [a, a] }}"),
            "listeners[0].nodes[1]",
        ),
        (
            format!("{listener}  - {{ name: l, address: 127.0.0.1:1, route: r, nodes: [a, b] }}\n  - {{ name: m, address: 127.0.0.1:1, route: r, nodes: [b] }}"),
            "listeners[1].address",
        ),
        (
            format!("{listener}  - {{ name: l, address: 127.0.0.1:1, route: r, nodes: [a] }}\n  - {{ name: m, address: 127.0.0.1:1, route: r }}"),
            "listeners[1].address",
        ),
        (
            "services: [{ name: c, tls: { identities: [] } }]".to_owned(),
            "services[0].tls.identities",
        ),
        (
            "services: [{ name: c }]\nroutes: [{ name: r, virtual_hosts: [{ name: v, domains: ['*'], routes: [{ prefix: /, cluster: c, rate_limit: { max_tokens: 0, fill_interval: 1s } }] }] }]".to_owned(),
            "routes[0].virtual_hosts[0].routes[0].rate_limit.max_tokens",
        ),
        (
            "services: [{ name: c }]\nroutes: [{ name: r, virtual_hosts: [{ name: v, domains: ['*'], routes: [{ prefix: /, cluster: c, rate_limit: { max_tokens: 1, fill_interval: 10ms } }] }] }]".to_owned(),
            "routes[0].virtual_hosts[0].routes[0].rate_limit.fill_interval",
        ),
        (
            "services: [{ name: c }]\nroutes: [{ name: r, virtual_hosts: [{ name: v, domains: ['*'], routes: [{ name: '', prefix: /, cluster: c }] }] }]".to_owned(),
            "routes[0].virtual_hosts[0].routes[0].name",
        ),
    ];
    for (yaml, path) in cases {
        let err = parse_mesh(&yaml, "v").expect_err("mesh should be rejected");
        assert!(matches!(err, MeshError::Invalid { .. }), "{yaml}: {err:?}");
        assert_eq!(err.field_path(), Some(path), "{yaml}: {err}");
    }
}

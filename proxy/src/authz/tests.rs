use super::*;

fn facts<'a>(
    peer_id: Option<&'a str>,
    method: &'a Method,
    path: &'a str,
    headers: &'a HeaderMap,
) -> RequestFacts<'a> {
    RequestFacts {
        peer_id,
        peer_ip: "10.1.2.3".parse().unwrap(),
        local_port: 15006,
        method,
        path,
        headers,
        authority: "api.shop",
        jwt: &[],
        requested_server_name: None,
    }
}

fn policy(name: &str, permissions: Vec<Permission>, principals: Vec<Principal>) -> Policy {
    Policy {
        name: name.into(),
        permissions,
        principals,
    }
}

const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";

#[test]
fn allow_lets_through_only_what_a_policy_matches() {
    let rules = Rules {
        action: RbacAction::Allow,
        policies: vec![policy(
            "web-reads",
            vec![Permission::And(vec![
                Permission::Method(Method::GET),
                Permission::Path(StringMatch::Prefix("/items/".into())),
            ])],
            vec![Principal::Authenticated(Some(StringMatch::Exact(
                WEB.into(),
            )))],
        )],
    };
    let h = HeaderMap::new();
    let get = Method::GET;
    let post = Method::POST;
    assert_eq!(
        rules.evaluate(&facts(Some(WEB), &get, "/items/1", &h)),
        Decision::Allowed(Some("web-reads".into()))
    );
    for (id, method, path) in [
        (None, &get, "/items/1"),
        (
            Some("spiffe://cluster.local/ns/shop/sa/other"),
            &get,
            "/items/1",
        ),
        (Some(WEB), &post, "/items/1"),
        (Some(WEB), &get, "/admin"),
    ] {
        assert_eq!(
            rules.evaluate(&facts(id, method, path, &h)),
            Decision::Denied("none".into()),
            "{id:?} {method} {path}"
        );
    }
}

#[test]
fn deny_refuses_matches_and_log_refuses_nothing() {
    let mut headers = HeaderMap::new();
    headers.insert("x-debug", "1".parse().unwrap());
    let deny = Rules {
        action: RbacAction::Deny,
        policies: vec![policy(
            "no-debug-from-outside",
            vec![Permission::Header(HeaderCondition {
                name: http::HeaderName::from_static("x-debug"),
                value: None,
                invert: false,
            })],
            vec![Principal::Not(Box::new(Principal::SourceIp(
                Cidr::parse("10.0.0.0/8").unwrap(),
            )))],
        )],
    };
    let get = Method::GET;
    let mut outside = facts(None, &get, "/", &headers);
    outside.peer_ip = "192.0.2.7".parse().unwrap();
    assert_eq!(
        deny.evaluate(&outside),
        Decision::Denied("no-debug-from-outside".into())
    );
    assert_eq!(
        deny.evaluate(&facts(None, &get, "/", &headers)),
        Decision::Allowed(None)
    );
    let log = Rules {
        action: RbacAction::Log,
        ..deny
    };
    assert_eq!(
        log.evaluate(&outside),
        Decision::Allowed(Some("no-debug-from-outside".into()))
    );
}

#[test]
fn ports_regexes_and_cidrs() {
    let rules = Rules {
        action: RbacAction::Allow,
        policies: vec![policy(
            "port-and-any",
            vec![Permission::Or(vec![
                Permission::DestinationPort(9999),
                Permission::Path(StringMatch::Regex(Regex::new("^/v[0-9]+/health$").unwrap())),
            ])],
            vec![Principal::Any],
        )],
    };
    let h = HeaderMap::new();
    let get = Method::GET;
    assert!(matches!(
        rules.evaluate(&facts(None, &get, "/v2/health", &h)),
        Decision::Allowed(_)
    ));
    assert!(matches!(
        rules.evaluate(&facts(None, &get, "/v2/healthz", &h)),
        Decision::Denied(_)
    ));
    let cidr = Cidr::parse("2001:db8::/32").unwrap();
    assert!(cidr.contains("2001:db8::1".parse().unwrap()));
    assert!(!cidr.contains("2001:db9::1".parse().unwrap()));
    assert!(Cidr::parse("10.0.0.0/8")
        .unwrap()
        .contains("::ffff:10.9.9.9".parse().unwrap()));
    assert!(Cidr::parse("10.0.0.0/33").is_none());
    assert!(Cidr::parse("0.0.0.0/0")
        .unwrap()
        .contains("8.8.8.8".parse().unwrap()));
}

#[test]
fn repeated_headers_are_one_joined_value_and_host_is_the_authority() {
    let allow_internal = Rules {
        action: RbacAction::Allow,
        policies: vec![policy(
            "internal",
            vec![Permission::Header(HeaderCondition {
                name: http::HeaderName::from_static("x-role"),
                value: Some(StringMatch::Exact("internal".into())),
                invert: false,
            })],
            vec![Principal::Any],
        )],
    };
    let get = Method::GET;
    let mut two = HeaderMap::new();
    two.append("x-role", "internal".parse().unwrap());
    two.append("x-role", "evil".parse().unwrap());
    assert!(matches!(
        allow_internal.evaluate(&facts(None, &get, "/", &two)),
        Decision::Denied(_)
    ));
    let mut one = HeaderMap::new();
    one.insert("x-role", "internal".parse().unwrap());
    assert!(matches!(
        allow_internal.evaluate(&facts(None, &get, "/", &one)),
        Decision::Allowed(_)
    ));

    let deny_admin_host = Rules {
        action: RbacAction::Deny,
        policies: vec![policy(
            "no-admin-host",
            vec![Permission::Header(HeaderCondition {
                name: http::header::HOST,
                value: Some(StringMatch::Exact("admin.shop".into())),
                invert: false,
            })],
            vec![Principal::Any],
        )],
    };
    // A Host header that disagrees with the routed authority is ignored.
    let mut lying = HeaderMap::new();
    lying.insert("host", "public.shop".parse().unwrap());
    let mut f = facts(None, &get, "/", &lying);
    f.authority = "admin.shop";
    assert!(matches!(deny_admin_host.evaluate(&f), Decision::Denied(_)));
}

#[test]
fn jwt_claim_principals_match_any_verified_token() {
    use crate::authn::jwt::{ClaimPath, Claims};
    let token = |provider: &str, claims: serde_json::Value| crate::authn::VerifiedJwt {
        provider: provider.into(),
        claims: std::sync::Arc::new(match claims {
            serde_json::Value::Object(map) => Claims::new(map),
            _ => unreachable!(),
        }),
    };
    let admins = Rules {
        action: RbacAction::Allow,
        policies: vec![policy(
            "admins",
            vec![Permission::Any],
            vec![Principal::JwtClaim {
                claim: ClaimPath::parse("realm.roles").unwrap(),
                value: StringMatch::Exact("admin".into()),
            }],
        )],
    };
    let (get, h) = (Method::GET, HeaderMap::new());
    let reader = [token(
        "a",
        serde_json::json!({"realm": {"roles": ["reader"]}}),
    )];
    let both = [
        reader[0].clone(),
        token(
            "b",
            serde_json::json!({"realm": {"roles": ["reader", "admin"]}}),
        ),
    ];
    let mut f = facts(None, &get, "/", &h);
    assert!(
        matches!(admins.evaluate(&f), Decision::Denied(_)),
        "no token"
    );
    f.jwt = &reader;
    assert!(matches!(admins.evaluate(&f), Decision::Denied(_)));
    f.jwt = &both;
    assert_eq!(
        admins.evaluate(&f),
        Decision::Allowed(Some("admins".into()))
    );
}

#[test]
fn requested_server_name_needs_an_sni_that_matches() {
    let rules = Rules {
        action: RbacAction::Allow,
        policies: vec![policy(
            "api-sni",
            vec![Permission::RequestedServerName(StringMatch::Exact(
                "api.shop".into(),
            ))],
            vec![Principal::Any],
        )],
    };
    let (get, h) = (Method::GET, HeaderMap::new());
    let mut f = facts(None, &get, "/", &h);
    // Plaintext: no SNI, and an empty name must not stand in for one.
    assert_eq!(rules.evaluate(&f), Decision::Denied("none".into()));
    f.requested_server_name = Some("other.shop");
    assert_eq!(rules.evaluate(&f), Decision::Denied("none".into()));
    f.requested_server_name = Some("api.shop");
    assert_eq!(
        rules.evaluate(&f),
        Decision::Allowed(Some("api-sni".into()))
    );
}

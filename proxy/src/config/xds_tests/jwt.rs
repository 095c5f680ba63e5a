//! Translation of `envoy.filters.http.jwt_authn`, its per-route config and
//! RBAC principals on its metadata.

use std::collections::HashMap;

use postern_proto::envoy::config::rbac::v3 as rbac;
use postern_proto::envoy::extensions::filters::http::jwt_authn::v3 as jwt_authn;
use postern_proto::envoy::extensions::filters::http::rbac::v3 as rbac_filter;
use postern_proto::google::protobuf::{Duration as ProtoDuration, Empty};

use super::*;
use crate::config::Config;

const JWKS: &str = r#"{"keys":[{"kty":"EC","crv":"P-256","kid":"k1","x":"f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU","y":"x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"}]}"#;

fn requires(kind: jwt_authn::jwt_requirement::RequiresType) -> jwt_authn::JwtRequirement {
    jwt_authn::JwtRequirement {
        requires_type: Some(kind),
    }
}

fn authentication() -> jwt_authn::JwtAuthentication {
    use jwt_authn::jwt_requirement::RequiresType;
    let local = jwt_authn::JwtProvider {
        issuer: "https://issuer.test".into(),
        audiences: vec!["api".into()],
        forward: true,
        from_headers: vec![jwt_authn::JwtHeader {
            name: "x-token".into(),
            value_prefix: String::new(),
        }],
        from_params: vec!["token".into()],
        claim_to_headers: vec![jwt_authn::JwtClaimToHeader {
            header_name: "x-jwt-sub".into(),
            claim_name: "sub".into(),
            ..Default::default()
        }],
        payload_in_metadata: "https://issuer.test".into(),
        jwks_source_specifier: Some(jwt_authn::jwt_provider::JwksSourceSpecifier::LocalJwks(
            core::DataSource {
                specifier: Some(core::data_source::Specifier::InlineString(JWKS.into())),
                ..Default::default()
            },
        )),
        ..Default::default()
    };
    let remote = jwt_authn::JwtProvider {
        clock_skew_seconds: 5,
        jwks_source_specifier: Some(jwt_authn::jwt_provider::JwksSourceSpecifier::RemoteJwks(
            jwt_authn::RemoteJwks {
                http_uri: Some(core::HttpUri {
                    uri: "https://idp.test/jwks".into(),
                    timeout: Some(ProtoDuration {
                        seconds: 2,
                        nanos: 0,
                    }),
                    http_upstream_type: Some(core::http_uri::HttpUpstreamType::Cluster(
                        "idp".into(),
                    )),
                }),
                cache_duration: Some(ProtoDuration {
                    seconds: 300,
                    nanos: 0,
                }),
                ..Default::default()
            },
        )),
        ..Default::default()
    };
    jwt_authn::JwtAuthentication {
        providers: HashMap::from([("local".into(), local), ("remote".into(), remote)]),
        rules: vec![
            jwt_authn::RequirementRule {
                r#match: Some(route::RouteMatch {
                    path_specifier: Some(route::route_match::PathSpecifier::Prefix(
                        "/health".into(),
                    )),
                    ..Default::default()
                }),
                requirement_type: None,
            },
            jwt_authn::RequirementRule {
                r#match: Some(route::RouteMatch {
                    path_specifier: Some(route::route_match::PathSpecifier::Prefix("/".into())),
                    ..Default::default()
                }),
                requirement_type: Some(jwt_authn::requirement_rule::RequirementType::Requires(
                    requires(RequiresType::RequiresAny(jwt_authn::JwtRequirementOrList {
                        requirements: vec![
                            requires(RequiresType::ProviderName("local".into())),
                            requires(RequiresType::AllowMissing(Empty {})),
                        ],
                    })),
                )),
            },
        ],
        requirement_map: HashMap::from([(
            "strict".into(),
            requires(RequiresType::ProviderAndAudiences(
                jwt_authn::ProviderWithAudiences {
                    provider_name: "remote".into(),
                    audiences: vec!["admin".into()],
                },
            )),
        )]),
        bypass_cors_preflight: true,
        ..Default::default()
    }
}

fn jwt_filter_of(config: &jwt_authn::JwtAuthentication) -> hcm::HttpFilter {
    hcm::HttpFilter {
        name: "envoy.filters.http.jwt_authn".into(),
        config_type: Some(hcm::http_filter::ConfigType::TypedConfig(any(config))),
        ..Default::default()
    }
}

/// An RBAC filter refusing callers whose `realm.roles` lacks `admin`,
/// by the jwt_authn metadata (the deprecated form control planes still send).
#[allow(deprecated)]
fn rbac_on_claims() -> hcm::HttpFilter {
    let principal = rbac::Principal {
        identifier: Some(rbac::principal::Identifier::Metadata(
            matcher::MetadataMatcher {
                filter: "envoy.filters.http.jwt_authn".into(),
                path: ["https://issuer.test", "realm", "roles"]
                    .iter()
                    .map(|key| matcher::metadata_matcher::PathSegment {
                        segment: Some(matcher::metadata_matcher::path_segment::Segment::Key(
                            key.to_string(),
                        )),
                    })
                    .collect(),
                value: Some(matcher::ValueMatcher {
                    match_pattern: Some(matcher::value_matcher::MatchPattern::ListMatch(Box::new(
                        matcher::ListMatcher {
                            match_pattern: Some(matcher::list_matcher::MatchPattern::OneOf(
                                Box::new(matcher::ValueMatcher {
                                    match_pattern: Some(
                                        matcher::value_matcher::MatchPattern::StringMatch(
                                            matcher::StringMatcher {
                                                match_pattern: Some(
                                                    matcher::string_matcher::MatchPattern::Exact(
                                                        "admin".into(),
                                                    ),
                                                ),
                                                ignore_case: false,
                                            },
                                        ),
                                    ),
                                }),
                            )),
                        },
                    ))),
                }),
                invert: true,
            },
        )),
    };
    let config = rbac_filter::Rbac {
        rules: Some(rbac::Rbac {
            action: rbac::rbac::Action::Deny as i32,
            policies: HashMap::from([(
                "non-admins".into(),
                rbac::Policy {
                    permissions: vec![rbac::Permission {
                        rule: Some(rbac::permission::Rule::Any(true)),
                    }],
                    principals: vec![principal],
                    ..Default::default()
                },
            )]),
            ..Default::default()
        }),
        ..Default::default()
    };
    hcm::HttpFilter {
        name: "envoy.filters.http.rbac".into(),
        config_type: Some(hcm::http_filter::ConfigType::TypedConfig(any(&config))),
        ..Default::default()
    }
}

#[test]
fn jwt_authn_maps_providers_rules_and_requirements() {
    let router = http_filter(
        "envoy.filters.http.router",
        "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router",
        false,
    );
    let l = http_listener(vec![
        jwt_filter_of(&authentication()),
        rbac_on_claims(),
        router,
    ]);
    let (file, _) = listener(&l, None).unwrap();
    let jwt = file.http.jwt.as_ref().expect("jwt translated");
    let local = &jwt.providers["local"];
    assert_eq!(local.issuer.as_deref(), Some("https://issuer.test"));
    assert_eq!(local.audiences, ["api"]);
    assert!(local.forward);
    assert_eq!(local.from_headers[0].name, "x-token");
    assert_eq!(local.from_params, ["token"]);
    assert_eq!(local.claim_to_headers[0].claim, "sub");
    assert_eq!(
        local.clock_skew,
        std::time::Duration::from_secs(60),
        "0 is Envoy's 60s"
    );
    assert_eq!(local.jwks.inline.as_deref(), Some(JWKS));
    let remote = &jwt.providers["remote"];
    assert_eq!(remote.clock_skew, std::time::Duration::from_secs(5));
    let source = remote.jwks.remote.as_ref().unwrap();
    assert_eq!(
        (source.uri.as_str(), source.cluster.as_str()),
        ("https://idp.test/jwks", "idp")
    );
    assert_eq!(source.cache_duration, std::time::Duration::from_secs(300));
    assert_eq!(source.timeout, std::time::Duration::from_secs(2));
    assert!(jwt.rules[0].requires.is_none());
    let any = jwt.rules[1]
        .requires
        .as_ref()
        .unwrap()
        .any
        .as_ref()
        .unwrap();
    assert_eq!(any[0].provider.as_deref(), Some("local"));
    assert_eq!(any[1].allow_missing, Some(true));
    let strict = &jwt.requirement_map["strict"];
    assert_eq!(strict.provider.as_deref(), Some("remote"));
    assert_eq!(
        strict.audiences.as_deref(),
        Some(&["admin".to_string()][..])
    );
    assert!(jwt.bypass_cors_preflight);

    // The metadata principal becomes a claim principal, inverted.
    let rules = file.http.rbac.as_ref().unwrap().rules.as_ref().unwrap();
    let not = rules.policies[0].principals[0]
        .not
        .as_ref()
        .expect("inverted");
    let claim = not.jwt_claim.as_ref().unwrap();
    assert_eq!(claim.name, "realm.roles");
    assert_eq!(claim.exact.as_deref(), Some("admin"));

    // And the whole compiles, with the idp cluster still to come.
    let mut config: ConfigFile = serde_yaml_ng::from_str("{}").unwrap();
    let mut file = file;
    file.virtual_hosts = route_configuration(&config_of(vec![route_to("api")]))
        .unwrap()
        .virtual_hosts;
    config.listeners.push(file);
    Config::from_dynamic_model(config).unwrap();
}

#[test]
fn unsupported_jwt_fields_are_refused_by_name() {
    let mut config = authentication();
    config.filter_state_rules = Some(Default::default());
    if let Some(local) = config.providers.get_mut("local") {
        local.from_cookies = vec!["session".into()];
        local.subjects = Some(Default::default());
    }
    config.requirement_map.insert(
        "extract".into(),
        requires(
            jwt_authn::jwt_requirement::RequiresType::ExtractOnlyWithoutValidation(
                Default::default(),
            ),
        ),
    );
    let problems = listener(&http_listener(vec![jwt_filter_of(&config)]), None).unwrap_err();
    for field in [
        "filter_state_rules",
        "providers[local].from_cookies",
        "providers[local].subjects",
        "requirement_map[extract].extract_only_without_validation",
    ] {
        assert!(
            problems.iter().any(|p| p.contains(field)),
            "{field} not named in {problems:?}"
        );
    }
}

#[test]
fn per_route_config_picks_a_requirement_or_disables_the_check() {
    let per_route =
        |spec: jwt_authn::per_route_config::RequirementSpecifier| jwt_authn::PerRouteConfig {
            requirement_specifier: Some(spec),
        };
    let mut named = route_to("api");
    named.typed_per_filter_config.insert(
        "envoy.filters.http.jwt_authn".into(),
        any(&per_route(
            jwt_authn::per_route_config::RequirementSpecifier::RequirementName("strict".into()),
        )),
    );
    let mut off = route_to("api");
    // Wrapped in a FilterConfig, as Envoy also allows.
    off.typed_per_filter_config.insert(
        "envoy.filters.http.jwt_authn".into(),
        any(&route::FilterConfig {
            config: Some(any(&per_route(
                jwt_authn::per_route_config::RequirementSpecifier::Disabled(true),
            ))),
            ..Default::default()
        }),
    );
    let hosts = route_configuration(&config_of(vec![named, off])).unwrap();
    let routes = &hosts.virtual_hosts[0].routes;
    assert_eq!(
        routes[0].jwt.as_ref().unwrap().requirement.as_deref(),
        Some("strict")
    );
    assert_eq!(routes[1].jwt.as_ref().unwrap().disabled, Some(true));

    let mut other = route_to("api");
    other.typed_per_filter_config.insert(
        "envoy.filters.http.cors".into(),
        Any {
            type_url: "type.googleapis.com/envoy.extensions.filters.http.cors.v3.CorsPolicy".into(),
            value: Vec::new(),
        },
    );
    let problems = route_configuration(&config_of(vec![other])).unwrap_err();
    assert!(
        problems[0].contains("typed_per_filter_config[envoy.filters.http.cors]"),
        "{problems:?}"
    );
}

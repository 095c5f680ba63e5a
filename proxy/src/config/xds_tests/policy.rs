//! Translation of call policy: RBAC per route and virtual host, the SNI
//! permission, the order of the policy filters and disabled filters.

use std::collections::HashMap;

use postern_proto::envoy::config::rbac::v3 as rbac;
use postern_proto::envoy::extensions::filters::http::rbac::v3 as rbac_filter;

use super::*;

/// RBAC rules with one policy, `name`, allowing (or denying) `permission`
/// to anyone.
fn rules(action: rbac::rbac::Action, name: &str, permission: rbac::permission::Rule) -> rbac::Rbac {
    rbac::Rbac {
        action: action as i32,
        policies: HashMap::from([(
            name.to_string(),
            rbac::Policy {
                permissions: vec![rbac::Permission {
                    rule: Some(permission),
                }],
                principals: vec![rbac::Principal {
                    identifier: Some(rbac::principal::Identifier::Any(true)),
                }],
                ..Default::default()
            },
        )]),
        ..Default::default()
    }
}

fn per_route(rules: Option<rbac::Rbac>) -> Any {
    any(&rbac_filter::RbacPerRoute {
        rbac: rules.map(|rules| rbac_filter::Rbac {
            rules: Some(rules),
            ..Default::default()
        }),
    })
}

fn wrapped(config: Option<Any>, disabled: bool) -> Any {
    any(&route::FilterConfig {
        config,
        is_optional: false,
        disabled,
    })
}

fn with_config(mut r: route::Route, config: Any) -> route::Route {
    r.typed_per_filter_config
        .insert("envoy.filters.http.rbac".into(), config);
    r
}

fn policy_names(file: &RbacRulesFile) -> Vec<&str> {
    file.policies.iter().map(|p| p.name.as_str()).collect()
}

#[test]
fn rbac_per_route_overrides_the_listener_and_the_route_wins_over_its_virtual_host() {
    use rbac::permission::Rule;
    let allow_all = || rules(rbac::rbac::Action::Allow, "route-any", Rule::Any(true));
    let mut rc = config_of(vec![
        with_config(route_to("api"), per_route(Some(allow_all()))),
        route_to("api"),
        with_config(route_to("api"), per_route(None)),
        with_config(
            route_to("api"),
            wrapped(Some(per_route(Some(allow_all()))), true),
        ),
    ]);
    rc.virtual_hosts[0].typed_per_filter_config.insert(
        "envoy.filters.http.rbac".into(),
        wrapped(
            Some(per_route(Some(rules(
                rbac::rbac::Action::Deny,
                "vhost-admin",
                Rule::DestinationPort(9901),
            )))),
            false,
        ),
    );
    let hosts = route_configuration(&rc).unwrap();
    let routes = &hosts.virtual_hosts[0].routes;
    let own = routes[0].rbac.as_ref().expect("route override");
    assert_eq!(policy_names(own.rules.as_ref().unwrap()), ["route-any"]);
    let inherited = routes[1].rbac.as_ref().expect("virtual host override");
    let inherited_rules = inherited.rules.as_ref().unwrap();
    assert_eq!(policy_names(inherited_rules), ["vhost-admin"]);
    assert!(matches!(inherited_rules.action, RbacActionFile::Deny));
    // Without `rbac`, or wrapped as disabled: no RBAC on that route.
    for route in &routes[2..] {
        let off = route.rbac.as_ref().expect("disabling override");
        assert!(off.disabled && off.rules.is_none(), "{off:?}");
    }
}

#[test]
fn filter_config_wrappers_that_switch_filters_by_name_are_refused() {
    let re_enable = with_config(route_to("api"), wrapped(None, false));
    let problems = route_configuration(&config_of(vec![re_enable])).unwrap_err();
    assert!(
        problems[0].starts_with(
            "virtual_hosts[0].routes[0].typed_per_filter_config[envoy.filters.http.rbac]: re-enabling a filter per route is not supported"
        ),
        "{problems:?}"
    );
    let bare_disable = with_config(route_to("api"), wrapped(None, true));
    let problems = route_configuration(&config_of(vec![bare_disable])).unwrap_err();
    assert!(
        problems[0].contains("disabled: true without a config"),
        "{problems:?}"
    );

    // Virtual hosts take RBAC overrides and nothing else.
    let mut rc = config_of(vec![route_to("api")]);
    rc.virtual_hosts[0].typed_per_filter_config.insert(
        "envoy.filters.http.cors".into(),
        Any {
            type_url: "type.googleapis.com/envoy.extensions.filters.http.cors.v3.CorsPolicy".into(),
            value: Vec::new(),
        },
    );
    let problems = route_configuration(&rc).unwrap_err();
    assert!(
        problems[0]
            .starts_with("virtual_hosts[0].typed_per_filter_config[envoy.filters.http.cors]"),
        "{problems:?}"
    );
}

#[test]
fn requested_server_name_becomes_the_sni_permission() {
    use rbac::permission::Rule;
    let sni = Rule::RequestedServerName(matcher::StringMatcher {
        match_pattern: Some(matcher::string_matcher::MatchPattern::Exact(
            "api.shop".into(),
        )),
        ignore_case: false,
    });
    let config = rbac_filter::Rbac {
        rules: Some(rules(rbac::rbac::Action::Allow, "by-sni", sni)),
        ..Default::default()
    };
    let filter = hcm::HttpFilter {
        name: "envoy.filters.http.rbac".into(),
        config_type: Some(hcm::http_filter::ConfigType::TypedConfig(any(&config))),
        ..Default::default()
    };
    let (file, _) = listener(&http_listener(vec![filter]), None).unwrap();
    let rules = file.http.rbac.unwrap().rules.unwrap();
    let permission = &rules.policies[0].permissions[0];
    assert_eq!(
        permission
            .requested_server_name
            .as_ref()
            .and_then(|m| m.exact.as_deref()),
        Some("api.shop")
    );
}

#[test]
fn policy_filters_listed_out_of_postern_order_are_refused_by_name() {
    let jwt = http_filter(
        "jwt",
        "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
        false,
    );
    let rbac = http_filter(
        "authz",
        "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC",
        false,
    );
    let local = http_filter(
        "local",
        "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit",
        false,
    );
    let problems = listener(&http_listener(vec![rbac.clone(), jwt.clone()]), None).unwrap_err();
    let order = problems
        .iter()
        .find(|p| p.contains("is listed after"))
        .unwrap_or_else(|| panic!("{problems:?}"));
    assert!(
        order.contains(".http_filters: jwt (jwt_authn) is listed after authz (rbac)"),
        "{order}"
    );

    // Postern's own order is accepted, and so is any order where the
    // filter out of place is disabled (it never runs).
    let in_order = listener(&http_listener(vec![rbac.clone(), local.clone()]), None);
    assert!(in_order.is_ok(), "{in_order:?}");
    let mut disabled = jwt;
    disabled.disabled = true;
    let off = listener(&http_listener(vec![local, rbac, disabled]), None);
    assert!(
        off.as_ref().is_err_and(|p| p
            .iter()
            .any(|p| p.contains("authz (rbac) is listed after local"))),
        "{off:?}"
    );
}

#[test]
fn a_disabled_http_filter_is_not_run() {
    use rbac::permission::Rule;
    let config = rbac_filter::Rbac {
        rules: Some(rules(rbac::rbac::Action::Deny, "all", Rule::Any(true))),
        ..Default::default()
    };
    let mut filter = hcm::HttpFilter {
        name: "envoy.filters.http.rbac".into(),
        config_type: Some(hcm::http_filter::ConfigType::TypedConfig(any(&config))),
        disabled: true,
        ..Default::default()
    };
    let (file, _) = listener(&http_listener(vec![filter.clone()]), None).unwrap();
    assert!(
        file.http.rbac.is_none(),
        "a disabled RBAC filter must not deny"
    );
    filter.disabled = false;
    let (file, _) = listener(&http_listener(vec![filter]), None).unwrap();
    assert!(file.http.rbac.is_some());

    // An unsupported filter that is off refuses nothing either.
    let mut fault = http_filter(
        "envoy.filters.http.fault",
        "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault",
        false,
    );
    fault.disabled = true;
    assert!(listener(&http_listener(vec![fault]), None).is_ok());
}

#[test]
fn a_jwt_route_config_under_a_disabled_jwt_filter_is_accepted_but_not_read() {
    use postern_proto::envoy::extensions::filters::http::jwt_authn::v3 as jwt_authn;
    let filter = hcm::HttpFilter {
        name: "envoy.filters.http.jwt_authn".into(),
        config_type: Some(hcm::http_filter::ConfigType::TypedConfig(any(
            &jwt_authn::JwtAuthentication::default(),
        ))),
        disabled: true,
        ..Default::default()
    };
    let (mut file, _) = listener(&http_listener(vec![filter]), None).unwrap();
    assert!(file.http.jwt.is_none(), "a disabled filter is not read");
    let per_route = any(&jwt_authn::PerRouteConfig {
        requirement_specifier: Some(
            jwt_authn::per_route_config::RequirementSpecifier::RequirementName("strict".into()),
        ),
    });
    let mut routed = route_to("api");
    routed
        .typed_per_filter_config
        .insert("envoy.filters.http.jwt_authn".into(), per_route);
    file.virtual_hosts = route_configuration(&config_of(vec![routed]))
        .unwrap()
        .virtual_hosts;
    // Accepted (the route may come before or apart from its listener); the
    // listener reads no JWT config, so requests on that route fail closed
    // (tests/tests/jwt.rs).
    let mut config: ConfigFile = serde_yaml_ng::from_str("{}").unwrap();
    config.listeners.push(file);
    let config = crate::config::Config::from_dynamic_model(config).unwrap();
    let crate::config::ListenerProtocol::Http(http) = &config.listeners[0].protocol else {
        panic!("an HTTP listener");
    };
    assert!(http.jwt.is_none());
}

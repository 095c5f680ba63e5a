//! Call-policy details of the HTTP connection manager and of routes: RBAC
//! overrides per route and virtual host (`RBACPerRoute`), the
//! `FilterConfig` wrapper's `disabled` flag, and the order of the policy
//! filters. Postern runs its policy filters in one fixed order, so an HCM
//! that lists them otherwise is refused rather than run in another order
//! than it says.

use super::*;

/// Type URL of the HTTP RBAC filter's per-route config.
pub(super) const RBAC_PER_ROUTE_TYPE: &str =
    "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBACPerRoute";

/// The policy filters in the order Postern runs them.
const POLICY_ORDER: [(&str, &str); 4] = [
    (JWT_AUTHN_TYPE, "jwt_authn"),
    (RBAC_TYPE, "rbac"),
    (LOCAL_RATELIMIT_TYPE, "local_ratelimit"),
    (RATELIMIT_TYPE, "ratelimit"),
];

/// Refuses an HCM whose enabled policy filters are listed in another
/// relative order than Postern runs them; a disabled filter never runs, so
/// its place does not count.
pub(super) fn check_http_filter_order(filters: &[hcm::HttpFilter], path: &str, ctx: &mut Ctx) {
    let mut latest: Option<(usize, &str)> = None;
    for filter in filters.iter().filter(|f| !f.disabled) {
        let Some(hcm::http_filter::ConfigType::TypedConfig(any)) = &filter.config_type else {
            continue;
        };
        let Some(rank) = POLICY_ORDER
            .iter()
            .position(|(url, _)| *url == any.type_url)
        else {
            continue;
        };
        match latest {
            Some((before, before_name)) if before > rank => {
                ctx.err(
                    format!("{path}.http_filters"),
                    format!(
                        "{} ({}) is listed after {} ({}); Postern runs jwt_authn, rbac, local_ratelimit, ratelimit in that order, so list them so",
                        filter.name, POLICY_ORDER[rank].1, before_name, POLICY_ORDER[before].1
                    ),
                );
                return;
            }
            _ => latest = Some((rank, filter.name.as_str())),
        }
    }
}

/// Checks a `FilterConfig` wrapper of a route or virtual host: `disabled`
/// is honoured only around an `RBACPerRoute` (as an RBAC-free route), and a
/// wrapper without a config, which would turn a filter on or off by name
/// alone, is refused. False when the entry is to be skipped.
pub(super) fn filter_config_supported(
    wrapper: &route::FilterConfig,
    fpath: &str,
    ctx: &mut Ctx,
) -> bool {
    match &wrapper.config {
        None if wrapper.disabled => {
            ctx.err(
                fpath,
                "disabled: true without a config is not supported; disable RBAC with an RBACPerRoute without rbac, or JWT with a PerRouteConfig with disabled: true",
            );
            false
        }
        None => {
            ctx.err(
                fpath,
                "re-enabling a filter per route is not supported: a filter disabled in the HTTP connection manager stays off on every route",
            );
            false
        }
        Some(any) if wrapper.disabled && any.type_url != RBAC_PER_ROUTE_TYPE => {
            ctx.err(
                format!("{fpath}.disabled"),
                format!(
                    "disabled: true is supported only around an RBACPerRoute, not {}",
                    any.type_url
                ),
            );
            false
        }
        Some(_) => true,
    }
}

/// The RBAC override among a route's or virtual host's
/// `typed_per_filter_config`. Postern knows the RBAC filter's per-route
/// config by its type: routes may come over RDS apart from the HCM that
/// names the filter. With `report_others`, every other entry is refused
/// here (virtual hosts take nothing else); without it the caller reports
/// them.
pub(super) fn rbac_per_route(
    configs: &std::collections::HashMap<String, Any>,
    path: &str,
    ctx: &mut Ctx,
    report_others: bool,
) -> Option<RouteRbacFile> {
    use postern_proto::envoy::extensions::filters::http::rbac::v3::RbacPerRoute;
    let mut names: Vec<&String> = configs.keys().collect();
    names.sort();
    let mut found: Option<RouteRbacFile> = None;
    for name in names {
        let fpath = format!("{path}.typed_per_filter_config[{name}]");
        let mut any = &configs[name];
        let mut disabled = false;
        let wrapped;
        if any.type_url == FILTER_CONFIG_TYPE {
            let wrapper = match decode::<route::FilterConfig>(any, FILTER_CONFIG_TYPE) {
                Ok(wrapper) => wrapper,
                Err(problems) => {
                    if report_others {
                        ctx.err(&fpath, problems.join("; "));
                    }
                    continue;
                }
            };
            if report_others && !filter_config_supported(&wrapper, &fpath, ctx) {
                continue;
            }
            disabled = wrapper.disabled;
            wrapped = wrapper.config.unwrap_or_default();
            any = &wrapped;
        }
        if any.type_url != RBAC_PER_ROUTE_TYPE {
            if report_others {
                ctx.unsupported(format!("{fpath} ({})", any.type_url));
            }
            continue;
        }
        if found.is_some() {
            ctx.err(
                &fpath,
                "a second RBACPerRoute; Postern runs one RBAC filter",
            );
            continue;
        }
        if disabled {
            found = Some(RouteRbacFile {
                disabled: true,
                ..Default::default()
            });
            continue;
        }
        let config: RbacPerRoute = match decode(any, RBAC_PER_ROUTE_TYPE) {
            Ok(config) => config,
            Err(problems) => {
                ctx.err(&fpath, problems.join("; "));
                continue;
            }
        };
        // As Envoy: an RBACPerRoute without `rbac` turns RBAC off there.
        found = Some(match &config.rbac {
            None => RouteRbacFile {
                disabled: true,
                ..Default::default()
            },
            Some(rbac) => {
                let rpath = format!("{fpath}.rbac");
                let matchers = rbac.matcher.is_some() || rbac.shadow_matcher.is_some();
                let file = rbac_file(
                    rbac.rules.as_ref(),
                    rbac.shadow_rules.as_ref(),
                    matchers,
                    &rpath,
                    ctx,
                );
                RouteRbacFile {
                    disabled: false,
                    rules: file.rules,
                    shadow: file.shadow,
                }
            }
        });
    }
    found
}

/// A route without its own RBAC override takes its virtual host's.
pub(super) fn inherit_rbac(mut route: RouteFile, vhost: Option<&RouteRbacFile>) -> RouteFile {
    if route.rbac.is_none() {
        route.rbac = vhost.cloned();
    }
    route
}

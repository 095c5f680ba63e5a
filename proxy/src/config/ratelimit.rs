//! Checks and compiles the global rate-limit settings: the listener's
//! `http.rate_limit_service` and the `rate_limits` of virtual hosts and
//! routes.

use std::collections::HashSet;
use std::sync::Arc;

use http::HeaderName;

use super::file::{RateLimitActionFile, RateLimitPolicyFile, RateLimitServiceFile};
use super::validate::Errors;
use crate::ratelimit::global::{Action, GlobalRateLimit, RateLimitPolicy, RlsTarget};

/// The listener's rate-limit filter; `source_cluster` is `node.cluster`.
pub(super) fn build_service(
    file: &RateLimitServiceFile,
    path: &str,
    clusters: &HashSet<&str>,
    source_cluster: &str,
    errors: &mut Errors,
) -> Arc<GlobalRateLimit> {
    if file.domain.is_empty() {
        errors.push(format!("{path}.domain"), "must not be empty");
    }
    let target = match (&file.cluster, &file.address) {
        (Some(cluster), None) => {
            if errors.strict_references() && !clusters.contains(cluster.as_str()) {
                errors.push(
                    format!("{path}.cluster"),
                    format!("unknown cluster \"{cluster}\""),
                );
            }
            RlsTarget::Cluster(Arc::from(cluster.as_str()))
        }
        (None, Some(address)) => match check_address(address) {
            Ok(uri) => RlsTarget::Address(uri),
            Err(reason) => {
                errors.push(format!("{path}.address"), reason);
                RlsTarget::Cluster(Arc::from(""))
            }
        },
        _ => {
            errors.push(path.to_string(), "give exactly one of cluster, address");
            RlsTarget::Cluster(Arc::from(""))
        }
    };
    if file.timeout.is_zero() {
        errors.push(format!("{path}.timeout"), "must be more than 0");
    }
    let mut limit = GlobalRateLimit::new(file.domain.clone(), target);
    limit.timeout = file.timeout;
    limit.failure_mode_deny = file.failure_mode_deny;
    limit.stage = file.stage;
    limit.x_ratelimit_headers = file.enable_x_ratelimit_headers;
    limit.rate_limited_as_resource_exhausted = file.rate_limited_as_resource_exhausted;
    limit.x_envoy_ratelimited_header = !file.disable_x_envoy_ratelimited_header;
    limit.source_cluster = Arc::from(source_cluster);
    Arc::new(limit)
}

fn check_address(address: &str) -> Result<http::Uri, String> {
    let uri: http::Uri = address
        .parse()
        .map_err(|e| format!("\"{address}\" is not a URI: {e}"))?;
    if uri.scheme_str() != Some("http") {
        return Err(format!(
            "\"{address}\" must be http://host:port (use cluster for TLS)"
        ));
    }
    if uri.host().is_none_or(str::is_empty) || uri.port_u16().is_none() {
        return Err(format!("\"{address}\" needs a host and a port"));
    }
    if uri.path_and_query().is_some_and(|p| p.as_str() != "/") {
        return Err(format!("\"{address}\" must not have a path"));
    }
    Ok(uri)
}

/// `rate_limits` of a virtual host or route.
pub(super) fn build_policies(
    files: &[RateLimitPolicyFile],
    path: &str,
    errors: &mut Errors,
) -> Vec<Arc<RateLimitPolicy>> {
    files
        .iter()
        .enumerate()
        .map(|(i, policy)| {
            let ppath = format!("{path}[{i}]");
            if policy.actions.is_empty() {
                errors.push(format!("{ppath}.actions"), "needs at least one action");
            }
            let actions = policy
                .actions
                .iter()
                .enumerate()
                .filter_map(|(a, action)| {
                    build_action(action, &format!("{ppath}.actions[{a}]"), errors)
                })
                .collect();
            Arc::new(RateLimitPolicy {
                stage: policy.stage,
                actions,
            })
        })
        .collect()
}

fn key_or(key: &Option<String>, default: &str, path: &str, errors: &mut Errors) -> String {
    match key {
        Some(key) if key.is_empty() => {
            errors.push(format!("{path}.descriptor_key"), "must not be empty");
            String::new()
        }
        Some(key) => key.clone(),
        None => default.to_string(),
    }
}

fn header_name(name: &str, path: &str, errors: &mut Errors) -> Option<HeaderName> {
    match HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes()) {
        Ok(name) => Some(name),
        Err(_) => {
            errors.push(path, format!("\"{name}\" is not a valid header name"));
            None
        }
    }
}

fn build_action(file: &RateLimitActionFile, path: &str, errors: &mut Errors) -> Option<Action> {
    let set = [
        file.request_headers.is_some(),
        file.remote_address.is_some(),
        file.generic_key.is_some(),
        file.header_value_match.is_some(),
        file.destination_cluster.is_some(),
        file.source_cluster.is_some(),
        file.spiffe_id.is_some(),
        file.jwt_claim.is_some(),
    ]
    .iter()
    .filter(|s| **s)
    .count();
    if set != 1 {
        errors.push(
            path,
            "give exactly one of request_headers, remote_address, generic_key, header_value_match, destination_cluster, source_cluster, spiffe_id, jwt_claim",
        );
        return None;
    }
    if let Some(h) = &file.request_headers {
        let hpath = format!("{path}.request_headers");
        if h.descriptor_key.is_empty() {
            errors.push(format!("{hpath}.descriptor_key"), "must not be empty");
        }
        let name = header_name(&h.header_name, &format!("{hpath}.header_name"), errors)?;
        return Some(Action::RequestHeader {
            name,
            key: h.descriptor_key.clone(),
            skip_if_absent: h.skip_if_absent,
        });
    }
    if file.remote_address.is_some() {
        return Some(Action::RemoteAddress);
    }
    if let Some(g) = &file.generic_key {
        let gpath = format!("{path}.generic_key");
        if g.descriptor_value.is_empty() {
            errors.push(format!("{gpath}.descriptor_value"), "must not be empty");
        }
        return Some(Action::GenericKey {
            key: key_or(&g.descriptor_key, "generic_key", &gpath, errors),
            value: g.descriptor_value.clone(),
        });
    }
    if let Some(m) = &file.header_value_match {
        let mpath = format!("{path}.header_value_match");
        if m.descriptor_value.is_empty() {
            errors.push(format!("{mpath}.descriptor_value"), "must not be empty");
        }
        if m.headers.is_empty() {
            errors.push(format!("{mpath}.headers"), "needs at least one header");
        }
        let headers = super::validate::build_header_matches(&m.headers, &mpath, errors);
        return Some(Action::HeaderValueMatch {
            key: key_or(&m.descriptor_key, "header_match", &mpath, errors),
            value: m.descriptor_value.clone(),
            default: m.default_value.clone().filter(|v| !v.is_empty()),
            expect_match: m.expect_match,
            headers,
        });
    }
    if file.destination_cluster.is_some() {
        return Some(Action::DestinationCluster);
    }
    if file.source_cluster.is_some() {
        return Some(Action::SourceCluster);
    }
    if let Some(s) = &file.spiffe_id {
        return Some(Action::SpiffeId {
            key: key_or(
                &s.descriptor_key,
                "spiffe_id",
                &format!("{path}.spiffe_id"),
                errors,
            ),
            skip_if_absent: s.skip_if_absent,
        });
    }
    let c = file.jwt_claim.as_ref()?;
    let cpath = format!("{path}.jwt_claim");
    if c.descriptor_key.is_empty() {
        errors.push(format!("{cpath}.descriptor_key"), "must not be empty");
    }
    let Some(claim) = crate::authn::jwt::ClaimPath::parse(&c.claim) else {
        errors.push(
            format!("{cpath}.claim"),
            format!("\"{}\" is not a claim name", c.claim),
        );
        return None;
    };
    Some(Action::JwtClaim {
        key: c.descriptor_key.clone(),
        claim,
        skip_if_absent: c.skip_if_absent,
    })
}

/// The policies a route applies, as Envoy's rate-limit filter picks them
/// by default: the route's own, then the virtual host's when the route has
/// none or asks to include them.
pub(super) fn effective(
    route: Vec<Arc<RateLimitPolicy>>,
    vhost: &[Arc<RateLimitPolicy>],
    include_vh: bool,
) -> Vec<Arc<RateLimitPolicy>> {
    if route.is_empty() || include_vh {
        route.into_iter().chain(vhost.iter().cloned()).collect()
    } else {
        route
    }
}

/// [`effective`] with the route's `vh_rate_limits`: `ignore` keeps the
/// route's own even when it has none; `include_vh_rate_limits` wins.
pub(super) fn effective_for(
    route_policies: Vec<Arc<RateLimitPolicy>>,
    vhost: &[Arc<RateLimitPolicy>],
    route: &super::file::RouteFile,
) -> Vec<Arc<RateLimitPolicy>> {
    use super::file::VhRateLimitsFile;
    match (route.include_vh_rate_limits, route.vh_rate_limits) {
        (false, VhRateLimitsFile::Ignore) => route_policies,
        (include, mode) => effective(
            route_policies,
            vhost,
            include || mode == VhRateLimitsFile::Include,
        ),
    }
}

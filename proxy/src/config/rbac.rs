//! Checks and compiles RBAC settings into `authz` rules, with field paths.

use std::sync::Arc;

use regex::Regex;

use super::file::*;
use super::validate::Errors;
use crate::authz::{
    Cidr, HeaderCondition, Permission, Policy, Principal, Rbac, RbacAction, Rules, StringMatch,
};

pub(super) fn build_rbac(file: &RbacFile, path: &str, errors: &mut Errors) -> Arc<Rbac> {
    Arc::new(Rbac {
        rules: file
            .rules
            .as_ref()
            .map(|r| build_rules(r, &format!("{path}.rules"), errors)),
        shadow: file
            .shadow
            .as_ref()
            .map(|r| build_rules(r, &format!("{path}.shadow"), errors)),
    })
}

/// A route's RBAC override; `disabled` compiles to an `Rbac` with neither
/// rules nor shadow rules, which refuses nothing and reports nothing.
pub(super) fn build_route_rbac(file: &RouteRbacFile, path: &str, errors: &mut Errors) -> Arc<Rbac> {
    if file.disabled && (file.rules.is_some() || file.shadow.is_some()) {
        errors.push(
            format!("{path}.disabled"),
            "a disabled route RBAC takes no rules or shadow rules",
        );
    }
    let rules = RbacFile {
        rules: file.rules.clone(),
        shadow: file.shadow.clone(),
    };
    build_rbac(&rules, path, errors)
}

fn build_rules(file: &RbacRulesFile, path: &str, errors: &mut Errors) -> Rules {
    let mut names = std::collections::HashSet::new();
    let policies = file
        .policies
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let ppath = format!("{path}.policies[{i}]");
            if p.name.is_empty() || !names.insert(p.name.as_str()) {
                errors.push(format!("{ppath}.name"), "must be non-empty and unique");
            }
            if p.permissions.is_empty() || p.principals.is_empty() {
                errors.push(
                    ppath.clone(),
                    "needs at least one permission and one principal",
                );
            }
            Policy {
                name: p.name.clone(),
                permissions: p
                    .permissions
                    .iter()
                    .enumerate()
                    .map(|(j, x)| permission(x, &format!("{ppath}.permissions[{j}]"), errors))
                    .collect(),
                principals: p
                    .principals
                    .iter()
                    .enumerate()
                    .map(|(j, x)| principal(x, &format!("{ppath}.principals[{j}]"), errors))
                    .collect(),
            }
        })
        .collect();
    Rules {
        action: match file.action {
            RbacActionFile::Allow => RbacAction::Allow,
            RbacActionFile::Deny => RbacAction::Deny,
            RbacActionFile::Log => RbacAction::Log,
        },
        policies,
    }
}

fn string_match(m: &StringMatchFile, path: &str, errors: &mut Errors) -> StringMatch {
    match (&m.exact, &m.prefix, &m.regex) {
        (Some(e), None, None) => StringMatch::Exact(e.clone()),
        (None, Some(p), None) => StringMatch::Prefix(p.clone()),
        (None, None, Some(r)) => match Regex::new(&format!("^(?:{r})$")) {
            Ok(re) => StringMatch::Regex(re),
            Err(e) => {
                errors.push(format!("{path}.regex"), format!("invalid regex: {e}"));
                StringMatch::Exact(String::new())
            }
        },
        _ => {
            errors.push(path.to_string(), "give exactly one of exact, prefix, regex");
            StringMatch::Exact(String::new())
        }
    }
}

fn header(h: &HeaderMatchFile, path: &str, errors: &mut Errors) -> HeaderCondition {
    // `:authority` is the host, as Envoy names it.
    let lowered = h.name.to_ascii_lowercase();
    let lowered = if lowered == ":authority" {
        "host".to_string()
    } else {
        lowered
    };
    let name = http::HeaderName::from_bytes(lowered.as_bytes()).unwrap_or_else(|_| {
        errors.push(format!("{path}.name"), "not a valid header name");
        http::HeaderName::from_static("x-invalid")
    });
    let value = match (&h.exact, &h.regex, h.present) {
        (Some(e), None, None) => Some(StringMatch::Exact(e.clone())),
        (None, Some(r), None) => match Regex::new(&format!("^(?:{r})$")) {
            Ok(re) => Some(StringMatch::Regex(re)),
            Err(e) => {
                errors.push(format!("{path}.regex"), format!("invalid regex: {e}"));
                None
            }
        },
        (None, None, Some(true) | None) => None,
        (None, None, Some(false)) => {
            return HeaderCondition {
                name,
                value: None,
                invert: !h.invert,
            }
        }
        _ => {
            errors.push(
                path.to_string(),
                "give at most one of exact, regex, present",
            );
            None
        }
    };
    HeaderCondition {
        name,
        value,
        invert: h.invert,
    }
}

/// Exactly one field of a principal or permission must be set.
fn one_set(count: usize, path: &str, errors: &mut Errors) {
    if count != 1 {
        errors.push(path.to_string(), "give exactly one condition");
    }
}

fn principal(p: &PrincipalFile, path: &str, errors: &mut Errors) -> Principal {
    let count = [
        p.any.is_some(),
        p.authenticated.is_some(),
        p.spiffe_id.is_some(),
        p.source_ip.is_some(),
        p.header.is_some(),
        p.jwt_claim.is_some(),
        p.and.is_some(),
        p.or.is_some(),
        p.not.is_some(),
    ]
    .iter()
    .filter(|s| **s)
    .count();
    one_set(count, path, errors);
    let list = |items: &[PrincipalFile], key: &str, errors: &mut Errors| {
        items
            .iter()
            .enumerate()
            .map(|(i, x)| principal(x, &format!("{path}.{key}[{i}]"), errors))
            .collect()
    };
    if let Some(any) = p.any {
        return if any {
            Principal::Any
        } else {
            Principal::Not(Box::new(Principal::Any))
        };
    }
    if let Some(authenticated) = p.authenticated {
        let principal = Principal::Authenticated(None);
        return if authenticated {
            principal
        } else {
            Principal::Not(Box::new(principal))
        };
    }
    if let Some(id) = &p.spiffe_id {
        return Principal::Authenticated(Some(string_match(
            id,
            &format!("{path}.spiffe_id"),
            errors,
        )));
    }
    if let Some(cidr) = &p.source_ip {
        return match Cidr::parse(cidr) {
            Some(c) => Principal::SourceIp(c),
            None => {
                errors.push(
                    format!("{path}.source_ip"),
                    format!("\"{cidr}\" is not an address or CIDR"),
                );
                Principal::Any
            }
        };
    }
    if let Some(h) = &p.header {
        return Principal::Header(header(h, &format!("{path}.header"), errors));
    }
    if let Some(c) = &p.jwt_claim {
        let cpath = format!("{path}.jwt_claim");
        let Some(claim) = crate::authn::jwt::ClaimPath::parse(&c.name) else {
            errors.push(
                format!("{cpath}.name"),
                format!("\"{}\" is not a claim name", c.name),
            );
            return Principal::Not(Box::new(Principal::Any));
        };
        let value = StringMatchFile {
            exact: c.exact.clone(),
            prefix: c.prefix.clone(),
            regex: c.regex.clone(),
        };
        return Principal::JwtClaim {
            claim,
            value: string_match(&value, &cpath, errors),
        };
    }
    if let Some(all) = &p.and {
        return Principal::And(list(all, "and", errors));
    }
    if let Some(any) = &p.or {
        return Principal::Or(list(any, "or", errors));
    }
    if let Some(not) = &p.not {
        return Principal::Not(Box::new(principal(not, &format!("{path}.not"), errors)));
    }
    Principal::Any
}

fn permission(p: &PermissionFile, path: &str, errors: &mut Errors) -> Permission {
    let count = [
        p.any.is_some(),
        p.path.is_some(),
        p.method.is_some(),
        p.header.is_some(),
        p.destination_port.is_some(),
        p.requested_server_name.is_some(),
        p.and.is_some(),
        p.or.is_some(),
        p.not.is_some(),
    ]
    .iter()
    .filter(|s| **s)
    .count();
    one_set(count, path, errors);
    let list = |items: &[PermissionFile], key: &str, errors: &mut Errors| {
        items
            .iter()
            .enumerate()
            .map(|(i, x)| permission(x, &format!("{path}.{key}[{i}]"), errors))
            .collect()
    };
    if let Some(any) = p.any {
        return if any {
            Permission::Any
        } else {
            Permission::Not(Box::new(Permission::Any))
        };
    }
    if let Some(m) = &p.path {
        return Permission::Path(string_match(m, &format!("{path}.path"), errors));
    }
    if let Some(method) = &p.method {
        return match http::Method::from_bytes(method.as_bytes()) {
            Ok(m) => Permission::Method(m),
            Err(_) => {
                errors.push(
                    format!("{path}.method"),
                    format!("\"{method}\" is not a method"),
                );
                Permission::Any
            }
        };
    }
    if let Some(h) = &p.header {
        return Permission::Header(header(h, &format!("{path}.header"), errors));
    }
    if let Some(port) = p.destination_port {
        return Permission::DestinationPort(port);
    }
    if let Some(m) = &p.requested_server_name {
        return Permission::RequestedServerName(string_match(
            m,
            &format!("{path}.requested_server_name"),
            errors,
        ));
    }
    if let Some(all) = &p.and {
        return Permission::And(list(all, "and", errors));
    }
    if let Some(any) = &p.or {
        return Permission::Or(list(any, "or", errors));
    }
    if let Some(not) = &p.not {
        return Permission::Not(Box::new(permission(not, &format!("{path}.not"), errors)));
    }
    Permission::Any
}

pub(super) fn build_rate_limit(
    file: &LocalRateLimitFile,
    path: &str,
    errors: &mut Errors,
) -> Arc<crate::ratelimit::LocalRateLimit> {
    use crate::ratelimit::{BucketSpec, Limiter, LocalRateLimit, RateLimitKey};
    if file.max_tokens == 0 {
        errors.push(format!("{path}.max_tokens"), "must be more than 0");
    }
    if file.tokens_per_fill == Some(0) {
        errors.push(format!("{path}.tokens_per_fill"), "must be more than 0");
    }
    if file.fill_interval < std::time::Duration::from_millis(1) {
        errors.push(format!("{path}.fill_interval"), "must be at least 1ms");
    }
    if file.max_keys == 0 {
        errors.push(format!("{path}.max_keys"), "must be more than 0");
    }
    let key = match &file.key {
        None => RateLimitKey::Shared,
        Some(k) => match (k.spiffe_id, k.remote_address, &k.header, &k.jwt_claim) {
            (Some(true), None, None, None) => RateLimitKey::SpiffeId,
            (None, Some(true), None, None) => RateLimitKey::RemoteAddress,
            (None, None, None, Some(claim)) => match crate::authn::jwt::ClaimPath::parse(claim) {
                Some(claim) => RateLimitKey::JwtClaim(claim),
                None => {
                    errors.push(
                        format!("{path}.key.jwt_claim"),
                        format!("\"{claim}\" is not a claim name"),
                    );
                    RateLimitKey::Shared
                }
            },
            (None, None, Some(name), None) => {
                match http::HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes()) {
                    Ok(name) => RateLimitKey::Header(name),
                    Err(_) => {
                        errors.push(format!("{path}.key.header"), "not a valid header name");
                        RateLimitKey::Shared
                    }
                }
            }
            _ => {
                errors.push(
                    format!("{path}.key"),
                    "give exactly one of spiffe_id: true, remote_address: true, header, jwt_claim",
                );
                RateLimitKey::Shared
            }
        },
    };
    let spec = BucketSpec {
        max_tokens: file.max_tokens,
        tokens_per_fill: file.tokens_per_fill.unwrap_or(file.max_tokens),
        fill_interval: file.fill_interval,
    };
    Arc::new(LocalRateLimit {
        limiter: Limiter::new(spec, file.max_keys),
        key,
        shadow: file.shadow,
        descriptors: build_descriptors(&file.descriptors, path, errors),
        stage: file.stage,
        rate_limits: super::ratelimit::build_policies(
            &file.rate_limits,
            &format!("{path}.rate_limits"),
            errors,
        ),
        always_consume_default: file.always_consume_default,
    })
}

/// A TCP connection has no path, method or headers: permissions that need
/// them would never match, so they are refused where they are written.
pub(super) fn check_connection_level(file: &RbacFile, path: &str, errors: &mut Errors) {
    fn walk(p: &PermissionFile, path: &str, errors: &mut Errors) {
        if p.path.is_some() || p.method.is_some() || p.header.is_some() {
            errors.push(
                path.to_string(),
                "a TCP listener's RBAC can only use destination_port, requested_server_name and any permissions",
            );
        }
        for (key, list) in [("and", &p.and), ("or", &p.or)] {
            for (i, inner) in list.iter().flatten().enumerate() {
                walk(inner, &format!("{path}.{key}[{i}]"), errors);
            }
        }
        if let Some(inner) = &p.not {
            walk(inner, &format!("{path}.not"), errors);
        }
    }
    fn walk_principal(p: &PrincipalFile, path: &str, errors: &mut Errors) {
        if p.header.is_some() {
            errors.push(
                path.to_string(),
                "a TCP listener's RBAC cannot match headers",
            );
        }
        if p.jwt_claim.is_some() {
            errors.push(
                path.to_string(),
                "a TCP listener's RBAC cannot match JWT claims",
            );
        }
        for (key, list) in [("and", &p.and), ("or", &p.or)] {
            for (i, inner) in list.iter().flatten().enumerate() {
                walk_principal(inner, &format!("{path}.{key}[{i}]"), errors);
            }
        }
        if let Some(inner) = &p.not {
            walk_principal(inner, &format!("{path}.not"), errors);
        }
    }
    for (which, rules) in [("rules", &file.rules), ("shadow", &file.shadow)] {
        for (i, policy) in rules.iter().flat_map(|r| r.policies.iter()).enumerate() {
            let ppath = format!("{path}.{which}.policies[{i}]");
            for (j, p) in policy.permissions.iter().enumerate() {
                walk(p, &format!("{ppath}.permissions[{j}]"), errors);
            }
            for (j, p) in policy.principals.iter().enumerate() {
                walk_principal(p, &format!("{ppath}.principals[{j}]"), errors);
            }
        }
    }
}

/// A TCP listener's limit: a token per connection, taken at accept, before
/// the TLS handshake, so only the remote address can key it.
pub(super) fn build_connection_rate_limit(
    file: &LocalRateLimitFile,
    path: &str,
    errors: &mut Errors,
) -> Arc<crate::ratelimit::LocalRateLimit> {
    use crate::ratelimit::RateLimitKey;
    let limit = build_rate_limit(file, path, errors);
    if !matches!(
        limit.key,
        RateLimitKey::Shared | RateLimitKey::RemoteAddress
    ) {
        errors.push(
            format!("{path}.key"),
            "a TCP listener's limit can only key on remote_address: true",
        );
    }
    limit
}

/// A local limit's `descriptors`.
fn build_descriptors(
    files: &[LocalDescriptorFile],
    path: &str,
    errors: &mut Errors,
) -> Vec<crate::ratelimit::DescriptorLimit> {
    use crate::ratelimit::{BucketSpec, DescriptorLimit, Limiter};
    let mut seen = std::collections::HashSet::new();
    files
        .iter()
        .enumerate()
        .map(|(i, file)| {
            let dpath = format!("{path}.descriptors[{i}]");
            if file.entries.is_empty() {
                errors.push(format!("{dpath}.entries"), "needs at least one entry");
            }
            for (j, entry) in file.entries.iter().enumerate() {
                if entry.key.is_empty() {
                    errors.push(format!("{dpath}.entries[{j}].key"), "must not be empty");
                }
            }
            if file.max_tokens == 0 {
                errors.push(format!("{dpath}.max_tokens"), "must be more than 0");
            }
            if file.tokens_per_fill == Some(0) {
                errors.push(format!("{dpath}.tokens_per_fill"), "must be more than 0");
            }
            if file.fill_interval < std::time::Duration::from_millis(1) {
                errors.push(format!("{dpath}.fill_interval"), "must be at least 1ms");
            }
            if file.max_keys == 0 {
                errors.push(format!("{dpath}.max_keys"), "must be more than 0");
            }
            let entries: Vec<(String, Option<String>)> = file
                .entries
                .iter()
                .map(|e| (e.key.clone(), e.value.clone().filter(|v| !v.is_empty())))
                .collect();
            // Only the first of two equal descriptors could ever match.
            if !seen.insert(entries.clone()) {
                errors.push(
                    format!("{dpath}.entries"),
                    "the same entries as an earlier descriptor",
                );
            }
            let label = entries
                .iter()
                .map(|(key, value)| match value {
                    Some(value) => format!("{key}={value}"),
                    None => key.clone(),
                })
                .collect::<Vec<_>>()
                .join(",");
            DescriptorLimit {
                limiter: Limiter::new(
                    BucketSpec {
                        max_tokens: file.max_tokens,
                        tokens_per_fill: file.tokens_per_fill.unwrap_or(file.max_tokens),
                        fill_interval: file.fill_interval,
                    },
                    file.max_keys,
                ),
                entries,
                shadow: file.shadow,
                label,
            }
        })
        .collect()
}

/// A listener's limit applies to every request, routed or not (a request
/// without a route meets it before its 404), so there is no route's
/// actions to build descriptors from.
pub(super) fn check_listener_rate_limit(
    file: &LocalRateLimitFile,
    path: &str,
    errors: &mut Errors,
) {
    if !file.descriptors.is_empty() {
        errors.push(
            format!("{path}.descriptors"),
            "only a route's local_rate_limit takes descriptors (a listener's is checked before routing)",
        );
    }
    if !file.rate_limits.is_empty() {
        errors.push(
            format!("{path}.rate_limits"),
            "only a route's local_rate_limit takes rate_limits",
        );
    }
}

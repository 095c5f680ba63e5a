//! Checks and compiles JWT authentication settings into the `authn` model,
//! with field paths. Static key sets are read and parsed here, so a bad one
//! fails the config instead of every request.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use http::HeaderName;

use super::file::*;
use super::validate::Errors;
use crate::authn::jwks::Jwks;
use crate::authn::jwt::ClaimPath;
use crate::authn::remote::{RemoteJwks, RemoteSource};
use crate::authn::{
    JwtAuthn, KeySource, Provider, Requirement, RouteJwt, Rule, TokenLocation, VerifiedCache,
};

/// Compiles a listener's `http.jwt`.
pub(super) fn build_jwt(
    file: &JwtAuthnFile,
    path: &str,
    clusters: &HashSet<&str>,
    errors: &mut Errors,
) -> Arc<JwtAuthn> {
    if file.providers.is_empty() {
        errors.push(format!("{path}.providers"), "needs at least one provider");
    }
    let providers: Vec<Provider> = file
        .providers
        .iter()
        .map(|(name, p)| {
            provider(
                name,
                p,
                &format!("{path}.providers.{name}"),
                clusters,
                errors,
            )
        })
        .collect();
    let index: HashMap<&str, usize> = file
        .providers
        .keys()
        .enumerate()
        .map(|(i, name)| (name.as_str(), i))
        .collect();
    let names = Names {
        providers: &index,
        map: &file.requirement_map,
    };
    let requirement_map = file
        .requirement_map
        .iter()
        .map(|(name, r)| {
            let rpath = format!("{path}.requirement_map.{name}");
            (name.clone(), requirement(r, &names, &rpath, false, errors))
        })
        .collect();
    let rules =
        file.rules
            .iter()
            .enumerate()
            .map(|(i, rule)| {
                let rpath = format!("{path}.rules[{i}]");
                Rule {
                    matcher: super::validate::build_match(
                        &rule.matcher,
                        &format!("{rpath}.match"),
                        errors,
                    ),
                    requirement: rule.requires.as_ref().map(|r| {
                        requirement(r, &names, &format!("{rpath}.requires"), true, errors)
                    }),
                }
            })
            .collect();
    Arc::new(JwtAuthn::new(
        providers,
        rules,
        requirement_map,
        file.bypass_cors_preflight,
        file.strip_failure_response,
    ))
}

fn header_name(name: &str, path: &str, errors: &mut Errors) -> Option<HeaderName> {
    match HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes()) {
        Ok(name) => Some(name),
        Err(_) => {
            errors.push(
                path.to_string(),
                format!("\"{name}\" is not a valid header name"),
            );
            None
        }
    }
}

fn provider(
    name: &str,
    file: &JwtProviderFile,
    path: &str,
    clusters: &HashSet<&str>,
    errors: &mut Errors,
) -> Provider {
    if name.is_empty() {
        errors.push(path.to_string(), "a provider needs a non-empty name");
    }
    if file.issuer.as_deref() == Some("") {
        errors.push(
            format!("{path}.issuer"),
            "must not be empty (leave it out to accept any issuer)",
        );
    }
    let mut locations: Vec<TokenLocation> = file
        .from_headers
        .iter()
        .enumerate()
        .filter_map(|(i, h)| {
            Some(TokenLocation::Header {
                name: header_name(&h.name, &format!("{path}.from_headers[{i}].name"), errors)?,
                prefix: h.value_prefix.clone(),
            })
        })
        .collect();
    for (i, param) in file.from_params.iter().enumerate() {
        if param.is_empty() {
            errors.push(format!("{path}.from_params[{i}]"), "must not be empty");
        }
        locations.push(TokenLocation::Param(param.clone()));
    }
    if file.from_headers.is_empty() && file.from_params.is_empty() {
        locations = TokenLocation::defaults();
    }
    let claim_to_headers = file
        .claim_to_headers
        .iter()
        .enumerate()
        .filter_map(|(i, c)| {
            let cpath = format!("{path}.claim_to_headers[{i}]");
            let claim = ClaimPath::parse(&c.claim);
            if claim.is_none() {
                errors.push(
                    format!("{cpath}.claim"),
                    format!("\"{}\" is not a claim name", c.claim),
                );
            }
            let header = header_name(&c.header, &format!("{cpath}.header"), errors);
            Some((claim?, header?))
        })
        .collect();
    let forward_payload_header = file
        .forward_payload_header
        .as_ref()
        .and_then(|h| header_name(h, &format!("{path}.forward_payload_header"), errors));
    Provider {
        name: Arc::from(name),
        issuer: file.issuer.clone(),
        audiences: file.audiences.clone(),
        keys: keys(&file.jwks, &format!("{path}.jwks"), clusters, errors),
        locations,
        forward: file.forward,
        forward_payload_header,
        claim_to_headers,
        clock_skew: file.clock_skew.as_secs(),
        require_expiration: file.require_expiration,
        cache: VerifiedCache::new(file.cache_size),
    }
}

fn parsed(text: &[u8], path: &str, errors: &mut Errors) -> KeySource {
    match Jwks::parse(text) {
        Ok(jwks) => KeySource::Static(Arc::new(jwks)),
        Err(err) => {
            errors.push(path.to_string(), err.to_string());
            KeySource::Static(Arc::new(Jwks::default()))
        }
    }
}

fn keys(
    file: &JwksSourceFile,
    path: &str,
    clusters: &HashSet<&str>,
    errors: &mut Errors,
) -> KeySource {
    match (&file.inline, &file.file, &file.remote) {
        (Some(inline), None, None) => parsed(inline.as_bytes(), &format!("{path}.inline"), errors),
        (None, Some(name), None) => match errors.read(name) {
            Ok(text) => parsed(&text, &format!("{path}.file"), errors),
            Err(err) => {
                errors.push(
                    format!("{path}.file"),
                    format!("cannot read {}: {err}", name.display()),
                );
                KeySource::Static(Arc::new(Jwks::default()))
            }
        },
        (None, None, Some(remote)) => {
            let rpath = format!("{path}.remote");
            let uri = match remote.uri.parse::<http::Uri>() {
                Ok(uri)
                    if matches!(uri.scheme_str(), Some("http" | "https"))
                        && uri.authority().is_some() =>
                {
                    uri
                }
                _ => {
                    errors.push(
                        format!("{rpath}.uri"),
                        format!(
                            "\"{}\" is not an http:// or https:// URI with a host",
                            remote.uri
                        ),
                    );
                    http::Uri::from_static("http://invalid/")
                }
            };
            if errors.strict_references() && !clusters.contains(remote.cluster.as_str()) {
                errors.push(
                    format!("{rpath}.cluster"),
                    format!("unknown cluster \"{}\"", remote.cluster),
                );
            }
            for (name, value) in [
                ("cache_duration", remote.cache_duration),
                ("timeout", remote.timeout),
                ("min_refetch_interval", remote.min_refetch_interval),
            ] {
                if value.is_zero() {
                    errors.push(format!("{rpath}.{name}"), "must be more than 0");
                }
            }
            KeySource::Remote(RemoteJwks::new(RemoteSource {
                uri,
                cluster: Arc::from(remote.cluster.as_str()),
                cache_duration: remote.cache_duration,
                timeout: remote.timeout,
                min_refetch_interval: remote.min_refetch_interval,
            }))
        }
        _ => {
            errors.push(path.to_string(), "give exactly one of inline, file, remote");
            KeySource::Static(Arc::new(Jwks::default()))
        }
    }
}

struct Names<'a> {
    providers: &'a HashMap<&'a str, usize>,
    map: &'a BTreeMap<String, JwtRequirementFile>,
}

/// Compiles a requirement; `by_name` allows `requirement: NAME` (rules
/// only, so map entries cannot refer to each other in a loop).
fn requirement(
    file: &JwtRequirementFile,
    names: &Names<'_>,
    path: &str,
    by_name: bool,
    errors: &mut Errors,
) -> Requirement {
    let set = [
        file.provider.is_some(),
        file.any.is_some(),
        file.all.is_some(),
        file.allow_missing.is_some(),
        file.allow_missing_or_failed.is_some(),
        file.requirement.is_some(),
    ]
    .iter()
    .filter(|s| **s)
    .count();
    if set != 1 {
        errors.push(
            path.to_string(),
            "give exactly one of provider, any, all, allow_missing, allow_missing_or_failed, requirement",
        );
    }
    if file.audiences.is_some() && file.provider.is_none() {
        errors.push(format!("{path}.audiences"), "only with provider");
    }
    let list = |items: &[JwtRequirementFile], key: &str, errors: &mut Errors| {
        if items.is_empty() {
            errors.push(format!("{path}.{key}"), "must not be empty");
        }
        items
            .iter()
            .enumerate()
            .map(|(i, r)| requirement(r, names, &format!("{path}.{key}[{i}]"), by_name, errors))
            .collect()
    };
    if let Some(name) = &file.provider {
        return match names.providers.get(name.as_str()) {
            Some(index) => Requirement::Provider {
                index: *index,
                audiences: file.audiences.clone(),
            },
            None => {
                errors.push(
                    format!("{path}.provider"),
                    format!("unknown provider \"{name}\""),
                );
                Requirement::AllowMissingOrFailed
            }
        };
    }
    if let Some(any) = &file.any {
        return Requirement::Any(list(any, "any", errors));
    }
    if let Some(all) = &file.all {
        return Requirement::All(list(all, "all", errors));
    }
    let flag = |value: Option<bool>, key: &str, errors: &mut Errors| {
        if value == Some(false) {
            errors.push(format!("{path}.{key}"), "only `true` is meaningful");
        }
    };
    if file.allow_missing.is_some() {
        flag(file.allow_missing, "allow_missing", errors);
        return Requirement::AllowMissing;
    }
    if file.allow_missing_or_failed.is_some() {
        flag(
            file.allow_missing_or_failed,
            "allow_missing_or_failed",
            errors,
        );
        return Requirement::AllowMissingOrFailed;
    }
    if let Some(name) = &file.requirement {
        if !by_name {
            errors.push(
                format!("{path}.requirement"),
                "requirement_map entries cannot refer to other entries",
            );
            return Requirement::AllowMissingOrFailed;
        }
        return match names.map.get(name) {
            Some(entry) => requirement(entry, names, &format!("{path}.requirement"), false, errors),
            None => {
                errors.push(
                    format!("{path}.requirement"),
                    format!("unknown requirement \"{name}\" (not in requirement_map)"),
                );
                Requirement::AllowMissingOrFailed
            }
        };
    }
    Requirement::AllowMissingOrFailed
}

/// Compiles a route's `jwt` (its name is checked against the listener's
/// `requirement_map` by the caller, where both are known).
pub(super) fn route_jwt(file: &RouteJwtFile, path: &str, errors: &mut Errors) -> RouteJwt {
    match (file.disabled, &file.requirement) {
        (Some(true), None) => RouteJwt::Disabled,
        (None, Some(name)) => RouteJwt::Requirement(name.clone()),
        _ => {
            errors.push(
                path.to_string(),
                "give exactly one of disabled: true, requirement",
            );
            RouteJwt::Disabled
        }
    }
}

//! Mesh mTLS and policies in the mesh description, and their Envoy
//! resources: a listener's `mtls` (a `DownstreamTlsContext` that requires a
//! client certificate), a service's `tls` (an `UpstreamTlsContext`), a
//! listener's `rbac` (the HTTP RBAC filter) and a route's `rate_limit` (the
//! local rate limit filter's per-route config).
//!
//! ```yaml
//! mtls: { allow: [spiffe://cluster.local/ns/shop/sa/web] }   # empty: any peer of the trust bundle
//! tls: { identities: [spiffe://cluster.local/ns/shop/sa/api] } # IDs the endpoints may present
//! rbac:
//!   action: deny                  # or allow
//!   policies:
//!     - name: no-admin
//!       paths: [{ prefix: /admin }]   # or `path: /exact`; empty: any path
//!       principals: []                # SPIFFE IDs; empty: anyone
//! rate_limit: { max_tokens: 1, tokens_per_fill: 1, fill_interval: 10s }
//! ```
//!
//! TLS contexts name the workload identity's SDS secrets by Istio's names
//! ([`CERTIFICATE_SECRET`], [`VALIDATION_SECRET`]); this control plane does
//! not serve them, so each proxy brings its own identity.
//!
//! Boundaries: only what the demo and the tests need; Envoy's RBAC and rate
//! limits can say much more.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use postern_certs::SpiffeId;
use postern_proto::envoy::config::core::v3::{
    self as core_v3, transport_socket, RuntimeFractionalPercent,
};
use postern_proto::envoy::config::rbac::v3::{self as rbac_v3, permission, principal};
use postern_proto::envoy::extensions::filters::http::local_ratelimit::v3::LocalRateLimit;
use postern_proto::envoy::extensions::filters::http::rbac::v3::Rbac as RbacFilter;
use postern_proto::envoy::extensions::filters::network::http_connection_manager::v3::{
    self as hcm_v3, http_filter,
};
use postern_proto::envoy::extensions::transport_sockets::tls::v3::{
    self as tls_v3, common_tls_context, subject_alt_name_matcher,
};
use postern_proto::envoy::r#type::matcher::v3::{
    path_matcher, string_matcher, PathMatcher, StringMatcher,
};
use postern_proto::envoy::r#type::v3::{fractional_percent, FractionalPercent, TokenBucket};
use postern_proto::google::protobuf::{Any, BoolValue, UInt32Value};
use serde::Deserialize;

use super::{ads_config_source, invalid, proto_duration, MeshError, MAX_PROTO_SECONDS};
use crate::ads::pack;

/// HTTP filter name of RBAC.
pub const RBAC: &str = "envoy.filters.http.rbac";
/// HTTP filter name of the local rate limit, also the key of its per-route
/// config.
pub const LOCAL_RATE_LIMIT: &str = "envoy.filters.http.local_ratelimit";
/// Transport socket name of TLS.
pub const TLS: &str = "envoy.transport_sockets.tls";
/// SDS secret of the workload certificate and key (Istio's name).
pub const CERTIFICATE_SECRET: &str = "default";
/// SDS secret of the trust bundle (Istio's name).
pub const VALIDATION_SECRET: &str = "ROOTCA";
/// The shortest `fill_interval` Envoy accepts.
pub const MIN_FILL_INTERVAL: Duration = Duration::from_millis(50);

/// A listener's mesh mTLS.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct MtlsSpec {
    /// SPIFFE IDs of the peers let in; empty: any peer the bundle trusts.
    #[serde(default)]
    allow: Vec<String>,
}

/// A service's mesh mTLS to its endpoints.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ServiceTlsSpec {
    /// SPIFFE IDs the endpoints may present; at least one.
    identities: Vec<String>,
}

/// The HTTP RBAC filter of a listener.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RbacSpec {
    action: RbacAction,
    #[serde(default)]
    policies: Vec<RbacPolicySpec>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "snake_case")]
enum RbacAction {
    /// Only calls some policy matches pass.
    Allow,
    /// Calls some policy matches are refused.
    Deny,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RbacPolicySpec {
    name: String,
    /// Any of these paths; empty: any path.
    #[serde(default)]
    paths: Vec<PathSpec>,
    /// Any of these SPIFFE IDs; empty: anyone, with or without one.
    #[serde(default)]
    principals: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PathSpec {
    #[serde(default)]
    prefix: Option<String>,
    #[serde(default)]
    path: Option<String>,
}

/// A token bucket for one route.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RateLimitSpec {
    max_tokens: u32,
    /// Tokens added per `fill_interval`; default `max_tokens`.
    #[serde(default)]
    tokens_per_fill: Option<u32>,
    #[serde(with = "humantime_serde")]
    fill_interval: Duration,
}

fn check_spiffe_ids(ids: &[String], path: &str) -> Result<(), MeshError> {
    for (i, id) in ids.iter().enumerate() {
        if let Err(err) = SpiffeId::parse(id) {
            return Err(invalid(format!("{path}[{i}]"), err.to_string()));
        }
    }
    Ok(())
}

impl MtlsSpec {
    pub(super) fn validate(&self, path: &str) -> Result<(), MeshError> {
        check_spiffe_ids(&self.allow, &format!("{path}.allow"))
    }

    pub(super) fn transport_socket(&self) -> core_v3::TransportSocket {
        tls_socket(&tls_v3::DownstreamTlsContext {
            common_tls_context: Some(common_tls_context(&self.allow)),
            require_client_certificate: Some(BoolValue { value: true }),
            ..Default::default()
        })
    }
}

impl ServiceTlsSpec {
    pub(super) fn validate(&self, path: &str) -> Result<(), MeshError> {
        if self.identities.is_empty() {
            return Err(invalid(
                format!("{path}.identities"),
                "mesh TLS needs the SPIFFE IDs the endpoints may present",
            ));
        }
        check_spiffe_ids(&self.identities, &format!("{path}.identities"))
    }

    pub(super) fn transport_socket(&self) -> core_v3::TransportSocket {
        tls_socket(&tls_v3::UpstreamTlsContext {
            common_tls_context: Some(common_tls_context(&self.identities)),
            ..Default::default()
        })
    }
}

fn tls_socket<M: prost::Name>(context: &M) -> core_v3::TransportSocket {
    core_v3::TransportSocket {
        name: TLS.to_owned(),
        config_type: Some(transport_socket::ConfigType::TypedConfig(pack(context))),
    }
}

fn sds_secret(name: &str) -> tls_v3::SdsSecretConfig {
    tls_v3::SdsSecretConfig {
        name: name.to_owned(),
        sds_config: Some(ads_config_source()),
    }
}

/// The workload's secrets, and the peer's URI SAN one of `peers` (any,
/// when empty).
fn common_tls_context(peers: &[String]) -> tls_v3::CommonTlsContext {
    let matchers = peers
        .iter()
        .map(|id| tls_v3::SubjectAltNameMatcher {
            san_type: subject_alt_name_matcher::SanType::Uri as i32,
            matcher: Some(exact(id)),
            ..Default::default()
        })
        .collect();
    tls_v3::CommonTlsContext {
        tls_certificate_sds_secret_configs: vec![sds_secret(CERTIFICATE_SECRET)],
        validation_context_type: Some(
            common_tls_context::ValidationContextType::CombinedValidationContext(
                common_tls_context::CombinedCertificateValidationContext {
                    default_validation_context: Some(tls_v3::CertificateValidationContext {
                        match_typed_subject_alt_names: matchers,
                        ..Default::default()
                    }),
                    validation_context_sds_secret_config: Some(sds_secret(VALIDATION_SECRET)),
                    ..Default::default()
                },
            ),
        ),
        ..Default::default()
    }
}

fn exact(value: &str) -> StringMatcher {
    StringMatcher {
        match_pattern: Some(string_matcher::MatchPattern::Exact(value.to_owned())),
        ignore_case: false,
    }
}

impl RbacSpec {
    pub(super) fn validate(&self, path: &str) -> Result<(), MeshError> {
        let mut names = BTreeSet::new();
        for (i, policy) in self.policies.iter().enumerate() {
            let path = format!("{path}.policies[{i}]");
            super::unique_name(&mut names, &policy.name, &path, "policy")?;
            for (j, spec) in policy.paths.iter().enumerate() {
                spec.validate(&format!("{path}.paths[{j}]"))?;
            }
            check_spiffe_ids(&policy.principals, &format!("{path}.principals"))?;
        }
        Ok(())
    }

    pub(super) fn to_filter(&self) -> hcm_v3::HttpFilter {
        let action = match self.action {
            RbacAction::Allow => rbac_v3::rbac::Action::Allow,
            RbacAction::Deny => rbac_v3::rbac::Action::Deny,
        };
        let policies: HashMap<String, rbac_v3::Policy> = self
            .policies
            .iter()
            .map(|policy| (policy.name.clone(), policy.to_envoy()))
            .collect();
        let config = RbacFilter {
            rules: Some(rbac_v3::Rbac {
                action: action as i32,
                policies,
                ..Default::default()
            }),
            ..Default::default()
        };
        hcm_v3::HttpFilter {
            name: RBAC.to_owned(),
            config_type: Some(http_filter::ConfigType::TypedConfig(pack(&config))),
            ..Default::default()
        }
    }
}

impl RbacPolicySpec {
    fn to_envoy(&self) -> rbac_v3::Policy {
        // Envoy wants at least one of each; `any` is what an empty list means.
        let mut permissions: Vec<rbac_v3::Permission> = self
            .paths
            .iter()
            .map(|spec| rbac_v3::Permission {
                rule: Some(permission::Rule::UrlPath(PathMatcher {
                    rule: Some(path_matcher::Rule::Path(spec.matcher())),
                })),
            })
            .collect();
        if permissions.is_empty() {
            permissions.push(rbac_v3::Permission {
                rule: Some(permission::Rule::Any(true)),
            });
        }
        let mut principals: Vec<rbac_v3::Principal> = self
            .principals
            .iter()
            .map(|id| rbac_v3::Principal {
                identifier: Some(principal::Identifier::Authenticated(
                    principal::Authenticated {
                        principal_name: Some(exact(id)),
                    },
                )),
            })
            .collect();
        if principals.is_empty() {
            principals.push(rbac_v3::Principal {
                identifier: Some(principal::Identifier::Any(true)),
            });
        }
        rbac_v3::Policy {
            permissions,
            principals,
            ..Default::default()
        }
    }
}

impl PathSpec {
    fn validate(&self, path: &str) -> Result<(), MeshError> {
        match (&self.prefix, &self.path) {
            (Some(value), None) | (None, Some(value)) if value.starts_with('/') => Ok(()),
            (Some(_), None) | (None, Some(_)) => {
                Err(invalid(path, "a path or prefix must start with `/`"))
            }
            _ => Err(invalid(path, "set exactly one of `prefix` and `path`")),
        }
    }

    fn matcher(&self) -> StringMatcher {
        let pattern = match (&self.prefix, &self.path) {
            (Some(prefix), _) => string_matcher::MatchPattern::Prefix(prefix.clone()),
            (None, path) => string_matcher::MatchPattern::Exact(path.clone().unwrap_or_default()),
        };
        StringMatcher {
            match_pattern: Some(pattern),
            ignore_case: false,
        }
    }
}

impl RateLimitSpec {
    pub(super) fn validate(&self, path: &str) -> Result<(), MeshError> {
        if self.max_tokens == 0 {
            return Err(invalid(
                format!("{path}.max_tokens"),
                "max_tokens must be at least 1",
            ));
        }
        if self.tokens_per_fill == Some(0) {
            return Err(invalid(
                format!("{path}.tokens_per_fill"),
                "tokens_per_fill must be at least 1",
            ));
        }
        if self.fill_interval < MIN_FILL_INTERVAL {
            return Err(invalid(
                format!("{path}.fill_interval"),
                "fill_interval must be at least 50ms",
            ));
        }
        if self.fill_interval.as_secs() > MAX_PROTO_SECONDS {
            return Err(invalid(
                format!("{path}.fill_interval"),
                "fill_interval is too long",
            ));
        }
        Ok(())
    }

    /// The filter's per-route config: enabled and enforced for every call.
    pub(super) fn per_route_config(&self) -> Any {
        let all = || RuntimeFractionalPercent {
            default_value: Some(FractionalPercent {
                numerator: 100,
                denominator: fractional_percent::DenominatorType::Hundred as i32,
            }),
            ..Default::default()
        };
        pack(&LocalRateLimit {
            stat_prefix: "route_rate_limit".to_owned(),
            token_bucket: Some(TokenBucket {
                max_tokens: self.max_tokens,
                tokens_per_fill: Some(UInt32Value {
                    value: self.tokens_per_fill.unwrap_or(self.max_tokens),
                }),
                fill_interval: Some(proto_duration(self.fill_interval)),
            }),
            filter_enabled: Some(all()),
            filter_enforced: Some(all()),
            ..Default::default()
        })
    }
}

/// The local rate limit filter of a listener whose routes carry the limits:
/// off by itself (Envoy's default), on where a route's config says so.
pub(super) fn rate_limit_filter() -> hcm_v3::HttpFilter {
    let config = LocalRateLimit {
        stat_prefix: "route_rate_limit".to_owned(),
        ..Default::default()
    };
    hcm_v3::HttpFilter {
        name: LOCAL_RATE_LIMIT.to_owned(),
        config_type: Some(http_filter::ConfigType::TypedConfig(pack(&config))),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests;

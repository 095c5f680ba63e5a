//! Pure RBAC evaluation with Envoy's semantics: a policy matches when any
//! of its permissions and any of its principals match; `allow` lets a
//! request through only if some policy matches, `deny` stops it if one
//! does, `log` only reports. No I/O: the caller passes what the request and
//! its connection proved (SPIFFE ID, verified JWT claims).

use std::net::IpAddr;

use http::{HeaderMap, Method};
use regex::Regex;

/// What to do when a policy matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RbacAction {
    /// Only requests some policy matches get through.
    Allow,
    /// Requests a policy matches are refused.
    Deny,
    /// Nothing is refused; matches are logged and counted.
    Log,
}

/// A string condition.
#[derive(Debug, Clone)]
pub enum StringMatch {
    /// Equal.
    Exact(String),
    /// Starts with.
    Prefix(String),
    /// Whole-string regex.
    Regex(Regex),
}

impl StringMatch {
    fn matches(&self, value: &str) -> bool {
        match self {
            StringMatch::Exact(s) => value == s,
            StringMatch::Prefix(p) => value.starts_with(p.as_str()),
            StringMatch::Regex(re) => re.is_match(value),
        }
    }
}

/// An IP range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Parses `10.0.0.0/8`, `::1/128` or a bare address.
    pub fn parse(text: &str) -> Option<Cidr> {
        let (ip, prefix) = match text.split_once('/') {
            Some((ip, len)) => (ip.parse::<IpAddr>().ok()?, len.parse::<u8>().ok()?),
            None => {
                let ip = text.parse::<IpAddr>().ok()?;
                (ip, if ip.is_ipv4() { 32 } else { 128 })
            }
        };
        let max = if ip.is_ipv4() { 32 } else { 128 };
        (prefix <= max).then_some(Cidr {
            network: ip,
            prefix,
        })
    }

    /// Whether `ip` is in the range.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match (self.network, ip) {
            (IpAddr::V4(_), IpAddr::V6(v6)) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            _ => ip,
        };
        match (self.network, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// A header condition.
#[derive(Debug, Clone)]
pub struct HeaderCondition {
    /// Header name.
    pub name: http::HeaderName,
    /// Value condition; `None`: present.
    pub value: Option<StringMatch>,
    /// Negate.
    pub invert: bool,
}

impl HeaderCondition {
    fn matches(&self, headers: &HeaderMap, authority: &str) -> bool {
        // The host is the request's authority, however it was sent (Host,
        // :authority, absolute-form target): the one the router used.
        if self.name == http::header::HOST {
            // Case, a trailing dot or a port must not dodge a rule the
            // router would still send to the same virtual host.
            let found = match &self.value {
                None => !authority.is_empty(),
                Some(m) => {
                    let (host, with_port) = crate::http::headers::authority_forms(authority);
                    m.matches(&host) || with_port.is_some_and(|h| m.matches(&h))
                }
            };
            return found != self.invert;
        }
        let mut values = headers.get_all(&self.name).iter().peekable();
        let found = match (&self.value, values.peek()) {
            (None, first) => first.is_some(),
            (Some(_), None) => false,
            // As Envoy: several lines are one value joined by commas, so a
            // second line cannot satisfy (or dodge) a rule on its own; bytes
            // that are not UTF-8 stay in, as replacement characters.
            (Some(m), Some(_)) => {
                let joined = values
                    .map(|v| String::from_utf8_lossy(v.as_bytes()))
                    .collect::<Vec<_>>()
                    .join(",");
                m.matches(&joined)
            }
        };
        found != self.invert
    }
}

/// Who is calling.
#[derive(Debug, Clone)]
pub enum Principal {
    /// Anyone.
    Any,
    /// A caller with a verified SPIFFE ID, any (`None`) or matching.
    Authenticated(Option<StringMatch>),
    /// The connection's source address.
    SourceIp(Cidr),
    /// A request header.
    Header(HeaderCondition),
    /// A claim of a verified JWT (an array claim matches when one of its
    /// elements does).
    JwtClaim {
        /// The claim.
        claim: crate::authn::jwt::ClaimPath,
        /// What its value must be.
        value: StringMatch,
    },
    /// All of these.
    And(Vec<Principal>),
    /// Any of these.
    Or(Vec<Principal>),
    /// Not this.
    Not(Box<Principal>),
}

/// What is being asked for.
#[derive(Debug, Clone)]
pub enum Permission {
    /// Anything.
    Any,
    /// The normalised path (no query).
    Path(StringMatch),
    /// The method.
    Method(Method),
    /// A request header.
    Header(HeaderCondition),
    /// The listener's port.
    DestinationPort(u16),
    /// The server name the client asked for in its TLS handshake (SNI); a
    /// connection without one (plaintext, or TLS without SNI) never matches.
    RequestedServerName(StringMatch),
    /// All of these.
    And(Vec<Permission>),
    /// Any of these.
    Or(Vec<Permission>),
    /// Not this.
    Not(Box<Permission>),
}

/// One named policy.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Name, for logs and metrics.
    pub name: String,
    /// Any of these must match.
    pub permissions: Vec<Permission>,
    /// Any of these must match.
    pub principals: Vec<Principal>,
}

/// A rule set.
#[derive(Debug, Clone)]
pub struct Rules {
    /// Allow, deny or log.
    pub action: RbacAction,
    /// Policies, in order.
    pub policies: Vec<Policy>,
}

/// The RBAC of a listener: enforced rules and shadow rules.
#[derive(Debug, Clone)]
pub struct Rbac {
    /// Enforced; none means everything is allowed.
    pub rules: Option<Rules>,
    /// Evaluated, logged and counted, never enforced.
    pub shadow: Option<Rules>,
}

/// What a request and its connection proved, for evaluation.
#[derive(Debug)]
pub struct RequestFacts<'a> {
    /// Verified SPIFFE ID of the peer.
    pub peer_id: Option<&'a str>,
    /// The peer's address.
    pub peer_ip: IpAddr,
    /// The listener's port.
    pub local_port: u16,
    /// Method.
    pub method: &'a Method,
    /// Normalised path.
    pub path: &'a str,
    /// Headers.
    pub headers: &'a HeaderMap,
    /// The authority the request was routed by.
    pub authority: &'a str,
    /// Tokens verified by JWT authentication (empty on TCP).
    pub jwt: &'a [crate::authn::VerifiedJwt],
    /// The SNI of the connection's TLS handshake, if it sent one.
    pub requested_server_name: Option<&'a str>,
}

/// The outcome of one rule set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Let through; the policy that matched, if any.
    Allowed(Option<String>),
    /// Refused, because of this policy (`none` when no allow policy matched).
    Denied(String),
}

impl Principal {
    fn matches(&self, facts: &RequestFacts<'_>) -> bool {
        match self {
            Principal::Any => true,
            Principal::Authenticated(None) => facts.peer_id.is_some(),
            Principal::Authenticated(Some(m)) => facts.peer_id.is_some_and(|id| m.matches(id)),
            Principal::SourceIp(cidr) => cidr.contains(facts.peer_ip),
            Principal::Header(h) => h.matches(facts.headers, facts.authority),
            Principal::JwtClaim { claim, value } => facts
                .jwt
                .iter()
                .any(|token| token.claims.any_value(claim, |text| value.matches(text))),
            Principal::And(all) => all.iter().all(|p| p.matches(facts)),
            Principal::Or(any) => any.iter().any(|p| p.matches(facts)),
            Principal::Not(p) => !p.matches(facts),
        }
    }
}

impl Permission {
    fn matches(&self, facts: &RequestFacts<'_>) -> bool {
        match self {
            Permission::Any => true,
            Permission::Path(m) => m.matches(facts.path),
            Permission::Method(method) => facts.method == method,
            Permission::Header(h) => h.matches(facts.headers, facts.authority),
            Permission::DestinationPort(port) => facts.local_port == *port,
            Permission::RequestedServerName(m) => facts
                .requested_server_name
                .is_some_and(|sni| m.matches(sni)),
            Permission::And(all) => all.iter().all(|p| p.matches(facts)),
            Permission::Or(any) => any.iter().any(|p| p.matches(facts)),
            Permission::Not(p) => !p.matches(facts),
        }
    }
}

impl Rules {
    /// Evaluates the rules for one request.
    pub fn evaluate(&self, facts: &RequestFacts<'_>) -> Decision {
        let matched = self.policies.iter().find(|policy| {
            policy.permissions.iter().any(|p| p.matches(facts))
                && policy.principals.iter().any(|p| p.matches(facts))
        });
        match (self.action, matched) {
            (RbacAction::Allow, Some(policy)) => Decision::Allowed(Some(policy.name.clone())),
            (RbacAction::Allow, None) => Decision::Denied("none".into()),
            (RbacAction::Deny, Some(policy)) => Decision::Denied(policy.name.clone()),
            (RbacAction::Deny, None) => Decision::Allowed(None),
            (RbacAction::Log, matched) => Decision::Allowed(matched.map(|p| p.name.clone())),
        }
    }
}

#[cfg(test)]
mod tests;

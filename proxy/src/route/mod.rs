//! Pure route matching: virtual host by authority, then the first route whose
//! match holds. No I/O; the types here are built once by `config` and read by
//! every request.

pub mod mutation;
pub mod normalize;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, Method};
use regex::Regex;

use crate::config::file::RetryOn;

/// Virtual hosts of one HTTP listener, indexed for lookup by authority.
#[derive(Debug)]
pub struct RouteTable {
    vhosts: Vec<VirtualHost>,
    exact: crate::FastMap<String, usize>,
    /// `(".example.com", index)`, longest suffix first.
    suffixes: Vec<(String, usize)>,
    wildcard: Option<usize>,
    /// Some route sets its own JWT requirement.
    jwt_overrides: bool,
    /// Some virtual host or route reads request headers by name.
    reads_headers: bool,
    /// Header changes for every route (the route configuration level).
    headers: Option<Arc<mutation::HeaderMutations>>,
    /// Apply header changes from the least specific level up.
    most_specific_wins: bool,
}

/// A virtual host.
#[derive(Debug)]
pub struct VirtualHost {
    /// Name from config.
    pub name: Arc<str>,
    /// Routes, in match order.
    pub routes: Vec<Route>,
    /// Header changes for every route of this virtual host.
    pub headers: Option<Arc<mutation::HeaderMutations>>,
}

/// A route.
#[derive(Debug)]
pub struct Route {
    /// Local rate limit on this route, when configured.
    pub rate_limit: Option<Arc<crate::ratelimit::LocalRateLimit>>,
    /// Global rate-limit descriptors (the virtual host's included as
    /// configured).
    pub rate_limits: Vec<Arc<crate::ratelimit::global::RateLimitPolicy>>,
    /// This route's JWT setting, when it overrides the listener's rules.
    pub jwt: Option<crate::authn::RouteJwt>,
    /// This route's RBAC, when it replaces the listener's (an `Rbac`
    /// without rules or shadow rules turns RBAC off for the route).
    pub rbac: Option<Arc<crate::authz::Rbac>>,
    /// Access-log filter and sampling, when the route sets its own.
    pub access_log: Option<crate::telemetry::access_log::LogPolicyFile>,
    /// Name for metrics and logs.
    pub name: Arc<str>,
    /// The conditions.
    pub matcher: RouteMatch,
    /// What to do on a match.
    pub action: RouteAction,
    /// Header changes for this route.
    pub headers: Option<Arc<mutation::HeaderMutations>>,
}

/// Conditions of a route; all must hold.
#[derive(Debug, Default)]
pub struct RouteMatch {
    /// Path condition.
    pub path: PathMatch,
    /// Header conditions.
    pub headers: Vec<HeaderMatch>,
    /// Allowed methods; empty means any.
    pub methods: Vec<Method>,
    /// Query parameter conditions.
    pub query: Vec<QueryMatch>,
}

/// A path condition.
#[derive(Debug, Default)]
pub enum PathMatch {
    /// Any path.
    #[default]
    Any,
    /// Equal to.
    Exact(String),
    /// Starts with.
    Prefix(String),
    /// Whole path matches (the regex is anchored at build time).
    Regex(Regex),
}

/// How a header or query value is tested.
#[derive(Debug)]
pub enum ValueMatch {
    /// Equal to.
    Exact(String),
    /// Whole value matches (anchored).
    Regex(Regex),
    /// Present (true) or absent (false).
    Present(bool),
}

/// A header condition.
#[derive(Debug)]
pub struct HeaderMatch {
    /// Header name.
    pub name: HeaderName,
    /// The test.
    pub value: ValueMatch,
    /// Negate the result.
    pub invert: bool,
}

/// A query parameter condition.
#[derive(Debug)]
pub struct QueryMatch {
    /// Parameter name.
    pub name: String,
    /// The test.
    pub value: ValueMatch,
}

/// What a matched route does.
#[derive(Debug)]
pub enum RouteAction {
    /// Proxy to a cluster.
    Forward(Forward),
    /// Answer with a fixed response.
    Direct {
        /// Status code.
        status: http::StatusCode,
        /// Body.
        body: Bytes,
    },
    /// Answer with a redirect.
    Redirect(Redirect),
}

/// Proxying settings of a route.
#[derive(Debug)]
pub struct Forward {
    /// Where requests go.
    pub targets: Targets,
    /// Time until response headers over all tries; `None` waits forever.
    pub timeout: Option<Duration>,
    /// Retry policy.
    pub retry: Option<RetryPolicy>,
    /// Rewrites before forwarding.
    pub rewrite: Rewrite,
    /// Header changes of each weighted cluster, by index in `targets`
    /// (empty when none has any).
    pub target_headers: Vec<Option<Arc<mutation::HeaderMutations>>>,
}

impl Forward {
    /// The header changes of the target at `index`, if any.
    pub fn target_headers(&self, index: usize) -> Option<&mutation::HeaderMutations> {
        self.target_headers.get(index)?.as_deref()
    }
}

/// One cluster or a weighted split.
#[derive(Debug)]
pub enum Targets {
    /// One cluster.
    Single(Arc<str>),
    /// Clusters with cumulative weights; the last is the total.
    Weighted(Vec<(Arc<str>, u64)>),
}

impl Targets {
    /// Picks a cluster; `roll` is uniform in `0..u64::MAX`.
    pub fn pick(&self, roll: u64) -> &Arc<str> {
        self.pick_indexed(roll).1
    }

    /// Picks a cluster, with its index among the targets.
    pub fn pick_indexed(&self, roll: u64) -> (usize, &Arc<str>) {
        match self {
            Targets::Single(name) => (0, name),
            Targets::Weighted(cumulative) => {
                let total = cumulative.last().map(|(_, w)| *w).unwrap_or(1).max(1);
                let point = roll % total;
                let index = cumulative
                    .partition_point(|(_, upto)| *upto <= point)
                    .min(cumulative.len() - 1);
                (index, &cumulative[index].0)
            }
        }
    }
}

/// A retry policy.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Retry when the connect fails.
    pub on_connect_failure: bool,
    /// Retry when the upstream resets before answering.
    pub on_reset: bool,
    /// Retry on any 5xx.
    pub on_5xx: bool,
    /// Retry on these statuses.
    pub retriable_status_codes: Vec<u16>,
    /// Total tries.
    pub max_attempts: u32,
    /// Time per try.
    pub per_try_timeout: Option<Duration>,
    /// First back-off.
    pub backoff_base: Duration,
    /// Longest back-off.
    pub backoff_max: Duration,
    /// Retry POST, PATCH and other non-idempotent methods too.
    pub retry_non_idempotent: bool,
    /// Largest body kept for replays.
    pub max_body_bytes: usize,
}

impl RetryPolicy {
    /// Builds from the list of conditions.
    pub fn new(on: &[RetryOn]) -> Self {
        RetryPolicy {
            on_connect_failure: on.contains(&RetryOn::ConnectFailure),
            on_reset: on.contains(&RetryOn::Reset),
            on_5xx: on.contains(&RetryOn::FiveXx),
            retriable_status_codes: Vec::new(),
            max_attempts: 1,
            per_try_timeout: None,
            backoff_base: Duration::from_millis(25),
            backoff_max: Duration::from_millis(250),
            retry_non_idempotent: false,
            max_body_bytes: 64 * 1024,
        }
    }

    /// Whether an answer with this status may be retried.
    pub fn retries_status(&self, status: u16) -> bool {
        (self.on_5xx && (500..600).contains(&status))
            || self.retriable_status_codes.contains(&status)
    }

    /// Whether requests with this method may be retried at all.
    pub fn allows_method(&self, method: &Method) -> bool {
        self.retry_non_idempotent || is_idempotent(method)
    }

    /// Back-off before try number `retry` (1 for the first retry), before jitter.
    pub fn backoff(&self, retry: u32) -> Duration {
        let factor = 1u32
            .checked_shl(retry.saturating_sub(1))
            .unwrap_or(u32::MAX);
        self.backoff_base
            .saturating_mul(factor)
            .min(self.backoff_max)
    }
}

/// Idempotent methods per RFC 9110 §9.2.2.
pub fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

/// Request rewrites.
#[derive(Debug, Default)]
pub struct Rewrite {
    /// Replace the matched prefix with this.
    pub prefix: Option<String>,
    /// Regex path rewrite.
    pub regex: Option<(Regex, String)>,
    /// New authority.
    pub host: Option<http::HeaderValue>,
}

/// A redirect.
#[derive(Debug)]
pub struct Redirect {
    /// Status code.
    pub status: http::StatusCode,
    /// New scheme.
    pub scheme: Option<String>,
    /// New host.
    pub host: Option<String>,
    /// New port.
    pub port: Option<u16>,
    /// New path.
    pub path: Option<String>,
    /// Replacement of the matched prefix.
    pub prefix_rewrite: Option<String>,
    /// Drop the query.
    pub strip_query: bool,
}

/// The TCP route of a TCP listener.
#[derive(Debug)]
pub struct TcpRoute {
    /// Cluster to connect to.
    pub cluster: Arc<str>,
    /// Idle timeout of the proxied pair.
    pub idle_timeout: Duration,
    /// Access control per connection.
    pub rbac: Option<Arc<crate::authz::Rbac>>,
    /// A token per accepted connection.
    pub rate_limit: Option<Arc<crate::ratelimit::LocalRateLimit>>,
}

/// What the router needs of a request.
#[derive(Debug, Clone, Copy)]
pub struct RequestView<'a> {
    /// Host or :authority.
    pub authority: &'a str,
    /// Path, without the query.
    pub path: &'a str,
    /// Raw query, without `?`.
    pub query: Option<&'a str>,
    /// Method.
    pub method: &'a Method,
    /// Headers.
    pub headers: &'a HeaderMap,
}

impl<'a> RequestView<'a> {
    /// What routing sees of `request`, addressed to `authority`.
    pub fn of<B>(request: &'a http::Request<B>, authority: &'a str) -> Self {
        RequestView {
            authority,
            path: request.uri().path(),
            query: request.uri().query(),
            method: request.method(),
            headers: request.headers(),
        }
    }
}

impl RouteTable {
    /// Builds the index. `domains[i]` lists the domains of `vhosts[i]`,
    /// already validated (lowercase, unique).
    pub fn new(vhosts: Vec<VirtualHost>, domains: &[Vec<String>]) -> Self {
        let mut exact = crate::FastMap::default();
        let mut suffixes = Vec::new();
        let mut wildcard = None;
        for (index, list) in domains.iter().enumerate() {
            for domain in list {
                if domain == "*" {
                    wildcard = Some(index);
                } else if let Some(suffix) = domain.strip_prefix('*') {
                    suffixes.push((suffix.to_string(), index));
                } else {
                    exact.insert(domain.clone(), index);
                }
            }
        }
        suffixes.sort_by_key(|(suffix, _)| std::cmp::Reverse(suffix.len()));
        let jwt_overrides = vhosts
            .iter()
            .flat_map(|v| v.routes.iter())
            .any(|r| r.jwt.is_some());
        let reads_headers = vhosts
            .iter()
            .any(|v| v.headers.is_some() || v.routes.iter().any(Route::reads_request_headers));
        RouteTable {
            vhosts,
            exact,
            suffixes,
            wildcard,
            jwt_overrides,
            reads_headers,
            headers: None,
            most_specific_wins: false,
        }
    }

    /// The same table with route-configuration-level header changes.
    pub fn with_headers(
        mut self,
        headers: Option<Arc<mutation::HeaderMutations>>,
        most_specific_wins: bool,
    ) -> RouteTable {
        self.headers = headers;
        self.most_specific_wins = most_specific_wins;
        self
    }

    /// The header changes that apply to `route` of `vhost`, with the
    /// weighted cluster `target` if one was picked.
    pub fn mutations<'a>(
        &'a self,
        vhost: &'a VirtualHost,
        route: &'a Route,
        target: Option<usize>,
    ) -> mutation::Plan<'a> {
        let weighted = match (&route.action, target) {
            (RouteAction::Forward(forward), Some(index)) => forward.target_headers(index),
            _ => None,
        };
        mutation::Plan::new(
            self.headers.as_deref(),
            vhost.headers.as_deref(),
            route.headers.as_deref(),
            weighted,
            self.most_specific_wins,
        )
    }

    /// Whether some route sets its own JWT requirement, so authentication
    /// must find the route first.
    pub fn has_jwt_overrides(&self) -> bool {
        self.jwt_overrides
    }

    /// Whether anything in the table may read a request header by name:
    /// a header match, a route's own policy (JWT, RBAC, rate limits,
    /// access-log filter) or header changes, whose values may quote the
    /// request's. Errs towards yes.
    pub fn reads_request_headers(&self) -> bool {
        self.reads_headers || self.headers.is_some()
    }

    /// Whether some route replaces the listener's RBAC.
    pub fn has_rbac_overrides(&self) -> bool {
        self.vhosts
            .iter()
            .flat_map(|v| v.routes.iter())
            .any(|r| r.rbac.is_some())
    }

    /// The virtual hosts.
    pub fn virtual_hosts(&self) -> &[VirtualHost] {
        &self.vhosts
    }

    /// Finds the virtual host for an authority (case, port and a trailing dot ignored).
    pub fn virtual_host(&self, authority: &str) -> Option<&VirtualHost> {
        let host = normalize_host(authority);
        let index = self
            .exact
            .get(host.as_ref())
            .copied()
            .or_else(|| {
                self.suffixes
                    .iter()
                    .find(|(suffix, _)| {
                        host.len() > suffix.len() && host.ends_with(suffix.as_str())
                    })
                    .map(|(_, index)| *index)
            })
            .or(self.wildcard)?;
        self.vhosts.get(index)
    }

    /// Finds the route for a request.
    pub fn route(&self, request: &RequestView<'_>) -> Option<(&VirtualHost, &Route)> {
        let vhost = self.virtual_host(request.authority)?;
        let route = vhost.routes.iter().find(|r| r.matcher.matches(request))?;
        Some((vhost, route))
    }
}

/// Lowercases, strips the port and a trailing dot; borrows when already normal.
fn normalize_host(authority: &str) -> std::borrow::Cow<'_, str> {
    let host = match authority.rfind(':') {
        // An IPv6 literal keeps its colons inside brackets.
        Some(colon) if !authority[colon..].contains(']') => &authority[..colon],
        _ => authority,
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.bytes().any(|b| b.is_ascii_uppercase()) {
        std::borrow::Cow::Owned(host.to_ascii_lowercase())
    } else {
        std::borrow::Cow::Borrowed(host)
    }
}

impl Route {
    fn reads_request_headers(&self) -> bool {
        let weighted_headers = match &self.action {
            RouteAction::Forward(forward) => forward.target_headers.iter().any(Option::is_some),
            _ => false,
        };
        !self.matcher.headers.is_empty()
            || self.headers.is_some()
            || weighted_headers
            || self.jwt.is_some()
            || self.rbac.is_some()
            || self.rate_limit.is_some()
            || !self.rate_limits.is_empty()
            || self.access_log.is_some()
    }
}

impl RouteMatch {
    /// Whether every condition holds.
    pub fn matches(&self, request: &RequestView<'_>) -> bool {
        let path_ok = match &self.path {
            PathMatch::Any => true,
            PathMatch::Exact(p) => request.path == p,
            PathMatch::Prefix(p) => request.path.starts_with(p.as_str()),
            PathMatch::Regex(re) => re.is_match(request.path),
        };
        path_ok
            && (self.methods.is_empty() || self.methods.contains(request.method))
            && self.headers.iter().all(|h| h.matches(request.headers))
            && self.query.iter().all(|q| q.matches(request.query))
    }
}

impl ValueMatch {
    fn test(&self, value: Option<&str>) -> bool {
        match (self, value) {
            (ValueMatch::Present(want), v) => *want == v.is_some(),
            (ValueMatch::Exact(want), Some(v)) => v == want,
            (ValueMatch::Regex(re), Some(v)) => re.is_match(v),
            (_, None) => false,
        }
    }
}

impl HeaderMatch {
    /// Whether the headers pass this condition.
    pub fn matches(&self, headers: &HeaderMap) -> bool {
        let result = match &self.value {
            ValueMatch::Present(want) => *want == headers.contains_key(&self.name),
            other => {
                let mut values = headers.get_all(&self.name).iter();
                match (values.next(), values.next()) {
                    (None, _) => other.test(None),
                    (Some(only), None) => other.test(only.to_str().ok()),
                    // Several values of one header are tested as one comma-joined value, as Envoy does.
                    (Some(first), Some(second)) => {
                        let joined = [first, second]
                            .into_iter()
                            .chain(values)
                            .filter_map(|v| v.to_str().ok())
                            .collect::<Vec<_>>()
                            .join(",");
                        other.test(Some(&joined))
                    }
                }
            }
        };
        result != self.invert
    }
}

impl QueryMatch {
    fn matches(&self, query: Option<&str>) -> bool {
        let value = query.and_then(|q| query_param(q, &self.name));
        self.value.test(value.as_deref())
    }
}

/// The first value of a query parameter, percent-decoded (`+` as space).
pub fn query_param(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        (percent_decode(key) == name).then(|| percent_decode(value))
    })
}

fn percent_decode(input: &str) -> String {
    let bytes = input.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h << 4 | l);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests;

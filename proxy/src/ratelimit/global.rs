//! Global rate limits through an Envoy rate-limit service
//! (`envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit`).
//!
//! Route and virtual-host `rate_limits` actions turn a request into
//! descriptors ([`descriptors`], pure); [`GlobalRateLimit::check`] asks the
//! service about them over gRPC, through a cluster's pooled connections or
//! one reused channel to a fixed address. What to answer (429, 500, or let
//! the call through with the service's headers) is the HTTP layer's call,
//! made from the [`Verdict`].

use std::net::IpAddr;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::future::BoxFuture;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, Uri, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use postern_proto::envoy::extensions::common::ratelimit::v3::{
    rate_limit_descriptor::Entry, RateLimitDescriptor,
};
use postern_proto::envoy::service::ratelimit::v3::rate_limit_response::{
    rate_limit::Unit, Code, DescriptorStatus,
};
use postern_proto::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use postern_proto::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};

use crate::authn::jwt::ClaimPath;
use crate::authn::VerifiedJwt;
use crate::cluster::{ClusterManager, Outcome, UpstreamError};
use crate::config::file::UpstreamProtocol;
use crate::http::body::RequestBody;
use crate::route::HeaderMatch;

/// Envoy's default time allowed for one `ShouldRateLimit` call.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(20);

/// Where the rate-limit service is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RlsTarget {
    /// A cluster of this proxy (HTTP/2), through its pools, TLS and breakers.
    Cluster(Arc<str>),
    /// A fixed plaintext address, `http://host:port`.
    Address(Uri),
}

/// The rate-limit filter of a listener: which service, which domain, and
/// what a failure means.
#[derive(Debug)]
pub struct GlobalRateLimit {
    /// The domain every request names.
    pub domain: String,
    /// The service.
    pub target: RlsTarget,
    /// Time allowed per call; past it the call counts as failed.
    pub timeout: Duration,
    /// Refuse calls (500) when the service fails; otherwise let them pass.
    pub failure_mode_deny: bool,
    /// Only route policies of this stage apply.
    pub stage: u32,
    /// Add `x-ratelimit-limit`, `-remaining` and `-reset` (Envoy's
    /// `DRAFT_VERSION_03`) from the service's statuses.
    pub x_ratelimit_headers: bool,
    /// gRPC callers refused get RESOURCE_EXHAUSTED instead of UNAVAILABLE.
    pub rate_limited_as_resource_exhausted: bool,
    /// Add `x-envoy-ratelimited: true` to refusals (Envoy's default).
    pub x_envoy_ratelimited_header: bool,
    /// The local service cluster, for `source_cluster` actions.
    pub source_cluster: Arc<str>,
    /// The channel to `RlsTarget::Address`, made at first use (it needs a
    /// runtime) and handed on to the config that replaces this one.
    channel: OnceLock<tonic::transport::Channel>,
}

impl GlobalRateLimit {
    /// A rate-limit filter with every option at its default but the given ones.
    pub fn new(domain: String, target: RlsTarget) -> GlobalRateLimit {
        GlobalRateLimit {
            domain,
            target,
            timeout: DEFAULT_TIMEOUT,
            failure_mode_deny: false,
            stage: 0,
            x_ratelimit_headers: false,
            rate_limited_as_resource_exhausted: false,
            x_envoy_ratelimited_header: true,
            source_cluster: Arc::from(""),
            channel: OnceLock::new(),
        }
    }

    /// Takes over `previous`'s channel when the address is the same, so a
    /// config push costs no reconnect.
    pub fn share_channel(&self, previous: &GlobalRateLimit) {
        if self.target == previous.target {
            if let Some(channel) = previous.channel.get() {
                let _ = self.channel.set(channel.clone());
            }
        }
    }

    /// Asks the service about `descriptors`, within the timeout.
    pub async fn check(
        &self,
        clusters: &Arc<ClusterManager>,
        descriptors: Vec<RateLimitDescriptor>,
    ) -> Verdict {
        let request = RateLimitRequest {
            domain: self.domain.clone(),
            descriptors,
            hits_addend: 0,
        };
        let call = async {
            match &self.target {
                RlsTarget::Address(uri) => {
                    let channel = self.channel.get_or_init(|| {
                        tonic::transport::Endpoint::from(uri.clone())
                            .connect_timeout(Duration::from_secs(1))
                            .tcp_nodelay(true)
                            .connect_lazy()
                    });
                    RateLimitServiceClient::new(channel.clone())
                        .should_rate_limit(request)
                        .await
                }
                RlsTarget::Cluster(name) => {
                    RateLimitServiceClient::new(ClusterService {
                        clusters: clusters.clone(),
                        cluster: name.clone(),
                    })
                    .should_rate_limit(request)
                    .await
                }
            }
        };
        let response = match tokio::time::timeout(self.timeout, call).await {
            Err(_) => return Verdict::Error(RlsError::Timeout(self.timeout)),
            Ok(Err(status)) => return Verdict::Error(RlsError::Status(Box::new(status))),
            Ok(Ok(response)) => response.into_inner(),
        };
        let headers = ServiceHeaders::from_response(&response, self.x_ratelimit_headers);
        match Code::try_from(response.overall_code) {
            Ok(Code::Ok) => Verdict::Ok(headers),
            Ok(Code::OverLimit) => Verdict::OverLimit(headers),
            _ => Verdict::Error(RlsError::UnknownCode(response.overall_code)),
        }
    }
}

/// What the service said.
#[derive(Debug)]
pub enum Verdict {
    /// Within every limit.
    Ok(ServiceHeaders),
    /// Over some limit.
    OverLimit(ServiceHeaders),
    /// No answer that counts.
    Error(RlsError),
}

/// Why a call to the service did not count.
#[derive(Debug, thiserror::Error)]
pub enum RlsError {
    /// No answer within the timeout.
    #[error("rate limit service did not answer within {0:?}")]
    Timeout(Duration),
    /// The call failed.
    #[error("rate limit service call failed: {0}")]
    Status(#[source] Box<tonic::Status>),
    /// The answer's overall code was neither OK nor OVER_LIMIT.
    #[error("rate limit service answered code {0}")]
    UnknownCode(i32),
}

/// Headers the service asks for, valid ones only.
#[derive(Debug, Default)]
pub struct ServiceHeaders {
    /// Set on the request before it goes upstream.
    pub request: Vec<(HeaderName, HeaderValue)>,
    /// Added to the response (the upstream's or the 429).
    pub response: Vec<(HeaderName, HeaderValue)>,
}

impl ServiceHeaders {
    fn from_response(response: &RateLimitResponse, x_ratelimit: bool) -> ServiceHeaders {
        let convert = |list: &[postern_proto::envoy::config::core::v3::HeaderValue]| {
            list.iter()
                .filter_map(|h| {
                    let name =
                        HeaderName::from_bytes(h.key.to_ascii_lowercase().as_bytes()).ok()?;
                    let value = if h.raw_value.is_empty() {
                        HeaderValue::from_str(&h.value).ok()?
                    } else {
                        HeaderValue::from_bytes(&h.raw_value).ok()?
                    };
                    Some((name, value))
                })
                .collect::<Vec<_>>()
        };
        let mut headers = ServiceHeaders {
            request: convert(&response.request_headers_to_add),
            response: convert(&response.response_headers_to_add),
        };
        if x_ratelimit {
            headers
                .response
                .extend(x_ratelimit_headers(&response.statuses));
        }
        headers
    }

    /// Adds the response headers to `headers`.
    pub fn add_to_response(&self, headers: &mut HeaderMap) {
        for (name, value) in &self.response {
            headers.append(name.clone(), value.clone());
        }
    }
}

/// Seconds in a limit's unit; `None` for an unknown unit.
fn unit_seconds(unit: i32) -> Option<u64> {
    Some(match Unit::try_from(unit).ok()? {
        Unit::Second => 1,
        Unit::Minute => 60,
        Unit::Hour => 3600,
        Unit::Day => 86_400,
        Unit::Week => 7 * 86_400,
        Unit::Month => 30 * 86_400,
        Unit::Year => 365 * 86_400,
        Unit::Unknown => return None,
    })
}

/// The `x-ratelimit-*` headers of draft 03 of the IETF RateLimit header
/// fields, as Envoy writes them: the limit closest to running out, and
/// every limit's quota policy.
pub fn x_ratelimit_headers(statuses: &[DescriptorStatus]) -> Vec<(HeaderName, HeaderValue)> {
    let limited: Vec<&DescriptorStatus> = statuses
        .iter()
        .filter(|s| s.current_limit.is_some())
        .collect();
    let Some(tightest) = limited.iter().min_by_key(|s| s.limit_remaining) else {
        return Vec::new();
    };
    let mut policy = String::new();
    for status in &limited {
        let Some(limit) = &status.current_limit else {
            continue;
        };
        if let Some(window) = unit_seconds(limit.unit) {
            policy.push_str(&format!(", {};w={window}", limit.requests_per_unit));
            if !limit.name.is_empty() {
                policy.push_str(&format!(";name=\"{}\"", limit.name));
            }
        }
    }
    let rpu = tightest
        .current_limit
        .as_ref()
        .map_or(0, |l| l.requests_per_unit);
    let reset = tightest
        .duration_until_reset
        .as_ref()
        .map_or(0, |d| d.seconds.max(0));
    [
        ("x-ratelimit-limit", format!("{rpu}{policy}")),
        (
            "x-ratelimit-remaining",
            tightest.limit_remaining.to_string(),
        ),
        ("x-ratelimit-reset", reset.to_string()),
    ]
    .into_iter()
    .filter_map(|(name, value)| {
        Some((
            HeaderName::from_static(name),
            HeaderValue::from_str(&value).ok()?,
        ))
    })
    .collect()
}

// ------------------------------------------------------------ descriptors --

/// One `rate_limits` entry of a route or virtual host: a descriptor, built
/// when every action yields an entry (or skips).
#[derive(Debug)]
pub struct RateLimitPolicy {
    /// The filter stage this entry is for.
    pub stage: u32,
    /// The actions, in order; each adds one entry.
    pub actions: Vec<Action>,
}

/// A descriptor action (Envoy's `RateLimit.Action`, plus caller identity).
#[derive(Debug)]
pub enum Action {
    /// `(key, value of the header)`; no header: skip the entry when
    /// `skip_if_absent`, else no descriptor.
    RequestHeader {
        /// The header.
        name: HeaderName,
        /// The entry key.
        key: String,
        /// Skip the entry instead of dropping the descriptor.
        skip_if_absent: bool,
    },
    /// `("remote_address", caller IP)`.
    RemoteAddress,
    /// `(key, value)` always.
    GenericKey {
        /// The entry key (Envoy's default `generic_key`).
        key: String,
        /// The entry value.
        value: String,
    },
    /// `(key, value)` when the headers match as expected, else
    /// `(key, default)` when a default is set, else no descriptor.
    HeaderValueMatch {
        /// The entry key (Envoy's default `header_match`).
        key: String,
        /// The value on a match.
        value: String,
        /// The value on no match.
        default: Option<String>,
        /// Whether the entry is for requests that match (true) or not.
        expect_match: bool,
        /// All must hold for a match.
        headers: Vec<HeaderMatch>,
    },
    /// `("destination_cluster", the cluster the route picked)`.
    DestinationCluster,
    /// `("source_cluster", this proxy's service cluster)`.
    SourceCluster,
    /// `(key, the caller's verified SPIFFE ID)`: Postern's own.
    SpiffeId {
        /// The entry key (default `spiffe_id`).
        key: String,
        /// Skip the entry for callers without one.
        skip_if_absent: bool,
    },
    /// `(key, a claim of the first verified JWT that has it)`: Postern's own.
    JwtClaim {
        /// The entry key.
        key: String,
        /// The claim.
        claim: ClaimPath,
        /// Skip the entry when no token has the claim.
        skip_if_absent: bool,
    },
}

/// What descriptor actions read from a request.
#[derive(Debug, Clone, Copy)]
pub struct RequestFacts<'a> {
    /// The request headers.
    pub headers: &'a HeaderMap,
    /// The caller's IP.
    pub remote_ip: IpAddr,
    /// The cluster the route sends to, if it forwards.
    pub destination_cluster: Option<&'a str>,
    /// This proxy's service cluster.
    pub source_cluster: &'a str,
    /// The caller's verified SPIFFE ID.
    pub spiffe_id: Option<&'a str>,
    /// Verified tokens.
    pub jwt: &'a [VerifiedJwt],
}

/// What one action adds.
enum Step {
    Add(String, String),
    Skip,
    Drop,
}

impl Action {
    fn apply(&self, facts: &RequestFacts<'_>) -> Step {
        match self {
            Action::RequestHeader {
                name,
                key,
                skip_if_absent,
            } => match facts.headers.get(name).and_then(|v| v.to_str().ok()) {
                Some(value) => Step::Add(key.clone(), value.to_string()),
                None if *skip_if_absent => Step::Skip,
                None => Step::Drop,
            },
            Action::RemoteAddress => {
                Step::Add("remote_address".into(), facts.remote_ip.to_string())
            }
            Action::GenericKey { key, value } => Step::Add(key.clone(), value.clone()),
            Action::HeaderValueMatch {
                key,
                value,
                default,
                expect_match,
                headers,
            } => {
                let matched = headers.iter().all(|h| h.matches(facts.headers));
                if matched == *expect_match {
                    Step::Add(key.clone(), value.clone())
                } else if let Some(default) = default {
                    Step::Add(key.clone(), default.clone())
                } else {
                    Step::Drop
                }
            }
            Action::DestinationCluster => match facts.destination_cluster {
                Some(cluster) => Step::Add("destination_cluster".into(), cluster.to_string()),
                None => Step::Drop,
            },
            Action::SourceCluster => {
                Step::Add("source_cluster".into(), facts.source_cluster.to_string())
            }
            Action::SpiffeId {
                key,
                skip_if_absent,
            } => match facts.spiffe_id {
                Some(id) => Step::Add(key.clone(), id.to_string()),
                None if *skip_if_absent => Step::Skip,
                None => Step::Drop,
            },
            Action::JwtClaim {
                key,
                claim,
                skip_if_absent,
            } => match facts.jwt.iter().find_map(|t| t.claims.text(claim)) {
                Some(value) => Step::Add(key.clone(), value.into_owned()),
                None if *skip_if_absent => Step::Skip,
                None => Step::Drop,
            },
        }
    }
}

/// The descriptors of `policies` at `stage` for one request, in order. A
/// policy whose actions cannot all be satisfied adds none, and one whose
/// every entry was skipped adds none, as in Envoy.
pub fn descriptors(
    policies: &[Arc<RateLimitPolicy>],
    stage: u32,
    facts: &RequestFacts<'_>,
) -> Vec<RateLimitDescriptor> {
    let mut out = Vec::new();
    'policy: for policy in policies.iter().filter(|p| p.stage == stage) {
        let mut entries = Vec::with_capacity(policy.actions.len());
        for action in &policy.actions {
            match action.apply(facts) {
                Step::Add(key, value) => entries.push(Entry { key, value }),
                Step::Skip => {}
                Step::Drop => continue 'policy,
            }
        }
        if !entries.is_empty() {
            out.push(RateLimitDescriptor {
                entries,
                ..Default::default()
            });
        }
    }
    out
}

// ------------------------------------------------------- cluster transport --

/// tonic's transport over a cluster of this proxy: each call takes an
/// endpoint from the cluster's balancer and a pooled HTTP/2 connection,
/// with the cluster's TLS, breakers and outlier reports.
#[derive(Debug, Clone)]
struct ClusterService {
    clusters: Arc<ClusterManager>,
    cluster: Arc<str>,
}

/// Why a call through a cluster could not be made.
#[derive(Debug, thiserror::Error)]
enum ClusterCallError {
    #[error("no cluster named {0:?}")]
    NoCluster(Arc<str>),
    #[error("cluster {0:?} does not speak HTTP/2, which gRPC needs")]
    NotHttp2(Arc<str>),
    #[error("cannot read the encoded request: {0}")]
    Body(#[source] tonic::Status),
    #[error("invalid request target: {0}")]
    Target(#[source] http::Error),
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
}

impl tower_service::Service<Request<tonic::body::Body>> for ClusterService {
    type Response = Response<Incoming>;
    type Error = ClusterCallError;
    type Future = BoxFuture<'static, Result<Response<Incoming>, ClusterCallError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // The pools admit or refuse per call.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<tonic::body::Body>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let cluster = this
                .clusters
                .get(&this.cluster)
                .ok_or_else(|| ClusterCallError::NoCluster(this.cluster.clone()))?;
            if cluster.protocol() != UpstreamProtocol::Http2 {
                return Err(ClusterCallError::NotHttp2(this.cluster.clone()));
            }
            let _admitted = cluster.begin_request()?;
            let endpoint = cluster.pick(rand::random())?;
            let (mut parts, body) = request.into_parts();
            // A unary call's body is one small encoded message.
            let data = body
                .collect()
                .await
                .map_err(ClusterCallError::Body)?
                .to_bytes();
            let path = parts
                .uri
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
            parts.uri = Uri::builder()
                .scheme("http")
                .authority(endpoint.endpoint().address.to_string())
                .path_and_query(path)
                .build()
                .map_err(ClusterCallError::Target)?;
            parts.version = Version::HTTP_2;
            let request = Request::from_parts(parts, RequestBody::replay(&data, &None));
            match endpoint.endpoint().pool.send(request).await {
                Ok((response, _)) => {
                    cluster.report(endpoint.endpoint(), Outcome::Success);
                    Ok(response)
                }
                Err(err) => {
                    let outcome = match err.error {
                        UpstreamError::Connect { .. }
                        | UpstreamError::ConnectTimeout(_)
                        | UpstreamError::Tls { .. }
                        | UpstreamError::Handshake { .. } => Outcome::ConnectFailure,
                        _ => Outcome::ServerError,
                    };
                    cluster.report(endpoint.endpoint(), outcome);
                    Err(ClusterCallError::Upstream(err.error))
                }
            }
        })
    }
}

#[cfg(test)]
mod tests;

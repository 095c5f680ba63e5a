//! The HTTP request path: limits, routing, local replies, and forwarding to
//! a cluster with retries, timeouts and circuit breaking.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::uri::PathAndQuery;
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body as _;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

use super::body::{BodyTooLarge, RequestBody, ResponseBody, UpstreamResponse};
use super::headers::{self as hdr, X_POSTERN_OVERLOADED};
use crate::cluster::pool::SendError;
use crate::cluster::{Cluster, ClusterManager, Outcome, RetryGuard, UpstreamError};
use crate::config::file::UpstreamProtocol;
use crate::config::Listener;
use crate::listener::{ConnectionTracker, Shutdown, TrackedConnection};
use crate::route::mutation::{Facts, Plan, UpstreamAddress};
use crate::route::{Forward, Redirect, RequestView, RetryPolicy, RouteTable};
use crate::telemetry::istio::X_POSTERN_PEER;
use crate::telemetry::log::TrafficDirection;
use crate::telemetry::metrics as names;
use crate::telemetry::{CallRecord, ListenerTelemetry, ResponseFlag};

/// Serves the HTTP requests of one listener.
#[derive(Debug)]
pub struct HttpProxy {
    /// The listener's settings.
    pub listener: Arc<Listener>,
    /// Trust the client's `x-forwarded-proto` and `x-request-id`.
    pub trust_downstream: bool,
    /// Routes and policies, swapped whole when the config changes; each
    /// request keeps what it started with.
    pub config: Arc<arc_swap::ArcSwap<HttpConfig>>,
    /// Clusters.
    pub clusters: Arc<ClusterManager>,
    /// Per-call metrics and log sinks.
    pub telemetry: Arc<ListenerTelemetry>,
    /// Counts upgraded (WebSocket) tunnels as live connections for the drain.
    pub tracker: Arc<ConnectionTracker>,
    /// Closes tunnels when the drain time is up.
    pub shutdown: Shutdown,
    /// The process's overload state: past its memory threshold, requests
    /// are shed.
    pub overload: Arc<crate::overload::Overload>,
}

/// What a config change swaps in an HTTP listener without touching its
/// connections: routes and the policies in front of them.
#[derive(Debug)]
pub struct HttpConfig {
    /// Path normalisation before routing and policies.
    pub normalize: crate::route::normalize::PathNormalization,
    /// Access control.
    pub rbac: Option<Arc<crate::authz::Rbac>>,
    /// Rate limit on every request of the listener.
    pub rate_limit: Option<Arc<crate::ratelimit::LocalRateLimit>>,
    /// JWT authentication, before RBAC.
    pub jwt: Option<Arc<crate::authn::JwtAuthn>>,
    /// Global rate limits, after the local ones.
    pub global_rate_limit: Option<Arc<crate::ratelimit::global::GlobalRateLimit>>,
    /// Virtual hosts and routes.
    pub routes: Arc<RouteTable>,
}

impl HttpConfig {
    /// The swappable part of a listener's HTTP settings.
    pub fn of(http: &crate::config::HttpListener) -> HttpConfig {
        HttpConfig {
            normalize: http.normalize,
            rbac: http.rbac.clone(),
            rate_limit: http.rate_limit.clone(),
            jwt: http.jwt.clone(),
            global_rate_limit: http.global_rate_limit.clone(),
            routes: http.routes.clone(),
        }
    }

    /// Whether a policy or route may read a request header by name (see
    /// `RouteTable::reads_request_headers`); errs towards yes.
    pub fn reads_request_headers(&self) -> bool {
        self.rbac.is_some()
            || self.rate_limit.is_some()
            || self.jwt.is_some()
            || self.global_rate_limit.is_some()
            || self.routes.reads_request_headers()
    }

    /// Carries over what the config it replaces learned at run time
    /// (fetched JWT keys, the rate-limit service's channel, local
    /// rate-limit buckets), so a config push costs no refetch or reconnect
    /// and refills no bucket.
    pub fn adopt(&self, previous: &HttpConfig) {
        adopt_local_limits(self, previous);
        if let (Some(jwt), Some(old)) = (&self.jwt, &previous.jwt) {
            jwt.adopt(old);
        }
        if let (Some(limit), Some(old)) = (&self.global_rate_limit, &previous.global_rate_limit) {
            limit.share_channel(old);
        }
    }
}

/// Hands each local rate limit the buckets of the limit it replaces: the
/// listener's to the listener's, a route's to the route of the same virtual
/// host and name. `LocalRateLimit::adopt` refuses a changed key or spec.
pub(crate) fn adopt_local_limits(next: &HttpConfig, previous: &HttpConfig) {
    use std::collections::hash_map::{Entry, HashMap};
    if let (Some(limit), Some(old)) = (&next.rate_limit, &previous.rate_limit) {
        limit.adopt(old);
    }
    // A name given twice is ambiguous, with a limit or without: neither
    // copy inherits.
    let mut old_routes: HashMap<(&str, &str), Option<&crate::ratelimit::LocalRateLimit>> =
        HashMap::new();
    for vhost in previous.routes.virtual_hosts() {
        for route in &vhost.routes {
            match old_routes.entry((&vhost.name, &route.name)) {
                Entry::Vacant(slot) => {
                    slot.insert(route.rate_limit.as_deref());
                }
                Entry::Occupied(mut slot) => {
                    slot.insert(None);
                }
            }
        }
    }
    let mut new_names: HashMap<(&str, &str), usize> = HashMap::new();
    for vhost in next.routes.virtual_hosts() {
        for route in &vhost.routes {
            *new_names.entry((&vhost.name, &route.name)).or_default() += 1;
        }
    }
    for vhost in next.routes.virtual_hosts() {
        for route in &vhost.routes {
            let name = (&*vhost.name, &*route.name);
            if new_names.get(&name) != Some(&1) {
                continue;
            }
            if let (Some(limit), Some(Some(old))) = (&route.rate_limit, old_routes.get(&name)) {
                limit.adopt(old);
            }
        }
    }
}

/// The descriptors a route-level local limit with `descriptors` matches
/// against: built by the limit's own `rate_limits`, or else the route's,
/// of the limit's stage. Empty when the limit has no descriptor buckets.
fn local_descriptors<B>(
    limit: &crate::ratelimit::LocalRateLimit,
    route_policies: &[Arc<crate::ratelimit::global::RateLimitPolicy>],
    target: Option<&Arc<str>>,
    global: Option<&crate::ratelimit::global::GlobalRateLimit>,
    peer: &hdr::DownstreamPeer,
    request: &Request<B>,
    jwt: &[crate::authn::VerifiedJwt],
) -> Vec<postern_proto::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor> {
    if limit.descriptors.is_empty() {
        return Vec::new();
    }
    let policies = if limit.rate_limits.is_empty() {
        route_policies
    } else {
        &limit.rate_limits
    };
    let facts = crate::ratelimit::global::RequestFacts {
        headers: request.headers(),
        remote_ip: peer.addr,
        destination_cluster: target.map(|c| &**c),
        // node.cluster reaches the config through the rate-limit service's
        // settings only.
        source_cluster: global.map_or("", |g| &g.source_cluster),
        spiffe_id: peer
            .spiffe_id
            .as_deref()
            .map(postern_certs::SpiffeId::as_str),
        jwt,
    };
    crate::ratelimit::global::descriptors(policies, limit.stage, &facts)
}

/// A reply made by the proxy itself.
struct LocalReply {
    status: StatusCode,
    message: &'static str,
    flag: Option<ResponseFlag>,
    overloaded: bool,
    /// The gRPC status to answer instead of the HTTP status's mapping.
    grpc_status: Option<&'static str>,
}

impl LocalReply {
    fn new(status: StatusCode, message: &'static str, flag: Option<ResponseFlag>) -> Self {
        LocalReply {
            status,
            message,
            flag,
            overloaded: false,
            grpc_status: None,
        }
    }

    fn from_upstream(error: &UpstreamError) -> Self {
        match error {
            UpstreamError::Overloaded(_) => LocalReply {
                overloaded: true,
                ..LocalReply::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "upstream overloaded",
                    Some(ResponseFlag::UpstreamOverflow),
                )
            },
            UpstreamError::NoHealthyEndpoint => LocalReply::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "no healthy upstream",
                Some(ResponseFlag::NoHealthyUpstream),
            ),
            UpstreamError::ConnectTimeout(_)
            | UpstreamError::Connect { .. }
            | UpstreamError::Tls { .. }
            | UpstreamError::Handshake { .. } => LocalReply::new(
                StatusCode::BAD_GATEWAY,
                "upstream connect failure",
                Some(ResponseFlag::UpstreamConnectFailure),
            ),
            UpstreamError::Reset { .. } => LocalReply::new(
                StatusCode::BAD_GATEWAY,
                "upstream reset before response",
                Some(ResponseFlag::UpstreamReset),
            ),
            UpstreamError::Refused { .. } => LocalReply::new(
                StatusCode::BAD_GATEWAY,
                "upstream refused the request",
                Some(ResponseFlag::UpstreamReset),
            ),
            UpstreamError::RequestBody(source) => {
                if is_body_too_large(source) {
                    LocalReply::new(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "request body too large",
                        Some(ResponseFlag::DownstreamLimit),
                    )
                } else {
                    LocalReply::new(
                        StatusCode::BAD_REQUEST,
                        "request body failed",
                        Some(ResponseFlag::DownstreamClosed),
                    )
                }
            }
        }
    }

    fn timeout() -> Self {
        LocalReply::new(
            StatusCode::GATEWAY_TIMEOUT,
            "upstream request timeout",
            Some(ResponseFlag::UpstreamTimeout),
        )
    }
}

fn is_body_too_large(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(error);
    while let Some(e) = current {
        if e.is::<BodyTooLarge>() {
            return true;
        }
        current = e.source();
    }
    false
}

/// The gRPC status for a proxy-made HTTP status (the gRPC HTTP mapping).
fn grpc_status_for(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 => "13",
        401 => "16",
        403 => "7",
        404 => "12",
        408 | 504 => "4",
        413 | 429 | 431 => "8",
        _ => "14",
    }
}

fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// A local answer to a request refused before its head was settled (and
/// noted for the log sinks, which happens once, after that).
fn early_response<B>(
    reply: &LocalReply,
    grpc: bool,
    record: &mut CallRecord,
    request: &Request<B>,
) -> Response<ResponseBody> {
    record.note_request(request);
    local_response(reply, grpc, record)
}

fn local_response(
    reply: &LocalReply,
    grpc: bool,
    record: &mut CallRecord,
) -> Response<ResponseBody> {
    if let Some(flag) = reply.flag {
        record.set_flag(flag);
    }
    let mut response = if grpc {
        // A trailers-only response: gRPC clients read the status from headers.
        record.set_status(200);
        let mut r = Response::new(ResponseBody::empty());
        let h = r.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        let grpc_status = if reply.overloaded {
            // A breaker refusal is back-pressure, not an outage.
            "8"
        } else {
            reply
                .grpc_status
                .unwrap_or_else(|| grpc_status_for(reply.status))
        };
        h.insert("grpc-status", HeaderValue::from_static(grpc_status));
        record.set_grpc_status(h);
        h.insert("grpc-message", HeaderValue::from_static(reply.message));
        r
    } else {
        record.set_status(reply.status.as_u16());
        record.add_sent(reply.message.len());
        let mut r = Response::new(ResponseBody::full(Bytes::from_static(
            reply.message.as_bytes(),
        )));
        *r.status_mut() = reply.status;
        r.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        r
    };
    if reply.overloaded {
        response
            .headers_mut()
            .insert(&X_POSTERN_OVERLOADED, HeaderValue::from_static("true"));
    }
    response
}

/// What response header values may read of a request that has gone upstream.
struct KeptRequest {
    authority: HeaderValue,
    uri: Uri,
    method: Method,
    version: Version,
    /// Only when some value reads request headers.
    headers: Option<HeaderMap>,
}

/// The route's request header changes and what their values read.
struct RequestMutation<'a> {
    plan: &'a Plan<'a>,
    peer: &'a hdr::DownstreamPeer,
    start: std::time::SystemTime,
    /// The protocol marker was written onto the request's headers
    /// (`protocol::mark`).
    marked: bool,
}

/// The request body, as later tries can use it.
enum BodySource {
    /// Kept whole: every try sends a copy.
    Buffered(Bytes, Option<HeaderMap>),
    /// Streamed once; `None` once a try has taken it.
    Streaming(Option<Incoming>),
}

/// The cleaned-up request head sent upstream.
struct UpstreamHead {
    method: Method,
    uri: Uri,
    version: Version,
    headers: HeaderMap,
}

impl UpstreamHead {
    fn to_request(&self, body: RequestBody) -> Request<RequestBody> {
        let mut request = Request::new(body);
        *request.method_mut() = self.method.clone();
        *request.uri_mut() = self.uri.clone();
        *request.version_mut() = self.version;
        *request.headers_mut() = self.headers.clone();
        request
    }

    fn into_request(self, body: RequestBody) -> Request<RequestBody> {
        let mut request = Request::new(body);
        *request.method_mut() = self.method;
        *request.uri_mut() = self.uri;
        *request.version_mut() = self.version;
        *request.headers_mut() = self.headers;
        request
    }
}

/// Replaces the request's path, keeping its query.
fn replace_path<B>(request: &mut Request<B>, path: &str) -> Result<(), LocalReply> {
    let target = match request.uri().query() {
        Some(query) => format!("{path}?{query}"),
        None => path.to_string(),
    };
    let mut parts = request.uri().clone().into_parts();
    parts.path_and_query = http::uri::PathAndQuery::try_from(target).ok();
    match http::Uri::from_parts(parts) {
        Ok(uri) => {
            *request.uri_mut() = uri;
            Ok(())
        }
        Err(_) => Err(LocalReply::new(
            StatusCode::BAD_REQUEST,
            "invalid path",
            Some(ResponseFlag::DownstreamLimit),
        )),
    }
}

impl HttpProxy {
    /// Takes a token; the 429 to send when the limit refuses the request.
    /// `descriptors` are the request's for the limit's descriptor buckets
    /// (`local_descriptors`).
    #[allow(clippy::too_many_arguments)]
    fn rate_limited<B>(
        &self,
        limit: &crate::ratelimit::LocalRateLimit,
        scope: &str,
        peer: &hdr::DownstreamPeer,
        request: &Request<B>,
        jwt: &[crate::authn::VerifiedJwt],
        descriptors: &[postern_proto::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor],
        grpc: bool,
        record: &mut CallRecord,
    ) -> Option<Response<ResponseBody>> {
        use crate::ratelimit::RateLimitKey;
        let claim_key;
        let key = match &limit.key {
            RateLimitKey::Shared => "",
            RateLimitKey::SpiffeId => peer.spiffe_id.as_deref().map_or("", |id| id.as_str()),
            // Formatted once per connection already, for x-forwarded-for.
            RateLimitKey::RemoteAddress => peer.ip.to_str().unwrap_or(""),
            RateLimitKey::Header(name) => request
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or(""),
            RateLimitKey::JwtClaim(claim) => {
                claim_key = jwt.iter().find_map(|token| token.claims.text(claim));
                claim_key.as_deref().unwrap_or("")
            }
        };
        let refusals = limit.take_all(key, descriptors, Instant::now());
        let mut enforced = None;
        for refusal in refusals {
            let mode = if refusal.shadow { "shadow" } else { "enforced" };
            metrics::counter!(
                crate::telemetry::metrics::RATELIMIT_LIMITED_TOTAL,
                "listener" => self.listener.name.clone(),
                "scope" => scope.to_string(),
                "mode" => mode,
                "bucket" => refusal.bucket.to_string(),
            )
            .increment(1);
            if refusal.shadow {
                tracing::debug!(listener = %self.listener.name, scope, bucket = %refusal.bucket, "rate limit (shadow) would refuse");
            } else {
                enforced = Some(refusal);
            }
        }
        let refusal = enforced?;
        let retry_after = refusal.retry_after;
        let reply = LocalReply::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate limited",
            Some(ResponseFlag::RateLimited),
        );
        let mut response = local_response(&reply, grpc, record);
        // Whole seconds, rounded up: a client must not come back too early.
        let seconds = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
        let seconds = HeaderValue::from(seconds.max(1));
        let headers = response.headers_mut();
        headers.insert(header::RETRY_AFTER, seconds.clone());
        headers.insert("ratelimit-limit", HeaderValue::from(refusal.max_tokens));
        headers.insert("ratelimit-remaining", HeaderValue::from_static("0"));
        headers.insert("ratelimit-reset", seconds);
        Some(response)
    }

    /// Asks the rate-limit service about the route's descriptors: the
    /// headers it wants on the response, or the reply to send instead.
    #[allow(clippy::too_many_arguments)]
    async fn global_rate_limited(
        &self,
        limit: &crate::ratelimit::global::GlobalRateLimit,
        policies: &[Arc<crate::ratelimit::global::RateLimitPolicy>],
        target: Option<&Arc<str>>,
        peer: &hdr::DownstreamPeer,
        request: &mut Request<Incoming>,
        jwt: &[crate::authn::VerifiedJwt],
        grpc: bool,
        record: &mut CallRecord,
    ) -> Result<Option<crate::ratelimit::global::ServiceHeaders>, Response<ResponseBody>> {
        use crate::ratelimit::global::{descriptors, RequestFacts, Verdict};
        let facts = RequestFacts {
            headers: request.headers(),
            remote_ip: peer.addr,
            destination_cluster: target.map(|c| &**c),
            source_cluster: &limit.source_cluster,
            spiffe_id: peer
                .spiffe_id
                .as_deref()
                .map(postern_certs::SpiffeId::as_str),
            jwt,
        };
        let descriptors = descriptors(policies, limit.stage, &facts);
        if descriptors.is_empty() {
            return Ok(None);
        }
        // Boxed: only calls that ask the service carry its state.
        let verdict = Box::pin(limit.check(&self.clusters, descriptors)).await;
        let count = |result: &'static str| {
            metrics::counter!(
                names::RATELIMIT_GLOBAL_TOTAL,
                "listener" => self.listener.name.clone(),
                "result" => result,
            )
            .increment(1);
        };
        match verdict {
            Verdict::Ok(headers) => {
                count("ok");
                for (name, value) in &headers.request {
                    request.headers_mut().insert(name.clone(), value.clone());
                }
                Ok(Some(headers))
            }
            Verdict::OverLimit(headers) => {
                count("over_limit");
                tracing::debug!(listener = %self.listener.name, path = request.uri().path(), "rate limit service refused request");
                let reply = LocalReply {
                    // Envoy's mapping of 429 unless asked otherwise.
                    grpc_status: Some(if limit.rate_limited_as_resource_exhausted {
                        "8"
                    } else {
                        "14"
                    }),
                    ..LocalReply::new(
                        StatusCode::TOO_MANY_REQUESTS,
                        "rate limited",
                        Some(ResponseFlag::RateLimited),
                    )
                };
                let mut response = local_response(&reply, grpc, record);
                headers.add_to_response(response.headers_mut());
                if limit.x_envoy_ratelimited_header {
                    response
                        .headers_mut()
                        .insert(&hdr::X_ENVOY_RATELIMITED, HeaderValue::from_static("true"));
                }
                Err(response)
            }
            Verdict::Error(error) if limit.failure_mode_deny => {
                count("error");
                tracing::debug!(listener = %self.listener.name, %error, "rate limit service failed; refusing (failure_mode_deny)");
                let reply = LocalReply::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "rate limit service error",
                    Some(ResponseFlag::RateLimitServiceError),
                );
                Err(local_response(&reply, grpc, record))
            }
            Verdict::Error(error) => {
                count("failure_mode_allowed");
                tracing::debug!(listener = %self.listener.name, %error, "rate limit service failed; letting the request through");
                Ok(None)
            }
        }
    }

    /// Runs RBAC (shadow rules, then enforced ones); a refusal comes back as
    /// the reply to send. `route` names the route whose override `rbac` is,
    /// for the logs; `None` for the listener's own.
    fn authorize<B>(
        &self,
        rbac: &crate::authz::Rbac,
        route: Option<&str>,
        peer: &hdr::DownstreamPeer,
        request: &Request<B>,
        authority: &str,
        jwt: &[crate::authn::VerifiedJwt],
    ) -> Option<LocalReply> {
        use crate::authz::{Decision, RbacAction, RequestFacts};
        let facts = RequestFacts {
            peer_id: peer
                .spiffe_id
                .as_deref()
                .map(postern_certs::SpiffeId::as_str),
            peer_ip: peer.addr,
            local_port: peer.local_port,
            method: request.method(),
            path: request.uri().path(),
            headers: request.headers(),
            authority,
            jwt,
            requested_server_name: peer.sni.as_deref(),
        };
        if let Some(shadow) = &rbac.shadow {
            if let Decision::Denied(policy) = shadow.evaluate(&facts) {
                tracing::info!(
                    listener = %self.listener.name,
                    route = route.unwrap_or("-"),
                    policy,
                    peer = facts.peer_id.unwrap_or("-"),
                    path = facts.path,
                    "RBAC shadow rules would deny"
                );
                metrics::counter!(
                    crate::telemetry::metrics::RBAC_SHADOW_DENIALS_TOTAL,
                    "listener" => self.listener.name.clone(),
                    "policy" => policy,
                )
                .increment(1);
            }
        }
        let rules = rbac.rules.as_ref()?;
        match rules.evaluate(&facts) {
            Decision::Denied(policy) => {
                tracing::warn!(
                    listener = %self.listener.name,
                    route = route.unwrap_or("-"),
                    policy,
                    peer = facts.peer_id.unwrap_or("-"),
                    peer_ip = %facts.peer_ip,
                    method = %facts.method,
                    path = facts.path,
                    "RBAC denied request"
                );
                metrics::counter!(
                    crate::telemetry::metrics::RBAC_DENIALS_TOTAL,
                    "listener" => self.listener.name.clone(),
                    "policy" => policy,
                )
                .increment(1);
                Some(LocalReply::new(
                    StatusCode::FORBIDDEN,
                    "RBAC: access denied",
                    Some(ResponseFlag::RbacDenied),
                ))
            }
            Decision::Allowed(Some(policy)) if rules.action == RbacAction::Log => {
                tracing::info!(listener = %self.listener.name, route = route.unwrap_or("-"), policy, path = facts.path, "RBAC log policy matched");
                None
            }
            Decision::Allowed(_) => None,
        }
    }

    /// JWT authentication: the verified tokens, or the 401 to send.
    async fn authenticate(
        &self,
        config: &HttpConfig,
        request: &mut Request<Incoming>,
        authority: &str,
        grpc: bool,
        record: &mut CallRecord,
    ) -> Result<Vec<crate::authn::VerifiedJwt>, Response<ResponseBody>> {
        let Some(jwt) = &config.jwt else {
            return self
                .jwt_route_without_filter(config, request, authority, grpc, record)
                .map_or(Ok(Vec::new()), Err);
        };
        // Routes may pick the requirement; the router looks again later,
        // on the request as authentication left it.
        let route = if config.routes.has_jwt_overrides() {
            let view = RequestView::of(request, authority);
            config
                .routes
                .route(&view)
                .and_then(|(_, route)| route.jwt.as_ref())
        } else {
            None
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        // Boxed: only listeners with JWT pay for its state in every
        // request's future.
        let failure = match Box::pin(jwt.authenticate(
            request,
            authority,
            route,
            &self.clusters,
            now,
        ))
        .await
        {
            Ok(verified) => {
                let result = if verified.is_empty() {
                    "none"
                } else {
                    "verified"
                };
                self.count_jwt(result);
                return Ok(verified);
            }
            Err(failure) => failure,
        };
        self.count_jwt(match failure {
            crate::authn::AuthnFailure::Missing => "missing",
            crate::authn::AuthnFailure::Invalid { .. } => "invalid",
        });
        tracing::debug!(listener = %self.listener.name, %failure, path = request.uri().path(), "JWT authentication failed");
        let message = match (&failure, jwt.strip_failure_response) {
            (_, true) => "",
            (crate::authn::AuthnFailure::Missing, false) => "Jwt is missing",
            (crate::authn::AuthnFailure::Invalid { .. }, false) => "Jwt verification fails",
        };
        let reply = LocalReply::new(
            StatusCode::UNAUTHORIZED,
            message,
            Some(ResponseFlag::UnauthorizedJwt),
        );
        let mut response = local_response(&reply, grpc, record);
        if !jwt.strip_failure_response {
            let challenge = www_authenticate(request, authority, &failure);
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, challenge);
        }
        Err(response)
    }

    /// A listener without JWT authentication whose route still names a
    /// requirement: from xDS, a `jwt_authn` filter disabled in the HCM and
    /// turned on for that route, whose providers are not kept. Fails closed:
    /// the 401 to send, as for a requirement the listener lacks.
    fn jwt_route_without_filter(
        &self,
        config: &HttpConfig,
        request: &Request<Incoming>,
        authority: &str,
        grpc: bool,
        record: &mut CallRecord,
    ) -> Option<Response<ResponseBody>> {
        if !config.routes.has_jwt_overrides() {
            return None;
        }
        let view = RequestView::of(request, authority);
        let Some(crate::authn::RouteJwt::Requirement(name)) = config
            .routes
            .route(&view)
            .and_then(|(_, route)| route.jwt.as_ref())
        else {
            return None;
        };
        self.count_jwt("invalid");
        tracing::debug!(listener = %self.listener.name, requirement = %name, "route names a JWT requirement on a listener without JWT authentication");
        let failure = crate::authn::AuthnFailure::Invalid {
            provider: Arc::from("-"),
            reason: crate::authn::InvalidReason::UnknownRequirement(name.clone()),
        };
        let reply = LocalReply::new(
            StatusCode::UNAUTHORIZED,
            "Jwt verification fails",
            Some(ResponseFlag::UnauthorizedJwt),
        );
        let mut response = local_response(&reply, grpc, record);
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            www_authenticate(request, authority, &failure),
        );
        Some(response)
    }

    /// Handles one downstream request from the peer whose IP is `peer`;
    /// never fails (errors become responses).
    pub async fn handle(
        &self,
        peer: Arc<hdr::DownstreamPeer>,
        request: Request<Incoming>,
    ) -> Response<ResponseBody> {
        let inbound_mesh =
            peer.spiffe_id.is_some() && self.telemetry.direction == TrafficDirection::Inbound;
        let mut response = self.respond(peer, request).await;
        // A calling sidecar learns who answered, local replies included.
        if inbound_mesh {
            if let Some(meta) = &self.telemetry.hub.local_header {
                response.headers_mut().insert(&X_POSTERN_PEER, meta.clone());
            }
        }
        response
    }

    async fn respond(
        &self,
        peer: Arc<hdr::DownstreamPeer>,
        mut request: Request<Incoming>,
    ) -> Response<ResponseBody> {
        let start = Instant::now();
        let grpc = is_grpc(request.headers());
        // Boxed: the record goes from here into `forward` and on into the
        // response body, and inline it would widen each future and
        // response that holds it, copied whole at every move.
        let mut record = Box::new(CallRecord::new(
            start,
            &self.telemetry,
            &peer,
            &request,
            grpc,
        ));
        // Workload metadata counts only from a sidecar proven by mTLS, and
        // never travels further.
        // Looked for by a scan of the names first: a removal by name hashes
        // it, and most requests carry none.
        let peer_meta = if request.headers().keys().any(|name| *name == X_POSTERN_PEER) {
            request.headers_mut().remove(&X_POSTERN_PEER)
        } else {
            None
        };
        if peer.spiffe_id.is_some() && self.telemetry.direction == TrafficDirection::Inbound {
            record.set_source_meta(peer_meta);
        }
        if self.overload.shedding() {
            metrics::counter!(
                names::OVERLOAD_SHED_REQUESTS_TOTAL,
                "listener" => self.listener.name.clone(),
            )
            .increment(1);
            let reply = LocalReply {
                overloaded: true,
                ..LocalReply::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "proxy overloaded",
                    Some(ResponseFlag::OverloadManager),
                )
            };
            return early_response(&reply, grpc, &mut record, &request);
        }
        let limits = &self.listener.limits;

        // hyper's HTTP/1 buffer bounds the head only to 8 KiB at its finest, so
        // smaller limits are checked here (HTTP/2 has max_header_list_size too).
        let head_bytes = request
            .uri()
            .path_and_query()
            .map_or(0, |pq| pq.as_str().len())
            + request
                .headers()
                .iter()
                .map(|(name, value)| name.as_str().len() + value.len())
                .sum::<usize>();
        if request.headers().len() > limits.max_request_headers
            || head_bytes > limits.max_request_headers_bytes
        {
            self.count_limit("request_headers");
            let reply = LocalReply::new(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "request headers too large",
                Some(ResponseFlag::DownstreamLimit),
            );
            return early_response(&reply, grpc, &mut record, &request);
        }
        if let (Some(max), Some(length)) = (
            limits.max_request_body_bytes,
            request.body().size_hint().exact(),
        ) {
            if length > max {
                self.count_limit("request_body");
                let reply = LocalReply::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "request body too large",
                    Some(ResponseFlag::DownstreamLimit),
                );
                return early_response(&reply, grpc, &mut record, &request);
            }
        }

        let authority = match request_authority(&request) {
            Some(a) => a,
            None => {
                let reply = LocalReply::new(
                    StatusCode::BAD_REQUEST,
                    "missing host",
                    Some(ResponseFlag::DownstreamProtocolError),
                );
                return early_response(&reply, grpc, &mut record, &request);
            }
        };
        let Ok(authority_text) = authority.to_str() else {
            let reply = LocalReply::new(
                StatusCode::BAD_REQUEST,
                "invalid host",
                Some(ResponseFlag::DownstreamProtocolError),
            );
            return early_response(&reply, grpc, &mut record, &request);
        };
        if request.uri().path() == "*" && request.method() != Method::OPTIONS {
            let reply = LocalReply::new(
                StatusCode::BAD_REQUEST,
                "invalid path",
                Some(ResponseFlag::DownstreamProtocolError),
            );
            return early_response(&reply, grpc, &mut record, &request);
        }
        // What routes and policies see is what goes upstream.
        let config = self.config.load_full();
        match crate::route::normalize::normalize_path(request.uri().path(), &config.normalize) {
            Ok(std::borrow::Cow::Borrowed(_)) => {}
            Ok(std::borrow::Cow::Owned(path)) => {
                if let Err(reply) = replace_path(&mut request, &path) {
                    return early_response(&reply, grpc, &mut record, &request);
                }
            }
            Err(err) => {
                tracing::debug!(error = %err, "request path refused");
                self.count_limit("path");
                let reply = LocalReply::new(
                    StatusCode::BAD_REQUEST,
                    "invalid path",
                    Some(ResponseFlag::DownstreamProtocolError),
                );
                return early_response(&reply, grpc, &mut record, &request);
            }
        }
        // Forwarding headers are settled before any policy looks: a caller's
        // own x-forwarded-client-cert or x-forwarded-proto must not count.
        hdr::set_forwarding(request.headers_mut(), &peer, self.trust_downstream);
        // The marker is written for what may read it (routes, policies,
        // logged headers); otherwise only a mesh hop's head gets it, in
        // `upstream_head`: two header-map writes fewer on every request.
        let marked = config.reads_request_headers()
            || self
                .telemetry
                .hub
                .capture
                .position(&super::protocol::X_POSTERN_ORIGINAL_PROTOCOL)
                .is_some();
        if marked {
            super::protocol::mark(&mut request);
        }
        record.note_request(&request);
        // Without a JWT filter, no future for it in every request's.
        let jwt = if config.jwt.is_some() {
            match self
                .authenticate(&config, &mut request, authority_text, grpc, &mut record)
                .await
            {
                Ok(verified) => verified,
                Err(response) => return response,
            }
        } else {
            match self.jwt_route_without_filter(
                &config,
                &request,
                authority_text,
                grpc,
                &mut record,
            ) {
                Some(response) => return response,
                None => Vec::new(),
            }
        };
        let view = RequestView::of(&request, authority_text);
        // Chosen before RBAC, which a route may override, on the request as
        // authentication left it; a request without a route still meets the
        // listener's RBAC and limit before its 404.
        let selected = config.routes.route(&view);
        let route_rbac = selected.and_then(|(_, route)| route.rbac.as_ref().map(|r| (r, route)));
        let rbac = match route_rbac {
            Some((rbac, route)) => Some((rbac, Some(&*route.name))),
            None => config.rbac.as_ref().map(|rbac| (rbac, None)),
        };
        if let Some((rbac, route)) = rbac {
            if let Some(reply) = self.authorize(rbac, route, &peer, &request, authority_text, &jwt)
            {
                return local_response(&reply, grpc, &mut record);
            }
        }
        if let Some(limit) = &config.rate_limit {
            if let Some(response) = self.rate_limited(
                limit,
                "listener",
                &peer,
                &request,
                &jwt,
                &[],
                grpc,
                &mut record,
            ) {
                return response;
            }
        }
        let Some((vhost, route)) = selected else {
            let reply = LocalReply::new(
                StatusCode::NOT_FOUND,
                "no route",
                Some(ResponseFlag::NoRoute),
            );
            return local_response(&reply, grpc, &mut record);
        };
        record.set_route(&route.name, route.access_log);
        // Picked before the route's own policies, so a refused call still
        // names the service it was for.
        let target = match &route.action {
            crate::route::RouteAction::Forward(forward) => {
                let (index, cluster) = forward.targets.pick_indexed(rand::random());
                record.set_cluster(cluster);
                Some((index, cluster))
            }
            _ => None,
        };
        if let Some(limit) = &route.rate_limit {
            let descriptors = local_descriptors(
                limit,
                &route.rate_limits,
                target.map(|(_, cluster)| cluster),
                config.global_rate_limit.as_deref(),
                &peer,
                &request,
                &jwt,
            );
            if let Some(response) = self.rate_limited(
                limit,
                &route.name,
                &peer,
                &request,
                &jwt,
                &descriptors,
                grpc,
                &mut record,
            ) {
                return response;
            }
        }
        // The global limit comes last of the policies: a call refused by
        // the ones before costs the rate-limit service nothing.
        let mut service_headers = None;
        if let Some(limit) = &config.global_rate_limit {
            if !route.rate_limits.is_empty() {
                match self
                    .global_rate_limited(
                        limit,
                        &route.rate_limits,
                        target.map(|(_, cluster)| cluster),
                        &peer,
                        &mut request,
                        &jwt,
                        grpc,
                        &mut record,
                    )
                    .await
                {
                    Ok(headers) => service_headers = headers,
                    Err(response) => return response,
                }
            }
        }
        let plan = config
            .routes
            .mutations(vhost, route, target.map(|(index, _)| index));
        // What response values may read once the request has gone upstream.
        let kept = plan.changes_response().then(|| KeptRequest {
            authority: authority.clone(),
            uri: request.uri().clone(),
            method: request.method().clone(),
            version: request.version(),
            headers: plan
                .response_reads_request()
                .then(|| request.headers().clone()),
        });
        let start_time = record.start_time();

        let mut response = match &route.action {
            crate::route::RouteAction::Direct { status, body } => {
                record.set_flag(ResponseFlag::DirectResponse);
                record.set_status(status.as_u16());
                let mut response = Response::new(ResponseBody::full(body.clone()));
                *response.status_mut() = *status;
                if !body.is_empty() {
                    response
                        .headers_mut()
                        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
                }
                response.with_record_body(record)
            }
            crate::route::RouteAction::Redirect(redirect) => {
                record.set_flag(ResponseFlag::DirectResponse);
                let location =
                    redirect_location(redirect, authority_text, request.uri(), &route.matcher.path);
                match HeaderValue::from_str(&location) {
                    Ok(value) => {
                        record.set_status(redirect.status.as_u16());
                        let mut response = Response::new(ResponseBody::empty());
                        *response.status_mut() = redirect.status;
                        response.headers_mut().insert(header::LOCATION, value);
                        response.with_record_body(record)
                    }
                    Err(_) => {
                        let reply =
                            LocalReply::new(StatusCode::BAD_REQUEST, "cannot build redirect", None);
                        local_response(&reply, grpc, &mut record)
                    }
                }
            }
            crate::route::RouteAction::Forward(forward) => {
                let path_match = &route.matcher.path;
                let normalize = config.normalize;
                let cluster_name = target
                    .map(|(_, name)| name)
                    .unwrap_or_else(|| forward.targets.pick(rand::random()));
                let mutate = RequestMutation {
                    plan: &plan,
                    peer: &peer,
                    start: start_time,
                    marked,
                };
                self.forward(
                    request,
                    normalize,
                    authority,
                    forward,
                    cluster_name,
                    path_match,
                    grpc,
                    record,
                    &mutate,
                )
                .await
            }
        };
        // Envoy's order: after the route is chosen, every answer gets the
        // response changes, local replies and direct responses included.
        if let Some(kept) = &kept {
            let upstream = response.extensions().get::<UpstreamAddress>().map(|a| a.0);
            let facts = Facts {
                peer: &peer,
                authority: kept.authority.to_str().unwrap_or(""),
                path: kept.uri.path(),
                method: &kept.method,
                version: kept.version,
                start: start_time,
                upstream,
                request_headers: kept.headers.as_ref(),
            };
            plan.apply_response(response.headers_mut(), &facts);
        }
        if let Some(headers) = service_headers {
            headers.add_to_response(response.headers_mut());
        }
        response
    }

    fn count_jwt(&self, result: &'static str) {
        metrics::counter!(
            names::JWT_AUTHN_TOTAL,
            "listener" => self.listener.name.clone(),
            "result" => result,
        )
        .increment(1);
    }

    fn count_limit(&self, limit: &'static str) {
        metrics::counter!(
            names::DOWNSTREAM_LIMIT_REJECTIONS_TOTAL,
            "listener" => self.listener.name.clone(),
            "limit" => limit,
        )
        .increment(1);
    }

    #[allow(clippy::too_many_arguments)]
    async fn forward(
        &self,
        mut request: Request<Incoming>,
        // The request's own config: a rewrite is normalised as its path was.
        normalize: crate::route::normalize::PathNormalization,
        authority: HeaderValue,
        forward: &Forward,
        cluster_name: &Arc<str>,
        path_match: &crate::route::PathMatch,
        grpc: bool,
        mut record: Box<CallRecord>,
        mutate: &RequestMutation<'_>,
    ) -> Response<ResponseBody> {
        let Some(cluster) = self.clusters.get(cluster_name) else {
            let reply = LocalReply {
                flag: Some(ResponseFlag::NoClusterFound),
                ..LocalReply::from_upstream(&UpstreamError::NoHealthyEndpoint)
            };
            return local_response(&reply, grpc, &mut record);
        };
        let cluster = &cluster;
        let request_guard = match cluster.begin_request() {
            Ok(guard) => guard,
            Err(err) => return local_response(&LocalReply::from_upstream(&err), grpc, &mut record),
        };

        // An HTTP/1.1 upgrade, or an HTTP/2 extended CONNECT made to look
        // like one; either crosses to either kind of upstream.
        let extended_connect = request
            .extensions()
            .get::<super::protocol::ExtendedConnect>()
            .is_some();
        let upstream_http2 = cluster.protocol() == UpstreamProtocol::Http2;
        let upgrade_token = ((request.version() == Version::HTTP_11 || extended_connect)
            && hdr::is_upgrade_request(request.headers()))
        .then(|| super::protocol::upgrade_token(request.headers()))
        .filter(|token| !upstream_http2 || super::protocol::tunnels_over_http2(token));
        let upgrade = upgrade_token.is_some();
        let downstream_upgrade = upgrade.then(|| hyper::upgrade::on(&mut request));
        // An HTTP/1.1 WebSocket client's key, for the accept an RFC 8441
        // upstream does not send.
        let websocket_key = (upgrade && upstream_http2 && !extended_connect)
            .then(|| request.headers().get(header::SEC_WEBSOCKET_KEY).cloned())
            .flatten();

        let (parts, body) = request.into_parts();
        let changes_request = mutate.plan.changes_request();
        let downstream = changes_request.then(|| (authority.clone(), parts.version));
        let head = match self.upstream_head(
            parts,
            normalize,
            authority,
            forward,
            path_match,
            upgrade,
            mutate.marked,
            cluster,
        ) {
            Some(mut head) => {
                // After hop-by-hop removal, so a client's `Connection` header
                // cannot take away what the route adds.
                if let Some((authority, version)) = &downstream {
                    let facts = Facts {
                        peer: mutate.peer,
                        authority: authority.to_str().unwrap_or(""),
                        path: head.uri.path(),
                        method: &head.method,
                        version: *version,
                        start: mutate.start,
                        upstream: None,
                        request_headers: None,
                    };
                    mutate.plan.apply_request(&mut head.headers, &facts);
                }
                if upgrade && !upstream_http2 && extended_connect {
                    super::protocol::fit_http1_upgrade(&mut head.headers);
                }
                head
            }
            None => {
                let reply = LocalReply::new(
                    StatusCode::BAD_REQUEST,
                    "invalid request target",
                    Some(ResponseFlag::DownstreamProtocolError),
                );
                return local_response(&reply, grpc, &mut record);
            }
        };

        let policy = forward
            .retry
            .as_ref()
            .filter(|p| p.max_attempts > 1 && !upgrade);
        let body_limit = self.listener.limits.max_request_body_bytes;
        let mut source = match policy {
            Some(p) if p.allows_method(&head.method) => {
                // A client that trickles a small body must not hold the
                // request past its deadline before any upstream work starts.
                let wait = forward.timeout.unwrap_or(self.listener.limits.idle_timeout);
                match tokio::time::timeout(wait, buffer_small_body(body, p.max_body_bytes)).await {
                    Ok(Ok(source)) => source,
                    Ok(Err(err)) => {
                        return local_response(&LocalReply::from_upstream(&err), grpc, &mut record)
                    }
                    Err(_) => {
                        let reply = LocalReply::new(
                            StatusCode::REQUEST_TIMEOUT,
                            "request body too slow",
                            Some(ResponseFlag::DownstreamLimit),
                        );
                        return local_response(&reply, grpc, &mut record);
                    }
                }
            }
            _ => BodySource::Streaming(Some(body)),
        };

        let deadline = forward.timeout.map(|t| record.start() + t);
        let mut attempt: u32 = 0;
        let mut _retry_guard: Option<RetryGuard> = None;
        let mut head = head;
        record.inject_trace(&mut head.headers);
        // Over HTTP/2 an upgrade is an extended CONNECT (RFC 8441).
        let connect_protocol = (upgrade && upstream_http2)
            .then(|| super::protocol::to_extended_connect(&mut head.method, &mut head.headers));
        let mut head = Some(head);
        loop {
            attempt += 1;
            let endpoint = match cluster.pick(rand::random()) {
                Ok(endpoint) => endpoint,
                Err(err) => {
                    return local_response(&LocalReply::from_upstream(&err), grpc, &mut record)
                }
            };
            let last_try = policy.is_none_or(|p| attempt >= p.max_attempts);
            let body = match &mut source {
                BodySource::Buffered(data, trailers) => RequestBody::replay(data, trailers),
                BodySource::Streaming(incoming) => match incoming.take() {
                    Some(incoming) => RequestBody::streaming(incoming, body_limit)
                        .counted(record.request_counter()),
                    None => RequestBody::Empty,
                },
            };
            let mut upstream_request = match (&head, last_try) {
                (Some(h), false) => h.to_request(body),
                _ => match head.take() {
                    Some(h) => h.into_request(body),
                    None => break,
                },
            };
            if let Some(protocol) = &connect_protocol {
                upstream_request.extensions_mut().insert(protocol.clone());
            }

            let now = Instant::now();
            let remaining = deadline.map(|d| d.saturating_duration_since(now));
            let try_timeout = match (policy.and_then(|p| p.per_try_timeout), remaining) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let send = endpoint.endpoint().pool.send(upstream_request);
            let result = match try_timeout {
                Some(t) => tokio::time::timeout(t, send).await.ok(),
                None => Some(send.await),
            };
            // Whatever came of it, the endpoint tried is the one to report;
            // its identity is known once a handshake has been made.
            let pool = &endpoint.endpoint().pool;
            record.set_upstream(pool.address(), pool.peer_principal(), pool.peer_meta());

            let retry_reason: &'static str;
            let failure: LocalReply;
            match result {
                Some(Ok((mut response, pooled))) => {
                    let status = response.status().as_u16();
                    record.upstream_responded();
                    // Only a mesh peer (proven by its certificate) may say who it is.
                    if let Some(meta) = response.headers_mut().remove(&X_POSTERN_PEER) {
                        if pool.peer_principal().is_some() {
                            pool.note_peer_meta(&meta);
                            record.set_destination_meta(Some(meta));
                        }
                    }
                    if grpc {
                        record.set_grpc_status(response.headers());
                    }
                    let outcome = if status >= 500 {
                        Outcome::ServerError
                    } else {
                        Outcome::Success
                    };
                    cluster.report(endpoint.endpoint(), outcome);
                    let retry = policy.filter(|p| {
                        p.retries_status(status) && p.allows_method(&head_method(&head))
                    });
                    if retry.is_some() && !last_try && source.replayable() {
                        if let Some(guard) = self.admit_retry(cluster, deadline) {
                            _retry_guard = Some(guard);
                            drop(response);
                            drop(pooled);
                            backoff(policy, attempt, deadline).await;
                            continue;
                        }
                        record.set_flag(ResponseFlag::RetryLimitExceeded);
                    }
                    let upstream_upgrade = (upgrade
                        && super::protocol::upstream_accepted(response.status(), upstream_http2))
                    .then(|| hyper::upgrade::on(&mut response));
                    if let (Some(down), Some(up)) = (downstream_upgrade, upstream_upgrade) {
                        let tracked = self.tracker.track();
                        tokio::spawn(tunnel(down, up, tracked, self.shutdown.force.clone()));
                        // The connection now belongs to the tunnel.
                        drop(pooled);
                        let (mut parts, _) = response.into_parts();
                        hdr::strip_hop_by_hop(&mut parts.headers, !upstream_http2);
                        super::protocol::downstream_answer(
                            &mut parts,
                            extended_connect,
                            upgrade_token.as_deref().unwrap_or_default(),
                            websocket_key.as_ref(),
                        );
                        record.set_status(parts.status.as_u16());
                        return Response::from_parts(
                            parts,
                            ResponseBody::empty().with_record(record),
                        );
                    }
                    // A 2xx to an extended CONNECT opens a tunnel, so an
                    // upstream that ignored the upgrade and answered 200
                    // must not be passed on as if it had taken it.
                    if extended_connect && response.status().is_success() {
                        drop(response);
                        drop(pooled);
                        let reply = LocalReply::new(
                            StatusCode::BAD_GATEWAY,
                            "upstream did not accept the upgrade",
                            Some(ResponseFlag::UpstreamReset),
                        );
                        return local_response(&reply, grpc, &mut record);
                    }
                    record.set_status(status);
                    let (mut parts, body) = response.into_parts();
                    hdr::strip_hop_by_hop(&mut parts.headers, false);
                    parts.extensions.insert(UpstreamAddress(pool.address()));
                    parts.version = Version::HTTP_11;
                    let body = ResponseBody::upstream(UpstreamResponse {
                        inner: body,
                        pooled,
                        request_guard: Some(request_guard),
                        endpoint_guard: Some(endpoint),
                    })
                    .with_record(record);
                    return Response::from_parts(parts, body);
                }
                Some(Err(SendError { error, unsent })) => {
                    // Per request, so debug: the flag says which kind, this says why.
                    tracing::debug!(cluster = %cluster.name, attempt, error = %error.chain(), "upstream request failed");
                    failure = LocalReply::from_upstream(&error);
                    let retryable = match &error {
                        e if e.is_connect_failure() => {
                            cluster.report(endpoint.endpoint(), Outcome::ConnectFailure);
                            metrics::counter!(names::UPSTREAM_CONNECT_FAILURES_TOTAL, "cluster" => cluster.name.clone())
                                .increment(1);
                            retry_reason = "connect-failure";
                            // Nothing reached the upstream, so any method may go again.
                            if let (Some(request), BodySource::Streaming(slot)) =
                                (unsent, &mut source)
                            {
                                *slot = request.into_body().into_incoming();
                            }
                            policy.is_some_and(|p| p.on_connect_failure)
                        }
                        UpstreamError::Reset { .. } => {
                            cluster.report(endpoint.endpoint(), Outcome::ServerError);
                            metrics::counter!(names::UPSTREAM_RESETS_TOTAL, "cluster" => cluster.name.clone())
                                .increment(1);
                            retry_reason = "reset";
                            policy
                                .is_some_and(|p| p.on_reset && p.allows_method(&head_method(&head)))
                        }
                        UpstreamError::Refused { .. } => {
                            retry_reason = "refused-stream";
                            // Nothing was processed, so any method may go again.
                            policy.is_some_and(|p| p.on_reset || p.on_connect_failure)
                        }
                        _ => {
                            retry_reason = "";
                            false
                        }
                    };
                    if !(retryable && !last_try && source.has_body_for_retry()) {
                        return local_response(&failure, grpc, &mut record);
                    }
                }
                None => {
                    cluster.report(endpoint.endpoint(), Outcome::ServerError);
                    metrics::counter!(names::UPSTREAM_TIMEOUTS_TOTAL, "cluster" => cluster.name.clone()).increment(1);
                    failure = LocalReply::timeout();
                    retry_reason = "per-try-timeout";
                    let overall_expired = deadline.is_some_and(|d| Instant::now() >= d);
                    let retryable = policy.is_some_and(|p| {
                        p.per_try_timeout.is_some()
                            && (p.on_5xx || p.on_reset)
                            && p.allows_method(&head_method(&head))
                    });
                    if overall_expired || !(retryable && !last_try && source.replayable()) {
                        return local_response(&failure, grpc, &mut record);
                    }
                }
            }
            match self.admit_retry(cluster, deadline) {
                Some(guard) => {
                    tracing::debug!(cluster = %cluster.name, attempt, reason = retry_reason, "retrying");
                    _retry_guard = Some(guard);
                    backoff(policy, attempt, deadline).await;
                }
                None => {
                    record.set_flag(ResponseFlag::RetryLimitExceeded);
                    return local_response(&failure, grpc, &mut record);
                }
            }
        }
        let reply = LocalReply::new(StatusCode::BAD_GATEWAY, "request could not be sent", None);
        local_response(&reply, grpc, &mut record)
    }

    fn admit_retry(&self, cluster: &Arc<Cluster>, deadline: Option<Instant>) -> Option<RetryGuard> {
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return None;
        }
        let guard = cluster.begin_retry()?;
        metrics::counter!(names::UPSTREAM_RETRIES_TOTAL, "cluster" => cluster.name.clone())
            .increment(1);
        Some(guard)
    }

    #[allow(clippy::too_many_arguments)]
    fn upstream_head(
        &self,
        parts: http::request::Parts,
        normalize: crate::route::normalize::PathNormalization,
        authority: HeaderValue,
        forward: &Forward,
        path_match: &crate::route::PathMatch,
        upgrade: bool,
        marked: bool,
        cluster: &Cluster,
    ) -> Option<UpstreamHead> {
        let http::request::Parts {
            method,
            uri,
            mut headers,
            version: downstream_version,
            extensions,
            ..
        } = parts;
        hdr::strip_hop_by_hop(&mut headers, upgrade);

        let path = uri.path();
        let rewritten: Option<String> =
            if let (Some(new_prefix), crate::route::PathMatch::Prefix(prefix)) =
                (&forward.rewrite.prefix, path_match)
            {
                Some(format!(
                    "{new_prefix}{}",
                    &path[prefix.len().min(path.len())..]
                ))
            } else if let Some((re, substitution)) = &forward.rewrite.regex {
                Some(re.replace_all(path, substitution.as_str()).into_owned())
            } else {
                None
            };
        // A rewrite can make dot segments or double slashes again (`/api..`
        // with prefix `/api` → `/v1/` gives `/v1/..`): normalise once more so
        // the backend still gets what the policies checked, or nothing.
        let rewritten = match rewritten {
            Some(p) if normalize.enabled => {
                let options = crate::route::normalize::PathNormalization {
                    escaped_slashes: crate::route::normalize::EscapedSlashes::Keep,
                    ..normalize
                };
                Some(
                    crate::route::normalize::normalize_path(&p, &options)
                        .ok()?
                        .into_owned(),
                )
            }
            other => other,
        };
        let path_and_query = match (rewritten, uri.query()) {
            // Unchanged: share the request's bytes rather than parse a copy.
            (None, _) => uri
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| PathAndQuery::from_static("/")),
            (Some(p), None) => PathAndQuery::try_from(p).ok()?,
            (Some(p), Some(q)) => PathAndQuery::try_from(format!("{p}?{q}")).ok()?,
        };
        let authority_value = match &forward.rewrite.host {
            Some(host) => host.clone(),
            None => authority,
        };
        let mut uri_parts = http::uri::Parts::default();
        uri_parts.path_and_query = Some(path_and_query);
        let version = match cluster.protocol() {
            UpstreamProtocol::Http1 => {
                headers.insert(header::HOST, authority_value);
                join_cookies(&mut headers);
                Version::HTTP_11
            }
            UpstreamProtocol::Http2 => {
                headers.remove(header::HOST);
                uri_parts.scheme = Some(http::uri::Scheme::HTTP);
                uri_parts.authority =
                    Some(http::uri::Authority::try_from(authority_value.as_bytes()).ok()?);
                Version::HTTP_2
            }
        };
        let mesh = cluster.tls().is_some_and(|tls| tls.force_http2);
        let original = super::protocol::original(&extensions, downstream_version);
        super::protocol::forward_marker(&mut headers, mesh, marked, original);
        // Sidecars tell each other who they are, only over mesh mTLS.
        if mesh {
            if let Some(meta) = &self.telemetry.hub.local_header {
                headers.insert(&X_POSTERN_PEER, meta.clone());
            }
        }
        let uri = Uri::from_parts(uri_parts).ok()?;
        Some(UpstreamHead {
            method,
            uri,
            version,
            headers,
        })
    }
}

/// HTTP/2 may split `cookie` into several fields; HTTP/1.1 needs one (RFC 9113 §8.2.3).
fn join_cookies(headers: &mut HeaderMap) {
    let mut values = headers.get_all(header::COOKIE).iter();
    if values.next().is_none() || values.next().is_none() {
        return;
    }
    let joined = headers
        .get_all(header::COOKIE)
        .iter()
        .map(|v| v.as_bytes())
        .collect::<Vec<_>>()
        .join(&b"; "[..]);
    if let Ok(value) = HeaderValue::from_bytes(&joined) {
        headers.insert(header::COOKIE, value);
    }
}

fn head_method(head: &Option<UpstreamHead>) -> Method {
    head.as_ref()
        .map(|h| h.method.clone())
        .unwrap_or(Method::GET)
}

impl BodySource {
    /// Whether a later try can send the body again.
    fn replayable(&self) -> bool {
        matches!(self, BodySource::Buffered(..))
    }

    /// Whether the body is still here for another try.
    fn has_body_for_retry(&self) -> bool {
        match self {
            BodySource::Buffered(..) => true,
            BodySource::Streaming(slot) => slot.is_some(),
        }
    }
}

/// Keeps a body for replays when it is known to be small; streams it otherwise.
async fn buffer_small_body(body: Incoming, max: usize) -> Result<BodySource, UpstreamError> {
    if body.is_end_stream() {
        return Ok(BodySource::Buffered(Bytes::new(), None));
    }
    let small = body
        .size_hint()
        .upper()
        .is_some_and(|upper| upper <= max as u64);
    if !small {
        return Ok(BodySource::Streaming(Some(body)));
    }
    let collected = body.collect().await.map_err(UpstreamError::RequestBody)?;
    let trailers = collected.trailers().cloned();
    Ok(BodySource::Buffered(collected.to_bytes(), trailers))
}

/// Sleeps a full-jitter exponential back-off, never past the deadline.
async fn backoff(policy: Option<&RetryPolicy>, attempt: u32, deadline: Option<Instant>) {
    let Some(policy) = policy else { return };
    let ceiling = policy.backoff(attempt);
    let jittered = Duration::from_nanos(rand::random_range(0..=ceiling.as_nanos() as u64));
    let wait = match deadline {
        Some(d) => jittered.min(d.saturating_duration_since(Instant::now())),
        None => jittered,
    };
    tokio::time::sleep(wait).await;
}

async fn tunnel(
    downstream: hyper::upgrade::OnUpgrade,
    upstream: hyper::upgrade::OnUpgrade,
    _tracked: TrackedConnection,
    mut force: tokio::sync::watch::Receiver<bool>,
) {
    let relay = async {
        match tokio::try_join!(downstream, upstream) {
            Ok((down, up)) => {
                let mut down = TokioIo::new(down);
                let mut up = TokioIo::new(up);
                if let Err(err) = tokio::io::copy_bidirectional(&mut down, &mut up).await {
                    tracing::debug!(error = %err, "upgraded connection ended with an error");
                }
            }
            Err(err) => tracing::debug!(error = %err, "upgrade failed"),
        }
    };
    tokio::select! {
        _ = relay => {}
        _ = force.changed() => {}
    }
}

/// The RFC 6750 challenge for a JWT failure; the realm is the request URL
/// without its query, as Envoy sends it.
fn www_authenticate<B>(
    request: &Request<B>,
    authority: &str,
    failure: &crate::authn::AuthnFailure,
) -> HeaderValue {
    let scheme = request
        .headers()
        .get(&hdr::X_FORWARDED_PROTO)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("http");
    let realm = format!("{scheme}://{authority}{}", request.uri().path())
        .replace('\\', "\\\\")
        .replace('"', "\\\"");
    // RFC 6750 §3.1: a request with no credentials gets no error code.
    let challenge = match failure {
        crate::authn::AuthnFailure::Missing => format!("Bearer realm=\"{realm}\""),
        crate::authn::AuthnFailure::Invalid { .. } => {
            format!("Bearer realm=\"{realm}\", error=\"invalid_token\"")
        }
    };
    HeaderValue::from_str(&challenge).unwrap_or_else(|_| HeaderValue::from_static("Bearer"))
}

/// Host or :authority of a request; a header value, so HTTP/1 requests
/// (Host) share its bytes instead of copying them.
fn request_authority(request: &Request<Incoming>) -> Option<HeaderValue> {
    if let Some(authority) = request.uri().authority() {
        return HeaderValue::from_str(authority.as_str()).ok();
    }
    request
        .headers()
        .get(header::HOST)
        .filter(|h| !h.is_empty())
        .cloned()
}

fn redirect_location(
    redirect: &Redirect,
    authority: &str,
    uri: &Uri,
    path_match: &crate::route::PathMatch,
) -> String {
    let scheme = redirect.scheme.as_deref().unwrap_or("http");
    let original_host = authority.rsplit_once(':').map_or(authority, |(h, p)| {
        if p.chars().all(|c| c.is_ascii_digit()) {
            h
        } else {
            authority
        }
    });
    let host = redirect.host.as_deref().unwrap_or(original_host);
    let authority = match (redirect.port, &redirect.host, redirect.scheme.is_some()) {
        (Some(port), _, _) => format!("{host}:{port}"),
        // A changed host or scheme drops the old port, which belonged to the old origin.
        (None, Some(_), _) | (None, None, true) => host.to_string(),
        (None, None, false) => authority.to_string(),
    };
    let path = match (&redirect.path, &redirect.prefix_rewrite, path_match) {
        (Some(p), _, _) => p.clone(),
        (None, Some(new_prefix), crate::route::PathMatch::Prefix(prefix)) => {
            let rest = uri.path().get(prefix.len()..).unwrap_or("");
            format!("{new_prefix}{rest}")
        }
        _ => uri.path().to_string(),
    };
    match uri.query() {
        Some(q) if !redirect.strip_query => format!("{scheme}://{authority}{path}?{q}"),
        _ => format!("{scheme}://{authority}{path}"),
    }
}

trait WithRecord {
    fn with_record_body(self, record: Box<CallRecord>) -> Self;
}

impl WithRecord for Response<ResponseBody> {
    fn with_record_body(self, record: Box<CallRecord>) -> Self {
        let (parts, body) = self.into_parts();
        Response::from_parts(parts, body.with_record(record))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::PathMatch;

    fn redirect() -> Redirect {
        Redirect {
            status: StatusCode::MOVED_PERMANENTLY,
            scheme: None,
            host: None,
            port: None,
            path: None,
            prefix_rewrite: None,
            strip_query: false,
        }
    }

    #[test]
    fn redirect_keeps_what_is_not_set() {
        let uri: Uri = "/old/x?a=1".parse().unwrap();
        let r = redirect();
        assert_eq!(
            redirect_location(&r, "example.com:8080", &uri, &PathMatch::Any),
            "http://example.com:8080/old/x?a=1"
        );
    }

    #[test]
    fn redirect_scheme_drops_port_and_rewrites_prefix() {
        let uri: Uri = "/old/x?a=1".parse().unwrap();
        let r = Redirect {
            scheme: Some("https".into()),
            prefix_rewrite: Some("/new".into()),
            strip_query: true,
            ..redirect()
        };
        assert_eq!(
            redirect_location(
                &r,
                "example.com:8080",
                &uri,
                &PathMatch::Prefix("/old".into())
            ),
            "https://example.com/new/x"
        );
    }

    #[test]
    fn grpc_status_mapping() {
        assert_eq!(grpc_status_for(StatusCode::GATEWAY_TIMEOUT), "4");
        assert_eq!(grpc_status_for(StatusCode::SERVICE_UNAVAILABLE), "14");
        assert_eq!(grpc_status_for(StatusCode::NOT_FOUND), "12");
    }
}

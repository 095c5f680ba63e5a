//! JWT authentication with Envoy's `jwt_authn` semantics: providers (an
//! issuer, audiences, a key set and where tokens are found), requirements
//! chosen per request by route (`requirement_map`) or by rule, and what a
//! verified token leaves behind: its claims, for RBAC and rate limits, and
//! optionally copied into request headers.
//!
//! The request path calls [`JwtAuthn::authenticate`] after forwarding
//! headers are settled and before RBAC. Verification itself (`jwt`,
//! `jwks`) is pure; only remote key sets (`remote`) do I/O, through the
//! proxy's clusters. Building this model from config lives in `config`.

pub mod jwks;
pub mod jwt;
pub mod remote;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Uri};

use crate::route::{RequestView, RouteMatch};
use jwks::Jwks;
use jwt::{ClaimPath, ClaimRules, Claims, JwtError};
use remote::{JwksFetcher, RemoteJwks};

/// Where a provider's keys come from.
#[derive(Debug, Clone)]
pub enum KeySource {
    /// Inline or read from a file when the config was loaded.
    Static(Arc<Jwks>),
    /// Fetched through a cluster and cached.
    Remote(Arc<RemoteJwks>),
}

/// Where a token is looked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenLocation {
    /// A header, its value after `prefix` (compared without ASCII case).
    Header {
        /// Header name.
        name: HeaderName,
        /// What precedes the token, e.g. `Bearer `; may be empty.
        prefix: String,
    },
    /// A query parameter.
    Param(String),
}

impl TokenLocation {
    /// Envoy's defaults: `Authorization: Bearer …`, then `?access_token=`.
    pub fn defaults() -> Vec<TokenLocation> {
        vec![
            TokenLocation::Header {
                name: http::header::AUTHORIZATION,
                prefix: "Bearer ".into(),
            },
            TokenLocation::Param("access_token".into()),
        ]
    }
}

/// One token issuer and how its tokens are checked.
#[derive(Debug)]
pub struct Provider {
    /// Name from config, for logs and requirements.
    pub name: Arc<str>,
    /// Required `iss`; any when `None`.
    pub issuer: Option<String>,
    /// `aud` must name one of these; not checked when empty.
    pub audiences: Vec<String>,
    /// Verification keys.
    pub keys: KeySource,
    /// Where tokens are looked for, in order; the first one found is used.
    pub locations: Vec<TokenLocation>,
    /// Keep the token in the request sent upstream.
    pub forward: bool,
    /// A header that gets the verified payload (base64url), when set.
    pub forward_payload_header: Option<HeaderName>,
    /// Claims copied into request headers.
    pub claim_to_headers: Vec<(ClaimPath, HeaderName)>,
    /// Tolerance on `exp` and `nbf`, in seconds.
    pub clock_skew: u64,
    /// Refuse tokens without `exp`.
    pub require_expiration: bool,
    /// Tokens this provider verified lately.
    pub cache: VerifiedCache,
}

/// Longest token kept in a [`VerifiedCache`]: bounds its memory at
/// capacity × this, while typical tokens (under 2 KiB) all fit.
pub const MAX_CACHED_TOKEN_BYTES: usize = 4 * 1024;

/// Tokens that verified, by their exact text, with the key set that
/// verified them: a caller presenting the same token again skips decoding
/// and the signature check (tens of µs for RSA and ECDSA), as Envoy's
/// `jwt_cache_config` does. Time claims are checked again on every use,
/// and an entry is void once its provider's keys change. Only verified
/// tokens enter, so callers with forged tokens cannot fill it.
#[derive(Debug)]
pub struct VerifiedCache {
    capacity: usize,
    entries: Mutex<HashMap<Box<str>, CachedToken>>,
}

#[derive(Debug, Clone)]
struct CachedToken {
    keys: Arc<Jwks>,
    claims: Arc<Claims>,
    payload: Arc<str>,
}

impl VerifiedCache {
    /// Envoy's default `jwt_cache_size`.
    pub const DEFAULT_CAPACITY: usize = 100;

    /// A cache of at most `capacity` tokens; `0` turns caching off.
    pub fn new(capacity: usize) -> VerifiedCache {
        VerifiedCache {
            capacity,
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// How many tokens it may hold.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// How many tokens it holds.
    pub fn len(&self) -> usize {
        self.entries.lock().map(|e| e.len()).unwrap_or(0)
    }

    /// Whether it holds no token.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn get(&self, token: &str) -> Option<CachedToken> {
        if self.capacity == 0 {
            return None;
        }
        self.entries.lock().ok()?.get(token).cloned()
    }

    fn forget(&self, token: &str) {
        if let Ok(mut entries) = self.entries.lock() {
            entries.remove(token);
        }
    }

    fn insert(&self, token: &str, entry: CachedToken, rules: &ClaimRules<'_>, now: u64) {
        if self.capacity == 0 || token.len() > MAX_CACHED_TOKEN_BYTES {
            return;
        }
        let Ok(mut entries) = self.entries.lock() else {
            return;
        };
        if entries.len() >= self.capacity {
            entries.retain(|_, cached| jwt::check_claims(&cached.claims, rules, now).is_ok());
        }
        if entries.len() >= self.capacity {
            // Still full of live tokens: make room by dropping one; which
            // one is up to the hasher's random order, so no caller can aim
            // at another's entry.
            if let Some(victim) = entries.keys().next().cloned() {
                entries.remove(&victim);
            }
        }
        entries.insert(token.into(), entry);
    }
}

/// What a request must present.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Requirement {
    /// A valid token of this provider (index into the providers), with
    /// other accepted audiences when `audiences` is set.
    Provider {
        /// Provider index.
        index: usize,
        /// Replaces the provider's audiences.
        audiences: Option<Vec<String>>,
    },
    /// Any of these.
    Any(Vec<Requirement>),
    /// All of these.
    All(Vec<Requirement>),
    /// No token is fine; a token must be valid (one of an issuer no
    /// provider names counts as none).
    AllowMissing,
    /// Anything passes; valid tokens still yield claims.
    AllowMissingOrFailed,
}

/// A rule: requests its match holds for get its requirement (none: no check).
#[derive(Debug)]
pub struct Rule {
    /// Conditions, as a route's.
    pub matcher: RouteMatch,
    /// What is required; `None` skips authentication.
    pub requirement: Option<Requirement>,
}

/// What a route says about authentication (Envoy's `PerRouteConfig`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteJwt {
    /// No authentication on this route.
    Disabled,
    /// The listener's `requirement_map` entry of this name.
    Requirement(String),
}

/// A listener's JWT authentication.
#[derive(Debug)]
pub struct JwtAuthn {
    providers: Vec<Provider>,
    rules: Vec<Rule>,
    requirement_map: HashMap<String, Requirement>,
    bypass_cors_preflight: bool,
    /// Answer 401 without `WWW-Authenticate` or a body.
    pub strip_failure_response: bool,
    /// Headers only verified tokens may set: removed from every request.
    reserved: Vec<HeaderName>,
}

/// A token that verified and met the request's requirement.
#[derive(Debug, Clone)]
pub struct VerifiedJwt {
    /// The provider that verified it.
    pub provider: Arc<str>,
    /// Its payload.
    pub claims: Arc<Claims>,
}

/// Why a request failed authentication.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthnFailure {
    /// No token where the requirement looks.
    #[error("Jwt is missing")]
    Missing,
    /// A token is there but not accepted.
    #[error("Jwt verification fails ({provider}: {reason})")]
    Invalid {
        /// The provider that refused it.
        provider: Arc<str>,
        /// Why.
        reason: InvalidReason,
    },
}

/// Why a present token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidReason {
    /// The token itself.
    #[error(transparent)]
    Token(#[from] JwtError),
    /// The provider's keys could not be had.
    #[error("keys unavailable: {0}")]
    Keys(String),
    /// The route names a requirement the listener does not define.
    #[error("no requirement named {0:?}")]
    UnknownRequirement(String),
}

/// One provider's verdict on the request.
#[derive(Debug, Clone)]
enum Outcome {
    /// No token in its locations.
    Missing,
    /// A token of an issuer this provider does not accept.
    Foreign,
    /// A token it refuses.
    Failed(InvalidReason),
    /// Signature and time claims hold (audiences are checked per requirement).
    Verified {
        claims: Arc<Claims>,
        payload: Arc<str>,
    },
}

impl Provider {
    fn rules(&self) -> ClaimRules<'_> {
        ClaimRules {
            issuer: self.issuer.as_deref(),
            // Audiences depend on the requirement; checked there.
            audiences: &[],
            clock_skew: self.clock_skew,
            require_expiration: self.require_expiration,
        }
    }

    /// The first token in this provider's locations, and which location.
    fn find_token(&self, headers: &HeaderMap, query: Option<&str>) -> Option<(String, usize)> {
        self.locations
            .iter()
            .enumerate()
            .find_map(|(i, location)| match location {
                TokenLocation::Header { name, prefix } => {
                    header_token(headers, name, prefix).map(|t| (t, i))
                }
                TokenLocation::Param(name) => query
                    .and_then(|q| crate::route::query_param(q, name))
                    .map(|t| (t.trim().to_string(), i))
                    .filter(|(t, _)| !t.is_empty()),
            })
    }

    /// The current key set, fetched if it must be.
    async fn current_keys<F: JwksFetcher>(&self, fetcher: &Arc<F>) -> Result<Arc<Jwks>, Outcome> {
        match &self.keys {
            KeySource::Static(keys) => Ok(keys.clone()),
            KeySource::Remote(remote) => remote.keys(fetcher).await.map_err(|err| {
                tracing::warn!(provider = %self.name, uri = %remote.source().uri, error = %err, "JWKS unavailable");
                Outcome::Failed(InvalidReason::Keys(err.to_string()))
            }),
        }
    }

    async fn verify<F: JwksFetcher>(&self, token: &str, fetcher: &Arc<F>, now: u64) -> Outcome {
        let rules = self.rules();
        if let Some(cached) = self.cache.get(token) {
            // Verified by this provider, so of its issuer; time moves on.
            if let Err(err) = jwt::check_claims(&cached.claims, &rules, now) {
                self.cache.forget(token);
                return Outcome::Failed(err.into());
            }
            match self.current_keys(fetcher).await {
                Ok(keys) if Arc::ptr_eq(&keys, &cached.keys) => {
                    return Outcome::Verified {
                        claims: cached.claims,
                        payload: cached.payload,
                    };
                }
                // New keys: the signature is checked against them below.
                Ok(_) => self.cache.forget(token),
                Err(outcome) => return outcome,
            }
        }
        let decoded = match jwt::decode(token) {
            Ok(decoded) => decoded,
            Err(err) => return Outcome::Failed(err.into()),
        };
        // Providers share locations: a token of another issuer is not this
        // provider's to refuse.
        if jwt::check_issuer(&decoded.claims, &rules).is_err() {
            return Outcome::Foreign;
        }
        if let Err(err) = jwt::check_claims(&decoded.claims, &rules, now) {
            return Outcome::Failed(err.into());
        }
        let mut keys = match self.current_keys(fetcher).await {
            Ok(keys) => keys,
            Err(outcome) => return outcome,
        };
        let mut verdict = decoded.verify_signature(&keys);
        if let (Err(JwtError::UnknownKid(_)), KeySource::Remote(remote)) = (&verdict, &self.keys) {
            if let Some(fresh) = remote.refetch_for_unknown_kid(fetcher, &keys).await {
                verdict = decoded.verify_signature(&fresh);
                keys = fresh;
            }
        }
        match verdict {
            Ok(()) => {
                let entry = CachedToken {
                    keys,
                    claims: Arc::new(decoded.claims),
                    payload: Arc::from(decoded.payload_segment),
                };
                self.cache.insert(token, entry.clone(), &rules, now);
                Outcome::Verified {
                    claims: entry.claims,
                    payload: entry.payload,
                }
            }
            Err(err) => Outcome::Failed(err.into()),
        }
    }
}

/// The token in `name` after `prefix`: the run of token characters that
/// follows, from the first value that has one.
fn header_token(headers: &HeaderMap, name: &HeaderName, prefix: &str) -> Option<String> {
    headers.get_all(name).iter().find_map(|value| {
        let text = value.to_str().ok()?.trim_start();
        let rest = if prefix.is_empty() {
            text
        } else {
            let head = text.get(..prefix.len())?;
            if !head.eq_ignore_ascii_case(prefix) {
                return None;
            }
            &text[prefix.len()..]
        };
        let rest = rest.trim_start();
        // Token characters are ASCII, so the first other byte ends the run
        // on a character boundary.
        let end = rest
            .bytes()
            .position(|b| !(b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'=')))
            .unwrap_or(rest.len());
        (end > 0).then(|| rest[..end].to_string())
    })
}

/// Drops every `name` parameter from a URI's query.
fn remove_query_param(uri: &Uri, name: &str) -> Option<Uri> {
    let query = uri.query()?;
    let kept: Vec<&str> = query
        .split('&')
        .filter(|pair| crate::route::query_param(pair, name).is_none())
        .collect();
    let path_and_query = if kept.is_empty() {
        uri.path().to_string()
    } else {
        format!("{}?{}", uri.path(), kept.join("&"))
    };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = http::uri::PathAndQuery::try_from(path_and_query).ok();
    Uri::from_parts(parts).ok()
}

fn is_cors_preflight(method: &Method, headers: &HeaderMap) -> bool {
    method == Method::OPTIONS
        && headers.contains_key(http::header::ORIGIN)
        && headers.contains_key(http::header::ACCESS_CONTROL_REQUEST_METHOD)
}

/// Requirement evaluation over the providers' outcomes; marks the tokens
/// that count as accepted.
struct Evaluation<'a> {
    providers: &'a [Provider],
    outcomes: &'a [Option<Outcome>],
    accepted: Vec<bool>,
}

impl Evaluation<'_> {
    fn outcome(&self, index: usize) -> &Outcome {
        self.outcomes
            .get(index)
            .and_then(Option::as_ref)
            .unwrap_or(&Outcome::Missing)
    }

    fn provider(&mut self, index: usize, audiences: Option<&[String]>) -> Result<(), AuthnFailure> {
        let Some(provider) = self.providers.get(index) else {
            return Err(AuthnFailure::Missing);
        };
        let invalid = |reason: InvalidReason| AuthnFailure::Invalid {
            provider: provider.name.clone(),
            reason,
        };
        match self.outcome(index) {
            Outcome::Missing => Err(AuthnFailure::Missing),
            Outcome::Foreign => Err(invalid(JwtError::IssuerMismatch.into())),
            Outcome::Failed(reason) => Err(invalid(reason.clone())),
            Outcome::Verified { claims, .. } => {
                let accepted = audiences.unwrap_or(&provider.audiences);
                jwt::check_audience(claims, accepted).map_err(|e| invalid(e.into()))?;
                self.accepted[index] = true;
                Ok(())
            }
        }
    }

    /// Every token found must be acceptable; tokens of unknown issuers
    /// count as missing.
    fn allow_missing(&mut self, tolerate_failures: bool) -> Result<(), AuthnFailure> {
        let mut first_failure = None;
        for index in 0..self.providers.len() {
            match self.outcome(index) {
                Outcome::Missing | Outcome::Foreign => {}
                _ => {
                    if let Err(failure) = self.provider(index, None) {
                        first_failure.get_or_insert(failure);
                    }
                }
            }
        }
        match first_failure {
            Some(failure) if !tolerate_failures => Err(failure),
            _ => Ok(()),
        }
    }

    fn evaluate(&mut self, requirement: &Requirement) -> Result<(), AuthnFailure> {
        match requirement {
            Requirement::Provider { index, audiences } => {
                self.provider(*index, audiences.as_deref())
            }
            Requirement::All(list) => {
                // Every branch runs, so every token that passes is accepted.
                let results: Vec<_> = list.iter().map(|r| self.evaluate(r)).collect();
                results.into_iter().collect()
            }
            Requirement::Any(list) => {
                let results: Vec<_> = list.iter().map(|r| self.evaluate(r)).collect();
                if results.iter().any(Result::is_ok) || results.is_empty() {
                    return Ok(());
                }
                // A refused token says more than a missing one.
                let mut errors = results.into_iter().filter_map(Result::err);
                let first = errors.next().unwrap_or(AuthnFailure::Missing);
                Err(std::iter::once(first.clone())
                    .chain(errors)
                    .find(|e| *e != AuthnFailure::Missing)
                    .unwrap_or(first))
            }
            Requirement::AllowMissing => self.allow_missing(false),
            Requirement::AllowMissingOrFailed => self.allow_missing(true),
        }
    }
}

impl Requirement {
    /// Adds the providers this requirement reads to `needed`.
    fn needs(&self, needed: &mut [bool]) {
        match self {
            Requirement::Provider { index, .. } => {
                if let Some(slot) = needed.get_mut(*index) {
                    *slot = true;
                }
            }
            Requirement::Any(list) | Requirement::All(list) => {
                list.iter().for_each(|r| r.needs(needed));
            }
            Requirement::AllowMissing | Requirement::AllowMissingOrFailed => {
                needed.iter_mut().for_each(|slot| *slot = true);
            }
        }
    }
}

impl JwtAuthn {
    /// A compiled configuration; `requirement_map` names requirements that
    /// routes refer to.
    pub fn new(
        providers: Vec<Provider>,
        rules: Vec<Rule>,
        requirement_map: HashMap<String, Requirement>,
        bypass_cors_preflight: bool,
        strip_failure_response: bool,
    ) -> JwtAuthn {
        let mut reserved: Vec<HeaderName> = Vec::new();
        for provider in &providers {
            let names = provider
                .claim_to_headers
                .iter()
                .map(|(_, header)| header)
                .chain(provider.forward_payload_header.as_ref());
            for name in names {
                if !reserved.contains(name) {
                    reserved.push(name.clone());
                }
            }
        }
        JwtAuthn {
            providers,
            rules,
            requirement_map,
            bypass_cors_preflight,
            strip_failure_response,
            reserved,
        }
    }

    /// The providers, in config order.
    pub fn providers(&self) -> &[Provider] {
        &self.providers
    }

    /// Takes over the remote keys a replaced config had fetched.
    pub fn adopt(&self, previous: &JwtAuthn) {
        for provider in &self.providers {
            let KeySource::Remote(remote) = &provider.keys else {
                continue;
            };
            for old in &previous.providers {
                if let KeySource::Remote(old) = &old.keys {
                    remote.adopt(old);
                }
            }
        }
    }

    /// Authenticates `request`: picks its requirement (`route`'s, if the
    /// route sets one, else the first rule that matches), verifies the
    /// tokens it needs, and on success removes unforwarded tokens and sets
    /// claim headers. Headers only verified tokens may set are removed
    /// from every request first. `now` is seconds since the epoch.
    pub async fn authenticate<B, F: JwksFetcher>(
        &self,
        request: &mut Request<B>,
        authority: &str,
        route: Option<&RouteJwt>,
        fetcher: &Arc<F>,
        now: u64,
    ) -> Result<Vec<VerifiedJwt>, AuthnFailure> {
        for name in &self.reserved {
            request.headers_mut().remove(name);
        }
        if self.bypass_cors_preflight && is_cors_preflight(request.method(), request.headers()) {
            return Ok(Vec::new());
        }
        let requirement = match route {
            Some(RouteJwt::Disabled) => None,
            Some(RouteJwt::Requirement(name)) => match self.requirement_map.get(name) {
                Some(requirement) => Some(requirement),
                // Fail closed: a route that asks for a check gets one.
                None => {
                    return Err(AuthnFailure::Invalid {
                        provider: Arc::from("-"),
                        reason: InvalidReason::UnknownRequirement(name.clone()),
                    })
                }
            },
            None => {
                let view = RequestView::of(request, authority);
                self.rules
                    .iter()
                    .find(|rule| rule.matcher.matches(&view))
                    .and_then(|rule| rule.requirement.as_ref())
            }
        };
        let Some(requirement) = requirement else {
            return Ok(Vec::new());
        };

        let mut needed = vec![false; self.providers.len()];
        requirement.needs(&mut needed);
        let mut outcomes: Vec<Option<Outcome>> = vec![None; self.providers.len()];
        let mut found: Vec<Option<usize>> = vec![None; self.providers.len()];
        for (index, provider) in self.providers.iter().enumerate() {
            if !needed[index] {
                continue;
            }
            let Some((token, location)) =
                provider.find_token(request.headers(), request.uri().query())
            else {
                outcomes[index] = Some(Outcome::Missing);
                continue;
            };
            found[index] = Some(location);
            let outcome = provider.verify(&token, fetcher, now).await;
            if let Outcome::Failed(reason) = &outcome {
                tracing::debug!(provider = %provider.name, %reason, "JWT refused");
            }
            outcomes[index] = Some(outcome);
        }

        let mut evaluation = Evaluation {
            providers: &self.providers,
            outcomes: &outcomes,
            accepted: vec![false; self.providers.len()],
        };
        evaluation.evaluate(requirement)?;
        let accepted = evaluation.accepted;

        let mut verified = Vec::new();
        for (index, provider) in self.providers.iter().enumerate() {
            let (true, Some(Outcome::Verified { claims, payload })) =
                (accepted[index], &outcomes[index])
            else {
                continue;
            };
            if !provider.forward {
                match found[index].and_then(|i| provider.locations.get(i)) {
                    Some(TokenLocation::Header { name, .. }) => {
                        request.headers_mut().remove(name);
                    }
                    Some(TokenLocation::Param(name)) => {
                        if let Some(uri) = remove_query_param(request.uri(), name) {
                            *request.uri_mut() = uri;
                        }
                    }
                    None => {}
                }
            }
            for (claim, header) in &provider.claim_to_headers {
                let value = claims
                    .text(claim)
                    .and_then(|text| HeaderValue::from_str(&text).ok());
                if let Some(value) = value {
                    request.headers_mut().insert(header.clone(), value);
                }
            }
            if let Some(header) = &provider.forward_payload_header {
                if let Ok(value) = HeaderValue::from_str(payload) {
                    request.headers_mut().insert(header.clone(), value);
                }
            }
            verified.push(VerifiedJwt {
                provider: provider.name.clone(),
                claims: claims.clone(),
            });
        }
        Ok(verified)
    }
}

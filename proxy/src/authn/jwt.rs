//! JWS compact tokens (RFC 7515, RFC 7519): decoding, the signature check
//! against a key set, and the registered claim checks (`iss`, `aud`, `exp`,
//! `nbf`) with a clock skew. Pure: the caller passes the time, so expiry is
//! tested with an injected clock. Encrypted tokens (JWE) are not accepted.

use std::borrow::Cow;

use serde_json::{Map, Value};

use super::jwks::{decode_segment, Algorithm, AlgorithmError, Jwks};

/// Tokens longer than this are refused before any decoding: the header
/// limits already bound them, this bounds the work per token further.
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// Why a token is not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    /// Not three base64url segments of JSON (header, payload) and bytes.
    #[error("malformed token: {0}")]
    Malformed(&'static str),
    /// The `alg` is one Postern refuses or does not know.
    #[error(transparent)]
    Algorithm(#[from] AlgorithmError),
    /// A `crit` header asks for extensions Postern does not implement.
    #[error("critical header extensions are not supported")]
    CriticalHeader,
    /// The `kid` names no key of the set.
    #[error("no key with kid {0:?}")]
    UnknownKid(String),
    /// No key of the set fits the algorithm.
    #[error("no key fits algorithm {0}")]
    NoKey(&'static str),
    /// No fitting key verifies the signature.
    #[error("signature does not verify")]
    BadSignature,
    /// `iss` is absent or another issuer's.
    #[error("issuer not accepted")]
    IssuerMismatch,
    /// `aud` names none of the accepted audiences.
    #[error("audience not accepted")]
    AudienceMismatch,
    /// `exp` has passed (beyond the skew).
    #[error("token expired")]
    Expired,
    /// `nbf` is still ahead (beyond the skew).
    #[error("token not yet valid")]
    NotYetValid,
    /// `exp` is required and absent.
    #[error("token has no expiry")]
    MissingExpiration,
    /// `exp` or `nbf` is not a number.
    #[error("{0} is not a NumericDate")]
    BadTimeClaim(&'static str),
}

/// A dotted claim name (`sub`, `realm.roles`), split into segments.
///
/// Lookup tries the longest run of segments as one key first, so a claim
/// whose name holds dots (`https://example.com/roles`) is found whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimPath(Vec<String>);

impl ClaimPath {
    /// Splits `name` on dots; `None` when a segment would be empty.
    pub fn parse(name: &str) -> Option<ClaimPath> {
        let segments: Vec<String> = name.split('.').map(str::to_string).collect();
        if segments.iter().any(String::is_empty) {
            return None;
        }
        Some(ClaimPath(segments))
    }

    /// The name as written.
    pub fn name(&self) -> String {
        self.0.join(".")
    }
}

/// A token's payload: a JSON object.
#[derive(Debug, Clone, PartialEq)]
pub struct Claims(Map<String, Value>);

fn lookup<'v>(object: &'v Map<String, Value>, segments: &[String]) -> Option<&'v Value> {
    for take in (1..=segments.len()).rev() {
        let key: Cow<'_, str> = if take == 1 {
            Cow::Borrowed(&segments[0])
        } else {
            Cow::Owned(segments[..take].join("."))
        };
        let Some(value) = object.get(key.as_ref()) else {
            continue;
        };
        if take == segments.len() {
            return Some(value);
        }
        if let Value::Object(inner) = value {
            if let Some(found) = lookup(inner, &segments[take..]) {
                return Some(found);
            }
        }
    }
    None
}

fn scalar_text(value: &Value) -> Option<Cow<'_, str>> {
    match value {
        Value::String(s) => Some(Cow::Borrowed(s)),
        Value::Number(n) => Some(Cow::Owned(n.to_string())),
        Value::Bool(b) => Some(Cow::Borrowed(if *b { "true" } else { "false" })),
        _ => None,
    }
}

impl Claims {
    /// Wraps a payload object.
    pub fn new(map: Map<String, Value>) -> Claims {
        Claims(map)
    }

    /// The claim at `path`.
    pub fn get(&self, path: &ClaimPath) -> Option<&Value> {
        lookup(&self.0, &path.0)
    }

    /// The claim as text: a string as is, a number or boolean as written,
    /// an array of those joined by commas; objects and null have none.
    pub fn text(&self, path: &ClaimPath) -> Option<Cow<'_, str>> {
        match self.get(path)? {
            Value::Array(items) => {
                let parts: Option<Vec<Cow<'_, str>>> = items.iter().map(scalar_text).collect();
                Some(Cow::Owned(parts?.join(",")))
            }
            other => scalar_text(other),
        }
    }

    /// Whether the claim, or for an array any of its elements, satisfies `test`.
    pub fn any_value(&self, path: &ClaimPath, test: impl Fn(&str) -> bool) -> bool {
        match self.get(path) {
            Some(Value::Array(items)) => {
                items.iter().filter_map(scalar_text).any(|text| test(&text))
            }
            Some(other) => scalar_text(other).is_some_and(|text| test(&text)),
            None => false,
        }
    }

    /// The `iss` claim, when it is a string.
    pub fn issuer(&self) -> Option<&str> {
        self.0.get("iss").and_then(Value::as_str)
    }
}

/// A decoded token whose signature has not been checked yet.
#[derive(Debug)]
pub struct Token<'a> {
    /// The signing algorithm.
    pub alg: Algorithm,
    /// The key id, if the header names one.
    pub kid: Option<String>,
    /// The payload.
    pub claims: Claims,
    /// The payload segment as sent (base64url), for `forward_payload_header`.
    pub payload_segment: &'a str,
    signing_input: &'a str,
    signature: Vec<u8>,
}

/// Decodes a compact JWS without trusting it: structure, header and
/// payload only. Never panics, whatever the input.
pub fn decode(token: &str) -> Result<Token<'_>, JwtError> {
    if token.len() > MAX_TOKEN_BYTES {
        return Err(JwtError::Malformed("too long"));
    }
    let mut parts = token.split('.');
    let (Some(header_segment), Some(payload), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(JwtError::Malformed("not three segments"));
    };
    let header_bytes =
        decode_segment(header_segment).ok_or(JwtError::Malformed("header encoding"))?;
    let header: Map<String, Value> =
        serde_json::from_slice(&header_bytes).map_err(|_| JwtError::Malformed("header JSON"))?;
    let alg = header
        .get("alg")
        .and_then(Value::as_str)
        .ok_or(JwtError::Malformed("no alg"))?;
    let alg = Algorithm::from_name(alg)?;
    // RFC 7515 §4.1.11: extensions a recipient does not understand make the token invalid.
    if header.contains_key("crit") {
        return Err(JwtError::CriticalHeader);
    }
    let kid = match header.get("kid") {
        None => None,
        Some(Value::String(kid)) => Some(kid.clone()),
        Some(_) => return Err(JwtError::Malformed("kid is not a string")),
    };
    let payload_bytes = decode_segment(payload).ok_or(JwtError::Malformed("payload encoding"))?;
    let claims: Map<String, Value> =
        serde_json::from_slice(&payload_bytes).map_err(|_| JwtError::Malformed("payload JSON"))?;
    let signature = decode_segment(signature)
        .filter(|s| !s.is_empty())
        .ok_or(JwtError::Malformed("signature encoding"))?;
    Ok(Token {
        alg,
        kid,
        claims: Claims(claims),
        payload_segment: payload,
        signing_input: &token[..header_segment.len() + 1 + payload.len()],
        signature,
    })
}

impl Token<'_> {
    /// Checks the signature with the keys of `jwks` that fit: those with
    /// the token's `kid` (or with none), of the token's algorithm.
    pub fn verify_signature(&self, jwks: &Jwks) -> Result<(), JwtError> {
        let mut fitting = jwks
            .keys()
            .iter()
            .filter(|key| match (&self.kid, &key.kid) {
                (Some(wanted), Some(have)) => wanted == have,
                _ => true,
            })
            .filter(|key| key.fits(self.alg))
            .peekable();
        if fitting.peek().is_none() {
            return Err(match &self.kid {
                Some(kid) if !jwks.has_kid(kid) => JwtError::UnknownKid(kid.clone()),
                _ => JwtError::NoKey(self.alg.name()),
            });
        }
        let message = self.signing_input.as_bytes();
        if fitting.any(|key| key.verify(self.alg, message, &self.signature)) {
            return Ok(());
        }
        // Keys without a kid were tried too; a kid the set does not know
        // still says the set may be out of date.
        Err(match &self.kid {
            Some(kid) if !jwks.has_kid(kid) => JwtError::UnknownKid(kid.clone()),
            _ => JwtError::BadSignature,
        })
    }
}

/// What a provider demands of the claims.
#[derive(Debug, Clone, Copy)]
pub struct ClaimRules<'a> {
    /// Required `iss`; any when `None`.
    pub issuer: Option<&'a str>,
    /// `aud` must name one of these; not checked when empty.
    pub audiences: &'a [String],
    /// Seconds of tolerance on `exp` and `nbf`.
    pub clock_skew: u64,
    /// Refuse tokens without `exp`.
    pub require_expiration: bool,
}

fn numeric_date(claims: &Claims, name: &'static str) -> Result<Option<f64>, JwtError> {
    match claims.0.get(name) {
        None => Ok(None),
        Some(Value::Number(n)) => n.as_f64().map(Some).ok_or(JwtError::BadTimeClaim(name)),
        Some(_) => Err(JwtError::BadTimeClaim(name)),
    }
}

/// Whether `iss` is the one `rules` asks for.
pub fn check_issuer(claims: &Claims, rules: &ClaimRules<'_>) -> Result<(), JwtError> {
    match rules.issuer {
        Some(issuer) if claims.issuer() != Some(issuer) => Err(JwtError::IssuerMismatch),
        _ => Ok(()),
    }
}

/// Checks `iss`, `aud`, `exp` and `nbf` at `now` (seconds since the epoch).
pub fn check_claims(claims: &Claims, rules: &ClaimRules<'_>, now: u64) -> Result<(), JwtError> {
    check_issuer(claims, rules)?;
    check_audience(claims, rules.audiences)?;
    let now = now as f64;
    let skew = rules.clock_skew as f64;
    match numeric_date(claims, "exp")? {
        // RFC 7519 §4.1.4: the token is valid only before `exp`.
        Some(exp) if now >= exp + skew => return Err(JwtError::Expired),
        None if rules.require_expiration => return Err(JwtError::MissingExpiration),
        _ => {}
    }
    if let Some(nbf) = numeric_date(claims, "nbf")? {
        if now + skew < nbf {
            return Err(JwtError::NotYetValid);
        }
    }
    Ok(())
}

/// Whether `aud` (a string or an array of strings) names one of `accepted`.
pub fn check_audience(claims: &Claims, accepted: &[String]) -> Result<(), JwtError> {
    if accepted.is_empty() {
        return Ok(());
    }
    let named = |aud: &str| accepted.iter().any(|a| a == aud);
    let ok = match claims.0.get("aud") {
        Some(Value::String(aud)) => named(aud),
        Some(Value::Array(list)) => list.iter().filter_map(Value::as_str).any(named),
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err(JwtError::AudienceMismatch)
    }
}

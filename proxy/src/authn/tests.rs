use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use futures_util::future::BoxFuture;
use ring::rand::SystemRandom;
use ring::signature::{self as sig, KeyPair as _};
use serde_json::json;

use super::jwks::{Algorithm, AlgorithmError};
use super::jwt::{check_claims, decode, ClaimRules};
use super::remote::{FetchError, RefetchGate, RemoteSource};
use super::*;

/// A throwaway 2048-bit RSA key, made for these tests with
/// `openssl genpkey -algorithm RSA`; ring cannot generate RSA keys.
const RSA_PKCS8: &[u8] = include_bytes!("testdata/rsa2048.pk8.der");

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

type SignFn = Box<dyn Fn(&[u8]) -> Vec<u8>>;

/// A signing key with its public JWK.
struct Signer {
    alg: Algorithm,
    kid: Option<String>,
    jwk: serde_json::Value,
    sign: SignFn,
}

impl Signer {
    fn new(alg: Algorithm, kid: Option<&str>) -> Signer {
        let rng = SystemRandom::new();
        let (jwk, sign): (serde_json::Value, SignFn) = match alg {
            Algorithm::Rs256
            | Algorithm::Rs384
            | Algorithm::Rs512
            | Algorithm::Ps256
            | Algorithm::Ps384
            | Algorithm::Ps512 => {
                let key = sig::RsaKeyPair::from_pkcs8(RSA_PKCS8).unwrap();
                let public = sig::RsaPublicKeyComponents::<Vec<u8>>::from(key.public());
                let padding: &'static dyn sig::RsaEncoding = match alg {
                    Algorithm::Rs256 => &sig::RSA_PKCS1_SHA256,
                    Algorithm::Rs384 => &sig::RSA_PKCS1_SHA384,
                    Algorithm::Rs512 => &sig::RSA_PKCS1_SHA512,
                    Algorithm::Ps256 => &sig::RSA_PSS_SHA256,
                    Algorithm::Ps384 => &sig::RSA_PSS_SHA384,
                    _ => &sig::RSA_PSS_SHA512,
                };
                (
                    json!({"kty": "RSA", "n": b64(&public.n), "e": b64(&public.e)}),
                    Box::new(move |msg| {
                        let mut out = vec![0; key.public().modulus_len()];
                        key.sign(padding, &SystemRandom::new(), msg, &mut out)
                            .unwrap();
                        out
                    }),
                )
            }
            Algorithm::Es256 | Algorithm::Es384 => {
                let (signing, crv, len) = if alg == Algorithm::Es256 {
                    (&sig::ECDSA_P256_SHA256_FIXED_SIGNING, "P-256", 32)
                } else {
                    (&sig::ECDSA_P384_SHA384_FIXED_SIGNING, "P-384", 48)
                };
                let pkcs8 = sig::EcdsaKeyPair::generate_pkcs8(signing, &rng).unwrap();
                let key = sig::EcdsaKeyPair::from_pkcs8(signing, pkcs8.as_ref(), &rng).unwrap();
                let point = key.public_key().as_ref().to_vec();
                (
                    json!({"kty": "EC", "crv": crv,
                           "x": b64(&point[1..1 + len]), "y": b64(&point[1 + len..])}),
                    Box::new(move |msg| {
                        key.sign(&SystemRandom::new(), msg)
                            .unwrap()
                            .as_ref()
                            .to_vec()
                    }),
                )
            }
            Algorithm::EdDsa => {
                let pkcs8 = sig::Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
                let key = sig::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
                (
                    json!({"kty": "OKP", "crv": "Ed25519", "x": b64(key.public_key().as_ref())}),
                    Box::new(move |msg| key.sign(msg).as_ref().to_vec()),
                )
            }
        };
        let mut jwk = jwk;
        if let Some(kid) = kid {
            jwk["kid"] = json!(kid);
        }
        Signer {
            alg,
            kid: kid.map(str::to_string),
            jwk,
            sign,
        }
    }

    fn token(&self, claims: serde_json::Value) -> String {
        let mut header = json!({"alg": self.alg.name(), "typ": "JWT"});
        if let Some(kid) = &self.kid {
            header["kid"] = json!(kid);
        }
        let input = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(claims.to_string().as_bytes())
        );
        let signature = (self.sign)(input.as_bytes());
        format!("{input}.{}", b64(&signature))
    }
}

fn jwks_of(signers: &[&Signer]) -> Jwks {
    let doc = json!({"keys": signers.iter().map(|s| s.jwk.clone()).collect::<Vec<_>>()});
    Jwks::parse(doc.to_string().as_bytes()).unwrap()
}

const NOW: u64 = 1_700_000_000;

fn claims() -> serde_json::Value {
    json!({"iss": "https://issuer.test", "sub": "alice", "aud": ["api", "other"],
           "exp": NOW + 600, "nbf": NOW - 10, "realm": {"roles": ["admin", "reader"]}})
}

const ALL: [Algorithm; 9] = [
    Algorithm::Rs256,
    Algorithm::Rs384,
    Algorithm::Rs512,
    Algorithm::Ps256,
    Algorithm::Ps384,
    Algorithm::Ps512,
    Algorithm::Es256,
    Algorithm::Es384,
    Algorithm::EdDsa,
];

#[test]
fn every_algorithm_verifies_and_tampering_fails() {
    for alg in ALL {
        let signer = Signer::new(alg, Some("k1"));
        let jwks = jwks_of(&[&signer]);
        let token = signer.token(claims());
        let decoded = decode(&token).unwrap();
        assert_eq!(decoded.alg, alg);
        assert_eq!(decoded.verify_signature(&jwks), Ok(()), "{alg:?}");

        // Another payload under the same signature.
        let parts: Vec<&str> = token.split('.').collect();
        let forged_payload = b64(json!({"sub": "mallory"}).to_string().as_bytes());
        let forged = format!("{}.{forged_payload}.{}", parts[0], parts[2]);
        assert_eq!(
            decode(&forged).unwrap().verify_signature(&jwks),
            Err(JwtError::BadSignature),
            "{alg:?}"
        );
    }
}

#[test]
fn keys_of_another_family_or_pinned_algorithm_verify_nothing() {
    let rsa = Signer::new(Algorithm::Rs256, None);
    let ec = Signer::new(Algorithm::Es256, None);
    let token = ec.token(claims());
    assert_eq!(
        decode(&token).unwrap().verify_signature(&jwks_of(&[&rsa])),
        Err(JwtError::NoKey("ES256"))
    );
    // An RSA key pinned to PS256 does not check RS256 signatures.
    let mut pinned = Signer::new(Algorithm::Rs256, None);
    pinned.jwk["alg"] = json!("PS256");
    let token = pinned.token(claims());
    assert_eq!(
        decode(&token)
            .unwrap()
            .verify_signature(&jwks_of(&[&pinned])),
        Err(JwtError::NoKey("RS256"))
    );
}

#[test]
fn kid_picks_the_key_and_an_unknown_kid_is_reported() {
    let one = Signer::new(Algorithm::Es256, Some("one"));
    let two = Signer::new(Algorithm::Es256, Some("two"));
    let jwks = jwks_of(&[&one]);
    assert_eq!(
        decode(&two.token(claims()))
            .unwrap()
            .verify_signature(&jwks),
        Err(JwtError::UnknownKid("two".into()))
    );
    // Keys without a kid are tried for any token: one that signed it verifies it…
    let anonymous = Signer::new(Algorithm::Es256, None);
    let mut named = Signer::new(Algorithm::Es256, Some("named"));
    named.sign = anonymous.sign;
    let jwks = jwks_of(&[&Signer {
        sign: Box::new(|_| Vec::new()),
        ..Signer::new(Algorithm::Es256, None)
    }]);
    let mut with_anonymous = jwks_of(&[&one]);
    with_anonymous = Jwks::parse(
        json!({"keys": [one.jwk.clone(), anonymous.jwk.clone()]})
            .to_string()
            .as_bytes(),
    )
    .unwrap_or(with_anonymous);
    assert_eq!(
        decode(&named.token(claims()))
            .unwrap()
            .verify_signature(&with_anonymous),
        Ok(())
    );
    // …and one that did not still leaves the kid reported unknown, so a
    // remote set is fetched again.
    assert_eq!(
        decode(&named.token(claims()))
            .unwrap()
            .verify_signature(&jwks),
        Err(JwtError::UnknownKid("named".into()))
    );
}

#[test]
fn unsigned_tokens_are_refused() {
    let header = b64(br#"{"alg":"none","typ":"JWT"}"#);
    let payload = b64(claims().to_string().as_bytes());
    for token in [
        format!("{header}.{payload}."),
        format!("{header}.{payload}.AAAA"),
    ] {
        assert_eq!(
            decode(&token).unwrap_err(),
            JwtError::Algorithm(AlgorithmError::None)
        );
    }
}

#[test]
fn hmac_signed_with_the_public_key_is_refused() {
    // The classic confusion: the attacker signs HS256 with the server's
    // public RSA key as the secret, hoping it is used as one.
    let key = sig::RsaKeyPair::from_pkcs8(RSA_PKCS8).unwrap();
    let secret = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key.public().as_ref());
    let input = format!(
        "{}.{}",
        b64(br#"{"alg":"HS256","typ":"JWT"}"#),
        b64(claims().to_string().as_bytes())
    );
    let tag = ring::hmac::sign(&secret, input.as_bytes());
    let token = format!("{input}.{}", b64(tag.as_ref()));
    assert_eq!(
        decode(&token).unwrap_err(),
        JwtError::Algorithm(AlgorithmError::Hmac("HS256".into()))
    );
}

#[test]
fn critical_headers_and_encrypted_tokens_are_refused() {
    let payload = b64(b"{}");
    let crit = format!(
        "{}.{payload}.AAAA",
        b64(br#"{"alg":"ES256","crit":["b64"]}"#)
    );
    assert_eq!(decode(&crit).unwrap_err(), JwtError::CriticalHeader);
    assert!(matches!(
        decode("a.b.c.d.e").unwrap_err(),
        JwtError::Malformed(_)
    ));
}

#[test]
fn issuer_audience_and_time_claims_with_skew() {
    let audiences = vec!["api".to_string()];
    let rules = ClaimRules {
        issuer: Some("https://issuer.test"),
        audiences: &audiences,
        clock_skew: 60,
        require_expiration: true,
    };
    let claims_of = |value: serde_json::Value| match value {
        serde_json::Value::Object(map) => Claims::new(map),
        _ => unreachable!(),
    };
    let base = json!({"iss": "https://issuer.test", "aud": "api", "exp": 1000});
    assert_eq!(check_claims(&claims_of(base.clone()), &rules, 1059), Ok(()));
    assert_eq!(
        check_claims(&claims_of(base.clone()), &rules, 1060),
        Err(JwtError::Expired)
    );
    let early =
        json!({"iss": "https://issuer.test", "aud": ["x", "api"], "exp": 5000, "nbf": 2000});
    assert_eq!(
        check_claims(&claims_of(early.clone()), &rules, 1940),
        Ok(())
    );
    assert_eq!(
        check_claims(&claims_of(early), &rules, 1939),
        Err(JwtError::NotYetValid)
    );
    let wrong_iss = json!({"iss": "https://evil.test", "aud": "api", "exp": 5000});
    assert_eq!(
        check_claims(&claims_of(wrong_iss), &rules, 1000),
        Err(JwtError::IssuerMismatch)
    );
    let wrong_aud = json!({"iss": "https://issuer.test", "aud": ["web"], "exp": 5000});
    assert_eq!(
        check_claims(&claims_of(wrong_aud), &rules, 1000),
        Err(JwtError::AudienceMismatch)
    );
    let no_exp = json!({"iss": "https://issuer.test", "aud": "api"});
    assert_eq!(
        check_claims(&claims_of(no_exp), &rules, 1000),
        Err(JwtError::MissingExpiration)
    );
    let text_exp = json!({"iss": "https://issuer.test", "aud": "api", "exp": "soon"});
    assert_eq!(
        check_claims(&claims_of(text_exp), &rules, 1000),
        Err(JwtError::BadTimeClaim("exp"))
    );
}

#[test]
fn claim_paths_reach_nested_and_dotted_names() {
    let claims = match json!({
        "sub": "alice", "n": 7, "ok": true,
        "realm": {"roles": ["admin", "reader"]},
        "https://example.com/groups": ["eng"],
        "obj": {"a": 1}
    }) {
        serde_json::Value::Object(map) => Claims::new(map),
        _ => unreachable!(),
    };
    let path = |name: &str| ClaimPath::parse(name).unwrap();
    assert_eq!(claims.text(&path("sub")).as_deref(), Some("alice"));
    assert_eq!(claims.text(&path("n")).as_deref(), Some("7"));
    assert_eq!(claims.text(&path("ok")).as_deref(), Some("true"));
    assert_eq!(
        claims.text(&path("realm.roles")).as_deref(),
        Some("admin,reader")
    );
    assert_eq!(claims.text(&path("obj")), None);
    assert!(claims.any_value(&path("realm.roles"), |r| r == "admin"));
    assert!(!claims.any_value(&path("realm.roles"), |r| r == "root"));
    assert!(claims.any_value(&path("https://example.com/groups"), |g| g == "eng"));
    assert!(ClaimPath::parse("a..b").is_none());
    assert!(ClaimPath::parse("").is_none());
}

proptest::proptest! {
    #[test]
    fn decoding_garbage_never_panics(text in ".{0,300}") {
        let _ = decode(&text);
    }

    #[test]
    fn segments_of_random_bytes_never_panic(
        header in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64),
        payload in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64),
        signature in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..80),
        alg in proptest::sample::select(vec!["ES256", "RS256", "EdDSA", "none", "HS256", "x"]),
    ) {
        let jwks = jwks_of(&[&Signer::new(Algorithm::Es256, None)]);
        let random = format!("{}.{}.{}", b64(&header), b64(&payload), b64(&signature));
        if let Ok(token) = decode(&random) {
            let _ = token.verify_signature(&jwks);
        }
        // A well-formed header and payload with a random signature.
        let shaped = format!(
            "{}.{}.{}",
            b64(json!({"alg": alg}).to_string().as_bytes()),
            b64(json!({"exp": payload.len()}).to_string().as_bytes()),
            b64(&signature)
        );
        if let Ok(token) = decode(&shaped) {
            proptest::prop_assert!(token.verify_signature(&jwks).is_err());
        }
    }
}

// ------------------------------------------------------------ authenticate --

/// A key server double: serves the current document and counts fetches.
#[derive(Default)]
struct FakeFetcher {
    doc: Mutex<String>,
    fetches: AtomicUsize,
    fail: std::sync::atomic::AtomicBool,
}

impl FakeFetcher {
    fn serving(signers: &[&Signer]) -> Arc<FakeFetcher> {
        let fetcher = Arc::new(FakeFetcher::default());
        fetcher.serve(signers);
        fetcher
    }

    fn serve(&self, signers: &[&Signer]) {
        let doc = json!({"keys": signers.iter().map(|s| s.jwk.clone()).collect::<Vec<_>>()});
        *self.doc.lock().unwrap() = doc.to_string();
    }

    fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }
}

impl JwksFetcher for FakeFetcher {
    fn fetch<'a>(&'a self, _: &'a RemoteSource) -> BoxFuture<'a, Result<Bytes, FetchError>> {
        Box::pin(async move {
            self.fetches.fetch_add(1, Ordering::SeqCst);
            // A fetch takes a moment, so concurrent callers overlap.
            tokio::time::sleep(Duration::from_millis(10)).await;
            if self.fail.load(Ordering::SeqCst) {
                return Err(FetchError::Status(503));
            }
            Ok(Bytes::from(self.doc.lock().unwrap().clone()))
        })
    }
}

fn provider(name: &str, keys: KeySource) -> Provider {
    Provider {
        name: Arc::from(name),
        issuer: Some("https://issuer.test".into()),
        audiences: vec!["api".into()],
        keys,
        locations: TokenLocation::defaults(),
        forward: false,
        forward_payload_header: None,
        claim_to_headers: vec![(
            ClaimPath::parse("sub").unwrap(),
            HeaderName::from_static("x-jwt-sub"),
        )],
        clock_skew: 60,
        require_expiration: false,
        cache: VerifiedCache::new(VerifiedCache::DEFAULT_CAPACITY),
    }
}

fn everything(requirement: Requirement) -> Vec<Rule> {
    vec![Rule {
        matcher: RouteMatch::default(),
        requirement: Some(requirement),
    }]
}

fn authn(providers: Vec<Provider>, rules: Vec<Rule>) -> JwtAuthn {
    JwtAuthn::new(providers, rules, HashMap::new(), true, false)
}

fn request(uri: &str, headers: &[(&str, &str)]) -> Request<()> {
    let mut builder = Request::get(uri);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    builder.body(()).unwrap()
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

const REQUIRE_A: Requirement = Requirement::Provider {
    index: 0,
    audiences: None,
};

#[tokio::test]
async fn a_valid_token_yields_claims_headers_and_is_stripped() {
    let signer = Signer::new(Algorithm::Es256, Some("k"));
    let keys = KeySource::Static(Arc::new(jwks_of(&[&signer])));
    let authn = authn(vec![provider("a", keys)], everything(REQUIRE_A));
    let fetcher = FakeFetcher::serving(&[]);
    let token = signer.token(claims());

    let mut req = request(
        "/x",
        &[("authorization", &bearer(&token)), ("x-jwt-sub", "forged")],
    );
    let verified = authn
        .authenticate(&mut req, "api", None, &fetcher, NOW)
        .await
        .unwrap();
    assert_eq!(verified.len(), 1);
    assert_eq!(
        verified[0]
            .claims
            .text(&ClaimPath::parse("sub").unwrap())
            .as_deref(),
        Some("alice")
    );
    assert_eq!(req.headers()["x-jwt-sub"], "alice");
    assert!(
        req.headers().get("authorization").is_none(),
        "forward: false strips"
    );

    // From the query parameter: removed from the URI, other parameters kept.
    let mut req = request(&format!("/x?a=1&access_token={token}&b=2"), &[]);
    authn
        .authenticate(&mut req, "api", None, &fetcher, NOW)
        .await
        .unwrap();
    assert_eq!(req.uri().to_string(), "/x?a=1&b=2");

    // Missing, and a forged claim header never survives.
    let mut req = request("/x", &[("x-jwt-sub", "forged")]);
    assert_eq!(
        authn
            .authenticate(&mut req, "api", None, &fetcher, NOW)
            .await
            .unwrap_err(),
        AuthnFailure::Missing
    );
    assert!(req.headers().get("x-jwt-sub").is_none());

    // Expired (past the skew), and a scheme other than Bearer.
    let old = signer.token(json!({"iss": "https://issuer.test", "aud": "api", "exp": NOW - 61}));
    let mut req = request("/x", &[("authorization", &bearer(&old))]);
    assert!(matches!(
        authn
            .authenticate(&mut req, "api", None, &fetcher, NOW)
            .await,
        Err(AuthnFailure::Invalid {
            reason: InvalidReason::Token(JwtError::Expired),
            ..
        })
    ));
    let mut req = request("/x", &[("authorization", &format!("Basic {token}"))]);
    assert_eq!(
        authn
            .authenticate(&mut req, "api", None, &fetcher, NOW)
            .await
            .unwrap_err(),
        AuthnFailure::Missing
    );
}

async fn authenticate_bearer(
    authn: &JwtAuthn,
    fetcher: &Arc<FakeFetcher>,
    token: &str,
    now: u64,
) -> Result<Vec<VerifiedJwt>, AuthnFailure> {
    let mut req = request("/x", &[("authorization", &bearer(token))]);
    authn
        .authenticate(&mut req, "api", None, fetcher, now)
        .await
}

#[tokio::test]
async fn verified_tokens_are_cached_and_rechecked_in_time() {
    let signer = Signer::new(Algorithm::Es256, Some("k"));
    let keys = KeySource::Static(Arc::new(jwks_of(&[&signer])));
    let authn = authn(vec![provider("a", keys)], everything(REQUIRE_A));
    let fetcher = FakeFetcher::serving(&[]);
    let cache = &authn.providers()[0].cache;
    let token = signer.token(claims());

    let first = authenticate_bearer(&authn, &fetcher, &token, NOW)
        .await
        .unwrap();
    assert_eq!(cache.len(), 1);
    let again = authenticate_bearer(&authn, &fetcher, &token, NOW)
        .await
        .unwrap();
    assert!(
        Arc::ptr_eq(&first[0].claims, &again[0].claims),
        "the second call is served from the cache"
    );
    // Claims from the cache still meet each requirement's audiences.
    let other = Requirement::Provider {
        index: 0,
        audiences: Some(vec!["billing".into()]),
    };
    let picky = JwtAuthn::new(
        vec![Provider {
            cache: VerifiedCache::new(10),
            ..provider("a", KeySource::Static(Arc::new(jwks_of(&[&signer]))))
        }],
        everything(other),
        HashMap::new(),
        true,
        false,
    );
    for _ in 0..2 {
        assert!(authenticate_bearer(&picky, &fetcher, &token, NOW)
            .await
            .is_err());
    }

    // Time passes: a cached token expires like any other, and leaves.
    let later = NOW + 600 + 61;
    assert!(matches!(
        authenticate_bearer(&authn, &fetcher, &token, later).await,
        Err(AuthnFailure::Invalid {
            reason: InvalidReason::Token(JwtError::Expired),
            ..
        })
    ));
    assert!(cache.is_empty());

    // Forged tokens never enter; the cache stays within its bound.
    let forger = Signer::new(Algorithm::Es256, Some("k"));
    for _ in 0..5 {
        assert!(
            authenticate_bearer(&authn, &fetcher, &forger.token(claims()), NOW)
                .await
                .is_err()
        );
    }
    assert!(cache.is_empty());
    for i in 0..(VerifiedCache::DEFAULT_CAPACITY + 50) {
        let mut c = claims();
        c["jti"] = json!(i);
        authenticate_bearer(&authn, &fetcher, &signer.token(c), NOW)
            .await
            .unwrap();
    }
    assert_eq!(cache.len(), VerifiedCache::DEFAULT_CAPACITY);

    // Size 0: nothing is kept.
    let uncached = JwtAuthn::new(
        vec![Provider {
            cache: VerifiedCache::new(0),
            ..provider("a", KeySource::Static(Arc::new(jwks_of(&[&signer]))))
        }],
        everything(REQUIRE_A),
        HashMap::new(),
        true,
        false,
    );
    authenticate_bearer(&uncached, &fetcher, &token, NOW)
        .await
        .unwrap();
    assert!(uncached.providers()[0].cache.is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_cached_token_is_void_once_its_key_leaves_the_set() {
    let old = Signer::new(Algorithm::Es256, Some("old"));
    let new = Signer::new(Algorithm::Es256, Some("new"));
    let fetcher = FakeFetcher::serving(&[&old]);
    let keys = remote(Duration::from_secs(30));
    let authn = authn(
        vec![provider("a", KeySource::Remote(keys.clone()))],
        everything(REQUIRE_A),
    );
    let token = old.token(claims());
    authenticate_bearer(&authn, &fetcher, &token, NOW)
        .await
        .unwrap();
    assert_eq!(authn.providers()[0].cache.len(), 1);

    // The issuer drops the old key; once the set is refreshed the cached
    // verdict no longer holds.
    fetcher.serve(&[&new]);
    tokio::time::sleep(Duration::from_secs(81)).await;
    assert!(fetcher.fetches() >= 2, "the background refresh ran");
    assert!(authenticate_bearer(&authn, &fetcher, &token, NOW)
        .await
        .is_err());
    assert!(authn.providers()[0].cache.is_empty());
    authenticate_bearer(&authn, &fetcher, &new.token(claims()), NOW)
        .await
        .unwrap();
}

#[tokio::test]
async fn forward_keeps_the_token_and_the_payload_can_be_forwarded() {
    let signer = Signer::new(Algorithm::EdDsa, None);
    let mut a = provider("a", KeySource::Static(Arc::new(jwks_of(&[&signer]))));
    a.forward = true;
    a.forward_payload_header = Some(HeaderName::from_static("x-jwt-payload"));
    let authn = authn(vec![a], everything(REQUIRE_A));
    let token = signer.token(claims());
    let mut req = request("/x", &[("authorization", &bearer(&token))]);
    authn
        .authenticate(&mut req, "api", None, &FakeFetcher::serving(&[]), NOW)
        .await
        .unwrap();
    assert_eq!(req.headers()["authorization"], bearer(&token).as_str());
    assert_eq!(
        req.headers()["x-jwt-payload"],
        token.split('.').nth(1).unwrap()
    );
}

#[tokio::test]
async fn requirements_combine_as_envoy_does() {
    let one = Signer::new(Algorithm::Es256, None);
    let two = Signer::new(Algorithm::Es384, None);
    let providers = || {
        let mut b = provider("b", KeySource::Static(Arc::new(jwks_of(&[&two]))));
        b.issuer = Some("https://other.test".into());
        b.forward = true;
        b.claim_to_headers.clear();
        b.locations = vec![TokenLocation::Header {
            name: HeaderName::from_static("x-token"),
            prefix: String::new(),
        }];
        vec![
            provider("a", KeySource::Static(Arc::new(jwks_of(&[&one])))),
            b,
        ]
    };
    let fetcher = FakeFetcher::serving(&[]);
    let good_a = one.token(claims());
    let good_b = two.token(json!({"iss": "https://other.test", "aud": "api", "sub": "svc"}));
    let forged_a = two.token(claims());
    let check = |requirement: Requirement, headers: Vec<(&'static str, String)>| {
        let authn = authn(providers(), everything(requirement));
        let fetcher = fetcher.clone();
        async move {
            let pairs: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
            let mut req = request("/x", &pairs);
            authn
                .authenticate(&mut req, "api", None, &fetcher, NOW)
                .await
                .map(|v| v.iter().map(|t| t.provider.to_string()).collect::<Vec<_>>())
        }
    };
    let b_req = Requirement::Provider {
        index: 1,
        audiences: None,
    };
    let any = Requirement::Any(vec![REQUIRE_A, b_req.clone()]);
    assert_eq!(
        check(any.clone(), vec![("x-token", good_b.clone())]).await,
        Ok(vec!["b".to_string()])
    );
    assert_eq!(check(any.clone(), vec![]).await, Err(AuthnFailure::Missing));
    // Any: a refused token is reported over a missing one.
    assert!(matches!(
        check(any, vec![("authorization", bearer(&forged_a))]).await,
        Err(AuthnFailure::Invalid { .. })
    ));
    let all = Requirement::All(vec![REQUIRE_A, b_req]);
    assert_eq!(
        check(
            all.clone(),
            vec![
                ("authorization", bearer(&good_a)),
                ("x-token", good_b.clone())
            ]
        )
        .await,
        Ok(vec!["a".to_string(), "b".to_string()])
    );
    assert_eq!(
        check(all, vec![("authorization", bearer(&good_a))]).await,
        Err(AuthnFailure::Missing)
    );
    // Istio's shape: a token if any, and then a valid one.
    let optional = Requirement::Any(vec![REQUIRE_A, Requirement::AllowMissing]);
    assert_eq!(check(optional.clone(), vec![]).await, Ok(vec![]));
    assert_eq!(
        check(optional.clone(), vec![("authorization", bearer(&good_a))]).await,
        Ok(vec!["a".to_string()])
    );
    assert!(check(optional, vec![("authorization", bearer(&forged_a))])
        .await
        .is_err());
    // A token of an issuer nobody configured counts as missing.
    let stranger = one.token(json!({"iss": "https://stranger.test", "aud": "api"}));
    assert_eq!(
        check(
            Requirement::AllowMissing,
            vec![("authorization", bearer(&stranger))]
        )
        .await,
        Ok(vec![])
    );
    assert_eq!(
        check(
            Requirement::AllowMissingOrFailed,
            vec![
                ("authorization", bearer(&forged_a)),
                ("x-token", good_b.clone())
            ]
        )
        .await,
        Ok(vec!["b".to_string()])
    );
    // Audiences given with the provider replace the provider's.
    let other_aud = Requirement::Provider {
        index: 0,
        audiences: Some(vec!["other".into()]),
    };
    assert_eq!(
        check(other_aud, vec![("authorization", bearer(&good_a))]).await,
        Ok(vec!["a".to_string()])
    );
    let narrow = Requirement::Provider {
        index: 0,
        audiences: Some(vec!["nobody".into()]),
    };
    assert!(matches!(
        check(narrow, vec![("authorization", bearer(&good_a))]).await,
        Err(AuthnFailure::Invalid {
            reason: InvalidReason::Token(JwtError::AudienceMismatch),
            ..
        })
    ));
}

#[tokio::test]
async fn rules_routes_and_preflights_choose_the_requirement() {
    let signer = Signer::new(Algorithm::Es256, None);
    let keys = KeySource::Static(Arc::new(jwks_of(&[&signer])));
    let rules = vec![
        Rule {
            matcher: RouteMatch {
                path: crate::route::PathMatch::Prefix("/public".into()),
                ..Default::default()
            },
            requirement: None,
        },
        Rule {
            matcher: RouteMatch::default(),
            requirement: Some(REQUIRE_A),
        },
    ];
    let mut map = HashMap::new();
    map.insert("open".to_string(), Requirement::AllowMissing);
    let authn = JwtAuthn::new(vec![provider("a", keys)], rules, map, true, false);
    let fetcher = FakeFetcher::serving(&[]);
    let run =
        |uri: &'static str, route: Option<RouteJwt>, headers: Vec<(&'static str, &'static str)>| {
            let authn = &authn;
            let fetcher = fetcher.clone();
            async move {
                let mut req = request(uri, &headers);
                authn
                    .authenticate(&mut req, "api", route.as_ref(), &fetcher, NOW)
                    .await
                    .map(|v| v.len())
            }
        };
    assert_eq!(run("/public/x", None, vec![]).await, Ok(0));
    assert_eq!(
        run("/private", None, vec![]).await,
        Err(AuthnFailure::Missing)
    );
    assert_eq!(
        run("/private", Some(RouteJwt::Disabled), vec![]).await,
        Ok(0)
    );
    assert_eq!(
        run(
            "/private",
            Some(RouteJwt::Requirement("open".into())),
            vec![]
        )
        .await,
        Ok(0)
    );
    assert!(matches!(
        run(
            "/private",
            Some(RouteJwt::Requirement("nope".into())),
            vec![]
        )
        .await,
        Err(AuthnFailure::Invalid {
            reason: InvalidReason::UnknownRequirement(_),
            ..
        })
    ));
    let preflight = vec![
        ("origin", "https://app.test"),
        ("access-control-request-method", "POST"),
    ];
    let mut req = request("/private", &preflight);
    *req.method_mut() = Method::OPTIONS;
    assert_eq!(
        authn
            .authenticate(&mut req, "api", None, &fetcher, NOW)
            .await
            .map(|v| v.len()),
        Ok(0)
    );
}

// ------------------------------------------------------------ remote keys --

fn remote(interval: Duration) -> Arc<RemoteJwks> {
    RemoteJwks::new(RemoteSource {
        uri: "http://keys.test/jwks".parse().unwrap(),
        cluster: Arc::from("keys"),
        cache_duration: Duration::from_secs(100),
        timeout: Duration::from_secs(1),
        min_refetch_interval: interval,
    })
}

#[test]
fn refetch_gate_allows_one_fetch_per_interval() {
    let mut gate = RefetchGate::new(Duration::from_secs(30));
    let t0 = tokio::time::Instant::now();
    assert!(gate.allow(t0));
    assert!(!gate.allow(t0 + Duration::from_secs(29)));
    assert!(gate.allow(t0 + Duration::from_secs(30)));
    assert!(!gate.allow(t0 + Duration::from_secs(31)));
}

#[tokio::test(start_paused = true)]
async fn remote_keys_are_cached_and_refreshed_before_they_expire() {
    let signer = Signer::new(Algorithm::Es256, Some("k1"));
    let fetcher = FakeFetcher::serving(&[&signer]);
    let keys = remote(Duration::from_secs(30));
    // Concurrent first requests share one fetch.
    let (a, b) = tokio::join!(keys.keys(&fetcher), keys.keys(&fetcher));
    assert!(a.is_ok() && b.is_ok());
    assert_eq!(fetcher.fetches(), 1);
    tokio::time::sleep(Duration::from_secs(50)).await;
    keys.keys(&fetcher).await.unwrap();
    assert_eq!(fetcher.fetches(), 1, "cached");
    // The refresh runs at 80% of the cache duration, with no request.
    tokio::time::sleep(Duration::from_secs(31)).await;
    assert_eq!(fetcher.fetches(), 2, "refreshed in the background");
    tokio::time::sleep(Duration::from_secs(81)).await;
    assert_eq!(fetcher.fetches(), 3);
    // The refresher stops with its key set.
    drop(keys);
    tokio::time::sleep(Duration::from_secs(1000)).await;
    assert_eq!(fetcher.fetches(), 3);
}

#[tokio::test(start_paused = true)]
async fn unknown_kids_refetch_at_most_once_per_interval() {
    let old = Signer::new(Algorithm::Es256, Some("old"));
    let new = Signer::new(Algorithm::Es256, Some("new"));
    let fetcher = FakeFetcher::serving(&[&old]);
    let mut a = provider("a", KeySource::Remote(remote(Duration::from_secs(30))));
    a.audiences.clear();
    let authn = authn(vec![a], everything(REQUIRE_A));
    let call = |token: String| {
        let authn = &authn;
        let fetcher = fetcher.clone();
        async move {
            let header = bearer(&token);
            let mut req = request("/x", &[("authorization", &header)]);
            authn
                .authenticate(&mut req, "api", None, &fetcher, NOW)
                .await
                .map(|_| ())
        }
    };
    assert_eq!(call(old.token(claims())).await, Ok(()));
    assert_eq!(fetcher.fetches(), 1);

    // Rotation: the new key is found by one refetch.
    fetcher.serve(&[&old, &new]);
    assert_eq!(call(new.token(claims())).await, Ok(()));
    assert_eq!(fetcher.fetches(), 2);

    // A stream of forged kids costs at most one fetch per interval.
    let forger = Signer::new(Algorithm::Es256, Some("forged-1"));
    for _ in 0..20 {
        assert!(call(forger.token(claims())).await.is_err());
    }
    assert_eq!(
        fetcher.fetches(),
        2,
        "the rotation refetch used up this interval"
    );
    tokio::time::sleep(Duration::from_secs(30)).await;
    for _ in 0..20 {
        assert!(call(forger.token(claims())).await.is_err());
    }
    assert_eq!(fetcher.fetches(), 3);
    assert_eq!(call(new.token(claims())).await, Ok(()));
}

#[tokio::test(start_paused = true)]
async fn failed_fetches_hold_off_and_adopted_keys_need_no_fetch() {
    let signer = Signer::new(Algorithm::Es256, Some("k1"));
    let fetcher = FakeFetcher::serving(&[&signer]);
    fetcher.fail.store(true, Ordering::SeqCst);
    let keys = remote(Duration::from_secs(30));
    assert!(matches!(
        keys.keys(&fetcher).await,
        Err(FetchError::Status(503))
    ));
    let after_first = fetcher.fetches();
    assert!(matches!(
        keys.keys(&fetcher).await,
        Err(FetchError::HeldOff)
    ));
    assert_eq!(fetcher.fetches(), after_first, "no fetch while held off");
    fetcher.fail.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(keys.keys(&fetcher).await.is_ok());

    // A config push: the new key set starts with the old one's keys.
    let replacement = remote(Duration::from_secs(30));
    replacement.adopt(&keys);
    let before = fetcher.fetches();
    assert!(replacement.keys(&fetcher).await.is_ok());
    assert_eq!(fetcher.fetches(), before);
}

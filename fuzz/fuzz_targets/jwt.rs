//! JWT and JWKS parsing and signature checks. Input: one byte of mode, then
//!
//! - even mode (tamper): one byte picking a genuine token (EdDSA or RS256,
//!   signed once at start-up with fixed keys), then edits of three bytes
//!   each: a big-endian position and a byte (`0` deletes, anything else
//!   replaces);
//! - odd mode (free): a JWKS document, a newline, a token, a newline, and a
//!   claim name; an empty document means the fixed key set.
//!
//! Checked: nothing panics, whatever the key set, token or claim; against
//! the fixed keys, a token verifies only if its signed part is a genuine
//! token's, byte for byte, and its signature decodes to that token's
//! signature, so no edit forges a token, `alg: none` or an HMAC token
//! keyed with a public key included.

#![no_main]

use std::sync::OnceLock;

use base64::Engine as _;
use postern::authn::jwks::Jwks;
use postern::authn::jwt::{check_audience, check_claims, decode, ClaimPath, ClaimRules};
use ring::signature::{self as sig, KeyPair as _};

/// A throwaway RSA key of the proxy's own JWT tests.
const RSA_PKCS8: &[u8] = include_bytes!("../../proxy/src/authn/testdata/rsa2048.pk8.der");

struct Fixture {
    jwks: Jwks,
    tokens: Vec<String>,
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// Decodes a segment as the proxy does (padding optional, no stray bits),
/// to tell which signature bytes a token carries.
fn segment_bytes(text: &str) -> Option<Vec<u8>> {
    base64::engine::GeneralPurpose::new(
        &base64::alphabet::URL_SAFE,
        base64::engine::GeneralPurposeConfig::new()
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
    )
    .decode(text)
    .ok()
}

fn signed(header: &serde_json::Value, sign: impl Fn(&[u8]) -> Vec<u8>) -> String {
    let claims = serde_json::json!({
        "iss": "https://issuer.example",
        "aud": ["orders", "billing"],
        "sub": "alice",
        "exp": 4_000_000_000u64,
        "nbf": 1_000_000_000u64,
        "scope": "read write",
        "groups": ["admins", "staff"],
        "nested": {"team": {"name": "checkout"}},
    });
    let input = format!(
        "{}.{}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes())
    );
    let signature = sign(input.as_bytes());
    format!("{input}.{}", b64(&signature))
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let ed = sig::Ed25519KeyPair::from_seed_unchecked(&[7; 32]).expect("seed");
        let rsa = sig::RsaKeyPair::from_pkcs8(RSA_PKCS8).expect("test key");
        let rsa_public = sig::RsaPublicKeyComponents::<Vec<u8>>::from(rsa.public());
        let document = serde_json::json!({"keys": [
            {"kty": "OKP", "crv": "Ed25519", "kid": "ed", "x": b64(ed.public_key().as_ref())},
            {"kty": "RSA", "kid": "rs", "alg": "RS256",
             "n": b64(&rsa_public.n), "e": b64(&rsa_public.e)},
        ]});
        let jwks = Jwks::parse(document.to_string().as_bytes()).expect("fixed key set");
        assert_eq!(jwks.keys().len(), 2, "both fixed keys are usable");
        let tokens = vec![
            signed(&serde_json::json!({"alg": "EdDSA", "kid": "ed"}), |m| {
                ed.sign(m).as_ref().to_vec()
            }),
            // PKCS#1 v1.5 is deterministic: the token is the same every run.
            signed(
                &serde_json::json!({"alg": "RS256", "kid": "rs", "typ": "JWT"}),
                |m| {
                    let mut out = vec![0; rsa.public().modulus_len()];
                    rsa.sign(
                        &sig::RSA_PKCS1_SHA256,
                        &ring::rand::SystemRandom::new(),
                        m,
                        &mut out,
                    )
                    .expect("sign");
                    out
                },
            ),
        ];
        for token in &tokens {
            let decoded = decode(token).expect("genuine token decodes");
            decoded
                .verify_signature(&jwks)
                .expect("genuine token verifies");
        }
        Fixture { jwks, tokens }
    })
}

/// The signed part and the signature bytes of a token.
fn parts(token: &str) -> Option<(&str, Vec<u8>)> {
    let (signed, signature) = token.rsplit_once('.')?;
    Some((signed, segment_bytes(signature)?))
}

/// Verifies `token` against the fixed keys; a success must be a genuine token.
fn no_forgery(token: &str) {
    let fixture = fixture();
    let Ok(decoded) = decode(token) else {
        return;
    };
    if decoded.verify_signature(&fixture.jwks).is_err() {
        return;
    }
    let got = parts(token).expect("a verified token has three segments");
    assert!(
        fixture
            .tokens
            .iter()
            .any(|genuine| parts(genuine).as_ref() == Some(&got)),
        "forged token verified: {token}"
    );
}

fn edit(token: &str, edits: &[u8]) -> Vec<u8> {
    let mut bytes = token.as_bytes().to_vec();
    for chunk in edits.chunks_exact(3) {
        if bytes.is_empty() {
            break;
        }
        let at = usize::from(u16::from_be_bytes([chunk[0], chunk[1]])) % bytes.len();
        match chunk[2] {
            0 => {
                bytes.remove(at);
            }
            byte => bytes[at] = byte,
        }
    }
    bytes
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode % 2 == 0 {
        let Some((&which, edits)) = rest.split_first() else {
            return;
        };
        let tokens = &fixture().tokens;
        let genuine = &tokens[usize::from(which) % tokens.len()];
        if let Ok(token) = std::str::from_utf8(&edit(genuine, edits)) {
            no_forgery(token);
        }
        return;
    }

    let mut fields = rest.splitn(3, |&b| b == b'\n');
    let (document, token, claim) = (
        fields.next().unwrap_or_default(),
        fields.next().unwrap_or_default(),
        fields.next().unwrap_or_default(),
    );
    let Ok(token) = std::str::from_utf8(token) else {
        return;
    };
    if document.is_empty() {
        no_forgery(token);
    } else if let (Ok(jwks), Ok(decoded)) = (Jwks::parse(document), decode(token)) {
        // A key set from anywhere: whatever the answer, no panic.
        let _ = decoded.verify_signature(&jwks);
        let _ = jwks.has_kid(decoded.kid.as_deref().unwrap_or_default());
    }
    let Ok(decoded) = decode(token) else {
        return;
    };
    let audiences = ["orders".to_owned()];
    for now in [0, 1_700_000_000, u64::MAX] {
        let rules = ClaimRules {
            issuer: Some("https://issuer.example"),
            audiences: &audiences,
            clock_skew: now % 120,
            require_expiration: now % 2 == 0,
        };
        let _ = check_claims(&decoded.claims, &rules, now);
    }
    let _ = check_audience(&decoded.claims, &audiences);
    if let Some(path) = std::str::from_utf8(claim).ok().and_then(ClaimPath::parse) {
        let _ = decoded.claims.get(&path);
        let _ = decoded.claims.text(&path);
        let _ = decoded.claims.any_value(&path, |v| v == "admins");
        let _ = path.name();
    }
});

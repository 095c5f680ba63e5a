//! JSON Web Key Sets (RFC 7517): parsing the public keys a provider signs
//! with, and checking one signature with one key. Pure: no I/O and no
//! clock. Only asymmetric keys are kept; `oct` (HMAC) keys are dropped on
//! parse, so a public key can never be used as an HMAC secret.

use base64::Engine as _;
use ring::signature::{self, RsaPublicKeyComponents, UnparsedPublicKey};

/// A signing algorithm Postern verifies (RFC 7518 §3, RFC 8037 §3.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Algorithm {
    /// RSASSA-PKCS1-v1_5 with SHA-256.
    Rs256,
    /// RSASSA-PKCS1-v1_5 with SHA-384.
    Rs384,
    /// RSASSA-PKCS1-v1_5 with SHA-512.
    Rs512,
    /// RSASSA-PSS with SHA-256.
    Ps256,
    /// RSASSA-PSS with SHA-384.
    Ps384,
    /// RSASSA-PSS with SHA-512.
    Ps512,
    /// ECDSA on P-256 with SHA-256.
    Es256,
    /// ECDSA on P-384 with SHA-384.
    Es384,
    /// Ed25519.
    EdDsa,
}

/// Why an `alg` value is not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AlgorithmError {
    /// `none`: an unsigned token.
    #[error("unsigned tokens (alg none) are refused")]
    None,
    /// HS256/384/512: a shared-secret MAC, which a public key set cannot check.
    #[error("HMAC tokens ({0}) are refused")]
    Hmac(String),
    /// Anything else.
    #[error("unsupported algorithm {0:?}")]
    Unsupported(String),
}

impl Algorithm {
    /// The algorithm named by a JOSE `alg` value (case-sensitive, RFC 7515 §4.1.1).
    pub fn from_name(name: &str) -> Result<Algorithm, AlgorithmError> {
        Ok(match name {
            "RS256" => Algorithm::Rs256,
            "RS384" => Algorithm::Rs384,
            "RS512" => Algorithm::Rs512,
            "PS256" => Algorithm::Ps256,
            "PS384" => Algorithm::Ps384,
            "PS512" => Algorithm::Ps512,
            "ES256" => Algorithm::Es256,
            "ES384" => Algorithm::Es384,
            "EdDSA" => Algorithm::EdDsa,
            "none" => return Err(AlgorithmError::None),
            "HS256" | "HS384" | "HS512" => return Err(AlgorithmError::Hmac(name.to_string())),
            other => return Err(AlgorithmError::Unsupported(other.to_string())),
        })
    }

    /// The JOSE name.
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Rs256 => "RS256",
            Algorithm::Rs384 => "RS384",
            Algorithm::Rs512 => "RS512",
            Algorithm::Ps256 => "PS256",
            Algorithm::Ps384 => "PS384",
            Algorithm::Ps512 => "PS512",
            Algorithm::Es256 => "ES256",
            Algorithm::Es384 => "ES384",
            Algorithm::EdDsa => "EdDSA",
        }
    }
}

/// Why a key set cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum JwksError {
    /// Not JSON, or not a `{"keys": [...]}` object.
    #[error("not a JSON Web Key Set")]
    Json(#[source] serde_json::Error),
    /// No key in the set is one Postern can verify with.
    #[error("no usable signing key in the key set ({skipped} skipped)")]
    NoUsableKey {
        /// Keys dropped as unsupported or malformed.
        skipped: usize,
    },
}

/// The public part of one key.
#[derive(Clone, PartialEq, Eq)]
enum KeyMaterial {
    /// Modulus and exponent, big-endian without leading zeros.
    Rsa { n: Vec<u8>, e: Vec<u8> },
    /// An uncompressed point (`04 || x || y`).
    P256(Vec<u8>),
    /// An uncompressed point (`04 || x || y`).
    P384(Vec<u8>),
    /// The 32-byte public key.
    Ed25519(Vec<u8>),
}

/// One verification key.
#[derive(Clone, PartialEq, Eq)]
pub struct Jwk {
    /// `kid`, when the set names its keys.
    pub kid: Option<String>,
    /// `alg`, when the key is pinned to one algorithm.
    pub alg: Option<Algorithm>,
    material: KeyMaterial,
}

impl std::fmt::Debug for Jwk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kty = match self.material {
            KeyMaterial::Rsa { .. } => "RSA",
            KeyMaterial::P256(_) => "EC P-256",
            KeyMaterial::P384(_) => "EC P-384",
            KeyMaterial::Ed25519(_) => "OKP Ed25519",
        };
        f.debug_struct("Jwk")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .field("kty", &kty)
            .finish()
    }
}

/// RFC 7518 §3.3: RSA keys below 2048 bits must not be used.
const MIN_RSA_BITS: usize = 2048;

impl Jwk {
    /// Whether this key can check a signature made with `alg`: the key
    /// type and curve fit, and a pinned `alg` is the same.
    pub fn fits(&self, alg: Algorithm) -> bool {
        if self.alg.is_some_and(|pinned| pinned != alg) {
            return false;
        }
        matches!(
            (&self.material, alg),
            (
                KeyMaterial::Rsa { .. },
                Algorithm::Rs256
                    | Algorithm::Rs384
                    | Algorithm::Rs512
                    | Algorithm::Ps256
                    | Algorithm::Ps384
                    | Algorithm::Ps512
            ) | (KeyMaterial::P256(_), Algorithm::Es256)
                | (KeyMaterial::P384(_), Algorithm::Es384)
                | (KeyMaterial::Ed25519(_), Algorithm::EdDsa)
        )
    }

    /// Whether `signature` over `message` was made with this key and `alg`.
    /// A key that does not fit `alg` verifies nothing.
    pub fn verify(&self, alg: Algorithm, message: &[u8], signature: &[u8]) -> bool {
        if !self.fits(alg) {
            return false;
        }
        match &self.material {
            KeyMaterial::Rsa { n, e } => {
                let params: &signature::RsaParameters = match alg {
                    Algorithm::Rs256 => &signature::RSA_PKCS1_2048_8192_SHA256,
                    Algorithm::Rs384 => &signature::RSA_PKCS1_2048_8192_SHA384,
                    Algorithm::Rs512 => &signature::RSA_PKCS1_2048_8192_SHA512,
                    Algorithm::Ps256 => &signature::RSA_PSS_2048_8192_SHA256,
                    Algorithm::Ps384 => &signature::RSA_PSS_2048_8192_SHA384,
                    Algorithm::Ps512 => &signature::RSA_PSS_2048_8192_SHA512,
                    _ => return false,
                };
                RsaPublicKeyComponents { n, e }
                    .verify(params, message, signature)
                    .is_ok()
            }
            KeyMaterial::P256(point) => {
                UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, point)
                    .verify(message, signature)
                    .is_ok()
            }
            KeyMaterial::P384(point) => {
                UnparsedPublicKey::new(&signature::ECDSA_P384_SHA384_FIXED, point)
                    .verify(message, signature)
                    .is_ok()
            }
            KeyMaterial::Ed25519(key) => UnparsedPublicKey::new(&signature::ED25519, key)
                .verify(message, signature)
                .is_ok(),
        }
    }
}

/// A parsed key set: the keys Postern can verify with, in set order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Jwks {
    keys: Vec<Jwk>,
    skipped: usize,
}

#[derive(serde::Deserialize)]
struct RawSet {
    keys: Vec<serde_json::Value>,
}

#[derive(serde::Deserialize)]
struct RawKey {
    kty: String,
    #[serde(default)]
    kid: Option<String>,
    #[serde(default)]
    alg: Option<String>,
    #[serde(default, rename = "use")]
    key_use: Option<String>,
    #[serde(default)]
    key_ops: Option<Vec<String>>,
    #[serde(default)]
    crv: Option<String>,
    #[serde(default)]
    n: Option<String>,
    #[serde(default)]
    e: Option<String>,
    #[serde(default)]
    x: Option<String>,
    #[serde(default)]
    y: Option<String>,
}

/// Decodes unpadded base64url, also taking padded input: some issuers pad.
fn b64url(text: &str) -> Option<Vec<u8>> {
    let engine = base64::engine::GeneralPurpose::new(
        &base64::alphabet::URL_SAFE,
        base64::engine::GeneralPurposeConfig::new()
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
    );
    engine.decode(text).ok()
}

/// Decodes a JOSE base64url segment (token parts use this too).
pub(crate) fn decode_segment(text: &str) -> Option<Vec<u8>> {
    b64url(text)
}

fn strip_leading_zeros(mut bytes: Vec<u8>) -> Vec<u8> {
    let first = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len());
    bytes.drain(..first);
    bytes
}

fn coordinate(text: Option<&str>, len: usize) -> Option<Vec<u8>> {
    b64url(text?).filter(|bytes| bytes.len() == len)
}

impl RawKey {
    fn into_jwk(self) -> Option<Jwk> {
        // A key meant for encryption must not vouch for a signature.
        if self.key_use.as_deref().is_some_and(|u| u != "sig") {
            return None;
        }
        if self
            .key_ops
            .as_ref()
            .is_some_and(|ops| !ops.iter().any(|op| op == "verify"))
        {
            return None;
        }
        let alg = match self.alg.as_deref() {
            None => None,
            Some(name) => Some(Algorithm::from_name(name).ok()?),
        };
        let material = match (self.kty.as_str(), self.crv.as_deref()) {
            ("RSA", _) => {
                let n = strip_leading_zeros(b64url(self.n.as_deref()?)?);
                let e = strip_leading_zeros(b64url(self.e.as_deref()?)?);
                if n.is_empty() || e.is_empty() {
                    return None;
                }
                let bits = n.len() * 8 - n.first().map_or(8, |b| b.leading_zeros() as usize);
                if bits < MIN_RSA_BITS {
                    return None;
                }
                KeyMaterial::Rsa { n, e }
            }
            ("EC", Some("P-256")) => {
                let mut point = vec![4];
                point.extend(coordinate(self.x.as_deref(), 32)?);
                point.extend(coordinate(self.y.as_deref(), 32)?);
                KeyMaterial::P256(point)
            }
            ("EC", Some("P-384")) => {
                let mut point = vec![4];
                point.extend(coordinate(self.x.as_deref(), 48)?);
                point.extend(coordinate(self.y.as_deref(), 48)?);
                KeyMaterial::P384(point)
            }
            ("OKP", Some("Ed25519")) => KeyMaterial::Ed25519(coordinate(self.x.as_deref(), 32)?),
            // `oct` (a shared secret) and everything else: never a verification key.
            _ => return None,
        };
        let jwk = Jwk {
            kid: self.kid,
            alg,
            material,
        };
        // A key pinned to an algorithm of another family is a mistake in the set.
        if let Some(alg) = alg {
            if !jwk.fits(alg) {
                return None;
            }
        }
        Some(jwk)
    }
}

impl Jwks {
    /// Parses a JWKS document. Keys Postern cannot verify with (symmetric,
    /// encryption-only, unknown type or curve, RSA under 2048 bits,
    /// malformed) are skipped; a set left with no key is an error.
    pub fn parse(text: &[u8]) -> Result<Jwks, JwksError> {
        let raw: RawSet = serde_json::from_slice(text).map_err(JwksError::Json)?;
        let total = raw.keys.len();
        let keys: Vec<Jwk> = raw
            .keys
            .into_iter()
            .filter_map(|value| serde_json::from_value::<RawKey>(value).ok()?.into_jwk())
            .collect();
        let skipped = total - keys.len();
        if keys.is_empty() {
            return Err(JwksError::NoUsableKey { skipped });
        }
        Ok(Jwks { keys, skipped })
    }

    /// The usable keys, in set order.
    pub fn keys(&self) -> &[Jwk] {
        &self.keys
    }

    /// How many keys of the document were skipped.
    pub fn skipped(&self) -> usize {
        self.skipped
    }

    /// Whether some key has this `kid`.
    pub fn has_kid(&self, kid: &str) -> bool {
        self.keys.iter().any(|k| k.kid.as_deref() == Some(kid))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn algorithm_names_refuse_none_and_hmac() {
        assert_eq!(Algorithm::from_name("ES256"), Ok(Algorithm::Es256));
        assert_eq!(Algorithm::from_name("none"), Err(AlgorithmError::None));
        assert!(matches!(
            Algorithm::from_name("HS256"),
            Err(AlgorithmError::Hmac(_))
        ));
        // Names are case-sensitive: "NONE" is merely unknown, never unsigned.
        assert!(matches!(
            Algorithm::from_name("NONE"),
            Err(AlgorithmError::Unsupported(_))
        ));
    }

    #[test]
    fn symmetric_encryption_and_weak_keys_are_skipped() {
        let small_n = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode([0xC5u8; 128]);
        let doc = serde_json::json!({"keys": [
            {"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"},
            {"kty": "RSA", "n": small_n, "e": "AQAB", "kid": "rsa1024"},
            {"kty": "EC", "crv": "P-256", "use": "enc",
             "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
             "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"},
            {"kty": "EC", "crv": "P-256", "kid": "ok",
             "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
             "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"},
            {"kty": "EC", "crv": "P-256", "alg": "RS256", "kid": "mispinned",
             "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
             "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"},
            {"kty": "EC", "crv": "P-256", "x": "AAAA", "y": "AAAA"},
            "not an object"
        ]});
        let jwks = Jwks::parse(doc.to_string().as_bytes()).unwrap();
        assert_eq!(jwks.keys().len(), 1);
        assert_eq!(jwks.skipped(), 6);
        assert!(jwks.has_kid("ok"));
        assert!(!jwks.has_kid("hmac"));
    }

    #[test]
    fn documents_without_usable_keys_are_errors() {
        assert!(matches!(Jwks::parse(b"{}"), Err(JwksError::Json(_))));
        assert!(matches!(Jwks::parse(b"not json"), Err(JwksError::Json(_))));
        assert!(matches!(
            Jwks::parse(br#"{"keys": [{"kty": "oct", "k": "AA"}]}"#),
            Err(JwksError::NoUsableKey { skipped: 1 })
        ));
        assert!(matches!(
            Jwks::parse(br#"{"keys": []}"#),
            Err(JwksError::NoUsableKey { skipped: 0 })
        ));
    }
}

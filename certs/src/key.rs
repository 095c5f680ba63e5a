//! Workload keys and certificate signing requests. Keys are generated in the
//! process and stay in memory.

use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::spiffe::SpiffeId;

/// The algorithm of a generated workload key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KeyAlgorithm {
    /// ECDSA on P-256 with SHA-256: the default, as in Istio and SPIRE.
    #[default]
    EcdsaP256,
    /// ECDSA on P-384 with SHA-384.
    EcdsaP384,
    /// Ed25519.
    Ed25519,
}

impl KeyAlgorithm {
    /// Config name of the algorithm.
    pub fn name(self) -> &'static str {
        match self {
            KeyAlgorithm::EcdsaP256 => "ecdsa_p256",
            KeyAlgorithm::EcdsaP384 => "ecdsa_p384",
            KeyAlgorithm::Ed25519 => "ed25519",
        }
    }

    fn rcgen(self) -> &'static rcgen::SignatureAlgorithm {
        match self {
            KeyAlgorithm::EcdsaP256 => &rcgen::PKCS_ECDSA_P256_SHA256,
            KeyAlgorithm::EcdsaP384 => &rcgen::PKCS_ECDSA_P384_SHA384,
            KeyAlgorithm::Ed25519 => &rcgen::PKCS_ED25519,
        }
    }
}

/// Key generation or CSR encoding failed.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {source}")]
pub struct KeyError {
    what: &'static str,
    #[source]
    source: rcgen::Error,
}

/// A private key generated in this process.
pub struct WorkloadKey {
    pair: KeyPair,
}

impl std::fmt::Debug for WorkloadKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        f.debug_struct("WorkloadKey").finish_non_exhaustive()
    }
}

impl WorkloadKey {
    /// Generates a fresh key.
    pub fn generate(algorithm: KeyAlgorithm) -> Result<WorkloadKey, KeyError> {
        let pair = KeyPair::generate_for(algorithm.rcgen()).map_err(|source| KeyError {
            what: "cannot generate key",
            source,
        })?;
        Ok(WorkloadKey { pair })
    }

    /// A PEM CSR for `id`: the SPIFFE ID as the only SAN, an empty subject.
    pub fn csr_pem(&self, id: &SpiffeId) -> Result<String, KeyError> {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        let uri = id.as_str().try_into().map_err(|source| KeyError {
            what: "SPIFFE ID is not an IA5 string",
            source,
        })?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        params
            .serialize_request(&self.pair)
            .and_then(|csr| csr.pem())
            .map_err(|source| KeyError {
                what: "cannot encode CSR",
                source,
            })
    }

    /// The key in PKCS#8 DER, for rustls.
    pub fn private_key_der(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.pair.serialize_der()))
    }
}

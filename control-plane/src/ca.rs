//! The mesh CA: signs workload CSRs and serves them over the Istio CA API.
//!
//! [`Ca`] holds the root certificate and key and turns a CSR into a short-lived
//! SPIFFE leaf certificate, refusing any identity the caller is not entitled
//! to. [`Authenticator`] maps bearer tokens to the one SPIFFE ID each may
//! request. [`CaService`] glues both to the generated
//! `istio.v1.auth.IstioCertificateService` gRPC server, and [`serve_ca`] runs
//! it on a listener.
//!
//! The CA endpoint is plaintext gRPC for now (tests run on loopback); TLS for
//! it comes later with the rest of the mTLS issue. Bearer tokens are therefore
//! only as safe as the network they cross.
//!
//! Boundaries: no key storage, rotation of the root, or revocation; the
//! proxy-side CSR generation and rotation live in `postern-certs`.

use std::collections::HashSet;
use std::fmt;
use std::future::Future;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use postern_certs::{SpiffeId, SpiffeIdError};
use postern_proto::istio::v1::auth::istio_certificate_service_server::{
    IstioCertificateService, IstioCertificateServiceServer,
};
use postern_proto::istio::v1::auth::{IstioCertificateRequest, IstioCertificateResponse};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use tonic::metadata::MetadataMap;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};
use x509_parser::pem::Pem;

#[cfg(test)]
mod tests;

/// Name of the counter of certificates the CA issued.
pub const CERTIFICATES_ISSUED_TOTAL: &str = "postern_ca_certificates_issued_total";
/// Name of the counter of CA requests refused, labelled by `reason`
/// (see [`CaError::reason`]; `unauthenticated` for a missing or unknown token).
pub const REQUESTS_REFUSED_TOTAL: &str = "postern_ca_requests_refused_total";

/// Common name of the root that [`Ca::self_signed`] creates.
pub const ROOT_COMMON_NAME: &str = "Postern Mesh CA";
/// Lifetime of the root that [`Ca::self_signed`] creates (10 years).
pub const ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 60 * 60);
/// Leaf lifetime when the caller asks for none.
pub const DEFAULT_LEAF_LIFETIME: Duration = Duration::from_secs(60 * 60);
/// Default cap on the leaf lifetime a caller may ask for.
pub const DEFAULT_MAX_LEAF_LIFETIME: Duration = Duration::from_secs(24 * 60 * 60);

/// How far `not_before` is backdated, so a peer whose clock runs slightly
/// behind ours does not reject a brand-new certificate. The lifetime is still
/// measured from now, so this does not lengthen it.
const CLOCK_SKEW: Duration = Duration::from_secs(30);
/// Refusal reason for a missing or unknown bearer token.
const REASON_UNAUTHENTICATED: &str = "unauthenticated";
/// Refusal reason for a malformed request (bad CSR, SANs or validity).
const REASON_INVALID_REQUEST: &str = "invalid_request";

/// Registers descriptions for the CA's metrics. Call once, from the binary,
/// after installing the recorder.
pub fn describe_metrics() {
    metrics::describe_counter!(
        CERTIFICATES_ISSUED_TOTAL,
        "Workload certificates issued by the CA"
    );
    metrics::describe_counter!(
        REQUESTS_REFUSED_TOTAL,
        "Certificate requests the CA refused, by reason"
    );
}

/// Why the CA could not be built, or refused or failed to sign.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// The trust domain given to the CA is not a valid SPIFFE trust domain.
    #[error("invalid trust domain {trust_domain:?}")]
    InvalidTrustDomain {
        /// The rejected trust domain.
        trust_domain: String,
        /// Why it was rejected.
        #[source]
        source: SpiffeIdError,
    },
    /// Generating the root key failed.
    #[error("could not generate the CA key")]
    KeyGeneration(#[source] rcgen::Error),
    /// Self-signing the root certificate failed.
    #[error("could not self-sign the CA certificate")]
    SelfSign(#[source] rcgen::Error),
    /// The CA private key PEM could not be parsed.
    #[error("could not parse the CA private key PEM (expected a PKCS#8 key)")]
    InvalidKey(#[source] rcgen::Error),
    /// The CA certificate PEM does not hold exactly one PEM block.
    #[error("the CA certificate PEM must hold exactly one certificate, found {0} PEM blocks")]
    RootPemCount(usize),
    /// The CA certificate PEM could not be decoded.
    #[error("could not decode the CA certificate PEM")]
    RootPem(#[source] x509_parser::error::PEMError),
    /// The CA certificate could not be parsed as X.509.
    #[error("could not parse the CA certificate")]
    InvalidRootCert(#[source] x509_parser::nom::Err<x509_parser::error::X509Error>),
    /// The CA certificate does not have basic constraints `cA=TRUE`.
    #[error("the CA certificate is not a CA certificate (basic constraints cA is not set)")]
    NotACa,
    /// The CA private key is not the key of the CA certificate.
    #[error("the CA private key does not match the CA certificate's public key")]
    KeyMismatch,
    /// rcgen could not use the CA certificate as an issuer.
    #[error("could not use the CA certificate as an issuer")]
    RootIssuer(#[source] rcgen::Error),
    /// The root has expired, so nothing it signs would verify.
    #[error("the CA certificate has expired; replace the root")]
    RootExpired,
    /// A bearer token in the token table is empty.
    #[error("empty bearer token for {identity}; every identity needs a non-empty token")]
    EmptyToken {
        /// The identity whose token is empty.
        identity: SpiffeId,
    },
    /// The same bearer token appears twice in the token table.
    #[error("bearer token for {identity} is already used by another entry; tokens must be unique")]
    DuplicateToken {
        /// The identity of the second entry with that token.
        identity: SpiffeId,
    },
    /// The CSR could not be parsed, carries an unsupported extension, or its
    /// signature does not verify.
    #[error("invalid csr")]
    InvalidCsr(#[source] rcgen::Error),
    /// The CSR does not carry exactly one URI SAN.
    #[error("csr must carry exactly one URI SAN (the SPIFFE ID), found {0}")]
    UriSanCount(usize),
    /// The CSR carries a SAN other than a URI.
    #[error("csr carries a {kind} SAN; only a single URI SAN (the SPIFFE ID) is allowed")]
    UnsupportedSan {
        /// The kind of SAN found, e.g. `DNS`.
        kind: &'static str,
    },
    /// The CSR asks for an identity the caller is not entitled to.
    #[error("csr requests identity {requested:?} but the caller is entitled only to {entitled}")]
    IdentityNotEntitled {
        /// The URI SAN the CSR asked for.
        requested: String,
        /// The identity the caller's credentials entitle it to.
        entitled: SpiffeId,
    },
    /// The entitled identity is outside the CA's trust domain.
    #[error("identity {entitled} is not in trust domain {ca_trust_domain:?}, the only one this CA signs for")]
    ForeignTrustDomain {
        /// The identity the caller is entitled to.
        entitled: SpiffeId,
        /// The CA's trust domain.
        ca_trust_domain: String,
    },
    /// Signing the leaf certificate failed.
    #[error("could not sign the certificate")]
    Sign(#[source] rcgen::Error),
    /// The CA's gRPC server failed.
    #[error("ca grpc server failed")]
    Serve(#[source] tonic::transport::Error),
}

impl CaError {
    /// A short, fixed label for this error, used as the `reason` label of
    /// [`REQUESTS_REFUSED_TOTAL`].
    pub fn reason(&self) -> &'static str {
        match self {
            CaError::InvalidCsr(_) | CaError::UriSanCount(_) | CaError::UnsupportedSan { .. } => {
                REASON_INVALID_REQUEST
            }
            CaError::IdentityNotEntitled { .. } => "identity_not_entitled",
            CaError::ForeignTrustDomain { .. } => "foreign_trust_domain",
            CaError::RootExpired => "root_expired",
            _ => "internal",
        }
    }

    /// The gRPC status for this error: `PERMISSION_DENIED` for identities the
    /// caller may not have, `INVALID_ARGUMENT` for malformed CSRs, `INTERNAL`
    /// otherwise. The message carries the whole cause chain.
    fn to_status(&self) -> Status {
        let message = error_chain(self);
        match self {
            CaError::IdentityNotEntitled { .. } | CaError::ForeignTrustDomain { .. } => {
                Status::permission_denied(message)
            }
            CaError::InvalidCsr(_) | CaError::UriSanCount(_) | CaError::UnsupportedSan { .. } => {
                Status::invalid_argument(message)
            }
            _ => Status::internal(message),
        }
    }

    /// Whether this is the CA's own fault (it needs an operator) rather than
    /// the caller's.
    fn is_internal(&self) -> bool {
        !matches!(
            self,
            CaError::InvalidCsr(_)
                | CaError::UriSanCount(_)
                | CaError::UnsupportedSan { .. }
                | CaError::IdentityNotEntitled { .. }
                | CaError::ForeignTrustDomain { .. }
        )
    }
}

/// `err: cause: cause`, so a gRPC caller sees why, not just what.
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut message = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}

/// A mesh CA: a root certificate and key, the trust domain it signs for, and
/// the leaf lifetimes it grants.
pub struct Ca {
    trust_domain: String,
    issuer: Issuer<'static, KeyPair>,
    root_pem: String,
    root_not_after: SystemTime,
    default_lifetime: Duration,
    max_lifetime: Duration,
}

impl fmt::Debug for Ca {
    // Hand-written so the root key can never end up in a log line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ca")
            .field("trust_domain", &self.trust_domain)
            .field("root_not_after", &self.root_not_after)
            .field("default_lifetime", &self.default_lifetime)
            .field("max_lifetime", &self.max_lifetime)
            .finish_non_exhaustive()
    }
}

/// A signed leaf, with what the service logs about it.
struct Issued {
    /// PEM chain: leaf, then root.
    chain: Vec<String>,
    /// Serial number in lowercase hex.
    serial: String,
    not_after: SystemTime,
}

impl Ca {
    /// Creates a CA with a fresh ECDSA P-256 root: CN "Postern Mesh CA",
    /// basic constraints CA, key usages keyCertSign and cRLSign, valid for
    /// [`ROOT_LIFETIME`]. Leaves default to [`DEFAULT_LEAF_LIFETIME`] and are
    /// capped at [`DEFAULT_MAX_LEAF_LIFETIME`].
    ///
    /// # Errors
    ///
    /// [`CaError::InvalidTrustDomain`] if `trust_domain` is not a valid SPIFFE
    /// trust domain; [`CaError::KeyGeneration`] or [`CaError::SelfSign`] if
    /// the crypto fails.
    pub fn self_signed(trust_domain: &str) -> Result<Ca, CaError> {
        validate_trust_domain(trust_domain)?;
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(CaError::KeyGeneration)?;
        let now = SystemTime::now();
        let not_after = now + ROOT_LIFETIME;
        let mut params = CertificateParams::default();
        let mut name = DistinguishedName::new();
        name.push(DnType::CommonName, ROOT_COMMON_NAME);
        name.push(DnType::OrganizationName, "postern");
        params.distinguished_name = name;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.not_before = (now - CLOCK_SKEW).into();
        params.not_after = not_after.into();
        params.serial_number = Some(random_serial().0);
        let cert = params.self_signed(&key).map_err(CaError::SelfSign)?;
        Ok(Ca {
            trust_domain: trust_domain.to_owned(),
            issuer: Issuer::new(params, key),
            root_pem: cert.pem(),
            // The certificate stores whole seconds; the signing path only
            // compares against it, so sub-second precision is irrelevant.
            root_not_after: not_after,
            default_lifetime: DEFAULT_LEAF_LIFETIME,
            max_lifetime: DEFAULT_MAX_LEAF_LIFETIME,
        })
    }

    /// Loads a CA from a PEM root certificate and its PEM (PKCS#8) private
    /// key. The trust domain is given explicitly because a root certificate
    /// need not name one. Lifetimes default as in [`Ca::self_signed`].
    ///
    /// # Errors
    ///
    /// [`CaError::InvalidTrustDomain`]; [`CaError::InvalidKey`] for an
    /// unreadable key; [`CaError::RootPem`], [`CaError::RootPemCount`] or
    /// [`CaError::InvalidRootCert`] unless `cert_pem` is exactly one X.509
    /// certificate; [`CaError::NotACa`] if it is not a CA certificate;
    /// [`CaError::KeyMismatch`] if the key is not the certificate's key;
    /// [`CaError::RootIssuer`] if rcgen cannot sign with it.
    pub fn from_pem(trust_domain: &str, cert_pem: &str, key_pem: &str) -> Result<Ca, CaError> {
        validate_trust_domain(trust_domain)?;
        let key = KeyPair::from_pem(key_pem).map_err(CaError::InvalidKey)?;
        let blocks = Pem::iter_from_buffer(cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(CaError::RootPem)?;
        let [block] = blocks.as_slice() else {
            return Err(CaError::RootPemCount(blocks.len()));
        };
        let x509 = block.parse_x509().map_err(CaError::InvalidRootCert)?;
        if !x509.is_ca() {
            return Err(CaError::NotACa);
        }
        if x509.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(CaError::KeyMismatch);
        }
        // A pre-1970 expiry is as expired as any.
        let root_not_after = u64::try_from(x509.validity().not_after.timestamp())
            .map_or(UNIX_EPOCH, |secs| UNIX_EPOCH + Duration::from_secs(secs));
        let issuer = Issuer::from_ca_cert_der(&block.contents.as_slice().into(), key)
            .map_err(CaError::RootIssuer)?;
        Ok(Ca {
            trust_domain: trust_domain.to_owned(),
            issuer,
            root_pem: format!("{}\n", cert_pem.trim()),
            root_not_after,
            default_lifetime: DEFAULT_LEAF_LIFETIME,
            max_lifetime: DEFAULT_MAX_LEAF_LIFETIME,
        })
    }

    /// Sets the leaf lifetime used when the caller asks for none (default
    /// [`DEFAULT_LEAF_LIFETIME`]). It is still capped by the maximum.
    pub fn with_default_lifetime(mut self, lifetime: Duration) -> Ca {
        self.default_lifetime = lifetime;
        self
    }

    /// Sets the longest leaf lifetime granted, whatever the caller asks for
    /// (default [`DEFAULT_MAX_LEAF_LIFETIME`]).
    pub fn with_max_lifetime(mut self, lifetime: Duration) -> Ca {
        self.max_lifetime = lifetime;
        self
    }

    /// The trust domain this CA signs for, e.g. `cluster.local`.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The root certificate in PEM, the trust anchor for every leaf.
    pub fn root_pem(&self) -> &str {
        &self.root_pem
    }

    /// Signs `csr_pem` for `entitled` and returns the PEM chain: leaf, then
    /// root.
    ///
    /// The CSR must carry exactly one SAN, a URI equal to `entitled`; only
    /// its public key is used. The leaf has an empty subject (so its SAN is
    /// critical), that URI SAN only, a random positive 16-byte serial, key
    /// usages digitalSignature and keyEncipherment, EKUs serverAuth and
    /// clientAuth, and is not a CA. It is valid from 30 s ago (clock skew)
    /// until now plus `requested` (`None` or zero: the default lifetime),
    /// capped by the maximum lifetime and by the root's expiry.
    ///
    /// # Errors
    ///
    /// [`CaError::ForeignTrustDomain`] if `entitled` is outside the CA's trust
    /// domain; [`CaError::InvalidCsr`], [`CaError::UnsupportedSan`] or
    /// [`CaError::UriSanCount`] for a malformed CSR;
    /// [`CaError::IdentityNotEntitled`] if it asks for another identity;
    /// [`CaError::RootExpired`] or [`CaError::Sign`] if the CA cannot sign.
    pub fn sign_csr(
        &self,
        csr_pem: &str,
        entitled: &SpiffeId,
        requested: Option<Duration>,
    ) -> Result<Vec<String>, CaError> {
        self.issue(csr_pem, entitled, requested)
            .map(|issued| issued.chain)
    }

    fn issue(
        &self,
        csr_pem: &str,
        entitled: &SpiffeId,
        requested: Option<Duration>,
    ) -> Result<Issued, CaError> {
        if entitled.trust_domain() != self.trust_domain {
            return Err(CaError::ForeignTrustDomain {
                entitled: entitled.clone(),
                ca_trust_domain: self.trust_domain.clone(),
            });
        }
        let csr =
            CertificateSigningRequestParams::from_pem(csr_pem).map_err(CaError::InvalidCsr)?;
        let uri = single_uri_san(&csr.params.subject_alt_names)?;
        if uri != entitled.as_str() {
            return Err(CaError::IdentityNotEntitled {
                requested: uri.to_owned(),
                entitled: entitled.clone(),
            });
        }

        let now = SystemTime::now();
        if self.root_not_after <= now {
            return Err(CaError::RootExpired);
        }
        let lifetime = requested
            .filter(|d| !d.is_zero())
            .unwrap_or(self.default_lifetime)
            .min(self.max_lifetime);
        // A leaf outliving its root would fail verification at the end anyway;
        // clamping makes the expiry the client sees the real one.
        let not_after = (now + lifetime).min(self.root_not_after);
        let (serial, serial_bytes) = random_serial();

        // Only the CSR's public key is used: everything else in the leaf is
        // the CA's decision, whatever extensions the CSR asked for.
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = csr.params.subject_alt_names;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.not_before = (now - CLOCK_SKEW).into();
        params.not_after = not_after.into();
        params.serial_number = Some(serial);
        let leaf = CertificateSigningRequestParams {
            params,
            public_key: csr.public_key,
        }
        .signed_by(&self.issuer)
        .map_err(CaError::Sign)?;

        Ok(Issued {
            chain: vec![leaf.pem(), self.root_pem.clone()],
            serial: serial_bytes.iter().map(|b| format!("{b:02x}")).collect(),
            not_after,
        })
    }
}

/// Checks `trust_domain` by the SPIFFE rules `postern-certs` implements.
fn validate_trust_domain(trust_domain: &str) -> Result<(), CaError> {
    // `SpiffeId` validates whole IDs only; any valid path isolates the trust
    // domain's checks.
    SpiffeId::parse(&format!("spiffe://{trust_domain}/ca"))
        .map(drop)
        .map_err(|source| CaError::InvalidTrustDomain {
            trust_domain: trust_domain.to_owned(),
            source,
        })
}

/// The one URI SAN of a CSR; any other SAN kind is refused.
fn single_uri_san(sans: &[SanType]) -> Result<&str, CaError> {
    let mut uris = Vec::with_capacity(1);
    for san in sans {
        let kind = match san {
            SanType::URI(uri) => {
                uris.push(uri.as_str());
                continue;
            }
            SanType::DnsName(_) => "DNS",
            SanType::IpAddress(_) => "IP address",
            SanType::Rfc822Name(_) => "email",
            SanType::OtherName(_) => "otherName",
            _ => "unknown",
        };
        return Err(CaError::UnsupportedSan { kind });
    }
    match uris.as_slice() {
        [uri] => Ok(uri),
        _ => Err(CaError::UriSanCount(uris.len())),
    }
}

/// 16 random bytes with the top bit cleared, so the DER INTEGER is positive
/// and at most 16 bytes long. Returns the serial and its bytes.
fn random_serial() -> (SerialNumber, [u8; 16]) {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] &= 0x7f;
    (SerialNumber::from_slice(&bytes), bytes)
}

/// Maps bearer tokens to the one SPIFFE ID each entitles its holder to.
///
/// Lookups compare the presented token against every entry in constant time
/// per entry, so response timing does not reveal how much of a token matched.
pub struct Authenticator {
    entries: Vec<(Box<[u8]>, SpiffeId)>,
}

impl fmt::Debug for Authenticator {
    // Hand-written so tokens never end up in a log line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.entries.iter().map(|(_, id)| id))
            .finish()
    }
}

impl Authenticator {
    /// Builds the table from `(token, identity)` pairs. Several tokens may
    /// map to one identity.
    ///
    /// # Errors
    ///
    /// [`CaError::EmptyToken`] for an empty token (it would match an empty
    /// `Bearer` header); [`CaError::DuplicateToken`] if a token repeats, since
    /// one token cannot entitle two identities.
    pub fn new<I, T>(pairs: I) -> Result<Authenticator, CaError>
    where
        I: IntoIterator<Item = (T, SpiffeId)>,
        T: Into<String>,
    {
        let mut seen = HashSet::new();
        let mut entries = Vec::new();
        for (token, identity) in pairs {
            let token: String = token.into();
            if token.is_empty() {
                return Err(CaError::EmptyToken { identity });
            }
            if !seen.insert(token.clone()) {
                return Err(CaError::DuplicateToken { identity });
            }
            entries.push((token.into_bytes().into_boxed_slice(), identity));
        }
        Ok(Authenticator { entries })
    }

    /// The identity `token` entitles its holder to, or `None` for an unknown
    /// token.
    pub fn authenticate(&self, token: &str) -> Option<&SpiffeId> {
        let token = token.as_bytes();
        let mut found = None;
        // No early exit: every entry is compared, whatever matched before.
        for (known, identity) in &self.entries {
            if constant_time_eq(known, token) && found.is_none() {
                found = Some(identity);
            }
        }
        found
    }
}

/// Byte equality whose time depends only on the lengths, not on where the
/// inputs differ. Best effort: `black_box` keeps the optimiser from turning
/// the fold back into an early-exit compare.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// The token of an `authorization: Bearer <token>` header, if there is one.
fn bearer_token(metadata: &MetadataMap) -> Option<&str> {
    let value = metadata.get("authorization")?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    // The auth scheme is case-insensitive (RFC 9110 section 11.1).
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let token = token.trim();
    (!token.is_empty()).then_some(token)
}

/// The Istio CA gRPC service: authenticates the caller's bearer token and
/// signs its CSR with the [`Ca`] for the identity the token entitles it to.
///
/// Mount it with [`CaService::into_server`] (or
/// `IstioCertificateServiceServer::new(service)`) on any tonic server, or run
/// it alone with [`serve_ca`].
#[derive(Debug)]
pub struct CaService {
    ca: Ca,
    authenticator: Authenticator,
}

impl CaService {
    /// A service signing with `ca` for the callers `authenticator` knows.
    pub fn new(ca: Ca, authenticator: Authenticator) -> CaService {
        CaService { ca, authenticator }
    }

    /// The CA this service signs with.
    pub fn ca(&self) -> &Ca {
        &self.ca
    }

    /// Wraps the service in the generated tonic server, ready for
    /// `tonic::transport::Server::add_service`.
    pub fn into_server(self) -> IstioCertificateServiceServer<CaService> {
        IstioCertificateServiceServer::new(self)
    }
}

#[tonic::async_trait]
impl IstioCertificateService for CaService {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let peer = request.remote_addr();
        let Some(entitled) = bearer_token(request.metadata())
            .and_then(|token| self.authenticator.authenticate(token))
        else {
            metrics::counter!(REQUESTS_REFUSED_TOTAL, "reason" => REASON_UNAUTHENTICATED)
                .increment(1);
            tracing::warn!(
                ?peer,
                "refused certificate request: missing or unknown bearer token"
            );
            return Err(Status::unauthenticated(
                "missing or unknown bearer token; send `authorization: Bearer <token>`",
            ));
        };
        let request = request.into_inner();
        let requested = match u64::try_from(request.validity_duration) {
            Ok(0) => None,
            Ok(secs) => Some(Duration::from_secs(secs)),
            Err(_) => {
                metrics::counter!(REQUESTS_REFUSED_TOTAL, "reason" => REASON_INVALID_REQUEST)
                    .increment(1);
                tracing::warn!(
                    ?peer,
                    identity = %entitled,
                    validity_duration = request.validity_duration,
                    "refused certificate request: negative validity duration"
                );
                return Err(Status::invalid_argument(format!(
                    "validity_duration must be zero (default) or a positive number of seconds, got {}",
                    request.validity_duration
                )));
            }
        };

        // P-256 signing takes microseconds, so it runs inline rather than on
        // the blocking pool.
        match self.ca.issue(&request.csr, entitled, requested) {
            Ok(issued) => {
                metrics::counter!(CERTIFICATES_ISSUED_TOTAL).increment(1);
                tracing::info!(
                    ?peer,
                    identity = %entitled,
                    serial = %issued.serial,
                    not_after = %humantime::format_rfc3339_seconds(issued.not_after),
                    "issued workload certificate"
                );
                Ok(Response::new(IstioCertificateResponse {
                    cert_chain: issued.chain,
                }))
            }
            Err(err) => {
                metrics::counter!(REQUESTS_REFUSED_TOTAL, "reason" => err.reason()).increment(1);
                if err.is_internal() {
                    tracing::error!(?peer, identity = %entitled, error = %error_chain(&err), "could not sign certificate");
                } else {
                    tracing::warn!(?peer, identity = %entitled, error = %error_chain(&err), "refused certificate request");
                }
                Err(err.to_status())
            }
        }
    }
}

/// Serves `service` as plaintext gRPC on `listener` until `shutdown`
/// completes, then drains open connections and returns.
///
/// TLS for the CA endpoint comes later; until then bind it to loopback or a
/// trusted network only.
///
/// # Errors
///
/// [`CaError::Serve`] if the gRPC server fails.
pub async fn serve_ca(
    listener: tokio::net::TcpListener,
    service: CaService,
    shutdown: impl Future<Output = ()>,
) -> Result<(), CaError> {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, trust_domain = service.ca.trust_domain(), "ca serving");
    }
    tonic::transport::Server::builder()
        .add_service(service.into_server())
        .serve_with_incoming_shutdown(TcpIncoming::from(listener), shutdown)
        .await
        .map_err(CaError::Serve)
}

//! Peer certificate checks for the mesh: chain to the trust bundle, validity
//! window, and the SPIFFE ID in the URI SAN. DNS names play no part.

use std::fmt;
use std::sync::Arc;

use rustls_pki_types::{CertificateDer, TrustAnchor, UnixTime};
use webpki::{EndEntityCert, KeyUsage};

use crate::spiffe::SpiffeId;
use crate::x509::{parse_pem_chain, CertError, CertInfo};

/// Root certificates that peers must chain to. Several roots may be trusted
/// at once, so a CA can rotate without a flag day.
#[derive(Debug, Clone)]
pub struct TrustBundle {
    roots: Vec<CertificateDer<'static>>,
    anchors: Vec<TrustAnchor<'static>>,
}

impl TrustBundle {
    /// A bundle from one or more PEM root certificates.
    pub fn from_pem(pem: &[u8]) -> Result<TrustBundle, CertError> {
        TrustBundle::from_der(parse_pem_chain(pem, "trust bundle")?)
    }

    /// A bundle from DER root certificates.
    pub fn from_der(roots: Vec<CertificateDer<'static>>) -> Result<TrustBundle, CertError> {
        if roots.is_empty() {
            return Err(CertError::Empty("trust bundle"));
        }
        let anchors = roots
            .iter()
            .map(|root| {
                webpki::anchor_from_trusted_cert(root)
                    .map(|anchor| anchor.to_owned())
                    .map_err(|e| CertError::Malformed(format!("trust bundle root: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(TrustBundle { roots, anchors })
    }

    /// The root certificates, DER.
    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    /// Fields of each root, for `/certs`.
    pub fn infos(&self) -> Vec<CertInfo> {
        self.roots
            .iter()
            .filter_map(|root| CertInfo::parse(root).ok())
            .collect()
    }
}

/// Why a peer's certificate is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerError {
    /// The chain does not lead to any root in the trust bundle.
    #[error("certificate is not signed by a trusted CA")]
    UntrustedIssuer,
    /// Past its `not_after`.
    #[error("certificate has expired")]
    Expired,
    /// Before its `not_before`.
    #[error("certificate is not valid yet")]
    NotYetValid,
    /// Valid chain, but no usable SPIFFE ID.
    #[error("{0}")]
    NoSpiffeId(String),
    /// Valid chain and SPIFFE ID, but not one this side accepts.
    #[error("peer identity {got} is not allowed (expected {expected})")]
    WrongIdentity {
        /// The peer's ID.
        got: SpiffeId,
        /// What was accepted, comma separated.
        expected: String,
    },
    /// The certificate or chain does not parse or verify otherwise.
    #[error("bad certificate: {0}")]
    BadCertificate(String),
    /// This side has no trust bundle yet (identity not loaded).
    #[error("no trust bundle loaded yet")]
    NoTrustBundle,
}

impl PeerError {
    /// A short, bounded label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            PeerError::UntrustedIssuer => "untrusted_ca",
            PeerError::Expired => "expired",
            PeerError::NotYetValid => "not_yet_valid",
            PeerError::NoSpiffeId(_) => "no_spiffe_id",
            PeerError::WrongIdentity { .. } => "wrong_identity",
            PeerError::BadCertificate(_) => "bad_certificate",
            PeerError::NoTrustBundle => "no_trust_bundle",
        }
    }
}

/// Which SPIFFE IDs a side accepts from its peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AllowedPeers {
    /// Any ID whose chain leads to the bundle.
    Any,
    /// Any ID of this trust domain whose chain leads to the bundle (a
    /// federated or multi-root bundle may hold other domains' roots).
    TrustDomain(Arc<str>),
    /// Only these.
    Only(Arc<[SpiffeId]>),
}

impl AllowedPeers {
    fn check(&self, id: SpiffeId) -> Result<SpiffeId, PeerError> {
        match self {
            AllowedPeers::Any => Ok(id),
            AllowedPeers::TrustDomain(td) if id.trust_domain() == &**td => Ok(id),
            AllowedPeers::TrustDomain(td) => Err(PeerError::WrongIdentity {
                got: id,
                expected: format!("any ID in trust domain {td}"),
            }),
            AllowedPeers::Only(allowed) if allowed.contains(&id) => Ok(id),
            AllowedPeers::Only(allowed) => Err(PeerError::WrongIdentity {
                got: id,
                expected: Joined(allowed).to_string(),
            }),
        }
    }
}

struct Joined<'a>(&'a [SpiffeId]);

impl fmt::Display for Joined<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, id) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{id}")?;
        }
        Ok(())
    }
}

/// The role the peer's certificate must be fit for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerRole {
    /// The peer is a TLS client (inbound mTLS).
    Client,
    /// The peer is a TLS server (outbound mTLS).
    Server,
}

/// Checks a peer's chain against `bundle` at `now` and returns its SPIFFE ID
/// if `allowed` accepts it.
pub fn verify_peer(
    bundle: &TrustBundle,
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    now: UnixTime,
    role: PeerRole,
    allowed: &AllowedPeers,
) -> Result<SpiffeId, PeerError> {
    let cert = EndEntityCert::try_from(end_entity)
        .map_err(|e| PeerError::BadCertificate(e.to_string()))?;
    let usage = match role {
        PeerRole::Client => KeyUsage::client_auth(),
        PeerRole::Server => KeyUsage::server_auth(),
    };
    let algorithms = rustls::crypto::ring::default_provider()
        .signature_verification_algorithms
        .all;
    cert.verify_for_usage(
        algorithms,
        &bundle.anchors,
        intermediates,
        now,
        usage,
        None,
        None,
    )
    .map_err(|e| match e {
        webpki::Error::UnknownIssuer => PeerError::UntrustedIssuer,
        webpki::Error::CertExpired { .. } => PeerError::Expired,
        webpki::Error::CertNotValidYet { .. } => PeerError::NotYetValid,
        other => PeerError::BadCertificate(other.to_string()),
    })?;
    let id = CertInfo::parse(end_entity)
        .and_then(|info| info.spiffe_id())
        .map_err(|e| PeerError::NoSpiffeId(e.to_string()))?;
    allowed.check(id)
}

/// The SPIFFE ID of an already verified peer chain, leaf first.
pub fn peer_spiffe_id(chain: &[CertificateDer<'_>]) -> Option<SpiffeId> {
    let leaf = chain.first()?;
    CertInfo::parse(leaf).ok()?.spiffe_id().ok()
}

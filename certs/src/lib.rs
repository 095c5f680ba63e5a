//! Workload identity for Postern: SPIFFE IDs, key and CSR generation,
//! certificate parsing and checks, trust bundles, the rotation loop, and the
//! rustls configs whose resolvers read the current identity. Knows nothing of
//! HTTP.

pub mod identity;
pub mod istio_ca;
pub mod key;
pub mod rotation;
pub mod source;
pub mod spiffe;
pub mod tls;
pub mod verify;
pub mod x509;

pub use identity::{Identity, IdentityError, IdentityHandle};
pub use istio_ca::{IstioCaSettings, IstioCaSource};
pub use key::{KeyAlgorithm, WorkloadKey};
pub use rotation::{RotationPolicy, Rotator};
pub use source::{
    identity_from_pem, CertSource, FileSource, IssueRequest, SdsSecrets, SdsSource, SourceError,
};
pub use spiffe::{SpiffeId, SpiffeIdError};
pub use verify::{peer_spiffe_id, verify_peer, AllowedPeers, PeerError, PeerRole, TrustBundle};
pub use x509::{CertError, CertInfo};

#[cfg(test)]
mod tests;

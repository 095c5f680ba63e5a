//! The workload's current identity: certificate chain, key and trust bundle,
//! held in an atomically swapped cell that TLS handshakes read.

use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::ArcSwapOption;
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use tokio::sync::watch;

use crate::spiffe::SpiffeId;
use crate::verify::{verify_peer, AllowedPeers, PeerError, PeerRole, TrustBundle};
use crate::x509::{CertError, CertInfo};

/// An identity that cannot be installed.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The chain or key does not parse.
    #[error(transparent)]
    Cert(#[from] CertError),
    /// The key is not one rustls can sign with, or does not match the leaf.
    #[error("private key unusable: {0}")]
    Key(String),
    /// The leaf does not chain to the bundle, or is out of its validity window.
    #[error("certificate chain rejected: {0}")]
    Chain(#[source] PeerError),
    /// The certificate is for another workload.
    #[error("certificate is for {got}, expected {expected}")]
    WrongIdentity {
        /// The leaf's ID.
        got: SpiffeId,
        /// The configured ID.
        expected: SpiffeId,
    },
}

/// A certified key for one SPIFFE ID, with the bundle its peers chain to.
#[derive(Debug)]
pub struct Identity {
    /// The workload's SPIFFE ID, from the leaf's URI SAN.
    pub id: SpiffeId,
    /// Leaf fields.
    pub info: CertInfo,
    /// Chain and signing key, as rustls presents them.
    pub certified: Arc<CertifiedKey>,
    /// Roots that peers must chain to.
    pub bundle: Arc<TrustBundle>,
    /// Where it came from, e.g. `istio_ca` or `files`.
    pub source: &'static str,
    /// When it was installed.
    pub loaded_at: SystemTime,
}

impl Identity {
    /// Checks that chain, key and bundle fit together (the leaf chains to the
    /// bundle and is valid now, the key matches it) and builds the identity.
    pub fn new(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        bundle: Arc<TrustBundle>,
        source: &'static str,
    ) -> Result<Identity, IdentityError> {
        let leaf = chain.first().ok_or(CertError::Empty("certificate chain"))?;
        let info = CertInfo::parse(leaf)?;
        let id = info.spiffe_id()?;
        verify_peer(
            &bundle,
            leaf,
            &chain[1..],
            UnixTime::now(),
            PeerRole::Client,
            &AllowedPeers::Any,
        )
        .map_err(IdentityError::Chain)?;
        let signer = rustls::crypto::ring::sign::any_supported_type(&key)
            .map_err(|e| IdentityError::Key(e.to_string()))?;
        let certified = CertifiedKey::new(chain, signer);
        certified
            .keys_match()
            .map_err(|e| IdentityError::Key(e.to_string()))?;
        Ok(Identity {
            id,
            info,
            certified: Arc::new(certified),
            bundle,
            source,
            loaded_at: SystemTime::now(),
        })
    }

    /// Checks the identity is the configured one.
    pub fn expect(self, expected: &SpiffeId) -> Result<Identity, IdentityError> {
        if &self.id == expected {
            Ok(self)
        } else {
            Err(IdentityError::WrongIdentity {
                got: self.id,
                expected: expected.clone(),
            })
        }
    }
}

/// The current identity, swapped atomically on rotation. Handshakes read it;
/// open connections keep what they negotiated.
#[derive(Debug)]
pub struct IdentityHandle {
    current: ArcSwapOption<Identity>,
    generation: watch::Sender<u64>,
}

impl IdentityHandle {
    /// An empty handle: no identity until the first install.
    pub fn new() -> Arc<IdentityHandle> {
        Arc::new(IdentityHandle {
            current: ArcSwapOption::empty(),
            generation: watch::channel(0).0,
        })
    }

    /// The identity handshakes use now, if one is loaded.
    pub fn current(&self) -> Option<Arc<Identity>> {
        self.current.load_full()
    }

    /// Replaces the identity; new handshakes use it at once.
    pub fn install(&self, identity: Identity) {
        self.current.store(Some(Arc::new(identity)));
        self.generation.send_modify(|g| *g += 1);
    }

    /// How many identities have been installed so far.
    pub fn generation(&self) -> u64 {
        *self.generation.borrow()
    }

    /// Resolves once an identity is loaded.
    pub async fn loaded(&self) {
        let mut rx = self.generation.subscribe();
        // The sender lives in `self`, so `wait_for` cannot fail here.
        let _ = rx.wait_for(|g| *g > 0).await;
    }

    /// Notified on every install.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }
}

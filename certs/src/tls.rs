//! rustls glue for the mesh: cert resolvers that read the current identity,
//! and verifiers that check peers by SPIFFE ID against the trust bundle.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::ResolvesClientCert;
use rustls::crypto::CryptoProvider;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, Error, OtherError,
    ServerConfig, SignatureScheme,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use crate::identity::IdentityHandle;
use crate::verify::{verify_peer, AllowedPeers, PeerError, PeerRole};

/// The one crypto provider Postern uses (ring).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Presents the current identity's chain, as server and as client.
#[derive(Debug)]
pub struct IdentityResolver(pub Arc<IdentityHandle>);

impl ResolvesServerCert for IdentityResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.current().map(|identity| identity.certified.clone())
    }
}

impl ResolvesClientCert for IdentityResolver {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.0.current().map(|identity| identity.certified.clone())
    }

    fn has_certs(&self) -> bool {
        self.0.current().is_some()
    }
}

/// Checks client certificates by SPIFFE ID, against the identity's bundle.
#[derive(Debug)]
pub struct SpiffeClientVerifier {
    identity: Arc<IdentityHandle>,
    allowed: AllowedPeers,
    mandatory: bool,
    provider: Arc<CryptoProvider>,
}

/// Checks server certificates by SPIFFE ID, against the identity's bundle.
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    identity: Arc<IdentityHandle>,
    allowed: AllowedPeers,
    provider: Arc<CryptoProvider>,
}

fn verify(
    identity: &IdentityHandle,
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    now: UnixTime,
    role: PeerRole,
    allowed: &AllowedPeers,
) -> Result<(), Error> {
    let current = identity
        .current()
        .ok_or_else(|| to_rustls(PeerError::NoTrustBundle))?;
    verify_peer(
        &current.bundle,
        end_entity,
        intermediates,
        now,
        role,
        allowed,
    )
    .map(|_| ())
    .map_err(to_rustls)
}

/// Standard variants where one fits, so the peer gets the right alert; the
/// rest carry the `PeerError` for `failure_reason`.
fn to_rustls(err: PeerError) -> Error {
    let cert_error = match err {
        PeerError::UntrustedIssuer => CertificateError::UnknownIssuer,
        PeerError::Expired => CertificateError::Expired,
        PeerError::NotYetValid => CertificateError::NotValidYet,
        other => CertificateError::Other(OtherError(Arc::new(other))),
    };
    Error::InvalidCertificate(cert_error)
}

/// A bounded label for a failed handshake, for metrics and logs: the same
/// names as `PeerError::reason`, plus `no_client_cert`, `peer_rejected`
/// (the peer refused us) and `handshake` (anything else).
pub fn failure_reason(err: &Error) -> &'static str {
    match err {
        Error::NoCertificatesPresented => "no_client_cert",
        Error::InvalidCertificate(cert) => match cert {
            CertificateError::UnknownIssuer => "untrusted_ca",
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => "expired",
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "not_yet_valid"
            }
            CertificateError::Other(OtherError(inner)) => inner
                .downcast_ref::<PeerError>()
                .map_or("bad_certificate", PeerError::reason),
            _ => "bad_certificate",
        },
        Error::AlertReceived(_) => "peer_rejected",
        _ => "handshake",
    }
}

impl SpiffeClientVerifier {
    /// Accepts clients whose SPIFFE ID `allowed` takes; `mandatory` false
    /// lets clients without a certificate through (they have no identity).
    pub fn new(identity: Arc<IdentityHandle>, allowed: AllowedPeers, mandatory: bool) -> Self {
        SpiffeClientVerifier {
            identity,
            allowed,
            mandatory,
            provider: provider(),
        }
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        verify(
            &self.identity,
            end_entity,
            intermediates,
            now,
            PeerRole::Client,
            &self.allowed,
        )
        .map(|()| ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

impl SpiffeServerVerifier {
    /// Accepts servers whose SPIFFE ID `allowed` takes.
    pub fn new(identity: Arc<IdentityHandle>, allowed: AllowedPeers) -> Self {
        SpiffeServerVerifier {
            identity,
            allowed,
            provider: provider(),
        }
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        // Mesh peers are named by SPIFFE ID, not DNS: the SNI is only a hint.
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        verify(
            &self.identity,
            end_entity,
            intermediates,
            now,
            PeerRole::Server,
            &self.allowed,
        )
        .map(|()| ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Server side of mesh mTLS: presents the current identity and checks the
/// client's SPIFFE ID. TLS 1.2 and 1.3 with ring's default (AEAD-only) suites.
/// No session resumption: a resumed session skips the client's
/// certificate, so a peer could keep calling on one that has expired, or
/// whose root left the bundle, for as long as the session lived. Mesh
/// connections are long-lived and multiplexed, so a full handshake each
/// costs little.
pub fn mesh_server_config(
    identity: Arc<IdentityHandle>,
    allowed: AllowedPeers,
    alpn: Vec<Vec<u8>>,
) -> Result<ServerConfig, Error> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_client_cert_verifier(Arc::new(SpiffeClientVerifier::new(
            identity.clone(),
            allowed,
            true,
        )))
        .with_cert_resolver(Arc::new(IdentityResolver(identity)));
    config.alpn_protocols = alpn;
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(config)
}

/// Client side of mesh mTLS: presents the current identity and checks the
/// server's SPIFFE ID against `allowed`, on every connection: no session
/// resumption, for the reason [`mesh_server_config`] gives.
pub fn mesh_client_config(
    identity: Arc<IdentityHandle>,
    allowed: AllowedPeers,
    alpn: Vec<Vec<u8>>,
) -> Result<ClientConfig, Error> {
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier::new(
            identity.clone(),
            allowed,
        )))
        .with_client_cert_resolver(Arc::new(IdentityResolver(identity)));
    config.alpn_protocols = alpn;
    config.resumption = rustls::client::Resumption::disabled();
    Ok(config)
}

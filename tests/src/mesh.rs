//! Mesh identity helpers: an rcgen test CA that writes identity files (and
//! can mint expired or foreign certificates), the reference control plane's
//! CA served over gRPC, and a TLS client that presents any certificate.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use postern_control::ca::{serve_ca, Authenticator, Ca, CaService};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// A CA made with rcgen, for certificates the real CA would never sign.
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    root_pem: String,
}

/// PEM chain and key of one issued certificate.
#[derive(Debug, Clone)]
pub struct Issued {
    /// Leaf certificate, PEM.
    pub cert_pem: String,
    /// Private key, PKCS#8 PEM.
    pub key_pem: String,
}

/// Paths of an identity written to disk.
#[derive(Debug, Clone)]
pub struct IdentityFiles {
    /// Certificate chain.
    pub cert: PathBuf,
    /// Private key.
    pub key: PathBuf,
    /// Trust bundle.
    pub bundle: PathBuf,
}

impl TestCa {
    /// A self-signed root called `name`.
    pub fn new(name: &str) -> TestCa {
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().expect("key");
        let cert = params.self_signed(&key).expect("root");
        TestCa {
            root_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// The root, PEM.
    pub fn root_pem(&self) -> &str {
        &self.root_pem
    }

    /// A leaf with `uri` as its only SAN, valid from `from` to `to` seconds
    /// relative to now (negative: in the past).
    pub fn issue(&self, uri: &str, from: i64, to: i64) -> Issued {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI(uri.try_into().expect("ia5 uri"))];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now + time::Duration::seconds(from);
        params.not_after = now + time::Duration::seconds(to);
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = params.signed_by(&key, &self.issuer).expect("sign");
        Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }

    /// A server certificate for DNS names, as an edge would use.
    pub fn issue_server(&self, names: &[&str]) -> Issued {
        let key = KeyPair::generate().expect("key");
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .expect("names");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params.signed_by(&key, &self.issuer).expect("sign");
        Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }

    /// Writes a valid identity for `uri` under `dir`, with this CA as bundle.
    pub fn write_identity(&self, dir: &Path, name: &str, uri: &str) -> IdentityFiles {
        let issued = self.issue(uri, -60, 3600);
        write_files(dir, name, &issued, &self.root_pem)
    }
}

/// Writes `issued` and `bundle_pem` as `<name>-cert.pem`, `-key.pem`, `-bundle.pem`.
pub fn write_files(dir: &Path, name: &str, issued: &Issued, bundle_pem: &str) -> IdentityFiles {
    let files = IdentityFiles {
        cert: dir.join(format!("{name}-cert.pem")),
        key: dir.join(format!("{name}-key.pem")),
        bundle: dir.join(format!("{name}-bundle.pem")),
    };
    std::fs::write(&files.cert, &issued.cert_pem).expect("write cert");
    std::fs::write(&files.key, &issued.key_pem).expect("write key");
    std::fs::write(&files.bundle, bundle_pem).expect("write bundle");
    files
}

/// The reference control plane's CA, serving the Istio CA API on 127.0.0.1.
pub struct CaServer {
    /// `http://127.0.0.1:port`.
    pub address: String,
    /// Bearer-token files, one per entitled identity, in `entitled` order.
    pub token_files: Vec<PathBuf>,
    /// The root, PEM.
    pub root_pem: String,
    /// The root written to a file, for `trust_bundle`.
    pub root_file: PathBuf,
    _dir: tempfile::TempDir,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl CaServer {
    /// Starts a CA for `trust_domain` that issues certificates living at most
    /// `max_lifetime`, with one token per entitled SPIFFE ID.
    pub async fn start(trust_domain: &str, max_lifetime: Duration, entitled: &[&str]) -> CaServer {
        let ca = Ca::self_signed(trust_domain)
            .expect("ca")
            .with_default_lifetime(max_lifetime)
            .with_max_lifetime(max_lifetime);
        let root_pem = ca.root_pem().to_string();
        let dir = tempfile::tempdir().expect("tempdir");
        let root_file = dir.path().join("root.pem");
        std::fs::write(&root_file, &root_pem).expect("write root");
        let mut pairs = Vec::new();
        let mut token_files = Vec::new();
        for (i, id) in entitled.iter().enumerate() {
            let token = format!("token-{i}-{}", uuid_like());
            let path = dir.path().join(format!("token-{i}"));
            std::fs::write(&path, &token).expect("write token");
            token_files.push(path);
            pairs.push((
                token,
                postern_certs::SpiffeId::parse(id).expect("spiffe id"),
            ));
        }
        let service = CaService::new(ca, Authenticator::new(pairs).expect("tokens"));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind ca");
        let address = format!("http://{}", listener.local_addr().expect("addr"));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let _ = serve_ca(listener, service, async {
                let _ = stopped.await;
            })
            .await;
        });
        CaServer {
            address,
            token_files,
            root_pem,
            root_file,
            _dir: dir,
            stop: Some(stop),
        }
    }
}

impl Drop for CaServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

fn uuid_like() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(std::time::SystemTime::now())
}

/// A mesh client like sidecar A's cluster: presents the identity in `cell`
/// and requires the server's SPIFFE ID to be `server_id`; ALPN http/1.1.
pub fn mesh_connector(cell: &Arc<postern_certs::IdentityHandle>, server_id: &str) -> TlsConnector {
    let allowed = postern_certs::AllowedPeers::Only(
        vec![postern_certs::SpiffeId::parse(server_id).expect("spiffe id")].into(),
    );
    let config =
        postern_certs::tls::mesh_client_config(cell.clone(), allowed, vec![b"http/1.1".to_vec()])
            .expect("mesh client config");
    TlsConnector::from(Arc::new(config))
}

/// A TLS client that presents `client` (if any) and trusts any server: for
/// probing what a listener accepts, never for checking servers.
pub fn probe_connector(client: Option<&Issued>, alpn: &[&[u8]]) -> TlsConnector {
    probe_connector_with_versions(client, alpn, rustls::DEFAULT_VERSIONS)
}

/// Like [`probe_connector`], limited to the given TLS versions.
pub fn probe_connector_with_versions(
    client: Option<&Issued>,
    alpn: &[&[u8]],
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> TlsConnector {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)
        .expect("versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyServer(provider)));
    let mut config = match client {
        Some(issued) => {
            let chain: Vec<CertificateDer<'static>> =
                rustls::pki_types::pem::PemObject::pem_slice_iter(issued.cert_pem.as_bytes())
                    .collect::<Result<_, _>>()
                    .expect("chain");
            let key =
                <PrivateKeyDer<'static> as rustls::pki_types::pem::PemObject>::from_pem_slice(
                    issued.key_pem.as_bytes(),
                )
                .expect("key");
            builder
                .with_client_auth_cert(chain, key)
                .expect("client cert")
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    TlsConnector::from(Arc::new(config))
}

/// Connects and completes a TLS handshake (TLS 1.3 client certificate errors
/// surface only on the first read, so this reads once with a short wait).
pub async fn tls_connect(
    connector: &TlsConnector,
    addr: SocketAddr,
    sni: &str,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from(sni.to_string()).map_err(std::io::Error::other)?;
    connector.connect(name, tcp).await
}

#[derive(Debug)]
struct AcceptAnyServer(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AcceptAnyServer {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

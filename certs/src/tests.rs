//! Unit tests with a real rcgen CA.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls_pki_types::{CertificateDer, UnixTime};

use super::*;
use crate::source::BoxFuture;

struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    root: CertificateDer<'static>,
}

impl TestCa {
    fn new(name: &str) -> TestCa {
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        TestCa {
            root: cert.der().clone(),
            issuer: Issuer::new(params, key),
        }
    }

    fn bundle(&self) -> Arc<TrustBundle> {
        Arc::new(TrustBundle::from_der(vec![self.root.clone()]).unwrap())
    }

    /// A leaf for `uri` valid from `from` to `to` (relative to now, seconds).
    fn leaf(&self, uri: &str, key: &KeyPair, from: i64, to: i64) -> CertificateDer<'static> {
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI(uri.try_into().unwrap())];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now + time::Duration::seconds(from);
        params.not_after = now + time::Duration::seconds(to);
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.signed_by(key, &self.issuer).unwrap().der().clone()
    }
}

const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
const API: &str = "spiffe://cluster.local/ns/shop/sa/api";

fn now() -> UnixTime {
    UnixTime::now()
}

#[test]
fn verifies_peers_by_chain_validity_and_spiffe_id() {
    let ca = TestCa::new("mesh");
    let other_ca = TestCa::new("intruder");
    let key = KeyPair::generate().unwrap();
    let good = ca.leaf(WEB, &key, -60, 3600);
    let any = AllowedPeers::Any;
    let only_api = AllowedPeers::Only(vec![SpiffeId::parse(API).unwrap()].into());
    let other_domain = AllowedPeers::TrustDomain("example.org".into());
    let bundle = ca.bundle();

    let id = verify_peer(&bundle, &good, &[], now(), PeerRole::Client, &any).unwrap();
    assert_eq!(id.as_str(), WEB);
    let cases = [
        (other_ca.leaf(WEB, &key, -60, 3600), &any, "untrusted_ca"),
        (ca.leaf(WEB, &key, -3600, -60), &any, "expired"),
        (ca.leaf(WEB, &key, 600, 3600), &any, "not_yet_valid"),
        (good.clone(), &only_api, "wrong_identity"),
        (good.clone(), &other_domain, "wrong_identity"),
        (
            ca.leaf("https://web.example", &key, -60, 3600),
            &any,
            "no_spiffe_id",
        ),
    ];
    for (cert, allowed, reason) in cases {
        let err = verify_peer(&bundle, &cert, &[], now(), PeerRole::Server, allowed).unwrap_err();
        assert_eq!(err.reason(), reason, "{err}");
    }
}

#[test]
fn bundle_with_two_roots_accepts_both_during_ca_rotation() {
    let old = TestCa::new("old");
    let new = TestCa::new("new");
    let pem = [&old.root, &new.root]
        .iter()
        .map(|der| pem_of(der))
        .collect::<String>();
    let bundle = TrustBundle::from_pem(pem.as_bytes()).unwrap();
    assert_eq!(bundle.roots().len(), 2);
    let key = KeyPair::generate().unwrap();
    for ca in [&old, &new] {
        let leaf = ca.leaf(WEB, &key, -60, 3600);
        verify_peer(
            &bundle,
            &leaf,
            &[],
            now(),
            PeerRole::Client,
            &AllowedPeers::Any,
        )
        .unwrap();
    }
}

fn pem_of(der: &CertificateDer<'_>) -> String {
    let b64 = base64_encode(der);
    let body = b64
        .as_bytes()
        .chunks(64)
        .map(|c| format!("{}\n", std::str::from_utf8(c).unwrap()))
        .collect::<String>();
    format!("-----BEGIN CERTIFICATE-----\n{body}-----END CERTIFICATE-----\n")
}

fn base64_encode(bytes: &[u8]) -> String {
    const TABLE: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, b)| acc | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(TABLE[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// One in-memory handshake; how it went (full or resumed).
fn handshake(
    client: &Arc<rustls::ClientConfig>,
    server: &Arc<rustls::ServerConfig>,
) -> Option<rustls::HandshakeKind> {
    let name = rustls_pki_types::ServerName::try_from("mesh.invalid").unwrap();
    let mut client = rustls::ClientConnection::new(client.clone(), name).unwrap();
    let mut server = rustls::ServerConnection::new(server.clone()).unwrap();
    let mut buffer = Vec::new();
    for _ in 0..10 {
        buffer.clear();
        while client.wants_write() {
            client.write_tls(&mut buffer).unwrap();
        }
        let mut input = &buffer[..];
        while !input.is_empty() {
            server.read_tls(&mut input).unwrap();
        }
        server.process_new_packets().unwrap();
        buffer.clear();
        while server.wants_write() {
            server.write_tls(&mut buffer).unwrap();
        }
        let mut input = &buffer[..];
        while !input.is_empty() {
            client.read_tls(&mut input).unwrap();
        }
        client.process_new_packets().unwrap();
        if !client.is_handshaking() && !server.is_handshaking() && !server.wants_write() {
            break;
        }
    }
    assert!(!client.is_handshaking() && !server.is_handshaking());
    assert!(
        server.peer_certificates().is_some(),
        "the client showed a certificate"
    );
    client.handshake_kind()
}

#[test]
fn mesh_connections_never_resume_a_session() {
    let ca = TestCa::new("mesh");
    let identity_of = |uri: &str| {
        let key = WorkloadKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
        let rc_key = KeyPair::try_from(&key.private_key_der()).unwrap();
        let handle = IdentityHandle::new();
        handle.install(
            Identity::new(
                vec![ca.leaf(uri, &rc_key, -60, 3600)],
                key.private_key_der(),
                ca.bundle(),
                "test",
            )
            .unwrap(),
        );
        handle
    };
    let server = Arc::new(
        tls::mesh_server_config(identity_of(API), AllowedPeers::Any, vec![b"h2".to_vec()]).unwrap(),
    );
    let client = Arc::new(
        tls::mesh_client_config(identity_of(WEB), AllowedPeers::Any, vec![b"h2".to_vec()]).unwrap(),
    );
    // Each connection checks the peer's current certificate: one resumed
    // from an earlier session would skip it, past its expiry if need be.
    for _ in 0..3 {
        assert_eq!(
            handshake(&client, &server),
            Some(rustls::HandshakeKind::Full)
        );
    }
}

#[test]
fn identity_requires_matching_key_and_trusted_chain() {
    let ca = TestCa::new("mesh");
    let key = WorkloadKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
    let rc_key = KeyPair::try_from(&key.private_key_der()).unwrap();
    let leaf = ca.leaf(WEB, &rc_key, -60, 3600);
    let identity = Identity::new(
        vec![leaf.clone()],
        key.private_key_der(),
        ca.bundle(),
        "test",
    )
    .unwrap();
    assert_eq!(identity.id.as_str(), WEB);
    assert!(identity.info.sans.contains(&format!("URI:{WEB}")));
    assert!(identity
        .expect(&SpiffeId::parse(API).unwrap())
        .is_err_and(|e| matches!(e, IdentityError::WrongIdentity { .. })));

    let other_key = WorkloadKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
    let err = Identity::new(
        vec![leaf.clone()],
        other_key.private_key_der(),
        ca.bundle(),
        "test",
    )
    .unwrap_err();
    assert!(matches!(err, IdentityError::Key(_)), "{err}");
    let err = Identity::new(
        vec![leaf],
        key.private_key_der(),
        TestCa::new("x").bundle(),
        "test",
    )
    .unwrap_err();
    assert!(
        matches!(err, IdentityError::Chain(PeerError::UntrustedIssuer)),
        "{err}"
    );
}

#[test]
fn csr_carries_only_the_spiffe_id() {
    for algorithm in [
        KeyAlgorithm::EcdsaP256,
        KeyAlgorithm::EcdsaP384,
        KeyAlgorithm::Ed25519,
    ] {
        let key = WorkloadKey::generate(algorithm).unwrap();
        let csr = key.csr_pem(&SpiffeId::parse(WEB).unwrap()).unwrap();
        let parsed = rcgen::CertificateSigningRequestParams::from_pem(&csr).unwrap();
        let sans = &parsed.params.subject_alt_names;
        assert_eq!(sans.len(), 1, "{algorithm:?}");
        assert!(matches!(&sans[0], SanType::URI(uri) if uri.as_str() == WEB));
    }
}

/// Signs a fresh key on every fetch, like a CA with a short lifetime.
#[derive(Debug)]
struct SigningSource {
    ca: Arc<std::sync::Mutex<TestCa>>,
    lifetime_secs: i64,
}

impl std::fmt::Debug for TestCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TestCa")
    }
}

impl CertSource for SigningSource {
    fn name(&self) -> &'static str {
        "test_ca"
    }

    fn fetch<'a>(
        &'a self,
        request: &'a IssueRequest,
    ) -> BoxFuture<'a, Result<Identity, SourceError>> {
        Box::pin(async move {
            let key = WorkloadKey::generate(request.key_algorithm)?;
            let rc_key = KeyPair::try_from(&key.private_key_der()).unwrap();
            let ca = self.ca.lock().unwrap();
            let leaf = ca.leaf(request.id.as_str(), &rc_key, -1, self.lifetime_secs);
            Ok(Identity::new(
                vec![leaf],
                key.private_key_der(),
                ca.bundle(),
                "test_ca",
            )?)
        })
    }
}

#[tokio::test]
async fn rotator_renews_before_expiry() {
    let handle = IdentityHandle::new();
    let rotator = Rotator {
        source: Arc::new(SigningSource {
            ca: Arc::new(std::sync::Mutex::new(TestCa::new("mesh"))),
            lifetime_secs: 2,
        }),
        request: IssueRequest {
            id: SpiffeId::parse(WEB).unwrap(),
            key_algorithm: KeyAlgorithm::EcdsaP256,
            lifetime: Duration::from_secs(2),
        },
        policy: RotationPolicy::default(),
        handle: handle.clone(),
    };
    let task = tokio::spawn(rotator.run());
    let mut generations = handle.subscribe();
    let mut serials = std::collections::HashSet::new();
    tokio::time::timeout(Duration::from_secs(20), async {
        while serials.len() < 3 {
            generations.changed().await.unwrap();
            let current = handle.current().unwrap();
            // Each installed certificate is still valid when it goes in.
            assert!(current.info.not_after > SystemTime::now());
            serials.insert(current.info.serial.clone());
        }
    })
    .await
    .expect("three rotations within 20 s");
    task.abort();
}

#[tokio::test]
async fn file_source_reloads_changed_files() {
    let dir = std::env::temp_dir().join(format!("postern-certs-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca = TestCa::new("mesh");
    let write = |subject: &str| {
        let key = KeyPair::generate().unwrap();
        let leaf = ca.leaf(subject, &key, -60, 3600);
        std::fs::write(dir.join("cert.pem"), pem_of(&leaf)).unwrap();
        std::fs::write(dir.join("key.pem"), key.serialize_pem()).unwrap();
    };
    write(WEB);
    std::fs::write(dir.join("bundle.pem"), pem_of(&ca.root)).unwrap();
    let source = FileSource::new(
        dir.join("cert.pem"),
        dir.join("key.pem"),
        dir.join("bundle.pem"),
        Duration::from_millis(20),
    );
    let request = IssueRequest {
        id: SpiffeId::parse(WEB).unwrap(),
        key_algorithm: KeyAlgorithm::EcdsaP256,
        lifetime: Duration::from_secs(3600),
    };
    let first = source.fetch(&request).await.unwrap();
    write(WEB);
    tokio::time::timeout(Duration::from_secs(10), source.changed())
        .await
        .expect("change noticed");
    let second = source.fetch(&request).await.unwrap();
    assert_ne!(first.info.serial, second.info.serial);
    std::fs::remove_dir_all(&dir).unwrap();
}

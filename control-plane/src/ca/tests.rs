use std::net::SocketAddr;

use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use postern_proto::istio::v1::auth::istio_certificate_service_client::IstioCertificateServiceClient;
use rcgen::string::Ia5String;
use tonic::Code;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;

use super::*;

const TD: &str = "cluster.local";

fn id(s: &str) -> SpiffeId {
    SpiffeId::parse(s).unwrap()
}

fn payments() -> SpiffeId {
    id("spiffe://cluster.local/ns/shop/sa/payments")
}

fn uri(s: &str) -> SanType {
    SanType::URI(Ia5String::try_from(s).unwrap())
}

/// A CSR with a fresh P-256 key and the given SANs.
fn csr(sans: Vec<SanType>) -> String {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.subject_alt_names = sans;
    params.serialize_request(&key).unwrap().pem().unwrap()
}

fn parse_pem(pem: &str) -> Vec<u8> {
    x509_parser::pem::parse_x509_pem(pem.as_bytes())
        .unwrap()
        .1
        .contents
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Checks a leaf for `expected`, signed by `root_pem`, expiring about
/// `lifetime` from now.
fn check_leaf(chain: &[String], root_pem: &str, expected: &SpiffeId, lifetime: Duration) {
    assert_eq!(chain.len(), 2);
    assert_eq!(chain[1], root_pem);
    let leaf_der = parse_pem(&chain[0]);
    let root_der = parse_pem(root_pem);
    let leaf = x509_parser::parse_x509_certificate(&leaf_der).unwrap().1;
    let root = x509_parser::parse_x509_certificate(&root_der).unwrap().1;
    check_leaf_cert(&leaf, &root, expected, lifetime);
}

fn check_leaf_cert(
    leaf: &X509Certificate<'_>,
    root: &X509Certificate<'_>,
    expected: &SpiffeId,
    lifetime: Duration,
) {
    let san = leaf.subject_alternative_name().unwrap().unwrap();
    assert!(san.critical, "empty subject needs a critical SAN");
    assert_eq!(
        san.value.general_names,
        vec![GeneralName::URI(expected.as_str())]
    );
    assert_eq!(leaf.subject().iter().count(), 0);
    assert_eq!(leaf.issuer(), root.subject());
    let aki = leaf
        .extensions()
        .iter()
        .find_map(|e| match e.parsed_extension() {
            x509_parser::extensions::ParsedExtension::AuthorityKeyIdentifier(aki) => {
                aki.key_identifier.clone()
            }
            _ => None,
        })
        .unwrap();
    let ski = root
        .extensions()
        .iter()
        .find_map(|e| match e.parsed_extension() {
            x509_parser::extensions::ParsedExtension::SubjectKeyIdentifier(ski) => {
                Some(ski.clone())
            }
            _ => None,
        })
        .unwrap();
    assert_eq!(aki.0, ski.0);

    let now = unix_now();
    let not_before = leaf.validity().not_before.timestamp();
    let not_after = leaf.validity().not_after.timestamp();
    assert!(
        not_before <= now && not_before >= now - 60,
        "{not_before} vs {now}"
    );
    let expected_after = now + lifetime.as_secs() as i64;
    assert!(
        (not_after - expected_after).abs() <= 2,
        "not_after {not_after}, expected about {expected_after}"
    );

    let eku = leaf.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && eku.client_auth && !eku.any);
    let ku = leaf.key_usage().unwrap().unwrap().value;
    assert!(ku.digital_signature() && ku.key_encipherment() && !ku.key_cert_sign());
    assert!(!leaf.is_ca());
    let serial = leaf.raw_serial();
    assert!(serial.len() <= 16 && serial[0] & 0x80 == 0);
}

#[test]
fn self_signed_root_is_a_p256_ca() {
    let ca = Ca::self_signed(TD).unwrap();
    assert_eq!(ca.trust_domain(), TD);
    let der = parse_pem(ca.root_pem());
    let root = x509_parser::parse_x509_certificate(&der).unwrap().1;
    assert!(root.is_ca());
    let cn = root.subject().iter_common_name().next().unwrap();
    assert_eq!(cn.as_str().unwrap(), ROOT_COMMON_NAME);
    let ku = root.key_usage().unwrap().unwrap().value;
    assert!(ku.key_cert_sign() && ku.crl_sign());
    let lifetime = root.validity().not_after.timestamp() - unix_now();
    assert!((lifetime - ROOT_LIFETIME.as_secs() as i64).abs() <= 2);
    assert_eq!(
        root.public_key().algorithm.algorithm,
        x509_parser::oid_registry::OID_KEY_TYPE_EC_PUBLIC_KEY
    );
}

#[test]
fn signs_csr_for_entitled_identity() {
    let ca = Ca::self_signed(TD).unwrap();
    let chain = ca
        .sign_csr(
            &csr(vec![uri(payments().as_str())]),
            &payments(),
            Some(Duration::from_secs(5)),
        )
        .unwrap();
    check_leaf(&chain, ca.root_pem(), &payments(), Duration::from_secs(5));
}

#[test]
fn lifetime_defaults_and_is_capped() {
    let ca = Ca::self_signed(TD).unwrap();
    let request = csr(vec![uri(payments().as_str())]);
    for requested in [None, Some(Duration::ZERO)] {
        let chain = ca.sign_csr(&request, &payments(), requested).unwrap();
        check_leaf(&chain, ca.root_pem(), &payments(), DEFAULT_LEAF_LIFETIME);
    }
    let ca = ca.with_max_lifetime(Duration::from_secs(3));
    let chain = ca
        .sign_csr(&request, &payments(), Some(Duration::from_secs(3600)))
        .unwrap();
    check_leaf(&chain, ca.root_pem(), &payments(), Duration::from_secs(3));
}

#[test]
fn refuses_csr_for_another_identity() {
    let ca = Ca::self_signed(TD).unwrap();
    let other = "spiffe://cluster.local/ns/shop/sa/admin";
    let err = ca
        .sign_csr(&csr(vec![uri(other)]), &payments(), None)
        .unwrap_err();
    match &err {
        CaError::IdentityNotEntitled {
            requested,
            entitled,
        } => {
            assert_eq!(requested, other);
            assert_eq!(entitled, &payments());
        }
        other => panic!("unexpected error {other:?}"),
    }
    assert_eq!(err.reason(), "identity_not_entitled");
}

#[test]
fn refuses_other_san_kinds_and_counts() {
    let ca = Ca::self_signed(TD).unwrap();
    let good = uri(payments().as_str());
    let dns = SanType::DnsName(Ia5String::try_from("payments.shop.svc").unwrap());
    let ip = SanType::IpAddress("10.0.0.1".parse().unwrap());
    for sans in [vec![good.clone(), dns], vec![ip, good.clone()]] {
        let err = ca.sign_csr(&csr(sans), &payments(), None).unwrap_err();
        assert!(matches!(err, CaError::UnsupportedSan { .. }), "{err:?}");
    }
    let err = ca.sign_csr(&csr(vec![]), &payments(), None).unwrap_err();
    assert!(matches!(err, CaError::UriSanCount(0)), "{err:?}");
    let err = ca
        .sign_csr(&csr(vec![good.clone(), good]), &payments(), None)
        .unwrap_err();
    assert!(matches!(err, CaError::UriSanCount(2)), "{err:?}");
    let err = ca.sign_csr("not a csr", &payments(), None).unwrap_err();
    assert!(matches!(err, CaError::InvalidCsr(_)), "{err:?}");
}

#[test]
fn refuses_identity_outside_trust_domain() {
    let ca = Ca::self_signed(TD).unwrap();
    let foreign = id("spiffe://example.org/ns/shop/sa/payments");
    let err = ca
        .sign_csr(&csr(vec![uri(foreign.as_str())]), &foreign, None)
        .unwrap_err();
    assert!(matches!(err, CaError::ForeignTrustDomain { .. }), "{err:?}");
}

#[test]
fn rejects_invalid_trust_domain() {
    let err = Ca::self_signed("Bad Domain").unwrap_err();
    assert!(matches!(err, CaError::InvalidTrustDomain { .. }), "{err:?}");
}

/// A root made by rcgen directly, as an operator's existing CA would be.
fn external_root(is_ca: bool) -> (String, String) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.is_ca = if is_ca {
        IsCa::Ca(BasicConstraints::Unconstrained)
    } else {
        IsCa::ExplicitNoCa
    };
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    let cert = params.self_signed(&key).unwrap();
    (cert.pem(), key.serialize_pem())
}

#[test]
fn loads_ca_from_pem_and_signs() {
    let (cert_pem, key_pem) = external_root(true);
    let ca = Ca::from_pem(TD, &cert_pem, &key_pem).unwrap();
    let chain = ca
        .sign_csr(
            &csr(vec![uri(payments().as_str())]),
            &payments(),
            Some(Duration::from_secs(2)),
        )
        .unwrap();
    check_leaf(&chain, ca.root_pem(), &payments(), Duration::from_secs(2));

    // A self-signed CA round-trips through its own PEM only with its key,
    // which it never exposes; another root's key must be refused.
    let (_, other_key) = external_root(true);
    let err = Ca::from_pem(TD, &cert_pem, &other_key).unwrap_err();
    assert!(matches!(err, CaError::KeyMismatch), "{err:?}");

    let (leaf_pem, leaf_key) = external_root(false);
    let err = Ca::from_pem(TD, &leaf_pem, &leaf_key).unwrap_err();
    assert!(matches!(err, CaError::NotACa), "{err:?}");

    let two = format!("{cert_pem}{cert_pem}");
    let err = Ca::from_pem(TD, &two, &key_pem).unwrap_err();
    assert!(matches!(err, CaError::RootPemCount(2)), "{err:?}");

    let err = Ca::from_pem(TD, &cert_pem, "garbage").unwrap_err();
    assert!(matches!(err, CaError::InvalidKey(_)), "{err:?}");
}

#[test]
fn authenticator_maps_tokens_to_identities() {
    let auth =
        Authenticator::new([("tok-payments", payments()), ("tok-payments-2", payments())]).unwrap();
    assert_eq!(auth.authenticate("tok-payments"), Some(&payments()));
    assert_eq!(auth.authenticate("tok-payments-2"), Some(&payments()));
    assert_eq!(auth.authenticate("tok-payment"), None);
    assert_eq!(auth.authenticate(""), None);
    assert!(
        !format!("{auth:?}").contains("tok-"),
        "debug output leaks tokens"
    );

    let err = Authenticator::new([("", payments())]).unwrap_err();
    assert!(matches!(err, CaError::EmptyToken { .. }), "{err:?}");
    let err = Authenticator::new([("t", payments()), ("t", payments())]).unwrap_err();
    assert!(matches!(err, CaError::DuplicateToken { .. }), "{err:?}");
}

#[test]
fn parses_bearer_tokens() {
    let mut metadata = MetadataMap::new();
    assert_eq!(bearer_token(&metadata), None);
    metadata.insert("authorization", "Bearer abc".parse().unwrap());
    assert_eq!(bearer_token(&metadata), Some("abc"));
    metadata.insert("authorization", "bearer  abc ".parse().unwrap());
    assert_eq!(bearer_token(&metadata), Some("abc"));
    metadata.insert("authorization", "Basic abc".parse().unwrap());
    assert_eq!(bearer_token(&metadata), None);
    metadata.insert("authorization", "Bearer ".parse().unwrap());
    assert_eq!(bearer_token(&metadata), None);
}

fn service() -> CaService {
    let ca = Ca::self_signed(TD).unwrap();
    let auth = Authenticator::new([("good-token", payments())]).unwrap();
    CaService::new(ca, auth)
}

fn request(token: Option<&str>, csr: String, validity: i64) -> Request<IstioCertificateRequest> {
    let mut request = Request::new(IstioCertificateRequest {
        csr,
        validity_duration: validity,
        metadata: None,
    });
    if let Some(token) = token {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    request
}

#[tokio::test]
async fn grpc_end_to_end() {
    let service = service();
    let root_pem = service.ca().root_pem().to_owned();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve_ca(listener, service, async {
        let _ = stopped.await;
    }));

    let mut client = IstioCertificateServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let good = csr(vec![uri(payments().as_str())]);

    let chain = client
        .create_certificate(request(Some("good-token"), good.clone(), 4))
        .await
        .unwrap()
        .into_inner()
        .cert_chain;
    check_leaf(&chain, &root_pem, &payments(), Duration::from_secs(4));

    for token in [None, Some("bad-token")] {
        let status = client
            .create_certificate(request(token, good.clone(), 0))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    }

    let admin = "spiffe://cluster.local/ns/shop/sa/admin";
    let status = client
        .create_certificate(request(Some("good-token"), csr(vec![uri(admin)]), 0))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains(admin), "{}", status.message());
    assert!(
        status.message().contains(payments().as_str()),
        "{}",
        status.message()
    );

    let status = client
        .create_certificate(request(Some("good-token"), good, -1))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");

    stop.send(()).unwrap();
    drop(client);
    server.await.unwrap().unwrap();
}

#[test]
fn counts_issued_and_refused() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let service = service();
    let good = csr(vec![uri(payments().as_str())]);
    let other = csr(vec![uri("spiffe://cluster.local/ns/shop/sa/admin")]);
    metrics::with_local_recorder(&recorder, || {
        runtime.block_on(async {
            let svc = &service;
            svc.create_certificate(request(Some("good-token"), good.clone(), 0))
                .await
                .unwrap();
            svc.create_certificate(request(Some("nope"), good, 0))
                .await
                .unwrap_err();
            svc.create_certificate(request(Some("good-token"), other, 0))
                .await
                .unwrap_err();
        });
    });

    let mut counters: Vec<(String, Vec<String>, u64)> = snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .map(|(key, _, _, value)| {
            let key = key.key();
            let labels = key
                .labels()
                .map(|l| format!("{}={}", l.key(), l.value()))
                .collect();
            let DebugValue::Counter(n) = value else {
                panic!("not a counter: {key:?}")
            };
            (key.name().to_owned(), labels, n)
        })
        .collect();
    counters.sort();
    assert_eq!(
        counters,
        vec![
            (CERTIFICATES_ISSUED_TOTAL.to_owned(), vec![], 1),
            (
                REQUESTS_REFUSED_TOTAL.to_owned(),
                vec!["reason=identity_not_entitled".to_owned()],
                1
            ),
            (
                REQUESTS_REFUSED_TOTAL.to_owned(),
                vec!["reason=unauthenticated".to_owned()],
                1
            ),
        ]
    );
}

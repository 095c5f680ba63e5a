//! Writes the seed corpora of the fuzz targets, under `<fuzz>/seeds/<target>`:
//! encoded `DiscoveryResponse`s and `DeltaDiscoveryResponse`s of every type
//! Postern takes (from the example mesh of the reference control plane and
//! the envoy builders the integration tests use), rustls ClientHellos, and
//! certificates, keys and CSRs from rcgen and `postern-certs`. `pki` writes
//! the fixed certificates of the x509 target (`<fuzz>/fixtures/pki`), which
//! its seeds are read from.
//!
//! ```text
//! cargo run -p postern-tests --example fuzz_seeds -- fuzz [target...]
//! ```

use std::path::{Path, PathBuf};
use std::sync::Arc;

use postern_control::ads::{pack, Snapshot};
use postern_control::mesh::parse_mesh;
use postern_proto::envoy::config::rbac::v3 as rbac;
use postern_proto::envoy::service::discovery::v3::{
    DeltaDiscoveryResponse, DiscoveryResponse, Resource,
};
use postern_proto::google::protobuf::Any;
use postern_proto::type_url;
use postern_tests::envoy::{
    certificate_secret, http_listener, http_listener_with_filters, rbac_filter, root_secret,
    static_cluster,
};
use postern_tests::mesh::TestCa;
use prost::Message;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::pki_types::CertificateDer;

const MESH: &str = include_str!("../../control-plane/examples/mesh.yaml");
const PEERS: &[&str] = &["spiffe://cluster.local/ns/default/sa/web"];

fn response(type_url: &str, version: &str, resources: Vec<Any>) -> Vec<u8> {
    DiscoveryResponse {
        version_info: version.into(),
        resources,
        type_url: type_url.into(),
        nonce: "1".into(),
        ..Default::default()
    }
    .encode_to_vec()
}

fn of_type(snapshot: &Snapshot, type_url: &str) -> Vec<Any> {
    snapshot
        .of_type(type_url)
        .map(|(_, any)| any.clone())
        .collect()
}

/// An RBAC filter that lets one SPIFFE ID read `/items/` only.
fn rbac_rules() -> rbac::Rbac {
    use postern_proto::envoy::config::route::v3::header_matcher::HeaderMatchSpecifier;
    use postern_proto::envoy::config::route::v3::HeaderMatcher;
    use postern_proto::envoy::r#type::matcher::v3::{string_matcher, StringMatcher};
    let principal = rbac::Principal {
        identifier: Some(rbac::principal::Identifier::Authenticated(
            rbac::principal::Authenticated {
                principal_name: Some(StringMatcher {
                    match_pattern: Some(string_matcher::MatchPattern::Exact(PEERS[0].into())),
                    ignore_case: false,
                }),
            },
        )),
    };
    let permission = rbac::Permission {
        rule: Some(rbac::permission::Rule::Header(HeaderMatcher {
            name: ":method".into(),
            header_match_specifier: Some(HeaderMatchSpecifier::StringMatch(StringMatcher {
                match_pattern: Some(string_matcher::MatchPattern::Exact("GET".into())),
                ignore_case: false,
            })),
            ..Default::default()
        })),
    };
    rbac::Rbac {
        action: rbac::rbac::Action::Allow as i32,
        policies: [(
            "reads".to_string(),
            rbac::Policy {
                permissions: vec![permission],
                principals: vec![principal],
                ..Default::default()
            },
        )]
        .into_iter()
        .collect(),
        ..Default::default()
    }
}

/// Encoded `DiscoveryResponse`s for `xds_response`.
fn xds_response(dir: &Path) -> anyhow::Result<()> {
    let write = |name: &str, bytes: Vec<u8>| std::fs::write(dir.join(name), bytes);

    let mesh = parse_mesh(MESH, "mesh-1")?;
    for (name, kind) in [
        ("mesh-lds", type_url::LISTENER),
        ("mesh-rds", type_url::ROUTE),
        ("mesh-cds", type_url::CLUSTER),
        ("mesh-eds", type_url::ENDPOINT),
    ] {
        write(name, response(kind, "mesh-1", of_type(&mesh, kind)))?;
    }

    let addr = "127.0.0.1:8080".parse()?;
    let upstream = "127.0.0.1:9000".parse()?;
    write(
        "lds-inline-routes",
        response(
            type_url::LISTENER,
            "1",
            vec![pack(&http_listener("edge", addr, "web", None))],
        ),
    )?;
    write(
        "lds-mtls-rbac",
        response(
            type_url::LISTENER,
            "1",
            vec![pack(&http_listener_with_filters(
                "inbound",
                addr,
                "local-app",
                Some(PEERS),
                vec![rbac_filter(rbac_rules())],
            ))],
        ),
    )?;
    write(
        "cds-static-and-mtls",
        response(
            type_url::CLUSTER,
            "1",
            vec![
                pack(&static_cluster("web", upstream, None)),
                pack(&static_cluster("mesh-web", upstream, Some(PEERS))),
            ],
        ),
    )?;
    // A server may wrap state-of-the-world bodies in a Resource.
    let wrapped = Resource {
        name: "web".into(),
        version: "1".into(),
        resource: Some(pack(&static_cluster("web", upstream, None))),
        ..Default::default()
    };
    write(
        "cds-wrapped",
        response(type_url::CLUSTER, "1", vec![pack(&wrapped)]),
    )?;

    let ca = TestCa::new("fuzz seed CA");
    // Valid for ten years, so the seed keeps its meaning.
    let issued = ca.issue(
        "spiffe://cluster.local/ns/default/sa/fuzz",
        -60,
        10 * 365 * 24 * 3600,
    );
    write(
        "sds-certificate-and-roots",
        response(
            type_url::SECRET,
            "1",
            vec![
                pack(&certificate_secret(&issued.cert_pem, &issued.key_pem)),
                pack(&root_secret(ca.root_pem())),
            ],
        ),
    )?;
    Ok(())
}

/// The workload ID of the fuzz PKI's leaf (`fuzz/src/pki.rs`).
const LEAF_ID: &str = "spiffe://cluster.local/ns/default/sa/fuzz";

/// A delta resource as a server sends it: named, versioned, with a body.
fn delta_resource(name: &str, body: Any) -> Resource {
    Resource {
        name: name.into(),
        version: "1".into(),
        resource: Some(body),
        ..Default::default()
    }
}

fn delta_response(type_url: &str, resources: Vec<Resource>, removed: &[&str]) -> Vec<u8> {
    DeltaDiscoveryResponse {
        system_version_info: "delta-1".into(),
        resources,
        type_url: type_url.into(),
        removed_resources: removed.iter().map(|n| (*n).to_owned()).collect(),
        nonce: "1".into(),
        ..Default::default()
    }
    .encode_to_vec()
}

/// Encoded `DeltaDiscoveryResponse`s for `xds_delta`: the example mesh per
/// type, removals, a heartbeat of a held name, and a name given by
/// `resource_name`.
fn xds_delta(dir: &Path) -> anyhow::Result<()> {
    let write = |name: &str, bytes: Vec<u8>| std::fs::write(dir.join(name), bytes);
    let mesh = parse_mesh(MESH, "mesh-1")?;
    for (name, kind) in [
        ("mesh-lds", type_url::LISTENER),
        ("mesh-rds", type_url::ROUTE),
        ("mesh-cds", type_url::CLUSTER),
        ("mesh-eds", type_url::ENDPOINT),
    ] {
        let resources = mesh
            .of_type(kind)
            .map(|(name, any)| delta_resource(name, any.clone()))
            .collect();
        write(name, delta_response(kind, resources, &[]))?;
    }
    let upstream = "127.0.0.1:9000".parse()?;
    let web = pack(&static_cluster("web", upstream, None));
    write(
        "cds-add-remove-heartbeat",
        delta_response(
            type_url::CLUSTER,
            vec![
                delta_resource("web", web.clone()),
                Resource {
                    name: "held".into(),
                    version: "1".into(),
                    ..Default::default()
                },
            ],
            &["gone"],
        ),
    )?;
    let by_resource_name = Resource {
        resource_name: Some(postern_proto::envoy::service::discovery::v3::ResourceName {
            name: "web".into(),
            ..Default::default()
        }),
        ..delta_resource("", web)
    };
    write(
        "cds-resource-name",
        delta_response(type_url::CLUSTER, vec![by_resource_name], &[]),
    )?;
    let ca = TestCa::new("fuzz seed CA");
    let issued = ca.issue(LEAF_ID, -60, 10 * 365 * 24 * 3600);
    write(
        "sds-certificate-and-roots",
        delta_response(
            type_url::SECRET,
            vec![
                delta_resource(
                    "default",
                    pack(&certificate_secret(&issued.cert_pem, &issued.key_pem)),
                ),
                delta_resource("ROOTCA", pack(&root_secret(ca.root_pem()))),
            ],
            &[],
        ),
    )?;
    Ok(())
}

/// The first flight of a rustls client: its ClientHello records.
fn client_hello(
    name: &str,
    alpn: &[&[u8]],
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> anyhow::Result<Vec<u8>> {
    let mut config = rustls::ClientConfig::builder_with_provider(postern_certs::tls::provider())
        .with_protocol_versions(versions)?
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let name = rustls::pki_types::ServerName::try_from(name.to_owned())?;
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name)?;
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out)?;
    }
    Ok(out)
}

/// The same handshake message cut into two records after `at` bytes.
fn split_record(hello: &[u8], at: usize) -> Vec<u8> {
    let payload = &hello[5..];
    let mut out = Vec::new();
    for part in [&payload[..at], &payload[at..]] {
        out.extend_from_slice(&hello[..3]);
        out.extend_from_slice(&u16::try_from(part.len()).unwrap_or(u16::MAX).to_be_bytes());
        out.extend_from_slice(part);
    }
    out
}

/// First bytes of client connections for `client_hello`: rustls
/// ClientHellos (TLS 1.2 and 1.3, with and without SNI and ALPN, one split
/// over two records), and the plaintext openings detection tells apart.
fn client_hellos(dir: &Path) -> anyhow::Result<()> {
    let write = |name: &str, bytes: Vec<u8>| std::fs::write(dir.join(name), bytes);
    let both = rustls::ALL_VERSIONS;
    let tls12: &[&'static rustls::SupportedProtocolVersion] = &[&rustls::version::TLS12];
    let tls13: &[&'static rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];
    write(
        "tls13-sni-h2-http11",
        client_hello("api.example.com", &[b"h2", b"http/1.1"], tls13)?,
    )?;
    write(
        "tls12-sni-http11",
        client_hello("web.shop.svc.cluster.local", &[b"http/1.1"], tls12)?,
    )?;
    write(
        "tls-sni-istio-alpn",
        client_hello(
            "outbound_.8080_._.web.default.svc.cluster.local",
            &[b"istio-peer-exchange", b"istio", b"h2"],
            both,
        )?,
    )?;
    write(
        "tls-sni-no-alpn",
        client_hello("db.example.com", &[], both)?,
    )?;
    // An IP address is never sent as SNI.
    write("tls-no-sni", client_hello("10.0.0.1", &[b"h2"], both)?)?;
    let hello = client_hello("API.Example.COM", &[b"h2"], both)?;
    write("tls-split-records", split_record(&hello, 60))?;
    write(
        "http1-get",
        b"GET /healthz HTTP/1.1\r\nhost: web\r\n\r\n".to_vec(),
    )?;
    write(
        "h2-preface",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00".to_vec(),
    )?;
    write("opaque-mysql", b"\x4a\x00\x00\x00\x0a8.0.36\x00".to_vec())?;
    Ok(())
}

fn der_of(pem: &str) -> anyhow::Result<Vec<u8>> {
    use rustls::pki_types::pem::PemObject;
    Ok(CertificateDer::from_pem_slice(pem.as_bytes())?.to_vec())
}

fn with_mode(mode: u8, bytes: &[u8]) -> Vec<u8> {
    let mut out = vec![mode];
    out.extend_from_slice(bytes);
    out
}

/// Inputs for `x509`, from the committed fuzz PKI: the genuine chain with
/// and without edits, each certificate as DER, PEM chains and keys, and
/// SPIFFE IDs good and bad.
fn x509(dir: &Path, pki: &Path) -> anyhow::Result<()> {
    let write = |name: &str, bytes: Vec<u8>| std::fs::write(dir.join(name), bytes);
    let read = |name: &str| std::fs::read_to_string(pki.join(name));
    let (root, intermediate, leaf, key) = (
        read("root.pem")?,
        read("intermediate.pem")?,
        read("leaf.pem")?,
        read("leaf-key.pem")?,
    );
    write("tamper-none", vec![0, 0])?;
    write("tamper-leaf-serial", vec![0, 0, 0, 15, 0x42])?;
    write("tamper-intermediate-server", vec![0, 3, 0, 200, 0x41])?;
    write("der-leaf", with_mode(1, &der_of(&leaf)?))?;
    write("der-intermediate", with_mode(1, &der_of(&intermediate)?))?;
    write("der-root", with_mode(1, &der_of(&root)?))?;
    let ca = TestCa::new("fuzz seed CA");
    let many = ca.issue_server(&["web.example.com", "10.0.0.1"]);
    write(
        "der-dns-and-ip-sans",
        with_mode(1, &der_of(&many.cert_pem)?),
    )?;
    write(
        "pem-chain",
        with_mode(2, format!("{leaf}{intermediate}").as_bytes()),
    )?;
    write("pem-root", with_mode(2, root.as_bytes()))?;
    write("pem-key", with_mode(2, key.as_bytes()))?;
    for (name, id) in [
        ("spiffe-workload", LEAF_ID),
        ("spiffe-other-path", "spiffe://example.org/a/b.c-d_e"),
        ("spiffe-upper-domain", "spiffe://Example.org/x"),
        ("spiffe-dot-segment", "spiffe://example.org/a/../b"),
        ("spiffe-query", "spiffe://example.org/a?b"),
    ] {
        write(name, with_mode(3, id.as_bytes()))?;
    }
    Ok(())
}

/// CSRs for `ca_csr`: the workload's own (every key algorithm), as DER
/// and as PEM text, and ones the CA must refuse (DNS SAN, two URIs,
/// another identity).
fn ca_csr(dir: &Path) -> anyhow::Result<()> {
    use postern_certs::{KeyAlgorithm, SpiffeId, WorkloadKey};
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateSigningRequestDer;
    let write = |name: &str, bytes: Vec<u8>| std::fs::write(dir.join(name), bytes);
    let der = |pem: &str| -> anyhow::Result<Vec<u8>> {
        Ok(CertificateSigningRequestDer::from_pem_slice(pem.as_bytes())?.to_vec())
    };
    let id = SpiffeId::parse(LEAF_ID)?;
    for (name, algorithm) in [
        ("workload-p256", KeyAlgorithm::EcdsaP256),
        ("workload-p384", KeyAlgorithm::EcdsaP384),
        ("workload-ed25519", KeyAlgorithm::Ed25519),
    ] {
        let csr = WorkloadKey::generate(algorithm)?.csr_pem(&id)?;
        write(name, with_mode(0, &der(&csr)?))?;
        if algorithm == KeyAlgorithm::EcdsaP256 {
            write("workload-p256-pem", with_mode(1, csr.as_bytes()))?;
        }
    }
    let other = SpiffeId::parse("spiffe://cluster.local/ns/default/sa/other")?;
    let csr = WorkloadKey::generate(KeyAlgorithm::EcdsaP256)?.csr_pem(&other)?;
    write("other-identity", with_mode(0, &der(&csr)?))?;
    for (name, sans) in [
        (
            "dns-san",
            vec![
                SanType::URI(LEAF_ID.try_into()?),
                SanType::DnsName("web.example.com".try_into()?),
            ],
        ),
        (
            "two-uris",
            vec![
                SanType::URI(LEAF_ID.try_into()?),
                SanType::URI(other.as_str().try_into()?),
            ],
        ),
    ] {
        let mut params = CertificateParams::default();
        params.subject_alt_names = sans;
        let csr = params.serialize_request(&KeyPair::generate()?)?;
        write(name, with_mode(0, csr.der()))?;
    }
    Ok(())
}

/// The fuzz PKI (`fuzz/fixtures/pki`): root, intermediate and a workload
/// leaf valid 2025 to 2045, so the committed seeds keep their meaning.
fn pki(dir: &Path) -> anyhow::Result<()> {
    let write = |name: &str, text: String| std::fs::write(dir.join(name), text);
    let from = time::OffsetDateTime::from_unix_timestamp(1_735_689_600)?; // 2025-01-01
    let to = time::OffsetDateTime::from_unix_timestamp(2_366_841_600)?; // 2045-01-01
    let ca_params = |name: &str, constraint| {
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(constraint);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.not_before = from;
        params.not_after = to;
        params
    };
    let root_key = KeyPair::generate()?;
    let root_params = ca_params("Postern fuzz root", BasicConstraints::Unconstrained);
    write("root.pem", root_params.self_signed(&root_key)?.pem())?;
    let root = Issuer::new(root_params, root_key);
    let mid_key = KeyPair::generate()?;
    let mid_params = ca_params(
        "Postern fuzz intermediate",
        BasicConstraints::Constrained(0),
    );
    write(
        "intermediate.pem",
        mid_params.signed_by(&mid_key, &root)?.pem(),
    )?;
    let mid = Issuer::new(mid_params, mid_key);
    let leaf_key = KeyPair::generate()?;
    let mut leaf = CertificateParams::default();
    leaf.subject_alt_names = vec![SanType::URI(LEAF_ID.try_into()?)];
    leaf.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    leaf.not_before = from;
    leaf.not_after = to;
    write("leaf.pem", leaf.signed_by(&leaf_key, &mid)?.pem())?;
    write("leaf-key.pem", leaf_key.serialize_pem())?;
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let fuzz: PathBuf = args.next().unwrap_or_else(|| "fuzz".into()).into();
    let mut targets: Vec<String> = args.collect();
    if targets.is_empty() {
        targets = [
            "xds_response",
            "xds_delta",
            "client_hello",
            "x509",
            "ca_csr",
        ]
        .map(String::from)
        .to_vec();
    }
    let pki_dir = fuzz.join("fixtures/pki");
    for target in &targets {
        let dir = if target == "pki" {
            pki_dir.clone()
        } else {
            fuzz.join("seeds").join(target)
        };
        std::fs::create_dir_all(&dir)?;
        match target.as_str() {
            "xds_response" => xds_response(&dir)?,
            "xds_delta" => xds_delta(&dir)?,
            "client_hello" => client_hellos(&dir)?,
            "x509" => x509(&dir, &pki_dir)?,
            "ca_csr" => ca_csr(&dir)?,
            "pki" => pki(&dir)?,
            other => anyhow::bail!("no seeds for {other}"),
        }
        println!("wrote {}", dir.display());
    }
    Ok(())
}

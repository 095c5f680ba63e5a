//! Checks and compiles the TLS parts of a config: the workload identity,
//! listener mTLS and edge termination, and cluster TLS. Edge certificates
//! and CA files are read here, so a missing or bad file is reported with its
//! field path like any other mistake.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use postern_certs::{AllowedPeers, CertInfo, KeyAlgorithm, RotationPolicy, SpiffeId, TrustBundle};
use rustls::sign::CertifiedKey;

use super::file::*;
use super::validate::Errors;

/// The workload identity, checked.
#[derive(Debug, Clone)]
pub struct IdentityConfig {
    /// The SPIFFE ID to hold.
    pub id: SpiffeId,
    /// Where certificates come from.
    pub source: IdentitySource,
    /// Algorithm of generated keys.
    pub key_algorithm: KeyAlgorithm,
    /// Validity asked of a CA.
    pub lifetime: std::time::Duration,
    /// When to renew.
    pub policy: RotationPolicy,
}

/// Where the workload certificate comes from.
#[derive(Debug, Clone)]
pub enum IdentitySource {
    /// PEM files on disk.
    Files(FilesSourceFile),
    /// An Istio-compatible CA.
    IstioCa(IstioCaFile),
    /// SDS secrets from the control plane.
    Sds(SdsSourceFile),
}

/// How a listener handles TLS.
#[derive(Debug, Clone)]
pub enum ListenerTls {
    /// Plaintext only.
    Off,
    /// Mesh mTLS with the workload identity.
    Mesh {
        /// Also take plaintext connections.
        permissive: bool,
        /// Client SPIFFE IDs let in.
        allowed: AllowedPeers,
    },
    /// Edge termination with configured certificates.
    Edge(Arc<EdgeTls>),
}

/// Edge TLS termination, with certificates loaded.
#[derive(Debug)]
pub struct EdgeTls {
    /// Server certificates; the first is the default when no SNI matches.
    pub certificates: Vec<EdgeCertificate>,
    /// Roots client certificates must chain to, and whether one is required.
    pub client_auth: Option<(Arc<TrustBundle>, bool)>,
    /// ALPN protocols offered.
    pub alpn: Vec<Vec<u8>>,
    /// Time allowed for the handshake.
    pub handshake_timeout: std::time::Duration,
    /// Refuse clients whose SNI no certificate serves.
    pub require_sni_match: bool,
}

/// One loaded server certificate.
#[derive(Debug)]
pub struct EdgeCertificate {
    /// Lowercase SNI names, `*.` wildcards allowed.
    pub names: Vec<String>,
    /// Chain and signing key.
    pub key: Arc<CertifiedKey>,
    /// Leaf fields, for `/certs`.
    pub info: CertInfo,
}

/// How a cluster talks TLS to its endpoints.
#[derive(Debug, Clone)]
pub enum UpstreamTlsConfig {
    /// mTLS with the workload identity; peers checked by SPIFFE ID.
    Mesh {
        /// SPIFFE IDs the endpoints may present.
        allowed: AllowedPeers,
        /// SNI sent (the cluster name when not set).
        server_name: String,
    },
    /// Server-authenticated TLS checked by DNS name or SAN matchers.
    Simple {
        /// Roots the server certificate must chain to.
        roots: Arc<TrustBundle>,
        /// SNI sent; also the name checked when `sans` is empty. `None`:
        /// no SNI (then `sans` is not empty).
        server_name: Option<String>,
        /// Names the server certificate must carry (one is enough);
        /// checked instead of `server_name` when not empty.
        sans: Vec<SanMatchFile>,
        /// Client certificate presented, if any.
        client: Option<Arc<CertifiedKey>>,
        /// ALPN offered; `None`: by the cluster's protocol.
        alpn: Option<Vec<Vec<u8>>>,
    },
}

pub(super) fn build_identity(file: &IdentityFile, errors: &mut Errors) -> Option<IdentityConfig> {
    let id = match SpiffeId::parse(&file.spiffe_id) {
        Ok(id) => Some(id),
        Err(e) => {
            errors.push("identity.spiffe_id", e.to_string());
            None
        }
    };
    if !(file.renew_at > 0.0 && file.renew_at < 1.0) {
        errors.push("identity.renew_at", "must be between 0 and 1 (exclusive)");
    }
    if !(0.0..0.5).contains(&file.renew_jitter) {
        errors.push("identity.renew_jitter", "must be at least 0 and below 0.5");
    }
    if file.lifetime.as_secs() < 1 {
        errors.push("identity.lifetime", "must be at least 1s");
    }
    let source = match (&file.source.files, &file.source.istio_ca, &file.source.sds) {
        (Some(files), None, None) => Some(IdentitySource::Files(files.clone())),
        (None, Some(ca), None) => Some(IdentitySource::IstioCa(ca.clone())),
        (None, None, Some(sds)) => Some(IdentitySource::Sds(sds.clone())),
        _ => {
            errors.push(
                "identity.source",
                "give exactly one of files, istio_ca, sds",
            );
            None
        }
    };
    match &source {
        Some(IdentitySource::Files(files)) if files.poll_interval.is_zero() => {
            errors.push("identity.source.files.poll_interval", "must be more than 0");
        }
        Some(IdentitySource::IstioCa(ca)) => {
            let path = "identity.source.istio_ca";
            let https = ca.address.starts_with("https://");
            if !(https || ca.address.starts_with("http://"))
                || ca.address.parse::<http::Uri>().is_err()
            {
                errors.push(
                    format!("{path}.address"),
                    format!("\"{}\" is not an http:// or https:// address", ca.address),
                );
            }
            if ca.ca_cert.is_some() && !https {
                errors.push(
                    format!("{path}.ca_cert"),
                    "only used with an https:// address",
                );
            }
            if https && ca.ca_cert.is_none() {
                errors.push(
                    format!("{path}.ca_cert"),
                    "an https:// CA needs the root its TLS certificate chains to",
                );
            }
            // Over plaintext anyone on the path could hand us their own root;
            // the mesh roots must then come from somewhere we trust.
            if !https && ca.trust_bundle.is_none() {
                errors.push(
                    format!("{path}.trust_bundle"),
                    "required with an http:// CA: a root from a plaintext response cannot be trusted",
                );
            }
            if let Some(ca_cert) = &ca.ca_cert {
                load_bundle(ca_cert, &format!("{path}.ca_cert"), errors);
            }
            if let Some(bundle) = &ca.trust_bundle {
                load_bundle(bundle, &format!("{path}.trust_bundle"), errors);
            }
            if ca.timeout.is_zero() {
                errors.push(format!("{path}.timeout"), "must be more than 0");
            }
        }
        _ => {}
    }
    Some(IdentityConfig {
        id: id?,
        source: source?,
        key_algorithm: match file.key_algorithm {
            KeyAlgorithmFile::EcdsaP256 => KeyAlgorithm::EcdsaP256,
            KeyAlgorithmFile::EcdsaP384 => KeyAlgorithm::EcdsaP384,
            KeyAlgorithmFile::Ed25519 => KeyAlgorithm::Ed25519,
        },
        lifetime: file.lifetime,
        policy: RotationPolicy {
            renew_at: file.renew_at,
            jitter: file.renew_jitter,
            ..RotationPolicy::default()
        },
    })
}

fn parse_identities(ids: &[String], path: &str, errors: &mut Errors) -> Vec<SpiffeId> {
    ids.iter()
        .enumerate()
        .filter_map(|(i, raw)| match SpiffeId::parse(raw) {
            Ok(id) => Some(id),
            Err(e) => {
                errors.push(format!("{path}[{i}]"), format!("\"{raw}\": {e}"));
                None
            }
        })
        .collect()
}

pub(super) fn build_listener_tls(
    listener: &ListenerFile,
    path: &str,
    trust_domain: Option<&str>,
    has_identity: bool,
    errors: &mut Errors,
) -> ListenerTls {
    let mesh = listener
        .mtls
        .as_ref()
        .filter(|m| m.mode != MtlsMode::Disable);
    match (mesh, &listener.tls) {
        (Some(_), Some(_)) => {
            errors.push(
                format!("{path}.tls"),
                "give either mtls (mesh) or tls (edge), not both",
            );
            ListenerTls::Off
        }
        (Some(mtls), None) => {
            if !has_identity {
                errors.push(
                    format!("{path}.mtls.mode"),
                    "mesh mTLS needs an identity section to present a certificate",
                );
            }
            let allowed = parse_identities(
                &mtls.allowed_identities,
                &format!("{path}.mtls.allowed_identities"),
                errors,
            );
            ListenerTls::Mesh {
                permissive: mtls.mode == MtlsMode::Permissive,
                allowed: allowed_peers(allowed, trust_domain),
            }
        }
        (None, Some(tls)) => build_edge(tls, &format!("{path}.tls"), errors)
            .map_or(ListenerTls::Off, |edge| ListenerTls::Edge(Arc::new(edge))),
        (None, None) => {
            if let Some(mtls) = &listener.mtls {
                if !mtls.allowed_identities.is_empty() {
                    errors.push(
                        format!("{path}.mtls.allowed_identities"),
                        "has no effect with mode: disable",
                    );
                }
            }
            ListenerTls::Off
        }
    }
}

/// No list means any ID of our own trust domain; without an identity the
/// config is already rejected, and `Any` is never used to check a peer.
fn allowed_peers(ids: Vec<SpiffeId>, trust_domain: Option<&str>) -> AllowedPeers {
    match (ids.is_empty(), trust_domain) {
        (false, _) => AllowedPeers::Only(ids.into()),
        (true, Some(td)) => AllowedPeers::TrustDomain(td.into()),
        (true, None) => AllowedPeers::Any,
    }
}

fn build_edge(tls: &ServerTlsFile, path: &str, errors: &mut Errors) -> Option<EdgeTls> {
    if tls.certificates.is_empty() {
        errors.push(
            format!("{path}.certificates"),
            "needs at least one certificate",
        );
    }
    let mut certificates = Vec::new();
    let mut seen: HashMap<String, usize> = HashMap::new();
    for (i, cert) in tls.certificates.iter().enumerate() {
        let cpath = format!("{path}.certificates[{i}]");
        let Some(loaded) = load_server_cert(cert, &cpath, errors) else {
            continue;
        };
        for name in &loaded.names {
            if let Some(first) = seen.insert(name.clone(), i) {
                errors.push(
                    format!("{cpath}.server_names"),
                    format!("\"{name}\" is already served by certificates[{first}]"),
                );
            }
        }
        certificates.push(loaded);
    }
    let client_auth = tls.client_auth.as_ref().and_then(|auth| {
        let cpath = format!("{path}.client_auth.ca");
        let bundle = match &auth.inline {
            Some(pem) => TrustBundle::from_pem(&pem.0)
                .map_err(|e| errors.push(cpath, e.to_string()))
                .ok(),
            None => load_bundle(&auth.ca, &cpath, errors),
        };
        bundle.map(|bundle| (Arc::new(bundle), auth.required))
    });
    let alpn = match &tls.alpn {
        None => vec![b"h2".to_vec(), b"http/1.1".to_vec()],
        Some(list) => {
            for (i, proto) in list.iter().enumerate() {
                if !matches!(proto.as_str(), "h2" | "http/1.1") {
                    errors.push(
                        format!("{path}.alpn[{i}]"),
                        format!("\"{proto}\" is not one of h2, http/1.1"),
                    );
                }
            }
            list.iter().map(|p| p.as_bytes().to_vec()).collect()
        }
    };
    if tls.handshake_timeout.is_zero() {
        errors.push(format!("{path}.handshake_timeout"), "must be more than 0");
    }
    if certificates.len() != tls.certificates.len() {
        return None;
    }
    Some(EdgeTls {
        certificates,
        client_auth,
        alpn,
        handshake_timeout: tls.handshake_timeout,
        require_sni_match: tls.require_sni_match,
    })
}

fn read_file(file: &Path, path: &str, errors: &mut Errors) -> Option<Vec<u8>> {
    match errors.read(file) {
        Ok(bytes) => Some(bytes.to_vec()),
        Err(e) => {
            errors.push(
                path.to_string(),
                format!("cannot read {}: {e}", file.display()),
            );
            None
        }
    }
}

fn load_bundle(file: &Path, path: &str, errors: &mut Errors) -> Option<TrustBundle> {
    let pem = read_file(file, path, errors)?;
    match TrustBundle::from_pem(&pem) {
        Ok(bundle) => Some(bundle),
        Err(e) => {
            errors.push(path.to_string(), format!("{}: {e}", file.display()));
            None
        }
    }
}

fn load_server_cert(
    cert: &ServerCertificateFile,
    path: &str,
    errors: &mut Errors,
) -> Option<EdgeCertificate> {
    let (chain_pem, key_pem) = match &cert.inline {
        Some((chain, key)) => (chain.0.to_vec(), key.0.to_vec()),
        None => {
            let chain_pem = read_file(&cert.cert, &format!("{path}.cert"), errors);
            let key_pem = read_file(&cert.key, &format!("{path}.key"), errors);
            (chain_pem?, key_pem?)
        }
    };
    let chain = postern_certs::x509::parse_pem_chain(&chain_pem, "certificate chain")
        .map_err(|e| errors.push(format!("{path}.cert"), e.to_string()))
        .ok()?;
    let key = postern_certs::x509::parse_pem_key(&key_pem)
        .map_err(|e| errors.push(format!("{path}.key"), e.to_string()))
        .ok()?;
    let info = CertInfo::parse(&chain[0])
        .map_err(|e| errors.push(format!("{path}.cert"), e.to_string()))
        .ok()?;
    let signer = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|e| errors.push(format!("{path}.key"), format!("unusable key: {e}")))
        .ok()?;
    let certified = CertifiedKey::new(chain, signer);
    if certified.keys_match().is_err() {
        errors.push(format!("{path}.key"), "does not match the certificate");
        return None;
    }
    // A certificate from xDS without names is the catch-all chain's: it
    // serves by being first, not by its SANs, which other chains may claim.
    let names: Vec<String> = if cert.server_names.is_empty() && cert.inline.is_none() {
        info.sans
            .iter()
            .filter_map(|san| san.strip_prefix("DNS:"))
            .map(str::to_ascii_lowercase)
            .collect()
    } else {
        cert.server_names
            .iter()
            .map(|n| n.to_ascii_lowercase())
            .collect()
    };
    for (i, name) in names.iter().enumerate() {
        let bare = name.strip_prefix("*.").unwrap_or(name);
        if bare.is_empty()
            || bare.contains('*')
            || rustls_pki_types::DnsName::try_from(bare).is_err()
        {
            errors.push(
                format!("{path}.server_names[{i}]"),
                format!("\"{name}\" is not a DNS name or *.wildcard"),
            );
        }
    }
    Some(EdgeCertificate {
        names,
        key: Arc::new(certified),
        info,
    })
}

pub(super) fn build_upstream_tls(
    cluster: &ClusterFile,
    path: &str,
    has_identity: bool,
    errors: &mut Errors,
) -> Option<UpstreamTlsConfig> {
    let tls = cluster.tls.as_ref()?;
    let path = format!("{path}.tls");
    let server_name = tls.server_name.clone();
    if let Some(name) = &server_name {
        if rustls_pki_types::ServerName::try_from(name.as_str()).is_err() {
            errors.push(
                format!("{path}.server_name"),
                format!("\"{name}\" is not a valid server name"),
            );
        }
    }
    match tls.mode {
        UpstreamTlsMode::Mesh => {
            if !has_identity {
                errors.push(
                    format!("{path}.mode"),
                    "mesh TLS needs an identity section to present a certificate",
                );
            }
            if tls.ca.is_some() {
                errors.push(format!("{path}.ca"), "mesh peers are checked against the identity's trust bundle; ca is only for mode: simple");
            }
            for (field, set) in [
                ("subject_alt_names", !tls.subject_alt_names.is_empty()),
                ("client_cert", tls.client_cert.is_some()),
                ("client_key", tls.client_key.is_some()),
                ("alpn", tls.alpn.is_some()),
            ] {
                if set {
                    errors.push(format!("{path}.{field}"), "only used with mode: simple");
                }
            }
            if tls.identities.is_empty() {
                errors.push(
                    format!("{path}.identities"),
                    "mesh TLS needs the SPIFFE IDs the endpoints may present",
                );
            }
            let allowed = parse_identities(&tls.identities, &format!("{path}.identities"), errors);
            Some(UpstreamTlsConfig::Mesh {
                allowed: allowed_peers(allowed, None),
                server_name: server_name.unwrap_or_else(|| sni_from_cluster(&cluster.name)),
            })
        }
        UpstreamTlsMode::Simple => build_simple(tls, &path, server_name, cluster.protocol, errors),
    }
}

fn build_simple(
    tls: &UpstreamTlsFile,
    path: &str,
    server_name: Option<String>,
    protocol: UpstreamProtocol,
    errors: &mut Errors,
) -> Option<UpstreamTlsConfig> {
    if !tls.identities.is_empty() {
        errors.push(format!("{path}.identities"), "only used with mode: mesh");
    }
    if server_name.is_none() && tls.subject_alt_names.is_empty() {
        errors.push(
            format!("{path}.server_name"),
            "mode: simple needs the DNS name to check, or subject_alt_names",
        );
    }
    for (i, san) in tls.subject_alt_names.iter().enumerate() {
        let bad = match san {
            SanMatchFile::Dns(name) => rustls_pki_types::DnsName::try_from(name.as_str()).is_err(),
            SanMatchFile::Uri(uri) => uri.is_empty(),
        };
        if bad {
            errors.push(
                format!("{path}.subject_alt_names[{i}]"),
                format!("{san:?} is not a DNS name or URI"),
            );
        }
    }
    let alpn = tls.alpn.as_ref().map(|list| {
        // The pool speaks the cluster's protocol whatever the server picks,
        // so only that protocol may be offered.
        let spoken = match protocol {
            UpstreamProtocol::Http2 => "h2",
            UpstreamProtocol::Http1 => "http/1.1",
        };
        for (i, proto) in list.iter().enumerate() {
            if proto != spoken {
                errors.push(
                    format!("{path}.alpn[{i}]"),
                    format!("\"{proto}\" is not {spoken}, the protocol the cluster speaks"),
                );
            }
        }
        list.iter().map(|p| p.as_bytes().to_vec()).collect()
    });
    let client = match (&tls.client_inline, &tls.client_cert, &tls.client_key) {
        (Some((chain, key)), ..) => Some(load_client_cert(&chain.0, &key.0, path, errors)),
        (None, Some(cert), Some(key)) => {
            let chain = read_file(cert, &format!("{path}.client_cert"), errors);
            let key = read_file(key, &format!("{path}.client_key"), errors);
            match (chain, key) {
                (Some(chain), Some(key)) => Some(load_client_cert(&chain, &key, path, errors)),
                _ => Some(None),
            }
        }
        (None, Some(_), None) => {
            errors.push(format!("{path}.client_key"), "client_cert needs its key");
            Some(None)
        }
        (None, None, Some(_)) => {
            errors.push(
                format!("{path}.client_cert"),
                "client_key needs its certificate",
            );
            Some(None)
        }
        (None, None, None) => None,
    };
    let roots = match (&tls.ca_inline, &tls.ca) {
        (Some(pem), _) => TrustBundle::from_pem(&pem.0)
            .map_err(|e| errors.push(format!("{path}.ca"), e.to_string()))
            .ok(),
        (None, Some(ca)) => load_bundle(ca, &format!("{path}.ca"), errors),
        (None, None) => {
            errors.push(
                format!("{path}.ca"),
                "mode: simple needs the roots to check the server against",
            );
            None
        }
    };
    Some(UpstreamTlsConfig::Simple {
        roots: Arc::new(roots?),
        server_name,
        sans: tls.subject_alt_names.clone(),
        // `Some(None)`: a client certificate was given but is unusable.
        client: match client {
            Some(loaded) => Some(loaded?),
            None => None,
        },
        alpn,
    })
}

fn load_client_cert(
    chain_pem: &[u8],
    key_pem: &[u8],
    path: &str,
    errors: &mut Errors,
) -> Option<Arc<CertifiedKey>> {
    let chain = postern_certs::x509::parse_pem_chain(chain_pem, "certificate chain")
        .map_err(|e| errors.push(format!("{path}.client_cert"), e.to_string()))
        .ok()?;
    let key = postern_certs::x509::parse_pem_key(key_pem)
        .map_err(|e| errors.push(format!("{path}.client_key"), e.to_string()))
        .ok()?;
    let signer = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|e| errors.push(format!("{path}.client_key"), format!("unusable key: {e}")))
        .ok()?;
    let certified = CertifiedKey::new(chain, signer);
    if certified.keys_match().is_err() {
        errors.push(
            format!("{path}.client_key"),
            "does not match the certificate",
        );
        return None;
    }
    Some(Arc::new(certified))
}

/// Cluster names may hold characters SNI does not take; mesh peers ignore it anyway.
fn sni_from_cluster(name: &str) -> String {
    let cleaned: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    let cleaned = cleaned.trim_matches(['-', '.']).to_string();
    if cleaned.is_empty() {
        "outbound.postern".to_string()
    } else {
        cleaned
    }
}

//! Filter chains of a plain (non-capture) Listener that amount to one
//! listener setting: plaintext; mesh mTLS, `strict`, or `permissive` as
//! Istio writes it (a `tls` chain with the workload's context next to a
//! `raw_buffer` one); or edge TLS with the certificate chosen by SNI
//! (`server_names`), every chain carrying the same network filter. Such a
//! listener keeps one route table; any other is routed per chain
//! (`xds_chain_routing.rs`). Also the edge TLS contexts both forms use.

use std::path::PathBuf;
use std::sync::Arc;

use super::*;

/// An SDS secret an edge listener needs before it can serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EdgeSecret {
    /// The field that names it.
    pub field: String,
    /// The Secret resource's name.
    pub name: String,
    /// Where it goes.
    pub slot: EdgeSlot,
}

/// Where an edge secret goes in the listener's `tls`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EdgeSlot {
    /// `certificates[i]`: a `tls_certificate` secret.
    Certificate(usize),
    /// `client_auth`: a `validation_context` secret.
    ClientCa,
    /// `filter_chains[i].listener.tls.certificates[0]`.
    ChainCertificate(usize),
    /// `filter_chains[i].listener.tls.client_auth`.
    ChainClientCa(usize),
}

/// Fills an edge listener's certificates and client roots from the SDS
/// secrets it names. `Ok(false)` while one has not arrived (the listener
/// warms); an error naming the field when a secret is of the wrong kind.
pub fn fill_edge_secrets(
    file: &mut ListenerFile,
    needs: &[EdgeSecret],
    secrets: &dyn Fn(&str) -> Option<SecretValue>,
) -> Result<bool, String> {
    for need in needs {
        let (tls, slot) = match need.slot {
            EdgeSlot::ChainCertificate(c) => (
                file.filter_chains
                    .get_mut(c)
                    .and_then(|f| f.listener.tls.as_mut()),
                EdgeSlot::Certificate(0),
            ),
            EdgeSlot::ChainClientCa(c) => (
                file.filter_chains
                    .get_mut(c)
                    .and_then(|f| f.listener.tls.as_mut()),
                EdgeSlot::ClientCa,
            ),
            slot => (file.tls.as_mut(), slot),
        };
        let Some(tls) = tls else {
            continue;
        };
        let Some(value) = secrets(&need.name) else {
            return Ok(false);
        };
        let pem = |bytes: Vec<u8>| InlinePem(Arc::new(bytes));
        match (slot, value) {
            (EdgeSlot::Certificate(i), SecretValue::Certificate(chain, key)) => {
                if let Some(cert) = tls.certificates.get_mut(i) {
                    cert.inline = Some((pem(chain), pem(key)));
                }
            }
            (EdgeSlot::ClientCa, SecretValue::Validation(roots)) => {
                if let Some(auth) = tls.client_auth.as_mut() {
                    auth.inline = Some(pem(roots));
                }
            }
            (EdgeSlot::Certificate(_) | EdgeSlot::ChainCertificate(_), _) => {
                return Err(format!(
                    "{}: secret \"{}\" is a validation context, not a tls_certificate",
                    need.field, need.name
                ))
            }
            (EdgeSlot::ClientCa | EdgeSlot::ChainClientCa(_), _) => {
                return Err(format!(
                    "{}: secret \"{}\" is a tls_certificate, not a validation context",
                    need.field, need.name
                ))
            }
        }
    }
    Ok(true)
}

/// One chain's edge TLS context.
pub(super) struct EdgeChain {
    cert: Option<(Vec<u8>, Vec<u8>)>,
    cert_secret: Option<String>,
    client_auth: Option<ClientAuthFile>,
    ca_secret: Option<String>,
    alpn: Vec<String>,
}

impl EdgeChain {
    /// What Postern holds once per listener, to compare across chains.
    fn shared(&self) -> String {
        format!(
            "{:?} {:?} {:?}",
            self.client_auth
                .as_ref()
                .map(|a| (a.required, a.inline.as_ref().map(|p| p.0.clone()))),
            self.ca_secret,
            self.alpn,
        )
    }
}

pub(super) enum ChainTls {
    Mesh(ListenerMtlsFile),
    Edge(EdgeChain),
}

/// The filter chains (and `default_filter_chain`) of a plain listener into
/// `file`: its network filter and its `mtls` or `tls`. Returns where its
/// routes come from and the SDS secrets edge TLS waits for.
pub(super) fn filter_chains(
    l: &listener::Listener,
    file: &mut ListenerFile,
    sds: Option<&SdsSourceFile>,
    ctx: &mut Ctx,
    log_clusters: &dyn Fn(&str) -> Option<String>,
) -> (RouteSource, Vec<EdgeSecret>) {
    let mut chains: Vec<(String, &listener::FilterChain)> = l
        .filter_chains
        .iter()
        .enumerate()
        .map(|(i, c)| (format!("filter_chains[{i}]"), c))
        .collect();
    if let Some(default) = &l.default_filter_chain {
        chains.push(("default_filter_chain".into(), default));
    }
    if chains.is_empty() {
        ctx.err("filter_chains", "needs one filter chain");
        return (RouteSource::None, Vec::new());
    }
    let mut first: Option<(String, String, ListenerFile, RouteSource)> = None;
    let mut plain: Vec<String> = Vec::new();
    let mut mesh: Vec<(String, ListenerMtlsFile)> = Vec::new();
    let mut edge: Vec<(String, Vec<String>, EdgeChain)> = Vec::new();
    for (cpath, chain) in &chains {
        let m = chain.filter_chain_match.clone().unwrap_or_default();
        let mpath = format!("{cpath}.filter_chain_match");
        for (field, set) in [
            ("destination_port", m.destination_port.is_some()),
            ("prefix_ranges", !m.prefix_ranges.is_empty()),
            ("address_suffix", !m.address_suffix.is_empty()),
            ("suffix_len", m.suffix_len.is_some()),
            (
                "direct_source_prefix_ranges",
                !m.direct_source_prefix_ranges.is_empty(),
            ),
            ("source_type", m.source_type != 0),
            ("source_prefix_ranges", !m.source_prefix_ranges.is_empty()),
            ("source_ports", !m.source_ports.is_empty()),
        ] {
            if set {
                ctx.unsupported(format!(
                    "{mpath}.{field} (outside an inbound capture listener)"
                ));
            }
        }
        let transport = match m.transport_protocol.as_str() {
            "" => None,
            "tls" => Some(true),
            "raw_buffer" => Some(false),
            other => {
                ctx.unsupported(format!("{mpath}.transport_protocol \"{other}\""));
                None
            }
        };

        let mut scratch = file.clone();
        let routes = chain_filters(chain, cpath, &mut scratch, ctx, log_clusters);
        let signature = format!(
            "{} {routes:?}",
            serde_json::to_string(&scratch).unwrap_or_default()
        );
        match &first {
            None => first = Some((cpath.clone(), signature, scratch, routes)),
            Some((from, known, ..)) if *known != signature => ctx.unsupported(format!(
                "{cpath}.filters (differ from {from}'s: Postern routes per listener, not per filter chain)"
            )),
            Some(_) => {}
        }

        let spath = format!("{cpath}.transport_socket");
        let Some(socket) = &chain.transport_socket else {
            if transport == Some(true) {
                ctx.unsupported(format!(
                    "{mpath}.transport_protocol \"tls\" without a transport_socket (TLS passed through)"
                ));
            }
            if !m.server_names.is_empty() {
                ctx.unsupported(format!("{mpath}.server_names (on a plaintext chain)"));
            }
            if !m.application_protocols.is_empty() {
                ctx.unsupported(format!(
                    "{mpath}.application_protocols (on a plaintext chain)"
                ));
            }
            plain.push(cpath.clone());
            continue;
        };
        if transport == Some(false) {
            ctx.err(
                format!("{mpath}.transport_protocol"),
                "\"raw_buffer\" on a chain with a TLS transport_socket",
            );
        }
        match classify(socket, &spath, sds, ctx) {
            None => {}
            Some(ChainTls::Mesh(mtls)) => {
                if !m.server_names.is_empty() {
                    ctx.unsupported(format!("{mpath}.server_names (on mesh mTLS)"));
                }
                // Mesh peers are sidecars, which offer these; a chain that
                // asks for them takes the same handshakes Postern does.
                for (i, alpn) in m.application_protocols.iter().enumerate() {
                    if !HTTP_ALPN.contains(&alpn.as_str())
                        && !MESH_MARKER_ALPN.contains(&alpn.as_str())
                    {
                        ctx.unsupported(format!("{mpath}.application_protocols[{i}] \"{alpn}\""));
                    }
                }
                mesh.push((cpath.clone(), mtls));
            }
            Some(ChainTls::Edge(chain)) => {
                if !m.application_protocols.is_empty() {
                    ctx.unsupported(format!(
                        "{mpath}.application_protocols (on edge TLS: Postern picks the certificate by SNI only)"
                    ));
                }
                edge.push((cpath.clone(), m.server_names.clone(), chain));
            }
        }
    }
    let Some((_, _, chosen, routes)) = first else {
        return (RouteSource::None, Vec::new());
    };
    *file = chosen;
    let mut secrets = Vec::new();
    match (plain.first(), mesh.first(), edge.first()) {
        (_, None, None) => {}
        (plain_chain, Some((from, known)), None) => {
            let sorted = |m: &ListenerMtlsFile| {
                let mut ids = m.allowed_identities.clone();
                ids.sort();
                ids
            };
            for (cpath, other) in &mesh[1..] {
                if sorted(other) != sorted(known) {
                    ctx.unsupported(format!(
                        "{cpath}.transport_socket (allows other SPIFFE IDs than {from}: Postern has one mTLS setting per listener)"
                    ));
                }
            }
            let mut mtls = known.clone();
            if plain_chain.is_some() {
                mtls.mode = MtlsMode::Permissive;
            }
            file.mtls = Some(mtls);
        }
        (_, Some(_), Some((cpath, ..))) => ctx.unsupported(format!(
            "{cpath}.transport_socket (edge TLS next to mesh mTLS on one listener)"
        )),
        (Some(cpath), None, Some(_)) => ctx.unsupported(format!(
            "{cpath} (plaintext next to edge TLS on one listener)"
        )),
        (None, None, Some(_)) => {
            file.tls = edge_tls(edge, &mut secrets, ctx);
        }
    }
    (routes, secrets)
}

/// Edge chains as one `tls`: the chain for every name (if any) first, as
/// the certificate for an SNI no other chain names.
pub(super) fn edge_tls(
    mut edge: Vec<(String, Vec<String>, EdgeChain)>,
    secrets: &mut Vec<EdgeSecret>,
    ctx: &mut Ctx,
) -> Option<ServerTlsFile> {
    edge.sort_by_key(|(_, names, _)| !names.is_empty());
    let catch_all: Vec<&String> = edge
        .iter()
        .filter(|(_, names, _)| names.is_empty())
        .map(|(p, ..)| p)
        .collect();
    if let [first, second, ..] = catch_all.as_slice() {
        ctx.err(
            format!("{second}.filter_chain_match"),
            format!("matches every server name, as {first} does"),
        );
    }
    let mut seen: std::collections::HashMap<String, String> = Default::default();
    let (from, _, head) = edge.first()?;
    let shared = head.shared();
    let from = from.clone();
    let alpn = head.alpn.clone();
    let client_auth = head.client_auth.clone();
    let mut certificates = Vec::new();
    for (i, (cpath, names, chain)) in edge.iter().enumerate() {
        for (j, name) in names.iter().enumerate() {
            let name = name.to_ascii_lowercase();
            if let Some(other) = seen.insert(name.clone(), cpath.clone()) {
                ctx.err(
                    format!("{cpath}.filter_chain_match.server_names[{j}]"),
                    format!("\"{name}\" is matched by {other} too"),
                );
            }
        }
        if chain.shared() != shared {
            ctx.unsupported(format!(
                "{cpath}.transport_socket (client certificate and ALPN settings differ from {from}'s: Postern has one TLS setting per listener)"
            ));
        }
        let pem = |b: &Vec<u8>| InlinePem(Arc::new(b.clone()));
        certificates.push(ServerCertificateFile {
            cert: PathBuf::new(),
            key: PathBuf::new(),
            server_names: names.clone(),
            inline: chain.cert.as_ref().map(|(c, k)| (pem(c), pem(k))),
        });
        if let Some(name) = &chain.cert_secret {
            secrets.push(EdgeSecret {
                field: format!(
                    "{cpath}.transport_socket.common_tls_context.tls_certificate_sds_secret_configs[0]"
                ),
                name: name.clone(),
                slot: EdgeSlot::Certificate(i),
            });
        }
    }
    if let Some(name) = &head.ca_secret {
        secrets.push(EdgeSecret {
            field: format!("{from}.transport_socket.common_tls_context.validation_context"),
            name: name.clone(),
            slot: EdgeSlot::ClientCa,
        });
    }
    Some(ServerTlsFile {
        certificates,
        client_auth,
        alpn: Some(alpn),
        // The static config's default: Envoy sets none, but a client that
        // never finishes its handshake must not hold a connection forever.
        handshake_timeout: Duration::from_secs(10),
        require_sni_match: catch_all.is_empty(),
    })
}

/// A chain's DownstreamTlsContext: mesh mTLS when it presents the workload
/// identity's certificate, edge TLS otherwise.
pub(super) fn classify(
    socket: &core::TransportSocket,
    path: &str,
    sds: Option<&SdsSourceFile>,
    ctx: &mut Ctx,
) -> Option<ChainTls> {
    let context = downstream_context(socket, path, ctx)?;
    let workload = sds.is_some_and(|names| {
        context.common_tls_context.as_ref().is_some_and(|c| {
            c.tls_certificate_sds_secret_configs
                .iter()
                .any(|s| s.name == names.certificate)
        })
    });
    if workload {
        mesh_mtls(&context, path, sds, ctx).map(ChainTls::Mesh)
    } else {
        edge_context(&context, path, ctx).map(ChainTls::Edge)
    }
}

fn edge_context(
    context: &tls::DownstreamTlsContext,
    path: &str,
    ctx: &mut Ctx,
) -> Option<EdgeChain> {
    use tls::common_tls_context::ValidationContextType as V;
    let cpath = format!("{path}.common_tls_context");
    let Some(common) = &context.common_tls_context else {
        ctx.err(cpath, "is required");
        return None;
    };
    for (field, set) in [
        (
            "require_sni",
            context.require_sni.as_ref().is_some_and(|v| v.value),
        ),
        ("ocsp_staple_policy", context.ocsp_staple_policy != 0),
        (
            "session_ticket_keys_type",
            context.session_ticket_keys_type.is_some(),
        ),
    ] {
        if set {
            ctx.unsupported(format!("{path}.{field}"));
        }
    }
    for (field, set) in [
        (
            "tls_certificate_provider_instance",
            common.tls_certificate_provider_instance.is_some(),
        ),
        (
            "custom_tls_certificate_selector",
            common.custom_tls_certificate_selector.is_some(),
        ),
        ("custom_handshaker", common.custom_handshaker.is_some()),
        ("key_log", common.key_log.is_some()),
    ] {
        if set {
            ctx.unsupported(format!("{cpath}.{field}"));
        }
    }
    #[allow(deprecated)]
    let old_providers = common.tls_certificate_certificate_provider.is_some()
        || common
            .tls_certificate_certificate_provider_instance
            .is_some();
    if old_providers {
        ctx.unsupported(format!("{cpath}.tls_certificate_certificate_provider"));
    }
    let (cert, cert_secret) = match (
        common.tls_certificates.as_slice(),
        common.tls_certificate_sds_secret_configs.as_slice(),
    ) {
        ([c], []) => {
            let tpath = format!("{cpath}.tls_certificates[0]");
            for (field, set) in [
                ("pkcs12", c.pkcs12.is_some()),
                ("watched_directory", c.watched_directory.is_some()),
                ("private_key_provider", c.private_key_provider.is_some()),
                ("password", c.password.is_some()),
                ("ocsp_staple", c.ocsp_staple.is_some()),
                (
                    "signed_certificate_timestamp",
                    !c.signed_certificate_timestamp.is_empty(),
                ),
            ] {
                if set {
                    ctx.unsupported(format!("{tpath}.{field}"));
                }
            }
            let chain = inline(
                &c.certificate_chain,
                &format!("{tpath}.certificate_chain"),
                ctx,
            );
            let key = inline(&c.private_key, &format!("{tpath}.private_key"), ctx);
            if let Err(e) = postern_certs::x509::parse_pem_chain(&chain, "certificate chain") {
                ctx.err(format!("{tpath}.certificate_chain"), e.to_string());
            }
            if let Err(e) = postern_certs::x509::parse_pem_key(&key) {
                ctx.err(format!("{tpath}.private_key"), e.to_string());
            }
            (Some((chain, key)), None)
        }
        ([], [secret]) => (None, Some(secret.name.clone())),
        ([], []) => {
            ctx.err(
                format!("{cpath}.tls_certificates"),
                "a server certificate is required (tls_certificates or tls_certificate_sds_secret_configs)",
            );
            return None;
        }
        _ => {
            ctx.unsupported(format!(
                "{cpath}.tls_certificates (more than one certificate in a filter chain)"
            ));
            return None;
        }
    };
    let (validation, ca_secret) = match &common.validation_context_type {
        None => (None, None),
        Some(V::ValidationContext(v)) => (Some(v), None),
        Some(V::ValidationContextSdsSecretConfig(s)) => (None, Some(s.name.clone())),
        Some(V::CombinedValidationContext(c)) => (
            c.default_validation_context.as_ref(),
            c.validation_context_sds_secret_config
                .as_ref()
                .map(|s| s.name.clone()),
        ),
        Some(_) => {
            ctx.unsupported(format!("{cpath}.validation_context_type"));
            (None, None)
        }
    };
    let mut ca_pem = None;
    if let Some(v) = validation {
        let vpath = format!("{cpath}.validation_context");
        #[allow(deprecated)]
        let sans =
            !v.match_subject_alt_names.is_empty() || !v.match_typed_subject_alt_names.is_empty();
        for (field, set) in [
            (
                "match_typed_subject_alt_names (client names are not checked on an edge listener)",
                sans,
            ),
            (
                "verify_certificate_spki",
                !v.verify_certificate_spki.is_empty(),
            ),
            (
                "verify_certificate_hash",
                !v.verify_certificate_hash.is_empty(),
            ),
            ("crl", v.crl.is_some()),
            ("allow_expired_certificate", v.allow_expired_certificate),
            ("trust_chain_verification", v.trust_chain_verification != 0),
            (
                "ca_certificate_provider_instance",
                v.ca_certificate_provider_instance.is_some(),
            ),
            ("system_root_certs", v.system_root_certs.is_some()),
            ("watched_directory", v.watched_directory.is_some()),
            (
                "require_signed_certificate_timestamp",
                v.require_signed_certificate_timestamp
                    .as_ref()
                    .is_some_and(|b| b.value),
            ),
        ] {
            if set {
                ctx.unsupported(format!("{vpath}.{field}"));
            }
        }
        if v.trusted_ca.is_some() {
            if ca_secret.is_some() {
                ctx.unsupported(format!(
                    "{vpath}.trusted_ca (next to an SDS validation context)"
                ));
            } else {
                let roots = inline(&v.trusted_ca, &format!("{vpath}.trusted_ca"), ctx);
                if let Err(e) = postern_certs::TrustBundle::from_pem(&roots) {
                    ctx.err(format!("{vpath}.trusted_ca"), e.to_string());
                }
                ca_pem = Some(roots);
            }
        }
    }
    let required = context
        .require_client_certificate
        .as_ref()
        .is_some_and(|r| r.value);
    let has_ca = ca_pem.is_some() || ca_secret.is_some();
    if required && !has_ca {
        ctx.err(
            format!("{path}.require_client_certificate"),
            "needs a validation context with the roots client certificates must chain to",
        );
    }
    let client_auth = has_ca.then(|| ClientAuthFile {
        ca: PathBuf::new(),
        required,
        inline: ca_pem.map(|p| InlinePem(Arc::new(p))),
    });
    for (i, alpn) in common.alpn_protocols.iter().enumerate() {
        if !matches!(alpn.as_str(), "h2" | "http/1.1") {
            ctx.unsupported(format!(
                "{cpath}.alpn_protocols[{i}] \"{alpn}\" (h2 and http/1.1 only)"
            ));
        }
    }
    if let Some(params) = &common.tls_params {
        tls_params(params, &format!("{cpath}.tls_params"), ctx);
    }
    Some(EdgeChain {
        cert,
        cert_secret,
        client_auth,
        ca_secret,
        alpn: common.alpn_protocols.clone(),
    })
}

/// Postern's edge speaks TLS 1.2 and 1.3 with a fixed set of strong
/// suites: anything asking for less is refused, anything narrower is not
/// supported.
fn tls_params(params: &tls::TlsParameters, path: &str, ctx: &mut Ctx) {
    const TLS_1_2: i32 = 3;
    const TLS_1_3: i32 = 4;
    for (field, version, narrower) in [
        (
            "tls_minimum_protocol_version",
            params.tls_minimum_protocol_version,
            TLS_1_3,
        ),
        (
            "tls_maximum_protocol_version",
            params.tls_maximum_protocol_version,
            TLS_1_2,
        ),
    ] {
        match version {
            0 => {}
            1 | 2 => ctx.err(
                format!("{path}.{field}"),
                "below TLS 1.2 is refused: the edge speaks TLS 1.2 and 1.3 only",
            ),
            v if v == narrower => ctx.unsupported(format!(
                "{path}.{field} (the edge always speaks both TLS 1.2 and 1.3)"
            )),
            TLS_1_2 | TLS_1_3 => {}
            other => ctx.err(
                format!("{path}.{field}"),
                format!("unknown version {other}"),
            ),
        }
    }
    for (field, set) in [
        ("cipher_suites", !params.cipher_suites.is_empty()),
        ("ecdh_curves", !params.ecdh_curves.is_empty()),
        (
            "signature_algorithms",
            !params.signature_algorithms.is_empty(),
        ),
    ] {
        if set {
            ctx.unsupported(format!(
                "{path}.{field} (the edge's set is fixed, with no weak ones)"
            ));
        }
    }
}

//! Filter chain matching on a plain listener: Istio's permissive pattern,
//! edge TLS by SNI (inline and SDS certificates), and what is refused.

use postern_proto::envoy::extensions::transport_sockets::tls::v3 as tls;
use postern_proto::google::protobuf::BoolValue;

use super::*;
use crate::config::{Config, ListenerTls};

pub(super) fn sds() -> SdsSourceFile {
    serde_yaml_ng::from_str("{}").unwrap()
}

pub(super) fn socket_of(context: &tls::DownstreamTlsContext) -> core::TransportSocket {
    core::TransportSocket {
        name: "envoy.transport_sockets.tls".into(),
        config_type: Some(core::transport_socket::ConfigType::TypedConfig(any(
            context,
        ))),
    }
}

pub(super) fn secret(name: &str) -> tls::SdsSecretConfig {
    tls::SdsSecretConfig {
        name: name.into(),
        ..Default::default()
    }
}

/// Istio's inbound context: the workload's `default` and `ROOTCA`.
pub(super) fn mesh_context() -> core::TransportSocket {
    use tls::common_tls_context::ValidationContextType as V;
    socket_of(&tls::DownstreamTlsContext {
        require_client_certificate: Some(BoolValue { value: true }),
        common_tls_context: Some(tls::CommonTlsContext {
            tls_certificate_sds_secret_configs: vec![secret("default")],
            validation_context_type: Some(V::ValidationContextSdsSecretConfig(secret("ROOTCA"))),
            ..Default::default()
        }),
        ..Default::default()
    })
}

fn inline(text: &str) -> Option<core::DataSource> {
    Some(core::DataSource {
        specifier: Some(core::data_source::Specifier::InlineString(text.into())),
        ..Default::default()
    })
}

/// A self-signed certificate for `name`, as PEM chain and key.
pub(super) fn cert_for(name: &str) -> (String, String) {
    let issued = rcgen::generate_simple_self_signed(vec![name.to_string()]).unwrap();
    (issued.cert.pem(), issued.signing_key.serialize_pem())
}

pub(super) fn edge_context(
    edit: impl FnOnce(&mut tls::DownstreamTlsContext),
) -> core::TransportSocket {
    let mut context = tls::DownstreamTlsContext {
        common_tls_context: Some(tls::CommonTlsContext {
            tls_certificate_sds_secret_configs: vec![secret("gateway-cert")],
            alpn_protocols: vec!["h2".into(), "http/1.1".into()],
            ..Default::default()
        }),
        ..Default::default()
    };
    edit(&mut context);
    socket_of(&context)
}

pub(super) fn inline_cert(name: &str) -> impl FnOnce(&mut tls::DownstreamTlsContext) {
    let (chain, key) = cert_for(name);
    move |c| {
        let common = c.common_tls_context.as_mut().unwrap();
        common.tls_certificate_sds_secret_configs.clear();
        common.tls_certificates = vec![tls::TlsCertificate {
            certificate_chain: inline(&chain),
            private_key: inline(&key),
            ..Default::default()
        }];
    }
}

pub(super) fn chain(
    m: listener::FilterChainMatch,
    socket: Option<core::TransportSocket>,
) -> listener::FilterChain {
    listener::FilterChain {
        filter_chain_match: Some(m),
        transport_socket: socket,
        filters: http_listener(Vec::new()).filter_chains[0].filters.clone(),
        ..Default::default()
    }
}

pub(super) fn by_transport(protocol: &str, alpn: &[&str]) -> listener::FilterChainMatch {
    listener::FilterChainMatch {
        transport_protocol: protocol.into(),
        application_protocols: alpn.iter().map(|a| a.to_string()).collect(),
        ..Default::default()
    }
}

pub(super) fn by_names(names: &[&str]) -> listener::FilterChainMatch {
    listener::FilterChainMatch {
        server_names: names.iter().map(|a| a.to_string()).collect(),
        ..Default::default()
    }
}

pub(super) fn with_chains(chains: Vec<listener::FilterChain>) -> listener::Listener {
    listener::Listener {
        filter_chains: chains,
        ..http_listener(Vec::new())
    }
}

/// `file` with routes to one cluster, compiled.
pub(super) fn compile(mut file: ListenerFile) -> Config {
    file.virtual_hosts = route_configuration(&config_of(vec![route_to("backend")]))
        .unwrap()
        .virtual_hosts;
    let mut config: ConfigFile = serde_yaml_ng::from_str(
        "clusters: [{ name: backend, endpoints: [{ address: 127.0.0.1:9 }] }]",
    )
    .unwrap();
    config.listeners.push(file);
    Config::from_dynamic_model(config).unwrap_or_else(|e| panic!("{e}"))
}

pub(super) fn problems_of(l: &listener::Listener) -> String {
    listener_parts(l, Some(&sds()), &|_| None)
        .unwrap_err()
        .join("\n")
}

fn permissive_listener() -> listener::Listener {
    with_chains(vec![
        chain(
            by_transport("tls", &["istio-peer-exchange", "istio"]),
            Some(mesh_context()),
        ),
        chain(by_transport("raw_buffer", &[]), None),
    ])
}

#[test]
fn istio_permissive_pattern_becomes_a_permissive_listener() {
    let translated = listener_parts(&permissive_listener(), Some(&sds()), &|_| None).unwrap();
    let mtls = translated.file.mtls.as_ref().unwrap();
    assert_eq!(mtls.mode, MtlsMode::Permissive);
    assert_eq!(translated.routes, RouteSource::Rds("rc".into()));
    assert!(translated.file.tls.is_none() && translated.edge_secrets.is_empty());

    // The plaintext side as default_filter_chain means the same.
    let mut l = permissive_listener();
    l.default_filter_chain = l.filter_chains.pop();
    let translated = listener_parts(&l, Some(&sds()), &|_| None).unwrap();
    assert_eq!(translated.file.mtls.unwrap().mode, MtlsMode::Permissive);

    // The TLS chain alone: strict.
    l.default_filter_chain = None;
    let translated = listener_parts(&l, Some(&sds()), &|_| None).unwrap();
    assert_eq!(translated.file.mtls.unwrap().mode, MtlsMode::Strict);
}

#[test]
fn chains_by_server_name_become_edge_tls_with_a_certificate_per_name() {
    use tls::common_tls_context::ValidationContextType as V;
    let (ca, _) = cert_for("clients.example.com");
    let client_roots = move |c: &mut tls::DownstreamTlsContext| {
        c.common_tls_context
            .as_mut()
            .unwrap()
            .validation_context_type =
            Some(V::ValidationContext(tls::CertificateValidationContext {
                trusted_ca: inline(&ca),
                ..Default::default()
            }));
    };
    let context = |name: &str| {
        let cert = inline_cert(name);
        let roots = client_roots.clone();
        edge_context(move |c| {
            cert(c);
            roots(c);
        })
    };
    let l = with_chains(vec![
        chain(by_names(&["a.example.com"]), Some(context("a.example.com"))),
        chain(
            by_names(&["b.example.com", "*.b.example.com"]),
            Some(context("b.example.com")),
        ),
    ]);
    // Without an identity too: edge TLS needs none.
    let translated = listener_parts(&l, None, &|_| None).unwrap();
    let edge = translated.file.tls.as_ref().unwrap();
    assert!(translated.file.mtls.is_none() && translated.edge_secrets.is_empty());
    assert_eq!(edge.certificates.len(), 2);
    assert_eq!(edge.certificates[0].server_names, ["a.example.com"]);
    assert_eq!(
        edge.certificates[1].server_names,
        ["b.example.com", "*.b.example.com"]
    );
    assert!(edge.require_sni_match, "no chain takes every name");
    assert_eq!(
        edge.alpn.as_deref(),
        Some(&["h2".into(), "http/1.1".into()][..])
    );
    let auth = edge.client_auth.as_ref().unwrap();
    assert!(
        !auth.required,
        "a validation context alone checks certificates offered"
    );

    // It compiles: two certificates chosen by SNI, client roots loaded.
    let config = compile(translated.file);
    let ListenerTls::Edge(compiled) = &config.listeners[0].tls else {
        panic!("not edge TLS");
    };
    assert_eq!(compiled.certificates.len(), 2);
    assert!(compiled.require_sni_match);
    assert!(matches!(compiled.client_auth, Some((_, false))));

    // A chain for every name goes first and makes SNI optional.
    let mut l = l;
    l.default_filter_chain = Some(chain(Default::default(), Some(context("any.example.com"))));
    let translated = listener_parts(&l, None, &|_| None).unwrap();
    let edge = translated.file.tls.unwrap();
    assert!(!edge.require_sni_match);
    assert!(edge.certificates[0].server_names.is_empty());
    assert_eq!(edge.certificates[1].server_names, ["a.example.com"]);
}

#[test]
fn sds_edge_certificates_wait_for_their_secrets() {
    use tls::common_tls_context::ValidationContextType as V;
    let l = with_chains(vec![chain(
        by_names(&["shop.example.com"]),
        Some(edge_context(|c| {
            c.require_client_certificate = Some(BoolValue { value: true });
            c.common_tls_context
                .as_mut()
                .unwrap()
                .validation_context_type =
                Some(V::ValidationContextSdsSecretConfig(secret("gateway-ca")));
        })),
    )]);
    let translated = listener_parts(&l, Some(&sds()), &|_| None).unwrap();
    assert_eq!(
        translated.edge_secrets,
        [
            EdgeSecret {
                field: "filter_chains[0].transport_socket.common_tls_context.tls_certificate_sds_secret_configs[0]".into(),
                name: "gateway-cert".into(),
                slot: EdgeSlot::Certificate(0),
            },
            EdgeSecret {
                field: "filter_chains[0].transport_socket.common_tls_context.validation_context".into(),
                name: "gateway-ca".into(),
                slot: EdgeSlot::ClientCa,
            },
        ]
    );
    let (chain_pem, key_pem) = cert_for("shop.example.com");
    let (roots, _) = cert_for("ca.example.com");
    let cert = SecretValue::Certificate(chain_pem.clone().into(), key_pem.into());
    let ca = SecretValue::Validation(roots.into());

    let mut file = translated.file.clone();
    let only_cert = |n: &str| (n == "gateway-cert").then(|| cert.clone());
    assert_eq!(
        fill_edge_secrets(&mut file, &translated.edge_secrets, &only_cert),
        Ok(false)
    );
    let swapped = |n: &str| {
        Some(if n == "gateway-cert" {
            ca.clone()
        } else {
            cert.clone()
        })
    };
    let err = fill_edge_secrets(&mut file, &translated.edge_secrets, &swapped).unwrap_err();
    assert!(err.contains("tls_certificate_sds_secret_configs[0]: secret \"gateway-cert\" is a validation context"), "{err}");
    let both = |n: &str| {
        Some(if n == "gateway-cert" {
            cert.clone()
        } else {
            ca.clone()
        })
    };
    assert_eq!(
        fill_edge_secrets(&mut file, &translated.edge_secrets, &both),
        Ok(true)
    );
    let tls = file.tls.as_ref().unwrap();
    assert_eq!(
        *tls.certificates[0].inline.as_ref().unwrap().0 .0,
        chain_pem.into_bytes()
    );
    assert!(tls
        .client_auth
        .as_ref()
        .is_some_and(|a| a.required && a.inline.is_some()));

    // Filled, it compiles.
    let config = compile(file);
    assert!(matches!(&config.listeners[0].tls, ListenerTls::Edge(e) if e.client_auth.is_some()));
}

#[test]
fn chain_shapes_postern_cannot_express_are_refused_naming_the_field() {
    let named = |name: &str| chain(by_names(&[name]), Some(edge_context(|_| {})));
    let cases: Vec<(listener::Listener, &str)> = vec![
        (
            with_chains(vec![chain(
                listener::FilterChainMatch {
                    source_prefix_ranges: vec![Default::default()],
                    ..Default::default()
                },
                None,
            )]),
            "filter_chains[0].filter_chain_match.source_prefix_ranges",
        ),
        (
            with_chains(vec![named("a.example.com"), named("A.example.com")]),
            "filter_chains[1].filter_chain_match: matches the same connections as filter_chains[0].filter_chain_match",
        ),
        (
            with_chains(vec![
                chain(Default::default(), Some(edge_context(|_| {}))),
                chain(Default::default(), Some(edge_context(|_| {}))),
            ]),
            "filter_chains[1].filter_chain_match: matches the same connections as filter_chains[0].filter_chain_match",
        ),
        (
            with_chains(vec![chain(Default::default(), Some(edge_context(|c| {
                c.common_tls_context.as_mut().unwrap().tls_params = Some(tls::TlsParameters {
                    tls_minimum_protocol_version: tls::tls_parameters::TlsProtocol::TlSv11 as i32,
                    ..Default::default()
                });
            })))]),
            "filter_chains[0].transport_socket.common_tls_context.tls_params.tls_minimum_protocol_version: below TLS 1.2 is refused",
        ),
        (
            with_chains(vec![chain(Default::default(), Some(edge_context(|c| {
                c.common_tls_context.as_mut().unwrap().tls_params = Some(tls::TlsParameters {
                    cipher_suites: vec!["ECDHE-RSA-AES128-SHA".into()],
                    ..Default::default()
                });
            })))]),
            "filter_chains[0].transport_socket.common_tls_context.tls_params.cipher_suites",
        ),
        (
            with_chains(vec![chain(Default::default(), Some(edge_context(|c| {
                c.common_tls_context.as_mut().unwrap().alpn_protocols = vec!["h3".into()];
            })))]),
            "filter_chains[0].transport_socket.common_tls_context.alpn_protocols[0] \"h3\"",
        ),
        (
            with_chains(vec![chain(Default::default(), Some(edge_context(|c| {
                c.require_client_certificate = Some(BoolValue { value: true });
            })))]),
            "filter_chains[0].transport_socket.require_client_certificate: needs a validation context",
        ),
        (
            with_chains(vec![chain(by_transport("tls", &["istio"]), None)]),
            "filter_chains[0].filters: a chain that matches TLS it does not terminate (no transport_socket) passes it through: it needs a tcp_proxy",
        ),
        (
            with_chains(vec![chain(by_transport("quic", &[]), None)]),
            "filter_chains[0].filter_chain_match.transport_protocol \"quic\": not supported",
        ),
    ];
    for (i, (l, expected)) in cases.iter().enumerate() {
        let problems = problems_of(l);
        assert!(problems.contains(expected), "case {i}: {problems}");
    }
}

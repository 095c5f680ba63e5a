//! Plain upstream TLS on a Cluster (roots inline or by SDS, SAN matchers,
//! SNI, ALPN, a client certificate by SDS) and what is refused; priorities
//! of a ClusterLoadAssignment.

use postern_proto::envoy::extensions::transport_sockets::tls::v3 as tls;

use super::*;
use crate::config::{Config, UpstreamTlsConfig};

fn sds() -> SdsSourceFile {
    serde_yaml_ng::from_str("{}").unwrap()
}

fn secret(name: &str) -> tls::SdsSecretConfig {
    tls::SdsSecretConfig {
        name: name.into(),
        ..Default::default()
    }
}

fn inline(pem: &str) -> Option<core::DataSource> {
    Some(core::DataSource {
        specifier: Some(core::data_source::Specifier::InlineString(pem.into())),
        ..Default::default()
    })
}

fn san(kind: tls::subject_alt_name_matcher::SanType, exact: &str) -> tls::SubjectAltNameMatcher {
    tls::SubjectAltNameMatcher {
        san_type: kind as i32,
        matcher: Some(matcher::StringMatcher {
            match_pattern: Some(matcher::string_matcher::MatchPattern::Exact(exact.into())),
            ignore_case: false,
        }),
        ..Default::default()
    }
}

fn tls_cluster(context: &tls::UpstreamTlsContext) -> cluster::Cluster {
    cluster::Cluster {
        name: "ext".into(),
        cluster_discovery_type: Some(cluster::cluster::ClusterDiscoveryType::Type(
            cluster::cluster::DiscoveryType::Eds as i32,
        )),
        transport_socket: Some(core::TransportSocket {
            name: "envoy.transport_sockets.tls".into(),
            config_type: Some(core::transport_socket::ConfigType::TypedConfig(any(
                context,
            ))),
        }),
        ..Default::default()
    }
}

fn problems(context: &tls::UpstreamTlsContext) -> String {
    super::super::xds::cluster(&tls_cluster(context), Some(&sds()))
        .unwrap_err()
        .join("\n")
}

fn compile(mut file: ClusterFile) -> Result<Config, crate::config::ConfigError> {
    file.endpoints = vec![EndpointFile {
        address: "127.0.0.1:9".parse().unwrap(),
        weight: 1,
        priority: 0,
    }];
    let mut config: ConfigFile = serde_yaml_ng::from_str("{}").unwrap();
    config.clusters.push(file);
    Config::from_dynamic_model(config)
}

#[test]
fn plain_upstream_tls_takes_sds_roots_sans_sni_alpn_and_a_client_secret() {
    use tls::subject_alt_name_matcher::SanType;
    let context = tls::UpstreamTlsContext {
        sni: "api.example.com".into(),
        common_tls_context: Some(tls::CommonTlsContext {
            alpn_protocols: vec!["http/1.1".into()],
            tls_certificate_sds_secret_configs: vec![secret("client-cert")],
            validation_context_type: Some(
                tls::common_tls_context::ValidationContextType::CombinedValidationContext(
                    tls::common_tls_context::CombinedCertificateValidationContext {
                        default_validation_context: Some(tls::CertificateValidationContext {
                            match_typed_subject_alt_names: vec![
                                san(SanType::Dns, "api.example.com"),
                                san(SanType::Uri, "spiffe://ext/api"),
                            ],
                            ..Default::default()
                        }),
                        validation_context_sds_secret_config: Some(secret("ext-ca")),
                        ..Default::default()
                    },
                ),
            ),
            ..Default::default()
        }),
        ..Default::default()
    };
    // An identity is configured, yet the context names none of its secrets.
    let (mut file, _) = super::super::xds::cluster(&tls_cluster(&context), Some(&sds())).unwrap();
    let tls_file = file.tls.clone().unwrap();
    assert_eq!(tls_file.mode, UpstreamTlsMode::Simple);
    assert_eq!(tls_file.server_name.as_deref(), Some("api.example.com"));
    assert_eq!(
        tls_file.subject_alt_names,
        [
            SanMatchFile::Dns("api.example.com".into()),
            SanMatchFile::Uri("spiffe://ext/api".into())
        ]
    );
    assert_eq!(tls_file.alpn, Some(vec!["http/1.1".to_string()]));
    assert_eq!(cluster_secret_names(&file), ["ext-ca", "client-cert"]);

    // Warming: nothing serves until both Secrets are there.
    let root = rcgen::generate_simple_self_signed(vec!["ca.example".into()]).unwrap();
    let client = rcgen::generate_simple_self_signed(vec!["client.example".into()]).unwrap();
    let only_ca = |name: &str| {
        (name == "ext-ca").then(|| SecretValue::Validation(root.cert.pem().into_bytes()))
    };
    assert_eq!(fill_cluster_secrets(&mut file.clone(), &only_ca), Ok(false));
    let both = |name: &str| match name {
        "ext-ca" => Some(SecretValue::Validation(root.cert.pem().into_bytes())),
        "client-cert" => Some(SecretValue::Certificate(
            client.cert.pem().into_bytes(),
            client.signing_key.serialize_pem().into_bytes(),
        )),
        _ => None,
    };
    assert_eq!(fill_cluster_secrets(&mut file, &both), Ok(true));
    let config = compile(file.clone()).unwrap_or_else(|e| panic!("{e}"));
    let Some(UpstreamTlsConfig::Simple {
        server_name,
        sans,
        client,
        alpn,
        ..
    }) = config.upstream_tls.get("ext")
    else {
        panic!("not simple TLS");
    };
    assert_eq!(server_name.as_deref(), Some("api.example.com"));
    assert_eq!(sans.len(), 2);
    assert!(client.is_some());
    assert_eq!(alpn.as_deref(), Some(&[b"http/1.1".to_vec()][..]));

    // A new bundle is a settings change (the connector must be rebuilt),
    // yet the PEM itself is never written out.
    let other = rcgen::generate_simple_self_signed(vec!["other.example".into()]).unwrap();
    let mut rotated = file.clone();
    rotated.tls.as_mut().unwrap().ca_inline = Some(InlinePem(std::sync::Arc::new(
        other.cert.pem().into_bytes(),
    )));
    let before = serde_json::to_string(&file).unwrap();
    let after = serde_json::to_string(&rotated).unwrap();
    assert_ne!(before, after);
    assert!(!before.contains("PRIVATE KEY") && before.contains("sha256:"));

    // A Secret of the wrong kind names the field.
    let swapped = |name: &str| match name {
        "ext-ca" => both("client-cert"),
        other => both(other),
    };
    let mut file = super::super::xds::cluster(&tls_cluster(&context), None)
        .unwrap()
        .0;
    let err = fill_cluster_secrets(&mut file, &swapped).unwrap_err();
    assert!(
        err.contains("validation_context_sds_secret_config") && err.contains("ext-ca"),
        "{err}"
    );
}

#[test]
fn inline_roots_and_a_filename_map_onto_ca() {
    let root = rcgen::generate_simple_self_signed(vec!["ca.example".into()]).unwrap();
    let context = |trusted_ca| tls::UpstreamTlsContext {
        sni: "api.example.com".into(),
        common_tls_context: Some(tls::CommonTlsContext {
            validation_context_type: Some(
                tls::common_tls_context::ValidationContextType::ValidationContext(
                    tls::CertificateValidationContext {
                        trusted_ca,
                        ..Default::default()
                    },
                ),
            ),
            ..Default::default()
        }),
        ..Default::default()
    };
    let (file, _) =
        super::super::xds::cluster(&tls_cluster(&context(inline(&root.cert.pem()))), None).unwrap();
    assert!(cluster_secret_names(&file).is_empty());
    let config = compile(file).unwrap_or_else(|e| panic!("{e}"));
    assert!(matches!(
        config.upstream_tls.get("ext"),
        Some(UpstreamTlsConfig::Simple { client: None, .. })
    ));

    let by_file = Some(core::DataSource {
        specifier: Some(core::data_source::Specifier::Filename(
            "/etc/ssl/certs/ca-certificates.crt".into(),
        )),
        ..Default::default()
    });
    let (file, _) = super::super::xds::cluster(&tls_cluster(&context(by_file)), None).unwrap();
    assert_eq!(
        file.tls.unwrap().ca.as_deref(),
        Some(std::path::Path::new("/etc/ssl/certs/ca-certificates.crt"))
    );
}

#[test]
fn upstream_tls_that_would_not_verify_the_server_is_refused() {
    // Envoy connects to anyone without a validation context; Postern will not.
    let no_validation = tls::UpstreamTlsContext {
        sni: "api.example.com".into(),
        common_tls_context: Some(Default::default()),
        ..Default::default()
    };
    let p = problems(&no_validation);
    assert!(
        p.contains("transport_socket.common_tls_context.validation_context: is required"),
        "{p}"
    );
    let p = problems(&tls::UpstreamTlsContext {
        sni: "api.example.com".into(),
        ..Default::default()
    });
    assert!(p.contains("transport_socket.common_tls_context"), "{p}");

    // Neither SNI nor SAN matchers: no name to check.
    let no_name = tls::UpstreamTlsContext {
        common_tls_context: Some(tls::CommonTlsContext {
            validation_context_type: Some(
                tls::common_tls_context::ValidationContextType::ValidationContextSdsSecretConfig(
                    secret("ext-ca"),
                ),
            ),
            ..Default::default()
        }),
        ..Default::default()
    };
    assert!(problems(&no_name).contains("transport_socket.sni"));
}

#[test]
fn unsupported_upstream_tls_fields_are_refused_by_name() {
    use tls::subject_alt_name_matcher::SanType;
    let prefix = tls::SubjectAltNameMatcher {
        san_type: SanType::Dns as i32,
        matcher: Some(matcher::StringMatcher {
            match_pattern: Some(matcher::string_matcher::MatchPattern::Prefix("api".into())),
            ignore_case: false,
        }),
        ..Default::default()
    };
    let context = tls::UpstreamTlsContext {
        sni: "api.example.com".into(),
        auto_host_sni: true,
        common_tls_context: Some(tls::CommonTlsContext {
            validation_context_type: Some(
                tls::common_tls_context::ValidationContextType::ValidationContext(
                    tls::CertificateValidationContext {
                        trusted_ca: inline("x"),
                        verify_certificate_spki: vec!["abc".into()],
                        system_root_certs: Some(Default::default()),
                        match_typed_subject_alt_names: vec![prefix, san(SanType::Email, "a@b.c")],
                        ..Default::default()
                    },
                ),
            ),
            ..Default::default()
        }),
        ..Default::default()
    };
    let p = problems(&context);
    for field in [
        "transport_socket.auto_host_sni",
        "validation_context.verify_certificate_spki",
        "validation_context.system_root_certs",
        "match_typed_subject_alt_names[0].matcher",
        "match_typed_subject_alt_names[1].san_type",
    ] {
        assert!(p.contains(field), "{field} in {p}");
    }
}

#[test]
fn static_simple_tls_checks_sans_client_cert_pairs_and_alpn() {
    let err = crate::config::Config::from_yaml(
        r#"
clusters:
  - name: ext
    endpoints: [{ address: 127.0.0.1:9 }]
    tls:
      mode: simple
      ca: /nonexistent/ca.pem
      subject_alt_names: [{ dns: "not a name" }]
      client_cert: /nonexistent/cert.pem
      alpn: [h2]
"#,
    )
    .unwrap_err()
    .to_string();
    for field in [
        "clusters[0].tls.subject_alt_names[0]",
        "clusters[0].tls.client_key",
        "clusters[0].tls.alpn[0]",
    ] {
        assert!(err.contains(field), "{field} in {err}");
    }
}

#[test]
fn load_assignments_keep_every_priority_and_drop_unhealthy_endpoints() {
    let lb = |port: u32, health: core::HealthStatus| endpoint::LbEndpoint {
        host_identifier: Some(endpoint::lb_endpoint::HostIdentifier::Endpoint(
            endpoint::Endpoint {
                address: socket("127.0.0.1", port),
                ..Default::default()
            },
        )),
        health_status: health as i32,
        ..Default::default()
    };
    let cla = endpoint::ClusterLoadAssignment {
        cluster_name: "api".into(),
        endpoints: vec![
            endpoint::LocalityLbEndpoints {
                lb_endpoints: vec![
                    lb(9001, core::HealthStatus::Unhealthy),
                    lb(9002, core::HealthStatus::Healthy),
                ],
                priority: 0,
                // Without locality-weighted balancing Envoy ignores it too.
                load_balancing_weight: Some(UInt32Value { value: 7 }),
                ..Default::default()
            },
            endpoint::LocalityLbEndpoints {
                lb_endpoints: vec![lb(9009, core::HealthStatus::Unknown)],
                priority: 1,
                ..Default::default()
            },
        ],
        ..Default::default()
    };
    let endpoints = load_assignment(&cla).unwrap();
    let got: Vec<(u16, u32, u32)> = endpoints
        .iter()
        .map(|e| (e.address.port(), e.weight, e.priority))
        .collect();
    assert_eq!(got, [(9002, 1, 0), (9009, 1, 1)]);
}

#[test]
fn host_derived_sni_and_checks_a_secret_would_drop_are_refused() {
    #[allow(deprecated)]
    let c = cluster::Cluster {
        upstream_http_protocol_options: Some(core::UpstreamHttpProtocolOptions {
            auto_sni: true,
            ..Default::default()
        }),
        ..tls_cluster(&tls::UpstreamTlsContext::default())
    };
    let p = super::super::xds::cluster(&c, None).unwrap_err().join("\n");
    assert!(p.contains("upstream_http_protocol_options.auto_sni"), "{p}");

    let root = rcgen::generate_simple_self_signed(vec!["ca.example".into()]).unwrap();
    let with_sans = tls::Secret {
        name: "ext-ca".into(),
        r#type: Some(tls::secret::Type::ValidationContext(
            tls::CertificateValidationContext {
                trusted_ca: inline(&root.cert.pem()),
                match_typed_subject_alt_names: vec![san(
                    tls::subject_alt_name_matcher::SanType::Dns,
                    "api.example.com",
                )],
                ..Default::default()
            },
        )),
    };
    let p = super::super::xds::secret(&with_sans)
        .unwrap_err()
        .join("\n");
    assert!(
        p.contains("validation_context.match_typed_subject_alt_names"),
        "{p}"
    );
}

//! Plain upstream TLS of a Cluster (an `UpstreamTlsContext` that does not
//! use the workload identity): the cluster file's `tls: simple`, with roots
//! inline, from a file, or from an SDS Secret, SAN matchers, SNI, ALPN and
//! a client certificate from an SDS Secret. Postern always verifies the
//! server: a context without a validation context is refused, where Envoy
//! would connect to anyone.

use std::sync::Arc;

use super::*;

/// The SDS Secrets a cluster's TLS names, by their resource names.
pub fn cluster_secret_names(file: &ClusterFile) -> Vec<String> {
    let Some(tls) = &file.tls else {
        return Vec::new();
    };
    tls.ca_secret
        .iter()
        .chain(&tls.client_secret)
        .cloned()
        .collect()
}

/// Fills a cluster's TLS roots and client certificate from the SDS
/// Secrets it names. `Ok(false)` while one has not arrived (the cluster
/// warms); an error naming the field when a Secret is of the wrong kind.
pub fn fill_cluster_secrets(
    file: &mut ClusterFile,
    secrets: &dyn Fn(&str) -> Option<SecretValue>,
) -> Result<bool, String> {
    let Some(tls) = file.tls.as_mut() else {
        return Ok(true);
    };
    let pem = |bytes: Vec<u8>| InlinePem(Arc::new(bytes));
    if let Some(name) = tls.ca_secret.clone() {
        match secrets(&name) {
            None => return Ok(false),
            Some(SecretValue::Validation(roots)) => tls.ca_inline = Some(pem(roots)),
            Some(SecretValue::Certificate(..)) => {
                return Err(format!(
                    "transport_socket.common_tls_context.validation_context_sds_secret_config: secret \"{name}\" is a tls_certificate, not a validation context"
                ))
            }
        }
    }
    if let Some(name) = tls.client_secret.clone() {
        match secrets(&name) {
            None => return Ok(false),
            Some(SecretValue::Certificate(chain, key)) => {
                tls.client_inline = Some((pem(chain), pem(key)))
            }
            Some(SecretValue::Validation(_)) => {
                return Err(format!(
                    "transport_socket.common_tls_context.tls_certificate_sds_secret_configs[0]: secret \"{name}\" is a validation context, not a tls_certificate"
                ))
            }
        }
    }
    Ok(true)
}

/// Whether a context names one of the workload identity's Secrets, which
/// makes it mesh mTLS.
pub(super) fn names_identity(common: Option<&tls::CommonTlsContext>, sds: &SdsSourceFile) -> bool {
    use tls::common_tls_context::ValidationContextType as V;
    let Some(common) = common else {
        return false;
    };
    let certificate = common
        .tls_certificate_sds_secret_configs
        .iter()
        .any(|s| s.name == sds.certificate);
    let validation = match &common.validation_context_type {
        Some(V::ValidationContextSdsSecretConfig(s)) => s.name == sds.validation,
        Some(V::CombinedValidationContext(c)) => c
            .validation_context_sds_secret_config
            .as_ref()
            .is_some_and(|s| s.name == sds.validation),
        _ => false,
    };
    certificate || validation
}

/// An `UpstreamTlsContext` as `tls: simple`.
// Deprecated fields are still read, to refuse them by name.
#[allow(deprecated)]
pub(super) fn simple_tls(
    context: &tls::UpstreamTlsContext,
    path: &str,
    ctx: &mut Ctx,
) -> Option<UpstreamTlsFile> {
    use tls::common_tls_context::ValidationContextType as V;
    if context.auto_host_sni || context.auto_sni_san_validation {
        // The SNI would follow each request's Host, which pooled
        // connections shared across hosts cannot do.
        ctx.unsupported(format!("{path}.auto_host_sni / auto_sni_san_validation"));
    }
    if context.allow_renegotiation {
        ctx.unsupported(format!("{path}.allow_renegotiation"));
    }
    if context
        .enforce_rsa_key_usage
        .as_ref()
        .is_some_and(|v| !v.value)
    {
        ctx.unsupported(format!("{path}.enforce_rsa_key_usage: false"));
    }
    let cpath = format!("{path}.common_tls_context");
    let Some(common) = &context.common_tls_context else {
        ctx.err(
            &cpath,
            "is required: Postern verifies upstream servers, so it needs a validation context",
        );
        return None;
    };
    for (field, set) in [
        ("tls_params", common.tls_params.is_some()),
        (
            "tls_certificate_provider_instance",
            common.tls_certificate_provider_instance.is_some(),
        ),
        (
            "custom_tls_certificate_selector",
            common.custom_tls_certificate_selector.is_some(),
        ),
        (
            "tls_certificate_certificate_provider",
            common.tls_certificate_certificate_provider.is_some(),
        ),
        (
            "tls_certificate_certificate_provider_instance",
            common
                .tls_certificate_certificate_provider_instance
                .is_some(),
        ),
        ("custom_handshaker", common.custom_handshaker.is_some()),
        ("key_log", common.key_log.is_some()),
    ] {
        if set {
            ctx.unsupported(format!("{cpath}.{field}"));
        }
    }
    let mut file = UpstreamTlsFile {
        mode: UpstreamTlsMode::Simple,
        identities: Vec::new(),
        ca: None,
        server_name: (!context.sni.is_empty()).then(|| context.sni.clone()),
        subject_alt_names: Vec::new(),
        client_cert: None,
        client_key: None,
        alpn: (!common.alpn_protocols.is_empty()).then(|| common.alpn_protocols.clone()),
        ca_inline: None,
        client_inline: None,
        ca_secret: None,
        client_secret: None,
    };
    match common.tls_certificates.as_slice() {
        [] => {}
        [cert] => {
            let chain = inline(
                &cert.certificate_chain,
                &format!("{cpath}.tls_certificates[0].certificate_chain"),
                ctx,
            );
            let key = inline(
                &cert.private_key,
                &format!("{cpath}.tls_certificates[0].private_key"),
                ctx,
            );
            file.client_inline = Some((InlinePem(Arc::new(chain)), InlinePem(Arc::new(key))));
        }
        _ => ctx.unsupported(format!("{cpath}.tls_certificates (more than one)")),
    }
    match common.tls_certificate_sds_secret_configs.as_slice() {
        [] => {}
        [secret] if file.client_inline.is_none() => {
            sds_config(
                secret,
                &format!("{cpath}.tls_certificate_sds_secret_configs[0]"),
                ctx,
            );
            file.client_secret = Some(secret.name.clone());
        }
        [_] => ctx.err(
            format!("{cpath}.tls_certificate_sds_secret_configs"),
            "give tls_certificates or tls_certificate_sds_secret_configs, not both",
        ),
        _ => ctx.unsupported(format!(
            "{cpath}.tls_certificate_sds_secret_configs (more than one)"
        )),
    }
    let (inline_context, secret) = match &common.validation_context_type {
        Some(V::ValidationContext(v)) => (Some(v), None),
        Some(V::ValidationContextSdsSecretConfig(s)) => (None, Some(s)),
        Some(V::CombinedValidationContext(c)) => {
            if c.validation_context_certificate_provider.is_some()
                || c.validation_context_certificate_provider_instance.is_some()
            {
                ctx.unsupported(format!(
                    "{cpath}.combined_validation_context.validation_context_certificate_provider"
                ));
            }
            (
                c.default_validation_context.as_ref(),
                c.validation_context_sds_secret_config.as_ref(),
            )
        }
        Some(_) => {
            ctx.unsupported(format!("{cpath}.validation_context_type"));
            (None, None)
        }
        None => (None, None),
    };
    let vpath = format!("{cpath}.validation_context");
    if let Some(secret) = secret {
        sds_config(secret, &format!("{vpath}_sds_secret_config"), ctx);
        file.ca_secret = Some(secret.name.clone());
    }
    if let Some(v) = inline_context {
        validation_context(v, &vpath, secret.is_some(), &mut file, ctx);
    }
    if file.ca_secret.is_none() && file.ca.is_none() && file.ca_inline.is_none() {
        ctx.err(
            &vpath,
            "is required: Postern verifies upstream servers (Envoy without one would not), so give trusted_ca or an SDS validation context",
        );
    }
    if file.server_name.is_none() && file.subject_alt_names.is_empty() {
        ctx.err(
            format!("{path}.sni"),
            "give sni or match_typed_subject_alt_names: Postern checks the server's name",
        );
    }
    Some(file)
}

/// An SDS reference must come over the ADS stream the rest comes on.
fn sds_config(secret: &tls::SdsSecretConfig, path: &str, ctx: &mut Ctx) {
    use postern_proto::envoy::config::core::v3::config_source::ConfigSourceSpecifier as S;
    if secret.name.is_empty() {
        ctx.err(format!("{path}.name"), "is required");
    }
    let Some(source) = &secret.sds_config else {
        return;
    };
    if !matches!(source.config_source_specifier, Some(S::Ads(_)) | None) {
        ctx.unsupported(format!("{path}.sds_config (only ads)"));
    }
}

fn validation_context(
    v: &tls::CertificateValidationContext,
    path: &str,
    from_secret: bool,
    file: &mut UpstreamTlsFile,
    ctx: &mut Ctx,
) {
    if let Some(source) = &v.trusted_ca {
        if from_secret {
            ctx.err(
                format!("{path}.trusted_ca"),
                "give the roots inline or by SDS, not both",
            );
        }
        match &source.specifier {
            Some(core::data_source::Specifier::Filename(name)) => {
                file.ca = Some(std::path::PathBuf::from(name))
            }
            _ => {
                file.ca_inline = Some(InlinePem(Arc::new(inline(
                    &v.trusted_ca,
                    &format!("{path}.trusted_ca"),
                    ctx,
                ))))
            }
        }
    }
    #[allow(deprecated)]
    for (field, set) in [
        (
            "ca_certificate_provider_instance",
            v.ca_certificate_provider_instance.is_some(),
        ),
        (
            "system_root_certs (give trusted_ca)",
            v.system_root_certs.is_some(),
        ),
        ("watched_directory", v.watched_directory.is_some()),
        (
            "verify_certificate_spki",
            !v.verify_certificate_spki.is_empty(),
        ),
        (
            "verify_certificate_hash",
            !v.verify_certificate_hash.is_empty(),
        ),
        (
            "require_signed_certificate_timestamp",
            v.require_signed_certificate_timestamp.is_some(),
        ),
        ("crl", v.crl.is_some()),
        ("allow_expired_certificate", v.allow_expired_certificate),
        ("trust_chain_verification", v.trust_chain_verification != 0),
        (
            "custom_validator_config",
            v.custom_validator_config.is_some(),
        ),
        ("only_verify_leaf_cert_crl", v.only_verify_leaf_cert_crl),
        ("max_verify_depth", v.max_verify_depth.is_some()),
        (
            "match_subject_alt_names (use match_typed_subject_alt_names)",
            !v.match_subject_alt_names.is_empty(),
        ),
    ] {
        if set {
            ctx.unsupported(format!("{path}.{field}"));
        }
    }
    use tls::subject_alt_name_matcher::SanType;
    for (i, m) in v.match_typed_subject_alt_names.iter().enumerate() {
        let field = format!("{path}.match_typed_subject_alt_names[{i}]");
        let exact = match m.matcher.as_ref().and_then(|sm| {
            (!sm.ignore_case)
                .then_some(sm.match_pattern.as_ref())
                .flatten()
        }) {
            Some(matcher::string_matcher::MatchPattern::Exact(value)) => value.clone(),
            _ => {
                ctx.unsupported(format!("{field}.matcher (only exact, case-sensitive)"));
                continue;
            }
        };
        match SanType::try_from(m.san_type) {
            Ok(SanType::Dns) => file.subject_alt_names.push(SanMatchFile::Dns(exact)),
            Ok(SanType::Uri) => file.subject_alt_names.push(SanMatchFile::Uri(exact)),
            _ => ctx.unsupported(format!("{field}.san_type (only DNS and URI)")),
        }
    }
}

/// Envoy's `auto_sni` and `auto_san_validation` (on the Cluster, or in
/// its `HttpProtocolOptions`) take the SNI and the name checked from each
/// request's Host: a pooled connection serves many requests, so Postern
/// refuses them rather than check the wrong name.
#[allow(deprecated)]
pub(super) fn auto_sni(c: &cluster::Cluster, ctx: &mut Ctx) {
    let refuse = |o: &core::UpstreamHttpProtocolOptions, field: &str, ctx: &mut Ctx| {
        if o.auto_sni || o.auto_san_validation || !o.override_auto_sni_header.is_empty() {
            ctx.unsupported(format!("{field}.auto_sni / auto_san_validation"));
        }
    };
    if let Some(o) = &c.upstream_http_protocol_options {
        refuse(o, "upstream_http_protocol_options", ctx);
    }
    let Some(options) = c
        .typed_extension_protocol_options
        .get(HTTP_PROTOCOL_OPTIONS_KEY)
        .filter(|o| o.type_url == HTTP_PROTOCOL_OPTIONS_TYPE)
    else {
        return;
    };
    // A body that does not decode is reported where the protocol is read.
    if let Ok(decoded) =
        postern_proto::envoy::extensions::upstreams::http::v3::HttpProtocolOptions::decode(
            options.value.as_slice(),
        )
    {
        if let Some(o) = &decoded.upstream_http_protocol_options {
            refuse(
                o,
                "typed_extension_protocol_options.upstream_http_protocol_options",
                ctx,
            );
        }
    }
}

/// Checks of a validation-context Secret beyond its roots would be lost:
/// only `trusted_ca` is read, so the rest is refused, not ignored.
#[allow(deprecated)]
pub(super) fn validation_secret_fields(v: &tls::CertificateValidationContext, ctx: &mut Ctx) {
    for (field, set) in [
        (
            "match_typed_subject_alt_names (give them in the cluster's combined_validation_context)",
            !v.match_typed_subject_alt_names.is_empty(),
        ),
        ("match_subject_alt_names", !v.match_subject_alt_names.is_empty()),
        ("verify_certificate_spki", !v.verify_certificate_spki.is_empty()),
        ("verify_certificate_hash", !v.verify_certificate_hash.is_empty()),
        ("allow_expired_certificate", v.allow_expired_certificate),
        ("trust_chain_verification", v.trust_chain_verification != 0),
        ("custom_validator_config", v.custom_validator_config.is_some()),
    ] {
        if set {
            ctx.unsupported(format!("validation_context.{field}"));
        }
    }
}

//! Server certificate checks of `simple` upstream TLS by subject alt
//! names: the chain is verified against the cluster's roots as webpki does,
//! then the leaf must carry one of the configured DNS names or URIs, not
//! necessarily the SNI sent (Envoy's `match_typed_subject_alt_names`).

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::verify_server_cert_signed_by_trust_anchor;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, WebPkiSupportedAlgorithms};
use rustls::server::ParsedCertificate;
use rustls::{CertificateError, DigitallySignedStruct, Error, RootCertStore, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use crate::config::file::SanMatchFile;

/// Verifies a server by its chain to `roots` and its SANs against `sans`.
#[derive(Debug)]
pub(super) struct SanVerifier {
    roots: Arc<RootCertStore>,
    sans: Vec<SanMatchFile>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl SanVerifier {
    pub(super) fn new(roots: RootCertStore, sans: Vec<SanMatchFile>) -> SanVerifier {
        SanVerifier {
            roots: Arc::new(roots),
            sans,
            algorithms: postern_certs::tls::provider().signature_verification_algorithms,
        }
    }
}

/// Whether a certificate's SANs (`DNS:...`, `URI:...`) satisfy one matcher.
pub(super) fn sans_match(cert_sans: &[String], wanted: &[SanMatchFile]) -> bool {
    wanted.iter().any(|want| {
        cert_sans.iter().any(|san| match want {
            SanMatchFile::Dns(name) => san
                .strip_prefix("DNS:")
                .is_some_and(|have| dns_matches(have, name)),
            SanMatchFile::Uri(uri) => san.strip_prefix("URI:") == Some(uri.as_str()),
        })
    })
}

/// `have` from the certificate may be a `*.` wildcard of one label.
fn dns_matches(have: &str, name: &str) -> bool {
    let have = have.trim_end_matches('.');
    let name = name.trim_end_matches('.');
    if have.eq_ignore_ascii_case(name) {
        return true;
    }
    match (have.strip_prefix("*."), name.split_once('.')) {
        (Some(suffix), Some((label, parent))) => {
            !label.is_empty() && label != "*" && suffix.eq_ignore_ascii_case(parent)
        }
        _ => false,
    }
}

impl ServerCertVerifier for SanVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.algorithms.all,
        )?;
        let info = postern_certs::CertInfo::parse(end_entity.as_ref())
            .map_err(|_| Error::InvalidCertificate(CertificateError::BadEncoding))?;
        if !sans_match(&info.sans, &self.sans) {
            return Err(Error::InvalidCertificate(CertificateError::NotValidForName));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_and_uri_matchers_take_exact_names_and_one_label_wildcards() {
        let sans = vec![
            "DNS:*.shop.example".to_string(),
            "DNS:api.example".to_string(),
            "URI:spiffe://td/ns/a/sa/b".to_string(),
        ];
        let dns = |n: &str| vec![SanMatchFile::Dns(n.into())];
        assert!(sans_match(&sans, &dns("api.example")));
        assert!(sans_match(&sans, &dns("API.example.")));
        assert!(sans_match(&sans, &dns("cart.shop.example")));
        assert!(!sans_match(&sans, &dns("a.cart.shop.example")));
        assert!(!sans_match(&sans, &dns("shop.example")));
        assert!(!sans_match(&sans, &dns("other.example")));
        assert!(sans_match(
            &sans,
            &[SanMatchFile::Uri("spiffe://td/ns/a/sa/b".into())]
        ));
        assert!(!sans_match(
            &sans,
            &[SanMatchFile::Uri("spiffe://td/ns/a/sa/c".into())]
        ));
        // A URI is not a DNS name, whatever it reads as.
        assert!(!sans_match(&sans, &dns("spiffe://td/ns/a/sa/b")));
    }
}

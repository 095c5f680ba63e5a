//! Certificate parsing: PEM chains and keys, and the fields operators and
//! peer checks need (subject, SANs, validity, serial).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use x509_parser::extensions::GeneralName;

use crate::spiffe::SpiffeId;

/// A certificate or key that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// PEM that does not decode.
    #[error("invalid PEM in {what}: {reason}")]
    Pem {
        /// What was being read, e.g. "certificate chain".
        what: &'static str,
        /// The decoder's complaint.
        reason: String,
    },
    /// No certificate in a chain or bundle.
    #[error("no certificate found in {0}")]
    Empty(&'static str),
    /// DER that x509-parser rejects.
    #[error("malformed certificate: {0}")]
    Malformed(String),
    /// The certificate's URI SANs do not hold exactly one valid SPIFFE ID.
    #[error("certificate has no single valid SPIFFE ID URI SAN ({0})")]
    NoSpiffeId(String),
}

/// Decodes every certificate of a PEM chain, leaf first.
pub fn parse_pem_chain(
    pem: &[u8],
    what: &'static str,
) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let chain = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CertError::Pem {
            what,
            reason: e.to_string(),
        })?;
    if chain.is_empty() {
        return Err(CertError::Empty(what));
    }
    Ok(chain)
}

/// Decodes a PEM private key (PKCS#8, SEC1 or PKCS#1).
pub fn parse_pem_key(pem: &[u8]) -> Result<PrivateKeyDer<'static>, CertError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| CertError::Pem {
        what: "private key",
        reason: e.to_string(),
    })
}

/// The fields of a certificate that `/certs`, logs and checks show.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// Subject distinguished name, RFC 4514 style.
    pub subject: String,
    /// Issuer distinguished name.
    pub issuer: String,
    /// Subject alternative names, as `URI:...`, `DNS:...`, `IP:...`.
    pub sans: Vec<String>,
    /// Start of validity.
    pub not_before: SystemTime,
    /// End of validity.
    pub not_after: SystemTime,
    /// Serial number, lowercase hex.
    pub serial: String,
    /// The URI SANs alone.
    uri_sans: Vec<String>,
}

impl CertInfo {
    /// Reads the fields of a DER certificate.
    pub fn parse(der: &[u8]) -> Result<CertInfo, CertError> {
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| CertError::Malformed(e.to_string()))?;
        let mut sans = Vec::new();
        let mut uri_sans = Vec::new();
        let san = cert
            .subject_alternative_name()
            .map_err(|e| CertError::Malformed(e.to_string()))?;
        for name in san.iter().flat_map(|ext| ext.value.general_names.iter()) {
            match name {
                GeneralName::URI(uri) => {
                    uri_sans.push(uri.to_string());
                    sans.push(format!("URI:{uri}"));
                }
                GeneralName::DNSName(dns) => sans.push(format!("DNS:{dns}")),
                GeneralName::IPAddress(raw) => sans.push(format!("IP:{}", format_ip(raw))),
                other => sans.push(format!("{other}")),
            }
        }
        let validity = cert.validity();
        Ok(CertInfo {
            subject: cert.subject().to_string(),
            issuer: cert.issuer().to_string(),
            sans,
            not_before: to_system_time(validity.not_before.timestamp()),
            not_after: to_system_time(validity.not_after.timestamp()),
            serial: cert
                .raw_serial()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect(),
            uri_sans,
        })
    }

    /// The certificate's SPIFFE ID: its one URI SAN, which must be valid.
    pub fn spiffe_id(&self) -> Result<SpiffeId, CertError> {
        match self.uri_sans.as_slice() {
            [uri] => SpiffeId::parse(uri).map_err(|e| CertError::NoSpiffeId(format!("{uri}: {e}"))),
            [] => Err(CertError::NoSpiffeId("no URI SAN".into())),
            _ => Err(CertError::NoSpiffeId("more than one URI SAN".into())),
        }
    }
}

fn to_system_time(unix: i64) -> SystemTime {
    match u64::try_from(unix) {
        Ok(secs) => UNIX_EPOCH + Duration::from_secs(secs),
        Err(_) => UNIX_EPOCH,
    }
}

fn format_ip(raw: &[u8]) -> String {
    match raw.len() {
        4 => std::net::Ipv4Addr::from([raw[0], raw[1], raw[2], raw[3]]).to_string(),
        16 => {
            let mut octets = [0u8; 16];
            octets.copy_from_slice(raw);
            std::net::Ipv6Addr::from(octets).to_string()
        }
        _ => format!("{raw:02x?}"),
    }
}

/// Seconds since the Unix epoch, for metrics and JSON.
pub fn unix_seconds(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

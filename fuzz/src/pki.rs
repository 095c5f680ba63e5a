//! The fixed PKI of the `x509` target (`fixtures/pki`, written by the
//! `fuzz_seeds` example): a root, an intermediate and a workload leaf valid
//! 2025 to 2045, checked at a fixed time so that runs repeat.

use std::sync::OnceLock;

use postern_certs::x509::parse_pem_chain;
use postern_certs::TrustBundle;
use rustls_pki_types::{CertificateDer, UnixTime};

/// The root, PEM: the trust bundle.
pub const ROOT_PEM: &str = include_str!("../fixtures/pki/root.pem");
/// The intermediate the leaf is issued by, PEM.
pub const INTERMEDIATE_PEM: &str = include_str!("../fixtures/pki/intermediate.pem");
/// The workload leaf, PEM.
pub const LEAF_PEM: &str = include_str!("../fixtures/pki/leaf.pem");
/// The leaf's private key, PKCS#8 PEM.
pub const LEAF_KEY_PEM: &str = include_str!("../fixtures/pki/leaf-key.pem");
/// The leaf's SPIFFE ID.
pub const LEAF_ID: &str = "spiffe://cluster.local/ns/default/sa/fuzz";

/// Chains are checked on 2030-01-01, inside every fixture's validity.
pub fn now() -> UnixTime {
    UnixTime::since_unix_epoch(std::time::Duration::from_secs(1_893_456_000))
}

/// The parsed fixtures.
#[derive(Debug)]
pub struct Pki {
    /// A bundle of the root alone.
    pub bundle: TrustBundle,
    /// The leaf, DER.
    pub leaf: CertificateDer<'static>,
    /// The intermediate, DER.
    pub intermediate: CertificateDer<'static>,
}

/// The fixtures, parsed once.
///
/// # Panics
///
/// If a fixture does not parse: they are part of the harness.
pub fn pki() -> &'static Pki {
    static PKI: OnceLock<Pki> = OnceLock::new();
    PKI.get_or_init(|| {
        let one = |pem: &str| {
            parse_pem_chain(pem.as_bytes(), "fixture")
                .expect("fixture parses")
                .remove(0)
        };
        Pki {
            bundle: TrustBundle::from_pem(ROOT_PEM.as_bytes()).expect("fixture root"),
            leaf: one(LEAF_PEM),
            intermediate: one(INTERMEDIATE_PEM),
        }
    })
}

/// The signed part of a DER certificate (`tbsCertificate` with its header),
/// read without an X.509 parser so that it does not share one's bugs.
pub fn signed_part(der: &[u8]) -> Option<&[u8]> {
    fn header(der: &[u8]) -> Option<(usize, usize)> {
        let (&tag, rest) = der.split_first()?;
        if tag != 0x30 {
            return None;
        }
        let (&first, rest) = rest.split_first()?;
        if first < 0x80 {
            return Some((2, usize::from(first)));
        }
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 3 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, b| acc << 8 | usize::from(*b));
        Some((2 + n, len))
    }
    let (outer, _) = header(der)?;
    let inner = der.get(outer..)?;
    let (head, len) = header(inner)?;
    inner.get(..head + len)
}

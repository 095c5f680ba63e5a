//! Certificate and SPIFFE ID parsing in `postern-certs`, on what a peer or
//! an SDS server sends. Input: one byte of mode, then
//!
//! - mode 0 (tamper): one byte of options (bit 0: edit the intermediate
//!   instead of the leaf; bit 1: the peer is a server; bits 2-3: which IDs
//!   are allowed), then edits of three bytes each (a big-endian position
//!   and a byte, `0` deletes) to the fixed chain of `fixtures/pki`;
//! - mode 1 (DER): a leaf certificate, checked with the fixed intermediate;
//! - mode 2 (PEM): a chain, bundle or key, as SDS or files deliver them;
//! - mode 3: a SPIFFE ID.
//!
//! Checked besides "no panic": a chain verifies against the fixed root only
//! if the signed parts of its leaf and intermediate are the genuine ones
//! byte for byte, and only for an allowed ID, which is the leaf's; a
//! certificate's SPIFFE ID is one of its URI SANs and what
//! `peer_spiffe_id` reads; a PEM chain re-encoded parses to the same DER;
//! a SPIFFE ID that parses re-serialises to itself, in parts and whole.

#![no_main]

use std::sync::Arc;

use base64::Engine as _;
use postern_certs::source::identity_from_pem;
use postern_certs::x509::{parse_pem_chain, parse_pem_key};
use postern_certs::{
    peer_spiffe_id, verify_peer, AllowedPeers, CertInfo, PeerRole, SpiffeId, TrustBundle,
};
use postern_fuzz::pki::{self, pki, signed_part, LEAF_ID};
use rustls_pki_types::CertificateDer;

fn allowed(options: u8) -> AllowedPeers {
    match (options >> 2) % 4 {
        0 => AllowedPeers::Any,
        1 => AllowedPeers::TrustDomain("cluster.local".into()),
        2 => AllowedPeers::Only(Arc::from([SpiffeId::parse(LEAF_ID).expect("fixture id")])),
        _ => AllowedPeers::Only(Arc::from([SpiffeId::parse(
            "spiffe://cluster.local/ns/default/sa/other",
        )
        .expect("fixed id")])),
    }
}

/// What one certificate says of itself holds together.
fn check_info(der: &[u8]) {
    let info = CertInfo::parse(der);
    let id = info.as_ref().ok().and_then(|i| i.spiffe_id().ok());
    if let (Ok(info), Some(id)) = (&info, &id) {
        assert!(
            info.sans.contains(&format!("URI:{id}")),
            "{id} is not among the SANs {:?}",
            info.sans
        );
    }
    assert_eq!(peer_spiffe_id(&[CertificateDer::from(der)]), id);
}

/// Verifies a chain against the fixed root; a success must be the genuine
/// chain, for an allowed ID.
fn check_chain(leaf: &[u8], intermediates: &[CertificateDer<'_>], options: u8) {
    check_info(leaf);
    let pki = pki();
    let role = if options & 2 == 0 {
        PeerRole::Client
    } else {
        PeerRole::Server
    };
    let allowed = allowed(options);
    let leaf = CertificateDer::from(leaf);
    let Ok(id) = verify_peer(
        &pki.bundle,
        &leaf,
        intermediates,
        pki::now(),
        role,
        &allowed,
    ) else {
        return;
    };
    assert_eq!(id.as_str(), LEAF_ID, "verified for another ID");
    assert!(
        !matches!(&allowed, AllowedPeers::Only(ids) if !ids.contains(&id)),
        "verified an ID that is not allowed"
    );
    assert_eq!(
        signed_part(&leaf),
        signed_part(&pki.leaf),
        "a leaf with an edited signed part verified"
    );
    assert!(
        intermediates
            .iter()
            .any(|i| signed_part(i) == signed_part(&pki.intermediate)),
        "a chain without the genuine intermediate verified"
    );
}

fn edit(der: &[u8], edits: &[u8]) -> Vec<u8> {
    let mut bytes = der.to_vec();
    for chunk in edits.chunks_exact(3) {
        if bytes.is_empty() {
            break;
        }
        let at = usize::from(u16::from_be_bytes([chunk[0], chunk[1]])) % bytes.len();
        match chunk[2] {
            0 => {
                bytes.remove(at);
            }
            byte => bytes[at] = byte,
        }
    }
    bytes
}

fn pem(der: &[u8]) -> String {
    format!(
        "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
        base64::engine::general_purpose::STANDARD.encode(der)
    )
}

fn check_pem(text: &[u8]) {
    if let Ok(chain) = parse_pem_chain(text, "fuzz") {
        let again: String = chain.iter().map(|c| pem(c)).collect();
        let reparsed = parse_pem_chain(again.as_bytes(), "fuzz").expect("re-encoded chain parses");
        assert_eq!(reparsed, chain, "a re-encoded chain parses differently");
        check_chain(&chain[0], &chain[1..], 0);
        for cert in &chain[1..] {
            check_info(cert);
        }
    }
    if let Ok(bundle) = TrustBundle::from_pem(text) {
        let _ = bundle.infos();
    }
    let _ = parse_pem_key(text);
    // As an SDS server would deliver it: a chain for the fixed key and root.
    if let Ok(identity) = identity_from_pem(
        text,
        pki::LEAF_KEY_PEM.as_bytes(),
        pki::ROOT_PEM.as_bytes(),
        "fuzz",
    ) {
        assert_eq!(identity.id.as_str(), LEAF_ID);
    }
}

fn check_spiffe_id(text: &str) {
    let Ok(id) = SpiffeId::parse(text) else {
        return;
    };
    assert_eq!(id.as_str(), text);
    assert_eq!(id.to_string(), text);
    assert_eq!(text.parse::<SpiffeId>().as_ref(), Ok(&id));
    assert_eq!(SpiffeId::parse(id.as_str()).as_ref(), Ok(&id));
    assert_eq!(
        format!("spiffe://{}{}", id.trust_domain(), id.path()),
        text,
        "trust domain and path do not make the ID"
    );
    assert!(!id.trust_domain().is_empty() && id.path().starts_with('/'));
    assert!(
        !id.trust_domain().bytes().any(|b| b.is_ascii_uppercase()),
        "upper case in the trust domain"
    );
    match (id.namespace(), id.service_account()) {
        (Some(ns), Some(sa)) => assert_eq!(
            SpiffeId::workload(id.trust_domain(), ns, sa).as_ref(),
            Ok(&id)
        ),
        (None, None) => {}
        _ => panic!("a namespace without a service account, or the reverse"),
    }
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 4 {
        0 => {
            let Some((&options, edits)) = rest.split_first() else {
                return;
            };
            let pki = pki();
            if options & 1 == 0 {
                check_chain(
                    &edit(&pki.leaf, edits),
                    std::slice::from_ref(&pki.intermediate),
                    options,
                );
            } else {
                let intermediate = CertificateDer::from(edit(&pki.intermediate, edits));
                check_info(&intermediate);
                check_chain(&pki.leaf, &[intermediate], options);
            }
        }
        1 => check_chain(rest, std::slice::from_ref(&pki().intermediate), 0),
        2 => check_pem(rest),
        _ => {
            if let Ok(text) = std::str::from_utf8(rest) {
                check_spiffe_id(text);
            }
        }
    }
});

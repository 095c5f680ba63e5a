//! The mesh CA's CSR handling (`postern_control::ca::Ca::sign_csr`), on
//! what any caller with a token can send. Input: one byte of mode (bit 0:
//! the rest is PEM text, else DER to wrap in PEM; the other bits pick the
//! lifetime asked for), then the CSR.
//!
//! Checked besides "no panic": a refusal is the caller's fault (never an
//! `internal` reason, which pages an operator); a CSR is signed for at most
//! one of two identities; what is signed is a two-certificate chain ending
//! in the CA's root whose leaf carries exactly the entitled SPIFFE ID, no
//! other SAN, and verifies as a client and as a server for that ID alone.

#![no_main]

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use base64::Engine as _;
use postern_certs::x509::parse_pem_chain;
use postern_certs::{verify_peer, AllowedPeers, CertInfo, PeerRole, SpiffeId, TrustBundle};
use postern_control::ca::Ca;
use rustls_pki_types::UnixTime;

struct Fixture {
    ca: Ca,
    bundle: TrustBundle,
    entitled: SpiffeId,
    other: SpiffeId,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let ca = Ca::self_signed("cluster.local").expect("fuzz CA");
        let bundle = TrustBundle::from_pem(ca.root_pem().as_bytes()).expect("CA root");
        Fixture {
            ca,
            bundle,
            entitled: SpiffeId::parse(postern_fuzz::pki::LEAF_ID).expect("fixed id"),
            other: SpiffeId::parse("spiffe://cluster.local/ns/default/sa/other").expect("fixed id"),
        }
    })
}

fn check_issued(chain: &[String], id: &SpiffeId) {
    let fixture = fixture();
    assert_eq!(chain.len(), 2, "leaf and root");
    assert_eq!(
        chain[1],
        fixture.ca.root_pem(),
        "the chain ends in the root"
    );
    let leaf = parse_pem_chain(chain[0].as_bytes(), "issued leaf").expect("issued leaf parses");
    assert_eq!(leaf.len(), 1, "one leaf");
    let info = CertInfo::parse(&leaf[0]).expect("issued leaf reads");
    assert_eq!(info.sans, [format!("URI:{id}")], "exactly the entitled SAN");
    assert_eq!(info.spiffe_id().ok().as_ref(), Some(id));
    for role in [PeerRole::Client, PeerRole::Server] {
        let allowed = AllowedPeers::Only(Arc::from([id.clone()]));
        let verified = verify_peer(
            &fixture.bundle,
            &leaf[0],
            &[],
            UnixTime::now(),
            role,
            &allowed,
        );
        assert_eq!(
            verified.as_ref(),
            Ok(id),
            "issued leaf verifies as {role:?}"
        );
    }
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((&mode, csr)) = data.split_first() else {
        return;
    };
    let pem = if mode & 1 == 0 {
        format!(
            "-----BEGIN CERTIFICATE REQUEST-----\n{}\n-----END CERTIFICATE REQUEST-----\n",
            base64::engine::general_purpose::STANDARD.encode(csr)
        )
    } else {
        match std::str::from_utf8(csr) {
            Ok(text) => text.to_owned(),
            Err(_) => return,
        }
    };
    let requested = Some(Duration::from_secs(u64::from(mode >> 1) * 3600));
    let fixture = fixture();
    let mut signed = 0;
    for id in [&fixture.entitled, &fixture.other] {
        match fixture.ca.sign_csr(&pem, id, requested) {
            Ok(chain) => {
                signed += 1;
                check_issued(&chain, id);
            }
            Err(err) => assert_ne!(err.reason(), "internal", "a CSR made the CA fail: {err:?}"),
        }
    }
    assert!(signed <= 1, "one CSR signed for two identities");
});

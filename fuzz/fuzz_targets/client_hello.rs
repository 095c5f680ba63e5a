//! Protocol detection on a connection's first bytes
//! (`postern::listener::detect::detect`): the ClientHello SNI and ALPN
//! parser behind filter-chain selection, TLS passthrough and capture, the
//! HTTP/2 preface and HTTP/1 request lines. Input: the bytes a client sent.
//!
//! Checked besides "no panic": a decision never changes as more bytes come
//! (every shorter prefix either asks for more or decided the same); the
//! SNI is lowercase and each ALPN value is length-prefixed in the
//! handshake, and the SNI too, up to case; when rustls reads the same
//! ClientHello, it finds the same SNI and ALPN; and the filter chain picked
//! for those facts (`ChainTable::select`) is one whose criteria they meet.

#![no_main]

use std::sync::OnceLock;

use postern::listener::chain_match::{ChainMatch, ChainTable, ConnectionFacts};
use postern::listener::detect::{detect, Detection, Protocol, MAX_PREFIX};

const PORT: u16 = 15006;

fn chains() -> &'static (Vec<ChainMatch>, ChainTable) {
    static CHAINS: OnceLock<(Vec<ChainMatch>, ChainTable)> = OnceLock::new();
    CHAINS.get_or_init(|| {
        let chain =
            |port: Option<u16>, names: &[&str], tls: Option<bool>, alpn: &[&str]| ChainMatch {
                destination_port: port,
                server_names: names.iter().map(|n| (*n).to_owned()).collect(),
                transport_tls: tls,
                application_protocols: alpn.iter().map(|a| (*a).to_owned()).collect(),
            };
        let chains = vec![
            chain(None, &["api.example.com"], Some(true), &["h2"]),
            chain(None, &["api.example.com"], Some(true), &["http/1.1"]),
            chain(None, &["*.example.com"], Some(true), &[]),
            chain(
                None,
                &["*.svc.cluster.local"],
                None,
                &["istio", "istio-peer-exchange"],
            ),
            chain(None, &[], Some(true), &[]),
            chain(None, &[], Some(false), &[]),
            chain(Some(PORT), &["db.example.com"], None, &[]),
        ];
        let table = ChainTable::new(&chains).expect("fixed chains are distinct");
        (chains, table)
    })
}

/// Envoy's rules for one chain, written out plainly.
fn meets(chain: &ChainMatch, facts: &ConnectionFacts) -> bool {
    let name = facts.server_name.as_deref().unwrap_or("");
    chain
        .destination_port
        .is_none_or(|p| p == facts.destination_port)
        && (chain.server_names.is_empty()
            || chain
                .server_names
                .iter()
                .any(|n| match n.strip_prefix('*') {
                    Some(suffix) => name.len() > suffix.len() && name.ends_with(suffix),
                    None => n.eq_ignore_ascii_case(name),
                }))
        && chain.transport_tls.is_none_or(|tls| tls == facts.tls)
        && (chain.application_protocols.is_empty()
            || facts.application_protocols.iter().any(|p| {
                chain
                    .application_protocols
                    .iter()
                    .any(|a| a.as_bytes() == p)
            }))
}

/// The handshake bytes of consecutive TLS handshake records.
fn handshake(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut rest = data;
    while rest.len() >= 5 && rest[0] == 0x16 {
        let length = usize::from(u16::from_be_bytes([rest[3], rest[4]]));
        let end = (5 + length).min(rest.len());
        out.extend_from_slice(&rest[5..end]);
        rest = &rest[end..];
    }
    out
}

fn contains(haystack: &[u8], needle: &[u8], same: impl Fn(&[u8], &[u8]) -> bool) -> bool {
    haystack.windows(needle.len()).any(|w| same(w, needle))
}

/// What rustls's server side reads of the same ClientHello, if it reads one.
fn rustls_view(data: &[u8]) -> Option<(Option<String>, Option<Vec<Vec<u8>>>)> {
    let mut acceptor = rustls::server::Acceptor::default();
    let mut input = data;
    while !input.is_empty() {
        match acceptor.read_tls(&mut input) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
    let accepted = acceptor.accept().ok()??;
    let hello = accepted.client_hello();
    Some((
        hello.server_name().map(str::to_owned),
        hello
            .alpn()
            .map(|protocols| protocols.map(<[u8]>::to_vec).collect()),
    ))
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let data = &data[..data.len().min(MAX_PREFIX + 64)];
    let decision = detect(data);
    // Shorter prefixes: all of them for small inputs, a sample otherwise.
    let step = (data.len() / 64).max(1);
    for cut in (0..data.len()).step_by(step) {
        match detect(&data[..cut]) {
            Detection::NeedMore => {}
            earlier => assert_eq!(earlier, decision, "decided at {cut} bytes, then changed"),
        }
    }
    let Detection::Done(Protocol::Tls(hello)) = &decision else {
        return;
    };
    let handshake = handshake(data);
    if let Some(sni) = &hello.sni {
        assert!(
            !sni.bytes().any(|b| b.is_ascii_uppercase()),
            "SNI not lowercase"
        );
        // As sent, or sent with one trailing dot (dropped, as rustls does).
        let sent = |name: &str| {
            let mut prefixed = u16::try_from(name.len())
                .expect("SNI fits a record")
                .to_be_bytes()
                .to_vec();
            prefixed.extend_from_slice(name.as_bytes());
            contains(&handshake, &prefixed, |a, b| a.eq_ignore_ascii_case(b))
        };
        assert!(
            sent(sni) || sent(&format!("{sni}.")),
            "SNI {sni:?} is not in the handshake"
        );
    }
    for protocol in &hello.alpn {
        let mut prefixed = vec![u8::try_from(protocol.len()).expect("ALPN fits a byte")];
        prefixed.extend_from_slice(protocol);
        assert!(
            contains(&handshake, &prefixed, |a, b| a == b),
            "ALPN {protocol:?} is not in the handshake"
        );
    }
    if let Some((sni, alpn)) = rustls_view(data) {
        if let Some(sni) = sni {
            // Both drop one trailing dot.
            assert_eq!(
                hello.sni.as_deref(),
                Some(sni.to_ascii_lowercase().as_str()),
                "SNI differs from rustls"
            );
        }
        assert_eq!(
            hello.alpn,
            alpn.unwrap_or_default(),
            "ALPN differs from rustls"
        );
    }
    let (chains, table) = chains();
    for port in [PORT, 443] {
        let facts = ConnectionFacts {
            destination_port: port,
            server_name: hello.sni.clone(),
            tls: true,
            application_protocols: hello.alpn.clone(),
        };
        if let Some(index) = table.select(&facts) {
            assert!(
                meets(&chains[index], &facts),
                "chain {index} picked for {facts:?}"
            );
        }
    }
});

use super::*;

fn chain(names: &[&str], tls: Option<bool>, alpn: &[&str]) -> ChainMatch {
    ChainMatch {
        destination_port: None,
        server_names: names.iter().map(|s| s.to_string()).collect(),
        transport_tls: tls,
        application_protocols: alpn.iter().map(|s| s.to_string()).collect(),
    }
}

fn tls(sni: Option<&str>, alpn: &[&str]) -> ConnectionFacts {
    ConnectionFacts {
        destination_port: 443,
        server_name: sni.map(str::to_string),
        tls: true,
        application_protocols: alpn.iter().map(|a| a.as_bytes().to_vec()).collect(),
    }
}

fn plain() -> ConnectionFacts {
    ConnectionFacts {
        destination_port: 443,
        ..Default::default()
    }
}

#[test]
fn exact_name_before_wildcards_before_catch_all() {
    let table = ChainTable::new(&[
        chain(&[], None, &[]),
        chain(&["*.com"], None, &[]),
        chain(&["*.example.com"], None, &[]),
        chain(&["api.example.com"], None, &[]),
    ])
    .unwrap();
    assert_eq!(table.select(&tls(Some("api.example.com"), &[])), Some(3));
    assert_eq!(table.select(&tls(Some("www.example.com"), &[])), Some(2));
    // Wildcards cover several labels, the longest suffix first.
    assert_eq!(table.select(&tls(Some("a.b.example.com"), &[])), Some(2));
    assert_eq!(table.select(&tls(Some("other.com"), &[])), Some(1));
    // `*.example.com` does not match `example.com` itself.
    assert_eq!(table.select(&tls(Some("example.com"), &[])), Some(1));
    assert_eq!(table.select(&tls(Some("example.org"), &[])), Some(0));
    assert_eq!(table.select(&tls(None, &[])), Some(0));
    assert_eq!(table.select(&plain()), Some(0));
}

#[test]
fn names_compare_without_case() {
    let table = ChainTable::new(&[chain(&["API.Example.com", "*.Test"], None, &[])]).unwrap();
    assert_eq!(table.select(&tls(Some("api.example.COM"), &[])), Some(0));
    assert_eq!(table.select(&tls(Some("x.test"), &[])), Some(0));
    assert_eq!(table.select(&tls(Some("test"), &[])), None);
}

#[test]
fn transport_protocol_splits_tls_from_plaintext() {
    let table =
        ChainTable::new(&[chain(&[], Some(false), &[]), chain(&[], Some(true), &[])]).unwrap();
    assert_eq!(table.select(&plain()), Some(0));
    assert_eq!(table.select(&tls(Some("a"), &[])), Some(1));
}

#[test]
fn alpn_in_the_clients_order_then_chains_without() {
    let table = ChainTable::new(&[
        chain(&[], None, &["h2"]),
        chain(&[], None, &["http/1.1"]),
        chain(&[], None, &[]),
    ])
    .unwrap();
    assert_eq!(table.select(&tls(None, &["http/1.1", "h2"])), Some(1));
    assert_eq!(table.select(&tls(None, &["h2", "http/1.1"])), Some(0));
    assert_eq!(table.select(&tls(None, &["spdy/3"])), Some(2));
    assert_eq!(table.select(&tls(None, &[])), Some(2));
}

#[test]
fn a_more_specific_level_never_falls_back() {
    // Envoy picks the bucket of the exact name, finds no TLS chain in it,
    // and does not try the catch-all chain: the connection matches nothing.
    let table = ChainTable::new(&[
        chain(&["a.example.com"], Some(false), &[]),
        chain(&[], Some(true), &[]),
    ])
    .unwrap();
    assert_eq!(table.select(&tls(Some("a.example.com"), &[])), None);
    assert_eq!(table.select(&tls(Some("b.example.com"), &[])), Some(1));
    // The same for ALPN under a transport protocol.
    let table = ChainTable::new(&[chain(&[], Some(true), &["h2"]), chain(&[], None, &[])]).unwrap();
    assert_eq!(table.select(&tls(None, &["http/1.1"])), None);
    assert_eq!(table.select(&plain()), Some(1));
}

#[test]
fn destination_port_comes_first() {
    let mut on_8443 = chain(&["a.example.com"], None, &[]);
    on_8443.destination_port = Some(8443);
    let table = ChainTable::new(&[chain(&["a.example.com"], None, &[]), on_8443]).unwrap();
    let mut facts = tls(Some("a.example.com"), &[]);
    assert_eq!(table.select(&facts), Some(0));
    facts.destination_port = 8443;
    assert_eq!(table.select(&facts), Some(1));
}

#[test]
fn same_criteria_twice_is_refused() {
    assert_eq!(
        ChainTable::new(&[
            chain(&["a", "b"], Some(true), &[]),
            chain(&["c", "B"], Some(true), &[]),
        ])
        .unwrap_err(),
        DuplicateMatch {
            first: 0,
            second: 1
        }
    );
    assert!(ChainTable::new(&[chain(&[], None, &[]), chain(&[], None, &[])]).is_err());
    // Overlapping but distinguishable criteria are fine.
    assert!(ChainTable::new(&[
        chain(&["a"], Some(true), &[]),
        chain(&["a"], Some(false), &[]),
        chain(&["a"], None, &["h2"]),
    ])
    .is_ok());
    // One chain naming a value twice is not a conflict with itself.
    assert!(ChainTable::new(&[chain(&["a", "A"], None, &["h2", "h2"])]).is_ok());
}

#[test]
fn no_chains_matches_nothing() {
    let table = ChainTable::new(&[]).unwrap();
    assert_eq!(table.select(&plain()), None);
}

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

mod properties {
    use super::*;
    use proptest::prelude::*;

    /// Whether `m` taken alone accepts `facts`.
    fn accepts(m: &ChainMatch, facts: &ConnectionFacts) -> bool {
        let sni = facts
            .server_name
            .as_deref()
            .unwrap_or("")
            .to_ascii_lowercase();
        let name_ok = m.server_names.is_empty()
            || m.server_names.iter().any(|n| {
                let n = n.to_ascii_lowercase();
                match n.strip_prefix('*') {
                    Some(suffix) => sni.len() > suffix.len() && sni.ends_with(&suffix),
                    None => n == sni,
                }
            });
        let alpn_ok = m.application_protocols.is_empty()
            || facts
                .application_protocols
                .iter()
                .any(|p| m.application_protocols.iter().any(|a| a.as_bytes() == p));
        m.destination_port
            .is_none_or(|p| p == facts.destination_port)
            && name_ok
            && m.transport_tls.is_none_or(|t| t == facts.tls)
            && alpn_ok
    }

    fn a_match() -> impl Strategy<Value = ChainMatch> {
        let name = prop_oneof![
            Just("a.example.com".to_string()),
            Just("b.example.com".to_string()),
            Just("*.example.com".to_string()),
            Just("*.com".to_string()),
        ];
        let alpn = prop_oneof![Just("h2".to_string()), Just("http/1.1".to_string())];
        (
            proptest::option::of(prop_oneof![Just(443u16), Just(8443u16)]),
            proptest::collection::vec(name, 0..2),
            proptest::option::of(any::<bool>()),
            proptest::collection::vec(alpn, 0..2),
        )
            .prop_map(
                |(destination_port, server_names, transport_tls, application_protocols)| {
                    ChainMatch {
                        destination_port,
                        server_names,
                        transport_tls,
                        application_protocols,
                    }
                },
            )
    }

    fn facts() -> impl Strategy<Value = ConnectionFacts> {
        let sni = prop_oneof![
            Just("a.example.com"),
            Just("x.a.example.com"),
            Just("example.com"),
            Just("other.org"),
        ];
        let alpn = prop_oneof![Just(b"h2".to_vec()), Just(b"http/1.1".to_vec())];
        (
            prop_oneof![Just(443u16), Just(8443u16)],
            proptest::option::of(sni),
            any::<bool>(),
            proptest::collection::vec(alpn, 0..3),
        )
            .prop_map(|(port, sni, tls, alpn)| ConnectionFacts {
                destination_port: port,
                server_name: sni.map(str::to_string),
                tls,
                application_protocols: alpn,
            })
    }

    proptest! {
        /// The chain picked always accepts the connection on its own, and
        /// a connection some chain accepts on every criterion at once,
        /// being the only chain, is picked.
        #[test]
        fn the_chain_picked_accepts_the_connection(
            chains in proptest::collection::vec(a_match(), 0..6),
            facts in facts(),
        ) {
            let Ok(table) = ChainTable::new(&chains) else {
                return Ok(());
            };
            if let Some(i) = table.select(&facts) {
                prop_assert!(accepts(&chains[i], &facts), "{:?} picked for {:?}", chains[i], facts);
            }
            if let [only] = chains.as_slice() {
                prop_assert_eq!(table.select(&facts).is_some(), accepts(only, &facts));
            }
        }
    }
}

//! Listeners whose filter chains differ: each chain keeps its own network
//! filter, routes and TLS, and is picked per connection.

use super::edge::{
    by_names, by_transport, cert_for, edge_context, inline_cert, problems_of, sds, with_chains,
};
use super::*;
use crate::config::{Config, ListenerProtocol, ListenerTls};
use crate::listener::chain_match::ConnectionFacts;

fn hcm_chain(
    m: listener::FilterChainMatch,
    socket: Option<core::TransportSocket>,
    routes: &str,
) -> listener::FilterChain {
    let manager = hcm::HttpConnectionManager {
        stat_prefix: "gw".into(),
        route_specifier: Some(hcm::http_connection_manager::RouteSpecifier::Rds(
            hcm::Rds {
                route_config_name: routes.into(),
                ..Default::default()
            },
        )),
        ..Default::default()
    };
    listener::FilterChain {
        filter_chain_match: Some(m),
        transport_socket: socket,
        filters: vec![listener::Filter {
            name: "envoy.filters.network.http_connection_manager".into(),
            config_type: Some(listener::filter::ConfigType::TypedConfig(any(&manager))),
        }],
        ..Default::default()
    }
}

fn tcp_chain(m: listener::FilterChainMatch, cluster: &str) -> listener::FilterChain {
    listener::FilterChain {
        filter_chain_match: Some(m),
        filters: tcp_listener("x", None, cluster).filter_chains[0]
            .filters
            .clone(),
        ..Default::default()
    }
}

fn sni(name: &str) -> ConnectionFacts {
    ConnectionFacts {
        destination_port: 15006,
        server_name: Some(name.into()),
        tls: true,
        application_protocols: Vec::new(),
    }
}

/// A gateway as go-control-plane or Istio writes one: two hosts by SNI
/// with their own routes and certificates, plaintext TCP, TLS passed
/// through by SNI, an ALPN-picked chain and a default chain.
fn gateway() -> listener::Listener {
    let mut passthrough = by_names(&["pass.example.com"]);
    passthrough.transport_protocol = "tls".into();
    let mut grpc = by_names(&["a.example.com"]);
    grpc.application_protocols = vec!["h2".into()];
    let mut l = with_chains(vec![
        hcm_chain(
            by_names(&["a.example.com"]),
            Some(edge_context(inline_cert("a.example.com"))),
            "routes-a",
        ),
        hcm_chain(
            by_names(&["*.b.example.com"]),
            Some(edge_context(inline_cert("b.example.com"))),
            "routes-b",
        ),
        tcp_chain(by_transport("raw_buffer", &[]), "db"),
        tcp_chain(passthrough, "pass"),
        hcm_chain(
            grpc,
            Some(edge_context(inline_cert("a.example.com"))),
            "routes-grpc",
        ),
    ]);
    l.default_filter_chain = Some(hcm_chain(
        Default::default(),
        Some(edge_context(inline_cert("any.example.com"))),
        "routes-any",
    ));
    l.listener_filters = vec![listener::ListenerFilter {
        name: "envoy.filters.listener.tls_inspector".into(),
        ..Default::default()
    }];
    l
}

#[test]
fn chains_that_differ_are_routed_per_chain() {
    let translated = listener_parts(&gateway(), Some(&sds()), &|_| None).unwrap();
    assert_eq!(translated.routes, RouteSource::None);
    assert!(translated.edge_secrets.is_empty());
    assert_eq!(
        translated.chain_routes,
        [
            (0, "routes-a".to_string()),
            (1, "routes-b".to_string()),
            (4, "routes-grpc".to_string()),
            (5, "routes-any".to_string()),
        ]
    );
    let mut file = translated.file;
    assert!(file.tls.is_none() && file.mtls.is_none() && file.virtual_hosts.is_empty());
    let names: Vec<&str> = file.filter_chains.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "filter_chains[0]",
            "filter_chains[1]",
            "filter_chains[2]",
            "filter_chains[3]",
            "filter_chains[4]",
            "default_filter_chain"
        ]
    );
    assert!(file.filter_chains[5].default);
    // Each edge chain's certificate serves whatever name selected it.
    let tls = file.filter_chains[1].listener.tls.as_ref().unwrap();
    assert!(tls.certificates[0].server_names.is_empty() && !tls.require_sni_match);

    for (c, routes) in &translated.chain_routes {
        let rc = config_of(vec![route_to(routes)]);
        route_configuration(&rc)
            .unwrap()
            .apply_to(&mut file.filter_chains[*c].listener);
    }
    let mut config: ConfigFile = serde_yaml_ng::from_str("{}").unwrap();
    config.listeners.push(file);
    let config = Config::from_dynamic_model(config).unwrap_or_else(|e| panic!("{e}"));
    let ListenerProtocol::Chains(chains) = &config.listeners[0].protocol else {
        panic!("not a listener with chains");
    };
    assert!(chains.inspect);
    assert_eq!(chains.default, Some(5));
    let pick = |facts: &ConnectionFacts| chains.table.select(facts).or(chains.default);
    assert_eq!(pick(&sni("a.example.com")), Some(0));
    assert_eq!(pick(&sni("x.y.b.example.com")), Some(1));
    assert_eq!(pick(&ConnectionFacts::default()), Some(2));
    assert_eq!(pick(&sni("pass.example.com")), Some(3));
    let mut h2 = sni("a.example.com");
    h2.application_protocols = vec![b"h2".to_vec()];
    assert_eq!(pick(&h2), Some(4));
    assert_eq!(pick(&sni("elsewhere.example.org")), Some(5));

    for (i, tls) in [true, true, false, false, true, true]
        .into_iter()
        .enumerate()
    {
        assert_eq!(
            matches!(chains.chains[i].tls, ListenerTls::Edge(_)),
            tls,
            "chain {i}"
        );
    }
    assert!(matches!(&chains.chains[2].protocol, ListenerProtocol::Tcp(t) if &*t.cluster == "db"));
    assert!(
        matches!(&chains.chains[3].protocol, ListenerProtocol::Tcp(t) if &*t.cluster == "pass")
    );
    let ListenerProtocol::Http(http) = &chains.chains[1].protocol else {
        panic!("not http");
    };
    assert!(format!("{:?}", http.routes).contains("routes-b"));
}

#[test]
fn without_a_default_filter_chain_no_chain_is_the_default() {
    let mut l = gateway();
    l.default_filter_chain = None;
    let translated = listener_parts(&l, Some(&sds()), &|_| None).unwrap();
    assert!(translated.file.filter_chains.iter().all(|c| !c.default));
}

#[test]
fn sds_certificates_of_a_chain_fill_that_chain() {
    let l = with_chains(vec![
        hcm_chain(
            by_names(&["shop.example.com"]),
            Some(edge_context(|_| {})),
            "shop",
        ),
        tcp_chain(by_transport("raw_buffer", &[]), "db"),
    ]);
    let translated = listener_parts(&l, Some(&sds()), &|_| None).unwrap();
    assert_eq!(
        translated.edge_secrets,
        [EdgeSecret {
            field: "filter_chains[0].transport_socket.common_tls_context.tls_certificate_sds_secret_configs[0]".into(),
            name: "gateway-cert".into(),
            slot: EdgeSlot::ChainCertificate(0),
        }]
    );
    let (chain_pem, key_pem) = cert_for("shop.example.com");
    let cert = SecretValue::Certificate(chain_pem.clone().into(), key_pem.into());
    let mut file = translated.file.clone();
    assert_eq!(
        fill_edge_secrets(&mut file, &translated.edge_secrets, &|_| None),
        Ok(false)
    );
    assert_eq!(
        fill_edge_secrets(&mut file, &translated.edge_secrets, &|_| Some(cert.clone())),
        Ok(true)
    );
    let tls = file.filter_chains[0].listener.tls.as_ref().unwrap();
    assert_eq!(
        *tls.certificates[0].inline.as_ref().unwrap().0 .0,
        chain_pem.into_bytes()
    );
}

#[test]
fn per_chain_shapes_postern_cannot_serve_are_refused_naming_the_field() {
    let mut on_capture = gateway();
    on_capture.use_original_dst = Some(postern_proto::google::protobuf::BoolValue { value: true });
    let mut inbound = gateway();
    inbound.traffic_direction = 1;
    let cases: Vec<(listener::Listener, &str)> = vec![
        (
            with_chains(vec![
                tcp_chain(by_transport("raw_buffer", &[]), "a"),
                hcm_chain(by_transport("raw_buffer", &[]), None, "b"),
            ]),
            "filter_chains[1].filter_chain_match: matches the same connections as filter_chains[0].filter_chain_match",
        ),
        (
            with_chains(vec![hcm_chain(by_names(&["a.example.com"]), None, "a")]),
            "filter_chains[0].filters: a chain that matches TLS it does not terminate",
        ),
        (
            with_chains(vec![
                hcm_chain(by_names(&["*foo.example.com"]), Some(edge_context(|_| {})), "a"),
                tcp_chain(by_transport("raw_buffer", &[]), "db"),
            ]),
            "filter_chains[0].filter_chain_match.server_names[0]: \"*foo.example.com\" is not a server name",
        ),
        (
            on_capture,
            "filter_chains (chains that differ, on a listener with use_original_dst",
        ),
        // Listener filters on an inbound listener make Istio's virtualInbound.
        (inbound, "needs envoy.filters.listener.original_dst"),
    ];
    for (i, (l, expected)) in cases.iter().enumerate() {
        let problems = problems_of(l);
        assert!(problems.contains(expected), "case {i}: {problems}");
    }
}

#[test]
fn each_chain_keeps_its_underscore_action_and_the_listener_its_backlog() {
    use self::core::http_protocol_options::HeadersWithUnderscoresAction as Action;
    use crate::http::headers::UnderscoreHeaders;
    let mut l = gateway();
    l.tcp_backlog_size = Some(UInt32Value { value: 2048 });
    let filter = &mut l.filter_chains[1].filters[0];
    let Some(listener::filter::ConfigType::TypedConfig(packed)) = &filter.config_type else {
        unreachable!("hcm_chain packs its connection manager")
    };
    let mut manager = hcm::HttpConnectionManager::decode(packed.value.as_slice()).unwrap();
    manager.common_http_protocol_options = Some(core::HttpProtocolOptions {
        headers_with_underscores_action: Action::DropHeader as i32,
        ..Default::default()
    });
    filter.config_type = Some(listener::filter::ConfigType::TypedConfig(any(&manager)));
    let file = listener_parts(&l, Some(&sds()), &|_| None).unwrap().file;
    assert_eq!(file.limits.tcp_backlog_size, 2048);
    let underscores = |c: usize| {
        file.filter_chains[c]
            .listener
            .limits
            .headers_with_underscores
    };
    assert_eq!(underscores(0), UnderscoreHeaders::Allow);
    assert_eq!(underscores(1), UnderscoreHeaders::DropHeader);
}

use super::*;

const BASE: &str = r#"
listeners:
  - name: web
    address: 127.0.0.1:0
    kind: http
    virtual_hosts:
      - name: all
        domains: ["*"]
        routes:
          - name: r0
            match: { path: { prefix: / } }
            cluster: backend
clusters:
  - name: backend
    endpoints: [{ address: 127.0.0.1:9 }]
"#;

fn errors_of(yaml: &str) -> Vec<String> {
    match Config::from_yaml(yaml) {
        Ok(_) => panic!("config should be rejected:\n{yaml}"),
        Err(err) => err.field_errors().iter().map(ToString::to_string).collect(),
    }
}

fn assert_error(yaml: &str, path: &str, reason_part: &str) {
    let errors = errors_of(yaml);
    assert!(
        errors
            .iter()
            .any(|e| e.starts_with(&format!("{path}: ")) && e.contains(reason_part)),
        "expected `{path}: ...{reason_part}...`, got {errors:#?}"
    );
}

#[test]
fn base_config_is_valid() {
    let config = Config::from_yaml(BASE).unwrap();
    assert_eq!(config.listeners.len(), 1);
    assert_eq!(config.drain_timeout, Duration::from_secs(30));
}

#[test]
fn unknown_cluster_names_the_route() {
    let yaml = BASE.replace("cluster: backend", "cluster: paymnts");
    assert_error(
        &yaml,
        "listeners[0].virtual_hosts[0].routes[0].cluster",
        "unknown cluster \"paymnts\"",
    );
}

#[test]
fn unknown_key_is_an_error_with_its_path() {
    let yaml = BASE.replace("    kind: http", "    kind: http\n    adress: 127.0.0.1:1");
    let errors = errors_of(&yaml);
    assert_eq!(errors.len(), 1);
    assert!(
        errors[0].starts_with("listeners[0].adress: unknown field `adress`"),
        "{errors:?}"
    );
}

#[test]
fn wrong_enum_value() {
    let yaml = BASE.replace("kind: http", "kind: htp");
    assert_error(&yaml, "listeners[0].kind", "unknown variant `htp`");
}

#[test]
fn bad_duration() {
    let yaml = format!("drain_timeout: 5 parsecs\n{BASE}");
    assert_error(&yaml, "drain_timeout", "duration");
}

#[test]
fn missing_required_field() {
    let yaml = BASE.replace("    address: 127.0.0.1:0\n", "");
    assert_error(&yaml, "listeners[0]", "missing field `address`");
}

#[test]
fn bad_regex_is_named() {
    let yaml = BASE.replace("{ prefix: / }", "{ regex: \"/(unclosed\" }");
    assert_error(
        &yaml,
        "listeners[0].virtual_hosts[0].routes[0].match.path.regex",
        "invalid regex",
    );
}

#[test]
fn two_actions_are_rejected() {
    let yaml = BASE.replace(
        "cluster: backend\n",
        "cluster: backend\n            direct_response: { status: 200 }\n",
    );
    assert_error(
        &yaml,
        "listeners[0].virtual_hosts[0].routes[0]",
        "exactly one action",
    );
}

#[test]
fn duplicate_names() {
    let yaml = format!("{BASE}  - name: backend\n    endpoints: [{{ address: 127.0.0.1:10 }}]\n");
    assert_error(&yaml, "clusters[1].name", "duplicate cluster name");
}

#[test]
fn tcp_listener_needs_tcp_block() {
    let yaml = BASE.replace("kind: http", "kind: tcp");
    let errors = errors_of(&yaml);
    assert!(
        errors.iter().any(|e| e.starts_with("listeners[0].tcp: ")),
        "{errors:?}"
    );
    assert!(
        errors
            .iter()
            .any(|e| e.starts_with("listeners[0].virtual_hosts: ")),
        "{errors:?}"
    );
}

#[test]
fn every_problem_is_reported() {
    let yaml = BASE
        .replace("cluster: backend", "cluster: nope")
        .replace("address: 127.0.0.1:9", "address: 127.0.0.1:0");
    let errors = errors_of(&yaml);
    assert_eq!(errors.len(), 2, "{errors:?}");
}

#[test]
fn yaml_syntax_error_has_location() {
    let err = Config::from_yaml("listeners: [\n").unwrap_err().to_string();
    assert!(err.contains("line"), "{err}");
}

#[test]
fn domain_served_twice() {
    let yaml = BASE.replace(
        "        domains: [\"*\"]\n",
        "        domains: [\"a.example.com\", \"A.example.com.\"]\n",
    );
    assert_error(
        &yaml,
        "listeners[0].virtual_hosts[0].domains[1]",
        "already served",
    );
}

#[test]
fn retry_and_redirect_checks() {
    let yaml = BASE.replace(
        "cluster: backend\n",
        "cluster: backend\n            retry: { on: [retriable-status-codes], max_attempts: 0 }\n",
    );
    assert_error(
        &yaml,
        "listeners[0].virtual_hosts[0].routes[0].retry.max_attempts",
        "at least 1",
    );
    assert_error(
        &yaml,
        "listeners[0].virtual_hosts[0].routes[0].retry.retriable_status_codes",
        "needs at least one code",
    );
    let yaml = BASE.replace(
        "cluster: backend\n",
        "cluster: backend\n            retry: { on: [5xx], retriable_status_codes: [409] }\n",
    );
    assert_error(
        &yaml,
        "listeners[0].virtual_hosts[0].routes[0].retry.retriable_status_codes",
        "has no effect",
    );
    let yaml = BASE.replace("cluster: backend\n", "redirect: { status: 200 }\n");
    assert_error(
        &yaml,
        "listeners[0].virtual_hosts[0].routes[0].redirect.status",
        "not one of",
    );
}

#[test]
fn weighted_clusters_need_weight() {
    let yaml = BASE.replace(
        "cluster: backend\n",
        "weighted_clusters: [{ cluster: backend, weight: 0 }]\n",
    );
    assert_error(
        &yaml,
        "listeners[0].virtual_hosts[0].routes[0].weighted_clusters",
        "add up to 0",
    );
}

#[test]
fn example_config_is_valid() {
    let text = include_str!("../../../deploy/examples/gateway.yaml");
    Config::from_yaml(text).unwrap();
}

const IDENTITY: &str = r#"
identity:
  spiffe_id: spiffe://cluster.local/ns/shop/sa/web
  source:
    files: { cert: /etc/postern/cert.pem, key: /etc/postern/key.pem, bundle: /etc/postern/bundle.pem }
"#;

#[test]
fn tls_settings_are_checked_with_field_paths() {
    let with_identity = format!("{BASE}{IDENTITY}");
    Config::from_yaml(&with_identity).unwrap();

    let bad_id = with_identity.replace("spiffe://cluster.local/ns", "spiffe://Cluster/ns");
    assert_error(
        &bad_id,
        "identity.spiffe_id",
        "trust domain has invalid character",
    );

    let both_sources = with_identity.replace(
        "    files:",
        "    istio_ca: { address: \"https://127.0.0.1:15012\" }\n    files:",
    );
    assert_error(
        &both_sources,
        "identity.source",
        "exactly one of files, istio_ca, sds",
    );

    let bad_renew = format!("{with_identity}  renew_at: 1.5\n");
    assert_error(&bad_renew, "identity.renew_at", "between 0 and 1");

    let plaintext_ca = format!(
        "{BASE}identity:\n  spiffe_id: spiffe://cluster.local/ns/shop/sa/web\n  source:\n    istio_ca: {{ address: \"http://127.0.0.1:15012\" }}\n"
    );
    assert_error(
        &plaintext_ca,
        "identity.source.istio_ca.trust_bundle",
        "required with an http:// CA",
    );
    let bad_address = plaintext_ca.replace("http://127.0.0.1:15012", "127.0.0.1:15012");
    assert_error(
        &bad_address,
        "identity.source.istio_ca.address",
        "not an http:// or https://",
    );
    let https_ca = plaintext_ca.replace("http://", "https://");
    assert_error(
        &https_ca,
        "identity.source.istio_ca.ca_cert",
        "needs the root its TLS certificate chains to",
    );

    // Mesh mTLS without an identity to present.
    let strict = BASE.replace("kind: http", "kind: http\n    mtls: { mode: strict }");
    assert_error(&strict, "listeners[0].mtls.mode", "needs an identity");

    let both = format!("{IDENTITY}{}", BASE.replace(
        "kind: http",
        "kind: http\n    mtls: { mode: strict }\n    tls: { certificates: [{ cert: x, key: y }] }",
    ));
    assert_error(
        &both,
        "listeners[0].tls",
        "either mtls (mesh) or tls (edge)",
    );

    let bad_allowed =
        format!("{IDENTITY}{}", BASE.replace(
        "kind: http",
        "kind: http\n    mtls: { mode: strict, allowed_identities: [\"spiffe://td/a/../b\"] }",
    ));
    assert_error(
        &bad_allowed,
        "listeners[0].mtls.allowed_identities[0]",
        "not allowed",
    );

    let missing_cert = BASE.replace(
        "kind: http",
        "kind: http\n    tls: { certificates: [{ cert: /nonexistent/cert.pem, key: /nonexistent/key.pem }] }",
    );
    assert_error(
        &missing_cert,
        "listeners[0].tls.certificates[0].cert",
        "cannot read /nonexistent/cert.pem",
    );

    let mesh_cluster = BASE.replace(
        "endpoints: [{ address: 127.0.0.1:9 }]",
        "endpoints: [{ address: 127.0.0.1:9 }]\n    tls: { mode: mesh }",
    );
    assert_error(&mesh_cluster, "clusters[0].tls.mode", "needs an identity");
    assert_error(
        &mesh_cluster,
        "clusters[0].tls.identities",
        "needs the SPIFFE IDs",
    );

    let simple_cluster = BASE.replace(
        "endpoints: [{ address: 127.0.0.1:9 }]",
        "endpoints: [{ address: 127.0.0.1:9 }]\n    tls: { mode: simple, ca: /nonexistent/ca.pem }",
    );
    assert_error(
        &simple_cluster,
        "clusters[0].tls.server_name",
        "needs the DNS name",
    );

    let typo = with_identity.replace("spiffe_id:", "spife_id:");
    let errors = errors_of(&typo);
    assert!(errors[0].contains("unknown field `spife_id`"), "{errors:?}");
}

#[test]
fn xds_bootstrap_is_checked_with_field_paths() {
    let with_xds =
        format!("{BASE}node: {{ id: n1 }}\nxds: {{ address: \"http://127.0.0.1:15010\" }}\n");
    Config::from_yaml(&with_xds).unwrap();

    let no_node = format!("{BASE}xds: {{ address: \"http://127.0.0.1:15010\" }}\n");
    assert_error(&no_node, "node.id", "needs a node id");
    let bad_address = with_xds.replace("http://127.0.0.1:15010", "127.0.0.1:15010");
    assert_error(&bad_address, "xds.address", "not an http:// or https://");
    let https = with_xds.replace("http://", "https://");
    assert_error(&https, "xds.ca_cert", "needs the root");
    let half_mtls = with_xds.replace(
        "xds: { address: \"http://127.0.0.1:15010\" }",
        "xds: { address: \"https://127.0.0.1:15010\", ca_cert: ca.pem, client_cert: c.pem }",
    );
    assert_error(&half_mtls, "xds.client_key", "together");
    let sds_without_xds =
        format!("{BASE}identity:\n  spiffe_id: spiffe://td/ns/a/sa/b\n  source: {{ sds: {{}} }}\n");
    assert_error(
        &sds_without_xds,
        "identity.source.sds",
        "add an xds section",
    );

    // Flags fill in what the file lacks.
    let overrides = BootstrapOverrides {
        node_id: Some("n2".into()),
        xds_address: Some("http://127.0.0.1:15011".into()),
        xds_protocol: Some(file::XdsProtocolFile::Delta),
        ..Default::default()
    };
    let config = Config::from_bootstrap(None, &overrides).unwrap();
    let xds = config.source.xds.as_ref().unwrap();
    assert_eq!(xds.address, "http://127.0.0.1:15011");
    assert_eq!(xds.protocol, file::XdsProtocolFile::Delta);
    assert_eq!(config.source.node.as_ref().unwrap().id, "n2");
    let neither = Config::from_bootstrap(None, &BootstrapOverrides::default()).unwrap_err();
    assert!(neither.to_string().contains("--xds-address"), "{neither}");
}

#[test]
fn header_mutations_compile_at_every_level_and_bad_ones_name_their_field() {
    let yaml = BASE
        .replace(
            "    kind: http\n",
            "    kind: http\n    http:\n      most_specific_header_mutations_wins: true\n      headers:\n        response_headers_to_add: [{ name: x-served-by, value: \"%HOSTNAME%\" }]\n",
        )
        .replace(
            "        domains: [\"*\"]\n",
            "        domains: [\"*\"]\n        headers: { request_headers_to_remove: [x-debug] }\n",
        )
        .replace(
            "            cluster: backend\n",
            "            cluster: backend\n            headers:\n              request_headers_to_add:\n                - { name: x-client, value: \"%DOWNSTREAM_REMOTE_ADDRESS%\", append_action: overwrite_if_exists_or_add }\n",
        );
    Config::from_yaml(&yaml).unwrap();

    let bad = yaml.replace("%DOWNSTREAM_REMOTE_ADDRESS%", "%DOWNSTREAM_NOPE%");
    assert_error(
        &bad,
        "listeners[0].virtual_hosts[0].routes[0].headers.request_headers_to_add[0].value",
        "unknown command operator %DOWNSTREAM_NOPE%",
    );
    let bad = yaml.replace("[x-debug]", "[Host]");
    assert_error(
        &bad,
        "listeners[0].virtual_hosts[0].headers.request_headers_to_remove[0]",
        "pseudo-headers and host may not be modified",
    );
    let bad = yaml.replace(
        "append_action: overwrite_if_exists_or_add",
        "append_action: sometimes",
    );
    assert_error(
        &bad,
        "listeners[0].virtual_hosts[0].routes[0].headers.request_headers_to_add[0].append_action",
        "unknown variant `sometimes`",
    );
    let weighted = BASE.replace(
        "            cluster: backend\n",
        "            weighted_clusters:\n              - { cluster: backend, weight: 1, headers: { response_headers_to_add: [{ name: x-postern-peer, value: x }] } }\n",
    );
    assert_error(
        &weighted,
        "listeners[0].virtual_hosts[0].routes[0].weighted_clusters[0].headers.response_headers_to_add[0].name",
        "x-postern-* headers are Postern's own",
    );
}

#[test]
fn endpoints_may_be_dns_names_with_refresh_settings() {
    let yaml = BASE.replace(
        "    endpoints: [{ address: 127.0.0.1:9 }]",
        "    endpoints: [{ address: \"LocalHost:9\" }]\n    dns_refresh_rate: 250ms\n    dns_lookup_family: v4_only",
    );
    let config = Config::from_yaml(&yaml).unwrap();
    let cluster = &config.clusters[0];
    assert_eq!(cluster.endpoints[0].address.to_string(), "localhost:9");
    assert_eq!(cluster.dns_refresh_rate, Duration::from_millis(250));
    assert_eq!(cluster.dns_lookup_family, file::DnsLookupFamily::V4Only);
    // Defaults: Envoy's refresh rate; IPv4 first, as local backends mostly listen there.
    let defaults = Config::from_yaml(&yaml.replace(
        "    dns_refresh_rate: 250ms\n    dns_lookup_family: v4_only",
        "",
    ))
    .unwrap();
    assert_eq!(
        defaults.clusters[0].dns_refresh_rate,
        Duration::from_secs(5)
    );
    assert_eq!(
        defaults.clusters[0].dns_lookup_family,
        file::DnsLookupFamily::V4Preferred
    );

    for (address, reason) in [
        ("\"bad_host!:80\"", "is not ip:port or name:port"),
        ("\"localhost\"", "is not ip:port or name:port"),
        ("\"300.1.1.1:80\"", "is not ip:port or name:port"),
    ] {
        let bad = BASE.replace("127.0.0.1:9 }", &format!("{address} }}"));
        assert_error(&bad, "clusters[0].endpoints[0].address", reason);
    }
    let logical = BASE.replace(
        "    endpoints: [{ address: 127.0.0.1:9 }]",
        "    endpoints: [{ address: \"a.test:9\" }, { address: \"b.test:9\" }]\n    dns_type: logical\n    dns_refresh_rate: 0s",
    );
    assert_error(&logical, "clusters[0].endpoints", "exactly one endpoint");
    assert_error(&logical, "clusters[0].dns_refresh_rate", "at least 1ms");
}

#[test]
fn overload_settings_are_checked() {
    let ok = format!(
        "overload: {{ max_connections: 100, max_rss_bytes: 1000000, shed_at: 0.5, pause_accept_at: 0.5, check_interval: 50ms }}\n{BASE}"
    );
    let config = Config::from_yaml(&ok).unwrap();
    assert_eq!(config.source.overload.max_rss_bytes, Some(1_000_000));
    assert_eq!(
        Config::from_yaml(BASE).unwrap().source.overload,
        file::OverloadFile::default()
    );

    let with = |section: &str| format!("overload: {{ {section} }}\n{BASE}");
    assert_error(
        &with("max_connections: 0"),
        "overload.max_connections",
        "more than 0",
    );
    assert_error(
        &with("max_rss_bytes: 0"),
        "overload.max_rss_bytes",
        "more than 0",
    );
    assert_error(&with("shed_at: 1.5"), "overload.shed_at", "at most 1");
    assert_error(
        &with("shed_at: 0.9, pause_accept_at: 0.8"),
        "overload.pause_accept_at",
        "at least shed_at",
    );
    assert_error(
        &with("check_interval: 1ms"),
        "overload.check_interval",
        "at least 10ms",
    );
    assert_error(
        &with("max_rss: 5"),
        "overload.max_rss",
        "unknown field `max_rss`",
    );
    for bad in ["release: 0", "release: 1.01"] {
        assert_error(&with(bad), "overload.release", "at most 1");
    }
    assert_error(&with("min_hold: soon"), "overload.min_hold", "");
}

#[test]
fn overload_hysteresis_settings_default_and_parse() {
    let defaults = file::OverloadFile::default();
    assert_eq!(defaults.release, 0.95);
    assert_eq!(defaults.min_hold, std::time::Duration::from_secs(1));
    assert!(defaults.shed_tcp_connections);
    let yaml = format!(
        "overload: {{ max_rss_bytes: 1000, release: 1, min_hold: 0s, shed_tcp_connections: false }}\n{BASE}"
    );
    let overload = Config::from_yaml(&yaml).unwrap().source.overload.clone();
    assert_eq!(overload.release, 1.0);
    assert!(overload.min_hold.is_zero());
    assert!(!overload.shed_tcp_connections);
}

#[test]
fn the_listen_backlog_defaults_to_1024_and_is_checked() {
    let config = Config::from_yaml(BASE).unwrap();
    assert_eq!(config.listeners[0].limits.tcp_backlog_size, 1024);
    let with = |backlog: &str| {
        BASE.replace(
            "    kind: http\n",
            &format!("    kind: http\n    limits: {{ tcp_backlog_size: {backlog} }}\n"),
        )
    };
    let config = Config::from_yaml(&with("4096")).unwrap();
    assert_eq!(config.listeners[0].limits.tcp_backlog_size, 4096);
    for bad in ["0", "3000000000"] {
        assert_error(
            &with(bad),
            "listeners[0].limits.tcp_backlog_size",
            "more than 0 and at most 2147483647",
        );
    }
}

const GLOBAL_LIMITS: &str = r#"
node: { id: n, cluster: web }
listeners:
  - name: web
    address: 127.0.0.1:0
    kind: http
    http:
      rate_limit_service: { domain: edge, cluster: backend, failure_mode_deny: true }
    virtual_hosts:
      - name: all
        domains: ["*"]
        rate_limits: [{ actions: [{ remote_address: {} }] }]
        routes:
          - name: own
            match: { path: { prefix: /own } }
            cluster: backend
            rate_limits: [{ actions: [{ source_cluster: {} }] }]
          - name: both
            match: { path: { prefix: /both } }
            cluster: backend
            include_vh_rate_limits: true
            rate_limits: [{ actions: [{ generic_key: { descriptor_value: b } }] }]
          - name: inherit
            match: { path: { prefix: / } }
            cluster: backend
clusters:
  - name: backend
    endpoints: [{ address: 127.0.0.1:9 }]
"#;

#[test]
fn global_rate_limits_compile_with_virtual_host_fallback() {
    let config = Config::from_yaml(GLOBAL_LIMITS).unwrap();
    let ListenerProtocol::Http(http) = &config.listeners[0].protocol else {
        panic!("http listener");
    };
    let service = http.global_rate_limit.as_ref().unwrap();
    assert_eq!(service.domain, "edge");
    assert!(service.failure_mode_deny);
    assert_eq!(&*service.source_cluster, "web");
    assert_eq!(service.timeout, Duration::from_millis(20));
    let view = |path: &'static str| crate::route::RequestView {
        authority: "x",
        path,
        query: None,
        method: &http::Method::GET,
        headers: Box::leak(Box::new(http::HeaderMap::new())),
    };
    let counts: Vec<usize> = ["/own", "/both", "/other"]
        .into_iter()
        .map(|p| http.routes.route(&view(p)).unwrap().1.rate_limits.len())
        .collect();
    // Own only; own then the host's; the host's.
    assert_eq!(counts, [1, 2, 1]);
}

#[test]
fn global_rate_limit_errors_name_the_field() {
    let yaml = GLOBAL_LIMITS.replace("cluster: backend, failure_mode_deny", "failure_mode_deny");
    assert_error(
        &yaml,
        "listeners[0].http.rate_limit_service",
        "exactly one of cluster, address",
    );
    let yaml = GLOBAL_LIMITS.replace(
        "cluster: backend, failure_mode_deny",
        "address: \"h2://x\", failure_mode_deny",
    );
    assert_error(
        &yaml,
        "listeners[0].http.rate_limit_service.address",
        "http://host:port",
    );
    let yaml = GLOBAL_LIMITS.replace(
        "{ remote_address: {} }",
        "{ remote_address: {}, source_cluster: {} }",
    );
    assert_error(
        &yaml,
        "listeners[0].virtual_hosts[0].rate_limits[0].actions[0]",
        "exactly one of",
    );
    let yaml = GLOBAL_LIMITS.replace(
        "{ source_cluster: {} }",
        "{ request_headers: { header_name: \"bad header\", descriptor_key: k } }",
    );
    assert_error(
        &yaml,
        "listeners[0].virtual_hosts[0].routes[0].rate_limits[0].actions[0].request_headers.header_name",
        "not a valid header name",
    );
}

use std::sync::atomic::{AtomicUsize, Ordering};

use postern_proto::envoy::config::cluster::v3::Cluster;
use postern_proto::envoy::config::endpoint::v3::ClusterLoadAssignment;
use postern_proto::envoy::config::listener::v3::Listener;
use postern_proto::envoy::config::route::v3::RouteConfiguration;
use postern_proto::google::protobuf::Any;
use prost::{Message, Name};

use super::*;

const EXAMPLE: &str = include_str!("../../examples/mesh.yaml");

fn decode<M: Message + Default>(snapshot: &Snapshot, type_url: &str, name: &str) -> M {
    let any = snapshot
        .get(type_url, name)
        .unwrap_or_else(|| panic!("no {type_url} named {name}"));
    assert_eq!(any.type_url, type_url);
    M::decode(any.value.as_slice()).unwrap()
}

fn unpack<M: Message + Default + Name>(any: &Any) -> M {
    assert_eq!(any.type_url, M::type_url());
    M::decode(any.value.as_slice()).unwrap()
}

fn names(snapshot: &Snapshot, type_url: &str) -> Vec<String> {
    snapshot
        .of_type(type_url)
        .map(|(n, _)| n.to_owned())
        .collect()
}

fn typed_config(filter: &listener_v3::Filter) -> &Any {
    match &filter.config_type {
        Some(filter::ConfigType::TypedConfig(any)) => any,
        other => panic!("expected a typed_config, got {other:?}"),
    }
}

fn assert_ads(source: &Option<core_v3::ConfigSource>) {
    let source = source.as_ref().unwrap();
    assert_eq!(source.resource_api_version, core_v3::ApiVersion::V3 as i32);
    assert_eq!(
        source.config_source_specifier,
        Some(config_source::ConfigSourceSpecifier::Ads(
            core_v3::AggregatedConfigSource {}
        ))
    );
}

fn port(address: &Option<core_v3::Address>) -> (String, u32) {
    match &address.as_ref().unwrap().address {
        Some(address::Address::SocketAddress(sa)) => match sa.port_specifier {
            Some(socket_address::PortSpecifier::PortValue(port)) => (sa.address.clone(), port),
            _ => panic!("no port"),
        },
        other => panic!("not a socket address: {other:?}"),
    }
}

#[test]
fn example_mesh_translates_to_envoy_resources() {
    let snapshot = parse_mesh(EXAMPLE, "v1").unwrap();
    assert_eq!(snapshot.version, "v1");
    assert_eq!(names(&snapshot, type_url::LISTENER), ["db", "outbound"]);
    assert_eq!(names(&snapshot, type_url::ROUTE), ["outbound-routes"]);
    assert_eq!(
        names(&snapshot, type_url::CLUSTER),
        ["api-v1", "api-v2", "db", "web"]
    );
    assert_eq!(
        names(&snapshot, type_url::ENDPOINT),
        names(&snapshot, type_url::CLUSTER)
    );

    // HTTP listener: HCM with RDS over ADS and the router.
    let outbound: Listener = decode(&snapshot, type_url::LISTENER, "outbound");
    assert_eq!(outbound.name, "outbound");
    assert_eq!(port(&outbound.address), ("127.0.0.1".to_owned(), 15001));
    let [chain] = outbound.filter_chains.as_slice() else {
        panic!("expected one filter chain")
    };
    let [hcm_filter] = chain.filters.as_slice() else {
        panic!("expected one filter")
    };
    assert_eq!(
        hcm_filter.name,
        "envoy.filters.network.http_connection_manager"
    );
    let hcm_any = typed_config(hcm_filter);
    assert_eq!(
        hcm_any.type_url,
        "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
    );
    let hcm: hcm_v3::HttpConnectionManager = unpack(hcm_any);
    assert_eq!(hcm.stat_prefix, "outbound");
    match &hcm.route_specifier {
        Some(http_connection_manager::RouteSpecifier::Rds(rds)) => {
            assert_eq!(rds.route_config_name, "outbound-routes");
            assert_ads(&rds.config_source);
        }
        other => panic!("expected rds, got {other:?}"),
    }
    let [router] = hcm.http_filters.as_slice() else {
        panic!("expected only the router")
    };
    assert_eq!(router.name, "envoy.filters.http.router");
    match &router.config_type {
        Some(http_filter::ConfigType::TypedConfig(any)) => assert_eq!(
            any.type_url,
            "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
        ),
        other => panic!("expected a typed router config, got {other:?}"),
    }

    // TCP listener.
    let db: Listener = decode(&snapshot, type_url::LISTENER, "db");
    let filter = &db.filter_chains[0].filters[0];
    assert_eq!(filter.name, "envoy.filters.network.tcp_proxy");
    assert_eq!(
        typed_config(filter).type_url,
        "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"
    );
    let proxy: tcp_v3::TcpProxy = unpack(typed_config(filter));
    assert_eq!(proxy.stat_prefix, "db");
    assert_eq!(
        proxy.cluster_specifier,
        Some(tcp_proxy::ClusterSpecifier::Cluster("db".to_owned()))
    );

    // Routes, in file order.
    let config: RouteConfiguration = decode(&snapshot, type_url::ROUTE, "outbound-routes");
    let [vhost] = config.virtual_hosts.as_slice() else {
        panic!("expected one virtual host")
    };
    assert_eq!(vhost.name, "web");
    assert_eq!(vhost.domains, ["*"]);
    assert_eq!(vhost.routes.len(), 5);
    let action = |i: usize| match &vhost.routes[i].action {
        Some(route::Action::Route(action)) => action.clone(),
        other => panic!("expected a route action, got {other:?}"),
    };
    let matcher = |i: usize| vhost.routes[i].r#match.clone().unwrap();

    let canary = matcher(0);
    assert_eq!(
        canary.path_specifier,
        Some(route_match::PathSpecifier::Prefix("/api".to_owned()))
    );
    assert_eq!(canary.headers.len(), 1);
    assert_eq!(canary.headers[0].name, "x-canary");
    assert_eq!(
        canary.headers[0].header_match_specifier,
        Some(header_matcher::HeaderMatchSpecifier::StringMatch(
            StringMatcher {
                match_pattern: Some(string_matcher::MatchPattern::Exact("1".to_owned())),
                ignore_case: false,
            }
        ))
    );
    assert_eq!(
        action(0).cluster_specifier,
        Some(route_action::ClusterSpecifier::Cluster("api-v2".to_owned()))
    );
    assert_eq!(action(0).timeout.unwrap().seconds, 5);

    match action(1).cluster_specifier {
        Some(route_action::ClusterSpecifier::WeightedClusters(weighted)) => {
            let split: Vec<(String, u32)> = weighted
                .clusters
                .iter()
                .map(|c| (c.name.clone(), c.weight.unwrap().value))
                .collect();
            assert_eq!(
                split,
                [("api-v1".to_owned(), 90), ("api-v2".to_owned(), 10)]
            );
        }
        other => panic!("expected weighted clusters, got {other:?}"),
    }
    assert_eq!(
        matcher(2).path_specifier,
        Some(route_match::PathSpecifier::Path("/healthz".to_owned()))
    );
    assert_eq!(action(2).timeout, None);
    match matcher(3).path_specifier {
        Some(route_match::PathSpecifier::SafeRegex(regex)) => {
            assert_eq!(regex.regex, r"^/static/.+\.(css|js)$");
        }
        other => panic!("expected a regex, got {other:?}"),
    }

    // Clusters: EDS over ADS, with the service's settings.
    let api_v1: Cluster = decode(&snapshot, type_url::CLUSTER, "api-v1");
    assert_eq!(
        api_v1.cluster_discovery_type,
        Some(cluster::ClusterDiscoveryType::Type(
            cluster::DiscoveryType::Eds as i32
        ))
    );
    assert_ads(&api_v1.eds_cluster_config.as_ref().unwrap().eds_config);
    assert_eq!(api_v1.connect_timeout.unwrap().seconds, 2);
    assert_eq!(api_v1.lb_policy, cluster::LbPolicy::LeastRequest as i32);
    let thresholds = &api_v1.circuit_breakers.as_ref().unwrap().thresholds;
    assert_eq!(thresholds.len(), 1);
    assert_eq!(thresholds[0].max_connections.unwrap().value, 1024);
    assert!(api_v1.typed_extension_protocol_options.is_empty());

    let api_v2: Cluster = decode(&snapshot, type_url::CLUSTER, "api-v2");
    assert_eq!(api_v2.lb_policy, cluster::LbPolicy::Random as i32);
    assert_eq!(api_v2.connect_timeout.unwrap().seconds, 5);
    assert!(api_v2.circuit_breakers.is_none());
    let options = &api_v2.typed_extension_protocol_options
        ["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"];
    assert_eq!(
        options.type_url,
        "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
    );
    let options: HttpProtocolOptions = unpack(options);
    assert!(matches!(
        options.upstream_protocol_options,
        Some(http_protocol_options::UpstreamProtocolOptions::ExplicitHttpConfig(
            http_protocol_options::ExplicitHttpConfig {
                protocol_config: Some(
                    http_protocol_options::explicit_http_config::ProtocolConfig::Http2ProtocolOptions(_)
                )
            }
        ))
    ));
    let web: Cluster = decode(&snapshot, type_url::CLUSTER, "web");
    assert_eq!(web.lb_policy, cluster::LbPolicy::RoundRobin as i32);

    // Endpoints.
    let cla: ClusterLoadAssignment = decode(&snapshot, type_url::ENDPOINT, "api-v1");
    assert_eq!(cla.cluster_name, "api-v1");
    let endpoints: Vec<((String, u32), u32)> = cla.endpoints[0]
        .lb_endpoints
        .iter()
        .map(|lb| {
            let Some(lb_endpoint::HostIdentifier::Endpoint(endpoint)) = &lb.host_identifier else {
                panic!("expected an endpoint")
            };
            (
                port(&endpoint.address),
                lb.load_balancing_weight.unwrap().value,
            )
        })
        .collect();
    assert_eq!(
        endpoints,
        [
            (("127.0.0.1".to_owned(), 9001), 1),
            (("127.0.0.1".to_owned(), 9002), 2)
        ]
    );
}

#[test]
fn load_mesh_versions_by_content() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/mesh.yaml");
    let snapshot = load_mesh(path).unwrap();
    assert_eq!(snapshot.version, content_version(EXAMPLE.as_bytes()));
    assert_eq!(
        snapshot,
        parse_mesh(EXAMPLE, snapshot.version.clone()).unwrap()
    );
    assert!(matches!(
        load_mesh("/nonexistent/mesh.yaml"),
        Err(MeshError::Read { .. })
    ));
}

fn parse_error(yaml: &str) -> MeshError {
    parse_mesh(yaml, "v").expect_err("mesh should be rejected")
}

#[test]
fn errors_name_the_field_path() {
    let err = parse_error(
        "services:\n  - name: api\n    endpoints:\n      - { address: 127.0.0.1:1 }\n      - { adress: 127.0.0.1:2 }\n",
    );
    assert!(matches!(err, MeshError::Parse { .. }), "{err:?}");
    assert_eq!(err.field_path(), Some("services[0].endpoints[1].adress"));
    assert!(
        err.to_string().contains("services[0].endpoints[1]"),
        "{err}"
    );
    let source = std::error::Error::source(&err).unwrap().to_string();
    assert!(source.contains("unknown field `adress`"), "{source}");

    let err = parse_error("services:\n  - name: api\n    endpoints: [{ address: nope }]\n");
    assert_eq!(err.field_path(), Some("services[0].endpoints[0].address"));

    let err = parse_error("services:\n  - name: api\n    lb: fastest\n");
    assert_eq!(err.field_path(), Some("services[0].lb"));

    let err = parse_error("listners: []\n");
    assert_eq!(err.field_path(), Some("listners"));

    let err = parse_error("services: [\n");
    assert!(matches!(err, MeshError::Parse { .. }), "{err:?}");
}

#[test]
fn invalid_values_name_the_field_path() {
    let cases = [
        (
            "services: [{ name: a }, { name: a }]",
            "services[1].name",
        ),
        (
            "services: [{ name: a, connect_timeout: 0s }]",
            "services[0].connect_timeout",
        ),
        (
            "services: [{ name: a, endpoints: [{ address: 127.0.0.1:1, weight: 0 }] }]",
            "services[0].endpoints[0].weight",
        ),
        (
            "listeners: [{ name: l, address: 127.0.0.1:1 }]",
            "listeners[0]",
        ),
        (
            "listeners: [{ name: l, address: 127.0.0.1:1, route: nope }]",
            "listeners[0].route",
        ),
        (
            "listeners: [{ name: l, address: 127.0.0.1:1, tcp: { cluster: nope } }]",
            "listeners[0].tcp.cluster",
        ),
        (
            "services: [{ name: a }]\nlisteners:\n  - { name: l, address: 127.0.0.1:1, tcp: { cluster: a } }\n  - { name: m, address: 127.0.0.1:1, tcp: { cluster: a } }",
            "listeners[1].address",
        ),
        (
            "routes: [{ name: r, virtual_hosts: [{ name: v, domains: [] }] }]",
            "routes[0].virtual_hosts[0].domains",
        ),
        (
            "routes: [{ name: r, virtual_hosts: [{ name: v, domains: [a], routes: [{ prefix: /, path: /x, cluster: c }] }] }]",
            "routes[0].virtual_hosts[0].routes[0]",
        ),
        (
            "routes: [{ name: r, virtual_hosts: [{ name: v, domains: [a], routes: [{ prefix: /, cluster: c }] }] }]",
            "routes[0].virtual_hosts[0].routes[0].cluster",
        ),
        (
            "services: [{ name: c }]\nroutes: [{ name: r, virtual_hosts: [{ name: v, domains: [a], routes: [{ prefix: /, weighted: [{ cluster: c, weight: 0 }] }] }] }]",
            "routes[0].virtual_hosts[0].routes[0].weighted",
        ),
        (
            "services: [{ name: c }]\nroutes: [{ name: r, virtual_hosts: [{ name: v, domains: [a], routes: [{ regex: '(', cluster: c }] }] }]",
            "routes[0].virtual_hosts[0].routes[0].regex",
        ),
    ];
    for (yaml, path) in cases {
        let err = parse_error(yaml);
        assert!(
            matches!(err, MeshError::Invalid { .. } | MeshError::Regex { .. }),
            "{yaml}: {err:?}"
        );
        assert_eq!(err.field_path(), Some(path), "{yaml}: {err}");
        assert!(err.to_string().contains(path), "{err}");
    }
}

/// A fresh file under the system temp dir, removed on drop.
struct TempFile(PathBuf);

impl TempFile {
    fn new(contents: &str) -> TempFile {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "postern-control-mesh-{}-{}.yaml",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&path, contents).unwrap();
        TempFile(path)
    }

    fn write(&self, contents: &str) {
        // Write then rename, so the watcher never reads a half-written file.
        let tmp = self.0.with_extension("tmp");
        std::fs::write(&tmp, contents).unwrap();
        std::fs::rename(&tmp, &self.0).unwrap();
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Waits until the server serves `version`, failing on any other version
/// in between.
async fn expect_version(
    snapshots: &mut tokio::sync::watch::Receiver<std::sync::Arc<Snapshot>>,
    version: &str,
) -> std::sync::Arc<Snapshot> {
    tokio::time::timeout(Duration::from_secs(10), snapshots.changed())
        .await
        .expect("timed out waiting for a new snapshot")
        .unwrap();
    let snapshot = snapshots.borrow_and_update().clone();
    assert_eq!(snapshot.version, version);
    snapshot
}

#[tokio::test]
async fn watcher_serves_good_revisions_and_skips_bad_ones() {
    let v1 = "services: [{ name: a }]\n";
    let v2 = "services: [{ name: a }, { name: b }]\n";
    let bad = "services: [{ name: a, colour: blue }]\n";
    let file = TempFile::new(v1);
    let server = AdsServer::new();
    let mut watcher = MeshWatcher::new(file.0.clone(), server.clone());

    let v1_version = content_version(v1.as_bytes());
    assert!(matches!(watcher.check().await, Check::Served(v) if v == v1_version));
    assert_eq!(names(&server.snapshot(), type_url::CLUSTER), ["a"]);
    assert!(matches!(watcher.check().await, Check::Unchanged));

    // A bad revision is reported once, with the field path, and the last
    // good snapshot stays served.
    file.write(bad);
    match watcher.check().await {
        Check::Failed(err) => assert_eq!(err.field_path(), Some("services[0].colour")),
        other => panic!("expected a failure, got {other:?}"),
    }
    assert!(matches!(watcher.check().await, Check::Unchanged));
    assert_eq!(server.snapshot().version, v1_version);

    // So does a missing file.
    std::fs::remove_file(&file.0).unwrap();
    assert!(matches!(
        watcher.check().await,
        Check::Failed(MeshError::Read { .. })
    ));
    assert!(matches!(watcher.check().await, Check::Unchanged));
    assert_eq!(server.snapshot().version, v1_version);

    file.write(v2);
    let v2_version = content_version(v2.as_bytes());
    assert!(matches!(watcher.check().await, Check::Served(v) if v == v2_version));
    assert_eq!(names(&server.snapshot(), type_url::CLUSTER), ["a", "b"]);

    // Going back to a revision that failed before is tried again.
    file.write(bad);
    assert!(matches!(watcher.check().await, Check::Failed(_)));
}

#[tokio::test]
async fn watch_mesh_picks_up_file_changes() {
    let v1 = "services: [{ name: a }]\n";
    let v2 = "services: [{ name: a }, { name: b }]\n";
    let file = TempFile::new(v1);
    let server = AdsServer::new();
    let mut snapshots = server.watch_snapshot();
    let watcher = tokio::spawn(watch_mesh(
        file.0.clone(),
        server.clone(),
        Duration::from_millis(5),
    ));

    let first = expect_version(&mut snapshots, &content_version(v1.as_bytes())).await;
    assert_eq!(names(&first, type_url::CLUSTER), ["a"]);

    file.write(v2);
    let second = expect_version(&mut snapshots, &content_version(v2.as_bytes())).await;
    assert_eq!(names(&second, type_url::CLUSTER), ["a", "b"]);

    watcher.abort();
}

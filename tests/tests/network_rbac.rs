//! The network RBAC filter from xDS on a tcp_proxy listener: enforced on
//! new connections, and a new policy closes the open connections it no
//! longer allows while those it still allows carry on.

use std::net::SocketAddr;
use std::time::Duration;

use postern_control::ads::{pack, AdsEventKind, Snapshot};
use postern_proto::envoy::config::core::v3 as core;
use postern_proto::envoy::config::listener::v3 as listener;
use postern_proto::envoy::config::rbac::v3 as rbac;
use postern_proto::envoy::extensions::filters::network::rbac::v3::Rbac as NetworkRbac;
use postern_proto::envoy::extensions::filters::network::tcp_proxy::v3 as tcp_proxy;
use postern_proto::envoy::r#type::matcher::v3 as matcher;
use postern_proto::google::protobuf::UInt32Value;
use postern_proto::type_url;
use postern_tests::control::{is_ack, is_nack, wait_acks, wait_event, ControlPlane};
use postern_tests::envoy::static_cluster;
use postern_tests::tcp_backend::TcpBackend;
use postern_tests::{start_proxy, wait_until, within};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// ALLOW rules letting in callers from `cidr`, with `permission`.
fn allow_from(cidr: &str, permission: rbac::permission::Rule) -> rbac::Rbac {
    let (prefix, len) = cidr.split_once('/').expect("cidr");
    rbac::Rbac {
        action: rbac::rbac::Action::Allow as i32,
        policies: [(
            format!("from-{cidr}"),
            rbac::Policy {
                permissions: vec![rbac::Permission {
                    rule: Some(permission),
                }],
                principals: vec![rbac::Principal {
                    identifier: Some(rbac::principal::Identifier::DirectRemoteIp(
                        core::CidrRange {
                            address_prefix: prefix.into(),
                            prefix_len: Some(UInt32Value {
                                value: len.parse().expect("prefix length"),
                            }),
                        },
                    )),
                }],
                ..Default::default()
            },
        )]
        .into_iter()
        .collect(),
        ..Default::default()
    }
}

fn any() -> rbac::permission::Rule {
    rbac::permission::Rule::Any(true)
}

fn network_filter<M: prost::Name>(name: &str, config: &M) -> listener::Filter {
    listener::Filter {
        name: name.into(),
        config_type: Some(listener::filter::ConfigType::TypedConfig(pack(config))),
    }
}

/// A TCP listener: network RBAC with `rules`, then a tcp_proxy to `echo`.
fn tcp_listener(rules: rbac::Rbac) -> listener::Listener {
    let rbac = NetworkRbac {
        stat_prefix: "db".into(),
        rules: Some(rules),
        ..Default::default()
    };
    let proxy = tcp_proxy::TcpProxy {
        stat_prefix: "db".into(),
        cluster_specifier: Some(tcp_proxy::tcp_proxy::ClusterSpecifier::Cluster(
            "echo".into(),
        )),
        ..Default::default()
    };
    listener::Listener {
        name: "db".into(),
        address: Some(core::Address {
            address: Some(core::address::Address::SocketAddress(core::SocketAddress {
                address: "127.0.0.1".into(),
                port_specifier: Some(core::socket_address::PortSpecifier::PortValue(0)),
                ..Default::default()
            })),
        }),
        filter_chains: vec![listener::FilterChain {
            filters: vec![
                network_filter("envoy.filters.network.rbac", &rbac),
                network_filter("envoy.filters.network.tcp_proxy", &proxy),
            ],
            ..Default::default()
        }],
        ..Default::default()
    }
}

fn snapshot(version: &str, rules: rbac::Rbac, echo: SocketAddr) -> Snapshot {
    let mut s = Snapshot::new(version);
    s.add_message("db", &tcp_listener(rules));
    s.add_message("echo", &static_cluster("echo", echo, None));
    s
}

/// Sends a ping on `conn`: whether it came back (false: closed).
async fn echoes(conn: &mut TcpStream) -> bool {
    if conn.write_all(b"ping").await.is_err() {
        return false;
    }
    let mut buf = [0u8; 4];
    let read = within(
        Duration::from_secs(10),
        "echo or close",
        conn.read_exact(&mut buf),
    )
    .await;
    read.is_ok() && &buf == b"ping"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_policy_closes_the_connections_it_no_longer_allows() {
    let echo = TcpBackend::echo().await;
    let cp =
        ControlPlane::start(snapshot("1", allow_from("127.0.0.0/8", any()), echo.addr())).await;
    let mut events = cp.server.events();
    let proxy = start_proxy(&format!(
        "node: {{ id: db-1, cluster: db }}\nxds: {{ address: \"{}\", initial_backoff: 50ms, max_backoff: 500ms }}\n",
        cp.url()
    ))
    .await;
    wait_until("listener bound", || async {
        proxy.listener_addr("db").is_some()
    })
    .await;
    // The listener can be bound before the cluster it proxies to has
    // arrived (as in Envoy, a TCP listener does not wait for clusters):
    // until then a connection has nowhere to go.
    wait_acks(&mut events, &[(type_url::CLUSTER, "1")]).await;
    let addr = proxy.listener_addr("db").expect("db listener");
    let mut kept = TcpStream::connect(addr).await.expect("connect");
    assert!(echoes(&mut kept).await, "allowed caller proxied");

    // A new policy that still allows the caller leaves its connection be.
    cp.server.set_snapshot(snapshot(
        "2",
        allow_from("127.0.0.1/32", any()),
        echo.addr(),
    ));
    wait_event(&mut events, "ACK of v2", |e| {
        is_ack(e, type_url::LISTENER, "2")
    })
    .await;
    assert!(echoes(&mut kept).await, "still allowed: still open");
    assert_eq!(
        proxy.listener_addr("db"),
        Some(addr),
        "the listener was kept"
    );

    // One that no longer allows it closes the open connection, and refuses
    // new ones.
    cp.server
        .set_snapshot(snapshot("3", allow_from("10.0.0.0/8", any()), echo.addr()));
    wait_event(&mut events, "ACK of v3", |e| {
        is_ack(e, type_url::LISTENER, "3")
    })
    .await;
    let mut buf = [0u8; 1];
    let read = within(
        Duration::from_secs(10),
        "revoked connection closed",
        kept.read(&mut buf),
    )
    .await;
    assert!(matches!(read, Ok(0) | Err(_)), "closed, got {read:?}");
    let mut fresh = TcpStream::connect(addr).await.expect("connect");
    assert!(!echoes(&mut fresh).await, "new connection refused");
    assert_eq!(
        echo.connections(),
        1,
        "only the first caller reached the backend"
    );

    // Request-level permissions cannot hold on a connection: NACKed.
    let path_rule = rbac::permission::Rule::UrlPath(matcher::PathMatcher {
        rule: Some(matcher::path_matcher::Rule::Path(matcher::StringMatcher {
            match_pattern: Some(matcher::string_matcher::MatchPattern::Prefix("/".into())),
            ignore_case: false,
        })),
    });
    cp.server.set_snapshot(snapshot(
        "4",
        allow_from("127.0.0.0/8", path_rule),
        echo.addr(),
    ));
    let nack = wait_event(&mut events, "NACK of v4", |e| {
        is_nack(e, type_url::LISTENER)
    })
    .await;
    let AdsEventKind::Nack { error, .. } = nack.kind else {
        unreachable!()
    };
    assert!(
        error.contains("tcp.rbac.rules.policies[0].permissions[0]"),
        "{error}"
    );
}

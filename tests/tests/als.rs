//! Per-call reports over the access-log service: an `AlsSink` streaming to
//! the reference control plane's collector, and a sink whose collector is
//! down, slow, or restarted.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use postern::telemetry::als::{AlsConfig, AlsSink};
use postern::telemetry::ResponseFlag;
use postern_control::als::RouteKey;
use postern_proto::envoy::config::core::v3::{address, socket_address, Node, RequestMethod};
use postern_proto::envoy::data::accesslog::v3::tls_properties::certificate_properties::subject_alt_name::San;
use postern_tests::als::{flagged_http_call, http_call, tcp_call, wait_entries, Collector};
use postern_tests::{dead_addr, within, EVENTUALLY_TIMEOUT};

const NODE_ID: &str = "sidecar~127.0.0.1~web-1.shop~shop.svc.cluster.local";

fn node() -> Node {
    Node {
        id: NODE_ID.to_owned(),
        cluster: "web".to_owned(),
        ..Node::default()
    }
}

/// Quick flushes and reconnects, so the tests wait milliseconds.
fn config(url: String) -> AlsConfig {
    AlsConfig {
        log_name: "test-als".to_owned(),
        batch: 4,
        flush_interval: Duration::from_millis(20),
        initial_backoff: Duration::from_millis(20),
        max_backoff: Duration::from_millis(200),
        ..AlsConfig::new(url)
    }
}

#[tokio::test]
async fn entries_reach_the_collector_batched_and_identified() {
    let collector = Collector::start().await;
    let mut events = collector.server.events();
    let sink = AlsSink::start(config(collector.url()), node());

    for status in [200, 200, 404] {
        sink.send(&http_call("cart", status));
    }
    sink.send(&flagged_http_call(
        "cart",
        503,
        ResponseFlag::UpstreamConnectFailure,
    ));
    sink.send(&http_call("cart", 200));
    sink.send(&tcp_call());
    sink.send(&tcp_call());

    let received = wait_entries(&mut events, 7).await;
    assert!(within(EVENTUALLY_TIMEOUT, "sent count", sink.wait_sent(7)).await);
    assert_eq!(sink.dropped(), 0);
    assert_eq!(sink.progress().streams, 1);
    for event in &received {
        assert_eq!(event.node_id(), NODE_ID);
        assert_eq!(event.log_name(), "test-als");
    }
    // The first four HTTP entries fill a batch; the fifth waits for the
    // flush interval; TCP entries travel in their own message.
    let http_batches: Vec<usize> = received
        .iter()
        .map(|e| e.http().len())
        .filter(|&n| n > 0)
        .collect();
    assert_eq!(http_batches, [4, 1]);
    let tcp: Vec<_> = received.iter().flat_map(|e| e.tcp()).collect();
    assert_eq!(tcp.len(), 2);

    let http = &received[0].http()[0];
    let common = http.common_properties.as_ref().unwrap();
    assert_eq!(common.route_name, "cart");
    assert_eq!(common.upstream_cluster, "cart");
    let Some(address::Address::SocketAddress(downstream)) = common
        .downstream_remote_address
        .as_ref()
        .and_then(|a| a.address.clone())
    else {
        panic!("no downstream address: {common:?}");
    };
    assert_eq!(downstream.address, "127.0.0.1");
    assert_eq!(
        downstream.port_specifier,
        Some(socket_address::PortSpecifier::PortValue(40000))
    );
    let peer = common
        .tls_properties
        .as_ref()
        .and_then(|t| t.peer_certificate_properties.as_ref())
        .unwrap();
    assert_eq!(
        peer.subject_alt_name[0].san,
        Some(San::Uri("spiffe://cluster.local/ns/shop/sa/web".to_owned()))
    );
    let request = http.request.as_ref().unwrap();
    assert_eq!(request.request_method, RequestMethod::Get as i32);
    assert_eq!(request.authority, "shop.local");
    assert_eq!(request.path, "/cart");
    assert_eq!(request.request_id, "req-1");
    let response = http.response.as_ref().unwrap();
    assert_eq!(response.response_code.map(|c| c.value), Some(200));
    assert_eq!(response.response_body_bytes, 22);

    let flagged = received
        .iter()
        .flat_map(|e| e.http())
        .find(|e| {
            e.response
                .as_ref()
                .and_then(|r| r.response_code)
                .map(|c| c.value)
                == Some(503)
        })
        .unwrap();
    let flags = flagged
        .common_properties
        .as_ref()
        .and_then(|c| c.response_flags)
        .unwrap();
    assert!(flags.upstream_connection_failure);

    let tcp = tcp[0].connection_properties.unwrap();
    assert_eq!((tcp.received_bytes, tcp.sent_bytes), (300, 400));

    let summary = collector.server.summary();
    let key = |route: &str, cluster: &str| RouteKey {
        node: NODE_ID.to_owned(),
        log_name: "test-als".to_owned(),
        route: route.to_owned(),
        cluster: cluster.to_owned(),
    };
    let cart = summary.get(&key("cart", "cart")).unwrap();
    assert_eq!(cart.calls, 5);
    assert_eq!(cart.status_classes, [0, 0, 3, 0, 1, 1]);
    assert_eq!(cart.flags.get("UF"), Some(&1));
    assert_eq!(cart.bytes_sent, 5 * 22);
    let db = summary.get(&key("-", "db")).unwrap();
    assert_eq!((db.calls, db.bytes_received), (2, 600));
    assert!(summary.table().contains("cart"));
}

#[tokio::test]
async fn collector_down_sends_never_wait_and_drops_are_counted() {
    let sink = AlsSink::start(
        AlsConfig {
            buffer: 16,
            ..config(format!("http://{}", dead_addr()))
        },
        node(),
    );
    let calls = 10_000;
    let started = Instant::now();
    for _ in 0..calls {
        sink.send(&http_call("cart", 200));
    }
    // A send that waited for a connection attempt would take far longer.
    assert!(started.elapsed() < Duration::from_secs(5));
    // Nothing leaves the queue while no stream is open: it holds the first
    // 16 calls and every later one was dropped.
    assert_eq!(sink.dropped(), calls - 16);
    let progress = sink.progress();
    assert_eq!((progress.sent, progress.connected), (0, false));
}

#[tokio::test]
async fn sink_reconnects_after_the_collector_restarts() {
    let mut collector = Collector::start().await;
    let mut events = collector.server.events();
    let sink = AlsSink::start(config(collector.url()), node());
    sink.send(&http_call("before", 200));
    wait_entries(&mut events, 1).await;

    collector.stop().await;
    let mut progress = sink.watch_progress();
    within(
        EVENTUALLY_TIMEOUT,
        "the sink to see the stream end",
        progress.wait_for(|p| !p.connected),
    )
    .await
    .unwrap();
    // Queued while no stream is open.
    for _ in 0..3 {
        sink.send(&http_call("during", 200));
    }

    collector.restart().await;
    let mut events = collector.server.events();
    let received = wait_entries(&mut events, 3).await;
    assert!(received.iter().all(|e| e.node_id() == NODE_ID));
    assert!(received.iter().flat_map(|e| e.http()).all(|e| e
        .common_properties
        .as_ref()
        .unwrap()
        .route_name
        == "during"));
    assert!(sink.progress().streams >= 2);
    assert_eq!(sink.dropped(), 0);
    let summary = collector.server.summary();
    assert_eq!(summary.total_calls(), 3);
}

/// A collector that accepts connections but reads nothing (a listener
/// nobody serves yet) stalls the stream; sends still return at once and
/// the overflow is dropped. Once it serves, everything the sink kept
/// arrives, on the same connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_collector_does_not_slow_sends() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let sink = AlsSink::start(
        AlsConfig {
            buffer: 16,
            ..config(url)
        },
        node(),
    );
    let calls = 5_000;
    let started = Instant::now();
    for _ in 0..calls {
        sink.send(&http_call("cart", 200));
    }
    assert!(started.elapsed() < Duration::from_secs(5));
    // Held back at most: the queue, a batch per kind, a message in hand
    // and one HTTP/2 flow-control window (64 KiB) of entries.
    let dropped = sink.dropped();
    assert!(dropped >= calls - 1_000, "only {dropped} dropped");

    let collector = Collector::serve(listener);
    let kept = calls - dropped;
    assert!(
        within(
            EVENTUALLY_TIMEOUT,
            "every kept entry to be sent",
            sink.wait_sent(kept)
        )
        .await
    );
    postern_tests::wait_until("the collector to count every kept entry", || {
        let total = collector.server.summary().total_calls();
        async move { total == kept }
    })
    .await;
    assert_eq!(sink.dropped(), dropped);
}

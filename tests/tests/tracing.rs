//! Distributed tracing: trace context continued through two sidecars and
//! exported to an OTLP receiver, and export that never holds up a call.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use postern::telemetry::metrics::{TRACING_SPANS_DROPPED_TOTAL, TRACING_SPANS_EXPORTED_TOTAL};
use postern::telemetry::trace::{span_name, SpanKind, TraceContext, Tracer, TracingConfig};
use postern::telemetry::ResponseFlag;
use postern_tests::otlp::{self, OtlpReceiver, StatusCode};
use postern_tests::{dead_addr, wait_until};

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const APP_SPAN_ID: &str = "00f067aa0ba902b7";
const WAIT: Duration = Duration::from_secs(10);

fn config(collector: String, service: &str) -> TracingConfig {
    let mut config = TracingConfig::new(collector);
    config.service_name = service.to_string();
    config.export_interval = Duration::from_millis(20);
    config
}

/// The request the client app sends, already part of its own trace.
fn app_request() -> http::Request<()> {
    http::Request::builder()
        .method("POST")
        .uri("/orders?id=7")
        .header("host", "orders.shop:8080")
        .header("user-agent", "shop-web/1.0")
        .header("traceparent", format!("00-{TRACE_ID}-{APP_SPAN_ID}-01"))
        .header("tracestate", "app=web")
        .body(())
        .expect("request")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_sidecars_continue_one_trace_and_export_it() {
    let receiver = OtlpReceiver::start().await;
    let client_side = Tracer::new(&config(receiver.endpoint(), "web-sidecar")).expect("tracer");
    let server_side = Tracer::new(&config(receiver.endpoint(), "orders-sidecar")).expect("tracer");

    // The client's sidecar: an outbound call, so a client span. Its ratio is
    // 0, yet the app's sampled flag decides.
    let request = app_request();
    let incoming = TraceContext::extract(request.headers()).expect("app context");
    let mut outbound = client_side.start_span(
        Some(&incoming),
        0.0,
        SpanKind::Client,
        span_name(request.method()),
    );
    outbound.record_request(&request);
    outbound.set_url_scheme("http");
    outbound.set_route(&Arc::from("orders"));
    outbound.set_cluster(&Arc::from("orders-cluster"));
    let server_addr: SocketAddr = "127.0.0.1:8080".parse().expect("addr");
    outbound.set_upstream_address(server_addr);
    outbound.set_peer_address(server_addr);
    let mut forwarded = request.headers().clone();
    outbound.inject(&mut forwarded);

    // The server's sidecar reads what the first one wrote: an inbound call.
    let mut upstream_request = http::Request::builder()
        .method("POST")
        .uri("/orders?id=7")
        .body(())
        .expect("request");
    *upstream_request.headers_mut() = forwarded;
    let continued = TraceContext::extract(upstream_request.headers()).expect("sidecar context");
    let mut inbound = server_side.start_span(Some(&continued), 0.0, SpanKind::Server, "POST");
    inbound.record_request(&upstream_request);
    inbound.set_url_scheme("http");
    inbound.set_client_address("127.0.0.1".parse().expect("ip"));
    inbound.set_peer_principal("spiffe://cluster.local/ns/shop/sa/web");
    inbound.set_response_flag(ResponseFlag::UpstreamConnectFailure);
    inbound.set_status_code(503);
    outbound.set_status_code(503);

    let outbound_id = outbound.span_id_hex();
    let inbound_id = inbound.span_id_hex();
    assert_eq!(inbound.parent_span_id_hex(), Some(outbound_id.clone()));
    inbound.end();
    outbound.end();

    let spans = receiver.wait_for_spans(2, WAIT).await;
    assert_eq!(spans.len(), 2, "{spans:#?}");
    let by_id = |id: &str| {
        spans
            .iter()
            .find(|s| s.span_id() == id)
            .unwrap_or_else(|| panic!("span {id} not received: {spans:#?}"))
    };
    let client = by_id(&outbound_id);
    let server = by_id(&inbound_id);

    // One trace, chained app -> client span -> server span.
    assert_eq!(client.trace_id(), TRACE_ID);
    assert_eq!(server.trace_id(), TRACE_ID);
    assert_eq!(client.parent_span_id(), APP_SPAN_ID);
    assert_eq!(server.parent_span_id(), outbound_id);
    assert_eq!(client.kind(), otlp::SpanKind::Client);
    assert_eq!(server.kind(), otlp::SpanKind::Server);
    assert_eq!(client.span.name, "POST");
    assert_eq!(client.span.trace_state, "app=web");
    assert_eq!(server.span.trace_state, "app=web");
    assert!(client.span.end_time_unix_nano >= client.span.start_time_unix_nano);
    assert_eq!(client.resource_attr("service.name"), Some("web-sidecar"));
    assert_eq!(server.resource_attr("service.name"), Some("orders-sidecar"));
    assert!(server.resource_attr("service.instance.id").is_some());

    for span in [client, server] {
        assert_eq!(span.str_attr("http.request.method"), Some("POST"));
        assert_eq!(span.str_attr("url.path"), Some("/orders"));
        assert_eq!(span.str_attr("url.scheme"), Some("http"));
        assert_eq!(span.str_attr("url.query"), None);
        assert_eq!(span.str_attr("server.address"), Some("orders.shop"));
        assert_eq!(span.int_attr("server.port"), Some(8080));
        assert_eq!(span.str_attr("network.protocol.version"), Some("1.1"));
        assert_eq!(span.str_attr("user_agent.original"), Some("shop-web/1.0"));
        assert_eq!(span.int_attr("http.response.status_code"), Some(503));
        assert_eq!(span.str_attr("error.type"), Some("503"));
        assert_eq!(span.status(), StatusCode::Error);
    }
    assert_eq!(
        client.str_attr("url.full"),
        Some("http://orders.shop:8080/orders")
    );
    assert_eq!(client.str_attr("postern.route"), Some("orders"));
    assert_eq!(client.str_attr("postern.cluster"), Some("orders-cluster"));
    assert_eq!(
        client.str_attr("postern.upstream.address"),
        Some("127.0.0.1:8080")
    );
    assert_eq!(client.str_attr("network.peer.address"), Some("127.0.0.1"));
    assert_eq!(client.int_attr("network.peer.port"), Some(8080));
    assert_eq!(server.str_attr("client.address"), Some("127.0.0.1"));
    assert_eq!(
        server.str_attr("postern.peer.principal"),
        Some("spiffe://cluster.local/ns/shop/sa/web")
    );
    assert_eq!(server.str_attr("postern.response_flags"), Some("UF"));
    assert_eq!(server.str_attr("url.full"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flush_exports_without_waiting_for_the_interval_and_unsampled_spans_stay_home() {
    let receiver = OtlpReceiver::start().await;
    let mut config = config(receiver.endpoint(), "postern");
    config.export_interval = Duration::from_secs(3600);
    let tracer = Tracer::new(&config).expect("tracer");

    let mut headers = http::HeaderMap::new();
    headers.insert(
        "b3",
        http::HeaderValue::from_static("4bf92f3577b34da6-00f067aa0ba902b7-0"),
    );
    let unsampled = TraceContext::extract(&headers).expect("b3");
    tracer
        .start_span(Some(&unsampled), 1.0, SpanKind::Server, "GET")
        .end();
    let root = tracer.start_span(None, 1.0, SpanKind::Server, "GET");
    let root_id = root.span_id_hex();
    root.end();
    tracer.flush().await;

    let spans = receiver.spans();
    assert_eq!(spans.len(), 1, "{spans:#?}");
    assert_eq!(spans[0].span_id(), root_id);
    assert_eq!(spans[0].parent_span_id(), "");
    assert_eq!(spans[0].status(), StatusCode::Unset);
}

/// Counter totals across snapshots, which reset counters as they read them.
#[derive(Default)]
struct Totals(HashMap<String, u64>);

impl Totals {
    fn update(&mut self, snapshotter: &Snapshotter) {
        for (key, _, _, value) in snapshotter.snapshot().into_vec() {
            let key = key.key();
            let mut name = key.name().to_string();
            for label in key.labels() {
                name.push_str(&format!(",{}={}", label.key(), label.value()));
            }
            if let DebugValue::Counter(n) = value {
                *self.0.entry(name).or_default() += n;
            }
        }
    }

    fn get(&self, name: &str) -> u64 {
        self.0.get(name).copied().unwrap_or(0)
    }
}

/// Ends `count` sampled spans and returns how long that took.
fn end_spans(tracer: &Tracer, count: usize) -> Duration {
    let started = Instant::now();
    for _ in 0..count {
        let mut span = tracer.start_span(None, 1.0, SpanKind::Server, "GET");
        span.set_url_path("/");
        span.set_status_code(200);
        span.end();
    }
    started.elapsed()
}

async fn all_dropped(snapshotter: &Snapshotter, count: u64) -> Totals {
    let queue_full = format!("{TRACING_SPANS_DROPPED_TOTAL},reason=queue_full");
    let export_failed = format!("{TRACING_SPANS_DROPPED_TOTAL},reason=export_failed");
    let mut totals = Totals::default();
    wait_until("every span counted as dropped", || {
        totals.update(snapshotter);
        let dropped = totals.get(&queue_full) + totals.get(&export_failed);
        std::future::ready(dropped == count)
    })
    .await;
    assert_eq!(totals.get(TRACING_SPANS_EXPORTED_TOTAL), 0);
    assert!(totals.get(&queue_full) > 0);
    assert!(totals.get(&export_failed) > 0);
    totals
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_collector_costs_only_the_spans() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let mut config = config(format!("http://{}", dead_addr()), "postern");
    config.max_queue = 64;
    config.max_batch = 16;
    let tracer = metrics::with_local_recorder(&recorder, || Tracer::new(&config)).expect("tracer");

    let took = end_spans(&tracer, 5000);
    assert!(took < Duration::from_secs(2), "ending spans took {took:?}");
    all_dropped(&snapshotter, 5000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_collector_costs_only_the_spans() {
    let receiver = OtlpReceiver::start().await;
    receiver.stall();
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let mut config = config(receiver.endpoint(), "postern");
    config.max_queue = 64;
    config.max_batch = 16;
    config.export_timeout = Duration::from_millis(100);
    let tracer = metrics::with_local_recorder(&recorder, || Tracer::new(&config)).expect("tracer");

    let took = end_spans(&tracer, 2000);
    assert!(took < Duration::from_secs(2), "ending spans took {took:?}");
    all_dropped(&snapshotter, 2000).await;
    assert!(receiver.spans().is_empty());
}

//! The admin server: readiness and health, Prometheus metrics, the config
//! dump, and draining.

use std::net::SocketAddr;
use std::time::Duration;

use postern_tests::prom::{parse_metrics, Sample};
use postern_tests::{
    empty, eventually, get, listener, request, send, start_proxy, wait_until, within, HttpBackend,
    Proxy, Reply,
};
use tokio::net::TcpStream;

fn config(listener: &str, route: &str, cluster: &str, backend: SocketAddr) -> String {
    format!(
        r#"
        drain_timeout: 10s
        listeners:
          - name: {listener}
            address: 127.0.0.1:0
            kind: http
            virtual_hosts:
              - name: all
                domains: ["*"]
                routes:
                  - name: {route}
                    match: {{}}
                    cluster: {cluster}
        clusters:
          - name: {cluster}
            endpoints: [{{ address: "{backend}" }}]
        "#
    )
}

async fn admin_get(proxy: &Proxy, path: &str) -> postern_tests::TestResponse {
    get(proxy.admin_addr(), "localhost", path).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_and_healthz_answer_200_when_serving() {
    let backend = HttpBackend::start("b").await;
    let proxy = start_proxy(&config("ready-edge", "r", "c", backend.addr())).await;
    assert_eq!(admin_get(&proxy, "/ready").await.status, 200);
    assert_eq!(admin_get(&proxy, "/healthz").await.status, 200);
    assert_eq!(admin_get(&proxy, "/no-such-page").await.status, 404);
}

/// The request counter for one listener/route/cluster/status, if exported.
fn request_count(
    samples: &[Sample],
    listener: &str,
    route: &str,
    cluster: &str,
    status: &str,
) -> Option<f64> {
    samples
        .iter()
        .filter(|s| s.name.starts_with("postern_") && s.name.ends_with("_total"))
        .filter(|s| {
            s.labels.get("listener").map(String::as_str) == Some(listener)
                && s.labels.get("route").map(String::as_str) == Some(route)
                && s.labels.get("cluster").map(String::as_str) == Some(cluster)
                && s.labels.values().any(|v| v == status)
        })
        .map(|s| s.value)
        .next()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_requests_by_listener_route_cluster_and_status() {
    let _handle = postern::telemetry::install_prometheus_recorder();
    let backend = HttpBackend::start("b").await;
    let proxy = start_proxy(&config(
        "metrics-edge",
        "metered",
        "metered-cluster",
        backend.addr(),
    ))
    .await;
    let edge = listener(&proxy, "metrics-edge");

    for _ in 0..3 {
        assert_eq!(get(edge, "svc.local", "/").await.status, 200);
    }
    backend.script([Reply::status(503), Reply::status(503)]);
    for _ in 0..2 {
        assert_eq!(get(edge, "svc.local", "/").await.status, 503);
    }

    let p = &proxy;
    let text = eventually(
        "request counters to reach 3 x 200 and 2 x 503",
        || async move {
            let response = admin_get(p, "/metrics").await;
            assert_eq!(response.status, 200);
            let text = response.text();
            let samples = parse_metrics(&text);
            let ok = request_count(
                &samples,
                "metrics-edge",
                "metered",
                "metered-cluster",
                "200",
            );
            let unavailable = request_count(
                &samples,
                "metrics-edge",
                "metered",
                "metered-cluster",
                "503",
            );
            (ok == Some(3.0) && unavailable == Some(2.0)).then_some(text)
        },
    )
    .await;
    assert!(
        text.lines().any(|l| l.starts_with("# TYPE postern_")),
        "metrics are described:\n{text}"
    );
    let samples = parse_metrics(&text);
    let find = |name: &str, label: (&str, &str), extra: Option<(&str, &str)>| {
        samples
            .iter()
            .find(|s| {
                s.name == name
                    && s.labels.get(label.0).map(String::as_str) == Some(label.1)
                    && extra.is_none_or(|(k, v)| s.labels.get(k).map(String::as_str) == Some(v))
            })
            .map(|s| s.value)
    };
    assert_eq!(
        find(
            "postern_http_request_duration_seconds_count",
            ("route", "metered"),
            Some(("cluster", "metered-cluster"))
        ),
        Some(5.0),
        "latency histogram counts every call:\n{text}"
    );
    assert!(
        find(
            "postern_http_request_duration_seconds_bucket",
            ("route", "metered"),
            Some(("le", "0.005"))
        )
        .is_some(),
        "latency histogram has buckets:\n{text}"
    );
    assert!(
        find(
            "postern_downstream_connections_total",
            ("listener", "metrics-edge"),
            None
        )
        .is_some_and(|v| v >= 1.0),
        "{text}"
    );
    assert!(
        find(
            "postern_upstream_connections_active",
            ("cluster", "metered-cluster"),
            None
        )
        .is_some_and(|v| v >= 1.0),
        "pooled upstream connections are counted:\n{text}"
    );
}

fn contains_string(value: &serde_json::Value, needle: &str) -> bool {
    match value {
        serde_json::Value::String(s) => s == needle,
        serde_json::Value::Array(items) => items.iter().any(|v| contains_string(v, needle)),
        serde_json::Value::Object(map) => map.values().any(|v| contains_string(v, needle)),
        _ => false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_dump_is_json_with_the_config() {
    let backend = HttpBackend::start("b").await;
    let proxy = start_proxy(&config(
        "dump-edge",
        "dump-route",
        "dump-cluster",
        backend.addr(),
    ))
    .await;
    let response = admin_get(&proxy, "/config_dump").await;
    assert_eq!(response.status, 200);
    assert!(
        response
            .header("content-type")
            .is_some_and(|v| v.starts_with("application/json")),
        "content-type: {:?}",
        response.header("content-type")
    );
    let dump: serde_json::Value =
        serde_json::from_slice(&response.body).expect("config_dump is JSON");
    for name in ["dump-edge", "dump-route", "dump-cluster"] {
        assert!(contains_string(&dump, name), "{name} missing from {dump}");
    }
    assert!(
        contains_string(&dump, &backend.addr().to_string()),
        "endpoint {} missing from {dump}",
        backend.addr()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_drain_flips_ready_and_lets_in_flight_requests_finish() {
    let backend = HttpBackend::start("b").await;
    let proxy = start_proxy(&config("drain-edge", "r", "c", backend.addr())).await;
    let edge = listener(&proxy, "drain-edge");
    let admin = proxy.admin_addr();
    assert_eq!(get(admin, "localhost", "/ready").await.status, 200);

    backend.script([Reply::delay(Duration::from_millis(1500))]);
    let in_flight = tokio::spawn(async move { get(edge, "svc.local", "/slow").await });
    let b = &backend;
    wait_until("the slow request to reach the backend", || async move {
        b.in_flight() == 1
    })
    .await;

    // GET does not drain.
    assert_ne!(get(admin, "localhost", "/drain").await.status, 200);
    assert_eq!(get(admin, "localhost", "/ready").await.status, 200);

    let response = send(
        admin,
        request("POST", "localhost", "/drain")
            .body(empty())
            .unwrap(),
    )
    .await;
    assert!(
        response.status.is_success(),
        "POST /drain: {}",
        response.status
    );
    let response = get(admin, "localhost", "/ready").await;
    assert_eq!(response.status, 503, "not ready while draining");
    assert!(
        !in_flight.is_finished(),
        "the slow request is still running"
    );

    let response = within(Duration::from_secs(10), "the in-flight request", in_flight)
        .await
        .unwrap();
    assert_eq!(response.status, 200, "the in-flight request completes");
    within(
        Duration::from_secs(10),
        "the proxy to stop after draining",
        proxy.wait(),
    )
    .await
    .expect("a clean stop");
    assert!(
        TcpStream::connect(edge).await.is_err(),
        "the listener still accepts after the drain"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_method_stops_an_idle_proxy_promptly() {
    let backend = HttpBackend::start("b").await;
    let proxy = start_proxy(&config("idle-edge", "r", "c", backend.addr())).await;
    let edge = listener(&proxy, "idle-edge");
    assert_eq!(get(edge, "svc.local", "/").await.status, 200);
    proxy.drain();
    // Nothing in flight: the drain does not wait for drain_timeout (10s).
    within(
        Duration::from_secs(5),
        "an idle proxy to stop",
        proxy.wait(),
    )
    .await
    .expect("a clean stop");
    assert!(TcpStream::connect(edge).await.is_err());
}

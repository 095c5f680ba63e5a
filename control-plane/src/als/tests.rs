#![allow(clippy::unwrap_used)]

use postern_proto::envoy::config::core::v3::Node;
use postern_proto::envoy::data::accesslog::v3::{
    ConnectionProperties, HttpRequestProperties, HttpResponseProperties,
};
use postern_proto::envoy::service::accesslog::v3::access_log_service_client::AccessLogServiceClient;
use postern_proto::envoy::service::accesslog::v3::stream_access_logs_message::{
    HttpAccessLogEntries, TcpAccessLogEntries,
};
use postern_proto::google::protobuf::{Duration as PbDuration, UInt32Value};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};

use super::*;

fn http(route: &str, status: u32, ms: u64, flags: Option<ResponseFlags>) -> HttpAccessLogEntry {
    HttpAccessLogEntry {
        common_properties: Some(AccessLogCommon {
            route_name: route.to_owned(),
            upstream_cluster: "backend".to_owned(),
            duration: Some(PbDuration {
                seconds: 0,
                nanos: i32::try_from(ms * 1_000_000).unwrap(),
            }),
            response_flags: flags,
            ..Default::default()
        }),
        request: Some(HttpRequestProperties {
            request_body_bytes: 10,
            ..Default::default()
        }),
        response: Some(HttpResponseProperties {
            response_code: (status != 0).then_some(UInt32Value { value: status }),
            response_body_bytes: 100,
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn tcp() -> TcpAccessLogEntry {
    TcpAccessLogEntry {
        common_properties: Some(AccessLogCommon {
            upstream_cluster: "db".to_owned(),
            ..Default::default()
        }),
        connection_properties: Some(ConnectionProperties {
            received_bytes: 5,
            sent_bytes: 7,
        }),
    }
}

fn key(route: &str, cluster: &str) -> RouteKey {
    RouteKey {
        node: "n1".to_owned(),
        log_name: "postern".to_owned(),
        route: route.to_owned(),
        cluster: cluster.to_owned(),
    }
}

#[test]
fn histogram_quantiles_are_bucket_bounds() {
    let mut h = DurationHistogram::default();
    assert_eq!(h.quantile(0.5), None);
    for _ in 0..98 {
        h.record(Duration::from_millis(3));
    }
    h.record(Duration::from_millis(700));
    h.record(Duration::from_secs(60));
    assert_eq!(h.quantile(0.5), Some(Duration::from_millis(5)));
    assert_eq!(h.quantile(0.98), Some(Duration::from_millis(5)));
    assert_eq!(h.quantile(0.99), Some(Duration::from_millis(1000)));
    // Past the last bound: the longest seen.
    assert_eq!(h.quantile(1.0), Some(Duration::from_secs(60)));

    let mut small = DurationHistogram::default();
    small.record(Duration::from_micros(300));
    assert_eq!(small.quantile(0.5), Some(Duration::from_micros(300)));
}

#[test]
fn summary_counts_by_route_status_class_and_flag() {
    let uf = ResponseFlags {
        upstream_connection_failure: true,
        ..Default::default()
    };
    let mut s = Summary::new(10);
    s.record_http("n1", "postern", &http("r1", 200, 3, None));
    s.record_http("n1", "postern", &http("r1", 204, 3, None));
    s.record_http("n1", "postern", &http("r1", 503, 30, Some(uf)));
    s.record_http("n1", "postern", &http("r1", 0, 1, Some(uf)));
    s.record_tcp("n1", "postern", &tcp());
    assert_eq!(s.total_calls(), 5);
    assert_eq!(s.generation(), 5);

    let r1 = s.get(&key("r1", "backend")).unwrap();
    assert_eq!(r1.calls, 4);
    assert_eq!(r1.status_classes, [1, 0, 2, 0, 0, 1]);
    assert_eq!(r1.flags.get("UF"), Some(&2));
    assert_eq!(r1.bytes_received, 40);
    assert_eq!(r1.bytes_sent, 400);
    assert_eq!(r1.durations.quantile(0.5), Some(Duration::from_millis(5)));

    let db = s.get(&key("-", "db")).unwrap();
    assert_eq!((db.calls, db.bytes_received, db.bytes_sent), (1, 5, 7));
    assert_eq!(db.status_classes[0], 1);

    let table = s.table();
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 3, "{table}");
    assert!(lines[0].starts_with("NODE"), "{table}");
    let r1_line = lines.iter().find(|l| l.contains("r1")).unwrap();
    assert!(r1_line.contains("UF=2"), "{table}");
    assert!(r1_line.contains("5.0ms"), "{table}");
}

#[test]
fn summary_is_bounded_with_an_other_row() {
    let mut s = Summary::new(2);
    for route in ["a", "b", "c", "d", "a"] {
        s.record_http("n1", "postern", &http(route, 200, 1, None));
    }
    assert_eq!(s.rows().count(), 2);
    assert_eq!(s.get(&key("a", "backend")).unwrap().calls, 2);
    assert_eq!(s.other().calls, 2);
    assert_eq!(s.total_calls(), 5);
    assert!(s.table().contains("(other)"));
}

#[test]
fn flag_codes_use_envoy_letters() {
    let flags = ResponseFlags {
        no_route_found: true,
        downstream_remote_reset: true,
        unauthorized_details: Some(Default::default()),
        ..Default::default()
    };
    assert_eq!(flag_codes(Some(&flags)), ["NR", "DR", "UA"]);
    assert!(flag_codes(None).is_empty());
}

async fn serve(server: AlsServer) -> (String, oneshot::Sender<()>, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = oneshot::channel::<()>();
    let closer = server.clone();
    let task = tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(server.into_service())
            .serve_with_incoming_shutdown(
                tonic::transport::server::TcpIncoming::from(listener),
                async move {
                    let _ = stopped.await;
                    closer.close_streams();
                },
            )
            .await
            .unwrap();
    });
    (url, stop, task)
}

#[tokio::test]
async fn stream_entries_become_events_and_summary_rows() {
    let server = AlsServer::new();
    let mut events = server.events();
    let (url, stop, task) = serve(server.clone()).await;

    let mut client = AccessLogServiceClient::connect(url).await.unwrap();
    let (tx, mut rx) = mpsc::channel(4);
    let requests = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
    let call = tokio::spawn(async move { client.stream_access_logs(requests).await });
    tx.send(StreamAccessLogsMessage {
        identifier: Some(Identifier {
            node: Some(Node {
                id: "n1".to_owned(),
                ..Default::default()
            }),
            log_name: "postern".to_owned(),
        }),
        log_entries: Some(LogEntries::HttpLogs(HttpAccessLogEntries {
            log_entry: vec![http("r1", 200, 2, None), http("r1", 404, 2, None)],
        })),
    })
    .await
    .unwrap();
    // Later messages carry no identifier: the stream's first one holds.
    tx.send(StreamAccessLogsMessage {
        identifier: None,
        log_entries: Some(LogEntries::TcpLogs(TcpAccessLogEntries {
            log_entry: vec![tcp()],
        })),
    })
    .await
    .unwrap();

    let first = events.recv().await.unwrap();
    assert_eq!((first.node_id(), first.log_name()), ("n1", "postern"));
    assert_eq!(first.http().len(), 2);
    assert!(first.tcp().is_empty());
    let second = events.recv().await.unwrap();
    assert_eq!(second.node_id(), "n1");
    assert_eq!(second.tcp().len(), 1);

    let summary = server.summary();
    assert_eq!(
        summary.get(&key("r1", "backend")).unwrap().status_classes,
        [0, 0, 1, 0, 1, 0]
    );
    assert_eq!(summary.get(&key("-", "db")).unwrap().calls, 1);

    // Shutdown ends the open stream rather than waiting for it.
    stop.send(()).unwrap();
    task.await.unwrap();
    let status = call.await.unwrap().unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable);
}

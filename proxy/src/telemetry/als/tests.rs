#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;

use http::HeaderValue;
use postern_proto::envoy::config::core::v3::{BackoffStrategy, RetryPolicy};
use postern_proto::envoy::data::accesslog::v3::tls_properties::certificate_properties::subject_alt_name::San;
use postern_proto::envoy::extensions::access_loggers::grpc::v3::CommonGrpcAccessLogConfig;
use rand::rngs::StdRng;
use rand::SeedableRng as _;

use super::*;
use crate::telemetry::log::TrafficDirection;
use postern_proto::envoy::service::accesslog::v3::stream_access_logs_message::{
    HttpAccessLogEntries, LogEntries, TcpAccessLogEntries,
};
use postern_proto::envoy::service::accesslog::v3::StreamAccessLogsMessage;

fn http_log() -> CallLog {
    let mut flags = ResponseFlags::default();
    flags.insert(ResponseFlag::UpstreamConnectFailure);
    flags.insert(ResponseFlag::RetryLimitExceeded);
    CallLog {
        kind: CallKind::Http,
        direction: TrafficDirection::Inbound,
        start_time: SystemTime::UNIX_EPOCH + Duration::new(1_700_000_000, 250_000_000),
        duration: Duration::from_millis(1500),
        listener: Arc::from("in"),
        protocol: "HTTP/1.1",
        method: Some(Method::POST),
        authority: Some(HeaderValue::from_static("shop.local")),
        path: Some(http::uri::PathAndQuery::from_static("/cart?id=1")),
        user_agent: Some(HeaderValue::from_static("curl/8")),
        request_id: Some(HeaderValue::from_static("req-1")),
        trace_id: None,
        status: 503,
        grpc_status: None,
        flags,
        bytes_received: 12,
        bytes_sent: 34,
        upstream_ttfb: Some(Duration::from_millis(20)),
        upstream_host: Some("10.0.0.2:8080".parse().unwrap()),
        cluster: Some(Arc::from("cart")),
        route: Some(Arc::from("cart-route")),
        downstream_addr: "10.0.0.1:40000".parse().unwrap(),
        downstream_principal: Some(Arc::from("spiffe://cluster.local/ns/a/sa/web")),
        upstream_principal: None,
        mtls: true,
        request_headers: vec![
            (
                HeaderName::from_static("x-tenant"),
                HeaderValue::from_static("t1"),
            ),
            (
                HeaderName::from_static("x-tenant"),
                HeaderValue::from_static("t2"),
            ),
            (
                HeaderName::from_static("x-other"),
                HeaderValue::from_static("no"),
            ),
        ],
    }
}

fn tcp_log() -> CallLog {
    CallLog {
        kind: CallKind::Tcp,
        protocol: "TCP",
        method: None,
        authority: None,
        path: None,
        user_agent: None,
        request_id: None,
        status: 0,
        flags: ResponseFlags::default(),
        upstream_ttfb: None,
        route: None,
        downstream_principal: None,
        mtls: false,
        request_headers: Vec::new(),
        bytes_received: 100,
        bytes_sent: 200,
        ..http_log()
    }
}

fn socket(address: &Option<Address>) -> SocketAddr {
    match address.as_ref().unwrap().address.as_ref().unwrap() {
        address::Address::SocketAddress(s) => {
            let Some(socket_address::PortSpecifier::PortValue(port)) = s.port_specifier else {
                panic!("no port");
            };
            SocketAddr::new(s.address.parse().unwrap(), u16::try_from(port).unwrap())
        }
        other => panic!("not a socket address: {other:?}"),
    }
}

#[test]
fn http_call_becomes_an_http_entry() {
    let keep = [HeaderName::from_static("x-tenant")];
    let entry = http_entry(&http_log(), &keep);
    let common = entry.common_properties.unwrap();
    assert_eq!(
        common.start_time,
        Some(pb::Timestamp {
            seconds: 1_700_000_000,
            nanos: 250_000_000
        })
    );
    let ms1500 = Some(pb::Duration {
        seconds: 1,
        nanos: 500_000_000,
    });
    assert_eq!(common.time_to_last_downstream_tx_byte, ms1500);
    assert_eq!(common.duration, ms1500);
    assert_eq!(
        common.time_to_first_upstream_rx_byte,
        Some(pb::Duration {
            seconds: 0,
            nanos: 20_000_000
        })
    );
    assert_eq!(
        socket(&common.downstream_remote_address),
        "10.0.0.1:40000".parse().unwrap()
    );
    assert_eq!(
        socket(&common.upstream_remote_address),
        "10.0.0.2:8080".parse().unwrap()
    );
    assert_eq!(common.upstream_cluster, "cart");
    assert_eq!(common.route_name, "cart-route");
    assert_eq!(common.access_log_type, AccessLogType::DownstreamEnd as i32);
    let flags = common.response_flags.unwrap();
    assert!(flags.upstream_connection_failure && flags.upstream_retry_limit_exceeded);
    assert!(!flags.no_route_found);
    let peer = common
        .tls_properties
        .unwrap()
        .peer_certificate_properties
        .unwrap();
    assert_eq!(
        peer.subject_alt_name[0].san,
        Some(San::Uri("spiffe://cluster.local/ns/a/sa/web".to_owned()))
    );

    assert_eq!(entry.protocol_version, HttpVersion::Http11 as i32);
    let request = entry.request.unwrap();
    assert_eq!(request.request_method, RequestMethod::Post as i32);
    assert_eq!(request.authority, "shop.local");
    assert_eq!(request.path, "/cart?id=1");
    assert_eq!(request.user_agent, "curl/8");
    assert_eq!(request.request_id, "req-1");
    assert_eq!(request.request_body_bytes, 12);
    assert_eq!(request.request_headers.len(), 1);
    assert_eq!(request.request_headers["x-tenant"], "t1,t2");
    let response = entry.response.unwrap();
    assert_eq!(response.response_code, Some(pb::UInt32Value { value: 503 }));
    assert_eq!(response.response_body_bytes, 34);
}

#[test]
fn http_call_without_response_or_tls() {
    let log = CallLog {
        status: 0,
        mtls: false,
        downstream_principal: None,
        upstream_ttfb: None,
        upstream_host: None,
        flags: ResponseFlags::default(),
        protocol: "HTTP/2",
        method: Some(Method::from_bytes(b"PURGE").unwrap()),
        ..http_log()
    };
    let entry = http_entry(&log, &[]);
    let common = entry.common_properties.unwrap();
    assert_eq!(common.tls_properties, None);
    assert_eq!(common.response_flags, None);
    assert_eq!(common.upstream_remote_address, None);
    assert_eq!(common.time_to_first_upstream_rx_byte, None);
    assert_eq!(entry.protocol_version, HttpVersion::Http2 as i32);
    let request = entry.request.unwrap();
    assert_eq!(
        request.request_method,
        RequestMethod::MethodUnspecified as i32
    );
    assert!(request.request_headers.is_empty());
    assert_eq!(entry.response.unwrap().response_code, None);
}

#[test]
fn tcp_call_becomes_a_tcp_entry() {
    let entry = tcp_entry(&tcp_log());
    let common = entry.common_properties.unwrap();
    assert_eq!(
        common.access_log_type,
        AccessLogType::TcpConnectionEnd as i32
    );
    assert_eq!(common.upstream_cluster, "cart");
    assert_eq!(common.route_name, "");
    assert_eq!(common.tls_properties, None);
    assert_eq!(
        entry.connection_properties,
        Some(ConnectionProperties {
            received_bytes: 100,
            sent_bytes: 200
        })
    );
}

#[test]
fn response_flags_map_where_envoy_means_the_same() {
    let one = |flag: ResponseFlag| envoy_response_flags(flag.into());
    type Field = fn(&data::ResponseFlags) -> bool;
    let expected: [(ResponseFlag, Field); 10] = [
        (ResponseFlag::NoRoute, |f| f.no_route_found),
        (ResponseFlag::NoHealthyUpstream, |f| f.no_healthy_upstream),
        (ResponseFlag::UpstreamConnectFailure, |f| {
            f.upstream_connection_failure
        }),
        (ResponseFlag::UpstreamReset, |f| f.upstream_remote_reset),
        (ResponseFlag::UpstreamTimeout, |f| {
            f.upstream_request_timeout
        }),
        (ResponseFlag::UpstreamOverflow, |f| f.upstream_overflow),
        (ResponseFlag::RetryLimitExceeded, |f| {
            f.upstream_retry_limit_exceeded
        }),
        (ResponseFlag::DownstreamClosed, |f| {
            f.downstream_connection_termination
        }),
        (ResponseFlag::RateLimited, |f| f.rate_limited),
        (ResponseFlag::RateLimitServiceError, |f| {
            f.rate_limit_service_error
        }),
    ];
    for (flag, field) in expected {
        let mapped = one(flag).unwrap();
        assert!(field(&mapped), "{flag:?}");
        // Exactly one field set.
        assert_eq!(
            format!("{mapped:?}").matches("true").count(),
            1,
            "{flag:?}: {mapped:?}"
        );
    }
    let rbac = one(ResponseFlag::RbacDenied).unwrap();
    assert_eq!(
        rbac.unauthorized_details,
        Some(Unauthorized {
            reason: unauthorized::Reason::Unspecified as i32
        })
    );
    assert_eq!(one(ResponseFlag::DirectResponse), None);
    assert_eq!(one(ResponseFlag::DownstreamLimit), None);
    assert_eq!(envoy_response_flags(ResponseFlags::default()), None);
}

#[test]
fn config_defaults_and_unknown_fields() {
    let config: AlsConfig = serde_yaml_ng::from_str("address: http://127.0.0.1:9001").unwrap();
    assert_eq!(config, AlsConfig::new("http://127.0.0.1:9001"));
    assert_eq!(config.log_name, "postern");
    assert_eq!(config.buffer, 4096);
    assert_eq!(config.batch, 256);
    assert_eq!(config.flush_interval, Duration::from_secs(1));
    assert_eq!(config.validate(), Ok(()));

    let config: AlsConfig = serde_yaml_ng::from_str(
        "{ address: 'http://als:9001', flush_interval: 250ms, max_backoff: 5s }",
    )
    .unwrap();
    assert_eq!(config.flush_interval, Duration::from_millis(250));
    assert_eq!(config.max_backoff, Duration::from_secs(5));
    assert!(serde_yaml_ng::from_str::<AlsConfig>("{ address: x, buffr: 1 }").is_err());
}

#[test]
fn validate_names_each_bad_field() {
    let config = AlsConfig {
        address: "https://als:9001".to_owned(),
        log_name: String::new(),
        buffer: 0,
        batch: MAX_BATCH + 1,
        batch_bytes: None,
        flush_interval: Duration::ZERO,
        initial_backoff: Duration::from_secs(2),
        max_backoff: Duration::from_secs(1),
        request_headers: vec!["X-Tenant".to_owned(), "bad header".to_owned()],
    };
    let fields: Vec<&str> = config
        .validate()
        .unwrap_err()
        .into_iter()
        .map(|(f, _)| f)
        .collect();
    assert_eq!(
        fields,
        [
            "address",
            "log_name",
            "buffer",
            "batch",
            "flush_interval",
            "max_backoff",
            "request_headers",
            "request_headers"
        ]
    );
    for bad in ["als:9001", "http://", "http://als:9001/path", "not a uri"] {
        let err = AlsConfig::new(bad).validate().unwrap_err();
        assert_eq!(err[0].0, "address", "{bad}");
    }
    assert_eq!(AlsConfig::new("http://[::1]:9001").validate(), Ok(()));
}

fn google(target: &str) -> GrpcService {
    GrpcService {
        target_specifier: Some(grpc_service::TargetSpecifier::GoogleGrpc(
            grpc_service::GoogleGrpc {
                target_uri: target.to_owned(),
                stat_prefix: "als".to_owned(),
                ..Default::default()
            },
        )),
        ..Default::default()
    }
}

fn envoy_cluster(name: &str) -> GrpcService {
    GrpcService {
        target_specifier: Some(grpc_service::TargetSpecifier::EnvoyGrpc(
            grpc_service::EnvoyGrpc {
                cluster_name: name.to_owned(),
                ..Default::default()
            },
        )),
        ..Default::default()
    }
}

fn common_config(service: GrpcService) -> CommonGrpcAccessLogConfig {
    CommonGrpcAccessLogConfig {
        log_name: "mesh".to_owned(),
        grpc_service: Some(service),
        ..Default::default()
    }
}

fn http_any(config: HttpGrpcAccessLogConfig) -> Any {
    Any {
        type_url: HttpGrpcAccessLogConfig::type_url(),
        value: config.encode_to_vec(),
    }
}

fn tcp_any(common: CommonGrpcAccessLogConfig) -> Any {
    Any {
        type_url: TcpGrpcAccessLogConfig::type_url(),
        value: TcpGrpcAccessLogConfig {
            common_config: Some(common),
        }
        .encode_to_vec(),
    }
}

fn no_clusters(_: &str) -> Option<String> {
    None
}

#[test]
fn from_envoy_reads_the_grpc_access_loggers() {
    let mut common = common_config(google("dns:///als.mesh:9001"));
    common.buffer_flush_interval = Some(pb::Duration {
        seconds: 0,
        nanos: 200_000_000,
    });
    common.buffer_size_bytes = Some(pb::UInt32Value { value: 4096 });
    common.grpc_stream_retry_policy = Some(RetryPolicy {
        retry_back_off: Some(BackoffStrategy {
            base_interval: Some(pb::Duration {
                seconds: 0,
                nanos: 100_000_000,
            }),
            max_interval: None,
        }),
        ..Default::default()
    });
    let config = AlsConfig::from_envoy(
        &http_any(HttpGrpcAccessLogConfig {
            common_config: Some(common),
            additional_request_headers_to_log: vec!["X-Tenant".to_owned()],
            ..Default::default()
        }),
        no_clusters,
    )
    .unwrap();
    assert_eq!(config.address, "http://als.mesh:9001");
    assert_eq!(config.log_name, "mesh");
    assert_eq!(config.flush_interval, Duration::from_millis(200));
    assert_eq!(config.batch_bytes, Some(4096));
    assert_eq!(config.initial_backoff, Duration::from_millis(100));
    assert_eq!(config.max_backoff, Duration::from_secs(1));
    assert_eq!(config.request_headers, ["x-tenant"]);
    assert_eq!(config.buffer, 4096);

    // Envoy's defaults: a 16 KiB batch; and 0 bytes means no batching.
    let config = AlsConfig::from_envoy(
        &tcp_any(common_config(google("127.0.0.1:9001"))),
        no_clusters,
    )
    .unwrap();
    assert_eq!(config.address, "http://127.0.0.1:9001");
    assert_eq!(config.batch_bytes, Some(16 * 1024));
    let mut unbatched = common_config(google("ipv4:127.0.0.1:9001"));
    unbatched.buffer_size_bytes = Some(pb::UInt32Value { value: 0 });
    let config = AlsConfig::from_envoy(&tcp_any(unbatched), no_clusters).unwrap();
    assert_eq!(config.batch, 1);

    let resolve = |name: &str| (name == "als").then(|| "http://10.0.0.9:9001".to_owned());
    let config =
        AlsConfig::from_envoy(&tcp_any(common_config(envoy_cluster("als"))), resolve).unwrap();
    assert_eq!(config.address, "http://10.0.0.9:9001");
    let err =
        AlsConfig::from_envoy(&tcp_any(common_config(envoy_cluster("nope"))), resolve).unwrap_err();
    assert!(
        err.contains("envoy_grpc.cluster_name: unknown cluster \"nope\""),
        "{err}"
    );
}

#[test]
fn from_envoy_refuses_what_it_cannot_honour() {
    let cases: Vec<(Any, &str)> = vec![
        (
            Any {
                type_url:
                    "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog"
                        .to_owned(),
                value: Vec::new(),
            },
            "type_url",
        ),
        (
            Any {
                type_url: TcpGrpcAccessLogConfig::type_url(),
                value: vec![0xff, 0xff],
            },
            "cannot decode",
        ),
        (
            http_any(HttpGrpcAccessLogConfig::default()),
            "common_config: required",
        ),
        (
            http_any(HttpGrpcAccessLogConfig {
                common_config: Some(common_config(google("als:9001"))),
                additional_response_headers_to_log: vec!["x".to_owned()],
                ..Default::default()
            }),
            "additional_response_headers_to_log",
        ),
        (
            tcp_any(CommonGrpcAccessLogConfig {
                filter_state_objects_to_log: vec!["x".to_owned()],
                ..common_config(google("als:9001"))
            }),
            "common_config.filter_state_objects_to_log",
        ),
        (
            tcp_any(CommonGrpcAccessLogConfig {
                grpc_stream_retry_policy: Some(RetryPolicy {
                    num_retries: Some(pb::UInt32Value { value: 3 }),
                    ..Default::default()
                }),
                ..common_config(google("als:9001"))
            }),
            "grpc_stream_retry_policy.num_retries",
        ),
        (
            tcp_any(CommonGrpcAccessLogConfig {
                grpc_service: None,
                ..common_config(google("als:9001"))
            }),
            "common_config.grpc_service: required",
        ),
        (
            tcp_any(common_config(google("unix:///run/als.sock"))),
            "google_grpc.target_uri",
        ),
        (
            tcp_any(common_config(GrpcService {
                initial_metadata: vec![Default::default()],
                ..google("als:9001")
            })),
            "initial_metadata",
        ),
        (
            tcp_any(CommonGrpcAccessLogConfig {
                log_name: String::new(),
                ..common_config(google("als:9001"))
            }),
            "common_config.log_name: must not be empty",
        ),
    ];
    for (any, expected) in cases {
        let err = AlsConfig::from_envoy(&any, no_clusters).unwrap_err();
        assert!(err.contains(expected), "{expected:?} not in {err:?}");
    }

    let mut tls = google("als:9001");
    if let Some(grpc_service::TargetSpecifier::GoogleGrpc(g)) = &mut tls.target_specifier {
        g.channel_credentials = Some(grpc_service::google_grpc::ChannelCredentials {
            credential_specifier: Some(
                grpc_service::google_grpc::channel_credentials::CredentialSpecifier::SslCredentials(
                    Default::default(),
                ),
            ),
        });
    }
    let err = AlsConfig::from_envoy(&tcp_any(common_config(tls)), no_clusters).unwrap_err();
    assert!(err.contains("channel_credentials (TLS)"), "{err}");
}

fn batcher(batch: usize, batch_bytes: Option<usize>) -> Batcher {
    Batcher::new(&AlsConfig {
        batch,
        batch_bytes,
        flush_interval: Duration::from_secs(1),
        ..AlsConfig::new("http://127.0.0.1:1")
    })
}

/// The entries a sealed batch's message carries, decoded as a collector would.
fn decoded(sealed: &Sealed) -> LogEntries {
    let message = StreamAccessLogsMessage::decode(sealed.message(None)).unwrap();
    assert!(message.identifier.is_none());
    message.log_entries.unwrap()
}

#[test]
fn batches_seal_when_full_per_kind() {
    let now = Instant::now();
    let mut b = batcher(2, None);
    assert_eq!(b.deadline(), None);
    assert!(b.push_http(&http_log(), &[], now).is_none());
    assert_eq!(b.deadline(), Some(now + Duration::from_secs(1)));
    assert!(b.push_tcp(&tcp_log(), now).is_none());
    let sealed = b.push_http(&http_log(), &[], now).unwrap();
    assert_eq!(sealed.count, 2);
    assert!(matches!(decoded(&sealed), LogEntries::HttpLogs(h) if h.log_entry.len() == 2));
    // The TCP entry still waits, on the same clock.
    assert_eq!(b.deadline(), Some(now + Duration::from_secs(1)));
    let rest = b.take_all();
    assert_eq!(rest.len(), 1);
    assert!(matches!(decoded(&rest[0]), LogEntries::TcpLogs(t) if t.log_entry.len() == 1));
    assert_eq!(b.deadline(), None);
    assert!(b.take_all().is_empty());
}

#[test]
fn batches_seal_by_encoded_size() {
    let now = Instant::now();
    let log = http_log();
    let size = http_entry(&log, &[]).encoded_len();
    let mut b = batcher(100, Some(size * 2));
    assert!(b.push_http(&log, &[], now).is_none());
    let sealed = b.push_http(&log, &[], now).unwrap();
    assert_eq!(sealed.count, 2);
    // Zero bytes: every entry is its own message.
    let mut b = batcher(100, Some(0));
    assert_eq!(b.push_http(&log, &[], now).unwrap().count, 1);
}

#[test]
fn messages_are_encoded_as_prost_encodes_them() {
    let now = Instant::now();
    let (http_call, tcp_call) = (http_log(), tcp_log());
    let (http, tcp) = (http_entry(&http_call, &[]), tcp_entry(&tcp_call));
    let identifier = Identifier {
        node: Some(Node {
            id: "sidecar~10.0.0.1~a.shop~shop.svc.cluster.local".into(),
            cluster: "shop".into(),
            ..Node::default()
        }),
        log_name: "mesh".into(),
    };
    let mut b = batcher(3, None);
    for _ in 0..2 {
        assert!(b.push_http(&http_call, &[], now).is_none());
    }
    assert!(b.push_tcp(&tcp_call, now).is_none());
    let sealed = b.push_http(&http_call, &[], now).unwrap();
    let expected = StreamAccessLogsMessage {
        identifier: Some(identifier.clone()),
        log_entries: Some(LogEntries::HttpLogs(HttpAccessLogEntries {
            log_entry: vec![http.clone(); 3],
        })),
    };
    assert_eq!(sealed.message(Some(&identifier)), expected.encode_to_vec());
    let rest = b.take_all();
    let expected = StreamAccessLogsMessage {
        identifier: None,
        log_entries: Some(LogEntries::TcpLogs(TcpAccessLogEntries {
            log_entry: vec![tcp],
        })),
    };
    assert_eq!(rest[0].message(None), expected.encode_to_vec());
}

/// Calls that exercise every optional part of an entry.
fn varied_calls() -> Vec<CallLog> {
    let mut calls = vec![http_log(), tcp_log()];
    let mut bare = http_log();
    bare.method = None;
    bare.authority = None;
    bare.path = None;
    bare.user_agent = None;
    bare.request_id = None;
    bare.status = 0;
    bare.flags = ResponseFlags::default();
    bare.upstream_ttfb = None;
    bare.upstream_host = None;
    bare.cluster = None;
    bare.route = None;
    bare.downstream_principal = None;
    bare.mtls = false;
    bare.request_headers.clear();
    bare.bytes_received = 0;
    bare.bytes_sent = 0;
    bare.duration = Duration::ZERO;
    calls.push(bare);
    let mut odd = http_log();
    odd.protocol = "HTTP/2";
    odd.method = Some(Method::from_bytes(b"PURGE").unwrap());
    odd.authority = Some(HeaderValue::from_bytes(b"caf\xe9.example").unwrap());
    odd.path = Some(format!("/{}", "long-segment/".repeat(40)).parse().unwrap());
    odd.downstream_addr = "[2001:db8::7]:50000".parse().unwrap();
    odd.upstream_host = Some("[::1]:8443".parse().unwrap());
    odd.downstream_principal = None;
    odd.flags = {
        let mut flags = ResponseFlags::default();
        flags.insert(ResponseFlag::RbacDenied);
        flags
    };
    odd.start_time = SystemTime::UNIX_EPOCH + Duration::new(4_000_000_000, 999_999_999);
    odd.duration = Duration::new(400, 1);
    odd.bytes_received = u64::MAX;
    calls.push(odd);
    // An entry past 16 KiB (a three-byte length), and the longest IPv4 text.
    let mut huge = http_log();
    huge.path = Some(format!("/{}", "x".repeat(20_000)).parse().unwrap());
    huge.upstream_host = Some("255.255.255.255:1".parse().unwrap());
    huge.downstream_addr = "0.0.0.0:65535".parse().unwrap();
    calls.push(huge);
    let mut before_epoch = tcp_log();
    before_epoch.start_time = SystemTime::UNIX_EPOCH - Duration::from_secs(1);
    before_epoch.mtls = true;
    calls.push(before_epoch);
    calls
}

#[test]
fn entries_written_from_calls_are_the_bytes_prost_writes() {
    let keep = [HeaderName::from_static("x-tenant")];
    for (i, call) in varied_calls().iter().enumerate() {
        let mut direct = Vec::new();
        let mut through_prost = bytes::BytesMut::new();
        match call.kind {
            CallKind::Http => {
                // One kept header, so the map's order cannot differ.
                wire::push_http(&mut direct, call, &keep);
                prost::encoding::message::encode(1, &http_entry(call, &keep), &mut through_prost);
            }
            CallKind::Tcp => {
                wire::push_tcp(&mut direct, call);
                prost::encoding::message::encode(1, &tcp_entry(call), &mut through_prost);
            }
        }
        assert_eq!(direct[..], through_prost[..], "call {i}");
    }
}

#[test]
fn backoff_doubles_with_jitter_and_resets() {
    let mut rng = StdRng::seed_from_u64(5);
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_millis(500));
    for step in [100, 200, 400, 500, 500] {
        let delay = backoff.next_delay(&mut rng);
        let step = Duration::from_millis(step);
        assert!(delay >= step / 2 && delay <= step, "{delay:?} vs {step:?}");
    }
    backoff.reset();
    assert!(backoff.next_delay(&mut rng) <= Duration::from_millis(100));
    let mut huge = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
    for _ in 0..100 {
        assert!(huge.next_delay(&mut rng) <= Duration::from_secs(30));
    }
}

#[test]
fn target_uris() {
    assert_eq!(
        target_uri_address("als:9001").as_deref(),
        Some("http://als:9001")
    );
    assert_eq!(
        target_uri_address("dns:als:9001").as_deref(),
        Some("http://als:9001")
    );
    assert_eq!(
        target_uri_address("ipv6:[::1]:9001").as_deref(),
        Some("http://[::1]:9001")
    );
    assert_eq!(target_uri_address("ipv4:10.0.0.1:1,10.0.0.2:1"), None);
    assert_eq!(target_uri_address("https://als:9001"), None);
    assert_eq!(target_uri_address(""), None);
}

/// Every `send` past the queue's capacity is dropped and counted, at once:
/// the task never got to run, so nothing was taken from the queue.
#[test]
fn full_queue_drops_newest_and_counts() {
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};

    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let sink = metrics::with_local_recorder(&recorder, || {
        runtime.block_on(async {
            let config = AlsConfig {
                buffer: 8,
                ..AlsConfig::new("http://127.0.0.1:1")
            };
            let sink = AlsSink::start(config, Node::default());
            for _ in 0..20 {
                sink.send(&http_log());
            }
            sink.send(&tcp_log());
            sink
        })
    });
    assert_eq!(sink.dropped(), 13);
    assert_eq!(sink.clone().dropped(), 13, "clones share the count");
    assert_eq!(sink.progress(), AlsProgress::default());
    let dropped = snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .find(|(key, ..)| key.key().name() == ENTRIES_DROPPED_TOTAL)
        .map(|(.., value)| value);
    assert_eq!(dropped, Some(DebugValue::Counter(13)));
}

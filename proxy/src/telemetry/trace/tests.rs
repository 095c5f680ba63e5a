//! Unit tests: parsing and injection of every format, sampling, and the
//! semantic-convention attributes.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue, Method, Version};
use opentelemetry::trace::Status;
use opentelemetry::{KeyValue, Value};
use proptest::prelude::*;

use super::export::semconv;
use super::*;

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const SPAN: &str = "00f067aa0ba902b7";
const PARENT: &str = "53995c3f42cd8ad8";

fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (name, value) in pairs {
        map.append(
            HeaderName::from_bytes(name.as_bytes()).unwrap(),
            HeaderValue::from_str(value).unwrap(),
        );
    }
    map
}

fn extract(pairs: &[(&str, &str)]) -> Option<TraceContext> {
    TraceContext::extract(&headers(pairs))
}

fn traceparent(value: &str) -> Option<TraceContext> {
    extract(&[("traceparent", value)])
}

fn get<'a>(map: &'a HeaderMap, name: &str) -> Option<&'a str> {
    let mut values = map.get_all(name).iter();
    let value = values.next()?;
    assert!(values.next().is_none(), "{name} sent twice");
    Some(value.to_str().unwrap())
}

/// A tracer whose collector is never reached: nothing listens there, and
/// the interval is long enough that no unit test exports.
fn tracer() -> Tracer {
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut config = TracingConfig::new(format!("http://{dead}"));
    config.export_interval = Duration::from_secs(3600);
    Tracer::new(&config).unwrap()
}

#[test]
fn w3c_sampled_and_unsampled() {
    let ctx = traceparent(&format!("00-{TRACE}-{SPAN}-01")).unwrap();
    assert_eq!(ctx.trace_id_hex().as_deref(), Some(TRACE));
    assert_eq!(ctx.span_id_hex().as_deref(), Some(SPAN));
    assert_eq!(ctx.sampling(), Sampling::Sampled);
    assert_eq!(
        ctx.formats(),
        Formats {
            w3c: true,
            ..Formats::default()
        }
    );
    let ctx = traceparent(&format!("00-{TRACE}-{SPAN}-00")).unwrap();
    assert_eq!(ctx.sampling(), Sampling::NotSampled);
    // Unknown flag bits are ignored; only bit 0 is the sampled flag.
    let ctx = traceparent(&format!("00-{TRACE}-{SPAN}-fe")).unwrap();
    assert_eq!(ctx.sampling(), Sampling::NotSampled);
}

#[test]
fn w3c_invalid() {
    let cases = [
        String::new(),
        format!("00-{TRACE}-{SPAN}-0"),
        format!("00-{TRACE}-{SPAN}-01-"),
        format!("00-{TRACE}-{SPAN}-01-extra"),
        format!("00-{}-{SPAN}-01", TRACE.to_uppercase()),
        format!("00-{TRACE}-{}-01", SPAN.to_uppercase()),
        format!("00-{TRACE}-{SPAN}-0A"),
        format!("0A-{TRACE}-{SPAN}-01"),
        format!("ff-{TRACE}-{SPAN}-01"),
        format!("00-{}-{SPAN}-01", "0".repeat(32)),
        format!("00-{TRACE}-{}-01", "0".repeat(16)),
        format!("00_{TRACE}-{SPAN}-01"),
        format!("00-{TRACE}_{SPAN}-01"),
        format!("00-{TRACE}-{SPAN}_01"),
        format!("00-{}g-{SPAN}-01", &TRACE[..31]),
        format!("00-{TRACE}-{SPAN}-xx"),
        format!("00-{}-{SPAN}-01", &TRACE[..16]),
        format!("cc-{TRACE}-{SPAN}-01x"),
    ];
    for case in cases {
        assert_eq!(traceparent(&case), None, "{case:?}");
    }
}

#[test]
fn w3c_future_versions_parse_leniently() {
    let ctx = traceparent(&format!("cc-{TRACE}-{SPAN}-01")).unwrap();
    assert_eq!(ctx.trace_id_hex().as_deref(), Some(TRACE));
    let ctx = traceparent(&format!("cc-{TRACE}-{SPAN}-01-what-the-future-holds")).unwrap();
    assert_eq!(ctx.sampling(), Sampling::Sampled);
}

#[test]
fn w3c_surrounding_whitespace_is_ignored_but_repeats_are_invalid() {
    assert!(traceparent(&format!(" 00-{TRACE}-{SPAN}-01\t")).is_some());
    let twice = format!("00-{TRACE}-{SPAN}-01");
    assert_eq!(
        extract(&[("traceparent", &twice), ("traceparent", &twice)]),
        None
    );
}

#[test]
fn tracestate_kept_verbatim_and_joined() {
    let tp = format!("00-{TRACE}-{SPAN}-01");
    let ctx = extract(&[
        ("traceparent", &tp),
        ("tracestate", "rojo=00f067aa0ba902b7, congo=t61rcWkgMzE"),
    ])
    .unwrap();
    assert_eq!(
        ctx.tracestate().unwrap(),
        "rojo=00f067aa0ba902b7, congo=t61rcWkgMzE"
    );
    let ctx = extract(&[
        ("traceparent", &tp),
        ("tracestate", "rojo=1"),
        ("tracestate", "congo=2"),
    ])
    .unwrap();
    assert_eq!(ctx.tracestate().unwrap(), "rojo=1,congo=2");
}

#[test]
fn tracestate_dropped_when_too_big_or_alone() {
    let tp = format!("00-{TRACE}-{SPAN}-01");
    let long = format!("k={}", "v".repeat(MAX_TRACESTATE_LEN));
    let ctx = extract(&[("traceparent", &tp), ("tracestate", &long)]).unwrap();
    assert_eq!(ctx.tracestate(), None);
    let many = (0..33)
        .map(|i| format!("k{i}=v"))
        .collect::<Vec<_>>()
        .join(",");
    let ctx = extract(&[("traceparent", &tp), ("tracestate", &many)]).unwrap();
    assert_eq!(ctx.tracestate(), None);
    let lines: Vec<(&str, &str)> = std::iter::once(("traceparent", tp.as_str()))
        .chain(std::iter::repeat_n(
            ("tracestate", "a=bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb"),
            40,
        ))
        .collect();
    assert_eq!(extract(&lines).unwrap().tracestate(), None);
    let ctx = extract(&[("traceparent", &tp), ("tracestate", " , ")]).unwrap();
    assert_eq!(ctx.tracestate(), None);
    // Without a valid traceparent there is nothing to attach it to.
    let ctx = extract(&[("tracestate", "rojo=1"), ("b3", &format!("{TRACE}-{SPAN}"))]).unwrap();
    assert_eq!(ctx.tracestate(), None);
}

#[test]
fn b3_single_forms() {
    let ctx = extract(&[("b3", &format!("{TRACE}-{SPAN}-1-{PARENT}"))]).unwrap();
    assert_eq!(ctx.trace_id_hex().as_deref(), Some(TRACE));
    assert_eq!(ctx.span_id_hex().as_deref(), Some(SPAN));
    assert_eq!(ctx.sampling(), Sampling::Sampled);
    assert!(ctx.formats().b3_single && !ctx.formats().w3c && !ctx.formats().b3_multi);

    let ctx = extract(&[("b3", &format!("{TRACE}-{SPAN}"))]).unwrap();
    assert_eq!(ctx.sampling(), Sampling::Deferred);
    let ctx = extract(&[("b3", &format!("{TRACE}-{SPAN}-0"))]).unwrap();
    assert_eq!(ctx.sampling(), Sampling::NotSampled);
    let ctx = extract(&[("b3", &format!("{TRACE}-{SPAN}-d"))]).unwrap();
    assert_eq!(ctx.sampling(), Sampling::Debug);

    let ctx = extract(&[("b3", &format!("{}-{SPAN}-1", &TRACE[16..]))]).unwrap();
    assert_eq!(
        ctx.trace_id_hex().as_deref(),
        Some(format!("{}{}", "0".repeat(16), &TRACE[16..]).as_str())
    );

    for (value, sampling) in [
        ("0", Sampling::NotSampled),
        ("1", Sampling::Sampled),
        ("d", Sampling::Debug),
    ] {
        let ctx = extract(&[("b3", value)]).unwrap();
        assert_eq!(ctx.sampling(), sampling);
        assert_eq!(ctx.trace_id_hex(), None);
    }
}

#[test]
fn b3_single_invalid() {
    let cases = [
        String::new(),
        "x".to_string(),
        "true".to_string(),
        TRACE.to_string(),
        format!("{TRACE}-"),
        format!("{TRACE}-{SPAN}-"),
        format!("{TRACE}-{SPAN}-2"),
        format!("{TRACE}-{SPAN}-true"),
        format!("{TRACE}-{SPAN}-1-"),
        format!("{TRACE}-{SPAN}-1-{PARENT}-x"),
        format!("{TRACE}-{SPAN}-{PARENT}"),
        format!("{}-{SPAN}", TRACE.to_uppercase()),
        format!("{}-{SPAN}", &TRACE[..20]),
        format!("{}-{SPAN}", "0".repeat(32)),
        format!("{}-{SPAN}", "0".repeat(16)),
        format!("{TRACE}-{}", "0".repeat(16)),
        format!("{TRACE}-{}", &SPAN[..15]),
        format!("{TRACE}-{SPAN}-1-{}", "0".repeat(16)),
    ];
    for case in cases {
        assert_eq!(extract(&[("b3", &case)]), None, "{case:?}");
    }
}

#[test]
fn b3_multi_forms() {
    let ctx = extract(&[
        ("x-b3-traceid", TRACE),
        ("x-b3-spanid", SPAN),
        ("x-b3-parentspanid", PARENT),
        ("x-b3-sampled", "1"),
    ])
    .unwrap();
    assert_eq!(ctx.trace_id_hex().as_deref(), Some(TRACE));
    assert_eq!(ctx.span_id_hex().as_deref(), Some(SPAN));
    assert_eq!(ctx.sampling(), Sampling::Sampled);
    assert!(ctx.formats().b3_multi && !ctx.formats().b3_single);

    let sampling = |extra: &[(&str, &str)]| {
        let mut pairs = vec![("x-b3-traceid", &TRACE[16..]), ("x-b3-spanid", SPAN)];
        pairs.extend_from_slice(extra);
        extract(&pairs).map(|c| c.sampling())
    };
    assert_eq!(sampling(&[]), Some(Sampling::Deferred));
    assert_eq!(
        sampling(&[("x-b3-sampled", "0")]),
        Some(Sampling::NotSampled)
    );
    assert_eq!(
        sampling(&[("x-b3-sampled", "true")]),
        Some(Sampling::Sampled)
    );
    assert_eq!(
        sampling(&[("x-b3-sampled", "false")]),
        Some(Sampling::NotSampled)
    );
    assert_eq!(sampling(&[("x-b3-flags", "1")]), Some(Sampling::Debug));
    assert_eq!(
        sampling(&[("x-b3-flags", "1"), ("x-b3-sampled", "0")]),
        Some(Sampling::Debug)
    );
    assert_eq!(sampling(&[("x-b3-flags", "0")]), Some(Sampling::Deferred));

    let only = extract(&[("x-b3-sampled", "0")]).unwrap();
    assert_eq!(
        (only.trace_id_hex(), only.sampling()),
        (None, Sampling::NotSampled)
    );
    let only = extract(&[("x-b3-flags", "1")]).unwrap();
    assert_eq!(only.sampling(), Sampling::Debug);
}

#[test]
fn b3_multi_invalid() {
    let cases: [&[(&str, &str)]; 9] = [
        &[("x-b3-traceid", TRACE)],
        &[("x-b3-spanid", SPAN)],
        &[
            ("x-b3-traceid", TRACE),
            ("x-b3-spanid", SPAN),
            ("x-b3-sampled", "yes"),
        ],
        &[("x-b3-traceid", "abc"), ("x-b3-spanid", SPAN)],
        &[("x-b3-traceid", TRACE), ("x-b3-spanid", "0000000000000000")],
        &[
            ("x-b3-traceid", TRACE),
            ("x-b3-spanid", SPAN),
            ("x-b3-spanid", SPAN),
        ],
        &[
            ("x-b3-traceid", TRACE),
            ("x-b3-spanid", SPAN),
            ("x-b3-parentspanid", "nope"),
        ],
        &[("x-b3-flags", "0")],
        &[("x-b3-parentspanid", PARENT)],
    ];
    for case in cases {
        assert_eq!(extract(case), None, "{case:?}");
    }
}

#[test]
fn precedence_and_formats() {
    let other = "0af7651916cd43dd8448eb211c80319c";
    let tp = format!("00-{TRACE}-{SPAN}-01");
    let single = format!("{other}-{PARENT}-0");
    let all = [
        ("traceparent", tp.as_str()),
        ("b3", single.as_str()),
        ("x-b3-traceid", other),
        ("x-b3-spanid", PARENT),
    ];
    let ctx = extract(&all).unwrap();
    assert_eq!(ctx.trace_id_hex().as_deref(), Some(TRACE));
    assert_eq!(
        ctx.formats(),
        Formats {
            w3c: true,
            b3_single: true,
            b3_multi: true
        }
    );

    // An invalid traceparent does not hide valid B3.
    let ctx = extract(&[("traceparent", "00-garbage"), ("b3", &single)]).unwrap();
    assert_eq!(ctx.trace_id_hex().as_deref(), Some(other));
    assert_eq!(ctx.sampling(), Sampling::NotSampled);
    assert!(!ctx.formats().w3c);

    // B3 single wins over multi.
    let ctx = extract(&[
        ("b3", &single),
        ("x-b3-traceid", TRACE),
        ("x-b3-spanid", SPAN),
    ])
    .unwrap();
    assert_eq!(ctx.trace_id_hex().as_deref(), Some(other));

    assert_eq!(extract(&[("x-request-id", "1")]), None);
}

#[tokio::test]
async fn inject_replaces_stale_headers_with_our_span() {
    let tracer = tracer();
    let tp = format!("00-{TRACE}-{PARENT}-01");
    let incoming = [
        ("traceparent", tp.as_str()),
        ("tracestate", "rojo=1"),
        ("b3", "0"),
        ("x-b3-traceid", TRACE),
        ("x-b3-spanid", PARENT),
        ("x-b3-parentspanid", SPAN),
        ("x-b3-sampled", "1"),
        ("x-b3-flags", "0"),
    ];
    let mut map = headers(&incoming);
    let ctx = TraceContext::extract(&map).unwrap();
    let span = tracer.start_span(Some(&ctx), 0.0, SpanKind::Client, "GET");
    assert!(span.is_sampled());
    assert_eq!(span.trace_id_hex(), TRACE);
    assert_eq!(span.parent_span_id_hex().as_deref(), Some(PARENT));
    let ours = span.span_id_hex();
    assert_ne!(ours, PARENT);
    span.inject(&mut map);

    assert_eq!(
        get(&map, "traceparent").unwrap(),
        format!("00-{TRACE}-{ours}-01")
    );
    assert_eq!(get(&map, "tracestate"), Some("rojo=1"));
    // The lone `b3: 0` is B3 single too, so B3 single goes back, with the
    // decision W3C carried.
    assert_eq!(
        get(&map, "b3").unwrap(),
        format!("{TRACE}-{ours}-1-{PARENT}")
    );
    assert_eq!(get(&map, "x-b3-traceid"), Some(TRACE));
    assert_eq!(get(&map, "x-b3-spanid"), Some(ours.as_str()));
    assert_eq!(get(&map, "x-b3-parentspanid"), Some(PARENT));
    assert_eq!(get(&map, "x-b3-sampled"), Some("1"));
    assert_eq!(get(&map, "x-b3-flags"), None);

    // The next hop continues from our span.
    let next = TraceContext::extract(&map).unwrap();
    assert_eq!(next.trace_id_hex().as_deref(), Some(TRACE));
    assert_eq!(next.span_id_hex(), Some(ours));
}

#[tokio::test]
async fn inject_b3_single_keeps_width_and_debug() {
    let tracer = tracer();
    let narrow = &TRACE[16..];
    let mut map = headers(&[("b3", &format!("{narrow}-{PARENT}-d"))]);
    let ctx = TraceContext::extract(&map).unwrap();
    let span = tracer.start_span(Some(&ctx), 0.0, SpanKind::Server, "GET");
    assert!(span.is_sampled());
    span.inject(&mut map);
    let ours = span.span_id_hex();
    assert_eq!(
        get(&map, "b3").unwrap(),
        format!("{narrow}-{ours}-d-{PARENT}")
    );
    assert_eq!(
        get(&map, "traceparent").unwrap(),
        format!("00-{}{narrow}-{ours}-01", "0".repeat(16))
    );
    assert_eq!(get(&map, "tracestate"), None);
    assert_eq!(get(&map, "x-b3-traceid"), None);

    let mut map = headers(&[
        ("x-b3-traceid", narrow),
        ("x-b3-spanid", PARENT),
        ("x-b3-flags", "1"),
    ]);
    let ctx = TraceContext::extract(&map).unwrap();
    let span = tracer.start_span(Some(&ctx), 0.0, SpanKind::Server, "GET");
    span.inject(&mut map);
    assert_eq!(get(&map, "x-b3-traceid"), Some(narrow));
    assert_eq!(get(&map, "x-b3-flags"), Some("1"));
    assert_eq!(get(&map, "x-b3-sampled"), None);
}

#[tokio::test]
async fn unsampled_calls_still_propagate() {
    let tracer = tracer();
    let mut map = headers(&[("b3", &format!("{TRACE}-{PARENT}-0"))]);
    let ctx = TraceContext::extract(&map).unwrap();
    let mut span = tracer.start_span(Some(&ctx), 1.0, SpanKind::Server, "GET");
    assert!(!span.is_sampled());
    assert!(span.recording.is_none());
    span.set_status_code(200);
    span.inject(&mut map);
    let ours = span.span_id_hex();
    assert_eq!(
        get(&map, "traceparent").unwrap(),
        format!("00-{TRACE}-{ours}-00")
    );
    assert_eq!(
        get(&map, "b3").unwrap(),
        format!("{TRACE}-{ours}-0-{PARENT}")
    );
}

#[tokio::test]
async fn new_traces_and_sampling_only_contexts() {
    let tracer = tracer();
    let mut map = HeaderMap::new();
    map.insert("traceparent", HeaderValue::from_static("bogus"));
    let span = tracer.start_span(
        TraceContext::extract(&map).as_ref(),
        1.0,
        SpanKind::Server,
        "GET",
    );
    assert!(span.is_sampled());
    assert_eq!(span.parent_span_id_hex(), None);
    span.inject(&mut map);
    let tp = get(&map, "traceparent").unwrap();
    assert_eq!(
        tp,
        format!("00-{}-{}-01", span.trace_id_hex(), span.span_id_hex())
    );
    // Only W3C goes out when the request had no B3.
    assert_eq!(get(&map, "b3"), None);
    assert_eq!(get(&map, "x-b3-sampled"), None);

    let mut map = headers(&[("x-b3-sampled", "0")]);
    let ctx = TraceContext::extract(&map).unwrap();
    let span = tracer.start_span(Some(&ctx), 1.0, SpanKind::Server, "GET");
    assert!(!span.is_sampled());
    assert_eq!(span.parent_span_id_hex(), None);
    span.inject(&mut map);
    assert_eq!(get(&map, "x-b3-traceid").unwrap(), span.trace_id_hex());
    assert_eq!(get(&map, "x-b3-sampled"), Some("0"));
    assert_eq!(get(&map, "x-b3-parentspanid"), None);
}

#[tokio::test]
async fn parent_based_sampling() {
    let tracer = tracer();
    let sampled = traceparent(&format!("00-{TRACE}-{SPAN}-01")).unwrap();
    let unsampled = traceparent(&format!("00-{TRACE}-{SPAN}-00")).unwrap();
    let deferred = extract(&[("b3", &format!("{TRACE}-{SPAN}"))]).unwrap();
    let kind = SpanKind::Server;
    assert!(tracer
        .start_span(Some(&sampled), 0.0, kind, "GET")
        .is_sampled());
    assert!(!tracer
        .start_span(Some(&unsampled), 1.0, kind, "GET")
        .is_sampled());
    assert!(tracer
        .start_span(Some(&deferred), 1.0, kind, "GET")
        .is_sampled());
    assert!(!tracer
        .start_span(Some(&deferred), 0.0, kind, "GET")
        .is_sampled());
    assert!(!tracer.start_span(None, 0.0, kind, "GET").is_sampled());
    assert!(!tracer.start_span(None, f64::NAN, kind, "GET").is_sampled());
    assert!(tracer.start_span(None, 1.0, kind, "GET").is_sampled());
    assert!(tracer.start_span(None, 7.0, kind, "GET").is_sampled());
}

#[test]
fn ratio_sampling_follows_the_trace_id() {
    assert!(ratio_sampled(0x1_0000_0000_0000_0000, 0.01));
    assert!(!ratio_sampled(u128::from(u64::MAX), 0.99));
    assert!(ratio_sampled(u128::from(u64::MAX / 4), 0.5));
    assert!(!ratio_sampled(u128::from(u64::MAX / 4 * 3), 0.5));
    let sampled = (0..10_000u128)
        .filter(|i| {
            ratio_sampled(
                i.wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835),
                0.25,
            )
        })
        .count();
    assert!((2_000..3_000).contains(&sampled), "{sampled}");
}

fn attr(attributes: &[KeyValue], key: &str) -> Option<Value> {
    attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| kv.value.clone())
}

#[tokio::test]
async fn attributes_follow_the_http_conventions() {
    let tracer = tracer();
    let mut span = tracer.start_span(None, 1.0, SpanKind::Client, "GET");
    let request = http::Request::builder()
        .method("GET")
        .uri("/api/v1/items?secret=1")
        .header("host", "shop.example:8080")
        .header("user-agent", "curl/8")
        .version(Version::HTTP_2)
        .body(())
        .unwrap();
    span.record_request(&request);
    span.set_url_scheme("http");
    span.set_client_address(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 7)));
    span.set_peer_address(SocketAddr::from(([127, 0, 0, 1], 40000)));
    span.set_route(&Arc::from("items"));
    span.set_cluster(&Arc::from("shop"));
    span.set_response_flag(ResponseFlag::UpstreamReset);
    span.set_response_flag(ResponseFlag::NoRoute);
    span.set_upstream_address(SocketAddr::from(([127, 0, 0, 2], 9000)));
    span.set_peer_principal("spiffe://cluster.local/ns/shop/sa/web");
    span.set_status_code(404);
    let record = &span.recording.as_ref().unwrap().record;
    let (kv, status) = semconv(record.kind, &record.attributes);
    let s = |v: &str| Some(Value::from(v.to_string()));
    assert_eq!(attr(&kv, "http.request.method"), s("GET"));
    assert_eq!(attr(&kv, "url.path"), s("/api/v1/items"));
    assert_eq!(attr(&kv, "url.query"), None);
    assert_eq!(attr(&kv, "url.scheme"), s("http"));
    assert_eq!(attr(&kv, "server.address"), s("shop.example"));
    assert_eq!(attr(&kv, "server.port"), Some(Value::I64(8080)));
    assert_eq!(
        attr(&kv, "url.full"),
        s("http://shop.example:8080/api/v1/items")
    );
    assert_eq!(attr(&kv, "network.protocol.version"), s("2"));
    assert_eq!(attr(&kv, "user_agent.original"), s("curl/8"));
    assert_eq!(attr(&kv, "client.address"), s("10.0.0.7"));
    assert_eq!(attr(&kv, "network.peer.address"), s("127.0.0.1"));
    assert_eq!(attr(&kv, "network.peer.port"), Some(Value::I64(40000)));
    assert_eq!(
        attr(&kv, "http.response.status_code"),
        Some(Value::I64(404))
    );
    assert_eq!(attr(&kv, "postern.route"), s("items"));
    assert_eq!(attr(&kv, "postern.cluster"), s("shop"));
    assert_eq!(attr(&kv, "postern.response_flags"), s("UR"));
    assert_eq!(attr(&kv, "postern.upstream.address"), s("127.0.0.2:9000"));
    assert_eq!(
        attr(&kv, "postern.peer.principal"),
        s("spiffe://cluster.local/ns/shop/sa/web")
    );
    // A client span fails on 4xx, with the code as error.type.
    assert_eq!(attr(&kv, "error.type"), s("404"));
    assert!(matches!(status, Status::Error { .. }));
}

#[test]
fn span_status_by_kind() {
    let outcome = |kind, status: Option<u16>, error: Option<&'static str>| {
        let attributes = Attributes {
            status,
            error_type: error.map(Into::into),
            ..Attributes::default()
        };
        let (kv, status) = semconv(kind, &attributes);
        (
            attr(&kv, "error.type").map(|v| v.to_string()),
            status == Status::Unset,
        )
    };
    assert_eq!(outcome(SpanKind::Server, Some(404), None), (None, true));
    assert_eq!(outcome(SpanKind::Server, Some(200), None), (None, true));
    assert_eq!(
        outcome(SpanKind::Server, Some(503), None),
        (Some("503".to_string()), false)
    );
    assert_eq!(
        outcome(SpanKind::Client, Some(404), None),
        (Some("404".to_string()), false)
    );
    assert_eq!(
        outcome(SpanKind::Server, None, Some("timeout")),
        (Some("timeout".to_string()), false)
    );
    assert_eq!(
        outcome(SpanKind::Server, Some(504), Some("UT")),
        (Some("UT".to_string()), false)
    );
}

#[test]
fn odd_methods_and_names() {
    let method = Method::from_bytes(b"PURGE").unwrap();
    assert_eq!(span_name(&method), "HTTP");
    assert_eq!(span_name(&Method::PATCH), "PATCH");
    let attributes = Attributes {
        method: Some(method),
        ..Attributes::default()
    };
    let (kv, _) = semconv(SpanKind::Server, &attributes);
    assert_eq!(
        attr(&kv, "http.request.method"),
        Some(Value::from("_OTHER"))
    );
    assert_eq!(
        attr(&kv, "http.request.method_original"),
        Some(Value::from("PURGE".to_string()))
    );
}

#[test]
fn config_defaults_and_validation() {
    let config: TracingConfig =
        serde_yaml_ng::from_str("collector: http://127.0.0.1:4317").unwrap();
    assert_eq!(config, TracingConfig::new("http://127.0.0.1:4317"));
    assert_eq!(config.service_name, "postern");
    assert_eq!((config.max_queue, config.max_batch), (2048, 512));
    assert_eq!(config.export_interval, Duration::from_secs(1));
    config.validate().unwrap();
    let config: TracingConfig = serde_yaml_ng::from_str(
        "collector: http://otel:4317\nservice_name: web\nexport_interval: 250ms\nexport_timeout: 2s",
    )
    .unwrap();
    assert_eq!(config.export_interval, Duration::from_millis(250));
    config.validate().unwrap();
    assert!(serde_yaml_ng::from_str::<TracingConfig>("collector: x\nsampling: 1").is_err());

    for bad in [
        "127.0.0.1:4317",
        "https://otel:4317",
        "http://otel",
        "http://otel:4317/v1/traces",
        "http://:4317",
        "not a url",
    ] {
        let err = TracingConfig::new(bad).validate().unwrap_err();
        assert!(matches!(err, TraceError::Collector { .. }), "{bad}: {err}");
    }
    let mut zero = TracingConfig::new("http://127.0.0.1:4317");
    zero.max_batch = 0;
    assert!(matches!(
        zero.validate(),
        Err(TraceError::Zero { field: "max_batch" })
    ));
}

#[test]
fn tracer_needs_a_runtime() {
    let err = Tracer::new(&TracingConfig::new("http://127.0.0.1:4317")).unwrap_err();
    assert!(matches!(err, TraceError::NoRuntime(_)), "{err}");
}

fn header_value() -> impl Strategy<Value = HeaderValue> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..80),
        "[0-9a-f-]{0,70}".prop_map(String::into_bytes),
        "(00|01|ff|cc)-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}(-[ -~]{0,8})?"
            .prop_map(String::into_bytes),
        "[0-9a-f]{16,32}-[0-9a-f]{16}(-[01d])?(-[0-9a-f]{16})?".prop_map(String::into_bytes),
    ]
    .prop_filter_map("not a header value", |bytes| {
        HeaderValue::from_bytes(&bytes).ok()
    })
}

proptest! {
    #[test]
    fn extract_never_panics(
        values in proptest::collection::vec((0usize..8, header_value()), 0..6)
    ) {
        let names = [
            "traceparent", "tracestate", "b3", "x-b3-traceid", "x-b3-spanid",
            "x-b3-parentspanid", "x-b3-sampled", "x-b3-flags",
        ];
        let mut map = HeaderMap::new();
        for (name, value) in values {
            map.append(names[name], value);
        }
        if let Some(ctx) = TraceContext::extract(&map) {
            if let Some(id) = ctx.trace_id_hex() {
                prop_assert_eq!(id.len(), 32);
                prop_assert_ne!(id, "0".repeat(32));
            }
        }
    }

    #[test]
    fn injected_context_extracts_back(
        trace_id in 1u128.., span_id in 1u64.., sampled: bool, narrow: bool,
        b3_single: bool, b3_multi: bool,
    ) {
        let trace_id = if narrow { trace_id & u128::from(u64::MAX) | 1 } else { trace_id };
        let mut map = HeaderMap::new();
        context::inject(
            &context::Outgoing {
                trace_id,
                span_id,
                parent_span_id: 0,
                sampled,
                debug: false,
                narrow,
                formats: Formats { w3c: true, b3_single, b3_multi },
                tracestate: None,
            },
            &mut map,
        );
        let ctx = TraceContext::extract(&map).unwrap();
        prop_assert_eq!(ctx.ids.map(|i| (i.trace_id, i.span_id)), Some((trace_id, span_id)));
        prop_assert_eq!(ctx.sampling(), if sampled { Sampling::Sampled } else { Sampling::NotSampled });
        prop_assert_eq!(ctx.formats(), Formats { w3c: true, b3_single, b3_multi });
    }
}

#[test]
fn spans_and_tracers_cross_tasks() {
    fn assert_send_sync<T: Send + Sync + 'static>() {}
    assert_send_sync::<CallSpan>();
    assert_send_sync::<Tracer>();
    assert_send_sync::<TraceContext>();
}

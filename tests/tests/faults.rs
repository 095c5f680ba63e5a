//! Faults: upstreams that die in the middle of an answer, that swallow
//! connections or stop accepting them, and a control plane that goes away
//! and comes back.
//!
//! `resilience.rs` covers failures before an answer starts (5xx, a reset
//! before the head, refused connects) and the policies in front of them;
//! this suite covers what it cannot stage with the echo backend, using the
//! fault upstreams of `postern_tests::fault`.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use http_body_util::BodyExt as _;
use postern_control::ads::{AdsEvent, AdsEventKind, AdsServer, Snapshot};
use postern_control::mesh::parse_mesh;
use postern_proto::type_url;
use postern_tests::control::{wait_event, ControlPlane};
use postern_tests::fault::{Death, DyingUpstream, Fault, FaultProxy, PARTIAL_BODY};
use postern_tests::{
    empty, full, get, listener, request, start_proxy, wait_until, within, H1Conn, H2Conn,
    HttpBackend, Proxy, Reply,
};

// ------------------------------------------------------- dying mid-answer --

const DEATHS: [Death; 5] = [
    Death::H1Fin,
    Death::H1Reset,
    Death::H1ChunkedFin,
    Death::H2RstStream,
    Death::H2GoAway,
];

fn death_name(death: Death) -> &'static str {
    match death {
        Death::H1Fin => "h1-fin",
        Death::H1Reset => "h1-reset",
        Death::H1ChunkedFin => "h1-chunked-fin",
        Death::H2RstStream => "h2-rst-stream",
        Death::H2GoAway => "h2-goaway",
        Death::H2GracefulGoAway => "h2-graceful-goaway",
    }
}

/// A listener with one route and one cluster per upstream, each route with
/// a retry policy on every condition (POST not allowed), so that a replay
/// would show.
fn dying_config(upstreams: &[(Death, SocketAddr)]) -> String {
    let mut routes = String::new();
    let mut clusters = String::new();
    for (death, addr) in upstreams {
        let name = death_name(*death);
        let protocol = if death.is_http2() { "http2" } else { "http1" };
        routes.push_str(&format!(
            "
          - match: {{ path: {{ prefix: /{name}/ }} }}
            cluster: {name}
            retry:
              on: [reset, 5xx, connect-failure]
              max_attempts: 3
              backoff_base: 1ms"
        ));
        clusters.push_str(&format!(
            "
  - name: {name}
    protocol: {protocol}
    endpoints: [{{ address: \"{addr}\" }}]"
        ));
    }
    format!(
        "
listeners:
  - name: edge
    address: 127.0.0.1:0
    kind: http
    virtual_hosts:
      - name: all
        domains: [\"*\"]
        routes:{routes}
clusters:{clusters}
"
    )
}

/// A client of either HTTP version, so each death is checked from both.
enum Client {
    /// The connection of the last request, kept open while its body is read.
    H1(Option<H1Conn>),
    H2(H2Conn),
}

impl Client {
    async fn head(
        &mut self,
        edge: SocketAddr,
        req: http::Request<postern_tests::Body>,
    ) -> http::Response<hyper::body::Incoming> {
        match self {
            // A new connection each time: the last one was cut.
            Client::H1(last) => last
                .insert(H1Conn::connect(edge).await.expect("connect"))
                .send_streaming(req)
                .await
                .expect("response head"),
            Client::H2(conn) => conn.send_streaming(req).await.expect("response head"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_cut_mid_body_reaches_the_client_as_a_reset_and_is_never_replayed() {
    let mut upstreams = Vec::new();
    for death in DEATHS.into_iter().chain([Death::H2GracefulGoAway]) {
        upstreams.push((death, DyingUpstream::start(death).await));
    }
    let addrs: Vec<(Death, SocketAddr)> = upstreams.iter().map(|(d, u)| (*d, u.addr())).collect();
    let proxy = start_proxy(&dying_config(&addrs)).await;
    let edge = listener(&proxy, "edge");

    for (death, upstream) in &upstreams {
        let name = death_name(*death);
        let clients = [
            ("http/1.1", Client::H1(None)),
            ("h2", Client::H2(H2Conn::connect(edge).await.expect("h2"))),
        ];
        let mut sent = 0;
        for (version, mut client) in clients {
            for method in ["GET", "POST"] {
                let case = format!("{name}, {version} client, {method}");
                let body = if method == "POST" {
                    full("order=1")
                } else {
                    empty()
                };
                let req = request(method, "shop", &format!("/{name}/x"))
                    .body(body)
                    .expect("request");
                let response = within(
                    Duration::from_secs(5),
                    "response head",
                    client.head(edge, req),
                )
                .await;
                sent += 1;
                assert_eq!(response.status(), 200, "{case}");
                // The head is downstream: now the upstream dies.
                upstream.kill();
                let body = within(
                    Duration::from_secs(5),
                    "response body",
                    response.into_body().collect(),
                )
                .await;
                if *death == Death::H2GracefulGoAway {
                    let body = body.unwrap_or_else(|e| panic!("{case}: {e}")).to_bytes();
                    assert_eq!(body.len(), 2 * PARTIAL_BODY, "{case}: the control case");
                } else {
                    // Not a clean end of a shorter message: the connection
                    // closes short of the framing (HTTP/1.1) or the stream
                    // is reset (HTTP/2), and the client knows.
                    assert!(
                        body.is_err(),
                        "{case}: a cut answer reached the client as complete"
                    );
                }
                // Each request reached the upstream once: a retry policy
                // does not replay what has already started answering.
                assert_eq!(upstream.requests(), sent, "{case}: replayed");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_before_the_head_is_retried_for_get_but_never_for_post() {
    let backend = HttpBackend::start("b").await;
    let proxy = start_proxy(&format!(
        r#"
        listeners:
          - name: edge
            address: 127.0.0.1:0
            kind: http
            virtual_hosts:
              - name: all
                domains: ["*"]
                routes:
                  - match: {{}}
                    cluster: c
                    retry:
                      on: [reset, 5xx]
                      max_attempts: 3
                      backoff_base: 1ms
        clusters:
          - name: c
            endpoints: [{{ address: "{}" }}]
        "#,
        backend.addr()
    ))
    .await;
    let edge = listener(&proxy, "edge");

    // The backend reads the whole request, then drops the connection: the
    // request may have been acted on, so only an idempotent one goes again.
    backend.script([Reply::reset()]);
    let post = request("POST", "shop", "/orders")
        .body(full("order=1"))
        .expect("request");
    let response = postern_tests::send(edge, post).await;
    assert_eq!(response.status, 502);
    assert_eq!(backend.started(), 1, "the POST was replayed");

    backend.script([Reply::reset()]);
    let response = get(edge, "shop", "/orders").await;
    assert_eq!(response.status, 200);
    assert_eq!(backend.started(), 3, "the GET went again, once");
}

// ----------------------------------------------- blackholes and silences --

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blackholed_endpoint_times_out_is_ejected_and_returns_when_it_heals() {
    const CONNECT_TIMEOUT: Duration = Duration::from_millis(250);
    let (a, b) = (HttpBackend::start("a").await, HttpBackend::start("b").await);
    let hole = FaultProxy::start(a.addr()).await;
    let proxy = start_proxy(&format!(
        r#"
        listeners:
          - name: edge
            address: 127.0.0.1:0
            kind: http
            virtual_hosts:
              - name: all
                domains: ["*"]
                routes:
                  - match: {{ path: {{ prefix: /lone }} }}
                    cluster: lone
                  - match: {{ path: {{ prefix: /retry }} }}
                    cluster: pair
                    retry: {{ on: [connect-failure], max_attempts: 2, backoff_base: 1ms }}
                  - match: {{}}
                    cluster: pair
        clusters:
          - name: lone
            connect_timeout: 250ms
            endpoints: [{{ address: "{hole}" }}]
          - name: pair
            connect_timeout: 250ms
            # No idle connections: every request connects, so the blackhole
            # is met at connect time.
            pool: {{ max_idle_per_endpoint: 0 }}
            endpoints: [{{ address: "{hole}" }}, {{ address: "{b}" }}]
            outlier_detection:
              consecutive_connect_failures: 2
              consecutive_5xx: 0
              base_ejection_time: 1s
              max_ejection_time: 1s
              max_ejection_percent: 50
        "#,
        hole = hole.addr(),
        b = b.addr(),
    ))
    .await;
    let edge = listener(&proxy, "edge");
    for _ in 0..4 {
        assert_eq!(get(edge, "shop", "/").await.status, 200);
    }
    assert!(a.started() > 0 && b.started() > 0, "round robin over both");

    hole.set(Fault::Blackhole).await;

    // Alone behind the blackhole: the connect timeout answers, not the
    // kernel's SYN retries (a minute and more).
    let started = Instant::now();
    let response = get(edge, "shop", "/lone").await;
    let took = started.elapsed();
    assert_eq!(response.status, 502, "{}", response.text());
    assert!(
        took >= CONNECT_TIMEOUT && took < CONNECT_TIMEOUT * 4,
        "connect failure after {took:?}"
    );

    // Nothing reached the blackholed endpoint, so even a POST goes to the
    // other one.
    let post = request("POST", "shop", "/retry/orders")
        .body(full("order=1"))
        .expect("request");
    let response = postern_tests::send(edge, post).await;
    assert_eq!(response.status, 200);
    assert_eq!(response.backend(), Some("b"));

    // Without retries, the blackholed endpoint fails until two connect
    // failures in a row eject it; then only the healthy one is tried, with
    // no connect timeout to wait out.
    let mut failures = 0;
    let mut healthy_in_a_row = 0;
    for _ in 0..12 {
        let response = get(edge, "shop", "/").await;
        if response.status == 502 {
            failures += 1;
            healthy_in_a_row = 0;
        } else {
            assert_eq!(response.backend(), Some("b"));
            healthy_in_a_row += 1;
            if healthy_in_a_row == 4 {
                break;
            }
        }
    }
    assert!(
        (1..=2).contains(&failures),
        "{failures} failures before the ejection"
    );
    // The ejection began a few requests ago and lasts 1 s.
    let ejected = Instant::now();
    let mut while_ejected = 0;
    while while_ejected < 10 && ejected.elapsed() < Duration::from_millis(800) {
        let started = Instant::now();
        let response = get(edge, "shop", "/").await;
        assert_eq!(
            response.status, 200,
            "request {while_ejected} while ejected"
        );
        assert_eq!(response.backend(), Some("b"));
        assert!(
            started.elapsed() < CONNECT_TIMEOUT,
            "request {while_ejected} waited on the ejected endpoint"
        );
        while_ejected += 1;
    }
    assert!(
        while_ejected >= 5,
        "only {while_ejected} requests while ejected"
    );

    // Healed: once the ejection is over, it gets traffic again.
    hole.set(Fault::Pass).await;
    let before = a.started();
    wait_until("the healed endpoint answers again", || async {
        let response = get(edge, "shop", "/").await;
        assert_eq!(response.status, 200, "{}", response.text());
        a.started() > before
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_upstream_meets_the_route_timeout_and_the_circuit_breaker() {
    const ROUTE_TIMEOUT: Duration = Duration::from_millis(300);
    let a = HttpBackend::start("a").await;
    let silent = FaultProxy::start(a.addr()).await;
    let proxy = start_proxy(&format!(
        r#"
        listeners:
          - name: edge
            address: 127.0.0.1:0
            kind: http
            virtual_hosts:
              - name: all
                domains: ["*"]
                routes:
                  - match: {{}}
                    cluster: c
                    timeout: 300ms
        clusters:
          - name: c
            # Every request on its own connection, so the silent upstream's
            # accept count says how many are out.
            pool: {{ max_idle_per_endpoint: 0 }}
            endpoints: [{{ address: "{}" }}]
            circuit_breaker: {{ max_requests: 2 }}
        "#,
        silent.addr()
    ))
    .await;
    let edge = listener(&proxy, "edge");
    assert_eq!(get(edge, "shop", "/").await.status, 200);

    // It accepts and reads, and never answers.
    silent.set(Fault::Silent).await;
    let accepted = silent.accepted();
    let held: Vec<_> = (0..2)
        .map(|_| {
            tokio::spawn(async move {
                let started = Instant::now();
                (get(edge, "shop", "/").await, started.elapsed())
            })
        })
        .collect();
    wait_until("two requests held by the silent upstream", || async {
        silent.accepted() == accepted + 2
    })
    .await;

    // The circuit breaker's request budget is spent: a third is refused at
    // once instead of joining them.
    let started = Instant::now();
    let response = get(edge, "shop", "/").await;
    let took = started.elapsed();
    assert_eq!(response.status, 503, "{}", response.text());
    assert_eq!(response.header("x-postern-overloaded"), Some("true"));
    assert!(took < ROUTE_TIMEOUT, "refused after {took:?}");
    for call in held {
        let (response, took) = call.await.expect("held call");
        assert_eq!(response.status, 504, "{}", response.text());
        assert!(took >= ROUTE_TIMEOUT, "504 after {took:?}");
    }
    assert_eq!(silent.accepted(), accepted + 2, "the refused one connected");

    silent.set(Fault::Pass).await;
    let response = get(edge, "shop", "/").await;
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(response.backend(), Some("a"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_drops_connections_after_accept_is_ejected_until_it_heals() {
    let (a, b) = (HttpBackend::start("a").await, HttpBackend::start("b").await);
    let dropper = FaultProxy::start(a.addr()).await;
    let proxy = start_proxy(&format!(
        r#"
        listeners:
          - name: edge
            address: 127.0.0.1:0
            kind: http
            virtual_hosts:
              - name: all
                domains: ["*"]
                routes:
                  - match: {{}}
                    cluster: pair
        clusters:
          - name: pair
            pool: {{ max_idle_per_endpoint: 0 }}
            endpoints: [{{ address: "{}" }}, {{ address: "{}" }}]
            outlier_detection:
              consecutive_5xx: 2
              consecutive_connect_failures: 0
              base_ejection_time: 1s
              max_ejection_time: 1s
              max_ejection_percent: 50
        "#,
        dropper.addr(),
        b.addr()
    ))
    .await;
    let edge = listener(&proxy, "edge");

    // One FIN and one RST right after accept: both are resets before the
    // head (502), and two in a row eject the endpoint.
    let mut failures = 0;
    for fault in [Fault::Close, Fault::Reset] {
        dropper.set(fault).await;
        loop {
            let response = get(edge, "shop", "/").await;
            if response.status == 502 {
                failures += 1;
                break;
            }
            assert_eq!(response.backend(), Some("b"));
        }
    }
    assert_eq!(failures, 2);
    // Ejected for 1 s from the last failure.
    let ejected = Instant::now();
    let accepted = dropper.accepted();
    let mut while_ejected = 0;
    while while_ejected < 10 && ejected.elapsed() < Duration::from_millis(800) {
        let response = get(edge, "shop", "/").await;
        assert_eq!(
            response.status, 200,
            "request {while_ejected} while ejected"
        );
        assert_eq!(response.backend(), Some("b"));
        while_ejected += 1;
    }
    assert!(
        while_ejected >= 5,
        "only {while_ejected} requests while ejected"
    );
    assert_eq!(
        dropper.accepted(),
        accepted,
        "the ejected endpoint still got connections"
    );

    dropper.set(Fault::Pass).await;
    let before = a.started();
    wait_until("the healed endpoint answers again", || async {
        assert_eq!(get(edge, "shop", "/").await.status, 200);
        a.started() > before
    })
    .await;
}

// ------------------------------------------------- control plane outages --

/// How long the control plane stays down: `POSTERN_CP_OUTAGE_SECS`, 3 s by
/// default so CI stays fast; run with 60 for the minute-long outage of
/// issue #8.
fn outage() -> Duration {
    let secs = std::env::var("POSTERN_CP_OUTAGE_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    Duration::from_secs(secs)
}

fn mesh(version: &str, services: &[(&str, SocketAddr)]) -> Snapshot {
    let services: String = services
        .iter()
        .map(|(name, addr)| {
            format!("  - name: {name}\n    endpoints: [{{ address: \"{addr}\" }}]\n")
        })
        .collect();
    let yaml = format!(
        r#"
listeners:
  - name: xds-http
    address: 127.0.0.1:0
    route: main-routes
routes:
  - name: main-routes
    virtual_hosts:
      - name: all
        domains: ["*"]
        routes:
          - prefix: /
            cluster: svc-a
services:
{services}"#
    );
    parse_mesh(&yaml, version).expect("mesh")
}

async fn admin_json(proxy: &Proxy, path: &str) -> serde_json::Value {
    let response = get(proxy.admin_addr(), "localhost", path).await;
    serde_json::from_slice(&response.body).unwrap_or(serde_json::Value::Null)
}

/// The version the proxy runs for each xDS type, from `/config_dump`.
async fn versions(proxy: &Proxy) -> Vec<(String, String)> {
    let dump = admin_json(proxy, "/config_dump").await;
    let mut versions: Vec<(String, String)> = dump["dynamic"]["types"]
        .as_array()
        .map(|types| {
            types
                .iter()
                .map(|t| {
                    (
                        t["type_url"].as_str().unwrap_or_default().to_owned(),
                        t["version"].as_str().unwrap_or_default().to_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    versions.sort();
    versions
}

async fn control_plane_outage(protocol: &str) {
    let a = HttpBackend::start("a").await;
    let mut cp = ControlPlane::start(mesh("1", &[("svc-a", a.addr())])).await;
    let proxy = start_proxy(&format!(
        r#"
node: {{ id: "sidecar~127.0.0.1~outage.default~default.svc.cluster.local", cluster: test }}
xds: {{ address: "{}", protocol: {protocol}, initial_backoff: 50ms, max_backoff: 500ms }}
"#,
        cp.url()
    ))
    .await;
    wait_until("ready with the first config", || async {
        get(proxy.admin_addr(), "localhost", "/ready").await.status == 200
    })
    .await;
    let edge = listener(&proxy, "xds-http");
    let before = versions(&proxy).await;
    assert_eq!(before.len(), 4, "four xDS types: {before:?}");

    // Traffic on one keep-alive connection for the whole outage: a listener
    // or cluster rebuilt by a resubscription would drop it or the pooled
    // upstream connection behind it.
    let (stop, mut stopped) = tokio::sync::watch::channel(false);
    let admin = proxy.admin_addr();
    let traffic = tokio::spawn(async move {
        let mut conn = H1Conn::connect(edge).await.expect("connect");
        let (mut ok, mut errors) = (0u32, Vec::new());
        while !*stopped.borrow_and_update() {
            let req = request("GET", "shop", "/").body(empty()).expect("request");
            match conn.send(req).await {
                Ok(r) if r.status == 200 && r.backend() == Some("a") => ok += 1,
                Ok(r) => errors.push(format!("{} from {:?}", r.status, r.backend())),
                Err(e) => errors.push(format!("{e:#}")),
            }
            if get(admin, "localhost", "/ready").await.status != 200 {
                errors.push("not ready".into());
            }
            // Paced so the outage is covered evenly without a busy loop.
            let _ = tokio::time::timeout(Duration::from_millis(20), stopped.changed()).await;
        }
        (ok, errors)
    });

    cp.stop().await;
    let down = outage();
    // The outage itself is what is tested: traffic runs through it.
    tokio::time::sleep(down).await;
    assert_eq!(
        versions(&proxy).await,
        before,
        "versions changed while down"
    );

    let server = AdsServer::new();
    let mut events = server.events();
    cp.restart_with(server, mesh("1", &[("svc-a", a.addr())]))
        .await;
    wait_event(&mut events, "the proxy reconnected", |e| {
        e.kind == AdsEventKind::Connected
    })
    .await;

    // A change after the outage goes through: the new stream follows.
    let b = HttpBackend::start("b").await;
    cp.server
        .set_snapshot(mesh("2", &[("svc-a", a.addr()), ("svc-b", b.addr())]));
    let mut after_reconnect: Vec<AdsEvent> = Vec::new();
    within(
        Duration::from_secs(10),
        "the v2 clusters acknowledged",
        async {
            loop {
                let event = wait_event(&mut events, "an ads event", |_| true).await;
                let done = event.type_url == type_url::CLUSTER
                    && event.kind
                        == AdsEventKind::Ack {
                            version: "2".into(),
                        };
                after_reconnect.push(event);
                if done {
                    break;
                }
            }
        },
    )
    .await;
    for event in &after_reconnect {
        assert!(
            !matches!(event.kind, AdsEventKind::Nack { .. }),
            "NACK after the reconnect: {event:?}"
        );
    }
    // The versions the proxy reports are those it ran before the outage
    // (the new server's) or the new one: never none, which would mean it
    // started over.
    for event in &after_reconnect {
        if let AdsEventKind::Ack { version } = &event.kind {
            assert!(version == "1" || version == "2", "{event:?}");
        }
    }
    let resent: Vec<&str> = after_reconnect
        .iter()
        .filter(|e| matches!(&e.kind, AdsEventKind::Ack { version } if version == "1"))
        .map(|e| e.type_url.as_str())
        .collect();
    if protocol == "delta" {
        // The proxy told the new server what it holds
        // (`initial_resource_versions`), so nothing unchanged came again.
        assert!(resent.is_empty(), "re-sent after the reconnect: {resent:?}");
        for event in &after_reconnect {
            assert!(
                event.type_url != type_url::LISTENER && event.type_url != type_url::ROUTE,
                "an unchanged type was pushed again: {event:?}"
            );
        }
    }

    stop.send_replace(true);
    let (ok, errors) = traffic.await.expect("traffic task");
    assert!(errors.is_empty(), "{} errors: {errors:?}", errors.len());
    assert!(ok >= 10, "only {ok} requests over a {down:?} outage");
    assert_eq!(
        a.connections(),
        1,
        "the upstream connection was rebuilt: the cluster flapped"
    );
    assert_eq!(get(edge, "shop", "/").await.backend(), Some("a"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_plane_outage_costs_no_request_and_no_config_flap_sotw() {
    control_plane_outage("sotw").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_plane_outage_costs_no_request_and_no_config_flap_delta() {
    control_plane_outage("delta").await;
}

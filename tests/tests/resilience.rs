//! Resilience: timeouts, retries and the retry budget, circuit breaking,
//! outlier detection, and the statuses the proxy answers on failure (also as
//! gRPC trailers-only responses).

use std::time::{Duration, Instant};

use postern_tests::grpc::{self, pb::EchoRequest, GrpcBackend};
use postern_tests::{
    dead_addr, empty, full, get, listener, request, send, start_proxy, wait_until, within, H1Conn,
    H2Conn, HttpBackend, Reply,
};

fn one_route(route_extra: &str, cluster_extra: &str, addrs: &[std::net::SocketAddr]) -> String {
    let endpoints: String = addrs
        .iter()
        .map(|a| format!("\n      - address: \"{a}\""))
        .collect();
    format!(
        "listeners:
  - name: edge
    address: 127.0.0.1:0
    kind: http
    virtual_hosts:
      - name: all
        domains: [\"*\"]
        routes:
          - name: main
            match: {{}}
            cluster: c
{route_extra}
clusters:
  - name: c
    endpoints:{endpoints}
{cluster_extra}
"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_timeout_answers_504() {
    let backend = HttpBackend::start("slow").await;
    let proxy = start_proxy(&one_route(
        "            timeout: 200ms",
        "",
        &[backend.addr()],
    ))
    .await;
    let edge = listener(&proxy, "edge");
    let started = Instant::now();
    let req = request("GET", "svc.local", "/")
        .header("x-test-delay-ms", "5000")
        .body(empty())
        .unwrap();
    let response = send(edge, req).await;
    assert_eq!(response.status, 504);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "took {:?}, the timeout is 200ms",
        started.elapsed()
    );
    // A fast request on the same route still succeeds.
    assert_eq!(get(edge, "svc.local", "/").await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_try_timeout_retries_on_a_fresh_try() {
    let backend = HttpBackend::start("b").await;
    backend.script([Reply::delay(Duration::from_secs(5))]);
    let route = "            timeout: 4s
            retry:
              on: [5xx, reset, connect-failure]
              max_attempts: 2
              per_try_timeout: 200ms
              backoff_base: 1ms";
    let proxy = start_proxy(&one_route(route, "", &[backend.addr()])).await;
    let edge = listener(&proxy, "edge");
    let started = Instant::now();
    let response = get(edge, "svc.local", "/").await;
    assert_eq!(response.status, 200, "the second try answers at once");
    assert_eq!(backend.started(), 2);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );

    // Both tries too slow: 504 once the tries are used up.
    backend.script([
        Reply::delay(Duration::from_secs(5)),
        Reply::delay(Duration::from_secs(5)),
    ]);
    let started = Instant::now();
    let response = get(edge, "svc.local", "/").await;
    assert_eq!(response.status, 504);
    assert_eq!(backend.started(), 4);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_5xx_for_get_but_not_post_unless_allowed() {
    let backend = HttpBackend::start("b").await;
    let addr = backend.addr();
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
                  - match:
                      path: {{ prefix: /unsafe-ok }}
                    cluster: c
                    retry:
                      on: [5xx]
                      max_attempts: 3
                      backoff_base: 1ms
                      retry_non_idempotent: true
                  - match: {{}}
                    cluster: c
                    retry:
                      on: [5xx]
                      max_attempts: 3
                      backoff_base: 1ms
        clusters:
          - name: c
            endpoints: [{{ address: "{addr}" }}]
        "#
    ))
    .await;
    let edge = listener(&proxy, "edge");

    backend.script([Reply::status(503)]);
    let response = get(edge, "svc.local", "/get").await;
    assert_eq!(response.status, 200);
    assert_eq!(backend.started(), 2, "GET is retried once");

    backend.script([Reply::status(503)]);
    let post = request("POST", "svc.local", "/post")
        .body(full("payload"))
        .unwrap();
    let response = send(edge, post).await;
    assert_eq!(response.status, 503, "POST is not retried");
    assert_eq!(backend.started(), 3);

    backend.script([Reply::status(503), Reply::status(502)]);
    let post = request("POST", "svc.local", "/unsafe-ok")
        .body(full("payload"))
        .unwrap();
    let response = send(edge, post).await;
    assert_eq!(response.status, 200, "retry_non_idempotent retries POST");
    assert_eq!(response.body, "payload", "the buffered body is replayed");
    assert_eq!(backend.started(), 6);
    let tries: Vec<u64> = backend.requests()[3..].iter().map(|r| r.body_len).collect();
    assert_eq!(tries, [7, 7, 7], "every try carries the whole body");

    // A failure on every try: the client gets the last try's status after
    // max_attempts tries.
    backend.set_default(Some(Reply::status(500)));
    let response = get(edge, "svc.local", "/get").await;
    assert_eq!(response.status, 500);
    assert_eq!(backend.started(), 9);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retriable_status_codes_retry_only_listed_codes() {
    let backend = HttpBackend::start("b").await;
    let route = "            retry:
              on: [retriable-status-codes]
              retriable_status_codes: [409]
              max_attempts: 2
              backoff_base: 1ms";
    let proxy = start_proxy(&one_route(route, "", &[backend.addr()])).await;
    let edge = listener(&proxy, "edge");

    backend.script([Reply::status(409)]);
    assert_eq!(get(edge, "svc.local", "/").await.status, 200);
    assert_eq!(backend.started(), 2);

    backend.script([Reply::status(500)]);
    assert_eq!(
        get(edge, "svc.local", "/").await.status,
        500,
        "500 is not listed"
    );
    assert_eq!(backend.started(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_on_reset_and_reset_without_retry_is_502() {
    let backend = HttpBackend::start("b").await;
    let addr = backend.addr();
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
                  - match:
                      path: {{ prefix: /retry }}
                    cluster: c
                    retry:
                      on: [reset]
                      max_attempts: 2
                      backoff_base: 1ms
                  - match: {{}}
                    cluster: c
        clusters:
          - name: c
            endpoints: [{{ address: "{addr}" }}]
        "#
    ))
    .await;
    let edge = listener(&proxy, "edge");

    backend.script([Reply::reset()]);
    let response = get(edge, "svc.local", "/retry").await;
    assert_eq!(response.status, 200);
    assert_eq!(backend.started(), 2);

    backend.script([Reply::reset()]);
    let response = get(edge, "svc.local", "/plain").await;
    assert_eq!(response.status, 502, "a reset before the answer is a 502");
    assert_eq!(backend.started(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_failure_is_502_and_retried_on_another_endpoint() {
    let good = HttpBackend::start("good").await;
    let dead = dead_addr();
    let (g,) = (good.addr(),);
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
                  - match:
                      path: {{ prefix: /retry }}
                    cluster: mixed
                    retry:
                      on: [connect-failure]
                      max_attempts: 3
                      backoff_base: 1ms
                  - match:
                      path: {{ prefix: /dead }}
                    cluster: dead
        clusters:
          - name: mixed
            connect_timeout: 1s
            endpoints:
              - address: "{dead}"
              - address: "{g}"
          - name: dead
            connect_timeout: 1s
            endpoints:
              - address: "{dead}"
        "#
    ))
    .await;
    let edge = listener(&proxy, "edge");

    let response = get(edge, "svc.local", "/dead").await;
    assert_eq!(response.status, 502, "nothing listens: connect failure");

    // Round robin sends half the first tries to the dead endpoint; the retry
    // goes elsewhere, so every request succeeds.
    for i in 0..6 {
        let response = get(edge, "svc.local", "/retry").await;
        assert_eq!(response.status, 200, "request {i}");
        assert_eq!(response.backend(), Some("good"));
    }
    assert_eq!(good.started(), 6);
}

/// Sends `n` concurrent GETs (each on its own connection) and returns their
/// statuses.
async fn concurrent_gets(edge: std::net::SocketAddr, path: &str, n: usize) -> Vec<u16> {
    let mut tasks = Vec::new();
    for _ in 0..n {
        let path = path.to_owned();
        tasks.push(tokio::spawn(async move {
            get(edge, "svc.local", &path).await.status.as_u16()
        }));
    }
    let mut statuses = Vec::new();
    for task in tasks {
        statuses.push(task.await.expect("request task"));
    }
    statuses
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_budget_caps_retries_in_flight() {
    const REQUESTS: usize = 20;
    const MAX_ATTEMPTS: usize = 4;
    let tight = HttpBackend::start("tight").await;
    let generous = HttpBackend::start("generous").await;
    let failing = Reply {
        status: Some(503),
        delay: Some(Duration::from_millis(100)),
        reset: false,
    };
    tight.set_default(Some(failing));
    generous.set_default(Some(failing));
    let (t, g) = (tight.addr(), generous.addr());
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
                  - match:
                      path: {{ prefix: /tight }}
                    cluster: tight
                    retry:
                      on: [5xx]
                      max_attempts: {MAX_ATTEMPTS}
                      backoff_base: 1ms
                      backoff_max: 2ms
                  - match:
                      path: {{ prefix: /generous }}
                    cluster: generous
                    retry:
                      on: [5xx]
                      max_attempts: {MAX_ATTEMPTS}
                      backoff_base: 1ms
                      backoff_max: 2ms
        clusters:
          - name: tight
            endpoints: [{{ address: "{t}" }}]
            circuit_breaker: {{ max_retries: 1000 }}
            retry_budget:
              budget_percent: 0
              min_retry_concurrency: 1
          - name: generous
            endpoints: [{{ address: "{g}" }}]
            circuit_breaker: {{ max_retries: 1000 }}
            retry_budget:
              budget_percent: 100
              min_retry_concurrency: 1000
        "#
    ))
    .await;
    let edge = listener(&proxy, "edge");

    // Control: with room in the budget every request uses every try.
    let statuses = concurrent_gets(edge, "/generous", REQUESTS).await;
    assert!(statuses.iter().all(|s| *s == 503), "{statuses:?}");
    assert_eq!(generous.started(), REQUESTS * MAX_ATTEMPTS);

    // One retry in flight at a time: most requests get no retry at all.
    let statuses = concurrent_gets(edge, "/tight", REQUESTS).await;
    assert!(statuses.iter().all(|s| *s == 503), "{statuses:?}");
    let attempts = tight.started();
    assert!(
        attempts >= REQUESTS,
        "every request is tried once, got {attempts}"
    );
    assert!(
        attempts <= REQUESTS * MAX_ATTEMPTS / 2,
        "the budget allows one retry in flight, yet {attempts} tries for {REQUESTS} requests"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn circuit_breaker_rejects_over_max_requests_with_overloaded_header() {
    let backend = HttpBackend::start("b").await;
    let cluster = "    circuit_breaker:
      max_requests: 1";
    let proxy = start_proxy(&one_route("", cluster, &[backend.addr()])).await;
    let edge = listener(&proxy, "edge");

    backend.script([Reply::delay(Duration::from_millis(1500))]);
    let slow = tokio::spawn(async move { get(edge, "svc.local", "/slow").await });
    let b = &backend;
    wait_until("the slow request to reach the backend", || async move {
        b.in_flight() == 1
    })
    .await;

    let response = get(edge, "svc.local", "/rejected").await;
    assert_eq!(response.status, 503);
    assert_eq!(response.header("x-postern-overloaded"), Some("true"));
    assert_eq!(backend.started(), 1, "the rejected request is not sent");

    let response = within(Duration::from_secs(10), "the slow request", slow)
        .await
        .unwrap();
    assert_eq!(response.status, 200);
    assert_eq!(response.header("x-postern-overloaded"), None);

    // Capacity is back.
    let response = get(edge, "svc.local", "/after").await;
    assert_eq!(response.status, 200);
    assert_eq!(response.header("x-postern-overloaded"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_limit_queues_then_overflows_pending_requests() {
    let backend = HttpBackend::start("b").await;
    let cluster = "    circuit_breaker:
      max_connections: 1
      max_pending_requests: 1";
    let proxy = start_proxy(&one_route("", cluster, &[backend.addr()])).await;
    let edge = listener(&proxy, "edge");

    // The slow request holds the only connection long enough for two more to
    // arrive: whichever comes first waits, the other finds the queue full.
    backend.script([Reply::delay(Duration::from_millis(3000))]);
    let slow = tokio::spawn(async move { get(edge, "svc.local", "/slow").await });
    let b = &backend;
    wait_until(
        "the slow request to hold the only connection",
        || async move { b.in_flight() == 1 },
    )
    .await;
    let first = tokio::spawn(async move { get(edge, "svc.local", "/queued").await });
    let second = tokio::spawn(async move { get(edge, "svc.local", "/queued").await });
    let first = within(Duration::from_secs(10), "first", first)
        .await
        .unwrap();
    let second = within(Duration::from_secs(10), "second", second)
        .await
        .unwrap();
    let mut statuses = [first.status.as_u16(), second.status.as_u16()];
    statuses.sort_unstable();
    assert_eq!(statuses, [200, 503]);
    let overflow = if first.status == 503 { &first } else { &second };
    assert_eq!(overflow.header("x-postern-overloaded"), Some("true"));

    let slow = within(Duration::from_secs(10), "the slow request", slow)
        .await
        .unwrap();
    assert_eq!(slow.status, 200);
    assert_eq!(
        backend.connections(),
        1,
        "one upstream connection served both"
    );
    assert_eq!(backend.started(), 2, "the overflowing request is not sent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outlier_detection_ejects_after_consecutive_5xx_and_returns_after_ejection_time() {
    const EJECTION: Duration = Duration::from_millis(1000);
    let good = HttpBackend::start("good").await;
    let bad = HttpBackend::start("bad").await;
    bad.set_default(Some(Reply::status(500)));
    let cluster = "    outlier_detection:
      consecutive_5xx: 2
      consecutive_connect_failures: 0
      base_ejection_time: 1s
      max_ejection_time: 1s
      max_ejection_percent: 50";
    let proxy = start_proxy(&one_route("", cluster, &[good.addr(), bad.addr()])).await;
    let edge = listener(&proxy, "edge");
    let mut conn = H1Conn::connect(edge).await.unwrap();
    let req = || request("GET", "svc.local", "/").body(empty()).unwrap();

    // Round robin: the bad endpoint gets every other request until its
    // second consecutive 500 ejects it.
    let mut ejected_no_earlier_than = None;
    for _ in 0..10 {
        let sent = Instant::now();
        let response = conn.send(req()).await.unwrap();
        if response.backend() == Some("bad") {
            assert_eq!(response.status, 500);
        }
        if bad.started() == 2 {
            ejected_no_earlier_than = Some(sent);
            break;
        }
    }
    let ejected = ejected_no_earlier_than.expect("the bad endpoint got two requests");

    // While ejected, only the good endpoint answers.
    let mut in_window = 0;
    for i in 0..10 {
        let response = conn.send(req()).await.unwrap();
        if ejected.elapsed() < EJECTION {
            in_window += 1;
            assert_eq!(response.status, 200, "request {i} after ejection");
            assert_eq!(
                response.backend(),
                Some("good"),
                "request {i} after ejection"
            );
        }
    }
    assert!(
        in_window >= 5,
        "only {in_window} requests fit in the ejection window"
    );
    assert_eq!(bad.started(), 2);

    // Healthy again: it gets traffic once the ejection time has passed, and
    // not before.
    bad.set_default(None);
    let deadline = Instant::now() + Duration::from_secs(10);
    let returned_at = loop {
        assert!(
            Instant::now() < deadline,
            "the ejected endpoint never returned"
        );
        let response = conn.send(req()).await.unwrap();
        // Taken after the answer, so no earlier than the endpoint was picked.
        let answered = Instant::now();
        assert_eq!(response.status, 200);
        if response.backend() == Some("bad") {
            break answered;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert!(
        returned_at.duration_since(ejected) >= EJECTION,
        "back after {:?}, the ejection lasts {EJECTION:?}",
        returned_at.duration_since(ejected)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outlier_detection_ejects_on_connect_failures_and_503_when_none_healthy() {
    let good = HttpBackend::start("good").await;
    let dead = dead_addr();
    let g = good.addr();
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
                  - match:
                      path: {{ prefix: /mixed }}
                    cluster: mixed
                  - match:
                      path: {{ prefix: /alone }}
                    cluster: alone
        clusters:
          - name: mixed
            connect_timeout: 1s
            endpoints:
              - address: "{dead}"
              - address: "{g}"
            outlier_detection:
              consecutive_connect_failures: 1
              consecutive_5xx: 0
              base_ejection_time: 30s
              max_ejection_percent: 50
          - name: alone
            connect_timeout: 1s
            endpoints:
              - address: "{dead}"
            outlier_detection:
              consecutive_connect_failures: 1
              base_ejection_time: 30s
              max_ejection_percent: 100
        "#
    ))
    .await;
    let edge = listener(&proxy, "edge");

    let mut failures = 0;
    for _ in 0..2 {
        let response = get(edge, "svc.local", "/mixed").await;
        if response.status == 502 {
            failures += 1;
        } else {
            assert_eq!(response.status, 200);
        }
    }
    assert_eq!(
        failures, 1,
        "round robin tries the dead endpoint once in two"
    );
    for i in 0..10 {
        let response = get(edge, "svc.local", "/mixed").await;
        assert_eq!(
            response.status, 200,
            "request {i}: the dead endpoint is ejected"
        );
    }

    assert_eq!(get(edge, "svc.local", "/alone").await.status, 502);
    let response = get(edge, "svc.local", "/alone").await;
    assert_eq!(
        response.status, 503,
        "the only endpoint is ejected: no healthy endpoint"
    );
    assert_eq!(response.header("x-postern-overloaded"), None);
}

fn grpc_proxy_config(grpc: std::net::SocketAddr, dead: std::net::SocketAddr) -> String {
    format!(
        r#"
        listeners:
          - name: edge
            address: 127.0.0.1:0
            kind: http
            virtual_hosts:
              - name: all
                domains: ["*"]
                routes:
                  - match:
                      headers: [{{ name: x-case, exact: pass }}]
                    cluster: grpc
                  - match:
                      headers: [{{ name: x-case, exact: slow }}]
                    cluster: grpc
                    timeout: 200ms
                  - match:
                      headers: [{{ name: x-case, exact: dead }}]
                    cluster: dead
                  - match:
                      headers: [{{ name: x-case, exact: busy }}]
                    cluster: busy
        clusters:
          - name: busy
            protocol: http2
            endpoints: [{{ address: "{grpc}" }}]
            circuit_breaker: {{ max_requests: 1 }}
          - name: grpc
            protocol: http2
            endpoints: [{{ address: "{grpc}" }}]
          - name: dead
            protocol: http2
            connect_timeout: 1s
            endpoints: [{{ address: "{dead}" }}]
        "#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_errors_become_grpc_status() {
    let backend = GrpcBackend::start("grpc").await;
    let proxy = start_proxy(&grpc_proxy_config(backend.addr(), dead_addr())).await;
    let edge = listener(&proxy, "edge");
    let mut client = grpc::client(edge).await.unwrap();
    let call = grpc_call;

    let reply = client.say(call("pass", "hi")).await.unwrap().into_inner();
    assert_eq!(reply.message, "hi");
    // A status from the backend passes through.
    let status = client.say(call("pass", "status:5")).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound);
    // Errors raised by the proxy.
    let status = client.say(call("dead", "hi")).await.unwrap_err();
    assert_eq!(
        status.code(),
        tonic::Code::Unavailable,
        "connect failure: {status:?}"
    );
    let status = client.say(call("slow", "sleep:3000")).await.unwrap_err();
    assert_eq!(
        status.code(),
        tonic::Code::DeadlineExceeded,
        "timeout: {status:?}"
    );
    let status = client.say(call("none", "hi")).await.unwrap_err();
    assert_eq!(
        status.code(),
        tonic::Code::Unimplemented,
        "no route: {status:?}"
    );
}

fn grpc_call(case: &str, message: &str) -> tonic::Request<EchoRequest> {
    let mut req = tonic::Request::new(EchoRequest {
        message: message.to_owned(),
        repeat: 0,
    });
    req.metadata_mut()
        .insert("x-case", case.parse().expect("ASCII metadata"));
    req
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_overload_is_resource_exhausted() {
    let backend = GrpcBackend::start("grpc").await;
    let proxy = start_proxy(&grpc_proxy_config(backend.addr(), dead_addr())).await;
    let edge = listener(&proxy, "edge");
    let mut client = grpc::client(edge).await.unwrap();
    let call = grpc_call;

    // Circuit breaker open: RESOURCE_EXHAUSTED. One slow call holds the only
    // slot; poll with quick calls until one is turned away. A quick call may
    // hold the slot at the moment the slow one arrives and turn it away
    // instead: then the slow call is sent again.
    let slow_call = |client: &grpc::pb::echo_client::EchoClient<tonic::transport::Channel>| {
        let mut client = client.clone();
        tokio::spawn(async move { client.say(grpc_call("busy", "sleep:5000")).await })
    };
    let mut slow = slow_call(&client);
    let deadline = std::time::Instant::now() + Duration::from_secs(8);
    let overloaded = loop {
        assert!(
            std::time::Instant::now() < deadline,
            "no call was turned away while the slow one held the slot"
        );
        if slow.is_finished() {
            let lost = slow.await.unwrap().unwrap_err();
            assert_eq!(lost.code(), tonic::Code::ResourceExhausted, "{lost:?}");
            slow = slow_call(&client);
            continue;
        }
        match client.say(call("busy", "hi")).await {
            Ok(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            Err(status) => break status,
        }
    };
    assert_eq!(
        overloaded.code(),
        tonic::Code::ResourceExhausted,
        "circuit breaker: {overloaded:?}"
    );
    let reply = within(Duration::from_secs(10), "the slow call", slow)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(reply.into_inner().message, "sleep:5000");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_errors_are_trailers_only_responses() {
    let backend = GrpcBackend::start("grpc").await;
    let proxy = start_proxy(&grpc_proxy_config(backend.addr(), dead_addr())).await;
    let edge = listener(&proxy, "edge");
    let mut h2 = H2Conn::connect(edge).await.unwrap();
    for (case, code) in [("dead", "14"), ("none", "12")] {
        // An empty EchoRequest: one uncompressed, zero-length message.
        let req = request("POST", "svc.local", "/postern.test.echo.Echo/Say")
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .header("x-case", case)
            .body(full(vec![0u8; 5]))
            .unwrap();
        let response = h2.send(req).await.unwrap();
        assert_eq!(
            response.status, 200,
            "{case}: gRPC errors travel in grpc-status"
        );
        assert_eq!(
            response.header("grpc-status"),
            Some(code),
            "{case}: {:?}",
            response.headers
        );
        assert!(
            response
                .header("content-type")
                .is_some_and(|v| v.starts_with("application/grpc")),
            "{case}: {:?}",
            response.headers
        );
        assert!(
            response.body.is_empty(),
            "{case}: trailers-only has no body"
        );
        assert!(
            response.trailers.is_none(),
            "{case}: trailers-only has no separate trailers"
        );
    }

    // The same over HTTP/1.1 to a non-gRPC request is a plain status.
    let response = send(
        edge,
        request("POST", "svc.local", "/x")
            .header("x-case", "dead")
            .body(empty())
            .unwrap(),
    )
    .await;
    assert_eq!(response.status, 502);
    assert_eq!(response.header("grpc-status"), None);
}

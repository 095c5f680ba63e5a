//! Per-call telemetry end to end: Istio's standard metrics on both sides of
//! a two-sidecar mTLS hop after a scripted set of calls, `promtool` and a
//! real Prometheus server reading `/metrics`, and access-log lines with
//! their fields, redaction, filter and sampling.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use postern_tests::http_backend::Reply;
use postern_tests::mesh::TestCa;
use postern_tests::prom::{parse_metrics, sum};
use postern_tests::tcp_backend::TcpBackend;
use postern_tests::{get, listener, send, start_proxy, wait_until, within, HttpBackend, Proxy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CLIENT_ID: &str = "spiffe://cluster.local/ns/shop/sa/productpage";
const SERVER_ID: &str = "spiffe://cluster.local/ns/shop/sa/reviews";
const SERVICE: &str = "reviews.shop.svc.cluster.local";

fn file_identity(ca: &TestCa, dir: &Path, name: &str, id: &str) -> String {
    let files = ca.write_identity(dir, name, id);
    format!(
        "  spiffe_id: {id}\n  source:\n    files: {{ cert: {}, key: {}, bundle: {} }}",
        files.cert.display(),
        files.key.display(),
        files.bundle.display()
    )
}

async fn start_ready(yaml: &str) -> Proxy {
    let proxy = start_proxy(yaml).await;
    within(Duration::from_secs(15), "identity loaded", proxy.ready()).await;
    proxy
}

async fn metrics_text(admin: SocketAddr) -> String {
    let response = get(admin, "admin", "/metrics").await;
    assert_eq!(response.status, 200);
    String::from_utf8(response.body.to_vec()).expect("utf-8 metrics")
}

/// Runs `promtool check metrics` on `text`. Istio's fixed name
/// `istio_request_duration_milliseconds` draws promtool's base-unit lint;
/// dashboards need that exact name, so that one finding is allowed and
/// any other fails the test.
fn promtool_check(text: &str) {
    use std::io::Write;
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool is needed (Debian package prometheus; .ci/run installs it)");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write metrics to promtool");
    let out = child.wait_with_output().expect("promtool ran");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let problems: Vec<&str> = report
        .lines()
        .filter(|l| !l.trim().is_empty())
        .filter(|l| {
            !l.starts_with(
                "istio_request_duration_milliseconds use base unit \"seconds\" instead of \"milliseconds\"",
            )
        })
        .collect();
    assert!(
        matches!(out.status.code(), Some(0) | Some(3)) && problems.is_empty(),
        "promtool check metrics: {:?}\n{report}",
        out.status
    );
}

struct Mesh {
    client: Proxy,
    server: Proxy,
    app: HttpBackend,
    _grpc: postern_tests::grpc::GrpcBackend,
    _echo: TcpBackend,
    _dir: tempfile::TempDir,
}

async fn start_mesh(prefix: &str, service: &str) -> Mesh {
    let ca = TestCa::new("telemetry");
    let dir = tempfile::tempdir().expect("tempdir");
    let app = HttpBackend::start("reviews").await;
    let grpc = postern_tests::grpc::GrpcBackend::start("grpc").await;
    let echo = TcpBackend::echo().await;
    let server = start_ready(&format!(
        r#"
identity:
{identity}
telemetry:
  workload: {{ name: reviews-v1, namespace: shop, app: reviews, version: v1 }}
listeners:
  - name: {prefix}-in
    address: 127.0.0.1:0
    kind: http
    mtls: {{ mode: strict }}
    http:
      rbac:
        rules:
          action: deny
          policies:
            - name: no-forbidden
              permissions: [{{ path: {{ prefix: /forbidden }} }}]
              principals: [{{ any: true }}]
    virtual_hosts:
      - name: all
        domains: ["*"]
        routes:
          - name: limited
            match: {{ path: {{ prefix: /limited }} }}
            cluster: "inbound|9080||{service}"
            local_rate_limit: {{ max_tokens: 1, fill_interval: 1h }}
          - name: default
            match: {{}}
            cluster: "inbound|9080||{service}"
  - name: {prefix}-grpc-in
    address: 127.0.0.1:0
    kind: http
    mtls: {{ mode: strict }}
    virtual_hosts:
      - name: all
        domains: ["*"]
        routes:
          - match: {{}}
            cluster: "inbound|9090||{service}"
  - name: {prefix}-tcp-in
    address: 127.0.0.1:0
    kind: tcp
    mtls: {{ mode: strict }}
    tcp: {{ cluster: "inbound|7000||{service}" }}
clusters:
  - name: "inbound|9080||{service}"
    endpoints: [{{ address: "{app}" }}]
  - name: "inbound|9090||{service}"
    protocol: http2
    endpoints: [{{ address: "{grpc}" }}]
  - name: "inbound|7000||{service}"
    endpoints: [{{ address: "{echo}" }}]
"#,
        identity = file_identity(&ca, dir.path(), "server", SERVER_ID),
        app = app.addr(),
        grpc = grpc.addr(),
        echo = echo.addr(),
    ))
    .await;
    let mesh_cluster = |name: &str, to: SocketAddr| {
        format!(
            r#"
  - name: "{name}"
    endpoints: [{{ address: "{to}" }}]
    tls: {{ mode: mesh, identities: ["{SERVER_ID}"] }}"#
        )
    };
    let client = start_ready(&format!(
        r#"
identity:
{identity}
telemetry:
  workload: {{ name: productpage-v1, namespace: shop, app: productpage, version: v1 }}
listeners:
  - name: {prefix}-out
    address: 127.0.0.1:0
    kind: http
    virtual_hosts:
      - name: all
        domains: ["*"]
        routes:
          - name: slow
            match: {{ path: {{ prefix: /slow }} }}
            cluster: "outbound|9080||{service}"
            timeout: 200ms
          - name: default
            match: {{}}
            cluster: "outbound|9080||{service}"
  - name: {prefix}-grpc-out
    address: 127.0.0.1:0
    kind: http
    virtual_hosts:
      - name: all
        domains: ["*"]
        routes:
          - match: {{}}
            cluster: "outbound|9090||{service}"
  - name: {prefix}-tcp-out
    address: 127.0.0.1:0
    kind: tcp
    tcp: {{ cluster: "outbound|7000||{service}" }}
clusters:{http}{grpc}{tcp}
"#,
        identity = file_identity(&ca, dir.path(), "client", CLIENT_ID),
        http = mesh_cluster(
            &format!("outbound|9080||{service}"),
            listener(&server, &format!("{prefix}-in"))
        ),
        grpc = mesh_cluster(
            &format!("outbound|9090||{service}"),
            listener(&server, &format!("{prefix}-grpc-in"))
        ),
        tcp = mesh_cluster(
            &format!("outbound|7000||{service}"),
            listener(&server, &format!("{prefix}-tcp-in"))
        ),
    ))
    .await;
    Mesh {
        client,
        server,
        app,
        _grpc: grpc,
        _echo: echo,
        _dir: dir,
    }
}

fn count(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    sum(&parse_metrics(text), name, labels)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istio_metrics_on_both_sidecars_after_scripted_calls() {
    let _recorder = postern::telemetry::install_prometheus_recorder();
    let mesh = start_mesh("istio", SERVICE).await;
    let out = listener(&mesh.client, "istio-out");

    // Success, 4xx, 5xx from the app; a route timeout; a rate-limited and
    // an RBAC-denied call at the server sidecar.
    assert_eq!(get(out, SERVICE, "/ok").await.status, 200);
    mesh.app.script([Reply::status(404), Reply::status(503)]);
    assert_eq!(get(out, SERVICE, "/missing").await.status, 404);
    assert_eq!(get(out, SERVICE, "/broken").await.status, 503);
    mesh.app.script([Reply::delay(Duration::from_secs(2))]);
    assert_eq!(get(out, SERVICE, "/slow").await.status, 504);
    assert_eq!(get(out, SERVICE, "/limited").await.status, 200);
    assert_eq!(get(out, SERVICE, "/limited").await.status, 429);
    assert_eq!(get(out, SERVICE, "/forbidden").await.status, 403);

    // A gRPC error status, passed through both sidecars.
    let mut grpc = postern_tests::grpc::client(listener(&mesh.client, "istio-grpc-out"))
        .await
        .expect("grpc client");
    let status = grpc
        .say(postern_tests::grpc::pb::EchoRequest {
            message: "status:5".into(),
            ..Default::default()
        })
        .await
        .expect_err("status 5 requested");
    assert_eq!(status.code(), tonic::Code::NotFound);

    // A TCP connection: 5 bytes each way.
    let mut tcp = tokio::net::TcpStream::connect(listener(&mesh.client, "istio-tcp-out"))
        .await
        .expect("tcp connect");
    tcp.write_all(b"hello").await.expect("write");
    let mut echoed = [0u8; 5];
    tcp.read_exact(&mut echoed).await.expect("echo");
    drop(tcp);

    let peers_source = [
        ("reporter", "source"),
        ("source_workload", "productpage-v1"),
        ("source_workload_namespace", "shop"),
        ("source_principal", CLIENT_ID),
        ("source_app", "productpage"),
        ("source_version", "v1"),
        ("destination_workload", "reviews-v1"),
        ("destination_workload_namespace", "shop"),
        ("destination_principal", SERVER_ID),
        ("destination_app", "reviews"),
        ("destination_service", SERVICE),
        ("destination_service_name", "reviews"),
        ("destination_service_namespace", "shop"),
        ("connection_security_policy", "mutual_tls"),
    ];
    let client_admin = mesh.client.admin_addr();
    let server_admin = mesh.server.admin_addr();
    // The TCP and timed-out calls finish on their own schedule.
    wait_until("client and server recorded every call", || async {
        let client = metrics_text(client_admin).await;
        let server = metrics_text(server_admin).await;
        count(&client, "istio_requests_total", &[("reporter", "source")]) >= 8.0
            && count(
                &server,
                "istio_tcp_connections_closed_total",
                &[("reporter", "destination"), ("source_principal", CLIENT_ID)],
            ) >= 1.0
            && count(
                &client,
                "istio_tcp_connections_closed_total",
                &[("reporter", "source"), ("destination_principal", SERVER_ID)],
            ) >= 1.0
    })
    .await;

    let client = metrics_text(client_admin).await;
    let with = |extra: &[(&'static str, &'static str)]| {
        let mut labels = peers_source.to_vec();
        labels.extend_from_slice(extra);
        labels
    };
    for (code, flags, n) in [
        ("200", "-", 2.0),
        ("404", "-", 1.0),
        ("503", "-", 1.0),
        ("504", "UT", 1.0),
        ("429", "-", 1.0),
        ("403", "-", 1.0),
    ] {
        let labels = with(&[
            ("request_protocol", "http"),
            ("response_code", code),
            ("response_flags", flags),
        ]);
        assert_eq!(
            count(&client, "istio_requests_total", &labels),
            n,
            "client side, {code} {flags}\n{client}"
        );
    }
    let grpc_labels = with(&[
        ("request_protocol", "grpc"),
        ("response_code", "200"),
        ("grpc_response_status", "5"),
    ]);
    assert_eq!(count(&client, "istio_requests_total", &grpc_labels), 1.0);
    assert_eq!(
        count(
            &client,
            "istio_request_duration_milliseconds_count",
            &with(&[("response_code", "504")])
        ),
        1.0
    );
    assert!(
        count(
            &client,
            "istio_request_duration_milliseconds_sum",
            &with(&[("response_code", "504")])
        ) >= 200.0,
        "the timed-out call lasted at least the 200ms route timeout"
    );
    let tcp_source = [
        ("reporter", "source"),
        ("source_workload", "productpage-v1"),
        ("destination_principal", SERVER_ID),
        ("destination_service", SERVICE),
        ("request_protocol", "tcp"),
        ("connection_security_policy", "mutual_tls"),
    ];
    assert_eq!(
        count(&client, "istio_tcp_connections_opened_total", &tcp_source),
        1.0
    );
    assert_eq!(
        count(&client, "istio_tcp_sent_bytes_total", &tcp_source),
        5.0
    );
    assert_eq!(
        count(&client, "istio_tcp_received_bytes_total", &tcp_source),
        5.0
    );

    let server = metrics_text(server_admin).await;
    let dest = |extra: &[(&'static str, &'static str)]| {
        let mut labels = vec![
            ("reporter", "destination"),
            ("source_workload", "productpage-v1"),
            ("source_workload_namespace", "shop"),
            ("source_principal", CLIENT_ID),
            ("destination_workload", "reviews-v1"),
            ("destination_principal", SERVER_ID),
            ("destination_service", SERVICE),
            ("connection_security_policy", "mutual_tls"),
        ];
        labels.extend_from_slice(extra);
        labels
    };
    for (code, flags) in [("200", "-"), ("429", "RL")] {
        assert!(
            count(
                &server,
                "istio_requests_total",
                &dest(&[("response_code", code), ("response_flags", flags)])
            ) >= 1.0,
            "server side, {code} {flags}\n{server}"
        );
    }
    // Refused before any route: no service was chosen.
    let mut denied = dest(&[("response_code", "403"), ("response_flags", "RBAC")]);
    denied.retain(|(k, _)| *k != "destination_service");
    denied.push(("destination_service", "unknown"));
    assert_eq!(
        count(&server, "istio_requests_total", &denied),
        1.0,
        "{server}"
    );
    assert_eq!(
        count(
            &server,
            "istio_requests_total",
            &dest(&[("request_protocol", "grpc"), ("grpc_response_status", "5")])
        ),
        1.0
    );
    assert_eq!(
        count(
            &server,
            "istio_tcp_received_bytes_total",
            // TCP carries no metadata: the caller is known by its certificate.
            &[
                ("reporter", "destination"),
                ("source_workload", "unknown"),
                ("source_workload_namespace", "shop"),
                ("source_principal", CLIENT_ID),
                ("destination_workload", "reviews-v1"),
                ("request_protocol", "tcp"),
                ("connection_security_policy", "mutual_tls"),
            ]
        ),
        5.0
    );
    // No label carries a path, an address or a request id.
    for sample in parse_metrics(&client)
        .iter()
        .chain(parse_metrics(&server).iter())
    {
        for (key, value) in &sample.labels {
            assert!(
                !value.starts_with('/') && !value.contains("127.0.0.1"),
                "unbounded label {key}={value} on {}",
                sample.name
            );
        }
    }
    promtool_check(&client);
    promtool_check(&server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_server_scrapes_the_admin_endpoint() {
    let _recorder = postern::telemetry::install_prometheus_recorder();
    let mesh = start_mesh("scrape", "ratings.shop.svc.cluster.local").await;
    let out = listener(&mesh.client, "scrape-out");
    assert_eq!(get(out, "ratings", "/ok").await.status, 200);

    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: postern\n    metrics_path: /metrics\n    static_configs:\n      - targets: [\"{}\", \"{}\"]\n",
            mesh.client.admin_addr(),
            mesh.server.admin_addr()
        ),
    )
    .expect("write prometheus.yml");
    let mut prometheus = tokio::process::Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg("--web.listen-address=127.0.0.1:0")
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("prometheus is needed (Debian package prometheus; .ci/run installs it)");
    // Prometheus logs the port it was given for 127.0.0.1:0.
    let stderr = prometheus.stderr.take().expect("stderr");
    let api: SocketAddr = within(Duration::from_secs(30), "prometheus listening", async {
        use tokio::io::AsyncBufReadExt;
        let mut lines = tokio::io::BufReader::new(stderr).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if line.contains("msg=\"Listening on\"") {
                if let Some(addr) = line.split("address=").nth(1) {
                    // Keep reading: Go exits on a write to a closed stderr.
                    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
                    return addr.trim().parse().expect("listen address");
                }
            }
        }
        panic!("prometheus exited before listening");
    })
    .await;

    // Prometheus may log its address a moment before it serves the API, so
    // a refused query is just "not yet".
    let query = |q: &'static str| async move {
        let target = format!(
            "/api/v1/query?query={}",
            q.replace('{', "%7B")
                .replace('}', "%7D")
                .replace('"', "%22")
                .replace('=', "%3D")
                .replace(' ', "%20")
        );
        let Ok(mut stream) = tokio::net::TcpStream::connect(api).await else {
            return serde_json::Value::Null;
        };
        let request = format!("GET {target} HTTP/1.0\r\nhost: prometheus\r\n\r\n");
        if stream.write_all(request.as_bytes()).await.is_err() {
            return serde_json::Value::Null;
        }
        let mut raw = Vec::new();
        let _ = stream.read_to_end(&mut raw).await;
        let text = String::from_utf8_lossy(&raw);
        text.split_once("\r\n\r\n")
            .and_then(|(_, body)| serde_json::from_str(body).ok())
            .unwrap_or_default()
    };
    wait_until("prometheus scraped both sidecars", || async {
        let up = query("up{job=\"postern\"} == 1").await;
        let series = query("istio_requests_total{reporter=\"destination\"}").await;
        up["data"]["result"].as_array().map_or(0, Vec::len) == 2
            && series["data"]["result"]
                .as_array()
                .is_some_and(|r| !r.is_empty())
    })
    .await;
    let series = query("istio_requests_total{reporter=\"source\"}").await;
    let metric = &series["data"]["result"][0]["metric"];
    assert_eq!(metric["destination_principal"], SERVER_ID, "{series}");
    assert_eq!(metric["source_workload"], "productpage-v1", "{series}");
    let _ = prometheus.kill().await;
}

fn read_lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("each line is JSON"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_lines_carry_the_fields_and_redact_secrets() {
    let _recorder = postern::telemetry::install_prometheus_recorder();
    let app = HttpBackend::start("app").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("access.log");
    let proxy = start_proxy(&format!(
        r#"
telemetry:
  access_log:
    output: {log}
    request_headers: [authorization, x-tenant, x-secret]
    redact_headers: [x-secret]
    redact_query: [sig]
listeners:
  - name: alog
    address: 127.0.0.1:0
    kind: http
    virtual_hosts:
      - name: all
        domains: ["*"]
        routes:
          - name: errors-only
            match: {{ path: {{ prefix: /quiet }} }}
            cluster: app
            access_log: {{ filter: errors }}
          - name: never
            match: {{ path: {{ prefix: /unsampled }} }}
            cluster: app
            access_log: {{ sample: 0 }}
          - name: main
            match: {{}}
            cluster: app
clusters:
  - name: app
    endpoints: [{{ address: "{app}" }}]
"#,
        log = log.display(),
        app = app.addr(),
    ))
    .await;
    let addr = listener(&proxy, "alog");
    let response = send(
        addr,
        http::Request::post("/a/../items?api_key=s3cret&sig=abc&page=2")
            .header("host", "shop.example")
            .header("authorization", "Bearer top-secret")
            .header("cookie", "session=also-secret")
            .header("x-tenant", "acme")
            .header("x-secret", "hidden")
            .header("user-agent", "telemetry-test")
            .body(postern_tests::client::full("12345"))
            .expect("request"),
    )
    .await;
    assert_eq!(response.status, 200);
    let request_id = app
        .last_request()
        .header("x-request-id")
        .expect("request id")
        .to_string();
    assert_eq!(get(addr, "shop.example", "/quiet/fine").await.status, 200);
    app.script([Reply::status(500)]);
    assert_eq!(get(addr, "shop.example", "/quiet/broken").await.status, 500);
    for _ in 0..5 {
        assert_eq!(get(addr, "shop.example", "/unsampled").await.status, 200);
    }

    wait_until("two lines written", || async {
        read_lines(&log).len() >= 2
    })
    .await;
    // The unsampled calls are finished too once a later call is logged.
    assert_eq!(get(addr, "shop.example", "/last").await.status, 200);
    wait_until("three lines written", || async {
        read_lines(&log).len() >= 3
    })
    .await;
    let lines = read_lines(&log);
    assert_eq!(lines.len(), 3, "{lines:#?}");
    let first = &lines[0];
    assert_eq!(first["method"], "POST");
    assert_eq!(first["authority"], "shop.example");
    assert_eq!(
        first["path"], "/items?api_key=[REDACTED]&sig=[REDACTED]&page=2",
        "normalised, secrets redacted"
    );
    assert_eq!(first["protocol"], "HTTP/1.1");
    assert_eq!(first["status"], 200);
    assert_eq!(first["flags"], "-");
    assert_eq!(first["bytes_received"], 5);
    assert!(first["bytes_sent"].as_u64().is_some());
    assert!(first["duration_ms"].as_f64().is_some());
    assert!(first["upstream_ttfb_ms"].as_f64().is_some());
    assert_eq!(first["upstream_host"], app.addr().to_string());
    assert_eq!(first["cluster"], "app");
    assert_eq!(first["route"], "main");
    assert_eq!(first["listener"], "alog");
    assert_eq!(first["request_id"], request_id.as_str());
    assert_eq!(first["user_agent"], "telemetry-test");
    assert_eq!(first["req_authorization"], "[REDACTED]");
    assert_eq!(first["req_x-secret"], "[REDACTED]");
    assert_eq!(first["req_x-tenant"], "acme");
    assert!(first["start_time"]
        .as_str()
        .is_some_and(|t| t.ends_with('Z')));
    let text = std::fs::read_to_string(&log).expect("log");
    for secret in ["top-secret", "also-secret", "s3cret", "hidden"] {
        assert!(!text.contains(secret), "{secret} leaked: {text}");
    }
    assert_eq!(lines[1]["path"], "/quiet/broken");
    assert_eq!(lines[1]["status"], 500);
    assert_eq!(lines[2]["path"], "/last");
}

/// Two sidecars with tracing to `receiver`: the client's outbound listener
/// in plain HTTP, mesh mTLS to the server's inbound listener, then `app`.
async fn traced_pair(
    ca: &TestCa,
    dir: &Path,
    receiver: &postern_tests::otlp::OtlpReceiver,
    app: SocketAddr,
) -> (Proxy, Proxy) {
    let tracing = format!(
        "telemetry:\n  tracing: {{ collector: \"{}\", export_interval: 50ms }}",
        receiver.endpoint()
    );
    let server = start_ready(&format!(
        r#"
identity:
{identity}
{tracing}
listeners:
  - name: traced-in
    address: 127.0.0.1:0
    kind: http
    mtls: {{ mode: strict }}
    tracing: {{ sampling: 0 }}
    virtual_hosts:
      - name: all
        domains: ["*"]
        routes:
          - name: app
            match: {{}}
            cluster: app
clusters:
  - name: app
    endpoints: [{{ address: "{app}" }}]
"#,
        identity = file_identity(ca, dir, "traced-server", SERVER_ID),
    ))
    .await;
    let client = start_ready(&format!(
        r#"
identity:
{identity}
{tracing}
listeners:
  - name: traced-out
    address: 127.0.0.1:0
    kind: http
    tracing: {{ sampling: 1 }}
    virtual_hosts:
      - name: all
        domains: ["*"]
        routes:
          - name: to-reviews
            match: {{}}
            cluster: reviews
clusters:
  - name: reviews
    endpoints: [{{ address: "{server}" }}]
    tls: {{ mode: mesh, identities: ["{SERVER_ID}"] }}
"#,
        identity = file_identity(ca, dir, "traced-client", CLIENT_ID),
        server = listener(&server, "traced-in"),
    ))
    .await;
    (client, server)
}

/// `GET path` to the traced pair with the given trace headers; the status.
async fn traced_get(out: SocketAddr, path: &str, headers: &[(&str, String)]) -> u16 {
    let mut request = http::Request::get(path).header("host", "reviews");
    for (name, value) in headers {
        request = request.header(*name, value.as_str());
    }
    let response = send(
        out,
        request
            .body(postern_tests::client::empty())
            .expect("request"),
    )
    .await;
    response.status.as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_context_continues_through_two_sidecars() {
    let _recorder = postern::telemetry::install_prometheus_recorder();
    let receiver = postern_tests::otlp::OtlpReceiver::start().await;
    let app = HttpBackend::start("app").await;
    let ca = TestCa::new("tracing");
    let dir = tempfile::tempdir().expect("tempdir");
    let (client, _server) = traced_pair(&ca, dir.path(), &receiver, app.addr()).await;
    let out = listener(&client, "traced-out");

    // A caller's W3C context, sampled: both sidecars continue it.
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    assert_eq!(
        traced_get(
            out,
            "/items?page=1",
            &[
                ("traceparent", format!("00-{trace}-{caller_span}-01")),
                ("tracestate", "vendor=kept".to_string())
            ]
        )
        .await,
        200
    );
    let spans = receiver.wait_for_spans(2, Duration::from_secs(10)).await;
    let client_span = spans
        .iter()
        .find(|s| s.parent_span_id() == caller_span)
        .expect("the client sidecar's span is a child of the caller's");
    let server_span = spans
        .iter()
        .find(|s| s.parent_span_id() == client_span.span_id())
        .expect("the server sidecar's span is a child of the client sidecar's");
    assert_eq!(client_span.trace_id(), trace);
    assert_eq!(server_span.trace_id(), trace);
    use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
    assert_eq!(client_span.kind(), SpanKind::Client);
    assert_eq!(server_span.kind(), SpanKind::Server);
    assert_eq!(server_span.str_attr("http.request.method"), Some("GET"));
    assert_eq!(server_span.str_attr("url.path"), Some("/items"));
    assert_eq!(server_span.int_attr("http.response.status_code"), Some(200));
    assert_eq!(server_span.str_attr("postern.route"), Some("app"));
    assert_eq!(
        server_span.str_attr("postern.peer.principal"),
        Some(CLIENT_ID)
    );
    assert_eq!(client_span.str_attr("postern.cluster"), Some("reviews"));
    // The app sees the trace continued from the server sidecar's span.
    let seen = app.last_request();
    let parent = seen
        .header("traceparent")
        .expect("traceparent reaches the app");
    assert_eq!(
        parent,
        format!("00-{trace}-{}-01", server_span.span_id()),
        "the app's parent is the server sidecar's span"
    );
    assert_eq!(seen.header("tracestate"), Some("vendor=kept"));

    // B3 single header in, B3 continued out (with W3C alongside).
    let b3_trace = "80f198ee56343ba864fe8b2a57d3eff7";
    assert_eq!(
        traced_get(
            out,
            "/b3",
            &[("b3", format!("{b3_trace}-e457b5a2e4d86bd1-1"))]
        )
        .await,
        200
    );
    let seen = app.last_request();
    let b3 = seen.header("b3").expect("b3 continued");
    assert!(b3.starts_with(&format!("{b3_trace}-")), "{b3}");
    assert!(!b3.contains("e457b5a2e4d86bd1"), "a new span id: {b3}");
    assert!(seen
        .header("traceparent")
        .is_some_and(|t| t.contains(b3_trace)));
    receiver.wait_for_spans(4, Duration::from_secs(10)).await;

    // Not sampled by the caller: context still flows, nothing is exported.
    let quiet = "0af7651916cd43dd8448eb211c80319c";
    assert_eq!(
        traced_get(
            out,
            "/quiet",
            &[("traceparent", format!("00-{quiet}-b7ad6b7169203331-00"))]
        )
        .await,
        200
    );
    let seen = app.last_request();
    let parent = seen.header("traceparent").expect("traceparent");
    assert!(
        parent.contains(quiet) && parent.ends_with("-00"),
        "{parent}"
    );
    // One more sampled call flushes behind it; the unsampled trace never shows.
    assert_eq!(
        traced_get(
            out,
            "/after",
            &[("traceparent", format!("00-{trace}-{caller_span}-01"))]
        )
        .await,
        200
    );
    let spans = receiver.wait_for_spans(6, Duration::from_secs(10)).await;
    assert!(spans.iter().all(|s| s.trace_id() != quiet));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_stream_to_the_collector_and_traffic_ignores_a_dead_one() {
    let _recorder = postern::telemetry::install_prometheus_recorder();
    let collector = postern_tests::als::Collector::start().await;
    let mut events = collector.server.events();
    let app = HttpBackend::start("app").await;
    let echo = TcpBackend::echo().await;
    let yaml = |als: &str, prefix: &str| {
        format!(
            r#"
node: {{ id: sidecar-{prefix}, cluster: shop }}
telemetry:
  access_log_service: {{ address: "{als}", log_name: calls, flush_interval: 20ms, buffer: 8, request_headers: [x-tenant, authorization] }}
listeners:
  - name: {prefix}-http
    address: 127.0.0.1:0
    kind: http
    virtual_hosts:
      - name: all
        domains: ["*"]
        routes:
          - name: {prefix}-route
            match: {{}}
            cluster: app
  - name: {prefix}-tcp
    address: 127.0.0.1:0
    kind: tcp
    tcp: {{ cluster: echo }}
clusters:
  - name: app
    endpoints: [{{ address: "{app}" }}]
  - name: echo
    endpoints: [{{ address: "{echo}" }}]
"#,
            app = app.addr(),
            echo = echo.addr(),
        )
    };
    let proxy = start_proxy(&yaml(&collector.url(), "als")).await;
    let response = send(
        listener(&proxy, "als-http"),
        http::Request::get("/cart")
            .header("host", "shop")
            .header("x-tenant", "acme")
            .header("authorization", "Bearer secret")
            .body(postern_tests::client::empty())
            .expect("request"),
    )
    .await;
    assert_eq!(response.status, 200);
    let mut tcp = tokio::net::TcpStream::connect(listener(&proxy, "als-tcp"))
        .await
        .expect("tcp");
    tcp.write_all(b"ping").await.expect("write");
    let mut back = [0u8; 4];
    tcp.read_exact(&mut back).await.expect("echo");
    drop(tcp);
    let received = postern_tests::als::wait_entries(&mut events, 2).await;
    let identifier = &received[0].identifier;
    assert_eq!(received[0].log_name(), "calls");
    assert_eq!(
        identifier.node.as_ref().map(|n| n.id.as_str()),
        Some("sidecar-als")
    );
    let http_entry = received
        .iter()
        .flat_map(|e| e.http().to_vec())
        .next()
        .expect("an HTTP entry");
    let request = http_entry.request.as_ref().expect("request");
    assert_eq!(request.path, "/cart");
    assert_eq!(request.authority, "shop");
    assert_eq!(
        request.request_headers.get("x-tenant").map(String::as_str),
        Some("acme")
    );
    assert_eq!(
        request
            .request_headers
            .get("authorization")
            .map(String::as_str),
        Some("[REDACTED]")
    );
    let common = http_entry.common_properties.as_ref().expect("common");
    assert_eq!(common.route_name, "als-route");
    assert_eq!(common.upstream_cluster, "app");
    assert_eq!(
        http_entry
            .response
            .as_ref()
            .and_then(|r| r.response_code)
            .map(|c| c.value),
        Some(200)
    );
    let tcp_entry = received
        .iter()
        .flat_map(|e| e.tcp().to_vec())
        .next()
        .expect("a TCP entry");
    let props = tcp_entry.connection_properties.expect("connection");
    assert_eq!((props.received_bytes, props.sent_bytes), (4, 4));

    // A collector that is gone: every call still succeeds at once, and
    // what the small buffer cannot hold is dropped and counted.
    let dead = postern_tests::dead_addr();
    let lonely = start_proxy(&yaml(&format!("http://{dead}"), "dead")).await;
    let addr = listener(&lonely, "dead-http");
    for _ in 0..40 {
        assert_eq!(get(addr, "shop", "/cart").await.status, 200);
    }
    wait_until("drops counted", || async {
        let text = metrics_text(lonely.admin_addr()).await;
        count(&text, "postern_als_entries_dropped_total", &[]) >= 30.0
    })
    .await;
}

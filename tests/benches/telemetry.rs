//! Telemetry benchmark, two parts:
//!
//! 1. Cost: throughput and p99 through one Postern process with every sink
//!    on (Istio metrics, a JSON access log to a file, the access-log stream
//!    to a collector, and traces for every call to an OTLP collector)
//!    against one with all of them off, alternating in one run.
//! 2. Label memory: RSS and series count of a Postern process as more and
//!    more distinct mTLS callers (SPIFFE IDs) call it, with the default peer
//!    bound and with the bound lifted.
//!
//! `bench/telemetry.sh` builds the release binary and runs this pinned:
//! each Postern on core 0 with one worker thread, wrk, the backend and the
//! collectors (this process) on core 1. Environment: `POSTERN_BIN`,
//! `DURATION` (wrk seconds, default 10), `CONNS` (32), `ROUNDS` (2),
//! `CALLERS` (12000), `PART` (`cost`, `peers` or both).
//!
//! `PART=collectors` only serves the ALS and OTLP collectors on
//! `COLLECTORS` (default `127.0.0.1:0`), prints the address, and runs until
//! killed: `bench/instructions.sh` counts a telemetry-on Postern against it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use postern_tests::mesh::{probe_connector, TestCa};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use postern_tests::bench::{env_or as env, free_port};

/// Counts spans, keeps nothing.
#[derive(Default, Clone)]
struct SpanCounter(Arc<AtomicU64>);

#[tonic::async_trait]
impl TraceService for SpanCounter {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let spans: usize = request
            .get_ref()
            .resource_spans
            .iter()
            .flat_map(|r| &r.scope_spans)
            .map(|s| s.spans.len())
            .sum();
        self.0.fetch_add(spans as u64, Ordering::Relaxed);
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// A backend that answers `ok` to everything, keeping nothing.
async fn start_backend() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind backend");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(
                        http_body_util::Full::new(bytes::Bytes::from_static(b"ok\n")),
                    ))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

struct Postern {
    child: Child,
    admin: SocketAddr,
}

impl Postern {
    async fn start(bin: &Path, config: &Path, admin: SocketAddr) -> Postern {
        let child = Command::new("taskset")
            .args(["-c", "0"])
            .arg(bin)
            .args(["run", "--config"])
            .arg(config)
            .env("POSTERN_WORKER_THREADS", "1")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .expect("start postern (needs taskset and POSTERN_BIN)");
        let postern = Postern { child, admin };
        for _ in 0..200 {
            if let Some(200) = postern.admin_get("/ready").await.map(|(s, _)| s) {
                return postern;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("postern did not become ready");
    }

    async fn admin_get(&self, path: &str) -> Option<(u16, String)> {
        let mut stream = tokio::net::TcpStream::connect(self.admin).await.ok()?;
        let request = format!("GET {path} HTTP/1.0\r\nhost: admin\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await.ok()?;
        let text = String::from_utf8_lossy(&raw).into_owned();
        let status = text.split(' ').nth(1)?.parse().ok()?;
        let body = text.split_once("\r\n\r\n")?.1.to_string();
        Some((status, body))
    }

    /// CPU seconds the process has used (user + system).
    fn cpu_seconds(&self) -> f64 {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap_or_default();
        // Fields 14 and 15, counted after the `)` that ends the command name.
        let fields: Vec<&str> = stat
            .rsplit_once(") ")
            .map_or("", |(_, rest)| rest)
            .split_whitespace()
            .collect();
        let ticks: u64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
            + fields.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
        // USER_HZ is 100 on Linux.
        ticks as f64 / 100.0
    }

    fn rss_kib(&self) -> u64 {
        postern_tests::bench::rss_kib(self.child.id())
    }
}

impl Drop for Postern {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct WrkResult {
    rps: f64,
    p99_ms: f64,
    /// Postern CPU per request, in microseconds.
    cpu_us: f64,
}

fn wrk(port: u16, seconds: u64, conns: u64) -> WrkResult {
    let out = Command::new("taskset")
        .args(["-c", "1", "wrk", "-t1"])
        .arg(format!("-c{conns}"))
        .arg(format!("-d{seconds}s"))
        .arg("--latency")
        .arg(format!("http://127.0.0.1:{port}/items/1?page=2"))
        .output()
        .expect("run wrk");
    let text = String::from_utf8_lossy(&out.stdout);
    let rps = text
        .lines()
        .find(|l| l.starts_with("Requests/sec:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    let p99 = text
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("99%"))
        .and_then(|l| l.split_whitespace().nth(1))
        .map(parse_wrk_duration)
        .unwrap_or(f64::NAN);
    WrkResult {
        rps,
        p99_ms: p99,
        cpu_us: f64::NAN,
    }
}

fn parse_wrk_duration(text: &str) -> f64 {
    let (number, unit) = text.split_at(
        text.find(|c: char| c.is_ascii_alphabetic())
            .unwrap_or(text.len()),
    );
    let value: f64 = number.parse().unwrap_or(f64::NAN);
    match unit {
        "us" => value / 1000.0,
        "ms" => value,
        "s" => value * 1000.0,
        _ => f64::NAN,
    }
}

fn listener_yaml(name: &str, port: u16, backend: SocketAddr, tracing: &str) -> String {
    format!(
        r#"listeners:
  - name: {name}
    address: 127.0.0.1:{port}
    kind: http{tracing}
    virtual_hosts:
      - name: all
        domains: ["*"]
        routes:
          - name: items
            match: {{}}
            cluster: "outbound|80||items.shop.svc.cluster.local"
clusters:
  - name: "outbound|80||items.shop.svc.cluster.local"
    endpoints: [{{ address: "{backend}" }}]
"#
    )
}

async fn cost(bin: &Path, dir: &Path) {
    let seconds = env("DURATION", 10);
    let conns = env("CONNS", 32);
    let rounds = env("ROUNDS", 2);
    let backend = start_backend().await;

    let sinks = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind sinks");
    let sinks_addr = sinks.local_addr().expect("addr");
    let spans = SpanCounter::default();
    let als = postern_control::als::AlsServer::new();
    {
        let spans = spans.clone();
        let als = als.clone();
        tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(spans))
                .add_service(als.into_service())
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(sinks))
                .await;
        });
    }

    let (off_port, off_admin) = (free_port(), free_port());
    let off_config = dir.join("off.yaml");
    std::fs::write(
        &off_config,
        format!(
            "admin: {{ address: \"127.0.0.1:{off_admin}\" }}\ntelemetry: {{ istio_metrics: false }}\n{}",
            listener_yaml("off", off_port, backend, "")
        ),
    )
    .expect("write config");
    let (on_port, on_admin) = (free_port(), free_port());
    let access_log = dir.join("access.log");
    let on_config = dir.join("on.yaml");
    // ON picks the sinks (default all); SAMPLING the trace ratio (default 1).
    let parts = std::env::var("ON").unwrap_or_else(|_| "istio,log,als,trace".into());
    let sampling = std::env::var("SAMPLING").unwrap_or_else(|_| "1".into());
    let has = |part: &str| parts.split(',').any(|p| p == part);
    let mut telemetry = format!(
        "telemetry:\n  istio_metrics: {}\n  workload: {{ name: bench, namespace: shop, app: bench, version: v1 }}\n",
        has("istio")
    );
    if has("log") {
        telemetry.push_str(&format!(
            "  access_log: {{ output: \"{}\", request_headers: [authorization] }}\n",
            access_log.display()
        ));
    }
    if has("als") {
        telemetry.push_str(&format!(
            "  access_log_service: {{ address: \"http://{sinks_addr}\", log_name: bench }}\n"
        ));
    }
    if has("trace") {
        telemetry.push_str(&format!(
            "  tracing: {{ collector: \"http://{sinks_addr}\" }}\n"
        ));
    }
    std::fs::write(
        &on_config,
        format!(
            "admin: {{ address: \"127.0.0.1:{on_admin}\" }}\nnode: {{ id: bench-on, cluster: shop }}\n{telemetry}{}",
            listener_yaml(
                "on",
                on_port,
                backend,
                &format!("\n    tracing: {{ sampling: {sampling} }}")
            ),
        ),
    )
    .expect("write config");
    let off = Postern::start(
        bin,
        &off_config,
        format!("127.0.0.1:{off_admin}").parse().expect("addr"),
    )
    .await;
    let on = Postern::start(
        bin,
        &on_config,
        format!("127.0.0.1:{on_admin}").parse().expect("addr"),
    )
    .await;

    // Warm both (connections, allocator, label series) before measuring.
    let _ = tokio::task::spawn_blocking(move || {
        wrk(off_port, 2, conns);
        wrk(on_port, 2, conns);
    })
    .await;
    let mut off_runs = Vec::new();
    let mut on_runs = Vec::new();
    // CPU per request is the steadier figure on a shared machine: other
    // load slows both sides' throughput, but not the work each call takes.
    // wrk runs off the runtime: the backend and collectors live on it.
    async fn measured(postern: &Postern, port: u16, seconds: u64, conns: u64) -> WrkResult {
        let before = postern.cpu_seconds();
        let mut result = tokio::task::spawn_blocking(move || wrk(port, seconds, conns))
            .await
            .expect("wrk");
        let requests = result.rps * seconds as f64;
        result.cpu_us = (postern.cpu_seconds() - before) * 1e6 / requests.max(1.0);
        result
    }
    for _ in 0..rounds {
        off_runs.push(measured(&off, off_port, seconds, conns).await);
        on_runs.push(measured(&on, on_port, seconds, conns).await);
    }
    let mean = |runs: &[WrkResult], f: fn(&WrkResult) -> f64| {
        runs.iter().map(f).sum::<f64>() / runs.len().max(1) as f64
    };
    let (off_rps, on_rps) = (mean(&off_runs, |r| r.rps), mean(&on_runs, |r| r.rps));
    let (off_p99, on_p99) = (mean(&off_runs, |r| r.p99_ms), mean(&on_runs, |r| r.p99_ms));
    let (off_cpu, on_cpu) = (mean(&off_runs, |r| r.cpu_us), mean(&on_runs, |r| r.cpu_us));
    // Give the sinks a moment to drain what is queued before counting.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let lines = std::fs::read_to_string(&access_log)
        .map(|t| t.lines().count())
        .unwrap_or(0);
    let streamed = als.summary().total_calls();
    let exported = spans.0.load(Ordering::Relaxed);
    println!("## Telemetry cost (wrk -t1 -c{conns}, {rounds} x {seconds}s per side, alternating; Postern on one core)");
    println!();
    println!("on: {parts}; trace sampling {sampling}");
    println!();
    println!("| telemetry | req/s | p99 (ms) | Postern CPU per request (µs) | RSS (MiB) |");
    println!("|---|---:|---:|---:|---:|");
    println!(
        "| all off (no Istio metrics, logs, stream or traces) | {off_rps:.0} | {off_p99:.2} | {off_cpu:.1} | {:.1} |",
        off.rss_kib() as f64 / 1024.0
    );
    println!(
        "| on | {on_rps:.0} | {on_p99:.2} | {on_cpu:.1} | {:.1} |",
        on.rss_kib() as f64 / 1024.0
    );
    println!();
    println!(
        "on throughput = {:.3} x off (cost {:.1}%); p99 {:.2}x; CPU per request {:.3}x (cost {:.1}%)",
        on_rps / off_rps,
        (1.0 - on_rps / off_rps) * 100.0,
        on_p99 / off_p99,
        on_cpu / off_cpu,
        (on_cpu / off_cpu - 1.0) * 100.0
    );
    for (i, (a, b)) in off_runs.iter().zip(&on_runs).enumerate() {
        println!(
            "round {}: off {:.0} req/s {:.1} µs/req, on {:.0} req/s {:.1} µs/req",
            i + 1,
            a.rps,
            a.cpu_us,
            b.rps,
            b.cpu_us
        );
    }
    println!(
        "work done by the all-on proxy: {lines} access-log lines, {streamed} ALS entries received, {exported} spans received"
    );
    let (_, metrics) = on.admin_get("/metrics").await.unwrap_or_default();
    let dropped = |name: &str| {
        metrics
            .lines()
            .filter(|l| l.starts_with(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>()
    };
    println!(
        "dropped: access log {}, ALS {}, spans {}",
        dropped("postern_access_log_dropped_total"),
        dropped("postern_als_entries_dropped_total"),
        dropped("postern_tracing_spans_dropped_total")
    );
    println!();
}

async fn peers(bin: &Path, dir: &Path) {
    let callers = env("CALLERS", 12_000);
    let backend = start_backend().await;
    let ca = Arc::new(TestCa::new("bench-peers"));
    let files = ca.write_identity(dir, "server", "spiffe://cluster.local/ns/shop/sa/items");
    println!("## Label memory as distinct mTLS callers grow (one call each)");
    println!();
    println!("| max_peers | callers | RSS (MiB) | istio_requests_total series | /metrics bytes |");
    println!("|---:|---:|---:|---:|---:|");
    for max_peers in [256u64, 1_000_000] {
        let (port, admin) = (free_port(), free_port());
        let config = dir.join(format!("peers-{max_peers}.yaml"));
        std::fs::write(
            &config,
            format!(
                r#"admin: {{ address: "127.0.0.1:{admin}" }}
identity:
  spiffe_id: spiffe://cluster.local/ns/shop/sa/items
  source:
    files: {{ cert: {cert}, key: {key}, bundle: {bundle} }}
telemetry:
  max_peers: {max_peers}
  workload: {{ name: items, namespace: shop }}
listeners:
  - name: inbound
    address: 127.0.0.1:{port}
    kind: http
    mtls: {{ mode: strict }}
    virtual_hosts:
      - name: all
        domains: ["*"]
        routes:
          - match: {{}}
            cluster: "inbound|80||items.shop.svc.cluster.local"
clusters:
  - name: "inbound|80||items.shop.svc.cluster.local"
    endpoints: [{{ address: "{backend}" }}]
"#,
                cert = files.cert.display(),
                key = files.key.display(),
                bundle = files.bundle.display(),
            ),
        )
        .expect("write config");
        let postern = Postern::start(
            bin,
            &config,
            format!("127.0.0.1:{admin}").parse().expect("addr"),
        )
        .await;
        let target: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
        let mut done = 0u64;
        for checkpoint in [0u64, 1000, 2500, 5000, 10_000, callers] {
            let batch: Vec<u64> = (done..checkpoint.max(done)).collect();
            let mut tasks = tokio::task::JoinSet::new();
            for chunk in batch.chunks(batch.len().div_ceil(8).max(1)) {
                let chunk = chunk.to_vec();
                let ca = ca.clone();
                tasks.spawn(async move {
                    for i in chunk {
                        call_as(&ca, target, i).await;
                    }
                });
            }
            while tasks.join_next().await.is_some() {}
            done = checkpoint.max(done);
            let (_, metrics) = postern.admin_get("/metrics").await.unwrap_or_default();
            let series = metrics
                .lines()
                .filter(|l| l.starts_with("istio_requests_total{"))
                .count();
            println!(
                "| {max_peers} | {done} | {:.1} | {series} | {} |",
                postern.rss_kib() as f64 / 1024.0,
                metrics.len()
            );
        }
    }
    println!();
}

/// One HTTP/1.1 call over mTLS as caller `i`, with its own SPIFFE ID.
async fn call_as(ca: &TestCa, target: SocketAddr, i: u64) {
    let issued = ca.issue(
        &format!("spiffe://cluster.local/ns/caller-{i}/sa/client"),
        -60,
        3600,
    );
    let connector = probe_connector(Some(&issued), &[b"http/1.1"]);
    let Ok(mut tls) = postern_tests::mesh::tls_connect(&connector, target, "items").await else {
        return;
    };
    let _ = tls
        .write_all(b"GET / HTTP/1.1\r\nhost: items\r\nconnection: close\r\n\r\n")
        .await;
    let mut sink = Vec::new();
    let _ = tls.read_to_end(&mut sink).await;
}

/// Serves the collectors alone until the process is killed.
async fn collectors() {
    let addr = std::env::var("COLLECTORS").unwrap_or_else(|_| "127.0.0.1:0".into());
    let sinks = tokio::net::TcpListener::bind(&addr)
        .await
        .expect("bind collectors");
    println!(
        "collectors listening on {}",
        sinks.local_addr().expect("addr")
    );
    let _ = tonic::transport::Server::builder()
        .add_service(TraceServiceServer::new(SpanCounter::default()))
        .add_service(postern_control::als::AlsServer::new().into_service())
        .serve_with_incoming(tonic::transport::server::TcpIncoming::from(sinks))
        .await;
}

fn main() {
    let part = std::env::var("PART").unwrap_or_default();
    if part == "collectors" {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(collectors());
        return;
    }
    let bin = PathBuf::from(std::env::var("POSTERN_BIN").unwrap_or_else(|_| {
        concat!(env!("CARGO_MANIFEST_DIR"), "/../target/release/postern").to_string()
    }));
    assert!(bin.exists(), "no postern binary at {}", bin.display());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    runtime.block_on(async {
        if part.is_empty() || part == "cost" {
            cost(&bin, dir.path()).await;
        }
        if part.is_empty() || part == "peers" {
            peers(&bin, dir.path()).await;
        }
    });
}

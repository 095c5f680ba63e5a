//! Slow clients: slowloris (a head that never ends), slow POST (a body
//! that trickles), slow read (a client that stops reading). Each is run
//! with hand-made sockets (deterministic, exact timings) and with
//! `slowhttptest` (Debian's package, installed by `.ci/run`) at a few dozen
//! connections; a normal client must be served throughout.
//!
//! The timeouts under test: `header_read_timeout` answers 408 and closes a
//! head that is still incomplete; a route's `timeout` answers 504 to a
//! request whose body has not finished by then; `idle_timeout` closes a
//! connection whose requests have moved no byte either way for that long.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use postern_tests::capture::CaptureBackend;
use postern_tests::client::{raw_exchange, read_until_close};
use postern_tests::{eventually, get, listener, start_proxy, HttpBackend};
use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpStream;

fn config(backend: SocketAddr, limits: &str, route: &str) -> String {
    // 256 KiB from the proxy itself, for slow reads without a backend.
    let big = "x".repeat(256 * 1024);
    format!(
        r#"
        listeners:
          - name: edge
            address: 127.0.0.1:0
            kind: http
            limits: {{ {limits} }}
            virtual_hosts:
              - name: all
                domains: ["*"]
                routes:
                  - match: {{ path: {{ prefix: /big }} }}
                    direct_response: {{ status: 200, body: "{big}" }}
                  - match: {{}}
                    cluster: c
                    {route}
        clusters:
          - name: c
            endpoints: [{{ address: "{backend}" }}]
        "#
    )
}

/// Sends GETs one after another until `until` passes; returns how many
/// succeeded and the slowest.
async fn normal_client(addr: SocketAddr, until: Instant) -> (usize, Duration) {
    let (mut served, mut slowest) = (0, Duration::ZERO);
    while Instant::now() < until {
        let started = Instant::now();
        assert_eq!(get(addr, "svc.local", "/normal").await.status, 200);
        slowest = slowest.max(started.elapsed());
        served += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (served, slowest)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_slow_heads_get_408_while_a_normal_client_is_served() {
    let backend = HttpBackend::start("b").await;
    let proxy = start_proxy(&config(backend.addr(), "header_read_timeout: 500ms", "")).await;
    let edge = listener(&proxy, "edge");

    let started = Instant::now();
    let attackers: Vec<_> = (0..100)
        .map(|i| {
            tokio::spawn(async move {
                let head = format!("GET /slow{i} HTTP/1.1\r\nHost: svc.local\r\nX-A: ");
                raw_exchange(edge, head.as_bytes(), Duration::from_secs(5))
                    .await
                    .unwrap()
            })
        })
        .collect();
    let (served, slowest) = normal_client(edge, started + Duration::from_millis(800)).await;
    for attacker in attackers {
        let reply = attacker.await.unwrap();
        assert!(reply.closed, "{:?}", reply.text());
        assert!(
            reply.text().starts_with("HTTP/1.1 408"),
            "{:?}",
            reply.text()
        );
    }
    let elapsed = started.elapsed();
    assert!(elapsed >= Duration::from_millis(450), "{elapsed:?}");
    assert!(elapsed < Duration::from_secs(4), "{elapsed:?}");
    assert!(served >= 3, "the normal client got {served} answers");
    assert!(
        slowest < Duration::from_secs(1),
        "slowest answer {slowest:?}"
    );
    assert!(backend
        .requests()
        .iter()
        .all(|r| !r.path_and_query().starts_with("/slow")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_post_body_is_cut_at_the_route_timeout() {
    let backend = HttpBackend::start("b").await;
    let proxy = start_proxy(&config(backend.addr(), "", "timeout: 500ms")).await;
    let edge = listener(&proxy, "edge");

    let started = Instant::now();
    let mut stream = TcpStream::connect(edge).await.unwrap();
    stream
        .write_all(
            b"POST /upload HTTP/1.1\r\nHost: svc.local\r\nContent-Length: 1000\r\n\r\n0123456789",
        )
        .await
        .unwrap();
    let reply = read_until_close(&mut stream, Duration::from_secs(5)).await;
    let elapsed = started.elapsed();
    assert!(reply.closed, "{:?}", reply.text());
    assert!(
        reply.text().starts_with("HTTP/1.1 504"),
        "{:?}",
        reply.text()
    );
    assert!(elapsed >= Duration::from_millis(450), "{elapsed:?}");
    eventually("the upstream request to end", || async {
        (backend.in_flight() == 0).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_post_without_a_route_timeout_is_cut_at_the_idle_timeout() {
    let backend = HttpBackend::start("b").await;
    let proxy = start_proxy(&config(backend.addr(), "idle_timeout: 1s", "")).await;
    let edge = listener(&proxy, "edge");

    let started = Instant::now();
    let mut stream = TcpStream::connect(edge).await.unwrap();
    stream
        .write_all(
            b"POST /upload HTTP/1.1\r\nHost: svc.local\r\nContent-Length: 1000\r\n\r\n0123456789",
        )
        .await
        .unwrap();
    let reply = read_until_close(&mut stream, Duration::from_secs(6)).await;
    let elapsed = started.elapsed();
    assert!(reply.closed, "still open after {elapsed:?}");
    assert!(elapsed >= Duration::from_millis(900), "{elapsed:?}");
    eventually("the upstream request to end", || async {
        (backend.in_flight() == 0).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_closed_at_the_idle_timeout() {
    let capture = CaptureBackend::start().await;
    let proxy = start_proxy(&config(capture.addr(), "idle_timeout: 1s", "")).await;
    let edge = listener(&proxy, "edge");

    // 1 GiB cannot fit in socket buffers, nor arrive within the read limit
    // below: the proxy's writes stall until it gives up.
    let started = Instant::now();
    let mut stream = TcpStream::connect(edge).await.unwrap();
    stream
        .write_all(b"GET /download HTTP/1.1\r\nHost: svc.local\r\nX-Capture-Body-Bytes: 1073741824\r\n\r\n")
        .await
        .unwrap();
    // Giving up the downstream request closes the upstream connection too.
    eventually("the proxy to drop the upstream connection", || async {
        capture.connections().first()?.closed.then_some(())
    })
    .await;
    assert!(started.elapsed() >= Duration::from_millis(900));
    let reply = read_until_close(&mut stream, Duration::from_secs(5)).await;
    assert!(reply.closed, "the downstream connection is still open");
    assert!(
        reply.bytes.len() < 64 * 1024 * 1024,
        "{}",
        reply.bytes.len()
    );
    assert_eq!(get(edge, "svc.local", "/").await.status, 200);
}

/// One line of slowhttptest's CSV report.
#[derive(Debug)]
struct Tick {
    closed: u32,
    connected: u32,
    available: bool,
}

/// Runs slowhttptest with `args` against `url` and returns its report, one
/// row per second.
async fn slowhttptest(dir: &Path, url: &str, args: &[&str]) -> (Vec<Tick>, String) {
    let prefix = dir.join("report");
    let output = tokio::process::Command::new("slowhttptest")
        .args(args)
        .args(["-g", "-o"])
        .arg(&prefix)
        .args(["-u", url])
        .output()
        .await
        .expect("slowhttptest runs (.ci/run installs it from Debian)");
    let csv = std::fs::read_to_string(prefix.with_extension("csv")).unwrap_or_else(|e| {
        panic!(
            "no report ({e}); slowhttptest said {}",
            String::from_utf8_lossy(&output.stdout)
        )
    });
    let ticks = csv
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<u32> = line
                .split(',')
                .map(|v| v.trim().parse().ok())
                .collect::<Option<_>>()?;
            Some(Tick {
                closed: f[1],
                connected: f[3],
                available: f[4] > 0,
            })
        })
        .collect();
    (ticks, String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Runs one slowhttptest mode against a fresh proxy while a normal client
/// keeps asking, and checks that every attacking connection was closed by
/// the proxy and the normal client was always served.
async fn attack(limits: &str, route: &str, path: &str, args: &[&str], connections: u32) {
    let backend = HttpBackend::start("b").await;
    let proxy = start_proxy(&config(backend.addr(), limits, route)).await;
    let edge = listener(&proxy, "edge");
    let dir = tempfile::tempdir().unwrap();
    let url = format!("http://{edge}{path}");
    let ((ticks, said), (served, slowest)) = tokio::join!(
        slowhttptest(dir.path(), &url, args),
        normal_client(edge, Instant::now() + Duration::from_secs(4)),
    );
    assert!(
        ticks.iter().map(|t| t.connected + t.closed).max() >= Some(connections),
        "the attack never opened its {connections} connections: {ticks:?}\n{said}"
    );
    // slowhttptest stops early, without a last report line, once every
    // connection it opened has been closed.
    let all_closed = said.contains("No open connections left")
        || ticks.last().is_some_and(|t| t.closed == connections);
    assert!(
        all_closed,
        "the proxy left attacking connections open: {ticks:?}\n{said}"
    );
    assert!(ticks.iter().skip(1).all(|t| t.available), "{ticks:?}");
    assert!(served >= 10, "the normal client got {served} answers");
    assert!(
        slowest < Duration::from_secs(1),
        "slowest answer {slowest:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowhttptest_slowloris() {
    // Follow-up header lines every 2s against a 1s head timeout.
    attack(
        "header_read_timeout: 1s",
        "",
        "/",
        &[
            "-H", "-c", "40", "-r", "40", "-i", "2", "-l", "5", "-p", "2",
        ],
        40,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowhttptest_slow_post() {
    // Body chunks every 2s against a 1s route timeout.
    attack(
        "",
        "timeout: 1s",
        "/upload",
        &[
            "-B", "-c", "40", "-r", "40", "-i", "2", "-s", "8192", "-l", "5", "-p", "2",
        ],
        40,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowhttptest_slow_read() {
    // Pipelined requests for 64 MiB answers, read 32 bytes every 3s through
    // a tiny window, against a 1s idle timeout. The attacker only learns of
    // the close once it has drained its buffer (minutes at that pace), so
    // the close is checked on the upstream side: giving up a downstream
    // request drops its upstream connection mid-answer.
    let capture = CaptureBackend::start().await;
    let proxy = start_proxy(&config(capture.addr(), "idle_timeout: 1s", "")).await;
    let edge = listener(&proxy, "edge");
    let dir = tempfile::tempdir().unwrap();
    let url = format!("http://{edge}/bytes/67108864");
    let args = [
        "-X", "-c", "20", "-r", "20", "-k", "2", "-n", "3", "-z", "32", "-w", "512", "-y", "1024",
        "-l", "5", "-p", "2",
    ];
    let started = Instant::now();
    let (ticks, said) = slowhttptest(dir.path(), &url, &args).await;
    assert!(
        ticks.iter().map(|t| t.connected + t.closed).max() >= Some(20),
        "the attack never opened its connections: {ticks:?}\n{said}"
    );
    let upstream = capture.connections();
    assert!(
        upstream.len() >= 20,
        "{} upstream connections",
        upstream.len()
    );
    assert!(
        upstream.iter().all(|c| c.closed),
        "{} of {} upstream connections still streaming after {:?}\n{said}",
        upstream.iter().filter(|c| !c.closed).count(),
        upstream.len(),
        started.elapsed()
    );
    assert_eq!(get(edge, "svc.local", "/").await.status, 200);
}

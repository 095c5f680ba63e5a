//! Capacity (issue #8 item 7): connection storms against a listener's
//! `max_connections` and the process-wide `overload.max_connections`, plain
//! and TLS; idle connections reaped at the idle timeout, HTTP/1 and HTTP/2;
//! shedding and accept pausing past `overload.max_rss_bytes`, recovery, and
//! no flapping between the release point and the threshold.
//!
//! File descriptors and RSS are the test process's, which is the proxy's
//! too (it runs in-process); the tests here take one lock so that no other
//! test of this file opens sockets or allocates while one counts. Storms
//! run from their own thread and runtime, as a separate client would.
//!
//! The latency of established streams during a storm, and how fast refused
//! connections close, are measured and printed; they are asserted (against
//! the 2× target of issue #8) only with `POSTERN_STRICT_P99=1`, for the
//! reason `hostile_http2.rs` gives: the storm, the proxy and the measuring
//! client share two cores with whatever else the machine runs.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use postern::overload::resident_bytes;
use postern::telemetry::metrics as names;
use postern_tests::mesh::{probe_connector, tls_connect, write_files, TestCa};
use postern_tests::prom::scrape;
use postern_tests::{
    empty, eventually, listener, request, start_proxy, wait_until, within, H1Conn, H2Conn,
    HttpBackend,
};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

/// One test at a time: each counts the process's descriptors or memory.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Longest time a connection past a cap may stay open before it is closed.
const REJECT_CAP: Duration = Duration::from_secs(2);
/// p99 of the time from connect to close for refused connections.
const REJECT_P99_CAP: Duration = Duration::from_millis(500);

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    assert!(!samples.is_empty(), "no samples");
    samples.sort();
    let rank = ((p * samples.len() as f64).ceil() as usize).clamp(1, samples.len());
    samples[rank - 1]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Sequential requests on one HTTP/2 connection: `count` of them, or until
/// `stop` is set (and at least `count`).
async fn latencies(conn: &mut H2Conn, count: usize, stop: Option<&AtomicBool>) -> Vec<Duration> {
    let mut out = Vec::new();
    while out.len() < count || stop.is_some_and(|s| !s.load(Ordering::Acquire)) {
        let started = Instant::now();
        let response = conn
            .send(request("GET", "svc.local", "/").body(empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(response.status, 200, "an established stream was refused");
        out.push(started.elapsed());
    }
    out
}

/// How one storm went: for each connection, the time from its TCP connect
/// to the proxy closing it, or `None` when it stayed open past the cap.
struct Storm {
    closed_after: Vec<Option<Duration>>,
    elapsed: Duration,
}

impl Storm {
    fn rejected(&self) -> usize {
        self.closed_after.iter().flatten().count()
    }

    fn p(&self, p: f64) -> Duration {
        percentile(
            &mut self
                .closed_after
                .iter()
                .flatten()
                .copied()
                .collect::<Vec<_>>(),
            p,
        )
    }
}

/// Opens `total` connections to `addr`, `wave` at a time, from a thread of
/// its own; with `tls`, each attempts a TLS handshake.
fn storm(addr: SocketAddr, total: usize, wave: usize, tls: bool) -> std::thread::JoinHandle<Storm> {
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let connector = probe_connector(None, &[b"http/1.1"]);
            let started = Instant::now();
            let mut closed_after = Vec::with_capacity(total);
            for _ in 0..total.div_ceil(wave) {
                let attempts = (0..wave).map(|_| {
                    let connector = connector.clone();
                    async move {
                        let tcp = TcpStream::connect(addr).await.unwrap();
                        let connected = Instant::now();
                        let closed = tokio::time::timeout(REJECT_CAP, async {
                            if tls {
                                let name = rustls::pki_types::ServerName::try_from("svc.local")
                                    .unwrap()
                                    .to_owned();
                                connector.connect(name, tcp).await.is_err()
                            } else {
                                let mut tcp = tcp;
                                let mut byte = [0u8; 1];
                                matches!(tcp.read(&mut byte).await, Ok(0) | Err(_))
                            }
                        })
                        .await;
                        match closed {
                            Ok(true) => Some(connected.elapsed()),
                            _ => None,
                        }
                    }
                });
                closed_after.extend(futures_util::future::join_all(attempts).await);
            }
            Storm {
                closed_after,
                elapsed: started.elapsed(),
            }
        })
    })
}

/// Runs `storm` while `conn` keeps measuring; returns the storm and the
/// latencies seen meanwhile.
async fn measured(
    conn: &mut H2Conn,
    storm: std::thread::JoinHandle<Storm>,
) -> (Storm, Vec<Duration>) {
    let done = Arc::new(AtomicBool::new(false));
    let waiter = {
        let done = done.clone();
        tokio::task::spawn_blocking(move || {
            let storm = storm.join().unwrap();
            done.store(true, Ordering::Release);
            storm
        })
    };
    let samples = latencies(conn, 50, Some(&done)).await;
    (waiter.await.unwrap(), samples)
}

async fn active(admin: SocketAddr, listener: &str) -> f64 {
    scrape(
        admin,
        names::DOWNSTREAM_CONNECTIONS_ACTIVE,
        &[("listener", listener)],
    )
    .await
}

async fn rejections(admin: SocketAddr, listener: &str, limit: &str) -> f64 {
    scrape(
        admin,
        names::DOWNSTREAM_LIMIT_REJECTIONS_TOTAL,
        &[("listener", listener), ("limit", limit)],
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_storms_past_listener_and_global_caps_are_refused_fast() {
    let _serial = SERIAL.lock().await;
    let _recorder = postern::telemetry::install_prometheus_recorder();
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("storm root");
    let cert = write_files(dir.path(), "edge", &ca.issue_server(&["svc.local"]), "");
    let backend = HttpBackend::start("b").await;
    // The plain listener fills at 40 connections; with 30 on the TLS one,
    // the process is at its global cap of 70 while the TLS listener's own
    // cap (1000) is far away.
    let proxy = start_proxy(&format!(
        r#"
        overload: {{ max_connections: 70 }}
        listeners:
          - name: storm-plain
            address: 127.0.0.1:0
            kind: http
            limits: {{ max_connections: 40 }}
            virtual_hosts:
              - name: all
                domains: ["*"]
                routes: [{{ match: {{}}, cluster: c }}]
          - name: storm-tls
            address: 127.0.0.1:0
            kind: http
            limits: {{ max_connections: 1000 }}
            tls:
              certificates: [{{ cert: {}, key: {} }}]
              alpn: [http/1.1]
            virtual_hosts:
              - name: all
                domains: ["*"]
                routes: [{{ match: {{}}, cluster: c }}]
        clusters:
          - name: c
            endpoints: [{{ address: "{}" }}]
        "#,
        cert.cert.display(),
        cert.key.display(),
        backend.addr(),
    ))
    .await;
    let admin = proxy.admin_addr();
    let plain = listener(&proxy, "storm-plain");
    let tls = listener(&proxy, "storm-tls");

    let mut measuring = H2Conn::connect(plain).await.unwrap();
    latencies(&mut measuring, 20, None).await;
    let fds_before = open_fds();
    let mut baseline = latencies(&mut measuring, 300, None).await;
    let baseline_p99 = percentile(&mut baseline, 0.99);

    // Fill the plain listener (the measuring connection is one of its 40).
    let mut idle_plain = Vec::new();
    for _ in 0..39 {
        idle_plain.push(TcpStream::connect(plain).await.unwrap());
    }
    wait_until("the plain listener is full", || async {
        active(admin, "storm-plain").await == 40.0
    })
    .await;
    let (plain_storm, mut plain_samples) =
        measured(&mut measuring, storm(plain, 1000, 100, false)).await;

    // Fill the process: 30 TLS connections, handshakes done.
    let connector = probe_connector(None, &[b"http/1.1"]);
    let mut idle_tls = Vec::new();
    for _ in 0..30 {
        idle_tls.push(tls_connect(&connector, tls, "svc.local").await.unwrap());
    }
    wait_until("the process is at its global cap", || async {
        active(admin, "storm-tls").await == 30.0
    })
    .await;
    let (tls_storm, mut tls_samples) = measured(&mut measuring, storm(tls, 300, 50, true)).await;

    let plain_p99 = percentile(&mut plain_samples, 0.99);
    let tls_p99 = percentile(&mut tls_samples, 0.99);
    let report = format!(
        "baseline p99 {:.1} ms ({} samples)\n\
         plain storm: {} of {} refused in {:.0} ms; connect-to-close p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; established p99 {:.1} ms ({:.1}×)\n\
         TLS storm: {} of {} refused in {:.0} ms; connect-to-close p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; established p99 {:.1} ms ({:.1}×)",
        ms(baseline_p99),
        baseline.len(),
        plain_storm.rejected(),
        plain_storm.closed_after.len(),
        ms(plain_storm.elapsed),
        ms(plain_storm.p(0.5)),
        ms(plain_storm.p(0.99)),
        ms(plain_storm.p(1.0)),
        ms(plain_p99),
        plain_p99.as_secs_f64() / baseline_p99.as_secs_f64(),
        tls_storm.rejected(),
        tls_storm.closed_after.len(),
        ms(tls_storm.elapsed),
        ms(tls_storm.p(0.5)),
        ms(tls_storm.p(0.99)),
        ms(tls_storm.p(1.0)),
        ms(tls_p99),
        tls_p99.as_secs_f64() / baseline_p99.as_secs_f64(),
    );
    println!("{report}");

    // Latency bounds hold on a quiet machine only (CI shares its cores with
    // whatever else runs), so they are the benchmark's to report and this
    // test's to check only when asked: POSTERN_STRICT_P99=1.
    let strict_timing = std::env::var_os("POSTERN_STRICT_P99").is_some();
    for (storm, name) in [(&plain_storm, "plain"), (&tls_storm, "TLS")] {
        assert_eq!(
            storm.rejected(),
            storm.closed_after.len(),
            "{name}: some connections past the cap stayed open\n{report}"
        );
        if strict_timing {
            assert!(storm.p(0.99) <= REJECT_P99_CAP, "{name}\n{report}");
        }
    }
    assert_eq!(
        rejections(admin, "storm-plain", "connections").await,
        1000.0,
        "the listener cap refused the plain storm"
    );
    assert_eq!(
        rejections(admin, "storm-tls", "global_connections").await,
        300.0,
        "the global cap refused the TLS storm"
    );
    if strict_timing {
        let bound = baseline_p99 * 2;
        assert!(plain_p99 <= bound, "plain storm, over {bound:?}\n{report}");
        assert!(tls_p99 <= bound, "TLS storm, over {bound:?}\n{report}");
    }

    // Connections that got in before the caps still work: a request on a
    // held TLS connection.
    let mut held = idle_tls.pop().unwrap();
    held.write_all(b"GET / HTTP/1.1\r\nHost: svc.local\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    within(
        Duration::from_secs(5),
        "answer on a held TLS connection",
        async { held.read_to_end(&mut answer).await },
    )
    .await
    .unwrap();
    assert!(
        answer.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&answer)
    );

    // Once the storm is over and the held connections close, the caps free
    // up and every descriptor is released.
    drop((idle_plain, idle_tls, held));
    wait_until("the plain listener has room again", || async {
        active(admin, "storm-plain").await == 1.0 && active(admin, "storm-tls").await == 0.0
    })
    .await;
    let fds = eventually("descriptors back to their baseline", || async {
        let now = open_fds();
        (now <= fds_before).then_some(now)
    })
    .await;
    println!("descriptors: {fds_before} before the storms, {fds} after");
    assert_eq!(
        postern_tests::get(plain, "svc.local", "/").await.status,
        200,
        "new connections are served again"
    );
    let _ = tls_connect(&connector, tls, "svc.local").await.unwrap();
}

/// Opens `count` HTTP/1.1 and `count` HTTP/2 connections, one request on
/// each, to a listener with a 2 s idle timeout, and checks that they are
/// all closed by the proxy after it (and not before), with every
/// descriptor back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_reaped_at_the_idle_timeout() {
    const COUNT: usize = 250;
    const IDLE: Duration = Duration::from_secs(2);
    let _serial = SERIAL.lock().await;
    let _recorder = postern::telemetry::install_prometheus_recorder();
    let proxy = start_proxy(
        r#"
        listeners:
          - name: idle
            address: 127.0.0.1:0
            kind: http
            limits: { idle_timeout: 2s }
            virtual_hosts:
              - name: all
                domains: ["*"]
                routes: [{ match: {}, direct_response: { status: 200, body: ok } }]
        "#,
    )
    .await;
    let admin = proxy.admin_addr();
    let addr = listener(&proxy, "idle");
    // Warm the admin connection path, so its descriptors are in the baseline.
    active(admin, "idle").await;
    let fds_before = open_fds();

    let started = Instant::now();
    let mut h1 = Vec::new();
    let mut h2 = Vec::new();
    for _ in 0..COUNT {
        let mut conn = H1Conn::connect(addr).await.unwrap();
        let response = conn
            .send(request("GET", "svc.local", "/").body(empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(response.status, 200);
        h1.push(conn);
        let mut conn = H2Conn::connect(addr).await.unwrap();
        let response = conn
            .send(request("GET", "svc.local", "/").body(empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(response.status, 200);
        h2.push(conn);
    }
    let opened_in = started.elapsed();
    let open = active(admin, "idle").await;
    let fds_open = open_fds();
    // Meaningful only if opening them all took less than the idle timeout.
    if opened_in < IDLE {
        assert_eq!(open, (2 * COUNT) as f64, "closed before the idle timeout");
        // One descriptor each on the client's side and on the proxy's;
        // the margin is for sockets of earlier tests still closing.
        let added = fds_open.abs_diff(fds_before);
        assert!(
            added.abs_diff(4 * COUNT) <= 50,
            "{added} descriptors for {} connections",
            2 * COUNT
        );
    }

    let reaped_in = eventually("every idle connection closed", || async {
        (active(admin, "idle").await == 0.0).then(|| started.elapsed())
    })
    .await;
    for conn in &mut h1 {
        within(
            Duration::from_secs(5),
            "client sees the close",
            conn.closed(),
        )
        .await;
    }
    drop((h1, h2));
    let fds_after = eventually("descriptors back to their baseline", || async {
        let now = open_fds();
        (now <= fds_before).then_some(now)
    })
    .await;
    println!(
        "{} idle connections (HTTP/1.1 and HTTP/2) opened in {:.0} ms, all closed {:.0} ms after the first; descriptors {fds_before} -> {fds_open} -> {fds_after}",
        2 * COUNT,
        ms(opened_in),
        ms(reaped_in)
    );
    assert!(
        reaped_in >= IDLE,
        "closed after {reaped_in:?}, before the idle timeout"
    );
}

async fn get(conn: &mut H1Conn) -> anyhow::Result<postern_tests::TestResponse> {
    conn.send(request("GET", "svc.local", "/").body(empty()).unwrap())
        .await
}

/// A memory budget just above what the process holds: ballast allocated by
/// the test (in the proxy's process) pushes it past `shed_at`, then past
/// `pause_accept_at`; freed, the proxy serves again, including the
/// connection that waited in the listen queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_memory_budget_requests_are_shed_then_accepting_pauses_and_both_recover() {
    // Above glibc's largest mmap threshold (32 MiB): always mapped on its
    // own and unmapped on free, so RSS follows the ballast both ways.
    const BALLAST: usize = 40 << 20;
    let _serial = SERIAL.lock().await;
    let _recorder = postern::telemetry::install_prometheus_recorder();
    let backend = HttpBackend::start("b").await;
    let config = |rss: u64| {
        let max = rss + 4 * BALLAST as u64;
        // Shed from rss + 0.5 ballast, pause from rss + 1.5 ballast.
        let shed = (rss as f64 + 0.5 * BALLAST as f64) / max as f64;
        let pause = (rss as f64 + 1.5 * BALLAST as f64) / max as f64;
        format!(
            r#"
            overload: {{ max_rss_bytes: {max}, shed_at: {shed:.4}, pause_accept_at: {pause:.4}, check_interval: 20ms }}
            listeners:
              - name: overload
                address: 127.0.0.1:0
                kind: http
                virtual_hosts:
                  - name: all
                    domains: ["*"]
                    routes: [{{ match: {{}}, cluster: c }}]
            clusters:
              - name: c
                endpoints: [{{ address: "{}" }}]
            "#,
            backend.addr()
        )
    };
    let rss = resident_bytes().unwrap();
    let proxy = start_proxy(&config(rss)).await;
    println!("overload: RSS {} MiB at start", rss >> 20);
    let admin = proxy.admin_addr();
    let addr = listener(&proxy, "overload");
    let state = || scrape(admin, names::OVERLOAD_STATE, &[]);

    let mut conn = H1Conn::connect(addr).await.unwrap();
    assert_eq!(get(&mut conn).await.unwrap().status, 200);

    let ballast = std::hint::black_box(vec![1u8; BALLAST]);
    // The sampler notices within `check_interval`; each request here is a
    // probe, so this is a bounded wait on the condition itself.
    let deadline = Instant::now() + Duration::from_secs(10);
    let shed = loop {
        let response = get(&mut conn).await.unwrap();
        if response.status == 503 {
            break response;
        }
        assert!(
            Instant::now() < deadline,
            "never shed: RSS stayed under shed_at"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(shed.header("x-postern-overloaded"), Some("true"));
    let served = backend.started();
    assert_eq!(state().await, 1.0);
    let mut fresh = H1Conn::connect(addr).await.unwrap();
    assert_eq!(
        get(&mut fresh).await.unwrap().status,
        503,
        "new connections are still accepted while shedding, and shed"
    );
    assert_eq!(
        backend.started(),
        served,
        "a shed request reached the backend"
    );

    // One allocation for the whole overload, so that freeing it takes the
    // process from paused to normal in one step.
    let ballast = {
        let bigger = std::hint::black_box(vec![1u8; 2 * BALLAST]);
        drop(ballast);
        bigger
    };
    wait_until("accepting paused past pause_accept_at", || async {
        state().await == 2.0
    })
    .await;
    // A connection made now waits in the listen queue, unanswered.
    let mut waiting = tokio::spawn(async move {
        let mut queued = H1Conn::connect(addr).await.unwrap();
        let first = get(&mut queued).await.unwrap();
        (queued, first)
    });
    assert!(
        tokio::time::timeout(Duration::from_millis(300), &mut waiting)
            .await
            .is_err(),
        "a connection was served while accepting was paused"
    );
    assert_eq!(get(&mut conn).await.unwrap().status, 503);

    drop(ballast);
    let (mut queued, first) = within(Duration::from_secs(10), "the queued connection", waiting)
        .await
        .unwrap();
    // The kernel frees a large mapping page table by page table, so the
    // sampler may catch the resident set on its way down, between the
    // thresholds: the queued connection is then accepted while requests
    // are still shed, and served at the next sample.
    assert!(
        first.status == 200
            || (first.status == 503 && first.header("x-postern-overloaded") == Some("true")),
        "the queued connection got {}",
        first.status
    );
    wait_until("recovered", || async { state().await == 0.0 }).await;
    assert_eq!(get(&mut queued).await.unwrap().status, 200);
    assert_eq!(get(&mut conn).await.unwrap().status, 200);
    assert_eq!(postern_tests::get(addr, "svc.local", "/").await.status, 200);
    let shed_total = scrape(
        admin,
        names::OVERLOAD_SHED_REQUESTS_TOTAL,
        &[("listener", "overload")],
    )
    .await;
    assert!(shed_total >= 3.0, "{shed_total} shed requests counted");
}

/// Whether a fresh TCP connection to `addr` carries a round trip through
/// the echo backend; `false` when the proxy closes it instead.
async fn echoes(addr: SocketAddr) -> bool {
    let Ok(mut conn) = TcpStream::connect(addr).await else {
        return false;
    };
    if conn.write_all(b"ping").await.is_err() {
        return false;
    }
    let mut buf = [0u8; 4];
    let read = within(
        Duration::from_secs(10),
        "echo or close",
        conn.read_exact(&mut buf),
    )
    .await;
    read.is_ok() && &buf == b"ping"
}

/// Hysteresis: ballast pushes the resident set past `shed_at`, then most
/// of it is freed so that the set hovers below the threshold but above its
/// release point. Requests stay shed, with no transition back and forth,
/// until the rest is freed. While shedding, a new connection to a TCP
/// listener is closed at once, counted, and never reaches its upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn below_the_threshold_but_above_its_release_point_the_proxy_keeps_shedding_without_flapping()
{
    // Separate mappings each (see the test above), freed one at a time.
    const BALLAST: usize = 40 << 20;
    let _serial = SERIAL.lock().await;
    let _recorder = postern::telemetry::install_prometheus_recorder();
    let backend = HttpBackend::start("b").await;
    let echo = postern_tests::tcp_backend::TcpBackend::echo().await;
    let rss = resident_bytes().unwrap();
    let ballast = BALLAST as u64;
    let max = rss + 8 * ballast;
    // Shedding from rss + 2.5 ballasts, released below rss + 0.75; the
    // pause is out of reach. No hold: only the release point keeps the
    // state. The margins leave room for what the proxy itself allocates
    // after `rss` was read (up to 15 MiB when this test runs alone).
    let threshold = rss + 5 * ballast / 2;
    let release_below = rss + 3 * ballast / 4;
    let shed = threshold as f64 / max as f64;
    let release = release_below as f64 / threshold as f64;
    let proxy = start_proxy(&format!(
        r#"
        overload: {{ max_rss_bytes: {max}, shed_at: {shed:.6}, pause_accept_at: 0.99, release: {release:.6}, min_hold: 0s, check_interval: 20ms }}
        listeners:
          - name: hover
            address: 127.0.0.1:0
            kind: http
            virtual_hosts:
              - name: all
                domains: ["*"]
                routes: [{{ match: {{}}, cluster: c }}]
          - name: raw
            address: 127.0.0.1:0
            kind: tcp
            tcp: {{ cluster: echo }}
        clusters:
          - name: c
            endpoints: [{{ address: "{}" }}]
          - name: echo
            endpoints: [{{ address: "{}" }}]
        "#,
        backend.addr(),
        echo.addr()
    ))
    .await;
    let admin = proxy.admin_addr();
    let addr = listener(&proxy, "hover");
    let raw = listener(&proxy, "raw");
    let state = || scrape(admin, names::OVERLOAD_STATE, &[]);
    let transitions = |from: &'static str, to: &'static str| async move {
        scrape(
            admin,
            names::OVERLOAD_TRANSITIONS_TOTAL,
            &[("from", from), ("to", to)],
        )
        .await
    };
    let entered_before = transitions("normal", "shedding").await;
    let left_before = transitions("shedding", "normal").await;

    let mut conn = H1Conn::connect(addr).await.unwrap();
    assert_eq!(get(&mut conn).await.unwrap().status, 200);
    assert!(echoes(raw).await, "TCP proxying works before the overload");

    let kept = std::hint::black_box(vec![1u8; BALLAST]);
    let freed = std::hint::black_box([vec![1u8; BALLAST], vec![1u8; BALLAST]]);
    wait_until("shedding past shed_at", || async { state().await == 1.0 }).await;
    assert_eq!(get(&mut conn).await.unwrap().status, 503);
    let proxied = echo.connections();
    assert!(
        !echoes(raw).await,
        "a TCP connection was proxied while shedding"
    );
    assert_eq!(
        echo.connections(),
        proxied,
        "a shed connection reached the upstream"
    );
    assert_eq!(
        scrape(
            admin,
            names::OVERLOAD_SHED_CONNECTIONS_TOTAL,
            &[("listener", "raw")]
        )
        .await,
        1.0
    );
    assert_eq!(
        scrape(
            admin,
            "postern_tcp_connections_total",
            &[("listener", "raw"), ("result", "overloaded")]
        )
        .await,
        1.0
    );

    drop(freed);
    wait_until("the resident set below the threshold", || async {
        resident_bytes().unwrap() < threshold
    })
    .await;
    let hovering = resident_bytes().unwrap();
    println!(
        "hysteresis: hovering {} MiB above the start, threshold +{} MiB, release below +{} MiB",
        (hovering - rss) >> 20,
        (threshold - rss) >> 20,
        (release_below - rss) >> 20
    );
    assert!(
        hovering >= release_below,
        "the resident set fell past the release point too: the test measures nothing"
    );
    // About 50 samples below the threshold: each would have eased the
    // state without hysteresis.
    let until = Instant::now() + Duration::from_secs(1);
    while Instant::now() < until {
        assert_eq!(state().await, 1.0, "eased above the release point");
        assert_eq!(get(&mut conn).await.unwrap().status, 503);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(transitions("shedding", "normal").await, left_before);

    drop(kept);
    wait_until("recovered below the release point", || async {
        state().await == 0.0
    })
    .await;
    assert_eq!(get(&mut conn).await.unwrap().status, 200);
    assert!(echoes(raw).await, "TCP proxying works again");
    assert_eq!(
        transitions("normal", "shedding").await,
        entered_before + 1.0,
        "the state flapped"
    );
    assert_eq!(transitions("shedding", "normal").await, left_before + 1.0);
}

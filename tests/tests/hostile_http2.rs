//! HTTP/2 under attack, with frames written by hand (`postern_tests::h2raw`):
//! header blocks that would inject CRLF or pseudo-headers into an HTTP/1
//! upstream, and floods of resets, CONTINUATION, PING, SETTINGS and empty
//! DATA frames, plus zero-window stalls on many streams.
//!
//! The floods run one after another in one test, each from its own thread
//! and runtime (as a separate client process would), while a well-behaved
//! HTTP/2 client on another connection, also on its own thread, keeps
//! measuring its latency. Bounds asserted here (figures measured on the
//! 2-core CI machine are in `docs/security.md`):
//!
//! - rapid reset, CONTINUATION and empty-DATA floods end in GOAWAY (or a
//!   close) within [`FLOOD_CAP`], and at most [`MAX_UPSTREAM_FROM_RESETS`]
//!   of the reset streams reach the upstream;
//! - PING and SETTINGS floods are answered frame by frame, never queued: a
//!   reading flooder costs at most [`MAX_CPU_PER_FRAME`] of process CPU per
//!   frame, one that does not read is stopped by TCP back-pressure;
//! - a zero-window stall on every stream is closed after the idle timeout;
//! - the process RSS grows by at most [`MAX_RSS_GROWTH_KIB`] per attack;
//! - a well-behaved client on another connection gets every answer during
//!   each attack. Its p99 against its baseline is measured and printed;
//!   the 2× target is asserted only with `POSTERN_STRICT_P99=1`, because a
//!   timed bound on a tail percentile fails on scheduler noise alone when
//!   the attacker, the proxy and the measuring client share two cores.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use postern_tests::capture::CaptureBackend;
use postern_tests::h2raw::{self, flag, kind, Event, RawH2};
use postern_tests::{empty, listener, request, start_proxy, H2Conn, HttpBackend};

/// How long a flood may run before it must have been cut off.
const FLOOD_CAP: Duration = Duration::from_secs(5);
/// Reset streams that may reach the upstream before the GOAWAY.
const MAX_UPSTREAM_FROM_RESETS: usize = 250;
/// Process CPU (proxy, attacker and measuring client together) per flood frame.
const MAX_CPU_PER_FRAME: Duration = Duration::from_micros(50);
/// Process RSS growth allowed for one attack.
const MAX_RSS_GROWTH_KIB: i64 = 64 * 1024;
/// ENHANCE_YOUR_CALM.
const ENHANCE_YOUR_CALM: u32 = 0xb;

fn config(upstream: SocketAddr, limits: &str) -> String {
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
                  - match: {{}}
                    cluster: c
        clusters:
          - name: c
            protocol: http1
            endpoints: [{{ address: "{upstream}" }}]
        "#
    )
}

type Fields = Vec<(&'static [u8], &'static [u8])>;

fn get(extra: &[(&'static [u8], &'static [u8])]) -> Fields {
    h2raw::get_fields(b"a", b"/", extra)
}

fn with(pseudo: &[(&'static [u8], &'static [u8])]) -> Fields {
    pseudo.to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_header_blocks_never_reach_an_http1_upstream() {
    let capture = CaptureBackend::start().await;
    let proxy = start_proxy(&config(capture.addr(), "")).await;
    let edge = listener(&proxy, "edge");
    let cases: Vec<(&str, Fields)> = vec![
        ("CRLF in a value", get(&[(b"x-a", b"b\r\nx-injected: 1")])),
        ("LF in a value", get(&[(b"x-a", b"b\nx-injected: 1")])),
        ("NUL in a value", get(&[(b"x-a", b"b\x00c")])),
        ("CRLF in a name", get(&[(b"x-a\r\nx-b", b"1")])),
        ("upper-case name", get(&[(b"X-Upper", b"1")])),
        ("colon in a name", get(&[(b"x:a", b"1")])),
        ("space in a name", get(&[(b"x a", b"1")])),
        ("empty name", get(&[(b"", b"1")])),
        (
            "request line in :path",
            h2raw::get_fields(b"a", b"/ HTTP/1.1\r\nHost: evil\r\n\r\nGET /smuggled", &[]),
        ),
        ("space in :path", h2raw::get_fields(b"a", b"/a b", &[])),
        ("empty :path", h2raw::get_fields(b"a", b"", &[])),
        ("relative :path", h2raw::get_fields(b"a", b"a/b", &[])),
        ("* :path on GET", h2raw::get_fields(b"a", b"*", &[])),
        (
            "CRLF in :authority",
            h2raw::get_fields(b"a\r\nx-injected: 1", b"/", &[]),
        ),
        (
            "userinfo in :authority",
            h2raw::get_fields(b"u@a", b"/", &[]),
        ),
        ("space in :authority", h2raw::get_fields(b"a b", b"/", &[])),
        ("host differs from :authority", get(&[(b"host", b"b")])),
        (
            "request line in :method",
            with(&[
                (b":method", b"GET /x HTTP/1.1\r\n"),
                (b":scheme", b"http"),
                (b":authority", b"a"),
                (b":path", b"/"),
            ]),
        ),
        (
            "no :method",
            with(&[
                (b":scheme", b"http"),
                (b":authority", b"a"),
                (b":path", b"/"),
            ]),
        ),
        (
            "no :path",
            with(&[
                (b":method", b"GET"),
                (b":scheme", b"http"),
                (b":authority", b"a"),
            ]),
        ),
        (
            "no :scheme",
            with(&[
                (b":method", b"GET"),
                (b":authority", b"a"),
                (b":path", b"/"),
            ]),
        ),
        ("two :path", get(&[(b":path", b"/evil")])),
        (
            "pseudo-header after a regular one",
            with(&[
                (b":method", b"GET"),
                (b":scheme", b"http"),
                (b"x-a", b"1"),
                (b":authority", b"a"),
                (b":path", b"/"),
            ]),
        ),
        ("unknown pseudo-header", get(&[(b":foo", b"1")])),
        ("connection", get(&[(b"connection", b"keep-alive")])),
        (
            "transfer-encoding",
            get(&[(b"transfer-encoding", b"chunked")]),
        ),
        ("te other than trailers", get(&[(b"te", b"gzip")])),
        ("upgrade", get(&[(b"upgrade", b"websocket")])),
        ("keep-alive", get(&[(b"keep-alive", b"1")])),
        ("proxy-connection", get(&[(b"proxy-connection", b"1")])),
        (
            "content-length without the body",
            get(&[(b"content-length", b"5")]),
        ),
        (
            "CONNECT",
            with(&[(b":method", b"CONNECT"), (b":authority", b"a:443")]),
        ),
    ];
    let mut failures = Vec::new();
    for (name, fields) in &cases {
        let before = capture.requests().len();
        let mut conn = RawH2::connect(edge, &[]).await.unwrap();
        conn.headers(1, fields, true).await.unwrap();
        // A reset or GOAWAY is a refusal too: no status then.
        let outcome = conn
            .wait_for(Duration::from_secs(5), |event| match event {
                Event::Reset { stream: 1, .. } | Event::GoAway { .. } => Some(None),
                Event::Headers { stream: 1, .. } => Some(event.status()),
                _ => None,
            })
            .await;
        match outcome {
            Some(Some(status)) if status < 400 => {
                failures.push(format!("{name}: answered {status}"));
            }
            None => failures.push(format!("{name}: no reset, GOAWAY or answer within 5s")),
            Some(_) => {}
        }
        let new = capture.requests().split_off(before);
        if !new.is_empty() {
            failures.push(format!("{name}: reached the upstream as {new:?}"));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));

    // What is allowed arrives in HTTP/1.1 form: crumbled cookies joined,
    // `te: trailers` kept, and nothing only Postern may say.
    let mut conn = RawH2::connect(edge, &[]).await.unwrap();
    let fields = get(&[
        (b"cookie", b"a=1"),
        (b"cookie", b"b=2"),
        (b"te", b"trailers"),
        (b"x-postern-overloaded", b"true"),
        (b"x_forwarded_for", b"203.0.113.9"),
        (b"x-forwarded-host", b"evil.example"),
    ]);
    conn.headers(1, &fields, true).await.unwrap();
    let status = conn.wait_for(Duration::from_secs(5), |e| e.status()).await;
    assert_eq!(status, Some(200));
    let seen = capture.requests().pop().unwrap();
    assert_eq!(seen.header("cookie"), Some("a=1; b=2"));
    assert_eq!(seen.header("te"), Some("trailers"));
    for name in [
        "x-postern-overloaded",
        "x_forwarded_for",
        "x-forwarded-host",
    ] {
        assert_eq!(seen.header(name), None, "{name} reached the upstream");
    }
    assert_eq!(seen.header("x-forwarded-for"), Some("127.0.0.1"));
    assert!(
        capture.violations().is_empty(),
        "{:?}",
        capture.violations()
    );
}

/// Process CPU time so far (user and system), from /proc.
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..]
        .split_whitespace()
        .collect();
    // utime and stime, in clock ticks of 10 ms (USER_HZ is 100 on Linux).
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    Duration::from_millis(ticks * 10)
}

/// Resident set size of this process, in KiB.
fn rss_kib() -> i64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

/// What one flood came to.
#[derive(Debug)]
struct FloodOutcome {
    /// Frames (or frame pairs) the attacker got written.
    frames: u64,
    /// How the server ended it, if it did within the cap.
    ended_by: Option<Event>,
    /// The attacker's writes stopped being accepted (TCP back-pressure).
    blocked: bool,
    elapsed: Duration,
}

/// Writes `batch` (whole frames, `per_batch` attack frames) up to `rounds`
/// times or until the server ends the connection, [`FLOOD_CAP`] passes, or
/// a write blocks for a second.
async fn flood(conn: &mut RawH2, batch: &[u8], per_batch: u64, rounds: u64) -> FloodOutcome {
    let started = Instant::now();
    let mut outcome = FloodOutcome {
        frames: 0,
        ended_by: None,
        blocked: false,
        elapsed: Duration::ZERO,
    };
    for _ in 0..rounds {
        if started.elapsed() > FLOOD_CAP {
            break;
        }
        match tokio::time::timeout(Duration::from_secs(1), conn.write(batch)).await {
            Ok(Ok(())) => outcome.frames += per_batch,
            Ok(Err(_)) => break,
            Err(_) => {
                outcome.blocked = true;
                break;
            }
        }
        if let Some(end) = conn
            .drain()
            .into_iter()
            .find(|e| matches!(e, Event::GoAway { .. } | Event::Closed))
        {
            outcome.ended_by = Some(end);
            break;
        }
    }
    if outcome.ended_by.is_none() && !outcome.blocked {
        // The end may still be on its way after the last write.
        outcome.ended_by = conn
            .wait_for(Duration::from_millis(500), |e| {
                matches!(e, Event::GoAway { .. } | Event::Closed).then(|| e.clone())
            })
            .await;
    }
    outcome.elapsed = started.elapsed();
    outcome
}

/// Runs `attack` on its own thread and runtime, as another process would.
fn on_own_thread<T: Send + 'static>(
    attack: impl std::future::Future<Output = T> + Send + 'static,
) -> std::thread::JoinHandle<T> {
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(attack)
    })
}

/// Latencies of `count` sequential GETs on one HTTP/2 connection, sorted.
async fn latencies(addr: SocketAddr, count: usize) -> Vec<Duration> {
    let mut conn = H2Conn::connect(addr).await.unwrap();
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        let started = Instant::now();
        let response = conn
            .send(request("GET", "a", "/ok").body(empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(response.status, 200);
        out.push(started.elapsed());
    }
    out.sort_unstable();
    out
}

fn p99(sorted: &[Duration]) -> Duration {
    sorted[(sorted.len() * 99 / 100).min(sorted.len() - 1)]
}

/// One attack's figures, printed for `docs/security.md`.
struct Measured {
    name: &'static str,
    outcome: FloodOutcome,
    cpu: Duration,
    rss_growth_kib: i64,
    p99: Duration,
}

async fn measure(
    name: &'static str,
    edge: SocketAddr,
    attack: impl std::future::Future<Output = FloodOutcome> + Send + 'static,
) -> Measured {
    let (rss, cpu) = (rss_kib(), cpu_time());
    let attacker = on_own_thread(attack);
    let client = on_own_thread(latencies(edge, 200));
    let outcome = tokio::task::spawn_blocking(move || attacker.join().unwrap())
        .await
        .unwrap();
    let samples = tokio::task::spawn_blocking(move || client.join().unwrap())
        .await
        .unwrap();
    Measured {
        name,
        outcome,
        cpu: cpu_time().saturating_sub(cpu),
        rss_growth_kib: rss_kib() - rss,
        p99: p99(&samples),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn floods_are_cut_off_or_bounded_while_others_stay_served() {
    let backend = HttpBackend::start("b").await;
    // A short idle timeout so the zero-window stall is seen to end.
    let proxy = start_proxy(&config(backend.addr(), "idle_timeout: 2s")).await;
    let edge = listener(&proxy, "edge");

    // Warm up pools and allocators, then take the baseline.
    latencies(edge, 50).await;
    let baseline = {
        let client = on_own_thread(latencies(edge, 200));
        p99(&tokio::task::spawn_blocking(move || client.join().unwrap())
            .await
            .unwrap())
    };

    let mut results = Vec::new();

    // Rapid reset (CVE-2023-44487): open a stream, cancel it, again.
    let started_before = backend.started();
    let rapid = measure("rapid reset", edge, async move {
        let mut conn = RawH2::connect(edge, &[]).await.unwrap();
        let block = h2raw::encode_fields(&get(&[]));
        let cancel = h2raw::CANCEL.to_be_bytes();
        let mut batch = Vec::new();
        for i in 0..10_000u32 {
            let flags = flag::END_HEADERS | flag::END_STREAM;
            batch.extend(h2raw::frame(kind::HEADERS, flags, 2 * i + 1, &block));
            batch.extend(h2raw::frame(kind::RST_STREAM, 0, 2 * i + 1, &cancel));
        }
        flood(&mut conn, &batch, 10_000, 1).await
    })
    .await;
    let reached = backend.started() - started_before;
    assert!(
        matches!(
            rapid.outcome.ended_by,
            Some(
                Event::GoAway {
                    code: ENHANCE_YOUR_CALM,
                    ..
                } | Event::Closed
            )
        ),
        "rapid reset: {:?}",
        rapid.outcome
    );
    assert!(
        reached <= MAX_UPSTREAM_FROM_RESETS,
        "{reached} reset streams reached the upstream"
    );
    results.push(rapid);

    // CONTINUATION flood (CVE-2024-27316 family): a header block that never ends.
    results.push(
        measure("CONTINUATION flood", edge, async move {
            let mut conn = RawH2::connect(edge, &[]).await.unwrap();
            let block = h2raw::encode_fields(&get(&[]));
            conn.write(&h2raw::frame(kind::HEADERS, flag::END_STREAM, 1, &block))
                .await
                .unwrap();
            let junk = h2raw::encode_fields(&[(b"x-junk", &[b'a'; 16_000])]);
            let mut batch = Vec::new();
            for _ in 0..16 {
                batch.extend(h2raw::frame(kind::CONTINUATION, 0, 1, &junk));
            }
            // At most 64 MiB.
            flood(&mut conn, &batch, 16, 256).await
        })
        .await,
    );

    // Empty DATA frames: framing overhead with no payload.
    let empty_data = measure("empty DATA flood", edge, async move {
        let mut conn = RawH2::connect(edge, &[]).await.unwrap();
        let block = h2raw::encode_fields(&[
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":authority", b"a"),
            (b":path", b"/flood"),
        ]);
        conn.write(&h2raw::frame(kind::HEADERS, flag::END_HEADERS, 1, &block))
            .await
            .unwrap();
        let batch: Vec<u8> = (0..10_000)
            .flat_map(|_| h2raw::frame(kind::DATA, 0, 1, &[]))
            .collect();
        flood(&mut conn, &batch, 10_000, 100).await
    })
    .await;
    assert!(
        backend
            .requests()
            .iter()
            .all(|r| r.path_and_query() != "/flood"),
        "the flooded request completed upstream"
    );
    results.push(empty_data);

    // PING and SETTINGS floods from a client that reads every answer.
    for (name, one) in [
        (
            "PING flood (reading)",
            h2raw::frame(kind::PING, 0, 0, &[7; 8]),
        ),
        (
            "SETTINGS flood (reading)",
            h2raw::settings(&[(h2raw::SETTINGS_INITIAL_WINDOW_SIZE, 65_535)]),
        ),
    ] {
        let batch = one.repeat(10_000);
        results.push(
            measure(name, edge, async move {
                let mut conn = RawH2::connect(edge, &[]).await.unwrap();
                flood(&mut conn, &batch, 10_000, 20).await
            })
            .await,
        );
    }

    // A PING flood from a client that never reads: the proxy must stop
    // reading too rather than queue answers.
    results.push(
        measure("PING flood (not reading)", edge, async move {
            let stream = tokio::net::TcpStream::connect(edge).await.unwrap();
            let (_read, mut write) = stream.into_split();
            let mut hello = h2raw::PREFACE.to_vec();
            hello.extend(h2raw::settings(&[]));
            let batch = h2raw::frame(kind::PING, 0, 0, &[7; 8]).repeat(10_000);
            use tokio::io::AsyncWriteExt as _;
            write.write_all(&hello).await.unwrap();
            let started = Instant::now();
            let mut outcome = FloodOutcome {
                frames: 0,
                ended_by: None,
                blocked: false,
                elapsed: Duration::ZERO,
            };
            // At most 400 rounds, 68 MiB.
            for _ in 0..400 {
                match tokio::time::timeout(Duration::from_secs(1), write.write_all(&batch)).await {
                    Ok(Ok(())) => outcome.frames += 10_000,
                    Ok(Err(_)) => {
                        outcome.ended_by = Some(Event::Closed);
                        break;
                    }
                    Err(_) => {
                        outcome.blocked = true;
                        break;
                    }
                }
            }
            outcome.elapsed = started.elapsed();
            outcome
        })
        .await,
    );

    // Zero-window stall: every stream asks for a large body and the client
    // grants no flow-control window, so nothing can move.
    results.push(
        measure("zero-window stall, 100 streams", edge, async move {
            let params = [(h2raw::SETTINGS_INITIAL_WINDOW_SIZE, 0)];
            let mut conn = RawH2::connect(edge, &params).await.unwrap();
            let started = Instant::now();
            for i in 0..100u32 {
                let fields =
                    h2raw::get_fields(b"a", b"/big", &[(b"x-test-body-bytes", b"4194304")]);
                conn.headers(2 * i + 1, &fields, true).await.unwrap();
            }
            let ended_by = conn
                .wait_for(FLOOD_CAP, |e| {
                    matches!(e, Event::GoAway { .. } | Event::Closed).then(|| e.clone())
                })
                .await;
            FloodOutcome {
                frames: 100,
                ended_by,
                blocked: false,
                elapsed: started.elapsed(),
            }
        })
        .await,
    );

    let mut report = vec![format!(
        "well-behaved client baseline p99: {:.1} ms",
        baseline.as_secs_f64() * 1e3
    )];
    for m in &results {
        report.push(format!(
            "{}: {} frames in {:.0} ms, ended by {:?}, blocked {}, process CPU {} ms ({:.2} µs/frame), RSS {:+} KiB, other client p99 {:.1} ms ({:.1}× baseline)",
            m.name,
            m.outcome.frames,
            m.outcome.elapsed.as_secs_f64() * 1e3,
            m.outcome.ended_by,
            m.outcome.blocked,
            m.cpu.as_millis(),
            m.cpu.as_secs_f64() * 1e6 / m.outcome.frames.max(1) as f64,
            m.rss_growth_kib,
            m.p99.as_secs_f64() * 1e3,
            m.p99.as_secs_f64() / baseline.as_secs_f64(),
        ));
    }
    let report = report.join("\n");
    println!("{report}");

    let strict = std::env::var_os("POSTERN_STRICT_P99").is_some();
    for m in &results {
        let ended = m.outcome.ended_by.is_some();
        match m.name {
            "rapid reset" | "CONTINUATION flood" | "empty DATA flood" => {
                assert!(ended, "{}: not cut off\n{report}", m.name);
                assert!(
                    m.outcome.elapsed <= FLOOD_CAP + Duration::from_secs(2),
                    "{report}"
                );
            }
            "zero-window stall, 100 streams" => {
                assert!(
                    ended,
                    "{}: not closed at the idle timeout\n{report}",
                    m.name
                );
            }
            "PING flood (not reading)" => {
                assert!(
                    m.outcome.blocked || ended,
                    "{}: the proxy kept reading\n{report}",
                    m.name
                );
            }
            _ => {
                let per_frame = m.cpu / u32::try_from(m.outcome.frames.max(1)).unwrap();
                assert!(per_frame <= MAX_CPU_PER_FRAME, "{}\n{report}", m.name);
            }
        }
        assert!(
            m.rss_growth_kib <= MAX_RSS_GROWTH_KIB,
            "{}: RSS grew by {} KiB\n{report}",
            m.name,
            m.rss_growth_kib
        );
        if strict {
            assert!(
                m.p99 <= baseline * 2,
                "{}: the other client's p99 {:?} is over twice its baseline\n{report}",
                m.name,
                m.p99
            );
        }
    }
    // And the proxy still serves after all of it.
    assert_eq!(latencies(edge, 5).await.len(), 5);
}

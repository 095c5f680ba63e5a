//! Races between a request and the end of the HTTP/2 upstream connection it
//! was given (issue #8: one HTTP/2 request answered 502 in a soak).
//!
//! An HTTP/2 upstream may refuse a stream (`REFUSED_STREAM`), which it
//! provably did not process: Postern sends such a request again, whatever
//! its method, instead of answering 502. It may also go away gracefully
//! (GOAWAY `NO_ERROR`) while requests are being assigned to it: hyper cannot
//! say whether those went out, so they are not sent again, but none may hang
//! or run twice. The upstreams here make these races happen on every
//! connection (or every request) instead of once in two million.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use postern_tests::{empty, full, get, listener, request, send, start_proxy, within};
use tokio::net::TcpListener;
use tokio::task::JoinSet;

/// How the test upstream treats the streams it gets.
#[derive(Clone, Copy)]
enum Mode {
    /// `REFUSED_STREAM` the first time each path arrives; answer the next.
    RefuseFirst,
    /// Answer the first request of each connection, then go away
    /// gracefully, answering what it had accepted by then.
    GoAwayAfterFirst,
}

/// An HTTP/2 (h2c) upstream that counts the arrivals of each path.
struct H2Upstream {
    addr: SocketAddr,
    /// Arrivals per path, refused ones included.
    seen: Arc<Mutex<HashMap<String, u32>>>,
    /// Requests answered 200.
    answered: Arc<Mutex<HashMap<String, u32>>>,
    _task: tokio::task::JoinHandle<()>,
}

impl H2Upstream {
    async fn start(mode: Mode) -> Self {
        let socket = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = socket.local_addr().expect("addr");
        let seen: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
        let answered: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
        let (s, a) = (seen.clone(), answered.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = socket.accept().await else {
                    continue;
                };
                let (seen, answered) = (s.clone(), a.clone());
                tokio::spawn(async move {
                    let _ = serve(stream, mode, seen, answered).await;
                });
            }
        });
        H2Upstream {
            addr,
            seen,
            answered,
            _task: task,
        }
    }
}

async fn serve(
    stream: tokio::net::TcpStream,
    mode: Mode,
    seen: Arc<Mutex<HashMap<String, u32>>>,
    answered: Arc<Mutex<HashMap<String, u32>>>,
) -> Result<(), h2::Error> {
    let mut conn = h2::server::handshake(stream).await?;
    let mut first = true;
    while let Some(accepted) = conn.accept().await {
        let (req, mut respond) = accepted?;
        let path = req.uri().path().to_string();
        let arrivals = {
            let mut seen = seen.lock().expect("lock");
            let n = seen.entry(path.clone()).or_default();
            *n += 1;
            *n
        };
        if matches!(mode, Mode::RefuseFirst) && arrivals == 1 {
            respond.send_reset(h2::Reason::REFUSED_STREAM);
            continue;
        }
        if req.body().is_end_stream() {
            // Inline, so that a GOAWAY after the first answer is certain.
            answer(req, respond, &answered).await?;
        } else {
            // A body comes in frames that only polling the connection
            // reads, so it is read beside the accept loop.
            let answered = answered.clone();
            tokio::spawn(async move { answer(req, respond, &answered).await });
        }
        if first && matches!(mode, Mode::GoAwayAfterFirst) {
            first = false;
            conn.graceful_shutdown();
        }
    }
    Ok(())
}

/// Reads the body whole, as an app would, then answers 200 "ok".
async fn answer(
    req: http::Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
    answered: &Mutex<HashMap<String, u32>>,
) -> Result<(), h2::Error> {
    let path = req.uri().path().to_string();
    let mut body = req.into_body();
    while let Some(chunk) = body.data().await {
        let chunk = chunk?;
        let _ = body.flow_control().release_capacity(chunk.len());
    }
    let mut send = respond.send_response(http::Response::new(()), false)?;
    send.send_data(Bytes::from_static(b"ok"), true)?;
    *answered.lock().expect("lock").entry(path).or_default() += 1;
    Ok(())
}

fn config(upstream: SocketAddr) -> String {
    format!(
        "
listeners:
  - name: edge
    address: 127.0.0.1:0
    kind: http
    virtual_hosts:
      - name: all
        domains: [\"*\"]
        routes:
          - match: {{ path: {{ prefix: /retry/ }} }}
            cluster: up
            retry:
              on: [reset]
              max_attempts: 2
              backoff_base: 1ms
          - match: {{ path: {{ prefix: / }} }}
            cluster: up
clusters:
  - name: up
    protocol: http2
    endpoints: [{{ address: \"{upstream}\" }}]
"
    )
}

/// Sends `count` requests, `concurrency` at a time, each on its own
/// HTTP/1.1 connection; returns the paths that did not get a 200, with
/// their status.
async fn run(
    edge: SocketAddr,
    count: usize,
    concurrency: usize,
    make: fn(usize) -> http::Request<postern_tests::Body>,
) -> Vec<(String, u16)> {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let failed: Arc<Mutex<Vec<(String, u16)>>> = Arc::default();
    let mut tasks = JoinSet::new();
    for _ in 0..concurrency {
        let (next, failed) = (next.clone(), failed.clone());
        tasks.spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= count {
                    return;
                }
                let req = make(i);
                let path = req.uri().path().to_string();
                let response = send(edge, req).await;
                if response.status != 200 {
                    failed
                        .lock()
                        .expect("lock")
                        .push((path, response.status.as_u16()));
                }
            }
        });
    }
    within(Duration::from_secs(25), "all requests", async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    let failed = failed.lock().expect("lock").clone();
    failed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_stream_is_sent_again_whatever_the_method() {
    let upstream = H2Upstream::start(Mode::RefuseFirst).await;
    let proxy = start_proxy(&config(upstream.addr)).await;
    let edge = listener(&proxy, "edge");

    // No retry policy: a GET is sent again by the pool itself.
    let response = get(edge, "svc", "/plain/get").await;
    assert_eq!(response.status, 200, "{:?}", response.body);

    // Nor a body-less POST: refused means unprocessed, whatever the method.
    let post = request("POST", "svc", "/plain/post")
        .body(empty())
        .expect("request");
    let response = send(edge, post).await;
    assert_eq!(response.status, 200, "{:?}", response.body);

    // A route that retries on resets buffers a small PUT, and sends it
    // again after a refusal with its body.
    let put = request("PUT", "svc", "/retry/put")
        .body(full("hello"))
        .expect("request");
    let response = send(edge, put).await;
    assert_eq!(response.status, 200, "{:?}", response.body);

    let failed = run(edge, 200, 8, |i| {
        request("GET", "svc", &format!("/many/{i}"))
            .body(empty())
            .expect("request")
    })
    .await;
    assert!(failed.is_empty(), "{} failed: {failed:?}", failed.len());
    let seen = upstream.seen.lock().expect("lock").clone();
    let answered = upstream.answered.lock().expect("lock").clone();
    for i in 0..200 {
        let path = format!("/many/{i}");
        assert_eq!(
            seen.get(&path),
            Some(&2),
            "{path}: refused once, then sent once"
        );
        assert_eq!(answered.get(&path), Some(&1), "{path}: processed once");
    }
}

/// A graceful GOAWAY racing new streams: hyper cannot tell a stream the
/// GOAWAY left out from one it had already sent, so these are not sent
/// again (a resend was seen to run a request twice). What must hold is that
/// no request runs twice and every 200 is a request that ran once; the
/// 502s left are counted (`--nocapture`), and docs/security.md lists them.
/// No request may hang either: `send` fails the test after 10 s, and before
/// the fix about one run in two had requests waiting there for an answer
/// from a connection whose dispatch task had ended (a 504 at the route's
/// 15 s deadline).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_racing_a_graceful_goaway_never_run_twice() {
    let upstream = H2Upstream::start(Mode::GoAwayAfterFirst).await;
    let proxy = start_proxy(&config(upstream.addr)).await;
    let edge = listener(&proxy, "edge");

    let count = 1500;
    let failed = run(edge, count, 16, |i| {
        request("GET", "svc", &format!("/race/{i}"))
            .body(empty())
            .expect("request")
    })
    .await;
    println!(
        "graceful GOAWAY races: {} of {count} answered 502",
        failed.len()
    );
    assert!(
        failed.iter().all(|(_, status)| *status == 502),
        "{failed:?}"
    );
    let answered = upstream.answered.lock().expect("lock").clone();
    for i in 0..count {
        let path = format!("/race/{i}");
        let runs = answered.get(&path).copied().unwrap_or(0);
        assert!(runs <= 1, "{path} ran {runs} times");
        if !failed.iter().any(|(p, _)| *p == path) {
            assert_eq!(runs, 1, "{path} answered 200 without running");
        }
    }
}

/// An HTTP/1.1 upstream that answers each request with a kept-alive
/// response and then closes the connection: Postern pools it as idle, and
/// the next request races the FIN.
async fn closing_h1_upstream() -> (SocketAddr, Arc<Mutex<HashMap<String, u32>>>) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let socket = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = socket.local_addr().expect("addr");
    let answered: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let a = answered.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = socket.accept().await else {
                continue;
            };
            let answered = a.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let text = String::from_utf8_lossy(&head);
                let path = text.split(' ').nth(1).unwrap_or("").to_string();
                *answered.lock().expect("lock").entry(path).or_default() += 1;
                let _ = stream
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    .await;
            });
        }
    });
    (addr, answered)
}

/// Kept-alive HTTP/1.1 upstream connections that close right after their
/// answer: a request given one as it closes is sent again when hyper hands
/// it back unsent, and never hangs or runs twice. One whose bytes crossed
/// the FIN gets a 502 (1 to 7 of the 1,500 here): Postern cannot tell it
/// from a request the upstream read and then reset on, which only a route
/// retry policy may send again (`resilience.rs`). Counted with `--nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_racing_an_http1_upstream_close_never_hang_or_run_twice() {
    let (addr, answered) = closing_h1_upstream().await;
    let yaml = config(addr).replace("protocol: http2", "protocol: http1");
    let proxy = start_proxy(&yaml).await;
    let edge = listener(&proxy, "edge");
    let count = 1500;
    let failed = run(edge, count, 16, |i| {
        request("GET", "svc", &format!("/close/{i}"))
            .body(empty())
            .expect("request")
    })
    .await;
    println!(
        "HTTP/1.1 close races: {} of {count} answered 502",
        failed.len()
    );
    assert!(
        failed.iter().all(|(_, status)| *status == 502),
        "{failed:?}"
    );
    let answered = answered.lock().expect("lock").clone();
    for i in 0..count {
        let path = format!("/close/{i}");
        let runs = answered.get(&path).copied().unwrap_or(0);
        assert!(runs <= 1, "{path} ran {runs} times");
        if !failed.iter().any(|(p, _)| *p == path) {
            assert_eq!(runs, 1, "{path} answered 200 without running");
        }
    }
}

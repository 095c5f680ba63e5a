//! `postern wait-ready`: polls a proxy's `GET /ready` until it answers 200.
//!
//! Used where something must not start before the sidecar serves: a
//! container's `postStart` hook, a script, or the sidecar's own probes
//! (which keeps the admin server on loopback). Polling is the only way to
//! observe another process's readiness over HTTP; the interval starts short
//! and backs off so a slow start costs few requests.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::Instant;

/// First pause between polls.
const FIRST_DELAY: Duration = Duration::from_millis(50);
/// Longest pause between polls.
const MAX_DELAY: Duration = Duration::from_secs(1);
/// Longest wait for one answer, so a hung server cannot eat the deadline.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);
/// Shortest wait for one answer.
const MIN_ATTEMPT: Duration = Duration::from_millis(100);

/// Errors of `postern wait-ready`.
#[derive(Debug, thiserror::Error)]
pub enum WaitReadyError {
    /// The deadline passed without a 200.
    #[error("{addr} was not ready after {}: last answer: {last}", humantime::format_duration(*waited))]
    Timeout {
        /// The admin address polled.
        addr: SocketAddr,
        /// How long it waited.
        waited: Duration,
        /// What the last poll saw (a status and body, or a connect error).
        last: String,
    },
}

/// `postern wait-ready`: flags.
#[derive(Debug, Clone, clap::Args)]
pub struct WaitReadyArgs {
    /// The proxy's admin server.
    #[arg(long, env = "POSTERN_ADMIN_ADDRESS", default_value = "127.0.0.1:15000")]
    pub admin_address: SocketAddr,
    /// How long to wait, e.g. `60s` or `2m`.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

/// The pause after `delay`: doubled, at most [`MAX_DELAY`].
fn next_delay(delay: Duration) -> Duration {
    (delay * 2).min(MAX_DELAY)
}

/// Polls `GET /ready` on `addr` until it answers 200 or `timeout` passes.
///
/// # Errors
///
/// [`WaitReadyError::Timeout`], with what the last poll saw.
pub async fn wait_ready(addr: SocketAddr, timeout: Duration) -> Result<(), WaitReadyError> {
    let start = Instant::now();
    let deadline = start + timeout;
    let mut delay = FIRST_DELAY;
    loop {
        // The last poll may overrun the deadline a little rather than ask
        // with no time to answer.
        let limit = deadline
            .saturating_duration_since(Instant::now())
            .clamp(MIN_ATTEMPT, ATTEMPT_TIMEOUT);
        let last = match tokio::time::timeout(limit, probe(addr)).await {
            Ok(Ok((200, _))) => return Ok(()),
            Ok(Ok((status, body))) => format!("{status} {}", body.trim()),
            Ok(Err(err)) => err,
            Err(_) => format!("no answer within {}", humantime::format_duration(limit)),
        };
        let now = Instant::now();
        if now >= deadline {
            let waited = now - start;
            return Err(WaitReadyError::Timeout {
                addr,
                // Whole milliseconds read better than humantime's nanoseconds.
                waited: Duration::from_millis(
                    u64::try_from(waited.as_millis()).unwrap_or(u64::MAX),
                ),
                last,
            });
        }
        tokio::time::sleep(delay.min(deadline - now)).await;
        delay = next_delay(delay);
    }
}

/// One `GET /ready` on a new connection: the status and body, or why it
/// could not be asked.
async fn probe(addr: SocketAddr) -> Result<(u16, String), String> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("cannot connect: {e}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("HTTP handshake: {e}"))?;
    let conn = tokio::spawn(conn);
    let request = http::Request::get("/ready")
        .header(http::header::HOST, addr.to_string())
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let result = async {
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| format!("request failed: {e}"))?;
        let status = response.status().as_u16();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("reading the answer: {e}"))?
            .to_bytes();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }
    .await;
    conn.abort();
    result
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn delay_doubles_up_to_a_second() {
        let mut d = FIRST_DELAY;
        let mut seen = vec![d];
        for _ in 0..6 {
            d = next_delay(d);
            seen.push(d);
        }
        let ms: Vec<u128> = seen.iter().map(Duration::as_millis).collect();
        assert_eq!(ms, [50, 100, 200, 400, 800, 1000, 1000]);
    }

    /// A stand-in admin server: 503 for the first `not_ready` polls, then 200.
    async fn admin(
        not_ready: usize,
    ) -> (SocketAddr, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let polls = std::sync::Arc::new(AtomicUsize::new(0));
        let counter = std::sync::Arc::clone(&polls);
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let counter = std::sync::Arc::clone(&counter);
                let service = hyper::service::service_fn(move |_req| {
                    let n = counter.fetch_add(1, Ordering::SeqCst);
                    let status = if n < not_ready { 503 } else { 200 };
                    let mut response = http::Response::new(http_body_util::Full::new(
                        Bytes::from_static(b"not ready: warming up\n"),
                    ));
                    *response.status_mut() = http::StatusCode::from_u16(status).unwrap();
                    async move { Ok::<_, std::convert::Infallible>(response) }
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service),
                );
            }
        });
        (addr, polls)
    }

    // Real time: the clock cannot be paused while real sockets are polled
    // (tokio would jump past the per-poll timeout).
    #[tokio::test]
    async fn polls_with_backoff_until_200() {
        let (addr, polls) = admin(3).await;
        let start = Instant::now();
        wait_ready(addr, Duration::from_secs(60)).await.unwrap();
        assert_eq!(polls.load(std::sync::atomic::Ordering::SeqCst), 4);
        // Three pauses: 50 + 100 + 200 ms.
        assert!(
            start.elapsed() >= Duration::from_millis(350),
            "{:?}",
            start.elapsed()
        );
    }

    #[tokio::test]
    async fn a_503_until_the_deadline_is_reported() {
        let (addr, _) = admin(usize::MAX).await;
        let err = wait_ready(addr, Duration::from_millis(300))
            .await
            .unwrap_err();
        let text = err.to_string();
        assert!(text.contains("503 not ready: warming up"), "{text}");
    }

    #[tokio::test]
    async fn times_out_naming_the_last_failure() {
        // Bound then dropped: connecting is refused.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let err = wait_ready(addr, Duration::from_millis(200))
            .await
            .unwrap_err();
        let text = err.to_string();
        assert!(text.contains(&addr.to_string()), "{text}");
        assert!(text.contains("cannot connect"), "{text}");
    }
}

//! hyper glue for downstream connections: HTTP/1.1 and HTTP/2 (prior
//! knowledge) on one port, limits, idle timeout and graceful drain.

use std::convert::Infallible;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::Request;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpStream;

use super::body::ConnActivity;
use super::proxy::HttpProxy;
use crate::config::file::ListenerLimitsFile;
use crate::listener::Shutdown;
use crate::telemetry::metrics as names;

/// Smallest read buffer hyper accepts.
const MIN_BUF: usize = 8192;

/// Builds the connection builder for a listener's limits.
pub fn builder(limits: &ListenerLimitsFile) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        // The read buffer bounds the request head: past it hyper answers 431.
        .max_buf_size(limits.max_request_headers_bytes.max(MIN_BUF))
        .max_headers(limits.max_request_headers)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.max_concurrent_streams)
        .max_header_list_size(u32::try_from(limits.max_request_headers_bytes).unwrap_or(u32::MAX))
        // Rapid-reset defence: streams the client resets count against this.
        .max_pending_accept_reset_streams(Some(200))
        .keep_alive_interval(Some(Duration::from_secs(60)))
        .keep_alive_timeout(Duration::from_secs(20));
    builder
}

/// Serves one downstream connection until it closes, idles out or is drained.
pub async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    proxy: Arc<HttpProxy>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    mut shutdown: Shutdown,
) {
    let _ = stream.set_nodelay(true);
    // A second handle on the socket lets us answer 408 after hyper gives up
    // on a slow request head (hyper closes without a response).
    let (stream, spare) = match split_handle(stream) {
        Ok(pair) => pair,
        Err(err) => {
            tracing::debug!(error = %err, "cannot set up connection");
            return;
        }
    };
    let activity = ConnActivity::new();
    let idle_timeout = proxy.listener.limits.idle_timeout;
    let service = {
        let activity = activity.clone();
        service_fn(move |request: Request<Incoming>| {
            let proxy = proxy.clone();
            let guard = activity.begin();
            async move {
                let response = proxy.handle(peer, request).await;
                let (parts, body) = response.into_parts();
                Ok::<_, Infallible>(http::Response::from_parts(parts, body.with_activity(guard)))
            }
        })
    };
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
    tokio::pin!(conn);
    let mut idle_check = tokio::time::interval((idle_timeout / 4).max(Duration::from_millis(10)));
    idle_check.tick().await;
    let mut draining = false;
    let result = loop {
        tokio::select! {
            result = conn.as_mut() => break result,
            _ = shutdown.drain.changed(), if !draining => {
                draining = true;
                conn.as_mut().graceful_shutdown();
            }
            _ = shutdown.force.changed() => {
                return;
            }
            _ = idle_check.tick(), if !draining => {
                if activity.idle_for().is_some_and(|idle| idle >= idle_timeout) {
                    draining = true;
                    conn.as_mut().graceful_shutdown();
                }
            }
        }
    };
    if let Err(err) = result {
        on_connection_error(&*err, &shutdown.listener, spare);
    }
}

fn split_handle(stream: TcpStream) -> std::io::Result<(TcpStream, std::net::TcpStream)> {
    let std_stream = stream.into_std()?;
    let spare = std_stream.try_clone()?;
    Ok((TcpStream::from_std(std_stream)?, spare))
}

fn on_connection_error(
    err: &(dyn std::error::Error + Send + Sync + 'static),
    listener: &Arc<str>,
    mut spare: std::net::TcpStream,
) {
    let Some(hyper_err) = find_hyper_error(err) else {
        tracing::debug!(error = %err, "downstream connection error");
        return;
    };
    let limit = if hyper_err.is_timeout() {
        // The header-read timeout fired: say so before closing, as RFC 9110 §15.5.9 allows.
        let _ = spare.write_all(
            b"HTTP/1.1 408 Request Timeout\r\nconnection: close\r\ncontent-length: 0\r\n\r\n",
        );
        let _ = spare.shutdown(std::net::Shutdown::Write);
        Some("header_read_timeout")
    } else if hyper_err.is_parse_too_large() {
        Some("request_headers")
    } else {
        None
    };
    if let Some(limit) = limit {
        metrics::counter!(
            names::DOWNSTREAM_LIMIT_REJECTIONS_TOTAL,
            "listener" => listener.clone(),
            "limit" => limit,
        )
        .increment(1);
    }
    tracing::debug!(error = %hyper_err, "downstream connection error");
}

fn find_hyper_error<'a>(err: &'a (dyn std::error::Error + 'static)) -> Option<&'a hyper::Error> {
    let mut current = Some(err);
    while let Some(e) = current {
        if let Some(h) = e.downcast_ref::<hyper::Error>() {
            return Some(h);
        }
        current = e.source();
    }
    None
}

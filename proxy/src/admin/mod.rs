//! The admin HTTP server: readiness, liveness, metrics, config dump, drain.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::Config;

/// State the admin server reports and acts on.
#[derive(Debug)]
pub struct AdminState {
    /// Every listener is bound and config is loaded.
    pub ready: AtomicBool,
    /// Set when a drain starts.
    pub drain: watch::Sender<bool>,
    /// The running config.
    pub config: Config,
}

impl AdminState {
    fn is_draining(&self) -> bool {
        *self.drain.borrow()
    }
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

async fn handle(
    state: Arc<AdminState>,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let response = match (request.method(), request.uri().path()) {
        (&Method::GET, "/ready") => {
            if state.is_draining() {
                text(StatusCode::SERVICE_UNAVAILABLE, "draining\n")
            } else if state.ready.load(Ordering::Acquire) {
                text(StatusCode::OK, "ready\n")
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
            }
        }
        (&Method::GET, "/healthz") => text(StatusCode::OK, "ok\n"),
        (&Method::GET, "/metrics") => match crate::telemetry::prometheus_handle() {
            Some(handle) => {
                let mut response = text(StatusCode::OK, handle.render());
                response.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                );
                response
            }
            None => text(
                StatusCode::SERVICE_UNAVAILABLE,
                "no metrics recorder installed\n",
            ),
        },
        (&Method::GET, "/config_dump") => {
            let body = serde_json::to_vec_pretty(&state.config.to_json()).unwrap_or_default();
            let mut response = Response::new(Full::new(Bytes::from(body)));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("application/json"),
            );
            response
        }
        (&Method::POST, "/drain") => {
            tracing::info!("drain requested through the admin server");
            state.drain.send_replace(true);
            text(StatusCode::OK, "draining\n")
        }
        (_, "/ready" | "/healthz" | "/metrics" | "/config_dump" | "/drain") => {
            text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n")
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "endpoints: GET /ready, GET /healthz, GET /metrics, GET /config_dump, POST /drain\n",
        ),
    };
    Ok(response)
}

/// Serves the admin API until the task is dropped.
pub async fn serve(socket: TcpListener, state: Arc<AdminState>) {
    loop {
        let (stream, _) = match socket.accept().await {
            Ok(pair) => pair,
            Err(err) => {
                tracing::warn!(error = %err, "admin accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let state = state.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| handle(state.clone(), request));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

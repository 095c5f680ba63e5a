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
    pub config: arc_swap::ArcSwap<Config>,
    /// Status of dynamic (xDS) resources, for `/config_dump`.
    pub dynamic: arc_swap::ArcSwap<serde_json::Value>,
    /// False while a dynamic config source has not delivered a complete
    /// config yet (always true for a static config).
    pub config_ready: AtomicBool,
    /// The workload identity, when configured.
    pub identity: Option<Arc<postern_certs::IdentityHandle>>,
    /// Set by `POST /quitquitquit`: stop now, without a drain.
    pub quit: watch::Sender<bool>,
    /// Said by `/ready` after `ready`: why the config is what it is (such
    /// as a last-known-good config standing in for the control plane).
    pub config_note: arc_swap::ArcSwapOption<String>,
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

/// With an identity configured, a certificate must be installed and unexpired.
fn identity_valid(state: &AdminState) -> bool {
    state.identity.as_ref().is_none_or(|handle| {
        handle
            .current()
            .is_some_and(|c| c.info.not_after > std::time::SystemTime::now())
    })
}

fn json(value: &serde_json::Value) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec_pretty(value).unwrap_or_default();
    let mut response = Response::new(Full::new(Bytes::from(body)));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    response
}

fn cert_json(info: &postern_certs::CertInfo) -> serde_json::Value {
    use postern_certs::x509::unix_seconds;
    serde_json::json!({
        "subject": info.subject,
        "issuer": info.issuer,
        "sans": info.sans,
        "serial": info.serial,
        "not_before": unix_seconds(info.not_before),
        "not_after": unix_seconds(info.not_after),
    })
}

/// The workload certificate, its trust bundle and the edge certificates.
fn certs_json(state: &AdminState) -> serde_json::Value {
    let identity = state.identity.as_ref().map(|handle| match handle.current() {
        Some(current) => {
            let mut leaf = cert_json(&current.info);
            leaf["spiffe_id"] = current.id.as_str().into();
            leaf["source"] = current.source.into();
            leaf["loaded_at"] = postern_certs::x509::unix_seconds(current.loaded_at).into();
            leaf["rotations"] = handle.generation().into();
            serde_json::json!({
                "certificate": leaf,
                "trust_bundle": current.bundle.infos().iter().map(cert_json).collect::<Vec<_>>(),
            })
        }
        None => serde_json::json!({ "certificate": null, "status": "not loaded yet" }),
    });
    let config = state.config.load();
    let edge: Vec<serde_json::Value> = config
        .listeners
        .iter()
        .filter_map(|listener| match &listener.tls {
            crate::config::ListenerTls::Edge(edge) => Some(serde_json::json!({
                "listener": &*listener.name,
                "certificates": edge.certificates.iter().map(|c| {
                    let mut cert = cert_json(&c.info);
                    cert["server_names"] = c.names.clone().into();
                    cert
                }).collect::<Vec<_>>(),
            })),
            _ => None,
        })
        .collect();
    serde_json::json!({ "identity": identity, "edge": edge })
}

async fn handle(
    state: Arc<AdminState>,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let response = match (request.method(), request.uri().path()) {
        (&Method::GET, "/ready") => {
            if state.is_draining() {
                text(StatusCode::SERVICE_UNAVAILABLE, "draining\n")
            } else if !identity_valid(&state) {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "not ready: no valid workload certificate\n",
                )
            } else if !state.config_ready.load(Ordering::Acquire) {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "not ready: waiting for the first complete config from the control plane\n",
                )
            } else if state.ready.load(Ordering::Acquire) {
                match state.config_note.load_full() {
                    Some(note) => text(StatusCode::OK, format!("ready: {note}\n")),
                    None => text(StatusCode::OK, "ready\n"),
                }
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
            }
        }
        (&Method::GET, "/healthz") => text(StatusCode::OK, "ok\n"),
        (&Method::GET, "/metrics") => match crate::telemetry::prometheus_handle() {
            Some(handle) => {
                let mut body = handle.render();
                crate::telemetry::histogram::render(&mut body);
                let mut response = text(StatusCode::OK, body);
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
            let mut dump = state.config.load().to_json();
            let dynamic = state.dynamic.load();
            if !dynamic.is_null() {
                dump["dynamic"] = (**dynamic).clone();
            }
            json(&dump)
        }
        (&Method::GET, "/certs") => json(&certs_json(&state)),
        (&Method::GET, "/logging") => match crate::telemetry::log_level() {
            Some(level) => text(StatusCode::OK, format!("level: {level}\n")),
            None => text(StatusCode::NOT_FOUND, "logging is not reloadable in this process\n"),
        },
        (&Method::POST, "/logging") => {
            let level = request.uri().query().and_then(|q| {
                q.split('&')
                    .filter_map(|pair| pair.split_once('='))
                    .find(|(k, _)| *k == "level")
                    .map(|(_, v)| v.replace("%2C", ",").replace("%3D", "="))
            });
            match level {
                None => text(
                    StatusCode::BAD_REQUEST,
                    "give the level: POST /logging?level=debug (or directives such as info,postern=debug)\n",
                ),
                Some(level) => match crate::telemetry::set_log_level(&level) {
                    Ok(()) => text(StatusCode::OK, format!("level: {level}\n")),
                    Err(err @ crate::telemetry::LogLevelError::Invalid(_)) => {
                        text(StatusCode::BAD_REQUEST, format!("{err}\n"))
                    }
                    Err(err) => text(StatusCode::NOT_FOUND, format!("{err}\n")),
                },
            }
        }
        (&Method::POST, "/drain") => {
            tracing::info!("drain requested through the admin server");
            state.drain.send_replace(true);
            text(StatusCode::OK, "draining\n")
        }
        (&Method::POST, "/quitquitquit") => {
            tracing::info!("exit requested through the admin server");
            state.quit.send_replace(true);
            // The drain flag is what the binary waits on before exiting.
            state.drain.send_replace(true);
            text(StatusCode::OK, "quitting\n")
        }
        (
            _,
            "/ready" | "/healthz" | "/metrics" | "/config_dump" | "/certs" | "/drain"
            | "/logging" | "/quitquitquit",
        ) => {
            text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n")
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "endpoints: GET /ready, GET /healthz, GET /metrics, GET /config_dump, GET /certs, GET|POST /logging, POST /drain, POST /quitquitquit\n",
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

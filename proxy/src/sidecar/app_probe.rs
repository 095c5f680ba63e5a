//! The app's kubelet probes, run by the sidecar on the kubelet's behalf.
//!
//! Under capture with strict mTLS a plaintext kubelet probe of an app port
//! lands on the inbound listener and is refused. So `postern inject`
//! points the app's `httpGet`, `tcpSocket` and `grpc` probes at the
//! sidecar's status port (`/app-health/<container>/<livez|readyz|startupz>`)
//! and hands the sidecar the original probes as JSON
//! (`POSTERN_APP_PROBES`). The [`StatusServer`] answers each such path by
//! running the original probe against the app on 127.0.0.1, which the
//! capture rules leave alone, and says 200 or 503.
//!
//! The status server serves nothing else: it listens on the pod IP, in
//! plaintext, so it must not reach the admin API.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};

/// The environment variable that carries the probes into the sidecar.
pub const APP_PROBES_ENV: &str = "POSTERN_APP_PROBES";
/// Every rewritten probe's path starts with this.
pub const APP_HEALTH_PREFIX: &str = "/app-health/";

/// Errors of the app probes' setup.
#[derive(Debug, thiserror::Error)]
pub enum AppProbeError {
    /// `POSTERN_APP_PROBES` is not the JSON `postern inject` writes.
    #[error("{APP_PROBES_ENV} is not valid: {0}")]
    Json(#[source] serde_json::Error),
    /// One probe is not usable.
    #[error("{APP_PROBES_ENV}: probe {path:?} {reason}")]
    Probe {
        /// Its status-port path.
        path: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// The status port could not be bound.
    #[error("cannot bind the status server to {address}: {source}")]
    Bind {
        /// The address asked for.
        address: SocketAddr,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// One original probe, in the Kubernetes field names and with its port a
/// number (named ports are resolved at injection).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProbeSpec {
    /// An HTTP GET; success is a status from 200 to 399.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_get: Option<HttpGetSpec>,
    /// A TCP connect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_socket: Option<PortSpec>,
    /// A `grpc.health.v1.Health/Check`; success is `SERVING`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc: Option<GrpcSpec>,
    /// How long the probe may take, in seconds (Kubernetes' default, 1).
    #[serde(default = "one")]
    pub timeout_seconds: u32,
}

fn one() -> u32 {
    1
}

/// An `httpGet` probe.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpGetSpec {
    /// The request path, with its query (default `/`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// The app's port.
    pub port: u16,
    /// `HTTP` (default) or `HTTPS`; HTTPS is not verified, as the kubelet
    /// does not verify it either.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheme: Option<String>,
    /// Headers to send; a `Host` here is the request's host.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub http_headers: Vec<HeaderSpec>,
}

/// One of `httpGet.httpHeaders`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderSpec {
    /// The header's name.
    pub name: String,
    /// Its value.
    pub value: String,
}

/// A `tcpSocket` probe.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortSpec {
    /// The app's port.
    pub port: u16,
}

/// A `grpc` probe.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrpcSpec {
    /// The app's port (h2c).
    pub port: u16,
    /// The service name asked about (default: the server as a whole).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
}

/// The app's probes by status-port path, as carried in `POSTERN_APP_PROBES`.
pub type ProbeMap = BTreeMap<String, ProbeSpec>;

/// A probe ready to run.
#[derive(Debug, Clone)]
enum Check {
    Http {
        port: u16,
        path: String,
        https: bool,
        host: Option<String>,
        headers: Vec<(header::HeaderName, header::HeaderValue)>,
    },
    Tcp {
        port: u16,
    },
    Grpc {
        port: u16,
        service: String,
    },
}

/// The app probes the status server answers for, checked once at start.
#[derive(Debug, Clone, Default)]
pub struct AppProbes {
    probes: BTreeMap<String, (Check, Duration)>,
}

impl AppProbes {
    /// Parses the JSON of `POSTERN_APP_PROBES`.
    ///
    /// # Errors
    ///
    /// Not JSON of that shape, a path outside `/app-health/`, a probe with
    /// not exactly one of `httpGet`, `tcpSocket` and `grpc`, a bad scheme
    /// or header, a port 0 or a zero timeout.
    pub fn from_json(json: &str) -> Result<AppProbes, AppProbeError> {
        let map: ProbeMap = serde_json::from_str(json).map_err(AppProbeError::Json)?;
        AppProbes::new(map)
    }

    /// Checks each probe of `map`.
    ///
    /// # Errors
    ///
    /// As [`AppProbes::from_json`], bar the JSON.
    pub fn new(map: ProbeMap) -> Result<AppProbes, AppProbeError> {
        let mut probes = BTreeMap::new();
        for (path, spec) in map {
            let refuse = |reason| AppProbeError::Probe {
                path: path.clone(),
                reason,
            };
            if !path.starts_with(APP_HEALTH_PREFIX) {
                return Err(refuse("is not under /app-health/"));
            }
            if spec.timeout_seconds == 0 {
                return Err(refuse("has timeoutSeconds 0"));
            }
            let check = match (spec.http_get, spec.tcp_socket, spec.grpc) {
                (Some(get), None, None) => {
                    let https = match get.scheme.as_deref() {
                        None | Some("HTTP") => false,
                        Some("HTTPS") => true,
                        Some(_) => return Err(refuse("has a scheme other than HTTP or HTTPS")),
                    };
                    let mut host = None;
                    let mut headers = Vec::new();
                    for h in get.http_headers {
                        let name = header::HeaderName::try_from(h.name.as_str())
                            .map_err(|_| refuse("has an invalid header name"))?;
                        let value = header::HeaderValue::try_from(h.value.as_str())
                            .map_err(|_| refuse("has an invalid header value"))?;
                        if name == header::HOST {
                            host = Some(h.value);
                        } else {
                            headers.push((name, value));
                        }
                    }
                    let path = get.path.unwrap_or_else(|| "/".into());
                    let path = if path.starts_with('/') {
                        path
                    } else {
                        format!("/{path}")
                    };
                    if http::uri::PathAndQuery::try_from(path.as_str()).is_err() {
                        return Err(refuse("has an invalid path"));
                    }
                    Check::Http {
                        port: get.port,
                        path,
                        https,
                        host,
                        headers,
                    }
                }
                (None, Some(tcp), None) => Check::Tcp { port: tcp.port },
                (None, None, Some(grpc)) => Check::Grpc {
                    port: grpc.port,
                    service: grpc.service.unwrap_or_default(),
                },
                _ => return Err(refuse("needs exactly one of httpGet, tcpSocket and grpc")),
            };
            let port = match &check {
                Check::Http { port, .. } | Check::Tcp { port } | Check::Grpc { port, .. } => *port,
            };
            if port == 0 {
                return Err(refuse("has port 0"));
            }
            probes.insert(
                path,
                (check, Duration::from_secs(u64::from(spec.timeout_seconds))),
            );
        }
        Ok(AppProbes { probes })
    }

    /// The paths served, in order.
    pub fn paths(&self) -> impl Iterator<Item = &str> {
        self.probes.keys().map(String::as_str)
    }

    /// Runs the probe at `path` against the app at `app` (127.0.0.1 in a
    /// pod; the probe's own port is used). `None` when no probe has that
    /// path; else `Ok` on success, or why it failed.
    pub async fn run(&self, path: &str, app: std::net::IpAddr) -> Option<Result<(), String>> {
        let (check, timeout) = self.probes.get(path)?;
        let outcome = tokio::time::timeout(*timeout, run_check(check, app)).await;
        Some(match outcome {
            Ok(result) => result,
            Err(_) => Err(format!("no answer within {}s", timeout.as_secs())),
        })
    }
}

async fn run_check(check: &Check, app: std::net::IpAddr) -> Result<(), String> {
    match check {
        Check::Tcp { port } => connect(SocketAddr::new(app, *port)).await.map(drop),
        Check::Http {
            port,
            path,
            https,
            host,
            headers,
        } => {
            let addr = SocketAddr::new(app, *port);
            let stream = connect(addr).await?;
            let host = host.clone().unwrap_or_else(|| addr.to_string());
            let mut request = Request::get(path.as_str())
                .header(header::HOST, host.as_str())
                // As the kubelet says; the probe's own headers may override.
                .header(header::USER_AGENT, "kube-probe/postern")
                .header(header::ACCEPT, "*/*");
            let request_headers = request.headers_mut().ok_or("cannot build the request")?;
            // The probe's headers replace the defaults of the same name, and
            // a name given twice goes twice, as the kubelet sends them.
            for (name, _) in headers {
                request_headers.remove(name);
            }
            for (name, value) in headers {
                request_headers.append(name.clone(), value.clone());
            }
            let request = request
                .body(Empty::<Bytes>::new())
                .map_err(|e| format!("cannot build the request: {e}"))?;
            let status = if *https {
                let tls = tls_connect(stream, &host).await?;
                http1_status(tls, request).await?
            } else {
                http1_status(stream, request).await?
            };
            if (200..400).contains(&status.as_u16()) {
                Ok(())
            } else {
                Err(format!("the app answered {status}"))
            }
        }
        Check::Grpc { port, service } => {
            grpc_health(connect(SocketAddr::new(app, *port)).await?, service).await
        }
    }
}

async fn connect(addr: SocketAddr) -> Result<TcpStream, String> {
    TcpStream::connect(addr)
        .await
        .map_err(|e| format!("cannot connect to {addr}: {e}"))
}

async fn http1_status<S>(io: S, request: Request<Empty<Bytes>>) -> Result<StatusCode, String>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| format!("HTTP handshake failed: {e}"))?;
    // The connection task ends with the probe: the response is all it reads.
    let driver = tokio::spawn(connection);
    let result = sender
        .send_request(request)
        .await
        .map(|response| response.status())
        .map_err(|e| format!("HTTP request failed: {e}"));
    driver.abort();
    result
}

async fn tls_connect(
    stream: TcpStream,
    host: &str,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, String> {
    let config = rustls::ClientConfig::builder_with_provider(postern_certs::tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("cannot set up TLS: {e}"))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServerCert))
        .with_no_client_auth();
    // The SNI is the Host's name part when it is a name; an IP sends none.
    let name = host
        .rsplit_once(':')
        .filter(|(_, port)| port.parse::<u16>().is_ok())
        .map_or(host, |(name, _)| name)
        .trim_matches(['[', ']']);
    let server_name = rustls_pki_types::ServerName::try_from(name.to_owned())
        .unwrap_or_else(|_| Ipv4Addr::LOCALHOST.into());
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(server_name, stream)
        .await
        .map_err(|e| format!("TLS handshake failed: {e}"))
}

/// Accepts any server certificate, as the kubelet does for an HTTPS probe;
/// the handshake's signatures are still checked.
#[derive(Debug)]
struct AnyServerCert;

impl rustls::client::danger::ServerCertVerifier for AnyServerCert {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls_pki_types::CertificateDer<'_>,
        _intermediates: &[rustls_pki_types::CertificateDer<'_>],
        _server_name: &rustls_pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &postern_certs::tls::provider().signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &postern_certs::tls::provider().signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        postern_certs::tls::provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// `grpc.health.v1.Health/Check` over h2c: success is `SERVING`.
async fn grpc_health(stream: TcpStream, service: &str) -> Result<(), String> {
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .map_err(|e| format!("HTTP/2 handshake failed: {e}"))?;
    let driver = tokio::spawn(connection);
    let result = async {
        let request = Request::builder()
            .method(Method::POST)
            .uri("http://127.0.0.1/grpc.health.v1.Health/Check")
            .header(header::CONTENT_TYPE, "application/grpc")
            .header(header::TE, "trailers")
            .body(Full::new(Bytes::from(grpc_check_request(service))))
            .map_err(|e| format!("cannot build the request: {e}"))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| format!("gRPC request failed: {e}"))?;
        if response.status() != StatusCode::OK {
            return Err(format!("the app answered HTTP {}", response.status()));
        }
        let head_status = grpc_status(response.headers());
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("gRPC response failed: {e}"))?;
        let status = body.trailers().and_then(grpc_status).or(head_status);
        match status.as_deref() {
            Some("0") => {}
            Some(code) => return Err(format!("the app answered grpc-status {code}")),
            None => return Err("the app's answer has no grpc-status".into()),
        }
        match grpc_serving_status(&body.to_bytes()) {
            Some(1) => Ok(()),
            Some(other) => Err(format!("the app's health status is {other}, not SERVING")),
            None => Err("the app's health answer cannot be read".into()),
        }
    }
    .await;
    driver.abort();
    result
}

fn grpc_status(headers: &http::HeaderMap) -> Option<String> {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// `grpc.health.v1.HealthCheckRequest`.
#[derive(Clone, PartialEq, prost::Message)]
struct HealthCheckRequest {
    #[prost(string, tag = "1")]
    service: String,
}

/// `grpc.health.v1.HealthCheckResponse` (only the status is read).
#[derive(Clone, PartialEq, prost::Message)]
struct HealthCheckResponse {
    #[prost(int32, tag = "1")]
    status: i32,
}

/// A length-prefixed `HealthCheckRequest { service }`.
fn grpc_check_request(service: &str) -> Vec<u8> {
    let message = prost::Message::encode_to_vec(&HealthCheckRequest {
        service: service.to_owned(),
    });
    let mut framed = vec![0];
    framed.extend_from_slice(
        &u32::try_from(message.len())
            .unwrap_or(u32::MAX)
            .to_be_bytes(),
    );
    framed.extend_from_slice(&message);
    framed
}

/// The `status` of a length-prefixed `HealthCheckResponse`; absent means
/// 0, `UNKNOWN`. `None` if the bytes are not such a message.
fn grpc_serving_status(body: &[u8]) -> Option<u64> {
    let (prefix, rest) = body.split_at_checked(5)?;
    if prefix[0] != 0 {
        // Compressed: never asked for, so not expected.
        return None;
    }
    let len = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]) as usize;
    let response: HealthCheckResponse = prost::Message::decode(rest.get(..len)?).ok()?;
    u64::try_from(response.status).ok()
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

/// The plaintext server the kubelet's rewritten probes reach.
#[derive(Debug)]
pub struct StatusServer {
    socket: TcpListener,
    probes: Arc<AppProbes>,
    app: std::net::IpAddr,
}

impl StatusServer {
    /// Binds `address`; the probes run against the app at 127.0.0.1.
    /// `[::]` takes IPv4 too, and falls back to `0.0.0.0` where IPv6 is
    /// off, so one setting serves IPv4, IPv6 and dual-stack pods.
    ///
    /// # Errors
    ///
    /// The address cannot be bound.
    pub async fn bind(address: SocketAddr, probes: AppProbes) -> Result<Self, AppProbeError> {
        let socket =
            bind_status(address).map_err(|source| AppProbeError::Bind { address, source })?;
        Ok(StatusServer {
            socket,
            probes: Arc::new(probes),
            app: Ipv4Addr::LOCALHOST.into(),
        })
    }

    /// The bound address.
    ///
    /// # Errors
    ///
    /// The OS cannot tell.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// Serves until the task is dropped.
    pub async fn serve(self) {
        loop {
            let (stream, _) = match self.socket.accept().await {
                Ok(pair) => pair,
                Err(err) => {
                    tracing::warn!(error = %err, "status server accept failed");
                    // Out of file descriptors, most likely: let some close.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let probes = self.probes.clone();
            let app = self.app;
            tokio::spawn(async move {
                let service = service_fn(move |request| {
                    let probes = probes.clone();
                    async move { Ok::<_, Infallible>(answer(&probes, app, &request).await) }
                });
                // Reachable from the whole cluster: a client that never
                // finishes its request must not hold the connection.
                let _ = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(Duration::from_secs(10))
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    }
}

fn bind_status(address: SocketAddr) -> std::io::Result<TcpListener> {
    let any_v6 = address.ip() == std::net::IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED);
    match bind_socket(address, any_v6) {
        // A kernel without IPv6 cannot open the socket at all; a taken port
        // is taken for IPv4 as well.
        Err(err) if any_v6 && err.kind() != std::io::ErrorKind::AddrInUse => {
            let v4 = SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), address.port());
            tracing::info!(error = %err, "no IPv6 for the status server, serving IPv4 only");
            bind_socket(v4, false)
        }
        other => other,
    }
}

fn bind_socket(address: SocketAddr, dual_stack: bool) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(address), Type::STREAM, None)?;
    if dual_stack {
        // Whatever net.ipv6.bindv6only says, IPv4 probes must arrive too.
        socket.set_only_v6(false)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&address.into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}

async fn answer(
    probes: &AppProbes,
    app: std::net::IpAddr,
    request: &Request<Incoming>,
) -> Response<Full<Bytes>> {
    let path = request.uri().path();
    if request.method() != Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
    }
    match probes.run(path, app).await {
        None => text(StatusCode::NOT_FOUND, "no such app probe\n"),
        Some(Ok(())) => text(StatusCode::OK, "ok\n"),
        Some(Err(reason)) => {
            tracing::debug!(probe = path, %reason, "app probe failed");
            text(StatusCode::SERVICE_UNAVAILABLE, format!("{reason}\n"))
        }
    }
}

#[cfg(test)]
mod tests;

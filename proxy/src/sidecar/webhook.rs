//! `postern inject webhook`: the injection as a mutating admission webhook.
//!
//! The API server POSTs an `admission.k8s.io/v1` `AdmissionReview` for each
//! pod being created to `/inject`; the answer allows it, with a base64
//! JSONPatch that makes the same change `postern inject` makes to a
//! manifest. A pod with an unusable annotation is refused with the reason,
//! so it fails at creation instead of running outside the mesh.
//!
//! HTTPS only (the API server requires it). The certificate and key are
//! re-read when their files change, so a rotated Secret needs no restart.
//! [`review`] is the pure part; [`WebhookServer`] is the I/O.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use base64::Engine as _;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use serde_json::{json, Value as Json};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use super::inject::{inject_pod, json_patch, InjectOptions, Outcome};

/// The largest review accepted; the API server caps objects near 3 MiB.
const MAX_BODY: usize = 8 * 1024 * 1024;
/// A client that has not finished the TLS handshake by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long in-flight reviews may take to finish at shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Errors of the webhook server.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The certificate or key could not be loaded.
    #[error("cannot load the webhook certificate from {cert} and {key}: {reason}")]
    Certificate {
        /// The certificate chain file.
        cert: String,
        /// The key file.
        key: String,
        /// What is wrong.
        reason: String,
    },
    /// The TLS settings were refused.
    #[error("cannot build the TLS config: {0}")]
    Tls(#[source] rustls::Error),
}

/// `postern inject webhook`: flags.
#[derive(Debug, Clone, clap::Args)]
pub struct WebhookArgs {
    /// Address to serve HTTPS on.
    #[arg(long, default_value = "0.0.0.0:8443")]
    pub listen: SocketAddr,
    /// PEM certificate chain, server certificate first.
    #[arg(long)]
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    #[arg(long)]
    pub key: PathBuf,
    /// Injection settings.
    #[command(flatten)]
    pub options: InjectOptions,
}

/// Answers one `AdmissionReview` request body.
///
/// Pods being created are injected; anything else is allowed unchanged.
///
/// # Errors
///
/// A body that is not an `AdmissionReview` with a `request.uid`: the text
/// says what is missing (the HTTP answer is then 400).
pub fn review(body: &[u8], options: &InjectOptions) -> Result<Json, String> {
    let review: Json =
        serde_json::from_slice(body).map_err(|e| format!("not a JSON AdmissionReview: {e}"))?;
    let request = review
        .get("request")
        .ok_or("AdmissionReview has no request")?;
    let uid = request
        .get("uid")
        .and_then(Json::as_str)
        .ok_or("AdmissionReview request has no uid")?;
    let answer = |response: Json| {
        let mut response = response;
        response["uid"] = json!(uid);
        json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "response": response,
        })
    };
    let kind = &request["kind"];
    let is_pod = kind["group"].as_str().unwrap_or_default().is_empty()
        && kind["kind"].as_str() == Some("Pod");
    let operation = request["operation"].as_str().unwrap_or("CREATE");
    let Some(object) = request
        .get("object")
        .filter(|_| is_pod && operation == "CREATE")
    else {
        return Ok(answer(json!({ "allowed": true })));
    };
    let before: serde_yaml_ng::Value =
        serde_yaml_ng::to_value(object).map_err(|e| format!("request.object is not a pod: {e}"))?;
    let namespace = request["namespace"]
        .as_str()
        .or_else(|| object["metadata"]["namespace"].as_str());
    let name = object["metadata"]["name"]
        .as_str()
        .or_else(|| object["metadata"]["generateName"].as_str())
        .unwrap_or("(unnamed)");
    let described = match namespace {
        Some(ns) => format!("Pod {ns}/{name}"),
        None => format!("Pod {name}"),
    };
    let mut after = before.clone();
    match inject_pod(&mut after, options, &described) {
        Ok(Outcome::Injected) => {
            let patch = json_patch(&before, &after).to_string();
            tracing::info!(pod = %described, "injected");
            Ok(answer(json!({
                "allowed": true,
                "patchType": "JSONPatch",
                "patch": base64::engine::general_purpose::STANDARD.encode(patch),
            })))
        }
        Ok(outcome) => {
            tracing::debug!(pod = %described, ?outcome, "not injected");
            Ok(answer(json!({ "allowed": true })))
        }
        Err(err) => {
            tracing::warn!(pod = %described, error = %err, "refused");
            Ok(answer(json!({
                "allowed": false,
                "status": { "code": 400, "message": format!("postern injection: {err}") },
            })))
        }
    }
}

/// The webhook's HTTPS server, bound and ready to serve.
pub struct WebhookServer {
    listener: TcpListener,
    acceptor: TlsAcceptor,
    options: Arc<InjectOptions>,
}

impl WebhookServer {
    /// Loads the certificate and binds `args.listen`.
    ///
    /// # Errors
    ///
    /// The certificate or key cannot be read or do not match, or the
    /// address cannot be bound.
    pub async fn bind(args: &WebhookArgs) -> Result<WebhookServer, WebhookError> {
        let resolver = FileCertResolver::load(&args.cert, &args.key)?;
        let mut config =
            rustls::ServerConfig::builder_with_provider(postern_certs::tls::provider())
                .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
                .map_err(WebhookError::Tls)?
                .with_no_client_auth()
                .with_cert_resolver(Arc::new(resolver));
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let listener =
            TcpListener::bind(args.listen)
                .await
                .map_err(|source| WebhookError::Bind {
                    addr: args.listen,
                    source,
                })?;
        Ok(WebhookServer {
            listener,
            acceptor: TlsAcceptor::from(Arc::new(config)),
            options: Arc::new(args.options.clone()),
        })
    }

    /// The bound address (useful with port 0).
    ///
    /// # Errors
    ///
    /// The socket's address cannot be read.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown` resolves, then lets in-flight reviews finish
    /// (for a few seconds at most).
    pub async fn serve(self, shutdown: impl Future<Output = ()>) {
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(Duration::from_secs(10));
        let builder = Arc::new(builder);
        let graceful = Arc::new(GracefulShutdown::new());
        tokio::pin!(shutdown);
        loop {
            let (stream, peer) = tokio::select! {
                accepted = self.listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(err) => {
                        // Out of descriptors or similar: back off instead of spinning.
                        tracing::warn!(error = %err, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                () = &mut shutdown => break,
            };
            let (acceptor, builder, graceful, options) = (
                self.acceptor.clone(),
                Arc::clone(&builder),
                Arc::clone(&graceful),
                Arc::clone(&self.options),
            );
            tokio::spawn(async move {
                let tls =
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => tls,
                        Ok(Err(err)) => {
                            tracing::debug!(%peer, error = %err, "TLS handshake failed");
                            return;
                        }
                        Err(_) => return,
                    };
                let service = service_fn(move |req| handle(req, Arc::clone(&options)));
                let conn = builder
                    .serve_connection(TokioIo::new(tls), service)
                    .into_owned();
                let _ = graceful.watch(conn).await;
            });
        }
        drop(self.listener);
        if let Ok(graceful) = Arc::try_unwrap(graceful) {
            let _ = tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown()).await;
        } else {
            // Connection tasks still hold it; they end with the runtime.
            tracing::debug!("connections still open at shutdown");
        }
    }
}

async fn handle(
    req: Request<Incoming>,
    options: Arc<InjectOptions>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let reply = |status: StatusCode, content_type: &str, body: Bytes| {
        let mut response = Response::new(Full::new(body));
        *response.status_mut() = status;
        if let Ok(value) = content_type.parse() {
            response
                .headers_mut()
                .insert(http::header::CONTENT_TYPE, value);
        }
        Ok(response)
    };
    let text = |status, body: String| reply(status, "text/plain", Bytes::from(body + "\n"));
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz") => text(StatusCode::OK, "ok".into()),
        (&Method::POST, "/inject") => {
            let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
                Ok(body) => body.to_bytes(),
                Err(err) => {
                    return text(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        format!("cannot read the review: {err}"),
                    )
                }
            };
            match review(&body, &options) {
                Ok(answer) => reply(
                    StatusCode::OK,
                    "application/json",
                    Bytes::from(answer.to_string()),
                ),
                Err(reason) => text(StatusCode::BAD_REQUEST, reason),
            }
        }
        (_, "/inject" | "/healthz") => {
            text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed".into())
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "endpoints: POST /inject, GET /healthz".into(),
        ),
    }
}

/// A certificate read from files, re-read when either file's modification
/// time changes (checked at each handshake: two `stat` calls).
#[derive(Debug)]
struct FileCertResolver {
    cert: PathBuf,
    key: PathBuf,
    current: ArcSwap<Loaded>,
}

#[derive(Debug)]
struct Loaded {
    stamp: (Option<SystemTime>, Option<SystemTime>),
    key: Arc<CertifiedKey>,
}

impl FileCertResolver {
    fn load(cert: &Path, key: &Path) -> Result<FileCertResolver, WebhookError> {
        let loaded = read_pair(cert, key)?;
        Ok(FileCertResolver {
            cert: cert.to_owned(),
            key: key.to_owned(),
            current: ArcSwap::from_pointee(loaded),
        })
    }
}

fn stamp(cert: &Path, key: &Path) -> (Option<SystemTime>, Option<SystemTime>) {
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    (modified(cert), modified(key))
}

fn read_pair(cert: &Path, key: &Path) -> Result<Loaded, WebhookError> {
    let refuse = |reason: String| WebhookError::Certificate {
        cert: cert.display().to_string(),
        key: key.display().to_string(),
        reason,
    };
    let stamp = stamp(cert, key);
    let chain_pem = std::fs::read(cert).map_err(|e| refuse(format!("certificate: {e}")))?;
    let key_pem = std::fs::read(key).map_err(|e| refuse(format!("key: {e}")))?;
    let chain = postern_certs::x509::parse_pem_chain(&chain_pem, "certificate chain")
        .map_err(|e| refuse(e.to_string()))?;
    let private =
        postern_certs::x509::parse_pem_key(&key_pem).map_err(|e| refuse(e.to_string()))?;
    let signer = rustls::crypto::ring::sign::any_supported_type(&private)
        .map_err(|e| refuse(format!("unusable key: {e}")))?;
    let certified = CertifiedKey::new(chain, signer);
    certified
        .keys_match()
        .map_err(|_| refuse("the key does not match the certificate".into()))?;
    Ok(Loaded {
        stamp,
        key: Arc::new(certified),
    })
}

impl ResolvesServerCert for FileCertResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let current = self.current.load();
        if stamp(&self.cert, &self.key) != current.stamp {
            match read_pair(&self.cert, &self.key) {
                Ok(fresh) => {
                    tracing::info!(cert = %self.cert.display(), "webhook certificate reloaded");
                    let key = Arc::clone(&fresh.key);
                    self.current.store(Arc::new(fresh));
                    return Some(key);
                }
                // Mid-rotation the two files may briefly disagree; keep
                // serving the last good pair and try again next handshake.
                Err(err) => {
                    tracing::warn!(error = %err, "keeping the previous webhook certificate")
                }
            }
        }
        Some(Arc::clone(&current.key))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn pod_review(annotations: Json) -> Vec<u8> {
        json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
                "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "namespace": "shop",
                "operation": "CREATE",
                "object": {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "metadata": {"generateName": "web-", "annotations": annotations},
                    "spec": {"containers": [{"name": "web", "image": "web:1"}]}
                }
            }
        })
        .to_string()
        .into_bytes()
    }

    #[test]
    fn a_pod_gets_a_base64_json_patch() {
        let answer = review(&pod_review(json!({})), &InjectOptions::default()).unwrap();
        let response = &answer["response"];
        assert_eq!(response["uid"], "705ab4f5-6393-11e8-b7cc-42010a800002");
        assert_eq!(response["allowed"], true);
        assert_eq!(response["patchType"], "JSONPatch");
        let patch = base64::engine::general_purpose::STANDARD
            .decode(response["patch"].as_str().unwrap())
            .unwrap();
        let patch: Json = serde_json::from_slice(&patch).unwrap();
        let paths: Vec<_> = patch
            .as_array()
            .unwrap()
            .iter()
            .map(|op| {
                format!(
                    "{} {}",
                    op["op"].as_str().unwrap(),
                    op["path"].as_str().unwrap()
                )
            })
            .collect();
        assert_eq!(
            paths,
            [
                "replace /metadata/annotations",
                "add /spec/initContainers",
                "add /spec/volumes"
            ]
        );
    }

    #[test]
    fn opted_out_and_bad_annotations() {
        let options = InjectOptions::default();
        let answer = review(
            &pod_review(json!({"postern.dev/inject": "false"})),
            &options,
        )
        .unwrap();
        assert_eq!(answer["response"]["allowed"], true);
        assert!(answer["response"].get("patch").is_none());

        let answer = review(
            &pod_review(json!({"postern.dev/proxy-memory": "lots"})),
            &options,
        )
        .unwrap();
        assert_eq!(answer["response"]["allowed"], false);
        let message = answer["response"]["status"]["message"].as_str().unwrap();
        assert!(message.contains("Pod shop/web-"), "{message}");
        assert!(message.contains("postern.dev/proxy-memory"), "{message}");
    }

    #[test]
    fn other_objects_and_garbage() {
        let options = InjectOptions::default();
        let mut review_json: Json = serde_json::from_slice(&pod_review(json!({}))).unwrap();
        review_json["request"]["operation"] = json!("UPDATE");
        let answer = review(review_json.to_string().as_bytes(), &options).unwrap();
        assert!(answer["response"].get("patch").is_none());
        assert!(review(b"{}", &options).unwrap_err().contains("no request"));
        assert!(review(b"nope", &options).unwrap_err().contains("JSON"));
    }
}

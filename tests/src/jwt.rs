//! A JWT issuer for tests: ES256 keys made on the spot, tokens signed with
//! them, and a key server that publishes their JWKS over HTTP (changeable
//! at run time, for rotations) and counts the fetches.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

use base64::Engine as _;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, KeyPair as _, ECDSA_P256_SHA256_FIXED_SIGNING};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::client::{full, Body};

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// One ES256 signing key with a `kid`.
pub struct TestKey {
    kid: String,
    pair: EcdsaKeyPair,
}

impl std::fmt::Debug for TestKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestKey").field("kid", &self.kid).finish()
    }
}

impl TestKey {
    /// A fresh P-256 key named `kid`.
    ///
    /// # Panics
    ///
    /// If the system random source fails.
    pub fn new(kid: &str) -> Self {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .expect("generate key");
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
            .expect("load key");
        Self {
            kid: kid.to_owned(),
            pair,
        }
    }

    /// The public key as a JWK.
    pub fn jwk(&self) -> Value {
        let point = self.pair.public_key().as_ref();
        json!({
            "kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": self.kid,
            "x": b64(&point[1..33]), "y": b64(&point[33..65]),
        })
    }

    /// A compact JWS of `claims`, signed with this key.
    ///
    /// # Panics
    ///
    /// If signing fails.
    pub fn token(&self, claims: &Value) -> String {
        let header = json!({"alg": "ES256", "typ": "JWT", "kid": self.kid});
        let input = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(claims.to_string().as_bytes())
        );
        let signature = self
            .pair
            .sign(&SystemRandom::new(), input.as_bytes())
            .expect("sign");
        format!("{input}.{}", b64(signature.as_ref()))
    }
}

/// A JWKS document of `keys`.
pub fn jwks(keys: &[&TestKey]) -> String {
    json!({ "keys": keys.iter().map(|k| k.jwk()).collect::<Vec<_>>() }).to_string()
}

/// A fetch the key server answered: its path and `Host`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetch {
    /// Path and query.
    pub path: String,
    /// `Host` header.
    pub host: Option<String>,
}

#[derive(Debug, Default)]
struct ServerState {
    document: Mutex<String>,
    fetches: Mutex<Vec<Fetch>>,
}

/// An HTTP server publishing a JWKS document; stops when dropped.
#[derive(Debug)]
pub struct JwksServer {
    addr: SocketAddr,
    state: Arc<ServerState>,
    task: JoinHandle<()>,
}

impl JwksServer {
    /// Starts on `127.0.0.1:0` serving `document` at every path.
    ///
    /// # Panics
    ///
    /// If it cannot bind.
    pub async fn start(document: String) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind jwks");
        let addr = listener.local_addr().expect("jwks addr");
        let state = Arc::new(ServerState {
            document: Mutex::new(document),
            fetches: Mutex::default(),
        });
        let shared = Arc::clone(&state);
        let task = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((stream, _)) = accepted else { continue };
                        let state = Arc::clone(&shared);
                        connections.spawn(async move {
                            let service = service_fn(move |req| serve(Arc::clone(&state), req));
                            let _ = auto::Builder::new(TokioExecutor::new())
                                .serve_connection(TokioIo::new(stream), service)
                                .await;
                        });
                    }
                    Some(_) = connections.join_next(), if !connections.is_empty() => {}
                }
            }
        });
        Self { addr, state, task }
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves `document` from now on.
    pub fn publish(&self, document: String) {
        *self
            .state
            .document
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = document;
    }

    /// Every fetch so far, in order.
    pub fn fetches(&self) -> Vec<Fetch> {
        self.state
            .fetches
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl Drop for JwksServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(
    state: Arc<ServerState>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let fetch = Fetch {
        path: req
            .uri()
            .path_and_query()
            .map_or_else(|| "/".to_owned(), |p| p.as_str().to_owned()),
        host: req
            .headers()
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(str::to_owned),
    };
    let document = state
        .document
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    state
        .fetches
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push(fetch);
    let mut response = Response::new(full(document));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    Ok(response)
}

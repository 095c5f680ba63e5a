//! Remote key sets: fetched through a cluster with the proxy's own
//! connection pools, cached for `cache_duration`, refreshed in the
//! background before they expire, and fetched again early when a token
//! names a `kid` the cache does not hold — at most once per
//! `min_refetch_interval`, so a stream of forged `kid`s cannot turn the
//! proxy into a load generator against the key server.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use futures_util::future::BoxFuture;
use http::{header, HeaderValue, Method, Request, Uri, Version};
use http_body_util::BodyExt as _;
use tokio::time::Instant;

use super::jwks::{Jwks, JwksError};
use crate::cluster::{ClusterManager, Outcome, UpstreamError};
use crate::config::file::UpstreamProtocol;
use crate::http::body::RequestBody;

/// Largest key set accepted; real ones are a few KiB.
pub const MAX_JWKS_BYTES: usize = 256 * 1024;

/// After a failed fetch, requests fail fast for this long instead of each
/// waiting on a key server that just failed (Envoy's `failed_refetch_duration`).
const FAILED_FETCH_HOLD: Duration = Duration::from_secs(1);

/// Longest wait between background retries of a failing refresh.
const MAX_REFRESH_BACKOFF: Duration = Duration::from_secs(30);

/// Where a remote key set comes from and how long it is kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteSource {
    /// `http(s)://host/path`: the path is requested, the host sent as `Host`.
    pub uri: Uri,
    /// The cluster the request goes through (its TLS settings apply).
    pub cluster: Arc<str>,
    /// How long fetched keys are used.
    pub cache_duration: Duration,
    /// Time allowed for one fetch.
    pub timeout: Duration,
    /// Shortest time between two fetches caused by unknown `kid`s.
    pub min_refetch_interval: Duration,
}

/// Why a key set could not be fetched.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The cluster is not (or no longer) configured.
    #[error("cluster \"{0}\" does not exist")]
    NoCluster(Arc<str>),
    /// No connection or answer from the cluster.
    #[error("JWKS request failed")]
    Upstream(#[source] UpstreamError),
    /// The key server answered with something other than 2xx.
    #[error("JWKS server answered {0}")]
    Status(u16),
    /// The fetch took longer than its timeout.
    #[error("JWKS fetch timed out after {0:?}")]
    Timeout(Duration),
    /// The body could not be read.
    #[error("reading the JWKS body failed")]
    Body(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The body is larger than [`MAX_JWKS_BYTES`].
    #[error("JWKS body over {MAX_JWKS_BYTES} bytes")]
    TooLarge,
    /// The body is not a usable key set.
    #[error("fetched JWKS unusable")]
    Parse(#[source] JwksError),
    /// A fetch failed moments ago; not tried again yet.
    #[error("JWKS fetch failed recently; holding off")]
    HeldOff,
}

/// Fetches key set documents; the proxy's [`ClusterManager`] is the real one.
pub trait JwksFetcher: Send + Sync + 'static {
    /// GETs `source.uri` through `source.cluster`, within `source.timeout`.
    fn fetch<'a>(&'a self, source: &'a RemoteSource) -> BoxFuture<'a, Result<Bytes, FetchError>>;
}

/// At most one fetch per `interval` (for unknown `kid`s). Pure: the caller
/// passes the time.
#[derive(Debug)]
pub(crate) struct RefetchGate {
    interval: Duration,
    last: Option<Instant>,
}

impl RefetchGate {
    pub(crate) fn new(interval: Duration) -> RefetchGate {
        RefetchGate {
            interval,
            last: None,
        }
    }

    /// Whether a fetch may happen at `now`; if so, it counts as done.
    pub(crate) fn allow(&mut self, now: Instant) -> bool {
        if self
            .last
            .is_some_and(|last| now.saturating_duration_since(last) < self.interval)
        {
            return false;
        }
        self.last = Some(now);
        true
    }
}

#[derive(Debug)]
struct Cached {
    jwks: Arc<Jwks>,
    fetched_at: Instant,
}

/// One remote key set and its cache.
#[derive(Debug)]
pub struct RemoteJwks {
    source: RemoteSource,
    cached: ArcSwapOption<Cached>,
    /// Fetch attempts finished; a caller that waited for the lock while
    /// another attempt ran uses that attempt's result instead of its own.
    attempts: AtomicU64,
    last_failure: Mutex<Option<Instant>>,
    fetching: tokio::sync::Mutex<()>,
    kid_gate: Mutex<RefetchGate>,
    refresher: AtomicBool,
}

/// Refresh once this share of the cache duration has passed.
fn refresh_point(cache_duration: Duration) -> Duration {
    cache_duration.mul_f64(0.8)
}

impl RemoteJwks {
    /// An empty cache for `source`; nothing is fetched until first use.
    pub fn new(source: RemoteSource) -> Arc<RemoteJwks> {
        Arc::new(RemoteJwks {
            kid_gate: Mutex::new(RefetchGate::new(source.min_refetch_interval)),
            source,
            cached: ArcSwapOption::empty(),
            attempts: AtomicU64::new(0),
            last_failure: Mutex::new(None),
            fetching: tokio::sync::Mutex::new(()),
            refresher: AtomicBool::new(false),
        })
    }

    /// Where the keys come from.
    pub fn source(&self) -> &RemoteSource {
        &self.source
    }

    /// Takes over the keys a replaced config had fetched from the same
    /// source, so a config push does not make the next request wait.
    pub fn adopt(&self, previous: &RemoteJwks) {
        if previous.source == self.source && self.cached.load().is_none() {
            self.cached.store(previous.cached.load_full());
        }
    }

    /// The cached keys, fresh or not.
    pub fn current(&self) -> Option<Arc<Jwks>> {
        self.cached.load().as_ref().map(|c| c.jwks.clone())
    }

    /// The keys to verify with: the cached ones while fresh, else fetched
    /// now. The first call starts the background refresh.
    pub async fn keys<F: JwksFetcher>(
        self: &Arc<Self>,
        fetcher: &Arc<F>,
    ) -> Result<Arc<Jwks>, FetchError> {
        self.start_refresher(fetcher);
        if let Some(cached) = self.cached.load_full() {
            if cached.fetched_at.elapsed() < self.source.cache_duration {
                return Ok(cached.jwks.clone());
            }
        }
        self.fetch_now(fetcher.as_ref()).await
    }

    /// Called when a token names a `kid` that `seen` lacks: newer keys if
    /// there are any (fetched now if the bound allows, or by a fetch
    /// already under way), else `None`.
    pub async fn refetch_for_unknown_kid<F: JwksFetcher>(
        &self,
        fetcher: &Arc<F>,
        seen: &Arc<Jwks>,
    ) -> Option<Arc<Jwks>> {
        let allowed = self
            .kid_gate
            .lock()
            .map(|mut gate| gate.allow(Instant::now()))
            .unwrap_or(false);
        if allowed {
            tracing::debug!(uri = %self.source.uri, "unknown kid; fetching the key set again");
            if let Err(err) = self.fetch_now(fetcher.as_ref()).await {
                tracing::warn!(uri = %self.source.uri, cluster = %self.source.cluster, error = %err, "JWKS refetch failed");
            }
        } else {
            // Another request's refetch may be in flight: its keys are worth the wait.
            drop(self.fetching.lock().await);
        }
        self.current().filter(|current| !Arc::ptr_eq(current, seen))
    }

    /// Fetches the key set unless another fetch finished while this one
    /// waited for its turn, or one failed moments ago.
    async fn fetch_now<F: JwksFetcher + ?Sized>(
        &self,
        fetcher: &F,
    ) -> Result<Arc<Jwks>, FetchError> {
        let before = self.attempts.load(Ordering::Acquire);
        let _turn = self.fetching.lock().await;
        let held_off = self
            .last_failure
            .lock()
            .ok()
            .and_then(|last| *last)
            .is_some_and(|at| at.elapsed() < FAILED_FETCH_HOLD);
        if self.attempts.load(Ordering::Acquire) != before || held_off {
            return match self.cached.load_full() {
                Some(cached) if cached.fetched_at.elapsed() < self.source.cache_duration => {
                    Ok(cached.jwks.clone())
                }
                _ => Err(FetchError::HeldOff),
            };
        }
        let result = fetcher
            .fetch(&self.source)
            .await
            .and_then(|body| Jwks::parse(&body).map_err(FetchError::Parse));
        self.attempts.fetch_add(1, Ordering::AcqRel);
        match result {
            Ok(jwks) => {
                if jwks.skipped() > 0 {
                    tracing::debug!(uri = %self.source.uri, skipped = jwks.skipped(), "JWKS keys skipped as unusable");
                }
                let jwks = Arc::new(jwks);
                self.cached.store(Some(Arc::new(Cached {
                    jwks: jwks.clone(),
                    fetched_at: Instant::now(),
                })));
                if let Ok(mut last) = self.last_failure.lock() {
                    *last = None;
                }
                Ok(jwks)
            }
            Err(err) => {
                if let Ok(mut last) = self.last_failure.lock() {
                    *last = Some(Instant::now());
                }
                Err(err)
            }
        }
    }

    /// How long until the cached keys should be refreshed.
    fn until_refresh(&self) -> Duration {
        match self.cached.load().as_ref() {
            None => Duration::ZERO,
            Some(cached) => (cached.fetched_at + refresh_point(self.source.cache_duration))
                .saturating_duration_since(Instant::now()),
        }
    }

    /// Starts the task that keeps the cache fresh; it ends once this key
    /// set is dropped (its config replaced).
    fn start_refresher<F: JwksFetcher>(self: &Arc<Self>, fetcher: &Arc<F>) {
        if self.refresher.swap(true, Ordering::AcqRel) {
            return;
        }
        let weak: Weak<RemoteJwks> = Arc::downgrade(self);
        let fetcher: Arc<dyn JwksFetcher> = fetcher.clone();
        tokio::spawn(async move {
            let mut backoff = FAILED_FETCH_HOLD;
            loop {
                let wait = match weak.upgrade() {
                    Some(this) => this.until_refresh(),
                    None => return,
                };
                // Looked at again after the wait: a request may have
                // fetched in the meantime.
                if !wait.is_zero() {
                    tokio::time::sleep(wait).await;
                    continue;
                }
                let Some(this) = weak.upgrade() else { return };
                match this.fetch_now(fetcher.as_ref()).await {
                    Ok(_) => backoff = FAILED_FETCH_HOLD,
                    Err(err) => {
                        tracing::warn!(uri = %this.source.uri, cluster = %this.source.cluster, error = %err, "JWKS refresh failed; keeping the cached keys until they expire");
                        drop(this);
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(MAX_REFRESH_BACKOFF);
                    }
                }
            }
        });
    }
}

impl JwksFetcher for ClusterManager {
    fn fetch<'a>(&'a self, source: &'a RemoteSource) -> BoxFuture<'a, Result<Bytes, FetchError>> {
        Box::pin(async move {
            let cluster = self
                .get(&source.cluster)
                .ok_or_else(|| FetchError::NoCluster(source.cluster.clone()))?;
            tokio::time::timeout(source.timeout, fetch_through(&cluster, &source.uri))
                .await
                .map_err(|_| FetchError::Timeout(source.timeout))?
        })
    }
}

/// One GET through a cluster, counted against its breakers like any call.
async fn fetch_through(
    cluster: &Arc<crate::cluster::Cluster>,
    uri: &Uri,
) -> Result<Bytes, FetchError> {
    let _admitted = cluster.begin_request().map_err(FetchError::Upstream)?;
    let endpoint = cluster.pick(rand::random()).map_err(FetchError::Upstream)?;
    let path = uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
    let mut request = Request::new(RequestBody::Empty);
    *request.method_mut() = Method::GET;
    request
        .headers_mut()
        .insert(header::ACCEPT, HeaderValue::from_static("application/json"));
    match cluster.protocol() {
        UpstreamProtocol::Http1 => {
            *request.version_mut() = Version::HTTP_11;
            *request.uri_mut() = Uri::from(path);
            if let Some(host) = uri
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
            {
                request.headers_mut().insert(header::HOST, host);
            }
        }
        UpstreamProtocol::Http2 => {
            *request.version_mut() = Version::HTTP_2;
            let mut parts = http::uri::Parts::default();
            parts.scheme = Some(http::uri::Scheme::HTTP);
            parts.authority = uri.authority().cloned();
            parts.path_and_query = Some(path);
            *request.uri_mut() =
                Uri::from_parts(parts).map_err(|err| FetchError::Body(Box::new(err)))?;
        }
    }
    let (response, pooled) = endpoint
        .endpoint()
        .pool
        .send(request)
        .await
        .map_err(|err| FetchError::Upstream(err.error))?;
    let status = response.status();
    cluster.report(
        endpoint.endpoint(),
        if status.is_server_error() {
            Outcome::ServerError
        } else {
            Outcome::Success
        },
    );
    if !status.is_success() {
        return Err(FetchError::Status(status.as_u16()));
    }
    let body = http_body_util::Limited::new(response.into_body(), MAX_JWKS_BYTES)
        .collect()
        .await
        .map_err(|err| {
            if err.is::<http_body_util::LengthLimitError>() {
                FetchError::TooLarge
            } else {
                FetchError::Body(err)
            }
        })?
        .to_bytes();
    if let Some(pooled) = pooled {
        pooled.release();
    }
    Ok(body)
}

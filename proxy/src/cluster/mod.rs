//! Clusters: endpoints, load balancing, connection pools, circuit breakers,
//! retry budgets and passive outlier detection.
//!
//! A `Cluster` is runtime state that outlives any one config snapshot; the
//! `ClusterManager` keys clusters by name.

mod dns;
mod lb;
pub mod pool;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::file::{ClusterFile, LbPolicy, OutlierDetectionFile, UpstreamProtocol};
use crate::telemetry::metrics as names;
use crate::tls::UpstreamTls;
pub use lb::Balancer;
use pool::{ConnectionLimits, EndpointPool, PoolSettings};
pub use pool::{PooledConnection, UpstreamError};

type ClusterMap = crate::FastMap<Arc<str>, Arc<Cluster>>;

/// Most clusters the proxy makes for itself (`ClusterManager::local`): two
/// per app port an inbound capture listener has forwarded to.
pub const MAX_LOCAL_CLUSTERS: usize = 1024;

/// All clusters by name. The map is swapped whole on a config change; a
/// request holds the `Arc<Cluster>` it picked to its end.
#[derive(Debug, Default)]
pub struct ClusterManager {
    clusters: Arc<arc_swap::ArcSwap<ClusterMap>>,
    /// Resolver tasks of the clusters with DNS-named endpoints; also the
    /// lock under which the map changes.
    dns: Arc<std::sync::Mutex<dns::DnsTasks>>,
    resolver: dns::Resolver,
    /// Clusters made at run time rather than configured; config changes
    /// leave them alone.
    local: arc_swap::ArcSwap<ClusterMap>,
    local_insert: std::sync::Mutex<()>,
    identity: Option<Arc<postern_certs::IdentityHandle>>,
}

impl ClusterManager {
    /// Builds clusters from their settings, with TLS connectors for those
    /// in `tls` (mesh ones present `identity`).
    pub fn new(
        settings: &[Arc<ClusterFile>],
        tls: &std::collections::HashMap<Arc<str>, crate::config::UpstreamTlsConfig>,
        identity: Option<&Arc<postern_certs::IdentityHandle>>,
    ) -> Result<Self, crate::tls::TlsSetupError> {
        let manager = ClusterManager {
            clusters: Default::default(),
            dns: Default::default(),
            resolver: Default::default(),
            local: Default::default(),
            local_insert: Default::default(),
            identity: identity.cloned(),
        };
        manager.update(settings, tls)?;
        Ok(manager)
    }

    /// Replaces the set of clusters. A cluster whose settings did not change
    /// keeps its runtime state (pools, outlier ejections, load); a changed
    /// one starts afresh, while requests in flight finish on the old one.
    /// Nothing changes if a TLS connector cannot be built.
    pub fn update(
        &self,
        settings: &[Arc<ClusterFile>],
        tls: &std::collections::HashMap<Arc<str>, crate::config::UpstreamTlsConfig>,
    ) -> Result<(), crate::tls::TlsSetupError> {
        // Resolver tasks swap clusters in under this lock too.
        let mut tasks = self.dns.lock().unwrap_or_else(|e| e.into_inner());
        let current = self.clusters.load_full();
        let mut clusters = ClusterMap::with_capacity_and_hasher(settings.len(), Default::default());
        let mut next_tasks = dns::DnsTasks::new();
        for s in settings {
            let name: Arc<str> = Arc::from(s.name.as_str());
            let dns_named = dns::is_dns(s);
            if dns_named {
                if let Some(task) = tasks.remove(&name) {
                    if same_settings(&task.settings, s) {
                        // The task carries on; whatever it last swapped in stays.
                        if let Some(existing) = current.get(&name) {
                            clusters.insert(name.clone(), existing.clone());
                        }
                        next_tasks.insert(name, task);
                        continue;
                    }
                }
            } else if let Some(existing) = current.get(&name) {
                if same_settings(&existing.settings, s) {
                    clusters.insert(name, existing.clone());
                    continue;
                }
                if same_but_endpoints(&existing.settings, s) && !dns::is_dns(&existing.settings) {
                    clusters.insert(name, Arc::new(Cluster::with_endpoints(existing, s.clone())));
                    continue;
                }
            }
            let connector = match tls.get(&name) {
                Some(config) => Some(Arc::new(UpstreamTls::new(
                    name.clone(),
                    config,
                    self.identity.as_ref(),
                    s.protocol == UpstreamProtocol::Http2,
                )?)),
                None => None,
            };
            let cluster = Arc::new(Cluster::with_tls(s.clone(), connector));
            if dns_named {
                // Warming: the cluster it replaces (if any) serves until
                // the first lookups are done.
                if let Some(existing) = current.get(&name) {
                    clusters.insert(name.clone(), existing.clone());
                }
                next_tasks.insert(
                    name,
                    dns::start(cluster, &self.clusters, &self.dns, &self.resolver),
                );
            } else {
                clusters.insert(name, cluster);
            }
        }
        // Tasks left in `tasks` belong to removed or changed clusters; they
        // stop when dropped here.
        *tasks = next_tasks;
        self.clusters.store(Arc::new(clusters));
        Ok(())
    }

    /// Waits until every DNS-named cluster has done its first lookups
    /// (found or not), so a new config does not start with them empty.
    pub async fn dns_warmed(&self) {
        let receivers: Vec<_> = match self.dns.lock() {
            Ok(tasks) => tasks.values().map(|t| t.ready.clone()).collect(),
            Err(_) => return,
        };
        for mut ready in receivers {
            // An error means the task stopped: nothing more to wait for.
            let _ = ready.wait_for(|done| *done).await;
        }
    }

    /// The cluster with this name, configured or made at run time.
    pub fn get(&self, name: &str) -> Option<Arc<Cluster>> {
        self.clusters
            .load()
            .get(name)
            .cloned()
            .or_else(|| self.local.load().get(name).cloned())
    }

    /// The plaintext cluster `name` that the proxy makes for itself (such
    /// as an app port behind an inbound capture listener), built from
    /// `make` the first time. `None` once `MAX_LOCAL_CLUSTERS` exist.
    pub fn local(&self, name: &str, make: impl FnOnce() -> ClusterFile) -> Option<Arc<Cluster>> {
        if let Some(cluster) = self.local.load().get(name) {
            return Some(cluster.clone());
        }
        // Inserts are rare (once per app port): copying the map is cheaper
        // than locking every lookup.
        let _guard = self.local_insert.lock().ok()?;
        let current = self.local.load_full();
        if let Some(cluster) = current.get(name) {
            return Some(cluster.clone());
        }
        if current.len() >= MAX_LOCAL_CLUSTERS {
            return None;
        }
        let cluster = Arc::new(Cluster::new(Arc::new(make())));
        let mut next = (*current).clone();
        next.insert(Arc::from(name), cluster.clone());
        self.local.store(Arc::new(next));
        Some(cluster)
    }

    /// Closes idle connections past their timeout in every cluster.
    pub fn reap_idle(&self) {
        for map in [self.clusters.load(), self.local.load()] {
            for cluster in map.values() {
                for endpoint in &cluster.endpoints {
                    endpoint.pool.reap_idle();
                }
            }
        }
    }
}

fn new_endpoint(
    address: SocketAddr,
    weight: u32,
    priority: u32,
    pool_settings: &Arc<PoolSettings>,
    limits: &Arc<ConnectionLimits>,
) -> Arc<Endpoint> {
    Arc::new(Endpoint {
        address,
        weight: weight.max(1),
        priority,
        active_requests: AtomicUsize::new(0),
        consecutive_5xx: AtomicU32::new(0),
        consecutive_connect_failures: AtomicU32::new(0),
        ejected_until_ms: AtomicU64::new(0),
        ejections: AtomicU32::new(0),
        pool: EndpointPool::new(address, pool_settings.clone(), limits.clone()),
    })
}

/// The IP endpoints of a cluster's settings, with their weights and
/// priorities.
fn ip_endpoints(settings: &ClusterFile) -> Vec<(SocketAddr, u32, u32)> {
    settings
        .endpoints
        .iter()
        .filter_map(|e| Some((e.address.ip()?, e.weight, e.priority)))
        .collect()
}

/// The endpoints grouped by priority, best first, each group with its
/// balancer.
fn priority_levels(policy: LbPolicy, endpoints: &[Arc<Endpoint>]) -> Vec<Level> {
    let mut priorities: Vec<u32> = endpoints.iter().map(|e| e.priority).collect();
    priorities.sort_unstable();
    priorities.dedup();
    priorities
        .into_iter()
        .map(|priority| {
            let members: Vec<Arc<Endpoint>> = endpoints
                .iter()
                .filter(|e| e.priority == priority)
                .cloned()
                .collect();
            Level {
                balancer: Balancer::new(policy, &members),
                endpoints: members,
            }
        })
        .collect()
}

/// Whether two settings differ in their endpoints only.
fn same_but_endpoints(a: &ClusterFile, b: &ClusterFile) -> bool {
    let strip = |c: &ClusterFile| {
        serde_json::to_value(c).map(|mut v| {
            v["endpoints"] = serde_json::Value::Null;
            v
        })
    };
    matches!((strip(a), strip(b)), (Ok(a), Ok(b)) if a == b)
}

/// Settings compare by their serialized form: the file types carry no
/// `PartialEq`, and config changes are rare enough for the cost.
fn same_settings(a: &ClusterFile, b: &ClusterFile) -> bool {
    match (serde_json::to_value(a), serde_json::to_value(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// Outcome of one try, as outlier detection sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Any answer below 500.
    Success,
    /// A 5xx answer or a reset.
    ServerError,
    /// No connection could be made.
    ConnectFailure,
}

/// One upstream endpoint and its health.
#[derive(Debug)]
pub struct Endpoint {
    /// Address.
    pub address: SocketAddr,
    /// LB weight.
    pub weight: u32,
    /// Priority level; 0 is used first.
    pub priority: u32,
    /// Requests in flight to it.
    active_requests: AtomicUsize,
    consecutive_5xx: AtomicU32,
    consecutive_connect_failures: AtomicU32,
    /// Milliseconds since the cluster's epoch until which it is ejected; 0 when not.
    ejected_until_ms: AtomicU64,
    /// Ejections so far; the next one lasts this many times the base.
    ejections: AtomicU32,
    /// Its connections.
    pub pool: Arc<EndpointPool>,
}

impl Endpoint {
    /// Requests in flight now.
    pub fn active_requests(&self) -> usize {
        self.active_requests.load(Ordering::Relaxed)
    }
}

/// A cluster's runtime state.
#[derive(Debug)]
pub struct Cluster {
    /// Name.
    pub name: Arc<str>,
    /// Settings from config.
    pub settings: Arc<ClusterFile>,
    endpoints: Vec<Arc<Endpoint>>,
    /// The endpoints by priority, best first: a request goes to the first
    /// level with a healthy endpoint.
    levels: Vec<Level>,
    limits: Arc<ConnectionLimits>,
    // Shared with the cluster an endpoint update replaced, so requests still
    // running there count against the same breaker.
    active_requests: Arc<AtomicUsize>,
    active_retries: Arc<AtomicUsize>,
    epoch: Instant,
    tls: Option<Arc<UpstreamTls>>,
    pool_settings: Arc<PoolSettings>,
}

/// The endpoints of one priority and their balancer.
#[derive(Debug)]
struct Level {
    endpoints: Vec<Arc<Endpoint>>,
    balancer: Balancer,
}

/// Counts a request against `max_requests` (and its endpoint's load) until dropped.
#[derive(Debug)]
pub struct RequestGuard {
    cluster: Arc<Cluster>,
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.cluster.active_requests.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Counts a request against its endpoint's active requests until dropped.
#[derive(Debug)]
pub struct EndpointGuard {
    endpoint: Arc<Endpoint>,
}

impl EndpointGuard {
    /// The endpoint.
    pub fn endpoint(&self) -> &Arc<Endpoint> {
        &self.endpoint
    }
}

impl Drop for EndpointGuard {
    fn drop(&mut self) {
        self.endpoint.active_requests.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Counts a retry against the retry budget until dropped.
#[derive(Debug)]
pub struct RetryGuard {
    cluster: Arc<Cluster>,
}

impl Drop for RetryGuard {
    fn drop(&mut self) {
        self.cluster.active_retries.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Cluster {
    /// Runtime state for a plaintext cluster's settings.
    pub fn new(settings: Arc<ClusterFile>) -> Self {
        Cluster::with_tls(settings, None)
    }

    /// Runtime state for a cluster's settings, with TLS to its endpoints.
    pub fn with_tls(settings: Arc<ClusterFile>, tls: Option<Arc<UpstreamTls>>) -> Self {
        let name: Arc<str> = Arc::from(settings.name.as_str());
        let cb = &settings.circuit_breaker;
        let open_gauge =
            metrics::gauge!(names::UPSTREAM_CONNECTIONS_ACTIVE, "cluster" => name.clone());
        let limits = ConnectionLimits::new(cb.max_connections, cb.max_pending_requests, open_gauge);
        let protocol = match &tls {
            Some(tls) if tls.force_http2 => UpstreamProtocol::Http2,
            _ => settings.protocol,
        };
        let pool_settings = Arc::new(PoolSettings {
            protocol,
            tls: tls.clone(),
            connect_timeout: settings.connect_timeout,
            max_idle: settings.pool.max_idle_per_endpoint,
            idle_timeout: settings.pool.idle_timeout,
        });
        // A DNS-named cluster gets its endpoints from its resolver task.
        let endpoints: Vec<Arc<Endpoint>> = if dns::is_dns(&settings) {
            Vec::new()
        } else {
            ip_endpoints(&settings)
                .into_iter()
                .map(|(address, weight, priority)| {
                    new_endpoint(address, weight, priority, &pool_settings, &limits)
                })
                .collect()
        };
        let levels = priority_levels(settings.lb, &endpoints);
        Cluster {
            name,
            settings,
            endpoints,
            levels,
            limits,
            active_requests: Arc::new(AtomicUsize::new(0)),
            active_retries: Arc::new(AtomicUsize::new(0)),
            epoch: Instant::now(),
            tls,
            pool_settings,
        }
    }

    /// The same cluster with a new endpoint set (EDS): endpoints that stay
    /// keep their pools, load and outlier state; the connection limits and
    /// TLS are shared with `previous`.
    pub fn with_endpoints(previous: &Cluster, settings: Arc<ClusterFile>) -> Self {
        let list = ip_endpoints(&settings);
        Cluster::with_prioritized(previous, settings, &list)
    }

    /// Like [`Cluster::with_endpoints`], with the endpoints given as
    /// addresses and weights (from DNS), all of priority 0.
    pub fn with_addresses(
        previous: &Cluster,
        settings: Arc<ClusterFile>,
        list: &[(SocketAddr, u32)],
    ) -> Self {
        let list: Vec<_> = list.iter().map(|&(a, w)| (a, w, 0)).collect();
        Cluster::with_prioritized(previous, settings, &list)
    }

    /// Like [`Cluster::with_endpoints`], with the endpoints given as
    /// addresses, weights and priorities. An endpoint keeps its state only
    /// where all three stay.
    fn with_prioritized(
        previous: &Cluster,
        settings: Arc<ClusterFile>,
        list: &[(SocketAddr, u32, u32)],
    ) -> Self {
        let mut taken = Vec::new();
        let endpoints: Vec<Arc<Endpoint>> = list
            .iter()
            .map(|&(address, weight, priority)| {
                previous
                    .endpoints
                    .iter()
                    .find(|p| {
                        p.address == address
                            && p.weight == weight.max(1)
                            && p.priority == priority
                            && !taken.iter().any(|t| Arc::ptr_eq(t, p))
                    })
                    .cloned()
                    .inspect(|p| taken.push(p.clone()))
                    .unwrap_or_else(|| {
                        new_endpoint(
                            address,
                            weight,
                            priority,
                            &previous.pool_settings,
                            &previous.limits,
                        )
                    })
            })
            .collect();
        let levels = priority_levels(settings.lb, &endpoints);
        Cluster {
            name: previous.name.clone(),
            settings,
            endpoints,
            levels,
            limits: previous.limits.clone(),
            active_requests: previous.active_requests.clone(),
            active_retries: previous.active_retries.clone(),
            // Ejection deadlines are kept relative to this.
            epoch: previous.epoch,
            tls: previous.tls.clone(),
            pool_settings: previous.pool_settings.clone(),
        }
    }

    /// The protocol spoken to the endpoints: the configured one, except that
    /// mesh mTLS always speaks HTTP/2.
    pub fn protocol(&self) -> UpstreamProtocol {
        match &self.tls {
            Some(tls) if tls.force_http2 => UpstreamProtocol::Http2,
            _ => self.settings.protocol,
        }
    }

    /// TLS to the endpoints, if the cluster uses it.
    pub fn tls(&self) -> Option<&Arc<UpstreamTls>> {
        self.tls.as_ref()
    }

    /// The endpoints.
    pub fn endpoints(&self) -> &[Arc<Endpoint>] {
        &self.endpoints
    }

    /// Counts a TCP proxy connection against `max_connections`.
    pub fn try_open_connection(&self) -> Result<pool::ConnectionPermit, UpstreamError> {
        self.limits.try_open().ok_or_else(|| {
            self.count_breaker_open("connections");
            UpstreamError::Overloaded("connections")
        })
    }

    /// Upstream connections open now.
    pub fn open_connections(&self) -> usize {
        self.limits.open()
    }

    /// Admits a request under `max_requests`, or says which breaker tripped.
    pub fn begin_request(self: &Arc<Self>) -> Result<RequestGuard, UpstreamError> {
        let max = self.settings.circuit_breaker.max_requests;
        let previous = self.active_requests.fetch_add(1, Ordering::AcqRel);
        let guard = RequestGuard {
            cluster: self.clone(),
        };
        if previous >= max {
            self.count_breaker_open("requests");
            return Err(UpstreamError::Overloaded("requests"));
        }
        Ok(guard)
    }

    /// Admits a retry if both the retry budget and `max_retries` allow it.
    pub fn begin_retry(self: &Arc<Self>) -> Option<RetryGuard> {
        let budget = &self.settings.retry_budget;
        let active = self.active_requests.load(Ordering::Acquire);
        let by_budget = (active as f64 * budget.budget_percent / 100.0) as usize;
        let allowed = by_budget
            .max(budget.min_retry_concurrency)
            .min(self.settings.circuit_breaker.max_retries);
        let previous = self.active_retries.fetch_add(1, Ordering::AcqRel);
        let guard = RetryGuard {
            cluster: self.clone(),
        };
        if previous >= allowed {
            self.count_breaker_open("retries");
            return None;
        }
        Some(guard)
    }

    fn count_breaker_open(&self, resource: &'static str) {
        metrics::counter!(names::UPSTREAM_OVERFLOW_TOTAL, "cluster" => self.name.clone(), "resource" => resource)
            .increment(1);
    }

    fn now_ms(&self) -> u64 {
        // +1 so that 0 always means "not ejected".
        self.epoch.elapsed().as_millis() as u64 + 1
    }

    fn is_ejected(&self, endpoint: &Endpoint, now_ms: u64) -> bool {
        endpoint.ejected_until_ms.load(Ordering::Relaxed) > now_ms
    }

    /// Picks a healthy endpoint by the cluster's LB policy, from the best
    /// priority that has one (Envoy's failover without partial spill);
    /// `roll` is random.
    pub fn pick(&self, roll: u64) -> Result<EndpointGuard, UpstreamError> {
        let now = self.now_ms();
        let endpoint = self
            .levels
            .iter()
            .find_map(|level| {
                let index = level
                    .balancer
                    .pick(&level.endpoints, roll, |e| !self.is_ejected(e, now))?;
                Some(level.endpoints[index].clone())
            })
            .ok_or(UpstreamError::NoHealthyEndpoint)?;
        endpoint.active_requests.fetch_add(1, Ordering::AcqRel);
        Ok(EndpointGuard { endpoint })
    }

    /// Feeds one try's outcome to outlier detection.
    pub fn report(&self, endpoint: &Endpoint, outcome: Outcome) {
        let Some(od) = &self.settings.outlier_detection else {
            return;
        };
        match outcome {
            Outcome::Success => {
                endpoint.consecutive_5xx.store(0, Ordering::Relaxed);
                endpoint
                    .consecutive_connect_failures
                    .store(0, Ordering::Relaxed);
                self.decay_ejections(endpoint, od);
            }
            Outcome::ServerError => {
                endpoint
                    .consecutive_connect_failures
                    .store(0, Ordering::Relaxed);
                let count = endpoint.consecutive_5xx.fetch_add(1, Ordering::AcqRel) + 1;
                if od.consecutive_5xx > 0 && count >= od.consecutive_5xx {
                    self.eject(endpoint, od, "consecutive_5xx");
                }
            }
            Outcome::ConnectFailure => {
                let count = endpoint
                    .consecutive_connect_failures
                    .fetch_add(1, Ordering::AcqRel)
                    + 1;
                let by_5xx = endpoint.consecutive_5xx.fetch_add(1, Ordering::AcqRel) + 1;
                if od.consecutive_connect_failures > 0 && count >= od.consecutive_connect_failures {
                    self.eject(endpoint, od, "consecutive_connect_failures");
                } else if od.consecutive_5xx > 0 && by_5xx >= od.consecutive_5xx {
                    // Envoy counts connect failures as 5xx too.
                    self.eject(endpoint, od, "consecutive_5xx");
                }
            }
        }
    }

    /// After a healthy stretch as long as its last ejection, an endpoint's
    /// next ejection shrinks back, so one bad hour is not punished forever.
    fn decay_ejections(&self, endpoint: &Endpoint, od: &OutlierDetectionFile) {
        let ejections = endpoint.ejections.load(Ordering::Relaxed);
        if ejections == 0 {
            return;
        }
        let until = endpoint.ejected_until_ms.load(Ordering::Relaxed);
        let last = ejection_time(od, ejections).as_millis() as u64;
        if self.now_ms() > until.saturating_add(last) {
            let _ = endpoint.ejections.compare_exchange(
                ejections,
                ejections - 1,
                Ordering::AcqRel,
                Ordering::Relaxed,
            );
        }
    }

    fn eject(&self, endpoint: &Endpoint, od: &OutlierDetectionFile, reason: &'static str) {
        let now = self.now_ms();
        if self.is_ejected(endpoint, now) {
            return;
        }
        let ejected = self
            .endpoints
            .iter()
            .filter(|e| self.is_ejected(e, now))
            .count();
        // Envoy's rule: eject while the share already ejected is below the
        // maximum, so one endpoint may always go unless the maximum is 0.
        if ejected * 100 >= od.max_ejection_percent as usize * self.endpoints.len() {
            return;
        }
        let ejections = endpoint.ejections.fetch_add(1, Ordering::AcqRel) + 1;
        let duration = ejection_time(od, ejections);
        endpoint
            .ejected_until_ms
            .store(now + duration.as_millis() as u64, Ordering::Release);
        endpoint.consecutive_5xx.store(0, Ordering::Relaxed);
        endpoint
            .consecutive_connect_failures
            .store(0, Ordering::Relaxed);
        tracing::warn!(
            cluster = %self.name,
            endpoint = %endpoint.address,
            reason,
            seconds = duration.as_secs_f64(),
            "outlier ejected"
        );
        metrics::counter!(names::OUTLIER_EJECTIONS_TOTAL, "cluster" => self.name.clone(), "reason" => reason)
            .increment(1);
    }
}

fn ejection_time(od: &OutlierDetectionFile, ejections: u32) -> Duration {
    od.base_ejection_time
        .saturating_mul(ejections.max(1))
        .min(od.max_ejection_time)
}

#[cfg(test)]
mod tests;

//! Clusters whose endpoints are DNS names (Envoy's STRICT_DNS and
//! LOGICAL_DNS): one task per cluster resolves the names at once and then
//! every `dns_refresh_rate`, and swaps in the cluster with the addresses it
//! found. A failed lookup keeps that name's last good addresses.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::AbortHandle;

use super::{Cluster, ClusterMap};
use crate::config::file::{ClusterFile, DnsLookupFamily, DnsType, EndpointAddress};
use crate::telemetry::metrics as names;

/// Longest wait for one name (Envoy's resolver timeout).
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);

/// The resolver task of one cluster; dropping it stops the task.
#[derive(Debug)]
pub(super) struct DnsTask {
    /// The settings it resolves for.
    pub settings: Arc<ClusterFile>,
    /// Tells this task's swaps from those of a task that replaced it.
    pub id: u64,
    /// True once the first round of lookups is done, found or not.
    pub ready: watch::Receiver<bool>,
    abort: Option<AbortHandle>,
}

impl Drop for DnsTask {
    fn drop(&mut self) {
        if let Some(abort) = &self.abort {
            abort.abort();
        }
    }
}

/// Resolver tasks by cluster name.
pub(super) type DnsTasks = HashMap<Arc<str>, DnsTask>;

type LookupFn = dyn Fn(String, u16) -> futures_util::future::BoxFuture<'static, std::io::Result<Vec<SocketAddr>>>
    + Send
    + Sync;

/// Looks a name up: the system resolver (`/etc/hosts`, then DNS), or a
/// scripted one in tests.
#[derive(Clone)]
pub(super) struct Resolver(Arc<LookupFn>);

impl Resolver {
    /// The system resolver.
    pub(super) fn system() -> Resolver {
        Resolver(Arc::new(|host: String, port: u16| {
            Box::pin(async move {
                tokio::net::lookup_host((host.as_str(), port))
                    .await
                    .map(Iterator::collect)
            })
        }))
    }

    /// A resolver that answers with `lookup`.
    #[cfg(test)]
    pub(super) fn from_fn(
        lookup: impl Fn(String, u16) -> std::io::Result<Vec<SocketAddr>> + Send + Sync + 'static,
    ) -> Resolver {
        Resolver(Arc::new(move |host, port| {
            let answer = lookup(host, port);
            Box::pin(async move { answer })
        }))
    }
}

impl Default for Resolver {
    fn default() -> Self {
        Resolver::system()
    }
}

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Resolver")
    }
}

/// Whether a cluster names any endpoint by DNS.
pub(super) fn is_dns(settings: &ClusterFile) -> bool {
    settings.endpoints.iter().any(|e| e.address.ip().is_none())
}

/// Starts resolving for `template` (the cluster with no endpoints yet),
/// swapping results into `clusters` while `tasks` still holds this task.
pub(super) fn start(
    template: Arc<Cluster>,
    clusters: &Arc<arc_swap::ArcSwap<ClusterMap>>,
    tasks: &Arc<Mutex<DnsTasks>>,
    resolver: &Resolver,
) -> DnsTask {
    static NEXT_ID: AtomicU64 = AtomicU64::new(1);
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    let (ready_tx, ready) = watch::channel(false);
    let settings = template.settings.clone();
    let abort = match tokio::runtime::Handle::try_current() {
        Ok(runtime) => Some(
            runtime
                .spawn(run(
                    template,
                    Arc::downgrade(clusters),
                    Arc::downgrade(tasks),
                    id,
                    ready_tx,
                    resolver.clone(),
                ))
                .abort_handle(),
        ),
        Err(_) => {
            tracing::error!(cluster = %settings.name, "no async runtime to resolve DNS endpoints in");
            None
        }
    };
    DnsTask {
        settings,
        id,
        ready,
        abort,
    }
}

async fn run(
    template: Arc<Cluster>,
    clusters: Weak<arc_swap::ArcSwap<ClusterMap>>,
    tasks: Weak<Mutex<DnsTasks>>,
    id: u64,
    ready: watch::Sender<bool>,
    resolver: Resolver,
) {
    let settings = template.settings.clone();
    let name = template.name.clone();
    let mut last: Vec<Option<Vec<SocketAddr>>> = vec![None; settings.endpoints.len()];
    let mut current: Option<Vec<(SocketAddr, u32)>> = None;
    let mut installed = template;
    loop {
        let mut failed = false;
        for (i, endpoint) in settings.endpoints.iter().enumerate() {
            match resolve(&endpoint.address, settings.dns_lookup_family, &resolver).await {
                Ok(addresses) => last[i] = Some(addresses),
                Err(reason) => {
                    failed = true;
                    tracing::warn!(
                        cluster = %name,
                        endpoint = %endpoint.address,
                        reason,
                        "DNS lookup failed; keeping the last addresses"
                    );
                }
            }
        }
        metrics::counter!(
            names::DNS_RESOLUTIONS_TOTAL,
            "cluster" => name.clone(),
            "result" => if failed { "failure" } else { "success" },
        )
        .increment(1);
        let list = endpoint_list(&settings, &last);
        if current.as_ref() != Some(&list) {
            let next = Arc::new(Cluster::with_addresses(&installed, settings.clone(), &list));
            let (Some(clusters), Some(tasks)) = (clusters.upgrade(), tasks.upgrade()) else {
                return;
            };
            if !install(&clusters, &tasks, &name, id, next.clone()) {
                return;
            }
            tracing::info!(cluster = %name, endpoints = list.len(), "DNS endpoints updated");
            installed = next;
            current = Some(list);
        }
        ready.send_replace(true);
        tokio::time::sleep(settings.dns_refresh_rate).await;
    }
}

/// Puts `cluster` in the map unless the task `id` has been replaced or
/// removed since (then the caller stops).
fn install(
    clusters: &arc_swap::ArcSwap<ClusterMap>,
    tasks: &Mutex<DnsTasks>,
    name: &Arc<str>,
    id: u64,
    cluster: Arc<Cluster>,
) -> bool {
    // Held while swapping: `ClusterManager::update` builds its map under
    // the same lock, so neither loses the other's change.
    let Ok(tasks) = tasks.lock() else {
        return false;
    };
    if tasks.get(name).map(|t| t.id) != Some(id) {
        return false;
    }
    let mut next = (**clusters.load()).clone();
    next.insert(name.clone(), cluster);
    clusters.store(Arc::new(next));
    true
}

/// Every address of every endpoint (the first one only for a logical DNS
/// cluster), each with its endpoint's weight, without repeats.
pub(super) fn endpoint_list(
    settings: &ClusterFile,
    resolved: &[Option<Vec<SocketAddr>>],
) -> Vec<(SocketAddr, u32)> {
    let mut list: Vec<(SocketAddr, u32)> = Vec::new();
    for (endpoint, addresses) in settings.endpoints.iter().zip(resolved) {
        let Some(addresses) = addresses else { continue };
        let take = match settings.dns_type {
            DnsType::Strict => addresses.len(),
            DnsType::Logical => 1,
        };
        for address in addresses.iter().take(take) {
            if !list.iter().any(|(a, _)| a == address) {
                list.push((*address, endpoint.weight.max(1)));
            }
        }
    }
    list
}

/// The addresses of one endpoint, in the resolver's order.
async fn resolve(
    address: &EndpointAddress,
    family: DnsLookupFamily,
    resolver: &Resolver,
) -> Result<Vec<SocketAddr>, String> {
    let (host, port) = match address {
        EndpointAddress::Ip(addr) => return Ok(vec![*addr]),
        EndpointAddress::Name { host, port } => (host.clone(), *port),
    };
    let found = tokio::time::timeout(LOOKUP_TIMEOUT, (resolver.0)(host, port))
        .await
        .map_err(|_| format!("no answer in {LOOKUP_TIMEOUT:?}"))?
        .map_err(|e| e.to_string())?;
    let mut all: Vec<SocketAddr> = Vec::new();
    for address in found {
        if !all.contains(&address) {
            all.push(address);
        }
    }
    let picked = pick_family(all, family);
    if picked.is_empty() {
        return Err(format!("no addresses of family {family:?}"));
    }
    Ok(picked)
}

/// The addresses that `family` uses.
pub(super) fn pick_family(all: Vec<SocketAddr>, family: DnsLookupFamily) -> Vec<SocketAddr> {
    let has_v4 = all.iter().any(SocketAddr::is_ipv4);
    let has_v6 = all.iter().any(SocketAddr::is_ipv6);
    let keep_v4 = match family {
        DnsLookupFamily::V4Only | DnsLookupFamily::All => true,
        DnsLookupFamily::V6Only => false,
        DnsLookupFamily::Auto => !has_v6,
        DnsLookupFamily::V4Preferred => true,
    };
    let keep_v6 = match family {
        DnsLookupFamily::V6Only | DnsLookupFamily::All | DnsLookupFamily::Auto => true,
        DnsLookupFamily::V4Only => false,
        DnsLookupFamily::V4Preferred => !has_v4,
    };
    all.into_iter()
        .filter(|a| if a.is_ipv4() { keep_v4 } else { keep_v6 })
        .collect()
}

//! Telemetry: tracing setup, metric names, and the per-call record that
//! feeds metrics when a call ends.

pub mod access_log;
pub mod als;
pub mod histogram;
pub mod istio;
pub mod log;
pub mod metrics;
pub mod record;
pub mod trace;

pub use record::{CallRecord, ListenerTelemetry, TelemetryHub};

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, OnceLock, RwLock, Weak};

use ::metrics::Counter;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use self::histogram::Histogram;
use self::metrics as names;

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// The Prometheus handle, when a recorder was installed.
pub fn prometheus_handle() -> Option<PrometheusHandle> {
    HANDLE.get().cloned()
}

/// Installs the Prometheus recorder once per process and returns its handle.
pub fn install_prometheus_recorder() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            // No histogram goes through this recorder (see `histogram`).
            let recorder = PrometheusBuilder::new().build_recorder();
            let handle = recorder.handle();
            // Another recorder may already be installed (embedding, tests); then
            // this handle renders an empty registry rather than failing start-up.
            let _ = ::metrics::set_global_recorder(recorder);
            names::describe();
            istio::describe();
            access_log::describe();
            als::describe();
            handle
        })
        .clone()
}

/// How runtime log lines are written (to stderr).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

type FilterHandle =
    tracing_subscriber::reload::Handle<tracing_subscriber::EnvFilter, tracing_subscriber::Registry>;

static LOG_FILTER: OnceLock<(FilterHandle, RwLock<String>)> = OnceLock::new();

/// Sets up `tracing` output once: `level` (filter directives such as
/// `info,postern=debug`), else `RUST_LOG`, else `info`. The level can be
/// changed later with [`set_log_level`].
pub fn init_tracing(format: LogFormat, level: Option<&str>) {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    use tracing_subscriber::{EnvFilter, Layer as _};
    let directives = level
        .map(str::to_string)
        .or_else(|| std::env::var("RUST_LOG").ok())
        .unwrap_or_else(|| "info".to_string());
    let (directives, filter) = match EnvFilter::try_new(&directives) {
        Ok(filter) => (directives, filter),
        Err(_) => ("info".to_string(), EnvFilter::new("info")),
    };
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    let output = match format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_writer(std::io::stderr)
            .boxed(),
    };
    if tracing_subscriber::registry()
        .with(filter)
        .with(output)
        .try_init()
        .is_ok()
    {
        let _ = LOG_FILTER.set((handle, RwLock::new(directives)));
    }
}

/// A log level change that could not be made.
#[derive(Debug, thiserror::Error)]
pub enum LogLevelError {
    /// The directives do not parse.
    #[error("invalid log level {0:?}: use e.g. `debug` or `info,postern=trace`")]
    Invalid(String),
    /// This process did not set up logging through [`init_tracing`].
    #[error("logging is not reloadable in this process")]
    NotReloadable,
}

/// Replaces the log filter at runtime (admin `POST /logging?level=...`).
pub fn set_log_level(directives: &str) -> Result<(), LogLevelError> {
    let filter = tracing_subscriber::EnvFilter::try_new(directives)
        .map_err(|_| LogLevelError::Invalid(directives.to_string()))?;
    let (handle, current) = LOG_FILTER.get().ok_or(LogLevelError::NotReloadable)?;
    handle
        .reload(filter)
        .map_err(|_| LogLevelError::NotReloadable)?;
    if let Ok(mut current) = current.write() {
        *current = directives.to_string();
    }
    tracing::info!(level = directives, "log level changed");
    Ok(())
}

/// The log filter in force, when logging is reloadable.
pub fn log_level() -> Option<String> {
    let (_, current) = LOG_FILTER.get()?;
    current.read().ok().map(|c| c.clone())
}

/// Response flags: a short code for each way a call did not go plainly.
/// Letters follow Envoy's where the meaning is the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ResponseFlag {
    /// No route matched.
    NoRoute,
    /// No healthy upstream endpoint.
    NoHealthyUpstream,
    /// Upstream connect failure.
    UpstreamConnectFailure,
    /// Upstream reset or protocol error.
    UpstreamReset,
    /// Upstream timeout.
    UpstreamTimeout,
    /// Circuit breaker open.
    UpstreamOverflow,
    /// Retries refused by the budget or `max_retries`.
    RetryLimitExceeded,
    /// The downstream went away before the response ended.
    DownstreamClosed,
    /// A proxy-made direct response or redirect.
    DirectResponse,
    /// A downstream limit refused the request.
    DownstreamLimit,
    /// RBAC refused the request.
    RbacDenied,
    /// A local rate limit or the rate-limit service refused the request.
    RateLimited,
    /// The connection or stream idled out.
    StreamIdleTimeout,
    /// The request was malformed (bad host, target or path).
    DownstreamProtocolError,
    /// The route named a cluster that does not exist.
    NoClusterFound,
    /// JWT authentication refused the request (missing or invalid token).
    /// Envoy has no flag for this; `UJWT` is Postern's own code, kept
    /// apart from `UAEX` so that bad tokens are not read as an external
    /// authorization service failing.
    UnauthorizedJwt,
    /// The process was overloaded and shed the request.
    OverloadManager,
    /// The rate-limit service failed and `failure_mode_deny` refused the request.
    RateLimitServiceError,
}

impl ResponseFlag {
    /// The short code.
    pub fn code(self) -> &'static str {
        match self {
            ResponseFlag::NoRoute => "NR",
            ResponseFlag::RbacDenied => "RBAC",
            ResponseFlag::RateLimited => "RL",
            ResponseFlag::NoHealthyUpstream => "UH",
            ResponseFlag::UpstreamConnectFailure => "UF",
            ResponseFlag::UpstreamReset => "UR",
            ResponseFlag::UpstreamTimeout => "UT",
            ResponseFlag::UpstreamOverflow => "UO",
            ResponseFlag::RetryLimitExceeded => "URX",
            ResponseFlag::DownstreamClosed => "DC",
            ResponseFlag::DirectResponse => "DR",
            ResponseFlag::DownstreamLimit => "DL",
            ResponseFlag::StreamIdleTimeout => "SI",
            ResponseFlag::DownstreamProtocolError => "DPE",
            ResponseFlag::NoClusterFound => "NC",
            ResponseFlag::UnauthorizedJwt => "UJWT",
            ResponseFlag::OverloadManager => "OM",
            ResponseFlag::RateLimitServiceError => "RLSE",
        }
    }
}

impl ResponseFlag {
    /// Every flag, in the order codes are listed.
    pub const ALL: [ResponseFlag; 18] = [
        ResponseFlag::NoRoute,
        ResponseFlag::NoHealthyUpstream,
        ResponseFlag::UpstreamConnectFailure,
        ResponseFlag::UpstreamReset,
        ResponseFlag::UpstreamTimeout,
        ResponseFlag::UpstreamOverflow,
        ResponseFlag::RetryLimitExceeded,
        ResponseFlag::DownstreamClosed,
        ResponseFlag::DirectResponse,
        ResponseFlag::DownstreamLimit,
        ResponseFlag::RbacDenied,
        ResponseFlag::RateLimited,
        ResponseFlag::StreamIdleTimeout,
        ResponseFlag::DownstreamProtocolError,
        ResponseFlag::NoClusterFound,
        ResponseFlag::UnauthorizedJwt,
        ResponseFlag::OverloadManager,
        ResponseFlag::RateLimitServiceError,
    ];

    fn bit(self) -> u32 {
        1 << (self as u32)
    }
}

/// The set of flags a call collected; `-` when empty, else the codes joined
/// by commas, as Envoy prints them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct ResponseFlags(u32);

impl ResponseFlags {
    /// Adds a flag.
    pub fn insert(&mut self, flag: ResponseFlag) {
        self.0 |= flag.bit();
    }

    /// Whether the flag is set.
    pub fn contains(self, flag: ResponseFlag) -> bool {
        self.0 & flag.bit() != 0
    }

    /// No flag set: the call went plainly.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The flags set, in a fixed order.
    pub fn iter(self) -> impl Iterator<Item = ResponseFlag> {
        ResponseFlag::ALL
            .into_iter()
            .filter(move |f| self.contains(*f))
    }

    /// The label and log value: `-`, or codes joined by commas. Interned, so
    /// a metric label costs no allocation per call.
    pub fn as_str(self) -> &'static str {
        static JOINED: LazyLock<RwLock<crate::FastMap<u32, &'static str>>> =
            LazyLock::new(|| RwLock::new(crate::FastMap::default()));
        if self.0 == 0 {
            return "-";
        }
        if let Some(s) = JOINED.read().ok().and_then(|m| m.get(&self.0).copied()) {
            return s;
        }
        let joined = self
            .iter()
            .map(ResponseFlag::code)
            .collect::<Vec<_>>()
            .join(",");
        // Each combination that occurs is leaked once; calls collect a few
        // flags at most, so only a handful of combinations ever do.
        let mut map = match JOINED.write() {
            Ok(map) => map,
            Err(poisoned) => poisoned.into_inner(),
        };
        map.entry(self.0)
            .or_insert_with(|| Box::leak(joined.into_boxed_str()))
    }
}

impl From<ResponseFlag> for ResponseFlags {
    fn from(flag: ResponseFlag) -> Self {
        ResponseFlags(flag.bit())
    }
}

/// Static label values for status codes, so recording allocates nothing.
fn status_label(code: u16) -> &'static str {
    static CODES: LazyLock<Vec<&'static str>> = LazyLock::new(|| {
        (0..600u16)
            .map(|c| &*Box::leak(c.to_string().into_boxed_str()))
            .collect()
    });
    CODES.get(code as usize).copied().unwrap_or("other")
}

/// Metric handles for the calls of one listener, registered on first use.
/// Recording a call then hashes a few pointers instead of building and
/// hashing a labelled key in the recorder.
#[derive(Debug)]
pub struct CallMetrics {
    listener: Arc<str>,
    counters: RwLock<Handles<CounterKey, Counter>>,
    histograms: RwLock<Handles<(usize, usize), Arc<Histogram>>>,
}

/// Metric handles by name addresses, with the names they stand for.
///
/// Each config push builds its routes anew, so the same route and cluster
/// names come back at new addresses: without pruning, every push would add
/// entries for the names of the configs it replaced (the soak's RSS growth,
/// issue #8). Entries whose names no config holds any more are dropped,
/// amortised over inserts.
#[derive(Debug)]
struct Handles<K, H> {
    map: HashMap<K, (H, NamePair), AddressHash>,
    /// Size at which the next insert prunes first: twice what the last
    /// prune kept, so pruning costs O(1) per insert.
    prune_at: usize,
}

/// Fewest entries before pruning is worth a pass.
const MIN_PRUNE_AT: usize = 64;

impl<K: std::hash::Hash + Eq + Copy, H: Clone> Handles<K, H> {
    fn new() -> Self {
        Handles {
            map: HashMap::with_hasher(AddressHash),
            prune_at: MIN_PRUNE_AT,
        }
    }

    fn get(&self, key: &K) -> Option<H> {
        self.map.get(key).map(|(h, _)| h.clone())
    }

    fn insert(&mut self, key: K, handle: H, route: &Arc<str>, cluster: &Arc<str>) {
        if self.map.len() >= self.prune_at {
            self.map
                .retain(|_, (_, (r, c))| r.strong_count() > 0 && c.strong_count() > 0);
            self.prune_at = (self.map.len() * 2).max(MIN_PRUNE_AT);
        }
        let names = (Arc::downgrade(route), Arc::downgrade(cluster));
        self.map.insert(key, (handle, names));
    }
}

/// A cheap hasher for keys made of addresses and small numbers: SipHash's
/// flood resistance buys nothing here, since no key comes from a request.
#[derive(Debug, Default, Clone, Copy)]
struct AddressHash;

impl std::hash::BuildHasher for AddressHash {
    type Hasher = AddressHasher;
    fn build_hasher(&self) -> AddressHasher {
        AddressHasher(0)
    }
}

#[derive(Debug)]
struct AddressHasher(u64);

impl std::hash::Hasher for AddressHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.write_u64(u64::from(*b));
        }
    }
    fn write_u64(&mut self, n: u64) {
        // FxHash's step: rotate, mix in, multiply by an odd constant.
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
    fn write_usize(&mut self, n: usize) {
        self.write_u64(n as u64);
    }
    fn write_u16(&mut self, n: u16) {
        self.write_u64(u64::from(n));
    }
    fn write_u8(&mut self, n: u8) {
        self.write_u64(u64::from(n));
    }
}

/// Route and cluster names by address, status and flags.
type CounterKey = (usize, usize, u16, ResponseFlags);
/// The route and cluster names of an entry. Weak, so that the entry does
/// not keep a replaced config's names alive; a weak reference still keeps
/// the allocation, so an address cannot be reused by another name while it
/// is a key.
type NamePair = (Weak<str>, Weak<str>);

fn address(name: &Arc<str>) -> usize {
    Arc::as_ptr(name) as *const u8 as usize
}

impl CallMetrics {
    /// Handles for a listener's calls.
    pub fn new(listener: Arc<str>) -> Arc<Self> {
        Arc::new(CallMetrics {
            listener,
            counters: RwLock::new(Handles::new()),
            histograms: RwLock::new(Handles::new()),
        })
    }

    fn record(
        &self,
        route: &Arc<str>,
        cluster: &Arc<str>,
        status: u16,
        flags: ResponseFlags,
        seconds: f64,
    ) {
        let key = (address(route), address(cluster), status, flags);
        let counter = self.counters.read().ok().and_then(|m| m.get(&key));
        let counter = counter.unwrap_or_else(|| {
            let counter = ::metrics::counter!(
                names::HTTP_REQUESTS_TOTAL,
                "listener" => self.listener.clone(),
                "route" => route.clone(),
                "cluster" => cluster.clone(),
                "code" => status_label(status),
                "flags" => flags.as_str(),
            );
            if let Ok(mut map) = self.counters.write() {
                map.insert(key, counter.clone(), route, cluster);
            }
            counter
        });
        counter.increment(1);

        let pair = (key.0, key.1);
        let histogram = self.histograms.read().ok().and_then(|m| m.get(&pair));
        let histogram = histogram.unwrap_or_else(|| {
            let histogram = names::HTTP_REQUEST_DURATION_FAMILY.series(vec![
                ::metrics::Label::new("listener", self.listener.clone()),
                ::metrics::Label::new("route", route.clone()),
                ::metrics::Label::new("cluster", cluster.clone()),
            ]);
            if let Ok(mut map) = self.histograms.write() {
                map.insert(pair, histogram.clone(), route, cluster);
            }
            histogram
        });
        histogram.record(seconds);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::Arc;

    use metrics_util::debugging::{DebugValue, DebuggingRecorder};

    use super::{address, CallMetrics, ResponseFlags, MIN_PRUNE_AT};

    /// Each push translates the config anew, so a listener sees the same
    /// route and cluster names at new addresses: the handle maps must not
    /// grow with the number of pushes, and the series must carry on.
    #[test]
    fn call_metrics_stay_bounded_across_config_pushes() {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        let calls = CallMetrics::new(Arc::from("http"));
        // A route of a config that stays: its entry must survive pruning.
        let kept: Arc<str> = Arc::from("kept");
        let pushes = 20 * MIN_PRUNE_AT;
        metrics::with_local_recorder(&recorder, || {
            calls.record(&kept, &kept, 200, ResponseFlags::default(), 0.001);
            for _ in 0..pushes {
                let route: Arc<str> = Arc::from("default");
                let cluster: Arc<str> = Arc::from("backend");
                calls.record(&route, &cluster, 200, ResponseFlags::default(), 0.001);
            }
        });
        let key = (
            address(&kept),
            address(&kept),
            200,
            ResponseFlags::default(),
        );
        let counters = calls.counters.read().unwrap();
        let histograms = calls.histograms.read().unwrap();
        assert!(
            counters.map.len() <= MIN_PRUNE_AT,
            "{} counter handles after {pushes} pushes",
            counters.map.len()
        );
        assert!(histograms.map.len() <= MIN_PRUNE_AT);
        assert!(
            counters.map.contains_key(&key),
            "a live route's handle was pruned"
        );
        assert!(histograms.map.contains_key(&(key.0, key.1)));
        let requests =
            snapshotter
                .snapshot()
                .into_vec()
                .into_iter()
                .find_map(|(key, _, _, value)| {
                    let route = key.key().labels().find(|l| l.key() == "route")?;
                    match value {
                        DebugValue::Counter(n) if route.value() == "default" => Some(n),
                        _ => None,
                    }
                });
        assert_eq!(requests, Some(pushes as u64));
    }
}

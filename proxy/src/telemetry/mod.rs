//! Telemetry: tracing setup, metric names, and the per-call record that
//! feeds metrics when a call ends.

pub mod als;
pub mod log;
pub mod metrics;

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, OnceLock, RwLock};
use std::time::Instant;

use ::metrics::{Counter, Histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

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
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Full(names::HTTP_REQUEST_DURATION_SECONDS.to_string()),
                    names::DURATION_BUCKETS,
                )
                .unwrap_or_else(|_| PrometheusBuilder::new());
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            // Another recorder may already be installed (embedding, tests); then
            // this handle renders an empty registry rather than failing start-up.
            let _ = ::metrics::set_global_recorder(recorder);
            names::describe();
            handle
        })
        .clone()
}

/// Sets up `tracing` output from `RUST_LOG` (default `info`) once.
pub fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
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
    /// A local rate limit refused the request.
    RateLimited,
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
        }
    }
}

impl ResponseFlag {
    /// Every flag, in the order codes are listed.
    pub const ALL: [ResponseFlag; 12] = [
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
    ];

    fn bit(self) -> u16 {
        1 << (self as u16)
    }
}

/// The set of flags a call collected; `-` when empty, else the codes joined
/// by commas, as Envoy prints them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct ResponseFlags(u16);

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
        static JOINED: LazyLock<RwLock<HashMap<u16, &'static str>>> =
            LazyLock::new(|| RwLock::new(HashMap::new()));
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
        // At most 2^12 combinations, each leaked once.
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
    counters: RwLock<HandleMap<CounterKey, Counter>>,
    histograms: RwLock<HandleMap<(usize, usize), Histogram>>,
}

/// Metric handles by name addresses, with the names they stand for.
type HandleMap<K, H> = HashMap<K, (H, NamePair), AddressHash>;

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

/// Route and cluster names by address; the map keeps them alive, so an
/// address cannot be reused by another name while it is a key.
type CounterKey = (usize, usize, u16, Option<ResponseFlag>);
type NamePair = (Arc<str>, Arc<str>);

fn address(name: &Arc<str>) -> usize {
    Arc::as_ptr(name) as *const u8 as usize
}

impl CallMetrics {
    /// Handles for a listener's calls.
    pub fn new(listener: Arc<str>) -> Arc<Self> {
        Arc::new(CallMetrics {
            listener,
            counters: RwLock::new(HashMap::with_hasher(AddressHash)),
            histograms: RwLock::new(HashMap::with_hasher(AddressHash)),
        })
    }

    fn record(
        &self,
        route: &Arc<str>,
        cluster: &Arc<str>,
        status: u16,
        flag: Option<ResponseFlag>,
        seconds: f64,
    ) {
        let key = (address(route), address(cluster), status, flag);
        let counter = self
            .counters
            .read()
            .ok()
            .and_then(|m| m.get(&key).map(|(c, _)| c.clone()));
        let counter = counter.unwrap_or_else(|| {
            let counter = ::metrics::counter!(
                names::HTTP_REQUESTS_TOTAL,
                "listener" => self.listener.clone(),
                "route" => route.clone(),
                "cluster" => cluster.clone(),
                "code" => status_label(status),
                "flags" => flag.map_or("-", ResponseFlag::code),
            );
            if let Ok(mut map) = self.counters.write() {
                map.insert(key, (counter.clone(), (route.clone(), cluster.clone())));
            }
            counter
        });
        counter.increment(1);

        let pair = (key.0, key.1);
        let histogram = self
            .histograms
            .read()
            .ok()
            .and_then(|m| m.get(&pair).map(|(h, _)| h.clone()));
        let histogram = histogram.unwrap_or_else(|| {
            let histogram = ::metrics::histogram!(
                names::HTTP_REQUEST_DURATION_SECONDS,
                "listener" => self.listener.clone(),
                "route" => route.clone(),
                "cluster" => cluster.clone(),
            );
            if let Ok(mut map) = self.histograms.write() {
                map.insert(pair, (histogram.clone(), (route.clone(), cluster.clone())));
            }
            histogram
        });
        histogram.record(seconds);
    }
}

/// One HTTP call, recorded to metrics when its response ends.
#[derive(Debug)]
pub struct CallRecord {
    start: Instant,
    metrics: Arc<CallMetrics>,
    route: Arc<str>,
    cluster: Arc<str>,
    status: u16,
    flag: Option<ResponseFlag>,
    finished: bool,
}

impl CallRecord {
    /// Starts a record for a call counted in `metrics`.
    pub fn new(start: Instant, metrics: &Arc<CallMetrics>) -> Self {
        static NONE: LazyLock<Arc<str>> = LazyLock::new(|| Arc::from("none"));
        CallRecord {
            start,
            metrics: metrics.clone(),
            route: NONE.clone(),
            cluster: NONE.clone(),
            status: 0,
            flag: None,
            finished: false,
        }
    }

    /// When the call started.
    pub fn start(&self) -> Instant {
        self.start
    }

    /// Sets the matched route.
    pub fn set_route(&mut self, route: &Arc<str>) {
        self.route = route.clone();
    }

    /// Sets the chosen cluster.
    pub fn set_cluster(&mut self, cluster: &Arc<str>) {
        self.cluster = cluster.clone();
    }

    /// Sets the response status.
    pub fn set_status(&mut self, status: u16) {
        self.status = status;
    }

    /// Sets the response flag (the first one set wins).
    pub fn set_flag(&mut self, flag: ResponseFlag) {
        self.flag.get_or_insert(flag);
    }

    /// The upstream failed while streaming the body.
    pub fn upstream_reset(&mut self) {
        self.set_flag(ResponseFlag::UpstreamReset);
    }

    /// The downstream stopped reading before the body ended.
    pub fn downstream_incomplete(&mut self) {
        self.set_flag(ResponseFlag::DownstreamClosed);
    }

    /// Writes the record to metrics; later calls do nothing.
    pub fn finish(&mut self) {
        if self.finished {
            return;
        }
        self.finished = true;
        let seconds = self.start.elapsed().as_secs_f64();
        self.metrics
            .record(&self.route, &self.cluster, self.status, self.flag, seconds);
    }
}

impl Drop for CallRecord {
    fn drop(&mut self) {
        self.finish();
    }
}

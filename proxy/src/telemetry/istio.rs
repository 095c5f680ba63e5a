//! Istio's standard metrics (`istio_requests_total` and friends) with
//! Istio's label set, so existing dashboards and Kiali read Postern as they
//! read Envoy sidecars.
//!
//! Peer labels come from the peer's certificate and from a metadata header
//! the sidecars exchange over mTLS. Each distinct peer is interned once, up
//! to a bound: past it, new peers share one `other` label set, so the number
//! of series stays flat however many callers there are.

use std::sync::{Arc, LazyLock, RwLock};

use http::HeaderValue;
use metrics::Counter;

use super::histogram::{Family, Histogram};
use super::log::{TrafficDirection, WorkloadLabels};
use super::ResponseFlags;
use crate::FastMap;

/// Requests, by the full label set.
pub const REQUESTS_TOTAL: &str = "istio_requests_total";
/// Request duration in milliseconds (Istio's name; not a base unit).
pub const REQUEST_DURATION_MILLISECONDS: &str = "istio_request_duration_milliseconds";
/// Request body sizes in bytes.
pub const REQUEST_BYTES: &str = "istio_request_bytes";
/// Response body sizes in bytes.
pub const RESPONSE_BYTES: &str = "istio_response_bytes";
/// Bytes sent to the downstream of TCP connections.
pub const TCP_SENT_BYTES_TOTAL: &str = "istio_tcp_sent_bytes_total";
/// Bytes received from the downstream of TCP connections.
pub const TCP_RECEIVED_BYTES_TOTAL: &str = "istio_tcp_received_bytes_total";
/// TCP connections opened.
pub const TCP_CONNECTIONS_OPENED_TOTAL: &str = "istio_tcp_connections_opened_total";
/// TCP connections closed.
pub const TCP_CONNECTIONS_CLOSED_TOTAL: &str = "istio_tcp_connections_closed_total";
/// Peers that got the shared `other` labels because the bound was reached.
pub const LABEL_OVERFLOW_TOTAL: &str = "postern_telemetry_peer_overflow_total";

/// Istio's default buckets for durations, in milliseconds.
pub const DURATION_BUCKETS_MS: &[f64] = &[
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];
/// Istio's default buckets for sizes, in bytes.
pub const SIZE_BUCKETS: &[f64] = &[
    1.0,
    10.0,
    100.0,
    1000.0,
    10000.0,
    100000.0,
    1000000.0,
    10000000.0,
    100000000.0,
    1000000000.0,
];

/// `istio_request_duration_milliseconds`, by the full label set.
pub static REQUEST_DURATION_FAMILY: Family = Family::new(
    REQUEST_DURATION_MILLISECONDS,
    "Request duration until the response ends",
    DURATION_BUCKETS_MS,
);
/// `istio_request_bytes`, by the full label set.
pub static REQUEST_BYTES_FAMILY: Family =
    Family::new(REQUEST_BYTES, "Request body sizes", SIZE_BUCKETS);
/// `istio_response_bytes`, by the full label set.
pub static RESPONSE_BYTES_FAMILY: Family =
    Family::new(RESPONSE_BYTES, "Response body sizes", SIZE_BUCKETS);

/// The header sidecars exchange their workload labels in, over mTLS only:
/// requests carry the caller's, responses the callee's. Stripped always.
pub static X_POSTERN_PEER: http::HeaderName = http::HeaderName::from_static("x-postern-peer");

/// Describes the Istio metrics to the installed recorder.
pub fn describe() {
    use metrics::{describe_counter, Unit};
    describe_counter!(REQUESTS_TOTAL, "Requests, by Istio's standard labels");
    describe_counter!(
        TCP_SENT_BYTES_TOTAL,
        Unit::Bytes,
        "Bytes sent to the downstream of TCP connections"
    );
    describe_counter!(
        TCP_RECEIVED_BYTES_TOTAL,
        Unit::Bytes,
        "Bytes received from the downstream of TCP connections"
    );
    describe_counter!(TCP_CONNECTIONS_OPENED_TOTAL, "TCP connections opened");
    describe_counter!(TCP_CONNECTIONS_CLOSED_TOTAL, "TCP connections closed");
    describe_counter!(
        LABEL_OVERFLOW_TOTAL,
        "Calls whose peer got the shared `other` labels because the peer bound was reached"
    );
}

fn unknown() -> Arc<str> {
    static UNKNOWN: LazyLock<Arc<str>> = LazyLock::new(|| Arc::from("unknown"));
    UNKNOWN.clone()
}

impl WorkloadLabels {
    /// Every label `unknown` (revision `latest`, as Istio).
    pub fn unknown() -> WorkloadLabels {
        WorkloadLabels {
            workload: unknown(),
            namespace: unknown(),
            principal: unknown(),
            app: unknown(),
            version: unknown(),
            canonical_service: unknown(),
            canonical_revision: Arc::from("latest"),
            cluster: unknown(),
        }
    }

    /// The metadata header value that tells a peer these labels.
    pub fn header_value(&self) -> Option<HeaderValue> {
        let fields = [
            ("w", &self.workload),
            ("ns", &self.namespace),
            ("app", &self.app),
            ("v", &self.version),
            ("svc", &self.canonical_service),
            ("rev", &self.canonical_revision),
            ("c", &self.cluster),
        ];
        let text = fields
            .iter()
            .filter(|(_, v)| &***v != "unknown")
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(";");
        HeaderValue::from_str(&text).ok()
    }

    /// Labels for a peer: its verified SPIFFE ID, and the metadata header it
    /// sent. The header's namespace must agree with the certificate's, or
    /// the header is ignored: the certificate is what was proven.
    fn from_peer(principal: Option<&str>, meta: Option<&[u8]>) -> WorkloadLabels {
        let mut labels = WorkloadLabels::unknown();
        let Some(principal) = principal else {
            return labels;
        };
        labels.principal = Arc::from(principal);
        let cert_ns = postern_certs::SpiffeId::parse(principal)
            .ok()
            .and_then(|id| id.namespace().map(str::to_string));
        if let Some(ns) = &cert_ns {
            labels.namespace = Arc::from(ns.as_str());
        }
        let Some(meta) = meta.and_then(|m| std::str::from_utf8(m).ok()) else {
            return labels;
        };
        let mut parsed = WorkloadLabels::unknown();
        for field in meta.split(';') {
            let Some((key, value)) = field.split_once('=') else {
                continue;
            };
            if !is_label_value(value) {
                continue;
            }
            let value: Arc<str> = Arc::from(value);
            match key {
                "w" => parsed.workload = value,
                "ns" => parsed.namespace = value,
                "app" => parsed.app = value,
                "v" => parsed.version = value,
                "svc" => parsed.canonical_service = value,
                "rev" => parsed.canonical_revision = value,
                "c" => parsed.cluster = value,
                _ => {}
            }
        }
        if cert_ns.as_deref() != Some(&*parsed.namespace) {
            return labels;
        }
        parsed.principal = labels.principal;
        parsed
    }
}

/// Kubernetes names and label values: short, and from a safe alphabet.
fn is_label_value(value: &str) -> bool {
    !value.is_empty()
        && value.len() <= 253
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// The destination service labels of a cluster.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ServiceLabels {
    /// `destination_service`: the host, e.g. `reviews.shop.svc.cluster.local`.
    pub service: Arc<str>,
    /// `destination_service_name`.
    pub name: Arc<str>,
    /// `destination_service_namespace`.
    pub namespace: Arc<str>,
}

impl ServiceLabels {
    /// Labels for a cluster name. Istio's names (`outbound|80||host`) give
    /// the host; a Kubernetes service host gives name and namespace.
    fn of_cluster(cluster: &str) -> ServiceLabels {
        let host = match cluster.split('|').collect::<Vec<_>>().as_slice() {
            [_, _, _, host] if !host.is_empty() => *host,
            _ => cluster,
        };
        let mut parts = host.split('.');
        let (name, namespace) = match (parts.next(), parts.next(), parts.next()) {
            (Some(name), Some(ns), Some("svc")) => (name, ns),
            _ => (host, "unknown"),
        };
        ServiceLabels {
            service: Arc::from(host),
            name: Arc::from(name),
            namespace: Arc::from(namespace),
        }
    }
}

/// Interned peers by SPIFFE ID, then by the metadata header they sent.
type PeersByPrincipal = FastMap<Box<str>, FastMap<Box<[u8]>, Arc<WorkloadLabels>>>;

/// Interned label sets, bounded.
#[derive(Debug)]
pub struct PeerInterner {
    max_peers: usize,
    peers: RwLock<PeersByPrincipal>,
    count: std::sync::atomic::AtomicUsize,
    other: Arc<WorkloadLabels>,
    unauthenticated: Arc<WorkloadLabels>,
    services: RwLock<FastMap<Arc<str>, Arc<ServiceLabels>>>,
    no_service: Arc<ServiceLabels>,
}

impl PeerInterner {
    /// Interns at most `max_peers` distinct peers.
    pub fn new(max_peers: usize) -> PeerInterner {
        let other: Arc<str> = Arc::from("other");
        PeerInterner {
            max_peers,
            peers: RwLock::new(FastMap::default()),
            count: std::sync::atomic::AtomicUsize::new(0),
            other: Arc::new(WorkloadLabels {
                workload: other.clone(),
                namespace: other.clone(),
                principal: other.clone(),
                app: other.clone(),
                version: other.clone(),
                canonical_service: other.clone(),
                canonical_revision: other.clone(),
                cluster: other,
            }),
            unauthenticated: Arc::new(WorkloadLabels::unknown()),
            services: RwLock::new(FastMap::default()),
            no_service: Arc::new(ServiceLabels {
                service: unknown(),
                name: unknown(),
                namespace: unknown(),
            }),
        }
    }

    /// The labels of a peer with this verified SPIFFE ID and metadata header.
    pub fn peer(&self, principal: Option<&str>, meta: Option<&[u8]>) -> Arc<WorkloadLabels> {
        let Some(principal) = principal else {
            return self.unauthenticated.clone();
        };
        let meta = meta.unwrap_or_default();
        let found = self
            .peers
            .read()
            .ok()
            .and_then(|peers| peers.get(principal).and_then(|m| m.get(meta)).cloned());
        if let Some(found) = found {
            return found;
        }
        let Ok(mut peers) = self.peers.write() else {
            return self.other.clone();
        };
        if let Some(found) = peers.get(principal).and_then(|m| m.get(meta)) {
            return found.clone();
        }
        if self.count.load(std::sync::atomic::Ordering::Relaxed) >= self.max_peers {
            metrics::counter!(LABEL_OVERFLOW_TOTAL).increment(1);
            return self.other.clone();
        }
        self.count
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let labels = Arc::new(WorkloadLabels::from_peer(
            Some(principal),
            (!meta.is_empty()).then_some(meta),
        ));
        peers
            .entry(Box::from(principal))
            .or_default()
            .insert(Box::from(meta), labels.clone());
        labels
    }

    /// The service labels of a cluster (cluster names come from config, so
    /// they are bounded by it); all `unknown` when no cluster was chosen.
    pub fn service(&self, cluster: Option<&Arc<str>>) -> Arc<ServiceLabels> {
        let Some(cluster) = cluster else {
            return self.no_service.clone();
        };
        if let Some(found) = self
            .services
            .read()
            .ok()
            .and_then(|m| m.get(cluster).cloned())
        {
            return found;
        }
        let labels = Arc::new(ServiceLabels::of_cluster(cluster));
        if let Ok(mut map) = self.services.write() {
            map.entry(cluster.clone()).or_insert_with(|| labels.clone());
        }
        labels
    }
}

/// What identifies one Istio series, by the addresses of interned labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct SeriesKey {
    source: usize,
    destination: usize,
    service: usize,
    protocol: &'static str,
    code: u16,
    grpc: Option<u16>,
    flags: ResponseFlags,
    mtls: bool,
}

/// The handles of one HTTP series.
#[derive(Debug, Clone)]
struct HttpSeries {
    requests: Counter,
    duration: Arc<Histogram>,
    request_bytes: Arc<Histogram>,
    response_bytes: Arc<Histogram>,
}

/// The handles of one TCP series.
#[derive(Debug, Clone)]
pub struct TcpSeries {
    /// Connections opened.
    pub opened: Counter,
    /// Connections closed.
    pub closed: Counter,
    /// Bytes to the downstream.
    pub sent: Counter,
    /// Bytes from the downstream.
    pub received: Counter,
}

/// The labels of one call, as interned sets.
#[derive(Debug, Clone)]
pub struct CallLabels {
    /// Who called.
    pub source: Arc<WorkloadLabels>,
    /// Who was called.
    pub destination: Arc<WorkloadLabels>,
    /// Which service was called.
    pub service: Arc<ServiceLabels>,
    /// `http`, `grpc` or `tcp`.
    pub protocol: &'static str,
    /// Downstream (inbound) or upstream (outbound) connection is mTLS.
    pub mtls: bool,
}

/// How an HTTP call ended, as the Istio metrics count it.
#[derive(Debug, Clone, Copy)]
pub struct HttpOutcome {
    /// Response status (0: none sent).
    pub code: u16,
    /// gRPC status.
    pub grpc: Option<u16>,
    /// Response flags.
    pub flags: ResponseFlags,
    /// Duration in milliseconds.
    pub millis: f64,
    /// Request body bytes.
    pub request_bytes: u64,
    /// Response body bytes.
    pub response_bytes: u64,
}

/// Istio metric handles, registered on first use of a series. The series
/// map holds the interned labels alive, so their addresses stay unique.
#[derive(Debug)]
pub struct IstioMetrics {
    direction: TrafficDirection,
    http: RwLock<FastMap<SeriesKey, (HttpSeries, CallLabels)>>,
    tcp: RwLock<FastMap<SeriesKey, (TcpSeries, CallLabels)>>,
}

fn address<T>(value: &Arc<T>) -> usize {
    Arc::as_ptr(value) as *const u8 as usize
}

fn code_label(code: u16) -> &'static str {
    super::status_label(code)
}

fn grpc_label(grpc: Option<u16>) -> &'static str {
    match grpc {
        Some(code) => super::status_label(code),
        None => "",
    }
}

impl IstioMetrics {
    /// Handles for the calls of listeners facing `direction`.
    pub fn new(direction: TrafficDirection) -> IstioMetrics {
        IstioMetrics {
            direction,
            http: RwLock::new(FastMap::default()),
            tcp: RwLock::new(FastMap::default()),
        }
    }

    fn key(labels: &CallLabels, code: u16, grpc: Option<u16>, flags: ResponseFlags) -> SeriesKey {
        SeriesKey {
            source: address(&labels.source),
            destination: address(&labels.destination),
            service: address(&labels.service),
            protocol: labels.protocol,
            code,
            grpc,
            flags,
            mtls: labels.mtls,
        }
    }

    fn label_set(
        &self,
        labels: &CallLabels,
        code: Option<u16>,
        grpc: Option<u16>,
        flags: ResponseFlags,
    ) -> Vec<metrics::Label> {
        use metrics::Label;
        let s = &labels.source;
        let d = &labels.destination;
        let svc = &labels.service;
        let text = |v: &Arc<str>| metrics::SharedString::from(v.clone());
        let mut set = vec![
            Label::new("reporter", self.direction.reporter()),
            Label::new("source_workload", text(&s.workload)),
            Label::new("source_canonical_service", text(&s.canonical_service)),
            Label::new("source_canonical_revision", text(&s.canonical_revision)),
            Label::new("source_workload_namespace", text(&s.namespace)),
            Label::new("source_principal", text(&s.principal)),
            Label::new("source_app", text(&s.app)),
            Label::new("source_version", text(&s.version)),
            Label::new("source_cluster", text(&s.cluster)),
            Label::new("destination_workload", text(&d.workload)),
            Label::new("destination_workload_namespace", text(&d.namespace)),
            Label::new("destination_principal", text(&d.principal)),
            Label::new("destination_app", text(&d.app)),
            Label::new("destination_version", text(&d.version)),
            Label::new("destination_service", text(&svc.service)),
            Label::new("destination_canonical_service", text(&d.canonical_service)),
            Label::new(
                "destination_canonical_revision",
                text(&d.canonical_revision),
            ),
            Label::new("destination_service_name", text(&svc.name)),
            Label::new("destination_service_namespace", text(&svc.namespace)),
            Label::new("destination_cluster", text(&d.cluster)),
            Label::new("request_protocol", labels.protocol),
        ];
        if let Some(code) = code {
            set.push(Label::new("response_code", code_label(code)));
            set.push(Label::new("grpc_response_status", grpc_label(grpc)));
        }
        set.push(Label::new("response_flags", flags.as_str()));
        set.push(Label::new(
            "connection_security_policy",
            if labels.mtls { "mutual_tls" } else { "none" },
        ));
        set
    }

    /// Records one finished HTTP call.
    pub fn record_http(&self, labels: &CallLabels, call: &HttpOutcome) {
        let HttpOutcome {
            code,
            grpc,
            flags,
            millis,
            request_bytes,
            response_bytes,
        } = *call;
        let key = Self::key(labels, code, grpc, flags);
        let record = |series: &HttpSeries| {
            series.requests.increment(1);
            series.duration.record(millis);
            series.request_bytes.record(request_bytes as f64);
            series.response_bytes.record(response_bytes as f64);
        };
        // Recorded under the read lock: a copy of the four handles to take
        // out of it, and its drop, cost eight atomic updates per call.
        let recorded = self
            .http
            .read()
            .ok()
            .is_some_and(|map| map.get(&key).map(|(series, _)| record(series)).is_some());
        if recorded {
            return;
        }
        let set = self.label_set(labels, Some(code), grpc, flags);
        let series = HttpSeries {
            requests: metrics::counter!(REQUESTS_TOTAL, set.iter()),
            duration: REQUEST_DURATION_FAMILY.series(set.clone()),
            request_bytes: REQUEST_BYTES_FAMILY.series(set.clone()),
            response_bytes: RESPONSE_BYTES_FAMILY.series(set),
        };
        record(&series);
        if let Ok(mut map) = self.http.write() {
            map.insert(key, (series, labels.clone()));
        }
    }

    /// The TCP handles for a connection's labels and flags.
    pub fn tcp(&self, labels: &CallLabels, flags: ResponseFlags) -> TcpSeries {
        let key = Self::key(labels, 0, None, flags);
        if let Some(found) = self
            .tcp
            .read()
            .ok()
            .and_then(|m| m.get(&key).map(|(s, _)| s.clone()))
        {
            return found;
        }
        let set = self.label_set(labels, None, None, flags);
        let series = TcpSeries {
            opened: metrics::counter!(TCP_CONNECTIONS_OPENED_TOTAL, set.iter()),
            closed: metrics::counter!(TCP_CONNECTIONS_CLOSED_TOTAL, set.iter()),
            sent: metrics::counter!(TCP_SENT_BYTES_TOTAL, set.iter()),
            received: metrics::counter!(TCP_RECEIVED_BYTES_TOTAL, set.iter()),
        };
        if let Ok(mut map) = self.tcp.write() {
            map.insert(key, (series.clone(), labels.clone()));
        }
        series
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn service_labels_from_istio_and_kubernetes_names() {
        let s = ServiceLabels::of_cluster("outbound|9080||reviews.shop.svc.cluster.local");
        assert_eq!(&*s.service, "reviews.shop.svc.cluster.local");
        assert_eq!(&*s.name, "reviews");
        assert_eq!(&*s.namespace, "shop");
        let s = ServiceLabels::of_cluster("backend");
        assert_eq!(
            (&*s.service, &*s.name, &*s.namespace),
            ("backend", "backend", "unknown")
        );
    }

    #[test]
    fn peer_metadata_counts_only_when_the_certificate_agrees() {
        let id = "spiffe://mesh.local/ns/shop/sa/web";
        let agreed = WorkloadLabels::from_peer(Some(id), Some(b"w=web;ns=shop;app=web;v=v2"));
        assert_eq!(&*agreed.workload, "web");
        assert_eq!(&*agreed.version, "v2");
        assert_eq!(&*agreed.principal, id);
        let lying = WorkloadLabels::from_peer(Some(id), Some(b"w=admin;ns=kube-system"));
        assert_eq!(&*lying.workload, "unknown");
        assert_eq!(&*lying.namespace, "shop");
        let bad = WorkloadLabels::from_peer(Some(id), Some(b"w=a b;ns=shop"));
        assert_eq!(&*bad.workload, "unknown");
        let anonymous = WorkloadLabels::from_peer(None, Some(b"w=web;ns=shop"));
        assert_eq!(&*anonymous.principal, "unknown");
    }

    #[test]
    fn header_round_trips() {
        let mut labels = WorkloadLabels::unknown();
        labels.workload = Arc::from("web");
        labels.namespace = Arc::from("shop");
        let header = labels.header_value().unwrap();
        let back = WorkloadLabels::from_peer(
            Some("spiffe://mesh.local/ns/shop/sa/web"),
            Some(header.as_bytes()),
        );
        assert_eq!(&*back.workload, "web");
    }

    #[test]
    fn interner_is_bounded_and_stable() {
        let interner = PeerInterner::new(3);
        let a = interner.peer(Some("spiffe://t/ns/a/sa/a"), None);
        let again = interner.peer(Some("spiffe://t/ns/a/sa/a"), None);
        assert!(Arc::ptr_eq(&a, &again));
        for i in 0..10 {
            interner.peer(Some(&format!("spiffe://t/ns/n{i}/sa/x")), None);
        }
        let late = interner.peer(Some("spiffe://t/ns/late/sa/x"), None);
        assert_eq!(&*late.principal, "other");
        let first = interner.peer(Some("spiffe://t/ns/a/sa/a"), None);
        assert!(Arc::ptr_eq(&a, &first));
    }
}

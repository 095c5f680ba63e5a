//! The per-call record: filled in as a call goes, written to every sink
//! (Postern and Istio metrics, access log, access-log stream) when it ends.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant, SystemTime};

use http::{HeaderValue, Method, Version};

use super::access_log::{AccessLog, HeaderCapture, LogPolicyFile};
use super::als::AlsSink;
use super::istio::{CallLabels, IstioMetrics, PeerInterner};
use super::log::{CallKind, CallLog, TrafficDirection, WorkloadLabels};
use super::trace::{span_name, CallSpan, SpanKind, TraceContext, Tracer};
use super::{CallMetrics, ResponseFlag, ResponseFlags};
use crate::http::headers::DownstreamPeer;

/// Process-wide telemetry: who this workload is, the peer label bound, and
/// the sinks calls are written to.
#[derive(Debug)]
pub struct TelemetryHub {
    /// This workload's labels.
    pub local: Arc<WorkloadLabels>,
    /// This workload's labels as the metadata header peers read.
    pub local_header: Option<HeaderValue>,
    /// Interned peer labels, bounded.
    pub peers: PeerInterner,
    /// The access log, when configured.
    pub access_log: Option<Arc<AccessLog>>,
    /// The access-log stream to a collector, when configured.
    pub als: Option<AlsSink>,
    /// The span exporter, when configured.
    pub tracer: Option<Tracer>,
    /// Request headers the log sinks keep.
    pub capture: HeaderCapture,
    /// Count calls in Istio's metrics too.
    pub istio_metrics: bool,
    /// How this proxy names itself to collectors.
    pub node: postern_xds::Node,
}

fn hub_node(hub: &TelemetryHub) -> postern_xds::Node {
    hub.node.clone()
}

/// Telemetry that could not be started.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryStartError {
    /// The access-log file cannot be opened.
    #[error("cannot open the access log")]
    AccessLog(#[source] std::io::Error),
    /// The span exporter cannot be built.
    #[error("cannot start tracing")]
    Tracing(#[source] super::trace::TraceError),
}

/// Default bound on distinct peers in metric labels.
pub const DEFAULT_MAX_PEERS: usize = 256;

impl TelemetryHub {
    /// A hub with the given local labels and sinks.
    pub fn new(
        local: WorkloadLabels,
        max_peers: usize,
        access_log: Option<Arc<AccessLog>>,
    ) -> TelemetryHub {
        let local_header = local.header_value();
        TelemetryHub {
            local: Arc::new(local),
            local_header,
            peers: PeerInterner::new(max_peers),
            access_log,
            als: None,
            tracer: None,
            capture: HeaderCapture::default(),
            istio_metrics: true,
            node: postern_xds::Node::default(),
        }
    }

    /// The hub a config describes; `identity` is this workload's SPIFFE ID
    /// and `node` how it names itself to a collector. Starts the sinks'
    /// background tasks, so it runs inside the tokio runtime.
    pub fn from_config(
        file: &crate::config::file::TelemetryFile,
        identity: Option<&postern_certs::SpiffeId>,
        node: postern_xds::Node,
    ) -> Result<Arc<TelemetryHub>, TelemetryStartError> {
        let w = &file.workload;
        let text = |v: &Option<String>| v.as_deref().map(Arc::<str>::from);
        let mut local = WorkloadLabels::unknown();
        if let Some(name) = text(&w.name) {
            local.workload = name;
        }
        if let Some(ns) = text(&w.namespace).or_else(|| identity?.namespace().map(Arc::from)) {
            local.namespace = ns;
        }
        if let Some(id) = identity {
            local.principal = Arc::from(id.as_str());
        }
        if let Some(app) = text(&w.app) {
            local.app = app;
        }
        if let Some(version) = text(&w.version) {
            local.version = version;
        }
        if let Some(service) = text(&w.canonical_service)
            .or_else(|| text(&w.app))
            .or_else(|| text(&w.name))
        {
            local.canonical_service = service;
        }
        if let Some(revision) = text(&w.canonical_revision).or_else(|| text(&w.version)) {
            local.canonical_revision = revision;
        }
        if let Some(cluster) = text(&w.cluster) {
            local.cluster = cluster;
        }
        let access_log = file
            .access_log
            .as_ref()
            .map(AccessLog::start)
            .transpose()
            .map_err(TelemetryStartError::AccessLog)?;
        let mut hub = TelemetryHub::new(local, file.max_peers, access_log);
        hub.istio_metrics = file.istio_metrics;
        hub.tracer = file
            .tracing
            .as_ref()
            .map(Tracer::new)
            .transpose()
            .map_err(TelemetryStartError::Tracing)?;
        hub.als = file
            .access_log_service
            .as_ref()
            .map(|als| AlsSink::start(als.clone(), node.clone()));
        hub.node = node;
        let no_strings = Vec::new();
        let (logged, redacted) = file
            .access_log
            .as_ref()
            .map_or((&no_strings, &no_strings), |a| {
                (&a.request_headers, &a.redact_headers)
            });
        let streamed = file
            .access_log_service
            .as_ref()
            .map_or(&no_strings, |a| &a.request_headers);
        hub.capture = HeaderCapture::new(logged.iter().chain(streamed), redacted);
        Ok(Arc::new(hub))
    }

    /// Metrics only: unknown local labels, no log sinks.
    pub fn metrics_only() -> Arc<TelemetryHub> {
        Arc::new(TelemetryHub::new(
            WorkloadLabels::unknown(),
            DEFAULT_MAX_PEERS,
            None,
        ))
    }

    /// Whether any sink reads more than the metric labels.
    fn wants_details(&self) -> bool {
        self.access_log.is_some() || self.als.is_some()
    }

    /// Whether any sink of `listener` reads more than the metric labels.
    fn listener_wants_details(&self, listener: &ListenerTelemetry) -> bool {
        self.wants_details() || listener.als.is_some()
    }
}

/// What one listener's calls are recorded with.
#[derive(Debug)]
pub struct ListenerTelemetry {
    /// Process-wide settings and sinks.
    pub hub: Arc<TelemetryHub>,
    /// The listener's name.
    pub listener: Arc<str>,
    /// Which side of the workload the listener faces.
    pub direction: TrafficDirection,
    /// Head-sampling ratio of new traces.
    pub trace_sampling: f64,
    /// The listener's own access-log stream, else the hub's.
    als: Option<AlsSink>,
    /// `postern_http_*` handles.
    pub postern: Arc<CallMetrics>,
    /// `istio_*` handles.
    pub istio: IstioMetrics,
}

impl ListenerTelemetry {
    /// Telemetry for a listener.
    pub fn new(
        hub: Arc<TelemetryHub>,
        listener: &crate::config::Listener,
    ) -> Arc<ListenerTelemetry> {
        Arc::new(ListenerTelemetry {
            postern: CallMetrics::new(listener.name.clone()),
            istio: IstioMetrics::new(listener.direction),
            hub: hub.clone(),
            listener: listener.name.clone(),
            direction: listener.direction,
            trace_sampling: listener.trace_sampling,
            als: listener
                .als
                .clone()
                .map(|config| AlsSink::start(config, hub_node(&hub))),
        })
    }

    /// Where this listener's calls are streamed, if anywhere.
    pub fn als(&self) -> Option<&AlsSink> {
        self.als.as_ref().or(self.hub.als.as_ref())
    }

    /// The labels of a call between `downstream` and an upstream with
    /// `upstream` principal and metadata, to the service of `cluster`.
    pub fn labels(
        &self,
        downstream: &DownstreamPeer,
        source_meta: Option<&[u8]>,
        upstream_principal: Option<&str>,
        destination_meta: Option<&[u8]>,
        cluster: Option<&Arc<str>>,
        protocol: &'static str,
    ) -> CallLabels {
        let hub = &self.hub;
        let (source, destination, mtls) = match self.direction {
            TrafficDirection::Inbound => (
                hub.peers.peer(
                    downstream.spiffe_id.as_deref().map(|id| id.as_str()),
                    source_meta,
                ),
                hub.local.clone(),
                downstream.spiffe_id.is_some(),
            ),
            TrafficDirection::Outbound => (
                hub.local.clone(),
                hub.peers.peer(upstream_principal, destination_meta),
                upstream_principal.is_some(),
            ),
        };
        CallLabels {
            source,
            destination,
            service: hub.peers.service(cluster),
            protocol,
            mtls,
        }
    }
}

/// Request facts only the log sinks read; gathered only when one is on.
#[derive(Debug, Default)]
struct Details {
    method: Option<Method>,
    authority: Option<HeaderValue>,
    path: Option<http::uri::PathAndQuery>,
    user_agent: Option<HeaderValue>,
    request_id: Option<HeaderValue>,
    request_headers: Vec<(http::HeaderName, HeaderValue)>,
}

/// Kept request headers found by the one walk over a request's headers;
/// more are looked up by name.
const MAX_SCANNED_CAPTURES: usize = 8;

fn none() -> Arc<str> {
    static NONE: LazyLock<Arc<str>> = LazyLock::new(|| Arc::from("none"));
    NONE.clone()
}

/// One HTTP call, recorded when its response ends (or is dropped).
#[derive(Debug)]
pub struct CallRecord {
    telemetry: Arc<ListenerTelemetry>,
    peer: Arc<DownstreamPeer>,
    start: Instant,
    start_time: SystemTime,
    protocol: &'static str,
    grpc: bool,
    route: Arc<str>,
    routed: bool,
    log_policy: Option<LogPolicyFile>,
    cluster: Arc<str>,
    clustered: bool,
    status: u16,
    grpc_status: Option<u16>,
    flags: ResponseFlags,
    request_bytes: Option<Arc<AtomicU64>>,
    response_bytes: u64,
    upstream_ttfb: Option<Duration>,
    upstream_host: Option<SocketAddr>,
    upstream_principal: Option<Arc<str>>,
    source_meta: Option<HeaderValue>,
    destination_meta: Option<HeaderValue>,
    details: Option<Box<Details>>,
    span: Option<CallSpan>,
    finished: bool,
}

fn principal_known(principal: &Option<Arc<str>>) -> bool {
    principal.is_some()
}

fn protocol_name(version: Version) -> &'static str {
    match version {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_2 => "HTTP/2",
        Version::HTTP_3 => "HTTP/3",
        _ => "HTTP/1.1",
    }
}

impl CallRecord {
    /// Starts the record of a request from `peer`.
    pub fn new<B>(
        start: Instant,
        telemetry: &Arc<ListenerTelemetry>,
        peer: &Arc<DownstreamPeer>,
        request: &http::Request<B>,
        grpc: bool,
    ) -> Self {
        let mut record = CallRecord {
            telemetry: telemetry.clone(),
            peer: peer.clone(),
            start,
            start_time: SystemTime::now(),
            protocol: protocol_name(request.version()),
            grpc,
            route: none(),
            routed: false,
            log_policy: None,
            cluster: none(),
            clustered: false,
            status: 0,
            grpc_status: None,
            flags: ResponseFlags::default(),
            request_bytes: None,
            response_bytes: 0,
            upstream_ttfb: None,
            upstream_host: None,
            upstream_principal: None,
            source_meta: None,
            destination_meta: None,
            details: None,
            span: None,
            finished: false,
        };
        // The request is noted (`note_request`) by the caller once its head
        // is settled (path normalised, forwarding headers set), or before
        // it is answered early: once per call, as it costs a walk over
        // the headers.
        if telemetry.hub.listener_wants_details(telemetry) {
            record.details = Some(Box::default());
        }
        if let Some(tracer) = &telemetry.hub.tracer {
            let parent = TraceContext::extract(request.headers());
            let kind = match telemetry.direction {
                TrafficDirection::Inbound => SpanKind::Server,
                TrafficDirection::Outbound => SpanKind::Client,
            };
            let mut span = tracer.start_span(
                parent.as_ref(),
                telemetry.trace_sampling,
                kind,
                span_name(request.method()),
            );
            if span.is_sampled() {
                span.record_request(request);
                span.set_url_scheme(if peer.tls { "https" } else { "http" });
                span.set_client_address(peer.addr);
                span.set_peer_address(peer.remote);
                if let Some(id) = &peer.spiffe_id {
                    span.set_peer_principal(id.as_str());
                }
            }
            record.span = Some(span);
        }
        record
    }

    /// Writes the call's trace context into the upstream request's headers
    /// (when tracing is on; otherwise the caller's headers pass as they are).
    pub fn inject_trace(&self, headers: &mut http::HeaderMap) {
        if let Some(span) = &self.span {
            span.inject(headers);
        }
    }

    /// When the call started.
    pub fn start(&self) -> Instant {
        self.start
    }

    /// The wall-clock time the call began.
    pub fn start_time(&self) -> SystemTime {
        self.start_time
    }

    /// Takes the request facts the log sinks read, once per call: when the
    /// head is settled, or before an early answer.
    pub fn note_request<B>(&mut self, request: &http::Request<B>) {
        let Some(details) = self.details.as_mut() else {
            return;
        };
        let headers = request.headers();
        let uri = request.uri();
        details.method = Some(request.method().clone());
        // A shared copy: only a written line needs the text.
        details.path = uri.path_and_query().cloned();
        // One walk over the headers finds every one wanted: a lookup by
        // name hashes the name and probes the map, for three to four names.
        let capture = &self.telemetry.hub.capture;
        let scan_captured = capture.len() <= MAX_SCANNED_CAPTURES;
        let mut captured: [Option<&HeaderValue>; MAX_SCANNED_CAPTURES] =
            [None; MAX_SCANNED_CAPTURES];
        let (mut host, mut user_agent, mut request_id) = (None, None, None);
        for (name, value) in headers {
            if *name == http::header::HOST {
                host.get_or_insert(value);
            } else if *name == http::header::USER_AGENT {
                user_agent.get_or_insert(value);
            } else if *name == crate::http::headers::X_REQUEST_ID {
                request_id.get_or_insert(value);
            }
            if scan_captured {
                if let Some(at) = capture.position(name) {
                    captured[at].get_or_insert(value);
                }
            }
        }
        details.authority = uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
            .or_else(|| host.cloned());
        details.user_agent = user_agent.cloned();
        details.request_id = request_id.cloned();
        if !capture.is_empty() {
            details.request_headers = if scan_captured {
                capture.kept(&captured)
            } else {
                capture.capture(headers)
            };
        }
    }

    /// The caller's workload metadata header (inbound, taken off the request).
    pub fn set_source_meta(&mut self, meta: Option<HeaderValue>) {
        self.source_meta = meta;
    }

    /// The callee's workload metadata header (outbound, taken off the response).
    pub fn set_destination_meta(&mut self, meta: Option<HeaderValue>) {
        self.destination_meta = meta;
    }

    /// Sets the matched route and its access-log policy.
    pub fn set_route(&mut self, route: &Arc<str>, log_policy: Option<LogPolicyFile>) {
        self.route = route.clone();
        self.routed = true;
        self.log_policy = log_policy;
    }

    /// Sets the chosen cluster.
    pub fn set_cluster(&mut self, cluster: &Arc<str>) {
        self.cluster = cluster.clone();
        self.clustered = true;
    }

    /// Sets the response status.
    pub fn set_status(&mut self, status: u16) {
        self.status = status;
    }

    /// Sets the gRPC status (from headers or trailers).
    pub fn set_grpc_status(&mut self, headers: &http::HeaderMap) {
        if let Some(code) = headers
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u16>().ok())
        {
            self.grpc_status = Some(code);
        }
    }

    /// Sets the gRPC status of a local reply.
    pub fn set_local_grpc_status(&mut self, code: u16) {
        self.grpc_status = Some(code);
    }

    /// Adds a response flag.
    pub fn set_flag(&mut self, flag: ResponseFlag) {
        self.flags.insert(flag);
    }

    /// The upstream endpoint tried: its address, the identity it proved and
    /// the workload metadata it last sent.
    pub fn set_upstream(
        &mut self,
        address: SocketAddr,
        principal: Option<Arc<str>>,
        meta: Option<HeaderValue>,
    ) {
        self.upstream_host = Some(address);
        self.upstream_principal = principal;
        if principal_known(&self.upstream_principal) {
            self.destination_meta = meta;
        }
    }

    /// The upstream's response headers arrived now.
    pub fn upstream_responded(&mut self) {
        self.upstream_ttfb = Some(self.start.elapsed());
    }

    /// A counter the request body adds its bytes to.
    pub fn request_counter(&mut self) -> Arc<AtomicU64> {
        self.request_bytes
            .get_or_insert_with(|| Arc::new(AtomicU64::new(0)))
            .clone()
    }

    /// Counts response body bytes sent.
    pub fn add_sent(&mut self, bytes: usize) {
        self.response_bytes += bytes as u64;
    }

    /// The upstream failed while streaming the body.
    pub fn upstream_reset(&mut self) {
        self.set_flag(ResponseFlag::UpstreamReset);
    }

    /// The downstream stopped reading before the body ended.
    pub fn downstream_incomplete(&mut self) {
        self.set_flag(ResponseFlag::DownstreamClosed);
    }

    /// Writes the record to every sink; later calls do nothing.
    pub fn finish(&mut self) {
        if self.finished {
            return;
        }
        self.finished = true;
        if self.status == 0 && self.flags.is_empty() {
            // Dropped before any answer: the downstream went away.
            self.flags.insert(ResponseFlag::DownstreamClosed);
        }
        let duration = self.start.elapsed();
        let telemetry = &self.telemetry;
        telemetry.postern.record(
            &self.route,
            &self.cluster,
            self.status,
            self.flags,
            duration.as_secs_f64(),
        );
        let request_bytes = self
            .request_bytes
            .as_ref()
            .map_or(0, |c| c.load(Ordering::Relaxed));
        if telemetry.hub.istio_metrics {
            let labels = telemetry.labels(
                &self.peer,
                self.source_meta.as_ref().map(HeaderValue::as_bytes),
                self.upstream_principal.as_deref(),
                self.destination_meta.as_ref().map(HeaderValue::as_bytes),
                self.clustered.then_some(&self.cluster),
                if self.grpc { "grpc" } else { "http" },
            );
            telemetry.istio.record_http(
                &labels,
                &super::istio::HttpOutcome {
                    code: self.status,
                    grpc: self.grpc_status,
                    flags: self.flags,
                    millis: duration.as_secs_f64() * 1000.0,
                    request_bytes,
                    response_bytes: self.response_bytes,
                },
            );
        }
        let trace_id = self.span.take().map(|mut span| {
            let trace_id = span.trace_id();
            if span.is_sampled() {
                if self.status != 0 {
                    span.set_status_code(self.status);
                }
                for flag in self.flags.iter() {
                    span.set_response_flag(flag);
                }
                if self.routed {
                    span.set_route(&self.route);
                }
                if self.clustered {
                    span.set_cluster(&self.cluster);
                }
                if let Some(address) = self.upstream_host {
                    span.set_upstream_address(address);
                }
            }
            span.end();
            trace_id
        });
        let hub = &telemetry.hub;
        let log_admitted = hub.access_log.as_ref().filter(|log| {
            let policy = self.log_policy.unwrap_or(log.policy);
            policy.admits_call(self.status, self.flags)
        });
        let als = telemetry.als();
        if log_admitted.is_none() && als.is_none() {
            return;
        }
        let details = self.details.take().unwrap_or_default();
        let call = CallLog {
            kind: CallKind::Http,
            direction: telemetry.direction,
            start_time: self.start_time,
            duration,
            listener: telemetry.listener.clone(),
            protocol: self.protocol,
            method: details.method,
            authority: details.authority,
            path: details.path,
            user_agent: details.user_agent,
            request_id: details.request_id,
            trace_id,
            status: self.status,
            grpc_status: self.grpc_status,
            flags: self.flags,
            bytes_received: request_bytes,
            bytes_sent: self.response_bytes,
            upstream_ttfb: self.upstream_ttfb,
            upstream_host: self.upstream_host,
            cluster: self.clustered.then(|| self.cluster.clone()),
            route: self.routed.then(|| self.route.clone()),
            downstream_addr: self.peer.remote,
            downstream_principal: self
                .peer
                .spiffe_id
                .as_ref()
                .map(|id| Arc::from(id.as_str())),
            upstream_principal: self.upstream_principal.clone(),
            mtls: self.peer.spiffe_id.is_some(),
            request_headers: details.request_headers,
        };
        if let Some(log) = log_admitted {
            log.write(&call);
        }
        if let Some(als) = als {
            als.send(&call);
        }
    }
}

impl Drop for CallRecord {
    fn drop(&mut self) {
        self.finish();
    }
}

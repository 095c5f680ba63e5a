//! Distributed tracing: trace context propagation (W3C Trace Context, B3
//! single and multi header), one span per call with OpenTelemetry's HTTP
//! semantic-convention attributes, and batched export over OTLP/gRPC.
//!
//! The proxy decides ids and sampling itself; this module knows nothing of
//! listeners, routes or the proxy path. The caller extracts a
//! [`TraceContext`] from the request, starts a [`CallSpan`] on the process's
//! [`Tracer`], injects it into the upstream request, sets attributes, and
//! ends it. Ending never waits: spans go to a bounded queue that a
//! background task exports, and a full queue drops spans and counts them.
//!
//! Like Envoy, each proxy makes one span per call: `Server` kind on inbound
//! listeners and `Client` kind on outbound ones. The span is the upstream
//! request's parent, so two sidecars chain as caller → outbound span →
//! inbound span → callee.

mod context;
mod export;
#[cfg(test)]
mod tests;

use std::borrow::Cow;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use http::{HeaderMap, HeaderValue, Method, Version};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use super::metrics as names;
use super::ResponseFlag;
pub(crate) use context::hex32;
pub use context::{Formats, Sampling, TraceContext, MAX_TRACESTATE_LEN};

/// Describes the tracing metrics to the installed recorder.
pub fn describe() {
    ::metrics::describe_counter!(
        names::TRACING_SPANS_EXPORTED_TOTAL,
        "Trace spans accepted by the OTLP collector"
    );
    ::metrics::describe_counter!(
        names::TRACING_SPANS_DROPPED_TOTAL,
        "Trace spans lost, by reason (queue_full, export_failed, shutdown)"
    );
}

/// Where and how to export spans. Sampling is per listener and not here.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TracingConfig {
    /// The OTLP/gRPC collector, `http://host:port`.
    pub collector: String,
    /// `service.name` of the exported resource; default `postern`.
    #[serde(default = "default_service_name")]
    pub service_name: String,
    /// Finished spans buffered for export; more are dropped. Default 2048.
    #[serde(default = "default_max_queue")]
    pub max_queue: usize,
    /// Spans per export request. Default 512.
    #[serde(default = "default_max_batch")]
    pub max_batch: usize,
    /// How often a partial batch is exported. Default 1s.
    #[serde(default = "default_export_interval", with = "humantime_serde")]
    pub export_interval: Duration,
    /// How long one export, retries included, may take before its spans are
    /// dropped. Default 5s: shorter than OTLP's 10s, so a stalled collector
    /// holds the queue for less time.
    #[serde(default = "default_export_timeout", with = "humantime_serde")]
    pub export_timeout: Duration,
}

fn default_service_name() -> String {
    "postern".to_string()
}
fn default_max_queue() -> usize {
    2048
}
fn default_max_batch() -> usize {
    512
}
fn default_export_interval() -> Duration {
    Duration::from_secs(1)
}
fn default_export_timeout() -> Duration {
    Duration::from_secs(5)
}

impl TracingConfig {
    /// Defaults for everything but the collector.
    pub fn new(collector: impl Into<String>) -> Self {
        TracingConfig {
            collector: collector.into(),
            service_name: default_service_name(),
            max_queue: default_max_queue(),
            max_batch: default_max_batch(),
            export_interval: default_export_interval(),
            export_timeout: default_export_timeout(),
        }
    }

    /// Checks the values; [`Tracer::new`] calls this too.
    ///
    /// # Errors
    ///
    /// When the collector is not `http://host:port`, a size or duration is
    /// zero, or the service name is empty.
    pub fn validate(&self) -> Result<(), TraceError> {
        let invalid = || TraceError::Collector {
            endpoint: self.collector.clone(),
        };
        let uri: http::Uri = self.collector.parse().map_err(|_| invalid())?;
        // https would need a TLS provider in the exporter, which we do not
        // build in; a local collector agent is the usual setup.
        let plain_http = uri.scheme() == Some(&http::uri::Scheme::HTTP);
        let host_and_port = uri
            .authority()
            .is_some_and(|a| !a.host().is_empty() && a.port_u16().is_some());
        let no_path = matches!(uri.path(), "" | "/") && uri.query().is_none();
        if !(plain_http && host_and_port && no_path) {
            return Err(invalid());
        }
        let zero = [
            ("max_queue", self.max_queue == 0),
            ("max_batch", self.max_batch == 0),
            ("export_interval", self.export_interval.is_zero()),
            ("export_timeout", self.export_timeout.is_zero()),
        ];
        if let Some((field, _)) = zero.into_iter().find(|(_, zero)| *zero) {
            return Err(TraceError::Zero { field });
        }
        if self.service_name.is_empty() {
            return Err(TraceError::EmptyServiceName);
        }
        Ok(())
    }
}

/// Why a [`Tracer`] could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    /// The collector address is not usable.
    #[error("tracing collector {endpoint:?} must be an http://host:port URL")]
    Collector {
        /// The configured value.
        endpoint: String,
    },
    /// A size or duration that must be positive is zero.
    #[error("tracing {field} must be greater than zero")]
    Zero {
        /// The field.
        field: &'static str,
    },
    /// The service name is empty.
    #[error("tracing service_name must not be empty")]
    EmptyServiceName,
    /// Not called inside a tokio runtime, which runs the exporter.
    #[error("the tracer must be built inside a tokio runtime")]
    NoRuntime(#[source] tokio::runtime::TryCurrentError),
    /// The OTLP exporter refused its settings.
    #[error("cannot build the otlp exporter for {endpoint}")]
    Exporter {
        /// The collector.
        endpoint: String,
        /// The exporter's error.
        #[source]
        source: opentelemetry_otlp::ExporterBuildError,
    },
}

/// Which side of a call the span stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpanKind {
    /// An inbound listener: the proxy serves a call for its workload.
    Server,
    /// An outbound listener: the proxy makes a call for its workload.
    Client,
}

/// The span name OpenTelemetry's HTTP conventions give a call with this
/// method when no route template is known: the method, or `HTTP` for
/// methods outside the standard set.
pub fn span_name(method: &Method) -> &'static str {
    known_method(method).unwrap_or("HTTP")
}

/// The methods the HTTP conventions name; others are recorded as `_OTHER`.
fn known_method(method: &Method) -> Option<&'static str> {
    Some(match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::PATCH => "PATCH",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => return None,
    })
}

/// Starts spans and exports them. One per process; clones share the queue.
#[derive(Debug, Clone)]
pub struct Tracer {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    queue: mpsc::Sender<export::Message>,
    dropped_queue_full: ::metrics::Counter,
}

impl Tracer {
    /// Validates `config` and starts the export task on the current tokio
    /// runtime. Nothing connects yet: the exporter connects on first export
    /// and reconnects by itself, so a collector that is down costs only the
    /// spans that cannot be sent.
    ///
    /// # Errors
    ///
    /// An invalid config, no current tokio runtime, or an exporter that
    /// refuses its settings.
    pub fn new(config: &TracingConfig) -> Result<Tracer, TraceError> {
        config.validate()?;
        let runtime = tokio::runtime::Handle::try_current().map_err(TraceError::NoRuntime)?;
        let queue = export::spawn(config, &runtime)?;
        let dropped_queue_full = ::metrics::counter!(
            names::TRACING_SPANS_DROPPED_TOTAL,
            "reason" => "queue_full"
        );
        Ok(Tracer {
            shared: Arc::new(Shared {
                queue,
                dropped_queue_full,
            }),
        })
    }

    /// Starts the span of one call.
    ///
    /// The span continues `parent`'s trace, or starts a new one. Sampling is
    /// parent based: a decision the caller sent is followed, and only
    /// without one is the call sampled with probability `sampling_ratio`
    /// (clamped to 0..=1; the decision is a function of the trace id, so
    /// every proxy with the same ratio agrees). An unsampled span records
    /// nothing and allocates nothing, but still propagates its ids.
    ///
    /// `name` should follow the HTTP conventions; see [`span_name`].
    pub fn start_span(
        &self,
        parent: Option<&TraceContext>,
        sampling_ratio: f64,
        kind: SpanKind,
        name: impl Into<Cow<'static, str>>,
    ) -> CallSpan {
        let ids = parent.and_then(|p| p.ids);
        let trace_id = ids.map_or_else(new_trace_id, |ids| ids.trace_id);
        let parent_span_id = ids.map_or(0, |ids| ids.span_id);
        let sampling = parent.map_or(Sampling::Deferred, |p| p.sampling);
        let sampled = match sampling {
            Sampling::Sampled | Sampling::Debug => true,
            Sampling::NotSampled => false,
            Sampling::Deferred => ratio_sampled(trace_id, sampling_ratio),
        };
        let tracestate = parent.and_then(|p| p.tracestate.clone());
        let span_id = new_span_id();
        let recording = sampled.then(|| Recording {
            record: Box::new(export::Record {
                trace_id,
                span_id,
                parent_span_id,
                tracestate: tracestate.clone(),
                kind,
                name: name.into(),
                start_time: SystemTime::now(),
                start: Instant::now(),
                end_time: SystemTime::UNIX_EPOCH,
                attributes: Attributes::default(),
            }),
            shared: self.shared.clone(),
        });
        CallSpan {
            trace_id,
            span_id,
            parent_span_id,
            sampled,
            debug: sampling == Sampling::Debug,
            narrow: ids.is_some_and(|ids| ids.narrow),
            formats: parent.map(|p| p.formats).unwrap_or_default(),
            tracestate,
            recording,
        }
    }

    /// Exports every span ended before this call, and returns when the
    /// export finished or failed. For drain and tests; ending spans never
    /// needs it.
    pub async fn flush(&self) {
        let (done, wait) = oneshot::channel();
        if self
            .shared
            .queue
            .send(export::Message::Flush(done))
            .await
            .is_ok()
        {
            let _ = wait.await;
        }
    }
}

/// A random non-zero trace id; zero means invalid in both formats.
fn new_trace_id() -> u128 {
    loop {
        let id = rand::random::<u128>();
        if id != 0 {
            return id;
        }
    }
}

/// A random non-zero span id.
fn new_span_id() -> u64 {
    loop {
        let id = rand::random::<u64>();
        if id != 0 {
            return id;
        }
    }
}

/// Samples the lower 64 bits of the trace id against the ratio, as
/// OpenTelemetry's `TraceIdRatioBased` does: W3C puts a trace id's
/// randomness at its right end, and 64-bit B3 ids have only those bits.
fn ratio_sampled(trace_id: u128, ratio: f64) -> bool {
    if ratio >= 1.0 {
        return true;
    }
    if ratio.is_nan() || ratio <= 0.0 {
        return false;
    }
    // Half the id space so the product fits in a u64 exactly.
    let bound = (ratio * (1u64 << 63) as f64) as u64;
    ((trace_id as u64) >> 1) < bound
}

/// The span of one call. Attribute setters do nothing when it is not
/// sampled. Dropping it ends it, so a cancelled call still exports its span.
#[derive(Debug)]
pub struct CallSpan {
    trace_id: u128,
    span_id: u64,
    parent_span_id: u64,
    sampled: bool,
    debug: bool,
    narrow: bool,
    formats: Formats,
    tracestate: Option<HeaderValue>,
    recording: Option<Recording>,
}

#[derive(Debug)]
struct Recording {
    record: Box<export::Record>,
    shared: Arc<Shared>,
}

/// A sampled span's attributes, turned into OpenTelemetry's on the export
/// task so the call path only moves values it already has.
#[derive(Debug, Default)]
struct Attributes {
    method: Option<Method>,
    scheme: Option<Cow<'static, str>>,
    path: Option<String>,
    query: Option<String>,
    server_address: Option<String>,
    server_port: Option<u16>,
    version: Option<Version>,
    status: Option<u16>,
    user_agent: Option<HeaderValue>,
    client_address: Option<IpAddr>,
    peer: Option<SocketAddr>,
    error_type: Option<Cow<'static, str>>,
    route: Option<Arc<str>>,
    cluster: Option<Arc<str>>,
    flag: Option<ResponseFlag>,
    upstream: Option<SocketAddr>,
    principal: Option<String>,
}

impl CallSpan {
    /// The trace id (logs write it as 32 lowercase hex digits).
    pub fn trace_id(&self) -> u128 {
        self.trace_id
    }

    /// The trace id as 32 lowercase hex digits (for logs).
    pub fn trace_id_hex(&self) -> String {
        context::hex_string(self.trace_id, 32)
    }

    /// This span's id as 16 lowercase hex digits.
    pub fn span_id_hex(&self) -> String {
        context::hex_string(u128::from(self.span_id), 16)
    }

    /// The parent span's id as 16 lowercase hex digits; `None` for a root.
    pub fn parent_span_id_hex(&self) -> Option<String> {
        (self.parent_span_id != 0).then(|| context::hex_string(u128::from(self.parent_span_id), 16))
    }

    /// Whether this span is recorded and exported.
    pub fn is_sampled(&self) -> bool {
        self.sampled
    }

    /// Writes the upstream request's trace headers, naming this span as the
    /// parent: always W3C `traceparent` (and `tracestate` as received), and
    /// B3 in each format the request came in. Trace headers already present
    /// are replaced, so none is ever sent twice.
    pub fn inject(&self, headers: &mut HeaderMap) {
        context::inject(
            &context::Outgoing {
                trace_id: self.trace_id,
                span_id: self.span_id,
                parent_span_id: self.parent_span_id,
                sampled: self.sampled,
                debug: self.debug,
                narrow: self.narrow,
                formats: self.formats,
                tracestate: self.tracestate.as_ref(),
            },
            headers,
        );
    }

    fn attributes(&mut self) -> Option<&mut Attributes> {
        self.recording.as_mut().map(|r| &mut r.record.attributes)
    }

    /// Records what the request line and headers say: method, `url.path`,
    /// `url.scheme` (only when the URI is absolute), `server.address` and
    /// `server.port` (from the URI authority, else `Host`), protocol version
    /// and `user_agent.original`. The query is left out: it may hold
    /// secrets; see [`CallSpan::set_url_query`].
    pub fn record_request<B>(&mut self, request: &http::Request<B>) {
        let Some(attrs) = self.attributes() else {
            return;
        };
        let uri = request.uri();
        attrs.method = Some(request.method().clone());
        attrs.path = Some(uri.path().to_string());
        if let Some(scheme) = uri.scheme_str() {
            attrs.scheme = Some(scheme_name(scheme));
        }
        let authority = uri.authority().cloned().or_else(|| {
            let host = request.headers().get(http::header::HOST)?;
            http::uri::Authority::try_from(host.as_bytes()).ok()
        });
        if let Some(authority) = authority {
            attrs.server_address = Some(authority.host().to_string());
            attrs.server_port = authority.port_u16();
        }
        attrs.version = Some(request.version());
        attrs.user_agent = request.headers().get(http::header::USER_AGENT).cloned();
    }

    /// `http.request.method` (`_OTHER` plus `http.request.method_original`
    /// for non-standard methods).
    pub fn set_method(&mut self, method: &Method) {
        if let Some(attrs) = self.attributes() {
            attrs.method = Some(method.clone());
        }
    }

    /// `url.scheme`: `http` or `https` as the client used it.
    pub fn set_url_scheme(&mut self, scheme: &str) {
        if let Some(attrs) = self.attributes() {
            attrs.scheme = Some(scheme_name(scheme));
        }
    }

    /// `url.path`.
    pub fn set_url_path(&mut self, path: &str) {
        if let Some(attrs) = self.attributes() {
            attrs.path = Some(path.to_string());
        }
    }

    /// `url.query`, without the `?`. Optional: queries may carry secrets.
    pub fn set_url_query(&mut self, query: &str) {
        if let Some(attrs) = self.attributes() {
            attrs.query = Some(query.to_string());
        }
    }

    /// `server.address` and `server.port`: the host the client addressed
    /// (server spans) or the proxy connects to by name (client spans).
    pub fn set_server_address(&mut self, host: &str, port: Option<u16>) {
        if let Some(attrs) = self.attributes() {
            attrs.server_address = Some(host.to_string());
            attrs.server_port = port;
        }
    }

    /// `network.protocol.version` (`1.0`, `1.1`, `2`, `3`).
    pub fn set_protocol_version(&mut self, version: Version) {
        if let Some(attrs) = self.attributes() {
            attrs.version = Some(version);
        }
    }

    /// `http.response.status_code`. Decides the span status when it ends:
    /// an error for 5xx on server spans and for 4xx and 5xx on client spans,
    /// with `error.type` set to the code unless set otherwise.
    pub fn set_status_code(&mut self, status: u16) {
        if let Some(attrs) = self.attributes() {
            attrs.status = Some(status);
        }
    }

    /// `user_agent.original`.
    pub fn set_user_agent(&mut self, user_agent: &HeaderValue) {
        if let Some(attrs) = self.attributes() {
            attrs.user_agent = Some(user_agent.clone());
        }
    }

    /// `client.address`: the original client, e.g. from trusted
    /// `X-Forwarded-For`, else the peer.
    pub fn set_client_address(&mut self, address: IpAddr) {
        if let Some(attrs) = self.attributes() {
            attrs.client_address = Some(address);
        }
    }

    /// `network.peer.address` and `network.peer.port`: the other end of the
    /// downstream connection (server spans) or upstream one (client spans).
    pub fn set_peer_address(&mut self, peer: SocketAddr) {
        if let Some(attrs) = self.attributes() {
            attrs.peer = Some(peer);
        }
    }

    /// `error.type`: a low-cardinality reason the call failed, such as
    /// `timeout` or a response flag's code. Makes the span status an error.
    pub fn set_error_type(&mut self, error: impl Into<Cow<'static, str>>) {
        if let Some(attrs) = self.attributes() {
            attrs.error_type = Some(error.into());
        }
    }

    /// `postern.route`: the matched route's name.
    pub fn set_route(&mut self, route: &Arc<str>) {
        if let Some(attrs) = self.attributes() {
            attrs.route = Some(route.clone());
        }
    }

    /// `postern.cluster`: the chosen cluster's name.
    pub fn set_cluster(&mut self, cluster: &Arc<str>) {
        if let Some(attrs) = self.attributes() {
            attrs.cluster = Some(cluster.clone());
        }
    }

    /// `postern.response_flags`: the flag's code; the first one set wins, as
    /// in the call record.
    pub fn set_response_flag(&mut self, flag: ResponseFlag) {
        if let Some(attrs) = self.attributes() {
            attrs.flag.get_or_insert(flag);
        }
    }

    /// `postern.upstream.address`: the endpoint the call went to.
    pub fn set_upstream_address(&mut self, address: SocketAddr) {
        if let Some(attrs) = self.attributes() {
            attrs.upstream = Some(address);
        }
    }

    /// `postern.peer.principal`: the peer's verified identity (SPIFFE id).
    pub fn set_peer_principal(&mut self, principal: &str) {
        if let Some(attrs) = self.attributes() {
            attrs.principal = Some(principal.to_string());
        }
    }

    /// Ends the span and queues it for export without waiting. When the
    /// queue is full the span is dropped and counted in
    /// `postern_tracing_spans_dropped_total{reason="queue_full"}`.
    pub fn end(mut self) {
        self.finish();
    }

    fn finish(&mut self) {
        let Some(Recording { mut record, shared }) = self.recording.take() else {
            return;
        };
        // Wall clock for the start, monotonic clock for the length, so a
        // clock step during the call cannot make it negative.
        record.end_time = record.start_time + record.start.elapsed();
        match shared.queue.try_send(export::Message::Span(record)) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => shared.dropped_queue_full.increment(1),
            Err(mpsc::error::TrySendError::Closed(_)) => {
                ::metrics::counter!(names::TRACING_SPANS_DROPPED_TOTAL, "reason" => "shutdown")
                    .increment(1);
            }
        }
    }
}

impl Drop for CallSpan {
    fn drop(&mut self) {
        self.finish();
    }
}

/// `http` and `https` without allocating; anything else is kept as sent.
fn scheme_name(scheme: &str) -> Cow<'static, str> {
    match scheme {
        "http" => Cow::Borrowed("http"),
        "https" => Cow::Borrowed("https"),
        other => Cow::Owned(other.to_string()),
    }
}

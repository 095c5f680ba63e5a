//! The export side: a bounded queue of finished spans, drained by one tokio
//! task that batches them and sends them with opentelemetry-otlp's gRPC
//! exporter.
//!
//! We build `SpanData` ourselves and call the exporter directly instead of
//! going through the SDK's tracer and batch processor. The proxy already
//! chooses every id (continuing remote parents) and makes the sampling
//! decision per listener, and must propagate unsampled calls too; the SDK
//! tracer would redo both and allocate a span object per call. Its batch
//! processor also runs on a thread of its own, outside tokio, where the
//! tonic client cannot run. The conversion to OpenTelemetry's types happens
//! here, off the call path.

use std::borrow::Cow;
use std::time::{Duration, Instant, SystemTime};

use http::{HeaderValue, Version};
use opentelemetry::trace::{SpanContext, SpanId, Status, TraceFlags, TraceId, TraceState};
use opentelemetry::{InstrumentationScope, KeyValue, Value};
use opentelemetry_otlp::{WithExportConfig, WithTonicConfig};
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanExporter, SpanLinks};
use opentelemetry_sdk::Resource;
use tokio::sync::{mpsc, oneshot};
use tokio::time::MissedTickBehavior;

use super::{known_method, names, Attributes, SpanKind, TraceError, TracingConfig};

/// A sampled span, moved to the export task when it ends.
#[derive(Debug)]
pub(super) struct Record {
    pub(super) trace_id: u128,
    pub(super) span_id: u64,
    /// Zero for a root span.
    pub(super) parent_span_id: u64,
    pub(super) tracestate: Option<HeaderValue>,
    pub(super) kind: SpanKind,
    pub(super) name: Cow<'static, str>,
    pub(super) start_time: SystemTime,
    pub(super) start: Instant,
    pub(super) end_time: SystemTime,
    pub(super) attributes: Attributes,
}

/// What the export task receives.
#[derive(Debug)]
pub(super) enum Message {
    /// A finished span.
    Span(Box<Record>),
    /// Export what is queued, then answer.
    Flush(oneshot::Sender<()>),
}

/// Builds the exporter and starts the export task on `runtime`; returns the
/// queue's sending end. The task ends once every sender is gone.
pub(super) fn spawn(
    config: &TracingConfig,
    runtime: &tokio::runtime::Handle,
) -> Result<mpsc::Sender<Message>, TraceError> {
    // tonic's lazy channel spawns its worker while being built.
    let _entered = runtime.enter();
    let mut exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(config.collector.clone())
        .with_timeout(config.export_timeout)
        // Retries would hold the queue while spans pile up; a failed batch
        // is dropped and counted, and the next one tries again.
        .with_retry_policy(opentelemetry_otlp::RetryPolicy::disabled())
        .build()
        .map_err(|source| TraceError::Exporter {
            endpoint: config.collector.clone(),
            source,
        })?;
    exporter.set_resource(&resource(config));
    let (queue, spans) = mpsc::channel(config.max_queue);
    let batcher = Batcher {
        exporter,
        max_batch: config.max_batch,
        interval: config.export_interval,
        timeout: config.export_timeout,
        scope: InstrumentationScope::builder("postern")
            .with_version(env!("CARGO_PKG_VERSION"))
            .build(),
        exported: ::metrics::counter!(names::TRACING_SPANS_EXPORTED_TOTAL),
        dropped: ::metrics::counter!(
            names::TRACING_SPANS_DROPPED_TOTAL,
            "reason" => "export_failed"
        ),
        failing: false,
    };
    runtime.spawn(batcher.run(spans));
    Ok(queue)
}

/// The resource every span is exported under.
fn resource(config: &TracingConfig) -> Resource {
    // Empty, not `Resource::builder()`: its detectors read OTEL_* variables,
    // and the config file is the one place this is set.
    Resource::builder_empty()
        .with_service_name(config.service_name.clone())
        .with_attributes([
            KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
            KeyValue::new("service.instance.id", uuid::Uuid::new_v4().to_string()),
        ])
        .build()
}

struct Batcher {
    exporter: opentelemetry_otlp::SpanExporter,
    max_batch: usize,
    interval: Duration,
    timeout: Duration,
    scope: InstrumentationScope,
    exported: ::metrics::Counter,
    dropped: ::metrics::Counter,
    /// The last export failed; log only the change, not every batch.
    failing: bool,
}

impl Batcher {
    async fn run(mut self, mut spans: mpsc::Receiver<Message>) {
        let mut batch = Vec::with_capacity(self.max_batch);
        let mut received = Vec::with_capacity(self.max_batch);
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                n = spans.recv_many(&mut received, self.max_batch) => {
                    if n == 0 {
                        self.export(&mut batch).await;
                        return;
                    }
                    for message in received.drain(..) {
                        match message {
                            Message::Span(record) => {
                                batch.push(*record);
                                if batch.len() >= self.max_batch {
                                    self.export(&mut batch).await;
                                }
                            }
                            Message::Flush(done) => {
                                self.export(&mut batch).await;
                                let _ = done.send(());
                            }
                        }
                    }
                }
                _ = tick.tick() => self.export(&mut batch).await,
            }
        }
    }

    /// Sends the batch and empties it, whatever the outcome.
    async fn export(&mut self, batch: &mut Vec<Record>) {
        if batch.is_empty() {
            return;
        }
        let count = batch.len() as u64;
        let spans: Vec<SpanData> = batch.drain(..).map(|r| self.span_data(r)).collect();
        // The exporter bounds its own call too; this also bounds connecting.
        let error = match tokio::time::timeout(self.timeout, self.exporter.export(spans)).await {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(_) => Some(format!("timed out after {:?}", self.timeout)),
        };
        match error {
            None => {
                self.exported.increment(count);
                if std::mem::take(&mut self.failing) {
                    tracing::info!("trace export to the collector works again");
                }
            }
            Some(error) => {
                self.dropped.increment(count);
                if !std::mem::replace(&mut self.failing, true) {
                    tracing::warn!(%error, spans = count, "trace export failed; dropping spans until the collector answers");
                } else {
                    tracing::debug!(%error, spans = count, "trace export failed");
                }
            }
        }
    }

    fn span_data(&self, record: Record) -> SpanData {
        // The OTLP span's trace_state is informational; the wire value was
        // passed on verbatim already, so one the SDK rejects is left out.
        let trace_state = record
            .tracestate
            .as_ref()
            .and_then(|v| v.to_str().ok())
            .and_then(|s| s.parse::<TraceState>().ok())
            .unwrap_or_default();
        let (attributes, status) = semconv(record.kind, &record.attributes);
        SpanData {
            span_context: SpanContext::new(
                TraceId::from(record.trace_id),
                SpanId::from(record.span_id),
                TraceFlags::SAMPLED,
                false,
                trace_state,
            ),
            parent_span_id: SpanId::from(record.parent_span_id),
            // A parent always came from the request headers.
            parent_span_is_remote: record.parent_span_id != 0,
            span_kind: match record.kind {
                SpanKind::Server => opentelemetry::trace::SpanKind::Server,
                SpanKind::Client => opentelemetry::trace::SpanKind::Client,
            },
            name: record.name,
            start_time: record.start_time,
            end_time: record.end_time,
            attributes,
            dropped_attributes_count: 0,
            events: SpanEvents::default(),
            links: SpanLinks::default(),
            status,
            instrumentation_scope: self.scope.clone(),
        }
    }
}

/// The attributes and status OpenTelemetry's HTTP conventions give a span.
pub(super) fn semconv(kind: SpanKind, a: &Attributes) -> (Vec<KeyValue>, Status) {
    let mut kv = Vec::with_capacity(20);
    let mut put = |key: &'static str, value: Value| kv.push(KeyValue::new(key, value));
    if let Some(method) = &a.method {
        match known_method(method) {
            Some(name) => put("http.request.method", name.into()),
            None => {
                put("http.request.method", "_OTHER".into());
                put(
                    "http.request.method_original",
                    method.as_str().to_string().into(),
                );
            }
        }
    }
    if let Some(scheme) = &a.scheme {
        put("url.scheme", scheme.clone().into());
    }
    if let Some(path) = &a.path {
        put("url.path", path.clone().into());
    }
    if let Some(query) = &a.query {
        put("url.query", query.clone().into());
    }
    if let Some(address) = &a.server_address {
        put("server.address", address.clone().into());
    }
    if let Some(port) = a.server_port {
        put("server.port", i64::from(port).into());
    }
    // Client spans also need the whole URL, which the parts make up.
    if let (SpanKind::Client, Some(scheme), Some(host), Some(path)) =
        (kind, &a.scheme, &a.server_address, &a.path)
    {
        put(
            "url.full",
            url_full(scheme, host, a.server_port, path, a.query.as_deref()).into(),
        );
    }
    if let Some(version) = a.version.and_then(protocol_version) {
        put("network.protocol.version", version.into());
    }
    if let Some(status) = a.status {
        put("http.response.status_code", i64::from(status).into());
    }
    if let Some(agent) = &a.user_agent {
        put(
            "user_agent.original",
            String::from_utf8_lossy(agent.as_bytes())
                .into_owned()
                .into(),
        );
    }
    if let Some(client) = a.client_address {
        put("client.address", client.to_string().into());
    }
    if let Some(peer) = a.peer {
        put("network.peer.address", peer.ip().to_string().into());
        put("network.peer.port", i64::from(peer.port()).into());
    }
    if let Some(route) = &a.route {
        put("postern.route", route.clone().into());
    }
    if let Some(cluster) = &a.cluster {
        put("postern.cluster", cluster.clone().into());
    }
    if let Some(flag) = a.flag {
        put("postern.response_flags", flag.code().into());
    }
    if let Some(upstream) = a.upstream {
        put("postern.upstream.address", upstream.to_string().into());
    }
    if let Some(principal) = &a.principal {
        put("postern.peer.principal", principal.clone().into());
    }

    // Server spans fail on 5xx only: a 4xx is the client's error, not ours.
    let failed_status = a.status.filter(|&code| match kind {
        SpanKind::Server => code >= 500,
        SpanKind::Client => code >= 400,
    });
    let error_type: Option<Value> = match (&a.error_type, failed_status) {
        (Some(error), _) => Some(error.clone().into()),
        (None, Some(code)) => Some(code.to_string().into()),
        (None, None) => None,
    };
    let status = match error_type {
        Some(error) => {
            put("error.type", error);
            // The conventions ask for no description when the code says it all.
            Status::error("")
        }
        None => Status::Unset,
    };
    (kv, status)
}

/// `network.protocol.version` as the conventions spell it.
fn protocol_version(version: Version) -> Option<&'static str> {
    Some(match version {
        Version::HTTP_09 => "0.9",
        Version::HTTP_10 => "1.0",
        Version::HTTP_11 => "1.1",
        Version::HTTP_2 => "2",
        Version::HTTP_3 => "3",
        _ => return None,
    })
}

/// `scheme://host[:port]path[?query]`, with IPv6 hosts bracketed.
fn url_full(
    scheme: &str,
    host: &str,
    port: Option<u16>,
    path: &str,
    query: Option<&str>,
) -> String {
    let host = match host.parse::<std::net::Ipv6Addr>() {
        Ok(_) => Cow::Owned(format!("[{host}]")),
        Err(_) => Cow::Borrowed(host),
    };
    let mut url = format!("{scheme}://{host}");
    let default_port = match scheme {
        "http" => Some(80),
        "https" => Some(443),
        _ => None,
    };
    if let Some(port) = port.filter(|p| Some(*p) != default_port) {
        url.push_str(&format!(":{port}"));
    }
    url.push_str(path);
    if let Some(query) = query {
        url.push('?');
        url.push_str(query);
    }
    url
}

//! A test OTLP/gRPC trace collector on 127.0.0.1: it keeps every span it
//! receives, with the resource it came under, and lets a test wait until a
//! number of spans arrived. It can also stall, to stand for a collector
//! that accepts connections but never answers.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{any_value, KeyValue};
pub use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
pub use opentelemetry_proto::tonic::trace::v1::status::StatusCode;
pub use opentelemetry_proto::tonic::trace::v1::Span;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};

/// One received span and the resource it was exported under.
#[derive(Debug, Clone)]
pub struct ReceivedSpan {
    /// The resource's attributes (`service.name`, ...).
    pub resource: Vec<KeyValue>,
    /// The span as sent.
    pub span: Span,
}

impl ReceivedSpan {
    /// The trace id as lowercase hex.
    pub fn trace_id(&self) -> String {
        hex(&self.span.trace_id)
    }

    /// The span id as lowercase hex.
    pub fn span_id(&self) -> String {
        hex(&self.span.span_id)
    }

    /// The parent span id as lowercase hex; empty for a root span.
    pub fn parent_span_id(&self) -> String {
        hex(&self.span.parent_span_id)
    }

    /// The span kind.
    pub fn kind(&self) -> SpanKind {
        SpanKind::try_from(self.span.kind).unwrap_or(SpanKind::Unspecified)
    }

    /// The status code (unset when there is no status).
    pub fn status(&self) -> StatusCode {
        self.span
            .status
            .as_ref()
            .and_then(|s| StatusCode::try_from(s.code).ok())
            .unwrap_or(StatusCode::Unset)
    }

    /// A string attribute of the span.
    pub fn str_attr(&self, key: &str) -> Option<&str> {
        match value(&self.span.attributes, key)? {
            any_value::Value::StringValue(s) => Some(s),
            _ => None,
        }
    }

    /// An integer attribute of the span.
    pub fn int_attr(&self, key: &str) -> Option<i64> {
        match value(&self.span.attributes, key)? {
            any_value::Value::IntValue(n) => Some(*n),
            _ => None,
        }
    }

    /// A string attribute of the resource.
    pub fn resource_attr(&self, key: &str) -> Option<&str> {
        match value(&self.resource, key)? {
            any_value::Value::StringValue(s) => Some(s),
            _ => None,
        }
    }
}

fn value<'a>(attributes: &'a [KeyValue], key: &str) -> Option<&'a any_value::Value> {
    attributes
        .iter()
        .find(|kv| kv.key == key)?
        .value
        .as_ref()?
        .value
        .as_ref()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The gRPC service: appends each request's spans to the watch channel.
struct Collector {
    spans: watch::Sender<Vec<ReceivedSpan>>,
    stalled: Arc<AtomicBool>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        if self.stalled.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        let mut received = Vec::new();
        for resource_spans in request.into_inner().resource_spans {
            let resource = resource_spans
                .resource
                .map(|r| r.attributes)
                .unwrap_or_default();
            for scope_spans in resource_spans.scope_spans {
                for span in scope_spans.spans {
                    received.push(ReceivedSpan {
                        resource: resource.clone(),
                        span,
                    });
                }
            }
        }
        self.spans.send_modify(|spans| spans.extend(received));
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

/// An OTLP/gRPC trace receiver on 127.0.0.1, stopped when dropped.
pub struct OtlpReceiver {
    addr: SocketAddr,
    spans: watch::Receiver<Vec<ReceivedSpan>>,
    stalled: Arc<AtomicBool>,
    stop: Option<oneshot::Sender<()>>,
}

impl OtlpReceiver {
    /// Starts on a free port.
    pub async fn start() -> OtlpReceiver {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind otlp receiver");
        let addr = listener.local_addr().expect("otlp receiver addr");
        let (sender, spans) = watch::channel(Vec::new());
        let stalled = Arc::new(AtomicBool::new(false));
        let service = TraceServiceServer::new(Collector {
            spans: sender,
            stalled: stalled.clone(),
        });
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(async move {
            let incoming = tonic::transport::server::TcpIncoming::from(listener);
            let _ = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = stopped.await;
                })
                .await;
        });
        OtlpReceiver {
            addr,
            spans,
            stalled,
            stop: Some(stop),
        }
    }

    /// `http://127.0.0.1:port`, the collector address for a tracer.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Makes every later export hang without an answer, as a stuck
    /// collector would.
    pub fn stall(&self) {
        self.stalled.store(true, Ordering::SeqCst);
    }

    /// The spans received so far.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.spans.borrow().clone()
    }

    /// Waits until at least `count` spans arrived and returns all of them.
    ///
    /// # Panics
    ///
    /// When fewer arrived within `limit`.
    pub async fn wait_for_spans(&self, count: usize, limit: Duration) -> Vec<ReceivedSpan> {
        let mut spans = self.spans.clone();
        let waited = tokio::time::timeout(limit, async {
            spans
                .wait_for(|spans| spans.len() >= count)
                .await
                .map(|spans| spans.clone())
        })
        .await;
        match waited {
            Ok(Ok(spans)) => spans,
            Ok(Err(_)) => panic!("otlp receiver stopped before {count} spans arrived"),
            Err(_) => panic!(
                "{count} spans did not arrive within {limit:?}; got {}",
                self.spans.borrow().len()
            ),
        }
    }
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

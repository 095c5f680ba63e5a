//! The finished call: what every telemetry sink (metrics, access log,
//! access-log stream, traces) reads once a call ends.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::{HeaderValue, Method};

use super::ResponseFlags;

/// Which side of the workload a listener faces; Istio's `reporter` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TrafficDirection {
    /// Calls coming into this workload (`reporter="destination"`).
    Inbound,
    /// Calls this workload makes (`reporter="source"`).
    #[default]
    Outbound,
}

impl TrafficDirection {
    /// Istio's `reporter` label value.
    pub fn reporter(self) -> &'static str {
        match self {
            TrafficDirection::Inbound => "destination",
            TrafficDirection::Outbound => "source",
        }
    }
}

/// L7 or L4.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallKind {
    /// One HTTP request and its response.
    Http,
    /// One TCP connection.
    Tcp,
}

/// Who a workload is, as telemetry names it (Istio's peer labels).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct WorkloadLabels {
    /// Workload (Deployment etc.) name, or `unknown`.
    pub workload: Arc<str>,
    /// Kubernetes namespace, or `unknown`.
    pub namespace: Arc<str>,
    /// SPIFFE ID, or `unknown`.
    pub principal: Arc<str>,
    /// `app` label, or `unknown`.
    pub app: Arc<str>,
    /// `version` label, or `unknown`.
    pub version: Arc<str>,
    /// Canonical service, or `unknown`.
    pub canonical_service: Arc<str>,
    /// Canonical revision, or `latest`.
    pub canonical_revision: Arc<str>,
    /// Mesh cluster id, or `unknown`.
    pub cluster: Arc<str>,
}

/// One finished call (an HTTP request or a TCP connection).
#[derive(Debug, Clone)]
pub struct CallLog {
    /// HTTP or TCP.
    pub kind: CallKind,
    /// Inbound or outbound.
    pub direction: TrafficDirection,
    /// Wall-clock start.
    pub start_time: SystemTime,
    /// Until the last response byte (HTTP) or the connection closed (TCP).
    pub duration: Duration,
    /// The listener's name.
    pub listener: Arc<str>,
    /// `HTTP/1.0`, `HTTP/1.1`, `HTTP/2` or `TCP`.
    pub protocol: &'static str,
    /// Request method (HTTP).
    pub method: Option<Method>,
    /// Request authority, as routed (HTTP).
    pub authority: Option<HeaderValue>,
    /// Normalised path with its query (HTTP); shared with the request, so
    /// recording it copies no text.
    pub path: Option<http::uri::PathAndQuery>,
    /// `user-agent` (HTTP).
    pub user_agent: Option<HeaderValue>,
    /// `x-request-id` as forwarded (HTTP).
    pub request_id: Option<HeaderValue>,
    /// W3C trace id when the call is traced; logs write it as 32 lowercase
    /// hex digits.
    pub trace_id: Option<u128>,
    /// Response status; 0 when none was sent (and for TCP).
    pub status: u16,
    /// gRPC status from the response headers or trailers.
    pub grpc_status: Option<u16>,
    /// What did not go plainly.
    pub flags: ResponseFlags,
    /// Request bytes from downstream (body for HTTP, stream for TCP).
    pub bytes_received: u64,
    /// Response bytes to downstream (body for HTTP, stream for TCP).
    pub bytes_sent: u64,
    /// From the call's start until the upstream's response headers.
    pub upstream_ttfb: Option<Duration>,
    /// The upstream endpoint that served the call.
    pub upstream_host: Option<SocketAddr>,
    /// The cluster chosen.
    pub cluster: Option<Arc<str>>,
    /// The route matched (HTTP).
    pub route: Option<Arc<str>>,
    /// Downstream peer address.
    pub downstream_addr: SocketAddr,
    /// Downstream peer SPIFFE ID, from its verified certificate.
    pub downstream_principal: Option<Arc<str>>,
    /// Upstream peer SPIFFE ID, from its verified certificate.
    pub upstream_principal: Option<Arc<str>>,
    /// The downstream connection was mutual TLS.
    pub mtls: bool,
    /// Request headers the access log asked to keep, already redacted.
    pub request_headers: Vec<(http::HeaderName, HeaderValue)>,
}

//! Per-call reports to a collector over Envoy's access-log service
//! (`envoy.service.accesslog.v3.AccessLogService/StreamAccessLogs`).
//!
//! [`AlsSink::send`] is all the request path sees: it writes the finished
//! call as an Envoy `HTTPAccessLogEntry` or `TCPAccessLogEntry` straight
//! into the open batch, under a lock held only for that, and returns,
//! never waiting. A background task, woken once per batch rather than per
//! call, writes the sealed batches to one long-lived stream, reconnecting
//! with jittered exponential back-off.
//!
//! Delivery is best effort, as the API intends: when the collector is slow
//! or gone the batches fill up to `buffer` entries and further calls are
//! dropped and counted
//! ([`ENTRIES_DROPPED_TOTAL`]), and entries written to a stream that then
//! breaks are lost. Traffic never waits for the collector.
//!
//! Boundaries: which calls are reported, and which request headers a
//! [`CallLog`] keeps, is the listener's business; this module only
//! converts and ships. TLS to the collector is not supported.

use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use ::metrics::{Counter, Gauge};
use http::{HeaderName, Method};
use postern_proto::envoy::config::core::v3::{
    address, grpc_service, socket_address, Address, ApiVersion, GrpcService, Node, RequestMethod,
    SocketAddress,
};
use postern_proto::envoy::data::accesslog::v3::{
    self as data, http_access_log_entry::HttpVersion, response_flags::unauthorized,
    response_flags::Unauthorized, tls_properties, AccessLogCommon, AccessLogType,
    ConnectionProperties, HttpAccessLogEntry, HttpRequestProperties, HttpResponseProperties,
    TcpAccessLogEntry, TlsProperties,
};
use postern_proto::envoy::extensions::access_loggers::grpc::v3::{
    CommonGrpcAccessLogConfig, HttpGrpcAccessLogConfig, TcpGrpcAccessLogConfig,
};
use postern_proto::envoy::service::accesslog::v3::stream_access_logs_message::Identifier;
use postern_proto::envoy::service::accesslog::v3::StreamAccessLogsResponse;
use postern_proto::google::protobuf::{self as pb, Any};
use prost::{Message as _, Name as _};
use rand::Rng;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch, Notify};
use tokio::time::Instant;
use tracing::Instrument as _;

use super::log::{CallKind, CallLog};
use super::{ResponseFlag, ResponseFlags};

#[cfg(test)]
mod tests;
mod wire;

/// Counter: entries handed to an ALS stream.
pub const ENTRIES_SENT_TOTAL: &str = "postern_als_entries_sent_total";
/// Counter: calls not reported because the queue was full (the collector
/// is slow or gone) or the sink had stopped.
pub const ENTRIES_DROPPED_TOTAL: &str = "postern_als_entries_dropped_total";
/// Counter: attempts to open an ALS stream after a sink's first.
pub const RECONNECTS_TOTAL: &str = "postern_als_reconnects_total";
/// Gauge: ALS streams open now, over all sinks.
pub const STREAMS_ACTIVE: &str = "postern_als_streams_active";

/// Describes the ALS metrics to the installed recorder.
pub fn describe() {
    use ::metrics::{describe_counter, describe_gauge};
    describe_counter!(
        ENTRIES_SENT_TOTAL,
        "Access-log entries handed to an ALS stream"
    );
    describe_counter!(
        ENTRIES_DROPPED_TOTAL,
        "Access-log entries dropped because the ALS queue was full or the sink had stopped"
    );
    describe_counter!(
        RECONNECTS_TOTAL,
        "Attempts to open an ALS stream after the first"
    );
    describe_gauge!(STREAMS_ACTIVE, "ALS streams open");
}

/// Largest `buffer` accepted; a queue this long already holds minutes of
/// a busy proxy's calls.
const MAX_BUFFER: usize = 1 << 20;
/// Largest `batch` accepted, so one message stays far below gRPC's 4 MiB
/// default limit on the collector's side.
const MAX_BATCH: usize = 4096;
/// Envoy's default for `buffer_size_bytes`.
const ENVOY_DEFAULT_BATCH_BYTES: usize = 16 * 1024;
/// Time allowed for the TCP connection to the collector.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How often to ping a quiet connection, so a collector that vanished
/// without closing is noticed and a new stream opened.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the last sink handle going away waits for the collector to
/// take the remaining entries.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Settings of one ALS sink, from the config file or from an xDS access
/// logger ([`AlsConfig::from_envoy`]). Check with [`AlsConfig::validate`].
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AlsConfig {
    /// The collector's gRPC endpoint, `http://host:port`.
    pub address: String,
    /// Sent in the stream's identifier (default `postern`).
    #[serde(default = "default_log_name")]
    pub log_name: String,
    /// Calls waiting for the stream at most, in open and sealed batches
    /// (default 4096); past that, new calls are dropped and counted. A
    /// batch holds at most this many entries.
    #[serde(default = "default_buffer")]
    pub buffer: usize,
    /// Entries per message at most (default 256).
    #[serde(default = "default_batch")]
    pub batch: usize,
    /// Sends a message once its entries' encoded size reaches this many
    /// bytes (Envoy's `buffer_size_bytes`); none: only `batch` counts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_bytes: Option<usize>,
    /// Longest time an entry waits for its batch to fill (default 1s).
    #[serde(default = "default_flush_interval", with = "humantime_serde")]
    pub flush_interval: Duration,
    /// First delay before reconnecting (default 500ms); doubles per failed
    /// attempt, with jitter.
    #[serde(default = "default_initial_backoff", with = "humantime_serde")]
    pub initial_backoff: Duration,
    /// Longest delay before reconnecting (default 30s). A stream that stayed
    /// up this long counts as healthy: the next delay starts over.
    #[serde(default = "default_max_backoff", with = "humantime_serde")]
    pub max_backoff: Duration,
    /// Request headers copied into HTTP entries, lowercase (Envoy's
    /// `additional_request_headers_to_log`; default none). Only headers the
    /// call's [`CallLog::request_headers`] kept can be copied.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub request_headers: Vec<String>,
}

fn default_log_name() -> String {
    "postern".to_owned()
}

fn default_buffer() -> usize {
    4096
}

fn default_batch() -> usize {
    256
}

fn default_flush_interval() -> Duration {
    Duration::from_secs(1)
}

fn default_initial_backoff() -> Duration {
    Duration::from_millis(500)
}

fn default_max_backoff() -> Duration {
    Duration::from_secs(30)
}

impl AlsConfig {
    /// Settings for the collector at `address`, with every default.
    pub fn new(address: impl Into<String>) -> AlsConfig {
        AlsConfig {
            address: address.into(),
            log_name: default_log_name(),
            buffer: default_buffer(),
            batch: default_batch(),
            batch_bytes: None,
            flush_interval: default_flush_interval(),
            initial_backoff: default_initial_backoff(),
            max_backoff: default_max_backoff(),
            request_headers: Vec::new(),
        }
    }

    /// Checks every field.
    ///
    /// # Errors
    ///
    /// Each problem as `(field, reason)`: an address that is not
    /// `http://host[:port]`, an empty log name, a zero or oversized buffer
    /// or batch, a zero flush interval or initial back-off, a max back-off
    /// below the initial one, or an invalid header name.
    pub fn validate(&self) -> Result<(), Vec<(&'static str, String)>> {
        let mut errors = Vec::new();
        if let Err(reason) = check_address(&self.address) {
            errors.push(("address", reason));
        }
        if self.log_name.is_empty() {
            errors.push(("log_name", "must not be empty".to_owned()));
        }
        if !(1..=MAX_BUFFER).contains(&self.buffer) {
            errors.push(("buffer", format!("must be between 1 and {MAX_BUFFER}")));
        }
        if !(1..=MAX_BATCH).contains(&self.batch) {
            errors.push(("batch", format!("must be between 1 and {MAX_BATCH}")));
        }
        if self.flush_interval.is_zero() {
            errors.push(("flush_interval", "must be greater than zero".to_owned()));
        }
        if self.initial_backoff.is_zero() {
            errors.push(("initial_backoff", "must be greater than zero".to_owned()));
        }
        if self.max_backoff < self.initial_backoff {
            errors.push((
                "max_backoff",
                "must not be less than initial_backoff".to_owned(),
            ));
        }
        for name in &self.request_headers {
            if name.is_empty() || HeaderName::from_bytes(name.as_bytes()).is_err() {
                errors.push(("request_headers", format!("invalid header name {name:?}")));
            } else if name.bytes().any(|b| b.is_ascii_uppercase()) {
                errors.push((
                    "request_headers",
                    format!("header name {name:?} must be lowercase"),
                ));
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }

    /// Reads an xDS access logger's `typed_config`: an
    /// `envoy.extensions.access_loggers.grpc.v3.HttpGrpcAccessLogConfig` or
    /// `TcpGrpcAccessLogConfig`. `resolve_cluster` maps an
    /// `envoy_grpc.cluster_name` to `http://host:port` (or None if unknown);
    /// it is asked once, so later endpoint changes of that cluster do not
    /// move the sink.
    ///
    /// Mapped: `log_name`; `google_grpc.target_uri` or `envoy_grpc`;
    /// `buffer_flush_interval`; `buffer_size_bytes` (0: one entry per
    /// message; unset: Envoy's 16 KiB); `grpc_stream_retry_policy.retry_back_off`;
    /// `additional_request_headers_to_log`. `grpc_service.timeout` is ignored,
    /// as Envoy ignores it for this stream. The result is validated.
    ///
    /// # Errors
    ///
    /// Every problem, as `field: reason` joined by `; `: another type, bytes
    /// that do not decode, a missing or unknown collector, TLS or
    /// credentials, or a field that would change what is logged or how
    /// (response headers or trailers, filter state, custom tags, initial
    /// metadata, a retry limit).
    pub fn from_envoy(
        any: &Any,
        resolve_cluster: impl Fn(&str) -> Option<String>,
    ) -> Result<AlsConfig, String> {
        let mut problems = Vec::new();
        let (common, request_headers) = if any.type_url == HttpGrpcAccessLogConfig::type_url() {
            let http = HttpGrpcAccessLogConfig::decode(any.value.as_slice())
                .map_err(|e| format!("cannot decode {}: {e}", any.type_url))?;
            if !http.additional_response_headers_to_log.is_empty() {
                problems.push(unsupported("additional_response_headers_to_log"));
            }
            if !http.additional_response_trailers_to_log.is_empty() {
                problems.push(unsupported("additional_response_trailers_to_log"));
            }
            let headers = http
                .additional_request_headers_to_log
                .iter()
                .map(|name| name.to_ascii_lowercase())
                .collect();
            (http.common_config, headers)
        } else if any.type_url == TcpGrpcAccessLogConfig::type_url() {
            let tcp = TcpGrpcAccessLogConfig::decode(any.value.as_slice())
                .map_err(|e| format!("cannot decode {}: {e}", any.type_url))?;
            (tcp.common_config, Vec::new())
        } else {
            return Err(format!(
                "type_url: expected {} or {}, got {}",
                HttpGrpcAccessLogConfig::type_url(),
                TcpGrpcAccessLogConfig::type_url(),
                any.type_url
            ));
        };
        let Some(common) = common else {
            return Err("common_config: required".to_owned());
        };
        let mut config = AlsConfig::new(String::new());
        config.request_headers = request_headers;
        read_common(&common, &resolve_cluster, &mut config, &mut problems);
        if let Err(errors) = config.validate() {
            for (field, reason) in errors {
                let field = match field {
                    "address" => "common_config.grpc_service",
                    "log_name" => "common_config.log_name",
                    "flush_interval" => "common_config.buffer_flush_interval",
                    "initial_backoff" | "max_backoff" => {
                        "common_config.grpc_stream_retry_policy.retry_back_off"
                    }
                    "request_headers" => "additional_request_headers_to_log",
                    other => other,
                };
                problems.push(format!("{field}: {reason}"));
            }
        }
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(problems.join("; "))
        }
    }
}

fn unsupported(field: &str) -> String {
    format!("{field}: not supported by Postern")
}

fn read_common(
    common: &CommonGrpcAccessLogConfig,
    resolve_cluster: &dyn Fn(&str) -> Option<String>,
    config: &mut AlsConfig,
    problems: &mut Vec<String>,
) {
    config.log_name.clone_from(&common.log_name);
    if !matches!(
        ApiVersion::try_from(common.transport_api_version),
        Ok(ApiVersion::Auto | ApiVersion::V3)
    ) {
        problems.push("common_config.transport_api_version: only v3 is supported".to_owned());
    }
    match &common.grpc_service {
        Some(service) => match collector_address(service, resolve_cluster) {
            Ok(address) => config.address = address,
            Err(problem) => problems.push(problem),
        },
        None => problems.push("common_config.grpc_service: required".to_owned()),
    }
    if let Some(interval) = &common.buffer_flush_interval {
        match proto_duration(interval) {
            Some(interval) => config.flush_interval = interval,
            None => problems
                .push("common_config.buffer_flush_interval: must not be negative".to_owned()),
        }
    }
    match common.buffer_size_bytes.map(|b| b.value) {
        // Envoy sends each entry as soon as it is logged.
        Some(0) => config.batch = 1,
        Some(bytes) => config.batch_bytes = Some(bytes as usize),
        None => config.batch_bytes = Some(ENVOY_DEFAULT_BATCH_BYTES),
    }
    if !common.filter_state_objects_to_log.is_empty() {
        problems.push(unsupported("common_config.filter_state_objects_to_log"));
    }
    if !common.custom_tags.is_empty() {
        problems.push(unsupported("common_config.custom_tags"));
    }
    if let Some(retry) = &common.grpc_stream_retry_policy {
        let path = "common_config.grpc_stream_retry_policy";
        if retry.num_retries.is_some() {
            // The sink retries for as long as it lives.
            problems.push(unsupported(&format!("{path}.num_retries")));
        }
        if !retry.retry_on.is_empty()
            || retry.retry_priority.is_some()
            || !retry.retry_host_predicate.is_empty()
        {
            problems.push(unsupported(&format!(
                "{path}.retry_on/retry_priority/retry_host_predicate"
            )));
        }
        if let Some(backoff) = &retry.retry_back_off {
            let base = backoff.base_interval.as_ref().map(proto_duration);
            let max = backoff.max_interval.as_ref().map(proto_duration);
            match (base, max) {
                (Some(None), _) | (_, Some(None)) => problems.push(format!(
                    "{path}.retry_back_off: intervals must not be negative"
                )),
                (base, max) => {
                    if let Some(Some(base)) = base {
                        config.initial_backoff = base;
                        // Envoy's default max is ten times the base.
                        config.max_backoff = base.saturating_mul(10);
                    }
                    if let Some(Some(max)) = max {
                        config.max_backoff = max;
                    }
                }
            }
        }
    }
}

/// The `http://host:port` a `GrpcService` points at.
fn collector_address(
    service: &GrpcService,
    resolve_cluster: &dyn Fn(&str) -> Option<String>,
) -> Result<String, String> {
    let path = "common_config.grpc_service";
    if !service.initial_metadata.is_empty() {
        return Err(unsupported(&format!("{path}.initial_metadata")));
    }
    if service.retry_policy.is_some() {
        return Err(unsupported(&format!("{path}.retry_policy")));
    }
    match &service.target_specifier {
        Some(grpc_service::TargetSpecifier::EnvoyGrpc(envoy)) => {
            if !envoy.authority.is_empty() {
                return Err(unsupported(&format!("{path}.envoy_grpc.authority")));
            }
            if envoy.retry_policy.is_some() {
                return Err(unsupported(&format!("{path}.envoy_grpc.retry_policy")));
            }
            resolve_cluster(&envoy.cluster_name).ok_or_else(|| {
                format!(
                    "{path}.envoy_grpc.cluster_name: unknown cluster {:?}",
                    envoy.cluster_name
                )
            })
        }
        Some(grpc_service::TargetSpecifier::GoogleGrpc(google)) => {
            use grpc_service::google_grpc::channel_credentials::CredentialSpecifier;
            let insecure = match google
                .channel_credentials
                .as_ref()
                .and_then(|c| c.credential_specifier.as_ref())
            {
                None | Some(CredentialSpecifier::LocalCredentials(_)) => true,
                Some(_) => false,
            };
            if !insecure {
                return Err(unsupported(&format!(
                    "{path}.google_grpc.channel_credentials (TLS)"
                )));
            }
            if !google.call_credentials.is_empty()
                || !google.call_credentials_plugin.is_empty()
                || !google.channel_credentials_plugin.is_empty()
                || !google.credentials_factory_name.is_empty()
            {
                return Err(unsupported(&format!("{path}.google_grpc credentials")));
            }
            target_uri_address(&google.target_uri)
                .ok_or_else(|| format!("{path}.google_grpc.target_uri: {:?} is not host:port, dns:///host:port or http://host:port", google.target_uri))
        }
        None => Err(format!("{path}: needs envoy_grpc or google_grpc")),
    }
}

/// A gRPC target URI (`host:port`, `dns:///host:port`, `ipv4:ip:port`) as
/// `http://host:port`.
fn target_uri_address(target: &str) -> Option<String> {
    if target.starts_with("http://") {
        return Some(target.to_owned());
    }
    let rest = ["dns:///", "dns:", "ipv4:", "ipv6:"]
        .iter()
        .find_map(|scheme| target.strip_prefix(scheme))
        .unwrap_or(target);
    // Any other scheme (unix:, https:, xds:) or a list of addresses.
    if rest.is_empty() || rest.contains("://") || rest.contains(',') || rest.contains('/') {
        return None;
    }
    Some(format!("http://{rest}"))
}

fn check_address(address: &str) -> Result<(), String> {
    let uri: http::Uri = address
        .parse()
        .map_err(|e| format!("{address:?} is not a URI: {e}"))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => return Err("TLS to the collector is not supported; use http://".into()),
        _ => return Err(format!("{address:?} must be http://host:port")),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(format!("{address:?} has no host"));
    }
    if uri.path_and_query().is_some_and(|p| p.as_str() != "/") {
        return Err(format!("{address:?} must not have a path"));
    }
    Ok(())
}

fn proto_duration(d: &pb::Duration) -> Option<Duration> {
    Some(Duration::new(
        u64::try_from(d.seconds).ok()?,
        u32::try_from(d.nanos).ok()?,
    ))
}

fn to_proto_duration(d: Duration) -> pb::Duration {
    pb::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        // Below 10^9 by definition.
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

fn timestamp(t: SystemTime) -> Option<pb::Timestamp> {
    let since = t.duration_since(SystemTime::UNIX_EPOCH).ok()?;
    let d = to_proto_duration(since);
    Some(pb::Timestamp {
        seconds: d.seconds,
        nanos: d.nanos,
    })
}

fn socket_address(addr: std::net::SocketAddr) -> Address {
    Address {
        address: Some(address::Address::SocketAddress(SocketAddress {
            protocol: socket_address::Protocol::Tcp as i32,
            address: addr.ip().to_string(),
            port_specifier: Some(socket_address::PortSpecifier::PortValue(u32::from(
                addr.port(),
            ))),
            ..SocketAddress::default()
        })),
    }
}

fn text(value: &http::HeaderValue) -> String {
    String::from_utf8_lossy(value.as_bytes()).into_owned()
}

/// Envoy's response flags for `flags`, where Postern's flag means what
/// Envoy's does; none when nothing maps.
///
/// NR, UH, UF, UR, UT, UO, URX, DC, RL, SI, DPE and NC map one to one. RBAC maps to
/// `unauthorized_details` with reason unspecified (Envoy's ext_authz uses
/// `EXTERNAL_SERVICE`). DR (a direct response; Envoy's DR is a downstream
/// reset) and DL (a downstream limit) have no Envoy counterpart.
pub fn envoy_response_flags(flags: ResponseFlags) -> Option<data::ResponseFlags> {
    // Most calls carry no flag: no message of thirty fields to build.
    if flags.is_empty() {
        return None;
    }
    let mut out = data::ResponseFlags::default();
    let mut any = false;
    for flag in flags.iter() {
        let field = match flag {
            ResponseFlag::NoRoute => &mut out.no_route_found,
            ResponseFlag::NoHealthyUpstream => &mut out.no_healthy_upstream,
            ResponseFlag::UpstreamConnectFailure => &mut out.upstream_connection_failure,
            ResponseFlag::UpstreamReset => &mut out.upstream_remote_reset,
            ResponseFlag::UpstreamTimeout => &mut out.upstream_request_timeout,
            ResponseFlag::UpstreamOverflow => &mut out.upstream_overflow,
            ResponseFlag::RetryLimitExceeded => &mut out.upstream_retry_limit_exceeded,
            ResponseFlag::DownstreamClosed => &mut out.downstream_connection_termination,
            ResponseFlag::RateLimited => &mut out.rate_limited,
            ResponseFlag::RateLimitServiceError => &mut out.rate_limit_service_error,
            ResponseFlag::StreamIdleTimeout => &mut out.stream_idle_timeout,
            ResponseFlag::DownstreamProtocolError => &mut out.downstream_protocol_error,
            ResponseFlag::NoClusterFound => &mut out.no_cluster_found,
            ResponseFlag::OverloadManager => &mut out.overload_manager,
            ResponseFlag::RbacDenied | ResponseFlag::UnauthorizedJwt => {
                out.unauthorized_details = Some(Unauthorized {
                    reason: unauthorized::Reason::Unspecified as i32,
                });
                any = true;
                continue;
            }
            ResponseFlag::DirectResponse | ResponseFlag::DownstreamLimit => continue,
        };
        *field = true;
        any = true;
    }
    any.then_some(out)
}

/// The caller's TLS properties: its SPIFFE ID as a URI SAN, on mTLS calls.
fn tls_properties(log: &CallLog) -> Option<TlsProperties> {
    (log.mtls || log.downstream_principal.is_some()).then(|| TlsProperties {
        peer_certificate_properties: log.downstream_principal.as_ref().map(|id| {
            tls_properties::CertificateProperties {
                subject_alt_name: vec![tls_properties::certificate_properties::SubjectAltName {
                    san: Some(
                        tls_properties::certificate_properties::subject_alt_name::San::Uri(
                            id.to_string(),
                        ),
                    ),
                }],
                ..Default::default()
            }
        }),
        ..TlsProperties::default()
    })
}

fn common(log: &CallLog, kind: AccessLogType) -> AccessLogCommon {
    let duration = to_proto_duration(log.duration);
    let tls_properties = tls_properties(log);
    AccessLogCommon {
        sample_rate: 1.0,
        downstream_remote_address: Some(socket_address(log.downstream_addr)),
        tls_properties,
        start_time: timestamp(log.start_time),
        time_to_first_upstream_rx_byte: log.upstream_ttfb.map(to_proto_duration),
        time_to_last_downstream_tx_byte: Some(duration),
        duration: Some(duration),
        upstream_remote_address: log.upstream_host.map(socket_address),
        upstream_cluster: log.cluster.as_deref().unwrap_or_default().to_owned(),
        route_name: log.route.as_deref().unwrap_or_default().to_owned(),
        response_flags: envoy_response_flags(log.flags),
        access_log_type: kind as i32,
        ..AccessLogCommon::default()
    }
}

fn request_method(method: &Method) -> RequestMethod {
    match *method {
        Method::GET => RequestMethod::Get,
        Method::HEAD => RequestMethod::Head,
        Method::POST => RequestMethod::Post,
        Method::PUT => RequestMethod::Put,
        Method::DELETE => RequestMethod::Delete,
        Method::CONNECT => RequestMethod::Connect,
        Method::OPTIONS => RequestMethod::Options,
        Method::TRACE => RequestMethod::Trace,
        Method::PATCH => RequestMethod::Patch,
        _ => RequestMethod::MethodUnspecified,
    }
}

fn http_version(protocol: &str) -> HttpVersion {
    match protocol {
        "HTTP/1.0" => HttpVersion::Http10,
        "HTTP/1.1" => HttpVersion::Http11,
        "HTTP/2" => HttpVersion::Http2,
        "HTTP/3" => HttpVersion::Http3,
        _ => HttpVersion::ProtocolUnspecified,
    }
}

/// The Envoy entry for an HTTP call (the stream writes the same bytes
/// straight from the call, see `wire`). Of the call's kept request headers,
/// those named in `keep_headers` go into `request_headers`, repeated
/// values joined with `,`.
pub fn http_entry(log: &CallLog, keep_headers: &[HeaderName]) -> HttpAccessLogEntry {
    HttpAccessLogEntry {
        common_properties: Some(common(log, AccessLogType::DownstreamEnd)),
        protocol_version: http_version(log.protocol) as i32,
        request: Some(HttpRequestProperties {
            request_method: log
                .method
                .as_ref()
                .map_or(RequestMethod::MethodUnspecified, request_method)
                as i32,
            authority: log.authority.as_ref().map(text).unwrap_or_default(),
            path: log
                .path
                .as_ref()
                .map(|p| p.as_str().to_owned())
                .unwrap_or_default(),
            user_agent: log.user_agent.as_ref().map(text).unwrap_or_default(),
            request_id: log.request_id.as_ref().map(text).unwrap_or_default(),
            request_body_bytes: log.bytes_received,
            request_headers: request_headers(log, keep_headers),
            ..HttpRequestProperties::default()
        }),
        response: Some(HttpResponseProperties {
            // 0: no response was sent.
            response_code: (log.status != 0).then_some(pb::UInt32Value {
                value: u32::from(log.status),
            }),
            response_body_bytes: log.bytes_sent,
            ..HttpResponseProperties::default()
        }),
    }
}

/// The call's kept request headers named in `keep_headers`, repeated
/// values joined with `,`.
fn request_headers(
    log: &CallLog,
    keep_headers: &[HeaderName],
) -> std::collections::HashMap<String, String> {
    let mut kept = std::collections::HashMap::new();
    for (name, value) in &log.request_headers {
        if keep_headers.contains(name) {
            kept.entry(name.as_str().to_owned())
                .and_modify(|joined: &mut String| {
                    joined.push(',');
                    joined.push_str(&text(value));
                })
                .or_insert_with(|| text(value));
        }
    }
    kept
}

/// The Envoy entry for a TCP connection.
pub fn tcp_entry(log: &CallLog) -> TcpAccessLogEntry {
    TcpAccessLogEntry {
        common_properties: Some(common(log, AccessLogType::TcpConnectionEnd)),
        connection_properties: Some(ConnectionProperties {
            received_bytes: log.bytes_received,
            sent_bytes: log.bytes_sent,
        }),
    }
}

/// The method every message goes to.
const STREAM_ACCESS_LOGS: &str = "/envoy.service.accesslog.v3.AccessLogService/StreamAccessLogs";

/// The stream's codec: messages leave as [`Sealed::message_parts`]
/// encoded them; the collector's (empty) answer is decoded with prost.
#[derive(Debug, Clone, Copy, Default)]
struct PreEncoded;

/// An encoded `StreamAccessLogsMessage` in two parts: the head (the
/// identifier, if any, and the batch's key and length), then the batch.
/// The codec writes both into its frame, so the batch is copied once,
/// not first joined to its head.
#[derive(Debug)]
struct MessageParts {
    head: bytes::Bytes,
    body: bytes::Bytes,
}

impl tonic::codec::Codec for PreEncoded {
    type Encode = MessageParts;
    type Decode = StreamAccessLogsResponse;
    type Encoder = PreEncoded;
    type Decoder = PreEncoded;

    fn encoder(&mut self) -> PreEncoded {
        PreEncoded
    }

    fn decoder(&mut self) -> PreEncoded {
        PreEncoded
    }
}

impl tonic::codec::Encoder for PreEncoded {
    type Item = MessageParts;
    type Error = tonic::Status;

    fn encode(
        &mut self,
        item: MessageParts,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        use bytes::BufMut as _;
        dst.put(item.head);
        dst.put(item.body);
        Ok(())
    }
}

impl tonic::codec::Decoder for PreEncoded {
    type Item = StreamAccessLogsResponse;
    type Error = tonic::Status;

    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<StreamAccessLogsResponse>, tonic::Status> {
        StreamAccessLogsResponse::decode(src)
            .map(Some)
            .map_err(|e| tonic::Status::internal(format!("undecodable collector answer: {e}")))
    }
}

/// Which list of a `StreamAccessLogsMessage` a batch fills.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EntryKind {
    Http,
    Tcp,
}

impl EntryKind {
    /// The message's field number for the list (`http_logs`, `tcp_logs`).
    fn field(self) -> u32 {
        match self {
            EntryKind::Http => 2,
            EntryKind::Tcp => 3,
        }
    }
}

/// A full batch: the encoded body of `HTTPAccessLogEntries` or
/// `TCPAccessLogEntries` (each entry as a `log_entry` field), ready to be
/// framed into one message.
#[derive(Debug)]
struct Sealed {
    kind: EntryKind,
    count: u64,
    body: bytes::Bytes,
}

impl Sealed {
    /// The encoded `StreamAccessLogsMessage`: the identifier (on a stream's
    /// first message only, per the API), then the batch. Byte for byte
    /// what prost writes for the same message, without walking the
    /// entries again to measure them.
    fn message_parts(&self, identifier: Option<&Identifier>) -> MessageParts {
        use prost::encoding::{encode_key, encode_varint, encoded_len_varint, WireType};
        let head = identifier.map_or(0, |id| {
            let len = id.encoded_len();
            1 + encoded_len_varint(len as u64) + len
        });
        let mut out =
            bytes::BytesMut::with_capacity(head + 1 + encoded_len_varint(self.body.len() as u64));
        if let Some(id) = identifier {
            prost::encoding::message::encode(1, id, &mut out);
        }
        encode_key(self.kind.field(), WireType::LengthDelimited, &mut out);
        encode_varint(self.body.len() as u64, &mut out);
        MessageParts {
            head: out.freeze(),
            body: self.body.clone(),
        }
    }

    /// [`Sealed::message_parts`] joined: the message as one buffer.
    #[cfg(test)]
    fn message(&self, identifier: Option<&Identifier>) -> bytes::Bytes {
        let parts = self.message_parts(identifier);
        [parts.head, parts.body].concat().into()
    }
}

/// One kind's open batch: entries encoded as they arrive, so each is
/// measured and written once.
#[derive(Debug, Default)]
struct OpenBatch {
    body: Vec<u8>,
    count: u64,
}

/// Entries waiting for a message: one open batch per kind (the API sends
/// HTTP and TCP entries in separate messages), sealed when full or when
/// the oldest has waited `flush_interval`.
#[derive(Debug)]
struct Batcher {
    max_entries: usize,
    max_bytes: Option<usize>,
    flush_interval: Duration,
    http: OpenBatch,
    tcp: OpenBatch,
    deadline: Option<Instant>,
}

impl Batcher {
    fn new(config: &AlsConfig) -> Batcher {
        Batcher {
            // A batch larger than the buffer could never fill.
            max_entries: config.batch.min(config.buffer).max(1),
            max_bytes: config.batch_bytes,
            flush_interval: config.flush_interval,
            http: OpenBatch::default(),
            tcp: OpenBatch::default(),
            deadline: None,
        }
    }

    fn is_empty(&self) -> bool {
        self.http.count == 0 && self.tcp.count == 0
    }

    /// When the open batches must be sealed, if any is open.
    fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    fn batch(&mut self, kind: EntryKind) -> &mut OpenBatch {
        match kind {
            EntryKind::Http => &mut self.http,
            EntryKind::Tcp => &mut self.tcp,
        }
    }

    /// Adds an HTTP call; returns its batch if that is now full.
    fn push_http(
        &mut self,
        log: &CallLog,
        keep_headers: &[HeaderName],
        now: Instant,
    ) -> Option<Sealed> {
        self.push(EntryKind::Http, now, |out| {
            wire::push_http(out, log, keep_headers);
        })
    }

    /// Adds a TCP connection; returns its batch if that is now full.
    fn push_tcp(&mut self, log: &CallLog, now: Instant) -> Option<Sealed> {
        self.push(EntryKind::Tcp, now, |out| wire::push_tcp(out, log))
    }

    fn push(
        &mut self,
        kind: EntryKind,
        now: Instant,
        write_entry: impl FnOnce(&mut Vec<u8>),
    ) -> Option<Sealed> {
        self.start_clock(now);
        let (max_entries, max_bytes) = (self.max_entries, self.max_bytes);
        let batch = self.batch(kind);
        write_entry(&mut batch.body);
        batch.count += 1;
        let full = batch.count >= max_entries as u64
            || max_bytes.is_some_and(|max| batch.body.len() >= max);
        full.then(|| self.take(kind))
    }

    fn start_clock(&mut self, now: Instant) {
        if self.is_empty() {
            self.deadline = Some(now + self.flush_interval);
        }
    }

    fn take(&mut self, kind: EntryKind) -> Sealed {
        let open = self.batch(kind);
        // The next batch likely fills as far: sized for it up front, so it
        // is not grown from empty again.
        let next = OpenBatch {
            body: Vec::with_capacity(open.body.len()),
            count: 0,
        };
        let batch = std::mem::replace(open, next);
        if self.is_empty() {
            self.deadline = None;
        }
        Sealed {
            kind,
            count: batch.count,
            body: bytes::Bytes::from(batch.body),
        }
    }

    /// Seals every open batch.
    fn take_all(&mut self) -> Vec<Sealed> {
        let mut sealed = Vec::with_capacity(2);
        for kind in [EntryKind::Http, EntryKind::Tcp] {
            if self.batch(kind).count > 0 {
                sealed.push(self.take(kind));
            }
        }
        self.deadline = None;
        sealed
    }
}

/// Delays that double from `initial` up to `max`, each drawn from the upper
/// half of its step, so proxies that lost the collector together do not
/// all return at once.
#[derive(Debug)]
struct Backoff {
    initial: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    fn new(initial: Duration, max: Duration) -> Backoff {
        Backoff {
            initial,
            max: max.max(initial),
            attempt: 0,
        }
    }

    fn reset(&mut self) {
        self.attempt = 0;
    }

    fn next_delay(&mut self, rng: &mut impl Rng) -> Duration {
        // Past 2^16 steps any delay is capped anyway; the bound keeps the
        // multiplication in range.
        let step = self
            .initial
            .saturating_mul(1 << self.attempt.min(16))
            .min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        let half = step / 2;
        let spread = u64::try_from((step - half).as_nanos()).unwrap_or(u64::MAX);
        half + Duration::from_nanos(rng.random_range(0..=spread))
    }
}

/// What a sink's background task has done so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AlsProgress {
    /// Entries handed to a stream (not necessarily received: a stream that
    /// breaks loses what it had in flight).
    pub sent: u64,
    /// Streams opened, counting the first.
    pub streams: u64,
    /// A stream is open now.
    pub connected: bool,
}

/// A handle to one ALS stream and its queue. Cheap to clone; the stream
/// and its task end when the last clone is dropped, after trying (for up to
/// 5s) to send what is queued.
#[derive(Clone)]
pub struct AlsSink {
    inner: Arc<Inner>,
}

struct Inner {
    shared: Arc<Shared>,
    dropped: AtomicU64,
    dropped_total: Counter,
    progress: watch::Receiver<AlsProgress>,
    // Dropped with the last handle: tells a task that is connecting or
    // waiting to reconnect to stop.
    _stop: oneshot::Sender<()>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The last handle: the task sends what is left and ends the stream.
        self.shared.lock().closed = true;
        self.shared.wake.notify_one();
    }
}

/// What calls and the background task share.
struct Shared {
    state: std::sync::Mutex<State>,
    /// Wakes the task: a batch was sealed, a first entry started the flush
    /// clock, or the last handle went away.
    wake: Notify,
    /// Request headers copied into HTTP entries.
    keep_headers: Vec<HeaderName>,
    /// Entries that may wait for the stream (`buffer`).
    max_pending: usize,
}

struct State {
    batcher: Batcher,
    /// Sealed messages waiting for the stream, oldest first.
    sealed: VecDeque<Sealed>,
    /// Entries in open and sealed batches: calls not yet handed to a stream.
    pending: usize,
    /// No handle is left (or there never was a task): nothing more comes.
    closed: bool,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The oldest sealed message, no longer counted as pending.
    fn pop_sealed(&self) -> Option<Sealed> {
        let mut state = self.lock();
        let sealed = state.sealed.pop_front()?;
        state.pending = state.pending.saturating_sub(sealed.count as usize);
        Some(sealed)
    }

    /// Seals the open batches, for the flush clock or the last send.
    fn seal_all(&self) {
        let mut state = self.lock();
        let sealed = state.batcher.take_all();
        state.sealed.extend(sealed);
    }
}

impl fmt::Debug for AlsSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AlsSink")
            .field("progress", &*self.inner.progress.borrow())
            .field("dropped", &self.dropped())
            .finish_non_exhaustive()
    }
}

impl AlsSink {
    /// Starts the background task on the current tokio runtime; it connects
    /// to `config.address` and identifies as `node` with `config.log_name`.
    /// Expects a config that passed [`AlsConfig::validate`]: with an
    /// address tonic refuses, it logs an error and drops every call.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime.
    pub fn start(config: AlsConfig, node: Node) -> AlsSink {
        let shared = Arc::new(Shared {
            state: std::sync::Mutex::new(State {
                batcher: Batcher::new(&config),
                sealed: VecDeque::new(),
                pending: 0,
                closed: false,
            }),
            wake: Notify::new(),
            keep_headers: config
                .request_headers
                .iter()
                .filter_map(|name| HeaderName::from_bytes(name.as_bytes()).ok())
                .collect(),
            max_pending: config.buffer.clamp(1, MAX_BUFFER),
        });
        let (stop_tx, stop_rx) = oneshot::channel();
        let (progress_tx, progress_rx) = watch::channel(AlsProgress::default());
        let span =
            tracing::info_span!("als", address = %config.address, log_name = %config.log_name);
        match endpoint(&config.address) {
            Ok(endpoint) => {
                let worker = Worker {
                    endpoint,
                    identifier: Identifier {
                        node: Some(node),
                        log_name: config.log_name.clone(),
                    },
                    shared: shared.clone(),
                    stop: stop_rx,
                    backoff: Backoff::new(config.initial_backoff, config.max_backoff),
                    healthy_after: config.max_backoff,
                    failing: false,
                    progress: progress_tx,
                    sent_total: ::metrics::counter!(ENTRIES_SENT_TOTAL),
                    reconnects_total: ::metrics::counter!(RECONNECTS_TOTAL),
                    streams_active: ::metrics::gauge!(STREAMS_ACTIVE),
                };
                tokio::spawn(worker.run().instrument(span));
            }
            Err(e) => {
                let _entered = span.enter();
                tracing::error!(error = %ErrorChain(&e), "invalid access-log collector address; dropping every entry");
                shared.lock().closed = true;
            }
        }
        AlsSink {
            inner: Arc::new(Inner {
                shared,
                dropped: AtomicU64::new(0),
                dropped_total: ::metrics::counter!(ENTRIES_DROPPED_TOTAL),
                progress: progress_rx,
                _stop: stop_tx,
            }),
        }
    }

    /// Writes `log` into the open batch for the collector, or drops and
    /// counts it when `buffer` entries already wait. Never waits for the
    /// stream.
    ///
    /// The entry is encoded here rather than on the background task:
    /// handing each call over (moving it through a channel, waking the task,
    /// polling the stream's future) cost more than encoding it, and the
    /// task now wakes once per batch.
    pub fn send(&self, log: &CallLog) {
        let shared = &self.inner.shared;
        let mut state = shared.lock();
        if state.closed || state.pending >= shared.max_pending {
            // Full: the newest call is the one dropped, so a long outage
            // keeps the calls from its start.
            drop(state);
            self.inner.dropped.fetch_add(1, Ordering::Relaxed);
            self.inner.dropped_total.increment(1);
            return;
        }
        // The flush clock starts with a batch's first entry; only then is
        // the time read (the batcher ignores it otherwise).
        let first = state.batcher.is_empty();
        let now = match state.batcher.deadline() {
            Some(deadline) if !first => deadline,
            _ => Instant::now(),
        };
        let sealed = match log.kind {
            CallKind::Http => state.batcher.push_http(log, &shared.keep_headers, now),
            CallKind::Tcp => state.batcher.push_tcp(log, now),
        };
        state.pending += 1;
        let wake = first || sealed.is_some();
        state.sealed.extend(sealed);
        drop(state);
        if wake {
            shared.wake.notify_one();
        }
    }

    /// Like [`AlsSink::send`]; kept for callers that own the record.
    pub fn send_owned(&self, log: CallLog) {
        self.send(&log);
    }

    /// Calls dropped by this sink (and its clones) so far.
    pub fn dropped(&self) -> u64 {
        self.inner.dropped.load(Ordering::Relaxed)
    }

    /// What the background task has done so far.
    pub fn progress(&self) -> AlsProgress {
        *self.inner.progress.borrow()
    }

    /// A receiver that sees [`AlsProgress`] change, for waiting on a
    /// condition without polling.
    pub fn watch_progress(&self) -> watch::Receiver<AlsProgress> {
        self.inner.progress.clone()
    }

    /// Waits until at least `count` entries were handed to a stream; false
    /// if the task ended first.
    pub async fn wait_sent(&self, count: u64) -> bool {
        let mut progress = self.inner.progress.clone();
        let reached = progress.wait_for(|p| p.sent >= count).await.is_ok();
        reached
    }
}

fn endpoint(address: &str) -> Result<tonic::transport::Endpoint, tonic::transport::Error> {
    Ok(tonic::transport::Endpoint::from_shared(address.to_owned())?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true))
}

/// Why a stream ended.
#[derive(Debug, thiserror::Error)]
enum StreamError {
    /// The connection failed.
    #[error("cannot connect to the access-log collector")]
    Connect(#[source] tonic::transport::Error),
    /// The collector refused the stream, or it failed midway.
    #[error("access-log stream failed")]
    Status(#[source] Box<tonic::Status>),
    /// The collector ended the stream.
    #[error("the access-log collector closed the stream")]
    Closed,
}

/// Displays an error with its sources, `a: b: c`.
struct ErrorChain<'a>(&'a dyn std::error::Error);

impl fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(cause) = source {
            write!(f, ": {cause}")?;
            source = cause.source();
        }
        Ok(())
    }
}

/// How one stream ended.
enum End {
    /// Every sink handle is gone and the queue is done with.
    SinkClosed,
    /// The stream failed; `opened` is when it was connected, if it was.
    Failed {
        opened: Option<Instant>,
        error: StreamError,
    },
}

/// The background task of one sink.
struct Worker {
    endpoint: tonic::transport::Endpoint,
    identifier: Identifier,
    shared: Arc<Shared>,
    stop: oneshot::Receiver<()>,
    backoff: Backoff,
    healthy_after: Duration,
    /// The last attempt failed too; further failures log at debug.
    failing: bool,
    progress: watch::Sender<AlsProgress>,
    sent_total: Counter,
    reconnects_total: Counter,
    streams_active: Gauge,
}

/// Counts an open stream in the gauge and progress while it lives.
struct OpenStream {
    gauge: Gauge,
    progress: watch::Sender<AlsProgress>,
}

impl OpenStream {
    fn new(gauge: &Gauge, progress: &watch::Sender<AlsProgress>) -> OpenStream {
        gauge.increment(1.0);
        progress.send_modify(|p| {
            p.streams += 1;
            p.connected = true;
        });
        OpenStream {
            gauge: gauge.clone(),
            progress: progress.clone(),
        }
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.gauge.decrement(1.0);
        self.progress.send_modify(|p| p.connected = false);
    }
}

impl Worker {
    async fn run(mut self) {
        let mut first = true;
        loop {
            if !first {
                self.reconnects_total.increment(1);
            }
            first = false;
            let (opened, error) = match self.stream().await {
                End::SinkClosed => return,
                End::Failed { opened, error } => (opened, error),
            };
            if opened.is_some_and(|at| at.elapsed() >= self.healthy_after) {
                self.backoff.reset();
            }
            let delay = self.backoff.next_delay(&mut rand::rng());
            let queued = self.shared.lock().pending;
            if self.failing {
                tracing::debug!(?delay, queued, error = %ErrorChain(&error), "access-log stream still failing; retrying");
            } else {
                tracing::warn!(?delay, queued, error = %ErrorChain(&error), "access-log stream failed; reconnecting, and dropping entries once the queue is full");
            }
            self.failing = true;
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                _ = &mut self.stop => return,
            }
        }
    }

    /// Connects and runs one stream until it fails or the sink is closed.
    async fn stream(&mut self) -> End {
        let channel = tokio::select! {
            connected = self.endpoint.connect() => match connected {
                Ok(channel) => channel,
                Err(e) => return End::Failed { opened: None, error: StreamError::Connect(e) },
            },
            _ = &mut self.stop => return End::SinkClosed,
        };
        let opened = Instant::now();
        let _open = OpenStream::new(&self.streams_active, &self.progress);
        if std::mem::take(&mut self.failing) {
            tracing::info!("access-log stream open again");
        } else {
            tracing::debug!("access-log stream open");
        }
        let mut grpc = tonic::client::Grpc::new(channel);
        // One message in hand: the stream's flow control, not this
        // channel, decides how fast the collector is fed, and a slow one
        // makes the queue (not memory here) fill up.
        let (tx, mut rx) = mpsc::channel::<MessageParts>(1);
        let requests = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
        let call = async move {
            grpc.ready()
                .await
                .map_err(|e| tonic::Status::unavailable(format!("collector not ready: {e}")))?;
            let path = http::uri::PathAndQuery::from_static(STREAM_ACCESS_LOGS);
            grpc.client_streaming(tonic::Request::new(requests), path, PreEncoded)
                .await
        };
        tokio::pin!(call);
        let failed = |result: Result<tonic::Response<StreamAccessLogsResponse>, tonic::Status>| {
            let error = match result {
                Ok(_) => StreamError::Closed,
                Err(status) => StreamError::Status(Box::new(status)),
            };
            End::Failed {
                opened: Some(opened),
                error,
            }
        };
        // Per the API, only a stream's first message carries it.
        let mut identifier = Some(self.identifier.clone());
        let mut closing = false;
        loop {
            let (has_sealed, deadline, closed) = {
                let state = self.shared.lock();
                (
                    !state.sealed.is_empty(),
                    state.batcher.deadline(),
                    state.closed,
                )
            };
            if has_sealed {
                tokio::select! {
                    biased;
                    result = &mut call => return failed(result),
                    permit = tx.reserve() => {
                        let Ok(permit) = permit else {
                            return End::Failed { opened: Some(opened), error: StreamError::Closed };
                        };
                        let Some(sealed) = self.shared.pop_sealed() else { continue };
                        let count = sealed.count;
                        permit.send(sealed.message_parts(identifier.take().as_ref()));
                        self.sent_total.increment(count);
                        self.progress.send_modify(|p| p.sent += count);
                    }
                }
            } else if closing {
                drop(tx);
                // The request stream has ended; the collector answers once
                // it has read everything.
                let _ = tokio::time::timeout(CLOSE_TIMEOUT, call).await;
                return End::SinkClosed;
            } else if closed {
                // Every handle is gone: what is open goes out, then the end.
                closing = true;
                self.shared.seal_all();
            } else {
                tokio::select! {
                    biased;
                    result = &mut call => return failed(result),
                    () = self.shared.wake.notified() => {}
                    () = sleep_until(deadline), if deadline.is_some() => {
                        self.shared.seal_all();
                    }
                }
            }
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

//! Metric names, described once. Labels are config names (listener, route,
//! cluster), status codes and fixed reasons: never paths, IPs or ids.

/// HTTP requests finished, by `listener`, `route`, `cluster`, `code`, `flags`.
pub const HTTP_REQUESTS_TOTAL: &str = "postern_http_requests_total";
/// HTTP request duration until the response ends, by `listener`, `route`, `cluster`.
pub const HTTP_REQUEST_DURATION_SECONDS: &str = "postern_http_request_duration_seconds";
/// Downstream connections accepted, by `listener`.
pub const DOWNSTREAM_CONNECTIONS_TOTAL: &str = "postern_downstream_connections_total";
/// Downstream connections open now, by `listener`.
pub const DOWNSTREAM_CONNECTIONS_ACTIVE: &str = "postern_downstream_connections_active";
/// Downstream requests or connections refused by a limit, by `listener`, `limit`.
pub const DOWNSTREAM_LIMIT_REJECTIONS_TOTAL: &str = "postern_downstream_limit_rejections_total";
/// Idle HTTP/1 connections whose hyper buffers were let go, by `listener`.
pub const DOWNSTREAM_CONNECTIONS_PARKED_TOTAL: &str = "postern_downstream_connections_parked_total";
/// Upstream connections open now (HTTP and TCP proxy), by `cluster`.
pub const UPSTREAM_CONNECTIONS_ACTIVE: &str = "postern_upstream_connections_active";
/// Upstream connect failures (refused, timed out, handshake), by `cluster`.
pub const UPSTREAM_CONNECT_FAILURES_TOTAL: &str = "postern_upstream_connect_failures_total";
/// Upstream tries beyond the first, by `cluster`. Retries the budget refused
/// count in `postern_upstream_overflow_total{resource="retries"}`.
pub const UPSTREAM_RETRIES_TOTAL: &str = "postern_upstream_retries_total";
/// Upstream timeouts (route or per try), by `cluster`.
pub const UPSTREAM_TIMEOUTS_TOTAL: &str = "postern_upstream_timeouts_total";
/// Upstream resets and protocol errors, by `cluster`.
pub const UPSTREAM_RESETS_TOTAL: &str = "postern_upstream_resets_total";
/// Circuit-breaker trips, by `cluster` and `resource` (requests, pending requests, retries).
pub const UPSTREAM_OVERFLOW_TOTAL: &str = "postern_upstream_overflow_total";
/// Rounds of DNS lookups of a DNS-named cluster, by `cluster` and `result`
/// (`success`, or `failure` when a name kept its last addresses).
pub const DNS_RESOLUTIONS_TOTAL: &str = "postern_dns_resolutions_total";
/// Outlier ejections, by `cluster` and `reason`.
pub const OUTLIER_EJECTIONS_TOTAL: &str = "postern_outlier_ejections_total";
/// TCP proxy connections finished, by `listener`, `cluster`.
pub const TCP_CONNECTIONS_TOTAL: &str = "postern_tcp_connections_total";
/// TCP proxy bytes, by `listener`, `direction` (`upstream`/`downstream`).
pub const TCP_BYTES_TOTAL: &str = "postern_tcp_bytes_total";

/// Downstream TLS connections refused, by `listener`, `reason` (`plaintext`,
/// `no_client_cert`, `untrusted_ca`, `expired`, `not_yet_valid`,
/// `wrong_identity`, `no_spiffe_id`, `bad_certificate`, `handshake_timeout`,
/// `handshake`, `closed`).
pub const DOWNSTREAM_TLS_FAILURES_TOTAL: &str = "postern_downstream_tls_failures_total";
/// Connections closed because none of the listener's filter chains matched
/// them and it has no default chain, by `listener` (Envoy's
/// `no_filter_chain_match`).
pub const DOWNSTREAM_NO_FILTER_CHAIN_TOTAL: &str = "postern_downstream_no_filter_chain_total";
/// Upstream TLS handshakes failed, by `cluster`, `reason` (as downstream, plus
/// `peer_rejected` when the server refused our certificate).
pub const UPSTREAM_TLS_FAILURES_TOTAL: &str = "postern_upstream_tls_failures_total";

/// JWT authentication outcomes, by `listener`, `result` (`verified`,
/// `none`: no token needed and none given, `missing`, `invalid`).
pub const JWT_AUTHN_TOTAL: &str = "postern_jwt_authn_total";
/// Requests refused by RBAC, by `listener`, `policy` (`none`: no allow policy matched).
pub const RBAC_DENIALS_TOTAL: &str = "postern_rbac_denials_total";
/// Requests the shadow rules would have refused, by `listener`, `policy`.
pub const RBAC_SHADOW_DENIALS_TOTAL: &str = "postern_rbac_shadow_denials_total";

/// Requests a local rate limit refused (or would have, `mode="shadow"`), by
/// `listener`, `scope` (`listener` or the route name), `mode`.
pub const RATELIMIT_LIMITED_TOTAL: &str = "postern_ratelimit_limited_total";
/// Requests that asked the global rate-limit service, by `listener` and
/// `result`: `ok`, `over_limit` (refused, 429), `error` (the service failed
/// and `failure_mode_deny` refused the request, 500) or
/// `failure_mode_allowed` (the service failed and the request passed).
pub const RATELIMIT_GLOBAL_TOTAL: &str = "postern_ratelimit_global_total";

/// Trace spans the OTLP collector accepted.
pub const TRACING_SPANS_EXPORTED_TOTAL: &str = "postern_tracing_spans_exported_total";
/// Trace spans lost, by `reason`: `queue_full` (the export queue was full
/// when the call ended), `export_failed` (the collector did not take the
/// batch in time), `shutdown` (the export task had stopped).
pub const TRACING_SPANS_DROPPED_TOTAL: &str = "postern_tracing_spans_dropped_total";

/// Captured connections by how their protocol was told, by `listener`,
/// `result` (`http1`, `http2`, `tls`, `opaque`, `timeout`: the client sent
/// nothing decisive in time).
pub const PROTOCOL_DETECTION_TOTAL: &str = "postern_protocol_detection_total";
/// Where the running config came from: 1 for the current `source`
/// (`static`, `xds`, `last_known_good`), 0 for the others.
pub const CONFIG_SOURCE: &str = "postern_config_source";

/// The overload state: 0 normal, 1 shedding requests, 2 accepting paused.
pub const OVERLOAD_STATE: &str = "postern_overload_state";
/// Resident memory as the overload sampler last read it (only with
/// `overload.max_rss_bytes`).
pub const OVERLOAD_RSS_BYTES: &str = "postern_overload_rss_bytes";
/// Requests answered 503 because the process was overloaded, by `listener`.
pub const OVERLOAD_SHED_REQUESTS_TOTAL: &str = "postern_overload_shed_requests_total";
/// TCP-proxy connections closed at accept because the process was
/// overloaded, by `listener`.
pub const OVERLOAD_SHED_CONNECTIONS_TOTAL: &str = "postern_overload_shed_connections_total";
/// Changes of the overload state, by `from` and `to` (`normal`,
/// `shedding`, `accept_paused`).
pub const OVERLOAD_TRANSITIONS_TOTAL: &str = "postern_overload_transitions_total";

/// Buckets for request durations, in seconds.
pub const DURATION_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Request durations, by `listener`, `route`, `cluster`.
pub static HTTP_REQUEST_DURATION_FAMILY: super::histogram::Family = super::histogram::Family::new(
    HTTP_REQUEST_DURATION_SECONDS,
    "HTTP request duration until the response ends",
    DURATION_BUCKETS,
);

/// Describes every metric to the installed recorder.
pub fn describe() {
    use metrics::{describe_counter, describe_gauge, Unit};
    describe_counter!(HTTP_REQUESTS_TOTAL, "HTTP requests finished");
    describe_counter!(
        DOWNSTREAM_TLS_FAILURES_TOTAL,
        "Downstream TLS connections refused, by reason"
    );
    describe_counter!(
        DOWNSTREAM_NO_FILTER_CHAIN_TOTAL,
        "Connections closed because no filter chain matched them"
    );
    describe_counter!(
        UPSTREAM_TLS_FAILURES_TOTAL,
        "Upstream TLS handshakes that failed, by reason"
    );
    describe_counter!(RBAC_DENIALS_TOTAL, "Requests refused by RBAC, by policy");
    describe_counter!(JWT_AUTHN_TOTAL, "JWT authentication outcomes");
    describe_counter!(
        RATELIMIT_LIMITED_TOTAL,
        "Requests refused by a local rate limit (mode=shadow: would have been)"
    );
    describe_counter!(
        RATELIMIT_GLOBAL_TOTAL,
        "Requests that asked the global rate-limit service, by result"
    );
    describe_counter!(
        RBAC_SHADOW_DENIALS_TOTAL,
        "Requests RBAC shadow rules would have refused, by policy"
    );
    postern_certs::rotation::metric::describe();
    postern_xds::metric::describe();
    super::trace::describe();
    describe_counter!(
        DOWNSTREAM_CONNECTIONS_TOTAL,
        "Downstream connections accepted"
    );
    describe_gauge!(DOWNSTREAM_CONNECTIONS_ACTIVE, "Downstream connections open");
    describe_counter!(
        DOWNSTREAM_LIMIT_REJECTIONS_TOTAL,
        "Downstream requests or connections refused by a limit"
    );
    describe_counter!(
        DOWNSTREAM_CONNECTIONS_PARKED_TOTAL,
        "Idle HTTP/1 connections whose per-connection buffers were released"
    );
    describe_gauge!(UPSTREAM_CONNECTIONS_ACTIVE, "Upstream connections open");
    describe_counter!(UPSTREAM_CONNECT_FAILURES_TOTAL, "Upstream connect failures");
    describe_counter!(UPSTREAM_RETRIES_TOTAL, "Upstream retries");
    describe_counter!(
        UPSTREAM_TIMEOUTS_TOTAL,
        "Upstream timeouts (route or per try)"
    );
    describe_counter!(UPSTREAM_RESETS_TOTAL, "Upstream resets and protocol errors");
    describe_counter!(UPSTREAM_OVERFLOW_TOTAL, "Circuit-breaker trips");
    describe_counter!(OUTLIER_EJECTIONS_TOTAL, "Outlier ejections");
    describe_counter!(
        DNS_RESOLUTIONS_TOTAL,
        "Rounds of DNS lookups of DNS-named clusters, by result"
    );
    describe_counter!(TCP_CONNECTIONS_TOTAL, "TCP proxy connections finished");
    describe_counter!(TCP_BYTES_TOTAL, Unit::Bytes, "TCP proxy bytes");
    describe_counter!(
        PROTOCOL_DETECTION_TOTAL,
        "Captured connections by detected protocol (timeout: proxied as opaque after waiting)"
    );
    describe_gauge!(
        OVERLOAD_STATE,
        "Overload state: 0 normal, 1 shedding requests, 2 accepting paused"
    );
    describe_gauge!(
        OVERLOAD_RSS_BYTES,
        Unit::Bytes,
        "Resident memory as the overload sampler last read it"
    );
    describe_counter!(
        OVERLOAD_SHED_REQUESTS_TOTAL,
        "Requests answered 503 because the process was overloaded"
    );
    describe_counter!(
        OVERLOAD_SHED_CONNECTIONS_TOTAL,
        "TCP-proxy connections closed at accept because the process was overloaded"
    );
    describe_counter!(
        OVERLOAD_TRANSITIONS_TOTAL,
        "Overload state changes, by from and to state"
    );
    describe_gauge!(
        CONFIG_SOURCE,
        "1 for where the running config came from (static, xds, last_known_good)"
    );
}

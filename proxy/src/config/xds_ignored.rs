//! Envoy fields that change behaviour and that Postern does not implement:
//! set to anything but their default (or zero, as control planes such as
//! istiod write them), each is an error naming the field, so the update is
//! NACKed instead of silently running differently from what was asked.
//! Where Postern has an equivalent setting, the field maps onto it instead.

use super::*;

fn set_u32(v: &Option<postern_proto::google::protobuf::UInt32Value>) -> bool {
    v.as_ref().is_some_and(|v| v.value > 0)
}

fn nonzero(d: &Option<postern_proto::google::protobuf::Duration>) -> bool {
    d.as_ref().is_some_and(|d| d.seconds != 0 || d.nanos != 0)
}

/// VirtualHost: policies that would apply to every route of the host.
pub(super) fn virtual_host(vh: &route::VirtualHost, path: &str, ctx: &mut Ctx) {
    if vh.retry_policy.is_some() || vh.retry_policy_typed_config.is_some() {
        ctx.unsupported(format!("{path}.retry_policy (set it on each route)"));
    }
    if vh.hedge_policy.is_some() {
        ctx.unsupported(format!("{path}.hedge_policy"));
    }
    if !vh.request_mirror_policies.is_empty() {
        ctx.unsupported(format!("{path}.request_mirror_policies"));
    }
}

/// RouteAction: timeouts, hedging, redirects and upgrade switches.
pub(super) fn route_action(a: &route::RouteAction, path: &str, ctx: &mut Ctx) {
    // Zero means "no per-stream idle timeout", which leaves the listener's.
    if nonzero(&a.idle_timeout) {
        ctx.unsupported(format!(
            "{path}.idle_timeout (the listener's idle timeout applies)"
        ));
    }
    // istiod writes `{max_stream_duration: 0s, grpc_timeout_header_max: 0s}`
    // on every route: zeros stay accepted.
    if let Some(m) = &a.max_stream_duration {
        for (field, value) in [
            ("max_stream_duration", &m.max_stream_duration),
            ("grpc_timeout_header_max", &m.grpc_timeout_header_max),
            ("grpc_timeout_header_offset", &m.grpc_timeout_header_offset),
        ] {
            if nonzero(value) {
                ctx.unsupported(format!("{path}.max_stream_duration.{field}"));
            }
        }
    }
    #[allow(deprecated)]
    if nonzero(&a.max_grpc_timeout) || nonzero(&a.grpc_timeout_offset) {
        ctx.unsupported(format!("{path}.max_grpc_timeout"));
    }
    // Every upgrade is proxied on every route already; only turning one
    // off, or CONNECT termination, would change that.
    for (i, upgrade) in a.upgrade_configs.iter().enumerate() {
        if upgrade.enabled.as_ref().is_some_and(|e| !e.value) {
            ctx.unsupported(format!(
                "{path}.upgrade_configs[{i}].enabled: false (upgrades are always proxied)"
            ));
        }
        if upgrade.connect_config.is_some() {
            ctx.unsupported(format!("{path}.upgrade_configs[{i}].connect_config"));
        }
    }
    #[allow(deprecated)]
    if a.internal_redirect_policy.is_some() || a.internal_redirect_action != 0 {
        ctx.unsupported(format!("{path}.internal_redirect_policy"));
    }
    if a.hedge_policy.is_some() {
        ctx.unsupported(format!("{path}.hedge_policy"));
    }
}

/// Cluster: load-balancer settings and outlier detection beyond what the
/// cluster manager does (consecutive 5xx and connect failures, ejection
/// times and percentage).
pub(super) fn cluster(c: &cluster::Cluster, ctx: &mut Ctx) {
    if c.lb_subset_config
        .as_ref()
        .is_some_and(|s| !s.subset_selectors.is_empty())
    {
        ctx.unsupported("lb_subset_config");
    }
    if let Some(common) = &c.common_lb_config {
        // Postern has no panic mode: 0 (istiod's default with outlier
        // detection) is what it does.
        if common
            .healthy_panic_threshold
            .as_ref()
            .is_some_and(|p| p.value > 0.0)
        {
            ctx.unsupported("common_lb_config.healthy_panic_threshold (only 0)");
        }
        if common.locality_config_specifier.is_some() {
            ctx.unsupported("common_lb_config.locality_config_specifier");
        }
        if common.consistent_hashing_lb_config.is_some() {
            ctx.unsupported("common_lb_config.consistent_hashing_lb_config");
        }
        if common.override_host_status.is_some() {
            ctx.unsupported("common_lb_config.override_host_status");
        }
        if common.close_connections_on_host_set_change {
            ctx.unsupported("common_lb_config.close_connections_on_host_set_change");
        }
    }
    if let Some(od) = &c.outlier_detection {
        let path = "outlier_detection";
        // Envoy tracks 5xx unless enforcing is 0; istiod writes 0 next to a
        // disabled consecutive_5xx, and 100 otherwise.
        if let Some(enforcing) = &od.enforcing_consecutive_5xx {
            let disabled = od.consecutive_5xx.as_ref().is_some_and(|v| v.value == 0);
            if enforcing.value != 100 && !(enforcing.value == 0 && disabled) {
                ctx.unsupported(format!(
                    "{path}.enforcing_consecutive_5xx (only 100, or 0 with consecutive_5xx 0)"
                ));
            }
        }
        if set_u32(&od.enforcing_success_rate)
            || od.success_rate_minimum_hosts.is_some()
            || od.success_rate_request_volume.is_some()
            || od.success_rate_stdev_factor.is_some()
            || set_u32(&od.enforcing_local_origin_success_rate)
        {
            ctx.unsupported(format!("{path}: success-rate ejection"));
        }
        if set_u32(&od.enforcing_consecutive_gateway_failure) {
            ctx.unsupported(format!("{path}.enforcing_consecutive_gateway_failure"));
        }
        if set_u32(&od.enforcing_failure_percentage)
            || set_u32(&od.enforcing_failure_percentage_local_origin)
        {
            ctx.unsupported(format!("{path}: failure-percentage ejection"));
        }
        if let Some(enforcing) = &od.enforcing_consecutive_local_origin_failure {
            if enforcing.value != 100 && enforcing.value != 0 {
                ctx.unsupported(format!(
                    "{path}.enforcing_consecutive_local_origin_failure (only 0 or 100)"
                ));
            }
        }
        if !od.monitors.is_empty() {
            ctx.unsupported(format!("{path}.monitors"));
        }
    }
}

/// HttpConnectionManager: codec, client-certificate forwarding, trusted
/// hops and stream timeouts. `stream_idle_timeout` maps onto the
/// listener's idle timeout, which covers a request with no byte moving.
pub(super) fn connection_manager(
    m: &hcm::HttpConnectionManager,
    path: &str,
    file: &mut ListenerFile,
    ctx: &mut Ctx,
) {
    use hcm::http_connection_manager::{CodecType, ForwardClientCertDetails as Fcc};
    if m.codec_type != CodecType::Auto as i32 {
        ctx.unsupported(format!(
            "{path}.codec_type {} (only AUTO: the protocol is detected)",
            m.codec_type
        ));
    }
    // Postern replaces a client's x-forwarded-client-cert with the mTLS
    // peer's (SANITIZE_SET) and appends to a trusted downstream's
    // (APPEND_FORWARD, as istiod sets on inbound listeners).
    let fcc = m.forward_client_cert_details;
    if ![Fcc::Sanitize, Fcc::AppendForward, Fcc::SanitizeSet]
        .iter()
        .any(|known| *known as i32 == fcc)
    {
        ctx.unsupported(format!(
            "{path}.forward_client_cert_details {fcc} (only SANITIZE, APPEND_FORWARD, SANITIZE_SET)"
        ));
    }
    if m.xff_num_trusted_hops != 0 {
        ctx.unsupported(format!(
            "{path}.xff_num_trusted_hops (only 0; use_remote_address: false trusts the downstream)"
        ));
    }
    if nonzero(&m.request_timeout) {
        ctx.unsupported(format!(
            "{path}.request_timeout (request_headers_timeout and the route timeout exist)"
        ));
    }
    // Zero (istiod's inbound default) would disable it: the listener's
    // idle timeout stays, as it always did.
    if let Some(stream_idle) = m.stream_idle_timeout.as_ref().and_then(duration) {
        let connection_idle = m
            .common_http_protocol_options
            .as_ref()
            .and_then(|o| o.idle_timeout.as_ref())
            .and_then(duration)
            .filter(|d| !d.is_zero());
        match connection_idle {
            _ if stream_idle.is_zero() => {}
            None => file.limits.idle_timeout = stream_idle,
            Some(idle) if idle == stream_idle => {}
            Some(_) => ctx.unsupported(format!(
                "{path}.stream_idle_timeout different from common_http_protocol_options.idle_timeout (one idle timeout covers both)"
            )),
        }
    }
    for (i, upgrade) in m.upgrade_configs.iter().enumerate() {
        if upgrade.enabled.as_ref().is_some_and(|e| !e.value) {
            ctx.unsupported(format!(
                "{path}.upgrade_configs[{i}].enabled: false (upgrades are always proxied)"
            ));
        }
        if !upgrade.filters.is_empty() {
            ctx.unsupported(format!("{path}.upgrade_configs[{i}].filters"));
        }
    }
}

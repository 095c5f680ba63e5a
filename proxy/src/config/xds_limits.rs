//! Rate-limit filters from xDS beyond the HTTP listener's own: the network
//! `local_ratelimit` filter in front of a `tcp_proxy`. Kept apart from the
//! filter-chain code so each stays small.

use super::*;

/// Type URL of the network local rate limit filter's config.
pub(super) const NETWORK_LOCAL_RATELIMIT_TYPE: &str =
    "type.googleapis.com/envoy.extensions.filters.network.local_ratelimit.v3.LocalRateLimit";

/// Takes the network local rate limit filter out of a filter chain: the
/// chain without it, and the limit (`None` when turned off). `None` when
/// the chain has no such filter.
///
/// Postern takes the token at accept, before the TLS handshake and network
/// RBAC, so the filter must come first: after RBAC it would mean "only
/// connections RBAC allows spend tokens", which is not what happens here.
pub(super) fn split_network_limit(
    chain: &listener::FilterChain,
    cpath: &str,
    ctx: &mut Ctx,
) -> Option<(Option<LocalRateLimitFile>, listener::FilterChain)> {
    let is_limit = |f: &listener::Filter| {
        matches!(
            &f.config_type,
            Some(listener::filter::ConfigType::TypedConfig(any))
                if any.type_url == NETWORK_LOCAL_RATELIMIT_TYPE
        )
    };
    let at: Vec<usize> = (0..chain.filters.len())
        .filter(|&i| is_limit(&chain.filters[i]))
        .collect();
    let first = *at.first()?;
    for &i in &at[1..] {
        ctx.unsupported(format!(
            "{cpath}.filters[{i}] (a second network local rate limit filter)"
        ));
    }
    if first != 0 {
        ctx.unsupported(format!(
            "{cpath}.filters[{first}] (a network local rate limit filter must come first: Postern counts connections at accept)"
        ));
    }
    let limit = match &chain.filters[first].config_type {
        Some(listener::filter::ConfigType::TypedConfig(any)) => {
            network_limit(any, &format!("{cpath}.filters[{first}].typed_config"), ctx)
        }
        _ => None,
    };
    let rest = listener::FilterChain {
        filters: chain
            .filters
            .iter()
            .filter(|f| !is_limit(f))
            .cloned()
            .collect(),
        ..chain.clone()
    };
    Some((limit, rest))
}

/// Puts the limit taken by [`split_network_limit`] on the TCP listener the
/// rest of the chain made; anything else is refused.
pub(super) fn attach_network_limit(
    file: &mut ListenerFile,
    limit: Option<LocalRateLimitFile>,
    cpath: &str,
    ctx: &mut Ctx,
) {
    match &mut file.tcp {
        Some(tcp) => tcp.local_rate_limit = limit,
        None => ctx.unsupported(format!(
            "{cpath}.filters[0] (a network local rate limit filter only before a tcp_proxy)"
        )),
    }
}

/// The network filter's config: one shared bucket, a token per connection.
fn network_limit(any: &Any, path: &str, ctx: &mut Ctx) -> Option<LocalRateLimitFile> {
    use postern_proto::envoy::extensions::filters::network::local_ratelimit::v3::LocalRateLimit;
    let config: LocalRateLimit = match decode(any, NETWORK_LOCAL_RATELIMIT_TYPE) {
        Ok(config) => config,
        Err(problems) => {
            ctx.err(path, problems.join("; "));
            return None;
        }
    };
    if !config.share_key.is_empty() {
        ctx.unsupported(format!("{path}.share_key"));
    }
    // Unset means on; set, its default decides (the runtime key is ignored:
    // Postern has no runtime layer).
    if let Some(flag) = &config.runtime_enabled {
        match &flag.default_value {
            None => {
                ctx.err(
                    format!("{path}.runtime_enabled.default_value"),
                    "is required",
                );
                return None;
            }
            Some(enabled) if !enabled.value => return None,
            Some(_) => {}
        }
    }
    let Some(bucket) = &config.token_bucket else {
        ctx.err(format!("{path}.token_bucket"), "is required");
        return None;
    };
    let Some(fill_interval) = bucket.fill_interval.as_ref().and_then(duration) else {
        ctx.err(format!("{path}.token_bucket.fill_interval"), "is required");
        return None;
    };
    if bucket.max_tokens == 0 {
        ctx.err(
            format!("{path}.token_bucket.max_tokens"),
            "must be more than 0",
        );
        return None;
    }
    Some(LocalRateLimitFile {
        max_tokens: bucket.max_tokens,
        // Envoy's default is one token per interval.
        tokens_per_fill: Some(bucket.tokens_per_fill.as_ref().map_or(1, |t| t.value)),
        fill_interval,
        key: None,
        shadow: false,
        max_keys: 1,
        descriptors: Vec::new(),
        stage: 0,
        rate_limits: Vec::new(),
        always_consume_default: true,
    })
}

/// The descriptor part of an HTTP `local_ratelimit` config: Envoy's
/// `descriptors`, `stage`, the filter's own `rate_limits`,
/// `always_consume_default_token_bucket` and `max_dynamic_descriptors`
/// onto `limit`. An entry with an empty value takes any value, one bucket
/// per value, as Envoy's dynamic descriptors; what has no equivalent is
/// NACKed by name.
pub(super) fn http_descriptors(
    config: &postern_proto::envoy::extensions::filters::http::local_ratelimit::v3::LocalRateLimit,
    limit: &mut LocalRateLimitFile,
    path: &str,
    ctx: &mut Ctx,
) {
    if config.local_cluster_rate_limit.is_some() {
        ctx.unsupported(format!("{path}.local_cluster_rate_limit"));
    }
    // The route's `rate_limits` are already the virtual host's when it
    // has none (OVERRIDE); the other two would need both lists here.
    if config.vh_rate_limits != 0 {
        ctx.unsupported(format!("{path}.vh_rate_limits (only OVERRIDE)"));
    }
    limit.stage = config.stage;
    limit.always_consume_default = config
        .always_consume_default_token_bucket
        .as_ref()
        .is_none_or(|b| b.value);
    limit.rate_limits =
        super::rate_limits(&config.rate_limits, &format!("{path}.rate_limits"), ctx);
    // Envoy's default, at least 1.
    let max_keys = config
        .max_dynamic_descriptors
        .as_ref()
        .map_or(20, |m| usize::try_from(m.value).unwrap_or(usize::MAX))
        .max(1);
    limit.descriptors = config
        .descriptors
        .iter()
        .enumerate()
        .filter_map(|(i, d)| {
            let dpath = format!("{path}.descriptors[{i}]");
            if d.entries.is_empty() {
                ctx.err(format!("{dpath}.entries"), "needs at least one entry");
                return None;
            }
            let Some(bucket) = &d.token_bucket else {
                ctx.err(format!("{dpath}.token_bucket"), "is required");
                return None;
            };
            let Some(fill_interval) = bucket.fill_interval.as_ref().and_then(duration) else {
                ctx.err(format!("{dpath}.token_bucket.fill_interval"), "is required");
                return None;
            };
            Some(LocalDescriptorFile {
                entries: d
                    .entries
                    .iter()
                    .map(|e| DescriptorEntryFile {
                        key: e.key.clone(),
                        value: Some(e.value.clone()).filter(|v| !v.is_empty()),
                    })
                    .collect(),
                max_tokens: bucket.max_tokens,
                tokens_per_fill: Some(bucket.tokens_per_fill.as_ref().map_or(1, |t| t.value)),
                fill_interval,
                shadow: d.shadow_mode,
                max_keys,
            })
        })
        .collect();
}

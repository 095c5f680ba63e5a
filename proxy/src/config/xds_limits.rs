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

/// A bucket's size, refill and interval from Envoy's `TokenBucket` at
/// `path` (one token per interval unless it says otherwise); `None` once
/// what is missing is recorded.
pub(super) fn token_bucket(
    bucket: Option<&postern_proto::envoy::r#type::v3::TokenBucket>,
    path: &str,
    ctx: &mut Ctx,
) -> Option<(u32, u32, Duration)> {
    let Some(bucket) = bucket else {
        ctx.err(path, "is required");
        return None;
    };
    let Some(fill_interval) = bucket.fill_interval.as_ref().and_then(duration) else {
        ctx.err(format!("{path}.fill_interval"), "is required");
        return None;
    };
    let tokens_per_fill = bucket.tokens_per_fill.as_ref().map_or(1, |t| t.value);
    Some((bucket.max_tokens, tokens_per_fill, fill_interval))
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
    let (max_tokens, tokens_per_fill, fill_interval) = token_bucket(
        config.token_bucket.as_ref(),
        &format!("{path}.token_bucket"),
        ctx,
    )?;
    if max_tokens == 0 {
        ctx.err(
            format!("{path}.token_bucket.max_tokens"),
            "must be more than 0",
        );
        return None;
    }
    Some(LocalRateLimitFile {
        max_tokens,
        tokens_per_fill: Some(tokens_per_fill),
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
            let (max_tokens, tokens_per_fill, fill_interval) = token_bucket(
                d.token_bucket.as_ref(),
                &format!("{dpath}.token_bucket"),
                ctx,
            )?;
            Some(LocalDescriptorFile {
                entries: d
                    .entries
                    .iter()
                    .map(|e| DescriptorEntryFile {
                        key: e.key.clone(),
                        value: Some(e.value.clone()).filter(|v| !v.is_empty()),
                    })
                    .collect(),
                max_tokens,
                tokens_per_fill: Some(tokens_per_fill),
                fill_interval,
                shadow: d.shadow_mode,
                max_keys,
            })
        })
        .collect();
}

/// Type URL of the global rate limit filter's per-route config.
pub(super) const RATELIMIT_PER_ROUTE_TYPE: &str =
    "type.googleapis.com/envoy.extensions.filters.http.ratelimit.v3.RateLimitPerRoute";

/// A route's `RateLimitPerRoute` (in `typed_per_filter_config`, maybe in a
/// `FilterConfig` wrapper) onto `route`: `vh_rate_limits`, and
/// `rate_limits`, which replace the route's and the virtual host's.
pub(super) fn rate_limit_per_route(
    configs: &std::collections::HashMap<String, Any>,
    path: &str,
    route: &mut RouteFile,
    ctx: &mut Ctx,
) {
    use postern_proto::envoy::extensions::filters::http::ratelimit::v3::rate_limit_per_route::{
        OverrideOptions, VhRateLimitsOptions,
    };
    use postern_proto::envoy::extensions::filters::http::ratelimit::v3::RateLimitPerRoute;
    let mut names: Vec<&String> = configs.keys().collect();
    names.sort();
    for name in names {
        let mut any = &configs[name];
        let unwrapped;
        if any.type_url == FILTER_CONFIG_TYPE {
            // A bad wrapper is reported by `route_filter_configs`.
            let Ok(wrapper) = decode::<route::FilterConfig>(any, FILTER_CONFIG_TYPE) else {
                continue;
            };
            unwrapped = wrapper.config.unwrap_or_default();
            any = &unwrapped;
        }
        if any.type_url != RATELIMIT_PER_ROUTE_TYPE {
            continue;
        }
        let fpath = format!("{path}.typed_per_filter_config[{name}]");
        let config: RateLimitPerRoute = match decode(any, RATELIMIT_PER_ROUTE_TYPE) {
            Ok(config) => config,
            Err(problems) => {
                ctx.err(&fpath, problems.join("; "));
                continue;
            }
        };
        if !config.domain.is_empty() {
            ctx.unsupported(format!("{fpath}.domain"));
        }
        if config.override_option != OverrideOptions::Default as i32 {
            ctx.unsupported(format!("{fpath}.override_option (only DEFAULT)"));
        }
        route.vh_rate_limits = match VhRateLimitsOptions::try_from(config.vh_rate_limits) {
            Ok(VhRateLimitsOptions::Override) => VhRateLimitsFile::Override,
            Ok(VhRateLimitsOptions::Include) => VhRateLimitsFile::Include,
            Ok(VhRateLimitsOptions::Ignore) => VhRateLimitsFile::Ignore,
            Err(_) => {
                ctx.err(
                    format!("{fpath}.vh_rate_limits"),
                    format!("unknown value {}", config.vh_rate_limits),
                );
                VhRateLimitsFile::Override
            }
        };
        if !config.rate_limits.is_empty() {
            // Envoy: these and nothing else, neither the route's nor the
            // virtual host's.
            route.rate_limits =
                super::rate_limits(&config.rate_limits, &format!("{fpath}.rate_limits"), ctx);
            route.vh_rate_limits = VhRateLimitsFile::Ignore;
            route.include_vh_rate_limits = false;
        }
    }
}

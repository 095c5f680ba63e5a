//! Translation of Envoy v3 resources into Postern's config file model.
//!
//! Every resource becomes the same serde types the static YAML file uses,
//! so the one validator (`validate::build`) checks both sources and the rest
//! of the proxy never sees a proto. A field Postern does not support and
//! that would change behaviour is an error naming the field (the update is
//! NACKed); an unknown HTTP filter marked `is_optional` is skipped with a
//! log line.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use postern_proto::envoy::config::cluster::v3 as cluster;
use postern_proto::envoy::config::core::v3 as core;
use postern_proto::envoy::config::endpoint::v3 as endpoint;
use postern_proto::envoy::config::listener::v3 as listener;
use postern_proto::envoy::config::route::v3 as route;
use postern_proto::envoy::extensions::filters::network::http_connection_manager::v3 as hcm;
use postern_proto::envoy::extensions::filters::network::tcp_proxy::v3 as tcp_proxy;
use postern_proto::envoy::r#type::matcher::v3 as matcher;
use postern_proto::google::protobuf::Any;
use prost::Message;

use super::file::*;

#[path = "xds_chain_routing.rs"]
mod chain_routing;
#[path = "xds_chains.rs"]
mod chains;
#[path = "xds_ignored.rs"]
mod ignored;
#[path = "xds_limits.rs"]
mod limits;
#[path = "xds_policy.rs"]
mod policy;
#[path = "xds_upstream.rs"]
mod upstream;
pub use chains::{fill_edge_secrets, EdgeSecret, EdgeSlot};
pub use upstream::{cluster_secret_names, fill_cluster_secrets};

/// Type URL of the HttpConnectionManager network filter config.
const HCM_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
/// Type URL of the TcpProxy network filter config.
const TCP_PROXY_TYPE: &str =
    "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy";
/// Type URL of the router HTTP filter config.
const ROUTER_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router";
/// Type URL of the upstream HTTP protocol options.
const HTTP_PROTOCOL_OPTIONS_TYPE: &str =
    "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions";
/// The key Envoy files those options under.
const HTTP_PROTOCOL_OPTIONS_KEY: &str = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions";

/// Type URL of the TLS transport socket's server side.
const DOWNSTREAM_TLS_TYPE: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext";
/// Type URL of the TLS transport socket's client side.
const UPSTREAM_TLS_TYPE: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext";

/// Field-level problems with one resource: `field: reason` each.
pub type Problems = Vec<String>;

struct Ctx {
    problems: Problems,
}

impl Ctx {
    fn new() -> Ctx {
        Ctx {
            problems: Vec::new(),
        }
    }

    fn err(&mut self, field: impl AsRef<str>, reason: impl AsRef<str>) {
        self.problems
            .push(format!("{}: {}", field.as_ref(), reason.as_ref()));
    }

    fn unsupported(&mut self, field: impl AsRef<str>) {
        self.err(field, "not supported by Postern");
    }

    fn finish<T>(self, value: T) -> Result<T, Problems> {
        if self.problems.is_empty() {
            Ok(value)
        } else {
            Err(self.problems)
        }
    }
}

/// Decodes an `Any` of the expected type.
pub fn decode<M: Message + Default>(any: &Any, type_url: &str) -> Result<M, Problems> {
    if any.type_url != type_url {
        return Err(vec![format!(
            "type_url: expected {type_url}, got {}",
            any.type_url
        )]);
    }
    M::decode(any.value.as_slice()).map_err(|e| vec![format!("cannot decode: {e}")])
}

fn duration(d: &postern_proto::google::protobuf::Duration) -> Option<Duration> {
    let secs = u64::try_from(d.seconds).ok()?;
    let nanos = u32::try_from(d.nanos).ok()?;
    Some(Duration::new(secs, nanos))
}

fn duration_field(
    d: &Option<postern_proto::google::protobuf::Duration>,
    field: &str,
    ctx: &mut Ctx,
) -> Option<Duration> {
    let d = d.as_ref()?;
    let converted = duration(d);
    if converted.is_none() {
        ctx.err(field, "must not be negative");
    }
    converted
}

/// A `SocketAddress` with an IP literal.
fn socket_address(
    address: &Option<core::Address>,
    field: &str,
    ctx: &mut Ctx,
) -> Option<SocketAddr> {
    match endpoint_address(address, field, false, ctx)? {
        EndpointAddress::Ip(addr) => Some(addr),
        EndpointAddress::Name { .. } => None,
    }
}

/// A `SocketAddress` with an IP literal, or a DNS name where `names` allows.
fn endpoint_address(
    address: &Option<core::Address>,
    field: &str,
    names: bool,
    ctx: &mut Ctx,
) -> Option<EndpointAddress> {
    let Some(core::address::Address::SocketAddress(socket)) =
        address.as_ref().and_then(|a| a.address.as_ref())
    else {
        ctx.err(field, "needs a socket_address");
        return None;
    };
    if socket.protocol != core::socket_address::Protocol::Tcp as i32 {
        ctx.err(format!("{field}.protocol"), "only TCP is supported");
    }
    let port = match &socket.port_specifier {
        Some(core::socket_address::PortSpecifier::PortValue(port)) => u16::try_from(*port).ok(),
        _ => None,
    };
    let Some(port) = port else {
        ctx.err(
            format!("{field}.port_value"),
            "needs a port from 0 to 65535",
        );
        return None;
    };
    if let Ok(ip) = socket.address.parse::<IpAddr>() {
        return Some(EndpointAddress::Ip(SocketAddr::new(ip, port)));
    }
    if !names {
        ctx.err(
            format!("{field}.address"),
            format!(
                "\"{}\" is not an IP address (DNS names need a STRICT_DNS or LOGICAL_DNS cluster)",
                socket.address
            ),
        );
        return None;
    }
    match format!("{}:{port}", socket.address).parse::<EndpointAddress>() {
        Ok(address) => Some(address),
        Err(_) => {
            ctx.err(
                format!("{field}.address"),
                format!("\"{}\" is not a DNS name", socket.address),
            );
            None
        }
    }
}

// ----------------------------------------------------------------- routes --

/// A RouteConfiguration as Postern sees it: the virtual hosts of a
/// listener and the header changes for all of them.
#[derive(Debug, Clone, Default)]
pub struct RouteConfigFile {
    /// The virtual hosts.
    pub virtual_hosts: Vec<VirtualHostFile>,
    /// Header changes for every route.
    pub headers: HeaderMutationsFile,
    /// `most_specific_header_mutations_wins`.
    pub most_specific_header_mutations_wins: bool,
}

impl RouteConfigFile {
    /// Puts these routes into an HTTP listener.
    pub fn apply_to(&self, listener: &mut ListenerFile) {
        listener.virtual_hosts = self.virtual_hosts.clone();
        listener.http.headers = self.headers.clone();
        listener.http.most_specific_header_mutations_wins =
            self.most_specific_header_mutations_wins;
    }
}

/// A RouteConfiguration as the virtual hosts of a listener.
pub fn route_configuration(rc: &route::RouteConfiguration) -> Result<RouteConfigFile, Problems> {
    let mut ctx = Ctx::new();
    let headers = header_mutations(
        [&rc.request_headers_to_add, &rc.response_headers_to_add],
        [
            &rc.request_headers_to_remove,
            &rc.response_headers_to_remove,
        ],
        "",
        &mut ctx,
    );
    if rc.vhds.is_some() {
        ctx.unsupported("vhds");
    }
    let hosts = rc
        .virtual_hosts
        .iter()
        .enumerate()
        .map(|(i, vh)| virtual_host(vh, &format!("virtual_hosts[{i}]"), &mut ctx))
        .collect();
    ctx.finish(RouteConfigFile {
        virtual_hosts: hosts,
        headers,
        most_specific_header_mutations_wins: rc.most_specific_header_mutations_wins,
    })
}

/// The `*_headers_to_add` / `*_headers_to_remove` fields of one level
/// (`[request, response]` each); `prefix` is the level's field path.
fn header_mutations(
    add: [&[core::HeaderValueOption]; 2],
    remove: [&[String]; 2],
    prefix: &str,
    ctx: &mut Ctx,
) -> HeaderMutationsFile {
    let dot = if prefix.is_empty() { "" } else { "." };
    let mut out = HeaderMutationsFile::default();
    for (side, options) in ["request", "response"].iter().zip(add) {
        let list: Vec<HeaderAddFile> = options
            .iter()
            .enumerate()
            .filter_map(|(i, o)| {
                header_add(o, &format!("{prefix}{dot}{side}_headers_to_add[{i}]"), ctx)
            })
            .collect();
        match *side {
            "request" => out.request_headers_to_add = list,
            _ => out.response_headers_to_add = list,
        }
    }
    for (side, names) in ["request", "response"].iter().zip(remove) {
        for (i, name) in names.iter().enumerate() {
            if let Err(reason) = crate::route::mutation::check_name(name) {
                ctx.err(
                    format!("{prefix}{dot}{side}_headers_to_remove[{i}]"),
                    reason,
                );
            }
        }
        match *side {
            "request" => out.request_headers_to_remove = names.to_vec(),
            _ => out.response_headers_to_remove = names.to_vec(),
        }
    }
    out
}

/// One `HeaderValueOption`, checked here so that a NACK names the field.
fn header_add(o: &core::HeaderValueOption, path: &str, ctx: &mut Ctx) -> Option<HeaderAddFile> {
    use core::header_value_option::HeaderAppendAction as A;
    let Some(header) = &o.header else {
        ctx.err(format!("{path}.header"), "is required");
        return None;
    };
    if let Err(reason) = crate::route::mutation::check_name(&header.key) {
        ctx.err(format!("{path}.header.key"), reason);
        return None;
    }
    let value = if header.raw_value.is_empty() {
        header.value.clone()
    } else {
        if !header.value.is_empty() {
            ctx.err(
                format!("{path}.header"),
                "give value or raw_value, not both",
            );
        }
        match String::from_utf8(header.raw_value.clone()) {
            Ok(text) => text,
            Err(_) => {
                ctx.unsupported(format!("{path}.header.raw_value (only UTF-8)"));
                return None;
            }
        }
    };
    if let Err(reason) = crate::route::mutation::check_value(&value) {
        let field = if header.raw_value.is_empty() {
            "value"
        } else {
            "raw_value"
        };
        ctx.err(format!("{path}.header.{field}"), reason);
        return None;
    }
    let append_action = match A::try_from(o.append_action) {
        Ok(A::AppendIfExistsOrAdd) => AppendAction::AppendIfExistsOrAdd,
        Ok(A::AddIfAbsent) => AppendAction::AddIfAbsent,
        Ok(A::OverwriteIfExistsOrAdd) => AppendAction::OverwriteIfExistsOrAdd,
        Ok(A::OverwriteIfExists) => AppendAction::OverwriteIfExists,
        Err(_) => {
            ctx.unsupported(format!("{path}.append_action {}", o.append_action));
            return None;
        }
    };
    #[allow(deprecated)]
    let append = o.append.as_ref().map(|b| b.value);
    if append.is_some() && o.append_action != A::AppendIfExistsOrAdd as i32 {
        ctx.err(
            format!("{path}.append"),
            "both append and append_action are set",
        );
        return None;
    }
    Some(HeaderAddFile {
        name: header.key.clone(),
        value,
        append_action: append.is_none().then_some(append_action),
        append,
        keep_empty_value: o.keep_empty_value,
    })
}

fn virtual_host(vh: &route::VirtualHost, path: &str, ctx: &mut Ctx) -> VirtualHostFile {
    ignored::virtual_host(vh, path, ctx);
    if vh.require_tls != 0 {
        ctx.unsupported(format!("{path}.require_tls"));
    }
    let headers = header_mutations(
        [&vh.request_headers_to_add, &vh.response_headers_to_add],
        [
            &vh.request_headers_to_remove,
            &vh.response_headers_to_remove,
        ],
        path,
        ctx,
    );
    if vh.matcher.is_some() {
        ctx.unsupported(format!("{path}.matcher"));
    }
    let vh_rbac = policy::rbac_per_route(&vh.typed_per_filter_config, path, ctx, true);
    VirtualHostFile {
        name: vh.name.clone(),
        domains: vh.domains.clone(),
        routes: vh
            .routes
            .iter()
            .enumerate()
            .filter_map(|(i, r)| route_entry(r, &format!("{path}.routes[{i}]"), ctx))
            .map(|r| policy::inherit_rbac(r, vh_rbac.as_ref()))
            .collect(),
        headers,
        rate_limits: rate_limits(&vh.rate_limits, &format!("{path}.rate_limits"), ctx),
    }
}

fn route_entry(r: &route::Route, path: &str, ctx: &mut Ctx) -> Option<RouteFile> {
    let headers = header_mutations(
        [&r.request_headers_to_add, &r.response_headers_to_add],
        [&r.request_headers_to_remove, &r.response_headers_to_remove],
        path,
        ctx,
    );
    let (jwt, local_rate_limit) = route_filter_configs(&r.typed_per_filter_config, path, ctx);
    let matcher = route_match(r.r#match.as_ref(), &format!("{path}.match"), ctx);
    let mut out = RouteFile {
        name: (!r.name.is_empty()).then(|| r.name.clone()),
        matcher,
        cluster: None,
        weighted_clusters: None,
        direct_response: None,
        redirect: None,
        timeout: None,
        retry: None,
        rewrite: None,
        local_rate_limit,
        rate_limits: Vec::new(),
        include_vh_rate_limits: false,
        vh_rate_limits: VhRateLimitsFile::Override,
        jwt,
        rbac: policy::rbac_per_route(&r.typed_per_filter_config, path, ctx, false),
        access_log: None,
        headers,
    };
    match &r.action {
        Some(route::route::Action::Route(action)) => {
            route_action(action, &format!("{path}.route"), &mut out, ctx)
        }
        Some(route::route::Action::Redirect(redirect)) => {
            out.redirect = Some(redirect_action(redirect, &format!("{path}.redirect"), ctx));
        }
        Some(route::route::Action::DirectResponse(direct)) => {
            if direct.body_format.is_some() {
                ctx.unsupported(format!("{path}.direct_response.body_format"));
            }
            let body = match direct.body.as_ref().and_then(|b| b.specifier.as_ref()) {
                None => String::new(),
                Some(core::data_source::Specifier::InlineString(s)) => s.clone(),
                Some(core::data_source::Specifier::InlineBytes(b)) => {
                    String::from_utf8_lossy(b).into_owned()
                }
                Some(_) => {
                    ctx.unsupported(format!("{path}.direct_response.body (only inline bodies)"));
                    String::new()
                }
            };
            out.direct_response = Some(DirectResponseFile {
                status: u16::try_from(direct.status).unwrap_or(0),
                body,
            });
        }
        Some(_) => ctx.unsupported(format!("{path}.action")),
        None => ctx.err(
            format!("{path}.action"),
            "a route needs route, redirect or direct_response",
        ),
    }
    limits::rate_limit_per_route(&r.typed_per_filter_config, path, &mut out, ctx);
    Some(out)
}

fn route_match(m: Option<&route::RouteMatch>, path: &str, ctx: &mut Ctx) -> RouteMatchFile {
    let Some(m) = m else {
        ctx.err(path, "is required");
        return RouteMatchFile::default();
    };
    let path_match = match &m.path_specifier {
        Some(route::route_match::PathSpecifier::Prefix(p)) => Some(PathMatchFile {
            prefix: Some(if p.is_empty() { "/".into() } else { p.clone() }),
            ..Default::default()
        }),
        Some(route::route_match::PathSpecifier::Path(p)) => Some(PathMatchFile {
            exact: Some(p.clone()),
            ..Default::default()
        }),
        Some(route::route_match::PathSpecifier::SafeRegex(re)) => Some(PathMatchFile {
            regex: Some(re.regex.clone()),
            ..Default::default()
        }),
        Some(_) => {
            ctx.unsupported(format!("{path}.path_specifier"));
            None
        }
        None => None,
    };
    let mut out = RouteMatchFile {
        path: path_match,
        ..Default::default()
    };
    if m.case_sensitive.as_ref().is_some_and(|c| !c.value) {
        ctx.unsupported(format!("{path}.case_sensitive: false"));
    }
    if m.runtime_fraction.is_some() {
        ctx.unsupported(format!("{path}.runtime_fraction"));
    }
    if m.grpc.is_some() {
        ctx.unsupported(format!("{path}.grpc"));
    }
    if !m.dynamic_metadata.is_empty() {
        ctx.unsupported(format!("{path}.dynamic_metadata"));
    }
    for (i, h) in m.headers.iter().enumerate() {
        let hpath = format!("{path}.headers[{i}]");
        // Envoy matches methods through the :method pseudo-header.
        if h.name == ":method" {
            if let Some(route::header_matcher::HeaderMatchSpecifier::StringMatch(sm)) =
                &h.header_match_specifier
            {
                if let Some(matcher::string_matcher::MatchPattern::Exact(method)) =
                    &sm.match_pattern
                {
                    if !h.invert_match {
                        out.methods.push(method.clone());
                        continue;
                    }
                }
            }
        }
        if let Some(header) = header_match(h, &hpath, ctx) {
            out.headers.push(header);
        }
    }
    for (i, q) in m.query_parameters.iter().enumerate() {
        let qpath = format!("{path}.query_parameters[{i}]");
        let mut query = QueryMatchFile {
            name: q.name.clone(),
            exact: None,
            regex: None,
            present: None,
        };
        match &q.query_parameter_match_specifier {
            Some(route::query_parameter_matcher::QueryParameterMatchSpecifier::StringMatch(sm)) => {
                match string_match(sm, &format!("{qpath}.string_match"), ctx) {
                    Some(StringMatch::Exact(v)) => query.exact = Some(v),
                    Some(StringMatch::Regex(v)) => query.regex = Some(v),
                    None => {}
                }
            }
            Some(route::query_parameter_matcher::QueryParameterMatchSpecifier::PresentMatch(p)) => {
                query.present = Some(*p)
            }
            None => query.present = Some(true),
        }
        out.query.push(query);
    }
    out
}

enum StringMatch {
    Exact(String),
    Regex(String),
}

/// A StringMatcher as exact or regex; prefix, suffix, contains and
/// ignore_case become anchored regexes.
fn string_match(sm: &matcher::StringMatcher, path: &str, ctx: &mut Ctx) -> Option<StringMatch> {
    use matcher::string_matcher::MatchPattern;
    let ci = if sm.ignore_case { "(?i)" } else { "" };
    let out = match &sm.match_pattern {
        Some(MatchPattern::Exact(v)) if !sm.ignore_case => StringMatch::Exact(v.clone()),
        // Whole-value patterns: the validator anchors every regex itself.
        Some(MatchPattern::Exact(v)) => StringMatch::Regex(format!("{ci}{}", regex::escape(v))),
        Some(MatchPattern::Prefix(v)) => StringMatch::Regex(format!("{ci}{}.*", regex::escape(v))),
        Some(MatchPattern::Suffix(v)) => StringMatch::Regex(format!("{ci}.*{}", regex::escape(v))),
        Some(MatchPattern::Contains(v)) => {
            StringMatch::Regex(format!("{ci}.*{}.*", regex::escape(v)))
        }
        Some(MatchPattern::SafeRegex(re)) => StringMatch::Regex(format!("{ci}(?:{})", re.regex)),
        _ => {
            ctx.unsupported(format!("{path}.match_pattern"));
            return None;
        }
    };
    Some(out)
}

// The deprecated specifiers are still what many control planes send.
#[allow(deprecated)]
fn header_match(h: &route::HeaderMatcher, path: &str, ctx: &mut Ctx) -> Option<HeaderMatchFile> {
    use route::header_matcher::HeaderMatchSpecifier as S;
    let mut out = HeaderMatchFile {
        name: h.name.clone(),
        exact: None,
        regex: None,
        present: None,
        invert: h.invert_match,
    };
    match &h.header_match_specifier {
        Some(S::ExactMatch(v)) => out.exact = Some(v.clone()),
        Some(S::SafeRegexMatch(re)) => out.regex = Some(re.regex.clone()),
        Some(S::PresentMatch(p)) => out.present = Some(*p),
        Some(S::PrefixMatch(v)) => out.regex = Some(format!("{}.*", regex::escape(v))),
        Some(S::SuffixMatch(v)) => out.regex = Some(format!(".*{}", regex::escape(v))),
        Some(S::ContainsMatch(v)) => out.regex = Some(format!(".*{}.*", regex::escape(v))),
        Some(S::StringMatch(sm)) => match string_match(sm, &format!("{path}.string_match"), ctx)? {
            StringMatch::Exact(v) => out.exact = Some(v),
            StringMatch::Regex(v) => out.regex = Some(v),
        },
        Some(_) => {
            ctx.unsupported(format!("{path}.header_match_specifier"));
            return None;
        }
        None => out.present = Some(true),
    }
    Some(out)
}

fn route_action(a: &route::RouteAction, path: &str, out: &mut RouteFile, ctx: &mut Ctx) {
    ignored::route_action(a, path, ctx);
    use route::route_action::ClusterSpecifier as C;
    match &a.cluster_specifier {
        Some(C::Cluster(name)) => out.cluster = Some(name.clone()),
        Some(C::WeightedClusters(w)) => {
            let mut clusters = Vec::new();
            for (i, c) in w.clusters.iter().enumerate() {
                if c.name.is_empty() {
                    ctx.unsupported(format!(
                        "{path}.weighted_clusters.clusters[{i}].cluster_header"
                    ));
                    continue;
                }
                let cpath = format!("{path}.weighted_clusters.clusters[{i}]");
                clusters.push(WeightedClusterFile {
                    cluster: c.name.clone(),
                    weight: c.weight.as_ref().map_or(0, |w| w.value),
                    headers: header_mutations(
                        [&c.request_headers_to_add, &c.response_headers_to_add],
                        [&c.request_headers_to_remove, &c.response_headers_to_remove],
                        &cpath,
                        ctx,
                    ),
                });
            }
            out.weighted_clusters = Some(clusters);
        }
        Some(_) => ctx.unsupported(format!("{path}.cluster_specifier")),
        None => ctx.err(format!("{path}.cluster_specifier"), "is required"),
    }
    out.timeout = duration_field(&a.timeout, &format!("{path}.timeout"), ctx);
    if !a.prefix_rewrite.is_empty()
        || a.regex_rewrite.is_some()
        || a.host_rewrite_specifier.is_some()
    {
        let mut rewrite = RewriteFile::default();
        if !a.prefix_rewrite.is_empty() {
            rewrite.prefix = Some(a.prefix_rewrite.clone());
        }
        if let Some(re) = &a.regex_rewrite {
            rewrite.regex = Some(RegexRewriteFile {
                pattern: re
                    .pattern
                    .as_ref()
                    .map(|p| p.regex.clone())
                    .unwrap_or_default(),
                substitution: re.substitution.clone(),
            });
        }
        match &a.host_rewrite_specifier {
            Some(route::route_action::HostRewriteSpecifier::HostRewriteLiteral(host)) => {
                rewrite.host = Some(host.clone())
            }
            Some(_) => ctx.unsupported(format!(
                "{path}.host_rewrite_specifier (only host_rewrite_literal)"
            )),
            None => {}
        }
        out.rewrite = Some(rewrite);
    }
    if a.path_rewrite_policy.is_some() || !a.path_rewrite.is_empty() {
        ctx.unsupported(format!("{path}.path_rewrite"));
    }
    if !a.request_mirror_policies.is_empty() {
        ctx.unsupported(format!("{path}.request_mirror_policies"));
    }
    out.rate_limits = rate_limits(&a.rate_limits, &format!("{path}.rate_limits"), ctx);
    #[allow(deprecated)]
    if a.include_vh_rate_limits.as_ref().is_some_and(|v| v.value) {
        out.include_vh_rate_limits = true;
    }
    if a.retry_policy_typed_config.is_some() {
        ctx.unsupported(format!("{path}.retry_policy_typed_config"));
    }
    if let Some(retry) = &a.retry_policy {
        out.retry = retry_policy(retry, &format!("{path}.retry_policy"), ctx);
    }
}

fn retry_policy(r: &route::RetryPolicy, path: &str, ctx: &mut Ctx) -> Option<RetryFile> {
    let mut on = Vec::new();
    let mut codes: Vec<u16> = r
        .retriable_status_codes
        .iter()
        .filter_map(|c| u16::try_from(*c).ok())
        .collect();
    for token in r
        .retry_on
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
    {
        let mapped = match token {
            "5xx" => Some(RetryOn::FiveXx),
            "connect-failure" => Some(RetryOn::ConnectFailure),
            "reset" | "reset-before-request" | "refused-stream" => Some(RetryOn::Reset),
            "retriable-status-codes" => Some(RetryOn::RetriableStatusCodes),
            "gateway-error" => {
                codes.extend([502, 503, 504]);
                Some(RetryOn::RetriableStatusCodes)
            }
            other => {
                // Fewer retries than asked is safe; more would not be.
                tracing::warn!(
                    field = path,
                    condition = other,
                    "retry condition not supported; ignored"
                );
                None
            }
        };
        if let Some(m) = mapped {
            if !on.contains(&m) {
                on.push(m);
            }
        }
    }
    if on.is_empty() {
        return None;
    }
    codes.sort_unstable();
    codes.dedup();
    if !codes.is_empty() && !on.contains(&RetryOn::RetriableStatusCodes) {
        on.push(RetryOn::RetriableStatusCodes);
    }
    let back_off = r.retry_back_off.as_ref();
    Some(RetryFile {
        on,
        max_attempts: r.num_retries.as_ref().map_or(1, |n| n.value) + 1,
        retriable_status_codes: codes,
        per_try_timeout: duration_field(
            &r.per_try_timeout,
            &format!("{path}.per_try_timeout"),
            ctx,
        ),
        backoff_base: back_off
            .and_then(|b| b.base_interval.as_ref())
            .and_then(duration)
            .unwrap_or(Duration::from_millis(25)),
        backoff_max: back_off
            .and_then(|b| b.max_interval.as_ref())
            .and_then(duration),
        retry_non_idempotent: false,
        max_body_bytes: 64 * 1024,
    })
}

fn redirect_action(r: &route::RedirectAction, path: &str, ctx: &mut Ctx) -> RedirectFile {
    use route::redirect_action::{PathRewriteSpecifier as P, SchemeRewriteSpecifier as S};
    let status = match r.response_code {
        0 => 301,
        1 => 302,
        2 => 303,
        3 => 307,
        4 => 308,
        other => {
            ctx.err(
                format!("{path}.response_code"),
                format!("unknown code {other}"),
            );
            301
        }
    };
    let scheme = match &r.scheme_rewrite_specifier {
        Some(S::HttpsRedirect(true)) => Some("https".to_string()),
        Some(S::SchemeRedirect(s)) => Some(s.clone()),
        _ => None,
    };
    let (redirect_path, prefix_rewrite) = match &r.path_rewrite_specifier {
        Some(P::PathRedirect(p)) => (Some(p.clone()), None),
        Some(P::PrefixRewrite(p)) => (None, Some(p.clone())),
        Some(_) => {
            ctx.unsupported(format!("{path}.regex_rewrite"));
            (None, None)
        }
        None => (None, None),
    };
    RedirectFile {
        status,
        scheme,
        host: (!r.host_redirect.is_empty()).then(|| r.host_redirect.clone()),
        port: (r.port_redirect != 0).then(|| u16::try_from(r.port_redirect).unwrap_or(0)),
        path: redirect_path,
        prefix_rewrite,
        strip_query: r.strip_query,
    }
}

// --------------------------------------------------------------- clusters --

/// How a cluster's endpoints arrive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndpointSource {
    /// Inline (`STATIC`, or `STRICT_DNS` with IP literals).
    Inline,
    /// By EDS, under this service name.
    Eds(String),
    /// None: each connection goes to its original destination
    /// (`ORIGINAL_DST`); only capture listeners can use such a cluster.
    OriginalDst,
}

/// A Cluster as a cluster file entry (without endpoints for EDS clusters),
/// and where its endpoints come from.
// The DNS fields are deprecated in favour of the DNS cluster extension, but
// control planes (istiod among them) still send them.
#[allow(deprecated)]
pub fn cluster(
    c: &cluster::Cluster,
    sds: Option<&SdsSourceFile>,
) -> Result<(ClusterFile, EndpointSource), Problems> {
    use cluster::cluster::{ClusterDiscoveryType, DiscoveryType as T, LbPolicy as L};
    let mut ctx = Ctx::new();
    ignored::cluster(c, &mut ctx);
    let discovery = match &c.cluster_discovery_type {
        Some(ClusterDiscoveryType::Type(t)) => *t,
        Some(_) => {
            ctx.unsupported("cluster_type");
            0
        }
        None => T::Static as i32,
    };
    let mut endpoints = Vec::new();
    let mut dns_type = DnsType::Strict;
    let source = if discovery == T::Eds as i32 {
        let service = c
            .eds_cluster_config
            .as_ref()
            .map(|e| e.service_name.clone())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| c.name.clone());
        EndpointSource::Eds(service)
    } else if discovery == T::Static as i32
        || discovery == T::StrictDns as i32
        || discovery == T::LogicalDns as i32
    {
        let dns = discovery != T::Static as i32;
        if discovery == T::LogicalDns as i32 {
            dns_type = DnsType::Logical;
        }
        match &c.load_assignment {
            Some(cla) => endpoints = cla_endpoints(cla, "load_assignment", dns, &mut ctx),
            None => ctx.err(
                "load_assignment",
                "a STATIC or DNS cluster needs its endpoints",
            ),
        }
        if dns_type == DnsType::Logical && endpoints.len() != 1 {
            ctx.err(
                "load_assignment",
                "a LOGICAL_DNS cluster takes exactly one endpoint",
            );
        }
        EndpointSource::Inline
    } else if discovery == T::OriginalDst as i32 {
        original_dst_cluster(c, &mut ctx);
        EndpointSource::OriginalDst
    } else {
        ctx.unsupported(format!(
            "type {discovery} (only STATIC, STRICT_DNS, LOGICAL_DNS, EDS, ORIGINAL_DST)"
        ));
        EndpointSource::Inline
    };
    let dns_refresh_rate = match duration_field(&c.dns_refresh_rate, "dns_refresh_rate", &mut ctx) {
        Some(rate) if rate < Duration::from_millis(1) => {
            ctx.err("dns_refresh_rate", "must be at least 1ms");
            default_dns_refresh_rate()
        }
        Some(rate) => rate,
        None => default_dns_refresh_rate(),
    };
    let dns_lookup_family = {
        use cluster::cluster::DnsLookupFamily as F;
        match F::try_from(c.dns_lookup_family) {
            Ok(F::Auto) => DnsLookupFamily::Auto,
            Ok(F::V4Only) => DnsLookupFamily::V4Only,
            Ok(F::V6Only) => DnsLookupFamily::V6Only,
            Ok(F::V4Preferred) => DnsLookupFamily::V4Preferred,
            Ok(F::All) => DnsLookupFamily::All,
            Err(_) => {
                ctx.unsupported(format!("dns_lookup_family {}", c.dns_lookup_family));
                DnsLookupFamily::Auto
            }
        }
    };
    // Each of these changes when or how names are resolved; the system
    // resolver on a fixed period is all Postern does.
    if c.respect_dns_ttl {
        ctx.unsupported("respect_dns_ttl");
    }
    if c.dns_failure_refresh_rate.is_some() {
        ctx.unsupported("dns_failure_refresh_rate");
    }
    if c.dns_jitter.is_some() {
        ctx.unsupported("dns_jitter");
    }
    if !c.dns_resolvers.is_empty()
        || c.use_tcp_for_dns_lookups
        || c.dns_resolution_config.is_some()
        || c.typed_dns_resolver_config.is_some()
    {
        ctx.unsupported("dns_resolvers / dns_resolution_config / typed_dns_resolver_config");
    }
    let lb = match L::try_from(c.lb_policy) {
        Ok(L::ClusterProvided) if source == EndpointSource::OriginalDst => LbPolicy::RoundRobin,
        _ if source == EndpointSource::OriginalDst => {
            ctx.err(
                "lb_policy",
                "an ORIGINAL_DST cluster takes CLUSTER_PROVIDED (the connection names the endpoint)",
            );
            LbPolicy::RoundRobin
        }
        Ok(L::RoundRobin) => LbPolicy::RoundRobin,
        Ok(L::LeastRequest) => LbPolicy::LeastRequest,
        Ok(L::Random) => LbPolicy::Random,
        _ => {
            ctx.unsupported(format!("lb_policy {}", c.lb_policy));
            LbPolicy::RoundRobin
        }
    };
    let mut protocol = UpstreamProtocol::Http1;
    #[allow(deprecated)]
    if c.http2_protocol_options.is_some() {
        protocol = UpstreamProtocol::Http2;
    }
    if let Some(options) = c
        .typed_extension_protocol_options
        .get(HTTP_PROTOCOL_OPTIONS_KEY)
    {
        if options.type_url == HTTP_PROTOCOL_OPTIONS_TYPE {
            use postern_proto::envoy::extensions::upstreams::http::v3::http_protocol_options::{
                explicit_http_config::ProtocolConfig, UpstreamProtocolOptions,
            };
            match postern_proto::envoy::extensions::upstreams::http::v3::HttpProtocolOptions::decode(
                options.value.as_slice(),
            ) {
                Ok(o) => match o.upstream_protocol_options {
                    Some(UpstreamProtocolOptions::ExplicitHttpConfig(e)) => {
                        if matches!(
                            e.protocol_config,
                            Some(ProtocolConfig::Http2ProtocolOptions(_))
                        ) {
                            protocol = UpstreamProtocol::Http2;
                        }
                    }
                    Some(_) => ctx.unsupported(
                        "typed_extension_protocol_options (only explicit_http_config)",
                    ),
                    None => {}
                },
                Err(e) => ctx.err(
                    "typed_extension_protocol_options",
                    format!("cannot decode: {e}"),
                ),
            }
        }
    }
    let mut circuit_breaker = CircuitBreakerFile::default();
    if let Some(thresholds) = c.circuit_breakers.as_ref().and_then(|cb| {
        cb.thresholds
            .iter()
            .find(|t| t.priority == core::RoutingPriority::Default as i32)
    }) {
        if let Some(v) = &thresholds.max_connections {
            circuit_breaker.max_connections = v.value as usize;
        }
        if let Some(v) = &thresholds.max_pending_requests {
            circuit_breaker.max_pending_requests = v.value as usize;
        }
        if let Some(v) = &thresholds.max_requests {
            circuit_breaker.max_requests = v.value as usize;
        }
        if let Some(v) = &thresholds.max_retries {
            circuit_breaker.max_retries = v.value as usize;
        }
    }
    let outlier_detection = c.outlier_detection.as_ref().map(|od| {
        let mut file = OutlierDetectionFile::default();
        if let Some(v) = &od.consecutive_5xx {
            file.consecutive_5xx = v.value;
        }
        if let Some(v) = &od.consecutive_local_origin_failure {
            file.consecutive_connect_failures = v.value;
        }
        if let Some(d) = od.max_ejection_time.as_ref().and_then(duration) {
            file.max_ejection_time = d;
        }
        if let Some(d) = od.base_ejection_time.as_ref().and_then(duration) {
            file.base_ejection_time = d;
        }
        if let Some(v) = &od.max_ejection_percent {
            file.max_ejection_percent = v.value;
        }
        file
    });
    if !c.transport_socket_matches.is_empty() {
        ctx.unsupported("transport_socket_matches");
    }
    upstream::auto_sni(c, &mut ctx);
    let tls = c
        .transport_socket
        .as_ref()
        .and_then(|socket| upstream_tls(socket, "transport_socket", sds, &mut ctx));
    if c.health_checks.iter().len() > 0 {
        ctx.unsupported("health_checks");
    }
    let file = ClusterFile {
        name: c.name.clone(),
        endpoints,
        lb,
        protocol,
        connect_timeout: c
            .connect_timeout
            .as_ref()
            .and_then(duration)
            .unwrap_or(Duration::from_secs(5)),
        pool: PoolFile::default(),
        circuit_breaker,
        retry_budget: RetryBudgetFile::default(),
        outlier_detection,
        tls,
        dns_refresh_rate,
        dns_lookup_family,
        dns_type,
    };
    ctx.finish((file, source))
}

/// Checks an `ORIGINAL_DST` cluster (Istio's `PassthroughCluster` and
/// `InboundPassthroughClusterIpv4`): each connection goes where it was
/// headed, which a capture listener knows, so nothing here may name another
/// address or port.
fn original_dst_cluster(c: &cluster::Cluster, ctx: &mut Ctx) {
    if let Some(cluster::cluster::LbConfig::OriginalDstLbConfig(config)) = &c.lb_config {
        if config.use_http_header || !config.http_header_name.is_empty() {
            ctx.unsupported("original_dst_lb_config.use_http_header");
        }
        if config.upstream_port_override.is_some() {
            ctx.unsupported("original_dst_lb_config.upstream_port_override");
        }
        if config.metadata_key.is_some() {
            ctx.unsupported("original_dst_lb_config.metadata_key");
        }
    }
    if let Some(bind) = &c.upstream_bind_config {
        // Istio binds inbound passthrough to 127.0.0.6 so its own capture
        // rules let it through; Postern's inbound side reaches the app on
        // loopback, which those rules never capture, from a loopback
        // address of the kernel's choice.
        let loopback = bind
            .source_address
            .as_ref()
            .and_then(|a| a.address.parse::<IpAddr>().ok())
            .is_some_and(|ip| ip.is_loopback());
        if !loopback || !bind.extra_source_addresses.is_empty() {
            ctx.unsupported("upstream_bind_config (only a loopback source_address)");
        }
    }
    if c.transport_socket.is_some() {
        ctx.unsupported("transport_socket (on an ORIGINAL_DST cluster: passthrough is as it came)");
    }
}

/// The endpoints of a ClusterLoadAssignment.
pub fn load_assignment(
    cla: &endpoint::ClusterLoadAssignment,
) -> Result<Vec<EndpointFile>, Problems> {
    let mut ctx = Ctx::new();
    let endpoints = cla_endpoints(cla, "endpoints", false, &mut ctx);
    ctx.finish(endpoints)
}

/// Healthy (or unknown) endpoints of every priority, each with its
/// priority; DNS names are allowed where `names` says (DNS clusters, which
/// take priority 0 only). Locality `load_balancing_weight`s are left out,
/// as Envoy does without locality-weighted balancing (which is refused):
/// endpoint weights alone count.
fn cla_endpoints(
    cla: &endpoint::ClusterLoadAssignment,
    path: &str,
    names: bool,
    ctx: &mut Ctx,
) -> Vec<EndpointFile> {
    let mut out = Vec::new();
    for (i, locality) in cla.endpoints.iter().enumerate() {
        if names && locality.priority != 0 {
            ctx.unsupported(format!("{path}[{i}].priority (on a DNS cluster)"));
        }
        for (j, lb) in locality.lb_endpoints.iter().enumerate() {
            let epath = format!("{path}[{i}].lb_endpoints[{j}]");
            let healthy = matches!(
                core::HealthStatus::try_from(lb.health_status),
                Ok(core::HealthStatus::Unknown
                    | core::HealthStatus::Healthy
                    | core::HealthStatus::Degraded)
            );
            let Some(endpoint::lb_endpoint::HostIdentifier::Endpoint(ep)) = &lb.host_identifier
            else {
                ctx.unsupported(format!("{epath}.endpoint_name"));
                continue;
            };
            let Some(address) = endpoint_address(
                &ep.address,
                &format!("{epath}.endpoint.address"),
                names,
                ctx,
            ) else {
                continue;
            };
            if !healthy {
                continue;
            }
            out.push(EndpointFile {
                address,
                weight: lb
                    .load_balancing_weight
                    .as_ref()
                    .map_or(1, |w| w.value.max(1)),
                priority: locality.priority,
            });
        }
    }
    out
}

// -------------------------------------------------------------- listeners --

/// Where an HTTP listener's routes come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteSource {
    /// Inline in the listener.
    Inline,
    /// By RDS, under this route configuration name.
    Rds(String),
    /// Not an HTTP listener.
    None,
}

/// A Listener as a listener file entry (virtual hosts empty when they come
/// by RDS), and where its routes come from.
pub fn listener(
    l: &listener::Listener,
    sds: Option<&SdsSourceFile>,
) -> Result<(ListenerFile, RouteSource), Problems> {
    listener_with(l, sds, &|_| None)
}

/// Like [`listener()`], resolving the clusters that gRPC access loggers name
/// (`envoy_grpc.cluster_name`) to collector addresses with `log_clusters`.
pub fn listener_with(
    l: &listener::Listener,
    sds: Option<&SdsSourceFile>,
    log_clusters: &dyn Fn(&str) -> Option<String>,
) -> Result<(ListenerFile, RouteSource), Problems> {
    listener_parts(l, sds, log_clusters).map(|t| (t.file, t.routes))
}

/// A translated Listener: the listener file entry, where its routes come
/// from, and the clusters an inbound capture listener hands calls to.
#[derive(Debug, Clone)]
pub struct TranslatedListener {
    /// The listener (virtual hosts empty when they come by RDS).
    pub file: ListenerFile,
    /// Where its routes come from.
    pub routes: RouteSource,
    /// Inbound capture: the clusters its filter chains name, which must
    /// lead to the app as Postern's inbound side does (checked once the
    /// clusters are known, by [`check_app_target`]).
    pub app_targets: Vec<AppTarget>,
    /// Edge TLS: the SDS secrets it waits for (filled by
    /// [`fill_edge_secrets`]).
    pub edge_secrets: Vec<EdgeSecret>,
    /// A listener with per-chain routing: the route configurations its
    /// chains take by RDS, by index in the file's `filter_chains`.
    pub chain_routes: Vec<(usize, String)>,
}

/// A cluster an inbound capture listener's filter chain sends calls to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppTarget {
    /// The field that names it, e.g. `filter_chains[1].filters[0].cluster`.
    pub field: String,
    /// The cluster.
    pub cluster: String,
    /// The chain's `destination_port`; `None` for a chain of every port.
    pub port: Option<u16>,
}

/// Whether `target` leads where Postern's inbound capture sends a call (the
/// app on loopback at the original port): an `ORIGINAL_DST` cluster
/// (`original_dst`), or for a chain of one port a cluster whose endpoints
/// are that port on loopback (Istio's `inbound|PORT||`). The reason when not.
pub fn check_app_target(
    target: &AppTarget,
    original_dst: bool,
    endpoints: &[EndpointFile],
) -> Result<(), String> {
    if original_dst {
        return Ok(());
    }
    let Some(port) = target.port else {
        return Err(format!(
            "{}: \"{}\" is not an ORIGINAL_DST cluster; a filter chain of every port passes calls through to their original port",
            target.field, target.cluster
        ));
    };
    let to_app = !endpoints.is_empty()
        && endpoints.iter().all(|e| {
            e.address.ip().is_some_and(|a| a.ip().is_loopback()) && e.address.port() == port
        });
    if to_app {
        Ok(())
    } else {
        Err(format!(
            "{}: cluster \"{}\" must be ORIGINAL_DST or have only 127.0.0.1:{port} (or [::1]:{port}) as endpoints: Postern's inbound capture hands calls to the app on loopback at the original port",
            target.field, target.cluster
        ))
    }
}

/// The first place among `listeners` that sends traffic to one of the
/// `original_dst` clusters, as `listener L: field: reason`. Such a cluster
/// has no endpoints: only a capture listener knows where a connection was
/// headed, and it names the cluster only through its filter chains.
pub fn original_dst_reference(
    listeners: &[ListenerFile],
    original_dst: &std::collections::BTreeSet<&str>,
) -> Option<String> {
    let routes = |hosts: &[VirtualHostFile], path: &str| {
        hosts.iter().enumerate().find_map(|(i, host)| {
            host.routes.iter().enumerate().find_map(|(j, route)| {
                let weighted = route.weighted_clusters.iter().flatten().map(|w| &w.cluster);
                route
                    .cluster
                    .iter()
                    .chain(weighted)
                    .find(|c| original_dst.contains(c.as_str()))
                    .map(|c| (format!("{path}virtual_hosts[{i}].routes[{j}]"), c.clone()))
            })
        })
    };
    listeners.iter().find_map(|l| {
        let tcp = l
            .tcp
            .as_ref()
            .filter(|t| original_dst.contains(t.cluster.as_str()))
            .map(|t| ("tcp.cluster".to_string(), t.cluster.clone()));
        let services = l.capture.iter().flat_map(|c| c.services.iter().enumerate());
        let found = tcp.or_else(|| routes(&l.virtual_hosts, "")).or_else(|| {
            services.clone().find_map(|(i, service)| {
                let path = format!("capture.services[{i}].");
                service
                    .cluster
                    .as_ref()
                    .filter(|c| original_dst.contains(c.as_str()))
                    .map(|c| (format!("{path}cluster"), c.clone()))
                    .or_else(|| routes(&service.virtual_hosts, &path))
            })
        });
        found.map(|(field, cluster)| {
            format!(
                "listener {}: {field}: cluster \"{cluster}\" is ORIGINAL_DST, which only capture listeners' filter chains can use (not supported here)",
                l.name
            )
        })
    })
}

/// Like [`listener_with`], with the clusters an inbound capture listener
/// names.
pub fn listener_parts(
    l: &listener::Listener,
    sds: Option<&SdsSourceFile>,
    log_clusters: &dyn Fn(&str) -> Option<String>,
) -> Result<TranslatedListener, Problems> {
    let mut ctx = Ctx::new();
    let address = socket_address(&l.address, "address", &mut ctx);
    let mut file = ListenerFile {
        name: l.name.clone(),
        address: address.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0))),
        kind: ListenerKind::Http,
        limits: ListenerLimitsFile::default(),
        http: HttpSettingsFile::default(),
        virtual_hosts: Vec::new(),
        tcp: None,
        capture: None,
        mtls: None,
        tls: None,
        // Envoy's enum: 1 inbound, 2 outbound; unspecified keeps the default.
        tracing: None,
        access_log_service: None,
        traffic_direction: match l.traffic_direction {
            1 => Some(crate::telemetry::log::TrafficDirection::Inbound),
            2 => Some(crate::telemetry::log::TrafficDirection::Outbound),
            _ => None,
        },
        filter_chains: Vec::new(),
    };
    // Unset keeps Postern's default (Envoy's is net.core.somaxconn, which
    // the kernel caps any value at anyway).
    if let Some(backlog) = &l.tcp_backlog_size {
        if backlog.value == 0 {
            ctx.err("tcp_backlog_size", "must be more than 0");
        }
        // Envoy passes it to listen(2) as an int, where a larger value
        // means "as many as the kernel allows": so does i32::MAX.
        file.limits.tcp_backlog_size = backlog.value.min(i32::MAX as u32);
    }
    // Envoy's enum: 1 is INBOUND, which with listener filters is Istio's
    // virtualInbound even when its original_dst filter is missing.
    if !l.listener_filters.is_empty() && (l.traffic_direction == 1 || !only_inspectors(l)) {
        let app_targets = inbound_capture(l, &mut file, sds, &mut ctx, log_clusters);
        return ctx.finish(TranslatedListener {
            file,
            routes: RouteSource::None,
            app_targets,
            edge_secrets: Vec::new(),
            chain_routes: Vec::new(),
        });
    }
    // Chains that amount to one listener setting keep that form (one route
    // table, swapped in place as before); others are routed per chain.
    let base = file.clone();
    let mut one = Ctx::new();
    let (source, edge_secrets) = chains::filter_chains(l, &mut file, sds, &mut one, log_clusters);
    if !one.problems.is_empty() {
        let mut each = Ctx::new();
        let routed = chain_routing::per_chain(l, &base, sds, &mut each, log_clusters);
        if l.use_original_dst.as_ref().is_some_and(|v| v.value) || !binds_to_port(l) {
            each.unsupported(
                "filter_chains (chains that differ, on a listener with use_original_dst or bind_to_port: false)",
            );
        }
        ctx.problems.extend(each.problems);
        return ctx.finish(TranslatedListener {
            file: routed.file,
            routes: RouteSource::None,
            app_targets: Vec::new(),
            edge_secrets: routed.secrets,
            chain_routes: routed.chain_routes,
        });
    }
    if l.use_original_dst.as_ref().is_some_and(|v| v.value) {
        original_dst(l, &mut file, &mut ctx);
    }
    if !binds_to_port(l) {
        // A virtual listener becomes a service of the capture listeners:
        // only its routes or cluster carry over.
        if file.mtls.is_some() || file.tls.is_some() {
            ctx.unsupported(
                "filter_chains[0].transport_socket (on a listener with bind_to_port: false)",
            );
        }
        if file.http.rbac.is_some()
            || file.http.local_rate_limit.is_some()
            || file.http.rate_limit_service.is_some()
            || file.http.jwt.is_some()
        {
            ctx.unsupported(
                "HTTP filters other than the router (on a listener with bind_to_port: false)",
            );
        }
    }
    ctx.finish(TranslatedListener {
        file,
        routes: source,
        app_targets: Vec::new(),
        edge_secrets,
        chain_routes: Vec::new(),
    })
}

/// Whether `l`'s listener filters are only the inspectors (TLS, HTTP) a
/// gateway's listener carries for its filter-chain matches: Postern reads
/// SNI and ALPN itself, so they make no capture listener.
fn only_inspectors(l: &listener::Listener) -> bool {
    use listener::listener_filter::ConfigType as FilterConfig;
    l.listener_filters.iter().all(|filter| {
        let type_url = match &filter.config_type {
            Some(FilterConfig::TypedConfig(any)) => any.type_url.as_str(),
            Some(_) => return false,
            None => "",
        };
        filter.filter_disabled.is_none()
            && INSPECTOR_FILTERS
                .into_iter()
                .any(|(url, name)| type_url == url || (type_url.is_empty() && filter.name == name))
    })
}

/// The one network filter of a filter chain (`http_connection_manager` or
/// `tcp_proxy`) into `file`; where its routes come from.
/// A filter chain's network filters: one `http_connection_manager` or
/// `tcp_proxy`, the latter optionally after a network RBAC filter, which
/// becomes the TCP listener's `rbac`.
fn chain_filters(
    chain: &listener::FilterChain,
    cpath: &str,
    file: &mut ListenerFile,
    ctx: &mut Ctx,
    log_clusters: &dyn Fn(&str) -> Option<String>,
) -> RouteSource {
    if let Some((limit, rest)) = limits::split_network_limit(chain, cpath, ctx) {
        let source = chain_filters(&rest, cpath, file, ctx, log_clusters);
        limits::attach_network_limit(file, limit, cpath, ctx);
        return source;
    }
    let rbac_any = match chain.filters.as_slice() {
        [first, _, ..] => match &first.config_type {
            Some(listener::filter::ConfigType::TypedConfig(any))
                if any.type_url == NETWORK_RBAC_TYPE =>
            {
                Some(any)
            }
            _ => None,
        },
        _ => None,
    };
    let Some(any) = rbac_any else {
        return network_filter(chain, cpath, file, ctx, log_clusters);
    };
    let rbac = network_rbac_filter(any, &format!("{cpath}.filters[0].typed_config"), ctx);
    let rest = listener::FilterChain {
        filters: chain.filters[1..].to_vec(),
        ..chain.clone()
    };
    let source = network_filter(&rest, cpath, file, ctx, log_clusters);
    match &mut file.tcp {
        Some(tcp) => tcp.rbac = rbac,
        None => ctx.unsupported(format!(
            "{cpath}.filters[0] (a network RBAC filter only before a tcp_proxy)"
        )),
    }
    source
}

/// Translates an HTTP filter of a kind a listener has at most one of into
/// `slot`; a second one is refused.
fn one_filter<T>(
    slot: &mut Option<T>,
    filter: &hcm::HttpFilter,
    fpath: &str,
    second: &str,
    ctx: &mut Ctx,
    translate: impl FnOnce(&Any, &str, &mut Ctx) -> Option<T>,
) {
    if slot.is_some() {
        ctx.unsupported(format!("{fpath} ({second})"));
    }
    if let Some(hcm::http_filter::ConfigType::TypedConfig(any)) = &filter.config_type {
        *slot = translate(any, &format!("{fpath}.typed_config"), ctx);
    }
}

fn network_filter(
    chain: &listener::FilterChain,
    cpath: &str,
    file: &mut ListenerFile,
    ctx: &mut Ctx,
    log_clusters: &dyn Fn(&str) -> Option<String>,
) -> RouteSource {
    let [filter] = chain.filters.as_slice() else {
        ctx.unsupported(format!(
            "{cpath}.filters (exactly one network filter: http_connection_manager or tcp_proxy)"
        ));
        return RouteSource::None;
    };
    let fpath = format!("{cpath}.filters[0]");
    match filter.config_type.as_ref() {
        Some(listener::filter::ConfigType::TypedConfig(any)) if any.type_url == HCM_TYPE => {
            match decode::<hcm::HttpConnectionManager>(any, HCM_TYPE) {
                Ok(manager) => http_connection_manager(&manager, &fpath, file, ctx, log_clusters),
                Err(problems) => {
                    ctx.err(fpath, problems.join("; "));
                    RouteSource::None
                }
            }
        }
        Some(listener::filter::ConfigType::TypedConfig(any)) if any.type_url == TCP_PROXY_TYPE => {
            match decode::<tcp_proxy::TcpProxy>(any, TCP_PROXY_TYPE) {
                Ok(proxy) => tcp(&proxy, &fpath, file, ctx, log_clusters),
                Err(problems) => ctx.err(fpath, problems.join("; ")),
            }
            RouteSource::None
        }
        Some(listener::filter::ConfigType::TypedConfig(any)) => {
            ctx.err(
                format!("{fpath}.typed_config"),
                format!("unknown network filter {}", any.type_url),
            );
            RouteSource::None
        }
        _ => {
            ctx.err(format!("{fpath}.typed_config"), "is required");
            RouteSource::None
        }
    }
}

/// Whether a Listener binds its address (`bind_to_port`, default true).
/// One that does not is only reached through a `use_original_dst`
/// listener, by the original destination of a connection.
pub fn binds_to_port(l: &listener::Listener) -> bool {
    l.bind_to_port.as_ref().is_none_or(|v| v.value)
}

/// Hands listeners that bind no port (`virtuals`) to the outbound capture
/// listeners among `listeners` as services: their address, and their
/// routes (HTTP) or cluster (TCP).
pub fn attach_virtual_listeners(listeners: &mut [ListenerFile], virtuals: &[ListenerFile]) {
    use crate::config::capture::{CaptureServiceFile, ServiceProtocol};
    for listener in listeners.iter_mut() {
        let Some(capture) = listener
            .capture
            .as_mut()
            .filter(|c| c.direction == crate::telemetry::log::TrafficDirection::Outbound)
        else {
            continue;
        };
        for v in virtuals {
            capture.services.push(CaptureServiceFile {
                address: v.address,
                cluster: v.tcp.as_ref().map(|tcp| tcp.cluster.clone()),
                virtual_hosts: v.virtual_hosts.clone(),
                // The control plane chose tcp_proxy: no sniffing.
                protocol: if v.tcp.is_some() {
                    ServiceProtocol::Opaque
                } else {
                    ServiceProtocol::Auto
                },
            });
        }
    }
}

/// Istio's names for what unmatched destinations of a capture listener get.
const PASSTHROUGH_CLUSTER: &str = "PassthroughCluster";
const BLACKHOLE_CLUSTER: &str = "BlackHoleCluster";

/// A `use_original_dst` listener (Istio's `virtualOutbound`) as an
/// outbound capture listener. Its tcp_proxy says what unmatched
/// destinations get: `PassthroughCluster` (allow) or `BlackHoleCluster`
/// (block); those clusters need not exist.
fn original_dst(l: &listener::Listener, file: &mut ListenerFile, ctx: &mut Ctx) {
    use crate::config::capture::{CaptureFile, UnknownDestinations};
    // Envoy's enum: 2 is OUTBOUND.
    if l.traffic_direction != 2 {
        ctx.err(
            "use_original_dst",
            "only on a listener with traffic_direction OUTBOUND (inbound capture from xDS is a listener with the original_dst listener filter)",
        );
        return;
    }
    let Some(tcp) = file.tcp.take() else {
        ctx.err(
            "use_original_dst",
            "the filter chain must be a tcp_proxy to PassthroughCluster or BlackHoleCluster (what unmatched destinations get)",
        );
        return;
    };
    let unknown = match tcp.cluster.as_str() {
        PASSTHROUGH_CLUSTER => UnknownDestinations::Allow,
        BLACKHOLE_CLUSTER => UnknownDestinations::Block,
        other => {
            ctx.err(
                "filter_chains[0].filters[0].cluster",
                format!("\"{other}\": a use_original_dst listener sends unmatched destinations to PassthroughCluster or BlackHoleCluster"),
            );
            return;
        }
    };
    let mut capture = CaptureFile::new(crate::telemetry::log::TrafficDirection::Outbound);
    capture.unknown_destinations = unknown;
    capture.tcp_idle_timeout = tcp.idle_timeout;
    file.kind = ListenerKind::Capture;
    file.capture = Some(capture);
}

/// Listener filters of an inbound capture listener, by type URL and name.
const ORIGINAL_DST_FILTER: (&str, &str) = (
    "type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst",
    "envoy.filters.listener.original_dst",
);
/// Postern's protocol detection does what these two do.
const INSPECTOR_FILTERS: [(&str, &str); 2] = [
    (
        "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector",
        "envoy.filters.listener.tls_inspector",
    ),
    (
        "type.googleapis.com/envoy.extensions.filters.listener.http_inspector.v3.HttpInspector",
        "envoy.filters.listener.http_inspector",
    ),
];

/// ALPN values in a filter chain match that Postern's detection stands
/// for: the HTTP ones (after the TLS of Istio's `istio-*` forms) and the
/// mesh markers.
const HTTP_ALPN: [&str; 7] = [
    "http/1.0",
    "http/1.1",
    "h2c",
    "h2",
    "istio-http/1.0",
    "istio-http/1.1",
    "istio-h2",
];
const MESH_MARKER_ALPN: [&str; 2] = ["istio", "istio-peer-exchange"];

/// What the filter chains of one `destination_port` (or of every port)
/// hold.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct PortChains {
    mtls: bool,
    plaintext: bool,
    http: bool,
    tcp: bool,
}

/// An Istio-style `virtualInbound` listener (`listener_filters` with
/// `original_dst`, filter chains by `destination_port`) as an inbound
/// capture listener. Per port Postern keeps only what its detection
/// decides: a port whose chains are all `tcp_proxy` is opaque, one with an
/// HTTP connection manager is sniffed. The HTTP settings, the mTLS setting
/// and the TCP idle timeout are the listener's, so chains that differ in
/// them are refused. Returns the clusters the chains name.
fn inbound_capture(
    l: &listener::Listener,
    file: &mut ListenerFile,
    sds: Option<&SdsSourceFile>,
    ctx: &mut Ctx,
    log_clusters: &dyn Fn(&str) -> Option<String>,
) -> Vec<AppTarget> {
    use crate::config::capture::{CaptureFile, PortRange};
    use listener::listener_filter::ConfigType as FilterConfig;
    let mut original_dst = false;
    for (i, filter) in l.listener_filters.iter().enumerate() {
        let fpath = format!("listener_filters[{i}]");
        let type_url = match &filter.config_type {
            Some(FilterConfig::TypedConfig(any)) => any.type_url.as_str(),
            Some(_) => {
                ctx.unsupported(format!("{fpath}.config_discovery"));
                continue;
            }
            None => "",
        };
        let is = |(url, name): (&str, &str)| {
            type_url == url || (type_url.is_empty() && filter.name == name)
        };
        if filter.filter_disabled.is_some() {
            ctx.unsupported(format!("{fpath}.filter_disabled"));
        }
        if is(ORIGINAL_DST_FILTER) {
            original_dst = true;
        } else if !INSPECTOR_FILTERS.into_iter().any(is) {
            ctx.err(
                fpath,
                format!(
                    "listener filter {} ({type_url}) is not supported (only original_dst, tls_inspector, http_inspector)",
                    filter.name
                ),
            );
        }
    }
    if !original_dst {
        ctx.err(
            "listener_filters",
            "a listener with listener filters is an inbound capture listener: it needs envoy.filters.listener.original_dst",
        );
    }
    // Envoy's enum: 1 is INBOUND.
    if l.traffic_direction != 1 {
        ctx.err(
            "traffic_direction",
            "must be INBOUND with listener_filters (outbound capture is use_original_dst)",
        );
    }
    if l.use_original_dst.as_ref().is_some_and(|v| v.value) {
        ctx.unsupported("use_original_dst (with listener_filters)");
    }
    let mut capture = CaptureFile::new(crate::telemetry::log::TrafficDirection::Inbound);
    // Absent or zero (Envoy: wait forever): Postern's default. Postern
    // always gives up on a silent client, so server-first protocols work.
    if let Some(timeout) =
        duration_field(&l.listener_filters_timeout, "listener_filters_timeout", ctx)
            .filter(|t| !t.is_zero())
    {
        if !l.continue_on_listener_filters_timeout {
            ctx.err(
                "continue_on_listener_filters_timeout",
                "must be true: Postern proxies a client silent past the timeout as TCP",
            );
        }
        capture.detection_timeout = timeout;
    }

    let chains: Vec<(String, &listener::FilterChain)> = l
        .filter_chains
        .iter()
        .enumerate()
        .map(|(i, c)| (format!("filter_chains[{i}]"), c))
        .chain(
            l.default_filter_chain
                .iter()
                .map(|c| ("default_filter_chain".to_string(), c)),
        )
        .collect();
    if chains.is_empty() {
        ctx.err("filter_chains", "needs at least one filter chain");
    }
    let mut ports: std::collections::BTreeMap<Option<u16>, PortChains> = Default::default();
    let mut targets = Vec::new();
    // The first chain's shared settings, as JSON, and where they came from.
    let mut http_settings: Option<(String, String)> = None;
    let mut tcp_settings: Option<(String, String)> = None;
    let mut als: Option<(String, String)> = None;
    let mut mtls: Option<(String, ListenerMtlsFile)> = None;
    for (cpath, chain) in chains {
        let m = chain.filter_chain_match.clone().unwrap_or_default();
        let mpath = format!("{cpath}.filter_chain_match");
        let port = match &m.destination_port {
            Some(p) => match u16::try_from(p.value) {
                Ok(port) if port > 0 => Some(port),
                _ => {
                    ctx.err(format!("{mpath}.destination_port"), "must be 1 to 65535");
                    None
                }
            },
            None => None,
        };
        for (field, set) in [
            ("server_names", !m.server_names.is_empty()),
            ("source_prefix_ranges", !m.source_prefix_ranges.is_empty()),
            (
                "direct_source_prefix_ranges",
                !m.direct_source_prefix_ranges.is_empty(),
            ),
            ("source_ports", !m.source_ports.is_empty()),
            ("source_type", m.source_type != 0),
            ("address_suffix", !m.address_suffix.is_empty()),
            ("suffix_len", m.suffix_len.is_some()),
        ] {
            if set {
                ctx.unsupported(format!("{mpath}.{field}"));
            }
        }
        for (i, range) in m.prefix_ranges.iter().enumerate() {
            // Every address of the pod is the pod: only "any" is allowed.
            if range.prefix_len.as_ref().is_some_and(|p| p.value != 0) {
                ctx.unsupported(format!(
                    "{mpath}.prefix_ranges[{i}] (only a zero-length prefix)"
                ));
            }
        }
        let tls_expected = match m.transport_protocol.as_str() {
            "" => None,
            "tls" => Some(true),
            "raw_buffer" => Some(false),
            other => {
                ctx.unsupported(format!("{mpath}.transport_protocol \"{other}\""));
                None
            }
        };
        let mut http_alpn = false;
        for (i, alpn) in m.application_protocols.iter().enumerate() {
            if HTTP_ALPN.contains(&alpn.as_str()) {
                http_alpn = true;
            } else if !MESH_MARKER_ALPN.contains(&alpn.as_str()) {
                ctx.unsupported(format!("{mpath}.application_protocols[{i}] \"{alpn}\""));
            }
        }

        let mut scratch = file.clone();
        let chain_mtls = chain.transport_socket.as_ref().and_then(|socket| {
            downstream_tls(socket, &format!("{cpath}.transport_socket"), sds, ctx)
        });
        if tls_expected == Some(true) && chain.transport_socket.is_none() {
            ctx.unsupported(format!(
                "{cpath} (TLS passed through to the app: Postern's inbound side terminates mesh mTLS or takes plaintext)"
            ));
        }
        let routes = network_filter(chain, &cpath, &mut scratch, ctx, log_clusters);
        let entry = ports.entry(port).or_default();
        if let Some(chain_mtls) = chain_mtls {
            entry.mtls = true;
            match &mtls {
                None => mtls = Some((cpath.clone(), chain_mtls)),
                Some((first, known)) => {
                    let mut a = known.allowed_identities.clone();
                    let mut b = chain_mtls.allowed_identities.clone();
                    a.sort();
                    b.sort();
                    if a != b {
                        ctx.err(
                            format!("{cpath}.transport_socket"),
                            format!("allows other SPIFFE IDs than {first}: Postern has one mTLS setting per listener"),
                        );
                    }
                }
            }
        } else {
            entry.plaintext = true;
        }
        let fpath = format!("{cpath}.filters[0]");
        match (scratch.kind, &scratch.tcp) {
            (ListenerKind::Tcp, Some(tcp)) => {
                if http_alpn {
                    ctx.unsupported(format!(
                        "{mpath}.application_protocols (HTTP on a tcp_proxy chain: Postern proxies HTTP it detects as HTTP)"
                    ));
                }
                entry.tcp = true;
                targets.push(AppTarget {
                    field: format!("{fpath}.cluster"),
                    cluster: tcp.cluster.clone(),
                    port,
                });
                let shared = format!("{:?}", tcp.idle_timeout);
                agree(
                    &mut tcp_settings,
                    shared,
                    &fpath,
                    "tcp_proxy idle_timeout",
                    ctx,
                );
                capture.tcp_idle_timeout = tcp.idle_timeout;
            }
            (ListenerKind::Http, _) => {
                entry.http = true;
                if routes != RouteSource::Inline {
                    ctx.unsupported(format!(
                        "{fpath}.rds (an inbound chain takes an inline route_config)"
                    ));
                }
                inbound_routes(&scratch.virtual_hosts, &fpath, port, &mut targets, ctx);
                let shared = serde_json::json!({
                    "http": scratch.http,
                    "limits": scratch.limits,
                    "tracing": scratch.tracing,
                })
                .to_string();
                if http_settings.is_none() {
                    file.http = scratch.http.clone();
                    file.limits = scratch.limits.clone();
                    file.tracing = scratch.tracing;
                }
                agree(
                    &mut http_settings,
                    shared,
                    &fpath,
                    "HTTP settings (filters, limits, tracing)",
                    ctx,
                );
            }
            // The filter itself was refused already.
            _ => continue,
        }
        // One access-log stream per listener, whichever chain a call takes.
        let log = serde_json::to_string(&scratch.access_log_service).unwrap_or_default();
        if als.is_none() {
            file.access_log_service = scratch.access_log_service.clone();
        }
        agree(&mut als, log, &fpath, "access_log", ctx);
    }

    // One mTLS mode for the listener: every port's chains must agree.
    let modes: std::collections::BTreeSet<(bool, bool)> =
        ports.values().map(|p| (p.mtls, p.plaintext)).collect();
    if modes.len() > 1 {
        ctx.err(
            "filter_chains",
            "ports with different mTLS modes are not supported (Postern has one per listener)",
        );
    }
    file.mtls = mtls.map(|(_, mut m)| {
        if ports.values().any(|p| p.plaintext) {
            m.mode = MtlsMode::Permissive;
        }
        m
    });
    match ports.get(&None) {
        None if !ports.is_empty() => ctx.err(
            "filter_chains",
            "needs a chain without destination_port: Postern's inbound capture takes every port",
        ),
        Some(any) if !any.http && ports.values().any(|p| p.http) => ctx.err(
            "filter_chains",
            "other ports TCP only while some port has HTTP is not supported (Postern sniffs every port that is not opaque)",
        ),
        _ => {}
    }
    for (port, chains) in &ports {
        if chains.http {
            continue;
        }
        match port {
            Some(port) => capture.opaque_ports.push(PortRange {
                first: *port,
                last: *port,
            }),
            None => capture.opaque_ports.push(PortRange {
                first: 1,
                last: u16::MAX,
            }),
        }
    }
    file.kind = ListenerKind::Capture;
    file.capture = Some(capture);
    file.virtual_hosts.clear();
    file.tcp = None;
    targets
}

/// Records the first chain's `settings`, or checks a later chain's against
/// them.
fn agree(
    first: &mut Option<(String, String)>,
    settings: String,
    field: &str,
    what: &str,
    ctx: &mut Ctx,
) {
    match first {
        None => *first = Some((settings, field.to_string())),
        Some((known, from)) if *known != settings => ctx.unsupported(format!(
            "{field} ({what} differ from {from}'s: Postern has one set per listener)"
        )),
        Some(_) => {}
    }
}

/// Checks that an inbound chain's routes send every request, unchanged, to
/// one cluster, as Postern's inbound side does; notes the clusters.
fn inbound_routes(
    hosts: &[VirtualHostFile],
    fpath: &str,
    port: Option<u16>,
    targets: &mut Vec<AppTarget>,
    ctx: &mut Ctx,
) {
    let rpath = format!("{fpath}.route_config");
    let catch_all = |m: &RouteMatchFile| {
        m.headers.is_empty()
            && m.methods.is_empty()
            && m.query.is_empty()
            && match &m.path {
                None => true,
                Some(path) => {
                    serde_json::to_value(path).ok() == Some(serde_json::json!({ "prefix": "/" }))
                }
            }
    };
    let mut any = false;
    for (i, host) in hosts.iter().enumerate() {
        let hpath = format!("{rpath}.virtual_hosts[{i}]");
        if !host.domains.iter().any(|d| d == "*") {
            ctx.unsupported(format!(
                "{hpath}.domains (an inbound chain takes every host: \"*\")"
            ));
        }
        for (j, route) in host.routes.iter().enumerate() {
            let path = format!("{hpath}.routes[{j}]");
            let plain = route.weighted_clusters.is_none()
                && route.direct_response.is_none()
                && route.redirect.is_none()
                && route.timeout.is_none_or(|t| t.is_zero())
                && route.retry.is_none()
                && route.rewrite.is_none()
                && route.local_rate_limit.is_none()
                && route.jwt.is_none()
                && route.rbac.is_none()
                && route.access_log.is_none()
                && catch_all(&route.matcher);
            match (&route.cluster, plain) {
                (Some(cluster), true) => {
                    any = true;
                    targets.push(AppTarget {
                        field: format!("{path}.route.cluster"),
                        cluster: cluster.clone(),
                        port,
                    });
                }
                _ => ctx.unsupported(format!(
                    "{path} (an inbound route sends every request as it is to one cluster: a prefix \"/\" match and a cluster, no timeout, retry, rewrite or per-route filter)"
                )),
            }
        }
    }
    if !any {
        ctx.err(rpath, "needs a route to the app");
    }
}

/// The gRPC access logger of a filter, as the listener's access-log
/// stream. Envoy's file and stdout loggers are skipped with a log line: the
/// bootstrap's `telemetry.access_log` writes this proxy's lines, and what
/// is logged changes no traffic.
fn access_loggers(
    loggers: &[postern_proto::envoy::config::accesslog::v3::AccessLog],
    path: &str,
    ctx: &mut Ctx,
    log_clusters: &dyn Fn(&str) -> Option<String>,
) -> Option<crate::telemetry::als::AlsConfig> {
    use postern_proto::envoy::config::accesslog::v3::access_log::ConfigType;
    let mut found = None;
    for (i, logger) in loggers.iter().enumerate() {
        let lpath = format!("{path}.access_log[{i}]");
        let Some(ConfigType::TypedConfig(any)) = &logger.config_type else {
            ctx.unsupported(format!("{lpath}.config_type (only typed_config)"));
            continue;
        };
        if !any.type_url.ends_with("GrpcAccessLogConfig") {
            tracing::info!(logger = %logger.name, type_url = %any.type_url, "access logger skipped; telemetry.access_log in the bootstrap writes this proxy's access log");
            continue;
        }
        if logger.filter.is_some() {
            ctx.unsupported(format!("{lpath}.filter"));
            continue;
        }
        if found.is_some() {
            ctx.unsupported(format!("{lpath} (a second gRPC access logger)"));
            continue;
        }
        match crate::telemetry::als::AlsConfig::from_envoy(any, log_clusters) {
            Ok(config) => found = Some(config),
            Err(reason) => ctx.err(format!("{lpath}.typed_config"), reason),
        }
    }
    found
}

fn http_connection_manager(
    m: &hcm::HttpConnectionManager,
    path: &str,
    file: &mut ListenerFile,
    ctx: &mut Ctx,
    log_clusters: &dyn Fn(&str) -> Option<String>,
) -> RouteSource {
    use hcm::http_connection_manager::RouteSpecifier;
    file.kind = ListenerKind::Http;
    file.access_log_service = access_loggers(&m.access_log, path, ctx, log_clusters);
    if let Some(tracing) = &m.tracing {
        // The collector is the bootstrap's (`telemetry.tracing`); the
        // listener's share of new traces comes from here.
        if let Some(percent) = &tracing.random_sampling {
            let sampling = (percent.value / 100.0).clamp(0.0, 1.0);
            file.tracing = Some(ListenerTracingFile { sampling });
        }
        if tracing.provider.is_some() {
            tracing::info!(
                "tracing provider from xDS ignored; spans go to telemetry.tracing's collector"
            );
        }
    }
    policy::check_http_filter_order(&m.http_filters, path, ctx);
    for (i, filter) in m.http_filters.iter().enumerate() {
        let fpath = format!("{path}.http_filters[{i}]");
        if filter.disabled {
            // Off unless a route turns it on, which Postern refuses.
            tracing::debug!(filter = %filter.name, "HTTP filter disabled; not run");
            continue;
        }
        let type_url = match &filter.config_type {
            Some(hcm::http_filter::ConfigType::TypedConfig(any)) => any.type_url.as_str(),
            _ => "",
        };
        if type_url == ROUTER_TYPE
            || (type_url.is_empty() && filter.name == "envoy.filters.http.router")
        {
            continue;
        }
        if type_url == LOCAL_RATELIMIT_TYPE {
            one_filter(
                &mut file.http.local_rate_limit,
                filter,
                &fpath,
                "a second local rate limit filter",
                ctx,
                local_rate_limit_filter,
            );
            continue;
        }
        if type_url == RATELIMIT_TYPE {
            one_filter(
                &mut file.http.rate_limit_service,
                filter,
                &fpath,
                "a second rate limit filter",
                ctx,
                rate_limit_filter,
            );
            continue;
        }
        if type_url == JWT_AUTHN_TYPE {
            one_filter(
                &mut file.http.jwt,
                filter,
                &fpath,
                "a second JWT authentication filter",
                ctx,
                jwt_filter,
            );
            continue;
        }
        if type_url == RBAC_TYPE {
            one_filter(
                &mut file.http.rbac,
                filter,
                &fpath,
                "a second RBAC filter",
                ctx,
                rbac_filter,
            );
            continue;
        }
        if filter.is_optional {
            tracing::info!(filter = %filter.name, type_url, "optional HTTP filter not supported; skipped");
            continue;
        }
        ctx.err(
            fpath,
            format!(
                "HTTP filter {} ({type_url}) is not supported and not optional",
                filter.name
            ),
        );
    }
    if let Some(timeout) = m.request_headers_timeout.as_ref().and_then(duration) {
        if !timeout.is_zero() {
            file.limits.header_read_timeout = timeout;
        }
    }
    if let Some(idle) = m
        .common_http_protocol_options
        .as_ref()
        .and_then(|o| o.idle_timeout.as_ref())
        .and_then(duration)
    {
        if !idle.is_zero() {
            file.limits.idle_timeout = idle;
        }
    }
    if let Some(n) = m.max_request_headers_kb.as_ref() {
        file.limits.max_request_headers_bytes = n.value as usize * 1024;
    }
    if let Some(options) = &m.common_http_protocol_options {
        file.limits.headers_with_underscores = underscore_headers(
            options.headers_with_underscores_action,
            &format!("{path}.common_http_protocol_options.headers_with_underscores_action"),
            ctx,
        );
    }
    ignored::connection_manager(m, path, file, ctx);
    file.http.trust_downstream = m.use_remote_address.as_ref().is_some_and(|v| !v.value);
    // Postern normalises by default (Envoy does not): only an explicit
    // setting turns it off.
    if let Some(normalize) = &m.normalize_path {
        file.http.normalize_path = normalize.value;
    }
    if m.merge_slashes {
        file.http.merge_slashes = true;
    }
    use crate::route::normalize::EscapedSlashes;
    file.http.escaped_slashes = match m.path_with_escaped_slashes_action {
        1 => EscapedSlashes::Keep,
        2 => EscapedSlashes::Reject,
        3 | 4 => EscapedSlashes::Decode,
        _ => EscapedSlashes::Reject,
    };
    match &m.route_specifier {
        Some(RouteSpecifier::Rds(rds)) => RouteSource::Rds(rds.route_config_name.clone()),
        Some(RouteSpecifier::RouteConfig(rc)) => {
            match route_configuration(rc) {
                Ok(routes) => routes.apply_to(file),
                Err(problems) => {
                    for p in problems {
                        ctx.err(format!("{path}.route_config"), p);
                    }
                }
            }
            RouteSource::Inline
        }
        _ => {
            ctx.unsupported(format!(
                "{path}.route_specifier (only rds and route_config)"
            ));
            RouteSource::None
        }
    }
}

/// Envoy's `headers_with_underscores_action` as the listener setting; an
/// unknown value is an error at `path`.
fn underscore_headers(
    action: i32,
    path: &str,
    ctx: &mut Ctx,
) -> crate::http::headers::UnderscoreHeaders {
    use crate::http::headers::UnderscoreHeaders;
    use core::http_protocol_options::HeadersWithUnderscoresAction as Action;
    match Action::try_from(action) {
        Ok(Action::Allow) => UnderscoreHeaders::Allow,
        Ok(Action::RejectRequest) => UnderscoreHeaders::RejectRequest,
        Ok(Action::DropHeader) => UnderscoreHeaders::DropHeader,
        Err(_) => {
            ctx.err(path, format!("unknown value {action}"));
            UnderscoreHeaders::Allow
        }
    }
}

fn tcp(
    p: &tcp_proxy::TcpProxy,
    path: &str,
    file: &mut ListenerFile,
    ctx: &mut Ctx,
    log_clusters: &dyn Fn(&str) -> Option<String>,
) {
    use tcp_proxy::tcp_proxy::ClusterSpecifier;
    file.kind = ListenerKind::Tcp;
    file.access_log_service = access_loggers(&p.access_log, path, ctx, log_clusters);
    let cluster = match &p.cluster_specifier {
        Some(ClusterSpecifier::Cluster(name)) => name.clone(),
        _ => {
            ctx.unsupported(format!("{path}.cluster_specifier (only cluster)"));
            String::new()
        }
    };
    file.tcp = Some(TcpProxyFile {
        cluster,
        idle_timeout: p
            .idle_timeout
            .as_ref()
            .and_then(duration)
            .filter(|d| !d.is_zero())
            .unwrap_or(Duration::from_secs(3600)),
        rbac: None,
        local_rate_limit: None,
    });
}

// -------------------------------------------------------------------- tls --

use postern_proto::envoy::extensions::transport_sockets::tls::v3 as tls;

fn typed_socket<'a>(
    socket: &'a core::TransportSocket,
    path: &str,
    ctx: &mut Ctx,
) -> Option<&'a Any> {
    match &socket.config_type {
        Some(core::transport_socket::ConfigType::TypedConfig(any)) => Some(any),
        None => {
            ctx.err(format!("{path}.typed_config"), "is required");
            None
        }
    }
}

/// Checks that a TLS context uses the workload identity's SDS secrets
/// (Postern presents one identity, checked against one bundle) and returns
/// the exact SPIFFE IDs its subject-alt-name matchers allow.
fn check_sds_names(
    common: Option<&tls::CommonTlsContext>,
    path: &str,
    sds: Option<&SdsSourceFile>,
    ctx: &mut Ctx,
) -> Vec<String> {
    use tls::common_tls_context::ValidationContextType as V;
    let Some(common) = common else {
        ctx.err(format!("{path}.common_tls_context"), "is required");
        return Vec::new();
    };
    if !common.tls_certificates.is_empty() {
        ctx.unsupported(format!(
            "{path}.common_tls_context.tls_certificates (inline keys; use SDS)"
        ));
    }
    let Some(names) = sds else {
        ctx.err(
            path,
            "TLS from xDS uses the workload identity: configure an identity",
        );
        return Vec::new();
    };
    for (i, secret) in common.tls_certificate_sds_secret_configs.iter().enumerate() {
        if secret.name != names.certificate {
            ctx.err(
                format!("{path}.common_tls_context.tls_certificate_sds_secret_configs[{i}].name"),
                format!(
                    "\"{}\" is not the workload certificate \"{}\"",
                    secret.name, names.certificate
                ),
            );
        }
    }
    let (validation_name, default_context) = match &common.validation_context_type {
        Some(V::ValidationContextSdsSecretConfig(secret)) => (Some(secret.name.as_str()), None),
        Some(V::CombinedValidationContext(combined)) => (
            combined
                .validation_context_sds_secret_config
                .as_ref()
                .map(|s| s.name.as_str()),
            combined.default_validation_context.as_ref(),
        ),
        Some(_) => {
            ctx.unsupported(format!("{path}.common_tls_context.validation_context_type"));
            (None, None)
        }
        None => (None, None),
    };
    if let Some(name) = validation_name {
        if name != names.validation {
            ctx.err(
                format!("{path}.common_tls_context.validation_context"),
                format!(
                    "\"{name}\" is not the workload trust bundle \"{}\"",
                    names.validation
                ),
            );
        }
    }
    let mut ids = Vec::new();
    let Some(context) = default_context else {
        return ids;
    };
    let mut take = |m: &matcher::StringMatcher, field: String, ctx: &mut Ctx| match &m.match_pattern
    {
        Some(matcher::string_matcher::MatchPattern::Exact(id)) => ids.push(id.clone()),
        // Istio's "any workload of the trust domain": what an empty list means here.
        Some(matcher::string_matcher::MatchPattern::Prefix(p))
            if p.starts_with("spiffe://") && p.ends_with('/') => {}
        _ => ctx.unsupported(format!(
            "{field} (only exact SPIFFE IDs or a spiffe://<trust-domain>/ prefix)"
        )),
    };
    for (i, m) in context.match_typed_subject_alt_names.iter().enumerate() {
        let field = format!("{path}.match_typed_subject_alt_names[{i}]");
        if m.san_type != tls::subject_alt_name_matcher::SanType::Uri as i32 {
            ctx.unsupported(format!("{field}.san_type (only URI)"));
            continue;
        }
        if let Some(sm) = &m.matcher {
            take(sm, field, ctx);
        }
    }
    #[allow(deprecated)]
    for (i, m) in context.match_subject_alt_names.iter().enumerate() {
        take(m, format!("{path}.match_subject_alt_names[{i}]"), ctx);
    }
    ids
}

fn downstream_context(
    socket: &core::TransportSocket,
    path: &str,
    ctx: &mut Ctx,
) -> Option<tls::DownstreamTlsContext> {
    let any = typed_socket(socket, path, ctx)?;
    match decode(any, DOWNSTREAM_TLS_TYPE) {
        Ok(context) => Some(context),
        Err(problems) => {
            ctx.err(path, problems.join("; "));
            None
        }
    }
}

fn downstream_tls(
    socket: &core::TransportSocket,
    path: &str,
    sds: Option<&SdsSourceFile>,
    ctx: &mut Ctx,
) -> Option<ListenerMtlsFile> {
    let context = downstream_context(socket, path, ctx)?;
    mesh_mtls(&context, path, sds, ctx)
}

fn mesh_mtls(
    context: &tls::DownstreamTlsContext,
    path: &str,
    sds: Option<&SdsSourceFile>,
    ctx: &mut Ctx,
) -> Option<ListenerMtlsFile> {
    if !context
        .require_client_certificate
        .as_ref()
        .is_some_and(|r| r.value)
    {
        ctx.unsupported(format!(
            "{path}.require_client_certificate: false (edge TLS comes from the static config)"
        ));
    }
    let allowed = check_sds_names(context.common_tls_context.as_ref(), path, sds, ctx);
    Some(ListenerMtlsFile {
        mode: MtlsMode::Strict,
        allowed_identities: allowed,
    })
}

fn upstream_tls(
    socket: &core::TransportSocket,
    path: &str,
    sds: Option<&SdsSourceFile>,
    ctx: &mut Ctx,
) -> Option<UpstreamTlsFile> {
    let any = typed_socket(socket, path, ctx)?;
    let context: tls::UpstreamTlsContext = match decode(any, UPSTREAM_TLS_TYPE) {
        Ok(context) => context,
        Err(problems) => {
            ctx.err(path, problems.join("; "));
            return None;
        }
    };
    let mesh = sds
        .is_some_and(|names| upstream::names_identity(context.common_tls_context.as_ref(), names));
    if !mesh {
        return upstream::simple_tls(&context, path, ctx);
    }
    let identities = check_sds_names(context.common_tls_context.as_ref(), path, sds, ctx);
    if identities.is_empty() && sds.is_some() {
        ctx.err(
            format!("{path}.common_tls_context"),
            "mesh TLS needs the SPIFFE IDs the endpoints may present (match_typed_subject_alt_names: URI, exact)",
        );
    }
    Some(UpstreamTlsFile {
        mode: UpstreamTlsMode::Mesh,
        identities,
        ca: None,
        server_name: (!context.sni.is_empty()).then(|| context.sni.clone()),
        subject_alt_names: Vec::new(),
        client_cert: None,
        client_key: None,
        alpn: None,
        ca_inline: None,
        client_inline: None,
        ca_secret: None,
        client_secret: None,
    })
}

/// What a Secret carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretValue {
    /// PEM chain and PEM key.
    Certificate(Vec<u8>, Vec<u8>),
    /// PEM trust bundle.
    Validation(Vec<u8>),
}

fn inline(source: &Option<core::DataSource>, path: &str, ctx: &mut Ctx) -> Vec<u8> {
    match source.as_ref().and_then(|s| s.specifier.as_ref()) {
        Some(core::data_source::Specifier::InlineBytes(b)) => b.clone(),
        Some(core::data_source::Specifier::InlineString(s)) => s.clone().into_bytes(),
        Some(_) => {
            ctx.unsupported(format!("{path} (only inline bytes or string)"));
            Vec::new()
        }
        None => {
            ctx.err(path, "is required");
            Vec::new()
        }
    }
}

/// A Secret: a certificate with its key, or a validation context's roots;
/// checked to parse, so a bad one is NACKed rather than installed.
pub fn secret(s: &tls::Secret) -> Result<SecretValue, Problems> {
    let mut ctx = Ctx::new();
    let value = match &s.r#type {
        Some(tls::secret::Type::TlsCertificate(cert)) => {
            let chain = inline(
                &cert.certificate_chain,
                "tls_certificate.certificate_chain",
                &mut ctx,
            );
            let key = inline(&cert.private_key, "tls_certificate.private_key", &mut ctx);
            if let Err(e) = postern_certs::x509::parse_pem_chain(&chain, "certificate chain") {
                ctx.err("tls_certificate.certificate_chain", e.to_string());
            }
            if let Err(e) = postern_certs::x509::parse_pem_key(&key) {
                ctx.err("tls_certificate.private_key", e.to_string());
            }
            SecretValue::Certificate(chain, key)
        }
        Some(tls::secret::Type::ValidationContext(validation)) => {
            upstream::validation_secret_fields(validation, &mut ctx);
            let roots = inline(
                &validation.trusted_ca,
                "validation_context.trusted_ca",
                &mut ctx,
            );
            if let Err(e) = postern_certs::TrustBundle::from_pem(&roots) {
                ctx.err("validation_context.trusted_ca", e.to_string());
            }
            SecretValue::Validation(roots)
        }
        _ => {
            ctx.unsupported("type (only tls_certificate and validation_context)");
            SecretValue::Validation(Vec::new())
        }
    };
    ctx.finish(value)
}

// ------------------------------------------------------------------- rbac --

use postern_proto::envoy::config::rbac::v3 as rbac;

/// Type URL of the HTTP RBAC filter's config.
const RBAC_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC";

fn rbac_string(m: &matcher::StringMatcher, path: &str, ctx: &mut Ctx) -> StringMatchFile {
    use matcher::string_matcher::MatchPattern;
    if m.ignore_case {
        ctx.unsupported(format!("{path}.ignore_case"));
    }
    match &m.match_pattern {
        Some(MatchPattern::Exact(v)) => StringMatchFile {
            exact: Some(v.clone()),
            ..Default::default()
        },
        Some(MatchPattern::Prefix(v)) => StringMatchFile {
            prefix: Some(v.clone()),
            ..Default::default()
        },
        Some(MatchPattern::SafeRegex(re)) => StringMatchFile {
            regex: Some(re.regex.clone()),
            ..Default::default()
        },
        Some(MatchPattern::Suffix(v)) => StringMatchFile {
            regex: Some(format!(".*{}", regex::escape(v))),
            ..Default::default()
        },
        Some(MatchPattern::Contains(v)) => StringMatchFile {
            regex: Some(format!(".*{}.*", regex::escape(v))),
            ..Default::default()
        },
        _ => {
            ctx.unsupported(format!("{path}.match_pattern"));
            StringMatchFile::default()
        }
    }
}

fn cidr_text(range: &core::CidrRange) -> String {
    format!(
        "{}/{}",
        range.address_prefix,
        range.prefix_len.as_ref().map_or_else(
            || if range.address_prefix.contains(':') {
                128
            } else {
                32
            },
            |l| l.value
        )
    )
}

fn rbac_permission(p: &rbac::Permission, path: &str, ctx: &mut Ctx) -> PermissionFile {
    use rbac::permission::Rule;
    let list = |rules: &[rbac::Permission], key: &str, ctx: &mut Ctx| {
        rules
            .iter()
            .enumerate()
            .map(|(i, r)| rbac_permission(r, &format!("{path}.{key}[{i}]"), ctx))
            .collect::<Vec<_>>()
    };
    match &p.rule {
        Some(Rule::Any(any)) => PermissionFile {
            any: Some(*any),
            ..Default::default()
        },
        Some(Rule::AndRules(set)) => PermissionFile {
            and: Some(list(&set.rules, "and_rules", ctx)),
            ..Default::default()
        },
        Some(Rule::OrRules(set)) => PermissionFile {
            or: Some(list(&set.rules, "or_rules", ctx)),
            ..Default::default()
        },
        Some(Rule::NotRule(inner)) => PermissionFile {
            not: Some(Box::new(rbac_permission(
                inner,
                &format!("{path}.not_rule"),
                ctx,
            ))),
            ..Default::default()
        },
        Some(Rule::Header(h)) if h.name == ":method" => {
            let method = header_match(h, &format!("{path}.header"), ctx).and_then(|m| m.exact);
            if method.is_none() || h.invert_match {
                ctx.unsupported(format!("{path}.header :method (only an exact method)"));
            }
            PermissionFile {
                method,
                ..Default::default()
            }
        }
        Some(Rule::Header(h)) => PermissionFile {
            header: header_match(h, &format!("{path}.header"), ctx),
            ..Default::default()
        },
        Some(Rule::UrlPath(pm)) => match &pm.rule {
            Some(matcher::path_matcher::Rule::Path(sm)) => PermissionFile {
                path: Some(rbac_string(sm, &format!("{path}.url_path.path"), ctx)),
                ..Default::default()
            },
            None => {
                ctx.err(format!("{path}.url_path"), "is empty");
                PermissionFile::default()
            }
        },
        Some(Rule::DestinationPort(port)) => PermissionFile {
            destination_port: u16::try_from(*port).ok(),
            ..Default::default()
        },
        Some(Rule::RequestedServerName(sm)) => PermissionFile {
            requested_server_name: Some(rbac_string(
                sm,
                &format!("{path}.requested_server_name"),
                ctx,
            )),
            ..Default::default()
        },
        _ => {
            ctx.unsupported(format!("{path}.rule"));
            PermissionFile::default()
        }
    }
}

fn rbac_principal(p: &rbac::Principal, path: &str, ctx: &mut Ctx) -> PrincipalFile {
    use rbac::principal::Identifier;
    let list = |ids: &[rbac::Principal], key: &str, ctx: &mut Ctx| {
        ids.iter()
            .enumerate()
            .map(|(i, r)| rbac_principal(r, &format!("{path}.{key}[{i}]"), ctx))
            .collect::<Vec<_>>()
    };
    #[allow(deprecated)]
    match &p.identifier {
        Some(Identifier::Any(any)) => PrincipalFile {
            any: Some(*any),
            ..Default::default()
        },
        Some(Identifier::AndIds(set)) => PrincipalFile {
            and: Some(list(&set.ids, "and_ids", ctx)),
            ..Default::default()
        },
        Some(Identifier::OrIds(set)) => PrincipalFile {
            or: Some(list(&set.ids, "or_ids", ctx)),
            ..Default::default()
        },
        Some(Identifier::NotId(inner)) => PrincipalFile {
            not: Some(Box::new(rbac_principal(
                inner,
                &format!("{path}.not_id"),
                ctx,
            ))),
            ..Default::default()
        },
        Some(Identifier::Authenticated(auth)) => match &auth.principal_name {
            // The peer's URI SAN is its SPIFFE ID.
            Some(name) => PrincipalFile {
                spiffe_id: Some(rbac_string(
                    name,
                    &format!("{path}.authenticated.principal_name"),
                    ctx,
                )),
                ..Default::default()
            },
            None => PrincipalFile {
                authenticated: Some(true),
                ..Default::default()
            },
        },
        // Postern has no PROXY protocol or trusted XFF yet: the connection's
        // address is the remote address.
        Some(
            Identifier::DirectRemoteIp(range)
            | Identifier::RemoteIp(range)
            | Identifier::SourceIp(range),
        ) => PrincipalFile {
            source_ip: Some(cidr_text(range)),
            ..Default::default()
        },
        Some(Identifier::Header(h)) => PrincipalFile {
            header: header_match(h, &format!("{path}.header"), ctx),
            ..Default::default()
        },
        Some(Identifier::Metadata(m)) => {
            jwt_metadata_principal(m, &format!("{path}.metadata"), ctx)
        }
        Some(Identifier::SourcedMetadata(sourced))
            if sourced.metadata_source == rbac::MetadataSource::Dynamic as i32 =>
        {
            match &sourced.metadata_matcher {
                Some(m) => jwt_metadata_principal(
                    m,
                    &format!("{path}.sourced_metadata.metadata_matcher"),
                    ctx,
                ),
                None => {
                    ctx.err(
                        format!("{path}.sourced_metadata.metadata_matcher"),
                        "is required",
                    );
                    PrincipalFile::default()
                }
            }
        }
        _ => {
            ctx.unsupported(format!("{path}.identifier"));
            PrincipalFile::default()
        }
    }
}

/// The filter whose metadata carries verified JWT payloads.
const JWT_AUTHN_FILTER: &str = "envoy.filters.http.jwt_authn";

/// A metadata principal on `envoy.filters.http.jwt_authn` (`path`: the
/// provider's `payload_in_metadata` key, then the claim) as a `jwt_claim`
/// principal. The first key is not kept: Postern matches the claims of
/// every token verified for the request.
fn jwt_metadata_principal(
    m: &matcher::MetadataMatcher,
    path: &str,
    ctx: &mut Ctx,
) -> PrincipalFile {
    use matcher::metadata_matcher::path_segment::Segment;
    use matcher::value_matcher::MatchPattern;
    if m.filter != JWT_AUTHN_FILTER {
        ctx.unsupported(format!(
            "{path}.filter {:?} (only {JWT_AUTHN_FILTER})",
            m.filter
        ));
        return PrincipalFile::default();
    }
    let keys: Vec<&str> = m
        .path
        .iter()
        .filter_map(|s| s.segment.as_ref().map(|Segment::Key(key)| key.as_str()))
        .collect();
    if keys.len() < 2 || keys.len() != m.path.len() {
        ctx.err(
            format!("{path}.path"),
            "needs the payload key and then the claim (keys only)",
        );
        return PrincipalFile::default();
    }
    let mut pattern = m.value.as_ref().and_then(|v| v.match_pattern.as_ref());
    // A list claim matches when one element does, as every claim in Postern.
    if let Some(MatchPattern::ListMatch(list)) = pattern {
        pattern = match &list.match_pattern {
            Some(matcher::list_matcher::MatchPattern::OneOf(inner)) => inner.match_pattern.as_ref(),
            None => None,
        };
    }
    let value = match pattern {
        Some(MatchPattern::StringMatch(sm)) => rbac_string(sm, &format!("{path}.value"), ctx),
        Some(MatchPattern::BoolMatch(b)) => StringMatchFile {
            exact: Some(b.to_string()),
            ..Default::default()
        },
        Some(MatchPattern::PresentMatch(true)) => StringMatchFile {
            regex: Some("(?s).*".into()),
            ..Default::default()
        },
        _ => {
            ctx.unsupported(format!(
                "{path}.value (only string_match, bool_match, present_match: true, list_match.one_of)"
            ));
            StringMatchFile::default()
        }
    };
    let principal = PrincipalFile {
        jwt_claim: Some(JwtClaimMatchFile {
            name: keys[1..].join("."),
            exact: value.exact,
            prefix: value.prefix,
            regex: value.regex,
        }),
        ..Default::default()
    };
    if m.invert {
        PrincipalFile {
            not: Some(Box::new(principal)),
            ..Default::default()
        }
    } else {
        principal
    }
}

fn rbac_rules(r: &rbac::Rbac, path: &str, ctx: &mut Ctx) -> RbacRulesFile {
    let action = match rbac::rbac::Action::try_from(r.action) {
        Ok(rbac::rbac::Action::Allow) => RbacActionFile::Allow,
        Ok(rbac::rbac::Action::Deny) => RbacActionFile::Deny,
        Ok(rbac::rbac::Action::Log) => RbacActionFile::Log,
        Err(_) => {
            ctx.unsupported(format!("{path}.action {}", r.action));
            RbacActionFile::Allow
        }
    };
    if r.audit_logging_options.is_some() {
        ctx.unsupported(format!("{path}.audit_logging_options"));
    }
    // Envoy's policies are a map; evaluate them in name order.
    let mut names: Vec<&String> = r.policies.keys().collect();
    names.sort();
    let policies = names
        .into_iter()
        .map(|name| {
            let policy = &r.policies[name];
            let ppath = format!("{path}.policies[{name}]");
            if policy.condition.is_some() || policy.checked_condition.is_some() {
                ctx.unsupported(format!("{ppath}.condition"));
            }
            RbacPolicyFile {
                name: name.clone(),
                permissions: policy
                    .permissions
                    .iter()
                    .enumerate()
                    .map(|(i, p)| rbac_permission(p, &format!("{ppath}.permissions[{i}]"), ctx))
                    .collect(),
                principals: policy
                    .principals
                    .iter()
                    .enumerate()
                    .map(|(i, p)| rbac_principal(p, &format!("{ppath}.principals[{i}]"), ctx))
                    .collect(),
            }
        })
        .collect();
    RbacRulesFile { action, policies }
}

/// The HTTP RBAC filter's config as the listener's `rbac`.
fn rbac_filter(any: &Any, path: &str, ctx: &mut Ctx) -> Option<RbacFile> {
    let config: postern_proto::envoy::extensions::filters::http::rbac::v3::Rbac =
        match decode(any, RBAC_TYPE) {
            Ok(config) => config,
            Err(problems) => {
                ctx.err(path, problems.join("; "));
                return None;
            }
        };
    let matchers = config.matcher.is_some() || config.shadow_matcher.is_some();
    Some(rbac_file(
        config.rules.as_ref(),
        config.shadow_rules.as_ref(),
        matchers,
        path,
        ctx,
    ))
}

/// Rules and shadow rules of an HTTP or network RBAC filter; matchers
/// (the other way to write rules) are not supported.
fn rbac_file(
    rules: Option<&postern_proto::envoy::config::rbac::v3::Rbac>,
    shadow: Option<&postern_proto::envoy::config::rbac::v3::Rbac>,
    matchers: bool,
    path: &str,
    ctx: &mut Ctx,
) -> RbacFile {
    if matchers {
        ctx.unsupported(format!("{path}.matcher"));
    }
    RbacFile {
        rules: rules.map(|r| rbac_rules(r, &format!("{path}.rules"), ctx)),
        shadow: shadow.map(|r| rbac_rules(r, &format!("{path}.shadow_rules"), ctx)),
    }
}

/// Type URL of the network (L4) RBAC filter's config.
const NETWORK_RBAC_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.network.rbac.v3.RBAC";

/// The network RBAC filter's config as a TCP listener's `rbac`. Postern
/// checks a connection when it opens and again whenever the policy
/// changes, so both enforcement types hold.
fn network_rbac_filter(any: &Any, path: &str, ctx: &mut Ctx) -> Option<RbacFile> {
    let config: postern_proto::envoy::extensions::filters::network::rbac::v3::Rbac =
        match decode(any, NETWORK_RBAC_TYPE) {
            Ok(config) => config,
            Err(problems) => {
                ctx.err(path, problems.join("; "));
                return None;
            }
        };
    if config.delay_deny.is_some() {
        ctx.unsupported(format!("{path}.delay_deny"));
    }
    let matchers = config.matcher.is_some() || config.shadow_matcher.is_some();
    Some(rbac_file(
        config.rules.as_ref(),
        config.shadow_rules.as_ref(),
        matchers,
        path,
        ctx,
    ))
}

// ------------------------------------------------------------ rate limits --

/// Type URL of the HTTP local rate limit filter's config.
const LOCAL_RATELIMIT_TYPE: &str =
    "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit";

/// Whether a runtime fractional percent is 100% (`Some(true)`), 0% or unset
/// (`Some(false)`, Envoy's default), or in between (`None`: unsupported).
fn all_or_nothing(p: &Option<core::RuntimeFractionalPercent>) -> Option<bool> {
    let Some(value) = p.as_ref().and_then(|p| p.default_value.as_ref()) else {
        return Some(false);
    };
    let denominator: u64 = match value.denominator {
        0 => 100,
        1 => 10_000,
        2 => 1_000_000,
        _ => return None,
    };
    match u64::from(value.numerator) {
        0 => Some(false),
        n if n >= denominator => Some(true),
        _ => None,
    }
}

/// The local rate limit filter's config as the listener's limit; `None`
/// when the filter is not enabled (Envoy's default).
fn local_rate_limit_filter(any: &Any, path: &str, ctx: &mut Ctx) -> Option<LocalRateLimitFile> {
    let config: postern_proto::envoy::extensions::filters::http::local_ratelimit::v3::LocalRateLimit =
        match decode(any, LOCAL_RATELIMIT_TYPE) {
            Ok(config) => config,
            Err(problems) => {
                ctx.err(path, problems.join("; "));
                return None;
            }
        };
    if config.local_rate_limit_per_downstream_connection {
        ctx.unsupported(format!("{path}.local_rate_limit_per_downstream_connection"));
    }
    if config.status.as_ref().is_some_and(|s| s.code != 429) {
        ctx.unsupported(format!("{path}.status (only 429)"));
    }
    if !config.response_headers_to_add.is_empty()
        || !config.request_headers_to_add_when_not_enforced.is_empty()
    {
        ctx.unsupported(format!("{path}.*_headers_to_add"));
    }
    let (Some(enabled), Some(enforced)) = (
        all_or_nothing(&config.filter_enabled),
        all_or_nothing(&config.filter_enforced),
    ) else {
        ctx.unsupported(format!(
            "{path}.filter_enabled/filter_enforced (only 0% or 100%)"
        ));
        return None;
    };
    if !enabled {
        return None;
    }
    let (max_tokens, tokens_per_fill, fill_interval) = limits::token_bucket(
        config.token_bucket.as_ref(),
        &format!("{path}.token_bucket"),
        ctx,
    )?;
    let mut limit = LocalRateLimitFile {
        max_tokens,
        tokens_per_fill: Some(tokens_per_fill),
        fill_interval,
        key: None,
        shadow: !enforced,
        max_keys: 1,
        descriptors: Vec::new(),
        stage: 0,
        rate_limits: Vec::new(),
        always_consume_default: true,
    };
    limits::http_descriptors(&config, &mut limit, path, ctx);
    Some(limit)
}

/// Type URL of the HTTP rate limit filter's config (global limits).
const RATELIMIT_TYPE: &str =
    "type.googleapis.com/envoy.extensions.filters.http.ratelimit.v3.RateLimit";

/// The rate limit filter's config as the listener's `rate_limit_service`;
/// `None` when the filter is not enabled.
fn rate_limit_filter(any: &Any, path: &str, ctx: &mut Ctx) -> Option<RateLimitServiceFile> {
    use postern_proto::envoy::config::core::v3::grpc_service::TargetSpecifier;
    use postern_proto::envoy::extensions::filters::http::ratelimit::v3::rate_limit::XRateLimitHeadersRfcVersion;
    use postern_proto::envoy::extensions::filters::http::ratelimit::v3::RateLimit;
    let config: RateLimit = match decode(any, RATELIMIT_TYPE) {
        Ok(config) => config,
        Err(problems) => {
            ctx.err(path, problems.join("; "));
            return None;
        }
    };
    if config.domain.is_empty() {
        ctx.err(format!("{path}.domain"), "is required");
    }
    if !matches!(config.request_type.as_str(), "" | "both") {
        ctx.unsupported(format!(
            "{path}.request_type: {:?} (only both)",
            config.request_type
        ));
    }
    if config
        .rate_limited_status
        .as_ref()
        .is_some_and(|s| s.code != 429)
    {
        ctx.unsupported(format!("{path}.rate_limited_status (only 429)"));
    }
    if config
        .status_on_error
        .as_ref()
        .is_some_and(|s| s.code != 500)
    {
        ctx.unsupported(format!("{path}.status_on_error (only 500)"));
    }
    if !config.response_headers_to_add.is_empty() {
        ctx.unsupported(format!("{path}.response_headers_to_add"));
    }
    if config.failure_mode_deny_percent.is_some() {
        ctx.unsupported(format!("{path}.failure_mode_deny_percent"));
    }
    if !config.rate_limits.is_empty() {
        ctx.unsupported(format!(
            "{path}.rate_limits (put them on the route or virtual host)"
        ));
    }
    if config.enable_retry_after_header {
        ctx.unsupported(format!("{path}.enable_retry_after_header"));
    }
    let x_ratelimit_headers =
        match XRateLimitHeadersRfcVersion::try_from(config.enable_x_ratelimit_headers) {
            Ok(XRateLimitHeadersRfcVersion::Off) => false,
            Ok(XRateLimitHeadersRfcVersion::DraftVersion03) => true,
            Err(_) => {
                ctx.unsupported(format!(
                    "{path}.enable_x_ratelimit_headers: {}",
                    config.enable_x_ratelimit_headers
                ));
                false
            }
        };
    // A filter enabled for a share of requests, or enforced for none, is
    // not something Postern does.
    let enabled = match config.filter_enabled {
        None => true,
        Some(_) => match all_or_nothing(&config.filter_enabled) {
            Some(enabled) => enabled,
            None => {
                ctx.unsupported(format!("{path}.filter_enabled (only 0% or 100%)"));
                true
            }
        },
    };
    if config.filter_enforced.is_some() && all_or_nothing(&config.filter_enforced) != Some(true) {
        ctx.unsupported(format!("{path}.filter_enforced (only 100%)"));
    }
    let timeout = match duration_field(&config.timeout, &format!("{path}.timeout"), ctx) {
        None => crate::ratelimit::global::DEFAULT_TIMEOUT,
        Some(t) if t.is_zero() => {
            ctx.unsupported(format!("{path}.timeout: 0 (no timeout)"));
            crate::ratelimit::global::DEFAULT_TIMEOUT
        }
        Some(t) => t,
    };
    let spath = format!("{path}.rate_limit_service");
    let mut cluster = None;
    match &config.rate_limit_service {
        None => ctx.err(&spath, "is required"),
        Some(service) => {
            // 0 is AUTO, which Envoy treats as v3 now; 1 is the removed v2.
            if service.transport_api_version == 1 {
                ctx.unsupported(format!("{spath}.transport_api_version (only V3)"));
            }
            let gpath = format!("{spath}.grpc_service");
            match &service.grpc_service {
                None => ctx.err(&gpath, "is required"),
                Some(grpc) => {
                    if !grpc.initial_metadata.is_empty() {
                        ctx.unsupported(format!("{gpath}.initial_metadata"));
                    }
                    if grpc.retry_policy.is_some() {
                        ctx.unsupported(format!("{gpath}.retry_policy"));
                    }
                    match &grpc.target_specifier {
                        Some(TargetSpecifier::EnvoyGrpc(envoy)) => {
                            if envoy.cluster_name.is_empty() {
                                ctx.err(format!("{gpath}.envoy_grpc.cluster_name"), "is required");
                            }
                            if !envoy.authority.is_empty() {
                                ctx.unsupported(format!("{gpath}.envoy_grpc.authority"));
                            }
                            if envoy.retry_policy.is_some() {
                                ctx.unsupported(format!("{gpath}.envoy_grpc.retry_policy"));
                            }
                            cluster = Some(envoy.cluster_name.clone());
                        }
                        Some(TargetSpecifier::GoogleGrpc(_)) => {
                            ctx.unsupported(format!("{gpath}.google_grpc (use envoy_grpc)"))
                        }
                        None => ctx.err(&gpath, "needs envoy_grpc"),
                    }
                }
            }
        }
    }
    if !enabled {
        return None;
    }
    Some(RateLimitServiceFile {
        domain: config.domain,
        cluster,
        address: None,
        timeout,
        failure_mode_deny: config.failure_mode_deny,
        stage: config.stage,
        enable_x_ratelimit_headers: x_ratelimit_headers,
        rate_limited_as_resource_exhausted: config.rate_limited_as_resource_exhausted,
        disable_x_envoy_ratelimited_header: config.disable_x_envoy_ratelimited_header,
    })
}

/// Route or virtual host `rate_limits`.
fn rate_limits(list: &[route::RateLimit], path: &str, ctx: &mut Ctx) -> Vec<RateLimitPolicyFile> {
    use route::rate_limit::action::ActionSpecifier as A;
    list.iter()
        .enumerate()
        .map(|(i, limit)| {
            let lpath = format!("{path}[{i}]");
            if !limit.disable_key.is_empty() {
                ctx.unsupported(format!("{lpath}.disable_key"));
            }
            if limit.limit.is_some() {
                ctx.unsupported(format!("{lpath}.limit"));
            }
            if limit.hits_addend.is_some() {
                ctx.unsupported(format!("{lpath}.hits_addend"));
            }
            if limit.apply_on_stream_done {
                ctx.unsupported(format!("{lpath}.apply_on_stream_done"));
            }
            if limit.x_ratelimit_option != 0 {
                ctx.unsupported(format!("{lpath}.x_ratelimit_option"));
            }
            let nonempty = |s: &str| (!s.is_empty()).then(|| s.to_string());
            let actions = limit
                .actions
                .iter()
                .enumerate()
                .filter_map(|(a, action)| {
                    let apath = format!("{lpath}.actions[{a}]");
                    let mut out = RateLimitActionFile::default();
                    match &action.action_specifier {
                        Some(A::SourceCluster(_)) => out.source_cluster = Some(EmptyFile {}),
                        Some(A::DestinationCluster(_)) => {
                            out.destination_cluster = Some(EmptyFile {})
                        }
                        Some(A::RemoteAddress(_)) => out.remote_address = Some(EmptyFile {}),
                        Some(A::RequestHeaders(h)) => {
                            out.request_headers = Some(RequestHeadersActionFile {
                                header_name: h.header_name.clone(),
                                descriptor_key: h.descriptor_key.clone(),
                                skip_if_absent: h.skip_if_absent,
                            })
                        }
                        Some(A::GenericKey(g)) => {
                            out.generic_key = Some(GenericKeyActionFile {
                                descriptor_value: g.descriptor_value.clone(),
                                descriptor_key: nonempty(&g.descriptor_key),
                            })
                        }
                        Some(A::HeaderValueMatch(m)) => {
                            let headers = m
                                .headers
                                .iter()
                                .enumerate()
                                .filter_map(|(h, header)| {
                                    header_match(
                                        header,
                                        &format!("{apath}.header_value_match.headers[{h}]"),
                                        ctx,
                                    )
                                })
                                .collect();
                            out.header_value_match = Some(HeaderValueMatchActionFile {
                                descriptor_value: m.descriptor_value.clone(),
                                descriptor_key: nonempty(&m.descriptor_key),
                                default_value: nonempty(&m.default_value),
                                expect_match: m.expect_match.as_ref().is_none_or(|v| v.value),
                                headers,
                            })
                        }
                        Some(other) => {
                            let field = match other {
                                A::QueryParameters(_) => "query_parameters",
                                A::MaskedRemoteAddress(_) => "masked_remote_address",
                                A::RemoteAddressMatch(_) => "remote_address_match",
                                A::QueryParameterValueMatch(_) => "query_parameter_value_match",
                                #[allow(deprecated)]
                                A::DynamicMetadata(_) => "dynamic_metadata",
                                A::Metadata(_) => "metadata",
                                A::Extension(_) => "extension",
                                // The ones handled above never get here.
                                _ => "action_specifier",
                            };
                            ctx.unsupported(format!("{apath}.{field}"));
                            return None;
                        }
                        None => {
                            ctx.err(&apath, "needs an action");
                            return None;
                        }
                    }
                    Some(out)
                })
                .collect();
            RateLimitPolicyFile {
                stage: limit.stage.as_ref().map_or(0, |s| s.value),
                actions,
            }
        })
        .collect()
}

// -------------------------------------------------------------- jwt_authn --

use postern_proto::envoy::extensions::filters::http::jwt_authn::v3 as jwt_authn;

/// Type URL of the JWT authentication filter's config.
const JWT_AUTHN_TYPE: &str =
    "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication";
/// Type URL of its per-route config.
const JWT_PER_ROUTE_TYPE: &str =
    "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.PerRouteConfig";
/// Type URL of the wrapper Envoy allows around any per-route config.
const FILTER_CONFIG_TYPE: &str = "type.googleapis.com/envoy.config.route.v3.FilterConfig";

/// A route's `typed_per_filter_config`: the JWT filter's `PerRouteConfig`
/// becomes the route's `jwt`; anything else is NACKed.
fn route_filter_configs(
    configs: &std::collections::HashMap<String, Any>,
    path: &str,
    ctx: &mut Ctx,
) -> (Option<RouteJwtFile>, Option<LocalRateLimitFile>) {
    use jwt_authn::per_route_config::RequirementSpecifier;
    let mut jwt = None;
    // Envoy's local rate limit filter takes its per-route config here too.
    let mut local_rate_limit = None;
    let mut names: Vec<&String> = configs.keys().collect();
    names.sort();
    for name in names {
        let fpath = format!("{path}.typed_per_filter_config[{name}]");
        let mut any = &configs[name];
        let wrapped;
        if any.type_url == FILTER_CONFIG_TYPE {
            match decode::<route::FilterConfig>(any, FILTER_CONFIG_TYPE) {
                Ok(wrapper) => {
                    if !policy::filter_config_supported(&wrapper, &fpath, ctx) {
                        continue;
                    }
                    wrapped = wrapper.config.unwrap_or_default();
                    any = &wrapped;
                }
                Err(problems) => {
                    ctx.err(&fpath, problems.join("; "));
                    continue;
                }
            }
        }
        if any.type_url == LOCAL_RATELIMIT_TYPE {
            local_rate_limit = local_rate_limit_filter(any, &fpath, ctx);
            continue;
        }
        // Read by `policy::rbac_per_route`.
        if any.type_url == policy::RBAC_PER_ROUTE_TYPE {
            continue;
        }
        if any.type_url == limits::RATELIMIT_PER_ROUTE_TYPE {
            // Applied by `limits::rate_limit_per_route`, once the route's
            // own `rate_limits` are in.
            continue;
        }
        if any.type_url != JWT_PER_ROUTE_TYPE {
            ctx.unsupported(format!("{fpath} ({})", any.type_url));
            continue;
        }
        let config: jwt_authn::PerRouteConfig = match decode(any, JWT_PER_ROUTE_TYPE) {
            Ok(config) => config,
            Err(problems) => {
                ctx.err(&fpath, problems.join("; "));
                continue;
            }
        };
        jwt = match config.requirement_specifier {
            Some(RequirementSpecifier::Disabled(true)) => Some(RouteJwtFile {
                disabled: Some(true),
                requirement: None,
            }),
            Some(RequirementSpecifier::RequirementName(name)) => Some(RouteJwtFile {
                disabled: None,
                requirement: Some(name),
            }),
            Some(RequirementSpecifier::Disabled(false)) | None => None,
        };
    }
    (jwt, local_rate_limit)
}

fn jwt_requirement(r: &jwt_authn::JwtRequirement, path: &str, ctx: &mut Ctx) -> JwtRequirementFile {
    use jwt_authn::jwt_requirement::RequiresType;
    let list = |items: &[jwt_authn::JwtRequirement], key: &str, ctx: &mut Ctx| {
        items
            .iter()
            .enumerate()
            .map(|(i, r)| jwt_requirement(r, &format!("{path}.{key}[{i}]"), ctx))
            .collect::<Vec<_>>()
    };
    match &r.requires_type {
        Some(RequiresType::ProviderName(name)) => JwtRequirementFile {
            provider: Some(name.clone()),
            ..Default::default()
        },
        Some(RequiresType::ProviderAndAudiences(p)) => JwtRequirementFile {
            provider: Some(p.provider_name.clone()),
            audiences: Some(p.audiences.clone()),
            ..Default::default()
        },
        Some(RequiresType::RequiresAny(any)) => JwtRequirementFile {
            any: Some(list(&any.requirements, "requires_any", ctx)),
            ..Default::default()
        },
        Some(RequiresType::RequiresAll(all)) => JwtRequirementFile {
            all: Some(list(&all.requirements, "requires_all", ctx)),
            ..Default::default()
        },
        Some(RequiresType::AllowMissing(_)) => JwtRequirementFile {
            allow_missing: Some(true),
            ..Default::default()
        },
        // An empty requirement verifies nothing and refuses nothing.
        Some(RequiresType::AllowMissingOrFailed(_)) | None => JwtRequirementFile {
            allow_missing_or_failed: Some(true),
            ..Default::default()
        },
        Some(RequiresType::ExtractOnlyWithoutValidation(_)) => {
            ctx.unsupported(format!("{path}.extract_only_without_validation"));
            JwtRequirementFile::default()
        }
    }
}

fn jwt_provider(p: &jwt_authn::JwtProvider, path: &str, ctx: &mut Ctx) -> JwtProviderFile {
    use jwt_authn::jwt_provider::JwksSourceSpecifier;
    for (field, set) in [
        ("subjects", p.subjects.is_some()),
        ("max_lifetime", p.max_lifetime.is_some()),
        ("from_cookies", !p.from_cookies.is_empty()),
        ("pad_forward_payload_header", p.pad_forward_payload_header),
        (
            "normalize_payload_in_metadata",
            p.normalize_payload_in_metadata.is_some(),
        ),
    ] {
        if set {
            ctx.unsupported(format!("{path}.{field}"));
        }
    }
    let jwks = match &p.jwks_source_specifier {
        Some(JwksSourceSpecifier::LocalJwks(source)) => match &source.specifier {
            Some(core::data_source::Specifier::InlineString(text)) => JwksSourceFile {
                inline: Some(text.clone()),
                ..Default::default()
            },
            Some(core::data_source::Specifier::InlineBytes(bytes)) => JwksSourceFile {
                inline: Some(String::from_utf8_lossy(bytes).into_owned()),
                ..Default::default()
            },
            Some(core::data_source::Specifier::Filename(name)) => JwksSourceFile {
                file: Some(name.into()),
                ..Default::default()
            },
            _ => {
                ctx.unsupported(format!(
                    "{path}.local_jwks (only inline_string, inline_bytes, filename)"
                ));
                JwksSourceFile::default()
            }
        },
        Some(JwksSourceSpecifier::RemoteJwks(remote)) => {
            let rpath = format!("{path}.remote_jwks");
            if remote.retry_policy.is_some() {
                ctx.unsupported(format!("{rpath}.retry_policy"));
            }
            let uri = remote.http_uri.clone().unwrap_or_default();
            let cluster = match uri.http_upstream_type {
                Some(core::http_uri::HttpUpstreamType::Cluster(cluster)) => cluster,
                None => {
                    ctx.err(format!("{rpath}.http_uri.cluster"), "is required");
                    String::new()
                }
            };
            let timeout = duration_field(&uri.timeout, &format!("{rpath}.http_uri.timeout"), ctx);
            let cache = duration_field(
                &remote.cache_duration,
                &format!("{rpath}.cache_duration"),
                ctx,
            );
            JwksSourceFile {
                remote: Some(RemoteJwksFile {
                    uri: uri.uri,
                    cluster,
                    cache_duration: cache
                        .filter(|d| !d.is_zero())
                        .unwrap_or(Duration::from_secs(600)),
                    timeout: timeout
                        .filter(|d| !d.is_zero())
                        .unwrap_or(Duration::from_secs(5)),
                    min_refetch_interval: Duration::from_secs(30),
                }),
                ..Default::default()
            }
        }
        None => {
            ctx.err(format!("{path}.jwks_source_specifier"), "is required");
            JwksSourceFile::default()
        }
    };
    JwtProviderFile {
        issuer: (!p.issuer.is_empty()).then(|| p.issuer.clone()),
        audiences: p.audiences.clone(),
        jwks,
        from_headers: p
            .from_headers
            .iter()
            .map(|h| JwtHeaderFile {
                name: h.name.clone(),
                value_prefix: h.value_prefix.clone(),
            })
            .collect(),
        from_params: p.from_params.clone(),
        forward: p.forward,
        forward_payload_header: (!p.forward_payload_header.is_empty())
            .then(|| p.forward_payload_header.clone()),
        claim_to_headers: p
            .claim_to_headers
            .iter()
            .map(|c| ClaimToHeaderFile {
                claim: if c.claim_path.is_empty() {
                    c.claim_name.clone()
                } else {
                    c.claim_path
                        .iter()
                        .map(|s| s.key.as_str())
                        .collect::<Vec<_>>()
                        .join(".")
                },
                header: c.header_name.clone(),
            })
            .collect(),
        // Envoy reads 0 (unset) as its default, 60 seconds.
        clock_skew: Duration::from_secs(match p.clock_skew_seconds {
            0 => 60,
            n => u64::from(n),
        }),
        require_expiration: p.require_expiration,
        // Envoy caches only when `jwt_cache_config` is set; a cache changes
        // no outcome, so Postern keeps one either way (size 0 is Envoy's 100).
        cache_size: match &p.jwt_cache_config {
            Some(cache) if cache.jwt_cache_size > 0 => cache.jwt_cache_size as usize,
            _ => crate::authn::VerifiedCache::DEFAULT_CAPACITY,
        },
    }
}

/// The JWT authentication filter's config as the listener's `jwt`.
fn jwt_filter(any: &Any, path: &str, ctx: &mut Ctx) -> Option<JwtAuthnFile> {
    use jwt_authn::requirement_rule::RequirementType;
    let config: jwt_authn::JwtAuthentication = match decode(any, JWT_AUTHN_TYPE) {
        Ok(config) => config,
        Err(problems) => {
            ctx.err(path, problems.join("; "));
            return None;
        }
    };
    if config.filter_state_rules.is_some() {
        ctx.unsupported(format!("{path}.filter_state_rules"));
    }
    let providers = config
        .providers
        .iter()
        .map(|(name, p)| {
            (
                name.clone(),
                jwt_provider(p, &format!("{path}.providers[{name}]"), ctx),
            )
        })
        .collect();
    let rules = config
        .rules
        .iter()
        .enumerate()
        .map(|(i, rule)| {
            let rpath = format!("{path}.rules[{i}]");
            JwtRuleFile {
                matcher: route_match(rule.r#match.as_ref(), &format!("{rpath}.match"), ctx),
                requires: match &rule.requirement_type {
                    Some(RequirementType::Requires(r)) => {
                        Some(jwt_requirement(r, &format!("{rpath}.requires"), ctx))
                    }
                    Some(RequirementType::RequirementName(name)) => Some(JwtRequirementFile {
                        requirement: Some(name.clone()),
                        ..Default::default()
                    }),
                    None => None,
                },
            }
        })
        .collect();
    let requirement_map = config
        .requirement_map
        .iter()
        .map(|(name, r)| {
            (
                name.clone(),
                jwt_requirement(r, &format!("{path}.requirement_map[{name}]"), ctx),
            )
        })
        .collect();
    Some(JwtAuthnFile {
        providers,
        rules,
        requirement_map,
        bypass_cors_preflight: config.bypass_cors_preflight,
        strip_failure_response: config.strip_failure_response,
    })
}

//! Checks a parsed config file and compiles it into the runtime model.
//!
//! Every problem is collected with its field path so that one run of
//! `postern validate` shows them all.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method, StatusCode};
use regex::Regex;

use super::file::*;
use super::{Config, ConfigError, FieldError, HttpListener, Listener, ListenerProtocol};
use crate::route::{
    Forward, HeaderMatch, PathMatch, QueryMatch, Redirect, RetryPolicy, Rewrite, Route,
    RouteAction, RouteMatch, RouteTable, Targets, TcpRoute, ValueMatch, VirtualHost,
};

/// Default route timeout (Envoy's), covering the wait for response headers.
const DEFAULT_ROUTE_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Default)]
pub(super) struct Errors(Vec<FieldError>, bool);

impl Errors {
    /// Config from a control plane: routes may name clusters that have not
    /// arrived (or are warming) and clusters may have no endpoints yet; both
    /// answer 503 at run time, as in Envoy.
    fn dynamic() -> Errors {
        Errors(Vec::new(), true)
    }

    pub(super) fn strict_references(&self) -> bool {
        !self.1
    }

    pub(super) fn push(&mut self, path: impl Into<String>, reason: impl Into<String>) {
        self.0.push(FieldError {
            path: path.into(),
            reason: reason.into(),
        });
    }

    /// Reads a file the config names (certificates, bundles, JWKS). Every
    /// xDS update rebuilds the bootstrap's static part too: if such a file
    /// cannot be read then, the contents last read stand in, so a file
    /// removed after start does not make every unrelated update fail. A
    /// file that can be read is always read, so a changed one still counts.
    pub(super) fn read(&self, file: &std::path::Path) -> std::io::Result<Arc<[u8]>> {
        static LAST_READ: std::sync::OnceLock<
            std::sync::Mutex<HashMap<std::path::PathBuf, Arc<[u8]>>>,
        > = std::sync::OnceLock::new();
        let last_read = LAST_READ.get_or_init(Default::default);
        match std::fs::read(file) {
            Ok(bytes) => {
                let bytes: Arc<[u8]> = bytes.into();
                if let Ok(mut cache) = last_read.lock() {
                    cache.insert(file.to_path_buf(), bytes.clone());
                }
                Ok(bytes)
            }
            Err(err) => {
                let cached = self
                    .1
                    .then(|| last_read.lock().ok()?.get(file).cloned())
                    .flatten();
                match cached {
                    Some(bytes) => {
                        tracing::warn!(file = %file.display(), error = %err, "cannot read a file the bootstrap names; using its contents as last read");
                        Ok(bytes)
                    }
                    None => Err(err),
                }
            }
        }
    }
}

pub(super) fn build(file: ConfigFile) -> Result<Config, ConfigError> {
    build_with(file, Errors::default())
}

/// Like `build`, for config assembled from xDS resources.
pub(super) fn build_dynamic(file: ConfigFile) -> Result<Config, ConfigError> {
    build_with(file, Errors::dynamic())
}

fn build_with(file: ConfigFile, mut errors: Errors) -> Result<Config, ConfigError> {
    let identity = file
        .identity
        .as_ref()
        .and_then(|identity| super::tls::build_identity(identity, &mut errors));
    let has_identity = file.identity.is_some();
    let mut upstream_tls = HashMap::new();

    let mut cluster_names = HashSet::new();
    for (i, cluster) in file.clusters.iter().enumerate() {
        let path = format!("clusters[{i}]");
        if !cluster_names.insert(cluster.name.as_str()) {
            errors.push(
                format!("{path}.name"),
                format!("duplicate cluster name \"{}\"", cluster.name),
            );
        }
        check_cluster(cluster, &path, &mut errors);
        if let Some(tls) = super::tls::build_upstream_tls(cluster, &path, has_identity, &mut errors)
        {
            upstream_tls.insert(Arc::from(cluster.name.as_str()), tls);
        }
    }

    let source_cluster = file.node.as_ref().map_or("", |n| n.cluster.as_str());
    let mut listener_names = HashSet::new();
    let mut addresses = HashSet::new();
    let mut listeners = Vec::new();
    // A listener's filter chains are built as listeners of their own just
    // before it, which then takes them from `chain_built`.
    let entries = super::chains::flatten(&file.listeners);
    let mut chain_built: Vec<Arc<Listener>> = Vec::new();
    for (path, listener, chain_of) in &entries {
        let chain_of = *chain_of;
        let listener: &ListenerFile = listener;
        // Owned, so the field paths below read as they always have.
        let path = path.clone();
        if chain_of.is_some() {
            super::chains::check_chain_listener(listener, &path, &mut errors);
        } else if !listener.filter_chains.is_empty() {
            if !listener_names.insert(listener.name.as_str()) {
                errors.push(
                    format!("{path}.name"),
                    format!("duplicate listener name \"{}\"", listener.name),
                );
            }
            if listener.address.port() != 0 && !addresses.insert(listener.address) {
                errors.push(
                    format!("{path}.address"),
                    format!("address {} is used by another listener", listener.address),
                );
            }
            check_limits(&listener.limits, &format!("{path}.limits"), &mut errors);
            let chains = std::mem::take(&mut chain_built);
            if let Some(built) = super::chains::build(listener, &path, chains, &mut errors) {
                listeners.push(Arc::new(built));
            }
            continue;
        }
        if chain_of.is_none() && !listener_names.insert(listener.name.as_str()) {
            errors.push(
                format!("{path}.name"),
                format!("duplicate listener name \"{}\"", listener.name),
            );
        }
        if listener.capture.is_some() && listener.kind != ListenerKind::Capture {
            errors.push(
                format!("{path}.capture"),
                "only capture listeners take a capture block",
            );
        }
        if chain_of.is_none() && listener.address.port() != 0 && !addresses.insert(listener.address)
        {
            errors.push(
                format!("{path}.address"),
                format!("address {} is used by another listener", listener.address),
            );
        }
        check_limits(&listener.limits, &format!("{path}.limits"), &mut errors);
        let protocol = match listener.kind {
            ListenerKind::Http => {
                if listener.tcp.is_some() {
                    errors.push(format!("{path}.tcp"), "only tcp listeners take a tcp block");
                }
                if listener.virtual_hosts.is_empty() {
                    errors.push(
                        format!("{path}.virtual_hosts"),
                        "an http listener needs at least one virtual host",
                    );
                }
                let global = compile_mutations(
                    &listener.http.headers,
                    &format!("{path}.http.headers"),
                    &mut errors,
                );
                let routes =
                    build_route_table(&listener.virtual_hosts, &path, &cluster_names, &mut errors)
                        .with_headers(global, listener.http.most_specific_header_mutations_wins);
                if errors.strict_references() {
                    check_route_jwt_names(listener, &path, &mut errors);
                }
                ListenerProtocol::Http(build_http(
                    listener,
                    &path,
                    routes,
                    &cluster_names,
                    source_cluster,
                    &mut errors,
                ))
            }
            ListenerKind::Capture => {
                if !listener.http.headers.is_empty() {
                    errors.push(
                        format!("{path}.http.headers"),
                        "only http listeners take header changes (put them on a service's virtual hosts)",
                    );
                }
                let http = build_http(
                    listener,
                    &path,
                    RouteTable::new(Vec::new(), &[]),
                    &cluster_names,
                    source_cluster,
                    &mut errors,
                );
                match super::capture::build(
                    listener,
                    &path,
                    &file.opaque_ports,
                    http,
                    &cluster_names,
                    &mut errors,
                ) {
                    Some(capture) => ListenerProtocol::Capture(capture),
                    None => continue,
                }
            }
            ListenerKind::Tcp => {
                if !listener.virtual_hosts.is_empty() {
                    errors.push(
                        format!("{path}.virtual_hosts"),
                        "a tcp listener takes no virtual hosts",
                    );
                }
                match &listener.tcp {
                    None => {
                        errors.push(format!("{path}.tcp"), "a tcp listener needs a tcp block");
                        continue;
                    }
                    Some(tcp) => {
                        if errors.strict_references()
                            && !cluster_names.contains(tcp.cluster.as_str())
                        {
                            errors.push(
                                format!("{path}.tcp.cluster"),
                                format!("unknown cluster \"{}\"", tcp.cluster),
                            );
                        }
                        if tcp.idle_timeout.is_zero() {
                            errors.push(format!("{path}.tcp.idle_timeout"), "must be more than 0");
                        }
                        let rbac_path = format!("{path}.tcp.rbac");
                        if let Some(rbac) = &tcp.rbac {
                            super::rbac::check_connection_level(rbac, &rbac_path, &mut errors);
                        }
                        ListenerProtocol::Tcp(TcpRoute {
                            cluster: Arc::from(tcp.cluster.as_str()),
                            idle_timeout: tcp.idle_timeout,
                            rbac: tcp
                                .rbac
                                .as_ref()
                                .map(|rbac| super::rbac::build_rbac(rbac, &rbac_path, &mut errors)),
                            rate_limit: tcp.local_rate_limit.as_ref().map(|limit| {
                                super::rbac::build_connection_rate_limit(
                                    limit,
                                    &format!("{path}.tcp.local_rate_limit"),
                                    &mut errors,
                                )
                            }),
                        })
                    }
                }
            }
        };
        let trust_domain = identity.as_ref().map(|i| i.id.trust_domain());
        let tls = super::tls::build_listener_tls(
            listener,
            &path,
            trust_domain,
            has_identity,
            &mut errors,
        );
        let mesh_inbound = listener
            .mtls
            .as_ref()
            .is_some_and(|m| m.mode != super::file::MtlsMode::Disable);
        let capture_direction = listener.capture.as_ref().map(|c| c.direction);
        // Only a declared outbound side waits for the app: a gateway's
        // listeners (outbound by default, for telemetry) drain at once.
        let app_side = listener.traffic_direction.or(capture_direction)
            == Some(crate::telemetry::log::TrafficDirection::Outbound);
        let sink = if chain_of.is_some() {
            &mut chain_built
        } else {
            &mut listeners
        };
        sink.push(Arc::new(Listener {
            drain: if app_side {
                super::DrainPhase::AfterApp
            } else {
                super::DrainPhase::Immediate
            },
            name: Arc::from(listener.name.as_str()),
            address: listener.address,
            limits: listener.limits.clone(),
            protocol,
            tls,
            als: listener.access_log_service.clone().inspect(|als| {
                if let Err(problems) = als.validate() {
                    for (field, reason) in problems {
                        errors.push(format!("{path}.access_log_service.{field}"), reason);
                    }
                }
            }),
            trace_sampling: listener.tracing.map_or_else(
                super::file::default_trace_sampling,
                |t| {
                    if !(0.0..=1.0).contains(&t.sampling) {
                        errors.push(
                            format!("{path}.tracing.sampling"),
                            format!("must be between 0 and 1, not {}", t.sampling),
                        );
                    }
                    t.sampling
                },
            ),
            direction: listener.traffic_direction.or(capture_direction).unwrap_or(
                if mesh_inbound {
                    crate::telemetry::log::TrafficDirection::Inbound
                } else {
                    crate::telemetry::log::TrafficDirection::Outbound
                },
            ),
        }));
    }

    if let Some(log) = &file.telemetry.access_log {
        for err in log.validate() {
            errors.push(format!("telemetry.access_log.{}", err.field), err.reason);
        }
    }
    if let Some(als) = &file.telemetry.access_log_service {
        if let Err(problems) = als.validate() {
            for (field, reason) in problems {
                errors.push(format!("telemetry.access_log_service.{field}"), reason);
            }
        }
    }
    if let Some(tracing) = &file.telemetry.tracing {
        if let Err(err) = tracing.validate() {
            errors.push("telemetry.tracing", err.to_string());
        }
    }
    if file.telemetry.max_peers == 0 {
        errors.push("telemetry.max_peers", "must be at least 1");
    }
    if file.drain_timeout.is_zero() {
        errors.push("drain_timeout", "must be more than 0");
    }
    let sds = file
        .identity
        .as_ref()
        .is_some_and(|i| i.source.sds.is_some());
    if sds && file.xds.is_none() {
        errors.push(
            "identity.source.sds",
            "SDS secrets come from the control plane: add an xds section (or --xds-address)",
        );
    }
    if let Some(xds) = &file.xds {
        if file.node.as_ref().is_none_or(|n| n.id.is_empty()) {
            errors.push(
                "node.id",
                "an xds section needs a node id (or --node-id / POSTERN_NODE_ID)",
            );
        }
        let https = xds.address.starts_with("https://");
        if !(https || xds.address.starts_with("http://"))
            || xds.address.parse::<http::Uri>().is_err()
        {
            errors.push(
                "xds.address",
                format!("\"{}\" is not an http:// or https:// address", xds.address),
            );
        }
        if xds.ca_cert.is_some() && !https {
            errors.push("xds.ca_cert", "only used with an https:// address");
        }
        if https && xds.ca_cert.is_none() {
            errors.push(
                "xds.ca_cert",
                "an https:// control plane needs the root its certificate chains to",
            );
        }
        if xds.client_cert.is_some() != xds.client_key.is_some() {
            errors.push("xds.client_key", "give client_cert and client_key together");
        }
        if xds.client_cert.is_some() && !https {
            errors.push("xds.client_cert", "mTLS needs an https:// address");
        }
        if xds.initial_backoff.is_zero() || xds.max_backoff < xds.initial_backoff {
            errors.push(
                "xds.max_backoff",
                "backoffs must be more than 0 and max_backoff at least initial_backoff",
            );
        }
    }

    check_overload(&file.overload, &mut errors);
    if !errors.0.is_empty() {
        return Err(ConfigError::Invalid(errors.0));
    }
    Ok(Config {
        admin_address: file.admin.address,
        drain_timeout: file.drain_timeout,
        listeners,
        clusters: file.clusters.iter().cloned().map(Arc::new).collect(),
        upstream_tls,
        identity,
        source: Arc::new(file),
    })
}

/// The HTTP connection manager settings of a listener, around `routes`.
fn build_http(
    listener: &ListenerFile,
    path: &str,
    routes: RouteTable,
    clusters: &HashSet<&str>,
    source_cluster: &str,
    errors: &mut Errors,
) -> HttpListener {
    HttpListener {
        trust_downstream: listener.http.trust_downstream,
        normalize: crate::route::normalize::PathNormalization {
            enabled: listener.http.normalize_path,
            merge_slashes: listener.http.merge_slashes,
            escaped_slashes: listener.http.escaped_slashes,
        },
        rbac: listener
            .http
            .rbac
            .as_ref()
            .map(|rbac| super::rbac::build_rbac(rbac, &format!("{path}.http.rbac"), errors)),
        rate_limit: listener.http.local_rate_limit.as_ref().map(|limit| {
            let lpath = format!("{path}.http.local_rate_limit");
            super::rbac::check_listener_rate_limit(limit, &lpath, errors);
            super::rbac::build_rate_limit(limit, &lpath, errors)
        }),
        jwt: listener
            .http
            .jwt
            .as_ref()
            .map(|jwt| super::jwt::build_jwt(jwt, &format!("{path}.http.jwt"), clusters, errors)),
        global_rate_limit: listener.http.rate_limit_service.as_ref().map(|service| {
            super::ratelimit::build_service(
                service,
                &format!("{path}.http.rate_limit_service"),
                clusters,
                source_cluster,
                errors,
            )
        }),
        routes: Arc::new(routes),
    }
}

/// A route's `jwt.requirement` must name an entry of its listener's
/// `requirement_map` (static config; from xDS an unknown name fails the
/// request instead, as the route may arrive before its listener).
fn check_route_jwt_names(listener: &ListenerFile, path: &str, errors: &mut Errors) {
    let map = listener.http.jwt.as_ref().map(|jwt| &jwt.requirement_map);
    for (v, vhost) in listener.virtual_hosts.iter().enumerate() {
        for (r, route) in vhost.routes.iter().enumerate() {
            let Some(jwt) = &route.jwt else { continue };
            let rpath = format!("{path}.virtual_hosts[{v}].routes[{r}].jwt");
            match map {
                None => errors.push(rpath, "the listener has no http.jwt section"),
                Some(map) => {
                    if let Some(name) = jwt.requirement.as_ref().filter(|n| !map.contains_key(*n)) {
                        errors.push(
                            format!("{rpath}.requirement"),
                            format!("unknown requirement \"{name}\" (not in the listener's http.jwt.requirement_map)"),
                        );
                    }
                }
            }
        }
    }
}

fn check_overload(overload: &OverloadFile, errors: &mut Errors) {
    if overload.max_connections == 0 {
        errors.push("overload.max_connections", "must be more than 0");
    }
    if overload.max_rss_bytes == Some(0) {
        errors.push("overload.max_rss_bytes", "must be more than 0");
    }
    for (name, value) in [
        ("shed_at", overload.shed_at),
        ("pause_accept_at", overload.pause_accept_at),
    ] {
        if !(value > 0.0 && value <= 1.0) {
            errors.push(
                format!("overload.{name}"),
                "must be a share of max_rss_bytes, more than 0 and at most 1",
            );
        }
    }
    if !(overload.release > 0.0 && overload.release <= 1.0) {
        errors.push(
            "overload.release",
            "must be a share of each threshold, more than 0 and at most 1",
        );
    }
    if overload.pause_accept_at < overload.shed_at {
        errors.push(
            "overload.pause_accept_at",
            "must be at least shed_at: accepting stops only once requests are shed",
        );
    }
    // Each sample reads /proc; faster than this costs CPU for no gain.
    if overload.check_interval < Duration::from_millis(10) {
        errors.push("overload.check_interval", "must be at least 10ms");
    }
}

fn check_limits(limits: &ListenerLimitsFile, path: &str, errors: &mut Errors) {
    let counts = [
        ("max_connections", limits.max_connections),
        (
            "max_request_headers_bytes",
            limits.max_request_headers_bytes,
        ),
        ("max_request_headers", limits.max_request_headers),
        (
            "max_concurrent_streams",
            limits.max_concurrent_streams as usize,
        ),
    ];
    for (name, value) in counts {
        if value == 0 {
            errors.push(format!("{path}.{name}"), "must be more than 0");
        }
    }
    for (name, value) in [
        ("header_read_timeout", limits.header_read_timeout),
        ("idle_timeout", limits.idle_timeout),
    ] {
        if value.is_zero() {
            errors.push(format!("{path}.{name}"), "must be more than 0");
        }
    }
    if limits.max_request_body_bytes == Some(0) {
        errors.push(
            format!("{path}.max_request_body_bytes"),
            "must be more than 0",
        );
    }
    // listen(2) takes an int; the kernel caps it at net.core.somaxconn.
    if limits.tcp_backlog_size == 0 || i32::try_from(limits.tcp_backlog_size).is_err() {
        errors.push(
            format!("{path}.tcp_backlog_size"),
            format!("must be more than 0 and at most {}", i32::MAX),
        );
    }
}

fn check_cluster(cluster: &ClusterFile, path: &str, errors: &mut Errors) {
    if cluster.endpoints.is_empty() && errors.strict_references() {
        errors.push(
            format!("{path}.endpoints"),
            "a cluster needs at least one endpoint",
        );
    }
    for (i, endpoint) in cluster.endpoints.iter().enumerate() {
        if endpoint.weight == 0 {
            errors.push(
                format!("{path}.endpoints[{i}].weight"),
                "must be at least 1",
            );
        }
        if endpoint.address.port() == 0 {
            errors.push(
                format!("{path}.endpoints[{i}].address"),
                "port 0 cannot be connected to",
            );
        }
    }
    if cluster.dns_refresh_rate < Duration::from_millis(1) {
        errors.push(format!("{path}.dns_refresh_rate"), "must be at least 1ms");
    }
    if cluster.dns_type == DnsType::Logical && cluster.endpoints.len() != 1 {
        errors.push(
            format!("{path}.endpoints"),
            "a logical DNS cluster takes exactly one endpoint",
        );
    }
    if cluster.connect_timeout.is_zero() {
        errors.push(format!("{path}.connect_timeout"), "must be more than 0");
    }
    let cb = &cluster.circuit_breaker;
    for (name, value) in [
        ("max_connections", cb.max_connections),
        ("max_pending_requests", cb.max_pending_requests),
        ("max_requests", cb.max_requests),
        ("max_retries", cb.max_retries),
    ] {
        if value == 0 {
            errors.push(
                format!("{path}.circuit_breaker.{name}"),
                "must be at least 1",
            );
        }
    }
    let budget = cluster.retry_budget.budget_percent;
    if !(0.0..=100.0).contains(&budget) {
        errors.push(
            format!("{path}.retry_budget.budget_percent"),
            "must be between 0 and 100",
        );
    }
    if let Some(od) = &cluster.outlier_detection {
        if od.max_ejection_percent > 100 {
            errors.push(
                format!("{path}.outlier_detection.max_ejection_percent"),
                "must be between 0 and 100",
            );
        }
        if od.base_ejection_time.is_zero() {
            errors.push(
                format!("{path}.outlier_detection.base_ejection_time"),
                "must be more than 0",
            );
        }
        if od.max_ejection_time < od.base_ejection_time {
            errors.push(
                format!("{path}.outlier_detection.max_ejection_time"),
                "must not be less than base_ejection_time",
            );
        }
    }
}

/// Compiles virtual hosts; `path` is where they sit (`listeners[0]`), and
/// errors name `{path}.virtual_hosts[i]…`.
pub(super) fn build_route_table(
    virtual_hosts: &[VirtualHostFile],
    path: &str,
    clusters: &HashSet<&str>,
    errors: &mut Errors,
) -> RouteTable {
    let mut vhosts = Vec::new();
    let mut all_domains = Vec::new();
    let mut vhost_names = HashSet::new();
    let mut seen_domains: HashMap<String, usize> = HashMap::new();
    for (v, vhost) in virtual_hosts.iter().enumerate() {
        let vpath = format!("{path}.virtual_hosts[{v}]");
        if !vhost_names.insert(vhost.name.as_str()) {
            errors.push(
                format!("{vpath}.name"),
                format!("duplicate virtual host name \"{}\"", vhost.name),
            );
        }
        if vhost.domains.is_empty() {
            errors.push(
                format!("{vpath}.domains"),
                "a virtual host needs at least one domain",
            );
        }
        let mut domains = Vec::new();
        for (d, domain) in vhost.domains.iter().enumerate() {
            let dpath = format!("{vpath}.domains[{d}]");
            let normal = domain.to_ascii_lowercase();
            let normal = normal.strip_suffix('.').unwrap_or(&normal).to_string();
            if let Err(reason) = check_domain(&normal) {
                errors.push(dpath, reason);
                continue;
            }
            if let Some(other) = seen_domains.insert(normal.clone(), v) {
                errors.push(
                    dpath,
                    format!(
                        "domain \"{domain}\" is already served by virtual host \"{}\"",
                        virtual_hosts[other].name
                    ),
                );
                continue;
            }
            domains.push(normal);
        }
        let vh_rate_limits = super::ratelimit::build_policies(
            &vhost.rate_limits,
            &format!("{vpath}.rate_limits"),
            errors,
        );
        let routes = vhost
            .routes
            .iter()
            .enumerate()
            .map(|(r, route)| {
                let mut built =
                    build_route(route, r, &format!("{vpath}.routes[{r}]"), clusters, errors);
                built.rate_limits = super::ratelimit::effective_for(
                    std::mem::take(&mut built.rate_limits),
                    &vh_rate_limits,
                    route,
                );
                built
            })
            .collect();
        if vhost.routes.is_empty() {
            errors.push(
                format!("{vpath}.routes"),
                "a virtual host needs at least one route",
            );
        }
        vhosts.push(VirtualHost {
            name: Arc::from(vhost.name.as_str()),
            routes,
            headers: compile_mutations(&vhost.headers, &format!("{vpath}.headers"), errors),
        });
        all_domains.push(domains);
    }
    RouteTable::new(vhosts, &all_domains)
}

fn check_domain(domain: &str) -> Result<(), String> {
    if domain == "*" {
        return Ok(());
    }
    let host = match domain.strip_prefix("*.") {
        Some(rest) => rest,
        None if domain.starts_with('*') => {
            return Err(format!(
                "\"{domain}\" is not a domain: a wildcard must be \"*\" or \"*.suffix\""
            ))
        }
        None => domain,
    };
    let valid = !host.is_empty()
        && host.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b':' | b'[' | b']')
        });
    if valid {
        Ok(())
    } else {
        Err(format!("\"{domain}\" is not a domain name"))
    }
}

fn build_route(
    route: &RouteFile,
    index: usize,
    path: &str,
    clusters: &HashSet<&str>,
    errors: &mut Errors,
) -> Route {
    let matcher = build_match(&route.matcher, &format!("{path}.match"), errors);
    let actions = [
        route.cluster.is_some(),
        route.weighted_clusters.is_some(),
        route.direct_response.is_some(),
        route.redirect.is_some(),
    ]
    .iter()
    .filter(|set| **set)
    .count();
    if actions != 1 {
        errors.push(
            path.to_string(),
            format!(
                "a route needs exactly one action of cluster, weighted_clusters, direct_response, redirect; found {actions}"
            ),
        );
    }
    let forwards = route.cluster.is_some() || route.weighted_clusters.is_some();
    if !forwards {
        for (name, set) in [
            ("timeout", route.timeout.is_some()),
            ("retry", route.retry.is_some()),
            ("rewrite", route.rewrite.is_some()),
        ] {
            if set {
                errors.push(
                    format!("{path}.{name}"),
                    "only routes with a cluster or weighted_clusters action take this",
                );
            }
        }
    }
    let is_prefix = matches!(matcher.path, PathMatch::Prefix(_));

    let action = if let Some(direct) = &route.direct_response {
        let status = match StatusCode::from_u16(direct.status) {
            Ok(s) if (200..600).contains(&direct.status) => s,
            _ => {
                errors.push(
                    format!("{path}.direct_response.status"),
                    format!("{} is not a status from 200 to 599", direct.status),
                );
                StatusCode::OK
            }
        };
        RouteAction::Direct {
            status,
            body: Bytes::from(direct.body.clone()),
        }
    } else if let Some(redirect) = &route.redirect {
        RouteAction::Redirect(build_redirect(
            redirect,
            is_prefix,
            &format!("{path}.redirect"),
            errors,
        ))
    } else {
        let mut target_headers = Vec::new();
        let targets = if let Some(weighted) = &route.weighted_clusters {
            let wpath = format!("{path}.weighted_clusters");
            if weighted.is_empty() {
                errors.push(wpath.clone(), "needs at least one cluster");
            }
            let mut cumulative = Vec::new();
            let mut total = 0u64;
            target_headers = weighted
                .iter()
                .enumerate()
                .map(|(w, target)| {
                    compile_mutations(&target.headers, &format!("{wpath}[{w}].headers"), errors)
                })
                .collect();
            if target_headers.iter().all(Option::is_none) {
                target_headers.clear();
            }
            for (w, target) in weighted.iter().enumerate() {
                if errors.strict_references() && !clusters.contains(target.cluster.as_str()) {
                    errors.push(
                        format!("{wpath}[{w}].cluster"),
                        format!("unknown cluster \"{}\"", target.cluster),
                    );
                }
                total += u64::from(target.weight);
                cumulative.push((Arc::from(target.cluster.as_str()), total));
            }
            if !weighted.is_empty() && total == 0 {
                errors.push(wpath, "the weights add up to 0");
            }
            Targets::Weighted(cumulative)
        } else {
            let name = route.cluster.clone().unwrap_or_default();
            if errors.strict_references()
                && route.cluster.is_some()
                && !clusters.contains(name.as_str())
            {
                errors.push(
                    format!("{path}.cluster"),
                    format!("unknown cluster \"{name}\""),
                );
            }
            Targets::Single(Arc::from(name.as_str()))
        };
        let retry = route
            .retry
            .as_ref()
            .map(|r| build_retry(r, &format!("{path}.retry"), errors));
        let rewrite = route
            .rewrite
            .as_ref()
            .map(|r| build_rewrite(r, is_prefix, &format!("{path}.rewrite"), errors))
            .unwrap_or_default();
        let timeout = match route.timeout {
            Some(t) if t.is_zero() => None,
            Some(t) => Some(t),
            None => Some(DEFAULT_ROUTE_TIMEOUT),
        };
        RouteAction::Forward(Forward {
            targets,
            timeout,
            retry,
            rewrite,
            target_headers,
        })
    };

    Route {
        name: Arc::from(
            route
                .name
                .clone()
                .unwrap_or_else(|| format!("route-{index}"))
                .as_str(),
        ),
        rate_limit: route.local_rate_limit.as_ref().map(|limit| {
            super::rbac::build_rate_limit(limit, &format!("{path}.local_rate_limit"), errors)
        }),
        rate_limits: super::ratelimit::build_policies(
            &route.rate_limits,
            &format!("{path}.rate_limits"),
            errors,
        ),
        jwt: route
            .jwt
            .as_ref()
            .map(|jwt| super::jwt::route_jwt(jwt, &format!("{path}.jwt"), errors)),
        rbac: route
            .rbac
            .as_ref()
            .map(|rbac| super::rbac::build_route_rbac(rbac, &format!("{path}.rbac"), errors)),
        access_log: route.access_log.inspect(|policy| {
            if let Some((field, reason)) = policy.validate() {
                errors.push(format!("{path}.access_log.{field}"), reason);
            }
        }),
        headers: compile_mutations(&route.headers, &format!("{path}.headers"), errors),
        matcher,
        action,
    }
}

/// One level's header changes, compiled; `None` when there are none.
fn compile_mutations(
    file: &HeaderMutationsFile,
    path: &str,
    errors: &mut Errors,
) -> Option<Arc<crate::route::mutation::HeaderMutations>> {
    crate::route::mutation::HeaderMutations::compile(file, path, &mut |p, r| errors.push(p, r))
}

fn compile_regex(pattern: &str, path: &str, errors: &mut Errors) -> Option<Regex> {
    // Anchored: the pattern must match the whole value, as Envoy's safe_regex does.
    match Regex::new(&format!("^(?:{pattern})$")) {
        Ok(re) => Some(re),
        Err(err) => {
            errors.push(path.to_string(), format!("invalid regex: {err}"));
            None
        }
    }
}

fn build_value_match(
    exact: &Option<String>,
    regex: &Option<String>,
    present: Option<bool>,
    path: &str,
    errors: &mut Errors,
) -> ValueMatch {
    let set = [exact.is_some(), regex.is_some(), present.is_some()]
        .iter()
        .filter(|s| **s)
        .count();
    if set > 1 {
        errors.push(
            path.to_string(),
            "give at most one of exact, regex, present",
        );
    }
    if let Some(exact) = exact {
        ValueMatch::Exact(exact.clone())
    } else if let Some(pattern) = regex {
        match compile_regex(pattern, &format!("{path}.regex"), errors) {
            Some(re) => ValueMatch::Regex(re),
            None => ValueMatch::Present(true),
        }
    } else {
        ValueMatch::Present(present.unwrap_or(true))
    }
}

/// Header conditions at `{path}.headers[i]`.
pub(super) fn build_header_matches(
    headers: &[HeaderMatchFile],
    path: &str,
    errors: &mut Errors,
) -> Vec<HeaderMatch> {
    headers
        .iter()
        .enumerate()
        .filter_map(|(i, h)| {
            let hpath = format!("{path}.headers[{i}]");
            let name = match HeaderName::from_bytes(h.name.as_bytes()) {
                Ok(name) => name,
                Err(_) => {
                    errors.push(
                        format!("{hpath}.name"),
                        format!("\"{}\" is not a valid header name", h.name),
                    );
                    return None;
                }
            };
            let value = build_value_match(&h.exact, &h.regex, h.present, &hpath, errors);
            Some(HeaderMatch {
                name,
                value,
                invert: h.invert,
            })
        })
        .collect()
}

pub(super) fn build_match(m: &RouteMatchFile, path: &str, errors: &mut Errors) -> RouteMatch {
    let path_match = match &m.path {
        None => PathMatch::Any,
        Some(p) => {
            let ppath = format!("{path}.path");
            let set = [p.exact.is_some(), p.prefix.is_some(), p.regex.is_some()]
                .iter()
                .filter(|s| **s)
                .count();
            if set != 1 {
                errors.push(ppath.clone(), "give exactly one of exact, prefix, regex");
            }
            if let Some(exact) = &p.exact {
                if !exact.starts_with('/') {
                    errors.push(format!("{ppath}.exact"), "must start with /");
                }
                PathMatch::Exact(exact.clone())
            } else if let Some(prefix) = &p.prefix {
                if !prefix.starts_with('/') {
                    errors.push(format!("{ppath}.prefix"), "must start with /");
                }
                PathMatch::Prefix(prefix.clone())
            } else if let Some(pattern) = &p.regex {
                compile_regex(pattern, &format!("{ppath}.regex"), errors)
                    .map(PathMatch::Regex)
                    .unwrap_or(PathMatch::Any)
            } else {
                PathMatch::Any
            }
        }
    };
    let headers = build_header_matches(&m.headers, path, errors);
    let methods = m
        .methods
        .iter()
        .enumerate()
        .filter_map(|(i, method)| match Method::from_bytes(method.as_bytes()) {
            Ok(parsed) => Some(parsed),
            Err(_) => {
                errors.push(
                    format!("{path}.methods[{i}]"),
                    format!("\"{method}\" is not an HTTP method"),
                );
                None
            }
        })
        .collect();
    let query = m
        .query
        .iter()
        .enumerate()
        .map(|(i, q)| {
            let qpath = format!("{path}.query[{i}]");
            if q.name.is_empty() {
                errors.push(format!("{qpath}.name"), "must not be empty");
            }
            QueryMatch {
                name: q.name.clone(),
                value: build_value_match(&q.exact, &q.regex, q.present, &qpath, errors),
            }
        })
        .collect();
    RouteMatch {
        path: path_match,
        headers,
        methods,
        query,
    }
}

fn build_redirect(r: &RedirectFile, is_prefix: bool, path: &str, errors: &mut Errors) -> Redirect {
    let status = match r.status {
        301 | 302 | 303 | 307 | 308 => {
            StatusCode::from_u16(r.status).unwrap_or(StatusCode::MOVED_PERMANENTLY)
        }
        other => {
            errors.push(
                format!("{path}.status"),
                format!("{other} is not one of 301, 302, 303, 307, 308"),
            );
            StatusCode::MOVED_PERMANENTLY
        }
    };
    if let Some(scheme) = &r.scheme {
        if scheme != "http" && scheme != "https" {
            errors.push(
                format!("{path}.scheme"),
                format!("\"{scheme}\" is not http or https"),
            );
        }
    }
    if r.path.is_some() && r.prefix_rewrite.is_some() {
        errors.push(path.to_string(), "give at most one of path, prefix_rewrite");
    }
    if r.prefix_rewrite.is_some() && !is_prefix {
        errors.push(
            format!("{path}.prefix_rewrite"),
            "needs a prefix path match",
        );
    }
    if let Some(p) = &r.path {
        if !p.starts_with('/') {
            errors.push(format!("{path}.path"), "must start with /");
        }
    }
    Redirect {
        status,
        scheme: r.scheme.clone(),
        host: r.host.clone(),
        port: r.port,
        path: r.path.clone(),
        prefix_rewrite: r.prefix_rewrite.clone(),
        strip_query: r.strip_query,
    }
}

fn build_rewrite(r: &RewriteFile, is_prefix: bool, path: &str, errors: &mut Errors) -> Rewrite {
    if r.prefix.is_some() && r.regex.is_some() {
        errors.push(path.to_string(), "give at most one of prefix, regex");
    }
    if r.prefix.is_some() && !is_prefix {
        errors.push(format!("{path}.prefix"), "needs a prefix path match");
    }
    let regex = r.regex.as_ref().and_then(|rr| {
        // Not anchored: every match in the path is substituted.
        match Regex::new(&rr.pattern) {
            Ok(re) => Some((re, rr.substitution.clone())),
            Err(err) => {
                errors.push(
                    format!("{path}.regex.pattern"),
                    format!("invalid regex: {err}"),
                );
                None
            }
        }
    });
    let host = r
        .host
        .as_ref()
        .and_then(|h| match HeaderValue::from_str(h) {
            Ok(v) if !h.is_empty() && http::uri::Authority::try_from(h.as_str()).is_ok() => Some(v),
            _ => {
                errors.push(
                    format!("{path}.host"),
                    format!("\"{h}\" is not a valid host"),
                );
                None
            }
        });
    Rewrite {
        prefix: r.prefix.clone(),
        regex,
        host,
    }
}

fn build_retry(r: &RetryFile, path: &str, errors: &mut Errors) -> RetryPolicy {
    if r.on.is_empty() {
        errors.push(format!("{path}.on"), "needs at least one condition");
    }
    if r.max_attempts == 0 {
        errors.push(format!("{path}.max_attempts"), "must be at least 1");
    }
    if r.on.contains(&RetryOn::RetriableStatusCodes) && r.retriable_status_codes.is_empty() {
        errors.push(
            format!("{path}.retriable_status_codes"),
            "retriable-status-codes needs at least one code",
        );
    }
    if !r.on.contains(&RetryOn::RetriableStatusCodes) && !r.retriable_status_codes.is_empty() {
        // Listed codes that nothing retries are a mistake, not a preference.
        errors.push(
            format!("{path}.retriable_status_codes"),
            "has no effect unless `on` lists retriable-status-codes",
        );
    }
    for (i, code) in r.retriable_status_codes.iter().enumerate() {
        if !(100..600).contains(code) {
            errors.push(
                format!("{path}.retriable_status_codes[{i}]"),
                format!("{code} is not a status code"),
            );
        }
    }
    if r.backoff_base.is_zero() {
        errors.push(format!("{path}.backoff_base"), "must be more than 0");
    }
    if r.per_try_timeout.is_some_and(|t| t.is_zero()) {
        errors.push(format!("{path}.per_try_timeout"), "must be more than 0");
    }
    let backoff_max = r.backoff_max.unwrap_or(r.backoff_base * 10);
    if backoff_max < r.backoff_base {
        errors.push(
            format!("{path}.backoff_max"),
            "must not be less than backoff_base",
        );
    }
    let mut policy = RetryPolicy::new(&r.on);
    policy.retriable_status_codes = if r.on.contains(&RetryOn::RetriableStatusCodes) {
        r.retriable_status_codes.clone()
    } else {
        Vec::new()
    };
    policy.max_attempts = r.max_attempts.max(1);
    policy.per_try_timeout = r.per_try_timeout;
    policy.backoff_base = r.backoff_base;
    policy.backoff_max = backoff_max;
    policy.retry_non_idempotent = r.retry_non_idempotent;
    policy.max_body_bytes = r.max_body_bytes;
    policy
}

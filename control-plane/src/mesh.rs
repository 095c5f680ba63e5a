//! The YAML mesh description and its translation to Envoy v3 resources.
//!
//! A mesh file lists `listeners`, `routes` (route configurations) and
//! `services`; [`parse_mesh`] checks it and builds a [`Snapshot`] of
//! Listeners, RouteConfigurations, Clusters and ClusterLoadAssignments that
//! an unmodified Envoy accepts over ADS: HTTP listeners fetch their routes
//! by RDS and every cluster its endpoints by EDS, both over the same ADS
//! stream. [`watch_mesh`] polls the file and serves each good revision.
//!
//! ```yaml
//! listeners:
//!   - name: outbound
//!     address: 127.0.0.1:15001
//!     route: outbound-routes      # HTTP: HttpConnectionManager with RDS
//!   - name: db
//!     address: 127.0.0.1:15432
//!     tcp: { cluster: db }        # TCP: TcpProxy
//!   - name: api-inbound
//!     address: 127.0.0.1:15006
//!     route: api-inbound
//!     nodes: [api-v1]             # served to these node ids only (default: all)
//!     mtls: { allow: [spiffe://cluster.local/ns/shop/sa/outbound] }
//!     rbac:                       # HTTP RBAC filter: allow | deny
//!       action: deny
//!       policies:
//!         - { name: no-admin, paths: [{ prefix: /admin }], principals: [] }
//! routes:
//!   - name: outbound-routes
//!     virtual_hosts:
//!       - name: web
//!         domains: ["*"]
//!         routes:
//!           - name: api           # optional; names the route in logs
//!             prefix: /api        # or `path: /exact`, or `regex: ...`
//!             headers: [{ name: x-canary, exact: "1" }]
//!             cluster: api        # or `weighted: [{ cluster: a, weight: 90 }, ...]`
//!             timeout: 5s
//!             rate_limit: { max_tokens: 10, fill_interval: 1s }
//! services:
//!   - name: api
//!     endpoints: [{ address: 127.0.0.1:9001, weight: 1 }]
//!     lb: round_robin             # least_request | random
//!     protocol: http1             # http2: explicit HTTP/2 upstream
//!     connect_timeout: 5s
//!     max_connections: 1024
//!     tls: { identities: [spiffe://cluster.local/ns/shop/sa/api] }
//! ```
//!
//! Every field not listed is an error, and errors name the field path (e.g.
//! `services[0].endpoints[1].address`). References between entries (a
//! listener's route configuration, a route's clusters) must resolve.
//!
//! Mesh mTLS (listener `mtls`, service `tls`) names the workload identity's
//! SDS secrets by Istio's names, `default` and `ROOTCA`; the control plane
//! serves no secrets, so each proxy brings its identity (Postern: `files` or
//! `istio_ca`). Policies: [`policy`].
//!
//! Boundaries: listeners may be per node; route configurations and services
//! are served to every node alike.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use postern_proto::envoy::config::cluster::v3::{self as cluster_v3, circuit_breakers, cluster};
use postern_proto::envoy::config::core::v3::{
    self as core_v3, address, config_source, socket_address,
};
use postern_proto::envoy::config::endpoint::v3::{self as endpoint_v3, lb_endpoint};
use postern_proto::envoy::config::listener::v3::{self as listener_v3, filter};
use postern_proto::envoy::config::route::v3::{
    self as route_v3, header_matcher, route, route_action, route_match, weighted_cluster,
};
use postern_proto::envoy::extensions::filters::http::router::v3::Router;
use postern_proto::envoy::extensions::filters::network::http_connection_manager::v3::{
    self as hcm_v3, http_connection_manager, http_filter,
};
use postern_proto::envoy::extensions::filters::network::tcp_proxy::v3::{
    self as tcp_v3, tcp_proxy,
};
use postern_proto::envoy::extensions::upstreams::http::v3::{
    http_protocol_options, HttpProtocolOptions,
};
use postern_proto::envoy::r#type::matcher::v3::{string_matcher, RegexMatcher, StringMatcher};
use postern_proto::google::protobuf::UInt32Value;
use postern_proto::type_url;
use serde::Deserialize;

use crate::ads::{pack, AdsServer, Fnv1a, Snapshot};

pub mod policy;
#[cfg(test)]
mod tests;

use policy::{MtlsSpec, RateLimitSpec, RbacSpec, ServiceTlsSpec};

/// Network filter name of the HTTP connection manager.
pub const HTTP_CONNECTION_MANAGER: &str = "envoy.filters.network.http_connection_manager";
/// Network filter name of the TCP proxy.
pub const TCP_PROXY: &str = "envoy.filters.network.tcp_proxy";
/// HTTP filter name of the router.
pub const ROUTER: &str = "envoy.filters.http.router";
/// Key in a Cluster's `typed_extension_protocol_options` for upstream HTTP
/// options.
pub const HTTP_PROTOCOL_OPTIONS: &str = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions";

/// A service's `connect_timeout` when the mesh file gives none (Envoy's own
/// default).
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a mesh description could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    /// The mesh file could not be read.
    #[error("could not read mesh file {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The YAML is malformed, has an unknown field, or a value of the wrong
    /// type.
    #[error("invalid mesh description at `{path}`")]
    Parse {
        /// Path of the offending field, e.g. `listeners[0].address`; `.` for
        /// the document itself.
        path: String,
        /// What the YAML parser reported (with line and column).
        #[source]
        source: serde_yaml_ng::Error,
    },
    /// A field is well-formed YAML but not a valid value, or a reference
    /// does not resolve.
    #[error("invalid mesh description at `{path}`: {reason}")]
    Invalid {
        /// Path of the offending field.
        path: String,
        /// What is wrong and how to fix it.
        reason: String,
    },
    /// A route's `regex` does not compile.
    #[error("invalid mesh description at `{path}`: invalid regex")]
    Regex {
        /// Path of the offending field.
        path: String,
        /// The regex compiler's error.
        #[source]
        source: regex::Error,
    },
}

impl MeshError {
    /// Path of the offending field within the mesh description, if the error
    /// is about one.
    pub fn field_path(&self) -> Option<&str> {
        match self {
            MeshError::Read { .. } => None,
            MeshError::Parse { path, .. }
            | MeshError::Invalid { path, .. }
            | MeshError::Regex { path, .. } => Some(path),
        }
    }
}

fn invalid(path: impl Into<String>, reason: impl Into<String>) -> MeshError {
    MeshError::Invalid {
        path: path.into(),
        reason: reason.into(),
    }
}

/// The version [`load_mesh`] and [`watch_mesh`] give a mesh file's snapshot:
/// a hash of its bytes, so an unchanged file keeps its version across
/// restarts and a client reconnecting is not sent it again.
pub fn content_version(text: &[u8]) -> String {
    let mut hash = Fnv1a::new();
    hash.write(text);
    format!("{:016x}", hash.finish())
}

/// Reads and parses the mesh file at `path`; the snapshot's version is
/// [`content_version`] of the file.
///
/// # Errors
///
/// [`MeshError::Read`] if the file cannot be read, otherwise as
/// [`parse_mesh`].
pub fn load_mesh(path: impl AsRef<Path>) -> Result<Snapshot, MeshError> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|source| MeshError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse_bytes(&bytes)
}

fn parse_bytes(bytes: &[u8]) -> Result<Snapshot, MeshError> {
    let text = std::str::from_utf8(bytes).map_err(|_| invalid(".", "the file is not UTF-8"))?;
    parse_mesh(text, content_version(bytes))
}

/// Parses a YAML mesh description into a snapshot of Envoy resources with
/// the given version.
///
/// # Errors
///
/// [`MeshError::Parse`] for malformed YAML, unknown fields or wrongly typed
/// values; [`MeshError::Invalid`] or [`MeshError::Regex`] for values Envoy
/// would reject (empty or duplicate names, missing or conflicting choices,
/// dangling references, zero weights or timeouts). Each names the field path.
pub fn parse_mesh(text: &str, version: impl Into<String>) -> Result<Snapshot, MeshError> {
    let deserializer = serde_yaml_ng::Deserializer::from_str(text);
    let mesh: MeshFile =
        serde_path_to_error::deserialize(deserializer).map_err(|err| MeshError::Parse {
            path: err.path().to_string(),
            source: err.into_inner(),
        })?;
    mesh.validate()?;
    Ok(mesh.to_snapshot(version.into()))
}

/// Serves the mesh file at `path` through `server`: every `poll` it reads
/// the file and, when its content differs from what `server` serves (by
/// [`content_version`]), parses it and installs the new snapshot. A file
/// that cannot be read or parsed is logged (`warn`, with the field path)
/// once per distinct content, and the last good snapshot stays served.
///
/// The first check runs at once, so a server still holding its initial
/// empty snapshot is filled. Runs until the future is dropped.
pub async fn watch_mesh(path: impl AsRef<Path>, server: AdsServer, poll: Duration) {
    let mut watcher = MeshWatcher::new(path.as_ref().to_owned(), server);
    let mut interval = tokio::time::interval(poll);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        watcher.check().await;
    }
}

/// What one look at the mesh file did.
#[derive(Debug)]
enum Check {
    /// The file matches what is served, or is a bad revision already
    /// reported.
    Unchanged,
    /// A new snapshot of this version is served.
    Served(String),
    /// The file could not be read or parsed; the last good snapshot stays.
    Failed(MeshError),
}

/// The state of [`watch_mesh`] between polls.
struct MeshWatcher {
    path: PathBuf,
    server: AdsServer,
    /// The content version (or read error kind) last reported as bad, so a
    /// broken file is logged once, not at every poll.
    last_bad: Option<String>,
}

impl MeshWatcher {
    fn new(path: PathBuf, server: AdsServer) -> MeshWatcher {
        MeshWatcher {
            path,
            server,
            last_bad: None,
        }
    }

    async fn check(&mut self) -> Check {
        let outcome = self.check_quietly().await;
        match &outcome {
            Check::Unchanged => {}
            Check::Served(version) => tracing::info!(
                path = %self.path.display(),
                version,
                "mesh file changed; serving the new snapshot"
            ),
            Check::Failed(err) => tracing::warn!(
                path = %self.path.display(),
                field = err.field_path().unwrap_or_default(),
                error = %error_chain(err),
                "invalid mesh file; still serving the last good snapshot"
            ),
        }
        outcome
    }

    async fn check_quietly(&mut self) -> Check {
        let bytes = match tokio::fs::read(&self.path).await {
            Ok(bytes) => bytes,
            Err(source) => {
                let key = format!("read error: {}", source.kind());
                if self.last_bad.as_ref() == Some(&key) {
                    return Check::Unchanged;
                }
                self.last_bad = Some(key);
                return Check::Failed(MeshError::Read {
                    path: self.path.clone(),
                    source,
                });
            }
        };
        let version = content_version(&bytes);
        if version == self.server.snapshot().version || self.last_bad.as_ref() == Some(&version) {
            return Check::Unchanged;
        }
        match parse_bytes(&bytes) {
            Ok(snapshot) => {
                self.last_bad = None;
                self.server.set_snapshot(snapshot);
                Check::Served(version)
            }
            Err(err) => {
                self.last_bad = Some(version);
                Check::Failed(err)
            }
        }
    }
}

/// `err: cause: cause`, for one-line logs.
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut message = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}

// ---------------------------------------------------------------------------
// The file format

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MeshFile {
    #[serde(default)]
    listeners: Vec<ListenerSpec>,
    #[serde(default)]
    routes: Vec<RouteConfigSpec>,
    #[serde(default)]
    services: Vec<ServiceSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListenerSpec {
    name: String,
    address: SocketAddr,
    /// Name of the route configuration of an HTTP listener.
    #[serde(default)]
    route: Option<String>,
    #[serde(default)]
    tcp: Option<TcpSpec>,
    /// Node ids served this listener; empty: every node.
    #[serde(default)]
    nodes: Vec<String>,
    #[serde(default)]
    mtls: Option<MtlsSpec>,
    #[serde(default)]
    rbac: Option<RbacSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TcpSpec {
    cluster: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RouteConfigSpec {
    name: String,
    virtual_hosts: Vec<VirtualHostSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct VirtualHostSpec {
    name: String,
    domains: Vec<String>,
    #[serde(default)]
    routes: Vec<RouteSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RouteSpec {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    prefix: Option<String>,
    #[serde(default)]
    path: Option<String>,
    #[serde(default)]
    regex: Option<String>,
    #[serde(default)]
    headers: Vec<HeaderSpec>,
    #[serde(default)]
    cluster: Option<String>,
    #[serde(default)]
    weighted: Option<Vec<WeightedSpec>>,
    #[serde(default, with = "humantime_serde")]
    timeout: Option<Duration>,
    #[serde(default)]
    rate_limit: Option<RateLimitSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HeaderSpec {
    name: String,
    exact: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WeightedSpec {
    cluster: String,
    weight: u32,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ServiceSpec {
    name: String,
    #[serde(default)]
    endpoints: Vec<EndpointSpec>,
    #[serde(default)]
    lb: LbSpec,
    #[serde(default)]
    protocol: ProtocolSpec,
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    connect_timeout: Duration,
    #[serde(default)]
    max_connections: Option<u32>,
    #[serde(default)]
    tls: Option<ServiceTlsSpec>,
}

fn default_connect_timeout() -> Duration {
    DEFAULT_CONNECT_TIMEOUT
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EndpointSpec {
    address: SocketAddr,
    #[serde(default = "default_weight")]
    weight: u32,
}

fn default_weight() -> u32 {
    1
}

#[derive(Debug, Default, Clone, Copy, Deserialize)]
#[serde(rename_all = "snake_case")]
enum LbSpec {
    #[default]
    RoundRobin,
    LeastRequest,
    Random,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
enum ProtocolSpec {
    #[default]
    Http1,
    Http2,
}

// ---------------------------------------------------------------------------
// Validation: whatever Envoy would NACK, caught here with a field path.

/// Checks that `name` is non-empty and not yet in `seen`.
fn unique_name<'a>(
    seen: &mut BTreeSet<&'a str>,
    name: &'a str,
    path: &str,
    what: &str,
) -> Result<(), MeshError> {
    if name.is_empty() {
        return Err(invalid(
            format!("{path}.name"),
            format!("{what} name is empty"),
        ));
    }
    if !seen.insert(name) {
        return Err(invalid(
            format!("{path}.name"),
            format!("duplicate {what} name {name:?}; names must be unique"),
        ));
    }
    Ok(())
}

impl MeshFile {
    fn validate(&self) -> Result<(), MeshError> {
        let mut services = BTreeSet::new();
        for (i, service) in self.services.iter().enumerate() {
            let path = format!("services[{i}]");
            unique_name(&mut services, &service.name, &path, "service")?;
            service.validate(&path)?;
        }
        let mut routes = BTreeSet::new();
        for (i, config) in self.routes.iter().enumerate() {
            let path = format!("routes[{i}]");
            unique_name(&mut routes, &config.name, &path, "route configuration")?;
            config.validate(&path, &services)?;
        }
        let mut listeners = BTreeSet::new();
        for (i, listener) in self.listeners.iter().enumerate() {
            let path = format!("listeners[{i}]");
            unique_name(&mut listeners, &listener.name, &path, "listener")?;
            listener.validate_nodes(&path)?;
            // Port 0 binds a fresh port each time, so only fixed ports clash,
            // and only on a node that gets both listeners.
            let clash = self.listeners[..i].iter().any(|other| {
                other.address == listener.address && other.shares_a_node_with(listener)
            });
            if listener.address.port() != 0 && clash {
                return Err(invalid(
                    format!("{path}.address"),
                    format!(
                        "address {} is used by another listener of the same node",
                        listener.address
                    ),
                ));
            }
            if let Some(mtls) = &listener.mtls {
                mtls.validate(&format!("{path}.mtls"))?;
            }
            if let Some(rbac) = &listener.rbac {
                if listener.route.is_none() {
                    return Err(invalid(
                        format!("{path}.rbac"),
                        "rbac is an HTTP filter: only on a listener with `route`",
                    ));
                }
                rbac.validate(&format!("{path}.rbac"))?;
            }
            match (&listener.route, &listener.tcp) {
                (Some(route), None) => {
                    if !routes.contains(route.as_str()) {
                        return Err(invalid(
                            format!("{path}.route"),
                            format!("no route configuration named {route:?} in `routes`"),
                        ));
                    }
                }
                (None, Some(tcp)) => {
                    check_cluster(&services, &tcp.cluster, &format!("{path}.tcp.cluster"))?;
                }
                _ => {
                    return Err(invalid(
                        path,
                        "set exactly one of `route` (HTTP listener) and `tcp` (TCP proxy)",
                    ))
                }
            }
        }
        Ok(())
    }
}

impl ListenerSpec {
    fn validate_nodes(&self, path: &str) -> Result<(), MeshError> {
        let mut seen = BTreeSet::new();
        for (i, node) in self.nodes.iter().enumerate() {
            if node.is_empty() || !seen.insert(node.as_str()) {
                return Err(invalid(
                    format!("{path}.nodes[{i}]"),
                    format!("node id {node:?} is empty or listed twice"),
                ));
            }
        }
        Ok(())
    }

    /// Whether some node is served both listeners (an empty list is every
    /// node).
    fn shares_a_node_with(&self, other: &ListenerSpec) -> bool {
        self.nodes.is_empty()
            || other.nodes.is_empty()
            || self.nodes.iter().any(|node| other.nodes.contains(node))
    }
}

fn check_cluster(services: &BTreeSet<&str>, cluster: &str, path: &str) -> Result<(), MeshError> {
    if services.contains(cluster) {
        Ok(())
    } else {
        Err(invalid(
            path,
            format!("no service named {cluster:?} in `services`"),
        ))
    }
}

impl ServiceSpec {
    fn validate(&self, path: &str) -> Result<(), MeshError> {
        if self.connect_timeout.is_zero() {
            return Err(invalid(
                format!("{path}.connect_timeout"),
                "connect_timeout must be greater than zero",
            ));
        }
        if self.connect_timeout.as_secs() > MAX_PROTO_SECONDS {
            return Err(invalid(
                format!("{path}.connect_timeout"),
                "connect_timeout is too long",
            ));
        }
        for (i, endpoint) in self.endpoints.iter().enumerate() {
            if endpoint.weight == 0 {
                return Err(invalid(
                    format!("{path}.endpoints[{i}].weight"),
                    "endpoint weight must be at least 1",
                ));
            }
        }
        if let Some(tls) = &self.tls {
            tls.validate(&format!("{path}.tls"))?;
        }
        Ok(())
    }
}

impl RouteConfigSpec {
    fn validate(&self, path: &str, services: &BTreeSet<&str>) -> Result<(), MeshError> {
        let mut vhosts = BTreeSet::new();
        let mut domains = BTreeSet::new();
        for (i, vhost) in self.virtual_hosts.iter().enumerate() {
            let path = format!("{path}.virtual_hosts[{i}]");
            unique_name(&mut vhosts, &vhost.name, &path, "virtual host")?;
            if vhost.domains.is_empty() {
                return Err(invalid(
                    format!("{path}.domains"),
                    "a virtual host needs at least one domain (`*` for any)",
                ));
            }
            for (j, domain) in vhost.domains.iter().enumerate() {
                // Envoy rejects a route configuration in which two virtual
                // hosts claim the same domain.
                if domain.is_empty() || !domains.insert(domain.to_ascii_lowercase()) {
                    return Err(invalid(
                        format!("{path}.domains[{j}]"),
                        format!("domain {domain:?} is empty or already used in this route configuration"),
                    ));
                }
            }
            for (j, route) in vhost.routes.iter().enumerate() {
                route.validate(&format!("{path}.routes[{j}]"), services)?;
            }
        }
        Ok(())
    }
}

/// The largest `google.protobuf.Duration` seconds value (10000 years).
const MAX_PROTO_SECONDS: u64 = 315_576_000_000;

impl RouteSpec {
    fn validate(&self, path: &str, services: &BTreeSet<&str>) -> Result<(), MeshError> {
        if self.name.as_deref() == Some("") {
            return Err(invalid(
                format!("{path}.name"),
                "route name is empty; leave it out or give one",
            ));
        }
        if let Some(limit) = &self.rate_limit {
            limit.validate(&format!("{path}.rate_limit"))?;
        }
        let matches = [&self.prefix, &self.path, &self.regex]
            .iter()
            .filter(|m| m.is_some())
            .count();
        if matches != 1 {
            return Err(invalid(
                path,
                "set exactly one of `prefix`, `path` and `regex`",
            ));
        }
        if let Some(exact) = &self.path {
            if !exact.starts_with('/') {
                return Err(invalid(
                    format!("{path}.path"),
                    format!("path {exact:?} must start with `/`"),
                ));
            }
        }
        if let Some(regex) = &self.regex {
            regex::Regex::new(regex).map_err(|source| MeshError::Regex {
                path: format!("{path}.regex"),
                source,
            })?;
        }
        for (i, header) in self.headers.iter().enumerate() {
            if header.name.is_empty() {
                return Err(invalid(
                    format!("{path}.headers[{i}].name"),
                    "header name is empty",
                ));
            }
        }
        if self
            .timeout
            .is_some_and(|t| t.as_secs() > MAX_PROTO_SECONDS)
        {
            return Err(invalid(format!("{path}.timeout"), "timeout is too long"));
        }
        match (&self.cluster, &self.weighted) {
            (Some(cluster), None) => check_cluster(services, cluster, &format!("{path}.cluster")),
            (None, Some(weighted)) => {
                if weighted.is_empty() {
                    return Err(invalid(
                        format!("{path}.weighted"),
                        "weighted needs at least one cluster",
                    ));
                }
                let mut total: u64 = 0;
                for (i, entry) in weighted.iter().enumerate() {
                    check_cluster(
                        services,
                        &entry.cluster,
                        &format!("{path}.weighted[{i}].cluster"),
                    )?;
                    total += u64::from(entry.weight);
                }
                if total == 0 || total > u64::from(u32::MAX) {
                    return Err(invalid(
                        format!("{path}.weighted"),
                        "the weights must add up to between 1 and 4294967295",
                    ));
                }
                Ok(())
            }
            _ => Err(invalid(path, "set exactly one of `cluster` and `weighted`")),
        }
    }
}

// ---------------------------------------------------------------------------
// Translation to Envoy resources. Runs only on a validated mesh.

fn proto_duration(duration: Duration) -> postern_proto::google::protobuf::Duration {
    postern_proto::google::protobuf::Duration {
        // Validation caps durations at MAX_PROTO_SECONDS, far below i64::MAX.
        seconds: i64::try_from(duration.as_secs()).unwrap_or(i64::MAX),
        // Below 1e9, so it fits.
        nanos: i32::try_from(duration.subsec_nanos()).unwrap_or(0),
    }
}

fn socket_address(addr: SocketAddr) -> core_v3::Address {
    core_v3::Address {
        address: Some(address::Address::SocketAddress(core_v3::SocketAddress {
            protocol: socket_address::Protocol::Tcp as i32,
            // IPv6 without brackets, as Envoy expects.
            address: addr.ip().to_string(),
            port_specifier: Some(socket_address::PortSpecifier::PortValue(u32::from(
                addr.port(),
            ))),
            ..Default::default()
        })),
    }
}

/// `ads {}` with the v3 transport: fetch over the same ADS stream.
fn ads_config_source() -> core_v3::ConfigSource {
    core_v3::ConfigSource {
        resource_api_version: core_v3::ApiVersion::V3 as i32,
        config_source_specifier: Some(config_source::ConfigSourceSpecifier::Ads(
            core_v3::AggregatedConfigSource {},
        )),
        ..Default::default()
    }
}

impl MeshFile {
    fn to_snapshot(&self, version: String) -> Snapshot {
        let mut snapshot = Snapshot::new(version);
        // Route configurations with a per-route rate limit: Envoy applies
        // one only when the listener has the filter.
        let rate_limited: BTreeSet<&str> = self
            .routes
            .iter()
            .filter(|config| {
                config
                    .virtual_hosts
                    .iter()
                    .flat_map(|vhost| &vhost.routes)
                    .any(|route| route.rate_limit.is_some())
            })
            .map(|config| config.name.as_str())
            .collect();
        for listener in &self.listeners {
            let limited = listener
                .route
                .as_deref()
                .is_some_and(|route| rate_limited.contains(route));
            let body = pack(&listener.to_envoy(limited));
            if listener.nodes.is_empty() {
                snapshot.add(type_url::LISTENER, &listener.name, body);
            } else {
                for node in &listener.nodes {
                    snapshot.add_for_node(node, type_url::LISTENER, &listener.name, body.clone());
                }
            }
        }
        for config in &self.routes {
            snapshot.add(type_url::ROUTE, &config.name, pack(&config.to_envoy()));
        }
        for service in &self.services {
            snapshot.add(type_url::CLUSTER, &service.name, pack(&service.cluster()));
            snapshot.add(
                type_url::ENDPOINT,
                &service.name,
                pack(&service.load_assignment()),
            );
        }
        snapshot
    }
}

impl ListenerSpec {
    /// `rate_limited`: some route of its route configuration has a rate
    /// limit.
    fn to_envoy(&self, rate_limited: bool) -> listener_v3::Listener {
        let network_filter = match (&self.route, &self.tcp) {
            (Some(route), _) => {
                let mut http_filters = Vec::new();
                if let Some(rbac) = &self.rbac {
                    http_filters.push(rbac.to_filter());
                }
                if rate_limited {
                    http_filters.push(policy::rate_limit_filter());
                }
                http_filters.push(hcm_v3::HttpFilter {
                    name: ROUTER.to_owned(),
                    config_type: Some(http_filter::ConfigType::TypedConfig(pack(
                        &Router::default(),
                    ))),
                    ..Default::default()
                });
                let hcm = hcm_v3::HttpConnectionManager {
                    stat_prefix: self.name.clone(),
                    route_specifier: Some(http_connection_manager::RouteSpecifier::Rds(
                        hcm_v3::Rds {
                            config_source: Some(ads_config_source()),
                            route_config_name: route.clone(),
                        },
                    )),
                    http_filters,
                    ..Default::default()
                };
                listener_v3::Filter {
                    name: HTTP_CONNECTION_MANAGER.to_owned(),
                    config_type: Some(filter::ConfigType::TypedConfig(pack(&hcm))),
                }
            }
            (None, tcp) => {
                let proxy = tcp_v3::TcpProxy {
                    stat_prefix: self.name.clone(),
                    cluster_specifier: tcp
                        .as_ref()
                        .map(|tcp| tcp_proxy::ClusterSpecifier::Cluster(tcp.cluster.clone())),
                    ..Default::default()
                };
                listener_v3::Filter {
                    name: TCP_PROXY.to_owned(),
                    config_type: Some(filter::ConfigType::TypedConfig(pack(&proxy))),
                }
            }
        };
        listener_v3::Listener {
            name: self.name.clone(),
            address: Some(socket_address(self.address)),
            filter_chains: vec![listener_v3::FilterChain {
                filters: vec![network_filter],
                transport_socket: self.mtls.as_ref().map(MtlsSpec::transport_socket),
                ..Default::default()
            }],
            ..Default::default()
        }
    }
}

impl RouteConfigSpec {
    fn to_envoy(&self) -> route_v3::RouteConfiguration {
        route_v3::RouteConfiguration {
            name: self.name.clone(),
            virtual_hosts: self
                .virtual_hosts
                .iter()
                .map(|vhost| route_v3::VirtualHost {
                    name: vhost.name.clone(),
                    domains: vhost.domains.clone(),
                    routes: vhost.routes.iter().map(RouteSpec::to_envoy).collect(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }
}

impl RouteSpec {
    fn to_envoy(&self) -> route_v3::Route {
        let path_specifier = match (&self.prefix, &self.path, &self.regex) {
            (Some(prefix), _, _) => route_match::PathSpecifier::Prefix(prefix.clone()),
            (None, Some(path), _) => route_match::PathSpecifier::Path(path.clone()),
            (None, None, regex) => route_match::PathSpecifier::SafeRegex(RegexMatcher {
                regex: regex.clone().unwrap_or_default(),
                // No engine: Envoy's default, RE2.
                engine_type: None,
            }),
        };
        let headers = self
            .headers
            .iter()
            .map(|header| route_v3::HeaderMatcher {
                name: header.name.clone(),
                header_match_specifier: Some(header_matcher::HeaderMatchSpecifier::StringMatch(
                    StringMatcher {
                        match_pattern: Some(string_matcher::MatchPattern::Exact(
                            header.exact.clone(),
                        )),
                        ignore_case: false,
                    },
                )),
                ..Default::default()
            })
            .collect();
        let cluster_specifier = match (&self.cluster, &self.weighted) {
            (Some(cluster), _) => route_action::ClusterSpecifier::Cluster(cluster.clone()),
            (None, weighted) => {
                route_action::ClusterSpecifier::WeightedClusters(route_v3::WeightedCluster {
                    clusters: weighted
                        .iter()
                        .flatten()
                        .map(|entry| weighted_cluster::ClusterWeight {
                            name: entry.cluster.clone(),
                            weight: Some(UInt32Value {
                                value: entry.weight,
                            }),
                            ..Default::default()
                        })
                        .collect(),
                    ..Default::default()
                })
            }
        };
        route_v3::Route {
            name: self.name.clone().unwrap_or_default(),
            typed_per_filter_config: self
                .rate_limit
                .iter()
                .map(|limit| {
                    (
                        policy::LOCAL_RATE_LIMIT.to_owned(),
                        limit.per_route_config(),
                    )
                })
                .collect(),
            r#match: Some(route_v3::RouteMatch {
                path_specifier: Some(path_specifier),
                headers,
                ..Default::default()
            }),
            action: Some(route::Action::Route(route_v3::RouteAction {
                cluster_specifier: Some(cluster_specifier),
                timeout: self.timeout.map(proto_duration),
                ..Default::default()
            })),
            ..Default::default()
        }
    }
}

impl ServiceSpec {
    fn cluster(&self) -> cluster_v3::Cluster {
        let lb_policy = match self.lb {
            LbSpec::RoundRobin => cluster::LbPolicy::RoundRobin,
            LbSpec::LeastRequest => cluster::LbPolicy::LeastRequest,
            LbSpec::Random => cluster::LbPolicy::Random,
        };
        let mut typed_extension_protocol_options = HashMap::new();
        if self.protocol == ProtocolSpec::Http2 {
            let options = HttpProtocolOptions {
                upstream_protocol_options: Some(
                    http_protocol_options::UpstreamProtocolOptions::ExplicitHttpConfig(
                        http_protocol_options::ExplicitHttpConfig {
                            protocol_config: Some(
                                http_protocol_options::explicit_http_config::ProtocolConfig::Http2ProtocolOptions(
                                    core_v3::Http2ProtocolOptions::default(),
                                ),
                            ),
                        },
                    ),
                ),
                ..Default::default()
            };
            typed_extension_protocol_options
                .insert(HTTP_PROTOCOL_OPTIONS.to_owned(), pack(&options));
        }
        cluster_v3::Cluster {
            name: self.name.clone(),
            cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(
                cluster::DiscoveryType::Eds as i32,
            )),
            eds_cluster_config: Some(cluster::EdsClusterConfig {
                eds_config: Some(ads_config_source()),
                // Empty: the ClusterLoadAssignment is named after the cluster.
                service_name: String::new(),
            }),
            connect_timeout: Some(proto_duration(self.connect_timeout)),
            lb_policy: lb_policy as i32,
            circuit_breakers: self.max_connections.map(|max| cluster_v3::CircuitBreakers {
                thresholds: vec![circuit_breakers::Thresholds {
                    priority: core_v3::RoutingPriority::Default as i32,
                    max_connections: Some(UInt32Value { value: max }),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            typed_extension_protocol_options,
            transport_socket: self.tls.as_ref().map(ServiceTlsSpec::transport_socket),
            ..Default::default()
        }
    }

    fn load_assignment(&self) -> endpoint_v3::ClusterLoadAssignment {
        endpoint_v3::ClusterLoadAssignment {
            cluster_name: self.name.clone(),
            endpoints: vec![endpoint_v3::LocalityLbEndpoints {
                lb_endpoints: self
                    .endpoints
                    .iter()
                    .map(|endpoint| endpoint_v3::LbEndpoint {
                        host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(
                            endpoint_v3::Endpoint {
                                address: Some(socket_address(endpoint.address)),
                                ..Default::default()
                            },
                        )),
                        load_balancing_weight: Some(UInt32Value {
                            value: endpoint.weight,
                        }),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            }],
            ..Default::default()
        }
    }
}

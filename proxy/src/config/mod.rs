//! Postern's internal config model and its static-file source.
//!
//! `file` holds the serde types of the YAML file. `Config::from_yaml` reads
//! them (with field paths in every parse error), validates cross references
//! and compiles the result into the runtime model: routers with compiled
//! regexes, cluster settings, listener settings. Validation happens once here,
//! so the hot path trusts the model. No I/O besides reading the file.

pub mod capture;
mod chains;
pub mod file;
mod jwt;
#[cfg(test)]
mod jwt_tests;
mod ratelimit;
mod rbac;
#[cfg(test)]
mod rbac_tests;
mod tls;
mod validate;
pub mod xds;
#[cfg(test)]
mod xds_tests;

use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

pub use file::ConfigFile;
use file::{ClusterFile, ListenerLimitsFile};
pub use tls::{
    EdgeCertificate, EdgeTls, IdentityConfig, IdentitySource, ListenerTls, UpstreamTlsConfig,
};

use crate::route::{RouteTable, TcpRoute};

/// One problem in a config: where it is and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// Dotted path to the field, e.g. `listeners[0].virtual_hosts[1].routes[2].cluster`.
    pub path: String,
    /// Why the value is rejected.
    pub reason: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.reason)
    }
}

/// A config that cannot be used; lists every problem found.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The YAML is malformed or does not fit the schema.
    #[error("{0}")]
    Parse(FieldError),
    /// The YAML fits the schema but the values do not make sense together.
    #[error("{}", join_errors(.0))]
    Invalid(Vec<FieldError>),
}

fn join_errors(errors: &[FieldError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

impl ConfigError {
    /// Every field problem in this error (empty for a read error).
    pub fn field_errors(&self) -> Vec<FieldError> {
        match self {
            ConfigError::Read { .. } => Vec::new(),
            ConfigError::Parse(e) => vec![e.clone()],
            ConfigError::Invalid(errors) => errors.clone(),
        }
    }
}

/// Bootstrap settings from flags and environment variables; each one set
/// replaces the file's value, so a pod spec needs no config file.
#[derive(Debug, Clone, Default)]
pub struct BootstrapOverrides {
    /// `node.id`.
    pub node_id: Option<String>,
    /// `node.cluster`.
    pub node_cluster: Option<String>,
    /// `xds.address`.
    pub xds_address: Option<String>,
    /// `xds.protocol`.
    pub xds_protocol: Option<file::XdsProtocolFile>,
    /// `admin.address`.
    pub admin_address: Option<SocketAddr>,
    /// `telemetry.workload.name`.
    pub workload_name: Option<String>,
    /// `telemetry.workload.namespace`.
    pub workload_namespace: Option<String>,
    /// `telemetry.workload.app`.
    pub app: Option<String>,
    /// `telemetry.workload.version`.
    pub app_version: Option<String>,
    /// `opaque_ports`.
    pub opaque_ports: Option<Vec<capture::PortRange>>,
    /// `state_dir`.
    pub state_dir: Option<std::path::PathBuf>,
    /// `outbound_drain_wait`.
    pub outbound_drain_wait: Option<Duration>,
}

impl BootstrapOverrides {
    fn apply(&self, file: &mut ConfigFile) {
        if let Some(id) = &self.node_id {
            file.node.get_or_insert_with(Default::default).id = id.clone();
        }
        if let Some(cluster) = &self.node_cluster {
            file.node.get_or_insert_with(Default::default).cluster = cluster.clone();
        }
        if let Some(address) = &self.xds_address {
            match &mut file.xds {
                Some(xds) => xds.address = address.clone(),
                None => {
                    file.xds = Some(file::XdsFile {
                        address: address.clone(),
                        protocol: Default::default(),
                        ca_cert: None,
                        client_cert: None,
                        client_key: None,
                        initial_backoff: std::time::Duration::from_millis(500),
                        max_backoff: std::time::Duration::from_secs(30),
                        initial_fetch_timeout: file::default_initial_fetch_timeout(),
                    })
                }
            }
        }
        if let (Some(protocol), Some(xds)) = (self.xds_protocol, &mut file.xds) {
            xds.protocol = protocol;
        }
        if let Some(admin) = self.admin_address {
            file.admin.address = admin;
        }
        if let Some(ports) = &self.opaque_ports {
            file.opaque_ports = ports.clone();
        }
        if let Some(dir) = &self.state_dir {
            file.state_dir = Some(dir.clone());
        }
        if let Some(wait) = self.outbound_drain_wait {
            file.outbound_drain_wait = wait;
        }
        let workload = &mut file.telemetry.workload;
        for (flag, field) in [
            (&self.workload_name, &mut workload.name),
            (&self.workload_namespace, &mut workload.namespace),
            (&self.app, &mut workload.app),
            (&self.app_version, &mut workload.version),
        ] {
            if let Some(value) = flag {
                *field = Some(value.clone());
            }
        }
    }
}

/// A validated, compiled config: what the proxy runs.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file as read, for `/config_dump`.
    pub source: Arc<ConfigFile>,
    /// Admin server address.
    pub admin_address: SocketAddr,
    /// Longest time a drain waits for in-flight calls.
    pub drain_timeout: Duration,
    /// Listeners in file order.
    pub listeners: Vec<Arc<Listener>>,
    /// Clusters in file order.
    pub clusters: Vec<Arc<ClusterFile>>,
    /// TLS settings of the clusters that use TLS, by cluster name.
    pub upstream_tls: std::collections::HashMap<Arc<str>, UpstreamTlsConfig>,
    /// The workload identity, when mesh mTLS is configured.
    pub identity: Option<IdentityConfig>,
}

/// A listener, ready to bind.
#[derive(Debug)]
pub struct Listener {
    /// Unique name.
    pub name: Arc<str>,
    /// Address to bind.
    pub address: SocketAddr,
    /// Limits.
    pub limits: ListenerLimitsFile,
    /// What it serves.
    pub protocol: ListenerProtocol,
    /// TLS in front of it.
    pub tls: ListenerTls,
    /// Which side of the workload it faces, for telemetry.
    pub direction: crate::telemetry::log::TrafficDirection,
    /// Head-sampling ratio of new traces.
    pub trace_sampling: f64,
    /// Its own access-log stream, instead of the process-wide one.
    pub als: Option<crate::telemetry::als::AlsConfig>,
    /// When it stops accepting in a drain.
    pub drain: DrainPhase,
}

/// When a listener stops accepting once a drain has started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrainPhase {
    /// At once: callers are told to go elsewhere (inbound, gateways).
    Immediate,
    /// Once the app is gone or `outbound_drain_wait` has passed: the app
    /// may still be calling out while it finishes (outbound capture
    /// listeners, and listeners set `traffic_direction: outbound`).
    AfterApp,
}

/// What a listener serves.
#[derive(Debug)]
pub enum ListenerProtocol {
    /// HTTP routed by a route table.
    Http(HttpListener),
    /// Raw TCP to one cluster.
    Tcp(TcpRoute),
    /// Traffic redirected by iptables, routed by original destination.
    Capture(capture::CaptureListener),
    /// Several filter chains, one picked per connection.
    Chains(ChainsListener),
}

/// A listener whose filter chains differ: each connection is served by the
/// chain its facts (port, SNI, TLS, ALPN) select.
#[derive(Debug)]
pub struct ChainsListener {
    /// Picks a chain by Envoy's order; indexes `chains`.
    pub table: crate::listener::chain_match::ChainTable,
    /// The chains that match by criteria, then the default one (if any),
    /// each an HTTP or TCP listener with its own TLS and the outer
    /// listener's name and address.
    pub chains: Vec<Arc<Listener>>,
    /// Their names, as `chains`.
    pub names: Vec<Arc<str>>,
    /// Their criteria, as `chains` (the default's is empty).
    pub matches: Vec<crate::listener::chain_match::ChainMatch>,
    /// The index in `chains` of the default chain.
    pub default: Option<usize>,
    /// Whether a connection's first bytes must be read (a ClientHello's SNI
    /// and ALPN, or plaintext) before a chain can be picked.
    pub inspect: bool,
}

/// HTTP connection manager settings.
#[derive(Debug)]
pub struct HttpListener {
    /// Trust the client's `x-forwarded-proto` and `x-request-id`.
    pub trust_downstream: bool,
    /// Path normalisation before routing and policies.
    pub normalize: crate::route::normalize::PathNormalization,
    /// Access control, when configured.
    pub rbac: Option<Arc<crate::authz::Rbac>>,
    /// Local rate limit on every request, when configured.
    pub rate_limit: Option<Arc<crate::ratelimit::LocalRateLimit>>,
    /// JWT authentication, when configured.
    pub jwt: Option<Arc<crate::authn::JwtAuthn>>,
    /// Global rate limits through a rate-limit service, when configured.
    pub global_rate_limit: Option<Arc<crate::ratelimit::global::GlobalRateLimit>>,
    /// Virtual hosts and routes.
    pub routes: Arc<RouteTable>,
}

impl HttpListener {
    /// Whether any policy looks at requests (RBAC, rate limit, JWT): then
    /// HTTP must be seen as HTTP, not carried as TCP.
    pub fn has_request_policy(&self) -> bool {
        self.rbac.is_some()
            || self.rate_limit.is_some()
            || self.jwt.is_some()
            || self.routes.has_rbac_overrides()
    }
}

impl Config {
    /// Parses, validates and compiles a YAML config.
    pub fn from_yaml(text: &str) -> Result<Config, ConfigError> {
        let file = parse_yaml(text)?;
        Config::from_file_model(file)
    }

    /// Reads, parses, validates and compiles a YAML config file.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Config::from_yaml(&text)
    }

    /// Reads the bootstrap: the config file if given, with `overrides`
    /// (from flags and environment) on top, validated as one.
    pub fn from_bootstrap(
        path: Option<&Path>,
        overrides: &BootstrapOverrides,
    ) -> Result<Config, ConfigError> {
        let mut file = match path {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.display().to_string(),
                    source,
                })?;
                parse_yaml(&text)?
            }
            None => parse_yaml("{}")?,
        };
        overrides.apply(&mut file);
        if path.is_none() && file.xds.is_none() {
            return Err(ConfigError::Invalid(vec![FieldError {
                path: "config".into(),
                reason: "give a config file (--config) or a control plane (--xds-address)".into(),
            }]));
        }
        Config::from_file_model(file)
    }

    /// Validates and compiles an already parsed config file.
    pub fn from_file_model(file: ConfigFile) -> Result<Config, ConfigError> {
        validate::build(file)
    }

    /// Validates and compiles config assembled from xDS resources: routes
    /// may name clusters not (yet) present and clusters may be empty.
    pub fn from_dynamic_model(file: ConfigFile) -> Result<Config, ConfigError> {
        validate::build_dynamic(file)
    }

    /// The running config as JSON, for `/config_dump`.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(&*self.source).unwrap_or(serde_json::Value::Null)
    }
}

fn parse_yaml(text: &str) -> Result<ConfigFile, ConfigError> {
    let deserializer = serde_yaml_ng::Deserializer::from_str(text);
    serde_path_to_error::deserialize(deserializer).map_err(|err| {
        let path = err.path().to_string();
        let path = if path == "." || path.is_empty() {
            "config".to_string()
        } else {
            path
        };
        let message = err.into_inner().to_string();
        // The YAML library puts its own (shorter) path in front; ours is exact.
        let reason = match message.split_once(": ") {
            Some((head, rest)) if path.starts_with(head) => rest.to_string(),
            _ => message,
        };
        ConfigError::Parse(FieldError { path, reason })
    })
}

#[cfg(test)]
mod tests;

//! The ADS client for Postern: one aggregated xDS stream (Envoy v3) to a
//! control plane, in state-of-the-world or delta form.
//!
//! The client owns the stream lifecycle (connect, subscribe, reconnect with
//! jittered exponential back-off), the subscriptions, versions and nonces,
//! and ACK/NACK. It is generic over resource types: it hands each response
//! to a [`Handler`] as [`Any`] bodies and NACKs whatever the handler
//! rejects. It decodes no resource (beyond reading a resource's name, see
//! [`Resource`]) and knows nothing of routing.
//!
//! ```no_run
//! # use std::sync::Arc;
//! # use postern_xds::*;
//! # use postern_proto::{envoy::config::core::v3::Node, type_url};
//! # struct Config;
//! # impl Handler for Config {
//! #     fn on_update(&self, _: &str, _: Update) -> Result<(), Vec<ResourceError>> { Ok(()) }
//! # }
//! # async fn run() {
//! let node = Node { id: "sidecar~10.0.0.1~web-1.default~default.svc.cluster.local".into(), ..Node::default() };
//! let client = XdsClient::new(ClientConfig::new("http://127.0.0.1:15010", node), Arc::new(Config));
//! client.subscriptions().set(type_url::LISTENER, vec![]); // all listeners
//! client.subscriptions().set(type_url::CLUSTER, vec![]); // all clusters
//! client.run().await;
//! # }
//! ```

use std::fmt;
use std::time::Duration;

pub use postern_proto::envoy::config::core::v3::Node;
pub use postern_proto::google::protobuf::Any;

mod backoff;
mod client;
mod delta;
mod resource;
mod sotw;
mod state;

pub use client::XdsClient;
pub use delta::delta_resources;
pub use resource::sotw_resources;
pub use state::{StatusHandle, Subscriptions, TypeStatus};

/// One xDS resource as the control plane sent it.
#[derive(Debug, Clone, PartialEq)]
pub struct Resource {
    /// The resource's name. In state of the world it is read from field 1 of
    /// the body, which holds the name in every Envoy v3 resource type
    /// (`Listener.name`, `ClusterLoadAssignment.cluster_name`, ...); in delta
    /// it is the name the server gave.
    pub name: String,
    /// The resource's version: its own in delta, the response's
    /// `version_info` in state of the world.
    pub version: String,
    /// The encoded resource; its `type_url` matches the update's.
    pub body: Any,
}

/// One response of the control plane for a resource type.
#[derive(Debug, Clone, PartialEq)]
pub enum Update {
    /// State of the world: the complete set for this type (LDS/CDS: all
    /// resources; RDS/EDS/SDS: the subscribed names the server has).
    State {
        /// The response's version.
        version_info: String,
        /// Every resource of the response, in the server's order.
        resources: Vec<Resource>,
    },
    /// Incremental: only what changed.
    Delta {
        /// The response's version, for information only.
        system_version_info: String,
        /// Resources added or changed.
        added: Vec<Resource>,
        /// Names of resources removed.
        removed: Vec<String>,
    },
}

/// Why the handler rejected one resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceError {
    /// The rejected resource's name.
    pub name: String,
    /// Why it was rejected; goes into the NACK's `error_detail`.
    pub reason: String,
}

/// Receives the updates of the control plane.
///
/// The client calls it from its stream task, one update at a time and never
/// while holding a lock, so the handler may call
/// [`Subscriptions::set`] (e.g. LDS naming RDS routes). It should not block
/// for long: the stream waits for it.
pub trait Handler: Send + Sync + 'static {
    /// Applies an update for `type_url`. Err means nothing of it was applied:
    /// the client NACKs with an error_detail naming each resource and reason,
    /// and keeps the last accepted version.
    fn on_update(&self, type_url: &str, update: Update) -> Result<(), Vec<ResourceError>>;

    /// Connection state changes (default: nothing): `true` once the stream is
    /// open, `false` when it ends.
    fn on_connection(&self, _connected: bool) {}
}

/// Which form of the ADS protocol to speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Protocol {
    /// `StreamAggregatedResources`: every response holds the full set of a type.
    #[default]
    StateOfTheWorld,
    /// `DeltaAggregatedResources`: responses hold what changed.
    Delta,
}

/// TLS to the control plane (`https://` addresses).
#[derive(Clone, Default)]
pub struct TlsSettings {
    /// PEM roots the control plane's certificate must chain to.
    pub ca_pem: Vec<u8>,
    /// Client certificate chain PEM and private key PEM, for mTLS.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
    /// Name to check the server certificate against; the address's host
    /// when absent.
    pub domain: Option<String>,
}

// Hand-written so a private key never reaches a log line.
impl fmt::Debug for TlsSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsSettings")
            .field("ca_pem", &format_args!("{} bytes", self.ca_pem.len()))
            .field("identity", &self.identity.as_ref().map(|_| "<redacted>"))
            .field("domain", &self.domain)
            .finish()
    }
}

/// How to reach the control plane and who we are.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// `http://host:port` or `https://host:port` (the latter needs `tls`).
    pub address: String,
    /// Sent on the first request of each type on each stream.
    pub node: Node,
    /// State of the world (default) or delta.
    pub protocol: Protocol,
    /// TLS settings; required for, and only allowed with, `https://`.
    pub tls: Option<TlsSettings>,
    /// First delay before reconnecting (default 500ms); doubles per failed
    /// attempt, with jitter.
    pub initial_backoff: Duration,
    /// Longest delay before reconnecting (default 30s).
    pub max_backoff: Duration,
    /// Time allowed to establish the connection (default 5s).
    pub connect_timeout: Duration,
}

impl ClientConfig {
    /// Settings for `address` with the defaults: state of the world, no TLS,
    /// back-off from 500ms to 30s, 5s connect timeout.
    pub fn new(address: impl Into<String>, node: Node) -> ClientConfig {
        ClientConfig {
            address: address.into(),
            node,
            protocol: Protocol::StateOfTheWorld,
            tls: None,
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
        }
    }

    /// Checks the address and TLS settings, as [`XdsClient::run`] would.
    ///
    /// # Errors
    ///
    /// An unparsable address, `https://` without TLS settings (or TLS
    /// settings without `https://`), or unusable TLS material.
    pub fn validate(&self) -> Result<(), XdsError> {
        client::endpoint(self).map(|_| ())
    }
}

/// Why the client could not reach or keep the control plane.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum XdsError {
    /// The address is not a valid URI.
    #[error("invalid control plane address {address:?}")]
    Address {
        /// The configured address.
        address: String,
        /// What the parser said.
        #[source]
        source: tonic::transport::Error,
    },
    /// `https://` needs TLS settings.
    #[error("control plane address {0} is https:// but no TLS settings are given")]
    HttpsWithoutTls(String),
    /// TLS settings need an `https://` address.
    #[error("TLS settings are given but control plane address {0} is not https://")]
    TlsWithoutHttps(String),
    /// The TLS settings were refused.
    #[error("invalid TLS settings for the control plane")]
    Tls(#[source] tonic::transport::Error),
    /// The connection failed.
    #[error("cannot connect to the control plane at {address}")]
    Connect {
        /// The configured address.
        address: String,
        /// The transport error.
        #[source]
        source: tonic::transport::Error,
    },
    /// The control plane refused the stream, or it failed midway.
    #[error("ADS stream failed")]
    Stream(#[source] Box<tonic::Status>),
    /// The control plane ended the stream.
    #[error("the control plane closed the ADS stream")]
    Closed,
}

/// Metric names of the ADS client.
pub mod metric {
    /// Gauge: 1 while the ADS stream is open, else 0.
    pub const XDS_CONNECTED: &str = "postern_xds_connected";
    /// Counter: responses handled, by `type` (`listener`, `route`,
    /// `cluster`, `endpoint`, `secret`, `other`) and `result` (`ack`, `nack`).
    pub const XDS_UPDATES_TOTAL: &str = "postern_xds_updates_total";
    /// Counter: attempts to open a new stream after the first.
    pub const XDS_RECONNECTS_TOTAL: &str = "postern_xds_reconnects_total";

    /// Registers descriptions with the installed recorder.
    pub fn describe() {
        metrics::describe_gauge!(XDS_CONNECTED, "1 while the ADS stream is open, else 0");
        metrics::describe_counter!(
            XDS_UPDATES_TOTAL,
            "xDS responses handled, by resource type and result (ack or nack)"
        );
        metrics::describe_counter!(
            XDS_RECONNECTS_TOTAL,
            "Attempts to open a new ADS stream after the first"
        );
    }
}

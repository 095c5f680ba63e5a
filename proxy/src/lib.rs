//! Postern: a service-mesh sidecar proxy and API gateway.
//!
//! The data plane: config model and its sources, listeners, HTTP and TCP
//! proxying, clusters and load balancing, the admin server and telemetry.
//! See `ARCHITECTURE.md` for how the parts fit.

pub mod admin;
pub mod app;
pub mod authn;
pub mod authz;
pub mod cluster;
pub mod config;
pub mod demo;
pub mod http;
pub mod listener;
pub mod overload;
pub mod ratelimit;
pub mod route;
pub mod sidecar;
pub mod tcp;
pub mod telemetry;
pub mod tls;
pub mod xds;

/// A hash map for lookups on the request path. Its keys come from config or
/// are bounded (metric label sets), so foldhash's per-process seed is
/// protection enough, and it hashes several times faster than SipHash.
pub type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

pub use app::Proxy;
pub use config::{Config, ConfigError};

//! The reference control plane for Postern, for development, demos and
//! tests.
//!
//! - [`ads`]: an ADS server (SotW and delta) serving one snapshot of Envoy
//!   v3 resources to every node, logging every ACK and NACK.
//! - [`mesh`]: the YAML mesh description, its translation to Envoy
//!   resources, and a watcher that serves each new revision of the file.
//! - [`ca`]: a CA that signs workload CSRs over the Istio CA gRPC API.
//! - [`als`]: an access-log service that receives the proxies' per-call
//!   entries and keeps a per-route summary.
//! - [`rls`]: a rate-limit service with in-memory fixed-window counters,
//!   for global rate limits in tests and demos.
//! - [`app`]: the `postern-control serve` wiring of them all on one gRPC
//!   server.
//!
//! It knows nothing of the data plane: it only speaks the APIs the proxy
//! consumes, so Envoy can be pointed at it too.

pub mod ads;
pub mod als;
pub mod app;
pub mod ca;
pub mod mesh;
pub mod rls;

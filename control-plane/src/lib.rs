//! The reference control plane for Postern.
//!
//! Today it is a CA ([`ca`]) that signs workload CSRs over the Istio CA gRPC
//! API. It will also serve ADS from a YAML mesh description (see the xDS
//! issue). It knows nothing of the data plane: it only speaks the APIs the
//! proxy consumes.

pub mod ca;

//! Running Postern as a Kubernetes sidecar: the helpers around the proxy.
//!
//! - [`iptables`]: the init container's traffic capture rules.
//! - [`inject`]: adds the sidecar and the capture init container to
//!   workload manifests, from the command line or as an admission webhook
//!   ([`webhook`]).
//! - [`wait_ready`]: blocks until a proxy's admin server reports ready.
//! - [`app_probe`]: the status port that runs the app's rewritten kubelet
//!   probes against it.
//!
//! None of this is on the proxy's data path; the proxy itself does not
//! depend on this module (the binary starts the status server beside it).

pub mod app_probe;
pub mod inject;
pub mod iptables;
pub mod wait_ready;
pub mod webhook;

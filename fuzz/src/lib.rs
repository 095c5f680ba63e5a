//! Shared set-up for the fuzz targets: the listeners the HTTP front-end
//! target serves its inputs on, the xDS pipeline from a `DiscoveryResponse`
//! or a `DeltaDiscoveryResponse` to a validated config, and the certificates
//! the x509 and CSR targets check against.
//!
//! Everything here calls the proxy's own entry points; the only glue is what
//! a running proxy gets from its sockets and its `XdsHandler` state.

#![forbid(unsafe_code)]

pub mod front;
pub mod pki;
pub mod xds;

/// The example gateway config: the richest route table in the repository.
pub const GATEWAY_YAML: &str = include_str!("../../deploy/examples/gateway.yaml");

/// The strict listener of `fixtures/front.yaml`.
pub const FRONT_YAML: &str = include_str!("../fixtures/front.yaml");

/// Whether `POSTERN_FUZZ_DEBUG` asks the targets to print what they did
/// with each input, to check that seeds reach what they are meant to.
pub fn debug() -> bool {
    static DEBUG: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *DEBUG.get_or_init(|| std::env::var_os("POSTERN_FUZZ_DEBUG").is_some())
}

/// A compiled config whose clusters have no endpoints, so nothing a target
/// does can open a connection.
///
/// # Panics
///
/// If `yaml` does not validate: the fixtures are part of the harness.
pub fn offline_config(yaml: &str) -> postern::Config {
    let mut file: postern::config::file::ConfigFile =
        serde_yaml_ng::from_str(yaml).expect("fixture parses");
    for cluster in &mut file.clusters {
        cluster.endpoints.clear();
    }
    postern::Config::from_dynamic_model(file).expect("fixture validates")
}

//! Protobuf types for Postern.
//!
//! Re-exports the Envoy v3 API from `envoy-types` ([`envoy`], [`google`],
//! [`xds`]: xDS, SDS, RLS, ALS and the rest, with their gRPC clients and
//! servers) and holds the code generated from Postern's own protos: today
//! the Istio CA API ([`istio::v1::auth`]), which the control plane serves and
//! the proxy calls to get its workload certificate. This crate holds no
//! logic.

pub use envoy_types::pb::{envoy, google, xds};

/// Type URLs of the xDS resources Postern serves and consumes.
pub mod type_url {
    /// Listener (LDS).
    pub const LISTENER: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
    /// RouteConfiguration (RDS).
    pub const ROUTE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
    /// Cluster (CDS).
    pub const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
    /// ClusterLoadAssignment (EDS).
    pub const ENDPOINT: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
    /// Secret (SDS).
    pub const SECRET: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";
}

/// The Istio API packages (`istio.*`).
pub mod istio {
    /// Version 1 of the Istio API.
    pub mod v1 {
        /// The Istio CA API (`istio.v1.auth`): a workload sends a PEM CSR and
        /// gets back a PEM chain, leaf first and root last.
        ///
        /// Mount a server with
        /// `istio_certificate_service_server::IstioCertificateServiceServer::new(svc)`;
        /// call it with
        /// `istio_certificate_service_client::IstioCertificateServiceClient`.
        // Generated code carries no docs for its helper items and declares
        // `pub` items inside private-looking modules; neither is ours to fix.
        #[allow(missing_docs, unreachable_pub, clippy::all)]
        pub mod auth {
            tonic::include_proto!("istio.v1.auth");
        }
    }
}

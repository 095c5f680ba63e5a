//! Protobuf types for Postern.
//!
//! Holds the code generated from Postern's own protos: today the Istio CA API
//! ([`istio::v1::auth`]), which the control plane serves and the proxy calls
//! to get its workload certificate. The Envoy v3 API (from `envoy-types`)
//! will be re-exported here once the xDS issue lands. This crate holds no
//! logic.

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

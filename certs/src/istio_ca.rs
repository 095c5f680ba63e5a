//! A certificate source that asks a CA speaking Istio's
//! `IstioCertificateService/CreateCertificate` API (istiod, or Postern's
//! reference control plane): a fresh key per certificate, a CSR with the
//! SPIFFE ID, a bearer token for who we are.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use postern_proto::istio::v1::auth::istio_certificate_service_client::IstioCertificateServiceClient;
use postern_proto::istio::v1::auth::IstioCertificateRequest;
use tonic::metadata::MetadataValue;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use crate::identity::Identity;
use crate::key::WorkloadKey;
use crate::source::{BoxFuture, CertSource, IssueRequest, SourceError};
use crate::verify::TrustBundle;
use crate::x509::parse_pem_chain;

/// Settings of an Istio-compatible CA.
#[derive(Debug, Clone)]
pub struct IstioCaSettings {
    /// `http://host:port` or `https://host:port`.
    pub address: String,
    /// PEM root of the CA's own TLS certificate (`https://` only).
    pub ca_cert_pem: Option<Vec<u8>>,
    /// File with the bearer token, read before every request.
    pub token_file: Option<PathBuf>,
    /// Roots mesh peers must chain to; the root the CA returns when absent.
    pub trust_bundle: Option<Arc<TrustBundle>>,
    /// `ClusterID` metadata for istiod.
    pub cluster_id: Option<String>,
    /// Time allowed per request.
    pub timeout: Duration,
}

/// Signs fresh keys at an Istio-compatible CA.
#[derive(Debug)]
pub struct IstioCaSource {
    client: IstioCertificateServiceClient<Channel>,
    settings: IstioCaSettings,
}

impl IstioCaSource {
    /// A source for `settings`; connects lazily, on the first request.
    pub fn new(settings: IstioCaSettings) -> Result<IstioCaSource, SourceError> {
        let mut endpoint = Endpoint::from_shared(settings.address.clone())
            .map_err(|e| SourceError::Ca(format!("address {}: {e}", settings.address)))?
            .connect_timeout(settings.timeout)
            .timeout(settings.timeout);
        if settings.address.starts_with("https://") {
            let mut tls = ClientTlsConfig::new();
            if let Some(pem) = &settings.ca_cert_pem {
                tls = tls.ca_certificate(Certificate::from_pem(pem));
            }
            endpoint = endpoint
                .tls_config(tls)
                .map_err(|e| SourceError::Ca(format!("tls settings: {e}")))?;
        }
        Ok(IstioCaSource {
            client: IstioCertificateServiceClient::new(endpoint.connect_lazy()),
            settings,
        })
    }

    async fn request(&self, request: &IssueRequest) -> Result<Identity, SourceError> {
        let key = WorkloadKey::generate(request.key_algorithm)?;
        let csr = key.csr_pem(&request.id)?;
        let mut call = tonic::Request::new(IstioCertificateRequest {
            csr,
            validity_duration: i64::try_from(request.lifetime.as_secs()).unwrap_or(i64::MAX),
            metadata: None,
        });
        if let Some(path) = &self.settings.token_file {
            let token =
                tokio::fs::read_to_string(path)
                    .await
                    .map_err(|source| SourceError::Read {
                        path: path.clone(),
                        source,
                    })?;
            let value =
                MetadataValue::try_from(format!("Bearer {}", token.trim())).map_err(|_| {
                    SourceError::Ca("token holds characters not allowed in a header".into())
                })?;
            call.metadata_mut().insert("authorization", value);
        }
        if let Some(cluster) = &self.settings.cluster_id {
            if let Ok(value) = MetadataValue::try_from(cluster.as_str()) {
                call.metadata_mut().insert("clusterid", value);
            }
        }
        let response = self
            .client
            .clone()
            .create_certificate(call)
            .await
            .map_err(|status| {
                SourceError::Ca(format!("{:?}: {}", status.code(), status.message()))
            })?
            .into_inner();
        let pem = response.cert_chain.concat();
        let mut chain = parse_pem_chain(pem.as_bytes(), "CA response")?;
        let bundle = match &self.settings.trust_bundle {
            Some(bundle) => bundle.clone(),
            None => {
                if chain.len() < 2 {
                    return Err(SourceError::Ca(
                        "the CA returned no root and no trust_bundle is configured".into(),
                    ));
                }
                // The last certificate of the chain is the CA's root: trust it,
                // and do not send it to peers, who hold it already.
                let root = chain
                    .pop()
                    .ok_or(crate::x509::CertError::Empty("CA response"))?;
                Arc::new(TrustBundle::from_der(vec![root])?)
            }
        };
        Ok(Identity::new(
            chain,
            key.private_key_der(),
            bundle,
            "istio_ca",
        )?)
    }
}

impl CertSource for IstioCaSource {
    fn name(&self) -> &'static str {
        "istio_ca"
    }

    fn fetch<'a>(
        &'a self,
        request: &'a IssueRequest,
    ) -> BoxFuture<'a, Result<Identity, SourceError>> {
        Box::pin(self.request(request))
    }
}

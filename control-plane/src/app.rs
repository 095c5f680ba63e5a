//! `postern-control serve`: ADS from a watched mesh file, the access-log
//! service and, optionally, the CA, on one plaintext gRPC server.
//!
//! [`run`] is the whole command after flag parsing; [`serve`] is the server
//! alone, for tests that want the control plane in-process.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use postern_certs::SpiffeId;
use serde::Deserialize;
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;

use crate::ads::AdsServer;
use crate::als::AlsServer;
use crate::ca::{Authenticator, Ca, CaService};
use crate::mesh::{load_mesh, watch_mesh, MeshError};
use crate::rls::{RateLimitServer, RateLimitsFile};

/// Settings of `postern-control serve`.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// The YAML mesh description to serve over ADS.
    pub mesh: PathBuf,
    /// Where to listen for gRPC (ADS, ALS and the CA).
    pub listen: SocketAddr,
    /// How often to check the mesh file for changes.
    pub poll: Duration,
    /// The CA to run, if any.
    pub ca: Option<CaOptions>,
    /// How often to print the access-log summary to stdout; zero: never.
    pub als_summary_interval: Duration,
    /// Serve the rate-limit service with the limits of this file.
    pub rate_limits: Option<PathBuf>,
}

/// Settings of the optional CA.
#[derive(Debug, Clone)]
pub struct CaOptions {
    /// The trust domain it signs for, e.g. `cluster.local`.
    pub trust_domain: String,
    /// YAML list of `{ token, spiffe_id }`: which bearer token entitles its
    /// holder to which identity.
    pub tokens: PathBuf,
    /// Where to write the (freshly generated) root certificate in PEM, so
    /// workloads can be given it as their trust anchor.
    pub root_out: Option<PathBuf>,
}

/// One entry of the CA tokens file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenEntry {
    token: String,
    spiffe_id: String,
}

/// Reads a CA tokens file: a YAML list of `{ token, spiffe_id }`.
///
/// # Errors
///
/// If the file cannot be read, is not such a list (the error names the
/// field path), holds an invalid SPIFFE ID, or an empty or repeated token.
pub fn load_tokens(path: &Path) -> anyhow::Result<Authenticator> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("could not read ca tokens file {}", path.display()))?;
    let entries: Vec<TokenEntry> = serde_path_to_error::deserialize(
        serde_yaml_ng::Deserializer::from_str(&text),
    )
    .map_err(|err| {
        let field = err.path().to_string();
        anyhow::Error::new(err.into_inner()).context(format!(
            "invalid ca tokens file {} at `{field}`; expected a list of {{ token, spiffe_id }}",
            path.display()
        ))
    })?;
    let mut pairs = Vec::with_capacity(entries.len());
    for (i, entry) in entries.into_iter().enumerate() {
        let id = SpiffeId::parse(&entry.spiffe_id).with_context(|| {
            format!(
                "invalid ca tokens file {} at `[{i}].spiffe_id`",
                path.display()
            )
        })?;
        pairs.push((entry.token, id));
    }
    Authenticator::new(pairs).with_context(|| format!("invalid ca tokens file {}", path.display()))
}

/// The optional services served next to ADS.
#[derive(Debug, Default)]
pub struct ExtraServices {
    /// The access-log service.
    pub als: Option<AlsServer>,
    /// The CA.
    pub ca: Option<CaService>,
    /// The rate-limit service.
    pub rls: Option<RateLimitServer>,
}

/// Serves `ads` and, if given, `als` and `ca` as plaintext gRPC on
/// `listener` until `shutdown` completes, then ends the ADS and ALS streams
/// ([`AdsServer::close_streams`], [`AlsServer::close_streams`]), drains
/// open calls and returns.
///
/// # Errors
///
/// If the gRPC server fails.
pub async fn serve(
    listener: TcpListener,
    ads: AdsServer,
    als: Option<AlsServer>,
    ca: Option<CaService>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    serve_with(
        listener,
        ads,
        ExtraServices { als, ca, rls: None },
        shutdown,
    )
    .await
}

/// [`serve`] with every optional service, the rate-limit service included.
///
/// # Errors
///
/// If the gRPC server fails.
pub async fn serve_with(
    listener: TcpListener,
    ads: AdsServer,
    extra: ExtraServices,
    shutdown: impl Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    let ExtraServices { als, ca, rls } = extra;
    let closer = ads.clone();
    let als_closer = als.clone();
    let shutdown = async move {
        shutdown.await;
        closer.close_streams();
        if let Some(als) = als_closer {
            als.close_streams();
        }
    };
    tonic::transport::Server::builder()
        .add_service(ads.into_service())
        .add_optional_service(als.map(AlsServer::into_service))
        .add_optional_service(ca.map(CaService::into_server))
        .add_optional_service(rls.map(RateLimitServer::into_service))
        .serve_with_incoming_shutdown(TcpIncoming::from(listener), shutdown)
        .await
}

/// Runs `postern-control serve`: loads the mesh file (failing fast if it is
/// invalid), sets up the CA if asked, binds, then serves until `shutdown`
/// completes while [`watch_mesh`] serves each new revision of the file and,
/// unless the interval is zero, the access-log summary is printed.
///
/// # Errors
///
/// If the mesh or tokens file is invalid at startup, the CA cannot be built,
/// its root cannot be written, the address cannot be bound, or the server
/// fails.
pub async fn run(options: ServeOptions, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let snapshot = load_mesh(&options.mesh).map_err(|err| match err {
        // Already names the file.
        MeshError::Read { .. } => anyhow::Error::new(err),
        _ => anyhow::Error::new(err).context(format!("mesh file {}", options.mesh.display())),
    })?;
    tracing::info!(
        path = %options.mesh.display(),
        version = %snapshot.version,
        "loaded mesh file"
    );
    let ads = AdsServer::new();
    ads.set_snapshot(snapshot);

    let ca = match &options.ca {
        Some(ca) => Some(ca_service(ca)?),
        None => None,
    };
    let rls = match &options.rate_limits {
        Some(path) => {
            let limits = RateLimitsFile::load(path)?;
            tracing::info!(path = %path.display(), domains = limits.domains.len(), "rate limit service enabled");
            Some(RateLimitServer::new(limits))
        }
        None => None,
    };

    let listener = TcpListener::bind(options.listen)
        .await
        .with_context(|| format!("could not listen on {}", options.listen))?;
    let addr = listener
        .local_addr()
        .context("could not read the bound address")?;
    tracing::info!(%addr, ca = ca.is_some(), rls = rls.is_some(), "control plane serving ads and als");

    let als = AlsServer::new();
    let printer = (!options.als_summary_interval.is_zero())
        .then(|| tokio::spawn(als.clone().print_summaries(options.als_summary_interval)));
    let watcher = tokio::spawn(watch_mesh(options.mesh.clone(), ads.clone(), options.poll));
    let extra = ExtraServices {
        als: Some(als),
        ca,
        rls,
    };
    let served = serve_with(listener, ads, extra, shutdown).await;
    watcher.abort();
    if let Some(printer) = printer {
        printer.abort();
    }
    served.context("grpc server failed")?;
    tracing::info!("control plane stopped");
    Ok(())
}

fn ca_service(options: &CaOptions) -> anyhow::Result<CaService> {
    let authenticator = load_tokens(&options.tokens)?;
    let ca = Ca::self_signed(&options.trust_domain).context("could not create the ca")?;
    if let Some(path) = &options.root_out {
        std::fs::write(path, ca.root_pem())
            .with_context(|| format!("could not write the ca root to {}", path.display()))?;
        tracing::info!(path = %path.display(), "wrote ca root certificate");
    }
    tracing::info!(
        trust_domain = %options.trust_domain,
        tokens = %options.tokens.display(),
        "ca enabled"
    );
    Ok(CaService::new(ca, authenticator))
}

#[cfg(test)]
mod tests {
    use futures_util::StreamExt;
    use postern_proto::envoy::service::accesslog::v3::access_log_service_client::AccessLogServiceClient;
    use postern_proto::envoy::service::accesslog::v3::stream_access_logs_message::{
        Identifier, LogEntries, TcpAccessLogEntries,
    };
    use postern_proto::envoy::service::accesslog::v3::StreamAccessLogsMessage;
    use postern_proto::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
    use postern_proto::envoy::service::discovery::v3::DiscoveryRequest;
    use postern_proto::istio::v1::auth::istio_certificate_service_client::IstioCertificateServiceClient;
    use postern_proto::istio::v1::auth::IstioCertificateRequest;
    use postern_proto::type_url;
    use tokio::sync::oneshot;

    use super::*;
    use crate::mesh::parse_mesh;

    fn temp_file(name: &str, contents: &str) -> PathBuf {
        let path =
            std::env::temp_dir().join(format!("postern-control-app-{}-{name}", std::process::id()));
        std::fs::write(&path, contents).unwrap();
        path
    }

    #[test]
    fn tokens_file() {
        let path = temp_file(
            "tokens-ok.yaml",
            "- { token: t1, spiffe_id: spiffe://cluster.local/ns/a/sa/b }\n",
        );
        let auth = load_tokens(&path).unwrap();
        assert_eq!(
            auth.authenticate("t1").map(|id| id.as_str()),
            Some("spiffe://cluster.local/ns/a/sa/b")
        );

        let bad = temp_file("tokens-bad.yaml", "- { token: t1, spiffe: x }\n");
        let err = format!("{:#}", load_tokens(&bad).unwrap_err());
        assert!(err.contains("`[0].spiffe`"), "{err}");

        let bad_id = temp_file("tokens-bad-id.yaml", "- { token: t1, spiffe_id: nope }\n");
        let err = format!("{:#}", load_tokens(&bad_id).unwrap_err());
        assert!(err.contains("`[0].spiffe_id`"), "{err}");
        for path in [path, bad, bad_id] {
            std::fs::remove_file(path).unwrap();
        }
    }

    #[tokio::test]
    async fn ads_and_ca_share_one_server() {
        let ads = AdsServer::new();
        ads.set_snapshot(parse_mesh("services: [{ name: a }]", "v1").unwrap());
        let ca = CaService::new(
            Ca::self_signed("cluster.local").unwrap(),
            Authenticator::new(Vec::<(String, SpiffeId)>::new()).unwrap(),
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = oneshot::channel::<()>();
        let als = AlsServer::new();
        let mut als_events = als.events();
        let server = tokio::spawn(serve(listener, ads, Some(als), Some(ca), async {
            let _ = stopped.await;
        }));

        let mut client = AggregatedDiscoveryServiceClient::connect(url.clone())
            .await
            .unwrap();
        let request = DiscoveryRequest {
            type_url: type_url::CLUSTER.to_owned(),
            ..Default::default()
        };
        let mut responses = client
            // The request half stays open, as a real client's does.
            .stream_aggregated_resources(
                futures_util::stream::iter([request]).chain(futures_util::stream::pending()),
            )
            .await
            .unwrap()
            .into_inner();
        let response = responses.message().await.unwrap().unwrap();
        assert_eq!(response.version_info, "v1");
        assert_eq!(response.resources.len(), 1);

        // The CA answers on the same port (and refuses a caller without a
        // token).
        let mut ca_client = IstioCertificateServiceClient::connect(url.clone())
            .await
            .unwrap();
        let status = ca_client
            .create_certificate(IstioCertificateRequest::default())
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unauthenticated);

        // So does the access-log service, whose stream stays open.
        let mut als_client = AccessLogServiceClient::connect(url).await.unwrap();
        let message = StreamAccessLogsMessage {
            identifier: Some(Identifier::default()),
            log_entries: Some(LogEntries::TcpLogs(TcpAccessLogEntries {
                log_entry: vec![Default::default()],
            })),
        };
        let als_call = tokio::spawn(async move {
            als_client
                .stream_access_logs(
                    futures_util::stream::iter([message]).chain(futures_util::stream::pending()),
                )
                .await
        });
        assert_eq!(als_events.recv().await.unwrap().tcp().len(), 1);

        // Shutdown ends the open ADS and ALS streams rather than waiting
        // for them.
        stop.send(()).unwrap();
        server.await.unwrap().unwrap();
        let status = responses.message().await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unavailable);
        let status = als_call.await.unwrap().unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unavailable);
    }
}

//! The connection loop: connect, open the ADS stream, send subscriptions,
//! hand responses to the handler and answer with ACK/NACK, and reconnect
//! with back-off when the stream ends.

use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::{self, Stream};
use postern_proto::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use tokio::sync::mpsc;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Status, Streaming};
use tracing::{debug, error, info, warn};

use crate::backoff::Backoff;
use crate::resource::type_label;
use crate::state::{Shared, State, StatusHandle, Subscriptions};
use crate::{delta, metric, sotw, ClientConfig, Handler, Node, Protocol, XdsError};

/// Largest response accepted. gRPC's 4 MiB default is too small for the
/// CDS or EDS of a large mesh, and the control plane is trusted anyway.
const MAX_DECODING_MESSAGE_BYTES: usize = 256 * 1024 * 1024;

/// How often to ping an idle connection, so a control plane that vanished
/// without closing is noticed and left for another.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// An ADS client: one stream to one control plane.
///
/// Subscribe with [`subscriptions`](Self::subscriptions) (before or after
/// [`run`](Self::run) starts), then drive it with `run`.
pub struct XdsClient {
    config: ClientConfig,
    handler: Arc<dyn Handler>,
    shared: Arc<Shared>,
}

impl fmt::Debug for XdsClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("XdsClient")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl XdsClient {
    /// A client for `config` that hands updates to `handler`. Connects
    /// nothing until [`run`](Self::run).
    pub fn new(config: ClientConfig, handler: Arc<dyn Handler>) -> XdsClient {
        XdsClient {
            config,
            handler,
            shared: Arc::default(),
        }
    }

    /// A cloneable handle to change subscriptions at any time (also from
    /// inside [`Handler::on_update`]: it never blocks on the stream).
    pub fn subscriptions(&self) -> Subscriptions {
        Subscriptions {
            shared: self.shared.clone(),
        }
    }

    /// Per-type status for `/config_dump`.
    pub fn status(&self) -> StatusHandle {
        StatusHandle {
            shared: self.shared.clone(),
        }
    }

    /// Runs until the future is dropped: connect, subscribe, receive,
    /// ACK/NACK, reconnect with jittered exponential back-off (reset after a
    /// stream that received a response).
    ///
    /// An invalid config (see [`ClientConfig::validate`]) is logged as an
    /// error and the future then waits forever, since no retry can fix it.
    pub async fn run(self) {
        let endpoint = match endpoint(&self.config) {
            Ok(endpoint) => endpoint,
            Err(e) => {
                error!(error = %ErrorChain(&e), "the xDS client cannot start");
                return std::future::pending().await;
            }
        };
        // Present (at 0) from the start, so a proxy that never reached its
        // control plane shows it.
        metrics::gauge!(metric::XDS_CONNECTED).set(0.0);
        let mut backoff = Backoff::new(self.config.initial_backoff, self.config.max_backoff);
        let mut first = true;
        loop {
            if !first {
                metrics::counter!(metric::XDS_RECONNECTS_TOTAL).increment(1);
            }
            first = false;
            let mut connection = Connection {
                handler: &*self.handler,
                open: false,
                received: false,
            };
            let result = self.attempt(&endpoint, &mut connection).await;
            let received = connection.received;
            drop(connection);
            if received {
                backoff.reset();
            }
            let delay = backoff.next_delay(&mut rand::rng());
            match result {
                Ok(()) | Err(XdsError::Closed) => {
                    info!(address = %self.config.address, ?delay, "the control plane closed the ADS stream; reconnecting")
                }
                Err(e) => {
                    warn!(address = %self.config.address, ?delay, error = %ErrorChain(&e), "ADS stream failed; reconnecting")
                }
            }
            tokio::time::sleep(delay).await;
        }
    }

    async fn attempt(
        &self,
        endpoint: &Endpoint,
        connection: &mut Connection<'_>,
    ) -> Result<(), XdsError> {
        let channel = endpoint
            .connect()
            .await
            .map_err(|source| XdsError::Connect {
                address: self.config.address.clone(),
                source,
            })?;
        let mut client = AggregatedDiscoveryServiceClient::new(channel)
            .max_decoding_message_size(MAX_DECODING_MESSAGE_BYTES);
        let session = Session {
            shared: &self.shared,
            handler: &*self.handler,
            node: &self.config.node,
        };
        match self.config.protocol {
            Protocol::StateOfTheWorld => {
                drive::<sotw::Sotw>(&session, connection, &mut client).await
            }
            Protocol::Delta => drive::<delta::Delta>(&session, connection, &mut client).await,
        }
    }
}

/// What a stream needs to handle responses.
pub(crate) struct Session<'a> {
    pub(crate) shared: &'a Shared,
    pub(crate) handler: &'a dyn Handler,
    pub(crate) node: &'a Node,
}

/// The life of one stream, as the handler and metrics see it. Dropping it
/// (stream ended, or `run` dropped) reports the disconnection.
struct Connection<'a> {
    handler: &'a dyn Handler,
    open: bool,
    received: bool,
}

impl Connection<'_> {
    fn opened(&mut self) {
        self.open = true;
        metrics::gauge!(metric::XDS_CONNECTED).set(1.0);
        info!("ADS stream open");
        self.handler.on_connection(true);
    }
}

impl Drop for Connection<'_> {
    fn drop(&mut self) {
        if self.open {
            metrics::gauge!(metric::XDS_CONNECTED).set(0.0);
            self.handler.on_connection(false);
        }
    }
}

/// The client as the protocols use it.
pub(crate) type AdsClient = AggregatedDiscoveryServiceClient<Channel>;

/// What opening a stream returns.
pub(crate) type OpenFuture<'a, Resp> =
    Pin<Box<dyn Future<Output = Result<tonic::Response<Streaming<Resp>>, Status>> + Send + 'a>>;

/// What differs between state of the world and delta.
pub(crate) trait Flavor {
    type Request: Send + 'static;
    type Response: Send + 'static;

    /// Opens the stream with `requests` as its outbound half.
    fn open(
        client: &mut AdsClient,
        requests: RequestStream<Self::Request>,
    ) -> OpenFuture<'_, Self::Response>;

    /// Requests for every type whose interest the server does not know yet.
    fn subscriptions(state: &mut State, node: &Node) -> Vec<Self::Request>;

    /// Hands a response to the handler; returns the ACK or NACK.
    fn handle(session: &Session<'_>, response: Self::Response) -> Option<Self::Request>;
}

/// Runs one stream, for either protocol: queue the subscriptions, open the
/// stream, then answer each response and send each subscription change
/// until the stream ends.
async fn drive<F: Flavor>(
    session: &Session<'_>,
    connection: &mut Connection<'_>,
    client: &mut AdsClient,
) -> Result<(), XdsError> {
    let (tx, rx) = mpsc::unbounded_channel();
    {
        let mut state = session.shared.lock();
        state.reset_stream();
        // Queued before the call: some servers send response headers only
        // after the first request.
        for request in F::subscriptions(&mut state, session.node) {
            // The receiver lives in this function until `open` takes it.
            let _ = tx.send(request);
        }
    }
    let mut inbound = F::open(client, request_stream(rx))
        .await
        .map_err(|status| XdsError::Stream(Box::new(status)))?
        .into_inner();
    connection.opened();
    loop {
        let requests: Vec<F::Request> = tokio::select! {
            biased;
            message = inbound.message() => match message {
                Ok(Some(response)) => {
                    connection.received = true;
                    F::handle(session, response).into_iter().collect()
                }
                Ok(None) => return Err(XdsError::Closed),
                Err(status) => return Err(XdsError::Stream(Box::new(status))),
            },
            () = session.shared.changed.notified() => {
                let mut state = session.shared.lock();
                let requests = F::subscriptions(&mut state, session.node);
                drop(state);
                requests
            }
        };
        for request in requests {
            if tx.send(request).is_err() {
                // The transport dropped the request stream, so the call is
                // over; `inbound` tells why on the next turn.
                break;
            }
        }
    }
}

/// The outbound half of a stream.
pub(crate) type RequestStream<Req> = std::pin::Pin<Box<dyn Stream<Item = Req> + Send>>;

fn request_stream<Req: Send + 'static>(rx: mpsc::UnboundedReceiver<Req>) -> RequestStream<Req> {
    Box::pin(stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|request| (request, rx))
    }))
}

/// Logs and counts the outcome of a response.
pub(crate) fn log_result(type_url: &str, version: &str, error: Option<&str>) {
    let label = type_label(type_url);
    match error {
        None => {
            debug!(type_url, version, "ACK");
            metrics::counter!(metric::XDS_UPDATES_TOTAL, "type" => label, "result" => "ack")
                .increment(1);
        }
        Some(error) => {
            warn!(type_url, version, error, "NACK: update rejected");
            metrics::counter!(metric::XDS_UPDATES_TOTAL, "type" => label, "result" => "nack")
                .increment(1);
        }
    }
}

/// The endpoint for `config`, with its TLS settings checked.
pub(crate) fn endpoint(config: &ClientConfig) -> Result<Endpoint, XdsError> {
    let address = &config.address;
    let mut endpoint = Endpoint::from_shared(address.clone())
        .map_err(|source| XdsError::Address {
            address: address.clone(),
            source,
        })?
        .connect_timeout(config.connect_timeout)
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true);
    let https = endpoint.uri().scheme_str() == Some("https");
    match (&config.tls, https) {
        (Some(tls), true) => {
            let mut settings =
                ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&tls.ca_pem));
            if let Some((chain, key)) = &tls.identity {
                settings = settings.identity(Identity::from_pem(chain, key));
            }
            if let Some(domain) = &tls.domain {
                settings = settings.domain_name(domain.clone());
            }
            endpoint = endpoint.tls_config(settings).map_err(XdsError::Tls)?;
        }
        (None, true) => return Err(XdsError::HttpsWithoutTls(address.clone())),
        (Some(_), false) => return Err(XdsError::TlsWithoutHttps(address.clone())),
        (None, false) => {}
    }
    Ok(endpoint)
}

/// Shows an error with its causes, `a: b: c`, for one log field.
struct ErrorChain<'a>(&'a (dyn StdError + 'static));

impl fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(cause) = source {
            write!(f, ": {cause}")?;
            source = cause.source();
        }
        Ok(())
    }
}

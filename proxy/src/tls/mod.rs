//! TLS on both sides of the proxy. Downstream: mesh mTLS (strict or
//! permissive) with the workload identity, or edge termination with
//! certificates chosen by SNI. Upstream: mesh mTLS checked by SPIFFE ID, or
//! simple TLS checked by DNS name. Handshake failures are logged and counted
//! by a bounded reason.

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use postern_certs::tls::{failure_reason, mesh_client_config, mesh_server_config, provider};
use postern_certs::{IdentityHandle, SpiffeId};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::config::{EdgeTls, ListenerTls, UpstreamTlsConfig};

mod san;
use crate::telemetry::metrics as names;

/// First byte of a TLS record carrying a handshake.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// ALPN a sidecar offers, before `h2`, when it carries opaque TCP to
/// another sidecar: the receiving side then skips protocol detection, which
/// the sending side has already done (a server-first protocol would
/// otherwise wait out the detection timeout on both sides). A peer that
/// does not know it picks `h2` and sniffs as before.
pub const OPAQUE_ALPN: &[u8] = b"postern-tcp";

/// ALPN accepted by sidecars, in order of preference (rustls picks the
/// server's first that the client offers): opaque TCP, then HTTP/2, so
/// HTTP/1.1 callers are multiplexed over one connection between pods.
const MESH_ALPN: [&[u8]; 3] = [OPAQUE_ALPN, b"h2", b"http/1.1"];

/// TLS settings could not be turned into a rustls config.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    /// rustls refused the settings.
    #[error("tls setup for {what}: {source}")]
    Rustls {
        /// Listener or cluster.
        what: String,
        /// Cause.
        #[source]
        source: rustls::Error,
    },
    /// Mesh TLS without an identity.
    #[error("{0} uses mesh mTLS but no identity is configured")]
    NoIdentity(String),
    /// Client auth roots unusable.
    #[error("client_auth roots for {what}: {reason}")]
    Verifier {
        /// Listener.
        what: String,
        /// Cause.
        reason: String,
    },
}

/// A downstream connection after the TLS decision.
#[derive(Debug)]
pub enum DownstreamIo {
    /// Plaintext.
    Plain(TcpStream),
    /// TLS terminated here.
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    /// Either of the above, with the bytes protocol detection read put back
    /// in front.
    Sniffed(Box<crate::listener::detect::Rewind<DownstreamIo>>),
}

impl DownstreamIo {
    /// The TCP socket underneath.
    pub fn tcp(&self) -> &TcpStream {
        match self {
            DownstreamIo::Plain(tcp) => tcp,
            DownstreamIo::Tls(tls) => tls.get_ref().0,
            DownstreamIo::Sniffed(rewind) => rewind.get_ref().tcp(),
        }
    }

    /// Whether bytes are waiting in Postern's own buffers, so the socket's
    /// readiness does not say whether there is something to read.
    pub fn has_buffered_input(&self) -> bool {
        match self {
            // Decrypted bytes wait in the session only until the next read,
            // and a connection counts idle only once reads came back empty.
            DownstreamIo::Plain(_) | DownstreamIo::Tls(_) => false,
            DownstreamIo::Sniffed(rewind) => {
                rewind.has_unread_prefix() || rewind.get_ref().has_buffered_input()
            }
        }
    }

    /// Whether the client speaks plaintext (no TLS terminated here).
    pub fn is_plaintext(&self) -> bool {
        match self {
            DownstreamIo::Plain(_) => true,
            DownstreamIo::Tls(_) => false,
            DownstreamIo::Sniffed(rewind) => rewind.get_ref().is_plaintext(),
        }
    }
}

/// A captured connection after the TLS decision.
#[derive(Debug)]
pub struct Accepted {
    /// The stream.
    pub io: DownstreamIo,
    /// What the handshake proved.
    pub peer: PeerTls,
    /// The client sent nothing within the wait it was given: a
    /// server-first protocol, to be proxied as it is.
    pub silent: bool,
}

/// What the handshake told about the peer.
#[derive(Debug, Clone, Default)]
pub struct PeerTls {
    /// The connection is TLS.
    pub tls: bool,
    /// The client's verified SPIFFE ID (mesh mTLS, or an edge client
    /// certificate that carries one).
    pub spiffe_id: Option<Arc<SpiffeId>>,
    /// A mesh peer said the stream is opaque TCP ([`OPAQUE_ALPN`]).
    pub opaque: bool,
    /// The server name the client sent in its handshake (SNI), if any.
    pub sni: Option<Arc<str>>,
}

/// A listener's TLS front: decides plaintext or TLS and runs the handshake.
#[derive(Clone)]
pub struct DownstreamTls {
    kind: DownstreamKind,
    listener: Arc<str>,
}

#[derive(Clone)]
enum DownstreamKind {
    Off,
    Tls {
        acceptor: TlsAcceptor,
        accept_plaintext: bool,
        timeout: Duration,
        /// Client certificates are mesh identities (checked against the
        /// identity's bundle), not edge client certificates from another CA.
        mesh: bool,
    },
}

impl std::fmt::Debug for DownstreamTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DownstreamTls")
            .field("listener", &self.listener)
            .field("tls", &matches!(self.kind, DownstreamKind::Tls { .. }))
            .finish()
    }
}

impl DownstreamTls {
    /// Builds the TLS front of a listener; `header_timeout` bounds mesh handshakes.
    pub fn new(
        listener: Arc<str>,
        tls: &ListenerTls,
        identity: Option<&Arc<IdentityHandle>>,
        header_timeout: Duration,
    ) -> Result<DownstreamTls, TlsSetupError> {
        let rustls_err = |source| TlsSetupError::Rustls {
            what: format!("listener {listener}"),
            source,
        };
        let kind = match tls {
            ListenerTls::Off => DownstreamKind::Off,
            ListenerTls::Mesh {
                permissive,
                allowed,
            } => {
                let identity = identity
                    .ok_or_else(|| TlsSetupError::NoIdentity(format!("listener {listener}")))?;
                let config = mesh_server_config(
                    identity.clone(),
                    allowed.clone(),
                    MESH_ALPN.iter().map(|p| p.to_vec()).collect(),
                )
                .map_err(rustls_err)?;
                DownstreamKind::Tls {
                    acceptor: TlsAcceptor::from(Arc::new(config)),
                    accept_plaintext: *permissive,
                    timeout: header_timeout,
                    mesh: true,
                }
            }
            ListenerTls::Edge(edge) => DownstreamKind::Tls {
                acceptor: TlsAcceptor::from(Arc::new(edge_server_config(&listener, edge)?)),
                accept_plaintext: false,
                timeout: edge.handshake_timeout,
                mesh: false,
            },
        };
        Ok(DownstreamTls { kind, listener })
    }

    /// Peeks at the first byte and runs the handshake if it is TLS. `None`
    /// when the connection is refused (logged and counted).
    pub async fn accept(&self, stream: TcpStream) -> Option<(DownstreamIo, PeerTls)> {
        // Boxed, as below: a handshake's state (several KiB) inline would
        // size the task of every connection for as long as it lives.
        Box::pin(self.accept_within(stream, None))
            .await
            .map(|accepted| (accepted.io, accepted.peer))
    }

    /// `accept` for a captured connection: where plaintext is allowed, a
    /// client silent for `silence` is taken as plaintext at once, so a
    /// server-first protocol is not held up by the handshake timeout.
    pub async fn accept_captured(&self, stream: TcpStream, silence: Duration) -> Option<Accepted> {
        // Boxed: the handshake's state is let go once it is done, instead
        // of sizing the connection's task.
        Box::pin(self.accept_within(stream, Some(silence))).await
    }

    async fn accept_within(
        &self,
        stream: TcpStream,
        silence: Option<Duration>,
    ) -> Option<Accepted> {
        let plain = |stream, silent| {
            Some(Accepted {
                io: DownstreamIo::Plain(stream),
                peer: PeerTls::default(),
                silent,
            })
        };
        let DownstreamKind::Tls {
            acceptor,
            accept_plaintext,
            timeout,
            mesh,
        } = &self.kind
        else {
            return plain(stream, false);
        };
        let peer = stream.peer_addr().ok();
        let wait = match silence {
            Some(silence) if *accept_plaintext => silence,
            _ => *timeout,
        };
        let first = tokio::time::timeout(wait, async {
            let mut byte = [0u8; 1];
            stream
                .peek(&mut byte)
                .await
                .map(|n| (n == 1).then_some(byte[0]))
        })
        .await;
        let first = match first {
            Ok(Ok(Some(byte))) => byte,
            // Closed or failed before sending anything: nothing to refuse.
            Ok(Ok(None)) | Ok(Err(_)) => return None,
            // Server-first protocols (MySQL, SMTP) send nothing until the
            // server speaks: on a permissive listener silence is plaintext.
            Err(_) if *accept_plaintext => return plain(stream, true),
            Err(_) => {
                self.refuse(
                    "handshake_timeout",
                    peer,
                    "no bytes before the handshake timeout",
                );
                return None;
            }
        };
        if first != TLS_HANDSHAKE_RECORD {
            if *accept_plaintext {
                return plain(stream, false);
            }
            self.refuse(
                "plaintext",
                peer,
                "plaintext connection to a TLS-only listener",
            );
            return None;
        }
        match tokio::time::timeout(*timeout, acceptor.accept(stream)).await {
            Ok(Ok(tls)) => {
                // An edge client certificate may carry any URI SAN its CA
                // chose; only mesh handshakes prove a SPIFFE ID.
                let session = tls.get_ref().1;
                let spiffe_id = if *mesh {
                    session
                        .peer_certificates()
                        .and_then(postern_certs::peer_spiffe_id)
                        .map(Arc::new)
                } else {
                    None
                };
                let opaque = *mesh && session.alpn_protocol() == Some(OPAQUE_ALPN);
                let sni = session.server_name().map(Arc::from);
                Some(Accepted {
                    io: DownstreamIo::Tls(Box::new(tls)),
                    peer: PeerTls {
                        tls: true,
                        spiffe_id,
                        opaque,
                        sni,
                    },
                    silent: false,
                })
            }
            Ok(Err(err)) => {
                let reason = io_failure_reason(&err);
                self.refuse(reason, peer, &err.to_string());
                None
            }
            Err(_) => {
                self.refuse(
                    "handshake_timeout",
                    peer,
                    "handshake did not finish in time",
                );
                None
            }
        }
    }

    fn refuse(&self, reason: &'static str, peer: Option<std::net::SocketAddr>, detail: &str) {
        tracing::warn!(
            listener = %self.listener,
            peer = ?peer,
            reason,
            detail,
            "downstream TLS connection refused"
        );
        metrics::counter!(
            names::DOWNSTREAM_TLS_FAILURES_TOTAL,
            "listener" => self.listener.clone(),
            "reason" => reason,
        )
        .increment(1);
    }
}

/// The bounded reason behind a failed handshake's I/O error.
pub fn io_failure_reason(err: &io::Error) -> &'static str {
    match err
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        Some(tls) => failure_reason(tls),
        None if err.kind() == io::ErrorKind::UnexpectedEof => "closed",
        None => "handshake",
    }
}

fn edge_server_config(listener: &str, edge: &EdgeTls) -> Result<ServerConfig, TlsSetupError> {
    let builder = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|source| TlsSetupError::Rustls {
            what: format!("listener {listener}"),
            source,
        })?;
    let builder = match &edge.client_auth {
        None => builder.with_no_client_auth(),
        Some((bundle, required)) => {
            let verifier_err = |reason: String| TlsSetupError::Verifier {
                what: listener.to_string(),
                reason,
            };
            let mut roots = RootCertStore::empty();
            for root in bundle.roots() {
                roots
                    .add(root.clone())
                    .map_err(|e| verifier_err(e.to_string()))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider());
            let verifier = if *required {
                verifier
            } else {
                verifier.allow_unauthenticated()
            };
            builder.with_client_cert_verifier(
                verifier.build().map_err(|e| verifier_err(e.to_string()))?,
            )
        }
    };
    let mut config = builder.with_cert_resolver(Arc::new(SniResolver::new(edge)));
    config.alpn_protocols = edge.alpn.clone();
    if edge.client_auth.is_some() {
        // A resumed session skips the client certificate: with client
        // auth, every connection shows a current one (as mesh mTLS does).
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
    }
    Ok(config)
}

/// Picks an edge certificate by SNI: exact name, then a `*.` wildcard for
/// one label, then the first certificate.
#[derive(Debug)]
struct SniResolver {
    exact: HashMap<String, Arc<CertifiedKey>>,
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    /// `None` when the SNI must match a name (`require_sni_match`).
    default: Option<Arc<CertifiedKey>>,
}

impl SniResolver {
    fn new(edge: &EdgeTls) -> SniResolver {
        let mut exact = HashMap::new();
        let mut wildcard = HashMap::new();
        for cert in &edge.certificates {
            for name in &cert.names {
                match name.strip_prefix("*.") {
                    Some(suffix) => wildcard.insert(suffix.to_string(), cert.key.clone()),
                    None => exact.insert(name.clone(), cert.key.clone()),
                };
            }
        }
        SniResolver {
            exact,
            wildcard,
            default: edge
                .certificates
                .first()
                .filter(|_| !edge.require_sni_match)
                .map(|c| c.key.clone()),
        }
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let Some(sni) = hello.server_name() else {
            return self.default.clone();
        };
        let sni = sni.to_ascii_lowercase();
        let sni = sni.trim_end_matches('.');
        if let Some(key) = self.exact.get(sni) {
            return Some(key.clone());
        }
        if let Some((_, parent)) = sni.split_once('.') {
            if let Some(key) = self.wildcard.get(parent) {
                return Some(key.clone());
            }
        }
        self.default.clone()
    }
}

/// TLS from a cluster to its endpoints.
#[derive(Clone)]
pub struct UpstreamTls {
    connector: TlsConnector,
    /// Mesh only: the connector for opaque TCP, offering [`OPAQUE_ALPN`].
    opaque: Option<TlsConnector>,
    server_name: ServerName<'static>,
    cluster: Arc<str>,
    /// Speak HTTP/2 to the endpoint whatever the cluster protocol says
    /// (mesh peers are sidecars, which all speak it).
    pub force_http2: bool,
}

impl std::fmt::Debug for UpstreamTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamTls")
            .field("cluster", &self.cluster)
            .field("server_name", &self.server_name)
            .finish()
    }
}

impl UpstreamTls {
    /// Builds the connector for a cluster; `http2` picks the ALPN offered to
    /// simple-TLS servers.
    pub fn new(
        cluster: Arc<str>,
        config: &UpstreamTlsConfig,
        identity: Option<&Arc<IdentityHandle>>,
        http2: bool,
    ) -> Result<UpstreamTls, TlsSetupError> {
        let rustls_err = |source| TlsSetupError::Rustls {
            what: format!("cluster {cluster}"),
            source,
        };
        let mut opaque = None;
        let (client, server_name, force_http2): (ClientConfig, &str, bool) = match config {
            UpstreamTlsConfig::Mesh {
                allowed,
                server_name,
            } => {
                let identity = identity
                    .ok_or_else(|| TlsSetupError::NoIdentity(format!("cluster {cluster}")))?;
                // Only h2 is offered: between sidecars every call is
                // multiplexed, whatever the caller spoke.
                let client =
                    mesh_client_config(identity.clone(), allowed.clone(), vec![b"h2".to_vec()])
                        .map_err(rustls_err)?;
                let tcp = mesh_client_config(
                    identity.clone(),
                    allowed.clone(),
                    vec![OPAQUE_ALPN.to_vec(), b"h2".to_vec()],
                )
                .map_err(rustls_err)?;
                opaque = Some(TlsConnector::from(Arc::new(tcp)));
                (client, server_name, true)
            }
            UpstreamTlsConfig::Simple {
                roots,
                server_name,
                sans,
                client,
                alpn,
            } => {
                let mut store = RootCertStore::empty();
                for root in roots.roots() {
                    store.add(root.clone()).map_err(rustls_err)?;
                }
                let builder = ClientConfig::builder_with_provider(provider())
                    .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
                    .map_err(rustls_err)?;
                let builder = if sans.is_empty() {
                    builder.with_root_certificates(store)
                } else {
                    builder
                        .dangerous()
                        .with_custom_certificate_verifier(Arc::new(san::SanVerifier::new(
                            store,
                            sans.clone(),
                        )))
                };
                let mut client = match client {
                    Some(key) => builder.with_client_cert_resolver(Arc::new(
                        rustls::sign::SingleCertAndKey::from(key.clone()),
                    )),
                    None => builder.with_no_client_auth(),
                };
                client.alpn_protocols = match alpn {
                    Some(list) => list.clone(),
                    None => vec![if http2 {
                        b"h2".to_vec()
                    } else {
                        b"http/1.1".to_vec()
                    }],
                };
                // Without a server name no SNI goes out; the name rustls
                // needs anyway is never checked (`sans` is, by the verifier).
                client.enable_sni = server_name.is_some();
                let name = server_name.as_deref().unwrap_or("upstream.invalid");
                (client, name, false)
            }
        };
        let server_name =
            ServerName::try_from(server_name.to_string()).map_err(|_| TlsSetupError::Rustls {
                what: format!("cluster {cluster}"),
                source: rustls::Error::General(format!("invalid server name {server_name}")),
            })?;
        Ok(UpstreamTls {
            connector: TlsConnector::from(Arc::new(client)),
            opaque,
            server_name,
            cluster,
            force_http2,
        })
    }

    /// Runs the client handshake on a connected socket; failures are logged
    /// and counted with their reason.
    pub async fn connect(
        &self,
        stream: TcpStream,
    ) -> io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        self.handshake(&self.connector, stream).await
    }

    /// `connect` for a stream of opaque TCP: to a mesh peer it says so
    /// ([`OPAQUE_ALPN`]), so the peer does not sniff it again.
    pub async fn connect_opaque(
        &self,
        stream: TcpStream,
    ) -> io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        self.handshake(self.opaque.as_ref().unwrap_or(&self.connector), stream)
            .await
    }

    async fn handshake(
        &self,
        connector: &TlsConnector,
        stream: TcpStream,
    ) -> io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let peer = stream.peer_addr().ok();
        connector
            .connect(self.server_name.clone(), stream)
            .await
            .inspect_err(|err| {
                let reason = io_failure_reason(err);
                tracing::warn!(
                    cluster = %self.cluster,
                    peer = ?peer,
                    reason,
                    error = %err,
                    "upstream TLS handshake failed"
                );
                metrics::counter!(
                    names::UPSTREAM_TLS_FAILURES_TOTAL,
                    "cluster" => self.cluster.clone(),
                    "reason" => reason,
                )
                .increment(1);
            })
    }
}

/// An upstream connection, plain or TLS.
#[derive(Debug)]
pub enum UpstreamIo {
    /// Plaintext.
    Plain(TcpStream),
    /// TLS.
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

macro_rules! delegate_io {
    ($ty:ident $(, $boxed:ident)*) => {
        impl AsyncRead for $ty {
            fn poll_read(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &mut ReadBuf<'_>,
            ) -> Poll<io::Result<()>> {
                match self.get_mut() {
                    $ty::Plain(s) => Pin::new(s).poll_read(cx, buf),
                    $ty::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
                    $($ty::$boxed(s) => Pin::new(s.as_mut()).poll_read(cx, buf),)*
                }
            }
        }

        impl AsyncWrite for $ty {
            fn poll_write(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &[u8],
            ) -> Poll<io::Result<usize>> {
                match self.get_mut() {
                    $ty::Plain(s) => Pin::new(s).poll_write(cx, buf),
                    $ty::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
                    $($ty::$boxed(s) => Pin::new(s.as_mut()).poll_write(cx, buf),)*
                }
            }

            fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                match self.get_mut() {
                    $ty::Plain(s) => Pin::new(s).poll_flush(cx),
                    $ty::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
                    $($ty::$boxed(s) => Pin::new(s.as_mut()).poll_flush(cx),)*
                }
            }

            fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                match self.get_mut() {
                    $ty::Plain(s) => Pin::new(s).poll_shutdown(cx),
                    $ty::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
                    $($ty::$boxed(s) => Pin::new(s.as_mut()).poll_shutdown(cx),)*
                }
            }

            fn poll_write_vectored(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                bufs: &[io::IoSlice<'_>],
            ) -> Poll<io::Result<usize>> {
                match self.get_mut() {
                    $ty::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
                    $ty::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
                    $($ty::$boxed(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),)*
                }
            }

            fn is_write_vectored(&self) -> bool {
                match self {
                    $ty::Plain(s) => s.is_write_vectored(),
                    $ty::Tls(s) => s.is_write_vectored(),
                    $($ty::$boxed(s) => s.is_write_vectored(),)*
                }
            }
        }
    };
}

delegate_io!(DownstreamIo, Sniffed);
delegate_io!(UpstreamIo);

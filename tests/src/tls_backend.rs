//! A TLS server in front of a plaintext backend, as an external service
//! reached with `simple` upstream TLS would be: it terminates TLS with a
//! given certificate (optionally requiring a client certificate from given
//! roots), records what each handshake carried, and relays the bytes.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

use crate::mesh::Issued;

/// What one completed handshake carried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handshake {
    /// SNI sent by the client.
    pub sni: Option<String>,
    /// ALPN agreed.
    pub alpn: Option<Vec<u8>>,
    /// Whether the client presented a certificate.
    pub client_cert: bool,
}

/// A running TLS front; it stops when dropped.
#[derive(Debug)]
pub struct TlsFront {
    addr: SocketAddr,
    handshakes: Arc<Mutex<Vec<Handshake>>>,
    task: JoinHandle<()>,
}

impl Drop for TlsFront {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TlsFront {
    /// Starts on `127.0.0.1:0`, serving `cert` and relaying to `backend`;
    /// with `client_roots` (PEM) a client certificate chaining to them is
    /// required. Offers `http/1.1` and `h2` by ALPN.
    ///
    /// # Panics
    ///
    /// If it cannot bind or the certificate does not load.
    pub async fn start(backend: SocketAddr, cert: &Issued, client_roots: Option<&str>) -> Self {
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(cert.cert_pem.as_bytes())
                .collect::<Result<_, _>>()
                .expect("chain");
        let key = PrivateKeyDer::from_pem_slice(cert.key_pem.as_bytes()).expect("key");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("versions");
        let builder = match client_roots {
            Some(pem) => {
                let mut roots = rustls::RootCertStore::empty();
                for root in CertificateDer::pem_slice_iter(pem.as_bytes()) {
                    roots.add(root.expect("root")).expect("add root");
                }
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider,
                )
                .build()
                .expect("client verifier");
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let mut config = builder.with_single_cert(chain, key).expect("server cert");
        config.alpn_protocols = vec![b"http/1.1".to_vec(), b"h2".to_vec()];
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let handshakes = Arc::new(Mutex::new(Vec::new()));
        let seen = handshakes.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let acceptor = acceptor.clone();
                let seen = seen.clone();
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(stream).await else {
                        return;
                    };
                    let (_, session) = tls.get_ref();
                    let handshake = Handshake {
                        sni: session.server_name().map(str::to_string),
                        alpn: session.alpn_protocol().map(<[u8]>::to_vec),
                        client_cert: session.peer_certificates().is_some_and(|c| !c.is_empty()),
                    };
                    seen.lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .push(handshake);
                    let Ok(mut plain) = TcpStream::connect(backend).await else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
                });
            }
        });
        TlsFront {
            addr,
            handshakes,
            task,
        }
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The handshakes completed so far.
    pub fn handshakes(&self) -> Vec<Handshake> {
        self.handshakes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

//! Where certificates come from. Every source sits behind `CertSource`, so
//! the rotation loop does not care whether a CA signs a fresh key, a file
//! changes on disk, or the control plane pushes a secret.

use std::future::Future;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::identity::{Identity, IdentityError};
use crate::key::{KeyAlgorithm, KeyError};
use crate::spiffe::SpiffeId;
use crate::verify::TrustBundle;
use crate::x509::{parse_pem_chain, parse_pem_key, CertError};

/// A boxed future, so sources can be trait objects.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What the rotation loop asks a source for.
#[derive(Debug, Clone)]
pub struct IssueRequest {
    /// The identity to certify.
    pub id: SpiffeId,
    /// Algorithm of keys generated for a CSR.
    pub key_algorithm: KeyAlgorithm,
    /// Validity to request from a CA (it may grant less).
    pub lifetime: Duration,
}

/// A source failed to produce an identity.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Certificates or keys do not parse.
    #[error(transparent)]
    Cert(#[from] CertError),
    /// The result does not form a usable identity.
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// Key or CSR generation failed.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// The CA refused or could not be reached.
    #[error("certificate authority: {0}")]
    Ca(String),
}

/// A place certificates come from.
pub trait CertSource: Send + Sync + std::fmt::Debug {
    /// Short name for metrics, logs and `/certs`.
    fn name(&self) -> &'static str;

    /// Produces a certified identity for `request`.
    fn fetch<'a>(
        &'a self,
        request: &'a IssueRequest,
    ) -> BoxFuture<'a, Result<Identity, SourceError>>;

    /// Resolves when the source holds something newer than its last fetch,
    /// ahead of the scheduled renewal (e.g. files replaced on disk). Sources
    /// that only change when asked never resolve.
    fn changed(&self) -> BoxFuture<'_, ()> {
        Box::pin(std::future::pending())
    }
}

/// Certificate chain, key and trust bundle in PEM files, re-read when their
/// content changes (cert-manager, the SPIRE helper, a mounted secret).
#[derive(Debug)]
pub struct FileSource {
    cert: PathBuf,
    key: PathBuf,
    bundle: PathBuf,
    poll_interval: Duration,
    loaded: Mutex<Option<u64>>,
}

impl FileSource {
    /// A source reading these files, checked for changes every `poll_interval`.
    pub fn new(cert: PathBuf, key: PathBuf, bundle: PathBuf, poll_interval: Duration) -> Self {
        FileSource {
            cert,
            key,
            bundle,
            poll_interval,
            loaded: Mutex::new(None),
        }
    }

    async fn read_all(&self) -> Result<[Vec<u8>; 3], SourceError> {
        let mut out: [Vec<u8>; 3] = Default::default();
        for (slot, path) in out.iter_mut().zip([&self.cert, &self.key, &self.bundle]) {
            *slot = tokio::fs::read(path)
                .await
                .map_err(|source| SourceError::Read {
                    path: path.clone(),
                    source,
                })?;
        }
        Ok(out)
    }
}

fn fingerprint(contents: &[Vec<u8>; 3]) -> u64 {
    let mut hasher = DefaultHasher::new();
    contents.hash(&mut hasher);
    hasher.finish()
}

impl CertSource for FileSource {
    fn name(&self) -> &'static str {
        "files"
    }

    fn fetch<'a>(
        &'a self,
        _request: &'a IssueRequest,
    ) -> BoxFuture<'a, Result<Identity, SourceError>> {
        Box::pin(async move {
            let contents = self.read_all().await?;
            // Recorded before parsing: files that read but do not parse are
            // not a change to react to again; the rotation loop's back-off
            // retries them.
            if let Ok(mut loaded) = self.loaded.lock() {
                *loaded = Some(fingerprint(&contents));
            }
            let [cert, key, bundle] = &contents;
            identity_from_pem(cert, key, bundle, "files")
        })
    }

    fn changed(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let mut tick = tokio::time::interval(self.poll_interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                // Unreadable files (mid-replacement) are looked at again at
                // the next tick.
                let Ok(contents) = self.read_all().await else {
                    continue;
                };
                let loaded = self.loaded.lock().ok().and_then(|l| *l);
                if loaded != Some(fingerprint(&contents)) {
                    return;
                }
            }
        })
    }
}

/// Secrets pushed by the control plane (SDS): the workload certificate and
/// key, and the trust bundle, by the names the identity subscribes to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SdsSecrets {
    /// PEM certificate chain and PEM private key.
    pub certificate: Option<(Vec<u8>, Vec<u8>)>,
    /// PEM trust bundle.
    pub validation: Option<Vec<u8>>,
}

/// A source fed by SDS: the xDS handler stores secrets as they arrive and
/// the rotation loop installs them.
#[derive(Debug)]
pub struct SdsSource {
    secrets: tokio::sync::watch::Sender<SdsSecrets>,
}

impl SdsSource {
    /// An empty source; `fetch` waits until both secrets have arrived.
    pub fn new() -> Arc<SdsSource> {
        Arc::new(SdsSource {
            secrets: tokio::sync::watch::channel(SdsSecrets::default()).0,
        })
    }

    /// Replaces the secrets; the rotation loop picks them up at once.
    pub fn update(&self, change: impl FnOnce(&mut SdsSecrets)) {
        self.secrets.send_if_modified(|secrets| {
            let before = secrets.clone();
            change(secrets);
            *secrets != before
        });
    }
}

/// Builds an identity from PEM chain, key and bundle.
pub fn identity_from_pem(
    chain: &[u8],
    key: &[u8],
    bundle: &[u8],
    source: &'static str,
) -> Result<Identity, SourceError> {
    let chain = parse_pem_chain(chain, "certificate chain")?;
    let key = parse_pem_key(key)?;
    let bundle = Arc::new(TrustBundle::from_pem(bundle)?);
    Ok(Identity::new(chain, key, bundle, source)?)
}

impl CertSource for SdsSource {
    fn name(&self) -> &'static str {
        "sds"
    }

    fn fetch<'a>(
        &'a self,
        _request: &'a IssueRequest,
    ) -> BoxFuture<'a, Result<Identity, SourceError>> {
        Box::pin(async move {
            let mut rx = self.secrets.subscribe();
            let secrets = rx
                .wait_for(|s| s.certificate.is_some() && s.validation.is_some())
                .await
                .map_err(|_| SourceError::Ca("SDS source closed".into()))?
                .clone();
            match (&secrets.certificate, &secrets.validation) {
                (Some((chain, key)), Some(bundle)) => identity_from_pem(chain, key, bundle, "sds"),
                _ => Err(SourceError::Ca("SDS secrets incomplete".into())),
            }
        })
    }

    fn changed(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let mut rx = self.secrets.subscribe();
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        })
    }
}

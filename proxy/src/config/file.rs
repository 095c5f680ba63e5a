//! The static YAML config file, as serde reads it.
//!
//! These types mirror the file one to one and carry no logic beyond defaults;
//! `config::build` checks cross references and compiles them into the runtime
//! model. Every struct denies unknown keys so that a typo is an error. Every
//! field is documented in `docs/config.md`; keep the two in step.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The whole static config file.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// The admin server.
    #[serde(default)]
    pub admin: AdminFile,
    /// How long a drain (SIGTERM or `POST /drain`) waits for in-flight calls.
    #[serde(default = "default_drain_timeout", with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// How long outbound listeners keep accepting once a drain has started
    /// (the app may still be finishing its work); inbound ones stop at once.
    #[serde(default = "default_outbound_drain_wait", with = "humantime_serde")]
    pub outbound_drain_wait: Duration,
    /// Original destination ports never sniffed on any capture listener
    /// (`POSTERN_OPAQUE_PORTS`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub opaque_ports: Vec<super::capture::PortRange>,
    /// A writable directory for the last-known-good dynamic config
    /// (`POSTERN_STATE_DIR`); nothing is saved when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_dir: Option<PathBuf>,
    /// Listeners, each bound to one address.
    #[serde(default)]
    pub listeners: Vec<ListenerFile>,
    /// Upstream clusters that routes and TCP listeners send to.
    #[serde(default)]
    pub clusters: Vec<ClusterFile>,
    /// This workload's SPIFFE identity for mesh mTLS; none when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<IdentityFile>,
    /// Who this proxy is to the control plane.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<NodeFile>,
    /// The xDS control plane; the config is static only when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub xds: Option<XdsFile>,
    /// Who this workload is to telemetry, and where call logs go.
    #[serde(default)]
    pub telemetry: TelemetryFile,
    /// Process-wide overload protection: a global connection cap and
    /// actions under memory pressure.
    #[serde(default)]
    pub overload: OverloadFile,
}

/// The `overload` section: limits of the whole process, above the
/// listeners' own.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct OverloadFile {
    /// Downstream connections open at once across every listener; more are
    /// accepted and closed at once.
    pub max_connections: usize,
    /// Resident memory budget in bytes; no memory action when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_rss_bytes: Option<u64>,
    /// Share of `max_rss_bytes` from which new requests are answered 503.
    pub shed_at: f64,
    /// Share of `max_rss_bytes` from which no connection is accepted.
    pub pause_accept_at: f64,
    /// Share of each threshold (`shed_at`, `pause_accept_at`) the resident
    /// set must fall below before that state is left; 1 leaves it at the
    /// first sample below the threshold.
    pub release: f64,
    /// Least time a state is kept after it was entered, however far the
    /// resident set falls.
    #[serde(with = "humantime_serde")]
    pub min_hold: Duration,
    /// While shedding, close new TCP-proxy connections at once (as HTTP
    /// requests are answered 503).
    pub shed_tcp_connections: bool,
    /// How often the resident set is read.
    #[serde(with = "humantime_serde")]
    pub check_interval: Duration,
}

impl Default for OverloadFile {
    fn default() -> Self {
        OverloadFile {
            max_connections: 50_000,
            max_rss_bytes: None,
            shed_at: 0.95,
            pause_accept_at: 0.98,
            release: 0.95,
            min_hold: Duration::from_secs(1),
            shed_tcp_connections: true,
            check_interval: Duration::from_millis(250),
        }
    }
}

/// The `telemetry` section.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetryFile {
    /// This workload's labels in Istio metrics (and sent to peer sidecars).
    #[serde(default)]
    pub workload: WorkloadFile,
    /// Distinct peers kept as metric labels; later ones share `other` labels.
    #[serde(default = "default_max_peers")]
    pub max_peers: usize,
    /// Count every call in Istio's standard metrics too (default on).
    #[serde(default = "default_true")]
    pub istio_metrics: bool,
    /// One JSON line per call; none when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_log: Option<crate::telemetry::access_log::AccessLogFile>,
    /// Calls streamed to a collector over Envoy's access-log service; none when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_log_service: Option<crate::telemetry::als::AlsConfig>,
    /// Spans exported over OTLP/gRPC; none when absent (trace headers still
    /// pass through untouched).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracing: Option<crate::telemetry::trace::TracingConfig>,
}

impl Default for TelemetryFile {
    fn default() -> Self {
        TelemetryFile {
            workload: WorkloadFile::default(),
            max_peers: default_max_peers(),
            istio_metrics: true,
            access_log: None,
            access_log_service: None,
            tracing: None,
        }
    }
}

fn default_max_peers() -> usize {
    crate::telemetry::record::DEFAULT_MAX_PEERS
}

/// This workload's labels; each unset one is `unknown` (the namespace
/// falls back to the identity's).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkloadFile {
    /// Workload (Deployment, StatefulSet, …) name.
    pub name: Option<String>,
    /// Kubernetes namespace.
    pub namespace: Option<String>,
    /// `app` label.
    pub app: Option<String>,
    /// `version` label.
    pub version: Option<String>,
    /// Canonical service (`service.istio.io/canonical-name`); defaults to `app`.
    pub canonical_service: Option<String>,
    /// Canonical revision; defaults to `version`, then `latest`.
    pub canonical_revision: Option<String>,
    /// Mesh cluster id.
    pub cluster: Option<String>,
}

/// The node this proxy reports to the control plane.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NodeFile {
    /// Node id, e.g. `sidecar~10.0.0.5~web-7d9f.shop~shop.svc.cluster.local`.
    #[serde(default)]
    pub id: String,
    /// Service cluster of the node.
    #[serde(default)]
    pub cluster: String,
    /// Free-form metadata, sent as strings.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub metadata: std::collections::BTreeMap<String, String>,
}

/// An Envoy v3 ADS control plane.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct XdsFile {
    /// gRPC address: `http://host:port` or `https://host:port`.
    pub address: String,
    /// `sotw` (state of the world, default) or `delta`.
    #[serde(default)]
    pub protocol: XdsProtocolFile,
    /// PEM root the control plane's TLS certificate chains to (`https://`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_cert: Option<PathBuf>,
    /// PEM client certificate chain for mTLS to the control plane.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_cert: Option<PathBuf>,
    /// PEM private key of `client_cert`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_key: Option<PathBuf>,
    /// First delay before reconnecting (default 500ms); doubles up to `max_backoff`.
    #[serde(default = "default_xds_initial_backoff", with = "humantime_serde")]
    pub initial_backoff: Duration,
    /// Longest delay between reconnects (default 30s).
    #[serde(default = "default_xds_max_backoff", with = "humantime_serde")]
    pub max_backoff: Duration,
    /// How long to wait for the first complete config before serving the
    /// last-known-good one from `state_dir` (default 5s).
    #[serde(default = "default_initial_fetch_timeout", with = "humantime_serde")]
    pub initial_fetch_timeout: Duration,
}

/// Default `xds.initial_fetch_timeout`.
pub fn default_initial_fetch_timeout() -> Duration {
    Duration::from_secs(5)
}

fn default_xds_initial_backoff() -> Duration {
    Duration::from_millis(500)
}

fn default_xds_max_backoff() -> Duration {
    Duration::from_secs(30)
}

/// xDS protocol variant.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum XdsProtocolFile {
    /// State of the world.
    #[default]
    Sotw,
    /// Incremental.
    Delta,
}

/// The workload identity: which SPIFFE ID, where its certificate comes from,
/// and when it is renewed.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityFile {
    /// The SPIFFE ID, e.g. `spiffe://cluster.local/ns/shop/sa/web`.
    pub spiffe_id: String,
    /// Where certificates come from.
    pub source: IdentitySourceFile,
    /// Algorithm of keys generated for CSRs.
    #[serde(default)]
    pub key_algorithm: KeyAlgorithmFile,
    /// Validity asked of a CA (default 24h; the CA may grant less).
    #[serde(default = "default_cert_lifetime", with = "humantime_serde")]
    pub lifetime: Duration,
    /// Renew once this fraction of the lifetime has passed (default 0.5).
    #[serde(default = "default_renew_at")]
    pub renew_at: f64,
    /// Random spread of the renewal time, as a fraction of the lifetime (default 0.05).
    #[serde(default = "default_renew_jitter")]
    pub renew_jitter: f64,
}

fn default_cert_lifetime() -> Duration {
    Duration::from_secs(24 * 3600)
}

fn default_renew_at() -> f64 {
    0.5
}

fn default_renew_jitter() -> f64 {
    0.05
}

/// Key algorithm for generated workload keys.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyAlgorithmFile {
    /// ECDSA P-256 (default).
    #[default]
    EcdsaP256,
    /// ECDSA P-384.
    EcdsaP384,
    /// Ed25519.
    Ed25519,
}

/// Where the workload certificate comes from: exactly one of the fields.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct IdentitySourceFile {
    /// PEM files on disk, re-read when they change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files: Option<FilesSourceFile>,
    /// A CA speaking Istio's `IstioCertificateService` API (istiod, or
    /// Postern's reference control plane).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub istio_ca: Option<IstioCaFile>,
    /// Secrets pushed by the xDS control plane (SDS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sds: Option<SdsSourceFile>,
}

/// Names of the SDS secrets that carry the workload identity.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SdsSourceFile {
    /// Secret with the certificate chain and key (Istio's name: `default`).
    #[serde(default = "default_sds_certificate")]
    pub certificate: String,
    /// Secret with the validation context's trusted CA (Istio's: `ROOTCA`).
    #[serde(default = "default_sds_validation")]
    pub validation: String,
}

impl SdsSourceFile {
    /// Istio's names: `default` and `ROOTCA`.
    pub fn istio() -> SdsSourceFile {
        SdsSourceFile {
            certificate: default_sds_certificate(),
            validation: default_sds_validation(),
        }
    }
}

fn default_sds_certificate() -> String {
    "default".into()
}

fn default_sds_validation() -> String {
    "ROOTCA".into()
}

/// Certificate, key and trust bundle files.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FilesSourceFile {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
    /// PEM trust bundle: one or more roots.
    pub bundle: PathBuf,
    /// How often the files are checked for changes (default 5s).
    #[serde(default = "default_poll_interval", with = "humantime_serde")]
    pub poll_interval: Duration,
}

fn default_poll_interval() -> Duration {
    Duration::from_secs(5)
}

/// An Istio-compatible CA.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct IstioCaFile {
    /// gRPC address, `http://host:port` or `https://host:port`.
    pub address: String,
    /// File holding the bearer token (e.g. a projected service-account
    /// token); read before every request, so it may rotate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
    /// PEM root that the CA's own TLS certificate chains to (for `https://`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_cert: Option<PathBuf>,
    /// PEM trust bundle for mesh peers. Without it, the root at the end of
    /// the chain the CA returns is trusted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trust_bundle: Option<PathBuf>,
    /// Sent as the `ClusterID` metadata that istiod expects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_id: Option<String>,
    /// Time allowed for one signing request (default 10s).
    #[serde(default = "default_ca_timeout", with = "humantime_serde")]
    pub timeout: Duration,
}

fn default_ca_timeout() -> Duration {
    Duration::from_secs(10)
}

/// Mesh mTLS on a listener.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MtlsMode {
    /// Only mTLS with a client certificate that chains to the trust bundle.
    Strict,
    /// mTLS or plaintext, told apart by the first byte.
    Permissive,
    /// Plaintext only (default).
    #[default]
    Disable,
}

/// Mesh mTLS settings of a listener.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerMtlsFile {
    /// `strict`, `permissive` or `disable`.
    pub mode: MtlsMode,
    /// SPIFFE IDs allowed to connect; any ID of the trust bundle when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_identities: Vec<String>,
}

/// Edge TLS termination on a listener.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServerTlsFile {
    /// Server certificates, chosen by SNI; the first is the default.
    pub certificates: Vec<ServerCertificateFile>,
    /// Ask clients for a certificate; none when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_auth: Option<ClientAuthFile>,
    /// ALPN protocols offered, in order (default `h2`, `http/1.1`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alpn: Option<Vec<String>>,
    /// Time allowed for the handshake (default 10s).
    #[serde(default = "default_handshake_timeout", with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// Refuse a handshake whose SNI no certificate's `server_names` match
    /// (Envoy's filter chains without a catch-all); default: serve the first.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub require_sni_match: bool,
}

/// PEM that came inline (from xDS) rather than from a file; never
/// serialized or printed, as it may hold a private key.
#[derive(Clone, Default)]
pub struct InlinePem(pub Arc<Vec<u8>>);

impl std::fmt::Debug for InlinePem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "InlinePem({} bytes)", self.0.len())
    }
}

fn default_handshake_timeout() -> Duration {
    Duration::from_secs(10)
}

/// One server certificate.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServerCertificateFile {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
    /// SNI names it serves (`*.example.com` allowed); default: the
    /// certificate's DNS SANs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub server_names: Vec<String>,
    /// Chain and key given inline (xDS), used instead of `cert` and `key`.
    #[serde(skip)]
    pub inline: Option<(InlinePem, InlinePem)>,
}

/// Client certificate checks on an edge listener.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClientAuthFile {
    /// PEM roots that client certificates must chain to.
    pub ca: PathBuf,
    /// Refuse clients without a certificate (default true).
    #[serde(default = "default_true")]
    pub required: bool,
    /// Roots given inline (xDS), used instead of `ca`.
    #[serde(skip)]
    pub inline: Option<InlinePem>,
}

fn default_true() -> bool {
    true
}

/// TLS from a cluster to its endpoints.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTlsFile {
    /// `mesh` (mTLS with the workload identity, peers checked by SPIFFE ID)
    /// or `simple` (server-authenticated TLS, checked by DNS name).
    pub mode: UpstreamTlsMode,
    /// `mesh`: SPIFFE IDs the endpoints may present (required).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub identities: Vec<String>,
    /// `simple`: PEM roots the server certificate must chain to (required).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<PathBuf>,
    /// SNI and, for `simple` without `subject_alt_names`, the DNS name to
    /// check. `simple` needs this or `subject_alt_names`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
    /// `simple`: names the server certificate must carry, one of them
    /// enough; checked instead of `server_name`, which is then only SNI.
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        with = "serde_yaml_ng::with::singleton_map_recursive"
    )]
    pub subject_alt_names: Vec<SanMatchFile>,
    /// `simple`: PEM chain to present as a client certificate (with
    /// `client_key`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_cert: Option<PathBuf>,
    /// `simple`: PEM private key of `client_cert`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_key: Option<PathBuf>,
    /// `simple`: ALPN offered, in order (default: `h2` for an HTTP/2
    /// cluster, else `http/1.1`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alpn: Option<Vec<String>>,
    /// Roots given inline (xDS), used instead of `ca`. Serialized as a
    /// digest, so a new bundle counts as a settings change.
    #[serde(
        skip_deserializing,
        serialize_with = "serialize_pem_digest",
        skip_serializing_if = "Option::is_none"
    )]
    pub ca_inline: Option<InlinePem>,
    /// Client chain and key given inline (xDS), used instead of
    /// `client_cert` and `client_key`; serialized as a digest.
    #[serde(
        skip_deserializing,
        serialize_with = "serialize_pem_pair_digest",
        skip_serializing_if = "Option::is_none"
    )]
    pub client_inline: Option<(InlinePem, InlinePem)>,
    /// xDS: the SDS Secret that carries the roots.
    #[serde(skip_deserializing, skip_serializing_if = "Option::is_none")]
    pub ca_secret: Option<String>,
    /// xDS: the SDS Secret that carries the client certificate.
    #[serde(skip_deserializing, skip_serializing_if = "Option::is_none")]
    pub client_secret: Option<String>,
}

/// One name a `simple` upstream's certificate may carry.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum SanMatchFile {
    /// A DNS name, exact (a `*.` certificate name covers one label).
    Dns(String),
    /// A URI, exact (e.g. a SPIFFE ID).
    Uri(String),
}

fn pem_digest(pem: &InlinePem) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, &pem.0);
    let hex: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

// Inline PEM may hold a private key: only its digest is ever written out.
fn serialize_pem_digest<S: serde::Serializer>(
    pem: &Option<InlinePem>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    match pem {
        Some(pem) => serializer.serialize_some(&pem_digest(pem)),
        None => serializer.serialize_none(),
    }
}

fn serialize_pem_pair_digest<S: serde::Serializer>(
    pair: &Option<(InlinePem, InlinePem)>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    match pair {
        Some((chain, key)) => serializer.serialize_some(&[pem_digest(chain), pem_digest(key)]),
        None => serializer.serialize_none(),
    }
}

/// Upstream TLS mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum UpstreamTlsMode {
    /// Mutual TLS between sidecars.
    Mesh,
    /// TLS to an external server.
    Simple,
}

fn default_drain_timeout() -> Duration {
    Duration::from_secs(30)
}

fn default_outbound_drain_wait() -> Duration {
    Duration::from_secs(5)
}

/// The admin HTTP server.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AdminFile {
    /// Address of the admin server; keep it on loopback.
    #[serde(default = "default_admin_address")]
    pub address: SocketAddr,
}

impl Default for AdminFile {
    fn default() -> Self {
        Self {
            address: default_admin_address(),
        }
    }
}

fn default_admin_address() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 15000))
}

/// What a listener speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ListenerKind {
    /// HTTP/1.1 and HTTP/2 (prior knowledge), routed by virtual hosts.
    Http,
    /// Raw TCP to one cluster.
    Tcp,
    /// Traffic redirected by iptables, routed by its original destination.
    Capture,
}

/// One listener.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerFile {
    /// Unique name, used in metrics and logs.
    pub name: String,
    /// Address to bind; port 0 picks a free port.
    pub address: SocketAddr,
    /// `http` or `tcp`.
    pub kind: ListenerKind,
    /// Resource limits; the defaults are safe for an edge.
    #[serde(default)]
    pub limits: ListenerLimitsFile,
    /// HTTP settings (only for `kind: http`).
    #[serde(default)]
    pub http: HttpSettingsFile,
    /// Virtual hosts (only for `kind: http`).
    #[serde(default)]
    pub virtual_hosts: Vec<VirtualHostFile>,
    /// TCP proxy settings (only for `kind: tcp`, where it is required).
    #[serde(default)]
    pub tcp: Option<TcpProxyFile>,
    /// Capture settings (only for `kind: capture`, where it is required).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capture: Option<super::capture::CaptureFile>,
    /// Mesh mTLS with the workload identity; plaintext when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtls: Option<ListenerMtlsFile>,
    /// Edge TLS termination with configured certificates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<ServerTlsFile>,
    /// `inbound` (calls to this workload) or `outbound` (calls it makes);
    /// Istio's `reporter` label. Default: inbound with mesh mTLS, else outbound.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traffic_direction: Option<crate::telemetry::log::TrafficDirection>,
    /// Head sampling of new traces (with `telemetry.tracing`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracing: Option<ListenerTracingFile>,
    /// This listener's calls streamed to their own collector, instead of
    /// `telemetry.access_log_service`'s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_log_service: Option<crate::telemetry::als::AlsConfig>,
    /// Filter chains picked per connection, each with its own routes or
    /// cluster and TLS; when set, the listener's own protocol and TLS
    /// fields are unused (its address, limits and direction still count).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub filter_chains: Vec<FilterChainFile>,
}

/// One filter chain of a listener with several: what connections it takes
/// and what serves them.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FilterChainFile {
    /// Unique within the listener, e.g. `filter_chains[1]` from xDS.
    pub name: String,
    /// Which connections it takes; an empty match takes any.
    #[serde(default, rename = "match")]
    pub matcher: FilterChainMatchFile,
    /// Takes the connections no chain matches (Envoy's
    /// `default_filter_chain`); its `match` must be empty.
    #[serde(default)]
    pub default: bool,
    /// What serves its connections: `kind` with `virtual_hosts` and `http`
    /// or `tcp`, and `tls` or `mtls`. Its name and address are the
    /// listener's.
    pub listener: Box<ListenerFile>,
}

/// The criteria of a filter chain (Envoy's `FilterChainMatch`); each one
/// left empty matches anything.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct FilterChainMatchFile {
    /// The local port connected to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub destination_port: Option<u16>,
    /// SNI: exact names or `*.suffix`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub server_names: Vec<String>,
    /// `tls` or `raw_buffer`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transport_protocol: Option<String>,
    /// ALPN values the client offers (any one).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub application_protocols: Vec<String>,
}

/// Tracing settings of a listener.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerTracingFile {
    /// Fraction of calls without a sampling decision that start a sampled
    /// trace, 0 to 1 (default 0.01, as Istio). A caller's decision is kept.
    #[serde(default = "default_trace_sampling")]
    pub sampling: f64,
}

/// Istio's default head-sampling ratio.
pub fn default_trace_sampling() -> f64 {
    0.01
}

/// The default listen backlog, Envoy's: a connection storm waits in the
/// kernel's queue instead of being dropped at the SYN stage.
pub const DEFAULT_TCP_BACKLOG_SIZE: u32 = 1024;

/// Per-listener limits.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ListenerLimitsFile {
    /// Connections open at once; more are accepted and closed at once.
    pub max_connections: usize,
    /// Bytes of request line and headers (HTTP/1) or header list (HTTP/2); past it: 431.
    pub max_request_headers_bytes: usize,
    /// Number of request headers; past it: 431.
    pub max_request_headers: usize,
    /// HTTP/2 streams open at once on one connection.
    pub max_concurrent_streams: u32,
    /// Time allowed to receive a whole request head (slowloris guard).
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// A connection with no request in flight, or with requests in flight
    /// but no byte moving either way, is closed after this long.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Request body size limit; past it: 413. Unlimited when absent.
    pub max_request_body_bytes: Option<u64>,
    /// Request headers named with an underscore: `allow` (default),
    /// `reject_request` (400) or `drop_header`.
    pub headers_with_underscores: crate::http::headers::UnderscoreHeaders,
    /// Length of the kernel's queue of connections not yet accepted
    /// (`listen(2)` backlog; Envoy's `tcp_backlog_size`), capped by
    /// `net.core.somaxconn`.
    pub tcp_backlog_size: u32,
}

impl Default for ListenerLimitsFile {
    fn default() -> Self {
        Self {
            max_connections: 10_000,
            max_request_headers_bytes: 60 * 1024,
            max_request_headers: 100,
            max_concurrent_streams: 100,
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            max_request_body_bytes: None,
            headers_with_underscores: crate::http::headers::UnderscoreHeaders::Allow,
            tcp_backlog_size: DEFAULT_TCP_BACKLOG_SIZE,
        }
    }
}

/// HTTP connection manager settings of a listener.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpSettingsFile {
    /// Trust `x-forwarded-proto` and `x-request-id` sent by the client.
    /// Off by default: an edge must not believe what callers claim.
    pub trust_downstream: bool,
    /// Normalise request paths before routing and policies (default on).
    pub normalize_path: bool,
    /// Merge repeated slashes (default on).
    pub merge_slashes: bool,
    /// `%2F` and `%5C` in paths: `reject` (400, default), `decode` or `keep`.
    pub escaped_slashes: crate::route::normalize::EscapedSlashes,
    /// Role-based access control for every request; none when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rbac: Option<RbacFile>,
    /// A local rate limit on every request of the listener.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub local_rate_limit: Option<LocalRateLimitFile>,
    /// JWT authentication, before RBAC; none when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwt: Option<JwtAuthnFile>,
    /// Header changes for every route of the listener (Envoy's route
    /// configuration level).
    #[serde(skip_serializing_if = "HeaderMutationsFile::is_empty")]
    pub headers: HeaderMutationsFile,
    /// Apply header changes from the least specific level to the most
    /// specific one, so that a route's own changes win (default off: the
    /// listener's changes are applied last, as in Envoy).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub most_specific_header_mutations_wins: bool,
    /// Global rate limits through an Envoy rate-limit service, asked with
    /// the descriptors of the route's `rate_limits`; none when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_limit_service: Option<RateLimitServiceFile>,
}

/// The rate-limit filter: which service to ask, for which domain, and what
/// its failure means (Envoy's `envoy.filters.http.ratelimit`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitServiceFile {
    /// The domain sent with every request.
    pub domain: String,
    /// An HTTP/2 cluster serving the API (exactly one of `cluster`, `address`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
    /// A plaintext address of the service, `http://host:port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// Time allowed per call (default 20ms, Envoy's); past it the call
    /// counts as a service failure.
    #[serde(
        default = "default_rls_timeout",
        with = "humantime_serde",
        skip_serializing_if = "is_default_rls_timeout"
    )]
    pub timeout: Duration,
    /// Refuse requests (500, flag `RLSE`) when the service fails or times
    /// out; by default they pass.
    #[serde(default)]
    pub failure_mode_deny: bool,
    /// Only `rate_limits` entries of this stage apply (default 0).
    #[serde(default)]
    pub stage: u32,
    /// Add `x-ratelimit-limit`, `x-ratelimit-remaining` and
    /// `x-ratelimit-reset` from the service's answer.
    #[serde(default)]
    pub enable_x_ratelimit_headers: bool,
    /// gRPC requests refused get RESOURCE_EXHAUSTED instead of UNAVAILABLE.
    #[serde(default)]
    pub rate_limited_as_resource_exhausted: bool,
    /// Leave out the `x-envoy-ratelimited: true` header of refusals.
    #[serde(default)]
    pub disable_x_envoy_ratelimited_header: bool,
}

pub(crate) fn default_rls_timeout() -> Duration {
    crate::ratelimit::global::DEFAULT_TIMEOUT
}

fn is_default_rls_timeout(d: &Duration) -> bool {
    *d == default_rls_timeout()
}

/// One `rate_limits` entry: the actions that build one descriptor.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitPolicyFile {
    /// The filter stage this entry is for (default 0).
    #[serde(default)]
    pub stage: u32,
    /// Each adds one entry to the descriptor; if one cannot, the whole
    /// descriptor is left out.
    pub actions: Vec<RateLimitActionFile>,
}

/// A descriptor action: exactly one field.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitActionFile {
    /// `(descriptor_key, the header's value)`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_headers: Option<RequestHeadersActionFile>,
    /// `("remote_address", the caller's IP)`: `remote_address: {}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote_address: Option<EmptyFile>,
    /// `(descriptor_key, descriptor_value)`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generic_key: Option<GenericKeyActionFile>,
    /// `(descriptor_key, descriptor_value)` when the headers match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header_value_match: Option<HeaderValueMatchActionFile>,
    /// `("destination_cluster", the route's cluster)`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination_cluster: Option<EmptyFile>,
    /// `("source_cluster", node.cluster)`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_cluster: Option<EmptyFile>,
    /// `(descriptor_key or "spiffe_id", the caller's verified SPIFFE ID)`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spiffe_id: Option<PeerIdActionFile>,
    /// `(descriptor_key, a verified JWT claim)`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwt_claim: Option<JwtClaimActionFile>,
}

/// A field that takes no settings (`{}`).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EmptyFile {}

/// The `request_headers` action.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RequestHeadersActionFile {
    /// The header to read.
    pub header_name: String,
    /// The entry key.
    pub descriptor_key: String,
    /// Without the header, skip this entry instead of the descriptor.
    #[serde(default)]
    pub skip_if_absent: bool,
}

/// The `generic_key` action.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GenericKeyActionFile {
    /// The entry value.
    pub descriptor_value: String,
    /// The entry key (default `generic_key`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub descriptor_key: Option<String>,
}

/// The `header_value_match` action.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderValueMatchActionFile {
    /// The entry value on a match.
    pub descriptor_value: String,
    /// The entry key (default `header_match`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub descriptor_key: Option<String>,
    /// The entry value when there is no match; without it no descriptor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_value: Option<String>,
    /// Add the entry when the headers match (default) or when they do not.
    #[serde(default = "default_true")]
    pub expect_match: bool,
    /// All must hold.
    pub headers: Vec<HeaderMatchFile>,
}

/// The `spiffe_id` action.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PeerIdActionFile {
    /// The entry key (default `spiffe_id`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub descriptor_key: Option<String>,
    /// Callers without an ID skip this entry instead of the descriptor.
    #[serde(default)]
    pub skip_if_absent: bool,
}

/// The `jwt_claim` action.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct JwtClaimActionFile {
    /// The claim (`sub`, or a dotted path into nested objects).
    pub claim: String,
    /// The entry key.
    pub descriptor_key: String,
    /// Without the claim, skip this entry instead of the descriptor.
    #[serde(default)]
    pub skip_if_absent: bool,
}

/// How a route's global rate-limit descriptors take the virtual host's.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum VhRateLimitsFile {
    /// The virtual host's when the route has none (Envoy's default).
    #[default]
    Override,
    /// The route's, then the virtual host's.
    Include,
    /// Never the virtual host's.
    Ignore,
}

impl VhRateLimitsFile {
    fn is_override(&self) -> bool {
        *self == VhRateLimitsFile::Override
    }
}

/// A token-bucket rate limit, kept in this proxy.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LocalRateLimitFile {
    /// Bucket size: the burst allowed.
    pub max_tokens: u32,
    /// Tokens added per `fill_interval` (default: `max_tokens`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_fill: Option<u32>,
    /// Refill period.
    #[serde(with = "humantime_serde")]
    pub fill_interval: Duration,
    /// One bucket per value of this key; one shared bucket when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<RateLimitKeyFile>,
    /// Count and log what would be limited, limit nothing.
    #[serde(default)]
    pub shadow: bool,
    /// Most per-key buckets kept (default 10000); idle ones go first.
    #[serde(default = "default_max_keys")]
    pub max_keys: usize,
    /// Buckets for requests whose descriptors match (routes only): Envoy's
    /// local rate limit `descriptors`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub descriptors: Vec<LocalDescriptorFile>,
    /// Only `rate_limits` entries of this stage build descriptors.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub stage: u32,
    /// Descriptor actions for `descriptors`, instead of the route's
    /// `rate_limits`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rate_limits: Vec<RateLimitPolicyFile>,
    /// Take from this limit's own bucket even when a descriptor matched
    /// (default true, as Envoy).
    #[serde(default = "default_true")]
    pub always_consume_default: bool,
}

fn default_max_keys() -> usize {
    10_000
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// One descriptor's bucket of a local rate limit.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LocalDescriptorFile {
    /// The entries a request's descriptor must have, in order.
    pub entries: Vec<DescriptorEntryFile>,
    /// Bucket size: the burst allowed.
    pub max_tokens: u32,
    /// Tokens added per `fill_interval` (default: `max_tokens`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_fill: Option<u32>,
    /// Refill period.
    #[serde(with = "humantime_serde")]
    pub fill_interval: Duration,
    /// Count and log what this bucket would refuse, refuse nothing.
    #[serde(default)]
    pub shadow: bool,
    /// Most buckets kept when an entry takes any value (default 10000).
    #[serde(default = "default_max_keys")]
    pub max_keys: usize,
}

/// A descriptor entry to match: the key, and the value or (absent) any
/// value, each value then getting its own bucket.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DescriptorEntryFile {
    /// The entry's key (`remote_address`, `generic_key`, a header's
    /// `descriptor_key`, ...).
    pub key: String,
    /// The value; absent: any value, one bucket per value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
}

/// What a per-key rate limit is keyed by: exactly one field.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitKeyFile {
    /// The caller's verified SPIFFE ID (`true`); callers without one share a bucket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spiffe_id: Option<bool>,
    /// The remote address (`true`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote_address: Option<bool>,
    /// A request header's value; requests without it share a bucket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<String>,
    /// A claim of the verified JWT (`sub`, or a dotted path); requests
    /// without one share a bucket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwt_claim: Option<String>,
}

impl Default for HttpSettingsFile {
    fn default() -> Self {
        HttpSettingsFile {
            trust_downstream: false,
            normalize_path: true,
            merge_slashes: true,
            escaped_slashes: Default::default(),
            rbac: None,
            local_rate_limit: None,
            rate_limit_service: None,
            jwt: None,
            headers: HeaderMutationsFile::default(),
            most_specific_header_mutations_wins: false,
        }
    }
}

/// Header changes at one level of the route table (Envoy's
/// `request_headers_to_add` / `_remove` and `response_headers_to_add` /
/// `_remove`). Within a level, removals come before additions.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HeaderMutationsFile {
    /// Headers added to the request sent upstream.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub request_headers_to_add: Vec<HeaderAddFile>,
    /// Headers removed from the request sent upstream.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub request_headers_to_remove: Vec<String>,
    /// Headers added to the response sent downstream.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub response_headers_to_add: Vec<HeaderAddFile>,
    /// Headers removed from the response sent downstream.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub response_headers_to_remove: Vec<String>,
}

impl HeaderMutationsFile {
    /// Whether no change is configured.
    pub fn is_empty(&self) -> bool {
        self.request_headers_to_add.is_empty()
            && self.request_headers_to_remove.is_empty()
            && self.response_headers_to_add.is_empty()
            && self.response_headers_to_remove.is_empty()
    }
}

/// One header to add (Envoy's `HeaderValueOption`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderAddFile {
    /// Header name (case-insensitive).
    pub name: String,
    /// Value; may use command operators such as `%REQ(x-user)%`.
    pub value: String,
    /// What to do when the header is already there (default
    /// `append_if_exists_or_add`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub append_action: Option<AppendAction>,
    /// Deprecated form of `append_action`: true appends, false overwrites.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub append: Option<bool>,
    /// Add the header even when its value comes out empty.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub keep_empty_value: bool,
}

/// What an added header does to one already present (Envoy's
/// `HeaderAppendAction`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AppendAction {
    /// Add another value; add the header if absent.
    #[default]
    AppendIfExistsOrAdd,
    /// Add only if absent.
    AddIfAbsent,
    /// Replace every value; add the header if absent.
    OverwriteIfExistsOrAdd,
    /// Replace every value; nothing if absent.
    OverwriteIfExists,
}

/// RBAC: enforced rules and shadow rules.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RbacFile {
    /// Enforced rules.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rules: Option<RbacRulesFile>,
    /// Rules that are evaluated, logged and counted, never enforced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<RbacRulesFile>,
}

/// A rule set.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RbacRulesFile {
    /// `allow` (default), `deny` or `log`.
    #[serde(default)]
    pub action: RbacActionFile,
    /// Policies, in order.
    #[serde(default)]
    pub policies: Vec<RbacPolicyFile>,
}

/// RBAC action.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RbacActionFile {
    /// Only matching requests pass.
    #[default]
    Allow,
    /// Matching requests are refused.
    Deny,
    /// Matches are logged only.
    Log,
}

/// One policy: any permission and any principal must match.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RbacPolicyFile {
    /// Name, for logs and metrics.
    pub name: String,
    /// What is asked for.
    pub permissions: Vec<PermissionFile>,
    /// Who asks.
    pub principals: Vec<PrincipalFile>,
}

/// A string condition: exactly one field.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StringMatchFile {
    /// Equal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exact: Option<String>,
    /// Starts with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// Whole-string regex.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regex: Option<String>,
}

/// A principal: exactly one field.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PrincipalFile {
    /// Anyone (`true`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub any: Option<bool>,
    /// Any caller with a verified SPIFFE ID (`true`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authenticated: Option<bool>,
    /// A caller whose verified SPIFFE ID matches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spiffe_id: Option<StringMatchFile>,
    /// Source address in a CIDR range.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_ip: Option<String>,
    /// A request header.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<HeaderMatchFile>,
    /// A claim of a verified JWT.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwt_claim: Option<JwtClaimMatchFile>,
    /// All of these.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub and: Option<Vec<PrincipalFile>>,
    /// Any of these.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub or: Option<Vec<PrincipalFile>>,
    /// Not this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not: Option<Box<PrincipalFile>>,
}

/// A JWT claim condition: the claim and exactly one of `exact`, `prefix`, `regex`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct JwtClaimMatchFile {
    /// Claim name; dots reach into nested objects (`realm.roles`).
    pub name: String,
    /// Equal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exact: Option<String>,
    /// Starts with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// Whole-value regex.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regex: Option<String>,
}

/// A permission: exactly one field.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PermissionFile {
    /// Anything (`true`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub any: Option<bool>,
    /// The normalised path, without the query.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<StringMatchFile>,
    /// The method.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// A request header.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<HeaderMatchFile>,
    /// The listener's port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination_port: Option<u16>,
    /// The SNI the client sent in its TLS handshake; never matches a
    /// connection without one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested_server_name: Option<StringMatchFile>,
    /// All of these.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub and: Option<Vec<PermissionFile>>,
    /// Any of these.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub or: Option<Vec<PermissionFile>>,
    /// Not this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not: Option<Box<PermissionFile>>,
}

/// JWT authentication on a listener (Envoy's `JwtAuthentication`).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct JwtAuthnFile {
    /// Token issuers, by name.
    #[serde(default)]
    pub providers: std::collections::BTreeMap<String, JwtProviderFile>,
    /// Requirements by request match; the first rule that matches applies.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<JwtRuleFile>,
    /// Named requirements that routes pick with `jwt.requirement`.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub requirement_map: std::collections::BTreeMap<String, JwtRequirementFile>,
    /// Let CORS preflight requests through without a check.
    #[serde(default)]
    pub bypass_cors_preflight: bool,
    /// Answer failures with a bare 401: no `WWW-Authenticate`, no body.
    #[serde(default)]
    pub strip_failure_response: bool,
}

/// One token issuer.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct JwtProviderFile {
    /// Required `iss`; any issuer when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer: Option<String>,
    /// `aud` must name one of these; not checked when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub audiences: Vec<String>,
    /// Where the verification keys come from.
    pub jwks: JwksSourceFile,
    /// Headers a token is taken from; with `from_params` both empty,
    /// `Authorization: Bearer` and then `?access_token=`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from_headers: Vec<JwtHeaderFile>,
    /// Query parameters a token is taken from.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from_params: Vec<String>,
    /// Keep the token in the request sent upstream (default: removed).
    #[serde(default)]
    pub forward: bool,
    /// A header that gets the verified payload, base64url-encoded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forward_payload_header: Option<String>,
    /// Claims copied into request headers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub claim_to_headers: Vec<ClaimToHeaderFile>,
    /// Tolerance on `exp` and `nbf` (default 60s, as Envoy).
    #[serde(default = "default_clock_skew", with = "humantime_serde")]
    pub clock_skew: Duration,
    /// Refuse tokens without `exp`.
    #[serde(default)]
    pub require_expiration: bool,
    /// Verified tokens remembered, so a repeated token skips the signature
    /// check; `0` turns the cache off.
    #[serde(default = "default_jwt_cache_size")]
    pub cache_size: usize,
}

fn default_jwt_cache_size() -> usize {
    crate::authn::VerifiedCache::DEFAULT_CAPACITY
}

fn default_clock_skew() -> Duration {
    Duration::from_secs(60)
}

/// Where a provider's keys come from: exactly one field.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct JwksSourceFile {
    /// A JWKS document.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inline: Option<String>,
    /// A file holding a JWKS document, read when the config is loaded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<PathBuf>,
    /// A JWKS fetched through a cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote: Option<RemoteJwksFile>,
}

/// A JWKS fetched over HTTP through a cluster.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RemoteJwksFile {
    /// `http://` or `https://` URI; its path is requested and its host sent as `Host`.
    pub uri: String,
    /// The cluster the request goes through.
    pub cluster: String,
    /// How long fetched keys are used (default 10m, as Envoy).
    #[serde(default = "default_jwks_cache", with = "humantime_serde")]
    pub cache_duration: Duration,
    /// Time allowed for one fetch (default 5s).
    #[serde(default = "default_jwks_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Shortest time between two fetches caused by tokens naming an
    /// unknown `kid` (default 30s).
    #[serde(default = "default_jwks_refetch", with = "humantime_serde")]
    pub min_refetch_interval: Duration,
}

fn default_jwks_cache() -> Duration {
    Duration::from_secs(600)
}

fn default_jwks_timeout() -> Duration {
    Duration::from_secs(5)
}

fn default_jwks_refetch() -> Duration {
    Duration::from_secs(30)
}

/// A header that carries a token.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct JwtHeaderFile {
    /// Header name.
    pub name: String,
    /// What precedes the token (`Bearer `), compared without ASCII case.
    #[serde(default)]
    pub value_prefix: String,
}

/// A claim copied into a request header.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClaimToHeaderFile {
    /// Claim name; dots reach into nested objects.
    pub claim: String,
    /// Header to set.
    pub header: String,
}

/// A rule: a request match and what it requires.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct JwtRuleFile {
    /// Conditions, as a route's `match`.
    #[serde(rename = "match")]
    pub matcher: RouteMatchFile,
    /// What matching requests must present; no check when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requires: Option<JwtRequirementFile>,
}

/// A requirement: exactly one of `provider`, `any`, `all`,
/// `allow_missing`, `allow_missing_or_failed`, `requirement`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct JwtRequirementFile {
    /// A valid token of this provider.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    /// With `provider`: accept these audiences instead of the provider's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audiences: Option<Vec<String>>,
    /// Any of these.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub any: Option<Vec<JwtRequirementFile>>,
    /// All of these.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub all: Option<Vec<JwtRequirementFile>>,
    /// No token is fine, an invalid one is not (`true`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_missing: Option<bool>,
    /// Anything passes; valid tokens still yield claims (`true`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_missing_or_failed: Option<bool>,
    /// The `requirement_map` entry of this name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requirement: Option<String>,
}

/// A virtual host: routes for a set of Host/:authority values.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct VirtualHostFile {
    /// Unique name within the listener.
    pub name: String,
    /// Hosts served: exact (`api.example.com`), suffix (`*.example.com`) or `*`.
    pub domains: Vec<String>,
    /// Routes, tried in order; the first match wins.
    pub routes: Vec<RouteFile>,
    /// Header changes for every route of this virtual host.
    #[serde(default, skip_serializing_if = "HeaderMutationsFile::is_empty")]
    pub headers: HeaderMutationsFile,
    /// Global rate-limit descriptors for the routes that have none of
    /// their own (or set `include_vh_rate_limits`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rate_limits: Vec<RateLimitPolicyFile>,
}

/// A route: a match and exactly one action.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RouteFile {
    /// Name for metrics and logs; defaults to the route's index.
    #[serde(default)]
    pub name: Option<String>,
    /// What the request must look like.
    #[serde(rename = "match")]
    pub matcher: RouteMatchFile,
    /// Action: send to one cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
    /// Action: split between clusters by weight.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weighted_clusters: Option<Vec<WeightedClusterFile>>,
    /// Action: answer directly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direct_response: Option<DirectResponseFile>,
    /// Action: answer with a redirect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redirect: Option<RedirectFile>,
    /// Time allowed until the upstream's response headers, over all tries.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub timeout: Option<Duration>,
    /// Retry policy; no retries when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetryFile>,
    /// Path and host rewrites applied before forwarding.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rewrite: Option<RewriteFile>,
    /// A local rate limit on this route's requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_rate_limit: Option<LocalRateLimitFile>,
    /// Global rate-limit descriptors of this route's requests; when empty,
    /// the virtual host's apply.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rate_limits: Vec<RateLimitPolicyFile>,
    /// Apply the virtual host's `rate_limits` too, after the route's own.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub include_vh_rate_limits: bool,
    /// How the virtual host's `rate_limits` join this route's (Envoy's
    /// `RateLimitPerRoute.vh_rate_limits`); `include_vh_rate_limits: true`
    /// wins over it.
    #[serde(default, skip_serializing_if = "VhRateLimitsFile::is_override")]
    pub vh_rate_limits: VhRateLimitsFile,
    /// This route's JWT requirement, from the listener's `requirement_map`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwt: Option<RouteJwtFile>,
    /// RBAC for this route instead of the listener's `http.rbac`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rbac: Option<RouteRbacFile>,
    /// Access-log filter and sampling for this route's calls.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_log: Option<crate::telemetry::access_log::LogPolicyFile>,
    /// Header changes for this route's requests and responses.
    #[serde(default, skip_serializing_if = "HeaderMutationsFile::is_empty")]
    pub headers: HeaderMutationsFile,
}

/// A route's JWT setting (Envoy's `PerRouteConfig`): exactly one field.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RouteJwtFile {
    /// No JWT check on this route (`true`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disabled: Option<bool>,
    /// The name of an entry of the listener's `http.jwt.requirement_map`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requirement: Option<String>,
}

/// A route's RBAC (Envoy's `RBACPerRoute`): replaces the listener's
/// `http.rbac` for the route. `disabled: true` alone turns RBAC off there;
/// otherwise `rules` and `shadow` are read as in `http.rbac`, and a
/// section with neither also leaves the route without RBAC.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RouteRbacFile {
    /// No RBAC on this route (`true`); no other field may be set with it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub disabled: bool,
    /// Enforced rules.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rules: Option<RbacRulesFile>,
    /// Rules that are evaluated, logged and counted, never enforced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<RbacRulesFile>,
}

/// Route match conditions; all given conditions must hold.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RouteMatchFile {
    /// Path condition; any path when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathMatchFile>,
    /// Header conditions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<HeaderMatchFile>,
    /// Allowed methods; any method when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    /// Query parameter conditions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub query: Vec<QueryMatchFile>,
}

/// A path condition: exactly one of the fields.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PathMatchFile {
    /// The path equals this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exact: Option<String>,
    /// The path starts with this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// The whole path matches this regular expression.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regex: Option<String>,
}

/// A header condition: at most one of `exact`, `regex`, `present`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderMatchFile {
    /// Header name (case-insensitive).
    pub name: String,
    /// The value equals this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exact: Option<String>,
    /// The whole value matches this regular expression.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regex: Option<String>,
    /// The header is present (true) or absent (false).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub present: Option<bool>,
    /// Invert the result.
    #[serde(default)]
    pub invert: bool,
}

/// A query parameter condition: at most one of `exact`, `regex`, `present`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct QueryMatchFile {
    /// Parameter name (case-sensitive).
    pub name: String,
    /// The (percent-decoded) value equals this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exact: Option<String>,
    /// The whole decoded value matches this regular expression.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regex: Option<String>,
    /// The parameter is present (true) or absent (false).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub present: Option<bool>,
}

/// One cluster of a weighted split.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WeightedClusterFile {
    /// Cluster name.
    pub cluster: String,
    /// Relative weight; 0 takes no traffic.
    pub weight: u32,
    /// Header changes when this cluster is picked.
    #[serde(default, skip_serializing_if = "HeaderMutationsFile::is_empty")]
    pub headers: HeaderMutationsFile,
}

/// A response made by the proxy itself.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DirectResponseFile {
    /// Status code.
    pub status: u16,
    /// Body, sent as `text/plain`.
    #[serde(default)]
    pub body: String,
}

/// A redirect; unset parts keep the request's.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RedirectFile {
    /// 301, 302, 303, 307 or 308 (default 301).
    #[serde(default = "default_redirect_code")]
    pub status: u16,
    /// New scheme (`http` or `https`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheme: Option<String>,
    /// New host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// New port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// New path (replaces the whole path).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Replace the matched prefix with this (needs a `prefix` path match).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix_rewrite: Option<String>,
    /// Drop the query string.
    #[serde(default)]
    pub strip_query: bool,
}

fn default_redirect_code() -> u16 {
    301
}

/// Request rewrites before forwarding.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RewriteFile {
    /// Replace the matched path prefix (needs a `prefix` path match).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// Rewrite the path with a regular expression.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regex: Option<RegexRewriteFile>,
    /// Replace the Host/:authority sent upstream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
}

/// A regex path rewrite.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RegexRewriteFile {
    /// Pattern matched against the path; every match is replaced.
    pub pattern: String,
    /// Replacement; `$1` / `${name}` refer to capture groups.
    pub substitution: String,
}

/// When a failed try is retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RetryOn {
    /// The upstream connection could not be made.
    ConnectFailure,
    /// The upstream reset or closed the connection before answering.
    Reset,
    /// The upstream answered 5xx.
    #[serde(rename = "5xx")]
    FiveXx,
    /// The upstream answered a status in `retriable_status_codes`.
    RetriableStatusCodes,
}

/// A retry policy.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RetryFile {
    /// Conditions that allow a retry.
    pub on: Vec<RetryOn>,
    /// Total tries, the first included (default 2).
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// Statuses that `retriable-status-codes` retries.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retriable_status_codes: Vec<u16>,
    /// Time allowed for each try until response headers.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub per_try_timeout: Option<Duration>,
    /// First back-off between tries (default 25ms), doubled each time, jittered.
    #[serde(default = "default_backoff_base", with = "humantime_serde")]
    pub backoff_base: Duration,
    /// Longest back-off (default 10 × base).
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub backoff_max: Option<Duration>,
    /// Retry methods that are not idempotent (POST, PATCH) too.
    #[serde(default)]
    pub retry_non_idempotent: bool,
    /// Request bodies up to this size are kept so they can be sent again;
    /// a larger body makes the request single-try (default 64 KiB).
    #[serde(default = "default_retry_buffer")]
    pub max_body_bytes: usize,
}

fn default_max_attempts() -> u32 {
    2
}
fn default_backoff_base() -> Duration {
    Duration::from_millis(25)
}
fn default_retry_buffer() -> usize {
    64 * 1024
}

/// TCP proxy settings.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TcpProxyFile {
    /// Cluster to connect to.
    pub cluster: String,
    /// A connection with no bytes either way for this long is closed (default 1h).
    #[serde(default = "default_tcp_idle", with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Access control per connection (principals, and `destination_port` /
    /// `any` permissions); none when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rbac: Option<RbacFile>,
    /// A token per accepted connection, taken before the TLS handshake and
    /// RBAC; unkeyed or keyed by `remote_address`. None when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_rate_limit: Option<LocalRateLimitFile>,
}

fn default_tcp_idle() -> Duration {
    Duration::from_secs(3600)
}

/// Load balancing policy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LbPolicy {
    /// Weighted round robin.
    #[default]
    RoundRobin,
    /// Power of two choices on active requests, weighted.
    LeastRequest,
    /// Weighted random.
    Random,
}

/// Upstream protocol.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamProtocol {
    /// HTTP/1.1 with keep-alive.
    #[default]
    Http1,
    /// HTTP/2 over cleartext (prior knowledge).
    Http2,
}

/// An upstream cluster.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterFile {
    /// Unique name.
    pub name: String,
    /// Static endpoints.
    pub endpoints: Vec<EndpointFile>,
    /// Load balancing policy.
    #[serde(default)]
    pub lb: LbPolicy,
    /// Protocol spoken to the endpoints.
    #[serde(default)]
    pub protocol: UpstreamProtocol,
    /// Time allowed for the TCP connect (default 5s).
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Connection pool settings.
    #[serde(default)]
    pub pool: PoolFile,
    /// Circuit breaker thresholds.
    #[serde(default)]
    pub circuit_breaker: CircuitBreakerFile,
    /// Retry budget: how many retries may be in flight relative to requests.
    #[serde(default)]
    pub retry_budget: RetryBudgetFile,
    /// Passive outlier detection; off when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<OutlierDetectionFile>,
    /// TLS to the endpoints; plaintext when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<UpstreamTlsFile>,
    /// How often endpoints named by DNS are resolved again (default 5s).
    #[serde(default = "default_dns_refresh_rate", with = "humantime_serde")]
    pub dns_refresh_rate: Duration,
    /// Address families a DNS name resolves to (default `v4_preferred`).
    #[serde(default)]
    pub dns_lookup_family: DnsLookupFamily,
    /// `strict`: every address of every name is an endpoint (default);
    /// `logical`: the first address of the one endpoint only.
    #[serde(default)]
    pub dns_type: DnsType,
}

/// Default `dns_refresh_rate` (Envoy's).
pub fn default_dns_refresh_rate() -> Duration {
    Duration::from_secs(5)
}

/// Which addresses of a DNS name are used (Envoy's `DnsLookupFamily`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DnsLookupFamily {
    /// IPv6 addresses if there are any, else IPv4 ones (Envoy's default).
    Auto,
    /// IPv4 only.
    V4Only,
    /// IPv6 only.
    V6Only,
    /// IPv4 addresses if there are any, else IPv6 ones.
    #[default]
    V4Preferred,
    /// Both.
    All,
}

/// How a DNS-named cluster turns answers into endpoints.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DnsType {
    /// Every address is an endpoint (Envoy's `STRICT_DNS`).
    #[default]
    Strict,
    /// The first address only (Envoy's `LOGICAL_DNS`).
    Logical,
}

fn default_connect_timeout() -> Duration {
    Duration::from_secs(5)
}

/// One endpoint.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointFile {
    /// `ip:port`, or `name:port` resolved by DNS.
    pub address: EndpointAddress,
    /// Relative weight (default 1, at least 1).
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// Priority level (default 0, the first used): a level serves only
    /// while every level before it has no healthy endpoint.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub priority: u32,
}

/// Where an endpoint is: an IP address, or a DNS name resolved at run time.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum EndpointAddress {
    /// An IP address and port.
    Ip(SocketAddr),
    /// A DNS name and port.
    Name {
        /// The name, lower case, without a trailing dot.
        host: String,
        /// The port.
        port: u16,
    },
}

impl EndpointAddress {
    /// The port.
    pub fn port(&self) -> u16 {
        match self {
            EndpointAddress::Ip(addr) => addr.port(),
            EndpointAddress::Name { port, .. } => *port,
        }
    }

    /// The address, when it is an IP address.
    pub fn ip(&self) -> Option<SocketAddr> {
        match self {
            EndpointAddress::Ip(addr) => Some(*addr),
            EndpointAddress::Name { .. } => None,
        }
    }
}

impl From<SocketAddr> for EndpointAddress {
    fn from(addr: SocketAddr) -> Self {
        EndpointAddress::Ip(addr)
    }
}

impl std::fmt::Display for EndpointAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EndpointAddress::Ip(addr) => addr.fmt(f),
            EndpointAddress::Name { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

impl std::str::FromStr for EndpointAddress {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        if let Ok(addr) = text.parse::<SocketAddr>() {
            return Ok(EndpointAddress::Ip(addr));
        }
        let bad = || format!("\"{text}\" is not ip:port or name:port");
        let (host, port) = text.rsplit_once(':').ok_or_else(bad)?;
        let port = port.parse::<u16>().map_err(|_| bad())?;
        let host = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
        // RFC 1123 labels; `_` too, as service names in DNS often have it.
        let valid = !host.is_empty()
            && host.len() <= 253
            && host.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && !label.starts_with('-')
                    && !label.ends_with('-')
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            });
        // A last label of digits only is a mistyped IP address, not a name.
        let numeric = host
            .rsplit('.')
            .next()
            .is_some_and(|l| l.bytes().all(|b| b.is_ascii_digit()));
        if !valid || numeric {
            return Err(bad());
        }
        Ok(EndpointAddress::Name { host, port })
    }
}

impl Serialize for EndpointAddress {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for EndpointAddress {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

fn default_weight() -> u32 {
    1
}

/// Connection pool settings.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PoolFile {
    /// Idle connections kept per endpoint.
    pub max_idle_per_endpoint: usize,
    /// Idle connections are closed after this long.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
}

impl Default for PoolFile {
    fn default() -> Self {
        Self {
            max_idle_per_endpoint: 64,
            idle_timeout: Duration::from_secs(90),
        }
    }
}

/// Circuit breaker thresholds (Envoy's defaults).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CircuitBreakerFile {
    /// Upstream connections open at once across the cluster.
    pub max_connections: usize,
    /// Requests waiting for a connection at once.
    pub max_pending_requests: usize,
    /// Requests in flight at once.
    pub max_requests: usize,
    /// Retries in flight at once.
    pub max_retries: usize,
}

impl Default for CircuitBreakerFile {
    fn default() -> Self {
        Self {
            max_connections: 1024,
            max_pending_requests: 1024,
            max_requests: 1024,
            max_retries: 3,
        }
    }
}

/// Retry budget (Envoy's `retry_budget`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryBudgetFile {
    /// Retries in flight may be at most this percent of requests in flight.
    pub budget_percent: f64,
    /// Retries always allowed in flight, whatever the percentage says.
    pub min_retry_concurrency: usize,
}

impl Default for RetryBudgetFile {
    fn default() -> Self {
        Self {
            budget_percent: 20.0,
            min_retry_concurrency: 3,
        }
    }
}

/// Passive outlier detection.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutlierDetectionFile {
    /// Consecutive 5xx answers (or resets) that eject an endpoint; 0 disables.
    pub consecutive_5xx: u32,
    /// Consecutive connect failures that eject an endpoint; 0 disables.
    pub consecutive_connect_failures: u32,
    /// First ejection time; the nth ejection lasts n times this.
    #[serde(with = "humantime_serde")]
    pub base_ejection_time: Duration,
    /// Longest ejection.
    #[serde(with = "humantime_serde")]
    pub max_ejection_time: Duration,
    /// At most this percent of endpoints ejected at once (at least one may be).
    pub max_ejection_percent: u32,
}

impl Default for OutlierDetectionFile {
    fn default() -> Self {
        Self {
            consecutive_5xx: 5,
            consecutive_connect_failures: 5,
            base_ejection_time: Duration::from_secs(30),
            max_ejection_time: Duration::from_secs(300),
            max_ejection_percent: 10,
        }
    }
}

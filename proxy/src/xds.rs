//! The xDS source of config: resources from the ADS client are translated
//! (`config::xds`), merged with the static part of the bootstrap, validated
//! as one config, and applied. An update that fails any step is NACKed and
//! the last good config keeps serving.
//!
//! Warming: a listener waiting for its RouteConfiguration (or, for edge
//! TLS, its SDS Secrets) and a cluster
//! waiting for its ClusterLoadAssignment (or the SDS Secrets its TLS
//! names) are left out of the running config until what they need has
//! arrived.
//!
//! Each complete config applied is saved (`last_known_good`) when the
//! bootstrap names a state directory; if the control plane has delivered
//! nothing complete within `xds.initial_fetch_timeout`, the saved one is
//! replayed through the same path, and live updates replace it as they
//! come.

pub mod last_known_good;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use postern_proto::envoy::config::cluster::v3::Cluster;
use postern_proto::envoy::config::endpoint::v3::ClusterLoadAssignment;
use postern_proto::envoy::config::listener::v3::Listener;
use postern_proto::envoy::config::route::v3::RouteConfiguration;
use postern_proto::type_url;
use postern_xds::{Handler, Resource, ResourceError, StatusHandle, Subscriptions, Update};

use crate::app::Runtime;
use crate::config::file::SdsSourceFile;
use crate::config::file::{ClusterFile, ConfigFile, EndpointFile};
use crate::config::xds::{self as translate, EndpointSource, Problems, RouteSource, SecretValue};
use crate::config::{Config, FieldError};
use postern_certs::SdsSource;
use postern_proto::envoy::extensions::transport_sockets::tls::v3::Secret;

/// A listener as translated, and whether it binds its address.
#[derive(Debug, Clone)]
struct Translated {
    listener: translate::TranslatedListener,
    binds: bool,
}

#[derive(Debug, Clone)]
struct Entry<T> {
    /// Shared, so copying the tables per update (to keep them if the apply
    /// fails) and keeping the versions that run copy pointers only.
    value: Arc<T>,
    version: String,
    updated: SystemTime,
}

type Table<T> = BTreeMap<String, Entry<T>>;

/// Accepted dynamic resources, by type and name.
#[derive(Debug, Clone, Default)]
struct Resources {
    /// Listeners, where their routes come from, and whether they bind.
    listeners: Table<Translated>,
    routes: Table<translate::RouteConfigFile>,
    clusters: Table<(ClusterFile, EndpointSource)>,
    endpoints: Table<Vec<EndpointFile>>,
    /// Secrets, for edge listeners (never saved: they hold private keys).
    secrets: Table<SecretValue>,
    /// Types that have had at least one accepted update.
    seen: BTreeSet<&'static str>,
    /// The accepted resources as they came, for the last-known-good file.
    raw: last_known_good::RawResources,
    /// Types whose tables hold a replayed last-known-good config: the
    /// first live update of such a type replaces the whole table.
    replayed: BTreeSet<&'static str>,
    /// The versions running now; one stands in for a newer version that
    /// waits for what it needs.
    warm: Warm,
}

/// The listener and cluster versions a config runs, by name.
#[derive(Debug, Clone, Default)]
struct Warm {
    listeners: BTreeMap<String, Arc<Translated>>,
    clusters: BTreeMap<String, Arc<(ClusterFile, EndpointSource)>>,
}

/// A config assembled from the bootstrap and the dynamic resources.
#[derive(Debug)]
struct Assembled {
    file: ConfigFile,
    /// Whether some resource is still waiting for what it needs.
    warming: bool,
    /// The versions `file` holds.
    warm: Warm,
}

/// The names of the listeners and clusters of an assembled config, in
/// order.
#[derive(Debug)]
struct Places {
    listeners: Vec<String>,
    clusters: Vec<String>,
}

/// The type name under which faults of the bootstrap's own resources are
/// recorded.
const BOOTSTRAP: &str = "bootstrap";

/// Why an update was refused, per resource.
#[derive(Debug)]
struct Rejections(Vec<Rejection>);

/// One refused resource.
#[derive(Debug)]
struct Rejection {
    error: ResourceError,
    /// The resource's type when it may differ from the update's: a check
    /// of the whole config can find fault with any resource.
    type_url: Option<&'static str>,
    /// Found checking the whole config: the next accepted update of the
    /// refused update's type clears it, as well as the resource's own.
    whole_config: bool,
}

impl Rejection {
    fn of_config(type_url: Option<&'static str>, name: &str, reason: String) -> Rejection {
        Rejection {
            error: ResourceError {
                name: name.to_string(),
                reason,
            },
            type_url,
            whole_config: true,
        }
    }
}

impl From<Vec<ResourceError>> for Rejections {
    /// Faults of the update's own resources, found translating them.
    fn from(errors: Vec<ResourceError>) -> Rejections {
        Rejections(
            errors
                .into_iter()
                .map(|error| Rejection {
                    error,
                    type_url: None,
                    whole_config: false,
                })
                .collect(),
        )
    }
}

/// A pending NACK of one resource, for `/config_dump`.
#[derive(Debug)]
struct Nack {
    reason: String,
    /// Found checking the whole config when an update of this type was
    /// refused: the next accepted update of the type supersedes it.
    whole_config: Option<String>,
}

/// Where the running dynamic config came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    /// Nothing complete yet.
    Waiting,
    /// The control plane.
    Live,
    /// The saved last-known-good config.
    LastKnownGood,
}

/// Sets `postern_config_source`: 1 for `current` (`static`, `xds`,
/// `last_known_good`), 0 for the others.
pub fn report_config_source(current: Option<&'static str>) {
    for source in ["static", "xds", "last_known_good"] {
        let value = if Some(source) == current { 1.0 } else { 0.0 };
        metrics::gauge!(crate::telemetry::metrics::CONFIG_SOURCE, "source" => source).set(value);
    }
}

/// Applies xDS updates to a running proxy.
pub struct XdsHandler {
    base: ConfigFile,
    /// Where SDS secrets for the workload identity go, and their names.
    sds: Option<(Arc<SdsSource>, SdsSourceFile)>,
    /// The secret names TLS contexts may use for the workload identity;
    /// `None` without an identity.
    tls_names: Option<SdsSourceFile>,
    runtime: Arc<Runtime>,
    state: Mutex<Resources>,
    /// Pending NACKs by resource type and name.
    nacks: Mutex<BTreeMap<(String, String), Nack>>,
    subscriptions: OnceLock<Subscriptions>,
    status: OnceLock<StatusHandle>,
    last_known_good: Option<last_known_good::Store>,
    source: Mutex<Source>,
    /// Held for a whole apply (and a whole replay): each one copies the
    /// state, changes it and writes it back, so two at once would lose one.
    serial: Mutex<()>,
}

impl std::fmt::Debug for XdsHandler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XdsHandler").finish_non_exhaustive()
    }
}

impl XdsHandler {
    /// A handler that merges dynamic resources into `base` (the bootstrap's
    /// static part) and applies the result to `runtime`. `sds`: where SDS
    /// secrets go, for an SDS identity; `tls_names`: the secret names that
    /// mean the workload identity in TLS contexts, for any identity.
    pub fn new(
        base: ConfigFile,
        runtime: Arc<Runtime>,
        sds: Option<(Arc<SdsSource>, SdsSourceFile)>,
        tls_names: Option<SdsSourceFile>,
    ) -> Arc<XdsHandler> {
        runtime.set_config_ready(false);
        report_config_source(None);
        let last_known_good = base.state_dir.as_ref().map(|dir| {
            let node = base.node.as_ref().map_or("", |n| n.id.as_str());
            last_known_good::Store::new(dir, node)
        });
        Arc::new(XdsHandler {
            base,
            sds,
            tls_names,
            runtime,
            state: Mutex::new(Resources::default()),
            nacks: Mutex::new(BTreeMap::new()),
            subscriptions: OnceLock::new(),
            status: OnceLock::new(),
            last_known_good,
            source: Mutex::new(Source::Waiting),
            serial: Mutex::new(()),
        })
    }

    /// After `after`, serves the last-known-good config if the control
    /// plane has not delivered a complete one by then (and there is a
    /// saved one).
    pub fn start_fallback(self: &Arc<Self>, after: Duration) {
        if self.last_known_good.is_none() {
            return;
        }
        let handler = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            handler.serve_last_known_good();
        });
    }

    /// Replays the saved config unless a live one is complete already.
    /// Returns whether the proxy now serves it.
    pub fn serve_last_known_good(&self) -> bool {
        let Some(store) = &self.last_known_good else {
            return false;
        };
        if self.source.lock().map_or(true, |s| *s != Source::Waiting) {
            return false;
        }
        let saved = match store.load() {
            Ok(Some(saved)) => saved,
            Ok(None) => {
                tracing::info!(
                    path = %store.path().display(),
                    "no complete config from the control plane yet, and no last-known-good config saved"
                );
                return false;
            }
            Err(err) => {
                tracing::warn!(error = %err, "cannot use the last-known-good config");
                return false;
            }
        };
        // Live updates wait until the replay is done; it must not land in
        // the middle of one either.
        let serial = self.serial.lock().unwrap_or_else(|e| e.into_inner());
        if self.source.lock().map_or(true, |s| *s != Source::Waiting) {
            return false;
        }
        let seen = self
            .state
            .lock()
            .map(|s| s.seen.clone())
            .unwrap_or_default();
        let mut failed = false;
        for (kind, resources) in saved.types {
            // A type the control plane has already sent stays live.
            if seen.contains(kind) {
                continue;
            }
            let update = Update::State {
                version_info: String::new(),
                resources,
            };
            if let Err(errors) = self.apply_serial(&serial, kind, update, true) {
                for e in errors.0 {
                    tracing::warn!(type_url = kind, resource = %e.error.name, reason = %e.error.reason, "last-known-good resource rejected");
                }
                failed = true;
            }
            if let Ok(mut state) = self.state.lock() {
                state.replayed.insert(kind);
            }
        }
        drop(serial);
        let serving = matches!(self.source.lock().as_deref(), Ok(Source::LastKnownGood));
        let saved_at = humantime::format_rfc3339_seconds(saved.saved_at);
        if serving {
            tracing::warn!(
                %saved_at,
                failed,
                "the control plane has not delivered a complete config; serving the last-known-good one"
            );
        } else {
            tracing::warn!(%saved_at, "the last-known-good config is not complete; still waiting for the control plane");
        }
        serving
    }

    /// Connects the handler to its client, for RDS/EDS subscriptions and
    /// the per-type status in `/config_dump`.
    pub fn attach(&self, subscriptions: Subscriptions, status: StatusHandle) {
        subscriptions.set(type_url::LISTENER, Vec::new());
        subscriptions.set(type_url::CLUSTER, Vec::new());
        if let Some((_, names)) = &self.sds {
            subscriptions.set(
                type_url::SECRET,
                vec![names.certificate.clone(), names.validation.clone()],
            );
        }
        let _ = self.subscriptions.set(subscriptions);
        let _ = self.status.set(status);
    }

    fn translate_all<T>(
        resources: &[Resource],
        convert: impl Fn(&Resource) -> Result<T, Problems>,
    ) -> Result<Vec<(String, String, T)>, Vec<ResourceError>> {
        let mut out = Vec::new();
        let mut errors = Vec::new();
        for resource in resources {
            match convert(resource) {
                Ok(value) => out.push((resource.name.clone(), resource.version.clone(), value)),
                Err(problems) => errors.push(ResourceError {
                    name: resource.name.clone(),
                    reason: problems.join("; "),
                }),
            }
        }
        if errors.is_empty() {
            Ok(out)
        } else {
            Err(errors)
        }
    }

    fn merge<T>(
        table: &mut Table<T>,
        update: Vec<(String, String, T)>,
        removed: &[String],
        replace_all: bool,
    ) {
        let now = SystemTime::now();
        if replace_all {
            table.clear();
        }
        for name in removed {
            table.remove(name);
        }
        for (name, version, value) in update {
            table.insert(
                name,
                Entry {
                    value: Arc::new(value),
                    version,
                    updated: now,
                },
            );
        }
    }

    /// The config to run: static resources plus every warm dynamic one,
    /// and whether something is still warming. A listener or cluster whose
    /// new version waits for what it needs (its RouteConfiguration,
    /// ClusterLoadAssignment or Secrets) keeps serving its last warm
    /// version meanwhile. An inbound capture listener whose filter chains
    /// name a cluster that does not lead to the app is an error naming the
    /// listener and the field.
    fn assemble(&self, state: &Resources) -> Result<Assembled, Rejections> {
        let mut file = self.base.clone();
        let mut warming = false;
        let mut warm = Warm::default();
        // ORIGINAL_DST clusters have no endpoints of their own: only capture
        // listeners use them, by name.
        let mut original_dst = BTreeSet::new();
        for (name, entry) in &state.clusters {
            let versions = std::iter::once(&entry.value).chain(state.warm.clusters.get(name));
            let mut served = None;
            for (stand_in, version) in versions.enumerate().map(|(i, v)| (i > 0, v)) {
                let (cluster, source) = &**version;
                let mut cluster = cluster.clone();
                match source {
                    EndpointSource::Eds(service) => match state.endpoints.get(service) {
                        Some(endpoints) => cluster.endpoints = (*endpoints.value).clone(),
                        None => {
                            warming = true;
                            continue;
                        }
                    },
                    EndpointSource::OriginalDst => {
                        original_dst.insert(cluster.name.clone());
                    }
                    EndpointSource::Inline => {}
                }
                let secret = |n: &str| state.secrets.get(n).map(|e| (*e.value).clone());
                match translate::fill_cluster_secrets(&mut cluster, &secret) {
                    Ok(true) => {}
                    Ok(false) => {
                        warming = true;
                        continue;
                    }
                    // The old version was accepted with what it needs: a
                    // fault now only means it cannot stand in, as for
                    // listeners below.
                    Err(_) if stand_in => continue,
                    Err(reason) => {
                        return Err(Rejections(vec![Rejection::of_config(
                            Some(type_url::CLUSTER),
                            name,
                            reason,
                        )]))
                    }
                }
                served = Some((cluster, version));
                break;
            }
            let Some((cluster, version)) = served else {
                continue;
            };
            warm.clusters.insert(name.clone(), version.clone());
            if !matches!(version.1, EndpointSource::OriginalDst) {
                file.clusters.push(cluster);
            }
        }
        let original_dst: BTreeSet<&str> = original_dst.iter().map(String::as_str).collect();
        let mut virtuals = Vec::new();
        for (name, entry) in &state.listeners {
            let mut served = None;
            match self.warm_listener(state, &file, &original_dst, name, &entry.value)? {
                Some(listener) => served = Some((listener, &entry.value)),
                None => {
                    warming = true;
                    if let Some(old) = state.warm.listeners.get(name) {
                        // The old version was accepted with what it needs:
                        // a fault now only means it cannot stand in.
                        if let Ok(Some(listener)) =
                            self.warm_listener(state, &file, &original_dst, name, old)
                        {
                            served = Some((listener, old));
                        }
                    }
                }
            }
            let Some((listener, version)) = served else {
                continue;
            };
            warm.listeners.insert(name.clone(), version.clone());
            if version.binds {
                file.listeners.push(listener);
            } else {
                virtuals.push(listener);
            }
        }
        translate::attach_virtual_listeners(&mut file.listeners, &virtuals);
        let mut rejections = Vec::new();
        for listener in &file.listeners {
            // A listener's chains route as listeners of their own; the
            // reason then names the chain.
            let found =
                translate::original_dst_reference(std::slice::from_ref(listener), &original_dst)
                    .or_else(|| {
                        listener.filter_chains.iter().find_map(|chain| {
                            let reason = translate::original_dst_reference(
                                std::slice::from_ref(&*chain.listener),
                                &original_dst,
                            )?;
                            let head = format!("listener {}: ", listener.name);
                            Some(reason.replacen(&head, &format!("{head}{}.", chain.name), 1))
                        })
                    });
            if let Some(reason) = found {
                rejections.push(Rejection::of_config(
                    Some(type_url::LISTENER),
                    &listener.name,
                    reason,
                ));
            }
        }
        if !rejections.is_empty() {
            return Err(Rejections(rejections));
        }
        Ok(Assembled {
            file,
            warming,
            warm,
        })
    }

    /// `version` of listener `name` as it runs, or `None` while what it
    /// needs has not arrived.
    fn warm_listener(
        &self,
        state: &Resources,
        file: &ConfigFile,
        original_dst: &BTreeSet<&str>,
        name: &str,
        version: &Translated,
    ) -> Result<Option<crate::config::file::ListenerFile>, Rejections> {
        let translated = &version.listener;
        let fault = |reason: String| {
            Rejections(vec![Rejection::of_config(
                Some(type_url::LISTENER),
                name,
                reason,
            )])
        };
        for target in &translated.app_targets {
            let endpoints = file
                .clusters
                .iter()
                .find(|c| c.name == target.cluster)
                .map(|c| c.endpoints.as_slice());
            let is_original_dst = original_dst.contains(target.cluster.as_str());
            if endpoints.is_none() && !is_original_dst {
                // Not arrived (or not warm) yet: the listener waits.
                return Ok(None);
            }
            translate::check_app_target(target, is_original_dst, endpoints.unwrap_or(&[]))
                .map_err(fault)?;
        }
        let mut listener = translated.file.clone();
        if let RouteSource::Rds(routes) = &translated.routes {
            match state.routes.get(routes) {
                Some(routes) => routes.value.apply_to(&mut listener),
                None => return Ok(None),
            }
        }
        // Each chain routed by RDS warms until its own routes arrive.
        for (chain, routes) in &translated.chain_routes {
            let Some(chain) = listener.filter_chains.get_mut(*chain) else {
                continue;
            };
            match state.routes.get(routes) {
                Some(routes) => routes.value.apply_to(&mut chain.listener),
                None => return Ok(None),
            }
        }
        let secret = |n: &str| state.secrets.get(n).map(|e| (*e.value).clone());
        match translate::fill_edge_secrets(&mut listener, &translated.edge_secrets, &secret) {
            Ok(true) => Ok(Some(listener)),
            Ok(false) => Ok(None),
            Err(reason) => Err(fault(reason)),
        }
    }

    /// The Envoy resources behind the errors of a config assembled from
    /// `state`: `listeners[i]` and `clusters[i]` are positions in the
    /// assembled config, which the control plane never saw.
    fn attribute(warm: &Warm, places: &Places, errors: Vec<FieldError>) -> Rejections {
        let mut by_resource: BTreeMap<(&'static str, String), Vec<String>> = BTreeMap::new();
        for error in errors {
            let (kind, name, field) = origin(warm, places, &error.path);
            by_resource
                .entry((kind, name))
                .or_default()
                .push(format!("{field}: {}", error.reason));
        }
        Rejections(
            by_resource
                .into_iter()
                .map(|((kind, name), reasons)| {
                    Rejection::of_config(Some(kind), &name, reasons.join("; "))
                })
                .collect(),
        )
    }

    /// The secrets edge listeners and cluster TLS name.
    fn edge_secret_names(state: &Resources) -> BTreeSet<String> {
        let clusters = state
            .clusters
            .values()
            .map(|e| &*e.value)
            .chain(state.warm.clusters.values().map(|v| &**v))
            .flat_map(|(file, _)| translate::cluster_secret_names(file));
        Self::listener_versions(state)
            .flat_map(|t| t.listener.edge_secrets.iter().map(|s| s.name.clone()))
            .chain(clusters)
            .collect()
    }

    /// Every listener version in the state and running: what they need
    /// stays subscribed until the newer versions are warm.
    fn listener_versions(state: &Resources) -> impl Iterator<Item = &Translated> {
        state
            .listeners
            .values()
            .map(|e| &*e.value)
            .chain(state.warm.listeners.values().map(|v| &**v))
    }

    fn wanted(state: &Resources) -> (Vec<String>, Vec<String>) {
        let routes: BTreeSet<String> = Self::listener_versions(state)
            .flat_map(|t| {
                let own = match &t.listener.routes {
                    RouteSource::Rds(name) => Some(name.clone()),
                    _ => None,
                };
                let chains = t.listener.chain_routes.iter().map(|(_, n)| n.clone());
                own.into_iter().chain(chains)
            })
            .collect();
        let endpoints: BTreeSet<String> = state
            .clusters
            .values()
            .map(|e| &*e.value)
            .chain(state.warm.clusters.values().map(|v| &**v))
            .filter_map(|(_, source)| match source {
                EndpointSource::Eds(name) => Some(name.clone()),
                EndpointSource::Inline | EndpointSource::OriginalDst => None,
            })
            .collect();
        (
            routes.into_iter().collect(),
            endpoints.into_iter().collect(),
        )
    }

    fn apply(&self, type_url: &str, update: Update) -> Result<(), Rejections> {
        let serial = self.serial.lock().unwrap_or_else(|e| e.into_inner());
        self.apply_serial(&serial, type_url, update, false)
    }

    /// Applies one update; `_serial` proves no other apply runs.
    /// `replaying`: the update comes from the last-known-good file (it is
    /// not saved again).
    fn apply_serial(
        &self,
        _serial: &std::sync::MutexGuard<'_, ()>,
        type_url: &str,
        update: Update,
        replaying: bool,
    ) -> Result<(), Rejections> {
        let (resources, removed, replace_all) = match update {
            Update::State { resources, .. } => {
                // State of the world: LDS and CDS carry everything, so what
                // is missing is gone; RDS and EDS carry what was asked for.
                let all = type_url == type_url::LISTENER || type_url == type_url::CLUSTER;
                (resources, Vec::new(), all)
            }
            Update::Delta { added, removed, .. } => (added, removed, false),
        };
        let sds_names = self.tls_names.as_ref();
        let mut state = match self.state.lock() {
            Ok(state) => state.clone(),
            Err(_) => return Err(internal("state lock poisoned")),
        };
        // What a replay left behind goes as soon as the control plane
        // speaks for the type.
        let was_replayed = !replaying && state.replayed.remove(type_url);
        let replace_all = replace_all || was_replayed;
        let kind: &'static str = match type_url {
            type_url::LISTENER => {
                // gRPC access loggers name a cluster; the bootstrap's static
                // clusters are the ones known before any CDS arrives.
                let log_clusters = |name: &str| {
                    self.base
                        .clusters
                        .iter()
                        .find(|c| c.name == name)
                        .and_then(|c| c.endpoints.first())
                        .map(|e| format!("http://{}", e.address))
                };
                let converted = Self::translate_all(&resources, |r| {
                    let listener = translate::decode::<Listener>(&r.body, type_url::LISTENER)?;
                    Ok(Translated {
                        listener: translate::listener_parts(&listener, sds_names, &log_clusters)?,
                        binds: translate::binds_to_port(&listener),
                    })
                })?;
                Self::merge(&mut state.listeners, converted, &removed, replace_all);
                type_url::LISTENER
            }
            type_url::ROUTE => {
                let converted = Self::translate_all(&resources, |r| {
                    translate::route_configuration(&translate::decode::<RouteConfiguration>(
                        &r.body,
                        type_url::ROUTE,
                    )?)
                })?;
                Self::merge(&mut state.routes, converted, &removed, replace_all);
                type_url::ROUTE
            }
            type_url::CLUSTER => {
                let converted = Self::translate_all(&resources, |r| {
                    translate::cluster(
                        &translate::decode::<Cluster>(&r.body, type_url::CLUSTER)?,
                        sds_names,
                    )
                })?;
                Self::merge(&mut state.clusters, converted, &removed, replace_all);
                type_url::CLUSTER
            }
            type_url::SECRET => {
                let converted = Self::translate_all(&resources, |r| {
                    translate::secret(&translate::decode::<Secret>(&r.body, type_url::SECRET)?)
                })?;
                self.identity_secrets(&converted, &removed);
                let edge = Self::edge_secret_names(&state);
                let touched = converted
                    .iter()
                    .map(|(name, ..)| name)
                    .chain(&removed)
                    .any(|name| edge.contains(name));
                Self::merge(&mut state.secrets, converted, &removed, false);
                if !touched {
                    // Only the identity's: nothing to re-assemble.
                    if let Ok(mut current) = self.state.lock() {
                        current.secrets = state.secrets;
                    }
                    return Ok(());
                }
                type_url::SECRET
            }
            type_url::ENDPOINT => {
                let converted = Self::translate_all(&resources, |r| {
                    translate::load_assignment(&translate::decode::<ClusterLoadAssignment>(
                        &r.body,
                        type_url::ENDPOINT,
                    )?)
                })?;
                Self::merge(&mut state.endpoints, converted, &removed, replace_all);
                type_url::ENDPOINT
            }
            other => return Err(internal(&format!("resource type {other} is not supported"))),
        };
        state.seen.insert(kind);
        // Secrets hold private keys: never written to disk.
        if kind != type_url::SECRET {
            let raw = state.raw.entry(kind).or_default();
            if replace_all {
                raw.clear();
            }
            for name in &removed {
                raw.remove(name);
            }
            for resource in resources {
                raw.insert(resource.name.clone(), resource);
            }
        }

        let Assembled {
            file,
            warming,
            warm,
        } = self.assemble(&state)?;
        // Errors name fields by their place in the assembled config; the
        // NACK must name the resources.
        let places = Places {
            listeners: file.listeners.iter().map(|l| l.name.clone()).collect(),
            clusters: file.clusters.iter().map(|c| c.name.clone()).collect(),
        };
        let config = Config::from_dynamic_model(file)
            .map_err(|err| Self::attribute(&warm, &places, err.field_errors()))?;
        // A config that cannot run (a port taken) changes nothing: the
        // state stays as it was, or the next update of any type would
        // apply it anyway.
        self.runtime.apply(config).map_err(start_failure)?;
        state.warm = warm;
        let (routes, endpoints) = Self::wanted(&state);
        let mut secrets = Self::edge_secret_names(&state);
        let ready = state.seen.contains(type_url::LISTENER)
            && state.seen.contains(type_url::CLUSTER)
            && !warming;
        // A live update's status is published by `on_update` once its NACKs
        // are settled; a replay of the saved config has no such caller.
        let replay_status = replaying.then(|| dynamic_status(&state));
        let to_save =
            (ready && !replaying && self.last_known_good.is_some()).then(|| state.raw.clone());
        if let Ok(mut current) = self.state.lock() {
            *current = state;
        }
        if let Some(subscriptions) = self.subscriptions.get() {
            // An empty list would mean "everything": unsubscribe instead.
            if let Some((_, names)) = &self.sds {
                secrets.insert(names.certificate.clone());
                secrets.insert(names.validation.clone());
            }
            let secrets = secrets.into_iter().collect();
            for (kind, names) in [
                (type_url::ROUTE, routes),
                (type_url::ENDPOINT, endpoints),
                (type_url::SECRET, secrets),
            ] {
                if names.is_empty() {
                    subscriptions.remove(kind);
                } else {
                    subscriptions.set(kind, names);
                }
            }
        }
        if ready {
            self.runtime.set_config_ready(true);
            self.note_complete(replaying, to_save);
        }
        if let Some(status) = replay_status {
            self.publish_status(status);
        }
        Ok(())
    }

    /// Records that a complete config runs, where it came from, and saves
    /// a live one as the last-known-good config.
    fn note_complete(&self, replaying: bool, to_save: Option<last_known_good::RawResources>) {
        let source = if replaying {
            Source::LastKnownGood
        } else {
            Source::Live
        };
        let previous = match self.source.lock() {
            Ok(mut current) => std::mem::replace(&mut *current, source),
            Err(_) => source,
        };
        if previous != source {
            match source {
                Source::LastKnownGood => {
                    report_config_source(Some("last_known_good"));
                    self.runtime.set_config_note(Some(
                        "serving the last-known-good config; the control plane has not delivered one yet"
                            .into(),
                    ));
                }
                _ => {
                    report_config_source(Some("xds"));
                    self.runtime.set_config_note(None);
                    if previous == Source::LastKnownGood {
                        tracing::info!(
                            "the control plane's config replaces the last-known-good one"
                        );
                    }
                }
            }
        }
        if let (Some(store), Some(raw)) = (&self.last_known_good, to_save) {
            if let Err(err) = store.save(&raw) {
                tracing::warn!(error = %err, "last-known-good config not saved");
            }
        }
    }

    /// The identity's secrets go straight to its rotation loop, which
    /// checks them as a whole (chain to bundle, key to certificate).
    fn identity_secrets(&self, converted: &[(String, String, SecretValue)], removed: &[String]) {
        let Some((source, names)) = &self.sds else {
            return;
        };
        for name in removed {
            if *name == names.certificate || *name == names.validation {
                // Keep serving with what is installed: a removed secret is
                // not a reason to drop the identity mid-flight.
                tracing::warn!(secret = %name, "SDS secret removed; keeping the installed identity");
            }
        }
        source.update(|secrets| {
            for (name, _, value) in converted {
                match value {
                    SecretValue::Certificate(chain, key) if *name == names.certificate => {
                        secrets.certificate = Some((chain.clone(), key.clone()));
                    }
                    SecretValue::Validation(bundle) if *name == names.validation => {
                        secrets.validation = Some(bundle.clone());
                    }
                    _ => tracing::debug!(secret = %name, "SDS secret not used by the identity"),
                }
            }
        });
    }

    fn publish_status(&self, mut status: serde_json::Value) {
        if let Some(handle) = self.status.get() {
            status["types"] = handle
                .snapshot()
                .into_iter()
                .map(|t| {
                    serde_json::json!({
                        "type_url": t.type_url,
                        "version": t.version,
                        "last_update": t.last_update.map(unix_seconds),
                        "last_nack": t.last_nack,
                    })
                })
                .collect();
        }
        if let Ok(nacks) = self.nacks.lock() {
            status["last_nack_by_resource"] = nacks
                .iter()
                .map(|((_, name), nack)| (name.clone(), nack.reason.clone().into()))
                .collect::<serde_json::Map<_, _>>()
                .into();
        }
        if let Ok(source) = self.source.lock() {
            status["source"] = match *source {
                Source::Waiting => "waiting",
                Source::Live => "xds",
                Source::LastKnownGood => "last_known_good",
            }
            .into();
        }
        self.runtime.set_dynamic_status(status);
    }
}

/// The type and name of the resource a field of the assembled config
/// came from, and the field's path within it.
fn origin(warm: &Warm, places: &Places, path: &str) -> (&'static str, String, String) {
    let indexed = |prefix: &str| -> Option<(usize, String)> {
        let rest = path.strip_prefix(prefix)?;
        let (index, field) = rest.split_once(']')?;
        Some((
            index.parse().ok()?,
            field.trim_start_matches('.').to_string(),
        ))
    };
    if let Some((i, field)) = indexed("listeners[") {
        if let Some(listener) = places.listeners.get(i) {
            let served = warm.listeners.get(listener);
            let rds = served.and_then(|t| match &t.listener.routes {
                RouteSource::Rds(routes) => Some(routes.clone()),
                _ => None,
            });
            let from_routes =
                field.starts_with("virtual_hosts") || field.starts_with("http.headers");
            // A chain's routes came by RDS under the chain's own name.
            let chain_rds = field
                .strip_prefix("filter_chains[")
                .and_then(|rest| rest.split_once("].listener."))
                .and_then(|(c, inner)| {
                    let c: usize = c.parse().ok()?;
                    let from_routes =
                        inner.starts_with("virtual_hosts") || inner.starts_with("http.headers");
                    let routes = served?
                        .listener
                        .chain_routes
                        .iter()
                        .find(|(chain, _)| *chain == c)?;
                    from_routes.then(|| (routes.1.clone(), inner.to_string()))
                });
            if let Some((routes, inner)) = chain_rds {
                return (type_url::ROUTE, routes, inner);
            }
            return match rds {
                Some(routes) if from_routes => (type_url::ROUTE, routes, field),
                _ if served.is_some() => (type_url::LISTENER, listener.clone(), field),
                _ => (BOOTSTRAP, listener.clone(), field),
            };
        }
    }
    if let Some((i, field)) = indexed("clusters[") {
        if let Some(cluster) = places.clusters.get(i) {
            let served = warm.clusters.get(cluster);
            let eds = served.and_then(|served| match &served.1 {
                EndpointSource::Eds(service) => Some(service.clone()),
                _ => None,
            });
            return match eds {
                Some(service) if field.starts_with("endpoints") => {
                    (type_url::ENDPOINT, service, field)
                }
                _ if served.is_some() => (type_url::CLUSTER, cluster.clone(), field),
                _ => (BOOTSTRAP, cluster.clone(), field),
            };
        }
    }
    (BOOTSTRAP, "(bootstrap)".to_string(), path.to_string())
}

fn unix_seconds(time: SystemTime) -> u64 {
    time.duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

/// A refusal that concerns no one resource.
fn internal(reason: &str) -> Rejections {
    Rejections(vec![Rejection::of_config(
        None,
        "(update)",
        reason.to_string(),
    )])
}

/// A config that passed validation but could not run: the listeners that
/// could not start, by name.
fn start_failure(err: anyhow::Error) -> Rejections {
    match err.downcast_ref::<crate::listener::manager::ListenerStartError>() {
        Some(failed) => Rejections(
            failed
                .0
                .iter()
                .map(|(name, reason)| {
                    Rejection::of_config(Some(type_url::LISTENER), name, reason.clone())
                })
                .collect(),
        ),
        None => internal(&format!("{err:#}")),
    }
}

fn table_status<T>(table: &Table<T>) -> serde_json::Value {
    table
        .iter()
        .map(|(name, e)| {
            (
                name.clone(),
                serde_json::json!({ "version": e.version, "last_update": unix_seconds(e.updated) }),
            )
        })
        .collect::<serde_json::Map<_, _>>()
        .into()
}

fn dynamic_status(state: &Resources) -> serde_json::Value {
    serde_json::json!({
        "listeners": table_status(&state.listeners),
        "routes": table_status(&state.routes),
        "clusters": table_status(&state.clusters),
        "endpoints": table_status(&state.endpoints),
        // Versions and update times only: a secret's value never leaves.
        "secrets": table_status(&state.secrets),
    })
}

impl Handler for XdsHandler {
    fn on_update(&self, type_url: &str, update: Update) -> Result<(), Vec<ResourceError>> {
        let (names, removed, replace_all): (BTreeSet<String>, Vec<String>, bool) = match &update {
            Update::State { resources, .. } => (
                resources.iter().map(|r| r.name.clone()).collect(),
                Vec::new(),
                type_url == type_url::LISTENER || type_url == type_url::CLUSTER,
            ),
            Update::Delta { added, removed, .. } => (
                added.iter().map(|r| r.name.clone()).collect(),
                removed.clone(),
                false,
            ),
        };
        let result = self.apply(type_url, update);
        match result {
            Ok(()) => {
                tracing::info!(type_url, "xDS update applied");
                if let Ok(mut nacks) = self.nacks.lock() {
                    nacks.retain(|(kind, name), nack| {
                        // What was refused with an update of this type has
                        // been superseded by one that runs.
                        if nack.whole_config.as_deref() == Some(type_url) {
                            return false;
                        }
                        // An accepted or removed resource has no pending
                        // NACK any more; state of the world removes every
                        // resource of its type it does not carry.
                        kind != type_url
                            || !(names.contains(name) || removed.contains(name) || replace_all)
                    });
                }
                if let Ok(state) = self.state.lock() {
                    self.publish_status(dynamic_status(&state));
                }
                Ok(())
            }
            Err(Rejections(rejections)) => {
                // One entry per resource, so the NACK names each once.
                let mut errors: Vec<ResourceError> = Vec::new();
                for rejection in rejections {
                    let e = &rejection.error;
                    tracing::warn!(type_url, resource = %e.name, reason = %e.reason, "xDS update rejected");
                    if let Ok(mut nacks) = self.nacks.lock() {
                        let kind = rejection.type_url.unwrap_or(type_url);
                        nacks.insert(
                            (kind.to_string(), e.name.clone()),
                            Nack {
                                reason: e.reason.clone(),
                                whole_config: rejection.whole_config.then(|| type_url.to_string()),
                            },
                        );
                    }
                    match errors.iter_mut().find(|known| known.name == e.name) {
                        Some(known) => {
                            known.reason.push_str("; ");
                            known.reason.push_str(&e.reason);
                        }
                        None => errors.push(rejection.error),
                    }
                }
                if let Ok(state) = self.state.lock() {
                    self.publish_status(dynamic_status(&state));
                }
                Err(errors)
            }
        }
    }

    fn on_connection(&self, connected: bool) {
        tracing::info!(connected, "xDS stream");
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use metrics_util::debugging::{DebugValue, DebuggingRecorder};

    #[test]
    fn config_source_gauge_marks_one_source() {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        metrics::with_local_recorder(&recorder, || {
            super::report_config_source(Some("xds"));
            super::report_config_source(Some("last_known_good"));
        });
        let mut values: Vec<(String, f64)> = snapshotter
            .snapshot()
            .into_vec()
            .into_iter()
            .map(|(key, _, _, value)| {
                let source = key.key().labels().next().unwrap().value().to_string();
                let DebugValue::Gauge(value) = value else {
                    panic!("not a gauge");
                };
                (source, value.into_inner())
            })
            .collect();
        values.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(
            values,
            [
                ("last_known_good".to_string(), 1.0),
                ("static".to_string(), 0.0),
                ("xds".to_string(), 0.0)
            ]
        );
    }
}

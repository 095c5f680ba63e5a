//! `postern inject`: adds the Postern sidecar to Kubernetes workloads.
//!
//! The pod template of each Deployment, StatefulSet, DaemonSet, Job,
//! CronJob and Pod gets two init containers, first in line: `postern-init`
//! (runs `postern iptables` to capture the pod's TCP, then exits) and
//! `postern-proxy` (the proxy as a native sidecar, `restartPolicy: Always`,
//! so it starts before and stops after the app), plus their volumes and the
//! `postern.dev/status` annotation that marks the pod as done. The app
//! containers' `httpGet`, `tcpSocket` and `grpc` probes are pointed at the
//! sidecar's status port, which runs them against the app on loopback
//! ([`super::app_probe`]): under capture with strict mTLS the kubelet's
//! plaintext probes would otherwise be refused. Everything
//! else round-trips as generic YAML, unknown fields included; comments are
//! lost. Other kinds pass through untouched.
//!
//! The same pod edit serves the command line ([`inject_yaml`]) and the
//! admission webhook ([`inject_pod`], [`json_patch`]). No I/O here besides
//! what [`run_cli`] reads and prints.

use std::fmt::Write as _;
use std::path::PathBuf;

use serde_yaml_ng::{Mapping, Value};

use super::app_probe::{
    GrpcSpec, HeaderSpec, HttpGetSpec, PortSpec, ProbeMap, ProbeSpec, APP_HEALTH_PREFIX,
    APP_PROBES_ENV,
};
use super::iptables::{CidrList, PortList};

/// Set on the pod template once injected; holds the version and what was added.
pub const STATUS_ANNOTATION: &str = "postern.dev/status";
/// `"false"` leaves the pod alone.
pub const INJECT_ANNOTATION: &str = "postern.dev/inject";
/// Ports whose traffic the proxy must not sniff for a protocol.
pub const OPAQUE_PORTS_ANNOTATION: &str = "postern.dev/opaque-ports";
/// Inbound ports never captured.
pub const EXCLUDE_INBOUND_PORTS_ANNOTATION: &str = "postern.dev/exclude-inbound-ports";
/// Outbound destination ports never captured.
pub const EXCLUDE_OUTBOUND_PORTS_ANNOTATION: &str = "postern.dev/exclude-outbound-ports";
/// Outbound destination CIDRs never captured.
pub const EXCLUDE_OUTBOUND_CIDRS_ANNOTATION: &str = "postern.dev/exclude-outbound-cidrs";
/// The proxy's CPU request and limit.
pub const PROXY_CPU_ANNOTATION: &str = "postern.dev/proxy-cpu";
/// The proxy's memory request and limit.
pub const PROXY_MEMORY_ANNOTATION: &str = "postern.dev/proxy-memory";
/// The proxy's log filter (`RUST_LOG`).
pub const LOG_LEVEL_ANNOTATION: &str = "postern.dev/log-level";
/// `"false"` leaves the app containers' kubelet probes as they are.
pub const REWRITE_PROBES_ANNOTATION: &str = "postern.dev/rewrite-app-probes";

/// The capture init container.
pub const INIT_CONTAINER: &str = "postern-init";
/// The sidecar.
pub const PROXY_CONTAINER: &str = "postern-proxy";
/// The sidecar's writable directory.
pub const STATE_VOLUME: &str = "postern-state";
/// The projected service-account token the CA checks.
pub const TOKEN_VOLUME: &str = "postern-token";
/// A writable `/run` for the init container: iptables' lock file lives there.
pub const XTABLES_LOCK_VOLUME: &str = "postern-xtables-lock";

/// UID and GID of the proxy, excluded from capture.
pub const PROXY_UID: u32 = 1337;
/// The proxy's admin address: loopback only, as it serves `POST /drain`.
pub const ADMIN_ADDRESS: &str = "127.0.0.1:15000";
/// The sidecar's status port: plaintext on the pod IP, never captured, where
/// the app's rewritten kubelet probes arrive (Istio's number).
pub const STATUS_PORT: u16 = 15020;
/// The status server's address in the sidecar: IPv6 and IPv4 (IPv4 only
/// where the pod has no IPv6).
pub const STATUS_ADDRESS: &str = "[::]:15020";
/// Where the service-account token is mounted.
pub const TOKEN_DIR: &str = "/var/run/secrets/tokens";
/// Where the state volume is mounted.
pub const STATE_DIR: &str = "/var/run/postern";
/// The binary's path in both images.
pub const BINARY: &str = "/usr/local/bin/postern";

/// Errors of `postern inject`.
#[derive(Debug, thiserror::Error)]
pub enum InjectError {
    /// The input could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file, or `stdin`.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A document is not valid YAML.
    #[error("document {index}: invalid YAML: {source}")]
    Yaml {
        /// Its position in the stream, from 1.
        index: usize,
        /// The parser's error, with line and column.
        #[source]
        source: serde_yaml_ng::Error,
    },
    /// A document could not be written back.
    #[error("document {index}: cannot write YAML: {source}")]
    Emit {
        /// Its position in the stream, from 1.
        index: usize,
        /// The emitter's error.
        #[source]
        source: serde_yaml_ng::Error,
    },
    /// An annotation on the pod template has a value that cannot be used.
    #[error("{object}: annotation {annotation}: {value:?} {reason}")]
    Annotation {
        /// The workload, e.g. `Deployment shop/web`.
        object: String,
        /// The annotation's name.
        annotation: &'static str,
        /// Its value.
        value: String,
        /// Why it is refused.
        reason: String,
    },
    /// The workload is not shaped as its kind requires.
    #[error("{object}: {reason}")]
    Shape {
        /// The workload.
        object: String,
        /// What is wrong.
        reason: String,
    },
}

/// What the injection needs to know besides the manifests.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct InjectOptions {
    /// The proxy image.
    #[arg(long, default_value = "postern:latest")]
    pub image: String,
    /// The capture init container's image (the same binary plus iptables).
    #[arg(long, default_value = "postern-init:latest")]
    pub init_image: String,
    /// The control plane the sidecars connect to (POSTERN_XDS_ADDRESS).
    #[arg(
        long,
        default_value = "http://postern-control.postern-system.svc:15010"
    )]
    pub xds_address: String,
    /// Audience of the projected service-account token presented to the CA.
    #[arg(long, default_value = "istio-ca")]
    pub ca_audience: String,
}

impl Default for InjectOptions {
    fn default() -> Self {
        InjectOptions {
            image: "postern:latest".into(),
            init_image: "postern-init:latest".into(),
            xds_address: "http://postern-control.postern-system.svc:15010".into(),
            ca_audience: "istio-ca".into(),
        }
    }
}

/// What happened to one pod template.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The sidecar was added.
    Injected,
    /// It carries `postern.dev/status` already; left as it is.
    AlreadyInjected,
    /// `postern.dev/inject: "false"`.
    Disabled,
    /// `hostNetwork: true`: capture rules would rewrite the node's own
    /// network, so such pods are never injected.
    HostNetwork,
}

impl Outcome {
    fn describe(self) -> &'static str {
        match self {
            Outcome::Injected => "injected",
            Outcome::AlreadyInjected => "unchanged (already injected)",
            Outcome::Disabled => "skipped (postern.dev/inject: \"false\")",
            Outcome::HostNetwork => "skipped (hostNetwork pods are never injected)",
        }
    }
}

/// One workload seen in the input and what was done to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// `Kind namespace/name`.
    pub object: String,
    /// What was done.
    pub outcome: Outcome,
}

/// The per-pod settings read from the pod template's annotations.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct PodSettings {
    opaque_ports: Option<String>,
    exclude_inbound_ports: Option<String>,
    exclude_outbound_ports: Option<String>,
    exclude_outbound_cidrs: Option<String>,
    cpu: Option<String>,
    memory: Option<String>,
    log_level: Option<String>,
}

/// Injects every workload in a multi-document YAML stream and writes the
/// stream back, documents in the same order.
///
/// # Errors
///
/// The first document that does not parse, or the first workload with an
/// unusable annotation; nothing is written then.
pub fn inject_yaml(
    input: &str,
    options: &InjectOptions,
) -> Result<(String, Vec<Report>), InjectError> {
    let mut out = String::new();
    let mut reports = Vec::new();
    let mut written = 0;
    for (i, document) in serde_yaml_ng::Deserializer::from_str(input).enumerate() {
        let index = i + 1;
        let mut value: Value = serde::Deserialize::deserialize(document)
            .map_err(|source| InjectError::Yaml { index, source })?;
        if value.is_null() {
            continue;
        }
        inject_object(&mut value, options, &mut reports)?;
        let text = serde_yaml_ng::to_string(&value)
            .map_err(|source| InjectError::Emit { index, source })?;
        if written > 0 {
            out.push_str("---\n");
        }
        out.push_str(&text);
        written += 1;
    }
    Ok((out, reports))
}

/// Injects one Kubernetes object in place: a workload's pod template, each
/// item of a `List`, nothing for other kinds.
///
/// # Errors
///
/// An unusable annotation, or a workload without a pod template.
pub fn inject_object(
    object: &mut Value,
    options: &InjectOptions,
    reports: &mut Vec<Report>,
) -> Result<(), InjectError> {
    let api_version = object
        .get("apiVersion")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let kind = object
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let group = api_version.rsplit_once('/').map_or("", |(g, _)| g);
    let template_path: &[&str] = match (group, kind.as_str()) {
        ("", "List") => {
            if let Some(Value::Sequence(items)) = object.get_mut("items") {
                for item in items {
                    inject_object(item, options, reports)?;
                }
            }
            return Ok(());
        }
        ("", "Pod") => &[],
        ("apps", "Deployment" | "StatefulSet" | "DaemonSet") | ("batch", "Job") => {
            &["spec", "template"]
        }
        ("batch", "CronJob") => &["spec", "jobTemplate", "spec", "template"],
        _ => return Ok(()),
    };
    let name = describe(object, &kind);
    let mut template = &mut *object;
    for key in template_path {
        template = match template.get_mut(*key) {
            Some(next) if next.is_mapping() => next,
            _ => {
                return Err(InjectError::Shape {
                    object: name,
                    reason: format!("has no {} mapping", template_path.join(".")),
                })
            }
        };
    }
    let outcome = inject_pod(template, options, &name)?;
    reports.push(Report {
        object: name,
        outcome,
    });
    Ok(())
}

/// `Kind namespace/name`, or `Kind name` without a namespace.
fn describe(object: &Value, kind: &str) -> String {
    let meta = object.get("metadata");
    let field = |k: &str| meta.and_then(|m| m.get(k)).and_then(Value::as_str);
    let name = field("name")
        .or_else(|| field("generateName"))
        .unwrap_or("(unnamed)");
    match field("namespace") {
        Some(ns) => format!("{kind} {ns}/{name}"),
        None => format!("{kind} {name}"),
    }
}

/// Injects one pod (or pod template: anything with `metadata` and `spec`).
/// `object` names it in errors.
///
/// # Errors
///
/// An unusable annotation, a `spec` that is not a mapping, or a container
/// or volume already named like one of Postern's.
pub fn inject_pod(
    pod: &mut Value,
    options: &InjectOptions,
    object: &str,
) -> Result<Outcome, InjectError> {
    let shape = |reason: &str| InjectError::Shape {
        object: object.to_owned(),
        reason: reason.to_owned(),
    };
    let annotations = pod
        .get("metadata")
        .and_then(|m| m.get("annotations"))
        .and_then(Value::as_mapping)
        .cloned()
        .unwrap_or_default();
    let annotation = |key: &str| annotations.get(key).and_then(Value::as_str);
    if annotation(STATUS_ANNOTATION).is_some() {
        return Ok(Outcome::AlreadyInjected);
    }
    match annotation(INJECT_ANNOTATION) {
        None | Some("true") => {}
        Some("false") => return Ok(Outcome::Disabled),
        Some(other) => {
            return Err(InjectError::Annotation {
                object: object.to_owned(),
                annotation: INJECT_ANNOTATION,
                value: other.to_owned(),
                reason: "must be \"true\" or \"false\"".into(),
            })
        }
    }
    let settings = read_settings(&annotations, object)?;
    let rewrite = match annotations.get(REWRITE_PROBES_ANNOTATION) {
        None => true,
        Some(Value::Bool(b)) => *b,
        Some(Value::String(s)) if s == "true" => true,
        Some(Value::String(s)) if s == "false" => false,
        Some(other) => {
            return Err(InjectError::Annotation {
                object: object.to_owned(),
                annotation: REWRITE_PROBES_ANNOTATION,
                value: serde_yaml_ng::to_string(other)
                    .unwrap_or_default()
                    .trim()
                    .to_owned(),
                reason: "must be \"true\" or \"false\"".into(),
            })
        }
    };
    let spec = pod
        .get_mut("spec")
        .and_then(Value::as_mapping_mut)
        .ok_or_else(|| shape("spec is not a mapping"))?;
    if spec.get("hostNetwork").and_then(Value::as_bool) == Some(true) {
        return Ok(Outcome::HostNetwork);
    }
    for (list, ours) in [
        ("containers", &[INIT_CONTAINER, PROXY_CONTAINER][..]),
        ("initContainers", &[INIT_CONTAINER, PROXY_CONTAINER][..]),
        (
            "volumes",
            &[STATE_VOLUME, TOKEN_VOLUME, XTABLES_LOCK_VOLUME][..],
        ),
    ] {
        let taken = spec
            .get(list)
            .and_then(Value::as_sequence)
            .into_iter()
            .flatten()
            .filter_map(|item| item.get("name").and_then(Value::as_str))
            .find(|name| ours.contains(name));
        if let Some(name) = taken {
            return Err(shape(&format!(
                "spec.{list} already has {name:?} but no {STATUS_ANNOTATION} annotation; \
                 remove it and inject again"
            )));
        }
    }

    let probes = if rewrite {
        rewrite_probes(spec, object)?
    } else {
        ProbeMap::new()
    };
    let inits = sequence(spec, "initContainers")
        .ok_or_else(|| shape("spec.initContainers is not a list"))?;
    // First in line: the rules must be in place before anything sends, and
    // init containers after the sidecar can already use the mesh.
    inits.splice(
        0..0,
        [
            init_container(options, &settings),
            proxy_container(options, &settings, &probes),
        ],
    );
    let volumes = sequence(spec, "volumes").ok_or_else(|| shape("spec.volumes is not a list"))?;
    volumes.extend(pod_volumes(options));

    let metadata = pod
        .as_mapping_mut()
        .ok_or_else(|| shape("is not a mapping"))?
        .entry("metadata".into())
        .or_insert_with(|| Value::Mapping(Mapping::new()));
    let metadata = metadata
        .as_mapping_mut()
        .ok_or_else(|| shape("metadata is not a mapping"))?;
    let annotations = metadata
        .entry("annotations".into())
        .or_insert_with(|| Value::Mapping(Mapping::new()));
    if annotations.is_null() {
        *annotations = Value::Mapping(Mapping::new());
    }
    annotations
        .as_mapping_mut()
        .ok_or_else(|| shape("metadata.annotations is not a mapping"))?
        .insert(STATUS_ANNOTATION.into(), status_value().into());
    Ok(Outcome::Injected)
}

/// The `postern.dev/status` value: the version and what was added, so a
/// later version can tell what to upgrade or remove.
pub fn status_value() -> String {
    serde_json::json!({
        "version": env!("CARGO_PKG_VERSION"),
        "initContainers": [INIT_CONTAINER, PROXY_CONTAINER],
        "volumes": [STATE_VOLUME, TOKEN_VOLUME, XTABLES_LOCK_VOLUME],
    })
    .to_string()
}

/// The list at `spec[key]`, created when absent or null; `None` if it is
/// something else.
fn sequence<'a>(spec: &'a mut Mapping, key: &str) -> Option<&'a mut Vec<Value>> {
    let value = spec
        .entry(key.into())
        .or_insert_with(|| Value::Sequence(Vec::new()));
    if value.is_null() {
        *value = Value::Sequence(Vec::new());
    }
    value.as_sequence_mut()
}

/// The probes rewritten, by kind: the field and the status path's last part.
const PROBE_KINDS: [(&str, &str); 3] = [
    ("livenessProbe", "livez"),
    ("readinessProbe", "readyz"),
    ("startupProbe", "startupz"),
];

/// Points each app container's `httpGet`, `tcpSocket` and `grpc` probe at
/// the sidecar's status port, keeping its timing fields, and returns the
/// originals by their new path. `exec` probes, and probes with a `host` of
/// their own (they do not reach this pod), are left alone.
fn rewrite_probes(spec: &mut Mapping, object: &str) -> Result<ProbeMap, InjectError> {
    let mut probes = ProbeMap::new();
    let Some(containers) = spec.get_mut("containers").and_then(Value::as_sequence_mut) else {
        return Ok(probes);
    };
    for container in containers {
        let Some(container) = container.as_mapping_mut() else {
            continue;
        };
        let name = container
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        let ports = container.get("ports").cloned();
        for (field, kind) in PROBE_KINDS {
            let Some(probe) = container.get_mut(field).and_then(Value::as_mapping_mut) else {
                continue;
            };
            let refuse = |reason: String| InjectError::Shape {
                object: object.to_owned(),
                reason: format!("container {name:?}: {field}: {reason}"),
            };
            let port = |handler: &Value, key: &str| -> Result<u16, InjectError> {
                resolve_port(handler.get("port"), ports.as_ref())
                    .map_err(|reason| refuse(format!("{key}.port {reason}")))
            };
            let str_of = |handler: &Value, key: &str| {
                handler.get(key).and_then(Value::as_str).map(str::to_owned)
            };
            let original = if let Some(get) = probe.get("httpGet") {
                if get.get("host").is_some() || already_rewritten(get) {
                    continue;
                }
                let http_headers = match get.get("httpHeaders") {
                    None | Some(Value::Null) => Vec::new(),
                    Some(headers) => serde_yaml_ng::from_value::<Vec<HeaderSpec>>(headers.clone())
                        .map_err(|e| refuse(format!("httpGet.httpHeaders {e}")))?,
                };
                ProbeSpec {
                    http_get: Some(HttpGetSpec {
                        path: str_of(get, "path"),
                        port: port(get, "httpGet")?,
                        scheme: str_of(get, "scheme"),
                        http_headers,
                    }),
                    tcp_socket: None,
                    grpc: None,
                    timeout_seconds: 1,
                }
            } else if let Some(tcp) = probe.get("tcpSocket") {
                if tcp.get("host").is_some() {
                    continue;
                }
                ProbeSpec {
                    http_get: None,
                    tcp_socket: Some(PortSpec {
                        port: port(tcp, "tcpSocket")?,
                    }),
                    grpc: None,
                    timeout_seconds: 1,
                }
            } else if let Some(grpc) = probe.get("grpc") {
                ProbeSpec {
                    http_get: None,
                    tcp_socket: None,
                    grpc: Some(GrpcSpec {
                        port: port(grpc, "grpc")?,
                        service: str_of(grpc, "service"),
                    }),
                    timeout_seconds: 1,
                }
            } else {
                continue;
            };
            let timeout_seconds = match probe.get("timeoutSeconds") {
                None | Some(Value::Null) => 1,
                Some(Value::Number(n)) => n
                    .as_u64()
                    .and_then(|n| u32::try_from(n).ok())
                    .filter(|n| *n > 0)
                    .ok_or_else(|| {
                        refuse(format!("timeoutSeconds {n} is not a positive number"))
                    })?,
                Some(_) => return Err(refuse("timeoutSeconds is not a number".into())),
            };
            let path = format!("{APP_HEALTH_PREFIX}{name}/{kind}");
            for handler in ["httpGet", "tcpSocket", "grpc"] {
                probe.remove(handler);
            }
            probe.insert(
                "httpGet".into(),
                map([
                    ("path", string(&path)),
                    ("port", Value::from(STATUS_PORT)),
                    ("scheme", string("HTTP")),
                ]),
            );
            probes.insert(
                path,
                ProbeSpec {
                    timeout_seconds,
                    ..original
                },
            );
        }
    }
    Ok(probes)
}

/// An `httpGet` that already asks the status port for `/app-health/...`.
fn already_rewritten(get: &Value) -> bool {
    get.get("port").and_then(Value::as_u64) == Some(u64::from(STATUS_PORT))
        && get
            .get("path")
            .and_then(Value::as_str)
            .is_some_and(|p| p.starts_with(APP_HEALTH_PREFIX))
}

/// A probe's port: a number, or the name of one of the container's ports
/// (then, as the kubelet does, a number written as a string).
fn resolve_port(port: Option<&Value>, ports: Option<&Value>) -> Result<u16, String> {
    let number = |n: u64| {
        u16::try_from(n)
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| format!("{n} is not a port"))
    };
    match port {
        Some(Value::Number(n)) => n
            .as_u64()
            .ok_or_else(|| format!("{n} is not a port"))
            .and_then(number),
        Some(Value::String(name)) => {
            let named = ports
                .and_then(Value::as_sequence)
                .into_iter()
                .flatten()
                .find(|p| p.get("name").and_then(Value::as_str) == Some(name.as_str()))
                .and_then(|p| p.get("containerPort"))
                .and_then(Value::as_u64);
            match (named, name.parse::<u64>()) {
                (Some(n), _) | (None, Ok(n)) => number(n),
                (None, Err(_)) => Err(format!(
                    "{name:?} is not the name of one of the container's ports"
                )),
            }
        }
        _ => Err("is missing".into()),
    }
}

fn read_settings(annotations: &Mapping, object: &str) -> Result<PodSettings, InjectError> {
    let get = |key: &'static str,
               check: &dyn Fn(&str) -> Result<(), String>|
     -> Result<Option<String>, InjectError> {
        let Some(value) = annotations.get(key) else {
            return Ok(None);
        };
        let text = match value {
            Value::String(s) => s.trim().to_owned(),
            // `postern.dev/exclude-inbound-ports: 22` arrives as a number.
            Value::Number(n) => n.to_string(),
            _ => String::new(),
        };
        let refuse = |reason: String| InjectError::Annotation {
            object: object.to_owned(),
            annotation: key,
            value: text.clone(),
            reason,
        };
        if text.is_empty() {
            return Err(refuse("must be a non-empty string".into()));
        }
        check(&text).map_err(refuse)?;
        Ok(Some(text.split_whitespace().collect()))
    };
    let ports = |s: &str| {
        s.parse::<PortList>()
            .map(drop)
            .map_err(|e| format!("is not a port list: {e}"))
    };
    let cidrs = |s: &str| {
        s.parse::<CidrList>()
            .map(drop)
            .map_err(|e| format!("is not a CIDR list: {e}"))
    };
    Ok(PodSettings {
        opaque_ports: get(OPAQUE_PORTS_ANNOTATION, &ports)?,
        exclude_inbound_ports: get(EXCLUDE_INBOUND_PORTS_ANNOTATION, &ports)?,
        exclude_outbound_ports: get(EXCLUDE_OUTBOUND_PORTS_ANNOTATION, &ports)?,
        exclude_outbound_cidrs: get(EXCLUDE_OUTBOUND_CIDRS_ANNOTATION, &cidrs)?,
        cpu: get(PROXY_CPU_ANNOTATION, &check_quantity)?,
        memory: get(PROXY_MEMORY_ANNOTATION, &check_quantity)?,
        log_level: get(LOG_LEVEL_ANNOTATION, &check_log_filter)?,
    })
}

/// Accepts a Kubernetes resource quantity: `250m`, `0.5`, `128Mi`, `1e3`.
fn check_quantity(s: &str) -> Result<(), String> {
    let refuse = || Err("is not a Kubernetes quantity like 250m, 1 or 128Mi".to_owned());
    let digits_end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, suffix) = s.split_at(digits_end);
    let valid_number = !number.is_empty()
        && number != "."
        && number.matches('.').count() <= 1
        && number.chars().any(|c| c.is_ascii_digit());
    let valid_suffix = matches!(
        suffix,
        "" | "m" | "k" | "M" | "G" | "T" | "P" | "E" | "Ki" | "Mi" | "Gi" | "Ti" | "Pi" | "Ei"
    ) || suffix
        .strip_prefix(['e', 'E'])
        .map(|exp| exp.strip_prefix(['+', '-']).unwrap_or(exp))
        .is_some_and(|exp| !exp.is_empty() && exp.chars().all(|c| c.is_ascii_digit()));
    if valid_number && valid_suffix {
        Ok(())
    } else {
        refuse()
    }
}

/// Accepts a `tracing` filter such as `debug` or `info,postern::http=trace`.
fn check_log_filter(s: &str) -> Result<(), String> {
    if s.chars()
        .all(|c| c.is_ascii_alphanumeric() || "_:=,.-[]{}\"".contains(c))
    {
        Ok(())
    } else {
        Err("is not a log filter like debug or info,postern=trace".into())
    }
}

/// A YAML mapping with keys in the order given, so the output reads well.
fn map<const N: usize>(pairs: [(&str, Value); N]) -> Value {
    Value::Mapping(pairs.into_iter().map(|(k, v)| (k.into(), v)).collect())
}

fn string(s: &str) -> Value {
    Value::String(s.to_owned())
}

fn strings<'a>(items: impl IntoIterator<Item = &'a str>) -> Value {
    Value::Sequence(items.into_iter().map(string).collect())
}

fn env_field(name: &str, path: &str) -> Value {
    map([
        ("name", string(name)),
        (
            "valueFrom",
            map([("fieldRef", map([("fieldPath", string(path))]))]),
        ),
    ])
}

fn env_value(name: &str, value: &str) -> Value {
    map([("name", string(name)), ("value", string(value))])
}

fn init_container(options: &InjectOptions, settings: &PodSettings) -> Value {
    let uid = PROXY_UID.to_string();
    let mut args = vec![
        "iptables",
        "--proxy-uid",
        &uid,
        "--proxy-gid",
        &uid,
        "--outbound-port",
        "15001",
        "--inbound-port",
        "15006",
    ];
    // The kubelet reaches the status port in plaintext: it must not meet
    // the inbound listener's mTLS.
    let inbound_excluded = match &settings.exclude_inbound_ports {
        Some(ports) => format!("{STATUS_PORT},{ports}"),
        None => STATUS_PORT.to_string(),
    };
    args.extend(["--exclude-inbound-ports", inbound_excluded.as_str()]);
    for (flag, value) in [
        ("--exclude-outbound-ports", &settings.exclude_outbound_ports),
        ("--exclude-outbound-cidrs", &settings.exclude_outbound_cidrs),
    ] {
        if let Some(value) = value {
            args.extend([flag, value.as_str()]);
        }
    }
    map([
        ("name", string(INIT_CONTAINER)),
        ("image", string(&options.init_image)),
        ("args", strings(args)),
        (
            "resources",
            map([
                (
                    "requests",
                    map([("cpu", string("10m")), ("memory", string("16Mi"))]),
                ),
                (
                    "limits",
                    map([("cpu", string("100m")), ("memory", string("64Mi"))]),
                ),
            ]),
        ),
        (
            "securityContext",
            map([
                // Writing netfilter rules takes root with NET_ADMIN (and
                // NET_RAW for the raw socket iptables opens); nothing more.
                ("runAsUser", Value::from(0)),
                ("runAsGroup", Value::from(0)),
                ("runAsNonRoot", Value::from(false)),
                ("privileged", Value::from(false)),
                ("allowPrivilegeEscalation", Value::from(false)),
                ("readOnlyRootFilesystem", Value::from(true)),
                (
                    "capabilities",
                    map([
                        ("add", strings(["NET_ADMIN", "NET_RAW"])),
                        ("drop", strings(["ALL"])),
                    ]),
                ),
            ]),
        ),
        (
            "volumeMounts",
            Value::Sequence(vec![map([
                ("name", string(XTABLES_LOCK_VOLUME)),
                ("mountPath", string("/run")),
            ])]),
        ),
    ])
}

fn proxy_container(options: &InjectOptions, settings: &PodSettings, probes: &ProbeMap) -> Value {
    let mut env = vec![
        env_field("POD_NAME", "metadata.name"),
        env_field("POD_NAMESPACE", "metadata.namespace"),
        env_field("SERVICE_ACCOUNT", "spec.serviceAccountName"),
        env_field("INSTANCE_IP", "status.podIP"),
        // Istio's node id layout, so istiod can serve Postern unchanged.
        env_value(
            "POSTERN_NODE_ID",
            "sidecar~$(INSTANCE_IP)~$(POD_NAME).$(POD_NAMESPACE)~$(POD_NAMESPACE).svc.cluster.local",
        ),
        env_value("POSTERN_XDS_ADDRESS", &options.xds_address),
        env_value("POSTERN_ADMIN_ADDRESS", ADMIN_ADDRESS),
        // The last-known-good config outlives a restart of the proxy
        // container, not of the pod: that is what an emptyDir keeps.
        env_value("POSTERN_STATE_DIR", STATE_DIR),
        env_value("POSTERN_STATUS_ADDRESS", STATUS_ADDRESS),
    ];
    if !probes.is_empty() {
        // A map of plain structs always serializes.
        let json = serde_json::to_string(probes).unwrap_or_default();
        env.push(env_value(APP_PROBES_ENV, &json));
    }
    if let Some(level) = &settings.log_level {
        env.push(env_value("RUST_LOG", level));
    }
    if let Some(ports) = &settings.opaque_ports {
        env.push(env_value("POSTERN_OPAQUE_PORTS", ports));
    }
    let mut requests = Mapping::new();
    let mut limits = Mapping::new();
    requests.insert(
        "cpu".into(),
        string(settings.cpu.as_deref().unwrap_or("100m")),
    );
    if let Some(cpu) = &settings.cpu {
        limits.insert("cpu".into(), string(cpu));
    }
    let memory = settings.memory.as_deref();
    requests.insert("memory".into(), string(memory.unwrap_or("64Mi")));
    limits.insert("memory".into(), string(memory.unwrap_or("256Mi")));
    let port = |name: &str, port: u16| {
        map([
            ("name", string(name)),
            ("containerPort", Value::from(port)),
            ("protocol", string("TCP")),
        ])
    };
    // kubelet probes connect to the pod IP, but the admin server stays on
    // loopback (it can drain the proxy), so the probes run wait-ready inside
    // the container instead of an httpGet.
    let probe = |period: u32, failures: u32| {
        map([
            (
                "exec",
                map([(
                    "command",
                    strings([
                        BINARY,
                        "wait-ready",
                        "--admin-address",
                        ADMIN_ADDRESS,
                        "--timeout",
                        "1s",
                    ]),
                )]),
            ),
            ("periodSeconds", Value::from(period)),
            ("timeoutSeconds", Value::from(3)),
            ("failureThreshold", Value::from(failures)),
        ])
    };
    map([
        ("name", string(PROXY_CONTAINER)),
        ("image", string(&options.image)),
        ("restartPolicy", string("Always")),
        ("args", strings(["run"])),
        ("env", Value::Sequence(env)),
        (
            "ports",
            Value::Sequence(vec![
                port("postern-admin", 15000),
                port("postern-out", 15001),
                port("postern-in", 15006),
                port("postern-status", STATUS_PORT),
            ]),
        ),
        (
            "resources",
            map([
                ("requests", Value::Mapping(requests)),
                ("limits", Value::Mapping(limits)),
            ]),
        ),
        (
            "securityContext",
            map([
                ("runAsUser", Value::from(PROXY_UID)),
                ("runAsGroup", Value::from(PROXY_UID)),
                ("runAsNonRoot", Value::from(true)),
                ("privileged", Value::from(false)),
                ("allowPrivilegeEscalation", Value::from(false)),
                ("readOnlyRootFilesystem", Value::from(true)),
                ("capabilities", map([("drop", strings(["ALL"]))])),
                ("seccompProfile", map([("type", string("RuntimeDefault"))])),
            ]),
        ),
        // Gates the app containers: kubelet starts them once this passes.
        ("startupProbe", probe(1, 300)),
        ("readinessProbe", probe(5, 3)),
        (
            "volumeMounts",
            Value::Sequence(vec![
                map([
                    ("name", string(STATE_VOLUME)),
                    ("mountPath", string(STATE_DIR)),
                ]),
                map([
                    ("name", string(TOKEN_VOLUME)),
                    ("mountPath", string(TOKEN_DIR)),
                    ("readOnly", Value::from(true)),
                ]),
            ]),
        ),
    ])
}

fn pod_volumes(options: &InjectOptions) -> [Value; 3] {
    [
        map([("name", string(STATE_VOLUME)), ("emptyDir", map([]))]),
        map([
            ("name", string(TOKEN_VOLUME)),
            (
                "projected",
                map([(
                    "sources",
                    Value::Sequence(vec![map([(
                        "serviceAccountToken",
                        map([
                            ("audience", string(&options.ca_audience)),
                            ("expirationSeconds", Value::from(43200)),
                            ("path", string("postern-token")),
                        ]),
                    )])]),
                )]),
            ),
        ]),
        map([("name", string(XTABLES_LOCK_VOLUME)), ("emptyDir", map([]))]),
    ]
}

/// The RFC 6902 patch that turns `before` into `after`, one `add` or
/// `replace` per changed field of `metadata` and `spec`: what the injection
/// changes, and coarse enough that the API server applies it exactly.
pub fn json_patch(before: &Value, after: &Value) -> serde_json::Value {
    let mut ops = Vec::new();
    for section in ["metadata", "spec"] {
        let (old, new) = (before.get(section), after.get(section));
        match (
            old.and_then(Value::as_mapping),
            new.and_then(Value::as_mapping),
        ) {
            (Some(old), Some(new)) => {
                for (key, value) in new {
                    let Some(key) = key.as_str() else { continue };
                    let op = match old.get(key) {
                        Some(prev) if prev == value => continue,
                        Some(_) => "replace",
                        None => "add",
                    };
                    ops.push(serde_json::json!({
                        "op": op,
                        "path": format!("/{section}/{}", escape_pointer(key)),
                        "value": to_json(value),
                    }));
                }
            }
            (None, Some(_)) => ops.push(serde_json::json!({
                "op": "add",
                "path": format!("/{section}"),
                "value": new.map(to_json),
            })),
            _ => {}
        }
    }
    serde_json::Value::Array(ops)
}

fn to_json(value: &Value) -> serde_json::Value {
    // A YAML value parsed from JSON always converts back.
    serde_json::to_value(value).unwrap_or(serde_json::Value::Null)
}

/// Escapes a key for a JSON pointer (RFC 6901): `~` and `/`.
fn escape_pointer(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

/// `postern inject`: flags, or the webhook subcommand.
#[derive(Debug, Clone, clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct InjectArgs {
    /// Serve the injection as an admission webhook instead.
    #[command(subcommand)]
    pub command: Option<InjectCommand>,
    /// Manifests to read (`-` or absent: stdin).
    #[arg(short = 'f', long = "filename")]
    pub file: Option<PathBuf>,
    /// Injection settings.
    #[command(flatten)]
    pub options: InjectOptions,
}

/// Subcommands of `postern inject`.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum InjectCommand {
    /// A mutating admission webhook over HTTPS that injects pods as they are created.
    Webhook(super::webhook::WebhookArgs),
}

/// Runs `postern inject` on a file or stdin: the manifests go to stdout, a
/// line per workload to stderr.
///
/// # Errors
///
/// The input cannot be read, or [`inject_yaml`] fails.
pub fn run_cli(
    file: Option<&std::path::Path>,
    options: &InjectOptions,
) -> Result<String, InjectError> {
    let (input, path) = match file.filter(|p| p.as_os_str() != "-") {
        Some(path) => (std::fs::read_to_string(path), path.display().to_string()),
        None => (std::io::read_to_string(std::io::stdin()), "stdin".into()),
    };
    let input = input.map_err(|source| InjectError::Read { path, source })?;
    let (output, reports) = inject_yaml(&input, options)?;
    let mut log = String::new();
    for report in reports {
        let _ = writeln!(log, "{}: {}", report.object, report.outcome.describe());
    }
    eprint!("{log}");
    Ok(output)
}

#[cfg(test)]
mod tests;

//! Capture listeners (`kind: capture`): the ports iptables redirects a
//! pod's traffic to. The serde types of their `capture` block, and their
//! compiled form: the service table an outbound listener routes by
//! original destination, the ports never sniffed, and the connection-level
//! policy of an inbound listener.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::file::{ListenerFile, RbacFile, VirtualHostFile};
use super::validate::Errors;
use super::HttpListener;
use crate::route::{Forward, RouteAction, RouteMatch, RouteTable, Targets, VirtualHost};
use crate::telemetry::log::TrafficDirection;

/// Default `capture.detection_timeout`: long enough for any client-first
/// protocol's first packet, short enough that a server-first one (MySQL,
/// SMTP) barely notices.
pub const DEFAULT_DETECTION_TIMEOUT: Duration = Duration::from_millis(100);

/// A port or an inclusive range of ports: `8080` or `"9000-9100"` in YAML,
/// `8080,9000-9100` in `POSTERN_OPAQUE_PORTS`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "PortRangeRaw", into = "PortRangeRaw")]
pub struct PortRange {
    /// First port.
    pub first: u16,
    /// Last port, at least `first`.
    pub last: u16,
}

#[derive(Deserialize, Serialize)]
#[serde(untagged)]
enum PortRangeRaw {
    Port(u16),
    Text(String),
}

impl TryFrom<PortRangeRaw> for PortRange {
    type Error = String;

    fn try_from(raw: PortRangeRaw) -> Result<Self, Self::Error> {
        match raw {
            PortRangeRaw::Port(0) => Err("port 0 is not a port".into()),
            PortRangeRaw::Port(p) => Ok(PortRange { first: p, last: p }),
            PortRangeRaw::Text(text) => text.parse(),
        }
    }
}

impl From<PortRange> for PortRangeRaw {
    fn from(range: PortRange) -> Self {
        if range.first == range.last {
            PortRangeRaw::Port(range.first)
        } else {
            PortRangeRaw::Text(range.to_string())
        }
    }
}

impl FromStr for PortRange {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let port = |p: &str| p.trim().parse::<u16>().ok().filter(|p| *p != 0);
        let (first, last) = match s.split_once('-') {
            None => (port(s), port(s)),
            Some((a, b)) => (port(a), port(b)),
        };
        match (first, last) {
            (Some(first), Some(last)) if first <= last => Ok(PortRange { first, last }),
            _ => Err(format!(
                "\"{s}\" is not a port (1-65535) or a range such as 9000-9100"
            )),
        }
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

/// Parses a comma-separated port list (`3306,9000-9100`); empty is allowed.
pub fn parse_port_list(s: &str) -> Result<Vec<PortRange>, String> {
    s.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(PortRange::from_str)
        .collect()
}

/// What an outbound capture listener does with a destination no service
/// matches.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum UnknownDestinations {
    /// Pass the bytes through to the original destination (Istio's
    /// `ALLOW_ANY`).
    #[default]
    Allow,
    /// Close the connection (Istio's `REGISTRY_ONLY`).
    Block,
}

/// How a service's traffic is told apart.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ServiceProtocol {
    /// Sniff the first bytes: HTTP is routed as HTTP, the rest as TCP.
    #[default]
    Auto,
    /// Never sniff: always TCP to `cluster`.
    Opaque,
}

/// The `capture` block of a `kind: capture` listener.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CaptureFile {
    /// `outbound` (the app's calls, from iptables' 15001) or `inbound`
    /// (calls to the app, from 15006).
    pub direction: TrafficDirection,
    /// How long to wait for a client's first bytes before taking the
    /// connection as opaque TCP (default 100ms).
    #[serde(default = "default_detection_timeout", with = "humantime_serde")]
    pub detection_timeout: Duration,
    /// Original destination ports never sniffed: always TCP.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub opaque_ports: Vec<PortRange>,
    /// Outbound: what happens to destinations no service matches.
    #[serde(default)]
    pub unknown_destinations: UnknownDestinations,
    /// Outbound: services by their address, each routed to a cluster.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<CaptureServiceFile>,
    /// Inbound: access control per connection, after mTLS (principals;
    /// `destination_port` is the original port).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rbac: Option<RbacFile>,
    /// A TCP connection with no bytes either way for this long is closed (default 1h).
    #[serde(default = "default_tcp_idle", with = "humantime_serde")]
    pub tcp_idle_timeout: Duration,
    /// Time allowed to connect to an original destination (passthrough)
    /// or to the app (inbound) (default 5s).
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
}

impl CaptureFile {
    /// A capture block for `direction` with every default.
    pub fn new(direction: TrafficDirection) -> CaptureFile {
        CaptureFile {
            direction,
            detection_timeout: default_detection_timeout(),
            opaque_ports: Vec::new(),
            unknown_destinations: UnknownDestinations::default(),
            services: Vec::new(),
            rbac: None,
            tcp_idle_timeout: default_tcp_idle(),
            connect_timeout: default_connect_timeout(),
        }
    }
}

fn default_detection_timeout() -> Duration {
    DEFAULT_DETECTION_TIMEOUT
}

fn default_tcp_idle() -> Duration {
    Duration::from_secs(3600)
}

fn default_connect_timeout() -> Duration {
    Duration::from_secs(5)
}

/// A service an outbound capture listener knows: where its calls go.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CaptureServiceFile {
    /// The address the app calls (a service IP and port). `0.0.0.0:PORT`
    /// (or `[::]:PORT`) matches any IP on that port, after exact matches.
    pub address: SocketAddr,
    /// Where TCP goes, and HTTP too when `virtual_hosts` is empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
    /// HTTP routes for calls to this service; when absent every HTTP
    /// request goes to `cluster`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub virtual_hosts: Vec<VirtualHostFile>,
    /// `auto` (sniff) or `opaque` (always TCP).
    #[serde(default)]
    pub protocol: ServiceProtocol,
}

/// Ports, as sorted inclusive ranges.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PortSet(Vec<(u16, u16)>);

impl PortSet {
    /// The union of `ranges`.
    pub fn new(ranges: impl IntoIterator<Item = PortRange>) -> PortSet {
        let mut list: Vec<(u16, u16)> = ranges.into_iter().map(|r| (r.first, r.last)).collect();
        list.sort_unstable();
        PortSet(list)
    }

    /// Whether `port` is in the set.
    pub fn contains(&self, port: u16) -> bool {
        let after = self.0.partition_point(|(first, _)| *first <= port);
        self.0[..after].iter().any(|(_, last)| *last >= port)
    }
}

/// A compiled capture listener.
#[derive(Debug)]
pub struct CaptureListener {
    /// Which side of the workload it serves.
    pub direction: TrafficDirection,
    /// Wait for a client's first bytes at most this long.
    pub detection_timeout: Duration,
    /// Original ports never sniffed (the listener's and the global ones).
    pub opaque_ports: PortSet,
    /// Outbound: what happens to unknown destinations.
    pub unknown_destinations: UnknownDestinations,
    /// Outbound: services by address.
    pub services: HashMap<SocketAddr, Arc<CaptureService>>,
    /// HTTP settings every HTTP connection of the listener gets (the route
    /// table here is empty: routes come from the service, or inbound from
    /// the original port).
    pub http: HttpListener,
    /// Inbound: connection-level access control.
    pub rbac: Option<Arc<crate::authz::Rbac>>,
    /// Idle timeout of proxied TCP.
    pub tcp_idle_timeout: Duration,
    /// Connect timeout for passthrough and the app.
    pub connect_timeout: Duration,
}

/// Where calls to one service go.
#[derive(Debug)]
pub struct CaptureService {
    /// The service address.
    pub address: SocketAddr,
    /// TCP target, and the default HTTP target.
    pub cluster: Option<Arc<str>>,
    /// HTTP routes; `None` when the service takes no HTTP (no cluster and
    /// no virtual hosts cannot happen: validation refuses it).
    pub routes: Option<Arc<RouteTable>>,
    /// Never sniffed.
    pub opaque: bool,
}

impl CaptureListener {
    /// The service for an original destination: exact address first, then
    /// the unspecified IP of the same family on the same port.
    pub fn service(&self, destination: SocketAddr) -> Option<&Arc<CaptureService>> {
        self.services.get(&destination).or_else(|| {
            let any = match destination {
                SocketAddr::V4(_) => std::net::IpAddr::from([0u8; 4]),
                SocketAddr::V6(_) => std::net::IpAddr::from([0u16; 8]),
            };
            self.services.get(&SocketAddr::new(any, destination.port()))
        })
    }
}

/// A route table that sends every request to `cluster` with no route
/// timeout: a captured call keeps the deadline its caller set.
pub fn forward_all(name: &str, cluster: Arc<str>) -> RouteTable {
    let route = crate::route::Route {
        rate_limit: None,
        rate_limits: Vec::new(),
        jwt: None,
        rbac: None,
        access_log: None,
        name: Arc::from("default"),
        matcher: RouteMatch::default(),
        action: RouteAction::Forward(Forward {
            targets: Targets::Single(cluster),
            timeout: None,
            retry: None,
            rewrite: Default::default(),
            target_headers: Vec::new(),
        }),
        headers: None,
    };
    let vhost = VirtualHost {
        name: Arc::from(name),
        routes: vec![route],
        headers: None,
    };
    RouteTable::new(vec![vhost], &[vec!["*".to_string()]])
}

/// Checks a `kind: capture` listener and compiles its `capture` block;
/// `http` holds the listener's compiled `http` settings.
pub(super) fn build(
    listener: &ListenerFile,
    path: &str,
    global_opaque: &[PortRange],
    http: HttpListener,
    clusters: &HashSet<&str>,
    errors: &mut Errors,
) -> Option<CaptureListener> {
    if !listener.virtual_hosts.is_empty() {
        errors.push(
            format!("{path}.virtual_hosts"),
            "a capture listener routes by service: put virtual hosts under capture.services",
        );
    }
    if listener.tcp.is_some() {
        errors.push(format!("{path}.tcp"), "only tcp listeners take a tcp block");
    }
    if listener.tls.is_some() {
        errors.push(
            format!("{path}.tls"),
            "a capture listener takes no edge TLS (use mtls on an inbound one)",
        );
    }
    let Some(capture) = &listener.capture else {
        errors.push(
            format!("{path}.capture"),
            "a capture listener needs a capture block",
        );
        return None;
    };
    let cpath = format!("{path}.capture");
    if listener
        .traffic_direction
        .is_some_and(|d| d != capture.direction)
    {
        errors.push(
            format!("{path}.traffic_direction"),
            "must match capture.direction (or be left out)",
        );
    }
    if capture.detection_timeout.is_zero() {
        errors.push(format!("{cpath}.detection_timeout"), "must be more than 0");
    }
    for (name, value) in [
        ("tcp_idle_timeout", capture.tcp_idle_timeout),
        ("connect_timeout", capture.connect_timeout),
    ] {
        if value.is_zero() {
            errors.push(format!("{cpath}.{name}"), "must be more than 0");
        }
    }
    let inbound = capture.direction == TrafficDirection::Inbound;
    let mesh = listener
        .mtls
        .as_ref()
        .is_some_and(|m| m.mode != super::file::MtlsMode::Disable);
    if !inbound && mesh {
        errors.push(
            format!("{path}.mtls"),
            "outbound capture listeners take plaintext from the app; mTLS belongs to the clusters",
        );
    }
    if inbound {
        if !capture.services.is_empty() {
            errors.push(
                format!("{cpath}.services"),
                "an inbound capture listener forwards to the app's own port; services are outbound only",
            );
        }
        if capture.unknown_destinations != UnknownDestinations::Allow {
            errors.push(format!("{cpath}.unknown_destinations"), "outbound only");
        }
    } else if capture.rbac.is_some() {
        errors.push(
            format!("{cpath}.rbac"),
            "inbound only: outbound calls come from the app itself",
        );
    }
    let rbac_path = format!("{cpath}.rbac");
    let rbac = capture.rbac.as_ref().map(|rbac| {
        super::rbac::check_connection_level(rbac, &rbac_path, errors);
        super::rbac::build_rbac(rbac, &rbac_path, errors)
    });
    let mut services = HashMap::new();
    for (i, service) in capture.services.iter().enumerate() {
        let spath = format!("{cpath}.services[{i}]");
        if service.address.port() == 0 {
            errors.push(format!("{spath}.address"), "needs a port");
        }
        if let Some(cluster) = &service.cluster {
            if errors.strict_references() && !clusters.contains(cluster.as_str()) {
                errors.push(
                    format!("{spath}.cluster"),
                    format!("unknown cluster \"{cluster}\""),
                );
            }
        }
        let routes = match (&service.cluster, service.virtual_hosts.is_empty()) {
            (None, true) => {
                errors.push(
                    spath.clone(),
                    "a service needs a cluster, virtual hosts, or both",
                );
                None
            }
            (Some(cluster), true) => Some(forward_all(
                &service.address.to_string(),
                Arc::from(cluster.as_str()),
            )),
            (_, false) => {
                if service.protocol == ServiceProtocol::Opaque {
                    errors.push(
                        format!("{spath}.virtual_hosts"),
                        "an opaque service is never HTTP: give it a cluster only",
                    );
                }
                Some(super::validate::build_route_table(
                    &service.virtual_hosts,
                    &spath,
                    clusters,
                    errors,
                ))
            }
        };
        if service.protocol == ServiceProtocol::Opaque && service.cluster.is_none() {
            errors.push(
                format!("{spath}.cluster"),
                "an opaque service needs a cluster",
            );
        }
        let compiled = Arc::new(CaptureService {
            address: service.address,
            cluster: service.cluster.as_deref().map(Arc::from),
            routes: routes.map(Arc::new),
            opaque: service.protocol == ServiceProtocol::Opaque,
        });
        if services.insert(service.address, compiled).is_some() {
            errors.push(
                format!("{spath}.address"),
                format!("{} is listed twice", service.address),
            );
        }
    }
    Some(CaptureListener {
        direction: capture.direction,
        detection_timeout: capture.detection_timeout,
        opaque_ports: PortSet::new(capture.opaque_ports.iter().chain(global_opaque).copied()),
        unknown_destinations: capture.unknown_destinations,
        services,
        http,
        rbac,
        tcp_idle_timeout: capture.tcp_idle_timeout,
        connect_timeout: capture.connect_timeout,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn port_ranges_parse_print_and_match() {
        let list = parse_port_list(" 3306, 9000-9100 ,,25").unwrap();
        assert_eq!(
            list.iter().map(ToString::to_string).collect::<Vec<_>>(),
            ["3306", "9000-9100", "25"]
        );
        let set = PortSet::new(list);
        for (port, inside) in [
            (25, true),
            (26, false),
            (3306, true),
            (8999, false),
            (9000, true),
            (9050, true),
            (9100, true),
            (9101, false),
        ] {
            assert_eq!(set.contains(port), inside, "{port}");
        }
        for bad in ["0", "x", "10-5", "1-", "70000"] {
            assert!(parse_port_list(bad).is_err(), "{bad}");
        }
        assert!(!PortSet::default().contains(80));
    }

    #[test]
    fn port_ranges_in_yaml_are_numbers_or_strings() {
        let parsed: Vec<PortRange> = serde_yaml_ng::from_str("[3306, \"9000-9100\"]").unwrap();
        assert_eq!(parsed, parse_port_list("3306,9000-9100").unwrap());
        assert_eq!(
            serde_json::to_string(&parsed).unwrap(),
            r#"[3306,"9000-9100"]"#
        );
        assert!(serde_yaml_ng::from_str::<Vec<PortRange>>("[0]").is_err());
    }
}

//! Listeners with several filter chains (`filter_chains` in the file
//! model): each chain is compiled as a listener of its own (HTTP or TCP,
//! with its TLS), and the listener around them holds the table that picks
//! one per connection.

use std::borrow::Cow;
use std::sync::Arc;

use super::file::{FilterChainMatchFile, ListenerFile, ListenerKind};
use super::validate::Errors;
use super::{ChainsListener, DrainPhase, Listener, ListenerProtocol, ListenerTls};
use crate::listener::chain_match::{ChainMatch, ChainTable};
use crate::telemetry::log::TrafficDirection;

/// One listener to compile: its field path, its settings, and for a filter
/// chain the listener it belongs to.
pub(super) type Entry<'a> = (String, Cow<'a, ListenerFile>, Option<&'a ListenerFile>);

/// The listeners to compile in order: each listener's chains (named and
/// addressed as it) just before it.
pub(super) fn flatten(listeners: &[ListenerFile]) -> Vec<Entry<'_>> {
    let mut entries = Vec::new();
    for (i, outer) in listeners.iter().enumerate() {
        for (c, chain) in outer.filter_chains.iter().enumerate() {
            let mut inner = (*chain.listener).clone();
            inner.name.clone_from(&outer.name);
            inner.address = outer.address;
            entries.push((
                format!("listeners[{i}].filter_chains[{c}].listener"),
                Cow::Owned(inner),
                Some(outer),
            ));
        }
        entries.push((format!("listeners[{i}]"), Cow::Borrowed(outer), None));
    }
    entries
}

/// What a chain's listener may not be.
pub(super) fn check_chain_listener(inner: &ListenerFile, path: &str, errors: &mut Errors) {
    if inner.kind == ListenerKind::Capture {
        errors.push(
            format!("{path}.kind"),
            "a filter chain is http or tcp, not capture",
        );
    }
    if !inner.filter_chains.is_empty() {
        errors.push(
            format!("{path}.filter_chains"),
            "a filter chain has no filter chains of its own",
        );
    }
}

/// The criteria of a chain, checked.
fn chain_match(m: &FilterChainMatchFile, path: &str, errors: &mut Errors) -> ChainMatch {
    let transport_tls = match m.transport_protocol.as_deref() {
        None | Some("") => None,
        Some("tls") => Some(true),
        Some("raw_buffer") => Some(false),
        Some(other) => {
            errors.push(
                format!("{path}.transport_protocol"),
                format!("\"{other}\" is neither tls nor raw_buffer"),
            );
            None
        }
    };
    for (i, name) in m.server_names.iter().enumerate() {
        if let Err(reason) = check_server_name(name) {
            errors.push(format!("{path}.server_names[{i}]"), reason);
        }
    }
    for (i, alpn) in m.application_protocols.iter().enumerate() {
        if alpn.is_empty() {
            errors.push(format!("{path}.application_protocols[{i}]"), "is empty");
        }
    }
    if m.destination_port == Some(0) {
        errors.push(format!("{path}.destination_port"), "port 0 is not a port");
    }
    ChainMatch {
        destination_port: m.destination_port,
        server_names: m.server_names.clone(),
        transport_tls,
        application_protocols: m.application_protocols.clone(),
    }
}

/// A server name to match: a DNS name, or `*.` and one.
pub(crate) fn check_server_name(name: &str) -> Result<(), String> {
    let bare = name.strip_prefix("*.").unwrap_or(name);
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    if bare.is_empty() || bare.len() > 253 || !bare.split('.').all(label_ok) {
        return Err(format!(
            "\"{name}\" is not a server name (a DNS name, or *. and one)"
        ));
    }
    Ok(())
}

/// The listener around its compiled chains (`chains`, in file order; fewer
/// when one failed, which `errors` then holds).
pub(super) fn build(
    outer: &ListenerFile,
    path: &str,
    chains: Vec<Arc<Listener>>,
    errors: &mut Errors,
) -> Option<Listener> {
    for (field, set) in [
        ("virtual_hosts", !outer.virtual_hosts.is_empty()),
        ("tcp", outer.tcp.is_some()),
        ("capture", outer.capture.is_some()),
        ("mtls", outer.mtls.is_some()),
        ("tls", outer.tls.is_some()),
        ("access_log_service", outer.access_log_service.is_some()),
    ] {
        if set {
            errors.push(
                format!("{path}.{field}"),
                "goes in each of filter_chains[*].listener on a listener with filter chains",
            );
        }
    }
    if outer.kind != ListenerKind::Http {
        errors.push(
            format!("{path}.kind"),
            "each filter chain has its own kind on a listener with filter chains",
        );
    }
    let mut names = std::collections::HashSet::new();
    let mut matched = Vec::new();
    let mut default = None;
    for (c, chain) in outer.filter_chains.iter().enumerate() {
        let cpath = format!("{path}.filter_chains[{c}]");
        if !names.insert(chain.name.as_str()) {
            errors.push(
                format!("{cpath}.name"),
                format!("duplicate filter chain name \"{}\"", chain.name),
            );
        }
        let criteria = chain_match(&chain.matcher, &format!("{cpath}.match"), errors);
        if chain.default {
            if chain.matcher != FilterChainMatchFile::default() {
                errors.push(
                    format!("{cpath}.match"),
                    "the default chain takes what no other chain matches: it has no match",
                );
            }
            if let Some(first) = default.replace(c) {
                errors.push(
                    format!("{cpath}.default"),
                    format!("filter_chains[{first}] is the default chain already"),
                );
            }
        } else {
            matched.push((c, criteria));
        }
    }
    if chains.len() != outer.filter_chains.len() {
        // A chain did not compile; its errors say why.
        return None;
    }
    let mut order: Vec<usize> = matched.iter().map(|(c, _)| *c).collect();
    let matches: Vec<ChainMatch> = matched.into_iter().map(|(_, m)| m).collect();
    let table = match ChainTable::new(&matches) {
        Ok(table) => table,
        Err(dup) => {
            errors.push(
                format!("{path}.filter_chains[{}].match", order[dup.second]),
                format!(
                    "matches the same connections as filter_chains[{}]",
                    order[dup.first]
                ),
            );
            return None;
        }
    };
    let inspect = matches.iter().any(|m| {
        !m.server_names.is_empty()
            || m.transport_tls.is_some()
            || !m.application_protocols.is_empty()
    });
    let default_index = default.map(|c| {
        order.push(c);
        order.len() - 1
    });
    let mut all_matches = matches;
    if default_index.is_some() {
        all_matches.push(ChainMatch::default());
    }
    let mesh = chains
        .iter()
        .any(|l| matches!(l.tls, ListenerTls::Mesh { .. }));
    let app_side = outer.traffic_direction == Some(TrafficDirection::Outbound);
    Some(Listener {
        name: Arc::from(outer.name.as_str()),
        address: outer.address,
        limits: outer.limits.clone(),
        protocol: ListenerProtocol::Chains(ChainsListener {
            table,
            chains: order.iter().map(|&c| chains[c].clone()).collect(),
            names: order
                .iter()
                .map(|&c| Arc::from(outer.filter_chains[c].name.as_str()))
                .collect(),
            matches: all_matches,
            default: default_index,
            inspect,
        }),
        tls: ListenerTls::Off,
        direction: outer.traffic_direction.unwrap_or(if mesh {
            TrafficDirection::Inbound
        } else {
            TrafficDirection::Outbound
        }),
        trace_sampling: outer
            .tracing
            .map_or_else(super::file::default_trace_sampling, |t| t.sampling),
        als: None,
        drain: if app_side {
            DrainPhase::AfterApp
        } else {
            DrainPhase::Immediate
        },
    })
}

#[cfg(test)]
mod tests {
    use crate::config::{Config, ListenerProtocol};

    const CLUSTERS: &str = "clusters: [{ name: db, endpoints: [{ address: 127.0.0.1:9 }] }, { name: web, endpoints: [{ address: 127.0.0.1:9 }] }]";

    #[test]
    fn static_filter_chains_compile_each_chain_as_a_listener() {
        let yaml = format!(
            r#"
listeners:
- name: gw
  address: 127.0.0.1:0
  kind: http
  filter_chains:
  - name: plain
    match: {{ transport_protocol: raw_buffer }}
    listener: {{ name: x, address: "127.0.0.1:1", kind: tcp, tcp: {{ cluster: db }} }}
  - name: web
    default: true
    listener:
      name: x
      address: "127.0.0.1:1"
      kind: http
      virtual_hosts: [{{ name: all, domains: ["*"], routes: [{{ match: {{}}, cluster: web }}] }}]
{CLUSTERS}
"#
        );
        let config = Config::from_yaml(&yaml).unwrap_or_else(|e| panic!("{e}"));
        let ListenerProtocol::Chains(chains) = &config.listeners[0].protocol else {
            panic!("not a listener with chains");
        };
        assert_eq!(chains.default, Some(1));
        assert!(chains.inspect);
        // Each chain is named and addressed as its listener.
        for chain in &chains.chains {
            assert_eq!(&*chain.name, "gw");
            assert_eq!(chain.address, config.listeners[0].address);
        }
        assert!(matches!(
            chains.chains[0].protocol,
            ListenerProtocol::Tcp(_)
        ));
        assert!(matches!(
            chains.chains[1].protocol,
            ListenerProtocol::Http(_)
        ));
    }

    #[test]
    fn bad_filter_chains_are_refused_naming_the_field() {
        let yaml = format!(
            r#"
listeners:
- name: gw
  address: 127.0.0.1:0
  kind: http
  virtual_hosts: [{{ name: all, domains: ["*"], routes: [{{ match: {{}}, cluster: web }}] }}]
  filter_chains:
  - name: a
    match: {{ server_names: ["*x.example.com"], transport_protocol: quic }}
    listener: {{ name: x, address: "127.0.0.1:1", kind: tcp, tcp: {{ cluster: db }} }}
  - name: a
    default: true
    match: {{ transport_protocol: tls }}
    listener: {{ name: x, address: "127.0.0.1:1", kind: tcp, tcp: {{ cluster: db }} }}
- name: gw
  address: 127.0.0.1:0
  kind: tcp
  tcp: {{ cluster: db }}
{CLUSTERS}
"#
        );
        let err = Config::from_yaml(&yaml).unwrap_err().to_string();
        for expected in [
            "listeners[0].virtual_hosts: goes in each of filter_chains[*].listener",
            "listeners[0].filter_chains[0].match.server_names[0]: \"*x.example.com\" is not a server name",
            "listeners[0].filter_chains[0].match.transport_protocol: \"quic\" is neither tls nor raw_buffer",
            "listeners[0].filter_chains[1].name: duplicate filter chain name \"a\"",
            "listeners[0].filter_chains[1].match: the default chain takes what no other chain matches",
            "listeners[1].name: duplicate listener name \"gw\"",
        ] {
            assert!(err.contains(expected), "{expected}\n{err}");
        }
    }
}

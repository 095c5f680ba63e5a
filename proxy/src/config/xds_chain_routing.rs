//! A plain Listener whose filter chains differ (in network filter, routes,
//! HTTP filters or TLS) as the file model's `filter_chains`: each chain
//! keeps its own network filter, routes (inline or by RDS) and
//! DownstreamTlsContext, and its `filter_chain_match` picks it per
//! connection. Listeners whose chains amount to one setting keep going
//! through [`super::chains`], so their shape (and in-place updates) stay as
//! they were.

use super::chains::{classify, edge_tls, ChainTls, EdgeSecret, EdgeSlot};
use super::*;
use crate::config::file::{FilterChainFile, FilterChainMatchFile};
use crate::listener::chain_match::{ChainMatch, ChainTable};

/// What a per-chain listener needs besides its file: the route
/// configurations its chains name (by chain index in `filter_chains`) and
/// the SDS secrets their edge TLS waits for.
pub(super) struct PerChain {
    /// The listener with its `filter_chains`.
    pub file: ListenerFile,
    /// `(chain index, route configuration name)` of the chains routed by RDS.
    pub chain_routes: Vec<(usize, String)>,
    /// The SDS secrets of the chains' edge TLS.
    pub secrets: Vec<EdgeSecret>,
}

/// `l`'s filter chains (then `default_filter_chain`) as chains of `base`.
pub(super) fn per_chain(
    l: &listener::Listener,
    base: &ListenerFile,
    sds: Option<&SdsSourceFile>,
    ctx: &mut Ctx,
    log_clusters: &dyn Fn(&str) -> Option<String>,
) -> PerChain {
    let mut chains: Vec<(String, &listener::FilterChain, bool)> = l
        .filter_chains
        .iter()
        .enumerate()
        .map(|(i, c)| (format!("filter_chains[{i}]"), c, false))
        .collect();
    if let Some(default) = &l.default_filter_chain {
        chains.push(("default_filter_chain".into(), default, true));
    }
    let mut file = base.clone();
    let mut chain_routes = Vec::new();
    let mut secrets = Vec::new();
    let mut criteria: Vec<(String, ChainMatch)> = Vec::new();
    for (c, (cpath, chain, default)) in chains.iter().enumerate() {
        let m = chain.filter_chain_match.clone().unwrap_or_default();
        let mpath = format!("{cpath}.filter_chain_match");
        // Envoy ignores the default chain's match; one that says something is
        // refused rather than silently dropped.
        if *default
            && chain
                .filter_chain_match
                .as_ref()
                .is_some_and(|m| *m != Default::default())
        {
            ctx.unsupported(format!("{mpath} (on the default_filter_chain)"));
        }
        for (field, set) in [
            ("prefix_ranges", !m.prefix_ranges.is_empty()),
            ("address_suffix", !m.address_suffix.is_empty()),
            ("suffix_len", m.suffix_len.is_some()),
            (
                "direct_source_prefix_ranges",
                !m.direct_source_prefix_ranges.is_empty(),
            ),
            ("source_type", m.source_type != 0),
            ("source_prefix_ranges", !m.source_prefix_ranges.is_empty()),
            ("source_ports", !m.source_ports.is_empty()),
        ] {
            if set {
                ctx.unsupported(format!(
                    "{mpath}.{field} (outside an inbound capture listener)"
                ));
            }
        }
        let destination_port = m.destination_port.as_ref().and_then(|p| {
            let port = u16::try_from(p.value).ok().filter(|p| *p != 0);
            if port.is_none() {
                ctx.err(
                    format!("{mpath}.destination_port"),
                    format!("{} is not a port", p.value),
                );
            }
            port
        });
        let transport = match m.transport_protocol.as_str() {
            "" => None,
            "tls" => Some(true),
            "raw_buffer" => Some(false),
            other => {
                ctx.unsupported(format!("{mpath}.transport_protocol \"{other}\""));
                None
            }
        };
        for (i, name) in m.server_names.iter().enumerate() {
            if let Err(reason) = crate::config::chains::check_server_name(name) {
                ctx.err(format!("{mpath}.server_names[{i}]"), reason);
            }
        }

        let mut inner = base.clone();
        let routes = chain_filters(chain, cpath, &mut inner, ctx, log_clusters);
        match routes {
            RouteSource::Rds(name) => chain_routes.push((c, name)),
            RouteSource::Inline | RouteSource::None => {}
        }
        let reads_tls = transport == Some(true)
            || !m.server_names.is_empty()
            || !m.application_protocols.is_empty();
        match &chain.transport_socket {
            None if reads_tls && inner.kind != ListenerKind::Tcp => ctx.err(
                format!("{cpath}.filters"),
                "a chain that matches TLS it does not terminate (no transport_socket) passes it through: it needs a tcp_proxy",
            ),
            None => {}
            Some(socket) => {
                let spath = format!("{cpath}.transport_socket");
                if transport == Some(false) {
                    ctx.err(
                        format!("{mpath}.transport_protocol"),
                        "\"raw_buffer\" on a chain with a TLS transport_socket",
                    );
                }
                match classify(socket, &spath, sds, ctx) {
                    None => {}
                    Some(ChainTls::Mesh(mtls)) => inner.mtls = Some(mtls),
                    Some(ChainTls::Edge(edge)) => {
                        // The chain's criteria chose it: its certificate
                        // serves whatever name brought the client here.
                        let mut found = Vec::new();
                        inner.tls = edge_tls(vec![(cpath.clone(), Vec::new(), edge)], &mut found, ctx);
                        secrets.extend(found.into_iter().map(|s| EdgeSecret {
                            slot: match s.slot {
                                EdgeSlot::ClientCa | EdgeSlot::ChainClientCa(_) => {
                                    EdgeSlot::ChainClientCa(c)
                                }
                                EdgeSlot::Certificate(_) | EdgeSlot::ChainCertificate(_) => {
                                    EdgeSlot::ChainCertificate(c)
                                }
                            },
                            ..s
                        }));
                    }
                }
            }
        }
        let matcher = FilterChainMatchFile {
            destination_port,
            server_names: m.server_names.clone(),
            transport_protocol: (!m.transport_protocol.is_empty())
                .then(|| m.transport_protocol.clone()),
            application_protocols: m.application_protocols.clone(),
        };
        if !*default {
            criteria.push((
                mpath,
                ChainMatch {
                    destination_port,
                    server_names: m.server_names.clone(),
                    transport_tls: transport,
                    application_protocols: m.application_protocols.clone(),
                },
            ));
        }
        file.filter_chains.push(FilterChainFile {
            name: cpath.clone(),
            matcher,
            default: *default,
            listener: Box::new(inner),
        });
    }
    let table: Vec<ChainMatch> = criteria.iter().map(|(_, m)| m.clone()).collect();
    if let Err(dup) = ChainTable::new(&table) {
        ctx.err(
            &criteria[dup.second].0,
            format!("matches the same connections as {}", criteria[dup.first].0),
        );
    }
    PerChain {
        file,
        chain_routes,
        secrets,
    }
}

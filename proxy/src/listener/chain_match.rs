//! Filter-chain selection: which of a listener's filter chains serves a
//! connection, by Envoy's `FilterChainMatch` rules. Pure: the caller reads
//! the connection's facts (destination port, SNI, TLS or not, ALPN offered)
//! and falls back to the `default_filter_chain` when nothing matches.
//!
//! Envoy walks the criteria in a fixed order (destination port, server
//! name, transport protocol, application protocols) and at each level takes
//! the most specific value any chain names that fits the connection (a
//! port, an exact name before `*.suffix` wildcards, longest suffix first,
//! before chains that name none). It never backtracks: once a level has
//! picked its bucket, a miss deeper down is a miss, even if a less specific
//! bucket would have matched. Postern follows that exactly, so a control
//! plane's listener selects the same chain here as on Envoy.

use std::collections::HashMap;

/// The criteria of one filter chain; an empty field matches anything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChainMatch {
    /// `destination_port`: the port the client connected to.
    pub destination_port: Option<u16>,
    /// `server_names`: exact names, or `*.suffix` for any name ending in
    /// `.suffix` (one or more labels), compared without case.
    pub server_names: Vec<String>,
    /// `transport_protocol`: `Some(true)` for `tls`, `Some(false)` for
    /// `raw_buffer`.
    pub transport_tls: Option<bool>,
    /// `application_protocols`: ALPN values, any of which the client offers.
    pub application_protocols: Vec<String>,
}

/// What is known of a connection when its chain is picked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConnectionFacts {
    /// The local port it arrived on.
    pub destination_port: u16,
    /// The SNI of its ClientHello, lowercase.
    pub server_name: Option<String>,
    /// Whether it opened with a TLS ClientHello.
    pub tls: bool,
    /// ALPN offered in its ClientHello, in the client's order.
    pub application_protocols: Vec<Vec<u8>>,
}

/// Two chains with the same criteria (Envoy refuses such a listener too).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("filter chains {first} and {second} have the same filter_chain_match")]
pub struct DuplicateMatch {
    /// Index of the earlier chain.
    pub first: usize,
    /// Index of the later chain.
    pub second: usize,
}

/// A listener's chains, arranged for lookup level by level.
#[derive(Debug, Clone, Default)]
pub struct ChainTable {
    ports: Level<u16, Names>,
}

/// One level: buckets for the values chains name, and one for the chains
/// that name none.
#[derive(Debug, Clone)]
struct Level<K, V> {
    by: HashMap<K, V>,
    any: Option<V>,
}

impl<K, V> Default for Level<K, V> {
    fn default() -> Self {
        Level {
            by: HashMap::new(),
            any: None,
        }
    }
}

impl<K: std::hash::Hash + Eq, V: Default> Level<K, V> {
    fn bucket(&mut self, key: Option<K>) -> &mut V {
        match key {
            Some(key) => self.by.entry(key).or_default(),
            None => self.any.get_or_insert_with(V::default),
        }
    }
}

#[derive(Debug, Clone, Default)]
struct Names {
    exact: HashMap<String, Transports>,
    /// Keyed by the suffix with its dot: `.example.com` for `*.example.com`.
    wildcard: HashMap<String, Transports>,
    any: Option<Transports>,
}

type Transports = Level<bool, Alpns>;
type Alpns = Level<String, Option<usize>>;

impl ChainTable {
    /// Arranges `chains` (in listener order, each chain's index its
    /// position). Fails when two chains would claim the same connections.
    pub fn new(chains: &[ChainMatch]) -> Result<ChainTable, DuplicateMatch> {
        let mut table = ChainTable::default();
        for (index, chain) in chains.iter().enumerate() {
            let names = table.ports.bucket(chain.destination_port);
            if chain.server_names.is_empty() {
                let any = names.any.get_or_insert_with(Default::default);
                fill(any, chain, index)?;
                continue;
            }
            // Several names of one chain may land in the same bucket (`A`
            // and `a`); each bucket is filled once per chain.
            let mut exact = Vec::new();
            let mut wildcard = Vec::new();
            for name in &chain.server_names {
                let name = name.to_ascii_lowercase();
                match name.strip_prefix('*') {
                    Some(suffix) => wildcard.push(suffix.to_string()),
                    None => exact.push(name),
                }
            }
            exact.sort();
            exact.dedup();
            wildcard.sort();
            wildcard.dedup();
            for name in exact {
                fill(names.exact.entry(name).or_default(), chain, index)?;
            }
            for suffix in wildcard {
                fill(names.wildcard.entry(suffix).or_default(), chain, index)?;
            }
        }
        Ok(table)
    }

    /// The index of the chain that serves `facts`; `None` sends the
    /// connection to the default chain, or closes it when there is none.
    pub fn select(&self, facts: &ConnectionFacts) -> Option<usize> {
        let names = self
            .ports
            .by
            .get(&facts.destination_port)
            .or(self.ports.any.as_ref())?;
        let transports = names.lookup(facts.server_name.as_deref().unwrap_or(""))?;
        let alpns = transports.by.get(&facts.tls).or(transports.any.as_ref())?;
        let offered = facts
            .application_protocols
            .iter()
            .filter_map(|p| std::str::from_utf8(p).ok())
            .find_map(|p| alpns.by.get(p));
        *offered.or(alpns.any.as_ref())?
    }
}

/// Puts chain `index` under its transport protocol and each of its ALPN
/// values in one server-name bucket.
fn fill(
    transports: &mut Transports,
    chain: &ChainMatch,
    index: usize,
) -> Result<(), DuplicateMatch> {
    let mut alpns: Vec<Option<String>> = chain
        .application_protocols
        .iter()
        .cloned()
        .map(Some)
        .collect();
    if alpns.is_empty() {
        alpns.push(None);
    }
    alpns.sort();
    alpns.dedup();
    let by_alpn = transports.bucket(chain.transport_tls);
    for alpn in alpns {
        let slot = by_alpn.bucket(alpn);
        if let Some(first) = *slot {
            return Err(DuplicateMatch {
                first,
                second: index,
            });
        }
        *slot = Some(index);
    }
    Ok(())
}

impl Names {
    /// The most specific bucket for `name`: exact, then the longest
    /// wildcard suffix, then the chains without names.
    fn lookup(&self, name: &str) -> Option<&Transports> {
        let name = name.to_ascii_lowercase();
        if let Some(exact) = self.exact.get(&name) {
            return Some(exact);
        }
        // `*.example.com` matches `a.example.com` and `a.b.example.com` but
        // not `example.com`: only suffixes after the first label count.
        let wildcard = name
            .char_indices()
            .skip(1)
            .filter(|(_, c)| *c == '.')
            .map(|(i, _)| &name[i..])
            .filter(|suffix| suffix.len() > 1)
            .find_map(|suffix| self.wildcard.get(suffix));
        wildcard.or(self.any.as_ref())
    }
}

#[cfg(test)]
mod tests;

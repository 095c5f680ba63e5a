//! SPIFFE IDs: `spiffe://<trust-domain>/<path>`, parsed and validated by the
//! rules of the SPIFFE ID specification.

use std::fmt;
use std::str::FromStr;

/// Longest SPIFFE ID the specification allows, in bytes.
const MAX_ID_LEN: usize = 2048;
/// Longest trust domain name, in bytes (a DNS name).
const MAX_TRUST_DOMAIN_LEN: usize = 255;

/// A validated SPIFFE ID.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    uri: String,
    /// Byte offset where the path starts (the `/` after the trust domain).
    path_start: usize,
}

/// Why a string is not a SPIFFE ID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeIdError {
    /// Does not start with `spiffe://`.
    #[error("must start with \"spiffe://\"")]
    Scheme,
    /// Empty trust domain.
    #[error("trust domain is empty")]
    EmptyTrustDomain,
    /// Trust domain with a character outside `[a-z0-9.-_]`.
    #[error("trust domain has invalid character {0:?} (allowed: lowercase letters, digits, '.', '-', '_')")]
    TrustDomainChar(char),
    /// Trust domain too long.
    #[error("trust domain is longer than {MAX_TRUST_DOMAIN_LEN} bytes")]
    TrustDomainTooLong,
    /// No path, or an empty, `.` or `..` segment.
    #[error("path segment {0:?} is not allowed (segments must be non-empty and not '.' or '..')")]
    Segment(String),
    /// Path with a character outside `[A-Za-z0-9.-_]`.
    #[error("path has invalid character {0:?} (allowed: letters, digits, '.', '-', '_')")]
    PathChar(char),
    /// A workload ID needs a path.
    #[error("path is empty; a workload ID needs one, e.g. /ns/<namespace>/sa/<service-account>")]
    EmptyPath,
    /// Query or fragment present.
    #[error("query and fragment are not allowed")]
    QueryOrFragment,
    /// ID too long.
    #[error("longer than {MAX_ID_LEN} bytes")]
    TooLong,
}

impl SpiffeId {
    /// Parses and validates a workload SPIFFE ID (a path is required).
    pub fn parse(s: &str) -> Result<SpiffeId, SpiffeIdError> {
        if s.len() > MAX_ID_LEN {
            return Err(SpiffeIdError::TooLong);
        }
        let rest = s.strip_prefix("spiffe://").ok_or(SpiffeIdError::Scheme)?;
        if rest.contains(['?', '#']) {
            return Err(SpiffeIdError::QueryOrFragment);
        }
        let (trust_domain, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        validate_trust_domain(trust_domain)?;
        if path.is_empty() {
            return Err(SpiffeIdError::EmptyPath);
        }
        for segment in path[1..].split('/') {
            if segment.is_empty() || segment == "." || segment == ".." {
                return Err(SpiffeIdError::Segment(segment.to_string()));
            }
            if let Some(c) = segment
                .chars()
                .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')))
            {
                return Err(SpiffeIdError::PathChar(c));
            }
        }
        Ok(SpiffeId {
            uri: s.to_string(),
            path_start: "spiffe://".len() + trust_domain.len(),
        })
    }

    /// The Istio-style workload ID `spiffe://<td>/ns/<namespace>/sa/<service_account>`.
    pub fn workload(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<SpiffeId, SpiffeIdError> {
        SpiffeId::parse(&format!(
            "spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"
        ))
    }

    /// The trust domain, e.g. `cluster.local`.
    pub fn trust_domain(&self) -> &str {
        &self.uri["spiffe://".len()..self.path_start]
    }

    /// The path, starting with `/`.
    pub fn path(&self) -> &str {
        &self.uri[self.path_start..]
    }

    /// The namespace of an Istio-style ID (`/ns/<ns>/sa/<sa>`), if it is one.
    pub fn namespace(&self) -> Option<&str> {
        self.istio_parts().map(|(ns, _)| ns)
    }

    /// The service account of an Istio-style ID, if it is one.
    pub fn service_account(&self) -> Option<&str> {
        self.istio_parts().map(|(_, sa)| sa)
    }

    fn istio_parts(&self) -> Option<(&str, &str)> {
        let mut parts = self.path()[1..].split('/');
        match (parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some("ns"), Some(ns), Some("sa"), Some(sa)) if parts.next().is_none() => {
                Some((ns, sa))
            }
            _ => None,
        }
    }

    /// The whole ID as a URI string.
    pub fn as_str(&self) -> &str {
        &self.uri
    }
}

fn validate_trust_domain(td: &str) -> Result<(), SpiffeIdError> {
    if td.is_empty() {
        return Err(SpiffeIdError::EmptyTrustDomain);
    }
    if td.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(SpiffeIdError::TrustDomainTooLong);
    }
    match td
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | '_')))
    {
        Some(c) => Err(SpiffeIdError::TrustDomainChar(c)),
        None => Ok(()),
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri)
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SpiffeId::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_istio_workload_ids() {
        let id = SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/payments").unwrap();
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.path(), "/ns/shop/sa/payments");
        assert_eq!(id.namespace(), Some("shop"));
        assert_eq!(id.service_account(), Some("payments"));
        assert_eq!(
            SpiffeId::workload("cluster.local", "shop", "payments").unwrap(),
            id
        );
        let other = SpiffeId::parse("spiffe://example.org/workload-1").unwrap();
        assert_eq!(other.namespace(), None);
    }

    #[test]
    fn rejects_malformed_ids() {
        let cases = [
            ("http://cluster.local/ns/a/sa/b", SpiffeIdError::Scheme),
            ("spiffe:///ns/a", SpiffeIdError::EmptyTrustDomain),
            (
                "spiffe://Cluster.local/a",
                SpiffeIdError::TrustDomainChar('C'),
            ),
            ("spiffe://cluster.local", SpiffeIdError::EmptyPath),
            (
                "spiffe://cluster.local/",
                SpiffeIdError::Segment(String::new()),
            ),
            ("spiffe://td/a//b", SpiffeIdError::Segment(String::new())),
            ("spiffe://td/a/../b", SpiffeIdError::Segment("..".into())),
            ("spiffe://td/a/./b", SpiffeIdError::Segment(".".into())),
            ("spiffe://td/a%2fb", SpiffeIdError::PathChar('%')),
            ("spiffe://td/a?x=1", SpiffeIdError::QueryOrFragment),
            ("spiffe://td:8080/a", SpiffeIdError::TrustDomainChar(':')),
            ("spiffe://user@td/a", SpiffeIdError::TrustDomainChar('@')),
        ];
        for (input, expected) in cases {
            assert_eq!(SpiffeId::parse(input), Err(expected), "{input}");
        }
        let long = format!("spiffe://td/{}", "a".repeat(MAX_ID_LEN));
        assert_eq!(SpiffeId::parse(&long), Err(SpiffeIdError::TooLong));
    }
}

//! Header handling between hops: hop-by-hop removal (RFC 9110 §7.6.1),
//! forwarding headers, request ids.

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// Header carrying the request id.
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// Header listing the client and proxies.
pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
/// Header with the client's scheme.
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
/// Header set on answers from an open circuit breaker.
pub static X_POSTERN_OVERLOADED: HeaderName = HeaderName::from_static("x-postern-overloaded");

/// Whether a request asks for a protocol upgrade (HTTP/1.1 `Connection: upgrade`).
pub fn is_upgrade_request(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE) && connection_has(headers, "upgrade")
}

fn connection_has(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Removes hop-by-hop headers. With `keep_upgrade`, `Upgrade` and
/// `Connection: upgrade` stay so an upgrade can pass through. A `TE` that
/// asks for trailers is kept as `te: trailers` (gRPC needs it).
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // One pass over the names finds which fixed hop-by-hop headers are
    // present; most messages carry none, or only `connection: keep-alive`.
    let mut present = [false; HOP_BY_HOP.len()];
    let mut any = false;
    for name in headers.keys() {
        if let Some(i) = HOP_BY_HOP.iter().position(|h| h == name) {
            present[i] = true;
            any = true;
        }
    }
    if !any && !keep_upgrade {
        return;
    }
    if present[CONNECTION_INDEX] {
        // Headers that `Connection` names are hop-by-hop too. Its usual
        // tokens (keep-alive, close, upgrade, te) name fixed ones, so only
        // other tokens are parsed as header names.
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|t| !t.is_empty() && !is_fixed_connection_token(t))
            .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
            // Never let a client strip end-to-end headers the proxy relies on.
            .filter(|name| name != header::HOST && name != header::CONTENT_LENGTH)
            .collect();
        for name in named {
            headers.remove(&name);
        }
    }
    let wants_trailers = present[TE_INDEX]
        && headers
            .get_all(header::TE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("trailers"));
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        if present[i] && !(keep_upgrade && *name == header::UPGRADE) {
            headers.remove(name);
        }
    }
    if keep_upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    if wants_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// The fixed hop-by-hop headers (RFC 9110 §7.6.1, plus the legacy
/// `Proxy-Connection` and `Keep-Alive`).
static HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    header::TE,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHENTICATE,
    header::TRAILER,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
];
const CONNECTION_INDEX: usize = 0;

/// `close`, or the name of a fixed hop-by-hop header, in any case.
fn is_fixed_connection_token(token: &str) -> bool {
    token.eq_ignore_ascii_case("close")
        || HOP_BY_HOP
            .iter()
            .any(|name| token.eq_ignore_ascii_case(name.as_str()))
}
const TE_INDEX: usize = 1;

/// Sets `x-forwarded-for`, `x-forwarded-proto` and `x-request-id` for the
/// upstream. Untrusted clients cannot choose the proto or the request id;
/// the peer address is always appended. `peer` is the peer IP as a header
/// value, made once per connection.
pub fn set_forwarding(
    headers: &mut HeaderMap,
    downstream: &DownstreamPeer,
    trust_downstream: bool,
) {
    let peer = &downstream.ip;
    let mut existing = headers.get_all(&X_FORWARDED_FOR).iter();
    let value = match (existing.next(), existing.next()) {
        (None, _) => Some(peer.clone()),
        // Several x-forwarded-for lines fold into one list, in order, then the peer.
        (Some(first), second) => {
            let mut folded = Vec::with_capacity(64);
            for v in std::iter::once(first).chain(second).chain(existing) {
                let text = v.as_bytes().trim_ascii();
                if !text.is_empty() {
                    folded.extend_from_slice(text);
                    folded.extend_from_slice(b", ");
                }
            }
            folded.extend_from_slice(peer.as_bytes());
            HeaderValue::from_bytes(&folded).ok()
        }
    };
    if let Some(value) = value {
        headers.insert(&X_FORWARDED_FOR, value);
    }
    if !trust_downstream || !headers.contains_key(&X_FORWARDED_PROTO) {
        let proto = if downstream.tls { "https" } else { "http" };
        headers.insert(&X_FORWARDED_PROTO, HeaderValue::from_static(proto));
    }
    // Who the caller is comes only from our own handshake: a client-sent
    // x-forwarded-client-cert is kept only from a trusted downstream that
    // proved its own identity by mTLS.
    if !(trust_downstream && downstream.spiffe_id.is_some()) {
        headers.remove(&X_FORWARDED_CLIENT_CERT);
    }
    if let Some(xfcc) = &downstream.xfcc {
        headers.append(&X_FORWARDED_CLIENT_CERT, xfcc.clone());
    }
    let keep_id = trust_downstream
        && headers
            .get(&X_REQUEST_ID)
            .is_some_and(|v| !v.is_empty() && v.len() <= 128);
    if !keep_id {
        headers.insert(&X_REQUEST_ID, new_request_id());
    }
}

/// `x-forwarded-client-cert`: the mTLS peer's identity, Envoy's format.
pub static X_FORWARDED_CLIENT_CERT: HeaderName = HeaderName::from_static("x-forwarded-client-cert");

/// What a downstream connection tells about its peer, computed once per
/// connection and shared by its requests.
#[derive(Debug, Clone)]
pub struct DownstreamPeer {
    /// The peer IP as a header value, for `x-forwarded-for`.
    pub ip: HeaderValue,
    /// The peer IP.
    pub addr: IpAddr,
    /// The peer address and port.
    pub remote: std::net::SocketAddr,
    /// The local port the connection came in on.
    pub local_port: u16,
    /// The connection is TLS.
    pub tls: bool,
    /// The peer's verified SPIFFE ID.
    pub spiffe_id: Option<std::sync::Arc<postern_certs::SpiffeId>>,
    /// `By=<ours>;URI=<peer>` when the peer has a SPIFFE ID.
    pub xfcc: Option<HeaderValue>,
}

impl DownstreamPeer {
    /// The peer of a connection from `remote`, with what its handshake proved;
    /// `local` is this proxy's own SPIFFE ID.
    pub fn new(
        remote: std::net::SocketAddr,
        local_port: u16,
        tls: &crate::tls::PeerTls,
        local: Option<&postern_certs::SpiffeId>,
    ) -> DownstreamPeer {
        let xfcc = tls.spiffe_id.as_ref().and_then(|peer| {
            let value = match local {
                Some(local) => format!("By={local};URI={peer}"),
                None => format!("URI={peer}"),
            };
            HeaderValue::from_str(&value).ok()
        });
        DownstreamPeer {
            ip: peer_value(remote.ip()),
            addr: remote.ip(),
            remote,
            local_port,
            tls: tls.tls,
            spiffe_id: tls.spiffe_id.clone(),
            xfcc,
        }
    }
}

/// The peer IP as a header value, for `x-forwarded-for`.
pub fn peer_value(peer: IpAddr) -> HeaderValue {
    HeaderValue::from_str(&peer.to_string()).unwrap_or_else(|_| HeaderValue::from_static("unknown"))
}

/// A fresh random request id (UUID v4).
pub fn new_request_id() -> HeaderValue {
    let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
    let text = uuid::Uuid::new_v4().hyphenated().encode_lower(&mut buf);
    HeaderValue::from_str(text).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_connection_named_and_fixed_hop_headers() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("close, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("gzip, trailers"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert("x-keep", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h, false);
        assert!(h.get("x-secret").is_none());
        assert!(h.get("keep-alive").is_none());
        assert!(h.get(header::CONNECTION).is_none());
        assert!(h.get(header::UPGRADE).is_none());
        assert_eq!(h.get(header::TE).unwrap(), "trailers");
        assert_eq!(h.get("x-keep").unwrap(), "1");
    }

    #[test]
    fn keeps_upgrade_when_asked() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        assert!(is_upgrade_request(&h));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h.get(header::UPGRADE).unwrap(), "websocket");
        assert_eq!(h.get(header::CONNECTION).unwrap(), "upgrade");
    }

    #[test]
    fn forwarding_headers_untrusted_and_trusted() {
        let peer = DownstreamPeer::new(
            "127.0.0.9:1".parse().unwrap(),
            8080,
            &crate::tls::PeerTls::default(),
            None,
        );
        let mut h = HeaderMap::new();
        h.insert(&X_FORWARDED_FOR, HeaderValue::from_static("10.1.1.1"));
        h.insert(
            &X_FORWARDED_CLIENT_CERT,
            HeaderValue::from_static("URI=spiffe://forged/ns/a/sa/b"),
        );
        h.insert(&X_FORWARDED_PROTO, HeaderValue::from_static("https"));
        h.insert(&X_REQUEST_ID, HeaderValue::from_static("client-chosen"));
        let mut untrusted = h.clone();
        set_forwarding(&mut untrusted, &peer, false);
        assert_eq!(
            untrusted.get(&X_FORWARDED_FOR).unwrap(),
            "10.1.1.1, 127.0.0.9"
        );
        assert_eq!(untrusted.get(&X_FORWARDED_PROTO).unwrap(), "http");
        assert_ne!(untrusted.get(&X_REQUEST_ID).unwrap(), "client-chosen");
        assert!(untrusted.get(&X_FORWARDED_CLIENT_CERT).is_none());
        let mut trusted = h;
        set_forwarding(&mut trusted, &peer, true);
        assert_eq!(trusted.get(&X_FORWARDED_PROTO).unwrap(), "https");
        assert_eq!(trusted.get(&X_REQUEST_ID).unwrap(), "client-chosen");
    }
}

#[cfg(test)]
mod peer_tests {
    use super::*;

    #[test]
    fn mesh_peer_identity_replaces_forged_client_cert_header() {
        let peer_id = postern_certs::SpiffeId::parse("spiffe://td/ns/a/sa/caller").unwrap();
        let local = postern_certs::SpiffeId::parse("spiffe://td/ns/b/sa/server").unwrap();
        let tls = crate::tls::PeerTls {
            tls: true,
            spiffe_id: Some(std::sync::Arc::new(peer_id)),
        };
        let peer = DownstreamPeer::new("127.0.0.1:1".parse().unwrap(), 8080, &tls, Some(&local));
        let mut h = HeaderMap::new();
        h.insert(
            &X_FORWARDED_CLIENT_CERT,
            HeaderValue::from_static("URI=spiffe://forged/x"),
        );
        set_forwarding(&mut h, &peer, false);
        let values: Vec<_> = h.get_all(&X_FORWARDED_CLIENT_CERT).iter().collect();
        assert_eq!(
            values,
            ["By=spiffe://td/ns/b/sa/server;URI=spiffe://td/ns/a/sa/caller"]
        );
        assert_eq!(h.get(&X_FORWARDED_PROTO).unwrap(), "https");
    }
}

//! Header handling between hops: hop-by-hop removal (RFC 9110 §7.6.1),
//! forwarding headers, request ids.

use std::fmt::Write as _;
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
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

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
    // Most messages carry none: one pass over the names is cheaper than a
    // hashed removal of each hop-by-hop name.
    if !keep_upgrade && !headers.keys().any(is_hop_by_hop) {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for name in named {
        if keep_upgrade && name == header::UPGRADE {
            continue;
        }
        // Never let a client strip end-to-end headers the proxy relies on.
        if name == header::HOST || name == header::CONTENT_LENGTH {
            continue;
        }
        headers.remove(&name);
    }
    let wants_trailers = headers
        .get_all(header::TE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("trailers"));
    headers.remove(header::CONNECTION);
    headers.remove(&KEEP_ALIVE);
    headers.remove(&PROXY_CONNECTION);
    headers.remove(header::TE);
    headers.remove(header::TRANSFER_ENCODING);
    headers.remove(header::PROXY_AUTHENTICATE);
    headers.remove(header::TRAILER);
    if keep_upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(header::UPGRADE);
    }
    if wants_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

fn is_hop_by_hop(name: &HeaderName) -> bool {
    name == header::CONNECTION
        || name == header::TE
        || name == header::TRANSFER_ENCODING
        || name == header::UPGRADE
        || name == header::PROXY_AUTHENTICATE
        || name == header::TRAILER
        || name == KEEP_ALIVE
        || name == PROXY_CONNECTION
}

/// Sets `x-forwarded-for`, `x-forwarded-proto` and `x-request-id` for the
/// upstream. Untrusted clients cannot choose the proto or the request id;
/// the peer address is always appended.
pub fn set_forwarding(headers: &mut HeaderMap, peer: IpAddr, trust_downstream: bool) {
    // Several x-forwarded-for lines fold into one list, in order, then the peer.
    let mut folded = String::with_capacity(48);
    for value in headers.get_all(&X_FORWARDED_FOR).iter() {
        if let Ok(text) = value.to_str() {
            let text = text.trim();
            if !text.is_empty() {
                folded.push_str(text);
                folded.push_str(", ");
            }
        }
    }
    let _ = write!(folded, "{peer}");
    if let Ok(value) = HeaderValue::from_str(&folded) {
        headers.insert(&X_FORWARDED_FOR, value);
    }
    if !trust_downstream || !headers.contains_key(&X_FORWARDED_PROTO) {
        headers.insert(&X_FORWARDED_PROTO, HeaderValue::from_static("http"));
    }
    let keep_id = trust_downstream
        && headers
            .get(&X_REQUEST_ID)
            .is_some_and(|v| !v.is_empty() && v.len() <= 128);
    if !keep_id {
        headers.insert(&X_REQUEST_ID, new_request_id());
    }
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
        let peer: IpAddr = "127.0.0.9".parse().unwrap();
        let mut h = HeaderMap::new();
        h.insert(&X_FORWARDED_FOR, HeaderValue::from_static("10.1.1.1"));
        h.insert(&X_FORWARDED_PROTO, HeaderValue::from_static("https"));
        h.insert(&X_REQUEST_ID, HeaderValue::from_static("client-chosen"));
        let mut untrusted = h.clone();
        set_forwarding(&mut untrusted, peer, false);
        assert_eq!(
            untrusted.get(&X_FORWARDED_FOR).unwrap(),
            "10.1.1.1, 127.0.0.9"
        );
        assert_eq!(untrusted.get(&X_FORWARDED_PROTO).unwrap(), "http");
        assert_ne!(untrusted.get(&X_REQUEST_ID).unwrap(), "client-chosen");
        let mut trusted = h;
        set_forwarding(&mut trusted, peer, true);
        assert_eq!(trusted.get(&X_FORWARDED_PROTO).unwrap(), "https");
        assert_eq!(trusted.get(&X_REQUEST_ID).unwrap(), "client-chosen");
    }
}

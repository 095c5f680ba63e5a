//! Header handling between hops: hop-by-hop removal (RFC 9110 §7.6.1),
//! forwarding headers, request ids, and the checks on a request head that
//! hyper lets through but a proxy must not forward.

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode, Uri, Version};

/// Header carrying the request id.
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// Header listing the client and proxies.
pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
/// Header with the client's scheme.
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
/// Header set on answers from an open circuit breaker.
pub static X_POSTERN_OVERLOADED: HeaderName = HeaderName::from_static("x-postern-overloaded");
/// Set on a refusal of the global rate-limit service, as Envoy does.
pub static X_ENVOY_RATELIMITED: HeaderName = HeaderName::from_static("x-envoy-ratelimited");

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
        if let Some(i) = hop_by_hop_index(name) {
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
            // Never let a client strip what the proxy frames or routes by or
            // has just set: `Connection: x-forwarded-for` would hide the
            // client's address from the backend (found by fuzzing).
            .filter(|name| !is_managed(name.as_str()))
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

/// The place of `name` in [`HOP_BY_HOP`]. A match on the text compiles to
/// length and byte checks: far cheaper, for every header of every message,
/// than eight `HeaderName` comparisons.
fn hop_by_hop_index(name: &HeaderName) -> Option<usize> {
    Some(match name.as_str() {
        "connection" => 0,
        "te" => 1,
        "transfer-encoding" => 2,
        "upgrade" => 3,
        "proxy-authenticate" => 4,
        "trailer" => 5,
        "keep-alive" => 6,
        "proxy-connection" => 7,
        _ => return None,
    })
}

/// `close`, or the name of a fixed hop-by-hop header, in any case.
fn is_fixed_connection_token(token: &str) -> bool {
    // Lowered into a buffer as long as the longest of them, then one
    // `match`: most responses say `Connection: keep-alive`, and nine
    // case-blind comparisons for it cost more than the rest of the strip.
    const LONGEST: usize = "proxy-authenticate".len();
    let bytes = token.as_bytes();
    if bytes.len() > LONGEST {
        return false;
    }
    let mut lower = [0u8; LONGEST];
    for (out, b) in lower.iter_mut().zip(bytes) {
        *out = b.to_ascii_lowercase();
    }
    matches!(
        &lower[..bytes.len()],
        b"close"
            | b"connection"
            | b"te"
            | b"transfer-encoding"
            | b"upgrade"
            | b"proxy-authenticate"
            | b"trailer"
            | b"keep-alive"
            | b"proxy-connection"
    )
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
    // One pass over the names says which of these headers came at all:
    // each lookup or removal by name hashes it, and most requests carry
    // none of them.
    let mut has_xff = false;
    let mut has_proto = false;
    let mut has_xfcc = false;
    let mut has_id = false;
    let mut claims: Vec<HeaderName> = Vec::new();
    for name in headers.keys() {
        let text = name.as_str();
        if let Some(rest) = text.strip_prefix("x-forwarded-") {
            match rest {
                "for" => has_xff = true,
                "client-cert" => has_xfcc = true,
                _ => {
                    has_proto |= rest == "proto";
                    if !trust_downstream {
                        claims.push(name.clone());
                    }
                }
            }
        } else if text == X_REQUEST_ID.as_str() {
            has_id = true;
        } else if !trust_downstream && (text == "forwarded" || text == "x-real-ip") {
            claims.push(name.clone());
        }
    }
    let peer = &downstream.ip;
    let value = if has_xff {
        let mut existing = headers.get_all(&X_FORWARDED_FOR).iter();
        match (existing.next(), existing.next()) {
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
        }
    } else {
        Some(peer.clone())
    };
    if let Some(value) = value {
        headers.insert(&X_FORWARDED_FOR, value);
    }
    // What an untrusted client says about the hops before it, beyond the
    // `x-forwarded-for` list the proxy appends to, goes: backends (and web
    // frameworks behind a "trusted proxy" setting) believe these from us.
    for name in claims {
        headers.remove(name);
    }
    if !trust_downstream || !has_proto {
        let proto = if downstream.tls { "https" } else { "http" };
        headers.insert(&X_FORWARDED_PROTO, HeaderValue::from_static(proto));
    }
    // Who the caller is comes only from our own handshake: a client-sent
    // x-forwarded-client-cert is kept only from a trusted downstream that
    // proved its own identity by mTLS.
    if has_xfcc && !(trust_downstream && downstream.spiffe_id.is_some()) {
        headers.remove(&X_FORWARDED_CLIENT_CERT);
    }
    if let Some(xfcc) = &downstream.xfcc {
        headers.append(&X_FORWARDED_CLIENT_CERT, xfcc.clone());
    }
    let keep_id = trust_downstream
        && has_id
        && headers
            .get(&X_REQUEST_ID)
            .is_some_and(|v| !v.is_empty() && v.len() <= 128);
    if !keep_id {
        headers.insert(&X_REQUEST_ID, new_request_id());
    }
}

/// What to do with a request header whose name holds an underscore
/// (Envoy's `headers_with_underscores_action`). Whatever is chosen, a name
/// that spells a header the proxy manages with underscores
/// (`x_forwarded_for`, `x_postern_peer`, ...) is always dropped: CGI-style
/// backends read it as the real one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum UnderscoreHeaders {
    /// Forward them (the default, as in Envoy).
    #[default]
    Allow,
    /// Answer 400 and close.
    RejectRequest,
    /// Remove them and forward the rest.
    DropHeader,
}

/// Whether a request header name (dashes form) is one the proxy frames,
/// routes or sets by, or one of its own, so that no other spelling of it
/// may pass.
fn is_managed(dashed: &str) -> bool {
    // Framing and routing headers too: a backend that folds `_` into `-`
    // would otherwise frame or route by a header the proxy ignored.
    dashed == "content-length"
        || dashed == "transfer-encoding"
        || dashed == "host"
        || dashed.starts_with("x-forwarded-")
        || dashed.starts_with("x-postern-")
        || dashed == "forwarded"
        || dashed == "x-real-ip"
        || dashed == X_REQUEST_ID.as_str()
}

/// Removes from a downstream request what only Postern may say:
/// `x-postern-*` (but `x-postern-peer`, which the request path reads from a
/// proven mesh peer and removes itself) and underscore spellings of managed
/// headers; then applies `underscores`.
///
/// # Errors
///
/// [`RejectedHead`] when `underscores` is `RejectRequest` and a name has an
/// underscore.
pub fn sanitize_inbound(
    headers: &mut HeaderMap,
    underscores: UnderscoreHeaders,
) -> Result<(), RejectedHead> {
    let mut drop: Vec<HeaderName> = Vec::new();
    for name in headers.keys() {
        let text = name.as_str();
        if text.starts_with("x-postern-") {
            if text != "x-postern-peer" {
                drop.push(name.clone());
            }
        } else if text.contains('_') {
            if is_managed(&text.replace('_', "-")) {
                drop.push(name.clone());
            } else {
                match underscores {
                    UnderscoreHeaders::Allow => {}
                    UnderscoreHeaders::DropHeader => drop.push(name.clone()),
                    UnderscoreHeaders::RejectRequest => {
                        return Err(RejectedHead::bad("header name with underscore"))
                    }
                }
            }
        }
    }
    for name in drop {
        headers.remove(name);
    }
    Ok(())
}

/// A request head refused before routing: the status and a short reason
/// for the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RejectedHead {
    /// Status to answer.
    pub status: StatusCode,
    /// Plain-text reason, also the response body.
    pub reason: &'static str,
}

impl RejectedHead {
    fn bad(reason: &'static str) -> Self {
        RejectedHead {
            status: StatusCode::BAD_REQUEST,
            reason,
        }
    }
}

/// Checks the framing and target of a request head for what hyper accepts
/// but RFC 9112 calls malformed, or what would reach the upstream in a
/// different shape than routes and policies saw:
///
/// - `Transfer-Encoding` other than one `chunked` (hyper only checks that
///   the last coding is chunked; `gzip, chunked` would arrive upstream as an
///   unlabelled gzip body, `chunked, chunked` is forbidden);
/// - an HTTP/1.1 request without exactly one `Host` (RFC 9112 §3.2);
/// - a `Host` or target authority that is not `host[:port]`, e.g. with
///   userinfo or spaces;
/// - an HTTP/2 `host` that names another authority than `:authority`;
/// - `CONNECT` (not supported: 405), an authority-form target on another
///   method, and `*` on any method but `OPTIONS`.
///
/// # Errors
///
/// The status and reason to answer with.
pub fn check_request_head(
    method: &Method,
    uri: &Uri,
    version: Version,
    headers: &HeaderMap,
) -> Result<(), RejectedHead> {
    if method == Method::CONNECT {
        return Err(RejectedHead {
            status: StatusCode::METHOD_NOT_ALLOWED,
            reason: "CONNECT is not supported",
        });
    }
    let mut codings = headers.get_all(header::TRANSFER_ENCODING).iter();
    if let Some(first) = codings.next() {
        let single_chunked = first
            .as_bytes()
            .trim_ascii()
            .eq_ignore_ascii_case(b"chunked");
        if !single_chunked || codings.next().is_some() {
            return Err(RejectedHead::bad("unsupported transfer-encoding"));
        }
    }
    match uri.path_and_query().map(|pq| pq.path()) {
        Some("*") if method == Method::OPTIONS => {}
        Some(path) if path.starts_with('/') => {}
        _ => return Err(RejectedHead::bad("invalid request target")),
    }
    if let Some(authority) = uri.authority() {
        if authority.as_str().contains('@') {
            return Err(RejectedHead::bad("userinfo in request target"));
        }
    }
    let mut hosts = headers.get_all(header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err(RejectedHead::bad("more than one host header"));
    }
    if let Some(host) = host {
        let valid = !host.is_empty()
            && !host.as_bytes().contains(&b'@')
            && http::uri::Authority::try_from(host.as_bytes()).is_ok();
        if !valid {
            return Err(RejectedHead::bad("invalid host header"));
        }
    }
    match version {
        Version::HTTP_11 if host.is_none() => Err(RejectedHead::bad("missing host header")),
        Version::HTTP_2 => match (uri.authority(), host) {
            (Some(authority), Some(host))
                if !authority
                    .as_str()
                    .as_bytes()
                    .eq_ignore_ascii_case(host.as_bytes()) =>
            {
                Err(RejectedHead::bad("host differs from :authority"))
            }
            _ => Ok(()),
        },
        _ => Ok(()),
    }
}

/// The forms of an authority that host rules are checked against: the host
/// as the router sees it (lower case, no trailing dot, no port) and, when a
/// port was given, that host with the port. So `ADMIN.shop.:8080` meets a
/// rule on `admin.shop` or on `admin.shop:8080`, as it reaches the same
/// virtual host.
pub fn authority_forms(authority: &str) -> (String, Option<String>) {
    let (host, port) = match authority.rfind(':') {
        // An IPv6 literal keeps its colons inside brackets.
        Some(colon) if !authority[colon..].contains(']') => {
            (&authority[..colon], Some(&authority[colon + 1..]))
        }
        _ => (authority, None),
    };
    let host = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
    let with_port = port.map(|p| format!("{host}:{p}"));
    (host, with_port)
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
    /// The SNI of the TLS handshake, for RBAC's `requested_server_name`.
    pub sni: Option<std::sync::Arc<str>>,
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
            sni: tls.sni.clone(),
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
    fn hop_by_hop_index_names_each_fixed_header_and_nothing_else() {
        for (i, name) in HOP_BY_HOP.iter().enumerate() {
            assert_eq!(hop_by_hop_index(name), Some(i), "{name}");
        }
        for other in [
            "host",
            "t",
            "tes",
            "x-connection",
            "trailers",
            "keep-alive-x",
        ] {
            assert_eq!(hop_by_hop_index(&HeaderName::from_static(other)), None);
        }
    }

    #[test]
    fn fixed_connection_tokens_are_close_and_the_hop_by_hop_names_in_any_case() {
        for name in HOP_BY_HOP.iter() {
            assert!(is_fixed_connection_token(name.as_str()), "{name}");
            assert!(is_fixed_connection_token(
                &name.as_str().to_ascii_uppercase()
            ));
        }
        assert!(is_fixed_connection_token("Keep-Alive"));
        assert!(is_fixed_connection_token("CLOSE"));
        for other in [
            "",
            "x-secret",
            "closed",
            "t",
            "proxy-authenticate-x",
            "keep-alive ",
        ] {
            assert!(!is_fixed_connection_token(other), "{other}");
        }
    }

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
    fn connection_cannot_name_away_what_the_proxy_sets() {
        // The shape of the fuzz crash: tokens among empty list elements.
        let peer = DownstreamPeer::new(
            "127.0.0.9:1".parse().unwrap(),
            8080,
            &crate::tls::PeerTls::default(),
            None,
        );
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static(
                "clo,,x-request-id,,x-forwarded-for,x-forwarded-proto,,x-forwarded-client-cert, host, content-length, x-postern-peer, x-other",
            ),
        );
        h.insert(header::HOST, HeaderValue::from_static("a"));
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
        h.insert("x-other", HeaderValue::from_static("1"));
        set_forwarding(&mut h, &peer, false);
        h.insert(
            &crate::telemetry::istio::X_POSTERN_PEER,
            HeaderValue::from_static("m"),
        );
        let before = h.clone();
        strip_hop_by_hop(&mut h, false);
        for name in [
            X_REQUEST_ID.as_str(),
            X_FORWARDED_FOR.as_str(),
            X_FORWARDED_PROTO.as_str(),
            "host",
            "content-length",
            "x-postern-peer",
        ] {
            assert_eq!(h.get(name), before.get(name), "{name}");
        }
        assert!(h.get("x-other").is_none());
        assert!(h.get(header::CONNECTION).is_none());
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
mod inbound_tests {
    use super::*;

    fn check(method: &str, uri: &str, version: Version, headers: &[(&str, &str)]) -> Option<u16> {
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        check_request_head(
            &Method::from_bytes(method.as_bytes()).unwrap(),
            &uri.parse().unwrap(),
            version,
            &map,
        )
        .err()
        .map(|r| r.status.as_u16())
    }

    #[test]
    fn request_heads_hyper_lets_through() {
        let h11 = Version::HTTP_11;
        assert_eq!(check("GET", "/", h11, &[("host", "a:80")]), None);
        assert_eq!(check("OPTIONS", "*", h11, &[("host", "a")]), None);
        assert_eq!(check("GET", "http://a/x", h11, &[("host", "b")]), None);
        let te = |v| check("POST", "/", h11, &[("host", "a"), ("transfer-encoding", v)]);
        assert_eq!(te("Chunked"), None);
        assert_eq!(te("gzip, chunked"), Some(400));
        assert_eq!(te("chunked, chunked"), Some(400));
        assert_eq!(check("GET", "/", h11, &[]), Some(400));
        assert_eq!(
            check("GET", "/", h11, &[("host", "a"), ("host", "a")]),
            Some(400)
        );
        assert_eq!(check("GET", "/", h11, &[("host", "a b")]), Some(400));
        assert_eq!(check("GET", "/", h11, &[("host", "u@a")]), Some(400));
        assert_eq!(check("GET", "/", h11, &[("host", "a/b")]), Some(400));
        assert_eq!(
            check("GET", "http://u@a/", h11, &[("host", "a")]),
            Some(400)
        );
        assert_eq!(check("GET", "*", h11, &[("host", "a")]), Some(400));
        assert_eq!(check("GET", "a:80", h11, &[("host", "a")]), Some(400));
        assert_eq!(
            check("CONNECT", "a:443", h11, &[("host", "a:443")]),
            Some(405)
        );
        assert_eq!(check("GET", "/", Version::HTTP_10, &[]), None);
        let h2 = Version::HTTP_2;
        assert_eq!(check("GET", "http://a/", h2, &[("host", "A")]), None);
        assert_eq!(check("GET", "http://a/", h2, &[("host", "b")]), Some(400));
    }

    #[test]
    fn authority_forms_ignore_case_dot_and_port() {
        assert_eq!(
            authority_forms("Admin.Shop.:8080"),
            ("admin.shop".to_owned(), Some("admin.shop:8080".to_owned()))
        );
        assert_eq!(authority_forms("a"), ("a".to_owned(), None));
        assert_eq!(authority_forms("[::1]"), ("[::1]".to_owned(), None));
    }

    #[test]
    fn inbound_sanitising_and_underscores() {
        let mut h = HeaderMap::new();
        for name in [
            "x-postern-overloaded",
            "x-postern-peer",
            "x_forwarded_for",
            "x_postern_peer",
            "x_request_id",
            "x_custom",
        ] {
            h.insert(HeaderName::from_static(name), HeaderValue::from_static("1"));
        }
        let mut allowed = h.clone();
        sanitize_inbound(&mut allowed, UnderscoreHeaders::Allow).unwrap();
        let mut names: Vec<&str> = allowed.keys().map(HeaderName::as_str).collect();
        names.sort_unstable();
        assert_eq!(names, ["x-postern-peer", "x_custom"]);
        let mut dropped = h.clone();
        sanitize_inbound(&mut dropped, UnderscoreHeaders::DropHeader).unwrap();
        assert!(dropped.get("x_custom").is_none());
        assert!(sanitize_inbound(&mut h, UnderscoreHeaders::RejectRequest).is_err());
    }

    #[test]
    fn untrusted_forwarding_claims_are_dropped() {
        let peer = DownstreamPeer::new(
            "127.0.0.9:1".parse().unwrap(),
            8080,
            &crate::tls::PeerTls::default(),
            None,
        );
        let mut h = HeaderMap::new();
        for name in [
            "x-forwarded-host",
            "x-forwarded-port",
            "forwarded",
            "x-real-ip",
        ] {
            h.insert(
                HeaderName::from_static(name),
                HeaderValue::from_static("evil"),
            );
        }
        let mut trusted = h.clone();
        set_forwarding(&mut h, &peer, false);
        for name in [
            "x-forwarded-host",
            "x-forwarded-port",
            "forwarded",
            "x-real-ip",
        ] {
            assert!(h.get(name).is_none(), "{name}");
        }
        set_forwarding(&mut trusted, &peer, true);
        assert_eq!(trusted.get("x-forwarded-host").unwrap(), "evil");
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
            opaque: false,
            sni: None,
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

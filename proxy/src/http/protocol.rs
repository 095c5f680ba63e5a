//! The caller's protocol across the mesh hop, which always speaks HTTP/2.
//!
//! - **Original protocol.** An outbound sidecar tells the inbound one what
//!   its app spoke (`x-postern-original-protocol: HTTP/1.1` or `HTTP/2`),
//!   so the destination app gets the same: HTTP/1.1 in, HTTP/1.1 out; h2c
//!   in, h2c out. The header is believed only from a peer that proved a
//!   SPIFFE ID by mTLS and is taken off every other request before the
//!   screening that strips `x-postern-*`.
//! - **Upgrades.** An HTTP/1.1 `Upgrade` (WebSocket) cannot cross an
//!   HTTP/2 connection as it is; it travels as an RFC 8441 extended
//!   CONNECT (`:protocol`) and is turned back into an HTTP/1.1 upgrade
//!   where the next hop speaks HTTP/1.1. Downstream, an extended CONNECT
//!   is turned into the HTTP/1.1 shape (`GET` with `Upgrade`) before
//!   policies and routes see it, so both look the same to them.
//!
//! Knows nothing of routing or clusters: the request path calls these at
//! the points named on each function.

use base64::Engine as _;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Version};

use super::headers::DownstreamPeer;

/// The protocol the calling app spoke, between sidecars over mesh mTLS.
pub static X_POSTERN_ORIGINAL_PROTOCOL: HeaderName =
    HeaderName::from_static("x-postern-original-protocol");

/// The HTTP version the app that made a call spoke.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OriginalProtocol {
    /// HTTP/1.0 or HTTP/1.1.
    Http1,
    /// HTTP/2 (h2c or h2).
    Http2,
}

impl OriginalProtocol {
    /// The marker's value: `HTTP/1.1` or `HTTP/2`, as in access logs.
    pub fn as_str(self) -> &'static str {
        match self {
            OriginalProtocol::Http1 => "HTTP/1.1",
            OriginalProtocol::Http2 => "HTTP/2",
        }
    }

    /// The protocol of a request as it arrived.
    pub fn of_version(version: Version) -> OriginalProtocol {
        if version == Version::HTTP_2 {
            OriginalProtocol::Http2
        } else {
            OriginalProtocol::Http1
        }
    }

    /// Reads a marker value; `None` for anything else.
    pub fn parse(value: &HeaderValue) -> Option<OriginalProtocol> {
        match value.as_bytes() {
            b"HTTP/1.1" | b"HTTP/1.0" => Some(OriginalProtocol::Http1),
            b"HTTP/2" => Some(OriginalProtocol::Http2),
            _ => None,
        }
    }

    fn header_value(self) -> HeaderValue {
        HeaderValue::from_static(self.as_str())
    }
}

/// What a request says about its caller's protocol once the marker is
/// settled, kept in its extensions until the request path writes it back
/// as the header (after the limits on header counts).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Settled(Option<OriginalProtocol>);

/// Takes the marker off a downstream request from a mesh peer, before
/// screening; call once per request, with the peer of its connection.
///
/// From a peer with a verified SPIFFE ID (a mesh sidecar) the marker is
/// believed, and without one nothing is known (an older sidecar or another
/// mesh's: the app then gets HTTP/1.1 unless the call is gRPC, as before).
/// From anyone else the marker is not read, and screening strips it with
/// every other `x-postern-*`: the request's own version counts, as that
/// caller is the app.
pub fn settle<B>(request: &mut Request<B>, peer: &DownstreamPeer) {
    // Without a mesh peer the request's own version stands, which
    // `original` reads when nothing was settled: no lookup, no extension
    // and its allocations, for it.
    if peer.spiffe_id.is_none() {
        return;
    }
    // `remove` takes every value: a second marker line cannot survive.
    let claimed = request.headers_mut().remove(&X_POSTERN_ORIGINAL_PROTOCOL);
    let original = claimed.as_ref().and_then(OriginalProtocol::parse);
    request.extensions_mut().insert(Settled(original));
}

/// The caller's protocol once [`settle`] has run, from a request's
/// extensions and version: what a mesh peer said, or the request's own
/// version. A request that did not pass [`settle`] (none does outside a
/// listener) counts as its own version.
pub fn original(extensions: &http::Extensions, version: Version) -> Option<OriginalProtocol> {
    match extensions.get::<Settled>() {
        Some(Settled(original)) => *original,
        None => Some(OriginalProtocol::of_version(version)),
    }
}

/// Writes the settled marker back as a header, for routes, policies and
/// logs to read; call after the request's limits are checked. Only needed
/// when something reads request headers: [`forward_marker`] puts it on a
/// mesh hop's head either way.
pub fn mark<B>(request: &mut Request<B>) {
    let original = original(request.extensions(), request.version());
    let headers = request.headers_mut();
    // `insert` replaces every value already there.
    match original {
        Some(original) => {
            headers.insert(&X_POSTERN_ORIGINAL_PROTOCOL, original.header_value());
        }
        None => {
            headers.remove(&X_POSTERN_ORIGINAL_PROTOCOL);
        }
    }
}

/// Leaves the marker on a request head going upstream only to another
/// sidecar (`mesh`); no app ever sees it. `marked` says whether [`mark`]
/// ran on the request; `original` is what [`original`] says of it.
pub fn forward_marker(
    headers: &mut HeaderMap,
    mesh: bool,
    marked: bool,
    original: Option<OriginalProtocol>,
) {
    match (mesh, marked) {
        // `mark` left one value at most, which a mesh hop keeps as it is.
        (true, true) => {}
        // Screening (or `settle`) took any marker off, so the head has
        // none yet.
        (true, false) => {
            if let Some(original) = original {
                headers.insert(&X_POSTERN_ORIGINAL_PROTOCOL, original.header_value());
            }
        }
        (false, true) => {
            headers.remove(&X_POSTERN_ORIGINAL_PROTOCOL);
        }
        (false, false) => {}
    }
}

/// Marks a downstream request that came as an RFC 8441 extended CONNECT,
/// to be answered `200` rather than `101`.
#[derive(Debug, Clone, Copy)]
pub struct ExtendedConnect;

/// Turns an HTTP/2 extended CONNECT (`:protocol`) into the HTTP/1.1
/// upgrade shape, before screening: `GET` with `Upgrade: <protocol>` and
/// `Connection: upgrade`, marked [`ExtendedConnect`]. Other requests,
/// plain CONNECT included, are left as they are.
pub fn normalize_extended_connect<B>(request: &mut Request<B>) {
    if request.method() != Method::CONNECT || request.version() != Version::HTTP_2 {
        return;
    }
    let Some(protocol) = request.extensions_mut().remove::<hyper::ext::Protocol>() else {
        return;
    };
    let Ok(token) = HeaderValue::from_str(protocol.as_str()) else {
        // Left a CONNECT: screening refuses it.
        return;
    };
    *request.method_mut() = Method::GET;
    let headers = request.headers_mut();
    headers.insert(header::UPGRADE, token);
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    request.extensions_mut().insert(ExtendedConnect);
}

/// Turns an upgrade's request head (after hop-by-hop removal kept
/// `Upgrade`) into an extended CONNECT for an HTTP/2 upstream; returns the
/// `:protocol` to attach to each try.
pub fn to_extended_connect(method: &mut Method, headers: &mut HeaderMap) -> hyper::ext::Protocol {
    let token = upgrade_token(headers);
    headers.remove(header::UPGRADE);
    headers.remove(header::CONNECTION);
    *method = Method::CONNECT;
    hyper::ext::Protocol::from(token.as_str())
}

/// Fits an upgrade's request head for an HTTP/1.1 upstream when the
/// caller used an extended CONNECT: RFC 8441 clients send no
/// `Sec-WebSocket-Key`, which an HTTP/1.1 WebSocket server requires, so
/// one is made up. (Between sidecars the caller's own key travels.)
pub fn fit_http1_upgrade(headers: &mut HeaderMap) {
    let websocket = upgrade_token(headers).eq_ignore_ascii_case("websocket");
    if websocket && !headers.contains_key(header::SEC_WEBSOCKET_KEY) {
        let nonce: [u8; 16] = rand::random();
        let key = base64::engine::general_purpose::STANDARD.encode(nonce);
        if let Ok(key) = HeaderValue::from_str(&key) {
            headers.insert(header::SEC_WEBSOCKET_KEY, key);
        }
        headers
            .entry(header::SEC_WEBSOCKET_VERSION)
            .or_insert(HeaderValue::from_static("13"));
    }
}

/// The protocol an upgrade asks for: the first `Upgrade` token.
pub fn upgrade_token(headers: &HeaderMap) -> String {
    headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(',').next())
        .map(|t| t.trim().to_string())
        .unwrap_or_default()
}

/// Whether an upgrade to `token` can cross an HTTP/2 hop as an extended
/// CONNECT. Not `h2c`: that asks the next hop itself to switch to HTTP/2
/// (RFC 7540 §3.2, dropped by RFC 9113), which a proxy speaking HTTP/2
/// upstream already does; such a request goes on as a plain one.
pub fn tunnels_over_http2(token: &str) -> bool {
    !token.is_empty() && !token.eq_ignore_ascii_case("h2c")
}

/// Whether the upstream accepted the upgrade: `101` from HTTP/1.1, a
/// `2xx` to an extended CONNECT over HTTP/2.
pub fn upstream_accepted(status: http::StatusCode, upstream_http2: bool) -> bool {
    if upstream_http2 {
        status.is_success()
    } else {
        status == http::StatusCode::SWITCHING_PROTOCOLS
    }
}

/// The answer to the caller of an accepted upgrade, from the upstream's:
/// `200` with no upgrade headers to an extended CONNECT, `101` with
/// `Upgrade: <token>` and `Connection: upgrade` to an HTTP/1.1 upgrade.
/// Hop-by-hop headers must have been removed already.
/// `websocket_key` is the caller's `Sec-WebSocket-Key` when the upstream
/// spoke RFC 8441, whose answer carries no `Sec-WebSocket-Accept`: an
/// RFC 6455 client refuses a `101` without it.
pub fn downstream_answer(
    parts: &mut http::response::Parts,
    extended_connect: bool,
    token: &str,
    websocket_key: Option<&HeaderValue>,
) {
    // A tunnel has no body; a length would contradict that.
    parts.headers.remove(header::CONTENT_LENGTH);
    if extended_connect {
        parts.status = http::StatusCode::OK;
        parts.headers.remove(header::UPGRADE);
        parts.headers.remove(header::CONNECTION);
    } else {
        parts.status = http::StatusCode::SWITCHING_PROTOCOLS;
        if !parts.headers.contains_key(header::UPGRADE) {
            if let Ok(token) = HeaderValue::from_str(token) {
                parts.headers.insert(header::UPGRADE, token);
            }
        }
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        if let Some(key) = websocket_key {
            if !parts.headers.contains_key(header::SEC_WEBSOCKET_ACCEPT) {
                parts
                    .headers
                    .insert(header::SEC_WEBSOCKET_ACCEPT, websocket_accept(key));
            }
        }
    }
}

/// RFC 6455 section 4.2.2: base64 of the SHA-1 of the key and the
/// protocol's GUID.
fn websocket_accept(key: &HeaderValue) -> HeaderValue {
    use base64::Engine as _;
    const GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
    let mut context = ring::digest::Context::new(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY);
    context.update(key.as_bytes());
    context.update(GUID);
    let accept = base64::engine::general_purpose::STANDARD.encode(context.finish());
    HeaderValue::from_str(&accept).unwrap_or_else(|_| HeaderValue::from_static(""))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn peer(mesh: bool) -> DownstreamPeer {
        let tls = crate::tls::PeerTls {
            tls: mesh,
            spiffe_id: mesh.then(|| {
                Arc::new(postern_certs::SpiffeId::parse("spiffe://td/ns/a/sa/b").unwrap())
            }),
            ..Default::default()
        };
        DownstreamPeer::new("10.0.0.1:5000".parse().unwrap(), 8080, &tls, None)
    }

    fn request(version: Version, marker: Option<&'static str>) -> Request<()> {
        let mut request = Request::new(());
        *request.version_mut() = version;
        if let Some(marker) = marker {
            request.headers_mut().insert(
                &X_POSTERN_ORIGINAL_PROTOCOL,
                HeaderValue::from_static(marker),
            );
        }
        request
    }

    fn settled(version: Version, marker: Option<&'static str>, mesh: bool) -> Option<String> {
        let mut request = request(version, marker);
        settle(&mut request, &peer(mesh));
        // Screening strips any marker still on the request.
        crate::http::headers::sanitize_inbound(request.headers_mut(), Default::default()).unwrap();
        assert!(request
            .headers()
            .get(&X_POSTERN_ORIGINAL_PROTOCOL)
            .is_none());
        // Put on a mesh hop's head without `mark`, it says the same.
        let mut unmarked = HeaderMap::new();
        forward_marker(
            &mut unmarked,
            true,
            false,
            original(request.extensions(), request.version()),
        );
        mark(&mut request);
        assert_eq!(
            unmarked.get(&X_POSTERN_ORIGINAL_PROTOCOL),
            request.headers().get(&X_POSTERN_ORIGINAL_PROTOCOL)
        );
        request
            .headers()
            .get(&X_POSTERN_ORIGINAL_PROTOCOL)
            .map(|v| v.to_str().unwrap().to_string())
    }

    #[test]
    fn marker_is_believed_only_from_a_mesh_peer() {
        use Version as V;
        // A mesh peer says what its app spoke, whatever the hop's version.
        assert_eq!(
            settled(V::HTTP_2, Some("HTTP/1.1"), true).unwrap(),
            "HTTP/1.1"
        );
        assert_eq!(settled(V::HTTP_2, Some("HTTP/2"), true).unwrap(), "HTTP/2");
        // A mesh peer that says nothing (or nonsense): unknown.
        assert_eq!(settled(V::HTTP_2, None, true), None);
        assert_eq!(settled(V::HTTP_2, Some("h3"), true), None);
        // Anyone else is the app: its own version counts, its claim does not.
        assert_eq!(
            settled(V::HTTP_11, Some("HTTP/2"), false).unwrap(),
            "HTTP/1.1"
        );
        assert_eq!(
            settled(V::HTTP_2, Some("HTTP/1.1"), false).unwrap(),
            "HTTP/2"
        );
        assert_eq!(settled(V::HTTP_10, None, false).unwrap(), "HTTP/1.1");
    }

    #[test]
    fn marker_goes_upstream_only_to_the_mesh() {
        let mut headers = HeaderMap::new();
        headers.insert(
            &X_POSTERN_ORIGINAL_PROTOCOL,
            HeaderValue::from_static("HTTP/2"),
        );
        let mut to_app = headers.clone();
        forward_marker(&mut to_app, false, true, Some(OriginalProtocol::Http2));
        assert!(to_app.is_empty());
        forward_marker(&mut headers, true, true, Some(OriginalProtocol::Http1));
        assert_eq!(headers.get(&X_POSTERN_ORIGINAL_PROTOCOL).unwrap(), "HTTP/2");
        let mut unmarked = HeaderMap::new();
        forward_marker(&mut unmarked, false, false, Some(OriginalProtocol::Http2));
        assert!(unmarked.is_empty());
    }

    #[test]
    fn extended_connect_becomes_an_upgrade_and_back() {
        let mut request = Request::new(());
        *request.method_mut() = Method::CONNECT;
        *request.version_mut() = Version::HTTP_2;
        *request.uri_mut() = "http://chat.local/ws".parse().unwrap();
        request
            .extensions_mut()
            .insert(hyper::ext::Protocol::from_static("websocket"));
        normalize_extended_connect(&mut request);
        assert_eq!(request.method(), Method::GET);
        assert!(crate::http::headers::is_upgrade_request(request.headers()));
        assert!(request.extensions().get::<ExtendedConnect>().is_some());

        let (mut parts, ()) = request.into_parts();
        fit_http1_upgrade(&mut parts.headers);
        assert_eq!(parts.headers[header::SEC_WEBSOCKET_VERSION], "13");
        let key = parts.headers[header::SEC_WEBSOCKET_KEY].clone();
        assert_eq!(
            base64::engine::general_purpose::STANDARD
                .decode(key.as_bytes())
                .unwrap()
                .len(),
            16
        );
        // A key the caller sent is kept.
        fit_http1_upgrade(&mut parts.headers);
        assert_eq!(parts.headers[header::SEC_WEBSOCKET_KEY], key);

        let protocol = to_extended_connect(&mut parts.method, &mut parts.headers);
        assert_eq!(protocol.as_str(), "websocket");
        assert_eq!(parts.method, Method::CONNECT);
        assert!(parts.headers.get(header::UPGRADE).is_none());
        assert!(parts.headers.get(header::CONNECTION).is_none());
    }

    #[test]
    fn plain_connect_and_http1_connect_stay_as_they_are() {
        let mut plain = Request::new(());
        *plain.method_mut() = Method::CONNECT;
        *plain.version_mut() = Version::HTTP_2;
        normalize_extended_connect(&mut plain);
        assert_eq!(plain.method(), Method::CONNECT);

        let mut http1 = Request::new(());
        *http1.method_mut() = Method::CONNECT;
        http1
            .extensions_mut()
            .insert(hyper::ext::Protocol::from_static("websocket"));
        normalize_extended_connect(&mut http1);
        assert_eq!(http1.method(), Method::CONNECT);
    }

    #[test]
    fn an_h2c_upgrade_does_not_become_a_tunnel() {
        assert!(tunnels_over_http2("websocket"));
        assert!(!tunnels_over_http2("h2c"));
        assert!(!tunnels_over_http2("H2C"));
        assert!(!tunnels_over_http2(""));
    }

    #[test]
    fn accepted_upgrades_are_answered_in_the_callers_terms() {
        use http::StatusCode as S;
        assert!(upstream_accepted(S::SWITCHING_PROTOCOLS, false));
        assert!(!upstream_accepted(S::OK, false));
        assert!(upstream_accepted(S::OK, true));
        assert!(!upstream_accepted(S::FORBIDDEN, true));

        let (mut parts, ()) = http::Response::new(()).into_parts();
        parts
            .headers
            .insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
        downstream_answer(&mut parts, false, "websocket", None);
        assert_eq!(parts.status, S::SWITCHING_PROTOCOLS);
        assert_eq!(parts.headers[header::UPGRADE], "websocket");
        assert_eq!(parts.headers[header::CONNECTION], "upgrade");
        assert!(parts.headers.get(header::CONTENT_LENGTH).is_none());

        downstream_answer(&mut parts, true, "websocket", None);
        assert_eq!(parts.status, S::OK);
        assert!(parts.headers.get(header::UPGRADE).is_none());
        assert!(parts.headers.get(header::CONNECTION).is_none());
    }

    #[test]
    fn an_rfc_8441_answer_gets_the_accept_an_http1_websocket_client_needs() {
        // The example of RFC 6455 section 1.3.
        let key = HeaderValue::from_static("dGhlIHNhbXBsZSBub25jZQ==");
        let (mut parts, ()) = http::Response::new(()).into_parts();
        downstream_answer(&mut parts, false, "websocket", Some(&key));
        assert_eq!(
            parts.headers[header::SEC_WEBSOCKET_ACCEPT],
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
        // An upstream's own accept is left as it is.
        let (mut parts, ()) = http::Response::new(()).into_parts();
        parts.headers.insert(
            header::SEC_WEBSOCKET_ACCEPT,
            HeaderValue::from_static("theirs"),
        );
        downstream_answer(&mut parts, false, "websocket", Some(&key));
        assert_eq!(parts.headers[header::SEC_WEBSOCKET_ACCEPT], "theirs");
    }
}

//! The header transforms between hops: inbound sanitising, forwarding
//! headers and hop-by-hop removal. Input: a flags line (`t` trusted
//! downstream, `s` TLS, `i` mesh peer with a SPIFFE ID, `u` keep upgrade,
//! `d` drop or `r` reject underscore names, then optionally a space and the
//! peer IP), then `name: value` header lines.
//!
//! Checked against what docs/security.md promises of each.

#![no_main]

use std::net::IpAddr;
use std::sync::Arc;

use http::{header, HeaderMap, HeaderName, HeaderValue};
use postern::http::headers::{
    authority_forms, is_upgrade_request, sanitize_inbound, set_forwarding, strip_hop_by_hop,
    DownstreamPeer, UnderscoreHeaders, X_FORWARDED_CLIENT_CERT, X_FORWARDED_FOR, X_FORWARDED_PROTO,
    X_REQUEST_ID,
};

fn managed(dashed: &str) -> bool {
    matches!(
        dashed,
        "content-length"
            | "transfer-encoding"
            | "host"
            | "forwarded"
            | "x-real-ip"
            | "x-request-id"
    ) || dashed.starts_with("x-forwarded-")
        || dashed.starts_with("x-postern-")
}

fn values(headers: &HeaderMap, name: &HeaderName) -> Vec<HeaderValue> {
    headers.get_all(name).iter().cloned().collect()
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let mut lines = data.split(|&b| b == b'\n');
    let Some(Ok(first)) = lines.next().map(std::str::from_utf8) else {
        return;
    };
    let (flags, peer_ip) = match first.split_once(' ') {
        Some((flags, ip)) => (flags, ip.parse::<IpAddr>().unwrap_or([10, 0, 0, 1].into())),
        None => (first, IpAddr::from([10, 0, 0, 1])),
    };
    let trusted = flags.contains('t');
    let underscores = if flags.contains('r') {
        UnderscoreHeaders::RejectRequest
    } else if flags.contains('d') {
        UnderscoreHeaders::DropHeader
    } else {
        UnderscoreHeaders::Allow
    };
    let mut headers = HeaderMap::new();
    for line in lines {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let (name, value) = (&line[..colon], line[colon + 1..].trim_ascii());
        if let (Ok(name), Ok(value)) =
            (HeaderName::from_bytes(name), HeaderValue::from_bytes(value))
        {
            headers.append(name, value);
        }
    }
    if let Some(host) = headers.get(header::HOST).and_then(|h| h.to_str().ok()) {
        let _ = authority_forms(host);
    }
    let _ = is_upgrade_request(&headers);

    // Inbound sanitising.
    let before = headers.clone();
    let rejected = sanitize_inbound(&mut headers, underscores).is_err();
    let offending = before.keys().any(|n| {
        let n = n.as_str();
        n.contains('_') && !n.starts_with("x-postern-") && !managed(&n.replace('_', "-"))
    });
    assert_eq!(
        rejected,
        underscores == UnderscoreHeaders::RejectRequest && offending,
        "reject_request refused {rejected}"
    );
    if rejected {
        return;
    }
    for name in before.keys() {
        let text = name.as_str();
        let must_go = (text.starts_with("x-postern-") && text != "x-postern-peer")
            || (text.contains('_')
                && (managed(&text.replace('_', "-"))
                    || underscores == UnderscoreHeaders::DropHeader));
        if must_go {
            assert!(!headers.contains_key(name), "{text} passed sanitising");
        } else {
            assert_eq!(
                values(&headers, name),
                values(&before, name),
                "{text} changed"
            );
        }
    }

    // Forwarding headers.
    let spiffe = flags.contains('i').then(|| {
        Arc::new(postern_certs_id(
            "spiffe://cluster.local/ns/default/sa/caller",
        ))
    });
    let tls = postern::tls::PeerTls {
        tls: flags.contains('s') || spiffe.is_some(),
        spiffe_id: spiffe,
        opaque: false,
        sni: None,
    };
    let local = postern_certs_id("spiffe://cluster.local/ns/default/sa/proxy");
    let peer = DownstreamPeer::new((peer_ip, 40000).into(), 8080, &tls, Some(&local));
    let sent_ids = values(&headers, &X_REQUEST_ID);
    set_forwarding(&mut headers, &peer, trusted);
    let xff = values(&headers, &X_FORWARDED_FOR);
    assert_eq!(xff.len(), 1, "x-forwarded-for lines: {xff:?}");
    assert!(
        xff[0].as_bytes().ends_with(peer.ip.as_bytes()),
        "x-forwarded-for {:?} does not end with the peer",
        xff[0]
    );
    let proto = values(&headers, &X_FORWARDED_PROTO);
    assert!(!proto.is_empty(), "no x-forwarded-proto");
    let ids = values(&headers, &X_REQUEST_ID);
    assert!(!ids.is_empty(), "no x-request-id");
    let xfcc = values(&headers, &X_FORWARDED_CLIENT_CERT);
    if !trusted {
        assert_eq!(proto.len(), 1);
        assert_eq!(proto[0], if tls.tls { "https" } else { "http" });
        assert_eq!(ids.len(), 1, "x-request-id lines: {ids:?}");
        assert!(
            !sent_ids.contains(&ids[0]),
            "the client chose the request id"
        );
        for name in headers.keys() {
            let name = name.as_str();
            assert!(
                name != "forwarded"
                    && name != "x-real-ip"
                    && (!name.starts_with("x-forwarded-")
                        || name == "x-forwarded-for"
                        || name == "x-forwarded-proto"
                        || name == "x-forwarded-client-cert"),
                "untrusted {name} passed"
            );
        }
    }
    if !(trusted && tls.spiffe_id.is_some()) {
        assert_eq!(
            xfcc,
            peer.xfcc.iter().cloned().collect::<Vec<_>>(),
            "x-forwarded-client-cert not ours"
        );
    }

    // Hop-by-hop removal.
    let keep_upgrade = flags.contains('u');
    // What the proxy frames by or has just set must reach the upstream,
    // whatever `Connection` names.
    let kept = [
        header::HOST,
        header::CONTENT_LENGTH,
        X_FORWARDED_FOR.clone(),
        X_FORWARDED_PROTO.clone(),
        X_REQUEST_ID.clone(),
        X_FORWARDED_CLIENT_CERT.clone(),
    ];
    let framing: Vec<_> = kept.iter().map(|name| values(&headers, name)).collect();
    strip_hop_by_hop(&mut headers, keep_upgrade);
    for name in [
        header::TRANSFER_ENCODING,
        header::PROXY_AUTHENTICATE,
        header::TRAILER,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
    ] {
        assert!(!headers.contains_key(&name), "{name} passed");
    }
    let te = values(&headers, &header::TE);
    assert!(te.is_empty() || te == ["trailers"], "te {te:?} passed");
    let connection = values(&headers, &header::CONNECTION);
    if keep_upgrade {
        assert_eq!(connection, ["upgrade"]);
    } else {
        assert!(connection.is_empty(), "connection {connection:?} passed");
        assert!(!headers.contains_key(header::UPGRADE), "upgrade passed");
    }
    for (name, before) in kept.iter().zip(framing) {
        assert_eq!(
            values(&headers, name),
            before,
            "hop-by-hop removal touched {name}"
        );
    }
});

fn postern_certs_id(id: &str) -> postern_certs::SpiffeId {
    postern_certs::SpiffeId::parse(id).expect("a valid SPIFFE ID")
}

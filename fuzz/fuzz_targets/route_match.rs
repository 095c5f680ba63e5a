//! The route matcher, on the route tables of the example gateway and of
//! `fixtures/front.yaml`. Input: a request line `METHOD authority
//! path[?query]`, then `name: value` header lines.
//!
//! Checked: the route found is the first of its virtual host that matches,
//! and the virtual host does not depend on the case, a trailing dot or a
//! port of a host name, nor on whether the router or RBAC (which reads
//! `authority_forms`) looks at it.

#![no_main]

use std::sync::{Arc, OnceLock};

use http::{HeaderMap, HeaderName, HeaderValue, Method};
use postern::config::ListenerProtocol;
use postern::http::headers::authority_forms;
use postern::route::{RequestView, RouteTable, VirtualHost};

fn tables() -> &'static [Arc<RouteTable>] {
    static TABLES: OnceLock<Vec<Arc<RouteTable>>> = OnceLock::new();
    TABLES.get_or_init(|| {
        [postern_fuzz::GATEWAY_YAML, postern_fuzz::FRONT_YAML]
            .into_iter()
            .flat_map(|yaml| postern_fuzz::offline_config(yaml).listeners)
            .filter_map(|l| match &l.protocol {
                ListenerProtocol::Http(http) => Some(http.routes.clone()),
                _ => None,
            })
            .collect()
    })
}

fn same(a: Option<&VirtualHost>, b: Option<&VirtualHost>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => std::ptr::eq(a, b),
        (None, None) => true,
        _ => false,
    }
}

/// A DNS-style name: what a client may spell in any case, with a dot or a port.
fn plain_host(host: &str) -> bool {
    !host.is_empty()
        && !host.ends_with('.')
        && !host.starts_with('.')
        && !host.contains("..")
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let mut lines = data.split(|&b| b == b'\n');
    let Some(Ok(first)) = lines.next().map(std::str::from_utf8) else {
        return;
    };
    let mut words = first.splitn(3, ' ');
    let (Some(method), Some(authority), Some(target)) = (words.next(), words.next(), words.next())
    else {
        return;
    };
    let method = Method::from_bytes(method.as_bytes()).unwrap_or(Method::GET);
    let (path, query) = match target.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (target, None),
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
    let view = RequestView {
        authority,
        path,
        query,
        method: &method,
        headers: &headers,
    };
    for table in tables() {
        let vhost = table.virtual_host(authority);
        if let Some((found_vhost, route)) = table.route(&view) {
            assert!(
                same(Some(found_vhost), vhost),
                "route from another virtual host"
            );
            assert!(
                route.matcher.matches(&view),
                "route {} does not match",
                route.name
            );
            let first = found_vhost
                .routes
                .iter()
                .position(|r| r.matcher.matches(&view))
                .expect("a route matched");
            assert_eq!(
                found_vhost.routes[first].name, route.name,
                "not the first match"
            );
        }
        let (host, _) = authority_forms(authority);
        // Only forms the router would not trim again (a second dot or port).
        if !host.contains(':') && !host.ends_with('.') {
            assert!(
                same(vhost, table.virtual_host(&host)),
                "router and RBAC see different hosts in {authority:?}"
            );
        }
        if plain_host(authority) {
            for variant in [
                authority.to_ascii_uppercase(),
                format!("{authority}."),
                format!("{authority}:8443"),
                format!("{}.:80", authority.to_ascii_uppercase()),
            ] {
                assert!(
                    same(vhost, table.virtual_host(&variant)),
                    "{authority:?} and {variant:?} reach different virtual hosts"
                );
            }
        }
    }
});

//! Header mutations of the route table (Envoy's `request_headers_to_add`,
//! `request_headers_to_remove`, `response_headers_to_add` and
//! `response_headers_to_remove`), compiled once at config load: names are
//! checked and values parsed into templates, so a request only fills them in.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::SystemTime;

use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Method, Version};

use crate::config::file::{AppendAction, HeaderAddFile, HeaderMutationsFile};
use crate::http::headers::DownstreamPeer;

/// One level's header changes: route configuration, virtual host, route or
/// weighted cluster.
#[derive(Debug, Default)]
pub struct HeaderMutations {
    /// Changes to the request sent upstream.
    pub request: HeaderOps,
    /// Changes to the response sent downstream.
    pub response: HeaderOps,
}

/// Removals, then additions, on one message.
#[derive(Debug, Default)]
pub struct HeaderOps {
    remove: Vec<HeaderName>,
    add: Vec<HeaderAdd>,
    reads_request: bool,
}

#[derive(Debug)]
struct HeaderAdd {
    name: HeaderName,
    value: Template,
    action: AppendAction,
    keep_empty: bool,
}

/// A header value with its command operators parsed.
#[derive(Debug)]
enum Template {
    /// No operator: the value itself.
    Constant(HeaderValue),
    /// Literal text and operators, in order.
    Parts(Vec<Part>),
}

#[derive(Debug)]
enum Part {
    Text(Vec<u8>),
    DownstreamRemoteAddress,
    DownstreamRemoteAddressWithoutPort,
    UpstreamRemoteAddress,
    Request {
        main: RequestField,
        alt: Option<RequestField>,
        max_len: Option<usize>,
    },
    Protocol,
    Hostname,
    StartTime,
    PeerUriSan,
}

#[derive(Debug)]
enum RequestField {
    Header(HeaderName),
    Authority,
    Path,
    Method,
}

/// What values are filled in from, for one request.
#[derive(Debug)]
pub struct Facts<'a> {
    /// The downstream connection's peer.
    pub peer: &'a DownstreamPeer,
    /// The request's Host / :authority.
    pub authority: &'a str,
    /// The request's path (as routed).
    pub path: &'a str,
    /// The request's method.
    pub method: &'a Method,
    /// The downstream protocol.
    pub version: Version,
    /// When the request arrived.
    pub start: SystemTime,
    /// The upstream that answered, for responses from one.
    pub upstream: Option<SocketAddr>,
    /// Request headers, for `%REQ(...)%` in response values; the request
    /// side reads the headers being changed.
    pub request_headers: Option<&'a HeaderMap>,
}

/// The endpoint that answered a forwarded request, carried in the
/// response's extensions to its header mutations.
#[derive(Debug, Clone, Copy)]
pub struct UpstreamAddress(pub SocketAddr);

impl HeaderMutations {
    /// Compiles one level; `None` when it changes nothing. Problems are
    /// reported as (path under `path`, reason).
    pub fn compile(
        file: &HeaderMutationsFile,
        path: &str,
        problems: &mut dyn FnMut(String, String),
    ) -> Option<Arc<HeaderMutations>> {
        if file.is_empty() {
            return None;
        }
        let request = HeaderOps::compile(
            &file.request_headers_to_add,
            &file.request_headers_to_remove,
            &format!("{path}.request_headers_to_add"),
            &format!("{path}.request_headers_to_remove"),
            problems,
        );
        let response = HeaderOps::compile(
            &file.response_headers_to_add,
            &file.response_headers_to_remove,
            &format!("{path}.response_headers_to_add"),
            &format!("{path}.response_headers_to_remove"),
            problems,
        );
        Some(Arc::new(HeaderMutations { request, response }))
    }

    /// Whether response values read request headers (which must then be
    /// kept until the response).
    pub fn response_reads_request(&self) -> bool {
        self.response.reads_request
    }
}

impl HeaderOps {
    fn compile(
        add: &[HeaderAddFile],
        remove: &[String],
        add_path: &str,
        remove_path: &str,
        problems: &mut dyn FnMut(String, String),
    ) -> HeaderOps {
        let mut ops = HeaderOps::default();
        for (i, name) in remove.iter().enumerate() {
            match check_name(name) {
                Ok(name) => ops.remove.push(name),
                Err(reason) => problems(format!("{remove_path}[{i}]"), reason),
            }
        }
        for (i, entry) in add.iter().enumerate() {
            let epath = format!("{add_path}[{i}]");
            let name = check_name(&entry.name)
                .map_err(|reason| problems(format!("{epath}.name"), reason))
                .ok();
            let value = parse_template(&entry.value)
                .map_err(|reason| problems(format!("{epath}.value"), reason))
                .ok();
            let action = match (entry.append_action, entry.append) {
                (Some(_), Some(_)) => {
                    problems(
                        format!("{epath}.append"),
                        "give append_action or the deprecated append, not both".into(),
                    );
                    AppendAction::default()
                }
                (Some(action), None) => action,
                (None, Some(true)) | (None, None) => AppendAction::AppendIfExistsOrAdd,
                (None, Some(false)) => AppendAction::OverwriteIfExistsOrAdd,
            };
            if let (Some(name), Some(value)) = (name, value) {
                ops.reads_request |= value.reads_request();
                ops.add.push(HeaderAdd {
                    name,
                    value,
                    action,
                    keep_empty: entry.keep_empty_value,
                });
            }
        }
        ops
    }

    /// Whether it changes nothing.
    pub fn is_empty(&self) -> bool {
        self.remove.is_empty() && self.add.is_empty()
    }

    /// Applies the removals, then the additions, to `headers`. A request's
    /// values read `headers` themselves; a response's read
    /// `facts.request_headers`.
    pub fn apply(&self, headers: &mut HeaderMap, facts: &Facts<'_>, request_side: bool) {
        for name in &self.remove {
            headers.remove(name);
        }
        if self.add.is_empty() {
            return;
        }
        // Values are filled in before any is added, so that one addition
        // never sees another of the same level (as in Envoy).
        let values: Vec<Option<HeaderValue>> = {
            let source = if request_side {
                Some(&*headers)
            } else {
                facts.request_headers
            };
            self.add
                .iter()
                .map(|add| add.value.render(facts, source))
                .collect()
        };
        for (add, value) in self.add.iter().zip(values) {
            let Some(value) = value else { continue };
            if value.is_empty() && !add.keep_empty {
                continue;
            }
            match add.action {
                AppendAction::AppendIfExistsOrAdd => {
                    headers.append(add.name.clone(), value);
                }
                AppendAction::AddIfAbsent => {
                    if !headers.contains_key(&add.name) {
                        headers.insert(add.name.clone(), value);
                    }
                }
                AppendAction::OverwriteIfExistsOrAdd => {
                    headers.insert(add.name.clone(), value);
                }
                AppendAction::OverwriteIfExists => {
                    if headers.contains_key(&add.name) {
                        headers.insert(add.name.clone(), value);
                    }
                }
            }
        }
    }
}

/// Checks a header name that a mutation adds or removes; the reason when
/// it may not be changed.
pub fn check_name(name: &str) -> Result<HeaderName, String> {
    if name.is_empty() {
        return Err("must not be empty".into());
    }
    let lower = name.to_ascii_lowercase();
    if lower.starts_with(':') || lower == "host" {
        // Envoy's rule: routing and framing read these.
        return Err(format!(
            "\"{name}\": pseudo-headers and host may not be modified (use a host rewrite)"
        ));
    }
    if matches!(
        lower.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "transfer-encoding"
            | "upgrade"
            | "te"
            | "trailer"
            | "content-length"
    ) {
        return Err(format!(
            "\"{name}\": framing and hop-by-hop headers are managed by the proxy"
        ));
    }
    if lower.starts_with("x-postern-") {
        // Peer metadata and overload signals: a route must not forge them.
        return Err(format!("\"{name}\": x-postern-* headers are Postern's own"));
    }
    HeaderName::from_bytes(lower.as_bytes())
        .map_err(|_| format!("\"{name}\" is not a valid header name"))
}

/// Command operators a value may use, for error messages.
const OPERATORS: &str = "%DOWNSTREAM_REMOTE_ADDRESS%, %DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%, \
%UPSTREAM_REMOTE_ADDRESS%, %REQ(name)%, %PROTOCOL%, %HOSTNAME%, %START_TIME%, \
%DOWNSTREAM_PEER_URI_SAN% and %% for a literal %";

/// Parses a header value with Envoy command operators; the reason when it
/// has an unknown or malformed one.
pub fn check_value(value: &str) -> Result<(), String> {
    parse_template(value).map(|_| ())
}

fn parse_template(value: &str) -> Result<Template, String> {
    let mut parts = Vec::new();
    let mut text = Vec::new();
    let mut rest = value;
    while let Some(at) = rest.find('%') {
        text.extend_from_slice(&rest.as_bytes()[..at]);
        let after = &rest[at + 1..];
        if let Some(tail) = after.strip_prefix('%') {
            text.push(b'%');
            rest = tail;
            continue;
        }
        let Some(end) = after.find('%') else {
            return Err(format!(
                "unterminated command operator at \"%{after}\" (write %% for a literal %)"
            ));
        };
        if !text.is_empty() {
            parts.push(Part::Text(std::mem::take(&mut text)));
        }
        parts.push(parse_operator(&after[..end])?);
        rest = &after[end + 1..];
    }
    text.extend_from_slice(rest.as_bytes());
    if parts.is_empty() {
        return HeaderValue::from_bytes(&text)
            .map(Template::Constant)
            .map_err(|_| "is not a valid header value".to_string());
    }
    if !text.is_empty() {
        parts.push(Part::Text(text));
    }
    for part in &parts {
        if let Part::Text(t) = part {
            HeaderValue::from_bytes(t).map_err(|_| "is not a valid header value".to_string())?;
        }
    }
    Ok(Template::Parts(parts))
}

fn parse_operator(token: &str) -> Result<Part, String> {
    let unknown = || format!("unknown command operator %{token}% (Postern supports {OPERATORS})");
    let (name, args) = match token.find('(') {
        None => (token, None),
        Some(open) => {
            let close = token.rfind(')').ok_or_else(unknown)?;
            if close < open {
                return Err(unknown());
            }
            (
                &token[..open],
                Some((&token[open + 1..close], &token[close + 1..])),
            )
        }
    };
    let plain = match name {
        "DOWNSTREAM_REMOTE_ADDRESS" => Some(Part::DownstreamRemoteAddress),
        "DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT" => Some(Part::DownstreamRemoteAddressWithoutPort),
        "UPSTREAM_REMOTE_ADDRESS" => Some(Part::UpstreamRemoteAddress),
        "PROTOCOL" => Some(Part::Protocol),
        "HOSTNAME" => Some(Part::Hostname),
        "START_TIME" => Some(Part::StartTime),
        "DOWNSTREAM_PEER_URI_SAN" => Some(Part::PeerUriSan),
        _ => None,
    };
    if let Some(part) = plain {
        return match args {
            None => Ok(part),
            Some(_) => Err(format!(
                "%{name}% takes no arguments here (custom formats are not supported)"
            )),
        };
    }
    if name != "REQ" {
        return Err(unknown());
    }
    let Some((inner, suffix)) = args else {
        return Err("%REQ% needs a header name: %REQ(name)%".into());
    };
    let max_len = match suffix {
        "" => None,
        s => Some(
            s.strip_prefix(':')
                .and_then(|n| n.parse::<usize>().ok())
                .filter(|n| *n > 0)
                .ok_or_else(|| format!("\"{s}\" after %REQ(...) is not :length"))?,
        ),
    };
    let (main, alt) = match inner.split_once('?') {
        Some((main, alt)) => (main, Some(alt)),
        None => (inner, None),
    };
    Ok(Part::Request {
        main: request_field(main)?,
        alt: alt.map(request_field).transpose()?,
        max_len,
    })
}

fn request_field(name: &str) -> Result<RequestField, String> {
    match name.to_ascii_lowercase().as_str() {
        ":authority" | "host" => Ok(RequestField::Authority),
        ":path" => Ok(RequestField::Path),
        ":method" => Ok(RequestField::Method),
        lower => HeaderName::from_bytes(lower.as_bytes())
            .map(RequestField::Header)
            .map_err(|_| format!("%REQ({name})%: \"{name}\" is not a header name")),
    }
}

impl Template {
    fn reads_request(&self) -> bool {
        match self {
            Template::Constant(_) => false,
            Template::Parts(parts) => parts.iter().any(|p| matches!(p, Part::Request { .. })),
        }
    }

    /// The value for one message; `None` if it does not make a valid value.
    fn render(&self, facts: &Facts<'_>, request: Option<&HeaderMap>) -> Option<HeaderValue> {
        let parts = match self {
            Template::Constant(value) => return Some(value.clone()),
            Template::Parts(parts) => parts,
        };
        let mut out: Vec<u8> = Vec::with_capacity(64);
        for part in parts {
            match part {
                Part::Text(t) => out.extend_from_slice(t),
                Part::DownstreamRemoteAddress => {
                    out.extend_from_slice(facts.peer.remote.to_string().as_bytes())
                }
                Part::DownstreamRemoteAddressWithoutPort => {
                    out.extend_from_slice(facts.peer.ip.as_bytes())
                }
                Part::UpstreamRemoteAddress => {
                    if let Some(addr) = facts.upstream {
                        out.extend_from_slice(addr.to_string().as_bytes());
                    }
                }
                Part::Request { main, alt, max_len } => {
                    let value = lookup(main, facts, request)
                        .or_else(|| alt.as_ref().and_then(|a| lookup(a, facts, request)))
                        .unwrap_or_default();
                    let len = max_len.map_or(value.len(), |max| max.min(value.len()));
                    out.extend_from_slice(&value[..len]);
                }
                Part::Protocol => out.extend_from_slice(protocol(facts.version).as_bytes()),
                Part::Hostname => out.extend_from_slice(hostname().as_bytes()),
                Part::StartTime => {
                    let mut stamp = Vec::with_capacity(32);
                    crate::telemetry::access_log::write_rfc3339(&mut stamp, facts.start);
                    // Envoy's default: milliseconds (`YYYY-MM-DDTHH:MM:SS.mmmZ`).
                    stamp.truncate(23);
                    stamp.push(b'Z');
                    out.extend_from_slice(&stamp);
                }
                Part::PeerUriSan => {
                    if let Some(id) = &facts.peer.spiffe_id {
                        out.extend_from_slice(id.as_str().as_bytes());
                    }
                }
            }
        }
        HeaderValue::from_maybe_shared(bytes::Bytes::from(out)).ok()
    }
}

fn lookup<'a>(
    field: &RequestField,
    facts: &'a Facts<'_>,
    request: Option<&'a HeaderMap>,
) -> Option<&'a [u8]> {
    match field {
        RequestField::Header(name) => request?.get(name).map(HeaderValue::as_bytes),
        RequestField::Authority => Some(facts.authority.as_bytes()),
        RequestField::Path => Some(facts.path.as_bytes()),
        RequestField::Method => Some(facts.method.as_str().as_bytes()),
    }
}

fn protocol(version: Version) -> &'static str {
    match version {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_11 => "HTTP/1.1",
        Version::HTTP_2 => "HTTP/2",
        Version::HTTP_3 => "HTTP/3",
        _ => "",
    }
}

/// This machine's host name, read once.
fn hostname() -> &'static str {
    static NAME: OnceLock<String> = OnceLock::new();
    NAME.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .or_else(|_| std::fs::read_to_string("/etc/hostname"))
            .map(|s| s.trim().to_string())
            .ok()
            .filter(|s| !s.is_empty())
            .or_else(|| std::env::var("HOSTNAME").ok())
            .unwrap_or_default()
    })
}

/// The levels that apply to one request, in the order they are applied.
#[derive(Debug, Default)]
pub struct Plan<'a> {
    levels: [Option<&'a HeaderMutations>; 4],
}

impl<'a> Plan<'a> {
    /// By default the most specific level goes first, so the least
    /// specific one (the route configuration) has the last word, as in
    /// Envoy; `most_specific_wins` reverses that.
    pub fn new(
        global: Option<&'a HeaderMutations>,
        vhost: Option<&'a HeaderMutations>,
        route: Option<&'a HeaderMutations>,
        weighted: Option<&'a HeaderMutations>,
        most_specific_wins: bool,
    ) -> Plan<'a> {
        let levels = if most_specific_wins {
            [global, vhost, route, weighted]
        } else {
            [weighted, route, vhost, global]
        };
        Plan { levels }
    }

    /// Whether no level changes anything.
    pub fn is_empty(&self) -> bool {
        self.levels.iter().all(Option::is_none)
    }

    /// Whether some level changes the request.
    pub fn changes_request(&self) -> bool {
        self.levels.iter().flatten().any(|l| !l.request.is_empty())
    }

    /// Whether some level changes the response.
    pub fn changes_response(&self) -> bool {
        self.levels.iter().flatten().any(|l| !l.response.is_empty())
    }

    /// Whether response values read the request's headers.
    pub fn response_reads_request(&self) -> bool {
        self.levels
            .iter()
            .flatten()
            .any(|l| l.response_reads_request())
    }

    /// Applies every level's request changes.
    pub fn apply_request(&self, headers: &mut HeaderMap, facts: &Facts<'_>) {
        for level in self.levels.iter().flatten() {
            level.request.apply(headers, facts, true);
        }
    }

    /// Applies every level's response changes.
    pub fn apply_response(&self, headers: &mut HeaderMap, facts: &Facts<'_>) {
        for level in self.levels.iter().flatten() {
            level.response.apply(headers, facts, false);
        }
    }
}

#[cfg(test)]
mod tests;

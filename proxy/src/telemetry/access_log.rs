//! Access logs: one JSON line per call, to stdout or a file.
//!
//! Lines are formatted on the calling task and handed to a writer thread
//! through a bounded queue; when the output cannot keep up, lines are
//! dropped and counted rather than slowing calls down.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::UNIX_EPOCH;

use http::HeaderName;
use serde::{Deserialize, Serialize};

use super::log::CallLog;
use super::ResponseFlag;

/// Access-log lines written.
pub const ACCESS_LOG_WRITTEN_TOTAL: &str = "postern_access_log_lines_total";
/// Access-log lines dropped because the output could not keep up.
pub const ACCESS_LOG_DROPPED_TOTAL: &str = "postern_access_log_dropped_total";

/// Describes the access-log metrics.
pub fn describe() {
    metrics::describe_counter!(ACCESS_LOG_WRITTEN_TOTAL, "Access-log lines written");
    metrics::describe_counter!(
        ACCESS_LOG_DROPPED_TOTAL,
        "Access-log lines dropped because the output could not keep up"
    );
}

/// A field of an access-log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LogField {
    /// RFC 3339 start time, UTC, with microseconds.
    StartTime,
    /// Listener name.
    Listener,
    /// `inbound` or `outbound`.
    Direction,
    /// Request method.
    Method,
    /// Request authority.
    Authority,
    /// Normalised path and query (secrets in the query redacted).
    Path,
    /// `HTTP/1.1`, `HTTP/2`, `TCP`, …
    Protocol,
    /// Response status (0: none sent).
    Status,
    /// gRPC status.
    GrpcStatus,
    /// Response flags (`-` when none).
    Flags,
    /// Request body bytes (TCP: bytes from downstream).
    BytesReceived,
    /// Response body bytes (TCP: bytes to downstream).
    BytesSent,
    /// Duration in milliseconds.
    DurationMs,
    /// Upstream time to first byte (response headers), in milliseconds.
    UpstreamTtfbMs,
    /// Upstream endpoint address.
    UpstreamHost,
    /// Cluster.
    Cluster,
    /// Route name.
    Route,
    /// `x-request-id`.
    RequestId,
    /// W3C trace id.
    TraceId,
    /// Downstream peer address.
    DownstreamAddress,
    /// Downstream peer SPIFFE ID.
    DownstreamPrincipal,
    /// Upstream peer SPIFFE ID.
    UpstreamPrincipal,
    /// `user-agent`.
    UserAgent,
}

impl LogField {
    /// The default line: every field.
    pub const ALL: [LogField; 23] = [
        LogField::StartTime,
        LogField::Listener,
        LogField::Direction,
        LogField::Method,
        LogField::Authority,
        LogField::Path,
        LogField::Protocol,
        LogField::Status,
        LogField::GrpcStatus,
        LogField::Flags,
        LogField::BytesReceived,
        LogField::BytesSent,
        LogField::DurationMs,
        LogField::UpstreamTtfbMs,
        LogField::UpstreamHost,
        LogField::Cluster,
        LogField::Route,
        LogField::RequestId,
        LogField::TraceId,
        LogField::DownstreamAddress,
        LogField::DownstreamPrincipal,
        LogField::UpstreamPrincipal,
        LogField::UserAgent,
    ];

    fn key(self) -> &'static str {
        match self {
            LogField::StartTime => "start_time",
            LogField::Listener => "listener",
            LogField::Direction => "direction",
            LogField::Method => "method",
            LogField::Authority => "authority",
            LogField::Path => "path",
            LogField::Protocol => "protocol",
            LogField::Status => "status",
            LogField::GrpcStatus => "grpc_status",
            LogField::Flags => "flags",
            LogField::BytesReceived => "bytes_received",
            LogField::BytesSent => "bytes_sent",
            LogField::DurationMs => "duration_ms",
            LogField::UpstreamTtfbMs => "upstream_ttfb_ms",
            LogField::UpstreamHost => "upstream_host",
            LogField::Cluster => "cluster",
            LogField::Route => "route",
            LogField::RequestId => "request_id",
            LogField::TraceId => "trace_id",
            LogField::DownstreamAddress => "downstream_address",
            LogField::DownstreamPrincipal => "downstream_principal",
            LogField::UpstreamPrincipal => "upstream_principal",
            LogField::UserAgent => "user_agent",
        }
    }
}

/// Which calls are logged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFilter {
    /// Every call.
    #[default]
    All,
    /// Calls that failed: status 0 or ≥ 400, or a flag other than `DR`.
    Errors,
}

/// Sampling and filtering, for the whole log or one route.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LogPolicyFile {
    /// Which calls are logged.
    #[serde(default)]
    pub filter: LogFilter,
    /// Fraction of the calls that pass the filter to log, 0 to 1.
    #[serde(default = "one")]
    pub sample: f64,
}

fn one() -> f64 {
    1.0
}

impl Default for LogPolicyFile {
    fn default() -> Self {
        LogPolicyFile {
            filter: LogFilter::All,
            sample: 1.0,
        }
    }
}

impl LogPolicyFile {
    /// Whether this call is logged (drawing the sample).
    pub fn admits_call(&self, status: u16, flags: super::ResponseFlags) -> bool {
        let passes = match self.filter {
            LogFilter::All => true,
            LogFilter::Errors => {
                status == 0
                    || status >= 400
                    || flags.iter().any(|f| f != ResponseFlag::DirectResponse)
            }
        };
        passes && (self.sample >= 1.0 || rand::random::<f64>() < self.sample)
    }

    /// Field-path errors, relative to this policy.
    pub fn validate(&self) -> Option<(&'static str, String)> {
        (!(0.0..=1.0).contains(&self.sample)).then(|| {
            (
                "sample",
                format!("must be between 0 and 1, not {}", self.sample),
            )
        })
    }
}

/// Where access-log lines go.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum LogOutput {
    /// Standard output (`stdout`).
    Stdout(StdoutTag),
    /// A file, appended to.
    File(PathBuf),
}

/// The literal `stdout`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StdoutTag {
    /// Standard output.
    Stdout,
}

/// The `telemetry.access_log` section.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AccessLogFile {
    /// `stdout` or a file path.
    #[serde(default = "stdout")]
    pub output: LogOutput,
    /// Fields of each line, in order; all of them when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fields: Option<Vec<LogField>>,
    /// Request headers to add to each line (as `req_<name>`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub request_headers: Vec<String>,
    /// Header names whose values are replaced by `[REDACTED]`, besides
    /// `authorization`, `proxy-authorization`, `cookie`, `set-cookie`,
    /// `x-api-key` and `api-key`, which always are.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub redact_headers: Vec<String>,
    /// Query parameters whose values are redacted in `path`, besides
    /// `api_key`, `apikey`, `key`, `token`, `access_token`, `password`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub redact_query: Vec<String>,
    /// Default filter and sampling; routes may override.
    #[serde(default, flatten)]
    pub policy: LogPolicyFile,
    /// Lines queued for the writer; past it lines are dropped and counted.
    #[serde(default = "default_buffer")]
    pub buffer: usize,
}

fn stdout() -> LogOutput {
    LogOutput::Stdout(StdoutTag::Stdout)
}

fn default_buffer() -> usize {
    8192
}

const ALWAYS_REDACTED_HEADERS: [&str; 6] = [
    "authorization",
    "proxy-authorization",
    "cookie",
    "set-cookie",
    "x-api-key",
    "api-key",
];
const ALWAYS_REDACTED_QUERY: [&str; 6] = [
    "api_key",
    "apikey",
    "key",
    "token",
    "access_token",
    "password",
];
const REDACTED: &str = "[REDACTED]";

/// Request headers kept for the log sinks, with secrets replaced.
#[derive(Debug, Default, Clone)]
pub struct HeaderCapture {
    /// Each header kept, and whether its value is redacted.
    headers: Vec<(HeaderName, bool)>,
}

impl HeaderCapture {
    /// Keeps `names` (invalid ones skipped), redacting the always-secret
    /// headers and `redact`.
    pub fn new<'a>(
        names: impl IntoIterator<Item = &'a String>,
        redact: &[String],
    ) -> HeaderCapture {
        let mut headers: Vec<(HeaderName, bool)> = Vec::new();
        for name in names {
            let Ok(name) = HeaderName::from_bytes(name.as_bytes()) else {
                continue;
            };
            if headers.iter().any(|(h, _)| *h == name) {
                continue;
            }
            let secret = ALWAYS_REDACTED_HEADERS.contains(&name.as_str())
                || redact.iter().any(|r| r.eq_ignore_ascii_case(name.as_str()));
            headers.push((name, secret));
        }
        HeaderCapture { headers }
    }

    /// Whether no header is kept.
    pub fn is_empty(&self) -> bool {
        self.headers.is_empty()
    }

    /// How many headers are kept.
    pub(crate) fn len(&self) -> usize {
        self.headers.len()
    }

    /// Where `name` is among the kept headers, if it is kept.
    pub(crate) fn position(&self, name: &HeaderName) -> Option<usize> {
        self.headers.iter().position(|(kept, _)| kept == name)
    }

    /// The kept headers given the first value of each (by
    /// [`HeaderCapture::position`]; `found` may run longer), secrets
    /// replaced by `[REDACTED]`: what [`HeaderCapture::capture`] returns.
    pub(crate) fn kept(
        &self,
        found: &[Option<&http::HeaderValue>],
    ) -> Vec<(HeaderName, http::HeaderValue)> {
        self.headers
            .iter()
            .zip(found)
            .filter_map(|((name, redact), value)| {
                let value = value.as_ref()?;
                let value = if *redact {
                    http::HeaderValue::from_static(REDACTED)
                } else {
                    (*value).clone()
                };
                Some((name.clone(), value))
            })
            .collect()
    }

    /// The kept headers of a request, secrets replaced by `[REDACTED]`.
    pub fn capture(&self, headers: &http::HeaderMap) -> Vec<(HeaderName, http::HeaderValue)> {
        self.headers
            .iter()
            .filter_map(|(name, redact)| {
                let value = headers.get(name)?;
                let value = if *redact {
                    http::HeaderValue::from_static(REDACTED)
                } else {
                    value.clone()
                };
                Some((name.clone(), value))
            })
            .collect()
    }
}

/// A compiled access log with its writer.
#[derive(Debug)]
pub struct AccessLog {
    /// Each field with its key and the opening quote of a string value,
    /// `"key":"`.
    fields: Vec<(LogField, Key)>,
    written: ::metrics::Counter,
    dropped: ::metrics::Counter,
    /// Request headers the line shows.
    request_headers: Vec<HeaderName>,
    redact_query: Vec<String>,
    /// The default policy.
    pub policy: LogPolicyFile,
    pending: Arc<Pending>,
    max_lines: usize,
}

/// A bad access-log setting: the field and the reason.
#[derive(Debug, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct AccessLogError {
    /// Field path within `access_log`.
    pub field: String,
    /// Why.
    pub reason: String,
}

impl AccessLogFile {
    /// Checks the settings; errors name the field within `access_log`.
    pub fn validate(&self) -> Vec<AccessLogError> {
        let mut errors = Vec::new();
        for (i, name) in self
            .request_headers
            .iter()
            .chain(&self.redact_headers)
            .enumerate()
        {
            if HeaderName::from_bytes(name.as_bytes()).is_err() {
                let field = if i < self.request_headers.len() {
                    format!("request_headers[{i}]")
                } else {
                    format!("redact_headers[{}]", i - self.request_headers.len())
                };
                errors.push(AccessLogError {
                    field,
                    reason: format!("{name:?} is not a valid header name"),
                });
            }
        }
        if let Some((field, reason)) = self.policy.validate() {
            errors.push(AccessLogError {
                field: field.into(),
                reason,
            });
        }
        if self.buffer == 0 {
            errors.push(AccessLogError {
                field: "buffer".into(),
                reason: "must be at least 1".into(),
            });
        }
        errors
    }
}

impl AccessLog {
    /// Opens the output and starts the writer thread.
    pub fn start(file: &AccessLogFile) -> std::io::Result<Arc<AccessLog>> {
        let output: Box<dyn Write + Send> = match &file.output {
            LogOutput::Stdout(_) => Box::new(std::io::stdout()),
            LogOutput::File(path) => Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)?,
            ),
        };
        let pending = Arc::new(Pending::default());
        let writer = pending.clone();
        std::thread::Builder::new()
            .name("postern-access-log".into())
            .spawn(move || write_lines(writer, output))?;
        Ok(Arc::new(AccessLog {
            fields: file
                .fields
                .as_deref()
                .unwrap_or(&LogField::ALL)
                .iter()
                .map(|field| (*field, Key::new(field.key())))
                .collect(),
            written: metrics::counter!(ACCESS_LOG_WRITTEN_TOTAL),
            dropped: metrics::counter!(ACCESS_LOG_DROPPED_TOTAL),
            request_headers: file
                .request_headers
                .iter()
                .filter_map(|h| HeaderName::from_bytes(h.as_bytes()).ok())
                .collect(),
            redact_query: ALWAYS_REDACTED_QUERY
                .iter()
                .map(|s| s.to_string())
                .chain(file.redact_query.iter().map(|q| q.to_ascii_lowercase()))
                .collect(),
            policy: file.policy,
            pending,
            max_lines: file.buffer.max(1),
        }))
    }

    /// Queues the line for a call; drops it (counted) if the writer is behind.
    pub fn write(&self, log: &CallLog) {
        // Formatted aside, then copied in: formatting under the writer's
        // lock would serialise the worker threads on it for the whole
        // line (about a microsecond), where the copy holds it for a few
        // dozen nanoseconds.
        thread_local! {
            static SCRATCH: std::cell::RefCell<Vec<u8>> =
                std::cell::RefCell::new(Vec::with_capacity(LINE_RESERVE));
        }
        let pushed = SCRATCH.with(|scratch| {
            let mut line = scratch.borrow_mut();
            line.clear();
            self.format_into(log, &mut line);
            self.pending.push(&line, self.max_lines)
        });
        if pushed {
            self.written.increment(1);
        } else {
            self.dropped.increment(1);
        }
    }

    /// Writes out every queued line (at shutdown), waiting at most a few seconds.
    pub fn flush(&self) {
        self.pending.flush();
    }

    /// The JSON line for a call, newline included.
    pub fn format(&self, log: &CallLog) -> Vec<u8> {
        let mut out = Vec::with_capacity(512);
        self.format_into(log, &mut out);
        out
    }

    /// Appends the JSON line for a call to `out`.
    fn format_into(&self, log: &CallLog, out: &mut Vec<u8>) {
        out.reserve(LINE_RESERVE);
        out.push(b'{');
        let mut first = true;
        for (field, key) in &self.fields {
            let key = KeyAt { key, comma: !first };
            first &= !self.write_field(*field, key, log, out);
        }
        for (name, value) in log
            .request_headers
            .iter()
            .filter(|(name, _)| self.request_headers.contains(name))
        {
            // Header names are tokens: nothing in them needs escaping.
            put_header_key(out, &mut first, name);
            write_json_string(out, &String::from_utf8_lossy(value.as_bytes()));
        }
        out.extend_from_slice(b"}\n");
    }

    /// Writes `key` (`"name":"`, or with a comma before) and the field's
    /// value; nothing, and false, when the field has no value. Each field
    /// is written by its own arm, without an intermediate value to match
    /// on again: this runs for every field of every line.
    #[inline]
    fn write_field(
        &self,
        field: LogField,
        key: KeyAt<'_>,
        log: &CallLog,
        out: &mut Vec<u8>,
    ) -> bool {
        match field {
            LogField::StartTime => {
                key.open(out);
                write_rfc3339(out, log.start_time);
                out.push(b'"');
            }
            LogField::Listener => put_text(out, key, &log.listener),
            LogField::Direction => put_plain(
                out,
                key,
                match log.direction {
                    super::log::TrafficDirection::Inbound => "inbound",
                    super::log::TrafficDirection::Outbound => "outbound",
                },
            ),
            LogField::Method => match &log.method {
                Some(method) => put_text(out, key, method.as_str()),
                None => return false,
            },
            LogField::Authority => return put_header(out, key, log.authority.as_ref()),
            LogField::Path => match &log.path {
                Some(path) => match redact_query(path.as_str(), &self.redact_query) {
                    std::borrow::Cow::Borrowed(p) => put_text(out, key, p),
                    std::borrow::Cow::Owned(p) => put_text(out, key, &p),
                },
                None => return false,
            },
            LogField::Protocol => put_text(out, key, log.protocol),
            LogField::Status => {
                key.bare(out);
                push_decimal(out, u64::from(log.status));
            }
            LogField::GrpcStatus => match log.grpc_status {
                Some(code) => {
                    key.bare(out);
                    push_decimal(out, u64::from(code));
                }
                None => return false,
            },
            // Codes and commas, or `-`: nothing to escape.
            LogField::Flags => put_plain(out, key, log.flags.as_str()),
            LogField::BytesReceived => {
                key.bare(out);
                push_decimal(out, log.bytes_received);
            }
            LogField::BytesSent => {
                key.bare(out);
                push_decimal(out, log.bytes_sent);
            }
            LogField::DurationMs => {
                key.bare(out);
                write_millis(out, log.duration.as_secs_f64() * 1000.0);
            }
            LogField::UpstreamTtfbMs => match log.upstream_ttfb {
                Some(ttfb) => {
                    key.bare(out);
                    write_millis(out, ttfb.as_secs_f64() * 1000.0);
                }
                None => return false,
            },
            LogField::UpstreamHost => match log.upstream_host {
                Some(host) => {
                    key.open(out);
                    push_socket_addr(out, host);
                    out.push(b'"');
                }
                None => return false,
            },
            LogField::Cluster => return put_optional(out, key, log.cluster.as_deref()),
            LogField::Route => return put_optional(out, key, log.route.as_deref()),
            LogField::RequestId => return put_header(out, key, log.request_id.as_ref()),
            LogField::TraceId => match log.trace_id {
                Some(id) => {
                    key.open(out);
                    out.extend_from_slice(&super::trace::hex32(id));
                    out.push(b'"');
                }
                None => return false,
            },
            LogField::DownstreamAddress => {
                key.open(out);
                push_socket_addr(out, log.downstream_addr);
                out.push(b'"');
            }
            LogField::DownstreamPrincipal => {
                return put_optional(out, key, log.downstream_principal.as_deref())
            }
            LogField::UpstreamPrincipal => {
                return put_optional(out, key, log.upstream_principal.as_deref())
            }
            LogField::UserAgent => return put_header(out, key, log.user_agent.as_ref()),
        }
        true
    }
}

/// Room for a typical line, reserved once so the writes of its fields do
/// not each grow the buffer.
const LINE_RESERVE: usize = 1024;

/// Room for the longest key, `"downstream_principal":"`, and more.
const KEY_ROOM: usize = 32;

/// A field's key as written, `"key":"`, in a fixed-size array: copied
/// whole and cut to length, that is two stores, where a copy of the
/// exact length is a call.
#[derive(Debug)]
struct Key {
    text: [u8; KEY_ROOM],
    len: usize,
}

impl Key {
    fn new(name: &str) -> Key {
        let written = format!("\"{name}\":\"");
        let mut text = [0; KEY_ROOM];
        // Every name is a short literal of `LogField::key`.
        text[..written.len()].copy_from_slice(written.as_bytes());
        Key {
            text,
            len: written.len(),
        }
    }
}

/// A key where it goes in a line: after another field or first.
#[derive(Clone, Copy)]
struct KeyAt<'a> {
    key: &'a Key,
    comma: bool,
}

impl KeyAt<'_> {
    /// Writes the key with the opening quote of a string value.
    #[inline]
    fn open(self, out: &mut Vec<u8>) {
        self.write(out, self.key.len);
    }

    /// Writes the key alone, before a number.
    #[inline]
    fn bare(self, out: &mut Vec<u8>) {
        self.write(out, self.key.len - 1);
    }

    #[inline]
    fn write(self, out: &mut Vec<u8>, len: usize) {
        if self.comma {
            out.push(b',');
        }
        let at = out.len();
        out.extend_from_slice(&self.key.text);
        out.truncate(at + len);
    }
}

/// Writes `key` and `s` as a JSON string.
#[inline]
fn put_text(out: &mut Vec<u8>, key: KeyAt<'_>, s: &str) {
    if !needs_escape(s.as_bytes()) {
        put_plain(out, key, s);
    } else {
        key.bare(out);
        write_escaped(out, s);
    }
}

/// Like [`put_text`], for text known to need no escaping.
#[inline]
fn put_plain(out: &mut Vec<u8>, key: KeyAt<'_>, s: &str) {
    key.open(out);
    out.extend_from_slice(s.as_bytes());
    out.push(b'"');
}

/// [`put_text`] when there is a value; false when there is none.
#[inline]
fn put_optional(out: &mut Vec<u8>, key: KeyAt<'_>, s: Option<&str>) -> bool {
    match s {
        Some(s) => {
            put_text(out, key, s);
            true
        }
        None => false,
    }
}

/// A header's text as a JSON string; none (false) when the header is
/// absent or not visible ASCII, as [`http::HeaderValue::to_str`] decides.
#[inline]
fn put_header(out: &mut Vec<u8>, key: KeyAt<'_>, value: Option<&http::HeaderValue>) -> bool {
    let Some(value) = value else {
        return false;
    };
    let bytes = value.as_bytes();
    // Printable ASCII but `"` and `\`, found a word at a time: valid
    // for `to_str` and written as it is. Anything else takes the careful
    // way, which checks a byte at a time.
    if !needs_escape_or_high(bytes) {
        key.open(out);
        out.extend_from_slice(bytes);
        out.push(b'"');
        return true;
    }
    put_optional(out, key, value.to_str().ok())
}

/// Milliseconds with three decimals, rounded, without the formatting
/// machinery: this runs for every call.
fn write_millis(out: &mut Vec<u8>, millis: f64) {
    let thousandths = (millis.max(0.0) * 1000.0).round() as u64;
    push_decimal(out, thousandths / 1000);
    let frac = thousandths % 1000;
    out.extend_from_slice(&[
        b'.',
        b'0' + (frac / 100) as u8,
        b'0' + (frac / 10 % 10) as u8,
        b'0' + (frac % 10) as u8,
    ]);
}

/// Writes `n` in decimal. Numbers in a line are mostly short: those are
/// written as fixed-size arrays, which compile to a store each, where a
/// copy of a variable length is a call.
#[inline]
fn push_decimal(out: &mut Vec<u8>, n: u64) {
    let digit = |d: u64| b'0' + (d % 10) as u8;
    if n < 10 {
        out.push(digit(n));
    } else if n < 100 {
        out.extend_from_slice(&[digit(n / 10), digit(n)]);
    } else if n < 1000 {
        out.extend_from_slice(&[digit(n / 100), digit(n / 10), digit(n)]);
    } else if n < 10_000 {
        out.extend_from_slice(&[digit(n / 1000), digit(n / 100), digit(n / 10), digit(n)]);
    } else if n < 100_000 {
        out.extend_from_slice(&[
            digit(n / 10_000),
            digit(n / 1000),
            digit(n / 100),
            digit(n / 10),
            digit(n),
        ]);
    } else {
        out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
    }
}

/// Writes `"req_<name>":` for a kept request header.
fn put_header_key(out: &mut Vec<u8>, first: &mut bool, name: &HeaderName) {
    if !*first {
        out.push(b',');
    }
    *first = false;
    out.extend_from_slice(b"\"req_");
    out.extend_from_slice(name.as_str().as_bytes());
    out.extend_from_slice(b"\":");
}

/// Writes `n` in decimal, zero-padded to `width` digits.
fn write_digits(out: &mut Vec<u8>, mut n: u64, width: usize) {
    let mut digits = [b'0'; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    at = at.min(digits.len().saturating_sub(width));
    out.extend_from_slice(&digits[at..]);
}

fn write_json_string(out: &mut Vec<u8>, s: &str) {
    // Most values need no escaping: copied as they are.
    if !needs_escape(s.as_bytes()) {
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    } else {
        write_escaped(out, s);
    }
}

/// A string that needs escaping goes through serde_json, which escapes
/// control characters and quotes, so a caller-chosen value can never break
/// the line.
#[cold]
fn write_escaped(out: &mut Vec<u8>, s: &str) {
    let _ = serde_json::to_writer(&mut *out, s);
}

/// Whether `bytes` must take the careful path: it holds a control byte,
/// `"`, `\\` or DEL.
fn needs_escape(bytes: &[u8]) -> bool {
    flagged_bytes::<false>(bytes)
}

/// Like [`needs_escape`], and also true for any byte outside ASCII.
fn needs_escape_or_high(bytes: &[u8]) -> bool {
    flagged_bytes::<true>(bytes)
}

fn flagged_bytes<const HIGH_TOO: bool>(bytes: &[u8]) -> bool {
    // Eight bytes per step (the byte-wise loop did not vectorise, and cost
    // more than the rest of the line's values): a byte is flagged when it
    // is below 0x20 or equals `"`, `\` or DEL, by the classic
    // has-zero-byte and has-less-than tricks, which are exact for the
    // question "any such byte".
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    fn zero_byte(x: u64) -> u64 {
        x.wrapping_sub(ONES) & !x & HIGH
    }
    let flagged = |x: u64| {
        let control = x.wrapping_sub(ONES * 0x20) & !x & HIGH;
        let high = if HIGH_TOO { x & HIGH } else { 0 };
        (control
            | high
            | zero_byte(x ^ (ONES * u64::from(b'"')))
            | zero_byte(x ^ (ONES * u64::from(b'\\')))
            | zero_byte(x ^ (ONES * 0x7f)))
            != 0
    };
    let mut words = bytes.chunks_exact(8);
    let mut bad = false;
    for word in &mut words {
        let mut eight = [0u8; 8];
        eight.copy_from_slice(word);
        bad |= flagged(u64::from_le_bytes(eight));
    }
    // The tail as one more word, padded with a byte that needs nothing.
    let tail = words.remainder();
    let mut eight = [b'a'; 8];
    eight[..tail.len()].copy_from_slice(tail);
    bad | flagged(u64::from_le_bytes(eight))
}

/// The path with the values of secret query parameters replaced; the path
/// itself when it has no query.
fn redact_query<'a>(path: &'a str, secrets: &[String]) -> std::borrow::Cow<'a, str> {
    // Most queries hold no secret: then the path is written as it is,
    // without building a copy, after one walk over its bytes (splitting
    // with the str searchers cost more than the rest of the path's text).
    let Some(at) = path.bytes().position(|b| b == b'?') else {
        return std::borrow::Cow::Borrowed(path);
    };
    if !has_secret(&path.as_bytes()[at + 1..], secrets) {
        return std::borrow::Cow::Borrowed(path);
    }
    let (base, query) = (&path[..at], &path[at + 1..]);
    let secret = |pair: &str| {
        let name = pair.split_once('=').map_or(pair, |(n, _)| n);
        secrets.iter().any(|s| s.eq_ignore_ascii_case(name)) && pair.contains('=')
    };
    let mut out = String::with_capacity(path.len());
    out.push_str(base);
    out.push('?');
    for (i, pair) in query.split('&').enumerate() {
        if i > 0 {
            out.push('&');
        }
        if secret(pair) {
            let name = pair.split_once('=').map_or(pair, |(n, _)| n);
            out.push_str(name);
            out.push('=');
            out.push_str(REDACTED);
        } else {
            out.push_str(pair);
        }
    }
    std::borrow::Cow::Owned(out)
}

/// Whether a `&`-separated pair of `query` is `name=value` with `name`
/// one of `secrets` (ASCII case ignored).
fn has_secret(query: &[u8], secrets: &[String]) -> bool {
    let named = |name: &[u8]| {
        secrets
            .iter()
            .any(|s| s.as_bytes().eq_ignore_ascii_case(name))
    };
    let mut start = 0;
    let mut equals = None;
    for (i, &b) in query.iter().enumerate() {
        match b {
            b'&' => {
                if equals.is_some_and(|eq| named(&query[start..eq])) {
                    return true;
                }
                start = i + 1;
                equals = None;
            }
            b'=' if equals.is_none() => equals = Some(i),
            _ => {}
        }
    }
    equals.is_some_and(|eq| named(&query[start..eq]))
}

/// `YYYY-MM-DDTHH:MM:SS.ffffffZ`.
#[cfg(test)]
fn rfc3339(time: std::time::SystemTime) -> String {
    let mut out = Vec::new();
    write_rfc3339(&mut out, time);
    String::from_utf8_lossy(&out).into_owned()
}

/// Writes `YYYY-MM-DDTHH:MM:SS.ffffffZ`, computed without a date library.
pub(crate) fn write_rfc3339(out: &mut Vec<u8>, time: std::time::SystemTime) {
    // Calls of the same second share the date and time; only the
    // microseconds differ, so the calendar arithmetic runs once a second.
    thread_local! {
        static SECOND: std::cell::Cell<(u64, [u8; 19])> = const { std::cell::Cell::new((u64::MAX, [0; 19])) };
    }
    let since = time.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (cached, mut text) = SECOND.get();
    if cached != secs {
        let mut fresh = Vec::with_capacity(19);
        write_seconds(&mut fresh, secs);
        if let Ok(fixed) = <[u8; 19]>::try_from(fresh.as_slice()) {
            text = fixed;
            SECOND.set((secs, text));
        } else {
            // Years past 9999 do not fit the cache; written in full.
            out.extend_from_slice(&fresh);
            out.extend_from_slice(&fraction(since));
            return;
        }
    }
    // One fixed-size write: each write of a variable length is a call.
    let mut stamp = [0u8; 27];
    stamp[..19].copy_from_slice(&text);
    stamp[19..].copy_from_slice(&fraction(since));
    out.extend_from_slice(&stamp);
}

/// `.ffffffZ`: the microseconds and the zone.
fn fraction(since: std::time::Duration) -> [u8; 8] {
    let mut text = *b".000000Z";
    let mut micros = since.subsec_micros();
    for digit in text[1..7].iter_mut().rev() {
        *digit = b'0' + (micros % 10) as u8;
        micros /= 10;
    }
    text
}

/// `YYYY-MM-DDTHH:MM:SS` for seconds since the epoch.
fn write_seconds(out: &mut Vec<u8>, secs: u64) {
    let (days, rest) = (secs / 86_400, secs % 86_400);
    let (h, m, s) = (rest / 3600, rest % 3600 / 60, rest % 60);
    // Howard Hinnant's civil-from-days.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    write_digits(out, year.max(0) as u64, 4);
    for (separator, value) in [(b'-', month), (b'-', day)] {
        out.push(separator);
        write_digits(out, value as u64, 2);
    }
    for (separator, value) in [(b'T', h), (b':', m), (b':', s)] {
        out.push(separator);
        write_digits(out, value, 2);
    }
}

/// Appends `ip` as `Display` writes it; IPv4 (nearly every call in a
/// cluster) without the formatting machinery, which costs more than the
/// rest of the access-log line.
pub(crate) fn push_ip<B: bytes::BufMut + ?Sized>(out: &mut B, ip: std::net::IpAddr) {
    match ip {
        std::net::IpAddr::V4(v4) => {
            let (text, len) = ipv4_text(v4);
            out.put_slice(&text[..len]);
        }
        std::net::IpAddr::V6(v6) => out.put_slice(v6.to_string().as_bytes()),
    }
}

/// `ip` as `Display` writes it, and the length of that text. Built on the
/// stack and written once: a write per octet and dot cost several times
/// the digits themselves.
pub(crate) fn ipv4_text(ip: std::net::Ipv4Addr) -> ([u8; 16], usize) {
    // Each octet and a dot, the last dot then cut: 16 bytes at most.
    let mut text = [0u8; 16];
    let mut len = 0;
    for octet in ip.octets() {
        let (digits, width) = OCTETS[usize::from(octet)];
        text[len..len + 3].copy_from_slice(&digits);
        len += usize::from(width);
        text[len] = b'.';
        len += 1;
    }
    (text, len - 1)
}

/// Each octet's decimal digits (padded to three) and how many there are:
/// a lookup where dividing took a dozen steps per octet.
static OCTETS: [([u8; 3], u8); 256] = octet_digits();

const fn octet_digits() -> [([u8; 3], u8); 256] {
    let mut table = [([0u8; 3], 0u8); 256];
    let mut i = 0;
    while i < 256 {
        let n = i as u8;
        table[i] = if n >= 100 {
            ([b'0' + n / 100, b'0' + n / 10 % 10, b'0' + n % 10], 3)
        } else if n >= 10 {
            ([b'0' + n / 10, b'0' + n % 10, 0], 2)
        } else {
            ([b'0' + n, 0, 0], 1)
        };
        i += 1;
    }
    table
}

/// Appends `addr` as `Display` writes it (`ip:port`, `[ip6]:port`).
fn push_socket_addr(out: &mut Vec<u8>, addr: std::net::SocketAddr) {
    match addr {
        std::net::SocketAddr::V4(v4) => {
            // The address, colon and port written at once, as the address
            // alone is by `ipv4_text`.
            let (ip, len) = ipv4_text(*v4.ip());
            let mut text = [0u8; 22];
            text[..16].copy_from_slice(&ip);
            text[len] = b':';
            let mut port = v4.port();
            let digits = match port {
                0..=9 => 1,
                10..=99 => 2,
                100..=999 => 3,
                1000..=9999 => 4,
                _ => 5,
            };
            for digit in text[len + 1..len + 1 + digits].iter_mut().rev() {
                *digit = b'0' + (port % 10) as u8;
                port /= 10;
            }
            // Whole and then cut, as a `Key` is written.
            let at = out.len();
            out.extend_from_slice(&text);
            out.truncate(at + len + 1 + digits);
        }
        std::net::SocketAddr::V6(v6) => {
            let _ = write!(out, "{v6}");
        }
    }
}

/// How long a line may wait before it is written. Under load the buffer
/// reaches [`FLUSH_BYTES`] first and goes out in one write; a quiet
/// proxy's last lines go out after this long.
const FLUSH_AFTER: std::time::Duration = std::time::Duration::from_millis(100);
/// Pending bytes that wake the writer before [`FLUSH_AFTER`].
const FLUSH_BYTES: usize = 64 * 1024;

/// Lines waiting for the writer thread. Calls append under a short lock;
/// the writer wakes once per [`FLUSH_BYTES`] or [`FLUSH_AFTER`], never per
/// line: waking a thread per call costs more than the call itself.
#[derive(Debug, Default)]
struct Pending {
    state: std::sync::Mutex<PendingState>,
    wake: std::sync::Condvar,
}

#[derive(Debug, Default)]
struct PendingState {
    data: Vec<u8>,
    lines: usize,
    closed: bool,
    /// Bumped after each write, so `flush` can wait for its own lines.
    written: u64,
}

impl Pending {
    fn lock(&self) -> std::sync::MutexGuard<'_, PendingState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Appends a line unless `max_lines` are already waiting.
    fn push(&self, line: &[u8], max_lines: usize) -> bool {
        let mut state = self.lock();
        if state.lines >= max_lines {
            return false;
        }
        let before = state.data.len();
        state.data.extend_from_slice(line);
        state.lines += 1;
        let wake = before == 0 || (before < FLUSH_BYTES && state.data.len() >= FLUSH_BYTES);
        drop(state);
        if wake {
            self.wake.notify_all();
        }
        true
    }

    /// Blocks until what is pending now has been written (or the writer is gone).
    fn flush(&self) {
        let mut state = self.lock();
        if state.data.is_empty() || state.closed {
            return;
        }
        let target = state.written + 1;
        state.closed = true;
        self.wake.notify_all();
        while state.written < target || !state.data.is_empty() {
            let (next, timeout) = self
                .wake
                .wait_timeout(state, std::time::Duration::from_secs(5))
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            state = next;
            if timeout.timed_out() {
                break;
            }
        }
    }
}

fn write_lines(pending: Arc<Pending>, output: Box<dyn Write + Send>) {
    let mut output = output;
    // Two buffers swapped in turn, so appending never reallocates once warm.
    let mut spare: Vec<u8> = Vec::with_capacity(2 * FLUSH_BYTES);
    loop {
        let (chunk, closed) = {
            let mut state = pending.lock();
            while state.data.is_empty() && !state.closed {
                state = pending
                    .wake
                    .wait(state)
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
            }
            // Let lines gather unless the buffer is already large.
            let deadline = std::time::Instant::now() + FLUSH_AFTER;
            while state.data.len() < FLUSH_BYTES && !state.closed {
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                if left.is_zero() {
                    break;
                }
                state = pending
                    .wake
                    .wait_timeout(state, left)
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .0;
            }
            state.lines = 0;
            std::mem::swap(&mut state.data, &mut spare);
            (std::mem::take(&mut spare), state.closed)
        };
        if !chunk.is_empty() {
            let _ = output.write_all(&chunk);
            let _ = output.flush();
        }
        spare = chunk;
        spare.clear();
        let mut state = pending.lock();
        state.written += 1;
        // A flush closes the buffer only until its lines are out.
        if closed && state.data.is_empty() {
            state.closed = false;
        }
        drop(state);
        pending.wake.notify_all();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_rfc3339() {
        let t = UNIX_EPOCH + std::time::Duration::from_micros(1_700_000_000_123_456);
        assert_eq!(rfc3339(t), "2023-11-14T22:13:20.123456Z");
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000000Z");
        let leap = UNIX_EPOCH + std::time::Duration::from_secs(951_782_400);
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00.000000Z");
        // The same second again, through the cached date, then the next one.
        let same = leap + std::time::Duration::from_micros(999_999);
        assert_eq!(rfc3339(same), "2000-02-29T00:00:00.999999Z");
        let next = leap + std::time::Duration::from_micros(1_000_001);
        assert_eq!(rfc3339(next), "2000-02-29T00:00:01.000001Z");
    }

    #[test]
    fn addresses_are_written_as_display_writes_them() {
        for text in [
            "0.0.0.0:0",
            "10.1.22.133:8080",
            "255.255.255.255:65535",
            "127.0.0.1:9",
            "100.10.1.0:1",
            "9.99.199.200:2",
            "[::1]:443",
            "[2001:db8::10]:15006",
            "[fe80::1%3]:80",
        ] {
            let addr: std::net::SocketAddr = text.parse().unwrap();
            let mut out = Vec::new();
            push_socket_addr(&mut out, addr);
            assert_eq!(String::from_utf8(out).unwrap(), addr.to_string());
            let mut out = Vec::new();
            push_ip(&mut out, addr.ip());
            assert_eq!(String::from_utf8(out).unwrap(), addr.ip().to_string());
        }
    }

    #[test]
    fn numbers_and_strings_are_written_as_json() {
        let render = |write: &dyn Fn(&mut Vec<u8>)| {
            let mut out = Vec::new();
            write(&mut out);
            String::from_utf8(out).unwrap()
        };
        assert_eq!(render(&|out| push_decimal(out, 0)), "0");
        assert_eq!(
            render(&|out| push_decimal(out, u64::MAX)),
            u64::MAX.to_string()
        );
        assert_eq!(render(&|out| write_millis(out, 0.0)), "0.000");
        assert_eq!(render(&|out| write_millis(out, 12.3456)), "12.346");
        assert_eq!(render(&|out| write_millis(out, 1500.0004)), "1500.000");
        for text in [
            "plain",
            "",
            "a\"b",
            "back\\slash",
            "tab\there",
            "nul\0",
            "ünï",
            "\u{7f}del",
        ] {
            assert_eq!(
                render(&|out| write_json_string(out, text)),
                serde_json::to_string(text).unwrap(),
                "{text:?}"
            );
        }
    }

    #[test]
    fn headers_are_written_as_their_checked_text() {
        let key = Key::new("k");
        let first = KeyAt {
            key: &key,
            comma: false,
        };
        let mut values: Vec<Vec<u8>> = vec![b"plain".to_vec(), b"".to_vec()];
        for bad in [b'\t', b'"', b'\\', 0x7f, 0x80, 0xe9, 0xff, b' ', b'~'] {
            for len in [1, 7, 8, 9, 17] {
                let mut value = vec![b'a'; len];
                value[len / 2] = bad;
                values.push(value);
            }
        }
        for value in values {
            // DEL is refused as a header value; the rest are allowed.
            let Ok(value) = http::HeaderValue::from_bytes(&value) else {
                continue;
            };
            let mut out = Vec::new();
            let written = put_header(&mut out, first, Some(&value));
            let expected = value.to_str().ok().map(|text| {
                let mut line = b"\"k\":".to_vec();
                write_json_string(&mut line, text);
                line
            });
            assert_eq!(written.then_some(out), expected, "{value:?}");
        }
    }

    #[test]
    fn every_ipv4_octet_is_written_as_display_writes_it() {
        for octet in 0..=255u8 {
            let ip = std::net::Ipv4Addr::new(octet, 255 - octet, octet / 3, 7);
            let (text, len) = ipv4_text(ip);
            assert_eq!(&text[..len], ip.to_string().as_bytes());
        }
    }

    #[test]
    fn escape_check_finds_every_byte_that_needs_care() {
        let careful = |b: u8| b < 0x20 || b == b'"' || b == b'\\' || b == 0x7f;
        for len in 0..20 {
            for at in 0..len {
                for bad in 0..=255u8 {
                    let mut text = vec![b'a'; len];
                    text[at] = bad;
                    assert_eq!(
                        needs_escape(&text),
                        careful(bad),
                        "{bad:#x} at {at} of {len}"
                    );
                }
            }
        }
        // High bytes (UTF-8) next to a borrow must not read as flagged.
        assert!(!needs_escape("ünïcödé ünïcödé".as_bytes()));
        assert!(!needs_escape(&[
            0x80, 0x21, 0xff, 0x7e, 0x20, 0x5b, 0x5d, 0x23
        ]));
    }

    #[test]
    fn secret_query_parameters_are_redacted() {
        let secrets: Vec<String> = ALWAYS_REDACTED_QUERY
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(
            redact_query("/a?x=1&api_key=s3cret&Token=t&keyless", &secrets),
            "/a?x=1&api_key=[REDACTED]&Token=[REDACTED]&keyless"
        );
        assert_eq!(redact_query("/plain", &secrets), "/plain");
        assert!(matches!(
            redact_query("/items/1?page=2&keyless", &secrets),
            std::borrow::Cow::Borrowed("/items/1?page=2&keyless")
        ));
    }
}

//! Trace context on the wire: parsing W3C Trace Context and B3 headers from
//! a request, and writing them for the upstream request.
//!
//! Parsing is strict: anything the specs call invalid yields no context, so
//! the call starts a new trace. Nothing here allocates unless a header is
//! written or several `tracestate` lines must be joined.

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue};

pub(super) const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
pub(super) const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");
pub(super) const B3: HeaderName = HeaderName::from_static("b3");
pub(super) const B3_TRACE_ID: HeaderName = HeaderName::from_static("x-b3-traceid");
pub(super) const B3_SPAN_ID: HeaderName = HeaderName::from_static("x-b3-spanid");
pub(super) const B3_PARENT_SPAN_ID: HeaderName = HeaderName::from_static("x-b3-parentspanid");
pub(super) const B3_SAMPLED: HeaderName = HeaderName::from_static("x-b3-sampled");
pub(super) const B3_FLAGS: HeaderName = HeaderName::from_static("x-b3-flags");

/// Every header this module reads or writes; all are replaced on injection.
const ALL: [HeaderName; 8] = [
    TRACEPARENT,
    TRACESTATE,
    B3,
    B3_TRACE_ID,
    B3_SPAN_ID,
    B3_PARENT_SPAN_ID,
    B3_SAMPLED,
    B3_FLAGS,
];

/// The longest `tracestate` kept. W3C asks propagators to pass at least 512
/// characters; past that the header is dropped whole rather than cut, since
/// cutting members correctly needs vendor knowledge we do not have.
pub const MAX_TRACESTATE_LEN: usize = 512;
/// W3C's limit on `tracestate` list members; more makes the header invalid.
const MAX_TRACESTATE_MEMBERS: usize = 32;
/// A version-00 `traceparent` is exactly this long.
const TRACEPARENT_LEN: usize = 55;

/// The sampling decision a request carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sampling {
    /// The caller sampled this trace.
    Sampled,
    /// The caller decided not to sample.
    NotSampled,
    /// B3 debug: sampled, and downstream tracers should keep it.
    Debug,
    /// No decision was sent (B3 lets the receiver decide).
    Deferred,
}

/// The header formats a request carried valid trace context in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Formats {
    /// W3C `traceparent`.
    pub w3c: bool,
    /// B3 single header `b3`.
    pub b3_single: bool,
    /// B3 multi headers `x-b3-*`.
    pub b3_multi: bool,
}

/// Trace and span ids sent by the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct RemoteIds {
    pub(super) trace_id: u128,
    pub(super) span_id: u64,
    /// The trace id came as 64-bit B3, so B3 headers keep that width.
    pub(super) narrow: bool,
}

/// The trace context of an incoming request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceContext {
    /// `None` for B3's sampling-only forms, which start a new trace.
    pub(super) ids: Option<RemoteIds>,
    pub(super) sampling: Sampling,
    pub(super) tracestate: Option<HeaderValue>,
    pub(super) formats: Formats,
}

impl TraceContext {
    /// Reads the trace context of a request, or `None` when it carries none
    /// that is valid.
    ///
    /// The first valid format wins, in this order: W3C `traceparent` (with
    /// its `tracestate`), B3 single `b3`, B3 multi `x-b3-*`. An invalid
    /// header of one format does not hide a valid one of the next.
    /// [`TraceContext::formats`] lists every format that was valid, so the
    /// upstream request gets the same ones back.
    pub fn extract(headers: &HeaderMap) -> Option<TraceContext> {
        // Most calls carry no trace header: one pass over the names rules
        // that out for less than the six hashed lookups below would cost.
        if present(headers) == 0 {
            return None;
        }
        let w3c = single(headers, &TRACEPARENT).and_then(parse_traceparent);
        let b3_single = single(headers, &B3).and_then(parse_b3_single);
        let b3_multi = parse_b3_multi(headers);
        let formats = Formats {
            w3c: w3c.is_some(),
            b3_single: b3_single.is_some(),
            b3_multi: b3_multi.is_some(),
        };
        if let Some((ids, sampled)) = w3c {
            return Some(TraceContext {
                ids: Some(ids),
                sampling: if sampled {
                    Sampling::Sampled
                } else {
                    Sampling::NotSampled
                },
                // tracestate means nothing without a valid traceparent.
                tracestate: tracestate(headers),
                formats,
            });
        }
        let (ids, sampling) = b3_single.or(b3_multi)?;
        Some(TraceContext {
            ids,
            sampling,
            tracestate: None,
            formats,
        })
    }

    /// The caller's trace id as 32 lowercase hex digits, when it sent one.
    pub fn trace_id_hex(&self) -> Option<String> {
        self.ids.map(|ids| hex_string(ids.trace_id, 32))
    }

    /// The caller's span id (our span's parent) as 16 lowercase hex digits.
    pub fn span_id_hex(&self) -> Option<String> {
        self.ids.map(|ids| hex_string(u128::from(ids.span_id), 16))
    }

    /// The caller's sampling decision.
    pub fn sampling(&self) -> Sampling {
        self.sampling
    }

    /// The `tracestate` to pass on, as received (lines joined with commas).
    pub fn tracestate(&self) -> Option<&HeaderValue> {
        self.tracestate.as_ref()
    }

    /// The formats the request carried valid context in.
    pub fn formats(&self) -> Formats {
        self.formats
    }
}

/// What [`inject`] writes: the ids of our span and how to express them.
pub(super) struct Outgoing<'a> {
    pub(super) trace_id: u128,
    pub(super) span_id: u64,
    /// Zero when our span has no parent.
    pub(super) parent_span_id: u64,
    pub(super) sampled: bool,
    pub(super) debug: bool,
    pub(super) narrow: bool,
    pub(super) formats: Formats,
    pub(super) tracestate: Option<&'a HeaderValue>,
}

/// Replaces every trace header in `headers` with ones naming our span.
pub(super) fn inject(out: &Outgoing<'_>, headers: &mut HeaderMap) {
    // Removing each of the eight names hashes it; a pass over the request's
    // names finds the few (usually none) that are there.
    let present = present(headers);
    for (i, name) in ALL.iter().enumerate() {
        if present & (1 << i) != 0 {
            headers.remove(name);
        }
    }

    let mut traceparent = Vec::with_capacity(TRACEPARENT_LEN);
    traceparent.extend_from_slice(b"00-");
    push_hex(&mut traceparent, out.trace_id, 32);
    traceparent.push(b'-');
    push_hex(&mut traceparent, u128::from(out.span_id), 16);
    traceparent.extend_from_slice(if out.sampled { b"-01" } else { b"-00" });
    insert(headers, TRACEPARENT, traceparent);
    if let Some(state) = out.tracestate {
        headers.insert(TRACESTATE, state.clone());
    }

    let trace_digits = if out.narrow && out.trace_id >> 64 == 0 {
        16
    } else {
        32
    };
    if out.formats.b3_single {
        let mut b3 = Vec::with_capacity(32 + 16 + 16 + 4);
        push_hex(&mut b3, out.trace_id, trace_digits);
        b3.push(b'-');
        push_hex(&mut b3, u128::from(out.span_id), 16);
        b3.extend_from_slice(match (out.debug, out.sampled) {
            (true, _) => b"-d",
            (false, true) => b"-1",
            (false, false) => b"-0",
        });
        if out.parent_span_id != 0 {
            b3.push(b'-');
            push_hex(&mut b3, u128::from(out.parent_span_id), 16);
        }
        insert(headers, B3, b3);
    }
    if out.formats.b3_multi {
        let mut trace_id = Vec::with_capacity(trace_digits);
        push_hex(&mut trace_id, out.trace_id, trace_digits);
        insert(headers, B3_TRACE_ID, trace_id);
        let mut span_id = Vec::with_capacity(16);
        push_hex(&mut span_id, u128::from(out.span_id), 16);
        insert(headers, B3_SPAN_ID, span_id);
        if out.parent_span_id != 0 {
            let mut parent = Vec::with_capacity(16);
            push_hex(&mut parent, u128::from(out.parent_span_id), 16);
            insert(headers, B3_PARENT_SPAN_ID, parent);
        }
        // B3: debug implies sampled, and the two are not sent together.
        if out.debug {
            headers.insert(B3_FLAGS, HeaderValue::from_static("1"));
        } else {
            let sampled = if out.sampled { "1" } else { "0" };
            headers.insert(B3_SAMPLED, HeaderValue::from_static(sampled));
        }
    }
}

/// Which of the trace headers `headers` holds: bit `i` for `ALL[i]`.
fn present(headers: &HeaderMap) -> u8 {
    headers.keys().fold(0, |found, name| {
        let text = name.as_str();
        let bytes = text.as_bytes();
        // The first bytes rule out nearly every other name before any
        // string compare: `traceparent`, `tracestate`, `b3`, `x-b3-*`.
        let candidate = match bytes.first() {
            Some(b't') => true,
            Some(b'b') => bytes.len() == 2,
            Some(b'x') => bytes.starts_with(b"x-b3-"),
            _ => false,
        };
        if !candidate {
            return found;
        }
        ALL.iter()
            .position(|known| known.as_str() == text)
            .map_or(found, |i| found | 1 << i)
    })
}

/// Inserts a value built from hex digits and separators.
fn insert(headers: &mut HeaderMap, name: HeaderName, value: Vec<u8>) {
    // The buffer becomes the header's storage; it only holds hex digits and
    // dashes, so validation cannot fail.
    if let Ok(value) = HeaderValue::from_maybe_shared(Bytes::from(value)) {
        headers.insert(name, value);
    }
}

/// The value of a header that must appear once; repeats make it invalid.
fn single<'a>(headers: &'a HeaderMap, name: &HeaderName) -> Option<&'a [u8]> {
    let mut values = headers.get_all(name).iter();
    let value = values.next()?;
    if values.next().is_some() {
        return None;
    }
    Some(trim(value.as_bytes()))
}

/// Strips the optional whitespace HTTP allows around a field value.
fn trim(value: &[u8]) -> &[u8] {
    let start = value
        .iter()
        .position(|b| !matches!(b, b' ' | b'\t'))
        .unwrap_or(value.len());
    let end = value
        .iter()
        .rposition(|b| !matches!(b, b' ' | b'\t'))
        .map_or(start, |i| i + 1);
    &value[start..end]
}

/// Parses `version-traceid-parentid-flags`; returns the ids and the sampled
/// flag.
fn parse_traceparent(value: &[u8]) -> Option<(RemoteIds, bool)> {
    if value.len() < TRACEPARENT_LEN {
        return None;
    }
    let version = parse_hex(&value[0..2])?;
    match version {
        // ff is forbidden outright.
        0xff => return None,
        0 if value.len() != TRACEPARENT_LEN => return None,
        // A later version may append fields, but must keep these four and
        // separate what follows with a dash.
        1.. if value.len() > TRACEPARENT_LEN && value[TRACEPARENT_LEN] != b'-' => return None,
        _ => {}
    }
    if value[2] != b'-' || value[35] != b'-' || value[52] != b'-' {
        return None;
    }
    let trace_id = parse_hex(&value[3..35])?;
    let span_id = parse_span_id(&value[36..52])?;
    let flags = parse_hex(&value[53..55])?;
    if trace_id == 0 {
        return None;
    }
    let ids = RemoteIds {
        trace_id,
        span_id,
        narrow: false,
    };
    Some((ids, flags & 1 == 1))
}

/// Joins the `tracestate` lines, or `None` when there is none or it is
/// invalid or too long to pass on whole.
fn tracestate(headers: &HeaderMap) -> Option<HeaderValue> {
    let mut lines = headers.get_all(&TRACESTATE).iter();
    let first = lines.next()?;
    let value = match lines.next() {
        None => first.clone(),
        Some(second) => {
            let mut joined = first.as_bytes().to_vec();
            for line in std::iter::once(second).chain(lines) {
                if joined.len() > MAX_TRACESTATE_LEN {
                    return None;
                }
                joined.push(b',');
                joined.extend_from_slice(line.as_bytes());
            }
            HeaderValue::from_maybe_shared(Bytes::from(joined)).ok()?
        }
    };
    let bytes = value.as_bytes();
    if bytes.len() > MAX_TRACESTATE_LEN
        || !bytes
            .iter()
            .all(|b| *b == b'\t' || (0x20..0x7f).contains(b))
    {
        return None;
    }
    let members = bytes
        .split(|b| *b == b',')
        .filter(|member| !trim(member).is_empty())
        .count();
    if members == 0 || members > MAX_TRACESTATE_MEMBERS {
        return None;
    }
    Some(value)
}

/// Parses `b3: {traceid}-{spanid}[-{sampling}[-{parentspanid}]]` or the
/// sampling-only `b3: {sampling}`.
fn parse_b3_single(value: &[u8]) -> Option<(Option<RemoteIds>, Sampling)> {
    if value.len() == 1 {
        return Some((None, parse_b3_sampling(value)?));
    }
    let mut parts = value.split(|b| *b == b'-');
    let trace = parts.next()?;
    let span = parts.next()?;
    let sampling = match parts.next() {
        Some(flag) => parse_b3_sampling(flag)?,
        None => Sampling::Deferred,
    };
    if let Some(parent) = parts.next() {
        parse_span_id(parent)?;
    }
    if parts.next().is_some() {
        return None;
    }
    let ids = parse_b3_ids(trace, span)?;
    Some((Some(ids), sampling))
}

fn parse_b3_sampling(value: &[u8]) -> Option<Sampling> {
    match value {
        b"1" => Some(Sampling::Sampled),
        b"0" => Some(Sampling::NotSampled),
        b"d" => Some(Sampling::Debug),
        _ => None,
    }
}

/// Parses the `x-b3-*` headers. Ids need both trace and span id; sampling
/// alone is the sampling-only form.
fn parse_b3_multi(headers: &HeaderMap) -> Option<(Option<RemoteIds>, Sampling)> {
    let trace = headers.get(&B3_TRACE_ID);
    let span = headers.get(&B3_SPAN_ID);
    let flags = headers.get(&B3_FLAGS);
    let sampled = headers.get(&B3_SAMPLED);
    if trace.is_none() && span.is_none() && flags.is_none() && sampled.is_none() {
        return None;
    }
    let ids = match (trace, span) {
        (None, None) => None,
        (Some(_), Some(_)) => Some(parse_b3_ids(
            single(headers, &B3_TRACE_ID)?,
            single(headers, &B3_SPAN_ID)?,
        )?),
        _ => return None,
    };
    if headers.contains_key(&B3_PARENT_SPAN_ID) {
        parse_span_id(single(headers, &B3_PARENT_SPAN_ID)?)?;
    }
    // Only `1` means debug; B3 defines no other flag value, so others are
    // ignored rather than failing the whole context.
    let debug = flags.is_some() && single(headers, &B3_FLAGS)? == b"1";
    let sampling = match sampled.map(|_| single(headers, &B3_SAMPLED)) {
        _ if debug => Sampling::Debug,
        None => Sampling::Deferred,
        // `true`/`false` predate the B3 spec, which still asks to accept them.
        Some(Some(b"1" | b"true")) => Sampling::Sampled,
        Some(Some(b"0" | b"false")) => Sampling::NotSampled,
        Some(_) => return None,
    };
    if ids.is_none() && sampling == Sampling::Deferred {
        return None;
    }
    Some((ids, sampling))
}

/// A B3 trace id (16 or 32 hex digits) and span id (16), neither zero.
fn parse_b3_ids(trace: &[u8], span: &[u8]) -> Option<RemoteIds> {
    let narrow = match trace.len() {
        16 => true,
        32 => false,
        _ => return None,
    };
    let trace_id = parse_hex(trace)?;
    let span_id = parse_span_id(span)?;
    (trace_id != 0).then_some(RemoteIds {
        trace_id,
        span_id,
        narrow,
    })
}

/// A span id: exactly 16 lowercase hex digits, not all zero.
fn parse_span_id(value: &[u8]) -> Option<u64> {
    if value.len() != 16 {
        return None;
    }
    let id = u64::try_from(parse_hex(value)?).ok()?;
    (id != 0).then_some(id)
}

/// Lowercase hex of at most 32 digits; both specs forbid uppercase.
fn parse_hex(digits: &[u8]) -> Option<u128> {
    if digits.is_empty() || digits.len() > 32 {
        return None;
    }
    digits.iter().try_fold(0u128, |acc, b| {
        let nibble = match b {
            b'0'..=b'9' => b - b'0',
            b'a'..=b'f' => b - b'a' + 10,
            _ => return None,
        };
        Some(acc << 4 | u128::from(nibble))
    })
}

/// `value` as 32 lowercase hex digits, a byte (two digits) at a time:
/// every call writes ids, and a digit at a time cost more than the rest
/// of the header.
pub(crate) fn hex32(value: u128) -> [u8; 32] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut text = [0u8; 32];
    for (pair, byte) in text.chunks_exact_mut(2).zip(value.to_be_bytes()) {
        pair[0] = HEX[usize::from(byte >> 4)];
        pair[1] = HEX[usize::from(byte & 0xf)];
    }
    text
}

/// Appends the low `digits` (at most 32) nibbles of `value` as lowercase hex.
fn push_hex(out: &mut Vec<u8>, value: u128, digits: usize) {
    let text = hex32(value);
    out.extend_from_slice(&text[32 - digits.min(32)..]);
}

/// `value` as `digits` (at most 32) lowercase hex digits.
pub(super) fn hex_string(value: u128, digits: usize) -> String {
    let text = hex32(value);
    // Hex digits are ASCII, so this never falls back.
    std::str::from_utf8(&text[32 - digits.min(32)..])
        .map(str::to_owned)
        .unwrap_or_default()
}

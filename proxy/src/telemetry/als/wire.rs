//! Envoy's access-log entries written straight from a [`CallLog`] into a
//! batch: what prost writes for [`super::http_entry`] and
//! [`super::tcp_entry`] (a collector decodes the same message), without
//! first building the message's strings and then walking it again to
//! measure every nested message, which cost more than the rest of a
//! call's telemetry together. The rare parts (TLS properties, response
//! flags, kept request headers) still go through prost.
//!
//! Entries are written into a plain `Vec<u8>` with the varints written
//! here: through `BufMut`, every byte of a key or varint was a capacity
//! check and a call, which made up most of an entry's cost.

use http::{HeaderName, HeaderValue};
use prost::encoding::encoded_len_varint;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use super::{envoy_response_flags, http_version, request_headers, request_method, tls_properties};
use crate::telemetry::access_log::{ipv4_text, push_ip};
use crate::telemetry::log::CallLog;
use postern_proto::envoy::data::accesslog::v3::AccessLogType;

/// `log_entry`, the field of both entry lists.
const LOG_ENTRY: u32 = 1;

/// Appends the call as one `log_entry` of an `HTTPAccessLogEntries`.
pub(super) fn push_http(out: &mut Vec<u8>, log: &CallLog, keep_headers: &[HeaderName]) {
    nested_wide(out, LOG_ENTRY, |out| {
        nested(out, 1, |out| common(out, log, AccessLogType::DownstreamEnd));
        varint(out, 2, http_version(log.protocol) as u64);
        nested(out, 3, |out| {
            if let Some(method) = &log.method {
                varint(out, 1, request_method(method) as u64);
            }
            header_text(out, 3, log.authority.as_ref());
            if let Some(path) = &log.path {
                string(out, 5, path.as_str());
            }
            header_text(out, 6, log.user_agent.as_ref());
            header_text(out, 9, log.request_id.as_ref());
            varint(out, 12, log.bytes_received);
            if !keep_headers.is_empty() {
                prost::encoding::hash_map::encode(
                    prost::encoding::string::encode,
                    prost::encoding::string::encoded_len,
                    prost::encoding::string::encode,
                    prost::encoding::string::encoded_len,
                    13,
                    &request_headers(log, keep_headers),
                    out,
                );
            }
        });
        nested(out, 4, |out| {
            // 0: no response was sent.
            if log.status != 0 {
                nested(out, 1, |out| varint(out, 1, u64::from(log.status)));
            }
            varint(out, 3, log.bytes_sent);
        });
    });
}

/// Appends the connection as one `log_entry` of a `TCPAccessLogEntries`.
pub(super) fn push_tcp(out: &mut Vec<u8>, log: &CallLog) {
    nested_wide(out, LOG_ENTRY, |out| {
        nested(out, 1, |out| {
            common(out, log, AccessLogType::TcpConnectionEnd)
        });
        nested(out, 2, |out| {
            varint(out, 1, log.bytes_received);
            varint(out, 2, log.bytes_sent);
        });
    });
}

/// `AccessLogCommon`, as [`super::common`] fills it.
fn common(out: &mut Vec<u8>, log: &CallLog, kind: AccessLogType) {
    key(out, 1, SIXTY_FOUR_BIT);
    out.extend_from_slice(&1.0f64.to_le_bytes()); // sample_rate
    address(out, 2, log.downstream_addr);
    if let Some(tls) = tls_properties(log) {
        prost::encoding::message::encode(4, &tls, out);
    }
    if let Ok(since) = log.start_time.duration_since(SystemTime::UNIX_EPOCH) {
        duration(out, 5, since);
    }
    if let Some(ttfb) = log.upstream_ttfb {
        duration(out, 9, ttfb);
    }
    duration(out, 12, log.duration); // time_to_last_downstream_tx_byte
    if let Some(upstream) = log.upstream_host {
        address(out, 13, upstream);
    }
    if let Some(cluster) = &log.cluster {
        string(out, 15, cluster);
    }
    if let Some(flags) = envoy_response_flags(log.flags) {
        prost::encoding::message::encode(16, &flags, out);
    }
    if let Some(route) = &log.route {
        string(out, 19, route);
    }
    duration(out, 23, log.duration);
    varint(out, 33, kind as u64);
}

/// A `config.core.v3.Address` holding a TCP `SocketAddress`.
fn address(out: &mut Vec<u8>, tag: u32, addr: SocketAddr) {
    let SocketAddr::V4(v4) = addr else {
        nested(out, tag, |out| {
            nested(out, 1, |out| {
                nested(out, 2, |out| push_ip(out, addr.ip()));
                varint(out, 3, u64::from(addr.port()));
            });
        });
        return;
    };
    // IPv4 (nearly every call): the three nested lengths are known up
    // front, so the field is built on the stack and written once.
    let (text, text_len) = ipv4_text(*v4.ip());
    let text = &text[..text_len];
    let port = u64::from(v4.port());
    let port_len = if port == 0 {
        0
    } else {
        1 + encoded_len_varint(port)
    };
    let socket_len = 2 + text.len() + port_len;
    // Tag key (two bytes at most), two lengths and keys, a 15-byte IP and
    // a 3-byte port varint: 29 bytes at most.
    let mut field = Stack::<32>::new();
    field.varint(u64::from(tag) << 3 | u64::from(LENGTH_DELIMITED));
    field.push((2 + socket_len) as u8);
    field.push(1 << 3 | LENGTH_DELIMITED);
    field.push(socket_len as u8);
    field.push(2 << 3 | LENGTH_DELIMITED);
    field.push(text.len() as u8);
    field.extend(text);
    if port != 0 {
        field.push(3 << 3 | VARINT);
        field.varint(port);
    }
    field.write_to(out);
}

/// A `google.protobuf.Duration` or `Timestamp` (the same two fields),
/// built on the stack and written once.
fn duration(out: &mut Vec<u8>, tag: u32, d: Duration) {
    let secs = d.as_secs().min(i64::MAX as u64);
    let nanos = u64::from(d.subsec_nanos());
    let secs_len = if secs == 0 {
        0
    } else {
        1 + encoded_len_varint(secs)
    };
    let nanos_len = if nanos == 0 {
        0
    } else {
        1 + encoded_len_varint(nanos)
    };
    // A two-byte key, a length, then at most 11 and 6 bytes: 20 in all.
    let mut field = Stack::<24>::new();
    field.varint(u64::from(tag) << 3 | u64::from(LENGTH_DELIMITED));
    field.push((secs_len + nanos_len) as u8);
    if secs != 0 {
        field.push(1 << 3 | VARINT);
        field.varint(secs);
    }
    if nanos != 0 {
        field.push(2 << 3 | VARINT);
        field.varint(nanos);
    }
    field.write_to(out);
}

/// A small field assembled on the stack: a store per byte, where a push
/// onto the batch checks its capacity and updates its length each time.
/// Callers size `N` for their largest field; a larger one would panic.
struct Stack<const N: usize> {
    buf: [u8; N],
    len: usize,
}

impl<const N: usize> Stack<N> {
    fn new() -> Self {
        Stack {
            buf: [0; N],
            len: 0,
        }
    }

    #[inline]
    fn push(&mut self, byte: u8) {
        self.buf[self.len] = byte;
        self.len += 1;
    }

    #[inline]
    fn extend(&mut self, bytes: &[u8]) {
        self.buf[self.len..self.len + bytes.len()].copy_from_slice(bytes);
        self.len += bytes.len();
    }

    #[inline]
    fn varint(&mut self, mut value: u64) {
        while value >= 0x80 {
            self.push(value as u8 | 0x80);
            value >>= 7;
        }
        self.push(value as u8);
    }

    /// Appends the field to `out`: the whole array and then a cut to
    /// length, which compiles to a few stores where a copy of the exact
    /// length is a call.
    #[inline]
    fn write_to(&self, out: &mut Vec<u8>) {
        let at = out.len();
        out.extend_from_slice(&self.buf);
        out.truncate(at + self.len);
    }
}

/// Wire types used here.
const VARINT: u8 = 0;
const SIXTY_FOUR_BIT: u8 = 1;
const LENGTH_DELIMITED: u8 = 2;

/// A field's key.
#[inline]
fn key(out: &mut Vec<u8>, tag: u32, wire_type: u8) {
    raw_varint(out, u64::from(tag) << 3 | u64::from(wire_type));
}

/// A base-128 varint, as prost writes it.
#[inline]
fn raw_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push(value as u8 | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// A varint field, left out when zero as proto3 does.
#[inline]
fn varint(out: &mut Vec<u8>, tag: u32, value: u64) {
    if value != 0 {
        key(out, tag, VARINT);
        raw_varint(out, value);
    }
}

/// A string field, left out when empty as proto3 does.
#[inline]
fn string(out: &mut Vec<u8>, tag: u32, value: &str) {
    if !value.is_empty() {
        key(out, tag, LENGTH_DELIMITED);
        raw_varint(out, value.len() as u64);
        out.extend_from_slice(value.as_bytes());
    }
}

/// A header's text, invalid UTF-8 replaced as [`super::text`] does.
fn header_text(out: &mut Vec<u8>, tag: u32, value: Option<&HeaderValue>) {
    if let Some(value) = value {
        let bytes = value.as_bytes();
        // ASCII (nearly every header) is UTF-8 as it is, and checking for
        // it goes a word at a time where UTF-8 validation went a byte.
        if bytes.is_ascii() {
            if !bytes.is_empty() {
                key(out, tag, LENGTH_DELIMITED);
                raw_varint(out, bytes.len() as u64);
                out.extend_from_slice(bytes);
            }
            return;
        }
        match std::str::from_utf8(bytes) {
            Ok(text) => string(out, tag, text),
            Err(_) => string(out, tag, &String::from_utf8_lossy(value.as_bytes())),
        }
    }
}

/// A length-delimited field whose length is known only once `body` has
/// written it: one byte is set aside, and the body moved along in the rare
/// case its length needs more.
#[inline]
fn nested(out: &mut Vec<u8>, tag: u32, body: impl FnOnce(&mut Vec<u8>)) {
    key(out, tag, LENGTH_DELIMITED);
    let at = out.len();
    out.push(0);
    body(out);
    let end = out.len();
    let len = end - at - 1;
    if len < 0x80 {
        out[at] = len as u8;
    } else {
        let width = encoded_len_varint(len as u64);
        out.resize(end + width - 1, 0);
        out.copy_within(at + 1..end, at + width);
        let mut prefix = &mut out[at..at + width];
        prost::encoding::encode_varint(len as u64, &mut prefix);
    }
}

/// Like [`nested`], for an HTTP entry, nearly always 128 bytes to 16 KiB
/// long: two bytes are set aside, so the body is moved only in the rare
/// other case.
fn nested_wide(out: &mut Vec<u8>, tag: u32, body: impl FnOnce(&mut Vec<u8>)) {
    key(out, tag, LENGTH_DELIMITED);
    let at = out.len();
    out.extend_from_slice(&[0, 0]);
    body(out);
    let end = out.len();
    let len = end - at - 2;
    if (0x80..0x4000).contains(&len) {
        out[at] = len as u8 | 0x80;
        out[at + 1] = (len >> 7) as u8;
    } else if len < 0x80 {
        out[at] = len as u8;
        out.copy_within(at + 2..end, at + 1);
        out.truncate(end - 1);
    } else {
        let width = encoded_len_varint(len as u64);
        out.resize(end + width - 2, 0);
        out.copy_within(at + 2..end, at + width);
        let mut prefix = &mut out[at..at + width];
        prost::encoding::encode_varint(len as u64, &mut prefix);
    }
}

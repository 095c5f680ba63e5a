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
use crate::telemetry::access_log::push_ip;
use crate::telemetry::log::CallLog;
use postern_proto::envoy::data::accesslog::v3::AccessLogType;

/// `log_entry`, the field of both entry lists.
const LOG_ENTRY: u32 = 1;

/// Appends the call as one `log_entry` of an `HTTPAccessLogEntries`.
pub(super) fn push_http(out: &mut Vec<u8>, log: &CallLog, keep_headers: &[HeaderName]) {
    nested(out, LOG_ENTRY, |out| {
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
    nested(out, LOG_ENTRY, |out| {
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
    nested(out, tag, |out| {
        nested(out, 1, |out| {
            nested(out, 2, |out| push_ip(out, addr.ip()));
            varint(out, 3, u64::from(addr.port()));
        });
    });
}

/// A `google.protobuf.Duration` or `Timestamp` (the same two fields).
fn duration(out: &mut Vec<u8>, tag: u32, d: Duration) {
    nested(out, tag, |out| {
        varint(out, 1, d.as_secs().min(i64::MAX as u64));
        varint(out, 2, u64::from(d.subsec_nanos()));
    });
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

//! HTTP/1 framing under attack: a corpus of request smuggling and desync
//! cases (Content-Length, Transfer-Encoding, chunk syntax, header syntax,
//! request-target forms) sent raw to the proxy, with a capture upstream
//! that records every byte the proxy forwards.
//!
//! Each case is followed on the same connection by a pipelined sentinel
//! request (`GET /sentinel`, `Connection: close`). A refused case must
//! answer one error and close, so the sentinel is never read; a served
//! case must answer twice, and the upstream must see exactly the case's
//! request and then the sentinel. Either way every byte that reached the
//! upstream must be well-formed HTTP/1.1 (see `postern_tests::capture`).
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use postern_tests::capture::{CaptureBackend, CapturedRequest};
use postern_tests::client::raw_exchange;
use postern_tests::{listener, start_proxy, Proxy};

const SENTINEL: &[u8] = b"GET /sentinel HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n";

/// What a case must come to.
#[derive(Debug, Clone, Copy)]
enum Expect {
    /// This status before any byte reaches the upstream, then close.
    Refused(u16),
    /// 400 after the head may have gone upstream (the body was broken):
    /// the upstream never gets a complete request, and the connection closes.
    RefusedMidBody,
    /// Served with this body, then the sentinel is served as well.
    Served(&'static [u8]),
    /// Both Content-Length and Transfer-Encoding: framed by
    /// Transfer-Encoding alone and the connection closed after the answer
    /// (RFC 9112 §6.1), so the sentinel is never read.
    ServedThenClosed(&'static [u8]),
}

/// A check on the request the upstream got for a served case.
type Check = fn(&CapturedRequest) -> Result<(), String>;

struct Case {
    name: &'static str,
    bytes: &'static [u8],
    expect: Expect,
    check: Option<Check>,
}

const fn case(name: &'static str, bytes: &'static [u8], expect: Expect) -> Case {
    Case {
        name,
        bytes,
        expect,
        check: None,
    }
}

const fn checked(name: &'static str, bytes: &'static [u8], expect: Expect, check: Check) -> Case {
    Case {
        name,
        bytes,
        expect,
        check: Some(check),
    }
}

async fn proxy_to(capture: &CaptureBackend) -> Proxy {
    start_proxy(&format!(
        r#"
        listeners:
          - name: edge
            address: 127.0.0.1:0
            kind: http
            virtual_hosts:
              - name: all
                domains: ["*"]
                routes:
                  - match: {{}}
                    cluster: c
        clusters:
          - name: c
            endpoints: [{{ address: "{}" }}]
        "#,
        capture.addr()
    ))
    .await
}

fn upstream_bytes(capture: &CaptureBackend) -> usize {
    capture.connections().iter().map(|c| c.raw.len()).sum()
}

/// Runs each case on a new connection and returns what went wrong, one
/// line per failed case.
async fn run(cases: &[Case]) -> Vec<String> {
    let capture = CaptureBackend::start().await;
    let proxy = proxy_to(&capture).await;
    let edge = listener(&proxy, "edge");
    let mut failures = Vec::new();
    for case in cases {
        let before_bytes = upstream_bytes(&capture);
        let before = capture.requests().len();
        let mut bytes = case.bytes.to_vec();
        bytes.extend_from_slice(SENTINEL);
        let reply = raw_exchange(edge, &bytes, Duration::from_secs(5))
            .await
            .unwrap();
        let text = reply.text();
        let statuses = statuses(&text);
        let new = capture.requests().split_off(before);
        let mut problems = Vec::new();
        if !reply.closed {
            problems.push("connection left open".to_owned());
        }
        match case.expect {
            Expect::Refused(status) => {
                if statuses != [status.to_string()] {
                    problems.push(format!("want one {status}, got {statuses:?}"));
                }
                if upstream_bytes(&capture) != before_bytes {
                    problems.push(format!("upstream got bytes: {new:?}"));
                }
            }
            Expect::RefusedMidBody => {
                if statuses != ["400"] {
                    problems.push(format!("want one 400, got {statuses:?}"));
                }
                if !new.is_empty() {
                    problems.push(format!("upstream got a complete request: {new:?}"));
                }
            }
            Expect::Served(body) | Expect::ServedThenClosed(body) => {
                let then_closed = matches!(case.expect, Expect::ServedThenClosed(_));
                let want: &[&str] = if then_closed {
                    &["200"]
                } else {
                    &["200", "200"]
                };
                if statuses != want {
                    problems.push(format!("want {want:?}, got {statuses:?}"));
                }
                let targets: Vec<&str> = new.iter().map(|r| r.target.as_str()).collect();
                let sentinel_seen = targets.last() == Some(&"/sentinel");
                if new.len() != want.len() || sentinel_seen == then_closed {
                    problems.push(format!("upstream got targets {targets:?}"));
                } else if new[0].body != body {
                    problems.push(format!(
                        "upstream body {:?}",
                        String::from_utf8_lossy(&new[0].body)
                    ));
                } else if let Some(check) = case.check {
                    if let Err(why) = check(&new[0]) {
                        problems.push(why);
                    }
                }
            }
        }
        if !problems.is_empty() {
            failures.push(format!(
                "{}: {} (reply {text:?})",
                case.name,
                problems.join("; ")
            ));
        }
    }
    // Cut-off requests count as incomplete, not malformed: what did arrive
    // must still be well-formed.
    for violation in capture.violations() {
        failures.push(format!("upstream got malformed HTTP/1.1: {violation}"));
    }
    let ids = capture.request_ids();
    let mut unique = ids.clone();
    unique.sort_unstable();
    unique.dedup();
    if ids.len() != capture.requests().len() || unique.len() != ids.len() {
        failures.push(format!("request ids are not one per request: {ids:?}"));
    }
    failures
}

/// The status codes of the responses in `text`, read one after another by
/// their `content-length`.
fn statuses(mut text: &str) -> Vec<String> {
    let mut out = Vec::new();
    while let Some(end) = text.find("\r\n\r\n") {
        let head = &text[..end];
        out.push(head.get(9..12).unwrap_or("").to_owned());
        let length: usize = head
            .lines()
            .find_map(|l| {
                let (name, value) = l.split_once(':')?;
                name.eq_ignore_ascii_case("content-length")
                    .then(|| value.trim().parse().ok())?
            })
            .unwrap_or(0);
        text = text.get(end + 4 + length..).unwrap_or("");
    }
    out
}

fn assert_corpus(failures: Vec<String>) {
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

fn no_content_length(r: &CapturedRequest) -> Result<(), String> {
    match r.header("content-length") {
        None => Ok(()),
        Some(v) => Err(format!("content-length {v} forwarded with a chunked body")),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_length_variants() {
    use Expect::*;
    assert_corpus(
        run(&[
            case(
                "conflicting lines",
                b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
                Refused(400),
            ),
            case(
                "list in one line",
                b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 5\r\n\r\nhello",
                Refused(400),
            ),
            case(
                "plus sign",
                b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +5\r\n\r\nhello",
                Refused(400),
            ),
            case(
                "negative",
                b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -5\r\n\r\nhello",
                Refused(400),
            ),
            case(
                "hex",
                b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0x5\r\n\r\nhello",
                Refused(400),
            ),
            case(
                "empty",
                b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: \r\n\r\nhello",
                Refused(400),
            ),
            case(
                "space inside",
                b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5 5\r\n\r\nhello",
                Refused(400),
            ),
            case(
                "overflow",
                b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 99999999999999999999999\r\n\r\nhello",
                Refused(400),
            ),
            case(
                "underscore spelling with a real one",
                b"POST / HTTP/1.1\r\nHost: a\r\nContent_Length: 0\r\nContent-Length: 5\r\n\r\nhello",
                Served(b"hello"),
            ),
            // RFC 9110 §8.6 lets a recipient fold identical values; one goes on.
            checked(
                "identical lines",
                b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
                Served(b"hello"),
                |r| match r.header_all("content-length")[..] {
                    ["5"] => Ok(()),
                    ref other => Err(format!("content-length {other:?}")),
                },
            ),
            case(
                "leading zeros",
                b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 005\r\n\r\nhello",
                Served(b"hello"),
            ),
            case(
                "a request inside the body stays body",
                b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 35\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n",
                Served(b"GET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n"),
            ),
        ])
        .await,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfer_encoding_variants() {
    use Expect::*;
    assert_corpus(
        run(&[
            checked(
                "TE then CL",
                b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
                ServedThenClosed(b"hello"),
                no_content_length,
            ),
            checked(
                "CL then TE",
                b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
                ServedThenClosed(b"hello"),
                no_content_length,
            ),
            case(
                "CL then TE, smuggled prefix",
                b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nG",
                ServedThenClosed(b""),
            ),
            case(
                "identity",
                b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: identity\r\nContent-Length: 5\r\n\r\nhello",
                Refused(400),
            ),
            case(
                "chunked, identity",
                b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, identity\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
                Refused(400),
            ),
            case(
                "identity, chunked",
                b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: identity, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
                Refused(400),
            ),
            case(
                "gzip, chunked",
                b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
                Refused(400),
            ),
            case(
                "chunked twice",
                b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
                Refused(400),
            ),
            case(
                "two lines",
                b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
                Refused(400),
            ),
            case(
                "unknown then chunked lines",
                b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
                Refused(400),
            ),
            case(
                "xchunked",
                b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\nContent-Length: 5\r\n\r\nhello",
                Refused(400),
            ),
            case(
                "quoted",
                b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: \"chunked\"\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
                Refused(400),
            ),
            case(
                "trailing comma",
                b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked,\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
                Refused(400),
            ),
            case(
                "space before colon",
                b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding : chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
                Refused(400),
            ),
            case(
                "vertical tab",
                b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: \x0bchunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
                Refused(400),
            ),
            case(
                "obs-fold",
                b"POST / HTTP/1.1\r\nHost: a\r\nX: y\r\n Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
                Refused(400),
            ),
            case(
                "newline in name",
                b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding\n: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
                Refused(400),
            ),
            case(
                "HTTP/1.0",
                b"POST / HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
                Refused(400),
            ),
            checked(
                "underscore spelling",
                b"POST / HTTP/1.1\r\nHost: a\r\nTransfer_Encoding: chunked\r\nContent-Length: 5\r\n\r\nhello",
                Served(b"hello"),
                |r| match r.header_all("transfer_encoding")[..] {
                    [] => Ok(()),
                    ref other => Err(format!("transfer_encoding forwarded: {other:?}")),
                },
            ),
            case(
                "tab before value",
                b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding:\tchunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
                Served(b"hello"),
            ),
            case(
                "upper case",
                b"POST / HTTP/1.1\r\nHost: a\r\ntransfer-encoding: CHUNKED\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
                Served(b"hello"),
            ),
        ])
        .await,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunk_syntax_tricks() {
    use Expect::*;
    const HEAD: &str = "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n";
    macro_rules! chunked {
        ($body:literal) => {
            concat!(
                "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n",
                $body
            )
            .as_bytes()
        };
    }
    assert!(chunked!("").starts_with(HEAD.as_bytes()));
    assert_corpus(
        run(&[
            case(
                "0x prefix",
                chunked!("0x5\r\nhello\r\n0\r\n\r\n"),
                RefusedMidBody,
            ),
            case(
                "negative",
                chunked!("-5\r\nhello\r\n0\r\n\r\n"),
                RefusedMidBody,
            ),
            case(
                "size overflow",
                chunked!("fffffffffffffffff1\r\nhello\r\n0\r\n\r\n"),
                RefusedMidBody,
            ),
            case(
                "leading space",
                chunked!(" 5\r\nhello\r\n0\r\n\r\n"),
                RefusedMidBody,
            ),
            case(
                "empty size line",
                chunked!("\r\nhello\r\n0\r\n\r\n"),
                RefusedMidBody,
            ),
            case(
                "bare LF after size",
                chunked!("5\nhello\r\n0\r\n\r\n"),
                RefusedMidBody,
            ),
            case(
                "bare CR after size",
                chunked!("5\rhello\r\n0\r\n\r\n"),
                RefusedMidBody,
            ),
            case(
                "bare LF in extension",
                chunked!("5;a\nhello\r\n0\r\n\r\n"),
                RefusedMidBody,
            ),
            case(
                "data longer than size",
                chunked!("5\r\nhelloXX\r\n0\r\n\r\n"),
                RefusedMidBody,
            ),
            case(
                "bare LF after data",
                chunked!("5\r\nhello\n0\r\n\r\n"),
                RefusedMidBody,
            ),
            case(
                "size that is a header",
                chunked!("Content-Length: 5\r\n\r\nhello"),
                RefusedMidBody,
            ),
            case(
                "extension",
                chunked!("5;name=value\r\nhello\r\n0\r\n\r\n"),
                Served(b"hello"),
            ),
            // Whitespace after the size is tolerated by hyper; the upstream
            // gets the body re-chunked, so no parser downstream sees it.
            case(
                "space after size",
                chunked!("5 \r\nhello\r\n0\r\n\r\n"),
                Served(b"hello"),
            ),
            case(
                "upper-case hex and several chunks",
                chunked!("A\r\n0123456789\r\n1\r\n!\r\n0\r\n\r\n"),
                Served(b"0123456789!"),
            ),
            checked(
                "framing headers in trailers",
                chunked!("5\r\nhello\r\n0\r\nContent-Length: 7\r\nTransfer-Encoding: x\r\n\r\n"),
                Served(b"hello"),
                |r| {
                    let framing = r.trailers.iter().any(|(n, _)| {
                        n.eq_ignore_ascii_case("content-length")
                            || n.eq_ignore_ascii_case("transfer-encoding")
                    });
                    if framing {
                        Err(format!("framing trailers forwarded: {:?}", r.trailers))
                    } else {
                        no_content_length(r)
                    }
                },
            ),
        ])
        .await,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_syntax() {
    use Expect::*;
    assert_corpus(
        run(&[
            case(
                "bare CR",
                b"GET / HTTP/1.1\r\nHost: a\rX: b\r\n\r\n",
                Refused(400),
            ),
            case(
                "obs-fold",
                b"GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n",
                Refused(400),
            ),
            case(
                "space before colon",
                b"GET / HTTP/1.1\r\nHost: a\r\nX : b\r\n\r\n",
                Refused(400),
            ),
            case(
                "space in name",
                b"GET / HTTP/1.1\r\nHost: a\r\nX Y: b\r\n\r\n",
                Refused(400),
            ),
            case(
                "empty name",
                b"GET / HTTP/1.1\r\nHost: a\r\n: b\r\n\r\n",
                Refused(400),
            ),
            case(
                "no colon",
                b"GET / HTTP/1.1\r\nHost: a\r\nGarbage\r\n\r\n",
                Refused(400),
            ),
            case(
                "non-ASCII name",
                b"GET / HTTP/1.1\r\nHost: a\r\nX\xff: b\r\n\r\n",
                Refused(400),
            ),
            case(
                "NUL in value",
                b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x00b\r\n\r\n",
                Refused(400),
            ),
            case(
                "DEL in value",
                b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x7fb\r\n\r\n",
                Refused(400),
            ),
            case(
                "CR in value",
                b"GET / HTTP/1.1\r\nHost: a\r\nX: a\rb\r\n\r\n",
                Refused(400),
            ),
            case(
                "missing host",
                b"GET / HTTP/1.1\r\nX: b\r\n\r\n",
                Refused(400),
            ),
            case(
                "two hosts",
                b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
                Refused(400),
            ),
            case(
                "empty host",
                b"GET / HTTP/1.1\r\nHost: \r\n\r\n",
                Refused(400),
            ),
            case(
                "host with space",
                b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n",
                Refused(400),
            ),
            case(
                "host with userinfo",
                b"GET / HTTP/1.1\r\nHost: u@a\r\n\r\n",
                Refused(400),
            ),
            case(
                "host with path",
                b"GET / HTTP/1.1\r\nHost: a/b\r\n\r\n",
                Refused(400),
            ),
            case(
                "HTTP/1.0 without host",
                b"GET / HTTP/1.0\r\n\r\n",
                Refused(400),
            ),
            // RFC 9112 §2.2: a recipient MAY take a lone LF as a line end.
            // hyper does; the upstream gets CRLF, so no parser after us
            // sees a bare LF.
            case(
                "bare LF line ends",
                b"GET / HTTP/1.1\nHost: a\n\n",
                Served(b""),
            ),
            case(
                "mixed line ends",
                b"POST / HTTP/1.1\r\nHost: a\nContent-Length: 5\r\n\r\nhello",
                Served(b"hello"),
            ),
            checked(
                "obs-text value",
                b"GET / HTTP/1.1\r\nHost: a\r\nX-Text: caf\xc3\xa9\r\n\r\n",
                Served(b""),
                |r| match r.header_all("x-text")[..] {
                    ["caf\u{e9}"] => Ok(()),
                    ref other => Err(format!("x-text {other:?}")),
                },
            ),
            case(
                "leading empty line",
                b"\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n",
                Served(b""),
            ),
        ])
        .await,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_line_and_target_forms() {
    use Expect::*;
    fn target(want: &'static str) -> impl Fn(&CapturedRequest) -> Result<(), String> {
        move |r| {
            if r.target == want && r.header("host") == Some("a") {
                Ok(())
            } else {
                Err(format!("target {} host {:?}", r.target, r.header("host")))
            }
        }
    }
    assert_corpus(
        run(&[
            case(
                "double space",
                b"GET  / HTTP/1.1\r\nHost: a\r\n\r\n",
                Refused(400),
            ),
            case("tabs", b"GET\t/\tHTTP/1.1\r\nHost: a\r\n\r\n", Refused(400)),
            case(
                "HTTP/1.2",
                b"GET / HTTP/1.2\r\nHost: a\r\n\r\n",
                Refused(400),
            ),
            case(
                "HTTP/2.0",
                b"GET / HTTP/2.0\r\nHost: a\r\n\r\n",
                Refused(400),
            ),
            case(
                "lower-case version",
                b"GET / http/1.1\r\nHost: a\r\n\r\n",
                Refused(400),
            ),
            case("HTTP/0.9", b"GET /\r\n\r\n", Refused(400)),
            case(
                "non-ASCII target",
                b"GET /\xff HTTP/1.1\r\nHost: a\r\n\r\n",
                Refused(400),
            ),
            case(
                "control in target",
                b"GET /a\x01 HTTP/1.1\r\nHost: a\r\n\r\n",
                Refused(400),
            ),
            case(
                "NUL in method",
                b"G\x00T / HTTP/1.1\r\nHost: a\r\n\r\n",
                Refused(400),
            ),
            case(
                "absolute-form with userinfo",
                b"GET http://u@a/x HTTP/1.1\r\nHost: a\r\n\r\n",
                Refused(400),
            ),
            case(
                "asterisk on GET",
                b"GET * HTTP/1.1\r\nHost: a\r\n\r\n",
                Refused(400),
            ),
            case(
                "authority-form on GET",
                b"GET a:80 HTTP/1.1\r\nHost: a\r\n\r\n",
                Refused(400),
            ),
            case(
                "CONNECT",
                b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n",
                Refused(405),
            ),
            checked(
                "absolute-form wins over Host",
                b"GET http://a/x?q=1 HTTP/1.1\r\nHost: b\r\n\r\n",
                Served(b""),
                |r| target("/x?q=1")(r),
            ),
            checked(
                "absolute-form https",
                b"GET https://a/ HTTP/1.1\r\nHost: a\r\n\r\n",
                Served(b""),
                |r| target("/")(r),
            ),
            checked(
                "OPTIONS asterisk",
                b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n",
                Served(b""),
                |r| target("*")(r),
            ),
            // The fragment never reaches routing, policies or the upstream.
            checked(
                "fragment",
                b"GET /x#frag HTTP/1.1\r\nHost: a\r\n\r\n",
                Served(b""),
                |r| target("/x")(r),
            ),
        ])
        .await,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_after_refusal_is_never_reused() {
    // A refused head in the middle of a pipeline: what comes after it
    // (which a lenient parser might frame differently) is never served.
    let capture = CaptureBackend::start().await;
    let proxy = proxy_to(&capture).await;
    let edge = listener(&proxy, "edge");
    let pipeline = b"GET /first HTTP/1.1\r\nHost: a\r\n\r\n\
        POST /second HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n\
        0\r\n\r\n\
        GET /third HTTP/1.1\r\nHost: a\r\n\r\n";
    let reply = raw_exchange(edge, pipeline, Duration::from_secs(5))
        .await
        .unwrap();
    let text = reply.text();
    assert!(reply.closed, "{text}");
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert_eq!(text.matches("HTTP/1.1 400").count(), 1, "{text}");
    assert_eq!(text.matches("HTTP/1.1 ").count(), 2, "{text}");
    let targets: Vec<String> = capture.requests().into_iter().map(|r| r.target).collect();
    assert_eq!(targets, ["/first"]);
    assert!(
        capture.violations().is_empty(),
        "{:?}",
        capture.violations()
    );
}

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;

/// A real ClientHello, as rustls sends it, with SNI and ALPN.
fn client_hello(sni: &str, alpn: &[&[u8]]) -> Vec<u8> {
    let mut config = rustls::ClientConfig::builder_with_provider(postern_certs::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let name = rustls_pki_types::ServerName::try_from(sni.to_string()).unwrap();
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out).unwrap();
    }
    out
}

/// The same handshake message cut into two records after `at` bytes.
fn split_record(hello: &[u8], at: usize) -> Vec<u8> {
    let payload = &hello[5..];
    let mut out = Vec::new();
    for part in [&payload[..at], &payload[at..]] {
        out.extend_from_slice(&hello[..3]);
        out.extend_from_slice(&(part.len() as u16).to_be_bytes());
        out.extend_from_slice(part);
    }
    out
}

/// Every strict prefix asks for more; the whole decides `expected`.
fn assert_needs_all(bytes: &[u8], expected: Protocol) {
    for n in 0..bytes.len() {
        assert_eq!(
            detect(&bytes[..n]),
            Detection::NeedMore,
            "prefix of {n} bytes of {:?}",
            String::from_utf8_lossy(bytes)
        );
    }
    assert_eq!(detect(bytes), Detection::Done(expected));
}

#[test]
fn http1_request_lines_are_recognised_at_their_end() {
    assert_needs_all(b"GET /items?id=1 HTTP/1.1\r\n", Protocol::Http1);
    assert_needs_all(b"POST /x HTTP/1.0\r\n", Protocol::Http1);
    assert_needs_all(b"OPTIONS * HTTP/1.1\n", Protocol::Http1);
    // Unusual but valid: an extension method and a method named PRI.
    assert_needs_all(b"PURGE /cache HTTP/1.1\r\n", Protocol::Http1);
    assert_needs_all(b"PRI /x HTTP/1.1\r\n", Protocol::Http1);
    // Whatever follows the request line does not matter.
    assert_eq!(
        detect(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"),
        Detection::Done(Protocol::Http1)
    );
}

#[test]
fn http2_preface_is_recognised_only_whole() {
    assert_needs_all(H2_PREFACE, Protocol::Http2);
    let mut with_settings = H2_PREFACE.to_vec();
    with_settings.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
    assert_eq!(detect(&with_settings), Detection::Done(Protocol::Http2));
}

#[test]
fn other_client_first_protocols_are_opaque_at_once() {
    let cases: &[&[u8]] = &[
        b"*1\r\n$4\r\nPING\r\n",             // Redis
        b"SSH-2.0-OpenSSH_9.6\r\n",          // SSH
        b"\x00\x00\x00\x08\x04\xd2\x16\x2f", // PostgreSQL SSLRequest
        b"GET /\x00",                        // a control byte in the target
        b"GET  / HTTP/1.1\r\n",              // an empty target
        b"GET / HTTP/2.0\r\n",               // not HTTP/1.x
        b"GET / HTTP/1.1 \r\n",              // junk before the line end
        b" GET / HTTP/1.1\r\n",
        b"\x16\x05\x00", // not a TLS record version
        b"\x16\x01",
    ];
    for case in cases {
        assert_eq!(
            detect(case),
            Detection::Done(Protocol::Opaque),
            "{:?}",
            String::from_utf8_lossy(case)
        );
    }
}

#[test]
fn a_request_line_longer_than_the_limit_is_opaque() {
    let mut line = b"GET /".to_vec();
    line.resize(MAX_PREFIX - 1, b'a');
    assert_eq!(detect(&line), Detection::NeedMore);
    line.push(b'a');
    assert_eq!(detect(&line), Detection::Done(Protocol::Opaque));
}

#[test]
fn client_hello_gives_sni_and_alpn_and_needs_every_byte() {
    let hello = client_hello("Reviews.Shop.svc", &[b"h2", b"http/1.1"]);
    let expected = Protocol::Tls(ClientHelloInfo {
        sni: Some("reviews.shop.svc".into()),
        alpn: vec![b"h2".to_vec(), b"http/1.1".to_vec()],
    });
    assert_needs_all(&hello, expected);
}

#[test]
fn client_hello_split_across_records_is_reassembled() {
    let hello = client_hello("db.internal", &[b"postgresql"]);
    let expected = Protocol::Tls(ClientHelloInfo {
        sni: Some("db.internal".into()),
        alpn: vec![b"postgresql".to_vec()],
    });
    // Split inside the handshake header, and inside the extensions.
    for at in [2, hello.len() - 5 - 20] {
        assert_needs_all(&split_record(&hello, at), expected.clone());
    }
}

/// A one-record ClientHello with only `extensions`, in type-length-value form.
fn hello_with_extensions(extensions: &[(u16, Vec<u8>)]) -> Vec<u8> {
    let mut ext = Vec::new();
    for (kind, data) in extensions {
        ext.extend_from_slice(&kind.to_be_bytes());
        ext.extend_from_slice(&(data.len() as u16).to_be_bytes());
        ext.extend_from_slice(data);
    }
    let mut body = vec![3, 3];
    body.extend_from_slice(&[0; 32]);
    body.extend_from_slice(&[0, 0, 2, 0x13, 0x01, 1, 0]);
    body.extend_from_slice(&(ext.len() as u16).to_be_bytes());
    body.extend_from_slice(&ext);
    let mut handshake = vec![1];
    handshake.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    handshake.extend_from_slice(&body);
    let mut record = vec![0x16, 3, 1];
    record.extend_from_slice(&(handshake.len() as u16).to_be_bytes());
    record.extend_from_slice(&handshake);
    record
}

#[test]
fn server_name_list_ends_at_an_unknown_name_type() {
    // Found by the client_hello fuzz target: a host_name followed by a name
    // of another type lost the whole hello (no SNI, no ALPN) while rustls
    // serves the handshake for the host_name.
    let alpn = vec![0, 3, 2, b'h', b'2'];
    assert_sni_as_rustls_sees_it(b"api.example.com", b"m", Some(alpn), "api.example.com");
}

/// A hello whose server_name extension holds the host_name `name` followed
/// by the raw bytes `after`, with `alpn` if given: detection and rustls
/// both take `expected` from it (and detection the ALPN).
fn assert_sni_as_rustls_sees_it(name: &[u8], after: &[u8], alpn: Option<Vec<u8>>, expected: &str) {
    let mut list = vec![0];
    list.extend_from_slice(&(name.len() as u16).to_be_bytes());
    list.extend_from_slice(name);
    list.extend_from_slice(after);
    let mut sni = (list.len() as u16).to_be_bytes().to_vec();
    sni.extend_from_slice(&list);
    // rustls needs signature_algorithms to accept the hello at all.
    let signatures = vec![0, 2, 4, 3];
    let mut extensions = vec![(0, sni), (13, signatures)];
    let mut protocols = Vec::new();
    if let Some(alpn) = alpn {
        protocols.push(alpn[3..].to_vec());
        extensions.push((16, alpn));
    }
    let hello = hello_with_extensions(&extensions);
    let info = ClientHelloInfo {
        sni: Some(expected.into()),
        alpn: protocols,
    };
    assert_eq!(detect(&hello), Detection::Done(Protocol::Tls(info)));

    let mut acceptor = rustls::server::Acceptor::default();
    acceptor.read_tls(&mut hello.as_slice()).unwrap();
    let accepted = acceptor.accept().unwrap().unwrap();
    assert_eq!(accepted.client_hello().server_name(), Some(expected));
}

#[test]
fn an_absolute_server_name_is_taken_without_its_trailing_dot_as_rustls_takes_it() {
    // Found by the client_hello fuzz target: `web.shop.` picked no chain
    // for `web.shop` while rustls served the handshake as `web.shop`.
    assert_sni_as_rustls_sees_it(b"Web.Shop.", b"", None, "web.shop");
}

#[test]
fn tls_records_that_are_not_a_client_hello_are_opaque() {
    // A ServerHello (handshake type 2) from a client is not TLS from a client.
    assert_eq!(
        detect(&[0x16, 3, 3, 0, 4, 2, 0, 0, 0]),
        Detection::Done(Protocol::Opaque)
    );
    // An empty record.
    assert_eq!(
        detect(&[0x16, 3, 1, 0, 0]),
        Detection::Done(Protocol::Opaque)
    );
    // A malformed ClientHello body is still TLS, just without names.
    assert_eq!(
        detect(&[0x16, 3, 1, 0, 6, 1, 0, 0, 2, 3, 3]),
        Detection::Done(Protocol::Tls(ClientHelloInfo::default()))
    );
}

#[tokio::test]
async fn sniff_reads_a_hello_that_arrives_in_pieces_and_rewind_gives_it_back() {
    let hello = client_hello("api.example.com", &[b"h2"]);
    let (mut client, mut server) = tokio::io::duplex(64 * 1024);
    let sent = hello.clone();
    let writer = tokio::spawn(async move {
        for chunk in sent.chunks(7) {
            client.write_all(chunk).await.unwrap();
            client.flush().await.unwrap();
            tokio::task::yield_now().await;
        }
        client.write_all(b"after").await.unwrap();
        client
    });
    let (outcome, prefix) = sniff(&mut server, Duration::from_secs(30)).await;
    let Sniffed::Detected(Protocol::Tls(info)) = outcome else {
        panic!("{outcome:?}");
    };
    assert_eq!(info.sni.as_deref(), Some("api.example.com"));
    let client = writer.await.unwrap();
    drop(client);
    let mut all = Vec::new();
    Rewind::new(prefix, server)
        .read_to_end(&mut all)
        .await
        .unwrap();
    let mut expected = hello;
    expected.extend_from_slice(b"after");
    assert_eq!(all, expected);
}

#[tokio::test(start_paused = true)]
async fn sniff_gives_up_on_a_silent_client_after_the_timeout() {
    let (_client, mut server) = tokio::io::duplex(1024);
    let start = tokio::time::Instant::now();
    let (outcome, prefix) = sniff(&mut server, Duration::from_millis(100)).await;
    assert_eq!(outcome, Sniffed::TimedOut);
    assert!(prefix.is_empty());
    assert_eq!(start.elapsed(), Duration::from_millis(100));
}

#[tokio::test(start_paused = true)]
async fn sniff_keeps_a_partial_prefix_on_timeout_and_on_close() {
    let (mut client, mut server) = tokio::io::duplex(1024);
    client.write_all(b"GET /slo").await.unwrap();
    let (outcome, prefix) = sniff(&mut server, Duration::from_millis(100)).await;
    assert_eq!(
        (outcome, &prefix[..]),
        (Sniffed::TimedOut, &b"GET /slo"[..])
    );

    client.write_all(b"w").await.unwrap();
    drop(client);
    let (outcome, prefix) = sniff(&mut server, Duration::from_millis(100)).await;
    assert_eq!((outcome, &prefix[..]), (Sniffed::Closed, &b"w"[..]));
}

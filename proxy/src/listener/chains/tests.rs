use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

use super::inspect;

/// The bytes of a ClientHello for `sni` offering `alpn`.
fn client_hello(sni: &str, alpn: &[&[u8]]) -> Vec<u8> {
    let mut config = rustls::ClientConfig::builder_with_provider(postern_certs::tls::provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let name = rustls_pki_types::ServerName::try_from(sni.to_string()).expect("name");
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name).expect("client");
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out).expect("hello");
    }
    out
}

async fn pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let client = TcpStream::connect(listener.local_addr().expect("addr"))
        .await
        .expect("connect");
    let (server, _) = listener.accept().await.expect("accept");
    (client, server)
}

const WAIT: Duration = Duration::from_secs(10);

#[tokio::test]
async fn a_client_hello_gives_sni_and_alpn_and_stays_unread() {
    let (mut client, server) = pair().await;
    let hello = client_hello("A.Example.com", &[b"h2", b"http/1.1"]);
    client.write_all(&hello).await.expect("write");
    let facts = inspect(&server, 443, WAIT).await.expect("facts");
    assert!(facts.tls);
    assert_eq!(facts.destination_port, 443);
    assert_eq!(facts.server_name.as_deref(), Some("a.example.com"));
    assert_eq!(
        facts.application_protocols,
        [b"h2".to_vec(), b"http/1.1".to_vec()]
    );
    // Whoever serves the connection reads the whole hello itself.
    let mut buf = vec![0u8; hello.len()];
    assert_eq!(server.peek(&mut buf).await.expect("peek"), hello.len());
    assert_eq!(buf, hello);
}

#[tokio::test]
async fn a_hello_split_over_writes_is_waited_for() {
    let (mut client, server) = pair().await;
    let hello = client_hello("split.example.com", &[]);
    client.write_all(&hello[..7]).await.expect("first part");
    let inspecting = tokio::spawn(async move { inspect(&server, 443, WAIT).await });
    client.write_all(&hello[7..]).await.expect("rest");
    let facts = inspecting.await.expect("task").expect("facts");
    assert_eq!(facts.server_name.as_deref(), Some("split.example.com"));
}

#[tokio::test]
async fn plaintext_is_raw_buffer_and_a_closed_client_is_nothing() {
    let (mut client, server) = pair().await;
    client
        .write_all(b"GET / HTTP/1.1\r\n")
        .await
        .expect("write");
    let facts = inspect(&server, 80, WAIT).await.expect("facts");
    assert!(!facts.tls && facts.server_name.is_none());

    let (client, server) = pair().await;
    drop(client);
    assert_eq!(inspect(&server, 80, WAIT).await, None);
}

#[tokio::test(start_paused = true)]
async fn a_silent_client_is_taken_as_plaintext() {
    let (_client, server) = pair().await;
    let facts = inspect(&server, 3306, Duration::from_millis(100))
        .await
        .expect("facts");
    assert!(!facts.tls);
}

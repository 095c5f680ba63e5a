//! Scans an edge TLS listener and a strict mesh mTLS listener (with a
//! client certificate) with sslyze, a real TLS scanner: nothing below TLS
//! 1.2 is accepted, and every accepted cipher suite is an AEAD with forward
//! secrecy. `.ci/run` installs sslyze; without it this test fails.

use std::process::Command;
use std::time::Duration;

use postern_tests::mesh::{write_files, TestCa};
use postern_tests::{listener, start_proxy, within, HttpBackend};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sslyze_finds_nothing_below_tls12_and_no_weak_cipher() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("edge root");
    let cert = write_files(
        dir.path(),
        "edge",
        &ca.issue_server(&["shop.example.com"]),
        "",
    );
    let app = HttpBackend::start("app").await;
    let proxy = start_proxy(&format!(
        r#"
listeners:
  - name: scanned-edge
    address: 127.0.0.1:0
    kind: http
    tls:
      certificates: [{{ cert: {}, key: {} }}]
    virtual_hosts:
      - name: all
        domains: ["*"]
        routes: [{{ match: {{}}, cluster: app }}]
clusters:
  - name: app
    endpoints: [{{ address: "{}" }}]
"#,
        cert.cert.display(),
        cert.key.display(),
        app.addr()
    ))
    .await;
    let target = listener(&proxy, "scanned-edge").to_string();
    assert_scan_clean(&target, &[], dir.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sslyze_finds_the_same_on_a_strict_mesh_listener() {
    let dir = tempfile::tempdir().unwrap();
    let mesh = TestCa::new("mesh root");
    let server = mesh.write_identity(dir.path(), "b", "spiffe://cluster.local/ns/shop/sa/api");
    let client = mesh.write_identity(dir.path(), "a", "spiffe://cluster.local/ns/shop/sa/web");
    let app = HttpBackend::start("app").await;
    let proxy = start_proxy(&format!(
        r#"
identity:
  spiffe_id: spiffe://cluster.local/ns/shop/sa/api
  source:
    files: {{ cert: {}, key: {}, bundle: {} }}
listeners:
  - name: scanned-mesh
    address: 127.0.0.1:0
    kind: http
    mtls: {{ mode: strict }}
    virtual_hosts:
      - name: all
        domains: ["*"]
        routes: [{{ match: {{}}, cluster: app }}]
clusters:
  - name: app
    endpoints: [{{ address: "{}" }}]
"#,
        server.cert.display(),
        server.key.display(),
        server.bundle.display(),
        app.addr()
    ))
    .await;
    within(Duration::from_secs(15), "identity loaded", proxy.ready()).await;
    let target = listener(&proxy, "scanned-mesh").to_string();
    let client_args = [
        format!("--cert={}", client.cert.display()),
        format!("--key={}", client.key.display()),
    ];
    assert_scan_clean(&target, &client_args, dir.path()).await;
}

/// Runs sslyze against `target` and checks that no protocol below TLS 1.2
/// and no weak cipher suite is accepted.
async fn assert_scan_clean(target: &str, extra: &[String], dir: &std::path::Path) {
    let report = dir.join("sslyze.json");
    let args = [
        "--sslv2",
        "--sslv3",
        "--tlsv1",
        "--tlsv1_1",
        "--tlsv1_2",
        "--tlsv1_3",
        "--quiet",
    ];
    let (report_path, target_arg, extra) = (report.clone(), target.to_string(), extra.to_vec());
    let status = within(
        Duration::from_secs(300),
        "sslyze scan",
        tokio::task::spawn_blocking(move || {
            Command::new("sslyze")
                .args(args)
                .args(&extra)
                .arg(format!("--json_out={}", report_path.display()))
                .arg(&target_arg)
                .status()
        }),
    )
    .await
    .expect("sslyze task")
    .expect("sslyze must be installed (pip install sslyze; .ci/run does it)");
    assert!(status.success(), "sslyze failed: {status}");
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&report).expect("report")).expect("json");
    let result = &json["server_scan_results"][0];
    assert_eq!(result["scan_status"], "COMPLETED", "{result}");
    let commands = &result["scan_result"];

    let accepted = |command: &str| -> Vec<String> {
        let attempt = &commands[command];
        assert_eq!(attempt["status"], "COMPLETED", "{command}: {attempt}");
        attempt["result"]["accepted_cipher_suites"]
            .as_array()
            .expect("accepted suites")
            .iter()
            .filter_map(|s| s["cipher_suite"]["name"].as_str())
            .map(str::to_string)
            .collect()
    };
    for old in [
        "ssl_2_0_cipher_suites",
        "ssl_3_0_cipher_suites",
        "tls_1_0_cipher_suites",
        "tls_1_1_cipher_suites",
    ] {
        assert!(
            accepted(old).is_empty(),
            "{old} accepted: {:?}",
            accepted(old)
        );
    }
    let tls12 = accepted("tls_1_2_cipher_suites");
    let tls13 = accepted("tls_1_3_cipher_suites");
    assert!(
        !tls12.is_empty() && !tls13.is_empty(),
        "TLS 1.2 and 1.3 offered"
    );
    for suite in tls12.iter().chain(&tls13) {
        let weak = ["NULL", "EXPORT", "RC4", "DES", "MD5", "CBC", "anon"];
        assert!(
            !weak.iter().any(|w| suite.contains(w)) && !suite.ends_with("_SHA"),
            "weak suite accepted: {suite}"
        );
        assert!(
            suite.contains("GCM") || suite.contains("CHACHA20_POLY1305"),
            "not an AEAD suite: {suite}"
        );
        if suite.starts_with("TLS_ECDHE") || suite.starts_with("TLS_DHE") {
            continue;
        }
        assert!(
            tls13.contains(suite),
            "TLS 1.2 suite without forward secrecy: {suite}"
        );
    }
}

//! Scans an edge TLS listener with sslyze, a real TLS scanner: nothing below
//! TLS 1.2 is accepted, and every accepted cipher suite is an AEAD with
//! forward secrecy. `.ci/run` installs sslyze; without it this test fails.

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
    let report = dir.path().join("sslyze.json");
    let args = [
        "--sslv2",
        "--sslv3",
        "--tlsv1",
        "--tlsv1_1",
        "--tlsv1_2",
        "--tlsv1_3",
        "--quiet",
    ];
    let (report_path, target_arg) = (report.clone(), target.clone());
    let status = within(
        Duration::from_secs(300),
        "sslyze scan",
        tokio::task::spawn_blocking(move || {
            Command::new("sslyze")
                .args(args)
                .arg(format!("--json_out={}", report_path.display()))
                .arg(&target_arg)
                .status()
        }),
    )
    .await
    .unwrap()
    .expect("sslyze must be installed (pip install sslyze; .ci/run does it)");
    assert!(status.success(), "sslyze failed: {status}");
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    let result = &json["server_scan_results"][0];
    assert_eq!(result["scan_status"], "COMPLETED", "{result}");
    let commands = &result["scan_result"];

    let accepted = |command: &str| -> Vec<String> {
        let attempt = &commands[command];
        assert_eq!(attempt["status"], "COMPLETED", "{command}: {attempt}");
        attempt["result"]["accepted_cipher_suites"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["cipher_suite"]["name"].as_str().unwrap().to_string())
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

//! Runtime logging of the binary: JSON lines on stderr with `--log-format
//! json`, and the level changed while it runs through admin `/logging`.

#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A port free a moment ago; the binary binds it right after.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One HTTP/1.0 exchange; the status and body, or nothing if refused.
fn exchange(addr: SocketAddr, method: &str, target: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect(addr).ok()?;
    write!(stream, "{method} {target} HTTP/1.0\r\nhost: admin\r\n\r\n").ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).ok()?;
    let status = text.split(' ').nth(1)?.parse().ok()?;
    Some((status, text.split_once("\r\n\r\n")?.1.to_string()))
}

fn json_lines(text: &str) -> Vec<serde_json::Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

#[test]
fn json_logs_and_a_level_changed_at_runtime() {
    let (listen, admin_port) = (free_port(), free_port());
    let admin: SocketAddr = format!("127.0.0.1:{admin_port}").parse().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("postern.yaml");
    std::fs::write(
        &config,
        format!(
            "admin: {{ address: \"{admin}\" }}\nlisteners:\n  - name: web\n    address: 127.0.0.1:{listen}\n    kind: http\n    virtual_hosts:\n      - name: all\n        domains: [\"*\"]\n        routes:\n          - match: {{}}\n            direct_response: {{ status: 200, body: ok }}\n"
        ),
    )
    .unwrap();
    let stderr = dir.path().join("stderr");
    let mut child = Command::new(env!("CARGO_BIN_EXE_postern"))
        .args([
            "run",
            "--log-format",
            "json",
            "--log-level",
            "info",
            "--config",
        ])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while exchange(admin, "GET", "/ready").map(|(s, _)| s) != Some(200) {
        assert!(Instant::now() < deadline, "never ready");
        assert!(child.try_wait().unwrap().is_none(), "exited early");
        std::thread::sleep(Duration::from_millis(20));
    }

    let lines = json_lines(&std::fs::read_to_string(&stderr).unwrap());
    assert!(
        lines
            .iter()
            .any(|l| l["level"] == "INFO" && l["message"] == "listening"),
        "{lines:?}"
    );
    assert!(lines.iter().all(|l| l["level"] != "DEBUG"));
    assert_eq!(
        exchange(admin, "GET", "/logging").unwrap(),
        (200, "level: info\n".to_string())
    );
    assert_eq!(
        exchange(admin, "POST", "/logging?level=nonsense%3D%3D")
            .unwrap()
            .0,
        400
    );
    assert_eq!(exchange(admin, "POST", "/logging").unwrap().0, 400);
    assert_eq!(
        exchange(admin, "POST", "/logging?level=info%2Cpostern%3Ddebug").unwrap(),
        (200, "level: info,postern=debug\n".to_string())
    );
    // A malformed request is logged at debug by the HTTP front.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let listener: SocketAddr = format!("127.0.0.1:{listen}").parse().unwrap();
        if let Ok(mut stream) = TcpStream::connect(listener) {
            let _ = stream.write_all(b"NOT HTTP AT ALL\r\n\r\n");
            let _ = stream.read_to_end(&mut Vec::new());
        }
        let lines = json_lines(&std::fs::read_to_string(&stderr).unwrap());
        if lines.iter().any(|l| l["level"] == "DEBUG") {
            break;
        }
        assert!(Instant::now() < deadline, "no debug line after the change");
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

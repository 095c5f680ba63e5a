//! Data integrity under change (issue #8, item 6): the real binary, driven
//! by xDS, under a mixed load (HTTP/1.1 sized and chunked, HTTP/2 with
//! trailers both ways, gRPC bidirectional streams, raw TCP) while routes and
//! endpoints are pushed every 100 ms, every certificate (the proxy's and the
//! upstreams') lives 4 s and is renewed at half its life, and the run ends
//! with SIGTERM while a request is in flight. The upstreams' ledger must
//! hold exactly the ids the clients sent, once each, with the same SHA-256
//! for every body and trailer both ways. The load itself is
//! `postern_tests::load`, which `bench/soak.sh` runs for longer. A run
//! that stops moving fails, naming the requests it was still waiting for.
//!
//! `POSTERN_INTEGRITY_SECS` (default 20) sets how long the load runs and
//! `POSTERN_INTEGRITY_BIG_MIB` (default 64) the size of the large bodies;
//! `POSTERN_BIN` the binary (default: `postern` next to this test's
//! directory, built by `cargo test --workspace`).

use std::time::Duration;

use postern_tests::load::{default_binary, run, LoadConfig};

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_lost_duplicated_or_corrupted_while_config_and_certificates_change() {
    let binary = default_binary();
    assert!(
        binary.exists(),
        "{} is missing: build it with `cargo build -p postern` or set POSTERN_BIN",
        binary.display()
    );
    let secs = env_u64("POSTERN_INTEGRITY_SECS", 20);
    let mut config = LoadConfig::new(binary, Duration::from_secs(secs));
    config.big_bytes = env_u64("POSTERN_INTEGRITY_BIG_MIB", 64) << 20;
    // The large bodies take 15 to 45 s in all in a debug build on a busy
    // 2-core machine; a run still moving them two minutes past the load
    // has hung, and fails naming the requests it was waiting for.
    config.give_up_after = Some(Duration::from_secs(secs + 120));
    // The drain's own waits are bounded too (see `run`); this only catches
    // a hang outside them.
    let limit = Duration::from_secs(secs + 400);
    let report = tokio::time::timeout(limit, run(&config))
        .await
        .unwrap_or_else(|_| panic!("the load run did not finish in {limit:?}"))
        .unwrap_or_else(|e| panic!("load run failed: {e:#}"));
    println!("{}", report.summary());

    let problems = report.problems();
    assert!(
        problems.is_empty(),
        "{} problems, the first ones:\n{}\n\n{}",
        problems.len(),
        problems
            .iter()
            .take(40)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n"),
        report.summary()
    );

    // What the run must have exercised for the above to mean anything.
    let served = report.served();
    for proto in ["Http1Sized", "Http1Chunked", "Http2", "Grpc", "Tcp"] {
        assert!(
            served.get(proto).copied().unwrap_or(0) >= 10,
            "too few {proto} requests: {served:?}"
        );
    }
    let pushes_due = secs * 1000 / config.push_every.as_millis() as u64;
    assert!(
        report.pushes >= pushes_due / 2,
        "only {} pushes in {secs} s",
        report.pushes
    );
    let rotations_due = secs * 1000 / (config.cert_lifetime.as_millis() as u64 / 2);
    assert!(
        report.proxy_certificates as u64 >= rotations_due / 2,
        "the upstreams saw only {} of the proxy's certificates in {secs} s",
        report.proxy_certificates
    );
    assert!(report.upstream_rotations as u64 >= rotations_due / 2);
    let big_ids: Vec<&str> = report.big.iter().map(|b| b.id.as_str()).collect();
    assert_eq!(
        big_ids,
        [
            "big-h1-sized",
            "big-h1-chunked",
            "big-h2-trailers",
            "big-tcp",
            "big-grpc"
        ]
    );
}

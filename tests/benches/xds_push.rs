//! xDS benchmark: how long from a control-plane push until traffic follows
//! (p50/p99 over many pushes), and what applying a 10,000-route /
//! 1,000-cluster update costs (time to ACK, CPU, memory).
//!
//! `cargo bench -p postern-tests --bench xds_push` (release build). Everything
//! runs in this process on 127.0.0.1: the reference control plane, the proxy
//! and two backends, so CPU and RSS include the control plane's encoding.
//! Environment: `PUSHES` (default 200), `ROUTES` (10000), `CLUSTERS` (1000),
//! `SWAPS` (6).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use postern_control::ads::{AdsEventKind, Snapshot};
use postern_control::mesh::parse_mesh;
use postern_proto::type_url;
use postern_tests::control::ControlPlane;
use postern_tests::{get, start_proxy, wait_until, HttpBackend, Proxy};

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A mesh with `routes` routes spread over `clusters` clusters, all of
/// whose endpoints are `backend`; `/` goes to cluster `target`.
fn mesh(
    version: &str,
    routes: usize,
    clusters: usize,
    target: &str,
    backends: &[(&str, SocketAddr)],
) -> Snapshot {
    let mut yaml = String::from(
        "listeners:\n  - name: bench\n    address: 127.0.0.1:0\n    route: bench-routes\nroutes:\n  - name: bench-routes\n    virtual_hosts:\n      - name: all\n        domains: [\"*\"]\n        routes:\n",
    );
    for i in 0..routes {
        yaml.push_str(&format!(
            "          - prefix: /r{i}/\n            cluster: c{}\n",
            i % clusters.max(1)
        ));
    }
    yaml.push_str(&format!(
        "          - prefix: /\n            cluster: {target}\nservices:\n"
    ));
    for i in 0..clusters {
        let (_, addr) = backends[i % backends.len()];
        yaml.push_str(&format!(
            "  - name: c{i}\n    endpoints: [{{ address: \"{addr}\" }}]\n"
        ));
    }
    for (name, addr) in backends {
        yaml.push_str(&format!(
            "  - name: {name}\n    endpoints: [{{ address: \"{addr}\" }}]\n"
        ));
    }
    parse_mesh(&yaml, version).expect("mesh")
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

/// CPU seconds (user + system) of this process so far.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15; after the ")" they are 12 and 13.
    (ticks(11) + ticks(12)) / 100.0
}

fn rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

async fn backend_of(proxy: &Proxy) -> String {
    let addr = proxy.listener_addr("bench").expect("listener");
    get(addr, "bench", "/")
        .await
        .backend()
        .unwrap_or_default()
        .to_string()
}

/// Waits until every type in `pending` has ACKed `version` (or fails on a
/// NACK). Types whose resources did not change are not pushed again.
async fn wait_acks(
    events: &mut tokio::sync::broadcast::Receiver<postern_control::ads::AdsEvent>,
    version: &str,
    start: Instant,
    mut pending: Vec<&str>,
) {
    let deadline = Duration::from_secs(120);
    while !pending.is_empty() {
        let event = tokio::time::timeout(deadline.saturating_sub(start.elapsed()), events.recv())
            .await
            .expect("ACKs within 120 s")
            .expect("event");
        match &event.kind {
            AdsEventKind::Ack { version: v } if v == version => {
                pending.retain(|t| *t != event.type_url);
                println!(
                    "    {:>6.0} ms  ACK {}",
                    start.elapsed().as_secs_f64() * 1e3,
                    event.type_url.rsplit('.').next().unwrap_or("")
                );
            }
            AdsEventKind::Nack { error, .. } => panic!("NACK: {error}"),
            _ => {}
        }
    }
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(run());
}

async fn run() {
    let pushes = env("PUSHES", 200);
    let routes = env("ROUTES", 10_000);
    let clusters = env("CLUSTERS", 1_000);
    let (a, b) = (HttpBackend::start("a").await, HttpBackend::start("b").await);
    let backends = [("a", a.addr()), ("b", b.addr())];

    // Push-to-traffic on a small config: flip `/` between a and b.
    let cp = ControlPlane::start(mesh("0", 10, 10, "a", &backends)).await;
    let proxy = start_proxy(&format!(
        "node: {{ id: bench }}\nxds: {{ address: \"{}\" }}\n",
        cp.url()
    ))
    .await;
    wait_until("ready", || async {
        get(proxy.admin_addr(), "localhost", "/ready").await.status == 200
    })
    .await;
    let mut latencies = Vec::with_capacity(pushes);
    for i in 1..=pushes {
        let target = if i % 2 == 1 { "b" } else { "a" };
        let snapshot = mesh(&i.to_string(), 10, 10, target, &backends);
        let start = Instant::now();
        cp.server.set_snapshot(snapshot);
        while backend_of(&proxy).await != target {
            if start.elapsed() > Duration::from_secs(10) {
                panic!("push {i} not followed within 10 s");
            }
        }
        latencies.push(start.elapsed());
    }
    latencies.sort();
    println!("push-to-traffic over {pushes} pushes (routes: 11, clusters: 12)");
    println!(
        "  p50 {:.2} ms   p99 {:.2} ms   max {:.2} ms",
        percentile(&latencies, 0.5).as_secs_f64() * 1e3,
        percentile(&latencies, 0.99).as_secs_f64() * 1e3,
        latencies.last().copied().unwrap_or_default().as_secs_f64() * 1e3
    );

    // A large update: time until every type is ACKed and traffic follows.
    let big = mesh("big-1", routes, clusters, "b", &backends);
    let mut events = cp.server.events();
    let (cpu0, rss0) = (cpu_seconds(), rss_mib());
    let start = Instant::now();
    cp.server.set_snapshot(big);
    let changed = vec![type_url::CLUSTER, type_url::ENDPOINT, type_url::ROUTE];
    wait_acks(&mut events, "big-1", start, changed).await;
    while backend_of(&proxy).await != "b" {}
    let applied = start.elapsed();
    let (cpu1, rss1) = (cpu_seconds(), rss_mib());
    println!("large update: {routes} routes, {clusters} clusters (+2)");
    println!(
        "  applied and followed in {:.0} ms; CPU {:.0} ms (proxy and control plane); RSS {:.1} -> {:.1} MiB",
        applied.as_secs_f64() * 1e3,
        (cpu1 - cpu0) * 1e3,
        rss0,
        rss1
    );
    // Then large updates back and forth: time, CPU, and whether memory
    // settles (it should stop growing after the first swap).
    let swaps = env("SWAPS", 6);
    for round in 0..swaps {
        let version = format!("big-{}", round + 2);
        let (target, order) = if round % 2 == 0 {
            ("a", [("b", b.addr()), ("a", a.addr())])
        } else {
            ("b", [("a", a.addr()), ("b", b.addr())])
        };
        let snapshot = mesh(&version, routes, clusters, target, &order);
        let (cpu0, start) = (cpu_seconds(), Instant::now());
        cp.server.set_snapshot(snapshot);
        // Same clusters; every endpoint set and the default route changed.
        let changed = vec![type_url::ENDPOINT, type_url::ROUTE];
        wait_acks(&mut events, &version, start, changed).await;
        while backend_of(&proxy).await != target {}
        println!(
            "  swap {}: every endpoint set changed: {:.0} ms, CPU {:.0} ms, RSS {:.1} MiB",
            round + 1,
            start.elapsed().as_secs_f64() * 1e3,
            (cpu_seconds() - cpu0) * 1e3,
            rss_mib()
        );
    }
}

//! The soak of issue #8 (item 8): the mixed load of `postern_tests::load`
//! (HTTP/1.1, HTTP/2, gRPC, TCP; pushes every 100 ms; certificates renewed
//! every 2 s) against a release binary for a long time, sampling the
//! proxy's RSS and file descriptors, then the integrity check of the CI
//! suite over every request of the run. `bench/soak.sh` builds and runs it.
//!
//! ```text
//! soak [--duration SECS] [--warmup SECS] [--window SECS] [--sample-every SECS]
//!      [--big-mib MIB] [--cert-lifetime SECS] [--push-every-ms MS]
//!      [--push-only routes|endpoints]
//!      [--postern PATH] [--log FILE]
//! ```
//!
//! `--cert-lifetime` (default 4) and `--push-every-ms` (default 100) turn
//! rotation and pushes down, and `--push-only routes|endpoints` narrows what
//! a push changes, to tell which one a growth comes from.
//!
//! Prints the figures and exits 1 if any request was lost, duplicated,
//! corrupted or failed (the slopes are reported, not judged).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use postern_tests::load::{default_binary, run, LoadConfig};

struct Args {
    duration: u64,
    warmup: Option<u64>,
    window: u64,
    sample_every: u64,
    big_mib: u64,
    cert_lifetime: u64,
    push_every_ms: u64,
    push_only: Option<String>,
    postern: Option<PathBuf>,
    log: Option<PathBuf>,
}

fn parse() -> Result<Args, String> {
    let mut args = Args {
        duration: 1800,
        warmup: None,
        window: 60,
        sample_every: 10,
        big_mib: 1024,
        cert_lifetime: 4,
        push_every_ms: 100,
        push_only: None,
        postern: None,
        log: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        let number = |v: String| v.parse::<u64>().map_err(|e| format!("{flag} {v}: {e}"));
        match flag.as_str() {
            "--duration" => args.duration = number(value()?)?,
            "--warmup" => args.warmup = Some(number(value()?)?),
            "--window" => args.window = number(value()?)?,
            "--sample-every" => args.sample_every = number(value()?)?.max(1),
            "--big-mib" => args.big_mib = number(value()?)?,
            "--cert-lifetime" => args.cert_lifetime = number(value()?)?.max(2),
            "--push-every-ms" => args.push_every_ms = number(value()?)?.max(1),
            "--push-only" => {
                let v = value()?;
                if v != "routes" && v != "endpoints" {
                    return Err(format!("--push-only {v}: routes or endpoints"));
                }
                args.push_only = Some(v);
            }
            "--postern" => args.postern = Some(PathBuf::from(value()?)),
            "--log" => args.log = Some(PathBuf::from(value()?)),
            other => return Err(format!("unknown flag {other}")),
        }
    }
    Ok(args)
}

fn main() -> ExitCode {
    let args = match parse() {
        Ok(args) => args,
        Err(e) => {
            eprintln!("soak: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async move {
        let postern = args.postern.unwrap_or_else(default_binary);
        let mut config = LoadConfig::new(postern, Duration::from_secs(args.duration));
        config.big_bytes = args.big_mib << 20;
        config.sample_every = Duration::from_secs(args.sample_every);
        config.cert_lifetime = Duration::from_secs(args.cert_lifetime);
        config.push_every = Duration::from_millis(args.push_every_ms);
        if let Some(only) = args.push_only.as_deref() {
            config.changes.routes = only == "routes";
            config.changes.endpoints = only == "endpoints";
        }
        config.log_file = args.log;
        // A fifth of the run, at most five minutes: caches, pools and
        // allocator arenas fill first.
        let warmup = args.warmup.unwrap_or((args.duration / 5).min(300));
        let report = match run(&config).await {
            Ok(report) => report,
            Err(e) => {
                eprintln!("soak: setup failed: {e:#}");
                return ExitCode::FAILURE;
            }
        };
        println!("{}", report.summary());
        let drift = report.drift(warmup as f64, args.window as f64);
        let mib = |b: u64| b as f64 / f64::from(1u32 << 20);
        println!("after a {warmup} s warm-up ({} samples every {} s):", drift.samples, args.sample_every);
        println!(
            "  RSS {:.1} -> {:.1} MiB, slope {:+.2} %/h (target < 1 %/h)",
            mib(drift.rss_first_last.0),
            mib(drift.rss_first_last.1),
            drift.rss_percent_per_hour
        );
        println!(
            "  FDs {}..{}, slope {:+.1} per hour (target flat)",
            drift.fds_min_max.0, drift.fds_min_max.1, drift.fds_per_hour
        );
        println!(
            "  latency, first {} s window: p50 {:.1} ms, p99 {:.1} ms ({} requests)",
            args.window, drift.first_window.0, drift.first_window.1, drift.first_window.2
        );
        println!(
            "  latency, last {} s window: p50 {:.1} ms, p99 {:.1} ms ({} requests)",
            args.window, drift.last_window.0, drift.last_window.1, drift.last_window.2
        );
        if drift.first_window.1 > 0.0 {
            println!(
                "  p99 drift: {:+.1} %",
                (drift.last_window.1 / drift.first_window.1 - 1.0) * 100.0
            );
        }
        println!("samples (s, RSS MiB, FDs):");
        for s in &report.samples {
            println!("  {:.0} {:.2} {}", s.at, mib(s.rss), s.fds);
        }
        let problems = report.problems();
        if problems.is_empty() {
            println!("integrity: every request id sent reached an upstream exactly once, bodies and trailers intact both ways");
            ExitCode::SUCCESS
        } else {
            println!("integrity: {} problems", problems.len());
            for p in problems.iter().take(100) {
                println!("  {p}");
            }
            ExitCode::FAILURE
        }
    })
}

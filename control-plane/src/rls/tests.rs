use std::sync::atomic::{AtomicU64, Ordering};

use postern_proto::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry;

use super::*;

const LIMITS: &str = r#"
domains:
  - domain: edge
    response_headers: [{ name: x-served-by, value: reference }]
    descriptors:
      - key: user
        rate_limit: { unit: minute, requests_per_unit: 2 }
      - key: user
        value: vip
        rate_limit: { unit: minute, requests_per_unit: 5, name: vip }
      - key: path
        value: /search
        descriptors:
          - key: remote_address
            rate_limit: { unit: second, requests_per_unit: 1 }
"#;

fn descriptor(entries: &[(&str, &str)]) -> RateLimitDescriptor {
    RateLimitDescriptor {
        entries: entries
            .iter()
            .map(|(k, v)| Entry {
                key: k.to_string(),
                value: v.to_string(),
            })
            .collect(),
        ..Default::default()
    }
}

fn ask(server: &RateLimitServer, entries: &[&[(&str, &str)]]) -> RateLimitResponse {
    server.decide(&RateLimitRequest {
        domain: "edge".into(),
        descriptors: entries.iter().map(|e| descriptor(e)).collect(),
        hits_addend: 0,
    })
}

fn frozen(seconds: &Arc<AtomicU64>) -> Clock {
    let seconds = seconds.clone();
    Arc::new(move || UNIX_EPOCH + Duration::from_secs(seconds.load(Ordering::Relaxed)))
}

#[test]
fn counts_per_value_in_fixed_windows() {
    let now = Arc::new(AtomicU64::new(600));
    let server = RateLimitServer::with_clock(RateLimitsFile::parse(LIMITS).unwrap(), frozen(&now));
    let codes = |user: &str, n: usize| {
        (0..n)
            .map(|_| ask(&server, &[&[("user", user)]]).overall_code)
            .collect::<Vec<_>>()
    };
    let (ok, over) = (Code::Ok as i32, Code::OverLimit as i32);
    assert_eq!(codes("alice", 3), [ok, ok, over]);
    // Another value has its own counter; a value with its own node its own limit.
    assert_eq!(codes("bob", 2), [ok, ok]);
    assert_eq!(codes("vip", 6), [ok, ok, ok, ok, ok, over]);
    // The next window starts afresh.
    now.store(660, Ordering::Relaxed);
    assert_eq!(codes("alice", 1), [ok]);
}

#[test]
fn statuses_carry_limit_remaining_and_reset() {
    let now = Arc::new(AtomicU64::new(610));
    let server = RateLimitServer::with_clock(RateLimitsFile::parse(LIMITS).unwrap(), frozen(&now));
    let response = ask(
        &server,
        &[
            &[("user", "vip")],
            &[("unknown", "x")],
            &[("path", "/search"), ("remote_address", "10.0.0.1")],
        ],
    );
    assert_eq!(response.overall_code, Code::Ok as i32);
    let vip = &response.statuses[0];
    let limit = vip.current_limit.as_ref().unwrap();
    assert_eq!((limit.requests_per_unit, limit.name.as_str()), (5, "vip"));
    assert_eq!(vip.limit_remaining, 4);
    assert_eq!(vip.duration_until_reset.as_ref().unwrap().seconds, 50);
    assert!(response.statuses[1].current_limit.is_none());
    assert_eq!(response.statuses[2].limit_remaining, 0);
    assert_eq!(response.response_headers_to_add[0].key, "x-served-by");
    // A second hit on the nested, per-second limit is over it.
    let response = ask(
        &server,
        &[&[("path", "/search"), ("remote_address", "10.0.0.1")]],
    );
    assert_eq!(response.overall_code, Code::OverLimit as i32);
    // A path node without its own limit limits nothing.
    let response = ask(&server, &[&[("path", "/search")]]);
    assert!(response.statuses[0].current_limit.is_none());
}

#[test]
fn bad_files_name_the_field() {
    let err = RateLimitsFile::parse("domains: [{ domain: a, descriptors: [{ key: k, rate_limit: { unit: week, requests_per_unit: 1 } }] }]").unwrap_err();
    assert!(
        err.to_string()
            .contains("domains[0].descriptors[0].rate_limit.unit"),
        "{err}"
    );
    let err = RateLimitsFile::parse("domains: [{ domain: a, descriptors: [{ key: k, rate_limit: { unit: second, requests_per_unit: 0 } }] }]").unwrap_err();
    assert!(err.to_string().contains("requests_per_unit"), "{err}");
    let err = RateLimitsFile::parse("domains: [{ domain: a }, { domain: a }]").unwrap_err();
    assert!(err.to_string().contains("domains[1].domain"), "{err}");
}

use super::*;

fn spec(max: u32, per_fill: u32, ms: u64) -> BucketSpec {
    BucketSpec {
        max_tokens: max,
        tokens_per_fill: per_fill,
        fill_interval: Duration::from_millis(ms),
    }
}

#[test]
fn bucket_grants_the_burst_then_refills_per_interval() {
    let s = spec(3, 1, 1000);
    let t0 = Instant::now();
    let mut b = TokenBucket::new(&s, t0);
    for left in [2, 1, 0] {
        assert_eq!(b.take(&s, t0), Take::Granted { remaining: left });
    }
    assert_eq!(
        b.take(&s, t0 + Duration::from_millis(400)),
        Take::Limited {
            retry_after: Duration::from_millis(600)
        }
    );
    assert_eq!(
        b.take(&s, t0 + Duration::from_millis(1000)),
        Take::Granted { remaining: 0 }
    );
    // Long idle: back to full, never beyond.
    assert_eq!(
        b.take(&s, t0 + Duration::from_secs(100)),
        Take::Granted { remaining: 2 }
    );
}

#[test]
fn keyed_buckets_stay_bounded_with_a_hundred_thousand_keys() {
    let limiter = Limiter::new(spec(5, 5, 1000), 1000);
    let t0 = Instant::now();
    for i in 0..100_000 {
        limiter.take(&format!("caller-{i}"), t0 + Duration::from_micros(i));
        assert!(limiter.len() <= 1001);
    }
    assert_eq!(limiter.len(), 1001, "1000 callers and the overflow bucket");
    // Busy buckets are not evicted: a throttled caller stays throttled.
    let small = Limiter::new(spec(1, 1, 3_600_000), 2);
    assert!(matches!(small.take("a", t0), Take::Granted { .. }));
    assert!(matches!(small.take("b", t0), Take::Granted { .. }));
    assert!(
        matches!(small.take("c", t0), Take::Granted { .. }),
        "overflow bucket"
    );
    assert!(
        matches!(small.take("d", t0), Take::Limited { .. }),
        "overflow shared"
    );
    assert!(
        matches!(small.take("a", t0), Take::Limited { .. }),
        "a not reset"
    );
    // Each key has its own bucket.
    let fresh = Limiter::new(spec(1, 1, 1000), 10);
    assert!(matches!(fresh.take("a", t0), Take::Granted { .. }));
    assert!(matches!(fresh.take("a", t0), Take::Limited { .. }));
    assert!(matches!(fresh.take("b", t0), Take::Granted { .. }));
}

#[test]
fn exact_under_concurrency() {
    let limiter = std::sync::Arc::new(Limiter::new(spec(50, 1, 3_600_000), 10));
    let now = Instant::now();
    let granted = std::sync::atomic::AtomicU32::new(0);
    std::thread::scope(|scope| {
        for _ in 0..8 {
            scope.spawn(|| {
                for _ in 0..100 {
                    if matches!(limiter.take("", now), Take::Granted { .. }) {
                        granted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            });
        }
    });
    assert_eq!(granted.into_inner(), 50);
}

proptest::proptest! {
    #[test]
    fn never_more_than_burst_plus_refills(
        max in 1u32..20, per in 1u32..5, interval in 1u64..100,
        steps in proptest::collection::vec(0u64..50, 1..200),
    ) {
        let s = spec(max, per, interval);
        let t0 = Instant::now();
        let mut b = TokenBucket::new(&s, t0);
        let mut t = 0u64;
        let mut granted = 0u64;
        for step in steps {
            t += step;
            if matches!(b.take(&s, t0 + Duration::from_millis(t)), Take::Granted { .. }) {
                granted += 1;
            }
        }
        let refills = t / interval;
        proptest::prop_assert!(granted <= u64::from(max) + refills * u64::from(per));
    }
}

#[test]
fn an_adopted_limiter_keeps_the_spent_buckets_and_a_changed_spec_starts_full() {
    let t0 = Instant::now();
    let old = Limiter::new(spec(1, 1, 60_000), 10);
    assert!(matches!(old.take("a", t0), Take::Granted { .. }));
    let same = Limiter::new(spec(1, 1, 60_000), 10);
    assert!(same.adopt(&old));
    assert!(matches!(same.take("a", t0), Take::Limited { .. }));
    // The old config's requests still in flight spend from the same buckets.
    assert!(matches!(old.take("a", t0), Take::Limited { .. }));
    let changed = Limiter::new(spec(2, 1, 60_000), 10);
    assert!(!changed.adopt(&same));
    assert!(matches!(changed.take("a", t0), Take::Granted { .. }));
}

fn entry(key: &str, value: &str) -> DescriptorEntry {
    DescriptorEntry {
        key: key.into(),
        value: value.into(),
    }
}

fn request(entries: &[(&str, &str)]) -> RateLimitDescriptor {
    RateLimitDescriptor {
        entries: entries.iter().map(|(k, v)| entry(k, v)).collect(),
        ..Default::default()
    }
}

fn limit_with(descriptors: Vec<DescriptorLimit>, always_consume_default: bool) -> LocalRateLimit {
    LocalRateLimit {
        limiter: Limiter::new(spec(100, 100, 60_000), 10),
        key: RateLimitKey::Shared,
        shadow: false,
        descriptors,
        stage: 0,
        rate_limits: Vec::new(),
        always_consume_default,
    }
}

fn descriptor(entries: &[(&str, Option<&str>)], max: u32, shadow: bool) -> DescriptorLimit {
    DescriptorLimit {
        entries: entries
            .iter()
            .map(|(k, v)| (k.to_string(), v.map(str::to_string)))
            .collect(),
        limiter: Limiter::new(spec(max, max, 60_000), 10),
        shadow,
        label: "test".into(),
    }
}

#[test]
fn a_wildcard_descriptor_keeps_a_bucket_per_value_and_an_exact_one_matches_only_its_value() {
    let t0 = Instant::now();
    let limit = limit_with(
        vec![
            descriptor(&[("generic_key", Some("admin"))], 1, false),
            descriptor(&[("user", None)], 2, false),
        ],
        false,
    );
    let alice = [request(&[("user", "alice")])];
    let bob = [request(&[("user", "bob")])];
    assert!(limit.take_all("", &alice, t0).is_empty());
    assert!(limit.take_all("", &alice, t0).is_empty());
    let refused = limit.take_all("", &alice, t0);
    assert_eq!(refused.len(), 1);
    assert_eq!(refused[0].bucket, "descriptor:test");
    assert_eq!(refused[0].max_tokens, 2);
    assert!(
        limit.take_all("", &bob, t0).is_empty(),
        "bob has his own bucket"
    );

    let admin = [request(&[("generic_key", "admin")])];
    assert!(limit.take_all("", &admin, t0).is_empty());
    assert_eq!(limit.take_all("", &admin, t0).len(), 1);
    // Another value, or another shape, matches no descriptor: the
    // default bucket alone decides.
    let other = [request(&[("generic_key", "other")])];
    assert!(limit.take_all("", &other, t0).is_empty());
    let longer = [request(&[("user", "alice"), ("path", "/")])];
    assert!(limit.take_all("", &longer, t0).is_empty());
}

#[test]
fn the_default_bucket_counts_unless_a_descriptor_matched_and_consuming_it_is_off() {
    let t0 = Instant::now();
    let matched = [request(&[("user", "alice")])];
    let mut limit = limit_with(vec![descriptor(&[("user", None)], 100, false)], true);
    limit.limiter = Limiter::new(spec(1, 1, 60_000), 10);
    assert!(limit.take_all("", &matched, t0).is_empty());
    let refused = limit.take_all("", &matched, t0);
    assert_eq!(refused.len(), 1);
    assert_eq!(refused[0].bucket, "shared");

    let mut skip_default = limit_with(vec![descriptor(&[("user", None)], 100, false)], false);
    skip_default.limiter = Limiter::new(spec(1, 1, 60_000), 10);
    for _ in 0..5 {
        assert!(skip_default.take_all("", &matched, t0).is_empty());
    }
    assert!(skip_default.take_all("", &[], t0).is_empty());
    assert_eq!(skip_default.take_all("", &[], t0).len(), 1);
}

#[test]
fn a_shadow_descriptor_counts_and_lets_the_request_on() {
    let t0 = Instant::now();
    let limit = limit_with(vec![descriptor(&[("user", None)], 1, true)], true);
    let alice = [request(&[("user", "alice")])];
    assert!(limit.take_all("", &alice, t0).is_empty());
    let refused = limit.take_all("", &alice, t0);
    assert_eq!(refused.len(), 1);
    assert!(refused[0].shadow);
}

#[test]
fn descriptor_buckets_survive_adoption_by_their_entries() {
    let t0 = Instant::now();
    let alice = [request(&[("user", "alice")])];
    let old = limit_with(vec![descriptor(&[("user", None)], 1, false)], false);
    assert!(old.take_all("", &alice, t0).is_empty());
    let next = limit_with(
        vec![
            descriptor(&[("generic_key", Some("x"))], 1, false),
            descriptor(&[("user", None)], 1, false),
        ],
        false,
    );
    next.adopt(&old);
    assert_eq!(next.take_all("", &alice, t0).len(), 1, "still spent");
}

#[test]
fn an_exact_descriptor_wins_over_a_wildcard_listed_before_it() {
    let t0 = Instant::now();
    let limit = limit_with(
        vec![
            descriptor(&[("user", None)], 100, false),
            descriptor(&[("user", Some("bot"))], 1, false),
        ],
        false,
    );
    let bot = [request(&[("user", "bot")])];
    assert!(limit.take_all("", &bot, t0).is_empty());
    assert_eq!(
        limit.take_all("", &bot, t0).len(),
        1,
        "the bot's own bucket"
    );
}

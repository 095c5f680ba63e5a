use super::*;
use crate::config::file::{EndpointFile, LbPolicy, OutlierDetectionFile};

fn cluster(
    policy: LbPolicy,
    weights: &[u32],
    outlier: Option<OutlierDetectionFile>,
) -> Arc<Cluster> {
    let yaml = "name: c\nendpoints: []\n";
    let mut file: ClusterFile = serde_yaml_ng::from_str(yaml).unwrap();
    file.lb = policy;
    file.endpoints = weights
        .iter()
        .enumerate()
        .map(|(i, w)| EndpointFile {
            address: SocketAddr::from(([127, 0, 0, 1], 10_000 + i as u16)).into(),
            weight: *w,
            priority: 0,
        })
        .collect();
    file.outlier_detection = outlier;
    Arc::new(Cluster::new(Arc::new(file)))
}

fn counts(c: &Cluster, n: usize, mut roll: impl FnMut(usize) -> u64) -> Vec<usize> {
    let mut counts = vec![0; c.endpoints().len()];
    for i in 0..n {
        let guard = c.pick(roll(i)).unwrap();
        let index = c
            .endpoints()
            .iter()
            .position(|e| Arc::ptr_eq(e, guard.endpoint()))
            .unwrap();
        counts[index] += 1;
    }
    counts
}

#[test]
fn round_robin_is_weighted_and_even() {
    let c = cluster(LbPolicy::RoundRobin, &[1, 1, 1], None);
    assert_eq!(counts(&c, 300, |_| 0), vec![100, 100, 100]);
    let c = cluster(LbPolicy::RoundRobin, &[2, 1], None);
    assert_eq!(counts(&c, 300, |_| 0), vec![200, 100]);
}

#[test]
fn random_follows_weights() {
    let c = cluster(LbPolicy::Random, &[3, 1], None);
    // Rolls cover the weight space evenly.
    assert_eq!(counts(&c, 400, |i| i as u64), vec![300, 100]);
}

#[test]
fn least_request_prefers_the_idle_endpoint() {
    let c = cluster(LbPolicy::LeastRequest, &[1, 1], None);
    // Hold requests on endpoint 0, then let the two choices be 0 and 1.
    let busy: Vec<_> = (0..5).map(|_| c.pick(0).unwrap()).collect();
    assert!(busy.iter().all(|g| g.endpoint().address.port() == 10_000));
    let roll = 1u64 << 32; // first choice 0, second choice 1
    let guard = c.pick(roll).unwrap();
    assert_eq!(guard.endpoint().address.port(), 10_001);
}

fn outlier(max_percent: u32) -> OutlierDetectionFile {
    OutlierDetectionFile {
        consecutive_5xx: 3,
        consecutive_connect_failures: 2,
        base_ejection_time: Duration::from_secs(60),
        max_ejection_time: Duration::from_secs(300),
        max_ejection_percent: max_percent,
    }
}

#[test]
fn consecutive_errors_eject_and_success_resets() {
    let c = cluster(LbPolicy::RoundRobin, &[1, 1], Some(outlier(50)));
    let e0 = c.endpoints()[0].clone();
    c.report(&e0, Outcome::ServerError);
    c.report(&e0, Outcome::ServerError);
    c.report(&e0, Outcome::Success);
    c.report(&e0, Outcome::ServerError);
    c.report(&e0, Outcome::ServerError);
    assert_eq!(
        counts(&c, 4, |_| 0),
        vec![2, 2],
        "not ejected after a reset streak"
    );
    c.report(&e0, Outcome::ServerError);
    assert_eq!(counts(&c, 4, |_| 0), vec![0, 4], "ejected after 3 in a row");
}

#[test]
fn max_ejection_percent_keeps_endpoints() {
    let c = cluster(LbPolicy::RoundRobin, &[1, 1], Some(outlier(50)));
    for e in c.endpoints().to_vec() {
        c.report(&e, Outcome::ConnectFailure);
        c.report(&e, Outcome::ConnectFailure);
    }
    // Only one of two may be out at 50%.
    assert_eq!(counts(&c, 4, |_| 0).iter().filter(|n| **n > 0).count(), 1);
}

#[test]
fn all_ejected_means_no_healthy_endpoint() {
    let c = cluster(LbPolicy::RoundRobin, &[1], Some(outlier(100)));
    let e = c.endpoints()[0].clone();
    c.report(&e, Outcome::ConnectFailure);
    c.report(&e, Outcome::ConnectFailure);
    assert!(matches!(c.pick(0), Err(UpstreamError::NoHealthyEndpoint)));
}

/// A round-robin cluster of one endpoint per `(port, priority)`.
fn prioritized(endpoints: &[(u16, u32)], outlier: Option<OutlierDetectionFile>) -> Arc<Cluster> {
    let mut file: ClusterFile = serde_yaml_ng::from_str("name: c\nendpoints: []\n").unwrap();
    file.endpoints = endpoints
        .iter()
        .map(|&(port, priority)| EndpointFile {
            address: SocketAddr::from(([127, 0, 0, 1], port)).into(),
            weight: 1,
            priority,
        })
        .collect();
    file.outlier_detection = outlier;
    Arc::new(Cluster::new(Arc::new(file)))
}

fn picked_ports(c: &Cluster, n: usize) -> Vec<u16> {
    let mut ports: Vec<u16> = (0..n)
        .map(|_| c.pick(0).unwrap().endpoint().address.port())
        .collect();
    ports.sort_unstable();
    ports.dedup();
    ports
}

#[test]
fn lower_priorities_serve_only_while_better_ones_have_no_healthy_endpoint() {
    // Listed out of order: the priority, not the position, decides.
    let c = prioritized(&[(30, 2), (10, 0), (20, 1), (11, 0)], Some(outlier(100)));
    assert_eq!(picked_ports(&c, 8), [10, 11]);
    let by_port = |port| {
        c.endpoints()
            .iter()
            .find(|e| e.address.port() == port)
            .unwrap()
            .clone()
    };
    let eject = |port| {
        let e = by_port(port);
        c.report(&e, Outcome::ConnectFailure);
        c.report(&e, Outcome::ConnectFailure);
    };
    eject(10);
    assert_eq!(
        picked_ports(&c, 8),
        [11],
        "one healthy endpoint keeps priority 0"
    );
    eject(11);
    assert_eq!(picked_ports(&c, 8), [20], "priority 1 takes over");
    eject(20);
    assert_eq!(picked_ports(&c, 8), [30], "then priority 2");
    eject(30);
    assert!(matches!(c.pick(0), Err(UpstreamError::NoHealthyEndpoint)));

    // An EDS update keeps each endpoint's state where address, weight and
    // priority stay; a new priority-0 endpoint takes the traffic back.
    let mut next = (*c.settings).clone();
    next.endpoints.push(EndpointFile {
        address: SocketAddr::from(([127, 0, 0, 1], 12)).into(),
        weight: 1,
        priority: 0,
    });
    let after = Cluster::with_endpoints(&c, Arc::new(next));
    assert_eq!(picked_ports(&after, 8), [12]);
    let kept = after
        .endpoints()
        .iter()
        .find(|e| e.address.port() == 10)
        .unwrap();
    assert!(Arc::ptr_eq(kept, &by_port(10)));
}

#[test]
fn ejection_time_grows_and_caps() {
    let od = outlier(10);
    assert_eq!(ejection_time(&od, 1), Duration::from_secs(60));
    assert_eq!(ejection_time(&od, 3), Duration::from_secs(180));
    assert_eq!(ejection_time(&od, 9), Duration::from_secs(300));
}

#[test]
fn request_and_retry_breakers() {
    let yaml = "name: c\nendpoints: [{ address: 127.0.0.1:1 }]\ncircuit_breaker: { max_requests: 2, max_retries: 1 }\nretry_budget: { budget_percent: 100, min_retry_concurrency: 5 }\n";
    let file: ClusterFile = serde_yaml_ng::from_str(yaml).unwrap();
    let c = Arc::new(Cluster::new(Arc::new(file)));
    let a = c.begin_request().unwrap();
    let _b = c.begin_request().unwrap();
    assert!(matches!(
        c.begin_request(),
        Err(UpstreamError::Overloaded("requests"))
    ));
    drop(a);
    let _c = c.begin_request().unwrap();
    // max_retries caps below the budget.
    let r = c.begin_retry().unwrap();
    assert!(c.begin_retry().is_none());
    drop(r);
    assert!(c.begin_retry().is_some());
}

#[test]
fn retry_budget_scales_with_active_requests() {
    let yaml = "name: c\nendpoints: [{ address: 127.0.0.1:1 }]\ncircuit_breaker: { max_retries: 1000, max_requests: 1000 }\nretry_budget: { budget_percent: 20, min_retry_concurrency: 1 }\n";
    let file: ClusterFile = serde_yaml_ng::from_str(yaml).unwrap();
    let c = Arc::new(Cluster::new(Arc::new(file)));
    let _requests: Vec<_> = (0..10).map(|_| c.begin_request().unwrap()).collect();
    let retries: Vec<_> = (0..10).filter_map(|_| c.begin_retry()).collect();
    assert_eq!(retries.len(), 2, "20% of 10 active requests");
}

mod properties {
    use super::*;
    use proptest::prelude::*;

    fn policy() -> impl Strategy<Value = LbPolicy> {
        prop_oneof![
            Just(LbPolicy::RoundRobin),
            Just(LbPolicy::LeastRequest),
            Just(LbPolicy::Random)
        ]
    }

    proptest! {
        /// Whatever the weights, policy and rolls, a pick is always a healthy
        /// endpoint, and there is one whenever any endpoint is healthy.
        #[test]
        fn picks_only_healthy_endpoints(
            weights in proptest::collection::vec(1u32..1000, 1..8),
            healthy_mask in any::<u8>(),
            policy in policy(),
            rolls in proptest::collection::vec(any::<u64>(), 1..64),
        ) {
            let c = cluster(policy, &weights, None);
            let healthy = |i: usize| healthy_mask & (1 << (i % 8)) != 0;
            let any_healthy = (0..weights.len()).any(healthy);
            for roll in rolls {
                let pick = c.levels[0].balancer.pick(&c.levels[0].endpoints, roll, |e| {
                    let i = c.endpoints.iter().position(|x| std::ptr::eq(&**x, e)).unwrap();
                    healthy(i)
                });
                match pick {
                    Some(i) => prop_assert!(healthy(i)),
                    None => prop_assert!(!any_healthy),
                }
            }
        }

        /// Round robin gives each endpoint its weighted share over a full cycle.
        #[test]
        fn round_robin_cycle_matches_weights(weights in proptest::collection::vec(1u32..20, 1..6)) {
            let c = cluster(LbPolicy::RoundRobin, &weights, None);
            let divisor = weights.iter().fold(0u32, |a, b| gcd(a, *b));
            let cycle: u32 = weights.iter().map(|w| w / divisor).sum();
            let got = counts(&c, cycle as usize, |_| 0);
            let want: Vec<usize> = weights.iter().map(|w| (w / divisor) as usize).collect();
            prop_assert_eq!(got, want);
        }
    }

    fn gcd(a: u32, b: u32) -> u32 {
        if b == 0 {
            a
        } else {
            gcd(b, a % b)
        }
    }
}

#[test]
fn an_endpoint_update_keeps_the_state_of_endpoints_that_stay() {
    let od = OutlierDetectionFile {
        consecutive_5xx: 1,
        ..Default::default()
    };
    let first = cluster(LbPolicy::RoundRobin, &[1, 1], Some(od));
    let manager = ClusterManager::default();
    manager
        .update(std::slice::from_ref(&first.settings), &Default::default())
        .unwrap();
    let before = manager.get("c").unwrap();
    let ejected = before.endpoints()[0].clone();
    before.report(&ejected, Outcome::ServerError);
    assert!(before.is_ejected(&ejected, before.now_ms()));

    // EDS: endpoint 1 goes, a new one comes, endpoint 0 stays.
    let mut next = (*before.settings).clone();
    next.endpoints.remove(1);
    next.endpoints.push(EndpointFile {
        address: SocketAddr::from(([127, 0, 0, 1], 10_999)).into(),
        weight: 1,
        priority: 0,
    });
    manager
        .update(&[Arc::new(next)], &Default::default())
        .unwrap();
    let after = manager.get("c").unwrap();
    assert!(!Arc::ptr_eq(&before, &after));
    assert!(
        Arc::ptr_eq(&after.endpoints()[0], &ejected),
        "same endpoint, same pool"
    );
    assert!(
        after.is_ejected(&after.endpoints()[0], after.now_ms()),
        "still ejected"
    );
    assert_eq!(after.endpoints()[1].address.port(), 10_999);

    // Any other change starts the cluster afresh.
    let mut slower = (*after.settings).clone();
    slower.connect_timeout = Duration::from_secs(1);
    manager
        .update(&[Arc::new(slower)], &Default::default())
        .unwrap();
    let rebuilt = manager.get("c").unwrap();
    assert!(!Arc::ptr_eq(&rebuilt.endpoints()[0], &ejected));
}

#[test]
fn lookup_families_pick_addresses_as_envoy_does() {
    use crate::config::file::DnsLookupFamily as F;
    let v4: SocketAddr = "127.0.0.1:80".parse().unwrap();
    let v6: SocketAddr = "[::1]:80".parse().unwrap();
    let both = vec![v6, v4];
    let cases = [
        (F::V4Only, both.clone(), vec![v4]),
        (F::V6Only, both.clone(), vec![v6]),
        (F::Auto, both.clone(), vec![v6]),
        (F::Auto, vec![v4], vec![v4]),
        (F::V4Preferred, both.clone(), vec![v4]),
        (F::V4Preferred, vec![v6], vec![v6]),
        (F::All, both.clone(), both.clone()),
        (F::V6Only, vec![v4], vec![]),
    ];
    for (family, input, expected) in cases {
        assert_eq!(dns::pick_family(input, family), expected, "{family:?}");
    }
}

#[tokio::test]
async fn dns_named_endpoints_resolve_and_survive_unrelated_updates() {
    let yaml = "name: local\nendpoints: [{ address: \"localhost:10443\", weight: 2 }, { address: \"127.0.0.2:10443\" }]\ndns_lookup_family: v4_only\ndns_refresh_rate: 1h\n";
    let file: Arc<ClusterFile> = Arc::new(serde_yaml_ng::from_str(yaml).unwrap());
    let manager =
        ClusterManager::new(std::slice::from_ref(&file), &Default::default(), None).unwrap();
    // Warming: not served before the first lookups are done.
    manager.dns_warmed().await;
    let cluster = manager
        .get("local")
        .expect("installed after the first lookups");
    let addresses: Vec<(SocketAddr, u32)> = cluster
        .endpoints()
        .iter()
        .map(|e| (e.address, e.weight))
        .collect();
    assert_eq!(
        addresses,
        [
            ("127.0.0.1:10443".parse().unwrap(), 2),
            ("127.0.0.2:10443".parse().unwrap(), 1)
        ]
    );
    // The same settings again keep the resolved cluster and its task.
    manager
        .update(std::slice::from_ref(&file), &Default::default())
        .unwrap();
    assert!(Arc::ptr_eq(&cluster, &manager.get("local").unwrap()));
    // Removing the cluster stops its task and drops it.
    manager.update(&[], &Default::default()).unwrap();
    assert!(manager.get("local").is_none());
    assert!(manager.dns.lock().unwrap().is_empty());
}

#[test]
fn dns_endpoint_lists_keep_weights_drop_repeats_and_follow_the_type() {
    let yaml =
        "name: d\nendpoints: [{ address: \"a.test:80\", weight: 3 }, { address: \"b.test:80\" }]\n";
    let mut file: ClusterFile = serde_yaml_ng::from_str(yaml).unwrap();
    let (x, y, z): (SocketAddr, SocketAddr, SocketAddr) = (
        "10.0.0.1:80".parse().unwrap(),
        "10.0.0.2:80".parse().unwrap(),
        "10.0.0.3:80".parse().unwrap(),
    );
    // `b.test` has never answered: only `a.test`'s addresses, each weighted 3;
    // an address both names share is one endpoint.
    let resolved = [Some(vec![x, y]), None];
    assert_eq!(dns::endpoint_list(&file, &resolved), [(x, 3), (y, 3)]);
    let resolved = [Some(vec![x, y]), Some(vec![y, z])];
    assert_eq!(
        dns::endpoint_list(&file, &resolved),
        [(x, 3), (y, 3), (z, 1)]
    );
    file.dns_type = crate::config::file::DnsType::Logical;
    assert_eq!(dns::endpoint_list(&file, &resolved), [(x, 3), (y, 1)]);
}

#[tokio::test(start_paused = true)]
async fn a_failed_lookup_keeps_the_last_addresses_until_one_succeeds() {
    use std::collections::VecDeque;
    use std::sync::Mutex;
    let (a, b): (SocketAddr, SocketAddr) = (
        "10.0.0.1:80".parse().unwrap(),
        "10.0.0.2:80".parse().unwrap(),
    );
    // Answers in turn: a, a failure, then b (for ever after).
    let script = Arc::new(Mutex::new(VecDeque::from([
        Ok(vec![a]),
        Err(std::io::ErrorKind::NotFound),
        Ok(vec![b]),
    ])));
    let calls = Arc::new(AtomicUsize::new(0));
    let resolver = {
        let (script, calls) = (script.clone(), calls.clone());
        dns::Resolver::from_fn(move |host, port| {
            assert_eq!((host.as_str(), port), ("svc.test", 80));
            calls.fetch_add(1, Ordering::SeqCst);
            let mut script = script.lock().unwrap();
            let next = if script.len() > 1 {
                script.pop_front().unwrap()
            } else {
                script[0].clone()
            };
            next.map_err(std::io::Error::from)
        })
    };
    let manager = ClusterManager {
        resolver,
        ..Default::default()
    };
    let yaml = "name: svc\nendpoints: [{ address: \"svc.test:80\" }]\ndns_refresh_rate: 1s\n";
    let file: Arc<ClusterFile> = Arc::new(serde_yaml_ng::from_str(yaml).unwrap());
    manager
        .update(std::slice::from_ref(&file), &Default::default())
        .unwrap();
    manager.dns_warmed().await;
    let addresses = |m: &ClusterManager| -> Vec<SocketAddr> {
        m.get("svc")
            .map(|c| c.endpoints().iter().map(|e| e.address).collect())
            .unwrap_or_default()
    };
    assert_eq!(addresses(&manager), [a]);
    let first = manager.get("svc").unwrap();

    // The failed round: nothing changes, not even the cluster's identity.
    while calls.load(Ordering::SeqCst) < 2 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(addresses(&manager), [a]);
    assert!(Arc::ptr_eq(&first, &manager.get("svc").unwrap()));

    // The next answer replaces the set.
    while calls.load(Ordering::SeqCst) < 3 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(addresses(&manager), [b]);
}

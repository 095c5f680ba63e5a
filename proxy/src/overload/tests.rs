use super::*;
use std::time::Duration;

fn settings(max: Option<u64>) -> OverloadFile {
    OverloadFile {
        max_rss_bytes: max,
        shed_at: 0.9,
        pause_accept_at: 0.95,
        ..OverloadFile::default()
    }
}

#[test]
fn thresholds_are_fractions_of_the_budget() {
    let s = settings(Some(1000));
    assert_eq!(OverloadState::for_rss(0, &s), OverloadState::Normal);
    assert_eq!(OverloadState::for_rss(899, &s), OverloadState::Normal);
    assert_eq!(OverloadState::for_rss(900, &s), OverloadState::Shedding);
    assert_eq!(OverloadState::for_rss(949, &s), OverloadState::Shedding);
    assert_eq!(OverloadState::for_rss(950, &s), OverloadState::AcceptPaused);
    assert_eq!(
        OverloadState::for_rss(5000, &s),
        OverloadState::AcceptPaused
    );
    assert_eq!(
        OverloadState::for_rss(u64::MAX, &settings(None)),
        OverloadState::Normal
    );
}

#[test]
fn the_global_cap_counts_connections_until_released() {
    let overload = Overload::new(&OverloadFile {
        max_connections: 2,
        ..OverloadFile::default()
    });
    let a = overload.try_connection();
    let b = overload.try_connection();
    assert!(a.is_some() && b.is_some());
    assert!(overload.try_connection().is_none());
    drop(a);
    assert!(overload.try_connection().is_some());
}

#[tokio::test(start_paused = true)]
async fn accepting_waits_while_paused() {
    let overload = Overload::new(&OverloadFile::default());
    overload.accepting().await;
    overload.set_state(OverloadState::AcceptPaused);
    assert!(overload.shedding());
    let waiter = tokio::spawn({
        let overload = overload.clone();
        async move { overload.accepting().await }
    });
    tokio::task::yield_now().await;
    assert!(!waiter.is_finished());
    overload.set_state(OverloadState::Normal);
    waiter.await.unwrap();
    assert!(!overload.shedding());
}

#[test]
fn resident_bytes_reads_this_process() {
    assert!(resident_bytes().is_some_and(|rss| rss > 0));
}

fn hysteresis(release: f64, min_hold: Duration) -> OverloadFile {
    OverloadFile {
        release,
        min_hold,
        ..settings(Some(1000))
    }
}

/// Feeds `samples` one `step` apart from `start`; the state after each.
fn feed(trigger: &mut Trigger, start: Instant, step: Duration, samples: &[u64]) -> Vec<u8> {
    samples
        .iter()
        .enumerate()
        .map(|(i, &rss)| trigger.sample(rss, start + step * i as u32) as u8)
        .collect()
}

#[test]
fn a_resident_set_hovering_at_a_threshold_does_not_flap() {
    // Shedding from 900, released below 0.95 × 900 = 855.
    let mut trigger = Trigger::new(&hysteresis(0.95, Duration::ZERO));
    let hovering = [899, 900, 899, 901, 880, 899, 856, 900, 854, 860, 899, 900];
    let states = feed(
        &mut trigger,
        Instant::now(),
        Duration::from_millis(250),
        &hovering,
    );
    assert_eq!(states, [0, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 1]);
}

#[test]
fn without_hysteresis_each_sample_sets_the_state() {
    // release 1 and no hold: the behaviour before hysteresis.
    let mut trigger = Trigger::new(&hysteresis(1.0, Duration::ZERO));
    let states = feed(
        &mut trigger,
        Instant::now(),
        Duration::from_millis(250),
        &[899, 900, 899, 950, 949, 899],
    );
    assert_eq!(states, [0, 1, 0, 2, 1, 0]);
}

#[test]
fn each_state_has_its_own_release_point() {
    // Paused from 950, released below 902.5; shedding released below 855.
    let mut trigger = Trigger::new(&hysteresis(0.95, Duration::ZERO));
    let states = feed(
        &mut trigger,
        Instant::now(),
        Duration::from_millis(250),
        &[950, 920, 903, 902, 870, 856, 854, 0],
    );
    assert_eq!(states, [2, 2, 2, 1, 1, 1, 0, 0]);
    // A drop past both release points leaves both at once.
    let mut trigger = Trigger::new(&hysteresis(0.95, Duration::ZERO));
    assert_eq!(
        feed(
            &mut trigger,
            Instant::now(),
            Duration::from_millis(1),
            &[2000, 10]
        ),
        [2, 0]
    );
}

#[test]
fn a_state_is_kept_for_the_minimum_hold_after_each_step_up() {
    let start = Instant::now();
    let hold = Duration::from_secs(1);
    let mut trigger = Trigger::new(&hysteresis(0.95, hold));
    assert_eq!(trigger.sample(900, start), OverloadState::Shedding);
    // Far below the release point, but within the hold.
    let ms = Duration::from_millis;
    assert_eq!(trigger.sample(0, start + ms(999)), OverloadState::Shedding);
    assert_eq!(trigger.sample(0, start + hold), OverloadState::Normal);
    // A step up restarts the hold, also from shedding to paused.
    let later = start + Duration::from_secs(10);
    assert_eq!(trigger.sample(900, later), OverloadState::Shedding);
    assert_eq!(
        trigger.sample(960, later + ms(500)),
        OverloadState::AcceptPaused
    );
    assert_eq!(
        trigger.sample(0, later + ms(1499)),
        OverloadState::AcceptPaused
    );
    assert_eq!(trigger.sample(0, later + ms(1500)), OverloadState::Normal);
    // Past the hold, the release point still decides.
    assert_eq!(
        trigger.sample(900, later + ms(3000)),
        OverloadState::Shedding
    );
    assert_eq!(
        trigger.sample(880, later + ms(9000)),
        OverloadState::Shedding
    );
}

#[test]
fn without_a_budget_the_trigger_stays_normal() {
    let mut trigger = Trigger::new(&settings(None));
    assert_eq!(
        trigger.sample(u64::MAX, Instant::now()),
        OverloadState::Normal
    );
    assert_eq!(trigger.state(), OverloadState::Normal);
}

#[test]
fn transitions_are_counted_by_state() {
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    metrics::with_local_recorder(&recorder, || {
        let overload = Overload::new(&OverloadFile::default());
        overload.set_state(OverloadState::Shedding);
        overload.set_state(OverloadState::Shedding);
        overload.set_state(OverloadState::AcceptPaused);
        overload.set_state(OverloadState::Normal);
    });
    let mut counted: Vec<(String, String, u64)> = snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .filter(|(key, ..)| key.key().name() == names::OVERLOAD_TRANSITIONS_TOTAL)
        .map(|(key, _, _, value)| {
            let label = |name: &str| {
                key.key()
                    .labels()
                    .find(|l| l.key() == name)
                    .map(|l| l.value().to_string())
                    .unwrap_or_default()
            };
            let DebugValue::Counter(n) = value else {
                panic!("not a counter")
            };
            (label("from"), label("to"), n)
        })
        .collect();
    counted.sort();
    assert_eq!(
        counted,
        [
            ("accept_paused".into(), "normal".into(), 1),
            ("normal".into(), "shedding".into(), 1),
            ("shedding".into(), "accept_paused".into(), 1),
        ]
    );
}

#[test]
fn tcp_connections_are_shed_only_while_shedding_and_when_asked() {
    let overload = Overload::new(&OverloadFile::default());
    assert!(!overload.shedding_tcp());
    overload.set_state(OverloadState::Shedding);
    assert!(overload.shedding_tcp());
    let kept = Overload::new(&OverloadFile {
        shed_tcp_connections: false,
        ..OverloadFile::default()
    });
    kept.set_state(OverloadState::Shedding);
    assert!(kept.shedding() && !kept.shedding_tcp());
}

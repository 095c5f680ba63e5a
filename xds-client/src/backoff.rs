//! Jittered exponential back-off between connection attempts.

use std::time::Duration;

use rand::Rng;

/// Delays that double from `initial` up to `max`, each drawn uniformly from
/// the upper half of its step so a fleet that lost the control plane
/// together does not come back together.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    initial: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub(crate) fn new(initial: Duration, max: Duration) -> Backoff {
        Backoff {
            initial,
            // A max below the initial delay would make every step grow past it.
            max: max.max(initial),
            attempt: 0,
        }
    }

    /// Starts over from `initial`, after a stream that worked.
    pub(crate) fn reset(&mut self) {
        self.attempt = 0;
    }

    /// The delay before the next attempt.
    pub(crate) fn next_delay(&mut self, rng: &mut impl Rng) -> Duration {
        // 2^20 times any sane initial delay is past any sane max; stopping
        // there keeps the multiplication from overflowing.
        let factor = 1u32 << self.attempt.min(20);
        self.attempt = self.attempt.saturating_add(1);
        let step = self.initial.saturating_mul(factor).min(self.max);
        let half = step / 2;
        let spread = u64::try_from((step - half).as_nanos()).unwrap_or(u64::MAX);
        half + Duration::from_nanos(rng.random_range(0..=spread))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng as _;

    #[test]
    fn doubles_with_jitter_up_to_max_and_resets() {
        let mut rng = StdRng::seed_from_u64(7);
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let expected_steps = [100, 200, 400, 800, 1000, 1000];
        for step in expected_steps {
            let delay = backoff.next_delay(&mut rng);
            let step = Duration::from_millis(step);
            assert!(delay >= step / 2 && delay <= step, "{delay:?} vs {step:?}");
        }
        backoff.reset();
        assert!(backoff.next_delay(&mut rng) <= Duration::from_millis(100));
    }

    #[test]
    fn never_overflows() {
        let mut rng = StdRng::seed_from_u64(1);
        let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
        for _ in 0..100 {
            assert!(backoff.next_delay(&mut rng) <= Duration::from_secs(30));
        }
    }

    #[test]
    fn jitter_spreads_delays() {
        let mut rng = StdRng::seed_from_u64(3);
        let delays: Vec<_> = (0..8)
            .map(|_| {
                Backoff::new(Duration::from_secs(1), Duration::from_secs(1)).next_delay(&mut rng)
            })
            .collect();
        assert!(delays.windows(2).any(|w| w[0] != w[1]));
    }
}

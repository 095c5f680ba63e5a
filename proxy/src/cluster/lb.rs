//! Load balancers: weighted round robin, least request (power of two
//! choices) and weighted random. Pure: the caller passes randomness and a
//! health predicate, so tests drive them deterministically.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::Endpoint;
use crate::config::file::LbPolicy;

/// Picks endpoints for one cluster.
#[derive(Debug)]
pub struct Balancer {
    policy: LbPolicy,
    /// Cumulative weights (divided by their gcd), the last is the total.
    cumulative: Vec<u64>,
    next: AtomicU64,
}

impl Balancer {
    /// A balancer over these endpoints.
    pub fn new(policy: LbPolicy, endpoints: &[Arc<Endpoint>]) -> Self {
        let divisor = endpoints
            .iter()
            .map(|e| u64::from(e.weight))
            .fold(0, gcd)
            .max(1);
        let mut total = 0;
        let cumulative = endpoints
            .iter()
            .map(|e| {
                total += u64::from(e.weight) / divisor;
                total
            })
            .collect();
        Balancer {
            policy,
            cumulative,
            next: AtomicU64::new(0),
        }
    }

    fn total(&self) -> u64 {
        self.cumulative.last().copied().unwrap_or(0)
    }

    fn by_point(&self, point: u64) -> usize {
        self.cumulative.partition_point(|upto| *upto <= point)
    }

    /// Index of the chosen endpoint among those `healthy` accepts, if any.
    pub fn pick(
        &self,
        endpoints: &[Arc<Endpoint>],
        roll: u64,
        healthy: impl Fn(&Endpoint) -> bool,
    ) -> Option<usize> {
        let total = self.total();
        if total == 0 {
            return None;
        }
        match self.policy {
            LbPolicy::RoundRobin => {
                let start = self.next.fetch_add(1, Ordering::Relaxed) % total;
                self.first_healthy_from(endpoints, self.by_point(start), &healthy)
            }
            LbPolicy::Random => {
                let first = self.by_point(roll % total);
                self.first_healthy_from(endpoints, first, &healthy)
            }
            LbPolicy::LeastRequest => {
                let a =
                    self.first_healthy_from(endpoints, self.by_point(roll % total), &healthy)?;
                let b = self.first_healthy_from(
                    endpoints,
                    self.by_point((roll >> 32) % total),
                    &healthy,
                )?;
                // Compare load per unit of weight: active_a / w_a < active_b / w_b.
                let (ea, eb) = (&endpoints[a], &endpoints[b]);
                let load_a = (ea.active_requests() as u64 + 1) * u64::from(eb.weight);
                let load_b = (eb.active_requests() as u64 + 1) * u64::from(ea.weight);
                Some(if load_b < load_a { b } else { a })
            }
        }
    }

    fn first_healthy_from(
        &self,
        endpoints: &[Arc<Endpoint>],
        start: usize,
        healthy: &impl Fn(&Endpoint) -> bool,
    ) -> Option<usize> {
        let n = endpoints.len();
        (0..n)
            .map(|offset| (start + offset) % n)
            .find(|&i| healthy(&endpoints[i]))
    }
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

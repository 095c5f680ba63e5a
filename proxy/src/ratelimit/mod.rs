//! Local rate limits: token buckets, one per limit or one per key (caller
//! SPIFFE ID, header value, remote address), with the clock passed in so
//! the arithmetic is pure. Keyed buckets are bounded in number: idle
//! (refilled) buckets are dropped first, then the least recently used.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Bucket parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BucketSpec {
    /// Tokens a full bucket holds (the burst).
    pub max_tokens: u32,
    /// Tokens added every `fill_interval`.
    pub tokens_per_fill: u32,
    /// Refill period.
    pub fill_interval: Duration,
}

/// One token bucket. Refills in whole intervals, as Envoy's does.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    tokens: u32,
    last_fill: Instant,
    last_used: Instant,
}

/// The outcome of taking a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Take {
    /// Granted; this many tokens are left.
    Granted {
        /// Tokens left after this one.
        remaining: u32,
    },
    /// Refused; a token comes back after this long.
    Limited {
        /// Time to the next refill.
        retry_after: Duration,
    },
}

impl TokenBucket {
    /// A full bucket at `now`.
    pub fn new(spec: &BucketSpec, now: Instant) -> TokenBucket {
        TokenBucket {
            tokens: spec.max_tokens,
            last_fill: now,
            last_used: now,
        }
    }

    fn refill(&mut self, spec: &BucketSpec, now: Instant) {
        let interval = spec.fill_interval.max(Duration::from_millis(1));
        let elapsed = now.saturating_duration_since(self.last_fill);
        let fills = elapsed.as_nanos() / interval.as_nanos();
        if fills > 0 {
            let added = u128::from(spec.tokens_per_fill) * fills;
            self.tokens = u32::try_from(u128::from(self.tokens) + added)
                .unwrap_or(u32::MAX)
                .min(spec.max_tokens);
            // Whole intervals only, so partial progress is kept.
            self.last_fill += interval * u32::try_from(fills).unwrap_or(u32::MAX);
        }
    }

    /// Takes one token at `now`.
    pub fn take(&mut self, spec: &BucketSpec, now: Instant) -> Take {
        self.refill(spec, now);
        self.last_used = now;
        if self.tokens > 0 {
            self.tokens -= 1;
            Take::Granted {
                remaining: self.tokens,
            }
        } else {
            let interval = spec.fill_interval.max(Duration::from_millis(1));
            let next = self.last_fill + interval;
            Take::Limited {
                retry_after: next.saturating_duration_since(now),
            }
        }
    }

    /// Whether the bucket is full at `now` (dropping it changes nothing).
    fn is_full(&mut self, spec: &BucketSpec, now: Instant) -> bool {
        self.refill(spec, now);
        self.tokens >= spec.max_tokens
    }
}

/// A limit: one bucket, or one bucket per key, bounded in number.
#[derive(Debug)]
pub struct Limiter {
    spec: BucketSpec,
    max_keys: usize,
    buckets: Mutex<HashMap<String, TokenBucket>>,
}

impl Limiter {
    /// A limiter keeping at most `max_keys` buckets.
    pub fn new(spec: BucketSpec, max_keys: usize) -> Limiter {
        Limiter {
            spec,
            max_keys: max_keys.max(1),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// The bucket parameters.
    pub fn spec(&self) -> &BucketSpec {
        &self.spec
    }

    /// Takes a token from `key`'s bucket (`""` for an unkeyed limit).
    pub fn take(&self, key: &str, now: Instant) -> Take {
        let Ok(mut buckets) = self.buckets.lock() else {
            // A poisoned lock must not turn into an outage: let it through.
            return Take::Granted { remaining: 0 };
        };
        if let Some(bucket) = buckets.get_mut(key) {
            return bucket.take(&self.spec, now);
        }
        if buckets.len() >= self.max_keys {
            let spec = self.spec;
            buckets.retain(|_, b| !b.is_full(&spec, now));
            if buckets.len() >= self.max_keys {
                // Still full of busy buckets: drop the least recently used
                // tenth at once, so the sweep is paid once per many inserts.
                let evict = self.max_keys / 10 + 1;
                let mut ages: Vec<(Instant, String)> = buckets
                    .iter()
                    .map(|(k, b)| (b.last_used, k.clone()))
                    .collect();
                let cut = evict.min(ages.len()) - 1;
                ages.select_nth_unstable(cut);
                for (_, key) in ages.into_iter().take(evict) {
                    buckets.remove(&key);
                }
            }
        }
        let mut bucket = TokenBucket::new(&self.spec, now);
        let taken = bucket.take(&self.spec, now);
        buckets.insert(key.to_string(), bucket);
        taken
    }

    /// Buckets held now.
    pub fn len(&self) -> usize {
        self.buckets.lock().map_or(0, |b| b.len())
    }

    /// Whether no bucket is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What a per-key limit keys on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RateLimitKey {
    /// One bucket for everyone.
    Shared,
    /// The caller's verified SPIFFE ID.
    SpiffeId,
    /// The remote address.
    RemoteAddress,
    /// A request header's value.
    Header(http::HeaderName),
}

/// A configured local rate limit.
#[derive(Debug)]
pub struct LocalRateLimit {
    /// The buckets.
    pub limiter: Limiter,
    /// What the buckets are keyed by.
    pub key: RateLimitKey,
    /// Count only, never refuse.
    pub shadow: bool,
}

#[cfg(test)]
mod tests;

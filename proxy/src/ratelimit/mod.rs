//! Local rate limits (here) and global ones ([`global`], through an Envoy
//! rate-limit service).
//!
//! Local rate limits: token buckets, one per limit or one per key (caller
//! SPIFFE ID, header value, remote address, JWT claim), with the clock
//! passed in so the arithmetic is pure. Keyed buckets are bounded in number: idle
//! (refilled) buckets are dropped first, then the least recently used.

pub mod global;

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

/// The bucket that keys beyond `max_keys` share; no header value or
/// address can spell it.
const OVERFLOW_KEY: &str = "\u{0}overflow";

/// A limit: one bucket, or one bucket per key, bounded in number.
#[derive(Debug)]
pub struct Limiter {
    spec: BucketSpec,
    max_keys: usize,
    /// Swappable so a config change can hand the new limiter the old one's
    /// buckets ([`Limiter::adopt`]) after both are built.
    buckets: arc_swap::ArcSwap<Mutex<Buckets>>,
}

#[derive(Debug, Default)]
struct Buckets {
    by_key: HashMap<String, TokenBucket>,
    /// Buckets only become idle at a refill, so sweeping more often than
    /// once per interval would find nothing new.
    last_sweep: Option<Instant>,
}

impl Limiter {
    /// A limiter keeping at most `max_keys` buckets (plus one shared by
    /// the keys that find no room).
    pub fn new(spec: BucketSpec, max_keys: usize) -> Limiter {
        Limiter {
            spec,
            max_keys: max_keys.max(1),
            buckets: arc_swap::ArcSwap::from_pointee(Mutex::new(Buckets::default())),
        }
    }

    /// Shares `previous`'s buckets when both have the same bucket
    /// parameters, so a config change that keeps a limit keeps what its
    /// callers have spent; returns whether it did. A changed spec starts
    /// with full buckets.
    pub fn adopt(&self, previous: &Limiter) -> bool {
        if self.spec != previous.spec {
            return false;
        }
        self.buckets.store(previous.buckets.load_full());
        true
    }

    /// The bucket parameters.
    pub fn spec(&self) -> &BucketSpec {
        &self.spec
    }

    /// Takes a token from `key`'s bucket (`""` for an unkeyed limit).
    pub fn take(&self, key: &str, now: Instant) -> Take {
        let buckets = self.buckets.load();
        let Ok(mut guard) = buckets.lock() else {
            // A poisoned lock must not turn into an outage: let it through.
            return Take::Granted { remaining: 0 };
        };
        let Buckets { by_key, last_sweep } = &mut *guard;
        if let Some(bucket) = by_key.get_mut(key) {
            return bucket.take(&self.spec, now);
        }
        let spec = self.spec;
        if by_key.len() >= self.max_keys {
            let due =
                last_sweep.is_none_or(|at| now.saturating_duration_since(at) >= spec.fill_interval);
            if due {
                by_key.retain(|_, b| !b.is_full(&spec, now));
                *last_sweep = Some(now);
            }
            if by_key.len() >= self.max_keys {
                // Still full of busy buckets. Evicting one would hand its
                // caller a fresh burst the moment it came back under a new
                // key, so new keys share one overflow bucket until idle
                // buckets free their places.
                return by_key
                    .entry(OVERFLOW_KEY.to_string())
                    .or_insert_with(|| TokenBucket::new(&spec, now))
                    .take(&spec, now);
            }
        }
        let mut bucket = TokenBucket::new(&spec, now);
        let taken = bucket.take(&spec, now);
        by_key.insert(key.to_string(), bucket);
        taken
    }

    /// Buckets held now.
    pub fn len(&self) -> usize {
        self.buckets.load().lock().map_or(0, |b| b.by_key.len())
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
    /// A claim of the first verified JWT that has it.
    JwtClaim(crate::authn::jwt::ClaimPath),
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

impl LocalRateLimit {
    /// Keeps `previous`'s buckets when this limit is the same one (same
    /// key and bucket parameters); returns whether it did.
    pub fn adopt(&self, previous: &LocalRateLimit) -> bool {
        self.key == previous.key && self.limiter.adopt(&previous.limiter)
    }
}

#[cfg(test)]
mod tests;

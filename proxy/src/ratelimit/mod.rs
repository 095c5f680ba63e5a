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

use postern_proto::envoy::extensions::common::ratelimit::v3::{
    rate_limit_descriptor::Entry as DescriptorEntry, RateLimitDescriptor,
};

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

impl RateLimitKey {
    /// What the key is, for metric labels.
    pub fn kind(&self) -> &'static str {
        match self {
            RateLimitKey::Shared => "shared",
            RateLimitKey::SpiffeId => "spiffe_id",
            RateLimitKey::RemoteAddress => "remote_address",
            RateLimitKey::Header(_) => "header",
            RateLimitKey::JwtClaim(_) => "jwt_claim",
        }
    }
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
    /// Envoy's `descriptors`: buckets for requests whose descriptors (built
    /// by the route's `rate_limits`, or `rate_limits` here) match, taken
    /// before this limit's own bucket.
    pub descriptors: Vec<DescriptorLimit>,
    /// Only `rate_limits` entries of this stage build descriptors.
    pub stage: u32,
    /// This limit's own descriptor actions, used instead of the route's
    /// when there are any.
    pub rate_limits: Vec<std::sync::Arc<global::RateLimitPolicy>>,
    /// Take from this limit's own bucket even when a descriptor matched
    /// (Envoy's `always_consume_default_token_bucket`, default true).
    pub always_consume_default: bool,
}

/// A descriptor's bucket (Envoy's `LocalRateLimitDescriptor`).
#[derive(Debug)]
pub struct DescriptorLimit {
    /// The entries a request's descriptor must have, in order: a key and
    /// its value, or any value (`None`), each value then getting its own
    /// bucket.
    pub entries: Vec<(String, Option<String>)>,
    /// The buckets.
    pub limiter: Limiter,
    /// Count only, never refuse.
    pub shadow: bool,
    /// `key=value` or `key` per entry, joined by commas: the metric label.
    pub label: String,
}

impl DescriptorLimit {
    /// The bucket key for `descriptor` when it matches: the values of the
    /// entries that take any value, joined (`""` when none do).
    pub fn bucket_of(&self, descriptor: &[DescriptorEntry]) -> Option<String> {
        if descriptor.len() != self.entries.len() {
            return None;
        }
        let mut key = String::new();
        for ((want_key, want_value), got) in self.entries.iter().zip(descriptor) {
            if *want_key != got.key {
                return None;
            }
            match want_value {
                Some(value) if *value != got.value => return None,
                Some(_) => {}
                None => {
                    if !key.is_empty() {
                        // No header value or address holds a newline.
                        key.push('\n');
                    }
                    key.push_str(&got.value);
                }
            }
        }
        Some(key)
    }
}

/// A bucket that refused a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal<'a> {
    /// Which bucket: the limit's key kind (`shared`, `remote_address`, …)
    /// or `descriptor:` and the descriptor's label.
    pub bucket: std::borrow::Cow<'a, str>,
    /// A shadow bucket: count, do not refuse.
    pub shadow: bool,
    /// Time to that bucket's next refill.
    pub retry_after: Duration,
    /// That bucket's size.
    pub max_tokens: u32,
}

impl LocalRateLimit {
    /// Keeps `previous`'s buckets when this limit is the same one (same
    /// key and bucket parameters); returns whether it did. Descriptor
    /// buckets are kept alike, each with the same entries and bucket.
    pub fn adopt(&self, previous: &LocalRateLimit) -> bool {
        for descriptor in &self.descriptors {
            if let Some(old) = previous
                .descriptors
                .iter()
                .find(|old| old.entries == descriptor.entries)
            {
                descriptor.limiter.adopt(&old.limiter);
            }
        }
        self.key == previous.key && self.limiter.adopt(&previous.limiter)
    }

    /// Takes a token for a request: from the bucket of the descriptor that
    /// matches each of `descriptors` (the first exact one, else the first
    /// with value-less entries), then (when none
    /// matched, or `always_consume_default`) from `default_key`'s bucket.
    /// Returns the buckets that refused it; the first one not in shadow
    /// ends the taking, as in Envoy.
    pub fn take_all(
        &self,
        default_key: &str,
        descriptors: &[RateLimitDescriptor],
        now: Instant,
    ) -> Vec<Refusal<'_>> {
        let mut refused = Vec::new();
        let mut matched = false;
        for descriptor in descriptors {
            // A descriptor with every value given wins over one that takes
            // any value, as Envoy looks up static descriptors first.
            let exact = |d: &&DescriptorLimit| d.entries.iter().all(|(_, v)| v.is_some());
            let Some((limit, key)) = self
                .descriptors
                .iter()
                .filter(exact)
                .chain(self.descriptors.iter().filter(|d| !exact(d)))
                .find_map(|d| d.bucket_of(&descriptor.entries).map(|key| (d, key)))
            else {
                continue;
            };
            matched = true;
            if let Take::Limited { retry_after } = limit.limiter.take(&key, now) {
                let shadow = self.shadow || limit.shadow;
                refused.push(Refusal {
                    bucket: std::borrow::Cow::Owned(format!("descriptor:{}", limit.label)),
                    shadow,
                    retry_after,
                    max_tokens: limit.limiter.spec().max_tokens,
                });
                if !shadow {
                    return refused;
                }
            }
        }
        if !matched || self.always_consume_default {
            if let Take::Limited { retry_after } = self.limiter.take(default_key, now) {
                refused.push(Refusal {
                    bucket: std::borrow::Cow::Borrowed(self.key.kind()),
                    shadow: self.shadow,
                    retry_after,
                    max_tokens: self.limiter.spec().max_tokens,
                });
            }
        }
        refused
    }
}

#[cfg(test)]
mod tests;

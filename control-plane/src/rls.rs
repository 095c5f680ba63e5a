//! The reference control plane's rate-limit service (Envoy's
//! `RateLimitService/ShouldRateLimit`), for tests and demos: limits from a
//! YAML file in the shape envoyproxy/ratelimit reads, counters in memory,
//! one fixed window per descriptor value.
//!
//! Boundaries: one process, no persistence, no sharing between replicas;
//! production uses envoyproxy/ratelimit with Redis. The clock is injected
//! so windows can be tested without waiting.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use postern_proto::envoy::config::core::v3::HeaderValue;
use postern_proto::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use postern_proto::envoy::service::ratelimit::v3::rate_limit_response::{
    rate_limit::Unit, Code, DescriptorStatus, RateLimit,
};
use postern_proto::envoy::service::ratelimit::v3::rate_limit_service_server::{
    RateLimitService, RateLimitServiceServer,
};
use postern_proto::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use serde::Deserialize;
use tonic::{Request, Response, Status};

/// Most counters kept; past it, windows that have ended are dropped first,
/// and a request whose counter finds no room is answered from none (OK).
pub const MAX_COUNTERS: usize = 100_000;

/// The limits file: one entry per domain.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitsFile {
    /// The domains and their descriptor trees.
    pub domains: Vec<DomainFile>,
}

/// A domain's limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DomainFile {
    /// The domain a request names.
    pub domain: String,
    /// Top-level descriptor entries.
    #[serde(default)]
    pub descriptors: Vec<DescriptorFile>,
    /// Headers added to every response (e.g. to tell callers which service
    /// answered).
    #[serde(default)]
    pub response_headers: Vec<HeaderFile>,
    /// Headers set on requests that pass.
    #[serde(default)]
    pub request_headers: Vec<HeaderFile>,
}

/// One node of the descriptor tree: an entry key, optionally one value.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DescriptorFile {
    /// The entry key.
    pub key: String,
    /// The entry value; without it every value matches and has its own
    /// counter.
    #[serde(default)]
    pub value: Option<String>,
    /// The limit for descriptors that end here.
    #[serde(default)]
    pub rate_limit: Option<LimitFile>,
    /// Entries that may follow this one.
    #[serde(default)]
    pub descriptors: Vec<DescriptorFile>,
}

/// A limit: so many requests per unit of time.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitFile {
    /// `second`, `minute`, `hour` or `day`.
    pub unit: UnitFile,
    /// Requests allowed per window.
    pub requests_per_unit: u32,
    /// A name reported in `x-ratelimit-limit`.
    #[serde(default)]
    pub name: Option<String>,
}

/// The unit of a limit's window.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum UnitFile {
    /// One second.
    Second,
    /// One minute.
    Minute,
    /// One hour.
    Hour,
    /// One day.
    Day,
}

impl UnitFile {
    fn seconds(self) -> u64 {
        match self {
            UnitFile::Second => 1,
            UnitFile::Minute => 60,
            UnitFile::Hour => 3600,
            UnitFile::Day => 86_400,
        }
    }

    fn proto(self) -> Unit {
        match self {
            UnitFile::Second => Unit::Second,
            UnitFile::Minute => Unit::Minute,
            UnitFile::Hour => Unit::Hour,
            UnitFile::Day => Unit::Day,
        }
    }
}

/// A header the service asks for.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderFile {
    /// Its name.
    pub name: String,
    /// Its value.
    pub value: String,
}

/// A limits file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum RateLimitsError {
    /// The file could not be read.
    #[error("could not read rate limits file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The YAML does not fit, at this field.
    #[error("invalid rate limits file at `{field}`: {reason}")]
    Invalid {
        /// The field path.
        field: String,
        /// Why.
        reason: String,
    },
}

impl RateLimitsFile {
    /// Parses and checks a limits file's text.
    ///
    /// # Errors
    ///
    /// If the YAML does not fit (naming the field), a domain is empty or
    /// repeated, a limit allows 0 requests, or a descriptor key is empty.
    pub fn parse(text: &str) -> Result<RateLimitsFile, RateLimitsError> {
        let file: RateLimitsFile = serde_path_to_error::deserialize(
            serde_yaml_ng::Deserializer::from_str(text),
        )
        .map_err(|err| RateLimitsError::Invalid {
            field: err.path().to_string(),
            reason: err.into_inner().to_string(),
        })?;
        let mut seen = std::collections::HashSet::new();
        for (d, domain) in file.domains.iter().enumerate() {
            if domain.domain.is_empty() || !seen.insert(domain.domain.as_str()) {
                return Err(RateLimitsError::Invalid {
                    field: format!("domains[{d}].domain"),
                    reason: "must be set and unique".into(),
                });
            }
            check_tree(&domain.descriptors, &format!("domains[{d}].descriptors"))?;
        }
        Ok(file)
    }

    /// Reads a limits file.
    ///
    /// # Errors
    ///
    /// As [`RateLimitsFile::parse`], or if the file cannot be read.
    pub fn load(path: &Path) -> Result<RateLimitsFile, RateLimitsError> {
        let text = std::fs::read_to_string(path).map_err(|source| RateLimitsError::Read {
            path: path.display().to_string(),
            source,
        })?;
        RateLimitsFile::parse(&text)
    }
}

fn check_tree(nodes: &[DescriptorFile], path: &str) -> Result<(), RateLimitsError> {
    for (i, node) in nodes.iter().enumerate() {
        let npath = format!("{path}[{i}]");
        if node.key.is_empty() {
            return Err(RateLimitsError::Invalid {
                field: format!("{npath}.key"),
                reason: "must not be empty".into(),
            });
        }
        if node
            .rate_limit
            .as_ref()
            .is_some_and(|l| l.requests_per_unit == 0)
        {
            return Err(RateLimitsError::Invalid {
                field: format!("{npath}.rate_limit.requests_per_unit"),
                reason: "must be more than 0".into(),
            });
        }
        check_tree(&node.descriptors, &format!("{npath}.descriptors"))?;
    }
    Ok(())
}

/// The time source windows are counted by.
pub type Clock = Arc<dyn Fn() -> SystemTime + Send + Sync>;

/// One counter: its window and the hits in it.
#[derive(Debug, Clone, Copy)]
struct Window {
    index: u64,
    hits: u64,
    unit_seconds: u64,
}

/// The service; cheap to clone (clones share counters).
#[derive(Clone)]
pub struct RateLimitServer {
    limits: Arc<RateLimitsFile>,
    counters: Arc<Mutex<HashMap<String, Window>>>,
    clock: Clock,
    calls: Arc<std::sync::atomic::AtomicU64>,
}

impl std::fmt::Debug for RateLimitServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimitServer")
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl RateLimitServer {
    /// A service with these limits, counting by the system clock.
    pub fn new(limits: RateLimitsFile) -> RateLimitServer {
        RateLimitServer::with_clock(limits, Arc::new(SystemTime::now))
    }

    /// A service counting windows by `clock`.
    pub fn with_clock(limits: RateLimitsFile, clock: Clock) -> RateLimitServer {
        RateLimitServer {
            limits: Arc::new(limits),
            counters: Arc::new(Mutex::new(HashMap::new())),
            clock,
            calls: Arc::new(std::sync::atomic::AtomicU64::new(0)),
        }
    }

    /// `ShouldRateLimit` calls answered so far.
    pub fn calls(&self) -> u64 {
        self.calls.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The gRPC service to mount on a tonic server.
    pub fn into_service(self) -> RateLimitServiceServer<RateLimitServer> {
        RateLimitServiceServer::new(self)
    }

    /// Answers one request: each descriptor's status, and the overall code.
    pub fn decide(&self, request: &RateLimitRequest) -> RateLimitResponse {
        self.calls
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let Some(domain) = self
            .limits
            .domains
            .iter()
            .find(|d| d.domain == request.domain)
        else {
            return RateLimitResponse {
                overall_code: Code::Ok as i32,
                statuses: request.descriptors.iter().map(|_| ok_status()).collect(),
                ..Default::default()
            };
        };
        let now = (self.clock)()
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO)
            .as_secs();
        let hits = u64::from(request.hits_addend.max(1));
        let mut statuses = Vec::with_capacity(request.descriptors.len());
        let mut over = false;
        let mut counters = match self.counters.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        for descriptor in &request.descriptors {
            let Some(limit) = find_limit(&domain.descriptors, descriptor) else {
                statuses.push(ok_status());
                continue;
            };
            let unit = limit.unit.seconds();
            let index = now / unit;
            let key = counter_key(&domain.domain, descriptor);
            if !counters.contains_key(&key) && counters.len() >= MAX_COUNTERS {
                counters.retain(|_, w| w.index == now / w.unit_seconds);
            }
            let count = if counters.len() < MAX_COUNTERS || counters.contains_key(&key) {
                let window = counters.entry(key).or_insert(Window {
                    index,
                    hits: 0,
                    unit_seconds: unit,
                });
                if window.index != index {
                    *window = Window {
                        index,
                        hits: 0,
                        unit_seconds: unit,
                    };
                }
                window.hits += hits;
                window.hits
            } else {
                hits
            };
            let allowed = u64::from(limit.requests_per_unit);
            let over_this = count > allowed;
            over |= over_this;
            statuses.push(DescriptorStatus {
                code: if over_this { Code::OverLimit } else { Code::Ok } as i32,
                current_limit: Some(RateLimit {
                    name: limit.name.clone().unwrap_or_default(),
                    requests_per_unit: limit.requests_per_unit,
                    unit: limit.unit.proto() as i32,
                }),
                limit_remaining: u32::try_from(allowed.saturating_sub(count)).unwrap_or(0),
                duration_until_reset: Some(postern_proto::google::protobuf::Duration {
                    seconds: i64::try_from((index + 1) * unit - now).unwrap_or(0),
                    nanos: 0,
                }),
                quota: None,
            });
        }
        drop(counters);
        let headers = |list: &[HeaderFile]| {
            list.iter()
                .map(|h| HeaderValue {
                    key: h.name.clone(),
                    value: h.value.clone(),
                    raw_value: Vec::new(),
                })
                .collect()
        };
        RateLimitResponse {
            overall_code: if over { Code::OverLimit } else { Code::Ok } as i32,
            statuses,
            response_headers_to_add: headers(&domain.response_headers),
            request_headers_to_add: if over {
                Vec::new()
            } else {
                headers(&domain.request_headers)
            },
            ..Default::default()
        }
    }
}

fn ok_status() -> DescriptorStatus {
    DescriptorStatus {
        code: Code::Ok as i32,
        ..Default::default()
    }
}

/// The limit of the tree node a descriptor's entries lead to: at each step
/// a node with the entry's key and value, else one with the key alone.
fn find_limit<'a>(
    tree: &'a [DescriptorFile],
    descriptor: &RateLimitDescriptor,
) -> Option<&'a LimitFile> {
    let mut level = tree;
    let mut node = None;
    for entry in &descriptor.entries {
        let found = level
            .iter()
            .find(|n| n.key == entry.key && n.value.as_deref() == Some(entry.value.as_str()))
            .or_else(|| {
                level
                    .iter()
                    .find(|n| n.key == entry.key && n.value.is_none())
            })?;
        level = &found.descriptors;
        node = Some(found);
    }
    node?.rate_limit.as_ref()
}

fn counter_key(domain: &str, descriptor: &RateLimitDescriptor) -> String {
    // Lengths first, so no key or value can be made to look like two.
    let mut key = format!("{}:{domain}", domain.len());
    for entry in &descriptor.entries {
        key.push_str(&format!(
            "|{}:{}={}:{}",
            entry.key.len(),
            entry.key,
            entry.value.len(),
            entry.value
        ));
    }
    key
}

#[tonic::async_trait]
impl RateLimitService for RateLimitServer {
    async fn should_rate_limit(
        &self,
        request: Request<RateLimitRequest>,
    ) -> Result<Response<RateLimitResponse>, Status> {
        let request = request.into_inner();
        if request.domain.is_empty() {
            return Err(Status::invalid_argument(
                "rate limit domain must not be empty",
            ));
        }
        Ok(Response::new(self.decide(&request)))
    }
}

#[cfg(test)]
mod tests;

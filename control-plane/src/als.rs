//! The reference control plane's access-log service (Envoy's
//! `AccessLogService/StreamAccessLogs`): it takes the per-call entries
//! proxies stream to it, keeps a bounded per-route [`Summary`], publishes
//! each received batch as an [`AlsEvent`], and can print the summary as a
//! table.
//!
//! Boundaries: no entry is stored, only the summary's counts; and nothing is
//! answered on the stream, as the API intends (a client learns nothing but
//! the stream's end).

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use postern_proto::envoy::data::accesslog::v3::{
    AccessLogCommon, HttpAccessLogEntry, ResponseFlags, TcpAccessLogEntry,
};
use postern_proto::envoy::service::accesslog::v3::access_log_service_server::{
    AccessLogService, AccessLogServiceServer,
};
use postern_proto::envoy::service::accesslog::v3::stream_access_logs_message::{
    Identifier, LogEntries,
};
use postern_proto::envoy::service::accesslog::v3::{
    StreamAccessLogsMessage, StreamAccessLogsResponse,
};
use tokio::sync::{broadcast, watch};
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument as _;

#[cfg(test)]
mod tests;

/// How many [`AlsEvent`]s a slow [`AlsServer::events`] receiver may fall
/// behind before it starts losing the oldest ones.
pub const EVENT_CAPACITY: usize = 1024;

/// Rows the summary keeps before counting new keys in its `other` row, so
/// a flood of route or node names cannot grow it without bound.
pub const MAX_SUMMARY_ROWS: usize = 1000;

/// One message of entries received on an ALS stream.
#[derive(Debug, Clone)]
pub struct AlsEvent {
    /// The stream's identifier (node and log name) from its first message;
    /// empty if the client sent none.
    pub identifier: Arc<Identifier>,
    /// The message's entries: all HTTP or all TCP.
    pub entries: Arc<LogEntries>,
}

impl AlsEvent {
    /// The sending node's id.
    pub fn node_id(&self) -> &str {
        self.identifier.node.as_ref().map_or("", |n| n.id.as_str())
    }

    /// The stream's log name.
    pub fn log_name(&self) -> &str {
        &self.identifier.log_name
    }

    /// The HTTP entries (none in a TCP message).
    pub fn http(&self) -> &[HttpAccessLogEntry] {
        match &*self.entries {
            LogEntries::HttpLogs(http) => &http.log_entry,
            LogEntries::TcpLogs(_) => &[],
        }
    }

    /// The TCP entries (none in an HTTP message).
    pub fn tcp(&self) -> &[TcpAccessLogEntry] {
        match &*self.entries {
            LogEntries::TcpLogs(tcp) => &tcp.log_entry,
            LogEntries::HttpLogs(_) => &[],
        }
    }
}

/// An access-log service. Cheap to clone: clones share the summary, the
/// event channel and the closing switch.
#[derive(Clone)]
pub struct AlsServer {
    shared: Arc<Shared>,
}

struct Shared {
    summary: Mutex<Summary>,
    events: broadcast::Sender<AlsEvent>,
    /// Set once by [`AlsServer::close_streams`].
    closing: watch::Sender<bool>,
}

impl fmt::Debug for AlsServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AlsServer")
            .field("calls", &self.lock().total_calls())
            .finish_non_exhaustive()
    }
}

impl Default for AlsServer {
    fn default() -> AlsServer {
        AlsServer::new()
    }
}

impl AlsServer {
    /// A server with an empty summary of at most [`MAX_SUMMARY_ROWS`] rows.
    pub fn new() -> AlsServer {
        let (events, _) = broadcast::channel(EVENT_CAPACITY);
        AlsServer {
            shared: Arc::new(Shared {
                summary: Mutex::new(Summary::new(MAX_SUMMARY_ROWS)),
                events,
                closing: watch::Sender::new(false),
            }),
        }
    }

    /// Every batch received from now on. A receiver that falls more than
    /// [`EVENT_CAPACITY`] batches behind loses the oldest.
    pub fn events(&self) -> broadcast::Receiver<AlsEvent> {
        self.shared.events.subscribe()
    }

    /// A copy of the summary so far.
    pub fn summary(&self) -> Summary {
        self.lock().clone()
    }

    /// Ends every open stream with `UNAVAILABLE`, and every stream opened
    /// later at once. For shutdown: ALS streams never end on their own, so
    /// a graceful server shutdown would otherwise wait for them forever.
    pub fn close_streams(&self) {
        self.shared.closing.send_replace(true);
    }

    /// Wraps the server in the generated tonic service, ready for
    /// `tonic::transport::Server::add_service`.
    pub fn into_service(self) -> AccessLogServiceServer<AlsServer> {
        AccessLogServiceServer::new(self)
    }

    /// Writes the summary table to stdout every `interval`, skipping
    /// intervals in which nothing arrived. Runs until dropped.
    pub async fn print_summaries(self, interval: Duration) {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The first tick is immediate, when nothing can have arrived.
        ticker.tick().await;
        let mut printed = 0;
        loop {
            ticker.tick().await;
            let (generation, table) = {
                let summary = self.lock();
                if summary.generation() == printed {
                    continue;
                }
                let table = format!(
                    "access-log summary: {} calls since start\n{}",
                    summary.total_calls(),
                    summary.table()
                );
                (summary.generation(), table)
            };
            printed = generation;
            let mut stdout = std::io::stdout().lock();
            if let Err(err) = std::io::Write::write_all(&mut stdout, table.as_bytes())
                .and_then(|()| std::io::Write::flush(&mut stdout))
            {
                tracing::warn!(%err, "could not print the access-log summary; stopping");
                return;
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, Summary> {
        // A panic while recording leaves at worst a half-counted entry.
        self.shared
            .summary
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn record(&self, identifier: &Arc<Identifier>, entries: LogEntries) {
        let node = identifier.node.as_ref().map_or("", |n| n.id.as_str());
        let log_name = identifier.log_name.as_str();
        {
            let mut summary = self.lock();
            match &entries {
                LogEntries::HttpLogs(http) => {
                    for entry in &http.log_entry {
                        summary.record_http(node, log_name, entry);
                    }
                }
                LogEntries::TcpLogs(tcp) => {
                    for entry in &tcp.log_entry {
                        summary.record_tcp(node, log_name, entry);
                    }
                }
            }
        }
        // No receivers is normal: events are for whoever listens.
        let _ = self.shared.events.send(AlsEvent {
            identifier: identifier.clone(),
            entries: Arc::new(entries),
        });
    }
}

#[tonic::async_trait]
impl AccessLogService for AlsServer {
    async fn stream_access_logs(
        &self,
        request: Request<Streaming<StreamAccessLogsMessage>>,
    ) -> Result<Response<StreamAccessLogsResponse>, Status> {
        let span = tracing::info_span!(
            "als",
            peer = ?request.remote_addr(),
            node = tracing::field::Empty,
        );
        self.receive(request.into_inner())
            .instrument(span)
            .await
            .map(Response::new)
    }
}

impl AlsServer {
    async fn receive(
        &self,
        mut stream: Streaming<StreamAccessLogsMessage>,
    ) -> Result<StreamAccessLogsResponse, Status> {
        let mut closing = self.shared.closing.subscribe();
        let mut identifier: Option<Arc<Identifier>> = None;
        loop {
            let message = tokio::select! {
                biased;
                () = async { let _ = closing.wait_for(|closing| *closing).await; } => {
                    return Err(Status::unavailable("the control plane is shutting down"));
                }
                message = stream.message() => message,
            };
            let message = match message {
                Ok(Some(message)) => message,
                Ok(None) => {
                    tracing::info!("als stream ended");
                    return Ok(StreamAccessLogsResponse {});
                }
                Err(status) => {
                    tracing::info!(%status, "als stream failed");
                    return Err(status);
                }
            };
            if let Some(id) = message.identifier {
                let node = id.node.as_ref().map_or("", |n| n.id.as_str());
                tracing::Span::current().record("node", node);
                tracing::info!(log_name = %id.log_name, "als stream open");
                identifier = Some(Arc::new(id));
            }
            let id = identifier.get_or_insert_with(|| {
                tracing::warn!("als stream sent entries before an identifier");
                Arc::new(Identifier::default())
            });
            if let Some(entries) = message.log_entries {
                self.record(id, entries);
            }
        }
    }
}

/// What the summary counts calls by.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RouteKey {
    /// The sending node's id.
    pub node: String,
    /// The stream's log name.
    pub log_name: String,
    /// The route name; `-` when none (TCP, or no route matched).
    pub route: String,
    /// The upstream cluster; `-` when none.
    pub cluster: String,
}

/// Upper bounds of the duration buckets, in milliseconds; one more bucket
/// holds everything longer.
const BUCKET_BOUNDS_MS: [u64; 13] = [1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000];

/// Call durations in fixed buckets, for rough quantiles in constant space.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DurationHistogram {
    counts: [u64; BUCKET_BOUNDS_MS.len() + 1],
    max: Duration,
}

impl DurationHistogram {
    /// Counts one duration.
    pub fn record(&mut self, d: Duration) {
        let ms = d.as_millis();
        let bucket = BUCKET_BOUNDS_MS
            .iter()
            .position(|&bound| ms < u128::from(bound))
            .unwrap_or(BUCKET_BOUNDS_MS.len());
        self.counts[bucket] += 1;
        self.max = self.max.max(d);
    }

    /// An upper estimate of quantile `q` (0 to 1): the upper bound of the
    /// bucket that holds it, or the longest duration seen if that is less.
    /// None when empty.
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        let total: u64 = self.counts.iter().sum();
        if total == 0 {
            return None;
        }
        // The rank of the quantile, 1-based, at least the first call.
        let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (bucket, count) in self.counts.iter().enumerate() {
            seen += count;
            if seen >= rank {
                let bound = BUCKET_BOUNDS_MS
                    .get(bucket)
                    .map_or(self.max, |&ms| Duration::from_millis(ms));
                return Some(bound.min(self.max));
            }
        }
        Some(self.max)
    }
}

/// Counts for one [`RouteKey`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteStats {
    /// Calls (HTTP requests and TCP connections).
    pub calls: u64,
    /// Calls by status class: `[0]` no status (no response, or TCP), `[1]`
    /// to `[5]` 1xx to 5xx. The table's `OTHER` column is `[0]` plus `[1]`.
    pub status_classes: [u64; 6],
    /// Calls by Envoy response flag code (`UF`, `NR`...).
    pub flags: BTreeMap<&'static str, u64>,
    /// Call durations.
    pub durations: DurationHistogram,
    /// Bytes from downstream (request bodies, or the TCP stream).
    pub bytes_received: u64,
    /// Bytes to downstream (response bodies, or the TCP stream).
    pub bytes_sent: u64,
}

impl RouteStats {
    fn record(&mut self, common: Option<&AccessLogCommon>, status: Option<u32>, rx: u64, tx: u64) {
        self.calls += 1;
        let class = status
            .filter(|s| (100..600).contains(s))
            .map_or(0, |s| (s / 100) as usize);
        self.status_classes[class] += 1;
        if let Some(common) = common {
            for code in flag_codes(common.response_flags.as_ref()) {
                *self.flags.entry(code).or_default() += 1;
            }
            if let Some(d) = common
                .duration
                .as_ref()
                .or(common.time_to_last_downstream_tx_byte.as_ref())
                .and_then(duration)
            {
                self.durations.record(d);
            }
        }
        self.bytes_received += rx;
        self.bytes_sent += tx;
    }
}

fn duration(d: &postern_proto::google::protobuf::Duration) -> Option<Duration> {
    Some(Duration::new(
        u64::try_from(d.seconds).ok()?,
        u32::try_from(d.nanos).ok()?,
    ))
}

/// Envoy's short codes for the flags set.
fn flag_codes(flags: Option<&ResponseFlags>) -> Vec<&'static str> {
    let Some(f) = flags else {
        return Vec::new();
    };
    let unauthorized = f.unauthorized_details.map(|u| {
        use postern_proto::envoy::data::accesslog::v3::response_flags::unauthorized::Reason;
        if u.reason == Reason::ExternalService as i32 {
            "UAEX"
        } else {
            // No Envoy code: unauthorized for another reason (Postern's RBAC).
            "UA"
        }
    });
    [
        (f.failed_local_healthcheck, "LH"),
        (f.no_healthy_upstream, "UH"),
        (f.upstream_request_timeout, "UT"),
        (f.local_reset, "LR"),
        (f.upstream_remote_reset, "UR"),
        (f.upstream_connection_failure, "UF"),
        (f.upstream_connection_termination, "UC"),
        (f.upstream_overflow, "UO"),
        (f.no_route_found, "NR"),
        (f.delay_injected, "DI"),
        (f.fault_injected, "FI"),
        (f.rate_limited, "RL"),
        (f.rate_limit_service_error, "RLSE"),
        (f.downstream_connection_termination, "DC"),
        (f.upstream_retry_limit_exceeded, "URX"),
        (f.stream_idle_timeout, "SI"),
        (f.invalid_envoy_request_headers, "IH"),
        (f.downstream_protocol_error, "DPE"),
        (f.upstream_max_stream_duration_reached, "UMSDR"),
        (f.response_from_cache_filter, "RFCF"),
        (f.no_filter_config_found, "NFCF"),
        (f.duration_timeout, "DT"),
        (f.upstream_protocol_error, "UPE"),
        (f.no_cluster_found, "NC"),
        (f.overload_manager, "OM"),
        (f.dns_resolution_failure, "DF"),
        (f.downstream_remote_reset, "DR"),
    ]
    .into_iter()
    .filter_map(|(set, code)| set.then_some(code))
    .chain(unauthorized)
    .collect()
}

/// Calls received, by node, log name, route and cluster, since start. At
/// most `max_rows` keys get a row; calls of later keys count in
/// [`Summary::other`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    rows: BTreeMap<RouteKey, RouteStats>,
    other: RouteStats,
    max_rows: usize,
    generation: u64,
}

impl Summary {
    /// An empty summary of at most `max_rows` rows.
    pub fn new(max_rows: usize) -> Summary {
        Summary {
            rows: BTreeMap::new(),
            other: RouteStats::default(),
            max_rows,
            generation: 0,
        }
    }

    /// Counts one HTTP entry from `node`'s stream `log_name`.
    pub fn record_http(&mut self, node: &str, log_name: &str, entry: &HttpAccessLogEntry) {
        let common = entry.common_properties.as_ref();
        let status = entry
            .response
            .as_ref()
            .and_then(|r| r.response_code)
            .map(|c| c.value);
        let (rx, tx) = (
            entry.request.as_ref().map_or(0, |r| r.request_body_bytes),
            entry.response.as_ref().map_or(0, |r| r.response_body_bytes),
        );
        self.row(node, log_name, common)
            .record(common, status, rx, tx);
    }

    /// Counts one TCP entry from `node`'s stream `log_name`.
    pub fn record_tcp(&mut self, node: &str, log_name: &str, entry: &TcpAccessLogEntry) {
        let common = entry.common_properties.as_ref();
        let props = entry.connection_properties.unwrap_or_default();
        self.row(node, log_name, common).record(
            common,
            None,
            props.received_bytes,
            props.sent_bytes,
        );
    }

    fn row(
        &mut self,
        node: &str,
        log_name: &str,
        common: Option<&AccessLogCommon>,
    ) -> &mut RouteStats {
        self.generation += 1;
        let name = |s: Option<&String>| match s.map(String::as_str) {
            None | Some("") => "-".to_owned(),
            Some(s) => s.to_owned(),
        };
        let key = RouteKey {
            node: node.to_owned(),
            log_name: log_name.to_owned(),
            route: name(common.map(|c| &c.route_name)),
            cluster: name(common.map(|c| &c.upstream_cluster)),
        };
        if self.rows.len() >= self.max_rows && !self.rows.contains_key(&key) {
            return &mut self.other;
        }
        self.rows.entry(key).or_default()
    }

    /// The row of a key, if it has one.
    pub fn get(&self, key: &RouteKey) -> Option<&RouteStats> {
        self.rows.get(key)
    }

    /// Every row, in key order.
    pub fn rows(&self) -> impl Iterator<Item = (&RouteKey, &RouteStats)> {
        self.rows.iter()
    }

    /// Calls of keys that came after the summary was full.
    pub fn other(&self) -> &RouteStats {
        &self.other
    }

    /// Calls counted in all.
    pub fn total_calls(&self) -> u64 {
        self.rows.values().map(|r| r.calls).sum::<u64>() + self.other.calls
    }

    /// Grows with every call counted; unchanged means nothing new.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The summary as a text table, one line per row (and an `(other)` row
    /// when needed), ending in a newline.
    pub fn table(&self) -> String {
        const HEADER: [&str; 15] = [
            "NODE", "LOG", "ROUTE", "CLUSTER", "CALLS", "2XX", "3XX", "4XX", "5XX", "OTHER",
            "FLAGS", "P50", "P99", "RX", "TX",
        ];
        let mut lines: Vec<[String; 15]> = vec![HEADER.map(str::to_owned)];
        let other_key = RouteKey {
            node: "(other)".to_owned(),
            log_name: "-".to_owned(),
            route: "-".to_owned(),
            cluster: "-".to_owned(),
        };
        let other = (self.other.calls > 0).then_some((&other_key, &self.other));
        for (key, stats) in self.rows.iter().chain(other) {
            let flags = if stats.flags.is_empty() {
                "-".to_owned()
            } else {
                stats
                    .flags
                    .iter()
                    .map(|(code, n)| format!("{code}={n}"))
                    .collect::<Vec<_>>()
                    .join(",")
            };
            let quantile = |q| {
                stats
                    .durations
                    .quantile(q)
                    .map_or("-".to_owned(), |d: Duration| {
                        format!("{:.1}ms", d.as_secs_f64() * 1000.0)
                    })
            };
            let classes = stats.status_classes;
            lines.push([
                key.node.clone(),
                key.log_name.clone(),
                key.route.clone(),
                key.cluster.clone(),
                stats.calls.to_string(),
                classes[2].to_string(),
                classes[3].to_string(),
                classes[4].to_string(),
                classes[5].to_string(),
                (classes[0] + classes[1]).to_string(),
                flags,
                quantile(0.5),
                quantile(0.99),
                stats.bytes_received.to_string(),
                stats.bytes_sent.to_string(),
            ]);
        }
        let mut widths = [0; 15];
        for line in &lines {
            for (width, cell) in widths.iter_mut().zip(line) {
                *width = (*width).max(cell.chars().count());
            }
        }
        let mut out = String::new();
        for line in &lines {
            let mut row = String::new();
            for (i, (cell, width)) in line.iter().zip(widths).enumerate() {
                // Names align left, numbers right.
                let _ = if i < 4 || i == 10 {
                    write!(row, "{cell:<width$}  ")
                } else {
                    write!(row, "{cell:>width$}  ")
                };
            }
            out.push_str(row.trim_end());
            out.push('\n');
        }
        out
    }
}

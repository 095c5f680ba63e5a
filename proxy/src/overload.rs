//! Overload protection for the whole process, a small version of Envoy's
//! overload manager: a cap on downstream connections across every listener,
//! and actions taken as resident memory nears a budget (answer new requests
//! 503, then stop accepting connections), undone once it falls back.
//!
//! Memory is read from `/proc/self/status` by one sampler task; the request
//! path and the accept loops only read an atomic or await a `watch`.
//! Listener-level limits (`limits.max_connections`) stay in `listener`.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;

use crate::config::file::OverloadFile;
use crate::telemetry::metrics as names;

/// What the process does about its load, from lightest to heaviest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub enum OverloadState {
    /// Serve as usual.
    Normal = 0,
    /// Answer new requests `503` with `x-postern-overloaded: true`.
    Shedding = 1,
    /// Shed requests and accept no connection (they wait in the kernel's
    /// listen queue).
    AcceptPaused = 2,
}

impl OverloadState {
    fn from_u8(value: u8) -> OverloadState {
        match value {
            0 => OverloadState::Normal,
            1 => OverloadState::Shedding,
            _ => OverloadState::AcceptPaused,
        }
    }

    /// The state for `rss` bytes resident under `settings`: pure, so the
    /// thresholds test without a process to fill.
    pub fn for_rss(rss: u64, settings: &OverloadFile) -> OverloadState {
        let Some(max) = settings.max_rss_bytes else {
            return OverloadState::Normal;
        };
        let used = rss as f64 / max as f64;
        if used >= settings.pause_accept_at {
            OverloadState::AcceptPaused
        } else if used >= settings.shed_at {
            OverloadState::Shedding
        } else {
            OverloadState::Normal
        }
    }
}

/// The process-wide overload state one proxy shares with its listeners.
#[derive(Debug)]
pub struct Overload {
    settings: OverloadFile,
    connections: Arc<Semaphore>,
    // Read on every request: an atomic, not the watch's lock.
    current: AtomicU8,
    state: watch::Sender<OverloadState>,
}

impl Overload {
    /// Overload protection as `settings` say; memory is not watched until
    /// [`Overload::start_sampler`] runs.
    pub fn new(settings: &OverloadFile) -> Arc<Overload> {
        Arc::new(Overload {
            settings: settings.clone(),
            connections: Arc::new(Semaphore::new(settings.max_connections)),
            current: AtomicU8::new(OverloadState::Normal as u8),
            state: watch::Sender::new(OverloadState::Normal),
        })
    }

    /// Counts a downstream connection against the global cap until the
    /// permit drops; `None` when `max_connections` are open already.
    pub fn try_connection(&self) -> Option<OwnedSemaphorePermit> {
        self.connections.clone().try_acquire_owned().ok()
    }

    /// The current state.
    pub fn state(&self) -> OverloadState {
        OverloadState::from_u8(self.current.load(Ordering::Relaxed))
    }

    /// Whether new requests are to be answered 503.
    pub fn shedding(&self) -> bool {
        self.state() >= OverloadState::Shedding
    }

    /// Resolves at once unless accepting is paused; then when it resumes.
    pub async fn accepting(&self) {
        let mut state = self.state.subscribe();
        // The sender lives in `self`, so `wait_for` cannot fail while we wait.
        let _ = state.wait_for(|s| *s != OverloadState::AcceptPaused).await;
    }

    /// Resolves once accepting is paused.
    pub async fn paused(&self) {
        let mut state = self.state.subscribe();
        let _ = state.wait_for(|s| *s == OverloadState::AcceptPaused).await;
    }

    /// Accepts the next connection on `socket`, never while accepting is
    /// paused: a pause that starts while waiting stops the wait.
    pub async fn accept(
        &self,
        socket: &tokio::net::TcpListener,
    ) -> std::io::Result<(tokio::net::TcpStream, std::net::SocketAddr)> {
        loop {
            self.accepting().await;
            tokio::select! {
                accepted = socket.accept() => return accepted,
                _ = self.paused() => {}
            }
        }
    }

    /// Sets the state (the sampler does this; tests may too).
    pub fn set_state(&self, next: OverloadState) {
        let previous = OverloadState::from_u8(self.current.swap(next as u8, Ordering::Relaxed));
        if previous != next {
            self.state.send_replace(next);
            metrics::gauge!(names::OVERLOAD_STATE).set(f64::from(next as u8));
            if next > previous {
                tracing::warn!(state = ?next, "overloaded");
            } else {
                tracing::info!(state = ?next, "overload eased");
            }
        }
    }

    /// Starts reading the resident set every `check_interval`, when a
    /// memory budget is set (otherwise there is nothing to watch).
    pub fn start_sampler(self: &Arc<Self>) -> Option<JoinHandle<()>> {
        self.settings.max_rss_bytes?;
        let overload = Arc::downgrade(self);
        let interval = self.settings.check_interval;
        Some(tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let rss_gauge = metrics::gauge!(names::OVERLOAD_RSS_BYTES);
            loop {
                tick.tick().await;
                let Some(overload) = overload.upgrade() else {
                    return;
                };
                let Some(rss) = resident_bytes() else {
                    tracing::warn!(
                        "cannot read /proc/self/status; memory overload actions are off"
                    );
                    return;
                };
                rss_gauge.set(rss as f64);
                overload.set_state(OverloadState::for_rss(rss, &overload.settings));
            }
        }))
    }
}

/// The resident set size of this process, from `/proc/self/status`.
pub fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

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
}

//! Overload protection for the whole process, a small version of Envoy's
//! overload manager: a cap on downstream connections across every listener,
//! and actions taken as resident memory nears a budget (answer new requests
//! 503 and close new TCP-proxy connections, then stop accepting
//! connections), undone once it falls back well below the threshold that
//! started them: [`Trigger`] has a threshold to enter each state, a lower
//! release point and a minimum hold to leave it, so that a process hovering
//! at a threshold does not shed on and off.
//!
//! Memory is read from `/proc/self/status` by one sampler task; the request
//! path and the accept loops only read an atomic or await a `watch`.
//! Listener-level limits (`limits.max_connections`) stay in `listener`.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::config::file::OverloadFile;
use crate::telemetry::metrics as names;

/// What the process does about its load, from lightest to heaviest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub enum OverloadState {
    /// Serve as usual.
    Normal = 0,
    /// Answer new requests `503` with `x-postern-overloaded: true`, and
    /// close new TCP-proxy connections at once (unless
    /// `shed_tcp_connections` is off).
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

    /// The state's name, as metric labels and logs spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            OverloadState::Normal => "normal",
            OverloadState::Shedding => "shedding",
            OverloadState::AcceptPaused => "accept_paused",
        }
    }

    /// The state `rss` bytes resident enter under `settings` (its
    /// thresholds, without hysteresis): pure, so the thresholds test
    /// without a process to fill.
    pub fn for_rss(rss: u64, settings: &OverloadFile) -> OverloadState {
        OverloadState::at(rss, settings, 1.0)
    }

    /// The heaviest state whose threshold, scaled by `factor`, `rss` reaches.
    fn at(rss: u64, settings: &OverloadFile, factor: f64) -> OverloadState {
        let Some(max) = settings.max_rss_bytes else {
            return OverloadState::Normal;
        };
        let used = rss as f64 / max as f64;
        if used >= settings.pause_accept_at * factor {
            OverloadState::AcceptPaused
        } else if used >= settings.shed_at * factor {
            OverloadState::Shedding
        } else {
            OverloadState::Normal
        }
    }
}

/// The memory trigger with hysteresis (as Envoy's overload manager scales
/// its triggers): a sample at or past a state's threshold enters that state
/// at once; a state is left only by a sample below `release` times its
/// threshold, and no earlier than `min_hold` after the last step up. Pure:
/// fed samples and their times, it tests without a process to fill.
#[derive(Debug, Clone)]
pub struct Trigger {
    settings: OverloadFile,
    state: OverloadState,
    escalated_at: Option<Instant>,
}

impl Trigger {
    /// A trigger in the normal state.
    pub fn new(settings: &OverloadFile) -> Trigger {
        Trigger {
            settings: settings.clone(),
            state: OverloadState::Normal,
            escalated_at: None,
        }
    }

    /// The state after the last sample.
    pub fn state(&self) -> OverloadState {
        self.state
    }

    /// Takes a sample of `rss` bytes resident at `now`; the state after it.
    pub fn sample(&mut self, rss: u64, now: Instant) -> OverloadState {
        let entered = OverloadState::for_rss(rss, &self.settings);
        if entered > self.state {
            self.state = entered;
            self.escalated_at = Some(now);
            return self.state;
        }
        // Below a threshold but above its release point the state stays:
        // that band is what keeps a process hovering at the threshold from
        // flapping.
        let kept = OverloadState::at(rss, &self.settings, self.settings.release).min(self.state);
        let held = self
            .escalated_at
            .is_some_and(|at| now.saturating_duration_since(at) < self.settings.min_hold);
        if kept < self.state && !held {
            self.state = kept;
        }
        self.state
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

    /// Whether a new TCP-proxy connection (or a captured one found opaque)
    /// is to be closed at once: while shedding, unless
    /// `shed_tcp_connections` is off.
    pub fn shedding_tcp(&self) -> bool {
        self.settings.shed_tcp_connections && self.shedding()
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
            metrics::counter!(
                names::OVERLOAD_TRANSITIONS_TOTAL,
                "from" => previous.as_str(),
                "to" => next.as_str(),
            )
            .increment(1);
            if next > previous {
                tracing::warn!(state = ?next, "overloaded");
            } else {
                tracing::info!(state = ?next, "overload eased");
            }
        }
    }

    /// Starts reading the resident set every `check_interval`, when a
    /// memory budget is set (otherwise there is nothing to watch); each
    /// sample goes through a [`Trigger`].
    pub fn start_sampler(self: &Arc<Self>) -> Option<JoinHandle<()>> {
        self.settings.max_rss_bytes?;
        let overload = Arc::downgrade(self);
        let interval = self.settings.check_interval;
        Some(tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let rss_gauge = metrics::gauge!(names::OVERLOAD_RSS_BYTES);
            let mut trigger = match overload.upgrade() {
                Some(overload) => Trigger::new(&overload.settings),
                None => return,
            };
            let mut ever_read = false;
            let mut failing = false;
            loop {
                tick.tick().await;
                let Some(overload) = overload.upgrade() else {
                    return;
                };
                let Some(rss) = resident_bytes() else {
                    if !ever_read {
                        tracing::warn!(
                            "cannot read /proc/self/status; memory overload actions are off"
                        );
                        return;
                    }
                    // A read that worked before and fails now is most likely
                    // out of descriptors, in the very storm being shed: keep
                    // the state and read again next tick rather than freeze it.
                    if !failing {
                        tracing::warn!("cannot read /proc/self/status; trying again");
                        failing = true;
                    }
                    continue;
                };
                ever_read = true;
                failing = false;
                rss_gauge.set(rss as f64);
                overload.set_state(trigger.sample(rss, Instant::now()));
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
mod tests;

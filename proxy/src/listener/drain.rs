//! The drain (SIGTERM, `POST /drain`): listeners that face callers stop
//! accepting at once and let their connections finish; listeners the app
//! calls out through (`DrainPhase::AfterApp`) keep accepting while the app
//! may still need them, that is until the app is gone or
//! `outbound_drain_wait` has passed. Whatever is still open when
//! `drain_timeout` is up is closed.
//!
//! "The app is gone" means: no connection is open on any listener, and
//! none of the app addresses inbound capture has forwarded to accepts a
//! connection any more. With no such address known, the first part alone
//! decides.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use super::manager::ListenerManager;
use super::ConnectionTracker;
use crate::config::DrainPhase;

/// How often the drain checks whether the app is gone.
const APP_CHECK_INTERVAL: Duration = Duration::from_millis(100);

/// Most app addresses remembered (one per app port).
const MAX_APP_ADDRESSES: usize = 1024;

/// Time the forced close leaves connection tasks to release their sockets.
const FORCE_GRACE: Duration = Duration::from_secs(1);

/// The timing of a drain.
#[derive(Debug, Clone, Copy)]
pub struct DrainPlan {
    /// From the start of the drain until everything still open is closed.
    pub timeout: Duration,
    /// Longest time `AfterApp` listeners keep accepting.
    pub outbound_wait: Duration,
}

/// The app's addresses (`127.0.0.1:PORT`) inbound capture has forwarded
/// to, so the drain can tell whether the app still listens.
#[derive(Debug, Default)]
pub struct AppAddresses(Mutex<BTreeSet<SocketAddr>>);

impl AppAddresses {
    /// Remembers `addr`, up to `MAX_APP_ADDRESSES`.
    pub fn record(&self, addr: SocketAddr) {
        if let Ok(mut set) = self.0.lock() {
            if set.len() < MAX_APP_ADDRESSES {
                set.insert(addr);
            }
        }
    }

    /// The addresses remembered so far.
    pub fn list(&self) -> Vec<SocketAddr> {
        self.0
            .lock()
            .map(|set| set.iter().copied().collect())
            .unwrap_or_default()
    }
}

/// Runs a drain to its end: every listener stopped and every connection
/// finished or closed.
pub async fn run(listeners: &ListenerManager, tracker: &ConnectionTracker, plan: DrainPlan) {
    let start = Instant::now();
    let deadline = start + plan.timeout;
    listeners
        .drain_where(|l| l.drain == DrainPhase::Immediate)
        .await;
    if listeners.any(|l| l.drain == DrainPhase::AfterApp) {
        let wait_until = start + plan.outbound_wait.min(plan.timeout);
        tokio::select! {
            _ = tokio::time::sleep_until(wait_until) => {
                tracing::info!("outbound drain wait over; outbound listeners stop accepting");
            }
            _ = app_gone(tracker, listeners.app_addresses()) => {
                tracing::info!("the app is gone; outbound listeners stop accepting");
            }
        }
    }
    listeners.drain_where(|_| true).await;
    if tokio::time::timeout_at(deadline, tracker.wait_idle())
        .await
        .is_err()
    {
        tracing::warn!(
            open = tracker.live(),
            "drain timeout passed; closing open connections"
        );
        listeners.force_all();
        // Connection tasks end at their next poll; give them a moment to release sockets.
        let _ = tokio::time::timeout(FORCE_GRACE, tracker.wait_idle()).await;
    }
}

/// Resolves once no connection is open and no known app address accepts.
async fn app_gone(tracker: &ConnectionTracker, app: &AppAddresses) {
    let mut check = tokio::time::interval(APP_CHECK_INTERVAL);
    loop {
        check.tick().await;
        if tracker.live() > 0 {
            continue;
        }
        let mut listening = false;
        for addr in app.list() {
            // Refused is the answer sought; anything else (accepted, or a
            // timeout) means the app may still be there.
            let probe =
                tokio::time::timeout(APP_CHECK_INTERVAL, tokio::net::TcpStream::connect(addr));
            if !matches!(probe.await, Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused)
            {
                listening = true;
                break;
            }
        }
        if !listening {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::Arc;

    use super::*;

    #[tokio::test]
    async fn the_app_is_gone_once_nothing_is_open_and_its_ports_refuse() {
        let tracker = Arc::new(ConnectionTracker::default());
        let app = AppAddresses::default();
        let socket = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        app.record(socket.local_addr().unwrap());
        let open = tracker.track();
        let gone = app_gone(&tracker, &app);
        tokio::pin!(gone);
        let pending = Duration::from_millis(250);
        assert!(tokio::time::timeout(pending, &mut gone).await.is_err());
        // Nothing open, but the app still listens.
        drop(open);
        assert!(tokio::time::timeout(pending, &mut gone).await.is_err());
        drop(socket);
        tokio::time::timeout(Duration::from_secs(5), gone)
            .await
            .expect("gone once its port refuses");
    }
}

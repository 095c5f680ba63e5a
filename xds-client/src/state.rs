//! Per-type state shared by the stream task, the [`Subscriptions`] handle
//! and the [`StatusHandle`]: what the handler wants, what the server was
//! told on the current stream, and what was last accepted.
//!
//! One `std::sync::Mutex` guards it. It is never held across an `.await` or
//! a handler call, so the handler may change subscriptions re-entrantly.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use tokio::sync::Notify;

/// What the handler wants of a type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Interest {
    /// Every resource of the type.
    Wildcard,
    /// These names only.
    Names(BTreeSet<String>),
}

impl Interest {
    fn from_names(names: Vec<String>) -> Interest {
        if names.is_empty() {
            Interest::Wildcard
        } else {
            Interest::Names(names.into_iter().collect())
        }
    }
}

/// What the current stream has told the server about one type.
#[derive(Debug, Default)]
pub(crate) struct StreamType {
    /// A request for this type went out on this stream, so the next one
    /// needs no node and no initial versions.
    pub(crate) started: bool,
    /// The interest the server knows of; `None` before the first request
    /// and after an unsubscribe.
    pub(crate) sent: Option<Interest>,
    /// Names were sent for this type on this stream: from then on an empty
    /// name list means "none", so a wildcard must be spelled `*`.
    pub(crate) named_sent: bool,
    /// Nonce of the last response of this type on this stream.
    pub(crate) nonce: String,
}

/// Everything the client keeps about one type URL.
#[derive(Debug)]
pub(crate) struct TypeState {
    /// What the handler wants; `None` once removed.
    pub(crate) interest: Option<Interest>,
    /// Last accepted `version_info` (SotW) or `system_version_info` (delta).
    pub(crate) version: String,
    /// Delta: name → version of every accepted resource held, for
    /// `initial_resource_versions` after a reconnect.
    pub(crate) resources: BTreeMap<String, String>,
    pub(crate) last_update: Option<SystemTime>,
    pub(crate) last_nack: Option<String>,
    /// Last nonce received, kept across streams for the status page.
    pub(crate) last_nonce: String,
    pub(crate) stream: StreamType,
}

impl TypeState {
    fn new(interest: Interest) -> TypeState {
        TypeState {
            interest: Some(interest),
            version: String::new(),
            resources: BTreeMap::new(),
            last_update: None,
            last_nack: None,
            last_nonce: String::new(),
            stream: StreamType::default(),
        }
    }

    /// The server must hear about this type: never told on this stream, or
    /// told something else than what is wanted now.
    pub(crate) fn needs_request(&self) -> bool {
        self.interest != self.stream.sent
    }
}

/// All types, in the order they were first subscribed (so a reconnect
/// re-subscribes in the same order as the first stream did). There are a
/// handful of types, so a list beats a map.
#[derive(Debug, Default)]
pub(crate) struct State {
    types: Vec<(String, TypeState)>,
}

impl State {
    pub(crate) fn get_mut(&mut self, type_url: &str) -> Option<&mut TypeState> {
        self.types
            .iter_mut()
            .find(|(url, _)| url == type_url)
            .map(|(_, ts)| ts)
    }

    /// Each type with its state, in subscription order.
    pub(crate) fn iter_mut(&mut self) -> impl Iterator<Item = (&str, &mut TypeState)> {
        self.types.iter_mut().map(|(url, ts)| (url.as_str(), ts))
    }

    /// Forgets what an ended stream told the server.
    pub(crate) fn reset_stream(&mut self) {
        for (_, ts) in &mut self.types {
            ts.stream = StreamType::default();
        }
    }
}

/// The state and the wake-up for the stream task.
#[derive(Debug, Default)]
pub(crate) struct Shared {
    state: Mutex<State>,
    /// Signalled after each subscription change. `notify_one` keeps a permit
    /// when the stream task is busy (e.g. inside the handler that made the
    /// change), so no change is missed.
    pub(crate) changed: Notify,
}

impl Shared {
    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data that is still
        // consistent field by field; keep serving it.
        self.state
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }
}

/// A cloneable handle to change subscriptions at any time, also from inside
/// [`Handler::on_update`](crate::Handler::on_update): it only takes a short
/// lock and never waits on the stream.
#[derive(Debug, Clone)]
pub struct Subscriptions {
    pub(crate) shared: Arc<Shared>,
}

impl Subscriptions {
    /// Subscribes to `names` of `type_url`, replacing the previous names of
    /// that type. Empty `names` means wildcard: every resource of the type.
    ///
    /// Takes effect at once on an open stream, else on the next one. Names
    /// dropped from a delta subscription are forgotten by the client; the
    /// handler drops them from its own state.
    pub fn set(&self, type_url: &str, names: Vec<String>) {
        let interest = Interest::from_names(names);
        let mut state = self.shared.lock();
        let changed = match state.get_mut(type_url) {
            Some(ts) => {
                let changed = ts.interest.as_ref() != Some(&interest);
                if let (Some(Interest::Names(old)), Interest::Names(new)) =
                    (&ts.interest, &interest)
                {
                    // Delta servers send nothing for names no longer
                    // subscribed; claiming them after a reconnect would be
                    // wrong.
                    let dropped: Vec<String> = old.difference(new).cloned().collect();
                    for name in dropped {
                        ts.resources.remove(&name);
                    }
                }
                ts.interest = Some(interest);
                changed
            }
            None => {
                state
                    .types
                    .push((type_url.to_owned(), TypeState::new(interest)));
                true
            }
        };
        drop(state);
        if changed {
            self.shared.changed.notify_one();
        }
    }

    /// Stops watching `type_url`: the server is told to send nothing more of
    /// it, and a reconnect no longer subscribes to it. The accepted version
    /// and resources are forgotten, so a later [`set`](Self::set) starts
    /// afresh. Does nothing for a type never set.
    pub fn remove(&self, type_url: &str) {
        let mut state = self.shared.lock();
        let Some(ts) = state.get_mut(type_url) else {
            return;
        };
        if ts.interest.is_none() {
            return;
        }
        ts.interest = None;
        ts.version.clear();
        ts.resources.clear();
        drop(state);
        self.shared.changed.notify_one();
    }
}

/// The client's view of one type, for `/config_dump`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TypeStatus {
    /// The type URL.
    pub type_url: String,
    /// Last accepted version (`system_version_info` in delta); empty before
    /// the first accepted update.
    pub version: String,
    /// When the last update was accepted.
    pub last_update: Option<SystemTime>,
    /// The error of the last NACK; cleared by the next accepted update.
    pub last_nack: Option<String>,
    /// Nonce of the last response received.
    pub nonce: String,
}

/// A cloneable handle on the per-type status.
#[derive(Debug, Clone)]
pub struct StatusHandle {
    pub(crate) shared: Arc<Shared>,
}

impl StatusHandle {
    /// The status of every subscribed type, in subscription order.
    pub fn snapshot(&self) -> Vec<TypeStatus> {
        let mut state = self.shared.lock();
        state
            .iter_mut()
            .filter(|(_, ts)| ts.interest.is_some())
            .map(|(type_url, ts)| TypeStatus {
                type_url: type_url.to_owned(),
                version: ts.version.clone(),
                last_update: ts.last_update,
                last_nack: ts.last_nack.clone(),
                nonce: ts.last_nonce.clone(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handle() -> Subscriptions {
        Subscriptions {
            shared: Arc::default(),
        }
    }

    #[test]
    fn set_keeps_order_and_detects_changes() {
        let subs = handle();
        subs.set("b", vec![]);
        subs.set("a", vec!["x".into()]);
        subs.set("b", vec!["y".into()]);
        let mut state = subs.shared.lock();
        let order: Vec<_> = state.iter_mut().map(|(url, _)| url.to_owned()).collect();
        assert_eq!(order, ["b", "a"]);
        let b = state.get_mut("b").unwrap();
        assert_eq!(b.interest, Some(Interest::Names(["y".to_owned()].into())));
        assert!(b.needs_request());
    }

    #[test]
    fn narrowing_names_forgets_dropped_resources() {
        let subs = handle();
        subs.set("t", vec!["a".into(), "b".into()]);
        {
            let mut state = subs.shared.lock();
            let ts = state.get_mut("t").unwrap();
            ts.resources.insert("a".into(), "1".into());
            ts.resources.insert("b".into(), "1".into());
        }
        subs.set("t", vec!["b".into()]);
        let mut state = subs.shared.lock();
        let kept: Vec<_> = state
            .get_mut("t")
            .unwrap()
            .resources
            .keys()
            .cloned()
            .collect();
        assert_eq!(kept, ["b"]);
    }

    #[test]
    fn removed_types_leave_the_status() {
        let subs = handle();
        let status = StatusHandle {
            shared: subs.shared.clone(),
        };
        subs.set("a", vec![]);
        subs.set("b", vec![]);
        subs.remove("a");
        subs.remove("never-set");
        let types: Vec<_> = status.snapshot().into_iter().map(|s| s.type_url).collect();
        assert_eq!(types, ["b"]);
    }
}

//! The rotation loop: fetch an identity, install it, and renew it at a
//! jittered fraction of its lifetime, retrying with back-off while the
//! current certificate is still valid.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rand::Rng as _;

use crate::identity::IdentityHandle;
use crate::source::{CertSource, IssueRequest};
use crate::x509::unix_seconds;

/// Metric names of the rotation loop.
pub mod metric {
    /// Gauge: `not_after` of the installed certificate, Unix seconds.
    pub const CERT_EXPIRY_TIMESTAMP_SECONDS: &str = "postern_cert_expiry_timestamp_seconds";
    /// Counter: certificates installed (the first one included).
    pub const CERT_ROTATIONS_TOTAL: &str = "postern_cert_rotations_total";
    /// Counter: failed attempts to obtain a certificate.
    pub const CERT_ROTATION_FAILURES_TOTAL: &str = "postern_cert_rotation_failures_total";

    /// Registers descriptions with the installed recorder.
    pub fn describe() {
        metrics::describe_gauge!(
            CERT_EXPIRY_TIMESTAMP_SECONDS,
            metrics::Unit::Seconds,
            "Expiry (not_after) of the workload certificate in use, Unix time"
        );
        metrics::describe_counter!(
            CERT_ROTATIONS_TOTAL,
            "Workload certificates installed, the first one included"
        );
        metrics::describe_counter!(
            CERT_ROTATION_FAILURES_TOTAL,
            "Failed attempts to obtain a workload certificate"
        );
    }
}

/// When to renew and how to retry.
#[derive(Debug, Clone, Copy)]
pub struct RotationPolicy {
    /// Renew once this fraction of the lifetime has passed (0 < x < 1).
    pub renew_at: f64,
    /// Random spread of the renewal time, as a fraction of the lifetime, so
    /// a fleet started together does not renew together.
    pub jitter: f64,
    /// First retry delay after a failure; doubles up to `max_backoff`.
    pub min_backoff: Duration,
    /// Longest retry delay.
    pub max_backoff: Duration,
}

impl Default for RotationPolicy {
    fn default() -> Self {
        RotationPolicy {
            renew_at: 0.5,
            jitter: 0.05,
            min_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(30),
        }
    }
}

impl RotationPolicy {
    /// When a certificate valid from `not_before` to `not_after`, received at
    /// `received`, should be renewed. CAs backdate `not_before` for clock skew
    /// (Istio's by minutes), which on a short-lived certificate would put the
    /// renewal in the past; so the fraction counts from when it arrived.
    pub fn renewal_time(
        &self,
        not_before: SystemTime,
        not_after: SystemTime,
        received: SystemTime,
    ) -> SystemTime {
        let start = not_before.max(received);
        let lifetime = not_after.duration_since(start).unwrap_or_default();
        let spread = if self.jitter > 0.0 {
            rand::rng().random_range(-self.jitter..=self.jitter)
        } else {
            0.0
        };
        let fraction = (self.renew_at + spread).clamp(0.05, 0.95);
        start + lifetime.mul_f64(fraction)
    }
}

/// Keeps `handle` filled with a valid identity from `source`.
#[derive(Debug)]
pub struct Rotator {
    /// Where certificates come from.
    pub source: Arc<dyn CertSource>,
    /// What to ask for.
    pub request: IssueRequest,
    /// When to renew.
    pub policy: RotationPolicy,
    /// Where the identity goes.
    pub handle: Arc<IdentityHandle>,
}

impl Rotator {
    /// Runs until the task is dropped.
    pub async fn run(self) {
        let source_name = self.source.name();
        let rotations = metrics::counter!(metric::CERT_ROTATIONS_TOTAL, "source" => source_name);
        let failures =
            metrics::counter!(metric::CERT_ROTATION_FAILURES_TOTAL, "source" => source_name);
        let expiry =
            metrics::gauge!(metric::CERT_EXPIRY_TIMESTAMP_SECONDS, "source" => source_name);
        let mut backoff = self.policy.min_backoff;
        loop {
            let wait = match self.source.fetch(&self.request).await {
                Ok(identity) => match identity.expect(&self.request.id) {
                    Ok(identity) => {
                        let current = self.handle.current();
                        // A new root in the bundle (the first step of a CA
                        // rotation) must go in as surely as a new leaf.
                        let renewed = current.as_ref().is_none_or(|c| {
                            c.info.serial != identity.info.serial
                                || c.bundle.roots() != identity.bundle.roots()
                        });
                        if renewed {
                            tracing::info!(
                                id = %identity.id,
                                serial = %identity.info.serial,
                                not_after = unix_seconds(identity.info.not_after),
                                source = source_name,
                                "workload certificate installed"
                            );
                            expiry.set(unix_seconds(identity.info.not_after) as f64);
                            rotations.increment(1);
                            self.handle.install(identity);
                            backoff = self.policy.min_backoff;
                        }
                        // The schedule follows the certificate in use, from
                        // when it was installed, so an unchanged fetch does
                        // not push the renewal ever later.
                        let installed = self.handle.current();
                        let due = installed.as_ref().map(|c| {
                            self.policy.renewal_time(
                                c.info.not_before,
                                c.info.not_after,
                                c.loaded_at,
                            )
                        });
                        match due.and_then(|due| due.duration_since(SystemTime::now()).ok()) {
                            Some(until_due) => until_due,
                            // Past the renewal time and the source had nothing
                            // newer (files not replaced yet): poll with back-off.
                            None => next_backoff(&mut backoff, self.policy.max_backoff),
                        }
                    }
                    Err(err) => {
                        failures.increment(1);
                        self.log_failure(&err);
                        next_backoff(&mut backoff, self.policy.max_backoff)
                    }
                },
                Err(err) => {
                    failures.increment(1);
                    self.log_failure(&err);
                    next_backoff(&mut backoff, self.policy.max_backoff)
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.source.changed() => {}
            }
        }
    }

    fn log_failure(&self, err: &dyn std::error::Error) {
        let remaining = self
            .handle
            .current()
            .and_then(|c| c.info.not_after.duration_since(SystemTime::now()).ok());
        match remaining {
            Some(left) => tracing::warn!(
                id = %self.request.id,
                source = self.source.name(),
                error = %err,
                valid_for = ?left,
                "certificate renewal failed; current certificate still valid, retrying"
            ),
            None => tracing::error!(
                id = %self.request.id,
                source = self.source.name(),
                error = %err,
                "cannot obtain a valid workload certificate; retrying"
            ),
        }
    }
}

/// The current back-off, jittered, and doubles the next.
fn next_backoff(backoff: &mut Duration, max: Duration) -> Duration {
    let current = *backoff;
    *backoff = (current * 2).min(max);
    current.mul_f64(rand::rng().random_range(0.8..=1.2))
}

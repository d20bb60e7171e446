//! A small circuit breaker per wrapping backend of a key: recent failures and latency decide in
//! which order decrypt tries a key's wrapped copies, so a backend that is down, throttled or
//! hung is tried last (and costs no wait while a healthy copy exists) until it answers again.
//!
//! It only orders; it never refuses: a backend whose breaker is open is still tried when every
//! healthier copy failed (it may be the only copy that works). Must never: count a failure a
//! caller can provoke at will (a tampered wrapped key, `InvalidCiphertext`), or hold key
//! material.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::backend_kind::BackendErrorKind;
use crate::facts::BackendCall;

/// How long a failure keeps a backend at the back of the order. After it the backend takes its
/// configured place again (half open): its next call either closes the breaker or re-opens it.
pub const OPEN_FOR: Duration = Duration::from_secs(30);
/// A backend whose recent calls took longer than this on average is tried after the fast ones.
pub const SLOW: Duration = Duration::from_millis(500);

/// Where a backend stands, best first (the order decrypt tries copies in).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Health {
    Healthy,
    Slow,
    /// Failed within [`OPEN_FOR`] and not answered since.
    Failing,
}

impl Health {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Healthy => "healthy",
            Self::Slow => "slow",
            Self::Failing => "failing",
        }
    }
}

#[derive(Debug, Default)]
struct State {
    consecutive_failures: u32,
    last_failure: Option<Instant>,
    /// Exponentially weighted mean latency of successful calls, in microseconds.
    latency_us: Option<f64>,
}

/// One backend's recent record, shared by every request of the key.
#[derive(Debug, Default)]
pub struct Breaker {
    state: Mutex<State>,
}

/// Whether a failure says something about the backend rather than about the request.
fn counts_against_backend(kind: BackendErrorKind) -> bool {
    !matches!(
        kind,
        BackendErrorKind::InvalidCiphertext | BackendErrorKind::InvalidArgument
    )
}

impl Breaker {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        match self.state.lock() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Takes one finished call into account.
    pub fn record(&self, call: &BackendCall) {
        let mut s = self.state();
        match call.outcome {
            Ok(()) => {
                s.consecutive_failures = 0;
                s.last_failure = None;
                let us = call.latency.as_secs_f64() * 1e6;
                s.latency_us = Some(match s.latency_us {
                    Some(mean) => mean * 0.8 + us * 0.2,
                    None => us,
                });
            }
            Err(kind) if counts_against_backend(kind) => {
                s.consecutive_failures = s.consecutive_failures.saturating_add(1);
                s.last_failure = Some(Instant::now());
            }
            Err(_) => {}
        }
    }

    /// The backend's standing now.
    pub fn health(&self) -> Health {
        self.health_at(Instant::now())
    }

    fn health_at(&self, now: Instant) -> Health {
        let s = self.state();
        if s.consecutive_failures > 0
            && s.last_failure
                .is_some_and(|t| now.saturating_duration_since(t) < OPEN_FOR)
        {
            return Health::Failing;
        }
        match s.latency_us {
            Some(us) if us > SLOW.as_secs_f64() * 1e6 => Health::Slow,
            _ => Health::Healthy,
        }
    }
}

/// The order to try backends in: by health, and in configured order among equals.
pub fn order(breakers: &[&Breaker]) -> Vec<usize> {
    let now = Instant::now();
    let mut idx: Vec<(Health, usize)> = breakers
        .iter()
        .enumerate()
        .map(|(i, b)| (b.health_at(now), i))
        .collect();
    idx.sort();
    idx.into_iter().map(|(_, i)| i).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend_kind::BackendKind;
    use crate::facts::BackendOp;

    fn call(outcome: Result<(), BackendErrorKind>, ms: u64) -> BackendCall {
        BackendCall {
            backend: BackendKind::Local,
            wrap: 0,
            op: BackendOp::Unwrap,
            outcome,
            latency: Duration::from_millis(ms),
        }
    }

    #[test]
    fn failures_send_a_backend_to_the_back_until_it_answers() {
        let (a, b, c) = (Breaker::default(), Breaker::default(), Breaker::default());
        assert_eq!(order(&[&a, &b, &c]), [0, 1, 2]);
        a.record(&call(Err(BackendErrorKind::Unavailable), 5));
        assert_eq!(a.health(), Health::Failing);
        assert_eq!(order(&[&a, &b, &c]), [1, 2, 0]);
        a.record(&call(Ok(()), 5));
        assert_eq!(order(&[&a, &b, &c]), [0, 1, 2]);
        b.record(&call(Ok(()), 2_000));
        assert_eq!(b.health(), Health::Slow);
        assert_eq!(order(&[&a, &b, &c]), [0, 2, 1]);
    }

    #[test]
    fn a_tampered_copy_does_not_count_against_the_backend() {
        let a = Breaker::default();
        a.record(&call(Err(BackendErrorKind::InvalidCiphertext), 1));
        assert_eq!(a.health(), Health::Healthy);
    }

    #[test]
    fn an_old_failure_expires() {
        let a = Breaker::default();
        a.record(&call(Err(BackendErrorKind::DeadlineExceeded), 1));
        assert_eq!(a.health_at(Instant::now() + OPEN_FOR), Health::Healthy);
    }
}

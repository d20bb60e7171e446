//! The one call policy of the cloud backends: a total deadline for the whole call, a limit per
//! attempt, a number of attempts, jittered exponential backoff between them, and Retry-After
//! waits when the provider asks for one. The settings have the same names in every backend's
//! section (`timeout`, `attempt_timeout`, `max_attempts`; docs/config.md).
//!
//! GCP and Azure run their attempts through [`CallPolicy::run`]; AWS hands `attempt_timeout`
//! and `max_attempts` to the SDK's own retry loop (its throttling and clock-skew handling are
//! the SDK's) and puts the whole call under the same total deadline with
//! [`CallPolicy::bounded`].
//!
//! Must never: wait past the total deadline (a wait that would outlast it ends the call at once
//! with the last failure), retry what the provider answered for good, or log a response body.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

use crate::secret::random_fill;
use crate::settings::{Problems, Section};

/// Shortest and longest accepted `timeout`, `attempt_timeout` (and `connect_timeout`).
pub const MIN_TIME: Duration = Duration::from_millis(10);
pub const MAX_TIME: Duration = Duration::from_secs(600);
/// Most accepted `max_attempts` (the first attempt included).
pub const MAX_ATTEMPTS: u32 = 20;
/// First backoff; doubles per retry up to [`BACKOFF_MAX`], plus up to 50% random jitter.
pub const BACKOFF_BASE: Duration = Duration::from_millis(100);
pub const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// Deadlines and retries of one backend's calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CallPolicy {
    /// The whole call: every attempt, backoff and Retry-After wait. Past it the call fails
    /// with `DeadlineExceeded`.
    pub timeout: Duration,
    /// One attempt (a timed-out attempt is retried while attempts and time remain).
    pub attempt_timeout: Duration,
    /// Attempts, the first one included (1: no retries).
    pub max_attempts: u32,
}

/// What a setting left unset follows, per backend (so each keeps the behaviour it had before
/// the names were shared; docs/config.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unset {
    /// The backend's defaults as given.
    Defaults,
    /// Without `timeout`, the whole call may take as long as all its attempts
    /// ([`CallPolicy::all_attempts`]).
    TimeoutCoversAttempts,
    /// Without `attempt_timeout`, one attempt may take the whole `timeout`.
    AttemptTakesTimeout,
}

/// Names a section used before the names were shared: still read, with a notice.
#[derive(Debug, Clone, Copy, Default)]
pub struct OldNames {
    /// `deadline`, and which setting it meant in this section.
    pub deadline: Option<&'static str>,
    /// `retries`: retries after the first attempt (`max_attempts - 1`).
    pub retries: bool,
}

/// How one attempt's failure is handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// Final: answer with it.
    No,
    /// Transient: retry after the jittered backoff, while attempts and time remain.
    Backoff,
    /// Transient, and the provider said when (Retry-After): retry after exactly this wait.
    After(Duration),
    /// An integrity failure (a checksum that did not match): retried once at once, on a budget
    /// of its own that does not count against `max_attempts`.
    Once,
}

/// Why a call run by [`CallPolicy::run`] failed.
#[derive(Debug)]
pub enum CallError<E> {
    /// The last attempt's own failure (final, or no attempts or time left to retry it).
    Failed(E),
    /// The last attempt ran out of time (its own limit or the total deadline).
    TimedOut(Duration),
}

impl CallPolicy {
    /// The longest a call of `max_attempts` attempts of `attempt_timeout` each can take,
    /// backoffs included.
    pub fn all_attempts(attempt_timeout: Duration, max_attempts: u32) -> Duration {
        let waits = max_attempts.saturating_sub(1);
        attempt_timeout.saturating_mul(max_attempts.max(1)) + (BACKOFF_MAX * 3 / 2) * waits
    }

    /// Reads `timeout`, `attempt_timeout` and `max_attempts` (and the section's old names)
    /// from a backend's section, over `defaults`.
    pub fn parse(
        s: &Section<'_>,
        defaults: CallPolicy,
        unset: Unset,
        old: OldNames,
        p: &mut Problems,
    ) -> Self {
        let mut c = defaults;
        let mut timeout_set = false;
        let mut attempt_set = false;
        if let Some(d) = s.duration_in("timeout", MIN_TIME, MAX_TIME, p) {
            c.timeout = d;
            timeout_set = true;
        }
        if let Some(d) = s.duration_in("attempt_timeout", MIN_TIME, MAX_TIME, p) {
            c.attempt_timeout = d;
            attempt_set = true;
        }
        if let Some(n) = s.count_in("max_attempts", 1, MAX_ATTEMPTS as u64, p) {
            c.max_attempts = n as u32;
        }
        if let Some(new) = old.deadline
            && let Some(d) = s.duration_in("deadline", MIN_TIME, MAX_TIME, p)
        {
            if s.has(new) {
                p.push(
                    s.at("deadline"),
                    format!("is the old name of {new}: set only {new}"),
                );
            } else {
                p.notice(
                    s.at("deadline"),
                    format!("is deprecated: it is now `{new}`"),
                );
                if new == "timeout" {
                    c.timeout = d;
                    timeout_set = true;
                } else {
                    c.attempt_timeout = d;
                    attempt_set = true;
                }
            }
        }
        if old.retries
            && let Some(n) = s.count_in("retries", 0, MAX_ATTEMPTS as u64 - 1, p)
        {
            if s.has("max_attempts") {
                p.push(
                    s.at("retries"),
                    "is the old form of max_attempts: set only max_attempts",
                );
            } else {
                p.notice(
                    s.at("retries"),
                    format!("is deprecated: it is now `max_attempts = {}`", n + 1),
                );
                c.max_attempts = n as u32 + 1;
            }
        }
        match unset {
            Unset::TimeoutCoversAttempts if !timeout_set => {
                c.timeout = Self::all_attempts(c.attempt_timeout, c.max_attempts);
            }
            Unset::AttemptTakesTimeout if !attempt_set => c.attempt_timeout = c.timeout,
            _ => {}
        }
        c
    }

    /// Runs `attempt` under this policy. Each attempt gets its time limit (the attempt timeout,
    /// or what is left of the total deadline if that is less); `retry` decides what each
    /// failure means. `what` names the call in the log.
    pub async fn run<T, E, F, Fut>(
        &self,
        what: &str,
        mut attempt: F,
        mut retry: impl FnMut(&E) -> Retry,
    ) -> Result<T, CallError<E>>
    where
        E: std::fmt::Display,
        F: FnMut(Duration) -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let deadline = Instant::now() + self.timeout;
        let mut attempts = 0u32;
        let mut integrity_retried = false;
        loop {
            attempts += 1;
            let left = deadline.saturating_duration_since(Instant::now());
            let limit = self.attempt_timeout.min(left);
            let (next, failure) = match tokio::time::timeout(limit, attempt(limit)).await {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(e)) => (retry(&e), CallError::Failed(e)),
                // The attempt's own limit: transient. The total deadline: final.
                Err(_) if limit < self.attempt_timeout => return Err(CallError::TimedOut(limit)),
                Err(_) => (Retry::Backoff, CallError::TimedOut(limit)),
            };
            let wait = match next {
                Retry::No => return Err(failure),
                Retry::Once if integrity_retried => return Err(failure),
                Retry::Once => {
                    integrity_retried = true;
                    // Not an attempt of the transient budget.
                    attempts -= 1;
                    Duration::ZERO
                }
                Retry::Backoff | Retry::After(_) if attempts >= self.max_attempts => {
                    return Err(failure);
                }
                Retry::Backoff => backoff(attempts),
                Retry::After(d) => d,
            };
            if Instant::now() + wait >= deadline {
                // Waiting would outlast the deadline: answer now with what the provider said.
                return Err(failure);
            }
            match &failure {
                CallError::Failed(e) => {
                    tracing::warn!(call = what, attempt = attempts, wait = ?wait, error = %e, "backend call failed; retrying")
                }
                CallError::TimedOut(d) => {
                    tracing::warn!(call = what, attempt = attempts, wait = ?wait, limit = ?d, "backend call timed out; retrying")
                }
            }
            tokio::time::sleep(wait).await;
        }
    }

    /// `call` (which retries on its own, like the AWS SDK) under the total deadline: `None`
    /// when the deadline passed first.
    pub async fn bounded<T>(&self, call: impl Future<Output = T>) -> Option<T> {
        tokio::time::timeout(self.timeout, call).await.ok()
    }
}

/// The wait before retry number `attempt` (1 after the first attempt): 100 ms, 200 ms, 400 ms
/// ... capped at 2 s, plus up to 50% random jitter (so clients that failed together do not
/// retry together).
pub fn backoff(attempt: u32) -> Duration {
    let base = BACKOFF_BASE
        .saturating_mul(1 << attempt.saturating_sub(1).min(8))
        .min(BACKOFF_MAX);
    let mut b = [0u8; 1];
    let jitter = if random_fill(&mut b).is_ok() {
        b[0] as u32
    } else {
        0
    };
    base + base.mul_f64(jitter as f64 / 512.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn policy(timeout_ms: u64, attempt_ms: u64, max_attempts: u32) -> CallPolicy {
        CallPolicy {
            timeout: Duration::from_millis(timeout_ms),
            attempt_timeout: Duration::from_millis(attempt_ms),
            max_attempts,
        }
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        assert!(backoff(1) >= BACKOFF_BASE && backoff(1) <= BACKOFF_BASE * 3 / 2);
        assert!(backoff(3) >= BACKOFF_BASE * 4);
        assert!(backoff(30) <= BACKOFF_MAX * 3 / 2);
    }

    #[tokio::test]
    async fn transient_failures_are_retried_up_to_max_attempts() {
        let tries = AtomicU32::new(0);
        let r: Result<(), _> = policy(60_000, 1_000, 3)
            .run(
                "t",
                |_| async {
                    tries.fetch_add(1, Ordering::SeqCst);
                    Err::<(), _>("busy")
                },
                |_| Retry::Backoff,
            )
            .await;
        assert!(matches!(r, Err(CallError::Failed("busy"))));
        assert_eq!(tries.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn final_answers_are_not_retried_and_integrity_gets_one_extra_try() {
        let tries = AtomicU32::new(0);
        let r: Result<(), _> = policy(60_000, 1_000, 1)
            .run(
                "t",
                |_| async {
                    tries.fetch_add(1, Ordering::SeqCst);
                    Err::<(), _>("crc")
                },
                |_| Retry::Once,
            )
            .await;
        assert!(matches!(r, Err(CallError::Failed("crc"))));
        assert_eq!(
            tries.load(Ordering::SeqCst),
            2,
            "one try, one integrity retry"
        );
        tries.store(0, Ordering::SeqCst);
        let r: Result<(), _> = policy(60_000, 1_000, 5)
            .run(
                "t",
                |_| async {
                    tries.fetch_add(1, Ordering::SeqCst);
                    Err::<(), _>("denied")
                },
                |_| Retry::No,
            )
            .await;
        assert!(r.is_err());
        assert_eq!(tries.load(Ordering::SeqCst), 1);
    }

    /// Each attempt gets its own limit and hung attempts are retried; the total deadline ends
    /// the call, and a Retry-After that would outlast it is not waited for.
    #[tokio::test]
    async fn attempt_limits_and_the_total_deadline() {
        let tries = AtomicU32::new(0);
        let r: Result<(), CallError<&str>> = policy(10_000, 100, 3)
            .run(
                "t",
                |limit| {
                    tries.fetch_add(1, Ordering::SeqCst);
                    assert_eq!(limit, Duration::from_millis(100));
                    std::future::pending()
                },
                |_| Retry::Backoff,
            )
            .await;
        assert!(matches!(r, Err(CallError::TimedOut(_))));
        assert_eq!(tries.load(Ordering::SeqCst), 3);

        let r: Result<(), CallError<&str>> = policy(250, 1_000, 10)
            .run("t", |_| std::future::pending(), |_| Retry::Backoff)
            .await;
        assert!(matches!(r, Err(CallError::TimedOut(d)) if d <= Duration::from_millis(250)));

        // Retry-After waits of 300 ms within 800 ms: tries at 0, 300 and 600 ms; the wait after
        // the third would end past the deadline.
        tries.store(0, Ordering::SeqCst);
        let r: Result<(), _> = policy(800, 800, 20)
            .run(
                "t",
                |_| async {
                    tries.fetch_add(1, Ordering::SeqCst);
                    Err::<(), _>("429")
                },
                |_| Retry::After(Duration::from_millis(300)),
            )
            .await;
        assert!(matches!(r, Err(CallError::Failed("429"))));
        assert_eq!(tries.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn settings_share_names_ranges_and_old_names() {
        let parse = |text: &str, unset: Unset, old: OldNames| {
            let table: toml::Table = text.parse().unwrap();
            let s = Section::new(Some(&table), "x");
            let mut p = Problems::default();
            let c = CallPolicy::parse(&s, policy(5_000, 2_000, 3), unset, old, &mut p);
            s.finish(&mut p);
            let show = |v: &[crate::settings::Problem]| {
                v.iter().map(ToString::to_string).collect::<Vec<_>>()
            };
            (c, show(&p.errors), show(&p.notices))
        };
        let (c, e, _) = parse(
            "timeout = \"1m\"\nattempt_timeout = \"3s\"\nmax_attempts = 4",
            Unset::Defaults,
            OldNames::default(),
        );
        assert!(e.is_empty(), "{e:?}");
        assert_eq!(c, policy(60_000, 3_000, 4));
        let (_, e, _) = parse(
            "timeout = \"5ms\"\nattempt_timeout = \"11m\"\nmax_attempts = 0",
            Unset::Defaults,
            OldNames::default(),
        );
        assert_eq!(
            e,
            [
                "x.timeout: must be 10ms to 10m",
                "x.attempt_timeout: must be 10ms to 10m",
                "x.max_attempts: must be 1 to 20"
            ]
        );
        // Without old names, the old fields are unknown.
        let (_, e, _) = parse("deadline = \"1s\"", Unset::Defaults, OldNames::default());
        assert_eq!(e, ["x.deadline: unknown field"]);
        let gcp = OldNames {
            deadline: Some("attempt_timeout"),
            retries: true,
        };
        let (c, e, n) = parse(
            "deadline = \"4s\"\nretries = 0",
            Unset::TimeoutCoversAttempts,
            gcp,
        );
        assert!(e.is_empty(), "{e:?}");
        assert_eq!(n.len(), 2, "{n:?}");
        assert_eq!(
            (c.attempt_timeout, c.max_attempts),
            (Duration::from_secs(4), 1)
        );
        assert_eq!(c.timeout, Duration::from_secs(4), "covers the one attempt");
        let (_, e, _) = parse(
            "deadline = \"4s\"\nattempt_timeout = \"4s\"",
            Unset::Defaults,
            gcp,
        );
        assert_eq!(
            e,
            ["x.deadline: is the old name of attempt_timeout: set only attempt_timeout"]
        );
        let azure = OldNames {
            deadline: Some("timeout"),
            retries: true,
        };
        let (c, _, _) = parse("deadline = \"30s\"", Unset::AttemptTakesTimeout, azure);
        assert_eq!(
            (c.timeout, c.attempt_timeout),
            (Duration::from_secs(30), Duration::from_secs(30))
        );
    }
}

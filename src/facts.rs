//! What one request touched and how it ended: filled in by the layers it passes through (the
//! broker, from what the cache and the backends report), and read by the audit log and the
//! metrics, which never look inside the layers that produced them.
//!
//! Every part names itself: a label function per value, never a position in some other
//! module's array. Nothing here holds key material, plaintext or tokens.
//!
//! Also what a lifecycle change did ([`LifecycleRecord`]: a rotation, a deletion, a
//! retirement), made by the keyring scheduler or a `keys` command and written by the audit log.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use crate::backend_kind::{BackendErrorKind, BackendKind};

/// What a request touched, filled in as the operation proceeds (also on failure).
#[derive(Debug, Default, Clone)]
pub struct Facts {
    pub key: Option<Arc<str>>,
    pub backend: Option<BackendKind>,
    pub backend_key_id: Option<Arc<str>>,
    pub key_version: Option<String>,
    pub cache: Option<CacheResult>,
    /// Payload bytes (plaintext in or out).
    pub bytes: u64,
    /// For ReEncrypt: the source side.
    pub source_key: Option<Arc<str>>,
    pub source_key_version: Option<String>,
    /// Backend calls this request made (not those it waited for).
    pub backend_calls: Vec<BackendCall>,
    /// How many wrapping backends the request's key has (0 until the key is known).
    pub wraps: u8,
    /// Decrypt and ReEncrypt: the wrapped copy whose data key opened the envelope (`index` is
    /// its place among the envelope's copies), from the cache or a backend.
    pub served_by: Option<CopyRef>,
    /// A data key made for this request under `require = "first"` that lacks the copies of
    /// these wrapping backends (`index`: the place in the key's `wrap` list), which failed.
    pub missing_copies: Vec<CopyRef>,
    /// An item of an EncryptBatch or DecryptBatch: its place and the batch's item count.
    pub batch: Option<BatchItem>,
    /// EncryptStream and DecryptStream: the segments sealed or opened.
    pub segments: Option<u64>,
}

/// Where a batch item sits in its batch (audit records: `"batch":{"item":i,"items":n}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchItem {
    pub index: u32,
    pub items: u32,
}

/// One wrapped copy of a data key, or one of a key's wrapping backends: a position (bounded by
/// the envelope's eight copies) and the backend kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CopyRef {
    pub index: u8,
    pub backend: BackendKind,
}

impl CopyRef {
    /// The position as a metric label (`0`..`7`; `8+` never happens: the envelope holds 8).
    pub fn index_label(self) -> &'static str {
        const LABELS: [&str; 9] = ["0", "1", "2", "3", "4", "5", "6", "7", "8+"];
        LABELS[usize::from(self.index).min(8)]
    }
}

/// How a request's data key was obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CacheResult {
    /// From the cache (including requests that waited for another request's backend call).
    Hit,
    /// This request made the backend call.
    Miss,
    /// Caching is off for the key (or the message outgrew it): the request made its own call.
    Bypass,
}

impl CacheResult {
    pub const ALL: [CacheResult; 3] = [Self::Hit, Self::Miss, Self::Bypass];

    /// The label in audit records and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Hit => "hit",
            Self::Miss => "miss",
            Self::Bypass => "bypass",
        }
    }
}

/// One call to a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackendCall {
    /// Which backend was called, and its place in the key's `wrap` list (0: the first).
    pub backend: BackendKind,
    pub wrap: u8,
    pub op: BackendOp,
    /// `Err` carries the kind of failure the backend reported.
    pub outcome: Result<(), BackendErrorKind>,
    pub latency: Duration,
}

impl BackendCall {
    /// The outcome's label: `ok`, or the failure kind's (docs/metrics.md).
    pub fn outcome_label(&self) -> &'static str {
        match self.outcome {
            Ok(()) => "ok",
            Err(kind) => kind.label(),
        }
    }
}

/// What a backend was asked to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum BackendOp {
    GenerateDataKey,
    Wrap,
    Unwrap,
    Rewrap,
}

impl BackendOp {
    pub const ALL: [BackendOp; 4] = [
        Self::GenerateDataKey,
        Self::Wrap,
        Self::Unwrap,
        Self::Rewrap,
    ];

    /// The metric label (docs/metrics.md).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::GenerateDataKey => "generate_data_key",
            Self::Wrap => "wrap",
            Self::Unwrap => "unwrap",
            Self::Rewrap => "rewrap",
        }
    }
}

/// How a request ended, as its caller was told: the gRPC code's name and the stable reason.
/// Filled by the front door that answered (the one error → status mapping lives there).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Outcome {
    /// The code as the gRPC specification spells it (`OK`, `PERMISSION_DENIED`, ...).
    pub code: &'static str,
    /// The ErrorInfo reason; `None` exactly when the request succeeded.
    pub reason: Option<&'static str>,
}

impl Outcome {
    pub fn is_ok(&self) -> bool {
        self.reason.is_none()
    }
}

/// The id tying a request's log lines and audit record together. Generated ids are a
/// per-process random prefix and a counter, formatted only when written out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestId {
    Generated {
        prefix: u32,
        n: u64,
    },
    /// A sane `x-request-id` from the client.
    Client(Arc<str>),
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Generated { prefix, n } => write!(f, "{prefix:08x}-{n:012x}"),
            Self::Client(s) => f.write_str(s),
        }
    }
}

/// Hands out request ids.
#[derive(Debug)]
pub struct RequestIds {
    prefix: u32,
    next: AtomicU64,
}

impl Default for RequestIds {
    fn default() -> Self {
        Self::new()
    }
}

impl RequestIds {
    pub fn new() -> Self {
        let mut b = [0u8; 4];
        let _ = crate::secret::random_fill(&mut b);
        Self {
            prefix: u32::from_be_bytes(b),
            next: AtomicU64::new(1),
        }
    }

    pub fn next(&self) -> RequestId {
        RequestId::Generated {
            prefix: self.prefix,
            n: self.next.fetch_add(1, Ordering::Relaxed),
        }
    }
}

/// What happened to the key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LifecycleEvent {
    /// A new primary version was added.
    Rotated,
    DeletionScheduled,
    DeletionCancelled,
    /// The key's material was destroyed (its deletion window had ended).
    Purged,
    /// `min_decrypt_version` changed (versions retired, or restored).
    MinDecryptVersionSet,
}

impl LifecycleEvent {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Rotated => "rotated",
            Self::DeletionScheduled => "deletion_scheduled",
            Self::DeletionCancelled => "deletion_cancelled",
            Self::Purged => "purged",
            Self::MinDecryptVersionSet => "min_decrypt_version_set",
        }
    }
}

/// Who made the change. `user` comes from the environment (`$USER`) and is a hint only; `uid`
/// is the process's real uid, which the operating system vouches for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Actor {
    /// `"scheduler"` (a running server's rotation schedule) or `"cli"` (`keybroker keys …`).
    pub kind: &'static str,
    pub uid: u32,
    pub user: Option<String>,
    pub pid: u32,
}

impl Actor {
    fn current(kind: &'static str) -> Self {
        Self {
            kind,
            uid: rustix::process::getuid().as_raw(),
            user: std::env::var("USER")
                .or_else(|_| std::env::var("LOGNAME"))
                .ok()
                .filter(|u| !u.is_empty() && u.len() <= 64),
            pid: std::process::id(),
        }
    }

    /// A running server's scheduler.
    pub fn scheduler() -> Self {
        Self::current("scheduler")
    }

    /// A `keybroker keys …` command.
    pub fn cli() -> Self {
        Self::current("cli")
    }
}

/// One lifecycle change of one keyring key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LifecycleRecord {
    pub time: SystemTime,
    pub event: LifecycleEvent,
    /// The key's name in its keyring (what `keys …` commands name).
    pub key: String,
    /// The keyring file.
    pub keyring: String,
    /// What asked for it: `"schedule"` (rotation period passed, deletion window ended),
    /// `"if_due"` (`keys rotate --if-due`), `"command"` (an explicit `keys …` command).
    pub trigger: &'static str,
    pub old_primary_version: Option<u32>,
    pub new_primary_version: Option<u32>,
    pub deletion_time: Option<SystemTime>,
    pub old_min_decrypt_version: Option<u32>,
    pub new_min_decrypt_version: Option<u32>,
    /// `keys schedule-deletion --force` was given (the deletion guard may have been overridden).
    pub forced: bool,
    pub actor: Actor,
}

impl LifecycleRecord {
    /// A record of `event` on `key` now, by `actor`, with nothing else set.
    pub fn new(
        event: LifecycleEvent,
        key: &str,
        keyring: &std::path::Path,
        trigger: &'static str,
        actor: Actor,
    ) -> Self {
        Self {
            time: SystemTime::now(),
            event,
            key: key.to_owned(),
            // Absolute where it can be: an auditor reads this far from the command's directory.
            keyring: std::fs::canonicalize(keyring)
                .unwrap_or_else(|_| keyring.to_owned())
                .display()
                .to_string(),
            trigger,
            old_primary_version: None,
            new_primary_version: None,
            deletion_time: None,
            old_min_decrypt_version: None,
            new_min_decrypt_version: None,
            forced: false,
            actor,
        }
    }
}

//! The audit log: one JSON Lines record per key use (cache hits, denials and failures included),
//! and one per lifecycle change of a local key (`lifecycle`: rotations, deletions, retirement),
//! hash-chained so that an edited, deleted, reordered or inserted record is detectable
//! (`keybroker audit verify`). docs/audit.md describes the record and the chain.
//!
//! Records are written off the request path: a request reserves a slot in a bounded queue
//! *before* it touches a key, and fills it when done; a writer task serializes, chains and
//! writes them. By default there is no key use without its record: when no slot frees up within
//! a short bound, or the writer cannot write, the request fails with UNAVAILABLE
//! (AUDIT_UNAVAILABLE) instead of going unaudited. Best-effort mode drops and counts instead.
//!
//! Never in a record: plaintext, key material, tokens. Context values only when configured
//! (by default a digest of the canonical context).
//!
//! With `[audit] key_file` (a secret kept apart from the log) the log is keyed: every record
//! ends with `"mac"`, an HMAC-SHA256 over the record's own bytes (which include `prev`, the
//! previous record's MAC), so nobody without the key can edit, insert or rewrite records
//! consistently, and `context_digest` is an HMAC too (low-entropy context values cannot be
//! guessed back from it). With `[audit] checkpoint_file` the writer also keeps a small file,
//! elsewhere, naming the latest seq and link; `audit verify --checkpoint` then detects a log cut
//! short before that point, which the chain alone cannot.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use aws_lc_rs::digest;
use tokio::sync::mpsc;

use crate::error::Error;
use crate::facts::{Facts, Outcome, RequestId};
use crate::operation::Operation;
use crate::principal::Caller;
use crate::settings::{Problems, Section};

mod key;
mod lifecycle;
mod report;
mod verify;
mod writer;

pub use crate::facts::{Actor, LifecycleEvent, LifecycleRecord};
pub use key::{AuditKey, MAX_KEY_LEN, MIN_KEY_LEN, new_key_file};
pub use report::{LifecycleRow, UsageReport, UsageRow, usage_report};
pub use verify::{
    BrokenLink, CHECKPOINT_FORMAT, Checkpoint, VerifyOptions, VerifyReport, read_checkpoint,
    verify, verify_bytes, verify_with,
};
use writer::Writer;
pub use writer::{LifecycleLog, lock_path, rotated};

/// The `prev` of the first record of a chain.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuditSink {
    Stdout,
    File(PathBuf),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuditMode {
    /// No key use without its record (the default).
    Required,
    /// Requests proceed when the audit queue is full; dropped records are counted.
    BestEffort,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditConfig {
    pub enabled: bool,
    pub sink: AuditSink,
    /// Rotate the file when it would grow past this many bytes.
    pub max_file_bytes: u64,
    /// Rotated files kept (`audit.jsonl.1` .. `.N`).
    pub max_files: u32,
    pub queue: usize,
    /// How long a request waits for a queue slot before failing (Required mode).
    pub block_timeout: Duration,
    pub mode: AuditMode,
    pub include_context_values: bool,
    /// The audit key (keyed chain and context digests); kept apart from the log.
    pub key_file: Option<PathBuf>,
    /// Where the writer records the latest chain position (truncation detection).
    pub checkpoint_file: Option<PathBuf>,
    /// How often the checkpoint is rewritten while records are being written.
    pub checkpoint_interval: Duration,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            sink: AuditSink::Stdout,
            max_file_bytes: 100 << 20,
            max_files: 10,
            queue: 8192,
            block_timeout: Duration::from_millis(100),
            mode: AuditMode::Required,
            include_context_values: false,
            key_file: None,
            checkpoint_file: None,
            checkpoint_interval: Duration::from_secs(5),
        }
    }
}

impl AuditConfig {
    /// Reads `[audit]` (relative paths against `base`), reporting unknown fields.
    pub fn parse(s: &Section<'_>, base: &Path, p: &mut Problems) -> Self {
        let mut a = AuditConfig::default();
        if let Some(b) = s.bool("enabled", p) {
            a.enabled = b;
        }
        if let Some(path) = s.str("path", p) {
            a.sink = match path {
                "-" | "stdout" => AuditSink::Stdout,
                "" => {
                    p.push(s.at("path"), "must be a file path or \"-\" for stdout");
                    AuditSink::Stdout
                }
                other => AuditSink::File(crate::settings::resolve(base, other)),
            };
        }
        if let Some(n) = s.size("max_file_size", p) {
            if n < 4096 {
                p.push(s.at("max_file_size"), "must be at least 4KiB");
            }
            a.max_file_bytes = n;
        }
        if let Some(n) = s.u64("max_files", p) {
            if n > 1000 {
                p.push(s.at("max_files"), "must be 0 to 1000");
            }
            a.max_files = n as u32;
        }
        if let Some(n) = s.u64("queue", p) {
            if n == 0 || n > 1 << 20 {
                p.push(s.at("queue"), "must be 1 to 1048576");
            }
            a.queue = n as usize;
        }
        if let Some(d) = s.duration("block_timeout", p) {
            if d > Duration::from_secs(10) {
                p.push(s.at("block_timeout"), "must be at most 10s");
            }
            a.block_timeout = d;
        }
        if let Some(m) = s.str("mode", p) {
            a.mode = match m {
                "required" => AuditMode::Required,
                "best_effort" => AuditMode::BestEffort,
                _ => {
                    p.push(s.at("mode"), "must be \"required\" or \"best_effort\"");
                    AuditMode::Required
                }
            };
        }
        if let Some(b) = s.bool("include_context_values", p) {
            a.include_context_values = b;
        }
        a.key_file = s.path("key_file", base, p);
        a.checkpoint_file = s.path("checkpoint_file", base, p);
        if let Some(d) = s.duration("checkpoint_interval", p) {
            if d < Duration::from_millis(100) || d > Duration::from_secs(3600) {
                p.push(s.at("checkpoint_interval"), "must be 100ms to 1h");
            }
            a.checkpoint_interval = d;
        }
        if let AuditSink::File(log) = &a.sink {
            for (field, f) in [
                ("key_file", &a.key_file),
                ("checkpoint_file", &a.checkpoint_file),
            ] {
                if f.as_ref() == Some(log) {
                    p.push(s.at(field), "must not be the audit log itself");
                }
            }
        }
        s.finish(p);
        a
    }
}

/// What a request contributes to its record; the writer adds `seq`, `prev`, formats times,
/// ids and digests (off the request path).
#[derive(Debug)]
pub struct Record {
    pub time: SystemTime,
    pub request_id: RequestId,
    pub caller: Arc<str>,
    pub identified_by: &'static str,
    pub operation: Operation,
    pub facts: Facts,
    pub code: &'static str,
    pub reason: Option<&'static str>,
    pub latency_us: u64,
    pub context_digest: Option<[u8; 32]>,
    pub context: Option<BTreeMap<String, String>>,
    pub destination_context_digest: Option<[u8; 32]>,
    pub destination_context: Option<BTreeMap<String, String>>,
}

/// What goes through the writer's queue: a request's record, or a lifecycle change's.
// Not boxed: a request record is the hot path (one per key use) and must not allocate; the
// smaller lifecycle variant is rare.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub(crate) enum Entry {
    Request(Record),
    Lifecycle(LifecycleRecord),
}

/// The request-side handle.
pub struct Auditor {
    /// `None` when auditing is off or after `close`.
    tx: arc_swap::ArcSwapOption<mpsc::Sender<Entry>>,
    enabled: bool,
    healthy: Arc<AtomicBool>,
    mode: AuditMode,
    block_timeout: Duration,
    include_context_values: bool,
    dropped: AtomicU64,
    /// Requests and lifecycle changes refused `AUDIT_UNAVAILABLE` (Required mode).
    refused: AtomicU64,
    /// The most records queued at once since start: how close the writer came to refusing.
    peak: AtomicUsize,
    /// Set when the log is keyed: context digests are then HMACs.
    key: Option<Arc<AuditKey>>,
    /// The digest of the empty context (most requests carry none), computed once.
    empty_context_digest: [u8; 32],
}

impl std::fmt::Debug for Auditor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auditor")
            .field("enabled", &self.enabled)
            .field("mode", &self.mode)
            .finish()
    }
}

/// A reserved place for one record.
pub struct Slot(Option<mpsc::OwnedPermit<Entry>>);

impl Slot {
    pub fn send(self, record: Record) {
        if let Some(p) = self.0 {
            p.send(Entry::Request(record));
        }
    }

    /// Fills the slot with a lifecycle change's record.
    pub fn send_lifecycle(self, record: LifecycleRecord) {
        if let Some(p) = self.0 {
            p.send(Entry::Lifecycle(record));
        }
    }
}

/// The SHA-256 of a canonical context (what records carry by default, hex-encoded).
pub fn context_digest_bytes(context: &BTreeMap<String, String>) -> [u8; 32] {
    // Most requests carry no context: its digest is a constant.
    static EMPTY: std::sync::LazyLock<[u8; 32]> = std::sync::LazyLock::new(|| {
        let mut out = [0u8; 32];
        out.copy_from_slice(digest::digest(&digest::SHA256, &[0, 0]).as_ref());
        out
    });
    if context.is_empty() {
        return *EMPTY;
    }
    let mut buf = Vec::with_capacity(64);
    crate::context::encode_map(context, &mut buf);
    let mut out = [0u8; 32];
    out.copy_from_slice(digest::digest(&digest::SHA256, &buf).as_ref());
    out
}

/// [`context_digest_bytes`] as it appears in a record.
pub fn context_digest(context: &BTreeMap<String, String>) -> String {
    hex(&context_digest_bytes(context))
}

pub(super) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

impl Auditor {
    /// Starts the writer thread. Returns the request-side handle and the thread (which ends
    /// after [`Auditor::close`] once every queued record, and every reserved slot, is written).
    pub fn start(
        config: &AuditConfig,
    ) -> io::Result<(Arc<Self>, Option<std::thread::JoinHandle<()>>)> {
        let healthy = Arc::new(AtomicBool::new(true));
        let key = match (&config.key_file, config.enabled) {
            (Some(path), true) => Some(Arc::new(AuditKey::load(path)?)),
            _ => None,
        };
        let this = |tx| Self {
            tx: arc_swap::ArcSwapOption::from_pointee(tx),
            enabled: config.enabled,
            healthy: Arc::clone(&healthy),
            mode: config.mode,
            block_timeout: config.block_timeout,
            include_context_values: config.include_context_values,
            dropped: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            peak: AtomicUsize::new(0),
            key: key.clone(),
            empty_context_digest: match &key {
                Some(k) => k.context_mac(&[0, 0]),
                None => context_digest_bytes(&BTreeMap::new()),
            },
        };
        if !config.enabled {
            return Ok((Arc::new(this(None)), None));
        }
        let (tx, rx) = mpsc::channel(config.queue.max(1));
        let writer = Writer::open(config, key.clone())?;
        let h = Arc::clone(&healthy);
        let thread = std::thread::Builder::new()
            .name("keybroker-audit".into())
            .spawn(move || writer.run(rx, h))?;
        Ok((Arc::new(this(Some(tx))), Some(thread)))
    }

    /// The digest a record carries for a context: keyed (HMAC) when the log is keyed, else the
    /// plain SHA-256 of [`context_digest_bytes`].
    fn context_digest_bytes(&self, context: &BTreeMap<String, String>) -> [u8; 32] {
        if context.is_empty() {
            return self.empty_context_digest;
        }
        match &self.key {
            None => context_digest_bytes(context),
            Some(key) => {
                let mut buf = Vec::with_capacity(64);
                crate::context::encode_map(context, &mut buf);
                key.context_mac(&buf)
            }
        }
    }

    /// Records dropped in best-effort mode.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Whether the writer is currently able to write.
    pub fn healthy(&self) -> bool {
        !self.enabled || self.healthy.load(Ordering::Relaxed)
    }

    /// Reserves a record slot before a key is used.
    pub async fn reserve(&self) -> Result<Slot, Error> {
        let slot = self.reserve_now().await;
        self.count_refusal(&slot);
        slot
    }

    async fn reserve_now(&self) -> Result<Slot, Error> {
        if !self.enabled {
            return Ok(Slot(None));
        }
        let Some(queue) = self.tx.load_full() else {
            return Err(Error::AuditUnavailable);
        };
        let tx = (*queue).clone();
        let slot = match self.mode {
            AuditMode::Required => {
                if !self.healthy.load(Ordering::Relaxed) {
                    return Err(Error::AuditUnavailable);
                }
                let permit = match tx.try_reserve_owned() {
                    Ok(p) => p,
                    Err(mpsc::error::TrySendError::Closed(_)) => {
                        return Err(Error::AuditUnavailable);
                    }
                    Err(mpsc::error::TrySendError::Full(tx)) => {
                        self.note_depth(&queue);
                        match tokio::time::timeout(self.block_timeout, tx.reserve_owned()).await {
                            Ok(Ok(p)) => p,
                            _ => return Err(Error::AuditUnavailable),
                        }
                    }
                };
                Slot(Some(permit))
            }
            AuditMode::BestEffort => match tx.try_reserve_owned() {
                Ok(p) => Slot(Some(p)),
                Err(_) => {
                    self.dropped.fetch_add(1, Ordering::Relaxed);
                    Slot(None)
                }
            },
        };
        self.note_depth(&queue);
        Ok(slot)
    }

    /// Keeps the high-water mark. A relaxed read first: the shared line is written only when
    /// the queue is deeper than ever before, so the request path stays a load.
    fn note_depth(&self, tx: &mpsc::Sender<Entry>) {
        let queued = tx.max_capacity() - tx.capacity();
        if queued > self.peak.load(Ordering::Relaxed) {
            self.peak.fetch_max(queued, Ordering::Relaxed);
        }
    }

    fn count_refusal(&self, slot: &Result<Slot, Error>) {
        if slot.is_err() {
            self.refused.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Records queued now (reserved or waiting for the writer), the most ever queued at once,
    /// and the queue's size (all 0 when auditing is off).
    pub fn queue_depth(&self) -> (u64, u64, u64) {
        let Some(tx) = self.tx.load_full() else {
            return (0, self.peak.load(Ordering::Relaxed) as u64, 0);
        };
        let max = tx.max_capacity();
        (
            (max - tx.capacity()) as u64,
            self.peak.load(Ordering::Relaxed) as u64,
            max as u64,
        )
    }

    /// Requests (and lifecycle changes) refused because their record could not be queued.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// [`Auditor::reserve`] for a thread that is not async (the keyring scheduler runs on a
    /// blocking thread): the same rules, waiting by polling for at most `block_timeout`. A
    /// lifecycle change that cannot get a slot in Required mode is not made (it is retried at
    /// the next poll), as a request is refused.
    pub fn reserve_blocking(&self) -> Result<Slot, Error> {
        let slot = self.reserve_blocking_now();
        self.count_refusal(&slot);
        slot
    }

    fn reserve_blocking_now(&self) -> Result<Slot, Error> {
        if !self.enabled {
            return Ok(Slot(None));
        }
        let Some(tx) = self.tx.load_full() else {
            return Err(Error::AuditUnavailable);
        };
        let deadline = std::time::Instant::now() + self.block_timeout;
        loop {
            if self.mode == AuditMode::Required && !self.healthy.load(Ordering::Relaxed) {
                return Err(Error::AuditUnavailable);
            }
            match (*tx).clone().try_reserve_owned() {
                Ok(p) => {
                    self.note_depth(&tx);
                    return Ok(Slot(Some(p)));
                }
                Err(mpsc::error::TrySendError::Closed(_)) => return Err(Error::AuditUnavailable),
                Err(mpsc::error::TrySendError::Full(_)) => {
                    if self.mode == AuditMode::BestEffort {
                        self.dropped.fetch_add(1, Ordering::Relaxed);
                        return Ok(Slot(None));
                    }
                    if std::time::Instant::now() >= deadline {
                        return Err(Error::AuditUnavailable);
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
        }
    }

    /// Stops accepting records; the writer writes what is queued (and any reserved slot that is
    /// filled later) and ends.
    pub fn close(&self) {
        self.tx.store(None);
    }

    #[allow(clippy::too_many_arguments)]
    pub fn record(
        &self,
        slot: Slot,
        caller: &Caller,
        request_id: RequestId,
        operation: Operation,
        facts: Facts,
        outcome: Outcome,
        latency: Duration,
        contexts: [Option<&BTreeMap<String, String>>; 2],
    ) {
        if slot.0.is_none() {
            return;
        }
        let Outcome { code, reason } = outcome;
        let values = |c: Option<&BTreeMap<String, String>>| {
            if self.include_context_values {
                c.cloned()
            } else {
                None
            }
        };
        slot.send(Record {
            time: SystemTime::now(),
            request_id,
            caller: Arc::clone(&caller.name),
            identified_by: caller.source.as_str(),
            operation,
            facts,
            code,
            reason,
            latency_us: latency.as_micros() as u64,
            context_digest: contexts[0].map(|c| self.context_digest_bytes(c)),
            context: values(contexts[0]),
            destination_context_digest: contexts[1].map(|c| self.context_digest_bytes(c)),
            destination_context: values(contexts[1]),
        });
    }
}

/// `,"name":"value"` (or `null`).
pub(super) fn field(out: &mut Vec<u8>, name: &str, value: Option<&str>) {
    out.extend_from_slice(b",\"");
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b"\":");
    match value {
        Some(v) => json_str(out, v),
        None => out.extend_from_slice(b"null"),
    }
}

/// A JSON string literal: quotes, backslashes and control characters escaped.
pub(super) fn json_str(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    for &b in s.as_bytes() {
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            0x00..=0x1f => {
                const DIGITS: &[u8; 16] = b"0123456789abcdef";
                out.extend_from_slice(b"\\u00");
                out.push(DIGITS[(b >> 4) as usize]);
                out.push(DIGITS[(b & 15) as usize]);
            }
            _ => out.push(b),
        }
    }
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_is_of_the_canonical_context() {
        let mut a = BTreeMap::new();
        a.insert("b".to_owned(), "2".to_owned());
        a.insert("a".to_owned(), "1".to_owned());
        assert_eq!(context_digest(&a).len(), 64);
        assert_ne!(context_digest(&a), context_digest(&BTreeMap::new()));
    }

    #[test]
    fn empty_context_digest_matches_the_encoding() {
        let mut buf = Vec::new();
        crate::context::encode_map(&BTreeMap::new(), &mut buf);
        assert_eq!(
            context_digest_bytes(&BTreeMap::new()).as_slice(),
            digest::digest(&digest::SHA256, &buf).as_ref()
        );
    }

    #[test]
    fn json_strings_are_escaped() {
        let mut out = Vec::new();
        json_str(&mut out, "a\"b\\c\nd\u{1}é");
        let text = String::from_utf8(out).unwrap();
        assert_eq!(
            serde_json::from_str::<String>(&text).unwrap(),
            "a\"b\\c\nd\u{1}é"
        );
    }
}

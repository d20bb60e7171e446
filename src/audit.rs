//! The audit log: one JSON Lines record per key use (cache hits, denials and failures included),
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
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use aws_lc_rs::{constant_time, digest, hkdf, hmac};
use tokio::sync::mpsc;

use crate::broker::Facts;
use crate::error::Error;
use crate::identity::{Caller, RequestId};
use crate::operation::Operation;

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

/// Shortest and longest accepted audit key file.
pub const MIN_KEY_LEN: usize = 32;
pub const MAX_KEY_LEN: usize = 1024;

/// The keys derived from an audit key file: one for the chain (records and checkpoints), one for
/// context digests, so that neither use can stand in for the other.
pub struct AuditKey {
    chain: hmac::Key,
    context: hmac::Key,
}

impl std::fmt::Debug for AuditKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AuditKey(<redacted>)")
    }
}

impl AuditKey {
    /// Reads a key file: its bytes are the key (32 to 1024 of them; `keybroker audit new-key`
    /// writes 32 random ones).
    pub fn load(path: &Path) -> io::Result<Self> {
        let fail = |why: String| io::Error::new(io::ErrorKind::InvalidData, why);
        let meta = std::fs::metadata(path).map_err(|e| {
            io::Error::new(e.kind(), format!("audit key file {}: {e}", path.display()))
        })?;
        if !meta.is_file() || meta.len() > MAX_KEY_LEN as u64 {
            return Err(fail(format!(
                "audit key file {} must be a regular file of {MIN_KEY_LEN} to {MAX_KEY_LEN} bytes",
                path.display()
            )));
        }
        {
            use std::os::unix::fs::PermissionsExt;
            if meta.permissions().mode() & 0o077 != 0 {
                tracing::warn!(file = %path.display(),
                    "the audit key file is readable by group or others; anyone who can read it can rewrite the audit log undetectably");
            }
        }
        let bytes = zeroize::Zeroizing::new(std::fs::read(path).map_err(|e| {
            io::Error::new(e.kind(), format!("audit key file {}: {e}", path.display()))
        })?);
        if bytes.len() < MIN_KEY_LEN || bytes.len() > MAX_KEY_LEN {
            return Err(fail(format!(
                "audit key file {} holds {} bytes; it needs {MIN_KEY_LEN} to {MAX_KEY_LEN}",
                path.display(),
                bytes.len()
            )));
        }
        Self::from_bytes(&bytes).map_err(|_| fail("audit key derivation failed".into()))
    }

    /// HKDF-SHA256(key file bytes, no salt) expanded under two labels.
    pub fn from_bytes(ikm: &[u8]) -> Result<Self, aws_lc_rs::error::Unspecified> {
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, &[]).extract(ikm);
        let derive = |info: &[u8]| -> Result<hmac::Key, aws_lc_rs::error::Unspecified> {
            let info = [info];
            let okm = prk.expand(&info, hmac::HMAC_SHA256)?;
            Ok(hmac::Key::from(okm))
        };
        Ok(Self {
            chain: derive(b"keybroker audit v2: record chain")?,
            context: derive(b"keybroker audit v2: context digest")?,
        })
    }

    fn chain_mac(&self, bytes: &[u8]) -> [u8; 32] {
        let mut out = [0u8; 32];
        out.copy_from_slice(hmac::sign(&self.chain, bytes).as_ref());
        out
    }

    fn context_mac(&self, canonical: &[u8]) -> [u8; 32] {
        let mut out = [0u8; 32];
        out.copy_from_slice(hmac::sign(&self.context, canonical).as_ref());
        out
    }

    /// The keyed `context_digest` of a context (what keyed logs carry), for looking records up.
    pub fn context_digest(&self, context: &BTreeMap<String, String>) -> String {
        let mut buf = Vec::with_capacity(64);
        crate::envelope::encode_context(context, &mut buf);
        hex(&self.context_mac(&buf))
    }
}

/// Writes a new random audit key (32 bytes, mode 0600); refuses to overwrite a file.
pub fn new_key_file(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut key = zeroize::Zeroizing::new([0u8; MIN_KEY_LEN]);
    crate::secret::random_fill(&mut key[..]).map_err(io::Error::other)?;
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(&key[..])?;
    f.sync_all()
}

/// The suffix a keyed record (or checkpoint) ends with: `,"mac":"` 64 hex digits `"}`.
const MAC_OPEN: &[u8] = b",\"mac\":\"";
const MAC_SUFFIX_LEN: usize = MAC_OPEN.len() + 64 + 2;

/// Appends `,"mac":"<hex HMAC of out[start..]>"}` and returns the MAC's hex.
fn close_with_mac(key: &AuditKey, out: &mut Vec<u8>, start: usize) -> String {
    let mac = hex(&key.chain_mac(&out[start..]));
    out.extend_from_slice(MAC_OPEN);
    out.extend_from_slice(mac.as_bytes());
    out.extend_from_slice(b"\"}");
    mac
}

/// Splits a keyed line into (what the MAC covers, the MAC's hex), if it ends like one.
fn split_mac(line: &[u8]) -> Option<(&[u8], &str)> {
    if line.len() < MAC_SUFFIX_LEN + 1 || !line.ends_with(b"\"}") {
        return None;
    }
    let (covered, suffix) = line.split_at(line.len() - MAC_SUFFIX_LEN);
    let mac = suffix.strip_prefix(MAC_OPEN)?.strip_suffix(b"\"}")?;
    let mac = std::str::from_utf8(mac).ok()?;
    mac.bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        .then_some((covered, mac))
}

/// Whether `mac` (hex) is the chain MAC of `covered`, compared in constant time.
fn mac_matches(key: &AuditKey, covered: &[u8], mac: &str) -> bool {
    constant_time::verify_slices_are_equal(hex(&key.chain_mac(covered)).as_bytes(), mac.as_bytes())
        .is_ok()
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

/// The request-side handle.
pub struct Auditor {
    /// `None` when auditing is off or after `close`.
    tx: arc_swap::ArcSwapOption<mpsc::Sender<Record>>,
    enabled: bool,
    healthy: Arc<AtomicBool>,
    mode: AuditMode,
    block_timeout: Duration,
    include_context_values: bool,
    dropped: AtomicU64,
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
pub struct Slot(Option<mpsc::OwnedPermit<Record>>);

impl Slot {
    pub fn send(self, record: Record) {
        if let Some(p) = self.0 {
            p.send(record);
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
    crate::envelope::encode_context(context, &mut buf);
    let mut out = [0u8; 32];
    out.copy_from_slice(digest::digest(&digest::SHA256, &buf).as_ref());
    out
}

/// [`context_digest_bytes`] as it appears in a record.
pub fn context_digest(context: &BTreeMap<String, String>) -> String {
    hex(&context_digest_bytes(context))
}

fn hex(bytes: &[u8]) -> String {
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
                crate::envelope::encode_context(context, &mut buf);
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
        if !self.enabled {
            return Ok(Slot(None));
        }
        let Some(tx) = self.tx.load_full() else {
            return Err(Error::AuditUnavailable);
        };
        let tx = (*tx).clone();
        match self.mode {
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
                        match tokio::time::timeout(self.block_timeout, tx.reserve_owned()).await {
                            Ok(Ok(p)) => p,
                            _ => return Err(Error::AuditUnavailable),
                        }
                    }
                };
                Ok(Slot(Some(permit)))
            }
            AuditMode::BestEffort => match tx.try_reserve_owned() {
                Ok(p) => Ok(Slot(Some(p))),
                Err(_) => {
                    self.dropped.fetch_add(1, Ordering::Relaxed);
                    Ok(Slot(None))
                }
            },
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
        result: Result<(), &Error>,
        latency: Duration,
        contexts: [Option<&BTreeMap<String, String>>; 2],
    ) {
        if slot.0.is_none() {
            return;
        }
        let (code, reason) = match result {
            Ok(()) => ("OK", None),
            Err(e) => {
                let (code, reason) = e.code_and_reason();
                (code_name(code), Some(reason))
            }
        };
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
fn field(out: &mut Vec<u8>, name: &str, value: Option<&str>) {
    out.extend_from_slice(b",\"");
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b"\":");
    match value {
        Some(v) => json_str(out, v),
        None => out.extend_from_slice(b"null"),
    }
}

/// A JSON string literal: quotes, backslashes and control characters escaped.
fn json_str(out: &mut Vec<u8>, s: &str) {
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

/// gRPC code names as the gRPC spec spells them.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Where the writer is in the chain.
struct Chain {
    seq: u64,
    prev: String,
}

struct Writer {
    sink: AuditSink,
    file: Option<File>,
    size: u64,
    max_file_bytes: u64,
    max_files: u32,
    chain: Chain,
    key: Option<Arc<AuditKey>>,
    checkpoint: Option<Checkpointer>,
}

/// Keeps the checkpoint file: the latest (seq, link) rewritten atomically every interval while
/// records are written, and at close.
struct Checkpointer {
    path: PathBuf,
    every: Duration,
    last: std::time::Instant,
    written_seq: u64,
}

impl Writer {
    fn open(config: &AuditConfig, key: Option<Arc<AuditKey>>) -> io::Result<Self> {
        let mut w = Self {
            sink: config.sink.clone(),
            file: None,
            size: 0,
            max_file_bytes: config.max_file_bytes,
            max_files: config.max_files,
            chain: Chain {
                seq: 0,
                prev: GENESIS.to_owned(),
            },
            key,
            checkpoint: config.checkpoint_file.as_ref().map(|path| Checkpointer {
                path: path.clone(),
                every: config.checkpoint_interval,
                last: std::time::Instant::now(),
                written_seq: 0,
            }),
        };
        if let AuditSink::File(path) = &config.sink {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)?;
            }
            // Continue the chain of an existing log (the newest file, else the newest rotation).
            for candidate in [path.clone(), rotated(path, 1)] {
                if let Some(chain) = last_link(&candidate, w.key.as_deref())? {
                    w.chain = chain;
                    break;
                }
            }
            w.reopen()?;
        }
        w.check_against_checkpoint();
        Ok(w)
    }

    /// At start: a log that ends before the last checkpoint lost records while we were away.
    /// Said loudly; the chain continues (verify reports the same with `--checkpoint`).
    fn check_against_checkpoint(&mut self) {
        let Some(cp) = &mut self.checkpoint else {
            return;
        };
        match read_checkpoint(&cp.path, self.key.as_deref()) {
            Ok(Some(c)) if c.seq > self.chain.seq => {
                tracing::error!(checkpoint = %cp.path.display(), checkpoint_seq = c.seq,
                    log_seq = self.chain.seq,
                    "the audit log ends before its last checkpoint: records were removed from its end");
            }
            Ok(Some(c)) => cp.written_seq = c.seq,
            Ok(None) => {}
            Err(e) => tracing::error!(checkpoint = %cp.path.display(), error = %e,
                "the audit checkpoint cannot be read"),
        }
    }

    /// Rewrites the checkpoint if it is due (or `force`, at close) and the chain moved.
    fn checkpoint(&mut self, force: bool) {
        let Some(cp) = &mut self.checkpoint else {
            return;
        };
        if self.chain.seq == cp.written_seq || (!force && cp.last.elapsed() < cp.every) {
            return;
        }
        let mut out = Vec::with_capacity(256);
        {
            use std::io::Write as _;
            let _ = write!(
                out,
                "{{\"format\":\"{CHECKPOINT_FORMAT}\",\"seq\":{},\"link\":\"{}\",\"time\":\"",
                self.chain.seq, self.chain.prev
            );
        }
        crate::util::write_rfc3339(SystemTime::now(), &mut out);
        out.push(b'"');
        match &self.key {
            Some(key) => {
                close_with_mac(key, &mut out, 0);
            }
            None => out.push(b'}'),
        }
        out.push(b'\n');
        match crate::util::write_atomic(&cp.path, &out, 0o600) {
            Ok(()) => {
                cp.written_seq = self.chain.seq;
                cp.last = std::time::Instant::now();
                tracing::info!(seq = self.chain.seq, link = %self.chain.prev, "audit checkpoint");
            }
            Err(e) => tracing::warn!(checkpoint = %cp.path.display(), error = %e,
                "cannot write the audit checkpoint; will retry"),
        }
    }

    fn reopen(&mut self) -> io::Result<()> {
        if let AuditSink::File(path) = &self.sink {
            use std::os::unix::fs::OpenOptionsExt;
            let f = OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o600)
                .open(path)?;
            self.size = f.metadata()?.len();
            self.file = Some(f);
        }
        Ok(())
    }

    fn rotate(&mut self) -> io::Result<()> {
        let AuditSink::File(path) = &self.sink else {
            return Ok(());
        };
        if let Some(f) = self.file.take() {
            f.sync_all()?;
        }
        if self.max_files == 0 {
            std::fs::remove_file(path)?;
        } else {
            let _ = std::fs::remove_file(rotated(path, self.max_files));
            for i in (1..self.max_files).rev() {
                let from = rotated(path, i);
                if from.exists() {
                    std::fs::rename(&from, rotated(path, i + 1))?;
                }
            }
            std::fs::rename(path, rotated(path, 1))?;
        }
        self.reopen()
    }

    /// Appends serialized lines, rotating first if the file would pass its size limit.
    fn write(&mut self, buf: &[u8]) -> io::Result<()> {
        match self.sink {
            AuditSink::Stdout => {
                let mut out = io::stdout().lock();
                out.write_all(buf)?;
                out.flush()
            }
            AuditSink::File(_) => {
                if self.size > 0 && self.size + buf.len() as u64 > self.max_file_bytes {
                    self.rotate()?;
                }
                if self.file.is_none() {
                    self.reopen()?;
                }
                let f = self
                    .file
                    .as_mut()
                    .ok_or_else(|| io::Error::other("audit file not open"))?;
                if let Err(e) = f.write_all(buf) {
                    // Cut off a partial batch so the retry does not leave half a record behind.
                    let _ = f.set_len(self.size);
                    return Err(e);
                }
                self.size += buf.len() as u64;
                Ok(())
            }
        }
    }

    /// Appends one record as a JSON line and advances the chain. Written by hand (fields in a
    /// fixed order, strings escaped per RFC 8259): this runs once per key use.
    fn serialize(&mut self, r: &Record, out: &mut Vec<u8>) {
        use std::io::Write as _;
        self.chain.seq += 1;
        let f = &r.facts;
        let start = out.len();
        let _ = write!(out, "{{\"seq\":{},\"prev\":\"", self.chain.seq);
        out.extend_from_slice(self.chain.prev.as_bytes());
        out.extend_from_slice(b"\",\"time\":\"");
        crate::util::write_rfc3339(r.time, out);
        out.extend_from_slice(b"\",\"request_id\":");
        match &r.request_id {
            RequestId::Client(id) => json_str(out, id),
            generated => {
                let _ = write!(out, "\"{generated}\"");
            }
        }
        field(out, "caller", Some(&r.caller));
        field(out, "identified_by", Some(r.identified_by));
        field(out, "operation", Some(r.operation.as_str()));
        field(out, "key", f.key.as_deref());
        field(out, "backend", f.backend.map(|b| b.as_str()));
        field(out, "backend_key_id", f.backend_key_id.as_deref());
        field(out, "key_version", f.key_version.as_deref());
        if f.source_key.is_some() {
            field(out, "source_key", f.source_key.as_deref());
            field(out, "source_key_version", f.source_key_version.as_deref());
        }
        field(out, "result", Some(r.code));
        field(out, "reason", r.reason);
        field(out, "cache", f.cache.map(|c| c.as_str()));
        let _ = write!(
            out,
            ",\"bytes\":{},\"latency_us\":{}",
            f.bytes, r.latency_us
        );
        let contexts = [
            ("context", "context_digest", &r.context_digest, &r.context),
            (
                "destination_context",
                "destination_context_digest",
                &r.destination_context_digest,
                &r.destination_context,
            ),
        ];
        for (i, (name, digest_name, digest, values)) in contexts.into_iter().enumerate() {
            // `context_digest` is always present (null if none); the destination's only on
            // ReEncrypt.
            if i == 0 || digest.is_some() {
                field(out, digest_name, digest.as_ref().map(|d| hex(d)).as_deref());
            }
            if let Some(m) = values {
                let _ = write!(out, ",\"{name}\":");
                if serde_json::to_writer(&mut *out, m).is_err() {
                    out.extend_from_slice(b"null");
                }
            }
        }
        match &self.key {
            // Keyed: the record authenticates itself, and the next one links to its MAC.
            Some(key) => self.chain.prev = close_with_mac(key, out, start),
            None => {
                out.push(b'}');
                self.chain.prev = hex(digest::digest(&digest::SHA256, &out[start..]).as_ref());
            }
        }
        out.push(b'\n');
    }

    /// The writer thread: serializes, chains and writes records in batches, off the request
    /// threads (a stuck disk or pipe blocks only this thread; requests are then refused with
    /// AUDIT_UNAVAILABLE once the queue is full, instead of hanging). A short linger after each
    /// wake-up gathers records into bigger writes.
    fn run(mut self, mut rx: mpsc::Receiver<Record>, healthy: Arc<AtomicBool>) {
        const LINGER: Duration = Duration::from_micros(500);
        let mut batch = Vec::with_capacity(1024);
        let mut buf = Vec::with_capacity(256 << 10);
        while rx.blocking_recv_many(&mut batch, 1024) > 0 {
            std::thread::sleep(LINGER);
            while batch.len() < 4096 {
                match rx.try_recv() {
                    Ok(r) => batch.push(r),
                    Err(_) => break,
                }
            }
            for r in batch.drain(..) {
                self.serialize(&r, &mut buf);
            }
            // Keep the serialized lines until they are written; while the sink fails, requests
            // are refused (Required mode) and this retries.
            let mut backoff = Duration::from_millis(100);
            loop {
                match self.write(&buf) {
                    Ok(()) => {
                        if !healthy.swap(true, Ordering::Relaxed) {
                            tracing::info!("audit log writable again");
                        }
                        self.checkpoint(false);
                        break;
                    }
                    Err(e) => {
                        if healthy.swap(false, Ordering::Relaxed) {
                            tracing::error!(error = %e, "cannot write the audit log; refusing key use until it can");
                        }
                        self.file = None;
                        std::thread::sleep(backoff);
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                }
            }
            buf.clear();
        }
        if let Some(f) = &self.file {
            let _ = f.sync_all();
        }
        self.checkpoint(true);
        tracing::info!(last_seq = self.chain.seq, last_hash = %self.chain.prev, "audit log closed");
    }
}

/// `audit.jsonl` → `audit.jsonl.N`.
pub fn rotated(path: &Path, n: u32) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(format!(".{n}"));
    PathBuf::from(s)
}

/// What the next record's `prev` must be after `line`: its MAC if it is keyed, else the SHA-256
/// of its bytes.
fn link_of(line: &[u8]) -> String {
    match split_mac(line) {
        Some((_, mac)) => mac.to_owned(),
        None => hex(digest::digest(&digest::SHA256, line).as_ref()),
    }
}

/// The chain position after the last line of `path` (None if missing or empty).
fn last_link(path: &Path, key: Option<&AuditKey>) -> io::Result<Option<Chain>> {
    // Only a regular file has a chain to continue (a pipe or device would block or lie).
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => {}
        Ok(_) => return Ok(None),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    }
    let mut f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let len = f.metadata()?.len();
    if len == 0 {
        return Ok(None);
    }
    let start = len.saturating_sub(1 << 20);
    f.seek(SeekFrom::Start(start))?;
    let mut tail = Vec::new();
    f.read_to_end(&mut tail)?;
    let Some(line) = tail.split(|&b| b == b'\n').rev().find(|l| !l.is_empty()) else {
        return Ok(None);
    };
    let seq = serde_json::from_slice::<serde_json::Value>(line)
        .ok()
        .and_then(|v| v["seq"].as_u64());
    let Some(seq) = seq else {
        tracing::error!(file = %path.display(), "the audit log ends with a damaged record; continuing the chain after it");
        return Ok(Some(Chain {
            seq: 0,
            prev: link_of(line),
        }));
    };
    if let Some(key) = key {
        match split_mac(line) {
            Some((covered, mac)) if mac_matches(key, covered, mac) => {}
            Some(_) => tracing::error!(file = %path.display(),
                "the last audit record's MAC does not verify under the configured key (edited, or another key); continuing the chain after it"),
            None => tracing::info!(file = %path.display(),
                "continuing an unkeyed audit chain with keyed records"),
        }
    }
    Ok(Some(Chain {
        seq,
        prev: link_of(line),
    }))
}

/// The checkpoint file's `format`.
pub const CHECKPOINT_FORMAT: &str = "keybroker-audit-checkpoint/v1";

/// A checkpoint: the chain reached `seq`, whose record's link (MAC or hash) was `link`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    pub seq: u64,
    pub link: String,
    pub time: String,
}

/// Reads a checkpoint file (`None` if it does not exist). With a key, its MAC must verify; a
/// keyed checkpoint without a key is read but cannot be authenticated.
pub fn read_checkpoint(path: &Path, key: Option<&AuditKey>) -> Result<Option<Checkpoint>, String> {
    let text = match std::fs::read(path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    if text.len() > 4096 {
        return Err(format!("{} is not an audit checkpoint", path.display()));
    }
    let line = text.strip_suffix(b"\n").unwrap_or(&text);
    if let Some(key) = key {
        match split_mac(line) {
            Some((covered, mac)) if mac_matches(key, covered, mac) => {}
            Some(_) => {
                return Err(format!(
                    "checkpoint {}: its MAC does not verify under this key",
                    path.display()
                ));
            }
            None => {
                return Err(format!(
                    "checkpoint {} carries no MAC: it was not written under a key",
                    path.display()
                ));
            }
        }
    }
    let v: serde_json::Value = serde_json::from_slice(line)
        .map_err(|_| format!("{} is not an audit checkpoint", path.display()))?;
    match (v["format"].as_str(), v["seq"].as_u64(), v["link"].as_str()) {
        (Some(CHECKPOINT_FORMAT), Some(seq), Some(link)) => Ok(Some(Checkpoint {
            seq,
            link: link.to_owned(),
            time: v["time"].as_str().unwrap_or_default().to_owned(),
        })),
        _ => Err(format!("{} is not an audit checkpoint", path.display())),
    }
}

/// The first problem `verify` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokenLink {
    pub file: PathBuf,
    pub line: usize,
    pub seq: Option<u64>,
    pub problem: String,
}

/// What `verify` saw on a good log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    pub records: u64,
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
    pub last_hash: String,
    /// The first record continues an older chain (its predecessors were rotated away).
    pub starts_mid_chain: bool,
    /// Records whose own MAC was checked (keyed logs, with the key).
    pub keyed_records: u64,
    /// The checkpoint that was checked, if one was given.
    pub checkpoint: Option<Checkpoint>,
}

/// What `verify` is given besides the files.
#[derive(Debug, Default)]
pub struct VerifyOptions {
    /// The audit key: every keyed record's MAC is checked, and records after the first keyed one
    /// must be keyed too. Without it, a keyed log is refused (its MACs cannot be checked).
    pub key: Option<AuditKey>,
    /// A checkpoint file: the log must reach its seq with its link (else it was cut short).
    pub checkpoint: Option<PathBuf>,
}

/// Checks the chain through `files`, oldest first (`audit.jsonl.3 audit.jsonl.2 audit.jsonl.1
/// audit.jsonl`). Reports the first broken link with its position and the likely cause.
pub fn verify(files: &[PathBuf]) -> Result<VerifyReport, BrokenLink> {
    verify_with(files, &VerifyOptions::default())
}

/// [`verify`] with a key and/or a checkpoint.
pub fn verify_with(files: &[PathBuf], opts: &VerifyOptions) -> Result<VerifyReport, BrokenLink> {
    let last_file = files.last().cloned().unwrap_or_default();
    verify_lines(Lines::new(files), last_file, opts)
}

/// [`verify_with`] on one log already in memory (`name` only labels the problem), split into
/// lines exactly as files are. Separate so that the fuzz harness (`fuzz/`) can drive the
/// verifier on untrusted bytes without files.
pub fn verify_bytes(
    name: &Path,
    log: &[u8],
    opts: &VerifyOptions,
) -> Result<VerifyReport, BrokenLink> {
    let lines = io::Cursor::new(log)
        .split(b'\n')
        .enumerate()
        .map(|(i, raw)| {
            raw.map(|raw| (name.to_owned(), i + 1, raw))
                .map_err(|e| BrokenLink {
                    file: name.to_owned(),
                    line: i + 1,
                    seq: None,
                    problem: format!("cannot read: {e}"),
                })
        });
    verify_lines(lines, name.to_owned(), opts)
}

/// The chain check over numbered lines; `last_file` is named in problems found at the end.
fn verify_lines(
    lines: impl Iterator<Item = Result<(PathBuf, usize, Vec<u8>), BrokenLink>>,
    last_file: PathBuf,
    opts: &VerifyOptions,
) -> Result<VerifyReport, BrokenLink> {
    let mut report = VerifyReport {
        records: 0,
        first_seq: None,
        last_seq: None,
        last_hash: GENESIS.to_owned(),
        starts_mid_chain: false,
        keyed_records: 0,
        checkpoint: None,
    };
    let key = opts.key.as_ref();
    let checkpoint = match &opts.checkpoint {
        None => None,
        Some(path) => {
            let at = |problem: String| BrokenLink {
                file: path.clone(),
                line: 0,
                seq: None,
                problem,
            };
            match read_checkpoint(path, key) {
                Ok(Some(c)) => Some(c),
                Ok(None) => {
                    return Err(at(
                        "the checkpoint file does not exist (deleted, or never written)".into(),
                    ));
                }
                Err(e) => return Err(at(e)),
            }
        }
    };
    let mut checkpoint_seen = false;
    let mut lines = lines.peekable();
    let mut prev: Option<(u64, String)> = None;
    while let Some(item) = lines.next() {
        let (file, n, raw) = item?;
        let broken = |seq: Option<u64>, problem: String| BrokenLink {
            file: file.clone(),
            line: n,
            seq,
            problem,
        };
        let (seq, prev_field) = parse_link(&raw).map_err(|p| broken(None, p))?;
        let keyed = split_mac(&raw);
        match (keyed, key) {
            (Some(_), None) => {
                return Err(broken(
                    Some(seq),
                    "the record carries a MAC: this log is keyed, verify it with --key FILE".into(),
                ));
            }
            (Some((covered, mac)), Some(k)) => {
                if !mac_matches(k, covered, mac) {
                    return Err(broken(
                        Some(seq),
                        "the record's MAC does not verify: edited, forged, or written under another key".into(),
                    ));
                }
                report.keyed_records += 1;
            }
            (None, Some(_)) if report.keyed_records > 0 => {
                return Err(broken(
                    Some(seq),
                    "a record without a MAC follows keyed records: inserted or edited (or the key was removed from the configuration)".into(),
                ));
            }
            (None, _) => {}
        }
        match &prev {
            None => {
                report.first_seq = Some(seq);
                report.starts_mid_chain = prev_field != GENESIS;
            }
            Some((ps, h)) => {
                let ps = *ps;
                let next_seq = match lines.peek() {
                    Some(Ok((_, _, next))) => parse_link(next).ok().map(|(s, _)| s),
                    _ => None,
                };
                if seq <= ps {
                    return Err(broken(
                        Some(seq),
                        format!(
                            "seq {seq} follows seq {ps}: records reordered, duplicated or inserted"
                        ),
                    ));
                }
                if seq > ps + 1 {
                    let why = if next_seq == Some(ps + 1) {
                        format!(
                            "seq {seq} follows seq {ps} and seq {} comes after it: records reordered",
                            ps + 1
                        )
                    } else {
                        format!(
                            "seq {seq} follows seq {ps}: {} record(s) deleted",
                            seq - ps - 1
                        )
                    };
                    return Err(broken(Some(seq), why));
                }
                if &prev_field != h {
                    return Err(broken(
                        Some(seq),
                        format!(
                            "prev hash does not match the record before it: seq {ps} was edited, or this record was inserted or edited"
                        ),
                    ));
                }
            }
        }
        let h = link_of(&raw);
        if let Some(c) = &checkpoint
            && c.seq == seq
        {
            if c.link != h {
                return Err(broken(
                    Some(seq),
                    "the record at the checkpoint's seq is not the one the checkpoint names: the log was rewritten".into(),
                ));
            }
            checkpoint_seen = true;
        }
        report.records += 1;
        report.last_seq = Some(seq);
        report.last_hash = h.clone();
        prev = Some((seq, h));
    }
    if key.is_some() && report.keyed_records == 0 && report.records > 0 {
        return Err(BrokenLink {
            file: last_file.clone(),
            line: 0,
            seq: report.last_seq,
            problem: "no record carries a MAC: not a keyed log (or its keyed records were removed)"
                .into(),
        });
    }
    if let Some(c) = &checkpoint {
        let last = report.last_seq.unwrap_or(0);
        let end = |problem: String| BrokenLink {
            file: last_file.clone(),
            line: 0,
            seq: report.last_seq,
            problem,
        };
        if c.seq > last {
            return Err(end(format!(
                "the log ends at seq {last} but the checkpoint ({}) names seq {}: records were removed from the end (or newer files were not given)",
                c.time, c.seq
            )));
        }
        if !checkpoint_seen {
            return Err(end(format!(
                "the checkpoint's seq {} precedes the files given: give the file that holds it",
                c.seq
            )));
        }
    }
    report.checkpoint = checkpoint;
    Ok(report)
}

/// The (seq, prev) of one line.
fn parse_link(raw: &[u8]) -> Result<(u64, String), String> {
    if raw.is_empty() {
        return Err("empty line".into());
    }
    let v: serde_json::Value = serde_json::from_slice(raw)
        .map_err(|_| "not a JSON record (damaged or edited)".to_owned())?;
    match (v["seq"].as_u64(), v["prev"].as_str()) {
        (Some(s), Some(p)) => Ok((s, p.to_owned())),
        _ => Err("record has no seq/prev (inserted or edited)".into()),
    }
}

/// Every line of every file in order, with its position.
struct Lines<'a> {
    files: std::slice::Iter<'a, PathBuf>,
    current: Option<(PathBuf, usize, io::Split<io::BufReader<File>>)>,
}

impl<'a> Lines<'a> {
    fn new(files: &'a [PathBuf]) -> Self {
        Self {
            files: files.iter(),
            current: None,
        }
    }
}

impl Iterator for Lines<'_> {
    type Item = Result<(PathBuf, usize, Vec<u8>), BrokenLink>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some((file, n, split)) = &mut self.current {
                match split.next() {
                    Some(Ok(raw)) => {
                        *n += 1;
                        return Some(Ok((file.clone(), *n, raw)));
                    }
                    Some(Err(e)) => {
                        return Some(Err(BrokenLink {
                            file: file.clone(),
                            line: *n + 1,
                            seq: None,
                            problem: format!("cannot read: {e}"),
                        }));
                    }
                    None => self.current = None,
                }
            }
            let file = self.files.next()?;
            match File::open(file) {
                Ok(f) => self.current = Some((file.clone(), 0, io::BufReader::new(f).split(b'\n'))),
                Err(e) => {
                    return Some(Err(BrokenLink {
                        file: file.clone(),
                        line: 0,
                        seq: None,
                        problem: format!("cannot open: {e}"),
                    }));
                }
            }
        }
    }
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
}

#[cfg(test)]
mod line_tests {
    use super::*;

    #[test]
    fn empty_context_digest_matches_the_encoding() {
        let mut buf = Vec::new();
        crate::envelope::encode_context(&BTreeMap::new(), &mut buf);
        assert_eq!(
            context_digest_bytes(&BTreeMap::new()).as_slice(),
            digest::digest(&digest::SHA256, &buf).as_ref()
        );
    }

    #[test]
    fn keyed_lines_round_trip_and_refuse_edits() {
        let key = AuditKey::from_bytes(&[1u8; 32]).unwrap();
        let mut out = b"{\"seq\":1,\"prev\":\"00\"".to_vec();
        let mac = close_with_mac(&key, &mut out, 0);
        let (covered, got) = split_mac(&out).unwrap();
        assert_eq!(got, mac);
        assert!(mac_matches(&key, covered, got));
        let mut edited = out.clone();
        edited[8] = b'2';
        let (covered, got) = split_mac(&edited).unwrap();
        assert!(!mac_matches(&key, covered, got));
        let other = AuditKey::from_bytes(&[2u8; 32]).unwrap();
        let (covered, got) = split_mac(&out).unwrap();
        assert!(!mac_matches(&other, covered, got));
        // An unkeyed record never looks keyed, even with a "mac" inside its context values.
        for line in [
            &b"{\"seq\":1,\"context_digest\":\"ab\"}"[..],
            b"{\"seq\":1,\"context\":{\"mac\":\"0000000000000000000000000000000000000000000000000000000000000000\"}}",
        ] {
            assert!(split_mac(line).is_none());
        }
        // Keyed context digests differ by key and from the plain SHA-256.
        let mut c = BTreeMap::new();
        c.insert("pin".to_owned(), "1234".to_owned());
        assert_ne!(key.context_digest(&c), other.context_digest(&c));
        assert_ne!(key.context_digest(&c), context_digest(&c));
    }

    #[test]
    fn verify_bytes_agrees_with_verify_on_a_file() {
        let first = format!("{{\"seq\":1,\"prev\":\"{GENESIS}\"}}");
        let second = format!("{{\"seq\":2,\"prev\":\"{}\"}}", link_of(first.as_bytes()));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let opts = VerifyOptions::default();
        for (log, good) in [
            (format!("{first}\n{second}\n"), true),
            (format!("{first}\n{second}"), true),
            (String::new(), true),
            (format!("{first}\n\n{second}\n"), false),
            (format!("{second}\n{first}\n"), false),
            (format!("{first}\n{{\"seq\":2,\"prev\":\"00\"}}\n"), false),
        ] {
            std::fs::write(&path, &log).unwrap();
            let from_bytes = verify_bytes(&path, log.as_bytes(), &opts);
            assert_eq!(from_bytes.is_ok(), good, "{log:?}: {from_bytes:?}");
            assert_eq!(from_bytes, verify_with(&[path.clone()], &opts), "{log:?}");
        }
    }

    #[test]
    fn audit_key_files_need_32_to_1024_bytes() {
        let dir = tempfile::tempdir().unwrap();
        for (len, ok) in [
            (0usize, false),
            (31, false),
            (32, true),
            (1024, true),
            (1025, false),
        ] {
            let p = dir.path().join(format!("k{len}"));
            std::fs::write(&p, vec![3u8; len]).unwrap();
            assert_eq!(AuditKey::load(&p).is_ok(), ok, "{len} bytes");
        }
        let e = AuditKey::load(&dir.path().join("missing")).unwrap_err();
        assert!(e.to_string().contains("audit key file"), "{e}");
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

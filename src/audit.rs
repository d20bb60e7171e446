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

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use aws_lc_rs::digest;
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
        }
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
        let this = |tx| Self {
            tx: arc_swap::ArcSwapOption::from_pointee(tx),
            enabled: config.enabled,
            healthy: Arc::clone(&healthy),
            mode: config.mode,
            block_timeout: config.block_timeout,
            include_context_values: config.include_context_values,
            dropped: AtomicU64::new(0),
        };
        if !config.enabled {
            return Ok((Arc::new(this(None)), None));
        }
        let (tx, rx) = mpsc::channel(config.queue.max(1));
        let writer = Writer::open(config)?;
        let h = Arc::clone(&healthy);
        let thread = std::thread::Builder::new()
            .name("keybroker-audit".into())
            .spawn(move || writer.run(rx, h))?;
        Ok((Arc::new(this(Some(tx))), Some(thread)))
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
            context_digest: contexts[0].map(context_digest_bytes),
            context: values(contexts[0]),
            destination_context_digest: contexts[1].map(context_digest_bytes),
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
}

impl Writer {
    fn open(config: &AuditConfig) -> io::Result<Self> {
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
        };
        if let AuditSink::File(path) = &config.sink {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)?;
            }
            // Continue the chain of an existing log (the newest file, else the newest rotation).
            for candidate in [path.clone(), rotated(path, 1)] {
                if let Some(chain) = last_link(&candidate)? {
                    w.chain = chain;
                    break;
                }
            }
            w.reopen()?;
        }
        Ok(w)
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
        out.push(b'}');
        self.chain.prev = hex(digest::digest(&digest::SHA256, &out[start..]).as_ref());
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
        tracing::info!(last_seq = self.chain.seq, last_hash = %self.chain.prev, "audit log closed");
    }
}

/// `audit.jsonl` → `audit.jsonl.N`.
pub fn rotated(path: &Path, n: u32) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(format!(".{n}"));
    PathBuf::from(s)
}

/// The chain position after the last line of `path` (None if missing or empty).
fn last_link(path: &Path) -> io::Result<Option<Chain>> {
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
            prev: hex(digest::digest(&digest::SHA256, line).as_ref()),
        }));
    };
    Ok(Some(Chain {
        seq,
        prev: hex(digest::digest(&digest::SHA256, line).as_ref()),
    }))
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
}

/// Checks the chain through `files`, oldest first (`audit.jsonl.3 audit.jsonl.2 audit.jsonl.1
/// audit.jsonl`). Reports the first broken link with its position and the likely cause.
pub fn verify(files: &[PathBuf]) -> Result<VerifyReport, BrokenLink> {
    let mut report = VerifyReport {
        records: 0,
        first_seq: None,
        last_seq: None,
        last_hash: GENESIS.to_owned(),
        starts_mid_chain: false,
    };
    let mut lines = Lines::new(files).peekable();
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
        let h = hex(digest::digest(&digest::SHA256, &raw).as_ref());
        report.records += 1;
        report.last_seq = Some(seq);
        report.last_hash = h.clone();
        prev = Some((seq, h));
    }
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

//! The audit writer thread: serializes records by hand (fixed field order, RFC 8259 escaping),
//! chains them (hash or MAC), writes them in batches, rotates files, keeps the checkpoint, and
//! picks the chain up again from the last line after a restart.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use aws_lc_rs::digest;
use tokio::sync::mpsc;

use super::key::{AuditKey, close_with_mac, mac_matches, split_mac};
use super::{
    AuditConfig, AuditSink, CHECKPOINT_FORMAT, GENESIS, Record, field, hex, json_str,
    read_checkpoint,
};
use crate::facts::RequestId;

/// Where the writer is in the chain.
struct Chain {
    seq: u64,
    prev: String,
}

pub(super) struct Writer {
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
    pub(super) fn open(config: &AuditConfig, key: Option<Arc<AuditKey>>) -> io::Result<Self> {
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
        write_copies(out, f);
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
    pub(super) fn run(mut self, mut rx: mpsc::Receiver<Record>, healthy: Arc<AtomicBool>) {
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
pub(super) fn link_of(line: &[u8]) -> String {
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

/// What a request did with a multi-backend key's copies, only for such keys (single-backend
/// records keep their shape): `backends`, every backend it called, as
/// `kind#place` in the key's wrap list, in call order; `copy_served`, the envelope copy whose
/// data key opened it (`{"copy":i,"backend":kind}`); `copies_missing`, wrapping backends a new
/// data key went without (`require = "first"`).
fn write_copies(out: &mut Vec<u8>, f: &crate::facts::Facts) {
    use std::io::Write as _;
    let mut called: Vec<(crate::backend_kind::BackendKind, u8)> = Vec::new();
    for c in &f.backend_calls {
        if !called.contains(&(c.backend, c.wrap)) {
            called.push((c.backend, c.wrap));
        }
    }
    let multi = f.wraps > 1 || called.iter().any(|&(_, w)| w > 0);
    if !multi {
        return;
    }
    out.extend_from_slice(b",\"backends\":[");
    for (i, (kind, wrap)) in called.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        let _ = write!(out, "\"{}#{wrap}\"", kind.as_str());
    }
    out.push(b']');
    if let Some(c) = f.served_by {
        let _ = write!(
            out,
            ",\"copy_served\":{{\"copy\":{},\"backend\":\"{}\"}}",
            c.index,
            c.backend.as_str()
        );
    }
    if !f.missing_copies.is_empty() {
        out.extend_from_slice(b",\"copies_missing\":[");
        for (i, c) in f.missing_copies.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            let _ = write!(
                out,
                "{{\"wrap\":{},\"backend\":\"{}\"}}",
                c.index,
                c.backend.as_str()
            );
        }
        out.push(b']');
    }
}

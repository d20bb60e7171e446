//! The audit writer thread: serializes records by hand (fixed field order, RFC 8259 escaping),
//! chains them (hash or MAC), writes them in batches, rotates files, keeps the checkpoint, and
//! picks the chain up again from the last line after a restart.
//!
//! A file log may have more than one writer: several servers sharing one audit file, and
//! `keybroker keys …` recording a lifecycle change into the log a running server writes
//! ([`LifecycleLog`]). Each batch is therefore chained and appended under an exclusive lock on
//! `.<log>.lock`, after checking that the file is still the one (and the length) this writer last
//! left; if another writer appended or rotated meanwhile, the chain is picked up again from the
//! file's last line first. Without that, two writers would each link to their own last record
//! and the chain would break at the first interleaving.

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
    AuditConfig, AuditSink, CHECKPOINT_FORMAT, Entry, GENESIS, LifecycleRecord, Record, field, hex,
    json_str, read_checkpoint,
};
use crate::facts::RequestId;

/// Where the writer is in the chain.
#[derive(Clone)]
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
    /// `.<log>.lock`, held while a batch is chained and appended (regular-file logs only: a pipe
    /// or a device has one writer and no chain to pick up).
    lock: Option<File>,
    /// Whether the log is a regular file other writers may append to (then `lock` is set).
    shared: bool,
    /// (device, inode) of the file `file` is, to notice a rotation by another writer.
    file_id: Option<(u64, u64)>,
    /// The fsync of the file rotated away last, on its own thread (see [`Writer::rotate`]).
    syncing: Option<std::thread::JoinHandle<()>>,
}

/// A batch write this slow is logged: at 10,000 requests/s it queues 1,000 records.
const SLOW_WRITE: Duration = Duration::from_millis(100);

/// A writer that goes away (the server's at close, a `keys` command's at exit) first lets the
/// last rotated file's fsync finish, so that file is as durable as the one it closes.
impl Drop for Writer {
    fn drop(&mut self) {
        self.finish_sync();
    }
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
            lock: None,
            shared: false,
            file_id: None,
            syncing: None,
        };
        if let AuditSink::File(path) = &config.sink {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)?;
            }
            let regular = match std::fs::metadata(path) {
                Ok(m) => m.is_file(),
                Err(e) => e.kind() == io::ErrorKind::NotFound,
            };
            if regular {
                match open_lock(path) {
                    Ok(l) => {
                        w.lock = Some(l);
                        w.shared = true;
                    }
                    // Then this process is the log's only safe writer, as before locks.
                    Err(e) => tracing::warn!(log = %path.display(), error = %e,
                        "cannot open the audit log's lock file; other writers (keys commands, \
                         other servers) must not append to this log"),
                }
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
            let m = f.metadata()?;
            self.size = m.len();
            self.file_id = {
                use std::os::unix::fs::MetadataExt;
                Some((m.dev(), m.ino()))
            };
            self.file = Some(f);
        }
        Ok(())
    }

    /// Renames the full file away and opens a new one. The slow parts run on a thread of their
    /// own: the full file's fsync (up to `max_file_bytes` of dirty pages, seconds on a busy
    /// disk) and freeing the oldest file's blocks (an unlink of 100 MiB that is on disk takes
    /// tens of milliseconds, more while that fsync holds the journal). On the writer thread
    /// they held every request behind a full queue, and some were refused after
    /// `block_timeout`. The oldest file is opened before it is unlinked, so its blocks are
    /// freed when that thread closes it. One such thread at a time: a rotation first waits for
    /// the previous one (a whole file of writes ago), so a disk slower than the log slows the
    /// writer rather than piling up threads.
    fn rotate(&mut self) -> io::Result<()> {
        let AuditSink::File(path) = self.sink.clone() else {
            return Ok(());
        };
        let path = path.as_path();
        let started = std::time::Instant::now();
        self.finish_sync();
        let oldest = rotated(path, self.max_files);
        let doomed = if self.max_files == 0 {
            None
        } else {
            let doomed = File::open(&oldest).ok();
            match std::fs::remove_file(&oldest) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
            for i in (1..self.max_files).rev() {
                let from = rotated(path, i);
                if from.exists() {
                    std::fs::rename(&from, rotated(path, i + 1))?;
                }
            }
            doomed
        };
        // The full file is still open (and still `path`): fsync it and free the oldest one
        // off this thread, after it is renamed away and the new file is open.
        let full = self.file.take().filter(|_| self.max_files > 0);
        if self.max_files == 0 {
            std::fs::remove_file(path)?;
        } else {
            std::fs::rename(path, rotated(path, 1))?;
        }
        self.reopen()?;
        let Some(full) = full else {
            return Ok(());
        };
        let spawned = std::thread::Builder::new()
            .name("keybroker-audit-sync".into())
            .spawn(move || {
                let synced = std::time::Instant::now();
                match full.sync_all() {
                    Ok(()) => tracing::info!(took_ms = synced.elapsed().as_millis() as u64,
                        "rotated audit file synced"),
                    Err(e) => tracing::error!(error = %e,
                        "cannot fsync the rotated audit file; its last records may not survive a power loss"),
                }
                drop(doomed);
            });
        match spawned {
            Ok(h) => self.syncing = Some(h),
            // The files moved into the closure that did not run (and were closed with it):
            // sync the rotated file here instead.
            Err(e) => {
                tracing::warn!(error = %e, "cannot start the audit sync thread; syncing inline");
                if self.max_files > 0 {
                    File::open(rotated(path, 1))?.sync_all()?;
                }
            }
        }
        tracing::info!(
            took_ms = started.elapsed().as_millis() as u64,
            "audit log rotated"
        );
        Ok(())
    }

    /// Waits for the last rotated file's fsync, if one is running.
    fn finish_sync(&mut self) {
        if let Some(h) = self.syncing.take() {
            let _ = h.join();
        }
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
    fn serialize(&mut self, entry: &Entry, out: &mut Vec<u8>) {
        use std::io::Write as _;
        self.chain.seq += 1;
        let start = out.len();
        let _ = write!(out, "{{\"seq\":{},\"prev\":\"", self.chain.seq);
        out.extend_from_slice(self.chain.prev.as_bytes());
        out.extend_from_slice(b"\",\"time\":\"");
        match entry {
            Entry::Request(r) => {
                crate::util::write_rfc3339(r.time, out);
                out.push(b'"');
                request_fields(r, out);
            }
            Entry::Lifecycle(l) => {
                crate::util::write_rfc3339(l.time, out);
                out.push(b'"');
                super::lifecycle::write_fields(l, out);
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

    /// Holds `.<log>.lock` (if this log has one) while `f` runs. A lock that cannot be taken is
    /// logged and `f` runs anyway: the chain check at verify time still catches a collision.
    fn locked<T>(&mut self, f: impl FnOnce(&mut Self) -> T) -> T {
        let lock = self.lock.take();
        let held = lock.as_ref().map(|l| match l.lock() {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(error = %e, "cannot lock the audit log for appending");
                false
            }
        });
        let out = f(self);
        if let (Some(l), Some(true)) = (&lock, held) {
            let _ = l.unlock();
        }
        self.lock = lock;
        out
    }

    /// Under the lock: if another writer appended to or rotated the log since this one last
    /// wrote, continue the chain from the file's last line (and reopen the current file).
    fn resync(&mut self) -> io::Result<()> {
        use std::os::unix::fs::MetadataExt;
        let AuditSink::File(path) = &self.sink else {
            return Ok(());
        };
        if !self.shared {
            return Ok(());
        }
        let on_disk = match std::fs::metadata(path) {
            Ok(m) => Some((m.dev(), m.ino(), m.len())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        let ours = match (&self.file, self.file_id) {
            (Some(_), Some((dev, ino))) => Some((dev, ino, self.size)),
            _ => None,
        };
        if on_disk.is_some() && on_disk == ours {
            return Ok(());
        }
        let path = path.clone();
        for candidate in [path.clone(), rotated(&path, 1)] {
            if let Some(chain) = last_link(&candidate, self.key.as_deref())? {
                self.chain = chain;
                break;
            }
        }
        self.file = None;
        self.reopen()
    }

    /// Chains and appends `entries` as one write, under the log's lock, continuing another
    /// writer's chain first if there is one. On failure the chain is where it was (nothing of
    /// the batch is left in the file), so the caller can simply try again.
    fn append(&mut self, entries: &[Entry], buf: &mut Vec<u8>) -> io::Result<()> {
        self.locked(|w| {
            w.resync()?;
            let saved = w.chain.clone();
            buf.clear();
            for e in entries {
                w.serialize(e, buf);
            }
            match w.write(buf) {
                Ok(()) => {
                    w.checkpoint(false);
                    Ok(())
                }
                Err(e) => {
                    w.chain = saved;
                    Err(e)
                }
            }
        })
    }

    /// The writer thread: serializes, chains and writes records in batches, off the request
    /// threads (a stuck disk or pipe blocks only this thread; requests are then refused with
    /// AUDIT_UNAVAILABLE once the queue is full, instead of hanging). A short linger after each
    /// wake-up gathers records into bigger writes.
    pub(super) fn run(mut self, mut rx: mpsc::Receiver<Entry>, healthy: Arc<AtomicBool>) {
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
            // Keep the records until they are written; while the sink fails, requests are
            // refused (Required mode) and this retries.
            let mut backoff = Duration::from_millis(100);
            loop {
                let started = std::time::Instant::now();
                match self.append(&batch, &mut buf) {
                    Ok(()) => {
                        let took = started.elapsed();
                        if took >= SLOW_WRITE {
                            tracing::warn!(
                                took_ms = took.as_millis() as u64,
                                records = batch.len(),
                                "slow audit write: requests waited for the log's disk"
                            );
                        }
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
            batch.clear();
            buf.clear();
        }
        self.finish_sync();
        if let Some(f) = &self.file {
            let _ = f.sync_all();
        }
        self.checkpoint(true);
        tracing::info!(last_seq = self.chain.seq, last_hash = %self.chain.prev, "audit log closed");
    }
}

/// A request record's fields after `time` (docs/audit.md has the list).
fn request_fields(r: &Record, out: &mut Vec<u8>) {
    use std::io::Write as _;
    let f = &r.facts;
    out.extend_from_slice(b",\"request_id\":");
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
    if let Some(b) = f.batch {
        let _ = write!(
            out,
            ",\"batch\":{{\"item\":{},\"items\":{}}}",
            b.index, b.items
        );
    }
    if let Some(n) = f.segments {
        let _ = write!(out, ",\"segments\":{n}");
    }
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
}

/// `.audit.jsonl.lock` beside `audit.jsonl`: hidden, so that `audit.jsonl.*` (how the rotated
/// files are named, and globbed for `audit verify` and `audit report`) never matches it.
pub fn lock_path(log: &Path) -> PathBuf {
    let mut name = std::ffi::OsString::from(".");
    name.push(log.file_name().unwrap_or_default());
    name.push(".lock");
    log.with_file_name(name)
}

/// Opens (creating) the log's lock file, which every writer of one log file holds to append.
fn open_lock(log: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(lock_path(log))
}

/// A lifecycle change's way into a log that a running server may be writing at the same time
/// (`keybroker keys …`): appends under the log's lock after continuing the chain from the file,
/// exactly as the server's writer does, so both writers' records form one chain that
/// `audit verify` accepts. Opened before the change is made, so a log that cannot be written
/// (or a key file that cannot be read) stops the command before it changes anything.
pub struct LifecycleLog {
    writer: Writer,
}

impl LifecycleLog {
    /// The configured log, if it is a file (`None` when auditing is off or the sink is
    /// stdout, which belongs to the server process).
    pub fn open(config: &AuditConfig) -> io::Result<Option<Self>> {
        if !config.enabled || !matches!(config.sink, AuditSink::File(_)) {
            return Ok(None);
        }
        let key = match &config.key_file {
            Some(path) => Some(Arc::new(AuditKey::load(path)?)),
            None => None,
        };
        let writer = Writer::open(config, key)?;
        if !writer.shared {
            return Err(io::Error::other(
                "the audit log is not a regular file: only the server can write it",
            ));
        }
        Ok(Some(Self { writer }))
    }

    /// Appends the records (one write, synced to disk once the lock is released), waiting up to
    /// 10 s for the lock.
    pub fn append(&mut self, records: Vec<LifecycleRecord>) -> io::Result<()> {
        if records.is_empty() {
            return Ok(());
        }
        let w = &mut self.writer;
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let lock = w
            .lock
            .take()
            .ok_or_else(|| io::Error::other("audit log lock not open"))?;
        loop {
            match lock.try_lock() {
                Ok(()) => break,
                Err(std::fs::TryLockError::WouldBlock) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(std::fs::TryLockError::WouldBlock) => {
                    w.lock = Some(lock);
                    return Err(io::Error::other(
                        "the audit log stayed locked by another writer for 10 s",
                    ));
                }
                Err(std::fs::TryLockError::Error(e)) => {
                    w.lock = Some(lock);
                    return Err(e);
                }
            }
        }
        let entries: Vec<Entry> = records.into_iter().map(Entry::Lifecycle).collect();
        let mut buf = Vec::with_capacity(1024);
        let result: io::Result<()> = (|| {
            w.resync()?;
            for e in &entries {
                w.serialize(e, &mut buf);
            }
            w.write(&buf)?;
            w.checkpoint(true);
            Ok(())
        })();
        let _ = lock.unlock();
        w.lock = Some(lock);
        result?;
        // Synced after the lock is released: the fsync flushes the whole file (a running
        // server's records too, up to `max_file_bytes`), and a server waiting for the lock
        // meanwhile would hold its requests behind a full queue.
        match &w.file {
            Some(f) => f.sync_all(),
            None => Ok(()),
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{Actor, LifecycleEvent, verify};

    fn record(n: u32) -> LifecycleRecord {
        let mut r = LifecycleRecord::new(
            LifecycleEvent::Rotated,
            "k",
            Path::new("/keys/ring"),
            "command",
            Actor::cli(),
        );
        r.new_primary_version = Some(n);
        r
    }

    /// Two writers on one file, taking turns, each rotating the file when it fills: every record
    /// lands once and the files form one chain (each continued the other's, across rotations).
    #[test]
    fn two_writers_continue_each_others_chain_across_rotations() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let config = AuditConfig {
            sink: AuditSink::File(path.clone()),
            max_file_bytes: 4096,
            max_files: 100,
            ..AuditConfig::default()
        };
        let mut a = LifecycleLog::open(&config).unwrap().unwrap();
        let mut b = LifecycleLog::open(&config).unwrap().unwrap();
        for n in 0..60 {
            let w = if n % 3 == 0 { &mut a } else { &mut b };
            w.append(vec![record(n)]).unwrap();
        }
        let mut files: Vec<PathBuf> = (1..=100)
            .rev()
            .map(|n| rotated(&path, n))
            .filter(|p| p.exists())
            .collect();
        assert!(files.len() >= 3, "{files:?}");
        files.push(path.clone());
        let report = verify(&files).unwrap_or_else(|b| panic!("{b:?}"));
        assert_eq!(
            (report.records, report.first_seq, report.last_seq),
            (60, Some(1), Some(60))
        );
        assert!(lock_path(&path).exists());
        assert!(
            !lock_path(&path)
                .file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("audit.jsonl.")
        );
    }
}

//! `keybroker rewrap` (docs/lifecycle.md): moves ciphertexts to their key's current version
//! with ReEncrypt, so the plaintext never leaves the sidecar and the caller needs only a
//! `re_encrypt` grant (which cannot read data). Bounded concurrency, a rate limit, a progress
//! line on a terminal only, a summary, and resumability: what is already current is skipped
//! without a call, so a run killed half-way is finished by running it again.
//!
//! Must never print a ciphertext or any part of one, nor replace a file non-atomically (a kill
//! leaves each file either old or new, and both decrypt).

use std::collections::HashMap;
use std::io::{BufRead, IsTerminal, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use clap::Args;
use futures_util::StreamExt;

use super::ConnArgs;
use super::calls::{connect, context, request, status_error};
use crate::command::CliResult;
use crate::proto;

/// Largest ciphertext file read (the client's message limit).
const MAX_CIPHERTEXT: u64 = 64 << 20;

#[derive(Debug, Args)]
pub struct RewrapArgs {
    #[command(flatten)]
    pub conn: ConnArgs,
    /// Rewrap only ciphertexts under a version below this one (numeric versions, such as the
    /// local keyring's); default: every ciphertext not under its key's primary version.
    #[arg(long)]
    pub below: Option<u64>,
    /// ReEncrypt calls in flight at once (1 to 256).
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    /// Most ReEncrypt calls per second (0: no limit).
    #[arg(long, default_value_t = 100.0)]
    pub rate: f64,
    /// Files each holding one ciphertext (binary), rewritten in place; without files,
    /// ciphertexts are base64 lines on stdin, written to stdout in the same order.
    pub files: Vec<PathBuf>,
}

enum Item {
    File(PathBuf),
    Line(String),
}

#[derive(Default)]
struct Counts {
    rewrapped: AtomicU64,
    current: AtomicU64,
    failed: AtomicU64,
}

impl Counts {
    fn done(&self) -> u64 {
        self.rewrapped.load(Ordering::Relaxed)
            + self.current.load(Ordering::Relaxed)
            + self.failed.load(Ordering::Relaxed)
    }
}

/// Spaces calls `period` apart across all tasks: each takes the next free slot.
struct RateLimit {
    period: Option<Duration>,
    next: tokio::sync::Mutex<Instant>,
}

impl RateLimit {
    async fn wait(&self) {
        let Some(period) = self.period else { return };
        let slot = {
            let mut next = self.next.lock().await;
            let slot = (*next).max(Instant::now());
            *next = slot + period;
            slot
        };
        tokio::time::sleep_until(slot.into()).await;
    }
}

/// Whether a ciphertext is already where it should be, from its header alone.
fn is_current(bytes: &[u8], primaries: &HashMap<String, String>, below: Option<u64>) -> bool {
    let Ok(env) = crate::envelope::parse(bytes) else {
        return false;
    };
    let Some(first) = env.copies.first() else {
        return false;
    };
    match below {
        Some(min) => first.key_version.parse::<u64>().is_ok_and(|v| v >= min),
        None => primaries
            .get(env.key_name)
            .is_some_and(|p| p == first.key_version),
    }
}

pub fn run(args: RewrapArgs) -> CliResult {
    if !(1..=256).contains(&args.concurrency) {
        return Err("--concurrency must be 1 to 256".into());
    }
    if !(args.rate >= 0.0 && args.rate.is_finite()) {
        return Err("--rate must be a non-negative number of calls per second".into());
    }
    crate::command::runtime(2)?.block_on(rewrap(args))
}

async fn rewrap(args: RewrapArgs) -> CliResult {
    let started = Instant::now();
    let mut client = connect(&args.conn).await?;
    // Each key's primary version, to skip what is current without a call (keys the caller may
    // not list are rewrapped every time: ReEncrypt then decides).
    let listed = client
        .list_keys(request(&args.conn, proto::ListKeysRequest {})?)
        .await
        .map_err(status_error)?
        .into_inner();
    let primaries: HashMap<String, String> = listed
        .keys
        .into_iter()
        .filter(|k| !k.primary_version.is_empty())
        .map(|k| (k.name, k.primary_version))
        .collect();
    let items: Vec<Item> = if args.files.is_empty() {
        std::io::stdin()
            .lock()
            .lines()
            .collect::<Result<Vec<_>, _>>()?
            .into_iter()
            .map(Item::Line)
            .collect()
    } else {
        args.files.iter().cloned().map(Item::File).collect()
    };
    let total = items.len() as u64;
    let counts = Arc::new(Counts::default());
    let limit = RateLimit {
        period: (args.rate > 0.0).then(|| Duration::from_secs_f64(1.0 / args.rate)),
        next: tokio::sync::Mutex::new(Instant::now()),
    };
    let progress = std::io::stderr().is_terminal().then(|| {
        let counts = Arc::clone(&counts);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                eprint!("\rrewrap: {}/{total}", counts.done());
            }
        })
    });
    let ctx = context(&args.conn);
    let (conn, primaries, below) = (&args.conn, &primaries, args.below);
    let work = |(index, item): (usize, Item)| {
        let mut client = client.clone();
        let (counts, limit, ctx) = (&counts, &limit, &ctx);
        async move {
            let label = match &item {
                Item::File(p) => p.display().to_string(),
                Item::Line(_) => format!("line {}", index + 1),
            };
            let input = match &item {
                Item::File(p) => match std::fs::metadata(p) {
                    Ok(m) if m.len() > MAX_CIPHERTEXT => Err(format!(
                        "is {} bytes; ciphertexts are at most {MAX_CIPHERTEXT}",
                        m.len()
                    )),
                    Ok(_) => std::fs::read(p).map_err(|e| e.to_string()),
                    Err(e) => Err(e.to_string()),
                },
                Item::Line(l) => B64
                    .decode(l.trim())
                    .map_err(|_| "is not a base64 line".to_owned()),
            };
            let result: Result<Option<Vec<u8>>, String> = async {
                let bytes = input?;
                if is_current(&bytes, primaries, below) {
                    return Ok(None);
                }
                limit.wait().await;
                let msg = proto::ReEncryptRequest {
                    ciphertext: bytes.into(),
                    source_context: ctx.clone(),
                    destination_key: String::new(),
                    destination_context: ctx.clone(),
                };
                let req = request(conn, msg).map_err(|e| e.to_string())?;
                let out = client
                    .re_encrypt(req)
                    .await
                    .map_err(|s| status_error(s).to_string())?
                    .into_inner();
                if let Item::File(p) = &item {
                    let mode = std::fs::metadata(p)
                        .map(|m| m.permissions().mode() & 0o777)
                        .unwrap_or(0o600);
                    crate::util::write_atomic(p, &out.ciphertext, mode)
                        .map_err(|e| format!("cannot write: {e}"))?;
                }
                Ok(Some(out.ciphertext.to_vec()))
            }
            .await;
            let line = match (&item, result) {
                (_, Ok(None)) => {
                    counts.current.fetch_add(1, Ordering::Relaxed);
                    match item {
                        Item::Line(l) => Some(l),
                        Item::File(_) => None,
                    }
                }
                (_, Ok(Some(ct))) => {
                    counts.rewrapped.fetch_add(1, Ordering::Relaxed);
                    Some(B64.encode(ct))
                }
                (_, Err(e)) => {
                    counts.failed.fetch_add(1, Ordering::Relaxed);
                    eprintln!("rewrap: {label}: {e}");
                    match item {
                        Item::Line(l) => Some(l),
                        Item::File(_) => None,
                    }
                }
            };
            (index, line)
        }
    };
    let mut results: Vec<(usize, Option<String>)> =
        futures_util::stream::iter(items.into_iter().enumerate())
            .map(work)
            .buffer_unordered(args.concurrency)
            .collect()
            .await;
    if let Some(p) = progress {
        p.abort();
        eprintln!();
    }
    if args.files.is_empty() {
        // Lines come back in the order given (a line that failed is passed through unchanged).
        results.sort_by_key(|(i, _)| *i);
        let mut out = std::io::stdout().lock();
        for (_, line) in results {
            if let Some(l) = line {
                writeln!(out, "{l}")?;
            }
        }
        out.flush()?;
    }
    let (r, c, f) = (
        counts.rewrapped.load(Ordering::Relaxed),
        counts.current.load(Ordering::Relaxed),
        counts.failed.load(Ordering::Relaxed),
    );
    eprintln!(
        "rewrap: {total} ciphertext(s): {r} rewrapped, {c} already current (skipped), {f} failed, in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    if f > 0 {
        return Err(format!("{f} ciphertext(s) could not be rewrapped (see above)").into());
    }
    Ok(())
}

//! `keybroker audit verify`: walks the chain through the given files, checks every link (and
//! every MAC of a keyed log), and a checkpoint when given; reports the first broken link with
//! its place and the likely cause.

use std::fs::File;
use std::io::{self, BufRead};
use std::path::{Path, PathBuf};

use super::GENESIS;
use super::key::{AuditKey, mac_matches, split_mac};
use super::writer::link_of;

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
    let key = opts.key.as_ref();
    let mut walk = Walk {
        report: VerifyReport {
            records: 0,
            first_seq: None,
            last_seq: None,
            last_hash: GENESIS.to_owned(),
            starts_mid_chain: false,
            keyed_records: 0,
            checkpoint: None,
        },
        checkpoint: load_checkpoint(opts)?,
        checkpoint_seen: false,
        prev: None,
    };
    let mut lines = lines.peekable();
    while let Some(item) = lines.next() {
        let (file, n, raw) = item?;
        let broken = |seq: Option<u64>, problem: String| BrokenLink {
            file: file.clone(),
            line: n,
            seq,
            problem,
        };
        let (seq, prev_field) = parse_link(&raw).map_err(|p| broken(None, p))?;
        walk.check_mac(&raw, key)
            .map_err(|p| broken(Some(seq), p.into()))?;
        let next_seq = match lines.peek() {
            Some(Ok((_, _, next))) => parse_link(next).ok().map(|(s, _)| s),
            _ => None,
        };
        walk.check_link(seq, &prev_field, next_seq)
            .map_err(|p| broken(Some(seq), p))?;
        walk.advance(seq, link_of(&raw))
            .map_err(|p| broken(Some(seq), p.into()))?;
    }
    walk.finish(last_file, key.is_some())
}

/// Reads the checkpoint `verify` was given: it must exist (and authenticate, with a key).
fn load_checkpoint(opts: &VerifyOptions) -> Result<Option<Checkpoint>, BrokenLink> {
    let Some(path) = &opts.checkpoint else {
        return Ok(None);
    };
    let at = |problem: String| BrokenLink {
        file: path.clone(),
        line: 0,
        seq: None,
        problem,
    };
    match read_checkpoint(path, opts.key.as_ref()) {
        Ok(Some(c)) => Ok(Some(c)),
        Ok(None) => Err(at(
            "the checkpoint file does not exist (deleted, or never written)".into(),
        )),
        Err(e) => Err(at(e)),
    }
}

/// Where a verification is in the chain.
struct Walk {
    report: VerifyReport,
    checkpoint: Option<Checkpoint>,
    checkpoint_seen: bool,
    /// The previous record's seq and link.
    prev: Option<(u64, String)>,
}

impl Walk {
    /// A keyed log: every record from the first keyed one on carries a MAC that verifies.
    fn check_mac(&mut self, raw: &[u8], key: Option<&AuditKey>) -> Result<(), &'static str> {
        match (split_mac(raw), key) {
            (Some(_), None) => {
                Err("the record carries a MAC: this log is keyed, verify it with --key FILE")
            }
            (Some((covered, mac)), Some(k)) => {
                if !mac_matches(k, covered, mac) {
                    return Err(
                        "the record's MAC does not verify: edited, forged, or written under another key",
                    );
                }
                self.report.keyed_records += 1;
                Ok(())
            }
            (None, Some(_)) if self.report.keyed_records > 0 => Err(
                "a record without a MAC follows keyed records: inserted or edited (or the key was removed from the configuration)",
            ),
            (None, _) => Ok(()),
        }
    }

    /// The record follows the previous one: the next seq, and `prev` is its link. `next_seq`
    /// (the record after this one) tells a reorder from a deletion.
    fn check_link(
        &mut self,
        seq: u64,
        prev_field: &str,
        next_seq: Option<u64>,
    ) -> Result<(), String> {
        let Some((ps, h)) = &self.prev else {
            self.report.first_seq = Some(seq);
            self.report.starts_mid_chain = prev_field != GENESIS;
            return Ok(());
        };
        let ps = *ps;
        if seq <= ps {
            return Err(format!(
                "seq {seq} follows seq {ps}: records reordered, duplicated or inserted"
            ));
        }
        if seq > ps + 1 {
            return Err(if next_seq == Some(ps + 1) {
                format!(
                    "seq {seq} follows seq {ps} and seq {} comes after it: records reordered",
                    ps + 1
                )
            } else {
                format!(
                    "seq {seq} follows seq {ps}: {} record(s) deleted",
                    seq - ps - 1
                )
            });
        }
        if prev_field != h {
            return Err(format!(
                "prev hash does not match the record before it: seq {ps} was edited, or this record was inserted or edited"
            ));
        }
        Ok(())
    }

    /// Counts the record and moves the chain on; the record at the checkpoint's seq must be
    /// the one the checkpoint names.
    fn advance(&mut self, seq: u64, link: String) -> Result<(), &'static str> {
        if let Some(c) = &self.checkpoint
            && c.seq == seq
        {
            if c.link != link {
                return Err(
                    "the record at the checkpoint's seq is not the one the checkpoint names: the log was rewritten",
                );
            }
            self.checkpoint_seen = true;
        }
        self.report.records += 1;
        self.report.last_seq = Some(seq);
        self.report.last_hash = link.clone();
        self.prev = Some((seq, link));
        Ok(())
    }

    /// What only the end can show: a keyed log with no MAC at all, and a log cut short of its
    /// checkpoint.
    fn finish(mut self, last_file: PathBuf, keyed: bool) -> Result<VerifyReport, BrokenLink> {
        let report = &self.report;
        let end = |problem: String| BrokenLink {
            file: last_file.clone(),
            line: 0,
            seq: report.last_seq,
            problem,
        };
        if keyed && report.keyed_records == 0 && report.records > 0 {
            return Err(end(
                "no record carries a MAC: not a keyed log (or its keyed records were removed)"
                    .into(),
            ));
        }
        if let Some(c) = &self.checkpoint {
            let last = report.last_seq.unwrap_or(0);
            if c.seq > last {
                return Err(end(format!(
                    "the log ends at seq {last} but the checkpoint ({}) names seq {}: records were removed from the end (or newer files were not given)",
                    c.time, c.seq
                )));
            }
            if !self.checkpoint_seen {
                return Err(end(format!(
                    "the checkpoint's seq {} precedes the files given: give the file that holds it",
                    c.seq
                )));
            }
        }
        self.report.checkpoint = self.checkpoint;
        Ok(self.report)
    }
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
pub(super) struct Lines<'a> {
    files: std::slice::Iter<'a, PathBuf>,
    current: Option<(PathBuf, usize, io::Split<io::BufReader<File>>)>,
}

impl<'a> Lines<'a> {
    pub(super) fn new(files: &'a [PathBuf]) -> Self {
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
            assert_eq!(
                from_bytes,
                verify_with(std::slice::from_ref(&path), &opts),
                "{log:?}"
            );
        }
    }
}

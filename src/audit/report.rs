//! The usage report (`keybroker audit report`, docs/lifecycle.md): who used which key and
//! version, how often, with what results, first and last use, summarised from audit records
//! whose chain was verified first. It also feeds the deletion guard (`keys schedule-deletion`
//! refuses a key used within the window).
//!
//! Must never summarise a broken chain as if it were whole: the report carries the break, and
//! counts only the records before it.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::SystemTime;

use serde::Serialize;

use super::verify::{BrokenLink, Lines, VerifyOptions, verify_with};
use crate::util::parse_rfc3339;

/// One (key, version, caller, operation) and what happened to its requests.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct UsageRow {
    pub key: String,
    /// The backend's key id (the keyring key name for local keys).
    pub backend_key_id: String,
    /// Empty when the request failed before a version was known.
    pub key_version: String,
    pub caller: String,
    /// `re_encrypt_from` counts ReEncrypts whose data came from this key and version.
    pub operation: String,
    pub count: u64,
    /// Count per gRPC result code name (`OK`, `FAILED_PRECONDITION`, ...).
    pub results: BTreeMap<String, u64>,
    pub first_use: String,
    pub last_use: String,
}

/// One lifecycle record (`"kind":"lifecycle"`): a rotation, deletion or retirement. Listed
/// apart from the rows: a lifecycle change is not a use of the key.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct LifecycleRow {
    pub time: String,
    pub key: String,
    /// `rotated`, `deletion_scheduled`, `deletion_cancelled`, `purged`, `min_decrypt_version_set`.
    pub event: String,
    /// What changed, in words (`version 3 -> 4`, `destroyed at ...`, `min 0 -> 3`).
    pub detail: String,
    /// `scheduler` or `cli`, with the uid (and `$USER` when the record has it).
    pub actor: String,
    pub trigger: String,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct UsageReport {
    /// The whole chain verified (false: see `broken`; only the records before it are counted).
    pub verified: bool,
    pub broken: Option<String>,
    /// Records read (before the break) and how many of them fell in the window.
    pub records: u64,
    pub records_in_window: u64,
    /// RFC 3339 start of the window, if one was given.
    pub since: Option<String>,
    pub rows: Vec<UsageRow>,
    /// Lifecycle records in the window, in log order (not counted in `rows`).
    pub lifecycle: Vec<LifecycleRow>,
}

impl UsageReport {
    /// The last successful use of a key named `key` in the configuration or in its backend
    /// (as the key, or as a ReEncrypt's source).
    pub fn last_use(&self, key: &str) -> Option<SystemTime> {
        self.rows
            .iter()
            .filter(|r| r.key == key || r.backend_key_id == key)
            .filter(|r| r.results.get("OK").is_some_and(|n| *n > 0))
            .filter_map(|r| parse_rfc3339(&r.last_use))
            .max()
    }
}

fn broken_text(b: &BrokenLink) -> String {
    format!(
        "{}:{}{}: {}",
        b.file.display(),
        b.line,
        b.seq.map(|s| format!(" (seq {s})")).unwrap_or_default(),
        b.problem
    )
}

/// Verifies the chain through `files` (oldest first) and summarises records at or after
/// `since`. A broken chain is reported in the result, with the records before the break.
pub fn usage_report(
    files: &[PathBuf],
    opts: &VerifyOptions,
    since: Option<SystemTime>,
) -> UsageReport {
    let mut report = UsageReport {
        since: since.map(crate::util::rfc3339),
        ..UsageReport::default()
    };
    let stop = match verify_with(files, opts) {
        Ok(_) => {
            report.verified = true;
            None
        }
        Err(b) => {
            report.broken = Some(broken_text(&b));
            Some(b)
        }
    };
    type Row = (String, String, String, String, String);
    let mut rows: BTreeMap<Row, UsageRow> = BTreeMap::new();
    for item in Lines::new(files) {
        let Ok((file, line, raw)) = item else { break };
        if stop
            .as_ref()
            // A link names the record before it: that record may be the edited one, so the
            // count stops before it too.
            .is_some_and(|b| b.file == file && line + 1 >= b.line)
        {
            break;
        }
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(&raw) else {
            break;
        };
        report.records += 1;
        let time = v["time"].as_str().unwrap_or_default();
        if let Some(since) = since
            && parse_rfc3339(time).is_none_or(|t| t < since)
        {
            continue;
        }
        report.records_in_window += 1;
        let s = |f: &str| v[f].as_str().unwrap_or_default().to_owned();
        if v["kind"] == "lifecycle" {
            report.lifecycle.push(lifecycle_row(&v));
            continue;
        }
        let result = s("result");
        let mut add = |key: String, backend_key_id: String, version: String, operation: String| {
            let row = rows
                .entry((
                    key.clone(),
                    version.clone(),
                    s("caller"),
                    operation.clone(),
                    backend_key_id.clone(),
                ))
                .or_insert_with(|| UsageRow {
                    key,
                    backend_key_id,
                    key_version: version,
                    caller: s("caller"),
                    operation,
                    first_use: time.to_owned(),
                    ..UsageRow::default()
                });
            row.count += 1;
            *row.results.entry(result.clone()).or_default() += 1;
            // Records are in time order; keep min/max anyway (a clock stepped back).
            if time < row.first_use.as_str() {
                row.first_use = time.to_owned();
            }
            if time > row.last_use.as_str() {
                row.last_use = time.to_owned();
            }
        };
        add(
            s("key"),
            s("backend_key_id"),
            s("key_version"),
            s("operation"),
        );
        if !s("source_key").is_empty() {
            add(
                s("source_key"),
                String::new(),
                s("source_key_version"),
                "re_encrypt_from".to_owned(),
            );
        }
    }
    report.rows = rows.into_values().collect();
    report
}

fn lifecycle_row(v: &serde_json::Value) -> LifecycleRow {
    let s = |f: &str| v[f].as_str().unwrap_or_default().to_owned();
    let n = |f: &str| v[f].as_u64();
    let change = |what: &str, old: Option<u64>, new: Option<u64>| match (old, new) {
        (Some(o), Some(n)) => format!("{what} {o} -> {n}"),
        (None, Some(n)) => format!("{what} -> {n}"),
        _ => String::new(),
    };
    let detail = match s("event").as_str() {
        "rotated" => change(
            "primary",
            n("old_primary_version"),
            n("new_primary_version"),
        ),
        "deletion_scheduled" => format!(
            "destroyed at {}{}",
            s("deletion_time"),
            if v["forced"] == true {
                " (--force)"
            } else {
                ""
            }
        ),
        "min_decrypt_version_set" => change(
            "min_decrypt_version",
            n("old_min_decrypt_version"),
            n("new_min_decrypt_version"),
        ),
        _ => String::new(),
    };
    let a = &v["actor"];
    let actor = format!(
        "{} (uid {}{})",
        a["kind"].as_str().unwrap_or("?"),
        a["uid"]
            .as_u64()
            .map(|u| u.to_string())
            .unwrap_or("?".into()),
        a["user"]
            .as_str()
            .map(|u| format!(", {u}"))
            .unwrap_or_default()
    );
    LifecycleRow {
        time: s("time"),
        key: s("key"),
        event: s("event"),
        detail,
        actor,
        trigger: s("trigger"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(lines: &[(&str, &str, &str, &str, &str)]) -> Vec<u8> {
        use aws_lc_rs::digest;
        let mut prev = super::super::GENESIS.to_owned();
        let mut out = Vec::new();
        for (i, (time, caller, op, key, result)) in lines.iter().enumerate() {
            let line = format!(
                r#"{{"seq":{},"prev":"{prev}","time":"{time}","caller":"{caller}","operation":"{op}","key":"{key}","key_version":"1","result":"{result}"}}"#,
                i + 1
            );
            let d = digest::digest(&digest::SHA256, line.as_bytes());
            prev = d.as_ref().iter().map(|b| format!("{b:02x}")).collect();
            out.extend_from_slice(line.as_bytes());
            out.push(b'\n');
        }
        out
    }

    #[test]
    fn counts_by_key_version_caller_operation_and_reports_breaks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let log = chain(&[
            ("2026-11-01T00:00:00.000000Z", "a", "encrypt", "k", "OK"),
            ("2026-11-02T00:00:00.000000Z", "a", "encrypt", "k", "OK"),
            (
                "2026-11-03T00:00:00.000000Z",
                "b",
                "decrypt",
                "k",
                "PERMISSION_DENIED",
            ),
            ("2026-11-04T00:00:00.000000Z", "a", "encrypt", "k", "OK"),
        ]);
        std::fs::write(&path, &log).unwrap();
        let files = vec![path.clone()];
        let r = usage_report(&files, &VerifyOptions::default(), None);
        assert!(r.verified, "{:?}", r.broken);
        assert_eq!(r.records, 4);
        assert_eq!(r.rows.len(), 2);
        let enc = &r.rows[0];
        assert_eq!((enc.caller.as_str(), enc.count), ("a", 3));
        assert_eq!(enc.first_use, "2026-11-01T00:00:00.000000Z");
        assert_eq!(enc.last_use, "2026-11-04T00:00:00.000000Z");
        assert_eq!(r.rows[1].results["PERMISSION_DENIED"], 1);
        assert_eq!(
            r.last_use("k"),
            parse_rfc3339("2026-11-04T00:00:00.000000Z")
        );
        let since = parse_rfc3339("2026-11-02T12:00:00Z");
        let r = usage_report(&files, &VerifyOptions::default(), since);
        assert_eq!((r.records, r.records_in_window), (4, 2));

        // Edit the third record: the report says where the chain broke and counts only before.
        let text = String::from_utf8(log)
            .unwrap()
            .replacen("\"b\"", "\"c\"", 1);
        std::fs::write(&path, text).unwrap();
        let r = usage_report(&files, &VerifyOptions::default(), None);
        assert!(!r.verified);
        assert!(
            r.broken.as_deref().unwrap().contains("audit.jsonl:"),
            "{:?}",
            r.broken
        );
        assert_eq!(
            r.records, 2,
            "the edited record and those after it are not counted"
        );
    }
}

//! The key lifecycle commands (docs/lifecycle.md): `keys` scheduling, retirement and deletion
//! on a local keyring, and `audit report`. Tools for key administrators: applications only
//! hold encrypt/decrypt grants and never run these.
//!
//! Must never print key material (only names, versions and times), and never schedule a
//! deletion the audit log argues against without `--force`.
//!
//! With `--config` naming a file audit log, every change here (rotate, schedule/cancel
//! deletion, purge, set-min-decrypt-version) is recorded in it as a lifecycle record, appended
//! under the log's lock so that it chains with what a running server writes. The log is opened
//! before the change: a log (or audit key) that cannot be written stops the command first.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use clap::Subcommand;

use crate::audit::{
    Actor, AuditKey, AuditSink, LifecycleEvent, LifecycleLog, LifecycleRecord, UsageReport,
    VerifyOptions, rotated, usage_report,
};
use crate::command::CliResult;
use crate::config::Config;
use crate::keyring::{self, Keyring, RingKey};
use crate::util::{format_duration, parse_duration, rfc3339};

#[derive(Debug, Subcommand)]
pub enum LifecycleCmd {
    /// Show one key's versions and lifecycle (no key material).
    Describe { name: String },
    /// Set (`365d`) or clear (`off`) a key's automatic rotation period.
    SetRotation { name: String, period: String },
    /// Retire the versions below VERSION for decryption (0: none). Rewrap the data first.
    SetMinDecryptVersion { name: String, version: u32 },
    /// Schedule a key's destruction (every use fails until then; cancel restores it).
    ScheduleDeletion {
        name: String,
        /// The window before destruction (at least 7d).
        #[arg(long = "in", default_value = "30d")]
        window: String,
        /// Audit log files, oldest first, to check that the key was not used within the
        /// window (default: the configuration's [audit] file and its rotated files).
        #[arg(long = "audit")]
        audit: Vec<PathBuf>,
        /// The audit key file of a keyed log (default: the configuration's [audit] key_file).
        #[arg(long)]
        audit_key: Option<PathBuf>,
        /// Schedule even when the key was used within the window or no audit log was found.
        #[arg(long)]
        force: bool,
    },
    /// Cancel a scheduled deletion: the key works again exactly as before.
    CancelDeletion { name: String },
    /// Destroy keys whose deletion window has ended (all of them, or NAME).
    Purge { name: Option<String> },
}

fn period_of(s: &str) -> Result<Option<std::time::Duration>, String> {
    match s {
        "off" | "none" | "" => Ok(None),
        p => parse_duration(p).map(Some),
    }
}

/// Where this command records its changes: the configuration's audit log, if it is a file.
struct Trail {
    log: Option<LifecycleLog>,
    keyring: PathBuf,
}

impl Trail {
    fn open(keyring: &Path, config: Option<&Config>) -> Result<Self, String> {
        let log = match config {
            Some(c) if c.audit.enabled => match &c.audit.sink {
                AuditSink::File(p) => Some(
                    LifecycleLog::open(&c.audit)
                        .map_err(|e| {
                            format!(
                                "cannot record this change in the audit log {}: {e} (nothing was changed)",
                                p.display()
                            )
                        })?
                        .ok_or("the audit log is not a file")?,
                ),
                AuditSink::Stdout => {
                    eprintln!(
                        "note: the configured audit log is the server's stdout; this change is \
                         not recorded in it (configure [audit] path to record lifecycle changes)"
                    );
                    None
                }
            },
            _ => None,
        };
        Ok(Self {
            log,
            keyring: keyring.to_owned(),
        })
    }

    fn record(&self, event: LifecycleEvent, key: &str, trigger: &'static str) -> LifecycleRecord {
        LifecycleRecord::new(event, key, &self.keyring, trigger, Actor::cli())
    }

    fn append(&mut self, records: Vec<LifecycleRecord>) -> CliResult {
        if let Some(log) = &mut self.log {
            log.append(records).map_err(|e| {
                format!("the change was made, but its audit record could not be written: {e}")
            })?;
        }
        Ok(())
    }
}

/// `keys create --rotation-period`.
pub fn create(path: &Path, name: &str, rotation: Option<&str>) -> CliResult {
    let period = rotation.map(period_of).transpose()?.flatten();
    keyring::edit(path, true, |r| {
        r.create_key(name)?;
        r.set_rotation_period(name, period)
    })?;
    println!("created key {name:?} (version 1) in {}", path.display());
    Ok(())
}

/// `keys rotate [NAME] [--if-due]`: what a CronJob runs; with `--if-due` only keys whose
/// period has passed rotate (decided under the lock: concurrent runs rotate once).
pub fn rotate(path: &Path, config: Option<&Config>, name: Option<&str>, if_due: bool) -> CliResult {
    let mut trail = Trail::open(path, config)?;
    if !if_due {
        let name = name.ok_or("keys rotate: name the key (or pass --if-due)")?;
        let (old, v) = keyring::edit(path, false, |r| {
            let old = r.keys.get(name).map(|k| k.primary);
            Ok((old, r.rotate_key(name)?))
        })?;
        println!("rotated key {name:?}: version {v} is now primary");
        let mut rec = trail.record(LifecycleEvent::Rotated, name, "command");
        rec.old_primary_version = old;
        rec.new_primary_version = Some(v);
        return trail.append(vec![rec]);
    }
    let now = SystemTime::now();
    let done = keyring::edit_if(path, false, |r| {
        let before: std::collections::HashMap<String, u32> =
            r.keys.iter().map(|(n, k)| (n.clone(), k.primary)).collect();
        let rotated = r.rotate_due(name, now)?;
        Ok((!rotated.is_empty()).then_some((before, rotated)))
    })?;
    match done {
        None => println!("no key is due for rotation"),
        Some((before, rotated)) => {
            let mut records = Vec::new();
            for (key, v) in rotated {
                let mut rec = trail.record(LifecycleEvent::Rotated, &key, "if_due");
                rec.old_primary_version = before.get(&key).copied();
                rec.new_primary_version = Some(v);
                records.push(rec);
                tracing::info!(
                    key,
                    version = v,
                    event = "scheduled_rotation",
                    "rotated key"
                );
                println!("rotated key {key:?}: version {v} is now primary (rotation was due)");
            }
            trail.append(records)?;
        }
    }
    Ok(())
}

fn when(t: Option<SystemTime>) -> String {
    t.map(rfc3339).unwrap_or_else(|| "-".into())
}

fn age(k: &RingKey, now: SystemTime) -> String {
    k.primary_created()
        .and_then(|c| now.duration_since(c).ok())
        .map(|d| format_duration(std::time::Duration::from_secs(d.as_secs())))
        .unwrap_or_else(|| "-".into())
}

fn state(k: &RingKey) -> &'static str {
    match (k.enabled, k.delete_after.is_some()) {
        (_, true) => "pending-deletion",
        (true, false) => "enabled",
        (false, false) => "disabled",
    }
}

/// `keys list`: one line per key with its schedule.
pub fn list(path: &Path) -> CliResult {
    let ring = Keyring::load(path)?;
    let now = SystemTime::now();
    println!(
        "{:<28} {:<16} {:>7} {:>8} {:>9} {:>9}  {:<27} {:>7}  CREATED",
        "NAME", "STATE", "PRIMARY", "VERSIONS", "AGE", "ROTATION", "NEXT ROTATION", "MIN-DEC"
    );
    for (name, k) in &ring.keys {
        println!(
            "{name:<28} {:<16} {:>7} {:>8} {:>9} {:>9}  {:<27} {:>7}  {}",
            state(k),
            k.primary,
            k.versions.len(),
            age(k, now),
            k.rotation_period
                .map(format_duration)
                .unwrap_or_else(|| "manual".into()),
            when(k.next_rotation()),
            if k.min_decrypt_version > 0 {
                k.min_decrypt_version.to_string()
            } else {
                "-".into()
            },
            ring.created(name).unwrap_or(""),
        );
    }
    Ok(())
}

/// `keys describe NAME`.
pub fn describe(path: &Path, name: &str) -> CliResult {
    let ring = Keyring::load(path)?;
    let k = ring
        .keys
        .get(name)
        .ok_or_else(|| keyring::KeyringError::NoSuchKey(name.to_owned()))?;
    let now = SystemTime::now();
    println!("key:                 {name}");
    println!("state:               {}", state(k));
    println!("primary version:     {}", k.primary);
    println!("primary age:         {}", age(k, now));
    println!(
        "rotation period:     {}",
        k.rotation_period
            .map(format_duration)
            .unwrap_or_else(|| "none (manual rotation only)".into())
    );
    let next = k.next_rotation();
    println!(
        "next rotation:       {}{}",
        when(next),
        if next.is_some_and(|n| n <= now) {
            " (overdue)"
        } else {
            ""
        }
    );
    println!(
        "min decrypt version: {}",
        if k.min_decrypt_version > 0 {
            k.min_decrypt_version.to_string()
        } else {
            "none (every version decrypts)".into()
        }
    );
    if let Some(at) = k.delete_after {
        println!(
            "deletion:            scheduled; destroyed at {}",
            rfc3339(at)
        );
    }
    println!("versions:");
    for (v, kv) in &k.versions {
        let mut notes = Vec::new();
        if *v == k.primary {
            notes.push("primary");
        }
        if *v < k.min_decrypt_version {
            notes.push("retired");
        }
        println!("  {v:>5}  created {}  {}", kv.created, notes.join(", "));
    }
    Ok(())
}

/// The audit files a deletion guard reads when none are named: the configured file sink and
/// its rotated files, oldest first.
fn configured_audit_files(config: Option<&Config>) -> (Vec<PathBuf>, Option<PathBuf>) {
    let Some(c) = config else {
        return (Vec::new(), None);
    };
    let AuditSink::File(path) = &c.audit.sink else {
        return (Vec::new(), c.audit.key_file.clone());
    };
    let mut files: Vec<PathBuf> = (1..=c.audit.max_files)
        .rev()
        .map(|n| rotated(path, n))
        .filter(|p| p.exists())
        .collect();
    if path.exists() {
        files.push(path.clone());
    }
    (files, c.audit.key_file.clone())
}

fn report_for(
    files: &[PathBuf],
    key: Option<&Path>,
    since: Option<SystemTime>,
) -> Result<UsageReport, String> {
    let key = key
        .map(AuditKey::load)
        .transpose()
        .map_err(|e| e.to_string())?;
    Ok(usage_report(
        files,
        &VerifyOptions {
            key,
            checkpoint: None,
        },
        since,
    ))
}

pub fn run(path: &Path, config: Option<&Config>, cmd: LifecycleCmd) -> CliResult {
    let records_changes = matches!(
        cmd,
        LifecycleCmd::SetMinDecryptVersion { .. }
            | LifecycleCmd::ScheduleDeletion { .. }
            | LifecycleCmd::CancelDeletion { .. }
            | LifecycleCmd::Purge { .. }
    );
    let mut trail = if records_changes {
        Trail::open(path, config)?
    } else {
        Trail {
            log: None,
            keyring: path.to_owned(),
        }
    };
    match cmd {
        LifecycleCmd::Describe { name } => describe(path, &name)?,
        LifecycleCmd::SetRotation { name, period } => {
            let p = period_of(&period)?;
            keyring::edit(path, false, |r| r.set_rotation_period(&name, p))?;
            match p {
                Some(p) => println!("key {name:?} rotates every {}", format_duration(p)),
                None => println!("key {name:?} rotates manually only"),
            }
        }
        LifecycleCmd::SetMinDecryptVersion { name, version } => {
            let old = keyring::edit(path, false, |r| {
                let old = r.keys.get(&name).map(|k| k.min_decrypt_version);
                r.set_min_decrypt_version(&name, version)?;
                Ok(old)
            })?;
            tracing::info!(
                key = name,
                min_decrypt_version = version,
                event = "retire_versions"
            );
            println!("key {name:?}: versions below {version} no longer decrypt");
            let mut rec = trail.record(LifecycleEvent::MinDecryptVersionSet, &name, "command");
            rec.old_min_decrypt_version = old;
            rec.new_min_decrypt_version = Some(version);
            trail.append(vec![rec])?;
        }
        LifecycleCmd::ScheduleDeletion {
            name,
            window,
            audit,
            audit_key,
            force,
        } => {
            let window = parse_duration(&window)?;
            if window < keyring::MIN_DELETION_WINDOW {
                return Err("the deletion window must be at least 7d (as in the clouds)".into());
            }
            let now = SystemTime::now();
            // The guard: refuse a key the audit log shows in use within the window.
            let (default_files, default_key) = configured_audit_files(config);
            let (files, key) = if audit.is_empty() {
                (default_files, audit_key.or(default_key))
            } else {
                (audit, audit_key)
            };
            if files.is_empty() {
                if !force {
                    return Err(format!(
                        "no audit log to check that key {name:?} is unused; name the files with \
                         --audit (or schedule anyway with --force)"
                    )
                    .into());
                }
            } else {
                let since = now.checked_sub(window);
                let report = report_for(&files, key.as_deref(), since)?;
                if let Some(b) = &report.broken {
                    if !force {
                        return Err(format!(
                            "the audit log's chain is broken ({b}): it cannot show the key is \
                             unused; repair the evidence or use --force"
                        )
                        .into());
                    }
                    eprintln!("warning: audit chain broken ({b}); scheduling anyway (--force)");
                }
                if let Some(last) = report.last_use(&name) {
                    if !force {
                        return Err(format!(
                            "key {name:?} was used at {} (within the last {}): find its users with \
                             `keybroker audit report`, or schedule anyway with --force",
                            rfc3339(last),
                            format_duration(window)
                        )
                        .into());
                    }
                    eprintln!(
                        "warning: key {name:?} was used at {}; scheduling anyway (--force)",
                        rfc3339(last)
                    );
                }
            }
            let at = now + window;
            keyring::edit(path, false, |r| r.schedule_deletion(&name, at, now))?;
            tracing::warn!(key = name, delete_after = %rfc3339(at), force, event = "schedule_deletion");
            println!(
                "key {name:?} is pending deletion: every use now fails; destroyed at {} \
                 (cancel with `keybroker keys cancel-deletion {name}`)",
                rfc3339(at)
            );
            let mut rec = trail.record(LifecycleEvent::DeletionScheduled, &name, "command");
            rec.deletion_time = Some(at);
            rec.forced = force;
            trail.append(vec![rec])?;
        }
        LifecycleCmd::CancelDeletion { name } => {
            keyring::edit(path, false, |r| r.cancel_deletion(&name))?;
            tracing::info!(key = name, event = "cancel_deletion");
            println!("deletion of key {name:?} cancelled; it works as before");
            let rec = trail.record(LifecycleEvent::DeletionCancelled, &name, "command");
            trail.append(vec![rec])?;
        }
        LifecycleCmd::Purge { name } => {
            let now = SystemTime::now();
            let purged = keyring::edit_if(path, false, |r| {
                let p = r.purge_due(name.as_deref(), now)?;
                Ok((!p.is_empty()).then_some(p))
            })?;
            match purged {
                None => println!("no key's deletion window has ended"),
                Some(p) => {
                    let mut records = Vec::new();
                    for k in p {
                        tracing::warn!(key = k, event = "purged", "destroyed key");
                        println!("destroyed key {k:?}: its data can no longer be decrypted");
                        records.push(trail.record(LifecycleEvent::Purged, &k, "command"));
                    }
                    trail.append(records)?;
                }
            }
        }
    }
    Ok(())
}

/// `keybroker audit report`.
pub fn audit_report(
    files: &[PathBuf],
    key: Option<&Path>,
    since: Option<&str>,
    json: bool,
) -> Result<bool, Box<dyn std::error::Error>> {
    let since = since.map(parse_duration).transpose()?.map(|d| {
        SystemTime::now()
            .checked_sub(d)
            .unwrap_or(SystemTime::UNIX_EPOCH)
    });
    let report = report_for(files, key, since)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        if let Some(b) = &report.broken {
            println!("CHAIN BROKEN at {b}");
            println!(
                "  only the records before the break are counted below; they are not the whole log"
            );
        }
        println!(
            "{} record(s) read, {} in the window{}",
            report.records,
            report.records_in_window,
            report
                .since
                .as_ref()
                .map(|s| format!(" (since {s})"))
                .unwrap_or_default()
        );
        println!(
            "{:<24} {:>8} {:<20} {:<18} {:>7}  {:<28} {:<27} {:<27}",
            "KEY", "VERSION", "CALLER", "OPERATION", "COUNT", "RESULTS", "FIRST USE", "LAST USE"
        );
        for r in &report.rows {
            let results: Vec<String> = r.results.iter().map(|(c, n)| format!("{c}={n}")).collect();
            println!(
                "{:<24} {:>8} {:<20} {:<18} {:>7}  {:<28} {:<27} {:<27}",
                r.key,
                if r.key_version.is_empty() {
                    "-"
                } else {
                    &r.key_version
                },
                r.caller,
                r.operation,
                r.count,
                results.join(","),
                r.first_use,
                r.last_use
            );
        }
        if !report.lifecycle.is_empty() {
            println!();
            println!(
                "lifecycle events ({}; not uses of the key):",
                report.lifecycle.len()
            );
            println!(
                "{:<27} {:<24} {:<24} {:<40} ACTOR",
                "TIME", "KEY", "EVENT", "DETAIL"
            );
            for e in &report.lifecycle {
                println!(
                    "{:<27} {:<24} {:<24} {:<40} {} [{}]",
                    e.time,
                    e.key,
                    e.event.replace('_', " "),
                    e.detail,
                    e.actor,
                    e.trigger
                );
            }
        }
    }
    Ok(report.verified)
}

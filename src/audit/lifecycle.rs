//! Lifecycle records: the audit log's second record kind (`"kind":"lifecycle"`), written when a
//! key's lifecycle changes — a rotation by a server's scheduler or by `keys rotate`, a deletion
//! scheduled, cancelled or carried out, versions retired — so the log answers "when did this key
//! rotate, who retired that version" as it answers "who used it" (docs/audit.md).
//!
//! They chain exactly like request records (the verifier reads only `seq`, `prev` and `mac`).
//! Must never carry key material: names, version numbers, times and who acted, nothing else.

use std::io::Write as _;
use std::time::SystemTime;

use super::{field, json_str};

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
    /// `keys schedule-deletion --force` overrode the deletion guard.
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
            keyring: keyring.display().to_string(),
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

    /// The record's fields after `seq`, `prev` and `time` (the writer adds those and closes it).
    pub(super) fn write_fields(&self, out: &mut Vec<u8>) {
        field(out, "kind", Some("lifecycle"));
        field(out, "event", Some(self.event.as_str()));
        field(out, "key", Some(&self.key));
        field(out, "backend", Some("local"));
        field(out, "keyring", Some(&self.keyring));
        field(out, "trigger", Some(self.trigger));
        for (name, v) in [
            ("old_primary_version", self.old_primary_version),
            ("new_primary_version", self.new_primary_version),
            ("old_min_decrypt_version", self.old_min_decrypt_version),
            ("new_min_decrypt_version", self.new_min_decrypt_version),
        ] {
            if let Some(v) = v {
                let _ = write!(out, ",\"{name}\":{v}");
            }
        }
        if let Some(t) = self.deletion_time {
            out.extend_from_slice(b",\"deletion_time\":\"");
            crate::util::write_rfc3339(t, out);
            out.push(b'"');
        }
        if self.forced {
            out.extend_from_slice(b",\"forced\":true");
        }
        out.extend_from_slice(b",\"actor\":{\"kind\":");
        json_str(out, self.actor.kind);
        let _ = write!(out, ",\"uid\":{}", self.actor.uid);
        if let Some(u) = &self.actor.user {
            out.extend_from_slice(b",\"user\":");
            json_str(out, u);
        }
        let _ = write!(out, ",\"pid\":{}}}", self.actor.pid);
    }
}

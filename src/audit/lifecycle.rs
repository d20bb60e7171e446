//! Lifecycle records: the audit log's second record kind (`"kind":"lifecycle"`), written when a
//! key's lifecycle changes — a rotation by a server's scheduler or by `keys rotate`, a deletion
//! scheduled, cancelled or carried out, versions retired — so the log answers "when did this key
//! rotate, who retired that version" as it answers "who used it" (docs/audit.md). The record
//! itself ([`LifecycleRecord`]) is a fact kept in `facts`, below the keyring scheduler that
//! makes it; this module writes it and lets the scheduler reserve room for it.
//!
//! They chain exactly like request records (the verifier reads only `seq`, `prev` and `mac`).
//! Must never carry key material: names, version numbers, times and who acted, nothing else.

use std::io::Write as _;

use super::{Auditor, field, json_str};
use crate::backend::local::{LifecycleSink, LifecycleSlot};
use crate::facts::LifecycleRecord;

/// The scheduler reserves its records' slots like a request (`reserve_blocking`): in Required
/// mode a full or failing log refuses, and the change waits for the next poll.
impl LifecycleSink for Auditor {
    fn reserve(&self, n: usize) -> Result<Vec<LifecycleSlot>, String> {
        (0..n)
            .map(|_| {
                self.reserve_blocking()
                    .map(|slot| -> LifecycleSlot { Box::new(move |r| slot.send_lifecycle(r)) })
                    .map_err(|e| e.to_string())
            })
            .collect()
    }
}

/// The record's fields after `seq`, `prev` and `time` (the writer adds those and closes it).
pub(super) fn write_fields(r: &LifecycleRecord, out: &mut Vec<u8>) {
    field(out, "kind", Some("lifecycle"));
    field(out, "event", Some(r.event.as_str()));
    field(out, "key", Some(&r.key));
    field(out, "backend", Some("local"));
    field(out, "keyring", Some(&r.keyring));
    field(out, "trigger", Some(r.trigger));
    for (name, v) in [
        ("old_primary_version", r.old_primary_version),
        ("new_primary_version", r.new_primary_version),
        ("old_min_decrypt_version", r.old_min_decrypt_version),
        ("new_min_decrypt_version", r.new_min_decrypt_version),
    ] {
        if let Some(v) = v {
            let _ = write!(out, ",\"{name}\":{v}");
        }
    }
    if let Some(t) = r.deletion_time {
        out.extend_from_slice(b",\"deletion_time\":\"");
        crate::util::write_rfc3339(t, out);
        out.push(b'"');
    }
    if r.forced {
        out.extend_from_slice(b",\"forced\":true");
    }
    out.extend_from_slice(b",\"actor\":{\"kind\":");
    json_str(out, r.actor.kind);
    let _ = write!(out, ",\"uid\":{}", r.actor.uid);
    if let Some(u) = &r.actor.user {
        out.extend_from_slice(b",\"user\":");
        json_str(out, u);
    }
    let _ = write!(out, ",\"pid\":{}}}", r.actor.pid);
}

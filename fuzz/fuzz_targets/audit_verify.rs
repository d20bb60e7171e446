//! The audit-log verifier on untrusted bytes: `keybroker::audit::verify_bytes` (what `keybroker
//! audit verify` runs on each file's lines), unkeyed and with a fixed audit key (the keyed seeds
//! in fuzz/seeds/audit_verify were written under it). A log that verifies has one record per
//! line; a problem report stays short.

#![no_main]

use std::path::Path;
use std::sync::OnceLock;

use keybroker::audit::{self, AuditKey, VerifyOptions};
use keybroker_fuzz::bounded;
use libfuzzer_sys::fuzz_target;

/// The key file bytes of the keyed seed logs.
pub const SEED_AUDIT_KEY: [u8; 32] = *b"keybroker fuzz seed audit key 32";

fn options() -> &'static [VerifyOptions; 2] {
    static OPTIONS: OnceLock<[VerifyOptions; 2]> = OnceLock::new();
    OPTIONS.get_or_init(|| {
        [
            VerifyOptions::default(),
            VerifyOptions {
                key: Some(AuditKey::from_bytes(&SEED_AUDIT_KEY).expect("audit key")),
                checkpoint: None,
            },
        ]
    })
}

fuzz_target!(
    init: {
        options();
    },
    |data: &[u8]| {
        let options = options();
        bounded(data.len(), || {
            for opts in options {
                match audit::verify_bytes(Path::new("audit.jsonl"), data, opts) {
                    Ok(report) => {
                        let lines = data.split(|&b| b == b'\n').count()
                            - usize::from(data.is_empty() || data.ends_with(b"\n"));
                        assert_eq!(report.records as usize, lines);
                    }
                    Err(broken) => assert!(broken.problem.len() <= 512, "long problem report"),
                }
            }
        });
    }
);

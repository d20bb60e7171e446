//! `keybroker inject file` on untrusted YAML: `keybroker::inject::file::inject_text` (which
//! parses with `parse_documents`, splits documents and mutates every pod template), for both
//! triggers. What it injected is injected for good: running it again on its own output must
//! succeed and inject nothing more.

#![no_main]

use std::sync::OnceLock;

use keybroker::inject::Settings;
use keybroker::inject::file;
use keybroker::inject::mutate::Trigger;
use keybroker_fuzz::bounded;
use libfuzzer_sys::fuzz_target;

fn settings() -> &'static Settings {
    static SETTINGS: OnceLock<Settings> = OnceLock::new();
    SETTINGS.get_or_init(Settings::default)
}

fuzz_target!(
    init: {
        settings();
    },
    |data: &[u8]| {
        let Ok(text) = std::str::from_utf8(data) else {
            return;
        };
        let settings = settings();
        bounded(data.len(), || {
            for trigger in [Trigger::Annotated, Trigger::Always] {
                let Ok((out, reports)) = file::inject_text(text, settings, trigger) else {
                    continue;
                };
                if reports.iter().any(|r| r.result.is_ok()) {
                    let (_, again) = file::inject_text(&out, settings, trigger)
                        .expect("inject file fails on its own output");
                    assert!(
                        again.iter().all(|r| r.result.is_err()),
                        "injected twice: {again:?}"
                    );
                }
            }
        });
    }
);

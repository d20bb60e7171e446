//! The configuration loader on untrusted text: `keybroker::config::Config::parse`, what
//! `Config::load` runs on a file's contents (it reads with `read_to_string`, so only UTF-8 text
//! gets here). Relative paths resolve against a directory that is never touched.

#![no_main]

use std::path::Path;

use keybroker::config::Config;
use keybroker_fuzz::bounded;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    bounded(data.len(), || {
        let _ = Config::parse(text, "fuzz.toml", Path::new("/nonexistent/keybroker"));
    });
});

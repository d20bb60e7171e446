//! The local keyring file parser on untrusted bytes: `keybroker::keyring::Keyring::parse_bytes`,
//! what `Keyring::load` runs after its access checks. Its errors must never quote the file (they
//! name the problem, line and column, and at most a valid key name): checked by length here.

#![no_main]

use std::path::Path;

use keybroker::keyring::Keyring;
use keybroker_fuzz::bounded;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    bounded(data.len(), || {
        if let Err(e) = Keyring::parse_bytes(data, Path::new("keyring")) {
            let text = e.to_string();
            assert!(
                text.len() <= 512,
                "long keyring error ({} bytes)",
                text.len()
            );
        }
    });
});

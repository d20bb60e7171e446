//! Sealing and opening with a fixed data key (`keybroker::envelope::seal_with_salt`, `parse`,
//! `Envelope::open`/`open_data_key`) on fuzzer-chosen headers, contexts and payloads: what seals
//! parses back to the same fields and opens to the same payload; the same ciphertext with any
//! one byte changed, under another context, or under another key never opens.

#![no_main]

use std::collections::BTreeMap;

use keybroker::envelope::{self, Kind};
use keybroker::secret::SecretKey;
use keybroker_fuzz::bounded;
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Input<'a> {
    version_1: bool,
    kind: u8,
    /// Kind 3's payload: 16 or 32 (the derived key's length).
    derived_128: bool,
    key_name: &'a str,
    caller: &'a str,
    copies: Vec<(u8, &'a str, &'a str, &'a [u8])>,
    context: Vec<(&'a str, &'a str)>,
    plaintext: &'a [u8],
    salt: [u8; envelope::SALT_LEN],
    /// Where one byte of the ciphertext is changed, and how (a zero mask changes the last bit).
    tamper_at: u16,
    tamper_mask: u8,
}

const DATA_KEY: [u8; 32] = *b"keybroker fuzz fixed data key 32";

fuzz_target!(|input: Input<'_>| {
    let data_key = SecretKey::from_slice(&DATA_KEY);
    let other_key = SecretKey::from_slice(&[0x5a; 32]);
    let len = input.key_name.len()
        + input.caller.len()
        + input.plaintext.len()
        + input
            .copies
            .iter()
            .map(|c| c.1.len() + c.2.len() + c.3.len() + 1)
            .sum::<usize>()
        + input
            .context
            .iter()
            .map(|(k, v)| k.len() + v.len())
            .sum::<usize>()
        + 64;
    bounded(len, || {
        let version = if input.version_1 {
            envelope::LEGACY_VERSION
        } else {
            envelope::FORMAT_VERSION
        };
        let kind = match input.kind % 3 {
            0 => Kind::Message,
            1 => Kind::DataKey,
            _ => Kind::DerivedDataKey,
        };
        let derived = [if input.derived_128 { 16 } else { 32 }];
        let plaintext = match kind {
            Kind::DerivedDataKey => &derived[..],
            _ => input.plaintext,
        };
        let copies = keybroker_fuzz::copies(&input.copies);
        let context = keybroker_fuzz::context(&input.context);
        let Ok(sealed) = envelope::seal_with_salt(
            version,
            kind,
            input.key_name,
            input.caller,
            &copies,
            &data_key,
            &context,
            plaintext,
            &input.salt,
        ) else {
            return;
        };
        let open = |bytes: &[u8], key: &SecretKey, context: &BTreeMap<String, String>| {
            let env = envelope::parse(bytes).ok()?;
            match env.kind {
                Kind::Message => env.open(key, context).ok(),
                _ => env
                    .open_data_key(key, context)
                    .ok()
                    .map(|k| k.as_ref().to_vec()),
            }
        };

        let env = envelope::parse(&sealed).expect("a sealed envelope parses");
        assert_eq!(
            (env.version, env.kind, env.key_name, env.caller),
            (version, kind, input.key_name, input.caller)
        );
        assert_eq!(env.copies, copies);
        assert_eq!(env.salt(), &input.salt);
        let opened = open(&sealed, &data_key, &context).expect("a sealed envelope opens");
        match kind {
            Kind::Message => assert_eq!(opened, plaintext),
            Kind::DataKey => assert_eq!(opened, DATA_KEY),
            Kind::DerivedDataKey => assert_eq!(opened.len(), derived[0] as usize),
        }

        assert!(
            open(&sealed, &other_key, &context).is_none(),
            "opened under another key"
        );
        let mut other_context = context.clone();
        other_context.insert("fuzz".to_owned(), "other".to_owned());
        if other_context != context {
            assert!(
                open(&sealed, &data_key, &other_context).is_none(),
                "opened under another context"
            );
        }
        let mut tampered = sealed.clone();
        let at = input.tamper_at as usize % tampered.len();
        tampered[at] ^= if input.tamper_mask == 0 {
            1
        } else {
            input.tamper_mask
        };
        assert!(
            open(&tampered, &data_key, &context).is_none(),
            "a changed ciphertext opened"
        );
    });
});

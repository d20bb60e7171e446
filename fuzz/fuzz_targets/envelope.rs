//! The ciphertext envelope parser on untrusted bytes (`keybroker::envelope::parse`), and opening
//! what parses under every test vector's data key and context (tests/vectors): nothing but the
//! genuine vector ciphertext may open under its key, and it must give the vector's plaintext (or
//! data key). Parse errors must name structure only (short, fixed texts).

#![no_main]

use std::collections::BTreeMap;
use std::sync::OnceLock;

use keybroker::envelope::{self, Kind};
use keybroker::secret::SecretKey;
use keybroker_fuzz::{bounded, unhex};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

struct Vector {
    ciphertext: Vec<u8>,
    data_key: SecretKey,
    context: BTreeMap<String, String>,
    /// What opening gives: the plaintext, the data key (kind 2) or the derived key (kind 3).
    opens_to: Vec<u8>,
}

fn vectors() -> &'static [Vector] {
    static VECTORS: OnceLock<Vec<Vector>> = OnceLock::new();
    VECTORS.get_or_init(|| {
        let files = [
            include_str!("../../tests/vectors/envelope-v1.json"),
            include_str!("../../tests/vectors/envelope-v2.json"),
        ];
        let mut out = Vec::new();
        for file in files {
            let doc: Value = serde_json::from_str(file).expect("vector file");
            for v in doc["vectors"].as_array().expect("vectors") {
                let s = |k: &str| v[k].as_str().expect("vector field");
                let opens_to = match v["kind"].as_u64() {
                    Some(1) => unhex(s("plaintext")),
                    Some(2) => unhex(s("data_key")),
                    _ => unhex(s("derived_key")),
                };
                out.push(Vector {
                    ciphertext: unhex(s("ciphertext")),
                    data_key: SecretKey::from_vec(unhex(s("data_key"))),
                    context: serde_json::from_value(v["context"].clone()).expect("context"),
                    opens_to,
                });
            }
        }
        out
    })
}

fuzz_target!(
    init: {
        vectors();
    },
    |data: &[u8]| {
        let vectors = vectors();
        bounded(data.len(), || match envelope::parse(data) {
            Err(e) => assert!(e.to_string().len() <= 128, "long parse error: {e}"),
            Ok(env) => {
                assert!(env.payload_len() <= data.len());
                assert!(!env.copies.is_empty() && env.copies.len() <= envelope::MAX_COPIES);
                for v in vectors {
                    let opened = match env.kind {
                        Kind::Message => env.open(&v.data_key, &v.context),
                        Kind::DataKey | Kind::DerivedDataKey => env
                            .open_data_key(&v.data_key, &v.context)
                            .map(|k| k.as_ref().to_vec()),
                    };
                    if let Ok(got) = opened {
                        // Vectors may share a data key and context (v1 and v2 of the same
                        // message): the input must be the ciphertext of one of those.
                        let genuine = vectors.iter().find(|w| {
                            w.ciphertext == data
                                && w.data_key.as_ref() == v.data_key.as_ref()
                                && w.context == v.context
                        });
                        let genuine =
                            genuine.expect("a ciphertext other than a vector's opened under its key");
                        assert!(got == genuine.opens_to, "a vector opened to something else");
                    }
                }
            }
        });
    }
);

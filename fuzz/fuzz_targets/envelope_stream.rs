//! The stream envelope (kind 4, `keybroker::envelope::stream`) on untrusted bytes, fed the way
//! DecryptStream receives them: in chunks whose size the input's first byte picks. The header is
//! parsed as it arrives (`parse_header` on every growing prefix), then every test vector's data
//! key and context (tests/vectors/envelope-stream.json) tries to open it, segment by segment.
//!
//! What must hold: a prefix that parses gives the same header length as the whole input; parse
//! errors are short fixed texts; only a vector's own header passes its key commitment; every
//! segment released is the vector's plaintext at that offset (nothing before its tag verified);
//! and a stream finishes only if it is exactly the vector's ciphertext (no truncation, appending,
//! reordering or duplication). Memory stays bounded by the input (`bounded`).

#![no_main]

use std::collections::BTreeMap;
use std::sync::OnceLock;

use keybroker::envelope::stream::{self, SEGMENT_LEN};
use keybroker::secret::SecretKey;
use keybroker_fuzz::{bounded, unhex};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

struct Vector {
    ciphertext: Vec<u8>,
    data_key: SecretKey,
    context: BTreeMap<String, String>,
    plaintext_len: usize,
}

/// Byte `i` of every vector's plaintext (the vector file's rule).
fn plaintext_byte(i: usize) -> u8 {
    (i % 251) as u8
}

fn vectors() -> &'static [Vector] {
    static VECTORS: OnceLock<Vec<Vector>> = OnceLock::new();
    VECTORS.get_or_init(|| {
        let doc: Value =
            serde_json::from_str(include_str!("../../tests/vectors/envelope-stream.json"))
                .expect("vector file");
        assert_eq!(doc["segment_len"].as_u64(), Some(SEGMENT_LEN as u64));
        doc["vectors"]
            .as_array()
            .expect("vectors")
            .iter()
            .map(|v| Vector {
                ciphertext: unhex(v["ciphertext"].as_str().expect("ciphertext")),
                data_key: SecretKey::from_vec(unhex(v["data_key"].as_str().expect("data_key"))),
                context: serde_json::from_value(v["context"].clone()).expect("context"),
                plaintext_len: v["plaintext_len"].as_u64().expect("plaintext_len") as usize,
            })
            .collect()
    })
}

/// Chunk size from the selector byte: 0 is "everything at once", others spread over 1 byte to
/// a little more than one sealed segment, so that chunk edges fall inside headers, tags and
/// segment boundaries.
fn chunk_len(selector: u8) -> usize {
    match selector {
        0 => usize::MAX,
        s => (s as usize).pow(2) + (s as usize % 7),
    }
}

fuzz_target!(
    init: {
        vectors();
    },
    |input: &[u8]| {
        let Some((&selector, data)) = input.split_first() else {
            return;
        };
        let chunk = chunk_len(selector);
        let vectors = vectors();
        bounded(input.len(), || {
            // The header, as DecryptStream sees it arrive.
            let mut have = 0usize;
            let header_len = loop {
                have = have.saturating_add(chunk).min(data.len());
                match stream::parse_header(&data[..have]) {
                    Err(e) => {
                        assert!(e.to_string().len() <= 128, "long parse error: {e}");
                        return;
                    }
                    Ok(None) if have == data.len() => return,
                    Ok(None) => continue,
                    Ok(Some((_, n))) => {
                        assert!(n <= have, "a header longer than its input");
                        break n;
                    }
                }
            };
            let (header, n) = match stream::parse_header(data) {
                Ok(Some(parsed)) => parsed,
                other => panic!("a prefix parsed but the whole input gave {other:?}"),
            };
            assert_eq!(n, header_len, "a prefix and the whole input disagree on the header");

            for v in vectors {
                let Ok(mut opener) = header.opener(&v.data_key, &v.context) else {
                    continue;
                };
                assert!(
                    v.ciphertext.len() >= n && data[..n] == v.ciphertext[..n],
                    "a header other than the vector's passed its key commitment"
                );
                let mut released = 0usize;
                let mut check = |segment: &[u8]| {
                    for (i, &b) in segment.iter().enumerate() {
                        assert_eq!(b, plaintext_byte(released + i), "released wrong plaintext");
                    }
                    released += segment.len();
                    assert!(released <= v.plaintext_len, "released more than the plaintext");
                };
                let mut rest = &data[n..];
                let mut failed = false;
                while !rest.is_empty() {
                    let mut piece = &rest[..chunk.min(rest.len())];
                    rest = &rest[piece.len()..];
                    while !piece.is_empty() {
                        match opener.push(&mut piece) {
                            Ok(Some(segment)) => {
                                assert_eq!(segment.len(), SEGMENT_LEN);
                                check(&segment);
                            }
                            Ok(None) => {}
                            Err(_) => {
                                failed = true;
                                break;
                            }
                        }
                    }
                    if failed {
                        break;
                    }
                }
                if failed {
                    continue;
                }
                if let Ok(last) = opener.finish() {
                    check(&last);
                    assert!(data == v.ciphertext, "a stream other than the vector's finished");
                    assert_eq!(released, v.plaintext_len, "finished short of the plaintext");
                }
            }
        });
    }
);

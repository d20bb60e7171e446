//! The local keyring backend against the shared conformance suite, plus what is particular to
//! it: canonical version strings (issue 21 item 13). Its wrap formats are checked byte by byte
//! in `envelope_vectors.rs`.

use std::collections::BTreeMap;
use std::sync::Arc;

use keybroker::backend::local::{LocalBackend, LocalKeyring};
use keybroker::proto::{DecryptRequest, EncryptRequest, GenerateDataKeyRequest};

use crate::support::{TestServer, conformance, local_config, reason};

fn two_keys() -> (tempfile::TempDir, LocalBackend, LocalBackend) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keyring");
    keybroker::keyring::edit(&path, true, |r| {
        r.create_key("a")?;
        r.create_key("b")
    })
    .unwrap();
    let ring = LocalKeyring::open(&path, None).unwrap();
    let a = LocalBackend::new(Arc::clone(&ring), "a");
    let b = LocalBackend::new(ring, "b");
    (dir, a, b)
}

#[tokio::test]
async fn local_backend_conforms() {
    let (_dir, a, b) = two_keys();
    conformance::run_all(&a, &b).await;
}

/// `"1"` is the only spelling of version 1 (Rust's own parser accepts `"+1"` and `"01"`).
#[tokio::test]
async fn local_versions_are_canonical() {
    let (_dir, a, _) = two_keys();
    conformance::respelled_copies_are_refused(&a, |w| {
        ["01", "+1", "001", " 1", "1 ", "0", "4294967297", ""]
            .iter()
            .map(|v| {
                let mut x = w.clone();
                x.key_version = (*v).into();
                x
            })
            .collect()
    })
    .await;
}

/// Rebuilds an envelope with its first copy's key version replaced; everything after the
/// copies (salt, commitment, body) is kept byte for byte.
pub fn respell_version(ct: &[u8], version: &str) -> Vec<u8> {
    let env = keybroker::envelope::parse(ct).unwrap();
    let mut out = vec![b'K', b'B', ct[2], ct[3]];
    out.push(env.key_name.len() as u8);
    out.extend_from_slice(env.key_name.as_bytes());
    out.push(env.caller.len() as u8);
    out.extend_from_slice(env.caller.as_bytes());
    out.push(env.copies.len() as u8);
    let mut header_len = 4 + 1 + env.key_name.len() + 1 + env.caller.len() + 1;
    for (i, c) in env.copies.iter().enumerate() {
        out.push(c.backend.code());
        let v = if i == 0 { version } else { c.key_version };
        for f in [c.key_id.as_bytes(), v.as_bytes(), c.wrapped] {
            out.extend_from_slice(&(f.len() as u16).to_be_bytes());
            out.extend_from_slice(f);
        }
        header_len += 1 + 6 + c.key_id.len() + c.key_version.len() + c.wrapped.len();
    }
    out.extend_from_slice(&ct[header_len..]);
    out
}

/// Through a server: a respelled version is INVALID_CIPHERTEXT, and neither reaches the backend
/// nor adds a decrypt-cache entry (before the fix each spelling was a miss, a backend call and
/// a new entry, then DECRYPTION_FAILED).
#[tokio::test]
async fn respelled_versions_are_invalid_ciphertext_without_a_backend_call() {
    let (server, counting) = TestServer::counted(&local_config("")).await;
    let mut c = server.client().await;
    let ct = c
        .encrypt(EncryptRequest {
            key: "default".into(),
            plaintext: b"x".to_vec().into(),
            context: BTreeMap::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .ciphertext;
    let blob = c
        .generate_data_key(GenerateDataKeyRequest {
            key: "default".into(),
            spec: 0,
            context: BTreeMap::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .wrapped_key;
    let broker = Arc::clone(&server.running.as_ref().unwrap().broker);
    let entries = broker.cache().entry_counts().await.1;
    for original in [ct.to_vec(), blob.to_vec()] {
        for v in ["01", "+1", "1\u{0}"] {
            let err = c
                .decrypt(DecryptRequest {
                    ciphertext: respell_version(&original, v).into(),
                    context: BTreeMap::new(),
                })
                .await
                .unwrap_err();
            assert_eq!(reason(&err), "INVALID_CIPHERTEXT", "version {v:?}: {err:?}");
            assert!(err.message().contains("key version"), "{}", err.message());
        }
        // The genuine bytes still decrypt.
        c.decrypt(DecryptRequest {
            ciphertext: original.into(),
            context: BTreeMap::new(),
        })
        .await
        .unwrap();
    }
    assert_eq!(
        counting.key("default").unwrap(),
        0,
        "no variant reached the backend"
    );
    assert_eq!(
        broker.cache().entry_counts().await.1,
        entries,
        "no new cache entry"
    );
}

//! EncryptBatch and DecryptBatch (issue 17): every item answered on its own and in order, the
//! key checked once per distinct key, the data key looked up once per key (counted at the
//! backend, through the counting wrapper), one audit record per item, limits on the batch.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use keybroker::proto::{
    DecryptBatchRequest, DecryptRequest, EncryptBatchRequest, EncryptRequest, ListKeysRequest,
    decrypt_batch_result, encrypt_batch_result,
};
use prost::Message;
use serde_json::Value;
use tonic::Code;
use tonic_types::pb::ErrorInfo;

use crate::support::{TestServer, ctx, keybroker_bin, reason};

/// Four local keys: `default` and `other` (anything), `ro` (decrypt only: encrypt is denied),
/// `wo` (encrypt only: decrypt is denied); plaintexts above 64 KiB are refused per item.
fn config(extra_server: &str) -> String {
    let mut c = format!(
        "[server]\nmax_request_bytes = \"64KiB\"\n{extra_server}\n[audit]\npath = \"audit.jsonl\"\n"
    );
    for (key, ops) in [
        ("default", "\"*\""),
        ("other", "\"*\""),
        ("ro", "\"decrypt\""),
        ("wo", "\"encrypt\""),
    ] {
        c.push_str(&format!(
            "[keys.{key}]\nbackend = \"local\"\nkey_id = \"{key}\"\nkeyring = \"{{dir}}/keyring\"\ncreate = true\n\
             [[keys.{key}.policy]]\ncallers = [\"anonymous\"]\noperations = [{ops}]\n"
        ));
    }
    c
}

fn records(path: &Path, n: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r: Vec<Value> = std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        if r.len() >= n {
            return r;
        }
        assert!(Instant::now() < deadline, "only {} of {n} records", r.len());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The code and ErrorInfo reason of an item's google.rpc.Status.
fn item_error(s: &tonic_types::pb::Status) -> (Code, String) {
    assert_eq!(s.details.len(), 1, "{s:?}");
    let any = &s.details[0];
    assert_eq!(any.type_url, "type.googleapis.com/google.rpc.ErrorInfo");
    let info = ErrorInfo::decode(any.value.as_slice()).unwrap();
    assert_eq!(info.domain, "keybroker.io");
    (Code::from_i32(s.code), info.reason)
}

fn stats(keys: &[keybroker::proto::KeyInfo], key: &str, op: &str) -> (u64, u64, u64, u64) {
    let k = keys.iter().find(|k| k.name == key).unwrap();
    let s = k.stats.iter().find(|s| s.operation == op).unwrap();
    (s.requests, s.cache_misses, s.cache_hits, s.backend_calls)
}

/// The test: 1,000 items mixing keys, a denied key, an oversize item, then back through
/// DecryptBatch with a tampered ciphertext and a key the caller may not decrypt with.
#[tokio::test]
async fn a_thousand_mixed_items_each_get_their_own_answer_in_order() {
    let (server, counting) = TestServer::counted(&config("max_batch_bytes = \"1MiB\"")).await;
    let mut c = server.client().await;
    const N: usize = 1000;
    const DENIED: usize = 137;
    const OVERSIZE: usize = 500;
    let key_of = |i: usize| match i {
        DENIED => "ro",
        _ => ["default", "default", "other", "wo"][i % 4],
    };
    let items: Vec<EncryptRequest> = (0..N)
        .map(|i| EncryptRequest {
            key: key_of(i).into(),
            plaintext: if i == OVERSIZE {
                vec![7u8; (64 << 10) + 1].into()
            } else {
                format!("item {i}").into_bytes().into()
            },
            context: ctx(&[("i", &i.to_string())]),
        })
        .collect();
    let results = c
        .encrypt_batch(EncryptBatchRequest {
            items: items.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    assert_eq!(results.len(), N);
    let mut ciphertexts = Vec::new();
    for (i, r) in results.iter().enumerate() {
        match r.result.as_ref().unwrap() {
            encrypt_batch_result::Result::Response(ok) => {
                assert!(i != DENIED && i != OVERSIZE, "item {i} succeeded");
                assert_eq!(ok.key, key_of(i), "item {i} is answered in its place");
                ciphertexts.push((i, ok.ciphertext.clone()));
            }
            encrypt_batch_result::Result::Error(e) => {
                let got = item_error(e);
                match i {
                    DENIED => assert_eq!(got, (Code::PermissionDenied, "POLICY_DENIED".into())),
                    OVERSIZE => {
                        assert_eq!(got, (Code::ResourceExhausted, "REQUEST_TOO_LARGE".into()))
                    }
                    _ => panic!("item {i} failed: {e:?}"),
                }
                assert!(!e.message.is_empty());
            }
        }
    }
    assert_eq!(ciphertexts.len(), N - 2);
    // One data key per key for the whole batch; nothing reached the denied key's backend.
    for (key, calls) in [("default", 1), ("other", 1), ("wo", 1), ("ro", 0)] {
        assert_eq!(counting.key(key).total(), calls, "{key}");
    }
    let keys = c
        .list_keys(ListKeysRequest {})
        .await
        .unwrap()
        .into_inner()
        .keys;
    let n_default = (0..N)
        .filter(|&i| key_of(i) == "default" && i != OVERSIZE)
        .count() as u64;
    assert_eq!(
        stats(&keys, "default", "encrypt"),
        (n_default, 1, n_default - 1, 1),
        "every item is counted; one miss, the rest reuse the data key"
    );

    // Back: a tampered ciphertext, and the write-only key's items are denied.
    const TAMPERED: usize = 10;
    let items: Vec<DecryptRequest> = ciphertexts
        .iter()
        .map(|(i, ct)| {
            let mut ct = ct.to_vec();
            if *i == TAMPERED {
                let n = ct.len();
                ct[n - 1] ^= 1;
            }
            DecryptRequest {
                ciphertext: ct.into(),
                context: ctx(&[("i", &i.to_string())]),
            }
        })
        .collect();
    let before = counting.key("default").total() + counting.key("other").total();
    let results = c
        .decrypt_batch(DecryptBatchRequest { items })
        .await
        .unwrap()
        .into_inner()
        .results;
    assert_eq!(results.len(), ciphertexts.len());
    for ((i, _), r) in ciphertexts.iter().zip(&results) {
        match r.result.as_ref().unwrap() {
            decrypt_batch_result::Result::Response(ok) => {
                assert!(*i != TAMPERED && key_of(*i) != "wo", "item {i} decrypted");
                assert_eq!(ok.plaintext, format!("item {i}").into_bytes());
                assert_eq!(ok.key, key_of(*i));
            }
            decrypt_batch_result::Result::Error(e) => {
                let got = item_error(e);
                if *i == TAMPERED {
                    assert_eq!(got, (Code::InvalidArgument, "DECRYPTION_FAILED".into()));
                } else {
                    assert_eq!(key_of(*i), "wo", "item {i}: {e:?}");
                    assert_eq!(got, (Code::PermissionDenied, "POLICY_DENIED".into()));
                }
            }
        }
    }
    // Reading back what was just written costs no backend call (the data keys are cached).
    assert_eq!(
        counting.key("default").total() + counting.key("other").total(),
        before
    );

    // One audit record per item, each saying where in its batch it was; the data key was looked
    // up by the first item of each key only (`cache: miss`); the others reused it (`hit`).
    let log = server.path("audit.jsonl");
    let all = records(&log, N + ciphertexts.len());
    let enc: Vec<&Value> = all
        .iter()
        .filter(|r| r["operation"] == "encrypt" && r["batch"]["items"] == N)
        .collect();
    assert_eq!(enc.len(), N);
    for (i, r) in enc.iter().enumerate() {
        assert_eq!(r["batch"]["item"], i, "records in item order");
        if i != OVERSIZE {
            // (a size check comes before the key is looked up, as in Encrypt)
            assert_eq!(r["key"], key_of(i));
        }
    }
    assert_eq!(enc[DENIED]["result"], "PERMISSION_DENIED");
    assert_eq!(enc[DENIED]["reason"], "POLICY_DENIED");
    assert_eq!(enc[OVERSIZE]["reason"], "REQUEST_TOO_LARGE");
    assert_eq!(enc.iter().filter(|r| r["cache"] == "miss").count(), 3);
    let dec: Vec<&Value> = all
        .iter()
        .filter(|r| r["operation"] == "decrypt" && r.get("batch").is_some())
        .collect();
    assert_eq!(dec.len(), ciphertexts.len());
    assert_eq!(dec[TAMPERED]["reason"], "DECRYPTION_FAILED");
    let out = std::process::Command::new(keybroker_bin())
        .args(["audit", "verify"])
        .arg(&log)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    server.stop().await;
}

#[tokio::test]
async fn batch_limits_refuse_the_whole_batch_and_reuse_respects_cache_limits() {
    let text = config("max_batch_items = 30\nmax_batch_bytes = \"100KiB\"")
        .replace("[keys.other]\n", "[keys.other]\ncache.max_messages = 10\n");
    let (server, counting) = TestServer::counted(&text).await;
    let mut c = server.client().await;
    let item = |key: &str, n: usize| EncryptRequest {
        key: key.into(),
        plaintext: vec![1u8; n].into(),
        context: BTreeMap::new(),
    };
    let too_many = c
        .encrypt_batch(EncryptBatchRequest {
            items: vec![item("default", 1); 31],
        })
        .await
        .unwrap_err();
    assert_eq!(too_many.code(), Code::ResourceExhausted);
    assert_eq!(reason(&too_many), "BATCH_TOO_LARGE");
    let too_big = c
        .encrypt_batch(EncryptBatchRequest {
            items: vec![item("default", 60 << 10); 2],
        })
        .await
        .unwrap_err();
    assert_eq!(too_big.code(), Code::ResourceExhausted);
    assert_eq!(reason(&too_big), "REQUEST_TOO_LARGE");
    assert_eq!(
        counting.key("default").total(),
        0,
        "refused before any key use"
    );
    let empty = c
        .decrypt_batch(DecryptBatchRequest { items: vec![] })
        .await
        .unwrap()
        .into_inner();
    assert!(empty.results.is_empty());

    // A batch reuses its data key only within the key's limits: 25 items, max_messages = 10.
    let results = c
        .encrypt_batch(EncryptBatchRequest {
            items: vec![item("other", 8); 25],
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    assert!(
        results
            .iter()
            .all(|r| matches!(r.result, Some(encrypt_batch_result::Result::Response(_))))
    );
    assert_eq!(counting.key("other").total(), 3);
    server.stop().await;
}

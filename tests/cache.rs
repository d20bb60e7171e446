//! The data-key cache, counted where it matters: at the backend, through a counting wrapper
//! around the real local backend (independent of keybroker's own counters, which are checked
//! against it).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use keybroker::facts::{CacheResult, Facts};
use keybroker::principal::{Caller, IdentitySource};
use keybroker::proto::{DecryptRequest, EncryptRequest, GenerateDataKeyRequest, ListKeysRequest};
use tonic::Code;

use crate::support::{TestServer, client_for, local_config, reason};

fn enc(n: usize) -> EncryptRequest {
    EncryptRequest {
        key: "default".into(),
        plaintext: vec![0x42; n].into(),
        context: BTreeMap::new(),
    }
}

fn wrapped_of(ct: &[u8]) -> Vec<u8> {
    keybroker::envelope::parse(ct).unwrap().copies[0]
        .wrapped
        .to_vec()
}

#[tokio::test]
async fn ten_thousand_sequential_encrypts_make_one_backend_call() {
    let (server, counting) = TestServer::counted(&local_config("")).await;
    let mut c = server.client().await;
    let mut first = None;
    for i in 0..10_000 {
        let ct = c.encrypt(enc(16)).await.unwrap().into_inner().ciphertext;
        if i == 0 {
            first = Some(wrapped_of(&ct));
        } else if i == 9_999 {
            assert_eq!(Some(wrapped_of(&ct)), first, "same data key throughout");
        }
    }
    assert_eq!(counting.key("default").total(), 1);
    // keybroker's own counters agree with what the backend saw.
    let keys = c
        .list_keys(ListKeysRequest {})
        .await
        .unwrap()
        .into_inner()
        .keys;
    let s = keys[0]
        .stats
        .iter()
        .find(|s| s.operation == "encrypt")
        .unwrap();
    assert_eq!(
        (s.requests, s.cache_misses, s.cache_hits, s.backend_calls),
        (10_000, 1, 9_999, 1)
    );
}

#[tokio::test]
async fn a_thousand_concurrent_encrypts_on_a_cold_cache_make_one_backend_call() {
    let (server, counting) = TestServer::counted(&local_config("")).await;
    // A slow backend, as a cloud KMS is, so that all misses overlap the one in-flight call.
    counting
        .key("default")
        .set_delay(Duration::from_millis(200));
    let client = server.client().await;
    let mut tasks = Vec::new();
    for _ in 0..1_000 {
        let mut c = client.clone();
        tasks.push(tokio::spawn(async move {
            c.encrypt(enc(8)).await.map(|r| r.into_inner().ciphertext)
        }));
    }
    let mut wrapped = std::collections::HashSet::new();
    for t in tasks {
        wrapped.insert(wrapped_of(&t.await.unwrap().unwrap()));
    }
    assert_eq!(counting.key("default").total(), 1);
    assert_eq!(wrapped.len(), 1, "every request used the one data key");
}

/// Concurrent misses while the backend fails: one call, every waiter gets the error, and the
/// error is not cached (the next request tries again and succeeds).
#[tokio::test]
async fn single_flight_shares_errors_and_does_not_cache_them() {
    let (server, counting) = TestServer::counted(&local_config("")).await;
    let k = counting.key("default");
    k.set_delay(Duration::from_millis(200));
    k.set_fail(true);
    let client = server.client().await;
    let mut tasks = Vec::new();
    for _ in 0..100 {
        let mut c = client.clone();
        tasks.push(tokio::spawn(async move { c.encrypt(enc(8)).await }));
    }
    for t in tasks {
        let err = t.await.unwrap().unwrap_err();
        assert_eq!(
            (err.code(), reason(&err).as_str()),
            (Code::Unavailable, "BACKEND_UNAVAILABLE")
        );
        assert!(err.message().contains("local backend"), "{}", err.message());
    }
    assert_eq!(k.total(), 1);
    k.set_fail(false);
    k.set_delay(Duration::ZERO);
    let mut c = client.clone();
    c.encrypt(enc(8)).await.unwrap();
    assert_eq!(k.total(), 2);
}

#[tokio::test]
async fn ten_thousand_decrypts_under_one_data_key_cost_one_backend_call_cold() {
    let writer = TestServer::local("").await;
    let mut w = writer.client().await;
    let mut cts = Vec::new();
    for i in 0..10_000u32 {
        cts.push(
            w.encrypt(EncryptRequest {
                key: "default".into(),
                plaintext: i.to_be_bytes().to_vec().into(),
                context: BTreeMap::new(),
            })
            .await
            .unwrap()
            .into_inner()
            .ciphertext,
        );
    }
    assert_eq!(wrapped_of(&cts[0]), wrapped_of(&cts[9_999]));
    // A fresh server (cold caches) on the same keyring.
    let ring = writer.path("keyring").display().to_string();
    let (reader, counting) =
        TestServer::counted(&local_config("").replace("{dir}/keyring", &ring)).await;
    let mut r = reader.client().await;
    for (i, ct) in cts.into_iter().enumerate() {
        let p = r
            .decrypt(DecryptRequest {
                ciphertext: ct,
                context: BTreeMap::new(),
            })
            .await
            .unwrap()
            .into_inner()
            .plaintext;
        assert_eq!(p.as_ref(), (i as u32).to_be_bytes());
    }
    let k = counting.key("default");
    assert_eq!((k.unwrap(), k.total()), (1, 1));
}

/// A decrypt-side hit still authenticates: a tampered body or a wrong context under a cached
/// data key fails exactly as it does cold.
#[tokio::test]
async fn a_cache_hit_still_authenticates() {
    let (server, counting) = TestServer::counted(&local_config("")).await;
    let mut c = server.client().await;
    let ctx = crate::support::ctx(&[("a", "1")]);
    let ct = c
        .encrypt(EncryptRequest {
            key: "default".into(),
            plaintext: b"payload".to_vec().into(),
            context: ctx.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .ciphertext
        .to_vec();
    c.decrypt(DecryptRequest {
        ciphertext: ct.clone().into(),
        context: ctx.clone(),
    })
    .await
    .unwrap();
    let mut tampered = ct.clone();
    *tampered.last_mut().unwrap() ^= 1;
    let e = c
        .decrypt(DecryptRequest {
            ciphertext: tampered.into(),
            context: ctx.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(reason(&e), "DECRYPTION_FAILED");
    let e = c
        .decrypt(DecryptRequest {
            ciphertext: ct.into(),
            context: BTreeMap::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(reason(&e), "DECRYPTION_FAILED");
    assert_eq!(
        counting.key("default").total(),
        1,
        "all of it from the cache"
    );
}

#[tokio::test]
async fn max_messages_bounds_each_data_key() {
    let (server, counting) = TestServer::counted(&local_config("cache.max_messages = 7")).await;
    let mut c = server.client().await;
    let mut keys = std::collections::HashMap::<Vec<u8>, usize>::new();
    for _ in 0..100 {
        let ct = c.encrypt(enc(10)).await.unwrap().into_inner().ciphertext;
        *keys.entry(wrapped_of(&ct)).or_default() += 1;
    }
    assert_eq!(counting.key("default").total(), 15, "ceil(100 / 7)");
    assert!(keys.values().all(|&n| n <= 7), "{keys:?}");
    assert_eq!(keys.len(), 15);
}

#[tokio::test]
async fn max_bytes_bounds_each_data_key() {
    // 10,000 bytes per data key; 1,024-byte messages: 9 fit (9,216), the 10th would not.
    let (server, counting) = TestServer::counted(&local_config("cache.max_bytes = 10000")).await;
    let mut c = server.client().await;
    for _ in 0..50 {
        c.encrypt(enc(1024)).await.unwrap();
    }
    assert_eq!(counting.key("default").total(), 6, "ceil(50 / 9)");
    // A message larger than a whole data key's budget gets a data key of its own.
    c.encrypt(enc(20_000)).await.unwrap();
    assert_eq!(counting.key("default").total(), 7);
}

#[tokio::test]
async fn after_ttl_a_new_data_key_is_used_and_old_ciphertexts_still_decrypt() {
    let (server, counting) = TestServer::counted(&local_config("cache.ttl = \"300ms\"")).await;
    let mut c = server.client().await;
    let old = c.encrypt(enc(4)).await.unwrap().into_inner().ciphertext;
    let again = c.encrypt(enc(4)).await.unwrap().into_inner().ciphertext;
    assert_eq!(wrapped_of(&old), wrapped_of(&again));
    tokio::time::sleep(Duration::from_millis(450)).await;
    let new = c.encrypt(enc(4)).await.unwrap().into_inner().ciphertext;
    assert_ne!(
        wrapped_of(&old),
        wrapped_of(&new),
        "a new data key after the TTL"
    );
    assert_eq!(counting.key("default").generate(), 2);
    // The old ciphertext's data key has also left the decrypt cache: one unwrap to read it.
    let p = c
        .decrypt(DecryptRequest {
            ciphertext: old,
            context: BTreeMap::new(),
        })
        .await
        .unwrap();
    assert_eq!(p.into_inner().plaintext.as_ref(), [0x42; 4]);
    assert_eq!(counting.key("default").unwrap(), 1);
}

#[tokio::test]
async fn caching_disabled_means_one_backend_call_per_operation() {
    let (server, counting) = TestServer::counted(&local_config("cache.enabled = false")).await;
    let mut c = server.client().await;
    let mut cts = Vec::new();
    for _ in 0..20 {
        cts.push(c.encrypt(enc(4)).await.unwrap().into_inner().ciphertext);
    }
    for _ in 0..5 {
        c.generate_data_key(GenerateDataKeyRequest {
            key: "default".into(),
            spec: 0,
            context: BTreeMap::new(),
        })
        .await
        .unwrap();
    }
    let k = counting.key("default");
    assert_eq!(k.generate(), 25);
    for ct in cts {
        c.decrypt(DecryptRequest {
            ciphertext: ct,
            context: BTreeMap::new(),
        })
        .await
        .unwrap();
    }
    assert_eq!(k.unwrap(), 20);
    let keys = c
        .list_keys(ListKeysRequest {})
        .await
        .unwrap()
        .into_inner()
        .keys;
    let s = keys[0]
        .stats
        .iter()
        .find(|s| s.operation == "decrypt")
        .unwrap();
    assert_eq!(
        (s.cache_bypasses, s.cache_hits, s.backend_calls),
        (20, 0, 20)
    );
}

/// Two callers (cache partitions) never share a data key, even on the same key.
#[tokio::test]
async fn two_callers_never_share_a_data_key() {
    let (server, counting) = TestServer::counted(&local_config(
        "[[keys.default.policy]]\ncallers = [\"app-a\", \"app-b\"]\noperations = [\"encrypt\", \"generate_data_key\"]",
    ))
    .await;
    let broker = Arc::clone(&server.running.as_ref().unwrap().broker);
    let a = Caller::new("app-a", IdentitySource::BearerToken);
    let b = Caller::new("app-b", IdentitySource::BearerToken);
    let mut wrapped = Vec::new();
    for caller in [&a, &b, &a, &b] {
        let mut facts = Facts::default();
        let out = broker
            .encrypt(caller, "default", b"x", &BTreeMap::new(), &mut facts)
            .await
            .unwrap();
        wrapped.push(wrapped_of(&out.ciphertext));
        let env_caller = keybroker::envelope::parse(&out.ciphertext)
            .unwrap()
            .caller
            .to_owned();
        assert_eq!(env_caller, caller.name.as_ref());
    }
    assert_eq!(wrapped[0], wrapped[2]);
    assert_eq!(wrapped[1], wrapped[3]);
    assert_ne!(wrapped[0], wrapped[1]);
    assert_eq!(counting.key("default").generate(), 2);

    // Data keys handed out by GenerateDataKey are apart from those sealing Encrypt messages.
    let mut facts = Facts::default();
    let dk = broker
        .generate_data_key(
            &a,
            "default",
            keybroker::broker::DataKeySpec::Aes256,
            &BTreeMap::new(),
            &mut facts,
        )
        .await
        .unwrap();
    assert_ne!(wrapped_of(&dk.wrapped_key), wrapped[0]);
    assert_eq!(facts.cache, Some(CacheResult::Miss));
}

/// The backend is down when the data key expires: the expired key is not used; requests fail
/// with UNAVAILABLE naming the backend until it is back.
#[tokio::test]
async fn backend_down_at_expiry_fails_closed() {
    let (server, counting) = TestServer::counted(&local_config("cache.ttl = \"300ms\"")).await;
    let mut c = server.client().await;
    c.encrypt(enc(4)).await.unwrap();
    let k = counting.key("default");
    k.set_fail(true);
    c.encrypt(enc(4))
        .await
        .expect("within the TTL the cached key serves");
    tokio::time::sleep(Duration::from_millis(450)).await;
    for _ in 0..3 {
        let err = c.encrypt(enc(4)).await.unwrap_err();
        assert_eq!(
            (err.code(), reason(&err).as_str()),
            (Code::Unavailable, "BACKEND_UNAVAILABLE")
        );
        assert!(err.message().contains("local backend"), "{}", err.message());
    }
    k.set_fail(false);
    let ct = c.encrypt(enc(4)).await.unwrap().into_inner().ciphertext;
    assert_eq!(k.generate(), 5, "1 + 3 failed attempts + 1 recovery");
    assert!(!ct.is_empty());
}

/// Issue 21 item 1: every GenerateDataKey returns a fresh data key (and a different blob), also
/// across contexts, while the backend still sees one call per cached data key, and Decrypt of
/// each blob gives back exactly its own key without another backend call. The cached data key
/// behind them (the one the blob's wrapped copy unwraps to) is never handed out.
#[tokio::test]
async fn generate_data_key_is_fresh_every_call_and_still_cached() {
    let (server, counting) = TestServer::counted(&local_config("cache.max_messages = 3")).await;
    let mut c = client_for(&server.addr).await;
    let mut keys = Vec::new();
    let mut blobs = Vec::new();
    for i in 0..7 {
        let context = if i % 2 == 0 {
            BTreeMap::new()
        } else {
            crate::support::ctx(&[("object", &format!("o{i}"))])
        };
        let r = c
            .generate_data_key(GenerateDataKeyRequest {
                key: "default".into(),
                spec: 0,
                context: context.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.plaintext_key.len(), 32);
        keys.push(r.plaintext_key.to_vec());
        blobs.push((r.wrapped_key.to_vec(), context));
    }
    let k = counting.key("default");
    assert_eq!(k.generate(), 3, "ceil(7 / 3): the cost lever is kept");
    for i in 0..keys.len() {
        for j in 0..i {
            assert_ne!(keys[i], keys[j], "calls {j} and {i} returned the same key");
            assert_ne!(blobs[i].0, blobs[j].0);
        }
    }
    // Calls 0..3 share one cached data key (one wrapped copy), yet got three different keys.
    assert_eq!(wrapped_of(&blobs[0].0), wrapped_of(&blobs[2].0));
    for ((blob, context), key) in blobs.iter().zip(&keys) {
        let back = c
            .decrypt(DecryptRequest {
                ciphertext: blob.clone().into(),
                context: context.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(&back.plaintext.to_vec(), key);
    }
    assert_eq!(
        k.unwrap(),
        0,
        "the decrypt cache already holds each cached data key"
    );
    // The cached data key itself, unwrapped here with the keyring, is none of the returned keys.
    let ring =
        keybroker::backend::local::LocalKeyring::open(&server.path("keyring"), None).unwrap();
    let local = keybroker::backend::local::LocalBackend::new(ring, "default");
    let env = keybroker::envelope::parse(&blobs[0].0).unwrap();
    let root = keybroker::backend::KeyBackend::unwrap(
        &local,
        &env.copies[0],
        &keybroker::backend::BackendContext {
            key_name: env.key_name,
            caller: env.caller,
        },
    )
    .await
    .unwrap();
    for key in &keys {
        assert_ne!(&root.as_ref()[..key.len()], key.as_slice());
    }
}

/// A reload that changes a key's backend drops its data keys on both sides: a ciphertext made
/// under the old backend key is no longer opened from the decrypt cache (the new backend refuses
/// it), while an unchanged key keeps its warm cache (no backend call after the reload).
#[tokio::test]
async fn a_reload_that_changes_a_keys_backend_drops_both_cache_sides() {
    let key = |name: &str, key_id: &str| {
        format!(
            "[keys.{name}]\nbackend = \"local\"\nkey_id = \"{key_id}\"\nkeyring = \"{{dir}}/keyring\"\ncreate = true\n{}",
            crate::support::allow_anonymous(name)
        )
    };
    // Both keyring keys exist from the start (`other` creates key_id "b").
    let before = key("default", "a") + &key("other", "b");
    let (s, counting) = TestServer::counted(&before).await;
    let mut c = s.client().await;
    let dec = |ct: bytes::Bytes| DecryptRequest {
        ciphertext: ct,
        context: BTreeMap::new(),
    };
    let ct = c.encrypt(enc(5)).await.unwrap().into_inner().ciphertext;
    let other_ct = c
        .encrypt(EncryptRequest {
            key: "other".into(),
            plaintext: b"kept".to_vec().into(),
            context: BTreeMap::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .ciphertext;
    c.decrypt(dec(ct.clone())).await.unwrap();
    c.decrypt(dec(other_ct.clone())).await.unwrap();
    let other_calls = counting.key("other").total();

    // `default` now routes to keyring key "b".
    let after = key("default", "b") + &key("other", "b");
    let path = s.path("keybroker.toml");
    std::fs::write(
        &path,
        after.replace("{dir}", &s.dir.path().display().to_string()),
    )
    .unwrap();
    s.running.as_ref().unwrap().reloader.reload().await.unwrap();

    let e = c.decrypt(dec(ct.clone())).await.unwrap_err();
    assert_eq!(
        (e.code(), reason(&e).as_str()),
        (Code::InvalidArgument, "DECRYPTION_FAILED"),
        "a data key cached under the old backend key was served after the reload"
    );
    let fresh = c.encrypt(enc(5)).await.unwrap().into_inner().ciphertext;
    assert_eq!(
        keybroker::envelope::parse(&fresh).unwrap().copies[0].key_id,
        "b"
    );
    // The unchanged key's decrypt-side entry survived: no backend call.
    c.decrypt(dec(other_ct)).await.unwrap();
    assert_eq!(counting.key("other").total(), other_calls);
}

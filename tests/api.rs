//! The keybroker.v1 API end to end: a real server on an ephemeral port (TCP and a Unix socket),
//! a real gRPC client, every operation at the edge sizes, and every error class.

use std::collections::BTreeMap;

use keybroker::proto::{
    DataKeySpec, DecryptRequest, EncryptRequest, GenerateDataKeyRequest, ListKeysRequest,
    ReEncryptRequest,
};
use tonic::Code;

use crate::support::{TestServer, allow_anonymous, client_for, ctx, reason};

const LIMIT: usize = 1 << 20;

fn config(extra: &str) -> String {
    format!(
        r#"
[server]
listen = ["127.0.0.1:0", "unix://{{dir}}/kb.sock"]
max_request_bytes = "1MiB"

[keys.default]
backend = "local"
key_id = "default"
keyring = "{{dir}}/keyring"
create = true

[keys.other]
backend = "local"
key_id = "other"
keyring = "{{dir}}/keyring"
create = true
{extra}
{}
{}
"#,
        allow_anonymous("default"),
        allow_anonymous("other")
    )
}

/// Every operation at 0 B, 1 B, 1 KiB, 1 MiB (= the configured limit), over TCP and UDS.
#[tokio::test]
async fn every_operation_round_trips_at_edge_sizes_over_tcp_and_uds() {
    let server = TestServer::start(&config("")).await;
    let uds = format!("unix://{}", server.path("kb.sock").display());
    for addr in [server.addr.clone(), uds] {
        let mut c = client_for(&addr).await;
        for size in [0usize, 1, 1024, LIMIT] {
            let plaintext: Vec<u8> = (0..size).map(|i| (i * 7 + 3) as u8).collect();
            let context = ctx(&[("tenant", "t1"), ("size", &size.to_string())]);
            let enc = c
                .encrypt(EncryptRequest {
                    key: "default".into(),
                    plaintext: plaintext.clone().into(),
                    context: context.clone(),
                })
                .await
                .unwrap_or_else(|s| panic!("encrypt {size} over {addr}: {s:?}"))
                .into_inner();
            assert_eq!(enc.key, "default");
            assert_eq!(enc.key_version, "1");
            assert!(enc.ciphertext.len() > size);
            let dec = c
                .decrypt(DecryptRequest {
                    ciphertext: enc.ciphertext.clone(),
                    context: context.clone(),
                })
                .await
                .unwrap_or_else(|s| panic!("decrypt {size} over {addr}: {s:?}"))
                .into_inner();
            assert_eq!(dec.plaintext.as_ref(), plaintext.as_slice(), "size {size}");
            assert_eq!(
                (dec.key.as_str(), dec.key_version.as_str()),
                ("default", "1")
            );

            // ReEncrypt to another key and a new context; the result decrypts to the same bytes.
            let new_ctx = ctx(&[("tenant", "t2")]);
            let re = c
                .re_encrypt(ReEncryptRequest {
                    ciphertext: enc.ciphertext.clone(),
                    source_context: context.clone(),
                    destination_key: "other".into(),
                    destination_context: new_ctx.clone(),
                })
                .await
                .unwrap_or_else(|s| panic!("re-encrypt {size}: {s:?}"))
                .into_inner();
            assert_eq!(
                (re.key.as_str(), re.source_key.as_str()),
                ("other", "default")
            );
            let dec2 = c
                .decrypt(DecryptRequest {
                    ciphertext: re.ciphertext.clone(),
                    context: new_ctx.clone(),
                })
                .await
                .unwrap()
                .into_inner();
            assert_eq!(dec2.plaintext.as_ref(), plaintext.as_slice());
            assert_eq!(dec2.key, "other");
            // The old context does not open the re-encrypted ciphertext.
            let err = c
                .decrypt(DecryptRequest {
                    ciphertext: re.ciphertext,
                    context: context.clone(),
                })
                .await
                .unwrap_err();
            assert_eq!(reason(&err), "DECRYPTION_FAILED");
        }
        for (spec, len) in [
            (DataKeySpec::Unspecified, 32),
            (DataKeySpec::Aes256, 32),
            (DataKeySpec::Aes128, 16),
        ] {
            let context = ctx(&[("purpose", "files")]);
            let dk = c
                .generate_data_key(GenerateDataKeyRequest {
                    key: "default".into(),
                    spec: spec as i32,
                    context: context.clone(),
                })
                .await
                .unwrap()
                .into_inner();
            assert_eq!(dk.plaintext_key.len(), len);
            let back = c
                .decrypt(DecryptRequest {
                    ciphertext: dk.wrapped_key.clone(),
                    context: context.clone(),
                })
                .await
                .unwrap()
                .into_inner();
            assert_eq!(
                back.plaintext, dk.plaintext_key,
                "Decrypt of wrapped_key returns the data key"
            );
            let err = c
                .decrypt(DecryptRequest {
                    ciphertext: dk.wrapped_key,
                    context: BTreeMap::new(),
                })
                .await
                .unwrap_err();
            assert_eq!(reason(&err), "DECRYPTION_FAILED");
        }
    }
    server.stop().await;
}

#[tokio::test]
async fn list_keys_shows_configuration_and_no_secrets() {
    let server = TestServer::start(&config("")).await;
    let mut c = server.client().await;
    let keys = c
        .list_keys(ListKeysRequest {})
        .await
        .unwrap()
        .into_inner()
        .keys;
    let names: Vec<_> = keys.iter().map(|k| k.name.as_str()).collect();
    assert_eq!(names, ["default", "other"]);
    let k = &keys[0];
    assert_eq!(
        (k.backend.as_str(), k.backend_key_id.as_str(), k.enabled),
        ("local", "default", true)
    );
    let cache = k.cache.as_ref().unwrap();
    assert!(cache.enabled && cache.ttl_millis == 300_000 && cache.max_messages == 1_000_000);
    let ring = std::fs::read_to_string(server.path("keyring")).unwrap();
    let json: serde_json::Value = serde_json::from_str(&ring).unwrap();
    let material = json["keys"]["default"]["versions"][0]["material"]
        .as_str()
        .unwrap();
    let listing = format!("{keys:?}");
    assert!(!listing.contains(material));
}

#[tokio::test]
async fn wrong_context_and_tampering_never_yield_plaintext() {
    let server = TestServer::start(&config("")).await;
    let mut c = server.client().await;
    let context = ctx(&[("a", "1")]);
    let secret = b"attack at dawn".to_vec();
    let ct = c
        .encrypt(EncryptRequest {
            key: "default".into(),
            plaintext: secret.clone().into(),
            context: context.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .ciphertext
        .to_vec();

    for wrong in [ctx(&[("a", "2")]), ctx(&[]), ctx(&[("a", "1"), ("b", "2")])] {
        let err = c
            .decrypt(DecryptRequest {
                ciphertext: ct.clone().into(),
                context: wrong,
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert_eq!(reason(&err), "DECRYPTION_FAILED");
    }

    // Every single-byte change (three different flips per byte) and every truncation.
    let mut reasons = BTreeMap::<String, usize>::new();
    for i in 0..ct.len() {
        for flip in [0x01u8, 0x80, 0xff] {
            let mut bad = ct.clone();
            bad[i] ^= flip;
            match c
                .decrypt(DecryptRequest {
                    ciphertext: bad.into(),
                    context: context.clone(),
                })
                .await
            {
                Ok(r) => panic!(
                    "flip {flip:#x} at byte {i} decrypted to {} bytes",
                    r.into_inner().plaintext.len()
                ),
                Err(s) => *reasons.entry(reason(&s)).or_default() += 1,
            }
        }
    }
    for len in 0..ct.len() {
        let err = c
            .decrypt(DecryptRequest {
                ciphertext: ct[..len].to_vec().into(),
                context: context.clone(),
            })
            .await
            .unwrap_err();
        *reasons.entry(reason(&err)).or_default() += 1;
        assert!(!err.message().contains("attack"), "{}", err.message());
    }
    // Only the documented reasons appear (key-name flips may name a key that does not exist,
    // answered like a key without a grant).
    for r in reasons.keys() {
        assert!(
            [
                "DECRYPTION_FAILED",
                "INVALID_CIPHERTEXT",
                "POLICY_DENIED",
                "BACKEND_KEY_NOT_FOUND"
            ]
            .contains(&r.as_str()),
            "unexpected reason {r}: {reasons:?}"
        );
    }
    assert!(
        reasons["DECRYPTION_FAILED"] > 0 && reasons["INVALID_CIPHERTEXT"] > 0,
        "{reasons:?}"
    );
}

#[tokio::test]
async fn bad_input_gets_clear_statuses() {
    let server = TestServer::start(&config(
        r#"
[keys.off]
backend = "local"
key_id = "off"
keyring = "{dir}/keyring"
create = true
enabled = false
[[keys.off.policy]]
callers = ["anonymous"]
operations = ["*"]
"#,
    ))
    .await;
    let mut c = server.client().await;
    let enc = |key: &str, n: usize| EncryptRequest {
        key: key.into(),
        plaintext: vec![1u8; n].into(),
        context: BTreeMap::new(),
    };

    for garbage in [
        vec![],
        b"hello world".to_vec(),
        vec![0u8; 64],
        b"KB\x01\x01".to_vec(),
        b"KB\x09".to_vec(),
    ] {
        let err = c
            .decrypt(DecryptRequest {
                ciphertext: garbage.clone().into(),
                context: BTreeMap::new(),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{garbage:?}");
        assert_eq!(reason(&err), "INVALID_CIPHERTEXT", "{garbage:?}");
    }

    // An unknown key is answered like a key without a grant (no key-name enumeration).
    let err = c.encrypt(enc("nope", 1)).await.unwrap_err();
    assert_eq!(
        (err.code(), reason(&err).as_str()),
        (Code::PermissionDenied, "POLICY_DENIED")
    );
    assert!(err.message().contains("nope"));

    let err = c.encrypt(enc("", 1)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    let err = c.encrypt(enc("default", LIMIT + 1)).await.unwrap_err();
    assert_eq!(
        (err.code(), reason(&err).as_str()),
        (Code::ResourceExhausted, "REQUEST_TOO_LARGE")
    );
    assert!(
        err.message().contains("limit is 1048576 bytes"),
        "{}",
        err.message()
    );

    // Far over the limit: refused before the message is read, in the same shape.
    let err = c.encrypt(enc("default", 4 * LIMIT)).await.unwrap_err();
    assert_eq!(
        (err.code(), reason(&err).as_str()),
        (Code::ResourceExhausted, "REQUEST_TOO_LARGE"),
        "{err:?}"
    );
    assert!(
        err.message().contains("larger than the limit"),
        "{}",
        err.message()
    );

    let err = c.encrypt(enc("off", 1)).await.unwrap_err();
    assert_eq!(
        (err.code(), reason(&err).as_str()),
        (Code::FailedPrecondition, "KEY_DISABLED")
    );

    let err = c
        .generate_data_key(GenerateDataKeyRequest {
            key: "default".into(),
            spec: 42,
            context: BTreeMap::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    let big_ctx: BTreeMap<String, String> =
        (0..65).map(|i| (format!("k{i}"), "v".into())).collect();
    let err = c
        .encrypt(EncryptRequest {
            key: "default".into(),
            plaintext: vec![1].into(),
            context: big_ctx,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("at most 64"), "{}", err.message());

    let err = c
        .re_encrypt(ReEncryptRequest {
            ciphertext: vec![].into(),
            source_context: BTreeMap::new(),
            destination_key: "default".into(),
            destination_context: BTreeMap::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(reason(&err), "INVALID_CIPHERTEXT");
}

/// A key disabled in the keyring while the server runs: encrypt and decrypt both fail with
/// FAILED_PRECONDITION (as KMS does), even though a data key is cached; enabling restores both.
#[tokio::test]
async fn disabling_a_key_in_the_keyring_stops_cached_use() {
    let server = TestServer::start(&config("[local]\npoll_interval = \"100ms\"")).await;
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
    let ring = server.path("keyring");
    keybroker::keyring::edit(&ring, false, |r| r.set_enabled("default", false)).unwrap();
    let mut disabled = false;
    for _ in 0..50 {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        if let Err(e) = c
            .encrypt(EncryptRequest {
                key: "default".into(),
                plaintext: b"x".to_vec().into(),
                context: BTreeMap::new(),
            })
            .await
        {
            assert_eq!(
                (e.code(), reason(&e).as_str()),
                (Code::FailedPrecondition, "KEY_DISABLED")
            );
            disabled = true;
            break;
        }
    }
    assert!(disabled, "the server did not notice the disable within 5 s");
    let err = c
        .decrypt(DecryptRequest {
            ciphertext: ct.clone(),
            context: BTreeMap::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);

    keybroker::keyring::edit(&ring, false, |r| r.set_enabled("default", true)).unwrap();
    let mut back = false;
    for _ in 0..50 {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        if c.decrypt(DecryptRequest {
            ciphertext: ct.clone(),
            context: BTreeMap::new(),
        })
        .await
        .is_ok()
        {
            back = true;
            break;
        }
    }
    assert!(back, "re-enabled key did not decrypt again");
}

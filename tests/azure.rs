//! The Azure Key Vault backend against the HTTPS Key Vault fake (tests/support/azure_fake.rs):
//! the shared conformance suite, rotation, key state, throttling, token reuse, cache call counts,
//! error mapping, recovery without keybroker, and the fake's fidelity check against Microsoft's
//! own Python client.

use std::time::{Duration, Instant};

use aws_lc_rs::{aead, hkdf};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use keybroker::backend::azure::AzureSettings;
use keybroker::backend::call::CallPolicy;
use keybroker::backend::{BackendContext, BackendErrorKind, KeyBackend};
use keybroker::proto;
use keybroker::secret::SecretKey;
use tonic::Code;

use crate::support::azure_fake::KeyVaultFake;
use crate::support::{TestServer, conformance, ctx, reason};

fn settings() -> AzureSettings {
    AzureSettings {
        refresh_interval: Duration::ZERO,
        call: within(Duration::from_secs(5), 4),
        ..Default::default()
    }
}

/// Azure's call policy shape: attempts that may each take what is left of `timeout`.
fn within(timeout: Duration, max_attempts: u32) -> CallPolicy {
    CallPolicy {
        timeout,
        attempt_timeout: timeout,
        max_attempts,
    }
}

const CTX: BackendContext<'static> = BackendContext {
    key_name: "app",
    caller: "spiffe://test/app",
};

#[tokio::test]
async fn vault_rsa_keys_conform() {
    let fake = KeyVaultFake::start().await;
    fake.create_rsa_key("a");
    fake.create_rsa_key("b");
    let client = fake.vault_client();
    let a = fake.backend(&client, "a", &settings());
    let b = fake.backend(&client, "b", &settings());
    conformance::run_all(&a, &b).await;
    // One client for the vault: one challenge, one token, for every call on both keys.
    assert_eq!(fake.challenges(), 1);
    assert_eq!(fake.token_acquisitions(), 1);
    assert_eq!(
        fake.scopes(),
        vec!["https://vault.azure.net/.default".to_owned()]
    );
    // Wraps and unwraps use RSA-OAEP-256; every wrap is followed by a PS256 sign of it with the
    // same version, and nothing else is ever signed.
    let log = fake.log();
    assert!(
        log.iter().all(|(op, _, _, alg)| match op.as_str() {
            "sign" => alg == "PS256",
            _ => alg == "RSA-OAEP-256",
        }),
        "{log:?}"
    );
    let wraps: Vec<_> = log.iter().filter(|e| e.0 == "wrapKey").collect();
    let signs: Vec<_> = log.iter().filter(|e| e.0 == "sign").collect();
    assert_eq!(wraps.len(), signs.len(), "{log:?}");
    assert!(!wraps.is_empty());
}

#[tokio::test]
async fn managed_hsm_oct_keys_conform() {
    let fake = KeyVaultFake::start_hsm().await;
    fake.create_oct_key("a");
    fake.create_oct_key("b");
    let client = fake.vault_client();
    let a = fake.backend(&client, "a", &settings());
    let b = fake.backend(&client, "b", &settings());
    conformance::run_all(&a, &b).await;
    assert_eq!(
        fake.scopes(),
        vec!["https://managedhsm.azure.net/.default".to_owned()]
    );
    let log = fake.log();
    assert!(!log.is_empty());
    assert!(log.iter().all(|(_, _, _, alg)| alg == "A256KW"), "{log:?}");
}

#[tokio::test]
async fn wrap_records_the_exact_versioned_kid_and_unwraps_through_it() {
    let fake = KeyVaultFake::start().await;
    let v1 = fake.create_rsa_key("k");
    let client = fake.vault_client();
    let backend = fake.backend(&client, "k", &settings());
    let (key1, w1) = backend.generate_data_key(32, &CTX).await.unwrap();
    assert_eq!(w1.key_id, fake.key_url("k"));
    assert_eq!(w1.key_version, format!("{}/{v1}", fake.key_url("k")));
    let v2 = fake.rotate("k");
    let (_, w2) = backend.generate_data_key(32, &CTX).await.unwrap();
    assert_eq!(w2.key_version, format!("{}/{v2}", fake.key_url("k")));
    // The old copy still unwraps, through its own version.
    let got = backend
        .unwrap(&w1.as_copy(backend.kind()), &CTX)
        .await
        .unwrap();
    assert_eq!(got.as_ref(), key1.as_ref());
    let last = fake.log().pop().unwrap();
    assert_eq!(
        (last.0.as_str(), last.2.as_str()),
        ("unwrapKey", v1.as_str())
    );
    // A kid of another key in the same vault is refused before any call.
    fake.create_rsa_key("other");
    let calls = fake.unwraps();
    let mut forged = w1.clone();
    forged.key_version = format!("{}/{v1}", fake.key_url("other"));
    let err = backend
        .unwrap(&forged.as_copy(backend.kind()), &CTX)
        .await
        .err()
        .unwrap();
    assert_eq!(err.kind, BackendErrorKind::InvalidCiphertext);
    assert_eq!(fake.unwraps(), calls, "no call for a foreign kid");
}

#[tokio::test]
async fn pinned_version_wraps_with_that_version() {
    let fake = KeyVaultFake::start().await;
    let v1 = fake.create_rsa_key("k");
    fake.rotate("k");
    let url = format!("{}/{v1}", fake.key_url("k"));
    let backend = keybroker::backend::azure::AzureBackend::new(
        fake.vault_client(),
        keybroker::backend::azure::KeyUrl::parse(&url).unwrap(),
        &url,
        &settings(),
    );
    let (_, w) = backend.generate_data_key(32, &CTX).await.unwrap();
    assert_eq!(w.key_version, url);
    assert_eq!(w.key_id, fake.key_url("k"));
}

#[tokio::test]
async fn token_is_acquired_once_and_reused() {
    let fake = KeyVaultFake::start().await;
    fake.create_rsa_key("k");
    let client = fake.vault_client();
    let backend = fake.backend(&client, "k", &settings());
    for _ in 0..25 {
        let (key, w) = backend.generate_data_key(32, &CTX).await.unwrap();
        let back = backend
            .unwrap(&w.as_copy(backend.kind()), &CTX)
            .await
            .unwrap();
        assert_eq!(back.as_ref(), key.as_ref());
    }
    assert_eq!(fake.wraps(), 25);
    assert_eq!(fake.unwraps(), 25);
    assert_eq!(fake.token_acquisitions(), 1);
    assert_eq!(fake.challenges(), 1);
    assert_eq!(fake.refused_tokens(), 0);
}

#[tokio::test]
async fn throttling_waits_for_retry_after_then_succeeds() {
    let fake = KeyVaultFake::start().await;
    fake.create_rsa_key("k");
    let client = fake.vault_client();
    let backend = fake.backend(&client, "k", &settings());
    backend.describe().await.unwrap(); // authenticate first; only crypto calls are throttled
    fake.inject(2, 429, Some(1));
    let started = Instant::now();
    let key = SecretKey::generate(32).unwrap();
    backend.wrap(&key, &CTX).await.unwrap();
    assert!(
        started.elapsed() >= Duration::from_millis(1900),
        "two Retry-After: 1 waits must be honoured, took {:?}",
        started.elapsed()
    );
    assert_eq!(fake.injected(), 2);
    assert_eq!(fake.wraps(), 3);
}

#[tokio::test]
async fn persistent_throttling_gives_up_within_the_deadline() {
    let fake = KeyVaultFake::start().await;
    fake.create_rsa_key("k");
    let client = fake.vault_client();
    let s = AzureSettings {
        call: within(Duration::from_millis(2800), 11),
        ..settings()
    };
    let backend = fake.backend(&client, "k", &s);
    backend.describe().await.unwrap();
    fake.inject(1000, 429, Some(1));
    let started = Instant::now();
    let key = SecretKey::generate(32).unwrap();
    let err = backend.wrap(&key, &CTX).await.err().unwrap();
    assert_eq!(err.kind, BackendErrorKind::Throttled, "{err}");
    assert!(
        started.elapsed() < Duration::from_millis(2800),
        "{:?}",
        started.elapsed()
    );
    // Waited for Retry-After twice (t=1s, t=2s), then saw a third 429 it could not wait out.
    assert_eq!(fake.injected(), 3);
}

#[tokio::test]
async fn server_errors_are_retried_then_unavailable() {
    let fake = KeyVaultFake::start().await;
    fake.create_rsa_key("k");
    let client = fake.vault_client();
    let s = AzureSettings {
        call: within(Duration::from_secs(5), 3),
        ..settings()
    };
    let backend = fake.backend(&client, "k", &s);
    backend.describe().await.unwrap();
    fake.inject(1000, 503, None);
    let key = SecretKey::generate(32).unwrap();
    let err = backend.wrap(&key, &CTX).await.err().unwrap();
    assert_eq!(err.kind, BackendErrorKind::Unavailable, "{err}");
    assert_eq!(fake.wraps(), 3, "one try and two retries");
    // A transient 500 is absorbed.
    fake.inject(1, 500, None);
    backend.wrap(&key, &CTX).await.unwrap();
}

#[tokio::test]
async fn backend_errors_are_classified() {
    let fake = KeyVaultFake::start().await;
    fake.create_rsa_key("k");
    let client = fake.vault_client();
    let backend = fake.backend(&client, "k", &settings());
    let key = SecretKey::generate(32).unwrap();
    let (_, w) = backend.generate_data_key(32, &CTX).await.unwrap();

    let missing = fake.backend(&client, "missing", &settings());
    let e = missing.wrap(&key, &CTX).await.err().unwrap();
    assert_eq!(e.kind, BackendErrorKind::NotFound, "{e}");

    fake.set_key_ops("k", &["wrapKey"]);
    let e = backend
        .unwrap(&w.as_copy(backend.kind()), &CTX)
        .await
        .err()
        .unwrap();
    assert_eq!(e.kind, BackendErrorKind::Disabled, "{e}");
    fake.set_key_ops("k", &["wrapKey", "unwrapKey"]);

    // Expired: no new wraps, but existing data stays readable (Key Vault semantics).
    fake.set_validity("k", None, Some(1_000_000_000));
    let e = backend.wrap(&key, &CTX).await.err().unwrap();
    assert_eq!(e.kind, BackendErrorKind::Disabled, "{e}");
    backend
        .unwrap(&w.as_copy(backend.kind()), &CTX)
        .await
        .unwrap();
    fake.set_validity("k", Some(4_000_000_000), None);
    let e = backend.wrap(&key, &CTX).await.err().unwrap();
    assert_eq!(e.kind, BackendErrorKind::Disabled, "{e}");
    fake.set_validity("k", None, None);

    fake.deny("k");
    let e = backend.wrap(&key, &CTX).await.err().unwrap();
    assert_eq!(e.kind, BackendErrorKind::PermissionDenied, "{e}");
    // The caller-visible message is ours, never Key Vault's body.
    assert!(!e.message.contains("Caller is not authorized"), "{e}");
    assert!(!e.message.contains("appid"), "{e}");

    let fresh = KeyVaultFake::start().await;
    fresh.create_rsa_key("k");
    let c2 = fresh.vault_client();
    let b2 = fresh.backend(&c2, "k", &settings());
    fresh.refuse_tokens(true);
    let e = b2.wrap(&key, &CTX).await.err().unwrap();
    assert_eq!(e.kind, BackendErrorKind::Unauthenticated, "{e}");
    assert!(fresh.refused_tokens() >= 1);

    // A vault that does not answer: connection refused once the fake is gone.
    let addr_gone = {
        let f = KeyVaultFake::start().await;
        f.create_rsa_key("k");
        let c = f.vault_client();
        let b = f.backend(
            &c,
            "k",
            &AzureSettings {
                call: within(Duration::from_secs(5), 2),
                ..settings()
            },
        );
        drop(f);
        tokio::time::sleep(Duration::from_millis(50)).await;
        b.wrap(&key, &CTX).await.err().unwrap()
    };
    assert_eq!(addr_gone.kind, BackendErrorKind::Unavailable, "{addr_gone}");
}

fn azure_config(fake: &KeyVaultFake, azure: &str, keys: &[(&str, &str, &str)]) -> String {
    let mut text = format!("[azure]\n{azure}\n");
    for (name, key, extra) in keys {
        text.push_str(&format!(
            "[keys.{name}]\nbackend = \"azure\"\nkey_id = \"{}\"\n{extra}\n",
            fake.key_url(key)
        ));
    }
    text
}

async fn encrypt(
    server: &TestServer,
    key: &str,
    plaintext: &[u8],
) -> Result<proto::EncryptResponse, tonic::Status> {
    server
        .client()
        .await
        .encrypt(proto::EncryptRequest {
            key: key.to_owned(),
            plaintext: plaintext.to_vec().into(),
            context: ctx(&[("tenant", "t1")]),
        })
        .await
        .map(|r| r.into_inner())
}

async fn decrypt(server: &TestServer, ciphertext: &[u8]) -> Result<Vec<u8>, tonic::Status> {
    server
        .client()
        .await
        .decrypt(proto::DecryptRequest {
            ciphertext: ciphertext.to_vec().into(),
            context: ctx(&[("tenant", "t1")]),
        })
        .await
        .map(|r| r.into_inner().plaintext.to_vec())
}

#[tokio::test]
async fn rotation_through_a_server() {
    let fake = KeyVaultFake::start().await;
    let v1 = fake.create_rsa_key("k");
    fake.install_hooks();
    let config = azure_config(&fake, "refresh_interval = \"100ms\"", &[("app", "k", "")]);
    let server = TestServer::start(&config).await;
    let first = encrypt(&server, "app", b"before rotation").await.unwrap();
    assert_eq!(first.key_version, format!("{}/{v1}", fake.key_url("k")));

    let v2 = fake.rotate("k");
    // The refresh task sees the new current version and retires the cached data key.
    let mut seen = String::new();
    for _ in 0..50 {
        seen = encrypt(&server, "app", b"after rotation")
            .await
            .unwrap()
            .key_version;
        if seen.ends_with(&v2) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(seen, format!("{}/{v2}", fake.key_url("k")));

    // A fresh server (empty caches) reads the old ciphertext through its recorded kid.
    let server2 = TestServer::start(&config).await;
    let unwraps = fake.unwraps();
    assert_eq!(
        decrypt(&server2, &first.ciphertext).await.unwrap(),
        b"before rotation"
    );
    assert_eq!(fake.unwraps(), unwraps + 1);
    let last = fake.log().pop().unwrap();
    assert_eq!(
        (last.0.as_str(), last.2.as_str()),
        ("unwrapKey", v1.as_str())
    );
    server.stop().await;
    server2.stop().await;
}

#[tokio::test]
async fn disabled_key_and_forbidden_ops_fail_precondition() {
    let fake = KeyVaultFake::start().await;
    fake.create_rsa_key("k");
    fake.create_rsa_key("polled");
    fake.install_hooks();
    let config = azure_config(
        &fake,
        "refresh_interval = \"0s\"",
        &[("app", "k", "cache.enabled = false")],
    );
    let server = TestServer::start(&config).await;
    let ct = encrypt(&server, "app", b"x").await.unwrap().ciphertext;

    fake.set_enabled("k", false);
    for status in [
        encrypt(&server, "app", b"x").await.err().unwrap(),
        decrypt(&server, &ct).await.err().unwrap(),
    ] {
        assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
        assert_eq!(reason(&status), "KEY_DISABLED");
    }
    fake.set_enabled("k", true);
    fake.set_key_ops("k", &["unwrapKey"]);
    let status = encrypt(&server, "app", b"x").await.err().unwrap();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert_eq!(decrypt(&server, &ct).await.unwrap(), b"x");
    server.stop().await;

    // With the refresh task, a disabled key stops working even from cache.
    let config = azure_config(
        &fake,
        "refresh_interval = \"100ms\"",
        &[("polled", "polled", "")],
    );
    let server = TestServer::start(&config).await;
    let ct = encrypt(&server, "polled", b"y").await.unwrap().ciphertext;
    assert_eq!(decrypt(&server, &ct).await.unwrap(), b"y");
    let wraps = fake.wraps();
    fake.set_enabled("polled", false);
    let mut last = None;
    for _ in 0..50 {
        match encrypt(&server, "polled", b"y").await {
            Ok(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            Err(s) => {
                last = Some(s);
                break;
            }
        }
    }
    let status = last.expect("a disabled key must stop working");
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert_eq!(reason(&status), "KEY_DISABLED");
    assert_eq!(
        fake.wraps(),
        wraps,
        "refused before the cache, without a wrap call"
    );
    let status = decrypt(&server, &ct).await.err().unwrap();
    assert_eq!(status.code(), Code::FailedPrecondition);
    server.stop().await;

    // An expired key (exp) wraps no new data keys, but existing data stays readable, as in Key
    // Vault: the refresh task retires the cached data key, the next wrap is refused.
    fake.create_rsa_key("expiring");
    let config = azure_config(
        &fake,
        "refresh_interval = \"100ms\"",
        &[("expiring", "expiring", "")],
    );
    let server = TestServer::start(&config).await;
    let ct = encrypt(&server, "expiring", b"z").await.unwrap().ciphertext;
    fake.set_validity("expiring", None, Some(1_000_000_000));
    let mut last = None;
    for _ in 0..50 {
        match encrypt(&server, "expiring", b"z").await {
            Ok(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            Err(s) => {
                last = Some(s);
                break;
            }
        }
    }
    let status = last.expect("an expired key must stop wrapping");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert_eq!(reason(&status), "KEY_DISABLED");
    assert_eq!(decrypt(&server, &ct).await.unwrap(), b"z");
    let server2 = TestServer::start(&config).await;
    assert_eq!(
        decrypt(&server2, &ct).await.unwrap(),
        b"z",
        "unwrap of an expired key works"
    );
    server.stop().await;
    server2.stop().await;
}

#[tokio::test]
async fn server_maps_throttling_and_errors_to_statuses() {
    let fake = KeyVaultFake::start().await;
    fake.create_rsa_key("k");
    fake.install_hooks();
    let config = azure_config(
        &fake,
        "refresh_interval = \"0s\"\ndeadline = \"2800ms\"\nretries = 10",
        &[
            ("app", "k", "cache.enabled = false"),
            ("gone", "missing", ""),
        ],
    );
    let server = TestServer::start(&config).await;
    let ct = encrypt(&server, "app", b"x").await.unwrap().ciphertext;

    fake.inject(1000, 429, Some(1));
    let started = Instant::now();
    let status = encrypt(&server, "app", b"x").await.err().unwrap();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(reason(&status), "BACKEND_THROTTLED");
    assert!(started.elapsed() < Duration::from_millis(2800));
    fake.inject(0, 429, None);

    let status = encrypt(&server, "gone", b"x").await.err().unwrap();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    assert_eq!(reason(&status), "BACKEND_KEY_NOT_FOUND");
    assert!(!status.message().contains("was not found in this key vault"));

    // A tampered wrapped key: its signature no longer verifies, so it is refused before
    // unwrapKey; decryption fails, like any tampering.
    let unwraps = fake.unwraps();
    let mut bad = ct.to_vec();
    let env = keybroker::envelope::parse(&ct).unwrap();
    let wrapped = env.copies[0].wrapped;
    let at = bad
        .windows(wrapped.len())
        .position(|w| w == wrapped)
        .unwrap();
    bad[at + 10] ^= 1;
    let status = decrypt(&server, &bad).await.err().unwrap();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(reason(&status), "DECRYPTION_FAILED");
    assert_eq!(fake.unwraps(), unwraps);

    fake.refuse_tokens(true);
    let status = encrypt(&server, "app", b"x").await.err().unwrap();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert_eq!(reason(&status), "BACKEND_UNAUTHENTICATED");
    server.stop().await;
}

#[tokio::test]
async fn cache_call_counts_are_seen_at_the_fake() {
    let fake = KeyVaultFake::start().await;
    fake.create_rsa_key("k");
    fake.install_hooks();
    let config = azure_config(&fake, "refresh_interval = \"0s\"", &[("app", "k", "")]);
    let server = TestServer::start(&config).await;
    let mut cts = Vec::new();
    for i in 0..20u8 {
        cts.push(encrypt(&server, "app", &[i; 10]).await.unwrap().ciphertext);
    }
    assert_eq!(fake.wraps(), 1, "20 encrypts, one data key");
    for (i, ct) in cts.iter().enumerate() {
        assert_eq!(decrypt(&server, ct).await.unwrap(), vec![i as u8; 10]);
    }
    assert_eq!(
        fake.unwraps(),
        0,
        "the decrypt cache was seeded by the encrypt"
    );
    let server2 = TestServer::start(&config).await;
    for ct in &cts {
        decrypt(&server2, ct).await.unwrap();
    }
    assert_eq!(
        fake.unwraps(),
        1,
        "20 decrypts on a fresh server, one unwrap"
    );
    // Both servers' clients got one token each (one client per vault per registry).
    assert_eq!(fake.token_acquisitions(), 2);
    server.stop().await;
    server2.stop().await;
}

/// What docs/azure.md tells an operator to do without keybroker: take the RSA ciphertext (the
/// first half of the signed copy), unwrap it with the `unwrapkey` REST call (`az rest ...`) on
/// the recorded kid, drop the 48-byte prefix, then open the envelope per docs/envelope.md
/// (format 2). Implemented here independently of keybroker's code.
#[tokio::test]
async fn data_is_recoverable_without_keybroker() {
    let fake = KeyVaultFake::start().await;
    fake.create_rsa_key("k");
    fake.install_hooks();
    let config = azure_config(&fake, "refresh_interval = \"0s\"", &[("app", "k", "")]);
    let server = TestServer::start(&config).await;
    let plaintext = b"recover me with the Azure CLI".to_vec();
    let ct = encrypt(&server, "app", &plaintext)
        .await
        .unwrap()
        .ciphertext;
    server.stop().await;

    let env = keybroker::envelope::parse(&ct).unwrap();
    let copy = env.copies[0];
    assert_eq!(copy.key_id, fake.key_url("k"));
    // az rest --method post --resource https://vault.azure.net \
    //   --url "<kid>/unwrapkey?api-version=7.4" --body '{"alg":"RSA-OAEP-256","value":"..."}'
    // RSA-2048: 256 bytes of RSA-OAEP ciphertext, then Key Vault's 256-byte signature.
    assert_eq!(copy.wrapped.len(), 512);
    let body = serde_json::json!({
        "alg": "RSA-OAEP-256",
        "value": URL_SAFE_NO_PAD.encode(&copy.wrapped[..256]),
    });
    let resp = fake
        .http_client()
        .post(format!("{}/unwrapkey?api-version=7.4", copy.key_version))
        .bearer_auth(fake.mint_token())
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let resp: serde_json::Value = serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap();
    let unwrapped = URL_SAFE_NO_PAD
        .decode(resp["value"].as_str().unwrap())
        .unwrap();
    // 16 random bytes, the 32-byte context binding, then the data key.
    assert_eq!(unwrapped.len(), 16 + 32 + 32);
    let data_key = &unwrapped[48..];
    // The binding: SHA-256("keybroker azure wrap v1" || canonical {keybroker:caller, keybroker:key}).
    let mut bound = b"keybroker azure wrap v1".to_vec();
    bound.extend_from_slice(&2u16.to_be_bytes());
    for s in [
        "keybroker:caller",
        env.caller,
        "keybroker:key",
        env.key_name,
    ] {
        bound.extend_from_slice(&(s.len() as u16).to_be_bytes());
        bound.extend_from_slice(s.as_bytes());
    }
    assert_eq!(
        &unwrapped[16..48],
        aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &bound).as_ref()
    );

    // docs/envelope.md: header = everything before the body; the header ends with
    // salt (32) || commitment (32); body = ciphertext || tag (16).
    assert_eq!(ct[2], 2, "format 2");
    let body_len = env.payload_len() + 16;
    let header = &ct[..ct.len() - body_len];
    let salt = &header[header.len() - 64..header.len() - 32];
    let commitment = &header[header.len() - 32..];
    // Canonical context: u16 pair count, then sorted (u16 len || key, u16 len || value).
    let mut context = 1u16.to_be_bytes().to_vec();
    for s in ["tenant", "t1"] {
        context.extend_from_slice(&(s.len() as u16).to_be_bytes());
        context.extend_from_slice(s.as_bytes());
    }
    // Format 2: info = label || SHA-256(header up to the salt || canonical context).
    let mut bound = header[..header.len() - 32].to_vec();
    bound.extend_from_slice(&context);
    let binding = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &bound);
    struct Len64;
    impl hkdf::KeyType for Len64 {
        fn len(&self) -> usize {
            64
        }
    }
    let mut okm = [0u8; 64];
    hkdf::Salt::new(hkdf::HKDF_SHA256, salt)
        .extract(data_key)
        .expand(&[b"keybroker envelope v2", binding.as_ref()], Len64)
        .unwrap()
        .fill(&mut okm)
        .unwrap();
    assert_eq!(&okm[32..], commitment, "key commitment");
    let mut aad = header.to_vec();
    aad.extend_from_slice(&context);
    let key =
        aead::LessSafeKey::new(aead::UnboundKey::new(&aead::AES_256_GCM, &okm[..32]).unwrap());
    let mut body = ct[ct.len() - body_len..].to_vec();
    let opened = key
        .open_in_place(
            aead::Nonce::assume_unique_for_key([0u8; 12]),
            aead::Aad::from(&aad[..]),
            &mut body,
        )
        .unwrap();
    assert_eq!(opened, plaintext.as_slice());
}

#[test]
fn config_reports_bad_key_urls_with_their_path() {
    let err = keybroker::config::Config::parse(
        r#"
        [azure]
        credential = "client_secret"
        [keys.a]
        backend = "azure"
        key_id = "https://vault1.vault.azure.net/secrets/x"
        [keys.b]
        backend = "azure"
        key_id = "http://vault1.vault.azure.net/keys/x"
        [keys.c]
        backend = "azure"
        key_id = "https://vault1.vault.azure.net/keys/x/0123456789abcdef0123456789abcdef"
        "#,
        "test.toml",
        std::path::Path::new("/etc/kb"),
    )
    .unwrap_err();
    let text: Vec<String> = err.problems.iter().map(|p| p.to_string()).collect();
    let has = |s: &str| text.iter().any(|t| t.starts_with(s));
    assert!(
        has("keys.a.key_id: \"https://vault1.vault.azure.net/secrets/x\" is not an Azure key URL"),
        "{text:#?}"
    );
    assert!(has("keys.b.key_id:"), "{text:#?}");
    assert!(has("azure.client_secret_file: is required"), "{text:#?}");
    assert!(!has("keys.c"), "{text:#?}");
    assert_eq!(text.len(), 3, "{text:#?}");
}

/// The test venv's python (scripts/test-setup makes it); a missing venv is a failure.
fn venv_python() -> std::path::PathBuf {
    crate::support::venv_bin("python")
}

/// Microsoft's Python client (azure-keyvault-keys) against the fake: sign/verify (PS256, RS256,
/// locally and remotely verified), wrap/unwrap with
/// RSA-OAEP-256 and A256KW, a disabled key, a tampered wrapped key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fake_agrees_with_microsofts_python_client() {
    let python = venv_python();
    let vault = KeyVaultFake::start().await;
    let v = vault.create_rsa_key("fidelity");
    let off = vault.create_rsa_key("off");
    vault.set_enabled("off", false);
    let noget = vault.create_rsa_key("noget");
    vault.deny_get("noget");
    let hsm = KeyVaultFake::start_hsm().await;
    let o = hsm.create_oct_key("sym");
    // Without keys/get the Python client does both operations remotely. (With get, it builds a
    // local provider from the oct-HSM JWK, which carries no `k`, and would wrap under a random
    // local key instead: a quirk of azure-keyvault-keys 4.11 worth knowing.)
    hsm.deny_get("sym");
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    // One Entra token for both: the HSM fake is told to accept the vault fake's token.
    std::fs::write(&ca, format!("{}{}", vault.ca_pem, hsm.ca_pem)).unwrap();
    let token = vault.mint_token();
    hsm.accept_token(&token);
    let mut child = std::process::Command::new(python)
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fidelity/azure_keyvault_client.py"
        ))
        .arg(&ca)
        .arg(&token)
        .arg(format!("{}/{v}", vault.loopback_url("fidelity")))
        .arg(format!("{}/{off}", vault.loopback_url("off")))
        .arg(format!("{}/{o}", hsm.loopback_url("sym")))
        .arg(format!("{}/{noget}", vault.loopback_url("noget")))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Bounded wait (the fakes run on this runtime, so never block it).
    let mut exited = false;
    for _ in 0..1200 {
        if child.try_wait().unwrap().is_some() {
            exited = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if !exited {
        let _ = child.kill();
    }
    let out = child.wait_with_output().unwrap();
    assert!(exited, "the python client did not finish within 120s");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "exit {:?}\n{stdout}\n{stderr}",
        out.status
    );
    for check in [
        "rsa-wrap",
        "rsa-unwrap",
        "rsa-kid",
        "bad-ciphertext",
        "disabled",
        "oct-wrap",
        "oct-unwrap",
        "ps256-sign",
        "ps256-verify-local",
        "ps256-verify-bad",
        "rs256-sign",
        "rs256-verify-local",
        "rs256-verify-bad",
        "rs256-deterministic",
        "verify-remote",
        "verify-remote-bad",
        "sign-bad-digest",
        "policy-default",
        "policy-put",
        "policy-get",
        "policy-short-expiry",
        "key-created",
        "scopes",
    ] {
        assert!(
            stdout
                .lines()
                .any(|l| l.starts_with(&format!("ok {check}"))),
            "{check} missing\n{stdout}\n{stderr}"
        );
    }
    assert!(!stdout.contains("FAIL"), "{stdout}");
    // The client went through the challenge and reached the keys.
    assert!(vault.challenges() >= 1);
    assert!(vault.unwraps() >= 3, "rsa unwrap, tampered, disabled");
    assert!(
        vault.signs() >= 6 && vault.verifies() >= 2,
        "{:?}",
        vault.log()
    );
    assert_eq!(
        (hsm.wraps(), hsm.unwraps()),
        (1, 1),
        "{stdout}\n{:?}\n{:?}",
        hsm.log(),
        vault.log()
    );
}

#[tokio::test]
async fn startup_reports_credential_problems_with_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        r#"
[azure]
credential = "client_secret"
tenant_id = "00000000-0000-0000-0000-000000000000"
client_id = "11111111-1111-1111-1111-111111111111"
client_secret_file = "{}/missing-secret"
[keys.app]
backend = "azure"
key_id = "https://kbnohooks.vault.azure.net/keys/k"
"#,
        dir.path().display()
    );
    let config = keybroker::config::Config::parse(&text, "test.toml", dir.path()).unwrap();
    let err = keybroker::server::start(&config)
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("keys.app"), "{err}");
    assert!(
        err.contains("cannot read azure.client_secret_file"),
        "{err}"
    );
}

/// The public key of a key version, as anyone allowed to `get` the key (or holding any copy of
/// the public key) has it: from the JWK of GET key.
async fn public_key(fake: &KeyVaultFake, kid: &str) -> (Vec<u8>, Vec<u8>) {
    let jwk: serde_json::Value = serde_json::from_slice(
        &fake
            .http_client()
            .get(format!("{kid}?api-version=7.4"))
            .bearer_auth(fake.mint_token())
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap(),
    )
    .unwrap();
    let field = |f: &str| {
        URL_SAFE_NO_PAD
            .decode(jwk["key"][f].as_str().unwrap())
            .unwrap()
    };
    (field("n"), field("e"))
}

/// What a forger with only the public key makes: RSA-OAEP-256 of the documented plaintext
/// (random || SHA-256(label || context) || a data key of their choice).
fn forge_rsa_wrap(n: &[u8], e: &[u8], ctx: &BackendContext<'_>, chosen: &[u8]) -> Vec<u8> {
    let public: aws_lc_rs::rsa::PublicEncryptingKey =
        aws_lc_rs::signature::RsaPublicKeyComponents { n, e }
            .try_into()
            .unwrap();
    let oaep = aws_lc_rs::rsa::OaepPublicEncryptingKey::new(public).unwrap();
    let mut bound = b"keybroker azure wrap v1".to_vec();
    bound.extend_from_slice(&ctx.to_aad());
    let mut plain = vec![0u8; 16];
    plain.extend_from_slice(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &bound).as_ref());
    plain.extend_from_slice(chosen);
    let mut out = vec![0u8; oaep.ciphertext_size()];
    oaep.encrypt(
        &aws_lc_rs::rsa::OAEP_SHA256_MGF1SHA256,
        &plain,
        &mut out,
        None,
    )
    .unwrap()
    .to_vec()
}

/// Issue 21 item 2: RSA-OAEP gives no authenticity, so a copy minted with the public key alone
/// (no Key Vault permission beyond `get`, or none at all) used to unwrap to the forger's data
/// key, and ciphertexts sealed with it decrypted. Now every copy carries Key Vault's signature:
/// a forged copy, signed or not, is refused before any unwrapKey.
#[tokio::test]
async fn a_copy_minted_with_the_public_key_is_refused() {
    let fake = KeyVaultFake::start().await;
    fake.create_rsa_key("k");
    fake.install_hooks();
    let config = azure_config(&fake, "refresh_interval = \"0s\"", &[("app", "k", "")]);
    let server = TestServer::start(&config).await;
    let genuine = encrypt(&server, "app", b"genuine").await.unwrap();
    let env = keybroker::envelope::parse(&genuine.ciphertext).unwrap();
    let real = env.copies[0];
    let ctx = BackendContext {
        key_name: env.key_name,
        caller: env.caller,
    };
    let (n, e) = public_key(&fake, real.key_version).await;
    let chosen = SecretKey::from_slice(&[0x11; 32]);
    let forged_rsa = forge_rsa_wrap(&n, &e, &ctx, chosen.as_ref());
    // Unsigned (the old format), and with a signature borrowed from the genuine copy.
    let mut borrowed = forged_rsa.clone();
    borrowed.extend_from_slice(&real.wrapped[256..]);
    let unwraps = fake.unwraps();
    for wrapped in [forged_rsa, borrowed] {
        let copy = keybroker::envelope::WrappedCopy {
            wrapped: &wrapped,
            ..real
        };
        let forged = keybroker::envelope::seal(
            keybroker::envelope::Kind::Message,
            env.key_name,
            env.caller,
            &[copy],
            &chosen,
            &ctx_map(),
            b"forged",
        )
        .unwrap();
        let status = decrypt(&server, &forged)
            .await
            .expect_err("a forgery decrypted");
        assert_eq!(reason(&status), "DECRYPTION_FAILED", "{status:?}");
    }
    assert_eq!(fake.unwraps(), unwraps, "refused before unwrapKey");
    assert_eq!(
        decrypt(&server, &genuine.ciphertext).await.unwrap(),
        b"genuine"
    );
    server.stop().await;
}

fn ctx_map() -> std::collections::BTreeMap<String, String> {
    ctx(&[("tenant", "t1")])
}

/// What a signed RSA copy is, checked independently: RSA ciphertext || PS256 signature by the
/// same key version over SHA-256("keybroker azure wrap v2 signature" || u16 len(kid) || kid ||
/// binding || RSA ciphertext), verifiable with the public key alone. One sign per wrap, none per
/// unwrap; the kid is recorded in keybroker's one spelling.
#[tokio::test]
async fn rsa_wraps_carry_a_key_vault_signature() {
    let fake = KeyVaultFake::start().await;
    let v = fake.create_rsa_key("k");
    let client = fake.vault_client();
    let backend = fake.backend(&client, "k", &settings());
    let (key, w) = backend.generate_data_key(32, &CTX).await.unwrap();
    assert_eq!(w.key_version, format!("{}/{v}", fake.key_url("k")));
    assert_eq!(w.ciphertext.len(), 512);
    assert_eq!((fake.wraps(), fake.signs()), (1, 1));
    let (ct, sig) = w.ciphertext.split_at(256);
    let mut bound = b"keybroker azure wrap v1".to_vec();
    bound.extend_from_slice(&CTX.to_aad());
    let binding = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &bound);
    let mut message = b"keybroker azure wrap v2 signature".to_vec();
    message.extend_from_slice(&(w.key_version.len() as u16).to_be_bytes());
    message.extend_from_slice(w.key_version.as_bytes());
    message.extend_from_slice(binding.as_ref());
    message.extend_from_slice(ct);
    let (n, e) = public_key(&fake, &w.key_version).await;
    aws_lc_rs::signature::RsaPublicKeyComponents { n: &n, e: &e }
        .verify(
            &aws_lc_rs::signature::RSA_PSS_2048_8192_SHA256,
            &message,
            sig,
        )
        .expect("a PS256 signature by the key version");
    let sign = fake.log().into_iter().find(|l| l.0 == "sign").unwrap();
    assert_eq!((sign.2.as_str(), sign.3.as_str()), (v.as_str(), "PS256"));
    for _ in 0..3 {
        let back = backend
            .unwrap(&w.as_copy(backend.kind()), &CTX)
            .await
            .unwrap();
        assert_eq!(back.as_ref(), key.as_ref());
    }
    assert_eq!((fake.unwraps(), fake.signs()), (3, 1), "no sign on unwrap");
    // The signature covers the context binding: another caller's context fails at the
    // signature, before unwrapKey.
    let other = BackendContext {
        caller: "someone-else",
        ..CTX
    };
    let err = backend
        .unwrap(&w.as_copy(backend.kind()), &other)
        .await
        .err()
        .unwrap();
    assert_eq!(err.kind, BackendErrorKind::InvalidCiphertext);
    assert_eq!(fake.unwraps(), 3);
}

/// `rsa_wrap_signatures`: "off" writes unsigned copies (no `sign` needed); "required" (the
/// default) refuses those; "accept_unsigned" reads both, for data written before signatures.
#[tokio::test]
async fn unsigned_rsa_copies_are_refused_unless_accepted() {
    use keybroker::backend::azure::RsaSignatures;
    let fake = KeyVaultFake::start().await;
    fake.create_rsa_key("k");
    let client = fake.vault_client();
    let with = |r| {
        fake.backend(
            &client,
            "k",
            &AzureSettings {
                rsa_wrap_signatures: r,
                ..settings()
            },
        )
    };
    let (off, required, accepting) = (
        with(RsaSignatures::Off),
        with(RsaSignatures::Required),
        with(RsaSignatures::AcceptUnsigned),
    );
    let (key, unsigned) = off.generate_data_key(32, &CTX).await.unwrap();
    assert_eq!(unsigned.ciphertext.len(), 256);
    assert_eq!(fake.signs(), 0);
    let unwraps = fake.unwraps();
    let err = required
        .unwrap(&unsigned.as_copy(required.kind()), &CTX)
        .await
        .err()
        .unwrap();
    assert_eq!(err.kind, BackendErrorKind::InvalidCiphertext);
    assert!(err.message.contains("unsigned"), "{err}");
    assert_eq!(fake.unwraps(), unwraps, "refused before unwrapKey");
    for b in [&accepting, &off] {
        let back = b.unwrap(&unsigned.as_copy(b.kind()), &CTX).await.unwrap();
        assert_eq!(back.as_ref(), key.as_ref());
    }
    // Signed copies are checked in every mode (a bad signature is never accepted).
    let (_, signed) = accepting.generate_data_key(32, &CTX).await.unwrap();
    let mut bad = signed.clone();
    *bad.ciphertext.last_mut().unwrap() ^= 1;
    for b in [&required, &accepting, &off] {
        b.unwrap(&signed.as_copy(b.kind()), &CTX).await.unwrap();
        let err = b.unwrap(&bad.as_copy(b.kind()), &CTX).await.err().unwrap();
        assert_eq!(err.kind, BackendErrorKind::InvalidCiphertext);
    }
}

/// A key whose key_ops lack `sign` cannot make signed wraps: the wrap fails with a clear
/// FAILED_PRECONDITION naming `sign`, not silently unsigned.
#[tokio::test]
async fn a_key_without_sign_fails_clearly() {
    let fake = KeyVaultFake::start().await;
    fake.create_rsa_key("k");
    fake.set_key_ops("k", &["wrapKey", "unwrapKey"]);
    fake.install_hooks();
    let config = azure_config(&fake, "refresh_interval = \"0s\"", &[("app", "k", "")]);
    let server = TestServer::start(&config).await;
    let status = encrypt(&server, "app", b"x").await.err().unwrap();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert_eq!(reason(&status), "KEY_DISABLED");
    assert!(status.message().contains("sign"), "{}", status.message());
    server.stop().await;
    let config = azure_config(
        &fake,
        "refresh_interval = \"0s\"\nrsa_wrap_signatures = \"off\"",
        &[("app", "k", "")],
    );
    let server = TestServer::start(&config).await;
    let ct = encrypt(&server, "app", b"x").await.unwrap().ciphertext;
    assert_eq!(decrypt(&server, &ct).await.unwrap(), b"x");
    server.stop().await;
}

/// Issue 21 item 13 for Azure: the key id and kid are accepted only as keybroker records them
/// (lower-case host, no port, no trailing slash, the configured name's spelling, a lower-case
/// version); each respelling used to be a new cache entry and another paid unwrapKey.
#[tokio::test]
async fn respelled_key_urls_are_refused_without_a_call() {
    let fake = KeyVaultFake::start().await;
    fake.create_rsa_key("app-key");
    let client = fake.vault_client();
    let backend = fake.backend(&client, "app-key", &settings());
    let before = std::cell::Cell::new(0);
    conformance::respelled_copies_are_refused(&backend, |w| {
        before.set(fake.unwraps());
        let host = fake.host.clone();
        let respell = |s: &str, from: &str, to: &str| s.replacen(from, to, 1);
        let version = w.key_version.rsplit('/').next().unwrap().to_owned();
        let mut out = Vec::new();
        for kid in [
            respell(&w.key_version, &host, &host.to_uppercase()),
            respell(&w.key_version, &host, &format!("{host}:443")),
            format!("{}/", w.key_version),
            respell(&w.key_version, "/app-key/", "/APP-KEY/"),
            respell(&w.key_version, &version, &version.to_uppercase()),
        ] {
            let mut x = w.clone();
            x.key_version = kid;
            out.push(x);
        }
        for id in [
            respell(&w.key_id, &host, &host.to_uppercase()),
            format!("{}/", w.key_id),
            respell(&w.key_id, "/app-key", "/App-Key"),
        ] {
            let mut x = w.clone();
            x.key_id = id;
            out.push(x);
        }
        out
    })
    .await;
    assert_eq!(
        fake.unwraps(),
        before.get() + 1,
        "only the genuine copy was unwrapped"
    );
}

//! The GCP Cloud KMS backend against the in-repo Cloud KMS fake (`support/gcp_fake.rs`): the
//! conformance suite, rotation and version states through a real keybroker server, CRC32C
//! integrity, error mapping, cache call counts seen at the fake, recovery without keybroker, and
//! the fake's fidelity to Google's official Python client.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_lc_rs::{aead, hkdf};
use gcloud_sdk::GoogleApi;
use gcloud_sdk::google::cloud::kms::v1::DecryptRequest;
use gcloud_sdk::google::cloud::kms::v1::key_management_service_client::KeyManagementServiceClient;
use keybroker::backend::call::CallPolicy;
use keybroker::backend::gcp::{
    DEFAULT_ATTEMPT_TIMEOUT, DEFAULT_ENDPOINT, DEFAULT_MAX_ATTEMPTS, GcpBackend, GcpClient,
    GcpCredentials, GcpSettings, crc32c,
};
use keybroker::backend::{BackendErrorKind, BackendKind, KeyBackend};
use keybroker::config::{BackendConfig, Config, ListenAddr};
use keybroker::proto::{
    DecryptRequest as KbDecrypt, EncryptRequest as KbEncrypt, GenerateDataKeyRequest,
};
use keybroker::secret::SecretKey;
use tonic::Code;

use crate::support::conformance::{self, CTX};
use crate::support::gcp_fake::{self, GcpKmsFake, TEST_TOKEN};
use crate::support::{TestServer, ctx, reason};

fn settings(fake: &GcpKmsFake) -> GcpSettings {
    GcpSettings {
        endpoint: fake.endpoint(),
        call: per_attempt(Duration::from_secs(5), 3),
        connect_timeout: Duration::from_secs(2),
        credentials: GcpCredentials::Custom(gcp_fake::credentials()),
    }
}

/// GCP's call policy shape: `max_attempts` attempts of `attempt_timeout`, the whole call
/// bounded only by them.
fn per_attempt(attempt_timeout: Duration, max_attempts: u32) -> CallPolicy {
    CallPolicy {
        timeout: CallPolicy::all_attempts(attempt_timeout, max_attempts),
        attempt_timeout,
        max_attempts,
    }
}

async fn backend_with(settings: &GcpSettings, key: &str) -> GcpBackend {
    let client = GcpClient::connect(&settings.endpoint, settings)
        .await
        .unwrap();
    GcpBackend::new(client, key).unwrap()
}

async fn backend(fake: &GcpKmsFake, key: &str) -> GcpBackend {
    backend_with(&settings(fake), key).await
}

/// A keybroker server whose `[gcp]` endpoint is the fake, with the fake's token as the custom
/// credential (set in code: the configuration text cannot select it). `{key}` in `keys` is
/// replaced by `key`.
async fn server(fake: &GcpKmsFake, key: &str, key_extra: &str) -> TestServer {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        r#"
[gcp]
endpoint = "{}"
attempt_timeout = "5s"

[keys.app]
backend = "gcp"
key_id = "{key}"
{key_extra}
"#,
        fake.endpoint()
    );
    let mut config =
        Config::parse(&text, "gcp-test.toml", dir.path()).unwrap_or_else(|e| panic!("{e}"));
    config.server.listen = vec![ListenAddr::parse("127.0.0.1:0").unwrap()];
    config.gcp.credentials = GcpCredentials::Custom(gcp_fake::credentials());
    config.admin_listen = None;
    for k in config.keys.values_mut() {
        k.policy = keybroker::policy::Policy::allow_anonymous_everything();
    }
    TestServer::start_config(dir, config, Default::default()).await
}

fn version(key: &str, n: u32) -> String {
    format!("{key}/cryptoKeyVersions/{n}")
}

async fn encrypt(
    server: &TestServer,
    plaintext: &[u8],
    context: &BTreeMap<String, String>,
) -> Result<keybroker::proto::EncryptResponse, tonic::Status> {
    let mut c = server.client().await;
    c.encrypt(KbEncrypt {
        key: "app".into(),
        plaintext: plaintext.to_vec().into(),
        context: context.clone(),
    })
    .await
    .map(|r| r.into_inner())
}

async fn decrypt(
    server: &TestServer,
    ciphertext: &[u8],
    context: &BTreeMap<String, String>,
) -> Result<keybroker::proto::DecryptResponse, tonic::Status> {
    let mut c = server.client().await;
    c.decrypt(KbDecrypt {
        ciphertext: ciphertext.to_vec().into(),
        context: context.clone(),
    })
    .await
    .map(|r| r.into_inner())
}

#[tokio::test]
async fn gcp_backend_conforms_and_every_call_carries_the_token() {
    let fake = GcpKmsFake::start().await;
    let a = fake.create_test_key("a");
    let b = fake.create_test_key("b");
    // Two keys, one shared client (as the registry shares one per endpoint).
    let s = settings(&fake);
    let client = GcpClient::connect(&s.endpoint, &s).await.unwrap();
    let ba = GcpBackend::new(Arc::clone(&client), &a).unwrap();
    let bb = GcpBackend::new(client, &b).unwrap();
    conformance::run_all(&ba, &bb).await;

    let log = fake.call_log();
    assert!(
        fake.calls("Encrypt") >= 8 && fake.calls("Decrypt") >= 8,
        "{log:?}"
    );
    assert_eq!(fake.calls("GetCryptoKey"), 1);
    for call in &log {
        assert_eq!(
            call.authorization.as_deref(),
            Some(format!("Bearer {TEST_TOKEN}").as_str()),
            "{call:?}"
        );
        // The routing header Google's clients send, naming the CryptoKey used.
        let params = call.request_params.as_deref().unwrap_or_default();
        assert!(
            params == format!("name={a}") || params == format!("name={b}"),
            "{call:?}"
        );
    }
}

#[tokio::test]
async fn wrapped_copy_names_the_primary_version() {
    let fake = GcpKmsFake::start().await;
    let key = fake.create_test_key("named");
    let b = backend(&fake, &key).await;
    let (_, w) = b.generate_data_key(32, &CTX).await.unwrap();
    assert_eq!(w.key_id, key);
    assert_eq!(w.key_version, version(&key, 1));
    assert_eq!(GcpKmsFake::version_of(&w.ciphertext), Some(1));
    let d = b.describe().await.unwrap();
    assert_eq!(d.durable_key_id, key);
    assert_eq!(
        d.primary_version.as_deref(),
        Some(version(&key, 1).as_str())
    );

    // A copy claiming a version of another key is refused before any call.
    fake.reset_counters();
    let mut bad = w.clone();
    bad.key_version = version(&format!("{key}x"), 1);
    let e = b
        .unwrap(&bad.as_copy(BackendKind::Gcp), &CTX)
        .await
        .err()
        .unwrap();
    assert_eq!(e.kind, BackendErrorKind::InvalidCiphertext, "{e}");
    bad.key_version = format!("{key}/cryptoKeyVersions/1/../../../other/cryptoKeyVersions/1");
    let e = b
        .unwrap(&bad.as_copy(BackendKind::Gcp), &CTX)
        .await
        .err()
        .unwrap();
    assert_eq!(e.kind, BackendErrorKind::InvalidCiphertext, "{e}");
    let e = b
        .unwrap(&w.as_copy(BackendKind::Aws), &CTX)
        .await
        .err()
        .unwrap();
    assert_eq!(e.kind, BackendErrorKind::InvalidCiphertext, "{e}");
    assert_eq!(fake.calls("Decrypt"), 0);
}

#[tokio::test]
async fn rotation_through_the_server() {
    let fake = GcpKmsFake::start().await;
    let key = fake.create_test_key("rotating");
    // Caching off: every Encrypt reaches Cloud KMS, so the new primary is used at once (with
    // caching it is used once the cached data key retires; see docs/gcp.md).
    let server = server(&fake, &key, "cache.enabled = false").await;
    let context = ctx(&[("tenant", "t1")]);

    let before = encrypt(&server, b"before rotation", &context)
        .await
        .unwrap();
    assert_eq!(before.key, "app");
    assert_eq!(before.key_version, version(&key, 1));

    let v2 = fake.rotate(&key);
    assert_eq!(v2, version(&key, 2));
    let after = encrypt(&server, b"after rotation", &context).await.unwrap();
    assert_eq!(after.key_version, v2);
    let env = keybroker::envelope::parse(&after.ciphertext).unwrap();
    assert_eq!(env.copies.len(), 1);
    assert_eq!(env.copies[0].key_version, v2);
    assert_eq!(GcpKmsFake::version_of(env.copies[0].wrapped), Some(2));

    let old = decrypt(&server, &before.ciphertext, &context)
        .await
        .unwrap();
    assert_eq!(&old.plaintext[..], b"before rotation");
    assert_eq!(old.key_version, version(&key, 1));
    let new = decrypt(&server, &after.ciphertext, &context).await.unwrap();
    assert_eq!(&new.plaintext[..], b"after rotation");
    assert_eq!(new.key_version, v2);
    assert!(server.stop().await);
}

#[tokio::test]
async fn disabled_or_destroyed_version_is_failed_precondition() {
    let fake = GcpKmsFake::start().await;
    let key = fake.create_test_key("states");
    let v1 = version(&key, 1);
    let context = ctx(&[]);
    let warm = server(&fake, &key, "").await;
    let ct = encrypt(&warm, b"data", &context).await.unwrap().ciphertext;
    assert!(warm.stop().await);

    fake.disable(&v1);
    // A cold server (nothing cached) must go to Cloud KMS and be refused.
    let cold = server(&fake, &key, "").await;
    let e = decrypt(&cold, &ct, &context).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert_eq!(reason(&e), "KEY_DISABLED");
    assert!(
        !e.message().contains("current state"),
        "Google's text leaked: {e:?}"
    );
    let e = encrypt(&cold, b"more", &context).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(cold.stop().await);

    // The backend directly: Disabled, and describe reports the key as not enabled.
    let b = backend(&fake, &key).await;
    let d = b.describe().await.unwrap();
    assert!(!d.enabled);
    let env = keybroker::envelope::parse(&ct).unwrap();
    let ctx_of = keybroker::backend::BackendContext {
        key_name: env.key_name,
        caller: env.caller,
    };
    let e = b.unwrap(&env.copies[0], &ctx_of).await.err().unwrap();
    assert_eq!(e.kind, BackendErrorKind::Disabled, "{e}");
    fake.enable(&v1);
    assert!(b.unwrap(&env.copies[0], &ctx_of).await.is_ok());
    fake.destroy_now(&v1);
    let e = b.unwrap(&env.copies[0], &ctx_of).await.err().unwrap();
    assert_eq!(e.kind, BackendErrorKind::Disabled, "{e}");
}

#[tokio::test]
async fn corrupted_crc32c_never_yields_a_key() {
    let fake = GcpKmsFake::start().await;
    let key = fake.create_test_key("crc");
    let b = backend(&fake, &key).await;
    let data_key = SecretKey::generate(32).unwrap();

    // Every response corrupted: one retry, then Integrity, and nothing is returned.
    fake.corrupt_crc(u32::MAX);
    let e = b.wrap(&data_key, &CTX).await.err().unwrap();
    assert_eq!(e.kind, BackendErrorKind::Integrity, "{e}");
    assert_eq!(fake.calls("Encrypt"), 2);

    fake.corrupt_crc(0);
    let w = b.wrap(&data_key, &CTX).await.unwrap();
    fake.corrupt_crc(u32::MAX);
    fake.reset_counters();
    let e = b
        .unwrap(&w.as_copy(BackendKind::Gcp), &CTX)
        .await
        .err()
        .unwrap();
    assert_eq!(e.kind, BackendErrorKind::Integrity, "{e}");
    assert_eq!(fake.calls("Decrypt"), 2);

    // A single corruption is healed by the one retry.
    fake.corrupt_crc(1);
    fake.reset_counters();
    let w2 = b.wrap(&data_key, &CTX).await.unwrap();
    assert_eq!(fake.calls("Encrypt"), 2);
    fake.corrupt_crc(1);
    let k = b.unwrap(&w2.as_copy(BackendKind::Gcp), &CTX).await.unwrap();
    assert_eq!(k.as_ref(), data_key.as_ref());
    assert_eq!(fake.calls("Decrypt"), 2);

    // Cloud KMS refusing our request checksums (corruption on the way there) is retried once too.
    let rejected =
        "The checksum in field plaintext_crc32c did not match the data in field plaintext.";
    fake.reset_counters();
    fake.fail_next("Encrypt", Code::InvalidArgument, rejected, 1);
    b.wrap(&data_key, &CTX).await.unwrap();
    assert_eq!(fake.calls("Encrypt"), 2);
    fake.fail_next("Encrypt", Code::InvalidArgument, rejected, 2);
    let e = b.wrap(&data_key, &CTX).await.err().unwrap();
    assert_eq!(e.kind, BackendErrorKind::Integrity, "{e}");

    // Through the server: GenerateDataKey returns no key at all.
    fake.corrupt_crc(u32::MAX);
    let server = server(&fake, &key, "").await;
    let mut c = server.client().await;
    let e = c
        .generate_data_key(GenerateDataKeyRequest {
            key: "app".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert_eq!(reason(&e), "BACKEND_INTEGRITY");
    assert!(server.stop().await);
}

#[tokio::test]
async fn cloud_kms_errors_map_to_kinds_without_google_text() {
    let fake = GcpKmsFake::start().await;
    let key = fake.create_test_key("errors");
    let b = backend(&fake, &key).await; // retries = 2
    let data_key = SecretKey::generate(32).unwrap();
    let w = b.wrap(&data_key, &CTX).await.unwrap();
    let detail = "google-internal-detail-7f3a";
    let cases = [
        (
            "Encrypt",
            Code::PermissionDenied,
            BackendErrorKind::PermissionDenied,
            1,
        ),
        ("Encrypt", Code::NotFound, BackendErrorKind::NotFound, 1),
        (
            "Encrypt",
            Code::FailedPrecondition,
            BackendErrorKind::Disabled,
            1,
        ),
        (
            "Encrypt",
            Code::Unauthenticated,
            BackendErrorKind::Unauthenticated,
            1,
        ),
        (
            "Encrypt",
            Code::InvalidArgument,
            BackendErrorKind::InvalidArgument,
            1,
        ),
        (
            "Encrypt",
            Code::ResourceExhausted,
            BackendErrorKind::Throttled,
            3,
        ),
        (
            "Encrypt",
            Code::Unavailable,
            BackendErrorKind::Unavailable,
            3,
        ),
        (
            "Encrypt",
            Code::DeadlineExceeded,
            BackendErrorKind::DeadlineExceeded,
            3,
        ),
        (
            "Decrypt",
            Code::InvalidArgument,
            BackendErrorKind::InvalidCiphertext,
            1,
        ),
        (
            "Decrypt",
            Code::PermissionDenied,
            BackendErrorKind::PermissionDenied,
            1,
        ),
        (
            "Decrypt",
            Code::Unavailable,
            BackendErrorKind::Unavailable,
            3,
        ),
    ];
    for (method, code, kind, calls) in cases {
        fake.reset_counters();
        fake.fail_next(method, code, detail, calls);
        let e = if method == "Encrypt" {
            b.wrap(&data_key, &CTX).await.err()
        } else {
            b.unwrap(&w.as_copy(BackendKind::Gcp), &CTX).await.err()
        }
        .unwrap_or_else(|| panic!("{method} {code:?} succeeded"));
        assert_eq!(e.kind, kind, "{method} {code:?}: {e}");
        assert_eq!(
            fake.calls(method),
            calls as u64,
            "{method} {code:?} attempts"
        );
        assert!(
            !e.to_string().contains(detail),
            "Google's text reached the message: {e}"
        );
        let logged = std::error::Error::source(&e)
            .map(|s| s.to_string())
            .unwrap_or_default();
        assert!(
            logged.contains(detail),
            "the source keeps Google's text for the log: {logged}"
        );
    }

    // One transient failure is retried and heals.
    fake.reset_counters();
    fake.fail_next("Decrypt", Code::Unavailable, detail, 1);
    let k = b.unwrap(&w.as_copy(BackendKind::Gcp), &CTX).await.unwrap();
    assert_eq!(k.as_ref(), data_key.as_ref());
    assert_eq!(fake.calls("Decrypt"), 2);

    // A key that does not exist.
    let missing = backend(&fake, &format!("{key}-missing")).await;
    let e = missing.wrap(&data_key, &CTX).await.err().unwrap();
    assert_eq!(e.kind, BackendErrorKind::NotFound, "{e}");
    let e = missing.describe().await.err().unwrap();
    assert_eq!(e.kind, BackendErrorKind::NotFound, "{e}");
}

#[tokio::test]
async fn credentials_deadline_and_unreachable_endpoint() {
    let fake = GcpKmsFake::start().await;
    let key = fake.create_test_key("auth");
    let data_key = SecretKey::generate(32).unwrap();

    // No token at all: Cloud KMS answers UNAUTHENTICATED.
    let anonymous = GcpSettings {
        credentials: GcpCredentials::Custom(
            gcloud_sdk::google_cloud_auth::credentials::anonymous::Builder::new().build(),
        ),
        ..settings(&fake)
    };
    let b = backend_with(&anonymous, &key).await;
    let e = b.wrap(&data_key, &CTX).await.err().unwrap();
    assert_eq!(e.kind, BackendErrorKind::Unauthenticated, "{e}");
    assert_eq!(fake.call_log().last().unwrap().authorization, None);

    // No token could be had (ADC failing): Unauthenticated, or Unavailable (after the retries)
    // when the failure is transient. Nothing reaches Cloud KMS.
    fake.reset_counters();
    for (transient, kind) in [
        (false, BackendErrorKind::Unauthenticated),
        (true, BackendErrorKind::Unavailable),
    ] {
        let failing = GcpSettings {
            credentials: GcpCredentials::Custom(
                gcloud_sdk::google_cloud_auth::credentials::Credentials::from(
                    gcp_fake::FailingToken { transient },
                ),
            ),
            ..settings(&fake)
        };
        let e = backend_with(&failing, &key)
            .await
            .wrap(&data_key, &CTX)
            .await
            .err()
            .unwrap();
        assert_eq!(e.kind, kind, "transient={transient}: {e}");
    }
    assert_eq!(fake.calls("Encrypt"), 0);

    // A token Cloud KMS does not accept.
    fake.require_token("another-token");
    let b = backend(&fake, &key).await;
    let e = b.wrap(&data_key, &CTX).await.err().unwrap();
    assert_eq!(e.kind, BackendErrorKind::Unauthenticated, "{e}");
    fake.require_token(TEST_TOKEN);
    b.wrap(&data_key, &CTX).await.unwrap();

    // The per-call deadline: a stuck call is abandoned and reported, once per allowed attempt.
    fake.set_delay(Duration::from_secs(2));
    fake.reset_counters();
    let quick = GcpSettings {
        call: per_attempt(Duration::from_millis(150), 2),
        ..settings(&fake)
    };
    let b = backend_with(&quick, &key).await;
    let e = b.wrap(&data_key, &CTX).await.err().unwrap();
    assert_eq!(e.kind, BackendErrorKind::DeadlineExceeded, "{e}");
    assert_eq!(fake.calls("Encrypt"), 2);
    fake.set_delay(Duration::ZERO);

    // Nothing listening: Unavailable (after the retries), never a hang.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let closed = GcpSettings {
        endpoint: format!("http://127.0.0.1:{port}"),
        call: per_attempt(Duration::from_secs(5), 2),
        ..settings(&fake)
    };
    let b = backend_with(&closed, &key).await;
    let e = b.wrap(&data_key, &CTX).await.err().unwrap();
    assert_eq!(e.kind, BackendErrorKind::Unavailable, "{e}");
}

#[tokio::test]
async fn cache_call_counts_seen_at_cloud_kms() {
    let fake = GcpKmsFake::start().await;
    let key = fake.create_test_key("cached");
    let context = ctx(&[("purpose", "cache-test")]);
    let server = server(&fake, &key, "").await;
    let mut c = server.client().await;
    let mut ciphertexts = Vec::new();
    for i in 0..1000u32 {
        let r = c
            .encrypt(KbEncrypt {
                key: "app".into(),
                plaintext: format!("message {i}").into_bytes().into(),
                context: context.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        if i < 100 {
            ciphertexts.push(r.ciphertext);
        }
    }
    assert_eq!(
        fake.calls("Encrypt"),
        1,
        "1,000 Encrypts must cost one Cloud KMS Encrypt"
    );
    assert_eq!(fake.calls("Decrypt"), 0);
    assert!(server.stop().await);

    // A cold server: 100 messages under one data key cost one Cloud KMS Decrypt.
    let cold = server_again(&fake, &key).await;
    let mut c = cold.client().await;
    for (i, ct) in ciphertexts.iter().enumerate() {
        let r = c
            .decrypt(KbDecrypt {
                ciphertext: ct.clone(),
                context: context.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.plaintext, format!("message {i}").into_bytes());
    }
    assert_eq!(
        fake.calls("Decrypt"),
        1,
        "N decrypts of one data key must cost one Decrypt"
    );
    assert_eq!(fake.calls("Encrypt"), 1);
    assert!(cold.stop().await);
}

async fn server_again(fake: &GcpKmsFake, key: &str) -> TestServer {
    server(fake, key, "").await
}

/// The documented AAD: the canonical encoding of the pairs keybroker:caller and keybroker:key
/// (u16 big-endian pair count, then each key and value as u16 big-endian length + bytes, pairs
/// sorted by key). Written out here independently of keybroker's encoder.
fn documented_aad(key_name: &str, caller: &str) -> Vec<u8> {
    let mut out = vec![0, 2];
    for (k, v) in [("keybroker:caller", caller), ("keybroker:key", key_name)] {
        for s in [k, v] {
            out.extend_from_slice(&(s.len() as u16).to_be_bytes());
            out.extend_from_slice(s.as_bytes());
        }
    }
    out
}

/// The length of an envelope's header (everything before the sealed body), per docs/envelope.md.
fn header_len(ct: &[u8]) -> usize {
    let mut p = 4; // magic "KB", format version, kind
    p += 1 + ct[p] as usize; // key name
    p += 1 + ct[p] as usize; // caller
    let copies = ct[p];
    p += 1;
    for _ in 0..copies {
        p += 1; // backend code
        for _ in 0..3 {
            // key id, key version, wrapped key
            p += 2 + u16::from_be_bytes([ct[p], ct[p + 1]]) as usize;
        }
    }
    p + 32 + 32 // salt, commitment
}

struct Okm64;
impl hkdf::KeyType for Okm64 {
    fn len(&self) -> usize {
        64
    }
}

#[tokio::test]
async fn data_is_recoverable_with_cloud_kms_alone() {
    let fake = GcpKmsFake::start().await;
    let key = fake.create_test_key("no-lock-in");
    let server = server(&fake, &key, "").await;
    let context = ctx(&[("order", "42"), ("tenant", "acme")]);
    let ct = encrypt(&server, b"recover me without keybroker", &context)
        .await
        .unwrap()
        .ciphertext;
    assert!(server.stop().await);

    // 1. The wrapped data key, from the envelope.
    let env = keybroker::envelope::parse(&ct).unwrap();
    let copy = env.copies[0];
    assert_eq!(copy.backend, BackendKind::Gcp);
    assert_eq!(copy.key_id, key);

    // 2. Cloud KMS Decrypt, called directly (as `gcloud kms decrypt` would), with the AAD.
    let aad = documented_aad(env.key_name, env.caller);
    assert_eq!(env.key_name, "app");
    let api: GoogleApi<KeyManagementServiceClient<_>> = GoogleApi::from_function_with_credentials(
        KeyManagementServiceClient::new,
        fake.endpoint(),
        None,
        gcp_fake::credentials(),
    )
    .await
    .unwrap();
    let resp = api
        .get()
        .decrypt(DecryptRequest {
            name: copy.key_id.to_owned(),
            ciphertext: copy.wrapped.to_vec(),
            additional_authenticated_data: aad,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let data_key = resp.plaintext.ref_sensitive_value().clone();
    assert_eq!(resp.plaintext_crc32c, Some(crc32c(&data_key).into()));
    assert_eq!(data_key.len(), 32);

    // 3. The envelope (format 2), opened by hand: HKDF-SHA256(salt from the header, info =
    //    label || SHA-256(header up to the salt || canonical context)) → AES-256-GCM key and
    //    key commitment; zero nonce; AAD = header || canonical context.
    assert_eq!(ct[2], 2, "format 2");
    let h = header_len(&ct);
    let (salt, commitment) = (&ct[h - 64..h - 32], &ct[h - 32..h]);
    let mut canonical = (context.len() as u16).to_be_bytes().to_vec();
    for (k, v) in &context {
        for s in [k, v] {
            canonical.extend_from_slice(&(s.len() as u16).to_be_bytes());
            canonical.extend_from_slice(s.as_bytes());
        }
    }
    let mut bound = ct[..h - 32].to_vec();
    bound.extend_from_slice(&canonical);
    let binding = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &bound);
    let mut okm = [0u8; 64];
    hkdf::Salt::new(hkdf::HKDF_SHA256, salt)
        .extract(&data_key)
        .expand(&[b"keybroker envelope v2", binding.as_ref()], Okm64)
        .unwrap()
        .fill(&mut okm)
        .unwrap();
    assert_eq!(&okm[32..], commitment, "key commitment");
    let mut message_aad = ct[..h].to_vec();
    message_aad.extend_from_slice(&canonical);
    let aes =
        aead::LessSafeKey::new(aead::UnboundKey::new(&aead::AES_256_GCM, &okm[..32]).unwrap());
    let mut body = ct[h..].to_vec();
    let plaintext = aes
        .open_in_place(
            aead::Nonce::assume_unique_for_key([0u8; 12]),
            aead::Aad::from(&message_aad[..]),
            &mut body,
        )
        .unwrap();
    assert_eq!(plaintext, b"recover me without keybroker");
}

/// The venv's python (scripts/test-setup installs google-cloud-kms into it).
fn venv_python() -> PathBuf {
    crate::support::venv_bin("python")
}

/// Runs a Python script from the venv with a bounded wait (two minutes; the scripts' own calls
/// have 10 s timeouts).
async fn run_python(script: &str, args: Vec<String>) -> std::process::Output {
    let python = venv_python();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join(script);
    tokio::task::spawn_blocking(move || {
        let mut child = std::process::Command::new(python)
            .arg(script)
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let started = Instant::now();
        while child.try_wait().unwrap().is_none() {
            if started.elapsed() > Duration::from_secs(120) {
                let _ = child.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn fake_agrees_with_googles_python_client() {
    let fake = GcpKmsFake::start().await;
    let out = run_python(
        "tests/fidelity/gcp_kms_client.py",
        vec![fake.addr.to_string(), TEST_TOKEN.to_owned()],
    )
    .await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "script failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    for step in [
        "create",
        "encrypt",
        "encrypt-without-checksums",
        "decrypt",
        "aad-mismatch",
        "bad-checksums",
        "unauthenticated",
        "rotate",
        "disabled-version",
        "get-crypto-key",
        "rotation-schedule",
    ] {
        assert!(
            stdout.lines().any(|l| l == format!("ok {step}")),
            "step {step} missing:\n{stdout}"
        );
    }
    assert!(stdout.lines().any(|l| l == "all ok"), "{stdout}");
    // What the official client sent: the bearer token we gave it, and the routing header in the
    // same form keybroker sends (`name=<resource>`).
    let log = fake.call_log();
    let enc = log
        .iter()
        .find(|c| c.method == "Encrypt" && c.authorization.is_some())
        .unwrap();
    assert_eq!(
        enc.authorization.as_deref(),
        Some(format!("Bearer {TEST_TOKEN}").as_str())
    );
    assert_eq!(
        enc.request_params.as_deref(),
        Some("name=projects/fidelity/locations/global/keyRings/ring/cryptoKeys/key"),
        "{log:?}"
    );
    assert!(fake.calls("Decrypt") >= 5 && fake.calls("UpdateCryptoKeyVersion") == 1);
}

/// The procedure docs/gcp.md gives for recovering data without keybroker, step by step:
/// `scripts/recover_envelope.py split`, Cloud KMS Decrypt with the AAD file (what
/// `gcloud kms decrypt --additional-authenticated-data-file` sends), then `... open`.
#[tokio::test]
async fn documented_recovery_procedure_works() {
    let fake = GcpKmsFake::start().await;
    let key = fake.create_test_key("recovery");
    let server = server(&fake, &key, "").await;
    let context = ctx(&[("order", "42"), ("tenant", "acme")]);
    let ct = encrypt(&server, b"recovered by the documented procedure", &context)
        .await
        .unwrap()
        .ciphertext;
    assert!(server.stop().await);
    let dir = tempfile::tempdir().unwrap();
    let ct_file = dir.path().join("message.kb");
    std::fs::write(&ct_file, &ct).unwrap();
    let out_dir = dir.path().join("parts");

    let split = run_python(
        "scripts/recover_envelope.py",
        vec![
            "split".into(),
            ct_file.display().to_string(),
            out_dir.display().to_string(),
        ],
    )
    .await;
    assert!(
        split.status.success(),
        "{}",
        String::from_utf8_lossy(&split.stderr)
    );
    let info: serde_json::Value = serde_json::from_slice(&split.stdout).unwrap();
    let copy = &info["copies"][0];
    assert_eq!(copy["backend"], "gcp");
    assert_eq!(copy["key_id"], key.as_str());
    assert_eq!(copy["key_version"], version(&key, 1).as_str());
    let wrapped = std::fs::read(copy["file"].as_str().unwrap()).unwrap();
    let aad = std::fs::read(out_dir.join("aad.bin")).unwrap();
    assert_eq!(aad, documented_aad("app", info["caller"].as_str().unwrap()));

    let api: GoogleApi<KeyManagementServiceClient<_>> = GoogleApi::from_function_with_credentials(
        KeyManagementServiceClient::new,
        fake.endpoint(),
        None,
        gcp_fake::credentials(),
    )
    .await
    .unwrap();
    let resp = api
        .get()
        .decrypt(DecryptRequest {
            name: key.clone(),
            ciphertext: wrapped,
            additional_authenticated_data: aad,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let key_file = dir.path().join("datakey.bin");
    std::fs::write(&key_file, resp.plaintext.ref_sensitive_value()).unwrap();

    let args = |context: &str| {
        vec![
            "open".to_owned(),
            ct_file.display().to_string(),
            key_file.display().to_string(),
            context.to_owned(),
        ]
    };
    let open = run_python(
        "scripts/recover_envelope.py",
        args(r#"{"tenant":"acme","order":"42"}"#),
    )
    .await;
    assert!(
        open.status.success(),
        "{}",
        String::from_utf8_lossy(&open.stderr)
    );
    assert_eq!(open.stdout, b"recovered by the documented procedure");
    let wrong = run_python("scripts/recover_envelope.py", args(r#"{"tenant":"acme"}"#)).await;
    assert!(!wrong.status.success());
    assert!(wrong.stdout.is_empty());
}

/// A one-route HTTP/1.1 token endpoint (Google STS's token exchange) on 127.0.0.1: answers every
/// POST with `token` and records the form bodies it received.
async fn fake_sts(
    token: &'static str,
) -> (
    String,
    Arc<std::sync::Mutex<Vec<String>>>,
    tokio::task::JoinHandle<()>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/v1/token", listener.local_addr().unwrap());
    let bodies = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = Arc::clone(&bodies);
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let seen = Arc::clone(&seen);
            tokio::spawn(async move {
                // Bounded: a request larger than 64 KiB is not a token exchange.
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                while buf.len() < 64 << 10 {
                    let Ok(n) = sock.read(&mut chunk).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    let text = String::from_utf8_lossy(&buf).to_string();
                    let Some(head_end) = text.find("\r\n\r\n") else {
                        continue;
                    };
                    let len = text[..head_end]
                        .lines()
                        .find_map(|l| {
                            let (k, v) = l.split_once(':')?;
                            k.eq_ignore_ascii_case("content-length")
                                .then(|| v.trim().parse::<usize>().ok())?
                        })
                        .unwrap_or(0);
                    if buf.len() < head_end + 4 + len {
                        continue;
                    }
                    seen.lock().unwrap().push(text[head_end + 4..].to_owned());
                    let body = format!(
                        r#"{{"access_token":"{token}","issued_token_type":"urn:ietf:params:oauth:token-type:access_token","token_type":"Bearer","expires_in":3600}}"#
                    );
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = sock.write_all(resp.as_bytes()).await;
                    return;
                }
            });
        }
    });
    (url, bodies, task)
}

/// The production credential path, end to end: the keybroker binary with only
/// GOOGLE_APPLICATION_CREDENTIALS pointing at an `external_account` file (workload identity
/// federation, file-sourced subject token), which google-cloud-auth exchanges at a loopback STS
/// for the access token the Cloud KMS fake then requires.
#[tokio::test]
async fn application_default_credentials_through_the_binary() {
    let fake = GcpKmsFake::start().await;
    let key = fake.create_test_key("adc");
    fake.require_token("sts-issued-token");
    let (sts_url, sts_bodies, sts_task) = fake_sts("sts-issued-token").await;

    let dir = tempfile::tempdir().unwrap();
    let subject = dir.path().join("subject-token");
    std::fs::write(&subject, "subject-token-from-a-file").unwrap();
    let adc = dir.path().join("external-account.json");
    std::fs::write(
        &adc,
        serde_json::json!({
            "type": "external_account",
            "audience": "//iam.googleapis.com/projects/1/locations/global/workloadIdentityPools/pool/providers/test",
            "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
            "token_url": sts_url,
            "credential_source": { "file": subject.display().to_string() },
        })
        .to_string(),
    )
    .unwrap();
    let config = dir.path().join("keybroker.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = [\"127.0.0.1:0\"]\n[admin]\nlisten = \"off\"\n[audit]\npath = \"audit.jsonl\"\n[gcp]\nendpoint = \"{}\"\n\
             [keys.app]\nbackend = \"gcp\"\nkey_id = \"{key}\"\n\
             [[keys.app.policy]]\ncallers = [\"anonymous\"]\noperations = [\"encrypt\"]\n",
            fake.endpoint()
        ),
    )
    .unwrap();

    let mut child = std::process::Command::new(crate::support::keybroker_bin())
        .args(["serve", "--config"])
        .arg(&config)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", dir.path())
        .env("GOOGLE_APPLICATION_CREDENTIALS", &adc)
        .env("NO_PROXY", "127.0.0.1,localhost")
        .env("KEYBROKER_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let addr = tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        // Bounded by the child: EOF if it exits; the banner comes within seconds.
        std::io::BufReader::new(stdout)
            .lines()
            .take(20)
            .map_while(Result::ok)
            .find_map(|l| l.trim().strip_prefix("listening on ").map(str::to_owned))
    });
    let addr = tokio::time::timeout(Duration::from_secs(60), addr).await;
    let result = async {
        let addr = addr
            .ok()
            .and_then(|r| r.ok().flatten())
            .ok_or("no banner")?;
        let mut c = crate::support::client_for(&addr).await;
        c.encrypt(KbEncrypt {
            key: "app".into(),
            plaintext: b"via ADC".to_vec().into(),
            context: BTreeMap::new(),
        })
        .await
        .map(|r| r.into_inner())
        .map_err(|_| "encrypt failed")
    }
    .await;
    let _ = child.kill();
    let _ = child.wait();
    sts_task.abort();
    let resp = result.unwrap_or_else(|e| panic!("{e}; fake saw {:?}", fake.call_log()));
    assert_eq!(resp.key_version, version(&key, 1));
    let encrypts: Vec<_> = fake
        .call_log()
        .into_iter()
        .filter(|c| c.method == "Encrypt")
        .collect();
    assert_eq!(encrypts.len(), 1);
    assert_eq!(
        encrypts[0].authorization.as_deref(),
        Some("Bearer sts-issued-token")
    );
    let bodies = sts_bodies.lock().unwrap().clone();
    assert!(!bodies.is_empty());
    assert!(
        bodies[0].contains("subject_token=subject-token-from-a-file"),
        "{bodies:?}"
    );
    assert!(bodies[0].contains("cloudkms"), "scope: {bodies:?}");
}

/// Issue 21 item 13: Cloud KMS decrypts by the CryptoKey (the blob names its version), so it
/// would accept `.../cryptoKeyVersions/01` as well as `.../1`: each spelling a new decrypt-cache
/// entry and a paid call. Only Cloud KMS's own spelling is accepted, and refusals cost no call.
#[tokio::test]
async fn respelled_versions_are_refused_without_a_call() {
    let fake = GcpKmsFake::start().await;
    let key = fake.create_test_key("respell");
    let b = backend(&fake, &key).await;
    let before = std::cell::Cell::new(0);
    conformance::respelled_copies_are_refused(&b, |w| {
        before.set(fake.calls("Decrypt"));
        ["01", "+1", "001", "1 ", "0"]
            .iter()
            .map(|v| {
                let mut x = w.clone();
                x.key_version = format!("{key}/cryptoKeyVersions/{v}");
                x
            })
            .collect()
    })
    .await;
    // Exactly one Decrypt after the variants: the final check that the genuine copy unwraps.
    assert_eq!(fake.calls("Decrypt"), before.get() + 1);
}

fn parse(text: &str) -> Result<Config, keybroker::config::ConfigError> {
    Config::parse(text, "test.toml", std::path::Path::new("/etc/kb"))
}

/// `[gcp]` and the GCP fields of a key, as `Config::parse` reads them (moved here from the
/// backend's unit tests: the backend does not import the configuration).
#[test]
fn config_defaults_and_overrides() {
    let c = parse(
        r#"
        [keys.app]
        backend = "gcp"
        key_id = "projects/p/locations/global/keyRings/r/cryptoKeys/k"
        "#,
    )
    .unwrap();
    assert_eq!(
        c.keys["app"].backend,
        BackendConfig::Gcp {
            key_id: "projects/p/locations/global/keyRings/r/cryptoKeys/k".into(),
            endpoint: None
        }
    );
    assert_eq!(c.gcp.endpoint, DEFAULT_ENDPOINT);
    assert_eq!(c.gcp.call.attempt_timeout, DEFAULT_ATTEMPT_TIMEOUT);
    assert_eq!(c.gcp.call.max_attempts, DEFAULT_MAX_ATTEMPTS);
    assert!(matches!(
        c.gcp.credentials,
        GcpCredentials::ApplicationDefault
    ));

    let c = parse(
        r#"
        [gcp]
        endpoint = "https://europe-west1-cloudkms.googleapis.com/"
        attempt_timeout = "2s"
        max_attempts = 1
        connect_timeout = "1s"
        [keys.app]
        backend = "gcp"
        key_id = "projects/p/locations/europe-west1/keyRings/r/cryptoKeys/k"
        endpoint = "http://127.0.0.1:8443"
        "#,
    )
    .unwrap();
    assert_eq!(
        c.gcp.endpoint,
        "https://europe-west1-cloudkms.googleapis.com"
    );
    assert_eq!(c.gcp.call.attempt_timeout, Duration::from_secs(2));
    assert_eq!(c.gcp.call.max_attempts, 1);
    assert_eq!(c.gcp.connect_timeout, Duration::from_secs(1));
    assert!(matches!(
        &c.keys["app"].backend,
        BackendConfig::Gcp { endpoint: Some(e), .. } if e == "http://127.0.0.1:8443"
    ));
}

#[test]
fn config_problems_have_paths() {
    let err = parse(
        r#"
        [gcp]
        endpoint = "http://kms.example.com"
        attempt_timeout = "0s"
        max_attempts = 99
        credentials = "fake"
        [keys.a]
        backend = "gcp"
        key_id = "projects/p/locations/global/keyRings/r/cryptoKeys/k/cryptoKeyVersions/1"
        [keys.b]
        backend = "gcp"
        key_id = "my-key"
        endpoint = "ftp://x"
        keyring = "x"
        "#,
    )
    .unwrap_err();
    let text: Vec<String> = err.problems.iter().map(|p| p.to_string()).collect();
    let has = |s: &str| text.iter().any(|t| t.starts_with(s));
    assert!(
        has("gcp.endpoint: \"http://kms.example.com\": plain http"),
        "{text:#?}"
    );
    assert!(has("gcp.attempt_timeout: must be"), "{text:#?}");
    assert!(has("gcp.max_attempts: must be 1 to 20"), "{text:#?}");
    // No configuration text can select anything but Application Default Credentials.
    assert!(has("gcp.credentials: unknown field"), "{text:#?}");
    assert!(
        has("keys.a.key_id: ") && text.iter().any(|t| t.contains("CryptoKeyVersion")),
        "{text:#?}"
    );
    assert!(
        has("keys.b.key_id: \"my-key\" is not a Cloud KMS key name"),
        "{text:#?}"
    );
    assert!(has("keys.b.endpoint: \"ftp://x\""), "{text:#?}");
    assert!(has("keys.b.keyring: unknown field"), "{text:#?}");
    assert_eq!(text.len(), 8, "{text:#?}");
}

//! The AWS KMS backend against moto's KMS server (tests/support/moto.rs): conformance, alias
//! routing, the KMS encryption context, rotation, cache call counts as moto saw them, KMS
//! ReEncrypt, recovery without keybroker, and the error mappings (moto where it can produce
//! them; the SDK's own typed errors and a loopback error endpoint where it cannot).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use aws_sdk_kms::primitives::Blob;
use keybroker::backend::aws::{AwsClients, classify};
use keybroker::backend::{BackendContext, BackendErrorKind, KeyBackend};
use keybroker::config::{BackendConfig, Config};
use keybroker::proto;
use keybroker::registry::StatsBook;
use tonic::Code;

use crate::support::moto::{KmsErrorServer, Moto};
use crate::support::{TestServer, conformance, ctx, reason};

fn parse_config(text: &str) -> Config {
    Config::parse(text, "test.toml", Path::new("/")).unwrap_or_else(|e| panic!("{e}"))
}

fn backend_context(key: &str, caller: &str) -> std::collections::HashMap<String, String> {
    BackendContext {
        key_name: key,
        caller,
    }
    .pairs()
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

async fn encrypt(
    c: &mut keybroker::client::KeyBrokerClient<tonic::transport::Channel>,
    key: &str,
    plaintext: &[u8],
    context: &BTreeMap<String, String>,
) -> proto::EncryptResponse {
    c.encrypt(proto::EncryptRequest {
        key: key.into(),
        plaintext: plaintext.to_vec().into(),
        context: context.clone(),
    })
    .await
    .unwrap_or_else(|s| panic!("encrypt with {key}: {s:?}"))
    .into_inner()
}

async fn decrypt(
    c: &mut keybroker::client::KeyBrokerClient<tonic::transport::Channel>,
    ciphertext: &[u8],
    context: &BTreeMap<String, String>,
) -> Result<proto::DecryptResponse, tonic::Status> {
    c.decrypt(proto::DecryptRequest {
        ciphertext: ciphertext.to_vec().into(),
        context: context.clone(),
    })
    .await
    .map(|r| r.into_inner())
}

async fn backend_calls(
    c: &mut keybroker::client::KeyBrokerClient<tonic::transport::Channel>,
    key: &str,
    op: &str,
) -> u64 {
    let keys = c
        .list_keys(proto::ListKeysRequest {})
        .await
        .unwrap()
        .into_inner()
        .keys;
    let k = keys.iter().find(|k| k.name == key).unwrap();
    k.stats
        .iter()
        .find(|s| s.operation == op)
        .map(|s| s.backend_calls)
        .unwrap_or(0)
}

#[tokio::test]
async fn aws_backend_conforms() {
    let moto = Moto::start().await;
    let a = moto.create_key("conformance a").await;
    let b = moto.create_key("conformance b").await;
    moto.create_alias("alias/conformance-b", &b).await;
    let config = parse_config(&format!(
        "{}\n[keys.a]\nbackend = \"aws\"\nkey_id = \"{a}\"\n[keys.b]\nbackend = \"aws\"\nkey_id = \"alias/conformance-b\"\n",
        moto.aws_section()
    ));
    let registry = config
        .build_registry(&StatsBook::default(), None, None)
        .await
        .unwrap();
    let ka = Arc::clone(&registry.get("a").unwrap().backend);
    let kb = Arc::clone(&registry.get("b").unwrap().backend);
    // By key ARN, and by alias (resolved to the key ARN through DescribeKey / responses).
    conformance_on_moto(&*ka, &*kb).await;
    conformance_on_moto(&*kb, &*ka).await;
    let d = kb.describe().await.unwrap();
    assert_eq!(d.durable_key_id, b);
}

/// `conformance::run_all` with one check adapted to a documented moto infidelity
/// (../shared/TESTING.md): moto's ciphertext blob starts with the key id in ASCII, and a blob
/// naming a key moto does not have is answered with AccessDeniedException, where AWS KMS answers
/// InvalidCiphertextException / IncorrectKeyException (both DECRYPTION_FAILED here). Flips in the
/// rest of the blob go through the shared assertion unchanged.
async fn conformance_on_moto(backend: &dyn KeyBackend, other: &dyn KeyBackend) {
    conformance::generate_then_unwrap(backend).await;
    conformance::wrap_then_unwrap(backend).await;
    conformance::short_data_keys(backend).await;
    conformance::wrapping_is_randomized(backend).await;
    conformance::context_is_bound(backend).await;
    tampered_blob_is_refused_on_moto(backend).await;
    conformance::copy_of_another_key_is_refused(backend, other).await;
    conformance::foreign_key_id_is_refused(backend).await;
    conformance::describe_reports_an_enabled_key(backend).await;
}

async fn tampered_blob_is_refused_on_moto(backend: &dyn KeyBackend) {
    let (_, wrapped) = backend
        .generate_data_key(32, &conformance::CTX)
        .await
        .unwrap();
    let n = wrapped.ciphertext.len();
    // moto's blob: 36-byte key id, 12-byte IV, 16-byte tag, then the encrypted data key.
    for i in [36, 50, 64, n / 2, n - 1, 0, 35] {
        let mut bad = wrapped.clone();
        bad.ciphertext[i] ^= 0x01;
        let err = backend
            .unwrap(&bad.as_copy(backend.kind()), &conformance::CTX)
            .await
            .err()
            .unwrap_or_else(|| panic!("tampered byte {i} unwrapped"));
        if i < 36 {
            // The key id inside moto's blob: moto's AccessDenied (see above).
            assert!(
                matches!(
                    err.kind,
                    BackendErrorKind::InvalidCiphertext | BackendErrorKind::PermissionDenied
                ),
                "byte {i}: {err}"
            );
        } else {
            assert_eq!(
                err.kind,
                BackendErrorKind::InvalidCiphertext,
                "byte {i}: {err}"
            );
        }
    }
}

#[tokio::test]
async fn keys_share_one_client_per_region_endpoint_and_credentials() {
    // Building clients makes no network call, so no emulator is needed.
    let config = parse_config(
        r#"
[aws]
region = "eu-west-1"
endpoint = "http://127.0.0.1:9"
[keys.a]
backend = "aws"
key_id = "alias/a"
[keys.b]
backend = "aws"
key_id = "arn:aws:kms:eu-west-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"
timeout = "1s"
[keys.c]
backend = "aws"
key_id = "alias/c"
region = "eu-central-1"
[keys.d]
backend = "aws"
key_id = "arn:aws:kms:us-east-2:111122223333:alias/d"
"#,
    );
    let aws = |name: &str| match &config.keys[name].backend {
        BackendConfig::Aws(c) => (**c).clone(),
        other => panic!("{other:?}"),
    };
    let (a, b, c, d) = (aws("a"), aws("b"), aws("c"), aws("d"));
    assert_eq!(b.call.timeout, Duration::from_secs(1));
    assert_eq!(a.call.timeout, keybroker::backend::aws::DEFAULT_TIMEOUT);
    assert_eq!(
        d.region.as_deref(),
        Some("us-east-2"),
        "an ARN's region wins over [aws]"
    );
    let mut clients = AwsClients::default();
    for cfg in [&a, &b] {
        clients.backend(cfg).await.unwrap();
    }
    assert_eq!(
        clients.client_count(),
        1,
        "same region/endpoint/credentials: one client"
    );
    clients.backend(&c).await.unwrap();
    clients.backend(&d).await.unwrap();
    assert_eq!(clients.client_count(), 3);
}

#[test]
fn config_problems_are_reported_with_their_place() {
    let err = Config::parse(
        r#"
[aws]
max_attempts = 0
timeout = "1h"
colour = "blue"
endpoint = "kms.example.com"
[keys.a]
backend = "aws"
key_id = "arn:aws:kms:eu-west-1:111122223333:key/abc"
region = "us-east-1"
[keys.b]
backend = "aws"
key_id = "not a key id"
previous_key_arns = ["alias/old"]
[keys.c]
backend = "aws"
key_id = "alias/c"
keyring = "/tmp/x"
"#,
        "test.toml",
        Path::new("/"),
    )
    .unwrap_err();
    let text: Vec<String> = err.problems.iter().map(|p| p.to_string()).collect();
    let has = |s: &str| text.iter().any(|t| t.starts_with(s));
    assert!(has("aws.max_attempts: must be 1"), "{text:#?}");
    assert!(has("aws.timeout: must be"), "{text:#?}");
    assert!(has("aws.colour: unknown field"), "{text:#?}");
    assert!(
        has("aws.endpoint: \"kms.example.com\" is not an endpoint URL"),
        "{text:#?}"
    );
    assert!(
        has("keys.a.region: is \"us-east-1\" but key_id is an ARN in region \"eu-west-1\""),
        "{text:#?}"
    );
    assert!(
        has("keys.b.key_id: \"not a key id\" is not a KMS key id"),
        "{text:#?}"
    );
    assert!(
        has("keys.b.previous_key_arns[0]: must be a key ARN"),
        "{text:#?}"
    );
    assert!(has("keys.c.keyring: unknown field"), "{text:#?}");
    assert_eq!(text.len(), 8, "{text:#?}");
}

/// Aliases route: the envelope and the response carry the key ARN KMS reported, never the
/// alias; ListKeys shows the alias as configured. Re-pointing the alias moves new data to the
/// new key; old data then needs `previous_key_arns`.
#[tokio::test]
async fn alias_routing_records_the_key_arn() {
    let moto = Moto::start().await;
    let k1 = moto.create_key("first").await;
    let k2 = moto.create_key("second").await;
    moto.create_alias("alias/app", &k1).await;
    let key_uuid = k1.rsplit('/').next().unwrap().to_owned();
    let alias_arn = k1.replace(&format!("key/{key_uuid}"), "alias/app");
    let server = TestServer::start(&format!(
        r#"{}
[keys.by-alias]
backend = "aws"
key_id = "alias/app"
cache.enabled = false
[keys.by-alias-arn]
backend = "aws"
key_id = "{alias_arn}"
[keys.by-id]
backend = "aws"
key_id = "{key_uuid}"
[keys.remembers]
backend = "aws"
key_id = "alias/app"
previous_key_arns = ["{k1}"]
cache.enabled = false
"#,
        moto.aws_section()
    ))
    .await;
    let mut c = server.client().await;
    let none = BTreeMap::new();
    let mut before = BTreeMap::new();
    for key in ["by-alias", "by-alias-arn", "by-id", "remembers"] {
        let out = encrypt(&mut c, key, b"routed", &none).await;
        assert_eq!(out.key_version, k1, "{key}: response carries the key ARN");
        let env = keybroker::envelope::parse(&out.ciphertext).unwrap();
        assert_eq!(env.copies.len(), 1);
        assert_eq!(
            env.copies[0].key_id, k1,
            "{key}: envelope records the key ARN"
        );
        assert_eq!(env.copies[0].key_version, k1);
        let back = decrypt(&mut c, &out.ciphertext, &none).await.unwrap();
        assert_eq!(back.plaintext, &b"routed"[..]);
        assert_eq!(back.key_version, k1);
        before.insert(key, out.ciphertext);
    }
    let listed = c
        .list_keys(proto::ListKeysRequest {})
        .await
        .unwrap()
        .into_inner()
        .keys;
    let by_alias = listed.iter().find(|k| k.name == "by-alias").unwrap();
    assert_eq!(by_alias.backend, "aws");
    assert_eq!(by_alias.backend_key_id, "alias/app");

    // Re-point the alias: new data goes to the new key.
    moto.client()
        .update_alias()
        .alias_name("alias/app")
        .target_key_id(&k2)
        .send()
        .await
        .unwrap();
    for key in ["by-alias", "remembers"] {
        let out = encrypt(&mut c, key, b"moved", &none).await;
        assert_eq!(out.key_version, k2, "{key}");
        assert_eq!(
            decrypt(&mut c, &out.ciphertext, &none)
                .await
                .unwrap()
                .plaintext,
            &b"moved"[..]
        );
    }
    // Old data: refused by the key that does not list the old ARN (it only unwraps under
    // the key its alias names now)...
    let err = decrypt(&mut c, &before["by-alias"], &none)
        .await
        .unwrap_err();
    assert_eq!(reason(&err), "DECRYPTION_FAILED", "{err:?}");
    // ...and still readable where the old ARN is listed.
    let back = decrypt(&mut c, &before["remembers"], &none).await.unwrap();
    assert_eq!(back.plaintext, &b"routed"[..]);
    assert_eq!(back.key_version, k1);
}

/// KMS itself enforces the backend context: the wrapped key in an envelope decrypts with exactly
/// the documented pairs, and not with another caller's or none. The caller's own message
/// context never reaches KMS.
#[tokio::test]
async fn kms_encryption_context_is_enforced_and_exact() {
    let moto = Moto::start().await;
    let arn = moto.create_key("context").await;
    let server = TestServer::start(&format!(
        "{}\n[keys.orders]\nbackend = \"aws\"\nkey_id = \"{arn}\"\n",
        moto.aws_section()
    ))
    .await;
    moto.start_recording().await;
    let mut c = server.client().await;
    let msg_ctx = ctx(&[("tenant", "acme")]);
    let out = encrypt(&mut c, "orders", b"order 1", &msg_ctx).await;
    let env = keybroker::envelope::parse(&out.ciphertext).unwrap();
    assert_eq!((env.key_name, env.caller), ("orders", "anonymous"));
    let blob = env.copies[0].wrapped.to_vec();
    let kms = moto.client();
    let ok = kms
        .decrypt()
        .key_id(&arn)
        .ciphertext_blob(Blob::new(blob.clone()))
        .set_encryption_context(Some(backend_context("orders", "anonymous")))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.plaintext.unwrap().as_ref().len(), 32);
    let wrong = [
        Some(backend_context("orders", "spiffe://other/caller")),
        Some(backend_context("other-key", "anonymous")),
        None,
    ];
    for ec in wrong {
        let err = kms
            .decrypt()
            .key_id(&arn)
            .ciphertext_blob(Blob::new(blob.clone()))
            .set_encryption_context(ec.clone())
            .send()
            .await
            .expect_err("wrong context must not decrypt");
        let e = classify("Decrypt", err);
        assert_eq!(e.kind, BackendErrorKind::InvalidCiphertext, "{ec:?}: {e}");
    }
    // What moto received from keybroker: exactly one GenerateDataKey with exactly the two pairs.
    let rec = moto.recorded().await;
    let from_kb: Vec<_> = rec.iter().filter(|r| r.op == "GenerateDataKey").collect();
    assert_eq!(from_kb.len(), 1, "{rec:?}");
    let sent = from_kb[0].encryption_context("EncryptionContext");
    assert_eq!(
        sent,
        ctx(&[
            ("keybroker:caller", "anonymous"),
            ("keybroker:key", "orders")
        ])
    );
    assert_eq!(from_kb[0].body["KeyId"], arn.as_str());
    assert_eq!(from_kb[0].body["NumberOfBytes"], 32);
}

/// RotateKeyOnDemand keeps the key ARN; data from before still decrypts and new data works,
/// through a real server with caching off (every operation reaches KMS).
#[tokio::test]
async fn rotation_on_demand_keeps_old_data_readable() {
    let moto = Moto::start().await;
    let arn = moto.create_key("rotating").await;
    let server = TestServer::start(&format!(
        "{}\n[keys.r]\nbackend = \"aws\"\nkey_id = \"{arn}\"\ncache.enabled = false\n",
        moto.aws_section()
    ))
    .await;
    let mut c = server.client().await;
    let cx = ctx(&[("doc", "1")]);
    let old = encrypt(&mut c, "r", b"before rotation", &cx).await;
    let kms = moto.client();
    kms.rotate_key_on_demand()
        .key_id(&arn)
        .send()
        .await
        .unwrap();
    let rotations = kms.list_key_rotations().key_id(&arn).send().await.unwrap();
    assert_eq!(rotations.rotations().len(), 1);
    moto.start_recording().await;
    let new = encrypt(&mut c, "r", b"after rotation", &cx).await;
    assert_eq!(new.key_version, arn);
    assert_eq!(
        decrypt(&mut c, &old.ciphertext, &cx)
            .await
            .unwrap()
            .plaintext,
        &b"before rotation"[..]
    );
    assert_eq!(
        decrypt(&mut c, &new.ciphertext, &cx)
            .await
            .unwrap()
            .plaintext,
        &b"after rotation"[..]
    );
    assert_eq!(moto.count("GenerateDataKey").await, 1);
    assert_eq!(
        moto.count("Decrypt").await,
        2,
        "caching is off: each decrypt asks KMS"
    );
}

/// The cache's effect, counted by moto: one GenerateDataKey per data key (not per message),
/// decrypts of what this process wrote cost nothing, a fresh process pays one Decrypt per data
/// key, and concurrent misses make one call.
#[tokio::test]
async fn cache_call_counts_seen_by_moto() {
    let moto = Moto::start().await;
    let arn = moto.create_key("cached").await;
    let config = format!(
        "{}\n[keys.app]\nbackend = \"aws\"\nkey_id = \"{arn}\"\ncache.max_messages = 100\n",
        moto.aws_section()
    );
    let server = TestServer::start(&config).await;
    let mut c = server.client().await;
    moto.start_recording().await;
    let none = BTreeMap::new();
    let payload = vec![0x5a; 1024];
    let mut cts = Vec::new();
    for _ in 0..250 {
        cts.push(encrypt(&mut c, "app", &payload, &none).await.ciphertext);
    }
    assert_eq!(
        moto.count("GenerateDataKey").await,
        3,
        "250 messages / 100 per data key"
    );
    assert_eq!(backend_calls(&mut c, "app", "encrypt").await, 3);
    for ct in &cts {
        assert_eq!(decrypt(&mut c, ct, &none).await.unwrap().plaintext, payload);
    }
    assert_eq!(
        moto.count("Decrypt").await,
        0,
        "the writer's cache already holds its keys"
    );

    // Another process (fresh caches) reading the same 250 messages: one Decrypt per data key.
    let reader = TestServer::start(&config).await;
    let mut r = reader.client().await;
    for ct in &cts {
        assert_eq!(decrypt(&mut r, ct, &none).await.unwrap().plaintext, payload);
    }
    assert_eq!(moto.count("Decrypt").await, 3);
    assert_eq!(backend_calls(&mut r, "app", "decrypt").await, 3);

    // 32 concurrent Encrypts on an empty cache: one GenerateDataKey (single flight).
    let fresh = TestServer::start(&config).await;
    let mut tasks = Vec::new();
    for _ in 0..32 {
        let mut fc = fresh.client().await;
        let p = payload.clone();
        tasks.push(tokio::spawn(async move {
            encrypt(&mut fc, "app", &p, &BTreeMap::new()).await
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(moto.count("GenerateDataKey").await, 4);

    // Every KMS call keybroker made carried exactly the two documented pairs.
    for rec in moto.recorded().await {
        let sent = rec.encryption_context("EncryptionContext");
        assert_eq!(
            sent,
            ctx(&[("keybroker:caller", "anonymous"), ("keybroker:key", "app")]),
            "{}",
            rec.op
        );
        assert_eq!(rec.body["KeyId"], arn.as_str(), "{}", rec.op);
    }
}

/// ReEncrypt between two AWS keys on one client is a KMS ReEncrypt (the data key does not
/// leave KMS for the re-wrap); from another backend it falls back to Encrypt.
#[tokio::test]
async fn reencrypt_uses_kms_reencrypt_between_aws_keys() {
    let moto = Moto::start().await;
    let a = moto.create_key("source").await;
    let b = moto.create_key("destination").await;
    moto.create_alias("alias/dest", &b).await;
    let server = TestServer::start(&format!(
        r#"{}
[keys.a]
backend = "aws"
key_id = "{a}"
[keys.b]
backend = "aws"
key_id = "alias/dest"
[keys.local]
backend = "local"
key_id = "local"
keyring = "{{dir}}/keyring"
create = true
"#,
        moto.aws_section()
    ))
    .await;
    let mut c = server.client().await;
    let src_ctx = ctx(&[("v", "1")]);
    let dst_ctx = ctx(&[("v", "2")]);
    let out = encrypt(&mut c, "a", b"moving", &src_ctx).await;
    moto.start_recording().await;
    let moved = c
        .re_encrypt(proto::ReEncryptRequest {
            ciphertext: out.ciphertext.clone(),
            source_context: src_ctx.clone(),
            destination_key: "b".into(),
            destination_context: dst_ctx.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (moved.key.as_str(), moved.key_version.as_str()),
        ("b", b.as_str())
    );
    assert_eq!(moved.source_key_version, a);
    let rec = moto.recorded().await;
    let ops: Vec<&str> = rec.iter().map(|r| r.op.as_str()).collect();
    assert_eq!(
        ops,
        ["ReEncrypt"],
        "the writer's cache held the source key; one ReEncrypt"
    );
    let body = &rec[0].body;
    assert_eq!(body["SourceKeyId"], a.as_str());
    assert_eq!(body["DestinationKeyId"], "alias/dest");
    assert_eq!(
        rec[0].encryption_context("SourceEncryptionContext"),
        ctx(&[("keybroker:caller", "anonymous"), ("keybroker:key", "a")])
    );
    assert_eq!(
        rec[0].encryption_context("DestinationEncryptionContext"),
        ctx(&[("keybroker:caller", "anonymous"), ("keybroker:key", "b")])
    );
    let env = keybroker::envelope::parse(&moved.ciphertext).unwrap();
    assert_eq!(env.copies[0].key_id, b);
    // A fresh process proves the new copy is a genuine KMS ciphertext under b.
    let reader = TestServer::start(&server_config_text(&server)).await;
    let mut r = reader.client().await;
    assert_eq!(
        decrypt(&mut r, &moved.ciphertext, &dst_ctx)
            .await
            .unwrap()
            .plaintext,
        &b"moving"[..]
    );

    // local -> aws: no KMS ReEncrypt possible; the data key is wrapped with Encrypt.
    let local = encrypt(&mut c, "local", b"from local", &src_ctx).await;
    moto.start_recording().await;
    let moved = c
        .re_encrypt(proto::ReEncryptRequest {
            ciphertext: local.ciphertext,
            source_context: src_ctx,
            destination_key: "a".into(),
            destination_context: dst_ctx.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let ops: Vec<String> = moto.recorded().await.into_iter().map(|r| r.op).collect();
    assert_eq!(ops, ["Encrypt"]);
    assert_eq!(
        decrypt(&mut c, &moved.ciphertext, &dst_ctx)
            .await
            .unwrap()
            .plaintext,
        &b"from local"[..]
    );
}

fn server_config_text(server: &TestServer) -> String {
    std::fs::read_to_string(server.path("keybroker.toml")).unwrap()
}

/// No lock-in: with only the envelope bytes, the AWS SDK and the documented construction
/// (docs/envelope.md, docs/aws.md), the payload is recovered. The envelope is walked and the
/// message decrypted here independently of keybroker's own `open`.
#[tokio::test]
async fn recovery_without_keybroker() {
    let moto = Moto::start().await;
    let arn = moto.create_key("recoverable").await;
    let server = TestServer::start(&format!(
        "{}\n[keys.archive]\nbackend = \"aws\"\nkey_id = \"{arn}\"\n",
        moto.aws_section()
    ))
    .await;
    let mut c = server.client().await;
    let message_ctx = ctx(&[("tenant", "acme"), ("purpose", "invoice")]);
    let plaintext = b"data that must outlive keybroker".to_vec();
    let ct = encrypt(&mut c, "archive", &plaintext, &message_ctx)
        .await
        .ciphertext;
    server.stop().await;

    // 1. The wrapped key and the names the KMS context is made of, from the header.
    let env = keybroker::envelope::parse(&ct).unwrap();
    let copy = env.copies[0];
    let walked = independent::walk(&ct);
    assert_eq!(walked.wrapped[0], copy.wrapped);
    assert_eq!(
        (walked.key_name.as_str(), walked.caller.as_str()),
        (env.key_name, env.caller)
    );
    assert_eq!(walked.key_ids[0], arn);

    // 2. KMS Decrypt, as `aws kms decrypt --key-id ARN --encryption-context
    //    keybroker:key=archive,keybroker:caller=anonymous --ciphertext-blob fileb://...` would.
    let mut kms_ctx = std::collections::HashMap::new();
    kms_ctx.insert("keybroker:key".to_owned(), walked.key_name.clone());
    kms_ctx.insert("keybroker:caller".to_owned(), walked.caller.clone());
    let data_key = moto
        .client()
        .decrypt()
        .key_id(&walked.key_ids[0])
        .ciphertext_blob(Blob::new(walked.wrapped[0].clone()))
        .set_encryption_context(Some(kms_ctx))
        .send()
        .await
        .unwrap()
        .plaintext
        .unwrap()
        .into_inner();

    // 3. The envelope construction, by hand.
    let recovered = independent::open(&walked, &data_key, &message_ctx).expect("payload opens");
    assert_eq!(recovered, plaintext);
    assert!(
        independent::open(&walked, &data_key, &ctx(&[("tenant", "other")])).is_none(),
        "the message context is bound as AAD"
    );
}

/// The recovery script in docs/aws.md (Python, boto3 + cryptography, no keybroker code) run
/// against moto: the documented steps recover the payload, and a wrong context fails.
#[tokio::test]
async fn documented_python_recovery_script_works() {
    let moto = Moto::start().await;
    let arn = moto.create_key("recoverable by script").await;
    let server = TestServer::start(&format!(
        "{}\n[keys.invoices]\nbackend = \"aws\"\nkey_id = \"{arn}\"\n",
        moto.aws_section()
    ))
    .await;
    let mut c = server.client().await;
    let plaintext = b"invoice 2024-001: 1 sidecar".to_vec();
    let message_ctx = ctx(&[("tenant", "acme"), ("purpose", "invoice")]);
    let ct = encrypt(&mut c, "invoices", &plaintext, &message_ctx)
        .await
        .ciphertext;
    server.stop().await;

    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/aws.md")).unwrap();
    let block = doc
        .split("<!-- recover.py begin -->")
        .nth(1)
        .and_then(|rest| rest.split("<!-- recover.py end -->").next())
        .expect("docs/aws.md has the recover.py markers");
    let script = block
        .trim()
        .strip_prefix("```python")
        .and_then(|b| b.strip_suffix("```"))
        .expect("a python code block between the markers");
    let dir = moto.dir.path();
    std::fs::write(dir.join("recover.py"), script).unwrap();
    std::fs::write(dir.join("message.kb"), &ct).unwrap();
    let python = crate::support::moto::venv().join("bin/python");
    let run = |pairs: &'static [&'static str]| {
        let mut cmd = std::process::Command::new(&python);
        cmd.arg(dir.join("recover.py"))
            .arg(dir.join("message.kb"))
            .args(pairs)
            .env("AWS_ACCESS_KEY_ID", "AKIAKEYBROKERTEST000")
            .env("AWS_SECRET_ACCESS_KEY", "not-a-secret")
            .env("AWS_ENDPOINT_URL", &moto.endpoint)
            .env("AWS_CONFIG_FILE", dir.join("no-config"))
            .env("AWS_SHARED_CREDENTIALS_FILE", dir.join("no-credentials"))
            .env_remove("AWS_PROFILE")
            .env_remove("AWS_SESSION_TOKEN");
        cmd.output().unwrap()
    };
    let out = run(&["tenant=acme", "purpose=invoice"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout, plaintext);
    let wrong = run(&["tenant=acme"]);
    assert!(!wrong.status.success(), "a wrong context must not decrypt");
    assert!(wrong.stdout.is_empty());
}

/// A from-the-spec reader of envelope formats 1 and 2 (docs/envelope.md), sharing no code with
/// keybroker.
mod independent {
    use std::collections::BTreeMap;

    use aws_lc_rs::{aead, digest, hkdf};

    pub struct Walked {
        pub version: u8,
        pub key_name: String,
        pub caller: String,
        pub key_ids: Vec<String>,
        pub wrapped: Vec<Vec<u8>>,
        salt: Vec<u8>,
        commitment: Vec<u8>,
        header: Vec<u8>,
        body: Vec<u8>,
    }

    pub fn walk(b: &[u8]) -> Walked {
        assert_eq!(&b[..2], b"KB");
        assert!(b[2] == 1 || b[2] == 2, "format version");
        assert_eq!(b[3], 1, "kind: message");
        let mut pos = 4;
        let mut name = || {
            let n = b[pos] as usize;
            let s = String::from_utf8(b[pos + 1..pos + 1 + n].to_vec()).unwrap();
            pos += 1 + n;
            s
        };
        let key_name = name();
        let caller = name();
        let count = b[pos] as usize;
        pos += 1;
        let mut key_ids = Vec::new();
        let mut wrapped = Vec::new();
        for _ in 0..count {
            assert_eq!(b[pos], 2, "backend code 2 = aws");
            pos += 1;
            let mut field = || {
                let n = u16::from_be_bytes([b[pos], b[pos + 1]]) as usize;
                let f = b[pos + 2..pos + 2 + n].to_vec();
                pos += 2 + n;
                f
            };
            key_ids.push(String::from_utf8(field()).unwrap());
            let _version = field();
            wrapped.push(field());
        }
        let salt = b[pos..pos + 32].to_vec();
        let commitment = b[pos + 32..pos + 64].to_vec();
        pos += 64;
        Walked {
            version: b[2],
            key_name,
            caller,
            key_ids,
            wrapped,
            salt,
            commitment,
            header: b[..pos].to_vec(),
            body: b[pos..].to_vec(),
        }
    }

    struct Len64;
    impl hkdf::KeyType for Len64 {
        fn len(&self) -> usize {
            64
        }
    }

    /// HKDF-SHA256(salt, ikm = data key, info) -> 64 bytes: AES-256-GCM key || commitment, where
    /// info = label (format 1) or label || SHA-256(header up to the salt || canonical context)
    /// (format 2); zero nonce; AAD = header || canonical context.
    pub fn open(
        w: &Walked,
        data_key: &[u8],
        context: &BTreeMap<String, String>,
    ) -> Option<Vec<u8>> {
        let mut canonical = (context.len() as u16).to_be_bytes().to_vec();
        for (k, v) in context {
            canonical.extend_from_slice(&(k.len() as u16).to_be_bytes());
            canonical.extend_from_slice(k.as_bytes());
            canonical.extend_from_slice(&(v.len() as u16).to_be_bytes());
            canonical.extend_from_slice(v.as_bytes());
        }
        let mut bound = w.header[..w.header.len() - 32].to_vec();
        bound.extend_from_slice(&canonical);
        let binding = digest::digest(&digest::SHA256, &bound);
        let info: Vec<&[u8]> = if w.version == 1 {
            vec![b"keybroker envelope v1: aes-256-gcm key || key commitment"]
        } else {
            vec![b"keybroker envelope v2", binding.as_ref()]
        };
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, &w.salt).extract(data_key);
        let mut okm = [0u8; 64];
        prk.expand(&info, Len64).ok()?.fill(&mut okm).ok()?;
        if okm[32..] != w.commitment[..] {
            return None;
        }
        let mut aad = w.header.clone();
        aad.extend_from_slice(&canonical);
        let key =
            aead::LessSafeKey::new(aead::UnboundKey::new(&aead::AES_256_GCM, &okm[..32]).ok()?);
        let mut buf = w.body.clone();
        let n = key
            .open_in_place(
                aead::Nonce::assume_unique_for_key([0u8; 12]),
                aead::Aad::from(&aad[..]),
                &mut buf,
            )
            .ok()?
            .len();
        buf.truncate(n);
        Some(buf)
    }
}

/// What moto can produce: unknown keys and aliases are NOT_FOUND, without AWS's text.
#[tokio::test]
async fn unknown_keys_are_not_found() {
    let moto = Moto::start().await;
    let real = moto.create_key("exists").await;
    let missing_arn = real.replace(
        real.rsplit('/').next().unwrap(),
        "00000000-0000-0000-0000-000000000000",
    );
    let server = TestServer::start(&format!(
        "{}\n[keys.no-alias]\nbackend = \"aws\"\nkey_id = \"alias/does-not-exist\"\n[keys.no-key]\nbackend = \"aws\"\nkey_id = \"{missing_arn}\"\n",
        moto.aws_section()
    ))
    .await;
    let mut c = server.client().await;
    for key in ["no-alias", "no-key"] {
        let err = c
            .encrypt(proto::EncryptRequest {
                key: key.into(),
                plaintext: b"x".to_vec().into(),
                context: BTreeMap::new(),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::NotFound, "{key}: {err:?}");
        assert_eq!(reason(&err), "BACKEND_KEY_NOT_FOUND");
        // moto's own texts: "Alias arn:...:123456789012:alias/... is not found." and
        // "Key 'arn:...' does not exist".
        for raw in ["123456789012", "is not found", "Key '"] {
            assert!(!err.message().contains(raw), "{key}: {}", err.message());
        }
    }
}

/// Network-level failures on loopback: a closed port is UNAVAILABLE, an endpoint that never
/// answers hits the configured deadline (DEADLINE_EXCEEDED), in bounded time.
#[tokio::test]
async fn unreachable_and_silent_endpoints() {
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let silent = KmsErrorServer::start(200, "", true).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("credentials"),
        "[moto]\naws_access_key_id = A\naws_secret_access_key = B\n",
    )
    .unwrap();
    let server = TestServer::start(&format!(
        r#"
[aws]
region = "us-east-1"
profile = "moto"
credentials_file = "{}/credentials"
max_attempts = 2
attempt_timeout = "60s"
[keys.closed]
backend = "aws"
key_id = "alias/x"
endpoint = "http://127.0.0.1:{closed}"
[keys.silent]
backend = "aws"
key_id = "alias/x"
endpoint = "{}"
timeout = "300ms"
"#,
        dir.path().display(),
        silent.endpoint
    ))
    .await;
    let mut c = server.client().await;
    let err = c
        .encrypt(proto::EncryptRequest {
            key: "closed".into(),
            plaintext: b"x".to_vec().into(),
            context: BTreeMap::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert_eq!(reason(&err), "BACKEND_UNAVAILABLE");
    let err = c
        .encrypt(proto::EncryptRequest {
            key: "silent".into(),
            plaintext: b"x".to_vec().into(),
            context: BTreeMap::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    assert_eq!(reason(&err), "BACKEND_DEADLINE_EXCEEDED");
    // keybroker's own per-call deadline fired (the SDK's attempt timeout is set to 60 s).
    assert!(err.message().contains("within 300ms"), "{}", err.message());
    assert!(silent.count() >= 1);
}

/// Error kinds moto cannot produce, through the real SDK: an endpoint answering every request
/// with one KMS error. Throttling is retried by the SDK (max_attempts requests reach the
/// endpoint) and only then reported.
#[tokio::test]
async fn kms_error_answers_map_through_the_sdk() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("credentials"),
        "[p]\naws_access_key_id = A\naws_secret_access_key = B\n",
    )
    .unwrap();
    let cases = [
        (
            400,
            "ThrottlingException",
            Code::ResourceExhausted,
            "BACKEND_THROTTLED",
            3,
        ),
        (
            400,
            "LimitExceededException",
            Code::ResourceExhausted,
            "BACKEND_THROTTLED",
            3,
        ),
        (
            400,
            "DisabledException",
            Code::FailedPrecondition,
            "KEY_DISABLED",
            1,
        ),
        (
            400,
            "KMSInvalidStateException",
            Code::FailedPrecondition,
            "KEY_DISABLED",
            1,
        ),
        (
            400,
            "AccessDeniedException",
            Code::PermissionDenied,
            "BACKEND_PERMISSION_DENIED",
            1,
        ),
        (
            400,
            "UnrecognizedClientException",
            Code::Unauthenticated,
            "BACKEND_UNAUTHENTICATED",
            1,
        ),
        (
            500,
            "KMSInternalException",
            Code::Unavailable,
            "BACKEND_UNAVAILABLE",
            3,
        ),
    ];
    for (status, code, grpc, why, attempts) in cases {
        let fake = KmsErrorServer::start(status, code, false).await;
        let server = TestServer::start(&format!(
            r#"
[aws]
region = "us-east-1"
profile = "p"
credentials_file = "{}/credentials"
max_attempts = 3
timeout = "20s"
[keys.k]
backend = "aws"
key_id = "arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"
endpoint = "{}"
"#,
            dir.path().display(),
            fake.endpoint
        ))
        .await;
        let mut c = server.client().await;
        let err = c
            .encrypt(proto::EncryptRequest {
                key: "k".into(),
                plaintext: b"x".to_vec().into(),
                context: BTreeMap::new(),
            })
            .await
            .unwrap_err();
        assert_eq!(
            (err.code(), reason(&err).as_str()),
            (grpc, why),
            "{code}: {err:?}"
        );
        assert!(
            !err.message().contains("raw AWS text"),
            "{code}: {}",
            err.message()
        );
        assert_eq!(
            fake.count(),
            attempts,
            "{code}: requests that reached the endpoint"
        );
    }
    // Decrypt-side: IncorrectKeyException is DECRYPTION_FAILED.
    let fake = KmsErrorServer::start(400, "IncorrectKeyException", false).await;
    let config = parse_config(&format!(
        "[aws]\nregion = \"us-east-1\"\nprofile = \"p\"\ncredentials_file = \"{}/credentials\"\n[keys.k]\nbackend = \"aws\"\nkey_id = \"arn:aws:kms:us-east-1:111122223333:key/k1\"\nendpoint = \"{}\"\n",
        dir.path().display(),
        fake.endpoint
    ));
    let registry = config
        .build_registry(&StatsBook::default(), None, None)
        .await
        .unwrap();
    let b = &registry.get("k").unwrap().backend;
    let copy = keybroker::envelope::WrappedCopy {
        backend: keybroker::backend::BackendKind::Aws,
        key_id: "arn:aws:kms:us-east-1:111122223333:key/k1",
        key_version: "arn:aws:kms:us-east-1:111122223333:key/k1",
        wrapped: b"blob",
    };
    let err = b.unwrap(&copy, &conformance::CTX).await.err().unwrap();
    assert_eq!(err.kind, BackendErrorKind::InvalidCiphertext, "{err}");
    assert_eq!(fake.count(), 1);
    // A copy naming another key never reaches KMS.
    let other = keybroker::envelope::WrappedCopy {
        key_id: "arn:aws:kms:us-east-1:111122223333:key/k2",
        ..copy
    };
    let err = b.unwrap(&other, &conformance::CTX).await.err().unwrap();
    assert_eq!(err.kind, BackendErrorKind::InvalidCiphertext, "{err}");
    assert_eq!(fake.count(), 1, "refused before any KMS call");
}

/// The mapping function against the SDK's typed errors, including the ones no emulator here
/// produces. The caller-visible message never holds AWS's text; the log-bound source does.
#[test]
fn typed_sdk_errors_map_to_kinds() {
    use BackendErrorKind as K;
    use aws_sdk_kms::config::http::HttpResponse;
    use aws_sdk_kms::error::{ConnectorError, ErrorMetadata, SdkError};
    use aws_sdk_kms::operation::decrypt::DecryptError;
    use aws_sdk_kms::operation::generate_data_key::GenerateDataKeyError;
    use aws_sdk_kms::types::error::*;
    use aws_smithy_types::body::SdkBody;

    const RAW: &str = "raw AWS text with details";
    let raw = |status: u16| HttpResponse::new(status.try_into().unwrap(), SdkBody::from("{}"));
    let gdk = |e: GenerateDataKeyError, status| SdkError::service_error(e, raw(status));
    let dec = |e: DecryptError| SdkError::service_error(e, raw(400));
    let generic = |code: &str| {
        GenerateDataKeyError::generic(ErrorMetadata::builder().code(code).message(RAW).build())
    };
    let cases: Vec<(SdkError<GenerateDataKeyError, HttpResponse>, K)> = vec![
        (
            gdk(
                GenerateDataKeyError::NotFoundException(
                    NotFoundException::builder().message(RAW).build(),
                ),
                400,
            ),
            K::NotFound,
        ),
        (
            gdk(
                GenerateDataKeyError::DisabledException(
                    DisabledException::builder().message(RAW).build(),
                ),
                400,
            ),
            K::Disabled,
        ),
        (
            gdk(
                GenerateDataKeyError::KmsInvalidStateException(
                    KmsInvalidStateException::builder().message(RAW).build(),
                ),
                400,
            ),
            K::Disabled,
        ),
        (
            gdk(
                GenerateDataKeyError::InvalidKeyUsageException(
                    InvalidKeyUsageException::builder().message(RAW).build(),
                ),
                400,
            ),
            K::Disabled,
        ),
        (
            gdk(
                GenerateDataKeyError::KeyUnavailableException(
                    KeyUnavailableException::builder().message(RAW).build(),
                ),
                500,
            ),
            K::Unavailable,
        ),
        (
            gdk(
                GenerateDataKeyError::KmsInternalException(
                    KmsInternalException::builder().message(RAW).build(),
                ),
                500,
            ),
            K::Unavailable,
        ),
        (
            gdk(
                GenerateDataKeyError::DependencyTimeoutException(
                    DependencyTimeoutException::builder().message(RAW).build(),
                ),
                503,
            ),
            K::Unavailable,
        ),
        (
            gdk(
                GenerateDataKeyError::InvalidGrantTokenException(
                    InvalidGrantTokenException::builder().message(RAW).build(),
                ),
                400,
            ),
            K::PermissionDenied,
        ),
        (
            gdk(generic("AccessDeniedException"), 400),
            K::PermissionDenied,
        ),
        (gdk(generic("ThrottlingException"), 400), K::Throttled),
        (gdk(generic("LimitExceededException"), 400), K::Throttled),
        (
            gdk(generic("ExpiredTokenException"), 400),
            K::Unauthenticated,
        ),
        (gdk(generic("SomethingNew"), 503), K::Unavailable),
        (gdk(generic("SomethingNew"), 400), K::Internal),
        (SdkError::timeout_error(RAW), K::DeadlineExceeded),
        (
            SdkError::dispatch_failure(ConnectorError::io(RAW.into())),
            K::Unavailable,
        ),
        (
            SdkError::dispatch_failure(ConnectorError::timeout(RAW.into())),
            K::DeadlineExceeded,
        ),
        (
            SdkError::dispatch_failure(ConnectorError::other(
                Box::new(aws_credential_types::provider::error::CredentialsError::not_loaded(RAW)),
                None,
            )),
            K::Unauthenticated,
        ),
        (SdkError::response_error(RAW, raw(200)), K::Unavailable),
        (SdkError::construction_failure(RAW), K::Internal),
    ];
    for (err, kind) in cases {
        let what = format!("{err:?}");
        let e = classify("GenerateDataKey", err);
        assert_eq!(e.kind, kind, "{what}");
        assert!(!e.message.contains(RAW), "{what}: {}", e.message);
        assert!(e.message.starts_with("GenerateDataKey: "), "{}", e.message);
        let logged = chain(&e);
        assert!(
            logged.contains(RAW),
            "{what}: the log must get AWS's text: {logged}"
        );
    }
    for e in [
        DecryptError::IncorrectKeyException(IncorrectKeyException::builder().message(RAW).build()),
        DecryptError::InvalidCiphertextException(
            InvalidCiphertextException::builder().message(RAW).build(),
        ),
    ] {
        let e = classify("Decrypt", dec(e));
        assert_eq!(e.kind, K::InvalidCiphertext);
        assert!(!e.message.contains(RAW));
    }
}

/// An error and its sources, the way error.rs logs them.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cur = c.source();
    }
    out
}

/// A real credentials failure inside the SDK (a provider that cannot load credentials) is
/// UNAUTHENTICATED, and the request never leaves the process.
#[tokio::test]
async fn missing_credentials_are_unauthenticated() {
    #[derive(Debug)]
    struct NoCredentials;
    impl aws_sdk_kms::config::ProvideCredentials for NoCredentials {
        fn provide_credentials<'a>(
            &'a self,
        ) -> aws_credential_types::provider::future::ProvideCredentials<'a>
        where
            Self: 'a,
        {
            aws_credential_types::provider::future::ProvideCredentials::ready(Err(
                aws_credential_types::provider::error::CredentialsError::not_loaded("none here"),
            ))
        }
    }
    let fake = KmsErrorServer::start(200, "", false).await;
    let conf = aws_sdk_kms::Config::builder()
        .behavior_version(aws_sdk_kms::config::BehaviorVersion::latest())
        .region(aws_sdk_kms::config::Region::new("us-east-1"))
        .endpoint_url(&fake.endpoint)
        .credentials_provider(NoCredentials)
        .build();
    let client = aws_sdk_kms::Client::from_conf(conf);
    let err = client
        .generate_data_key()
        .key_id("alias/x")
        .number_of_bytes(32)
        .send()
        .await
        .unwrap_err();
    let e = classify("GenerateDataKey", err);
    assert_eq!(
        e.kind,
        BackendErrorKind::Unauthenticated,
        "{e}: {:?}",
        e.source
    );
    assert_eq!(fake.count(), 0);
}

/// Issue 21 item 13: KMS Decrypt takes the key from the blob and keybroker recorded the key ARN
/// as the version; any other version string used to unwrap just the same (a new decrypt-cache
/// entry and a paid call each). Now only the ARN is accepted, and refusals cost no KMS call.
#[tokio::test]
async fn the_version_must_be_the_key_arn() {
    let moto = Moto::start().await;
    let a = moto.create_key("respell").await;
    let config = parse_config(&format!(
        "{}\n[keys.a]\nbackend = \"aws\"\nkey_id = \"{a}\"\n",
        moto.aws_section()
    ));
    let registry = config
        .build_registry(&StatsBook::default(), None, None)
        .await
        .unwrap();
    let b = Arc::clone(&registry.get("a").unwrap().backend);
    moto.start_recording().await;
    conformance::respelled_copies_are_refused(&*b, |w| {
        [
            "anything".to_owned(),
            String::new(),
            format!("{} ", w.key_id),
            w.key_id.to_uppercase(),
            format!("{}/1", w.key_id),
        ]
        .into_iter()
        .map(|v| {
            let mut x = w.clone();
            x.key_version = v;
            x
        })
        .collect()
    })
    .await;
    // One GenerateDataKey and one Decrypt (the genuine copy at the end): no variant reached KMS.
    assert_eq!(moto.count("Decrypt").await, 1);
}

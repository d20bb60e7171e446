//! Caller identity (bearer tokens, Unix-socket peer credentials) and the per-key policy,
//! through a real server: the policy matrix, cached data keys not bypassing it, and hot reload.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::time::{Duration, Instant};

use keybroker::client::KeyBrokerClient;
use keybroker::proto::{
    DecryptRequest, EncryptRequest, GenerateDataKeyRequest, ListKeysRequest, ReEncryptRequest,
};
use tonic::Code;
use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::support::{TestServer, reason};

/// Adds `authorization: Bearer <token>` to every call.
#[derive(Clone)]
pub struct Bearer(pub Option<String>);

impl Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(t) = &self.0 {
            req.metadata_mut().insert(
                "authorization",
                MetadataValue::try_from(format!("Bearer {t}")).unwrap(),
            );
        }
        Ok(req)
    }
}

pub type Client = KeyBrokerClient<InterceptedService<Channel, Bearer>>;

pub async fn client_as(addr: &str, token: Option<&str>) -> Client {
    let channel = keybroker::client::connect(addr).await.unwrap();
    KeyBrokerClient::with_interceptor(channel, Bearer(token.map(str::to_owned)))
}

/// Three callers with tokens, two keys with different policies.
pub fn config(dir: &std::path::Path) -> String {
    for (name, token) in [
        ("billing", "tok-billing"),
        ("reports", "tok-reports"),
        ("rekeyer", "tok-rekeyer"),
    ] {
        std::fs::write(dir.join(format!("{name}.token")), format!("{token}\n")).unwrap();
    }
    r#"
[identity]
reload_interval = "200ms"
[[identity.tokens]]
caller = "billing"
file = "billing.token"
[[identity.tokens]]
caller = "reports"
file = "reports.token"
[[identity.tokens]]
caller = "rekeyer"
file = "rekeyer.token"

[keys.payments]
backend = "local"
key_id = "payments"
keyring = "keyring"
create = true
[[keys.payments.policy]]
callers = ["billing"]
operations = ["encrypt", "decrypt", "generate_data_key", "list"]
[[keys.payments.policy]]
callers = ["reports"]
operations = ["decrypt"]
[[keys.payments.policy]]
callers = ["rekeyer"]
operations = ["re_encrypt"]

[keys.archive]
backend = "local"
key_id = "archive"
keyring = "keyring"
create = true
[[keys.archive.policy]]
callers = ["rekeyer"]
operations = ["re_encrypt"]
[[keys.archive.policy]]
callers = ["*"]
operations = ["list"]
"#
    .to_owned()
}

pub async fn server() -> TestServer {
    let dir = tempfile::tempdir().unwrap();
    let text = config(dir.path());
    TestServer::start_in(dir, &text).await
}

fn enc(key: &str) -> EncryptRequest {
    EncryptRequest {
        key: key.into(),
        plaintext: b"card 4111".to_vec().into(),
        context: BTreeMap::new(),
    }
}

fn denied(e: &tonic::Status, caller: &str, key: &str, op: &str) {
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert_eq!(reason(e), "POLICY_DENIED");
    for part in [caller, key, op] {
        assert!(
            e.message().contains(part),
            "{:?} does not name {part}",
            e.message()
        );
    }
}

#[tokio::test]
async fn policy_matrix_with_exact_statuses() {
    let s = server().await;
    let mut billing = client_as(&s.addr, Some("tok-billing")).await;
    let mut reports = client_as(&s.addr, Some("tok-reports")).await;
    let mut rekeyer = client_as(&s.addr, Some("tok-rekeyer")).await;
    let mut anon = client_as(&s.addr, None).await;

    // encrypt
    let ct = billing
        .encrypt(enc("payments"))
        .await
        .unwrap()
        .into_inner()
        .ciphertext;
    denied(
        &reports.encrypt(enc("payments")).await.unwrap_err(),
        "reports",
        "payments",
        "encrypt",
    );
    denied(
        &rekeyer.encrypt(enc("payments")).await.unwrap_err(),
        "rekeyer",
        "payments",
        "encrypt",
    );
    denied(
        &anon.encrypt(enc("payments")).await.unwrap_err(),
        "anonymous",
        "payments",
        "encrypt",
    );
    denied(
        &billing.encrypt(enc("archive")).await.unwrap_err(),
        "billing",
        "archive",
        "encrypt",
    );

    // decrypt
    let dec = |ct: bytes::Bytes| DecryptRequest {
        ciphertext: ct,
        context: BTreeMap::new(),
    };
    assert_eq!(
        billing
            .decrypt(dec(ct.clone()))
            .await
            .unwrap()
            .into_inner()
            .plaintext
            .as_ref(),
        b"card 4111"
    );
    assert_eq!(
        reports
            .decrypt(dec(ct.clone()))
            .await
            .unwrap()
            .into_inner()
            .plaintext
            .as_ref(),
        b"card 4111"
    );
    denied(
        &rekeyer.decrypt(dec(ct.clone())).await.unwrap_err(),
        "rekeyer",
        "payments",
        "decrypt",
    );
    denied(
        &anon.decrypt(dec(ct.clone())).await.unwrap_err(),
        "anonymous",
        "payments",
        "decrypt",
    );

    // generate_data_key
    let gdk = |key: &str| GenerateDataKeyRequest {
        key: key.into(),
        spec: 0,
        context: BTreeMap::new(),
    };
    billing.generate_data_key(gdk("payments")).await.unwrap();
    denied(
        &reports
            .generate_data_key(gdk("payments"))
            .await
            .unwrap_err(),
        "reports",
        "payments",
        "generate_data_key",
    );

    // re_encrypt: the re-keying job moves data from payments to archive without being able to
    // read it; billing may not re-encrypt into archive (no encrypt there).
    let re = |ct: bytes::Bytes, to: &str| ReEncryptRequest {
        ciphertext: ct,
        source_context: BTreeMap::new(),
        destination_key: to.into(),
        destination_context: BTreeMap::new(),
    };
    let moved = rekeyer
        .re_encrypt(re(ct.clone(), "archive"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(moved.key, "archive");
    denied(
        &rekeyer
            .decrypt(dec(moved.ciphertext.clone()))
            .await
            .unwrap_err(),
        "rekeyer",
        "archive",
        "decrypt",
    );
    denied(
        &billing
            .re_encrypt(re(ct.clone(), "archive"))
            .await
            .unwrap_err(),
        "billing",
        "archive",
        "re_encrypt to",
    );
    denied(
        &reports
            .re_encrypt(re(ct.clone(), "archive"))
            .await
            .unwrap_err(),
        "reports",
        "archive",
        "re_encrypt to",
    );
    denied(
        &anon
            .re_encrypt(re(ct.clone(), "payments"))
            .await
            .unwrap_err(),
        "anonymous",
        "payments",
        "re_encrypt from",
    );
    // billing may re-encrypt within payments (decrypt + encrypt there).
    billing
        .re_encrypt(re(ct.clone(), "payments"))
        .await
        .unwrap();

    // list: each caller sees only what it may list; anonymous is not in "*".
    let names = |r: keybroker::proto::ListKeysResponse| {
        r.keys.into_iter().map(|k| k.name).collect::<Vec<_>>()
    };
    assert_eq!(
        names(
            billing
                .list_keys(ListKeysRequest {})
                .await
                .unwrap()
                .into_inner()
        ),
        ["archive", "payments"]
    );
    assert_eq!(
        names(
            reports
                .list_keys(ListKeysRequest {})
                .await
                .unwrap()
                .into_inner()
        ),
        ["archive"]
    );
    assert!(
        names(
            anon.list_keys(ListKeysRequest {})
                .await
                .unwrap()
                .into_inner()
        )
        .is_empty()
    );
}

/// A data key cached for an allowed caller does not let a denied caller encrypt or decrypt:
/// the policy is checked before the cache.
#[tokio::test]
async fn a_cached_data_key_is_no_way_around_the_policy() {
    let s = server().await;
    let mut billing = client_as(&s.addr, Some("tok-billing")).await;
    let mut rekeyer = client_as(&s.addr, Some("tok-rekeyer")).await;
    let ct = billing
        .encrypt(enc("payments"))
        .await
        .unwrap()
        .into_inner()
        .ciphertext;
    billing
        .decrypt(DecryptRequest {
            ciphertext: ct.clone(),
            context: BTreeMap::new(),
        })
        .await
        .unwrap();
    // The encrypt-side and decrypt-side caches are now warm for this data key.
    for _ in 0..3 {
        denied(
            &rekeyer.encrypt(enc("payments")).await.unwrap_err(),
            "rekeyer",
            "payments",
            "encrypt",
        );
        denied(
            &rekeyer
                .decrypt(DecryptRequest {
                    ciphertext: ct.clone(),
                    context: BTreeMap::new(),
                })
                .await
                .unwrap_err(),
            "rekeyer",
            "payments",
            "decrypt",
        );
    }
}

#[tokio::test]
async fn wrong_or_malformed_tokens_are_unauthenticated_never_anonymous() {
    let s = server().await;
    for header in ["Bearer nope", "Basic dXNlcjpwYXNz", "Bearer", "tok-billing"] {
        let channel = keybroker::client::connect(&s.addr).await.unwrap();
        let h = header.to_owned();
        let mut c =
            KeyBrokerClient::with_interceptor(channel, move |mut req: tonic::Request<()>| {
                req.metadata_mut().insert(
                    "authorization",
                    MetadataValue::try_from(h.as_str()).unwrap(),
                );
                Ok(req)
            });
        // Even an operation anonymous could do (list returns nothing for it) is refused.
        let e = c.list_keys(ListKeysRequest {}).await.unwrap_err();
        assert_eq!(
            (e.code(), reason(&e).as_str()),
            (Code::Unauthenticated, "UNAUTHENTICATED"),
            "{header}"
        );
        assert!(
            !e.message().contains("tok-billing"),
            "the message echoes the token"
        );
    }
    // A token rotated on disk: the old value stops working, the new one works.
    std::fs::write(s.path("billing.token"), "tok-billing-2\n").unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut old = client_as(&s.addr, Some("tok-billing")).await;
        if old.encrypt(enc("payments")).await.is_err() {
            break;
        }
        assert!(Instant::now() < deadline, "rotated token not picked up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut new = client_as(&s.addr, Some("tok-billing-2")).await;
    new.encrypt(enc("payments")).await.unwrap();
}

/// Unix-socket peer credentials (this test process's own uid) map to a configured caller.
#[tokio::test]
async fn unix_socket_peer_credentials_identify_the_caller() {
    let dir = tempfile::tempdir().unwrap();
    let uid = std::fs::metadata(dir.path()).unwrap().uid();
    let text = format!(
        r#"
[server]
listen = ["127.0.0.1:0", "unix://{{dir}}/kb.sock"]
[[identity.peers]]
caller = "local-app"
uid = {uid}
[keys.k]
backend = "local"
key_id = "k"
keyring = "{{dir}}/keyring"
create = true
[[keys.k.policy]]
callers = ["local-app"]
operations = ["encrypt"]
"#
    );
    let s = TestServer::start_in(dir, &text).await;
    let sock = format!("unix://{}", s.path("kb.sock").display());
    let mut over_uds = client_as(&sock, None).await;
    over_uds.encrypt(enc("k")).await.unwrap();
    // The same process over TCP has no peer credentials: anonymous, denied.
    let mut over_tcp = client_as(&s.addr, None).await;
    denied(
        &over_tcp.encrypt(enc("k")).await.unwrap_err(),
        "anonymous",
        "k",
        "encrypt",
    );
    // A presented but wrong token over UDS is still refused.
    let mut bad = client_as(&sock, Some("wrong")).await;
    assert_eq!(
        bad.encrypt(enc("k")).await.unwrap_err().code(),
        Code::Unauthenticated
    );
}

/// A policy change applies without restart; an invalid configuration is rejected and the old
/// policy stays in force.
#[tokio::test]
async fn policy_hot_reload_and_rejection_of_a_bad_config() {
    let s = server().await;
    let mut reports = client_as(&s.addr, Some("tok-reports")).await;
    denied(
        &reports.encrypt(enc("payments")).await.unwrap_err(),
        "reports",
        "payments",
        "encrypt",
    );
    let path = s.path("keybroker.toml");
    let original = std::fs::read_to_string(&path).unwrap();

    // Grant reports encrypt, via a direct reload (what SIGHUP triggers).
    let granted = original.replace(
        "callers = [\"reports\"]\noperations = [\"decrypt\"]",
        "callers = [\"reports\"]\noperations = [\"decrypt\", \"encrypt\"]",
    );
    assert_ne!(granted, original);
    std::fs::write(&path, &granted).unwrap();
    s.running.as_ref().unwrap().reloader.reload().await.unwrap();
    reports.encrypt(enc("payments")).await.unwrap();

    // An invalid file is refused; the last good policy still holds.
    std::fs::write(
        &path,
        granted.replace(
            "operations = [\"decrypt\", \"encrypt\"]",
            "operations = [\"decrypt\", \"encrypt\", \"destroy\"]",
        ),
    )
    .unwrap();
    let err = s
        .running
        .as_ref()
        .unwrap()
        .reloader
        .reload()
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("unknown operation \"destroy\""),
        "{err}"
    );
    reports.encrypt(enc("payments")).await.unwrap();

    // Revoke by editing the file, without calling reload: the file watcher applies it.
    std::fs::write(&path, &original).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match reports.encrypt(enc("payments")).await {
            Err(e) => {
                denied(&e, "reports", "payments", "encrypt");
                break;
            }
            Ok(_) => {
                assert!(Instant::now() < deadline, "the file change was not applied");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// SIGHUP makes the binary reload; a broken file is logged and the old config stays.
#[tokio::test]
async fn sighup_reloads_the_binary() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("kb.toml");
    let base = "[audit]\npath = \"audit.jsonl\"\n[identity]\nreload_interval = \"1h\"\n[keys.k]\nbackend = \"local\"\nkey_id = \"k\"\nkeyring = \"keyring\"\ncreate = true\n";
    std::fs::write(&file, base).unwrap();
    let serve = crate::support::ServeProcess::start(
        dir.path(),
        &[
            "--config",
            file.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ],
        &[],
    );
    let mut c = client_as(&serve.addr, None).await;
    denied(
        &c.encrypt(enc("k")).await.unwrap_err(),
        "anonymous",
        "k",
        "encrypt",
    );
    std::fs::write(
        &file,
        format!("{base}[[keys.k.policy]]\ncallers = [\"anonymous\"]\noperations = [\"encrypt\"]\n"),
    )
    .unwrap();
    serve.signal("HUP");
    let deadline = Instant::now() + Duration::from_secs(10);
    while let Err(e) = c.encrypt(enc("k")).await {
        assert!(Instant::now() < deadline, "SIGHUP did not reload: {e:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    std::fs::write(&file, "this is [not toml").unwrap();
    serve.signal("HUP");
    tokio::time::sleep(Duration::from_millis(300)).await;
    c.encrypt(enc("k"))
        .await
        .expect("the old configuration stays in force");
    serve.signal("TERM");
    let (status, stderr) = serve.wait(Duration::from_secs(10)).await;
    assert!(status.success());
    assert!(stderr.contains("configuration rejected"), "{stderr}");
}

/// Keys and grants for the re-encryption and key-enumeration tests: `mover` re-keys data out of
/// `payments` (re_encrypt only there); `reports` may decrypt `payments` and nothing else.
fn rekey_config(dir: &std::path::Path) -> String {
    for (name, token) in [
        ("billing", "tok-billing"),
        ("reports", "tok-reports"),
        ("mover", "tok-mover"),
    ] {
        std::fs::write(dir.join(format!("{name}.token")), format!("{token}\n")).unwrap();
    }
    let key = |name: &str, grants: &[(&str, &str)]| {
        let mut s = format!(
            "[keys.{name}]\nbackend = \"local\"\nkey_id = \"{name}\"\nkeyring = \"keyring\"\ncreate = true\n"
        );
        for (caller, ops) in grants {
            s.push_str(&format!(
                "[[keys.{name}.policy]]\ncallers = [\"{caller}\"]\noperations = [{ops}]\n"
            ));
        }
        s
    };
    let mut text = String::from(
        "[audit]\npath = \"audit.jsonl\"\n[identity]\n\
         [[identity.tokens]]\ncaller = \"billing\"\nfile = \"billing.token\"\n\
         [[identity.tokens]]\ncaller = \"reports\"\nfile = \"reports.token\"\n\
         [[identity.tokens]]\ncaller = \"mover\"\nfile = \"mover.token\"\n",
    );
    text += &key(
        "payments",
        &[
            ("billing", "\"encrypt\", \"decrypt\""),
            ("mover", "\"re_encrypt\""),
            ("reports", "\"decrypt\""),
        ],
    );
    // mover can read scratch and mirror: moving payments data there would be reading it.
    text += &key(
        "scratch",
        &[
            ("mover", "\"encrypt\", \"decrypt\""),
            ("billing", "\"encrypt\""),
        ],
    );
    text += &key("mirror", &[("mover", "\"re_encrypt\", \"decrypt\"")]);
    // archive: mover may only re-encrypt into it.
    text += &key("archive", &[("mover", "\"re_encrypt\"")]);
    text
}

fn reencrypt(ct: bytes::Bytes, to: &str) -> ReEncryptRequest {
    ReEncryptRequest {
        ciphertext: ct,
        source_context: BTreeMap::new(),
        destination_key: to.into(),
        destination_context: BTreeMap::new(),
    }
}

/// `re_encrypt` on a key is not a way to read it: a caller whose only grant on the source is
/// `re_encrypt` may move its data only to keys where it holds `re_encrypt` and cannot decrypt.
#[tokio::test]
async fn re_encrypt_on_the_source_is_never_a_read_grant() {
    let dir = tempfile::tempdir().unwrap();
    let text = rekey_config(dir.path());
    let s = TestServer::start_in(dir, &text).await;
    let mut billing = client_as(&s.addr, Some("tok-billing")).await;
    let mut mover = client_as(&s.addr, Some("tok-mover")).await;
    let ct = billing
        .encrypt(enc("payments"))
        .await
        .unwrap()
        .into_inner()
        .ciphertext;

    // Into a key mover can encrypt and decrypt (the read path the review found), or one where
    // it holds re_encrypt but can decrypt too: refused, before any backend work.
    for to in ["scratch", "mirror"] {
        let e = mover
            .re_encrypt(reencrypt(ct.clone(), to))
            .await
            .unwrap_err();
        denied(&e, "mover", to, "re_encrypt to");
        assert!(e.message().contains("decrypt"), "{}", e.message());
    }
    // Into archive (re_encrypt only): allowed, and mover still cannot read the result.
    let moved = mover
        .re_encrypt(reencrypt(ct.clone(), "archive"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(moved.key, "archive");
    denied(
        &mover
            .decrypt(DecryptRequest {
                ciphertext: moved.ciphertext.clone(),
                context: BTreeMap::new(),
            })
            .await
            .unwrap_err(),
        "mover",
        "archive",
        "decrypt",
    );
    // A caller that can decrypt the source keeps the old rule: encrypt on the destination.
    let into_scratch = billing
        .re_encrypt(reencrypt(ct.clone(), "scratch"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(into_scratch.key, "scratch");
}

/// A caller without any grant on a key cannot tell whether it exists: an unknown key and a key
/// it has no grant on get the same status, reason, message and metadata (but for the name).
/// The audit log keeps the operator's view (KEY_NOT_FOUND).
#[tokio::test]
async fn unknown_keys_and_keys_without_a_grant_answer_alike() {
    use tonic_types::StatusExt;
    let dir = tempfile::tempdir().unwrap();
    let text = rekey_config(dir.path());
    let s = TestServer::start_in(dir, &text).await;
    let mut billing = client_as(&s.addr, Some("tok-billing")).await;
    let mut reports = client_as(&s.addr, Some("tok-reports")).await;

    let shape = |e: &tonic::Status, name: &str| {
        let info = e.get_details_error_info().unwrap();
        let mut meta: Vec<(String, String)> = info.metadata.into_iter().collect();
        meta.sort();
        (
            e.code(),
            info.reason,
            e.message().replace(name, "NAME"),
            format!("{meta:?}").replace(name, "NAME"),
        )
    };
    // Encrypt: `archive` exists (reports has no grant), `nothere` does not.
    let existing = reports.encrypt(enc("archive")).await.unwrap_err();
    let unknown = reports.encrypt(enc("nothere")).await.unwrap_err();
    assert_eq!(shape(&existing, "archive"), shape(&unknown, "nothere"));
    denied(&unknown, "reports", "nothere", "encrypt");

    // Decrypt: ciphertexts whose header names a key without a grant / an unknown key (same
    // length, so the envelope still parses).
    let ct = billing
        .encrypt(enc("scratch"))
        .await
        .unwrap()
        .into_inner()
        .ciphertext
        .to_vec();
    let renamed = |name: &str| {
        let env = keybroker::envelope::parse(&ct).unwrap();
        let at = env.key_name.as_ptr() as usize - ct.as_ptr() as usize;
        let mut out = ct.clone();
        out[at..at + name.len()].copy_from_slice(name.as_bytes());
        bytes::Bytes::from(out)
    };
    let dec = |c: bytes::Bytes| DecryptRequest {
        ciphertext: c,
        context: BTreeMap::new(),
    };
    let existing = reports.decrypt(dec(renamed("archive"))).await.unwrap_err();
    let unknown = reports.decrypt(dec(renamed("nothere"))).await.unwrap_err();
    assert_eq!(shape(&existing, "archive"), shape(&unknown, "nothere"));

    // ReEncrypt into an unknown destination vs one without a grant.
    let pay = billing
        .encrypt(enc("payments"))
        .await
        .unwrap()
        .into_inner()
        .ciphertext;
    let existing = reports
        .re_encrypt(reencrypt(pay.clone(), "archive"))
        .await
        .unwrap_err();
    let unknown = reports
        .re_encrypt(reencrypt(pay.clone(), "nothere"))
        .await
        .unwrap_err();
    assert_eq!(shape(&existing, "archive"), shape(&unknown, "nothere"));

    // With a grant on the key, the denial is the plain one (the caller knows the key exists).
    let e = reports.encrypt(enc("payments")).await.unwrap_err();
    denied(&e, "reports", "payments", "encrypt");

    // The audit log says what really happened.
    let log = s.path("audit.jsonl");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let reasons: Vec<String> = text
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|r| r["caller"] == "reports")
            .map(|r| r["reason"].as_str().unwrap_or("").to_owned())
            .collect();
        if reasons.len() >= 7 {
            assert_eq!(
                reasons,
                [
                    "POLICY_DENIED",
                    "KEY_NOT_FOUND",
                    "POLICY_DENIED",
                    "KEY_NOT_FOUND",
                    "POLICY_DENIED",
                    "KEY_NOT_FOUND",
                    "POLICY_DENIED"
                ]
            );
            break;
        }
        assert!(Instant::now() < deadline, "audit records: {reasons:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

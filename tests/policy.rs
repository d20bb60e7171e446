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

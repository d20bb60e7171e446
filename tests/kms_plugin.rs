//! The Kubernetes KMS v2 plugin (issue 15) against the published contract (no kube-apiserver
//! binary can be installed here): a Rust client generated from proto/k8s/kms/v2/api.proto and
//! Python's grpcio (tests/clients/kms_v2_client.py, stubs generated from the same file) drive
//! Status → Encrypt → Decrypt on the local backend, AWS (moto), and the Cloud KMS and Key Vault
//! fakes; rotation, refusals, the decrypt-side cache's call count, and an AWS outage with moto
//! killed.
//!
//! Upstream field numbers (k8s.io/kms/apis/v2/api.proto, checked against the compiled
//! descriptor in `proto_matches_the_upstream_field_numbers`):
//!   StatusResponse  { version = 1; healthz = 2; key_id = 3; }
//!   DecryptRequest  { ciphertext = 1; uid = 2; key_id = 3; annotations = 4 (map<string, bytes>); }
//!   DecryptResponse { plaintext = 1; }
//!   EncryptRequest  { plaintext = 1; uid = 2; }
//!   EncryptResponse { ciphertext = 1; key_id = 2; annotations = 3 (map<string, bytes>); }
//!   service v2.KeyManagementService { Status; Decrypt; Encrypt; }

use std::path::Path;
use std::time::{Duration, Instant};

use keybroker::kms_plugin::{FORMAT_ANNOTATION, HEALTHY, MAX_CIPHERTEXT_LEN};
use keybroker::kms_proto::key_management_service_client::KeyManagementServiceClient;
use keybroker::kms_proto::{
    DecryptRequest, EncryptRequest, EncryptResponse, StatusRequest, StatusResponse,
};
use tonic::Code;
use tonic::transport::Channel;

use crate::support::azure_fake::KeyVaultFake;
use crate::support::gcp_fake::{self, GcpKmsFake};
use crate::support::moto::Moto;
use crate::support::{TestServer, reason};

type Client = KeyManagementServiceClient<Channel>;

/// `[kms_plugin]` on `{dir}/kms.sock` for key `etcd`, with a policy that lets only
/// kube-apiserver encrypt and decrypt with it.
fn plugin_section(extra: &str) -> String {
    format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\n\
         [kms_plugin]\nlisten = \"unix://{{dir}}/kms.sock\"\nkey = \"etcd\"\n{extra}\n\
         [[keys.etcd.policy]]\ncallers = [\"kube-apiserver\"]\noperations = [\"encrypt\", \"decrypt\"]\n"
    )
}

fn local_config(extra: &str) -> String {
    format!(
        "[keys.etcd]\nbackend = \"local\"\nkey_id = \"etcd\"\nkeyring = \"{{dir}}/keyring\"\ncreate = true\n\
         [local]\npoll_interval = \"100ms\"\n{}",
        plugin_section(extra)
    )
}

async fn client(server: &TestServer) -> Client {
    let sock = server.path("kms.sock");
    let channel = keybroker::client::connect(&format!("unix://{}", sock.display()))
        .await
        .unwrap();
    KeyManagementServiceClient::new(channel)
}

async fn status(c: &mut Client) -> StatusResponse {
    c.status(StatusRequest {}).await.unwrap().into_inner()
}

/// Polls Status (bounded) until `ok` holds; returns the answer that satisfied it.
async fn status_until(
    c: &mut Client,
    what: &str,
    ok: impl Fn(&StatusResponse) -> bool,
) -> StatusResponse {
    let mut last = None;
    for _ in 0..100 {
        let s = status(c).await;
        if ok(&s) {
            return s;
        }
        last = Some(s);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("Status never showed {what}: last {last:?}");
}

async fn encrypt(c: &mut Client, seed: &[u8]) -> EncryptResponse {
    c.encrypt(EncryptRequest {
        plaintext: seed.to_vec().into(),
        uid: "0f5bd6e0-5c2b-4b8e-9a51-000000000001".into(),
    })
    .await
    .unwrap_or_else(|s| panic!("encrypt: {s:?}"))
    .into_inner()
}

async fn decrypt(c: &mut Client, enc: &EncryptResponse) -> Result<Vec<u8>, tonic::Status> {
    c.decrypt(DecryptRequest {
        ciphertext: enc.ciphertext.clone(),
        uid: "0f5bd6e0-5c2b-4b8e-9a51-000000000002".into(),
        key_id: enc.key_id.clone(),
        annotations: enc.annotations.clone(),
    })
    .await
    .map(|r| r.into_inner().plaintext.to_vec())
}

fn seed(n: u8) -> Vec<u8> {
    (0..32).map(|i| i ^ n.wrapping_mul(37)).collect()
}

/// Status → Encrypt → Decrypt as the apiserver does it, with the answers' contract checked:
/// version "v2", healthz "ok", key_id the same in Status and Encrypt, within the size limits,
/// annotations named by FQDNs. Returns the Encrypt answer.
async fn round_trip(c: &mut Client, key_id_prefix: &str) -> EncryptResponse {
    let st = status_until(c, "ok with a key_id", |s| {
        s.healthz == HEALTHY && !s.key_id.is_empty()
    })
    .await;
    assert_eq!(st.version, "v2");
    assert!(st.key_id.starts_with(key_id_prefix), "{st:?}");
    assert!(st.key_id.len() <= 1024);
    let enc = encrypt(c, &seed(1)).await;
    assert_eq!(enc.key_id, st.key_id);
    assert!(
        enc.ciphertext.len() <= MAX_CIPHERTEXT_LEN,
        "{}",
        enc.ciphertext.len()
    );
    assert_eq!(
        enc.annotations.get(FORMAT_ANNOTATION).map(|v| v.as_ref()),
        Some(&b"2"[..])
    );
    assert_eq!(decrypt(c, &enc).await.unwrap(), seed(1));
    // For docs/kubernetes-kms.md (sizes per backend; `--nocapture` shows them).
    eprintln!(
        "KMS ciphertext {} bytes, key_id {} bytes ({})",
        enc.ciphertext.len(),
        enc.key_id.len(),
        enc.key_id.split(':').nth(1).unwrap_or("")
    );
    enc
}

#[tokio::test]
async fn local_round_trip_health_and_reflection_on_the_plugin_socket() {
    let server = TestServer::start(&local_config("")).await;
    let mut c = client(&server).await;
    let enc = round_trip(&mut c, "etcd:local:1").await;
    assert_eq!(enc.key_id, "etcd:local:1");

    // Health on the same socket knows the plugin's service.
    let sock = server.path("kms.sock");
    let channel = keybroker::client::connect(&format!("unix://{}", sock.display()))
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let h = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "v2.KeyManagementService".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(h.status, 1, "SERVING");
    // The keybroker.v1 API is not on this socket.
    let mut kb = keybroker::client::client(channel, 1 << 20);
    let err = kb
        .list_keys(keybroker::proto::ListKeysRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented);

    // Reflection on the plugin socket, as grpcurl (a client we did not write) sees it.
    let sock = sock.to_str().unwrap();
    let listed = grpcurl(&[sock, "list"]).await;
    for service in ["v2.KeyManagementService", "grpc.health.v1.Health"] {
        assert!(listed.lines().any(|l| l == service), "{listed}");
    }
    assert!(!listed.contains("keybroker.v1"), "{listed}");
    let described = grpcurl(&[sock, "describe", "v2.StatusResponse"]).await;
    assert!(described.contains("string key_id = 3;"), "{described}");
    let answered = grpcurl(&[sock, "v2.KeyManagementService/Status"]).await;
    assert!(answered.contains("\"healthz\": \"ok\""), "{answered}");
    assert!(
        answered.contains("\"keyId\": \"etcd:local:1\""),
        "{answered}"
    );
    server.stop().await;
}

/// grpcurl over a Unix socket (async: the server runs on this test's runtime).
async fn grpcurl(args: &[&str]) -> String {
    let out = tokio::process::Command::new(crate::support::venv_bin("grpcurl"))
        .args(["-plaintext", "-unix"])
        .args(args)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "grpcurl {args:?}: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[tokio::test]
async fn policy_audit_and_metrics_apply_to_the_apiserver() {
    // kube-apiserver may only decrypt: Encrypt is refused, and Status says so.
    let text = local_config("").replace(
        "operations = [\"encrypt\", \"decrypt\"]",
        "operations = [\"decrypt\"]",
    );
    let server = TestServer::start(&text).await;
    let mut c = client(&server).await;
    let e = c
        .encrypt(EncryptRequest {
            plaintext: seed(1).into(),
            uid: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let st = status(&mut c).await;
    assert_ne!(st.healthz, HEALTHY);
    assert!(st.healthz.contains("POLICY_DENIED"), "{st:?}");
    let admin = server
        .running
        .as_ref()
        .unwrap()
        .admin_addr
        .unwrap()
        .to_string();
    let (code, metrics) = crate::support::http_get(&admin, "/metrics").await;
    assert_eq!(code, 200);
    assert!(
        metrics
            .lines()
            .any(|l| l.contains("caller=\"kube-apiserver\"") && l.contains("PERMISSION_DENIED")),
        "no refused kube-apiserver request in the metrics:\n{metrics}"
    );
    server.stop().await;
}

#[tokio::test]
async fn rotation_changes_key_id_and_old_ciphertexts_still_decrypt() {
    let server = TestServer::start(&local_config("")).await;
    let mut c = client(&server).await;
    let old = round_trip(&mut c, "etcd:local:").await;
    keybroker::keyring::edit(&server.path("keyring"), false, |r| r.rotate_key("etcd")).unwrap();
    // The local backend reports the rotation for free: Status probes once and shows it.
    let st = status_until(&mut c, "the new key_id", |s| s.key_id != old.key_id).await;
    assert_eq!(st.key_id, "etcd:local:2");
    assert_eq!(st.healthz, HEALTHY);
    let new = encrypt(&mut c, &seed(2)).await;
    assert_eq!(new.key_id, "etcd:local:2");
    assert_eq!(decrypt(&mut c, &old).await.unwrap(), seed(1));
    assert_eq!(decrypt(&mut c, &new).await.unwrap(), seed(2));
    server.stop().await;
}

#[tokio::test]
async fn tampered_ciphertexts_foreign_key_ids_and_bad_input_are_refused() {
    let server = TestServer::start(&local_config("")).await;
    let mut c = client(&server).await;
    let enc = round_trip(&mut c, "etcd:local:1").await;
    let plugin = c.clone();
    let refuse = |mut bad: EncryptResponse| {
        let mut c = plugin.clone();
        async move {
            if bad.key_id.is_empty() {
                bad.key_id = "etcd:local:1".into();
            }
            decrypt(&mut c, &bad).await.unwrap_err()
        }
    };
    // Every single-byte flip of the ciphertext is refused, never answered with a seed.
    for i in (0..enc.ciphertext.len()).step_by(7) {
        let mut bad = enc.clone();
        let mut bytes = bad.ciphertext.to_vec();
        bytes[i] ^= 0x01;
        bad.ciphertext = bytes.into();
        let e = refuse(bad).await;
        assert!(
            matches!(e.code(), Code::InvalidArgument | Code::FailedPrecondition),
            "flip at {i}: {e:?}"
        );
    }
    // A key_id of another key, or of another version of this key.
    for foreign in ["other:local:1", "etcd:local:2", "etcd:aws:1", ""] {
        let mut bad = enc.clone();
        bad.key_id = foreign.into();
        let e = c
            .decrypt(DecryptRequest {
                ciphertext: bad.ciphertext.clone(),
                uid: String::new(),
                key_id: bad.key_id.clone(),
                annotations: bad.annotations.clone(),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition, "{foreign}: {e:?}");
        assert_eq!(reason(&e), "KMS_KEY_ID_MISMATCH", "{foreign}");
        assert!(!e.message().contains(foreign) || foreign.is_empty());
    }
    // An annotation in a format this build does not read.
    let mut bad = enc.clone();
    bad.annotations
        .insert(FORMAT_ANNOTATION.into(), bytes::Bytes::from_static(b"99"));
    assert_eq!(refuse(bad).await.code(), Code::InvalidArgument);
    // Over the apiserver's ciphertext limit.
    let mut bad = enc.clone();
    bad.ciphertext = vec![0u8; 4096].into();
    assert_eq!(refuse(bad).await.code(), Code::ResourceExhausted);
    // Seeds: empty and oversize.
    for len in [0usize, 65] {
        let e = c
            .encrypt(EncryptRequest {
                plaintext: vec![7u8; len].into(),
                uid: String::new(),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{len}: {e:?}");
    }
    // The real one still works, and nothing above turned health off.
    assert_eq!(decrypt(&mut c, &enc).await.unwrap(), seed(1));
    assert_eq!(status(&mut c).await.healthz, HEALTHY);
    server.stop().await;
}

#[tokio::test]
async fn decrypt_of_1000_ciphertexts_of_10_seeds_makes_at_most_10_backend_calls() {
    let (server, layer) = TestServer::counted(&local_config("")).await;
    let mut c = client(&server).await;
    status_until(&mut c, "ok", |s| s.healthz == HEALTHY).await;
    let mut encs = Vec::new();
    for n in 0..10u8 {
        encs.push(encrypt(&mut c, &seed(n)).await);
    }
    let counters = layer.key("etcd");
    let before = counters.unwrap();
    for i in 0..1000usize {
        let n = i % 10;
        assert_eq!(decrypt(&mut c, &encs[n]).await.unwrap(), seed(n as u8));
    }
    let calls = counters.unwrap() - before;
    assert!((1..=10).contains(&calls), "{calls} backend unwraps");
    server.stop().await;
}

/// Status is free: with a long probe interval, polls make no backend call after the startup
/// probe; health follows the real Encrypt outcomes (down at once, up again on the next success).
#[tokio::test]
async fn status_polls_cost_nothing_and_follow_real_outcomes() {
    let (server, layer) = TestServer::counted(&local_config("probe_interval = \"1h\"")).await;
    let mut c = client(&server).await;
    status_until(&mut c, "ok", |s| s.healthz == HEALTHY).await;
    let counters = layer.key("etcd");
    let after_startup = counters.total();
    assert_eq!(after_startup, 1, "one startup probe");
    for _ in 0..50 {
        assert_eq!(status(&mut c).await.healthz, HEALTHY);
    }
    assert_eq!(
        counters.total(),
        after_startup,
        "Status polls made backend calls"
    );
    let enc = encrypt(&mut c, &seed(1)).await;
    assert_eq!(counters.wrap(), 2);
    // Encrypt does not fill the decrypt cache; the first Decrypt does (one unwrap).
    assert_eq!(decrypt(&mut c, &enc).await.unwrap(), seed(1));
    assert_eq!(counters.unwrap(), 1);

    counters.set_fail(true);
    let e = c
        .encrypt(EncryptRequest {
            plaintext: seed(2).into(),
            uid: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    let down = status(&mut c).await;
    assert!(down.healthz.contains("BACKEND_UNAVAILABLE"), "{down:?}");
    assert_eq!(down.key_id, enc.key_id, "the last key_id stays");
    // A cached Decrypt is no news about the backend: still down, and still no probe.
    assert_eq!(decrypt(&mut c, &enc).await.unwrap(), seed(1));
    assert_eq!(counters.unwrap(), 1);
    assert_ne!(status(&mut c).await.healthz, HEALTHY);
    counters.set_fail(false);
    encrypt(&mut c, &seed(3)).await;
    assert_eq!(status(&mut c).await.healthz, HEALTHY);
    server.stop().await;
}

/// A backend that hangs holds no Status: each answers within the status timeout.
#[tokio::test]
async fn status_answers_fast_while_the_backend_hangs() {
    let (server, layer) = TestServer::counted(&local_config("probe_interval = \"1s\"")).await;
    let mut c = client(&server).await;
    status_until(&mut c, "ok", |s| s.healthz == HEALTHY).await;
    let counters = layer.key("etcd");
    counters.set_delay(Duration::from_secs(4));
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let probes_before = counters.wrap();
    for _ in 0..6 {
        let t = Instant::now();
        let s = status(&mut c).await;
        assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
        assert_eq!(s.version, "v2");
    }
    // One probe in flight at a time, however often Status is asked.
    assert!(counters.wrap() <= probes_before + 1, "{}", counters.wrap());
    counters.set_delay(Duration::ZERO);
    server.stop().await;
}

#[test]
fn kms_plugin_configuration_is_checked() {
    let parse = |text: &str| keybroker::config::Config::parse(text, "t.toml", Path::new("/tmp"));
    let base = "[keys.etcd]\nbackend = \"local\"\nkey_id = \"etcd\"\n";
    let c = parse(&format!("{base}[kms_plugin]\nkey = \"etcd\"\n")).unwrap();
    let k = c.kms_plugin.unwrap();
    assert_eq!(k.socket, Path::new("/var/run/kmsplugin/kms.sock"));
    assert_eq!(k.caller, "kube-apiserver");
    assert!(k.probe_interval >= Duration::from_secs(300));
    for (bad, at) in [
        ("[kms_plugin]\nkey = \"nope\"\n", "kms_plugin.key"),
        ("[kms_plugin]\n", "kms_plugin.key"),
        (
            "[kms_plugin]\nkey = \"etcd\"\nlisten = \"127.0.0.1:9\"\n",
            "kms_plugin.listen",
        ),
        (
            "[kms_plugin]\nkey = \"etcd\"\nstatus_timeout = \"5s\"\n",
            "kms_plugin.status_timeout",
        ),
        (
            "[kms_plugin]\nkey = \"etcd\"\nprobe = \"1s\"\n",
            "kms_plugin.probe",
        ),
    ] {
        let e = parse(&format!("{base}{bad}")).unwrap_err();
        assert!(e.problems.iter().any(|p| p.at == at), "{bad}: {e}");
    }
}

/// The .proto in the repo carries upstream's package, service, methods and field numbers.
#[test]
fn proto_matches_the_upstream_field_numbers() {
    use prost::Message;
    let set =
        prost_types::FileDescriptorSet::decode(keybroker::kms_proto::FILE_DESCRIPTOR_SET).unwrap();
    let file = set
        .file
        .iter()
        .find(|f| f.package() == "v2")
        .expect("package v2");
    let service = &file.service[0];
    assert_eq!(service.name(), "KeyManagementService");
    let methods: Vec<(&str, &str, &str)> = service
        .method
        .iter()
        .map(|m| (m.name(), m.input_type(), m.output_type()))
        .collect();
    assert_eq!(
        methods,
        [
            ("Status", ".v2.StatusRequest", ".v2.StatusResponse"),
            ("Decrypt", ".v2.DecryptRequest", ".v2.DecryptResponse"),
            ("Encrypt", ".v2.EncryptRequest", ".v2.EncryptResponse"),
        ]
    );
    let fields = |name: &str| -> Vec<(String, i32)> {
        let m = file.message_type.iter().find(|m| m.name() == name).unwrap();
        m.field
            .iter()
            .map(|f| (f.name().to_owned(), f.number()))
            .collect()
    };
    let want = |v: &[(&str, i32)]| -> Vec<(String, i32)> {
        v.iter().map(|(n, i)| (n.to_string(), *i)).collect()
    };
    assert!(fields("StatusRequest").is_empty());
    assert_eq!(
        fields("StatusResponse"),
        want(&[("version", 1), ("healthz", 2), ("key_id", 3)])
    );
    assert_eq!(
        fields("DecryptRequest"),
        want(&[
            ("ciphertext", 1),
            ("uid", 2),
            ("key_id", 3),
            ("annotations", 4)
        ])
    );
    assert_eq!(fields("DecryptResponse"), want(&[("plaintext", 1)]));
    assert_eq!(
        fields("EncryptRequest"),
        want(&[("plaintext", 1), ("uid", 2)])
    );
    assert_eq!(
        fields("EncryptResponse"),
        want(&[("ciphertext", 1), ("key_id", 2), ("annotations", 3)])
    );
    // The two annotation maps are map<string, bytes>.
    for (msg, entry) in [
        ("DecryptRequest", "AnnotationsEntry"),
        ("EncryptResponse", "AnnotationsEntry"),
    ] {
        let m = file.message_type.iter().find(|m| m.name() == msg).unwrap();
        let e = m.nested_type.iter().find(|n| n.name() == entry).unwrap();
        let types: Vec<i32> = e
            .field
            .iter()
            .map(|f| f.r#type())
            .map(|t| t as i32)
            .collect();
        assert_eq!(
            types,
            [
                prost_types::field_descriptor_proto::Type::String as i32,
                prost_types::field_descriptor_proto::Type::Bytes as i32
            ]
        );
    }
}

// ---- AWS KMS (moto) ----

fn aws_config(moto: &Moto, extra: &str) -> String {
    format!(
        "{}max_attempts = 1\nattempt_timeout = \"1s\"\n[keys.etcd]\nbackend = \"aws\"\nkey_id = \"alias/etcd\"\n{}",
        moto.aws_section(),
        plugin_section(extra)
    )
}

#[tokio::test]
async fn aws_round_trip_and_alias_rotation() {
    let moto = Moto::start().await;
    let first = moto.create_key("etcd 1").await;
    moto.create_alias("alias/etcd", &first).await;
    let server = TestServer::start(&aws_config(&moto, "probe_interval = \"1s\"")).await;
    let mut c = client(&server).await;
    let old = round_trip(&mut c, &format!("etcd:aws:{first}")).await;
    assert_eq!(old.key_id, format!("etcd:aws:{first}"));
    // Rotation the AWS way: the alias moves to a new key; the next probe sees it.
    let second = moto.create_key("etcd 2").await;
    moto.client()
        .update_alias()
        .alias_name("alias/etcd")
        .target_key_id(&second)
        .send()
        .await
        .unwrap();
    let st = status_until(&mut c, "the new key", |s| s.key_id != old.key_id).await;
    assert_eq!(st.key_id, format!("etcd:aws:{second}"));
    let new = encrypt(&mut c, &seed(2)).await;
    assert_eq!(new.key_id, st.key_id);
    assert_eq!(decrypt(&mut c, &old).await.unwrap(), seed(1));
    assert_eq!(decrypt(&mut c, &new).await.unwrap(), seed(2));
    grpcio_round_trip(&server, &st.key_id).await;
    server.stop().await;
}

#[tokio::test]
async fn aws_outage_turns_status_non_ok_fast_and_back_to_ok() {
    let mut moto = Moto::start().await;
    let key = moto.create_key("etcd").await;
    moto.create_alias("alias/etcd", &key).await;
    let server = TestServer::start(&aws_config(&moto, "probe_interval = \"1s\"")).await;
    let mut c = client(&server).await;
    round_trip(&mut c, "etcd:aws:").await;

    moto.kill();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    // Each poll answers well inside the apiserver's 3 s, and the first one after the probe
    // interval (or the one after it, if the probe outlives the status wait) is non-ok.
    let mut polls = 0;
    let down = loop {
        polls += 1;
        let t = Instant::now();
        let s = status(&mut c).await;
        assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
        if s.healthz != HEALTHY {
            break s;
        }
        assert!(polls < 3, "still ok after {polls} polls");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(down.healthz.contains("BACKEND_UNAVAILABLE"), "{down:?}");
    assert!(!down.key_id.is_empty(), "the last key_id stays known");
    let t = Instant::now();
    let e = c
        .encrypt(tonic::Request::new(EncryptRequest {
            plaintext: seed(3).into(),
            uid: String::new(),
        }))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());

    // Recovery: moto back (empty, so the key is made again under the same alias).
    moto.restart().await;
    let key2 = moto.create_key("etcd again").await;
    moto.create_alias("alias/etcd", &key2).await;
    let up = status_until(&mut c, "ok again", |s| s.healthz == HEALTHY).await;
    assert_eq!(up.key_id, format!("etcd:aws:{key2}"));
    server.stop().await;
}

// ---- GCP Cloud KMS fake ----

#[tokio::test]
async fn gcp_round_trip_and_rotation() {
    let fake = GcpKmsFake::start().await;
    let key = fake.create_test_key("etcd");
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "[gcp]\nendpoint = \"{}\"\n[keys.etcd]\nbackend = \"gcp\"\nkey_id = \"{key}\"\n{}",
        fake.endpoint(),
        plugin_section("probe_interval = \"1s\"")
    )
    .replace("{dir}", &dir.path().display().to_string());
    let mut config = keybroker::config::Config::parse(&text, "gcp.toml", dir.path()).unwrap();
    config.server.listen = vec![keybroker::config::ListenAddr::parse("127.0.0.1:0").unwrap()];
    config.gcp.credentials =
        keybroker::backend::gcp::GcpCredentials::Custom(gcp_fake::credentials());
    config.admin_listen = None;
    let server = TestServer::start_config(dir, config, Default::default()).await;
    let mut c = client(&server).await;
    let old = round_trip(&mut c, &format!("etcd:gcp:{key}/cryptoKeyVersions/1")).await;
    let v2 = fake.rotate(&key);
    let st = status_until(&mut c, "the new version", |s| s.key_id != old.key_id).await;
    assert_eq!(st.key_id, format!("etcd:gcp:{v2}"));
    let new = encrypt(&mut c, &seed(2)).await;
    assert_eq!(new.key_id, st.key_id);
    assert_eq!(decrypt(&mut c, &old).await.unwrap(), seed(1));
    assert_eq!(decrypt(&mut c, &new).await.unwrap(), seed(2));
    grpcio_round_trip(&server, &st.key_id).await;
    server.stop().await;
}

// ---- Azure Key Vault fake ----

#[tokio::test]
async fn azure_round_trip_and_rotation() {
    let fake = KeyVaultFake::start().await;
    let v1 = fake.create_rsa_key("etcd");
    fake.install_hooks();
    let text = format!(
        "[azure]\nrefresh_interval = \"100ms\"\n[keys.etcd]\nbackend = \"azure\"\nkey_id = \"{}\"\n{}",
        fake.key_url("etcd"),
        plugin_section("probe_interval = \"1s\"")
    );
    let server = TestServer::start(&text).await;
    let mut c = client(&server).await;
    let old = round_trip(&mut c, &format!("etcd:azure:{}/{v1}", fake.key_url("etcd"))).await;
    let v2 = fake.rotate("etcd");
    let st = status_until(&mut c, "the new version", |s| s.key_id != old.key_id).await;
    assert_eq!(
        st.key_id,
        format!("etcd:azure:{}/{v2}", fake.key_url("etcd"))
    );
    let new = encrypt(&mut c, &seed(2)).await;
    assert_eq!(decrypt(&mut c, &old).await.unwrap(), seed(1));
    assert_eq!(decrypt(&mut c, &new).await.unwrap(), seed(2));
    grpcio_round_trip(&server, &st.key_id).await;
    server.stop().await;
}

// ---- Python grpcio, stubs generated from the repo's .proto ----

/// Runs tests/clients/kms_v2_client.py (grpcio, stubs generated from the repo's .proto by
/// grpcio-tools) against the server's plugin socket; it must see `key_id`.
async fn grpcio_round_trip(server: &TestServer, key_id: &str) {
    let venv = crate::support::venv();
    let script = repo("tests/clients/kms_v2_client.py");
    let out_dir = tempfile::tempdir().unwrap();
    let sock = server.path("kms.sock");
    let out = tokio::process::Command::new(venv.join("bin/python"))
        .arg(&script)
        .arg(repo("proto"))
        .arg(out_dir.path())
        .arg(format!("unix://{}", sock.display()))
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    for line in [
        format!("status v2 ok {key_id}"),
        format!("encrypt {key_id}"),
        "decrypt ok".to_owned(),
        "tampered INVALID_ARGUMENT".to_owned(),
        "foreign FAILED_PRECONDITION KMS_KEY_ID_MISMATCH".to_owned(),
    ] {
        assert!(
            stdout.lines().any(|l| l == line),
            "no {line:?} in:\n{stdout}"
        );
    }
}

#[tokio::test]
async fn grpcio_client_generated_from_the_repo_proto() {
    let server = TestServer::start(&local_config("")).await;
    let mut c = client(&server).await;
    status_until(&mut c, "ok", |s| s.healthz == HEALTHY).await;
    grpcio_round_trip(&server, "etcd:local:1").await;
    server.stop().await;
}

// ---- deploy/kubernetes/kms-plugin ----

/// kube-apiserver's `apiserver.config.k8s.io/v1` EncryptionConfiguration (not in k8s-openapi):
/// the fields the manifests use, strictly (k8s.io/apiserver/pkg/apis/apiserver/v1 types.go).
pub mod encryption_config {
    use serde::{Deserialize, Serialize};

    #[derive(Serialize, Deserialize)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    pub struct EncryptionConfiguration {
        pub api_version: String,
        pub kind: String,
        pub resources: Vec<ResourceConfiguration>,
    }

    #[derive(Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct ResourceConfiguration {
        pub resources: Vec<String>,
        pub providers: Vec<ProviderConfiguration>,
    }

    #[derive(Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct ProviderConfiguration {
        #[serde(skip_serializing_if = "Option::is_none")]
        pub kms: Option<KmsConfiguration>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub identity: Option<Empty>,
    }

    #[derive(Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Empty {}

    #[derive(Serialize, Deserialize)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    pub struct KmsConfiguration {
        pub api_version: String,
        pub name: String,
        pub endpoint: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub timeout: Option<String>,
    }
}

fn repo(rel: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn yaml_doc(rel: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(repo(rel)).unwrap();
    let mut docs = keybroker::inject::file::parse_documents(&text).unwrap();
    assert_eq!(docs.len(), 1, "{rel}");
    docs.remove(0)
}

/// The EncryptionConfiguration, each cloud's static pod and each cloud's keybroker
/// configuration agree: KMS v2, the plugin socket the configuration listens on, mounted from
/// the host directory kube-apiserver also mounts, the config file the pod names, a backend of
/// the right kind, and the apiserver's timeout above the backend's call deadline.
#[test]
fn kms_plugin_manifests_and_configurations_agree() {
    use k8s_openapi::api::core::v1::Pod;
    let enc: encryption_config::EncryptionConfiguration = serde_json::from_value(yaml_doc(
        "deploy/kubernetes/kms-plugin/encryption-configuration.yaml",
    ))
    .unwrap();
    assert_eq!(enc.kind, "EncryptionConfiguration");
    let providers = &enc.resources[0].providers;
    let kms = providers[0].kms.as_ref().expect("kms first");
    assert_eq!(kms.api_version, "v2");
    assert!(
        providers.last().unwrap().identity.is_some(),
        "identity last, for data written before encryption"
    );
    let socket = kms.endpoint.strip_prefix("unix://").unwrap();
    for (cloud, backend) in [
        ("local", "local"),
        ("aws", "aws"),
        ("gcp", "gcp"),
        ("azure", "azure"),
    ] {
        let dir = format!("deploy/kubernetes/kms-plugin/{cloud}");
        let pod: Pod =
            serde_json::from_value(yaml_doc(&format!("{dir}/keybroker-kms.yaml"))).unwrap();
        let spec = pod.spec.unwrap();
        assert_eq!(spec.host_network, Some(true), "{cloud}");
        let c = &spec.containers[0];
        assert_eq!(
            c.args.as_deref(),
            Some(&["serve".to_owned()][..]),
            "{cloud}"
        );
        let env = c.env.as_ref().unwrap();
        let config_path = env
            .iter()
            .find(|e| e.name == "KEYBROKER_CONFIG")
            .and_then(|e| e.value.clone())
            .unwrap();
        // Every mount is a hostPath volume; the socket's and the config's directories are.
        let host_dir_of = |container_path: &Path| -> String {
            let m = c
                .volume_mounts
                .as_ref()
                .unwrap()
                .iter()
                .filter(|m| container_path.starts_with(&m.mount_path))
                .max_by_key(|m| m.mount_path.len())
                .unwrap_or_else(|| panic!("{cloud}: nothing mounts {container_path:?}"));
            let v = spec
                .volumes
                .as_ref()
                .unwrap()
                .iter()
                .find(|v| v.name == m.name)
                .unwrap();
            let host = v.host_path.as_ref().unwrap().path.clone();
            assert_eq!(
                host, m.mount_path,
                "{cloud}: same path inside and on the host"
            );
            host
        };
        host_dir_of(Path::new(socket));
        host_dir_of(Path::new(&config_path));
        assert_eq!(
            Path::new(&config_path).file_name().unwrap(),
            "keybroker-kms.toml"
        );
        let toml_rel = format!("{dir}/keybroker-kms.toml");
        let config =
            keybroker::config::Config::load(&repo(&toml_rel)).unwrap_or_else(|e| panic!("{e}"));
        assert!(
            config.warnings().is_empty(),
            "{cloud}: {:?}",
            config.warnings()
        );
        let plugin = config.kms_plugin.as_ref().expect("[kms_plugin]");
        assert_eq!(plugin.socket, Path::new(socket), "{cloud}");
        assert_eq!(plugin.caller, "kube-apiserver");
        let key = &config.keys[&plugin.key];
        assert_eq!(key.backend.kind().as_str(), backend, "{cloud}");
        for l in &config.server.listen {
            // Nothing else listens beyond the node's own sockets.
            assert!(l.to_string().starts_with("unix://"), "{cloud}: {l}");
        }
        if cloud == "local" {
            let keyring = match &key.backend {
                keybroker::config::BackendConfig::Local { keyring, .. } => keyring.clone(),
                _ => unreachable!(),
            };
            host_dir_of(&keyring);
        }
    }
}

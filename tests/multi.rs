//! Keys wrapped by several backends (docs/multi-backend.md): every copy in the envelope, decrypt
//! failing over between copies in order of backend health, `require = "all"` and `"first"`,
//! one call per backend per data key, ReEncrypt adding and dropping copies, and recovery from
//! any single copy. Two local keyrings need no cloud; the cloud mix runs moto, the GCP fake and
//! the Azure fake in one key; a hung backend is a loopback listener that never answers.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use keybroker::backend::BackendKind;
use keybroker::backend::gcp::GcpCredentials;
use keybroker::client::KeyBrokerClient;
use keybroker::config::{Config, ListenAddr};
use keybroker::proto::{DecryptRequest, EncryptRequest, ListKeysRequest, ReEncryptRequest};
use keybroker::server::StartOptions;
use tonic::Code;
use tonic::transport::Channel;

use crate::support::azure_fake::KeyVaultFake;
use crate::support::counting::CountingLayer;
use crate::support::gcp_fake::{self, GcpKmsFake};
use crate::support::hung::Hung;
use crate::support::moto::Moto;
use crate::support::{TestServer, http_get};

type Client = KeyBrokerClient<Channel>;

async fn encrypt(c: &mut Client, key: &str, plaintext: &[u8]) -> Result<Vec<u8>, tonic::Status> {
    c.encrypt(EncryptRequest {
        key: key.into(),
        plaintext: plaintext.to_vec().into(),
        context: BTreeMap::new(),
    })
    .await
    .map(|r| r.into_inner().ciphertext.to_vec())
}

async fn decrypt(c: &mut Client, ciphertext: &[u8]) -> Result<Vec<u8>, tonic::Status> {
    c.decrypt(DecryptRequest {
        ciphertext: ciphertext.to_vec().into(),
        context: BTreeMap::new(),
    })
    .await
    .map(|r| r.into_inner().plaintext.to_vec())
}

async fn re_encrypt(c: &mut Client, ciphertext: &[u8]) -> Vec<u8> {
    c.re_encrypt(ReEncryptRequest {
        ciphertext: ciphertext.to_vec().into(),
        source_context: BTreeMap::new(),
        destination_key: String::new(),
        destination_context: BTreeMap::new(),
    })
    .await
    .unwrap()
    .into_inner()
    .ciphertext
    .to_vec()
}

/// (backend, key id) of every copy in a ciphertext.
fn copies(ciphertext: &[u8]) -> Vec<(BackendKind, String)> {
    keybroker::envelope::parse(ciphertext)
        .unwrap()
        .copies
        .iter()
        .map(|c| (c.backend, c.key_id.to_owned()))
        .collect()
}

/// The value of one sample in a Prometheus text body (0 when absent).
fn metric(body: &str, sample: &str) -> f64 {
    body.lines()
        .find_map(|l| l.strip_prefix(sample)?.trim().parse().ok())
        .unwrap_or(0.0)
}

async fn scrape(server: &TestServer) -> String {
    let admin = server
        .running
        .as_ref()
        .unwrap()
        .admin_addr
        .unwrap()
        .to_string();
    http_get(&admin, "/metrics").await.1
}

/// `[keys.orders]` over local keyrings at these paths, in this order.
fn local_key(rings: &[&Path], extra: &str) -> String {
    let wraps: Vec<String> = rings
        .iter()
        .map(|r| {
            format!(
                "  {{ backend = \"local\", keyring = \"{}\", key_id = \"orders\", create = true }},",
                r.display()
            )
        })
        .collect();
    format!(
        "[keys.orders]\nwrap = [\n{}\n]\n{extra}\n",
        wraps.join("\n")
    )
}

/// A single-backend `orders` key on one keyring (how a sidecar that only has that copy sees it).
fn single_key(ring: &Path) -> String {
    format!(
        "[keys.orders]\nbackend = \"local\"\nkeyring = \"{}\"\nkey_id = \"orders\"\n",
        ring.display()
    )
}

/// Two local keyrings: both copies in the envelope; the first keyring loses the key and
/// decrypt succeeds through the second copy; restored, each copy alone still opens the data.
#[tokio::test]
async fn two_keyrings_fail_over_and_each_copy_alone_recovers() {
    let shared = tempfile::tempdir().unwrap();
    let a = shared.path().join("a.keyring");
    let b = shared.path().join("b.keyring");
    let both = local_key(&[&a, &b], "");

    let server = TestServer::start(&both).await;
    let mut c = server.client().await;
    let ct = encrypt(&mut c, "orders", b"order 1").await.unwrap();
    assert_eq!(
        copies(&ct),
        [
            (BackendKind::Local, "orders".to_owned()),
            (BackendKind::Local, "orders".to_owned())
        ]
    );
    let env = keybroker::envelope::parse(&ct).unwrap();
    assert_ne!(env.copies[0].wrapped, env.copies[1].wrapped);
    assert_eq!(decrypt(&mut c, &ct).await.unwrap(), b"order 1");
    let listing = c.list_keys(ListKeysRequest {}).await.unwrap().into_inner();
    let orders = listing.keys.iter().find(|k| k.name == "orders").unwrap();
    assert_eq!(orders.wraps.len(), 2);
    assert_eq!(orders.require, "all");
    assert!(orders.wraps.iter().all(|w| w.backend == "local"));
    assert!(server.stop().await);

    // The first keyring loses the key: a fresh `orders` key takes its place (another secret).
    let saved = shared.path().join("a.saved");
    std::fs::rename(&a, &saved).unwrap();
    // (The server's own directory goes with it: the log is kept beside the keyrings.)
    let audit_log = shared.path().join("audit.jsonl");
    let server = TestServer::start(&format!(
        "{both}[audit]\npath = \"{}\"\n",
        audit_log.display()
    ))
    .await;
    let mut c = server.client().await;
    assert_eq!(decrypt(&mut c, &ct).await.unwrap(), b"order 1");
    // Again: the data key cached through copy 1 serves it, although the first keyring (still
    // first in health order: a copy that does not authenticate is no outage) would try copy 0.
    assert_eq!(decrypt(&mut c, &ct).await.unwrap(), b"order 1");
    let m = scrape(&server).await;
    assert_eq!(
        metric(
            &m,
            "keybroker_copy_served_total{key=\"orders\",backend=\"local\",copy=\"1\"}"
        ),
        2.0,
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            "keybroker_cache_lookups_total{cache=\"decrypt\",caller=\"anonymous\",key=\"orders\",result=\"hit\"}"
        ),
        1.0,
        "{m}"
    );
    let unwraps = |outcome: &str| {
        metric(
            &m,
            &format!(
                "keybroker_backend_calls_total{{backend=\"local\",key=\"orders\",operation=\"unwrap\",outcome=\"{outcome}\"}}"
            ),
        )
    };
    // First request only: copy 0 and copy 1 on the first keyring, copy 0 on the second fail,
    // copy 1 on the second opens (a backend tries the copies naming its key, here both).
    assert_eq!(
        (unwraps("invalid_ciphertext"), unwraps("ok")),
        (3.0, 1.0),
        "{m}"
    );
    assert!(server.stop().await);
    // The audit record names the copy that served and every backend the request called.
    let text = std::fs::read_to_string(&audit_log).unwrap();
    let record: serde_json::Value = text
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|r| r["operation"] == "decrypt")
        .unwrap();
    assert_eq!(record["result"], "OK", "{record}");
    assert_eq!(record["copy_served"]["copy"], 1, "{record}");
    assert_eq!(record["copy_served"]["backend"], "local", "{record}");
    let backends = record["backends"].as_array().unwrap();
    assert!(backends.iter().any(|b| b == "local#0"), "{record}");
    assert!(backends.iter().any(|b| b == "local#1"), "{record}");

    // Restored: each keyring alone (a sidecar with only that copy) opens it, and both together.
    std::fs::rename(&saved, &a).unwrap();
    for config in [single_key(&a), single_key(&b), both.clone()] {
        let server = TestServer::start(&config).await;
        let mut c = server.client().await;
        assert_eq!(decrypt(&mut c, &ct).await.unwrap(), b"order 1", "{config}");
        assert!(server.stop().await);
    }
}

/// ReEncrypt after a backend was added to the key gives old data the new copy; after one was
/// removed, drops its copy. The payload never leaves the sidecar.
#[tokio::test]
async fn re_encrypt_adds_and_drops_copies() {
    let shared = tempfile::tempdir().unwrap();
    let a = shared.path().join("a.keyring");
    let b = shared.path().join("b.keyring");
    // B exists (with its key) before the key is configured to use it.
    let server = TestServer::start(&local_key(&[&b], "")).await;
    assert!(server.stop().await);

    let server = TestServer::start(&local_key(&[&a], "")).await;
    let mut c = server.client().await;
    let old = encrypt(&mut c, "orders", b"old data").await.unwrap();
    assert_eq!(copies(&old).len(), 1);
    assert!(server.stop().await);

    let server = TestServer::start(&local_key(&[&a, &b], "")).await;
    let mut c = server.client().await;
    let added = re_encrypt(&mut c, &old).await;
    assert_eq!(copies(&added).len(), 2);
    assert!(server.stop().await);
    // The new copy alone opens it.
    let server = TestServer::start(&single_key(&b)).await;
    let mut c = server.client().await;
    assert_eq!(decrypt(&mut c, &added).await.unwrap(), b"old data");
    assert!(
        decrypt(&mut c, &old).await.is_err(),
        "B never had the old copy"
    );
    assert!(server.stop().await);

    // A is dropped from the key: ReEncrypt leaves only B's copy.
    let server = TestServer::start(&local_key(&[&b], "")).await;
    let mut c = server.client().await;
    let dropped = re_encrypt(&mut c, &added).await;
    assert_eq!(copies(&dropped).len(), 1);
    assert!(server.stop().await);
    let server = TestServer::start(&single_key(&a)).await;
    let mut c = server.client().await;
    assert_eq!(decrypt(&mut c, &added).await.unwrap(), b"old data");
    let e = decrypt(&mut c, &dropped).await.unwrap_err();
    assert_eq!(crate::support::reason(&e), "DECRYPTION_FAILED", "{e:?}");
    assert!(server.stop().await);
}

/// `wrap` and the single-backend fields do not mix; at most 8 backends; no duplicates;
/// `require` is "all" or "first".
#[test]
fn wrap_lists_are_checked() {
    let parse = |t: &str| Config::parse(t, "t.toml", Path::new("/etc/kb"));
    let c = parse(
        r#"
        [keys.k]
        require = "first"
        wrap = [
          { backend = "local", key_id = "k", keyring = "a" },
          { backend = "local", key_id = "k", keyring = "b" },
        ]
        "#,
    )
    .unwrap();
    assert_eq!(c.keys["k"].secondaries.len(), 1);
    assert_eq!(c.keys["k"].require, keybroker::cache::Require::First);
    let err = parse(
        r#"
        [keys.a]
        backend = "local"
        key_id = "a"
        wrap = [ { backend = "local", key_id = "a" } ]
        [keys.b]
        wrap = [
          { backend = "local", key_id = "b", keyring = "x" },
          { backend = "local", key_id = "b", keyring = "x" },
        ]
        [keys.c]
        wrap = []
        require = "most"
        [keys.d]
        wrap = [ { backend = "local", key_id = "d", colour = "blue" } ]
        "#,
    )
    .unwrap_err();
    let text: Vec<String> = err.problems.iter().map(|p| p.to_string()).collect();
    let has = |s: &str| text.iter().any(|t| t.starts_with(s));
    assert!(has("keys.a.backend: a key with `wrap`"), "{text:#?}");
    assert!(
        has("keys.b.wrap[1]: wraps with the same backend"),
        "{text:#?}"
    );
    assert!(has("keys.c.wrap: must list 1 to 8"), "{text:#?}");
    assert!(has("keys.c.require: must be"), "{text:#?}");
    assert!(has("keys.d.wrap[0].colour"), "{text:#?}");
}

/// The three clouds behind one key, with the fakes and moto, each server started from text.
struct Clouds {
    moto: Moto,
    gcp: GcpKmsFake,
    azure: KeyVaultFake,
    aws_key: String,
    gcp_key: String,
    azure_key: String,
    /// The servers' audit log (outlives each server's own directory).
    logs: tempfile::TempDir,
}

impl Clouds {
    async fn start() -> Self {
        let moto = Moto::start().await;
        let aws_key = moto.create_key("multi").await;
        let gcp = GcpKmsFake::start().await;
        let gcp_key = gcp.create_test_key("multi");
        let azure = KeyVaultFake::start().await;
        azure.create_rsa_key("multi");
        azure.install_hooks();
        let azure_key = azure.key_url("multi");
        Self {
            moto,
            gcp,
            azure,
            aws_key,
            gcp_key,
            azure_key,
            logs: tempfile::tempdir().unwrap(),
        }
    }

    /// `[keys.NAME]` wrapped by GCP, then Azure, then AWS (`extra`: more fields of the key).
    fn key(&self, name: &str, extra: &str, cached: bool) -> String {
        format!(
            "[keys.{name}]\n{extra}\ncache = {{ enabled = {cached} }}\nwrap = [\n  {{ backend = \"gcp\", key_id = \"{}\" }},\n  {{ backend = \"azure\", key_id = \"{}\" }},\n  {{ backend = \"aws\", key_id = \"{}\" }},\n]\n",
            self.gcp_key, self.azure_key, self.aws_key
        )
    }

    fn audit_log(&self) -> std::path::PathBuf {
        self.logs.path().join("audit.jsonl")
    }

    /// Every audit record written so far.
    fn audit(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.audit_log())
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    async fn server(&self, keys: &str, layer: Option<&CountingLayer>) -> TestServer {
        let dir = tempfile::tempdir().unwrap();
        // One attempt per call: an outage costs each request one failed call per backend.
        let text = format!(
            "{}max_attempts = 1\ntimeout = \"3s\"\n[gcp]\nendpoint = \"{}\"\nmax_attempts = 1\n[azure]\nmax_attempts = 1\n[audit]\npath = \"{}\"\n{keys}",
            self.moto.aws_section(),
            self.gcp.endpoint(),
            self.audit_log().display()
        );
        let mut config =
            Config::parse(&text, "multi.toml", dir.path()).unwrap_or_else(|e| panic!("{e}"));
        config.server.listen = vec![ListenAddr::parse("127.0.0.1:0").unwrap()];
        config.admin_listen = Some("127.0.0.1:0".parse().unwrap());
        config.gcp.credentials = GcpCredentials::Custom(gcp_fake::credentials());
        for k in config.keys.values_mut() {
            k.policy = keybroker::policy::Policy::allow_anonymous_everything();
        }
        let options = StartOptions {
            backend_layer: layer.map(|l| l.layer()),
            ..StartOptions::default()
        };
        TestServer::start_config(dir, config, options).await
    }
}

/// AWS (moto), GCP and Azure in one key: one call per backend per data key; each backend down
/// in turn and decrypt still succeeds; all down is UNAVAILABLE; a secondary down fails an
/// encrypt under `require = "all"` (naming it) and not under `"first"` (counted).
#[tokio::test]
async fn three_clouds_in_one_key() {
    let mut clouds = Clouds::start().await;
    let layer = CountingLayer::default();
    let keys = [
        clouds.key("mix", "", false),
        clouds.key("cached", "", true),
        clouds.key("best_effort", "require = \"first\"", false),
    ]
    .concat();
    let server = clouds.server(&keys, Some(&layer)).await;
    let mut c = server.client().await;

    // N encrypts under one cached data key: one call per backend, three in all.
    let (gcp0, azure0) = (clouds.gcp.calls("Encrypt"), clouds.azure.wraps());
    let mut cached = Vec::new();
    for i in 0..10u8 {
        cached.push(encrypt(&mut c, "cached", &[i; 8]).await.unwrap());
    }
    let calls: u64 = ["cached", "cached#1", "cached#2"]
        .iter()
        .map(|k| layer.key(k).total())
        .sum();
    assert_eq!(calls, 3);
    assert_eq!(clouds.gcp.calls("Encrypt") - gcp0, 1);
    assert_eq!(clouds.azure.wraps() - azure0, 1);
    assert_eq!(layer.key("cached#2").wrap(), 1, "AWS wrapped once");
    assert_eq!(
        copies(&cached[0])
            .iter()
            .map(|(b, _)| *b)
            .collect::<Vec<_>>(),
        [BackendKind::Gcp, BackendKind::Azure, BackendKind::Aws]
    );
    // ... and reading them back costs nothing either (the decrypt cache was seeded).
    for (i, ct) in cached.iter().enumerate() {
        assert_eq!(decrypt(&mut c, ct).await.unwrap(), [i as u8; 8]);
    }
    assert_eq!(
        ["cached", "cached#1", "cached#2"]
            .iter()
            .map(|k| layer.key(k).total())
            .sum::<u64>(),
        3
    );

    let ct = encrypt(&mut c, "mix", b"three clouds").await.unwrap();
    assert_eq!(copies(&ct).len(), 3);
    // Each backend down in turn (GCP, then Azure, then AWS for good): still decrypts.
    clouds
        .gcp
        .fail_next("Decrypt", tonic::Code::Unavailable, "region outage", 1);
    assert_eq!(decrypt(&mut c, &ct).await.unwrap(), b"three clouds");
    clouds.azure.inject(1, 503, None);
    assert_eq!(decrypt(&mut c, &ct).await.unwrap(), b"three clouds");
    clouds.moto.stop();
    assert_eq!(decrypt(&mut c, &ct).await.unwrap(), b"three clouds");
    let m = scrape(&server).await;
    let served = |backend: &str, copy: &str| {
        metric(
            &m,
            &format!(
                "keybroker_copy_served_total{{key=\"mix\",backend=\"{backend}\",copy=\"{copy}\"}}"
            ),
        )
    };
    assert!(served("azure", "1") >= 1.0, "{m}");
    assert!(served("aws", "2") >= 1.0, "{m}");
    assert!(served("gcp", "0") >= 1.0, "{m}");
    // The failed calls are counted under their own backend.
    assert!(
        metric(
            &m,
            "keybroker_backend_calls_total{backend=\"gcp\",key=\"mix\",operation=\"unwrap\",outcome=\"unavailable\"}"
        ) >= 1.0,
        "{m}"
    );

    // All three down.
    clouds
        .gcp
        .fail_next("Decrypt", tonic::Code::Unavailable, "region outage", 1);
    clouds.azure.inject(1, 503, None);
    let e = decrypt(&mut c, &ct).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");

    // Encrypt with a secondary down: "all" fails naming it, "first" goes with fewer copies.
    let e = encrypt(&mut c, "mix", b"x").await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(e.message().contains("aws"), "{e:?}");
    let partial = encrypt(&mut c, "best_effort", b"fewer copies")
        .await
        .unwrap();
    assert_eq!(
        copies(&partial).iter().map(|(b, _)| *b).collect::<Vec<_>>(),
        [BackendKind::Gcp, BackendKind::Azure]
    );
    assert_eq!(decrypt(&mut c, &partial).await.unwrap(), b"fewer copies");
    let m = scrape(&server).await;
    assert_eq!(
        metric(
            &m,
            "keybroker_copies_missing_total{key=\"best_effort\",backend=\"aws\",copy=\"2\"}"
        ),
        1.0,
        "{m}"
    );
    assert!(server.stop().await);
    // The audit records say the same: the refused encrypt called all three, the best-effort one
    // went without the AWS copy.
    let records = clouds.audit();
    let encrypts = |key: &str| -> Vec<&serde_json::Value> {
        records
            .iter()
            .filter(|r| r["operation"] == "encrypt" && r["key"] == key)
            .collect()
    };
    let refused = encrypts("mix")
        .into_iter()
        .find(|r| r["result"] == "UNAVAILABLE")
        .unwrap();
    assert_eq!(
        refused["backends"],
        serde_json::json!(["gcp#0", "azure#1", "aws#2"]),
        "{refused}"
    );
    let partial = encrypts("best_effort")[0];
    assert_eq!(partial["result"], "OK", "{partial}");
    assert_eq!(
        partial["copies_missing"],
        serde_json::json!([{"wrap": 2, "backend": "aws"}]),
        "{partial}"
    );
}

/// A hung backend (accepts, never answers) costs the first request its deadline and then
/// nothing: the breaker tries the healthy copy first, and the hung endpoint sees no new call.
#[tokio::test]
async fn a_hung_backend_is_skipped_and_then_tried_last() {
    let moto = Moto::start().await;
    let arn = moto.create_key("hung").await;
    let shared = tempfile::tempdir().unwrap();
    let ring = shared.path().join("ring");
    let key = |endpoint: &str| {
        format!(
            "{}max_attempts = 1\n[keys.hk]\nwrap = [\n  {{ backend = \"aws\", key_id = \"{arn}\", endpoint = \"{endpoint}\", timeout = \"1s\" }},\n  {{ backend = \"local\", keyring = \"{}\", key_id = \"hk\", create = true }},\n]\n[keys.hk.cache]\nenabled = false\n",
            moto.aws_section(),
            ring.display()
        )
    };
    // Written while AWS answered.
    let writer = TestServer::start(&key(&moto.endpoint)).await;
    let mut c = writer.client().await;
    let first = encrypt(&mut c, "hk", b"one").await.unwrap();
    let second = encrypt(&mut c, "hk", b"two").await.unwrap();
    assert_eq!(copies(&first)[0].0, BackendKind::Aws);
    assert!(writer.stop().await);

    // Read while AWS hangs.
    let hung = Hung::start().await;
    let (reader, layer) = TestServer::counted(&key(&hung.endpoint())).await;
    let mut c = reader.client().await;
    let started = Instant::now();
    assert_eq!(decrypt(&mut c, &first).await.unwrap(), b"one");
    let first_took = started.elapsed();
    assert_eq!(layer.key("hk").unwrap(), 1, "AWS was tried first");
    assert!(hung.accepted() >= 1 && hung.received() > 0);
    let (accepted, received) = (hung.accepted(), hung.received());

    let started = Instant::now();
    assert_eq!(decrypt(&mut c, &second).await.unwrap(), b"two");
    let second_took = started.elapsed();
    assert_eq!(
        layer.key("hk").unwrap(),
        1,
        "the hung backend was not asked again"
    );
    assert_eq!(layer.key("hk#1").unwrap(), 2);
    assert_eq!((hung.accepted(), hung.received()), (accepted, received));
    let listing = c.list_keys(ListKeysRequest {}).await.unwrap().into_inner();
    let hk = listing.keys.iter().find(|k| k.name == "hk").unwrap();
    assert_eq!(hk.wraps[0].health, "failing");
    assert_eq!(hk.wraps[1].health, "healthy");
    eprintln!(
        "hung backend: first decrypt {first_took:?} (waited for the 1s deadline), second {second_took:?}"
    );
    assert!(reader.stop().await);
    drop(moto);
}

/// docs/examples/two-keyrings.toml runs with no cloud: both copies, and either opens.
#[tokio::test]
async fn the_two_keyrings_example_runs() {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/examples/two-keyrings.toml"),
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_in(dir, &text).await;
    let mut c = server.client().await;
    let ct = encrypt(&mut c, "orders", b"from the example")
        .await
        .unwrap();
    assert_eq!(copies(&ct).len(), 2);
    assert_eq!(decrypt(&mut c, &ct).await.unwrap(), b"from the example");
    assert!(server.stop().await);
}

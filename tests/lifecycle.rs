//! Key lifecycle (issue 18, docs/lifecycle.md): scheduled rotation on running servers (once
//! across two servers on one keyring) and from `keys rotate --if-due`, version retirement and
//! ReEncrypt moving data past it, safe deletion (guard, `--force`, cancel, purge), the usage
//! report against a workload of known size, and the lifecycle fields of ListKeys.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use keybroker::client::KeyBrokerClient;
use keybroker::keyring::{self, Keyring};
use keybroker::proto::{DecryptRequest, EncryptRequest, ListKeysRequest, ReEncryptRequest};
use tonic::transport::Channel;

use crate::support::{TestServer, keybroker_bin, local_config, reason};

type Client = KeyBrokerClient<Channel>;

async fn encrypt(c: &mut Client, msg: &[u8]) -> Result<(Vec<u8>, String), tonic::Status> {
    let r = c
        .encrypt(EncryptRequest {
            key: "default".into(),
            plaintext: msg.to_vec().into(),
            context: BTreeMap::new(),
        })
        .await?
        .into_inner();
    Ok((r.ciphertext.to_vec(), r.key_version))
}

async fn decrypt(c: &mut Client, ct: &[u8]) -> Result<(Vec<u8>, String), tonic::Status> {
    let r = c
        .decrypt(DecryptRequest {
            ciphertext: ct.to_vec().into(),
            context: BTreeMap::new(),
        })
        .await?
        .into_inner();
    Ok((r.plaintext.to_vec(), r.key_version))
}

/// `keybroker keys --keyring RING ARGS...`: (success, stdout + stderr).
fn keys(ring: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new(keybroker_bin())
        .args(["keys", "--keyring"])
        .arg(ring)
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Waits (bounded) until `f` holds, polling every 50 ms.
async fn eventually(what: &str, secs: u64, mut f: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f().await {
        assert!(Instant::now() < deadline, "not within {secs} s: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn created_times(ring: &Path) -> Vec<SystemTime> {
    Keyring::load(ring).unwrap().keys["default"]
        .versions
        .values()
        .map(|v| keybroker::util::parse_rfc3339(&v.created).unwrap())
        .collect()
}

/// Two servers share one keyring whose key rotates every 2 s: new versions appear without a
/// restart, both servers encrypt under them, and no rotation is done twice (consecutive
/// versions are at least one period apart; two servers acting on one due time would make two
/// versions milliseconds apart).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_rotation_happens_once_across_two_servers_without_restart() {
    let a = TestServer::local("[local]\npoll_interval = \"100ms\"").await;
    let ring = a.path("keyring");
    let b = TestServer::start(
        &local_config("[local]\npoll_interval = \"100ms\"")
            .replace("{dir}/keyring", &ring.display().to_string()),
    )
    .await;
    let (mut ca, mut cb) = (a.client().await, b.client().await);
    assert_eq!(encrypt(&mut ca, b"x").await.unwrap().1, "1");
    let period = Duration::from_secs(2);
    keyring::edit(&ring, false, |r| {
        r.rotate_key("default")?;
        r.set_rotation_period("default", Some(period))
    })
    .unwrap();
    eventually("version 4 made by the servers", 20, async || {
        created_times(&ring).len() >= 4
    })
    .await;
    // Stop the schedule before judging, so the count cannot move under the assertions.
    keyring::edit(&ring, false, |r| r.set_rotation_period("default", None)).unwrap();
    let times = created_times(&ring);
    for pair in times[1..].windows(2) {
        let gap = pair[1].duration_since(pair[0]).unwrap();
        assert!(
            gap >= period,
            "two rotations {gap:?} apart: rotated twice for one due time ({times:?})"
        );
    }
    let primary = times.len().to_string();
    for c in [&mut ca, &mut cb] {
        eventually(
            "both servers encrypt under the new primary",
            10,
            async || encrypt(c, b"y").await.unwrap().1 == primary,
        )
        .await;
    }
    // ListKeys shows the schedule's state.
    let listed = ca.list_keys(ListKeysRequest {}).await.unwrap().into_inner();
    let k = &listed.keys[0];
    assert_eq!(k.rotation_source, "keyring");
    assert_eq!(k.primary_version, primary);
    assert!(k.primary_age_seconds < 60, "{}", k.primary_age_seconds);
    b.stop().await;
    a.stop().await;
}

/// `keys rotate --if-due` (what a CronJob runs): nothing when not due; when due, four runs at
/// once rotate exactly once (decided under the keyring lock).
#[test]
fn keys_rotate_if_due_rotates_once_when_due() {
    let dir = tempfile::tempdir().unwrap();
    let ring = dir.path().join("keyring");
    let (ok, out) = keys(&ring, &["create", "default", "--rotation-period", "1s"]);
    assert!(ok, "{out}");
    let (ok, out) = keys(&ring, &["rotate", "--if-due"]);
    assert!(ok && out.contains("no key is due"), "{out}");
    let (ok, out) = keys(&ring, &["list"]);
    assert!(
        ok && out.contains("1s") && out.contains("NEXT ROTATION"),
        "{out}"
    );
    std::thread::sleep(Duration::from_millis(1100));
    let runs: Vec<_> = (0..4)
        .map(|_| {
            Command::new(keybroker_bin())
                .args(["keys", "--keyring"])
                .arg(&ring)
                .args(["rotate", "--if-due"])
                .output()
                .map(|o| {
                    (
                        o.status.success(),
                        String::from_utf8_lossy(&o.stdout).into_owned(),
                    )
                })
        })
        .collect();
    let rotated = runs
        .iter()
        .map(|r| r.as_ref().unwrap())
        .inspect(|(ok, out)| assert!(ok, "{out}"))
        .filter(|(_, out)| out.contains("version 2 is now primary"))
        .count();
    assert_eq!(rotated, 1);
    assert_eq!(Keyring::load(&ring).unwrap().keys["default"].primary, 2);
    let (ok, out) = keys(&ring, &["describe", "default"]);
    assert!(ok && out.contains("primary version:     2"), "{out}");
}

/// Retiring version 1: its ciphertexts fail with FAILED_PRECONDITION / KEY_VERSION_RETIRED
/// naming the version (also from the cache), ReEncrypt moves them to version 2, and the moved
/// data decrypts.
#[tokio::test]
async fn retired_version_is_refused_and_reencrypt_moves_data_past_it() {
    let s = TestServer::local(
        "[local]\npoll_interval = \"100ms\"\n[admin]\nlisten = \"127.0.0.1:0\"\n",
    )
    .await;
    let ring = s.path("keyring");
    let mut c = s.client().await;
    let (old, v) = encrypt(&mut c, b"old data").await.unwrap();
    assert_eq!(v, "1");
    decrypt(&mut c, &old).await.unwrap(); // now cached
    let (ok, out) = keys(&ring, &["set-min-decrypt-version", "default", "2"]);
    assert!(!ok && out.contains("rotate first"), "{out}");
    assert!(keys(&ring, &["rotate", "default"]).0);
    let (ok, out) = keys(&ring, &["set-min-decrypt-version", "default", "2"]);
    assert!(ok, "{out}");
    let mut refusal = None;
    eventually(
        "the retirement reaches the server",
        10,
        async || match decrypt(&mut c, &old).await {
            Err(e) => {
                refusal = Some(e);
                true
            }
            Ok(_) => false,
        },
    )
    .await;
    let e = refusal.unwrap();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    assert_eq!(reason(&e), "KEY_VERSION_RETIRED");
    assert!(e.message().contains("version 1"), "{}", e.message());
    let moved = c
        .re_encrypt(ReEncryptRequest {
            ciphertext: old.clone().into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (
            moved.source_key_version.as_str(),
            moved.key_version.as_str()
        ),
        ("1", "2")
    );
    let (plain, v) = decrypt(&mut c, &moved.ciphertext).await.unwrap();
    assert_eq!((plain.as_slice(), v.as_str()), (&b"old data"[..], "2"));
    let listed = c.list_keys(ListKeysRequest {}).await.unwrap().into_inner();
    assert_eq!(listed.keys[0].min_decrypt_version, "2");
    // The metrics: uses per version (decrypt of v1 before retirement and of v2 after; the
    // ReEncrypt counted under its source version), the refusal, the primary version and age.
    let admin = s.running.as_ref().unwrap().admin_addr.unwrap().to_string();
    let (status, body) = crate::support::http_get(&admin, "/metrics").await;
    assert_eq!(status, 200);
    // Version 1 decrypted once before retirement, and maybe again before the server saw it.
    let v1 = body
        .lines()
        .find_map(|l| {
            l.strip_prefix(
                r#"keybroker_key_version_uses_total{key="default",version="1",operation="decrypt"} "#,
            )
        })
        .unwrap_or_else(|| panic!("no version 1 decrypts in\n{body}"));
    assert!(v1.parse::<u64>().unwrap() >= 1, "{v1}");
    for line in [
        r#"keybroker_key_version_uses_total{key="default",version="2",operation="decrypt"} 1"#,
        r#"keybroker_key_version_uses_total{key="default",version="1",operation="re_encrypt"} 1"#,
        r#"keybroker_key_version_uses_total{key="default",version="1",operation="encrypt"} 1"#,
        r#"keybroker_key_primary_version_info{key="default",version="2"} 1"#,
        r#"keybroker_key_min_decrypt_version{key="default",backend="local"} 2.0"#,
        r#"keybroker_key_pending_deletion{key="default",backend="local"} 0.0"#,
    ] {
        assert!(body.lines().any(|l| l == line), "no {line} in\n{body}");
    }
    let refused = body
        .lines()
        .find(|l| {
            l.starts_with(
                r#"keybroker_lifecycle_refusals_total{key="default",reason="KEY_VERSION_RETIRED"}"#,
            )
        })
        .unwrap_or_else(|| panic!("no refusal count in\n{body}"));
    assert!(!refused.ends_with(" 0"), "{refused}");
    let age: f64 = body
        .lines()
        .find_map(|l| {
            l.strip_prefix(
                r#"keybroker_key_primary_version_age_seconds{key="default",backend="local"} "#,
            )
        })
        .unwrap()
        .parse()
        .unwrap();
    assert!((0.0..60.0).contains(&age), "{age}");
    // Un-retiring restores version 1.
    assert!(keys(&ring, &["set-min-decrypt-version", "default", "0"]).0);
    eventually("version 1 decrypts again", 10, async || {
        decrypt(&mut c, &old).await.is_ok()
    })
    .await;
}

/// Deletion: the guard refuses a key the audit log shows in use, `--force` overrides it; while
/// pending every use fails with KEY_PENDING_DELETION (and is audited); cancelling restores the
/// key fully; purge refuses before the window ends; once it has ended the server destroys it.
#[tokio::test]
async fn deletion_guard_pending_cancel_and_purge() {
    let s =
        TestServer::local("[local]\npoll_interval = \"100ms\"\n[audit]\npath = \"audit.jsonl\"\n")
            .await;
    let ring = s.path("keyring");
    let log = s.path("audit.jsonl");
    let log_arg = log.display().to_string();
    let mut c = s.client().await;
    let (ct, _) = encrypt(&mut c, b"keep me").await.unwrap();
    eventually("the encrypt is in the audit log", 10, async || {
        std::fs::read_to_string(&log).is_ok_and(|t| t.contains("\"encrypt\""))
    })
    .await;

    let (ok, out) = keys(
        &ring,
        &["schedule-deletion", "default", "--in", "3d", "--force"],
    );
    assert!(!ok && out.contains("at least 7d"), "{out}");
    let (ok, out) = keys(&ring, &["schedule-deletion", "default"]);
    assert!(!ok && out.contains("no audit log"), "{out}");
    let (ok, out) = keys(
        &ring,
        &["schedule-deletion", "default", "--audit", &log_arg],
    );
    assert!(!ok && out.contains("was used at"), "{out}");
    let (ok, out) = keys(
        &ring,
        &[
            "schedule-deletion",
            "default",
            "--in",
            "8d",
            "--audit",
            &log_arg,
            "--force",
        ],
    );
    assert!(ok && out.contains("pending deletion"), "{out}");

    let mut refused = None;
    eventually(
        "the server refuses the pending key",
        10,
        async || match decrypt(&mut c, &ct).await {
            Err(e) => {
                refused = Some(e);
                true
            }
            Ok(_) => false,
        },
    )
    .await;
    let e = refused.unwrap();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    assert_eq!(reason(&e), "KEY_PENDING_DELETION");
    let e = encrypt(&mut c, b"new").await.unwrap_err();
    assert_eq!(reason(&e), "KEY_PENDING_DELETION");
    let listed = c.list_keys(ListKeysRequest {}).await.unwrap().into_inner();
    assert!(listed.keys[0].pending_deletion && !listed.keys[0].deletion_time.is_empty());
    eventually("the refusal is audited", 10, async || {
        std::fs::read_to_string(&log).is_ok_and(|t| t.contains("KEY_PENDING_DELETION"))
    })
    .await;
    let (ok, out) = keys(&ring, &["purge", "default"]);
    assert!(!ok && out.contains("cannot be purged before"), "{out}");

    let (ok, out) = keys(&ring, &["cancel-deletion", "default"]);
    assert!(ok, "{out}");
    eventually("cancel restores the key", 10, async || {
        decrypt(&mut c, &ct)
            .await
            .is_ok_and(|(p, _)| p == b"keep me")
    })
    .await;

    // The window has ended (set in the file: nobody waits 7 days): the server destroys the key.
    let (ok, out) = keys(
        &ring,
        &[
            "schedule-deletion",
            "default",
            "--in",
            "7d",
            "--force",
            "--audit",
            &log_arg,
        ],
    );
    assert!(ok, "{out}");
    keyring::edit(&ring, false, |r| {
        r.keys.get_mut("default").unwrap().delete_after =
            Some(SystemTime::now() - Duration::from_secs(1));
        Ok(())
    })
    .unwrap();
    eventually("the server purges the key", 10, async || {
        !Keyring::load(&ring).unwrap().keys.contains_key("default")
    })
    .await;
    let text = std::fs::read_to_string(&ring).unwrap();
    assert!(!text.contains("\"default\""), "{text}");
}

/// The usage report against a workload of known size: 5 encrypts and 3 decrypts that succeed,
/// 2 decrypts of a tampered ciphertext; counts, results and first/last use per row (JSON and
/// text); a broken chain is reported with exit status 2 instead of a summary passed off as
/// complete.
#[tokio::test]
async fn audit_report_counts_a_known_workload_and_reports_a_broken_chain() {
    let s = TestServer::local("[audit]\npath = \"audit.jsonl\"\n").await;
    let log = s.path("audit.jsonl");
    let mut c = s.client().await;
    let mut cts = Vec::new();
    for i in 0..5u8 {
        cts.push(encrypt(&mut c, &[i; 10]).await.unwrap().0);
    }
    for ct in &cts[..3] {
        decrypt(&mut c, ct).await.unwrap();
    }
    let mut bad = cts[4].clone();
    let last = bad.len() - 1;
    bad[last] ^= 1;
    for _ in 0..2 {
        decrypt(&mut c, &bad).await.unwrap_err();
    }
    eventually("10 records", 10, async || {
        std::fs::read_to_string(&log).is_ok_and(|t| t.lines().count() >= 10)
    })
    .await;
    let report = |args: &[&str]| {
        let out = Command::new(keybroker_bin())
            .args(["audit", "report"])
            .args(args)
            .arg(&log)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (code, out) = report(&["--json", "--since", "1h"]);
    assert_eq!(code, Some(0), "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["verified"], true);
    assert_eq!(v["records_in_window"], 10);
    let rows = v["rows"].as_array().unwrap();
    let row = |op: &str| {
        rows.iter()
            .find(|r| r["operation"] == op && r["key"] == "default")
            .unwrap_or_else(|| panic!("no {op} row in {out}"))
    };
    let enc = row("encrypt");
    assert_eq!(
        (enc["count"].as_u64(), enc["key_version"].as_str()),
        (Some(5), Some("1"))
    );
    assert_eq!(enc["results"]["OK"], 5);
    assert_eq!(enc["caller"], "anonymous");
    assert!(enc["first_use"].as_str() <= enc["last_use"].as_str());
    let dec = row("decrypt");
    assert_eq!(dec["count"], 5);
    assert_eq!(dec["results"]["OK"], 3);
    assert_eq!(dec["results"]["INVALID_ARGUMENT"], 2);
    let (code, out) = report(&[]);
    assert_eq!(code, Some(0));
    assert!(out.contains("KEY") && out.contains("OK=5"), "{out}");

    // Edit one record: the break is reported, exit status 2.
    let text = std::fs::read_to_string(&log).unwrap();
    std::fs::write(&log, text.replacen("\"encrypt\"", "\"decrypt\"", 2)).unwrap();
    let (code, out) = report(&[]);
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("CHAIN BROKEN"), "{out}");
    s.stop().await;
}

/// Every alert rule in deploy/prometheus passes `promtool check rules` and fires in a
/// `promtool test rules` case (promtool: Debian `prometheus`, installed by scripts/test-setup).
#[test]
fn alert_rules_check_and_fire_in_promtool_tests() {
    crate::support::alerts::check_alert_rules(
        "keybroker-lifecycle.rules.yaml",
        &[
            "keybroker-lifecycle.test.yaml",
            "keybroker-lifecycle-long.test.yaml",
        ],
        6,
    );
}

/// The key version of the first copy of a ciphertext file.
fn version_of(path: &Path) -> String {
    let bytes = std::fs::read(path).unwrap();
    keybroker::envelope::parse(&bytes).unwrap().copies[0]
        .key_version
        .to_owned()
}

fn reencrypts_in(log: &Path) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("\"operation\":\"re_encrypt\"") && l.contains("\"result\":\"OK\""))
        .count()
}

/// `keybroker rewrap` over 30 files, SIGKILLed once a few are done: every file is left whole
/// (old or new, both decrypt); the rerun skips exactly the files already current and
/// re-encrypts only the rest (counted in the audit log); afterwards version 1 can be retired
/// and everything still decrypts. Base64 lines on stdin come back in order on stdout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewrap_resumes_after_a_kill_and_touches_each_ciphertext_once() {
    let s =
        TestServer::local("[local]\npoll_interval = \"100ms\"\n[audit]\npath = \"audit.jsonl\"\n")
            .await;
    let ring = s.path("keyring");
    let log = s.path("audit.jsonl");
    let mut c = s.client().await;
    let data = s.path("data");
    std::fs::create_dir(&data).unwrap();
    let files: Vec<_> = (0..30).map(|i| data.join(format!("{i}.bin"))).collect();
    for (i, f) in files.iter().enumerate() {
        let (ct, _) = encrypt(&mut c, format!("record {i}").as_bytes())
            .await
            .unwrap();
        std::fs::write(f, ct).unwrap();
    }
    let (old_line, _) = encrypt(&mut c, b"on stdin").await.unwrap();
    assert!(keys(&ring, &["rotate", "default"]).0);
    eventually("the server encrypts under version 2", 10, async || {
        encrypt(&mut c, b"z").await.unwrap().1 == "2"
    })
    .await;
    let rewrap = |rate: &str| {
        let mut cmd = Command::new(keybroker_bin());
        cmd.args([
            "rewrap",
            "--addr",
            &s.addr,
            "--concurrency",
            "2",
            "--rate",
            rate,
        ])
        .args(&files)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
        cmd
    };
    let mut child = rewrap("10").spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while files.iter().filter(|f| version_of(f) == "2").count() < 3 {
        assert!(Instant::now() < deadline, "rewrap made no progress");
        std::thread::sleep(Duration::from_millis(10));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let done = files.iter().filter(|f| version_of(f) == "2").count();
    assert!((3..30).contains(&done), "{done} of 30 done when killed");
    // Records are written off the request path: wait for those of the finished calls.
    eventually("the first run's records", 10, async || {
        reencrypts_in(&log) >= done
    })
    .await;
    let first_run = reencrypts_in(&log);
    assert!(
        first_run >= done && first_run <= done + 2,
        "{first_run} calls for {done} files"
    );

    let before = reencrypts_in(&log);
    let out = rewrap("0").output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains(&format!("{} rewrapped, {done} already current", 30 - done)),
        "{err}"
    );
    eventually("the rerun's records", 10, async || {
        reencrypts_in(&log) >= before + 30 - done
    })
    .await;
    assert_eq!(
        reencrypts_in(&log) - before,
        30 - done,
        "the rerun touched only the rest"
    );

    // Everything is past version 1 now: retire it; every file still decrypts.
    assert!(keys(&ring, &["set-min-decrypt-version", "default", "2"]).0);
    eventually("the retirement reaches the server", 10, async || {
        decrypt(&mut c, &old_line).await.is_err()
    })
    .await;
    for (i, f) in files.iter().enumerate() {
        let (plain, v) = decrypt(&mut c, &std::fs::read(f).unwrap()).await.unwrap();
        assert_eq!(
            (plain, v.as_str()),
            (format!("record {i}").into_bytes(), "2")
        );
    }

    // stdin mode: one old line, one current line; order kept; the old one is moved forward.
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let current = b64.encode(std::fs::read(&files[0]).unwrap());
    let input = format!("{}\n{current}\n", b64.encode(&old_line));
    let out = crate::support::run_with_stdin(
        Command::new(keybroker_bin()).args(["rewrap", "--addr", &s.addr]),
        input.as_bytes(),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("1 rewrapped, 1 already current"), "{err}");
    let lines: Vec<String> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[1], current);
    let (plain, v) = decrypt(&mut c, &b64.decode(&lines[0]).unwrap())
        .await
        .unwrap();
    assert_eq!((plain.as_slice(), v.as_str()), (&b"on stdin"[..], "2"));
    s.stop().await;
}

/// A cloud key's rotation state is read from the cloud at startup: moto's KMS answers
/// GetKeyRotationStatus (moto reports no period, so the documented default of 365 days
/// applies) and ListKeyRotations / DescribeKey give the primary's age; a key without rotation
/// shows no schedule.
#[tokio::test]
async fn aws_rotation_state_is_read_from_kms() {
    let moto = crate::support::moto::Moto::start().await;
    let rotating = moto.create_key("rotating").await;
    let manual = moto.create_key("manual").await;
    let kms = moto.client();
    kms.enable_key_rotation()
        .key_id(&rotating)
        .send()
        .await
        .unwrap();
    let s = TestServer::start(&format!(
        "{}\n[keys.r]\nbackend = \"aws\"\nkey_id = \"{rotating}\"\nrotation_state = true\n[keys.m]\nbackend = \"aws\"\nkey_id = \"{manual}\"\nrotation_state = true\n{}{}",
        moto.aws_section(),
        crate::support::allow_anonymous("r"),
        crate::support::allow_anonymous("m"),
    ))
    .await;
    let mut c = s.client().await;
    let mut keys = Vec::new();
    eventually("ListKeys shows the AWS rotation state", 20, async || {
        keys = c
            .list_keys(ListKeysRequest {})
            .await
            .unwrap()
            .into_inner()
            .keys;
        keys.iter().all(|k| k.rotation_source == "aws")
    })
    .await;
    let r = keys.iter().find(|k| k.name == "r").unwrap();
    assert_eq!(r.rotation_period, "365d");
    assert!(!r.next_rotation_time.is_empty());
    assert!(r.primary_age_seconds < 3600, "{}", r.primary_age_seconds);
    let m = keys.iter().find(|k| k.name == "m").unwrap();
    assert_eq!(
        (m.rotation_period.as_str(), m.next_rotation_time.as_str()),
        ("", "")
    );
    s.stop().await;
}

/// The break-glass check: with `canary_interval` the server wraps and unwraps through the
/// backend on its own; `/metrics` shows it succeeding, and failing once the key is disabled
/// in the keyring (recovering when it is enabled again).
#[tokio::test]
async fn canary_proves_the_round_trip_and_reports_failure() {
    let s = TestServer::local(
        "canary_interval = \"1s\"\n[local]\npoll_interval = \"100ms\"\n[admin]\nlisten = \"127.0.0.1:0\"\n",
    )
    .await;
    let admin = s.running.as_ref().unwrap().admin_addr.unwrap().to_string();
    let gauge = async |name: &str| -> Option<f64> {
        let (_, body) = crate::support::http_get(&admin, "/metrics").await;
        body.lines().find_map(|l| {
            l.strip_prefix(&format!("{name}{{key=\"default\",backend=\"local\"}} "))
                .map(|v| v.parse().unwrap())
        })
    };
    eventually("a successful canary", 10, async || {
        gauge("keybroker_key_canary_ok").await == Some(1.0)
    })
    .await;
    assert!(gauge("keybroker_key_canary_last_success_timestamp_seconds").await > Some(1e9));
    assert!(keys(&s.path("keyring"), &["disable", "default"]).0);
    eventually("a failing canary", 10, async || {
        gauge("keybroker_key_canary_ok").await == Some(0.0)
    })
    .await;
    let (_, body) = crate::support::http_get(&admin, "/metrics").await;
    let failures = body
        .lines()
        .find_map(|l| {
            l.strip_prefix(r#"keybroker_key_canary_failures_total{key="default",backend="local"} "#)
        })
        .unwrap_or_else(|| panic!("no canary failures in\n{body}"));
    assert_ne!(failures, "0");
    assert!(keys(&s.path("keyring"), &["enable", "default"]).0);
    eventually("the canary recovers", 10, async || {
        gauge("keybroker_key_canary_ok").await == Some(1.0)
    })
    .await;
    s.stop().await;
}

/// A server on the Cloud KMS fake with `keys_toml` (keys open to anonymous callers).
async fn gcp_server(fake: &crate::support::gcp_fake::GcpKmsFake, keys_toml: &str) -> TestServer {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "[gcp]\nendpoint = \"{}\"\nattempt_timeout = \"5s\"\n{keys_toml}",
        fake.endpoint()
    );
    let mut config = keybroker::config::Config::parse(&text, "lifecycle-gcp.toml", dir.path())
        .unwrap_or_else(|e| panic!("{e}"));
    config.server.listen = vec![keybroker::config::ListenAddr::parse("127.0.0.1:0").unwrap()];
    config.gcp.credentials =
        keybroker::backend::gcp::GcpCredentials::Custom(crate::support::gcp_fake::credentials());
    config.admin_listen = None;
    for k in config.keys.values_mut() {
        k.policy = keybroker::policy::Policy::allow_anonymous_everything();
    }
    TestServer::start_config(dir, config, Default::default()).await
}

/// ListKeys, until `done` holds for what it lists (bounded).
async fn list_until(
    c: &mut Client,
    what: &str,
    done: impl Fn(&[keybroker::proto::KeyInfo]) -> bool,
) -> Vec<keybroker::proto::KeyInfo> {
    let mut keys = Vec::new();
    eventually(what, 20, async || {
        keys = c
            .list_keys(ListKeysRequest {})
            .await
            .unwrap()
            .into_inner()
            .keys;
        done(&keys)
    })
    .await;
    keys
}

/// Encrypt and Decrypt through key `key` still work (the key serves whatever its lifecycle).
async fn serves(c: &mut Client, key: &str) {
    let ct = c
        .encrypt(EncryptRequest {
            key: key.into(),
            plaintext: b"still serving".to_vec().into(),
            context: BTreeMap::new(),
        })
        .await
        .unwrap_or_else(|e| panic!("{key}: {e:?}"))
        .into_inner()
        .ciphertext;
    let (pt, _) = decrypt(c, &ct).await.unwrap();
    assert_eq!(pt, b"still serving");
}

/// Cloud KMS rotation state from GetCryptoKey at startup: the fake's CryptoKey carries
/// `rotation_period` (90 days) and `next_rotation_time`, and its primary version a
/// `create_time` 60 days back; ListKeys shows them. A key without a schedule shows none (but
/// its primary's age).
#[tokio::test]
async fn gcp_rotation_state_is_read_from_cloud_kms() {
    let fake = crate::support::gcp_fake::GcpKmsFake::start().await;
    let rotating = fake.create_test_key("rotating");
    let manual = fake.create_test_key("manual");
    let day = Duration::from_secs(86_400);
    let now = SystemTime::now();
    let next = SystemTime::UNIX_EPOCH
        + Duration::from_secs(
            (now + 30 * day)
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap()
                .as_secs(),
        );
    fake.set_rotation(&rotating, Some(90 * day), Some(next));
    let primary = fake.primary(&rotating).unwrap();
    fake.set_created(&primary, now - 60 * day);
    let s = gcp_server(
        &fake,
        &format!(
            "[keys.r]\nbackend = \"gcp\"\nkey_id = \"{rotating}\"\nrotation_state = true\n\
             [keys.m]\nbackend = \"gcp\"\nkey_id = \"{manual}\"\nrotation_state = true\n"
        ),
    )
    .await;
    let mut c = s.client().await;
    let keys = list_until(&mut c, "ListKeys shows the Cloud KMS rotation state", |k| {
        k.iter().all(|k| k.rotation_source == "gcp")
    })
    .await;
    let r = keys.iter().find(|k| k.name == "r").unwrap();
    assert_eq!(r.rotation_period, "90d");
    assert_eq!(
        keybroker::util::parse_rfc3339(&r.next_rotation_time),
        Some(next),
        "{}",
        r.next_rotation_time
    );
    assert_eq!(r.primary_version, primary);
    let age = r.primary_age_seconds;
    assert!((60 * 86_400..60 * 86_400 + 3600).contains(&age), "{age}");
    let m = keys.iter().find(|k| k.name == "m").unwrap();
    assert_eq!(
        (m.rotation_period.as_str(), m.next_rotation_time.as_str()),
        ("", "")
    );
    assert!(m.primary_age_seconds < 3600, "{}", m.primary_age_seconds);
    assert_eq!(m.primary_version, format!("{manual}/cryptoKeyVersions/1"));
    // One GetCryptoKey per key at startup, none on the request path.
    assert_eq!(fake.calls("GetCryptoKey"), 2);
    serves(&mut c, "r").await;
    assert_eq!(fake.calls("GetCryptoKey"), 2);
    s.stop().await;
}

/// Without `cloudkms.cryptoKeys.get` (PERMISSION_DENIED from GetCryptoKey) the lifecycle stays
/// unknown (no rotation source) and the key still encrypts and decrypts.
#[tokio::test]
async fn gcp_refused_rotation_state_leaves_the_key_serving() {
    let fake = crate::support::gcp_fake::GcpKmsFake::start().await;
    let key = fake.create_test_key("refused");
    fake.set_rotation(
        &key,
        Some(Duration::from_secs(90 * 86_400)),
        Some(SystemTime::now()),
    );
    fake.fail_next(
        "GetCryptoKey",
        tonic::Code::PermissionDenied,
        "Permission 'cloudkms.cryptoKeys.get' denied on resource (or it may not exist).",
        100,
    );
    let s = gcp_server(
        &fake,
        &format!("[keys.x]\nbackend = \"gcp\"\nkey_id = \"{key}\"\nrotation_state = true\n"),
    )
    .await;
    eventually("the GetCryptoKey call", 20, async || {
        fake.calls("GetCryptoKey") >= 1
    })
    .await;
    let mut c = s.client().await;
    serves(&mut c, "x").await;
    let keys = c
        .list_keys(ListKeysRequest {})
        .await
        .unwrap()
        .into_inner()
        .keys;
    let x = keys.iter().find(|k| k.name == "x").unwrap();
    assert_eq!(
        (x.rotation_source.as_str(), x.rotation_period.as_str()),
        ("", "")
    );
    s.stop().await;
}

/// Key Vault rotation state from GET key and GET rotationpolicy at startup: a Rotate action
/// 90 days after creation on a version created 10 days ago gives period 90d, next rotation at
/// created + 90d and an age of 10 days. A key that never had a policy (Key Vault's default:
/// Notify only) shows no schedule; one whose policy the identity may not read (403) stays
/// unknown and still serves.
#[tokio::test]
async fn azure_rotation_state_is_read_from_key_vault() {
    use crate::support::azure_fake::KeyVaultFake;
    let fake = KeyVaultFake::start().await;
    let rot = fake.create_rsa_key("rot");
    fake.create_rsa_key("plain");
    fake.create_rsa_key("refused");
    fake.install_hooks();
    let created = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        - 10 * 86_400;
    fake.set_created("rot", created as i64);
    fake.set_rotation_policy(
        "rot",
        serde_json::json!({
            "lifetimeActions": [
                {"trigger": {"timeAfterCreate": "P90D"}, "action": {"type": "Rotate"}},
                {"trigger": {"timeBeforeExpiry": "P30D"}, "action": {"type": "Notify"}}
            ],
            "attributes": {"expiryTime": "P2Y", "created": 1_700_000_000, "updated": 1_700_000_000}
        }),
    );
    fake.deny_rotation_policy("refused");
    // (TestServer gives it an ephemeral gRPC and admin listener.)
    let mut config = String::from("[azure]\n");
    for name in ["rot", "plain", "refused"] {
        config.push_str(&format!(
            "[keys.{name}]\nbackend = \"azure\"\nkey_id = \"{}\"\nrotation_state = true\n{}",
            fake.key_url(name),
            crate::support::allow_anonymous(name)
        ));
    }
    let s = TestServer::start(&config).await;
    let mut c = s.client().await;
    let keys = list_until(&mut c, "ListKeys shows the Key Vault rotation state", |k| {
        k.iter()
            .filter(|k| k.name != "refused")
            .all(|k| k.rotation_source == "azure")
    })
    .await;
    let r = keys.iter().find(|k| k.name == "rot").unwrap();
    assert_eq!(r.rotation_period, "90d");
    assert_eq!(
        keybroker::util::parse_rfc3339(&r.next_rotation_time),
        Some(SystemTime::UNIX_EPOCH + Duration::from_secs(created + 90 * 86_400)),
        "{}",
        r.next_rotation_time
    );
    assert_eq!(r.primary_version, format!("{}/{rot}", fake.key_url("rot")));
    let age = r.primary_age_seconds;
    assert!((10 * 86_400..10 * 86_400 + 3600).contains(&age), "{age}");
    let p = keys.iter().find(|k| k.name == "plain").unwrap();
    assert_eq!(
        (p.rotation_period.as_str(), p.next_rotation_time.as_str()),
        ("", "")
    );
    assert!(p.primary_age_seconds < 3600, "{}", p.primary_age_seconds);
    eventually("the refused key's policy GET", 20, async || {
        fake.policy_gets() >= 3
    })
    .await;
    serves(&mut c, "refused").await;
    let keys = c
        .list_keys(ListKeysRequest {})
        .await
        .unwrap()
        .into_inner()
        .keys;
    let x = keys.iter().find(|k| k.name == "refused").unwrap();
    assert_eq!(
        (x.rotation_source.as_str(), x.rotation_period.as_str()),
        ("", "")
    );
    // The same in /metrics: the period and the primary's age as gauges for "rot", no period
    // for "plain", nothing for the unknown "refused".
    let admin = s.running.as_ref().unwrap().admin_addr.unwrap().to_string();
    let (_, body) = crate::support::http_get(&admin, "/metrics").await;
    let gauge = |name: &str, key: &str| -> Option<f64> {
        body.lines().find_map(|l| {
            l.strip_prefix(name)
                .and_then(|rest| rest.strip_prefix(&format!("{{key=\"{key}\"")))
                .and_then(|rest| rest.rsplit(' ').next())
                .map(|v| v.parse().unwrap())
        })
    };
    let period = "keybroker_key_rotation_period_seconds";
    let age = "keybroker_key_primary_version_age_seconds";
    assert_eq!(gauge(period, "rot"), Some(90.0 * 86_400.0), "{body}");
    assert!(
        gauge(age, "rot").is_some_and(|a| a >= 10.0 * 86_400.0),
        "{body}"
    );
    assert_eq!(gauge(period, "plain"), None, "{body}");
    assert_eq!(
        (gauge(period, "refused"), gauge(age, "refused")),
        (None, None)
    );
    // One policy GET per key at startup, none on the request path.
    serves(&mut c, "rot").await;
    assert_eq!(fake.policy_gets(), 3);
    s.stop().await;
}

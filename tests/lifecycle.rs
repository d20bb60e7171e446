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

use crate::support::{TestServer, keybroker_bin, local_config, reason, success_and_output};

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
    success_and_output(
        Command::new(keybroker_bin())
            .args(["keys", "--keyring"])
            .arg(ring)
            .args(args)
            .output()
            .unwrap(),
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
    // Four runs at once (all spawned before any is waited for), once the key is due: one
    // rotates, the others find the new primary fresh. The period is long enough that a run the
    // loaded machine starts late still sees a fresh primary, never one due again.
    let (ok, out) = keys(&ring, &["create", "default", "--rotation-period", "4s"]);
    assert!(ok, "{out}");
    let (ok, out) = keys(&ring, &["rotate", "--if-due"]);
    assert!(ok && out.contains("no key is due"), "{out}");
    let (ok, out) = keys(&ring, &["list"]);
    assert!(
        ok && out.contains("4s") && out.contains("NEXT ROTATION"),
        "{out}"
    );
    std::thread::sleep(Duration::from_millis(4100));
    let children: Vec<_> = (0..4)
        .map(|_| {
            Command::new(keybroker_bin())
                .args(["keys", "--keyring"])
                .arg(&ring)
                .args(["rotate", "--if-due"])
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let runs: Vec<_> = children
        .into_iter()
        .map(|c| {
            c.wait_with_output().map(|o| {
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
    let keys = list_until(&mut c, "ListKeys shows the AWS rotation state", |keys| {
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
        keys = list_keys(c).await;
        done(&keys)
    })
    .await;
    keys
}

async fn list_keys(c: &mut Client) -> Vec<keybroker::proto::KeyInfo> {
    c.list_keys(ListKeysRequest {})
        .await
        .unwrap()
        .into_inner()
        .keys
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
    let keys = list_keys(&mut c).await;
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
    let keys = list_keys(&mut c).await;
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

/// Stops a server and keeps its directory (its audit log) for the assertions after.
async fn stop_keeping_dir(s: TestServer) -> tempfile::TempDir {
    let TestServer { running, dir, .. } = s;
    if let Some(r) = running {
        assert!(r.shutdown().await, "clean shutdown");
    }
    dir
}

/// The audit log's lifecycle records (`"kind":"lifecycle"`), in log order.
fn lifecycle_records(log: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["kind"] == "lifecycle")
        .collect()
}

/// `keybroker audit verify FILES…`: (success, output).
fn audit_verify(files: &[&Path]) -> (bool, String) {
    success_and_output(
        Command::new(keybroker_bin())
            .args(["audit", "verify"])
            .args(files)
            .output()
            .unwrap(),
    )
}

/// The fields a lifecycle record may carry: anything else (key material above all) fails.
fn assert_lifecycle_fields_only(v: &serde_json::Value) {
    const ALLOWED: &[&str] = &[
        "seq",
        "prev",
        "time",
        "kind",
        "event",
        "key",
        "backend",
        "keyring",
        "trigger",
        "old_primary_version",
        "new_primary_version",
        "old_min_decrypt_version",
        "new_min_decrypt_version",
        "deletion_time",
        "forced",
        "actor",
        "mac",
    ];
    for k in v.as_object().unwrap().keys() {
        assert!(ALLOWED.contains(&k.as_str()), "unexpected field {k} in {v}");
    }
    for k in v["actor"].as_object().unwrap().keys() {
        assert!(
            ["kind", "uid", "user", "pid"].contains(&k.as_str()),
            "unexpected actor field {k} in {v}"
        );
    }
}

/// The key material of every version in a keyring file, as the file spells it (to show it is
/// nowhere in the audit log).
fn key_material_strings(ring: &Path) -> Vec<String> {
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(ring).unwrap()).expect("a JSON keyring");
    let mut out = Vec::new();
    for k in v["keys"].as_object().unwrap().values() {
        for ver in k["versions"].as_array().unwrap() {
            out.push(ver["material"].as_str().unwrap().to_owned());
        }
    }
    out
}

/// A running server's scheduled rotation is written to the audit log as a lifecycle record
/// (old and new primary, the scheduler as actor) chained with the request records, and the
/// whole log verifies; the record holds no key material.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_rotation_is_audited_and_the_chain_verifies() {
    let s =
        TestServer::local("[local]\npoll_interval = \"100ms\"\n[audit]\npath = \"audit.jsonl\"\n")
            .await;
    let (ring, log) = (s.path("keyring"), s.path("audit.jsonl"));
    let mut c = s.client().await;
    assert_eq!(encrypt(&mut c, b"before").await.unwrap().1, "1");
    keyring::edit(&ring, false, |r| {
        r.set_rotation_period("default", Some(Duration::from_secs(1)))
    })
    .unwrap();
    eventually("the scheduler rotates to version 2", 20, async || {
        created_times(&ring).len() >= 2
    })
    .await;
    keyring::edit(&ring, false, |r| r.set_rotation_period("default", None)).unwrap();
    let versions = created_times(&ring).len() as u64;
    eventually("encrypt under the new primary", 10, async || {
        encrypt(&mut c, b"after").await.unwrap().1 == versions.to_string()
    })
    .await;
    let _dir = stop_keeping_dir(s).await;

    let records = lifecycle_records(&log);
    assert_eq!(
        records.len() as u64,
        versions - 1,
        "one record per rotation: {records:?} in {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    for (i, r) in records.iter().enumerate() {
        let i = i as u64;
        assert_eq!(r["event"], "rotated", "{r}");
        assert_eq!(r["key"], "default");
        assert_eq!(r["trigger"], "schedule");
        assert_eq!(r["old_primary_version"].as_u64(), Some(i + 1), "{r}");
        assert_eq!(r["new_primary_version"].as_u64(), Some(i + 2), "{r}");
        assert_eq!(r["actor"]["kind"], "scheduler");
        assert_eq!(
            r["actor"]["pid"].as_u64(),
            Some(u64::from(std::process::id()))
        );
        assert_lifecycle_fields_only(r);
    }
    let text = std::fs::read_to_string(&log).unwrap();
    let material = key_material_strings(&ring);
    assert!(!material.is_empty());
    for m in &material {
        assert!(!text.contains(m.as_str()), "key material in the audit log");
    }
    // Request records before and after the rotation, one chain.
    assert!(text.lines().count() as u64 > versions, "{text}");
    let (ok, out) = audit_verify(&[&log]);
    assert!(ok, "{out}");
}

/// `keybroker keys --config …` records rotate, set-min-decrypt-version, schedule-deletion,
/// cancel-deletion and purge in the configured audit log *while the server writes request
/// records into it*: appends are serialised by the log's lock and each writer continues the
/// other's chain, so `audit verify` accepts the whole log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_lifecycle_commands_are_audited() {
    let s = TestServer::local("[audit]\npath = \"audit.jsonl\"\n").await;
    let (ring, log, cfg) = (
        s.path("keyring"),
        s.path("audit.jsonl"),
        s.path("keybroker.toml"),
    );
    keyring::edit(&ring, false, |r| r.create_key("old")).unwrap();
    let mut c = s.client().await;
    encrypt(&mut c, b"x").await.unwrap();
    // Request records keep coming while the commands run (bounded: until they are done).
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let stop = std::sync::Arc::clone(&stop);
        let mut c = s.client().await;
        tokio::spawn(async move {
            let mut n = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && n < 20_000 {
                let _ = encrypt(&mut c, b"load").await;
                n += 1;
            }
            n
        })
    };
    let cli = |args: &'static [&'static str]| {
        let cfg = cfg.clone();
        move || {
            let out = Command::new(keybroker_bin())
                .args(["keys", "--keyring"])
                .arg(cfg.with_file_name("keyring"))
                .arg("--config")
                .arg(&cfg)
                .args(args)
                .output()
                .unwrap();
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            (out.status.success(), text)
        }
    };
    let run =
        async |args: &'static [&'static str]| tokio::task::spawn_blocking(cli(args)).await.unwrap();
    for args in [
        &["rotate", "default"][..],
        &["rotate", "--if-due"],
        &["set-min-decrypt-version", "default", "2"],
        &["set-min-decrypt-version", "default", "0"],
        &["schedule-deletion", "default", "--in", "7d", "--force"],
        &["cancel-deletion", "default"],
    ] {
        let (ok, out) = run(args).await;
        assert!(ok, "{args:?}: {out}");
    }
    // A key whose window has passed: `keys purge` destroys it.
    keyring::edit(&ring, false, |r| {
        r.keys.get_mut("old").unwrap().delete_after =
            Some(SystemTime::now() - Duration::from_secs(1));
        Ok(())
    })
    .unwrap();
    let (ok, out) = run(&["purge", "old"]).await;
    assert!(ok, "{out}");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let requests = load.await.unwrap();
    assert!(requests > 0);
    let _dir = stop_keeping_dir(s).await;

    let records = lifecycle_records(&log);
    let summary: Vec<(String, String)> = records
        .iter()
        .map(|r| {
            (
                r["event"].as_str().unwrap().to_owned(),
                r["key"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let expect = |e: &str, k: &str| (e.to_owned(), k.to_owned());
    assert_eq!(
        summary,
        vec![
            expect("rotated", "default"),
            expect("min_decrypt_version_set", "default"),
            expect("min_decrypt_version_set", "default"),
            expect("deletion_scheduled", "default"),
            expect("deletion_cancelled", "default"),
            expect("purged", "old"),
        ],
        "`rotate --if-due` with nothing due records nothing"
    );
    let uid = u64::from(rustix::process::getuid().as_raw());
    let ring_abs = std::fs::canonicalize(&ring).unwrap().display().to_string();
    for r in &records {
        assert_eq!(r["keyring"].as_str(), Some(ring_abs.as_str()), "{r}");
        assert_eq!(r["actor"]["kind"], "cli", "{r}");
        assert_eq!(r["actor"]["uid"].as_u64(), Some(uid), "{r}");
        assert_eq!(r["trigger"], "command");
        assert_lifecycle_fields_only(r);
    }
    assert_eq!(
        (
            records[0]["old_primary_version"].as_u64(),
            records[0]["new_primary_version"].as_u64()
        ),
        (Some(1), Some(2))
    );
    assert_eq!(
        (
            records[1]["old_min_decrypt_version"].as_u64(),
            records[1]["new_min_decrypt_version"].as_u64()
        ),
        (Some(0), Some(2))
    );
    assert_eq!(records[2]["new_min_decrypt_version"].as_u64(), Some(0));
    assert_eq!(records[3]["forced"], true);
    let at = keybroker::util::parse_rfc3339(records[3]["deletion_time"].as_str().unwrap())
        .expect("deletion_time is RFC 3339");
    let window = at.duration_since(SystemTime::now()).unwrap();
    assert!(window > Duration::from_secs(6 * 86400), "{window:?}");

    // Request and lifecycle records interleave in one chain that verifies.
    let text = std::fs::read_to_string(&log).unwrap();
    let kinds: Vec<bool> = text
        .lines()
        .map(|l| l.contains("\"kind\":\"lifecycle\""))
        .collect();
    let first = kinds.iter().position(|k| *k).unwrap();
    let last = kinds.iter().rposition(|k| *k).unwrap();
    assert!(
        kinds[first..last].iter().any(|k| !*k),
        "the server wrote request records between the commands' records"
    );
    let (ok, out) = audit_verify(&[&log]);
    assert!(ok, "{out}");
    for m in key_material_strings(&ring) {
        assert!(!text.contains(m.as_str()), "key material in the audit log");
    }

    // A log the command cannot write stops it before it changes anything.
    let bad = s_dir_config_with_unwritable_audit(&cfg);
    let before = Keyring::load(&ring).unwrap().keys["default"].primary;
    let out = Command::new(keybroker_bin())
        .args(["keys", "--keyring"])
        .arg(&ring)
        .arg("--config")
        .arg(&bad)
        .args(["rotate", "default"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("nothing was changed"), "{err}");
    assert_eq!(
        Keyring::load(&ring).unwrap().keys["default"].primary,
        before
    );
}

/// A copy of the configuration whose `[audit] key_file` does not exist.
fn s_dir_config_with_unwritable_audit(cfg: &Path) -> std::path::PathBuf {
    let text = std::fs::read_to_string(cfg).unwrap();
    let bad = cfg.with_file_name("bad.toml");
    std::fs::write(
        &bad,
        text.replace(
            "[audit]\n",
            "[audit]\nkey_file = \"/nonexistent/keybroker-audit.key\"\n",
        ),
    )
    .unwrap();
    bad
}

/// `audit report` lists lifecycle records in their own section (text) and array (JSON), and
/// does not count them as uses: the rows hold only requests, and a key that only rotated has
/// no last use (the deletion guard is not fooled either way).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_report_lists_lifecycle_events_apart_from_uses() {
    let s = TestServer::local("[audit]\npath = \"audit.jsonl\"\n").await;
    let (ring, log, cfg) = (
        s.path("keyring"),
        s.path("audit.jsonl"),
        s.path("keybroker.toml"),
    );
    keyring::edit(&ring, false, |r| r.create_key("idle")).unwrap();
    let mut c = s.client().await;
    for _ in 0..3 {
        encrypt(&mut c, b"x").await.unwrap();
    }
    let cli = |args: &[&str]| {
        let out = Command::new(keybroker_bin())
            .args(["keys", "--keyring"])
            .arg(&ring)
            .arg("--config")
            .arg(&cfg)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    cli(&["rotate", "default"]);
    cli(&["rotate", "idle"]);
    // `idle` has lifecycle records but no use: the guard lets it be scheduled without --force.
    cli(&["schedule-deletion", "idle", "--in", "7d"]);
    cli(&["cancel-deletion", "idle"]);
    eventually("3 request records", 10, async || {
        std::fs::read_to_string(&log).is_ok_and(|t| t.lines().count() >= 7)
    })
    .await;
    let _dir = stop_keeping_dir(s).await;

    let report = |args: &[&str]| {
        let out = Command::new(keybroker_bin())
            .args(["audit", "report"])
            .args(args)
            .arg(&log)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(0));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let out = report(&["--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["verified"], true);
    let rows = v["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 1, "only the encrypts are uses: {out}");
    assert_eq!(
        (rows[0]["operation"].as_str(), rows[0]["count"].as_u64()),
        (Some("encrypt"), Some(3))
    );
    let events: Vec<(&str, &str)> = v["lifecycle"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["key"].as_str().unwrap(), e["event"].as_str().unwrap()))
        .collect();
    assert_eq!(
        events,
        [
            ("default", "rotated"),
            ("idle", "rotated"),
            ("idle", "deletion_scheduled"),
            ("idle", "deletion_cancelled"),
        ]
    );
    assert_eq!(v["lifecycle"][0]["detail"], "primary 1 -> 2");
    assert!(
        v["lifecycle"][0]["actor"]
            .as_str()
            .unwrap()
            .starts_with("cli (uid "),
        "{out}"
    );
    let text = report(&[]);
    assert!(
        text.contains("lifecycle events (4; not uses of the key)"),
        "{text}"
    );
    assert!(text.contains("deletion scheduled"), "{text}");
    let table: Vec<&str> = text
        .lines()
        .skip_while(|l| !l.starts_with("KEY"))
        .skip(1)
        .take_while(|l| !l.is_empty())
        .collect();
    assert_eq!(table.len(), 1, "{text}");
}

/// `[keys.NAME] min_decrypt_version` on a Cloud KMS key: a ciphertext whose copy names
/// `…/cryptoKeyVersions/1` is refused once the minimum is 2 (FAILED_PRECONDITION,
/// KEY_VERSION_RETIRED, the version named), one under version 2 decrypts, ReEncrypt still moves
/// the old one forward, and ListKeys shows the minimum.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gcp_min_decrypt_version_refuses_older_versions() {
    use crate::support::gcp_fake::{self, GcpKmsFake};
    use keybroker::backend::gcp::GcpCredentials;
    let fake = GcpKmsFake::start().await;
    let key = fake.create_test_key("retire");
    let server = async |extra: &str| {
        let dir = tempfile::tempdir().unwrap();
        let text = format!(
            "[gcp]\nendpoint = \"{}\"\n[keys.default]\nbackend = \"gcp\"\nkey_id = \"{key}\"\n{extra}\n",
            fake.endpoint()
        );
        let mut config = keybroker::config::Config::parse(&text, "gcp.toml", dir.path())
            .unwrap_or_else(|e| panic!("{e}"));
        config.server.listen = vec![keybroker::config::ListenAddr::parse("127.0.0.1:0").unwrap()];
        config.gcp.credentials = GcpCredentials::Custom(gcp_fake::credentials());
        config.admin_listen = None;
        for k in config.keys.values_mut() {
            k.policy = keybroker::policy::Policy::allow_anonymous_everything();
        }
        TestServer::start_config(dir, config, Default::default()).await
    };
    let v1 = server("").await;
    let mut c = v1.client().await;
    let (old, version) = encrypt(&mut c, b"old data").await.unwrap();
    assert_eq!(version, format!("{key}/cryptoKeyVersions/1"));
    v1.stop().await;

    fake.rotate(&key);
    let s = server("min_decrypt_version = 2").await;
    let mut c = s.client().await;
    let (new, version) = encrypt(&mut c, b"new data").await.unwrap();
    assert_eq!(version, format!("{key}/cryptoKeyVersions/2"));
    assert_eq!(decrypt(&mut c, &new).await.unwrap().0, b"new data");
    let e = decrypt(&mut c, &old).await.unwrap_err();
    assert_eq!(
        (e.code(), reason(&e).as_str()),
        (tonic::Code::FailedPrecondition, "KEY_VERSION_RETIRED"),
        "{e:?}"
    );
    assert!(e.message().contains("version 1"), "{}", e.message());
    // ReEncrypt reads it (the plaintext stays inside) and writes it under version 2.
    let moved = c
        .re_encrypt(ReEncryptRequest {
            ciphertext: old.clone().into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        moved.key_version,
        format!("{key}/cryptoKeyVersions/2"),
        "{moved:?}"
    );
    assert_eq!(
        decrypt(&mut c, &moved.ciphertext).await.unwrap().0,
        b"old data"
    );
    let listed = c.list_keys(ListKeysRequest {}).await.unwrap().into_inner();
    assert_eq!(listed.keys[0].min_decrypt_version, "2");
    s.stop().await;
}

/// `min_decrypt_version` in the configuration is refused at load, with the reason, on keys
/// whose ciphertexts record no version keybroker can order (AWS: the key ARN only; Azure: an
/// opaque version id), on a multi-backend key with such a copy (it would bypass the
/// retirement), and on local keys (whose minimum lives in the keyring); GCP accepts it.
#[test]
fn min_decrypt_version_on_an_unordered_cloud_key_is_refused_at_load() {
    let dir = tempfile::tempdir().unwrap();
    let gcp_key = "projects/p/locations/global/keyRings/r/cryptoKeys/k";
    let parse = |keys: &str| {
        let text = format!(
            "[aws]\nregion = \"eu-west-1\"\n[gcp]\nendpoint = \"http://127.0.0.1:9\"\n{keys}"
        );
        keybroker::config::Config::parse(&text, "t.toml", dir.path()).map_err(|e| e.to_string())
    };
    let aws = parse("[keys.a]\nbackend = \"aws\"\nkey_id = \"alias/a\"\nmin_decrypt_version = 2\n")
        .unwrap_err();
    assert!(
        aws.contains("keys.a.min_decrypt_version")
            && aws.contains("AWS KMS ciphertexts do not say"),
        "{aws}"
    );
    let azure = parse(
        "[keys.z]\nbackend = \"azure\"\nkey_id = \"https://vault1.vault.azure.net/keys/k\"\nmin_decrypt_version = 2\n",
    )
    .unwrap_err();
    assert!(azure.contains("opaque ids with no order"), "{azure}");
    let local = parse(&format!(
        "[keys.l]\nbackend = \"local\"\nkey_id = \"l\"\nkeyring = \"{}/ring\"\nmin_decrypt_version = 2\n",
        dir.path().display()
    ))
    .unwrap_err();
    assert!(local.contains("keys set-min-decrypt-version"), "{local}");
    let mixed = parse(&format!(
        "[keys.m]\nmin_decrypt_version = 2\nwrap = [{{backend = \"gcp\", key_id = \"{gcp_key}\"}}, {{backend = \"aws\", key_id = \"alias/m\"}}]\n"
    ))
    .unwrap_err();
    assert!(mixed.contains("wrapped by aws"), "{mixed}");
    let zero = parse(&format!(
        "[keys.g]\nbackend = \"gcp\"\nkey_id = \"{gcp_key}\"\nmin_decrypt_version = 0\n"
    ))
    .unwrap_err();
    assert!(zero.contains("must be at least 1"), "{zero}");
    let ok = parse(&format!(
        "[keys.g]\nbackend = \"gcp\"\nkey_id = \"{gcp_key}\"\nmin_decrypt_version = 3\n"
    ))
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(ok.keys["g"].min_decrypt_version, Some(3));
}

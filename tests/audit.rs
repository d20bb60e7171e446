//! The audit log: a record per key use with the right fields, a hash chain that `audit verify`
//! checks (and that catches edits, deletions, reorders and insertions), rotation, restart,
//! fail-closed behaviour when the writer is stuck or failing, and no secrets anywhere.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use base64::Engine;
use keybroker::proto::{DecryptRequest, EncryptRequest, GenerateDataKeyRequest};
use serde_json::Value;
use tonic::Code;

use crate::policy::client_as;
use crate::support::{TestServer, keybroker_bin, reason, success_and_output};

fn records(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Waits (bounded) until the log holds `n` records.
async fn wait_records(path: &Path, n: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = records(path);
        if r.len() >= n {
            return r;
        }
        assert!(
            Instant::now() < deadline,
            "only {} of {n} audit records",
            r.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn verify(files: &[PathBuf]) -> (bool, String) {
    verify_args(&[], files)
}

/// `keybroker audit verify EXTRA... FILES...` (EXTRA: `--key F`, `--checkpoint F`).
fn verify_args(extra: &[&Path], files: &[PathBuf]) -> (bool, String) {
    let mut flags = Vec::new();
    for (i, p) in extra.iter().enumerate() {
        flags.push(if i == 0 { "--key" } else { "--checkpoint" }.to_owned());
        flags.push(p.display().to_string());
    }
    success_and_output(
        Command::new(keybroker_bin())
            .args(["audit", "verify"])
            .args(&flags)
            .args(files)
            .output()
            .unwrap(),
    )
}

/// `n` successful Encrypts of `payments` (plaintexts 0, 1, …): n records to find in the log.
async fn encrypt_payments(billing: &mut crate::policy::Client, n: u8) {
    for i in 0..n {
        billing
            .encrypt(EncryptRequest {
                key: "payments".into(),
                plaintext: vec![i].into(),
                context: BTreeMap::new(),
            })
            .await
            .unwrap();
    }
}

async fn audited_server(audit: &str) -> TestServer {
    let dir = tempfile::tempdir().unwrap();
    let text = crate::policy::config(dir.path()) + audit;
    TestServer::start_in(dir, &text).await
}

#[tokio::test]
async fn records_for_misses_hits_denials_and_errors() {
    let s = audited_server("[audit]\npath = \"audit.jsonl\"\n").await;
    let log = s.path("audit.jsonl");
    let mut billing = client_as(&s.addr, Some("tok-billing")).await;
    let mut reports = client_as(&s.addr, Some("tok-reports")).await;
    let ctx = crate::support::ctx(&[("order", "1234")]);
    let enc = |ctx: &BTreeMap<String, String>| EncryptRequest {
        key: "payments".into(),
        plaintext: b"secret payload".to_vec().into(),
        context: ctx.clone(),
    };
    let ct = billing
        .encrypt(enc(&ctx))
        .await
        .unwrap()
        .into_inner()
        .ciphertext; // miss
    billing.encrypt(enc(&ctx)).await.unwrap(); // hit
    reports.encrypt(enc(&ctx)).await.unwrap_err(); // denied
    reports
        .decrypt(DecryptRequest {
            ciphertext: ct.clone(),
            context: BTreeMap::new(),
        })
        .await
        .unwrap_err(); // wrong context
    billing
        .decrypt(DecryptRequest {
            ciphertext: b"junk".to_vec().into(),
            context: BTreeMap::new(),
        })
        .await
        .unwrap_err();
    let r = wait_records(&log, 5).await;
    assert_eq!(r.len(), 5);

    let miss = &r[0];
    assert_eq!(miss["seq"], 1);
    assert_eq!(miss["prev"], keybroker::audit::GENESIS);
    assert_eq!(miss["caller"], "billing");
    assert_eq!(miss["identified_by"], "bearer_token");
    assert_eq!(miss["operation"], "encrypt");
    assert_eq!(miss["key"], "payments");
    assert_eq!(miss["backend"], "local");
    assert_eq!(miss["backend_key_id"], "payments");
    assert_eq!(miss["key_version"], "1");
    assert_eq!(miss["result"], "OK");
    assert_eq!(miss["cache"], "miss");
    assert_eq!(miss["bytes"], 14);
    assert_eq!(
        miss["context_digest"],
        keybroker::audit::context_digest(&ctx)
    );
    assert!(
        miss.get("context").is_none(),
        "context values only when configured"
    );
    assert!(miss["latency_us"].as_u64().is_some());
    assert!(miss["request_id"].as_str().unwrap().len() > 8);
    let t = miss["time"].as_str().unwrap();
    assert!(
        t.ends_with('Z') && t.len() == "2026-11-29T23:45:08.123456Z".len(),
        "{t}"
    );

    assert_eq!(r[1]["cache"], "hit");
    assert_eq!(
        (
            r[2]["caller"].as_str(),
            r[2]["result"].as_str(),
            r[2]["reason"].as_str()
        ),
        (
            Some("reports"),
            Some("PERMISSION_DENIED"),
            Some("POLICY_DENIED")
        )
    );
    assert_eq!(
        r[2]["cache"],
        Value::Null,
        "a denial never touches the cache"
    );
    assert_eq!(
        (r[3]["operation"].as_str(), r[3]["reason"].as_str()),
        (Some("decrypt"), Some("DECRYPTION_FAILED"))
    );
    assert_eq!(r[3]["cache"], "hit");
    assert_eq!(
        (r[4]["reason"].as_str(), r[4]["key"].clone()),
        (Some("INVALID_CIPHERTEXT"), Value::Null)
    );

    let (ok, out) = verify(std::slice::from_ref(&log));
    assert!(ok, "{out}");
    assert!(out.contains("5 record(s)"), "{out}");
}

#[tokio::test]
async fn request_ids_from_the_client_are_kept() {
    let s = audited_server("[audit]\npath = \"audit.jsonl\"\n").await;
    let channel = keybroker::client::connect(&s.addr).await.unwrap();
    let mut c = keybroker::client::KeyBrokerClient::with_interceptor(
        channel,
        |mut req: tonic::Request<()>| {
            req.metadata_mut()
                .insert("authorization", "Bearer tok-billing".parse().unwrap());
            req.metadata_mut()
                .insert("x-request-id", "trace-abc-123".parse().unwrap());
            Ok(req)
        },
    );
    c.encrypt(EncryptRequest {
        key: "payments".into(),
        plaintext: b"x".to_vec().into(),
        context: BTreeMap::new(),
    })
    .await
    .unwrap();
    let r = wait_records(&s.path("audit.jsonl"), 1).await;
    assert_eq!(r[0]["request_id"], "trace-abc-123");
}

/// Edits, deletions, reorders and insertions are each caught, at the right place.
#[tokio::test]
async fn verify_catches_edit_delete_reorder_insert() {
    let s = audited_server("[audit]\npath = \"audit.jsonl\"\n").await;
    let mut billing = client_as(&s.addr, Some("tok-billing")).await;
    encrypt_payments(&mut billing, 8).await;
    let log = s.path("audit.jsonl");
    wait_records(&log, 8).await;
    let lines: Vec<String> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    let tampered = s.path("tampered.jsonl");
    let check = |lines: Vec<String>, want: &str| {
        std::fs::write(&tampered, lines.join("\n") + "\n").unwrap();
        let (ok, out) = verify(std::slice::from_ref(&tampered));
        assert!(!ok, "tampering not detected ({want}): {out}");
        assert!(out.contains(want), "expected {want:?} in: {out}");
    };
    // Edit record 4 (caller changed): the link from record 5 breaks.
    let mut edited = lines.clone();
    edited[3] = edited[3].replace("\"caller\":\"billing\"", "\"caller\":\"someone\"");
    assert_ne!(edited[3], lines[3]);
    check(edited, "tampered.jsonl:5 (seq 5)");
    // Delete record 3.
    let mut deleted = lines.clone();
    deleted.remove(2);
    check(deleted, "1 record(s) deleted");
    // Swap records 5 and 6.
    let mut reordered = lines.clone();
    reordered.swap(4, 5);
    check(reordered, "reordered");
    // Insert a forged record after record 2, with a plausible seq and prev.
    let mut inserted = lines.clone();
    let mut forged: Value = serde_json::from_str(&lines[1]).unwrap();
    forged["seq"] = 3.into();
    forged["request_id"] = "forged".into();
    inserted.insert(2, forged.to_string());
    check(inserted, "tampered.jsonl:3");
    // The untouched log still verifies.
    assert!(verify(&[log]).0);
}

/// The chain continues across rotated files and across a restart.
#[tokio::test]
async fn the_chain_continues_across_rotation_and_restart() {
    let audit = "[audit]\npath = \"audit.jsonl\"\nmax_file_size = \"4KiB\"\nmax_files = 50\n";
    let dir = tempfile::tempdir().unwrap();
    let text = crate::policy::config(dir.path()) + audit;
    let s = TestServer::start_in(dir, &text).await;
    let mut billing = client_as(&s.addr, Some("tok-billing")).await;
    encrypt_payments(&mut billing, 40).await;
    // Restart: a new server on the same directory continues the same log.
    let mut s = s;
    s.running.take().unwrap().shutdown().await;
    let keep = std::mem::replace(&mut s.dir, tempfile::tempdir().unwrap());
    let s2 = TestServer::start_in(keep, &text).await;
    let mut billing = client_as(&s2.addr, Some("tok-billing")).await;
    encrypt_payments(&mut billing, 5).await;
    let mut s2 = s2;
    s2.running.take().unwrap().shutdown().await;
    let dir = s2.dir.path().to_owned();
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("audit.jsonl.")
        })
        .collect();
    assert!(
        files.len() >= 3,
        "expected several rotated files, got {files:?}"
    );
    // Oldest first: highest suffix first.
    files.sort_by_key(|p| {
        std::cmp::Reverse(
            p.extension()
                .unwrap()
                .to_string_lossy()
                .parse::<u32>()
                .unwrap(),
        )
    });
    files.push(dir.join("audit.jsonl"));
    let (ok, out) = verify(&files);
    assert!(ok, "{out}");
    assert!(out.contains("45 record(s), seq 1..45"), "{out}");
    // A file missing from the middle is a broken link.
    let mut gap = files.clone();
    gap.remove(1);
    let (ok, out) = verify(&gap);
    assert!(!ok && out.contains("deleted"), "{out}");
}

/// Past `max_files` the oldest file goes (its blocks are freed off the writer thread, which
/// holds it open until then): exactly the newest files are left, each whole, and they verify
/// as a chain whose start was rotated away, ending at the last request.
#[tokio::test]
async fn rotation_keeps_max_files_and_drops_the_oldest() {
    let audit = "[audit]\npath = \"audit.jsonl\"\nmax_file_size = \"4KiB\"\nmax_files = 2\n";
    let dir = tempfile::tempdir().unwrap();
    let text = crate::policy::config(dir.path()) + audit;
    let mut s = TestServer::start_in(dir, &text).await;
    let mut billing = client_as(&s.addr, Some("tok-billing")).await;
    encrypt_payments(&mut billing, 60).await;
    s.running.take().unwrap().shutdown().await;
    let dir = s.dir.path().to_owned();
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("audit.jsonl"))
        .collect();
    names.sort();
    assert_eq!(names, ["audit.jsonl", "audit.jsonl.1", "audit.jsonl.2"]);
    let files: Vec<PathBuf> = ["audit.jsonl.2", "audit.jsonl.1", "audit.jsonl"]
        .iter()
        .map(|n| dir.join(n))
        .collect();
    let (ok, out) = verify(&files);
    assert!(ok, "{out}");
    let kept: Vec<Value> = files.iter().flat_map(|f| records(f)).collect();
    assert!(kept[0]["seq"].as_u64().unwrap() > 1, "nothing was dropped");
    assert_eq!(kept.last().unwrap()["seq"], 60);
    for f in &files {
        let len = std::fs::metadata(f).unwrap().len();
        assert!(len > 0 && len <= 4096, "{}: {len} bytes", f.display());
    }
}

/// The writer is stuck (a pipe nobody reads): once the queue is full, requests fail with
/// AUDIT_UNAVAILABLE instead of going unaudited, and recover when the writer can write again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocked_writer_refuses_key_use() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("audit.pipe");
    assert!(
        Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    // Hold the read end open without reading (a pipe holds 64 KiB, then writes block).
    let reader_path = fifo.clone();
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let reader = std::thread::spawn(move || {
        let mut f = std::fs::File::open(&reader_path).unwrap();
        rx.recv().unwrap();
        let mut sink = String::new();
        let _ = f.read_to_string(&mut sink);
        sink.lines().map(str::to_owned).collect::<Vec<_>>()
    });
    let text = crate::policy::config(dir.path())
        + "[audit]\npath = \"audit.pipe\"\nqueue = 4\nblock_timeout = \"50ms\"\n";
    let s = TestServer::start_in(dir, &text).await;
    let mut billing = client_as(&s.addr, Some("tok-billing")).await;
    let mut refused = None;
    for i in 0..2_000 {
        match billing
            .encrypt(EncryptRequest {
                key: "payments".into(),
                plaintext: vec![1; 64].into(),
                context: BTreeMap::new(),
            })
            .await
        {
            Ok(_) => {}
            Err(e) => {
                refused = Some((i, e));
                break;
            }
        }
    }
    let (after, e) = refused.expect("requests kept succeeding with the audit writer stuck");
    assert!(after > 10, "refused too early ({after})");
    assert_eq!(
        (e.code(), reason(&e).as_str()),
        (Code::Unavailable, "AUDIT_UNAVAILABLE")
    );
    // The queue's figures (what /metrics shows) say why: all 4 slots taken, the most ever, and
    // this refusal counted.
    let auditor = &s.running.as_ref().unwrap().audit;
    assert_eq!(auditor.queue_depth(), (4, 4, 4));
    assert!(auditor.refused() >= 1, "refusals {}", auditor.refused());
    tx.send(()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if billing
            .encrypt(EncryptRequest {
                key: "payments".into(),
                plaintext: vec![1; 64].into(),
                context: BTreeMap::new(),
            })
            .await
            .is_ok()
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "did not recover after the reader drained the pipe"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    s.stop().await;
    // Every request that succeeded has its record in what went through the pipe: the ones
    // before the refusal and the one after recovery. The refused one has none.
    let lines = reader.join().unwrap();
    let ok = lines
        .iter()
        .filter(|l| l.contains("\"result\":\"OK\""))
        .count();
    assert_eq!(ok, after + 1, "acknowledged requests vs records");
}

/// A writer that cannot write at all (a full disk: /dev/full) refuses key use; best-effort mode
/// instead serves and counts the dropped records.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_writer_refuses_key_use_unless_best_effort() {
    let s = audited_server("[audit]\npath = \"/dev/full\"\n").await;
    let mut billing = client_as(&s.addr, Some("tok-billing")).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let e = loop {
        match billing
            .encrypt(EncryptRequest {
                key: "payments".into(),
                plaintext: b"x".to_vec().into(),
                context: BTreeMap::new(),
            })
            .await
        {
            Err(e) => break e,
            Ok(_) => {
                assert!(
                    Instant::now() < deadline,
                    "the failing writer was not noticed"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    assert_eq!(
        (e.code(), reason(&e).as_str()),
        (Code::Unavailable, "AUDIT_UNAVAILABLE")
    );

    let s =
        audited_server("[audit]\npath = \"/dev/full\"\nmode = \"best_effort\"\nqueue = 1\n").await;
    let mut billing = client_as(&s.addr, Some("tok-billing")).await;
    for _ in 0..200 {
        billing
            .encrypt(EncryptRequest {
                key: "payments".into(),
                plaintext: b"x".to_vec().into(),
                context: BTreeMap::new(),
            })
            .await
            .expect("best-effort mode serves even when records are dropped");
    }
    assert!(s.running.as_ref().unwrap().audit.dropped() > 0);
}

/// One whole run of the binary with debug JSON logs and a file audit log: none of the
/// plaintexts, data keys, key-encryption keys or tokens used appears in any output.
#[tokio::test]
async fn no_secret_reaches_logs_or_the_audit_log() {
    let dir = tempfile::tempdir().unwrap();
    let audit_key: Vec<u8> = (0..32u8)
        .map(|i| i.wrapping_mul(91).wrapping_add(7))
        .collect();
    std::fs::write(dir.path().join("audit.key"), &audit_key).unwrap();
    let text = crate::policy::config(dir.path())
        + "[audit]\npath = \"audit.jsonl\"\ninclude_context_values = true\nkey_file = \"audit.key\"\ncheckpoint_file = \"audit.checkpoint\"\n[log]\nformat = \"json\"\nlevel = \"debug\"\n";
    std::fs::write(dir.path().join("kb.toml"), &text).unwrap();
    let serve = crate::support::ServeProcess::start(
        dir.path(),
        &["--config", "kb.toml", "--listen", "127.0.0.1:0"],
        &[],
    );
    let mut billing = client_as(&serve.addr, Some("tok-billing")).await;
    let plaintexts: Vec<Vec<u8>> = vec![
        b"PLAINTEXT-MARKER-the quick brown fox".to_vec(),
        (0..64u8)
            .map(|i| i.wrapping_mul(37).wrapping_add(11))
            .collect(),
    ];
    let mut data_keys = Vec::new();
    for p in &plaintexts {
        let ct = billing
            .encrypt(EncryptRequest {
                key: "payments".into(),
                plaintext: p.clone().into(),
                context: BTreeMap::new(),
            })
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
        let _ = billing
            .decrypt(DecryptRequest {
                ciphertext: ct,
                context: crate::support::ctx(&[("x", "y")]),
            })
            .await;
    }
    for spec in [1, 2] {
        let dk = billing
            .generate_data_key(GenerateDataKeyRequest {
                key: "payments".into(),
                spec,
                context: BTreeMap::new(),
            })
            .await
            .unwrap()
            .into_inner();
        data_keys.push(dk.plaintext_key.to_vec());
    }
    let mut bad = client_as(&serve.addr, Some("tok-not-valid-marker")).await;
    let _ = bad
        .encrypt(EncryptRequest {
            key: "payments".into(),
            plaintext: b"x".to_vec().into(),
            context: BTreeMap::new(),
        })
        .await;
    serve.signal("TERM");
    let (status, stderr) = serve.wait(Duration::from_secs(15)).await;
    assert!(status.success());

    let ring: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("keyring")).unwrap())
            .unwrap();
    let mut keks = Vec::new();
    for k in ring["keys"].as_object().unwrap().values() {
        for v in k["versions"].as_array().unwrap() {
            keks.push(
                base64::engine::general_purpose::STANDARD
                    .decode(v["material"].as_str().unwrap())
                    .unwrap(),
            );
        }
    }
    let audit = std::fs::read(dir.path().join("audit.jsonl")).unwrap();
    assert!(audit.len() > 500, "the audit log has the run's records");
    assert!(
        stderr.contains("\"request_id\""),
        "debug JSON logs carry request ids:\n{stderr}"
    );
    let checkpoint = std::fs::read(dir.path().join("audit.checkpoint")).unwrap();
    let outputs: Vec<(&str, Vec<u8>)> = vec![
        ("stderr log", stderr.into_bytes()),
        ("audit log", audit),
        ("audit checkpoint", checkpoint),
    ];
    let mut secrets: Vec<(String, Vec<u8>)> = Vec::new();
    for (i, p) in plaintexts.iter().enumerate() {
        secrets.push((format!("plaintext {i}"), p.clone()));
    }
    for (i, k) in data_keys.iter().chain(keks.iter()).enumerate() {
        secrets.push((format!("key {i}"), k.clone()));
    }
    secrets.push(("audit key".into(), audit_key.clone()));
    for t in [
        "tok-billing",
        "tok-reports",
        "tok-rekeyer",
        "tok-not-valid-marker",
    ] {
        secrets.push((format!("token {t}"), t.as_bytes().to_vec()));
    }
    for (name, secret) in &secrets {
        let hex: String = secret.iter().map(|b| format!("{b:02x}")).collect();
        let forms = [
            secret.clone(),
            hex.into_bytes(),
            base64::engine::general_purpose::STANDARD
                .encode(secret)
                .into_bytes(),
            format!("{secret:?}")
                .trim_matches(['[', ']'])
                .as_bytes()
                .to_vec(),
        ];
        for (what, out) in &outputs {
            for f in &forms {
                let found = f.len() >= 8 && out.windows(f.len()).any(|w| w == f.as_slice());
                assert!(!found, "{name} appears in the {what}");
            }
        }
    }
}

/// Issue 21 item 9. The unkeyed chain can be recomputed by anyone who can write the file; a keyed
/// log (`key_file`) cannot: every record carries an HMAC over its own bytes (which include the
/// previous record's MAC), so an edit anywhere, the last record included, a forged record, or a
/// log recomputed as an unkeyed chain are each refused by `verify --key`. Tail truncation leaves
/// a valid chain; the checkpoint file catches it.
#[tokio::test]
async fn a_keyed_log_resists_rewriting_and_the_checkpoint_catches_truncation() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("audit.key");
    let out = Command::new(keybroker_bin())
        .args(["audit", "new-key"])
        .arg(&key)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    {
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::metadata(&key).unwrap();
        assert_eq!((meta.len(), meta.permissions().mode() & 0o777), (32, 0o600));
    }
    let again = Command::new(keybroker_bin())
        .args(["audit", "new-key"])
        .arg(&key)
        .output()
        .unwrap();
    assert!(!again.status.success(), "new-key must not overwrite a key");
    std::fs::create_dir(dir.path().join("state")).unwrap();
    let text = crate::policy::config(dir.path())
        + "[audit]\npath = \"audit.jsonl\"\nkey_file = \"audit.key\"\ncheckpoint_file = \"state/audit.checkpoint\"\n";
    let mut s = TestServer::start_in(dir, &text).await;
    let mut billing = client_as(&s.addr, Some("tok-billing")).await;
    for i in 0..8u8 {
        billing
            .encrypt(EncryptRequest {
                key: "payments".into(),
                plaintext: vec![i].into(),
                context: crate::support::ctx(&[("tenant", "acme")]),
            })
            .await
            .unwrap();
    }
    s.running.take().unwrap().shutdown().await;
    let log = s.path("audit.jsonl");
    let checkpoint = s.path("state/audit.checkpoint");
    let lines: Vec<String> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(lines.len(), 8);
    for l in &lines {
        let v: Value = serde_json::from_str(l).unwrap();
        assert_eq!(v["mac"].as_str().unwrap().len(), 64, "{l}");
    }
    let (ok, out) = verify_args(&[&key, &checkpoint], std::slice::from_ref(&log));
    assert!(ok, "{out}");
    assert!(
        out.contains("8 record(s) authenticated by their MAC"),
        "{out}"
    );
    assert!(out.contains("checkpoint seq 8"), "{out}");
    // Without the key, a keyed log is not passed as if it were checked.
    let (ok, out) = verify(std::slice::from_ref(&log));
    assert!(!ok && out.contains("--key"), "{out}");

    let tampered = s.path("tampered.jsonl");
    let check = |lines: &[String], extra: &[&Path], want: &str| {
        std::fs::write(&tampered, lines.join("\n") + "\n").unwrap();
        let (ok, out) = verify_args(extra, std::slice::from_ref(&tampered));
        assert!(!ok, "not detected ({want}): {out}");
        assert!(out.contains(want), "expected {want:?} in: {out}");
    };
    // The last record edited: an unkeyed chain cannot see this (nothing links to it).
    let mut last_edited = lines.clone();
    last_edited[7] = last_edited[7].replace("\"caller\":\"billing\"", "\"caller\":\"someone\"");
    assert_ne!(last_edited[7], lines[7]);
    check(
        &last_edited,
        &[&key],
        "tampered.jsonl:8 (seq 8): the record's MAC does not verify",
    );
    // A writer without the key rewrites the whole log as a consistent unkeyed chain, with one
    // record removed from the middle and the seqs renumbered.
    let mut rewritten = Vec::new();
    let mut prev = keybroker::audit::GENESIS.to_owned();
    for (_, l) in lines.iter().enumerate().filter(|(i, _)| *i != 3) {
        let mut v: Value = serde_json::from_str(l).unwrap();
        v.as_object_mut().unwrap().remove("mac");
        v["seq"] = (rewritten.len() as u64 + 1).into();
        v["prev"] = prev.clone().into();
        let line = v.to_string();
        prev = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, line.as_bytes())
            .as_ref()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        rewritten.push(line);
    }
    std::fs::write(&tampered, rewritten.join("\n") + "\n").unwrap();
    assert!(
        verify(std::slice::from_ref(&tampered)).0,
        "a consistent unkeyed chain"
    );
    check(&rewritten, &[&key], "no record carries a MAC");
    // A forged record appended after the last one (its MAC made up).
    let mut appended = lines.clone();
    let mut forged: Value = serde_json::from_str(&lines[7]).unwrap();
    forged["seq"] = 9.into();
    forged["prev"] = forged["mac"].clone();
    forged["mac"] = "00".repeat(32).into();
    appended.push(forged.to_string());
    check(&appended, &[&key], "tampered.jsonl:9 (seq 9)");
    // Verified under another key: every MAC fails.
    let other_key = s.path("other.key");
    std::fs::write(&other_key, [9u8; 32]).unwrap();
    check(&lines, &[&other_key], "tampered.jsonl:1 (seq 1)");
    // The tail cut off: still a valid chain (the limit of any chain)...
    let truncated = lines[..5].to_vec();
    std::fs::write(&tampered, truncated.join("\n") + "\n").unwrap();
    assert!(verify_args(&[&key], std::slice::from_ref(&tampered)).0);
    // ...but not past the checkpoint.
    check(
        &truncated,
        &[&key, &checkpoint],
        "records were removed from the end",
    );
    // A checkpoint edited to name an earlier point fails its own MAC.
    let text = std::fs::read_to_string(&checkpoint).unwrap();
    let v: Value = serde_json::from_str(text.trim()).unwrap();
    assert_eq!(v["seq"], 8);
    let forged_cp = s.path("forged.checkpoint");
    std::fs::write(&forged_cp, text.replace("\"seq\":8", "\"seq\":5")).unwrap();
    check(&truncated, &[&key, &forged_cp], "MAC does not verify");
    // A deleted checkpoint is reported, not ignored.
    check(&lines, &[&key, &s.path("state/missing")], "does not exist");
}

/// With a key, `context_digest` is an HMAC under a key derived from the audit key (low-entropy
/// context values cannot be recovered by hashing guesses); `audit context-digest` computes it
/// for lookups. Without a key it stays the plain SHA-256 (documented).
#[tokio::test]
async fn keyed_context_digests_are_hmacs() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("audit.key"), [42u8; 32]).unwrap();
    let text = crate::policy::config(dir.path())
        + "[audit]\npath = \"audit.jsonl\"\nkey_file = \"audit.key\"\n";
    let s = TestServer::start_in(dir, &text).await;
    let mut billing = client_as(&s.addr, Some("tok-billing")).await;
    let context = crate::support::ctx(&[("tenant", "acme"), ("pin", "1234")]);
    billing
        .encrypt(EncryptRequest {
            key: "payments".into(),
            plaintext: b"x".to_vec().into(),
            context: context.clone(),
        })
        .await
        .unwrap();
    let r = wait_records(&s.path("audit.jsonl"), 1).await;
    let digest = r[0]["context_digest"].as_str().unwrap().to_owned();
    assert_ne!(
        digest,
        keybroker::audit::context_digest(&context),
        "not the plain SHA-256"
    );
    let out = Command::new(keybroker_bin())
        .args(["audit", "context-digest", "--key"])
        .arg(s.path("audit.key"))
        .args(["--context", "pin=1234", "--context", "tenant=acme"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), digest);
}

/// A log that was unkeyed and then configured with a key: the unkeyed records are bound by the
/// hash chain into the first record's MAC, so editing them is caught too; a record without a MAC
/// after keyed ones is refused.
#[tokio::test]
async fn an_unkeyed_log_continues_as_a_keyed_one() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("audit.key"), [5u8; 40]).unwrap();
    let base = crate::policy::config(dir.path()) + "[audit]\npath = \"audit.jsonl\"\n";
    let encrypt3 = async |s: &TestServer| {
        let mut billing = client_as(&s.addr, Some("tok-billing")).await;
        for _ in 0..3 {
            billing
                .encrypt(EncryptRequest {
                    key: "payments".into(),
                    plaintext: b"x".to_vec().into(),
                    context: BTreeMap::new(),
                })
                .await
                .unwrap();
        }
    };
    let mut s = TestServer::start_in(dir, &base).await;
    encrypt3(&s).await;
    s.running.take().unwrap().shutdown().await;
    let keep = std::mem::replace(&mut s.dir, tempfile::tempdir().unwrap());
    let mut s = TestServer::start_in(keep, &(base.clone() + "key_file = \"audit.key\"\n")).await;
    encrypt3(&s).await;
    s.running.take().unwrap().shutdown().await;
    let log = s.path("audit.jsonl");
    let key = s.path("audit.key");
    let (ok, out) = verify_args(&[&key], std::slice::from_ref(&log));
    assert!(ok, "{out}");
    assert!(out.contains("3 record(s) authenticated"), "{out}");
    assert!(out.contains("3 unkeyed record(s) before them"), "{out}");
    let lines: Vec<String> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    let tampered = s.path("tampered.jsonl");
    let mut edited = lines.clone();
    edited[1] = edited[1].replace("\"billing\"", "\"someone\"");
    std::fs::write(&tampered, edited.join("\n") + "\n").unwrap();
    let (ok, out) = verify_args(&[&key], std::slice::from_ref(&tampered));
    assert!(!ok && out.contains("tampered.jsonl:3"), "{out}");
    // An unkeyed record slipped in after the keyed ones.
    let mut inserted = lines.clone();
    let mut plain: Value = serde_json::from_str(&lines[5]).unwrap();
    plain.as_object_mut().unwrap().remove("mac");
    plain["seq"] = 7.into();
    plain["prev"] = serde_json::from_str::<Value>(&lines[5]).unwrap()["mac"].clone();
    inserted.push(plain.to_string());
    std::fs::write(&tampered, inserted.join("\n") + "\n").unwrap();
    let (ok, out) = verify_args(&[&key], std::slice::from_ref(&tampered));
    assert!(
        !ok && out.contains("without a MAC follows keyed records"),
        "{out}"
    );
}

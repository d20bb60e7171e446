//! Key rotation on a running server, and crash safety of keyring edits under SIGKILL.

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use keybroker::keyring::Keyring;
use keybroker::proto::{DecryptRequest, EncryptRequest};

use crate::support::{TestServer, keybroker_bin, local_config};

async fn encrypt(
    c: &mut keybroker::client::KeyBrokerClient<tonic::transport::Channel>,
    msg: &[u8],
) -> (Vec<u8>, String) {
    let r = c
        .encrypt(EncryptRequest {
            key: "default".into(),
            plaintext: msg.to_vec().into(),
            context: BTreeMap::new(),
        })
        .await
        .unwrap()
        .into_inner();
    (r.ciphertext.to_vec(), r.key_version)
}

#[tokio::test]
async fn rotation_is_seen_without_restart_and_old_data_still_decrypts() {
    let server = TestServer::local("[local]\npoll_interval = \"100ms\"").await;
    let mut c = server.client().await;
    let (old_ct, v) = encrypt(&mut c, b"before rotation").await;
    assert_eq!(v, "1");

    // Rotate with the admin command, as an operator would.
    let out = Command::new(keybroker_bin())
        .args(["keys", "--keyring"])
        .arg(server.path("keyring"))
        .args(["rotate", "default"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("version 2"));

    let deadline = Instant::now() + Duration::from_secs(10);
    let new_ct = loop {
        let (ct, v) = encrypt(&mut c, b"after rotation").await;
        if v == "2" {
            break ct;
        }
        assert!(
            Instant::now() < deadline,
            "new data still under version {v} after 10 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    for (ct, want, version) in [
        (old_ct, &b"before rotation"[..], "1"),
        (new_ct, &b"after rotation"[..], "2"),
    ] {
        let r = c
            .decrypt(DecryptRequest {
                ciphertext: ct.into(),
                context: BTreeMap::new(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.plaintext.as_ref(), want);
        assert_eq!(r.key_version, version);
    }
    server.stop().await;
}

/// A decrypt naming a version the server has not loaded yet (rotated a moment ago by another
/// process, before the next poll) re-reads the keyring instead of failing.
#[tokio::test]
async fn decrypt_of_a_just_rotated_version_reloads_on_demand() {
    let a = TestServer::local("[local]\npoll_interval = \"1h\"").await;
    let keyring = a.path("keyring");
    keybroker::keyring::edit(&keyring, false, |r| r.rotate_key("default")).unwrap();
    // A second server on the same keyring started after the rotation makes a version-2 ciphertext.
    let b = TestServer::start(
        &local_config("").replace("{dir}/keyring", &keyring.display().to_string()),
    )
    .await;
    let mut cb = b.client().await;
    let (ct, v) = encrypt(&mut cb, b"v2 data").await;
    assert_eq!(v, "2");
    let mut ca = a.client().await;
    let r = ca
        .decrypt(DecryptRequest {
            ciphertext: ct.into(),
            context: BTreeMap::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.plaintext.as_ref(), b"v2 data");
}

/// Kills `keys rotate` with SIGKILL at random moments; after each kill the keyring must load and
/// hold every version it held before, with unchanged material. Afterwards, once the next rotate
/// (and a server start) has run, no file but the keyring holds key material: a kill can land
/// between a write's naming of its temporary copy and its rename, and those copies are removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_rotation_never_tears_loses_versions_or_leaves_key_material() {
    let dir = tempfile::tempdir().unwrap();
    let ring = dir.path().join("keyring");
    keybroker::keyring::edit(&ring, true, |r| r.create_key("k")).unwrap();
    let versions = |ring: &Keyring| -> BTreeMap<u32, Vec<u8>> {
        ring.keys["k"]
            .versions
            .iter()
            .map(|(v, kv)| (*v, kv.material().as_ref().to_vec()))
            .collect()
    };
    let rotate = || {
        Command::new(keybroker_bin())
            .args(["keys", "--keyring"])
            .arg(&ring)
            .args(["rotate", "k"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    // How long one rotation takes, to spread kill moments over its whole life (the slowest of
    // three; adjusted below when the machine's load changes it).
    let mut span = 1u64;
    for _ in 0..3 {
        let t0 = Instant::now();
        assert!(rotate().wait().unwrap().success());
        span = span.max(t0.elapsed().as_micros() as u64 + 1);
    }

    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut completed = 0;
    let mut killed = 0;
    for i in 1..=200 {
        let before = versions(&Keyring::load(&ring).unwrap());
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let delay = Duration::from_micros(seed % (span + span / 3));
        let mut child = rotate();
        std::thread::sleep(delay);
        let _ = child.kill(); // SIGKILL
        let status = child.wait().unwrap();
        if status.success() {
            completed += 1;
        } else {
            killed += 1;
        }
        // Keep both outcomes common: most kills should land inside a rotation, some after.
        if i % 10 == 0 {
            if completed * 8 < i {
                span += span / 4;
            } else if killed * 8 < i {
                span -= span / 5;
            }
        }
        let after = Keyring::load(&ring)
            .unwrap_or_else(|e| panic!("keyring torn after kill at {delay:?}: {e}"));
        let after_v = versions(&after);
        for (v, material) in &before {
            assert_eq!(
                after_v.get(v),
                Some(material),
                "version {v} lost or changed"
            );
        }
        assert!(after_v.len() == before.len() || after_v.len() == before.len() + 1);
        assert!(after_v.contains_key(&after.keys["k"].primary));
    }
    assert!(
        killed > 10 && completed > 10,
        "kills landed badly: {killed} killed, {completed} completed"
    );
    let temporaries = || -> Vec<std::path::PathBuf> {
        std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| {
                p.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with(".keyring.tmp.")
            })
            .collect()
    };
    eprintln!(
        "{killed} killed, {completed} completed; {} temporary file(s) before the next write",
        temporaries().len()
    );
    // The next rotate removes what killed writes left, under the keyring lock.
    assert!(rotate().wait().unwrap().success());
    assert_eq!(temporaries(), Vec::<std::path::PathBuf>::new());
    // No other file holds any version's material, in any form the keyring writes it.
    use base64::Engine;
    let ring_now = Keyring::load(&ring).unwrap();
    let materials: Vec<String> = versions(&ring_now)
        .values()
        .map(|m| base64::engine::general_purpose::STANDARD.encode(m))
        .collect();
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let path = entry.unwrap().path();
        if path == ring {
            continue;
        }
        let bytes = std::fs::read(&path).unwrap();
        let text = String::from_utf8_lossy(&bytes);
        for m in &materials {
            assert!(
                !text.contains(m.as_str()),
                "{} holds key material",
                path.display()
            );
        }
    }

    // A server start removes them too (a write killed by a crash of `keys` long ago).
    let stale = dir.path().join(".keyring.tmp.4242");
    std::fs::copy(&ring, &stale).unwrap();
    let config = format!(
        "[keys.k]\nbackend = \"local\"\nkey_id = \"k\"\nkeyring = \"{}\"\n",
        ring.display()
    );
    let server = TestServer::start(&config).await;
    assert!(!stale.exists(), "the server start left {}", stale.display());
    server.stop().await;
}

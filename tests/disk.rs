//! Disk full and read-only (issue 20 item 5): the audit log and the keyring on a small tmpfs
//! mounted for the test (tests and CI run as root; where mounting is not permitted the tests
//! say so and skip). Required audit mode fails closed with AUDIT_UNAVAILABLE while the disk is
//! full, a keyring rotation into a full or read-only filesystem fails and leaves the old keyring
//! byte for byte, and service resumes (with an intact audit chain holding every served request)
//! once space returns.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use keybroker::proto;
use tonic::Code;

use crate::support::{TestServer, allow_anonymous, reason};

/// A tmpfs of `size` mounted on a fresh directory; unmounted on drop.
struct Tmpfs {
    dir: tempfile::TempDir,
    mnt: PathBuf,
}

impl Tmpfs {
    /// `None` (with the reason printed) where this process may not mount.
    fn mount(size: &str) -> Option<Self> {
        let dir = tempfile::tempdir().unwrap();
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(&mnt)
            .output();
        match out {
            Ok(o) if o.status.success() => Some(Self { dir, mnt }),
            Ok(o) => {
                eprintln!(
                    "SKIPPED: cannot mount a tmpfs here (not root, or no CAP_SYS_ADMIN): {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                );
                None
            }
            Err(e) => {
                eprintln!("SKIPPED: no mount command: {e}");
                None
            }
        }
    }

    fn remount(&self, opts: &str) {
        let ok = Command::new("mount")
            .args(["-o", &format!("remount,{opts}")])
            .arg(&self.mnt)
            .status()
            .unwrap()
            .success();
        assert!(ok, "remount {opts}");
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
        let _ = &self.dir;
    }
}

/// Fills the filesystem at `dir` with one file until ENOSPC; returns the file.
fn fill(dir: &Path) -> PathBuf {
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).unwrap();
    let chunk = vec![0u8; 4096];
    loop {
        match f.write(&chunk) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(28) => break, // ENOSPC
            Err(e) => panic!("filling {}: {e}", dir.display()),
        }
    }
    let _ = f.flush();
    path
}

async fn encrypt(server: &TestServer, plaintext: &[u8]) -> Result<(), tonic::Status> {
    server
        .client()
        .await
        .encrypt(proto::EncryptRequest {
            key: "default".into(),
            plaintext: plaintext.to_vec().into(),
            context: BTreeMap::new(),
        })
        .await
        .map(|_| ())
}

/// Encrypts until the answer is `want` (the audit writer notices a full disk on its next
/// write); returns the requests served before that.
async fn until(server: &TestServer, want_ok: bool) -> usize {
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut served = 0;
    loop {
        match encrypt(server, b"x").await {
            Ok(()) if want_ok => return served + 1,
            Ok(()) => served += 1,
            Err(e) if !want_ok => {
                assert_eq!(
                    (e.code(), reason(&e).as_str()),
                    (Code::Unavailable, "AUDIT_UNAVAILABLE"),
                    "{e:?}"
                );
                return served;
            }
            Err(e) => {
                assert_eq!(reason(&e), "AUDIT_UNAVAILABLE", "{e:?}");
            }
        }
        assert!(
            Instant::now() < deadline,
            "the server did not become {}",
            if want_ok { "available" } else { "unavailable" }
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn rotate(keyring: &Path) -> Result<u32, keybroker::keyring::KeyringError> {
    keybroker::keyring::edit(keyring, false, |r| r.rotate_key("default"))
}

fn only_expected_files(dir: &Path) {
    for e in std::fs::read_dir(dir).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().into_owned();
        assert!(
            !name.contains(".tmp."),
            "a temporary keyring file was left behind: {name}"
        );
    }
}

async fn server_on(fs: &Tmpfs) -> TestServer {
    let text = format!(
        "[keys.default]\nbackend = \"local\"\nkey_id = \"default\"\nkeyring = \"{}/keyring\"\n\
         create = true\ncache.enabled = false\n{}\n[audit]\npath = \"{}/audit.jsonl\"\n",
        fs.mnt.display(),
        allow_anonymous("default"),
        fs.mnt.display()
    );
    TestServer::start(&text).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_fails_closed_keeps_the_keyring_and_recovers() {
    let Some(fs) = Tmpfs::mount("256k") else {
        return;
    };
    let server = server_on(&fs).await;
    let keyring = fs.mnt.join("keyring");
    let audit = fs.mnt.join("audit.jsonl");
    encrypt(&server, b"before").await.unwrap();

    let filler = fill(&fs.mnt);
    // Required mode: once the writer fails, key use is refused (AUDIT_UNAVAILABLE), never
    // served unaudited.
    let served_while_filling = until(&server, false).await;
    // A rotation into the full disk fails and leaves the keyring exactly as it was.
    let before = std::fs::read(&keyring).unwrap();
    let e = rotate(&keyring).expect_err("a rotation into a full disk cannot succeed");
    eprintln!("rotation into a full disk: {e}");
    assert_eq!(std::fs::read(&keyring).unwrap(), before, "keyring torn");
    keybroker::keyring::Keyring::load(&keyring).unwrap();
    only_expected_files(&fs.mnt);

    // Space returns: requests are served again without a restart, rotation works.
    std::fs::remove_file(&filler).unwrap();
    let served_after = until(&server, true).await;
    assert_eq!(rotate(&keyring).unwrap(), 2);
    encrypt(&server, b"after").await.unwrap();

    // The audit chain is whole, and every request that was answered OK has its record (records
    // of requests served just before the disk filled were kept and written once it could).
    assert!(server.stop().await);
    let report = keybroker::audit::verify(std::slice::from_ref(&audit)).unwrap();
    let text = std::fs::read_to_string(&audit).unwrap();
    let ok = text
        .lines()
        .filter(|l| l.contains("\"result\":\"OK\""))
        .count();
    assert_eq!(
        ok,
        1 + served_while_filling + served_after + 1,
        "OK records vs requests answered OK"
    );
    assert!(report.records as usize >= ok);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_filesystem_keeps_the_keyring_and_recovers() {
    let Some(fs) = Tmpfs::mount("1m") else {
        return;
    };
    let keyring = fs.mnt.join("keyring");
    keybroker::keyring::edit(&keyring, true, |r| r.create_key("default")).unwrap();
    let before = std::fs::read(&keyring).unwrap();
    fs.remount("ro");
    let e = rotate(&keyring).expect_err("a rotation on a read-only filesystem cannot succeed");
    eprintln!("rotation on a read-only filesystem: {e}");
    assert_eq!(std::fs::read(&keyring).unwrap(), before, "keyring changed");
    keybroker::keyring::Keyring::load(&keyring).unwrap();
    // A server whose audit log is on the read-only filesystem does not start (fail closed:
    // never serve unaudited in required mode).
    let text = format!(
        "[keys.default]\nbackend = \"local\"\nkey_id = \"default\"\nkeyring = \"{}\"\n{}\n\
         [audit]\npath = \"{}/audit.jsonl\"\n",
        keyring.display(),
        allow_anonymous("default"),
        fs.mnt.display()
    );
    let dir = tempfile::tempdir().unwrap();
    let mut config = keybroker::config::Config::parse(&text, "ro.toml", dir.path()).unwrap();
    config.server.listen = vec![keybroker::transport::ListenAddr::parse("127.0.0.1:0").unwrap()];
    config.admin_listen = None;
    let started = keybroker::server::start(&config).await;
    let err = started
        .err()
        .expect("started with its audit log on a read-only filesystem")
        .to_string();
    eprintln!("start with the audit log read-only: {err}");
    assert!(err.contains("audit"), "{err}");

    fs.remount("rw");
    assert_eq!(rotate(&keyring).unwrap(), 2);
    only_expected_files(&fs.mnt);
    let server = TestServer::start(&text).await;
    encrypt(&server, b"rw again").await.unwrap();
}

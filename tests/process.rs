//! The `keybroker` binary as a user meets it: the embedded default, `config check`, the CLI
//! client, Unix sockets, and graceful shutdown on SIGTERM.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use keybroker::proto::EncryptRequest;

use crate::support::{ServeProcess, TestServer, client_for, keybroker_bin, local_config};

#[tokio::test]
async fn embedded_default_runs_with_no_config() {
    let cwd = tempfile::tempdir().unwrap();
    let serve = ServeProcess::start(cwd.path(), &[], &[("KEYBROKER_LISTEN", "127.0.0.1:0")]);
    assert!(
        serve.banner.contains("embedded default"),
        "{}",
        serve.banner
    );
    assert!(
        serve.banner.contains("grpcurl -plaintext"),
        "{}",
        serve.banner
    );
    assert!(
        serve.banner.contains("keybroker.v1.KeyBroker/Encrypt"),
        "{}",
        serve.banner
    );
    let ring = cwd.path().join(".keybroker/keyring");
    let mode = std::fs::metadata(&ring).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "keyring must be created 0600");
    let mut c = client_for(&serve.addr).await;
    let r = c
        .encrypt(EncryptRequest {
            key: "default".into(),
            plaintext: b"hi".to_vec().into(),
            context: BTreeMap::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.key, "default");
    serve.signal("TERM");
    let (status, _) = serve.wait(Duration::from_secs(10)).await;
    assert!(status.success());
}

#[test]
fn config_check_reports_every_problem_with_its_place() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(
        &file,
        r#"
[server]
listen = "nowhere"
[keys.app]
backend = "local"
[keys.app.cache]
ttl = "5 minutes"
[keys.logs]
backend = "local"
key_id = "logs"
max_messages = 3
"#,
    )
    .unwrap();
    let out = Command::new(keybroker_bin())
        .args(["config", "check"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    for want in [
        "4 problem(s)",
        "server.listen:",
        "keys.app.key_id: is required",
        "keys.app.cache.ttl:",
        "keys.logs.max_messages: unknown field",
    ] {
        assert!(err.contains(want), "missing {want:?} in:\n{err}");
    }

    // A valid file whose keyring lacks the key: reported with the key's place.
    std::fs::write(
        &file,
        local_config("")
            .replace("create = true", "")
            .replace("{dir}", &dir.path().display().to_string()),
    )
    .unwrap();
    keybroker::keyring::edit(&dir.path().join("keyring"), true, |r| {
        r.create_key("unrelated")
    })
    .unwrap();
    let out = Command::new(keybroker_bin())
        .args(["config", "check"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("keys.default.key_id"));

    keybroker::keyring::edit(&dir.path().join("keyring"), false, |r| {
        r.create_key("default")
    })
    .unwrap();
    let out = Command::new(keybroker_bin())
        .args(["config", "check"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok (1 key(s): default)"));
}

/// The CLI client is binary-safe both raw and with --base64, and reports statuses readably.
#[tokio::test]
async fn cli_encrypt_decrypt_datakey_round_trip() {
    let server = TestServer::local("").await;
    let addr = server.addr.clone();
    let payload: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
    let run = move |args: Vec<String>, input: Vec<u8>| {
        crate::support::run_with_stdin(Command::new(keybroker_bin()).args(&args), &input)
    };
    let a = |s: &str| s.to_owned();
    let (addr2, p2) = (addr.clone(), payload.clone());
    let (raw, b64, dk, bad) = tokio::task::spawn_blocking(move || {
        let enc = run(
            vec![
                a("encrypt"),
                a("--addr"),
                addr2.clone(),
                a("--context"),
                a("app=x"),
            ],
            p2.clone(),
        );
        assert!(
            enc.status.success(),
            "{}",
            String::from_utf8_lossy(&enc.stderr)
        );
        let dec = run(
            vec![
                a("decrypt"),
                a("--addr"),
                addr2.clone(),
                a("--context"),
                a("app=x"),
            ],
            enc.stdout,
        );
        let enc64 = run(
            vec![a("encrypt"), a("--base64"), a("--addr"), addr2.clone()],
            p2.clone(),
        );
        assert!(enc64.stdout.iter().all(|b| b.is_ascii()));
        let dec64 = run(
            vec![a("decrypt"), a("--base64"), a("--addr"), addr2.clone()],
            enc64.stdout,
        );
        let dk = run(
            vec![
                a("datakey"),
                a("--addr"),
                addr2.clone(),
                a("--spec"),
                a("AES_128"),
            ],
            vec![],
        );
        let bad = run(
            vec![a("decrypt"), a("--addr"), addr2],
            b"not a ciphertext".to_vec(),
        );
        (dec, dec64, dk, bad)
    })
    .await
    .unwrap();
    assert!(raw.status.success());
    assert_eq!(raw.stdout, payload);
    assert_eq!(b64.stdout, payload);
    let json: serde_json::Value = serde_json::from_slice(&dk.stdout).unwrap();
    assert_eq!(json["key"], "default");
    assert_eq!(json["plaintext_key"].as_str().unwrap().len(), 24); // 16 bytes in base64
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("INVALID_CIPHERTEXT"), "{err}");
}

#[tokio::test]
async fn unix_socket_mode_stale_replaced_live_not_stolen() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("kb.sock");
    // A stale socket file, as a crashed process leaves it: bound, then the listener dropped.
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    assert!(sock.exists());
    let listen = format!("unix://{}", sock.display());
    let first = ServeProcess::start(dir.path(), &["--listen", &listen], &[]);
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660);
    let mut c = client_for(&listen).await;
    c.encrypt(EncryptRequest {
        key: "default".into(),
        plaintext: b"x".to_vec().into(),
        context: BTreeMap::new(),
    })
    .await
    .unwrap();

    // A second server on the same live socket must refuse to start, and must not unlink it.
    let out = Command::new(keybroker_bin())
        .args(["serve", "--listen", &listen])
        .current_dir(dir.path())
        .env_remove("KEYBROKER_CONFIG")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("another process is serving"));
    let mut c2 = client_for(&listen).await;
    c2.encrypt(EncryptRequest {
        key: "default".into(),
        plaintext: b"still mine".to_vec().into(),
        context: BTreeMap::new(),
    })
    .await
    .unwrap();

    first.signal("TERM");
    let (status, _) = first.wait(Duration::from_secs(10)).await;
    assert!(status.success());
    assert!(!sock.exists(), "socket file removed on clean exit");
}

/// In process, with a slow backend so requests are certainly in flight: shutdown lets every
/// accepted request finish, refuses new connections, and is bounded by the grace period.
#[tokio::test]
async fn shutdown_drains_in_flight_requests_and_is_bounded() {
    let (server, counting) = TestServer::counted(&local_config(
        "cache.enabled = false\n[server]\nshutdown_grace = \"10s\"",
    ))
    .await;
    counting
        .key("default")
        .set_delay(Duration::from_millis(500));
    let client = server.client().await;
    let mut tasks = Vec::new();
    for i in 0..20 {
        let mut c = client.clone();
        tasks.push(tokio::spawn(async move {
            c.encrypt(EncryptRequest {
                key: "default".into(),
                plaintext: vec![i as u8; 100].into(),
                context: BTreeMap::new(),
            })
            .await
        }));
    }
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(
        counting.key("default").generate(),
        20,
        "all 20 requests are in the backend"
    );
    let addr = server.addr.clone();
    let mut server = server;
    let running = server.running.take().unwrap();
    let t0 = Instant::now();
    let shutdown = tokio::spawn(running.shutdown());
    tokio::time::sleep(Duration::from_millis(50)).await;
    // New connections are refused while draining.
    assert!(
        keybroker::client::connect(&addr).await.is_err(),
        "listener still accepting"
    );
    for t in tasks {
        let r = t.await.unwrap();
        assert!(r.is_ok(), "an accepted request failed during drain: {r:?}");
    }
    assert!(shutdown.await.unwrap(), "drained within the grace period");
    assert!(t0.elapsed() < Duration::from_secs(5));

    // Bounded: a request stuck longer than the grace period does not hold shutdown hostage.
    let (server, counting) = TestServer::counted(&local_config(
        "cache.enabled = false\n[server]\nshutdown_grace = \"300ms\"",
    ))
    .await;
    counting.key("default").set_delay(Duration::from_secs(30));
    let mut c = server.client().await;
    let stuck = tokio::spawn(async move {
        c.encrypt(EncryptRequest {
            key: "default".into(),
            plaintext: b"x".to_vec().into(),
            context: BTreeMap::new(),
        })
        .await
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let t0 = Instant::now();
    let mut server = server;
    assert!(
        !server.running.take().unwrap().shutdown().await,
        "reports an incomplete drain"
    );
    assert!(
        t0.elapsed() < Duration::from_secs(3),
        "shutdown took {:?}",
        t0.elapsed()
    );
    stuck.abort();
}

/// The binary under a burst: SIGTERM makes it drain and exit 0. Every request sent before the
/// signal completes (some of them after it: they were in flight and drained); requests sent
/// after it are refused by the closing connections or listener, and none hangs.
#[tokio::test]
async fn sigterm_during_a_burst_completes_accepted_requests() {
    let cwd = tempfile::tempdir().unwrap();
    let serve = ServeProcess::start(cwd.path(), &[], &[("KEYBROKER_LISTEN", "127.0.0.1:0")]);
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(client_for(&serve.addr).await);
    }
    let payload = bytes::Bytes::from(vec![7u8; 64 << 10]);
    let signal_at: Arc<std::sync::Mutex<Option<Instant>>> = Default::default();
    let mut tasks = Vec::new();
    for i in 0..32 {
        let mut c = clients[i % 4].clone();
        let payload = payload.clone();
        tasks.push(tokio::spawn(async move {
            let mut results = Vec::new();
            let stop = Instant::now() + Duration::from_secs(8);
            while Instant::now() < stop {
                let started = Instant::now();
                let r = c
                    .encrypt(EncryptRequest {
                        key: "default".into(),
                        plaintext: payload.clone(),
                        context: BTreeMap::new(),
                    })
                    .await;
                let failed = r.is_err();
                results.push((
                    started,
                    Instant::now(),
                    r.map(|_| ())
                        .map_err(|s| (s.code(), s.message().to_owned())),
                ));
                if failed {
                    break;
                }
            }
            results
        }));
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    *signal_at.lock().unwrap() = Some(Instant::now());
    serve.signal("TERM");
    let (status, stderr) = serve.wait(Duration::from_secs(30)).await;
    assert!(status.success(), "exit status {status:?}\n{stderr}");
    let sig = signal_at.lock().unwrap().unwrap();
    // A request "started" on the client may still sit in the client's queue for a moment
    // before its HEADERS reach the server; only those started this long before the signal are
    // certainly accepted by the server.
    let margin = Duration::from_millis(100);
    let (mut ok, mut drained, mut unsure) = (0, 0, 0);
    for t in tasks {
        for (started, ended, r) in t.await.unwrap() {
            if started + margin < sig {
                assert!(
                    r.is_ok(),
                    "a request sent {:?} before SIGTERM ended with {r:?}",
                    sig - started
                );
            }
            match r {
                Ok(()) if started < sig => {
                    ok += 1;
                    if ended > sig {
                        drained += 1;
                    }
                }
                // Sent while the server drains (or just before): refused by GOAWAY or by the
                // closed listener, or served; either way it ended.
                _ => unsure += 1,
            }
        }
    }
    assert!(ok > 32, "the burst did not run: {ok} ok");
    assert!(
        drained > 0,
        "no request was in flight across the signal ({ok} ok, {unsure} other)"
    );
}

/// A health watcher (client-side health checking keeps one open per connection) must not hold
/// shutdown: on SIGTERM it sees NOT_SERVING, its stream ends, and the process exits as soon as
/// the unary requests in flight are done, not at the end of the grace period.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_an_open_health_watch_exits_once_unary_requests_finish() {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;
    let cwd = tempfile::tempdir().unwrap();
    std::fs::write(
        cwd.path().join("kb.toml"),
        // Audit records to a file: the banner ServeProcess reads is then on stdout.
        local_config("\n[server]\nshutdown_grace = \"20s\"\n[audit]\npath = \"{dir}/audit.jsonl\"")
            .replace("{dir}", &cwd.path().display().to_string()),
    )
    .unwrap();
    let sock = format!("unix://{}/kb.sock", cwd.path().display());
    let serve = ServeProcess::start(cwd.path(), &["--config", "kb.toml", "--listen", &sock], &[]);
    let channel = keybroker::client::connect(&sock).await.unwrap();
    let mut health = HealthClient::new(channel.clone());
    let mut watch = health
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        watch.message().await.unwrap().unwrap().status,
        1,
        "SERVING first"
    );
    // Unary traffic on the same connection as the watch, until the server refuses it.
    let mut c = keybroker::client::client(channel, 64 << 20);
    let last_done: Arc<std::sync::Mutex<Instant>> = Arc::new(std::sync::Mutex::new(Instant::now()));
    let traffic = {
        let last_done = Arc::clone(&last_done);
        tokio::spawn(async move {
            let mut ok = 0u32;
            for _ in 0..10_000 {
                let r = c
                    .encrypt(EncryptRequest {
                        key: "default".into(),
                        plaintext: vec![1u8; 32 << 10].into(),
                        context: BTreeMap::new(),
                    })
                    .await;
                *last_done.lock().unwrap() = Instant::now();
                if r.is_err() {
                    break;
                }
                ok += 1;
            }
            ok
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    serve.signal("TERM");
    // The watcher hears NOT_SERVING, then the end of its stream.
    let next = tokio::time::timeout(Duration::from_secs(5), watch.message())
        .await
        .expect("the watch stream stalled");
    assert_eq!(
        next.unwrap().map(|r| r.status),
        Some(2),
        "NOT_SERVING before the end"
    );
    let end = tokio::time::timeout(Duration::from_secs(5), watch.message())
        .await
        .expect("the watch stream was not ended");
    assert!(matches!(end, Ok(None)), "{end:?}");
    let (status, stderr) = serve.wait(Duration::from_secs(15)).await;
    let exited = Instant::now();
    assert!(status.success(), "{status:?}\n{stderr}");
    let ok = traffic.await.unwrap();
    assert!(ok > 0, "no unary request succeeded");
    let after_last = exited.saturating_duration_since(*last_done.lock().unwrap());
    // The bound the issue sets is 1 s; the exit itself takes milliseconds (20 ms polling here).
    assert!(
        after_last < Duration::from_secs(1),
        "exited {after_last:?} after the last unary request finished (grace is 20 s)"
    );
}

/// `--token`, `KEYBROKER_TOKEN` and `--token-file` make the CLI a token-identified caller.
#[tokio::test]
async fn cli_authenticates_with_a_token() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("billing.token"), "s3cret-billing\n").unwrap();
    let server = TestServer::start_in(
        dir,
        r#"
[[identity.tokens]]
caller = "billing"
file = "billing.token"
[keys.default]
backend = "local"
key_id = "default"
keyring = "{dir}/keyring"
create = true
[[keys.default.policy]]
callers = ["billing"]
operations = ["encrypt", "decrypt", "generate_data_key"]
"#,
    )
    .await;
    let addr = server.addr.clone();
    let token_file = server.path("billing.token");
    let outs = tokio::task::spawn_blocking(move || {
        let run = |args: &[&str], env: &[(&str, &str)], input: &[u8]| {
            let mut cmd = Command::new(keybroker_bin());
            cmd.args(args)
                .args(["--addr", &addr])
                .env_remove("KEYBROKER_TOKEN");
            for (k, v) in env {
                cmd.env(k, v);
            }
            crate::support::run_with_stdin(&mut cmd, input)
        };
        let anonymous = run(&["encrypt"], &[], b"x");
        let flag = run(&["encrypt", "--token", "s3cret-billing"], &[], b"hello");
        let env_dec = run(
            &["decrypt"],
            &[("KEYBROKER_TOKEN", "s3cret-billing")],
            &flag.stdout,
        );
        let file = run(
            &["datakey", "--token-file", token_file.to_str().unwrap()],
            &[],
            b"",
        );
        let wrong = run(&["encrypt", "--token", "wrong-token"], &[], b"x");
        (anonymous, flag, env_dec, file, wrong)
    })
    .await
    .unwrap();
    let (anonymous, flag, env_dec, file, wrong) = outs;
    let err = |o: &std::process::Output| String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!anonymous.status.success());
    assert!(
        err(&anonymous).contains("POLICY_DENIED"),
        "{}",
        err(&anonymous)
    );
    assert!(flag.status.success(), "{}", err(&flag));
    assert!(env_dec.status.success(), "{}", err(&env_dec));
    assert_eq!(env_dec.stdout, b"hello");
    assert!(file.status.success(), "{}", err(&file));
    assert!(!wrong.status.success());
    assert!(err(&wrong).contains("UNAUTHENTICATED"), "{}", err(&wrong));
    assert!(
        !err(&wrong).contains("wrong-token"),
        "the token is never echoed"
    );
    server.stop().await;
}

/// TOML syntax errors name their line and column; a policy naming a caller no identity source
/// can produce fails `config check` and is a warning at `serve`.
#[tokio::test]
async fn config_check_places_syntax_errors_and_flags_unreachable_callers() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("kb.toml");
    let check = |file: &std::path::Path| {
        Command::new(keybroker_bin())
            .args(["config", "check"])
            .arg(file)
            .output()
            .unwrap()
    };
    for (text, place) in [
        (
            "[server]\nlisten = \"127.0.0.1:1\"\n\n[admin\nlisten = \"off\"\n",
            "line 4, column",
        ),
        (
            "[keys.a]\nbackend = \"local\"\n[keys.a]\nkey_id = \"a\"\n",
            "line 3, column",
        ),
    ] {
        std::fs::write(&file, text).unwrap();
        let out = check(&file);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(place) && err.contains("not valid TOML"),
            "{err}"
        );
    }
    let ghost = local_config("\n[audit]\npath = \"{dir}/audit.jsonl\"")
        .replace(
            "callers = [\"anonymous\"]",
            "callers = [\"anonymous\", \"ghost\"]",
        )
        .replace("{dir}", &dir.path().display().to_string());
    std::fs::write(&file, &ghost).unwrap();
    keybroker::keyring::edit(&dir.path().join("keyring"), true, |r| {
        r.create_key("default")
    })
    .unwrap();
    let out = check(&file);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(
            "keys.default.policy[0].callers: no identity source produces caller \"ghost\""
        ),
        "{err}"
    );
    // `serve` starts, and warns.
    let serve = ServeProcess::start(
        dir.path(),
        &["--config", file.to_str().unwrap()],
        &[("KEYBROKER_LISTEN", "127.0.0.1:0")],
    );
    serve.signal("TERM");
    let (status, stderr) = serve.wait(Duration::from_secs(10)).await;
    assert!(status.success());
    assert!(
        stderr.contains("WARN") && stderr.contains("\"ghost\""),
        "{stderr}"
    );
}

/// `keys list` shows when each key was created (its first version), not when the primary
/// version was.
#[test]
fn keys_list_shows_the_keys_creation_time() {
    let dir = tempfile::tempdir().unwrap();
    let ring = dir.path().join("keyring");
    let keys = |args: &[&str]| {
        let out = Command::new(keybroker_bin())
            .arg("keys")
            .arg("--keyring")
            .arg(&ring)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    keys(&["create", "app"]);
    std::thread::sleep(Duration::from_millis(20));
    keys(&["rotate", "app"]);
    let ring_now = keybroker::keyring::Keyring::load(&ring).unwrap();
    let v = &ring_now.keys["app"].versions;
    assert_ne!(v[&1].created, v[&2].created);
    let listing = keys(&["list"]);
    let line = listing.lines().find(|l| l.starts_with("app ")).unwrap();
    assert!(line.ends_with(&v[&1].created), "{listing}");
}

/// A keyring that stops parsing while the server runs is reported by kind and place only (it
/// may hold key material), and the previous keyring stays in force.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyring_broken_at_run_time_is_reported_without_its_content() {
    let cwd = tempfile::tempdir().unwrap();
    std::fs::write(
        cwd.path().join("kb.toml"),
        local_config("\n[local]\npoll_interval = \"100ms\"\n[audit]\npath = \"{dir}/audit.jsonl\"")
            .replace("{dir}", &cwd.path().display().to_string()),
    )
    .unwrap();
    let serve = ServeProcess::start(
        cwd.path(),
        &["--config", "kb.toml"],
        &[("KEYBROKER_LISTEN", "127.0.0.1:0")],
    );
    let mut c = client_for(&serve.addr).await;
    let enc = |c: &mut keybroker::client::KeyBrokerClient<tonic::transport::Channel>| {
        let mut c = c.clone();
        async move {
            c.encrypt(EncryptRequest {
                key: "default".into(),
                plaintext: b"x".to_vec().into(),
                context: BTreeMap::new(),
            })
            .await
        }
    };
    enc(&mut c).await.unwrap();
    // serde_json would quote this string in its error ("invalid type: string ...").
    let marker = "TOP-SECRET-KEY-MATERIAL-c2VjcmV0";
    let ring = cwd.path().join("keyring");
    let broken = format!(
        r#"{{"format":"keybroker-keyring/v1","keys":{{"default":{{"enabled":true,"primary":1,"versions":[{{"version":"{marker}","created":"x","material":"{marker}"}}]}}}}}}"#
    );
    let tmp = cwd.path().join("keyring.new");
    std::fs::write(&tmp, broken).unwrap();
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::rename(&tmp, &ring).unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    enc(&mut c)
        .await
        .expect("the previous keyring stays in force");
    serve.signal("TERM");
    let (status, stderr) = serve.wait(Duration::from_secs(10)).await;
    assert!(status.success(), "{stderr}");
    assert!(stderr.contains("keeping the previous one"), "{stderr}");
    assert!(stderr.contains("line 1 column"), "{stderr}");
    assert!(!stderr.contains("TOP-SECRET"), "{stderr}");
}

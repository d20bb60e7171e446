//! Shared test support: a real keybroker server on an ephemeral port (in-process), real gRPC
//! clients, and helpers for statuses and contexts. Fakes of cloud services live beside this
//! file; the backend conformance suite is `conformance.rs`.

#![allow(dead_code)]

pub mod alerts;
pub mod azure_fake;
pub mod conformance;
pub mod counting;
pub mod fault;
pub mod gcp_fake;
pub mod h2raw;
pub mod hung;
pub mod moto;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use keybroker::client::KeyBrokerClient;
use keybroker::config::Config;
use keybroker::server::{Running, StartOptions};
use tonic::transport::Channel;
use tonic_types::StatusExt;

/// A keybroker running in this process on 127.0.0.1:0 (plus any Unix socket the config names),
/// with its own temporary directory for keyrings, sockets and the config file.
pub struct TestServer {
    pub running: Option<Running>,
    pub addr: String,
    pub dir: tempfile::TempDir,
    pub config: Config,
}

impl TestServer {
    /// Starts a server from config text. `{dir}` in the text is replaced by the server's
    /// temporary directory. With no `[server] listen`, it listens on 127.0.0.1:0.
    pub async fn start(config_toml: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        Self::start_in(dir, config_toml).await
    }

    pub async fn start_in(dir: tempfile::TempDir, config_toml: &str) -> Self {
        Self::start_opts(dir, config_toml, StartOptions::default()).await
    }

    /// A server whose backends are wrapped in a [`counting::CountingLayer`].
    pub async fn counted(config_toml: &str) -> (Self, counting::CountingLayer) {
        let layer = counting::CountingLayer::default();
        let options = StartOptions {
            backend_layer: Some(layer.layer()),
            ..StartOptions::default()
        };
        let server = Self::start_opts(tempfile::tempdir().unwrap(), config_toml, options).await;
        (server, layer)
    }

    pub async fn start_opts(
        dir: tempfile::TempDir,
        config_toml: &str,
        options: StartOptions,
    ) -> Self {
        let text = config_toml.replace("{dir}", &dir.path().display().to_string());
        let path = dir.path().join("keybroker.toml");
        std::fs::write(&path, &text).unwrap();
        let mut config = Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
        if !text.contains("listen") {
            config.server.listen =
                vec![keybroker::config::ListenAddr::parse("127.0.0.1:0").unwrap()];
        }
        if !text.contains("[admin]") {
            config.admin_listen = Some("127.0.0.1:0".parse().unwrap());
        }
        // Tests about something other than policy write no policy at all: let `anonymous` use
        // every key there (any config that has policy statements is taken as written).
        if !text.contains(".policy]]") {
            for k in config.keys.values_mut() {
                k.policy = keybroker::policy::Policy::allow_anonymous_everything();
            }
        }
        let options = StartOptions {
            config_path: Some(path),
            ..options
        };
        Self::start_config(dir, config, options).await
    }

    pub async fn start_config(
        dir: tempfile::TempDir,
        config: Config,
        options: StartOptions,
    ) -> Self {
        let running = keybroker::server::start_with(&config, options)
            .await
            .unwrap_or_else(|e| panic!("server start: {e}"));
        let addr = running.addrs[0].to_string();
        Self {
            running: Some(running),
            addr,
            dir,
            config,
        }
    }

    /// The simplest config: one local key `default` (created on start) and optional extra TOML.
    pub async fn local(extra: &str) -> Self {
        Self::start(&local_config(extra)).await
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub async fn client(&self) -> KeyBrokerClient<Channel> {
        client_for(&self.addr).await
    }

    pub async fn stop(mut self) -> bool {
        match self.running.take() {
            Some(r) => r.shutdown().await,
            None => true,
        }
    }
}

pub async fn client_for(addr: &str) -> KeyBrokerClient<Channel> {
    let channel = keybroker::client::connect(addr).await.unwrap();
    keybroker::client::client(channel, 64 << 20)
}

/// The ErrorInfo reason of a status ("" if none).
pub fn reason(status: &tonic::Status) -> String {
    status
        .get_details_error_info()
        .map(|i| i.reason)
        .unwrap_or_default()
}

pub fn ctx(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The `keybroker` binary built for these tests.
/// A finished command's success and everything it printed (stdout, then stderr).
pub fn success_and_output(out: std::process::Output) -> (bool, String) {
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

pub fn keybroker_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_keybroker"))
}

/// Config text with one local key `default` (created on start, `anonymous` may do everything)
/// plus `extra` TOML (bare fields in it land in `[keys.default]`).
pub fn local_config(extra: &str) -> String {
    format!(
        r#"
[keys.default]
backend = "local"
key_id = "default"
keyring = "{{dir}}/keyring"
create = true
{extra}

{}
"#,
        allow_anonymous("default")
    )
}

/// A policy statement letting `anonymous` do everything with `key`.
pub fn allow_anonymous(key: &str) -> String {
    format!("[[keys.{key}.policy]]\ncallers = [\"anonymous\"]\noperations = [\"*\"]\n")
}

/// A `keybroker serve` child process; killed (SIGKILL) on drop if still running.
pub struct ServeProcess {
    pub child: std::process::Child,
    /// The first listen address the banner printed.
    pub addr: String,
    /// The admin listener's address, if the banner printed one.
    pub admin: Option<String>,
    /// Everything the banner printed on stdout.
    pub banner: String,
}

impl ServeProcess {
    /// Starts `keybroker serve ARGS` in `cwd` and waits for its banner.
    pub fn start(cwd: &Path, args: &[&str], env: &[(&str, &str)]) -> Self {
        use std::io::BufRead as _;
        let mut cmd = std::process::Command::new(keybroker_bin());
        cmd.arg("serve")
            .args(args)
            .current_dir(cwd)
            .env_remove("KEYBROKER_CONFIG")
            .env_remove("KEYBROKER_LISTEN")
            .env("KEYBROKER_ADMIN_LISTEN", "127.0.0.1:0")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        // Banner lines come through a thread so that a banner that never comes (a config
        // that sends it elsewhere, a server stuck at startup) fails the test in 15 s instead
        // of hanging it; the reader stops after the `try:` line, as the banner ends there.
        let (tx, rx) = std::sync::mpsc::channel::<Option<String>>();
        std::thread::spawn(move || {
            let mut reader = std::io::BufReader::new(stdout);
            loop {
                let mut line = String::new();
                match reader.read_line(&mut line) {
                    Ok(0) | Err(_) => {
                        let _ = tx.send(None);
                        return;
                    }
                    Ok(_) => {
                        let last = line.contains("try:");
                        if tx.send(Some(line)).is_err() || last {
                            return;
                        }
                    }
                }
            }
        });
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
        let mut banner = String::new();
        let mut addr = None;
        let mut admin = None;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let line = match rx.recv_timeout(left) {
                Ok(Some(line)) => line,
                Ok(None) => {
                    let mut err = String::new();
                    use std::io::Read;
                    let _ = child.stderr.take().unwrap().read_to_string(&mut err);
                    panic!("keybroker serve exited early: {banner}\n{err}");
                }
                Err(_) => {
                    let _ = child.kill();
                    let mut err = String::new();
                    use std::io::Read;
                    let _ = child.stderr.take().unwrap().read_to_string(&mut err);
                    panic!("no complete banner on stdout within 15 s: {banner:?}\n{err}");
                }
            };
            banner.push_str(&line);
            if let Some(a) = line.trim().strip_prefix("admin on http://") {
                admin.get_or_insert_with(|| a.split_whitespace().next().unwrap_or("").to_owned());
            }
            if let Some(a) = line.trim().strip_prefix("listening on ") {
                addr.get_or_insert_with(|| a.to_owned());
            }
            if line.contains("try:") {
                break;
            }
        }
        Self {
            child,
            addr: addr.expect("no listen address in the banner"),
            admin,
            banner,
        }
    }

    pub fn signal(&self, sig: &str) {
        let ok = std::process::Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig} failed");
    }

    /// Waits (bounded) for the process to exit and returns its status and stderr. Async, so the
    /// test's own clients keep running (a server drains only as fast as its clients answer).
    pub async fn wait(mut self, limit: std::time::Duration) -> (std::process::ExitStatus, String) {
        use std::io::Read;
        let deadline = std::time::Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                let mut err = String::new();
                if let Some(mut e) = self.child.stderr.take() {
                    let _ = e.read_to_string(&mut err);
                }
                return (status, err);
            }
            assert!(
                std::time::Instant::now() < deadline,
                "process did not exit within {limit:?}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The test venv (scripts/test-setup); panics with instructions when it is missing.
pub fn venv() -> PathBuf {
    let dir = std::env::var_os("KEYBROKER_TEST_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-env/venv"));
    assert!(
        dir.join("bin/python").exists(),
        "the test Python venv is missing at {}: run scripts/test-setup (scripts/test does)",
        dir.display()
    );
    dir
}

/// A tool installed in the test venv (e.g. `grpcurl`, `moto_server`).
pub fn venv_bin(name: &str) -> PathBuf {
    let p = venv().join("bin").join(name);
    assert!(
        p.exists(),
        "{} is missing: run scripts/test-setup",
        p.display()
    );
    p
}

/// A plain HTTP/1.1 GET on loopback (the admin endpoints): (status code, body).
pub async fn http_get(addr: &str, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    // Undo chunked transfer encoding if the server used it.
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        let mut out = String::new();
        let mut rest = body;
        while let Some((len, after)) = rest.split_once("\r\n") {
            let n = usize::from_str_radix(len.trim(), 16).unwrap_or(0);
            if n == 0 {
                break;
            }
            out.push_str(&after[..n]);
            rest = &after[n + 2..];
        }
        out
    } else {
        body.to_owned()
    };
    (status, body)
}

/// Runs a command with `input` on stdin and returns its output (stdout and stderr captured).
pub fn run_with_stdin(cmd: &mut std::process::Command, input: &[u8]) -> std::process::Output {
    use std::io::Write;
    let mut child = cmd
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input).unwrap();
    child.wait_with_output().unwrap()
}

/// Runs a client process to completion, bounded by `limit` (killed past it), without blocking
/// the runtime the servers under test run on. Returns its output.
pub async fn run_bounded(
    mut cmd: std::process::Command,
    limit: std::time::Duration,
) -> std::process::Output {
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + limit;
    let mut exited = false;
    while std::time::Instant::now() < deadline {
        if child.try_wait().unwrap().is_some() {
            exited = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    if !exited {
        let _ = child.kill();
    }
    let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    assert!(
        exited,
        "{cmd:?} did not finish within {limit:?}:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

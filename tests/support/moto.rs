//! moto's KMS server (a real, independent AWS KMS emulator from PyPI, installed by
//! scripts/test-setup) on a loopback port, one per test, killed on drop. Keys and aliases are
//! made through the real Rust SDK; what moto received is read back from its request recorder
//! (`/moto-api/recorder/...`), so call counts are observed on the emulator's side.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use aws_sdk_kms::config::{BehaviorVersion, Credentials, Region};
use base64::Engine;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub const REGION: &str = "us-east-1";
/// The profile in the credentials file keybroker is pointed at (`[aws] credentials_file`).
pub const PROFILE: &str = "moto";

/// The test venv (scripts/test-setup), or a panic saying how to make it.
pub fn venv() -> PathBuf {
    super::venv_bin("moto_server");
    super::venv()
}

/// One request moto received.
#[derive(Debug, Clone)]
pub struct Recorded {
    /// The KMS operation (`GenerateDataKey`, from `X-Amz-Target: TrentService.GenerateDataKey`).
    pub op: String,
    pub body: serde_json::Value,
}

impl Recorded {
    pub fn encryption_context(&self, field: &str) -> BTreeMap<String, String> {
        self.body
            .get(field)
            .and_then(|v| v.as_object())
            .map(|m| {
                m.iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                    .collect()
            })
            .unwrap_or_default()
    }
}

pub struct Moto {
    child: Child,
    pub port: u16,
    pub endpoint: String,
    pub dir: tempfile::TempDir,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Moto {
    /// Stops the server (an AWS outage: connections are refused from now on); the credentials
    /// file stays.
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts moto on a free loopback port and waits (at most 30 s) until it answers.
    pub async fn start() -> Self {
        let venv = venv();
        let mut dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("credentials"),
            format!(
                "[{PROFILE}]\naws_access_key_id = AKIAKEYBROKERTEST000\naws_secret_access_key = not-a-secret\n"
            ),
        )
        .unwrap();
        // A port freed just now can be taken by someone else before moto binds it: retry.
        for _ in 0..3 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let log = std::fs::File::create(dir.path().join("moto.log")).unwrap();
            let child = Command::new(venv.join("bin/moto_server"))
                .args(["-H", "127.0.0.1", "-p", &port.to_string()])
                .env("MOTO_RECORDER_FILEPATH", dir.path().join("recording.jsonl"))
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .expect("spawn moto_server");
            let mut moto = Moto {
                child,
                port,
                endpoint: format!("http://127.0.0.1:{port}"),
                dir,
            };
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline {
                if moto.child.try_wait().unwrap().is_some() {
                    break;
                }
                if let Ok((200, _)) = moto.api("GET", "/moto-api/data.json").await {
                    return moto;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let log = std::fs::read_to_string(moto.dir.path().join("moto.log")).unwrap_or_default();
            eprintln!("moto_server on port {port} did not come up:\n{log}");
            dir = std::mem::replace(&mut moto.dir, tempfile::tempdir().unwrap());
        }
        panic!("moto_server did not start (see the log above)");
    }

    /// Kills moto (SIGKILL): the backend outage of tests/kms_plugin.rs. Its state is gone.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts a fresh moto on the same port after [`Moto::kill`] (empty: keys must be made
    /// again) and waits (at most 30 s) until it answers.
    pub async fn restart(&mut self) {
        let log = std::fs::File::create(self.dir.path().join("moto-restart.log")).unwrap();
        self.child = Command::new(venv().join("bin/moto_server"))
            .args(["-H", "127.0.0.1", "-p", &self.port.to_string()])
            .env(
                "MOTO_RECORDER_FILEPATH",
                self.dir.path().join("recording.jsonl"),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn moto_server");
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok((200, _)) = self.api("GET", "/moto-api/data.json").await {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("moto_server did not restart on port {}", self.port);
    }

    /// A plain HTTP/1.1 request to moto's own API; returns (status, body).
    pub async fn api(&self, method: &str, path: &str) -> std::io::Result<(u16, String)> {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await?;
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            self.port
        );
        s.write_all(req.as_bytes()).await?;
        let mut buf = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf))
            .await
            .map_err(|_| std::io::Error::other("moto api timed out"))??;
        let text = String::from_utf8_lossy(&buf).into_owned();
        let status = text
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| std::io::Error::other("no HTTP status"))?;
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        Ok((status, body))
    }

    /// Empties moto's request log and starts recording every request it receives.
    pub async fn start_recording(&self) {
        let (s, _) = self
            .api("POST", "/moto-api/recorder/reset-recording")
            .await
            .unwrap();
        assert_eq!(s, 200);
        let (s, _) = self
            .api("POST", "/moto-api/recorder/start-recording")
            .await
            .unwrap();
        assert_eq!(s, 200);
    }

    /// Every KMS request moto recorded since `start_recording`.
    pub async fn recorded(&self) -> Vec<Recorded> {
        let (s, body) = self
            .api("GET", "/moto-api/recorder/download-recording")
            .await
            .unwrap();
        assert_eq!(s, 200, "{body}");
        let mut out = Vec::new();
        for line in body.lines().filter(|l| l.starts_with('{')) {
            let entry: serde_json::Value = serde_json::from_str(line).unwrap();
            let headers = entry["headers"].as_object().unwrap();
            let target = headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case("x-amz-target"))
                .and_then(|(_, v)| v.as_str())
                .unwrap_or_default();
            let Some(op) = target.strip_prefix("TrentService.") else {
                continue;
            };
            let raw = entry["body"].as_str().unwrap_or_default();
            let bytes = if entry["body_encoded"].as_bool() == Some(true) {
                base64::engine::general_purpose::STANDARD
                    .decode(raw)
                    .unwrap()
            } else {
                raw.as_bytes().to_vec()
            };
            out.push(Recorded {
                op: op.to_owned(),
                body: serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
            });
        }
        out
    }

    /// How many requests of `op` moto recorded.
    pub async fn count(&self, op: &str) -> usize {
        self.recorded().await.iter().filter(|r| r.op == op).count()
    }

    /// A Rust SDK client for setting things up and checking behind keybroker's back.
    pub fn client(&self) -> aws_sdk_kms::Client {
        let conf = aws_sdk_kms::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(REGION))
            .endpoint_url(&self.endpoint)
            .credentials_provider(Credentials::new(
                "AKIAKEYBROKERTEST000",
                "not-a-secret",
                None,
                None,
                "moto-test",
            ))
            .build();
        aws_sdk_kms::Client::from_conf(conf)
    }

    /// A new symmetric key; returns its ARN.
    pub async fn create_key(&self, description: &str) -> String {
        let out = self
            .client()
            .create_key()
            .description(description)
            .send()
            .await
            .unwrap();
        out.key_metadata.unwrap().arn.unwrap()
    }

    pub async fn create_alias(&self, alias: &str, key_arn: &str) {
        self.client()
            .create_alias()
            .alias_name(alias)
            .target_key_id(key_arn)
            .send()
            .await
            .unwrap();
    }

    /// The `[aws]` section pointing keybroker at this moto (credentials from a profile file,
    /// the way a mounted Secret would provide them).
    pub fn aws_section(&self) -> String {
        format!(
            "[aws]\nregion = \"{REGION}\"\nendpoint = \"{}\"\nprofile = \"{PROFILE}\"\ncredentials_file = \"{}\"\n",
            self.endpoint,
            self.dir.path().join("credentials").display()
        )
    }
}

/// A loopback HTTP endpoint that answers every KMS request with one fixed KMS JSON error, and
/// counts the requests. For the error kinds moto cannot produce (it ignores key state and never
/// throttles); the real SDK still parses the answer into its typed errors and runs its retries.
pub struct KmsErrorServer {
    pub endpoint: String,
    pub requests: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for KmsErrorServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl KmsErrorServer {
    /// `status` and `code` (the `__type`), e.g. 400 / "ThrottlingException". With `silent`, it
    /// accepts connections and never answers (for deadlines).
    pub async fn start(status: u16, code: &'static str, silent: bool) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let requests = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = std::sync::Arc::clone(&requests);
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut sock, _)) = listener.accept().await else {
                    return;
                };
                let counter = std::sync::Arc::clone(&counter);
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    // Serve requests on this connection until it closes (keep-alive).
                    loop {
                        let head_end = loop {
                            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                                break i + 4;
                            }
                            match sock.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                            if buf.len() > 1 << 20 {
                                return;
                            }
                        };
                        let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
                        let len: usize = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .and_then(|v| v.trim().parse().ok())
                            .unwrap_or(0);
                        while buf.len() < head_end + len.min(1 << 20) {
                            match sock.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        }
                        buf.drain(..head_end + len);
                        counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        if silent {
                            tokio::time::sleep(Duration::from_secs(3600)).await;
                            return;
                        }
                        let body = format!(
                            "{{\"__type\":\"{code}\",\"message\":\"raw AWS text: secret-ish detail\"}}"
                        );
                        let resp = format!(
                            "HTTP/1.1 {status} Error\r\nContent-Type: application/x-amz-json-1.1\r\nx-amzn-RequestId: test\r\nContent-Length: {}\r\n\r\n{body}",
                            body.len()
                        );
                        if sock.write_all(resp.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Self {
            endpoint,
            requests,
            task,
        }
    }

    pub fn count(&self) -> usize {
        self.requests.load(std::sync::atomic::Ordering::SeqCst)
    }
}

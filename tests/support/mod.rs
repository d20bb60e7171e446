//! Shared test support: a real keybroker server on an ephemeral port (in-process), real gRPC
//! clients, and helpers for statuses and contexts. Fakes of cloud services live beside this
//! file; the backend conformance suite is `conformance.rs`.

#![allow(dead_code)]

pub mod azure_fake;
pub mod conformance;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use keybroker::client::KeyBrokerClient;
use keybroker::config::Config;
use keybroker::server::Running;
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
        let text = config_toml.replace("{dir}", &dir.path().display().to_string());
        let path = dir.path().join("keybroker.toml");
        std::fs::write(&path, &text).unwrap();
        let mut config = Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
        if !text.contains("listen") {
            config.server.listen = vec![keybroker::config::ListenAddr::parse("127.0.0.1:0").unwrap()];
        }
        Self::start_config(dir, config).await
    }

    pub async fn start_config(dir: tempfile::TempDir, config: Config) -> Self {
        let running = keybroker::server::start(&config)
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
        Self::start(&format!(
            r#"
[keys.default]
backend = "local"
key_id = "default"
keyring = "{{dir}}/keyring"
create = true
{extra}
"#
        ))
        .await
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
pub fn keybroker_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_keybroker"))
}

//! What the command-line tools share: the result type, logging setup, the configuration a
//! command uses, the runtime, and waiting for SIGTERM/SIGINT. Used by `cli`, `inject` and the
//! benchmark harness; nothing in the library below the tools uses it.

use std::path::Path;

use crate::config::{self, Config, LogFormat};

pub type CliResult = Result<(), Box<dyn std::error::Error>>;

/// Sets up `tracing` on stderr (stdout is for command output).
pub fn init_logging(format: LogFormat, level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// Loads the configuration a command should use: the file, else the embedded default; then the
/// environment overrides.
pub fn load_config(path: Option<&Path>) -> Result<Config, config::ConfigError> {
    let mut config = match path {
        Some(p) => Config::load(p)?,
        None => Config::embedded_default(),
    };
    config.apply_env()?;
    Ok(config)
}

pub fn runtime(worker_threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    let mut b = if worker_threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        if worker_threads > 1 {
            b.worker_threads(worker_threads);
        }
        b
    };
    b.enable_all().build()
}

/// Resolves on SIGTERM or SIGINT (what Kubernetes and a terminal send).
pub async fn wait_for_signal() -> std::io::Result<()> {
    Signals::install()?.wait().await;
    Ok(())
}

/// SIGTERM and SIGINT handlers, installed (so the default action, exit, no longer applies)
/// before they are waited on.
pub struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    pub fn install() -> std::io::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    pub async fn wait(mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}

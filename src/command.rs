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

/// The runtime shape `serve` runs on, decided once at startup from `[server] worker_threads`
/// and the CPUs this process may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuntimeShape {
    /// One thread runs everything: no cross-thread wake-ups, and the HTTP/2 connection task
    /// flushes the responses of all the streams that finished since its last poll in one write.
    CurrentThread,
    /// Tokio's work-stealing scheduler with this many workers.
    MultiThread(usize),
}

/// Below this many usable CPUs, `worker_threads = 0` picks the current-thread runtime.
///
/// Why (docs/config.md, docs/benchmarks.md): on one CPU a multi-thread runtime only adds
/// wake-ups between its worker, its I/O driver and the audit writer, and its LIFO slot runs a
/// woken connection task right after each handler, so each response is written on its own
/// (about twice the `writev` calls per request). On two CPUs shared with the application (a
/// sidecar's usual place) the same costs outweigh the second worker. From four usable CPUs a
/// second worker can be had without starving the app, and the work-stealing runtime is used.
pub const AUTO_MULTI_THREAD_FROM_CPUS: usize = 4;

impl RuntimeShape {
    /// `worker_threads`: 0 is automatic, 1 the current-thread runtime, N > 1 N workers.
    /// `usable_cpus` is what this process may run on: the affinity mask and the cgroup CPU
    /// quota (a pod's CPU limit), rounded down, at least 1 — so a sidecar limited to 500m on
    /// a 64-core node runs one thread, not 64.
    pub fn choose(worker_threads: usize, usable_cpus: usize) -> Self {
        match worker_threads {
            0 if usable_cpus < AUTO_MULTI_THREAD_FROM_CPUS => Self::CurrentThread,
            0 => Self::MultiThread(usable_cpus),
            1 => Self::CurrentThread,
            n => Self::MultiThread(n),
        }
    }

    /// `choose` with the CPUs of this process: `available_parallelism` reads the affinity mask
    /// (`sched_getaffinity`) and the cgroup v1/v2 CPU quota.
    pub fn for_this_process(worker_threads: usize) -> (Self, usize) {
        let cpus = usable_cpus();
        (Self::choose(worker_threads, cpus), cpus)
    }

    pub fn describe(self) -> String {
        match self {
            Self::CurrentThread => "current-thread".to_owned(),
            Self::MultiThread(n) => format!("multi-thread, {n} workers"),
        }
    }
}

/// CPUs this process may use (affinity and cgroup quota), at least 1.
pub fn usable_cpus() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// Builds the runtime for `worker_threads` (see [`RuntimeShape::choose`]).
pub fn runtime(worker_threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    let (shape, cpus) = RuntimeShape::for_this_process(worker_threads);
    tracing::debug!(runtime = %shape.describe(), usable_cpus = cpus, "runtime chosen");
    build_runtime(shape)
}

pub fn build_runtime(shape: RuntimeShape) -> std::io::Result<tokio::runtime::Runtime> {
    let mut b = match shape {
        RuntimeShape::CurrentThread => tokio::runtime::Builder::new_current_thread(),
        RuntimeShape::MultiThread(n) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n.max(1));
            b
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn automatic_runtime_follows_the_usable_cpus() {
        assert_eq!(RuntimeShape::choose(0, 1), RuntimeShape::CurrentThread);
        assert_eq!(RuntimeShape::choose(0, 2), RuntimeShape::CurrentThread);
        assert_eq!(RuntimeShape::choose(0, 3), RuntimeShape::CurrentThread);
        assert_eq!(RuntimeShape::choose(0, 4), RuntimeShape::MultiThread(4));
        assert_eq!(RuntimeShape::choose(0, 64), RuntimeShape::MultiThread(64));
        assert_eq!(RuntimeShape::choose(1, 64), RuntimeShape::CurrentThread);
        assert_eq!(RuntimeShape::choose(2, 1), RuntimeShape::MultiThread(2));
        assert_eq!(RuntimeShape::choose(8, 2), RuntimeShape::MultiThread(8));
    }
}

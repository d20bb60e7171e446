//! Configuration reload without restart (SIGHUP, or the file changing on disk): keys, policies,
//! cache limits, identity rules and prices. The new configuration is validated and its backends
//! built before anything is swapped; a configuration that fails is rejected, logged, and the old
//! one stays in force. Listeners, the admin address and the audit sink need a restart (a change
//! to them is logged and ignored).

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;

use crate::broker::Broker;
use crate::config::{Config, ConfigError, ListenAddr, Problem};
use crate::identity::Identifier;
use crate::metrics::Metrics;
use crate::registry::{BackendLayer, StatsBook};
use crate::util::FileStamp;

pub struct Reloader {
    pub(crate) path: Option<PathBuf>,
    pub(crate) listen_override: Option<Vec<ListenAddr>>,
    pub(crate) current: Mutex<Config>,
    pub(crate) broker: Arc<Broker>,
    pub(crate) identifier: Arc<ArcSwap<Identifier>>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) stats: Arc<StatsBook>,
    /// Where keyrings opened by a reload record their scheduled rotations and purges.
    pub(crate) audit: Arc<crate::audit::Auditor>,
    pub(crate) layer: Option<BackendLayer>,
    /// One reload at a time.
    pub(crate) lock: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Reloader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reloader")
            .field("path", &self.path)
            .finish()
    }
}

fn problem(source: &str, at: &str, message: String) -> ConfigError {
    ConfigError {
        source_name: source.to_owned(),
        problems: vec![Problem {
            at: at.to_owned(),
            message,
        }],
    }
}

impl Reloader {
    /// Reads, validates and applies the configuration file. On error nothing changes.
    pub async fn reload(&self) -> Result<(), ConfigError> {
        let _one = self.lock.lock().await;
        let Some(path) = &self.path else {
            return Err(problem(
                "embedded default",
                "",
                "there is no configuration file to reload".into(),
            ));
        };
        let mut new = Config::load(path)?;
        new.apply_env()?;
        if let Some(listen) = &self.listen_override {
            new.server.listen = listen.clone();
        }
        let old = match self.current.lock() {
            Ok(c) => c.clone(),
            Err(p) => p.into_inner().clone(),
        };
        let registry = new
            .build_registry_audited(
                &self.stats,
                self.layer.as_ref(),
                Some(&self.broker.registry()),
                &self.audit,
            )
            .await?;
        let identifier = Identifier::new(new.identity.clone())
            .map_err(|m| problem(&new.source_name, "identity.tokens", m))?;

        for w in new.notices.iter().chain(&new.warnings()) {
            tracing::warn!(at = %w.at, "{}", w.message);
        }
        // Everything validated and built: apply. Keys whose backend or cache limits changed got a
        // new cache epoch, so their old data keys (both sides) are unreachable from the new
        // registry even if a request still running on the old one inserts another; they are
        // dropped after the swap to free (and zeroize) them now.
        let previous = self.broker.registry();
        let stale: Vec<String> = previous
            .iter()
            .filter(|was| {
                registry
                    .get(&was.name)
                    .is_none_or(|now| now.cache_epoch != was.cache_epoch)
            })
            .map(|was| was.name.to_string())
            .collect();
        registry.spawn_lifecycle_refresh();
        registry.spawn_canaries();
        self.broker.replace_registry(registry);
        for name in &stale {
            self.broker.cache().forget_key(name);
        }
        self.identifier.store(Arc::new(identifier));
        self.metrics
            .reconfigure(new.known_callers(), new.metrics.prices.clone());
        for (what, changed) in [
            (
                "server",
                format!("{:?}", old.server) != format!("{:?}", new.server),
            ),
            ("admin.listen", old.admin_listen != new.admin_listen),
            ("audit", old.audit != new.audit),
            ("log", format!("{:?}", old.log) != format!("{:?}", new.log)),
            ("cache.capacity", old.cache.capacity != new.cache.capacity),
            (
                "metrics.enabled",
                old.metrics.enabled != new.metrics.enabled,
            ),
        ] {
            if changed {
                tracing::warn!(
                    section = what,
                    "changed in the configuration; takes effect after a restart"
                );
            }
        }
        tracing::info!(
            file = %path.display(),
            keys = new.keys.len(),
            "configuration reloaded"
        );
        match self.current.lock() {
            Ok(mut c) => *c = new,
            Err(p) => *p.into_inner() = new,
        }
        Ok(())
    }

    /// Reloads on SIGHUP and when the file changes (polled every `interval`).
    pub fn spawn_watchers(this: Arc<Self>, interval: Duration) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let Some(path) = this.path.clone() else {
                return;
            };
            let mut hup = match tokio::signal::unix::signal(
                tokio::signal::unix::SignalKind::hangup(),
            ) {
                Ok(s) => Some(s),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot listen for SIGHUP; file changes still reload");
                    None
                }
            };
            let mut stamp = FileStamp::of(&path);
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let why = tokio::select! {
                    _ = tick.tick() => {
                        let now = FileStamp::of(&path);
                        if now == stamp {
                            continue;
                        }
                        stamp = now;
                        "file changed"
                    }
                    Some(()) = async {
                        match hup.as_mut() {
                            Some(h) => h.recv().await,
                            None => std::future::pending().await,
                        }
                    } => "SIGHUP",
                };
                if let Err(e) = this.reload().await {
                    tracing::error!(trigger = why, error = %e, "configuration rejected; the previous one stays in force");
                }
            }
        })
    }
}

//! The registry: configured key names mapped to backend instances, limits and counters.
//!
//! Built once per configuration (and rebuilt on reload). Backends that can share a client or a
//! file share it through [`BackendFactory`]: one keyring watcher per file, one SDK client per
//! cloud endpoint.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use crate::backend::KeyBackend;
use crate::backend::local::{LocalBackend, LocalKeyring};
use crate::config::{BackendConfig, CacheLimits, Config, ConfigError, Problem};
use crate::stats::KeyStats;

/// One configured key.
pub struct KeyEntry {
    pub name: Arc<str>,
    pub description: String,
    /// Switched off in the configuration (checked before anything else).
    pub enabled: bool,
    pub backend: Arc<dyn KeyBackend>,
    pub cache: CacheLimits,
    pub stats: Arc<KeyStats>,
}

impl std::fmt::Debug for KeyEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyEntry")
            .field("name", &self.name)
            .field("backend", &self.backend.kind())
            .field("backend_key_id", &self.backend.key_id())
            .field("enabled", &self.enabled)
            .field("cache", &self.cache)
            .finish()
    }
}

/// Counters by key name; outlive any one registry so a reload does not reset them.
#[derive(Debug, Default)]
pub struct StatsBook(Mutex<HashMap<String, Arc<KeyStats>>>);

impl StatsBook {
    pub fn get(&self, key: &str) -> Arc<KeyStats> {
        let mut map = match self.0.lock() {
            Ok(m) => m,
            Err(poisoned) => poisoned.into_inner(),
        };
        Arc::clone(map.entry(key.to_owned()).or_default())
    }
}

/// Aborts a background task when dropped (keyring watchers die with their registry).
#[derive(Debug)]
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[derive(Debug)]
pub struct Registry {
    keys: BTreeMap<Arc<str>, Arc<KeyEntry>>,
    _watchers: Vec<AbortOnDrop>,
}

/// Builds backends, sharing what can be shared between keys.
#[derive(Default)]
pub struct BackendFactory {
    local_rings: HashMap<PathBuf, Arc<LocalKeyring>>,
    azure: crate::backend::azure::AzureClients,
}

impl BackendFactory {
    async fn build(&mut self, backend: &BackendConfig) -> Result<Arc<dyn KeyBackend>, String> {
        match backend {
            BackendConfig::Local {
                keyring,
                key_id,
                create,
            } => {
                let ring = match self.local_rings.get(keyring) {
                    Some(r) => {
                        if *create {
                            // The shared handle was opened for another key; make sure this one
                            // exists too.
                            LocalKeyring::open(keyring, Some(key_id)).map_err(|e| e.to_string())?;
                            r.reload_if_changed();
                        }
                        Arc::clone(r)
                    }
                    None => {
                        let r = LocalKeyring::open(keyring, create.then_some(key_id.as_str()))
                            .map_err(|e| e.to_string())?;
                        self.local_rings.insert(keyring.clone(), Arc::clone(&r));
                        r
                    }
                };
                if !ring.snapshot().keys.contains_key(key_id.as_str()) {
                    return Err(format!(
                        "key {key_id:?} is not in keyring {} (create it with `keybroker keys create {key_id}`)",
                        keyring.display()
                    ));
                }
                Ok(Arc::new(LocalBackend::new(ring, key_id.clone())))
            }
            BackendConfig::Azure {
                key_id,
                key,
                settings,
            } => Ok(Arc::new(self.azure.backend(key, key_id, settings)?)),
        }
    }
}

impl Registry {
    /// Builds every configured key's backend. Problems are collected per key, like config
    /// problems, so a broken deployment is reported in one go.
    pub async fn build(config: &Config, stats: &StatsBook) -> Result<Self, ConfigError> {
        let mut factory = BackendFactory::default();
        let mut keys = BTreeMap::new();
        let mut problems = Vec::new();
        for (name, kc) in &config.keys {
            match factory.build(&kc.backend).await {
                Ok(backend) => {
                    let name: Arc<str> = Arc::from(name.as_str());
                    keys.insert(
                        Arc::clone(&name),
                        Arc::new(KeyEntry {
                            stats: stats.get(&name),
                            name,
                            description: kc.description.clone(),
                            enabled: kc.enabled,
                            backend,
                            cache: kc.cache,
                        }),
                    );
                }
                Err(message) => problems.push(Problem {
                    at: format!("keys.{name}"),
                    message,
                }),
            }
        }
        if !problems.is_empty() {
            return Err(ConfigError {
                source_name: config.source_name.clone(),
                problems,
            });
        }
        let watchers = if tokio::runtime::Handle::try_current().is_ok() {
            factory
                .local_rings
                .values()
                .map(|r| AbortOnDrop(r.spawn_watcher(config.local.poll_interval)))
                .collect()
        } else {
            Vec::new()
        };
        Ok(Self {
            keys,
            _watchers: watchers,
        })
    }

    pub fn get(&self, name: &str) -> Option<&Arc<KeyEntry>> {
        self.keys.get(name)
    }

    /// Keys in name order.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<KeyEntry>> {
        self.keys.values()
    }
}

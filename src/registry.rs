//! The registry: configured key names mapped to backend instances, limits, policies and
//! counters, and what one configured key is ([`KeyConfig`], read from `[keys.NAME]`).
//!
//! Built once per configuration (and rebuilt on reload) with a backend [`Factory`], which
//! shares clients and keyrings between keys. Must never: hand out a key whose backend failed
//! to build (the whole registry fails, with every key's problem), or reuse a data-key cache
//! epoch across a change of a key's backend or limits.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};

use crate::backend::breaker::Breaker;
use crate::backend::{BackendConfig, Factory, KeyBackend, KeyDefaults};
use crate::cache::{CacheLimits, CachedKey, Require};
use crate::operation::Operation;
use crate::policy::{Need, Policy};
use crate::principal::{ANONYMOUS, Caller};
use crate::settings::{Problem, Problems, Section};
use crate::stats::KeyStats;

/// One configured key, as `[keys.NAME]` describes it.
#[derive(Debug, Clone)]
pub struct KeyConfig {
    pub name: String,
    pub description: String,
    pub enabled: bool,
    /// The first (or only) wrapping backend: it generates the data keys.
    pub backend: BackendConfig,
    /// The other wrapping backends of a `wrap = [...]` key, in order: each wraps the same data
    /// key, and the envelope carries every copy (docs/multi-backend.md).
    pub secondaries: Vec<BackendConfig>,
    /// What a data key needs when a secondary cannot wrap it.
    pub require: Require,
    pub cache: CacheLimits,
    /// Who may do what with this key; empty denies everything.
    pub policy: Policy,
    /// The break-glass check: prove every `interval` that the key still wraps and unwraps
    /// through each backend (docs/lifecycle.md). Off unless set: for a cloud key each run is
    /// two paid calls per wrapping backend.
    pub canary_interval: Option<std::time::Duration>,
    /// Read the provider's own rotation state at startup and reload (`rotation_state = true`;
    /// off by default: it costs provider calls and IAM permissions).
    pub rotation_state: bool,
    /// Cloud KMS versions below this are retired (`min_decrypt_version = N`, GCP keys only:
    /// their ciphertexts name a numbered CryptoKeyVersion; a local key keeps its own in the
    /// keyring, and AWS and Azure record no version keybroker could order).
    pub min_decrypt_version: Option<u64>,
}

/// The canary's record for one key, read by `/metrics`.
#[derive(Debug, Default)]
pub struct CanaryRecord {
    pub runs: std::sync::atomic::AtomicU64,
    pub failures: std::sync::atomic::AtomicU64,
    /// Whether the latest run succeeded (meaningful once `runs` > 0).
    pub last_ok: std::sync::atomic::AtomicBool,
    /// Unix seconds of the latest success (0: none yet).
    pub last_success_unix: std::sync::atomic::AtomicU64,
}

/// The caller name a canary's backend calls carry (part of the local wrap's AAD; never a
/// request's caller: it only names the canary's own wraps, which nothing else unwraps).
const CANARY_CALLER: &str = "keybroker-canary";

impl KeyConfig {
    /// Reads `[keys.NAME]` over the section-level defaults (the caller reports unknown fields
    /// with `finish`).
    pub fn parse(
        name: &str,
        s: &Section<'_>,
        cache: CacheLimits,
        backends: KeyDefaults<'_>,
        base: &Path,
        p: &mut Problems,
    ) -> Option<Self> {
        let description = s.str("description", p).unwrap_or_default().to_owned();
        let enabled = s.bool("enabled", p).unwrap_or(true);
        let require = Require::parse(s, p);
        let wraps = if s.has("wrap") {
            Self::parse_wrap_list(s, backends, base, p)
        } else {
            let backend_name = s.req_str("backend", p);
            let key_id = s.req_str("key_id", p);
            backend_name
                .and_then(|b| BackendConfig::parse(b, key_id, s, backends, base, p))
                .map(|b| vec![b])
        };
        let cache_section = s.section("cache", p);
        let cache = CacheLimits::parse(&cache_section, cache, p);
        cache_section.finish(p);
        let policy = Policy::parse(s, p);
        let canary_interval = s.duration("canary_interval", p);
        let rotation_state = s.bool("rotation_state", p).unwrap_or(false);
        if canary_interval.is_some_and(|d| d < std::time::Duration::from_secs(1)) {
            p.push(s.at("canary_interval"), "must be at least 1s");
        }
        let min_decrypt_version = s.u64("min_decrypt_version", p);
        if let (Some(min), Some(wraps)) = (min_decrypt_version, &wraps) {
            check_min_decrypt_version(min, wraps, &s.at("min_decrypt_version"), p);
        }
        let mut wraps = wraps?.into_iter();
        let backend = wraps.next()?;
        Some(Self {
            name: name.to_owned(),
            description,
            enabled,
            backend,
            secondaries: wraps.collect(),
            require,
            cache,
            policy,
            canary_interval,
            rotation_state,
            min_decrypt_version,
        })
    }

    /// `wrap = [ {backend = "...", key_id = "...", ...}, ... ]`: every wrapping backend, each
    /// entry with the backend's own key fields. At most as many as an envelope has copies.
    fn parse_wrap_list(
        s: &Section<'_>,
        backends: KeyDefaults<'_>,
        base: &Path,
        p: &mut Problems,
    ) -> Option<Vec<BackendConfig>> {
        for single in ["backend", "key_id"] {
            if s.has(single) {
                p.push(
                    s.at(single),
                    "a key with `wrap` names its backends there only",
                );
            }
        }
        let entries = s.section_list("wrap", p);
        if entries.is_empty() || entries.len() > crate::envelope::MAX_COPIES {
            p.push(
                s.at("wrap"),
                format!("must list 1 to {} backends", crate::envelope::MAX_COPIES),
            );
            return None;
        }
        let mut out: Vec<BackendConfig> = Vec::with_capacity(entries.len());
        let mut complete = true;
        for e in &entries {
            let backend_name = e.req_str("backend", p);
            let key_id = e.req_str("key_id", p);
            let parsed =
                backend_name.and_then(|b| BackendConfig::parse(b, key_id, e, backends, base, p));
            e.finish(p);
            match parsed {
                Some(b) => {
                    if let Some(j) = out.iter().position(|o| *o == b) {
                        p.push(
                            e.path.clone(),
                            format!("wraps with the same backend and key as wrap[{j}]"),
                        );
                    }
                    out.push(b);
                }
                None => complete = false,
            }
        }
        complete.then_some(out)
    }

    /// Every wrapping backend, the first one first.
    pub fn wraps(&self) -> impl Iterator<Item = &BackendConfig> {
        std::iter::once(&self.backend).chain(&self.secondaries)
    }
}

/// `min_decrypt_version` in `[keys.NAME]` needs every wrapping backend to record a version
/// keybroker can order: Cloud KMS does (`…/cryptoKeyVersions/N`). A retirement that one of a
/// key's copies could bypass is no retirement, so a key with any other backend is refused.
fn check_min_decrypt_version(min: u64, wraps: &[BackendConfig], at: &str, p: &mut Problems) {
    use crate::backend_kind::BackendKind;
    if min == 0 {
        p.push(at, "must be at least 1 (leave it out to retire no version)");
    }
    let mut seen = Vec::new();
    for w in wraps {
        let kind = w.kind();
        if seen.contains(&kind) {
            continue;
        }
        seen.push(kind);
        let why = match kind {
            BackendKind::Gcp => continue,
            BackendKind::Local => {
                "a local key's min_decrypt_version is kept in its keyring: set it with \
                 `keybroker keys set-min-decrypt-version NAME VERSION`"
            }
            BackendKind::Aws => {
                "AWS KMS ciphertexts do not say which key material version wrapped them (keybroker \
                 records only the key ARN), so older versions cannot be told apart; retire key \
                 material in KMS instead"
            }
            BackendKind::Azure => {
                "Key Vault key versions are opaque ids with no order, so \"below N\" means nothing; \
                 disable the old version in Key Vault instead"
            }
        };
        p.push(
            at,
            format!(
                "is not supported on a key wrapped by {}: {why}",
                kind.as_str()
            ),
        );
    }
}

/// One configured key.
pub struct KeyEntry {
    pub name: Arc<str>,
    pub description: String,
    /// Switched off in the configuration (checked before anything else).
    pub enabled: bool,
    /// The first wrapping backend (`wraps[0]`): it generates the data keys.
    pub backend: Arc<dyn KeyBackend>,
    /// `backend.key_id()`, shared (every request's audit record names it).
    pub backend_key_id: Arc<str>,
    /// Every wrapping backend in configured order (one for a single-backend key).
    pub wraps: Vec<Arc<dyn KeyBackend>>,
    /// What each of `wraps` was built from (a reload reuses a backend when unchanged).
    pub wrap_configs: Vec<BackendConfig>,
    /// Each of `wraps`' recent record, for the order decrypt tries copies in.
    pub breakers: Vec<Arc<Breaker>>,
    pub require: Require,
    pub cache: CacheLimits,
    pub policy: Policy,
    pub stats: Arc<KeyStats>,
    /// Part of every cache entry's identity: a reload that changes the key's backend or cache
    /// limits gives it a new epoch, so no data key cached before (or inserted afterwards by a
    /// request still running on the old registry) is ever served under the new configuration.
    pub cache_epoch: u64,
    pub canary_interval: Option<std::time::Duration>,
    pub canary: Arc<CanaryRecord>,
    pub rotation_state: bool,
    /// The configured `min_decrypt_version` (GCP keys; 0: none). The effective bound also
    /// counts the backend's own ([`KeyEntry::min_decrypt_version`]).
    pub configured_min_decrypt_version: u64,
}

/// Process-wide, so that no two registries ever hand out the same epoch.
static NEXT_CACHE_EPOCH: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

fn new_cache_epoch() -> u64 {
    NEXT_CACHE_EPOCH.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

impl KeyEntry {
    /// Versions below this are refused for decryption: the keyring's own bound (local keys) or
    /// the configured one (Cloud KMS keys). 0: none.
    pub fn min_decrypt_version(&self) -> u64 {
        self.backend
            .hint()
            .min_decrypt_version
            .max(self.configured_min_decrypt_version)
    }

    /// What the data-key caches need of this key.
    pub fn cached(&self) -> CachedKey<'_> {
        // Any wrapping backend's rotation or state change retires the cached data keys (their
        // copy under that backend's old version would otherwise live on).
        let generation = self.wraps.iter().fold(0u64, |g, b| {
            g.wrapping_mul(0x100_0000_01b3)
                .wrapping_add(b.hint().generation)
        });
        CachedKey {
            name: &self.name,
            epoch: self.cache_epoch,
            limits: self.cache,
            stats: &self.stats,
            backend: self.backend.as_ref(),
            wrap: 0,
            secondaries: self.wraps.get(1..).unwrap_or_default(),
            require: self.require,
            generation,
        }
    }

    /// As [`Self::cached`], to unwrap through wrapping backend `i` (decrypt side).
    pub fn cached_through(&self, i: usize) -> CachedKey<'_> {
        CachedKey {
            backend: self.wraps[i].as_ref(),
            wrap: u8::try_from(i).unwrap_or(u8::MAX),
            ..self.cached()
        }
    }

    /// Whether the key may be used now: enabled in the configuration, and not disabled in the
    /// first backend (which generates every data key).
    pub fn usable(&self) -> bool {
        self.enabled && !self.backend.hint().disabled
    }
}

impl std::fmt::Debug for KeyEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyEntry")
            .field("name", &self.name)
            .field("backend", &self.backend.kind())
            .field("backend_key_id", &self.backend.key_id())
            .field("wraps", &self.wraps.len())
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

#[derive(Debug)]
pub struct Registry {
    keys: BTreeMap<Arc<str>, Arc<KeyEntry>>,
    grants: Grants,
}

/// Which operations each caller holds on at least one key, so that `admission` can tell in one
/// lookup (whatever the number of keys) whether any key's policy grants a caller an operation.
#[derive(Debug, Default)]
struct Grants {
    /// Per caller name named in a statement: a bit per `Operation::index()`.
    named: HashMap<String, u8>,
    /// What `*` grants every identified caller.
    any_identified: u8,
}

impl Grants {
    fn of<'a>(policies: impl Iterator<Item = &'a Policy>) -> Self {
        let mut g = Self::default();
        for s in policies.flat_map(|p| &p.statements) {
            let ops = s
                .operations
                .iter()
                .fold(0u8, |bits, op| bits | 1 << op.index());
            for c in &s.callers {
                if c == crate::policy::ANY_IDENTIFIED {
                    g.any_identified |= ops;
                } else {
                    *g.named.entry(c.clone()).or_default() |= ops;
                }
            }
        }
        g
    }

    fn allow(&self, caller: &Caller, need: Need) -> bool {
        let mut ops = self.named.get(&*caller.name).copied().unwrap_or(0);
        if &*caller.name != ANONYMOUS {
            ops |= self.any_identified;
        }
        let has = |op: Operation| ops & (1 << op.index()) != 0;
        match need {
            Need::Op(op) => has(op),
            Need::ReEncryptFrom => has(Operation::Decrypt) || has(Operation::ReEncrypt),
            Need::ReEncryptTo { .. } => has(Operation::Encrypt) || has(Operation::ReEncrypt),
        }
    }
}

/// Wraps each backend the registry builds, given the key name: a seam for instrumentation
/// (tests count backend calls and inject failures through it, around the real backend).
pub type BackendLayer = Arc<dyn Fn(&str, Arc<dyn KeyBackend>) -> Arc<dyn KeyBackend> + Send + Sync>;

impl Registry {
    /// Builds every configured key's backend. Problems are collected per key, like config
    /// problems, so a broken deployment is reported in one go.
    /// `previous` (a configuration reload) lends its backends to keys whose backend
    /// configuration did not change, so a policy edit does not rebuild cloud clients.
    pub async fn build(
        config: &BTreeMap<String, KeyConfig>,
        mut factory: Factory,
        stats: &StatsBook,
        layer: Option<&BackendLayer>,
        previous: Option<&Registry>,
    ) -> Result<Self, Vec<Problem>> {
        let mut keys = BTreeMap::new();
        let mut problems = Vec::new();
        for (name, kc) in config {
            let configs: Vec<BackendConfig> = kc.wraps().cloned().collect();
            let prev = previous.and_then(|p| p.get(name));
            let cache_epoch = prev
                .filter(|e| e.wrap_configs == configs && e.cache == kc.cache)
                .map_or_else(new_cache_epoch, |e| e.cache_epoch);
            let mut wraps = Vec::with_capacity(configs.len());
            let mut breakers = Vec::with_capacity(configs.len());
            let mut failed = false;
            for (i, bc) in configs.iter().enumerate() {
                let reused = prev.and_then(|e| {
                    let j = e.wrap_configs.iter().position(|c| c == bc)?;
                    Some((Arc::clone(&e.wraps[j]), Arc::clone(&e.breakers[j])))
                });
                let built = match reused {
                    Some(b) => Ok(b),
                    None => factory.build(bc).await.map(|backend| {
                        let backend = match layer {
                            Some(wrap) if i == 0 => wrap(name, backend),
                            Some(wrap) => wrap(&format!("{name}#{i}"), backend),
                            None => backend,
                        };
                        (backend, Arc::new(Breaker::default()))
                    }),
                };
                match built {
                    Ok((b, h)) => {
                        wraps.push(b);
                        breakers.push(h);
                    }
                    Err(message) => {
                        failed = true;
                        problems.push(Problem {
                            at: if kc.secondaries.is_empty() {
                                format!("keys.{name}")
                            } else {
                                format!("keys.{name}.wrap[{i}]")
                            },
                            message,
                        });
                    }
                }
            }
            if failed {
                continue;
            }
            let backend = Arc::clone(&wraps[0]);
            let name: Arc<str> = Arc::from(name.as_str());
            keys.insert(
                Arc::clone(&name),
                Arc::new(KeyEntry {
                    stats: stats.get(&name),
                    name,
                    description: kc.description.clone(),
                    enabled: kc.enabled,
                    backend_key_id: Arc::from(backend.key_id()),
                    backend,
                    wraps,
                    wrap_configs: configs,
                    breakers,
                    require: kc.require,
                    cache: kc.cache,
                    policy: kc.policy.clone(),
                    cache_epoch,
                    canary_interval: kc.canary_interval,
                    canary: Arc::default(),
                    rotation_state: kc.rotation_state,
                    configured_min_decrypt_version: kc.min_decrypt_version.unwrap_or(0),
                }),
            );
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        let grants = Grants::of(keys.values().map(|e| &e.policy));
        Ok(Self { keys, grants })
    }

    pub fn get(&self, name: &str) -> Option<&Arc<KeyEntry>> {
        self.keys.get(name)
    }

    /// Keys in name order.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<KeyEntry>> {
        self.keys.values()
    }

    /// Starts the break-glass check of every key with a `canary_interval`: each run wraps a
    /// fresh random key with every wrapping backend and unwraps it again (a round trip to the
    /// provider, off the request path, not cached). A task ends when its key's registry is
    /// replaced (it holds the entry weakly); the new registry starts its own.
    pub fn spawn_canaries(&self) {
        if tokio::runtime::Handle::try_current().is_err() {
            return;
        }
        for entry in self.keys.values() {
            let Some(interval) = entry.canary_interval else {
                continue;
            };
            let weak = Arc::downgrade(entry);
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(interval);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    let Some(entry) = weak.upgrade() else { return };
                    let result = canary_round_trip(&entry).await;
                    record_canary(&entry, result);
                }
            });
        }
    }

    /// Asks every wrapping backend for its provider's rotation state, in the background (at
    /// startup and after a reload); a failure (say, no `kms:GetKeyRotationStatus` permission)
    /// is logged and leaves the key's lifecycle unknown.
    pub fn spawn_lifecycle_refresh(&self) {
        if tokio::runtime::Handle::try_current().is_err() {
            return;
        }
        for entry in self.keys.values().filter(|e| e.rotation_state) {
            for backend in &entry.wraps {
                let (backend, key) = (Arc::clone(backend), Arc::clone(&entry.name));
                tokio::spawn(async move {
                    if let Err(e) = backend.refresh_lifecycle().await {
                        tracing::warn!(key = %key, error = %e,
                            "cannot read the key's rotation state from its backend");
                    }
                });
            }
        }
    }

    /// Whether some key's policy grants `caller` what `need` asks for (ReEncrypt: `decrypt` or
    /// `re_encrypt` on a source). Whether it holds on the key a request names is for the broker.
    pub fn grants_anywhere(&self, caller: &Caller, need: Need) -> bool {
        self.grants.allow(caller, need)
    }
}

/// One canary run: wrap and unwrap a fresh key through every wrapping backend of `entry`.
async fn canary_round_trip(entry: &KeyEntry) -> Result<(), crate::backend::BackendError> {
    use crate::backend::{BackendContext, BackendError, BackendErrorKind};
    let ctx = BackendContext {
        key_name: &entry.name,
        caller: CANARY_CALLER,
    };
    for b in &entry.wraps {
        let key = crate::secret::SecretKey::generate(32).map_err(|_| {
            BackendError::new(
                b.kind(),
                BackendErrorKind::Internal,
                "random generator failed",
            )
        })?;
        let wrapped = b.wrap(&key, &ctx).await?;
        let back = b.unwrap(&wrapped.as_copy(b.kind()), &ctx).await?;
        if back.as_ref() != key.as_ref() {
            return Err(BackendError::new(
                b.kind(),
                BackendErrorKind::Integrity,
                "the canary's key came back different",
            ));
        }
    }
    Ok(())
}

fn record_canary(entry: &KeyEntry, result: Result<(), crate::backend::BackendError>) {
    use std::sync::atomic::Ordering::Relaxed;
    let c = &entry.canary;
    c.runs.fetch_add(1, Relaxed);
    match result {
        Ok(()) => {
            c.last_ok.store(true, Relaxed);
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            c.last_success_unix.store(now, Relaxed);
        }
        Err(e) => {
            c.failures.fetch_add(1, Relaxed);
            let was_ok = c.last_ok.swap(false, Relaxed);
            // Logged when it starts failing, and at debug while it keeps failing.
            if was_ok || c.runs.load(Relaxed) == 1 {
                tracing::error!(key = %entry.name, error = %e, event = "canary_failed",
                    "break-glass check failed: the key cannot wrap and unwrap through its backend");
            } else {
                tracing::debug!(key = %entry.name, error = %e, "canary still failing");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Statement;
    use crate::principal::IdentitySource;

    fn policy(callers: &[&str], ops: &[Operation]) -> Policy {
        Policy {
            statements: vec![Statement {
                callers: callers.iter().map(|c| c.to_string()).collect(),
                operations: ops.iter().copied().collect(),
            }],
        }
    }

    /// The table answers exactly what checking every key's policy would.
    #[test]
    fn grants_anywhere_matches_a_scan_of_every_policy() {
        let policies = [
            policy(&["billing"], &[Operation::Encrypt]),
            policy(&["*"], &[Operation::List, Operation::Decrypt]),
            policy(&["rekeyer"], &[Operation::ReEncrypt]),
            policy(&["anonymous"], &[Operation::GenerateDataKey]),
        ];
        let table = Grants::of(policies.iter());
        let callers = [
            Caller::new("billing", IdentitySource::BearerToken),
            Caller::new("rekeyer", IdentitySource::Mtls),
            Caller::new("stranger", IdentitySource::Mtls),
            Caller::anonymous(),
        ];
        let needs = Operation::ALL
            .into_iter()
            .map(Need::Op)
            .chain([Need::ReEncryptFrom]);
        for need in needs {
            for c in &callers {
                let scan = policies.iter().any(|p| need.check(p, c));
                assert_eq!(table.allow(c, need), scan, "{c:?} {need:?}");
            }
        }
    }
}

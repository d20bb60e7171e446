//! Per-caller usage metrics and cost accounting, exported in the Prometheus text format. Fed
//! the request's facts and outcome as each request ends, and a [`Snapshot`] of the rest at
//! scrape time; never imports the broker, the caches or the registry.
//!
//! The request path does one read-locked map lookup (caller, key, operation, backend) and a few
//! relaxed atomic increments; label values are `Arc<str>`s and static strings, so nothing is
//! allocated once a combination has been seen. Everything else (cost in dollars, cache entries,
//! evictions, process figures) is computed at scrape time by a custom collector. Label values
//! are bounded: callers not named in the configuration are reported as `other`, and keys are
//! configured names only. Nothing here ever sees plaintext or key material.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

use crate::backend_kind::{BackendErrorKind, BackendKind};
use crate::facts::{BackendOp, CacheResult, CopyRef, Facts, Outcome};
use crate::operation::Operation;
use crate::principal::Caller;
use crate::settings::{Problems, Section};

static OTHER: LazyLock<Arc<str>> = LazyLock::new(|| Arc::from("other"));
static NONE: LazyLock<Arc<str>> = LazyLock::new(|| Arc::from("none"));

/// List prices per backend, in USD (docs/metrics.md; overridable with `[pricing.BACKEND]`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Price {
    /// Per 10,000 requests.
    pub per_10k_requests: f64,
    /// Per key per month (the key itself, before any request).
    pub key_month: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PriceTable {
    pub local: Price,
    pub aws: Price,
    pub gcp: Price,
    pub azure: Price,
}

impl Default for PriceTable {
    /// Public list prices (checked 2026): AWS KMS $0.03 per 10,000 symmetric requests and $1 per
    /// customer managed key per month; Cloud KMS software keys $0.03 per 10,000 operations and
    /// $0.06 per active key version per month; Key Vault Standard $0.03 per 10,000 operations on
    /// software-protected keys and no per-key charge.
    fn default() -> Self {
        Self {
            local: Price {
                per_10k_requests: 0.0,
                key_month: 0.0,
            },
            aws: Price {
                per_10k_requests: 0.03,
                key_month: 1.0,
            },
            gcp: Price {
                per_10k_requests: 0.03,
                key_month: 0.06,
            },
            azure: Price {
                per_10k_requests: 0.03,
                key_month: 0.0,
            },
        }
    }
}

impl PriceTable {
    pub fn get(&self, b: BackendKind) -> Price {
        match b {
            BackendKind::Local => self.local,
            BackendKind::Aws => self.aws,
            BackendKind::Gcp => self.gcp,
            BackendKind::Azure => self.azure,
        }
    }

    pub fn get_mut(&mut self, b: BackendKind) -> &mut Price {
        match b {
            BackendKind::Local => &mut self.local,
            BackendKind::Aws => &mut self.aws,
            BackendKind::Gcp => &mut self.gcp,
            BackendKind::Azure => &mut self.azure,
        }
    }

    /// Reads `[pricing.BACKEND]` sections (`per_10k_requests`, `key_month`) over `self`.
    pub fn parse(&mut self, pricing: &Section<'_>, p: &mut Problems) {
        for (name, section) in pricing.subsections(p) {
            let Some(kind) = BackendKind::parse(name) else {
                p.push(
                    section.path.clone(),
                    "unknown backend (local, aws, gcp or azure)",
                );
                continue;
            };
            let price = self.get_mut(kind);
            for (field, slot) in [
                ("per_10k_requests", &mut price.per_10k_requests),
                ("key_month", &mut price.key_month),
            ] {
                if let Some(v) = section.float(field, p) {
                    if !(0.0..=1e6).contains(&v) {
                        p.push(section.at(field), "must be a non-negative price in USD");
                    }
                    *slot = v;
                }
            }
            section.finish(p);
        }
    }
}

#[derive(Clone, PartialEq, Eq, Hash)]
struct CellKey {
    caller: Arc<str>,
    key: Arc<str>,
    op: Operation,
    backend: Option<BackendKind>,
    /// The request's gRPC code name (`Outcome::code`).
    code: &'static str,
}

/// This module's own array layout for backend calls: one slot per backend operation, and per
/// outcome (success first, then each failure kind). Labels come from the values themselves.
const OP_SLOTS: usize = BackendOp::ALL.len();
const OUTCOME_SLOTS: usize = 1 + BackendErrorKind::ALL.len();

fn op_slot(op: BackendOp) -> usize {
    match op {
        BackendOp::GenerateDataKey => 0,
        BackendOp::Wrap => 1,
        BackendOp::Unwrap => 2,
        BackendOp::Rewrap => 3,
    }
}

fn outcome_slot(outcome: Result<(), BackendErrorKind>) -> usize {
    use BackendErrorKind as K;
    match outcome {
        Ok(()) => 0,
        Err(K::NotFound) => 1,
        Err(K::Disabled) => 2,
        Err(K::PermissionDenied) => 3,
        Err(K::Unauthenticated) => 4,
        Err(K::InvalidCiphertext) => 5,
        Err(K::Throttled) => 6,
        Err(K::Unavailable) => 7,
        Err(K::DeadlineExceeded) => 8,
        Err(K::Integrity) => 9,
        Err(K::InvalidArgument) => 10,
        Err(K::Internal) => 11,
    }
}

/// Every backend-call outcome, in slot order.
fn outcomes() -> impl Iterator<Item = Result<(), BackendErrorKind>> {
    std::iter::once(Ok(())).chain(BackendErrorKind::ALL.into_iter().map(Err))
}

fn outcome_label(outcome: Result<(), BackendErrorKind>) -> &'static str {
    match outcome {
        Ok(()) => "ok",
        Err(kind) => kind.label(),
    }
}

fn backend_slot(b: BackendKind) -> usize {
    match b {
        BackendKind::Local => 0,
        BackendKind::Aws => 1,
        BackendKind::Gcp => 2,
        BackendKind::Azure => 3,
    }
}

/// Counters for one (caller, key, operation, backend, code).
#[derive(Default)]
struct Cell {
    requests: AtomicU64,
    /// Requests that succeeded (the cell's code is OK).
    succeeded: AtomicU64,
    bytes: AtomicU64,
    hits: AtomicU64,
    misses: AtomicU64,
    bypasses: AtomicU64,
    /// [`backend_slot`][`op_slot`][`outcome_slot`]: a key with several wrapping backends calls
    /// each of them, so a call is counted under its own backend, not the request's.
    backend_calls: [[[AtomicU64; OUTCOME_SLOTS]; OP_SLOTS]; BackendKind::ALL.len()],
}

/// A multi-backend copy event: which copy of a key's data key served a decrypt
/// (`served`), or which wrapping backend a new data key went without (`missing`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct CopyKey {
    event: CopyEvent,
    key: Arc<str>,
    copy: CopyRef,
}

/// One (key, reason) of `keybroker_lifecycle_refusals_total`.
type RefusalKey = (Arc<str>, &'static str);

/// One (key, version, operation) of `keybroker_key_version_uses_total`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct VersionKey {
    key: Arc<str>,
    version: Arc<str>,
    op: Operation,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum CopyEvent {
    Served,
    Missing,
}

impl Cell {
    fn cache(&self, result: CacheResult) -> u64 {
        get(match result {
            CacheResult::Hit => &self.hits,
            CacheResult::Miss => &self.misses,
            CacheResult::Bypass => &self.bypasses,
        })
    }
}

pub struct Metrics {
    enabled: bool,
    known_callers: ArcSwap<BTreeSet<Arc<str>>>,
    prices: ArcSwap<PriceTable>,
    cells: RwLock<HashMap<CellKey, Arc<Cell>>>,
    copies: RwLock<HashMap<CopyKey, Arc<AtomicU64>>>,
    /// Uses per (key, version, operation), successful requests only; see
    /// [`MAX_VERSIONS_PER_KEY`].
    version_uses: RwLock<HashMap<VersionKey, Arc<AtomicU64>>>,
    /// Requests refused by the key's lifecycle, per (key, reason): [`LIFECYCLE_REASONS`].
    lifecycle_refusals: RwLock<HashMap<RefusalKey, Arc<AtomicU64>>>,
    latency: [Histogram; Operation::ALL.len()],
    /// [`backend_slot`][`op_slot`]
    backend_latency: [[Histogram; OP_SLOTS]; BackendKind::ALL.len()],
    start_time: f64,
}

/// What the metrics read of the rest of the process at scrape time, handed to [`Metrics::render`]
/// by whoever serves `/metrics` (this module never reaches into the registry, the caches or the
/// audit log itself).
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Every configured key, in name order.
    pub keys: Vec<KeyFigures>,
    /// Data keys cached now (encrypt side, decrypt side).
    pub cache_entries: (u64, u64),
    pub audit_dropped: u64,
    pub audit_healthy: bool,
    /// Requests refused because their audit record could not be queued (AUDIT_UNAVAILABLE).
    pub audit_refused: u64,
    /// Audit records queued now, the most queued at once since start, and the queue's size.
    pub audit_queue: (u64, u64, u64),
    /// Every gRPC listener's admission figures (`[server.limits]`), in start order.
    pub listeners: Vec<ListenerFigures>,
}

/// One listener's admission figures in a [`Snapshot`]: what its limits refused, and how full
/// its request slots are now. The refusals are what `keybroker_overload_refusals_total` counts;
/// a refused request never reaches the broker, so it is in no per-caller series.
#[derive(Debug, Clone, Default)]
pub struct ListenerFigures {
    /// The listen address as configured (`127.0.0.1:50051`, `unix:/run/keybroker/kb.sock`).
    pub listener: String,
    /// Requests answered RESOURCE_EXHAUSTED / `OVERLOADED` (over `max_requests_in_flight`).
    pub refused_requests: u64,
    /// Connections closed at accept (over `max_connections` or `max_tls_handshakes`).
    pub refused_connections: u64,
    pub requests_in_flight: u64,
    pub max_requests_in_flight: u64,
}

/// One configured key's figures in a [`Snapshot`].
#[derive(Debug, Clone)]
pub struct KeyFigures {
    pub name: Arc<str>,
    pub backend: BackendKind,
    /// Cached data keys retired, encrypt side (Encrypt and GenerateDataKey) and decrypt side.
    pub evictions: (u64, u64),
    pub lifecycle: LifecycleFigures,
}

/// A key's rotation state at scrape time (docs/lifecycle.md); `None`: not known.
#[derive(Debug, Clone, Default)]
pub struct LifecycleFigures {
    pub primary_version: Option<String>,
    pub primary_age_seconds: Option<f64>,
    pub rotation_period_seconds: Option<f64>,
    pub pending_deletion: bool,
    /// 0: no version retired.
    pub min_decrypt_version: u64,
    /// The break-glass check, for keys with a `canary_interval` that ran at least once.
    pub canary: Option<CanaryFigures>,
}

#[derive(Debug, Clone, Default)]
pub struct CanaryFigures {
    pub last_ok: bool,
    /// Unix seconds (0: never succeeded).
    pub last_success_unix: u64,
    pub interval_seconds: f64,
    pub failures: u64,
}

/// Most distinct versions counted per key in `keybroker_key_version_uses_total`; later ones
/// share `version="other"`. Versions are counted only from successful requests (so a forged
/// ciphertext cannot invent one), and a key rotated yearly stays far below this.
pub const MAX_VERSIONS_PER_KEY: usize = 32;

/// The refusals `keybroker_lifecycle_refusals_total` counts (the alert rules watch them).
pub const LIFECYCLE_REASONS: [&str; 2] = ["KEY_VERSION_RETIRED", "KEY_PENDING_DELETION"];

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics")
            .field("enabled", &self.enabled)
            .finish()
    }
}

fn latency_histogram() -> Histogram {
    // 50 µs .. ~1.6 s
    Histogram::new(exponential_buckets(0.000_05, 2.0, 16))
}

fn backend_histogram() -> Histogram {
    // 250 µs .. ~8 s
    Histogram::new(exponential_buckets(0.000_25, 2.0, 16))
}

impl Metrics {
    pub fn new(enabled: bool, known_callers: BTreeSet<String>, prices: PriceTable) -> Self {
        Self {
            enabled,
            known_callers: ArcSwap::from_pointee(to_arcs(known_callers)),
            prices: ArcSwap::from_pointee(prices),
            cells: RwLock::new(HashMap::new()),
            copies: RwLock::new(HashMap::new()),
            version_uses: RwLock::new(HashMap::new()),
            lifecycle_refusals: RwLock::new(HashMap::new()),
            latency: std::array::from_fn(|_| latency_histogram()),
            backend_latency: std::array::from_fn(|_| std::array::from_fn(|_| backend_histogram())),
            start_time: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0),
        }
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// New caller names and prices after a configuration reload.
    pub fn reconfigure(&self, known_callers: BTreeSet<String>, prices: PriceTable) {
        self.known_callers.store(Arc::new(to_arcs(known_callers)));
        self.prices.store(Arc::new(prices));
    }

    /// Counts one finished request.
    pub fn observe_request(
        &self,
        caller: &Caller,
        op: Operation,
        facts: &Facts,
        outcome: Outcome,
        latency: Duration,
    ) {
        if !self.enabled {
            return;
        }
        self.latency[op.index()].observe(latency.as_secs_f64());
        let caller_label = {
            let known = self.known_callers.load();
            match known.get(&caller.name) {
                Some(name) => Arc::clone(name),
                None => Arc::clone(&OTHER),
            }
        };
        let key = CellKey {
            caller: caller_label,
            key: facts.key.clone().unwrap_or_else(|| Arc::clone(&NONE)),
            op,
            backend: facts.backend,
            code: outcome.code,
        };
        let cell = self.cell(key);
        cell.requests.fetch_add(1, Ordering::Relaxed);
        if outcome.is_ok() {
            cell.succeeded.fetch_add(1, Ordering::Relaxed);
            cell.bytes.fetch_add(facts.bytes, Ordering::Relaxed);
        }
        match facts.cache {
            Some(CacheResult::Hit) => cell.hits.fetch_add(1, Ordering::Relaxed),
            Some(CacheResult::Miss) => cell.misses.fetch_add(1, Ordering::Relaxed),
            Some(CacheResult::Bypass) => cell.bypasses.fetch_add(1, Ordering::Relaxed),
            None => 0,
        };
        for call in facts.backend_calls.iter() {
            cell.backend_calls[backend_slot(call.backend)][op_slot(call.op)]
                [outcome_slot(call.outcome)]
            .fetch_add(1, Ordering::Relaxed);
            self.backend_latency[backend_slot(call.backend)][op_slot(call.op)]
                .observe(call.latency.as_secs_f64());
        }
        if let (Some(reason), Some(key)) = (outcome.reason, &facts.key)
            && let Some(reason) = LIFECYCLE_REASONS.iter().find(|r| **r == reason)
        {
            let mut map = match self.lifecycle_refusals.write() {
                Ok(m) => m,
                Err(p) => p.into_inner(),
            };
            map.entry((Arc::clone(key), reason))
                .or_default()
                .fetch_add(1, Ordering::Relaxed);
        }
        if outcome.is_ok()
            && let Some(key) = &facts.key
        {
            // ReEncrypt uses its source version (the destination's is the primary).
            let version = match op {
                Operation::ReEncrypt => facts
                    .source_key
                    .as_ref()
                    .zip(facts.source_key_version.as_ref()),
                _ => Some(key).zip(facts.key_version.as_ref()),
            };
            if let Some((key, version)) = version {
                self.version_use(key, version, op);
            }
        }
        if let Some(key) = facts.key.as_ref().filter(|_| facts.wraps > 1) {
            let events = facts
                .served_by
                .filter(|_| outcome.is_ok())
                .map(|c| (CopyEvent::Served, c))
                .into_iter()
                .chain(
                    facts
                        .missing_copies
                        .iter()
                        .map(|c| (CopyEvent::Missing, *c)),
                );
            for (event, copy) in events {
                self.copy_counter(CopyKey {
                    event,
                    key: Arc::clone(key),
                    copy,
                })
                .fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn version_use(&self, key: &Arc<str>, version: &str, op: Operation) {
        let probe = VersionKey {
            key: Arc::clone(key),
            version: Arc::from(version),
            op,
        };
        if let Ok(map) = self.version_uses.read()
            && let Some(c) = map.get(&probe)
        {
            c.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let mut map = match self.version_uses.write() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        let versions: BTreeSet<&Arc<str>> = map
            .keys()
            .filter(|k| k.key == *key)
            .map(|k| &k.version)
            .collect();
        let probe = if versions.len() >= MAX_VERSIONS_PER_KEY && !versions.contains(&probe.version)
        {
            VersionKey {
                version: Arc::clone(&OTHER),
                ..probe
            }
        } else {
            probe
        };
        map.entry(probe)
            .or_default()
            .fetch_add(1, Ordering::Relaxed);
    }

    fn copy_counter(&self, key: CopyKey) -> Arc<AtomicU64> {
        if let Ok(map) = self.copies.read()
            && let Some(c) = map.get(&key)
        {
            return Arc::clone(c);
        }
        let mut map = match self.copies.write() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        Arc::clone(map.entry(key).or_default())
    }

    fn cell(&self, key: CellKey) -> Arc<Cell> {
        if let Ok(map) = self.cells.read()
            && let Some(c) = map.get(&key)
        {
            return Arc::clone(c);
        }
        let mut map = match self.cells.write() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        Arc::clone(map.entry(key).or_default())
    }

    /// The Prometheus text exposition of everything: the counters, and `snapshot`.
    pub fn render(self: &Arc<Self>, snapshot: Snapshot) -> String {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Scrape {
            metrics: Arc::clone(self),
            snapshot,
        }));
        let mut out = String::with_capacity(16 << 10);
        if prometheus_client::encoding::prometheus_text::encode(&mut out, &registry).is_err() {
            out.clear();
        }
        out
    }
}

fn to_arcs(names: BTreeSet<String>) -> BTreeSet<Arc<str>> {
    names.into_iter().map(Arc::from).collect()
}

mod scrape;

use scrape::Scrape;

fn get(a: &AtomicU64) -> u64 {
    a.load(Ordering::Relaxed)
}

/// The price of `calls` calls at `per_10k` dollars per 10,000, rounded to 12 significant
/// digits: binary floating point would otherwise print $0.03/10k x 200 as
/// `0.0006000000000000001`. Far below a cent of error, at any magnitude.
pub fn usd(calls: u64, per_10k: f64) -> f64 {
    let exact = calls as f64 * per_10k / 10_000.0;
    format!("{exact:.11e}").parse().unwrap_or(exact)
}

#[cfg(test)]
mod tests {
    use super::usd;

    /// Versions per key are capped: later ones share `version="other"`.
    #[test]
    fn version_labels_are_bounded_per_key() {
        use super::*;
        let m = Metrics::new(true, BTreeSet::new(), PriceTable::default());
        let key: Arc<str> = Arc::from("k");
        for v in 0..(MAX_VERSIONS_PER_KEY + 20) {
            m.version_use(&key, &v.to_string(), Operation::Decrypt);
        }
        m.version_use(&key, "3", Operation::Decrypt);
        m.version_use(&Arc::from("j"), "999", Operation::Decrypt);
        let map = m.version_uses.read().unwrap();
        let of_k = map.keys().filter(|k| &*k.key == "k").count();
        assert_eq!(of_k, MAX_VERSIONS_PER_KEY + 1);
        let other = map
            .iter()
            .find(|(k, _)| &*k.version == "other")
            .map(|(_, n)| get(n));
        assert_eq!(other, Some(20));
        let three = map
            .iter()
            .find(|(k, _)| &*k.key == "k" && &*k.version == "3");
        assert_eq!(
            three.map(|(_, n)| get(n)),
            Some(2),
            "a known version keeps counting"
        );
        assert!(map.keys().any(|k| &*k.key == "j" && &*k.version == "999"));
    }

    #[test]
    fn costs_print_without_float_noise() {
        // The naive product prints 0.0006000000000000001.
        assert_ne!(200.0 * (0.03 / 10_000.0), 0.0006);
        assert_eq!(usd(200, 0.03).to_string(), "0.0006");
        assert_eq!(usd(7, 0.03).to_string(), "0.000021");
        assert_eq!(usd(1_000_000, 0.03).to_string(), "3");
        assert_eq!(usd(123_456_789_012, 0.03).to_string(), "370370.367036");
        assert_eq!(usd(0, 0.03), 0.0);
        assert_eq!(usd(3, 100.0).to_string(), "0.03");
    }
}

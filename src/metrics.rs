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

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
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
}

/// One configured key's figures in a [`Snapshot`].
#[derive(Debug, Clone)]
pub struct KeyFigures {
    pub name: Arc<str>,
    pub backend: BackendKind,
    /// Cached data keys retired, encrypt side (Encrypt and GenerateDataKey) and decrypt side.
    pub evictions: (u64, u64),
}

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

/// Collector over the live state, built for one scrape.
struct Scrape {
    metrics: Arc<Metrics>,
    snapshot: Snapshot,
}

impl std::fmt::Debug for Scrape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Scrape")
    }
}

impl prometheus_client::collector::Collector for Scrape {
    fn encode(&self, encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        self.encode_all(encoder)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    caller: Arc<str>,
    key: Arc<str>,
    operation: &'static str,
    code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UsageLabels {
    caller: Arc<str>,
    key: Arc<str>,
    operation: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CacheLabels {
    cache: &'static str,
    caller: Arc<str>,
    key: Arc<str>,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackendCallLabels {
    backend: &'static str,
    key: Arc<str>,
    operation: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CopyLabels {
    key: Arc<str>,
    backend: &'static str,
    copy: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CostLabels {
    caller: Arc<str>,
    key: Arc<str>,
    backend: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KeyLabels {
    key: Arc<str>,
    backend: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CacheKeyLabels {
    cache: &'static str,
    key: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabels {
    operation: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackendOpLabels {
    backend: &'static str,
    operation: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CacheSideLabels {
    cache: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
}

/// Which cache an operation consults.
fn cache_side(op: Operation) -> &'static str {
    match op {
        Operation::Encrypt | Operation::GenerateDataKey => "encrypt",
        _ => "decrypt",
    }
}

fn get(a: &AtomicU64) -> u64 {
    a.load(Ordering::Relaxed)
}

/// (caller, key, backend) -> (calls, price per 10k calls): counted in calls, priced once at the
/// end (see `usd`).
type Priced = BTreeMap<(Arc<str>, Arc<str>, &'static str), (u64, f64)>;
/// Label values (caller, key, operation, and one more) -> a sum over cells.
type Sums<T> = BTreeMap<(Arc<str>, Arc<str>, &'static str, &'static str), T>;

impl Scrape {
    fn encode_all(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let cells: Vec<(CellKey, Arc<Cell>)> = match self.metrics.cells.read() {
            Ok(m) => m.iter().map(|(k, v)| (k.clone(), Arc::clone(v))).collect(),
            Err(_) => Vec::new(),
        };
        self.encode_requests(&mut enc, &cells)?;
        self.encode_payload(&mut enc, &cells)?;
        self.encode_cache_lookups(&mut enc, &cells)?;
        self.encode_backend_calls(&mut enc, &cells)?;
        self.encode_keys(&mut enc)?;
        self.encode_audit(&mut enc)?;
        let mut m = enc.encode_descriptor(
            "keybroker_build",
            "Build information.",
            None,
            MetricType::Info,
        )?;
        m.encode_info(&BuildLabels {
            version: env!("CARGO_PKG_VERSION"),
        })?;
        process_metrics(&mut enc, self.metrics.start_time)
    }

    /// Requests by caller, key, operation and gRPC code, and their latency by operation.
    fn encode_requests(
        &self,
        enc: &mut DescriptorEncoder,
        cells: &[(CellKey, Arc<Cell>)],
    ) -> Result<(), std::fmt::Error> {
        let mut requests = Sums::<u64>::new();
        for (k, c) in cells {
            let n = get(&c.requests);
            if n > 0 {
                *requests
                    .entry((
                        Arc::clone(&k.caller),
                        Arc::clone(&k.key),
                        k.op.as_str(),
                        k.code,
                    ))
                    .or_default() += n;
            }
        }
        let mut m = enc.encode_descriptor(
            "keybroker_requests",
            "Requests by caller, key, operation and gRPC status code.",
            None,
            MetricType::Counter,
        )?;
        for ((caller, key, operation, code), n) in requests {
            m.encode_family(&RequestLabels {
                caller,
                key,
                operation,
                code,
            })?
            .encode_counter::<RequestLabels, _, u64>(&n, None)?;
        }
        let mut m = enc.encode_descriptor(
            "keybroker_request_duration",
            "Request latency by operation, measured in the service (excludes transport).",
            Some(&Unit::Seconds),
            MetricType::Histogram,
        )?;
        for (op, h) in Operation::ALL.iter().zip(&self.metrics.latency) {
            h.encode(m.encode_family(&OpLabels {
                operation: op.as_str(),
            })?)?;
        }
        Ok(())
    }

    /// Payload bytes of successful requests by caller, key and operation (also 0 once any
    /// request succeeded, so the series exists).
    fn encode_payload(
        &self,
        enc: &mut DescriptorEncoder,
        cells: &[(CellKey, Arc<Cell>)],
    ) -> Result<(), std::fmt::Error> {
        // The last label is unused here: "".
        let mut bytes = Sums::<(u64, bool)>::new();
        for (k, c) in cells {
            let e = bytes
                .entry((Arc::clone(&k.caller), Arc::clone(&k.key), k.op.as_str(), ""))
                .or_default();
            e.0 += get(&c.bytes);
            e.1 |= get(&c.succeeded) > 0;
        }
        let mut m = enc.encode_descriptor(
            "keybroker_payload",
            "Payload bytes of successful requests (plaintext in or out) by caller, key and operation.",
            Some(&Unit::Bytes),
            MetricType::Counter,
        )?;
        for ((caller, key, operation, _), (n, succeeded)) in bytes {
            if n > 0 || succeeded {
                m.encode_family(&UsageLabels {
                    caller,
                    key,
                    operation,
                })?
                .encode_counter::<UsageLabels, _, u64>(&n, None)?;
            }
        }
        Ok(())
    }

    fn encode_cache_lookups(
        &self,
        enc: &mut DescriptorEncoder,
        cells: &[(CellKey, Arc<Cell>)],
    ) -> Result<(), std::fmt::Error> {
        type Lookups = BTreeMap<(&'static str, Arc<str>, Arc<str>, &'static str), u64>;
        let mut lookups = Lookups::new();
        for (k, c) in cells {
            for result in CacheResult::ALL {
                let n = c.cache(result);
                if n > 0 {
                    *lookups
                        .entry((
                            cache_side(k.op),
                            Arc::clone(&k.caller),
                            Arc::clone(&k.key),
                            result.as_str(),
                        ))
                        .or_default() += n;
                }
            }
        }
        let mut m = enc.encode_descriptor(
            "keybroker_cache_lookups",
            "Data-key cache lookups by cache (encrypt or decrypt side), caller, key and result (hit, miss, bypass).",
            None,
            MetricType::Counter,
        )?;
        for ((cache, caller, key, result), n) in lookups {
            m.encode_family(&CacheLabels {
                cache,
                caller,
                key,
                result,
            })?
            .encode_counter::<CacheLabels, _, u64>(&n, None)?;
        }
        Ok(())
    }

    /// Backend calls by backend, key, operation and outcome, their latency, and their cost and
    /// the cost caching avoided.
    fn encode_backend_calls(
        &self,
        enc: &mut DescriptorEncoder,
        cells: &[(CellKey, Arc<Cell>)],
    ) -> Result<(), std::fmt::Error> {
        let prices = self.metrics.prices.load();
        let mut calls: BTreeMap<(&'static str, Arc<str>, &'static str, &'static str), u64> =
            BTreeMap::new();
        let mut spent = Priced::new();
        let mut avoided = Priced::new();
        for (k, c) in cells {
            for backend in BackendKind::ALL {
                let per_10k = prices.get(backend).per_10k_requests;
                let priced = || (Arc::clone(&k.caller), Arc::clone(&k.key), backend.as_str());
                for op in BackendOp::ALL {
                    for outcome in outcomes() {
                        let n = get(&c.backend_calls[backend_slot(backend)][op_slot(op)]
                            [outcome_slot(outcome)]);
                        if n == 0 {
                            continue;
                        }
                        *calls
                            .entry((
                                backend.as_str(),
                                Arc::clone(&k.key),
                                op.as_str(),
                                outcome_label(outcome),
                            ))
                            .or_default() += n;
                        if outcome.is_ok() {
                            spent.entry(priced()).or_insert((0, per_10k)).0 += n;
                        }
                    }
                }
            }
            // A hit saved the call its request's backend (the first, or the copy that served)
            // would have been asked.
            let Some(backend) = k.backend else { continue };
            let hits = get(&c.hits);
            if hits > 0 {
                let per_10k = prices.get(backend).per_10k_requests;
                avoided
                    .entry((Arc::clone(&k.caller), Arc::clone(&k.key), backend.as_str()))
                    .or_insert((0, per_10k))
                    .0 += hits;
            }
        }
        let mut m = enc.encode_descriptor(
            "keybroker_backend_calls",
            "Calls to key backends by backend, key, backend operation and outcome.",
            None,
            MetricType::Counter,
        )?;
        for ((backend, key, operation, outcome), n) in &calls {
            m.encode_family(&BackendCallLabels {
                backend,
                key: Arc::clone(key),
                operation,
                outcome,
            })?
            .encode_counter::<BackendCallLabels, _, u64>(n, None)?;
        }
        self.encode_backend_latency(enc, cells)?;
        self.encode_copies(enc)?;
        for (name, help, values) in [
            (
                "keybroker_cost_usd",
                "Estimated spend on backend calls in US dollars (successful calls x the price table), by caller, key and backend.",
                &spent,
            ),
            (
                "keybroker_cost_avoided_usd",
                "Estimated backend spend avoided by cache hits in US dollars (hits x the price table), by caller, key and backend.",
                &avoided,
            ),
        ] {
            let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
            for ((caller, key, backend), (calls, per_10k)) in values {
                let dollars = usd(*calls, *per_10k);
                m.encode_family(&CostLabels {
                    caller: Arc::clone(caller),
                    key: Arc::clone(key),
                    backend,
                })?
                .encode_counter::<CostLabels, _, u64>(&dollars, None)?;
            }
        }
        Ok(())
    }

    /// Multi-backend keys: which copy served decrypts, and which copies new data keys lack.
    fn encode_copies(&self, enc: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut copies: Vec<(CopyKey, u64)> = match self.metrics.copies.read() {
            Ok(m) => m.iter().map(|(k, v)| (k.clone(), get(v))).collect(),
            Err(_) => Vec::new(),
        };
        copies.sort();
        for (event, name, help) in [
            (
                CopyEvent::Served,
                "keybroker_copy_served",
                "Decrypts and re-encrypts by key and by the wrapped copy whose data key opened the envelope (backend, and its place among the envelope's copies).",
            ),
            (
                CopyEvent::Missing,
                "keybroker_copies_missing",
                "Data keys made without the copy of one of their key's wrapping backends (require = \"first\" while that backend failed), by key, backend and its place in the key's wrap list.",
            ),
        ] {
            let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (k, n) in copies.iter().filter(|(k, _)| k.event == event) {
                m.encode_family(&CopyLabels {
                    key: Arc::clone(&k.key),
                    backend: k.copy.backend.as_str(),
                    copy: k.copy.index_label(),
                })?
                .encode_counter::<CopyLabels, _, u64>(n, None)?;
            }
        }
        Ok(())
    }

    fn encode_backend_latency(
        &self,
        enc: &mut DescriptorEncoder,
        cells: &[(CellKey, Arc<Cell>)],
    ) -> Result<(), std::fmt::Error> {
        let mut m = enc.encode_descriptor(
            "keybroker_backend_call_duration",
            "Backend call latency by backend and backend operation.",
            Some(&Unit::Seconds),
            MetricType::Histogram,
        )?;
        for b in BackendKind::ALL {
            if b == BackendKind::Local && !cells.iter().any(|(k, _)| k.backend == Some(b)) {
                continue;
            }
            for op in BackendOp::ALL {
                let h = &self.metrics.backend_latency[backend_slot(b)][op_slot(op)];
                h.encode(m.encode_family(&BackendOpLabels {
                    backend: b.as_str(),
                    operation: op.as_str(),
                })?)?;
            }
        }
        Ok(())
    }

    /// Per-key figures from the snapshot: the key's monthly list price, cache evictions, and
    /// the caches' sizes.
    fn encode_keys(&self, enc: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let prices = self.metrics.prices.load();
        let mut m = enc.encode_descriptor(
            "keybroker_key_monthly_cost_usd",
            "List price of keeping the key itself for a month, in US dollars (from the price table).",
            None,
            MetricType::Gauge,
        )?;
        for k in &self.snapshot.keys {
            m.encode_family(&KeyLabels {
                key: Arc::clone(&k.name),
                backend: k.backend.as_str(),
            })?
            .encode_gauge(&prices.get(k.backend).key_month)?;
        }
        let mut m = enc.encode_descriptor(
            "keybroker_cache_evictions",
            "Cached data keys retired (TTL, usage limits, capacity, invalidation) by cache and key.",
            None,
            MetricType::Counter,
        )?;
        for k in &self.snapshot.keys {
            for (cache, n) in [("encrypt", k.evictions.0), ("decrypt", k.evictions.1)] {
                m.encode_family(&CacheKeyLabels {
                    cache,
                    key: Arc::clone(&k.name),
                })?
                .encode_counter::<CacheKeyLabels, _, u64>(&n, None)?;
            }
        }
        let (enc_n, dec_n) = self.snapshot.cache_entries;
        let mut m = enc.encode_descriptor(
            "keybroker_cache_entries",
            "Data keys currently cached, by cache.",
            None,
            MetricType::Gauge,
        )?;
        for (cache, n) in [("encrypt", enc_n), ("decrypt", dec_n)] {
            m.encode_family(&CacheSideLabels { cache })?
                .encode_gauge(&n)?;
        }
        Ok(())
    }

    fn encode_audit(&self, enc: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut m = enc.encode_descriptor(
            "keybroker_audit_records_dropped",
            "Audit records dropped because the queue was full (best-effort mode only).",
            None,
            MetricType::Counter,
        )?;
        m.encode_counter::<OpLabels, _, u64>(&self.snapshot.audit_dropped, None)?;
        let mut m = enc.encode_descriptor(
            "keybroker_audit_writer_healthy",
            "1 while the audit log can be written, else 0.",
            None,
            MetricType::Gauge,
        )?;
        m.encode_gauge(&(self.snapshot.audit_healthy as u64))?;
        Ok(())
    }
}

/// The standard `process_*` metrics, read from /proc/self.
/// The price of `calls` calls at `per_10k` dollars per 10,000, rounded to 12 significant
/// digits: binary floating point would otherwise print $0.03/10k x 200 as
/// `0.0006000000000000001`. Far below a cent of error, at any magnitude.
pub fn usd(calls: u64, per_10k: f64) -> f64 {
    let exact = calls as f64 * per_10k / 10_000.0;
    format!("{exact:.11e}").parse().unwrap_or(exact)
}

fn process_metrics(enc: &mut DescriptorEncoder, start_time: f64) -> Result<(), std::fmt::Error> {
    let ticks = 100.0; // USER_HZ on Linux
    let page = 4096.0;
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the parenthesised command name (which may contain spaces).
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let field = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok());
    // man proc(5): utime=14, stime=15, vsize=23, rss=24 (1-based); here 0 is field 3.
    let cpu = field(11).zip(field(12)).map(|(u, s)| (u + s) / ticks);
    let vsize = field(20);
    let rss = field(21).map(|p| p * page);
    let fds = std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count() as f64)
        .ok();
    for (name, help, value, kind, unit) in [
        (
            "process_cpu",
            "Total user and system CPU time spent.",
            cpu,
            MetricType::Counter,
            Some(Unit::Seconds),
        ),
        (
            "process_resident_memory",
            "Resident memory size.",
            rss,
            MetricType::Gauge,
            Some(Unit::Bytes),
        ),
        (
            "process_virtual_memory",
            "Virtual memory size.",
            vsize,
            MetricType::Gauge,
            Some(Unit::Bytes),
        ),
        (
            "process_open_fds",
            "Open file descriptors.",
            fds,
            MetricType::Gauge,
            None,
        ),
        (
            "process_start_time",
            "Start time of the process since the Unix epoch.",
            Some(start_time),
            MetricType::Gauge,
            Some(Unit::Seconds),
        ),
    ] {
        let Some(v) = value else { continue };
        let mut m = enc.encode_descriptor(name, help, unit.as_ref(), kind)?;
        match kind {
            MetricType::Counter => m.encode_counter::<OpLabels, _, u64>(&v, None)?,
            _ => m.encode_gauge(&v)?,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::usd;

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

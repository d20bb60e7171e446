//! Per-caller usage metrics and cost accounting, exported in the Prometheus text format.
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

use crate::audit::Auditor;
use crate::backend::BackendKind;
use crate::broker::{Broker, Facts};
use crate::cache::CacheResult;
use crate::identity::Caller;
use crate::operation::Operation;

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
}

/// gRPC status codes in numeric order (index = code).
const CODES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// Backend call outcomes (label values).
pub const OUTCOMES: [&str; 12] = [
    "ok",
    "not_found",
    "disabled",
    "permission_denied",
    "unauthenticated",
    "invalid_ciphertext",
    "throttled",
    "unavailable",
    "deadline_exceeded",
    "integrity",
    "invalid_argument",
    "internal",
];

/// Backend operations (label values).
pub const BACKEND_OPS: [&str; 4] = ["generate_data_key", "wrap", "unwrap", "rewrap"];

#[derive(Clone, PartialEq, Eq, Hash)]
struct CellKey {
    caller: Arc<str>,
    key: Arc<str>,
    op: Operation,
    backend: Option<BackendKind>,
}

/// Counters for one (caller, key, operation, backend).
#[derive(Default)]
struct Cell {
    codes: [AtomicU64; 17],
    bytes: AtomicU64,
    hits: AtomicU64,
    misses: AtomicU64,
    bypasses: AtomicU64,
    /// [backend op][outcome]
    backend_calls: [[AtomicU64; OUTCOMES.len()]; BACKEND_OPS.len()],
}

pub struct Metrics {
    enabled: bool,
    known_callers: ArcSwap<BTreeSet<Arc<str>>>,
    prices: ArcSwap<PriceTable>,
    cells: RwLock<HashMap<CellKey, Arc<Cell>>>,
    latency: [Histogram; Operation::ALL.len()],
    backend_latency: [[Histogram; BACKEND_OPS.len()]; BackendKind::ALL.len()],
    start_time: f64,
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
        code: tonic::Code,
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
        };
        let cell = self.cell(key);
        cell.codes[(code as usize).min(16)].fetch_add(1, Ordering::Relaxed);
        if code == tonic::Code::Ok {
            cell.bytes.fetch_add(facts.bytes, Ordering::Relaxed);
        }
        match facts.cache {
            Some(CacheResult::Hit) => cell.hits.fetch_add(1, Ordering::Relaxed),
            Some(CacheResult::Miss) => cell.misses.fetch_add(1, Ordering::Relaxed),
            Some(CacheResult::Bypass) => cell.bypasses.fetch_add(1, Ordering::Relaxed),
            None => 0,
        };
        for call in facts.backend_calls.iter() {
            cell.backend_calls[call.op as usize][call.outcome].fetch_add(1, Ordering::Relaxed);
            if let Some(b) = facts.backend {
                self.backend_latency[b.code() as usize - 1][call.op as usize]
                    .observe(call.latency.as_secs_f64());
            }
        }
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

    /// The Prometheus text exposition of everything.
    pub fn render(self: &Arc<Self>, broker: &Arc<Broker>, audit: &Arc<Auditor>) -> String {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Scrape {
            metrics: Arc::clone(self),
            broker: Arc::clone(broker),
            audit: Arc::clone(audit),
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
    broker: Arc<Broker>,
    audit: Arc<Auditor>,
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

impl Scrape {
    fn encode_all(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let cells: Vec<(CellKey, Arc<Cell>)> = match self.metrics.cells.read() {
            Ok(m) => m.iter().map(|(k, v)| (k.clone(), Arc::clone(v))).collect(),
            Err(_) => Vec::new(),
        };
        let prices = self.metrics.prices.load();

        // Requests by caller, key, operation and gRPC code.
        {
            let mut m = enc.encode_descriptor(
                "keybroker_requests",
                "Requests by caller, key, operation and gRPC status code.",
                None,
                MetricType::Counter,
            )?;
            for (k, c) in &cells {
                for (i, code) in CODES.iter().enumerate() {
                    let n = get(&c.codes[i]);
                    if n > 0 {
                        m.encode_family(&RequestLabels {
                            caller: Arc::clone(&k.caller),
                            key: Arc::clone(&k.key),
                            operation: k.op.as_str(),
                            code,
                        })?
                        .encode_counter::<RequestLabels, _, u64>(&n, None)?;
                    }
                }
            }
        }
        {
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
        }
        {
            let mut m = enc.encode_descriptor(
                "keybroker_payload",
                "Payload bytes of successful requests (plaintext in or out) by caller, key and operation.",
                Some(&Unit::Bytes),
                MetricType::Counter,
            )?;
            for (k, c) in &cells {
                let n = get(&c.bytes);
                if n > 0 || get(&c.codes[0]) > 0 {
                    m.encode_family(&UsageLabels {
                        caller: Arc::clone(&k.caller),
                        key: Arc::clone(&k.key),
                        operation: k.op.as_str(),
                    })?
                    .encode_counter::<UsageLabels, _, u64>(&n, None)?;
                }
            }
        }
        {
            let mut m = enc.encode_descriptor(
                "keybroker_cache_lookups",
                "Data-key cache lookups by cache (encrypt or decrypt side), caller, key and result (hit, miss, bypass).",
                None,
                MetricType::Counter,
            )?;
            for (k, c) in &cells {
                for (result, n) in [
                    ("hit", get(&c.hits)),
                    ("miss", get(&c.misses)),
                    ("bypass", get(&c.bypasses)),
                ] {
                    if n > 0 {
                        m.encode_family(&CacheLabels {
                            cache: cache_side(k.op),
                            caller: Arc::clone(&k.caller),
                            key: Arc::clone(&k.key),
                            result,
                        })?
                        .encode_counter::<CacheLabels, _, u64>(&n, None)?;
                    }
                }
            }
        }
        // Backend calls, and their cost and the cost caching avoided.
        let mut calls: BTreeMap<(&'static str, Arc<str>, &'static str, &'static str), u64> =
            BTreeMap::new();
        // Counted in calls, priced once at the end (see `usd`).
        // (caller, key, backend) -> (calls, price per 10k calls).
        type Priced = BTreeMap<(Arc<str>, Arc<str>, &'static str), (u64, f64)>;
        let mut spent = Priced::new();
        let mut avoided = Priced::new();
        for (k, c) in &cells {
            let Some(backend) = k.backend else { continue };
            let per_10k = prices.get(backend).per_10k_requests;
            for (oi, op) in BACKEND_OPS.iter().enumerate() {
                for (ri, outcome) in OUTCOMES.iter().enumerate() {
                    let n = get(&c.backend_calls[oi][ri]);
                    if n > 0 {
                        *calls
                            .entry((backend.as_str(), Arc::clone(&k.key), op, outcome))
                            .or_default() += n;
                        if ri == 0 {
                            spent
                                .entry((
                                    Arc::clone(&k.caller),
                                    Arc::clone(&k.key),
                                    backend.as_str(),
                                ))
                                .or_insert((0, per_10k))
                                .0 += n;
                        }
                    }
                }
            }
            let hits = get(&c.hits);
            if hits > 0 {
                avoided
                    .entry((Arc::clone(&k.caller), Arc::clone(&k.key), backend.as_str()))
                    .or_insert((0, per_10k))
                    .0 += hits;
            }
        }
        {
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
        }
        {
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
                for (oi, op) in BACKEND_OPS.iter().enumerate() {
                    let h = &self.metrics.backend_latency[b.code() as usize - 1][oi];
                    h.encode(m.encode_family(&BackendOpLabels {
                        backend: b.as_str(),
                        operation: op,
                    })?)?;
                }
            }
        }
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

        // Per-key figures from the registry.
        let registry = self.broker.registry();
        {
            let mut m = enc.encode_descriptor(
                "keybroker_key_monthly_cost_usd",
                "List price of keeping the key itself for a month, in US dollars (from the price table).",
                None,
                MetricType::Gauge,
            )?;
            for e in registry.iter() {
                let b = e.backend.kind();
                m.encode_family(&KeyLabels {
                    key: Arc::clone(&e.name),
                    backend: b.as_str(),
                })?
                .encode_gauge(&prices.get(b).key_month)?;
            }
        }
        {
            let mut m = enc.encode_descriptor(
                "keybroker_cache_evictions",
                "Cached data keys retired (TTL, usage limits, capacity, invalidation) by cache and key.",
                None,
                MetricType::Counter,
            )?;
            for e in registry.iter() {
                let enc_side = e
                    .stats
                    .op(Operation::Encrypt)
                    .evictions
                    .load(Ordering::Relaxed)
                    + e.stats
                        .op(Operation::GenerateDataKey)
                        .evictions
                        .load(Ordering::Relaxed);
                let dec_side = e
                    .stats
                    .op(Operation::Decrypt)
                    .evictions
                    .load(Ordering::Relaxed);
                for (cache, n) in [("encrypt", enc_side), ("decrypt", dec_side)] {
                    m.encode_family(&CacheKeyLabels {
                        cache,
                        key: Arc::clone(&e.name),
                    })?
                    .encode_counter::<CacheKeyLabels, _, u64>(&n, None)?;
                }
            }
        }
        {
            let (enc_n, dec_n) = self.broker.cache().entry_counts_now();
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
        }
        {
            let mut m = enc.encode_descriptor(
                "keybroker_audit_records_dropped",
                "Audit records dropped because the queue was full (best-effort mode only).",
                None,
                MetricType::Counter,
            )?;
            m.encode_counter::<OpLabels, _, u64>(&self.audit.dropped(), None)?;
        }
        {
            let mut m = enc.encode_descriptor(
                "keybroker_audit_writer_healthy",
                "1 while the audit log can be written, else 0.",
                None,
                MetricType::Gauge,
            )?;
            m.encode_gauge(&(self.audit.healthy() as u64))?;
        }
        {
            let mut m = enc.encode_descriptor(
                "keybroker_build",
                "Build information.",
                None,
                MetricType::Info,
            )?;
            m.encode_info(&BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
            })?;
        }
        process_metrics(&mut enc, self.metrics.start_time)
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

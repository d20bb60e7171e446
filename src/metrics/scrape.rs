//! The scrape side of the metrics: a collector over the live counters and the snapshot handed
//! over at scrape time, encoding every family in the Prometheus text format. Runs only when
//! scraped; must never take a lock the request path waits on for longer than a map read, or
//! see anything but counters and configured names.

use std::collections::BTreeMap;
use std::sync::Arc;

use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;

use super::*;

/// Collector over the live state, built for one scrape.
pub(super) struct Scrape {
    pub(super) metrics: Arc<Metrics>,
    pub(super) snapshot: Snapshot,
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

/// A per-listener gauge: its name, its help, and how to read it from a listener's figures.
type ListenerGauge = (&'static str, &'static str, fn(&ListenerFigures) -> u64);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ListenerLabels {
    listener: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ListenerLimitLabels {
    listener: String,
    limit: &'static str,
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
struct PrimaryLabels {
    key: Arc<str>,
    version: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusalLabels {
    key: Arc<str>,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabels {
    key: Arc<str>,
    version: Arc<str>,
    operation: &'static str,
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
        self.encode_listeners(&mut enc)?;
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
        self.encode_lifecycle(enc)?;
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

    /// Rotation age and schedule per key, pending deletion, retirement, and uses per version
    /// (docs/lifecycle.md; the alert rules in deploy/prometheus read these).
    fn encode_lifecycle(&self, enc: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let keys = &self.snapshot.keys;
        type Gauge = (
            &'static str,
            &'static str,
            fn(&super::LifecycleFigures) -> Option<f64>,
        );
        let gauges: [Gauge; 4] = [
            (
                "keybroker_key_primary_version_age_seconds",
                "Age of the key's primary version (keys whose backend reports it).",
                |l| l.primary_age_seconds,
            ),
            (
                "keybroker_key_rotation_period_seconds",
                "The key's automatic rotation period (keys with a schedule only).",
                |l| l.rotation_period_seconds,
            ),
            (
                "keybroker_key_pending_deletion",
                "1 while the key is scheduled for deletion (every use is refused).",
                |l| Some(if l.pending_deletion { 1.0 } else { 0.0 }),
            ),
            (
                "keybroker_key_min_decrypt_version",
                "Versions below this are retired for decryption (keys with retired versions only).",
                |l| (l.min_decrypt_version > 0).then_some(l.min_decrypt_version as f64),
            ),
        ];
        for (name, help, value) in gauges {
            let mut m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for k in keys {
                if let Some(v) = value(&k.lifecycle) {
                    m.encode_family(&KeyLabels {
                        key: Arc::clone(&k.name),
                        backend: k.backend.as_str(),
                    })?
                    .encode_gauge(&v)?;
                }
            }
        }
        let mut m = enc.encode_descriptor(
            "keybroker_key_primary_version",
            "The key's primary version (keys whose backend reports it).",
            None,
            MetricType::Info,
        )?;
        for k in keys {
            if let Some(v) = &k.lifecycle.primary_version {
                m.encode_info(&PrimaryLabels {
                    key: Arc::clone(&k.name),
                    version: Arc::from(v.as_str()),
                })?;
            }
        }
        let refusals: BTreeMap<(Arc<str>, &'static str), u64> =
            match self.metrics.lifecycle_refusals.read() {
                Ok(m) => m.iter().map(|(k, v)| (k.clone(), get(v))).collect(),
                Err(_) => BTreeMap::new(),
            };
        let mut m = enc.encode_descriptor(
            "keybroker_lifecycle_refusals",
            "Requests refused because of the key's lifecycle: a retired version, or pending deletion.",
            None,
            MetricType::Counter,
        )?;
        for ((key, reason), n) in refusals {
            m.encode_family(&RefusalLabels { key, reason })?
                .encode_counter::<RefusalLabels, _, u64>(&n, None)?;
        }
        let canaries: Vec<(&super::KeyFigures, &super::CanaryFigures)> = keys
            .iter()
            .filter_map(|k| k.lifecycle.canary.as_ref().map(|c| (k, c)))
            .collect();
        type CanaryGauge = (&'static str, &'static str, fn(&super::CanaryFigures) -> f64);
        let canary_gauges: [CanaryGauge; 3] = [
            (
                "keybroker_key_canary_ok",
                "1 if the key's latest break-glass check (wrap and unwrap through its backends) succeeded.",
                |c| if c.last_ok { 1.0 } else { 0.0 },
            ),
            (
                "keybroker_key_canary_last_success_timestamp_seconds",
                "Unix time of the key's latest successful break-glass check (0: none yet).",
                |c| c.last_success_unix as f64,
            ),
            (
                "keybroker_key_canary_interval_seconds",
                "How often the key's break-glass check runs.",
                |c| c.interval_seconds,
            ),
        ];
        for (name, help, value) in canary_gauges {
            let mut m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for (k, c) in &canaries {
                m.encode_family(&KeyLabels {
                    key: Arc::clone(&k.name),
                    backend: k.backend.as_str(),
                })?
                .encode_gauge(&value(c))?;
            }
        }
        let mut m = enc.encode_descriptor(
            "keybroker_key_canary_failures",
            "Failed break-glass checks of the key.",
            None,
            MetricType::Counter,
        )?;
        for (k, c) in &canaries {
            m.encode_family(&KeyLabels {
                key: Arc::clone(&k.name),
                backend: k.backend.as_str(),
            })?
            .encode_counter::<KeyLabels, _, u64>(&c.failures, None)?;
        }
        let uses: BTreeMap<super::VersionKey, u64> = match self.metrics.version_uses.read() {
            Ok(m) => m.iter().map(|(k, v)| (k.clone(), get(v))).collect(),
            Err(_) => BTreeMap::new(),
        };
        let mut m = enc.encode_descriptor(
            "keybroker_key_version_uses",
            "Successful requests per key version and operation (ReEncrypt: the source version).",
            None,
            MetricType::Counter,
        )?;
        for (k, n) in uses {
            m.encode_family(&VersionLabels {
                key: k.key,
                version: k.version,
                operation: k.op.as_str(),
            })?
            .encode_counter::<VersionLabels, _, u64>(&n, None)?;
        }
        Ok(())
    }

    /// Admission per listener: refusals by the limit that refused, and request slots in use.
    fn encode_listeners(&self, enc: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let listeners = &self.snapshot.listeners;
        let mut m = enc.encode_descriptor(
            "keybroker_overload_refusals",
            "Requests (limit=\"requests\": RESOURCE_EXHAUSTED, reason OVERLOADED) and connections \
             (limit=\"connections\") refused by the listener's [server.limits].",
            None,
            MetricType::Counter,
        )?;
        for l in listeners {
            for (limit, n) in [
                ("requests", l.refused_requests),
                ("connections", l.refused_connections),
            ] {
                m.encode_family(&ListenerLimitLabels {
                    listener: l.listener.clone(),
                    limit,
                })?
                .encode_counter::<ListenerLimitLabels, _, u64>(&n, None)?;
            }
        }
        let gauges: [ListenerGauge; 2] = [
            (
                "keybroker_requests_in_flight",
                "gRPC requests holding one of the listener's max_requests_in_flight slots now.",
                |l| l.requests_in_flight,
            ),
            (
                "keybroker_max_requests_in_flight",
                "The listener's max_requests_in_flight: beyond it requests are refused, not queued.",
                |l| l.max_requests_in_flight,
            ),
        ];
        for (name, help, value) in gauges {
            let mut m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for l in listeners {
                m.encode_family(&ListenerLabels {
                    listener: l.listener.clone(),
                })?
                .encode_gauge(&value(l))?;
            }
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
        let mut m = enc.encode_descriptor(
            "keybroker_audit_refusals",
            "Requests refused AUDIT_UNAVAILABLE: their audit record could not be queued (required mode).",
            None,
            MetricType::Counter,
        )?;
        m.encode_counter::<OpLabels, _, u64>(&self.snapshot.audit_refused, None)?;
        let (queued, peak, capacity) = self.snapshot.audit_queue;
        for (name, help, value) in [
            (
                "keybroker_audit_queue_records",
                "Audit records queued now (reserved by a request or waiting for the writer).",
                queued,
            ),
            (
                "keybroker_audit_queue_peak_records",
                "The most audit records queued at once since start; at the capacity, requests waited for the writer.",
                peak,
            ),
            (
                "keybroker_audit_queue_capacity",
                "The audit queue's size ([audit] queue).",
                capacity,
            ),
        ] {
            enc.encode_descriptor(name, help, None, MetricType::Gauge)?
                .encode_gauge(&value)?;
        }
        Ok(())
    }
}

/// The standard `process_*` metrics, read from /proc/self.
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

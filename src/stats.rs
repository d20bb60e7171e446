//! Per-key usage counters on the request path: plain atomics, so counting costs a few
//! nanoseconds and no lock. ListKeys reports them; the metrics exporter reads the same counters.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::operation::Operation;

/// Counters for one (key, operation).
#[derive(Debug, Default)]
pub struct OpCounters {
    pub requests: AtomicU64,
    pub cache_hits: AtomicU64,
    pub cache_misses: AtomicU64,
    pub cache_bypasses: AtomicU64,
    pub backend_calls: AtomicU64,
    pub evictions: AtomicU64,
}

/// A point-in-time copy of [`OpCounters`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct OpSnapshot {
    pub requests: u64,
    pub cache_hits: u64,
    pub cache_misses: u64,
    pub cache_bypasses: u64,
    pub backend_calls: u64,
    pub evictions: u64,
}

impl OpCounters {
    pub fn snapshot(&self) -> OpSnapshot {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        OpSnapshot {
            requests: get(&self.requests),
            cache_hits: get(&self.cache_hits),
            cache_misses: get(&self.cache_misses),
            cache_bypasses: get(&self.cache_bypasses),
            backend_calls: get(&self.backend_calls),
            evictions: get(&self.evictions),
        }
    }
}

/// Counters for one key, indexed by operation. Kept outside the key's configuration entry so
/// that they survive configuration reloads.
#[derive(Debug, Default)]
pub struct KeyStats {
    ops: [OpCounters; Operation::ALL.len()],
}

impl KeyStats {
    pub fn op(&self, op: Operation) -> &OpCounters {
        &self.ops[op.index()]
    }
}

/// Adds one to a counter.
pub fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

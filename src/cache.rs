//! The data-key caches: the lever that keeps most requests away from the (paid, rate-limited,
//! milliseconds-away) backend. docs/caching.md explains the limits and their defaults.
//!
//! - Encrypt side: per (key, caller, purpose, epoch) one active data key, made by ONE backend call and
//!   reused until the first of TTL, max messages, max bytes, a change of the key's generation
//!   (rotation, disable). Concurrent misses share one backend call (moka's single flight); a
//!   failed call is not cached and every waiter gets its error.
//! - Decrypt side: unwrapped data keys by a digest of (backend, key id, version, wrapped key,
//!   backend context, epoch), so N decrypts of messages under one data key cost one backend call. A hit
//!   only ever happens after the envelope header named the key (and the policy was checked by
//!   the caller of this module), and the message is still authenticated with the cached key.
//!
//! Limits are hard: an entry past its TTL or usage limits is never used again, even when the
//! backend is down (the request then fails with the backend's UNAVAILABLE). Key material lives in
//! [`SecretKey`]s inside `Arc`s; the last `Arc` dropping (after eviction and after in-flight
//! requests finish) zeroizes it. Nothing here logs or formats key bytes.
//!
//! A lookup returns what it did (hit, miss or bypass, and the backend calls this request made)
//! instead of recording it anywhere: the broker puts it into the request's facts. This module
//! never sees the request, the broker or the configuration; it owns its limits ([`CacheLimits`],
//! `[cache]`) and counts into the key's [`KeyStats`].

use std::fmt;
use std::hash::Hash;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use aws_lc_rs::digest;
use moka::future::Cache;
use moka::notification::RemovalCause;
use moka::ops::compute::Op;

use crate::backend::{BackendContext, BackendError, BackendKind, KeyBackend, Wrapped};
use crate::envelope::WrappedCopy;
use crate::facts::{BackendCall, BackendOp, CacheResult, CopyRef};
use crate::operation::Operation;
use crate::secret::SecretKey;
use crate::settings::{Problems, Section};
use crate::stats::{KeyStats, bump};
use crate::util::format_duration;

/// Cache defaults (docs/caching.md argues each number).
pub const DEFAULT_CACHE_TTL: Duration = Duration::from_secs(300);
pub const DEFAULT_MAX_MESSAGES: u64 = 1_000_000;
pub const DEFAULT_MAX_BYTES: u64 = 1 << 30;
pub const DEFAULT_CACHE_CAPACITY: u64 = 10_000;
/// Hard ceilings no configuration may exceed.
pub const MAX_CACHE_TTL: Duration = Duration::from_secs(24 * 3600);
pub const MAX_MAX_MESSAGES: u64 = 1 << 32;
pub const MAX_MAX_BYTES: u64 = 1 << 40;

/// Data-key cache limits for one key (or the global defaults).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheLimits {
    pub enabled: bool,
    pub ttl: Duration,
    pub max_messages: u64,
    pub max_bytes: u64,
}

impl Default for CacheLimits {
    fn default() -> Self {
        Self {
            enabled: true,
            ttl: DEFAULT_CACHE_TTL,
            max_messages: DEFAULT_MAX_MESSAGES,
            max_bytes: DEFAULT_MAX_BYTES,
        }
    }
}

impl CacheLimits {
    /// Reads `enabled`, `ttl`, `max_messages` and `max_bytes` over `base` (`[cache]` over the
    /// defaults, `[keys.NAME.cache]` over `[cache]`).
    pub fn parse(s: &Section<'_>, base: CacheLimits, p: &mut Problems) -> Self {
        let mut l = base;
        if let Some(b) = s.bool("enabled", p) {
            l.enabled = b;
        }
        if let Some(d) = s.duration("ttl", p) {
            if d.is_zero() || d > MAX_CACHE_TTL {
                p.push(
                    s.at("ttl"),
                    format!(
                        "must be above 0 and at most {}",
                        format_duration(MAX_CACHE_TTL)
                    ),
                );
            }
            l.ttl = d;
        }
        if let Some(n) = s.u64("max_messages", p) {
            if n == 0 || n > MAX_MAX_MESSAGES {
                p.push(
                    s.at("max_messages"),
                    format!("must be 1 to {MAX_MAX_MESSAGES} (2^32)"),
                );
            }
            l.max_messages = n;
        }
        if let Some(n) = s.size("max_bytes", p) {
            if n == 0 || n > MAX_MAX_BYTES {
                p.push(s.at("max_bytes"), "must be 1 byte to 1TiB");
            }
            l.max_bytes = n;
        }
        l
    }
}

/// What a new data key needs when one of its key's secondary wrapping backends cannot wrap it
/// (`require = "..."` of `[keys.NAME]`; docs/multi-backend.md).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Require {
    /// Every configured copy: the miss fails with the failing backend's error.
    #[default]
    All,
    /// The first backend's copy: the others are best effort (counted as missing copies).
    First,
}

impl Require {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::All => "all",
            Self::First => "first",
        }
    }

    /// Reads `require` (default `all`).
    pub fn parse(s: &Section<'_>, p: &mut Problems) -> Self {
        match s.str("require", p) {
            None | Some("all") => Self::All,
            Some("first") => Self::First,
            Some(_) => {
                p.push(s.at("require"), "must be \"all\" or \"first\"");
                Self::All
            }
        }
    }
}

/// How long a data key that lacks some of its copies (`require = "first"` during an outage)
/// stays in the encrypt-side cache at most: the outage should cost few ciphertexts their
/// escrow copy, and not a whole TTL's worth.
pub const DEGRADED_TTL: Duration = Duration::from_secs(30);

/// `[cache]`: the default limits of every key, and the caches' size.
#[derive(Debug, Clone)]
pub struct CacheConfig {
    pub defaults: CacheLimits,
    /// Entries across both caches (encrypt side and decrypt side each get this many).
    pub capacity: u64,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            defaults: CacheLimits::default(),
            capacity: DEFAULT_CACHE_CAPACITY,
        }
    }
}

impl CacheConfig {
    /// Reads `[cache]` (the caller reports unknown fields with `finish`).
    pub fn parse(s: &Section<'_>, p: &mut Problems) -> Self {
        let mut c = Self {
            defaults: CacheLimits::parse(s, CacheLimits::default(), p),
            ..Self::default()
        };
        if let Some(n) = s.u64("capacity", p) {
            if n == 0 {
                p.push(s.at("capacity"), "must be at least 1");
            }
            c.capacity = n;
        }
        c
    }
}

/// A freshly inserted entry means this request made the backend call.
fn result_of(fresh: bool) -> CacheResult {
    if fresh {
        CacheResult::Miss
    } else {
        CacheResult::Hit
    }
}

/// The parts of a configured key the caches work with (the registry's entry lends them).
#[derive(Clone, Copy)]
pub struct CachedKey<'a> {
    pub name: &'a Arc<str>,
    /// Part of every entry's identity: a reload that changes the key's backend or limits gives
    /// it a new epoch, so nothing cached under the old configuration is served under the new.
    pub epoch: u64,
    pub limits: CacheLimits,
    pub stats: &'a Arc<KeyStats>,
    /// The backend that generates data keys (encrypt side) or unwraps (decrypt side).
    pub backend: &'a dyn KeyBackend,
    /// `backend`'s place in the key's `wrap` list (for the facts of its calls).
    pub wrap: u8,
    /// Encrypt side: the key's other wrapping backends (`wrap[1..]`), each wrapping the data key
    /// `backend` made.
    pub secondaries: &'a [Arc<dyn KeyBackend>],
    pub require: Require,
    /// Changes whenever any wrapping backend's generation does (see `KeyHint`).
    pub generation: u64,
}

/// Why a lookup failed. Cloneable: single flight hands one failure to every waiting request.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CacheError {
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// Every pass found an exhausted entry (only under extreme contention on a tiny
    /// `max_messages`).
    #[error("data key cache contention")]
    Contention,
}

/// What one lookup did: its answer, and the backend calls this request made for it (none on a
/// hit; also when the call failed, which the metrics count).
#[derive(Debug)]
pub struct Lookup<T> {
    pub result: Result<(T, CacheResult), CacheError>,
    pub calls: Vec<BackendCall>,
}

/// What an encrypt-side data key is used for. Data keys behind GenerateDataKey are kept apart
/// from those that seal Encrypt messages. A GenerateDataKey data key is only ever the root of a
/// derivation (each call returns HKDF(root, fresh salt), see `envelope::seal_derived_data_key`):
/// it is always 32 bytes, whatever the requested spec, and is never handed out itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Purpose {
    Messages,
    DataKey { len: usize },
}

impl Purpose {
    fn key_len(self) -> usize {
        match self {
            Self::Messages | Self::DataKey { .. } => 32,
        }
    }

    fn operation(self) -> Operation {
        match self {
            Self::Messages => Operation::Encrypt,
            Self::DataKey { .. } => Operation::GenerateDataKey,
        }
    }
}

/// An encrypt-side cache slot. The key's cache epoch (see [`CachedKey::epoch`]) is part of it:
/// after a reload that changed the key's backend, old slots are unreachable.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Slot {
    key: Arc<str>,
    epoch: u64,
    caller: Arc<str>,
    purpose: Purpose,
}

/// An encrypt-side data key with its wrapped copies and its usage so far.
pub struct ActiveKey {
    data_key: SecretKey,
    backend: BackendKind,
    /// The first backend's copy.
    pub wrapped: Wrapped,
    /// The secondaries' copies, in `wrap` order (those that failed under `require = "first"`
    /// are missing, and listed in `missing`).
    pub more: Vec<(BackendKind, Wrapped)>,
    /// Wrapping backends whose copy this data key lacks (see [`DEGRADED_TTL`]).
    pub missing: Vec<CopyRef>,
    generation: u64,
    expires: Instant,
    messages: AtomicU64,
    bytes: AtomicU64,
    limits: CacheLimits,
    stats: Arc<KeyStats>,
    purpose: Purpose,
}

impl ActiveKey {
    pub fn data_key(&self) -> &SecretKey {
        &self.data_key
    }

    /// Every copy, the first backend's first: what the envelope carries.
    pub fn copies(&self) -> Vec<WrappedCopy<'_>> {
        std::iter::once(self.wrapped.as_copy(self.backend))
            .chain(self.more.iter().map(|(kind, w)| w.as_copy(*kind)))
            .collect()
    }

    fn fresh(&self, now: Instant, generation: u64) -> bool {
        now < self.expires && generation == self.generation
    }

    /// Counts one message of `bytes` against the limits; false once either limit would be passed.
    fn reserve(&self, bytes: u64) -> bool {
        let m = self.messages.fetch_add(1, Ordering::AcqRel) + 1;
        if m > self.limits.max_messages {
            return false;
        }
        let b = self
            .bytes
            .fetch_add(bytes, Ordering::AcqRel)
            .saturating_add(bytes);
        b <= self.limits.max_bytes
    }
}

impl fmt::Debug for ActiveKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ActiveKey")
            .field("data_key", &"<redacted>")
            .field("backend", &self.backend)
            .field("key_id", &self.wrapped.key_id)
            .field("key_version", &self.wrapped.key_version)
            .field("messages", &self.messages.load(Ordering::Relaxed))
            .field("bytes", &self.bytes.load(Ordering::Relaxed))
            .finish()
    }
}

/// A decrypt-side data key.
pub struct UnwrappedKey {
    data_key: SecretKey,
    expires: Instant,
    stats: Arc<KeyStats>,
    /// The configured key name it was cached for (so `forget_key` can find it).
    key: Arc<str>,
}

impl UnwrappedKey {
    pub fn data_key(&self) -> &SecretKey {
        &self.data_key
    }
}

impl fmt::Debug for UnwrappedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UnwrappedKey")
            .field("data_key", &"<redacted>")
            .finish()
    }
}

/// Per-entry expiry from each key's own TTL.
struct TtlExpiry;

impl moka::Expiry<Slot, Arc<ActiveKey>> for TtlExpiry {
    fn expire_after_create(&self, _: &Slot, v: &Arc<ActiveKey>, now: Instant) -> Option<Duration> {
        Some(v.expires.saturating_duration_since(now))
    }
}

impl moka::Expiry<[u8; 32], Arc<UnwrappedKey>> for TtlExpiry {
    fn expire_after_create(
        &self,
        _: &[u8; 32],
        v: &Arc<UnwrappedKey>,
        now: Instant,
    ) -> Option<Duration> {
        Some(v.expires.saturating_duration_since(now))
    }
}

pub struct DataKeyCache {
    encrypt: Cache<Slot, Arc<ActiveKey>>,
    decrypt: Cache<[u8; 32], Arc<UnwrappedKey>>,
}

impl fmt::Debug for DataKeyCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DataKeyCache")
            .field("encrypt_entries", &self.encrypt.entry_count())
            .field("decrypt_entries", &self.decrypt.entry_count())
            .finish()
    }
}

impl DataKeyCache {
    /// `capacity` entries per side.
    pub fn new(capacity: u64) -> Self {
        let encrypt = Cache::builder()
            .name("keybroker-encrypt-keys")
            .max_capacity(capacity)
            .expire_after(TtlExpiry)
            .support_invalidation_closures()
            .eviction_listener(|_k: Arc<Slot>, v: Arc<ActiveKey>, cause| {
                if cause != RemovalCause::Replaced {
                    bump(&v.stats.op(v.purpose.operation()).evictions);
                }
            })
            .build();
        let decrypt = Cache::builder()
            .name("keybroker-decrypt-keys")
            .max_capacity(capacity)
            .expire_after(TtlExpiry)
            .support_invalidation_closures()
            .eviction_listener(|_k, v: Arc<UnwrappedKey>, cause| {
                if cause != RemovalCause::Replaced {
                    bump(&v.stats.op(Operation::Decrypt).evictions);
                }
            })
            .build();
        Self { encrypt, decrypt }
    }

    /// The data key for one encrypt-side use of `bytes` bytes by `caller` with `key`.
    pub async fn active_key(
        &self,
        key: CachedKey<'_>,
        caller: &Arc<str>,
        purpose: Purpose,
        bytes: u64,
    ) -> Lookup<Arc<ActiveKey>> {
        let mut calls = Vec::new();
        let result = self
            .active_key_inner(key, caller, purpose, bytes, &mut calls)
            .await;
        Lookup { result, calls }
    }

    async fn active_key_inner(
        &self,
        key: CachedKey<'_>,
        caller: &Arc<str>,
        purpose: Purpose,
        bytes: u64,
        calls: &mut Vec<BackendCall>,
    ) -> Result<(Arc<ActiveKey>, CacheResult), CacheError> {
        let op = purpose.operation();
        let generation = key.generation;
        // A message larger than a whole data key's byte budget gets a data key of its own.
        if !key.limits.enabled || bytes > key.limits.max_bytes {
            let active = self
                .fetch(key, caller, purpose, generation, false, calls)
                .await?;
            count(key.stats, op, CacheResult::Bypass);
            return Ok((active, CacheResult::Bypass));
        }
        let slot = Slot {
            key: Arc::clone(key.name),
            epoch: key.epoch,
            caller: Arc::clone(caller),
            purpose,
        };
        // Each pass either returns or retires one exhausted entry; a handful of passes only
        // happen under extreme contention on a tiny max_messages.
        for _ in 0..8 {
            let got = self
                .encrypt
                .entry(slot.clone())
                .or_try_insert_with(self.fetch(key, caller, purpose, generation, true, calls))
                .await
                .map_err(|e| (*e).clone())?;
            let result = result_of(got.is_fresh());
            let active = got.into_value();
            // A key this request just made is used even if a tiny TTL already ran out while the
            // backend answered; a cached one must still be within its TTL and generation.
            let fresh = result == CacheResult::Miss || active.fresh(Instant::now(), generation);
            if fresh && active.reserve(bytes) {
                count(key.stats, op, result);
                return Ok((active, result));
            }
            self.retire(&slot, &active).await;
        }
        Err(CacheError::Contention)
    }

    /// Removes `slot` only if it still holds `old` (another request may have replaced it).
    async fn retire(&self, slot: &Slot, old: &Arc<ActiveKey>) {
        let old = Arc::clone(old);
        self.encrypt
            .entry(slot.clone())
            .and_compute_with(|current| async move {
                match current {
                    Some(e) if Arc::ptr_eq(e.value(), &old) => Op::Remove,
                    _ => Op::Nop,
                }
            })
            .await;
    }

    /// One backend call for a new data key, then one per secondary wrapping backend (in
    /// parallel, each under its own call policy's deadline). The unwrapped form is also placed
    /// in the decrypt cache under every copy, so reading back what was just written costs no
    /// second call.
    async fn fetch(
        &self,
        key: CachedKey<'_>,
        caller: &Arc<str>,
        purpose: Purpose,
        generation: u64,
        seed_decrypt: bool,
        calls: &mut Vec<BackendCall>,
    ) -> Result<Arc<ActiveKey>, CacheError> {
        let ctx = BackendContext {
            key_name: key.name,
            caller,
        };
        let backend = key.backend.kind();
        bump(&key.stats.op(purpose.operation()).backend_calls);
        let (result, call) = crate::backend::timed(
            backend,
            key.wrap,
            BackendOp::GenerateDataKey,
            key.backend.generate_data_key(purpose.key_len(), &ctx),
        )
        .await;
        calls.push(call);
        let (data_key, wrapped) = result?;
        let wraps = key.secondaries.iter().enumerate().map(|(i, b)| {
            bump(&key.stats.op(purpose.operation()).backend_calls);
            let index = u8::try_from(i + 1).unwrap_or(u8::MAX);
            crate::backend::timed(b.kind(), index, BackendOp::Wrap, b.wrap(&data_key, &ctx))
        });
        let mut more = Vec::with_capacity(key.secondaries.len());
        let mut missing = Vec::new();
        for (result, call) in futures_util::future::join_all(wraps).await {
            calls.push(call);
            match result {
                Ok(w) => more.push((call.backend, w)),
                Err(e) if key.require == Require::First => {
                    tracing::warn!(
                        key = %key.name,
                        error = %e,
                        wrap = call.wrap,
                        "a secondary backend could not wrap a new data key; it goes without that copy"
                    );
                    missing.push(CopyRef {
                        index: call.wrap,
                        backend: call.backend,
                    });
                }
                Err(e) => return Err(e.into()),
            }
        }
        let now = Instant::now();
        let ttl = if missing.is_empty() {
            key.limits.ttl
        } else {
            key.limits.ttl.min(DEGRADED_TTL)
        };
        let active = ActiveKey {
            data_key,
            backend,
            wrapped,
            more,
            missing,
            generation,
            expires: now + ttl,
            messages: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            limits: key.limits,
            stats: Arc::clone(key.stats),
            purpose,
        };
        if seed_decrypt {
            for copy in active.copies() {
                let unwrapped = UnwrappedKey {
                    data_key: active.data_key.duplicate(),
                    expires: now + key.limits.ttl,
                    stats: Arc::clone(key.stats),
                    key: Arc::clone(key.name),
                };
                self.decrypt
                    .insert(copy_digest(&copy, &ctx, key.epoch), Arc::new(unwrapped))
                    .await;
            }
        }
        Ok(Arc::new(active))
    }

    /// A cached data key for any of `copies` (all of one envelope), without a backend call: a
    /// data key unwrapped through one copy serves later requests that name it through another.
    /// Only mappings a backend (or this process, having made the data key) vouched for are
    /// ever inserted, so a crafted copy list cannot make one copy stand for another's key.
    pub async fn peek_unwrapped(
        &self,
        key: CachedKey<'_>,
        copies: &[WrappedCopy<'_>],
        ctx: &BackendContext<'_>,
        op: Operation,
    ) -> Option<(usize, Arc<UnwrappedKey>)> {
        if !key.limits.enabled {
            return None;
        }
        for (i, copy) in copies.iter().enumerate() {
            if let Some(hit) = self.decrypt.get(&copy_digest(copy, ctx, key.epoch)).await
                && Instant::now() < hit.expires
            {
                count(key.stats, op, CacheResult::Hit);
                return Some((i, hit));
            }
        }
        None
    }

    /// The unwrapped data key of an envelope's wrapped copy. `op` is the request's operation
    /// (Decrypt or ReEncrypt), for the counters.
    pub async fn unwrapped_key(
        &self,
        key: CachedKey<'_>,
        copy: &WrappedCopy<'_>,
        ctx: &BackendContext<'_>,
        op: Operation,
    ) -> Lookup<Arc<UnwrappedKey>> {
        let mut calls = Vec::new();
        let result = self
            .unwrapped_key_inner(key, copy, ctx, op, &mut calls)
            .await;
        Lookup { result, calls }
    }

    async fn unwrapped_key_inner(
        &self,
        key: CachedKey<'_>,
        copy: &WrappedCopy<'_>,
        ctx: &BackendContext<'_>,
        op: Operation,
        calls: &mut Vec<BackendCall>,
    ) -> Result<(Arc<UnwrappedKey>, CacheResult), CacheError> {
        if !key.limits.enabled {
            let unwrapped = Self::unwrap(key, copy, ctx, op, calls).await?;
            count(key.stats, op, CacheResult::Bypass);
            return Ok((unwrapped, CacheResult::Bypass));
        }
        let digest = copy_digest(copy, ctx, key.epoch);
        // A second pass only after an expired entry was dropped.
        for _ in 0..2 {
            let got = self
                .decrypt
                .entry(digest)
                .or_try_insert_with(Self::unwrap(key, copy, ctx, op, calls))
                .await
                .map_err(|e| (*e).clone())?;
            let result = result_of(got.is_fresh());
            let unwrapped = got.into_value();
            if result == CacheResult::Hit && Instant::now() >= unwrapped.expires {
                // Past its TTL but not yet swept: never use it; fetch anew.
                self.decrypt.invalidate(&digest).await;
                continue;
            }
            count(key.stats, op, result);
            return Ok((unwrapped, result));
        }
        Err(CacheError::Contention)
    }

    /// One backend call to unwrap `copy`.
    async fn unwrap(
        key: CachedKey<'_>,
        copy: &WrappedCopy<'_>,
        ctx: &BackendContext<'_>,
        op: Operation,
        calls: &mut Vec<BackendCall>,
    ) -> Result<Arc<UnwrappedKey>, CacheError> {
        bump(&key.stats.op(op).backend_calls);
        let (result, call) = crate::backend::timed(
            key.backend.kind(),
            key.wrap,
            BackendOp::Unwrap,
            key.backend.unwrap(copy, ctx),
        )
        .await;
        calls.push(call);
        Ok(Arc::new(UnwrappedKey {
            data_key: result?,
            expires: Instant::now() + key.limits.ttl,
            stats: Arc::clone(key.stats),
            key: Arc::clone(key.name),
        }))
    }

    /// Seeds the decrypt side with a data key this process holds (ReEncrypt's new copy).
    pub async fn remember_unwrapped(
        &self,
        key: CachedKey<'_>,
        copy: &WrappedCopy<'_>,
        ctx: &BackendContext<'_>,
        data_key: &SecretKey,
    ) {
        if !key.limits.enabled {
            return;
        }
        let unwrapped = UnwrappedKey {
            data_key: data_key.duplicate(),
            expires: Instant::now() + key.limits.ttl,
            stats: Arc::clone(key.stats),
            key: Arc::clone(key.name),
        };
        self.decrypt
            .insert(copy_digest(copy, ctx, key.epoch), Arc::new(unwrapped))
            .await;
    }

    /// Drops every cached data key of `key`, on both sides and of every epoch (after a reload
    /// changed its backend or limits). Entries of older epochs are already unreachable (the
    /// epoch is part of their identity); this frees and zeroizes them now rather than at their
    /// TTL.
    pub fn forget_key(&self, key: &str) {
        let name: Arc<str> = Arc::from(key);
        let encrypt_name = Arc::clone(&name);
        let _ = self
            .encrypt
            .invalidate_entries_if(move |slot, _| slot.key == encrypt_name);
        let _ = self
            .decrypt
            .invalidate_entries_if(move |_, unwrapped| unwrapped.key == name);
    }

    /// Approximate entry counts (encrypt side, decrypt side), without waiting.
    pub fn entry_counts_now(&self) -> (u64, u64) {
        (self.encrypt.entry_count(), self.decrypt.entry_count())
    }

    /// Entry counts (encrypt side, decrypt side), after pending maintenance.
    pub async fn entry_counts(&self) -> (u64, u64) {
        self.encrypt.run_pending_tasks().await;
        self.decrypt.run_pending_tasks().await;
        (self.encrypt.entry_count(), self.decrypt.entry_count())
    }
}

/// Counts one cache lookup in the key's per-operation counters.
fn count(stats: &KeyStats, op: Operation, result: CacheResult) {
    let c = stats.op(op);
    bump(match result {
        CacheResult::Hit => &c.cache_hits,
        CacheResult::Miss => &c.cache_misses,
        CacheResult::Bypass => &c.cache_bypasses,
    });
}

/// SHA-256 over the length-prefixed identity of a wrapped copy, its backend context and the
/// key's cache epoch.
fn copy_digest(copy: &WrappedCopy<'_>, ctx: &BackendContext<'_>, epoch: u64) -> [u8; 32] {
    let mut h = digest::Context::new(&digest::SHA256);
    h.update(b"keybroker decrypt cache v2");
    h.update(&epoch.to_be_bytes());
    h.update(&[copy.backend.code()]);
    let mut aad = Vec::with_capacity(96);
    ctx.encode_aad(&mut aad);
    for part in [
        copy.key_id.as_bytes(),
        copy.key_version.as_bytes(),
        copy.wrapped,
        &aad,
    ] {
        h.update(&(part.len() as u64).to_be_bytes());
        h.update(part);
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(h.finish().as_ref());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;

    /// Every way the bytes of `key` could show up in formatted output.
    fn renderings(key: &[u8]) -> Vec<String> {
        let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
        let list = format!("{key:?}");
        vec![
            hex.clone(),
            hex.to_uppercase(),
            list[1..list.len() - 1].to_owned(),
            base64::engine::general_purpose::STANDARD.encode(key),
        ]
    }

    #[test]
    fn debug_of_key_holding_types_shows_no_key_bytes() {
        let bytes: Vec<u8> = (100..132).collect();
        let stats = Arc::new(KeyStats::default());
        let active = ActiveKey {
            data_key: SecretKey::from_slice(&bytes),
            backend: BackendKind::Local,
            wrapped: Wrapped {
                key_id: "k".into(),
                key_version: "1".into(),
                ciphertext: vec![1, 2, 3],
            },
            more: Vec::new(),
            missing: Vec::new(),
            generation: 0,
            expires: Instant::now(),
            messages: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            limits: CacheLimits::default(),
            stats: Arc::clone(&stats),
            purpose: Purpose::Messages,
        };
        let unwrapped = UnwrappedKey {
            data_key: SecretKey::from_slice(&bytes),
            expires: Instant::now(),
            stats,
            key: Arc::from("k"),
        };
        for dbg in [
            format!("{active:?}"),
            format!("{unwrapped:?}"),
            format!("{:?}", Arc::new(active)),
        ] {
            for r in renderings(&bytes) {
                assert!(!dbg.contains(&r), "{dbg} shows the key as {r}");
            }
            assert!(dbg.contains("redacted"), "{dbg}");
        }
    }

    #[test]
    fn reservations_stop_at_either_limit() {
        let key = |max_messages, max_bytes| ActiveKey {
            data_key: SecretKey::from_slice(&[0; 32]),
            backend: BackendKind::Local,
            wrapped: Wrapped {
                key_id: "k".into(),
                key_version: "1".into(),
                ciphertext: vec![1],
            },
            more: Vec::new(),
            missing: Vec::new(),
            generation: 0,
            expires: Instant::now(),
            messages: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            limits: CacheLimits {
                max_messages,
                max_bytes,
                ..CacheLimits::default()
            },
            stats: Arc::new(KeyStats::default()),
            purpose: Purpose::Messages,
        };
        let k = key(3, 1 << 20);
        assert!(k.reserve(1) && k.reserve(1) && k.reserve(1));
        assert!(!k.reserve(1));
        let k = key(100, 10);
        assert!(k.reserve(6));
        assert!(!k.reserve(6));
    }
}

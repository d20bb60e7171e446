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

use std::fmt;
use std::hash::Hash;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use aws_lc_rs::digest;
use moka::future::Cache;
use moka::notification::RemovalCause;
use moka::ops::compute::Op;

use crate::backend::{BackendContext, BackendKind, Wrapped};
use crate::broker::{BackendCall, BackendOp, Facts};
use crate::config::CacheLimits;
use crate::envelope::WrappedCopy;
use crate::error::Error;
use crate::operation::Operation;
use crate::registry::KeyEntry;
use crate::secret::SecretKey;
use crate::stats::{KeyStats, bump};

/// How a request's data key was obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheResult {
    /// From the cache (including requests that waited for another request's backend call).
    Hit,
    /// This request made the backend call.
    Miss,
    /// Caching is off for the key: the request made its own backend call.
    Bypass,
}

impl CacheResult {
    /// A freshly inserted entry means this request made the backend call.
    fn of(fresh: bool) -> Self {
        if fresh { Self::Miss } else { Self::Hit }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Hit => "hit",
            Self::Miss => "miss",
            Self::Bypass => "bypass",
        }
    }
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

/// An encrypt-side cache slot. The key's cache epoch (see `KeyEntry::cache_epoch`) is part of it:
/// after a reload that changed the key's backend, old slots are unreachable.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Slot {
    key: Arc<str>,
    epoch: u64,
    caller: Arc<str>,
    purpose: Purpose,
}

/// An encrypt-side data key with its wrapped copy and its usage so far.
pub struct ActiveKey {
    data_key: SecretKey,
    backend: BackendKind,
    pub wrapped: Wrapped,
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

    pub fn copy(&self) -> WrappedCopy<'_> {
        self.wrapped.as_copy(self.backend)
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
    fn expire_after_create(&self, _: &Slot, v: &Arc<ActiveKey>, _: Instant) -> Option<Duration> {
        Some(v.limits.ttl)
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

    /// The data key for one encrypt-side use of `bytes` bytes by `caller` with `entry`'s key.
    pub async fn active_key(
        &self,
        entry: &KeyEntry,
        caller: &Arc<str>,
        purpose: Purpose,
        bytes: u64,
        facts: &mut Facts,
    ) -> Result<(Arc<ActiveKey>, CacheResult), Error> {
        let op = purpose.operation();
        let generation = entry.backend.hint().generation;
        // A message larger than a whole data key's byte budget gets a data key of its own.
        if !entry.cache.enabled || bytes > entry.cache.max_bytes {
            let key = self
                .fetch(entry, caller, purpose, generation, false, facts)
                .await?;
            count(entry, op, CacheResult::Bypass);
            return Ok((key, CacheResult::Bypass));
        }
        let slot = Slot {
            key: Arc::clone(&entry.name),
            epoch: entry.cache_epoch,
            caller: Arc::clone(caller),
            purpose,
        };
        // Each pass either returns or retires one exhausted entry; a handful of passes only
        // happen under extreme contention on a tiny max_messages.
        for _ in 0..8 {
            let got = self
                .encrypt
                .entry(slot.clone())
                .or_try_insert_with(self.fetch(entry, caller, purpose, generation, true, facts))
                .await
                .map_err(|e| (*e).clone())?;
            let result = CacheResult::of(got.is_fresh());
            let key = got.into_value();
            // A key this request just made is used even if a tiny TTL already ran out while the
            // backend answered; a cached one must still be within its TTL and generation.
            let fresh = result == CacheResult::Miss || key.fresh(Instant::now(), generation);
            if fresh && key.reserve(bytes) {
                count(entry, op, result);
                return Ok((key, result));
            }
            self.retire(&slot, &key).await;
        }
        Err(Error::Internal("data key cache contention"))
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

    /// One backend call for a new data key. The unwrapped form is also placed in the decrypt
    /// cache, so reading back what was just written costs no second call.
    async fn fetch(
        &self,
        entry: &KeyEntry,
        caller: &Arc<str>,
        purpose: Purpose,
        generation: u64,
        seed_decrypt: bool,
        facts: &mut Facts,
    ) -> Result<Arc<ActiveKey>, Error> {
        let ctx = BackendContext {
            key_name: &entry.name,
            caller,
        };
        bump(&entry.stats.op(purpose.operation()).backend_calls);
        let (data_key, wrapped) = BackendCall::record(
            facts,
            BackendOp::GenerateDataKey,
            entry.backend.generate_data_key(purpose.key_len(), &ctx),
        )
        .await
        .map_err(|e| Error::backend(&entry.name, e))?;
        let now = Instant::now();
        let backend = entry.backend.kind();
        if seed_decrypt {
            let digest = copy_digest(&wrapped.as_copy(backend), &ctx, entry.cache_epoch);
            let unwrapped = UnwrappedKey {
                data_key: data_key.duplicate(),
                expires: now + entry.cache.ttl,
                stats: Arc::clone(&entry.stats),
                key: Arc::clone(&entry.name),
            };
            self.decrypt.insert(digest, Arc::new(unwrapped)).await;
        }
        Ok(Arc::new(ActiveKey {
            data_key,
            backend,
            wrapped,
            generation,
            expires: now + entry.cache.ttl,
            messages: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            limits: entry.cache,
            stats: Arc::clone(&entry.stats),
            purpose,
        }))
    }

    /// The unwrapped data key of an envelope's wrapped copy. `op` is the request's operation
    /// (Decrypt or ReEncrypt), for the counters.
    pub async fn unwrapped_key(
        &self,
        entry: &KeyEntry,
        copy: &WrappedCopy<'_>,
        ctx: &BackendContext<'_>,
        op: Operation,
        facts: &mut Facts,
    ) -> Result<(Arc<UnwrappedKey>, CacheResult), Error> {
        let unwrap = async {
            bump(&entry.stats.op(op).backend_calls);
            let data_key =
                BackendCall::record(facts, BackendOp::Unwrap, entry.backend.unwrap(copy, ctx))
                    .await
                    .map_err(|e| Error::backend(&entry.name, e))?;
            Ok::<_, Error>(Arc::new(UnwrappedKey {
                data_key,
                expires: Instant::now() + entry.cache.ttl,
                stats: Arc::clone(&entry.stats),
                key: Arc::clone(&entry.name),
            }))
        };
        if !entry.cache.enabled {
            let key = unwrap.await?;
            count(entry, op, CacheResult::Bypass);
            return Ok((key, CacheResult::Bypass));
        }
        let digest = copy_digest(copy, ctx, entry.cache_epoch);
        let got = self
            .decrypt
            .entry(digest)
            .or_try_insert_with(unwrap)
            .await
            .map_err(|e| (*e).clone())?;
        let result = CacheResult::of(got.is_fresh());
        let key = got.into_value();
        if result == CacheResult::Hit && Instant::now() >= key.expires {
            // Past its TTL but not yet swept: never use it; fetch anew.
            self.decrypt.invalidate(&digest).await;
            return Box::pin(self.unwrapped_key(entry, copy, ctx, op, facts)).await;
        }
        count(entry, op, result);
        Ok((key, result))
    }

    /// Seeds the decrypt side with a data key this process holds (ReEncrypt's new copy).
    pub async fn remember_unwrapped(
        &self,
        entry: &KeyEntry,
        copy: &WrappedCopy<'_>,
        ctx: &BackendContext<'_>,
        data_key: &SecretKey,
    ) {
        if !entry.cache.enabled {
            return;
        }
        let unwrapped = UnwrappedKey {
            data_key: data_key.duplicate(),
            expires: Instant::now() + entry.cache.ttl,
            stats: Arc::clone(&entry.stats),
            key: Arc::clone(&entry.name),
        };
        self.decrypt
            .insert(
                copy_digest(copy, ctx, entry.cache_epoch),
                Arc::new(unwrapped),
            )
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
fn count(entry: &KeyEntry, op: Operation, result: CacheResult) {
    let c = entry.stats.op(op);
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
        let response = crate::proto::GenerateDataKeyResponse {
            plaintext_key: bytes.clone().into(),
            wrapped_key: vec![9; 4].into(),
            key: "k".into(),
            key_version: "1".into(),
        };
        let decrypted = crate::proto::DecryptResponse {
            plaintext: bytes.clone().into(),
            key: "k".into(),
            key_version: "1".into(),
        };
        let request = crate::proto::EncryptRequest {
            key: "k".into(),
            plaintext: bytes.clone().into(),
            context: Default::default(),
        };
        for dbg in [
            format!("{active:?}"),
            format!("{unwrapped:?}"),
            format!("{:?}", Arc::new(active)),
            format!("{response:?}"),
            format!("{decrypted:?}"),
            format!("{request:?}"),
            format!("{:#?}", response),
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

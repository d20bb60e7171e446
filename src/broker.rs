//! The operations themselves (Encrypt, Decrypt, GenerateDataKey, ReEncrypt, ListKeys),
//! independent of gRPC: validate, route the key name, check policy and key state, get a data
//! key from the cache (or backend), seal or open the envelope.
//!
//! Order matters and is the same everywhere: input limits, then the key's configuration entry,
//! then the caller's permission, then the key's state, and only then the cache, so that neither a
//! cached data key nor a cache hit can get around the policy or a disabled key.
//! Each operation fills a [`Facts`] as it learns things (what the cache and the backends report
//! included), so the audit record and the metrics of a failed request still say which key,
//! backend and version were involved. Must never: touch a data key before the policy and the
//! key's state allowed the request, or let anything but [`Error`] out (no transport types here).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;

use crate::backend::{
    BackendContext, BackendError, BackendKind, KeyBackend, Lifecycle, Wrapped, breaker,
};
use crate::cache::{
    ActiveKey, CacheError, CacheLimits, DataKeyCache, Lookup, Purpose, Require, UnwrappedKey,
};
use crate::envelope::{self, Envelope, Kind, WrappedCopy};
use crate::error::Error;
use crate::facts::{BackendCall, BackendOp, CacheResult, CopyRef, Facts};
use crate::operation::Operation;
use crate::policy::Need;
use crate::principal::Caller;
use crate::registry::{KeyEntry, Registry};
use crate::secret::SecretKey;
use crate::stats::{OpSnapshot, bump};

mod batch;
mod stream;

pub use batch::{DecryptBatch, EncryptBatch};
pub use stream::{StreamDecrypt, StreamEncrypt};

/// Envelope overhead allowance on top of the plaintext limit when accepting ciphertexts: the
/// largest header the format allows (8 copies of the longest ids and wrapped keys) plus the tag.
pub const CIPHERTEXT_OVERHEAD: u64 = 128 << 10;

/// Records what a request learnt from its key's configuration entry.
fn note_entry(facts: &mut Facts, entry: &KeyEntry) {
    facts.key = Some(Arc::clone(&entry.name));
    facts.backend = Some(entry.backend.kind());
    facts.backend_key_id = Some(Arc::clone(&entry.backend_key_id));
    facts.wraps = u8::try_from(entry.wraps.len()).unwrap_or(u8::MAX);
}

/// Feeds a request's backend calls to the breakers of the wrapping backends they went to.
fn record_health(entry: &KeyEntry, calls: &[BackendCall]) {
    for call in calls {
        if let Some(b) = entry.breakers.get(usize::from(call.wrap)) {
            b.record(call);
        }
    }
}

/// What a request learnt from the encrypt-side data key it used: its version, and on the
/// request that made it, the copies it lacks (`require = "first"`).
fn note_active(facts: &mut Facts, active: &ActiveKey, result: CacheResult) {
    facts.cache = Some(result);
    facts.key_version = Some(active.wrapped.key_version.clone());
    if result != CacheResult::Hit {
        facts.missing_copies.extend_from_slice(&active.missing);
    }
}

/// A cache lookup's answer; its backend calls go into the request's facts.
fn take<T>(
    lookup: Lookup<T>,
    entry: &KeyEntry,
    facts: &mut Facts,
) -> Result<(T, CacheResult), Error> {
    record_health(entry, &lookup.calls);
    facts.backend_calls.extend(lookup.calls);
    lookup.result.map_err(|e| match e {
        CacheError::Backend(e) => Error::backend(&entry.name, e),
        CacheError::Contention => Error::Internal("data key cache contention"),
    })
}

pub struct EncryptOutput {
    pub ciphertext: Vec<u8>,
    pub key: Arc<str>,
    pub key_version: String,
}

pub struct DecryptOutput {
    /// The payload, or for a data-key blob the data key; zeroized when the response is dropped.
    pub plaintext: SecretKey,
    pub key: Arc<str>,
    pub key_version: String,
}

pub struct DataKeyOutput {
    /// Zeroized when the response that carries it is dropped (see [`SecretKey::into_bytes`]).
    pub plaintext_key: SecretKey,
    pub wrapped_key: Vec<u8>,
    pub key: Arc<str>,
    pub key_version: String,
}

pub struct ReEncryptOutput {
    pub ciphertext: Vec<u8>,
    pub key: Arc<str>,
    pub key_version: String,
    pub source_key: Arc<str>,
    pub source_key_version: String,
}

/// One key as ListKeys shows it.
#[derive(Debug, Clone)]
pub struct KeyListing {
    pub name: Arc<str>,
    pub description: String,
    pub backend: BackendKind,
    pub backend_key_id: String,
    /// Every wrapping backend (kind, key id as configured, health), the first one first.
    pub wraps: Vec<(BackendKind, String, breaker::Health)>,
    pub require: Require,
    pub enabled: bool,
    pub cache: CacheLimits,
    pub stats: Vec<(Operation, OpSnapshot)>,
    /// The first wrapping backend's lifecycle (rotation schedule, retirement, deletion).
    pub lifecycle: Option<Lifecycle>,
    /// Scheduled for deletion (in any wrapping backend).
    pub pending_deletion: bool,
}

/// Data key lengths GenerateDataKey offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataKeySpec {
    Aes256,
    Aes128,
}

impl DataKeySpec {
    pub fn key_len(self) -> usize {
        match self {
            Self::Aes256 => 32,
            Self::Aes128 => 16,
        }
    }
}

pub struct Broker {
    registry: ArcSwap<Registry>,
    cache: DataKeyCache,
    max_plaintext: u64,
}

impl Broker {
    pub fn new(registry: Registry, cache_capacity: u64, max_plaintext: u64) -> Self {
        Self {
            registry: ArcSwap::from_pointee(registry),
            cache: DataKeyCache::new(cache_capacity),
            max_plaintext,
        }
    }

    /// Swaps in a new registry (configuration reload). Requests in flight finish on the old one.
    pub fn replace_registry(&self, registry: Registry) {
        self.registry.store(Arc::new(registry));
    }

    pub fn registry(&self) -> Arc<Registry> {
        self.registry.load_full()
    }

    pub fn cache(&self) -> &DataKeyCache {
        &self.cache
    }

    pub async fn encrypt(
        &self,
        caller: &Caller,
        key: &str,
        plaintext: &[u8],
        context: &BTreeMap<String, String>,
        facts: &mut Facts,
    ) -> Result<EncryptOutput, Error> {
        facts.bytes = plaintext.len() as u64;
        self.check_size("plaintext", plaintext.len(), self.max_plaintext)?;
        check_context(context, "context")?;
        check_key_field(key, "key")?;
        let registry = self.registry.load();
        let entry = self.usable_key(&registry, caller, key, Need::Op(Operation::Encrypt), facts)?;
        let lookup = self
            .cache
            .active_key(
                entry.cached(),
                &caller.name,
                Purpose::Messages,
                plaintext.len() as u64,
            )
            .await;
        let (active, result) = take(lookup, entry, facts)?;
        note_active(facts, &active, result);
        let ciphertext = envelope::seal(
            Kind::Message,
            &entry.name,
            &caller.name,
            &active.copies(),
            active.data_key(),
            context,
            plaintext,
        )
        .map_err(seal_error)?;
        Ok(EncryptOutput {
            ciphertext,
            key: Arc::clone(&entry.name),
            key_version: active.wrapped.key_version.clone(),
        })
    }

    pub async fn decrypt(
        &self,
        caller: &Caller,
        ciphertext: &[u8],
        context: &BTreeMap<String, String>,
        facts: &mut Facts,
    ) -> Result<DecryptOutput, Error> {
        self.check_size(
            "ciphertext",
            ciphertext.len(),
            self.max_plaintext + CIPHERTEXT_OVERHEAD,
        )?;
        check_context(context, "context")?;
        let env = envelope::parse(ciphertext)?;
        facts.bytes = env.payload_len() as u64;
        let registry = self.registry.load();
        let entry = self.usable_key(
            &registry,
            caller,
            env.key_name,
            Need::Op(Operation::Decrypt),
            facts,
        )?;
        let (plaintext, version) = self
            .open(entry, &env, context, Operation::Decrypt, facts)
            .await?;
        Ok(DecryptOutput {
            plaintext,
            key: Arc::clone(&entry.name),
            key_version: version,
        })
    }

    pub async fn generate_data_key(
        &self,
        caller: &Caller,
        key: &str,
        spec: DataKeySpec,
        context: &BTreeMap<String, String>,
        facts: &mut Facts,
    ) -> Result<DataKeyOutput, Error> {
        check_context(context, "context")?;
        check_key_field(key, "key")?;
        let registry = self.registry.load();
        let entry = self.usable_key(
            &registry,
            caller,
            key,
            Need::Op(Operation::GenerateDataKey),
            facts,
        )?;
        let purpose = Purpose::DataKey {
            len: spec.key_len(),
        };
        let lookup = self
            .cache
            .active_key(entry.cached(), &caller.name, purpose, 0)
            .await;
        let (active, result) = take(lookup, entry, facts)?;
        note_active(facts, &active, result);
        facts.bytes = spec.key_len() as u64;
        // The cached data key is only the root of a derivation: every call gets its own key,
        // HKDF(root, fresh salt), and the blob carries the salt (docs/envelope.md, kind 3).
        let (wrapped_key, plaintext_key) = envelope::seal_derived_data_key(
            &entry.name,
            &caller.name,
            &active.copies(),
            active.data_key(),
            context,
            spec.key_len(),
        )
        .map_err(seal_error)?;
        Ok(DataKeyOutput {
            plaintext_key,
            wrapped_key,
            key: Arc::clone(&entry.name),
            key_version: active.wrapped.key_version.clone(),
        })
    }

    /// Wraps a key the caller brings (the Kubernetes KMS v2 plugin's DEK seed) under `key`'s
    /// current backend version: exactly one backend wrap, no data-key cache (the seed is the
    /// data key), sealed as a data-key envelope (kind 2, empty body, no context), so
    /// [`Broker::decrypt`] returns the seed and its decrypt-side cache serves repeats. The seed is
    /// never remembered here.
    pub async fn wrap_key(
        &self,
        caller: &Caller,
        key: &str,
        seed: &SecretKey,
        facts: &mut Facts,
    ) -> Result<EncryptOutput, Error> {
        facts.bytes = seed.len() as u64;
        check_key_field(key, "key")?;
        let registry = self.registry.load();
        let entry = self.usable_key(&registry, caller, key, Need::Op(Operation::Encrypt), facts)?;
        let ctx = BackendContext {
            key_name: &entry.name,
            caller: &caller.name,
        };
        bump(&entry.stats.op(Operation::Encrypt).backend_calls);
        let (wrapped, call) = crate::backend::timed(
            entry.backend.kind(),
            0,
            BackendOp::Wrap,
            entry.backend.wrap(seed, &ctx),
        )
        .await;
        facts.backend_calls.push(call);
        facts.cache = Some(CacheResult::Bypass);
        let wrapped = wrapped.map_err(|e| Error::backend(&entry.name, e))?;
        facts.key_version = Some(wrapped.key_version.clone());
        let ciphertext = envelope::seal(
            Kind::DataKey,
            &entry.name,
            &caller.name,
            &[wrapped.as_copy(entry.backend.kind())],
            seed,
            &BTreeMap::new(),
            &[],
        )
        .map_err(seal_error)?;
        Ok(EncryptOutput {
            ciphertext,
            key: Arc::clone(&entry.name),
            key_version: wrapped.key_version,
        })
    }

    /// Opens the source ciphertext with its data key, re-wraps that data key under the
    /// destination key (by the provider's own re-encrypt where it has one, so the data key is
    /// not handled in the clear for that step) and re-seals the payload with a fresh salt, the
    /// destination key's header and the destination context.
    pub async fn re_encrypt(
        &self,
        caller: &Caller,
        ciphertext: &[u8],
        source_context: &BTreeMap<String, String>,
        destination_key: &str,
        destination_context: &BTreeMap<String, String>,
        facts: &mut Facts,
    ) -> Result<ReEncryptOutput, Error> {
        self.check_size(
            "ciphertext",
            ciphertext.len(),
            self.max_plaintext + CIPHERTEXT_OVERHEAD,
        )?;
        check_context(source_context, "source_context")?;
        check_context(destination_context, "destination_context")?;
        if !destination_key.is_empty() {
            check_key_field(destination_key, "destination_key")?;
        }
        let env = envelope::parse(ciphertext)?;
        facts.bytes = env.payload_len() as u64;
        let registry = self.registry.load();
        let (source, dest) =
            self.re_encrypt_keys(&registry, caller, &env, destination_key, facts)?;
        let (copy, served, data_key) = self
            .unwrap_any(source, &env, Operation::ReEncrypt, facts)
            .await?;
        facts.source_key_version = Some(copy.key_version.to_owned());
        let payload = env
            .open(data_key.data_key(), source_context)
            .map_err(|_| Error::DecryptionFailed)?;
        let payload = zeroize::Zeroizing::new(payload);
        let dest_ctx = BackendContext {
            key_name: &dest.name,
            caller: &caller.name,
        };
        note_entry(facts, dest);
        let source_backend = source.wraps[served].as_ref();
        let rewrapped = self
            .rewrap(
                source_backend,
                dest,
                &env,
                &copy,
                &data_key,
                &dest_ctx,
                facts,
            )
            .await?;
        let new_copies: Vec<WrappedCopy<'_>> =
            rewrapped.iter().map(|(kind, w)| w.as_copy(*kind)).collect();
        let key_version = rewrapped[0].1.key_version.clone();
        facts.key_version = Some(key_version.clone());
        let out = reseal(
            &env,
            dest,
            caller,
            &new_copies,
            &data_key,
            destination_context,
            &payload,
        )?;
        for new_copy in &new_copies {
            self.cache
                .remember_unwrapped(dest.cached(), new_copy, &dest_ctx, data_key.data_key())
                .await;
        }
        Ok(ReEncryptOutput {
            ciphertext: out,
            key: Arc::clone(&dest.name),
            key_version,
            source_key: Arc::clone(&source.name),
            source_key_version: copy.key_version.to_owned(),
        })
    }

    /// ReEncrypt's two keys, both resolved and checked before any backend work. Whether the
    /// caller can read the source decides what it needs on the destination (see `Need`).
    fn re_encrypt_keys<'r>(
        &self,
        registry: &'r Registry,
        caller: &Caller,
        env: &Envelope<'_>,
        destination_key: &str,
        facts: &mut Facts,
    ) -> Result<(&'r Arc<KeyEntry>, &'r Arc<KeyEntry>), Error> {
        let source = self.usable_key(registry, caller, env.key_name, Need::ReEncryptFrom, facts)?;
        facts.source_key = Some(Arc::clone(&source.name));
        let dest_name = if destination_key.is_empty() {
            env.key_name
        } else {
            destination_key
        };
        let source_readable = source.policy.allows(caller, Operation::Decrypt);
        let dest = self.usable_key(
            registry,
            caller,
            dest_name,
            Need::ReEncryptTo { source_readable },
            facts,
        )?;
        Ok((source, dest))
    }

    /// Wraps the data key under every wrapping backend of the destination key, in parallel:
    /// inside the provider when a destination backend can re-wrap the source's copy itself
    /// (`rewrap_from`), else from the data key this process holds. One backend call per
    /// destination backend, recorded in `facts`. The result has the destination's copies in its
    /// `wrap` order: this is how ReEncrypt adds a copy for a backend added to a key, and drops
    /// the copy of one removed from it. A secondary's failure fails the request under
    /// `require = "all"`; under `"first"` that copy is left out (and counted as missing).
    #[allow(clippy::too_many_arguments)]
    async fn rewrap(
        &self,
        source_backend: &dyn KeyBackend,
        dest: &KeyEntry,
        env: &Envelope<'_>,
        copy: &WrappedCopy<'_>,
        data_key: &UnwrappedKey,
        dest_ctx: &BackendContext<'_>,
        facts: &mut Facts,
    ) -> Result<Vec<(BackendKind, Wrapped)>, Error> {
        let source_ctx = BackendContext {
            key_name: env.key_name,
            caller: env.caller,
        };
        let calls = dest.wraps.iter().enumerate().map(|(i, b)| {
            bump(&dest.stats.op(Operation::ReEncrypt).backend_calls);
            let source_ctx = &source_ctx;
            async move {
                let started = Instant::now();
                let (result, op) = match b
                    .rewrap_from(source_backend, copy, source_ctx, dest_ctx)
                    .await
                {
                    Some(result) => (result, BackendOp::Rewrap),
                    None => (b.wrap(data_key.data_key(), dest_ctx).await, BackendOp::Wrap),
                };
                let call = BackendCall {
                    backend: b.kind(),
                    wrap: u8::try_from(i).unwrap_or(u8::MAX),
                    op,
                    outcome: result.as_ref().map(|_| ()).map_err(|e| e.kind),
                    latency: started.elapsed(),
                };
                (result, call)
            }
        });
        let results: Vec<(Result<Wrapped, BackendError>, BackendCall)> =
            futures_util::future::join_all(calls).await;
        let mut out = Vec::with_capacity(results.len());
        let mut failure = None;
        for (result, call) in results {
            record_health(dest, std::slice::from_ref(&call));
            facts.backend_calls.push(call);
            match result {
                Ok(w) => out.push((call.backend, w)),
                Err(e) if call.wrap > 0 && dest.require == Require::First => {
                    tracing::warn!(
                        key = %dest.name,
                        error = %e,
                        wrap = call.wrap,
                        "a secondary backend could not re-wrap a data key; it goes without that copy"
                    );
                    facts.missing_copies.push(CopyRef {
                        index: call.wrap,
                        backend: call.backend,
                    });
                }
                Err(e) => {
                    failure.get_or_insert(e);
                }
            }
        }
        match failure {
            Some(e) => Err(Error::backend(&dest.name, e)),
            None => Ok(out),
        }
    }

    /// The keys `caller` may list, with their limits and counters (no secrets).
    pub fn list_keys(&self, caller: &Caller) -> Vec<KeyListing> {
        self.registry
            .load()
            .iter()
            .filter(|e| e.policy.allows(caller, Operation::List))
            .map(|e| KeyListing {
                name: Arc::clone(&e.name),
                description: e.description.clone(),
                backend: e.backend.kind(),
                backend_key_id: e.backend.key_id().to_owned(),
                wraps: e
                    .wraps
                    .iter()
                    .zip(&e.breakers)
                    .map(|(b, h)| (b.kind(), b.key_id().to_owned(), h.health()))
                    .collect(),
                require: e.require,
                enabled: e.usable(),
                cache: e.cache,
                stats: [
                    Operation::Encrypt,
                    Operation::Decrypt,
                    Operation::GenerateDataKey,
                    Operation::ReEncrypt,
                ]
                .into_iter()
                .map(|op| (op, e.stats.op(op).snapshot()))
                .collect(),
                lifecycle: {
                    let mut l = e.backend.lifecycle();
                    if e.configured_min_decrypt_version > 0 {
                        l.get_or_insert_with(|| Lifecycle {
                            source: e.backend.kind().as_str(),
                            ..Lifecycle::default()
                        })
                        .min_decrypt_version = Some(e.configured_min_decrypt_version.to_string());
                    }
                    l
                },
                pending_deletion: e.wraps.iter().any(|b| b.hint().pending_deletion),
            })
            .collect()
    }

    /// Looks up a key, counts the request, checks permission and state (in that order: the
    /// policy is checked before anything about the key's data keys is touched). An unknown key
    /// and a key the caller has no grant on are answered alike (docs/api.md).
    fn usable_key<'r>(
        &self,
        registry: &'r Registry,
        caller: &Caller,
        name: &str,
        need: Need,
        facts: &mut Facts,
    ) -> Result<&'r Arc<KeyEntry>, Error> {
        if name.is_empty() {
            return Err(Error::InvalidArgument(
                "key: a key name is required".to_owned(),
            ));
        }
        let Some(entry) = registry.get(name) else {
            return Err(Error::KeyNotFound {
                key: name.to_owned(),
                caller: caller.name.to_string(),
                operation: need.describe(),
            });
        };
        note_entry(facts, entry);
        let op = match need {
            Need::Op(op) => op,
            Need::ReEncryptFrom | Need::ReEncryptTo { .. } => Operation::ReEncrypt,
        };
        bump(&entry.stats.op(op).requests);
        if !need.check(&entry.policy, caller) {
            // Without any grant on the key the caller must not learn that it exists: the same
            // answer as for an unknown name (Error::KeyNotFound).
            if !entry.policy.grants_any(caller) {
                return Err(Error::NoGrant {
                    caller: caller.name.to_string(),
                    key: Some(name.to_owned()),
                    operation: need.describe(),
                });
            }
            return Err(Error::PolicyDenied {
                caller: caller.name.to_string(),
                key: name.to_owned(),
                operation: need.describe(),
            });
        }
        if !entry.usable() {
            return Err(Error::KeyDisabled {
                key: name.to_owned(),
            });
        }
        if entry.wraps.iter().any(|b| b.hint().pending_deletion) {
            return Err(Error::KeyPendingDeletion {
                key: name.to_owned(),
            });
        }
        Ok(entry)
    }

    /// Gets the data key for an envelope (trying its copies, see `unwrap_any`) and opens it.
    /// For a data-key envelope the "plaintext" is the data key itself.
    async fn open(
        &self,
        entry: &KeyEntry,
        env: &Envelope<'_>,
        context: &BTreeMap<String, String>,
        op: Operation,
        facts: &mut Facts,
    ) -> Result<(SecretKey, String), Error> {
        let (copy, _, data_key) = self.unwrap_any(entry, env, op, facts).await?;
        let plaintext = match env.kind {
            Kind::Message => env
                .open(data_key.data_key(), context)
                .map(SecretKey::from_vec),
            Kind::DataKey | Kind::DerivedDataKey => env.open_data_key(data_key.data_key(), context),
        }
        .map_err(|_| Error::DecryptionFailed)?;
        Ok((plaintext, copy.key_version.to_owned()))
    }

    /// The data key of an envelope, through any of its copies that a wrapping backend of the
    /// key can unwrap: first from the cache under any copy (no backend call), else copy by copy
    /// in order of backend health (`backend::breaker`; configured order among equals), falling
    /// over to the next when one fails. Each backend call runs under that backend's own deadline,
    /// so a hung backend costs at most its deadline once; its breaker then sends it to the back.
    /// Returns the copy that served and the index of the wrapping backend that vouches for it.
    async fn unwrap_any<'e>(
        &self,
        entry: &KeyEntry,
        env: &Envelope<'e>,
        op: Operation,
        facts: &mut Facts,
    ) -> Result<(WrappedCopy<'e>, usize, Arc<UnwrappedKey>), Error> {
        self.unwrap_copies(entry, env.key_name, env.caller, &env.copies, op, facts)
            .await
    }

    /// [`Broker::unwrap_any`] for a header's parts (a stream header is not an [`Envelope`]).
    async fn unwrap_copies<'e>(
        &self,
        entry: &KeyEntry,
        key_name: &str,
        caller: &str,
        copies: &[WrappedCopy<'e>],
        op: Operation,
        facts: &mut Facts,
    ) -> Result<(WrappedCopy<'e>, usize, Arc<UnwrappedKey>), Error> {
        let ctx = BackendContext { key_name, caller };
        let breakers: Vec<&breaker::Breaker> = entry.breakers.iter().map(|b| &**b).collect();
        // (wrapping backend, copy index), best backend first.
        let mut candidates: Vec<(usize, usize)> = Vec::new();
        let mut refused = None;
        let mut retired = None;
        for w in breaker::order(&breakers) {
            let backend = &entry.wraps[w];
            // Retired versions are refused before the cache is consulted; ReEncrypt still reads
            // them (the plaintext stays here), which is how `keybroker rewrap` moves data on.
            let min = backend
                .hint()
                .min_decrypt_version
                .max(entry.configured_min_decrypt_version);
            // A backend's own copies are those naming its key; when its configured id is not
            // the durable one a copy records (an alias), every copy of its kind is a candidate
            // (a copy of another key fails to unwrap, as the backend contract says).
            let own = |c: &WrappedCopy<'_>| c.backend == backend.kind();
            let exact = copies
                .iter()
                .any(|c| own(c) && c.key_id == backend.key_id());
            for (i, copy) in copies.iter().enumerate() {
                if !own(copy) || (exact && copy.key_id != backend.key_id()) {
                    continue;
                }
                // A respelling of a genuine copy ("01" for "1") must not become a new cache
                // entry and a paid backend call: refused before the cache is consulted.
                match backend.check_canonical(copy) {
                    Ok(()) => {
                        let version = orderable_version(backend.kind(), copy.key_version);
                        match version {
                            Some(v) if v < min && op != Operation::ReEncrypt => {
                                facts.key_version = Some(copy.key_version.to_owned());
                                retired = Some(Error::VersionRetired {
                                    key: entry.name.to_string(),
                                    version: v,
                                    min,
                                });
                            }
                            _ => candidates.push((w, i)),
                        }
                    }
                    Err(e) => refused = Some(e),
                }
            }
        }
        if candidates.is_empty() {
            if let Some(e) = retired {
                return Err(e);
            }
            return Err(refused.map_or(Error::DecryptionFailed, Error::InvalidCiphertext));
        }
        let mut seen = Vec::with_capacity(copies.len());
        for &(w, i) in &candidates {
            if !seen.iter().any(|&(_, j)| j == i) {
                seen.push((w, i));
            }
        }
        let peek: Vec<WrappedCopy<'_>> = seen.iter().map(|&(_, i)| copies[i]).collect();
        if let Some((k, key)) = self
            .cache
            .peek_unwrapped(entry.cached(), &peek, &ctx, op)
            .await
        {
            let (w, i) = seen[k];
            note_served(facts, entry, w, &copies[i], i, CacheResult::Hit);
            return Ok((copies[i], w, key));
        }
        let mut last = Error::DecryptionFailed;
        for (w, i) in candidates {
            let copy = copies[i];
            facts.key_version = Some(copy.key_version.to_owned());
            let lookup = self
                .cache
                .unwrapped_key(entry.cached_through(w), &copy, &ctx, op)
                .await;
            match take(lookup, entry, facts) {
                Ok((key, result)) => {
                    note_served(facts, entry, w, &copy, i, result);
                    return Ok((copy, w, key));
                }
                // Fail over to the next copy; the answer, if none works, says why the backends
                // failed rather than that some copy did not authenticate.
                Err(e) => {
                    if !matches!(e, Error::DecryptionFailed)
                        || matches!(last, Error::DecryptionFailed)
                    {
                        last = e;
                    }
                }
            }
        }
        Err(last)
    }

    fn check_size(&self, what: &'static str, size: usize, limit: u64) -> Result<(), Error> {
        if size as u64 > limit {
            return Err(Error::RequestTooLarge {
                what,
                size: size as u64,
                limit,
            });
        }
        Ok(())
    }
}

/// Records which copy opened an envelope; for a key with several wrapping backends also which
/// of them vouches for it (`backend` and `backend_key_id` then name it, as configured).
fn note_served(
    facts: &mut Facts,
    entry: &KeyEntry,
    wrap: usize,
    copy: &WrappedCopy<'_>,
    index: usize,
    result: CacheResult,
) {
    facts.cache = Some(result);
    facts.key_version = Some(copy.key_version.to_owned());
    if entry.wraps.len() > 1 {
        facts.backend = Some(copy.backend);
        facts.backend_key_id = Some(Arc::from(entry.wraps[wrap].key_id()));
    }
    facts.served_by = Some(CopyRef {
        index: u8::try_from(index).unwrap_or(u8::MAX),
        backend: copy.backend,
    });
}

/// A key name from a request field: the name rules (docs/api.md) before any lookup, so a
/// malformed name is INVALID_ARGUMENT and never echoed whole. Names read from a ciphertext are
/// not checked here: they are bounded by the format, and a name no configured key has is
/// KEY_NOT_FOUND.
fn check_key_field(name: &str, field: &str) -> Result<(), Error> {
    if name.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "{field}: a key name is required"
        )));
    }
    crate::util::check_name(name).map_err(|e| Error::InvalidArgument(format!("{field}: {e}")))
}

/// The re-encrypted ciphertext. A derived data key depends on its blob's salt, so that blob
/// keeps it (safe in version 2: the new header and context give a new message key); everything
/// else gets a fresh one.
fn reseal(
    env: &Envelope<'_>,
    dest: &KeyEntry,
    caller: &Caller,
    new_copies: &[WrappedCopy<'_>],
    data_key: &UnwrappedKey,
    destination_context: &BTreeMap<String, String>,
    payload: &[u8],
) -> Result<Vec<u8>, Error> {
    match env.kind {
        Kind::DerivedDataKey => envelope::seal_with_salt(
            envelope::FORMAT_VERSION,
            env.kind,
            &dest.name,
            &caller.name,
            new_copies,
            data_key.data_key(),
            destination_context,
            payload,
            env.salt(),
        ),
        Kind::Message | Kind::DataKey => envelope::seal(
            env.kind,
            &dest.name,
            &caller.name,
            new_copies,
            data_key.data_key(),
            destination_context,
            payload,
        ),
    }
    .map_err(seal_error)
}

fn check_context(context: &BTreeMap<String, String>, field: &str) -> Result<(), Error> {
    envelope::check_context(context).map_err(|e| Error::InvalidArgument(format!("{field}: {e}")))
}

fn seal_error(e: envelope::SealError) -> Error {
    tracing::error!(error = %e, "sealing an envelope failed");
    Error::Internal("sealing the ciphertext failed")
}

/// The number of the key version a copy records, where versions are numbers that order:
/// the keyring's version, or the `N` of Cloud KMS's `…/cryptoKeyVersions/N` (canonical already:
/// `check_canonical` ran). `None` for AWS (the copy records the key ARN only) and Azure (a
/// Key Vault version is an opaque id), which is why their keys cannot carry
/// `min_decrypt_version` (refused at load).
fn orderable_version(kind: BackendKind, recorded: &str) -> Option<u64> {
    match kind {
        BackendKind::Local => recorded.parse().ok(),
        BackendKind::Gcp => recorded
            .rsplit_once("/cryptoKeyVersions/")
            .and_then(|(_, n)| n.parse().ok()),
        BackendKind::Aws | BackendKind::Azure => None,
    }
}

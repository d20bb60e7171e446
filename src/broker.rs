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

use crate::backend::{BackendContext, BackendKind, Wrapped};
use crate::cache::{CacheError, CacheLimits, DataKeyCache, Lookup, Purpose, UnwrappedKey};
use crate::envelope::{self, Envelope, Kind, WrappedCopy};
use crate::error::Error;
use crate::facts::{BackendCall, BackendOp, CacheResult, Facts};
use crate::operation::Operation;
use crate::policy::Need;
use crate::principal::Caller;
use crate::registry::{KeyEntry, Registry};
use crate::secret::SecretKey;
use crate::stats::{OpSnapshot, bump};

/// Envelope overhead allowance on top of the plaintext limit when accepting ciphertexts: the
/// largest header the format allows (8 copies of the longest ids and wrapped keys) plus the tag.
pub const CIPHERTEXT_OVERHEAD: u64 = 128 << 10;

/// Records what a request learnt from its key's configuration entry.
fn note_entry(facts: &mut Facts, entry: &KeyEntry) {
    facts.key = Some(Arc::clone(&entry.name));
    facts.backend = Some(entry.backend.kind());
    facts.backend_key_id = Some(Arc::clone(&entry.backend_key_id));
}

/// A cache lookup's answer; its backend calls go into the request's facts.
fn take<T>(
    lookup: Lookup<T>,
    entry: &KeyEntry,
    facts: &mut Facts,
) -> Result<(T, CacheResult), Error> {
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
    pub enabled: bool,
    pub cache: CacheLimits,
    pub stats: Vec<(Operation, OpSnapshot)>,
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
        facts.cache = Some(result);
        facts.key_version = Some(active.wrapped.key_version.clone());
        let ciphertext = envelope::seal(
            Kind::Message,
            &entry.name,
            &caller.name,
            &[active.copy()],
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
        facts.cache = Some(result);
        facts.key_version = Some(active.wrapped.key_version.clone());
        facts.bytes = spec.key_len() as u64;
        // The cached data key is only the root of a derivation: every call gets its own key,
        // HKDF(root, fresh salt), and the blob carries the salt (docs/envelope.md, kind 3).
        let (wrapped_key, plaintext_key) = envelope::seal_derived_data_key(
            &entry.name,
            &caller.name,
            &[active.copy()],
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
        let started = Instant::now();
        let wrapped = entry.backend.wrap(seed, &ctx).await;
        facts.backend_calls.push(BackendCall {
            op: BackendOp::Wrap,
            outcome: wrapped.as_ref().map(|_| ()).map_err(|e| e.kind),
            latency: started.elapsed(),
        });
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
        let (copy, data_key, _) = self
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
        let rewrapped = self
            .rewrap(source, dest, &env, &copy, &data_key, &dest_ctx, facts)
            .await?;
        let new_copy = rewrapped.as_copy(dest.backend.kind());
        facts.key_version = Some(rewrapped.key_version.clone());
        let out = reseal(
            &env,
            dest,
            caller,
            new_copy,
            &data_key,
            destination_context,
            &payload,
        )?;
        self.cache
            .remember_unwrapped(dest.cached(), &new_copy, &dest_ctx, data_key.data_key())
            .await;
        Ok(ReEncryptOutput {
            ciphertext: out,
            key: Arc::clone(&dest.name),
            key_version: rewrapped.key_version.clone(),
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

    /// Wraps the data key under the destination key: inside the provider when the destination
    /// backend can re-wrap the source's copy itself (`rewrap_from`), else from the data key
    /// this process holds. One backend call either way, recorded in `facts`.
    #[allow(clippy::too_many_arguments)]
    async fn rewrap(
        &self,
        source: &KeyEntry,
        dest: &KeyEntry,
        env: &Envelope<'_>,
        copy: &WrappedCopy<'_>,
        data_key: &UnwrappedKey,
        dest_ctx: &BackendContext<'_>,
        facts: &mut Facts,
    ) -> Result<Wrapped, Error> {
        let source_ctx = BackendContext {
            key_name: env.key_name,
            caller: env.caller,
        };
        bump(&dest.stats.op(Operation::ReEncrypt).backend_calls);
        let started = Instant::now();
        let (rewrapped, op) = match dest
            .backend
            .rewrap_from(source.backend.as_ref(), copy, &source_ctx, dest_ctx)
            .await
        {
            Some(result) => (result, BackendOp::Rewrap),
            None => (
                dest.backend.wrap(data_key.data_key(), dest_ctx).await,
                BackendOp::Wrap,
            ),
        };
        facts.backend_calls.push(BackendCall {
            op,
            outcome: rewrapped.as_ref().map(|_| ()).map_err(|e| e.kind),
            latency: started.elapsed(),
        });
        rewrapped.map_err(|e| Error::backend(&dest.name, e))
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
                enabled: e.enabled && !e.backend.hint().disabled,
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
        if !entry.enabled || entry.backend.hint().disabled {
            return Err(Error::KeyDisabled {
                key: name.to_owned(),
            });
        }
        Ok(entry)
    }

    /// Gets the data key for an envelope (trying each copy this key's backend can unwrap) and
    /// opens it. For a data-key envelope the "plaintext" is the data key itself.
    async fn open(
        &self,
        entry: &KeyEntry,
        env: &Envelope<'_>,
        context: &BTreeMap<String, String>,
        op: Operation,
        facts: &mut Facts,
    ) -> Result<(SecretKey, String), Error> {
        let (copy, data_key, _) = self.unwrap_any(entry, env, op, facts).await?;
        let plaintext = match env.kind {
            Kind::Message => env
                .open(data_key.data_key(), context)
                .map(SecretKey::from_vec),
            Kind::DataKey | Kind::DerivedDataKey => env.open_data_key(data_key.data_key(), context),
        }
        .map_err(|_| Error::DecryptionFailed)?;
        Ok((plaintext, copy.key_version.to_owned()))
    }

    async fn unwrap_any<'e>(
        &self,
        entry: &KeyEntry,
        env: &Envelope<'e>,
        op: Operation,
        facts: &mut Facts,
    ) -> Result<(WrappedCopy<'e>, Arc<UnwrappedKey>, CacheResult), Error> {
        let ctx = BackendContext {
            key_name: env.key_name,
            caller: env.caller,
        };
        let kind = entry.backend.kind();
        let mut last = Error::DecryptionFailed;
        for copy in env.copies.iter().filter(|c| c.backend == kind) {
            facts.key_version = Some(copy.key_version.to_owned());
            // A respelling of a genuine copy ("01" for "1") must not become a new cache entry
            // and a paid backend call: refused before the cache is consulted.
            entry
                .backend
                .check_canonical(copy)
                .map_err(Error::InvalidCiphertext)?;
            let lookup = self
                .cache
                .unwrapped_key(entry.cached(), copy, &ctx, op)
                .await;
            match take(lookup, entry, facts) {
                Ok((key, result)) => {
                    facts.cache = Some(result);
                    return Ok((*copy, key, result));
                }
                // Fail over to the next copy only when this one could not be unwrapped.
                Err(e) => last = e,
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
    new_copy: WrappedCopy<'_>,
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
            &[new_copy],
            data_key.data_key(),
            destination_context,
            payload,
            env.salt(),
        ),
        Kind::Message | Kind::DataKey => envelope::seal(
            env.kind,
            &dest.name,
            &caller.name,
            &[new_copy],
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

//! EncryptBatch and DecryptBatch: many items in one request, each answered on its own (one bad
//! item never fails the others). What a batch saves is the per-key work: the caller's
//! permission and the key's state are checked once per distinct key, and the data key is
//! looked up once per key (encrypt) or per distinct wrapped data key (decrypt); the following
//! items of that key reuse it, still counted against the cache limits. Each item keeps its own
//! [`Facts`] (the front door gives every item its own audit record and metrics: docs/audit.md).
//!
//! Must never: let an item use a key its group was refused, or reuse a data key past the
//! cache's limits (a reuse that would pass one makes a fresh lookup, as a request would).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use super::{
    Broker, DecryptOutput, EncryptOutput, check_context, check_key_field, note_active, seal_error,
    take,
};
use crate::cache::{ActiveKey, Purpose, UnwrappedKey};
use crate::envelope::{self, Kind};
use crate::error::Error;
use crate::facts::{CacheResult, Facts};
use crate::operation::Operation;
use crate::policy::Need;
use crate::principal::Caller;
use crate::registry::{KeyEntry, Registry};
use crate::secret::SecretKey;
use crate::stats::bump;

/// What the first item of a key learnt: the entry (or why the key is refused) and the facts
/// that name it, for the items after it.
struct Group {
    named: Facts,
    entry: Result<Arc<KeyEntry>, Error>,
}

impl Group {
    /// Copies what names the key into an item's facts.
    fn note(&self, facts: &mut Facts) {
        facts.key.clone_from(&self.named.key);
        facts.backend = self.named.backend;
        facts.backend_key_id.clone_from(&self.named.backend_key_id);
        facts.wraps = self.named.wraps;
    }
}

/// Checks a key once per batch: the first item runs the broker's usual lookup and checks, the
/// others get its answer (their request is counted in the key's stats all the same).
fn group<'g>(
    broker: &Broker,
    registry: &Registry,
    groups: &'g mut HashMap<String, Group>,
    caller: &Caller,
    name: &str,
    op: Operation,
    facts: &mut Facts,
) -> Result<&'g Arc<KeyEntry>, Error> {
    if !groups.contains_key(name) {
        let mut named = Facts::default();
        let entry = broker
            .usable_key(registry, caller, name, Need::Op(op), &mut named)
            .cloned();
        groups.insert(name.to_owned(), Group { named, entry });
        let g = &groups[name];
        g.note(facts);
        return g.entry.as_ref().map_err(Clone::clone);
    }
    let g = &groups[name];
    g.note(facts);
    match &g.entry {
        Ok(entry) => {
            bump(&entry.stats.op(op).requests);
            Ok(entry)
        }
        Err(e) => Err(e.clone()),
    }
}

/// One EncryptBatch in progress (see the module docs). Items are encrypted in order.
pub struct EncryptBatch<'b> {
    broker: &'b Broker,
    caller: &'b Caller,
    registry: Arc<Registry>,
    groups: HashMap<String, Group>,
    /// The data key each key's last item used.
    active: HashMap<Arc<str>, Arc<ActiveKey>>,
}

impl Broker {
    /// Starts an EncryptBatch for `caller` (on the registry current now, for all its items).
    pub fn encrypt_batch<'b>(&'b self, caller: &'b Caller) -> EncryptBatch<'b> {
        EncryptBatch {
            broker: self,
            caller,
            registry: self.registry(),
            groups: HashMap::new(),
            active: HashMap::new(),
        }
    }

    /// Starts a DecryptBatch for `caller`.
    pub fn decrypt_batch<'b>(&'b self, caller: &'b Caller) -> DecryptBatch<'b> {
        DecryptBatch {
            broker: self,
            caller,
            registry: self.registry(),
            groups: HashMap::new(),
            keys: HashMap::new(),
        }
    }
}

impl EncryptBatch<'_> {
    /// Encrypts one item: the same checks, in the same order, as [`Broker::encrypt`], with the
    /// key checked and its data key looked up only by the first item of that key.
    pub async fn encrypt(
        &mut self,
        key: &str,
        plaintext: &[u8],
        context: &BTreeMap<String, String>,
        facts: &mut Facts,
    ) -> Result<EncryptOutput, Error> {
        let broker = self.broker;
        facts.bytes = plaintext.len() as u64;
        broker.check_size("plaintext", plaintext.len(), broker.max_plaintext)?;
        check_context(context, "context")?;
        check_key_field(key, "key")?;
        let entry = Arc::clone(group(
            broker,
            &self.registry,
            &mut self.groups,
            self.caller,
            key,
            Operation::Encrypt,
            facts,
        )?);
        let bytes = plaintext.len() as u64;
        let reused = self
            .active
            .get(&entry.name)
            .filter(|a| a.reuse(entry.cached(), bytes))
            .cloned();
        let active = match reused {
            Some(active) => {
                note_active(facts, &active, CacheResult::Hit);
                active
            }
            None => {
                let lookup = broker
                    .cache
                    .active_key(entry.cached(), &self.caller.name, Purpose::Messages, bytes)
                    .await;
                let (active, result) = take(lookup, &entry, facts)?;
                note_active(facts, &active, result);
                self.active
                    .insert(Arc::clone(&entry.name), Arc::clone(&active));
                active
            }
        };
        let ciphertext = envelope::seal(
            Kind::Message,
            &entry.name,
            &self.caller.name,
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
}

/// A data key a DecryptBatch already unwrapped, and what the item that unwrapped it recorded.
struct Opened {
    data_key: Arc<UnwrappedKey>,
    key_version: String,
    served: Facts,
}

/// One DecryptBatch in progress (see the module docs).
pub struct DecryptBatch<'b> {
    broker: &'b Broker,
    caller: &'b Caller,
    registry: Arc<Registry>,
    groups: HashMap<String, Group>,
    /// By the envelope's wrapped copies (all of them, as bytes): one unwrap per data key.
    keys: HashMap<Vec<u8>, Opened>,
}

/// The identity of an envelope's data key for this batch: its copies, length-prefixed.
fn copies_id(env: &envelope::Envelope<'_>) -> Vec<u8> {
    let mut id = Vec::new();
    for c in &env.copies {
        id.push(c.backend.code());
        for part in [c.key_id.as_bytes(), c.key_version.as_bytes(), c.wrapped] {
            id.extend_from_slice(&(part.len() as u32).to_be_bytes());
            id.extend_from_slice(part);
        }
    }
    id
}

impl DecryptBatch<'_> {
    /// Decrypts one item as [`Broker::decrypt`] does, with the key checked once per key name
    /// and each distinct data key unwrapped (from the cache or a backend) once.
    pub async fn decrypt(
        &mut self,
        ciphertext: &[u8],
        context: &BTreeMap<String, String>,
        facts: &mut Facts,
    ) -> Result<DecryptOutput, Error> {
        let broker = self.broker;
        broker.check_size(
            "ciphertext",
            ciphertext.len(),
            broker.max_plaintext + super::CIPHERTEXT_OVERHEAD,
        )?;
        check_context(context, "context")?;
        let env = envelope::parse(ciphertext)?;
        facts.bytes = env.payload_len() as u64;
        let entry = Arc::clone(group(
            broker,
            &self.registry,
            &mut self.groups,
            self.caller,
            env.key_name,
            Operation::Decrypt,
            facts,
        )?);
        let id = copies_id(&env);
        let (data_key, key_version) = match self.keys.get(&id) {
            Some(opened) => {
                facts.cache = Some(CacheResult::Hit);
                facts.key_version = Some(opened.key_version.clone());
                facts.backend = opened.served.backend;
                facts
                    .backend_key_id
                    .clone_from(&opened.served.backend_key_id);
                facts.served_by = opened.served.served_by;
                bump(&entry.stats.op(Operation::Decrypt).cache_hits);
                (Arc::clone(&opened.data_key), opened.key_version.clone())
            }
            None => {
                let (copy, _, data_key) = broker
                    .unwrap_any(&entry, &env, Operation::Decrypt, facts)
                    .await?;
                let key_version = copy.key_version.to_owned();
                self.keys.insert(
                    id,
                    Opened {
                        data_key: Arc::clone(&data_key),
                        key_version: key_version.clone(),
                        served: facts.clone(),
                    },
                );
                (data_key, key_version)
            }
        };
        let plaintext = match env.kind {
            Kind::Message => env
                .open(data_key.data_key(), context)
                .map(SecretKey::from_vec),
            Kind::DataKey | Kind::DerivedDataKey => env.open_data_key(data_key.data_key(), context),
        }
        .map_err(|_| Error::DecryptionFailed)?;
        Ok(DecryptOutput {
            plaintext,
            key: Arc::clone(&entry.name),
            key_version,
        })
    }
}

//! The local backend: data keys wrapped with AES-256-GCM under a key-encryption key from a
//! keyring file (see `keyring.rs`). The embedded default, so the sidecar runs with no cloud.
//!
//! Wrap format 2 (written): `0x02 || salt (32 random bytes) || AES-256-GCM(K, zero nonce, aad,
//! data key)`, where `K = HKDF-SHA256(KEK_v, salt, "keybroker local wrap v2: aes-256-gcm key")`
//! is a key of its own per wrap. So no count of wraps per KEK version is needed: GCM's 2^32
//! random-nonce limit applies to each one-use `K`, and two wraps share a `K` only if their
//! 256-bit salts collide. Format 1 (`nonce (12 random bytes) || AES-256-GCM(KEK_v, nonce, ...)`,
//! used before) is still unwrapped. docs/envelope.md specifies both, with vectors.
//!
//! A running server picks up keyring edits (rotation, disable) without restart: a watcher polls
//! the file's identity (inode, size, mtime) and swaps in the new keyring; an unwrap that names an
//! unknown version re-reads the file once before failing. A keyring that fails to load is logged
//! and the previous one stays in force.
//!
//! The same watcher runs the keyring's schedule (docs/lifecycle.md): a key whose rotation
//! period has passed gets a new version, and a key whose deletion window has ended is purged.
//! Both are decided again under the keyring lock on the file as it then is, so of several
//! servers sharing a keyring exactly one acts and the others load its result.

use std::any::Any;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use aws_lc_rs::{aead, hkdf};

use super::{
    BackendConfig, BackendContext, BackendError, BackendErrorKind, BackendKind, KeyBackend,
    KeyDescription, KeyHint, Lifecycle, Wrapped,
};
use crate::envelope::{FormatError, WrappedCopy};
use crate::facts::{Actor, LifecycleEvent, LifecycleRecord};
use crate::keyring::{Keyring, KeyringError};
use crate::secret::{SecretKey, random_fill};
use crate::settings::{Problems, Section, resolve};
use crate::util::{FileStamp, check_name};

const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;
/// AAD label of wrap format 1 (random nonce under the KEK itself; read only).
const WRAP_LABEL_V1: &[u8] = b"keybroker local wrap v1";
/// AAD label of wrap format 2 (a per-wrap key derived with HKDF).
const WRAP_LABEL_V2: &[u8] = b"keybroker local wrap v2";
/// HKDF `info` of the per-wrap key.
const WRAP_KEY_INFO_V2: &[u8] = b"keybroker local wrap v2: aes-256-gcm key";
/// First byte of a format 2 wrap.
const WRAP_V2: u8 = 0x02;
const WRAP_SALT_LEN: usize = 32;
/// Format 2 overhead: format byte, salt, tag.
const WRAP_V2_OVERHEAD: usize = 1 + WRAP_SALT_LEN + TAG_LEN;

/// `[local]`: where keys with `backend = "local"` find their keyring by default, and how often
/// keyring files are checked for changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalSettings {
    pub keyring: PathBuf,
    pub poll_interval: Duration,
}

impl LocalSettings {
    /// Reads `[local]` over `defaults` (the caller reports unknown fields with `finish`).
    pub fn parse(s: &Section<'_>, defaults: LocalSettings, base: &Path, p: &mut Problems) -> Self {
        let mut out = defaults;
        if let Some(k) = s.path("keyring", base, p) {
            out.keyring = k;
        }
        if let Some(d) = s.duration("poll_interval", p) {
            if d < Duration::from_millis(100) {
                p.push(s.at("poll_interval"), "must be at least 100ms");
            }
            out.poll_interval = d;
        }
        out
    }
}

/// Reads the local-backend fields of `[keys.NAME]` (`keyring`, `create`).
pub fn key_config(
    s: &Section<'_>,
    key_id: Option<&str>,
    defaults: &LocalSettings,
    base: &Path,
    p: &mut Problems,
) -> Option<BackendConfig> {
    let keyring = s
        .str("keyring", p)
        .map(|k| resolve(base, k))
        .unwrap_or_else(|| defaults.keyring.clone());
    let create = s.bool("create", p).unwrap_or(false);
    let key_id = key_id?;
    if let Err(e) = check_name(key_id) {
        p.push(s.at("key_id"), format!("keyring key name {e}"));
    }
    Some(BackendConfig::Local {
        keyring,
        key_id: key_id.to_owned(),
        create,
    })
}

/// Room for one lifecycle record, reserved before the change it records is made.
pub type LifecycleSlot = Box<dyn FnOnce(LifecycleRecord) + Send>;

/// Where a keyring's scheduler records the rotations and purges it makes: a server's audit log
/// (which sits above the backends, so it is handed down as this).
pub trait LifecycleSink: Send + Sync {
    /// Room for `n` records, reserved before the changes are made; an error defers them.
    fn reserve(&self, n: usize) -> Result<Vec<LifecycleSlot>, String>;
}

/// The keyrings open in one registry: one handle (and one watcher) per file, shared by every
/// key that uses it.
pub struct LocalRings {
    rings: HashMap<PathBuf, Arc<LocalKeyring>>,
    poll_interval: Duration,
    /// Where the keyrings' schedulers record what they do (a server's audit log).
    audit: Option<Arc<dyn LifecycleSink>>,
}

impl LocalRings {
    pub fn new(poll_interval: Duration) -> Self {
        Self {
            rings: HashMap::new(),
            poll_interval,
            audit: None,
        }
    }

    pub fn set_audit(&mut self, audit: Arc<dyn LifecycleSink>) {
        self.audit = Some(audit);
    }

    /// The backend for key `key_id` of `keyring`, creating both first with `create`.
    pub fn backend(
        &mut self,
        keyring: &Path,
        key_id: &str,
        create: bool,
    ) -> Result<LocalBackend, String> {
        let ring = match self.rings.get(keyring) {
            Some(r) => {
                if create {
                    // The shared handle was opened for another key; make sure this one exists
                    // too.
                    LocalKeyring::open(keyring, Some(key_id)).map_err(|e| e.to_string())?;
                    r.reload_if_changed();
                }
                Arc::clone(r)
            }
            None => {
                let r = LocalKeyring::open(keyring, create.then_some(key_id))
                    .map_err(|e| e.to_string())?;
                if let Some(a) = &self.audit {
                    let _ = r.audit.set(Arc::clone(a));
                }
                r.watch(self.poll_interval);
                self.rings.insert(keyring.to_owned(), Arc::clone(&r));
                r
            }
        };
        if !ring.snapshot().keys.contains_key(key_id) {
            return Err(format!(
                "key {key_id:?} is not in keyring {} (create it with `keybroker keys create {key_id}`)",
                keyring.display()
            ));
        }
        Ok(LocalBackend::new(ring, key_id))
    }
}

/// A keyring file loaded into memory, shared by every configured key that uses it.
pub struct LocalKeyring {
    path: PathBuf,
    ring: ArcSwap<Keyring>,
    stamp: Mutex<Option<FileStamp>>,
    /// The audit log the scheduler's rotations and purges are recorded in (a server's).
    audit: std::sync::OnceLock<Arc<dyn LifecycleSink>>,
}

impl LocalKeyring {
    /// Opens a keyring file. With `create_key`, a missing file (or a missing key in it) is
    /// created first, holding that key: this is how the embedded default bootstraps.
    pub fn open(path: &Path, create_key: Option<&str>) -> Result<Arc<Self>, KeyringError> {
        // A `keys` edit killed mid-write may have left a temporary copy of the keys.
        crate::keyring::remove_stale_temps(path);
        if let Some(name) = create_key {
            let needs = match Keyring::load(path) {
                Ok(r) => !r.keys.contains_key(name),
                Err(KeyringError::Io { source, .. })
                    if source.kind() == std::io::ErrorKind::NotFound =>
                {
                    true
                }
                Err(e) => return Err(e),
            };
            if needs {
                crate::keyring::edit(path, true, |r| {
                    if r.keys.contains_key(name) {
                        Ok(())
                    } else {
                        r.create_key(name)
                    }
                })?;
                tracing::info!(keyring = %path.display(), key = name, "created local keyring key");
            }
        }
        let before = FileStamp::of(path);
        let ring = Keyring::load(path)?;
        Ok(Arc::new(Self {
            path: path.to_owned(),
            ring: ArcSwap::from_pointee(ring),
            stamp: Mutex::new(before),
            audit: std::sync::OnceLock::new(),
        }))
    }

    /// Re-reads the file if it changed since the last load. Returns whether a new keyring was
    /// swapped in.
    pub fn reload_if_changed(&self) -> bool {
        let now = FileStamp::of(&self.path);
        {
            let Ok(last) = self.stamp.lock() else {
                return false;
            };
            if *last == now {
                return false;
            }
        }
        match Keyring::load(&self.path) {
            Ok(ring) => {
                self.ring.store(Arc::new(ring));
                if let Ok(mut last) = self.stamp.lock() {
                    *last = now;
                }
                tracing::info!(keyring = %self.path.display(), "reloaded local keyring");
                true
            }
            Err(e) => {
                tracing::error!(keyring = %self.path.display(), error = %e,
                    "keyring changed but does not load; keeping the previous one");
                if let Ok(mut last) = self.stamp.lock() {
                    *last = now;
                }
                false
            }
        }
    }

    /// Polls the file every `interval` while anyone still holds the keyring (the task holds
    /// only a weak reference and ends with the last strong one).
    pub fn watch(self: &Arc<Self>, interval: Duration) {
        if tokio::runtime::Handle::try_current().is_err() {
            return;
        }
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(ring) = weak.upgrade() else { return };
                let _ = tokio::task::spawn_blocking(move || {
                    ring.reload_if_changed();
                    ring.run_schedule(std::time::SystemTime::now());
                })
                .await;
            }
        });
    }

    pub fn snapshot(&self) -> Arc<Keyring> {
        self.ring.load_full()
    }

    /// Rotates the keys whose schedule has passed and purges those whose deletion window has
    /// ended, if any (checked first on the loaded copy, so an idle keyring is never locked).
    /// A keyring this process cannot write (a read-only Secret volume) is left to
    /// `keys rotate --if-due` run where it can be; the failure is logged once per poll.
    pub fn run_schedule(&self, now: std::time::SystemTime) {
        let ring = self.snapshot();
        let rotate = ring.keys.values().any(|k| k.rotation_due(now));
        let purge = ring
            .keys
            .values()
            .any(|k| k.delete_after.is_some_and(|a| a <= now));
        if !rotate && !purge {
            return;
        }
        // Required audit: no change without a place for its record. A full or failing audit
        // log defers the change to a later poll, as it refuses a request.
        let due = ring
            .keys
            .values()
            .filter(|k| k.rotation_due(now) || k.delete_after.is_some_and(|a| a <= now))
            .count();
        let mut slots = match self.audit.get() {
            Some(audit) => match audit.reserve(due) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(keyring = %self.path.display(), error = %e,
                        "scheduled rotation or purge is due but the audit log cannot record it; deferred");
                    return;
                }
            },
            None => Vec::new(),
        };
        let done = crate::keyring::edit_if(&self.path, false, |r| {
            let before: HashMap<String, u32> =
                r.keys.iter().map(|(n, k)| (n.clone(), k.primary)).collect();
            let rotated = r.rotate_due(None, now)?;
            let purged = r.purge_due(None, now)?;
            Ok((!rotated.is_empty() || !purged.is_empty()).then_some((before, rotated, purged)))
        });
        match done {
            Ok(Some((before, rotated, purged))) => {
                let mut record = |rec: LifecycleRecord| {
                    let slot = match (slots.pop(), self.audit.get()) {
                        (Some(s), _) => Some(s),
                        // More became due between the check and the lock: best effort.
                        (None, Some(a)) => a.reserve(1).ok().and_then(|mut v| v.pop()),
                        (None, None) => None,
                    };
                    if let Some(slot) = slot {
                        slot(rec);
                    }
                };
                for (key, version) in rotated {
                    tracing::info!(keyring = %self.path.display(), key, version,
                        event = "scheduled_rotation", "rotated key: its rotation period had passed");
                    let mut rec = LifecycleRecord::new(
                        LifecycleEvent::Rotated,
                        &key,
                        &self.path,
                        "schedule",
                        Actor::scheduler(),
                    );
                    rec.old_primary_version = before.get(&key).copied();
                    rec.new_primary_version = Some(version);
                    record(rec);
                }
                for key in purged {
                    tracing::warn!(keyring = %self.path.display(), key,
                        event = "purged", "destroyed key: its deletion window had ended");
                    record(LifecycleRecord::new(
                        LifecycleEvent::Purged,
                        &key,
                        &self.path,
                        "schedule",
                        Actor::scheduler(),
                    ));
                }
                self.reload_if_changed();
            }
            // Another server did it first (under the lock): load its result.
            Ok(None) => {
                self.reload_if_changed();
            }
            Err(e) => tracing::error!(keyring = %self.path.display(), error = %e,
                "scheduled rotation or purge is due but failed"),
        }
    }
}

/// A configured key backed by one key of a local keyring.
pub struct LocalBackend {
    ring: Arc<LocalKeyring>,
    name: String,
}

impl LocalBackend {
    pub fn new(ring: Arc<LocalKeyring>, name: impl Into<String>) -> Self {
        Self {
            ring,
            name: name.into(),
        }
    }

    fn err(kind: BackendErrorKind, msg: impl Into<std::borrow::Cow<'static, str>>) -> BackendError {
        BackendError::new(BackendKind::Local, kind, msg)
    }

    fn aad(&self, label: &[u8], version: u32, ctx: &BackendContext<'_>) -> Vec<u8> {
        let mut aad = Vec::with_capacity(96);
        aad.extend_from_slice(label);
        aad.push(self.name.len() as u8);
        aad.extend_from_slice(self.name.as_bytes());
        aad.extend_from_slice(&version.to_be_bytes());
        aad.extend_from_slice(&ctx.to_aad());
        aad
    }

    fn unwrap_with(
        &self,
        ring: &Keyring,
        version: u32,
        wrapped: &[u8],
        ctx: &BackendContext<'_>,
    ) -> Result<Option<SecretKey>, BackendError> {
        let Some(key) = ring.keys.get(&self.name) else {
            return Err(Self::err(
                BackendErrorKind::NotFound,
                format!("key {:?} is not in the keyring", self.name),
            ));
        };
        if !key.enabled {
            return Err(Self::err(
                BackendErrorKind::Disabled,
                format!("key {:?} is disabled", self.name),
            ));
        }
        let Some(kv) = key.versions.get(&version) else {
            return Ok(None);
        };
        // Format 2 first when it can be one; a format 1 wrap whose random nonce happens to
        // start with 0x02 (1 in 256) falls through to the format 1 attempt.
        if wrapped.first() == Some(&WRAP_V2)
            && wrapped.len() > WRAP_V2_OVERHEAD
            && let Some(key) = self.open_v2(kv.material(), version, wrapped, ctx)?
        {
            return Ok(Some(key));
        }
        if wrapped.len() > NONCE_LEN + TAG_LEN
            && let Some(key) = self.open_v1(kv.material(), version, wrapped, ctx)?
        {
            return Ok(Some(key));
        }
        Err(Self::err(
            BackendErrorKind::InvalidCiphertext,
            "wrapped key does not authenticate under this key and context",
        ))
    }

    /// Format 2: the per-wrap key from the salt, a zero nonce. `None`: does not authenticate.
    fn open_v2(
        &self,
        kek: &SecretKey,
        version: u32,
        wrapped: &[u8],
        ctx: &BackendContext<'_>,
    ) -> Result<Option<SecretKey>, BackendError> {
        let (salt, sealed) = wrapped[1..].split_at(WRAP_SALT_LEN);
        let key = wrap_key_v2(kek, salt)?;
        let aad = self.aad(WRAP_LABEL_V2, version, ctx);
        Ok(open_exact(&key, [0u8; NONCE_LEN], &aad, sealed))
    }

    /// Format 1: a random nonce under the KEK itself. `None`: does not authenticate.
    fn open_v1(
        &self,
        kek: &SecretKey,
        version: u32,
        wrapped: &[u8],
        ctx: &BackendContext<'_>,
    ) -> Result<Option<SecretKey>, BackendError> {
        let (nonce, sealed) = wrapped.split_at(NONCE_LEN);
        let nonce: [u8; NONCE_LEN] = nonce
            .try_into()
            .map_err(|_| Self::err(BackendErrorKind::InvalidCiphertext, "bad nonce"))?;
        let key = aead_key(kek.as_ref())?;
        let aad = self.aad(WRAP_LABEL_V1, version, ctx);
        Ok(open_exact(&key, nonce, &aad, sealed))
    }
}

fn aead_key(bytes: &[u8]) -> Result<aead::LessSafeKey, BackendError> {
    Ok(aead::LessSafeKey::new(
        aead::UnboundKey::new(&aead::AES_256_GCM, bytes)
            .map_err(|_| LocalBackend::err(BackendErrorKind::Internal, "bad key-encryption key"))?,
    ))
}

/// The per-wrap key of format 2: HKDF-SHA256(IKM = KEK version, salt, info) to 32 bytes.
fn wrap_key_v2(kek: &SecretKey, salt: &[u8]) -> Result<aead::LessSafeKey, BackendError> {
    struct Len32;
    impl hkdf::KeyType for Len32 {
        fn len(&self) -> usize {
            32
        }
    }
    let mut k = zeroize::Zeroizing::new([0u8; 32]);
    hkdf::Salt::new(hkdf::HKDF_SHA256, salt)
        .extract(kek.as_ref())
        .expand(&[WRAP_KEY_INFO_V2], Len32)
        .and_then(|okm| okm.fill(&mut k[..]))
        .map_err(|_| LocalBackend::err(BackendErrorKind::Internal, "key derivation failed"))?;
    aead_key(&k[..])
}

/// Opens `sealed` (ciphertext || tag) into a buffer of exactly the data key's size, wiped on
/// failure.
fn open_exact(
    key: &aead::LessSafeKey,
    nonce: [u8; NONCE_LEN],
    aad: &[u8],
    sealed: &[u8],
) -> Option<SecretKey> {
    let (ciphertext, tag) = sealed.split_at(sealed.len().checked_sub(TAG_LEN)?);
    let mut out = vec![0u8; ciphertext.len()];
    match key.open_separate_gather(
        aead::Nonce::assume_unique_for_key(nonce),
        aead::Aad::from(aad),
        ciphertext,
        tag,
        &mut out,
    ) {
        Ok(()) => Some(SecretKey::from_vec(out)),
        Err(_) => {
            zeroize::Zeroize::zeroize(&mut out);
            None
        }
    }
}

/// The keyring version a copy names, spelled exactly as `wrap` writes it.
fn parse_version(copy: &WrappedCopy<'_>) -> Result<u32, FormatError> {
    super::canonical_decimal(copy.key_version)
        .and_then(|v| u32::try_from(v).ok())
        .ok_or(FormatError::NotCanonical("key version"))
}

#[async_trait::async_trait]
impl KeyBackend for LocalBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Local
    }

    fn key_id(&self) -> &str {
        &self.name
    }

    fn check_canonical(&self, copy: &WrappedCopy<'_>) -> Result<(), FormatError> {
        parse_version(copy).map(|_| ())
    }

    fn hint(&self) -> KeyHint {
        let ring = self.ring.ring.load();
        match ring.keys.get(&self.name) {
            Some(k) => KeyHint {
                disabled: !k.enabled,
                generation: ((k.primary as u64) << 1) | k.enabled as u64,
                pending_deletion: k.delete_after.is_some(),
                min_decrypt_version: u64::from(k.min_decrypt_version),
            },
            None => KeyHint::default(),
        }
    }

    async fn wrap(
        &self,
        key: &SecretKey,
        ctx: &BackendContext<'_>,
    ) -> Result<Wrapped, BackendError> {
        let ring = self.ring.snapshot();
        let rk = ring.keys.get(&self.name).ok_or_else(|| {
            Self::err(
                BackendErrorKind::NotFound,
                format!("key {:?} is not in the keyring", self.name),
            )
        })?;
        if !rk.enabled {
            return Err(Self::err(
                BackendErrorKind::Disabled,
                format!("key {:?} is disabled", self.name),
            ));
        }
        let version = rk.primary;
        let kv = rk
            .versions
            .get(&version)
            .ok_or_else(|| Self::err(BackendErrorKind::Internal, "primary version missing"))?;
        let mut salt = [0u8; WRAP_SALT_LEN];
        random_fill(&mut salt).map_err(|e| {
            Self::err(BackendErrorKind::Internal, "random generator failed").with_source(e)
        })?;
        let wrap_key = wrap_key_v2(kv.material(), &salt)?;
        let mut out = Vec::with_capacity(WRAP_V2_OVERHEAD + key.len());
        out.push(WRAP_V2);
        out.extend_from_slice(&salt);
        let body = out.len();
        out.extend_from_slice(key.as_ref());
        let aad = self.aad(WRAP_LABEL_V2, version, ctx);
        let tag = wrap_key
            .seal_in_place_separate_tag(
                aead::Nonce::assume_unique_for_key([0u8; NONCE_LEN]),
                aead::Aad::from(&aad[..]),
                &mut out[body..],
            )
            .map_err(|_| Self::err(BackendErrorKind::Internal, "sealing failed"))?;
        out.extend_from_slice(tag.as_ref());
        Ok(Wrapped {
            key_id: self.name.clone(),
            key_version: version.to_string(),
            ciphertext: out,
        })
    }

    async fn unwrap(
        &self,
        copy: &WrappedCopy<'_>,
        ctx: &BackendContext<'_>,
    ) -> Result<SecretKey, BackendError> {
        if copy.backend != BackendKind::Local || copy.key_id != self.name {
            return Err(Self::err(
                BackendErrorKind::InvalidCiphertext,
                "wrapped key was not made by this key",
            ));
        }
        let version = parse_version(copy)
            .map_err(|_| Self::err(BackendErrorKind::InvalidCiphertext, "bad key version"))?;
        if let Some(key) = self.unwrap_with(&self.ring.snapshot(), version, copy.wrapped, ctx)? {
            return Ok(key);
        }
        // A version we do not know may have been added since the last poll: look once more.
        let ring = Arc::clone(&self.ring);
        let _ = tokio::task::spawn_blocking(move || ring.reload_if_changed()).await;
        self.unwrap_with(&self.ring.snapshot(), version, copy.wrapped, ctx)?
            .ok_or_else(|| {
                Self::err(
                    BackendErrorKind::NotFound,
                    format!("key {:?} has no version {version}", self.name),
                )
            })
    }

    async fn describe(&self) -> Result<KeyDescription, BackendError> {
        let ring = self.ring.snapshot();
        let k = ring.keys.get(&self.name).ok_or_else(|| {
            Self::err(
                BackendErrorKind::NotFound,
                format!("key {:?} is not in the keyring", self.name),
            )
        })?;
        Ok(KeyDescription {
            durable_key_id: self.name.clone(),
            primary_version: Some(k.primary.to_string()),
            enabled: k.enabled,
        })
    }

    fn lifecycle(&self) -> Option<Lifecycle> {
        let ring = self.ring.ring.load();
        let k = ring.keys.get(&self.name)?;
        Some(Lifecycle {
            source: "keyring",
            primary_version: Some(k.primary.to_string()),
            primary_created: k.primary_created(),
            rotation_period: k.rotation_period,
            next_rotation: k.next_rotation(),
            min_decrypt_version: (k.min_decrypt_version > 0)
                .then(|| k.min_decrypt_version.to_string()),
            delete_after: k.delete_after,
        })
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

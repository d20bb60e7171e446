//! The local backend: data keys wrapped with AES-256-GCM under a key-encryption key from a
//! keyring file (see `keyring.rs`). The embedded default, so the sidecar runs with no cloud.
//!
//! A running server picks up keyring edits (rotation, disable) without restart: a watcher polls
//! the file's identity (inode, size, mtime) and swaps in the new keyring; an unwrap that names an
//! unknown version re-reads the file once before failing. A keyring that fails to load is logged
//! and the previous one stays in force.

use std::any::Any;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use aws_lc_rs::aead;

use super::{
    BackendContext, BackendError, BackendErrorKind, BackendKind, KeyBackend, KeyDescription,
    KeyHint, Wrapped,
};
use crate::envelope::WrappedCopy;
use crate::keyring::{Keyring, KeyringError};
use crate::secret::{SecretKey, random_fill};
use crate::util::FileStamp;

const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;
const WRAP_LABEL: &[u8] = b"keybroker local wrap v1";

/// A keyring file loaded into memory, shared by every configured key that uses it.
pub struct LocalKeyring {
    path: PathBuf,
    ring: ArcSwap<Keyring>,
    stamp: Mutex<Option<FileStamp>>,
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
                let _ = tokio::task::spawn_blocking(move || ring.reload_if_changed()).await;
            }
        });
    }

    pub fn snapshot(&self) -> Arc<Keyring> {
        self.ring.load_full()
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

    fn aad(&self, version: u32, ctx: &BackendContext<'_>) -> Vec<u8> {
        let mut aad = Vec::with_capacity(96);
        aad.extend_from_slice(WRAP_LABEL);
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
        if wrapped.len() < NONCE_LEN + TAG_LEN {
            return Err(Self::err(
                BackendErrorKind::InvalidCiphertext,
                "wrapped key is too short",
            ));
        }
        let (nonce, sealed) = wrapped.split_at(NONCE_LEN);
        let kek = aead::LessSafeKey::new(
            aead::UnboundKey::new(&aead::AES_256_GCM, kv.material().as_ref())
                .map_err(|_| Self::err(BackendErrorKind::Internal, "bad key-encryption key"))?,
        );
        let nonce = aead::Nonce::try_assume_unique_for_key(nonce)
            .map_err(|_| Self::err(BackendErrorKind::InvalidCiphertext, "bad nonce"))?;
        let mut buf = sealed.to_vec();
        let aad = self.aad(version, ctx);
        let opened = kek.open_in_place(nonce, aead::Aad::from(&aad[..]), &mut buf);
        match opened {
            Ok(plain) => {
                let len = plain.len();
                buf.truncate(len);
                Ok(Some(SecretKey::from_vec(buf)))
            }
            Err(_) => {
                zeroize::Zeroize::zeroize(&mut buf);
                Err(Self::err(
                    BackendErrorKind::InvalidCiphertext,
                    "wrapped key does not authenticate under this key and context",
                ))
            }
        }
    }
}

#[async_trait::async_trait]
impl KeyBackend for LocalBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Local
    }

    fn key_id(&self) -> &str {
        &self.name
    }

    fn hint(&self) -> KeyHint {
        let ring = self.ring.ring.load();
        match ring.keys.get(&self.name) {
            Some(k) => KeyHint {
                disabled: !k.enabled,
                generation: ((k.primary as u64) << 1) | k.enabled as u64,
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
        let kek = aead::LessSafeKey::new(
            aead::UnboundKey::new(&aead::AES_256_GCM, kv.material().as_ref())
                .map_err(|_| Self::err(BackendErrorKind::Internal, "bad key-encryption key"))?,
        );
        let mut nonce = [0u8; NONCE_LEN];
        random_fill(&mut nonce).map_err(|e| {
            Self::err(BackendErrorKind::Internal, "random generator failed").with_source(e)
        })?;
        let mut out = Vec::with_capacity(NONCE_LEN + key.len() + TAG_LEN);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(key.as_ref());
        let aad = self.aad(version, ctx);
        let tag = kek
            .seal_in_place_separate_tag(
                aead::Nonce::assume_unique_for_key(nonce),
                aead::Aad::from(&aad[..]),
                &mut out[NONCE_LEN..],
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
        let version: u32 = copy
            .key_version
            .parse()
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

    fn as_any(&self) -> &dyn Any {
        self
    }
}

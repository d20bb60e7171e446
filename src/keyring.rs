//! The local keyring file: named keys, each with numbered versions of random 256-bit
//! key-encryption keys, a primary version and an enabled flag.
//!
//! Edits (the `keybroker keys` admin commands) are serialized by an exclusive lock on a sibling
//! `.lock` file and written with [`crate::util::write_atomic`]: a crash at any instant leaves
//! either the old or the new keyring, and an edit never drops a version. A write killed in the
//! instant between naming its temporary file and renaming it leaves that file (a full copy of
//! the keys); the next edit and the next server start delete such files under the same lock.
//! The gRPC API never changes keys.
//!
//! Lifecycle state lives beside the versions (docs/lifecycle.md): an optional rotation period
//! (a server or `keys rotate --if-due` adds a version when the primary is older), an optional
//! `min_decrypt_version` (older versions are retired: kept, but refused) and an optional
//! deletion date (every use is refused until then; after it the key is purged). Rotation and
//! purge when due re-check under the lock, so several servers on one keyring act once.
//!
//! Access: [`Keyring::load`] refuses a keyring any other user could read or change (see
//! [`check_access`]) before reading a byte of it.
//!
//! This module must never print key material or any other part of the file: versions have a
//! redacting `Debug`, and a file that does not parse is reported by error kind, line and column
//! only.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::{self, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, Zeroizing};

use crate::secret::SecretKey;
use crate::util::{
    check_name, format_duration, parse_duration, parse_rfc3339, rfc3339, rfc3339_now, write_atomic,
};

pub const FORMAT: &str = "keybroker-keyring/v1";
pub const KEK_LEN: usize = 32;
/// Largest keyring file we read: far above any real keyring, and a bound on what a corrupted or
/// hostile file can make us allocate.
const MAX_FILE_LEN: u64 = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum KeyringError {
    #[error("keyring {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("keyring {path} is not valid: {reason}")]
    Invalid { path: PathBuf, reason: String },
    /// Other users could read or replace the keys (see [`check_access`]).
    #[error("keyring {path} refused: {reason}")]
    Insecure { path: PathBuf, reason: String },
    #[error("key {0:?} is not in the keyring")]
    NoSuchKey(String),
    #[error("key {0:?} already exists in the keyring")]
    KeyExists(String),
    #[error("invalid key name: {0}")]
    BadName(String),
    #[error("the system random number generator failed")]
    Random,
    /// A lifecycle edit that the key's state does not allow (named in the message).
    #[error("key {key:?}: {reason}")]
    Refused { key: String, reason: String },
}

/// Shortest rotation period accepted. Far below any real schedule; it lets tests and drills
/// watch rotation happen.
pub const MIN_ROTATION_PERIOD: Duration = Duration::from_secs(1);
/// Shortest deletion window, as in the clouds (AWS KMS and Cloud KMS both have 7 days).
pub const MIN_DELETION_WINDOW: Duration = Duration::from_secs(7 * 86_400);

/// One key-encryption key version.
pub struct KeyVersion {
    pub created: String,
    material: SecretKey,
}

impl KeyVersion {
    pub fn material(&self) -> &SecretKey {
        &self.material
    }
}

impl fmt::Debug for KeyVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyVersion")
            .field("created", &self.created)
            .field("material", &"<redacted>")
            .finish()
    }
}

#[derive(Debug)]
pub struct RingKey {
    pub enabled: bool,
    pub primary: u32,
    pub versions: BTreeMap<u32, KeyVersion>,
    /// Add a version when the primary is this old (`None`: rotation is manual only).
    pub rotation_period: Option<Duration>,
    /// Versions below this are retired: decryption under them is refused (0: none retired).
    pub min_decrypt_version: u32,
    /// Scheduled for deletion: refused for every use, purged at this time.
    pub delete_after: Option<SystemTime>,
}

impl RingKey {
    /// When the primary version was made (`None` if its time does not parse).
    pub fn primary_created(&self) -> Option<SystemTime> {
        self.versions
            .get(&self.primary)
            .and_then(|v| parse_rfc3339(&v.created))
    }

    /// When the next scheduled rotation is due (`None`: no schedule).
    pub fn next_rotation(&self) -> Option<SystemTime> {
        let period = self.rotation_period?;
        // A primary whose time does not parse is treated as due now: rotating fixes it.
        Some(
            self.primary_created()
                .map_or(SystemTime::UNIX_EPOCH, |c| c + period),
        )
    }

    /// Due for a scheduled rotation at `now`: enabled, not pending deletion, schedule passed.
    pub fn rotation_due(&self, now: SystemTime) -> bool {
        self.enabled
            && self.delete_after.is_none()
            && self.next_rotation().is_some_and(|n| n <= now)
    }
}

#[derive(Debug, Default)]
pub struct Keyring {
    pub keys: BTreeMap<String, RingKey>,
    /// What [`check_access`] tolerated but a reader should hear about (logged by `load`).
    pub warnings: Vec<String>,
}

/// The on-disk form. Key material is base64 in `Zeroizing` strings so the text form is wiped too.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileForm {
    format: String,
    keys: BTreeMap<String, FileKey>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileKey {
    enabled: bool,
    primary: u32,
    versions: Vec<FileVersion>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    rotation_period: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    min_decrypt_version: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    delete_after: Option<String>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileVersion {
    version: u32,
    created: String,
    material: Zeroizing<String>,
}

impl Keyring {
    /// Reads and validates a keyring file, refusing one that other users could read or replace.
    pub fn load(path: &Path) -> Result<Self, KeyringError> {
        let io_err = |source| KeyringError::Io {
            path: path.to_owned(),
            source,
        };
        let invalid = |reason: String| KeyringError::Invalid {
            path: path.to_owned(),
            reason,
        };
        // Checked on the open descriptor, so the file checked is the file read.
        let mut file = fs::File::open(path).map_err(io_err)?;
        let meta = file.metadata().map_err(io_err)?;
        let warnings = check_access(&meta).map_err(|reason| KeyringError::Insecure {
            path: path.to_owned(),
            reason,
        })?;
        for w in &warnings {
            tracing::warn!(keyring = %path.display(), "{w}");
        }
        let len = meta.len();
        if len > MAX_FILE_LEN {
            return Err(invalid(format!(
                "file is {len} bytes; the limit is {MAX_FILE_LEN}"
            )));
        }
        let mut text = Zeroizing::new(Vec::with_capacity(len as usize + 1));
        (&mut file)
            .take(MAX_FILE_LEN + 1)
            .read_to_end(&mut text)
            .map_err(io_err)?;
        let mut ring = Self::parse_bytes(&text, path)?;
        ring.warnings = warnings;
        Ok(ring)
    }

    /// Validates keyring file contents: [`Keyring::load`] after its access checks, without the
    /// file (`path` only names it in errors). Separate so that the fuzz harness (`fuzz/`) can
    /// drive the parser on untrusted bytes directly.
    pub fn parse_bytes(text: &[u8], path: &Path) -> Result<Self, KeyringError> {
        let invalid = |reason: String| KeyringError::Invalid {
            path: path.to_owned(),
            reason,
        };
        let form: FileForm = serde_json::from_slice(text).map_err(|e| invalid(json_problem(&e)))?;
        if form.format != FORMAT {
            return Err(invalid(format!("\"format\" is not {FORMAT:?}")));
        }
        let mut ring = Keyring::default();
        for (name, fk) in form.keys {
            // The name is not echoed: a name that fails the rules may be anything (even key
            // material pasted into the wrong place).
            check_name(&name).map_err(|_| {
                invalid(
                    "a key name is not valid (names are 1 to 128 bytes of letters, digits and \
                     . _ - : / @)"
                        .to_owned(),
                )
            })?;
            let mut versions = BTreeMap::new();
            for fv in fk.versions {
                let mut bytes = B64.decode(fv.material.as_bytes()).map_err(|_| {
                    invalid(format!(
                        "key {name:?} version {}: material is not base64",
                        fv.version
                    ))
                })?;
                if bytes.len() != KEK_LEN {
                    bytes.zeroize();
                    return Err(invalid(format!(
                        "key {name:?} version {}: material must be {KEK_LEN} bytes",
                        fv.version
                    )));
                }
                let version = KeyVersion {
                    created: fv.created,
                    material: SecretKey::from_vec(bytes),
                };
                if fv.version == 0 || versions.insert(fv.version, version).is_some() {
                    return Err(invalid(format!(
                        "key {name:?}: version {} is zero or repeated",
                        fv.version
                    )));
                }
            }
            if !versions.contains_key(&fk.primary) {
                return Err(invalid(format!(
                    "key {name:?}: primary version {} does not exist",
                    fk.primary
                )));
            }
            let rotation_period = match &fk.rotation_period {
                None => None,
                Some(p) => match parse_duration(p) {
                    Ok(d) if d >= MIN_ROTATION_PERIOD => Some(d),
                    _ => {
                        return Err(invalid(format!(
                            "key {name:?}: rotation_period is not a duration of at least 1s"
                        )));
                    }
                },
            };
            let min_decrypt_version = fk.min_decrypt_version.unwrap_or(0);
            if min_decrypt_version > fk.primary {
                return Err(invalid(format!(
                    "key {name:?}: min_decrypt_version {min_decrypt_version} is above the primary \
                     version {}",
                    fk.primary
                )));
            }
            let delete_after = match &fk.delete_after {
                None => None,
                Some(t) => Some(parse_rfc3339(t).ok_or_else(|| {
                    invalid(format!(
                        "key {name:?}: delete_after is not an RFC 3339 UTC time"
                    ))
                })?),
            };
            ring.keys.insert(
                name,
                RingKey {
                    enabled: fk.enabled,
                    primary: fk.primary,
                    versions,
                    rotation_period,
                    min_decrypt_version,
                    delete_after,
                },
            );
        }
        Ok(ring)
    }

    /// Writes the keyring atomically and durably, mode 0600. Only under the lock ([`edit`]).
    fn save(&self, path: &Path) -> Result<(), KeyringError> {
        let form = FileForm {
            format: FORMAT.to_owned(),
            keys: self
                .keys
                .iter()
                .map(|(name, k)| {
                    let versions = k
                        .versions
                        .iter()
                        .map(|(v, kv)| FileVersion {
                            version: *v,
                            created: kv.created.clone(),
                            material: Zeroizing::new(B64.encode(kv.material.as_ref())),
                        })
                        .collect();
                    (
                        name.clone(),
                        FileKey {
                            enabled: k.enabled,
                            primary: k.primary,
                            versions,
                            rotation_period: k.rotation_period.map(format_duration),
                            min_decrypt_version: (k.min_decrypt_version > 0)
                                .then_some(k.min_decrypt_version),
                            delete_after: k.delete_after.map(rfc3339),
                        },
                    )
                })
                .collect(),
        };
        // Size the buffer up front so serialization does not reallocate (leaving copies behind).
        let mut buf = Zeroizing::new(Vec::with_capacity(4096 + self.keys.len() * 4096));
        serde_json::to_writer_pretty(&mut *buf, &form).map_err(|e| KeyringError::Invalid {
            path: path.to_owned(),
            reason: format!("cannot serialize: {e}"),
        })?;
        buf.push(b'\n');
        write_atomic(path, &buf, 0o600).map_err(|source| KeyringError::Io {
            path: path.to_owned(),
            source,
        })
    }

    /// Adds a key with one fresh version, enabled and primary.
    pub fn create_key(&mut self, name: &str) -> Result<(), KeyringError> {
        check_name(name).map_err(KeyringError::BadName)?;
        if self.keys.contains_key(name) {
            return Err(KeyringError::KeyExists(name.to_owned()));
        }
        let mut versions = BTreeMap::new();
        versions.insert(1, fresh_version()?);
        self.keys.insert(
            name.to_owned(),
            RingKey {
                enabled: true,
                primary: 1,
                versions,
                rotation_period: None,
                min_decrypt_version: 0,
                delete_after: None,
            },
        );
        Ok(())
    }

    /// When the key was created: its first version's time.
    pub fn created(&self, name: &str) -> Option<&str> {
        let k = self.keys.get(name)?;
        k.versions.values().next().map(|v| v.created.as_str())
    }

    /// Adds a new version and makes it primary; every older version stays for decryption.
    pub fn rotate_key(&mut self, name: &str) -> Result<u32, KeyringError> {
        let key = self.key_mut(name)?;
        let next = key.versions.keys().next_back().copied().unwrap_or(0) + 1;
        key.versions.insert(next, fresh_version()?);
        key.primary = next;
        Ok(next)
    }

    pub fn set_enabled(&mut self, name: &str, enabled: bool) -> Result<(), KeyringError> {
        self.key_mut(name)?.enabled = enabled;
        Ok(())
    }

    /// Sets or clears (`None`) the key's rotation period.
    pub fn set_rotation_period(
        &mut self,
        name: &str,
        period: Option<Duration>,
    ) -> Result<(), KeyringError> {
        if period.is_some_and(|p| p < MIN_ROTATION_PERIOD) {
            return Err(KeyringError::Refused {
                key: name.to_owned(),
                reason: "the rotation period must be at least 1s".into(),
            });
        }
        self.key_mut(name)?.rotation_period = period;
        Ok(())
    }

    /// Rotates every key whose schedule has passed at `now` (see [`RingKey::rotation_due`]).
    /// Returns the keys rotated and their new primary versions; empty when none was due.
    pub fn rotate_due(
        &mut self,
        only: Option<&str>,
        now: SystemTime,
    ) -> Result<Vec<(String, u32)>, KeyringError> {
        if let Some(name) = only {
            self.key_mut(name)?;
        }
        let due: Vec<String> = self
            .keys
            .iter()
            .filter(|(n, k)| only.is_none_or(|o| o == n.as_str()) && k.rotation_due(now))
            .map(|(n, _)| n.clone())
            .collect();
        due.into_iter()
            .map(|n| self.rotate_key(&n).map(|v| (n, v)))
            .collect()
    }

    /// Retires the versions below `min` (0: none). The primary cannot be retired.
    pub fn set_min_decrypt_version(&mut self, name: &str, min: u32) -> Result<(), KeyringError> {
        let key = self.key_mut(name)?;
        if min > key.primary {
            return Err(KeyringError::Refused {
                key: name.to_owned(),
                reason: format!(
                    "min_decrypt_version {min} is above the primary version {}; rotate first",
                    key.primary
                ),
            });
        }
        key.min_decrypt_version = min;
        Ok(())
    }

    /// Schedules the key's deletion at `at` (at least [`MIN_DELETION_WINDOW`] after `now`).
    pub fn schedule_deletion(
        &mut self,
        name: &str,
        at: SystemTime,
        now: SystemTime,
    ) -> Result<(), KeyringError> {
        if at < now + MIN_DELETION_WINDOW {
            return Err(KeyringError::Refused {
                key: name.to_owned(),
                reason: "the deletion window must be at least 7 days".into(),
            });
        }
        let key = self.key_mut(name)?;
        if let Some(when) = key.delete_after {
            return Err(KeyringError::Refused {
                key: name.to_owned(),
                reason: format!("already scheduled for deletion at {}", rfc3339(when)),
            });
        }
        key.delete_after = Some(at);
        Ok(())
    }

    /// Cancels a scheduled deletion: the key is as it was before.
    pub fn cancel_deletion(&mut self, name: &str) -> Result<(), KeyringError> {
        let key = self.key_mut(name)?;
        if key.delete_after.take().is_none() {
            return Err(KeyringError::Refused {
                key: name.to_owned(),
                reason: "is not scheduled for deletion".into(),
            });
        }
        Ok(())
    }

    /// Destroys the keys whose deletion window has passed at `now` (with `only`, that key, which
    /// must be one of them). Their material is dropped (and zeroized) and gone from the file
    /// once it is saved. Returns the names purged.
    pub fn purge_due(
        &mut self,
        only: Option<&str>,
        now: SystemTime,
    ) -> Result<Vec<String>, KeyringError> {
        if let Some(name) = only {
            let key = self.key_mut(name)?;
            match key.delete_after {
                None => {
                    return Err(KeyringError::Refused {
                        key: name.to_owned(),
                        reason: "is not scheduled for deletion".into(),
                    });
                }
                Some(at) if at > now => {
                    return Err(KeyringError::Refused {
                        key: name.to_owned(),
                        reason: format!(
                            "its deletion window ends at {}; it cannot be purged before",
                            rfc3339(at)
                        ),
                    });
                }
                Some(_) => {}
            }
        }
        let due: Vec<String> = self
            .keys
            .iter()
            .filter(|(n, k)| {
                only.is_none_or(|o| o == n.as_str()) && k.delete_after.is_some_and(|a| a <= now)
            })
            .map(|(n, _)| n.clone())
            .collect();
        for n in &due {
            self.keys.remove(n);
        }
        Ok(due)
    }

    fn key_mut(&mut self, name: &str) -> Result<&mut RingKey, KeyringError> {
        self.keys
            .get_mut(name)
            .ok_or_else(|| KeyringError::NoSuchKey(name.to_owned()))
    }
}

fn fresh_version() -> Result<KeyVersion, KeyringError> {
    Ok(KeyVersion {
        created: rfc3339_now(),
        material: SecretKey::generate(KEK_LEN).map_err(|_| KeyringError::Random)?,
    })
}

/// Read-modify-write of a keyring file under an exclusive lock. With `create`, a missing
/// keyring (and its directory, mode 0700) is created empty first.
pub fn edit<T>(
    path: &Path,
    create: bool,
    f: impl FnOnce(&mut Keyring) -> Result<T, KeyringError>,
) -> Result<T, KeyringError> {
    // `f` always answers `Some`, so the file is always written and `None` cannot come back.
    edit_if(path, create, |r| f(r).map(Some))?.ok_or_else(|| KeyringError::Invalid {
        path: path.to_owned(),
        reason: "the edit was not applied".into(),
    })
}

/// [`edit`] that writes the file only when `f` returns `Some`: scheduled work (rotation and
/// purge when due) decides under the lock, on the file as it is then, whether there is any.
pub fn edit_if<T>(
    path: &Path,
    create: bool,
    f: impl FnOnce(&mut Keyring) -> Result<Option<T>, KeyringError>,
) -> Result<Option<T>, KeyringError> {
    let io_err = |source| KeyringError::Io {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
        && create
        && !dir.exists()
    {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io_err)?;
    }
    let lock_path = lock_path(path);
    let lock = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&lock_path)
        .map_err(io_err)?;
    lock.lock().map_err(io_err)?;
    remove_stale_temps_locked(path);
    let mut ring = match Keyring::load(path) {
        Ok(r) => r,
        Err(KeyringError::Io { source, .. })
            if create && source.kind() == io::ErrorKind::NotFound =>
        {
            Keyring::default()
        }
        Err(e) => return Err(e),
    };
    let Some(out) = f(&mut ring)? else {
        return Ok(None);
    };
    ring.save(path)?;
    // The lock is released when `lock` is dropped (closing the descriptor).
    Ok(Some(out))
}

/// Deletes temporary files that killed edits left beside `path`, under the keyring lock (the
/// server calls this at start). Without a lock file no edit ever ran here, so there is nothing
/// to clean; a keyring directory we cannot write (a read-only mount) has nothing either.
pub fn remove_stale_temps(path: &Path) {
    let Ok(lock) = OpenOptions::new().write(true).open(lock_path(path)) else {
        return;
    };
    if lock.lock().is_ok() {
        remove_stale_temps_locked(path);
    }
}

fn remove_stale_temps_locked(path: &Path) {
    match crate::util::remove_stale_temps(path) {
        Ok(0) => {}
        Ok(n) => tracing::info!(
            keyring = %path.display(),
            removed = n,
            "removed temporary keyring files left by an interrupted write"
        ),
        Err(e) => tracing::warn!(
            keyring = %path.display(),
            error = %e,
            "cannot remove temporary keyring files left by an interrupted write"
        ),
    }
}

/// Who may have the keyring, decided from its metadata. Refused: any permission for other
/// users; group write; an owner other than this process's user or root (root may read any file
/// anyway; an administrator-provisioned file, such as a Kubernetes Secret volume, is
/// root-owned). Tolerated with a warning: group read (a Secret mounted `0440` for an `fsGroup`
/// is how a non-root sidecar reads one). `Ok` carries the warnings.
pub fn check_access(meta: &fs::Metadata) -> Result<Vec<String>, String> {
    let mode = meta.mode() & 0o7777;
    if !meta.is_file() {
        return Err("not a regular file".to_owned());
    }
    if mode & 0o007 != 0 {
        return Err(format!(
            "mode {mode:04o} gives other users access to the keys; use chmod 600"
        ));
    }
    if mode & 0o020 != 0 {
        return Err(format!(
            "mode {mode:04o} lets the group replace the keys; use chmod 600"
        ));
    }
    let euid = rustix::process::geteuid().as_raw();
    let owner = meta.uid();
    if owner != euid && owner != 0 {
        return Err(format!(
            "owned by uid {owner}, not by this process's user (uid {euid}) or root"
        ));
    }
    let mut warnings = Vec::new();
    if mode & 0o040 != 0 {
        warnings.push(format!(
            "keyring mode {mode:04o} lets group {} read the keys; chmod 600 unless that is intended",
            meta.gid()
        ));
    }
    Ok(warnings)
}

/// A JSON error by kind and place only: serde_json's own messages quote the offending text
/// (`invalid type: string "..."`, `unknown field `...``), which may be key material.
fn json_problem(e: &serde_json::Error) -> String {
    use serde_json::error::Category;
    let kind = match e.classify() {
        Category::Io => "a read error",
        Category::Syntax => "a JSON syntax error",
        Category::Data => "a field, type or value that is not keyring JSON",
        Category::Eof => "an unexpected end of the file",
    };
    format!("{kind} at line {} column {}", e.line(), e.column())
}

fn lock_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".lock");
    PathBuf::from(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_bytes_reads_what_load_reads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keyring");
        edit(&path, true, |r| r.create_key("a")).unwrap();
        edit(&path, false, |r| r.rotate_key("a")).unwrap();
        let loaded = Keyring::load(&path).unwrap();
        let parsed = Keyring::parse_bytes(&fs::read(&path).unwrap(), &path).unwrap();
        let a = (&loaded.keys["a"], &parsed.keys["a"]);
        assert_eq!((a.0.primary, a.0.enabled), (a.1.primary, a.1.enabled));
        assert_eq!(a.0.versions.len(), 2);
        for (v, kv) in &a.0.versions {
            assert_eq!(kv.material().as_ref(), a.1.versions[v].material().as_ref());
        }
        assert!(matches!(
            Keyring::parse_bytes(b"{", &path),
            Err(KeyringError::Invalid { .. })
        ));
    }

    #[test]
    fn create_rotate_disable_persist() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/keyring");
        edit(&path, true, |r| r.create_key("a")).unwrap();
        assert_eq!(edit(&path, false, |r| r.rotate_key("a")).unwrap(), 2);
        edit(&path, false, |r| r.set_enabled("a", false)).unwrap();
        let ring = Keyring::load(&path).unwrap();
        let a = &ring.keys["a"];
        assert_eq!((a.primary, a.enabled, a.versions.len()), (2, false, 2));
        assert_ne!(
            a.versions[&1].material().as_ref(),
            a.versions[&2].material().as_ref()
        );
        let mode = fs::metadata(&path).unwrap().permissions();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(mode.mode() & 0o777, 0o600);
        assert!(matches!(
            edit(&path, false, |r| r.create_key("a")),
            Err(KeyringError::KeyExists(_))
        ));
        assert!(matches!(
            edit(&path, false, |r| r.rotate_key("nope")),
            Err(KeyringError::NoSuchKey(_))
        ));
    }

    #[test]
    fn debug_redacts_material() {
        let mut ring = Keyring::default();
        ring.create_key("k").unwrap();
        let material = B64.encode(ring.keys["k"].versions[&1].material().as_ref());
        let dbg = format!("{ring:?}");
        assert!(dbg.contains("<redacted>"));
        assert!(!dbg.contains(&material));
        let bytes = format!("{:?}", ring.keys["k"].versions[&1].material().as_ref());
        assert!(!dbg.contains(&bytes[1..bytes.len() - 1]));
    }

    fn write_private(path: &Path, text: &str) {
        use std::os::unix::fs::PermissionsExt;
        fs::write(path, text).unwrap();
        fs::set_permissions(path, fs::Permissions::from_mode(0o600)).unwrap();
    }

    #[test]
    fn rejects_corrupt_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keyring");
        for bad in [
            "",
            "{}",
            r#"{"format":"other","keys":{}}"#,
            r#"{"format":"keybroker-keyring/v1","keys":{"a":{"enabled":true,"primary":2,"versions":[]}}}"#,
            r#"{"format":"keybroker-keyring/v1","keys":{"a":{"enabled":true,"primary":1,"versions":[{"version":1,"created":"x","material":"AAAA"}]}}}"#,
        ] {
            write_private(&path, bad);
            assert!(
                matches!(Keyring::load(&path), Err(KeyringError::Invalid { .. })),
                "{bad}"
            );
        }
    }

    /// Issue 21 item 8: a file that does not parse is reported by kind, line and column; no
    /// byte of it (serde_json quotes strings, field names and values) reaches the message.
    #[test]
    fn parse_errors_never_quote_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keyring");
        let secret = "c2VjcmV0LWtleS1tYXRlcmlhbC0wMTIzNDU2Nzg5YWJj";
        for (text, place) in [
            (
                format!(
                    r#"{{"format":"keybroker-keyring/v1","keys":{{"a":{{"enabled":true,"primary":1,"versions":[{{"version":"{secret}","created":"x","material":"{secret}"}}]}}}}}}"#
                ),
                "line 1 column",
            ),
            (
                format!("{{\n  \"format\": \"keybroker-keyring/v1\",\n  \"{secret}\": 1\n}}"),
                "line 3 column",
            ),
            (format!(r#"{{"format":"{secret}","keys":{{}}}}"#), "is not"),
            (
                format!(
                    r#"{{"format":"keybroker-keyring/v1","keys":{{"{secret} x":{{"enabled":true,"primary":1,"versions":[]}}}}}}"#
                ),
                "key name is not valid",
            ),
            (format!("{{\"format\": \"{secret}"), "end of the file"),
        ] {
            write_private(&path, &text);
            let e = Keyring::load(&path).unwrap_err().to_string();
            assert!(!e.contains(&secret[..12]), "{e}");
            assert!(e.contains(place), "{e}");
        }
    }

    /// Issue 21 item 11: the keyring's mode and owner are checked before it is read.
    #[test]
    fn refuses_keyrings_others_can_read_or_replace() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keyring");
        edit(&path, true, |r| r.create_key("k")).unwrap();
        for (mode, ok) in [
            (0o600, true),
            (0o400, true),
            (0o640, true),
            (0o644, false),
            (0o604, false),
            (0o660, false),
            (0o602, false),
        ] {
            fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
            match Keyring::load(&path) {
                Ok(r) => {
                    assert!(ok, "{mode:o} accepted");
                    assert_eq!(r.warnings.len(), usize::from(mode & 0o040 != 0), "{mode:o}");
                }
                Err(KeyringError::Insecure { reason, .. }) => {
                    assert!(!ok, "{mode:o} refused: {reason}");
                    assert!(reason.contains("chmod 600"), "{reason}");
                }
                Err(e) => panic!("{mode:o}: {e}"),
            }
        }
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        // Owned by somebody else (the tests run as root, which may chown; otherwise skip).
        if rustix::process::geteuid().is_root() {
            std::os::unix::fs::chown(&path, Some(4242), None).unwrap();
            let e = Keyring::load(&path).unwrap_err().to_string();
            assert!(e.contains("owned by uid 4242"), "{e}");
            std::os::unix::fs::chown(&path, Some(0), None).unwrap();
        }
        Keyring::load(&path).unwrap();
        // Not a regular file.
        assert!(matches!(
            Keyring::load(dir.path()),
            Err(KeyringError::Insecure { .. }) | Err(KeyringError::Io { .. })
        ));
    }

    /// A write killed after naming its temporary file leaves it; the next edit removes it.
    #[test]
    fn edits_remove_temporary_files_of_killed_writes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keyring");
        edit(&path, true, |r| r.create_key("k")).unwrap();
        let stale = dir.path().join(".keyring.tmp.12345");
        fs::copy(&path, &stale).unwrap();
        let other = dir.path().join(".other.tmp.1");
        fs::write(&other, "not ours").unwrap();
        edit(&path, false, |r| r.rotate_key("k")).unwrap();
        assert!(!stale.exists());
        assert!(other.exists());
        fs::copy(&path, &stale).unwrap();
        remove_stale_temps(&path);
        assert!(!stale.exists(), "removed at server start too");
        let ring = Keyring::load(&path).unwrap();
        assert_eq!(ring.keys["k"].versions.len(), 2);
        assert_eq!(
            ring.created("k"),
            Some(ring.keys["k"].versions[&1].created.as_str())
        );
    }
}

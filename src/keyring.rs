//! The local keyring file: named keys, each with numbered versions of random 256-bit
//! key-encryption keys, a primary version and an enabled flag.
//!
//! Edits (the `keybroker keys` admin commands) are serialized by an exclusive lock on a sibling
//! `.lock` file and written with [`crate::util::write_atomic`]: a crash at any instant leaves
//! either the old or the new keyring, and an edit never drops a version. The gRPC API never
//! changes keys. This module must never print key material: versions have a redacting `Debug`.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::{self, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, Zeroizing};

use crate::secret::SecretKey;
use crate::util::{check_name, rfc3339_now, write_atomic};

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
    #[error("key {0:?} is not in the keyring")]
    NoSuchKey(String),
    #[error("key {0:?} already exists in the keyring")]
    KeyExists(String),
    #[error("invalid key name: {0}")]
    BadName(String),
    #[error("the system random number generator failed")]
    Random,
}

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
}

#[derive(Debug, Default)]
pub struct Keyring {
    pub keys: BTreeMap<String, RingKey>,
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
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileVersion {
    version: u32,
    created: String,
    material: Zeroizing<String>,
}

impl Keyring {
    /// Reads and validates a keyring file.
    pub fn load(path: &Path) -> Result<Self, KeyringError> {
        let io_err = |source| KeyringError::Io {
            path: path.to_owned(),
            source,
        };
        let invalid = |reason: String| KeyringError::Invalid {
            path: path.to_owned(),
            reason,
        };
        let len = fs::metadata(path).map_err(io_err)?.len();
        if len > MAX_FILE_LEN {
            return Err(invalid(format!(
                "file is {len} bytes; the limit is {MAX_FILE_LEN}"
            )));
        }
        let text = Zeroizing::new(fs::read(path).map_err(io_err)?);
        // serde_json's error text names a position, never the content.
        let form: FileForm =
            serde_json::from_slice(&text).map_err(|e| invalid(format!("not keyring JSON: {e}")))?;
        if form.format != FORMAT {
            return Err(invalid(format!(
                "format is {:?}, expected {FORMAT:?}",
                form.format
            )));
        }
        let mut ring = Keyring::default();
        for (name, fk) in form.keys {
            check_name(&name).map_err(|e| invalid(format!("key name {e}")))?;
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
            ring.keys.insert(
                name,
                RingKey {
                    enabled: fk.enabled,
                    primary: fk.primary,
                    versions,
                },
            );
        }
        Ok(ring)
    }

    /// Writes the keyring atomically and durably, mode 0600.
    pub fn save(&self, path: &Path) -> Result<(), KeyringError> {
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
            },
        );
        Ok(())
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
    let mut ring = match Keyring::load(path) {
        Ok(r) => r,
        Err(KeyringError::Io { source, .. })
            if create && source.kind() == io::ErrorKind::NotFound =>
        {
            Keyring::default()
        }
        Err(e) => return Err(e),
    };
    let out = f(&mut ring)?;
    ring.save(path)?;
    // The lock is released when `lock` is dropped (closing the descriptor).
    Ok(out)
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
            fs::write(&path, bad).unwrap();
            assert!(
                matches!(Keyring::load(&path), Err(KeyringError::Invalid { .. })),
                "{bad}"
            );
        }
    }
}

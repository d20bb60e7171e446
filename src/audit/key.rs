//! The audit key: HKDF-derived HMAC keys for the record chain and for context digests, the
//! MAC that closes a keyed record, and `audit new-key`. Never prints or logs key bytes.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io::{self, Write};
use std::path::Path;

use aws_lc_rs::{constant_time, hkdf, hmac};

use super::hex;

/// Shortest and longest accepted audit key file.
pub const MIN_KEY_LEN: usize = 32;
pub const MAX_KEY_LEN: usize = 1024;

/// The keys derived from an audit key file: one for the chain (records and checkpoints), one for
/// context digests, so that neither use can stand in for the other.
pub struct AuditKey {
    chain: hmac::Key,
    context: hmac::Key,
}

impl std::fmt::Debug for AuditKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AuditKey(<redacted>)")
    }
}

impl AuditKey {
    /// Reads a key file: its bytes are the key (32 to 1024 of them; `keybroker audit new-key`
    /// writes 32 random ones).
    pub fn load(path: &Path) -> io::Result<Self> {
        let fail = |why: String| io::Error::new(io::ErrorKind::InvalidData, why);
        let meta = std::fs::metadata(path).map_err(|e| {
            io::Error::new(e.kind(), format!("audit key file {}: {e}", path.display()))
        })?;
        if !meta.is_file() || meta.len() > MAX_KEY_LEN as u64 {
            return Err(fail(format!(
                "audit key file {} must be a regular file of {MIN_KEY_LEN} to {MAX_KEY_LEN} bytes",
                path.display()
            )));
        }
        {
            use std::os::unix::fs::PermissionsExt;
            if meta.permissions().mode() & 0o077 != 0 {
                tracing::warn!(file = %path.display(),
                    "the audit key file is readable by group or others; anyone who can read it can rewrite the audit log undetectably");
            }
        }
        let bytes = zeroize::Zeroizing::new(std::fs::read(path).map_err(|e| {
            io::Error::new(e.kind(), format!("audit key file {}: {e}", path.display()))
        })?);
        if bytes.len() < MIN_KEY_LEN || bytes.len() > MAX_KEY_LEN {
            return Err(fail(format!(
                "audit key file {} holds {} bytes; it needs {MIN_KEY_LEN} to {MAX_KEY_LEN}",
                path.display(),
                bytes.len()
            )));
        }
        Self::from_bytes(&bytes).map_err(|_| fail("audit key derivation failed".into()))
    }

    /// HKDF-SHA256(key file bytes, no salt) expanded under two labels.
    pub fn from_bytes(ikm: &[u8]) -> Result<Self, aws_lc_rs::error::Unspecified> {
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, &[]).extract(ikm);
        let derive = |info: &[u8]| -> Result<hmac::Key, aws_lc_rs::error::Unspecified> {
            let info = [info];
            let okm = prk.expand(&info, hmac::HMAC_SHA256)?;
            Ok(hmac::Key::from(okm))
        };
        Ok(Self {
            chain: derive(b"keybroker audit v2: record chain")?,
            context: derive(b"keybroker audit v2: context digest")?,
        })
    }

    pub(super) fn chain_mac(&self, bytes: &[u8]) -> [u8; 32] {
        let mut out = [0u8; 32];
        out.copy_from_slice(hmac::sign(&self.chain, bytes).as_ref());
        out
    }

    pub(super) fn context_mac(&self, canonical: &[u8]) -> [u8; 32] {
        let mut out = [0u8; 32];
        out.copy_from_slice(hmac::sign(&self.context, canonical).as_ref());
        out
    }

    /// The keyed `context_digest` of a context (what keyed logs carry), for looking records up.
    pub fn context_digest(&self, context: &BTreeMap<String, String>) -> String {
        let mut buf = Vec::with_capacity(64);
        crate::context::encode_map(context, &mut buf);
        hex(&self.context_mac(&buf))
    }
}

/// Writes a new random audit key (32 bytes, mode 0600); refuses to overwrite a file.
pub fn new_key_file(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut key = zeroize::Zeroizing::new([0u8; MIN_KEY_LEN]);
    crate::secret::random_fill(&mut key[..]).map_err(io::Error::other)?;
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(&key[..])?;
    f.sync_all()
}

/// The suffix a keyed record (or checkpoint) ends with: `,"mac":"` 64 hex digits `"}`.
const MAC_OPEN: &[u8] = b",\"mac\":\"";
const MAC_SUFFIX_LEN: usize = MAC_OPEN.len() + 64 + 2;

/// Appends `,"mac":"<hex HMAC of out[start..]>"}` and returns the MAC's hex.
pub(super) fn close_with_mac(key: &AuditKey, out: &mut Vec<u8>, start: usize) -> String {
    let mac = hex(&key.chain_mac(&out[start..]));
    out.extend_from_slice(MAC_OPEN);
    out.extend_from_slice(mac.as_bytes());
    out.extend_from_slice(b"\"}");
    mac
}

/// Splits a keyed line into (what the MAC covers, the MAC's hex), if it ends like one.
pub(super) fn split_mac(line: &[u8]) -> Option<(&[u8], &str)> {
    if line.len() < MAC_SUFFIX_LEN + 1 || !line.ends_with(b"\"}") {
        return None;
    }
    let (covered, suffix) = line.split_at(line.len() - MAC_SUFFIX_LEN);
    let mac = suffix.strip_prefix(MAC_OPEN)?.strip_suffix(b"\"}")?;
    let mac = std::str::from_utf8(mac).ok()?;
    mac.bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        .then_some((covered, mac))
}

/// Whether `mac` (hex) is the chain MAC of `covered`, compared in constant time.
pub(super) fn mac_matches(key: &AuditKey, covered: &[u8], mac: &str) -> bool {
    constant_time::verify_slices_are_equal(hex(&key.chain_mac(covered)).as_bytes(), mac.as_bytes())
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::context_digest;

    #[test]
    fn keyed_lines_round_trip_and_refuse_edits() {
        let key = AuditKey::from_bytes(&[1u8; 32]).unwrap();
        let mut out = b"{\"seq\":1,\"prev\":\"00\"".to_vec();
        let mac = close_with_mac(&key, &mut out, 0);
        let (covered, got) = split_mac(&out).unwrap();
        assert_eq!(got, mac);
        assert!(mac_matches(&key, covered, got));
        let mut edited = out.clone();
        edited[8] = b'2';
        let (covered, got) = split_mac(&edited).unwrap();
        assert!(!mac_matches(&key, covered, got));
        let other = AuditKey::from_bytes(&[2u8; 32]).unwrap();
        let (covered, got) = split_mac(&out).unwrap();
        assert!(!mac_matches(&other, covered, got));
        // An unkeyed record never looks keyed, even with a "mac" inside its context values.
        for line in [
            &b"{\"seq\":1,\"context_digest\":\"ab\"}"[..],
            b"{\"seq\":1,\"context\":{\"mac\":\"0000000000000000000000000000000000000000000000000000000000000000\"}}",
        ] {
            assert!(split_mac(line).is_none());
        }
        // Keyed context digests differ by key and from the plain SHA-256.
        let mut c = BTreeMap::new();
        c.insert("pin".to_owned(), "1234".to_owned());
        assert_ne!(key.context_digest(&c), other.context_digest(&c));
        assert_ne!(key.context_digest(&c), context_digest(&c));
    }

    #[test]
    fn audit_key_files_need_32_to_1024_bytes() {
        let dir = tempfile::tempdir().unwrap();
        for (len, ok) in [
            (0usize, false),
            (31, false),
            (32, true),
            (1024, true),
            (1025, false),
        ] {
            let p = dir.path().join(format!("k{len}"));
            std::fs::write(&p, vec![3u8; len]).unwrap();
            assert_eq!(AuditKey::load(&p).is_ok(), ok, "{len} bytes");
        }
        let e = AuditKey::load(&dir.path().join("missing")).unwrap_err();
        assert!(e.to_string().contains("audit key file"), "{e}");
    }
}

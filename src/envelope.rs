//! The keybroker ciphertext envelope, version 1. `docs/envelope.md` is the byte-level
//! specification and `tests/vectors/envelope-v1.json` its test vectors; keep all three in step.
//!
//! What this module must never do: panic or allocate more than the input justifies while parsing
//! untrusted bytes, return plaintext from a ciphertext whose commitment or tag does not verify,
//! or tell a caller *why* authentication failed (tampering and a wrong context look the same).

use std::collections::BTreeMap;

use aws_lc_rs::{aead, constant_time, hkdf};
use zeroize::Zeroize;

use crate::backend::BackendKind;
use crate::secret::{RandomFailed, SecretKey, random_fill};

pub const MAGIC: [u8; 2] = *b"KB";
pub const FORMAT_VERSION: u8 = 1;
pub const SALT_LEN: usize = 32;
pub const COMMITMENT_LEN: usize = 32;
pub const TAG_LEN: usize = 16;
/// Key name and caller name length limit (bytes).
pub const MAX_NAME_LEN: usize = 128;
pub const MAX_COPIES: usize = 8;
pub const MAX_KEY_ID_LEN: usize = 2048;
pub const MAX_VERSION_LEN: usize = 2048;
pub const MAX_WRAPPED_LEN: usize = 4096;
/// Encryption-context limits: pairs, key length, value length (bytes).
pub const MAX_CONTEXT_PAIRS: usize = 64;
pub const MAX_CONTEXT_KEY_LEN: usize = 256;
pub const MAX_CONTEXT_VALUE_LEN: usize = 4096;

/// HKDF `info`: a fixed label naming the format version and what the 64 output bytes are for.
const HKDF_INFO: &[u8] = b"keybroker envelope v1: aes-256-gcm key || key commitment";
/// Every message key is used exactly once (fresh 256-bit salt per message), so a constant nonce
/// is safe and saves 12 bytes per message.
const NONCE: [u8; 12] = [0u8; 12];

/// What the sealed body holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// An Encrypt result: the body is the encrypted payload.
    Message = 1,
    /// A GenerateDataKey `wrapped_key`: the body is empty (only the tag, binding the context);
    /// Decrypt returns the data key itself.
    DataKey = 2,
}

/// One wrapped copy of the data key, as it sits in the header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WrappedCopy<'a> {
    pub backend: BackendKind,
    /// The backend's durable key id (never an alias).
    pub key_id: &'a str,
    /// The backend's id of the key version that wrapped this copy.
    pub key_version: &'a str,
    /// The backend's opaque wrapped-key bytes (e.g. a KMS ciphertext blob).
    pub wrapped: &'a [u8],
}

/// A parsed, not yet authenticated, envelope. Borrowing from the input keeps parsing
/// allocation-free apart from the copy list (at most [`MAX_COPIES`] entries).
#[derive(Debug)]
pub struct Envelope<'a> {
    pub kind: Kind,
    /// The keybroker key name the ciphertext was made under.
    pub key_name: &'a str,
    /// The cache partition (caller) the data key was made for; part of the backend context.
    pub caller: &'a str,
    pub copies: Vec<WrappedCopy<'a>>,
    salt: &'a [u8],
    commitment: &'a [u8],
    header: &'a [u8],
    body: &'a [u8],
}

/// Why bytes are not a well-formed envelope. Shown to callers as INVALID_CIPHERTEXT with this
/// text: it describes structure only, never content.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("ciphertext is empty")]
    Empty,
    #[error("not a keybroker ciphertext (bad magic)")]
    BadMagic,
    #[error("unsupported ciphertext format version {0}")]
    UnsupportedVersion(u8),
    #[error("unknown ciphertext kind {0}")]
    UnknownKind(u8),
    #[error("ciphertext is truncated (in {0})")]
    Truncated(&'static str),
    #[error("ciphertext field {0} has an invalid length")]
    BadLength(&'static str),
    #[error("ciphertext field {0} is not UTF-8")]
    NotUtf8(&'static str),
    #[error("ciphertext names unknown backend {0}")]
    UnknownBackend(u8),
}

/// Sealing failed: an input exceeds a format limit, or randomness failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    #[error("{0} is too long for the ciphertext format")]
    TooLong(&'static str),
    #[error("a ciphertext needs 1 to {MAX_COPIES} wrapped key copies")]
    Copies,
    #[error("the system random number generator failed")]
    Random,
    #[error("AEAD sealing failed")]
    Crypto,
}

impl From<RandomFailed> for SealError {
    fn from(_: RandomFailed) -> Self {
        SealError::Random
    }
}

/// Authentication failed: wrong data key, wrong context, or tampering. Deliberately opaque.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("decryption failed")]
pub struct Unauthentic;

/// The canonical encoding of an encryption context, which is authenticated as AAD: pair count,
/// then pairs sorted by key bytes, each length-prefixed (u16 big-endian). `BTreeMap<String, _>`
/// iterates in byte order, which is exactly the canonical order.
pub fn encode_context(context: &BTreeMap<String, String>, out: &mut Vec<u8>) {
    // Limits are enforced by `check_context` before any sealing or opening; saturate so an
    // unchecked call can never panic.
    put_u16(out, context.len().min(u16::MAX as usize) as u16);
    for (k, v) in context {
        put_bytes16(out, k.as_bytes());
        put_bytes16(out, v.as_bytes());
    }
}

/// Checks an encryption context against the format limits, naming the offending part.
pub fn check_context(context: &BTreeMap<String, String>) -> Result<(), String> {
    if context.len() > MAX_CONTEXT_PAIRS {
        return Err(format!(
            "context has {} pairs; at most {MAX_CONTEXT_PAIRS} are allowed",
            context.len()
        ));
    }
    for (k, v) in context {
        if k.is_empty() || k.len() > MAX_CONTEXT_KEY_LEN {
            return Err(format!(
                "context key of {} bytes: keys must be 1 to {MAX_CONTEXT_KEY_LEN} bytes",
                k.len()
            ));
        }
        if v.len() > MAX_CONTEXT_VALUE_LEN {
            return Err(format!(
                "context value of key {:?} is {} bytes; at most {MAX_CONTEXT_VALUE_LEN} are allowed",
                crate::util::Capped(k),
                v.len()
            ));
        }
    }
    Ok(())
}

/// Seals `plaintext` into a new envelope with a fresh random salt.
pub fn seal(
    kind: Kind,
    key_name: &str,
    caller: &str,
    copies: &[WrappedCopy<'_>],
    data_key: &SecretKey,
    context: &BTreeMap<String, String>,
    plaintext: &[u8],
) -> Result<Vec<u8>, SealError> {
    let mut salt = [0u8; SALT_LEN];
    random_fill(&mut salt)?;
    seal_with_salt(
        kind, key_name, caller, copies, data_key, context, plaintext, &salt,
    )
}

/// [`seal`] with a caller-chosen salt. Only for test vectors: a salt must never repeat under one
/// data key.
#[doc(hidden)]
#[allow(clippy::too_many_arguments)]
pub fn seal_with_salt(
    kind: Kind,
    key_name: &str,
    caller: &str,
    copies: &[WrappedCopy<'_>],
    data_key: &SecretKey,
    context: &BTreeMap<String, String>,
    plaintext: &[u8],
    salt: &[u8; SALT_LEN],
) -> Result<Vec<u8>, SealError> {
    if copies.is_empty() || copies.len() > MAX_COPIES {
        return Err(SealError::Copies);
    }
    let material = derive(data_key, salt).map_err(|_| SealError::Crypto)?;
    let header_len = encoded_header_len(key_name, caller, copies);
    let mut out = Vec::with_capacity(header_len + plaintext.len() + TAG_LEN);
    out.extend_from_slice(&MAGIC);
    out.push(FORMAT_VERSION);
    out.push(kind as u8);
    put_name(&mut out, key_name, "key name")?;
    put_name(&mut out, caller, "caller")?;
    out.push(copies.len() as u8);
    for copy in copies {
        out.push(copy.backend.code());
        put_field(
            &mut out,
            copy.key_id.as_bytes(),
            1,
            MAX_KEY_ID_LEN,
            "key id",
        )?;
        put_field(
            &mut out,
            copy.key_version.as_bytes(),
            0,
            MAX_VERSION_LEN,
            "key version",
        )?;
        put_field(&mut out, copy.wrapped, 1, MAX_WRAPPED_LEN, "wrapped key")?;
    }
    out.extend_from_slice(salt);
    out.extend_from_slice(material.commitment());
    let header_end = out.len();

    let aad = authenticated_data(&out[..header_end], context);
    out.extend_from_slice(plaintext);
    let key = material.aead_key().map_err(|_| SealError::Crypto)?;
    let tag = key
        .seal_in_place_separate_tag(
            aead::Nonce::assume_unique_for_key(NONCE),
            aead::Aad::from(&aad[..]),
            &mut out[header_end..],
        )
        .map_err(|_| SealError::Crypto)?;
    out.extend_from_slice(tag.as_ref());
    Ok(out)
}

/// Parses the header of untrusted bytes. Nothing is authenticated yet: only [`Envelope::open`]
/// says whether the ciphertext is genuine.
pub fn parse(input: &[u8]) -> Result<Envelope<'_>, FormatError> {
    if input.is_empty() {
        return Err(FormatError::Empty);
    }
    let mut r = Reader { buf: input, pos: 0 };
    if r.take(2, "magic").map_err(|_| FormatError::BadMagic)? != MAGIC {
        return Err(FormatError::BadMagic);
    }
    let version = r.u8("version")?;
    if version != FORMAT_VERSION {
        return Err(FormatError::UnsupportedVersion(version));
    }
    let kind = match r.u8("kind")? {
        1 => Kind::Message,
        2 => Kind::DataKey,
        other => return Err(FormatError::UnknownKind(other)),
    };
    let key_name = r.name("key name")?;
    let caller = r.name("caller")?;
    let count = r.u8("copy count")? as usize;
    if count == 0 || count > MAX_COPIES {
        return Err(FormatError::BadLength("copy count"));
    }
    let mut copies = Vec::with_capacity(count);
    for _ in 0..count {
        let code = r.u8("backend")?;
        let backend = BackendKind::from_code(code).ok_or(FormatError::UnknownBackend(code))?;
        let key_id = utf8(r.field(1, MAX_KEY_ID_LEN, "key id")?, "key id")?;
        let key_version = utf8(r.field(0, MAX_VERSION_LEN, "key version")?, "key version")?;
        let wrapped = r.field(1, MAX_WRAPPED_LEN, "wrapped key")?;
        copies.push(WrappedCopy {
            backend,
            key_id,
            key_version,
            wrapped,
        });
    }
    let salt = r.take(SALT_LEN, "salt")?;
    let commitment = r.take(COMMITMENT_LEN, "commitment")?;
    let header_end = r.pos;
    let body = &input[header_end..];
    if body.len() < TAG_LEN {
        return Err(FormatError::Truncated("body"));
    }
    if kind == Kind::DataKey && body.len() != TAG_LEN {
        return Err(FormatError::BadLength("data key body"));
    }
    Ok(Envelope {
        kind,
        key_name,
        caller,
        copies,
        salt,
        commitment,
        header: &input[..header_end],
        body,
    })
}

impl Envelope<'_> {
    /// Checks the key commitment, then decrypts and authenticates the body under the header and
    /// the context. Returns the payload (empty for [`Kind::DataKey`]).
    pub fn open(
        &self,
        data_key: &SecretKey,
        context: &BTreeMap<String, String>,
    ) -> Result<Vec<u8>, Unauthentic> {
        let salt: &[u8; SALT_LEN] = self.salt.try_into().map_err(|_| Unauthentic)?;
        let material = derive(data_key, salt).map_err(|_| Unauthentic)?;
        constant_time::verify_slices_are_equal(material.commitment(), self.commitment)
            .map_err(|_| Unauthentic)?;
        let aad = authenticated_data(self.header, context);
        let key = material.aead_key().map_err(|_| Unauthentic)?;
        let mut buf = self.body.to_vec();
        let len = key
            .open_in_place(
                aead::Nonce::assume_unique_for_key(NONCE),
                aead::Aad::from(&aad[..]),
                &mut buf,
            )
            .map_err(|_| Unauthentic)?
            .len();
        buf.truncate(len);
        Ok(buf)
    }

    /// Payload length, for usage accounting before decrypting.
    pub fn payload_len(&self) -> usize {
        self.body.len().saturating_sub(TAG_LEN)
    }
}

/// The 64 bytes HKDF derives per message: AES-256-GCM key, then the key commitment.
struct MessageMaterial([u8; 64]);

impl MessageMaterial {
    fn commitment(&self) -> &[u8] {
        &self.0[32..]
    }

    fn aead_key(&self) -> Result<aead::LessSafeKey, aws_lc_rs::error::Unspecified> {
        Ok(aead::LessSafeKey::new(aead::UnboundKey::new(
            &aead::AES_256_GCM,
            &self.0[..32],
        )?))
    }
}

/// Zeroized on drop: the derived message key is as secret as the data key.
impl Drop for MessageMaterial {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

struct OkmLen;

impl hkdf::KeyType for OkmLen {
    fn len(&self) -> usize {
        64
    }
}

fn derive(
    data_key: &SecretKey,
    salt: &[u8; SALT_LEN],
) -> Result<MessageMaterial, aws_lc_rs::error::Unspecified> {
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, salt).extract(data_key.as_ref());
    let mut out = MessageMaterial([0u8; 64]);
    prk.expand(&[HKDF_INFO], OkmLen)?.fill(&mut out.0)?;
    Ok(out)
}

/// AAD = the whole header || the canonical context.
fn authenticated_data(header: &[u8], context: &BTreeMap<String, String>) -> Vec<u8> {
    let mut aad = Vec::with_capacity(header.len() + 2 + context.len() * 32);
    aad.extend_from_slice(header);
    encode_context(context, &mut aad);
    aad
}

fn encoded_header_len(key_name: &str, caller: &str, copies: &[WrappedCopy<'_>]) -> usize {
    let copies_len: usize = copies
        .iter()
        .map(|c| 1 + 6 + c.key_id.len() + c.key_version.len() + c.wrapped.len())
        .sum();
    4 + 1 + key_name.len() + 1 + caller.len() + 1 + copies_len + SALT_LEN + COMMITMENT_LEN
}

fn put_u16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_be_bytes());
}

fn put_bytes16(out: &mut Vec<u8>, bytes: &[u8]) {
    let len = bytes.len().min(u16::MAX as usize);
    put_u16(out, len as u16);
    out.extend_from_slice(&bytes[..len]);
}

fn put_name(out: &mut Vec<u8>, name: &str, what: &'static str) -> Result<(), SealError> {
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(SealError::TooLong(what));
    }
    out.push(name.len() as u8);
    out.extend_from_slice(name.as_bytes());
    Ok(())
}

fn put_field(
    out: &mut Vec<u8>,
    bytes: &[u8],
    min: usize,
    max: usize,
    what: &'static str,
) -> Result<(), SealError> {
    if bytes.len() < min || bytes.len() > max {
        return Err(SealError::TooLong(what));
    }
    put_u16(out, bytes.len() as u16);
    out.extend_from_slice(bytes);
    Ok(())
}

fn utf8<'a>(bytes: &'a [u8], what: &'static str) -> Result<&'a str, FormatError> {
    std::str::from_utf8(bytes).map_err(|_| FormatError::NotUtf8(what))
}

/// A bounds-checked cursor: every read either returns a slice of the input or an error.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], FormatError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&end| end <= self.buf.len())
            .ok_or(FormatError::Truncated(what))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, FormatError> {
        Ok(self.take(1, what)?[0])
    }

    fn u16(&mut self, what: &'static str) -> Result<usize, FormatError> {
        let b = self.take(2, what)?;
        Ok(u16::from_be_bytes([b[0], b[1]]) as usize)
    }

    fn name(&mut self, what: &'static str) -> Result<&'a str, FormatError> {
        let len = self.u8(what)? as usize;
        if len == 0 || len > MAX_NAME_LEN {
            return Err(FormatError::BadLength(what));
        }
        utf8(self.take(len, what)?, what)
    }

    fn field(
        &mut self,
        min: usize,
        max: usize,
        what: &'static str,
    ) -> Result<&'a [u8], FormatError> {
        let len = self.u16(what)?;
        if len < min || len > max {
            return Err(FormatError::BadLength(what));
        }
        self.take(len, what)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn copy(wrapped: &[u8]) -> WrappedCopy<'_> {
        WrappedCopy {
            backend: BackendKind::Local,
            key_id: "default",
            key_version: "1",
            wrapped,
        }
    }

    #[test]
    fn round_trip_and_wrong_context() {
        let dk = SecretKey::generate(32).unwrap();
        let c = ctx(&[("tenant", "a"), ("purpose", "test")]);
        let ct = seal(
            Kind::Message,
            "k",
            "anonymous",
            &[copy(b"w")],
            &dk,
            &c,
            b"hello",
        )
        .unwrap();
        let env = parse(&ct).unwrap();
        assert_eq!(env.key_name, "k");
        assert_eq!(env.caller, "anonymous");
        assert_eq!(env.copies, vec![copy(b"w")]);
        assert_eq!(env.open(&dk, &c).unwrap(), b"hello");
        assert_eq!(env.open(&dk, &ctx(&[("tenant", "b")])), Err(Unauthentic));
        assert_eq!(env.open(&dk, &BTreeMap::new()), Err(Unauthentic));
        let other = SecretKey::generate(32).unwrap();
        assert_eq!(env.open(&other, &c), Err(Unauthentic));
    }

    #[test]
    fn every_flip_and_truncation_fails() {
        let dk = SecretKey::generate(32).unwrap();
        let c = ctx(&[("a", "b")]);
        let ct = seal(
            Kind::Message,
            "k",
            "anonymous",
            &[copy(b"wrapped")],
            &dk,
            &c,
            b"payload",
        )
        .unwrap();
        for i in 0..ct.len() {
            for bit in 0..8 {
                let mut bad = ct.clone();
                bad[i] ^= 1 << bit;
                if let Ok(env) = parse(&bad) {
                    assert!(
                        env.open(&dk, &c).is_err(),
                        "flip at byte {i} bit {bit} decrypted"
                    );
                }
            }
        }
        for len in 0..ct.len() {
            if let Ok(env) = parse(&ct[..len]) {
                assert!(env.open(&dk, &c).is_err(), "truncation to {len} decrypted");
            }
        }
    }

    #[test]
    fn context_encoding_is_canonical() {
        let mut a = Vec::new();
        encode_context(&ctx(&[("b", "2"), ("a", "1")]), &mut a);
        assert_eq!(a, [0, 2, 0, 1, b'a', 0, 1, b'1', 0, 1, b'b', 0, 1, b'2']);
    }

    #[test]
    fn parse_never_panics_on_short_or_random_input() {
        let mut seed = 0x1234_5678_9abc_def0u64;
        for len in 0..600 {
            let mut buf = vec![0u8; len];
            for b in buf.iter_mut() {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                *b = seed as u8;
            }
            if len >= 3 {
                buf[0] = b'K';
                buf[1] = b'B';
                buf[2] = 1;
            }
            let _ = parse(&buf);
        }
    }

    #[test]
    fn data_key_kind_has_an_empty_body() {
        let dk = SecretKey::generate(16).unwrap();
        let ct = seal(
            Kind::DataKey,
            "k",
            "c",
            &[copy(b"w")],
            &dk,
            &BTreeMap::new(),
            b"",
        )
        .unwrap();
        let env = parse(&ct).unwrap();
        assert_eq!(env.kind, Kind::DataKey);
        assert_eq!(env.open(&dk, &BTreeMap::new()).unwrap(), b"");
    }
}

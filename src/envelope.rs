//! The keybroker ciphertext envelope: version 2 is written, versions 1 and 2 are read.
//! `docs/envelope.md` is the byte-level specification and `tests/vectors/envelope-v1.json` and
//! `tests/vectors/envelope-v2.json` its test vectors; keep all of them in step.
//!
//! Version 2 differs from version 1 only in what the key derivation covers: the HKDF `info` also
//! carries SHA-256(header up to the salt || canonical context), so the key commitment commits to
//! the data key, the header and the context together (a ciphertext opens under exactly one
//! (data key, header, context)), not to the data key alone. Version 2 also has a third kind, a
//! derived data key (GenerateDataKey's `wrapped_key`): Decrypt returns a key derived from the
//! wrapped data key and the blob's salt, never the wrapped data key itself.
//!
//! What this module must never do: panic or allocate more than the input justifies while parsing
//! untrusted bytes, return plaintext from a ciphertext whose commitment or tag does not verify,
//! or tell a caller *why* authentication failed (tampering and a wrong context look the same).

use std::collections::BTreeMap;

use aws_lc_rs::{aead, constant_time, digest, hkdf};
use zeroize::Zeroize;

use crate::backend_kind::BackendKind;
use crate::secret::{RandomFailed, SecretKey, random_fill};

pub const MAGIC: [u8; 2] = *b"KB";
/// The version every new ciphertext gets.
pub const FORMAT_VERSION: u8 = 2;
/// The first version: still read (and written only for its test vectors).
pub const LEGACY_VERSION: u8 = 1;
pub const SALT_LEN: usize = 32;
pub const COMMITMENT_LEN: usize = 32;
pub const TAG_LEN: usize = 16;
/// Key name and caller name length limit (bytes).
pub const MAX_NAME_LEN: usize = crate::util::MAX_NAME_LEN;
pub const MAX_COPIES: usize = 8;
pub const MAX_KEY_ID_LEN: usize = 2048;
pub const MAX_VERSION_LEN: usize = 2048;
pub const MAX_WRAPPED_LEN: usize = 4096;
/// Encryption-context limits: pairs, key length, value length (bytes).
pub const MAX_CONTEXT_PAIRS: usize = 64;
pub const MAX_CONTEXT_KEY_LEN: usize = 256;
pub const MAX_CONTEXT_VALUE_LEN: usize = 4096;
/// The lengths a derived data key can have (AES-128, AES-256).
pub const DERIVED_KEY_LENS: [usize; 2] = [16, 32];

/// HKDF `info` of version 1: a fixed label naming the format version and what the 64 output
/// bytes are for.
const HKDF_INFO_V1: &[u8] = b"keybroker envelope v1: aes-256-gcm key || key commitment";
/// HKDF `info` of version 2, followed by the 32-byte binding hash of header and context. Short
/// on purpose: with it the two HMAC blocks of HKDF-Expand take one SHA-256 block fewer than
/// version 1's long label did, paying back part of the binding hash on every message.
const HKDF_INFO_V2: &[u8] = b"keybroker envelope v2";
/// HKDF `info` of a derived data key (version 2, kind 3), followed by one byte: its length.
const DERIVED_KEY_INFO: &[u8] = b"keybroker data key v2";
/// Every message key is used exactly once (fresh 256-bit salt per message), so a constant nonce
/// is safe and saves 12 bytes per message.
const NONCE: [u8; 12] = [0u8; 12];

/// What the sealed body holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// An Encrypt result: the body is the encrypted payload.
    Message = 1,
    /// A data-key blob whose Decrypt returns the wrapped data key itself: every version 1
    /// GenerateDataKey `wrapped_key`, and the ReEncrypt of one (the key was handed out already).
    /// The body is empty (only the tag, binding the context).
    DataKey = 2,
    /// Version 2's GenerateDataKey `wrapped_key`: Decrypt returns a key derived from the wrapped
    /// data key and this blob's salt (so every blob has its own key, and the wrapped key is never
    /// released). The body encrypts one byte: the derived key's length (16 or 32).
    DerivedDataKey = 3,
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
    /// [`LEGACY_VERSION`] or [`FORMAT_VERSION`].
    pub version: u8,
    pub kind: Kind,
    /// The keybroker key name the ciphertext was made under.
    pub key_name: &'a str,
    /// The cache partition (caller) the data key was made for; part of the backend context.
    pub caller: &'a str,
    pub copies: Vec<WrappedCopy<'a>>,
    salt: &'a [u8; SALT_LEN],
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
    /// A wrapped copy's key id or version is not spelled exactly as its backend records it
    /// (e.g. `01` or `+1` for version 1): refused before any cache lookup or backend call.
    #[error("ciphertext field {0} is not in the canonical form its backend records")]
    NotCanonical(&'static str),
}

/// Sealing failed: an input exceeds a format limit, or randomness failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    #[error("{0} is too long for the ciphertext format")]
    TooLong(&'static str),
    #[error("a ciphertext needs 1 to {MAX_COPIES} wrapped key copies")]
    Copies,
    #[error("this kind of ciphertext cannot hold that payload in that format version")]
    Payload,
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

/// Seals `plaintext` into a new (version 2) envelope with a fresh random salt. `kind` is
/// [`Kind::Message`] (any payload) or [`Kind::DataKey`] (empty payload); derived data keys are
/// made by [`seal_derived_data_key`].
pub fn seal(
    kind: Kind,
    key_name: &str,
    caller: &str,
    copies: &[WrappedCopy<'_>],
    data_key: &SecretKey,
    context: &BTreeMap<String, String>,
    plaintext: &[u8],
) -> Result<Vec<u8>, SealError> {
    if kind == Kind::DerivedDataKey {
        return Err(SealError::Payload);
    }
    let mut salt = [0u8; SALT_LEN];
    random_fill(&mut salt)?;
    seal_with_salt(
        FORMAT_VERSION,
        kind,
        key_name,
        caller,
        copies,
        data_key,
        context,
        plaintext,
        &salt,
    )
}

/// A GenerateDataKey result: a fresh key of `len` bytes (16 or 32) derived from `root` (the
/// cached, wrapped data key) and a fresh random salt, and the blob (kind
/// [`Kind::DerivedDataKey`]) from which Decrypt derives the same key again. `root` itself is
/// never returned by anything.
pub fn seal_derived_data_key(
    key_name: &str,
    caller: &str,
    copies: &[WrappedCopy<'_>],
    root: &SecretKey,
    context: &BTreeMap<String, String>,
    len: usize,
) -> Result<(Vec<u8>, SecretKey), SealError> {
    if !DERIVED_KEY_LENS.contains(&len) {
        return Err(SealError::Payload);
    }
    let mut salt = [0u8; SALT_LEN];
    random_fill(&mut salt)?;
    let (blob, prk) = seal_inner(
        FORMAT_VERSION,
        Kind::DerivedDataKey,
        key_name,
        caller,
        copies,
        root,
        context,
        &[len as u8],
        &salt,
    )?;
    let key = derived_key(&prk, len).map_err(|_| SealError::Crypto)?;
    Ok((blob, key))
}

/// [`seal`] with a caller-chosen salt and format version. A salt must never repeat under one
/// data key, with one exception: ReEncrypt of a [`Kind::DerivedDataKey`] blob keeps the blob's
/// salt (the derived key depends on it). That is safe in version 2 only, where the message key
/// also depends on the header (new wrapped copy, key name, caller) and the context, so the
/// re-sealed blob never reuses a message key for different bytes. Version 1 is written only for
/// its test vectors and benchmarks.
#[allow(clippy::too_many_arguments)]
pub fn seal_with_salt(
    version: u8,
    kind: Kind,
    key_name: &str,
    caller: &str,
    copies: &[WrappedCopy<'_>],
    data_key: &SecretKey,
    context: &BTreeMap<String, String>,
    plaintext: &[u8],
    salt: &[u8; SALT_LEN],
) -> Result<Vec<u8>, SealError> {
    seal_inner(
        version, kind, key_name, caller, copies, data_key, context, plaintext, salt,
    )
    .map(|(out, _)| out)
}

#[allow(clippy::too_many_arguments)]
fn seal_inner(
    version: u8,
    kind: Kind,
    key_name: &str,
    caller: &str,
    copies: &[WrappedCopy<'_>],
    data_key: &SecretKey,
    context: &BTreeMap<String, String>,
    plaintext: &[u8],
    salt: &[u8; SALT_LEN],
) -> Result<(Vec<u8>, hkdf::Prk), SealError> {
    if copies.is_empty() || copies.len() > MAX_COPIES {
        return Err(SealError::Copies);
    }
    let payload_ok = match (version, kind) {
        (LEGACY_VERSION | FORMAT_VERSION, Kind::Message) => true,
        (LEGACY_VERSION | FORMAT_VERSION, Kind::DataKey) => plaintext.is_empty(),
        (FORMAT_VERSION, Kind::DerivedDataKey) => {
            plaintext.len() == 1 && DERIVED_KEY_LENS.contains(&(plaintext[0] as usize))
        }
        _ => false,
    };
    if !payload_ok {
        return Err(SealError::Payload);
    }
    let header_len = encoded_header_len(key_name, caller, copies);
    let mut out = Vec::with_capacity(header_len + plaintext.len() + TAG_LEN);
    out.extend_from_slice(&MAGIC);
    out.push(version);
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
    let prefix_end = out.len();

    // First header-up-to-the-salt || canonical(context), what format 2 binds; then the
    // commitment goes in between, giving the AAD: header || canonical(context).
    let mut aad = Vec::with_capacity(prefix_end + COMMITMENT_LEN + 2 + context.len() * 32);
    aad.extend_from_slice(&out);
    crate::context::encode_map(context, &mut aad);
    let prk = extract(data_key, salt);
    let material = derive(version, &prk, &aad).map_err(|_| SealError::Crypto)?;
    out.extend_from_slice(material.commitment());
    aad.splice(
        prefix_end..prefix_end,
        material.commitment().iter().copied(),
    );
    let header_end = out.len();

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
    Ok((out, prk))
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
    if version != FORMAT_VERSION && version != LEGACY_VERSION {
        return Err(FormatError::UnsupportedVersion(version));
    }
    let kind = match r.u8("kind")? {
        1 => Kind::Message,
        2 => Kind::DataKey,
        3 if version == FORMAT_VERSION => Kind::DerivedDataKey,
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
    let salt: &[u8; SALT_LEN] = r
        .take(SALT_LEN, "salt")?
        .try_into()
        .map_err(|_| FormatError::Truncated("salt"))?;
    let commitment = r.take(COMMITMENT_LEN, "commitment")?;
    let header_end = r.pos;
    let body = &input[header_end..];
    if body.len() < TAG_LEN {
        return Err(FormatError::Truncated("body"));
    }
    let body_len_ok = match kind {
        Kind::Message => true,
        Kind::DataKey => body.len() == TAG_LEN,
        Kind::DerivedDataKey => body.len() == 1 + TAG_LEN,
    };
    if !body_len_ok {
        return Err(FormatError::BadLength("data key body"));
    }
    Ok(Envelope {
        version,
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
    /// the context. Returns the payload (empty for [`Kind::DataKey`], the derived key's length
    /// byte for [`Kind::DerivedDataKey`]: use [`Envelope::open_data_key`] for those).
    pub fn open(
        &self,
        data_key: &SecretKey,
        context: &BTreeMap<String, String>,
    ) -> Result<Vec<u8>, Unauthentic> {
        self.open_inner(data_key, context)
            .map(|(payload, _)| payload)
    }

    /// For the data-key kinds: authenticates the blob like [`Envelope::open`] and returns the key
    /// Decrypt hands out: the wrapped data key itself for [`Kind::DataKey`], the derived key for
    /// [`Kind::DerivedDataKey`]. Fails for a [`Kind::Message`].
    pub fn open_data_key(
        &self,
        data_key: &SecretKey,
        context: &BTreeMap<String, String>,
    ) -> Result<SecretKey, Unauthentic> {
        let (payload, prk) = self.open_inner(data_key, context)?;
        match self.kind {
            Kind::Message => Err(Unauthentic),
            Kind::DataKey => Ok(data_key.duplicate()),
            Kind::DerivedDataKey => {
                let len = match payload.as_slice() {
                    [len] if DERIVED_KEY_LENS.contains(&(*len as usize)) => *len as usize,
                    _ => return Err(Unauthentic),
                };
                derived_key(&prk, len).map_err(|_| Unauthentic)
            }
        }
    }

    fn open_inner(
        &self,
        data_key: &SecretKey,
        context: &BTreeMap<String, String>,
    ) -> Result<(Vec<u8>, hkdf::Prk), Unauthentic> {
        // As in sealing: header-up-to-the-salt || canonical(context) first, then the
        // commitment is put in between to give the AAD.
        let prefix_end = self.header.len() - COMMITMENT_LEN;
        let mut aad = Vec::with_capacity(self.header.len() + 2 + context.len() * 32);
        aad.extend_from_slice(&self.header[..prefix_end]);
        crate::context::encode_map(context, &mut aad);
        let prk = extract(data_key, self.salt);
        let material = derive(self.version, &prk, &aad).map_err(|_| Unauthentic)?;
        constant_time::verify_slices_are_equal(material.commitment(), self.commitment)
            .map_err(|_| Unauthentic)?;
        aad.splice(prefix_end..prefix_end, self.commitment.iter().copied());
        let key = material.aead_key().map_err(|_| Unauthentic)?;
        let (ciphertext, tag) = self.body.split_at(self.body.len().saturating_sub(TAG_LEN));
        // Decrypted into a buffer of exactly the payload's size, so that handing it on as a
        // `SecretKey` never reallocates (and leaves no unwiped copy behind).
        let mut out = vec![0u8; ciphertext.len()];
        if key
            .open_separate_gather(
                aead::Nonce::assume_unique_for_key(NONCE),
                aead::Aad::from(&aad[..]),
                ciphertext,
                tag,
                &mut out,
            )
            .is_err()
        {
            out.zeroize();
            return Err(Unauthentic);
        }
        Ok((out, prk))
    }

    /// The header's salt. ReEncrypt of a [`Kind::DerivedDataKey`] blob keeps it (see
    /// [`seal_with_salt`]).
    pub fn salt(&self) -> &[u8; SALT_LEN] {
        self.salt
    }

    /// Payload length, for usage accounting before decrypting.
    pub fn payload_len(&self) -> usize {
        match self.kind {
            Kind::Message => self.body.len().saturating_sub(TAG_LEN),
            Kind::DataKey | Kind::DerivedDataKey => 0,
        }
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

struct OkmLen(usize);

impl hkdf::KeyType for OkmLen {
    fn len(&self) -> usize {
        self.0
    }
}

/// HKDF-Extract(salt, data key). aws-lc-rs zeroizes the PRK when it is dropped.
fn extract(data_key: &SecretKey, salt: &[u8; SALT_LEN]) -> hkdf::Prk {
    hkdf::Salt::new(hkdf::HKDF_SHA256, salt).extract(data_key.as_ref())
}

/// The message key and commitment. `bound` is the header up to and including the salt followed
/// by the canonical context. Version 1: `info` = label. Version 2: `info` = label || SHA-256(bound),
/// binding everything but the commitment itself (the output) into the key derivation. Both parts
/// of `bound` are self-delimiting encodings, so their concatenation is unambiguous.
fn derive(
    version: u8,
    prk: &hkdf::Prk,
    bound: &[u8],
) -> Result<MessageMaterial, aws_lc_rs::error::Unspecified> {
    let mut out = MessageMaterial([0u8; 64]);
    if version == LEGACY_VERSION {
        prk.expand(&[HKDF_INFO_V1], OkmLen(64))?.fill(&mut out.0)?;
    } else {
        // One-shot SHA-256 (no EVP context to set up per message).
        let binding = digest::digest(&digest::SHA256, bound);
        prk.expand(&[HKDF_INFO_V2, binding.as_ref()], OkmLen(64))?
            .fill(&mut out.0)?;
    }
    Ok(out)
}

/// A derived data key of `len` bytes: HKDF-Expand(PRK, "keybroker data key v2" || u8 len). The
/// same PRK gives the blob's message key under a different `info` (neither label is a prefix of
/// the other), so the two are independent.
fn derived_key(prk: &hkdf::Prk, len: usize) -> Result<SecretKey, aws_lc_rs::error::Unspecified> {
    let mut out = vec![0u8; len];
    match prk
        .expand(&[DERIVED_KEY_INFO, &[len as u8]], OkmLen(len))
        .and_then(|okm| okm.fill(&mut out))
    {
        Ok(()) => Ok(SecretKey::from_vec(out)),
        Err(e) => {
            out.zeroize();
            Err(e)
        }
    }
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
        crate::context::encode_map(&ctx(&[("b", "2"), ("a", "1")]), &mut a);
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
            if len >= 4 {
                buf[0] = b'K';
                buf[1] = b'B';
                buf[2] = 1 + (len % 2) as u8;
                buf[3] = 1 + (len % 3) as u8;
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

    fn seal_v(
        version: u8,
        kind: Kind,
        dk: &SecretKey,
        c: &BTreeMap<String, String>,
        payload: &[u8],
        salt: &[u8; SALT_LEN],
    ) -> Vec<u8> {
        seal_with_salt(
            version,
            kind,
            "k",
            "anonymous",
            &[copy(b"w")],
            dk,
            c,
            payload,
            salt,
        )
        .unwrap()
    }

    fn commitment_of(ct: &[u8]) -> Vec<u8> {
        let env = parse(ct).unwrap();
        env.commitment.to_vec()
    }

    /// Issue 21 item 12: in version 1 the commitment depends on the data key and salt only, so
    /// whoever knows a data key can aim one ciphertext at several contexts or headers. Version 2
    /// commits to all three: same key and salt, different context or header, different
    /// commitment (and message key).
    #[test]
    fn v2_commitment_binds_header_and_context() {
        let dk = SecretKey::generate(32).unwrap();
        let salt = [7u8; SALT_LEN];
        let a = ctx(&[("tenant", "a")]);
        let b = ctx(&[("tenant", "b")]);
        let v1a = seal_v(LEGACY_VERSION, Kind::Message, &dk, &a, b"x", &salt);
        let v1b = seal_v(LEGACY_VERSION, Kind::Message, &dk, &b, b"x", &salt);
        assert_eq!(commitment_of(&v1a), commitment_of(&v1b), "v1 (the finding)");
        let v2a = seal_v(FORMAT_VERSION, Kind::Message, &dk, &a, b"x", &salt);
        let v2b = seal_v(FORMAT_VERSION, Kind::Message, &dk, &b, b"x", &salt);
        assert_ne!(
            commitment_of(&v2a),
            commitment_of(&v2b),
            "context is committed"
        );
        let other_caller = seal_with_salt(
            FORMAT_VERSION,
            Kind::Message,
            "k",
            "someone-else",
            &[copy(b"w")],
            &dk,
            &a,
            b"x",
            &salt,
        )
        .unwrap();
        assert_ne!(
            commitment_of(&v2a),
            commitment_of(&other_caller),
            "header is committed"
        );
        // Both versions still open with the right context only.
        for (ct, good, bad) in [(&v1a, &a, &b), (&v2a, &a, &b), (&v2b, &b, &a)] {
            let env = parse(ct).unwrap();
            assert_eq!(env.open(&dk, good).unwrap(), b"x");
            assert_eq!(env.open(&dk, bad), Err(Unauthentic));
        }
        assert_eq!(parse(&v1a).unwrap().version, LEGACY_VERSION);
        assert_eq!(parse(&v2a).unwrap().version, FORMAT_VERSION);
        let fresh = seal(Kind::Message, "k", "c", &[copy(b"w")], &dk, &a, b"x").unwrap();
        assert_eq!(fresh[2], FORMAT_VERSION, "new ciphertexts are version 2");
    }

    /// Issue 21 item 1: every derived-data-key blob yields its own key, never the root; Decrypt
    /// of the blob re-derives exactly that key, and only with the right context.
    #[test]
    fn derived_data_keys_are_fresh_and_reopen() {
        let root = SecretKey::generate(32).unwrap();
        let c = ctx(&[("purpose", "files")]);
        let mut seen = Vec::new();
        for len in [32usize, 32, 16, 16] {
            let (blob, key) =
                seal_derived_data_key("k", "c", &[copy(b"w")], &root, &c, len).unwrap();
            assert_eq!(key.len(), len);
            assert_ne!(key.as_ref(), &root.as_ref()[..len], "never the root");
            assert!(!seen.contains(&key.as_ref().to_vec()), "fresh every time");
            seen.push(key.as_ref().to_vec());
            let env = parse(&blob).unwrap();
            assert_eq!(env.kind, Kind::DerivedDataKey);
            assert_eq!(env.open_data_key(&root, &c).unwrap().as_ref(), key.as_ref());
            assert!(env.open_data_key(&root, &BTreeMap::new()).is_err());
            let other = SecretKey::generate(32).unwrap();
            assert!(env.open_data_key(&other, &c).is_err());
            // The kind cannot be switched to "return the wrapped key itself".
            let mut as_plain = blob.clone();
            as_plain[3] = Kind::DataKey as u8;
            assert!(
                parse(&as_plain).is_err()
                    || parse(&as_plain).unwrap().open_data_key(&root, &c).is_err()
            );
        }
        assert!(seal_derived_data_key("k", "c", &[copy(b"w")], &root, &c, 24).is_err());
        assert!(
            seal(
                Kind::DerivedDataKey,
                "k",
                "c",
                &[copy(b"w")],
                &root,
                &c,
                &[32]
            )
            .is_err()
        );
    }

    /// Re-sealing a derived-data-key blob with its own salt under another header (ReEncrypt)
    /// keeps the derived key and changes the message key and commitment.
    #[test]
    fn derived_key_survives_resealing_with_its_salt() {
        let root = SecretKey::generate(32).unwrap();
        let c = ctx(&[]);
        let (blob, key) = seal_derived_data_key("k", "c", &[copy(b"w")], &root, &c, 16).unwrap();
        let env = parse(&blob).unwrap();
        let moved = seal_with_salt(
            FORMAT_VERSION,
            Kind::DerivedDataKey,
            "k2",
            "c",
            &[copy(b"w2")],
            &root,
            &ctx(&[("new", "ctx")]),
            &[16],
            env.salt(),
        )
        .unwrap();
        assert_ne!(commitment_of(&moved), commitment_of(&blob));
        let got = parse(&moved)
            .unwrap()
            .open_data_key(&root, &ctx(&[("new", "ctx")]))
            .unwrap();
        assert_eq!(got.as_ref(), key.as_ref());
    }

    #[test]
    fn kind_3_needs_version_2_and_a_one_byte_body() {
        let root = SecretKey::generate(32).unwrap();
        let (blob, _) =
            seal_derived_data_key("k", "c", &[copy(b"w")], &root, &BTreeMap::new(), 32).unwrap();
        let mut v1 = blob.clone();
        v1[2] = LEGACY_VERSION;
        assert_eq!(parse(&v1).err(), Some(FormatError::UnknownKind(3)));
        let mut longer = blob.clone();
        longer.push(0);
        assert_eq!(
            parse(&longer).err(),
            Some(FormatError::BadLength("data key body"))
        );
    }
}

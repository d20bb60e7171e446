//! Key backends: the places data keys are wrapped and unwrapped (a local keyring, AWS KMS, GCP
//! Cloud KMS, Azure Key Vault). One small async trait, one file per backend, one shared error
//! type every backend converts its provider's errors into.
//!
//! # Contract (every backend; checked by `tests/support/conformance.rs`)
//! - `wrap` / `generate_data_key` record the durable key id and the exact key version used in
//!   the returned [`Wrapped`]; `unwrap` of that copy returns the same data key bytes.
//! - `unwrap` only ever uses the key the backend is configured for. A copy that names another
//!   key, another key's version, or was made under a different [`BackendContext`] fails with
//!   [`BackendErrorKind::InvalidCiphertext`] (never decrypts under the "wrong" key).
//! - A copy whose key id or version is not spelled exactly as the backend records it (`01` or
//!   `+1` for `1`, another case or port in a URL, an AWS version that is not the key ARN) is
//!   refused by `check_canonical` (and by `unwrap`), without a provider call: each respelling
//!   would otherwise be a new decrypt-cache entry and a paid call for the same wrapped key.
//! - Errors are classified into [`BackendErrorKind`]; the caller-visible `message` is written by
//!   keybroker, never a provider's raw response body (that goes into `source`, for the log).
//! - No method logs, formats or returns key material except inside [`SecretKey`].

use std::any::Any;
use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use crate::envelope::{FormatError, WrappedCopy};
use crate::secret::SecretKey;

pub mod aws;
pub mod azure;
pub mod gcp;
pub mod local;

/// Which kind of backend wrapped a data key. The numeric codes are part of the envelope format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BackendKind {
    Local,
    Aws,
    Gcp,
    Azure,
}

impl BackendKind {
    pub const ALL: [BackendKind; 4] = [Self::Local, Self::Aws, Self::Gcp, Self::Azure];

    pub fn code(self) -> u8 {
        match self {
            Self::Local => 1,
            Self::Aws => 2,
            Self::Gcp => 3,
            Self::Azure => 4,
        }
    }

    pub fn from_code(code: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.code() == code)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Local => "local",
            Self::Aws => "aws",
            Self::Gcp => "gcp",
            Self::Azure => "azure",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The keybroker-level context bound to every wrapped data key: which keybroker key and which
/// caller (cache partition) it was made for. Sent to the cloud with each call (AWS encryption
/// context, Cloud KMS AAD) so the provider's own audit trail names the caller; the caller's
/// per-message context is never sent (it is bound to each message as AAD instead).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackendContext<'a> {
    pub key_name: &'a str,
    pub caller: &'a str,
}

impl BackendContext<'_> {
    pub const KEY_PAIR_NAME: &'static str = "keybroker:key";
    pub const CALLER_PAIR_NAME: &'static str = "keybroker:caller";

    /// The context as key/value pairs (AWS KMS `EncryptionContext`).
    pub fn pairs(&self) -> [(&'static str, &str); 2] {
        [
            (Self::CALLER_PAIR_NAME, self.caller),
            (Self::KEY_PAIR_NAME, self.key_name),
        ]
    }

    /// The canonical byte encoding of [`Self::pairs`] (same encoding as message contexts), used
    /// as AAD by backends that take bytes (local, Cloud KMS) and in the decrypt-cache digest.
    pub fn to_aad(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(2 + 8 + 29 + self.caller.len() + self.key_name.len());
        self.encode_aad(&mut out);
        out
    }

    /// Appends [`Self::to_aad`] to `out` (no intermediate map: [`Self::pairs`] is already in
    /// canonical, sorted order).
    pub fn encode_aad(&self, out: &mut Vec<u8>) {
        let pairs = self.pairs();
        out.extend_from_slice(&(pairs.len() as u16).to_be_bytes());
        for (k, v) in pairs {
            for part in [k.as_bytes(), v.as_bytes()] {
                let len = part.len().min(u16::MAX as usize);
                out.extend_from_slice(&(len as u16).to_be_bytes());
                out.extend_from_slice(&part[..len]);
            }
        }
    }
}

/// A data key as wrapped by a backend, with the durable ids the envelope records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wrapped {
    pub key_id: String,
    pub key_version: String,
    pub ciphertext: Vec<u8>,
}

impl Wrapped {
    pub fn as_copy(&self, backend: BackendKind) -> WrappedCopy<'_> {
        WrappedCopy {
            backend,
            key_id: &self.key_id,
            key_version: &self.key_version,
            wrapped: &self.ciphertext,
        }
    }
}

/// What keybroker can know about a key without a network call, consulted on every request
/// before any cache: a disabled key must not keep working from cache, and a rotated key must
/// stop handing out data keys wrapped under the old version.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KeyHint {
    pub disabled: bool,
    /// Changes whenever the key's primary version or state changes; cached data keys made under
    /// an older generation are retired.
    pub generation: u64,
}

/// A backend's view of its key, from `describe` (for health checks and operators).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyDescription {
    pub durable_key_id: String,
    pub primary_version: Option<String>,
    pub enabled: bool,
}

/// A key backend bound to one configured key.
#[async_trait::async_trait]
pub trait KeyBackend: Send + Sync + 'static {
    fn kind(&self) -> BackendKind;

    /// The backend key id as configured (for ListKeys; may be an alias).
    fn key_id(&self) -> &str;

    /// See [`KeyHint`]. Backends that learn key state only from the provider return the default.
    fn hint(&self) -> KeyHint {
        KeyHint::default()
    }

    /// A new data key of `len` bytes, in the clear and wrapped. Backends with a one-call data-key
    /// API (AWS `GenerateDataKey`) override this; the default generates locally and wraps.
    async fn generate_data_key(
        &self,
        len: usize,
        ctx: &BackendContext<'_>,
    ) -> Result<(SecretKey, Wrapped), BackendError> {
        let key = SecretKey::generate(len).map_err(|e| {
            BackendError::new(
                self.kind(),
                BackendErrorKind::Internal,
                "random generator failed",
            )
            .with_source(e)
        })?;
        let wrapped = self.wrap(&key, ctx).await?;
        Ok((key, wrapped))
    }

    /// Wraps a data key under the key's current primary version.
    async fn wrap(
        &self,
        key: &SecretKey,
        ctx: &BackendContext<'_>,
    ) -> Result<Wrapped, BackendError>;

    /// Refuses a copy whose `key_id` or `key_version` is not in the exact form this backend
    /// writes (see the contract above). Pure and cheap: the broker calls it before any cache
    /// lookup. Wrappers must forward it, which is why it has no default.
    fn check_canonical(&self, copy: &WrappedCopy<'_>) -> Result<(), FormatError>;

    /// Unwraps a copy recorded in an envelope (see the contract above).
    async fn unwrap(
        &self,
        copy: &WrappedCopy<'_>,
        ctx: &BackendContext<'_>,
    ) -> Result<SecretKey, BackendError>;

    /// Re-wraps a copy made by `source` under this key without the data key leaving the
    /// provider (AWS KMS `ReEncrypt`). `None` when not possible between these two backends; the
    /// caller then wraps the data key it already holds.
    async fn rewrap_from(
        &self,
        _source: &dyn KeyBackend,
        _copy: &WrappedCopy<'_>,
        _source_ctx: &BackendContext<'_>,
        _ctx: &BackendContext<'_>,
    ) -> Option<Result<Wrapped, BackendError>> {
        None
    }

    /// The key's durable id, primary version and state, asked of the provider.
    async fn describe(&self) -> Result<KeyDescription, BackendError>;

    /// For `rewrap_from`: lets a backend recognise a peer of its own kind.
    fn as_any(&self) -> &dyn Any;
}

/// What went wrong in a backend, in the terms callers are given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendErrorKind {
    /// The key (or key version) does not exist.
    NotFound,
    /// The key is disabled, pending deletion, expired, or does not permit the operation.
    Disabled,
    /// The backend refused our identity's access to the key.
    PermissionDenied,
    /// The backend refused our credentials (expired or invalid token).
    Unauthenticated,
    /// The wrapped key is not valid for this key or context: decryption fails.
    InvalidCiphertext,
    /// Rate limited or quota exhausted, after the SDK's retries.
    Throttled,
    /// Network failure, 5xx, or the backend is down.
    Unavailable,
    /// The per-call deadline passed.
    DeadlineExceeded,
    /// A response failed an integrity check (e.g. Cloud KMS CRC32C) after a retry.
    Integrity,
    /// The request was malformed for this backend (e.g. a data key length it cannot make).
    InvalidArgument,
    /// A bug or an unexpected response.
    Internal,
}

impl BackendErrorKind {
    /// Position in `metrics::OUTCOMES` (0 is success).
    pub fn outcome_index(self) -> usize {
        match self {
            Self::NotFound => 1,
            Self::Disabled => 2,
            Self::PermissionDenied => 3,
            Self::Unauthenticated => 4,
            Self::InvalidCiphertext => 5,
            Self::Throttled => 6,
            Self::Unavailable => 7,
            Self::DeadlineExceeded => 8,
            Self::Integrity => 9,
            Self::InvalidArgument => 10,
            Self::Internal => 11,
        }
    }
}

impl fmt::Display for BackendErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::NotFound => "not found",
            Self::Disabled => "key not usable",
            Self::PermissionDenied => "permission denied",
            Self::Unauthenticated => "unauthenticated",
            Self::InvalidCiphertext => "invalid ciphertext",
            Self::Throttled => "throttled",
            Self::Unavailable => "unavailable",
            Self::DeadlineExceeded => "deadline exceeded",
            Self::Integrity => "integrity check failed",
            Self::InvalidArgument => "invalid argument",
            Self::Internal => "internal error",
        })
    }
}

/// The one error type all backends convert into. `message` may be shown to callers; `source`
/// (the provider's error, possibly with its raw body) only goes to the log.
/// Cloneable (the source is shared) because single-flight hands one backend failure to every
/// request that was waiting for it.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{backend} backend: {kind}: {message}")]
pub struct BackendError {
    pub backend: BackendKind,
    pub kind: BackendErrorKind,
    pub message: Cow<'static, str>,
    #[source]
    pub source: Option<Arc<dyn std::error::Error + Send + Sync>>,
}

impl BackendError {
    pub fn new(
        backend: BackendKind,
        kind: BackendErrorKind,
        message: impl Into<Cow<'static, str>>,
    ) -> Self {
        Self {
            backend,
            kind,
            message: message.into(),
            source: None,
        }
    }

    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Arc::new(source));
        self
    }
}

/// A positive decimal number written the one way keybroker writes it: ASCII digits, no sign, no
/// leading zero, no whitespace, within `u64` (so `"+1"`, `"01"`, `" 1"` and `"0"` are refused).
/// Rust's `str::parse` accepts a leading `+`, and leading zeros, so it is not enough.
pub fn canonical_decimal(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    if b.is_empty() || b.len() > 20 || b[0] == b'0' || !b.iter().all(u8::is_ascii_digit) {
        return None;
    }
    s.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_decimals() {
        assert_eq!(canonical_decimal("1"), Some(1));
        assert_eq!(canonical_decimal("4294967296"), Some(1 << 32));
        for bad in [
            "",
            "0",
            "01",
            "+1",
            "-1",
            " 1",
            "1 ",
            "1_0",
            "١",
            "99999999999999999999",
        ] {
            assert_eq!(canonical_decimal(bad), None, "{bad:?}");
        }
        assert_eq!(
            "+1".parse::<u32>(),
            Ok(1),
            "why a parser of our own is needed"
        );
    }

    /// The direct encoding is exactly the canonical context encoding of the two pairs.
    #[test]
    fn backend_context_aad_is_the_canonical_encoding() {
        let ctx = BackendContext {
            key_name: "default",
            caller: "spiffe://example.org/a",
        };
        let map: std::collections::BTreeMap<String, String> = ctx
            .pairs()
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let mut want = Vec::new();
        crate::envelope::encode_context(&map, &mut want);
        assert_eq!(ctx.to_aad(), want);
    }
}

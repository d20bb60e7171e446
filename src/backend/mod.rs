//! Key backends: the places data keys are wrapped and unwrapped (a local keyring, AWS KMS, GCP
//! Cloud KMS, Azure Key Vault). One small async trait, one module per backend (each owning its
//! settings, clients and private error type, converted into the one [`BackendError`]), one
//! call policy for deadlines and retries (`call`), and the [`Factory`] that builds backends
//! from their configuration, sharing clients between keys.
//!
//! Must never: import anything above it (configuration, registry, caches, broker, audit,
//! metrics, the gRPC edges); put a provider's raw response into a caller-visible message; log,
//! format or return key material outside a [`SecretKey`].

use std::any::Any;
use std::borrow::Cow;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

pub use crate::backend_kind::{BackendErrorKind, BackendKind};
use crate::envelope::{FormatError, WrappedCopy};
use crate::facts::{BackendCall, BackendOp};
use crate::secret::SecretKey;
use crate::settings::{Problems, Section};

pub mod aws;
pub mod azure;
pub mod breaker;
pub mod call;
pub mod gcp;
pub mod local;

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
        crate::context::encode(self.pairs().into_iter(), out);
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
    /// Scheduled for deletion: every use is refused (KEY_PENDING_DELETION) until it is purged
    /// or the deletion is cancelled.
    pub pending_deletion: bool,
    /// Versions below this are retired: decrypting under them is refused
    /// (KEY_VERSION_RETIRED). 0: none. Only for backends whose versions are numbers.
    pub min_decrypt_version: u64,
}

/// A key's lifecycle as its backend knows it without a network call (docs/lifecycle.md): the
/// local keyring's own schedule, or what a cloud said about its rotation when last asked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Lifecycle {
    /// Where the schedule is kept: "keyring", or the cloud ("aws", "gcp", "azure").
    pub source: &'static str,
    pub primary_version: Option<String>,
    pub primary_created: Option<std::time::SystemTime>,
    /// `None`: no automatic rotation.
    pub rotation_period: Option<std::time::Duration>,
    pub next_rotation: Option<std::time::SystemTime>,
    pub min_decrypt_version: Option<String>,
    pub delete_after: Option<std::time::SystemTime>,
}

/// A backend's view of its key, from `describe` (for health checks and operators).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyDescription {
    pub durable_key_id: String,
    pub primary_version: Option<String>,
    pub enabled: bool,
}

/// A key backend bound to one configured key.
///
/// # Contract
///
/// Every backend (checked for each by `tests/support/conformance.rs`):
/// - `wrap` / `generate_data_key` record the durable key id and the exact key version used in
///   the returned [`Wrapped`]; `unwrap` of that copy returns the same data key bytes.
/// - `unwrap` only ever uses the key the backend is configured for. A copy that names another
///   key, another key's version, or was made under a different [`BackendContext`] fails with
///   [`BackendErrorKind::InvalidCiphertext`] (never decrypts under the "wrong" key).
/// - A copy whose key id or version is not spelled exactly as the backend records it (`01` or
///   `+1` for `1`, another case or port in a URL, an AWS version that is not the key ARN) is
///   refused by `check_canonical` (and by `unwrap`), without a provider call: each respelling
///   would otherwise be a new decrypt-cache entry and a paid call for the same wrapped key.
/// - Errors are classified into [`BackendErrorKind`]; the caller-visible `message` is written by
///   keybroker, never a provider's raw response body (that goes into `source`, for the log).
///   A cloud backend's calls run under its [`call::CallPolicy`] (deadline, attempts, backoff).
/// - No method logs, formats or returns key material except inside [`SecretKey`].
///
/// A wrapper (instrumentation, fault injection, a circuit breaker: anything that implements
/// this trait around another backend) forwards every method to the backend it wraps, adding its
/// own behaviour around the calls and changing no answer it does not mean to change. In
/// particular it forwards `check_canonical` (which has no default for that reason),
/// `generate_data_key` (so a one-call backend stays one call), `rewrap_from` (so a wrapped AWS
/// key still re-wraps inside KMS) and `as_any` (so the wrapped backend is still recognised as a
/// peer by `rewrap_from`). `tests/support/counting.rs` is one.
#[async_trait::async_trait]
pub trait KeyBackend: Send + Sync + 'static {
    fn kind(&self) -> BackendKind;

    /// The backend key id as configured (for ListKeys; may be an alias).
    fn key_id(&self) -> &str;

    /// See [`KeyHint`]. Backends that learn key state only from the provider return the default.
    fn hint(&self) -> KeyHint {
        KeyHint::default()
    }

    /// See [`Lifecycle`]; `None` when the backend knows nothing about its key's schedule.
    fn lifecycle(&self) -> Option<Lifecycle> {
        None
    }

    /// Asks the provider for its own rotation state of the key, for [`KeyBackend::lifecycle`]
    /// (at startup and reload, off the request path). Backends without one do nothing.
    async fn refresh_lifecycle(&self) -> Result<(), BackendError> {
        Ok(())
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

    /// For `rewrap_from`: lets a backend recognise a peer of its own kind. A wrapper returns
    /// the wrapped backend's answer (see the contract).
    fn as_any(&self) -> &dyn Any;
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

/// Runs one backend call and times it: its result, and the [`BackendCall`] fact that says what
/// it was and how it ended (the cache hands these to the request; nothing here records them).
pub async fn timed<T>(
    backend: BackendKind,
    wrap: u8,
    op: BackendOp,
    call: impl Future<Output = Result<T, BackendError>>,
) -> (Result<T, BackendError>, BackendCall) {
    let started = Instant::now();
    let result = call.await;
    let fact = BackendCall {
        backend,
        wrap,
        op,
        outcome: result.as_ref().map(|_| ()).map_err(|e| e.kind),
        latency: started.elapsed(),
    };
    (result, fact)
}

/// One key's backend, as configured (`backend = "..."` and the backend's own fields of
/// `[keys.NAME]`, with its section's defaults applied). Compared on reload: an unchanged
/// configuration keeps its built backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendConfig {
    Local {
        keyring: PathBuf,
        /// The key's name inside the keyring.
        key_id: String,
        /// Create the keyring and the key if missing (the embedded default does).
        create: bool,
    },
    /// Boxed: much larger than the other variants.
    Aws(Box<aws::AwsKeyConfig>),
    /// A Cloud KMS CryptoKey (see `backend::gcp`).
    Gcp {
        /// `projects/P/locations/L/keyRings/R/cryptoKeys/K`.
        key_id: String,
        /// Overrides `[gcp] endpoint` for this key.
        endpoint: Option<String>,
    },
    /// Azure Key Vault or Managed HSM (see docs/azure.md).
    Azure {
        /// The key URL as configured (validated; may pin a version).
        key_id: String,
        key: azure::KeyUrl,
        /// The global `[azure]` section (one credential and client per vault for all keys);
        /// boxed, as `Aws` is: much larger than the other variants.
        settings: Box<azure::AzureSettings>,
    },
}

/// The section-level settings a key's backend fields are read over.
#[derive(Debug, Clone, Copy)]
pub struct KeyDefaults<'a> {
    pub local: &'a local::LocalSettings,
    pub aws: &'a aws::AwsDefaults,
    pub azure: &'a azure::AzureSettings,
}

impl BackendConfig {
    /// Reads the backend fields of `[keys.NAME]` for `backend = name` (`key_id` is read by the
    /// caller, which reports it when missing).
    pub fn parse(
        name: &str,
        key_id: Option<&str>,
        s: &Section<'_>,
        defaults: KeyDefaults<'_>,
        base: &Path,
        p: &mut Problems,
    ) -> Option<Self> {
        Some(match name {
            "local" => local::key_config(s, key_id, defaults.local, base, p)?,
            "aws" => Self::Aws(Box::new(aws::AwsKeyConfig::parse(
                key_id?,
                s,
                defaults.aws,
                p,
            ))),
            "gcp" => gcp::key_config(s, key_id?, p)?,
            "azure" => azure::key_config(s, key_id?, defaults.azure, p)?,
            other => {
                p.push(
                    s.at("backend"),
                    format!("unknown backend {other:?} (expected local, aws, gcp or azure)"),
                );
                return None;
            }
        })
    }

    pub fn kind(&self) -> BackendKind {
        match self {
            Self::Local { .. } => BackendKind::Local,
            Self::Aws(_) => BackendKind::Aws,
            Self::Gcp { .. } => BackendKind::Gcp,
            Self::Azure { .. } => BackendKind::Azure,
        }
    }

    pub fn key_id(&self) -> &str {
        match self {
            Self::Local { key_id, .. } => key_id,
            Self::Aws(c) => &c.key_id,
            Self::Gcp { key_id, .. } => key_id,
            Self::Azure { key_id, .. } => key_id,
        }
    }
}

/// Builds backends from their configuration, sharing what can be shared between keys: one
/// keyring (and its watcher) per file, one SDK client per cloud endpoint and credentials.
pub struct Factory {
    local: local::LocalRings,
    aws: aws::AwsClients,
    gcp: gcp::GcpClients,
    azure: azure::AzureClients,
}

impl Factory {
    pub fn new(local: &local::LocalSettings, gcp: &gcp::GcpSettings) -> Self {
        Self {
            local: local::LocalRings::new(local.poll_interval),
            aws: aws::AwsClients::default(),
            gcp: gcp::GcpClients::new(gcp.clone()),
            azure: azure::AzureClients::default(),
        }
    }

    /// Local keyrings opened by this factory record their scheduled rotations and purges in
    /// `audit`.
    pub fn with_audit(mut self, audit: std::sync::Arc<dyn local::LifecycleSink>) -> Self {
        self.local.set_audit(audit);
        self
    }

    /// A backend for one key. Makes no network call: a provider outage at startup must not stop
    /// the sidecar (configuration errors, a missing keyring key, are reported here).
    pub async fn build(&mut self, config: &BackendConfig) -> Result<Arc<dyn KeyBackend>, String> {
        Ok(match config {
            BackendConfig::Local {
                keyring,
                key_id,
                create,
            } => Arc::new(self.local.backend(keyring, key_id, *create)?),
            BackendConfig::Aws(cfg) => Arc::new(self.aws.backend(cfg).await?),
            BackendConfig::Gcp { key_id, endpoint } => {
                Arc::new(self.gcp.backend(key_id, endpoint.as_deref()).await?)
            }
            BackendConfig::Azure {
                key_id,
                key,
                settings,
            } => Arc::new(self.azure.backend(key, key_id, settings)?),
        })
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
        crate::context::encode_map(&map, &mut want);
        assert_eq!(ctx.to_aad(), want);
    }
}

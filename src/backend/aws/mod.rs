//! The AWS KMS backend: data keys made by one `GenerateDataKey` call, unwrapped by `Decrypt` with
//! `KeyId` pinned to the configured key, re-wrapped inside KMS by `ReEncrypt`. docs/aws.md is the
//! operator's view (configuration, IAM, error table, recovery without keybroker).
//!
//! What this module must never do: send the caller's per-message context to KMS (only the
//! keybroker key name and caller, [`BackendContext::pairs`]); ask KMS to decrypt under any key
//! other than the configured one (a copy naming another key is refused before any call); put an
//! AWS response text into a caller-visible message (it goes into `source`, for the log); log or
//! format key material. Known limit: the SDK's own request/response buffers (base64 JSON) are not
//! zeroized; keybroker's copies are ([`SecretKey`]).
//!
//! Clients are shared: one `aws_sdk_kms::Client` (HTTP connection pool, credential cache) per
//! (region, endpoint, profile, credentials file, timeouts, retries), built by [`AwsClients`].

use std::any::Any;
use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_sdk_kms::config::http::HttpResponse;
use aws_sdk_kms::error::SdkError;
use aws_sdk_kms::primitives::Blob;

use super::call::CallPolicy;
use super::{
    BackendContext, BackendError, BackendErrorKind, BackendKind, KeyBackend, KeyDescription,
    KeyHint, Wrapped,
};
use crate::envelope::{FormatError, MAX_WRAPPED_LEN, WrappedCopy};
use crate::secret::SecretKey;
use crate::util::format_duration;

mod client;
mod error;
mod settings;

pub use client::AwsClients;
pub use error::{KmsOperationError, classify};
use settings::ClientKey;
pub use settings::{
    AwsDefaults, AwsKeyConfig, DEFAULT_ATTEMPT_TIMEOUT, DEFAULT_CALL, DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_MAX_ATTEMPTS, DEFAULT_TIMEOUT, KeyIdForm, KeyRef,
};

/// How long an alias resolution is trusted before a copy naming an unknown key makes keybroker
/// ask KMS again (picks up an alias re-pointed by another instance; bounds the DescribeKey
/// calls junk ciphertexts can cause).
pub const ALIAS_RECHECK: Duration = Duration::from_secs(30);
/// KMS accepts 1 to 1024 bytes for `NumberOfBytes`.
const MAX_DATA_KEY_LEN: usize = 1024;

/// What the configured key id currently resolves to.
struct Resolution {
    arn: Option<Arc<str>>,
    /// Whether `arn` was reported by KMS (rather than taken from a key-ARN configuration).
    from_kms: bool,
    /// When KMS was last asked (DescribeKey) for an alias.
    checked: Option<Instant>,
}

/// One configured AWS KMS key.
pub struct AwsBackend {
    client: aws_sdk_kms::Client,
    client_key: Arc<ClientKey>,
    key_id: String,
    form: KeyIdForm,
    /// The SDK retries within `call.timeout` (`attempt_timeout` and `max_attempts` are the
    /// client's, see `client.rs`).
    call: CallPolicy,
    previous_key_arns: Vec<String>,
    resolved: Mutex<Resolution>,
    /// Single flight for DescribeKey.
    resolving: tokio::sync::Mutex<()>,
    /// Bumped when an alias turns out to point at another key: cached data keys made under the
    /// old one are retired.
    generation: AtomicU64,
}

impl AwsBackend {
    fn err(kind: BackendErrorKind, msg: impl Into<std::borrow::Cow<'static, str>>) -> BackendError {
        BackendError::new(BackendKind::Aws, kind, msg)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Resolution> {
        match self.resolved.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    fn is_alias(&self) -> bool {
        matches!(self.form, KeyIdForm::AliasArn | KeyIdForm::AliasName)
    }

    /// Runs one SDK call (the SDK retries within it) under this key's total deadline, and
    /// classifies its failure.
    async fn request<T, E>(
        &self,
        op: &'static str,
        fut: impl Future<Output = Result<T, SdkError<E, HttpResponse>>>,
    ) -> Result<T, BackendError>
    where
        E: KmsOperationError,
    {
        match self.call.bounded(fut).await {
            Some(Ok(v)) => Ok(v),
            Some(Err(e)) => Err(classify(op, e)),
            None => Err(Self::err(
                BackendErrorKind::DeadlineExceeded,
                format!(
                    "{op}: no answer from AWS KMS within {}",
                    format_duration(self.call.timeout)
                ),
            )),
        }
    }

    /// Records the key ARN KMS reported for the configured id. For an alias that now names
    /// another key, bumps the generation so cached data keys of the old key are retired.
    fn learn(&self, arn: &str) {
        let mut r = self.lock();
        if r.arn.as_deref() == Some(arn) {
            r.from_kms = true;
            return;
        }
        if r.from_kms {
            tracing::warn!(key_id = %self.key_id, old = ?r.arn, new = arn,
                "AWS KMS key id now resolves to another key");
            self.generation.fetch_add(1, Ordering::AcqRel);
        }
        r.arn = Some(Arc::from(arn));
        r.from_kms = true;
    }

    /// The key ARN of the configured key id, asking KMS (DescribeKey) if not known yet or, with
    /// `recheck`, if an alias resolution is older than [`ALIAS_RECHECK`].
    async fn durable_arn(&self, recheck: bool) -> Result<Arc<str>, BackendError> {
        let fresh_enough = |r: &Resolution| {
            !recheck || !self.is_alias() || r.checked.is_some_and(|t| t.elapsed() < ALIAS_RECHECK)
        };
        {
            let r = self.lock();
            if let Some(a) = &r.arn
                && fresh_enough(&r)
            {
                return Ok(Arc::clone(a));
            }
        }
        let _one = self.resolving.lock().await;
        {
            let r = self.lock();
            if let Some(a) = &r.arn
                && fresh_enough(&r)
            {
                return Ok(Arc::clone(a));
            }
        }
        let out = self
            .request(
                "DescribeKey",
                self.client.describe_key().key_id(&self.key_id).send(),
            )
            .await?;
        let arn = out.key_metadata.and_then(|m| m.arn).ok_or_else(|| {
            Self::err(
                BackendErrorKind::Internal,
                "DescribeKey: no key ARN in the answer",
            )
        })?;
        self.learn(&arn);
        self.lock().checked = Some(Instant::now());
        Ok(Arc::from(arn))
    }

    /// The contract's guard: a copy is only unwrapped if it names this key's ARN (or a listed
    /// previous one). Checked before KMS is called.
    async fn check_copy(&self, copy: &WrappedCopy<'_>) -> Result<(), BackendError> {
        if copy.backend != BackendKind::Aws {
            return Err(Self::err(
                BackendErrorKind::InvalidCiphertext,
                "wrapped key was not made by AWS KMS",
            ));
        }
        if canonical(copy).is_err() {
            return Err(Self::err(
                BackendErrorKind::InvalidCiphertext,
                "wrapped key's version is not the key ARN",
            ));
        }
        if self.previous_key_arns.iter().any(|a| a == copy.key_id) {
            return Ok(());
        }
        if *self.durable_arn(false).await? == *copy.key_id {
            return Ok(());
        }
        if self.is_alias() && *self.durable_arn(true).await? == *copy.key_id {
            return Ok(());
        }
        Err(Self::err(
            BackendErrorKind::InvalidCiphertext,
            "wrapped key names a KMS key other than the one configured",
        ))
    }

    fn wrapped(
        &self,
        op: &'static str,
        arn: Option<String>,
        blob: Option<Blob>,
    ) -> Result<Wrapped, BackendError> {
        let arn = arn.ok_or_else(|| {
            Self::err(
                BackendErrorKind::Internal,
                format!("{op}: no key ARN in the answer"),
            )
        })?;
        let ciphertext = blob.map(Blob::into_inner).unwrap_or_default();
        if ciphertext.is_empty() || ciphertext.len() > MAX_WRAPPED_LEN {
            return Err(Self::err(
                BackendErrorKind::Internal,
                format!("{op}: unusable ciphertext blob in the answer"),
            ));
        }
        self.learn(&arn);
        Ok(Wrapped {
            key_version: arn.clone(),
            key_id: arn,
            ciphertext,
        })
    }

    /// Whether `other` reaches KMS through the same region, endpoint and credentials.
    fn shares_client_with(&self, other: &AwsBackend) -> bool {
        Arc::ptr_eq(&self.client_key, &other.client_key) || *self.client_key == *other.client_key
    }
}

/// KMS ciphertext blobs name their key themselves and KMS picks the key material from the blob,
/// so the version keybroker records is the key ARN (KMS reports no version). Decrypt ignores any
/// other spelling, so only this one is accepted: a copy whose version differs from its key id
/// would otherwise be the same wrapped key under a new decrypt-cache entry, and another paid call.
fn canonical(copy: &WrappedCopy<'_>) -> Result<(), FormatError> {
    if copy.key_version == copy.key_id {
        Ok(())
    } else {
        Err(FormatError::NotCanonical("key version"))
    }
}

fn context_map(ctx: &BackendContext<'_>) -> HashMap<String, String> {
    ctx.pairs()
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn secret_from(
    op: &'static str,
    blob: Option<Blob>,
    len: Option<usize>,
) -> Result<SecretKey, BackendError> {
    let key = SecretKey::from_vec(blob.map(Blob::into_inner).unwrap_or_default());
    let ok = !key.is_empty() && len.is_none_or(|l| key.len() == l);
    if !ok {
        return Err(AwsBackend::err(
            BackendErrorKind::Internal,
            format!("{op}: the answer holds no data key of the expected length"),
        ));
    }
    Ok(key)
}

#[async_trait::async_trait]
impl KeyBackend for AwsBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Aws
    }

    fn key_id(&self) -> &str {
        &self.key_id
    }

    fn check_canonical(&self, copy: &WrappedCopy<'_>) -> Result<(), FormatError> {
        canonical(copy)
    }

    fn hint(&self) -> KeyHint {
        KeyHint {
            disabled: false,
            generation: self.generation.load(Ordering::Acquire),
        }
    }

    async fn generate_data_key(
        &self,
        len: usize,
        ctx: &BackendContext<'_>,
    ) -> Result<(SecretKey, Wrapped), BackendError> {
        if len == 0 || len > MAX_DATA_KEY_LEN {
            return Err(Self::err(
                BackendErrorKind::InvalidArgument,
                format!("KMS makes data keys of 1 to {MAX_DATA_KEY_LEN} bytes, not {len}"),
            ));
        }
        let out = self
            .request(
                "GenerateDataKey",
                self.client
                    .generate_data_key()
                    .key_id(&self.key_id)
                    .number_of_bytes(len as i32)
                    .set_encryption_context(Some(context_map(ctx)))
                    .send(),
            )
            .await?;
        let key = secret_from("GenerateDataKey", out.plaintext, Some(len))?;
        let wrapped = self.wrapped("GenerateDataKey", out.key_id, out.ciphertext_blob)?;
        Ok((key, wrapped))
    }

    async fn wrap(
        &self,
        key: &SecretKey,
        ctx: &BackendContext<'_>,
    ) -> Result<Wrapped, BackendError> {
        let out = self
            .request(
                "Encrypt",
                self.client
                    .encrypt()
                    .key_id(&self.key_id)
                    .plaintext(Blob::new(key.as_ref()))
                    .set_encryption_context(Some(context_map(ctx)))
                    .send(),
            )
            .await?;
        self.wrapped("Encrypt", out.key_id, out.ciphertext_blob)
    }

    async fn unwrap(
        &self,
        copy: &WrappedCopy<'_>,
        ctx: &BackendContext<'_>,
    ) -> Result<SecretKey, BackendError> {
        self.check_copy(copy).await?;
        let out = self
            .request(
                "Decrypt",
                self.client
                    .decrypt()
                    .key_id(copy.key_id)
                    .ciphertext_blob(Blob::new(copy.wrapped))
                    .set_encryption_context(Some(context_map(ctx)))
                    .send(),
            )
            .await?;
        if out.key_id.as_deref() != Some(copy.key_id) {
            return Err(Self::err(
                BackendErrorKind::Internal,
                "Decrypt: KMS reports another key than the one asked for",
            ));
        }
        secret_from("Decrypt", out.plaintext, None)
    }

    async fn rewrap_from(
        &self,
        source: &dyn KeyBackend,
        copy: &WrappedCopy<'_>,
        source_ctx: &BackendContext<'_>,
        ctx: &BackendContext<'_>,
    ) -> Option<Result<Wrapped, BackendError>> {
        let source = source.as_any().downcast_ref::<AwsBackend>()?;
        if !self.shares_client_with(source) {
            return None;
        }
        Some(
            async {
                source.check_copy(copy).await?;
                let out = self
                    .request(
                        "ReEncrypt",
                        self.client
                            .re_encrypt()
                            .ciphertext_blob(Blob::new(copy.wrapped))
                            .source_key_id(copy.key_id)
                            .set_source_encryption_context(Some(context_map(source_ctx)))
                            .destination_key_id(&self.key_id)
                            .set_destination_encryption_context(Some(context_map(ctx)))
                            .send(),
                    )
                    .await?;
                self.wrapped("ReEncrypt", out.key_id, out.ciphertext_blob)
            }
            .await,
        )
    }

    async fn describe(&self) -> Result<KeyDescription, BackendError> {
        let out = self
            .request(
                "DescribeKey",
                self.client.describe_key().key_id(&self.key_id).send(),
            )
            .await?;
        let meta = out
            .key_metadata
            .ok_or_else(|| Self::err(BackendErrorKind::Internal, "DescribeKey: no key metadata"))?;
        let arn = meta
            .arn
            .clone()
            .ok_or_else(|| Self::err(BackendErrorKind::Internal, "DescribeKey: no key ARN"))?;
        self.learn(&arn);
        if self.is_alias() {
            self.lock().checked = Some(Instant::now());
        }
        let enabled = meta.enabled
            && meta
                .key_state
                .as_ref()
                .is_none_or(|s| *s == aws_sdk_kms::types::KeyState::Enabled);
        Ok(KeyDescription {
            primary_version: Some(arn.clone()),
            durable_key_id: arn,
            enabled,
        })
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

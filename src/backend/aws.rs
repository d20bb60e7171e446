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
use std::error::Error as StdError;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_config::BehaviorVersion;
// aws-config's own names for these (it deprecated them in favour of aws-runtime's, which its
// `profile_files` still takes); naming them here saves a direct aws-runtime dependency.
#[allow(deprecated)]
use aws_config::profile::profile_file::{ProfileFileKind, ProfileFiles};
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_credential_types::provider::error::CredentialsError;
use aws_sdk_kms::config::Region;
use aws_sdk_kms::config::http::HttpResponse;
use aws_sdk_kms::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_kms::primitives::Blob;

use super::{
    BackendContext, BackendError, BackendErrorKind, BackendKind, KeyBackend, KeyDescription,
    KeyHint, Wrapped,
};
use crate::config::{Problems, Section};
use crate::envelope::{FormatError, WrappedCopy};
use crate::secret::SecretKey;
use crate::util::format_duration;

/// Per-call deadline, SDK retries included. KMS answers in milliseconds; five seconds leaves
/// room for the standard retry schedule and still fails a request well before typical client
/// deadlines.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// One attempt's limit (the SDK retries a timed-out attempt while the deadline allows).
pub const DEFAULT_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);
/// TCP + TLS connect limit; a black-holed endpoint fails over to the next attempt quickly.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// The SDK's standard retry mode default (the first attempt plus two retries).
pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;
pub const MAX_MAX_ATTEMPTS: u32 = 10;
const MIN_TIMEOUT: Duration = Duration::from_millis(10);
const MAX_TIMEOUT: Duration = Duration::from_secs(300);
/// How long an alias resolution is trusted before a copy naming an unknown key makes keybroker
/// ask KMS again (picks up an alias re-pointed by another instance; bounds the DescribeKey
/// calls junk ciphertexts can cause).
pub const ALIAS_RECHECK: Duration = Duration::from_secs(30);
/// KMS accepts 1 to 1024 bytes for `NumberOfBytes`.
const MAX_DATA_KEY_LEN: usize = 1024;

/// The `[aws]` section: defaults for every AWS key. Anything unset falls back to the SDK's own
/// chain (environment, shared config files, web identity, container/Pod Identity, IMDS).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AwsDefaults {
    pub region: Option<String>,
    pub endpoint: Option<String>,
    pub profile: Option<String>,
    /// A shared-credentials file (e.g. a mounted Kubernetes Secret) used instead of
    /// `~/.aws/credentials`; environment credentials still take precedence.
    pub credentials_file: Option<PathBuf>,
    pub timeout: Duration,
    pub attempt_timeout: Duration,
    pub connect_timeout: Duration,
    pub max_attempts: u32,
}

impl Default for AwsDefaults {
    fn default() -> Self {
        Self {
            region: None,
            endpoint: None,
            profile: None,
            credentials_file: None,
            timeout: DEFAULT_TIMEOUT,
            attempt_timeout: DEFAULT_ATTEMPT_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            max_attempts: DEFAULT_MAX_ATTEMPTS,
        }
    }
}

impl AwsDefaults {
    /// Reads the `[aws]` section (the caller reports unknown fields with `finish`).
    pub fn parse(s: &Section<'_>, base: &Path, p: &mut Problems) -> Self {
        let mut d = Self {
            region: s
                .str("region", p)
                .and_then(|r| checked_region(s, "region", r, p)),
            endpoint: s
                .str("endpoint", p)
                .and_then(|e| checked_endpoint(s, "endpoint", e, p)),
            profile: s
                .str("profile", p)
                .and_then(|v| checked_nonempty(s, "profile", v, p)),
            credentials_file: s.str("credentials_file", p).map(|f| {
                let path = PathBuf::from(f);
                if path.is_absolute() {
                    path
                } else {
                    base.join(path)
                }
            }),
            ..Self::default()
        };
        if let Some(t) = checked_timeout(s, "timeout", p) {
            d.timeout = t;
        }
        if let Some(t) = checked_timeout(s, "attempt_timeout", p) {
            d.attempt_timeout = t;
        }
        if let Some(t) = checked_timeout(s, "connect_timeout", p) {
            d.connect_timeout = t;
        }
        if let Some(n) = s.u64("max_attempts", p) {
            if n == 0 || n > MAX_MAX_ATTEMPTS as u64 {
                p.push(
                    s.at("max_attempts"),
                    format!("must be 1 (no retries) to {MAX_MAX_ATTEMPTS}"),
                );
            } else {
                d.max_attempts = n as u32;
            }
        }
        d
    }
}

/// One `backend = "aws"` key, with the `[aws]` defaults already applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AwsKeyConfig {
    /// As configured: key ARN, key id, alias name (`alias/x`) or alias ARN.
    pub key_id: String,
    /// Key setting, else the region of an ARN `key_id`, else `[aws] region`, else the SDK chain.
    pub region: Option<String>,
    pub endpoint: Option<String>,
    pub profile: Option<String>,
    /// Per-call deadline for this key.
    pub timeout: Duration,
    /// Key ARNs this key may still unwrap copies for, besides the one `key_id` resolves to now
    /// (after an alias was re-pointed to a new key).
    pub previous_key_arns: Vec<String>,
    pub defaults: AwsDefaults,
}

impl AwsKeyConfig {
    /// Reads the AWS-specific fields of a `[keys.NAME]` section.
    pub fn parse(key_id: &str, s: &Section<'_>, defaults: &AwsDefaults, p: &mut Problems) -> Self {
        let parsed = match KeyRef::parse(key_id) {
            Ok(r) => Some(r),
            Err(e) => {
                p.push(s.at("key_id"), e);
                None
            }
        };
        let own_region = s
            .str("region", p)
            .and_then(|r| checked_region(s, "region", r, p));
        let arn_region = parsed.as_ref().and_then(|r| r.region.clone());
        if let (Some(own), Some(arn)) = (&own_region, &arn_region)
            && own != arn
        {
            p.push(
                s.at("region"),
                format!("is {own:?} but key_id is an ARN in region {arn:?}"),
            );
        }
        let region = own_region
            .or(arn_region)
            .or_else(|| defaults.region.clone());
        let endpoint = s
            .str("endpoint", p)
            .and_then(|e| checked_endpoint(s, "endpoint", e, p))
            .or_else(|| defaults.endpoint.clone());
        let profile = s
            .str("profile", p)
            .and_then(|v| checked_nonempty(s, "profile", v, p))
            .or_else(|| defaults.profile.clone());
        let timeout = checked_timeout(s, "timeout", p).unwrap_or(defaults.timeout);
        let mut previous_key_arns = Vec::new();
        for (i, arn) in s
            .str_list("previous_key_arns", p)
            .unwrap_or_default()
            .into_iter()
            .enumerate()
        {
            match KeyRef::parse(arn) {
                Ok(KeyRef {
                    form: KeyIdForm::KeyArn,
                    ..
                }) => previous_key_arns.push(arn.to_owned()),
                _ => p.push(
                    format!("{}[{i}]", s.at("previous_key_arns")),
                    "must be a key ARN (arn:aws:kms:REGION:ACCOUNT:key/ID)",
                ),
            }
        }
        Self {
            key_id: key_id.to_owned(),
            region,
            endpoint,
            profile,
            timeout,
            previous_key_arns,
            defaults: defaults.clone(),
        }
    }

    fn client_key(&self) -> ClientKey {
        ClientKey {
            region: self.region.clone(),
            endpoint: self.endpoint.clone(),
            profile: self.profile.clone(),
            credentials_file: self.defaults.credentials_file.clone(),
            attempt_timeout: self.defaults.attempt_timeout,
            connect_timeout: self.defaults.connect_timeout,
            max_attempts: self.defaults.max_attempts,
        }
    }
}

fn checked_region(s: &Section<'_>, f: &str, v: &str, p: &mut Problems) -> Option<String> {
    let ok = !v.is_empty()
        && v.len() <= 64
        && v.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Some(v.to_owned())
    } else {
        p.push(
            s.at(f),
            format!("{v:?} is not an AWS region name like \"eu-west-1\""),
        );
        None
    }
}

fn checked_endpoint(s: &Section<'_>, f: &str, v: &str, p: &mut Problems) -> Option<String> {
    let rest = v
        .strip_prefix("https://")
        .or_else(|| v.strip_prefix("http://"));
    match rest {
        Some(host)
            if !host.is_empty() && !host.starts_with('/') && !v.contains(char::is_whitespace) =>
        {
            Some(v.to_owned())
        }
        _ => {
            p.push(
                s.at(f),
                format!(
                    "{v:?} is not an endpoint URL like \"https://kms.eu-west-1.amazonaws.com\""
                ),
            );
            None
        }
    }
}

fn checked_nonempty(s: &Section<'_>, f: &str, v: &str, p: &mut Problems) -> Option<String> {
    if v.trim().is_empty() {
        p.push(s.at(f), "must not be empty");
        None
    } else {
        Some(v.to_owned())
    }
}

fn checked_timeout(s: &Section<'_>, f: &str, p: &mut Problems) -> Option<Duration> {
    let d = s.duration(f, p)?;
    if d < MIN_TIMEOUT || d > MAX_TIMEOUT {
        p.push(
            s.at(f),
            format!(
                "must be {} to {}",
                format_duration(MIN_TIMEOUT),
                format_duration(MAX_TIMEOUT)
            ),
        );
        return None;
    }
    Some(d)
}

/// The four ways KMS accepts a key identifier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyIdForm {
    /// `arn:aws:kms:REGION:ACCOUNT:key/ID`: durable as written.
    KeyArn,
    /// `arn:aws:kms:REGION:ACCOUNT:alias/NAME`: may be re-pointed.
    AliasArn,
    /// `alias/NAME`: may be re-pointed.
    AliasName,
    /// A bare key id (`1234abcd-...` or `mrk-...`): durable, but the ARN must be asked for.
    KeyId,
}

/// A parsed key identifier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRef {
    pub form: KeyIdForm,
    /// The region an ARN names.
    pub region: Option<String>,
}

impl KeyRef {
    pub fn parse(s: &str) -> Result<Self, String> {
        fn id_chars(v: &str) -> bool {
            !v.is_empty() && v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        }
        fn alias_chars(v: &str) -> bool {
            !v.is_empty()
                && v.len() <= 256
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'/' | b'_' | b'-'))
        }
        if s.len() > 2048 {
            return Err("is longer than KMS allows (2048 bytes)".to_owned());
        }
        if let Some(rest) = s.strip_prefix("arn:") {
            let parts: Vec<&str> = rest.splitn(5, ':').collect();
            let bad = || {
                format!(
                    "{s:?} is not a KMS ARN like arn:aws:kms:REGION:ACCOUNT:key/ID or arn:aws:kms:REGION:ACCOUNT:alias/NAME"
                )
            };
            let [partition, service, region, account, resource] = parts[..] else {
                return Err(bad());
            };
            if partition.is_empty()
                || service != "kms"
                || region.is_empty()
                || account.len() != 12
                || !account.bytes().all(|b| b.is_ascii_digit())
            {
                return Err(bad());
            }
            let form = if resource.strip_prefix("key/").is_some_and(id_chars) {
                KeyIdForm::KeyArn
            } else if resource.strip_prefix("alias/").is_some_and(alias_chars) {
                KeyIdForm::AliasArn
            } else {
                return Err(bad());
            };
            return Ok(Self {
                form,
                region: Some(region.to_owned()),
            });
        }
        if let Some(name) = s.strip_prefix("alias/") {
            if alias_chars(name) {
                return Ok(Self {
                    form: KeyIdForm::AliasName,
                    region: None,
                });
            }
            return Err(format!("{s:?} is not an alias name like alias/my-key"));
        }
        if id_chars(s) {
            return Ok(Self {
                form: KeyIdForm::KeyId,
                region: None,
            });
        }
        Err(format!(
            "{s:?} is not a KMS key id, key ARN, alias name (alias/NAME) or alias ARN"
        ))
    }
}

/// What makes two keys able to share one SDK client.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct ClientKey {
    region: Option<String>,
    endpoint: Option<String>,
    profile: Option<String>,
    credentials_file: Option<PathBuf>,
    attempt_timeout: Duration,
    connect_timeout: Duration,
    max_attempts: u32,
}

/// Builds AWS backends, one SDK client per distinct [`ClientKey`] (held by `BackendFactory`).
#[derive(Default)]
pub struct AwsClients {
    clients: HashMap<ClientKey, (aws_sdk_kms::Client, Arc<ClientKey>)>,
}

impl AwsClients {
    /// A backend for one configured key. Makes no network call: a KMS outage at startup must
    /// not stop the sidecar (only a missing region, a configuration error, is reported here).
    pub async fn backend(&mut self, cfg: &AwsKeyConfig) -> Result<AwsBackend, String> {
        let key = cfg.client_key();
        let (client, shared) = match self.clients.get(&key) {
            Some(c) => c.clone(),
            None => {
                let client = build_client(&key).await?;
                let entry = (client, Arc::new(key.clone()));
                self.clients.insert(key, entry.clone());
                entry
            }
        };
        let form = KeyRef::parse(&cfg.key_id)?.form;
        let known = (form == KeyIdForm::KeyArn).then(|| Arc::<str>::from(cfg.key_id.as_str()));
        Ok(AwsBackend {
            client,
            client_key: shared,
            key_id: cfg.key_id.clone(),
            form,
            timeout: cfg.timeout,
            previous_key_arns: cfg.previous_key_arns.clone(),
            resolved: Mutex::new(Resolution {
                arn: known,
                from_kms: false,
                checked: None,
            }),
            resolving: tokio::sync::Mutex::new(()),
            generation: AtomicU64::new(0),
        })
    }

    /// Number of distinct SDK clients built (for tests and logs).
    pub fn client_count(&self) -> usize {
        self.clients.len()
    }
}

#[allow(deprecated)]
async fn build_client(key: &ClientKey) -> Result<aws_sdk_kms::Client, String> {
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .retry_config(RetryConfig::standard().with_max_attempts(key.max_attempts))
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(key.connect_timeout)
                .operation_attempt_timeout(key.attempt_timeout)
                .build(),
        );
    if let Some(r) = &key.region {
        loader = loader.region(Region::new(r.clone()));
    }
    if let Some(e) = &key.endpoint {
        loader = loader.endpoint_url(e.clone());
    }
    if let Some(p) = &key.profile {
        loader = loader.profile_name(p.clone());
    }
    if let Some(f) = &key.credentials_file {
        if !f.is_file() {
            return Err(format!(
                "AWS credentials file {} does not exist",
                f.display()
            ));
        }
        loader = loader.profile_files(
            ProfileFiles::builder()
                .include_default_config_file(true)
                .with_file(ProfileFileKind::Credentials, f)
                .build(),
        );
    }
    let sdk = loader.load().await;
    if sdk.region().is_none() {
        return Err(
            "no AWS region: set `region` on the key or in [aws], use a key ARN, or set AWS_REGION"
                .to_owned(),
        );
    }
    tracing::info!(region = ?sdk.region().map(|r| r.as_ref()), endpoint = ?key.endpoint,
        profile = ?key.profile, "AWS KMS client ready");
    Ok(aws_sdk_kms::Client::new(&sdk))
}

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
    timeout: Duration,
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

    /// The KMS client (shared with every key of the same region/endpoint/credentials).
    pub fn client(&self) -> &aws_sdk_kms::Client {
        &self.client
    }

    /// The key ARN the configured id resolved to, if known yet.
    pub fn resolved_arn(&self) -> Option<Arc<str>> {
        self.lock().arn.clone()
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

    /// Runs one SDK call under this key's deadline and classifies its failure.
    async fn call<T, E>(
        &self,
        op: &'static str,
        fut: impl Future<Output = Result<T, SdkError<E, HttpResponse>>>,
    ) -> Result<T, BackendError>
    where
        E: KmsOperationError,
    {
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(classify(op, e)),
            Err(_) => Err(Self::err(
                BackendErrorKind::DeadlineExceeded,
                format!(
                    "{op}: no answer from AWS KMS within {}",
                    format_duration(self.timeout)
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
            .call(
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
        if ciphertext.is_empty() || ciphertext.len() > crate::envelope::MAX_WRAPPED_LEN {
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
            .call(
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
            .call(
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
            .call(
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
                    .call(
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
            .call(
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

/// The typed error of one KMS operation. Modelled variants name their KMS error code even when
/// no code was parsed from a response (an error built in code); `Unhandled` ones carry the code
/// from the wire (e.g. AccessDeniedException and ThrottlingException are not modelled).
pub trait KmsOperationError: ProvideErrorMetadata + StdError + Send + Sync + 'static {
    fn modelled_code(&self) -> Option<&'static str>;
}

macro_rules! modelled_codes {
    ($($ty:ty: $($variant:ident),+;)+) => {$(
        impl KmsOperationError for $ty {
            fn modelled_code(&self) -> Option<&'static str> {
                match self {
                    $(Self::$variant(_) => Some(stringify!($variant)),)+
                    _ => None,
                }
            }
        }
    )+};
}

modelled_codes! {
    aws_sdk_kms::operation::generate_data_key::GenerateDataKeyError: DependencyTimeoutException,
        DisabledException, InvalidGrantTokenException, InvalidKeyUsageException,
        KeyUnavailableException, KmsInternalException, KmsInvalidStateException, NotFoundException;
    aws_sdk_kms::operation::encrypt::EncryptError: DependencyTimeoutException, DisabledException,
        InvalidGrantTokenException, InvalidKeyUsageException, KeyUnavailableException,
        KmsInternalException, KmsInvalidStateException, NotFoundException;
    aws_sdk_kms::operation::decrypt::DecryptError: DependencyTimeoutException, DisabledException,
        IncorrectKeyException, InvalidCiphertextException, InvalidGrantTokenException,
        InvalidKeyUsageException, KeyUnavailableException, KmsInternalException,
        KmsInvalidStateException, NotFoundException;
    aws_sdk_kms::operation::re_encrypt::ReEncryptError: DependencyTimeoutException,
        DisabledException, IncorrectKeyException, InvalidCiphertextException,
        InvalidGrantTokenException, InvalidKeyUsageException, KeyUnavailableException,
        KmsInternalException, KmsInvalidStateException, NotFoundException;
    aws_sdk_kms::operation::describe_key::DescribeKeyError: DependencyTimeoutException,
        InvalidArnException, KmsInternalException, NotFoundException;
}

/// Maps an SDK failure to keybroker's error kinds. The caller-visible message is fixed text
/// naming the operation; the SDK's error (with AWS's own message) becomes the `source`, for the
/// log. Public so the mappings moto cannot produce can be tested against the SDK's own types.
pub fn classify<E: KmsOperationError>(
    op: &'static str,
    err: SdkError<E, HttpResponse>,
) -> BackendError {
    use BackendErrorKind as K;
    let (kind, what) = match &err {
        SdkError::ServiceError(se) => {
            let code = se.err().modelled_code().or(se.err().code()).unwrap_or("");
            by_code(code, se.raw().status().as_u16())
        }
        SdkError::TimeoutError(_) => (K::DeadlineExceeded, "timed out"),
        SdkError::DispatchFailure(d) => {
            if chain_has_credentials_error(d.as_connector_error().map(|c| c as &dyn StdError)) {
                (K::Unauthenticated, "no usable AWS credentials")
            } else if d.is_timeout() {
                (K::DeadlineExceeded, "timed out connecting to AWS KMS")
            } else if d.is_user() {
                (K::Internal, "the request could not be sent")
            } else {
                (K::Unavailable, "AWS KMS could not be reached")
            }
        }
        SdkError::ResponseError(_) => (K::Unavailable, "unreadable answer from AWS KMS"),
        SdkError::ConstructionFailure(_) => {
            let source = StdError::source(&err);
            if chain_has_credentials_error(source) {
                (K::Unauthenticated, "no usable AWS credentials")
            } else {
                (K::Internal, "the request could not be built")
            }
        }
        _ => (K::Internal, "unexpected AWS SDK error"),
    };
    let source: Arc<dyn StdError + Send + Sync> = match err.into_source() {
        // The inner error only: never the raw HTTP response (its body could echo a data key).
        Ok(inner) => Arc::from(inner),
        Err(other) => Arc::new(Opaque(other.to_string())),
    };
    BackendError {
        backend: BackendKind::Aws,
        kind,
        message: format!("{op}: {what}").into(),
        source: Some(source),
    }
}

/// KMS error codes (the `__type` of a JSON error) to kinds. `status` decides unknown codes.
fn by_code(code: &str, status: u16) -> (BackendErrorKind, &'static str) {
    use BackendErrorKind as K;
    match code {
        "NotFoundException" => (
            K::NotFound,
            "the key does not exist, or is not visible in this account and region",
        ),
        "InvalidArnException" => (K::NotFound, "the configured key id is not a valid KMS ARN"),
        "DisabledException" => (K::Disabled, "the key is disabled"),
        "KMSInvalidStateException" | "KmsInvalidStateException" => (
            K::Disabled,
            "the key is not in a usable state (pending deletion, pending import or unavailable)",
        ),
        "InvalidKeyUsageException" => (
            K::Disabled,
            "the key does not permit this operation (key usage or key spec)",
        ),
        "AccessDeniedException" | "InvalidGrantTokenException" => (
            K::PermissionDenied,
            "access denied by IAM or the key policy",
        ),
        "UnrecognizedClientException"
        | "InvalidSignatureException"
        | "IncompleteSignature"
        | "MissingAuthenticationToken"
        | "InvalidClientTokenId"
        | "ExpiredTokenException"
        | "SignatureDoesNotMatch" => (K::Unauthenticated, "AWS rejected the credentials"),
        "InvalidCiphertextException" | "IncorrectKeyException" => (
            K::InvalidCiphertext,
            "the wrapped key does not decrypt under this key and context",
        ),
        "KMSInternalException"
        | "KmsInternalException"
        | "DependencyTimeoutException"
        | "KeyUnavailableException"
        | "InternalFailure"
        | "ServiceUnavailable"
        | "CustomKeyStoreInvalidStateException" => (K::Unavailable, "AWS KMS is unavailable"),
        "ValidationException" | "SerializationException" | "UnsupportedOperationException" => (
            K::InvalidArgument,
            "AWS KMS rejected the request as invalid",
        ),
        c if aws_runtime_throttling(c) => (
            K::Throttled,
            "AWS KMS request rate exceeded (after retries)",
        ),
        _ if status == 429 => (
            K::Throttled,
            "AWS KMS request rate exceeded (after retries)",
        ),
        _ if status >= 500 => (K::Unavailable, "AWS KMS is unavailable"),
        _ => (K::Internal, "unexpected error from AWS KMS"),
    }
}

/// The codes the SDK's standard retry mode treats as throttling (and retries).
fn aws_runtime_throttling(code: &str) -> bool {
    matches!(
        code,
        "Throttling"
            | "ThrottlingException"
            | "ThrottledException"
            | "RequestThrottledException"
            | "TooManyRequestsException"
            | "RequestLimitExceeded"
            | "LimitExceededException"
            | "RequestThrottled"
            | "SlowDown"
    )
}

fn chain_has_credentials_error(mut cur: Option<&(dyn StdError + 'static)>) -> bool {
    // Error chains are short; the bound only guards against a cyclic `source`.
    for _ in 0..16 {
        let Some(e) = cur else { return false };
        if e.downcast_ref::<CredentialsError>().is_some() {
            return true;
        }
        cur = e.source();
    }
    false
}

/// A source for the rare SDK error without an inner error.
#[derive(Debug)]
struct Opaque(String);

impl std::fmt::Display for Opaque {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl StdError for Opaque {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_id_forms() {
        let arn = "arn:aws:kms:eu-west-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab";
        assert_eq!(
            KeyRef::parse(arn).unwrap(),
            KeyRef {
                form: KeyIdForm::KeyArn,
                region: Some("eu-west-1".into())
            }
        );
        assert_eq!(
            KeyRef::parse("arn:aws-cn:kms:cn-north-1:111122223333:alias/app")
                .unwrap()
                .form,
            KeyIdForm::AliasArn
        );
        assert_eq!(
            KeyRef::parse("alias/app/data").unwrap().form,
            KeyIdForm::AliasName
        );
        assert_eq!(
            KeyRef::parse("mrk-1234abcd12ab34cd56ef1234567890ab")
                .unwrap()
                .form,
            KeyIdForm::KeyId
        );
        for bad in [
            "",
            "alias/",
            "alias/a b",
            "arn:aws:s3:eu-west-1:111122223333:key/x",
            "arn:aws:kms:eu-west-1:1111:key/x",
            "arn:aws:kms::111122223333:key/x",
            "arn:aws:kms:eu-west-1:111122223333:grant/x",
            "key id with spaces",
        ] {
            assert!(KeyRef::parse(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn codes_map_to_kinds() {
        use BackendErrorKind as K;
        for (code, kind) in [
            ("NotFoundException", K::NotFound),
            ("DisabledException", K::Disabled),
            ("KMSInvalidStateException", K::Disabled),
            ("AccessDeniedException", K::PermissionDenied),
            ("InvalidCiphertextException", K::InvalidCiphertext),
            ("IncorrectKeyException", K::InvalidCiphertext),
            ("ThrottlingException", K::Throttled),
            ("LimitExceededException", K::Throttled),
            ("KMSInternalException", K::Unavailable),
            ("UnrecognizedClientException", K::Unauthenticated),
        ] {
            assert_eq!(by_code(code, 400).0, kind, "{code}");
        }
        assert_eq!(by_code("SomethingNew", 503).0, K::Unavailable);
        assert_eq!(by_code("SomethingNew", 429).0, K::Throttled);
        assert_eq!(by_code("SomethingNew", 400).0, K::Internal);
    }
}

//! The GCP Cloud KMS backend: a data key is wrapped with `Encrypt` on one CryptoKey (Cloud KMS
//! picks the primary version and records it in its ciphertext) and unwrapped with `Decrypt` on
//! the same CryptoKey, over gcloud-sdk's gRPC client. Cloud KMS has no GenerateDataKey, so the
//! trait's default (local CSPRNG, then wrap) makes new data keys. `docs/gcp.md` is the operator's
//! view: configuration, credentials, the exact AAD bytes, error mapping, recovery with gcloud.
//!
//! What it must never do: decrypt under any CryptoKey but the configured one, return a data key
//! (or record a wrapped key) whose CRC32C does not verify, or put Google's error text into a
//! caller-visible message (that goes into `source`, for the log only).

use std::any::Any;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use gcloud_sdk::google::cloud::kms::v1::crypto_key::CryptoKeyPurpose;
use gcloud_sdk::google::cloud::kms::v1::crypto_key_version::CryptoKeyVersionState;
use gcloud_sdk::google::cloud::kms::v1::key_management_service_client::KeyManagementServiceClient;
use gcloud_sdk::google::cloud::kms::v1::{DecryptRequest, GetCryptoKeyRequest};
use gcloud_sdk::google_cloud_auth::credentials::Credentials;
use gcloud_sdk::proto_ext::kms::EncryptRequest;
use gcloud_sdk::{GoogleAuthHeaders, GoogleAuthMiddleware, GoogleAuthMiddlewareLayer, SecretValue};
use tonic::Code;
use tonic::transport::{ClientTlsConfig, Endpoint};

use super::{
    BackendContext, BackendError, BackendErrorKind, BackendKind, KeyBackend, KeyDescription,
    Wrapped,
};
use crate::config::{BackendConfig, Problems, Section};
use crate::envelope::{FormatError, MAX_WRAPPED_LEN, WrappedCopy};
use crate::secret::{SecretKey, random_fill};
use crate::util::format_duration;

/// Cloud KMS's global gRPC endpoint.
pub const DEFAULT_ENDPOINT: &str = "https://cloudkms.googleapis.com";
/// Time allowed for one attempt of one call (token fetch included). Cloud KMS answers software
/// keys in tens of milliseconds; 10 s leaves room for a cold token fetch without letting a stuck
/// call hold a request forever.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(10);
/// Extra attempts after UNAVAILABLE, DEADLINE_EXCEEDED or RESOURCE_EXHAUSTED.
pub const DEFAULT_RETRIES: u32 = 2;
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
pub const MAX_RETRIES: u32 = 10;
/// The narrowest OAuth scope that covers Encrypt, Decrypt and GetCryptoKey.
pub const OAUTH_SCOPE: &str = "https://www.googleapis.com/auth/cloudkms";
/// A CRC32C mismatch (ours or the server's) is retried this many times, then fails: Google's
/// guidance is "a limited number of retries", and a persistent mismatch is a fault to report.
const INTEGRITY_RETRIES: u32 = 1;
const BACKOFF_BASE: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// Where the Cloud KMS client gets its OAuth tokens.
#[derive(Clone, Debug, Default)]
pub enum GcpCredentials {
    /// Application Default Credentials as google-cloud-auth resolves them:
    /// `GOOGLE_APPLICATION_CREDENTIALS` (service account key, external account / workload
    /// identity federation, impersonation), gcloud's ADC file, then the metadata server (GCE,
    /// GKE Workload Identity, Cloud Run).
    #[default]
    ApplicationDefault,
    /// Credentials built by the program embedding keybroker (tests hand in a token the fake
    /// expects). No configuration text produces this variant: it is set in code only.
    Custom(Credentials),
}

/// The `[gcp]` section: settings shared by every `backend = "gcp"` key.
#[derive(Clone, Debug)]
pub struct GcpSettings {
    /// gRPC endpoint, `https://host[:port]` (or `http://` for a loopback host).
    pub endpoint: String,
    /// Deadline of one attempt of one Cloud KMS call.
    pub deadline: Duration,
    /// Extra attempts after a transient failure.
    pub retries: u32,
    pub connect_timeout: Duration,
    pub credentials: GcpCredentials,
}

impl Default for GcpSettings {
    fn default() -> Self {
        Self {
            endpoint: DEFAULT_ENDPOINT.to_owned(),
            deadline: DEFAULT_DEADLINE,
            retries: DEFAULT_RETRIES,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            credentials: GcpCredentials::ApplicationDefault,
        }
    }
}

impl GcpSettings {
    /// Reads `[gcp]` (absent: the defaults). Problems are reported with their path.
    pub fn parse(s: &Section<'_>, p: &mut Problems) -> Self {
        let mut g = Self::default();
        if let Some(e) = s.str("endpoint", p) {
            match check_endpoint(e) {
                Ok(()) => g.endpoint = e.trim_end_matches('/').to_owned(),
                Err(m) => p.push(s.at("endpoint"), m),
            }
        }
        if let Some(d) = s.duration("deadline", p) {
            if d < Duration::from_millis(10) || d > Duration::from_secs(600) {
                p.push(s.at("deadline"), "must be 10ms to 10m");
            }
            g.deadline = d;
        }
        if let Some(n) = s.u64("retries", p) {
            if n > MAX_RETRIES as u64 {
                p.push(s.at("retries"), format!("must be 0 to {MAX_RETRIES}"));
            }
            g.retries = n.min(MAX_RETRIES as u64) as u32;
        }
        if let Some(d) = s.duration("connect_timeout", p) {
            if d < Duration::from_millis(10) || d > Duration::from_secs(120) {
                p.push(s.at("connect_timeout"), "must be 10ms to 2m");
            }
            g.connect_timeout = d;
        }
        g
    }
}

/// Parses the gcp-specific fields of `[keys.NAME]`.
pub fn key_config(s: &Section<'_>, key_id: &str, p: &mut Problems) -> Option<BackendConfig> {
    if let Err(m) = check_crypto_key_name(key_id) {
        p.push(s.at("key_id"), m);
    }
    let endpoint = match s.str("endpoint", p) {
        Some(e) => match check_endpoint(e) {
            Ok(()) => Some(e.trim_end_matches('/').to_owned()),
            Err(m) => {
                p.push(s.at("endpoint"), m);
                None
            }
        },
        None => None,
    };
    Some(BackendConfig::Gcp {
        key_id: key_id.to_owned(),
        endpoint,
    })
}

/// Checks `projects/P/locations/L/keyRings/R/cryptoKeys/K`, with Cloud KMS's character rules
/// for key ring and key ids (`[a-zA-Z0-9_-]{1,63}`).
pub fn check_crypto_key_name(name: &str) -> Result<(), String> {
    const SHAPE: &str = "projects/PROJECT/locations/LOCATION/keyRings/RING/cryptoKeys/KEY";
    let parts: Vec<&str> = name.split('/').collect();
    if parts.len() == 10 && parts[8] == "cryptoKeyVersions" {
        return Err(format!(
            "{name:?} names a CryptoKeyVersion; configure the CryptoKey ({SHAPE}): Cloud KMS \
             encrypts with its primary version and records the version in each ciphertext"
        ));
    }
    let labels = ["projects", "locations", "keyRings", "cryptoKeys"];
    if parts.len() != 8 || (0..4).any(|i| parts[2 * i] != labels[i]) {
        return Err(format!("{name:?} is not a Cloud KMS key name like {SHAPE}"));
    }
    let id_ok = |s: &str, extra: &str| {
        !s.is_empty()
            && s.len() <= 63
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || extra.contains(c))
    };
    // Project ids are lower-case with dashes; legacy domain-scoped ones carry "example.com:".
    if !id_ok(parts[1], ".:") || parts[1].len() > 100 {
        return Err(format!(
            "{name:?}: project {:?} is not a project id",
            parts[1]
        ));
    }
    if !id_ok(parts[3], "") {
        return Err(format!(
            "{name:?}: location {:?} is not a location",
            parts[3]
        ));
    }
    if !id_ok(parts[5], "") {
        return Err(format!(
            "{name:?}: key ring id {:?} must be 1-63 of [a-zA-Z0-9_-]",
            parts[5]
        ));
    }
    if !id_ok(parts[7], "") {
        return Err(format!(
            "{name:?}: key id {:?} must be 1-63 of [a-zA-Z0-9_-]",
            parts[7]
        ));
    }
    Ok(())
}

/// An endpoint is `https://host[:port]`; plain `http://` only for a loopback host (tests, a
/// local proxy), since the bearer token would otherwise cross the network in the clear.
pub fn check_endpoint(endpoint: &str) -> Result<(), String> {
    let uri: tonic::codegen::http::Uri = endpoint
        .parse()
        .map_err(|_| format!("{endpoint:?} is not a URL like {DEFAULT_ENDPOINT}"))?;
    let host = uri
        .host()
        .ok_or_else(|| format!("{endpoint:?} has no host"))?;
    if uri.path() != "/" && !uri.path().is_empty() || uri.query().is_some() {
        return Err(format!("{endpoint:?}: an endpoint has no path or query"));
    }
    match uri.scheme_str() {
        Some("https") => Ok(()),
        Some("http") if is_loopback(host) => Ok(()),
        Some("http") => Err(format!(
            "{endpoint:?}: plain http is allowed only for a loopback host; use https"
        )),
        _ => Err(format!("{endpoint:?} must start with https://")),
    }
}

fn is_loopback(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Why a Cloud KMS client could not be set up (bad endpoint, unusable ADC file).
#[derive(Debug, thiserror::Error)]
pub enum GcpSetupError {
    #[error("endpoint {endpoint:?}: {source}")]
    Endpoint {
        endpoint: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("Google credentials: {0}")]
    Credentials(#[source] gcloud_sdk::error::Error),
    #[error("{0}")]
    Invalid(String),
}

/// One authenticated gRPC channel to one Cloud KMS endpoint, shared by every key that uses it
/// (tonic multiplexes calls over it; the token is fetched and refreshed once).
pub struct GcpClient {
    endpoint: String,
    kms: KeyManagementServiceClient<GoogleAuthMiddleware>,
    deadline: Duration,
    retries: u32,
}

impl std::fmt::Debug for GcpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GcpClient")
            .field("endpoint", &self.endpoint)
            .field("deadline", &self.deadline)
            .field("retries", &self.retries)
            .finish()
    }
}

impl GcpClient {
    /// Sets up a client for `endpoint` with `settings`' deadline, retries and credentials. The
    /// connection is made on first use, so a sidecar starts even before the network is up; ADC
    /// problems that can be seen without the network (an unreadable credentials file) fail here.
    pub async fn connect(
        endpoint: &str,
        settings: &GcpSettings,
    ) -> Result<Arc<Self>, GcpSetupError> {
        check_endpoint(endpoint).map_err(GcpSetupError::Invalid)?;
        let bad = |source| GcpSetupError::Endpoint {
            endpoint: endpoint.to_owned(),
            source,
        };
        let mut ep = Endpoint::from_shared(endpoint.to_owned())
            .map_err(bad)?
            .connect_timeout(settings.connect_timeout)
            .tcp_nodelay(true)
            .tcp_keepalive(Some(Duration::from_secs(60)))
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10));
        if endpoint.starts_with("https://") {
            let host = endpoint
                .parse::<tonic::codegen::http::Uri>()
                .ok()
                .and_then(|u| u.host().map(str::to_owned))
                .unwrap_or_default();
            ep = ep
                .tls_config(ClientTlsConfig::new().with_webpki_roots().domain_name(host))
                .map_err(bad)?;
        }
        let channel = ep.connect_lazy();
        let (headers, source) = match &settings.credentials {
            GcpCredentials::ApplicationDefault => (
                GoogleAuthHeaders::from_adc_with_scopes(vec![OAUTH_SCOPE.to_owned()])
                    .await
                    .map_err(GcpSetupError::Credentials)?,
                "application default credentials",
            ),
            GcpCredentials::Custom(c) => (GoogleAuthHeaders::from(c.clone()), "custom credentials"),
        };
        let layer = GoogleAuthMiddlewareLayer::new(headers, None)
            .and_then(|l| l.amend_user_agent(format!("keybroker/{}", env!("CARGO_PKG_VERSION"))))
            .map_err(GcpSetupError::Credentials)?;
        let service = tower::Layer::layer(&layer, channel);
        tracing::info!(endpoint, credentials = source, deadline = %format_duration(settings.deadline),
            retries = settings.retries, "Cloud KMS client ready (connects on first use)");
        Ok(Arc::new(Self {
            endpoint: endpoint.to_owned(),
            kms: KeyManagementServiceClient::new(service),
            deadline: settings.deadline,
            retries: settings.retries,
        }))
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }
}

/// A configured key backed by one Cloud KMS CryptoKey.
pub struct GcpBackend {
    client: Arc<GcpClient>,
    /// `projects/P/locations/L/keyRings/R/cryptoKeys/K`.
    key: String,
    /// `<key>/cryptoKeyVersions/`: every version this backend may record or decrypt under.
    version_prefix: String,
}

impl GcpBackend {
    /// A backend for CryptoKey `key` (checked with [`check_crypto_key_name`]) over `client`.
    pub fn new(client: Arc<GcpClient>, key: impl Into<String>) -> Result<Self, String> {
        let key = key.into();
        check_crypto_key_name(&key)?;
        Ok(Self {
            client,
            version_prefix: format!("{key}/cryptoKeyVersions/"),
            key,
        })
    }

    fn err(kind: BackendErrorKind, msg: impl Into<std::borrow::Cow<'static, str>>) -> BackendError {
        BackendError::new(BackendKind::Gcp, kind, msg)
    }

    /// Whether `name` is a CryptoKeyVersion of the configured key (`<key>/cryptoKeyVersions/N`).
    /// A CryptoKeyVersion of the configured key, spelled as Cloud KMS spells it: the version id
    /// is a positive decimal without sign or leading zero. Cloud KMS decrypts by the CryptoKey
    /// (the blob names its version), so `.../cryptoKeyVersions/01` would be accepted by it as
    /// well, but only as a new decrypt-cache entry and another paid call.
    fn is_own_version(&self, name: &str) -> bool {
        name.strip_prefix(&self.version_prefix)
            .and_then(crate::backend::canonical_decimal)
            .is_some()
    }

    /// Per-call metadata: the deadline (sent as `grpc-timeout`) and the routing header Google's
    /// own clients send so the request reaches the key's region.
    fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut req = tonic::Request::new(message);
        req.set_timeout(self.client.deadline);
        if let Ok(v) = format!("name={}", self.key).parse() {
            req.metadata_mut().insert("x-goog-request-params", v);
        }
        req
    }

    /// Runs one Cloud KMS call with the deadline per attempt, retrying transient failures
    /// (with backoff) and integrity failures (once), and maps the final failure.
    async fn call<T, F, Fut>(&self, op: Op, mut attempt: F) -> Result<T, BackendError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, Failure>>,
    {
        let mut transient_left = self.client.retries;
        let mut integrity_left = INTEGRITY_RETRIES;
        let mut tries = 0u32;
        loop {
            tries += 1;
            let started = tokio::time::Instant::now();
            let failure = match tokio::time::timeout(self.client.deadline, attempt()).await {
                Ok(Ok(v)) => return Ok(v),
                // The server enforces the `grpc-timeout` we send too, and may win the race
                // (some servers report it as CANCELLED): our deadline passed either way.
                Ok(Err(Failure::Status(s)))
                    if matches!(s.code(), Code::Cancelled | Code::DeadlineExceeded)
                        && started.elapsed() >= self.client.deadline =>
                {
                    Failure::Timeout(self.client.deadline)
                }
                Ok(Err(f)) => f,
                Err(_) => Failure::Timeout(self.client.deadline),
            };
            let retry = match failure.retry_class() {
                RetryClass::Integrity if integrity_left > 0 => {
                    integrity_left -= 1;
                    true
                }
                RetryClass::Transient if transient_left > 0 => {
                    transient_left -= 1;
                    tokio::time::sleep(backoff(tries)).await;
                    true
                }
                _ => false,
            };
            if retry {
                tracing::warn!(key = %self.key, op = op.as_str(), attempt = tries, error = %failure,
                    "Cloud KMS call failed; retrying");
                continue;
            }
            let e = failure.into_backend_error(op);
            tracing::debug!(key = %self.key, op = op.as_str(), attempts = tries, error = ?e,
                "Cloud KMS call failed");
            return Err(e);
        }
    }
}

#[async_trait::async_trait]
impl KeyBackend for GcpBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Gcp
    }

    fn key_id(&self) -> &str {
        &self.key
    }

    fn check_canonical(&self, copy: &WrappedCopy<'_>) -> Result<(), FormatError> {
        // A copy of another key (or another key's version) is for `unwrap` to refuse; here only
        // respellings of this key's versions.
        match copy.key_version.strip_prefix(&self.version_prefix) {
            Some(id)
                if copy.key_id == self.key && crate::backend::canonical_decimal(id).is_none() =>
            {
                Err(FormatError::NotCanonical("key version"))
            }
            _ => Ok(()),
        }
    }

    async fn wrap(
        &self,
        key: &SecretKey,
        ctx: &BackendContext<'_>,
    ) -> Result<Wrapped, BackendError> {
        let aad = ctx.to_aad();
        let plaintext_crc = crc32c(key.as_ref());
        let aad_crc = crc32c(&aad);
        self.call(Op::Encrypt, || {
            let mut kms = self.client.kms.clone();
            let req = self.request(EncryptRequest {
                name: self.key.clone(),
                plaintext: SecretValue::new(key.as_ref().to_vec()),
                additional_authenticated_data: aad.clone(),
                plaintext_crc32c: Some(plaintext_crc.into()),
                additional_authenticated_data_crc32c: Some(aad_crc.into()),
            });
            async move {
                let resp = kms
                    .encrypt(req)
                    .await
                    .map_err(Failure::Status)?
                    .into_inner();
                // Google's data-integrity guidelines: the server must confirm it checked both
                // request checksums, and the ciphertext must match the checksum it returns.
                if !resp.verified_plaintext_crc32c
                    || !resp.verified_additional_authenticated_data_crc32c
                {
                    return Err(Failure::Integrity(
                        "Encrypt response did not confirm the request checksums",
                    ));
                }
                if resp.ciphertext_crc32c != Some(crc32c(&resp.ciphertext).into()) {
                    return Err(Failure::Integrity(
                        "Encrypt response ciphertext does not match its CRC32C",
                    ));
                }
                if !self.is_own_version(&resp.name) {
                    return Err(Failure::Unexpected(
                        "Encrypt response names a key version outside the configured CryptoKey",
                    ));
                }
                if resp.ciphertext.is_empty() || resp.ciphertext.len() > MAX_WRAPPED_LEN {
                    return Err(Failure::Unexpected(
                        "Encrypt response ciphertext has an impossible length",
                    ));
                }
                Ok(Wrapped {
                    key_id: self.key.clone(),
                    key_version: resp.name,
                    ciphertext: resp.ciphertext,
                })
            }
        })
        .await
    }

    async fn unwrap(
        &self,
        copy: &WrappedCopy<'_>,
        ctx: &BackendContext<'_>,
    ) -> Result<SecretKey, BackendError> {
        // Policy safety (trait contract): only ever decrypt under the configured CryptoKey, and
        // refuse a copy that claims another key or another key's version before calling out.
        if copy.backend != BackendKind::Gcp || copy.key_id != self.key {
            return Err(Self::err(
                BackendErrorKind::InvalidCiphertext,
                "the wrapped key was made by another key",
            ));
        }
        if !self.is_own_version(copy.key_version) {
            return Err(Self::err(
                BackendErrorKind::InvalidCiphertext,
                "the wrapped key names a key version outside the configured CryptoKey",
            ));
        }
        let aad = ctx.to_aad();
        let ciphertext_crc = crc32c(copy.wrapped);
        let aad_crc = crc32c(&aad);
        self.call(Op::Decrypt, || {
            let mut kms = self.client.kms.clone();
            let req = self.request(DecryptRequest {
                name: self.key.clone(),
                ciphertext: copy.wrapped.to_vec(),
                additional_authenticated_data: aad.clone(),
                ciphertext_crc32c: Some(ciphertext_crc.into()),
                additional_authenticated_data_crc32c: Some(aad_crc.into()),
            });
            async move {
                let resp = kms
                    .decrypt(req)
                    .await
                    .map_err(Failure::Status)?
                    .into_inner();
                let plaintext = resp.plaintext.ref_sensitive_value();
                // Never hand out a key that may have been corrupted on the way.
                if resp.plaintext_crc32c != Some(crc32c(plaintext).into()) {
                    return Err(Failure::Integrity(
                        "Decrypt response plaintext does not match its CRC32C",
                    ));
                }
                if plaintext.is_empty() {
                    return Err(Failure::Unexpected(
                        "Decrypt response has an empty plaintext",
                    ));
                }
                Ok(SecretKey::from_slice(plaintext))
            }
        })
        .await
    }

    async fn describe(&self) -> Result<KeyDescription, BackendError> {
        let key = self
            .call(Op::GetCryptoKey, || {
                let mut kms = self.client.kms.clone();
                let req = self.request(GetCryptoKeyRequest {
                    name: self.key.clone(),
                });
                async move {
                    Ok(kms
                        .get_crypto_key(req)
                        .await
                        .map_err(Failure::Status)?
                        .into_inner())
                }
            })
            .await?;
        let primary = key.primary.as_ref();
        let enabled = key.purpose == CryptoKeyPurpose::EncryptDecrypt as i32
            && primary.is_some_and(|v| v.state == CryptoKeyVersionState::Enabled as i32);
        Ok(KeyDescription {
            durable_key_id: if key.name.is_empty() {
                self.key.clone()
            } else {
                key.name
            },
            primary_version: primary.map(|v| v.name.clone()),
            enabled,
        })
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Encrypt,
    Decrypt,
    GetCryptoKey,
}

impl Op {
    fn as_str(self) -> &'static str {
        match self {
            Self::Encrypt => "Encrypt",
            Self::Decrypt => "Decrypt",
            Self::GetCryptoKey => "GetCryptoKey",
        }
    }
}

/// One failed attempt.
#[derive(Debug, thiserror::Error)]
enum Failure {
    #[error("{0}")]
    Status(tonic::Status),
    #[error("no answer within {}", format_duration(*.0))]
    Timeout(Duration),
    /// A response failed a CRC32C check (or did not confirm ours).
    #[error("{0}")]
    Integrity(&'static str),
    /// A response that Cloud KMS should never send.
    #[error("{0}")]
    Unexpected(&'static str),
}

enum RetryClass {
    Transient,
    Integrity,
    Final,
}

impl Failure {
    fn retry_class(&self) -> RetryClass {
        match self {
            Self::Timeout(_) | Self::Status(_) if self.is_transient() => RetryClass::Transient,
            Self::Integrity(_) => RetryClass::Integrity,
            Self::Status(s) if is_checksum_rejection(s) => RetryClass::Integrity,
            _ => RetryClass::Final,
        }
    }

    fn is_transient(&self) -> bool {
        match self {
            Self::Timeout(_) => true,
            Self::Status(s) => {
                matches!(
                    s.code(),
                    Code::Unavailable | Code::DeadlineExceeded | Code::ResourceExhausted
                ) || credentials_error(s).is_some_and(|transient| transient)
            }
            _ => false,
        }
    }

    fn into_backend_error(self, op: Op) -> BackendError {
        use BackendErrorKind as K;
        let (kind, message): (BackendErrorKind, &'static str) = match &self {
            Self::Timeout(_) => (
                K::DeadlineExceeded,
                "Cloud KMS did not answer within the deadline",
            ),
            Self::Integrity(_) => (
                K::Integrity,
                "Cloud KMS response failed its CRC32C check twice; no key was returned",
            ),
            Self::Unexpected(_) => (K::Internal, "unexpected Cloud KMS response"),
            Self::Status(s) if is_checksum_rejection(s) => (
                K::Integrity,
                "Cloud KMS rejected the request checksums twice (corruption in transit)",
            ),
            Self::Status(s) => status_kind(s, op),
        };
        let e = BackendError::new(BackendKind::Gcp, kind, message);
        match self {
            Self::Status(s) => e.with_source(s),
            other => e.with_source(other),
        }
    }
}

/// The shared error kind and our own message for a Cloud KMS status. Google's message is never
/// used here: it only reaches the log, through `source`.
fn status_kind(s: &tonic::Status, op: Op) -> (BackendErrorKind, &'static str) {
    use BackendErrorKind as K;
    match s.code() {
        Code::NotFound => (
            K::NotFound,
            "the Cloud KMS key or key version does not exist",
        ),
        Code::FailedPrecondition => (
            K::Disabled,
            "the Cloud KMS key version is not enabled (disabled, destroyed or scheduled for destruction)",
        ),
        Code::PermissionDenied => (
            K::PermissionDenied,
            "Cloud KMS denied keybroker's identity the use of this key \
             (it needs roles/cloudkms.cryptoKeyEncrypterDecrypter)",
        ),
        Code::Unauthenticated => (
            K::Unauthenticated,
            "Cloud KMS rejected keybroker's credentials",
        ),
        Code::ResourceExhausted => (K::Throttled, "Cloud KMS quota exhausted or rate limited"),
        Code::InvalidArgument if op == Op::Decrypt => (
            K::InvalidCiphertext,
            "the wrapped key does not decrypt under this key and context",
        ),
        Code::InvalidArgument => (
            K::InvalidArgument,
            "Cloud KMS rejected the request as invalid",
        ),
        Code::Unavailable | Code::Cancelled | Code::Aborted | Code::Internal => {
            (K::Unavailable, "Cloud KMS is unreachable or unavailable")
        }
        Code::DeadlineExceeded => (
            K::DeadlineExceeded,
            "Cloud KMS did not answer within the deadline",
        ),
        _ => match credentials_error(s) {
            Some(true) => (
                K::Unavailable,
                "Google credentials are temporarily unavailable",
            ),
            Some(false) => (
                K::Unauthenticated,
                "no usable Google credentials (Application Default Credentials)",
            ),
            None => (K::Internal, "unexpected Cloud KMS response"),
        },
    }
}

/// Cloud KMS answers INVALID_ARGUMENT "The checksum in field X did not match the data in field
/// Y." when a request checksum does not match what it received: corruption on the way there.
fn is_checksum_rejection(s: &tonic::Status) -> bool {
    s.code() == Code::InvalidArgument && s.message().starts_with("The checksum in field")
}

/// When the call failed because no token could be had: `Some(transient)`.
fn credentials_error(s: &tonic::Status) -> Option<bool> {
    use gcloud_sdk::error::{Error, ErrorKind};
    let mut cur: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(s);
    let mut depth = 0;
    while let Some(e) = cur {
        let sdk = e
            .downcast_ref::<Error>()
            .or_else(|| e.downcast_ref::<Box<Error>>().map(|b| &**b));
        if let Some(sdk) = sdk {
            return match sdk.kind() {
                ErrorKind::Credentials(c) => Some(c.is_transient()),
                ErrorKind::CredentialsBuild(_) | ErrorKind::CryptoProviderMissing => Some(false),
                _ => None,
            };
        }
        depth += 1;
        if depth > 16 {
            break;
        }
        cur = e.source();
    }
    None
}

/// Exponential backoff with up to 50% random jitter: 100 ms, 200 ms, 400 ms ... capped at 2 s.
fn backoff(attempt: u32) -> Duration {
    let base = BACKOFF_BASE
        .saturating_mul(1 << attempt.saturating_sub(1).min(8))
        .min(BACKOFF_MAX);
    let mut b = [0u8; 1];
    let jitter = if random_fill(&mut b).is_ok() {
        b[0] as u32
    } else {
        0
    };
    base + base.mul_f64(jitter as f64 / 512.0)
}

/// CRC32C (Castagnoli, reflected polynomial 0x82F63B78), as Cloud KMS's `*_crc32c` fields use.
/// A byte-wise table is plenty for what we checksum (a data key, a wrapped key, a short AAD),
/// and keeps a dependency (and its build script) out; the unit tests pin it to RFC 3720's
/// vectors and the fidelity test to Google's own `google-crc32c`.
pub fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc = CRC32C_TABLE[((crc ^ b as u32) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

const CRC32C_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0x82F6_3B78
            } else {
                c >> 1
            };
            k += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use std::path::Path;

    #[test]
    fn crc32c_matches_rfc3720_vectors() {
        assert_eq!(crc32c(b""), 0);
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
        assert_eq!(crc32c(&[0xffu8; 32]), 0x62A8_AB43);
        let ascending: Vec<u8> = (0u8..32).collect();
        assert_eq!(crc32c(&ascending), 0x46DD_794E);
        let descending: Vec<u8> = (0u8..32).rev().collect();
        assert_eq!(crc32c(&descending), 0x113F_DB5C);
    }

    /// The example in docs/gcp.md ("The AAD keybroker sends"), pinned to the encoder.
    #[test]
    fn documented_aad_example() {
        let ctx = BackendContext {
            key_name: "prod-app-data",
            caller: "anonymous",
        };
        let hex: String = ctx.to_aad().iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "000200106b657962726f6b65723a63616c6c65720009616e6f6e796d6f7573\
             000d6b657962726f6b65723a6b6579000d70726f642d6170702d64617461"
        );
    }

    #[test]
    fn key_names() {
        let ok = "projects/my-proj/locations/europe-west1/keyRings/ring_1/cryptoKeys/app-data";
        assert_eq!(check_crypto_key_name(ok), Ok(()));
        assert!(
            check_crypto_key_name(
                "projects/example.com:p/locations/global/keyRings/r/cryptoKeys/k"
            )
            .is_ok()
        );
        for bad in [
            "",
            "app-data",
            "projects/p/locations/global/keyRings/r",
            "projects/p/locations/global/keyRings/r/cryptoKeys/",
            "projects/p/locations/global/keyRings/r/cryptoKeys/k/",
            "projects/p/locations/global/keyrings/r/cryptoKeys/k",
            "projects/p/locations/global/keyRings/r r/cryptoKeys/k",
            "projects/p/locations/global/keyRings/r/cryptoKeys/k.1",
        ] {
            assert!(check_crypto_key_name(bad).is_err(), "{bad:?} accepted");
        }
        let version = format!("{ok}/cryptoKeyVersions/3");
        let e = check_crypto_key_name(&version).unwrap_err();
        assert!(e.contains("CryptoKeyVersion"), "{e}");
    }

    #[test]
    fn endpoints() {
        assert!(check_endpoint("https://cloudkms.googleapis.com").is_ok());
        assert!(check_endpoint("https://europe-west1-cloudkms.googleapis.com:443/").is_ok());
        assert!(check_endpoint("http://127.0.0.1:9999").is_ok());
        assert!(check_endpoint("http://[::1]:9999").is_ok());
        assert!(check_endpoint("http://localhost:1").is_ok());
        assert!(check_endpoint("http://cloudkms.googleapis.com").is_err());
        assert!(check_endpoint("http://10.0.0.1:80").is_err());
        assert!(check_endpoint("ftp://x").is_err());
        assert!(check_endpoint("https://x/v1/path").is_err());
        assert!(check_endpoint("cloudkms.googleapis.com").is_err());
    }

    fn parse(text: &str) -> Result<Config, crate::config::ConfigError> {
        Config::parse(text, "test.toml", Path::new("/etc/kb"))
    }

    #[test]
    fn config_defaults_and_overrides() {
        let c = parse(
            r#"
            [keys.app]
            backend = "gcp"
            key_id = "projects/p/locations/global/keyRings/r/cryptoKeys/k"
            "#,
        )
        .unwrap();
        assert_eq!(
            c.keys["app"].backend,
            BackendConfig::Gcp {
                key_id: "projects/p/locations/global/keyRings/r/cryptoKeys/k".into(),
                endpoint: None
            }
        );
        assert_eq!(c.gcp.endpoint, DEFAULT_ENDPOINT);
        assert_eq!(c.gcp.deadline, DEFAULT_DEADLINE);
        assert_eq!(c.gcp.retries, DEFAULT_RETRIES);
        assert!(matches!(
            c.gcp.credentials,
            GcpCredentials::ApplicationDefault
        ));

        let c = parse(
            r#"
            [gcp]
            endpoint = "https://europe-west1-cloudkms.googleapis.com/"
            deadline = "2s"
            retries = 0
            connect_timeout = "1s"
            [keys.app]
            backend = "gcp"
            key_id = "projects/p/locations/europe-west1/keyRings/r/cryptoKeys/k"
            endpoint = "http://127.0.0.1:8443"
            "#,
        )
        .unwrap();
        assert_eq!(
            c.gcp.endpoint,
            "https://europe-west1-cloudkms.googleapis.com"
        );
        assert_eq!(c.gcp.deadline, Duration::from_secs(2));
        assert_eq!(c.gcp.retries, 0);
        assert_eq!(c.gcp.connect_timeout, Duration::from_secs(1));
        assert!(matches!(
            &c.keys["app"].backend,
            BackendConfig::Gcp { endpoint: Some(e), .. } if e == "http://127.0.0.1:8443"
        ));
    }

    #[test]
    fn config_problems_have_paths() {
        let err = parse(
            r#"
            [gcp]
            endpoint = "http://kms.example.com"
            deadline = "0s"
            retries = 99
            credentials = "fake"
            [keys.a]
            backend = "gcp"
            key_id = "projects/p/locations/global/keyRings/r/cryptoKeys/k/cryptoKeyVersions/1"
            [keys.b]
            backend = "gcp"
            key_id = "my-key"
            endpoint = "ftp://x"
            keyring = "x"
            "#,
        )
        .unwrap_err();
        let text: Vec<String> = err.problems.iter().map(|p| p.to_string()).collect();
        let has = |s: &str| text.iter().any(|t| t.starts_with(s));
        assert!(
            has("gcp.endpoint: \"http://kms.example.com\": plain http"),
            "{text:#?}"
        );
        assert!(has("gcp.deadline: must be"), "{text:#?}");
        assert!(has("gcp.retries: must be 0 to 10"), "{text:#?}");
        // No configuration text can select anything but Application Default Credentials.
        assert!(has("gcp.credentials: unknown field"), "{text:#?}");
        assert!(
            has("keys.a.key_id: ") && text.iter().any(|t| t.contains("CryptoKeyVersion")),
            "{text:#?}"
        );
        assert!(
            has("keys.b.key_id: \"my-key\" is not a Cloud KMS key name"),
            "{text:#?}"
        );
        assert!(has("keys.b.endpoint: \"ftp://x\""), "{text:#?}");
        assert!(has("keys.b.keyring: unknown field"), "{text:#?}");
        assert_eq!(text.len(), 8, "{text:#?}");
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        assert!(backoff(1) >= BACKOFF_BASE && backoff(1) <= BACKOFF_BASE * 3 / 2);
        assert!(backoff(3) >= BACKOFF_BASE * 4);
        assert!(backoff(30) <= BACKOFF_MAX * 3 / 2);
    }

    #[tokio::test]
    async fn https_endpoint_sets_up_without_network() {
        let settings = GcpSettings {
            credentials: GcpCredentials::Custom(
                gcloud_sdk::google_cloud_auth::credentials::anonymous::Builder::new().build(),
            ),
            ..GcpSettings::default()
        };
        let client = GcpClient::connect(DEFAULT_ENDPOINT, &settings)
            .await
            .unwrap();
        assert_eq!(client.endpoint(), DEFAULT_ENDPOINT);
        let b = GcpBackend::new(
            client,
            "projects/p/locations/global/keyRings/r/cryptoKeys/k",
        )
        .unwrap();
        assert!(b.is_own_version(
            "projects/p/locations/global/keyRings/r/cryptoKeys/k/cryptoKeyVersions/12"
        ));
        assert!(!b.is_own_version(
            "projects/p/locations/global/keyRings/r/cryptoKeys/k/cryptoKeyVersions/"
        ));
        assert!(!b.is_own_version(
            "projects/p/locations/global/keyRings/r/cryptoKeys/k2/cryptoKeyVersions/1"
        ));
        assert!(!b.is_own_version(
            "projects/p/locations/global/keyRings/r/cryptoKeys/k/cryptoKeyVersions/1/x"
        ));
    }
}

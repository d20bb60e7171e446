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
use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use gcloud_sdk::google::cloud::kms::v1::CryptoKey;
use gcloud_sdk::google::cloud::kms::v1::crypto_key::{CryptoKeyPurpose, RotationSchedule};
use gcloud_sdk::google::cloud::kms::v1::crypto_key_version::CryptoKeyVersionState;
use gcloud_sdk::google::cloud::kms::v1::key_management_service_client::KeyManagementServiceClient;
use gcloud_sdk::google::cloud::kms::v1::{DecryptRequest, GetCryptoKeyRequest};
use gcloud_sdk::proto_ext::kms::EncryptRequest;
use gcloud_sdk::{GoogleAuthHeaders, GoogleAuthMiddleware, GoogleAuthMiddlewareLayer, SecretValue};
use tonic::Code;
use tonic::transport::{ClientTlsConfig, Endpoint};

use super::call::{CallError, CallPolicy};
use super::{
    BackendContext, BackendError, BackendErrorKind, BackendKind, KeyBackend, KeyDescription,
    Lifecycle, Wrapped,
};
use crate::envelope::{FormatError, MAX_WRAPPED_LEN, WrappedCopy};
use crate::secret::SecretKey;
use crate::util::format_duration;

mod crc32c;
mod error;
mod settings;

pub use crc32c::crc32c;
use error::{Failure, Op};
pub use settings::{
    DEFAULT_ATTEMPT_TIMEOUT, DEFAULT_CALL, DEFAULT_CONNECT_TIMEOUT, DEFAULT_ENDPOINT,
    DEFAULT_MAX_ATTEMPTS, GcpCredentials, GcpSettings, check_crypto_key_name, check_endpoint,
    key_config,
};

/// The narrowest OAuth scope that covers Encrypt, Decrypt and GetCryptoKey.
pub const OAUTH_SCOPE: &str = "https://www.googleapis.com/auth/cloudkms";

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
    call: CallPolicy,
}

impl std::fmt::Debug for GcpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GcpClient")
            .field("endpoint", &self.endpoint)
            .field("call", &self.call)
            .finish()
    }
}

impl GcpClient {
    /// Sets up a client for `endpoint` with `settings`' call policy and credentials. The
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
        tracing::info!(endpoint, credentials = source,
            timeout = %format_duration(settings.call.timeout),
            attempt_timeout = %format_duration(settings.call.attempt_timeout),
            max_attempts = settings.call.max_attempts, "Cloud KMS client ready (connects on first use)");
        Ok(Arc::new(Self {
            endpoint: endpoint.to_owned(),
            kms: KeyManagementServiceClient::new(service),
            call: settings.call,
        }))
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }
}

/// The Cloud KMS clients of one registry: one per endpoint (credentials are process-wide).
pub struct GcpClients {
    settings: GcpSettings,
    clients: HashMap<String, Arc<GcpClient>>,
}

impl GcpClients {
    pub fn new(settings: GcpSettings) -> Self {
        Self {
            settings,
            clients: HashMap::new(),
        }
    }

    /// The backend for CryptoKey `key_id`, on `endpoint` (else `[gcp] endpoint`).
    pub async fn backend(
        &mut self,
        key_id: &str,
        endpoint: Option<&str>,
    ) -> Result<GcpBackend, String> {
        let endpoint = endpoint.unwrap_or(&self.settings.endpoint);
        let client = match self.clients.get(endpoint) {
            Some(c) => Arc::clone(c),
            None => {
                let c = GcpClient::connect(endpoint, &self.settings)
                    .await
                    .map_err(|e| format!("Cloud KMS client: {e}"))?;
                self.clients.insert(endpoint.to_owned(), Arc::clone(&c));
                c
            }
        };
        GcpBackend::new(client, key_id)
    }
}

/// A configured key backed by one Cloud KMS CryptoKey.
pub struct GcpBackend {
    client: Arc<GcpClient>,
    /// `projects/P/locations/L/keyRings/R/cryptoKeys/K`.
    key: String,
    /// `<key>/cryptoKeyVersions/`: every version this backend may record or decrypt under.
    version_prefix: String,
    /// The CryptoKey's rotation state as Cloud KMS last reported it (`refresh_lifecycle`).
    lifecycle: Mutex<Option<Lifecycle>>,
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
            lifecycle: Mutex::new(None),
        })
    }

    /// GetCryptoKey on the configured key (needs `cloudkms.cryptoKeys.get`).
    async fn get_crypto_key(&self) -> Result<CryptoKey, BackendError> {
        self.call(Op::GetCryptoKey, |limit| {
            let mut kms = self.client.kms.clone();
            let req = self.request(
                GetCryptoKeyRequest {
                    name: self.key.clone(),
                },
                limit,
            );
            async move {
                Ok(kms
                    .get_crypto_key(req)
                    .await
                    .map_err(Failure::Status)?
                    .into_inner())
            }
        })
        .await
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
            .and_then(super::canonical_decimal)
            .is_some()
    }

    /// Per-call metadata: the deadline (sent as `grpc-timeout`) and the routing header Google's
    /// own clients send so the request reaches the key's region.
    fn request<T>(&self, message: T, limit: Duration) -> tonic::Request<T> {
        let mut req = tonic::Request::new(message);
        req.set_timeout(limit);
        if let Ok(v) = format!("name={}", self.key).parse() {
            req.metadata_mut().insert("x-goog-request-params", v);
        }
        req
    }

    /// Runs one Cloud KMS call under the client's call policy (each attempt gets its time
    /// limit, sent as `grpc-timeout`), and maps the final failure.
    async fn call<T, F, Fut>(&self, op: Op, mut attempt: F) -> Result<T, BackendError>
    where
        F: FnMut(Duration) -> Fut,
        Fut: Future<Output = Result<T, Failure>>,
    {
        let result = self
            .client
            .call
            .run(
                op.as_str(),
                |limit| {
                    let started = tokio::time::Instant::now();
                    let fut = attempt(limit);
                    async move {
                        match fut.await {
                            // The server enforces the `grpc-timeout` we send too, and may win
                            // the race (some servers report it as CANCELLED): the attempt's
                            // limit passed either way.
                            Err(Failure::Status(s))
                                if matches!(s.code(), Code::Cancelled | Code::DeadlineExceeded)
                                    && started.elapsed() >= limit =>
                            {
                                Err(Failure::Timeout(limit))
                            }
                            other => other,
                        }
                    }
                },
                Failure::retry,
            )
            .await;
        result.map_err(|e| {
            let failure = match e {
                CallError::Failed(f) => f,
                CallError::TimedOut(limit) => Failure::Timeout(limit),
            };
            let e = failure.into_backend_error(op);
            tracing::debug!(key = %self.key, op = op.as_str(), error = ?e, "Cloud KMS call failed");
            e
        })
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
            Some(id) if copy.key_id == self.key && super::canonical_decimal(id).is_none() => {
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
        self.call(Op::Encrypt, |limit| {
            let mut kms = self.client.kms.clone();
            let req = self.request(
                EncryptRequest {
                    name: self.key.clone(),
                    plaintext: SecretValue::new(key.as_ref().to_vec()),
                    additional_authenticated_data: aad.clone(),
                    plaintext_crc32c: Some(plaintext_crc.into()),
                    additional_authenticated_data_crc32c: Some(aad_crc.into()),
                },
                limit,
            );
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
        self.call(Op::Decrypt, |limit| {
            let mut kms = self.client.kms.clone();
            let req = self.request(
                DecryptRequest {
                    name: self.key.clone(),
                    ciphertext: copy.wrapped.to_vec(),
                    additional_authenticated_data: aad.clone(),
                    ciphertext_crc32c: Some(ciphertext_crc.into()),
                    additional_authenticated_data_crc32c: Some(aad_crc.into()),
                },
                limit,
            );
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
        let key = self.get_crypto_key().await?;
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

    fn lifecycle(&self) -> Option<Lifecycle> {
        match self.lifecycle.lock() {
            Ok(l) => l.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// GetCryptoKey: `rotation_period`, `next_rotation_time`, and the primary version's name
    /// and `create_time` (its age). One call; a key without a schedule shows none.
    async fn refresh_lifecycle(&self) -> Result<(), BackendError> {
        let key = self.get_crypto_key().await?;
        let l = lifecycle_of(&key);
        match self.lifecycle.lock() {
            Ok(mut g) => *g = Some(l),
            Err(p) => *p.into_inner() = Some(l),
        }
        Ok(())
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// A protobuf Timestamp as a time, `None` if before 1970 or out of range.
fn system_time(t: &gcloud_sdk::prost_types::Timestamp) -> Option<SystemTime> {
    let secs = u64::try_from(t.seconds).ok()?;
    let nanos = u32::try_from(t.nanos).ok().filter(|n| *n < 1_000_000_000)?;
    UNIX_EPOCH.checked_add(Duration::new(secs, nanos))
}

/// What a CryptoKey says about its rotation. A zero or negative `rotation_period` (Cloud KMS
/// never sends one) counts as none; `next_rotation_time` is shown even without a period (a
/// one-off scheduled rotation).
fn lifecycle_of(key: &CryptoKey) -> Lifecycle {
    let rotation_period = match &key.rotation_schedule {
        Some(RotationSchedule::RotationPeriod(d)) => u64::try_from(d.seconds)
            .ok()
            .filter(|s| *s > 0)
            .map(Duration::from_secs),
        None => None,
    };
    Lifecycle {
        source: "gcp",
        primary_version: key.primary.as_ref().map(|v| v.name.clone()),
        primary_created: key
            .primary
            .as_ref()
            .and_then(|v| v.create_time.as_ref())
            .and_then(system_time),
        rotation_period,
        next_rotation: key.next_rotation_time.as_ref().and_then(system_time),
        min_decrypt_version: None,
        delete_after: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn lifecycle_of_odd_crypto_keys() {
        use gcloud_sdk::prost_types::{Duration as PbDuration, Timestamp};
        let empty = lifecycle_of(&CryptoKey::default());
        assert_eq!(
            (empty.source, empty.rotation_period, empty.next_rotation),
            ("gcp", None, None)
        );
        let key = CryptoKey {
            rotation_schedule: Some(RotationSchedule::RotationPeriod(PbDuration {
                seconds: -5,
                nanos: 0,
            })),
            next_rotation_time: Some(Timestamp {
                seconds: -1,
                nanos: 0,
            }),
            primary: Some(gcloud_sdk::google::cloud::kms::v1::CryptoKeyVersion {
                name: "v".into(),
                create_time: Some(Timestamp {
                    seconds: i64::MAX,
                    nanos: -1,
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let l = lifecycle_of(&key);
        assert_eq!(
            (l.rotation_period, l.next_rotation, l.primary_created),
            (None, None, None)
        );
        assert_eq!(l.primary_version.as_deref(), Some("v"));
        let key = CryptoKey {
            rotation_schedule: Some(RotationSchedule::RotationPeriod(PbDuration {
                seconds: 90 * 86_400,
                nanos: 0,
            })),
            next_rotation_time: Some(Timestamp {
                seconds: 1_800_000_000,
                nanos: 5,
            }),
            ..Default::default()
        };
        let l = lifecycle_of(&key);
        assert_eq!(l.rotation_period, Some(Duration::from_secs(90 * 86_400)));
        assert_eq!(
            l.next_rotation,
            Some(UNIX_EPOCH + Duration::new(1_800_000_000, 5))
        );
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

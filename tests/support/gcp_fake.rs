//! A Cloud KMS fake: a loopback `google.cloud.kms.v1.KeyManagementService` gRPC server that
//! behaves like Cloud KMS for what keybroker uses, held to Google's own Python client by
//! `tests/fidelity/gcp_kms_client.py`.
//!
//! - Encrypt / Decrypt really encrypt: AES-256-GCM under a random 256-bit key per
//!   CryptoKeyVersion. A ciphertext names the key (a random per-key tag) and the version that made
//!   it, so Decrypt on the CryptoKey finds the version, like Cloud KMS; AAD is enforced.
//! - CRC32C as the service does it: request checksums are verified (a mismatch is
//!   INVALID_ARGUMENT "The checksum in field X did not match the data in field Y."), `verified_*`
//!   say which were checked, and responses carry `ciphertext_crc32c` / `plaintext_crc32c`.
//! - Version states: only ENABLED versions encrypt or decrypt; others give FAILED_PRECONDITION
//!   "<version> is not enabled, current state is: <STATE>." (with a PreconditionFailure detail
//!   of type KEY_DISABLED for a disabled one). Rotation is CreateCryptoKeyVersion +
//!   UpdateCryptoKeyPrimaryVersion.
//! - Rotation schedule: a CryptoKey may carry `rotation_period` (a Duration, 24h to 876,000h)
//!   and `next_rotation_time` (a Timestamp; required with a period), set by CreateCryptoKey or
//!   [`GcpKmsFake::set_rotation`], and GetCryptoKey returns them with the primary version and
//!   its `create_time`, as Cloud KMS does. The fake does not rotate on schedule itself.
//! - A call without `authorization: Bearer ...` gets UNAUTHENTICATED with Google's wording.
//! - Error wording for bad ciphertexts follows what Cloud KMS is publicly reported to say
//!   ("Decryption failed: the ciphertext is invalid." / "Decryption failed: verify that 'name'
//!   refers to the correct CryptoKey."). Unlike Cloud KMS, a missing key is NOT_FOUND even for a
//!   caller without IAM on it (IAM is not modelled).
//! - Test hooks: direct key administration, per-method call counters, a log of each call's auth
//!   and routing headers, a switch that corrupts the CRC32C of responses, injected failures and
//!   an artificial delay.
//!
//! It must never listen beyond 127.0.0.1, and stops when dropped.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use gcloud_sdk::google::cloud::kms::v1 as kms;
use gcloud_sdk::google::cloud::kms::v1::crypto_key::{CryptoKeyPurpose, RotationSchedule};
use gcloud_sdk::google::cloud::kms::v1::crypto_key_version::{
    CryptoKeyVersionAlgorithm, CryptoKeyVersionState as State,
};
use gcloud_sdk::google_cloud_auth::credentials::{
    CacheableResource, Credentials, CredentialsProvider, EntityTag,
};
use gcloud_sdk::google_cloud_auth::errors::CredentialsError;
use gcloud_sdk::prost_types::{Duration as PbDuration, Timestamp};
use gcloud_sdk::proto_ext::kms::{DecryptResponse, EncryptRequest};
use gcloud_sdk::{HeaderMap, SecretValue};
use keybroker::backend::gcp::crc32c;
use tokio::sync::oneshot;
use tonic::codegen::http::Extensions;
use tonic::{Code, Request, Response, Status};
use tonic_types::{ErrorDetails, StatusExt};

#[allow(clippy::all, clippy::pedantic, unused_qualifications, missing_docs)]
mod generated {
    include!(concat!(
        env!("OUT_DIR"),
        "/google.cloud.kms.v1.KeyManagementService.rs"
    ));
}
use generated::key_management_service_server::{KeyManagementService, KeyManagementServiceServer};

/// The bearer token the fake's credentials send (any non-empty token is accepted unless a test
/// calls [`GcpKmsFake::require_token`]).
pub const TEST_TOKEN: &str = "fake-gcp-access-token";

const MISSING_CREDENTIALS: &str = "Request is missing required authentication credential. \
    Expected OAuth 2 access token, login cookie or other valid authentication credential. \
    See https://developers.google.com/identity/sign-in/web/devconsole-project.";
const INVALID_CREDENTIALS: &str = "Request had invalid authentication credentials. \
    Expected OAuth 2 access token, login cookie or other valid authentication credential. \
    See https://developers.google.com/identity/sign-in/web/devconsole-project.";
const CIPHERTEXT_INVALID: &str = "Decryption failed: the ciphertext is invalid.";
const WRONG_KEY: &str = "Decryption failed: verify that 'name' refers to the correct CryptoKey.";
/// Cloud KMS's limit for SOFTWARE keys, for plaintext and for AAD.
const MAX_DATA: usize = 64 * 1024;

/// Ciphertext layout: format byte, key tag, version id, nonce, AES-256-GCM output.
const CT_FORMAT: u8 = 1;
const CT_HEADER: usize = 1 + 8 + 4;
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;

/// Credentials that send `Authorization: Bearer <token>`: the custom credential hook
/// (`GcpCredentials::Custom`) the tests hand to keybroker.
#[derive(Debug)]
pub struct StaticToken(pub String);

impl CredentialsProvider for StaticToken {
    async fn headers(
        &self,
        _extensions: Extensions,
    ) -> Result<CacheableResource<HeaderMap>, CredentialsError> {
        let mut headers = HeaderMap::new();
        let value = format!("Bearer {}", self.0)
            .parse()
            .map_err(|_| CredentialsError::from_msg(false, "token is not a header value"))?;
        headers.insert("authorization", value);
        Ok(CacheableResource::New {
            entity_tag: EntityTag::new(),
            data: headers,
        })
    }

    async fn universe_domain(&self) -> Option<String> {
        Some("googleapis.com".to_owned())
    }
}

/// Credentials whose token fetch fails, as ADC does when the metadata server or STS refuses
/// (`transient`: it may work on retry).
#[derive(Debug)]
pub struct FailingToken {
    pub transient: bool,
}

impl CredentialsProvider for FailingToken {
    async fn headers(
        &self,
        _extensions: Extensions,
    ) -> Result<CacheableResource<HeaderMap>, CredentialsError> {
        Err(CredentialsError::from_msg(
            self.transient,
            "token endpoint said no (test)",
        ))
    }

    async fn universe_domain(&self) -> Option<String> {
        Some("googleapis.com".to_owned())
    }
}

/// Credentials with [`TEST_TOKEN`].
pub fn credentials() -> Credentials {
    Credentials::from(StaticToken(TEST_TOKEN.to_owned()))
}

/// One call as the fake saw it.
#[derive(Debug, Clone)]
pub struct CallRecord {
    pub method: &'static str,
    pub authorization: Option<String>,
    pub request_params: Option<String>,
}

struct Version {
    state: State,
    /// None once destroyed.
    material: Option<[u8; 32]>,
    create_time: Timestamp,
}

struct Key {
    tag: [u8; 8],
    versions: BTreeMap<u32, Version>,
    primary: Option<u32>,
    create_time: Timestamp,
    rotation_period: Option<PbDuration>,
    next_rotation_time: Option<Timestamp>,
}

struct Fault {
    method: &'static str,
    code: Code,
    message: String,
    remaining: u32,
}

#[derive(Default)]
struct Inner {
    rings: BTreeMap<String, ()>,
    keys: BTreeMap<String, Key>,
    calls: HashMap<&'static str, u64>,
    log: Vec<CallRecord>,
    faults: Vec<Fault>,
    /// Responses whose CRC32C is still to be corrupted (u32::MAX: all).
    corrupt: u32,
    delay: Duration,
    required_token: Option<String>,
}

#[derive(Default)]
struct Shared(Mutex<Inner>);

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        match self.0.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }
}

/// A running fake on 127.0.0.1:<ephemeral>.
pub struct GcpKmsFake {
    shared: Arc<Shared>,
    pub addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
}

impl Drop for GcpKmsFake {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

impl GcpKmsFake {
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared::default());
        let (tx, rx) = oneshot::channel::<()>();
        let service = KeyManagementServiceServer::new(FakeService(Arc::clone(&shared)));
        tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::TcpListenerStream::new(listener),
                    async {
                        let _ = rx.await;
                    },
                )
                .await;
        });
        Self {
            shared,
            addr,
            shutdown: Some(tx),
        }
    }

    /// The endpoint to configure (`[gcp] endpoint`).
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Creates key ring `projects/<project>/locations/<location>/keyRings/<ring>` if needed and
    /// an ENCRYPT_DECRYPT key in it with version 1 as primary; returns the CryptoKey name.
    pub fn create_key(&self, ring: &str, key_id: &str) -> String {
        let mut g = self.shared.lock();
        g.rings.insert(ring.to_owned(), ());
        let name = format!("{ring}/cryptoKeys/{key_id}");
        assert!(!g.keys.contains_key(&name), "{name} exists");
        g.keys.insert(name.clone(), new_key(true));
        name
    }

    /// A fresh key under a test-unique ring, for tests that share nothing.
    pub fn create_test_key(&self, key_id: &str) -> String {
        self.create_key(
            "projects/keybroker-test/locations/global/keyRings/tests",
            key_id,
        )
    }

    /// Adds an ENABLED version (not primary); returns its name.
    pub fn add_version(&self, key: &str) -> String {
        let mut g = self.shared.lock();
        let k = g.keys.get_mut(key).expect("no such key");
        let id = add_version(k);
        version_name(key, id)
    }

    pub fn set_primary(&self, version: &str) {
        let (key, id) = parse_version_name(version).expect("not a version name");
        let mut g = self.shared.lock();
        let k = g.keys.get_mut(&key).expect("no such key");
        assert!(k.versions.contains_key(&id));
        k.primary = Some(id);
    }

    /// Rotation: a new version, made primary. Returns its name.
    pub fn rotate(&self, key: &str) -> String {
        let v = self.add_version(key);
        self.set_primary(&v);
        v
    }

    /// Sets the key's rotation schedule (`None`: no automatic rotation), as
    /// `gcloud kms keys update --rotation-period --next-rotation-time` does.
    pub fn set_rotation(&self, key: &str, period: Option<Duration>, next: Option<SystemTime>) {
        let mut g = self.shared.lock();
        let k = g.keys.get_mut(key).expect("no such key");
        k.rotation_period = period.map(|p| PbDuration {
            seconds: p.as_secs() as i64,
            nanos: 0,
        });
        k.next_rotation_time = next.map(timestamp);
    }

    /// Back-dates (or forward-dates) a version's `create_time`.
    pub fn set_created(&self, version: &str, at: SystemTime) {
        self.with_version(version, |v| v.create_time = timestamp(at));
    }

    /// Runs `f` on the version named `version` (a full `…/cryptoKeyVersions/N` name).
    fn with_version(&self, version: &str, f: impl FnOnce(&mut Version)) {
        let (key, id) = parse_version_name(version).expect("not a version name");
        let mut g = self.shared.lock();
        let v = g
            .keys
            .get_mut(&key)
            .and_then(|k| k.versions.get_mut(&id))
            .expect("no such version");
        f(v);
    }

    pub fn primary(&self, key: &str) -> Option<String> {
        let g = self.shared.lock();
        g.keys[key].primary.map(|id| version_name(key, id))
    }

    pub fn set_state(&self, version: &str, state: State) {
        self.with_version(version, |v| {
            v.state = state;
            if state == State::Destroyed {
                v.material = None;
            }
        });
    }

    pub fn disable(&self, version: &str) {
        self.set_state(version, State::Disabled);
    }

    pub fn enable(&self, version: &str) {
        self.set_state(version, State::Enabled);
    }

    /// Destroys a version at once (Cloud KMS does after the scheduled duration): the key
    /// material is gone.
    pub fn destroy_now(&self, version: &str) {
        self.set_state(version, State::Destroyed);
    }

    /// Calls received for `method` ("Encrypt", "Decrypt", "GetCryptoKey", ...), answered or not.
    pub fn calls(&self, method: &str) -> u64 {
        self.shared.lock().calls.get(method).copied().unwrap_or(0)
    }

    /// A reader of [`Self::calls`] for `method` that outlives this borrow.
    pub fn counter(&self, method: &'static str) -> impl Fn() -> u64 + Send + Sync + 'static {
        let shared = Arc::clone(&self.shared);
        move || shared.lock().calls.get(method).copied().unwrap_or(0)
    }

    /// Drops every failure [`Self::fail_next`] still has to inject.
    pub fn clear_faults(&self) {
        self.shared.lock().faults.clear();
    }

    pub fn call_log(&self) -> Vec<CallRecord> {
        self.shared.lock().log.clone()
    }

    pub fn reset_counters(&self) {
        let mut g = self.shared.lock();
        g.calls.clear();
        g.log.clear();
    }

    /// Corrupts the CRC32C field of the next `n` Encrypt/Decrypt responses (`u32::MAX`: all).
    pub fn corrupt_crc(&self, n: u32) {
        self.shared.lock().corrupt = n;
    }

    /// The next `times` calls of `method` fail with `code` and `message` (after auth).
    pub fn fail_next(&self, method: &'static str, code: Code, message: &str, times: u32) {
        self.shared.lock().faults.push(Fault {
            method,
            code,
            message: message.to_owned(),
            remaining: times,
        });
    }

    /// Every call waits this long before answering.
    pub fn set_delay(&self, delay: Duration) {
        self.shared.lock().delay = delay;
    }

    /// Only `Bearer <token>` is accepted from now on.
    pub fn require_token(&self, token: &str) {
        self.shared.lock().required_token = Some(token.to_owned());
    }

    /// The version id a fake ciphertext names.
    pub fn version_of(ciphertext: &[u8]) -> Option<u32> {
        (ciphertext.len() >= CT_HEADER && ciphertext[0] == CT_FORMAT)
            .then(|| u32::from_be_bytes(ciphertext[9..13].try_into().unwrap()))
    }
}

fn random<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    aws_lc_rs::rand::fill(&mut b).unwrap();
    b
}

fn timestamp(t: SystemTime) -> Timestamp {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

fn new_key(with_version: bool) -> Key {
    let mut k = Key {
        tag: random(),
        versions: BTreeMap::new(),
        primary: None,
        create_time: timestamp(SystemTime::now()),
        rotation_period: None,
        next_rotation_time: None,
    };
    if with_version {
        let id = add_version(&mut k);
        k.primary = Some(id);
    }
    k
}

fn add_version(k: &mut Key) -> u32 {
    let id = k.versions.keys().next_back().map_or(1, |n| n + 1);
    k.versions.insert(
        id,
        Version {
            state: State::Enabled,
            material: Some(random()),
            create_time: timestamp(SystemTime::now()),
        },
    );
    id
}

fn version_name(key: &str, id: u32) -> String {
    format!("{key}/cryptoKeyVersions/{id}")
}

fn valid_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// `projects/P/locations/L/keyRings/R/cryptoKeys/K` → true.
fn is_key_name(s: &str) -> bool {
    let p: Vec<&str> = s.split('/').collect();
    p.len() == 8
        && p[0] == "projects"
        && p[2] == "locations"
        && p[4] == "keyRings"
        && p[6] == "cryptoKeys"
        && [p[1], p[3], p[5], p[7]].iter().all(|s| !s.is_empty())
}

fn parse_version_name(s: &str) -> Option<(String, u32)> {
    let (key, id) = s.rsplit_once("/cryptoKeyVersions/")?;
    let id: u32 = id.parse().ok()?;
    is_key_name(key).then(|| (key.to_owned(), id))
}

fn state_name(s: State) -> &'static str {
    s.as_str_name()
        .strip_prefix("CRYPTO_KEY_VERSION_STATE_")
        .unwrap_or(s.as_str_name())
}

fn not_enabled(version: &str, state: State) -> Status {
    let message = format!(
        "{version} is not enabled, current state is: {}.",
        state_name(state)
    );
    if state == State::Disabled {
        Status::with_error_details(
            Code::FailedPrecondition,
            message,
            ErrorDetails::with_precondition_failure_violation(
                "KEY_DISABLED",
                version,
                "The key version is disabled.",
            ),
        )
    } else {
        Status::failed_precondition(message)
    }
}

fn checksum(
    field: &str,
    data_field: &str,
    given: Option<i64>,
    data: &[u8],
) -> Result<bool, Status> {
    match given {
        None => Ok(false),
        Some(c) if c == i64::from(crc32c(data)) => Ok(true),
        Some(_) => Err(Status::invalid_argument(format!(
            "The checksum in field {field} did not match the data in field {data_field}."
        ))),
    }
}

fn version_proto(key: &str, id: u32, v: &Version) -> kms::CryptoKeyVersion {
    kms::CryptoKeyVersion {
        name: version_name(key, id),
        state: v.state as i32,
        protection_level: kms::ProtectionLevel::Software as i32,
        algorithm: CryptoKeyVersionAlgorithm::GoogleSymmetricEncryption as i32,
        create_time: Some(v.create_time),
        ..Default::default()
    }
}

fn key_proto(name: &str, k: &Key) -> kms::CryptoKey {
    kms::CryptoKey {
        name: name.to_owned(),
        primary: k
            .primary
            .and_then(|id| k.versions.get(&id).map(|v| version_proto(name, id, v))),
        purpose: CryptoKeyPurpose::EncryptDecrypt as i32,
        version_template: Some(kms::CryptoKeyVersionTemplate {
            protection_level: kms::ProtectionLevel::Software as i32,
            algorithm: CryptoKeyVersionAlgorithm::GoogleSymmetricEncryption as i32,
        }),
        create_time: Some(k.create_time),
        next_rotation_time: k.next_rotation_time,
        rotation_schedule: k.rotation_period.map(RotationSchedule::RotationPeriod),
        ..Default::default()
    }
}

/// Cloud KMS's rules for a schedule on CreateCryptoKey: a period of 24h to 876,000h, and a
/// next rotation time whenever there is a period.
fn check_schedule(k: &kms::CryptoKey) -> Result<(), Status> {
    if let Some(RotationSchedule::RotationPeriod(p)) = &k.rotation_schedule {
        if p.seconds < 86_400 || p.seconds > 876_000 * 3600 || p.nanos != 0 {
            return Err(Status::invalid_argument(
                "rotation_period must be at least 24 hours and at most 876,000 hours.",
            ));
        }
        if k.next_rotation_time.is_none() {
            return Err(Status::invalid_argument(
                "next_rotation_time must be set if rotation_period is set.",
            ));
        }
    }
    Ok(())
}

fn not_found(name: &str) -> Status {
    Status::not_found(format!("{name} not found."))
}

fn aead(material: &[u8; 32]) -> LessSafeKey {
    LessSafeKey::new(UnboundKey::new(&AES_256_GCM, material).unwrap())
}

struct FakeService(Arc<Shared>);

impl FakeService {
    /// What every call goes through first: counting, the header log, authentication, injected
    /// faults and the artificial delay.
    async fn begin<T>(&self, method: &'static str, req: &Request<T>) -> Result<(), Status> {
        let header = |name: &str| {
            req.metadata()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let authorization = header("authorization");
        let delay = {
            let mut g = self.0.lock();
            *g.calls.entry(method).or_default() += 1;
            g.log.push(CallRecord {
                method,
                authorization: authorization.clone(),
                request_params: header("x-goog-request-params"),
            });
            let token = match authorization.as_deref().map(|a| a.strip_prefix("Bearer ")) {
                None => return Err(Status::unauthenticated(MISSING_CREDENTIALS)),
                Some(None) | Some(Some("")) => {
                    return Err(Status::unauthenticated(INVALID_CREDENTIALS));
                }
                Some(Some(t)) => t.to_owned(),
            };
            if g.required_token.as_deref().is_some_and(|r| r != token) {
                return Err(Status::unauthenticated(INVALID_CREDENTIALS));
            }
            if let Some(f) = g
                .faults
                .iter_mut()
                .find(|f| f.method == method && f.remaining > 0)
            {
                f.remaining -= 1;
                return Err(Status::new(f.code, f.message.clone()));
            }
            g.delay
        };
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        Ok(())
    }

    /// Whether this response's CRC32C is to be corrupted (consumes one from the switch).
    fn take_corruption(&self) -> bool {
        let mut g = self.0.lock();
        match g.corrupt {
            0 => false,
            u32::MAX => true,
            _ => {
                g.corrupt -= 1;
                true
            }
        }
    }
}

#[tonic::async_trait]
impl KeyManagementService for FakeService {
    async fn encrypt(
        &self,
        request: Request<EncryptRequest>,
    ) -> Result<Response<kms::EncryptResponse>, Status> {
        self.begin("Encrypt", &request).await?;
        let r = request.into_inner();
        let plaintext = r.plaintext.ref_sensitive_value();
        let aad = &r.additional_authenticated_data;
        if plaintext.is_empty() {
            return Err(Status::invalid_argument("plaintext is required."));
        }
        if plaintext.len() > MAX_DATA || aad.len() > MAX_DATA {
            return Err(Status::invalid_argument(
                "The plaintext and additional_authenticated_data must each be at most 65536 bytes.",
            ));
        }
        let verified_plaintext = checksum(
            "plaintext_crc32c",
            "plaintext",
            r.plaintext_crc32c,
            plaintext,
        )?;
        let verified_aad = checksum(
            "additional_authenticated_data_crc32c",
            "additional_authenticated_data",
            r.additional_authenticated_data_crc32c,
            aad,
        )?;
        let (key_name, explicit) = match parse_version_name(&r.name) {
            Some((k, id)) => (k, Some(id)),
            None if is_key_name(&r.name) => (r.name.clone(), None),
            None => {
                return Err(Status::invalid_argument(format!(
                    "Resource name [{}] does not match any known pattern.",
                    r.name
                )));
            }
        };
        let (version, ciphertext) = {
            let g = self.0.lock();
            let k = g.keys.get(&key_name).ok_or_else(|| not_found(&key_name))?;
            let id = match explicit.or(k.primary) {
                Some(id) => id,
                None => {
                    return Err(Status::failed_precondition(format!(
                        "{key_name} has no primary version."
                    )));
                }
            };
            let v = k
                .versions
                .get(&id)
                .ok_or_else(|| not_found(&version_name(&key_name, id)))?;
            let material = match (v.state, &v.material) {
                (State::Enabled, Some(m)) => m,
                (state, _) => return Err(not_enabled(&version_name(&key_name, id), state)),
            };
            let mut out = Vec::with_capacity(CT_HEADER + NONCE_LEN + plaintext.len() + TAG_LEN);
            out.push(CT_FORMAT);
            out.extend_from_slice(&k.tag);
            out.extend_from_slice(&id.to_be_bytes());
            let nonce: [u8; NONCE_LEN] = random();
            let mut sealed_aad = out.clone();
            sealed_aad.extend_from_slice(aad);
            out.extend_from_slice(&nonce);
            let mut body = plaintext.clone();
            aead(material)
                .seal_in_place_append_tag(
                    Nonce::assume_unique_for_key(nonce),
                    Aad::from(&sealed_aad[..]),
                    &mut body,
                )
                .map_err(|_| Status::internal("Internal error encountered."))?;
            out.extend_from_slice(&body);
            (version_name(&key_name, id), out)
        };
        let mut crc = crc32c(&ciphertext);
        if self.take_corruption() {
            crc ^= 1;
        }
        Ok(Response::new(kms::EncryptResponse {
            name: version,
            ciphertext_crc32c: Some(crc.into()),
            ciphertext,
            verified_plaintext_crc32c: verified_plaintext,
            verified_additional_authenticated_data_crc32c: verified_aad,
            protection_level: kms::ProtectionLevel::Software as i32,
        }))
    }

    async fn decrypt(
        &self,
        request: Request<kms::DecryptRequest>,
    ) -> Result<Response<DecryptResponse>, Status> {
        self.begin("Decrypt", &request).await?;
        let r = request.into_inner();
        if !is_key_name(&r.name) {
            return Err(Status::invalid_argument(format!(
                "Resource name [{}] does not match any known pattern.",
                r.name
            )));
        }
        checksum(
            "ciphertext_crc32c",
            "ciphertext",
            r.ciphertext_crc32c,
            &r.ciphertext,
        )?;
        checksum(
            "additional_authenticated_data_crc32c",
            "additional_authenticated_data",
            r.additional_authenticated_data_crc32c,
            &r.additional_authenticated_data,
        )?;
        let (plaintext, used_primary) = {
            let g = self.0.lock();
            let k = g.keys.get(&r.name).ok_or_else(|| not_found(&r.name))?;
            let ct = &r.ciphertext;
            if ct.len() < CT_HEADER + NONCE_LEN + TAG_LEN || ct[0] != CT_FORMAT {
                return Err(Status::invalid_argument(CIPHERTEXT_INVALID));
            }
            if ct[1..9] != k.tag {
                return Err(Status::invalid_argument(WRONG_KEY));
            }
            let id = u32::from_be_bytes(ct[9..13].try_into().unwrap());
            let v = k
                .versions
                .get(&id)
                .ok_or_else(|| Status::invalid_argument(WRONG_KEY))?;
            let material = match (v.state, &v.material) {
                (State::Enabled, Some(m)) => m,
                (state, _) => return Err(not_enabled(&version_name(&r.name, id), state)),
            };
            let mut sealed_aad = ct[..CT_HEADER].to_vec();
            sealed_aad.extend_from_slice(&r.additional_authenticated_data);
            let nonce: [u8; NONCE_LEN] = ct[CT_HEADER..CT_HEADER + NONCE_LEN].try_into().unwrap();
            let mut body = ct[CT_HEADER + NONCE_LEN..].to_vec();
            let plain = aead(material)
                .open_in_place(
                    Nonce::assume_unique_for_key(nonce),
                    Aad::from(&sealed_aad[..]),
                    &mut body,
                )
                .map_err(|_| Status::invalid_argument(WRONG_KEY))?
                .to_vec();
            (plain, k.primary == Some(id))
        };
        let mut crc = crc32c(&plaintext);
        if self.take_corruption() {
            crc ^= 1;
        }
        Ok(Response::new(DecryptResponse {
            plaintext: SecretValue::new(plaintext),
            plaintext_crc32c: Some(crc.into()),
            used_primary,
            protection_level: kms::ProtectionLevel::Software as i32,
        }))
    }

    async fn get_crypto_key(
        &self,
        request: Request<kms::GetCryptoKeyRequest>,
    ) -> Result<Response<kms::CryptoKey>, Status> {
        self.begin("GetCryptoKey", &request).await?;
        let name = request.into_inner().name;
        let g = self.0.lock();
        let k = g.keys.get(&name).ok_or_else(|| not_found(&name))?;
        Ok(Response::new(key_proto(&name, k)))
    }

    async fn get_crypto_key_version(
        &self,
        request: Request<kms::GetCryptoKeyVersionRequest>,
    ) -> Result<Response<kms::CryptoKeyVersion>, Status> {
        self.begin("GetCryptoKeyVersion", &request).await?;
        let name = request.into_inner().name;
        let (key, id) = parse_version_name(&name).ok_or_else(|| not_found(&name))?;
        let g = self.0.lock();
        let v = g
            .keys
            .get(&key)
            .and_then(|k| k.versions.get(&id))
            .ok_or_else(|| not_found(&name))?;
        Ok(Response::new(version_proto(&key, id, v)))
    }

    async fn create_key_ring(
        &self,
        request: Request<kms::CreateKeyRingRequest>,
    ) -> Result<Response<kms::KeyRing>, Status> {
        self.begin("CreateKeyRing", &request).await?;
        let r = request.into_inner();
        let p: Vec<&str> = r.parent.split('/').collect();
        if p.len() != 4 || p[0] != "projects" || p[2] != "locations" || !valid_id(&r.key_ring_id) {
            return Err(Status::invalid_argument("Invalid parent or key_ring_id."));
        }
        let name = format!("{}/keyRings/{}", r.parent, r.key_ring_id);
        let mut g = self.0.lock();
        if g.rings.contains_key(&name) {
            return Err(Status::already_exists(format!(
                "KeyRing {name} already exists."
            )));
        }
        g.rings.insert(name.clone(), ());
        Ok(Response::new(kms::KeyRing {
            name,
            create_time: None,
        }))
    }

    async fn create_crypto_key(
        &self,
        request: Request<kms::CreateCryptoKeyRequest>,
    ) -> Result<Response<kms::CryptoKey>, Status> {
        self.begin("CreateCryptoKey", &request).await?;
        let r = request.into_inner();
        if !valid_id(&r.crypto_key_id) {
            return Err(Status::invalid_argument("Invalid crypto_key_id."));
        }
        let purpose = r.crypto_key.as_ref().map_or(0, |k| k.purpose);
        if let Some(k) = &r.crypto_key {
            check_schedule(k)?;
        }
        if purpose != CryptoKeyPurpose::EncryptDecrypt as i32 {
            return Err(Status::invalid_argument(
                "This fake supports only purpose ENCRYPT_DECRYPT.",
            ));
        }
        let name = format!("{}/cryptoKeys/{}", r.parent, r.crypto_key_id);
        let mut g = self.0.lock();
        if !g.rings.contains_key(&r.parent) {
            return Err(not_found(&r.parent));
        }
        if g.keys.contains_key(&name) {
            return Err(Status::already_exists(format!(
                "CryptoKey {name} already exists."
            )));
        }
        let mut k = new_key(!r.skip_initial_version_creation);
        if let Some(wanted) = &r.crypto_key {
            k.rotation_period = wanted
                .rotation_schedule
                .map(|RotationSchedule::RotationPeriod(p)| p);
            k.next_rotation_time = wanted.next_rotation_time;
        }
        let proto = key_proto(&name, &k);
        g.keys.insert(name, k);
        Ok(Response::new(proto))
    }

    async fn create_crypto_key_version(
        &self,
        request: Request<kms::CreateCryptoKeyVersionRequest>,
    ) -> Result<Response<kms::CryptoKeyVersion>, Status> {
        self.begin("CreateCryptoKeyVersion", &request).await?;
        let parent = request.into_inner().parent;
        let mut g = self.0.lock();
        let k = g.keys.get_mut(&parent).ok_or_else(|| not_found(&parent))?;
        let id = add_version(k);
        Ok(Response::new(version_proto(&parent, id, &k.versions[&id])))
    }

    async fn update_crypto_key_version(
        &self,
        request: Request<kms::UpdateCryptoKeyVersionRequest>,
    ) -> Result<Response<kms::CryptoKeyVersion>, Status> {
        self.begin("UpdateCryptoKeyVersion", &request).await?;
        let r = request.into_inner();
        let paths = r.update_mask.map(|m| m.paths).unwrap_or_default();
        if paths != ["state"] {
            return Err(Status::invalid_argument(
                "update_mask must be exactly [\"state\"] for this fake.",
            ));
        }
        let wanted = r.crypto_key_version.unwrap_or_default();
        let new_state = State::try_from(wanted.state).unwrap_or(State::Unspecified);
        if !matches!(new_state, State::Enabled | State::Disabled) {
            return Err(Status::invalid_argument(
                "state may only be updated to ENABLED or DISABLED.",
            ));
        }
        let (key, id) = parse_version_name(&wanted.name).ok_or_else(|| not_found(&wanted.name))?;
        let mut g = self.0.lock();
        let v = g
            .keys
            .get_mut(&key)
            .and_then(|k| k.versions.get_mut(&id))
            .ok_or_else(|| not_found(&wanted.name))?;
        if !matches!(v.state, State::Enabled | State::Disabled) {
            return Err(Status::failed_precondition(format!(
                "{} is in state {} and cannot be updated.",
                wanted.name,
                state_name(v.state)
            )));
        }
        v.state = new_state;
        Ok(Response::new(version_proto(&key, id, v)))
    }

    async fn update_crypto_key_primary_version(
        &self,
        request: Request<kms::UpdateCryptoKeyPrimaryVersionRequest>,
    ) -> Result<Response<kms::CryptoKey>, Status> {
        self.begin("UpdateCryptoKeyPrimaryVersion", &request)
            .await?;
        let r = request.into_inner();
        let id: u32 = r
            .crypto_key_version_id
            .parse()
            .map_err(|_| Status::invalid_argument("crypto_key_version_id is not a version id."))?;
        let mut g = self.0.lock();
        let k = g.keys.get_mut(&r.name).ok_or_else(|| not_found(&r.name))?;
        let version = version_name(&r.name, id);
        let v = k.versions.get(&id).ok_or_else(|| not_found(&version))?;
        if v.state != State::Enabled {
            return Err(not_enabled(&version, v.state));
        }
        k.primary = Some(id);
        Ok(Response::new(key_proto(&r.name, k)))
    }

    async fn destroy_crypto_key_version(
        &self,
        request: Request<kms::DestroyCryptoKeyVersionRequest>,
    ) -> Result<Response<kms::CryptoKeyVersion>, Status> {
        self.begin("DestroyCryptoKeyVersion", &request).await?;
        let name = request.into_inner().name;
        let (key, id) = parse_version_name(&name).ok_or_else(|| not_found(&name))?;
        let mut g = self.0.lock();
        let v = g
            .keys
            .get_mut(&key)
            .and_then(|k| k.versions.get_mut(&id))
            .ok_or_else(|| not_found(&name))?;
        if !matches!(v.state, State::Enabled | State::Disabled) {
            return Err(Status::failed_precondition(format!(
                "{name} is not enabled or disabled, current state is: {}.",
                state_name(v.state)
            )));
        }
        // Cloud KMS keeps the material for the scheduled duration; it is unusable meanwhile.
        v.state = State::DestroyScheduled;
        Ok(Response::new(version_proto(&key, id, v)))
    }
}

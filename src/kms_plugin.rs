//! The Kubernetes KMS v2 plugin front door: `v2.KeyManagementService` (`Status`, `Encrypt`,
//! `Decrypt`, proto/k8s/kms/v2/api.proto) as kube-apiserver calls it on its own Unix socket,
//! mapped to one configured keybroker key, so that key's policy, audit and metrics apply to the
//! apiserver (docs/kubernetes-kms.md).
//!
//! - `Encrypt` wraps the apiserver's DEK seed with one backend call ([`Broker::wrap_key`]); the
//!   ciphertext is a keybroker data-key envelope, so the no-lock-in recovery of docs/envelope.md
//!   holds for etcd too. `key_id` names the keybroker key, the backend and the backend key
//!   *version* that wrapped ([`key_id`]): a rotation changes it.
//! - `Decrypt` refuses a `key_id` that does not name the envelope's own key and version, then
//!   opens through the decrypt-side cache (N distinct seeds cost at most N backend calls).
//! - `Status` costs nothing: health comes from the outcomes of real Encrypt/Decrypt backend calls
//!   and at most one paid probe (one wrap of a random value) per `probe_interval` (plus one when
//!   the backend reports a rotation); it waits for a probe at most `status_timeout`, so it
//!   answers inside the apiserver's 3 s even when the cloud hangs.
//!
//! Must never: answer Decrypt with anything but the seed a matching Encrypt wrapped, log or
//! format the seed, hold a Status request on a backend call beyond `status_timeout`, or make
//! more than one paid probe per interval on its own.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use aws_lc_rs::digest;
use tokio::sync::watch;
use tonic::{Request, Response, Status};

use crate::backend::BackendKind;
use crate::broker::Broker;
use crate::envelope::{self, Kind};
use crate::error::Error;
use crate::facts::Facts;
use crate::kms_proto as pb;
use crate::kms_proto::key_management_service_server::KeyManagementService;
use crate::observe::{Meta, Observer};
use crate::operation::Operation;
use crate::principal::{Caller, IdentitySource};
use crate::secret::SecretKey;
use crate::settings::{Problems, Section, resolve};

/// The gRPC service name (health checks and reflection know it by this).
pub const SERVICE_NAME: &str = "v2.KeyManagementService";
/// `StatusResponse.version`: kube-apiserver refuses a plugin that answers anything else.
pub const API_VERSION: &str = "v2";
/// `StatusResponse.healthz` of a healthy plugin.
pub const HEALTHY: &str = "ok";
/// kube-apiserver's limits (k8s.io/apiserver/pkg/storage/value/encrypt/envelope/kmsv2):
/// ciphertext (the encrypted DEK seed) and key_id at most 1 kB each, annotations under 32 kB in
/// all (keys included), each annotation key a fully qualified domain name.
pub const MAX_CIPHERTEXT_LEN: usize = 1024;
pub const MAX_KEY_ID_LEN: usize = 1024;
pub const MAX_ANNOTATIONS_LEN: usize = 32 * 1024;
/// The seed kube-apiserver sends is 32 bytes; anything up to this is wrapped (Azure RSA-OAEP
/// and the 1 kB ciphertext limit leave no room for much more).
pub const MAX_SEED_LEN: usize = 64;
/// A request uid is a UUID; longer ones are refused rather than logged.
pub const MAX_UID_LEN: usize = 128;
/// The annotation every ciphertext carries: the keybroker envelope format version that wrote it.
pub const FORMAT_ANNOTATION: &str = "envelope.keybroker.io";
/// The caller the plugin listener identifies every request as (unless configured otherwise).
pub const DEFAULT_CALLER: &str = "kube-apiserver";
pub const DEFAULT_SOCKET: &str = "/var/run/kmsplugin/kms.sock";
pub const DEFAULT_PROBE_INTERVAL: Duration = Duration::from_secs(300);
pub const DEFAULT_STATUS_TIMEOUT: Duration = Duration::from_millis(500);

/// `[kms_plugin]`: where the plugin listens and which key it serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KmsPluginSettings {
    /// The Unix socket kube-apiserver's EncryptionConfiguration names (`unix:///…`).
    pub socket: PathBuf,
    pub socket_mode: u32,
    /// The keybroker key that wraps the seeds.
    pub key: String,
    /// The caller name every request on the socket gets (policy subject, audit, metrics).
    pub caller: String,
    /// At most one paid health probe per this interval.
    pub probe_interval: Duration,
    /// How long Status waits for a probe it started before answering from what it knows.
    pub status_timeout: Duration,
}

impl KmsPluginSettings {
    /// Reads `[kms_plugin]` (None when the section is absent: the plugin is off).
    pub fn parse(s: &Section<'_>, base: &Path, p: &mut Problems) -> Option<Self> {
        s.table?;
        let socket = match s.str("listen", p).unwrap_or(DEFAULT_SOCKET) {
            l if l.starts_with("unix://") => resolve(base, &l["unix://".len()..]),
            l if l.starts_with('/') => PathBuf::from(l),
            _ => {
                p.push(
                    s.at("listen"),
                    "must be a Unix socket, like \"unix:///var/run/kmsplugin/kms.sock\"",
                );
                PathBuf::new()
            }
        };
        let key = s.req_str("key", p).unwrap_or_default().to_owned();
        if let Err(e) = crate::util::check_name(&key)
            && !key.is_empty()
        {
            p.push(s.at("key"), format!("key name {e}"));
        }
        let caller = s.str("caller", p).unwrap_or(DEFAULT_CALLER).to_owned();
        if let Err(e) = crate::util::check_name(&caller) {
            p.push(s.at("caller"), format!("caller name {e}"));
        }
        let probe_interval = s
            .duration_in(
                "probe_interval",
                Duration::from_secs(1),
                Duration::from_secs(24 * 3600),
                p,
            )
            .unwrap_or(DEFAULT_PROBE_INTERVAL);
        let status_timeout = s
            .duration_in(
                "status_timeout",
                Duration::from_millis(10),
                Duration::from_secs(2),
                p,
            )
            .unwrap_or(DEFAULT_STATUS_TIMEOUT);
        let socket_mode = s.file_mode("socket_mode", p).unwrap_or(0o600);
        s.finish(p);
        Some(Self {
            socket,
            socket_mode,
            key,
            caller,
            probe_interval,
            status_timeout,
        })
    }
}

/// The `key_id` of a wrap by `backend`'s key `version` under keybroker key `key`: readable when
/// it fits kube-apiserver's 1 kB, else the same prefix and a SHA-256 of the version. Computed
/// from the envelope's own header on Decrypt, so both forms are checked the same way.
pub fn key_id(key: &str, backend: BackendKind, version: &str) -> String {
    let readable = format!("{key}:{}:{version}", backend.as_str());
    if readable.len() <= MAX_KEY_ID_LEN {
        return readable;
    }
    let d = digest::digest(&digest::SHA256, version.as_bytes());
    let hex: String = d.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("{key}:{}:sha256:{hex}", backend.as_str())
}

/// What Status knows, from real outcomes and probes.
#[derive(Default)]
struct HealthState {
    /// The key_id of the last successful wrap (Encrypt or probe).
    key_id: Option<String>,
    /// The backend's rotation generation when `key_id` was learnt.
    generation: Option<u64>,
    /// The most recent health-relevant outcome: when, and None or the short reason.
    last: Option<(Instant, Option<String>)>,
    probe_started: Option<Instant>,
    probing: bool,
}

struct Inner {
    broker: Arc<Broker>,
    observer: Arc<Observer>,
    settings: KmsPluginSettings,
    caller: Caller,
    state: Mutex<HealthState>,
    /// Bumped whenever a probe finishes (Status waits on it).
    probes: watch::Sender<u64>,
}

/// The `v2.KeyManagementService` implementation (cheap to clone: one shared state).
#[derive(Clone)]
pub struct KmsPlugin {
    inner: Arc<Inner>,
}

impl KmsPlugin {
    pub fn new(broker: Arc<Broker>, observer: Arc<Observer>, settings: KmsPluginSettings) -> Self {
        let caller = Caller::new(settings.caller.as_str(), IdentitySource::Listener);
        Self {
            inner: Arc::new(Inner {
                broker,
                observer,
                settings,
                caller,
                state: Mutex::new(HealthState::default()),
                probes: watch::channel(0).0,
            }),
        }
    }

    pub fn settings(&self) -> &KmsPluginSettings {
        &self.inner.settings
    }

    /// Starts the first probe (at startup, so the first Status has a key_id).
    pub fn start(&self) {
        let mut s = self.inner.lock();
        self.inner.start_probe(&mut s);
    }

    /// Status's answer (the gRPC method is a thin wrapper).
    pub async fn status_now(&self) -> pb::StatusResponse {
        let inner = &self.inner;
        let mut done = inner.probes.subscribe();
        let waiting = {
            let mut s = inner.lock();
            let generation = inner.generation();
            let interval = inner.settings.probe_interval;
            let stale = s
                .last
                .as_ref()
                .is_none_or(|(at, _)| at.elapsed() >= interval);
            let probe_due = s.probe_started.is_none_or(|at| at.elapsed() >= interval);
            // A rotation the backend reports for free (the local keyring, an AWS alias moved)
            // is worth one probe now: the apiserver should learn the new key_id soon.
            let rotated = s.key_id.is_some() && generation.is_some() && generation != s.generation;
            if !s.probing && ((stale && probe_due) || rotated) {
                inner.start_probe(&mut s);
            }
            s.probing
        };
        if waiting {
            let _ = tokio::time::timeout(inner.settings.status_timeout, done.changed()).await;
        }
        let s = inner.lock();
        let healthz = match (&s.last, &s.key_id) {
            (Some((_, Some(reason))), _) => reason.clone(),
            (_, None) => "no key_id yet: waiting for the first backend wrap".to_owned(),
            (_, Some(_)) => HEALTHY.to_owned(),
        };
        pb::StatusResponse {
            version: API_VERSION.to_owned(),
            healthz,
            key_id: s.key_id.clone().unwrap_or_default(),
        }
    }

    async fn encrypt_inner(
        &self,
        meta: &Meta,
        req: pb::EncryptRequest,
    ) -> Result<pb::EncryptResponse, Status> {
        let inner = &self.inner;
        let out = inner
            .observer
            .observe(meta, Operation::Encrypt, [None, None], async |facts| {
                check_uid(&req.uid)?;
                if req.plaintext.is_empty() || req.plaintext.len() > MAX_SEED_LEN {
                    return Err(Error::InvalidArgument(format!(
                        "plaintext: {} bytes; the plugin wraps DEK seeds of 1 to {MAX_SEED_LEN} bytes",
                        req.plaintext.len()
                    )));
                }
                let seed = SecretKey::from_vec(req.plaintext.to_vec());
                let wrapped = inner.wrap(&seed, facts).await;
                inner.note_encrypt(&wrapped);
                wrapped
            })
            .await?;
        Ok(pb::EncryptResponse {
            ciphertext: out.0.into(),
            key_id: out.1,
            annotations: annotations(),
        })
    }

    async fn decrypt_inner(
        &self,
        meta: &Meta,
        req: pb::DecryptRequest,
    ) -> Result<pb::DecryptResponse, Status> {
        let inner = &self.inner;
        let out = inner
            .observer
            .observe(meta, Operation::Decrypt, [None, None], async |facts| {
                check_uid(&req.uid)?;
                inner.check_decrypt(&req)?;
                let out = inner
                    .broker
                    .decrypt(&inner.caller, &req.ciphertext, &BTreeMap::new(), facts)
                    .await;
                inner.note_decrypt(&out, facts);
                out
            })
            .await?;
        Ok(pb::DecryptResponse {
            plaintext: out.plaintext.into_bytes(),
        })
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, HealthState> {
        // A panic while holding the lock leaves plain values behind: still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The configured key's rotation generation, free to ask (None when the key is gone).
    fn generation(&self) -> Option<u64> {
        self.broker
            .registry()
            .get(&self.settings.key)
            .map(|e| e.backend.hint().generation)
    }

    /// One wrap under the configured key: (ciphertext, key_id), both within the apiserver's
    /// limits.
    async fn wrap(&self, seed: &SecretKey, facts: &mut Facts) -> Result<(Vec<u8>, String), Error> {
        let out = self
            .broker
            .wrap_key(&self.caller, &self.settings.key, seed, facts)
            .await?;
        // Read after the wrap: a backend that learns of a rotation from the wrap's answer (an
        // AWS alias that moved) has already counted it, so it does not cause one more probe.
        let generation = self.generation();
        let backend = facts.backend.unwrap_or(BackendKind::Local);
        if out.ciphertext.len() > MAX_CIPHERTEXT_LEN {
            return Err(Error::Precondition {
                reason: "KMS_CIPHERTEXT_TOO_LARGE",
                message: format!(
                    "the wrapped seed is {} bytes; kube-apiserver accepts at most {MAX_CIPHERTEXT_LEN} \
                     (use a smaller key or shorter key names)",
                    out.ciphertext.len()
                ),
            });
        }
        let id = key_id(&out.key, backend, &out.key_version);
        let mut s = self.lock();
        s.generation = generation;
        s.key_id = Some(id.clone());
        Ok((out.ciphertext, id))
    }

    /// Encrypt (and probe) outcomes: any failure means the plugin cannot serve the apiserver's
    /// next Encrypt, whatever its cause.
    fn note_encrypt<T>(&self, result: &Result<T, Error>) {
        let reason = result.as_ref().err().map(health_reason);
        self.lock().last = Some((Instant::now(), reason));
    }

    /// Decrypt outcomes count only when they say something about the backend: a tampered
    /// ciphertext or a foreign key_id is the request's fault, not the plugin's health.
    fn note_decrypt<T>(&self, result: &Result<T, Error>, facts: &Facts) {
        let reason = match result {
            Err(e) if e.is_server_fault() => Some(health_reason(e)),
            _ if facts.backend_calls.iter().any(|c| c.outcome.is_ok()) => None,
            _ => return,
        };
        self.lock().last = Some((Instant::now(), reason));
    }

    fn start_probe(self: &Arc<Self>, s: &mut HealthState) {
        s.probing = true;
        s.probe_started = Some(Instant::now());
        let inner = Arc::clone(self);
        tokio::spawn(async move {
            let meta = inner.observer.meta_of(&{
                let mut e = http::Extensions::new();
                e.insert(inner.caller.clone());
                e
            });
            // A real wrap of a random value, audited and counted like the apiserver's Encrypt
            // (it is one more use of the key): what it proves is what Encrypt needs.
            let result = inner
                .observer
                .observe(&meta, Operation::Encrypt, [None, None], async |facts| {
                    let seed = SecretKey::generate(32)
                        .map_err(|_| Error::Internal("random generator failed"))?;
                    let r = inner.wrap(&seed, facts).await;
                    inner.note_encrypt(&r);
                    r
                })
                .await;
            if let Err(status) = &result {
                tracing::warn!(code = ?status.code(), message = status.message(), "KMS plugin health probe failed");
            }
            inner.lock().probing = false;
            inner.probes.send_modify(|n| *n += 1);
        });
    }

    /// The checks Decrypt makes before any key is used: the ciphertext is a data-key envelope of
    /// the configured key, within the apiserver's limits, and `key_id` names its own version.
    fn check_decrypt(&self, req: &pb::DecryptRequest) -> Result<(), Error> {
        if req.ciphertext.len() > MAX_CIPHERTEXT_LEN {
            return Err(Error::RequestTooLarge {
                what: "ciphertext",
                size: req.ciphertext.len() as u64,
                limit: MAX_CIPHERTEXT_LEN as u64,
            });
        }
        if req.key_id.len() > MAX_KEY_ID_LEN {
            return Err(Error::RequestTooLarge {
                what: "key_id",
                size: req.key_id.len() as u64,
                limit: MAX_KEY_ID_LEN as u64,
            });
        }
        check_annotations(&req.annotations)?;
        let env = envelope::parse(&req.ciphertext)?;
        if env.kind != Kind::DataKey {
            return Err(Error::InvalidArgument(
                "ciphertext: not a KMS plugin ciphertext (a keybroker message or data-key blob)"
                    .to_owned(),
            ));
        }
        let foreign = || Error::Precondition {
            reason: "KMS_KEY_ID_MISMATCH",
            message: format!(
                "key_id is not one this plugin wrote for the ciphertext (the plugin serves key {:?})",
                self.settings.key
            ),
        };
        if env.key_name != self.settings.key {
            return Err(foreign());
        }
        let matches = env
            .copies
            .iter()
            .any(|c| key_id(env.key_name, c.backend, c.key_version) == req.key_id);
        if !matches {
            return Err(foreign());
        }
        Ok(())
    }
}

/// Status's short reason for a failure: the stable reason and the message (which names only
/// configuration values: never a provider's response or key bytes).
fn health_reason(e: &Error) -> String {
    let mut s = format!("{}: {e}", e.public().reason());
    s.truncate(s.floor_char_boundary(200));
    s
}

fn annotations() -> BTreeMap<String, bytes::Bytes> {
    BTreeMap::from([(
        FORMAT_ANNOTATION.to_owned(),
        bytes::Bytes::from(envelope::FORMAT_VERSION.to_string()),
    )])
}

/// The annotations kube-apiserver hands back: bounded, and ours (when present) in a format
/// this build reads.
fn check_annotations(a: &BTreeMap<String, bytes::Bytes>) -> Result<(), Error> {
    let size: usize = a.iter().map(|(k, v)| k.len() + v.len()).sum();
    if size > MAX_ANNOTATIONS_LEN {
        return Err(Error::RequestTooLarge {
            what: "annotations",
            size: size as u64,
            limit: MAX_ANNOTATIONS_LEN as u64,
        });
    }
    if let Some(v) = a.get(FORMAT_ANNOTATION) {
        let known = [envelope::LEGACY_VERSION, envelope::FORMAT_VERSION]
            .iter()
            .any(|n| v.as_ref() == n.to_string().as_bytes());
        if !known {
            return Err(Error::InvalidArgument(format!(
                "annotations: {FORMAT_ANNOTATION} names an envelope format this plugin does not read"
            )));
        }
    }
    Ok(())
}

fn check_uid(uid: &str) -> Result<(), Error> {
    if uid.len() > MAX_UID_LEN {
        return Err(Error::InvalidArgument(format!(
            "uid: {} bytes; at most {MAX_UID_LEN}",
            uid.len()
        )));
    }
    Ok(())
}

/// Every request on the plugin socket is the configured caller (the listener is the identity:
/// only processes the socket file's mode admits can connect). The apiserver's uid goes into the
/// request's span.
fn meta_for<T>(plugin: &KmsPlugin, req: &Request<T>) -> Meta {
    let mut ext = req.extensions().clone();
    ext.insert(plugin.inner.caller.clone());
    plugin.inner.observer.meta_of(&ext)
}

#[tonic::async_trait]
impl KeyManagementService for KmsPlugin {
    async fn status(
        &self,
        _request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        Ok(Response::new(self.status_now().await))
    }

    async fn encrypt(
        &self,
        request: Request<pb::EncryptRequest>,
    ) -> Result<Response<pb::EncryptResponse>, Status> {
        let meta = meta_for(self, &request);
        let req = request.into_inner();
        tracing::debug!(uid = %crate::util::Capped(&req.uid), "KMS Encrypt");
        self.encrypt_inner(&meta, req).await.map(Response::new)
    }

    async fn decrypt(
        &self,
        request: Request<pb::DecryptRequest>,
    ) -> Result<Response<pb::DecryptResponse>, Status> {
        let meta = meta_for(self, &request);
        let req = request.into_inner();
        tracing::debug!(uid = %crate::util::Capped(&req.uid), "KMS Decrypt");
        self.decrypt_inner(&meta, req).await.map(Response::new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_ids_fit_the_apiserver_limit() {
        let short = key_id("etcd", BackendKind::Local, "3");
        assert_eq!(short, "etcd:local:3");
        let long = key_id("etcd", BackendKind::Azure, &"v".repeat(2000));
        assert!(long.len() <= MAX_KEY_ID_LEN, "{}", long.len());
        assert!(long.starts_with("etcd:azure:sha256:"), "{long}");
        assert_ne!(long, key_id("etcd", BackendKind::Azure, &"w".repeat(2000)));
    }

    #[test]
    fn annotation_keys_are_fully_qualified_domain_names() {
        // kube-apiserver's rule: a DNS-1123 subdomain with at least two labels.
        for k in annotations().keys() {
            let labels: Vec<&str> = k.split('.').collect();
            assert!(labels.len() >= 2, "{k}");
            for l in labels {
                assert!(!l.is_empty() && l.len() <= 63, "{k}");
                assert!(
                    l.chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'),
                    "{k}"
                );
                assert!(!l.starts_with('-') && !l.ends_with('-'), "{k}");
            }
        }
    }

    #[test]
    fn unknown_format_annotations_and_oversize_annotations_are_refused() {
        let mut a = annotations();
        assert!(check_annotations(&a).is_ok());
        a.insert(FORMAT_ANNOTATION.into(), bytes::Bytes::from_static(b"9"));
        assert!(matches!(
            check_annotations(&a),
            Err(Error::InvalidArgument(_))
        ));
        let big = BTreeMap::from([(
            "a.example.com".to_owned(),
            bytes::Bytes::from(vec![0u8; MAX_ANNOTATIONS_LEN]),
        )]);
        assert!(matches!(
            check_annotations(&big),
            Err(Error::RequestTooLarge { .. })
        ));
    }

    #[test]
    fn debug_of_seed_carrying_messages_shows_no_bytes() {
        let seed: Vec<u8> = (100..132).collect();
        let e = pb::EncryptRequest {
            plaintext: seed.clone().into(),
            uid: "u".into(),
        };
        let d = pb::DecryptResponse {
            plaintext: seed.clone().into(),
        };
        let list = format!("{seed:?}");
        for dbg in [format!("{e:?}"), format!("{d:?}")] {
            assert!(!dbg.contains(&list[1..list.len() - 1]), "{dbg}");
            assert!(dbg.contains("redacted"), "{dbg}");
        }
    }
}

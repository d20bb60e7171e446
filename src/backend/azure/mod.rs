//! The Azure backend: data keys wrapped by an Azure Key Vault or Managed HSM key through the
//! official Azure SDK for Rust (`azure_security_keyvault_keys`, `azure_identity`), using the
//! `wrapKey` / `unwrapKey` operations. docs/azure.md is the operator's view of this file.
//!
//! Key Vault's wrap has no AAD, so the keybroker context (key name + caller) is bound inside the
//! wrapped bytes: what Key Vault wraps is `16 random bytes || SHA-256(label || context) || data
//! key`, and unwrap checks the 32 hash bytes (in constant time) before handing out the key. The
//! random prefix makes AES key wrap (deterministic, for Managed HSM `oct-HSM` keys) give a
//! different wrapped key each time, like RSA-OAEP does. A copy made for one
//! (key name, caller) therefore never unwraps for another, although Key Vault itself sees (and
//! logs) only the operation and the key version, not the caller.
//!
//! RSA-OAEP alone authenticates nothing: anyone with the public key (Key Vault `get`, or any
//! copy of it) can wrap a data key of their choice with the right binding. So every RSA wrap is
//! also signed by Key Vault (`sign`, PS256, with the same key version) over the version, the
//! binding and the RSA ciphertext; the copy is `RSA ciphertext || signature`, and unwrap checks
//! the signature with the version's public key (from `get`) before asking Key Vault to unwrap.
//! `[azure] rsa_wrap_signatures` can relax this for old unsigned copies or identities without
//! `sign` (docs/azure.md says what that gives up). AES key wrap (`oct-HSM`) needs none of it:
//! only the HSM can wrap.
//!
//! What this module must never do: unwrap with any key but the configured one (a copy naming
//! another key or a version of another key is refused before any call), return a data key whose
//! binding does not match, put Key Vault's raw response body into a caller-visible message (it
//! goes to `source`, for the log), or log, format or keep key bytes outside [`SecretKey`].

use std::any::Any;
use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use aws_lc_rs::{constant_time, digest};
use azure_core::error::ErrorKind;
use azure_security_keyvault_keys::models::{
    EncryptionAlgorithm, KeyClientSignOptions, KeyClientWrapKeyOptions, KeyOperationParameters,
    SignParameters, SignatureAlgorithm,
};
use zeroize::Zeroize;

use super::{
    BackendContext, BackendError, BackendErrorKind, BackendKind, KeyBackend, KeyDescription,
    KeyHint, Lifecycle, Wrapped,
};
use crate::envelope::{FormatError, WrappedCopy};
use crate::secret::SecretKey;

mod client;
mod error;
mod key_url;
mod rotation;
mod settings;
mod wrap;

use client::Caller;
pub use client::{AzureClients, VaultClient, test_hooks};
use error::Op;
pub use key_url::{KeyUrl, VaultKind};
pub use settings::{
    AzureSettings, CredentialChoice, DEFAULT_CALL, DEFAULT_REFRESH_INTERVAL, ENV_CLIENT_ID,
    ENV_FEDERATED_TOKEN_FILE, ENV_TENANT_ID, RsaSignatures, credential_from, key_config,
};
use wrap::{
    BINDING_LEN, KeyFacts, MAX_DATA_KEY_LEN, MAX_WRAPPED_LEN, PREFIX_LEN, RANDOMIZER_LEN,
    RsaPublic, binding, signed_message,
};

/// What keybroker learned about its key, shared with the refresh task.
#[derive(Default)]
struct KeyState {
    /// Key facts by version, from GET (only successful answers are kept, so the map is bounded
    /// by the key's real versions).
    versions: Mutex<HashMap<String, KeyFacts>>,
    /// Facts about the current version, from the last GET of the unversioned key.
    current: Mutex<Option<KeyFacts>>,
    /// The current version as last seen in a wrap answer or a GET.
    last_version: Mutex<Option<String>>,
    /// Bumped when the current version or the key's state changes (retires cached data keys).
    generation: AtomicU64,
    /// Set only by the refresh task, from the `enabled` attribute.
    disabled: AtomicBool,
    /// The key's rotation policy as Key Vault last reported it (`refresh_lifecycle`).
    lifecycle: Mutex<Option<Lifecycle>>,
}

impl KeyState {
    fn lock_current(&self) -> std::sync::MutexGuard<'_, Option<KeyFacts>> {
        self.current.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_versions(&self) -> std::sync::MutexGuard<'_, HashMap<String, KeyFacts>> {
        self.versions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records the current version; true if it differs from a previously seen one (rotation).
    fn note_version(&self, version: &str) -> bool {
        let mut last = self.last_version.lock().unwrap_or_else(|p| p.into_inner());
        let changed = last.as_deref().is_some_and(|v| v != version);
        *last = Some(version.to_owned());
        changed
    }

    /// Records facts about the current version; bumps the generation when the version or the
    /// key's state changed since the last observation.
    fn observe_current(&self, facts: KeyFacts) {
        let mut cur = self.lock_current();
        let state_changed = cur
            .as_ref()
            .is_some_and(|c| c.usable != facts.usable || c.enabled != facts.enabled);
        let rotated = self.note_version(&facts.version);
        if state_changed || rotated {
            tracing::info!(kid = %facts.kid, enabled = facts.enabled, usable = facts.usable,
                why = facts.why_unusable, "azure key changed");
            self.generation.fetch_add(1, Ordering::Relaxed);
        }
        self.lock_versions()
            .insert(facts.version.clone(), facts.clone());
        *cur = Some(facts);
    }

    /// A wrap answered with this version: if another one was current before, the key rotated.
    fn observe_wrap_version(&self, version: &str) {
        if self.note_version(version) {
            tracing::info!(version, "azure key rotated (seen in a wrap answer)");
            self.generation.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Aborts the refresh task when the backend (its registry) goes away.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A configured key backed by an Azure Key Vault or Managed HSM key.
pub struct AzureBackend {
    call: Caller,
    configured: String,
    /// The unversioned key URL recorded in envelopes.
    durable_id: String,
    state: Arc<KeyState>,
    rsa_signatures: RsaSignatures,
    _refresh: Option<AbortOnDrop>,
}

impl AzureBackend {
    /// A backend for `key` on a (possibly shared) vault client. With a refresh interval and a
    /// tokio runtime, a task keeps the key's state current (see [`KeyHint`]).
    pub fn new(
        vault: Arc<VaultClient>,
        key: KeyUrl,
        configured: &str,
        settings: &AzureSettings,
    ) -> Self {
        let call = Caller {
            vault,
            key: key.clone(),
            call: settings.call,
        };
        let state = Arc::new(KeyState::default());
        let refresh = (!settings.refresh_interval.is_zero()
            && tokio::runtime::Handle::try_current().is_ok())
        .then(|| {
            let call = call.clone();
            let state = Arc::clone(&state);
            let every = settings.refresh_interval;
            AbortOnDrop(tokio::spawn(async move {
                let mut tick = tokio::time::interval(every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    refresh_once(&call, &state).await;
                }
            }))
        });
        Self {
            durable_id: key.unversioned(),
            call,
            configured: configured.to_owned(),
            state,
            rsa_signatures: settings.rsa_wrap_signatures,
            _refresh: refresh,
        }
    }

    fn err(kind: BackendErrorKind, msg: impl Into<Cow<'static, str>>) -> BackendError {
        BackendError::new(BackendKind::Azure, kind, msg)
    }

    /// The wrap algorithm for a version (`None`: the current one). Vaults hold only RSA keys
    /// (symmetric keys exist only in Managed HSM), so only Managed HSM keys need a GET first.
    async fn algorithm(&self, version: Option<&str>) -> Result<EncryptionAlgorithm, BackendError> {
        let facts = if self.call.key.kind == VaultKind::Vault {
            // Use what a refresh may have learned (an EC key cannot wrap); never GET for it.
            let known = match version {
                Some(v) => self.state.lock_versions().get(v).cloned(),
                None => self.state.lock_current().clone(),
            };
            match known {
                Some(f) => f,
                None => return Ok(EncryptionAlgorithm::RsaOaep256),
            }
        } else {
            match version {
                Some(v) => self.version_facts(v).await?,
                None => self.wrap_facts().await?,
            }
        };
        facts.algorithm.clone().ok_or_else(|| {
            Self::err(
                BackendErrorKind::Disabled,
                format!(
                    "Key Vault key {} has type {} which cannot wrap keys",
                    facts.kid, facts.kty
                ),
            )
        })
    }

    /// Facts about the version a wrap will use (the pinned one, or the current one).
    async fn wrap_facts(&self) -> Result<KeyFacts, BackendError> {
        if let Some(v) = &self.call.key.version {
            return self.version_facts(v).await;
        }
        if let Some(f) = self.state.lock_current().clone() {
            return Ok(f);
        }
        let facts = self.call.get(None).await?;
        self.state.observe_current(facts.clone());
        Ok(facts)
    }

    async fn version_facts(&self, version: &str) -> Result<KeyFacts, BackendError> {
        if let Some(f) = self.state.lock_versions().get(version).cloned() {
            return Ok(f);
        }
        let facts = self.call.get(Some(version)).await?;
        self.state
            .lock_versions()
            .insert(facts.version.clone(), facts.clone());
        Ok(facts)
    }

    /// The public key of an RSA key version (GET once per version, then cached).
    async fn rsa_public(&self, version: &str) -> Result<RsaPublic, BackendError> {
        self.version_facts(version).await?.rsa.ok_or_else(|| {
            Self::err(
                BackendErrorKind::Internal,
                "Key Vault's answer to get has no RSA public key for an RSA key",
            )
        })
    }

    /// Has Key Vault sign (PS256, the version that wrapped) what [`signed_message`] builds, and
    /// checks the signature before it is recorded.
    async fn sign_wrap(
        &self,
        version: &str,
        kid: &str,
        binding: &[u8; BINDING_LEN],
        rsa_ciphertext: &[u8],
    ) -> Result<Vec<u8>, BackendError> {
        let message = signed_message(kid, binding, rsa_ciphertext);
        let hash = digest::digest(&digest::SHA256, &message);
        let call = &self.call;
        let result = call
            .retrying(Op::Sign, || async {
                let body: azure_core::http::RequestContent<SignParameters> = SignParameters {
                    algorithm: Some(SignatureAlgorithm::Ps256),
                    value: Some(hash.as_ref().to_vec()),
                }
                .try_into()?;
                let options = KeyClientSignOptions {
                    key_version: Some(version.to_owned()),
                    ..Default::default()
                };
                call.vault
                    .client
                    .sign(&call.key.name, body, Some(options))
                    .await?
                    .into_model()
            })
            .await?;
        let sig = result.result.unwrap_or_default();
        let public = self.rsa_public(version).await?;
        if sig.len() != public.modulus_len() || !public.verify(&message, &sig) {
            return Err(Self::err(
                BackendErrorKind::Internal,
                "Key Vault's signature of a wrap does not verify with the key's public key",
            ));
        }
        Ok(sig)
    }

    /// For an RSA copy: splits off and checks the signature (or accepts an unsigned copy where
    /// the setting allows), returning the RSA ciphertext to unwrap. A refusal costs no unwrap.
    async fn authentic_rsa_ciphertext<'c>(
        &self,
        version: &str,
        copy: &WrappedCopy<'c>,
        ctx: &BackendContext<'_>,
    ) -> Result<&'c [u8], BackendError> {
        let refuse = |why: &'static str| Self::err(BackendErrorKind::InvalidCiphertext, why);
        let public = self.rsa_public(version).await?;
        let k = public.modulus_len();
        let wrapped = copy.wrapped;
        if wrapped.len() == 2 * k {
            let (ct, sig) = wrapped.split_at(k);
            if !public.verify(&signed_message(copy.key_version, &binding(ctx), ct), sig) {
                return Err(refuse(
                    "wrapped key is not signed by this key version for this keybroker key and caller",
                ));
            }
            return Ok(ct);
        }
        if wrapped.len() == k {
            return match self.rsa_signatures {
                RsaSignatures::Required => Err(refuse(
                    "unsigned RSA wrapped key refused (azure.rsa_wrap_signatures = \"required\")",
                )),
                RsaSignatures::AcceptUnsigned | RsaSignatures::Off => Ok(wrapped),
            };
        }
        Err(refuse(
            "wrapped key has an impossible length for this RSA key",
        ))
    }
}

async fn refresh_once(call: &Caller, state: &KeyState) {
    match call.get(call.key.version.as_deref()).await {
        Ok(facts) => {
            let disabled = !facts.enabled;
            if state.disabled.swap(disabled, Ordering::Relaxed) != disabled {
                tracing::info!(key = %call.key.unversioned(), disabled, why = facts.why_unusable,
                    "azure key state changed");
            }
            state.observe_current(facts);
        }
        Err(e) => {
            tracing::warn!(key = %call.key.unversioned(), error = %e,
                cause = %e.source.as_ref().map(|s| s.to_string()).unwrap_or_default(),
                "azure key refresh failed; keeping the last known state");
        }
    }
}

/// A `KeyOperationParameters` body for wrap / unwrap.
fn params(
    alg: EncryptionAlgorithm,
    value: Vec<u8>,
) -> azure_core::Result<azure_core::http::RequestContent<KeyOperationParameters>> {
    KeyOperationParameters {
        algorithm: Some(alg),
        value: Some(value),
        ..Default::default()
    }
    .try_into()
}

#[async_trait::async_trait]
impl KeyBackend for AzureBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Azure
    }

    fn key_id(&self) -> &str {
        &self.configured
    }

    fn check_canonical(&self, copy: &WrappedCopy<'_>) -> Result<(), FormatError> {
        // Copies of another key are for `unwrap` to refuse; here only respellings of this one
        // (host case, a port, a trailing slash, the name's or the version's case, ...).
        if let Ok(named) = KeyUrl::parse(copy.key_id)
            && self.call.key.same_key(&named)
            && copy.key_id != self.durable_id
        {
            return Err(FormatError::NotCanonical("key id"));
        }
        if let Ok(kid) = KeyUrl::parse(copy.key_version)
            && self.call.key.same_key(&kid)
            && let Some(v) = &kid.version
            && copy.key_version != self.call.key.kid(v)
        {
            return Err(FormatError::NotCanonical("key version"));
        }
        Ok(())
    }

    fn hint(&self) -> KeyHint {
        KeyHint {
            disabled: self.state.disabled.load(Ordering::Relaxed),
            generation: self.state.generation.load(Ordering::Relaxed),
            ..KeyHint::default()
        }
    }

    async fn wrap(
        &self,
        key: &SecretKey,
        ctx: &BackendContext<'_>,
    ) -> Result<Wrapped, BackendError> {
        if key.is_empty() || key.len() > MAX_DATA_KEY_LEN {
            return Err(Self::err(
                BackendErrorKind::InvalidArgument,
                "data keys must be 1 to 64 bytes",
            ));
        }
        let alg = self.algorithm(self.call.key.version.as_deref()).await?;
        let call = &self.call;
        let result = call
            .retrying(Op::Wrap, || {
                let alg = alg.clone();
                async move {
                    let mut randomizer = [0u8; RANDOMIZER_LEN];
                    crate::secret::random_fill(&mut randomizer).map_err(|e| {
                        azure_core::Error::with_message(ErrorKind::Other, e.to_string())
                    })?;
                    let mut plain = Vec::with_capacity(PREFIX_LEN + key.len());
                    plain.extend_from_slice(&randomizer);
                    plain.extend_from_slice(&binding(ctx));
                    plain.extend_from_slice(key.as_ref());
                    let body = params(alg, plain);
                    let options = KeyClientWrapKeyOptions {
                        key_version: call.key.version.clone(),
                        ..Default::default()
                    };
                    // The request body (holding the data key) is dropped inside the SDK; its
                    // bytes are not ours to wipe.
                    call.vault
                        .client
                        .wrap_key(&call.key.name, body?, Some(options))
                        .await?
                        .into_model()
                }
            })
            .await?;
        let answered_kid = result.kid.ok_or_else(|| {
            Self::err(
                BackendErrorKind::Internal,
                "Key Vault wrap answered without a kid",
            )
        })?;
        let used = KeyUrl::parse(&answered_kid)
            .ok()
            .filter(|u| self.call.key.same_key(u))
            .and_then(|u| u.version)
            .ok_or_else(|| {
                Self::err(
                    BackendErrorKind::Internal,
                    "Key Vault wrap answered with a kid that is not a version of this key",
                )
            })?;
        let ciphertext = result.result.filter(|c| !c.is_empty()).ok_or_else(|| {
            Self::err(
                BackendErrorKind::Internal,
                "Key Vault wrap answered without a value",
            )
        })?;
        if self.call.key.version.is_none() {
            self.state.observe_wrap_version(&used);
        }
        // Recorded in keybroker's one spelling (which `check_canonical` insists on).
        let kid = self.call.key.kid(&used);
        let ciphertext = match alg {
            EncryptionAlgorithm::RsaOaep256 if self.rsa_signatures != RsaSignatures::Off => {
                let sig = self
                    .sign_wrap(&used, &kid, &binding(ctx), &ciphertext)
                    .await?;
                let mut signed = ciphertext;
                signed.extend_from_slice(&sig);
                signed
            }
            _ => ciphertext,
        };
        Ok(Wrapped {
            key_id: self.durable_id.clone(),
            key_version: kid,
            ciphertext,
        })
    }

    async fn unwrap(
        &self,
        copy: &WrappedCopy<'_>,
        ctx: &BackendContext<'_>,
    ) -> Result<SecretKey, BackendError> {
        let refuse = |why: &'static str| Self::err(BackendErrorKind::InvalidCiphertext, why);
        if copy.backend != BackendKind::Azure {
            return Err(refuse("wrapped key was not made by Azure Key Vault"));
        }
        if self.check_canonical(copy).is_err() {
            return Err(refuse(
                "wrapped key's key id or version is not spelled as keybroker records it",
            ));
        }
        let named =
            KeyUrl::parse(copy.key_id).map_err(|_| refuse("wrapped key names no Key Vault key"))?;
        if named.version.is_some() || !self.call.key.same_key(&named) {
            return Err(refuse("wrapped key was not made by this key"));
        }
        let kid = KeyUrl::parse(copy.key_version)
            .map_err(|_| refuse("wrapped key's version is not a Key Vault kid"))?;
        let version = match kid.version {
            Some(v) if self.call.key.same_key(&kid) => v,
            _ => return Err(refuse("wrapped key's version is not a version of this key")),
        };
        if copy.wrapped.is_empty() || copy.wrapped.len() > MAX_WRAPPED_LEN {
            return Err(refuse("wrapped key has an impossible length"));
        }
        let alg = self.algorithm(Some(&version)).await?;
        let to_unwrap = match alg {
            EncryptionAlgorithm::RsaOaep256 => {
                self.authentic_rsa_ciphertext(&version, copy, ctx).await?
            }
            _ => copy.wrapped,
        };
        let call = &self.call;
        let result = call
            .retrying(Op::Unwrap, || {
                let alg = alg.clone();
                let version = version.as_str();
                async move {
                    let body = params(alg, to_unwrap.to_vec())?;
                    call.vault
                        .client
                        .unwrap_key(&call.key.name, version, body, None)
                        .await?
                        .into_model()
                }
            })
            .await?;
        let mut plain = result.result.unwrap_or_default();
        let expected = binding(ctx);
        let ok = plain.len() > PREFIX_LEN
            && plain.len() <= PREFIX_LEN + MAX_DATA_KEY_LEN
            && constant_time::verify_slices_are_equal(
                &plain[RANDOMIZER_LEN..PREFIX_LEN],
                &expected,
            )
            .is_ok();
        if !ok {
            plain.zeroize();
            return Err(refuse(
                "wrapped key was made for another keybroker key or caller",
            ));
        }
        let key = SecretKey::from_slice(&plain[PREFIX_LEN..]);
        plain.zeroize();
        Ok(key)
    }

    async fn describe(&self) -> Result<KeyDescription, BackendError> {
        let facts = self.call.get(self.call.key.version.as_deref()).await?;
        if self.call.key.version.is_none() {
            self.state.observe_current(facts.clone());
        }
        Ok(KeyDescription {
            durable_key_id: self.durable_id.clone(),
            primary_version: Some(facts.kid),
            enabled: facts.usable,
        })
    }

    fn lifecycle(&self) -> Option<Lifecycle> {
        self.state
            .lifecycle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// GET key (the current version's kid and `created`: the primary's age) and GET
    /// `rotationpolicy` (period and next rotation; [`rotation::lifecycle_of`]). Two calls. The
    /// current version, also for a key configured with a pinned version: the policy rotates the
    /// key, not the pin.
    async fn refresh_lifecycle(&self) -> Result<(), BackendError> {
        let current = self.call.get(None).await?;
        if self.call.key.version.is_none() {
            self.state.observe_current(current.clone());
        }
        let policy = self.call.rotation_policy().await?;
        let l = rotation::lifecycle_of(&policy, &current).map_err(|e| {
            Self::err(
                BackendErrorKind::Internal,
                format!("unexpected Key Vault rotation policy: {e}"),
            )
        })?;
        *self
            .state
            .lifecycle
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(l);
        Ok(())
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

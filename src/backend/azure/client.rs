//! Key Vault clients and calls: one `KeyClient` per vault (one token cache) shared by every
//! key in it, and every call run under the `[azure]` call policy, with Key Vault's own
//! Retry-After honoured within the deadline.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use azure_core::credentials::TokenCredential;
use azure_core::http::{ClientOptions, HttpClient, RetryOptions, Transport};
use azure_security_keyvault_keys::models::KeyClientGetKeyOptions;
use azure_security_keyvault_keys::{KeyClient, KeyClientOptions};

use super::AzureBackend;
use super::error::{Op, classify, retry_after};
use super::key_url::KeyUrl;
use super::settings::{AzureSettings, credential_from};
use super::wrap::{KeyFacts, facts_of};
use crate::backend::call::{CallError, CallPolicy, Retry};
use crate::backend::{BackendError, BackendErrorKind, BackendKind};

/// One `KeyClient` per vault, shared by every configured key in it (one token cache).
pub struct VaultClient {
    pub(super) client: KeyClient,
}

impl VaultClient {
    /// A client for `https://host`. `transport` replaces the default HTTPS stack (tests only).
    pub fn new(
        host: &str,
        credential: Arc<dyn TokenCredential>,
        transport: Option<Arc<dyn HttpClient>>,
    ) -> Result<Self, String> {
        let client_options = ClientOptions {
            // keybroker retries itself, so that Retry-After waits respect the per-call deadline.
            retry: RetryOptions::none(),
            transport: transport.map(Transport::new),
            ..Default::default()
        };
        let options = KeyClientOptions {
            client_options,
            ..Default::default()
        };
        let client = KeyClient::new(&format!("https://{host}"), credential, Some(options))
            .map_err(|e| format!("cannot create a Key Vault client for {host}: {e}"))?;
        Ok(Self { client })
    }
}

/// Test-only injection of a credential and an HTTP transport per vault host. Nothing in the
/// configuration can select this: only code linked into the process (the integration tests) can
/// install an override, which lets a real keybroker server talk to an in-process HTTPS fake.
#[doc(hidden)]
pub mod test_hooks {
    use super::*;

    #[derive(Clone)]
    pub struct Overrides {
        pub credential: Arc<dyn TokenCredential>,
        pub transport: Arc<dyn HttpClient>,
    }

    static HOOKS: Mutex<Option<HashMap<String, Overrides>>> = Mutex::new(None);

    pub fn install(host: &str, overrides: Overrides) {
        let mut g = HOOKS.lock().unwrap_or_else(|p| p.into_inner());
        g.get_or_insert_with(HashMap::new)
            .insert(host.to_ascii_lowercase(), overrides);
    }

    pub fn remove(host: &str) {
        let mut g = HOOKS.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(m) = g.as_mut() {
            m.remove(&host.to_ascii_lowercase());
        }
    }

    pub(super) fn lookup(host: &str) -> Option<Overrides> {
        let g = HOOKS.lock().unwrap_or_else(|p| p.into_inner());
        g.as_ref().and_then(|m| m.get(host).cloned())
    }
}

/// What the backend `Factory` keeps for Azure: one credential for the process, one client per vault.
#[derive(Default)]
pub struct AzureClients {
    credential: Option<Arc<dyn TokenCredential>>,
    vaults: HashMap<String, Arc<VaultClient>>,
}

impl AzureClients {
    /// The backend for one configured key, sharing the vault's client with other keys.
    pub fn backend(
        &mut self,
        key: &KeyUrl,
        configured: &str,
        settings: &AzureSettings,
    ) -> Result<AzureBackend, String> {
        let vault = match self.vaults.get(&key.host) {
            Some(v) => Arc::clone(v),
            None => {
                let v = match test_hooks::lookup(&key.host) {
                    Some(o) => VaultClient::new(&key.host, o.credential, Some(o.transport))?,
                    None => {
                        let credential = match &self.credential {
                            Some(c) => Arc::clone(c),
                            None => {
                                let c = credential_from(settings)?;
                                self.credential = Some(Arc::clone(&c));
                                c
                            }
                        };
                        VaultClient::new(&key.host, credential, None)?
                    }
                };
                let v = Arc::new(v);
                self.vaults.insert(key.host.clone(), Arc::clone(&v));
                v
            }
        };
        Ok(AzureBackend::new(vault, key.clone(), configured, settings))
    }
}

/// How to call Key Vault: the shared client and the per-call limits.
#[derive(Clone)]
pub(super) struct Caller {
    pub vault: Arc<VaultClient>,
    pub key: KeyUrl,
    pub call: CallPolicy,
}

impl Caller {
    fn err(kind: BackendErrorKind, msg: impl Into<Cow<'static, str>>) -> BackendError {
        BackendError::new(BackendKind::Azure, kind, msg)
    }

    /// GET key (a version, or the current one).
    pub(super) async fn get(&self, version: Option<&str>) -> Result<KeyFacts, BackendError> {
        let key = self
            .retrying(Op::Get, || async {
                let options = KeyClientGetKeyOptions {
                    key_version: version.map(str::to_owned),
                    ..Default::default()
                };
                self.vault
                    .client
                    .get_key(&self.key.name, Some(options))
                    .await?
                    .into_model()
            })
            .await?;
        let facts = facts_of(&key, &self.key).map_err(|why| {
            Self::err(
                BackendErrorKind::Internal,
                format!("unexpected Key Vault answer to get: {why}"),
            )
        })?;
        if let Some(v) = version
            && !facts.version.eq_ignore_ascii_case(v)
        {
            return Err(Self::err(
                BackendErrorKind::Internal,
                "Key Vault answered get with another key version",
            ));
        }
        Ok(facts)
    }

    /// GET the key's rotation policy, parsed by [`super::rotation::parse`] (needs
    /// `keys/rotationpolicy/read`). An unreadable body is an error for the caller to log.
    pub(super) async fn rotation_policy(
        &self,
    ) -> Result<super::rotation::RotationPolicy, BackendError> {
        let body = self
            .retrying(Op::GetRotationPolicy, || async {
                Ok(self
                    .vault
                    .client
                    .get_key_rotation_policy(&self.key.name, None)
                    .await?
                    .into_body())
            })
            .await?;
        super::rotation::parse(body.as_ref()).map_err(|e| {
            Self::err(
                BackendErrorKind::Internal,
                format!("unexpected Key Vault answer to getRotationPolicy: {e}"),
            )
        })
    }

    /// Runs one Key Vault operation under the call policy: throttling waits for Retry-After
    /// when it fits in the deadline; 5xx and connection failures back off; every other answer
    /// is final.
    pub(super) async fn retrying<T, F, Fut>(
        &self,
        op: Op,
        mut attempt: F,
    ) -> Result<T, BackendError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = azure_core::Result<T>>,
    {
        let key = &self.key;
        let decide = |e: &azure_core::Error| {
            let retryable = matches!(
                classify(op, key, e).kind,
                BackendErrorKind::Throttled | BackendErrorKind::Unavailable
            );
            match retry_after(e) {
                _ if !retryable => Retry::No,
                Some(wait) => Retry::After(wait),
                None => Retry::Backoff,
            }
        };
        match self.call.run(op.as_str(), |_| attempt(), decide).await {
            Ok(v) => Ok(v),
            Err(CallError::Failed(e)) => Err(classify(op, key, &e).with_source(e)),
            Err(CallError::TimedOut(_)) => Err(Self::err(
                BackendErrorKind::DeadlineExceeded,
                format!(
                    "Key Vault {} did not answer within {:?}",
                    op.as_str(),
                    self.call.timeout
                ),
            )),
        }
    }
}

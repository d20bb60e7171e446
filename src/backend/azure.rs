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
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_lc_rs::{constant_time, digest, signature};
use azure_core::credentials::{Secret, TokenCredential};
use azure_core::error::ErrorKind;
use azure_core::http::headers::{HeaderName, RETRY_AFTER};
use azure_core::http::{ClientOptions, HttpClient, RetryOptions, Transport, Url};
use azure_identity::{
    ClientSecretCredential, ManagedIdentityCredential, ManagedIdentityCredentialOptions,
    UserAssignedId, WorkloadIdentityCredential, WorkloadIdentityCredentialOptions,
};
use azure_security_keyvault_keys::models::{
    EncryptionAlgorithm, Key, KeyClientGetKeyOptions, KeyClientSignOptions,
    KeyClientWrapKeyOptions, KeyOperationParameters, KeyType, SignParameters, SignatureAlgorithm,
};
use azure_security_keyvault_keys::{KeyClient, KeyClientOptions};
use tokio::time::Instant;
use zeroize::Zeroize;

use super::{
    BackendContext, BackendError, BackendErrorKind, BackendKind, KeyBackend, KeyDescription,
    KeyHint, Wrapped,
};
use crate::config::{Problems, Section};
use crate::envelope::{FormatError, WrappedCopy};
use crate::secret::SecretKey;

/// Standard environment variables of Azure workload identity (set by the AKS webhook).
pub const ENV_CLIENT_ID: &str = "AZURE_CLIENT_ID";
pub const ENV_TENANT_ID: &str = "AZURE_TENANT_ID";
pub const ENV_FEDERATED_TOKEN_FILE: &str = "AZURE_FEDERATED_TOKEN_FILE";

/// Defaults for the `[azure]` section (docs/azure.md argues each).
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(10);
pub const DEFAULT_RETRIES: u32 = 3;
pub const DEFAULT_REFRESH_INTERVAL: Duration = Duration::from_secs(60);

/// Labels the binding hash; names the format version of what Key Vault wraps.
const BINDING_LABEL: &[u8] = b"keybroker azure wrap v1";
const BINDING_LEN: usize = 32;
/// Random bytes ahead of the binding (a multiple of 8, as AES key wrap needs).
const RANDOMIZER_LEN: usize = 16;
/// Bytes Key Vault wraps ahead of the data key.
const PREFIX_LEN: usize = RANDOMIZER_LEN + BINDING_LEN;
/// Data keys are 16 or 32 bytes; anything else unwrapped is not ours.
const MAX_DATA_KEY_LEN: usize = 64;
/// RSA-4096 OAEP output plus its PS256 signature is 1024 bytes; AES key wrap of 112 bytes is 120.
const MAX_WRAPPED_LEN: usize = 2048;
/// Labels what Key Vault signs for an RSA wrap (the signed message, before hashing).
const SIGNATURE_LABEL: &[u8] = b"keybroker azure wrap v2 signature";
/// First backoff after a 5xx or a connection failure; doubles per retry.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// Vault and Managed HSM DNS suffixes of the public and sovereign clouds.
const VAULT_SUFFIXES: &[&str] = &[
    "vault.azure.net",
    "vault.azure.cn",
    "vault.usgovcloudapi.net",
    "vault.microsoftazure.de",
];
const HSM_SUFFIXES: &[&str] = &[
    "managedhsm.azure.net",
    "managedhsm.azure.cn",
    "managedhsm.usgovcloudapi.net",
];

/// Which identity keybroker presents to Microsoft Entra ID.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum CredentialChoice {
    /// Client secret if a secret file is configured, else workload identity if its token file
    /// is known, else managed identity.
    #[default]
    Auto,
    WorkloadIdentity,
    ManagedIdentity,
    ClientSecret,
}

impl CredentialChoice {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "auto" => Self::Auto,
            "workload_identity" => Self::WorkloadIdentity,
            "managed_identity" => Self::ManagedIdentity,
            "client_secret" => Self::ClientSecret,
            _ => return None,
        })
    }
}

/// Whether RSA wraps carry a Key Vault signature (`[azure] rsa_wrap_signatures`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum RsaSignatures {
    /// Sign every RSA wrap; refuse RSA copies without a valid signature (the default).
    #[default]
    Required,
    /// Sign every RSA wrap; also unwrap unsigned copies (made before signatures, or with `off`).
    /// Anyone with the public key can forge those: for migrating old data only.
    AcceptUnsigned,
    /// Do not sign (for identities without the `sign` permission); unwrap unsigned copies and
    /// check the signature of signed ones. RSA copies are then forgeable by public-key holders.
    Off,
}

impl RsaSignatures {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "required" => Self::Required,
            "accept_unsigned" => Self::AcceptUnsigned,
            "off" => Self::Off,
            _ => return None,
        })
    }
}

/// The global `[azure]` configuration section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AzureSettings {
    pub credential: CredentialChoice,
    /// Entra tenant; defaults to `AZURE_TENANT_ID`.
    pub tenant_id: Option<String>,
    /// Application (client) id, or a user-assigned managed identity's client id; defaults to
    /// `AZURE_CLIENT_ID`.
    pub client_id: Option<String>,
    /// Workload identity's projected service-account token; defaults to
    /// `AZURE_FEDERATED_TOKEN_FILE`.
    pub federated_token_file: Option<PathBuf>,
    /// A file holding the client secret (never the secret itself in the config text).
    pub client_secret_file: Option<PathBuf>,
    /// Per backend call, including retries and Retry-After waits.
    pub deadline: Duration,
    /// Retries after throttling, 5xx or connection failures (each within the deadline).
    pub retries: u32,
    /// How often the key's state (enabled, validity, current version) is read; zero: never.
    pub refresh_interval: Duration,
    /// Signatures on RSA wraps (see [`RsaSignatures`]).
    pub rsa_wrap_signatures: RsaSignatures,
}

impl Default for AzureSettings {
    fn default() -> Self {
        Self {
            credential: CredentialChoice::Auto,
            tenant_id: None,
            client_id: None,
            federated_token_file: None,
            client_secret_file: None,
            deadline: DEFAULT_DEADLINE,
            retries: DEFAULT_RETRIES,
            refresh_interval: DEFAULT_REFRESH_INTERVAL,
            rsa_wrap_signatures: RsaSignatures::Required,
        }
    }
}

impl AzureSettings {
    /// Reads the `[azure]` section, reporting every problem with its path.
    pub fn parse(s: &Section<'_>, base: &Path, p: &mut Problems) -> Self {
        let mut out = Self::default();
        if let Some(c) = s.str("credential", p) {
            match CredentialChoice::parse(c) {
                Some(c) => out.credential = c,
                None => p.push(
                    s.at("credential"),
                    "must be \"auto\", \"workload_identity\", \"managed_identity\" or \"client_secret\"",
                ),
            }
        }
        out.tenant_id = s.str("tenant_id", p).map(str::to_owned);
        out.client_id = s.str("client_id", p).map(str::to_owned);
        let path = |field: &str, p: &mut Problems| {
            s.str(field, p).map(|f| {
                let f = PathBuf::from(f);
                if f.is_absolute() { f } else { base.join(f) }
            })
        };
        out.federated_token_file = path("federated_token_file", p);
        out.client_secret_file = path("client_secret_file", p);
        if s.str("client_secret", p).is_some() {
            p.push(
                s.at("client_secret"),
                "secrets do not belong in the config text: put it in a file and set client_secret_file",
            );
        }
        if out.credential == CredentialChoice::ClientSecret && out.client_secret_file.is_none() {
            p.push(
                s.at("client_secret_file"),
                "is required with credential = \"client_secret\"",
            );
        }
        if let Some(d) = s.duration("deadline", p) {
            if d < Duration::from_millis(100) || d > Duration::from_secs(300) {
                p.push(s.at("deadline"), "must be 100ms to 5m");
            }
            out.deadline = d;
        }
        if let Some(n) = s.u64("retries", p) {
            if n > 10 {
                p.push(s.at("retries"), "must be 0 to 10");
            }
            out.retries = n.min(10) as u32;
        }
        if let Some(d) = s.duration("refresh_interval", p) {
            if !d.is_zero() && d < Duration::from_millis(50) {
                p.push(s.at("refresh_interval"), "must be 0 (off) or at least 50ms");
            }
            out.refresh_interval = d;
        }
        if let Some(v) = s.str("rsa_wrap_signatures", p) {
            match RsaSignatures::parse(v) {
                Some(r) => out.rsa_wrap_signatures = r,
                None => p.push(
                    s.at("rsa_wrap_signatures"),
                    "must be \"required\", \"accept_unsigned\" or \"off\"",
                ),
            }
        }
        out
    }
}

/// Managed HSM or a vault: decides the audience of tokens and which key types may appear.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VaultKind {
    Vault,
    ManagedHsm,
}

/// A validated Key Vault key URL: `https://VAULT.vault.azure.net/keys/NAME[/VERSION]` or
/// `https://HSM.managedhsm.azure.net/keys/NAME[/VERSION]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyUrl {
    /// Lower-case DNS name of the vault.
    pub host: String,
    pub kind: VaultKind,
    pub name: String,
    pub version: Option<String>,
}

impl KeyUrl {
    /// Parses and validates a key URL; the error says what is wrong in operator terms.
    pub fn parse(s: &str) -> Result<Self, String> {
        const SHAPE: &str = "https://VAULT.vault.azure.net/keys/NAME[/VERSION] or https://HSM.managedhsm.azure.net/keys/NAME[/VERSION]";
        let bad = |why: &str| format!("{s:?} is not an Azure key URL ({why}); expected {SHAPE}");
        let url = Url::parse(s).map_err(|e| bad(&e.to_string()))?;
        if url.scheme() != "https" {
            return Err(bad("Key Vault is only reachable over https"));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(bad("it must not carry credentials"));
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(bad("it must not have a query or fragment"));
        }
        if url.port().is_some_and(|p| p != 443) {
            return Err(bad("it must not name a port"));
        }
        let host = url
            .host_str()
            .ok_or_else(|| bad("no host"))?
            .to_ascii_lowercase();
        let (vault, suffix) = host.split_once('.').ok_or_else(|| bad("unknown host"))?;
        let kind = if VAULT_SUFFIXES.contains(&suffix) {
            VaultKind::Vault
        } else if HSM_SUFFIXES.contains(&suffix) {
            VaultKind::ManagedHsm
        } else {
            return Err(bad("the host is not a Key Vault or Managed HSM name"));
        };
        let vault_ok = (3..=24).contains(&vault.len())
            && vault.starts_with(|c: char| c.is_ascii_alphabetic())
            && !vault.ends_with('-')
            && !vault.contains("--")
            && vault.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
        if !vault_ok {
            return Err(bad(
                "the vault name must be 3 to 24 letters, digits and single hyphens",
            ));
        }
        let mut segments: Vec<&str> = url.path().split('/').skip(1).collect();
        if segments.last() == Some(&"") {
            segments.pop();
        }
        let (name, version) = match segments.as_slice() {
            ["keys", name] => (*name, None),
            ["keys", name, version] => (*name, Some(*version)),
            _ => return Err(bad("the path must be /keys/NAME or /keys/NAME/VERSION")),
        };
        if name.is_empty()
            || name.len() > 127
            || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        {
            return Err(bad(
                "the key name must be 1 to 127 letters, digits and hyphens",
            ));
        }
        if let Some(v) = version
            && (v.is_empty() || v.len() > 64 || !v.chars().all(|c| c.is_ascii_alphanumeric()))
        {
            return Err(bad("the key version must be 1 to 64 letters and digits"));
        }
        Ok(Self {
            host,
            kind,
            name: name.to_owned(),
            version: version.map(str::to_owned),
        })
    }

    /// `https://HOST` (the client endpoint).
    pub fn vault_url(&self) -> String {
        format!("https://{}", self.host)
    }

    /// The durable key id recorded in envelopes: the key without a version.
    pub fn unversioned(&self) -> String {
        format!("https://{}/keys/{}", self.host, self.name)
    }

    /// Whether `other` names the same key (names are case-insensitive in Key Vault).
    fn same_key(&self, other: &KeyUrl) -> bool {
        self.host == other.host && self.name.eq_ignore_ascii_case(&other.name)
    }

    /// The versioned key id keybroker records for a wrap by `version` of this key: always the
    /// unversioned URL as configured, `/`, the version in lower case (Key Vault issues lower-case
    /// hex). One spelling per version, so a respelled copy cannot become a new cache entry.
    fn kid(&self, version: &str) -> String {
        format!("{}/{}", self.unversioned(), version.to_ascii_lowercase())
    }
}

/// The keybroker context bound into what Key Vault wraps.
fn binding(ctx: &BackendContext<'_>) -> [u8; BINDING_LEN] {
    let mut d = digest::Context::new(&digest::SHA256);
    d.update(BINDING_LABEL);
    d.update(&ctx.to_aad());
    let mut out = [0u8; BINDING_LEN];
    out.copy_from_slice(d.finish().as_ref());
    out
}

/// The wrap algorithm Key Vault needs for a key type.
fn algorithm_for(kty: &KeyType) -> Option<EncryptionAlgorithm> {
    match kty {
        KeyType::Rsa | KeyType::RsaHsm => Some(EncryptionAlgorithm::RsaOaep256),
        KeyType::Oct | KeyType::OctHsm => Some(EncryptionAlgorithm::A256Kw),
        _ => None,
    }
}

/// What `GET key` says about a key version, reduced to what keybroker decides on.
#[derive(Debug, Clone, PartialEq, Eq)]
struct KeyFacts {
    kid: String,
    version: String,
    algorithm: Option<EncryptionAlgorithm>,
    kty: String,
    /// The `enabled` attribute: Key Vault refuses every operation on a disabled key.
    enabled: bool,
    /// Enabled, inside nbf/exp, and permits wrapKey: new data keys can be wrapped. (Key Vault
    /// still unwraps with an expired or not-yet-valid key, so this does not stop decryption.)
    usable: bool,
    why_unusable: Option<&'static str>,
    /// An RSA key's public modulus and exponent (big-endian, no leading zeros), which check the
    /// signatures on its wraps.
    rsa: Option<RsaPublic>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct RsaPublic {
    n: Vec<u8>,
    e: Vec<u8>,
}

impl RsaPublic {
    fn modulus_len(&self) -> usize {
        self.n.len()
    }

    /// Checks a PS256 signature (salt length 32, as Key Vault and RFC 7518 use) over `message`.
    fn verify(&self, message: &[u8], sig: &[u8]) -> bool {
        signature::RsaPublicKeyComponents {
            n: &self.n,
            e: &self.e,
        }
        .verify(&signature::RSA_PSS_2048_8192_SHA256, message, sig)
        .is_ok()
    }
}

fn facts_of(key: &Key, expect: &KeyUrl) -> Result<KeyFacts, &'static str> {
    let jwk = key.key.as_ref().ok_or("no key in the response")?;
    let kid = jwk.kid.clone().ok_or("no kid in the response")?;
    let url = KeyUrl::parse(&kid).map_err(|_| "kid is not a key URL")?;
    if !expect.same_key(&url) {
        return Err("kid names another key");
    }
    let version = url.version.ok_or("kid has no version")?;
    let kty = jwk.kty.clone().ok_or("no kty in the response")?;
    let algorithm = algorithm_for(&kty);
    let attrs = key.attributes.as_ref();
    let now = azure_core::time::OffsetDateTime::now_utc();
    let ops_ok = |op: &str| {
        jwk.key_ops
            .as_ref()
            .is_none_or(|ops| ops.iter().any(|o| o == op))
    };
    let why_unusable = if algorithm.is_none() {
        Some("its key type cannot wrap keys (use RSA, RSA-HSM or oct-HSM)")
    } else if attrs.and_then(|a| a.enabled) == Some(false) {
        Some("it is disabled")
    } else if attrs.and_then(|a| a.not_before).is_some_and(|t| t > now) {
        Some("it is not yet valid (nbf)")
    } else if attrs.and_then(|a| a.expires).is_some_and(|t| t <= now) {
        Some("it has expired (exp)")
    } else if !ops_ok("wrapKey") {
        Some("its key_ops do not permit wrapKey")
    } else {
        None
    };
    let strip = |b: &Vec<u8>| {
        let i = b.iter().position(|x| *x != 0).unwrap_or(b.len());
        b[i..].to_vec()
    };
    let rsa = match (&kty, &jwk.n, &jwk.e) {
        (KeyType::Rsa | KeyType::RsaHsm, Some(n), Some(e)) if !n.is_empty() && !e.is_empty() => {
            Some(RsaPublic {
                n: strip(n),
                e: strip(e),
            })
        }
        _ => None,
    };
    Ok(KeyFacts {
        kid,
        version,
        algorithm,
        kty: format!("{kty:?}"),
        enabled: attrs.and_then(|a| a.enabled) != Some(false),
        usable: why_unusable.is_none(),
        why_unusable,
        rsa,
    })
}

/// What Key Vault signs for an RSA wrap (as SHA-256 of it, with PS256): the label, the recorded
/// versioned key id, the context binding and the RSA ciphertext, each of fixed or prefixed
/// length.
fn signed_message(kid: &str, binding: &[u8; BINDING_LEN], rsa_ciphertext: &[u8]) -> Vec<u8> {
    let mut m =
        Vec::with_capacity(SIGNATURE_LABEL.len() + 2 + kid.len() + 32 + rsa_ciphertext.len());
    m.extend_from_slice(SIGNATURE_LABEL);
    m.extend_from_slice(&(kid.len().min(u16::MAX as usize) as u16).to_be_bytes());
    m.extend_from_slice(kid.as_bytes());
    m.extend_from_slice(binding);
    m.extend_from_slice(rsa_ciphertext);
    m
}

/// One `KeyClient` per vault, shared by every configured key in it (one token cache).
pub struct VaultClient {
    client: KeyClient,
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

/// Builds the credential the `[azure]` section selects. Constructing it makes no network call.
pub fn credential_from(s: &AzureSettings) -> Result<Arc<dyn TokenCredential>, String> {
    let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let tenant = s.tenant_id.clone().or_else(|| env(ENV_TENANT_ID));
    let client = s.client_id.clone().or_else(|| env(ENV_CLIENT_ID));
    let token_file = s
        .federated_token_file
        .clone()
        .or_else(|| env(ENV_FEDERATED_TOKEN_FILE).map(PathBuf::from));
    let choice = match s.credential {
        CredentialChoice::Auto if s.client_secret_file.is_some() => CredentialChoice::ClientSecret,
        CredentialChoice::Auto if token_file.is_some() => CredentialChoice::WorkloadIdentity,
        CredentialChoice::Auto => CredentialChoice::ManagedIdentity,
        c => c,
    };
    let fail = |what: &str, e: azure_core::Error| format!("azure {what} credential: {e}");
    let credential: Arc<dyn TokenCredential> = match choice {
        CredentialChoice::ClientSecret => {
            let path = s
                .client_secret_file
                .as_ref()
                .ok_or("azure.client_secret_file is required for the client_secret credential")?;
            let tenant = tenant
                .ok_or("the client_secret credential needs azure.tenant_id or AZURE_TENANT_ID")?;
            let client = client
                .ok_or("the client_secret credential needs azure.client_id or AZURE_CLIENT_ID")?;
            let mut text = std::fs::read_to_string(path).map_err(|e| {
                format!(
                    "cannot read azure.client_secret_file {}: {e}",
                    path.display()
                )
            })?;
            let secret = text.trim().to_owned();
            text.zeroize();
            if secret.is_empty() {
                return Err(format!(
                    "azure.client_secret_file {} is empty",
                    path.display()
                ));
            }
            ClientSecretCredential::new(&tenant, client, Secret::new(secret), None)
                .map_err(|e| fail("client secret", e))?
        }
        CredentialChoice::WorkloadIdentity => {
            let options = WorkloadIdentityCredentialOptions {
                client_id: client,
                tenant_id: tenant,
                token_file_path: token_file,
                ..Default::default()
            };
            WorkloadIdentityCredential::new(Some(options))
                .map_err(|e| fail("workload identity", e))?
        }
        CredentialChoice::ManagedIdentity | CredentialChoice::Auto => {
            let options = ManagedIdentityCredentialOptions {
                user_assigned_id: client.map(UserAssignedId::ClientId),
                ..Default::default()
            };
            ManagedIdentityCredential::new(Some(options))
                .map_err(|e| fail("managed identity", e))?
        }
    };
    tracing::info!(credential = ?choice, "azure credential selected");
    Ok(credential)
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

/// What `BackendFactory` keeps for Azure: one credential for the process, one client per vault.
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

/// The operations keybroker calls, for messages and error mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Get,
    Wrap,
    Unwrap,
    Sign,
}

impl Op {
    fn as_str(self) -> &'static str {
        match self {
            Op::Get => "get",
            Op::Wrap => "wrapKey",
            Op::Unwrap => "unwrapKey",
            Op::Sign => "sign",
        }
    }
}

/// How to call Key Vault: the shared client and the per-call limits.
#[derive(Clone)]
struct Caller {
    vault: Arc<VaultClient>,
    key: KeyUrl,
    deadline: Duration,
    retries: u32,
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
            deadline: settings.deadline,
            retries: settings.retries,
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

impl Caller {
    fn err(kind: BackendErrorKind, msg: impl Into<Cow<'static, str>>) -> BackendError {
        BackendError::new(BackendKind::Azure, kind, msg)
    }

    /// GET key (a version, or the current one).
    async fn get(&self, version: Option<&str>) -> Result<KeyFacts, BackendError> {
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

    /// Runs one Key Vault operation with the deadline and retry policy: throttling waits for
    /// Retry-After when it fits in the deadline; 5xx and connection failures back off; every
    /// other answer is final.
    async fn retrying<T, F, Fut>(&self, op: Op, mut attempt: F) -> Result<T, BackendError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = azure_core::Result<T>>,
    {
        let deadline = Instant::now() + self.deadline;
        let mut backoff = FIRST_BACKOFF;
        let mut tries = 0u32;
        loop {
            let outcome = match tokio::time::timeout_at(deadline, attempt()).await {
                Ok(r) => r,
                Err(_) => {
                    return Err(Self::err(
                        BackendErrorKind::DeadlineExceeded,
                        format!(
                            "Key Vault {} did not answer within {:?}",
                            op.as_str(),
                            self.deadline
                        ),
                    ));
                }
            };
            let e = match outcome {
                Ok(v) => return Ok(v),
                Err(e) => e,
            };
            let mapped = classify(op, &self.key, &e);
            let retryable = matches!(
                mapped.kind,
                BackendErrorKind::Throttled | BackendErrorKind::Unavailable
            );
            if !retryable || tries >= self.retries {
                return Err(mapped.with_source(e));
            }
            let wait = match retry_after(&e) {
                Some(ra) => ra,
                None => backoff,
            };
            if Instant::now() + wait >= deadline {
                // Waiting would outlast the deadline: answer now with what Key Vault said.
                return Err(mapped.with_source(e));
            }
            tracing::debug!(op = op.as_str(), wait = ?wait, kind = %mapped.kind,
                "retrying Key Vault call");
            tokio::time::sleep(wait).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
            tries += 1;
        }
    }
}

/// Retry-After (seconds or an HTTP date) or retry-after-ms / x-ms-retry-after-ms.
fn retry_after(e: &azure_core::Error) -> Option<Duration> {
    let ErrorKind::HttpResponse {
        raw_response: Some(raw),
        ..
    } = e.kind()
    else {
        return None;
    };
    let h = raw.headers();
    for name in ["retry-after-ms", "x-ms-retry-after-ms"] {
        if let Some(ms) = h
            .get_optional_str(&HeaderName::from_static(name))
            .and_then(|v| v.trim().parse::<u64>().ok())
        {
            return Some(Duration::from_millis(ms));
        }
    }
    let v = h.get_optional_str(&RETRY_AFTER)?.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = azure_core::time::parse_rfc7231(v).ok()?;
    let now = azure_core::time::OffsetDateTime::now_utc();
    Some(Duration::try_from(at - now).unwrap_or(Duration::ZERO))
}

/// Key Vault's error body: `{"error": {"code", "message", "innererror": {"code"}}}`.
#[derive(Debug, Default, serde::Deserialize)]
struct ErrorBody {
    #[serde(default)]
    error: ErrorDetail,
}

#[derive(Debug, Default, serde::Deserialize)]
struct ErrorDetail {
    #[serde(default)]
    message: Option<String>,
    #[serde(default, alias = "innerError")]
    innererror: Option<InnerError>,
}

#[derive(Debug, Default, serde::Deserialize)]
struct InnerError {
    #[serde(default)]
    code: Option<String>,
}

/// Maps an SDK error to keybroker's terms. The message is ours; Key Vault's text stays in the
/// source (logged), because it can name identities and vault internals.
fn classify(op: Op, key: &KeyUrl, e: &azure_core::Error) -> BackendError {
    use BackendErrorKind as K;
    let what = op.as_str();
    let err = |kind, msg: String| BackendError::new(BackendKind::Azure, kind, msg);
    match e.kind() {
        ErrorKind::HttpResponse {
            status,
            raw_response,
            ..
        } => {
            let body: ErrorBody = raw_response
                .as_ref()
                .and_then(|r| serde_json::from_slice(r.body().as_ref()).ok())
                .unwrap_or_default();
            let inner = body
                .error
                .innererror
                .and_then(|i| i.code)
                .unwrap_or_default();
            let message = body.error.message.unwrap_or_default().to_ascii_lowercase();
            let code = u16::from(*status);
            match code {
                401 => err(
                    K::Unauthenticated,
                    format!(
                        "Key Vault refused keybroker's token for {what} on {}",
                        key.host
                    ),
                ),
                403 => {
                    let key_state = matches!(
                        inner.as_str(),
                        "KeyDisabled" | "KeyExpired" | "KeyNotYetValid" | "KeyOperationForbidden"
                    ) || message.contains("disabled key")
                        || message.contains("expired")
                        || message.contains("not yet valid")
                        || message.contains("not permitted");
                    if key_state {
                        err(
                            K::Disabled,
                            format!(
                                "Key Vault key {} does not permit {what} now (disabled, outside nbf/exp, or not in key_ops)",
                                key.unversioned()
                            ),
                        )
                    } else {
                        err(
                            K::PermissionDenied,
                            format!(
                                "keybroker's identity may not {what} with {} (needs the Key Vault Crypto User role or the {what} access-policy permission)",
                                key.unversioned()
                            ),
                        )
                    }
                }
                404 => err(
                    K::NotFound,
                    format!(
                        "Key Vault has no key (or key version) {}",
                        key.unversioned()
                    ),
                ),
                400 if op == Op::Unwrap => err(
                    K::InvalidCiphertext,
                    "Key Vault could not unwrap the wrapped key".to_owned(),
                ),
                429 => err(
                    K::Throttled,
                    format!("Key Vault throttled {what} on {}", key.host),
                ),
                408 | 500..=599 => err(
                    K::Unavailable,
                    format!("Key Vault {what} failed with HTTP {code}"),
                ),
                _ => err(
                    K::Internal,
                    format!("Key Vault rejected {what} with HTTP {code}"),
                ),
            }
        }
        ErrorKind::Connection | ErrorKind::Io => err(
            K::Unavailable,
            format!("cannot reach Key Vault {} for {what}", key.host),
        ),
        ErrorKind::Credential => err(
            K::Unauthenticated,
            "keybroker could not obtain an Azure token (see the log)".to_owned(),
        ),
        _ => err(
            K::Internal,
            format!("unexpected failure calling Key Vault {what}"),
        ),
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

    fn as_any(&self) -> &dyn Any {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_urls() {
        let k = KeyUrl::parse("https://My-Vault.vault.azure.net/keys/app-data").unwrap();
        assert_eq!(k.host, "my-vault.vault.azure.net");
        assert_eq!(k.kind, VaultKind::Vault);
        assert_eq!(k.version, None);
        assert_eq!(
            k.unversioned(),
            "https://my-vault.vault.azure.net/keys/app-data"
        );
        let k = KeyUrl::parse("https://hsm1.managedhsm.azure.net/keys/k/0123abcd/").unwrap();
        assert_eq!(k.kind, VaultKind::ManagedHsm);
        assert_eq!(k.version.as_deref(), Some("0123abcd"));
        assert!(KeyUrl::parse("https://vault1.vault.azure.net:443/keys/k").is_ok());
        for bad in [
            "http://vault1.vault.azure.net/keys/k",
            "https://vault1.example.com/keys/k",
            "https://vault1.vault.azure.net/secrets/k",
            "https://vault1.vault.azure.net/keys/",
            "https://vault1.vault.azure.net/keys/k/v/extra",
            "https://vault1.vault.azure.net/keys/k_1",
            "https://vault1.vault.azure.net/keys/k?api-version=7.4",
            "https://vault1.vault.azure.net:8443/keys/k",
            "https://x.vault.azure.net/keys/k",
            "https://user:pw@vault1.vault.azure.net/keys/k",
            "https://127.0.0.1/keys/k",
            "vault1/keys/k",
        ] {
            let e = KeyUrl::parse(bad).unwrap_err();
            assert!(e.contains("expected https://"), "{bad}: {e}");
        }
    }

    #[test]
    fn binding_depends_on_key_name_and_caller() {
        let a = binding(&BackendContext {
            key_name: "k",
            caller: "c",
        });
        let b = binding(&BackendContext {
            key_name: "k",
            caller: "d",
        });
        let c = binding(&BackendContext {
            key_name: "j",
            caller: "c",
        });
        assert_ne!(a, b);
        assert_ne!(a, c);
        assert_eq!(
            a,
            binding(&BackendContext {
                key_name: "k",
                caller: "c"
            })
        );
    }

    #[test]
    fn settings_from_toml() {
        let parse = |text: &str| {
            let table: toml::Table = text.parse().unwrap();
            let s = Section::new(Some(&table), "azure");
            let mut p = Problems::default();
            let out = AzureSettings::parse(&s, Path::new("/etc/kb"), &mut p);
            s.finish(&mut p);
            (out, p.0.iter().map(|p| p.to_string()).collect::<Vec<_>>())
        };
        let (s, problems) = parse(
            r#"
            credential = "client_secret"
            tenant_id = "t"
            client_id = "c"
            client_secret_file = "secret.txt"
            deadline = "3s"
            retries = 2
            refresh_interval = "0s"
            rsa_wrap_signatures = "accept_unsigned"
            "#,
        );
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(s.rsa_wrap_signatures, RsaSignatures::AcceptUnsigned);
        assert_eq!(
            AzureSettings::default().rsa_wrap_signatures,
            RsaSignatures::Required
        );
        assert_eq!(s.credential, CredentialChoice::ClientSecret);
        assert_eq!(
            s.client_secret_file.as_deref(),
            Some(Path::new("/etc/kb/secret.txt"))
        );
        assert_eq!(
            (s.deadline, s.retries, s.refresh_interval),
            (Duration::from_secs(3), 2, Duration::ZERO)
        );
        let (_, problems) = parse(
            r#"
            credential = "magic"
            client_secret = "hunter2"
            deadline = "1h"
            retries = 99
            colour = 1
            rsa_wrap_signatures = "maybe"
            "#,
        );
        let has = |s: &str| problems.iter().any(|p| p.starts_with(s));
        assert!(has("azure.credential: must be"), "{problems:?}");
        assert!(
            has("azure.client_secret: secrets do not belong"),
            "{problems:?}"
        );
        assert!(has("azure.deadline: must be"), "{problems:?}");
        assert!(has("azure.retries: must be"), "{problems:?}");
        assert!(has("azure.colour: unknown field"), "{problems:?}");
        assert!(has("azure.rsa_wrap_signatures: must be"), "{problems:?}");
        assert!(
            !problems.iter().any(|p| p.contains("hunter2")),
            "{problems:?}"
        );
        let (_, problems) = parse(r#"credential = "client_secret""#);
        assert!(
            problems
                .iter()
                .any(|p| p.starts_with("azure.client_secret_file: is required"))
        );
    }

    #[test]
    fn credential_needs_its_inputs() {
        let s = AzureSettings {
            credential: CredentialChoice::ClientSecret,
            tenant_id: Some("00000000-0000-0000-0000-000000000000".into()),
            client_id: Some("c".into()),
            client_secret_file: Some(PathBuf::from("/nonexistent/keybroker-secret")),
            ..Default::default()
        };
        let e = credential_from(&s).err().unwrap();
        assert!(e.contains("cannot read azure.client_secret_file"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("secret");
        std::fs::write(&f, "s3cret-value\n").unwrap();
        let s = AzureSettings {
            client_secret_file: Some(f),
            ..s
        };
        assert!(credential_from(&s).is_ok());
    }
}

//! Azure settings: the `[azure]` section (credential choice and its inputs, the shared call
//! policy `timeout` / `attempt_timeout` / `max_attempts`, the key-state refresh interval, RSA
//! wrap signatures), the Azure fields of `[keys.NAME]`, and the credential they select.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use azure_core::credentials::{Secret, TokenCredential};
use azure_identity::{
    ClientSecretCredential, ManagedIdentityCredential, ManagedIdentityCredentialOptions,
    UserAssignedId, WorkloadIdentityCredential, WorkloadIdentityCredentialOptions,
};
use zeroize::Zeroize;

use super::key_url::KeyUrl;
use crate::backend::BackendConfig;
use crate::backend::call::{CallPolicy, OldNames, Unset};
use crate::settings::{Problems, Section};

/// Standard environment variables of Azure workload identity (set by the AKS webhook).
pub const ENV_CLIENT_ID: &str = "AZURE_CLIENT_ID";
pub const ENV_TENANT_ID: &str = "AZURE_TENANT_ID";
pub const ENV_FEDERATED_TOKEN_FILE: &str = "AZURE_FEDERATED_TOKEN_FILE";

/// Defaults for the `[azure]` section (docs/azure.md argues each): the whole call, retries and
/// Retry-After waits included, within 10 s; up to 4 attempts, each of which may take what is
/// left of the 10 s.
pub const DEFAULT_CALL: CallPolicy = CallPolicy {
    timeout: Duration::from_secs(10),
    attempt_timeout: Duration::from_secs(10),
    max_attempts: 4,
};
pub const DEFAULT_REFRESH_INTERVAL: Duration = Duration::from_secs(60);
/// The names `[azure]` used before they were shared with the other backends.
const OLD_NAMES: OldNames = OldNames {
    deadline: Some("timeout"),
    retries: true,
};

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
    /// `timeout` (the whole call, retries and Retry-After waits included), `attempt_timeout`
    /// and `max_attempts` (retries after throttling, 5xx or connection failures).
    pub call: CallPolicy,
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
            call: DEFAULT_CALL,
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
        out.federated_token_file = s.path("federated_token_file", base, p);
        out.client_secret_file = s.path("client_secret_file", base, p);
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
        out.call = CallPolicy::parse(s, DEFAULT_CALL, Unset::AttemptTakesTimeout, OLD_NAMES, p);
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

/// Reads the Azure fields of `[keys.NAME]`: the key URL in `key_id`; the `[azure]` settings
/// apply to every Azure key.
pub fn key_config(
    s: &Section<'_>,
    key_id: &str,
    settings: &AzureSettings,
    p: &mut Problems,
) -> Option<BackendConfig> {
    let key = match KeyUrl::parse(key_id) {
        Ok(k) => k,
        Err(e) => {
            p.push(s.at("key_id"), e);
            return None;
        }
    };
    Some(BackendConfig::Azure {
        key_id: key_id.to_owned(),
        key,
        settings: Box::new(settings.clone()),
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_from_toml() {
        let parse = |text: &str| {
            let table: toml::Table = text.parse().unwrap();
            let s = Section::new(Some(&table), "azure");
            let mut p = Problems::default();
            let out = AzureSettings::parse(&s, Path::new("/etc/kb"), &mut p);
            s.finish(&mut p);
            (
                out,
                p.errors.iter().map(|p| p.to_string()).collect::<Vec<_>>(),
            )
        };
        let (s, problems) = parse(
            r#"
            credential = "client_secret"
            tenant_id = "t"
            client_id = "c"
            client_secret_file = "secret.txt"
            timeout = "3s"
            max_attempts = 3
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
            (s.call.timeout, s.call.max_attempts, s.refresh_interval),
            (Duration::from_secs(3), 3, Duration::ZERO)
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

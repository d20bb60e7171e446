//! Key Vault key URLs: `https://VAULT.vault.azure.net/keys/NAME[/VERSION]` (or a Managed HSM's,
//! or a sovereign cloud's), validated, and spelled the one way keybroker records them.

use azure_core::http::Url;

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

    /// The durable key id recorded in envelopes: the key without a version.
    pub fn unversioned(&self) -> String {
        format!("https://{}/keys/{}", self.host, self.name)
    }

    /// Whether `other` names the same key (names are case-insensitive in Key Vault).
    pub(super) fn same_key(&self, other: &KeyUrl) -> bool {
        self.host == other.host && self.name.eq_ignore_ascii_case(&other.name)
    }

    /// The versioned key id keybroker records for a wrap by `version` of this key: always the
    /// unversioned URL as configured, `/`, the version in lower case (Key Vault issues lower-case
    /// hex). One spelling per version, so a respelled copy cannot become a new cache entry.
    pub(super) fn kid(&self, version: &str) -> String {
        format!("{}/{}", self.unversioned(), version.to_ascii_lowercase())
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
}

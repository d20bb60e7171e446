//! What keybroker adds around Key Vault's wrap: the context binding inside the wrapped bytes,
//! the signature over RSA wraps, and what a `GET key` answer says about a key version.

use aws_lc_rs::{digest, signature};
use azure_security_keyvault_keys::models::{EncryptionAlgorithm, Key, KeyType};

use super::key_url::KeyUrl;
use crate::backend::BackendContext;

/// Labels the binding hash; names the format version of what Key Vault wraps.
pub(super) const BINDING_LABEL: &[u8] = b"keybroker azure wrap v1";
pub(super) const BINDING_LEN: usize = 32;
/// Random bytes ahead of the binding (a multiple of 8, as AES key wrap needs).
pub(super) const RANDOMIZER_LEN: usize = 16;
/// Bytes Key Vault wraps ahead of the data key.
pub(super) const PREFIX_LEN: usize = RANDOMIZER_LEN + BINDING_LEN;
/// Data keys are 16 or 32 bytes; anything else unwrapped is not ours.
pub(super) const MAX_DATA_KEY_LEN: usize = 64;
/// RSA-4096 OAEP output plus its PS256 signature is 1024 bytes; AES key wrap of 112 bytes is 120.
pub(super) const MAX_WRAPPED_LEN: usize = 2048;
/// Labels what Key Vault signs for an RSA wrap (the signed message, before hashing).
pub(super) const SIGNATURE_LABEL: &[u8] = b"keybroker azure wrap v2 signature";

/// The keybroker context bound into what Key Vault wraps.
pub(super) fn binding(ctx: &BackendContext<'_>) -> [u8; BINDING_LEN] {
    let mut d = digest::Context::new(&digest::SHA256);
    d.update(BINDING_LABEL);
    d.update(&ctx.to_aad());
    let mut out = [0u8; BINDING_LEN];
    out.copy_from_slice(d.finish().as_ref());
    out
}

/// The wrap algorithm Key Vault needs for a key type.
pub(super) fn algorithm_for(kty: &KeyType) -> Option<EncryptionAlgorithm> {
    match kty {
        KeyType::Rsa | KeyType::RsaHsm => Some(EncryptionAlgorithm::RsaOaep256),
        KeyType::Oct | KeyType::OctHsm => Some(EncryptionAlgorithm::A256Kw),
        _ => None,
    }
}

/// What `GET key` says about a key version, reduced to what keybroker decides on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct KeyFacts {
    pub(super) kid: String,
    pub(super) version: String,
    pub(super) algorithm: Option<EncryptionAlgorithm>,
    pub(super) kty: String,
    /// The `enabled` attribute: Key Vault refuses every operation on a disabled key.
    pub(super) enabled: bool,
    /// Enabled, inside nbf/exp, and permits wrapKey: new data keys can be wrapped. (Key Vault
    /// still unwraps with an expired or not-yet-valid key, so this does not stop decryption.)
    pub(super) usable: bool,
    pub(super) why_unusable: Option<&'static str>,
    /// An RSA key's public modulus and exponent (big-endian, no leading zeros), which check the
    /// signatures on its wraps.
    pub(super) rsa: Option<RsaPublic>,
    /// The version's `created` and `exp` attributes (its age; the rotation policy's anchors).
    pub(super) created: Option<std::time::SystemTime>,
    pub(super) expires: Option<std::time::SystemTime>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct RsaPublic {
    pub(super) n: Vec<u8>,
    pub(super) e: Vec<u8>,
}

impl RsaPublic {
    pub(super) fn modulus_len(&self) -> usize {
        self.n.len()
    }

    /// Checks a PS256 signature (salt length 32, as Key Vault and RFC 7518 use) over `message`.
    pub(super) fn verify(&self, message: &[u8], sig: &[u8]) -> bool {
        signature::RsaPublicKeyComponents {
            n: &self.n,
            e: &self.e,
        }
        .verify(&signature::RSA_PSS_2048_8192_SHA256, message, sig)
        .is_ok()
    }
}

pub(super) fn facts_of(key: &Key, expect: &KeyUrl) -> Result<KeyFacts, &'static str> {
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
        created: attrs.and_then(|a| a.created).and_then(system_time),
        expires: attrs.and_then(|a| a.expires).and_then(system_time),
    })
}

/// A Key Vault time as a `SystemTime`, `None` before 1970.
fn system_time(t: azure_core::time::OffsetDateTime) -> Option<std::time::SystemTime> {
    u64::try_from(t.unix_timestamp())
        .ok()
        .and_then(|s| std::time::UNIX_EPOCH.checked_add(std::time::Duration::from_secs(s)))
}

/// What Key Vault signs for an RSA wrap (as SHA-256 of it, with PS256): the label, the recorded
/// versioned key id, the context binding and the RSA ciphertext, each of fixed or prefixed
/// length.
pub(super) fn signed_message(
    kid: &str,
    binding: &[u8; BINDING_LEN],
    rsa_ciphertext: &[u8],
) -> Vec<u8> {
    let mut m =
        Vec::with_capacity(SIGNATURE_LABEL.len() + 2 + kid.len() + 32 + rsa_ciphertext.len());
    m.extend_from_slice(SIGNATURE_LABEL);
    m.extend_from_slice(&(kid.len().min(u16::MAX as usize) as u16).to_be_bytes());
    m.extend_from_slice(kid.as_bytes());
    m.extend_from_slice(binding);
    m.extend_from_slice(rsa_ciphertext);
    m
}

#[cfg(test)]
mod tests {
    use super::*;

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
}

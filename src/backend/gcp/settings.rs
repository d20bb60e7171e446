//! Cloud KMS settings: the `[gcp]` section (endpoint, the shared call policy `timeout` /
//! `attempt_timeout` / `max_attempts`, `connect_timeout`; credentials only from code), the GCP
//! fields of `[keys.NAME]`, and the checks of CryptoKey names and endpoints.

use std::time::Duration;

use gcloud_sdk::google_cloud_auth::credentials::Credentials;

use crate::backend::BackendConfig;
use crate::backend::call::{CallPolicy, MAX_TIME, MIN_TIME, OldNames, Unset};
use crate::settings::{Problems, Section};

/// Cloud KMS's global gRPC endpoint.
pub const DEFAULT_ENDPOINT: &str = "https://cloudkms.googleapis.com";
/// Time allowed for one attempt of one call (token fetch included). Cloud KMS answers software
/// keys in tens of milliseconds; 10 s leaves room for a cold token fetch without letting a stuck
/// call hold a request forever.
pub const DEFAULT_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
/// Attempts after UNAVAILABLE, DEADLINE_EXCEEDED or RESOURCE_EXHAUSTED, the first included.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The `[gcp]` call policy when nothing is set: `timeout` covers every attempt.
pub const DEFAULT_CALL: CallPolicy = CallPolicy {
    timeout: Duration::from_secs(36),
    attempt_timeout: DEFAULT_ATTEMPT_TIMEOUT,
    max_attempts: DEFAULT_MAX_ATTEMPTS,
};
/// The names `[gcp]` used before they were shared with the other backends.
const OLD_NAMES: OldNames = OldNames {
    deadline: Some("attempt_timeout"),
    retries: true,
};

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
    /// `timeout`, `attempt_timeout` (sent as `grpc-timeout`) and `max_attempts`.
    pub call: CallPolicy,
    pub connect_timeout: Duration,
    pub credentials: GcpCredentials,
}

impl Default for GcpSettings {
    fn default() -> Self {
        Self {
            endpoint: DEFAULT_ENDPOINT.to_owned(),
            call: DEFAULT_CALL,
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
        g.call = CallPolicy::parse(s, DEFAULT_CALL, Unset::TimeoutCoversAttempts, OLD_NAMES, p);
        if let Some(d) = s.duration_in("connect_timeout", MIN_TIME, MAX_TIME, p) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_timeout_covers_every_attempt() {
        assert_eq!(
            DEFAULT_CALL.timeout,
            CallPolicy::all_attempts(DEFAULT_ATTEMPT_TIMEOUT, DEFAULT_MAX_ATTEMPTS)
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
}

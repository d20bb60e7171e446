//! Key Vault failures in keybroker's terms: the operations, Key Vault's error body, and the
//! [`BackendErrorKind`] and message of our own each answer becomes. Key Vault's text stays in
//! the error's `source` (logged), because it can name identities and vault internals.

use std::time::Duration;

use azure_core::error::ErrorKind;
use azure_core::http::headers::{HeaderName, RETRY_AFTER};

use super::key_url::KeyUrl;
use crate::backend::{BackendError, BackendErrorKind, BackendKind};

/// The operations keybroker calls, for messages and error mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Op {
    Get,
    Wrap,
    Unwrap,
    Sign,
    /// GET `keys/{name}/rotationpolicy` (`rotation_state = true`, off the request path).
    GetRotationPolicy,
}

impl Op {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Op::Get => "get",
            Op::Wrap => "wrapKey",
            Op::Unwrap => "unwrapKey",
            Op::Sign => "sign",
            Op::GetRotationPolicy => "getRotationPolicy",
        }
    }
}

/// Retry-After (seconds or an HTTP date) or retry-after-ms / x-ms-retry-after-ms.
pub(super) fn retry_after(e: &azure_core::Error) -> Option<Duration> {
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
pub(super) fn classify(op: Op, key: &KeyUrl, e: &azure_core::Error) -> BackendError {
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
                    if op == Op::GetRotationPolicy {
                        err(
                            K::PermissionDenied,
                            format!(
                                "keybroker's identity may not read the rotation policy of {} (needs Microsoft.KeyVault/vaults/keys/rotationpolicy/read, or the Get Rotation Policy access-policy permission)",
                                key.unversioned()
                            ),
                        )
                    } else if key_state {
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

//! Cloud KMS failures in keybroker's terms: each attempt's failure, how the call policy treats
//! it (transient, integrity, final), and the [`BackendErrorKind`] and message of our own it
//! becomes. Google's message only ever reaches the log, through the error's `source`.

use std::time::Duration;

use tonic::Code;

use crate::backend::call::Retry;
use crate::backend::{BackendError, BackendErrorKind, BackendKind};
use crate::util::format_duration;

/// The Cloud KMS methods keybroker calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Op {
    Encrypt,
    Decrypt,
    GetCryptoKey,
}

impl Op {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Self::Encrypt => "Encrypt",
            Self::Decrypt => "Decrypt",
            Self::GetCryptoKey => "GetCryptoKey",
        }
    }
}

/// One failed attempt.
#[derive(Debug, thiserror::Error)]
pub(super) enum Failure {
    #[error("{0}")]
    Status(tonic::Status),
    #[error("no answer within {}", format_duration(*.0))]
    Timeout(Duration),
    /// A response failed a CRC32C check (or did not confirm ours).
    #[error("{0}")]
    Integrity(&'static str),
    /// A response that Cloud KMS should never send.
    #[error("{0}")]
    Unexpected(&'static str),
}

impl Failure {
    /// What the call policy does next: transient failures back off and retry, a checksum
    /// mismatch (ours or the server's) is retried once (Google's guidance is "a limited number
    /// of retries", and a persistent mismatch is a fault to report), the rest is final.
    pub(super) fn retry(&self) -> Retry {
        match self {
            Self::Timeout(_) | Self::Status(_) if self.is_transient() => Retry::Backoff,
            Self::Integrity(_) => Retry::Once,
            Self::Status(s) if is_checksum_rejection(s) => Retry::Once,
            _ => Retry::No,
        }
    }

    fn is_transient(&self) -> bool {
        match self {
            Self::Timeout(_) => true,
            Self::Status(s) => {
                matches!(
                    s.code(),
                    Code::Unavailable | Code::DeadlineExceeded | Code::ResourceExhausted
                ) || credentials_error(s).unwrap_or_else(|| is_transport_failure(s))
            }
            _ => false,
        }
    }

    pub(super) fn into_backend_error(self, op: Op) -> BackendError {
        use BackendErrorKind as K;
        let (kind, message): (BackendErrorKind, &'static str) = match &self {
            Self::Timeout(_) => (
                K::DeadlineExceeded,
                "Cloud KMS did not answer within the deadline",
            ),
            Self::Integrity(_) => (
                K::Integrity,
                "Cloud KMS response failed its CRC32C check twice; no key was returned",
            ),
            Self::Unexpected(_) => (K::Internal, "unexpected Cloud KMS response"),
            Self::Status(s) if is_checksum_rejection(s) => (
                K::Integrity,
                "Cloud KMS rejected the request checksums twice (corruption in transit)",
            ),
            Self::Status(s) => status_kind(s, op),
        };
        let e = BackendError::new(BackendKind::Gcp, kind, message);
        match self {
            Self::Status(s) => e.with_source(s),
            other => e.with_source(other),
        }
    }
}

/// The shared error kind and our own message for a Cloud KMS status. Google's message is never
/// used here: it only reaches the log, through `source`.
fn status_kind(s: &tonic::Status, op: Op) -> (BackendErrorKind, &'static str) {
    use BackendErrorKind as K;
    match s.code() {
        Code::NotFound => (
            K::NotFound,
            "the Cloud KMS key or key version does not exist",
        ),
        Code::FailedPrecondition => (
            K::Disabled,
            "the Cloud KMS key version is not enabled (disabled, destroyed or scheduled for destruction)",
        ),
        Code::PermissionDenied => (
            K::PermissionDenied,
            "Cloud KMS denied keybroker's identity the use of this key \
             (it needs roles/cloudkms.cryptoKeyEncrypterDecrypter)",
        ),
        Code::Unauthenticated => (
            K::Unauthenticated,
            "Cloud KMS rejected keybroker's credentials",
        ),
        Code::ResourceExhausted => (K::Throttled, "Cloud KMS quota exhausted or rate limited"),
        Code::InvalidArgument if op == Op::Decrypt => (
            K::InvalidCiphertext,
            "the wrapped key does not decrypt under this key and context",
        ),
        Code::InvalidArgument => (
            K::InvalidArgument,
            "Cloud KMS rejected the request as invalid",
        ),
        Code::Unavailable | Code::Cancelled | Code::Aborted | Code::Internal => {
            (K::Unavailable, "Cloud KMS is unreachable or unavailable")
        }
        Code::DeadlineExceeded => (
            K::DeadlineExceeded,
            "Cloud KMS did not answer within the deadline",
        ),
        _ => match credentials_error(s) {
            Some(true) => (
                K::Unavailable,
                "Google credentials are temporarily unavailable",
            ),
            Some(false) => (
                K::Unauthenticated,
                "no usable Google credentials (Application Default Credentials)",
            ),
            None if is_transport_failure(s) => (
                K::Unavailable,
                "the connection to Cloud KMS failed (reset or closed)",
            ),
            None => (K::Internal, "unexpected Cloud KMS response"),
        },
    }
}

/// Cloud KMS answers INVALID_ARGUMENT "The checksum in field X did not match the data in field
/// Y." when a request checksum does not match what it received: corruption on the way there.
fn is_checksum_rejection(s: &tonic::Status) -> bool {
    s.code() == Code::InvalidArgument && s.message().starts_with("The checksum in field")
}

/// When the call failed because no token could be had: `Some(transient)`.
fn credentials_error(s: &tonic::Status) -> Option<bool> {
    use gcloud_sdk::error::{Error, ErrorKind};
    let mut cur: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(s);
    let mut depth = 0;
    while let Some(e) = cur {
        let sdk = e
            .downcast_ref::<Error>()
            .or_else(|| e.downcast_ref::<Box<Error>>().map(|b| &**b));
        if let Some(sdk) = sdk {
            return match sdk.kind() {
                ErrorKind::Credentials(c) => Some(c.is_transient()),
                ErrorKind::CredentialsBuild(_) | ErrorKind::CryptoProviderMissing => Some(false),
                _ => None,
            };
        }
        depth += 1;
        if depth > 16 {
            break;
        }
        cur = e.source();
    }
    None
}

/// A status tonic made itself for a failed connection (reset, closed mid-call, an h2 protocol
/// error): code UNKNOWN with the transport error as its source (asked after the credential
/// errors, which have a source too). One Cloud KMS sent carries no source. Found by the fault proxy (tests/faults.rs): a reset connection was INTERNAL before.
fn is_transport_failure(s: &tonic::Status) -> bool {
    s.code() == Code::Unknown && std::error::Error::source(s).is_some()
}

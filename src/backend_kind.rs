//! The backend vocabulary every layer shares: which kind of backend wrapped a data key (with
//! its numeric code, part of the envelope format) and what kinds of failure a backend reports.
//! Plain values, no behaviour: `backend` implements backends; this only names them.
//!
//! Must never: change a numeric code (ciphertexts on disk carry them) or a label (dashboards
//! and alerts match on them).

use std::fmt;

/// Which kind of backend wrapped a data key. The numeric codes are part of the envelope format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum BackendKind {
    Local,
    Aws,
    Gcp,
    Azure,
}

impl BackendKind {
    pub const ALL: [BackendKind; 4] = [Self::Local, Self::Aws, Self::Gcp, Self::Azure];

    pub fn code(self) -> u8 {
        match self {
            Self::Local => 1,
            Self::Aws => 2,
            Self::Gcp => 3,
            Self::Azure => 4,
        }
    }

    pub fn from_code(code: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.code() == code)
    }

    /// The name in configuration files, metric labels and audit records.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Local => "local",
            Self::Aws => "aws",
            Self::Gcp => "gcp",
            Self::Azure => "azure",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What went wrong in a backend, in the terms callers are given.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum BackendErrorKind {
    /// The key (or key version) does not exist.
    NotFound,
    /// The key is disabled, pending deletion, expired, or does not permit the operation.
    Disabled,
    /// The backend refused our identity's access to the key.
    PermissionDenied,
    /// The backend refused our credentials (expired or invalid token).
    Unauthenticated,
    /// The wrapped key is not valid for this key or context: decryption fails.
    InvalidCiphertext,
    /// Rate limited or quota exhausted, after the call policy's retries.
    Throttled,
    /// Network failure, 5xx, or the backend is down.
    Unavailable,
    /// The call's deadline passed.
    DeadlineExceeded,
    /// A response failed an integrity check (e.g. Cloud KMS CRC32C) after a retry.
    Integrity,
    /// The request was malformed for this backend (e.g. a data key length it cannot make).
    InvalidArgument,
    /// A bug or an unexpected response.
    Internal,
}

impl BackendErrorKind {
    pub const ALL: [BackendErrorKind; 11] = [
        Self::NotFound,
        Self::Disabled,
        Self::PermissionDenied,
        Self::Unauthenticated,
        Self::InvalidCiphertext,
        Self::Throttled,
        Self::Unavailable,
        Self::DeadlineExceeded,
        Self::Integrity,
        Self::InvalidArgument,
        Self::Internal,
    ];

    /// The metric label of a failed backend call with this kind (docs/metrics.md).
    pub fn label(self) -> &'static str {
        match self {
            Self::NotFound => "not_found",
            Self::Disabled => "disabled",
            Self::PermissionDenied => "permission_denied",
            Self::Unauthenticated => "unauthenticated",
            Self::InvalidCiphertext => "invalid_ciphertext",
            Self::Throttled => "throttled",
            Self::Unavailable => "unavailable",
            Self::DeadlineExceeded => "deadline_exceeded",
            Self::Integrity => "integrity",
            Self::InvalidArgument => "invalid_argument",
            Self::Internal => "internal",
        }
    }
}

impl fmt::Display for BackendErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::NotFound => "not found",
            Self::Disabled => "key not usable",
            Self::PermissionDenied => "permission denied",
            Self::Unauthenticated => "unauthenticated",
            Self::InvalidCiphertext => "invalid ciphertext",
            Self::Throttled => "throttled",
            Self::Unavailable => "unavailable",
            Self::DeadlineExceeded => "deadline exceeded",
            Self::Integrity => "integrity check failed",
            Self::InvalidArgument => "invalid argument",
            Self::Internal => "internal error",
        })
    }
}

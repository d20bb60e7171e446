//! The request-level error type, and the one place it becomes a gRPC status.
//!
//! Every status carries a `google.rpc.ErrorInfo` detail (domain `keybroker.io`) with a stable
//! `reason` that clients can switch on. Messages name keys, callers and operations (all from the
//! configuration, not secret) and never contain plaintext, key bytes or a provider's raw
//! response; the full cause chain is logged here instead.

use std::collections::HashMap;
use std::error::Error as _;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::backend::{BackendError, BackendErrorKind};
use crate::envelope::FormatError;

pub const ERROR_DOMAIN: &str = "keybroker.io";

#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// The request (or a ciphertext) names a key the configuration does not have.
    #[error("key {:?} is not configured", crate::util::Capped(key))]
    KeyNotFound { key: String },
    /// The key is switched off in the configuration or in its backend.
    #[error("key {key:?} is disabled")]
    KeyDisabled { key: String },
    #[error("{0}")]
    InvalidArgument(String),
    /// The request body is not a valid protobuf message of the method's type (wire format, or
    /// a string field that is not UTF-8).
    #[error("the request is not a valid protobuf message: {0}")]
    MalformedRequest(String),
    /// The bytes are not a keybroker ciphertext at all.
    #[error("invalid ciphertext: {0}")]
    InvalidCiphertext(#[from] FormatError),
    /// Tampering, a wrong context or a wrong key: deliberately indistinguishable.
    #[error("decryption failed: the ciphertext does not authenticate with this context")]
    DecryptionFailed,
    #[error("{what} is {size} bytes; the limit is {limit} bytes")]
    RequestTooLarge {
        what: &'static str,
        size: u64,
        limit: u64,
    },
    /// The request message is larger than the service decodes at all (checked by the
    /// transport before the message is read; same reason as [`Error::RequestTooLarge`]).
    #[error("the request message is larger than the limit of {limit} bytes")]
    MessageTooLarge { limit: u64 },
    #[error("caller {caller:?} is not allowed to {operation} with key {key:?}")]
    PolicyDenied {
        caller: String,
        key: String,
        operation: &'static str,
    },
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
    #[error("key {key:?}: {source}")]
    Backend {
        key: String,
        #[source]
        source: BackendError,
    },
    #[error("the audit log cannot record this request, so it is refused")]
    AuditUnavailable,
    #[error("internal error: {0}")]
    Internal(&'static str),
}

impl Error {
    pub fn backend(key: &str, source: BackendError) -> Self {
        // A backend that says the wrapped key does not authenticate is one more way decryption
        // fails; callers must not learn which.
        if source.kind == BackendErrorKind::InvalidCiphertext {
            tracing::debug!(key, error = %source, "backend rejected a wrapped key");
            return Error::DecryptionFailed;
        }
        Error::Backend {
            key: key.to_owned(),
            source,
        }
    }

    /// The gRPC code and the stable ErrorInfo reason.
    pub fn code_and_reason(&self) -> (Code, &'static str) {
        match self {
            Error::KeyNotFound { .. } => (Code::NotFound, "KEY_NOT_FOUND"),
            Error::KeyDisabled { .. } => (Code::FailedPrecondition, "KEY_DISABLED"),
            Error::InvalidArgument(_) => (Code::InvalidArgument, "INVALID_ARGUMENT"),
            Error::MalformedRequest(_) => (Code::InvalidArgument, "MALFORMED_REQUEST"),
            Error::MessageTooLarge { .. } => (Code::ResourceExhausted, "REQUEST_TOO_LARGE"),
            Error::InvalidCiphertext(_) => (Code::InvalidArgument, "INVALID_CIPHERTEXT"),
            Error::DecryptionFailed => (Code::InvalidArgument, "DECRYPTION_FAILED"),
            Error::RequestTooLarge { .. } => (Code::ResourceExhausted, "REQUEST_TOO_LARGE"),
            Error::PolicyDenied { .. } => (Code::PermissionDenied, "POLICY_DENIED"),
            Error::Unauthenticated(_) => (Code::Unauthenticated, "UNAUTHENTICATED"),
            Error::AuditUnavailable => (Code::Unavailable, "AUDIT_UNAVAILABLE"),
            Error::Internal(_) => (Code::Internal, "INTERNAL"),
            Error::Backend { source, .. } => match source.kind {
                BackendErrorKind::NotFound => (Code::NotFound, "BACKEND_KEY_NOT_FOUND"),
                BackendErrorKind::Disabled => (Code::FailedPrecondition, "KEY_DISABLED"),
                BackendErrorKind::PermissionDenied => {
                    (Code::PermissionDenied, "BACKEND_PERMISSION_DENIED")
                }
                BackendErrorKind::Unauthenticated => {
                    (Code::Unauthenticated, "BACKEND_UNAUTHENTICATED")
                }
                BackendErrorKind::InvalidCiphertext => (Code::InvalidArgument, "DECRYPTION_FAILED"),
                BackendErrorKind::Throttled => (Code::ResourceExhausted, "BACKEND_THROTTLED"),
                BackendErrorKind::Unavailable => (Code::Unavailable, "BACKEND_UNAVAILABLE"),
                BackendErrorKind::DeadlineExceeded => {
                    (Code::DeadlineExceeded, "BACKEND_DEADLINE_EXCEEDED")
                }
                BackendErrorKind::Integrity => (Code::Unavailable, "BACKEND_INTEGRITY"),
                BackendErrorKind::InvalidArgument => {
                    (Code::InvalidArgument, "BACKEND_INVALID_ARGUMENT")
                }
                BackendErrorKind::Internal => (Code::Internal, "BACKEND_INTERNAL"),
            },
        }
    }

    pub fn to_status(&self) -> Status {
        let (code, reason) = self.code_and_reason();
        let mut metadata = HashMap::new();
        match self {
            Error::KeyNotFound { key } | Error::KeyDisabled { key } => {
                // A name from a ciphertext is not checked against the name rules: cap it.
                metadata.insert("key".to_owned(), crate::util::Capped(key).to_string());
            }
            Error::PolicyDenied {
                caller,
                key,
                operation,
            } => {
                metadata.insert("caller".to_owned(), caller.clone());
                metadata.insert("key".to_owned(), key.clone());
                metadata.insert("operation".to_owned(), (*operation).to_owned());
            }
            Error::Backend { key, source } => {
                metadata.insert("key".to_owned(), key.clone());
                metadata.insert("backend".to_owned(), source.backend.as_str().to_owned());
            }
            Error::RequestTooLarge { limit, .. } | Error::MessageTooLarge { limit } => {
                metadata.insert("limit_bytes".to_owned(), limit.to_string());
            }
            _ => {}
        }
        self.log(code);
        Status::with_error_details(
            code,
            self.to_string(),
            ErrorDetails::with_error_info(reason, ERROR_DOMAIN, metadata),
        )
    }

    /// Server-side faults are logged with their whole cause chain; caller mistakes at debug.
    fn log(&self, code: Code) {
        let mut chain = String::new();
        let mut cause = self.source();
        while let Some(c) = cause {
            chain.push_str(": ");
            chain.push_str(&c.to_string());
            cause = c.source();
        }
        match code {
            Code::Internal | Code::Unavailable | Code::DeadlineExceeded | Code::Unauthenticated
                if matches!(
                    self,
                    Error::Backend { .. } | Error::AuditUnavailable | Error::Internal(_)
                ) =>
            {
                tracing::warn!(code = ?code, error = %self, cause = %chain, "request failed")
            }
            _ => tracing::debug!(code = ?code, error = %self, cause = %chain, "request failed"),
        }
    }
}

impl From<Error> for Status {
    fn from(e: Error) -> Self {
        e.to_status()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::BackendKind;

    #[test]
    fn statuses_carry_reason_details() {
        let s = Error::KeyNotFound { key: "k".into() }.to_status();
        assert_eq!(s.code(), Code::NotFound);
        let info = s.get_details_error_info().unwrap();
        assert_eq!(info.reason, "KEY_NOT_FOUND");
        assert_eq!(info.domain, ERROR_DOMAIN);
        assert_eq!(info.metadata["key"], "k");
    }

    #[test]
    fn backend_invalid_ciphertext_is_plain_decryption_failure() {
        let e = Error::backend(
            "k",
            BackendError::new(
                BackendKind::Local,
                BackendErrorKind::InvalidCiphertext,
                "detail",
            ),
        );
        let s = e.to_status();
        assert_eq!(s.code(), Code::InvalidArgument);
        assert_eq!(
            s.get_details_error_info().unwrap().reason,
            "DECRYPTION_FAILED"
        );
        assert!(!s.message().contains("detail"));
    }

    #[test]
    fn backend_unavailable_names_the_backend() {
        let e = Error::backend(
            "k",
            BackendError::new(
                BackendKind::Aws,
                BackendErrorKind::Unavailable,
                "connection refused",
            ),
        );
        let s = e.to_status();
        assert_eq!(s.code(), Code::Unavailable);
        assert!(s.message().contains("aws"), "{}", s.message());
        assert_eq!(
            s.get_details_error_info().unwrap().metadata["backend"],
            "aws"
        );
    }
}

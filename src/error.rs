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
    /// The request names a key the configuration does not have. The caller is answered exactly
    /// as for a key it has no grant on ([`Error::NoGrant`]), so key names cannot be enumerated;
    /// this variant (KEY_NOT_FOUND) is what the log, the metrics and the audit record keep.
    #[error("key {:?} is not configured", crate::util::Capped(key))]
    KeyNotFound {
        key: String,
        caller: String,
        operation: &'static str,
    },
    /// The caller holds no grant at all on the key: the answer does not reveal whether the key
    /// exists. With `key: None`, no key's policy grants the caller this operation, and the
    /// request was refused before its body was read (`admission`).
    #[error("{}", no_grant_message(caller, key.as_deref(), operation))]
    NoGrant {
        caller: String,
        key: Option<String>,
        operation: &'static str,
    },
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
            Error::NoGrant { .. } => (Code::PermissionDenied, "POLICY_DENIED"),
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

    /// What the caller is told: an unknown key looks like a key without a grant.
    fn public(&self) -> std::borrow::Cow<'_, Error> {
        match self {
            Error::KeyNotFound {
                key,
                caller,
                operation,
            } => std::borrow::Cow::Owned(Error::NoGrant {
                caller: caller.clone(),
                key: Some(key.clone()),
                operation,
            }),
            other => std::borrow::Cow::Borrowed(other),
        }
    }

    pub fn to_status(&self) -> Status {
        self.log(self.code_and_reason().0);
        let public = self.public();
        let public = public.as_ref();
        let (code, reason) = public.code_and_reason();
        let mut metadata = HashMap::new();
        match public {
            Error::KeyNotFound { key, .. } | Error::KeyDisabled { key } => {
                // A name from a ciphertext is not checked against the name rules: cap it.
                metadata.insert("key".to_owned(), crate::util::Capped(key).to_string());
            }
            Error::NoGrant {
                caller,
                key,
                operation,
            } => {
                metadata.insert("caller".to_owned(), caller.clone());
                if let Some(key) = key {
                    metadata.insert("key".to_owned(), crate::util::Capped(key).to_string());
                }
                metadata.insert("operation".to_owned(), (*operation).to_owned());
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
        Status::with_error_details(
            code,
            public.to_string(),
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

fn no_grant_message(caller: &str, key: Option<&str>, operation: &str) -> String {
    match key {
        // Worded for both cases it covers: no grant on an existing key, and no such key.
        Some(key) => format!(
            "caller {caller:?} is not allowed to {operation} with key {:?} (no grant, or no such key)",
            crate::util::Capped(key)
        ),
        None => format!(
            "caller {caller:?} is not allowed to {operation} with any key: no key's policy grants it"
        ),
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
        let s = Error::KeyDisabled { key: "k".into() }.to_status();
        assert_eq!(s.code(), Code::FailedPrecondition);
        let info = s.get_details_error_info().unwrap();
        assert_eq!(info.reason, "KEY_DISABLED");
        assert_eq!(info.domain, ERROR_DOMAIN);
        assert_eq!(info.metadata["key"], "k");
    }

    #[test]
    fn an_unknown_key_is_answered_like_a_key_without_a_grant() {
        let unknown = Error::KeyNotFound {
            key: "k".into(),
            caller: "c".into(),
            operation: "encrypt",
        };
        assert_eq!(unknown.code_and_reason(), (Code::NotFound, "KEY_NOT_FOUND"));
        let no_grant = Error::NoGrant {
            caller: "c".into(),
            key: Some("k".into()),
            operation: "encrypt",
        };
        let (a, b) = (unknown.to_status(), no_grant.to_status());
        assert_eq!((a.code(), a.message()), (b.code(), b.message()));
        assert_eq!(a.code(), Code::PermissionDenied);
        let (ia, ib) = (
            a.get_details_error_info().unwrap(),
            b.get_details_error_info().unwrap(),
        );
        assert_eq!((&ia.reason, &ia.metadata), (&ib.reason, &ib.metadata));
        assert_eq!(a.get_details_error_info().unwrap().reason, "POLICY_DENIED");
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

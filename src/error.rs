//! The request-level error type, in domain terms: what went wrong, the stable reason clients
//! can switch on (`KEY_DISABLED`, `POLICY_DENIED`, ...), and what a caller may be told about it.
//! The one mapping to a gRPC status (code, message, ErrorInfo details, logging of the cause
//! chain) is `status`, at the edge; nothing here knows about gRPC.
//!
//! Messages name keys, callers and operations (all from the configuration, not secret) and never
//! contain plaintext, key bytes or a provider's raw response (that stays in the `source` chain,
//! for the log).

use std::borrow::Cow;

use crate::backend::{BackendError, BackendErrorKind};
use crate::envelope::FormatError;
use crate::util::Capped;

#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// The request names a key the configuration does not have. The caller is answered exactly
    /// as for a key it has no grant on ([`Error::NoGrant`]), so key names cannot be enumerated;
    /// this variant (KEY_NOT_FOUND) is what the log, the metrics and the audit record keep.
    #[error("key {:?} is not configured", Capped(key))]
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
    /// The key is scheduled for deletion (docs/lifecycle.md): every use is refused until the
    /// deletion is cancelled, which restores it fully.
    #[error("key {key:?} is pending deletion; cancel with `keybroker keys cancel-deletion {key}`")]
    KeyPendingDeletion { key: String },
    /// The ciphertext is under a key version below the key's `min_decrypt_version`: retired
    /// for decryption. ReEncrypt (`keybroker rewrap`) still moves such data forward.
    #[error(
        "key {key:?} version {version} is retired (min_decrypt_version is {min}); re-encrypt the \
         data to the current version with `keybroker rewrap`"
    )]
    VersionRetired { key: String, version: u64, min: u64 },
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
    /// A batch with more items than `[server] max_batch_items`.
    #[error("the batch has {items} items; the limit is {limit}")]
    BatchTooLarge { items: u64, limit: u64 },
    /// The client ended (or reset) a stream before it was complete: nothing was finished.
    #[error("the stream was cancelled by the client before it ended")]
    StreamCancelled,
    #[error("the audit log cannot record this request, so it is refused")]
    AuditUnavailable,
    /// The listener already has its limit of requests in flight (`[server.limits]
    /// max_requests_in_flight`): refused at once instead of queued, so that a burst cannot
    /// grow memory or latency without bound. The caller may retry after a backoff.
    #[error(
        "the server is overloaded: {limit} requests are already in flight on this listener; retry later"
    )]
    Overloaded { limit: u64 },
    #[error("internal error: {0}")]
    Internal(&'static str),
    /// A request this front door cannot serve as asked although it is well formed: a Kubernetes
    /// KMS `key_id` of another key, or a result over kube-apiserver's limits. `reason` is the
    /// stable ErrorInfo reason; `message` names only configuration values and limits.
    #[error("{message}")]
    Precondition {
        reason: &'static str,
        message: String,
    },
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

    /// The stable ErrorInfo reason (docs/api.md lists them).
    pub fn reason(&self) -> &'static str {
        match self {
            Error::KeyNotFound { .. } => "KEY_NOT_FOUND",
            Error::NoGrant { .. } | Error::PolicyDenied { .. } => "POLICY_DENIED",
            Error::KeyDisabled { .. } => "KEY_DISABLED",
            Error::KeyPendingDeletion { .. } => "KEY_PENDING_DELETION",
            Error::VersionRetired { .. } => "KEY_VERSION_RETIRED",
            Error::InvalidArgument(_) => "INVALID_ARGUMENT",
            Error::MalformedRequest(_) => "MALFORMED_REQUEST",
            Error::MessageTooLarge { .. } | Error::RequestTooLarge { .. } => "REQUEST_TOO_LARGE",
            Error::InvalidCiphertext(_) => "INVALID_CIPHERTEXT",
            Error::DecryptionFailed => "DECRYPTION_FAILED",
            Error::Unauthenticated(_) => "UNAUTHENTICATED",
            Error::BatchTooLarge { .. } => "BATCH_TOO_LARGE",
            Error::StreamCancelled => "STREAM_CANCELLED",
            Error::AuditUnavailable => "AUDIT_UNAVAILABLE",
            Error::Overloaded { .. } => "OVERLOADED",
            Error::Internal(_) => "INTERNAL",
            Error::Precondition { reason, .. } => reason,
            Error::Backend { source, .. } => match source.kind {
                BackendErrorKind::NotFound => "BACKEND_KEY_NOT_FOUND",
                BackendErrorKind::Disabled => "KEY_DISABLED",
                BackendErrorKind::PermissionDenied => "BACKEND_PERMISSION_DENIED",
                BackendErrorKind::Unauthenticated => "BACKEND_UNAUTHENTICATED",
                BackendErrorKind::InvalidCiphertext => "DECRYPTION_FAILED",
                BackendErrorKind::Throttled => "BACKEND_THROTTLED",
                BackendErrorKind::Unavailable => "BACKEND_UNAVAILABLE",
                BackendErrorKind::DeadlineExceeded => "BACKEND_DEADLINE_EXCEEDED",
                BackendErrorKind::Integrity => "BACKEND_INTEGRITY",
                BackendErrorKind::InvalidArgument => "BACKEND_INVALID_ARGUMENT",
                BackendErrorKind::Internal => "BACKEND_INTERNAL",
            },
        }
    }

    /// Whether the fault is keybroker's or its dependencies' (a backend, the audit log) rather
    /// than the caller's: such errors are logged with their cause chain at warn level.
    pub fn is_server_fault(&self) -> bool {
        matches!(
            self,
            Error::Backend { .. } | Error::AuditUnavailable | Error::Internal(_)
        )
    }

    /// What the caller is told: an unknown key looks like a key without a grant.
    pub fn public(&self) -> Cow<'_, Error> {
        match self {
            Error::KeyNotFound {
                key,
                caller,
                operation,
            } => Cow::Owned(Error::NoGrant {
                caller: caller.clone(),
                key: Some(key.clone()),
                operation,
            }),
            other => Cow::Borrowed(other),
        }
    }

    /// The ErrorInfo metadata of this error as the caller sees it (call it on [`Error::public`]):
    /// which key, caller, operation, backend or limit it is about. Names from a ciphertext are
    /// not checked against the name rules, so they are capped.
    pub fn details(&self) -> Vec<(&'static str, String)> {
        match self {
            Error::KeyNotFound { key, .. }
            | Error::KeyDisabled { key }
            | Error::KeyPendingDeletion { key } => {
                vec![("key", Capped(key).to_string())]
            }
            Error::VersionRetired { key, version, min } => vec![
                ("key", key.clone()),
                ("key_version", version.to_string()),
                ("min_decrypt_version", min.to_string()),
            ],
            Error::NoGrant {
                caller,
                key,
                operation,
            } => {
                let mut d = vec![("caller", caller.clone())];
                if let Some(key) = key {
                    d.push(("key", Capped(key).to_string()));
                }
                d.push(("operation", (*operation).to_owned()));
                d
            }
            Error::PolicyDenied {
                caller,
                key,
                operation,
            } => vec![
                ("caller", caller.clone()),
                ("key", key.clone()),
                ("operation", (*operation).to_owned()),
            ],
            Error::Backend { key, source } => vec![
                ("key", key.clone()),
                ("backend", source.backend.as_str().to_owned()),
            ],
            Error::RequestTooLarge { limit, .. } | Error::MessageTooLarge { limit } => {
                vec![("limit_bytes", limit.to_string())]
            }
            Error::BatchTooLarge { limit, .. } => vec![("limit_items", limit.to_string())],
            Error::Overloaded { limit } => vec![("limit_requests", limit.to_string())],
            _ => Vec::new(),
        }
    }
}

fn no_grant_message(caller: &str, key: Option<&str>, operation: &str) -> String {
    match key {
        // Worded for both cases it covers: no grant on an existing key, and no such key.
        Some(key) => format!(
            "caller {caller:?} is not allowed to {operation} with key {:?} (no grant, or no such key)",
            Capped(key)
        ),
        None => format!(
            "caller {caller:?} is not allowed to {operation} with any key: no key's policy grants it"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::BackendKind;

    #[test]
    fn an_unknown_key_is_told_as_a_key_without_a_grant() {
        let unknown = Error::KeyNotFound {
            key: "k".into(),
            caller: "c".into(),
            operation: "encrypt",
        };
        assert_eq!(unknown.reason(), "KEY_NOT_FOUND");
        let public = unknown.public();
        assert_eq!(public.reason(), "POLICY_DENIED");
        assert!(matches!(*public, Error::NoGrant { .. }));
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
        assert!(matches!(e, Error::DecryptionFailed));
        assert!(!e.to_string().contains("detail"));
    }
}

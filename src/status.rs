//! The one place an [`Error`] becomes a gRPC status, and the one table of gRPC code names.
//!
//! Every status carries a `google.rpc.ErrorInfo` detail (domain `keybroker.io`) with the error's
//! stable reason and the metadata a caller may see; the message is the public form of the
//! error (an unknown key reads like a key without a grant). The full cause chain is logged
//! here: server-side faults at warn, caller mistakes at debug. Every front door (the KeyBroker
//! service, the identity layer, the codec, admission) answers through this module.

use std::collections::HashMap;
use std::error::Error as _;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::backend::BackendErrorKind;
use crate::error::Error;
use crate::facts::Outcome;

pub const ERROR_DOMAIN: &str = "keybroker.io";

/// The gRPC code of an error (before [`Error::public`]: the log and the metrics keep the real
/// one).
pub fn code(e: &Error) -> Code {
    match e {
        Error::KeyNotFound { .. } => Code::NotFound,
        Error::NoGrant { .. } | Error::PolicyDenied { .. } => Code::PermissionDenied,
        Error::KeyDisabled { .. }
        | Error::KeyPendingDeletion { .. }
        | Error::VersionRetired { .. }
        | Error::Precondition { .. } => Code::FailedPrecondition,
        Error::InvalidArgument(_)
        | Error::MalformedRequest(_)
        | Error::InvalidCiphertext(_)
        | Error::DecryptionFailed => Code::InvalidArgument,
        Error::MessageTooLarge { .. }
        | Error::RequestTooLarge { .. }
        | Error::BatchTooLarge { .. }
        | Error::Overloaded { .. } => Code::ResourceExhausted,
        Error::StreamCancelled => Code::Cancelled,
        Error::Unauthenticated(_) => Code::Unauthenticated,
        Error::AuditUnavailable => Code::Unavailable,
        Error::Internal(_) => Code::Internal,
        Error::Backend { source, .. } => match source.kind {
            BackendErrorKind::NotFound => Code::NotFound,
            BackendErrorKind::Disabled => Code::FailedPrecondition,
            BackendErrorKind::PermissionDenied => Code::PermissionDenied,
            BackendErrorKind::Unauthenticated => Code::Unauthenticated,
            BackendErrorKind::InvalidCiphertext | BackendErrorKind::InvalidArgument => {
                Code::InvalidArgument
            }
            BackendErrorKind::Throttled => Code::ResourceExhausted,
            BackendErrorKind::Unavailable | BackendErrorKind::Integrity => Code::Unavailable,
            BackendErrorKind::DeadlineExceeded => Code::DeadlineExceeded,
            BackendErrorKind::Internal => Code::Internal,
        },
    }
}

/// The gRPC code and the stable ErrorInfo reason.
pub fn code_and_reason(e: &Error) -> (Code, &'static str) {
    (code(e), e.reason())
}

/// The status a caller gets for `e` (and the log line with its cause chain).
pub fn to_status(e: &Error) -> Status {
    log(e, code(e));
    let public = e.public();
    let public = public.as_ref();
    let metadata: HashMap<String, String> = public
        .details()
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
    Status::with_error_details(
        code(public),
        public.to_string(),
        ErrorDetails::with_error_info(public.reason(), ERROR_DOMAIN, metadata),
    )
}

/// A status as the `google.rpc.Status` message a batch result carries: the same code, message
/// and ErrorInfo the status has (its `grpc-status-details-bin` is that message, encoded).
pub fn rpc_status(status: &Status) -> tonic_types::pb::Status {
    use prost::Message as _;
    tonic_types::pb::Status::decode(status.details()).unwrap_or_else(|_| tonic_types::pb::Status {
        code: status.code() as i32,
        message: status.message().to_owned(),
        details: Vec::new(),
    })
}

/// How a request ended, for its audit record and metrics: the real code (not the public one:
/// an unknown key is counted as NOT_FOUND / KEY_NOT_FOUND) and reason.
pub fn outcome<T>(result: &Result<T, Error>) -> Outcome {
    match result {
        Ok(_) => Outcome {
            code: code_name(Code::Ok),
            reason: None,
        },
        Err(e) => Outcome {
            code: code_name(code(e)),
            reason: Some(e.reason()),
        },
    }
}

/// Server-side faults are logged with their whole cause chain; caller mistakes at debug.
fn log(e: &Error, code: Code) {
    let mut chain = String::new();
    let mut cause = e.source();
    while let Some(c) = cause {
        chain.push_str(": ");
        chain.push_str(&c.to_string());
        cause = c.source();
    }
    match code {
        Code::Internal | Code::Unavailable | Code::DeadlineExceeded | Code::Unauthenticated
            if e.is_server_fault() =>
        {
            tracing::warn!(code = ?code, error = %e, cause = %chain, "request failed")
        }
        _ => tracing::debug!(code = ?code, error = %e, cause = %chain, "request failed"),
    }
}

/// gRPC code names as the gRPC specification spells them (audit records, metric labels, logs).
pub fn code_name(code: Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{BackendError, BackendKind};

    #[test]
    fn statuses_carry_reason_details() {
        let s = to_status(&Error::KeyDisabled { key: "k".into() });
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
        assert_eq!(code_and_reason(&unknown), (Code::NotFound, "KEY_NOT_FOUND"));
        let no_grant = Error::NoGrant {
            caller: "c".into(),
            key: Some("k".into()),
            operation: "encrypt",
        };
        let (a, b) = (to_status(&unknown), to_status(&no_grant));
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
        let s = to_status(&e);
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
        let s = to_status(&e);
        assert_eq!(s.code(), Code::Unavailable);
        assert!(s.message().contains("aws"), "{}", s.message());
        assert_eq!(
            s.get_details_error_info().unwrap().metadata["backend"],
            "aws"
        );
    }

    /// The outcome audit and metrics get keeps the real code and reason.
    #[test]
    fn outcomes_keep_the_real_code() {
        let unknown: Result<(), Error> = Err(Error::KeyNotFound {
            key: "k".into(),
            caller: "c".into(),
            operation: "encrypt",
        });
        let o = outcome(&unknown);
        assert_eq!((o.code, o.reason), ("NOT_FOUND", Some("KEY_NOT_FOUND")));
        let ok = outcome(&Ok::<(), Error>(()));
        assert_eq!((ok.code, ok.reason, ok.is_ok()), ("OK", None, true));
    }
}

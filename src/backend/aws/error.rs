//! AWS SDK failures in keybroker's terms: every KMS error code and SDK failure class mapped
//! to a [`BackendErrorKind`], with a caller-visible message of our own. AWS's text (and never
//! the raw HTTP response, whose body could echo a data key) goes into the `source`, for the log.

use std::error::Error as StdError;
use std::sync::Arc;

use aws_credential_types::provider::error::CredentialsError;
use aws_sdk_kms::config::http::HttpResponse;
use aws_sdk_kms::error::{ProvideErrorMetadata, SdkError};

use crate::backend::{BackendError, BackendErrorKind, BackendKind};

/// The typed error of one KMS operation. Modelled variants name their KMS error code even when
/// no code was parsed from a response (an error built in code); `Unhandled` ones carry the code
/// from the wire (e.g. AccessDeniedException and ThrottlingException are not modelled).
pub trait KmsOperationError: ProvideErrorMetadata + StdError + Send + Sync + 'static {
    fn modelled_code(&self) -> Option<&'static str>;
}

macro_rules! modelled_codes {
    ($($ty:ty: $($variant:ident),+;)+) => {$(
        impl KmsOperationError for $ty {
            fn modelled_code(&self) -> Option<&'static str> {
                match self {
                    $(Self::$variant(_) => Some(stringify!($variant)),)+
                    _ => None,
                }
            }
        }
    )+};
}

modelled_codes! {
    aws_sdk_kms::operation::generate_data_key::GenerateDataKeyError: DependencyTimeoutException,
        DisabledException, InvalidGrantTokenException, InvalidKeyUsageException,
        KeyUnavailableException, KmsInternalException, KmsInvalidStateException, NotFoundException;
    aws_sdk_kms::operation::encrypt::EncryptError: DependencyTimeoutException, DisabledException,
        InvalidGrantTokenException, InvalidKeyUsageException, KeyUnavailableException,
        KmsInternalException, KmsInvalidStateException, NotFoundException;
    aws_sdk_kms::operation::decrypt::DecryptError: DependencyTimeoutException, DisabledException,
        IncorrectKeyException, InvalidCiphertextException, InvalidGrantTokenException,
        InvalidKeyUsageException, KeyUnavailableException, KmsInternalException,
        KmsInvalidStateException, NotFoundException;
    aws_sdk_kms::operation::re_encrypt::ReEncryptError: DependencyTimeoutException,
        DisabledException, IncorrectKeyException, InvalidCiphertextException,
        InvalidGrantTokenException, InvalidKeyUsageException, KeyUnavailableException,
        KmsInternalException, KmsInvalidStateException, NotFoundException;
    aws_sdk_kms::operation::describe_key::DescribeKeyError: DependencyTimeoutException,
        InvalidArnException, KmsInternalException, NotFoundException;
}

/// Maps an SDK failure to keybroker's error kinds. The caller-visible message is fixed text
/// naming the operation; the SDK's error (with AWS's own message) becomes the `source`, for the
/// log. Public so the mappings moto cannot produce can be tested against the SDK's own types.
pub fn classify<E: KmsOperationError>(
    op: &'static str,
    err: SdkError<E, HttpResponse>,
) -> BackendError {
    use BackendErrorKind as K;
    let (kind, what) = match &err {
        SdkError::ServiceError(se) => {
            let code = se.err().modelled_code().or(se.err().code()).unwrap_or("");
            by_code(code, se.raw().status().as_u16())
        }
        SdkError::TimeoutError(_) => (K::DeadlineExceeded, "timed out"),
        SdkError::DispatchFailure(d) => {
            if chain_has_credentials_error(d.as_connector_error().map(|c| c as &dyn StdError)) {
                (K::Unauthenticated, "no usable AWS credentials")
            } else if d.is_timeout() {
                (K::DeadlineExceeded, "timed out connecting to AWS KMS")
            } else if d.is_user() {
                (K::Internal, "the request could not be sent")
            } else {
                (K::Unavailable, "AWS KMS could not be reached")
            }
        }
        SdkError::ResponseError(_) => (K::Unavailable, "unreadable answer from AWS KMS"),
        SdkError::ConstructionFailure(_) => {
            let source = StdError::source(&err);
            if chain_has_credentials_error(source) {
                (K::Unauthenticated, "no usable AWS credentials")
            } else {
                (K::Internal, "the request could not be built")
            }
        }
        _ => (K::Internal, "unexpected AWS SDK error"),
    };
    let source: Arc<dyn StdError + Send + Sync> = match err.into_source() {
        // The inner error only: never the raw HTTP response (its body could echo a data key).
        Ok(inner) => Arc::from(inner),
        Err(other) => Arc::new(Opaque(other.to_string())),
    };
    BackendError {
        backend: BackendKind::Aws,
        kind,
        message: format!("{op}: {what}").into(),
        source: Some(source),
    }
}

/// KMS error codes (the `__type` of a JSON error) to kinds. `status` decides unknown codes.
fn by_code(code: &str, status: u16) -> (BackendErrorKind, &'static str) {
    use BackendErrorKind as K;
    match code {
        "NotFoundException" => (
            K::NotFound,
            "the key does not exist, or is not visible in this account and region",
        ),
        "InvalidArnException" => (K::NotFound, "the configured key id is not a valid KMS ARN"),
        "DisabledException" => (K::Disabled, "the key is disabled"),
        "KMSInvalidStateException" | "KmsInvalidStateException" => (
            K::Disabled,
            "the key is not in a usable state (pending deletion, pending import or unavailable)",
        ),
        "InvalidKeyUsageException" => (
            K::Disabled,
            "the key does not permit this operation (key usage or key spec)",
        ),
        "AccessDeniedException" | "InvalidGrantTokenException" => (
            K::PermissionDenied,
            "access denied by IAM or the key policy",
        ),
        "UnrecognizedClientException"
        | "InvalidSignatureException"
        | "IncompleteSignature"
        | "MissingAuthenticationToken"
        | "InvalidClientTokenId"
        | "ExpiredTokenException"
        | "SignatureDoesNotMatch" => (K::Unauthenticated, "AWS rejected the credentials"),
        "InvalidCiphertextException" | "IncorrectKeyException" => (
            K::InvalidCiphertext,
            "the wrapped key does not decrypt under this key and context",
        ),
        "KMSInternalException"
        | "KmsInternalException"
        | "DependencyTimeoutException"
        | "KeyUnavailableException"
        | "InternalFailure"
        | "ServiceUnavailable"
        | "CustomKeyStoreInvalidStateException" => (K::Unavailable, "AWS KMS is unavailable"),
        "ValidationException" | "SerializationException" | "UnsupportedOperationException" => (
            K::InvalidArgument,
            "AWS KMS rejected the request as invalid",
        ),
        c if aws_runtime_throttling(c) => (
            K::Throttled,
            "AWS KMS request rate exceeded (after retries)",
        ),
        _ if status == 429 => (
            K::Throttled,
            "AWS KMS request rate exceeded (after retries)",
        ),
        _ if status >= 500 => (K::Unavailable, "AWS KMS is unavailable"),
        _ => (K::Internal, "unexpected error from AWS KMS"),
    }
}

/// The codes the SDK's standard retry mode treats as throttling (and retries).
fn aws_runtime_throttling(code: &str) -> bool {
    matches!(
        code,
        "Throttling"
            | "ThrottlingException"
            | "ThrottledException"
            | "RequestThrottledException"
            | "TooManyRequestsException"
            | "RequestLimitExceeded"
            | "LimitExceededException"
            | "RequestThrottled"
            | "SlowDown"
    )
}

fn chain_has_credentials_error(mut cur: Option<&(dyn StdError + 'static)>) -> bool {
    // Error chains are short; the bound only guards against a cyclic `source`.
    for _ in 0..16 {
        let Some(e) = cur else { return false };
        if e.downcast_ref::<CredentialsError>().is_some() {
            return true;
        }
        cur = e.source();
    }
    false
}

/// A source for the rare SDK error without an inner error.
#[derive(Debug)]
struct Opaque(String);

impl std::fmt::Display for Opaque {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl StdError for Opaque {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_map_to_kinds() {
        use BackendErrorKind as K;
        for (code, kind) in [
            ("NotFoundException", K::NotFound),
            ("DisabledException", K::Disabled),
            ("KMSInvalidStateException", K::Disabled),
            ("AccessDeniedException", K::PermissionDenied),
            ("InvalidCiphertextException", K::InvalidCiphertext),
            ("IncorrectKeyException", K::InvalidCiphertext),
            ("ThrottlingException", K::Throttled),
            ("LimitExceededException", K::Throttled),
            ("KMSInternalException", K::Unavailable),
            ("UnrecognizedClientException", K::Unauthenticated),
        ] {
            assert_eq!(by_code(code, 400).0, kind, "{code}");
        }
        assert_eq!(by_code("SomethingNew", 503).0, K::Unavailable);
        assert_eq!(by_code("SomethingNew", 429).0, K::Throttled);
        assert_eq!(by_code("SomethingNew", 400).0, K::Internal);
    }
}

//! The backend conformance suite: plain async functions that take a backend and check the
//! contract in `src/backend/mod.rs`. Every backend runs all of them (`run_all`): the local
//! keyring here, and each cloud backend against its emulator or fake.
//!
//! `backend` and `other` must be two different keys of the same backend kind, both enabled.

use keybroker::backend::{BackendContext, BackendErrorKind, KeyBackend};
use keybroker::envelope::WrappedCopy;
use keybroker::secret::SecretKey;

pub const CTX: BackendContext<'static> = BackendContext {
    key_name: "conformance",
    caller: "spiffe://test/caller-a",
};

pub async fn run_all(backend: &dyn KeyBackend, other: &dyn KeyBackend) {
    generate_then_unwrap(backend).await;
    wrap_then_unwrap(backend).await;
    short_data_keys(backend).await;
    wrapping_is_randomized(backend).await;
    context_is_bound(backend).await;
    tampered_wrapped_key_is_refused(backend).await;
    copy_of_another_key_is_refused(backend, other).await;
    foreign_key_id_is_refused(backend).await;
    describe_reports_an_enabled_key(backend).await;
}

fn copy<'a>(backend: &dyn KeyBackend, w: &'a keybroker::backend::Wrapped) -> WrappedCopy<'a> {
    w.as_copy(backend.kind())
}

/// `generate_data_key` returns a key and a copy that unwraps to the same bytes, with ids.
pub async fn generate_then_unwrap(backend: &dyn KeyBackend) {
    let (key, wrapped) = backend.generate_data_key(32, &CTX).await.expect("generate");
    assert_eq!(key.len(), 32);
    assert!(
        !wrapped.key_id.is_empty(),
        "wrapped copy must name the durable key id"
    );
    assert!(
        !wrapped.key_version.is_empty(),
        "wrapped copy must name the key version"
    );
    assert!(!wrapped.ciphertext.is_empty());
    assert_ne!(
        wrapped.ciphertext.as_slice(),
        key.as_ref(),
        "the wrapped form must not be the key itself"
    );
    let unwrapped = backend
        .unwrap(&copy(backend, &wrapped), &CTX)
        .await
        .expect("unwrap");
    assert_eq!(unwrapped.as_ref(), key.as_ref());
}

/// `wrap` of a caller-made key round-trips.
pub async fn wrap_then_unwrap(backend: &dyn KeyBackend) {
    let key = SecretKey::generate(32).unwrap();
    let wrapped = backend.wrap(&key, &CTX).await.expect("wrap");
    let unwrapped = backend
        .unwrap(&copy(backend, &wrapped), &CTX)
        .await
        .expect("unwrap");
    assert_eq!(unwrapped.as_ref(), key.as_ref());
}

/// AES-128 data keys (GenerateDataKey with spec AES_128).
pub async fn short_data_keys(backend: &dyn KeyBackend) {
    let (key, wrapped) = backend
        .generate_data_key(16, &CTX)
        .await
        .expect("generate 16");
    assert_eq!(key.len(), 16);
    let unwrapped = backend
        .unwrap(&copy(backend, &wrapped), &CTX)
        .await
        .expect("unwrap 16");
    assert_eq!(unwrapped.as_ref(), key.as_ref());
}

/// Two wraps of the same key differ (random IV/nonce or provider randomness).
pub async fn wrapping_is_randomized(backend: &dyn KeyBackend) {
    let key = SecretKey::generate(32).unwrap();
    let a = backend.wrap(&key, &CTX).await.expect("wrap a");
    let b = backend.wrap(&key, &CTX).await.expect("wrap b");
    assert_ne!(a.ciphertext, b.ciphertext);
}

/// A copy made for one (key name, caller) does not unwrap under another.
pub async fn context_is_bound(backend: &dyn KeyBackend) {
    let (_, wrapped) = backend.generate_data_key(32, &CTX).await.expect("generate");
    for other in [
        BackendContext {
            key_name: CTX.key_name,
            caller: "spiffe://test/caller-b",
        },
        BackendContext {
            key_name: "another-key-name",
            caller: CTX.caller,
        },
    ] {
        let err = backend
            .unwrap(&copy(backend, &wrapped), &other)
            .await
            .err()
            .unwrap_or_else(|| panic!("unwrap under {other:?} must fail"));
        assert_eq!(err.kind, BackendErrorKind::InvalidCiphertext, "{err}");
    }
}

/// Any single flipped byte in the wrapped key fails (and never yields a key).
pub async fn tampered_wrapped_key_is_refused(backend: &dyn KeyBackend) {
    let (_, wrapped) = backend.generate_data_key(32, &CTX).await.expect("generate");
    let n = wrapped.ciphertext.len();
    for i in [0, n / 2, n - 1] {
        let mut bad = wrapped.clone();
        bad.ciphertext[i] ^= 0x01;
        let err = backend
            .unwrap(&copy(backend, &bad), &CTX)
            .await
            .err()
            .unwrap_or_else(|| panic!("tampered byte {i} unwrapped"));
        assert_eq!(
            err.kind,
            BackendErrorKind::InvalidCiphertext,
            "byte {i}: {err}"
        );
    }
}

/// A copy wrapped by another key is refused by this one, even with the same context.
pub async fn copy_of_another_key_is_refused(backend: &dyn KeyBackend, other: &dyn KeyBackend) {
    let (_, wrapped) = other
        .generate_data_key(32, &CTX)
        .await
        .expect("generate on other");
    let err = backend
        .unwrap(&copy(other, &wrapped), &CTX)
        .await
        .err()
        .expect("another key's copy must not unwrap");
    assert_eq!(err.kind, BackendErrorKind::InvalidCiphertext, "{err}");
}

/// A copy whose recorded key id was altered to name another key is refused: the backend only
/// ever uses its configured key.
pub async fn foreign_key_id_is_refused(backend: &dyn KeyBackend) {
    let (_, wrapped) = backend.generate_data_key(32, &CTX).await.expect("generate");
    let mut bad = wrapped.clone();
    bad.key_id = format!("{}-elsewhere", wrapped.key_id);
    let err = backend
        .unwrap(&copy(backend, &bad), &CTX)
        .await
        .err()
        .expect("altered key id must not unwrap");
    assert_eq!(err.kind, BackendErrorKind::InvalidCiphertext, "{err}");
}

pub async fn describe_reports_an_enabled_key(backend: &dyn KeyBackend) {
    let d = backend.describe().await.expect("describe");
    assert!(d.enabled);
    assert!(!d.durable_key_id.is_empty());
}

/// Respellings of a genuine copy's recorded key id / version (`respell` makes them for one
/// backend: `01` for `1`, another case, ...) are refused by `check_canonical` and by `unwrap`,
/// each as InvalidCiphertext, while the copy as recorded is canonical and unwraps. Callers
/// check at their fake or emulator that no variant reached the provider.
pub async fn respelled_copies_are_refused(
    backend: &dyn KeyBackend,
    respell: impl Fn(&keybroker::backend::Wrapped) -> Vec<keybroker::backend::Wrapped>,
) {
    let (key, wrapped) = backend.generate_data_key(32, &CTX).await.expect("generate");
    backend
        .check_canonical(&copy(backend, &wrapped))
        .expect("the copy as recorded is canonical");
    let variants = respell(&wrapped);
    assert!(!variants.is_empty());
    for v in &variants {
        assert_ne!(v, &wrapped);
        let what = format!("key id {:?}, version {:?}", v.key_id, v.key_version);
        assert!(
            backend.check_canonical(&copy(backend, v)).is_err(),
            "{what} passed check_canonical"
        );
        let err = backend
            .unwrap(&copy(backend, v), &CTX)
            .await
            .err()
            .unwrap_or_else(|| panic!("{what} unwrapped"));
        assert_eq!(
            err.kind,
            BackendErrorKind::InvalidCiphertext,
            "{what}: {err}"
        );
    }
    let back = backend
        .unwrap(&copy(backend, &wrapped), &CTX)
        .await
        .expect("the recorded copy still unwraps");
    assert_eq!(back.as_ref(), key.as_ref());
}

//! The local keyring backend against the shared conformance suite.

use std::sync::Arc;

use keybroker::backend::local::{LocalBackend, LocalKeyring};

use crate::support::conformance;

#[tokio::test]
async fn local_backend_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keyring");
    keybroker::keyring::edit(&path, true, |r| {
        r.create_key("a")?;
        r.create_key("b")
    })
    .unwrap();
    let ring = LocalKeyring::open(&path, None).unwrap();
    let a = LocalBackend::new(Arc::clone(&ring), "a");
    let b = LocalBackend::new(ring, "b");
    conformance::run_all(&a, &b).await;
}

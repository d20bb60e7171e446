//! keybroker: a multi-cloud key-broker sidecar. Apps call it over local gRPC to encrypt,
//! decrypt and get data keys; it routes each call to a key backend (local keyring, AWS KMS,
//! GCP Cloud KMS, Azure Key Vault), caches data keys under strict limits, checks a per-key
//! policy per caller, audits every key use and exports per-caller metrics.
//!
//! Module map (one concern each): `proto` (generated API), `config`, `registry` (key names →
//! backends), `backend` (one file per backend), `envelope` (the ciphertext format), `cache`
//! (data keys), `broker` (the operations), `service` (gRPC glue), `server` (listeners and
//! shutdown), `error` (the one error → status mapping), `secret` (key material types), `tls`
//! (rustls server configs that follow rotated files), `inject` (the Kubernetes sidecar injector).

pub mod backend;
pub mod bench;
pub mod broker;
pub mod cache;
pub mod cli;
pub mod client;
pub mod config;
pub mod envelope;
pub mod error;
pub mod identity;
pub mod inject;
pub mod keyring;
pub mod operation;
pub mod registry;
pub mod secret;
pub mod server;
pub mod service;
pub mod stats;
pub mod tls;
pub mod util;

/// The generated `keybroker.v1` protobuf and gRPC code.
#[allow(clippy::all, missing_docs)]
pub mod proto {
    tonic::include_proto!("keybroker.v1");

    /// The encoded descriptors served by gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("keybroker_descriptor");
}

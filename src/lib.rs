//! keybroker: a multi-cloud key-broker sidecar. Apps call it over local gRPC to encrypt,
//! decrypt and get data keys; it routes each call to a key backend (local keyring, AWS KMS,
//! GCP Cloud KMS, Azure Key Vault), caches data keys under strict limits, checks a per-key
//! policy per caller, audits every key use and exports per-caller metrics.
//!
//! Module map (one concern each): `proto` (generated API), `config`, `registry` (key names →
//! backends), `backend` (one file per backend), `envelope` (the ciphertext format), `cache`
//! (data keys), `broker` (the operations), `service` (gRPC glue), `codec` (request decoding
//! errors shaped like every other), `server` (listeners and shutdown), `transport` (connection
//! and HTTP/2 limits, exposure and socket-mode checks), `admission` (refusing ungranted callers
//! before their body is read), `error` (the one error → status mapping), `secret` (key material
//! types), `tls` (rustls server configs that follow rotated files and CRLs), `uds_authority`
//! (HTTP/2 `:authority` repair on the Unix socket), `inject` (the Kubernetes sidecar injector).

pub mod admin;
pub mod admission;
pub mod audit;
pub mod backend;
pub mod bench;
pub mod broker;
pub mod cache;
pub mod cli;
pub mod client;
pub mod codec;
pub mod config;
pub mod envelope;
pub mod error;
pub mod health;
pub mod identity;
pub mod inject;
pub mod keyring;
pub mod metrics;
pub mod operation;
pub mod policy;
pub mod registry;
pub mod reload;
pub mod secret;
pub mod server;
pub mod service;
pub mod stats;
pub mod tls;
pub mod transport;
pub mod uds_authority;
pub mod util;

/// The generated `keybroker.v1` protobuf and gRPC code.
#[allow(clippy::all, missing_docs)]
pub mod proto {
    tonic::include_proto!("keybroker.v1");

    /// The encoded descriptors served by gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("keybroker_descriptor");

    /// `google.rpc` error details (ErrorInfo, ...) for reflection: tools decode error reasons.
    pub const ERROR_DETAILS_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("error_details_descriptor");

    use std::fmt;

    impl fmt::Debug for EncryptRequest {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.debug_struct("EncryptRequest")
                .field("key", &self.key)
                .field(
                    "plaintext",
                    &format_args!("<{} bytes redacted>", self.plaintext.len()),
                )
                .field("context", &self.context)
                .finish()
        }
    }

    impl fmt::Debug for DecryptResponse {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.debug_struct("DecryptResponse")
                .field(
                    "plaintext",
                    &format_args!("<{} bytes redacted>", self.plaintext.len()),
                )
                .field("key", &self.key)
                .field("key_version", &self.key_version)
                .finish()
        }
    }

    impl fmt::Debug for GenerateDataKeyResponse {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.debug_struct("GenerateDataKeyResponse")
                .field("plaintext_key", &"<redacted>")
                .field(
                    "wrapped_key",
                    &format_args!("<{} bytes>", self.wrapped_key.len()),
                )
                .field("key", &self.key)
                .field("key_version", &self.key_version)
                .finish()
        }
    }
}

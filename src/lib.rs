//! keybroker: a multi-cloud key-broker sidecar. Apps call it over local gRPC to encrypt,
//! decrypt and get data keys; it routes each call to a key backend (local keyring, AWS KMS,
//! GCP Cloud KMS, Azure Key Vault), caches data keys under strict limits, checks a per-key
//! policy per caller, audits every key use and exports per-caller metrics.
//!
//! # Module map
//!
//! Levels, bottom to top. A module uses only modules of lower levels (4.2 is above 4.1 and
//! below 5): never one of its own level, never one above. `tests/layering.rs` reads this list
//! and fails on any path into the crate (`use crate::…`, `pub use`, `crate::…` and `super::…`
//! in code) that points sideways or up, and on any module missing from it.
//!
//! - 1.1 core values: `secret`, `operation`, `backend_kind`, `context`
//! - 1.2 core records: `util`, `principal`, `facts`
//! - 2 formats and settings: `envelope`, `keyring`, `settings`
//! - 3 backends: `backend`
//! - 4.1 key rules and counters: `policy`, `stats`
//! - 4.2 data-key caches: `cache`
//! - 4.3 configured keys: `registry`
//! - 5.1 domain errors: `error`
//! - 5.2 operations: `broker`
//! - 6 records of requests: `audit`, `metrics`
//! - 7.1 edge, the one error to status mapping: `status`
//! - 7.2 edge, transport: `tls`, `transport`, `uds_authority`, `health`, `codec`
//! - 7.3 edge, callers and requests: `proto`, `kms_proto`, `identity`, `observe`
//! - 7.4 edge, front doors: `service`, `kms_plugin`, `admission`, `admin`
//! - 8.1 composition: `config`
//! - 8.2 composition: `reload`
//! - 8.3 composition: `server`
//! - 9.1 tools: `client`, `command`
//! - 9.2 tools: `inject`
//! - 9.3 tools: `cli`
//!
//! What each level is for: (1) plain values every layer shares: key material, operations, the
//! backend vocabulary and its wire codes, the one canonical context encoding, what a request
//! touched ([`facts`]) and who made it ([`principal`]); (2) the ciphertext and keyring formats
//! and the TOML reading helpers; (3) the backend trait, its error, the one call policy and one
//! module per backend, each owning its settings, clients and private errors; (4) policy,
//! per-key counters, the data-key caches (which return what they did) and the registry; (5)
//! the operations and their domain errors; (6) the audit log and the metrics, fed facts and a
//! snapshot; (7) the edges: status mapping, transport, identity, the gRPC front doors and the
//! admin listener; (8) configuration, reload and the server that composes everything; (9) the
//! command line, the client, the injector and the benchmark harness (under `cli`).
//!
//! The nevers (checked by the same test, besides what the levels imply):
//! - never: `audit`, `metrics` → `broker`, `cache`, `registry`
//! - never: `error` → `tonic`
//!
//! Implied by the levels, and worth saying: backends never use the configuration, the
//! registry, the caches, the broker, audit, metrics or the edges; `envelope` never uses
//! `backend`; `cache` never uses `broker` or `config`; `identity` never uses `server`; nothing
//! below the tools uses them. No module indexes another module's arrays: every fact names
//! itself (`label()`, `as_str()`), and a module that keeps counters in arrays maps values to
//! its own slots.

pub mod admin;
pub mod admission;
pub mod audit;
pub mod backend;
pub mod backend_kind;
pub mod broker;
pub mod cache;
pub mod cli;
pub mod client;
pub mod codec;
pub mod command;
pub mod config;
pub mod context;
pub mod envelope;
pub mod error;
pub mod facts;
pub mod health;
pub mod identity;
pub mod inject;
pub mod keyring;
pub mod kms_plugin;
pub mod metrics;
pub mod observe;
pub mod operation;
pub mod policy;
pub mod principal;
pub mod registry;
pub mod reload;
pub mod secret;
pub mod server;
pub mod service;
pub mod settings;
pub mod stats;
pub mod status;
pub mod tls;
pub mod transport;
pub mod uds_authority;
pub mod util;

/// The generated Kubernetes KMS v2 plugin API (`v2.KeyManagementService`,
/// proto/k8s/kms/v2/api.proto): server for `kms_plugin`, client for tests and the benchmark.
#[allow(clippy::all, missing_docs)]
pub mod kms_proto {
    tonic::include_proto!("v2");

    /// The encoded descriptors served by gRPC reflection on the plugin socket.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("kms_v2_descriptor");

    use std::fmt;

    impl fmt::Debug for EncryptRequest {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.debug_struct("EncryptRequest")
                .field(
                    "plaintext",
                    &format_args!("<{} bytes redacted>", self.plaintext.len()),
                )
                .field("uid", &self.uid)
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
                .finish()
        }
    }
}

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

    #[cfg(test)]
    mod tests {
        use super::*;

        /// Message types that carry plaintext or key bytes print neither.
        #[test]
        fn debug_of_secret_carrying_messages_shows_no_bytes() {
            let bytes: Vec<u8> = (100..132).collect();
            let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
            let list = format!("{bytes:?}");
            let renderings = [
                hex.clone(),
                hex.to_uppercase(),
                list[1..list.len() - 1].to_owned(),
                base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &bytes),
            ];
            let response = GenerateDataKeyResponse {
                plaintext_key: bytes.clone().into(),
                wrapped_key: vec![9; 4].into(),
                key: "k".into(),
                key_version: "1".into(),
            };
            let decrypted = DecryptResponse {
                plaintext: bytes.clone().into(),
                key: "k".into(),
                key_version: "1".into(),
            };
            let request = EncryptRequest {
                key: "k".into(),
                plaintext: bytes.clone().into(),
                context: Default::default(),
            };
            for dbg in [
                format!("{response:?}"),
                format!("{decrypted:?}"),
                format!("{request:?}"),
                format!("{:#?}", response),
            ] {
                for r in &renderings {
                    assert!(!dbg.contains(r.as_str()), "{dbg} shows the key as {r}");
                }
                assert!(dbg.contains("redacted"), "{dbg}");
            }
        }
    }
}

//! Generates the keybroker.v1 gRPC code and the file descriptor set that server reflection serves.
//! A fresh machine has no `protoc`: the binary vendored by `protoc-bin-vendored` is used, so
//! `cargo build` needs nothing installed.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("keybroker_descriptor.bin"))
        // Payloads are decoded as `Bytes` views into the request buffer: no copy on the hot path.
        .bytes(".keybroker.v1")
        // Sorted maps: the encryption context must be encoded canonically (sorted keys).
        .btree_map(".keybroker.v1")
        // Messages carrying plaintext or key bytes get a hand-written, redacting Debug
        // (src/lib.rs): a stray `{:?}` must never print them.
        .skip_debug([
            "keybroker.v1.EncryptRequest",
            "keybroker.v1.DecryptResponse",
            "keybroker.v1.GenerateDataKeyResponse",
        ])
        // Decode failures are the caller's (INVALID_ARGUMENT), not prost's INTERNAL: src/codec.rs.
        .codec_path("crate::codec::Codec")
        .compile_with_config(config, &["proto/keybroker/v1/keybroker.proto"], &["proto"])?;
    kms_v2(&out)?;
    error_details_descriptors(&out)?;
    println!("cargo:rerun-if-changed=proto");
    cloud_kms_fake_server();
    Ok(())
}

/// The Kubernetes KMS v2 plugin API (`proto/k8s/kms/v2/api.proto`, package `v2`), server and
/// client (the tests and the benchmark drive it), with its own descriptor set for reflection on
/// the plugin socket.
fn kms_v2(out: &std::path::Path) -> Result<(), Box<dyn std::error::Error>> {
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("kms_v2_descriptor.bin"))
        .bytes(".v2")
        .btree_map(".v2")
        // The DEK seed travels in these two: a redacting Debug (src/kms_plugin.rs).
        .skip_debug(["v2.EncryptRequest", "v2.DecryptResponse"])
        .codec_path("crate::codec::Codec")
        .compile_with_config(config, &["proto/k8s/kms/v2/api.proto"], &["proto"])?;
    Ok(())
}

/// Descriptors of `google.rpc.ErrorInfo` and its siblings (with `google.protobuf.Duration`),
/// served by reflection so that grpcurl can print the ErrorInfo every keybroker error carries
/// instead of "google.rpc.ErrorInfo is not recognized". Descriptors only: tonic-types has the
/// Rust types.
fn error_details_descriptors(out: &std::path::Path) -> Result<(), Box<dyn std::error::Error>> {
    let status = std::process::Command::new(protoc_bin_vendored::protoc_bin_path()?)
        .arg("--include_imports")
        .arg(format!(
            "--descriptor_set_out={}",
            out.join("error_details_descriptor.bin").display()
        ))
        .arg("-Iproto")
        .arg(format!(
            "-I{}",
            protoc_bin_vendored::include_path()?.display()
        ))
        .arg("proto/google/rpc/error_details.proto")
        .status()?;
    if !status.success() {
        return Err(
            format!("protoc failed on proto/google/rpc/error_details.proto: {status}").into(),
        );
    }
    Ok(())
}

/// The server half of `google.cloud.kms.v1.KeyManagementService`, for the test-only Cloud KMS
/// fake (`tests/support/gcp_fake.rs` includes it; the library never does). gcloud-sdk ships
/// the message types but no server and no .proto files, so the service is described by hand and
/// reuses gcloud-sdk's types through prost's codec. Only the methods the fake serves are listed;
/// any other method answers UNIMPLEMENTED.
fn cloud_kms_fake_server() {
    use tonic_prost_build::manual::{Builder, Method, Service};
    // (route, request, response); "v1::" is gcloud-sdk's generated module, "ext::" its
    // hand-written Encrypt/Decrypt messages (plaintext held as a zeroizing SecretValue).
    let methods = [
        ("Encrypt", "ext::EncryptRequest", "v1::EncryptResponse"),
        ("Decrypt", "v1::DecryptRequest", "ext::DecryptResponse"),
        ("GetCryptoKey", "v1::GetCryptoKeyRequest", "v1::CryptoKey"),
        (
            "GetCryptoKeyVersion",
            "v1::GetCryptoKeyVersionRequest",
            "v1::CryptoKeyVersion",
        ),
        ("CreateKeyRing", "v1::CreateKeyRingRequest", "v1::KeyRing"),
        (
            "CreateCryptoKey",
            "v1::CreateCryptoKeyRequest",
            "v1::CryptoKey",
        ),
        (
            "CreateCryptoKeyVersion",
            "v1::CreateCryptoKeyVersionRequest",
            "v1::CryptoKeyVersion",
        ),
        (
            "UpdateCryptoKeyVersion",
            "v1::UpdateCryptoKeyVersionRequest",
            "v1::CryptoKeyVersion",
        ),
        (
            "UpdateCryptoKeyPrimaryVersion",
            "v1::UpdateCryptoKeyPrimaryVersionRequest",
            "v1::CryptoKey",
        ),
        (
            "DestroyCryptoKeyVersion",
            "v1::DestroyCryptoKeyVersionRequest",
            "v1::CryptoKeyVersion",
        ),
    ];
    let path = |t: &str| {
        t.replace("v1::", "gcloud_sdk::google::cloud::kms::v1::")
            .replace("ext::", "gcloud_sdk::proto_ext::kms::")
    };
    let mut service = Service::builder()
        .name("KeyManagementService")
        .package("google.cloud.kms.v1");
    for (route, input, output) in methods {
        let mut name = String::new();
        for c in route.chars() {
            if c.is_ascii_uppercase() && !name.is_empty() {
                name.push('_');
            }
            name.push(c.to_ascii_lowercase());
        }
        service = service.method(
            Method::builder()
                .name(name)
                .route_name(route)
                .input_type(path(input))
                .output_type(path(output))
                .codec_path("tonic_prost::ProstCodec")
                .build(),
        );
    }
    Builder::new()
        .build_client(false)
        .compile(&[service.build()]);
}

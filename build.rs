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
        .compile_with_config(config, &["proto/keybroker/v1/keybroker.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}

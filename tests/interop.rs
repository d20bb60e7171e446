//! Clients we did not write, over the pod's main path (the Unix socket), with default options:
//! Python grpcio (gRPC C-core, which sends the socket path as `:authority`) and Node's
//! @grpc/grpc-js. And bad input from a raw HTTP/2 client: every case a documented code with an
//! ErrorInfo reason, and response headers that any client can read.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use keybroker::proto;
use prost::Message;
use tonic_types::StatusExt;

use crate::support::{TestServer, local_config, run_bounded, venv_bin};

/// A local key on a Unix socket (first) and loopback TCP, with `server` extra `[server]` lines.
fn unix_server_config(server: &str) -> String {
    local_config(&format!(
        "\n[server]\nlisten = [\"unix://{{dir}}/kb.sock\", \"127.0.0.1:0\"]\n{server}"
    ))
}

fn checks(out: &std::process::Output, names: &[&str]) {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "exit {:?}\n{stdout}\n{stderr}",
        out.status
    );
    for name in names {
        assert!(
            stdout.lines().any(|l| l.starts_with(&format!("ok {name}"))),
            "{name} missing\n{stdout}\n{stderr}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_grpcio_over_the_unix_socket_with_default_options() {
    let server = TestServer::start(&unix_server_config("")).await;
    let sock = format!("unix://{}", server.path("kb.sock").display());
    let descriptors = server.path("keybroker.pb");
    std::fs::write(&descriptors, proto::FILE_DESCRIPTOR_SET).unwrap();
    let mut cmd = std::process::Command::new(venv_bin("python"));
    cmd.arg(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/clients/grpcio_client.py"
    ))
    .arg(&sock)
    .arg(&descriptors);
    let out = run_bounded(cmd, Duration::from_secs(60)).await;
    checks(&out, &["round-trip", "wrong-context", "malformed"]);
    server.stop().await;
}

/// The Node modules scripts/test-setup installs.
fn node_path() -> std::path::PathBuf {
    let dir =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-env/node/node_modules");
    assert!(
        dir.join("@grpc/grpc-js").exists(),
        "{} is missing: run scripts/test-setup (scripts/test does)",
        dir.display()
    );
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_grpc_js_over_the_unix_socket_with_default_options() {
    let server = TestServer::start(&unix_server_config("")).await;
    let sock = format!("unix://{}", server.path("kb.sock").display());
    let mut cmd = std::process::Command::new("node");
    cmd.env("NODE_PATH", node_path())
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/clients/grpc_js_client.js"
        ))
        .arg(&sock)
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/proto/keybroker/v1/keybroker.proto"
        ));
    let out = run_bounded(cmd, Duration::from_secs(60)).await;
    checks(&out, &["round-trip", "wrong-context", "long-key"]);
    server.stop().await;
}

/// A gRPC response as a raw HTTP/2 client sees it.
struct Raw {
    status: tonic::Status,
    /// Every header and trailer, names and values, in bytes.
    header_bytes: usize,
}

/// Sends `message` (already encoded, possibly not a valid message at all) as one gRPC frame.
async fn raw_call(addr: &str, method: &str, message: Vec<u8>) -> Raw {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let mut body = Vec::with_capacity(message.len() + 5);
    body.push(0);
    body.extend_from_slice(&(message.len() as u32).to_be_bytes());
    body.extend_from_slice(&message);
    let req = http::Request::post(format!("http://{addr}/keybroker.v1.KeyBroker/{method}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(20), sender.send_request(req))
        .await
        .expect("no response within 20s")
        .unwrap();
    let headers = resp.headers().clone();
    let collected = tokio::time::timeout(Duration::from_secs(20), resp.into_body().collect())
        .await
        .expect("no body within 20s");
    let trailers = collected
        .ok()
        .and_then(|c| c.trailers().cloned())
        .unwrap_or_default();
    let size = |h: &http::HeaderMap| {
        h.iter()
            .map(|(k, v)| k.as_str().len() + v.len())
            .sum::<usize>()
    };
    let status = tonic::Status::from_header_map(&headers)
        .or_else(|| tonic::Status::from_header_map(&trailers))
        .expect("a grpc-status");
    Raw {
        status,
        header_bytes: size(&headers) + size(&trailers),
    }
}

fn field(tag: u32, bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    prost::encoding::encode_key(tag, prost::encoding::WireType::LengthDelimited, &mut out);
    prost::encoding::encode_varint(bytes.len() as u64, &mut out);
    out.extend_from_slice(bytes);
    out
}

#[tokio::test]
async fn bad_input_gets_a_documented_code_and_reason_with_small_headers() {
    let server = TestServer::start(&unix_server_config("")).await;
    let addr = server.running.as_ref().unwrap().addrs[1].to_string();
    // With the default max_request_bytes (4MiB) the transport decodes at most this much.
    let max = keybroker::config::DEFAULT_MAX_REQUEST_BYTES as usize;
    let decode_limit = max + keybroker::broker::CIPHERTEXT_OVERHEAD as usize + (512 << 10);
    let enc = |key: &str, plaintext: Vec<u8>, context: BTreeMap<String, String>| {
        proto::EncryptRequest {
            key: key.into(),
            plaintext: plaintext.into(),
            context,
        }
        .encode_to_vec()
    };
    let many: BTreeMap<String, String> = (0..10_000)
        .map(|i| (format!("k{i}"), "v".to_owned()))
        .collect();
    let bad_entry = [field(1, b"app"), field(2, b"\xff\xfe")].concat();
    // The context is field 3 of EncryptRequest, field 2 of DecryptRequest.
    let (bad_enc_context, bad_dec_context) = (field(3, &bad_entry), field(2, &bad_entry));
    use tonic::Code::*;
    let cases: Vec<(&str, &str, Vec<u8>, tonic::Code, &str)> = vec![
        (
            "not protobuf",
            "Encrypt",
            b"\xff\xff\xff\xff".to_vec(),
            InvalidArgument,
            "MALFORMED_REQUEST",
        ),
        (
            "truncated field",
            "Encrypt",
            vec![0x0a, 0x50, b'k'],
            InvalidArgument,
            "MALFORMED_REQUEST",
        ),
        (
            "non-UTF-8 key",
            "Encrypt",
            field(1, b"\xff\xfedefault"),
            InvalidArgument,
            "MALFORMED_REQUEST",
        ),
        (
            "non-UTF-8 context",
            "Encrypt",
            bad_enc_context,
            InvalidArgument,
            "MALFORMED_REQUEST",
        ),
        (
            "non-UTF-8 decrypt context",
            "Decrypt",
            bad_dec_context,
            InvalidArgument,
            "MALFORMED_REQUEST",
        ),
        (
            "1 MiB key name",
            "Encrypt",
            enc(&"k".repeat(1 << 20), b"x".to_vec(), BTreeMap::new()),
            InvalidArgument,
            "INVALID_ARGUMENT",
        ),
        (
            "bad key name",
            "GenerateDataKey",
            field(1, b"no spaces allowed"),
            InvalidArgument,
            "INVALID_ARGUMENT",
        ),
        (
            "10,000-pair context",
            "Encrypt",
            enc("default", b"x".to_vec(), many),
            InvalidArgument,
            "INVALID_ARGUMENT",
        ),
        (
            "plaintext just over",
            "Encrypt",
            enc("default", vec![1; max + 1], BTreeMap::new()),
            ResourceExhausted,
            "REQUEST_TOO_LARGE",
        ),
        (
            "message just over",
            "Encrypt",
            enc("default", vec![1; decode_limit], BTreeMap::new()),
            ResourceExhausted,
            "REQUEST_TOO_LARGE",
        ),
        (
            "message far over",
            "Encrypt",
            vec![0x12; 32 << 20],
            ResourceExhausted,
            "REQUEST_TOO_LARGE",
        ),
        (
            "garbage ciphertext",
            "Decrypt",
            field(1, &vec![7; 100_000]),
            InvalidArgument,
            "INVALID_CIPHERTEXT",
        ),
        (
            // Answered like a key without a grant, so names cannot be enumerated (docs/api.md).
            "unknown key",
            "Encrypt",
            enc("nope", b"x".to_vec(), BTreeMap::new()),
            PermissionDenied,
            "POLICY_DENIED",
        ),
    ];
    for (what, method, message, code, reason) in cases {
        let raw = raw_call(&addr, method, message).await;
        let info = raw.status.get_details_error_info();
        assert_eq!(raw.status.code(), code, "{what}: {:?}", raw.status);
        assert_eq!(
            info.as_ref().map(|i| i.reason.as_str()),
            Some(reason),
            "{what}: {:?}",
            raw.status
        );
        assert!(
            raw.header_bytes < 8 << 10,
            "{what}: {} bytes of headers",
            raw.header_bytes
        );
        assert!(
            raw.status.message().len() < 512,
            "{what}: {}",
            raw.status.message()
        );
        if reason == "REQUEST_TOO_LARGE" {
            assert!(info.unwrap().metadata.contains_key("limit_bytes"), "{what}");
        }
    }
    server.stop().await;
}

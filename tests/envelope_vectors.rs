//! The envelope's test vectors (tests/vectors/envelope-v1.json and envelope-v2.json, specified
//! in docs/envelope.md): fixed keyring, fixed inputs, expected bytes. Checked five ways:
//! re-sealing gives the same bytes; an independent implementation of each construction (HKDF,
//! SHA-256 and AES-GCM with aws-lc-rs, written here from the spec, not calling keybroker) opens
//! them and yields every intermediate value; the local backend's wrapped keys (both wrap formats)
//! are reproduced; a real server decrypts them; and the no-lock-in recovery script
//! (scripts/recover_envelope.py) opens every one of them.
//!
//! Regenerate (only when the format changes on purpose):
//! `KEYBROKER_WRITE_VECTORS=1 cargo nextest run envelope_vectors`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use aws_lc_rs::{aead, digest, hkdf};
use keybroker::backend::{BackendContext, BackendKind};
use keybroker::envelope::{self, Kind, WrappedCopy};
use keybroker::proto::DecryptRequest;
use keybroker::secret::SecretKey;
use serde_json::{Value, json};

const KEK: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";
/// The second key of the vector keyring, `escrow` (the multi-copy vector's second copy).
const ESCROW_KEK: &str = "f0e1d2c3b4a5968778695a4b3c2d1e0f00112233445566778899aabbccddeeff";

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn vectors_path(version: u8) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join(format!("tests/vectors/envelope-v{version}.json"))
}

struct Len(usize);
impl hkdf::KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

fn hkdf_sha256(ikm: &[u8], salt: &[u8], info: &[&[u8]], len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    hkdf::Salt::new(hkdf::HKDF_SHA256, salt)
        .extract(ikm)
        .expand(info, Len(len))
        .unwrap()
        .fill(&mut out)
        .unwrap();
    out
}

fn local_aad(label: &[u8], key_name: &str, version: u32, ctx: &BackendContext<'_>) -> Vec<u8> {
    let mut aad = label.to_vec();
    aad.push(key_name.len() as u8);
    aad.extend_from_slice(key_name.as_bytes());
    aad.extend_from_slice(&version.to_be_bytes());
    aad.extend_from_slice(&ctx.to_aad());
    aad
}

fn gcm_seal(key: &[u8], nonce: [u8; 12], aad: &[u8], plaintext: &[u8]) -> Vec<u8> {
    let key = aead::LessSafeKey::new(aead::UnboundKey::new(&aead::AES_256_GCM, key).unwrap());
    let mut body = plaintext.to_vec();
    key.seal_in_place_append_tag(
        aead::Nonce::assume_unique_for_key(nonce),
        aead::Aad::from(aad),
        &mut body,
    )
    .unwrap();
    body
}

fn gcm_open(key: &[u8], nonce: [u8; 12], aad: &[u8], sealed: &[u8]) -> Option<Vec<u8>> {
    let key = aead::LessSafeKey::new(aead::UnboundKey::new(&aead::AES_256_GCM, key).unwrap());
    let mut body = sealed.to_vec();
    let n = key
        .open_in_place(
            aead::Nonce::assume_unique_for_key(nonce),
            aead::Aad::from(aad),
            &mut body,
        )
        .ok()?
        .len();
    body.truncate(n);
    Some(body)
}

/// Local wrap format 1 (docs/envelope.md): a 12-byte nonce, GCM under the KEK itself.
fn local_wrap_v1(
    kek: &[u8],
    key_name: &str,
    version: u32,
    ctx: &BackendContext<'_>,
    data_key: &[u8],
    nonce: [u8; 12],
) -> Vec<u8> {
    let aad = local_aad(b"keybroker local wrap v1", key_name, version, ctx);
    let mut out = nonce.to_vec();
    out.extend(gcm_seal(kek, nonce, &aad, data_key));
    out
}

/// Local wrap format 2: 0x02 || salt || GCM(HKDF(KEK, salt, info), zero nonce, aad, data key).
/// Returns (per-wrap key, wrapped).
fn local_wrap_v2(
    kek: &[u8],
    key_name: &str,
    version: u32,
    ctx: &BackendContext<'_>,
    data_key: &[u8],
    salt: &[u8],
) -> (Vec<u8>, Vec<u8>) {
    let k = hkdf_sha256(
        kek,
        salt,
        &[b"keybroker local wrap v2: aes-256-gcm key"],
        32,
    );
    let aad = local_aad(b"keybroker local wrap v2", key_name, version, ctx);
    let mut out = vec![0x02];
    out.extend_from_slice(salt);
    out.extend(gcm_seal(&k, [0; 12], &aad, data_key));
    (k, out)
}

/// The envelope key schedule, from the spec. Version 1: info is the label. Version 2: info is
/// the label || SHA-256(header up to the salt || canonical context). Returns (binding or empty,
/// message key, commitment).
fn derive(
    version: u8,
    data_key: &[u8],
    salt: &[u8],
    header_prefix: &[u8],
    context: &BTreeMap<String, String>,
) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    let (binding, okm) = if version == 1 {
        let okm = hkdf_sha256(
            data_key,
            salt,
            &[b"keybroker envelope v1: aes-256-gcm key || key commitment"],
            64,
        );
        (Vec::new(), okm)
    } else {
        let mut bound = header_prefix.to_vec();
        bound.extend(canonical_context(context));
        let binding = digest::digest(&digest::SHA256, &bound).as_ref().to_vec();
        let okm = hkdf_sha256(data_key, salt, &[b"keybroker envelope v2", &binding], 64);
        (binding, okm)
    };
    (binding, okm[..32].to_vec(), okm[32..].to_vec())
}

/// A derived data key (version 2, kind 3): HKDF(root, salt, label || u8 len) to len bytes.
fn derived_key(root: &[u8], salt: &[u8], len: usize) -> Vec<u8> {
    hkdf_sha256(root, salt, &[b"keybroker data key v2", &[len as u8]], len)
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
    /// The sealed payload (for a derived data key: its length byte).
    plaintext: &'static [u8],
    data_key_len: usize,
    /// Wrapped copies: 1 (key `default`), or 2 (also key `escrow`, as a key with two wrapping
    /// keyrings writes; docs/multi-backend.md).
    copies: usize,
}

const V1_CASES: &[Case] = &[
    Case {
        name: "empty message, empty context",
        kind: Kind::Message,
        key_name: "default",
        caller: "anonymous",
        context: &[],
        plaintext: b"",
        data_key_len: 32,
        copies: 1,
    },
    Case {
        name: "message with context",
        kind: Kind::Message,
        key_name: "default",
        caller: "anonymous",
        context: &[("tenant", "acme"), ("purpose", "invoice")],
        plaintext: b"hello, keybroker",
        data_key_len: 32,
        copies: 1,
    },
    Case {
        name: "message for a named caller",
        kind: Kind::Message,
        key_name: "default",
        caller: "spiffe://example.org/ns/shop/sa/api",
        context: &[("k", "")],
        plaintext: &[0u8, 1, 2, 255, 254, 253, 10, 13],
        data_key_len: 32,
        copies: 1,
    },
    Case {
        name: "AES-128 data key blob",
        kind: Kind::DataKey,
        key_name: "default",
        caller: "anonymous",
        context: &[("a", "b")],
        plaintext: b"",
        data_key_len: 16,
        copies: 1,
    },
];

const V2_CASES: &[Case] = &[
    Case {
        name: "empty message, empty context",
        kind: Kind::Message,
        key_name: "default",
        caller: "anonymous",
        context: &[],
        plaintext: b"",
        data_key_len: 32,
        copies: 1,
    },
    Case {
        name: "message with context",
        kind: Kind::Message,
        key_name: "default",
        caller: "anonymous",
        context: &[("tenant", "acme"), ("purpose", "invoice")],
        plaintext: b"hello, keybroker",
        data_key_len: 32,
        copies: 1,
    },
    Case {
        name: "message for a named caller",
        kind: Kind::Message,
        key_name: "default",
        caller: "spiffe://example.org/ns/shop/sa/api",
        context: &[("k", "")],
        plaintext: &[0u8, 1, 2, 255, 254, 253, 10, 13],
        data_key_len: 32,
        copies: 1,
    },
    Case {
        name: "derived AES-256 data key",
        kind: Kind::DerivedDataKey,
        key_name: "default",
        caller: "anonymous",
        context: &[("object", "invoices/2026/0001.pdf")],
        plaintext: &[32],
        data_key_len: 32,
        copies: 1,
    },
    Case {
        name: "derived AES-128 data key",
        kind: Kind::DerivedDataKey,
        key_name: "default",
        caller: "anonymous",
        context: &[("a", "b")],
        plaintext: &[16],
        data_key_len: 32,
        copies: 1,
    },
    Case {
        name: "re-encrypted version 1 data key blob",
        kind: Kind::DataKey,
        key_name: "default",
        caller: "anonymous",
        context: &[],
        plaintext: b"",
        data_key_len: 16,
        copies: 1,
    },
    Case {
        name: "message with two wrapped copies (keys default and escrow)",
        kind: Kind::Message,
        key_name: "default",
        caller: "anonymous",
        context: &[("region", "eu")],
        plaintext: b"survives either keyring",
        data_key_len: 32,
        copies: 2,
    },
];

fn context_map(c: &Case) -> BTreeMap<String, String> {
    c.context
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn generate(version: u8) -> Value {
    let kek = unhex(KEK);
    let cases = if version == 1 { V1_CASES } else { V2_CASES };
    let mut vectors = Vec::new();
    for (i, c) in cases.iter().enumerate() {
        let data_key: Vec<u8> = (0..c.data_key_len)
            .map(|j| (0xa0 + i * 16 + j) as u8)
            .collect();
        let salt: Vec<u8> = (0..32).map(|j| (j * 3 + i) as u8).collect();
        let bctx = BackendContext {
            key_name: c.key_name,
            caller: c.caller,
        };
        let mut v = serde_json::Map::new();
        let wrapped = if version == 1 {
            let nonce: [u8; 12] = std::array::from_fn(|j| (0x70 + i + j) as u8);
            local_wrap_v1(&kek, "default", 1, &bctx, &data_key, nonce)
        } else {
            let wrap_salt: Vec<u8> = (0..32).map(|j| (0xc0 + i + 5 * j) as u8).collect();
            let (wrap_key, wrapped) =
                local_wrap_v2(&kek, "default", 1, &bctx, &data_key, &wrap_salt);
            v.insert("wrap_salt".into(), hex(&wrap_salt).into());
            v.insert("wrap_key".into(), hex(&wrap_key).into());
            wrapped
        };
        let context = context_map(c);
        let mut copies = vec![WrappedCopy {
            backend: BackendKind::Local,
            key_id: "default",
            key_version: "1",
            wrapped: &wrapped,
        }];
        let escrow_salt: Vec<u8> = (0..32).map(|j| (0x30 + i + 7 * j) as u8).collect();
        let escrow = local_wrap_v2(
            &unhex(ESCROW_KEK),
            "escrow",
            1,
            &bctx,
            &data_key,
            &escrow_salt,
        )
        .1;
        if c.copies == 2 {
            copies.push(WrappedCopy {
                backend: BackendKind::Local,
                key_id: "escrow",
                key_version: "1",
                wrapped: &escrow,
            });
            v.insert("escrow_wrap_salt".into(), hex(&escrow_salt).into());
            v.insert("escrow_wrapped_key".into(), hex(&escrow).into());
        }
        let ct = envelope::seal_with_salt(
            version,
            c.kind,
            c.key_name,
            c.caller,
            &copies,
            &SecretKey::from_slice(&data_key),
            &context,
            c.plaintext,
            &salt.clone().try_into().unwrap(),
        )
        .unwrap();
        let header_len = ct.len() - c.plaintext.len() - 16;
        let (binding, mk, commitment) =
            derive(version, &data_key, &salt, &ct[..header_len - 32], &context);
        let mut aad = ct[..header_len].to_vec();
        aad.extend(canonical_context(&context));
        for (k, val) in [
            ("name", json!(c.name)),
            ("kind", json!(c.kind as u8)),
            ("key_name", json!(c.key_name)),
            ("caller", json!(c.caller)),
            ("context", json!(context)),
            ("plaintext", json!(hex(c.plaintext))),
            ("data_key", json!(hex(&data_key))),
            ("salt", json!(hex(&salt))),
            ("wrapped_key", json!(hex(&wrapped))),
            ("message_key", json!(hex(&mk))),
            ("commitment", json!(hex(&commitment))),
            ("aad", json!(hex(&aad))),
            ("header_len", json!(header_len)),
            ("ciphertext", json!(hex(&ct))),
        ] {
            v.insert(k.into(), val);
        }
        if version == 2 {
            v.insert("binding".into(), hex(&binding).into());
        }
        if c.kind == Kind::DerivedDataKey {
            let len = c.plaintext[0] as usize;
            v.insert(
                "derived_key".into(),
                hex(&derived_key(&data_key, &salt, len)).into(),
            );
        }
        vectors.push(Value::Object(v));
    }
    let mut file = json!({
        "format": format!("keybroker envelope v{version} test vectors"),
        "keyring": {"key": "default", "version": 1, "kek": KEK},
        "vectors": vectors,
    });
    if cases.iter().any(|c| c.copies == 2) {
        file["escrow_keyring"] = json!({"key": "escrow", "version": 1, "kek": ESCROW_KEK});
    }
    file
}

fn load(version: u8) -> Value {
    let current = std::fs::read_to_string(vectors_path(version))
        .ok()
        .and_then(|t| serde_json::from_str::<Value>(&t).ok());
    if std::env::var_os("KEYBROKER_WRITE_VECTORS").is_some()
        && current.as_ref() != Some(&generate(version))
    {
        let v = generate(version);
        std::fs::create_dir_all(vectors_path(version).parent().unwrap()).unwrap();
        std::fs::write(
            vectors_path(version),
            serde_json::to_string_pretty(&v).unwrap() + "\n",
        )
        .unwrap();
    }
    serde_json::from_str(&std::fs::read_to_string(vectors_path(version)).unwrap()).unwrap()
}

fn context_of(v: &Value) -> BTreeMap<String, String> {
    v["context"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, x)| (k.clone(), x.as_str().unwrap().to_owned()))
        .collect()
}

/// What Decrypt of a vector returns: the payload, the data key itself, or the derived key.
fn decrypt_result(v: &Value) -> &str {
    match v["kind"].as_u64().unwrap() {
        1 => v["plaintext"].as_str().unwrap(),
        2 => v["data_key"].as_str().unwrap(),
        _ => v["derived_key"].as_str().unwrap(),
    }
}

#[test]
fn vectors_reseal_to_the_same_bytes_and_open_independently() {
    let kek = unhex(KEK);
    for version in [1u8, 2] {
        let file = load(version);
        // The file is what this code generates (the spec, the code and the vectors agree).
        assert_eq!(
            file,
            generate(version),
            "tests/vectors/envelope-v{version}.json is out of date with the implementation"
        );
        for v in file["vectors"].as_array().unwrap() {
            let name = format!("v{version} {}", v["name"].as_str().unwrap());
            let ct = unhex(v["ciphertext"].as_str().unwrap());
            let data_key = unhex(v["data_key"].as_str().unwrap());
            let salt = unhex(v["salt"].as_str().unwrap());
            let context = context_of(v);
            let plaintext = unhex(v["plaintext"].as_str().unwrap());
            let header_len = v["header_len"].as_u64().unwrap() as usize;

            // Independent: derive, check commitment at its documented offset, open with AES-GCM.
            assert_eq!(
                &ct[..4],
                &[b'K', b'B', version, v["kind"].as_u64().unwrap() as u8],
                "{name}"
            );
            let (binding, mk, commitment) =
                derive(version, &data_key, &salt, &ct[..header_len - 32], &context);
            if version == 2 {
                assert_eq!(hex(&binding), v["binding"], "{name}");
            }
            assert_eq!(hex(&mk), v["message_key"], "{name}");
            assert_eq!(hex(&commitment), v["commitment"], "{name}");
            assert_eq!(
                &ct[header_len - 64..header_len - 32],
                salt.as_slice(),
                "{name}: salt"
            );
            assert_eq!(
                &ct[header_len - 32..header_len],
                commitment.as_slice(),
                "{name}: commitment position"
            );
            let mut aad = ct[..header_len].to_vec();
            aad.extend(canonical_context(&context));
            assert_eq!(hex(&aad), v["aad"], "{name}");
            let opened = gcm_open(&mk, [0; 12], &aad, &ct[header_len..]).unwrap();
            assert_eq!(opened, plaintext, "{name}");

            // The wrapped key is the local backend's, in the format of its file's era.
            let bctx = BackendContext {
                key_name: v["key_name"].as_str().unwrap(),
                caller: v["caller"].as_str().unwrap(),
            };
            let wrapped = unhex(v["wrapped_key"].as_str().unwrap());
            if version == 2 {
                let wrap_salt = unhex(v["wrap_salt"].as_str().unwrap());
                let (k, again) = local_wrap_v2(&kek, "default", 1, &bctx, &data_key, &wrap_salt);
                assert_eq!(hex(&k), v["wrap_key"], "{name}");
                assert_eq!(again, wrapped, "{name}");
            }

            // A derived data key comes from the root and the salt, and is not the root.
            if v["kind"] == 3 {
                let len = plaintext[0] as usize;
                let dk = derived_key(&data_key, &salt, len);
                assert_eq!(hex(&dk), v["derived_key"], "{name}");
                assert_ne!(&dk[..], &data_key[..len], "{name}");
            }

            // A second copy (the multi-copy vector) is the escrow key's wrap of the same key.
            let env = envelope::parse(&ct).unwrap();
            if let Some(escrow) = v.get("escrow_wrapped_key") {
                let salt = unhex(v["escrow_wrap_salt"].as_str().unwrap());
                let (_, again) =
                    local_wrap_v2(&unhex(ESCROW_KEK), "escrow", 1, &bctx, &data_key, &salt);
                assert_eq!(hex(&again), *escrow, "{name}");
                assert_eq!(env.copies.len(), 2, "{name}");
                assert_eq!(env.copies[1].key_id, "escrow", "{name}");
                assert_eq!(hex(env.copies[1].wrapped), *escrow, "{name}");
            } else {
                assert_eq!(env.copies.len(), 1, "{name}");
            }

            // keybroker's parser agrees on every field.
            assert_eq!(env.version, version, "{name}");
            assert_eq!(env.key_name, v["key_name"], "{name}");
            assert_eq!(env.caller, v["caller"], "{name}");
            assert_eq!(hex(env.copies[0].wrapped), v["wrapped_key"], "{name}");
            let root = SecretKey::from_slice(&data_key);
            assert_eq!(env.open(&root, &context).unwrap(), plaintext, "{name}");
            if v["kind"] != 1 {
                let key = env.open_data_key(&root, &context).unwrap();
                assert_eq!(hex(key.as_ref()), decrypt_result(v), "{name}");
            }
            // Version 2 commits to the context: the same bytes under another context fail at
            // the commitment already (the binding differs), not only at the tag.
            if version == 2 {
                let mut other = context.clone();
                other.insert("extra".into(), "pair".into());
                let (_, _, c2) = derive(2, &data_key, &salt, &ct[..header_len - 32], &other);
                assert_ne!(c2, commitment, "{name}");
            }
        }
    }
}

/// The local backend's own wraps are format 2 (a per-wrap key from a 256-bit salt, issue 21
/// item 7), opened here by the independent implementation above.
#[tokio::test]
async fn local_backend_wraps_are_format_2() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keyring");
    keybroker::keyring::edit(&path, true, |r| r.create_key("default")).unwrap();
    let ring = keybroker::backend::local::LocalKeyring::open(&path, None).unwrap();
    let backend = keybroker::backend::local::LocalBackend::new(ring, "default");
    let kek = keybroker::keyring::Keyring::load(&path).unwrap().keys["default"].versions[&1]
        .material()
        .as_ref()
        .to_vec();
    let ctx = BackendContext {
        key_name: "default",
        caller: "anonymous",
    };
    let mut salts = Vec::new();
    for len in [32, 16] {
        let (key, w) = keybroker::backend::KeyBackend::generate_data_key(&backend, len, &ctx)
            .await
            .unwrap();
        assert_eq!(w.key_version, "1");
        assert_eq!(w.ciphertext.len(), 1 + 32 + len + 16);
        assert_eq!(w.ciphertext[0], 2, "format byte");
        let salt = &w.ciphertext[1..33];
        let k = hkdf_sha256(
            &kek,
            salt,
            &[b"keybroker local wrap v2: aes-256-gcm key"],
            32,
        );
        let aad = local_aad(b"keybroker local wrap v2", "default", 1, &ctx);
        let opened = gcm_open(&k, [0; 12], &aad, &w.ciphertext[33..]).expect("opens");
        assert_eq!(opened, key.as_ref());
        salts.push(salt.to_vec());
    }
    assert_ne!(salts[0], salts[1]);
}

fn write_vector_keyring(dir: &std::path::Path) {
    use base64::Engine;
    let kek_b64 = base64::engine::general_purpose::STANDARD.encode(unhex(KEK));
    let escrow_b64 = base64::engine::general_purpose::STANDARD.encode(unhex(ESCROW_KEK));
    std::fs::write(
        dir.join("keyring"),
        json!({"format": "keybroker-keyring/v1", "keys": {"default": {"enabled": true, "primary": 1,
            "versions": [{"version": 1, "created": "2026-01-01T00:00:00Z", "material": kek_b64}]},
            "escrow": {"enabled": true, "primary": 1,
            "versions": [{"version": 1, "created": "2026-01-01T00:00:00Z", "material": escrow_b64}]}}})
        .to_string(),
    )
    .unwrap();
    // Keyrings others could read are refused (docs/config.md, Local keyrings).
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.join("keyring"), std::fs::Permissions::from_mode(0o600)).unwrap();
}

#[tokio::test]
async fn a_server_with_the_vector_keyring_decrypts_the_vectors() {
    let dir = tempfile::tempdir().unwrap();
    write_vector_keyring(dir.path());
    let server = crate::support::TestServer::start_in(
        dir,
        &format!(
            "[keys.default]\nbackend = \"local\"\nkey_id = \"default\"\nkeyring = \"{{dir}}/keyring\"\n{}",
            crate::support::allow_anonymous("default")
        ),
    )
    .await;
    let mut c = server.client().await;
    for version in [1u8, 2] {
        for v in load(version)["vectors"].as_array().unwrap() {
            let r = c
                .decrypt(DecryptRequest {
                    ciphertext: unhex(v["ciphertext"].as_str().unwrap()).into(),
                    context: context_of(v),
                })
                .await
                .unwrap_or_else(|s| panic!("v{version} {}: {s:?}", v["name"]))
                .into_inner();
            assert_eq!(
                hex(&r.plaintext),
                decrypt_result(v),
                "v{version} {}",
                v["name"]
            );
            assert_eq!(r.key_version, "1");
        }
    }
}

/// The multi-copy vector opens through either copy alone: a server whose key is only the
/// `escrow` keyring key, one whose key is only `default`, and one with both as wrapping
/// backends.
#[tokio::test]
async fn the_multi_copy_vector_opens_through_either_copy() {
    let file = load(2);
    let v = file["vectors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v.get("escrow_wrapped_key").is_some())
        .unwrap()
        .clone();
    for key in [
        "backend = \"local\"\nkey_id = \"escrow\"\nkeyring = \"{dir}/keyring\"\n",
        "backend = \"local\"\nkey_id = \"default\"\nkeyring = \"{dir}/keyring\"\n",
        "wrap = [\n { backend = \"local\", key_id = \"default\", keyring = \"{dir}/keyring\" },\n { backend = \"local\", key_id = \"escrow\", keyring = \"{dir}/keyring\" },\n]\n",
    ] {
        let dir = tempfile::tempdir().unwrap();
        write_vector_keyring(dir.path());
        let server = crate::support::TestServer::start_in(
            dir,
            &format!(
                "[keys.default]\n{key}{}",
                crate::support::allow_anonymous("default")
            ),
        )
        .await;
        let mut c = server.client().await;
        let r = c
            .decrypt(DecryptRequest {
                ciphertext: unhex(v["ciphertext"].as_str().unwrap()).into(),
                context: context_of(&v),
            })
            .await
            .unwrap_or_else(|s| panic!("{key}: {s:?}"))
            .into_inner();
        assert_eq!(hex(&r.plaintext), decrypt_result(&v), "{key}");
        assert!(server.stop().await);
    }
}

/// scripts/recover_envelope.py (no keybroker, no Rust) opens every vector of both versions
/// given the data key, and refuses a wrong context.
#[tokio::test]
async fn the_recovery_script_opens_every_vector() {
    let python = crate::support::venv_bin("python");
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/recover_envelope.py");
    let dir = tempfile::tempdir().unwrap();
    let run = |args: Vec<String>| {
        std::process::Command::new(&python)
            .arg(&script)
            .args(args)
            .output()
            .unwrap()
    };
    for version in [1u8, 2] {
        for (i, v) in load(version)["vectors"]
            .as_array()
            .unwrap()
            .iter()
            .enumerate()
        {
            let name = format!("v{version} {}", v["name"].as_str().unwrap());
            let ct = dir.path().join(format!("v{version}-{i}.kb"));
            let key = dir.path().join(format!("v{version}-{i}.key"));
            std::fs::write(&ct, unhex(v["ciphertext"].as_str().unwrap())).unwrap();
            std::fs::write(&key, unhex(v["data_key"].as_str().unwrap())).unwrap();
            let context = serde_json::to_string(&v["context"]).unwrap();
            let out = run(vec![
                "open".into(),
                ct.display().to_string(),
                key.display().to_string(),
                context,
            ]);
            assert!(
                out.status.success(),
                "{name}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert_eq!(hex(&out.stdout), decrypt_result(v), "{name}");
            let wrong = run(vec![
                "open".into(),
                ct.display().to_string(),
                key.display().to_string(),
                r#"{"not":"the context"}"#.into(),
            ]);
            assert!(!wrong.status.success() && wrong.stdout.is_empty(), "{name}");
            let parts = dir.path().join(format!("parts-{version}-{i}"));
            let split = run(vec![
                "split".into(),
                ct.display().to_string(),
                parts.display().to_string(),
            ]);
            assert!(split.status.success(), "{name}");
            assert_eq!(
                hex(&std::fs::read(parts.join("wrapped-0.bin")).unwrap()),
                v["wrapped_key"],
                "{name}"
            );
            if let Some(escrow) = v.get("escrow_wrapped_key") {
                assert_eq!(
                    hex(&std::fs::read(parts.join("wrapped-1.bin")).unwrap()),
                    *escrow,
                    "{name}"
                );
            }
        }
    }
}

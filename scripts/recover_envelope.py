#!/usr/bin/env python3
"""Recover data from a keybroker ciphertext without keybroker (envelope format v1).

Two steps around your cloud's own CLI (docs/gcp.md shows the whole procedure):

  recover_envelope.py split CIPHERTEXT_FILE OUT_DIR
      Reads the envelope header and writes, for each wrapped copy i of the data key,
      OUT_DIR/wrapped-<i>.bin (the cloud's ciphertext blob), plus OUT_DIR/aad.bin (the
      backend-context AAD keybroker sent to Cloud KMS). Prints one JSON line describing them.

  (unwrap wrapped-<i>.bin with the cloud's CLI, e.g. `gcloud kms decrypt ... \
      --additional-authenticated-data-file=OUT_DIR/aad.bin`, into DATA_KEY_FILE)

  recover_envelope.py open CIPHERTEXT_FILE DATA_KEY_FILE [CONTEXT_JSON]
      Checks the key commitment, decrypts and authenticates the payload under the header and
      the encryption context (a JSON object of strings, default {}), writes it to stdout.

Needs Python 3.9+ and the `cryptography` package (pip install cryptography). Depends on
nothing from keybroker: the format is written out here from docs/envelope.md.
"""

import hashlib
import hmac
import json
import struct
import sys
from pathlib import Path

HKDF_INFO = b"keybroker envelope v1: aes-256-gcm key || key commitment"
BACKENDS = {1: "local", 2: "aws", 3: "gcp", 4: "azure"}


class Reader:
    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def take(self, n: int, what: str) -> bytes:
        if self.pos + n > len(self.data):
            sys.exit(f"ciphertext is truncated (in {what})")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def u8(self, what: str) -> int:
        return self.take(1, what)[0]

    def u16(self, what: str) -> int:
        return struct.unpack(">H", self.take(2, what))[0]


def parse(ct: bytes) -> dict:
    r = Reader(ct)
    if r.take(2, "magic") != b"KB":
        sys.exit("not a keybroker ciphertext (bad magic)")
    if r.u8("version") != 1:
        sys.exit("unsupported envelope version (this script reads version 1)")
    kind = r.u8("kind")
    key_name = r.take(r.u8("key name"), "key name").decode()
    caller = r.take(r.u8("caller"), "caller").decode()
    copies = []
    for _ in range(r.u8("copy count")):
        backend = BACKENDS.get(r.u8("backend"), "unknown")
        key_id = r.take(r.u16("key id"), "key id").decode()
        key_version = r.take(r.u16("key version"), "key version").decode()
        wrapped = r.take(r.u16("wrapped key"), "wrapped key")
        copies.append({"backend": backend, "key_id": key_id, "key_version": key_version, "wrapped": wrapped})
    salt = r.take(32, "salt")
    commitment = r.take(32, "commitment")
    return {
        "kind": kind,
        "key_name": key_name,
        "caller": caller,
        "copies": copies,
        "salt": salt,
        "commitment": commitment,
        "header": ct[: r.pos],
        "body": ct[r.pos :],
    }


def encode_context(pairs: dict) -> bytes:
    """Canonical encoding: u16 pair count, then pairs sorted by key bytes, each key and value
    as u16 big-endian length + UTF-8 bytes."""
    out = struct.pack(">H", len(pairs))
    for k, v in sorted((k.encode(), v.encode()) for k, v in pairs.items()):
        out += struct.pack(">H", len(k)) + k + struct.pack(">H", len(v)) + v
    return out


def hkdf_sha256(ikm: bytes, salt: bytes, info: bytes, length: int) -> bytes:
    prk = hmac.new(salt, ikm, hashlib.sha256).digest()
    okm, block = b"", b""
    for i in range((length + 31) // 32):
        block = hmac.new(prk, block + info + bytes([i + 1]), hashlib.sha256).digest()
        okm += block
    return okm[:length]


def split(ct_file: str, out_dir: str) -> None:
    env = parse(Path(ct_file).read_bytes())
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    aad = encode_context({"keybroker:key": env["key_name"], "keybroker:caller": env["caller"]})
    (out / "aad.bin").write_bytes(aad)
    copies = []
    for i, c in enumerate(env["copies"]):
        path = out / f"wrapped-{i}.bin"
        path.write_bytes(c["wrapped"])
        copies.append({k: c[k] for k in ("backend", "key_id", "key_version")} | {"file": str(path)})
    print(json.dumps({"key_name": env["key_name"], "caller": env["caller"], "aad_file": str(out / "aad.bin"), "copies": copies}))


def open_(ct_file: str, key_file: str, context_json: str = "{}") -> None:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    env = parse(Path(ct_file).read_bytes())
    data_key = Path(key_file).read_bytes()
    okm = hkdf_sha256(data_key, env["salt"], HKDF_INFO, 64)
    if not hmac.compare_digest(okm[32:], env["commitment"]):
        sys.exit("key commitment does not match: wrong data key")
    aad = env["header"] + encode_context(json.loads(context_json))
    try:
        payload = AESGCM(okm[:32]).decrypt(bytes(12), env["body"], aad)
    except Exception:
        sys.exit("decryption failed: wrong context or damaged ciphertext")
    # A GenerateDataKey `wrapped_key` (kind 2) authenticates the context only: the data key
    # itself is what it protects.
    sys.stdout.buffer.write(payload if env["kind"] == 1 else data_key)


if __name__ == "__main__":
    if len(sys.argv) >= 4 and sys.argv[1] == "split":
        split(sys.argv[2], sys.argv[3])
    elif len(sys.argv) in (4, 5) and sys.argv[1] == "open":
        open_(*sys.argv[2:])
    else:
        sys.exit(__doc__)

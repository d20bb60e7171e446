#!/usr/bin/env python3
"""Recover data from a keybroker ciphertext without keybroker (envelope formats 1 and 2, and
format 2's stream envelope, kind 4, made by EncryptStream).

Two steps around your cloud's own CLI (docs/gcp.md shows the whole procedure):

  recover_envelope.py split CIPHERTEXT_FILE OUT_DIR
      Reads the envelope header and writes, for each wrapped copy i of the data key,
      OUT_DIR/wrapped-<i>.bin (the cloud's ciphertext blob), plus OUT_DIR/aad.bin (the
      backend-context AAD keybroker sent to Cloud KMS). Prints one JSON line describing them.

  (unwrap wrapped-<i>.bin with the cloud's CLI, e.g. `gcloud kms decrypt ... \
      --additional-authenticated-data-file=OUT_DIR/aad.bin`, into DATA_KEY_FILE)

      An Azure Key Vault RSA copy made with signatures (the default) is the RSA ciphertext
      followed by Key Vault's signature, both the key's modulus size: the first half is also
      written, as OUT_DIR/wrapped-<i>.rsa.bin, and that is what unwrapKey takes.

  recover_envelope.py open CIPHERTEXT_FILE DATA_KEY_FILE [CONTEXT_JSON]
      Checks the key commitment, decrypts and authenticates the payload under the header and
      the encryption context (a JSON object of strings, default {}), writes it to stdout. For a
      GenerateDataKey `wrapped_key` it writes the data key the caller was given: the data key
      itself (format 1, kind 2) or the key derived from it (format 2, kind 3). A stream
      envelope (kind 4) is read and written segment by segment (any size, little memory); if a
      segment fails, the script stops with an error and what it wrote so far is NOT the whole
      payload: discard it.

Needs Python 3.9+ and the `cryptography` package (pip install cryptography). Depends on
nothing from keybroker: the format is written out here from docs/envelope.md.
"""

import hashlib
import hmac
import json
import struct
import sys
from pathlib import Path

HKDF_INFO = {
    1: b"keybroker envelope v1: aes-256-gcm key || key commitment",
    2: b"keybroker envelope v2",
}
DERIVED_KEY_INFO = b"keybroker data key v2"
BACKENDS = {1: "local", 2: "aws", 3: "gcp", 4: "azure"}
KINDS = {1: "message", 2: "data key", 3: "derived data key", 4: "stream"}
# Kind 4: plaintext bytes per segment, and a sealed segment's size (plus the GCM tag).
SEGMENT_LEN = 64 * 1024
SEALED_SEGMENT_LEN = SEGMENT_LEN + 16
# The longest header the format allows (8 copies of the longest fields).
MAX_HEADER_LEN = 4 + 2 * 256 + 1 + 8 * (1 + 6 + 2048 + 2048 + 4096) + 64


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
    version = r.u8("version")
    if version not in HKDF_INFO:
        sys.exit("unsupported envelope version (this script reads versions 1 and 2)")
    kind = r.u8("kind")
    if kind not in KINDS or (kind in (3, 4) and version != 2):
        sys.exit("unknown envelope kind")
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
        "version": version,
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
    env = read_envelope(ct_file)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    aad = encode_context({"keybroker:key": env["key_name"], "keybroker:caller": env["caller"]})
    (out / "aad.bin").write_bytes(aad)
    copies = []
    for i, c in enumerate(env["copies"]):
        path = out / f"wrapped-{i}.bin"
        path.write_bytes(c["wrapped"])
        entry = {k: c[k] for k in ("backend", "key_id", "key_version")} | {"file": str(path)}
        if c["backend"] == "azure" and len(c["wrapped"]) in (512, 768, 1024):
            rsa = out / f"wrapped-{i}.rsa.bin"
            rsa.write_bytes(c["wrapped"][: len(c["wrapped"]) // 2])
            entry["rsa_ciphertext_file_if_signed"] = str(rsa)
        copies.append(entry)
    print(json.dumps({"key_name": env["key_name"], "caller": env["caller"], "aad_file": str(out / "aad.bin"), "copies": copies}))


def read_envelope(ct_file: str) -> dict:
    """The header (and, for the unary kinds, the body) without reading a stream into memory."""
    with open(ct_file, "rb") as f:
        head = f.read(MAX_HEADER_LEN)
    if len(head) >= 4 and head[3] == 4:
        return parse(head)
    return parse(Path(ct_file).read_bytes())


def open_stream(ct_file: str, env: dict, message_key: bytes) -> None:
    """The STREAM construction (docs/envelope.md, kind 4): segment i is AES-256-GCM under the
    message key, nonce 0^7 || u32be(i) || final flag, no AAD; every segment but the last holds
    exactly 64 KiB of plaintext."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    aes = AESGCM(message_key)
    with open(ct_file, "rb") as f:
        f.seek(len(env["header"]))
        index, segment = 0, f.read(SEALED_SEGMENT_LEN)
        while True:
            following = f.read(SEALED_SEGMENT_LEN)
            last = not following
            nonce = bytes(7) + struct.pack(">I", index) + bytes([1 if last else 0])
            try:
                if len(segment) < 16:
                    raise ValueError("short segment")
                plaintext = aes.decrypt(nonce, segment, None)
                if last and not plaintext and index > 0:
                    raise ValueError("empty last segment")
            except Exception:
                sys.stdout.buffer.flush()
                sys.exit(
                    f"decryption failed at segment {index}: the stream is damaged, truncated or "
                    "extended; what was written so far is NOT the whole payload, discard it"
                )
            sys.stdout.buffer.write(plaintext)
            if last:
                return
            segment, index = following, index + 1


def open_(ct_file: str, key_file: str, context_json: str = "{}") -> None:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    env = read_envelope(ct_file)
    data_key = Path(key_file).read_bytes()
    context = encode_context(json.loads(context_json))
    info = HKDF_INFO[env["version"]]
    if env["version"] == 2:
        # Format 2 commits to the header (up to the salt) and the context as well.
        info += hashlib.sha256(env["header"][:-32] + context).digest()
    okm = hkdf_sha256(data_key, env["salt"], info, 64)
    if not hmac.compare_digest(okm[32:], env["commitment"]):
        sys.exit("key commitment does not match: wrong data key, header or context")
    if env["kind"] == 4:
        open_stream(ct_file, env, okm[:32])
        return
    try:
        payload = AESGCM(okm[:32]).decrypt(bytes(12), env["body"], env["header"] + context)
    except Exception:
        sys.exit("decryption failed: wrong context or damaged ciphertext")
    if env["kind"] == 1:
        sys.stdout.buffer.write(payload)
    elif env["kind"] == 2:
        # A data-key blob authenticates the context only: the data key itself is what it holds.
        sys.stdout.buffer.write(data_key)
    else:
        # A derived data key: its length is the payload; it comes from the data key and salt.
        length = payload[0]
        sys.stdout.buffer.write(hkdf_sha256(data_key, env["salt"], DERIVED_KEY_INFO + bytes([length]), length))


if __name__ == "__main__":
    if len(sys.argv) >= 4 and sys.argv[1] == "split":
        split(sys.argv[2], sys.argv[3])
    elif len(sys.argv) in (4, 5) and sys.argv[1] == "open":
        open_(*sys.argv[2:])
    else:
        sys.exit(__doc__)

"""Drives the Cloud KMS fake (tests/support/gcp_fake.rs) with Google's official Python client,
so the fake is held to the real client's expectations and not only to keybroker's.

Usage: gcp_kms_client.py HOST:PORT TOKEN
Prints "ok <step>" per step and "all ok" at the end; any mismatch raises (non-zero exit).
Run by tests/gcp.rs (fidelity test), which checks the exit status and the steps.
"""

import datetime
import sys

import google_crc32c
import grpc
from google.api_core import exceptions
from google.cloud import kms
from google.cloud.kms_v1.services.key_management_service.transports import (
    KeyManagementServiceGrpcTransport,
)

ADDR, TOKEN = sys.argv[1], sys.argv[2]
MD = [("authorization", f"Bearer {TOKEN}")]
TIMEOUT = 10.0
ENABLED = kms.CryptoKeyVersion.CryptoKeyVersionState.ENABLED
DISABLED = kms.CryptoKeyVersion.CryptoKeyVersionState.DISABLED


def crc(data: bytes) -> int:
    return int(google_crc32c.value(data))


def step(name: str) -> None:
    print(f"ok {name}", flush=True)


def expect(exc_type, fn, contains: str):
    try:
        fn()
    except exc_type as e:
        assert contains in e.message, f"{exc_type.__name__}: {e.message!r} lacks {contains!r}"
        return e
    raise AssertionError(f"expected {exc_type.__name__}")


channel = grpc.insecure_channel(ADDR)
client = kms.KeyManagementServiceClient(
    transport=KeyManagementServiceGrpcTransport(channel=channel)
)

# Administration through the real client's request shapes.
parent = "projects/fidelity/locations/global"
ring = client.create_key_ring(
    request={"parent": parent, "key_ring_id": "ring", "key_ring": {}}, metadata=MD, timeout=TIMEOUT
)
assert ring.name == f"{parent}/keyRings/ring", ring.name
key = client.create_crypto_key(
    request={
        "parent": ring.name,
        "crypto_key_id": "key",
        "crypto_key": {
            "purpose": kms.CryptoKey.CryptoKeyPurpose.ENCRYPT_DECRYPT,
            "version_template": {
                "algorithm": kms.CryptoKeyVersion.CryptoKeyVersionAlgorithm.GOOGLE_SYMMETRIC_ENCRYPTION
            },
        },
    },
    metadata=MD,
    timeout=TIMEOUT,
)
v1 = f"{key.name}/cryptoKeyVersions/1"
assert key.primary.name == v1 and key.primary.state == ENABLED, key
step("create")

# Encrypt with both request checksums: the service confirms them and checksums its ciphertext.
pt = b"fidelity plaintext \x00\xff"
aad = b"\x00\x02\x00\x10keybroker:caller\x00\x09anonymous\x00\x0dkeybroker:key\x00\x03app"
enc = client.encrypt(
    request={
        "name": key.name,
        "plaintext": pt,
        "plaintext_crc32c": crc(pt),
        "additional_authenticated_data": aad,
        "additional_authenticated_data_crc32c": crc(aad),
    },
    metadata=MD,
    timeout=TIMEOUT,
)
assert enc.name == v1, enc.name
assert enc.verified_plaintext_crc32c and enc.verified_additional_authenticated_data_crc32c
assert enc.ciphertext_crc32c == crc(enc.ciphertext)
assert enc.protection_level == kms.ProtectionLevel.SOFTWARE
assert pt not in enc.ciphertext
step("encrypt")

bare = client.encrypt(request={"name": key.name, "plaintext": pt}, metadata=MD, timeout=TIMEOUT)
assert not bare.verified_plaintext_crc32c and not bare.verified_additional_authenticated_data_crc32c
assert bare.ciphertext != enc.ciphertext
step("encrypt-without-checksums")

dec = client.decrypt(
    request={
        "name": key.name,
        "ciphertext": enc.ciphertext,
        "ciphertext_crc32c": crc(enc.ciphertext),
        "additional_authenticated_data": aad,
        "additional_authenticated_data_crc32c": crc(aad),
    },
    metadata=MD,
    timeout=TIMEOUT,
)
assert dec.plaintext == pt and dec.plaintext_crc32c == crc(pt) and dec.used_primary
step("decrypt")

expect(
    exceptions.InvalidArgument,
    lambda: client.decrypt(
        request={"name": key.name, "ciphertext": enc.ciphertext, "additional_authenticated_data": aad + b"x"},
        metadata=MD,
        timeout=TIMEOUT,
    ),
    "Decryption failed",
)
expect(
    exceptions.InvalidArgument,
    lambda: client.decrypt(
        request={"name": key.name, "ciphertext": enc.ciphertext}, metadata=MD, timeout=TIMEOUT
    ),
    "Decryption failed",
)
step("aad-mismatch")

expect(
    exceptions.InvalidArgument,
    lambda: client.encrypt(
        request={"name": key.name, "plaintext": pt, "plaintext_crc32c": crc(pt) ^ 1},
        metadata=MD,
        timeout=TIMEOUT,
    ),
    "The checksum in field plaintext_crc32c did not match the data in field plaintext.",
)
expect(
    exceptions.InvalidArgument,
    lambda: client.decrypt(
        request={
            "name": key.name,
            "ciphertext": enc.ciphertext,
            "ciphertext_crc32c": crc(enc.ciphertext) ^ 1,
            "additional_authenticated_data": aad,
        },
        metadata=MD,
        timeout=TIMEOUT,
    ),
    "The checksum in field ciphertext_crc32c did not match the data in field ciphertext.",
)
step("bad-checksums")

expect(
    exceptions.Unauthenticated,
    lambda: client.encrypt(request={"name": key.name, "plaintext": pt}, timeout=TIMEOUT),
    "missing required authentication credential",
)
step("unauthenticated")

# Rotation: a new version made primary takes new encryptions; old ciphertexts still decrypt.
v2 = client.create_crypto_key_version(
    request={"parent": key.name, "crypto_key_version": {}}, metadata=MD, timeout=TIMEOUT
)
assert v2.name == f"{key.name}/cryptoKeyVersions/2" and v2.state == ENABLED, v2
rotated = client.update_crypto_key_primary_version(
    request={"name": key.name, "crypto_key_version_id": "2"}, metadata=MD, timeout=TIMEOUT
)
assert rotated.primary.name == v2.name
enc2 = client.encrypt(request={"name": key.name, "plaintext": pt}, metadata=MD, timeout=TIMEOUT)
assert enc2.name == v2.name, enc2.name
old = client.decrypt(
    request={"name": key.name, "ciphertext": enc.ciphertext, "additional_authenticated_data": aad},
    metadata=MD,
    timeout=TIMEOUT,
)
assert old.plaintext == pt and not old.used_primary
step("rotate")

# A disabled version: its ciphertexts fail with FAILED_PRECONDITION, as Cloud KMS does.
upd = client.update_crypto_key_version(
    request={"crypto_key_version": {"name": v1, "state": DISABLED}, "update_mask": {"paths": ["state"]}},
    metadata=MD,
    timeout=TIMEOUT,
)
assert upd.name == v1 and upd.state == DISABLED, upd
expect(
    exceptions.FailedPrecondition,
    lambda: client.decrypt(
        request={"name": key.name, "ciphertext": enc.ciphertext, "additional_authenticated_data": aad},
        metadata=MD,
        timeout=TIMEOUT,
    ),
    f"{v1} is not enabled, current state is: DISABLED.",
)
expect(
    exceptions.FailedPrecondition,
    lambda: client.encrypt(request={"name": v1, "plaintext": pt}, metadata=MD, timeout=TIMEOUT),
    "is not enabled",
)
step("disabled-version")

got = client.get_crypto_key(request={"name": key.name}, metadata=MD, timeout=TIMEOUT)
assert got.primary.name == v2.name and got.primary.state == ENABLED
assert got.purpose == kms.CryptoKey.CryptoKeyPurpose.ENCRYPT_DECRYPT
expect(
    exceptions.NotFound,
    lambda: client.get_crypto_key(request={"name": f"{ring.name}/cryptoKeys/missing"}, metadata=MD, timeout=TIMEOUT),
    "not found",
)
step("get-crypto-key")

# A rotation schedule: CreateCryptoKey takes rotation_period (a Duration) and next_rotation_time
# (a Timestamp); GetCryptoKey returns them with the primary version and its create_time, which
# keybroker reads for `rotation_state = true`. A period under 24h is refused.
next_at = datetime.datetime(2031, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc)
scheduled = client.create_crypto_key(
    request={
        "parent": ring.name,
        "crypto_key_id": "scheduled",
        "crypto_key": {
            "purpose": kms.CryptoKey.CryptoKeyPurpose.ENCRYPT_DECRYPT,
            "rotation_period": {"seconds": 90 * 86400},
            "next_rotation_time": {"seconds": int(next_at.timestamp())},
        },
    },
    metadata=MD,
    timeout=TIMEOUT,
)
got = client.get_crypto_key(request={"name": scheduled.name}, metadata=MD, timeout=TIMEOUT)
assert got.rotation_period == datetime.timedelta(days=90), got.rotation_period
assert got.next_rotation_time == next_at, got.next_rotation_time
assert got.primary.name == f"{scheduled.name}/cryptoKeyVersions/1", got.primary.name
age = datetime.datetime.now(datetime.timezone.utc) - got.primary.create_time
assert datetime.timedelta(0) <= age < datetime.timedelta(hours=1), got.primary.create_time
assert "rotation_period" in kms.CryptoKey.pb(got).DESCRIPTOR.fields_by_name
assert kms.CryptoKey.pb(got).WhichOneof("rotation_schedule") == "rotation_period"
plain = client.get_crypto_key(request={"name": key.name}, metadata=MD, timeout=TIMEOUT)
assert kms.CryptoKey.pb(plain).WhichOneof("rotation_schedule") is None
assert not kms.CryptoKey.pb(plain).HasField("next_rotation_time")
expect(
    exceptions.InvalidArgument,
    lambda: client.create_crypto_key(
        request={
            "parent": ring.name,
            "crypto_key_id": "too-often",
            "crypto_key": {
                "purpose": kms.CryptoKey.CryptoKeyPurpose.ENCRYPT_DECRYPT,
                "rotation_period": {"seconds": 3600},
                "next_rotation_time": {"seconds": int(next_at.timestamp())},
            },
        },
        metadata=MD,
        timeout=TIMEOUT,
    ),
    "rotation_period must be at least 24 hours",
)
step("rotation-schedule")

print("all ok", flush=True)

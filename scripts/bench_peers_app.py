"""A Python application encrypting 1 KiB records, two ways, in one process (issue 13, item 4):

  sdk        the AWS Encryption SDK with its caching CMM over a raw AES-256 wrapping key
             (no KMS): data keys are reused from the SDK's local cache, as keybroker reuses them;
             the SDK's default algorithm suite (key commitment and an ECDSA P-384 signature
             per message)
  sdk-nosig  the same with the committing suite without signatures
             (AES_256_GCM_HKDF_SHA512_COMMIT_KEY), the closest to keybroker's envelope
  keybroker  the same loop calling a running keybroker's Encrypt through grpcio (stubs
             generated from the repo's proto at startup)

argv: <keybroker address, e.g. 127.0.0.1:50051 or unix:///path> <proto dir> <out dir>
      <records per run> <runs> <threads>

Prints one line per way: "<way> <threads> <median records/s> <runs...>". Every loop is bounded
by the record count; keybroker's ciphertexts are decrypted back once to check they are real.
"""

import os
import statistics
import sys
import threading
import time

target, proto_dir, out_dir, records, runs, threads = (
    sys.argv[1],
    sys.argv[2],
    sys.argv[3],
    int(sys.argv[4]),
    int(sys.argv[5]),
    int(sys.argv[6]),
)

from grpc_tools import protoc  # noqa: E402

if protoc.main(
    ["protoc", f"-I{proto_dir}", f"--python_out={out_dir}", f"--grpc_python_out={out_dir}",
     "keybroker/v1/keybroker.proto"]
) != 0:
    sys.exit("protoc failed")
sys.path.insert(0, out_dir)

import grpc  # noqa: E402
from keybroker.v1 import keybroker_pb2, keybroker_pb2_grpc  # noqa: E402

import aws_encryption_sdk  # noqa: E402
from aws_encryption_sdk import CommitmentPolicy  # noqa: E402
from aws_encryption_sdk.caches.local import LocalCryptoMaterialsCache  # noqa: E402
from aws_encryption_sdk.identifiers import Algorithm, EncryptionKeyType, WrappingAlgorithm  # noqa: E402
from aws_encryption_sdk.internal.crypto.wrapping_keys import WrappingKey  # noqa: E402
from aws_encryption_sdk.key_providers.raw import RawMasterKeyProvider  # noqa: E402
from aws_encryption_sdk.materials_managers.caching import CachingCryptoMaterialsManager  # noqa: E402

RECORD = os.urandom(1024)
WRAPPING = os.urandom(32)


class StaticAesProvider(RawMasterKeyProvider):
    """A raw AES-256-GCM wrapping key held in memory (the SDK's "raw AES" key provider)."""

    provider_id = "bench"

    def _get_raw_key(self, key_id):
        return WrappingKey(
            wrapping_algorithm=WrappingAlgorithm.AES_256_GCM_IV12_TAG16_NO_PADDING,
            wrapping_key=WRAPPING,
            wrapping_key_type=EncryptionKeyType.SYMMETRIC,
        )


def sdk_worker(n, algorithm=None):
    provider = StaticAesProvider()
    provider.add_master_key(b"wrapping-key-1")
    cmm = CachingCryptoMaterialsManager(
        master_key_provider=provider,
        cache=LocalCryptoMaterialsCache(capacity=100),
        max_age=300.0,
        max_messages_encrypted=1_000_000,
    )
    client = aws_encryption_sdk.EncryptionSDKClient(
        commitment_policy=CommitmentPolicy.REQUIRE_ENCRYPT_REQUIRE_DECRYPT
    )
    last = None
    extra = {"algorithm": algorithm} if algorithm else {}
    for _ in range(n):
        last, _ = client.encrypt(source=RECORD, materials_manager=cmm, **extra)
    plain, _ = client.decrypt(source=last, materials_manager=cmm)
    assert plain == RECORD


channel = grpc.insecure_channel(target)
stub = keybroker_pb2_grpc.KeyBrokerStub(channel)


def kb_worker(n):
    last = None
    for _ in range(n):
        last = stub.Encrypt(keybroker_pb2.EncryptRequest(key="default", plaintext=RECORD)).ciphertext
    plain = stub.Decrypt(keybroker_pb2.DecryptRequest(ciphertext=last)).plaintext
    assert plain == RECORD


def run(worker):
    per = records // threads
    ts = [threading.Thread(target=worker, args=(per,)) for _ in range(threads)]
    t0 = time.perf_counter()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return per * threads / (time.perf_counter() - t0)


kb_worker(10)  # warm-up: channel, data key
sdk_worker(10)
def sdk_nosig_worker(n):
    sdk_worker(n, Algorithm.AES_256_GCM_HKDF_SHA512_COMMIT_KEY)


results = {"sdk": [], "sdk-nosig": [], "keybroker": []}
for _ in range(runs):  # alternating, so a noisy neighbour hits all
    results["sdk"].append(run(sdk_worker))
    results["sdk-nosig"].append(run(sdk_nosig_worker))
    results["keybroker"].append(run(kb_worker))
for way, rs in results.items():
    print(way, threads, round(statistics.median(rs)), " ".join(str(round(r)) for r in rs), flush=True)

"""A Kubernetes KMS v2 client in Python grpcio, its stubs generated here from the repo's own
proto/k8s/kms/v2/api.proto by grpcio-tools (so the file we wrote is what another toolchain
reads), driving Status -> Encrypt -> Decrypt the way kube-apiserver does, plus two refusals.

Run by tests/kms_plugin.rs:

  argv: <proto dir> <output dir for generated code> <unix:///path/to/kms.sock>

Prints one line per step ("status v2 ok <key_id>", "encrypt <key_id>", "decrypt ok",
"tampered <code>", "foreign <code> <reason>"); any unexpected answer raises (non-zero exit).
"""

import os
import sys

from grpc_tools import protoc

proto_dir, out_dir, target = sys.argv[1], sys.argv[2], sys.argv[3]
rc = protoc.main(
    [
        "grpc_tools.protoc",
        f"-I{proto_dir}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        os.path.join(proto_dir, "k8s/kms/v2/api.proto"),
    ]
)
if rc != 0:
    raise SystemExit(f"protoc failed: {rc}")
sys.path.insert(0, out_dir)

import grpc  # noqa: E402
from google.rpc import error_details_pb2  # noqa: E402
from grpc_status import rpc_status  # noqa: E402

from k8s.kms.v2 import api_pb2, api_pb2_grpc  # noqa: E402


def reason(err):
    status = rpc_status.from_call(err)
    if status is None:
        return ""
    for d in status.details:
        info = error_details_pb2.ErrorInfo()
        if d.Unpack(info):
            return info.reason
    return ""


channel = grpc.insecure_channel(target)
stub = api_pb2_grpc.KeyManagementServiceStub(channel)

st = stub.Status(api_pb2.StatusRequest(), timeout=3)
print(f"status {st.version} {st.healthz} {st.key_id}")

seed = bytes(range(32))
enc = stub.Encrypt(api_pb2.EncryptRequest(plaintext=seed, uid="py-1"), timeout=3)
assert enc.key_id == st.key_id, (enc.key_id, st.key_id)
assert len(enc.ciphertext) <= 1024
print(f"encrypt {enc.key_id}")

dec = stub.Decrypt(
    api_pb2.DecryptRequest(
        ciphertext=enc.ciphertext,
        uid="py-2",
        key_id=enc.key_id,
        annotations=dict(enc.annotations),
    ),
    timeout=3,
)
assert dec.plaintext == seed
print("decrypt ok")

bad = bytearray(enc.ciphertext)
bad[-1] ^= 1
try:
    stub.Decrypt(
        api_pb2.DecryptRequest(ciphertext=bytes(bad), uid="py-3", key_id=enc.key_id), timeout=3
    )
    raise SystemExit("a tampered ciphertext decrypted")
except grpc.RpcError as e:
    print(f"tampered {e.code().name}")

try:
    stub.Decrypt(
        api_pb2.DecryptRequest(ciphertext=enc.ciphertext, uid="py-4", key_id="someone:else:1"),
        timeout=3,
    )
    raise SystemExit("a foreign key_id was served")
except grpc.RpcError as e:
    print(f"foreign {e.code().name} {reason(e)}")

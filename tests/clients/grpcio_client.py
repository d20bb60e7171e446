"""Python grpcio (gRPC C-core) against a keybroker Unix socket, with default channel options.

Run by tests/interop.rs, which starts the server and passes:

  argv: <unix:///path/to.sock> <keybroker descriptor set file>

C-core sends the percent-encoded socket path as :authority (grpc/grpc issue 38142); without
the server's repair every call here fails with RST_STREAM PROTOCOL_ERROR. The message classes
come from the server's own descriptor set, so no generated code is needed. Each check prints
"ok <name> ..." or "FAIL <name> ..."; the exit status is the number of failures.
"""

import sys

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.rpc import error_details_pb2
from grpc_status import rpc_status

target, descriptors = sys.argv[1], sys.argv[2]

pool = descriptor_pool.DescriptorPool()
with open(descriptors, "rb") as f:
    for file in descriptor_pb2.FileDescriptorSet.FromString(f.read()).file:
        pool.Add(file)


def message(name):
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("keybroker.v1." + name))


EncryptRequest, EncryptResponse = message("EncryptRequest"), message("EncryptResponse")
DecryptRequest, DecryptResponse = message("DecryptRequest"), message("DecryptResponse")

failures = 0


def check(name, ok, detail=""):
    global failures
    print(("ok " if ok else "FAIL ") + name + (" " + detail if detail else ""), flush=True)
    if not ok:
        failures += 1


def reason(err):
    status = rpc_status.from_call(err)
    for d in status.details if status else []:
        info = error_details_pb2.ErrorInfo()
        if d.Unpack(info):
            return info.reason
    return ""


channel = grpc.insecure_channel(target)  # default options: no grpc.default_authority
encrypt = channel.unary_unary(
    "/keybroker.v1.KeyBroker/Encrypt",
    request_serializer=EncryptRequest.SerializeToString,
    response_deserializer=EncryptResponse.FromString,
)
decrypt = channel.unary_unary(
    "/keybroker.v1.KeyBroker/Decrypt",
    request_serializer=DecryptRequest.SerializeToString,
    response_deserializer=DecryptResponse.FromString,
)
raw_encrypt = channel.unary_unary(
    "/keybroker.v1.KeyBroker/Encrypt", request_serializer=None, response_deserializer=None
)

plaintext = bytes(range(256)) * 300
try:
    # Several calls on one channel: later ones reuse HPACK dynamic-table entries.
    for i in range(5):
        enc = encrypt(
            EncryptRequest(key="default", plaintext=plaintext, context={"app": "grpcio", "i": str(i)}),
            timeout=10,
        )
        dec = decrypt(
            DecryptRequest(ciphertext=enc.ciphertext, context={"app": "grpcio", "i": str(i)}),
            timeout=10,
        )
        if dec.plaintext != plaintext:
            raise AssertionError("round trip changed the plaintext")
    check("round-trip", True, f"key={enc.key} version={enc.key_version}")
except grpc.RpcError as e:
    check("round-trip", False, f"{e.code()} {e.details()}")

try:
    decrypt(DecryptRequest(ciphertext=enc.ciphertext, context={"app": "other"}), timeout=10)
    check("wrong-context", False, "decrypted under the wrong context")
except grpc.RpcError as e:
    check(
        "wrong-context",
        e.code() == grpc.StatusCode.INVALID_ARGUMENT and reason(e) == "DECRYPTION_FAILED",
        f"{e.code()} {reason(e)}",
    )
except NameError:
    check("wrong-context", False, "no ciphertext")

try:
    raw_encrypt(b"\xff\xff\xff\xff", timeout=10)
    check("malformed", False, "accepted")
except grpc.RpcError as e:
    check(
        "malformed",
        e.code() == grpc.StatusCode.INVALID_ARGUMENT and reason(e) == "MALFORMED_REQUEST",
        f"{e.code()} {reason(e)} {e.details()}",
    )

channel.close()
sys.exit(failures)

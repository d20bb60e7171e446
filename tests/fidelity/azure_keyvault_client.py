"""Fidelity check of the Key Vault fake (tests/support/azure_fake.rs) with Microsoft's official
Python client, azure-keyvault-keys. Run by tests/azure.rs, which starts the fake and passes:

  argv: <ca.pem> <token> <rsa kid> <disabled rsa kid> <oct-HSM kid> <rsa kid without get>

The rotation-policy checks use KeyClient on the vault of <rsa kid> and <disabled rsa kid> (the
latter never gets a policy, so it shows the default one).

Each check prints one line "ok <name> ..." or "FAIL <name> ..."; the exit status is the number
of failures. The client gets a token the fake minted through a minimal credential, and (because
the fake listens on 127.0.0.1) skips the challenge-resource check, as the fake's docs say.
"""

import hashlib
import os
import sys
import time

from azure.core.credentials import AccessToken
from azure.core.exceptions import HttpResponseError
from azure.keyvault.keys import (
    KeyClient,
    KeyRotationLifetimeAction,
    KeyRotationPolicy,
    KeyRotationPolicyAction,
)
from azure.keyvault.keys.crypto import CryptographyClient, KeyWrapAlgorithm, SignatureAlgorithm


class StaticCredential:
    """A TokenCredential handing out one token; records the scopes it was asked for."""

    def __init__(self, token):
        self.token = token
        self.scopes = []

    def get_token(self, *scopes, **kwargs):
        self.scopes.extend(scopes)
        return AccessToken(self.token, int(time.time()) + 3600)


def client(kid, cred, ca):
    return CryptographyClient(kid, cred, verify_challenge_resource=False, connection_verify=ca)


def main():
    ca, token, rsa_kid, disabled_kid, oct_kid, noget_kid = sys.argv[1:7]
    cred = StaticCredential(token)
    failures = 0

    def check(name, cond, detail=""):
        nonlocal failures
        print(("ok " if cond else "FAIL ") + name + (" " + detail if detail else ""), flush=True)
        if not cond:
            failures += 1

    # RSA-OAEP-256: the client fetches the public JWK (GET key) and may wrap locally with it; the
    # unwrap always goes to the fake, so this also checks the fake's JWK n/e encoding.
    data_key = os.urandom(32)
    rsa = client(rsa_kid, cred, ca)
    wrapped = rsa.wrap_key(KeyWrapAlgorithm.rsa_oaep_256, data_key)
    check("rsa-wrap", len(wrapped.encrypted_key) == 256, f"kid={wrapped.key_id}")
    unwrapped = rsa.unwrap_key(KeyWrapAlgorithm.rsa_oaep_256, wrapped.encrypted_key)
    check("rsa-unwrap", unwrapped.key == data_key, f"kid={unwrapped.key_id}")
    check("rsa-kid", unwrapped.key_id == rsa_kid, f"{unwrapped.key_id} vs {rsa_kid}")

    # A flipped byte: Key Vault answers 400 with an error body.
    bad = bytearray(wrapped.encrypted_key)
    bad[100] ^= 1
    try:
        rsa.unwrap_key(KeyWrapAlgorithm.rsa_oaep_256, bytes(bad))
        check("bad-ciphertext", False, "unwrapped a tampered key")
    except HttpResponseError as e:
        code = e.error.code if e.error else None
        check("bad-ciphertext", e.status_code == 400 and code == "BadParameter",
              f"status={e.status_code} code={code}")

    # A disabled key refuses unwrapKey with 403 Forbidden (inner code KeyDisabled).
    off = client(disabled_kid, cred, ca)
    try:
        off.unwrap_key(KeyWrapAlgorithm.rsa_oaep_256, wrapped.encrypted_key)
        check("disabled", False, "a disabled key unwrapped")
    except HttpResponseError as e:
        code = e.error.code if e.error else None
        inner = e.error.innererror.get("code") if e.error and e.error.innererror else None
        check("disabled", e.status_code == 403 and code == "Forbidden" and inner == "KeyDisabled",
              f"status={e.status_code} code={code} inner={inner} message={e.error.message if e.error else ''}")

    # oct-HSM (Managed HSM): the fake refuses GET of this key (403), so the client does wrap and
    # unwrap remotely; given the JWK (which has no "k") it would wrap with a random local key.
    hsm = client(oct_kid, cred, ca)
    wrapped = hsm.wrap_key(KeyWrapAlgorithm.aes_256, data_key)
    check("oct-wrap", len(wrapped.encrypted_key) == 40, f"kid={wrapped.key_id}")
    unwrapped = hsm.unwrap_key(KeyWrapAlgorithm.aes_256, wrapped.encrypted_key)
    check("oct-unwrap", unwrapped.key == data_key)

    # sign (what keybroker asks for every RSA wrap): Key Vault signs the caller's digest. The
    # client signs remotely (it holds only the public key) and verifies locally with the JWK's
    # n/e through the `cryptography` package, so this checks the fake's signatures are genuine
    # PSS/PKCS#1 v1.5 signatures under the key it publishes.
    digest = hashlib.sha256(b"keybroker fidelity").digest()
    for alg, name in ((SignatureAlgorithm.ps256, "ps256"), (SignatureAlgorithm.rs256, "rs256")):
        signed = rsa.sign(alg, digest)
        check(f"{name}-sign", len(signed.signature) == 256, f"kid={signed.key_id}")
        check(f"{name}-verify-local", rsa.verify(alg, digest, signed.signature).is_valid)
        bad = bytearray(signed.signature)
        bad[0] ^= 1
        check(f"{name}-verify-bad", not rsa.verify(alg, digest, bytes(bad)).is_valid)
    first = rsa.sign(SignatureAlgorithm.rs256, digest).signature
    check("rs256-deterministic", first == rsa.sign(SignatureAlgorithm.rs256, digest).signature)
    # Without keys/get the client cannot verify locally: verify goes to the fake as well.
    remote = client(noget_kid, cred, ca)
    signed = remote.sign(SignatureAlgorithm.ps256, digest)
    check("verify-remote", remote.verify(SignatureAlgorithm.ps256, digest, signed.signature).is_valid)
    check("verify-remote-bad", not remote.verify(SignatureAlgorithm.ps256, hashlib.sha256(b"x").digest(), signed.signature).is_valid)
    # A digest of the wrong length for the algorithm is a 400, as in Key Vault.
    try:
        rsa.sign(SignatureAlgorithm.ps256, digest[:20])
        check("sign-bad-digest", False, "signed a 20-byte digest with PS256")
    except HttpResponseError as e:
        check("sign-bad-digest", e.status_code == 400, f"status={e.status_code}")

    # Rotation policy (GET/PUT keys/{name}/rotationpolicy), what keybroker reads for
    # `rotation_state = true`: the official client's request and its parse of the answer.
    vault_url, _, rest = rsa_kid.partition("/keys/")
    rsa_name = rest.split("/")[0]
    off_name = disabled_kid.partition("/keys/")[2].split("/")[0]
    keys = KeyClient(vault_url, cred, verify_challenge_resource=False, connection_verify=ca)
    default = keys.get_key_rotation_policy(off_name)
    acts = [(a.action, a.time_after_create, a.time_before_expiry) for a in default.lifetime_actions]
    check("policy-default", len(acts) == 1 and acts[0][0] == KeyRotationPolicyAction.notify
          and acts[0][1:] == (None, "P30D") and default.id is None and default.created_on is None, f"{acts} id={default.id}")
    put = keys.update_key_rotation_policy(
        rsa_name,
        KeyRotationPolicy(),
        lifetime_actions=[
            KeyRotationLifetimeAction(KeyRotationPolicyAction.rotate, time_after_create="P90D"),
            KeyRotationLifetimeAction(KeyRotationPolicyAction.notify, time_before_expiry="P30D"),
        ],
        expires_in="P2Y",
    )
    check("policy-put", put.id == f"{vault_url}/keys/{rsa_name}/rotationpolicy", f"id={put.id}")
    got = keys.get_key_rotation_policy(rsa_name)
    rotate = [a for a in got.lifetime_actions if a.action == KeyRotationPolicyAction.rotate]
    check("policy-get", len(rotate) == 1 and rotate[0].time_after_create == "P90D"
          and rotate[0].time_before_expiry is None and got.expires_in == "P2Y"
          and got.created_on is not None and got.updated_on is not None,
          f"{[(a.action, a.time_after_create, a.time_before_expiry) for a in got.lifetime_actions]} "
          f"expires_in={got.expires_in} created_on={got.created_on}")
    try:
        keys.update_key_rotation_policy(rsa_name, KeyRotationPolicy(), expires_in="P7D")
        check("policy-short-expiry", False, "accepted expiryTime P7D")
    except HttpResponseError as e:
        check("policy-short-expiry", e.status_code == 400, f"status={e.status_code}")
    key = keys.get_key(rsa_name)
    age = time.time() - key.properties.created_on.timestamp()
    check("key-created", 0 <= age < 3600 and key.id == rsa_kid, f"created_on={key.properties.created_on}")

    check("scopes", set(cred.scopes) == {"https://vault.azure.net/.default"}, str(cred.scopes))
    return failures


if __name__ == "__main__":
    sys.exit(main())

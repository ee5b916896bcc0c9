"""Release signatures: OpenSSF model signing (the `model-signing` package) over a release's manifest.

The manifest holds the sha256 and size of every file of a release, so one signature over its exact
bytes covers the whole release: `verify` checks the signature against the publisher's public key, then
every file against the manifest. The signature is a Sigstore bundle (DSSE envelope over an in-toto
statement naming `manifest.json` and its digest) signed with an elliptic-curve key; the standard tool
verifies it too:

    model_signing verify key --signature manifest.sig --public_key release.pub manifest.json

The private key comes from `publish.signing` (a path, or an environment variable holding a path or the
PEM itself, for CI secrets); neither the key nor the variable's value is ever logged.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from vlm_factory.errors import UserError, first_line

log = logging.getLogger(__name__)

SIGNATURE = "manifest.sig"
SIGNED_NAME = "manifest.json"  # the name the signature's statement gives the signed bytes
METHOD = "OpenSSF model signing, elliptic-curve key, Sigstore bundle over manifest.json"


@dataclass(frozen=True)
class SigningKey:
    """A private key ready to sign: its PEM bytes and password (from a file or an environment variable)."""
    pem: bytes
    password: str | None
    origin: str  # for messages: the file, or "$VARIABLE"; never the key itself

    def public_pem(self) -> bytes:
        return _private_key(self).public_key().public_bytes(serialization.Encoding.PEM,
                                                            serialization.PublicFormat.SubjectPublicKeyInfo)


def public_key_sha256(public_pem: bytes) -> str:
    """The key's fingerprint the manifest records: sha256 of its DER SubjectPublicKeyInfo."""
    key = serialization.load_pem_public_key(public_pem)
    return hashlib.sha256(key.public_bytes(serialization.Encoding.DER,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)).hexdigest()


def generate_key(path: Path) -> None:
    """A new P-256 private key at `path` (mode 0600) and its public key at `<path>.pub`."""
    key = ec.generate_private_key(ec.SECP256R1())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()))
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    Path(f"{path}.pub.tmp").write_bytes(public)
    os.replace(f"{path}.pub.tmp", f"{path}.pub")
    os.replace(tmp, path)


def resolve_key(*, key: str | None, key_env: str | None, password_env: str | None, generate: bool,
                required: bool) -> SigningKey | None:
    """The key `publish.signing` names: `key_env`'s variable when set (a path or the PEM), else the file `key`
    (created when `generate` and missing); None (publish unsigned) only when none is configured and not `required`."""
    password = os.environ.get(password_env) if password_env else None
    value = os.environ.get(key_env) if key_env else None
    if value:
        if value.lstrip().startswith("-----BEGIN"):
            return _checked(SigningKey(value.encode(), password, f"${key_env}"))
        if not Path(value).is_file():
            raise UserError(f"${key_env}: names no file; set it to the path of a PEM private key or to the PEM itself")
        return _checked(SigningKey(Path(value).read_bytes(), password, f"${key_env} ({value})"))
    if key:
        path = Path(key)
        if not path.is_file():
            if not generate:
                raise UserError(f"publish.signing.key: {path} does not exist; create a key (e.g. openssl ecparam "
                                f"-genkey -name prime256v1 | openssl pkcs8 -topk8 -nocrypt -out {path}) or set "
                                f"${key_env or 'VLM_FACTORY_SIGNING_KEY'}")
            generate_key(path)
            log.warning("generated a local signing key %s (public key %s.pub): releases signed with it verify only "
                        "against that file; configure publish.signing for a team key", path, path)
        return _checked(SigningKey(path.read_bytes(), password, str(path)))
    if required:
        raise UserError(f"publish.signing: no key (set ${key_env or 'VLM_FACTORY_SIGNING_KEY'} or publish.signing.key),"
                        " and publish.signing.required is true")
    log.warning("publish.signing: no key configured; releases are published unsigned")
    return None


def _private_key(key: SigningKey) -> ec.EllipticCurvePrivateKey:
    try:
        private = serialization.load_pem_private_key(key.pem, key.password.encode() if key.password else None)
    except (ValueError, TypeError) as error:  # cryptography's messages name no key material
        raise UserError(f"{key.origin}: not a usable PEM private key ({first_line(error, 120)})") from None
    if not isinstance(private, ec.EllipticCurvePrivateKey):
        raise UserError(f"{key.origin}: an elliptic-curve key (P-256, P-384 or P-521) is needed to sign releases")
    return private


def _checked(key: SigningKey) -> SigningKey:
    _private_key(key)
    return key


def _key_signing_config(private_key_path: Path, password: str | None):
    from model_signing import hashing, signing

    # model-signing 1.0's signing.Config() first builds a Sigstore signer, which fetches Sigstore's trust
    # root over the network, only for use_elliptic_key_signer to replace it; skip that default so signing
    # with a key works offline (1.1 fixed it, but needs a typing_extensions our pins cannot take).
    config = signing.Config.__new__(signing.Config)
    return config.set_hashing_config(hashing.Config()).use_elliptic_key_signer(private_key=private_key_path,
                                                                               password=password)


def sign_manifest(manifest: bytes, key: SigningKey) -> bytes:
    """The signature (Sigstore bundle JSON) of these exact manifest bytes."""
    with tempfile.TemporaryDirectory(prefix="vlm-factory-sign-") as tmp:
        tmp = Path(tmp)
        key_path = tmp / "key.pem"
        key_path.touch(mode=0o600)
        key_path.write_bytes(key.pem)
        (tmp / SIGNED_NAME).write_bytes(manifest)
        _key_signing_config(key_path, key.password).sign(tmp / SIGNED_NAME, tmp / SIGNATURE)
        return (tmp / SIGNATURE).read_bytes()


def signature_problem(manifest: bytes, signature: bytes | None, public_pem: bytes) -> str | None:
    """Why `signature` does not prove `manifest` was signed by the holder of `public_pem`; None when it does."""
    if signature is None:
        return f"{SIGNATURE}: missing (the release is not signed)"
    from model_signing import verifying

    with tempfile.TemporaryDirectory(prefix="vlm-factory-verify-") as tmp:
        tmp = Path(tmp)
        (tmp / SIGNED_NAME).write_bytes(manifest)
        (tmp / SIGNATURE).write_bytes(signature)
        (tmp / "key.pub").write_bytes(public_pem)
        try:
            verifying.Config().use_elliptic_key_verifier(public_key=tmp / "key.pub").verify(tmp / SIGNED_NAME,
                                                                                            tmp / SIGNATURE)
        except Exception as error:  # noqa: BLE001 - the library raises ValueError, JSON and protobuf errors alike
            return f"{SIGNATURE}: does not verify {SIGNED_NAME} with this public key ({first_line(error, 160)})"
    return None


def read_public_key(path: Path) -> bytes:
    """A public key file's PEM, checked; UserError naming the file if it is not one."""
    if not path.is_file():
        raise UserError(f"{path}: no such public key file")
    pem = path.read_bytes()
    try:
        key = serialization.load_pem_public_key(pem)
    except ValueError:
        raise UserError(f"{path}: not a PEM public key (the .pub written next to the signing key)") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise UserError(f"{path}: not an elliptic-curve public key")
    return pem

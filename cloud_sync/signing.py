"""Node keys and signed upload bodies: Ed25519 over the exact bytes of a serialized Batch.

A node holds its private key in a file of its data folder (PKCS#8 PEM, mode 0600); the hub
holds only public keys, written ``ed25519:`` and 43 characters of unpadded URL-safe base64
(the raw 32 bytes), which is what ``gridlet keygen`` prints and ``gridlet hub add-node``
takes. (The prefix also keeps a key that starts with ``-`` from reading as an option.)
"""

from __future__ import annotations

import base64
import binascii
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from google.protobuf.message import DecodeError

from proto import telemetry_pb2 as pb

__all__ = (
    "KeyFileError",
    "NodeKey",
    "SignatureError",
    "load_public_key",
    "open_signed",
    "public_key_text",
    "sign",
    "verify",
)


class KeyFileError(ValueError):
    """A key file or public key text that cannot be used."""


class SignatureError(ValueError):
    """A signed body that is malformed or whose signature does not verify."""


class NodeKey:
    """A node's private signing key."""

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key

    @classmethod
    def generate(cls) -> NodeKey:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load(cls, path: str | Path) -> NodeKey:
        p = Path(path)
        try:
            data = p.read_bytes()
        except OSError as exc:
            raise KeyFileError(f"{p}: cannot read the node key: {exc.strerror or exc}") from exc
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            raise KeyFileError(f"{p}: not a PEM private key: {exc}") from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise KeyFileError(f"{p}: not an Ed25519 key")
        return cls(key)

    def save(self, path: str | Path, *, overwrite: bool = False) -> None:
        """Write the key (mode 0600 from the start, never world-readable for an instant)."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        pem = self._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
        try:
            fd = os.open(p, flags, 0o600)
        except FileExistsError as exc:
            raise KeyFileError(f"{p} exists already; refusing to overwrite a node key") from exc
        with os.fdopen(fd, "wb") as out:
            out.write(pem)
        os.chmod(p, 0o600)

    @property
    def public_bytes(self) -> bytes:
        return self._key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    @property
    def public_text(self) -> str:
        return public_key_text(self.public_bytes)

    def sign(self, data: bytes) -> bytes:
        return self._key.sign(data)


_PREFIX = "ed25519:"


def public_key_text(raw: bytes) -> str:
    return _PREFIX + base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def load_public_key(text: str) -> bytes:
    """The raw 32 bytes of a public key given as ``gridlet keygen`` prints it."""
    s = text.strip().removeprefix(_PREFIX)
    try:
        raw = base64.b64decode(s + "=" * (-len(s) % 4), altchars=b"-_", validate=True)
    except (binascii.Error, ValueError) as exc:
        raise KeyFileError(f"public key {text!r} is not base64") from exc
    if len(raw) != 32:
        raise KeyFileError(f"public key {text!r} is {len(raw)} bytes, an Ed25519 key is 32")
    return raw


def sign(key: NodeKey, node_id: str, batch: bytes) -> bytes:
    """The SignedBatch body that carries ``batch`` (a serialized Batch) from ``node_id``."""
    out: bytes = pb.SignedBatch(
        node_id=node_id, batch=batch, signature=key.sign(batch)
    ).SerializeToString()
    return out


def open_signed(body: bytes) -> tuple[str, bytes, bytes]:
    """(node id, batch bytes, signature) of a SignedBatch; SignatureError when malformed."""
    msg = pb.SignedBatch()
    try:
        msg.ParseFromString(body)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise SignatureError(f"not a protobuf SignedBatch: {exc}") from exc
    if not msg.node_id or len(msg.node_id) > 128 or not msg.node_id.isprintable():
        raise SignatureError("the signed body names no node, or one that is not printable")
    if len(msg.signature) != 64:
        raise SignatureError(f"a signature of {len(msg.signature)} bytes (Ed25519 has 64)")
    return msg.node_id, msg.batch, msg.signature


def verify(public_key: bytes, batch: bytes, signature: bytes) -> None:
    """Raise SignatureError unless ``signature`` is the key's signature of ``batch``."""
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, batch)
    except (InvalidSignature, ValueError) as exc:
        raise SignatureError("the signature does not verify with the node's public key") from exc

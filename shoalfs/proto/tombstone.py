"""Volume tombstones: the only proof of a deletion (DESIGN.md §3).

A tombstone is {vol_id, name, deleted_at, epoch} signed by the master's
Ed25519 key over its canonical JSON form. Clients verify it against the
public key they learned at mount and against the vol_id they mounted.
"""

from __future__ import annotations

import json
import os
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from shoalfs.common.files import atomic_write

FIELDS = ("vol_id", "name", "deleted_at", "epoch")


def canonical(tomb: dict[str, Any]) -> bytes:
    return json.dumps({k: tomb[k] for k in FIELDS}, sort_keys=True, separators=(",", ":")).encode()


def load_or_create_key(path: str) -> Ed25519PrivateKey:
    """The master's signing key, generated once and kept in a 0600 file."""
    if not os.path.exists(path):
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        atomic_write(path, pem, mode=0o600)
    os.chmod(path, 0o600)
    with open(path, "rb") as f:
        loaded = serialization.load_pem_private_key(f.read(), password=None)
    if not isinstance(loaded, Ed25519PrivateKey):
        raise ValueError(f"{path} does not hold an Ed25519 key")
    return loaded


def public_hex(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    """The master's public key as clients and nodes learn it."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


def sign(key: Ed25519PrivateKey, tomb: dict[str, Any]) -> dict[str, Any]:
    out = {k: tomb[k] for k in FIELDS}
    out["sig"] = key.sign(canonical(out)).hex()
    return out


def verify(public_key_hex: str, tomb: Any, vol_id: str) -> str | None:
    """None if `tomb` proves the deletion of `vol_id`, else why it does not."""
    if not isinstance(tomb, dict):
        return "no tombstone"
    if any(k not in tomb for k in FIELDS) or not isinstance(tomb.get("sig"), str):
        return "malformed tombstone"
    if tomb["vol_id"] != vol_id:
        return f"tombstone names another volume ({tomb['vol_id']})"
    try:
        Ed25519PublicKey.from_public_bytes(bytes.fromhex(public_key_hex)).verify(
            bytes.fromhex(tomb["sig"]), canonical(tomb))
    except (InvalidSignature, ValueError):
        return "signature does not verify against the master's key"
    return None

"""The secrets every master shares, kept in etcd (DESIGN.md §6, §7).

The Ed25519 signing key (tombstones and capabilities), the admin token and
the node token are created once, by whichever master starts first, and read
by every other: a tombstone or capability from any master verifies with the
key a client or node learned from any other. A secret already in a local file
(a master from before etcd, or an operator's chosen token) is what gets
stored first. Each master writes the tokens to its own 0600 files so the
operator's CLI on that machine finds them; the private key never leaves etcd
and the masters' memory (clients and nodes never talk to etcd).
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from shoalfs.common.files import atomic_write
from shoalfs.master.store import SECRET, EtcdStore


@dataclass(frozen=True)
class ClusterSecrets:
    signing_key: Ed25519PrivateKey
    admin_token: str
    node_token: str


def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


def _pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _token_file(path: str, token: str) -> None:
    """The token in a 0600 file, rewritten only if it differs."""
    current = _read(path)
    if current is None or current.decode(errors="replace").strip() != token:
        os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
        atomic_write(path, (token + "\n").encode(), mode=0o600)
    os.chmod(path, 0o600)


async def _shared_token(store: EtcdStore, name: str, local_file: str) -> str:
    local = (_read(local_file) or b"").decode(errors="replace").strip()
    stored = await store.create_if_absent(SECRET + name, (local or secrets.token_hex(32)).encode())
    token = stored.decode().strip()
    _token_file(local_file, token)
    return token


async def cluster_secrets(store: EtcdStore, key_file: str, admin_token_file: str,
                          node_token_file: str) -> ClusterSecrets:
    """The cluster's secrets from etcd, created there on first use."""
    local_key = _read(key_file)
    stored = await store.create_if_absent(SECRET + "signing_key",
                                          local_key or _pem(Ed25519PrivateKey.generate()))
    key = serialization.load_pem_private_key(stored, password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError("the signing key in etcd is not an Ed25519 key")
    admin = await _shared_token(store, "admin_token", admin_token_file)
    node = await _shared_token(store, "node_token", node_token_file)
    if admin == node:
        raise ValueError("the node token must not be the admin token")
    return ClusterSecrets(key, admin, node)

"""Access keys (DESIGN.md §7): the secrets a mount or SDK trades for a capability.

A key reads `shoal1-<key_id>-<secret>`. The master keeps only a hash of the
secret, in the volume's record: {key_id: {name, rights, created_at, hash}}.
A revoked key id is kept for one capability lifetime and sent to every node
with each heartbeat, so the capabilities still out there stop working within
a second, not when they expire.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from typing import Any

from shoalfs.master.state import NAME_CHARS, MasterState
from shoalfs.proto.capability import READ_ONLY, READ_WRITE
from shoalfs.proto.errors import Code, ShoalError

KEY_PATTERN = re.compile(r"shoal1-([0-9a-f]{16})-([0-9a-f]{64})")
OWNER = "owner"
ADMIN_KEY_ID = "admin"  # capabilities the admin token obtains: not a key, never revoked
MAX_KEYS_PER_VOLUME = 1000  # keys live in the volume's etcd record (about 150 bytes each)


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def check_key_name(name: Any) -> str:
    if not isinstance(name, str) or not 1 <= len(name) <= 64 or not set(name) <= NAME_CHARS:
        raise ShoalError(Code.BAD_REQUEST, "a key name is 1-64 letters, digits, '-', '_' or '.'")
    return name


class KeyRing:
    def __init__(self, state: MasterState, capability_ttl: float) -> None:
        self.state = state
        self.capability_ttl = capability_ttl

    @staticmethod
    def keys(vol: dict[str, Any]) -> dict[str, dict[str, Any]]:
        return vol.setdefault("keys", {})  # type: ignore[no-any-return]

    def create(self, vol: dict[str, Any], name: str | None, read_only: bool) -> tuple[str, str]:
        """A new key of the volume (the caller saves the state): its id, and the
        key itself (the secret is returned once and never stored)."""
        keys = self.keys(vol)
        if len(keys) >= MAX_KEYS_PER_VOLUME:
            raise ShoalError(Code.INVALID, f"volume {vol['name']} has {MAX_KEYS_PER_VOLUME} keys: revoke some first")
        taken = {k["name"] for k in keys.values()}
        if name is None:
            name = next(f"key{i}" for i in range(1, len(keys) + 2) if f"key{i}" not in taken)
        check_key_name(name)
        if name in taken:
            raise ShoalError(Code.EXISTS, f"volume {vol['name']} already has a key named {name!r}")
        key_id, secret = secrets.token_hex(8), secrets.token_hex(32)
        keys[key_id] = {"name": name, "rights": READ_ONLY if read_only else READ_WRITE,
                        "created_at": time.time(), "hash": _digest(secret)}
        return key_id, f"shoal1-{key_id}-{secret}"

    def reissue(self, vol: dict[str, Any], name: str) -> tuple[str, str]:
        """A new secret for the key of that name (its old one is refused from now
        on): a create retried after a failover gets an owner key it can use."""
        old = next((i for i, k in self.keys(vol).items() if k["name"] == name), None)
        rights = self.keys(vol)[old]["rights"] if old else READ_WRITE
        if old is not None:
            del self.keys(vol)[old]
            self.revoked[old] = time.time() + self.capability_ttl
        return self.create(vol, name, read_only=rights == READ_ONLY)

    def describe(self, vol: dict[str, Any], key_id: str) -> dict[str, Any]:
        """A key as listings show it: never its secret or hash."""
        k = self.keys(vol)[key_id]
        return {"name": k["name"], "key_id": key_id, "rights": k["rights"], "created_at": k["created_at"]}

    def listing(self, vol: dict[str, Any]) -> list[dict[str, Any]]:
        return sorted((self.describe(vol, key_id) for key_id in self.keys(vol)), key=lambda k: k["created_at"])

    def revoke(self, vol: dict[str, Any], name: Any) -> str:
        """Forget the key and refuse its capabilities (the caller saves the state)."""
        keys = self.keys(vol)
        key_id = next((i for i, k in keys.items() if k["name"] == name), None)
        if key_id is None:
            raise ShoalError(Code.NOT_FOUND, f"volume {vol['name']} has no key named {name!r}")
        del keys[key_id]
        self.revoked[key_id] = time.time() + self.capability_ttl
        return key_id

    def check(self, vol: dict[str, Any], key: Any) -> tuple[str, str]:
        """(key_id, rights) of a key of this volume; UNAUTHORIZED for anything else."""
        match = KEY_PATTERN.fullmatch(key) if isinstance(key, str) else None
        entry = self.keys(vol).get(match.group(1)) if match else None
        if match is None or entry is None or not hmac.compare_digest(entry["hash"], _digest(match.group(2))):
            raise ShoalError(Code.UNAUTHORIZED, f"access denied to volume {vol['name']}")
        return match.group(1), str(entry["rights"])

    def valid(self, vol: dict[str, Any], key_id: str) -> bool:
        """Whether capabilities of this key may be renewed."""
        return key_id == ADMIN_KEY_ID or key_id in self.keys(vol)

    def name_of(self, vol: dict[str, Any], key_id: str) -> str:
        return ADMIN_KEY_ID if key_id == ADMIN_KEY_ID else str(self.keys(vol).get(key_id, {}).get("name", "?"))

    @property
    def revoked(self) -> dict[str, float]:
        """key_id -> until when nodes must refuse its capabilities."""
        return self.state.doc.setdefault("revoked", {})  # type: ignore[no-any-return]

    def revoked_ids(self) -> list[str]:
        now = time.time()
        for key_id in [k for k, until in self.revoked.items() if until < now]:
            del self.revoked[key_id]  # saved with the next change; harmless if not
        return sorted(self.revoked)

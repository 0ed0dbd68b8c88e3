"""Capabilities (DESIGN.md §7): what the master grants, signed, checked by every node.

A capability is one opaque string, `<body>.<signature>` (both base64url):
the body is msgpack of [version, vol_id, rights, session, key_id, expires];
the signature is the master's Ed25519 signature over a domain prefix and the
body, so nothing signed for another purpose (a tombstone) can pass for one.

Rights: "ro" and "rw" on one volume (a client session), "node" (what a
metanode may ask of another node) and "master" (placement commands). A node
checks a capability once per connection (Op.AUTH) and its expiry, key and
volume on every request (`Access`).
"""

from __future__ import annotations

import base64
import binascii
import enum
import time
from dataclasses import dataclass
from typing import Any

import msgpack
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from shoalfs.proto.errors import Code, ShoalError

VERSION = 1
DOMAIN = b"shoalfs capability v1\0"
READ_ONLY, READ_WRITE, NODE, MASTER = "ro", "rw", "node", "master"
RIGHTS = (READ_ONLY, READ_WRITE, NODE, MASTER)
MAX_TOKEN = 512  # a capability is about 200 characters; anything longer is not one


class Access(enum.Enum):
    """What a request needs of its connection's capability."""

    OPEN = "open"      # anyone (ping, the authentication itself)
    READ = "read"      # ro or rw on the partition's volume
    WRITE = "write"    # rw on the partition's volume
    RECLAIM = "reclaim"  # rw on the partition's volume, or a node (its reaper frees unlinked files' data)
    INSPECT = "inspect"  # ro or rw on the partition's volume, or a node (its orphan sweeper scans)
    PEER = "peer"      # a node or the master
    MASTER = "master"  # the master only


@dataclass(frozen=True)
class Capability:
    vol_id: str  # "" for node and master capabilities
    rights: str
    session: str
    key_id: str
    expires: float  # time.time() after which nodes refuse it

    @property
    def on_volume(self) -> bool:
        return self.rights in (READ_ONLY, READ_WRITE)


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def issue(key: Ed25519PrivateKey, cap: Capability) -> str:
    if cap.rights not in RIGHTS:
        raise ValueError(f"unknown rights {cap.rights!r}")
    body = msgpack.packb([VERSION, cap.vol_id, cap.rights, cap.session, cap.key_id, float(cap.expires)])
    return f"{_b64(body)}.{_b64(key.sign(DOMAIN + body))}"


def load_public(public_hex: str) -> Ed25519PublicKey:
    return Ed25519PublicKey.from_public_bytes(bytes.fromhex(public_hex))



def verify(public_key: Ed25519PublicKey, token: Any, now: float | None = None,
           allow_expired: bool = False) -> Capability:
    """The capability a token grants; UNAUTHORIZED if it is not one the
    master signed, EXPIRED (transient: renew and retry) if it is past its
    time, unless `allow_expired` (the caller checks expiry itself: an
    expired capability may still learn that its volume was deleted)."""
    if not isinstance(token, str) or not token or len(token) > MAX_TOKEN or token.count(".") != 1:
        raise ShoalError(Code.UNAUTHORIZED, "no valid capability")
    body_text, sig_text = token.split(".")
    try:
        body, sig = _unb64(body_text), _unb64(sig_text)
        public_key.verify(sig, DOMAIN + body)
        fields = msgpack.unpackb(body, raw=False)
    except (ValueError, binascii.Error, InvalidSignature, msgpack.ExtraData, msgpack.FormatError,
            msgpack.StackError):
        raise ShoalError(Code.UNAUTHORIZED, "capability not signed by this cluster's master") from None
    if (not isinstance(fields, list) or len(fields) != 6 or fields[0] != VERSION
            or not all(isinstance(f, str) for f in fields[1:5]) or fields[2] not in RIGHTS
            or not isinstance(fields[5], float)):
        raise ShoalError(Code.UNAUTHORIZED, "malformed capability")
    cap = Capability(*fields[1:])
    if not allow_expired:
        check_expiry(cap, now)
    return cap


def check_expiry(cap: Capability, now: float | None = None) -> None:
    if cap.expires < (time.time() if now is None else now):
        raise ShoalError(Code.EXPIRED, "capability expired: renew it")

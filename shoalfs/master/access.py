"""Who is calling the master, and what the master grants (DESIGN.md §7).

Three kinds of caller: the operator (the admin token, never sent to nodes),
a node (the node token, which only registers a node) and a client session
(a capability the master signed). The master signs capabilities with the
same Ed25519 key as tombstones; a domain prefix keeps the two apart.
"""

from __future__ import annotations

import enum
import hmac
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from shoalfs.common.limits import config_seconds
from shoalfs.master.cluster_secrets import ClusterSecrets
from shoalfs.proto import capability
from shoalfs.proto.capability import Capability
from shoalfs.proto.errors import Code, ShoalError

NODE_CAPABILITY_TTL = 600.0  # renewed with every heartbeat, so it only matters while the master is away
MASTER_CAPABILITY_TTL = 600.0


class Auth(enum.Enum):
    """What an endpoint needs."""

    OPEN = "open"
    ADMIN = "admin"      # the admin token
    NODE = "node"        # the node token
    VOLUME = "volume"    # the admin token, or a capability (the handler checks its volume)
    SESSION = "session"  # a capability: a client session speaking for itself


@dataclass(frozen=True)
class Caller:
    admin: bool = False
    cap: Capability | None = None

    def check_volume(self, vol_id: str) -> None:
        """Raise unless this caller may see volume `vol_id`."""
        if not self.admin and (self.cap is None or self.cap.vol_id != vol_id):
            raise ShoalError(Code.FORBIDDEN, "this capability is for another volume")


class Authority:
    def __init__(self, cfg: Mapping[str, Any], shared: ClusterSecrets) -> None:
        self.admin_token = shared.admin_token
        self.node_token = shared.node_token
        self.key = shared.signing_key
        self.public = self.key.public_key()
        self.capability_ttl = config_seconds(cfg, "capability_ttl", 60.0)
        self.revoked: Callable[[str], bool] = lambda key_id: False  # the master's key ring says
        self._node_caps: dict[str, Reissued] = {}

    # ----- checking callers ---------------------------------------------------
    def caller(self, request: web.Request, auth: Auth) -> Caller:
        if auth is Auth.OPEN:
            return Caller()
        scheme, _, credential = request.headers.get("Authorization", "").strip().partition(" ")
        credential = credential.strip()
        if scheme == "Bearer" and credential:
            if auth in (Auth.ADMIN, Auth.VOLUME) and hmac.compare_digest(credential.encode(),
                                                                         self.admin_token.encode()):
                return Caller(admin=True)
            if auth is Auth.NODE and hmac.compare_digest(credential.encode(), self.node_token.encode()):
                return Caller()
        elif scheme == "Capability" and auth in (Auth.VOLUME, Auth.SESSION):
            # a session's own calls check expiry after deletion: an expired
            # capability still learns (with the tombstone) that its volume is gone
            cap = capability.verify(self.public, credential, allow_expired=auth is Auth.SESSION)
            if self.revoked(cap.key_id):
                raise ShoalError(Code.UNAUTHORIZED, "the key of this capability was revoked")
            if cap.on_volume:
                return Caller(cap=cap)
        needs = {Auth.ADMIN: "the admin token", Auth.NODE: "the node token",
                 Auth.VOLUME: "a key of the volume or the admin token",
                 Auth.SESSION: "the session's capability"}[auth]
        raise ShoalError(Code.UNAUTHORIZED, f"this call needs {needs}")

    # ----- granting -------------------------------------------------------------
    def issue(self, vol_id: str, rights: str, session: str, key_id: str, ttl: float | None = None) -> str:
        expires = time.time() + (self.capability_ttl if ttl is None else ttl)
        return capability.issue(self.key, Capability(vol_id, rights, session, key_id, expires))

    def node_capability(self, addr: str) -> str:
        """A node's capability for node-to-node calls (sent with every heartbeat,
        signed again only at half-life)."""
        held = self._node_caps.get(addr)
        if held is None:
            held = self._node_caps[addr] = Reissued(
                lambda: self.issue("", capability.NODE, addr, "node", NODE_CAPABILITY_TTL), NODE_CAPABILITY_TTL)
        return held.token()


class Reissued:
    """A capability the master issues to itself or a node: the same one until
    half its life has passed, then a fresh one."""

    def __init__(self, issue: Callable[[], str], ttl: float) -> None:
        self.issue = issue
        self.ttl = ttl
        self._token: str | None = None
        self._renew_at = 0.0

    def token(self) -> str:
        if self._token is None or time.time() >= self._renew_at:
            self._token = self.issue()
            self._renew_at = time.time() + self.ttl / 2
        return self._token

    async def renew(self) -> None:
        self._token = None


def master_credential(authority: Authority, term: int) -> Reissued:
    """The leader's own capability for its commands to nodes (a proto.rpc.Credential).
    It carries the leader's term: a node that has obeyed a later term refuses it."""
    return Reissued(lambda: authority.issue("", capability.MASTER, str(term), "master", MASTER_CAPABILITY_TTL),
                    MASTER_CAPABILITY_TTL)

"""Client sessions: a key buys a capability, the capability speaks for its session.

POST /client/session  {volume, key}  -> a capability (rights of the key) and
                      the volume's description; the admin token may stand
                      in for a key (fsck, repairs).
POST /client/heartbeat (capability)  -> registers or refreshes the session
                      named in the capability, answers the volume's status
                      and a renewed capability.
POST /client/renew    (capability)   -> a renewed capability only (a client
                      that does not heartbeat).
POST /client/goodbye  (capability)   -> ends that session, and only that one.

Every stored field is checked, so listing sessions never fails on what a
client sent; session ids never leave the master. Sessions live in memory
only, in the leader's memory: after a failover or restart every live mount
re-registers at its next heartbeat (its capability, signed with the key all
masters share, still verifies), and a session whose heartbeats stop expires
after `ttl` seconds.
"""

from __future__ import annotations

import secrets
import time
from collections import Counter
from typing import TYPE_CHECKING, Any

from aiohttp import web

from shoalfs.master.access import Auth
from shoalfs.master.keys import ADMIN_KEY_ID
from shoalfs.proto.capability import READ_WRITE, Capability, check_expiry
from shoalfs.proto.errors import Code, ShoalError
from shoalfs.proto.schema import Int, Number, Opt, Str, validate

if TYPE_CHECKING:
    from shoalfs.master.server import Master

SESSION_FIELDS = {"host": Opt(Str(255), ""), "pid": Opt(Int(0, (1 << 31) - 1), 0),
                  "mountpoint": Opt(Str(4096), ""), "version": Opt(Str(32), ""),
                  "mounted_at": Opt(Number(0, 1e11), 0.0)}
MAX_SESSIONS_PER_KEY = 65536  # what one key holder can make the master hold (about 30 MB)


class SessionTable:
    def __init__(self, ttl: float = 20.0) -> None:
        self.ttl = ttl
        self._sessions: dict[str, dict[str, Any]] = {}
        self._per_key: Counter[tuple[str, str]] = Counter()

    def touch(self, cap: Capability, key_name: str, fields: dict[str, Any]) -> None:
        entry = self._sessions.get(cap.session)
        if entry is None:
            if self._per_key[cap.vol_id, cap.key_id] >= MAX_SESSIONS_PER_KEY:
                raise ShoalError(Code.UNAVAILABLE, f"key {key_name} has {MAX_SESSIONS_PER_KEY} live sessions")
            self._per_key[cap.vol_id, cap.key_id] += 1
        self._sessions[cap.session] = dict(fields, vol_id=cap.vol_id, key=key_name, rights=cap.rights,
                                           key_id=cap.key_id, last_seen=time.time())

    def clear(self) -> None:
        self._sessions.clear()
        self._per_key.clear()

    def drop(self, session: str) -> None:
        entry = self._sessions.pop(session, None)
        if entry is not None:
            self._per_key[entry["vol_id"], entry["key_id"]] -= 1

    def for_volume(self, vol_id: str) -> list[dict[str, Any]]:
        self.expire()
        return sorted(({k: v for k, v in s.items() if k not in ("vol_id", "key_id")}
                       for s in self._sessions.values() if s["vol_id"] == vol_id),
                      key=lambda s: s["mounted_at"])

    def expire(self) -> None:
        cutoff = time.time() - self.ttl
        for sid in [sid for sid, s in self._sessions.items() if s["last_seen"] < cutoff]:
            self.drop(sid)


class ClientSessions:
    def __init__(self, master: Master) -> None:
        self.m = master
        self.table = SessionTable(float(master.cfg.get("session_ttl", 20.0)))
        master.add("POST", "/client/session", self.open, Auth.OPEN)
        master.add("POST", "/client/heartbeat", self.heartbeat, Auth.SESSION)
        master.add("POST", "/client/renew", self.renew, Auth.SESSION)
        master.add("POST", "/client/goodbye", self.goodbye, Auth.SESSION)
        master.add("GET", "/volume/clients", self.clients, Auth.ADMIN)

    async def open(self, request: web.Request) -> Any:
        """A key (or the admin token) for a capability of a new session."""
        body = await self.m.body(request)
        vol = self.m.state.by_name(body.get("volume"))  # type: ignore[arg-type]
        if body.get("key") is None:
            self.m.authority.caller(request, Auth.ADMIN)  # no key: only the operator
            key_id, rights = ADMIN_KEY_ID, READ_WRITE
        else:
            key_id, rights = self.m.keys.check(vol, body["key"])
        cap = self.m.authority.issue(vol["vol_id"], rights, secrets.token_hex(16), key_id)
        return {"capability": cap, "rights": rights, "ttl": self.m.authority.capability_ttl,
                "volume": self.m.describe(vol)}

    def _still_valid(self, cap: Capability) -> dict[str, Any]:
        """The volume of a capability being renewed: not deleted (checked
        first: even an expired capability gets the tombstone), not expired,
        key not revoked."""
        try:
            self.m.lifecycle.raise_if_deleted(cap.vol_id)
        except ShoalError:
            self.table.drop(cap.session)
            raise
        check_expiry(cap)
        vol = self.m.state.by_id(cap.vol_id)
        if vol is None:  # unknown, no tombstone: proves nothing, the mount stays
            raise ShoalError(Code.VOLUME_NOT_EXIST, "unknown volume id")
        if not self.m.keys.valid(vol, cap.key_id):
            self.table.drop(cap.session)
            raise ShoalError(Code.UNAUTHORIZED, f"the key of this session was revoked: access denied to "
                                                f"volume {vol['name']}")
        return vol

    def _session(self, request: web.Request) -> Capability:
        cap = self.m.caller(request).cap
        assert cap is not None  # Auth.SESSION admits capabilities only
        return cap

    def _renewed(self, cap: Capability) -> str:
        return self.m.authority.issue(cap.vol_id, cap.rights, cap.session, cap.key_id)

    async def heartbeat(self, request: web.Request) -> Any:
        """Kept cheap: thousands of mounts call this every few seconds."""
        cap = self._session(request)
        fields = validate(SESSION_FIELDS, await self.m.body(request))
        vol = self._still_valid(cap)
        self.table.touch(cap, self.m.keys.name_of(vol, cap.key_id), fields)
        return {"status": vol["status"], "purge_at": vol.get("purge_at"), "capability": self._renewed(cap)}

    async def renew(self, request: web.Request) -> Any:
        cap = self._session(request)
        self._still_valid(cap)
        return {"capability": self._renewed(cap)}

    async def goodbye(self, request: web.Request) -> Any:
        self.table.drop(self._session(request).session)
        return {}

    async def clients(self, request: web.Request) -> Any:
        vol = self.m.state.by_name(self.m.arg(request, "name"))
        return self.table.for_volume(vol["vol_id"])

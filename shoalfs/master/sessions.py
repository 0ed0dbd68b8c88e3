"""Client sessions: every mount registers through its heartbeat.

Sessions live in memory only: after a master restart every live mount
re-registers within one heartbeat interval, and a session whose heartbeats
stop expires after `ttl` seconds.
"""

from __future__ import annotations

import time
from typing import Any

from shoalfs.proto.errors import Code, ShoalError

SESSION_FIELDS = ("host", "pid", "mountpoint", "version", "mounted_at")


class SessionTable:
    def __init__(self, ttl: float = 20.0) -> None:
        self.ttl = ttl
        self._sessions: dict[str, dict[str, Any]] = {}

    def touch(self, body: dict[str, Any]) -> None:
        sid = body.get("session")
        if not isinstance(sid, str) or not 8 <= len(sid) <= 64:
            raise ShoalError(Code.BAD_REQUEST, "heartbeat needs a session id")
        entry = {k: body.get(k) for k in SESSION_FIELDS}
        entry.update(session=sid, vol_id=body.get("vol_id"), last_seen=time.time())
        self._sessions[sid] = entry

    def drop(self, sid: str) -> None:
        self._sessions.pop(sid, None)

    def for_volume(self, vol_id: str) -> list[dict[str, Any]]:
        self.expire()
        return sorted((s for s in self._sessions.values() if s["vol_id"] == vol_id),
                      key=lambda s: s["mounted_at"] or 0)

    def expire(self) -> None:
        cutoff = time.time() - self.ttl
        for sid in [sid for sid, s in self._sessions.items() if s["last_seen"] < cutoff]:
            del self._sessions[sid]

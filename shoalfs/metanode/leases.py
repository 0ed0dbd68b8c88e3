"""Which client sessions have which files of a partition open (soft state).

A file unlinked on one mount while another has it open keeps its inode and
data until the last session that has it open closes it, or stops renewing
(a client that crashed). Opens are counted per (inode, session), so an open
and a close of the same session arriving in either order leave the right
count; a session renews its leases with the counts it holds, which also
rebuilds them after a metanode restart. Nothing here is journaled: a
partition that has not been up for one lease period does not reclaim
unlinked inodes (it may not have heard from every session yet).
"""

from __future__ import annotations

import time

from shoalfs.proto.layout import OPEN_LEASE


class OpenLeases:
    def __init__(self, lease: float = OPEN_LEASE) -> None:
        self.lease = lease
        self.started = time.monotonic()
        self._held: dict[int, dict[str, list[float]]] = {}  # ino -> session -> [count, expires]

    def open(self, ino: int, session: str) -> None:
        entry = self._held.setdefault(ino, {}).setdefault(session, [0, 0.0])
        entry[0] += 1
        entry[1] = time.monotonic() + self.lease

    def close(self, ino: int, session: str) -> None:
        sessions = self._held.get(ino)
        entry = sessions.get(session) if sessions else None
        if sessions is None or entry is None:
            return
        entry[0] -= 1
        if entry[0] <= 0:
            del sessions[session]
            if not sessions:
                del self._held[ino]

    def renew(self, session: str, counts: dict[int, int]) -> None:
        """The session's own account of what it has open (counts kept if known)."""
        expires = time.monotonic() + self.lease
        for ino, count in counts.items():
            entry = self._held.setdefault(ino, {}).setdefault(session, [count, expires])
            entry[1] = expires

    def held(self, ino: int, besides: str | None = None) -> bool:
        """Whether a live session (other than `besides`) has the inode open."""
        sessions = self._held.get(ino)
        if not sessions:
            return False
        now = time.monotonic()
        for session in [s for s, (_, expires) in sessions.items() if expires < now]:
            del sessions[session]  # a session that stopped renewing: crashed or gone
        if not sessions:
            del self._held[ino]
            return False
        return any(s != besides for s in sessions)

    @property
    def settled(self) -> bool:
        """Up for a lease period: every live session has renewed since the start."""
        return time.monotonic() - self.started > self.lease

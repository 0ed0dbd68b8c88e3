"""Which client sessions have which files of a partition open (soft state).

A file unlinked on one client while another has it open keeps its inode
and data until no other session holds it. A session takes a lease on a
file with the round trip that opens it (or creates it open), renews its
leases every third of a lease period while it has the file open, and gives
a lease back explicitly only when it unlinked the file itself (then the
file may go at once); otherwise the lease simply lapses, so a close costs
no round trip. A file left unlinked and unheld goes with the reaper.

Nothing here is journaled: until a partition has been up for one lease
period every file counts as held (a session may not have renewed since a
restart yet).
"""

from __future__ import annotations

import time

from shoalfs.proto.layout import OPEN_LEASE


class OpenLeases:
    def __init__(self, lease: float = OPEN_LEASE) -> None:
        self.lease = lease
        self.started = time.monotonic()
        self._held: dict[int, dict[str, float]] = {}  # ino -> session -> expires (monotonic)

    def open(self, ino: int, session: str) -> None:
        self._held.setdefault(ino, {})[session] = time.monotonic() + self.lease

    def renew(self, session: str, inos: list[int]) -> None:
        expires = time.monotonic() + self.lease
        for ino in inos:
            self._held.setdefault(ino, {})[session] = expires

    def release(self, ino: int, session: str) -> None:
        sessions = self._held.get(ino)
        if sessions is not None:
            sessions.pop(session, None)
            if not sessions:
                del self._held[ino]

    def held(self, ino: int, besides: str | None = None) -> bool:
        """Whether a live session (other than `besides`) has the inode open."""
        if not self.settled:
            return True
        sessions = self._held.get(ino)
        if not sessions:
            return False
        now = time.monotonic()
        for session in [s for s, expires in sessions.items() if expires < now]:
            del sessions[session]  # a session that stopped renewing: closed, crashed or gone
        if not sessions:
            del self._held[ino]
            return False
        return any(s != besides for s in sessions)

    def born(self) -> None:
        """A partition created just now: no session can hold anything it has not told us."""
        self.started = time.monotonic() - self.lease - 1

    @property
    def settled(self) -> bool:
        """Up for a lease period: every live session has renewed since the start."""
        return time.monotonic() - self.started > self.lease

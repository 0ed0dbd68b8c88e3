"""Cluster-wide file locks of a partition's files (soft state, on its leader).

The metanode that leads a file's partition serves its locks, so they hold
between every mount and SDK handle of the volume. An owner is (session, the
id its client gives); a lock lives while its session renews (every lock
request and every lease renewal counts), so a client that crashed, was
killed or was cut off holds nobody up for longer than one lock lease.

Nothing is journaled. A leader that starts (a restart, a failover) knows no
locks, so for one lease period, the grace, it grants only what live
sessions reclaim with their renewals (they renew every third of a lease)
and makes every other request wait. A holder that missed the grace learns
from its next renewal's answer that its lock is gone.

A request that conflicts may wait (the client's `wait`): it is answered as
soon as a change to the file's locks, the end of the grace or the lapse of
the conflicting holder's lease lets it through, or when `wait` runs out and
the client asks again. No polling in between.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from dataclasses import dataclass
from typing import Any

from shoalfs.proto.errors import Code, ShoalError
from shoalfs.proto.locks import MAX_HELD, UNLOCK, WRITE

log = logging.getLogger(__name__)

Owner = tuple[str, int]  # (session, the client's owner id)
Key = tuple[int, int]  # (ino, kind)
MAX_LOCKS = 1_000_000  # locks one partition holds at most (about 200 MB)


@dataclass(frozen=True)
class Lock:
    owner: Owner
    type: int
    start: int
    end: int
    pid: int

    def blocks(self, owner: Owner, type: int, start: int, end: int) -> bool:
        return (self.owner != owner and (type == WRITE or self.type == WRITE)
                and self.start < end and start < self.end)

    def public(self) -> list[int]:
        return [self.type, self.start, self.end, self.pid]


def apply(mine: list[Lock], owner: Owner, type: int, start: int, end: int, pid: int) -> list[Lock]:
    """An owner's locks after it sets [start, end) to `type` (POSIX: what it
    held there is replaced, the rest of each range it held stays; ranges of
    one type that touch become one)."""
    out: list[Lock] = []
    for lk in mine:
        if lk.end <= start or end <= lk.start:
            out.append(lk)
            continue
        if lk.start < start:
            out.append(Lock(owner, lk.type, lk.start, start, lk.pid))
        if end < lk.end:
            out.append(Lock(owner, lk.type, end, lk.end, lk.pid))
    if type != UNLOCK:
        out.append(Lock(owner, type, start, end, pid))
    out.sort(key=lambda lk: lk.start)
    merged: list[Lock] = []
    for lk in out:
        prev = merged[-1] if merged else None
        if prev is not None and prev.type == lk.type and prev.end >= lk.start:
            merged[-1] = Lock(owner, lk.type, prev.start, max(prev.end, lk.end), lk.pid)
        else:
            merged.append(lk)
    return merged


class LockTable:
    def __init__(self, lease: float) -> None:
        self.lease = lease
        self.settles_at = time.monotonic() + lease  # the grace: only reclaims until then
        self.id = secrets.token_hex(4)
        self.version = 0  # +1 on every change: a client keeps the newest answer about its locks
        self._locks: dict[Key, list[Lock]] = {}
        self._count = 0
        self._expires: dict[str, float] = {}  # session -> when its locks lapse (monotonic)
        self._changed: dict[int, asyncio.Event] = {}  # ino -> set (and dropped) when its locks change
        self._waiting: dict[tuple[str, int, int], int] = {}  # (session, owner, ino) -> requests waiting
        self._cancelled: set[tuple[str, int, int]] = set()
        self.closed = False  # no longer this node's to serve: nothing more is granted from it

    def born(self) -> None:
        """A partition created just now: nobody can hold a lock on it, no grace."""
        self.settles_at = time.monotonic()

    @property
    def stamp(self) -> list[Any]:
        """This table's version, as a client compares answers: (table, changes)."""
        return [self.id, self.version]

    @property
    def settled(self) -> bool:
        return time.monotonic() >= self.settles_at

    def touch(self, session: str) -> None:
        now = time.monotonic()
        self._expires[session] = now + self.lease
        if len(self._expires) > 4 * (self._count + 256):  # forget sessions long gone
            live = {lk.owner[0] for locks in self._locks.values() for lk in locks}
            self._expires = {s: t for s, t in self._expires.items() if t >= now or s in live}

    # ----- the table ---------------------------------------------------------------
    def _live(self, key: Key) -> list[Lock]:
        """The file's locks, without those of sessions whose lease lapsed."""
        locks = self._locks.get(key)
        if not locks:
            return []
        now = time.monotonic()
        alive = [lk for lk in locks if self._expires.get(lk.owner[0], 0.0) >= now]
        if len(alive) != len(locks):
            self._store(key, alive)
        return alive

    def _store(self, key: Key, locks: list[Lock]) -> None:
        self._count += len(locks) - len(self._locks.get(key, ()))
        if locks:
            self._locks[key] = locks
        else:
            self._locks.pop(key, None)
        self.version += 1
        event = self._changed.pop(key[0], None)
        if event is not None:
            event.set()  # every request waiting on this file looks again

    def conflict(self, key: Key, owner: Owner, type: int, start: int, end: int) -> Lock | None:
        if type == UNLOCK:
            return None
        return next((lk for lk in self._live(key) if lk.blocks(owner, type, start, end)), None)

    def held(self, key: Key, owner: Owner) -> list[list[int]]:
        return [lk.public() for lk in self._live(key) if lk.owner == owner]

    def set(self, key: Key, owner: Owner, type: int, start: int, end: int, pid: int) -> None:
        """Set a lock that conflicts with nothing (see `conflict`)."""
        locks = self._live(key)
        mine = apply([lk for lk in locks if lk.owner == owner], owner, type, start, end, pid)
        if len(mine) > MAX_HELD or (type != UNLOCK and self._count >= MAX_LOCKS):
            raise ShoalError(Code.NO_SPACE, "too many locks")
        if mine != [lk for lk in locks if lk.owner == owner]:  # (an owner's locks are kept in order)
            self._store(key, [lk for lk in locks if lk.owner != owner] + mine)

    def release(self, session: str, ino: int | None, kind: int | None, owner: int | None) -> None:
        """Drop a session's locks: all, or those on one file, kind or owner."""
        for key in [k for k in self._locks if (ino is None or k[0] == ino) and (kind is None or k[1] == kind)]:
            locks = self._locks[key]
            keep = [lk for lk in locks if lk.owner[0] != session or (owner is not None and lk.owner[1] != owner)]
            if len(keep) != len(locks):
                self._store(key, keep)

    def close(self) -> None:
        """The partition goes, or another table takes over (a new term as
        leader): nothing more is granted from this one, and its waiters go."""
        self.closed = True
        for key in list(self._locks):
            self._store(key, [])
        for event in self._changed.values():
            event.set()
        self._changed.clear()

    # ----- requests --------------------------------------------------------------------
    async def acquire(self, key: Key, owner: Owner, type: int, start: int, end: int, pid: int,
                      wait: float) -> Lock | None:
        """Set the lock, waiting up to `wait` seconds for a conflicting one to
        go; the lock in the way when it could not (None: granted)."""
        deadline = time.monotonic() + wait
        waiter = (owner[0], owner[1], key[0])
        self._waiting[waiter] = self._waiting.get(waiter, 0) + 1
        try:
            while True:
                if self.closed:
                    raise ShoalError(Code.TRY_AGAIN, "the partition's locks moved")
                self.touch(owner[0])
                now = time.monotonic()
                if type == UNLOCK or self.settled:
                    blocking = self.conflict(key, owner, type, start, end)
                    if blocking is None:
                        self.set(key, owner, type, start, end, pid)
                        return None
                    wake_at = self._expires.get(blocking.owner[0], now)
                elif not wait:
                    raise ShoalError(Code.TRY_AGAIN, "the partition's locks are being reclaimed")
                else:  # the grace: whoever held this lock may not have reclaimed it yet
                    blocking, wake_at = Lock(("", 0), WRITE, 0, end, 0), self.settles_at
                if now >= deadline or waiter in self._cancelled:
                    self._cancelled.discard(waiter)
                    return blocking
                event = self._changed.setdefault(key[0], asyncio.Event())
                try:
                    await asyncio.wait_for(event.wait(), max(0.0, min(deadline, wake_at + 0.01) - now))
                except TimeoutError:
                    pass
        finally:
            self._waiting[waiter] -= 1
            if not self._waiting[waiter]:
                del self._waiting[waiter]
                self._cancelled.discard(waiter)

    def test(self, key: Key, owner: Owner, type: int, start: int, end: int) -> Lock | None:
        """F_GETLK: a lock in the way (during the grace, one may not be known yet)."""
        self.touch(owner[0])
        if not self.settled:
            raise ShoalError(Code.TRY_AGAIN, "the partition's locks are being reclaimed")
        return self.conflict(key, owner, type, start, end)

    def cancel(self, session: str, owner: int, ino: int) -> None:
        """The waiting process was interrupted: its waiting request answers now, not granted."""
        waiter = (session, owner, ino)
        if waiter in self._waiting:
            self._cancelled.add(waiter)
            event = self._changed.pop(ino, None)
            if event is not None:
                event.set()

    def renew(self, session: str, claims: list[Any]) -> list[list[Any]]:
        """A session's renewal: what it says it holds is its again (reclaimed
        during the grace when nothing else holds it). The answer is what it
        holds of what it claimed: less than it claimed means a lock was lost."""
        self.touch(session)
        answer = []
        for ino, kind, owner_id, locks in claims:
            key, owner = (ino, kind), (session, owner_id)
            if not self.settled and self.held(key, owner) != locks:
                for type, start, end, pid in locks:
                    if self.conflict(key, owner, type, start, end) is None:
                        self.set(key, owner, type, start, end, pid)
                log.info("inode %d: reclaimed %d locks of a session", ino, len(locks))
            answer.append([ino, kind, owner_id, self.held(key, owner)])
        return answer

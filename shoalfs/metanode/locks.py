"""Cluster-wide file locks of a partition's files (soft state, on its leader).

The metanode that leads a file's partition serves its locks, so they hold
between every mount and SDK handle of the volume. An owner is (session, the
id its client gives); a lock lives while its session renews (every lock
request and every lease renewal counts), so a client that crashed, was
killed or was cut off holds nobody up for longer than one lock lease. Time
in which this node could not serve the partition, or its event loop did not
run (a stall, SIGSTOP), does not count against anyone's lease: nobody could
renew then.

Nothing is journaled. A leader that starts (a restart, a failover) knows no
locks, so for one lease period, the grace, it takes only what live sessions
reclaim with their renewals (they renew every third of a lease): every
other request, an unlock or a release too, is answered TRY_AGAIN (its
client asks again) or waits. So no change can come between a claim and
what it claims. A holder that missed the grace learns from its next
renewal's answer that its lock is gone.

A request that conflicts may wait (the client's `wait`): it is answered as
soon as a change to the file's locks, the end of the grace or the lapse of
the conflicting holder's lease lets it through, or when `wait` runs out and
the client asks again. No polling in between.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from shoalfs.proto.errors import Code, ShoalError
from shoalfs.proto.locks import EOF, FLOCK, MAX_HELD, MAX_SESSION_LOCKS, POSIX, UNLOCK, WRITE

log = logging.getLogger(__name__)

Owner = tuple[str, int]  # (session, the client's owner id)
Key = tuple[int, int]  # (ino, kind)
Waiter = tuple[str, int, int]  # (session, owner id, ino)
MAX_LOCKS = 1_000_000  # locks one partition holds at most (about 200 MB)
MAX_FILE_LOCKS = 4096  # locks on one file, of all owners (a reclaim checks each claim against them)
TICK = 0.5  # the metanode ticks every table this often (see tick)
STALL = 4 * TICK  # no tick for this long: the event loop stalled, and that time does not count


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


# what is in the way of a request that must wait without a known holder (the
# grace, or its client withdrew it)
UNKNOWN_HOLDER = Lock(("", 0), WRITE, 0, EOF, 0)


def apply(mine: list[Lock], owner: Owner, type: int, start: int, end: int, pid: int) -> list[Lock]:
    """An owner's locks after it sets [start, end) to `type` (POSIX: what it
    held there is replaced, the rest of each range it held stays; ranges of
    one type that touch become one). Kept sorted by start."""
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


def _serving() -> None:
    """A partition without replicas can always serve."""


class LockTable:
    def __init__(self, lease: float, serving: Callable[[], None] = _serving) -> None:
        self.lease = lease
        self.serving = serving  # raises unless this node may answer for the partition now
        self.settles_at = time.monotonic() + lease  # the grace: only reclaims until then
        self.id = secrets.token_hex(4)
        self.version = 0  # +1 on every change: a client keeps the newest answer about its locks
        self.closed = False  # no longer this node's to serve: nothing more is granted from it
        self._locks: dict[Key, dict[Owner, list[Lock]]] = {}
        self._keys_of: dict[str, set[Key]] = {}  # session -> the files it holds locks on
        self._count = 0
        self._count_of: Counter[str] = Counter()  # session -> locks it holds here
        self._expires: dict[str, float] = {}  # session -> when its locks lapse (monotonic)
        self._last_tick = time.monotonic()
        self._changed: dict[int, asyncio.Event] = {}  # ino -> set (and dropped) when its locks change
        self._waiting: Counter[Waiter] = Counter()  # requests waiting, per (session, owner, ino)
        self._cancelled: set[Waiter] = set()
        self._settled = False  # latched: time postponed later never reopens the grace

    def born(self) -> None:
        """A partition created just now: nobody can hold a lock on it, no grace."""
        self.settles_at = time.monotonic()
        self._settled = True

    @property
    def stamp(self) -> list[Any]:
        """This table's version, as a client compares answers: (table, changes)."""
        return [self.id, self.version]

    @property
    def settled(self) -> bool:
        if not self._settled and self._now() >= self.settles_at:
            self._settled = True
        return self._settled

    def check_settled(self) -> None:
        if not self.settled:
            raise ShoalError(Code.TRY_AGAIN, "the partition's locks are being reclaimed")

    # ----- time that counts ------------------------------------------------------------
    def tick(self, serving: bool) -> None:
        """Called every TICK by the metanode. While this node cannot serve the
        partition, nobody can renew: that time is added to every lease (and
        to the grace)."""
        now = time.monotonic()
        gap = now - self._last_tick
        if not serving:
            self._postpone(gap)
        elif gap > STALL:
            self._postpone(gap - TICK)
        self._last_tick = now
        self._reap(now)

    def _reap(self, now: float) -> None:
        """Drop the locks of sessions whose lease lapsed (on files nobody asks about too)."""
        for session in [s for s in self._keys_of if self._expires.get(s, 0.0) < now]:
            for key in list(self._keys_of.get(session, ())):
                for owner in [o for o in self._locks.get(key, {}) if o[0] == session]:
                    self._store(key, owner, [])

    def _now(self) -> float:
        now = time.monotonic()
        if now - self._last_tick > STALL:  # the loop stalled (or nobody ticks): it does not count
            self._postpone(now - self._last_tick - TICK)
            self._last_tick = now
        return now

    def _postpone(self, seconds: float) -> None:
        for session in self._expires:
            self._expires[session] += seconds
        if not self._settled:
            self.settles_at += seconds

    def touch(self, session: str) -> None:
        now = self._now()
        self._expires[session] = now + self.lease
        if len(self._expires) > 4 * (len(self._keys_of) + 256):  # forget sessions long gone
            self._expires = {s: t for s, t in self._expires.items() if t >= now or s in self._keys_of}

    # ----- the table ---------------------------------------------------------------
    def _live(self, key: Key) -> dict[Owner, list[Lock]]:
        """The file's locks by owner, without those of sessions whose lease lapsed."""
        owners = self._locks.get(key)
        if not owners:
            return {}
        now = self._now()
        for owner in [o for o in owners if self._expires.get(o[0], 0.0) < now]:
            self._store(key, owner, [])
        return self._locks.get(key, {})

    def _store(self, key: Key, owner: Owner, mine: list[Lock]) -> None:
        owners = self._locks.setdefault(key, {})
        grown = len(mine) - len(owners.get(owner, ()))
        self._count += grown
        self._count_of[owner[0]] += grown
        if mine:
            owners[owner] = mine
            self._keys_of.setdefault(owner[0], set()).add(key)
        else:
            owners.pop(owner, None)
            if not owners:
                del self._locks[key]
            if not any(o[0] == owner[0] for o in owners):  # the session holds nothing more here
                keys = self._keys_of.get(owner[0], set())
                keys.discard(key)
                if not keys:
                    self._keys_of.pop(owner[0], None)
                    self._count_of.pop(owner[0], None)
        self.version += 1
        event = self._changed.pop(key[0], None)
        if event is not None:
            event.set()  # every request waiting on this file looks again

    def conflict(self, key: Key, owner: Owner, type: int, start: int, end: int) -> Lock | None:
        if type == UNLOCK:
            return None
        for other, locks in self._live(key).items():
            if other != owner:
                for lk in locks:
                    if lk.blocks(owner, type, start, end):
                        return lk
        return None

    def held(self, key: Key, owner: Owner) -> list[list[int]]:
        """What an owner holds on a file (its session is alive: it is asking)."""
        return [lk.public() for lk in self._locks.get(key, {}).get(owner, ())]

    def set(self, key: Key, owner: Owner, type: int, start: int, end: int, pid: int) -> None:
        """Set a lock that conflicts with nothing (see `conflict`)."""
        before = self._live(key).get(owner, [])
        mine = apply(before, owner, type, start, end, pid)
        if mine == before:
            return
        grown = len(mine) - len(before)  # an unlock in the middle of a range grows too
        if grown > 0 and (len(mine) > MAX_HELD or self._count + grown > MAX_LOCKS
                          or self._count_of[owner[0]] + grown > MAX_SESSION_LOCKS
                          or sum(map(len, self._locks.get(key, {}).values())) + grown > MAX_FILE_LOCKS):
            raise ShoalError(Code.NO_SPACE, "too many locks")
        self._store(key, owner, mine)

    def release(self, session: str, ino: int | None, kind: int | None, owner: int | None) -> None:
        """Drop a session's locks, all or those on one file, of one kind or
        owner; its requests waiting for such locks are answered at once (their
        client let go of them, or went). Not during the grace (TRY_AGAIN)."""
        self.touch(session)
        self.check_settled()
        for key in [k for k in self._keys_of.get(session, ()) if (ino is None or k[0] == ino)
                    and (kind is None or k[1] == kind)]:
            for who in [o for o in self._locks.get(key, {}) if o[0] == session and (owner is None or o[1] == owner)]:
                self._store(key, who, [])
        for waiter in [w for w in self._waiting if w[0] == session and (ino is None or w[2] == ino)
                       and (owner is None or w[1] == owner)]:
            self._withdraw(waiter)

    def close(self) -> None:
        """The partition goes, or another table takes over (a new term as
        leader): nothing more is granted from this one, and its waiters go."""
        self.closed = True
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
        self._waiting[waiter] += 1
        try:
            while True:
                if self.closed:
                    raise ShoalError(Code.TRY_AGAIN, "the partition's locks moved")
                self.touch(owner[0])
                now = self._now()
                if waiter in self._cancelled and type != UNLOCK:
                    return UNKNOWN_HOLDER
                if not wait or type == UNLOCK:
                    self.check_settled()  # the grace: TRY_AGAIN, and its client asks again
                if self.settled:
                    blocking = self.conflict(key, owner, type, start, end)
                    if blocking is None:
                        self.serving()  # no grant from a node that may not answer now
                        self.set(key, owner, type, start, end, pid)
                        return None
                    if key[1] == FLOCK and self.held(key, owner):
                        # as Linux: a flock that changes type lets go of the old one first (two
                        # holders of a shared lock who both want it exclusive would wait for ever)
                        self.serving()
                        self.set(key, owner, UNLOCK, 0, EOF, pid)
                    wake_at = self._expires.get(blocking.owner[0], now)
                else:  # the grace: whoever held this lock may not have reclaimed it yet
                    blocking, wake_at = UNKNOWN_HOLDER, self.settles_at
                if now >= deadline:
                    self.serving()  # not even a refusal from a node that may not answer now
                    return blocking
                event = self._changed.get(key[0])
                if event is None:
                    event = self._changed[key[0]] = asyncio.Event()
                try:
                    await asyncio.wait_for(event.wait(), max(0.0, min(deadline, wake_at + 0.01) - now))
                except TimeoutError:
                    pass
        finally:
            self._waiting[waiter] -= 1
            if not self._waiting[waiter]:
                del self._waiting[waiter]
                self._cancelled.discard(waiter)
                if not any(w[2] == key[0] for w in self._waiting):
                    self._changed.pop(key[0], None)

    def test(self, key: Key, owner: Owner, type: int, start: int, end: int) -> Lock | None:
        """F_GETLK: a lock in the way (during the grace, one may not be known yet)."""
        self.touch(owner[0])
        self.check_settled()
        return self.conflict(key, owner, type, start, end)

    def cancel(self, session: str, owner: int, ino: int) -> None:
        """The waiting process was interrupted: its waiting request answers now, not granted."""
        waiter = (session, owner, ino)
        if waiter in self._waiting:
            self._withdraw(waiter)

    def _withdraw(self, waiter: Waiter) -> None:
        self._cancelled.add(waiter)
        event = self._changed.pop(waiter[2], None)
        if event is not None:
            event.set()

    def renew(self, session: str, claims: list[Any], may_write: bool = True) -> list[list[Any]]:
        """A session's renewal: what it says it holds is its again (reclaimed
        during the grace when nothing else holds it). The answer is what it
        holds of what it claimed: less than it claimed means a lock was lost."""
        self.touch(session)
        answer = []
        for ino, kind, owner_id, locks in claims:
            key, owner = (ino, kind), (session, owner_id)
            if not self.settled and self.held(key, owner) != locks:
                taken = 0
                for type, start, end, pid in locks:
                    if (start < end and (may_write or kind != POSIX or type != WRITE)
                            and self.conflict(key, owner, type, start, end) is None):
                        with contextlib.suppress(ShoalError):  # over a limit: that one is lost
                            self.set(key, owner, type, start, end, pid)
                            taken += 1
                if taken:
                    log.info("inode %d: reclaimed %d of %d locks of a session", ino, taken, len(locks))
            answer.append([ino, kind, owner_id, self.held(key, owner)])
        return answer

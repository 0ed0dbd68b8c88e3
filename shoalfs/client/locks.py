"""File locks through the metanode that owns the file (proto/locks.py).

A request that must wait is sent again every `poll` seconds at most: the
metanode holds it meanwhile and answers as soon as the lock is granted, so
no process polls. An interrupted waiter (a signal) has its request answered
at once, not granted.

The locks this client holds are kept as the metanodes last told it, so that
a renewal can say what the session holds (a new partition leader learns its
locks from these) and so that a close costs a round trip only when the
closing owner may hold a lock on the file. Every answer about an owner's
locks on a file carries the metanode's table version, (table id, count):
of two answers from one table the older is ignored, and a renewal's answer
counts only for files whose locks did not change here while it was asked.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from shoalfs.proto.errors import Code, ShoalError, is_transient
from shoalfs.proto.locks import MAX_SESSION_LOCKS, MAX_WAIT, UNLOCK
from shoalfs.proto.opcodes import Op

if TYPE_CHECKING:
    from shoalfs.client.core import VolumeClient

log = logging.getLogger(__name__)

LockKey = tuple[int, int, int]  # (ino, kind, owner)
Version = tuple[str, int]  # (the metanode's table, its count of changes)
FORGET_AFTER = 300.0  # seconds a record of locks let go is kept (no answer is older)


@dataclass
class _Record:
    version: Version
    locks: list[list[int]]  # as the metanode last said; [] once let go (kept a while)
    changes: int  # +1 on every change here: a renewal answers only for a record it saw
    at: float


class HeldLocks:
    def __init__(self) -> None:
        self._records: dict[LockKey, _Record] = {}
        # asked for a lock and never told the outcome (the call failed): the
        # metanode may have granted it, so a close lets go of it anyway
        self._unsure: set[LockKey] = set()
        self.lost = 0  # locks a renewal found gone (the session's lock lease lapsed meanwhile)

    def __bool__(self) -> bool:
        return bool(self._unsure) or any(r.locks for r in self._records.values())

    def asking(self, key: LockKey) -> None:
        self._unsure.add(key)

    def learn(self, key: LockKey, held: list[list[int]], version: Any) -> None:
        """An answer about what the owner holds on the file, unless we know a newer one."""
        seen = (str(version[0]), int(version[1]))
        if not self._older(key, seen):
            self._put(key, seen, held)

    def _older(self, key: LockKey, version: Version) -> bool:
        record = self._records.get(key)
        return record is not None and record.version[0] == version[0] and record.version[1] > version[1]

    def sure(self, key: LockKey) -> None:
        """An unlock answered: the owner holds nothing it asked for before."""
        self._unsure.discard(key)

    def _put(self, key: LockKey, version: Version, held: list[list[int]]) -> None:
        now = time.monotonic()
        record = self._records.get(key)
        self._records[key] = _Record(version, held, record.changes + 1 if record else 0, now)
        if len(self._records) % 1024 == 0:
            self._records = {k: r for k, r in self._records.items() if r.locks or now - r.at < FORGET_AFTER}

    def holds(self, ino: int, kind: int, owner: int) -> bool:
        """Whether the owner may hold a lock on the file (a close must let go of it)."""
        key = (ino, kind, owner)
        record = self._records.get(key)
        return key in self._unsure or (record is not None and bool(record.locks))

    def held(self, key: LockKey) -> list[list[int]]:
        record = self._records.get(key)
        return record.locks if record is not None else []

    def inos(self) -> set[int]:
        return {k[0] for k, r in self._records.items() if r.locks} | {k[0] for k in self._unsure}

    def claims(self, inos: set[int]) -> tuple[list[list[Any]], dict[LockKey, int]]:
        """What a renewal to the partition of `inos` says we hold, and which
        record it saw of each file (as many as a metanode takes from a session)."""
        keys, total = [], 0
        for k, r in self._records.items():
            if r.locks and k[0] in inos and total + len(r.locks) <= MAX_SESSION_LOCKS:
                keys.append(k)
                total += len(r.locks)
        return ([[*k, self._records[k].locks] for k in keys], {k: self._records[k].changes for k in keys})

    def renewed(self, seen: dict[LockKey, int], answer: list[Any], version: Any) -> list[tuple[LockKey, list[Any]]]:
        """A renewal's answer: what we still hold of what we claimed. Returns
        what the metanode holds for owners that let go meanwhile (a reclaim
        of a claim older than the letting go): to be let go again."""
        stale = []
        for ino, kind, owner, held in answer:
            key = (ino, kind, owner)
            record = self._records.get(key)
            if key not in seen or record is None:
                continue
            if record.changes != seen[key]:  # changed while the renewal was out: its answer may be older
                if held and not record.locks:
                    stale.append((key, held))
                continue
            if any(lock not in held for lock in record.locks):
                self.lost += 1
                log.warning("locks of owner %x on inode %d were lost (our session's lock lease lapsed): "
                            "held %s, now %s", owner, ino, record.locks, held)
            self.learn(key, held, version)
        return stale

    def forget(self, ino: int | None = None, kind: int | None = None, owner: int | None = None,
               version: Any = ("", 0)) -> None:
        """Let go (a release answered with `version`)."""
        seen = (str(version[0]), int(version[1]))
        for key in [k for k in [*self._records, *self._unsure] if (ino is None or k[0] == ino)
                    and (kind is None or k[1] == kind) and (owner is None or k[2] == owner)]:
            self._unsure.discard(key)
            if not self._older(key, seen):  # a lock answered after this release stays
                self._put(key, seen, [])


class FileLocks:
    def __init__(self, client: VolumeClient) -> None:
        self.client = client
        self.held = HeldLocks()
        self._releasing: dict[LockKey, asyncio.Task[None]] = {}  # releases retried after a close

    @property
    def poll(self) -> float:
        """How long the metanode may hold a waiting request: well inside one attempt."""
        return min(MAX_WAIT, self.client.options.attempt_timeout / 2)

    async def lock(self, ino: int, kind: int, owner: int, type: int, start: int, end: int, pid: int,
                   wait: bool, interrupted: asyncio.Event | None = None) -> list[int] | None:
        """Set a lock (or unlock); None once done, or the lock in the way
        ([type, start, end, pid]) when not waiting. A waiter whose
        `interrupted` is set raises InterruptedError."""
        key = (ino, kind, owner)
        pending = self._releasing.get(key)
        if pending is not None:  # a release of this owner's locks still on its way goes first
            done, _ = await asyncio.wait([pending], timeout=self.client.options.op_deadline)
            if not done:
                raise ShoalError(Code.TIMEOUT, f"locks on inode {ino} are still being released")
        part = self.client.meta_partition(ino)
        target = {"ino": ino, "kind": kind, "owner": owner}
        # the metanode answers a waiting request well before the call gives up on it
        body = {**target, "type": type, "start": start, "end": end, "pid": pid, "wait": self.poll if wait else 0.0}
        had_locks = bool(self.held)
        while True:  # a blocking wait lasts as long as it must; each call has the op deadline
            if type != UNLOCK:
                self.held.asking(key)  # until a release or an unlock: a grant whose answer is lost
            if interrupted is not None and interrupted.is_set():
                raise InterruptedError("interrupted while waiting for a lock")
            res = await self._interruptible(self.client.call(part, Op.META_LOCK, body), interrupted, part, target)
            self.held.learn(key, res["held"], res["version"])
            if type == UNLOCK and not res["held"]:
                self.held.sure(key)
            if self.held and not had_locks:  # renewals come every third of a lock lease now
                self.client.leases.schedule_changed.set()
                had_locks = True
            self.client.leases.learn_lock_lease(res.get("lock_lease"))
            if res["granted"]:
                return None
            if interrupted is not None and interrupted.is_set():
                raise InterruptedError("interrupted while waiting for a lock")
            if not wait:
                conflict: list[int] = res["conflict"]
                return conflict

    async def _interruptible(self, call: Any, interrupted: asyncio.Event | None, part: dict[str, Any],
                             target: dict[str, Any]) -> Any:
        """The call's answer; an interrupt asks the metanode to answer a waiting
        request at once (and, if the metanode cannot be reached, gives up on the
        call: InterruptedError; a close then lets go of what it may have got)."""
        if interrupted is None:
            return await call
        task = asyncio.ensure_future(call)
        interrupt = asyncio.ensure_future(interrupted.wait())
        try:
            await asyncio.wait([task, interrupt], return_when=asyncio.FIRST_COMPLETED)
            if not task.done():
                with contextlib.suppress(ShoalError):
                    await self.client.call(part, Op.META_LOCK_CANCEL, target, end=time.monotonic() + self.poll)
                await asyncio.wait([task], timeout=self.poll)
            if not task.done():
                task.cancel()
                raise InterruptedError("interrupted while waiting for a lock")
            return task.result()
        finally:
            interrupt.cancel()
            if not task.done():  # our caller was cancelled
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError, ShoalError):
                await task

    async def test(self, ino: int, kind: int, owner: int, type: int, start: int, end: int) -> list[int] | None:
        """F_GETLK: a lock another owner holds in the way, or None."""
        res = await self.client.meta(ino, Op.META_LOCK, {"ino": ino, "kind": kind, "owner": owner, "type": type,
                                                         "start": start, "end": end, "pid": 0, "test": True})
        conflict: list[int] | None = res["conflict"]
        return conflict

    async def release(self, ino: int, kind: int, owner: int) -> None:
        """An owner's locks on a file go (a close): a round trip only if it may hold one."""
        if not self.held.holds(ino, kind, owner):
            return
        body = {"ino": ino, "kind": kind, "owner": owner}
        try:
            res = await self.client.meta(ino, Op.META_RELEASE_LOCKS, body)
        except ShoalError as exc:
            if self.client.fenced or not is_transient(exc.code):
                raise
            # the metanode stayed away for a whole deadline. Our renewals would keep
            # the lock alive, so it is let go from here as soon as the metanode is
            # back (meanwhile it cannot grant it to anyone anyway); the close goes on
            log.warning("could not release locks on inode %d yet (trying on): %s", ino, exc.msg)
            self._release_later((ino, kind, owner))
            return
        self.held.forget(ino, kind, owner, res.get("version", ("", 0)))

    def _release_later(self, key: LockKey, unless_held: bool = False) -> None:
        """Release the owner's locks on the file once the metanode answers;
        `unless_held`: not if the owner took a lock there meanwhile."""
        async def go() -> None:
            ino, kind, owner = key
            try:
                while not self.client.fenced and not self.client.closing:
                    if unless_held and self.held.held(key):
                        return
                    try:
                        res = await self.client.meta(ino, Op.META_RELEASE_LOCKS,
                                                     {"ino": ino, "kind": kind, "owner": owner})
                        self.held.forget(ino, kind, owner, res.get("version", ("", 0)))
                        return
                    except ShoalError as exc:
                        if not is_transient(exc.code):  # the file is gone: so are its locks
                            self.held.forget(ino, kind, owner)
                            return
                    await asyncio.sleep(1.0)
            finally:
                self._releasing.pop(key, None)
        if key not in self._releasing:
            self._releasing[key] = asyncio.ensure_future(go())

    def let_go_again(self, stale: list[tuple[LockKey, list[Any]]]) -> None:
        """A renewal reclaimed locks of owners that had let go of them meanwhile."""
        for key, held in stale:
            log.info("inode %d: letting go again of %s (reclaimed by a renewal sent before a close)", key[0], held)
            self._release_later(key, unless_held=True)

    async def release_all(self, deadline: float) -> None:
        """Every lock of this session goes (an unmount, an SDK close): best effort,
        a lock not released here lapses with the session's lease."""
        for task in list(self._releasing.values()):
            task.cancel()
        parts: dict[int, dict[str, Any]] = {}
        for ino in self.held.inos():
            with contextlib.suppress(ShoalError):
                part = self.client.meta_partition(ino)
                parts[part["pid"]] = part

        async def one(part: dict[str, Any]) -> None:
            try:
                await self.client.call(part, Op.META_RELEASE_LOCKS, {}, end=time.monotonic() + deadline)
            except ShoalError as exc:
                log.info("could not release our locks on partition %d (they lapse): %s", part["pid"], exc.msg)
        await asyncio.gather(*(one(p) for p in parts.values()))
        self.held.forget()

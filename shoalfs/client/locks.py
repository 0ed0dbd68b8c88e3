"""File locks through the metanode that owns the file (proto/locks.py).

A request that must wait is sent again every `poll` seconds at most: the
metanode holds it meanwhile and answers as soon as the lock is granted, so
no process polls. An interrupted waiter (a signal) has its request answered
at once, not granted.

The locks this client holds are kept as the metanodes last told it, so that
a renewal can say what the session holds (a new partition leader learns its
locks from these) and so that a close costs a round trip only when the
closing owner holds a lock on the file. Every answer about an
owner's locks on a file carries the metanode's table version, (table id,
count): an answer older than the one kept is ignored, so answers that
arrive out of order never bring back a lock that was already let go.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any

from shoalfs.proto.errors import ShoalError, is_transient
from shoalfs.proto.locks import MAX_WAIT
from shoalfs.proto.opcodes import Op

if TYPE_CHECKING:
    from shoalfs.client.core import VolumeClient

log = logging.getLogger(__name__)

LockKey = tuple[int, int, int]  # (ino, kind, owner)


class HeldLocks:
    def __init__(self) -> None:
        self._held: dict[LockKey, tuple[tuple[str, int], list[list[int]]]] = {}  # -> (version, locks)
        self.lost = 0  # locks a renewal found gone (the session's lease lapsed meanwhile)

    def __bool__(self) -> bool:
        return bool(self._held)

    def learn(self, key: LockKey, held: list[list[int]], version: Any) -> None:
        version = (str(version[0]), int(version[1]))
        kept = self._held.get(key)
        if kept is not None and kept[0][0] == version[0] and kept[0][1] > version[1]:
            return  # an older answer than the one we have
        if held:
            self._held[key] = (version, held)
        else:
            self._held.pop(key, None)

    def holds(self, ino: int, kind: int, owner: int) -> bool:
        return (ino, kind, owner) in self._held

    def inos(self) -> set[int]:
        return {key[0] for key in self._held}

    def claims(self, inos: set[int]) -> list[list[Any]]:
        """What a renewal to the partition of `inos` says we hold."""
        return [[ino, kind, owner, locks] for (ino, kind, owner), (_, locks) in self._held.items() if ino in inos]

    def renewed(self, claims: list[list[Any]], answer: list[Any], version: Any) -> None:
        """A renewal's answer: what we still hold of what we claimed."""
        for (ino, kind, owner, claimed), (_, _, _, held) in zip(claims, answer, strict=False):
            if held != claimed:
                self.lost += 1
                log.warning("locks of owner %x on inode %d were lost (our session's lock lease lapsed): "
                            "held %s, now %s", owner, ino, claimed, held)
            self.learn((ino, kind, owner), held, version)

    def forget(self, ino: int | None = None, kind: int | None = None, owner: int | None = None) -> None:
        for key in [k for k in self._held if (ino is None or k[0] == ino) and (kind is None or k[1] == kind)
                    and (owner is None or k[2] == owner)]:
            del self._held[key]


class FileLocks:
    def __init__(self, client: VolumeClient) -> None:
        self.client = client
        self.held = HeldLocks()
        self._releasing: set[asyncio.Task[None]] = set()

    @property
    def poll(self) -> float:
        """How long the metanode may hold a waiting request: well inside one attempt."""
        return min(MAX_WAIT, self.client.options.attempt_timeout / 2)

    async def lock(self, ino: int, kind: int, owner: int, type: int, start: int, end: int, pid: int,
                   wait: bool, interrupted: asyncio.Event | None = None) -> list[int] | None:
        """Set a lock (or unlock); None once done, or the lock in the way
        ([type, start, end, pid]) when not waiting. A waiter whose
        `interrupted` is set raises InterruptedError."""
        part = self.client.meta_partition(ino)
        target = {"ino": ino, "kind": kind, "owner": owner}
        body = {**target, "type": type, "start": start, "end": end, "pid": pid, "wait": self.poll if wait else 0.0}
        canceller = None
        if wait and interrupted is not None:
            async def cancel_when_interrupted() -> None:
                await interrupted.wait()
                with contextlib.suppress(ShoalError):
                    await self.client.call(part, Op.META_LOCK_CANCEL, target, end=time.monotonic() + self.poll)
            canceller = asyncio.create_task(cancel_when_interrupted())
        try:
            while True:
                if interrupted is not None and interrupted.is_set():
                    raise InterruptedError("interrupted while waiting for a lock")
                res = await self.client.call(part, Op.META_LOCK, body)
                had_locks = bool(self.held)
                self.held.learn((ino, kind, owner), res["held"], res["version"])
                if self.held and not had_locks:  # renewals come every third of a lock lease now
                    self.client.renew_schedule_changed.set()
                self.client.learn_lock_lease(res.get("lock_lease"))
                if res["granted"]:
                    return None
                if not wait:
                    conflict: list[int] = res["conflict"]
                    return conflict
        finally:
            if canceller is not None:
                canceller.cancel()

    async def test(self, ino: int, kind: int, owner: int, type: int, start: int, end: int) -> list[int] | None:
        """F_GETLK: a lock another owner holds in the way, or None."""
        res = await self.client.meta(ino, Op.META_LOCK, {"ino": ino, "kind": kind, "owner": owner, "type": type,
                                                         "start": start, "end": end, "pid": 0, "test": True})
        conflict: list[int] | None = res["conflict"]
        return conflict

    async def release(self, ino: int, kind: int, owner: int) -> None:
        """An owner's locks on a file go (a close): a round trip only if it holds one."""
        if not self.held.holds(ino, kind, owner):
            return
        body = {"ino": ino, "kind": kind, "owner": owner}
        try:
            await self.client.meta(ino, Op.META_RELEASE_LOCKS, body)
        except ShoalError as exc:
            if self.client.fenced or not is_transient(exc.code):
                raise
            # the metanode stayed away for a whole deadline. Our renewals would keep
            # the lock alive, so it is let go from here as soon as the metanode is
            # back (meanwhile it cannot grant it to anyone anyway); the close goes on
            log.warning("could not release locks on inode %d yet (trying on): %s", ino, exc.msg)
            task = asyncio.create_task(self._release_later(ino, body))
            self._releasing.add(task)
            task.add_done_callback(self._releasing.discard)
            return
        self.held.forget(ino, kind, owner)

    async def _release_later(self, ino: int, body: dict[str, Any]) -> None:
        while not self.client.fenced:
            try:
                await self.client.meta(ino, Op.META_RELEASE_LOCKS, body)
                break
            except ShoalError as exc:
                if not is_transient(exc.code):
                    break
        self.held.forget(ino, body["kind"], body["owner"])

    async def release_all(self, deadline: float) -> None:
        """Every lock of this session goes (an unmount, an SDK close): best effort,
        a lock not released here lapses with the session's lease."""
        parts = {self.client.meta_partition(ino)["pid"]: self.client.meta_partition(ino) for ino in self.held.inos()}
        for part in parts.values():
            try:
                await self.client.call(part, Op.META_RELEASE_LOCKS, {}, end=time.monotonic() + deadline)
            except ShoalError as exc:
                log.info("could not release our locks on partition %d (they lapse): %s", part["pid"], exc.msg)
        self.held.forget()

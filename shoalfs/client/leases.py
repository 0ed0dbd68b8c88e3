"""What this session holds at the metanodes, kept alive: open files and locks.

Each metanode keeps a session's hold on the files it has open (so another
mount's unlink leaves them readable) for `open_lease` after the last
renewal, and its locks for `lock_lease`. Every third of the shortest lease
that matters (the lock lease only while we hold a lock), each partition is
told, all at once, which of its files we have open and which locks we hold:
a new partition leader learns our locks from that (metanode/locks.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any

from shoalfs.proto.errors import ShoalError
from shoalfs.proto.layout import LOCK_LEASE, OPEN_LEASE
from shoalfs.proto.opcodes import Op

if TYPE_CHECKING:
    from shoalfs.client.core import VolumeClient

log = logging.getLogger(__name__)


class SessionLeases:
    def __init__(self, client: VolumeClient) -> None:
        self.client = client
        self.open_lease = OPEN_LEASE
        self.lock_lease = LOCK_LEASE
        # renew on a new schedule from now: a lease got shorter, or we hold our first lock
        self.schedule_changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._renew())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    def learn(self, reply: dict[str, Any]) -> None:
        """A metanode's leases, from any answer that tells them."""
        lease = reply.get("lease")
        if isinstance(lease, (int, float)) and 0 < lease < self.open_lease:
            self.open_lease = float(lease)
            self.schedule_changed.set()
        self.learn_lock_lease(reply.get("lock_lease"))

    def learn_lock_lease(self, lease: Any) -> None:
        if isinstance(lease, (int, float)) and 0 < lease < self.lock_lease:
            self.lock_lease = float(lease)
            self.schedule_changed.set()

    @property
    def period(self) -> float:
        locks = self.client.locks.held
        return min(self.open_lease, self.lock_lease if locks else self.open_lease) / 3

    async def _renew(self) -> None:
        next_round = time.monotonic() + self.period
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.schedule_changed.wait(), max(0.0, next_round - time.monotonic()))
            self.schedule_changed.clear()
            next_round = time.monotonic() + self.period  # from this round's start: a slow one delays none
            by_part: dict[int, tuple[dict[str, Any], list[int], set[int]]] = {}
            for ino, is_open in ([(i, True) for i in self.client.open_counts]
                                 + [(i, False) for i in self.client.locks.held.inos()]):
                with contextlib.suppress(ShoalError):
                    part = self.client.meta_partition(ino)
                    entry = by_part.setdefault(part["pid"], (part, [], set()))
                    (entry[1].append if is_open else entry[2].add)(ino)
            # all at once: a partition that does not answer delays no other's renewal
            await asyncio.gather(*(self._renew_partition(*entry) for entry in by_part.values()))

    async def _renew_partition(self, part: dict[str, Any], opened: list[int], locked: set[int]) -> None:
        locks = self.client.locks
        claims, seen = locks.held.claims(locked)
        try:
            res = await self.client.call(part, Op.META_RENEW_LEASES, {"open": opened, "locks": claims},
                                         end=time.monotonic() + self.period)
        except ShoalError as exc:  # the fence too: a deleted volume's loop ends with close()
            log.warning("could not renew the leases on partition %d: %s", part["pid"], exc.msg)
            return
        self.learn(res)
        locks.let_go_again(locks.held.renewed(seen, res.get("locks", []), res.get("version", ["", 0])))

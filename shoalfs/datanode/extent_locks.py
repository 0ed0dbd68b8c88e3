"""Which operations on an extent may run together.

Operations whose spans (byte ranges; a block they touch part of counts
whole) overlap run one at a time, in the order they came, so every copy
applies overlapping writes in the same order and a block's checksum is
never merged by two writes at once. Disjoint ones run together: the writes
of a sequential stream overlap nothing, and a replicated write spends most
of its time waiting for the followers and the disk.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from shoalfs.datanode.extents import BLOCK
from shoalfs.proto.layout import CHUNK

WHOLE = (0, CHUNK)


@dataclass(eq=False)
class _Held:
    lo: int
    hi: int
    done: asyncio.Event = field(default_factory=asyncio.Event)


class ExtentLocks:
    def __init__(self) -> None:
        self._queues: dict[int, list[_Held]] = {}  # ext -> operations on it, holding or waiting, in order

    @contextlib.asynccontextmanager
    async def hold(self, ext: int, span: tuple[int, int] = WHOLE) -> AsyncIterator[None]:
        """Wait for every earlier operation on `ext` that overlaps `span`; the
        queue goes when it is empty, so a peer naming many extents leaves nothing."""
        lo, hi = span[0] // BLOCK * BLOCK, -(-span[1] // BLOCK) * BLOCK
        queue = self._queues.setdefault(ext, [])
        ahead = [h for h in queue if h.lo < hi and lo < h.hi]
        me = _Held(lo, hi)
        queue.append(me)
        try:
            for held in ahead:
                await held.done.wait()
            yield
        finally:
            me.done.set()
            queue.remove(me)
            if not queue:
                del self._queues[ext]

    def __len__(self) -> int:
        return len(self._queues)

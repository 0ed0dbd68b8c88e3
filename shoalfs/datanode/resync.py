"""Copying extents between the replicas of a data partition.

Catch-up (the leader makes a lagging member hold what it holds) compares
digests — an extent's size and a CRC of its checksum sidecar — and copies
each extent that differs whole, under that extent's lock so the copy is one
consistent image; extents the leader does not hold are dropped there.
Repair (a read found a bad block here) pulls the extent whole from an
in-sync member and installs it in place; the read then verifies it again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from shoalfs.datanode import extents
from shoalfs.proto.errors import Code, ShoalError
from shoalfs.proto.opcodes import Op
from shoalfs.replication.view import View

log = logging.getLogger(__name__)

PIECE = 4 * 1024 * 1024  # bytes of one copy message (a sidecar rides with the last)
DIGEST_TIMEOUT = 120.0  # a whole partition's digests (reading every sidecar; a scrub, every block)
UNSOUND = (-1, -1)  # the digest of an extent with a block that fails its checksum
Call = Callable[..., Awaitable[Any]]  # ReplicationHub.call


class ExtentCopier:
    def __init__(self, part: Any, call: Call) -> None:
        self.part = part  # a datanode.server.DataPartition
        self.call = call

    async def resync(self, member: str, view: View, final: bool) -> None:
        """Make `member` hold exactly the extents this leader holds."""
        wire = view.to_wire()
        theirs = (await self.call(member, Op.REPL_DIGEST, view.pid, {"view": wire},
                                  timeout=DIGEST_TIMEOUT))["extents"]
        ours = await asyncio.to_thread(self.part.digests)
        differ = [ext for ext, d in ours.items() if list(theirs.get(ext) or []) != list(d)]
        extra = [ext for ext in theirs if ext not in ours]
        progress = self.part.replica.progress
        for done, ext in enumerate(differ):
            progress[member] = f"{'last round' if final else 'copying'}: {done}/{len(differ)} extents"
            await self.push(member, view, ext)
        for ext in extra:
            await self.call(member, Op.REPL_EXTENT_DROP, view.pid, {"view": wire, "ext": ext})
        if differ or extra:
            log.info("partition %d: %s %s: %d extents copied, %d dropped", view.pid, member,
                     "caught up" if final else "copy round", len(differ), len(extra))

    async def push(self, member: str, view: View, ext: int) -> None:
        async with self.part.extent_lock(ext):
            await self._push_locked(member, view, ext)

    async def _push_locked(self, member: str, view: View, ext: int) -> None:
        extent = self.part.extent(ext)
        sidecar = await asyncio.to_thread(_whole_sidecar, extent)
        if sidecar is None:
            return  # gone meanwhile: the next round drops it there
        size = extent.size()
        offset = 0
        while True:
            piece, _ = await asyncio.to_thread(extents.read_raw, extent, False, offset, PIECE)
            last = offset + len(piece) >= size
            await self.call(member, Op.REPL_EXTENT_INSTALL, view.pid, {
                "view": view.to_wire(), "ext": ext, "offset": offset, "data": piece, "total": size,
                "sidecar": sidecar if last else None})
            offset += len(piece)
            if last:
                return

    async def scrub(self, member: str, view: View) -> str:
        """Compare `member`'s copy with ours extent by extent; an extent that
        differs is settled under its lock (no change to it in flight): the
        sound copy, ours unless a block of ours fails its checksum, wins."""
        wire = view.to_wire()
        theirs = (await self.call(member, Op.REPL_DIGEST, view.pid, {"view": wire, "verify": True},
                                  timeout=DIGEST_TIMEOUT))["extents"]
        ours = await asyncio.to_thread(self.part.digests, True)
        suspects = sorted({ext for ext, d in ours.items() if list(theirs.get(ext) or []) != list(d)}
                          | {ext for ext in theirs if ext not in ours})
        repaired = 0
        for ext in suspects:
            async with self.part.extent_lock(ext):
                extent = self.part.extent(ext)
                mine = await asyncio.to_thread(extents.digest, extent)
                got = await self.call(member, Op.REPL_DIGEST, view.pid, {"view": wire, "ext": ext})
                other = got["extents"].get(ext)
                rotten = list(theirs.get(ext) or []) == list(UNSOUND) or ours.get(ext) == UNSOUND
                if (list(other) if other else None) == (list(mine) if mine else None) and not rotten:
                    continue  # a change in flight made them differ for a moment
                repaired += 1
                if mine is None:
                    await self.call(member, Op.REPL_EXTENT_DROP, view.pid, {"view": wire, "ext": ext})
                elif await asyncio.to_thread(sound, extent):
                    await self._push_locked(member, view, ext)
                else:
                    await self.pull(member, view, ext)
                log.warning("partition %d: extent %d differed on %s; repaired", view.pid, ext, member)
        return "same" if not repaired else f"{repaired} extents differed and were repaired"

    async def pull(self, source: str, view: View, ext: int) -> None:
        """Replace our copy of an extent with `source`'s. The caller holds the
        extent's lock, so no change to it reaches `source` meanwhile."""
        sidecar = await self._read_all(source, view.pid, ext, True)
        data = await self._read_all(source, view.pid, ext, False)
        await asyncio.to_thread(extents.install_piece, self.part.extent(ext), 0, data, len(data), sidecar)
        log.warning("partition %d: extent %d repaired from %s", view.pid, ext, source)

    async def _read_all(self, source: str, pid: int, ext: int, sidecar: bool) -> bytes:
        chunks: list[bytes] = []
        offset, size = 0, None
        while size is None or offset < size:
            got = await self.call(source, Op.REPL_EXTENT_READ, pid,
                                  {"ext": ext, "sidecar": sidecar, "offset": offset, "size": PIECE})
            size = int(got["size"])
            if not got["data"] and offset < size:
                raise ShoalError(Code.DATA_LOST, f"extent {ext} on {source} ended early")
            chunks.append(got["data"])
            offset += len(got["data"])
        return b"".join(chunks)


def sound(extent: extents.Extent) -> bool:
    """Whether every block of the extent matches its checksum."""
    try:
        extent.read(0, extent.size())
        return True
    except ShoalError:
        return False


def _whole_sidecar(extent: extents.Extent) -> bytes | None:
    try:
        with open(extent.crc_path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None

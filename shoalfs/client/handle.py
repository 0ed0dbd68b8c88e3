"""An open file: write-behind buffer, adaptive read-ahead, durability tracking.

Writes collect as dirty segments (contiguous writes merge) until
WRITE_BUFFER bytes are dirty; then they go to the datanodes in the
background, with at most MAX_INFLIGHT batches in flight, while the
application keeps writing. flush/fsync/close wait for all of it. A failure
to write back is remembered and raised by the next write, flush, fsync or
close, so a write that returned success but never became durable is never
lost silently.

Reads that follow each other sequentially grow a read-ahead window (up to
READ_AHEAD) and prefetch the next window in the background; random reads
fetch only what was asked.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from shoalfs.client.core import VolumeClient
from shoalfs.proto.errors import Code, ShoalError

WRITE_BUFFER = 4 * 1024 * 1024
MAX_INFLIGHT = 4
READ_AHEAD = 4 * 1024 * 1024
FIRST_WINDOW = 128 * 1024


def _overlap(a_off: int, a_len: int, b_off: int, b_len: int) -> bool:
    return a_off < b_off + b_len and b_off < a_off + a_len


class FileHandle:
    def __init__(self, client: VolumeClient, attr: dict[str, Any], extents: dict[int, list[int]],
                 append: bool = False) -> None:
        self.client = client
        self.ino: int = attr["ino"]
        self.size: int = attr["size"]
        self.append = append
        self.known = extents
        self._segments: list[list[Any]] = []  # [offset, bytearray], not yet sent
        self._dirty = 0
        self._inflight: dict[asyncio.Task[None], list[tuple[int, int]]] = {}
        self._ra_off = 0
        self._ra = b""
        self._window = FIRST_WINDOW
        self._next_seq = 0
        self._prefetch: tuple[int, asyncio.Task[bytes]] | None = None
        self._unsynced: set[int] = set()
        self._size_dirty = False
        self.error: ShoalError | None = None
        self.closed = False
        self.wrote = False
        client.open_counts[self.ino] = client.open_counts.get(self.ino, 0) + 1

    # ----- writes ---------------------------------------------------------------
    async def write(self, offset: int, data: bytes) -> int:
        self._check(report_only=True)
        if self.append:
            offset = self.size
        self._drop_read_cache()
        last = self._segments[-1] if self._segments else None
        if last is not None and last[0] + len(last[1]) == offset:
            last[1] += data
        else:
            if any(_overlap(o, len(b), offset, len(data)) for o, b in self._segments):
                await self._drain()  # keep the order of overlapping writes
            self._segments.append([offset, bytearray(data)])
        self._dirty += len(data)
        self.size = max(self.size, offset + len(data))
        self._size_dirty = True
        self.wrote = True
        if self._dirty >= WRITE_BUFFER:
            await self._send()
        return len(data)

    async def _send(self) -> None:
        """Start writing the dirty segments back in the background."""
        if not self._segments:
            return
        batch, self._segments, self._dirty = self._segments, [], 0
        ranges = [(o, len(b)) for o, b in batch]
        busy = [t for t, rs in self._inflight.items()
                if any(_overlap(o, n, p, m) for o, n in ranges for p, m in rs)]
        if busy:  # an earlier write of the same bytes must land first
            await asyncio.gather(*busy, return_exceptions=True)
        while len(self._inflight) >= MAX_INFLIGHT:
            await asyncio.wait(list(self._inflight), return_when=asyncio.FIRST_COMPLETED)
        task = asyncio.ensure_future(self._write_batch(batch))
        self._inflight[task] = ranges
        task.add_done_callback(lambda t: self._inflight.pop(t, None))

    async def _write_batch(self, batch: list[list[Any]]) -> None:
        try:
            done = await asyncio.gather(*(self.client.write_data(self.ino, o, bytes(b), self.known)
                                          for o, b in batch))
            for touched in done:
                self._unsynced |= touched
        except ShoalError as exc:
            self.error = self.error or exc
        except Exception as exc:  # a bug must not turn into silent loss either
            self.error = self.error or ShoalError(Code.INTERNAL, repr(exc))

    async def _drain(self) -> None:
        """Send everything and wait until it has landed (or failed)."""
        await self._send()
        while self._inflight:
            await asyncio.gather(*list(self._inflight), return_exceptions=True)

    # ----- reads ----------------------------------------------------------------
    def _drop_read_cache(self) -> None:
        self._ra = b""
        if self._prefetch is not None:
            self._prefetch[1].cancel()
            self._prefetch = None

    async def read(self, offset: int, size: int) -> bytes:
        self._check(report_only=True)
        if self._segments or self._inflight:
            await self._drain()  # read your own writes
            self._check(report_only=True)
        if size <= 0 or offset >= self.size:
            return b""
        end = min(offset + size, self.size)
        sequential = offset == self._next_seq
        self._next_seq = end
        if not (self._ra_off <= offset and end <= self._ra_off + len(self._ra)):
            await self._fill(offset, end, sequential)
        start = offset - self._ra_off
        data = self._ra[start : start + (end - offset)]
        if sequential and self._prefetch is None and self._ra_off + len(self._ra) < self.size:
            nxt = self._ra_off + len(self._ra)
            self._prefetch = (nxt, asyncio.ensure_future(
                self.client.read_data(self.ino, nxt, self._window, self.size, self.known)))
        return data

    async def _fill(self, offset: int, end: int, sequential: bool) -> None:
        if self._prefetch is not None:
            at, task = self._prefetch
            self._prefetch = None
            if at <= offset < at + self._window:
                try:
                    self._ra, self._ra_off = await task, at
                except (ShoalError, asyncio.CancelledError):
                    self._ra = b""
                if self._ra_off <= offset and end <= self._ra_off + len(self._ra):
                    self._window = min(READ_AHEAD, self._window * 2)
                    return
            else:
                task.cancel()
        self._window = min(READ_AHEAD, self._window * 2) if sequential else FIRST_WINDOW
        want = max(end - offset, self._window if sequential else 0)
        try:
            self._ra = await self.client.read_data(self.ino, offset, want, self.size, self.known)
        except ShoalError:
            if want == end - offset:
                raise
            # read-ahead must not fail a read whose own bytes are fine
            self._ra = await self.client.read_data(self.ino, offset, end - offset, self.size, self.known)
        self._ra_off = offset

    # ----- durability -------------------------------------------------------------
    async def flush(self) -> None:
        """Push buffered data and the new size to the cluster."""
        self._check()
        await self._drain()
        self._check()
        if self._size_dirty:
            await self.client.setattr(self.ino, grow=self.size, mtime=time.time_ns())
            self._size_dirty = False

    async def fsync(self) -> None:
        await self.flush()
        await self.client.sync_chunks(self.ino, self._unsynced, self.known)
        self._unsynced.clear()

    async def truncate(self, size: int) -> None:
        await self.flush()
        attr = await self.client.truncate(self.ino, size)
        self.known = await self.client.extents(self.ino)
        self.size = attr["size"]
        self._drop_read_cache()

    async def refresh(self) -> None:
        """Re-read size and extents (close-to-open: an open sees prior closes)."""
        attr, self.known = await self.client.attr_and_extents(self.ino)
        self.size = max(self.size, attr["size"]) if self._size_dirty else attr["size"]
        self._drop_read_cache()

    async def release(self) -> None:
        """Close: flush, then drop the inode if it was unlinked while open."""
        if self.closed:
            return
        try:
            await self.flush()
        finally:
            self.closed = True
            self._drop_read_cache()
            count = self.client.open_counts.get(self.ino, 1) - 1
            if count > 0:
                self.client.open_counts[self.ino] = count
            else:
                self.client.open_counts.pop(self.ino, None)
                if self.ino in self.client.pending_evict:
                    await self.client.evict(self.ino)

    def fail(self, err: ShoalError) -> None:
        """The volume is gone: drop buffered data; if anything written was not
        yet durable, the next flush/fsync/close reports `err` (never silent)."""
        if self._segments or self._inflight or self._unsynced or self._size_dirty:
            self.error = err
        self._segments = []
        self._dirty = 0
        for task in self._inflight:
            task.cancel()
        self._unsynced.clear()
        self._size_dirty = False
        self._drop_read_cache()
        self.known = {}

    def _check(self, report_only: bool = False) -> None:
        """Raise a pending write-back error. Writes and reads report it and keep
        it; flush, fsync and close report it and clear it."""
        if self.error is not None:
            err = self.error
            if not report_only:
                self.error = None
            raise err
        if self.closed:
            raise ShoalError(Code.INVALID, "file is closed")

"""An open file: write-back buffer, read-ahead and durability tracking.

Writes collect in a buffer of up to WRITE_BUFFER contiguous bytes and go to
the datanodes when it fills, on flush, fsync and close. A failure to write
back is remembered and raised by the next flush/fsync/close, so a write that
returned success but never became durable is never lost silently.
"""

from __future__ import annotations

import time
from typing import Any

from shoalfs.client.core import VolumeClient
from shoalfs.proto.errors import Code, ShoalError

WRITE_BUFFER = 4 * 1024 * 1024
READ_AHEAD = 4 * 1024 * 1024


class FileHandle:
    def __init__(self, client: VolumeClient, attr: dict[str, Any], extents: dict[int, list[int]],
                 append: bool = False) -> None:
        self.client = client
        self.ino: int = attr["ino"]
        self.size: int = attr["size"]
        self.append = append
        self.known = extents
        self._buf_off = 0
        self._buf = bytearray()
        self._ra_off = 0
        self._ra = b""
        self._unsynced: set[int] = set()
        self._size_dirty = False
        self.error: ShoalError | None = None
        self.closed = False
        self.wrote = False
        client.open_counts[self.ino] = client.open_counts.get(self.ino, 0) + 1

    async def write(self, offset: int, data: bytes) -> int:
        self._check()
        if self.append:
            offset = self.size
        if self._buf and (offset != self._buf_off + len(self._buf)
                          or len(self._buf) + len(data) > WRITE_BUFFER):
            await self._write_back()
        if not self._buf:
            self._buf_off = offset
        self._buf += data
        self.size = max(self.size, offset + len(data))
        self._size_dirty = True
        self.wrote = True
        self._ra = b""
        if len(self._buf) >= WRITE_BUFFER:
            await self._write_back()
        return len(data)

    async def read(self, offset: int, size: int) -> bytes:
        self._check()
        if self._buf:
            await self._write_back()
        if size <= 0 or offset >= self.size:
            return b""
        end = min(offset + size, self.size)
        if not (self._ra_off <= offset and end <= self._ra_off + len(self._ra)):
            try:
                self._ra = await self.client.read_data(self.ino, offset, max(end - offset, READ_AHEAD),
                                                       self.size, self.known)
            except ShoalError:
                # read-ahead must not fail a read whose own bytes are fine
                self._ra = await self.client.read_data(self.ino, offset, end - offset, self.size, self.known)
            self._ra_off = offset
        start = offset - self._ra_off
        return self._ra[start : start + (end - offset)]

    async def _write_back(self) -> None:
        if not self._buf:
            return
        data, off = bytes(self._buf), self._buf_off
        self._buf = bytearray()
        try:
            self._unsynced |= await self.client.write_data(self.ino, off, data, self.known)
        except ShoalError as exc:
            self.error = exc
            raise

    async def flush(self) -> None:
        """Push buffered data and the new size to the cluster."""
        self._check()
        await self._write_back()
        if self._size_dirty:
            try:
                await self.client.setattr(self.ino, grow=self.size, mtime=time.time_ns())
            except ShoalError as exc:
                self.error = exc
                raise
            self._size_dirty = False

    async def fsync(self) -> None:
        await self.flush()
        try:
            await self.client.sync_chunks(self.ino, self._unsynced, self.known)
        except ShoalError as exc:
            self.error = exc
            raise
        self._unsynced.clear()

    async def truncate(self, size: int) -> None:
        await self.flush()
        attr = await self.client.truncate(self.ino, size)
        self.known = await self.client.extents(self.ino)
        self.size = attr["size"]
        self._ra = b""

    async def refresh(self) -> None:
        """Re-read size and extents (close-to-open: an open sees prior closes)."""
        attr = await self.client.getattr(self.ino)
        self.size = max(self.size, attr["size"]) if self._size_dirty else attr["size"]
        self.known = await self.client.extents(self.ino)
        self._ra = b""

    async def release(self) -> None:
        """Close: flush, then drop the inode if it was unlinked while open."""
        if self.closed:
            return
        try:
            await self.flush()
        finally:
            self.closed = True
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
        if self._buf or self._unsynced or self._size_dirty:
            self.error = err
        self._buf = bytearray()
        self._unsynced.clear()
        self._size_dirty = False
        self._ra = b""
        self.known = {}

    def _check(self) -> None:
        if self.error is not None:
            err, self.error = self.error, None
            raise err
        if self.closed:
            raise ShoalError(Code.INVALID, "file is closed")

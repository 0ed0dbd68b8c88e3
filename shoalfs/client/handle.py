"""An open file: write-behind buffer, adaptive read-ahead, durability tracking.

Writes collect as dirty segments (contiguous writes merge) until
WRITE_BUFFER bytes are dirty; then they go to the datanodes in the
background, with at most MAX_INFLIGHT batches in flight, while the
application keeps writing. flush/fsync/close wait for all of it. A failure
to write back is remembered and raised by the next write, flush, fsync or
close, so a write that returned success but never became durable is never
lost silently. The size pushed to the metanode covers only batches that
landed: bytes whose write-back failed never make the file grow.

Reads go through ReadAhead (readahead.py): sequential readers get windows
fetched ahead of them, random reads fetch only what was asked.

Every public method is one user operation with one deadline: `end`, an
absolute time.monotonic() (ClientOptions.op_deadline from the call if not
given), shared by everything the operation waits for — a pending prefetch,
a retry without read-ahead, write-behind batches, the size update.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from shoalfs.client.core import CALL_GRACE, VolumeClient, check_file_size
from shoalfs.client.readahead import ReadAhead
from shoalfs.proto.errors import Code, ShoalError
from shoalfs.proto.locks import UNLOCK
from shoalfs.proto.opcodes import Op

log = logging.getLogger(__name__)

WRITE_BUFFER = 4 * 1024 * 1024
MAX_INFLIGHT = 4
# waits on background batches allow this much past the deadline: their own
# calls end by then (core.call cuts a call off CALL_GRACE after its deadline)
WAIT_GRACE = CALL_GRACE + 0.1


async def coherent_lock(handles: Iterable[FileHandle], type: int,
                        lock: Callable[[], Awaitable[list[int] | None]]) -> list[int] | None:
    """Set a lock with lock-to-unlock consistency, as NFS and CephFS give: what
    we wrote is on the cluster before we let a lock go, and once we hold one,
    what the previous holder wrote is what we read (sizes and extents
    re-read, read-ahead dropped). A lock refused (the one in the way is
    returned) costs no more than its own round trip."""
    handles = list(handles)
    if type == UNLOCK:
        for h in handles:
            await h.flush()
    conflict = await lock()
    if type != UNLOCK and conflict is None:
        for h in handles:
            await h.flush()
            await h.refresh()
    return conflict


def _overlap(a_off: int, a_len: int, b_off: int, b_len: int) -> bool:
    return a_off < b_off + b_len and b_off < a_off + a_len


class FileHandle:
    def __init__(self, client: VolumeClient, attr: dict[str, Any], extents: dict[int, list[int]],
                 append: bool = False) -> None:
        self.client = client
        self.ino: int = attr["ino"]
        self.size: int = attr["size"]  # as this handle sees it: includes unsent writes
        self.append = append
        self.known = extents
        self._segments: list[list[Any]] = []  # [offset, bytearray], not yet sent
        self._dirty = 0
        self._inflight: dict[asyncio.Task[None], tuple[list[tuple[int, int]], float]] = {}  # ranges, end
        self._ahead = ReadAhead(self._fetch)
        self._cache_gen = 0  # bumped whenever cached bytes may have gone stale
        self._unsynced: set[int] = set()
        self._meta_size: int = attr["size"]  # the size the metanode has, as far as we know
        self._landed_end = 0  # end of the furthest batch that landed on the datanodes
        self._landed = False  # a batch landed since the size and mtime were last pushed
        self.error: ShoalError | None = None
        self.closed = False
        self.wrote = False
        client.open_counts[self.ino] = client.open_counts.get(self.ino, 0) + 1

    def deadline(self) -> float:
        """The deadline of a user operation starting now."""
        return time.monotonic() + self.client.options.op_deadline

    # ----- writes ---------------------------------------------------------------
    async def write(self, offset: int, data: bytes, end: float | None = None) -> int:
        end = self.deadline() if end is None else end
        self._check()
        if self.append:
            offset = self.size
        check_file_size(offset + len(data))
        self._drop_read_cache()
        last = self._segments[-1] if self._segments else None
        if last is not None and last[0] + len(last[1]) == offset:
            last[1] += data
        else:
            if any(_overlap(o, len(b), offset, len(data)) for o, b in self._segments):
                await self._drain(end)  # keep the order of overlapping writes
                self._check()
            self._segments.append([offset, bytearray(data)])
        self._dirty += len(data)
        self.size = max(self.size, offset + len(data))
        self.wrote = True
        if self._dirty >= WRITE_BUFFER:
            await self._send(end)
        return len(data)

    async def _send(self, end: float) -> None:
        """Start writing the dirty segments back in the background; the batch
        gets `end`, the deadline of the operation that sends it."""
        while self._segments:
            ranges = [(o, len(b)) for o, b in self._segments]
            busy = [t for t, (rs, _) in self._inflight.items()
                    if any(_overlap(o, n, p, m) for o, n in ranges for p, m in rs)]
            if busy:  # an earlier write of the same bytes must land first
                await self._wait(busy, end, asyncio.ALL_COMPLETED)
            elif len(self._inflight) >= MAX_INFLIGHT:
                await self._wait(list(self._inflight), end, asyncio.FIRST_COMPLETED)
            else:
                batch, self._segments, self._dirty = self._segments, [], 0
                task = asyncio.ensure_future(self._write_batch(batch, end))
                self._inflight[task] = (ranges, end)
                task.add_done_callback(lambda t: self._inflight.pop(t, None))
                return

    async def _wait(self, tasks: Iterable[asyncio.Task[None]], end: float, until: str) -> None:
        """Wait for write-back batches, but not past the operation's deadline.
        Then a batch overdue by its own deadline is cancelled and counts as
        failed; if the wait is still not over (a batch sent later, by a
        concurrent call, with a later deadline), this operation times out."""
        tasks = set(tasks)
        if not tasks:
            return
        done, pending = await asyncio.wait(tasks, timeout=max(0.0, end + WAIT_GRACE - time.monotonic()),
                                           return_when=until)
        if done and until == asyncio.FIRST_COMPLETED or not pending:
            return
        now = time.monotonic()
        overdue = {t for t in pending if t in self._inflight and self._inflight[t][1] + WAIT_GRACE <= now}
        for task in overdue:
            task.cancel()
            del self._inflight[task]
            self.error = self.error or ShoalError(Code.TIMEOUT, "write-back did not finish in time")
        if overdue == pending or until == asyncio.FIRST_COMPLETED and overdue:
            return
        raise ShoalError(Code.TIMEOUT, "write-back still in flight at the deadline")

    async def _write_batch(self, batch: list[list[Any]], end: float) -> None:
        try:
            # views: a batch's buffers are never touched again (new writes go to new segments)
            touched = await self.client.write_data(self.ino, [(o, memoryview(b)) for o, b in batch],
                                                   self.known, end)
        except ShoalError as exc:
            self.error = self.error or exc
            return
        except Exception as exc:  # a bug must not turn into silent loss either
            self.error = self.error or ShoalError(Code.INTERNAL, repr(exc))
            return
        finally:
            # landed or not, what a window fetched before may predate it
            self._drop_read_cache()
        # only now does the batch count: a failed one never makes the file grow
        self._unsynced |= touched
        self._landed_end = max([self._landed_end] + [o + len(b) for o, b in batch])
        self._landed = True

    async def _drain(self, end: float) -> None:
        """Send everything and wait until it has landed or failed (a failure
        is left in self.error), or the deadline passed."""
        await self._send(end)
        while self._inflight:
            await self._wait(list(self._inflight), end, asyncio.ALL_COMPLETED)

    def _settled_size(self) -> int:
        """The size once every write this handle still holds lands: what the
        metanode has, what landed, and what is buffered or in flight."""
        ends = [o + len(b) for o, b in self._segments]
        ends += [o + n for ranges, _ in self._inflight.values() for o, n in ranges]
        return max([self._meta_size, self._landed_end] + ends)

    # ----- reads ----------------------------------------------------------------
    def _drop_read_cache(self) -> None:
        self._cache_gen += 1
        self._ahead.drop()

    def _fetch(self, offset: int, size: int, end: float | None) -> Awaitable[bytes]:
        return self.client.read_data(self.ino, offset, size, self.size, self.known, end)

    async def read(self, offset: int, size: int, end: float | None = None) -> bytes | memoryview:
        end = self.deadline() if end is None else end
        self._check()
        if self._segments or self._inflight:
            await self._drain(end)  # read your own writes
            self._check()
            self._drop_read_cache()  # a window started before they landed has old bytes
        gen = self._cache_gen
        if size <= 0 or offset >= self.size:
            return b""
        data = await self._ahead.read(offset, min(offset + size, self.size), self.size, end)
        if self._cache_gen != gen:
            # a write or truncate came in while this read waited: what it read
            # may predate it, so it is this read's answer but nobody's cache
            self._drop_read_cache()
        return data

    # ----- durability -------------------------------------------------------------
    async def flush(self, end: float | None = None) -> None:
        """Push buffered data and the new size to the cluster. A write-back
        failure is raised here once; what landed still gets its size."""
        end = self.deadline() if end is None else end
        if self.closed:
            raise ShoalError(Code.INVALID, "file is closed")
        await self._drain(end)  # first, so that nothing is left behind when it fails
        err, self.error = self.error, None
        if err is not None:  # the failed bytes are gone: stop counting them
            self.size = self._settled_size()
        if self._landed:
            try:
                await self.client.call(self.client.meta_partition(self.ino), Op.META_SET_ATTR,
                                       {"ino": self.ino, "grow": self._landed_end, "mtime": time.time_ns()},
                                       end)
                self._landed = False
                self._meta_size = max(self._meta_size, self._landed_end)
            except ShoalError as exc:
                if exc.code == Code.NO_SPACE:  # past a limit: the bytes that landed are not the file's
                    await self._forget_refused()
                if err is None:
                    raise
        if err is not None:
            raise err

    async def fsync(self, end: float | None = None) -> None:
        end = self.deadline() if end is None else end
        await self.flush(end)
        chunks = set(self._unsynced)
        await self.client.sync_chunks(self.ino, chunks, self.known, end)
        self._unsynced -= chunks

    async def _forget_refused(self) -> None:
        """The size update was refused (a capacity or quota limit): cut the
        data back to the file's size, so a later extension past it reads
        zeros, not the refused bytes."""
        self._landed = False
        try:
            await self.client.truncate(self.ino, self._meta_size)
            self.known = await self.client.extents(self.ino)
        except ShoalError as exc:
            log.warning("inode %d: refused bytes past %d not cut back: %s", self.ino, self._meta_size, exc.msg)
        self.size = self._landed_end = self._meta_size
        self._drop_read_cache()

    async def truncate(self, size: int, end: float | None = None) -> None:
        await self.flush(end)
        attr = await self.client.truncate(self.ino, size)
        self.known = await self.client.extents(self.ino)
        self.size = self._meta_size = self._landed_end = attr["size"]
        self._drop_read_cache()

    async def refresh(self) -> None:
        """Re-read size and extents (close-to-open: an open sees prior closes)."""
        attr, self.known = await self.client.attr_and_extents(self.ino)
        self._meta_size = attr["size"]
        if self._landed_end > self._meta_size and not self._landed:
            self._landed_end = self._meta_size  # pushed before, cut since (truncate)
        self.size = self._settled_size()
        self._drop_read_cache()

    async def release(self, end: float | None = None) -> None:
        """Close: flush, then drop the inode if it was unlinked while open."""
        if self.closed:
            return
        try:
            await self.flush(end)
        finally:
            self.closed = True
            self._drop_read_cache()
            count = self.client.open_counts.get(self.ino, 1) - 1
            if count > 0:
                self.client.open_counts[self.ino] = count
            else:
                self.client.open_counts.pop(self.ino, None)
                await self.client.closed(self.ino)

    def fail(self, err: ShoalError) -> None:
        """The volume is gone: drop buffered data; if anything written was not
        yet durable, the next flush/fsync/close reports `err` (never silent)."""
        if self._segments or self._inflight or self._unsynced or self._landed:
            self.error = err
        self._segments = []
        self._dirty = 0
        for task in self._inflight:
            task.cancel()
        self._unsynced.clear()
        self._landed = False
        self._drop_read_cache()
        self.known = {}

    def _check(self) -> None:
        """Writes and reads raise a pending write-back error and keep it: the
        next flush, fsync or close reports it again and clears it."""
        if self.error is not None:
            raise self.error
        if self.closed:
            raise ShoalError(Code.INVALID, "file is closed")

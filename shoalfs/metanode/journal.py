"""Durable effect log with group commit and snapshots.

Records are *effects* (put/delete of whole values), so replaying a record
twice is harmless; that lets a snapshot be taken while new records are
still queued without any log rotation. An operation is acknowledged only
after its record is fdatasync'ed. Records that arrive while a sync is in
flight are committed together in the next one (group commit).
"""

from __future__ import annotations

import asyncio
import os
import struct
import zlib
from collections.abc import Callable
from typing import Any

import msgpack

from shoalfs.common.files import atomic_write

REC = struct.Struct("!II")  # length, crc32
INLINE_SYNC_BYTES = 64 * 1024


class Journal:
    def __init__(self, directory: str, snapshot_every: int = 200_000) -> None:
        self.dir = directory
        self.log_path = os.path.join(directory, "journal.log")
        self.snap_path = os.path.join(directory, "snapshot.msgpack")
        self.snapshot_every = snapshot_every
        self.records_since_snapshot = 0
        self._pending: list[bytes] = []
        self._waiters: list[asyncio.Future[None]] = []
        self._lock = asyncio.Lock()
        self._flusher: asyncio.Task[None] | None = None
        self._fd = -1

    def load(self) -> tuple[Any, list[Any]]:
        """Return (snapshot or None, log records after it); truncates a torn tail."""
        os.makedirs(self.dir, exist_ok=True)
        snapshot = None
        if os.path.exists(self.snap_path):
            with open(self.snap_path, "rb") as f:
                snapshot = msgpack.unpackb(f.read(), raw=False, strict_map_key=False)
        records: list[Any] = []
        good = 0
        if os.path.exists(self.log_path):
            with open(self.log_path, "rb") as f:
                data = f.read()
            pos = 0
            while pos + REC.size <= len(data):
                length, crc = REC.unpack_from(data, pos)
                body = data[pos + REC.size : pos + REC.size + length]
                if len(body) != length or zlib.crc32(body) != crc:
                    break
                records.append(msgpack.unpackb(body, raw=False, strict_map_key=False))
                pos += REC.size + length
            good = pos
        self._fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT, 0o644)
        os.ftruncate(self._fd, good)
        os.lseek(self._fd, good, os.SEEK_SET)
        self.records_since_snapshot = len(records)
        return snapshot, records

    def append(self, effects: list[Any]) -> asyncio.Future[None]:
        """Queue a record; the returned future resolves once it is durable."""
        body = msgpack.packb(effects, use_bin_type=True)
        self._pending.append(REC.pack(len(body), zlib.crc32(body)) + body)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        self.records_since_snapshot += 1
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_loop())
        return fut

    async def _flush_loop(self) -> None:
        while self._pending:
            async with self._lock:
                batch, waiters = b"".join(self._pending), self._waiters
                self._pending, self._waiters = [], []
                try:
                    if len(batch) <= INLINE_SYNC_BYTES:
                        # a thread hop costs more than a small fdatasync: do it here
                        self._write_sync(batch)
                    else:
                        await asyncio.to_thread(self._write_sync, batch)
                except OSError as exc:
                    for w in waiters:
                        if not w.done():
                            w.set_exception(exc)
                    continue
            for w in waiters:
                if not w.done():
                    w.set_result(None)

    def _write_sync(self, batch: bytes) -> None:
        view = memoryview(batch)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]
        os.fdatasync(self._fd)

    def wants_snapshot(self) -> bool:
        return self.records_since_snapshot >= self.snapshot_every

    async def snapshot(self, state_fn: Callable[[], Any]) -> None:
        """Persist state and empty the log. Records queued meanwhile are
        written after the truncation; replaying them again is idempotent."""
        async with self._lock:
            data = msgpack.packb(state_fn(), use_bin_type=True)
            await asyncio.to_thread(atomic_write, self.snap_path, data)
            os.ftruncate(self._fd, 0)
            os.lseek(self._fd, 0, os.SEEK_SET)
            os.fsync(self._fd)
            self.records_since_snapshot = len(self._pending)

    async def close(self) -> None:
        if self._flusher is not None:
            await asyncio.gather(self._flusher, return_exceptions=True)
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

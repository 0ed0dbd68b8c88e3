"""Cluster-wide file locks for the FUSE mount (needs pyfuse3 with lock
operations: packaging/pyfuse3-locks.patch, built by scripts/install).

The kernel passes flock and POSIX record locks on to us only when the
operations have these handlers; each is served by the file's metanode
(client/locks.py), so locks hold across every mount and SDK handle of the
volume. A process's POSIX locks go when it closes the file (flush), a
flock with the last descriptor of its open file (release).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
from typing import Any

import pyfuse3

from shoalfs.client.fuse_ops import ShoalOperations, guarded
from shoalfs.client.handle import coherent_lock
from shoalfs.proto.locks import EOF, FLOCK, FLOCK_TYPES, POSIX, READ, UNLOCK, WRITE, lock_length, lock_range

log = logging.getLogger(__name__)

LOCK_TYPES = {fcntl.F_RDLCK: READ, fcntl.F_WRLCK: WRITE, fcntl.F_UNLCK: UNLOCK}
FCNTL_TYPES = {v: k for k, v in LOCK_TYPES.items()}


def supported() -> bool:
    """Whether this pyfuse3 passes lock requests on (the patched build, this revision)."""
    return getattr(pyfuse3, "LOCKS_PATCH", 0) >= 2


class LockingOperations(ShoalOperations):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # the open files each POSIX lock owner locked through: an open file
        # description lock (F_OFD_SETLK) is owned by the open file, which no
        # flush names, so its locks go when the owner's last such file is released
        self._files_of: dict[tuple[int, int], set[int]] = {}  # (owner, ino) -> fh

    @guarded
    async def getlk(self, ino: int, fh: int, lock_owner: int, type: int, start: int, length: int,
                    pid: int) -> tuple[int, int, int, int]:
        conflict = await self.client.locks.test(ino, POSIX, lock_owner, LOCK_TYPES[type], *lock_range(start, length))
        if conflict is None:
            return fcntl.F_UNLCK, start, length, pid
        held, first, end, holder = conflict
        return FCNTL_TYPES[held], first, lock_length(first, end), holder

    @guarded
    async def setlk(self, ino: int, fh: int, lock_owner: int, type: int, start: int, length: int, pid: int,
                    sleep: bool, interrupt: pyfuse3.Interrupt) -> None:
        self._files_of.setdefault((lock_owner, ino), set()).add(fh)
        await self._lock(ino, POSIX, lock_owner, LOCK_TYPES[type], *lock_range(start, length), pid, sleep, interrupt)

    @guarded
    async def flock(self, ino: int, fh: int, lock_owner: int, op: int, interrupt: pyfuse3.Interrupt) -> None:
        type = FLOCK_TYPES.get(op & ~fcntl.LOCK_NB)
        if type is None:
            raise pyfuse3.FUSEError(errno.EINVAL)
        await self._lock(ino, FLOCK, lock_owner, type, 0, EOF, 0, not op & fcntl.LOCK_NB, interrupt)

    async def _lock(self, ino: int, kind: int, owner: int, type: int, start: int, end: int, pid: int, wait: bool,
                    interrupt: pyfuse3.Interrupt) -> None:
        interrupted = asyncio.Event()
        interrupt.add_callback(interrupted.set)  # a signal to the waiting process: EINTR, as locally
        try:
            conflict = await coherent_lock(self.open_handles(ino), type, lambda: self.client.locks.lock(
                ino, kind, owner, type, start, end, pid, wait, interrupted))
        except InterruptedError:
            raise pyfuse3.FUSEError(errno.EINTR) from None
        if conflict is not None:
            raise pyfuse3.FUSEError(errno.EAGAIN)  # = EWOULDBLOCK, what flock(LOCK_NB) gives
        if type != UNLOCK:
            # the kernel's pages and attributes of the file may predate the last holder's writes
            self._seen.pop(ino, None)
            with contextlib.suppress(OSError):  # ENOENT: the kernel holds nothing of it
                # from a thread: the kernel may need reads of ours to drop pages (pyfuse3's advice)
                await asyncio.to_thread(pyfuse3.invalidate_inode, ino, False)

    @guarded
    async def release_locks(self, ino: int, fh: int, lock_owner: int, flock: bool) -> None:
        """A close: the POSIX locks of the closing process go (flush), and a
        file's flock goes with its last descriptor (release)."""
        await self.client.locks.release(ino, FLOCK if flock else POSIX, lock_owner)

    async def release(self, fh: int) -> None:
        done = []  # owners whose last open file of the inode this was
        for (owner, ino), files in list(self._files_of.items()):
            files.discard(fh)
            if not files:
                del self._files_of[owner, ino]
                done.append((owner, ino))
        try:
            for owner, ino in done:
                await self.client.locks.release(ino, POSIX, owner)  # (no round trip if none held)
        except Exception as exc:  # the kernel ignores release errors; the locks lapse with the session
            log.warning("could not release POSIX locks: %s", exc)
        finally:
            await super().release(fh)
